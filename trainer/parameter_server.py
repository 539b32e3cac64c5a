"""Parameter-server training: ID tables sharded over `ps` tasks, steps scheduled by the chief.

TensorFlow's own engine: `tf.distribute.ParameterServerStrategy` with a variable partitioner
(a table becomes a `ShardedVariable`, its shards spread over the ps tasks) and a
`tf.distribute.coordinator.ClusterCoordinator` on the chief that schedules training steps onto
whichever worker is free. Keras 3's `fit` does not support it (keras-team/keras#18624,
#20585), so the chief runs the same custom loop as other strategies, one scheduled step at a
time.

What shards: the models' ID embedding tables (created under `id_tables()`), and with them
their optimizer slots (a slot is created colocated with its shard, and colocated variables are
never partitioned). Dense layers, feature tables and counters stay whole, placed round-robin
on the ps tasks. A Keras 3 variable over a table holds the `ShardedVariable`; the optimizer
updates the shards themselves (`trainable_leaves`), because Keras's `apply_gradients` on a
`ShardedVariable` fails (no `handle`), and the embedding layer looks rows up shard by shard
(`tf.nn.embedding_lookup`, which `ShardedVariable` dispatches per shard), never reading a
whole table.

Input (without --input_service, which `trainer.input_service` serves): every worker reads
the same seeded stream of global batches and keeps every
num_workers-th one (batch b goes to worker b mod num_workers), so each batch, with its
negatives keyed by its index, is trained once, by one worker. The chief counts the batches
each worker has taken (a step returns its batch's global index); a checkpoint holds the
counts and a resumed run starts each worker where it stopped. What is not reproducible:
which worker takes which step, so the order of updates (and the interleaving of the workers'
streams) varies from run to run.

Tasks of type ps and worker only serve (`serve`): the chief drives them.
"""

import contextlib
import os
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import tensorflow as tf
from absl import logging
# TensorFlow exports no name for the class; its module has held it since TF 2.4.
from tensorflow.python.distribute.sharded_variable import (  # pylint: disable=g-direct-tensorflow-import
    ShardedVariable as _SHARDED_VARIABLE)

from trainer.errors import ConfigError, LostPeerError

_SHARDING = threading.local()


@contextlib.contextmanager
def id_tables():
  """Variables created inside may be partitioned over the ps tasks (the ID tables)."""
  previous = getattr(_SHARDING, "on", False)
  _SHARDING.on = True
  try:
    yield
  finally:
    _SHARDING.on = previous


class TablePartitioner(tf.distribute.experimental.partitioners.Partitioner):
  """Shards variables created under `id_tables()`: into `shards` parts, or (shards=0) into
  parts of at least `min_shard_mb` MiB, at most one per ps task. Anything else stays whole."""

  def __init__(self, num_ps: int, shards: int = 0, min_shard_mb: float = 16.0):
    self.num_ps, self.shards = num_ps, shards
    self._by_size = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=max(1, int(min_shard_mb * 2**20)), max_shards=num_ps)

  def __call__(self, shape, dtype, axis=0):
    whole = [1] * len(shape)
    if not getattr(_SHARDING, "on", False) or len(shape) < 1:
      return whole
    parts = self.shards or self._by_size(shape, dtype, axis)[axis]
    return [min(int(parts), int(shape[0]))] + whole[1:]


def is_parameter_server(strategy: tf.distribute.Strategy) -> bool:
  return isinstance(strategy, tf.distribute.ParameterServerStrategy)


def make_strategy(cluster: Dict[str, Any], shards: int = 0,
                  min_shard_mb: float = 16.0) -> tf.distribute.Strategy:
  """The chief's ParameterServerStrategy over `cluster` (a checked TF_CONFIG dict)."""
  num_ps = len(cluster["cluster"]["ps"])
  if shards > num_ps:
    raise ConfigError(f"--ps_shards={shards} is more than the {num_ps} ps task(s) of the "
                      "cluster")
  _set_threads(cluster)
  _wait_for_tasks(cluster)
  resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
      tf.train.ClusterSpec(cluster["cluster"]), task_type=cluster["task"]["type"],
      task_id=cluster["task"]["index"], rpc_layer="grpc")
  return tf.distribute.ParameterServerStrategy(
      resolver, variable_partitioner=TablePartitioner(num_ps, shards, min_shard_mb))


