"""Input from the tf.data service (`--input_service`): the served epoch through a real
dispatcher and data workers, and parameter-server clusters of local processes whose data
workers, training workers or chief are killed (`trainer.input_service` says what is exact)."""

import collections
import json
import os
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from conftest import REPO_ROOT, last_json_line
from parameter_server_test import FLAGS as PS_FLAGS
from trainer import localhost, schema
from trainer.config import ConfigError, PrepareConfig, TrainConfig
from trainer.data import artifacts, pipeline, preparation


def _training_pairs(data_dir):
  """The training set as a multiset of (user, item, rating)."""
  got = collections.Counter()
  for batch in pipeline.make_dataset(artifacts.PreparedData(data_dir).train_pattern, 4096,
                                     training=False):
    got.update(zip(batch[schema.USER].numpy().tolist(), batch[schema.ITEM].numpy().tolist(),
                   batch[schema.RATING].numpy().tolist()))
  return got


@pytest.fixture(scope="module")
def implicit_data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("served"))
  preparation.prepare(PrepareConfig(output_dir=out, num_users=200, num_items=80,
                                    num_ratings=3000, implicit=True, num_shards=5, seed=2))
  return out


def test_two_consumers_of_a_served_epoch_get_each_training_example_exactly_once(
    implicit_data):
  done = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "tests", "served_epoch_check.py"),
       implicit_data, "3", "2"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO_ROOT))
  assert done.returncode == 0, done.stderr[-3000:]
  epochs = json.loads(done.stdout.strip().splitlines()[-1])
  expected = _training_pairs(implicit_data)
  orders = []
  for consumers in epochs:
    got = collections.Counter()
    for batches in consumers:
      for b in batches:
        got.update(zip(b["user"], b["item"], b["rating"]))
        assert b["size"] == 4 * len(b["user"])  # each positive with its 3 negatives
    assert got == expected  # every example once: none missed, none repeated
    # Both consumers trained (a shared job, first come first served); batches are full but
    # for each data worker's last of the epoch.
    assert all(consumers), [len(c) for c in consumers]
    sizes = [len(b["user"]) for c in consumers for b in c]
    assert sum(s < 64 for s in sizes) <= 2
    orders.append([(u, i) for c in consumers for b in c for u, i in zip(b["user"], b["item"])])
  assert orders[0] != orders[1]  # each epoch shuffled anew


def test_a_batch_key_is_its_examples_whatever_their_order():
  users, items = tf.constant([3, 1, 2, 7], tf.int64), tf.constant([5, 5, 0, 9], tf.int64)
  key = pipeline.content_key({schema.USER: users, schema.ITEM: items})
  order = tf.constant([2, 0, 3, 1])
  shuffled = {schema.USER: tf.gather(users, order), schema.ITEM: tf.gather(items, order)}
  assert int(pipeline.content_key(shuffled)) == int(key)
  swapped = {schema.USER: items, schema.ITEM: users}  # pairs, not the bag of IDs
  assert int(pipeline.content_key(swapped)) != int(key)
  assert int(pipeline.content_key(shuffled, salt=1)) != int(key)


def test_the_flags_of_the_service_are_checked():
  base = dict(data_dir="d", model_dir="m")
  with pytest.raises(ConfigError, match="--data_workers=2 needs --input_service"):
    TrainConfig(**base, data_workers=2).validate()
  with pytest.raises(ConfigError, match="--input_service_port=70000 is not a port"):
    TrainConfig(**base, input_service=True, input_service_port=70000).validate()


def test_the_service_without_a_parameter_server_cluster_is_refused(tiny_data_dir, tmp_path):
  from conftest import run_cli
  done = run_cli("trainer.task", f"--data_dir={tiny_data_dir}",
                 f"--model_dir={tmp_path / 'm'}", "--input_service", "--epochs=1", check=False)
  assert done.returncode == 2
  assert "--input_service needs a parameter-server cluster" in done.stderr


# ----------------------------------------------------------------------------- clusters

# The parameter-server tests' flags (a later flag wins), on the service, with smaller steps.
FLAGS = (*PS_FLAGS, "--batch_size=50", "--log_every_steps=4", "--input_service")


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
  """Epochs of ~300 steps of 50 over 8 files: long enough to kill a task mid-epoch."""
  out = str(tmp_path_factory.mktemp("long"))
  preparation.prepare(PrepareConfig(output_dir=out, num_users=400, num_items=150,
                                    num_ratings=17000, num_shards=8, seed=6))
  return out


