"""Preparation throughput and peak memory on synthetic data, printed as a table.

  python bench/prepare_throughput.py                 # 1M and 10M ratings
  python bench/prepare_throughput.py --rows 1000000 --rows 30000000

Each size runs in a fresh process, so peak RSS is that run's alone; "growth" is the peak minus
the process's RSS after importing TensorFlow (what preparation itself adds).
Target on the 2-core CI machine: >= 1M rows/s end to end, peak RSS flat from 1M to 10M.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = """
import json, resource, sys, time
from absl import logging
logging.set_verbosity(logging.WARNING)
from trainer import malloc
malloc.return_freed_memory()  # as the command line (trainer.prepare) does
from trainer.config import PrepareConfig
from trainer.data import preparation
import tensorflow as tf
tf.constant(1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = int(sys.argv[2])
start = time.perf_counter()
preparation.prepare(PrepareConfig(output_dir=sys.argv[1], num_users=max(1000, rows // 100),
                                  num_items=max(500, rows // 400), num_ratings=rows,
                                  num_shards=8, seed=0))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": rows, "seconds": seconds, "peak_mb": peak / 1024,
                  "growth_mb": (peak - base) / 1024}))
"""


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, action="append",
                      help="synthetic ratings per run (repeat); default 1M and 10M")
  args = parser.parse_args()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  results = []
  for rows in args.rows or [1_000_000, 10_000_000]:
    with tempfile.TemporaryDirectory() as out:
      done = subprocess.run([sys.executable, "-c", _CHILD, out, str(rows)], cwd=root,
                            capture_output=True, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
      if done.returncode:
        sys.exit(done.stderr[-3000:])
      results.append(json.loads(done.stdout.strip().splitlines()[-1]))
  print(f"{'rows':>12} {'seconds':>8} {'rows/s':>10} {'peak RSS MB':>12} {'growth MB':>10}")
  for r in results:
    print(f"{r['rows']:>12,} {r['seconds']:>8.1f} {r['rows'] / r['seconds']:>10,.0f} "
          f"{r['peak_mb']:>12.0f} {r['growth_mb']:>10.0f}")


if __name__ == "__main__":
  main()
