"""The one input pipeline: prepared TFRecord shards -> batches of example tensors.

Records hold blocks of examples (`trainer.schema`); the pipeline reads files in parallel,
shuffles blocks, parses several blocks per call, mixes examples within those blocks with a
stateless (so reproducible) permutation, and re-slices them to the per-replica batch with
`rebatch`. Training data repeats forever: the trainer counts steps per epoch, so no example is
dropped at epoch ends and a batch never comes out short.
"""

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from trainer import schema
from trainer.data import records

# Records parsed per call: enough examples to amortise the op overhead and to mix examples of
# different blocks within a batch.
_RECORDS_PER_PARSE = 16


def list_shards(file_pattern: str) -> list:
  """Returns the sorted files matching `file_pattern`; raises ValueError naming it if none."""
  files = sorted(tf.io.gfile.glob(file_pattern))
  if not files:
    raise ValueError(f"no files match {file_pattern!r}")
  return files


def _mix(batch: Dict[str, tf.Tensor], seed: tf.Tensor) -> Dict[str, tf.Tensor]:
  """Permutes the examples of a parsed group of blocks with a stateless shuffle."""
  n = tf.shape(batch[schema.USER])[0]
  order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=seed)
  return {name: tf.gather(value, order) for name, value in batch.items()}


def _skip_examples(groups: tf.data.Dataset, count: int) -> tf.data.Dataset:
  """Drops the first `count` examples of a dataset of example groups (dicts of [n] tensors)."""

  def drop(remaining, group):
    n = tf.shape(group[schema.USER], out_type=tf.int64)[0]
    dropped = tf.minimum(remaining, n)
    return remaining - dropped, {name: value[dropped:] for name, value in group.items()}

  return groups.scan(tf.constant(count, tf.int64), drop).filter(
      lambda group: tf.size(group[schema.USER]) > 0)


# Fibonacci hashing: 2^64 / the golden ratio, odd; the top bits of key * it spread well.
_HASH_MULTIPLIER = 0x9E3779B97F4A7C15
_FILTER_BITS_PER_KEY = 16


def key_set(keys: np.ndarray) -> Callable[[tf.Tensor], tf.Tensor]:
  """Returns `contains(candidates) -> bool[n]`: exact membership of int64 keys in sorted `keys`.

  A binary search of every candidate in millions of keys is a cache miss per level; a bit array
  of 16-32 bits per key (one hash) answers most candidates first, and only those whose bit is
  set (the members and ~3-6% of the others) are searched. Memory: 2-4 bytes per key beside the
  keys themselves (a tf.lookup.StaticHashTable took ~54 bytes per key here).
  """
  keys = np.asarray(keys, np.int64)
  log_bits = max(6, int(np.ceil(np.log2(_FILTER_BITS_PER_KEY * max(len(keys), 1)))))
  shift = 64 - log_bits

  bit = (keys.view(np.uint64) * np.uint64(_HASH_MULTIPLIER)) >> np.uint64(shift)
  words = np.zeros(1 << (log_bits - 5), np.uint32)
  np.bitwise_or.at(words, bit >> np.uint64(5),
                   np.left_shift(np.uint32(1), (bit & np.uint64(31)).astype(np.uint32)))
  words = tf.constant(words.view(np.int32))
  sorted_keys = tf.constant(keys)
  last = max(len(keys) - 1, 0)
  multiplier = tf.constant(_HASH_MULTIPLIER, tf.uint64)

  def contains(candidates):
    if not len(keys):
      return tf.zeros(tf.shape(candidates), tf.bool)
    bit = tf.cast(tf.bitwise.right_shift(tf.bitcast(candidates, tf.uint64) * multiplier,
                                         tf.constant(shift, tf.uint64)), tf.int64)
    word = tf.gather(words, tf.bitwise.right_shift(bit, 5))
    maybe = tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(word, tf.cast(tf.bitwise.bitwise_and(bit, 31), tf.int32)), 1) > 0
    where = tf.where(maybe)  # [s, 1]
    suspects = tf.gather_nd(candidates, where)
    position = tf.searchsorted(sorted_keys, suspects, out_type=tf.int64)
    found = tf.gather(sorted_keys, tf.minimum(position, last)) == suspects
    return tf.tensor_scatter_nd_update(tf.zeros(tf.shape(candidates), tf.bool), where, found)

  return contains


