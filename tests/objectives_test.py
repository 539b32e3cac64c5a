"""Tests of the objectives: losses worked out by hand, metric directions, serving, wiring."""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from trainer import config as config_lib
from trainer import objectives, schema
from trainer.config import ConfigError, TrainConfig
from trainer.data import artifacts

_BASE = TrainConfig(data_dir="d", model_dir="m")


def _objective(**changes) -> objectives.Objective:
  return objectives.for_config(dataclasses.replace(_BASE, **changes))


def _loss(objective, batch, scores, penalty, global_batch):
  batch = {k: tf.constant(v, tf.float32) for k, v in batch.items()}
  return float(objective.loss(batch, tf.constant(scores, tf.float32),
                              tf.constant(penalty, tf.float32), global_batch))


def test_every_task_has_its_objective():
  for task in config_lib.TASKS:
    assert objectives.for_config(dataclasses.replace(_BASE, task=task)).name == task
  with pytest.raises(ConfigError, match="--task='pairwise' is not one of explicit"):
    objectives.for_config(dataclasses.replace(_BASE, task="pairwise"))


def test_explicit_loss_is_the_squared_error_plus_penalty_over_the_global_batch():
  # ((4 - 3)^2 + 0.5 + (2 - 2)^2 + 0) / 4: this replica holds 2 of a global batch of 4.
  loss = _loss(_objective(), {schema.RATING: [4.0, 2.0]}, [3.0, 2.0], [0.5, 0.0], 4)
  assert loss == pytest.approx(1.5 / 4)


def test_implicit_loss_is_the_cross_entropy_of_the_logits():
  # Positive at logit ln 3: -log(3/4); negative at logit 0: -log(1/2).
  loss = _loss(_objective(task="implicit"), {schema.LABEL: [1.0, 0.0]}, [math.log(3.0), 0.0],
               [0.0, 0.0], 2)
  assert loss == pytest.approx((math.log(4 / 3) + math.log(2.0)) / 2)


def test_bpr_loss_is_the_pairwise_logistic_loss_of_each_positive_against_its_negatives():
  # Two positives, each followed by its 2 negatives; margins (2, 1) and (0, 0); 4 pairs in the
  # global batch of 6; the penalty averages over the 6 examples.
  loss = _loss(_objective(task="implicit_bpr", num_negatives=2),
               {schema.LABEL: [1, 0, 0, 1, 0, 0]}, [2.0, 0.0, 1.0, 0.0, 0.0, 0.0],
               [0.6, 0.0, 0.0, 0.0, 0.0, 0.0], 6)
  pairs = math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0)) + 2 * math.log(2.0)
  assert loss == pytest.approx(pairs / 4 + 0.6 / 6)


def test_bpr_loss_ignores_a_shift_of_every_score():
  """Only differences count: the output bias gets no gradient under BPR."""
  objective = _objective(task="implicit_bpr", num_negatives=1)
  batch = {schema.LABEL: [1, 0, 1, 0]}
  a = _loss(objective, batch, [0.3, -0.2, 1.0, 0.5], [0.0] * 4, 4)
  b = _loss(objective, batch, [5.3, 4.8, 6.0, 5.5], [0.0] * 4, 4)
  assert a == pytest.approx(b)


def test_softmax_loss_is_each_positive_against_the_whole_catalogue():
  """MF with 2 users x 3 items, biases zero: scores are p_u . q_j. Per example,
  log sum_j exp(s_uj) - s_ui, plus the L2 penalty on the example's rows, over the global
  batch (this replica holds 2 of 4)."""
  from trainer import models
  objective = _objective(task="implicit_softmax", model="mf", l2=0.1)
  model = models.build_model("mf", 2, 3, 2, l2=0.1)
  p = np.array([[1.0, 0.0], [0.5, -1.0], [0.0, 0.0]], np.float32)  # + the OOV row
  q = np.array([[2.0, 1.0], [0.0, 1.0], [-1.0, 0.5], [0.0, 0.0]], np.float32)
  model.user_embedding.embeddings.assign(p)
  model.item_embedding.embeddings.assign(q)
  users, items = np.array([0, 1]), np.array([2, 0])
  batch = {schema.USER: tf.constant(users, tf.int64), schema.ITEM: tf.constant(items, tf.int64)}
  loss = float(objective.model_loss(model, batch, 4))
  scores = p[users] @ q[:3].T  # [2, 3]
  expected = (np.log(np.exp(scores).sum(1)) - scores[[0, 1], items]
              + 0.1 * ((p[users] ** 2).sum(1) + (q[items] ** 2).sum(1)))
  assert loss == pytest.approx(expected.sum() / 4, rel=1e-5)
  assert not objective.samples_negatives and objective.negative_sampler(None) is None


