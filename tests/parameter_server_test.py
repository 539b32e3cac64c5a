"""ParameterServerStrategy with real chief, worker and ps processes on 127.0.0.1."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, last_json_line, run_cli
from cold_start_test import cold_data  # noqa: F401  (a fixture)
from ps_restore import ITEMS, USERS
from trainer import distribute, localhost
from trainer.config import ConfigError, PrepareConfig
from trainer.data import artifacts, preparation

pytestmark = pytest.mark.slow

FLAGS = ("--model=mf", "--task=explicit", "--embedding_dim=8", "--optimizer=lazy_adam",
         "--learning_rate=0.01", "--batch_size=100", "--log_every_steps=10",
         "--checkpoint_every_secs=0", "--features=none")


@pytest.fixture(scope="module")
def ps_data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ps_data"))
  preparation.prepare(PrepareConfig(output_dir=out, num_users=300, num_items=120,
                                    num_ratings=6000, num_shards=4, seed=3))
  return out


def local_cluster(workers, ps):
  """A cluster of a chief, `workers` workers and `ps` ps tasks on free 127.0.0.1 ports."""
  ports = iter(localhost.free_ports(1 + workers + ps))
  return {"chief": [f"127.0.0.1:{next(ports)}"],
          "worker": [f"127.0.0.1:{next(ports)}" for _ in range(workers)],
          "ps": [f"127.0.0.1:{next(ports)}" for _ in range(ps)]}


def start_tasks(cluster, roles, data_dir, model_dir, flags):
  """Starts a trainer process per task of `cluster` whose type is in `roles`, in that order."""
  processes = []
  for task_type in roles:
    for index in range(len(cluster[task_type])):
      env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "CLUSTER_SPEC")}
      env.update(TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
          {"cluster": cluster, "task": {"type": task_type, "index": index}}))
      log = open(f"{model_dir}.{task_type}{index}.log", "w")
      process = subprocess.Popen(
          [sys.executable, "-m", "trainer.task", f"--data_dir={data_dir}",
           f"--model_dir={model_dir}", *flags],
          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
      process.log_path, process.role = log.name, f"{task_type}:{index}"
      processes.append(process)
  return processes


def start_cluster(data_dir, model_dir, workers=2, ps=2, extra=()):
  """Starts ps, worker and chief processes; returns them, the chief last."""
  return start_tasks(local_cluster(workers, ps), ("ps", "worker", "chief"), data_dir,
                     model_dir, (*FLAGS, *extra))


def finish_chief(processes, timeout=400):
  """Waits for the chief, stops the servers; returns the chief's metrics."""
  chief = processes[-1]
  try:
    out, _ = chief.communicate(timeout=timeout)
  finally:
    for p in processes[:-1]:
      p.kill()
      p.wait()
  assert chief.returncode == 0, (f"chief exit {chief.returncode}\n"
                                 f"{open(chief.log_path).read()[-5000:]}")
  return last_json_line(out)


@pytest.fixture(scope="module")
def cluster_run(ps_data, tmp_path_factory):
  """A chief, 2 workers and 2 ps tasks, started as a user would: scripts/local_debug.sh,
  whose parameter-server clusters read their input from the tf.data service."""
  model_dir = str(tmp_path_factory.mktemp("ps_run") / "model")
  done = subprocess.run(
      ["bash", os.path.join(REPO_ROOT, "scripts", "local_debug.sh"), "--data-dir", ps_data,
       "--model-dir", model_dir, "--workers", "2", "--ps", "2", "--", *FLAGS, "--epochs=4",
       "--ps_shards=2"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="2"))
  assert done.returncode == 0, open(f"{model_dir}.chief0.log").read()[-4000:]
  return model_dir, last_json_line(done.stdout)


