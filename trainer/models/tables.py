"""Data a model carries as fixed weights (checkpoints and the SavedModel hold them): each user's
training items in time order (`HistoryTable`, mf's history) and the training interactions as
sparse rows (`InteractionTable`, what autorec codes)."""

from typing import Dict, Mapping, Optional

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops
# Whether a function is being traced for XLA, where shapes must be static.
from tensorflow.python.ops import control_flow_util

from trainer import distribute
from trainer.data import artifacts


def _fixed_weight(layer: layers.Layer, name: str, shape, dtype: str,
                  value: Optional[np.ndarray]):
  """A non-trainable weight of `layer` holding `value` (data the model carries: checkpoints and
  the SavedModel), or zeros for a layer rebuilt from its config, to be restored."""
  return layer.add_weight(
      shape=shape, dtype=dtype, trainable=False, name=name,
      initializer=(keras.initializers.Zeros() if value is None
                   else lambda shape, dtype=None: ops.convert_to_tensor(value)))


@keras.saving.register_keras_serializable(package="neumf_trainer")
class HistoryTable(layers.Layer):
  """Each user's training items in time order, as fixed weights (checkpoints and the
  SavedModel carry them): `call(users, items)` is each example's `length` latest items before
  it, [b, length] item indices, latest first, `num_items` (the OOV row) where the history is
  shorter. "Before it": before (u, i)'s own interaction when it is a training pair (what a
  training example saw when it happened), else the user's whole history (evaluation,
  serving: what comes after training).

  Args:
    positives: the training positives (`PreparedData.train_positives`: `indptr`, `indices`
      and `time_rank`), or {"count": n} for a layer rebuilt from its config (n zeros, restored
      from a checkpoint); None: no history.
  """

  def __init__(self, num_users: int, num_items: int, length: int,
               positives: Optional[Mapping] = None, **kwargs):
    super().__init__(**kwargs)
    self.num_users, self.num_items, self.length = num_users, num_items, length
    arrays = None
    if positives is not None and "indptr" not in positives:
      self.count = int(positives["count"])
    else:
      self.count = len(positives["indices"]) if positives is not None else 0
      arrays = self._arrays(positives) if positives is not None else None
    for name, shape in (("indptr", (num_users + 2,)),  # users' rows, + the OOV user's (empty)
                        ("sequence", (self.count,)),  # items, each user's in time order
                        ("keys", (self.count,)),  # u * (num_items + 1) + i, sorted
                        ("time_rank", (self.count,))):  # each pair's place in its user's row
      setattr(self, name, _fixed_weight(self, name, shape, "int64",
                                        None if arrays is None else arrays[name]))

  def _arrays(self, positives: Mapping) -> Dict[str, np.ndarray]:
    indptr = np.asarray(positives["indptr"], np.int64)
    if len(indptr) != self.num_users + 1:
      raise ValueError(f"training positives of {len(indptr) - 1} users for a model of "
                       f"{self.num_users}")
    if "time_rank" not in positives:
      raise ValueError("the training positives have no time order (`time_rank`): data "
                       "prepared before it; prepare it again with neumf-prepare")
    keys = artifacts.pair_keys(positives, self.num_items + 1)
    time_rank = np.asarray(positives["time_rank"], np.int64)
    sequence = np.empty(len(keys), np.int64)  # each row's items reordered by time
    sequence[np.repeat(indptr[:-1], np.diff(indptr)) + time_rank] = positives["indices"]
    return {"indptr": np.append(indptr, indptr[-1]), "sequence": sequence, "keys": keys,
            "time_rank": time_rank}

  def call(self, users, items=None):
    users = ops.cast(users, "int64")
    if not self.count:
      return tf.fill([tf.shape(users)[0], self.length], tf.constant(self.num_items, tf.int64))
    indptr = distribute.local_variable(self.indptr.value)
    start, stop = tf.gather(indptr, users), tf.gather(indptr, users + 1)
    end = stop
    if items is not None:
      keys = distribute.local_variable(self.keys.value)
      key = users * (self.num_items + 1) + ops.cast(items, "int64")
      at = tf.minimum(tf.searchsorted(keys, key), self.count - 1)
      found = tf.equal(tf.gather(keys, at), key)
      rank = tf.gather(distribute.local_variable(self.time_rank.value), at)
      end = tf.where(found, start + rank, stop)  # the pair's own place: what came before it
    positions = end[:, None] - 1 - tf.range(self.length, dtype=tf.int64)[None, :]
    valid = positions >= start[:, None]
    latest = tf.gather(distribute.local_variable(self.sequence.value), tf.maximum(positions, 0))
    return tf.where(valid, latest, tf.constant(self.num_items, tf.int64))

  def get_config(self):
    config = super().get_config()
    config.update(num_users=self.num_users, num_items=self.num_items, length=self.length,
                  positives={"count": self.count})
    return config