class Cluster:
  """A chief, workers and ps tasks (`parameter_server_test`), with the dispatcher at a fixed
  port (a restarted chief serves it again there) and `data_workers` data-only processes."""

  def __init__(self, data_dir, model_dir, workers=2, ps=1, data_workers=0, extra=()):
    from parameter_server_test import local_cluster
    self.data_dir, self.model_dir = data_dir, model_dir
    self.cluster = local_cluster(workers, ps)
    self.port, *self.ports = localhost.free_ports(1 + data_workers)
    self.flags = (*FLAGS, f"--input_service_port={self.port}", "--data_worker_port=0",
                  f"--data_workers={data_workers}", *extra)
    self.data_workers = [self._data_worker(i) for i in range(data_workers)]
    self.tasks = self.start(("ps", "worker", "chief"))

  def _data_worker(self, index):
    log = open(f"{self.model_dir}.data_worker{index}.log", "a")
    return subprocess.Popen(
        [sys.executable, "-m", "trainer.input_service", "--dispatcher",
         f"127.0.0.1:{self.port}", "--host", "127.0.0.1", "--port", str(self.ports[index])],
        cwd=REPO_ROOT, stderr=log,
        stdout=subprocess.DEVNULL, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))

  def restart_data_worker(self, index):
    """Kills data worker `index` and starts it again at its address, as Kubernetes would."""
    self.data_workers[index].kill()
    self.data_workers[index].wait()
    self.data_workers[index] = self._data_worker(index)

  def start(self, roles):
    from parameter_server_test import start_tasks
    return start_tasks(self.cluster, roles, self.data_dir, self.model_dir, self.flags)

  @property
  def chief(self):
    return self.tasks[-1]

  def wait_for(self, pattern, timeout=300, after=0, log=None):
    """Waits until the chief's log (or `log`), from offset `after`, has a line matching
    `pattern`; returns the log's length then."""
    import re
    path = log or self.chief.log_path
    deadline = time.time() + timeout
    while time.time() < deadline:
      text = open(path).read()
      if re.search(pattern, text[after:]):
        return len(text)
      assert self.chief.poll() is None, open(self.chief.log_path).read()[-3000:]
      time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in {path} within {timeout} s")

  def finish(self, timeout=400):
    chief = self.chief
    try:
      out, _ = chief.communicate(timeout=timeout)
    finally:
      self.stop()
    assert chief.returncode == 0, open(chief.log_path).read()[-5000:]
    return last_json_line(out)

  def stop(self):
    for p in [*self.tasks, *self.data_workers]:
      p.kill()
      p.wait()


def _last(pattern, text):
  import re
  return [int(n) for n in re.findall(pattern, text)][-1]


@pytest.mark.slow
def test_a_lost_data_worker_or_chief_costs_examples_never_repeats_them_and_training_goes_on(
    long_data, tmp_path):
  """One training worker, two data-only workers, three epochs (one cluster for both faults:
  each start costs half a minute here).

  Epoch 1: a data worker killed and restarted at its address (as Kubernetes restarts it):
  training goes on, the epoch ends short by what the worker held, or, TensorFlow 2.21's
  dispatcher may end a job early once a worker of it was lost, by more; never repeating, and
  the miss is logged (a worker that held nothing yet, as its peer may have taken all files
  of this small epoch into its buffers, costs nothing).

  Epoch 2: the chief (and with it the dispatcher) killed after a mid-epoch checkpoint and
  started again with the same command: its dispatcher restores the epoch's job from the
  journal, the chief its checkpoint, and the epoch goes on where the job was: what the lost
  chief trained after its checkpoint is missed, and little more (had the job started over,
  the epoch would have found all its examples again). Epoch 3 is whole."""
  expected = artifacts.PreparedData(long_data).metadata.num_train
  model_dir = str(tmp_path / "model")
  cluster = Cluster(long_data, model_dir, workers=1, data_workers=2,
                    extra=("--epochs=3", "--checkpoint_every_steps=40",
                           "--shuffle_buffer_blocks=2"))
  try:
    for index in range(2):  # registered (the line comes once the dispatcher has it)
      cluster.wait_for("data worker of", log=f"{model_dir}.data_worker{index}.log")
    cluster.wait_for(r"epoch 1/3 examples \d+/")
    cluster.restart_data_worker(0)
    at = cluster.wait_for(r"Saved checkpoint \d+ \(epoch 2, ")
    cluster.wait_for(r"epoch 2/3 examples \d+/", after=at)
    cluster.chief.kill()
    cluster.chief.wait()
    first = open(cluster.chief.log_path).read()
    saved = _last(r"Saved checkpoint \d+ \(epoch 2, (\d+) of", first)
    reached = _last(r"epoch 2/3 examples (\d+)/", first)
    assert saved < reached < expected, (saved, reached)
    cluster.tasks[-1:] = cluster.start(("chief",))
    metrics = cluster.finish()
  finally:
    cluster.stop()
  if f"Epoch 1 trained each of the {expected} training examples once" not in first:
    epoch_1 = _last(r"Epoch 1 trained (\d+) of the", first)  # what the lost worker held
    assert 0 < epoch_1 < expected
    assert (f"Epoch 1 trained {epoch_1} of the {expected} training examples: "
            f"{expected - epoch_1} missed") in first
  assert "Resumed from" in open(cluster.chief.log_path).read()
  counts = metrics["input_service"]["examples_per_epoch"]  # the epochs this chief trained
  assert sorted(counts) == ["2", "3"] and counts["3"] == expected
  assert metrics["input_service"]["missed"] == expected - counts["2"]
  # Missed in epoch 2: what was trained after the checkpoint (at least what the log showed),
  # and what the lost chief's consumers and the data workers held (here under two files).
  assert reached - saved <= expected - counts["2"] <= 2 * 2048, (counts, saved, reached)
  assert metrics["eval_rmse"] < 0.9 * metrics["eval_rmse_global_mean_baseline"]
