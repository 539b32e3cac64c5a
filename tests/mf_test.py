"""mf (trainer/models/mf.py): the user history by hand, softmax scores."""

import numpy as np
import pytest
import tensorflow as tf

from model_helpers import build
from trainer import models, schema


# 3 users, 4 items. User 0 trained on items 2, 0, 3 in that time order; user 1 on item 1;
# user 2 on nothing. (CSR: items sorted within a user; time_rank their order in time.)
_HISTORY = {"indptr": np.array([0, 3, 4, 4]), "indices": np.array([0, 2, 3, 1]),
            "time_rank": np.array([1, 0, 2, 0])}


def test_mf_history_sums_the_latest_items_before_each_example_by_hand():
  """p_u = e_u + sum_l a_l y_(l-th latest item before the example): in training a training
  pair sees what came before it, any other pair the whole history, as every pair does at
  evaluation; `score_all` with the examples' items gives each row the example's own history;
  the L2 penalty takes the history rows a score read, the padding none."""
  model = models.build_model("mf", 3, 4, 2, history=2, positives=_HISTORY, l2=0.5)
  rng = np.random.default_rng(0)
  for w in model.trainable_weights:
    w.assign(rng.normal(size=w.shape).astype("float32"))
  e, q = model.user_embedding.embeddings.numpy(), model.item_embedding.embeddings.numpy()
  y, a = model.history_embedding.embeddings.numpy(), model.recency_weights.numpy()
  b_u, b_i = model.user_bias.embeddings.numpy()[:, 0], model.item_bias.embeddings.numpy()[:, 0]
  # (user, item) -> the items before it, latest first. 3 is the OOV user.
  before = {(0, 3): [0, 2], (0, 0): [2], (0, 2): [], (0, 1): [3, 0], (1, 1): [],
            (1, 2): [1], (2, 0): [], (3, 0): []}
  users, items = (np.array(c) for c in zip(*before))
  p = np.stack([e[u] + sum(a[l] * y[j] for l, j in enumerate(before[u, i]))
                for u, i in zip(users, items)])
  expected = (p * q[items]).sum(-1) + b_u[users] + b_i[items] + float(model.global_bias)
  batch = {schema.USER: users, schema.ITEM: items}
  scores, penalty = model.scores_and_penalty(batch, training=True)
  np.testing.assert_allclose(scores, expected, rtol=1e-5)
  whole = {u: before[u, i] for u, i in [(0, 1), (1, 2), (2, 0), (3, 0)]}
  p_now = np.stack([e[u] + sum(a[l] * y[j] for l, j in enumerate(whole[u])) for u in users])
  np.testing.assert_allclose(model(batch), (p_now * q[items]).sum(-1) + b_u[users] + b_i[items]
                             + float(model.global_bias), rtol=1e-5)
  rows = [(e[u] ** 2).sum() + (q[i] ** 2).sum() + b_u[u] ** 2 + b_i[i] ** 2
          + sum((y[j] ** 2).sum() for j in before[u, i]) for u, i in zip(users, items)]
  np.testing.assert_allclose(penalty, 0.5 * np.array(rows), rtol=1e-5)
  everything = p @ q[:4].T + b_u[users, None] + b_i[None, :4] + float(model.global_bias)
  np.testing.assert_allclose(model.score_all(tf.constant(users), items=tf.constant(items)),
                             everything, rtol=1e-5, atol=1e-6)
  # A sampled negative (0, 1) of the positive (0, 3) sees what (0, 3) saw: its anchor's.
  negative = {schema.USER: np.array([0, 0]), schema.ITEM: np.array([3, 1]),
              schema.ANCHOR: np.array([3, 3])}
  p_anchor = e[0] + a[0] * y[0] + a[1] * y[2]
  np.testing.assert_allclose(
      model.scores_and_penalty(negative, training=True)[0],
      (p_anchor * q[[3, 1]]).sum(-1) + b_u[0] + b_i[[3, 1]] + float(model.global_bias),
      rtol=1e-5)
  # Without the examples' items: every user's whole history, as for (0, 1), (1, 2).
  np.testing.assert_allclose(model.score_all(tf.constant([0, 1])), everything[[3, 5]],
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mf_history", "gmf", "autorec"])
def test_softmax_scores_are_the_examples_and_the_catalogues(name):
  """`softmax_scores` = (`scores_and_penalty`'s scores, `score_all` with the examples' items,
  the penalty); mf builds its user vectors once: one gather of the history rows, [b x L]."""
  model = build(name, 20, 10, 4, l2=0.1)
  rng = np.random.default_rng(0)
  for weight in model.trainable_weights:
    weight.assign(rng.normal(size=weight.shape).astype(weight.dtype))
  batch = {schema.USER: tf.constant([0, 3, 3, 7]), schema.ITEM: tf.constant([1, 1, 2, 9])}
  with tf.GradientTape() as tape:
    scores, logits, penalty = model.softmax_scores(batch, training=True)
    loss = tf.reduce_sum(logits) + tf.reduce_sum(scores) + tf.reduce_sum(penalty)
  expected_scores, expected_penalty = model.scores_and_penalty(batch, training=True)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)
  np.testing.assert_allclose(penalty, expected_penalty, rtol=1e-5)
  np.testing.assert_allclose(logits, model.score_all(batch[schema.USER], training=True,
                                                     items=batch[schema.ITEM]),
                             rtol=1e-5, atol=1e-5)
  if name == "mf_history":
    gradient = tape.gradient(loss, model.history_embedding.embeddings)
    assert gradient.indices.shape[0] == 4 * 3


def test_mf_history_needs_the_time_order():
  no_order = {k: v for k, v in _HISTORY.items() if k != "time_rank"}
  with pytest.raises(ValueError, match="no time order"):
    models.build_model("mf", 3, 4, 2, history=2, positives=no_order)
  with pytest.raises(ValueError, match="positives of 3 users for a model of 5"):
    models.build_model("mf", 5, 4, 2, history=2, positives=_HISTORY)
