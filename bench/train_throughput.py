"""Training throughput per model, batch size and device count, read from prepared TFRecords.

  python bench/train_throughput.py                       # the default grid
  python bench/train_throughput.py --models seed_mlp --batch_sizes 8192 --devices 1
  python bench/train_throughput.py --features none all   # IDs only, then with side features

Prepares synthetic data once (100K users, 20K items, 2M ratings, with side features: items a
category of 50, 1-3 tags of 200 and a numeric price; users a country of 30 and an age in 8
quantile buckets), then runs each configuration (`--features none`: IDs only; `all`: every
side feature added to every representation)
in a fresh process (logical CPU devices are fixed at start-up): the real input pipeline and the
real training loop of `trainer.train`, timed after warm-up over several windows of ~1M
examples (`--windows`): prints the median examples/s, the lowest and highest window, and the
fraction of a FLOP roofline: this machine's fp32 matmul rate, measured first (TensorFlow, a
2048 x 2048 product, best of 3, in a fresh process like the runs), divided by 3 x the forward
FLOPs of one example's dense layers (forward + two backward matmuls); embedding lookups and the
optimizer are not counted, so the roofline is an upper bound.

Targets on the 2-core CI machine: seed_mlp >= 400K examples/s; neumf with the NCF paper's
factor-8 configuration >= 1.2M examples/s.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import machine  # bench/machine.py, beside this script

# Per-model flags: seed_mlp as specified; neumf as the NCF paper's factor 8 (GMF 8, MLP
# embeddings 32, tower 32-16-8).
MODEL_FLAGS = {
    "seed_mlp": dict(embedding_dim=64, hidden_units=256, task="explicit"),
    "neumf": dict(embedding_dim=8, mlp_embedding_dim=32, layers=(32, 16, 8), task="implicit",
                  num_negatives=4),
    "gmf": dict(embedding_dim=8, task="implicit", num_negatives=4),
    "mf": dict(embedding_dim=64, task="explicit"),
}


def forward_flops(name: str) -> float:
  f = MODEL_FLAGS[name]
  if name == "seed_mlp":
    return 2 * (2 * f["embedding_dim"] * f["hidden_units"] + f["hidden_units"])
  if name == "neumf":
    sizes = [2 * f["mlp_embedding_dim"], *f["layers"]]
    dense = sum(2 * a * b for a, b in zip(sizes, sizes[1:]))
    return dense + 2 * (f["embedding_dim"] + f["layers"][-1]) + f["embedding_dim"]
  if name == "gmf":
    return 3 * f["embedding_dim"]
  return 2 * f["embedding_dim"]


def measure_matmul() -> float:
  """This machine's fp32 matmul rate in FLOP/s, as the runs see it (the same environment)."""
  import time
  import tensorflow as tf
  n = 2048
  a, b = tf.random.normal([n, n]), tf.random.normal([n, n])
  float(tf.matmul(a, b)[0, 0])  # warm-up
  rates = []
  for _ in range(3):
    start = time.perf_counter()
    float(sum(tf.matmul(a, b)[0, 0] for _ in range(4)))  # eager: each product runs
    rates.append(4 * 2 * n ** 3 / (time.perf_counter() - start))
  return max(rates)


def build_loop(data_dir: str, name: str, batch: int, devices: int, flags: dict,
               features: str = "none"):
  """(loop, iterator, batch used): the trainer's input pipeline and training loop
  (`EpochRunner`'s parts), lazy Adam, traced and warmed up by 20 steps; `loop(iterator,
  tf.constant(steps), tf.constant(0))` runs that many steps."""
  from trainer import malloc
  malloc.keep_freed_memory()  # as the training command line does
  import tensorflow as tf
  from trainer import distribute
  distribute.configure_cpu_devices(devices)  # before any op runs
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from trainer import loop, models, objectives, optimizers
  from trainer.config import TrainConfig
  from trainer.data import artifacts, pipeline
  fields = {k: tuple(v) if k == "layers" else v for k, v in flags.items()}
  fields["features"] = features
  probe = TrainConfig(data_dir=data_dir, model_dir="unused", model=name, **fields)
  unit = devices * probe.examples_per_positive
  batch -= batch % unit  # divisible by the replicas and by 1 + negatives
  config = TrainConfig(data_dir=data_dir, model_dir="unused", model=name, batch_size=batch,
                       optimizer="lazy_adam", **fields).validate()
  objective = objectives.for_config(config)
  data = artifacts.PreparedData(data_dir)
  strategy = distribute.get_strategy("auto", devices)
  with strategy.scope():
    model = models.for_config(config, data)
    optimizer = optimizers.make_optimizer("lazy_adam", 1e-3)
    optimizer.build(model.trainable_variables)
  add_negatives = objective.negative_sampler(data)  # excludes positives, as the trainer does
  positives = batch // objective.examples_per_positive
  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: pipeline.make_dataset(data.train_pattern, positives, True, ctx, 0, 256,
                                        add_negatives))
  iterator = iter(dataset)
  loop = loop.make_train_loop(model, optimizer, strategy, batch, objective)
  loop(iterator, tf.constant(20), tf.constant(0))  # trace and warm up
  return loop, iterator, batch


