"""Tests of configuration validation: each rule, with the flag and value in the message."""

import dataclasses

import pytest

from trainer import objectives
from trainer.config import ConfigError, PrepareConfig, TrainConfig

_TRAIN = TrainConfig(data_dir="d", model_dir="m")
_PREPARE = PrepareConfig(output_dir="o")


def test_defaults_are_valid():
  assert _TRAIN.validate() is _TRAIN
  assert _PREPARE.validate() is _PREPARE
  dataclasses.replace(_PREPARE, split="leave_one_out", eval_fraction=0.0).validate()
  dataclasses.replace(_PREPARE, split="temporal", temporal_cutoff=5, eval_fraction=0).validate()
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
    (dict(task="ranking"), "--task='ranking' is not one of explicit, implicit, implicit_bpr"),
    # Cross-field rules.
    (dict(task="implicit", num_negatives=0), "--num_negatives=0: --task=implicit needs"),
    (dict(task="implicit_bpr", num_negatives=0), "--num_negatives=0: --task=implicit_bpr needs"),
    (dict(task="implicit", batch_size=1001, num_negatives=4),
     r"--batch_size=1001 is not divisible by 1 \+ --num_negatives = 5"),
    (dict(target_metric="rmse"), "--target_metric=rmse needs --target_value"),
    (dict(target_value=0.9), "--target_metric=None is not one of rmse"),
    (dict(target_metric="hr_full", target_value=0.5), "--target_metric=hr_full is not reported "
     r"by --task=explicit \(it reports rmse, mae\)"),
    (dict(task="implicit", batch_size=1000, target_metric="rmse", target_value=0.9),
     "--target_metric=rmse is not reported by --task=implicit"),
    (dict(pretrained_gmf_dir="g", pretrained_mlp_dir="m"),
     "--pretrained_gmf_dir/--pretrained_mlp_dir apply to --model=neumf only"),
    (dict(model="neumf", pretrained_gmf_dir="g"),
     "--pretrained_gmf_dir and --pretrained_mlp_dir go together"),
    (dict(dropout=1.0), r"--dropout=1.0 must be in \[0, 1\)"),
    (dict(model="autorec", history=5), "--history=5 is mf's .* --model=autorec"),
    (dict(history=-1), "--history=-1 must not be negative"),
    (dict(autorec_side="both"), "--autorec_side='both' is not one of item, user"),
    (dict(layers=(8, 0)), "--layers=8,0 must be positive layer sizes"),
])
def test_train_config_rules(changes, message):
  with pytest.raises(ConfigError, match=message):
    dataclasses.replace(_TRAIN, **changes).validate()


def test_batch_size_must_split_across_replicas():
  objectives.for_config(dataclasses.replace(_TRAIN, batch_size=6)).check_replicas(2)
  with pytest.raises(ConfigError, match="--batch_size=7 is not divisible by the 2 replicas"):
    objectives.for_config(dataclasses.replace(_TRAIN, batch_size=7)).check_replicas(2)
  implicit = dataclasses.replace(_TRAIN, task="implicit_bpr", num_negatives=2, batch_size=12)
  objectives.for_config(implicit).check_replicas(2)  # 2 replicas x groups of 3
  with pytest.raises(ConfigError, match=r"--batch_size=12 is not divisible by the 3 replicas "
                     r"x \(1 \+ --num_negatives\)"):
    objectives.for_config(implicit).check_replicas(3)


@pytest.mark.parametrize("eval_batch,replicas,expected", [(8192, 3, 8190), (8, 2, 8), (2, 3, 3)])
def test_eval_batch_rounds_down_to_a_multiple_of_the_replicas(eval_batch, replicas, expected):
  assert dataclasses.replace(_TRAIN, eval_batch_size=eval_batch).eval_batch_for(
      replicas) == expected


@pytest.mark.parametrize("changes,message", [
    (dict(output_dir=""), "--output_dir is required"),
    (dict(source="parquet"), "--source='parquet' is not one of"),
    (dict(source="movielens"), "--input is required with --source=movielens"),
    (dict(source="movielens", input=("a", "b")), "--source=movielens reads one ratings file"),
    (dict(input=("x.csv",)), "--input='x.csv' is given but --source=synthetic"),
    (dict(source="csv", input=("x.csv",)), "--source=csv needs --user_column and --item_column"),
    (dict(source="csv", input=("x",), user_column="u", item_column="i", delimiter=";;"),
     "--delimiter=';;' must be one character"),
    (dict(user_column="u"), "--user_column applies to --source=csv only"),
    (dict(source="tfds"), "--source=tfds needs --tfds_name"),
    (dict(tfds_name="movielens/100k-ratings"), "--tfds_name applies to --source=tfds only"),
    (dict(rating_min=1.0), "--rating_min and --rating_max go together"),
    (dict(rating_min=5.0, rating_max=1.0), "--rating_min=5.0 is above --rating_max=1.0"),
    (dict(num_shards=0), "--num_shards=0 must be at least 1"),
    (dict(target_shard_mb=0.0), "--target_shard_mb=0.0 must be positive"),
    (dict(eval_fraction=1.0), "--eval_fraction=1.0 must be strictly between 0 and 1"),
    (dict(eval_fraction=0.0), "--eval_fraction=0.0 must be strictly between 0 and 1"),
    (dict(num_ratings=0), "--num_ratings=0 must be at least 1"),
    (dict(noise=-1.0), "--noise=-1.0 must not be negative"),
    (dict(split="by_moon"), "--split='by_moon' is not one of random, leave_one_out, temporal"),
    (dict(duplicates="ignore"), "--duplicates='ignore' is not one of error, keep_latest, mean"),
    (dict(min_user_interactions=0), "--min_user_interactions=0 must be at least 1"),
    (dict(eval_negatives=99), "--eval_negatives=99 needs --split=leave_one_out"),
    (dict(temporal_cutoff=5), "--temporal_cutoff=5 needs --split=temporal"),
])
def test_prepare_config_rules(changes, message):
  with pytest.raises(ConfigError, match=message):
    dataclasses.replace(_PREPARE, **changes).validate()
