"""Objectives: what one kind of feedback trains toward, how it is judged, and what is served.

The idea of TensorFlow Recommenders' `Task` and Model Garden's ranking task: everything that
differs between kinds of feedback lives in one small class, so that training and export ask
the objective instead of branching on `--task`, and a new kind of feedback is one new class.
An objective owns the label and the loss, whether batches carry sampled negatives, the
evaluators with the metrics they report, the primary metric and its direction, the
`metrics.json` fields, and what the SavedModel serves. With s = s(u, i) the model's score:

  explicit      L = (r - s)^2 on observed ratings r; eval RMSE, MAE (lower is better);
                serves rating = clip(s, rating range)
  implicit      L = -y log sigmoid(s) - (1 - y) log(1 - sigmoid(s)), y = 1 for an observed
                pair and 0 for each of k sampled negatives (He et al. 2017); eval HR@K, NDCG@K
                (higher is better); serves score = sigmoid(s), a probability
  implicit_bpr  L = -log sigmoid(s(u, i) - s(u, j)) for each observed (u, i) and each of its k
                sampled negatives j (BPR: Rendle et al. 2009, with k negatives per positive):
                a pairwise loss, which cares only that positives outrank negatives; eval as
                implicit; serves score = s, a ranking score (not a probability)
  implicit_softmax  L = -log softmax_i(s(u, .)) = log sum_j exp s(u, j) - s(u, i) over every
                item j of the catalogue, for each observed (u, i): the multinomial likelihood
                of the item a user picks (Liang et al. 2018's Mult-VAE loss; the full softmax
                that sampled-softmax retrieval models approximate). No sampled negatives, and
                exact: every unobserved item is pushed down at every step, by its share of the
                probability. Costs a [batch, items] matmul a step, so it needs a model whose
                score factorises (mf, gmf); catalogues up to about 10^5 items. Eval as
                implicit; serves score = s, a ranking score

Every objective adds the model's L2 penalty on the batch's embedding rows (per example).

Loss scaling: a replica's loss is its sum divided by the *global* count (examples, or pairs for
BPR), and the optimizer sums gradients across replicas, so N replicas take the same step as one
device on the same global batch.
"""

import math
from typing import Callable, Dict, Optional, Tuple

import keras
import tensorflow as tf

from trainer import config as config_lib
from trainer import evaluation, metrics, schema
from trainer.config import ConfigError, TrainConfig
from trainer.data import artifacts, pipeline

Evaluator = evaluation.Evaluator


