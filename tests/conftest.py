"""Shared test set-up.

TensorFlow's CPU is split into two logical devices once, before any op runs, so that tests can
compare one device with MirroredStrategy over two replicas in the same process.
"""

import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

NUM_TEST_CPU_DEVICES = 2
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(NUM_TEST_CPU_DEVICES)])

from trainer.config import PrepareConfig  # noqa: E402
from trainer.data import preparation  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The project's shared data sits beside the repository; NEUMF_SHARED_DATA overrides it.
SHARED_DATA = pathlib.Path(os.environ.get("NEUMF_SHARED_DATA",
                                          REPO_ROOT.parent / "shared" / "data"))


def shared_file(relative: str) -> pathlib.Path:
  """Returns a file of the shared MovieLens data, or skips the test saying why."""
  path = SHARED_DATA / relative
  if not path.exists():
    pytest.skip(f"{path} is absent: MovieLens data cannot be shipped (licence); put a copy in "
                "../shared/data or set NEUMF_SHARED_DATA to run this test")
  return path


TINY = dict(num_users=150, num_items=100, num_ratings=5000, rank=3, noise=0.25, num_shards=2,
            eval_fraction=0.2, seed=7)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> str:
  """A prepared synthetic data directory shared by the whole session (read-only for tests)."""
  out = str(tmp_path_factory.mktemp("tiny_data"))
  preparation.prepare(PrepareConfig(output_dir=out, **TINY))
  return out


def run_cli(module: str, *args: str, check: bool = True, timeout: float = 600,
            env=None) -> subprocess.CompletedProcess:
  """Runs `python -m <module> args...` in a fresh process from the repository root."""
  full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(f"{module} {' '.join(args)} exited {result.returncode}\n"
                         f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}")
  return result


def run_python(code: str) -> None:
  """Runs `code` in a fresh Python process from the repository root; fails with its stderr."""
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr


def last_json_line(text: str):
  """Parses the last line of a CLI's stdout, its JSON result."""
  return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def mirrored_strategy() -> tf.distribute.MirroredStrategy:
  """One MirroredStrategy over the two logical CPUs for the whole session.

  Two MirroredStrategy instances that both run collectives in one process collide on their
  collective instance keys ("Shape mismatch in the collective instance ..."); the product
  creates one strategy per process, and so do the tests.
  """
  return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(scope="session")
def resume_data(tmp_path_factory) -> str:
  """The data of the exact-resume tests (local; gcs_test prepares the same to gs://)."""
  from resumable import DATA_FLAGS
  data_dir = str(tmp_path_factory.mktemp("resume") / "data")
  run_cli("trainer.prepare", f"--output_dir={data_dir}", *DATA_FLAGS)
  return data_dir


@pytest.fixture(scope="session")
def uninterrupted(resume_data, tmp_path_factory):
  """metrics.json of the reference run: never killed, checkpointing every 5 steps."""
  from resumable import train_command
  model_dir = str(tmp_path_factory.mktemp("uninterrupted"))
  result = run_cli("trainer.task", *train_command(resume_data, model_dir)[3:])
  return last_json_line(result.stdout)


class _Resolver:
  def __init__(self, task_type, task_id, cluster):
    self.task_type, self.task_id, self._cluster = task_type, task_id, cluster

  def cluster_spec(self):
    return tf.train.ClusterSpec(self._cluster)


class TaskStrategy:
  """Stands for the strategy of one task of a cluster where only the task's identity matters
  (who is chief, where it writes): a real cluster needs a process per task."""

  def __init__(self, task_type: str, task_id: int, cluster: dict):
    self.cluster_resolver = _Resolver(task_type, task_id, cluster)
