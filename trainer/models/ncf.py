"""The neural collaborative filtering family (He et al. 2017), with p_u, q_i the user and item
embeddings:

  gmf    s(u, i) = h . (p_u * q_i) + b
  mlp    s(u, i) = h . MLP([p_u ; q_i]) + b, MLP = the ReLU tower `layers`
  neumf  s(u, i) = h . [p_u^G * q_i^G ; MLP([p_u^M ; q_i^M])] + b: separate embeddings for the
         two paths, fused by one output layer (optionally from pretrained GMF and MLP)
"""

from typing import Sequence

import keras
import tensorflow as tf
from keras import ops

from trainer import schema
from trainer.models.base import Recommender, _run, _tower


@keras.saving.register_keras_serializable(package="neumf_trainer")
class GMF(Recommender):
  """Generalized matrix factorization: a learned weighting of p_u * q_i."""

  def __init__(self, num_users: int, num_items: int, embedding_dim: int = 8, **kwargs):
    super().__init__(num_users, num_items, **kwargs)
    self.embedding_dim = embedding_dim
    self.user_embedding = self._embedding(schema.USER, embedding_dim, "gmf_user_embedding")
    self.item_embedding = self._embedding(schema.ITEM, embedding_dim, "gmf_item_embedding")
    self._side_features([embedding_dim])
    self.score = self._output()

  def forward(self, inputs, training=False):
    users, items, penalized = self._id_rows(inputs, training)
    return ops.squeeze(self.score(users * items), axis=-1), penalized  # [b]

  def score_all(self, users, training=False, items=None, context=None):
    """h . (p_u * q_i) + b = (p_u * h) . q_i + b: one [b, d] x [d, n] matmul."""
    items = self._all_items(users)
    p = self._represent(self.user_embedding, self._side_terms(schema.USER, users, None,
                                                              training, context)[0], users, [])
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
    self.user_embedding = self._embedding(schema.USER, embedding_dim, "mlp_user_embedding")
    self.item_embedding = self._embedding(schema.ITEM, embedding_dim, "mlp_item_embedding")
    self._side_features([embedding_dim])
    self.tower = _tower(self, self.layer_sizes, dropout, "mlp")
    self.score = self._output()

  def forward(self, inputs, training=False):
    users, items, penalized = self._id_rows(inputs, training)
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
    self.gmf_user_embedding = self._embedding(schema.USER, embedding_dim, "gmf_user_embedding")
    self.gmf_item_embedding = self._embedding(schema.ITEM, embedding_dim, "gmf_item_embedding")
    self.mlp_user_embedding = self._embedding(schema.USER, mlp_embedding_dim,
                                              "mlp_user_embedding")
    self.mlp_item_embedding = self._embedding(schema.ITEM, mlp_embedding_dim,
                                              "mlp_item_embedding")
    self._side_features([embedding_dim, mlp_embedding_dim])  # [GMF ; MLP] per side
    self.tower = _tower(self, self.layer_sizes, dropout, "mlp")
    self.score = self._output()

  def forward(self, inputs, training=False):
    users, items = inputs[schema.USER], inputs[schema.ITEM]
    penalized = []
    parts = self._feature_parts(inputs, training, penalized)
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
