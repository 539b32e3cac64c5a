"""Tests of the input pipeline over prepared shards."""

import collections
import os

import numpy as np
import pytest
import tensorflow as tf

from trainer import optimizers, schema
from trainer.data import artifacts, pipeline


def _pattern(data_dir, split):
  return os.path.join(data_dir, schema.shard_pattern(split))


def _examples(ds, limit=None):
  out = []
  for n, batch in enumerate(ds):
    if limit is not None and n >= limit:
      break
    out += list(zip(batch[schema.USER].numpy().tolist(), batch[schema.ITEM].numpy().tolist(),
                    batch[schema.RATING].numpy().tolist()))
  return out


def test_eval_reads_every_example_exactly_once(tiny_data_dir):
  metadata = artifacts.load_metadata(tiny_data_dir)
  ds = pipeline.make_dataset(_pattern(tiny_data_dir, schema.EVAL), 100, training=False)
  batches = list(ds)
  examples = _examples(batches)
  assert len(examples) == metadata.num_eval
  assert len(set((u, i) for u, i, _ in examples)) == metadata.num_eval
  assert all(len(b[schema.USER]) == 100 for b in batches[:-1])


def test_training_batches_are_full_repeat_and_cover_the_data(tiny_data_dir):
  metadata = artifacts.load_metadata(tiny_data_dir)
  batch = 256
  steps = 2 * metadata.num_train // batch  # two epochs' worth
  ds = pipeline.make_dataset(_pattern(tiny_data_dir, schema.TRAIN), batch, training=True, seed=1)
  sizes = [len(b[schema.USER]) for b in ds.take(steps)]
  assert sizes == [batch] * steps
  counts = collections.Counter((u, i) for u, i, _ in _examples(ds, limit=steps))
  assert len(counts) == metadata.num_train  # every example seen within two epochs
  assert max(counts.values()) <= 3


def test_training_order_is_reproducible_per_seed_and_shuffled(tiny_data_dir):
  pattern = _pattern(tiny_data_dir, schema.TRAIN)
  a = _examples(pipeline.make_dataset(pattern, 128, training=True, seed=3), limit=10)
  b = _examples(pipeline.make_dataset(pattern, 128, training=True, seed=3), limit=10)
  c = _examples(pipeline.make_dataset(pattern, 128, training=True, seed=4), limit=10)
  assert a == b
  assert a != c
  in_file_order = _examples(pipeline.make_dataset(pattern, 128, training=False), limit=10)
  assert a != in_file_order


def test_input_context_sets_per_replica_batch_and_shards_files(tiny_data_dir):
  pattern = _pattern(tiny_data_dir, schema.EVAL)
  everything = set(_examples(pipeline.make_dataset(pattern, 100, training=False)))
  parts = []
  for pipeline_id in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                         num_replicas_in_sync=4)
    ds = pipeline.make_dataset(pattern, 100, training=False, input_context=context)
    assert len(next(iter(ds))[schema.USER]) == 25
    parts.append(set(_examples(ds)))
  assert not parts[0] & parts[1]
  assert parts[0] | parts[1] == everything


def test_more_pipelines_than_files_is_a_clear_error(tiny_data_dir):
  context = tf.distribute.InputContext(num_input_pipelines=3, input_pipeline_id=0,
                                       num_replicas_in_sync=3)
  with pytest.raises(ValueError, match="has 2 files but there are 3 input pipelines"):
    pipeline.make_dataset(_pattern(tiny_data_dir, schema.TRAIN), 30, True, context)


def test_no_matching_files_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="no files match"):
    pipeline.make_dataset(str(tmp_path / "train-*"), 8, training=True)


@pytest.mark.parametrize("num_keys,space", [(0, 100), (1, 100), (7, 10), (3000, 4000),
                                             (20000, 10**15)])
def test_key_set_is_exact_membership(num_keys, space):
  """The bit-array filter may let through non-members, never answer for them: the result is
  np.isin's, on sparse and dense key spaces (dense: most candidates pass the filter)."""
  rng = np.random.default_rng(num_keys)
  keys = np.sort(rng.choice(space, num_keys, replace=False)).astype(np.int64)
  candidates = rng.integers(0, space, 30000)
  candidates[:len(keys)] = keys[:30000]  # every member at least once
  got = pipeline.key_set(keys)(tf.constant(candidates, tf.int64)).numpy()
  np.testing.assert_array_equal(got, np.isin(candidates, keys))


def test_negatives_are_fresh_reproducible_and_never_a_known_positive():
  num_items, k = 6, 3
  # User 0 has items 0..4: only item 5 is a valid negative for it; user 1 has item 0 only.
  train_keys = np.array([0, 1, 2, 3, 4, 1 * num_items + 0], np.int64)
  add = pipeline.negative_sampler(num_items, k, seed=3, train_keys=np.sort(train_keys))
  positives = {schema.USER: tf.constant([0, 1], tf.int64), schema.ITEM: tf.constant([2, 0],
                                                                                    tf.int64),
               schema.RATING: tf.constant([1.0, 1.0])}
  first = add(tf.constant(0, tf.int64), positives)
  # Each positive, then its negatives.
  assert first[schema.USER].numpy().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
  assert first[schema.LABEL].numpy().tolist() == [1, 0, 0, 0, 1, 0, 0, 0]
  assert first[schema.RATING].numpy().tolist() == [1, 0, 0, 0, 1, 0, 0, 0]
  assert first[schema.ANCHOR].numpy().tolist() == [2, 2, 2, 2, 0, 0, 0, 0]  # the positives
  items = first[schema.ITEM].numpy()
  assert items[[0, 4]].tolist() == [2, 0]
  assert items[1:4].tolist() == [5, 5, 5]
  assert 0 not in items[5:].tolist()
  again = add(tf.constant(0, tf.int64), positives)
  assert again[schema.ITEM].numpy().tolist() == first[schema.ITEM].numpy().tolist()
  draws = {tuple(add(tf.constant(s, tf.int64), positives)[schema.ITEM].numpy()[5:])
           for s in range(8)}
  assert len(draws) > 1  # new negatives at every step


