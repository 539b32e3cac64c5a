"""Exports a prepared data directory's split with raw IDs, for peers to fit on exactly our rows.

  python bench/split_export.py --data_dir=runs/ml100k/data --output_dir=runs/ml100k/split

writes `train.csv` and `eval.csv` (user, item, rating, row: raw IDs, the rating as prepared,
the row's position in the shards) and, when the data has sampled eval negatives,
`eval_negatives.csv` (user, item, then the negatives' raw IDs). It prints each file's row count
and a checksum of its rows, the same figures `checksum` gives for the shards themselves, so a
peer fitted on these files provably saw our training rows and was judged on our eval rows.
"""

import argparse
import csv
import hashlib
import os
import sys
from typing import Dict, Iterable, Iterator, Tuple

Row = Tuple[str, str, float]


def prepared_rows(data_dir: str, split: str) -> Iterator[Row]:
  """(raw user, raw item, rating) of a split of the prepared shards, in shard order."""
  from trainer.data import artifacts, pipeline
  data = artifacts.PreparedData(data_dir)
  users, items = data.vocabularies()
  pattern = data.train_pattern if split == "train" else data.eval_pattern
  for batch in pipeline.make_dataset(pattern, 65536, False):
    for u, i, r in zip(batch["user"].numpy(), batch["item"].numpy(), batch["rating"].numpy()):
      yield users[u], items[i], float(r)


def checksum(rows: Iterable[Row]) -> Tuple[int, str]:
  """(count, sha256 of the sorted rows): the same for the same multiset of rows."""
  lines = sorted(f"{u}\t{i}\t{r:.6g}" for u, i, r in rows)
  return len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()


def read_csv_rows(path: str) -> Iterator[Row]:
  """The rows of an exported file, as a peer reads them."""
  with open(path, newline="") as f:
    for record in csv.DictReader(f):
      yield record["user"], record["item"], float(record["rating"])


def export_split(data_dir: str, output_dir: str) -> Dict[str, Tuple[int, str]]:
  """Writes train.csv, eval.csv (and eval_negatives.csv); returns {file: (rows, checksum)}."""
  os.makedirs(output_dir, exist_ok=True)
  out = {}
  for split in ("train", "eval"):
    path = os.path.join(output_dir, f"{split}.csv")
    with open(path, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["user", "item", "rating", "row"])
      for n, (u, i, r) in enumerate(prepared_rows(data_dir, split)):
        writer.writerow([u, i, f"{r:.6g}", n])
    out[f"{split}.csv"] = checksum(read_csv_rows(path))
  negatives = _export_negatives(data_dir, os.path.join(output_dir, "eval_negatives.csv"))
  if negatives:
    out["eval_negatives.csv"] = (negatives, "")
  return out


def _export_negatives(data_dir: str, path: str) -> int:
  from trainer.data import artifacts
  data = artifacts.PreparedData(data_dir)
  sampled = data.eval_negatives
  if sampled is None:
    return 0
  users, items = data.vocabularies()
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["user", "item", "negatives"])
    for u, i, negatives in zip(sampled["users"], sampled["positives"], sampled["negatives"]):
      writer.writerow([users[u], items[i], "|".join(items[j] for j in negatives)])
  return len(sampled["users"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--output_dir", required=True)
  args = parser.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for name, (rows, digest) in export_split(args.data_dir, args.output_dir).items():
    ours = (checksum(prepared_rows(args.data_dir, name.split(".")[0]))
            if digest else (rows, ""))
    print(f"{name}: {rows} rows, sha256 {digest[:16] or '-'} (shards: {ours[0]} rows, "
          f"sha256 {ours[1][:16] or '-'})")


if __name__ == "__main__":
  main()
