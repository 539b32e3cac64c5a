"""Tests of configuration validation: each rule, with the flag and value in the message."""

import dataclasses

import pytest

from trainer.config import ConfigError, PrepareConfig, TrainConfig

_TRAIN = TrainConfig(data_dir="d", model_dir="m")
_PREPARE = PrepareConfig(output_dir="o")


def test_defaults_are_valid():
  assert _TRAIN.validate() is _TRAIN
  assert _PREPARE.validate() is _PREPARE
  assert _TRAIN.resolved_export_dir.endswith("m/export")
  assert dataclasses.replace(_TRAIN, export_dir="gs://b/e").resolved_export_dir == "gs://b/e"


@pytest.mark.parametrize("changes,message", [
    (dict(data_dir=""), "--data_dir is required"),
    (dict(model_dir=None), "--model_dir is required"),
    (dict(model="bert"), "--model='bert' is not one of seed_mlp"),
    (dict(strategy="tpu"), "--strategy='tpu' is not one of"),
    (dict(batch_size=-8), "--batch_size=-8 must be at least 1"),
    (dict(epochs=0), "--epochs=0 must be at least 1"),
    (dict(eval_batch_size=0), "--eval_batch_size=0 must be at least 1"),
    (dict(embedding_dim=0), "--embedding_dim=0 must be at least 1"),
    (dict(num_cpu_devices=0), "--num_cpu_devices=0 must be at least 1"),
    (dict(learning_rate=0.0), "--learning_rate=0.0 must be positive"),
    (dict(strategy="default", num_cpu_devices=2), "--strategy=default uses one device"),
])
def test_train_config_rules(changes, message):
  with pytest.raises(ConfigError, match=message):
    dataclasses.replace(_TRAIN, **changes).validate()


def test_batch_size_must_split_across_replicas():
  dataclasses.replace(_TRAIN, batch_size=6).check_replicas(2)
  with pytest.raises(ConfigError, match="--batch_size=7 is not divisible by the 2 replicas"):
    dataclasses.replace(_TRAIN, batch_size=7).check_replicas(2)


@pytest.mark.parametrize("eval_batch,replicas,expected", [(8192, 3, 8190), (8, 2, 8), (2, 3, 3)])
def test_eval_batch_rounds_down_to_a_multiple_of_the_replicas(eval_batch, replicas, expected):
  assert dataclasses.replace(_TRAIN, eval_batch_size=eval_batch).eval_batch_for(
      replicas) == expected


@pytest.mark.parametrize("changes,message", [
    (dict(output_dir=""), "--output_dir is required"),
    (dict(source="parquet"), "--source='parquet' is not one of"),
    (dict(source="movielens"), "--input is required with --source=movielens"),
    (dict(input="x.csv"), "--input='x.csv' is given but --source=synthetic"),
    (dict(num_shards=0), "--num_shards=0 must be at least 1"),
    (dict(eval_fraction=1.0), "--eval_fraction=1.0 must be strictly between 0 and 1"),
    (dict(eval_fraction=0.0), "--eval_fraction=0.0 must be strictly between 0 and 1"),
    (dict(num_ratings=0), "--num_ratings=0 must be at least 1"),
    (dict(noise=-1.0), "--noise=-1.0 must not be negative"),
    (dict(split="temporal"), "--split='temporal' is not one of random"),
])
def test_prepare_config_rules(changes, message):
  with pytest.raises(ConfigError, match=message):
    dataclasses.replace(_PREPARE, **changes).validate()