def test_a_chief_two_workers_and_two_ps_train_as_well_as_one_device(cluster_run, ps_data,
                                                                     tmp_path):
  model_dir, metrics = cluster_run
  single = last_json_line(run_cli("trainer.task", f"--data_dir={ps_data}",
                                  f"--model_dir={tmp_path / 'single'}", *FLAGS,
                                  "--epochs=4").stdout)
  assert metrics["task_role"] == "chief:0"
  assert metrics["epochs"] == 4 and metrics["workers"] == 2
  # The tf.data service fed both workers: each training example once per epoch, each eval
  # example once (the chief evaluates by itself).
  meta = artifacts.PreparedData(ps_data).metadata
  assert metrics["input_service"] == {
      "train_examples": meta.num_train, "missed": 0,
      "examples_per_epoch": {str(e): meta.num_train for e in range(1, 5)}}
  assert metrics["eval_examples"] == single["eval_examples"] == meta.num_eval
  # The ID tables trained in 2 shards, one on each ps task; nothing else was sharded.
  tables = metrics["sharded_tables"]
  assert sorted(tables) == sorted(f"{side}_{kind}/embeddings" for side in ("user", "item")
                                  for kind in ("embedding", "bias"))
  for shards in tables.values():
    assert sorted(device for *_, device in shards) == [
        f"/job:ps/replica:0/task:{i}/device:CPU:0" for i in range(2)]
  rows = artifacts.PreparedData(ps_data).metadata.num_users + 1
  assert [shard[:2] for shard in tables["user_embedding/embeddings"]] == [
      [rows - rows // 2, 8], [rows // 2, 8]]
  # Two workers update asynchronously, each step from parameters a step or so stale: a
  # different trajectory (0.578 and 0.591 in two runs here, one device 0.559), not a worse
  # model by much, and far below the global-mean baseline.
  assert metrics["eval_rmse"] == pytest.approx(single["eval_rmse"], rel=0.10)
  assert metrics["eval_rmse"] < 0.9 * metrics["eval_rmse_global_mean_baseline"]


def test_one_worker_over_sharded_tables_trains_as_one_device(ps_data, tmp_path):
  """One worker runs its steps in order: the sharded lookups and per-shard lazy Adam then
  give one device's result (to float rounding: the shards' gradients are summed apart)."""
  metrics = finish_chief(start_cluster(ps_data, str(tmp_path / "ps"), workers=1, ps=2,
                                       extra=("--epochs=2", "--ps_shards=2")))
  single = last_json_line(run_cli("trainer.task", f"--data_dir={ps_data}",
                                  f"--model_dir={tmp_path / 'single'}", *FLAGS,
                                  "--epochs=2").stdout)
  assert metrics["eval_rmse"] == pytest.approx(single["eval_rmse"], rel=1e-6)
  assert len(metrics["sharded_tables"]["item_embedding/embeddings"]) == 2


def _restore_sharded(model_dir, data_dir, num_ps, shards):
  cluster = local_cluster(1, num_ps)
  servers = start_tasks(cluster, ("ps", "worker"), data_dir, f"{model_dir}.restore", FLAGS)
  try:
    done = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tests", "ps_restore.py"), json.dumps(cluster),
         model_dir, data_dir, str(shards)], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO_ROOT))
  finally:
    for p in servers:
      p.kill()
      p.wait()
  assert done.returncode == 0, done.stderr[-4000:]
  return last_json_line(done.stdout)


