"""Exact resume: the real trainer process SIGKILLed at random points, restarted, and compared.

A run killed several times (at random moments, mid-epoch, and inside a checkpoint write) and
restarted each time with the same command must end with the same metrics and the same weights,
bit for bit, as one uninterrupted run: with --deterministic on CPU nothing else is acceptable.
The model covers every kind of saved state: NeuMF with dropout (random generator states),
lazy Adam with warm-up and decay (optimizer slots, step count), sampled negatives (keyed by the
step) and the input pipeline's position mid-epoch.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, last_json_line, run_cli

pytestmark = pytest.mark.slow

# Large enough tables (~20 MB per checkpoint with Adam slots) that a checkpoint write lasts
# tens of milliseconds and can be caught in the act; small enough to train in seconds.
DATA_FLAGS = ("--source=synthetic", "--num_users=20000", "--num_items=3000",
              "--num_ratings=30000", "--num_shards=2", "--eval_fraction=0.02", "--seed=11")
BATCH = 3 * 128  # 128 positives + 2 negatives each
TRAIN_FLAGS = ("--model=neumf", "--task=implicit", "--num_negatives=2", "--dropout=0.2",
               "--embedding_dim=32", "--mlp_embedding_dim=32", "--layers=32,16",
               "--optimizer=lazy_adam", "--learning_rate=0.003", "--warmup_steps=20",
               "--decay=cosine", f"--batch_size={BATCH}", "--epochs=2", "--deterministic",
               "--checkpoint_every_steps=5", "--log_every_steps=5", "--seed=5",
               "--eval_batch_size=1024")
# What must match exactly (timings may differ).
COMPARED = ("eval_hr_full", "eval_ndcg_full", "weights_sha256", "best_epoch", "epochs")


def train_command(data_dir: str, model_dir: str, *extra: str):
  return [sys.executable, "-m", "trainer.task", f"--data_dir={data_dir}",
          f"--model_dir={model_dir}", *TRAIN_FLAGS, *extra]


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("resume") / "data")
  run_cli("trainer.prepare", f"--output_dir={data_dir}", *DATA_FLAGS)
  return data_dir


@pytest.fixture(scope="module")
def uninterrupted(resume_data, tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("uninterrupted"))
  result = run_cli("trainer.task", *train_command(resume_data, model_dir)[3:])
  return last_json_line(result.stdout)


class Run:
  """One training process whose log can be watched while it runs."""

  def __init__(self, command, log_path: str, env=None):
    self.log_path = log_path
    with open(log_path, "w") as log:
      self.process = subprocess.Popen(
          command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {})))

  def log(self) -> str:
    with open(self.log_path) as f:
      return f.read()

  def wait_for(self, predicate, timeout: float = 300, poll: float = 0.05) -> bool:
    """Waits until predicate() holds; False if the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
      if predicate():
        return True
      if self.process.poll() is not None:
        return False
      time.sleep(poll)
    raise AssertionError(f"timed out; log:\n{self.log()[-3000:]}")

  def kill(self) -> None:
    self.process.send_signal(signal.SIGKILL)
    self.process.wait()

  def finish(self, timeout: float = 600):
    stdout, _ = self.process.communicate(timeout=timeout)
    assert self.process.returncode == 0, self.log()[-5000:]
    return last_json_line(stdout)


def _checkpoint_in_progress(checkpoint_dir: str) -> bool:
  try:
    return any(name.endswith("_temp") for name in os.listdir(checkpoint_dir))
  except FileNotFoundError:
    return False


def test_a_run_killed_at_random_points_ends_exactly_as_an_uninterrupted_one(
    resume_data, uninterrupted, tmp_path):
  model_dir = str(tmp_path / "model")
  checkpoints = os.path.join(model_dir, "checkpoints")
  rng = random.Random(20261128)
  command = train_command(resume_data, model_dir)
  kills = ["random", "during_checkpoint_write", "random", "random"]
  logs = []
  for n, kind in enumerate(kills):
    run = Run(command, str(tmp_path / f"run{n}.log"))
    logs.append(run.log_path)
    # Let it get past start-up and resume into training first.
    assert run.wait_for(lambda: " step " in run.log()), run.log()[-3000:]
    if kind == "random":
      time.sleep(rng.uniform(0.0, 2.0))
    else:
      assert run.wait_for(lambda: _checkpoint_in_progress(checkpoints), poll=0.001)
    if run.process.poll() is not None:
      pytest.fail(f"run {n} finished before it could be killed; log:\n{run.log()[-3000:]}")
    run.kill()
  final = Run(command, str(tmp_path / "final.log"))
  result = final.finish()
  resumed = [line for path in logs[1:] + [final.log_path] for line in open(path)
             if "Resumed from" in line]
  assert len(resumed) == len(kills), "every restart resumed from a checkpoint"
  # At least one restart continued mid-epoch (not at an epoch boundary).
  steps_per_epoch = json.loads(open(os.path.join(resume_data, "metadata.json")).read())
  steps_per_epoch = steps_per_epoch["num_train"] // (BATCH // 3)
  steps = [int(line.rsplit("step ", 1)[1].rstrip(")\n")) for line in resumed]
  assert any(s % steps_per_epoch for s in steps), steps
  for key in COMPARED:
    assert result[key] == uninterrupted[key], key
