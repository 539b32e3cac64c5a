"""Leave-one-out validation folds carved from a ratings log's training rows, to tune implicit
recipes without touching the eval split.

  python bench/validation_folds.py --ratings=ml-latest-small/ratings.csv \
      --data_dir=runs/small/data --folds=3 --output_dir=runs/small/folds \
      -- --source=movielens --split=leave_one_out --eval_negatives=99 \
         --item_features=ml-latest-small/movies.csv

`--data_dir` is the prepared eval split (leave-one-out). Fold 1 is the log without the eval
rows, prepared by leave-one-out again: each user's last *training* interaction is held out.
Fold k + 1 removes fold k's held-out rows too. Each fold keeps the original timestamps (which
leave-one-out needs, and `validation_split.py`'s export does not keep), lowers
--min_user_interactions by one per fold (a user keeps the same training history length
threshold), and uses seed k for its sampled negatives; the flags after `--` are
neumf-prepare's (without --input, --output_dir, --seed, --min_user_interactions). Writes
`<output_dir>/fold<k>/ratings.csv` and the prepared `<output_dir>/fold<k>/data`.
"""

import argparse
import csv
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import split_export  # noqa: E402


def carve(ratings: str, held_out: set, output: str) -> int:
  """Copies the MovieLens-style CSV `ratings` (header; user, item first) without the
  (user, item) pairs of `held_out`; returns how many rows it dropped."""
  dropped = 0
  with open(ratings, newline="") as src, open(output, "w", newline="") as dst:
    reader, writer = csv.reader(src), csv.writer(dst)
    writer.writerow(next(reader))
    for row in reader:
      if (row[0], row[1]) in held_out:
        dropped += 1
      else:
        writer.writerow(row)
  return dropped


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--ratings", required=True, help="the log the eval split was prepared from")
  parser.add_argument("--data_dir", required=True, help="the prepared eval split")
  parser.add_argument("--folds", type=int, default=3)
  parser.add_argument("--min_user_interactions", type=int, default=20,
                      help="the eval split's value")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("prepare_flags", nargs="*", help="neumf-prepare's flags, after --")
  args = parser.parse_args()
  previous_data, previous_log = args.data_dir, args.ratings
  for fold in range(1, args.folds + 1):
    held_out = {(u, i) for u, i, _ in split_export.prepared_rows(previous_data, "eval")}
    out = os.path.join(args.output_dir, f"fold{fold}")
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "ratings.csv")
    dropped = carve(previous_log, held_out, log)
    if dropped != len(held_out):
      raise SystemExit(f"{previous_log}: {dropped} rows matched {len(held_out)} held-out pairs "
                       "(--ratings must be the log --data_dir was prepared from)")
    subprocess.run([sys.executable, "-m", "trainer.prepare", f"--input={log}",
                    f"--output_dir={os.path.join(out, 'data')}", f"--seed={fold}",
                    f"--min_user_interactions={args.min_user_interactions - fold}",
                    *args.prepare_flags], check=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    print(f"fold {fold}: {dropped} rows held out before it -> {out}/data")
    previous_data, previous_log = os.path.join(out, "data"), log


if __name__ == "__main__":
  main()
