"""The classic embedding-concat regressor:

  r(u, i) = w2 . relu(W1 [p_u ; q_i] + b1) + b2
"""


import keras
from keras import layers, ops

from trainer import schema
from trainer.models.base import Recommender
from trainer.models.layers import Embedding


@keras.saving.register_keras_serializable(package="neumf_trainer")
class SeedMLP(Recommender):
  """User and item embeddings, concatenated, through one ReLU layer to a score."""

  def __init__(self, num_users: int, num_items: int, embedding_dim: int = 64,
               hidden_units: int = 256, **kwargs):
    super().__init__(num_users, num_items, **kwargs)
    self.embedding_dim = embedding_dim
    self.hidden_units = hidden_units
    # Keras's default uniform initialiser here, as in the classic regressor.
    self.user_embedding = Embedding(num_users + 1, embedding_dim, name="user_embedding",
                                    vocabulary=schema.USER)
    self.item_embedding = Embedding(num_items + 1, embedding_dim, name="item_embedding",
                                    vocabulary=schema.ITEM)
    self._side_features([embedding_dim])
    self.hidden = layers.Dense(hidden_units, activation="relu", name="hidden")
    self.rating = self._output("rating")

  def forward(self, inputs, training=False):
    users, items, penalized = self._id_rows(inputs, training)  # [b, d] each
    x = ops.concatenate([users, items], axis=-1)  # [b, 2d]
    return ops.squeeze(self.rating(self.hidden(x)), axis=-1), penalized  # [b]

  def get_config(self):
    config = super().get_config()
    config.update(embedding_dim=self.embedding_dim, hidden_units=self.hidden_units)
    return config
