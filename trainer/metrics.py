"""The metrics' math, for one held-out (user, item) with model score s+ and competing items'
scores s_j (which competitors, and over which rows, is `trainer.evaluation`'s):

  rank    = #{j : s_j >= s+}   (ties count against the model: a constant model scores 0)
  HR@K    = 1 if rank < K
  NDCG@K  = 1 / log2(rank + 2) if rank < K, else 0

and Krichene and Rendle's correction of the sampled protocol ("On Sampled Metrics for Item
Recommendation", KDD 2020, section 5): each sampled rank r counts as x[r], the vector that best
makes the sampled metric an estimate of the full one (`sampled_metric_correction`).
"""

import math
from typing import Optional

import numpy as np
import tensorflow as tf

SAMPLED = "sampled"
FULL = "full"


def protocol_of(metric: str) -> str:
  """The protocol a ranking metric is measured under: hr_full -> full."""
  return metric.rsplit("_", 1)[1]


def _log_factorials(n: int) -> np.ndarray:
  """log k! for k = 0..n."""
  return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def sampled_metric_correction(num_items: int, num_negatives: int, metric: str, k: int,
                              gamma: float = 0.01, chunk: int = 1 << 16) -> np.ndarray:
  """Krichene and Rendle's bias-variance corrected metric: x [num_negatives + 1], the value to
  count for a held-out item ranked r-th (0-based) among its sampled negatives.

  With R the item's 0-based rank among all `num_items` candidates (uniform prior over R) and
  P[R, r] the chance that r of `num_negatives` items drawn without replacement from the other
  num_items - 1 rank above it (hypergeometric), x minimises the expected squared error of
  x[r] against the full metric M(R) plus gamma times its variance:

    x = ((1 - gamma) A'A + gamma diag(c))^-1 A'b,  A = P / sqrt(n),  b = M / sqrt(n),
    c = P'1 / n

  gamma = 0 is the least-squares (minimal bias) correction; gamma = 1 weighs each r by its
  expected metric; the paper's experiments favour small gamma. P is summed in chunks of R, so
  catalogues of millions of items take O(num_negatives^2) memory.

  Args:
    metric: "hr" (M(R) = 1 if R < k) or "ndcg" (1 / log2(R + 2) if R < k).
  """
  n, m = num_items, num_negatives
  if metric not in ("hr", "ndcg"):
    raise ValueError(f"metric {metric!r} is not hr or ndcg")
  if m >= n:
    raise ValueError(f"{m} negatives need more than {n} items")
  log_factorial = _log_factorials(n)
  log_choose = lambda a, b: log_factorial[a] - log_factorial[b] - log_factorial[a - b]  # noqa
  r = np.arange(m + 1)
  gram, moment, column = np.zeros((m + 1, m + 1)), np.zeros(m + 1), np.zeros(m + 1)
  for start in range(0, n, chunk):
    above = np.arange(start, min(start + chunk, n))[:, None]  # R: items ranked above
    below = n - 1 - above
    valid = (r <= above) & (m - r <= below)  # [chunk, m + 1]
    pick = lambda values: np.where(valid, values, 0)  # noqa: E731 (any valid index)
    log_p = (log_choose(pick(above), pick(r)) + log_choose(pick(below), pick(m - r))
             - log_choose(n - 1, m))
    p = np.where(valid, np.exp(log_p), 0.0)  # [chunk, m + 1]: P(r | R), hypergeometric
    rank = above[:, 0]
    full = (rank < k) * (1.0 if metric == "hr" else 1.0 / np.log2(rank + 2.0))
    gram += p.T @ p / n
    moment += p.T @ full / n
    column += p.sum(axis=0) / n
  return np.linalg.solve((1.0 - gamma) * gram + gamma * np.diag(column), moment)


def rank_hit_ndcg(positive: tf.Tensor, competitors: tf.Tensor, mask: Optional[tf.Tensor],
                  k: int):
  """Ranks of positives among competitors, and their HR@k and NDCG@k terms.

  Args:
    positive: scores of the held-out items, [b].
    competitors: scores of the competing items, [b, n].
    mask: [b, n] bool, True where a competitor counts; None: all count.
    k: the cut-off.

  Returns:
    (rank [b] int32, hit [b] float32, ndcg [b] float32).
  """
  beats = competitors >= positive[:, None]  # ties against the model
  if mask is not None:
    beats = tf.logical_and(beats, mask)
  rank = tf.reduce_sum(tf.cast(beats, tf.int32), axis=1)
  return (rank, *hit_ndcg(rank, k))


def hit_ndcg(rank: tf.Tensor, k: int):
  """HR@k and NDCG@k terms of 0-based ranks [b]: (hit [b] float32, ndcg [b] float32)."""
  hit = tf.cast(rank < k, tf.float32)
  ndcg = hit * (math.log(2.0) / tf.math.log(tf.cast(rank, tf.float32) + 2.0))
  return hit, ndcg


