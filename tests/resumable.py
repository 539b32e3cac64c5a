"""What the exact-resume tests share: one data set, one training command, a watched process."""

import os
import signal
import subprocess
import sys
import time

from conftest import REPO_ROOT, last_json_line

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


