"""Side features in every model (trainer/models/side_features.py): looked up by ID or given at
serving, their training path, their penalty, any serving width."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from model_helpers import VARIANTS, build, feature_tables
from trainer import models, schema


@pytest.mark.parametrize("name", VARIANTS)
def test_features_given_at_serving_equal_features_looked_up_by_id(name):
  """Cold start scores an item from features handed in; for a known item with the same
  features and the out-of-vocabulary ID row zeroed, both ways must agree."""
  model = build(name, 20, 10, 4, 8, layers=(8, 4), mlp_embedding_dim=4,
                             features=feature_tables())
  users, items = tf.constant([0, 3, 5], tf.int64), tf.constant([0, 3, 9], tf.int64)
  gathered = model.feature_sides["item"](items)
  np.testing.assert_array_equal(gathered["weights"].numpy()[1], [0.0, 0.5, 0.5])  # tags 4, 1
  by_id = model({schema.USER: users, schema.ITEM: items})
  given = model({schema.USER: users, schema.ITEM: items, "item_features": gathered})
  np.testing.assert_allclose(given, by_id, rtol=1e-6)
  other = model({schema.USER: users, schema.ITEM: items,
                 "item_features": model.feature_sides["item"](tf.constant([1, 1, 1]))})
  assert not np.allclose(other, by_id)  # the features given are the ones used


def test_the_l2_penalty_falls_on_id_rows_only():
  model = models.build_model("gmf", 3, 10, 2, l2=1.0, features=feature_tables())
  inputs = {schema.USER: tf.constant([1]), schema.ITEM: tf.constant([2])}
  _, penalty = model.scores_and_penalty(inputs)
  user_row = model.user_embedding.embeddings.numpy()[1]
  item_row = model.item_embedding.embeddings.numpy()[2]
  expected = np.sum(user_row ** 2) + np.sum(item_row ** 2)  # not the feature embeddings
  np.testing.assert_allclose(penalty.numpy(), [expected], rtol=1e-5)


def test_feature_embedding_training_path_matches_plain_gathers():
  """Training reads the features through XLA-compiled sums with a hand-written gradient; it
  must give the terms and table gradient that TensorFlow's own gathers and autodiff give."""
  from trainer.models import side_features as fl
  side = feature_tables()["item"]
  tables = fl.FeatureTables(side.infos, 11, side.tables)
  layer = fl.FeatureEmbedding(side.infos, 3)
  layer.embeddings.assign(np.random.default_rng(5).normal(size=(9, 3)).astype("float32"))
  combined = tables(tf.constant([0, 3, 3, 1, 10]))
  upstream = tf.constant(np.random.default_rng(6).normal(size=(5, 3)).astype("float32"))

  def terms_and_gradient(training):
    with tf.GradientTape() as tape:
      out = layer(combined, training=training)
      loss = tf.reduce_sum(out * upstream)
    return out.numpy(), tf.convert_to_tensor(tape.gradient(loss, layer.embeddings.value))

  compiled, compiled_gradient = terms_and_gradient(True)
  plain, plain_gradient = terms_and_gradient(False)
  np.testing.assert_allclose(compiled, plain, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(compiled_gradient, plain_gradient, rtol=1e-6, atol=1e-7)
  # Item 3: tags 4 and 1 (offsets 4 + 4, 4 + 1), each weighted 1/2, and its price.
  rows = layer.embeddings.numpy()
  expected = 0.5 * (rows[8] + rows[5]) + side.tables["price"][3] * layer.projection.numpy()[0]
  np.testing.assert_allclose(compiled[1], expected, rtol=1e-5)
  # Row 8 (tag 4) is read by item 3 twice (rows 1 and 2 of the batch), at weight 1/2 each.
  np.testing.assert_allclose(compiled_gradient[8], 0.5 * (upstream[1] + upstream[2]), rtol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_features_train_under_mixed_precision(name):
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    model = build(name, 20, 10, 4, 8, layers=(8, 4), mlp_embedding_dim=4, l2=0.1,
                               features=feature_tables())
    batch = {schema.USER: tf.constant([0, 3, 20]), schema.ITEM: tf.constant([1, 9, 10])}
    with tf.GradientTape() as tape:
      scores, _ = model.scores_and_penalty(batch)
      loss = tf.reduce_sum(tf.cast(scores, tf.float32))
    features = [v for v in model.trainable_variables if "features" in v.path]
    gradients = tape.gradient(loss, features)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  assert scores.dtype == tf.bfloat16
  assert features and all(g is not None for g in gradients)
  assert any(float(tf.reduce_max(tf.abs(tf.convert_to_tensor(g)))) > 0 for g in gradients)


def test_feature_embedding_takes_serving_inputs_of_any_width():
  """Serving hands in multi-hot values as a [n, None] matrix: the width is known only when the
  request comes, and the embedding must not need it when the graph is built."""
  from trainer.models import side_features as fl
  side = feature_tables()["item"]
  tables = fl.FeatureTables(side.infos, 11, side.tables)
  layer = fl.FeatureEmbedding(side.infos, 3)
  combined = tables(tf.constant([0, 3, 1]))

  @tf.function(input_signature=[{"indices": tf.TensorSpec([None, None], tf.int64),
                                  "weights": tf.TensorSpec([None, None], tf.float32),
                                  "numeric": tf.TensorSpec([None, 1], tf.float32)}])
  def serve(given):
    return layer(given)

  np.testing.assert_allclose(serve(combined), layer(combined), rtol=1e-6)
