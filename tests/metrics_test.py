"""HR@K and NDCG@K: worked by hand, and the full protocol against numpy brute force."""

import math

import numpy as np
import pytest
import tensorflow as tf

from trainer import metrics, models, schema


def test_one_positive_three_negatives_by_hand():
  positive = tf.constant([0.9, 0.2])
  # User 0: one negative (0.95) beats 0.9 -> rank 1. User 1: all three beat 0.2 -> rank 3.
  negatives = tf.constant([[0.1, 0.95, 0.3], [0.5, 0.4, 0.3]])
  rank, hit, ndcg = metrics.rank_hit_ndcg(positive, negatives, None, k=2)
  assert rank.numpy().tolist() == [1, 3]
  assert hit.numpy().tolist() == [1.0, 0.0]
  np.testing.assert_allclose(ndcg.numpy(), [1 / math.log2(3), 0.0], rtol=1e-6)
  _, hit, ndcg = metrics.rank_hit_ndcg(positive, negatives, None, k=4)
  np.testing.assert_allclose(ndcg.numpy(), [1 / math.log2(3), 1 / math.log2(5)], rtol=1e-6)


def test_ties_count_against_the_model():
  # A constant model: every negative ties with the positive, so the rank is the number of
  # negatives and HR@3 of 3 negatives is 0, not 1.
  rank, hit, ndcg = metrics.rank_hit_ndcg(tf.constant([0.5]), tf.constant([[0.5, 0.5, 0.5]]),
                                          None, k=3)
  assert rank.numpy().tolist() == [3] and hit.numpy().tolist() == [0.0]
  assert ndcg.numpy().tolist() == [0.0]
  # A mask removes competitors: only the one kept tie counts.
  rank, _, _ = metrics.rank_hit_ndcg(tf.constant([0.5]), tf.constant([[0.5, 0.5, 0.5]]),
                                     tf.constant([[False, True, False]]), k=3)
  assert rank.numpy().tolist() == [1]


def test_full_ranking_equals_numpy_brute_force(mirrored_strategy):
  rng = np.random.default_rng(0)
  num_users, num_items, k = 12, 30, 5
  with mirrored_strategy.scope():
    model = models.build_model("mf", num_users, num_items, 4)
  for w in model.weights:  # spread the scores out
    w.assign(rng.normal(size=w.shape).astype("float32"))
  # Training positives per user, compressed sparse rows, sorted within a user.
  seen = [np.sort(rng.choice(num_items, rng.integers(0, 8), replace=False))
          for _ in range(num_users)]
  indptr = np.concatenate([[0], np.cumsum([len(s) for s in seen])])
  indices = np.concatenate(seen).astype(np.int32)
  users = np.arange(num_users).repeat(2)
  items = np.array([rng.choice(np.setdiff1d(np.arange(num_items), seen[u])) for u in users])

  evaluate = metrics.make_ranking_evaluation(model, mirrored_strategy, k, num_items, indptr,
                                             indices)[metrics.FULL]
  data = mirrored_strategy.distribute_datasets_from_function(
      lambda ctx: tf.data.Dataset.from_tensor_slices(
          {schema.USER: users, schema.ITEM: items}).shard(
              ctx.num_input_pipelines, ctx.input_pipeline_id).batch(
                  ctx.get_per_replica_batch_size(6)))
  got = evaluate(data)

  scores = np.asarray(model({schema.USER: np.repeat(np.arange(num_users), num_items),
                             schema.ITEM: np.tile(np.arange(num_items), num_users)}))
  scores = scores.reshape(num_users, num_items)
  hits, gains = [], []
  for u, i in zip(users, items):
    others = np.setdiff1d(np.arange(num_items), np.append(seen[u], i))
    rank = int(np.sum(scores[u, others] >= scores[u, i]))
    hits.append(rank < k)
    gains.append(1 / math.log2(rank + 2) if rank < k else 0.0)
  assert got["count"] == len(users)
  assert got["hr"] == pytest.approx(np.mean(hits), abs=1e-6)
  assert got["ndcg"] == pytest.approx(np.mean(gains), rel=1e-5)
  assert 0 < got["hr"] < 1  # the case is not degenerate
