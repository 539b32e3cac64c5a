"""The layers every model is built from: ID embeddings (sharded under a parameter server,
initialised identically however they are split), and the output layer."""

import random
from typing import Optional

import keras
import tensorflow as tf
from keras import layers, ops

from trainer import distribute, parameter_server


@keras.saving.register_keras_serializable(package="neumf_trainer")
class Embedding(layers.Embedding):
  """Keras's Embedding, gathering the batch's rows straight from the variable.

  Keras's `call` converts the whole table to a tensor before `take`, which made every training
  step markedly slower (presumably TensorFlow copying the table when the optimizer updates rows
  of a variable whose full read is still alive). Gathering from the variable itself
  (ResourceGather) reads only the batch's rows; the gradient is the same IndexedSlices
  (README, "Design choices, measured").
  """

  def __init__(self, *args, vocabulary: Optional[str] = None, **kwargs):
    super().__init__(*args, **kwargs)
    # Whose IDs index the rows ("user" or "item": row n is dense ID n, the last row the
    # out-of-vocabulary one), what a warm start maps a table's rows by.
    self.vocabulary = vocabulary
    # Built now, not at the first call: Keras would then create the table later, outside any
    # scope of ours (deferred to the end of its symbolic build), and under a parameter server
    # only tables created in `id_tables()` are sharded over the ps tasks.
    with parameter_server.id_tables(), tf.variable_creator_scope(self._by_rows):
      self.build()

  def _by_rows(self, next_creator, **kwargs):
    """Creates the table in the ps tasks' way when under a parameter server (elsewhere as
    Keras does): TensorFlow is given the shape and a zeros initial value for any shard, then
    each shard is filled block by block on its own task. Without the shape
    ParameterServerStrategy computes the whole table on the chief and sends it over (a
    protobuf, at most 2 GB); with a Keras initializer, which cannot make part of a table,
    each ps task computes the whole table to keep its shard; and a random table drawn at once
    leaves the draw's temporaries (measured here: 3x the table) in the task's memory."""
    initializer = self.embeddings_initializer
    if not (parameter_server.is_parameter_server(tf.distribute.get_strategy())
            and isinstance(initializer, (RowBlockNormal, keras.initializers.Zeros))):
      return next_creator(**kwargs)
    shape = (self.input_dim, self.output_dim)
    dtype = tf.as_dtype(kwargs.get("dtype") or self.variable_dtype)

    def zeros(partition_shape=None, partition_offset=None):
      del partition_offset
      return tf.zeros(partition_shape or shape, dtype)

    table = next_creator(**{**kwargs, "initial_value": zeros, "shape": shape, "dtype": dtype})
    if isinstance(initializer, RowBlockNormal):
      initializer.fill(table.variables if parameter_server.is_sharded(table) else [table])
    return table

  def _trackable_children(self, save_type="checkpoint", **kwargs):
    # A sharded table is saved by its ShardedVariable (one tensor, written slice by slice, that
    # restores into any number of shards or into a plain variable): the Keras variable over it
    # would hand TensorFlow's saver the ShardedVariable as if it were one tensor, and fail.
    children = super()._trackable_children(save_type, **kwargs)
    return {name: (child.value if isinstance(child, keras.Variable)
                   and parameter_server.is_sharded(child.value) else child)
            for name, child in children.items()}

  def get_config(self):
    return {**super().get_config(), "vocabulary": self.vocabulary}

  def call(self, inputs):
    if inputs.dtype not in ("int32", "int64"):
      inputs = ops.cast(inputs, "int32")
    # `autocast` is off for embeddings, so `.value` is the variable itself (a distributed
    # variable under a strategy, whose replica-local copy is gathered).
    table = distribute.local_variable(self.embeddings.value)
    if parameter_server.is_sharded(table):
      # Each shard's rows from the task that holds it ("div" partitioning, the one
      # ParameterServerStrategy's partitions follow); `tf.gather` would concatenate the table.
      return ops.cast(tf.nn.embedding_lookup(table.variables, inputs), self.compute_dtype)
    return ops.cast(tf.gather(table, inputs), self.compute_dtype)


@keras.saving.register_keras_serializable(package="neumf_trainer")
class RowBlockNormal(keras.initializers.Initializer):
  """Normal(0, stddev) rows, drawn in blocks of BLOCK_ROWS rows, block b from a stateless
  generator keyed by (seed, b): any range of rows is computed alone, with the values it has in
  the whole table. A parameter-server shard initialises just its rows, and a table is the
  same whether it is whole or sharded any way."""

  BLOCK_ROWS = 65536

  def __init__(self, stddev: float = 0.01, seed: Optional[int] = None):
    self.stddev = stddev
    # Drawn from Python's generator, which keras.utils.set_random_seed seeds: a run's tables
    # follow its --seed.
    self.seed = int(seed) if seed is not None else random.randrange(2**31)

  def rows(self, first: int, count: int, width: int, dtype=tf.float32) -> tf.Tensor:
    """Rows [first, first + count) of a table `width` wide."""
    pieces, row, end = [], first, first + count
    while row < end:
      block, within = divmod(row, self.BLOCK_ROWS)
      take = min(self.BLOCK_ROWS - within, end - row)
      # A block's first n rows are the values of an n-row draw (the generator fills in
      # order), so only a block entered in its middle is drawn whole and cut.
      piece = tf.random.stateless_normal((within + take, width), seed=(self.seed, block),
                                         stddev=self.stddev, dtype=dtype)
      pieces.append(piece[within:] if within else piece)
      row += take
    # One allocation for the result, which the variable then adopts: a slice of a
    # concatenation would leave a second table-sized buffer behind.
    return pieces[0] if len(pieces) == 1 else tf.concat(pieces, 0)

  def fill(self, shards) -> None:
    """Writes the table's rows into its consecutive row `shards`, a block at a time on each
    shard's own device."""
    first = 0
    for shard in shards:
      rows, width = shard.shape[0], shard.shape[1]
      with tf.device(shard.device):
        for start in range(0, rows, self.BLOCK_ROWS):
          count = min(self.BLOCK_ROWS, rows - start)
          shard.scatter_update(tf.IndexedSlices(
              self.rows(first + start, count, width, shard.dtype),
              tf.range(start, start + count)))
      first += rows

  def __call__(self, shape, dtype=None):
    return self.rows(0, shape[0], shape[1], tf.as_dtype(dtype or "float32"))

  def get_config(self):
    return {"stddev": self.stddev, "seed": self.seed}


@tf.custom_gradient
def _matvec(x, w):
  """x [b, d] . w [d] -> [b], with a backward pass of a broadcast product and a [1, b] x [b, d]
  matmul: TensorFlow's own gradient of a [b, d] x [d, 1] matmul runs two matmuls with an inner
  size of 1, which took 6 of seed_mlp's 57 thread-ms per step (batch 8192) in the profiler."""

  def grad(dy):  # dy [b]
    return dy[:, None] * w[None, :], tf.matmul(dy[None, :], x)[0]

  return tf.linalg.matvec(x, w), grad


@keras.saving.register_keras_serializable(package="neumf_trainer")
class Score(layers.Dense):
  """Dense(1): the same weights and result, a cheaper backward pass (see `_matvec`)."""

  def __init__(self, units: int = 1, **kwargs):
    if units != 1:
      raise ValueError(f"Score has one unit, not {units}")
    super().__init__(1, **kwargs)

  def call(self, inputs):
    return (_matvec(inputs, self.kernel[:, 0]) + self.bias[0])[:, None]  # [b, 1]