def negative_sampler(num_items: int, num_negatives: int, seed: int,
                     train_keys: Optional[np.ndarray] = None, rounds: int = 10) -> Callable:
  """Returns `add(step, batch)`, which adds sampled negatives to a batch of positives.

  For every positive (u, i), `num_negatives` items drawn uniformly from all items, with label
  0 (positives get label 1): NCF's training protocol; each example's `anchor` is i. The batch
  holds each positive followed by its negatives (the order within a batch does not change the
  loss). The draws are stateless, keyed by (seed, batch counter), so they are new every batch
  and epoch yet reproducible, and they run inside the tf.data graph. With `train_keys` (sorted
  u * num_items + i of every training pair), a draw that hits one of the user's positives is
  redrawn, up to `rounds` times (a leftover needs a user who has interacted with most items).
  """
  is_positive = None if train_keys is None else key_set(train_keys)

  def draw(shape, seed_pair):
    return tf.random.stateless_uniform(shape, seed=seed_pair, minval=0, maxval=num_items,
                                       dtype=tf.int64)

  def add(step, batch):
    users, items = batch[schema.USER], batch[schema.ITEM]
    b = tf.shape(users)[0]
    negatives = draw([b * num_negatives], tf.stack([tf.constant(seed, tf.int64), step]))
    if is_positive is not None:
      negative_users = tf.repeat(users, num_negatives)  # [b * k]

      def redraw(r, candidates, found):
        fresh = draw([b * num_negatives],
                     tf.stack([tf.constant(seed * 7919, tf.int64) + r + 1, step]))
        # Only the redrawn places are checked again: the others hit nothing already.
        where = tf.where(found)  # [s, 1]
        candidates = tf.tensor_scatter_nd_update(candidates, where, tf.gather_nd(fresh, where))
        again = is_positive(tf.gather_nd(negative_users, where) * num_items
                            + tf.gather_nd(candidates, where))
        return r + 1, candidates, tf.tensor_scatter_nd_update(tf.zeros_like(found), where, again)

      # Round r redraws what still hits a positive; it stops as soon as nothing does (usually
      # after one round): the same negatives as always running `rounds` rounds.
      _, negatives, _ = tf.while_loop(
          lambda r, candidates, found: tf.logical_and(r < rounds, tf.reduce_any(found)),
          redraw, (tf.constant(0, tf.int64), negatives,
                   is_positive(negative_users * num_items + negatives)))
    # Each positive followed by its negatives: one run of k + 1 equal user IDs per positive,
    # which the embedding gathers read from cache and LazyAdam sums cheaply
    # (`optimizers._merge_runs`; the layout's test in pipeline_test checks the two together).
    def interleave(first, rest):  # [b], [b * k] -> [b * (k + 1)]
      return tf.reshape(tf.concat([first[:, None], tf.reshape(rest, [b, num_negatives])], 1),
                        [-1])

    zeros = tf.zeros([b * num_negatives], tf.float32)
    # A negative is scored in its positive's context: the context features are repeated.
    context = {key: tf.repeat(value, num_negatives + 1, axis=0)
               for key, value in schema.context_of(batch).items()}
    return {schema.USER: tf.repeat(users, num_negatives + 1),
            schema.ITEM: interleave(items, negatives),
            schema.RATING: interleave(batch[schema.RATING], zeros),
            schema.LABEL: interleave(tf.ones([b], tf.float32), zeros),
            schema.ANCHOR: tf.repeat(items, num_negatives + 1), **context}

  return add


