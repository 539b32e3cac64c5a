"""Evaluation under any strategy: each replica scores its share of the evaluation rows, the sums
are reduced across replicas (the formulas are in `trainer.metrics`).

Ratings: the served rating (the model's output clipped to the data's rating range) against the
held-out rating; RMSE, MAE, the RMSE of always predicting the training mean, and of predicting
each user's training mean (the item-free baseline).

Ranking, under two protocols:
  sampled  the competitors are the prepared `eval_negatives` of the user (He et al. 2017;
           reproducible, but optimistic: Krichene and Rendle 2020), also reported corrected
           (`metrics.sampled_metric_correction`) as `hr_corrected_sampled`,
           `ndcg_corrected_sampled`
  full     the competitors are all items except the user's training positives (and the
           held-out item itself)
and the popularity baseline under both, after training.

Context: each eval row is scored in its own context (data prepared before context carries
none in its sampled rows, which then score without it); the ranking protocols leave what
describes the held-out item, its age, missing: every competitor is ranked in that context.

An evaluator runs over the eval data and returns flat metrics ({"rmse": ..., "count": ...});
objectives choose theirs (`Objective.evaluators`), the loop runs them (`evaluate_all`).
"""

from typing import Callable, Dict, Optional

import keras
import numpy as np
import tensorflow as tf

from trainer import metrics, models, schema
from trainer.config import TrainConfig
from trainer.data import artifacts, pipeline
from trainer.metrics import FULL, SAMPLED, hit_ndcg, rank_hit_ndcg

Evaluator = Callable[[], Dict[str, float]]
# Context features that describe the scored item (trainer.data.context): left missing when a
# row's context ranks the whole catalogue.
ITEM_CONTEXT = (schema.context_key("item_age"),)


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


def sampled_dataset(users: np.ndarray, positives: np.ndarray, negatives: np.ndarray,
                    global_batch_size: int,
                    input_context: Optional[tf.distribute.InputContext] = None,
                    context: Optional[Dict[str, np.ndarray]] = None):
  """Eval users with their positive and sampled negatives (and the eval row's `context`:
  {context_<name>: [users]}), sharded per input pipeline."""
  ds = tf.data.Dataset.from_tensor_slices({
      schema.USER: users.astype(np.int64), schema.ITEM: positives.astype(np.int64),
      "negatives": negatives.astype(np.int64), **(context or {})})
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
    score_all_fn: `(users [b], batch) -> scores [b, num_items]` for the full protocol (the
      batch: the eval rows, with their context); default: the model's `score_all` (one
      matmul for factorised models), or `score_fn` on every pair.
    corrections: {"hr": x, "ndcg": x} (`sampled_metric_correction`, x [negatives + 1]): the
      sampled protocol then also reports hr_corrected and ndcg_corrected.
  """
  score = score_fn or (lambda batch: model(batch, training=False))
  if score_all_fn is None:
    score_all_fn = ((lambda users, _: models.score_every_pair(score, users, num_items))
                    if score_fn is not None
                    else lambda users, batch: model.score_all(users, training=False,
                                                              context=batch))
  # + an empty row: the out-of-vocabulary user's (eval rows of --split=given).
  positives = tf.RaggedTensor.from_row_splits(tf.constant(indices, tf.int64),
                                              tf.constant(np.append(indptr, indptr[-1]),
                                                          tf.int64))
  sampled = _ranking_reducer(strategy, _sampled_step(score, k, corrections), corrections)
  full = _ranking_reducer(strategy, _full_step(score_all_fn, positives, k, num_items))
  return {SAMPLED: sampled, FULL: full}


def _sampled_step(score: Callable, k: int, corrections: Optional[Dict[str, np.ndarray]]):
  """A replica's sums of the sampled protocol: [hits, ndcg, count] (+ a count per rank)."""

  def step(batch):
    users, items, negatives = batch[schema.USER], batch[schema.ITEM], batch["negatives"]
    n = tf.shape(negatives)[1]
    context = _ranking_context(batch)
    positive = score({schema.USER: users, schema.ITEM: items, **context})  # [b]
    competitors = tf.reshape(score({
        schema.USER: tf.repeat(users, n), schema.ITEM: tf.reshape(negatives, [-1]),
        **{k: tf.repeat(v, n, axis=0) for k, v in context.items()}}), [-1, n])
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

  return step


def _ranking_context(batch) -> Dict[str, tf.Tensor]:
  """The eval row's context for ranking, but for what describes the held-out item itself (its
  age): every competitor is ranked in that context, and it would tell which one is held out."""
  return {key: tf.zeros_like(value) if key in ITEM_CONTEXT else value
          for key, value in schema.context_of(batch).items()}


