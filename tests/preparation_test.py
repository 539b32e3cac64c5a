"""Tests of data preparation: vocabularies, splits, shards, metadata, publishing."""

import hashlib
import os

import numpy as np
import pytest
import tensorflow as tf

from trainer import schema
from trainer.config import ConfigError, PrepareConfig
from trainer.data import preparation


def test_vocab_is_frequency_ordered_with_ties_by_id():
  ids = np.array(["b", "a", "c", "b", "c", "c", "d"], dtype=object)
  vocab, index = preparation.build_vocab(ids)
  # counts: c 3, b 2, a 1, d 1 -> c, b, then a before d
  assert vocab.tolist() == ["c", "b", "a", "d"]
  assert index.tolist() == [1, 2, 0, 1, 0, 0, 3]


def test_random_split_is_a_partition_of_the_requested_size():
  train, held_out = preparation.random_split(100, 0.25, seed=5)
  assert len(held_out) == 25 and len(train) == 75
  assert sorted(np.concatenate([train, held_out]).tolist()) == list(range(100))
  again, _ = preparation.random_split(100, 0.25, seed=5)
  assert train.tolist() == again.tolist()


def test_random_split_needs_both_sides():
  with pytest.raises(ValueError, match=r"--eval_fraction=0.1 of 3 ratings leaves 0"):
    preparation.random_split(3, 0.1, seed=0)


def _read_split(data_dir, split):
  files = sorted(tf.io.gfile.glob(os.path.join(data_dir, schema.shard_pattern(split))))
  records = [r for f in files for r in tf.data.TFRecordDataset(f).as_numpy_iterator()]
  parsed = schema.parse_blocks(tf.constant(records))
  return {k: v.numpy() for k, v in parsed.items()}, files


def test_prepared_movielens_directory_is_complete_and_consistent(tmp_path):
  src = tmp_path / "u.data"
  rows = [("10", "100", 4), ("10", "101", 3), ("11", "100", 5), ("12", "102", 1),
          ("12", "100", 2), ("13", "101", 4), ("10", "102", 5), ("11", "101", 2)]
  src.write_text("".join(f"{u}\t{i}\t{r}\t{n}\n" for n, (u, i, r) in enumerate(rows)))
  out = str(tmp_path / "out")
  metadata = preparation.prepare(PrepareConfig(output_dir=out, source="movielens",
                                               input=str(src), num_shards=2,
                                               eval_fraction=0.25, seed=1))
  assert (metadata.num_users, metadata.num_items) == (4, 3)
  assert (metadata.num_train, metadata.num_eval) == (6, 2)
  assert (metadata.rating_min, metadata.rating_max) == (1.0, 5.0)
  users = open(os.path.join(out, schema.USER_VOCAB_FILE)).read().split()
  items = open(os.path.join(out, schema.ITEM_VOCAB_FILE)).read().split()
  assert users == ["10", "11", "12", "13"]  # 10: 3 ratings, 11 and 12: 2, 13: 1
  assert items == ["100", "101", "102"]
  seen = []
  for split in (schema.TRAIN, schema.EVAL):
    data, files = _read_split(out, split)
    assert len(files) == 2
    seen += [(users[u], items[i], float(r)) for u, i, r in
             zip(data[schema.USER], data[schema.ITEM], data[schema.RATING])]
  assert sorted(seen) == sorted((u, i, float(r)) for u, i, r in rows)
  train, _ = _read_split(out, schema.TRAIN)
  assert metadata.train_rating_mean == pytest.approx(train[schema.RATING].mean())
  assert sorted(os.listdir(out)) == sorted(
      [schema.METADATA_FILE, schema.USER_VOCAB_FILE, schema.ITEM_VOCAB_FILE,
       "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord",
       "eval-00000-of-00002.tfrecord", "eval-00001-of-00002.tfrecord"])


def _digest(directory):
  h = hashlib.sha256()
  for name in sorted(os.listdir(directory)):
    h.update(name.encode())
    h.update(open(os.path.join(directory, name), "rb").read())
  return h.hexdigest()


def test_same_input_and_seed_give_identical_bytes(tmp_path):
  config = PrepareConfig(output_dir=str(tmp_path / "a"), num_users=80, num_items=60,
                         num_ratings=1500, num_shards=3, seed=9)
  preparation.prepare(config)
  preparation.prepare(PrepareConfig(**{**config.__dict__, "output_dir": str(tmp_path / "b")}))
  preparation.prepare(PrepareConfig(**{**config.__dict__, "output_dir": str(tmp_path / "c"),
                                       "seed": 10}))
  assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
  assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_preparing_again_replaces_shards_of_an_earlier_run(tmp_path):
  out = str(tmp_path / "out")
  small = dict(num_users=30, num_items=30, num_ratings=400)
  preparation.prepare(PrepareConfig(output_dir=out, num_shards=4, **small))
  metadata = preparation.prepare(PrepareConfig(output_dir=out, num_shards=2, **small))
  names = sorted(os.listdir(out))
  assert [n for n in names if n.startswith("train-")] == [
      "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
  assert not [n for n in names if n.startswith(".tmp")]
  data, _ = _read_split(out, schema.TRAIN)
  assert len(data[schema.USER]) == metadata.num_train


def test_failed_preparation_leaves_earlier_output_intact(tmp_path):
  out = str(tmp_path / "out")
  preparation.prepare(PrepareConfig(output_dir=out, num_users=30, num_items=30, num_ratings=400))
  before = _digest(out)
  bad = tmp_path / "bad.data"
  bad.write_text("1\t2\t3\t4\n1\t2\tx\t4\n")
  with pytest.raises(ValueError, match="bad.data:2"):
    preparation.prepare(PrepareConfig(output_dir=out, source="movielens", input=str(bad)))
  assert _digest(out) == before


def test_load_metadata_names_the_flag_for_an_unprepared_directory(tmp_path):
  with pytest.raises(ConfigError, match=r"--data_dir='.*' is not a prepared data directory"):
    preparation.load_metadata(str(tmp_path))
