"""autorec (trainer/models/autorec.py and its InteractionTable): codes by hand, the example's own
rating left out, the penalty, dropout to cold coding."""

import numpy as np
import pytest
import tensorflow as tf

from trainer import models, schema
from trainer.data import artifacts


def _interactions(triples, num_items, side="item", num_users=4):
  """Item-major (or user-major) sparse rows of (user, item, value) triples, as the trainer
  builds them."""
  users, items, values = (np.array(c) for c in zip(*triples))
  if side == "user":
    return artifacts.sparse_rows(users, items, values, num_users)
  return artifacts.sparse_rows(items, users, values, num_items)


# 4 users, 3 items: item 0 rated by users 0, 2; item 1 by 1, 2, 3; item 2 by nobody (cold).
_TRIPLES = [(2, 0, 4.0), (0, 0, 5.0), (1, 1, 2.0), (3, 1, 3.0), (2, 1, 1.0)]


def _autorec(triples=_TRIPLES, side="item", **kwargs):
  model = models.build_model("autorec", 4, 3, 3, interactions=_interactions(triples, 3, side),
                             side=side, **kwargs)
  rng = np.random.default_rng(0)
  for w in model.trainable_weights:
    w.assign(rng.normal(size=w.shape).astype("float32"))
  return model


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("side", ["item", "user"])
def test_autorec_encodes_from_the_training_ratings_by_hand(side):
  """I-AutoRec: s(u, i) = <w_u, sigmoid(V^T r_i + mu)> + b_u + b_i + b, V over users; U-AutoRec
  the same with r_u, V over items and the decoder's rows the items'. An entity without
  ratings (item 2, the OOV user 4) is sigmoid(mu); `score_all` is the same scores by one
  matmul; training leaves r_ui out of the code."""
  model = _autorec(side=side)
  V, mu = model.encoder.embeddings.numpy(), model.encoder_bias.numpy()
  assert V.shape == ((5, 3) if side == "item" else (4, 3))  # the other side + OOV
  W = model.decoder.embeddings.numpy()
  b_u, b_i = model.user_bias.embeddings.numpy()[:, 0], model.item_bias.embeddings.numpy()[:, 0]
  r = np.zeros((4, 5) if side == "item" else (5, 4))
  for u, i, value in _TRIPLES:
    r[(i, u) if side == "item" else (u, i)] = value
  h = _sigmoid(r @ V + mu)
  users, items = np.array([0, 1, 3, 2, 4]), np.array([0, 2, 1, 3, 1])
  coded, decoded = (items, users) if side == "item" else (users, items)
  expected = (W[decoded] * h[coded]).sum(-1) + b_u[users] + b_i[items] + float(model.global_bias)
  np.testing.assert_allclose(np.asarray(model({schema.USER: users, schema.ITEM: items})),
                             expected, rtol=1e-5)
  dots = W[:4] @ h[:3].T if side == "item" else h[:4] @ W[:3].T
  everything = dots + b_u[:4, None] + b_i[None, :3] + float(model.global_bias)
  np.testing.assert_allclose(np.asarray(model.score_all(tf.range(4))), everything, rtol=1e-5)
  without = _autorec([t for t in _TRIPLES if t[:2] != (2, 1)], side=side)
  batch = {schema.USER: np.array([2]), schema.ITEM: np.array([1]),
           schema.RATING: np.array([1.0], "float32")}
  np.testing.assert_allclose(model.scores_and_penalty(batch, training=True)[0],
                             without(batch), rtol=1e-5)
  assert abs(float(without(batch)[0]) - float(model(batch)[0])) > 1e-3


def test_autorec_training_leaves_the_example_own_rating_out():
  """In training, (u, i) is scored from i's other ratings: as a model whose table never held
  r_ui scores it at evaluation (the same weights)."""
  model = _autorec()
  without = _autorec([t for t in _TRIPLES if t[:2] != (2, 1)])
  batch = {schema.USER: np.array([2, 2]), schema.ITEM: np.array([1, 0]),
           schema.RATING: np.array([1.0, 4.0], "float32")}
  trained, _ = model.scores_and_penalty(batch, training=True)
  np.testing.assert_allclose(trained[0], without({schema.USER: np.array([2]),
                                                  schema.ITEM: np.array([1])})[0], rtol=1e-5)
  assert abs(float(trained[0]) - float(model({schema.USER: np.array([2]),
                                              schema.ITEM: np.array([1])})[0])) > 1e-3
  # Implicit feedback: a sampled negative (label 0) is not in the table; nothing to leave out.
  implicit = _autorec(ratings=False)
  negative = {schema.USER: np.array([0]), schema.ITEM: np.array([1]),
              schema.LABEL: np.array([0.0], "float32")}
  np.testing.assert_allclose(implicit.scores_and_penalty(negative, training=True)[0],
                             implicit(negative), rtol=1e-6)


def test_autorec_penalises_the_whole_encoder_and_trains_only_the_rows_it_used():
  """`l2 * |V|^2 / users` per example for the encoder (a dense weight: replicas all-reduce its
  gradient as one device's); the loss's gradient touches the rows of the batch items' users."""
  model = _autorec(l2=0.5)
  batch = {schema.USER: tf.constant([3, 1]), schema.ITEM: tf.constant([1, 1]),
           schema.RATING: tf.constant([3.0, 2.0])}  # as the table holds them
  with tf.GradientTape(persistent=True) as tape:
    scores, penalty = model.scores_and_penalty(batch, training=True)
    fit = tf.reduce_sum(scores)
  gradient = tf.convert_to_tensor(tape.gradient(fit, model.encoder.embeddings))
  assert np.flatnonzero(np.abs(gradient.numpy()).sum(-1)).tolist() == [1, 2, 3]  # item 1's
  V = model.encoder.embeddings.numpy()
  decoder = (model.decoder.embeddings.numpy()[[3, 1]] ** 2).sum(-1)
  biases = (model.user_bias.embeddings.numpy()[[3, 1], 0] ** 2
            + model.item_bias.embeddings.numpy()[[1, 1], 0] ** 2)
  np.testing.assert_allclose(penalty, 0.5 * (decoder + biases + (V ** 2).sum() / 5), rtol=1e-5)


def test_autorec_dropout_codes_a_fraction_of_the_examples_as_cold_items():
  """With `dropout`, a training example's item is coded from all of its interactions or (that
  fraction of the time) from none, as an item never trained is: two scores, nothing between."""
  model = _autorec(dropout=0.5)
  batch = {schema.USER: np.zeros(200, "int64"), schema.ITEM: np.ones(200, "int64")}
  warm = float(model({schema.USER: np.array([0]), schema.ITEM: np.array([1])})[0])
  item_bias = model.item_bias.embeddings.numpy()[:, 0]
  cold = float(model({schema.USER: np.array([0]), schema.ITEM: np.array([2])})[0]  # no ratings
               - item_bias[2] + item_bias[1])
  trained = np.asarray(model.scores_and_penalty(batch, training=True)[0])
  is_warm, is_cold = np.isclose(trained, warm, rtol=1e-5), np.isclose(trained, cold, rtol=1e-5)
  assert np.all(is_warm | is_cold) and abs(warm - cold) > 1e-3
  assert 60 < is_cold.sum() < 140  # about half
  np.testing.assert_allclose(model.scores_and_penalty(batch)[0], warm, rtol=1e-5)  # no dropout
