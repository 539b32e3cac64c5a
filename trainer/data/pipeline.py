"""The one input pipeline: prepared TFRecord shards -> batches of example tensors.

Records hold blocks of examples (`trainer.schema`); the pipeline reads files in parallel,
shuffles blocks, parses several blocks per call, mixes examples within those blocks with a
stateless (so reproducible) permutation, and re-slices them to the per-replica batch with
`rebatch`. Training data repeats forever: the trainer counts steps per epoch, so no example is
dropped at epoch ends and a batch never comes out short.
"""

from typing import Dict, Optional

import tensorflow as tf

from trainer import schema

# Records parsed per call: enough examples to amortise the op overhead and to mix examples of
# different blocks within a batch.
_RECORDS_PER_PARSE = 16


def list_shards(file_pattern: str) -> list:
  """Returns the sorted files matching `file_pattern`; raises ValueError naming it if none."""
  files = sorted(tf.io.gfile.glob(file_pattern))
  if not files:
    raise ValueError(f"no files match {file_pattern!r}")
  return files


def _mix(index: tf.Tensor, batch: Dict[str, tf.Tensor], seed: int) -> Dict[str, tf.Tensor]:
  """Permutes the examples of a parsed group of blocks, seeded by (seed, group index)."""
  n = tf.shape(batch[schema.USER])[0]
  order = tf.random.experimental.stateless_shuffle(
      tf.range(n), seed=tf.stack([tf.cast(seed, tf.int64), index]))
  return {name: tf.gather(value, order) for name, value in batch.items()}


def make_dataset(file_pattern: str, global_batch_size: int, training: bool,
                 input_context: Optional[tf.distribute.InputContext] = None, seed: int = 0,
                 shuffle_buffer_blocks: int = 256) -> tf.data.Dataset:
  """Builds the dataset of one input pipeline.

  Args:
    file_pattern: glob of TFRecord shards, local or `gs://`.
    global_batch_size: examples per step across all replicas.
    training: shuffle, repeat forever and drop short batches when True; read once in file order
      otherwise.
    input_context: from `strategy.distribute_datasets_from_function`; sets the per-replica
      batch size and shards the files across input pipelines.
    seed: seeds every shuffle, so the order of examples is reproducible.
    shuffle_buffer_blocks: shuffle buffer, in records (blocks of up to BLOCK_SIZE examples).

  Returns:
    A dataset of dicts `{user: int64[b], item: int64[b], rating: float32[b]}`, b = the
    per-replica batch size.

  Raises:
    ValueError: no file matches, or fewer files than input pipelines.
  """
  files = list_shards(file_pattern)
  batch_size = global_batch_size
  ds = tf.data.Dataset.from_tensor_slices(files)
  if input_context is not None:
    batch_size = input_context.get_per_replica_batch_size(global_batch_size)
    if input_context.num_input_pipelines > 1:
      if len(files) < input_context.num_input_pipelines:
        raise ValueError(f"{file_pattern!r} has {len(files)} files but there are "
                         f"{input_context.num_input_pipelines} input pipelines; prepare the data "
                         "with --num_shards at least the number of workers")
      ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
  if training:
    ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 4),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if training:
    ds = ds.shuffle(shuffle_buffer_blocks, seed=seed, reshuffle_each_iteration=True).repeat()
  ds = ds.batch(_RECORDS_PER_PARSE).map(schema.parse_blocks, num_parallel_calls=tf.data.AUTOTUNE,
                                        deterministic=True)
  if training:
    ds = ds.enumerate().map(lambda i, b: _mix(i, b, seed), num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)
  ds = ds.rebatch(batch_size, drop_remainder=training)
  return ds.prefetch(tf.data.AUTOTUNE)