def _full_step(score_all: Callable, positives: tf.RaggedTensor, k: int, num_items: int):
  """A replica's sums of the full protocol: [hits, ndcg, count], the user's training positives
  and the held-out item itself excluded from the competitors. An eval item outside the
  vocabulary (--split=given) is a miss: the model cannot recommend an item it does not know."""

  def step(batch):
    users, items = batch[schema.USER], batch[schema.ITEM]
    b = tf.shape(users)[0]
    known = tf.cast(items < num_items, tf.float32)
    items = tf.minimum(items, num_items - 1)
    scores = tf.cast(score_all(users, _ranking_context(batch)), tf.float32)  # [b, num_items]
    positive = tf.gather(scores, items, batch_dims=1)  # [b]
    # The rank among the competitors, without building a [b, num_items] mask of them: the
    # items scored at least as high (ties against the model), less those of the user's
    # training positives (distinct within a user), less the item itself (unless it is one of
    # them, already taken off). The same count as masking, in one pass over the scores.
    ahead = tf.reduce_sum(tf.cast(scores >= positive[:, None], tf.int32), axis=1)
    seen = tf.gather(positives, users)  # ragged [b, None]
    row = seen.value_rowids()
    seen_scores = tf.gather_nd(scores, tf.stack([row, seen.flat_values], axis=1))
    row_positive = tf.gather(positive, row)
    seen_ahead = tf.math.unsorted_segment_sum(
        tf.cast(seen_scores >= row_positive, tf.int32), row, b)
    itself_seen = tf.math.unsorted_segment_sum(
        tf.cast(tf.equal(seen.flat_values, tf.gather(items, row)), tf.int32), row, b)
    hit, ndcg = hit_ndcg(ahead - seen_ahead - 1 + itself_seen, k)
    return tf.stack([tf.reduce_sum(hit * known), tf.reduce_sum(ndcg * known),
                     tf.cast(tf.size(hit), tf.float32)])

  return step


def _ranking_reducer(strategy: tf.distribute.Strategy, step_fn: Callable,
                     corrections: Optional[Dict[str, np.ndarray]] = None) -> Callable:
  """`evaluate(dataset) -> {hr, ndcg, count}` (+ the corrected metrics) from `step_fn`'s sums
  over every batch and replica."""
  sums = _summed(strategy, step_fn, 3 + (len(corrections["hr"]) if corrections else 0),
                 tf.float32)

  def evaluate(dataset) -> Dict[str, float]:
    totals = sums(dataset).numpy().astype(np.float64)
    hits, ndcg, count = totals[:3]
    if count == 0:
      raise ValueError("the evaluation data is empty")
    out = {"hr": hits / count, "ndcg": ndcg / count, "count": int(count)}
    if corrections:  # the mean of x[r] over the held-out items' sampled ranks
      out.update({f"{name}_corrected": float(totals[3:] @ x / count)
                  for name, x in corrections.items()})
    return out

  return evaluate


