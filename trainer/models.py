"""Recommender models: Keras 3 layers that score (user, item) index pairs.

Every model takes `{"user": int[b], "item": int[b]}` of dense indices (as written by
preparation) and returns a score of shape [b]. Index `num_users` (resp. `num_items`) is the
out-of-vocabulary row: the export maps unknown raw IDs there, so serving never fails on them.

seed_mlp, the classic embedding-concat regressor on explicit ratings:

  r_hat(u, i) = w2 . relu(W1 [p_u ; q_i] + b1) + b2,  p_u, q_i in R^d
  minimised: mean over the batch of (r(u, i) - r_hat(u, i))^2

b2 starts at the training mean rating, so the first steps learn structure, not the offset.
"""

import keras
from keras import layers, ops

from trainer import schema


@keras.saving.register_keras_serializable(package="neumf_trainer")
class SeedMLP(keras.Model):
  """User and item embeddings, concatenated, through one ReLU layer to a rating."""

  def __init__(self, num_users: int, num_items: int, embedding_dim: int = 64,
               hidden_units: int = 256, rating_mean: float = 0.0, **kwargs):
    super().__init__(**kwargs)
    self.num_users = num_users
    self.num_items = num_items
    self.embedding_dim = embedding_dim
    self.hidden_units = hidden_units
    self.rating_mean = rating_mean
    # +1: the out-of-vocabulary row.
    self.user_embedding = layers.Embedding(num_users + 1, embedding_dim, name="user_embedding")
    self.item_embedding = layers.Embedding(num_items + 1, embedding_dim, name="item_embedding")
    self.hidden = layers.Dense(hidden_units, activation="relu", name="hidden")
    self.rating = layers.Dense(1, bias_initializer=keras.initializers.Constant(rating_mean),
                               name="rating")

  def call(self, inputs):
    users = self.user_embedding(inputs[schema.USER])  # [b, d]
    items = self.item_embedding(inputs[schema.ITEM])  # [b, d]
    x = ops.concatenate([users, items], axis=-1)  # [b, 2d]
    return ops.squeeze(self.rating(self.hidden(x)), axis=-1)  # [b]

  def get_config(self):
    config = super().get_config()
    config.update(num_users=self.num_users, num_items=self.num_items,
                  embedding_dim=self.embedding_dim, hidden_units=self.hidden_units,
                  rating_mean=self.rating_mean)
    return config


def build_model(name: str, num_users: int, num_items: int, embedding_dim: int,
                hidden_units: int, rating_mean: float) -> keras.Model:
  """Creates model `name` with its variables built (a custom loop needs them before step 1).

  Raises:
    ValueError: naming --model when `name` is unknown.
  """
  if name == "seed_mlp":
    model = SeedMLP(num_users, num_items, embedding_dim, hidden_units, rating_mean, name=name)
  else:
    raise ValueError(f"--model={name!r} is not a known model")
  model({schema.USER: ops.zeros((1,), "int64"), schema.ITEM: ops.zeros((1,), "int64")})
  return model
