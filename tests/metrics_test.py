"""HR@K, NDCG@K and the sampled-metric correction, worked by hand."""

import math

import numpy as np
import pytest
import tensorflow as tf

from trainer import metrics


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
