"""Evaluation metrics, computed under any strategy: RMSE/MAE of ratings; HR@K and NDCG@K.

Ratings: the served rating (the model's output clipped to the data's rating range) against the
held-out rating; RMSE, MAE, and the RMSE of always predicting the training mean, the bar any
model must clear.

Ranking, under two protocols:

For one held-out (user, item) with model score s+ and competing items' scores s_j:

  rank    = #{j : s_j >= s+}   (ties count against the model: a constant model scores 0)
  HR@K    = 1 if rank < K
  NDCG@K  = 1 / log2(rank + 2) if rank < K, else 0

Protocols:
  sampled  the competitors are the prepared `eval_negatives` of the user (He et al. 2017;
           reproducible, but optimistic: Krichene and Rendle 2020)
  full     the competitors are all items except the user's training positives (and the
           held-out item itself)

The sampled protocol also reports its metrics corrected as Krichene and Rendle propose ("On
Sampled Metrics for Item Recommendation", KDD 2020, section 5): each sampled rank r counts as
x[r], the vector that best makes the sampled metric an estimate of the full one
(`sampled_metric_correction`), reported as `hr_corrected_sampled`, `ndcg_corrected_sampled`.

Each replica scores its share of the evaluation rows; the sums are reduced across replicas.
"""

import math
from typing import Callable, Dict, Optional

import keras
import numpy as np
import tensorflow as tf

from trainer import models, schema

SAMPLED = "sampled"
FULL = "full"


def protocol_of(metric: str) -> str:
  """The protocol a ranking metric is measured under: hr_full -> full."""
  return metric.rsplit("_", 1)[1]


def clipped_prediction(model: keras.Model, batch: Dict[str, tf.Tensor], low: float,
                       high: float) -> tf.Tensor:
  """The served rating: the model's output clipped to the data's rating range. Shape [b]."""
  return tf.clip_by_value(tf.cast(model(batch, training=False), tf.float32), low, high)


def make_rating_evaluation(model: keras.Model, strategy: tf.distribute.Strategy, low: float,
                           high: float, baseline: float,
                           user_means: Optional[np.ndarray] = None
                           ) -> Callable[[object], Dict[str, float]]:
  """Returns `evaluate(distributed_dataset) -> metrics` of explicit feedback.

  Metrics: rmse, mae, count; baseline_rmse, the RMSE of always predicting `baseline` (the
  training mean rating); with `user_means` ([users] each user's training mean rating, the
  training mean for users without one), user_mean_rmse: the item-free baseline, the bar a model
  must clear on items it never trained on.
  """
  # A variable, not a constant: a graph holds at most 2 GB of constants, and users may be many.
  means = tf.Variable(np.append(user_means, baseline) if user_means is not None
                      else np.full(1, baseline), dtype=tf.float64, trainable=False)

  def step_fn(batch):
    ratings = tf.cast(batch[schema.RATING], tf.float64)
    error = tf.cast(clipped_prediction(model, batch, low, high), tf.float64) - ratings
    users = tf.minimum(batch[schema.USER], tf.cast(tf.size(means) - 1, tf.int64))
    return tf.stack([tf.reduce_sum(tf.square(error)), tf.reduce_sum(tf.abs(error)),
                     tf.cast(tf.size(error), tf.float64),
                     tf.reduce_sum(tf.square(baseline - ratings)),
                     tf.reduce_sum(tf.square(tf.gather(means, users) - ratings))])

  sums = _summed(strategy, step_fn, 5, tf.float64)

  def evaluate(dataset) -> Dict[str, float]:
    squared, absolute, count, baseline_squared, user_squared = (
        float(x) for x in sums(dataset).numpy())
    if count == 0:
      raise ValueError("the evaluation data is empty")
    out = {"rmse": float(np.sqrt(squared / count)), "mae": absolute / count, "count": int(count),
           "baseline_rmse": float(np.sqrt(baseline_squared / count))}
    if user_means is not None:
      out["user_mean_rmse"] = float(np.sqrt(user_squared / count))
    return out

  return evaluate


def _summed(strategy: tf.distribute.Strategy, step_fn: Callable, size: int, dtype) -> Callable:
  """`sums(distributed dataset)`: step_fn's [size] sums over every batch and replica."""

  @tf.function
  def sums(dataset):
    total = tf.zeros([size], dtype)
    for batch in dataset:
      total += strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step_fn, args=(batch,)),
                               axis=None)
    return total

  return sums


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
  hit = tf.cast(rank < k, tf.float32)
  ndcg = hit * (math.log(2.0) / tf.math.log(tf.cast(rank, tf.float32) + 2.0))
  return rank, hit, ndcg


def sampled_dataset(users: np.ndarray, positives: np.ndarray, negatives: np.ndarray,
                    global_batch_size: int,
                    input_context: Optional[tf.distribute.InputContext] = None):
  """Eval users with their positive and sampled negatives, sharded per input pipeline."""
  ds = tf.data.Dataset.from_tensor_slices({
      schema.USER: users.astype(np.int64), schema.ITEM: positives.astype(np.int64),
      "negatives": negatives.astype(np.int64)})
  batch = global_batch_size
  if input_context is not None:
    ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    batch = input_context.get_per_replica_batch_size(global_batch_size)
  return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


