"""Choosing a `tf.distribute` strategy; cluster discovery; who writes; logical CPU devices.

Clusters are described by `TF_CONFIG` (as Kubeflow's TFJob and most launchers set it: tasks of
type chief/worker) or by Vertex AI's `CLUSTER_SPEC` (worker pools `workerpool0..3`), which is
translated to the same thing. In a cluster only the chief writes final artifacts; other workers
write to temporary paths beside them and delete them (the Keras/TensorFlow convention), because
saving may involve collectives that every worker must join.

Logical CPU devices let tests and debug runs exercise multi-replica code (MirroredStrategy)
on a machine without GPUs. They must be configured before TensorFlow initialises its devices,
that is before the first op runs.
"""

import json
import os
from typing import Any, Dict, List, Mapping, Optional

import tensorflow as tf
from absl import logging

from trainer import fileio, parameter_server
from trainer.config import ConfigError

# Vertex AI worker pools, in order, and the TF_CONFIG task types they play.
_VERTEX_POOLS = {"workerpool0": "chief", "workerpool1": "worker", "workerpool2": "ps",
                 "workerpool3": "evaluator"}
_TASK_TYPES = ("chief", "worker", "ps", "evaluator")


def _check_cluster(config: Any, source: str) -> Dict[str, Any]:
  """Validates a TF_CONFIG-shaped dict; errors name the variable and the offending part."""
  if not isinstance(config, dict):
    raise ConfigError(f"{source} must be a JSON object, got {config!r}")
  cluster, task = config.get("cluster"), config.get("task")
  if not isinstance(cluster, dict) or not cluster:
    raise ConfigError(f"{source} has no 'cluster' object of task lists: {json.dumps(config)}")
  for task_type, addresses in cluster.items():
    if task_type not in _TASK_TYPES:
      raise ConfigError(f"{source}: cluster task type {task_type!r} is not one of "
                        f"{', '.join(_TASK_TYPES)}")
    if task_type == "ps" and addresses == []:
      raise ConfigError(f"{source}: cluster['ps'] is empty: parameter-server training needs at "
                        "least one ps task (or drop 'ps' for MultiWorkerMirroredStrategy)")
    if (not isinstance(addresses, list) or not addresses
        or not all(isinstance(a, str) and ":" in a for a in addresses)):
      raise ConfigError(f"{source}: cluster[{task_type!r}] must be a list of 'host:port', "
                        f"got {addresses!r}")
  if not isinstance(task, dict) or "type" not in task or "index" not in task:
    raise ConfigError(f"{source} has no 'task' with 'type' and 'index': {json.dumps(config)}")
  if task["type"] not in cluster:
    raise ConfigError(f"{source}: task type {task['type']!r} is not in the cluster "
                      f"({', '.join(cluster)})")
  if not isinstance(task["index"], int) or not 0 <= task["index"] < len(cluster[task["type"]]):
    raise ConfigError(f"{source}: task index {task['index']!r} is out of range for the "
                      f"{len(cluster[task['type']])} {task['type']} task(s)")
  missing = [t for t in ("chief", "worker") if t not in cluster]
  if "ps" in cluster and missing:
    raise ConfigError(f"{source} lists 'ps' tasks but no {missing[0]} task: parameter-server "
                      "training needs a chief (it coordinates), at least one worker and at "
                      "least one ps task")
  return {"cluster": cluster, "task": {"type": task["type"], "index": task["index"]}}


def cluster_config(environ: Optional[Mapping[str, str]] = None) -> Optional[Dict[str, Any]]:
  """Returns the cluster as a TF_CONFIG dict, from TF_CONFIG or else Vertex AI's CLUSTER_SPEC.

  Returns None when neither is set (a single machine).

  Raises:
    ConfigError: the variable is not valid JSON or does not describe a consistent cluster.
  """
  environ = os.environ if environ is None else environ
  for name in ("TF_CONFIG", "CLUSTER_SPEC"):
    text = environ.get(name, "").strip()
    if not text:
      continue
    try:
      config = json.loads(text)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{name} is not valid JSON ({e}): {text[:200]!r}") from None
    if name == "CLUSTER_SPEC":
      if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise ConfigError(f"CLUSTER_SPEC has no 'cluster' object: {text[:200]!r}")
      unknown = sorted(set(config["cluster"]) - set(_VERTEX_POOLS))
      if unknown:
        raise ConfigError(f"CLUSTER_SPEC: unknown worker pools {unknown} (expected "
                          f"{', '.join(_VERTEX_POOLS)})")
      task = config.get("task") or {}
      config = {"cluster": {_VERTEX_POOLS[p]: a for p, a in config["cluster"].items()},
                "task": {"type": _VERTEX_POOLS.get(task.get("type"), task.get("type")),
                         "index": task.get("index")}}
    return _check_cluster(config, name)
  return None


