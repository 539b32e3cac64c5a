"""Where a training step's time goes: TensorFlow's profiler over the trainer's own loop.

  python bench/step_profile.py                                   # seed_mlp, batch 8192
  python bench/step_profile.py --model mf --features all --top 30

Prepares `train_throughput.py`'s synthetic data (or reads --data_dir), builds the same loop
(`train_throughput.build_loop`: the input pipeline, the model, lazy Adam), times 50 steps, then
profiles 20 and sums each op's time per step by what it does:

  dense layers   matmuls, bias adds and activations (and their gradients)
  gathers        the ID embeddings' and feature tables' row reads
  optimizer      lazy Adam's updates (its gathers, scatters, Adam kernels)
  features       the side features' sums (XLA) and their glue
  other          the rest of the step (loss, L2, concatenations, slices ...)
  input          tf.data's threads (parse, shuffle, negatives), beside the step

Op times are thread times: ops run concurrently on the inter-op threads and the large ones
also use the intra-op pool, so the categories add up to more than a step's wall time; their
shares say where the work is. Prints the wall ms per step, the FLOP roofline's ms
(`train_throughput.forward_flops`, this machine's matmul rate), the table and the top ops.
"""

import argparse
import collections
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import machine  # bench/machine.py, beside this script
import train_throughput

CATEGORIES = ("dense layers", "gathers", "optimizer", "features", "other", "input")
_CONTAINERS = ("ExecutorState", "ParallelFor", "BlockUntilReady", "ThunkExecutor",
               "CpuExecutable", "train_loop", "Eager", "TFE_", "KernelAndDevice")
_DENSE = ("MatMul", "BiasAdd", "Relu", "Sigmoid", "Tanh", "FusedMatMul")


def category(name: str) -> str:
  """The category of a profiled op, from its `scope/op:Type` name."""
  scope, _, kind = name.rpartition(":")
  if "lazy_adam" in scope:
    return "optimizer"
  if "feature" in scope or "fusion" in name or "scatter" in name:
    return "features"
  if kind.endswith(_DENSE) or any(k in kind for k in _DENSE):
    return "dense layers"
  if kind in ("ResourceGather", "GatherV2"):
    return "gathers"
  return "other"


def profile(data_dir: str, name: str, batch: int, features: str, logdir: str, steps: int = 20):
  """(wall ms per step, {op name: thread ms per step}, {category: ms per step})."""
  import tensorflow as tf
  loop, iterator, batch = train_throughput.build_loop(
      data_dir, name, batch, 1, train_throughput.MODEL_FLAGS[name], features)
  start = time.perf_counter()
  loop(iterator, tf.constant(50), tf.constant(0))
  wall = (time.perf_counter() - start) / 50 * 1e3
  tf.profiler.experimental.start(logdir)
  loop(iterator, tf.constant(steps), tf.constant(0))
  tf.profiler.experimental.stop()
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  space = xplane_pb2.XSpace()
  with open(sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))[-1], "rb") as f:
    space.ParseFromString(f.read())
  ops, totals = collections.Counter(), collections.Counter()
  for plane in space.planes:
    for line in plane.lines:
      for event in line.events:
        op = plane.event_metadata[event.metadata_id].name
        if op.startswith(_CONTAINERS) or "Iterator::" in op:
          continue
        ms = event.duration_ps / 1e9 / steps
        if line.name.startswith("tf_data"):
          totals["input"] += ms
          continue
        op = op.replace("while/body/_1/", "").replace("while/", "")
        ops[op] += ms
        totals[category(op)] += ms
  return wall, ops, totals, batch


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="seed_mlp", choices=sorted(train_throughput.MODEL_FLAGS))
  parser.add_argument("--batch_size", type=int, default=8192)
  parser.add_argument("--features", default="none", choices=["none", "all"])
  parser.add_argument("--data_dir", help="prepared already (train_throughput's data)")
  parser.add_argument("--top", type=int, default=15, help="the costliest ops listed")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not args.child:  # the matmul rate and the data, then the profile in a fresh process
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=root)
    matmul = train_throughput._run_child(["matmul"], root, env, "measuring the matmul rate")
    with tempfile.TemporaryDirectory() as directory:
      data_dir = args.data_dir or train_throughput.prepare_synthetic(directory, root, env)
      done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                             f"--data_dir={data_dir}", f"--model={args.model}",
                             f"--batch_size={args.batch_size}", f"--features={args.features}",
                             f"--top={args.top}"], cwd=root, env=env, capture_output=True,
                            text=True)
    if done.returncode:
      sys.exit(f"profiling failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    report(args, result, matmul)
    return
  with tempfile.TemporaryDirectory() as logdir:
    wall, ops, totals, batch = profile(args.data_dir, args.model, args.batch_size,
                                       args.features, logdir)
  print(json.dumps({"wall": wall, "batch": batch, "totals": totals,
                    "ops": ops.most_common(args.top)}))


def report(args, result, matmul_flops):
  batch, wall = result["batch"], result["wall"]
  roofline = 3 * train_throughput.forward_flops(args.model) * batch / matmul_flops * 1e3
  print(f"{machine.cpu_name()}, {os.cpu_count()} CPUs; fp32 matmul {matmul_flops / 1e9:,.0f} "
        f"GFLOP/s")
  print(f"{args.model}, batch {batch}, features {args.features}: {wall:.2f} ms a step "
        f"({batch / wall * 1e3:,.0f} examples/s); the FLOP roofline's {roofline:.2f} ms "
        f"({roofline / wall:.1%})")
  totals = result["totals"]
  step = sum(v for k, v in totals.items() if k != "input")
  print(f"\n{'thread ms a step':>28} {'share':>6}")
  for name in CATEGORIES:
    share = f"{totals.get(name, 0) / step:6.1%}" if name != "input" else "beside"
    print(f"{name:>16} {totals.get(name, 0):11.2f} {share:>6}")
  print(f"\nthe {len(result['ops'])} costliest ops (thread ms a step):")
  for op, ms in result["ops"]:
    print(f"  {ms:7.3f}  {category(op):>12}  {op[:100]}")


if __name__ == "__main__":
  main()
