"""A run's model_dir (trainer/run_dir.py): config.json round trips, and a directory of another
run is refused, naming what differs, unless --overwrite."""

import dataclasses
import json

import pytest
import tensorflow as tf

from trainer import run_dir
from trainer.config import TrainConfig
from trainer.errors import ConfigError


def _run_in(tmp_path, **changes) -> TrainConfig:
  return dataclasses.replace(TrainConfig(data_dir="d", model_dir=str(tmp_path / "m"),
                                         model="mf", embedding_dim=8), **changes)


def _with_checkpoint(config: TrainConfig) -> None:
  """The model_dir of a run that wrote config.json and one checkpoint."""
  tf.io.gfile.makedirs(config.model_dir)
  with open(f"{config.model_dir}/{run_dir.CONFIG_FILE}", "w") as f:
    f.write(config.to_json())
  tf.train.Checkpoint(v=tf.Variable(1.0)).save(f"{config.resolved_checkpoint_dir}/ckpt")


def test_config_json_round_trips(tmp_path):
  config = _run_in(tmp_path, layers=(16, 8), target_metric="rmse", target_value=0.9)
  _with_checkpoint(config)
  assert run_dir.load_config(config.model_dir) == config
  with pytest.raises(ConfigError, match="holds no config.json: not a model_dir of neumf-train"):
    run_dir.load_config(str(tmp_path / "elsewhere"))


def test_a_model_dir_of_another_run_is_refused_naming_what_differs(tmp_path):
  before = _run_in(tmp_path)
  assert run_dir.check_compatible(before)  # nothing there yet: a fresh start
  _with_checkpoint(before)
  assert run_dir.check_compatible(dataclasses.replace(before, epochs=9, learning_rate=0.5))
  with pytest.raises(ConfigError, match=r"holds checkpoints of a different run \(model='mf' "
                     r"there, 'gmf' now; embedding_dim=8 there, 16 now\): use another "
                     r"--model_dir, or --overwrite"):
    run_dir.check_compatible(dataclasses.replace(before, embedding_dim=16, model="gmf"))
  assert not run_dir.check_compatible(dataclasses.replace(before, model="gmf", overwrite=True))


def test_a_field_an_older_version_did_not_write_counts_as_its_default(tmp_path):
  config = _run_in(tmp_path)
  _with_checkpoint(config)
  path = f"{config.model_dir}/{run_dir.CONFIG_FILE}"
  older = {k: v for k, v in json.loads(open(path).read()).items() if k != "ps_shards"}
  with open(path, "w") as f:
    json.dump(older, f)
  assert run_dir.check_compatible(config)
  with pytest.raises(ConfigError, match="ps_shards=0 there, 2 now"):
    run_dir.check_compatible(dataclasses.replace(config, ps_shards=2))