def num_cluster_tasks(config: Optional[Dict[str, Any]]) -> int:
  """Counts the training tasks (chief and workers) of a cluster; 1 without one."""
  if not config:
    return 1
  return sum(len(config["cluster"].get(t, [])) for t in ("chief", "worker"))


def uses_parameter_servers(name: str, cluster: Optional[Dict[str, Any]]) -> bool:
  """Whether --strategy=`name` over `cluster` is parameter-server training: `parameter_server`,
  or `auto` with ps tasks in the cluster.

  Raises:
    ConfigError: parameter_server without ps tasks, or ps tasks with another strategy.
  """
  has_ps = bool(cluster) and "ps" in cluster["cluster"]
  if name == "parameter_server" and not has_ps:
    raise ConfigError("--strategy=parameter_server needs a cluster with 'ps' tasks in "
                      "TF_CONFIG (or CLUSTER_SPEC's workerpool2)")
  if has_ps and name not in ("auto", "parameter_server"):
    raise ConfigError(f"TF_CONFIG lists 'ps' tasks but --strategy={name}: use "
                      "--strategy=parameter_server (or auto)")
  return has_ps


def configure_cpu_devices(num_devices: int) -> None:
  """Splits the first physical CPU into `num_devices` logical devices.

  Raises:
    RuntimeError: devices were already initialised with a different count.
  """
  if num_devices < 1:
    raise ValueError(f"--num_cpu_devices={num_devices} must be at least 1")
  cpu = tf.config.list_physical_devices("CPU")[0]
  current = tf.config.get_logical_device_configuration(cpu)
  if num_devices == 1 and not current:
    return
  if current is not None and len(current) == num_devices:
    return
  try:
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)])
  except RuntimeError as e:
    have = len(tf.config.list_logical_devices("CPU"))
    if have != num_devices:
      raise RuntimeError(f"--num_cpu_devices={num_devices}: TensorFlow already started with "
                         f"{have} CPU devices; configure devices before any op runs") from e


# Take the code paths chosen for GPUs on a machine without one (tests and debugging).
GPU_CODE_PATHS_VARIABLE = "NEUMF_GPU_CODE_PATHS"


def gpu_code_paths() -> bool:
  """Whether to build the graphs chosen for GPUs: a GPU is visible, or
  NEUMF_GPU_CODE_PATHS=1 asks for them on CPUs (where each still runs, only slower)."""
  return (os.environ.get(GPU_CODE_PATHS_VARIABLE) == "1"
          or bool(tf.config.list_logical_devices("GPU")))


def local_variable(variable: tf.Variable) -> tf.Variable:
  """`variable`, or under a strategy the copy of the current replica (or of the device an
  optimizer update runs on): the one to gather rows from.

  `tf.gather` reads rows of a plain variable (ResourceGather) but has no such path for a
  distributed one: it reads the whole table into a tensor first, a copy of every table each
  step (twice as slow: README, "Design choices, measured"). tf.distribute has no public
  accessor for the local copy.
  """
  local = getattr(variable, "_get_on_device_or_primary", None)
  return local() if local is not None else variable


def _names(devices) -> List[str]:
  return [d.name for d in devices]


