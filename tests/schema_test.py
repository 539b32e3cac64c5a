"""Tests of the record layout and the metadata file."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from trainer import schema
from trainer.data import records


def test_blocks_round_trip_in_order():
  first = records.encode_block(np.array([3, 1]), np.array([0, 2]), np.array([4.5, 1.0]))
  second = records.encode_block(np.array([7]), np.array([5]), np.array([2.5]))
  parsed = records.parse_blocks(tf.constant([first, second]))
  assert parsed[schema.USER].numpy().tolist() == [3, 1, 7]
  assert parsed[schema.ITEM].numpy().tolist() == [0, 2, 5]
  assert parsed[schema.RATING].numpy().tolist() == [4.5, 1.0, 2.5]
  assert parsed[schema.USER].dtype == tf.int64 and parsed[schema.RATING].dtype == tf.float32


@pytest.mark.parametrize("users,items,ratings", [
    ([], [], []),
    ([1, 2], [1], [1.0, 2.0]),
    (list(range(schema.BLOCK_SIZE + 1)),) * 2 + ([1.0] * (schema.BLOCK_SIZE + 1),),
])
def test_bad_blocks_are_refused(users, items, ratings):
  with pytest.raises(ValueError, match="block"):
    records.encode_block(np.array(users), np.array(items), np.array(ratings))


def test_shard_names_match_their_pattern():
  name = schema.shard_file_name(schema.TRAIN, 3, 12)
  assert name == "train-00003-of-00012.tfrecord"
  assert tf.io.gfile.glob  # the pattern is a glob; check it matches with fnmatch semantics
  import fnmatch
  assert fnmatch.fnmatch(name, schema.shard_pattern(schema.TRAIN))
  assert not fnmatch.fnmatch(name, schema.shard_pattern(schema.EVAL))


def _metadata(**changes):
  base = schema.Metadata(num_users=3, num_items=4, num_train=10, num_eval=2, rating_min=1.0,
                         rating_max=5.0, train_rating_mean=3.2, num_shards=2, source="synthetic",
                         split="random", eval_fraction=0.2, seed=1, inputs=["a.csv"])
  return dataclasses.replace(base, **changes)


def test_metadata_round_trips():
  metadata = _metadata()
  assert schema.Metadata.from_json(metadata.to_json()) == metadata


def test_metadata_of_another_schema_version_is_refused():
  for version in (1, schema.SCHEMA_VERSION + 1):
    text = _metadata(schema_version=version).to_json()
    with pytest.raises(ValueError, match=rf"m\.json: schema_version {version} is not supported"):
      schema.Metadata.from_json(text, where="m.json")


def test_metadata_of_version_2_reads_as_data_without_context():
  metadata = schema.Metadata.from_json(_metadata(schema_version=2).to_json())
  assert metadata.schema_version == 2 and not metadata.features


def test_metadata_with_unknown_field_is_refused():
  text = _metadata().to_json().replace('"seed"', '"sed"')
  with pytest.raises(ValueError, match=r"unknown fields \['sed'\]"):
    schema.Metadata.from_json(text)


def test_metadata_that_is_not_json_is_refused():
  with pytest.raises(ValueError, match="m.json: not valid JSON"):
    schema.Metadata.from_json("{", where="m.json")


@pytest.mark.parametrize("users,items,ratings", [
    ([0], [0], [1.0]),
    ([3, 127, 128, 16383, 16384, 2**31 + 5], [1, 2, 3, 4, 5, 2**40], [0.5, 1, 2, 3, 4.5, 5]),
    (list(range(schema.BLOCK_SIZE)), list(range(schema.BLOCK_SIZE))[::-1],
     [0.25] * schema.BLOCK_SIZE),
])
def test_hand_built_records_equal_the_protobuf_message(users, items, ratings):
  users, items = np.array(users), np.array(items)
  ratings = np.array(ratings, np.float32)
  expected = tf.train.Example(features=tf.train.Features(feature={  # map order is not fixed
      schema.USER: tf.train.Feature(int64_list=tf.train.Int64List(value=users.tolist())),
      schema.ITEM: tf.train.Feature(int64_list=tf.train.Int64List(value=items.tolist())),
      schema.RATING: tf.train.Feature(float_list=tf.train.FloatList(value=ratings.tolist())),
  }))
  encoded = records.encode_block(users, items, ratings)
  assert tf.train.Example.FromString(encoded) == expected
  parsed = records.parse_blocks(tf.constant([encoded]))
  assert parsed[schema.USER].numpy().tolist() == users.tolist()
  assert parsed[schema.ITEM].numpy().tolist() == items.tolist()
  assert parsed[schema.RATING].numpy().tolist() == ratings.tolist()
