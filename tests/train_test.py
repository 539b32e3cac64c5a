"""Tests of `train_and_evaluate`: learning, metrics, checkpoints and resume, export, errors."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from conftest import TaskStrategy
from trainer import run_dir, schema, train
from trainer.config import ConfigError, TrainConfig
from trainer.errors import LostPeerError
from trainer.data import artifacts, pipeline


def _eval_examples(data_dir):
  ds = pipeline.make_dataset(os.path.join(data_dir, schema.shard_pattern(schema.EVAL)), 1000,
                             training=False)
  parts = list(ds.as_numpy_iterator())
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope="module")
def trained(tiny_data_dir, tmp_path_factory, mirrored_strategy):
  """One run on two replicas, shared by the tests of this module (read-only)."""
  config = TrainConfig(data_dir=tiny_data_dir, model_dir=str(tmp_path_factory.mktemp("model")),
                       epochs=6, batch_size=128, learning_rate=0.003, embedding_dim=16,
                       hidden_units=32, log_every_steps=10, num_cpu_devices=2)
  metrics = train.train_and_evaluate(config, mirrored_strategy)
  return config, metrics


def _restore(config, metadata):
  """The model that was exported and reported: the best epoch's."""
  return run_dir.load_trained_model(config.model_dir, artifacts.PreparedData(config.data_dir),
                                  os.path.join(config.resolved_checkpoint_dir, "best"))


def test_learns_more_than_the_global_mean(trained, tiny_data_dir):
  config, metrics = trained
  metadata = artifacts.load_metadata(tiny_data_dir)
  ratings = _eval_examples(tiny_data_dir)[schema.RATING].astype(np.float64)
  baseline = np.sqrt(np.mean((ratings - metadata.train_rating_mean) ** 2))
  assert metrics["eval_rmse_global_mean_baseline"] == pytest.approx(baseline, rel=1e-6)
  assert metrics["eval_rmse"] < 0.9 * baseline
  assert metrics["eval_mae"] < metrics["eval_rmse"]
  assert metrics["eval_examples"] == metadata.num_eval
  assert (metrics["epochs"], metrics["replicas"]) == (6, 2)
  assert metrics["train_examples_per_sec"] > 0
  with open(os.path.join(config.model_dir, run_dir.METRICS_FILE)) as f:
    assert json.load(f) == metrics


def test_metrics_match_a_numpy_evaluation_of_the_checkpoint(trained, tiny_data_dir):
  config, metrics = trained
  metadata = artifacts.load_metadata(tiny_data_dir)
  model = _restore(config, metadata)
  data = _eval_examples(tiny_data_dir)
  predicted = np.clip(np.asarray(model({schema.USER: data[schema.USER],
                                        schema.ITEM: data[schema.ITEM]})),
                      metadata.rating_min, metadata.rating_max)
  error = predicted.astype(np.float64) - data[schema.RATING]
  assert metrics["eval_rmse"] == pytest.approx(np.sqrt(np.mean(error ** 2)), rel=1e-5)
  assert metrics["eval_mae"] == pytest.approx(np.mean(np.abs(error)), rel=1e-5)


def _saved(checkpoint: str, counter: str) -> int:
  return int(tf.train.load_variable(checkpoint, f"{counter}/.ATTRIBUTES/VARIABLE_VALUE"))


def test_writes_the_report_and_the_history(trained):
  from PIL import Image
  config, metrics = trained
  assert metrics["report"] == os.path.join(config.model_dir, "report.png")
  with Image.open(metrics["report"]) as image:
    image.verify()  # a whole, valid PNG
  with Image.open(metrics["report"]) as image:
    assert image.format == "PNG" and image.size == (880, 600)
    assert image.text["Description"] == ("panels: train loss; eval metrics; primary metric "
                                         "against elapsed time; train examples/s")
    assert "seed_mlp (explicit)" in image.text["Title"]
  with open(os.path.join(config.model_dir, "history.json")) as f:
    epochs = json.load(f)["epochs"]
  assert [e["epoch"] for e in epochs] == list(range(1, 7))
  assert all(e["examples_per_sec"] > 0 and set(e["eval"]) >= {"rmse", "mae"} for e in epochs)
  assert np.all(np.diff([e["elapsed_seconds"] for e in epochs]) > 0)
  assert "time_to_target_seconds" not in metrics  # no --target_value