# Interactions coded per chunk by InteractionTable, x the code size: bounds the [chunk, d]
# rows gathered at once (2^26 floats, 256 MiB).
INTERACTION_CHUNK = 1 << 26


@keras.saving.register_keras_serializable(package="neumf_trainer")
class InteractionTable(layers.Layer):
  """The training interactions as fixed weights, one row per item (compressed sparse rows over
  users): `call(items, table)` is each item's row times `table` [columns, d]. The SavedModel and
  checkpoints carry them, so serving encodes a known item as training did.

  Args:
    rows, columns: the sparse matrix's shape (items + the OOV row, users + the OOV column).
    interactions: {indptr [rows + 1], indices [n] (columns), values [n]}; or {"count": n}
      (a layer rebuilt from its config) for n zeros to be restored from a checkpoint; None:
      none.
    chunk: at most this many values (interactions x d) gathered at once (GPUs).
    segments: code with segment sums even without a GPU (tests of the GPU path).
  """

  def __init__(self, rows: int, columns: int, interactions: Optional[Mapping] = None,
               chunk: int = INTERACTION_CHUNK, segments: bool = False, **kwargs):
    super().__init__(**kwargs)
    self.rows, self.columns, self.chunk, self.segments = rows, columns, chunk, segments
    if interactions is not None and "indptr" not in interactions:
      self.count, interactions = int(interactions["count"]), None
    else:
      self.count = len(interactions["indices"]) if interactions is not None else 0
    if interactions is not None and len(interactions["indptr"]) != rows + 1:
      raise ValueError(f"interactions: indptr of {len(interactions['indptr'])} entries for "
                       f"{rows} rows")
    for name, shape, dtype in (("indptr", (rows + 1,), "int64"),
                               ("indices", (self.count,), "int64"),
                               ("values", (self.count,), "float32")):
      setattr(self, name, _fixed_weight(
          self, name, shape, dtype,
          None if interactions is None else np.asarray(interactions[name], dtype)))

  def call(self, ids, table, training=False):
    """sum_j values_j table[columns_j] over each row of `ids`: [len(ids), d] float32;
    differentiable in `table` when `training`.

    Three ways, each where it is right. Inside an XLA function, where shapes must be static,
    every row is coded and the batch's gathered (a sparse product and a ragged range have no
    XLA kernels). On a machine with GPUs (`distribute.gpu_code_paths`; `segments` forces it),
    gathers and segment sums, `chunk` values at a time, so memory stays bounded however many
    rows are coded (the whole catalogue, for full evaluation and serving): the GPU sparse
    product raises under op determinism and refuses nnz x d > 2^31, and a ragged range runs
    on the host. On CPUs, a compressed-sparse-rows product, faster there (README, "Design
    choices, measured").
    """
    ids = ops.cast(ids, "int64")
    table = tf.cast(table, tf.float32)
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
      return tf.gather(self._every_row(table), ids)
    if not (self.segments or distribute.gpu_code_paths()):
      return self._sparse_product(ids, table, training)
    indptr = distribute.local_variable(self.indptr.value)
    starts, lengths = tf.gather(indptr, ids), tf.gather(indptr, ids + 1) - tf.gather(indptr, ids)
    ends = tf.cumsum(lengths)  # [b]: where each row's interactions end in the batch's
    total = tf.reduce_sum(lengths)
    chunk = tf.constant(max(1, self.chunk // max(1, int(table.shape[-1] or 1))), tf.int64)

    def body(done, out):
      at = tf.range(done, tf.minimum(done + chunk, total))  # [c] positions in the batch's
      row = tf.searchsorted(ends, at, side="right")  # [c] the row each belongs to
      position = tf.gather(starts, row) + at - (tf.gather(ends, row) - tf.gather(lengths, row))
      columns = tf.gather(distribute.local_variable(self.indices.value), position)
      values = tf.cast(tf.gather(distribute.local_variable(self.values.value), position),
                       tf.float32)  # (read in the compute dtype under mixed precision)
      return done + chunk, out + tf.math.unsorted_segment_sum(
          values[:, None] * tf.gather(table, columns), row, tf.shape(ids)[0])

    out = tf.zeros([tf.shape(ids)[0], tf.shape(table)[1]], tf.float32)
    return tf.while_loop(lambda done, _: done < total, body,
                         (tf.constant(0, tf.int64), out))[1]

  def _sparse_product(self, ids, table, training=False):
    """The rows of `ids` as a sparse matrix, times `table` (CPUs)."""
    indptr = distribute.local_variable(self.indptr.value)
    starts, ends = tf.gather(indptr, ids), tf.gather(indptr, ids + 1)
    positions = tf.ragged.range(starts, ends)  # [b, (row length)]
    flat = positions.flat_values
    columns = tf.gather(distribute.local_variable(self.indices.value), flat)
    values = tf.cast(tf.gather(distribute.local_variable(self.values.value), flat), tf.float32)
    # Compressed sparse rows (Eigen's sparse product): 9x faster forward and back than the
    # SparseTensor product's kernel (README, "Design choices, measured"). The rows are in
    # canonical order as the kernel needs: row ids ascending, columns sorted within a row
    # (`artifacts.sparse_rows`). One empty row more than the ids: inside a graph the kernel
    # divides by zero on a matrix of no rows (no ids: a replica's empty share of the last eval
    # batch), and a branch around it would not load from a SavedModel (the variant matrix
    # loses its shape there).
    count = tf.shape(ids, out_type=tf.int64)[0]
    rows = tf.raw_ops.SparseTensorToCSRSparseMatrix(
        indices=tf.stack([positions.value_rowids(), columns], axis=1), values=values,
        dense_shape=tf.stack([count + 1, tf.constant(self.columns, tf.int64)]))
    if not training:  # (a SavedModel cannot hold the gradient below: it captures `rows`)
      return tf.raw_ops.SparseMatrixMatMul(a=rows, b=table)[:count]

    @tf.custom_gradient
    def product(table):
      # The table's gradient only: TensorFlow's registered one also differentiates the fixed
      # sparse matrix, which needs its shape known when the graph is built.
      def gradient(upstream):
        return tf.raw_ops.SparseMatrixMatMul(a=rows, b=tf.pad(upstream, [[0, 1], [0, 0]]),
                                             transpose_a=True)

      return tf.raw_ops.SparseMatrixMatMul(a=rows, b=table)[:count], gradient

    return product(table)

  def _every_row(self, table):
    """Every row's sum (static shapes): [rows, d]."""
    indptr = distribute.local_variable(self.indptr.value)
    row = tf.searchsorted(indptr[1:], tf.range(self.count, dtype=tf.int64), side="right")
    values = tf.cast(distribute.local_variable(self.values.value), tf.float32)
    columns = distribute.local_variable(self.indices.value)
    return tf.math.unsorted_segment_sum(values[:, None] * tf.gather(table, columns), row,
                                        self.rows)

  def get_config(self):
    config = super().get_config()
    config.update(rows=self.rows, columns=self.columns, interactions={"count": self.count},
                  chunk=self.chunk, segments=self.segments)
    return config
