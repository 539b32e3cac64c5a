"""A run's model_dir: its config.json (and whether a new run may continue there), its
metrics.json, the storage it uses, and the trained model it holds."""

import json
from typing import Optional

import keras
import tensorflow as tf

from trainer import distribute, fileio, models
from trainer.checkpointer import restore, start_afresh
from trainer.config import TrainConfig
from trainer.data import artifacts
from trainer.errors import ConfigError


METRICS_FILE = "metrics.json"


CONFIG_FILE = "config.json"


def load_config(model_dir: str) -> TrainConfig:
  """The TrainConfig of a run, from its `<model_dir>/config.json`."""
  path = fileio.join(model_dir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    raise ConfigError(f"{model_dir!r} holds no {CONFIG_FILE}: not a model_dir of neumf-train")
  fields = json.loads(fileio.read_text(path))
  fields["layers"] = tuple(fields["layers"])
  return TrainConfig(**fields)


def load_trained_model(model_dir: str, data: artifacts.PreparedData,
                       checkpoint_dir: Optional[str] = None) -> keras.Model:
  """Rebuilds the model of a finished run from its config.json and latest checkpoint."""
  config = load_config(model_dir)
  model = models.for_config(config, data)
  directory = checkpoint_dir or config.resolved_checkpoint_dir
  latest = tf.train.latest_checkpoint(directory)
  if latest is None:
    raise ConfigError(f"{model_dir!r}: no checkpoint in {directory}")
  restore(tf.train.Checkpoint(model=model), latest, model, partial=True)
  return model


# What a checkpoint's shapes and meaning depend on: a run that differs in any of these cannot
# continue from it.
# ps_shards: under a parameter server each shard has its own optimizer slots, which restore
# only into the same shard count (the model's tables restore into any, or into one device).
_SHAPING_FIELDS = ("data_dir", "model", "task", "embedding_dim", "hidden_units", "layers",
                   "mlp_embedding_dim", "features", "ps_shards")


def check_compatible(config: TrainConfig) -> bool:
  """Whether to resume from `model_dir`; refuses a run of another configuration there.

  Returns:
    False when --overwrite asks to start afresh, else True.

  Raises:
    ConfigError: `model_dir` holds checkpoints of a run whose model or data differ, naming the
      fields and both values.
  """
  path = fileio.join(config.model_dir, CONFIG_FILE)
  if config.overwrite:
    return False
  if not tf.io.gfile.exists(path) or not tf.train.latest_checkpoint(
      config.resolved_checkpoint_dir):
    return True
  # A field that an older version did not write had its default then.
  previous = {**json.loads(TrainConfig(data_dir="", model_dir="").to_json()),
              **json.loads(fileio.read_text(path))}
  current = json.loads(config.to_json())
  differ = [f"{name}={previous.get(name)!r} there, {current[name]!r} now"
            for name in _SHAPING_FIELDS if previous.get(name) != current[name]]
  if differ:
    raise ConfigError(f"--model_dir={config.model_dir!r} holds checkpoints of a different run ("
                      f"{'; '.join(differ)}): use another --model_dir, or --overwrite to "
                      "discard them")
  return True


def check_storage(config: TrainConfig) -> None:
  """Fails fast when a gs:// location of the run is missing or not usable (see fileio)."""
  for flag, path, write in storage_locations(config):
    if path:
      fileio.check_gcs_access(path, flag, write)


def storage_locations(config: TrainConfig):
  """(flag, path, written?) of every location the run reads or writes."""
  return (("data_dir", config.data_dir, False), ("model_dir", config.model_dir, True),
          ("export_dir", config.export_dir, True),
          ("checkpoint_dir", config.checkpoint_dir, True),
          ("tensorboard_dir", config.log_dir, True),
          ("warm_start_from", config.warm_start_from, False),
          ("pretrained_gmf_dir", config.pretrained_gmf_dir, False),
          ("pretrained_mlp_dir", config.pretrained_mlp_dir, False))


def prepare_model_dir(config: TrainConfig, strategy: tf.distribute.Strategy) -> None:
  """Refuses a model_dir of another run; on the chief, clears it (--overwrite) and writes
  config.json."""
  resume = check_compatible(config)
  if not distribute.is_chief(strategy):
    return
  if not resume:
    start_afresh(config)
  fileio.retry(lambda: (fileio.makedirs(config.model_dir), fileio.write_text_atomic(
      fileio.join(config.model_dir, CONFIG_FILE), config.to_json())),
      f"writing {CONFIG_FILE} to {config.model_dir}", config.storage_retries)