def test_tables_are_sharded_and_restore_into_other_shard_counts_and_one_device(cluster_run,
                                                                               ps_data):
  """Trained over 2 ps tasks in 2 shards; restored into 3 shards over 3 ps tasks, and into a
  single-device model: the same weights and the same scores, and each shard on its own ps."""
  model_dir, metrics = cluster_run
  three = _restore_sharded(model_dir, ps_data, num_ps=3, shards=3)
  rows = artifacts.PreparedData(ps_data).metadata.num_users + 1  # and the OOV row
  # "div" partitions: the first rows % 3 shards one row longer.
  assert [shape for shape, _ in three["shards"]] == [
      [rows // 3 + (i < rows % 3), 8] for i in range(3)]
  assert sorted(device for _, device in three["shards"]) == [
      f"/job:ps/replica:0/task:{i}/device:CPU:0" for i in range(3)]
  from trainer import loop, run_dir
  config = run_dir.load_config(model_dir)
  model = run_dir.load_trained_model(model_dir, artifacts.PreparedData(ps_data),
                                   f"{config.resolved_checkpoint_dir}/best")
  local = model({"user": tf.constant(USERS), "item": tf.constant(ITEMS)}).numpy()
  assert loop.weights_checksum(model) == metrics["weights_sha256"] == three["sha256"]
  np.testing.assert_allclose(three["scores"], local, rtol=1e-6)


def _wait_for(path, text, process, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if text in open(path).read():
      return
    assert process.poll() is None, open(path).read()[-3000:]
    time.sleep(0.5)
  raise AssertionError(f"no {text!r} in {path} within {timeout} s")


def test_a_lost_worker_is_rescheduled_and_a_lost_ps_stops_the_chief_then_all_resume(
    ps_data, tmp_path):
  """A worker killed mid-run: the coordinator gives its steps to the other worker and the run
  goes on. A ps task killed: the chief exits with the lost-peer code (131) within seconds;
  restarting every task resumes from the latest checkpoint and finishes."""
  model_dir = str(tmp_path / "model")
  extra = ("--epochs=30", "--ps_shards=2", "--log_every_steps=5")
  processes = start_cluster(ps_data, model_dir, extra=extra)
  chief = processes[-1]
  try:
    _wait_for(chief.log_path, "epoch 2/30 train loss", chief)
    worker = next(p for p in processes if p.role == "worker:1")
    worker.kill()
    _wait_for(chief.log_path, "epoch 4/30 train loss", chief)  # goes on with one worker
    ps = next(p for p in processes if p.role == "ps:0")
    ps.kill()
    killed_at = time.time()
    chief.wait(timeout=120)
    stopped_in = time.time() - killed_at
  finally:
    for p in processes:
      p.kill()
      p.wait()
  assert chief.returncode == 131, open(chief.log_path).read()[-3000:]
  assert stopped_in < 60
  log = open(chief.log_path).read()
  assert "lost contact with another task" in log
  done = finish_chief(start_cluster(ps_data, model_dir, extra=extra))
  resumed = open(f"{model_dir}.chief0.log").read()
  assert "Resumed from" in resumed
  assert done["epochs"] == 30 and done["eval_rmse"] < 1.0


@pytest.mark.parametrize("model,sharded_table", [("mf", "item_embedding/embeddings"),
                                                  ("autorec", "encoder/embeddings")])
def test_side_features_under_a_parameter_server_train_as_on_one_device(cold_data, tmp_path,
                                                                       model, sharded_table):
  """Item features (a kind that alone decides the rating) with the ID tables (and autorec's
  encoder) sharded over 2 ps tasks and one worker: the same held-out (cold) items' RMSE as one
  device, to rounding."""
  flags = (f"--model={model}", "--embedding_dim=8", "--epochs=5", "--batch_size=120",
           "--learning_rate=0.05", "--l2=0.2", "--optimizer=lazy_adam",
           "--checkpoint_every_secs=0", "--features=all")
  sharded = finish_chief(start_cluster(cold_data, str(tmp_path / "ps"), workers=1, ps=2,
                                       extra=("--ps_shards=2", *flags)))
  single = last_json_line(run_cli("trainer.task", f"--data_dir={cold_data}",
                                  f"--model_dir={tmp_path / 'single'}", *FLAGS, *flags).stdout)
  assert len(sharded["sharded_tables"][sharded_table]) == 2
  assert sharded["eval_rmse"] == pytest.approx(single["eval_rmse"], rel=1e-5)
  assert sharded["eval_rmse"] < 0.5 * sharded["eval_rmse_global_mean_baseline"]


def test_context_under_a_parameter_server_trains_as_on_one_device(tmp_path):
  """A planted hour-of-day effect, learnt from --context=hour with the ID tables sharded over
  2 ps tasks and one worker: the same RMSE as one device, to rounding, and the context's
  worth of it (the same run without the context is worse)."""
  data_dir = str(tmp_path / "data")
  preparation.prepare(PrepareConfig(output_dir=data_dir, num_users=300, num_items=120,
                                    num_ratings=6000, num_shards=4, seed=3, context=("hour",),
                                    context_effect=1.0))
  flags = ("--epochs=6", "--learning_rate=0.03", "--checkpoint_every_secs=0")
  sharded = finish_chief(start_cluster(data_dir, str(tmp_path / "ps"), workers=1, ps=2,
                                       extra=("--ps_shards=2", *flags, "--features=all")))
  single = last_json_line(run_cli("trainer.task", f"--data_dir={data_dir}",
                                  f"--model_dir={tmp_path / 'single'}", *FLAGS, *flags,
                                  "--features=all").stdout)
  without = last_json_line(run_cli("trainer.task", f"--data_dir={data_dir}",
                                   f"--model_dir={tmp_path / 'none'}", *FLAGS, *flags).stdout)
  assert sharded["eval_rmse"] == pytest.approx(single["eval_rmse"], rel=1e-5)
  assert sharded["eval_rmse"] < without["eval_rmse"] - 0.2, (sharded, without)


@pytest.mark.parametrize("history", [0, 4])
def test_the_softmax_objective_over_sharded_tables_trains_as_one_device(tmp_path, history):
  """implicit_softmax scores the whole catalogue each step (every item row gets a gradient):
  with the tables in 2 shards over 2 ps tasks and one worker, one device's metrics; with
  mf's user history, its table sharded too."""
  data = str(tmp_path / "data")
  preparation.prepare(PrepareConfig(output_dir=data, num_users=200, num_items=90,
                                    num_ratings=4000, implicit=True, split="leave_one_out",
                                    eval_negatives=20, num_shards=2, seed=4))
  flags = ("--task=implicit_softmax", "--epochs=3", "--batch_size=64", "--learning_rate=0.02",
           "--l2=0.01", f"--history={history}")
  sharded = finish_chief(start_cluster(data, str(tmp_path / "ps"), workers=1, ps=2,
                                       extra=("--ps_shards=2", *flags)))
  single = last_json_line(run_cli("trainer.task", f"--data_dir={data}",
                                  f"--model_dir={tmp_path / 'single'}", *FLAGS, *flags).stdout)
  assert len(sharded["sharded_tables"]["item_embedding/embeddings"]) == 2
  if history:
    assert len(sharded["sharded_tables"]["history_embedding/embeddings"]) == 2
  for metric in ("eval_ndcg_full", "eval_ndcg_sampled"):
    assert sharded[metric] == pytest.approx(single[metric], rel=1e-4), metric
  assert sharded["eval_hr_full"] > sharded["eval_hr_full_popularity_baseline"]


def test_what_the_coordinated_step_cannot_do_is_refused_at_start_up(ps_data, tmp_path):
  processes = start_cluster(ps_data, str(tmp_path / "model"), workers=1, ps=1,
                            extra=("--jit_compile",))
  chief = processes[-1]
  try:
    chief.wait(timeout=120)
  finally:
    for p in processes:
      p.kill()
      p.wait()
  log = open(chief.log_path).read()
  assert chief.returncode == 2, log[-3000:]
  assert "--strategy=parameter_server does not support --jit_compile" in log


@pytest.mark.parametrize("cluster,message", [
    ({"worker": ["h:1"], "ps": ["h:2"]}, "no chief"),
    ({"chief": ["h:0"], "worker": ["h:1"], "ps": []}, "at least one ps"),
    ({"chief": ["h:0"], "ps": ["h:2"]}, "no worker"),
])
def test_a_parameter_server_cluster_needs_a_chief_workers_and_ps(cluster, message):
  task = next(iter(t for t in cluster if cluster[t]))
  environ = {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task, "index": 0}})}
  with pytest.raises(ConfigError, match=message):
    distribute.cluster_config(environ)


