"""Recommender models: Keras 3 layers that score (user, item) index pairs.

Every model takes `{"user": int[b], "item": int[b]}` of dense indices (as written by
preparation) and returns a score of shape [b]: a rating for explicit feedback, a logit for
implicit feedback. Index `num_users` (resp. `num_items`) is the out-of-vocabulary row: the
export maps unknown raw IDs there, so serving never fails on them.

With p_u, q_i the user and item embeddings:

  seed_mlp  r(u, i) = w2 . relu(W1 [p_u ; q_i] + b1) + b2           (the classic regressor)
  gmf       s(u, i) = h . (p_u * q_i) + b                              (He et al. 2017, GMF)
  mlp       s(u, i) = h . MLP([p_u ; q_i]) + b, MLP = ReLU tower `layers` (He et al., MLP)
  neumf     s(u, i) = h . [p_u^G * q_i^G ; MLP([p_u^M ; q_i^M])] + b   (NeuMF: separate
            embeddings for the two paths, fused by one output layer)
  mf        s(u, i) = <p_u, q_i> + b_u + b_i + b                       (Rendle et al. 2020:
            a well-tuned dot product, the baseline NeuMF must beat); with `history`, p_u also
            sums the user's latest training items before the example (`MF`)
  autorec   s(u, i) = <w_u, sigmoid(V^T r_i + mu)> + b_u + b_i + b       (item-based AutoRec,
            Sedhain et al. 2015: the item coded from its training interactions r_i; or, with
            side="user", the user coded from theirs)

`score_all(users)` scores every item for each user, [b, num_items]: mf, gmf and autorec, whose
score is a user vector . an item vector (+ biases), by one matmul against the item table (the
items' codes); the others pair by pair. Full-catalogue evaluation, `recommend` and the softmax
objective use it.

Objectives (in `trainer.objectives`): explicit, mean squared error on ratings; implicit, binary
cross-entropy of s(u, i) against 1 for observed pairs and 0 for sampled negatives; implicit_bpr,
the pairwise logistic loss of each positive against its negatives; implicit_softmax, each
positive against the whole catalogue (mf, gmf). Every model
adds `l2 * (|p_u|^2 + |q_i|^2 (+ b_u^2 + b_i^2))` per example (`scores_and_penalty`, from the
rows the scores were computed with): the regulariser touches only the rows of the batch, which
keeps embedding updates sparse.
The output bias starts at `output_bias` (the mean rating for explicit feedback).

Side features (`features`, `trainer.feature_layers`): each of a side's representations above
(p_u, q_i, and MF's biases) becomes its ID row plus its part of the side's feature embedding,
f(u) = sum of the embeddings of u's features, one embedding per side as wide as the side's
representations together (NeuMF: [GMF ; MLP], MF: [factors ; bias]); the L2 penalty stays on
the ID rows.
"""

import random
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops
# Whether a function is being traced for XLA, where shapes must be static.
from tensorflow.python.ops import control_flow_util

from trainer import distribute, feature_layers, parameter_server, schema
from trainer.data import artifacts
from trainer.config import MODELS



