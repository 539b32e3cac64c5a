"""Tests of the prepared-data reader: what training and export see of a prepared directory."""

import os
import shutil

import numpy as np
import pytest

from trainer import schema
from trainer.config import ConfigError, PrepareConfig
from trainer.data import artifacts, preparation


def test_a_prepared_directory_reads_back(tiny_data_dir):
  data = artifacts.PreparedData(tiny_data_dir)
  metadata = data.metadata
  assert data.train_pattern == os.path.join(tiny_data_dir, "train-*-of-*.tfrecord")
  data.check_shards()
  positives = data.train_positives
  assert len(positives["indptr"]) == metadata.num_users + 1
  assert positives["indptr"][-1] == metadata.num_train  # every training row, once
  assert data.eval_negatives is None  # a random split has no sampled protocol
  users, items = data.vocabularies()
  assert (len(users), len(items)) == (metadata.num_users, metadata.num_items)
  keys = artifacts.pair_keys(positives, metadata.num_items)
  assert (np.diff(keys) > 0).all()  # sorted and distinct, as the negative sampler needs


def test_eval_negatives_of_a_leave_one_out_split(tmp_path):
  out = str(tmp_path / "loo")
  preparation.prepare(PrepareConfig(output_dir=out, num_users=40, num_items=60, num_ratings=800,
                                    split="leave_one_out", eval_negatives=5))
  data = artifacts.PreparedData(out)
  sampled = data.eval_negatives
  assert sampled["negatives"].shape == (data.metadata.num_eval, 5)
  assert len(sampled["users"]) == len(np.unique(sampled["users"]))  # one eval row per user


def test_what_is_wrong_with_a_directory_is_named(tiny_data_dir, tmp_path):
  with pytest.raises(ConfigError, match=r"--data_dir='.*' is not a prepared data directory"):
    artifacts.PreparedData(str(tmp_path))
  broken = tmp_path / "broken"
  shutil.copytree(tiny_data_dir, broken)
  for name in os.listdir(broken):
    if name.startswith("eval-"):
      os.remove(broken / name)
  with pytest.raises(ConfigError, match=r"--data_dir='.*broken': .*eval-\*-of-\*\.tfrecord"):
    artifacts.PreparedData(str(broken)).check_shards()
  with open(broken / schema.ITEM_VOCAB_FILE, "a") as f:
    f.write("one-too-many\n")
  with pytest.raises(ValueError, match=r"vocabularies hold \d+ users and \d+ items but the "
                     "metadata says"):
    artifacts.PreparedData(str(broken)).vocabularies()
