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


def test_krichene_rendle_correction_by_hand():
  """3 candidates, 1 sampled negative, HR@1. A held-out item with R items above it in the full
  ranking is sampled at rank r with P(r | R): R = 0 -> r = 0; R = 1 -> r = 0 or 1, half each;
  R = 2 -> r = 1. So A = [[1, 0], [.5, .5], [0, 1]], M = [1, 0, 0], prior 1/3 each:
  gamma = 1: x = diag(A'1)^-1 A'M = [1 / 1.5, 0]; gamma = 0 (least squares):
  x = (A'A)^-1 A'M = [[1.25, .25], [.25, 1.25]]^-1 [1, 0] = [5/6, -1/6]."""
  np.testing.assert_allclose(metrics.sampled_metric_correction(3, 1, "hr", 1, gamma=1.0),
                             [2 / 3, 0.0], atol=1e-12)
  np.testing.assert_allclose(metrics.sampled_metric_correction(3, 1, "hr", 1, gamma=0.0),
                             [5 / 6, -1 / 6], atol=1e-12)
  # Sampling every other item is no sampling: the correction is the metric itself.
  np.testing.assert_allclose(metrics.sampled_metric_correction(20, 19, "ndcg", 5, gamma=0.0),
                             [1 / math.log2(r + 2) if r < 5 else 0.0 for r in range(20)],
                             atol=1e-9)
  # Summing in chunks changes nothing.
  np.testing.assert_allclose(metrics.sampled_metric_correction(500, 9, "hr", 10, chunk=7),
                             metrics.sampled_metric_correction(500, 9, "hr", 10), rtol=1e-9)
  with pytest.raises(ValueError, match="auc"):
    metrics.sampled_metric_correction(500, 9, "auc", 10)


def test_corrected_sampled_metrics_weigh_each_sampled_rank(mirrored_strategy):
  """The evaluator's corrected HR is the mean of x[r] over the held-out items' sampled ranks."""
  rng = np.random.default_rng(1)
  num_users, num_items, k, m = 16, 40, 3, 5
  with mirrored_strategy.scope():
    model = models.build_model("mf", num_users, num_items, 4)
  for w in model.weights:
    w.assign(rng.normal(size=w.shape).astype("float32"))
  users = np.arange(num_users)
  items = rng.integers(0, num_items, num_users)
  negatives = np.stack([rng.choice(np.setdiff1d(np.arange(num_items), [i]), m, replace=False)
                        for i in items])
  corrections = {"hr": metrics.sampled_metric_correction(num_items, m, "hr", k),
                 "ndcg": metrics.sampled_metric_correction(num_items, m, "ndcg", k)}
  evaluate = metrics.make_ranking_evaluation(
      model, mirrored_strategy, k, num_items, np.zeros(num_users + 1, np.int64),
      np.zeros(0, np.int32), corrections=corrections)[metrics.SAMPLED]
  got = evaluate(mirrored_strategy.distribute_datasets_from_function(
      lambda ctx: metrics.sampled_dataset(users, items, negatives, 8, ctx)))
  score = lambda u, i: np.asarray(model({schema.USER: u, schema.ITEM: i}))  # noqa: E731
  ranks = (score(users.repeat(m), negatives.ravel()).reshape(-1, m)
           >= score(users, items)[:, None]).sum(1)
  assert got["hr"] == pytest.approx(np.mean(ranks < k), abs=1e-6)
  assert got["hr_corrected"] == pytest.approx(np.mean(corrections["hr"][ranks]), rel=1e-5)
  assert got["ndcg_corrected"] == pytest.approx(np.mean(corrections["ndcg"][ranks]), rel=1e-5)