@pytest.mark.parametrize("model", ["seed_mlp", "mlp", "neumf"])
def test_softmax_needs_a_factorised_model(model):
  with pytest.raises(ConfigError, match=f"--task=implicit_softmax .* not --model={model}"):
    TrainConfig(data_dir="d", model_dir="m", task="implicit_softmax", model=model).validate()
  TrainConfig(data_dir="d", model_dir="m", task="implicit_softmax", model="gmf").validate()


def test_metric_directions():
  explicit, implicit = _objective(), _objective(task="implicit")
  assert explicit.better("rmse", 0.9, 1.0) and not explicit.better("rmse", 1.1, 1.0)
  assert implicit.better("hr_full", 0.2, 0.1) and not implicit.better("ndcg_full", 0.1, 0.2)
  assert explicit.better("mae", 5.0, float("nan")) and implicit.better("hr_full", 0.0,
                                                                         float("nan"))
  assert explicit.reached("rmse", 0.9, 0.9) and not explicit.reached("rmse", 0.91, 0.9)
  assert implicit.reached("hr_sampled", 0.7, 0.65) and not implicit.reached("hr_full", 0.1, 0.12)


def test_primary_metric_defaults_and_target():
  fake = lambda: {}  # noqa: E731
  assert _objective().primary_metric({"explicit": fake}) == "rmse"
  implicit = _objective(task="implicit_bpr")
  assert implicit.primary_metric({"sampled": fake, "full": fake}) == "hr_sampled"
  assert implicit.primary_metric({"full": fake}) == "hr_full"
  targeted = _objective(task="implicit", target_metric="ndcg_full", target_value=0.1)
  assert targeted.primary_metric({"sampled": fake, "full": fake}) == "ndcg_full"
  needs_negatives = _objective(task="implicit", target_metric="hr_sampled", target_value=0.5)
  with pytest.raises(ConfigError, match="--target_metric=hr_sampled needs eval negatives"):
    needs_negatives.primary_metric({"full": fake})


def test_what_each_objective_serves():
  metadata = schema.Metadata(num_users=1, num_items=1, num_train=1, num_eval=1, rating_min=1.0,
                             rating_max=5.0, train_rating_mean=3.0, num_shards=1,
                             source="synthetic", split="random", eval_fraction=0.1, seed=0)
  scores = tf.constant([-1.0, 0.0, 7.0])
  served = _objective().serve(scores, metadata)
  np.testing.assert_allclose(served["rating"], [1.0, 1.0, 5.0])
  served = _objective(task="implicit").serve(scores, metadata)
  np.testing.assert_allclose(served["score"], 1 / (1 + np.exp(-scores.numpy())), rtol=1e-6)
  for task in ("implicit_bpr", "implicit_softmax"):
    served = _objective(task=task).serve(scores, metadata)
    np.testing.assert_allclose(served["score"], scores)


def test_negatives_belong_to_the_implicit_objectives(tiny_data_dir):
  data = artifacts.PreparedData(tiny_data_dir)
  assert _objective().negative_sampler(data) is None
  assert _objective().examples_per_positive == 1
  implicit = _objective(task="implicit_bpr", num_negatives=3, batch_size=1000)
  assert implicit.examples_per_positive == 4
  add = implicit.negative_sampler(data)
  batch = {schema.USER: tf.constant([0, 1], tf.int64), schema.ITEM: tf.constant([2, 3], tf.int64),
           schema.RATING: tf.constant([1.0, 1.0])}
  out = add(tf.constant(0, tf.int64), batch)
  assert out[schema.USER].numpy().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
  assert out[schema.LABEL].numpy().tolist() == [1, 0, 0, 0, 1, 0, 0, 0]


def test_explicit_refuses_implicit_data(tmp_path):
  from trainer.config import PrepareConfig
  from trainer.data import preparation
  out = str(tmp_path / "implicit")
  preparation.prepare(PrepareConfig(output_dir=out, num_users=30, num_items=20, num_ratings=200,
                                    implicit=True))
  with pytest.raises(ConfigError, match="holds implicit feedback"):
    _objective().check_data(artifacts.PreparedData(out))
  _objective(task="implicit").check_data(artifacts.PreparedData(out))  # no error


def test_result_fields():
  explicit = _objective().result_fields({"rmse": 0.9, "mae": 0.7, "count": 10,
                                         "baseline_rmse": 1.1})
  assert explicit == {"eval_rmse": 0.9, "eval_mae": 0.7, "eval_examples": 10,
                      "eval_rmse_global_mean_baseline": 1.1}
  implicit = _objective(task="implicit", top_k=5).result_fields({"hr_full": 0.2,
                                                                  "count_full": 3})
  assert implicit == {"top_k": 5, "eval_hr_full": 0.2, "eval_count_full": 3}