def test_writes_checkpoints_and_tensorboard_summaries(trained):
  config, _ = trained
  checkpoints = config.resolved_checkpoint_dir
  latest = tf.train.latest_checkpoint(checkpoints)
  assert _saved(latest, "epoch") == 6
  steps_per_epoch = artifacts.load_metadata(config.data_dir).num_train // config.batch_size
  assert _saved(latest, "step") == 6 * steps_per_epoch  # numbered by step
  assert latest.endswith(f"ckpt-{6 * steps_per_epoch}")
  assert len(tf.io.gfile.glob(os.path.join(checkpoints, "ckpt-*.index"))) == 3  # max kept
  events = tf.io.gfile.glob(os.path.join(config.resolved_log_dir, "events.*"))
  assert events
  tags = {v.tag for e in tf.compat.v1.train.summary_iterator(events[0])
          for v in e.summary.value}
  assert {"train/loss", "eval/rmse", "eval/mae", "train/examples_per_sec"} <= tags


def test_rerun_resumes_from_the_latest_checkpoint(trained, tmp_path, monkeypatch):
  config, metrics = trained
  evaluations = []
  counted = lambda evaluators: evaluations.append(1) or evaluate_all(evaluators)
  evaluate_all = train.evaluation.evaluate_all
  monkeypatch.setattr(train.evaluation, "evaluate_all", counted)
  # Copy the finished run, then ask for one more epoch: only that epoch trains.
  model_dir = str(tmp_path / "model")
  subprocess.run(["cp", "-r", config.model_dir, model_dir], check=True)
  same = dataclasses.replace(config, model_dir=model_dir, export_dir=None)
  again = train.train_and_evaluate(same)  # all epochs done: restores, evaluates, exports
  assert again["train_examples_per_sec"] is None
  assert again["eval_rmse"] == pytest.approx(metrics["eval_rmse"], rel=1e-6)
  assert len(evaluations) == 1  # the restored best model, evaluated here
  more = train.train_and_evaluate(dataclasses.replace(same, epochs=7))
  assert more["epochs"] == 7 and more["train_examples_per_sec"] > 0
  # Epoch 7 is evaluated once; the final evaluation reuses it when epoch 7 is the one served.
  assert len(evaluations) == 1 + 1 + (more["best_epoch"] != 7)
  assert _saved(tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")), "epoch") == 7
  # The history keeps the first run's epochs and adds the new one, its time after theirs.
  with open(os.path.join(model_dir, "history.json")) as f:
    epochs = json.load(f)["epochs"]
  assert [e["epoch"] for e in epochs] == list(range(1, 8))
  assert epochs[-1]["elapsed_seconds"] > epochs[-2]["elapsed_seconds"]
  assert epochs[-1]["eval"]["rmse"] == pytest.approx(more["eval_rmse"], rel=1e-6)


_SERVE = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    assert "trainer" not in sys.modules
    loaded = tf.saved_model.load(sys.argv[1])
    args = json.loads(sys.stdin.read())
    out = loaded.signatures["serving_default"](user=tf.constant(args["users"]),
                                               item=tf.constant(args["items"]))
    rec = loaded.signatures["recommend"](user=tf.constant(["u3", "nobody"]), k=tf.constant(10))
    print(json.dumps({
        "rating": out["rating"].numpy().tolist(),
        "user_known": out["user_known"].numpy().tolist(),
        "item_known": out["item_known"].numpy().tolist(),
        "rec_items": [[i.decode() for i in row] for row in rec["items"].numpy()],
        "rec_scores": rec["scores"].numpy().tolist(),
        "rec_known": rec["user_known"].numpy().tolist()}))
""")


def test_export_serves_the_trained_model_in_a_fresh_process(trained, tiny_data_dir):
  config, _ = trained
  metadata = artifacts.load_metadata(tiny_data_dir)
  users = open(os.path.join(tiny_data_dir, schema.USER_VOCAB_FILE)).read().split()
  items = open(os.path.join(tiny_data_dir, schema.ITEM_VOCAB_FILE)).read().split()
  data = _eval_examples(tiny_data_dir)
  raw_users = [users[u] for u in data[schema.USER][:50]] + ["nobody"]
  raw_items = [items[i] for i in data[schema.ITEM][:50]] + [items[0]]
  result = subprocess.run([sys.executable, "-c", _SERVE, config.resolved_export_dir],
                          input=json.dumps({"users": raw_users, "items": raw_items}),
                          capture_output=True, text=True, check=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  served = json.loads(result.stdout.strip().splitlines()[-1])

  model = _restore(config, metadata)
  expected = np.clip(np.asarray(model({schema.USER: data[schema.USER][:50],
                                       schema.ITEM: data[schema.ITEM][:50]})),
                     metadata.rating_min, metadata.rating_max)
  np.testing.assert_allclose(served["rating"][:50], expected, rtol=1e-5)
  assert served["user_known"] == [True] * 50 + [False]
  assert served["item_known"] == [True] * 51

  # recommend: k distinct known items, best first, equal to ranking every item in numpy.
  top = served["rec_items"][0]
  assert len(top) == 10 and len(set(top)) == 10 and set(top) <= set(items)
  assert served["rec_scores"][0] == sorted(served["rec_scores"][0], reverse=True)
  user = users.index("u3")
  all_scores = np.array(model({schema.USER: np.full(len(items), user),
                               schema.ITEM: np.arange(len(items))}))
  seen = artifacts.load_npz(os.path.join(tiny_data_dir, schema.TRAIN_POSITIVES_FILE))
  all_scores[seen["indices"][seen["indptr"][user]:seen["indptr"][user + 1]]] = -np.inf
  assert top == [items[i] for i in np.argsort(-all_scores, kind="stable")[:10]]
  assert served["rec_known"] == [True, False]


def test_batch_larger_than_the_data_fails_before_training(tiny_data_dir, tmp_path):
  config = TrainConfig(data_dir=tiny_data_dir, model_dir=str(tmp_path), batch_size=10**6)
  num_train = artifacts.load_metadata(tiny_data_dir).num_train
  with pytest.raises(ConfigError, match=rf"--batch_size=1000000 is larger than the {num_train} "):
    train.train_and_evaluate(config)
  assert not os.listdir(tmp_path)


def test_unprepared_data_dir_fails_naming_the_flag(tmp_path):
  config = TrainConfig(data_dir=str(tmp_path / "none"), model_dir=str(tmp_path / "m"))
  with pytest.raises(ConfigError, match=r"--data_dir='.*none' is not a prepared data directory"):
    train.train_and_evaluate(config)


def test_a_model_dir_of_another_configuration_is_refused_unless_overwritten(trained, tmp_path):
  config, _ = trained
  model_dir = str(tmp_path / "model")
  subprocess.run(["cp", "-r", config.model_dir, model_dir], check=True)
  other = dataclasses.replace(config, model_dir=model_dir, export_dir=None, embedding_dim=8,
                              epochs=1)
  with pytest.raises(ConfigError, match=r"holds checkpoints of a different run \("
                     r"embedding_dim=16 there, 8 now\): use another --model_dir, or "
                     r"--overwrite"):
    train.train_and_evaluate(other)
  result = train.train_and_evaluate(dataclasses.replace(other, overwrite=True))
  assert result["epochs"] == 1  # started afresh, not from epoch 6
  assert _saved(tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")), "epoch") == 1


def test_failures_are_classified_by_type_and_state_not_by_message(tmp_path):
  config = TrainConfig(data_dir=str(tmp_path), model_dir=str(tmp_path / "m"))
  unavailable = tf.errors.UnavailableError(None, None, "reading gs://bucket/x failed")
  # A local run with local paths: nothing to blame but the error itself, whatever it says.
  with pytest.raises(tf.errors.UnavailableError):
    with train._failures_classified(config, tf.distribute.get_strategy()):
      raise unavailable
  cluster = TaskStrategy("worker", 0, {"worker": ["a:1", "b:1"]})
  with pytest.raises(LostPeerError, match="lost contact with another task of the cluster "
                     r"\(UnavailableError: reading gs://bucket/x failed\)"):
    with train._failures_classified(config, cluster):
      raise unavailable
  assert LostPeerError("x").exit_code == 131
  with pytest.raises(tf.errors.InvalidArgumentError):  # not a collective's failure: a bug
    with train._failures_classified(config, cluster):
      raise tf.errors.InvalidArgumentError(None, None, "bad shape")
