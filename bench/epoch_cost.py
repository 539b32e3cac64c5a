"""Seconds per epoch and quality of the explicit recipes, side by side, over several seeds.

  python bench/epoch_cost.py --data_dir=runs/ml100k/data --output_dir=runs/epoch_cost
  python bench/epoch_cost.py --data_dir=... --output_dir=... --root=../old-checkout  # before

`--data_dir`: ML-100K prepared as the recipes say (their first line: `neumf-prepare
--source=movielens --item_features=ml-100k/u.item --user_features=ml-100k/u.user
--eval_fraction=0.1 --seed=0`). Each recipe (`--recipes`, default the accurate one, autorec,
and the fast one, mf) trains once per seed in a fresh process of the trainer found in
`--root` (default this checkout; another checkout measures a commit before a change on the
same machine). From each run's history.json: the seconds of an epoch (training and its
evaluation) in the steady state (the mean over epochs 2 onwards: the first one also traces and
compiles), the training examples/s (median over those epochs), and the last epoch's eval RMSE.
Prints one row per recipe (means, ranges over the seeds) and each recipe's seconds per epoch
over the last recipe's (mf by default).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import machine  # bench/machine.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ["configs/ml100k_explicit.flags", "configs/ml100k_explicit_mf.flags"]


def run(root: str, recipe: str, data_dir: str, model_dir: str, seed: int) -> dict:
  """One training run of `recipe` (relative to this checkout) by the trainer in `root`:
  {seconds_per_epoch, examples_per_sec, rmse, epochs}."""
  if not os.path.exists(os.path.join(model_dir, "metrics.json")):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-m", "trainer.task",
                           f"--flagfile={os.path.join(ROOT, recipe)}", f"--data_dir={data_dir}",
                           f"--model_dir={model_dir}", f"--seed={seed}"],
                          cwd=root, env=env, capture_output=True, text=True)
    if done.returncode:
      sys.exit(f"{recipe} seed {seed} failed:\n{done.stderr[-3000:]}")
  with open(os.path.join(model_dir, "history.json")) as f:
    epochs = json.load(f)["epochs"]
  steady = epochs[1:] or epochs
  first = epochs[0]["elapsed_seconds"] if len(epochs) > 1 else 0.0
  return {"seconds_per_epoch": (epochs[-1]["elapsed_seconds"] - first) / len(steady),
          "examples_per_sec": statistics.median(e["examples_per_sec"] for e in steady),
          "rmse": epochs[-1]["eval"]["rmse"], "epochs": len(epochs)}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--output_dir", required=True, help="the runs (reused when finished)")
  parser.add_argument("--root", default=ROOT, help="the checkout whose trainer runs")
  parser.add_argument("--recipes", nargs="+", default=RECIPES)
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  args = parser.parse_args()
  root = os.path.abspath(args.root)
  revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                            capture_output=True, text=True).stdout.strip() or "unknown"
  print(f"{machine.cpu_name()}, {os.cpu_count()} CPUs; trainer at {revision} ({root})")
  rows = []
  for recipe in args.recipes:
    name = os.path.splitext(os.path.basename(recipe))[0]
    runs = [run(root, recipe, os.path.abspath(args.data_dir),
                os.path.abspath(os.path.join(args.output_dir, f"{name}_seed{seed}")), seed)
            for seed in args.seeds]
    rows.append((name, runs))
    for seed, r in zip(args.seeds, runs):
      print(f"  {name} seed {seed}: {r['epochs']} epochs, {r['seconds_per_epoch']:.3f} s each, "
            f"{r['examples_per_sec']:,.0f} examples/s, RMSE {r['rmse']:.4f}", flush=True)
  base = statistics.mean(r["seconds_per_epoch"] for r in rows[-1][1])
  print()
  print(f"{'recipe':>22} {'RMSE mean':>9} {'range':>15} {'s/epoch':>8} {'examples/s':>11} "
        f"{'epoch / ' + rows[-1][0]:>12}")
  for name, runs in rows:
    rmse = [r["rmse"] for r in runs]
    seconds = statistics.mean(r["seconds_per_epoch"] for r in runs)
    rate = statistics.mean(r["examples_per_sec"] for r in runs)
    print(f"{name:>22} {statistics.mean(rmse):9.4f} {min(rmse):7.4f}-{max(rmse):.4f} "
          f"{seconds:8.3f} {rate:11,.0f} {seconds / base:11.2f}x")


if __name__ == "__main__":
  main()