class Objective:
  """The base: one kind of feedback. Subclasses set the class attributes and the loss."""

  name: str = ""
  metrics: Tuple[str, ...] = ()  # the metrics evaluation reports; --target_metric picks one
  lower_is_better: Tuple[str, ...] = ()
  samples_negatives: bool = False  # batches hold each positive followed by k negatives

  def __init__(self, config: TrainConfig):
    self.config = config

  # ------------------------------------------------------------------ configuration and data

  def __init_subclass__(cls, **kwargs):
    """A subclass's static facts are its spec's (`config.OBJECTIVE_SPECS`), where the
    configuration's rules read them without loading TensorFlow."""
    super().__init_subclass__(**kwargs)
    spec = config_lib.OBJECTIVE_SPECS[cls.name]
    cls.metrics, cls.lower_is_better = spec.metrics, spec.lower_is_better
    cls.samples_negatives = spec.samples_negatives

  @property
  def examples_per_positive(self) -> int:
    """Examples a batch holds per observed interaction (1, or 1 + --num_negatives)."""
    return self.config.examples_per_positive

  def check_replicas(self, num_replicas: int) -> None:
    """The global batch must split evenly into replicas of whole positive groups."""
    unit = num_replicas * self.examples_per_positive
    if self.config.batch_size is not None and self.config.batch_size % unit:
      raise ConfigError(f"--batch_size={self.config.batch_size} is not divisible by the "
                        f"{num_replicas} replicas"
                        + (" x (1 + --num_negatives)" if self.samples_negatives else ""))

  def check_data(self, data: artifacts.PreparedData) -> None:
    """Raises ConfigError when the prepared data cannot train this objective."""

  def negative_sampler(self, data: artifacts.PreparedData) -> Optional[Callable]:
    """`add(step, batch)` for the input pipeline, or None when batches hold no negatives."""
    if not self.samples_negatives:
      return None
    metadata = data.metadata
    keys = (artifacts.pair_keys(data.train_positives, metadata.num_items)
            if self.config.exclude_positives else None)
    return pipeline.negative_sampler(metadata.num_items, self.config.num_negatives,
                                     self.config.seed, keys)

  # ------------------------------------------------------------------ training

  def model_loss(self, model: keras.Model, batch: Dict[str, tf.Tensor],
                 global_batch_size: int) -> tf.Tensor:
    """This replica's share of the global mean loss of `model` on `batch` (training mode)."""
    scores, penalty = model.scores_and_penalty(batch, training=True)  # penalty: float32 [b]
    return self.loss(batch, tf.cast(scores, tf.float32), penalty, global_batch_size)

  def loss(self, batch: Dict[str, tf.Tensor], scores: tf.Tensor, penalty: tf.Tensor,
           global_batch_size: int) -> tf.Tensor:
    """This replica's share of the global mean loss.

    Args:
      batch: the replica's batch (labels included).
      scores: the model's float32 scores, [b].
      penalty: the L2 penalty per example, float32 [b].
      global_batch_size: examples per step across replicas.
    """
    return tf.nn.compute_average_loss(self.per_example_loss(batch, scores) + penalty,
                                      global_batch_size=global_batch_size)

  def per_example_loss(self, batch: Dict[str, tf.Tensor], scores: tf.Tensor) -> tf.Tensor:
    raise NotImplementedError

  # ------------------------------------------------------------------ evaluation

  def evaluators(self, model: keras.Model, strategy: tf.distribute.Strategy,
                 data: artifacts.PreparedData) -> Dict[str, Evaluator]:
    """{protocol: evaluator}: what evaluation runs each epoch."""
    raise NotImplementedError

  def baselines(self, strategy: tf.distribute.Strategy,
                data: artifacts.PreparedData) -> Dict[str, float]:
    """Item-free baselines measured once, after training, for the final report (explicit
    ones come out of the evaluation pass itself)."""
    return {}

  def primary_metric(self, evaluators: Dict[str, Evaluator]) -> str:
    """The metric that picks the best checkpoint and stops early: --target_metric, else the
    objective's default.

    Raises:
      ConfigError: --target_metric needs a protocol the data does not support.
    """
    return self.config.target_metric or self.metrics[0]

  def better(self, metric: str, value: float, best: float) -> bool:
    """Whether `value` improves on `best` (NaN: nothing yet)."""
    if math.isnan(best):
      return True
    return value < best if metric in self.lower_is_better else value > best

  def reached(self, metric: str, value: float, target: float) -> bool:
    """Whether `value` is at least as good as `target`."""
    return value <= target if metric in self.lower_is_better else value >= target

  def result_fields(self, eval_metrics: Dict[str, float]) -> Dict[str, object]:
    """The final evaluation's fields of metrics.json."""
    return {f"eval_{name}": value for name, value in eval_metrics.items()}

  # ------------------------------------------------------------------ serving

  def serve(self, scores: tf.Tensor, metadata: schema.Metadata) -> Dict[str, tf.Tensor]:
    """What the serving signature returns for float32 scores [b]."""
    raise NotImplementedError


class Explicit(Objective):
  """Ratings: squared error; RMSE and MAE of the rating clipped to the data's range."""

  name = "explicit"

  def check_data(self, data):
    if data.metadata.implicit:
      raise ConfigError(f"--data_dir={data.data_dir} holds implicit feedback (no ratings): "
                        "train it with --task=implicit or --task=implicit_bpr")

  def per_example_loss(self, batch, scores):
    return tf.square(batch[schema.RATING] - scores)

  def evaluators(self, model, strategy, data):
    return evaluation.rating_evaluators(self.config, model, strategy, data)

  def result_fields(self, eval_metrics):
    out = {"eval_rmse": eval_metrics["rmse"], "eval_mae": eval_metrics["mae"],
           "eval_examples": eval_metrics["count"],
           "eval_rmse_global_mean_baseline": eval_metrics["baseline_rmse"]}
    if "user_mean_rmse" in eval_metrics:
      out["eval_rmse_user_mean_baseline"] = eval_metrics["user_mean_rmse"]
    return out

  def serve(self, scores, metadata):
    return {"rating": tf.clip_by_value(scores, metadata.rating_min, metadata.rating_max)}