def make_dataset(file_pattern: str, global_batch_size: int, training: bool,
                 input_context: Optional[tf.distribute.InputContext] = None, seed: int = 0,
                 shuffle_buffer_blocks: int = 256,
                 add_negatives: Optional[Callable] = None, start_step: int = 0,
                 file_examples: Optional[Sequence[int]] = None,
                 worker: Optional[Tuple[int, tf.Tensor, tf.Tensor]] = None,
                 context: Sequence[Tuple[str, str, int]] = ()) -> tf.data.Dataset:
  """Builds the dataset of one input pipeline.

  Training data is an endless sequence of epochs, each a fresh shuffle keyed by (seed, epoch):
  files, then blocks within a buffer, then examples within groups of blocks. Keying every
  shuffle by the epoch keeps epochs intact (each example once per epoch, even when the data is
  smaller than a shuffle window) and makes any epoch reproducible on its own.

  Args:
    file_pattern: glob of TFRecord shards, local or `gs://`.
    global_batch_size: examples per step across all replicas.
    training: shuffle, repeat forever and drop short batches when True; read once in file order
      otherwise.
    input_context: from `strategy.distribute_datasets_from_function`; sets the per-replica
      batch size and shards the files across input pipelines.
    seed: seeds every shuffle, so the order of examples is reproducible.
    shuffle_buffer_blocks: shuffle buffer, in records (blocks of up to BLOCK_SIZE examples).
    add_negatives: from `negative_sampler`; then `global_batch_size` counts positives and each
      batch also holds their negatives and a `label`.
    start_step: training only: the training steps already taken. The dataset then starts where
      an uninterrupted one would be after that many steps, batch for batch (the same examples
      in the same order, the same negatives): exact resume in the middle of an epoch. The
      skipped part of the current epoch is read and discarded; earlier epochs are not read.
    file_examples: the examples in each file (in sorted file order); required with start_step.
    worker: (num_workers, index, skip), training under a parameter server: of the global
      batches from `start_step` on, this worker's are those whose index is `index` modulo
      `num_workers` (start_step a multiple of it), less the first `skip` of them (tensors:
      one dataset function serves every worker). Elements are then (batch, global index).
    context: (key, dtype, width) of the context features the records carry
      (`PreparedData.context_keys`): parsed into each batch under their keys.

  Returns:
    A dataset of dicts `{user: int64[b], item: int64[b], rating: float32[b]}`, b = the
    per-replica batch size.

  Raises:
    ValueError: no file matches, or fewer files than input pipelines.
  """
  files = list_shards(file_pattern)
  if file_examples is not None and len(file_examples) != len(files):
    raise ValueError(f"{file_pattern!r} matches {len(files)} files but {len(file_examples)} "
                     "example counts were given")
  files, file_examples, batch_size, batches_per_step = _this_pipeline(
      file_pattern, files, file_examples, global_batch_size, input_context)
  start_batch = start_step * batches_per_step
  if training:
    ds = _epochs(files, file_examples, seed, shuffle_buffer_blocks, start_batch * batch_size,
                 context)
  else:
    ds = _parse(_records(tf.data.Dataset.from_tensor_slices(files), len(files)), context)
  ds = _with_negatives(ds.rebatch(batch_size, drop_remainder=training), start_batch,
                       add_negatives, worker)
  return ds.prefetch(tf.data.AUTOTUNE)


def served_epoch(file_pattern: str, epoch: int, global_batch_size: int, seed: int = 0,
                 shuffle_buffer_blocks: int = 256, add_negatives: Optional[Callable] = None,
                 context: Sequence[Tuple[str, str, int]] = ()) -> tf.data.Dataset:
  """Epoch `epoch` of training batches as the tf.data service serves it (`input_service`).

  Splittable for DYNAMIC sharding: its source is the epoch's list of files (shuffled by
  (seed, epoch)), which the dispatcher hands out one by one; each data worker reads its files'
  blocks, shuffles them, parses and mixes groups, batches and samples negatives. What would
  tie it to a position in the stream is keyed by content instead: a group's mix and a batch's
  negatives by (seed, epoch, a hash of its examples), the same whichever worker made it.
  Batches are `global_batch_size` positives (with their negatives), but each data worker's
  last one of the epoch is short: the epoch ends when the files do.
  """
  files = list_shards(file_pattern)
  epoch_seed = tf.constant([seed, epoch], tf.int64)
  order = tf.random.experimental.stateless_shuffle(tf.range(len(files)), seed=epoch_seed)
  names = [files[i] for i in order.numpy()]
  # Two files at a time, pulled from the dispatcher one by one as they are needed: a parallel
  # interleave would pull up to twice its width ahead (one data worker could take every file
  # of a small epoch), and a data worker that dies loses the rest of the files it holds.
  blocks = tf.data.Dataset.from_tensor_slices(names).interleave(
      tf.data.TFRecordDataset, cycle_length=_SERVED_FILES_AT_ONCE).shuffle(
          shuffle_buffer_blocks, seed=seed)
  mix_key = seed * 1_000_003 + epoch
  ds = _parse(blocks, context).map(
      lambda batch: _mix(batch, tf.stack([tf.constant(mix_key, tf.int64), content_key(batch)])),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.rebatch(global_batch_size, drop_remainder=False)
  if add_negatives is not None:
    ds = ds.map(lambda batch: add_negatives(content_key(batch, epoch + 1), batch),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE)


_SERVED_FILES_AT_ONCE = 2
# splitmix64's finaliser constants.
_MIX_1, _MIX_2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def content_key(batch: Dict[str, tf.Tensor], salt: int = 0) -> tf.Tensor:
  """An int64 key of a batch's (user, item) pairs, whatever their order: the sum of a 64-bit
  hash of each pair (and `salt`)."""
  users = tf.bitcast(batch[schema.USER], tf.uint64)
  items = tf.bitcast(batch[schema.ITEM], tf.uint64)
  h = users * tf.constant(_HASH_MULTIPLIER, tf.uint64) + items + tf.constant(salt, tf.uint64)
  h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(30, tf.uint64)))
  h = h * tf.constant(_MIX_1, tf.uint64)
  h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(27, tf.uint64)))
  h = h * tf.constant(_MIX_2, tf.uint64)
  h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, tf.constant(31, tf.uint64)))
  return tf.bitcast(tf.reduce_sum(h), tf.int64)


