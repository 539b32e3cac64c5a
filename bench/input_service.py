"""Parameter-server input with and without the tf.data service, on one machine.

  python bench/input_service.py                       # 2 workers + 1 ps, 4 workers + 2 ps
  python bench/input_service.py --clusters 2:1 --epochs 1 --ratings 100000

Prepares synthetic implicit data (64 training files: the service hands out whole files, so a
worker's share is a whole number of them), then:

1. Local parameter-server clusters (chief, W workers, P ps tasks as processes on 127.0.0.1),
   each trained twice: with today's per-worker reading (every worker reads every file and
   keeps every W-th batch) and with `--input_service` (one shared job per epoch, the data
   workers inside the worker tasks). Per worker it prints the training files it opened (each
   worker runs under `strace -e trace=openat`; a TFRecord file opened is read through) as
   bytes and examples, a multiple of the training files' bytes x epochs / W (1.0: its fair
   share; the target is within 10%; a pipeline that reads ahead past the last step counts
   what it read), and the cluster's training examples/s (metrics.json) of a second run
   without strace.
2. The input pipeline alone, in this process: examples/s per core (all cores, divided by
   their count) of one worker's pipeline as it is today (`pipeline.make_dataset`) and of the
   served epoch (`pipeline.served_epoch`) read directly and through a local tf.data service
   (a dispatcher and one data worker in this process): what the service's hop costs, the
   figure that decides whether MultiWorkerMirroredStrategy (whose workers already read their
   own files once) should use it.

Every task shares this machine's cores: cluster examples/s here show the input work saved,
not what separate machines would reach. Prints a JSON line per measurement and a table.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import machine  # bench/machine.py, beside this script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TRAIN_FLAGS = ("--model=mf", "--task=implicit", "--num_negatives=4", "--embedding_dim=16",
               "--optimizer=lazy_adam", "--learning_rate=0.005", "--batch_size=5120",
               "--log_every_steps=20", "--checkpoint_every_secs=0", "--features=none",
               "--eval_batch_size=65536")


def prepare(root: str, ratings: int) -> str:
  from trainer.config import PrepareConfig
  from trainer.data import preparation
  out = os.path.join(root, "data")
  preparation.prepare(PrepareConfig(output_dir=out, num_users=max(ratings // 40, 100),
                                    num_items=max(ratings // 100, 50), num_ratings=ratings,
                                    implicit=True, num_shards=64, seed=1))
  return out


def _opened(trace: str, sizes: dict) -> list:
  """The training files a traced process opened, in order (`strace -o trace` output)."""
  opened = []
  with open(trace) as f:
    for line in f:
      match = re.search(r'openat\([^"]*"([^"]+)"', line)
      if match and match.group(1) in sizes and "= -1" not in line:
        opened.append(match.group(1))
  return opened


def run_cluster(data_dir: str, root: str, workers: int, ps: int, served: bool,
                epochs: int, sizes: dict, traced: bool) -> dict:
  """Trains on a local cluster; returns its metrics and the training files each worker
  opened."""
  from trainer import localhost
  ports = iter(localhost.free_ports(2 + workers + ps))
  cluster = {"chief": [f"127.0.0.1:{next(ports)}"],
             "worker": [f"127.0.0.1:{next(ports)}" for _ in range(workers)],
             "ps": [f"127.0.0.1:{next(ports)}" for _ in range(ps)]}
  model_dir = os.path.join(root, f"w{workers}p{ps}{'s' if served else 'r'}{'t' * traced}")
  flags = [f"--data_dir={data_dir}", f"--model_dir={model_dir}", f"--epochs={epochs}",
           *TRAIN_FLAGS]
  if served:
    flags += ["--input_service", f"--input_service_port={next(ports)}", "--data_worker_port=0"]
  processes = {}
  for task_type in ("ps", "worker", "chief"):
    for index in range(len(cluster[task_type])):
      env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
          {"cluster": cluster, "task": {"type": task_type, "index": index}}))
      env.pop("CLUSTER_SPEC", None)
      trace = (["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=openat", "-e",
                "signal=none", "-o", f"{model_dir}.worker{index}.strace"]
               if task_type == "worker" and traced else [])
      processes[(task_type, index)] = subprocess.Popen(
          [*trace, sys.executable, "-m", "trainer.task", *flags], cwd=REPO, env=env,
          stdout=subprocess.PIPE if task_type == "chief" else subprocess.DEVNULL,
          stderr=open(f"{model_dir}.{task_type}{index}.log", "w"), text=True)
  chief = processes[("chief", 0)]
  try:
    out, _ = chief.communicate(timeout=3600)
  finally:
    for p in processes.values():
      p.kill()
      p.wait()
  if chief.returncode != 0:
    raise RuntimeError(open(f"{model_dir}.chief0.log").read()[-3000:])
  metrics = json.loads(out.strip().splitlines()[-1])
  return {"metrics": metrics, "opened": [_opened(f"{model_dir}.worker{i}.strace", sizes)
                                         for i in range(workers)] if traced else None}


def pipeline_rates(data_dir: str, batches: int = 60) -> dict:
  """Examples/s per core of the input pipeline alone, with 4 negatives and without."""
  import tensorflow as tf
  from trainer.data import artifacts, pipeline
  data = artifacts.PreparedData(data_dir)
  cores = os.cpu_count() or 1
  service = tf.data.experimental.service
  dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
  servers = [dispatcher, service.WorkerServer(service.WorkerConfig(
      dispatcher_address=dispatcher.target.split("://")[1], worker_address="127.0.0.1:%port%"))]
  rates = {"servers": len(servers)}
  for negatives in (4, 0):
    keys = artifacts.pair_keys(data.train_positives, data.metadata.num_items)
    add = (pipeline.negative_sampler(data.metadata.num_items, negatives, 1, keys)
           if negatives else None)
    positives = 65536 // (1 + negatives)
    served = pipeline.served_epoch(data.train_pattern, 0, positives, add_negatives=add)
    through = service.distribute(service.ShardingPolicy.DYNAMIC, dispatcher.target)
    kinds = {
        "per_worker": pipeline.make_dataset(data.train_pattern, positives, True,
                                            add_negatives=add),
        "served_local": served.repeat(),
        "served_through_service": served.repeat().apply(through),
    }
    for kind, ds in kinds.items():
      it = iter(ds)
      for _ in range(5):  # warm-up
        next(it)
      start, examples = time.time(), 0
      for _ in range(batches):
        examples += int(tf.shape(next(it)["user"])[0])
      rate = examples / (time.time() - start)
      rates[f"{kind}_negatives{negatives}"] = rate / cores
  del rates["servers"]  # (they served until here)
  return rates


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--clusters", nargs="+", default=["2:1", "4:2"],
                      help="WORKERS:PS of each cluster")
  parser.add_argument("--ratings", type=int, default=400_000)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--skip_pipeline", action="store_true")
  args = parser.parse_args()
  print(f"# machine: {machine.cpu_name()}, {os.cpu_count()} cores", flush=True)
  with tempfile.TemporaryDirectory() as root:
    data_dir = prepare(root, args.ratings)
    from trainer.data import artifacts, pipeline
    data = artifacts.PreparedData(data_dir)
    files = pipeline.list_shards(data.train_pattern)
    sizes = {f: os.path.getsize(f) for f in files}
    examples = dict(zip(files, data.metadata.train_shard_examples))
    total = sum(sizes.values())
    rows = []
    for spec in args.clusters:
      workers, ps = (int(x) for x in spec.split(":"))
      for served in (False, True):
        got = run_cluster(data_dir, root, workers, ps, served, args.epochs, sizes, True)
        got["metrics"] = run_cluster(data_dir, root, workers, ps, served, args.epochs, sizes,
                                     False)["metrics"]
        read = [sum(sizes[f] for f in opened) for opened in got["opened"]]
        parsed = [sum(examples[f] for f in opened) for opened in got["opened"]]
        share = [b / (total * args.epochs / workers) for b in read]
        row = {"workers": workers, "ps": ps, "input": "service" if served else "per-worker",
               "bytes_read_per_worker": read, "examples_parsed_per_worker": parsed,
               "fair_share_multiple": share,
               "train_examples_per_sec": got["metrics"]["train_examples_per_sec"],
               "eval_hr": got["metrics"].get("eval_hr"),
               "examples_per_epoch": got["metrics"].get("input_service", {}).get(
                   "examples_per_epoch")}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\ntraining files: {total / 2**20:.1f} MiB x {args.epochs} epochs")
    print("| workers | ps | input | bytes read per worker / fair share | cluster examples/s |")
    print("|---|---|---|---|---|")
    for r in rows:
      print(f"| {r['workers']} | {r['ps']} | {r['input']} | "
            f"{', '.join(f'{s:.2f}' for s in r['fair_share_multiple'])} | "
            f"{r['train_examples_per_sec']:,.0f} |")
    if not args.skip_pipeline:
      rates = pipeline_rates(data_dir)
      print(json.dumps({"pipeline_examples_per_sec_per_core": rates}), flush=True)
      print("\n| pipeline | 4 negatives | none |\n|---|---|---|")
      for kind in ("per_worker", "served_local", "served_through_service"):
        print(f"| {kind} | {rates[f'{kind}_negatives4'] / 1e6:.2f}M | "
              f"{rates[f'{kind}_negatives0'] / 1e6:.2f}M |")


if __name__ == "__main__":
  main()
