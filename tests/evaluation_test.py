"""Evaluation under a strategy: the full protocol against NumPy, the corrected sampled metrics."""

import math

import numpy as np
import pytest
import tensorflow as tf

from trainer import evaluation, metrics, models, schema


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
  # Some held-out items among the user's training positives (excluded once), and one item
  # outside the vocabulary (--split=given: a miss).
  for row in range(1, len(users), 4):
    if len(seen[users[row]]):
      items[row] = seen[users[row]][0]
  users, items = np.append(users, 0), np.append(items, num_items)

  evaluate = evaluation.make_ranking_evaluation(model, mirrored_strategy, k, num_items, indptr,
                                             indices)[metrics.FULL]
  data = mirrored_strategy.distribute_datasets_from_function(
      lambda ctx: tf.data.Dataset.from_tensor_slices(
          {schema.USER: users, schema.ITEM: items}).shard(
              ctx.num_input_pipelines, ctx.input_pipeline_id).batch(
                  ctx.get_per_replica_batch_size(6)))  # (the last batch: 1 row, 1 replica)
  got = evaluate(data)

  scores = np.asarray(model({schema.USER: np.repeat(np.arange(num_users), num_items),
                             schema.ITEM: np.tile(np.arange(num_items), num_users)}))
  scores = scores.reshape(num_users, num_items)
  hits, gains = [], []
  for u, i in zip(users, items):
    if i == num_items:
      hits.append(False)
      gains.append(0.0)
      continue
    others = np.setdiff1d(np.arange(num_items), np.append(seen[u], i))
    rank = int(np.sum(scores[u, others] >= scores[u, i]))
    hits.append(rank < k)
    gains.append(1 / math.log2(rank + 2) if rank < k else 0.0)
  assert got["count"] == len(users)
  assert got["hr"] == pytest.approx(np.mean(hits), abs=1e-6)
  assert got["ndcg"] == pytest.approx(np.mean(gains), rel=1e-5)
  assert 0 < got["hr"] < 1  # the case is not degenerate


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
  evaluate = evaluation.make_ranking_evaluation(
      model, mirrored_strategy, k, num_items, np.zeros(num_users + 1, np.int64),
      np.zeros(0, np.int32), corrections=corrections)[metrics.SAMPLED]
  got = evaluate(mirrored_strategy.distribute_datasets_from_function(
      lambda ctx: evaluation.sampled_dataset(users, items, negatives, 8, ctx)))
  score = lambda u, i: np.asarray(model({schema.USER: u, schema.ITEM: i}))  # noqa: E731
  ranks = (score(users.repeat(m), negatives.ravel()).reshape(-1, m)
           >= score(users, items)[:, None]).sum(1)
  assert got["hr"] == pytest.approx(np.mean(ranks < k), abs=1e-6)
  assert got["hr_corrected"] == pytest.approx(np.mean(corrections["hr"][ranks]), rel=1e-5)
  assert got["ndcg_corrected"] == pytest.approx(np.mean(corrections["ndcg"][ranks]), rel=1e-5)
