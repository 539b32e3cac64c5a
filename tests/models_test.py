"""Tests of the model builders."""

import keras
import numpy as np
import pytest

from trainer import models, schema


def _model(**overrides):
  args = dict(name="seed_mlp", num_users=150, num_items=100, embedding_dim=64, hidden_units=256,
              rating_mean=3.25)
  args.update(overrides)
  return models.build_model(**args)


def test_seed_mlp_parameter_count():
  # embeddings (150 + 1 OOV) * 64 + (100 + 1) * 64 = 16128; hidden 128 * 256 + 256 = 33024;
  # output 256 + 1 = 257.
  assert _model().count_params() == 16128 + 33024 + 257


def test_seed_mlp_starts_at_the_mean_rating():
  model = _model()
  # The output bias starts at the mean; with zeroed embeddings the hidden layer sees only its
  # bias (zero at init), so the prediction is exactly the mean.
  for layer in (model.user_embedding, model.item_embedding):
    layer.embeddings.assign(np.zeros(layer.embeddings.shape, "float32"))
  out = model({schema.USER: np.array([0, 150]), schema.ITEM: np.array([99, 100])})
  np.testing.assert_allclose(np.asarray(out), [3.25, 3.25], rtol=1e-6)
  assert out.shape == (2,)


def test_seed_mlp_config_round_trips():
  model = _model(embedding_dim=8, hidden_units=16)
  clone = models.SeedMLP.from_config(model.get_config())
  assert clone.get_config() == model.get_config()
  restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
  assert isinstance(restored, models.SeedMLP) and restored.embedding_dim == 8


def test_unknown_model_names_the_flag():
  with pytest.raises(ValueError, match="--model='nope' is not a known model"):
    _model(name="nope")