@keras.saving.register_keras_serializable(package="neumf_trainer")
class Embedding(layers.Embedding):
  """Keras's Embedding, gathering the batch's rows straight from the variable.

  Keras's `call` converts the whole table to a tensor before `take`, which made every training
  step markedly slower (presumably TensorFlow copying the table when the optimizer updates rows
  of a variable whose full read is still alive). Gathering from the variable itself
  (ResourceGather) reads only the batch's rows; the gradient is the same IndexedSlices.
  Measured here (2 cores, batch 8192, 100K users x 20K items, in memory, single runs on a noisy
  machine): seed_mlp 237K -> 327K training examples/s, neumf 610K -> 836K.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
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


class Recommender(keras.Model):
  """Shared plumbing: sizes, the L2 penalty on the gathered embeddings, config."""

  def __init__(self, num_users: int, num_items: int, l2: float = 0.0,
               output_bias: float = 0.0, features: Optional[Mapping] = None, **kwargs):
    super().__init__(**kwargs)
    self.num_users = num_users
    self.num_items = num_items
    self.l2 = l2
    self.output_bias = output_bias
    # Side features: {side: SideFeatures}, or their config ({side: {infos, rows}}) when
    # rebuilt from a config, the tables then coming from a checkpoint.
    self.feature_sides = {}
    for side, given in (features or {}).items():
      infos, rows, tables = ((given.infos, given.rows, given.tables)
                             if isinstance(given, feature_layers.SideFeatures)
                             else (given["infos"], given["rows"], None))
      layer = feature_layers.FeatureTables(infos, rows, tables, name=f"{side}_feature_tables")
      setattr(self, f"{side}_feature_tables", layer)
      self.feature_sides[side] = layer

  def _side_features(self, parts: Sequence[int]) -> None:
    """One feature embedding per side, as wide as the side's representations together
    (`parts`: their sizes, e.g. NeuMF's GMF and MLP embeddings), split per representation in
    `_feature_parts`. One per side, not one per representation: each costs a sparse matmul
    forward and back whatever its width (NeuMF: 2 instead of 4)."""
    self.feature_parts = tuple(int(p) for p in parts)
    self.feature_embeddings = {}
    for side, tables in self.feature_sides.items():
      layer = feature_layers.FeatureEmbedding(tables.infos, sum(self.feature_parts),
                                              name=f"{side}_features")
      setattr(self, f"{side}_features", layer)
      self.feature_embeddings[side] = layer

  def _feature_parts(self, inputs: Mapping,
                     training: bool = False) -> Dict[str, List[Optional[tf.Tensor]]]:
    """{side: one [b, part] feature term per representation of the side}, all None for a side
    without features. The batch's feature rows come from the tables, or (cold start) from the
    values given in `inputs["<side>_features"]`."""
    return {side: self._side_terms(side, inputs[side], inputs.get(f"{side}_features"),
                                   training)
            for side in (schema.USER, schema.ITEM)}

  def _side_terms(self, side: str, ids, given: Optional[Mapping] = None,
                  training: bool = False) -> List[Optional[tf.Tensor]]:
    """One side's feature terms of `ids` (or of the feature values `given`), one [b, part]
    per representation; all None when the side has no features."""
    layer = self.feature_embeddings.get(side)
    if layer is None:
      return [None] * len(self.feature_parts)
    total = layer(given if given is not None else self.feature_sides[side](ids),
                  training=training)
    return (ops.split(total, list(_cumulative(self.feature_parts[:-1])), axis=-1)
            if len(self.feature_parts) > 1 else [total])

  @staticmethod
  def _represent(embedding: "Embedding", term: Optional[tf.Tensor], ids,
                 penalized: List[tf.Tensor]) -> tf.Tensor:
    """ID embedding plus (with features) the side's feature term: [b, d]. The ID rows go
    to `penalized`: the L2 penalty falls on per-entity parameters only, so that what many
    entities share is learnt by their features, which also serve entities never trained."""
    rows = embedding(ids)
    penalized.append(rows)
    return rows if term is None else rows + term

  def _embedding(self, rows: int, dim: int, name: str) -> Embedding:
    # +1: the out-of-vocabulary row. Small normal init, as in the NCF reference code.
    return Embedding(rows + 1, dim, name=name, embeddings_initializer=RowBlockNormal(0.01))

  def _add_biases(self) -> None:
    """User, item (zeros) and global (`output_bias`) biases: mf's and autorec's."""
    zeros = keras.initializers.Zeros()
    self.user_bias = Embedding(self.num_users + 1, 1, embeddings_initializer=zeros,
                               name="user_bias")
    self.item_bias = Embedding(self.num_items + 1, 1, embeddings_initializer=zeros,
                               name="item_bias")
    self.global_bias = self.add_weight(
        shape=(), initializer=keras.initializers.Constant(self.output_bias), name="global_bias")

  def _plus_biases(self, scores, users, items, bias_u, bias_i):
    """[b, n] `scores` of users x items, plus b_u + b_i + b (with the sides' bias terms)."""
    b_u = self._represent(self.user_bias, bias_u, users, [])  # [b, 1]
    b_i = self._represent(self.item_bias, bias_i, items, [])  # [n, 1]
    return scores + b_u + tf.transpose(b_i) + ops.cast(self.global_bias, scores.dtype)

  def _output(self, name: str = "score") -> layers.Dense:
    return Score(name=name, bias_initializer=keras.initializers.Constant(self.output_bias))

  def forward(self, inputs: Dict, training: bool = False) -> Tuple[tf.Tensor, List[tf.Tensor]]:
    """(scores [b], the embedding rows gathered for them: [b, ...] tensors)."""
    raise NotImplementedError

  def call(self, inputs, training=False):
    return self.forward(inputs, training)[0]

  def score_all(self, users: tf.Tensor, training: bool = False,
                items: Optional[tf.Tensor] = None) -> tf.Tensor:
    """Each user's score for every trained item: [b, num_items] (item index = column).
    `items`: in training, the examples' own items, for models whose user vector depends on
    the example (mf with `history`: the history before it); the others ignore them.

    Here through `forward` on every (user, item) pair, b x num_items examples; models whose
    score factorises into a user and an item vector (mf, gmf) override it with one matmul
    against the item table, which full-catalogue evaluation, `recommend` and the softmax
    objective then cost (b + n) representations instead of b x n examples.
    """
    return score_every_pair(lambda pairs: self.forward(pairs, training)[0], users,
                            self.num_items)

  def softmax_scores(self, inputs: Dict, training: bool = False):
    """(the examples' scores [b], their users' scores of every item [b, num_items], the
    penalty [b]): what the softmax objective needs, here by `scores_and_penalty` and
    `score_all`; mf overrides it to build each user vector once for both."""
    scores, penalty = self.scores_and_penalty(inputs, training)
    return (scores, self.score_all(inputs[schema.USER], training, items=inputs[schema.ITEM]),
            penalty)

  def _all_items(self, users: tf.Tensor) -> tf.Tensor:
    return tf.range(self.num_items, dtype=users.dtype)

  def scores_and_penalty(self, inputs: Dict, training: bool = False):
    """(scores [b], l2 * the squared norm of the example's embedding rows [b]), from one lookup
    of the rows (a separate penalty would gather them, and back-propagate into them, twice)."""
    scores, rows = self.forward(inputs, training)
    return scores, self._penalty(scores, rows)

  def _penalty(self, scores: tf.Tensor, rows: Sequence[tf.Tensor]) -> tf.Tensor:
    """l2 * the squared norm of each example's `rows`: float32 [b]."""
    if not self.l2:
      return ops.zeros_like(ops.cast(scores, "float32"))
    total = 0.0
    for r in rows:
      r = ops.cast(r, "float32")
      total = total + ops.sum(ops.square(ops.reshape(r, (ops.shape(r)[0], -1))), axis=-1)
    return self.l2 * total

  def get_config(self):
    config = super().get_config()
    config.update(num_users=self.num_users, num_items=self.num_items, l2=self.l2,
                  output_bias=self.output_bias,
                  features={side: {"infos": [i.to_dict() for i in t.infos], "rows": t.rows}
                            for side, t in self.feature_sides.items()})
    return config


def score_every_pair(score, users: tf.Tensor, num_items: int) -> tf.Tensor:
  """[b, num_items] from `score`, a scorer of (user, item) pairs, run on the b x num_items
  pairs of `users` and every item."""
  batch = tf.shape(users)[0]
  all_items = tf.range(num_items, dtype=users.dtype)
  return tf.reshape(score({schema.USER: tf.repeat(users, num_items),
                           schema.ITEM: tf.tile(all_items, [batch])}), [batch, num_items])


def _cumulative(sizes: Sequence[int]) -> List[int]:
  """Split points: [a, b, c] -> [a, a + b, a + b + c]."""
  out, total = [], 0
  for size in sizes:
    total += size
    out.append(total)
  return out


def _tower(owner: keras.Model, units: Sequence[int], dropout: float, prefix: str):
  """A ReLU tower whose layers are attributes of `owner`: TensorFlow checkpoints track
  attributes, not layers held only in a Python list."""
  out = []
  for k, n in enumerate(units):
    out.append(layers.Dense(n, activation="relu", name=f"{prefix}_{k}"))
    if dropout:
      out.append(layers.Dropout(dropout, name=f"{prefix}_dropout_{k}"))
  for layer in out:
    setattr(owner, layer.name, layer)
  return out


def _run(stack, x, training):
  for layer in stack:
    x = layer(x, training=training) if isinstance(layer, layers.Dropout) else layer(x)
  return x


@keras.saving.register_keras_serializable(package="neumf_trainer")
class SeedMLP(Recommender):
  """User and item embeddings, concatenated, through one ReLU layer to a score."""

  def __init__(self, num_users: int, num_items: int, embedding_dim: int = 64,
               hidden_units: int = 256, **kwargs):
    super().__init__(num_users, num_items, **kwargs)
    self.embedding_dim = embedding_dim
    self.hidden_units = hidden_units
    # Keras's default uniform initialiser here, as in the classic regressor.
    self.user_embedding = Embedding(num_users + 1, embedding_dim, name="user_embedding")
    self.item_embedding = Embedding(num_items + 1, embedding_dim, name="item_embedding")
    self._side_features([embedding_dim])
    self.hidden = layers.Dense(hidden_units, activation="relu", name="hidden")
    self.rating = self._output("rating")

  def forward(self, inputs, training=False):
    terms, penalized = self._feature_parts(inputs, training), []
    users = self._represent(self.user_embedding, terms[schema.USER][0], inputs[schema.USER],
                            penalized)  # [b, d]
    items = self._represent(self.item_embedding, terms[schema.ITEM][0], inputs[schema.ITEM],
                            penalized)  # [b, d]
    x = ops.concatenate([users, items], axis=-1)  # [b, 2d]
    return ops.squeeze(self.rating(self.hidden(x)), axis=-1), penalized  # [b]

  def get_config(self):
    config = super().get_config()
    config.update(embedding_dim=self.embedding_dim, hidden_units=self.hidden_units)
    return config


@keras.saving.register_keras_serializable(package="neumf_trainer")
class GMF(Recommender):
  """Generalized matrix factorization: a learned weighting of p_u * q_i."""

  def __init__(self, num_users: int, num_items: int, embedding_dim: int = 8, **kwargs):
    super().__init__(num_users, num_items, **kwargs)
    self.embedding_dim = embedding_dim
    self.user_embedding = self._embedding(num_users, embedding_dim, "gmf_user_embedding")
    self.item_embedding = self._embedding(num_items, embedding_dim, "gmf_item_embedding")
    self._side_features([embedding_dim])
    self.score = self._output()

  def forward(self, inputs, training=False):
    terms, penalized = self._feature_parts(inputs, training), []
    users = self._represent(self.user_embedding, terms[schema.USER][0], inputs[schema.USER],
                            penalized)
    items = self._represent(self.item_embedding, terms[schema.ITEM][0], inputs[schema.ITEM],
                            penalized)
    return ops.squeeze(self.score(users * items), axis=-1), penalized  # [b]

  def score_all(self, users, training=False, items=None):
    """h . (p_u * q_i) + b = (p_u * h) . q_i + b: one [b, d] x [d, n] matmul."""
    items = self._all_items(users)
    p = self._represent(self.user_embedding, self._side_terms(schema.USER, users, None,
                                                              training)[0], users, [])
    q = self._represent(self.item_embedding, self._side_terms(schema.ITEM, items, None,
                                                              training)[0], items, [])
    weights = ops.cast(self.score.kernel[:, 0], p.dtype)
    return (tf.matmul(p * weights[None, :], q, transpose_b=True)
            + ops.cast(self.score.bias[0], p.dtype))

  def get_config(self):
    config = super().get_config()
    config.update(embedding_dim=self.embedding_dim)
    return config


@keras.saving.register_keras_serializable(package="neumf_trainer")
class MLP(Recommender):
  """Concatenated embeddings through a ReLU tower of `layers` units."""

  def __init__(self, num_users: int, num_items: int, embedding_dim: int = 32,
               layers: Sequence[int] = (64, 32, 16, 8), dropout: float = 0.0, **kwargs):
    super().__init__(num_users, num_items, **kwargs)
    self.embedding_dim = embedding_dim
    self.layer_sizes = tuple(int(n) for n in layers)
    self.dropout = dropout
    self.user_embedding = self._embedding(num_users, embedding_dim, "mlp_user_embedding")
    self.item_embedding = self._embedding(num_items, embedding_dim, "mlp_item_embedding")
    self._side_features([embedding_dim])
    self.tower = _tower(self, self.layer_sizes, dropout, "mlp")
    self.score = self._output()

  def forward(self, inputs, training=False):
    terms, penalized = self._feature_parts(inputs, training), []
    users = self._represent(self.user_embedding, terms[schema.USER][0], inputs[schema.USER],
                            penalized)
    items = self._represent(self.item_embedding, terms[schema.ITEM][0], inputs[schema.ITEM],
                            penalized)
    x = _run(self.tower, ops.concatenate([users, items], axis=-1), training)  # [b, layers[-1]]
    return ops.squeeze(self.score(x), axis=-1), penalized

  def get_config(self):
    config = super().get_config()
    config.update(embedding_dim=self.embedding_dim, layers=list(self.layer_sizes),
                  dropout=self.dropout)
    return config


@keras.saving.register_keras_serializable(package="neumf_trainer")
class NeuMF(Recommender):
  """GMF and MLP paths with their own embeddings, fused by one output layer."""

  def __init__(self, num_users: int, num_items: int, embedding_dim: int = 8,
               mlp_embedding_dim: int = 32, layers: Sequence[int] = (64, 32, 16, 8),
               dropout: float = 0.0, **kwargs):
    super().__init__(num_users, num_items, **kwargs)
    self.embedding_dim = embedding_dim
    self.mlp_embedding_dim = mlp_embedding_dim
    self.layer_sizes = tuple(int(n) for n in layers)
    self.dropout = dropout
    self.gmf_user_embedding = self._embedding(num_users, embedding_dim, "gmf_user_embedding")
    self.gmf_item_embedding = self._embedding(num_items, embedding_dim, "gmf_item_embedding")
    self.mlp_user_embedding = self._embedding(num_users, mlp_embedding_dim,
                                              "mlp_user_embedding")
    self.mlp_item_embedding = self._embedding(num_items, mlp_embedding_dim,
                                              "mlp_item_embedding")
    self._side_features([embedding_dim, mlp_embedding_dim])  # [GMF ; MLP] per side
    self.tower = _tower(self, self.layer_sizes, dropout, "mlp")
    self.score = self._output()

  def forward(self, inputs, training=False):
    users, items = inputs[schema.USER], inputs[schema.ITEM]
    parts, penalized = self._feature_parts(inputs, training), []
    (gmf_u, mlp_u), (gmf_i, mlp_i) = parts[schema.USER], parts[schema.ITEM]
    rows = [self._represent(self.gmf_user_embedding, gmf_u, users, penalized),
            self._represent(self.gmf_item_embedding, gmf_i, items, penalized),
            self._represent(self.mlp_user_embedding, mlp_u, users, penalized),
            self._represent(self.mlp_item_embedding, mlp_i, items, penalized)]
    gmf = rows[0] * rows[1]  # [b, d]
    mlp = _run(self.tower, ops.concatenate(rows[2:], axis=-1), training)  # [b, layers[-1]]
    return ops.squeeze(self.score(ops.concatenate([gmf, mlp], axis=-1)), axis=-1), penalized

  def load_pretrained(self, gmf: "GMF", mlp: "MLP", alpha: float = 0.5) -> None:
    """Starts from trained GMF and MLP models (He et al. 2017, section 3.4.1): their
    embeddings and tower as they are, the output layer [alpha h_GMF ; (1 - alpha) h_MLP]."""
    pairs = [(gmf.user_embedding, self.gmf_user_embedding),
             (gmf.item_embedding, self.gmf_item_embedding),
             (mlp.user_embedding, self.mlp_user_embedding),
             (mlp.item_embedding, self.mlp_item_embedding)]
    pairs += [(s, t) for s, t in zip(mlp.tower, self.tower) if s.weights]
    for source, target in pairs:
      for s, t in zip(source.weights, target.weights):
        if tuple(s.shape) != tuple(t.shape):
          raise ValueError(f"pretrained weight {s.path} has shape {tuple(s.shape)}, NeuMF "
                           f"expects {tuple(t.shape)}: pretrain with the same sizes")
        t.assign(s)
    self.score.kernel.assign(ops.concatenate([alpha * gmf.score.kernel,
                                              (1 - alpha) * mlp.score.kernel], axis=0))
    self.score.bias.assign(alpha * gmf.score.bias + (1 - alpha) * mlp.score.bias)

  def get_config(self):
    config = super().get_config()
    config.update(embedding_dim=self.embedding_dim, mlp_embedding_dim=self.mlp_embedding_dim,
                  layers=list(self.layer_sizes), dropout=self.dropout)
    return config


@keras.saving.register_keras_serializable(package="neumf_trainer")
class MF(Recommender):
  """Dot product with user, item and global biases; with `history` L, the user vector also
  sums the user's L latest training items before the example (SVD++'s implicit feedback,
  Koren 2008, made sequential):

    p_u = e_u + sum_l a_l y_(l-th latest item),   a_l learnt per recency (starting at 1)

  so a training example is scored from what came before it, and evaluation and serving from
  the whole history (`HistoryTable`). y has its own table; the L2 penalty falls on its rows
  too.

  Args:
    positives: with `history`, the training positives with their time order
      (`PreparedData.train_positives`), or {"count": n} for a model rebuilt from its config.
  """

  def __init__(self, num_users: int, num_items: int, embedding_dim: int = 64,
               history: int = 0, positives: Optional[Mapping] = None, **kwargs):
    super().__init__(num_users, num_items, **kwargs)
    self.embedding_dim = embedding_dim
    self.history = history
    self.user_embedding = self._embedding(num_users, embedding_dim, "user_embedding")
    self.item_embedding = self._embedding(num_items, embedding_dim, "item_embedding")
    if history:
      self.history_table = HistoryTable(num_users, num_items, history, positives,
                                        name="history_table")
      self.history_embedding = self._embedding(num_items, embedding_dim, "history_embedding")
      self.recency_weights = self.add_weight(shape=(history,), name="recency_weights",
                                             initializer=keras.initializers.Ones())
    self._add_biases()
    # Features shift the factors and the biases alike (a cold item gets a bias by genre).
    self._side_features([embedding_dim, 1])  # [factors ; bias] per side

  def _user_vector(self, users, items, term, penalized, latest=None):
    """p_u [b, d]: the ID row (+ the feature term) (+ the history before `items`, or the
    `latest` items given)."""
    p = self._represent(self.user_embedding, term, users, penalized)
    if not self.history:
      return p
    if latest is None:
      latest = self.history_table(users, items)  # [b, L]
    mask = ops.cast(tf.not_equal(latest, self.num_items), p.dtype)[:, :, None]
    rows = self.history_embedding(latest) * mask  # [b, L, d]
    penalized.append(rows)
    weights = ops.cast(self.recency_weights, p.dtype)[None, :, None]
    return p + ops.sum(rows * weights, axis=1)

  def _forward(self, inputs, training=False):
    """(scores [b], penalized rows, the user vectors p [b, d], the user bias's feature term)."""
    users, items = inputs[schema.USER], inputs[schema.ITEM]
    parts, penalized = self._feature_parts(inputs, training), []
    (factors_u, bias_u), (factors_i, bias_i) = parts[schema.USER], parts[schema.ITEM]
    # Training examples see the history before them (a sampled negative: before its
    # positive, the anchor, as the positive does); evaluation and serving all of it.
    before = inputs.get(schema.ANCHOR, items) if training else None
    p = self._user_vector(users, before, factors_u, penalized)
    q = self._represent(self.item_embedding, factors_i, items, penalized)
    biases = [self._represent(self.user_bias, bias_u, users, penalized),
              self._represent(self.item_bias, bias_i, items, penalized)]
    dot = ops.sum(p * q, axis=-1)  # [b]
    bias = ops.squeeze(biases[0], -1) + ops.squeeze(biases[1], -1)
    # Read in the compute dtype, as Keras's call would under a mixed-precision policy.
    return dot + bias + ops.cast(self.global_bias, dot.dtype), penalized, p, bias_u

  def forward(self, inputs, training=False):
    return self._forward(inputs, training)[:2]

  def _catalogue_scores(self, p, users, bias_u, training=False):
    """<p_u, q_i> + b_u + b_i + b of every item for user vectors p [b, d]: one matmul."""
    catalogue = self._all_items(users)
    factors_i, bias_i = self._side_terms(schema.ITEM, catalogue, None, training)
    q = self._represent(self.item_embedding, factors_i, catalogue, [])  # [n, d]
    return self._plus_biases(tf.matmul(p, q, transpose_b=True), users, catalogue, bias_u,
                             bias_i)

  def score_all(self, users, training=False, items=None, latest=None):
    """<p_u, q_i> + b_u + b_i + b for every item: one [b, d] x [d, n] matmul. With `history`,
    `items` (the examples' items, in training) place each user's history before them;
    `latest` [b, history] (item indices, latest first, `num_items` for none) stands for the
    users' training history (serving what they did since)."""
    factors_u, bias_u = self._side_terms(schema.USER, users, None, training)
    p = self._user_vector(users, items, factors_u, [], latest)  # [b, d]
    return self._catalogue_scores(p, users, bias_u, training)

  def softmax_scores(self, inputs, training=False):
    """The base class's, from one user vector per example (its ID row, features and history
    gathered once, not again for the catalogue's scores)."""
    scores, penalized, p, bias_u = self._forward(inputs, training)
    return (scores, self._catalogue_scores(p, inputs[schema.USER], bias_u, training),
            self._penalty(scores, penalized))

  def get_config(self):
    config = super().get_config()
    config.update(embedding_dim=self.embedding_dim, history=self.history)
    if self.history:
      config.update(positives={"count": self.history_table.count})
    return config


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

  def call(self, ids, table):
    """sum_j values_j table[columns_j] over each row of `ids`: [len(ids), d] float32.

    Three ways, each where it is right. Inside an XLA function, where shapes must be static,
    every row is coded and the batch's gathered (a sparse product and a ragged range have no
    XLA kernels). On a machine with GPUs (`distribute.gpu_code_paths`; `segments` forces it),
    gathers and segment sums, `chunk` values at a time, so memory stays bounded however many
    rows are coded (the whole catalogue, for full evaluation and serving): the GPU sparse
    product raises under op determinism and refuses nnz x d > 2^31, and a ragged range runs
    on the host. On CPUs, the sparse product, faster there (README, "On GPUs").
    """
    ids = ops.cast(ids, "int64")
    table = tf.cast(table, tf.float32)
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()):
      return tf.gather(self._every_row(table), ids)
    if not (self.segments or distribute.gpu_code_paths()):
      return self._sparse_product(ids, table)
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

  def _sparse_product(self, ids, table):
    """The rows of `ids` as a SparseTensor, times `table` (CPUs)."""
    indptr = distribute.local_variable(self.indptr.value)
    starts, ends = tf.gather(indptr, ids), tf.gather(indptr, ids + 1)
    positions = tf.ragged.range(starts, ends)  # [b, (row length)]
    flat = positions.flat_values
    columns = tf.gather(distribute.local_variable(self.indices.value), flat)
    values = tf.cast(tf.gather(distribute.local_variable(self.values.value), flat), tf.float32)
    rows = tf.SparseTensor(tf.stack([positions.value_rowids(), columns], axis=1), values,
                           tf.stack([tf.shape(ids, out_type=tf.int64)[0],
                                     tf.constant(self.columns, tf.int64)]))
    return tf.sparse.sparse_dense_matmul(rows, table)

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


@keras.saving.register_keras_serializable(package="neumf_trainer")
class AutoRec(Recommender):
  """AutoRec (Sedhain et al. 2015) as a factorised scorer. With `side="item"` (I-AutoRec) an
  item is encoded from the vector of its training interactions r_i [users] (ratings; 1 for
  implicit feedback),

    h_i = sigmoid(V^T r_i + mu (+ the item's feature term)),   s(u, i) = <w_u, h_i> + b_u + b_i + b

  the decoder's user rows w_u (+ the user's feature term) acting as user embeddings; with
  `side="user"` (U-AutoRec) a user is encoded from r_u [items] the same way and the decoder's
  rows are the item embeddings. The encoder V [other side, d] is read whole each step (a
  sparse batch of interaction vectors times V; a dense gradient, which replicas all-reduce as
  one device's) and takes `l2 * |V|^2 / rows` per example, a row as often as the average
  decoder row. Training leaves the example's own interaction out of its encoding (r_i less
  r_ui, or r_u less r_ui), so the model learns to predict an interaction from the others,
  which is what evaluation asks of it. An entity without training interactions (cold, or the
  OOV row) is encoded from its features alone; `dropout` trains that case: that fraction of
  the training examples is coded without its interactions (DropoutNet, Volkovs et al. 2017),
  so the decoder learns to score feature-only codes.

  Args:
    interactions: the training interactions as sparse rows of the coded side
      (`PreparedData.train_interactions(side)`), or {"count": n} for a model rebuilt from its
      config, restored from a checkpoint; None: none.
    ratings: the table holds ratings (explicit feedback), not 1s.
    side: the coded side, "item" or "user".
  """

  def __init__(self, num_users: int, num_items: int, embedding_dim: int = 500,
               interactions: Optional[Mapping] = None, ratings: bool = True,
               dropout: float = 0.0, side: str = schema.ITEM, **kwargs):
    super().__init__(num_users, num_items, **kwargs)
    if side not in (schema.USER, schema.ITEM):
      raise ValueError(f"autorec codes {schema.USER!r} or {schema.ITEM!r}, not {side!r}")
    self.embedding_dim = embedding_dim
    self.ratings = ratings
    self.dropout = dropout
    self.side = side
    self.other = schema.USER if side == schema.ITEM else schema.ITEM
    sizes = {schema.USER: num_users, schema.ITEM: num_items}
    self.encoder_rows = sizes[self.other] + 1
    # Drops whole interaction vectors (a [b, 1] mask): 1 / (1 - rate) is undone in `_encode`.
    self.code_dropout = layers.Dropout(dropout, name="interaction_dropout") if dropout else None
    self.history = InteractionTable(sizes[side] + 1, self.encoder_rows, interactions,
                                    name=f"{side}_interactions")
    self.encoder = Embedding(self.encoder_rows, embedding_dim, name="encoder",
                             embeddings_initializer=keras.initializers.GlorotUniform())
    self.encoder_bias = self.add_weight(shape=(embedding_dim,), name="encoder_bias",
                                        initializer=keras.initializers.Zeros())
    # The decoder's rows, named by their side (user_embedding for I-AutoRec).
    self.decoder = self._embedding(sizes[self.other], embedding_dim, f"{self.other}_embedding")
    self._add_biases()
    self._side_features([embedding_dim, 1])  # [encoding or decoder row ; bias] per side

  def _encode(self, ids, term, others=None, own=None, training=False):
    """(h [b, d] of `ids` of the coded side, the encoder V [other side + 1, d]); with `others`
    (the examples' ids of the other side) and `own` (r_ui [b]), each code less its own r_ui;
    in training, with `dropout`, a fraction of the examples coded from their features alone."""
    unique, position = tf.unique(ops.cast(ids, "int64"))
    # The whole encoder, a dense gradient (replicas all-reduce it as one device's); under a
    # parameter server gathered from its shards.
    table = distribute.local_variable(self.encoder.embeddings.value)
    encoder = ops.cast(self.encoder(tf.range(self.encoder_rows))
                       if parameter_server.is_sharded(table) else tf.convert_to_tensor(table),
                       "float32")
    encoded = self.history(unique, encoder)  # [unique ids, d]
    pre = tf.gather(encoded, position)
    if own is not None:
      pre -= ops.cast(own, "float32")[:, None] * tf.gather(encoder, ops.cast(others, "int64"))
    if training and self.code_dropout is not None:
      keep = self.code_dropout(tf.ones_like(pre[:, :1]), training=True) * (1.0 - self.dropout)
      pre *= keep
    pre += ops.cast(self.encoder_bias, "float32")
    if term is not None:
      pre += ops.cast(term, "float32")
    return ops.cast(tf.sigmoid(pre), self.compute_dtype), encoder

  def _forward(self, inputs, training=False):
    """(scores [b], penalized rows, the encoder)."""
    ids = {schema.USER: inputs[schema.USER], schema.ITEM: inputs[schema.ITEM]}
    parts, penalized = self._feature_parts(inputs, training), []
    factors, biases = ({side: parts[side][0] for side in ids},
                       {side: parts[side][1] for side in ids})
    w = self._represent(self.decoder, factors[self.other], ids[self.other], penalized)
    h, encoder = self._encode(ids[self.side], factors[self.side], ids[self.other],
                              self._own_value(inputs) if training else None, training)
    b_u = self._represent(self.user_bias, biases[schema.USER], ids[schema.USER], penalized)
    b_i = self._represent(self.item_bias, biases[schema.ITEM], ids[schema.ITEM], penalized)
    score = (ops.sum(w * h, axis=-1) + ops.squeeze(b_u, -1) + ops.squeeze(b_i, -1)
             + ops.cast(self.global_bias, w.dtype))
    return score, penalized, encoder

  def forward(self, inputs, training=False):
    return self._forward(inputs, training)[:2]

  def _own_value(self, inputs):
    """r_ui of training examples as the interaction table holds it: the label when the batch
    has one (1 for a positive, 0 for a sampled negative, which the table does not hold), else
    the rating (explicit) or 1 (implicit positives); None (nothing left out) for pairs given
    without their rating."""
    if schema.LABEL in inputs:
      return inputs[schema.LABEL]
    if self.ratings:
      return inputs.get(schema.RATING)
    return ops.ones_like(ops.cast(inputs[schema.USER], "float32"))

  def scores_and_penalty(self, inputs, training=False):
    """The base class's, plus `l2 * |V|^2 / rows` per example for the encoder V."""
    scores, penalized, encoder = self._forward(inputs, training)
    penalty = self._penalty(scores, penalized)
    if self.l2:
      penalty += self.l2 * ops.sum(ops.square(encoder)) / self.encoder_rows
    return scores, penalty

  def score_all(self, users, training=False, items=None):
    """<w, h> + b_u + b_i + b for every item, one matmul: I-AutoRec encodes the catalogue,
    U-AutoRec the batch's users."""
    items = self._all_items(users)
    factors_u, bias_u = self._side_terms(schema.USER, users, None, training)
    factors_i, bias_i = self._side_terms(schema.ITEM, items, None, training)
    if self.side == schema.ITEM:
      p = self._represent(self.decoder, factors_u, users, [])  # [b, d]
      q = self._encode(items, factors_i)[0]  # [n, d]
    else:
      p = self._encode(users, factors_u)[0]
      q = self._represent(self.decoder, factors_i, items, [])
    return self._plus_biases(tf.matmul(p, q, transpose_b=True), users, items, bias_u, bias_i)

  def get_config(self):
    config = super().get_config()
    config.update(embedding_dim=self.embedding_dim, ratings=self.ratings, dropout=self.dropout,
                  side=self.side, interactions={"count": self.history.count})
    return config


def build_model(name: str, num_users: int, num_items: int, embedding_dim: int = 64,
                hidden_units: int = 256, rating_mean: float = 0.0, *,
                layers: Sequence[int] = (64, 32, 16, 8), mlp_embedding_dim: int = 32,
                dropout: float = 0.0, l2: float = 0.0,
                features: Optional[Mapping[str, feature_layers.SideFeatures]] = None,
                interactions: Optional[Mapping[str, np.ndarray]] = None,
                ratings: bool = True, side: str = schema.ITEM, history: int = 0,
                positives: Optional[Mapping[str, np.ndarray]] = None) -> keras.Model:
  """Creates model `name` with its variables built (a custom loop needs them before step 1).

  Args:
    name: one of `trainer.config.MODELS`.
    embedding_dim: embedding size (the GMF path's for neumf; the MLP's for mlp).
    hidden_units: seed_mlp's hidden layer.
    rating_mean: the output bias's starting value.
    layers, mlp_embedding_dim, dropout: the MLP tower (mlp, neumf); autorec: the fraction of
      training examples coded from their features alone.
    l2: the embedding penalty's weight.
    features: {side: SideFeatures}: side features added to every representation of the side
      (`trainer.feature_layers`); None or empty: IDs only.
    interactions: autorec's training interactions as sparse rows of `side`
      (`PreparedData.train_interactions`); None: an empty table (every entity coded as a cold
      one).
    ratings: autorec's interactions are ratings (explicit feedback), not 1s.
    side: the side autorec codes, "item" (I-AutoRec) or "user" (U-AutoRec).
    history: mf: the user's latest training items before the example that its user vector
      sums (0: none).
    positives: with `history`, the training positives with their time order
      (`PreparedData.train_positives`).

  Raises:
    ValueError: naming --model when `name` is unknown.
  """
  common = dict(l2=l2, output_bias=rating_mean, features=features, name=name)
  if name == "seed_mlp":
    model = SeedMLP(num_users, num_items, embedding_dim, hidden_units, **common)
  elif name == "gmf":
    model = GMF(num_users, num_items, embedding_dim, **common)
  elif name == "mlp":
    model = MLP(num_users, num_items, embedding_dim, layers, dropout, **common)
  elif name == "neumf":
    model = NeuMF(num_users, num_items, embedding_dim, mlp_embedding_dim, layers, dropout,
                  **common)
  elif name == "mf":
    model = MF(num_users, num_items, embedding_dim, history, positives, **common)
  elif name == "autorec":
    model = AutoRec(num_users, num_items, embedding_dim, interactions, ratings, dropout, side,
                    **common)
  else:
    raise ValueError(f"--model={name!r} is not a known model (one of {', '.join(MODELS)})")
  model({schema.USER: ops.zeros((1,), "int64"), schema.ITEM: ops.zeros((1,), "int64")})
  return model