def _wait_for_tasks(cluster: Dict[str, Any], timeout: float = 600.0) -> None:
  """Waits until every ps and worker task accepts connections: the chief may start first
  (a Kubernetes job starts its pods in any order), and TensorFlow gives up at once.

  Raises:
    LostPeerError: a task did not come up within `timeout` seconds.
  """
  deadline = time.time() + timeout
  for task_type in ("ps", "worker"):
    for index, address in enumerate(cluster["cluster"].get(task_type, [])):
      host, port = address.rsplit(":", 1)
      while True:
        try:
          socket.create_connection((host, int(port)), timeout=2).close()
          break
        except OSError as e:
          if time.time() > deadline:
            raise LostPeerError(f"{task_type}:{index} at {address} did not come up within "
                                f"{timeout:.0f} s ({e})") from None
          time.sleep(0.5)


def _set_threads(cluster: Dict[str, Any]) -> None:
  # Measured on 2 cores: with fewer inter-op threads than workers + 1 the coordinator's
  # remote calls wait on each other and training hangs.
  wanted = len(cluster["cluster"].get("worker", [])) + 2
  if tf.config.threading.get_inter_op_parallelism_threads() < wanted:
    tf.config.threading.set_inter_op_parallelism_threads(wanted)


def serve(cluster: Dict[str, Any], data_worker: Optional[Callable[[str], Any]] = None) -> None:
  """Runs this ps or worker task's server until the process is stopped; a worker task with
  `data_worker` also runs `data_worker(its host)` (a tf.data service data worker, started
  after the server: it waits for the chief's dispatcher, and the chief for the server)."""
  os.environ.setdefault("GRPC_FAIL_FAST", "use_caller")
  _set_threads(cluster)
  task = cluster["task"]
  server = tf.distribute.Server(tf.train.ClusterSpec(cluster["cluster"]),
                                job_name=task["type"], task_index=task["index"],
                                protocol="grpc", start=True)
  logging.info("Serving as %s:%d of a parameter-server cluster at %s", task["type"],
               task["index"], server.target)
  serving = [server]  # each serves while referenced
  if data_worker is not None and task["type"] == "worker":
    serving.append(data_worker(cluster["cluster"]["worker"][task["index"]].rsplit(":", 1)[0]))
  serving[0].join()


def is_sharded(value) -> bool:
  return isinstance(value, _SHARDED_VARIABLE)


def trainable_leaves(variables) -> List[tf.Variable]:
  """What the optimizer updates: each variable, or the shards of a sharded one."""
  leaves = []
  for variable in variables:
    value = getattr(variable, "value", variable)
    leaves.extend(value.variables if is_sharded(value) else [variable])
  return leaves


def shard_layout(model) -> Dict[str, List[List[Any]]]:
  """{table path: [[rows, columns, device] per shard]} of a model's sharded tables."""
  return {v.path: [[*s.shape.as_list(), s.device] for s in v.value.variables]
          for v in model.weights if is_sharded(v.value)}


def num_workers(strategy: tf.distribute.Strategy) -> int:
  return strategy._num_workers  # pylint: disable=protected-access  (no public count)


def per_worker_iterators(coordinator, dataset_fn: Callable, skips: List[int]):
  """An iterator per worker over `dataset_fn(worker_index, skip)` (both int64 scalars), as
  PerWorkerValues for `coordinator.schedule`; the coordinator rebuilds a worker's iterator
  when the worker restarts. `create_per_worker_dataset` builds the same resources through the
  same private calls, but runs one dataset function, with no way to tell the workers apart."""
  scalar = tf.TensorSpec([], tf.int64)
  build = tf.function(dataset_fn).get_concrete_function(scalar, scalar)
  spec = tf.data.IteratorSpec(build.structured_outputs.element_spec)
  iterators = []
  for worker, skip in zip(coordinator._cluster.workers, skips):  # pylint: disable=protected-access
    index = worker.worker_index
    remote = worker.create_resource(
        lambda i=index, s=skip: iter(build(tf.constant(i, tf.int64), tf.constant(s, tf.int64))))
    remote._type_spec = spec  # pylint: disable=protected-access  (as TensorFlow's own does)
    iterators.append(remote)
  return tf.distribute.experimental.coordinator.PerWorkerValues(tuple(iterators))