def test_training_batches_hold_each_positive_then_its_negatives(tiny_data_dir):
  metadata = artifacts.load_metadata(tiny_data_dir)
  add = pipeline.negative_sampler(metadata.num_items, 4, seed=1)
  ds = pipeline.make_dataset(_pattern(tiny_data_dir, schema.TRAIN), 50, training=True, seed=1,
                             add_negatives=add)
  batch = next(iter(ds))
  assert len(batch[schema.USER]) == 250
  labels = batch[schema.LABEL].numpy().reshape(50, 5)
  assert labels[:, 0].tolist() == [1] * 50 and labels[:, 1:].sum() == 0
  users = batch[schema.USER].numpy().reshape(50, 5)
  assert (users == users[:, :1]).all()  # the positive's user for its negatives
  # The layout is for LazyAdam, which sums runs of one ID first: the users' gradient rows
  # merge into at most one per positive.
  summed, rows = optimizers._merge_runs(tf.ones([250, 1]), batch[schema.USER])
  assert len(rows) <= 50 and summed.numpy().sum() == 250


@pytest.mark.parametrize("start_step", [1, 7, 19, 40])
def test_a_resumed_dataset_continues_batch_for_batch(tiny_data_dir, start_step):
  """Starting at step k (mid-epoch, at an epoch boundary or epochs later) yields exactly the
  batches an uninterrupted dataset yields from its k-th batch: examples and negatives."""
  metadata = artifacts.load_metadata(tiny_data_dir)
  assert sum(metadata.train_shard_examples) == metadata.num_train
  pattern = _pattern(tiny_data_dir, schema.TRAIN)
  batch = 211  # not a divisor of the epoch: batches straddle epoch ends
  sampler = pipeline.negative_sampler(metadata.num_items, 2, seed=5)

  def batches(start, count):
    ds = pipeline.make_dataset(pattern, batch, True, seed=9, add_negatives=sampler,
                               start_step=start, file_examples=metadata.train_shard_examples)
    return [{k: v.numpy() for k, v in b.items()} for b in ds.take(count)]

  whole = batches(0, start_step + 5)
  resumed = batches(start_step, 5)
  for expected, got in zip(whole[start_step:], resumed):
    for name in expected:
      np.testing.assert_array_equal(expected[name], got[name])


def test_a_resumed_dataset_continues_under_two_replicas(tiny_data_dir, mirrored_strategy):
  metadata = artifacts.load_metadata(tiny_data_dir)
  pattern = _pattern(tiny_data_dir, schema.TRAIN)

  def steps(start, count):
    ds = mirrored_strategy.distribute_datasets_from_function(
        lambda ctx: pipeline.make_dataset(pattern, 300, True, ctx, seed=2, start_step=start,
                                          file_examples=metadata.train_shard_examples))
    out, iterator = [], iter(ds)
    for _ in range(count):
      values = mirrored_strategy.experimental_local_results(next(iterator)[schema.ITEM])
      out.append(np.concatenate([v.numpy() for v in values]))
    return out

  whole, resumed = steps(0, 14), steps(9, 5)
  for expected, got in zip(whole[9:], resumed):
    np.testing.assert_array_equal(expected, got)


def test_parameter_server_workers_share_the_global_batches_and_resume_each_at_its_count(
    tiny_data_dir):
  """Under a parameter server worker w of W takes global batches w, w + W, ... (with the
  negatives keyed by their index), from a start step that is a multiple of W, less the first
  `skip` of its own: together the workers read the one-device stream, each batch once."""
  metadata = artifacts.load_metadata(tiny_data_dir)
  pattern = _pattern(tiny_data_dir, schema.TRAIN)
  sampler = pipeline.negative_sampler(metadata.num_items, 2, seed=5)
  common = dict(seed=9, add_negatives=sampler, file_examples=metadata.train_shard_examples)
  whole = [{k: v.numpy() for k, v in b.items()} for b in pipeline.make_dataset(
      pattern, 97, True, **common).take(24)]

  def worker(index, start_step, skip, count):
    ds = pipeline.make_dataset(pattern, 97, True, start_step=start_step,
                               worker=(3, tf.constant(index, tf.int64),
                                       tf.constant(skip, tf.int64)), **common)
    return [(int(i), {k: v.numpy() for k, v in b.items()}) for b, i in ds.take(count)]

  # From the start: worker 1 gets batches 1, 4, 7, ...
  # Resumed after the workers took 4, 3 and 5 batches: from step 3 x 3 = 9, skipping 1, 0, 2.
  for index, start, skip, first in [(1, 0, 0, 1), (0, 9, 1, 12), (1, 9, 0, 10), (2, 9, 2, 17)]:
    got = worker(index, start, skip, 2)
    assert [i for i, _ in got] == [first, first + 3]
    for i, batch in got:
      for name in whole[i]:
        np.testing.assert_array_equal(whole[i][name], batch[name])
