"""What every model shares (`Recommender`): sizes, ID rows plus side features, the L2 penalty on
the gathered rows, `score_all`, config; and the helpers of the towers."""

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import keras
import tensorflow as tf
from keras import layers, ops

from trainer import schema
from trainer.models.side_features import (FeatureEmbedding, FeatureTables, combine,
                                          feature_infos)
from trainer.models.layers import Embedding, RowBlockNormal, Score


class Recommender(keras.Model):
  """Shared plumbing: sizes, the L2 penalty on the gathered embeddings, config."""

  def __init__(self, num_users: int, num_items: int, l2: float = 0.0,
               output_bias: float = 0.0, features: Optional[Mapping] = None,
               context: Optional[Sequence] = None, **kwargs):
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
                             if isinstance(given, schema.SideFeatures)
                             else (given["infos"], given["rows"], None))
      layer = FeatureTables(infos, rows, tables, name=f"{side}_feature_tables")
      setattr(self, f"{side}_feature_tables", layer)
      self.feature_sides[side] = layer
    # Context features (FeatureInfos of side `context`, or their dicts): their values come
    # with each example (`context_<name>` keys), and their embedding joins the user side.
    self.context_infos = feature_infos(context or ())

  def _side_features(self, parts: Sequence[int]) -> None:
    """One feature embedding per side, as wide as the side's representations together
    (`parts`: their sizes, e.g. NeuMF's GMF and MLP embeddings), split per representation in
    `_feature_parts`. One per side, not one per representation: each costs a sparse matmul
    forward and back whatever its width (NeuMF: 2 instead of 4)."""
    self.feature_parts = tuple(int(p) for p in parts)
    self.feature_embeddings = {}
    for side, tables in self.feature_sides.items():
      layer = FeatureEmbedding(tables.infos, sum(self.feature_parts),
                                              name=f"{side}_features")
      setattr(self, f"{side}_features", layer)
      self.feature_embeddings[side] = layer
    self.context_features = (FeatureEmbedding(self.context_infos, sum(self.feature_parts),
                                              name="context_features")
                             if self.context_infos else None)

  def _context(self, inputs: Optional[Mapping]) -> Optional[Mapping[str, tf.Tensor]]:
    """The examples' context in the combined layout: given combined (`context_features`,
    serving), or from the batch's `context_<name>` values; None without context (the model
    has none, or the inputs carry none: serving without context, every value missing)."""
    if self.context_features is None or inputs is None:
      return None
    if "context_features" in inputs:
      return inputs["context_features"]
    keys = [schema.context_key(i.name) for i in self.context_infos]
    if not all(k in inputs for k in keys):
      return None
    return combine(self.context_infos, {i.name: inputs[k]
                                        for i, k in zip(self.context_infos, keys)})

  def _feature_parts(self, inputs: Mapping, training: bool = False,
                     penalized: Optional[List[tf.Tensor]] = None
                     ) -> Dict[str, List[Optional[tf.Tensor]]]:
    """{side: one [b, part] feature term per representation of the side}, all None for a side
    without features. The batch's feature rows come from the tables, or (cold start) from the
    values given in `inputs["<side>_features"]`."""
    return {side: self._side_terms(side, inputs[side], inputs.get(f"{side}_features"),
                                   training, inputs if side == schema.USER else None,
                                   penalized)
            for side in (schema.USER, schema.ITEM)}

  def _side_terms(self, side: str, ids, given: Optional[Mapping] = None,
                  training: bool = False, context: Optional[Mapping] = None,
                  penalized: Optional[List[tf.Tensor]] = None) -> List[Optional[tf.Tensor]]:
    """One side's feature terms of `ids` (or of the feature values `given`), one [b, part]
    per representation; all None when the side has no features. The user side's terms also
    add the context's embedding, from `context` (a batch, or {"context_features": combined})
    when it carries the examples' context; the context's term goes to `penalized` (the L2
    penalty falls on it as on an ID row: else the context's factors, shared by every user and
    free, would absorb what the users' rows learn, as a mean user in every context)."""
    layer = self.feature_embeddings.get(side)
    total = None
    if layer is not None:
      total = layer(given if given is not None else self.feature_sides[side](ids),
                    training=training)
    combined = self._context(context) if side == schema.USER else None
    if combined is not None:
      term = self.context_features(combined, training=training)
      if penalized is not None:
        penalized.append(term)
      total = term if total is None else total + term
    if total is None:
      return [None] * len(self.feature_parts)
    return (ops.split(total, list(_cumulative(self.feature_parts[:-1])), axis=-1)
            if len(self.feature_parts) > 1 else [total])

  def _id_rows(self, inputs, training: bool = False):
    """(users [b, d], items [b, d], penalized): each side's ID row plus its side features, for
    a model with one representation per side (`user_embedding`, `item_embedding`)."""
    penalized = []
    terms = self._feature_parts(inputs, training, penalized)
    users = self._represent(self.user_embedding, terms[schema.USER][0], inputs[schema.USER],
                            penalized)
    items = self._represent(self.item_embedding, terms[schema.ITEM][0], inputs[schema.ITEM],
                            penalized)
    return users, items, penalized

  @staticmethod
  def _represent(embedding: "Embedding", term: Optional[tf.Tensor], ids,
                 penalized: List[tf.Tensor]) -> tf.Tensor:
    """ID embedding plus (with features) the side's feature term: [b, d]. The ID rows go
    to `penalized`: the L2 penalty falls on per-entity parameters only, so that what many
    entities share is learnt by their features, which also serve entities never trained."""
    rows = embedding(ids)
    penalized.append(rows)
    return rows if term is None else rows + term

  def _embedding(self, side: str, dim: int, name: str) -> Embedding:
    """A table of `side`'s IDs (user or item), +1: the out-of-vocabulary row. Small normal
    init, as in the NCF reference code."""
    rows = self.num_users if side == schema.USER else self.num_items
    return Embedding(rows + 1, dim, name=name, embeddings_initializer=RowBlockNormal(0.01),
                     vocabulary=side)

  def _add_biases(self) -> None:
    """User, item (zeros) and global (`output_bias`) biases: mf's and autorec's."""
    zeros = keras.initializers.Zeros()
    self.user_bias = Embedding(self.num_users + 1, 1, embeddings_initializer=zeros,
                               name="user_bias", vocabulary=schema.USER)
    self.item_bias = Embedding(self.num_items + 1, 1, embeddings_initializer=zeros,
                               name="item_bias", vocabulary=schema.ITEM)
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
                items: Optional[tf.Tensor] = None,
                context: Optional[Mapping] = None) -> tf.Tensor:
    """Each user's score for every trained item: [b, num_items] (item index = column).
    `items`: in training, the examples' own items, for models whose user vector depends on
    the example (mf with `history`: the history before it); the others ignore them.
    `context`: the examples' context (a batch with `context_<name>` [b] values, or
    {"context_features": combined}); None: without context.

    Here through `forward` on every (user, item) pair, b x num_items examples; models whose
    score factorises into a user and an item vector (mf, gmf) override it with one matmul
    against the item table, which full-catalogue evaluation, `recommend` and the softmax
    objective then cost (b + n) representations instead of b x n examples.
    """
    return score_every_pair(lambda pairs: self.forward(pairs, training)[0], users,
                            self.num_items, self._context(context))

  def softmax_scores(self, inputs: Dict, training: bool = False):
    """(the examples' scores [b], their users' scores of every item [b, num_items], the
    penalty [b]): what the softmax objective needs, here by `scores_and_penalty` and
    `score_all`; mf overrides it to build each user vector once for both."""
    scores, penalty = self.scores_and_penalty(inputs, training)
    return (scores, self.score_all(inputs[schema.USER], training, items=inputs[schema.ITEM],
                                   context=inputs), penalty)

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
                            for side, t in self.feature_sides.items()},
                  context=[i.to_dict() for i in self.context_infos])
    return config


def score_every_pair(score, users: tf.Tensor, num_items: int,
                     context: Optional[Mapping[str, tf.Tensor]] = None) -> tf.Tensor:
  """[b, num_items] from `score`, a scorer of (user, item) pairs, run on the b x num_items
  pairs of `users` and every item (each in its user's `context`, combined, when given)."""
  batch = tf.shape(users)[0]
  all_items = tf.range(num_items, dtype=users.dtype)
  pairs = {schema.USER: tf.repeat(users, num_items), schema.ITEM: tf.tile(all_items, [batch])}
  if context is not None:
    pairs["context_features"] = {k: tf.repeat(v, num_items, axis=0) for k, v in context.items()}
  return tf.reshape(score(pairs), [batch, num_items])


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
