"""What each phase costs as the log grows: seconds and peak resident memory.

  python bench/scale.py                       # 1M, 5M and 20M ratings, mf, implicit
  python bench/scale.py --ratings 1000000 --task=explicit

For each size, synthetic ratings shaped like MovieLens 20M at the top (138,493 users and
26,744 items at 20M; users in proportion to the ratings, items as their square root) are
prepared (`neumf-prepare`), then one epoch is trained and evaluated, the baselines evaluated and
the model exported (`neumf-train --epochs=1`). The phases' seconds and peak RSS
come from the trainer's own metrics.json (`phase_seconds`, `phase_peak_rss_mb`) and, for
preparation, from the preparing process. "epoch" is the training phase: the epoch trained and
evaluated (the full protocol over every user); "final evaluation" is the popularity baseline
(the model's metrics are the epoch's: the model served is that epoch's). The last column is the
export as a share of the epoch.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import machine  # bench/machine.py, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USERS_20M, ITEMS_20M = 138_493, 26_744

# Runs a command line and writes its peak RSS (KB) to a file: one process per phase.
_PEAK = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[2:]).returncode
with open(sys.argv[1], "w") as f:
  f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"""


def _run(peak_file: str, *command: str) -> float:
  """Runs `command`; returns its seconds (its peak RSS lands in `peak_file`)."""
  started = time.time()
  done = subprocess.run([sys.executable, "-c", _PEAK, peak_file, sys.executable, *command],
                        cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  if done.returncode:
    raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
  return time.time() - started


def one_size(ratings: int, args, work: str) -> dict:
  users = max(100, round(USERS_20M * ratings / 20_000_000))
  items = max(50, round(ITEMS_20M * (ratings / 20_000_000) ** 0.5))
  data, model = f"{work}/data-{ratings}", f"{work}/model-{ratings}"
  peak = f"{work}/peak"
  prepare = _run(peak, "-m", "trainer.prepare", "--source=synthetic", f"--output_dir={data}",
                 f"--num_users={users}", f"--num_items={items}", f"--num_ratings={ratings}",
                 *(["--implicit", "--split=leave_one_out"] if args.task != "explicit" else []),
                 "--num_shards=8")
  prepare_rss = int(open(peak).read()) / 1024
  total = _run(peak, "-m", "trainer.task", f"--data_dir={data}", f"--model_dir={model}",
               f"--model={args.model}", f"--task={args.task}", "--epochs=1",
               f"--batch_size={args.batch_size}", "--embedding_dim=64",
               "--optimizer=lazy_adam", "--checkpoint_every_secs=0", *args.train_flags)
  metrics = json.load(open(f"{model}/metrics.json"))
  seconds, rss = metrics["phase_seconds"], metrics["phase_peak_rss_mb"]
  epoch = seconds["train"]
  return {"ratings": ratings, "users": users, "items": items, "prepare_s": prepare,
          "prepare_rss_mb": prepare_rss, "epoch_s": epoch, "train_rss_mb": rss["train"],
          "eval_s": seconds["final_evaluation"], "eval_rss_mb": rss["final_evaluation"],
          "export_s": seconds["export"], "export_rss_mb": rss["export"],
          "train_process_s": total, "export_share": seconds["export"] / max(epoch, 1e-9)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--ratings", type=int, nargs="+",
                      default=[1_000_000, 5_000_000, 20_000_000])
  parser.add_argument("--model", default="mf")
  parser.add_argument("--task", default="implicit")
  parser.add_argument("--batch_size", type=int, default=8190)  # 1638 positives + 4 negatives each
  parser.add_argument("--work_dir", default=None)
  parser.add_argument("train_flags", nargs="*", help="more neumf-train flags, after --")
  args = parser.parse_args()
  work = args.work_dir or tempfile.mkdtemp(prefix="neumf-scale-")
  print(f"Machine: {machine.cpu_name()}, {os.cpu_count()} CPUs; {args.model}, {args.task}, "
        f"batch {args.batch_size}, one epoch")
  print("| ratings | users | items | prepare s (peak MB) | epoch s (peak MB) | "
        "final evaluation s (peak MB) | export s (peak MB) | export / epoch |")
  print("|---|---|---|---|---|---|---|---|")
  for ratings in args.ratings:
    r = one_size(ratings, args, work)
    print(f"| {r['ratings']:,} | {r['users']:,} | {r['items']:,} | {r['prepare_s']:.1f} "
          f"({r['prepare_rss_mb']:.0f}) | {r['epoch_s']:.1f} ({r['train_rss_mb']:.0f}) | "
          f"{r['eval_s']:.1f} ({r['eval_rss_mb']:.0f}) | {r['export_s']:.1f} "
          f"({r['export_rss_mb']:.0f}) | {100 * r['export_share']:.0f}% |", flush=True)


if __name__ == "__main__":
  main()