def make_ranking_evaluation(model: keras.Model, strategy: tf.distribute.Strategy, k: int,
                            num_items: int, indptr: np.ndarray, indices: np.ndarray,
                            score_fn: Callable = None,
                            corrections: Optional[Dict[str, np.ndarray]] = None,
                            score_all_fn: Callable = None) -> Dict[str, Callable]:
  """Returns {protocol: evaluate(distributed dataset) -> {hr, ndcg, count}}.

  Args:
    model: scores (user, item) index pairs.
    k: the cut-off of HR@k and NDCG@k.
    num_items: items to rank in the full protocol.
    indptr, indices: each user's training positives (compressed sparse rows), excluded from
      the full protocol's competitors.
    score_fn: scores a batch instead of the model.
    score_all_fn: `users [b] -> scores [b, num_items]` for the full protocol; default: the
      model's `score_all` (one matmul for factorised models), or `score_fn` on every pair.
    corrections: {"hr": x, "ndcg": x} (`sampled_metric_correction`, x [negatives + 1]): the
      sampled protocol then also reports hr_corrected and ndcg_corrected.
  """
  score = score_fn or (lambda batch: model(batch, training=False))
  if score_all_fn is None:
    score_all_fn = ((lambda users: models.score_every_pair(score, users, num_items))
                    if score_fn is not None
                    else lambda users: model.score_all(users, training=False))
  positives = tf.RaggedTensor.from_row_splits(tf.constant(indices, tf.int64),
                                              tf.constant(indptr, tf.int64))

  def sampled_step(batch):
    users, items, negatives = batch[schema.USER], batch[schema.ITEM], batch["negatives"]
    n = tf.shape(negatives)[1]
    positive = score({schema.USER: users, schema.ITEM: items})  # [b]
    competitors = tf.reshape(score({schema.USER: tf.repeat(users, n),
                                    schema.ITEM: tf.reshape(negatives, [-1])}), [-1, n])
    rank, hit, ndcg = rank_hit_ndcg(positive, competitors, None, k)
    sums = tf.stack([tf.reduce_sum(hit), tf.reduce_sum(ndcg), tf.cast(tf.size(hit), tf.float32)])
    if not corrections:
      return sums
    ranks = len(corrections["hr"])  # how often each sampled rank occurs
    # A segment sum, not tf.math.bincount: GPU DenseBincount raises under op determinism.
    # Ranks past the table (none, by construction) would be dropped, as bincount's maxlength.
    counts = tf.math.unsorted_segment_sum(tf.ones_like(rank, tf.float32),
                                          tf.where(rank < ranks, rank, -1), ranks)
    return tf.concat([sums, counts], 0)

  def full_step(batch):
    users, items = batch[schema.USER], batch[schema.ITEM]
    b = tf.shape(users)[0]
    scores = tf.cast(score_all_fn(users), tf.float32)  # [b, num_items]
    seen = tf.gather(positives, users)  # ragged [b, None]
    coordinates = tf.stack([seen.value_rowids(), seen.flat_values], axis=1)
    excluded = tf.scatter_nd(coordinates, tf.ones_like(seen.flat_values, tf.bool),
                             tf.cast(tf.stack([b, num_items]), tf.int64))
    itself = tf.one_hot(items, num_items, on_value=True, off_value=False, dtype=tf.bool)
    mask = tf.logical_not(tf.logical_or(excluded, itself))
    positive = tf.gather(scores, items, batch_dims=1)
    _, hit, ndcg = rank_hit_ndcg(positive, scores, mask, k)
    return tf.stack([tf.reduce_sum(hit), tf.reduce_sum(ndcg),
                     tf.cast(tf.size(hit), tf.float32)])

  def reducer(step_fn, corrected: bool = False):
    sums = _summed(strategy, step_fn, 3 + (len(corrections["hr"]) if corrected else 0),
                   tf.float32)

    def evaluate(dataset) -> Dict[str, float]:
      totals = sums(dataset).numpy().astype(np.float64)
      hits, ndcg, count = totals[:3]
      if count == 0:
        raise ValueError("the evaluation data is empty")
      out = {"hr": hits / count, "ndcg": ndcg / count, "count": int(count)}
      if corrected:  # the mean of x[r] over the held-out items' sampled ranks
        out.update({f"{name}_corrected": float(totals[3:] @ x / count)
                    for name, x in corrections.items()})
      return out

    return evaluate

  return {SAMPLED: reducer(sampled_step, bool(corrections)), FULL: reducer(full_step)}


def full_batch_size(num_items: int, replicas: int, budget: int = 1 << 22) -> int:
  """Eval rows per global batch of the full protocol: about `budget` scores per replica."""
  return replicas * max(1, budget // max(num_items, 1))