def get_strategy(name: str = "auto", num_cpu_devices: int = 1,
                 environ: Optional[Mapping[str, str]] = None, ps_shards: int = 0,
                 ps_shard_min_mb: float = 16.0) -> tf.distribute.Strategy:
  """Returns the strategy for `name`.

  auto: MultiWorkerMirroredStrategy when TF_CONFIG (or CLUSTER_SPEC) lists more than one task;
  else MirroredStrategy over all local GPUs when there are several, over `num_cpu_devices`
  logical CPUs when that is more than one; else the default strategy (one device, the GPU when
  there is one). mirrored: MirroredStrategy over the GPUs, or the logical CPUs.
  multi_worker_mirrored: MultiWorkerMirroredStrategy over the cluster (one task without one).
  default: the default strategy. parameter_server (auto when the cluster has ps tasks): on
  the chief, ParameterServerStrategy with the ID tables in `ps_shards` shards (0: shards of at
  least `ps_shard_min_mb` MiB, at most one per ps task); ps and worker tasks only serve
  (`parameter_server.serve`), they never call this.

  Raises:
    ConfigError: an unknown name, or a malformed cluster description.
  """
  cluster = cluster_config(environ)
  if uses_parameter_servers(name, cluster):
    strategy = parameter_server.make_strategy(cluster, ps_shards, ps_shard_min_mb)
    _log_strategy(strategy)
    return strategy
  if name == "auto" and num_cluster_tasks(cluster) > 1:
    name = "multi_worker_mirrored"
  if name == "multi_worker_mirrored":  # before anything initialises the TensorFlow context
    resolver = None
    if cluster:
      resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
          tf.train.ClusterSpec(cluster["cluster"]), task_type=cluster["task"]["type"],
          task_id=cluster["task"]["index"], rpc_layer="grpc")
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    _log_strategy(strategy)
    return strategy
  gpus = tf.config.list_logical_devices("GPU")
  cpus = tf.config.list_logical_devices("CPU")[:num_cpu_devices]
  if name == "auto":
    name = "mirrored" if len(gpus) > 1 or num_cpu_devices > 1 else "default"
  if name == "default":
    strategy = tf.distribute.get_strategy()
  elif name == "mirrored":
    devices = _names(gpus) if gpus else _names(cpus)
    strategy = tf.distribute.MirroredStrategy(devices)
  else:
    raise ConfigError(f"--strategy={name!r} is not a known strategy")
  _log_strategy(strategy)
  return strategy


def _log_strategy(strategy: tf.distribute.Strategy) -> None:
  logging.info("Strategy %s with %d replica(s); this task: %s%s", type(strategy).__name__,
               strategy.num_replicas_in_sync, task_role(strategy),
               " (chief)" if is_chief(strategy) else "")


def _task(strategy: tf.distribute.Strategy):
  # ParameterServerStrategy keeps its resolver to itself (its `cluster_resolver` is None).
  resolver = (getattr(strategy, "cluster_resolver", None)
              or getattr(strategy, "_cluster_resolver", None))
  if resolver is None or not resolver.cluster_spec().as_dict():
    return None, None, {}
  return resolver.task_type, resolver.task_id, resolver.cluster_spec().as_dict()


def task_role(strategy: tf.distribute.Strategy) -> str:
  """`type:index` of this task in its cluster, or `local` outside a cluster."""
  task_type, task_id, _ = _task(strategy)
  return "local" if task_type is None else f"{task_type}:{task_id}"


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True for the task that writes final artifacts: the chief, else worker 0, else local."""
  task_type, task_id, cluster = _task(strategy)
  if task_type is None:
    return True
  return task_type == "chief" or (task_type == "worker" and task_id == 0
                                  and "chief" not in cluster)


def write_dir(path: str, strategy: tf.distribute.Strategy) -> str:
  """Where this task writes what belongs at `path`: `path` itself on the chief, else a
  temporary sibling unique to the task, to be deleted with `remove_write_dir`."""
  if is_chief(strategy):
    return path
  task_type, task_id, _ = _task(strategy)
  return fileio.join(path, f".workertemp_{task_type}_{task_id}")


def remove_write_dir(path: str, strategy: tf.distribute.Strategy) -> None:
  """Deletes a non-chief task's temporary directory (no-op on the chief)."""
  if not is_chief(strategy) and tf.io.gfile.exists(path):
    tf.io.gfile.rmtree(path)
