"""Memory per parameter-server task with the ID tables sharded over 1, 2 and 4 ps tasks.

  python bench/sharded_memory.py                      # 2.5M users, 200K items, dim 64
  python bench/sharded_memory.py --num_users 200000 --num_items 20000 --num_ratings 600000

Prepares synthetic ratings once (defaults: 2.5M users, of whom ~2.3M appear in 6M ratings, and
200K items), then for each ps count trains MF (embedding dim 64, lazy Adam: two slots per
table) for one epoch on a real cluster of local processes (a chief, --workers workers and the
ps tasks on 127.0.0.1, as `scripts/local_debug.sh --ps` starts them), with the tables split
into one shard per ps task. It samples each task's resident memory twice a second. Per ps
task it prints: the idle footprint (the server up, before the chief connects: the TensorFlow
runtime); what the tables take, the growth from idle to the moment the chief has created the
tables and their slots (its "Training" line), next to what they should take by their shapes,
rows x (dim + 1 bias) x 4 bytes x 3 (weights, Adam's m and v) in "div" shards; and the peak
(VmHWM) over the run, which adds the steps' working memory (gathered rows, gRPC buffers).
Also the training examples/s. Target: each ps task's tables within 15% of its share.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from trainer import localhost  # noqa: E402  (imports no TensorFlow)

DIM = 64


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except FileNotFoundError:
    pass
  return 0


def prepare(data_dir: str, args) -> None:
  subprocess.run([sys.executable, "-m", "trainer.prepare", "--source=synthetic",
                  f"--num_users={args.num_users}", f"--num_items={args.num_items}",
                  f"--num_ratings={args.num_ratings}", "--num_shards=8", "--seed=0",
                  f"--output_dir={data_dir}"], cwd=ROOT, check=True,
                 env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def run_cluster(data_dir: str, model_dir: str, num_ps: int, workers: int,
                batch_size: int, dim: int) -> Dict:
  ports = iter(localhost.free_ports(1 + workers + num_ps))
  cluster = {"chief": [f"127.0.0.1:{next(ports)}"],
             "worker": [f"127.0.0.1:{next(ports)}" for _ in range(workers)],
             "ps": [f"127.0.0.1:{next(ports)}" for _ in range(num_ps)]}
  flags = [f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--model=mf",
           "--task=explicit", f"--embedding_dim={dim}", "--optimizer=lazy_adam",
           f"--batch_size={batch_size}", "--epochs=1", f"--ps_shards={num_ps}",
           "--checkpoint_every_secs=0", "--log_every_steps=50", "--features=none",
           "--overwrite"]
  tasks = {}

  def start(task_type: str, index: int) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": task_type, "index": index}}))
    log = open(f"{model_dir}.{task_type}{index}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "trainer.task", *flags], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE if task_type == "chief" else
                            subprocess.DEVNULL, stderr=log, text=True)

  for task_type in ("ps", "worker"):
    for index in range(len(cluster[task_type])):
      tasks[f"{task_type}:{index}"] = start(task_type, index)
  # Idle footprint: each server up (its port open) and settled, before the chief connects.
  for role, address in ((r, a) for t in ("ps", "worker")
                        for r, a in zip([f"{t}:{i}" for i in range(len(cluster[t]))],
                                        cluster[t])):
    while True:
      try:
        socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1])), 1).close()
        break
      except OSError:
        time.sleep(0.5)
  time.sleep(3)
  idle = {role: _rss_kib(p.pid) for role, p in tasks.items()}
  chief = tasks["chief:0"] = start("chief", 0)
  peak = dict.fromkeys(tasks, 0)
  built = {}  # resident KiB once the chief has created the tables and their slots
  started = time.time()
  while chief.poll() is None:
    for role, p in tasks.items():
      peak[role] = max(peak[role], _rss_kib(p.pid, "VmHWM"))
    if not built and "Training mf" in open(f"{model_dir}.chief0.log").read():
      built = {role: _rss_kib(p.pid) for role, p in tasks.items()}
    time.sleep(0.5)
  out = chief.stdout.read()
  end = {}
  for role, p in tasks.items():
    peak[role] = max(peak[role], _rss_kib(p.pid, "VmHWM"))
    end[role] = _rss_kib(p.pid)
    if role != "chief:0":
      p.kill()
      p.wait()
  if chief.returncode:
    raise RuntimeError(f"chief failed ({chief.returncode}): see {model_dir}.chief0.log")
  metrics = json.loads(out.strip().splitlines()[-1])
  return {"metrics": metrics, "idle_kib": idle, "built_kib": built, "peak_kib": peak,
          "end_kib": end, "seconds": time.time() - started}


def expected_per_ps(meta: Dict, num_ps: int, dim: int) -> List[float]:
  """Bytes of the ID tables and their two Adam slots on each ps task: MF's user and item
  factors (dim) and biases (1), each with its OOV row, in "div" shards over the tasks."""
  per_task = [0.0] * num_ps
  for rows in (meta["num_users"] + 1, meta["num_items"] + 1):
    for columns in (dim, 1):
      for task in range(num_ps):
        shard_rows = rows // num_ps + (task < rows % num_ps)
        per_task[task] += shard_rows * columns * 4 * 3
  return per_task


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_users", type=int, default=2_500_000)
  parser.add_argument("--num_items", type=int, default=200_000)
  parser.add_argument("--num_ratings", type=int, default=6_000_000)
  parser.add_argument("--ps", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--batch_size", type=int, default=8192)
  parser.add_argument("--work_dir", default=None)
  args = parser.parse_args()
  work = args.work_dir or tempfile.mkdtemp(prefix="sharded_memory_")
  data_dir = os.path.join(work, "data")
  if not os.path.exists(os.path.join(data_dir, "metadata.json")):
    started = time.time()
    prepare(data_dir, args)
    print(f"prepared {args.num_ratings} ratings in {time.time() - started:.0f} s: {data_dir}")
  with open(os.path.join(data_dir, "metadata.json")) as f:
    meta = json.load(f)
  print(f"{meta['num_users']} users x {meta['num_items']} items, dim {DIM}, lazy Adam; "
        f"{args.workers} workers, batch {args.batch_size}")
  print("| ps tasks | task | idle MiB | peak MiB | tables MiB (built - idle) | "
        "tables+slots by shape MiB | ratio | training peak - idle MiB | ratio | examples/s |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  results = []
  for num_ps in args.ps:
    run = run_cluster(data_dir, os.path.join(work, f"ps{num_ps}"), num_ps, args.workers,
                      args.batch_size, DIM)
    share = expected_per_ps(meta, num_ps, DIM)
    rate = run["metrics"]["train_examples_per_sec"]
    for role in sorted(run["peak_kib"]):
      idle, peak = run["idle_kib"].get(role, 0) / 1024, run["peak_kib"][role] / 1024
      cells = ["-"] * 5
      if role.startswith("ps"):
        expected = share[int(role.split(":")[1])] / 2**20
        tables = run["built_kib"][role] / 1024 - idle
        cells = [f"{tables:.0f}", f"{expected:.0f}", f"{tables / expected:.3f}",
                 f"{peak - idle:.0f}", f"{(peak - idle) / expected:.3f}"]
      print(f"| {num_ps} | {role} | {idle:.0f} | {peak:.0f} | {' | '.join(cells)} | "
            f"{rate:,.0f} |", flush=True)
    results.append({"ps": num_ps, "expected_bytes": share, **run})
  with open(os.path.join(work, "sharded_memory.json"), "w") as f:
    json.dump(results, f, indent=1, default=str)
  print(f"wrote {os.path.join(work, 'sharded_memory.json')}")


if __name__ == "__main__":
  main()