def measure_training(data_dir: str, name: str, batch: int, devices: int, flags: dict,
                     windows: int, features: str = "none") -> dict:
  """Examples/s of `windows` timed windows of ~1M examples (`build_loop`'s loop)."""
  import time
  loop, iterator, batch = build_loop(data_dir, name, batch, devices, flags, features)
  import tensorflow as tf
  steps = max(10, int(1e6 // batch))  # per window: ~1M examples
  rates = []
  for _ in range(windows):
    start = time.perf_counter()
    loop(iterator, tf.constant(steps), tf.constant(0))
    rates.append(steps * batch / (time.perf_counter() - start))
  return {"rates": rates, "batch": batch}


def _run_child(args, root: str, env, what: str):
  """Runs this script with `--child ARGS` in a fresh Python process (logical devices and
  malloc settings are fixed at start-up); returns the JSON of its last output line, or exits
  with its stderr naming `what` failed."""
  done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], cwd=root,
                        env=env, capture_output=True, text=True)
  if done.returncode:
    sys.exit(f"{what} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _child(args) -> None:
  """The measurement a parent asked for: `matmul`, or `train DATA MODEL BATCH DEVICES FLAGS
  WINDOWS`; prints its result as one JSON line."""
  if args[0] == "matmul":
    print(json.dumps(measure_matmul()))
    return
  data_dir, name, batch, devices, flags, windows, features = args[1:]
  print(json.dumps(measure_training(data_dir, name, int(batch), int(devices),
                                    json.loads(flags), int(windows), features)))


def write_synthetic_features(directory: str, num_users: int, num_items: int) -> list:
  """Feature files for the synthetic IDs (u<n>, i<n>); returns neumf-prepare's flags."""
  import numpy as np
  rng = np.random.default_rng(0)
  items = os.path.join(directory, "items.csv")
  with open(items, "w") as f:
    f.write("item,category,tags,price\n")
    for n in range(num_items):
      tags = "|".join(str(t) for t in rng.choice(200, rng.integers(1, 4), replace=False))
      f.write(f"i{n},c{n % 50},{tags},{rng.lognormal(2.0, 1.0):.2f}\n")
  users = os.path.join(directory, "users.csv")
  with open(users, "w") as f:
    f.write("user,country,age\n")
    for n in range(num_users):
      f.write(f"u{n},k{rng.integers(30)},{rng.integers(16, 80)}\n")
  return [f"--item_features={items}", "--item_id_column=item",
          "--item_feature_columns=category:categorical,tags:multi_hot:|,price:numeric",
          f"--user_features={users}", "--user_id_column=user",
          "--user_feature_columns=country:categorical,age:bucketized:8"]


def prepare_synthetic(directory: str, root: str, env) -> str:
  """The benchmark's data (100K users, 20K items, 2M ratings, side features) prepared into
  `directory`/data; returns that path."""
  prepare = [sys.executable, "-m", "trainer.prepare", f"--output_dir={directory}/data",
             "--num_users=100000", "--num_items=20000", "--num_ratings=2000000",
             "--num_shards=8", "--eval_fraction=0.05",
             *write_synthetic_features(directory, 100_000, 20_000)]
  subprocess.run(prepare, cwd=root, env=env, check=True, capture_output=True)
  return f"{directory}/data"


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", nargs="+", default=["seed_mlp", "neumf"],
                      choices=sorted(MODEL_FLAGS))
  parser.add_argument("--batch_sizes", nargs="+", type=int, default=[8192, 65536])
  parser.add_argument("--devices", nargs="+", type=int, default=[1, 2])
  parser.add_argument("--features", nargs="+", default=["none", "all"], choices=["none", "all"])
  parser.add_argument("--windows", type=int, default=5,
                      help="timed windows of ~1M examples each; the median is reported (this "
                      "machine's speed varies by ~20%% from minute to minute)")
  args = parser.parse_args()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=root)
  matmul_flops = _run_child(["matmul"], root, env, "measuring the matmul rate")
  print(f"{machine.cpu_name()}, {os.cpu_count()} CPUs; fp32 matmul (TensorFlow, 2048 x 2048): "
        f"{matmul_flops / 1e9:,.0f} GFLOP/s", flush=True)
  with tempfile.TemporaryDirectory() as data_dir:
    prepare_synthetic(data_dir, root, env)
    rows = [_measure(f"{data_dir}/data", name, batch, devices, features, args.windows,
                     matmul_flops, root, env)
            for name in args.models for batch in args.batch_sizes for devices in args.devices
            for features in args.features]
  print()
  print(f"{'model':>9} {'batch':>7} {'devices':>7} {'features':>8} {'examples/s':>12} "
        f"{'lowest':>10} {'highest':>10} {'of roofline':>11}")
  for name, batch, devices, features, rate, low, high, roofline in rows:
    print(f"{name:>9} {batch:>7} {devices:>7} {features:>8} {rate:>12,.0f} {low:>10,.0f} "
          f"{high:>10,.0f} {rate / roofline:>11.1%}")


def _measure(data_dir, name, batch, devices, features, windows, matmul_flops, root, env):
  """One configuration in a fresh process; prints and returns its row."""
  result = _run_child(["train", data_dir, name, str(batch), str(devices),
                       json.dumps(MODEL_FLAGS[name]), str(windows), features], root, env,
                      f"{name} batch {batch} devices {devices} features {features}")
  rates, batch_used = sorted(result["rates"]), result["batch"]
  rate = statistics.median(rates)
  roofline = matmul_flops / (3 * forward_flops(name))  # ID-only dense layers: an upper bound
  print(f"{name:>9} batch {batch_used:>6} devices {devices} features {features:>4}: "
        f"{rate:>12,.0f} examples/s (median of {len(rates)} windows, "
        f"{rates[0]:,.0f}-{rates[-1]:,.0f}; {rate / roofline:.1%} of {roofline:,.0f} FLOP "
        "roofline)", flush=True)
  return (name, batch_used, devices, features, rate, rates[0], rates[-1], roofline)


if __name__ == "__main__":
  if sys.argv[1:2] == ["--child"]:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _child(sys.argv[2:])
  else:
    main()