def _with_negatives(ds: tf.data.Dataset, start_batch: int, add_negatives: Optional[Callable],
                    worker: Optional[Tuple[int, tf.Tensor, tf.Tensor]]) -> tf.data.Dataset:
  """The batches with their negatives (`add_negatives(global index, batch)`) and, under a
  parameter server, only this worker's, each with its global index (`make_dataset`'s args)."""
  if add_negatives is None and worker is None:
    return ds
  ds = ds.enumerate(start=start_batch)
  with_negatives = add_negatives or (lambda _, batch: batch)
  if worker is None:
    return ds.map(with_negatives, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  count, index, skip = worker  # (batch, its global index)
  return ds.shard(count, index).skip(skip).map(
      lambda i, batch: (with_negatives(i, batch), i), num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True)


def _this_pipeline(file_pattern: str, files: List[str], file_examples: Optional[Sequence[int]],
                   global_batch_size: int,
                   input_context: Optional[tf.distribute.InputContext]):
  """This input pipeline's files (and their example counts), its batch size, and how many of
  its batches one training step consumes."""
  if input_context is None:
    return files, file_examples, global_batch_size, 1
  batch_size = input_context.get_per_replica_batch_size(global_batch_size)
  batches_per_step = input_context.num_replicas_in_sync // input_context.num_input_pipelines
  pipelines, index = input_context.num_input_pipelines, input_context.input_pipeline_id
  if pipelines > 1:
    if len(files) < pipelines:
      raise ValueError(f"{file_pattern!r} has {len(files)} files but there are {pipelines} "
                       "input pipelines; prepare the data with --num_shards at least the "
                       "number of workers")
    files = files[index::pipelines]
    if file_examples is not None:
      file_examples = file_examples[index::pipelines]
  return files, file_examples, batch_size, batches_per_step


def _records(file_names: tf.data.Dataset, num_files: int) -> tf.data.Dataset:
  return file_names.interleave(tf.data.TFRecordDataset, cycle_length=min(num_files, 4),
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _parse(blocks: tf.data.Dataset,
           context: Sequence[Tuple[str, str, int]] = ()) -> tf.data.Dataset:
  context = [(key, tf.as_dtype(dtype), width) for key, dtype, width in context]
  return blocks.batch(_RECORDS_PER_PARSE).map(
      lambda serialized: records.parse_blocks(serialized, context),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _epochs(files: List[str], file_examples: Optional[Sequence[int]], seed: int,
            shuffle_buffer_blocks: int, start_example: int,
            context: Sequence[Tuple[str, str, int]] = ()) -> tf.data.Dataset:
  """Endless epochs of training examples (unbatched blocks), starting `start_example`
  examples into the sequence an uninterrupted run reads."""
  file_names = tf.constant(files)

  def epoch(index):
    # Stateless shuffles keyed by the epoch. (tf.data's `shuffle` takes no tensor seed once a
    # global seed is set; its block buffer keeps a fixed seed and gets a new input order.)
    epoch_seed = tf.stack([tf.constant(seed, tf.int64), index])
    names = tf.gather(file_names, tf.random.experimental.stateless_shuffle(
        tf.range(len(files)), seed=epoch_seed))
    blocks = _records(tf.data.Dataset.from_tensor_slices(names), len(files)).shuffle(
        shuffle_buffer_blocks, seed=seed)
    return _parse(blocks, context).enumerate().map(
        lambda group, batch: _mix(batch, tf.stack([epoch_seed[0] * 1_000_003 + index, group])),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  first_epoch, skip = 0, 0
  if start_example:
    if file_examples is None:
      raise ValueError("start_step needs file_examples")
    first_epoch, skip = divmod(start_example, int(sum(file_examples)))
  if skip:  # resume mid-epoch: the rest of this epoch, then whole epochs
    return _skip_examples(epoch(tf.constant(first_epoch, tf.int64)), skip).concatenate(
        tf.data.Dataset.range(first_epoch + 1, 2**62).flat_map(epoch))
  return tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
