"""A well-tuned dot product (Rendle et al. 2020), the baseline NeuMF must beat:

  s(u, i) = <p_u, q_i> + b_u + b_i + b

with `history`, p_u also sums the user's latest training items before the example.
"""

from typing import Mapping, Optional

import keras
import tensorflow as tf
from keras import ops

from trainer import schema
from trainer.models.base import Recommender
from trainer.models.tables import HistoryTable


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
    self.user_embedding = self._embedding(schema.USER, embedding_dim, "user_embedding")
    self.item_embedding = self._embedding(schema.ITEM, embedding_dim, "item_embedding")
    if history:
      self.history_table = HistoryTable(num_users, num_items, history, positives,
                                        name="history_table")
      self.history_embedding = self._embedding(schema.ITEM, embedding_dim, "history_embedding")
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
    penalized = []
    parts = self._feature_parts(inputs, training, penalized)
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

  def score_all(self, users, training=False, items=None, latest=None, context=None):
    """<p_u, q_i> + b_u + b_i + b for every item: one [b, d] x [d, n] matmul. With `history`,
    `items` (the examples' items, in training) place each user's history before them;
    `latest` [b, history] (item indices, latest first, `num_items` for none) stands for the
    users' training history (serving what they did since); `context`: the base class's."""
    factors_u, bias_u = self._side_terms(schema.USER, users, None, training, context)
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