class Implicit(Objective):
  """Observed interactions against sampled negatives: binary cross-entropy on the logit."""

  name = "implicit"

  def per_example_loss(self, batch, scores):
    return tf.nn.sigmoid_cross_entropy_with_logits(batch[schema.LABEL], scores)

  def evaluators(self, model, strategy, data):
    return evaluation.model_ranking_evaluators(self.config, model, strategy, data)

  def baselines(self, strategy, data):
    return evaluation.popularity_baselines(self.config, strategy, data)

  def primary_metric(self, evaluators):
    if self.config.target_metric:
      protocol = metrics.protocol_of(self.config.target_metric)
      if protocol not in evaluators:
        raise ConfigError(f"--target_metric={self.config.target_metric} needs eval negatives: "
                          "prepare with --split=leave_one_out --eval_negatives=N")
      return self.config.target_metric
    return "hr_sampled" if metrics.SAMPLED in evaluators else "hr_full"

  def result_fields(self, eval_metrics):
    return {"top_k": self.config.top_k, **super().result_fields(eval_metrics)}

  def serve(self, scores, metadata):
    return {"score": tf.sigmoid(scores)}


class ImplicitBPR(Implicit):
  """Observed interactions ranked above their sampled negatives: the pairwise logistic loss.

  The batch layout is the input pipeline's (`pipeline.negative_sampler`): each positive
  followed by its k negatives, so a replica's scores reshape to [positives, 1 + k].
  """

  name = "implicit_bpr"

  def loss(self, batch, scores, penalty, global_batch_size):
    k = self.config.num_negatives
    grouped = tf.reshape(scores, [-1, k + 1])  # [p, 1 + k]: the positive, then its negatives
    margins = grouped[:, :1] - grouped[:, 1:]  # [p, k]
    global_pairs = global_batch_size // (k + 1) * k
    pairwise = tf.reduce_sum(tf.nn.softplus(-margins)) / global_pairs  # -log sigmoid(margin)
    return pairwise + tf.reduce_sum(penalty) / global_batch_size

  def serve(self, scores, metadata):
    return {"score": scores}


class ImplicitSoftmax(Implicit):
  """Each observed interaction's item against the whole catalogue: softmax cross-entropy."""

  name = "implicit_softmax"

  def model_loss(self, model, batch, global_batch_size):
    positive, logits, penalty = model.softmax_scores(batch, training=True)  # [b], [b, n]
    positive, logits = tf.cast(positive, tf.float32), tf.cast(logits, tf.float32)
    # The positive's own column is its score as the example gets it (autorec leaves the
    # example's interaction out of it; for the others the two are equal): a cross-entropy.
    rows = tf.range(tf.shape(logits, out_type=tf.int64)[0])
    logits = tf.tensor_scatter_nd_update(
        logits, tf.stack([rows, tf.cast(batch[schema.ITEM], tf.int64)], axis=1), positive)
    cross_entropy = tf.reduce_logsumexp(logits, axis=1) - positive
    return tf.nn.compute_average_loss(cross_entropy + penalty,
                                      global_batch_size=global_batch_size)

  def serve(self, scores, metadata):
    return {"score": scores}


_OBJECTIVES = {cls.name: cls for cls in (Explicit, Implicit, ImplicitBPR, ImplicitSoftmax)}
if set(_OBJECTIVES) != set(config_lib.TASKS):  # the enumeration lives in config, for the flags
  raise ImportError(f"objectives {sorted(_OBJECTIVES)} do not match --task's values "
                    f"{sorted(config_lib.TASKS)}")


def for_config(config: TrainConfig) -> Objective:
  """The objective of `config.task`.

  Raises:
    ConfigError: naming --task when it is unknown.
  """
  try:
    return _OBJECTIVES[config.task](config)
  except KeyError:
    raise ConfigError(f"--task={config.task!r} is not one of "
                      f"{', '.join(config_lib.TASKS)}") from None

