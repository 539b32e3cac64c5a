"""What context is worth, measured over seeds: means and ranges.

  python bench/context.py planted                      # synthetic, a planted hour effect
  python bench/context.py u1 --shared=../shared/data   # ML-100K u1.base/u1.test, u1-u5
  python bench/context.py latest_small --shared=../shared/data

planted: synthetic ratings with --context_effect=A (A cos(2 pi hour / 24) rating points);
  mf (the fast explicit recipe, 30 epochs) with --context=hour and without. The
  share of the planted variance (A^2 / 2) the context model recovers: (MSE without
  context - MSE with) / (A^2 / 2), on the eval split.
u1: GroupLens' own split of ML-100K (--split=given, u1.base trains, u1.test evaluates), the
  recipe configs/ml100k_u1.flags without and with the time context (--context=...); then the
  recipe on u1..u5 (the 5-fold average every paper reports). Tuned on a validation split
  carved from u1.base (--split=random --eval_fraction=0.2 --seed=1), never on u1.test.
latest_small: the latest-small implicit recipe (full-protocol HR@10) without and with
  --context=hour,weekday,tenure.

Every figure is the mean over --seeds training seeds, with the range; the machine is named.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import machine  # bench/machine.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME_CONTEXT = "hour,weekday,tenure,item_age"


def _run(module: str, *args: str) -> dict:
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  if out.returncode:
    raise SystemExit(f"{module} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(values) -> str:
  values = np.asarray(values, float)
  return f"{values.mean():.4f} [{values.min():.4f}, {values.max():.4f}]"


def _train_seeds(data_dir: str, work: str, name: str, seeds: int, *flags: str):
  """metrics.json of one run per seed; returns (metrics list, mean seconds)."""
  out, seconds = [], []
  for seed in range(seeds):
    started = time.time()
    out.append(_run("trainer.task", f"--data_dir={data_dir}",
                    f"--model_dir={work}/{name}-{seed}", f"--seed={seed}", *flags))
    seconds.append(time.time() - started)
  return out, float(np.mean(seconds))


def planted(args, work: str) -> None:
  effect = args.effect
  data = f"{work}/planted"
  _run("trainer.prepare", f"--output_dir={data}", "--num_users=2000", "--num_items=1000",
       "--num_ratings=200000", "--context=hour", f"--context_effect={effect}")
  flags = ("--flagfile=configs/ml100k_explicit_mf.flags", "--epochs=30")
  rows = {}
  for name, features in (("with context", "all"), ("without", "none")):
    rows[name], _ = _train_seeds(data, work, name.replace(" ", "_"), args.seeds, *flags,
                                 f"--features={features}")
  with_mse = np.square([m["eval_rmse"] for m in rows["with context"]])
  without_mse = np.square([m["eval_rmse"] for m in rows["without"]])
  recovered = (without_mse - with_mse) / (effect ** 2 / 2)
  print(f"| planted effect {effect} | RMSE with context | RMSE without | recovered |")
  print("|---|---|---|---|")
  print(f"| mf, {args.seeds} seeds | {_summary(np.sqrt(with_mse))} | "
        f"{_summary(np.sqrt(without_mse))} | {_summary(recovered)} |")


def _u_split(args, work: str, fold: int, context: str) -> str:
  ml = os.path.join(args.shared, "ml-100k")
  data = f"{work}/u{fold}{'-context' if context else ''}"
  if not os.path.exists(os.path.join(data, "metadata.json")):
    _run("trainer.prepare", "--source=movielens", f"--input={ml}/u{fold}.base.gz",
         f"--eval_input={ml}/u{fold}.test.gz", "--split=given",
         f"--item_features={ml}/u.item", f"--user_features={ml}/u.user",
         *([f"--context={context}"] if context else []), f"--output_dir={data}")
  return data


def u1(args, work: str) -> None:
  recipe = "--flagfile=configs/ml100k_u1.flags"
  print("| ML-100K u1.base/u1.test | eval RMSE (mean [min, max]) | seconds per run |")
  print("|---|---|---|")
  for name, context, features in (("recipe", "", ()),
                                  ("recipe + time context", TIME_CONTEXT,
                                   (f"--features={args.u1_features},{TIME_CONTEXT}",))):
    data = _u_split(args, work, 1, context)
    runs, seconds = _train_seeds(data, work, f"u1-{name[:8]}-{bool(context)}", args.seeds,
                                 recipe, *features)
    print(f"| {name}, {args.seeds} seeds | {_summary([m['eval_rmse'] for m in runs])} | "
          f"{seconds:.0f} |", flush=True)
  if args.folds > 1:
    means = []
    for fold in range(1, args.folds + 1):
      runs, _ = _train_seeds(_u_split(args, work, fold, ""), work, f"u{fold}", 1, recipe)
      means.append(runs[0]["eval_rmse"])
      print(f"| u{fold}, seed 0 | {means[-1]:.4f} | |", flush=True)
    print(f"| u1-u{args.folds} average, seed 0 | {_summary(means)} | |")


def latest_small(args, work: str) -> None:
  small = os.path.join(args.shared, "ml-latest-small")
  data = f"{work}/small"
  _run("trainer.prepare", "--source=movielens", f"--input={small}/ratings.csv",
       "--split=leave_one_out", "--min_user_interactions=20", "--eval_negatives=99",
       f"--item_features={small}/movies.csv", "--context=hour,weekday,tenure",
       f"--output_dir={data}")
  recipe = "--flagfile=configs/latest_small_implicit.flags"
  print("| latest-small implicit | full HR@10 (mean [min, max]) | full NDCG@10 |")
  print("|---|---|---|")
  for name, features in (("recipe", "genres,year"), ("recipe + hour, weekday, tenure", "all")):
    runs, _ = _train_seeds(data, work, name[:8] + features[:3], args.seeds, recipe,
                           f"--features={features}")
    print(f"| {name}, {args.seeds} seeds | {_summary([m['eval_hr_full'] for m in runs])} | "
          f"{_summary([m['eval_ndcg_full'] for m in runs])} |", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("what", choices=("planted", "u1", "latest_small"))
  parser.add_argument("--shared", default=os.path.join(ROOT, "..", "shared", "data"))
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--folds", type=int, default=5, help="u1: also u1..uN, one seed each")
  parser.add_argument("--effect", type=float, default=0.5, help="planted: the effect's size")
  parser.add_argument("--u1_features", default="genres,year",
                      help="u1: the recipe's --features, to which the context is added")
  parser.add_argument("--work_dir", default=None)
  args = parser.parse_args()
  print(f"Machine: {machine.cpu_name()}, {os.cpu_count()} CPUs")
  work = args.work_dir or tempfile.mkdtemp(prefix="neumf-context-")
  {"planted": planted, "u1": u1, "latest_small": latest_small}[args.what](args, work)


if __name__ == "__main__":
  main()
