"""A run that diverges stops at once and never looks like a success (trainer.train's
DivergenceGuard): exit code 3, the latest checkpoint the last finite one, nothing exported, no
metrics.json; every JSON the project writes is strict; every task trains with default flags."""

import json
import math
import os

import pytest
import tensorflow as tf

from conftest import run_cli
from trainer import errors, loop, models, run_dir, strict_json, train
from trainer.config import TrainConfig
from trainer.data import artifacts

# SGD at 1e30 on seed_mlp: the first step's loss is finite; its update throws the weights to
# ~1e30, and the second step's squared error overflows float32.
DIVERGING = dict(optimizer="sgd", learning_rate=1e30, epochs=2, batch_size=128,
                 embedding_dim=8, hidden_units=8, log_every_steps=1, checkpoint_every_steps=1,
                 checkpoint_every_secs=0)


def _assert_nothing_shipped(model_dir):
  assert not os.path.exists(os.path.join(model_dir, run_dir.METRICS_FILE))
  assert not os.path.exists(os.path.join(model_dir, "export"))


def _latest_checkpoint_is_finite(model_dir, data_dir):
  latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
  assert latest is not None
  model = run_dir.load_trained_model(model_dir, artifacts.PreparedData(data_dir))
  assert loop.weights_finite(model)
  return latest


def test_a_diverging_run_stops_on_two_replicas_with_its_last_finite_checkpoint(
    tiny_data_dir, tmp_path, mirrored_strategy):
  config = TrainConfig(data_dir=tiny_data_dir, model_dir=str(tmp_path / "m"),
                       num_cpu_devices=2, **DIVERGING)
  with pytest.raises(errors.DivergedError) as raised:
    train.train_and_evaluate(config, mirrored_strategy)
  message = str(raised.value)
  assert message.startswith("training diverged: the mean training loss of steps 2-2 of epoch "
                            "1 (global step 2) is ")
  assert "the last finite loss was " in message and "at global step 1" in message
  assert "--learning_rate (now 1e+30)" in message and "range over [1, 5]" in message
  assert raised.value.exit_code == errors.DIVERGED_EXIT_CODE == 3
  assert _latest_checkpoint_is_finite(config.model_dir, tiny_data_dir).endswith("ckpt-1")
  _assert_nothing_shipped(config.model_dir)


def test_weights_gone_non_finite_are_refused_before_a_checkpoint(tiny_data_dir):
  # The loss of a step is computed before its update: a finite loss can leave non-finite
  # weights, which the guard checks before every checkpoint (here planted in one weight).
  config = TrainConfig(data_dir=tiny_data_dir, model_dir="m", embedding_dim=4, hidden_units=4)
  model = models.for_config(config, artifacts.PreparedData(tiny_data_dir))
  guard = loop.DivergenceGuard(config, artifacts.load_metadata(tiny_data_dir), model)
  guard.check_weights(1, 5)  # finite: nothing happens
  variable = model.trainable_variables[-1]
  variable.assign(tf.fill(variable.shape, math.inf))
  assert not loop.weights_finite(model)
  with pytest.raises(errors.DivergedError, match=r"the weights after global step 7 \(epoch 2\) "
                     "hold NaN or infinite values; that checkpoint was not written"):
    guard.check_weights(2, 7)


def test_a_non_finite_eval_metric_stops_the_run(tiny_data_dir):
  guard = loop.DivergenceGuard(TrainConfig(data_dir="d", model_dir="m"),
                                artifacts.load_metadata(tiny_data_dir), model=None)
  guard.check_loss(0.5, 1, 1, 10, 10)
  guard.check_metrics(1, {"rmse": 1.0, "count": 3.0})
  with pytest.raises(errors.DivergedError, match=r"the eval metrics after epoch 2 are not "
                     r"finite \(rmse nan\); the last finite loss was 0.5 at global step 10"):
    guard.check_metrics(2, {"rmse": math.nan, "mae": 1.0})


@pytest.mark.slow
def test_the_cli_exits_3_and_says_what_to_try(tiny_data_dir, tmp_path):
  model_dir = str(tmp_path / "m")
  result = run_cli("trainer.task", f"--data_dir={tiny_data_dir}", f"--model_dir={model_dir}",
                   *(f"--{k}={v}" for k, v in DIVERGING.items()), check=False, timeout=300)
  assert result.returncode == 3, result.stderr[-3000:]
  assert "neumf-train: error: training diverged: the mean training loss" in result.stderr
  assert "Restart with the same command" not in result.stderr  # not a retryable failure
  assert result.stdout.strip() == ""  # no result line
  _latest_checkpoint_is_finite(model_dir, tiny_data_dir)
  _assert_nothing_shipped(model_dir)


@pytest.fixture(scope="module")
def implicit_dir(tmp_path_factory):
  from trainer.config import PrepareConfig
  from trainer.data import preparation
  out = str(tmp_path_factory.mktemp("defaults_implicit"))
  preparation.prepare(PrepareConfig(output_dir=out, num_users=100, num_items=60,
                                    num_ratings=3000, num_shards=1, implicit=True,
                                    split="leave_one_out", eval_negatives=20))
  return out


@pytest.mark.slow
@pytest.mark.parametrize("task", ["explicit", "implicit", "implicit_bpr", "implicit_softmax"])
def test_every_task_trains_with_default_flags(tiny_data_dir, implicit_dir, tmp_path, task):
  # TrainConfig's defaults are the flags' (task.py takes them from the dataclass).
  model_dir = str(tmp_path / "model")
  model = {"model": "mf"} if task == "implicit_softmax" else {}  # seed_mlp has no catalogue
  data_dir = tiny_data_dir if task == "explicit" else implicit_dir
  metrics = train.train_and_evaluate(TrainConfig(data_dir=data_dir, model_dir=model_dir,
                                                 task=task, epochs=1, **model))
  assert metrics["global_batch_size"] == (1020 if task in ("implicit", "implicit_bpr")
                                          else 1024)
  # Every JSON written is strict: no NaN or Infinity anywhere.
  for name in ("metrics.json", "config.json", "history.json"):
    strict_json.loads(open(os.path.join(model_dir, name)).read())
  strict_json.loads(open(os.path.join(data_dir, "metadata.json")).read())
  assert json.loads(open(os.path.join(model_dir, "config.json")).read())["batch_size"] == (
      metrics["global_batch_size"])


def test_ratings_that_overflow_the_loss_stop_the_run_naming_their_range(tmp_path):
  # 3e38 is a float32 and passes preparation; its squared error does not fit one: the first
  # step's loss is infinite. The message points at the data's range.
  log = tmp_path / "log.csv"
  log.write_text("user,item,rating\n" + "".join(
      f"u{u},i{i},{'3e38' if (u + i) % 7 == 0 else 1 + (u * i) % 5}\n"
      for u in range(20) for i in range(10)))
  from trainer.config import PrepareConfig
  from trainer.data import preparation
  data_dir = str(tmp_path / "data")
  preparation.prepare(PrepareConfig(output_dir=data_dir, source="csv", input=(str(log),),
                                    user_column="user", item_column="item",
                                    rating_column="rating", num_shards=1))
  config = TrainConfig(data_dir=data_dir, model_dir=str(tmp_path / "m"), epochs=1,
                       batch_size=32, log_every_steps=1, embedding_dim=4, hidden_units=4)
  with pytest.raises(errors.DivergedError, match=r"steps 1-1 of epoch 1 \(global step 1\) is "
                     r"(inf|nan); no finite loss was seen.*range over \[1, 3e\+38\]"):
    train.train_and_evaluate(config)
  _assert_nothing_shipped(config.model_dir)
