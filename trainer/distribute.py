"""Choosing a `tf.distribute` strategy, and splitting the CPU into logical devices.

Logical CPU devices let tests and debug runs exercise multi-replica code (MirroredStrategy)
on a machine without GPUs. They must be configured before TensorFlow initialises its devices,
that is before the first op runs.
"""

from typing import List

import tensorflow as tf
from absl import logging


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


def _names(devices) -> List[str]:
  return [d.name for d in devices]


def get_strategy(name: str = "auto", num_cpu_devices: int = 1) -> tf.distribute.Strategy:
  """Returns the strategy for `name`.

  auto: MirroredStrategy over all local GPUs when there are several, over `num_cpu_devices`
  logical CPUs when that is more than one, else the default strategy (one device, which is the
  GPU when there is one). mirrored: MirroredStrategy over the GPUs, or the logical CPUs.
  default: the default strategy.
  """
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
    raise ValueError(f"--strategy={name!r} is not a known strategy")
  logging.info("Strategy %s with %d replica(s)", type(strategy).__name__,
               strategy.num_replicas_in_sync)
  return strategy
