"""MultiWorkerMirroredStrategy with real worker processes on 127.0.0.1."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from conftest import REPO_ROOT, last_json_line
from trainer import localhost
from trainer.config import PrepareConfig
from trainer.data import preparation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("mw_data"))
  preparation.prepare(PrepareConfig(output_dir=out, num_users=150, num_items=100,
                                    num_ratings=5000, num_shards=6, seed=2))
  return out


def _start(tasks, data_dir, model_dir, epochs, variable="TF_CONFIG", extra=()):
  """Starts one trainer process per (type, index) task; returns the Popen objects."""
  ports = iter(localhost.free_ports(len(tasks)))
  cluster = {}
  for task_type, _ in tasks:
    cluster.setdefault(task_type, []).append(f"127.0.0.1:{next(ports)}")
  processes = []
  for task_type, index in tasks:
    if variable == "TF_CONFIG":
      value = {"cluster": cluster, "task": {"type": task_type, "index": index}}
    else:  # Vertex AI: workerpool0 is the chief, workerpool1 the workers
      pools = {"chief": "workerpool0", "worker": "workerpool1"}
      value = {"cluster": {pools[t]: a for t, a in cluster.items()},
               "task": {"type": pools[task_type], "index": index, "trial": ""},
               "environment": "cloud", "job": "{}"}
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "CLUSTER_SPEC")}
    env.update({variable: json.dumps(value), "TF_CPP_MIN_LOG_LEVEL": "2"})
    log = open(os.path.join(model_dir + f".{task_type}{index}.log"), "w")
    processes.append(subprocess.Popen(
        [sys.executable, "-m", "trainer.task", f"--data_dir={data_dir}",
         f"--model_dir={model_dir}", f"--epochs={epochs}", "--batch_size=120",
         "--embedding_dim=8", "--hidden_units=16", "--learning_rate=0.003",
         "--log_every_steps=5", *extra],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True))
    processes[-1].log_path = log.name
  return processes


def _finish(processes, timeout=240):
  results = []
  for p in processes:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in processes:
        q.kill()
      raise
    log = open(p.log_path).read()
    assert p.returncode == 0, f"exit {p.returncode}\n{log[-4000:]}"
    results.append((last_json_line(out), log))
  return results


def _assert_one_model_written_by_the_chief(results, model_dir, replicas):
  (chief, chief_log), others = results[0], results[1:]
  assert chief["replicas"] == replicas
  for metrics, log in others:
    assert metrics["weights_sha256"] == chief["weights_sha256"]  # identical weights
    assert metrics["eval_rmse"] == pytest.approx(chief["eval_rmse"], rel=1e-6)
    assert "is not the chief" in log
  assert "is not the chief" not in chief_log
  with open(os.path.join(model_dir, "metrics.json")) as f:
    assert json.load(f)["task_role"] == chief["task_role"]
  assert tf.saved_model.contains_saved_model(os.path.join(model_dir, "export"))
  leftovers = [os.path.join(d, n) for d, dirs, files in os.walk(model_dir)
               for n in dirs + files if ".workertemp" in n]
  assert not leftovers


def test_two_workers_train_in_sync_and_only_the_chief_writes(data_dir, tmp_path):
  model_dir = str(tmp_path / "model")
  results = _finish(_start([("worker", 0), ("worker", 1)], data_dir, model_dir, epochs=2,
                           extra=("--checkpoint_every_secs=0.05",)))
  assert results[0][0]["task_role"] == "worker:0"
  _assert_one_model_written_by_the_chief(results, model_dir, replicas=2)
  # Clock-driven checkpoints: the tasks' clocks differ, yet they agree on when to save (a
  # task saving alone would hang the others in their next collective).
  saved = [[line.split("Saved checkpoint ")[1] for line in log.splitlines()
            if "Saved checkpoint" in line] for _, log in results]
  assert saved[0] and saved[0] == saved[1]


def test_vertex_cluster_spec_with_chief_and_two_workers(data_dir, tmp_path):
  model_dir = str(tmp_path / "model")
  tasks = [("chief", 0), ("worker", 0), ("worker", 1)]
  results = _finish(_start(tasks, data_dir, model_dir, epochs=1, variable="CLUSTER_SPEC"))
  assert results[0][0]["task_role"] == "chief:0"
  _assert_one_model_written_by_the_chief(results, model_dir, replicas=3)


def test_a_killed_worker_fails_the_job_and_a_restart_resumes(data_dir, tmp_path):
  model_dir = str(tmp_path / "model")
  tasks = [("chief", 0), ("worker", 0)]
  processes = _start(tasks, data_dir, model_dir, epochs=400)
  checkpoints = os.path.join(model_dir, "checkpoints")
  deadline = time.time() + 180
  while len(tf.io.gfile.glob(os.path.join(checkpoints, "ckpt-*.index"))) < 2:
    assert time.time() < deadline, open(processes[0].log_path).read()[-3000:]
    assert all(p.poll() is None for p in processes), open(processes[0].log_path).read()[-3000:]
    time.sleep(0.2)
  processes[1].send_signal(signal.SIGKILL)
  try:
    processes[0].communicate(timeout=120)  # must fail, not hang
  except subprocess.TimeoutExpired:
    processes[0].kill()
    pytest.fail("the chief kept running after its peer was killed")
  log = open(processes[0].log_path).read()
  assert processes[0].returncode == 131, log[-3000:]  # retryable for Kubeflow
  assert "lost contact with another task of the cluster" in log
  latest = tf.train.latest_checkpoint(checkpoints)
  done = int(tf.train.load_variable(latest, "epoch/.ATTRIBUTES/VARIABLE_VALUE"))
  assert done >= 2

  # Restart every task with the same command but fewer epochs to go: it resumes, then ends.
  results = _finish(_start(tasks, data_dir, model_dir, epochs=done + 1))
  assert f"Resumed from {latest} (epoch {done} of" in results[0][1]
  assert results[0][0]["epochs"] == done + 1
  assert results[1][0]["weights_sha256"] == results[0][0]["weights_sha256"]


@pytest.mark.parametrize("value,message", [
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}',
     "TF_CONFIG: task index 3 is out of range for the 1 worker task(s)"),
])
def test_malformed_tf_config_is_a_start_up_error(data_dir, tmp_path, value, message):
  env = dict(os.environ, TF_CONFIG=value, TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run([sys.executable, "-m", "trainer.task", f"--data_dir={data_dir}",
                           f"--model_dir={tmp_path}/m"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert message in result.stderr


def test_a_diverging_run_stops_every_worker_with_exit_code_3(data_dir, tmp_path):
  model_dir = str(tmp_path / "model")
  processes = _start([("worker", 0), ("worker", 1)], data_dir, model_dir, epochs=2,
                     extra=("--optimizer=sgd", "--learning_rate=1e30", "--log_every_steps=1",
                            "--checkpoint_every_secs=0"))
  for p in processes:  # the loss is reduced across the workers: each stops at the same step
    try:
      p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in processes:
        q.kill()
      pytest.fail("a worker kept running after the loss diverged")
    log = open(p.log_path).read()
    assert p.returncode == 3, log[-3000:]
    assert "training diverged: the mean training loss of steps" in log
  assert not os.path.exists(os.path.join(model_dir, "metrics.json"))
  assert not os.path.exists(os.path.join(model_dir, "export"))