def test_parameter_server_without_ps_tasks_is_refused():
  with pytest.raises(ConfigError, match="--strategy=parameter_server needs"):
    distribute.uses_parameter_servers("parameter_server", None)
  cluster = {"cluster": {"chief": ["h:0"], "worker": ["h:1"], "ps": ["h:2"]},
             "task": {"type": "chief", "index": 0}}
  with pytest.raises(ConfigError, match="--strategy=multi_worker_mirrored"):
    distribute.uses_parameter_servers("multi_worker_mirrored", cluster)
  assert distribute.uses_parameter_servers("auto", cluster)


def test_a_diverging_run_stops_the_cluster_with_exit_code_3(ps_data, tmp_path):
  model_dir = str(tmp_path / "ps")
  processes = start_cluster(ps_data, model_dir, workers=1, ps=1,
                            extra=("--epochs=2", "--optimizer=sgd", "--learning_rate=1e30",
                                   "--log_every_steps=1"))
  chief = processes[-1]
  try:
    out, _ = chief.communicate(timeout=300)
  finally:
    for p in processes[:-1]:
      p.kill()
      p.wait()
  log = open(chief.log_path).read()
  assert chief.returncode == 3, log[-3000:]
  assert "training diverged: the mean training loss of steps" in log
  assert out.strip() == ""
  assert not os.path.exists(os.path.join(model_dir, "metrics.json"))
  assert not os.path.exists(os.path.join(model_dir, "export"))


