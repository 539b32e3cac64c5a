"""The layers that bring side features into every model.

Preparation writes each side's features as tables indexed by dense ID (`trainer.data.features`).
A model holds them as fixed, non-trainable weights (`FeatureTables`), so checkpoints and the
SavedModel carry them and serving looks features up by ID, and gathers a batch's rows in-graph.
Each of the side's representations (an ID embedding of size d) gets a `FeatureEmbedding` of the
same size, added to it:

  p_u = P[u] + sum_f e_f(u),   e_f(u) = E_f[x_f(u)]                 categorical, bucketized
                               e_f(u) = mean_{v in x_f(u)} E_f[v]    multi-hot
                               e_f(u) = x_f(u) w_f                   numeric (standardised)

Index 0 of a categorical feature (missing, or rarer than --min_feature_count) embeds to zero,
so an entity without features gets no feature term, and an ID the model never trained (a cold
item, or the out-of-vocabulary row) is scored from its features alone.
"""

from typing import Dict, List, Mapping, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from trainer import distribute
from trainer.schema import INDEXED_KINDS, FeatureInfo

def combine(infos: Sequence[FeatureInfo],
            features: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
  """One side's features in the layout the embeddings read, computed the same way for the
  tables (once, at build) and for features given at serving time (cold start).

  Every indexed feature gets its own range of one combined vocabulary (offsets in `infos`
  order), so a side needs one embedding gather however many features it has:

    indices  int64 [b, W]: combined indices, W = the indexed features' widths summed
    weights  float32 [b, W]: 1 for a categorical or bucketized value, 1/k for each of a
             multi-hot feature's k values, 0 for missing (index 0) and padding
    numeric  float32 [b, N]: the numeric features, standardised

  Args:
    features: {name: int [b] (categorical, bucketized), int [b, width] (multi_hot, 0-padded),
      float [b] (numeric)}.
  """
  indices, weights, numeric, offset = [], [], [], 0
  for info in infos:
    value = tf.convert_to_tensor(features[info.name])
    if info.kind == "numeric":
      numeric.append(tf.cast(value, tf.float32))
      continue
    value = tf.cast(value, tf.int64)
    if info.kind != "multi_hot":
      value = value[:, None]
    present = tf.cast(value > 0, tf.float32)  # [b, w]
    count = tf.maximum(tf.reduce_sum(present, axis=1, keepdims=True), 1.0)
    indices.append(value + tf.constant(offset, tf.int64))
    weights.append(present / count)
    offset += info.vocab_size
  batch = tf.shape(tf.convert_to_tensor(features[infos[0].name]))[0]
  return {"indices": tf.concat(indices, 1) if indices else tf.zeros([batch, 0], tf.int64),
          "weights": tf.concat(weights, 1) if weights else tf.zeros([batch, 0], tf.float32),
          "numeric": tf.stack(numeric, 1) if numeric else tf.zeros([batch, 0], tf.float32)}


def feature_infos(infos: Sequence) -> List[FeatureInfo]:
  """FeatureInfos, from themselves or from their config dicts (a layer rebuilt from config)."""
  return [i if isinstance(i, FeatureInfo) else FeatureInfo(**i) for i in infos]


def _sizes(infos: Sequence[FeatureInfo]) -> Dict[str, int]:
  """Widths and sizes of the combined layout."""
  indexed = [i for i in infos if i.kind in INDEXED_KINDS]
  return {"width": sum(i.width if i.kind == "multi_hot" else 1 for i in indexed),
          "vocab": sum(i.vocab_size for i in indexed),
          "numeric": sum(i.kind == "numeric" for i in infos)}


@keras.saving.register_keras_serializable(package="neumf_trainer")
class FeatureTables(layers.Layer):
  """A side's feature tables as fixed weights, in the combined layout (`combine`);
  `call(ids)` gathers the batch's rows.

  Args:
    infos: the side's features.
    rows: table rows (dense IDs + the out-of-vocabulary row).
    tables: {name: per-feature array, as preparation writes them}; None builds zeros of the
      right shapes, to be restored from a checkpoint.
  """

  def __init__(self, infos: Sequence, rows: int, tables: Optional[Mapping] = None, **kwargs):
    super().__init__(**kwargs)
    self.infos = feature_infos(infos)
    self.rows = rows
    sizes = _sizes(self.infos)
    values = None
    if tables is not None:
      for info in self.infos:
        shape = (rows, info.width) if info.kind == "multi_hot" else (rows,)
        if np.shape(tables[info.name]) != shape:
          raise ValueError(f"feature {info.side}:{info.name}: table of shape "
                           f"{np.shape(tables[info.name])}, expected {shape}")
      values = {k: v.numpy() for k, v in combine(self.infos, tables).items()}
    # Each weight is an attribute of its own: TensorFlow checkpoints track attributes. The
    # index table is int64: an int32 variable has no GPU kernel (TensorFlow keeps it on the
    # host, where an XLA-compiled step on a GPU cannot read it). Checkpoints before int64 held
    # an int32 `indices`; `checkpointer.restore` reads them (`LEGACY_INDEX_TABLE`).
    self.index_table = self._table("indices", (rows, sizes["width"]), "int64", values)
    self.weights_table = self._table("weights", (rows, sizes["width"]), "float32", values)
    self.numeric = self._table("numeric", (rows, sizes["numeric"]), "float32", values)

  def _table(self, name, shape, dtype, values):
    initializer = (keras.initializers.Zeros() if values is None
                   else (lambda v: lambda shape, dtype=None: ops.convert_to_tensor(v))(
                       values[name]))
    return self.add_weight(shape=shape, dtype=dtype, trainable=False, initializer=initializer,
                           name=f"{name}_table")

  def call(self, ids):
    """The batch's rows: {indices, weights: [b, W], numeric: [b, N]}."""
    ids = ops.cast(ids, "int64")
    return {name: tf.gather(distribute.local_variable(table.value), ids)
            for name, table in (("indices", self.index_table), ("weights", self.weights_table),
                                ("numeric", self.numeric))}

  def get_config(self):
    config = super().get_config()
    config.update(infos=[i.to_dict() for i in self.infos], rows=self.rows)
    return config


# Combined vocabularies up to this size get a dense [vocabulary, dim] gradient: a feature's few
# values repeat across a batch, and summing their rows in the backward pass is cheaper than
# handing the optimizer one sparse row per (example, value). Larger ones are gathered with a
# sparse gradient (lazy updates of the rows seen).
DENSE_VOCABULARY = 16384


def _gathered_sum(table, indices, weights):
  """sum_w weights[b, w] * table[indices[b, w]]: [b, d], one gather per column (or, for
  serving inputs whose width is not fixed, one gather of them all)."""
  if indices.shape[1] is None:
    return tf.einsum("bw,bwd->bd", weights, tf.gather(table, indices))
  total = weights[:, 0, None] * tf.gather(table, indices[:, 0])
  for w in range(1, indices.shape[1]):
    total += weights[:, w, None] * tf.gather(table, indices[:, w])
  return total


@tf.function(jit_compile=True)
def _compiled_sum(table, indices, weights):
  return _gathered_sum(table, indices, weights)


@tf.function(jit_compile=True)
def _compiled_scatter(upstream, indices, weights, vocabulary: int):
  """The gradient of `_gathered_sum` in its table: [vocabulary, d], summed per value."""
  total = tf.zeros([vocabulary, upstream.shape[1]], upstream.dtype)
  for w in range(indices.shape[1]):
    total = tf.tensor_scatter_nd_add(total, indices[:, w, None], weights[:, w, None] * upstream)
  return total


def _weighted_rows(table, indices, weights):
  """`_gathered_sum` for training, forward and backward compiled by XLA, whose CPU gathers and
  scatter-adds are plain loops: TensorFlow's own kernels for the same sums (a SparseTensor
  product, a dense weight matrix, unsorted_segment_sum) cost several times more (README,
  "Design choices, measured"). Training batches have one static shape, so XLA compiles once;
  serving does not come here (`FeatureEmbedding.call`)."""

  @tf.custom_gradient
  def rows(table):
    def gradient(upstream):
      return _compiled_scatter(upstream, indices, weights, table.shape[0])

    return _compiled_sum(table, indices, weights), gradient

  return rows(table)


@keras.saving.register_keras_serializable(package="neumf_trainer")
class FeatureEmbedding(layers.Layer):
  """The sum of a side's feature embeddings at one size: [b, dim] from its combined rows.

  One table [combined vocabulary, dim] for every indexed feature of the side (one gather per
  batch) and one projection [numeric features, dim].
  """

  def __init__(self, infos: Sequence, dim: int, **kwargs):
    super().__init__(**kwargs)
    self.infos = feature_infos(infos)
    self.dim = dim
    sizes = _sizes(self.infos)
    init = keras.initializers.RandomNormal(stddev=0.01)
    # Built here, not lazily: the custom training loop needs every variable before step 1.
    # Read in float32 under mixed precision too (autocast off): a value shared by thousands of
    # rows sums their gradients, which bfloat16 would round away (256 + 1 == 256) and float16
    # at the loss scale overflow; the sum is cast to the compute dtype once.
    self.embeddings = self.add_weight(shape=(max(sizes["vocab"], 1), dim), initializer=init,
                                      name="embeddings", autocast=False)
    self.projection = (self.add_weight(shape=(sizes["numeric"], dim), initializer=init,
                                       name="numeric_projection", autocast=False)
                       if sizes["numeric"] else None)

  def call(self, combined: Mapping[str, tf.Tensor], training: bool = False):
    table = distribute.local_variable(self.embeddings.value)
    indices, weights = combined["indices"], combined["weights"]  # [b, W]
    weights = tf.cast(weights, table.dtype)
    if self.embeddings.shape[0] <= DENSE_VOCABULARY:
      # Serving and evaluation need no gradient, and take any batch size without compiling.
      total = (_weighted_rows(tf.convert_to_tensor(table), indices, weights) if training
               else _gathered_sum(table, indices, weights))
    else:
      rows = tf.gather(table, indices)  # [b, W, dim]
      total = tf.einsum("bw,bwd->bd", weights, rows)
    if self.projection is not None:
      total += ops.matmul(ops.cast(combined["numeric"], total.dtype),
                          ops.cast(self.projection, total.dtype))
    return ops.cast(total, self.compute_dtype)

  def get_config(self):
    config = super().get_config()
    config.update(infos=[i.to_dict() for i in self.infos], dim=self.dim)
    return config
