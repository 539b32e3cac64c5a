"""Replay of a growing log: retraining from scratch against warm starts, period by period.

  python bench/continuous.py ml100k --shared=../shared/data        # explicit, RMSE
  python bench/continuous.py latest_small --shared=../shared/data  # implicit, full HR@10

The log is sorted by time and cut into an initial window (--initial of the rows) and then
--periods periods of equal size, plus one more to evaluate the last. At period p, the rows up
to its end are prepared on period p-1's data directory (`neumf-prepare --base_data_dir`, as a
daily job would), with the next period's rows of users and items already seen as the
evaluation rows (`--split=given`; the next period's rows of new users or items, cold starts
that both runs guess alike, are left out and counted); then

  (a) scratch: the recipe, trained from scratch on everything so far;
  (b) warm: warm-started from period p-1's warm model (period 0's: the scratch model of the
      initial window), for --warm_epochs epochs (the recipe's schedule, shorter);

both evaluated on the next period's rows (RMSE, or the full-protocol HR@10), at their last
epoch (--nokeep_best: the evaluation rows choose nothing). Training time is the training
phase of metrics.json (its epochs and their evaluations); wall time is the whole process.
Figures are means and [lowest, highest] over --seeds seeds; the machine is named. With
--plot, quality and time per period go to a PNG.
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

DATASETS = {
    # name: (ratings file, its header, item features, recipe, metric, warm epochs, more flags
    # of the warm runs). ml100k's: chosen on the validation replay (--until=0.5 --initial=0.5
    # --periods=2, seed 0; warm vs scratch, periods 1 / 2): 3 epochs at the recipe's learning
    # rate 0.001 -2.61% / +0.06%, at 0.002 -2.90% / -0.67%, at 0.003 -3.69% / -0.32%; 2 epochs
    # at 0.002 -2.96% / +0.31%, at 0.003 -2.76% / +1.13%.
    "ml100k": ("ml-100k/u.data", None, "ml-100k/u.item", "configs/ml100k_explicit.flags",
               "eval_rmse", 3, "--learning_rate=0.002"),
    "latest_small": ("ml-latest-small/ratings.csv", "userId,movieId,rating,timestamp",
                     "ml-latest-small/movies.csv", "configs/latest_small_implicit.flags",
                     "eval_hr_full", 2, ""),  # validation replay, seed 0: the recipe's learning
    # rate +28% / -6%, 0.01 +28% / +28% (HR@10 on 700-1,200 rows: a few hits either way)
}


def _run(module: str, *args: str) -> dict:
  started = time.time()
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  if out.returncode:
    raise SystemExit(f"{module} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
  result = json.loads(out.stdout.strip().splitlines()[-1])
  result["wall_seconds"] = time.time() - started
  return result


def _cut(path: str, header, initial: float, periods: int, work: str, until: float = 1.0):
  """The log's rows by time (its first `until` of them), written as files: `train-p`
  (everything up to period p's end) and `eval-p` (period p + 1), p = 0 (the initial window)
  .. periods."""
  with open(path) as f:
    lines = f.read().splitlines()
  if header:
    lines = lines[1:]
  delimiter = "," if header else "\t"
  stamps = np.array([int(line.split(delimiter)[3]) for line in lines])
  order = np.argsort(stamps, kind="stable")
  n = int(round(len(lines) * until))
  order = order[:n]
  step = (1.0 - initial) / (periods + 1)
  ends = [int(round(n * (initial + step * p))) for p in range(periods + 2)]
  ends[-1] = n
  suffix = os.path.splitext(path)[1] or ".data"
  users = np.array([line.split(delimiter)[0] for line in lines])
  items = np.array([line.split(delimiter)[1] for line in lines])
  files = []
  for p in range(periods + 1):
    pair = {}
    train, following = order[:ends[p]], order[ends[p]:ends[p + 1]]
    # The next period's rows of users and items already seen: what a model of them predicts
    # (the rest are cold-start rows, the same out-of-vocabulary guess for both runs).
    known = np.isin(users[following], users[train]) & np.isin(items[following], items[train])
    pair["cold_rows"] = int(np.sum(~known))
    for name, rows in (("train", train), ("eval", following[known])):
      pair[name] = os.path.join(work, f"{name}-{p}{suffix}")
      with open(pair[name], "w") as f:
        if header:
          f.write(header + "\n")
        f.writelines(lines[k] + "\n" for k in rows)
    files.append(pair)
  return files


def _run_once(model_dir: str, *flags: str) -> dict:
  """A training run, or the result of the same run already done in this --work_dir."""
  done = os.path.join(model_dir, "result.json")
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f)
  result = _run("trainer.task", f"--model_dir={model_dir}", *flags)
  with open(done, "w") as f:
    json.dump(result, f)
  return result


def _recipe_epochs(recipe: str) -> int:
  with open(os.path.join(ROOT, recipe)) as f:
    return next(int(line.split("=")[1]) for line in f if line.startswith("--epochs="))


def replay(args, seed: int, work: str):
  """One seed's replay; returns a row per period."""
  ratings, header, items, recipe, metric, warm_epochs, warm_flags = DATASETS[args.dataset]
  warm_epochs = args.warm_epochs or warm_epochs
  warm_flags = tuple((args.warm_flags if args.warm_flags is not None else warm_flags).split())
  files = _cut(os.path.join(args.shared, ratings), header, args.initial, args.periods, work,
               args.until)
  flags = (f"--flagfile={recipe}", f"--seed={seed}", "--nokeep_best")
  tag = "-".join([f"e{warm_epochs}"] + [f.strip("-").replace("=", "") for f in warm_flags])
  rows, base, previous = [], None, None
  for p, pair in enumerate(files):
    data = os.path.join(work, f"data-{p}")
    if not os.path.exists(os.path.join(data, "metadata.json")):  # a rerun reuses it
      _run("trainer.prepare", "--source=movielens", f"--input={pair['train']}",
           f"--eval_input={pair['eval']}", "--split=given",
           f"--item_features={os.path.join(args.shared, items)}", f"--output_dir={data}",
           *([f"--base_data_dir={base}"] if base else []))
    with open(os.path.join(data, "metadata.json")) as f:
      metadata = json.load(f)
    scratch = _run_once(f"{work}/scratch-{p}", f"--data_dir={data}", *flags)
    row = {"period": p, "scratch": scratch[metric], "scratch_train_s":
           scratch["phase_seconds"]["train"], "scratch_wall_s": scratch["wall_seconds"],
           "users": metadata["num_users"], "items": metadata["num_items"],
           "new_users": metadata["lineage"].get("vocabularies", {}).get("users", {}).get("new"),
           "new_items": metadata["lineage"].get("vocabularies", {}).get("items", {}).get("new"),
           "eval_rows": metadata["num_eval"], "cold_rows": pair["cold_rows"]}
    if previous is None:
      previous = f"{work}/scratch-{p}"
    else:
      warm = _run_once(f"{work}/warm-{tag}-{p}", f"--data_dir={data}", *flags,
                       f"--warm_start_from={previous}", f"--epochs={warm_epochs}", *warm_flags)
      previous = f"{work}/warm-{tag}-{p}"
      row.update(warm=warm[metric], warm_train_s=warm["phase_seconds"]["train"],
                 warm_wall_s=warm["wall_seconds"])
    rows.append(row)
    print(json.dumps({"seed": seed, **row}), flush=True)
    base = data
  return rows, metric, _recipe_epochs(recipe), warm_epochs


def _span(values) -> str:
  values = np.asarray(values, float)
  return f"{values.mean():.4f} [{values.min():.4f}, {values.max():.4f}]"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dataset", choices=sorted(DATASETS))
  parser.add_argument("--shared", default=os.path.join(ROOT, "..", "shared", "data"))
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--initial", type=float, default=0.5)
  parser.add_argument("--periods", type=int, default=4)
  parser.add_argument("--warm_epochs", type=int, default=0, help="default: per data set")
  parser.add_argument("--warm_flags", default=None, help="more flags of the warm runs, e.g. "
                      "'--learning_rate=0.002' (default: per data set; tune them with --until, "
                      "never on the replay)")
  parser.add_argument("--until", type=float, default=1.0, help=(
      "replay only the log's first fraction (by time): a validation replay to tune on, whose "
      "evaluation periods all come before the reported replay's"))
  parser.add_argument("--plot", default=None, help="a PNG of quality and time per period")
  parser.add_argument("--work_dir", default=None)
  args = parser.parse_args()
  work = args.work_dir or tempfile.mkdtemp(prefix="neumf-continuous-")
  print(f"Machine: {machine.cpu_name()}; work in {work}", flush=True)
  by_seed = []
  for seed in range(args.seeds):
    os.makedirs(f"{work}/seed{seed}", exist_ok=True)
    rows, metric, epochs, warm_epochs = replay(args, seed, f"{work}/seed{seed}")
    by_seed.append(rows)
  lower_better = metric == "eval_rmse"
  print(f"\n{args.dataset}: {metric} on the next period, scratch ({epochs} epochs) against warm "
        f"({warm_epochs} epochs), {args.seeds} seed(s), mean [lowest, highest]\n")
  print("| period | users (new) | items (new) | eval rows (cold, left out) | scratch | warm | "
        "warm vs scratch (+: worse) | training time warm / scratch | wall warm / scratch |")
  print("|---|---|---|---|---|---|---|---|---|")
  for p in range(1, args.periods + 1):
    rows = [seed_rows[p] for seed_rows in by_seed]
    first = rows[0]
    scratch, warm = [r["scratch"] for r in rows], [r["warm"] for r in rows]
    gap = [(w - s) / s * (1 if lower_better else -1) for s, w in zip(scratch, warm)]
    time_ratio = [r["warm_train_s"] / r["scratch_train_s"] for r in rows]
    wall_ratio = [r["warm_wall_s"] / r["scratch_wall_s"] for r in rows]
    print(f"| {p} | {first['users']} ({first['new_users']}) | {first['items']} "
          f"({first['new_items']}) | {first['eval_rows']} ({first['cold_rows']}) | "
          f"{_span(scratch)} | {_span(warm)} | {100 * np.mean(gap):+.2f}% "
          f"[{100 * min(gap):+.2f}, {100 * max(gap):+.2f}] | {np.mean(time_ratio):.2f} "
          f"[{min(time_ratio):.2f}, {max(time_ratio):.2f}] | {np.mean(wall_ratio):.2f} |")
  if args.plot:
    _plot(args, by_seed, metric)


def _plot(args, by_seed, metric) -> None:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  periods = list(range(1, args.periods + 1))
  figure, (quality, seconds) = plt.subplots(1, 2, figsize=(10, 4))
  for name in ("scratch", "warm"):
    values = np.array([[rows[p][name] for p in periods] for rows in by_seed])
    quality.errorbar(periods, values.mean(0), yerr=[values.mean(0) - values.min(0),
                                                    values.max(0) - values.mean(0)],
                     label=name, marker="o", capsize=3)
    times = np.array([[rows[p][f"{name}_train_s"] for p in periods] for rows in by_seed])
    seconds.plot(periods, times.mean(0), label=name, marker="o")
  quality.set(xlabel="period", ylabel=metric, title=f"{args.dataset}: next period's {metric}")
  seconds.set(xlabel="period", ylabel="training seconds", title=machine.cpu_name())
  quality.legend()
  seconds.legend()
  figure.tight_layout()
  figure.savefig(args.plot)
  print(f"Plot: {args.plot}")


if __name__ == "__main__":
  main()
