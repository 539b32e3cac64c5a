"""Typed, frozen configurations of preparation and training.

The command-line modules build these from flags; library code and tests take them as values.
Single-field limits are also enforced by the flags' validators; `validate()` holds every rule, so
a config built in code is checked the same way. Errors name the flag and the offending value.
"""

import dataclasses
from typing import Optional

MODELS = ("seed_mlp",)
SOURCES = ("synthetic", "movielens")
SPLITS = ("random",)
STRATEGIES = ("auto", "default", "mirrored", "multi_worker_mirrored")


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the flag and the value."""


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  """How to turn a rating log into a prepared data directory."""

  output_dir: str
  source: str = "synthetic"
  input: Optional[str] = None
  num_shards: int = 4
  eval_fraction: float = 0.1
  split: str = "random"
  seed: int = 0
  # Synthetic source only.
  num_users: int = 1000
  num_items: int = 500
  num_ratings: int = 50_000
  rank: int = 4
  noise: float = 0.35

  def validate(self) -> "PrepareConfig":
    _require(bool(self.output_dir), "--output_dir is required")
    _require(self.source in SOURCES,
             f"--source={self.source!r} is not one of {', '.join(SOURCES)}")
    _require(self.split in SPLITS, f"--split={self.split!r} is not one of {', '.join(SPLITS)}")
    if self.source == "synthetic":
      _require(self.input is None,
               f"--input={self.input!r} is given but --source=synthetic reads no input")
      for name in ("num_users", "num_items", "num_ratings", "rank"):
        value = getattr(self, name)
        _require(value >= 1, f"--{name}={value} must be at least 1")
      _require(self.noise >= 0, f"--noise={self.noise} must not be negative")
    else:
      _require(bool(self.input), f"--input is required with --source={self.source}")
    _require(self.num_shards >= 1, f"--num_shards={self.num_shards} must be at least 1")
    _require(0.0 < self.eval_fraction < 1.0,
             f"--eval_fraction={self.eval_fraction} must be strictly between 0 and 1")
    return self


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How to train, evaluate and export one model."""

  data_dir: str
  model_dir: str
  export_dir: Optional[str] = None  # None: <model_dir>/export
  checkpoint_dir: Optional[str] = None  # None: <model_dir>/checkpoints
  log_dir: Optional[str] = None  # None: <model_dir>/logs
  model: str = "seed_mlp"
  epochs: int = 3
  batch_size: int = 1024  # global, across all replicas
  eval_batch_size: int = 8192
  learning_rate: float = 1e-3
  embedding_dim: int = 64
  hidden_units: int = 256
  seed: int = 0
  shuffle_buffer_blocks: int = 256  # records of BLOCK_SIZE examples each
  log_every_steps: int = 100
  max_checkpoints: int = 3
  strategy: str = "auto"
  num_cpu_devices: int = 1

  @property
  def resolved_export_dir(self) -> str:
    from trainer import fileio  # local import: config stays free of TensorFlow
    return self.export_dir or fileio.join(self.model_dir, "export")

  @property
  def resolved_checkpoint_dir(self) -> str:
    from trainer import fileio
    return self.checkpoint_dir or fileio.join(self.model_dir, "checkpoints")

  @property
  def resolved_log_dir(self) -> str:
    from trainer import fileio
    return self.log_dir or fileio.join(self.model_dir, "logs")

  def validate(self) -> "TrainConfig":
    _require(bool(self.data_dir), "--data_dir is required")
    _require(bool(self.model_dir), "--model_dir is required")
    _require(self.model in MODELS, f"--model={self.model!r} is not one of {', '.join(MODELS)}")
    _require(self.strategy in STRATEGIES,
             f"--strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
    for name in ("epochs", "batch_size", "eval_batch_size", "embedding_dim", "hidden_units",
                 "shuffle_buffer_blocks", "log_every_steps", "max_checkpoints",
                 "num_cpu_devices"):
      value = getattr(self, name)
      _require(value >= 1, f"--{name}={value} must be at least 1")
    _require(self.learning_rate > 0, f"--learning_rate={self.learning_rate} must be positive")
    _require(not (self.strategy == "default" and self.num_cpu_devices > 1),
             f"--strategy=default uses one device but --num_cpu_devices={self.num_cpu_devices}; "
             "use --strategy=mirrored or auto")
    return self

  def check_replicas(self, num_replicas: int) -> None:
    """Cross-checks the global batch size against the strategy's replica count."""
    _require(self.batch_size % num_replicas == 0,
             f"--batch_size={self.batch_size} is not divisible by the {num_replicas} replicas")

  def eval_batch_for(self, num_replicas: int) -> int:
    """The global eval batch: --eval_batch_size rounded down to a multiple of the replicas
    (evaluation sums over examples, so the batch size does not change its result)."""
    return max(num_replicas, self.eval_batch_size - self.eval_batch_size % num_replicas)
