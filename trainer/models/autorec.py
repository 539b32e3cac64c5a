"""AutoRec (Sedhain et al. 2015) as a factorised scorer:

  s(u, i) = <w_u, sigmoid(V^T r_i + mu)> + b_u + b_i + b

item-based: the item coded from its training interactions r_i; with side="user", the user
coded from theirs.
"""

from typing import Mapping, Optional

import keras
import tensorflow as tf
from keras import layers, ops

from trainer import distribute, parameter_server, schema
from trainer.models.base import Recommender
from trainer.models.layers import Embedding
from trainer.models.tables import InteractionTable


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
    # Tracked as `history`, the attribute path that keys it in checkpoints (renaming it would
    # stop existing autorec checkpoints from restoring); read it as `interactions`.
    self.history = InteractionTable(sizes[side] + 1, self.encoder_rows, interactions,
                                    name=f"{side}_interactions")
    self.encoder = Embedding(self.encoder_rows, embedding_dim, name="encoder",
                             vocabulary=self.other,
                             embeddings_initializer=keras.initializers.GlorotUniform())
    self.encoder_bias = self.add_weight(shape=(embedding_dim,), name="encoder_bias",
                                        initializer=keras.initializers.Zeros())
    # The decoder's rows, named by their side (user_embedding for I-AutoRec).
    self.decoder = self._embedding(self.other, embedding_dim, f"{self.other}_embedding")
    self._add_biases()
    self._side_features([embedding_dim, 1])  # [encoding or decoder row ; bias] per side

  @property
  def interactions(self) -> InteractionTable:
    """The training interactions the model codes from (tracked as `history`)."""
    return self.history

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
    encoded = self.interactions(unique, encoder, training=training)  # [unique ids, d]
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
    penalized = []
    parts = self._feature_parts(inputs, training, penalized)
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

  def score_all(self, users, training=False, items=None, context=None):
    """<w, h> + b_u + b_i + b for every item, one matmul: I-AutoRec encodes the catalogue,
    U-AutoRec the batch's users."""
    items = self._all_items(users)
    factors_u, bias_u = self._side_terms(schema.USER, users, None, training, context)
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
                  side=self.side, interactions={"count": self.interactions.count})
    return config