def full_batch_size(num_items: int, replicas: int, budget: int = 1 << 22) -> int:
  """Eval rows per global batch of the full protocol: about `budget` scores per replica."""
  return replicas * max(1, budget // max(num_items, 1))


def user_means(data: artifacts.PreparedData):
  """Each user's mean training rating (the global mean for users without any), or None for
  data prepared before the per-user sums were written."""
  positives = data.train_positives
  if "rating_sum" not in positives:
    return None
  counts = np.diff(positives["indptr"])
  return np.where(counts > 0, positives["rating_sum"] / np.maximum(counts, 1),
                  data.metadata.train_rating_mean)


def sampled_corrections(data: artifacts.PreparedData,
                         k: int) -> Optional[Dict[str, np.ndarray]]:
  """Krichene and Rendle's corrections of the sampled protocol's HR@k and NDCG@k, for the
  data's catalogue: the candidates of a held-out item are the items the user has not trained
  on (their mean count), its competitors the prepared eval negatives. None without them."""
  sampled = data.eval_negatives
  if sampled is None:
    return None
  counts = np.diff(data.train_positives["indptr"])
  candidates = int(round(data.metadata.num_items - counts[sampled["users"]].mean()))
  negatives = sampled["negatives"].shape[1]
  if negatives >= candidates:
    return None
  return {name: metrics.sampled_metric_correction(candidates, negatives, name, k)
          for name in ("hr", "ndcg")}


def _named(evaluate: Callable, dataset, protocol: str) -> Evaluator:
  """A ranking protocol's evaluator with its metrics named by protocol (hr_full, ...)."""

  def run() -> Dict[str, float]:
    return {f"{name}_{protocol}": value for name, value in evaluate(dataset).items()}

  return run


def rating_evaluators(config: TrainConfig, model: keras.Model, strategy: tf.distribute.Strategy,
                      data: artifacts.PreparedData) -> Dict[str, Evaluator]:
  """{"explicit": evaluator} of the model's ratings on the eval split."""
  metadata, replicas = data.metadata, strategy.num_replicas_in_sync
  evaluate = make_rating_evaluation(model, strategy, metadata.rating_min, metadata.rating_max,
                                    metadata.train_rating_mean, user_means(data))
  context = data.context_keys(config.features)
  eval_data = strategy.distribute_datasets_from_function(
      lambda ctx: pipeline.make_dataset(data.eval_pattern, config.eval_batch_for(replicas),
                                        False, ctx, context=context))
  return {"explicit": lambda: evaluate(eval_data)}


def model_ranking_evaluators(config: TrainConfig, model: keras.Model,
                             strategy: tf.distribute.Strategy,
                             data: artifacts.PreparedData) -> Dict[str, Evaluator]:
  """{protocol: evaluator} of the model's ranking, the sampled protocol with its corrections."""
  return ranking_evaluators(config, strategy, data, lambda batch: model(batch, training=False),
                            sampled_corrections(data, config.top_k),
                            lambda users, batch: model.score_all(users, training=False,
                                                                 context=batch))


def ranking_evaluators(config: TrainConfig, strategy: tf.distribute.Strategy,
                       data: artifacts.PreparedData, score: Callable,
                       corrections: Optional[Dict[str, np.ndarray]] = None,
                       score_all: Optional[Callable] = None) -> Dict[str, Evaluator]:
  """{protocol: evaluator} of the ranking scores `score(batch)` (ties count against them);
  `score_all(users, batch)`, when given, scores the full protocol's whole catalogue at once."""
  metadata = data.metadata
  replicas = strategy.num_replicas_in_sync
  positives = data.train_positives
  protocols = make_ranking_evaluation(None, strategy, config.top_k, metadata.num_items,
                                      positives["indptr"], positives["indices"], score,
                                      corrections, score_all)
  out = {}
  sampled = data.eval_negatives
  if sampled is not None:
    sampled_data = strategy.distribute_datasets_from_function(
        lambda ctx: sampled_dataset(
            sampled["users"], sampled["positives"], sampled["negatives"],
            config.eval_batch_for(replicas), ctx,
            {key: sampled[key] for key, _, _ in data.context_keys(config.features)
             if key in sampled}))
    out[SAMPLED] = _named(protocols[SAMPLED], sampled_data, SAMPLED)
  full_batch = full_batch_size(metadata.num_items, replicas)
  full_data = strategy.distribute_datasets_from_function(
      lambda ctx: pipeline.make_dataset(data.eval_pattern, full_batch, False, ctx,
                                        context=data.context_keys(config.features)))
  out[FULL] = _named(protocols[FULL], full_data, FULL)
  return out


def popularity_baselines(config: TrainConfig, strategy: tf.distribute.Strategy,
                         data: artifacts.PreparedData) -> Dict[str, float]:
  """Popularity: every user gets the items with the most training interactions, each
  protocol's metrics as `<metric>_popularity_baseline`. On a cold_items split it ranks the
  held-out items last (none has an interaction), the bar the IDs alone cannot clear."""
  counts = np.bincount(data.train_positives["indices"],
                       minlength=data.metadata.num_items + 1).astype(np.float32)
  popularity = tf.constant(counts)  # [items + 1]
  catalogue = popularity[:data.metadata.num_items]
  evaluators = ranking_evaluators(
      config, strategy, data, lambda batch: tf.gather(popularity, batch[schema.ITEM]),
      # The full protocol's scores, the catalogue's counts for every row: not each (user,
      # item) pair's gather (2.5x the time at 138K users x 27K items).
      score_all=lambda users, _: tf.broadcast_to(
          catalogue[None, :], tf.stack([tf.shape(users)[0], tf.shape(catalogue)[0]])))
  return {f"{name}_popularity_baseline": value for run in evaluators.values()
          for name, value in run().items() if not name.startswith("count")}


def evaluate_all(evaluators: Dict[str, Evaluator]) -> Dict[str, float]:
  """Every protocol's metrics, in one flat dict."""
  return {name: value for run in evaluators.values() for name, value in run().items()}