def test_a_model_trained_over_ps_shards_warm_starts_on_one_device(cluster_run, ps_data,
                                                                  tmp_path):
  """The cluster run's tables (2 shards) and their per-shard lazy Adam slots, into one device's
  model of data prepared on its data (more users): rows and slots copied, shards joined."""
  from tensorflow.core.protobuf import trackable_object_graph_pb2
  from trainer import run_dir
  from trainer.data import artifacts
  from warm_helpers import warm_started, weights_and_slots
  model_dir, _ = cluster_run
  d1 = str(tmp_path / "d1")
  preparation.prepare(PrepareConfig(output_dir=d1, num_users=340, num_items=120,
                                    num_ratings=7000, num_shards=4, seed=4,
                                    base_data_dir=ps_data))
  config = dataclasses.replace(run_dir.load_config(model_dir), data_dir=d1,
                               model_dir=str(tmp_path / "m1"), warm_start_from=model_dir,
                               ps_shards=0, strategy="default")
  new = weights_and_slots(*warm_started(config))
  best_dir = f"{run_dir.load_config(model_dir).resolved_checkpoint_dir}/best"
  old_model = run_dir.load_trained_model(model_dir, artifacts.PreparedData(ps_data), best_dir)
  best = tf.train.latest_checkpoint(best_dir)
  reader = tf.train.load_checkpoint(best)
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
  by_name = {a.full_name: a.checkpoint_key for n in graph.nodes for a in n.attributes}
  n0 = artifacts.PreparedData(ps_data).metadata.num_users
  for weight in old_model.trainable_weights:
    if not weight.path.startswith("user_"):
      continue
    np.testing.assert_array_equal(new[weight.path]["value"][:n0], weight.numpy()[:n0])
    # Keras names a shard's slot after the shard: lazy_adam/<table>_part_<k>_0_momentum.
    stem = weight.path.replace("/", "_")
    momentum = np.concatenate([reader.get_tensor(by_name[f"lazy_adam/{stem}_part_{k}_0_momentum"])
                               for k in range(2)])
    assert momentum.any()
    np.testing.assert_array_equal(new[weight.path]["momentum"][:n0], momentum[:n0])
    np.testing.assert_array_equal(new[weight.path]["momentum"][-1], momentum[-1])  # OOV
    assert not new[weight.path]["momentum"][n0:-1].any()
