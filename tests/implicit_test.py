"""Implicit feedback end to end in-process: every model beats popularity; options work."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_cli
from trainer import run_dir, schema, train
from trainer.config import ConfigError, PrepareConfig, TrainConfig
from trainer.data import artifacts, preparation

pytestmark = pytest.mark.slow  # a few seconds of training each


@pytest.fixture(scope="module")
def implicit_data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("implicit"))
  preparation.prepare(PrepareConfig(output_dir=out, num_users=300, num_items=200,
                                    num_ratings=12000, implicit=True, split="leave_one_out",
                                    eval_negatives=50, num_shards=2, seed=0))
  return out


def _popularity(data_dir, k=10, protocol="sampled"):
  """HR@k of ranking by training popularity, ties against it: among the sampled negatives,
  or (full) among every item but the user's training items."""
  positives = artifacts.load_npz(os.path.join(data_dir, schema.TRAIN_POSITIVES_FILE))
  sampled = artifacts.load_npz(os.path.join(data_dir, schema.EVAL_NEGATIVES_FILE))
  num_items = artifacts.PreparedData(data_dir).metadata.num_items
  counts = np.bincount(positives["indices"], minlength=num_items)
  held_out = counts[sampled["positives"]]
  if protocol == "sampled":
    return float(np.mean((counts[sampled["negatives"]] >= held_out[:, None]).sum(1) < k))
  hits = []
  for user, item in zip(sampled["users"], sampled["positives"]):
    competitors = np.ones(num_items, bool)
    start, end = positives["indptr"][user], positives["indptr"][user + 1]
    competitors[positives["indices"][start:end]] = False
    competitors[item] = False
    hits.append((counts[competitors] >= counts[item]).sum() < k)
  return float(np.mean(hits))


def _config(data_dir, model_dir, **changes):
  base = TrainConfig(data_dir=data_dir, model_dir=model_dir, task="implicit", epochs=8,
                     batch_size=1000, learning_rate=0.01, embedding_dim=16,
                     mlp_embedding_dim=16, layers=(32, 16), optimizer="lazy_adam",
                     num_negatives=4, log_every_steps=50, seed=1)
  return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("name,task", [("gmf", "implicit"), ("mlp", "implicit"),
                                       ("neumf", "implicit"), ("mf", "implicit"),
                                       ("mf", "implicit_bpr"), ("gmf", "implicit_bpr"),
                                       ("mf", "implicit_softmax"), ("gmf", "implicit_softmax"),
                                       ("autorec", "implicit"),
                                       ("autorec", "implicit_softmax"),
                                       ("mf_history", "implicit_softmax"),
                                       ("mf_history", "implicit")])
def test_every_model_beats_popularity(implicit_data, tmp_path, mirrored_strategy, name, task):
  history = dict(model="mf", history=5) if name == "mf_history" else dict(model=name)
  result = train.train_and_evaluate(_config(implicit_data, str(tmp_path), task=task,
                                            **history), mirrored_strategy)
  popularity = _popularity(implicit_data)
  assert result["eval_hr_sampled"] > popularity, (result, popularity)
  assert result["eval_count_sampled"] == 300 and result["eval_count_full"] == 300
  assert 0 < result["eval_hr_full"] < result["eval_hr_sampled"]  # 199 competitors, not 50
  assert result["primary_metric"] == "hr_sampled" and result["top_k"] == 10
  # The popularity baseline in metrics.json, worked out independently here.
  assert result["eval_hr_sampled_popularity_baseline"] == pytest.approx(popularity)
  assert result["eval_hr_full_popularity_baseline"] == pytest.approx(
      _popularity(implicit_data, protocol="full"))
  assert result["eval_hr_full"] > result["eval_hr_full_popularity_baseline"]
  # Krichene-Rendle: the sampled HR corrected toward the full one (1 of 200 items, 50 drawn).
  assert abs(result["eval_hr_corrected_sampled"] - result["eval_hr_full"]) < abs(
      result["eval_hr_sampled"] - result["eval_hr_full"]), result


def test_same_seed_same_metrics_and_weights(implicit_data, tmp_path):
  config = _config(implicit_data, str(tmp_path / "a"), model="neumf", epochs=2,
                   deterministic=True, dropout=0.1)
  a = train.train_and_evaluate(config)
  b = train.train_and_evaluate(dataclasses.replace(config, model_dir=str(tmp_path / "b")))
  assert a["weights_sha256"] == b["weights_sha256"]
  assert a["eval_hr_full"] == b["eval_hr_full"] and a["eval_ndcg_sampled"] == b[
      "eval_ndcg_sampled"]


def test_neumf_pretrained_from_gmf_and_mlp_runs(implicit_data, tmp_path):
  gmf = train.train_and_evaluate(_config(implicit_data, str(tmp_path / "gmf"), model="gmf"))
  mlp = train.train_and_evaluate(_config(implicit_data, str(tmp_path / "mlp"), model="mlp"))
  # One epoch at a tiny learning rate: what NeuMF knows comes from its pretrained parts (from
  # scratch it would rank near chance, HR@10 of 50 negatives ~ 0.2).
  pretrained = _config(implicit_data, str(tmp_path / "neumf"), model="neumf", epochs=1,
                       learning_rate=1e-5, optimizer="adam",
                       pretrained_gmf_dir=str(tmp_path / "gmf"),
                       pretrained_mlp_dir=str(tmp_path / "mlp"))
  result = train.train_and_evaluate(pretrained)
  floor = min(gmf["eval_hr_sampled"], mlp["eval_hr_sampled"]) - 0.05
  assert result["eval_hr_sampled"] > max(floor, 0.3), (result, gmf, mlp)
  with pytest.raises(ConfigError, match="must hold a gmf run"):
    train.train_and_evaluate(dataclasses.replace(
        pretrained, model_dir=str(tmp_path / "bad"), pretrained_gmf_dir=str(tmp_path / "mlp")))


def test_early_stopping_at_a_target_and_the_best_checkpoint_is_exported(implicit_data,
                                                                        tmp_path):
  result = train.train_and_evaluate(_config(
      implicit_data, str(tmp_path), model="mf", epochs=20, target_metric="hr_full",
      target_value=0.05))
  assert result["epochs"] < 20 and "reached --target_value=0.05" in result["stopped_early"]
  best = tf.train.latest_checkpoint(str(tmp_path / "checkpoints" / "best"))
  assert best is not None and result["best_epoch"] == int(best.rsplit("-", 1)[1])
  with open(tmp_path / "metrics.json") as f:
    assert json.load(f)["stopped_early"] == result["stopped_early"]
  # Time to target: the epoch that reached it (the last one) and the time up to its end.
  with open(tmp_path / "history.json") as f:
    epochs = json.load(f)["epochs"]
  first = next(e for e in epochs if e["eval"]["hr_full"] >= 0.05)
  assert result["target_reached_epoch"] == first["epoch"] == result["epochs"]
  assert result["time_to_target_seconds"] == first["elapsed_seconds"] > 0
  assert (result["target_metric"], result["target_value"]) == ("hr_full", 0.05)


@pytest.mark.parametrize("changes", [
    dict(mixed_precision="bfloat16"),
    dict(mixed_precision="float16", optimizer="adam"),
    dict(jit_compile=True, optimizer="adam"),
    dict(warmup_steps=5, decay="cosine", optimizer="adam", learning_rate=0.02),
])
def test_precision_xla_and_schedules_train(implicit_data, tmp_path, changes):
  result = train.train_and_evaluate(_config(implicit_data, str(tmp_path), model="gmf", epochs=3,
                                            **changes))
  assert result["eval_hr_sampled"] > _popularity(implicit_data), (changes, result)


def test_ranking_target_without_negatives_is_refused(tmp_path):
  data = str(tmp_path / "data")
  preparation.prepare(PrepareConfig(output_dir=data, num_users=50, num_items=40,
                                    num_ratings=600, implicit=True, eval_fraction=0.2))
  with pytest.raises(ConfigError, match="--target_metric=hr_sampled needs eval negatives"):
    train.train_and_evaluate(_config(data, str(tmp_path / "m"), target_metric="hr_sampled",
                                     target_value=0.5, batch_size=100))
  with pytest.raises(ConfigError, match="holds implicit feedback"):
    train.train_and_evaluate(_config(data, str(tmp_path / "m"), task="explicit", batch_size=100))


def test_early_stopping_after_epochs_without_improvement(implicit_data, tmp_path):
  # A learning rate this small cannot move HR: every epoch after the first is no better.
  result = train.train_and_evaluate(_config(
      implicit_data, str(tmp_path), model="gmf", epochs=10, learning_rate=1e-9,
      optimizer="sgd", early_stopping_patience=2))
  assert result["stopped_early"] == "no improvement of hr_sampled for 2 epoch(s)"
  assert result["epochs"] == 3 and result["best_epoch"] == 1


def test_a_user_history_needs_data_prepared_with_its_time_order(implicit_data, tmp_path):
  """Data prepared before `time_rank` existed: --history is refused before training, naming
  the flag and the directory; the data is left as it was."""
  old = str(tmp_path / "old")
  tf.io.gfile.makedirs(old)
  for name in tf.io.gfile.listdir(implicit_data):
    tf.io.gfile.copy(os.path.join(implicit_data, name), os.path.join(old, name))
  positives = artifacts.load_npz(os.path.join(old, schema.TRAIN_POSITIVES_FILE))
  np.savez(os.path.join(old, schema.TRAIN_POSITIVES_FILE),
           **{k: v for k, v in positives.items() if k != "time_rank"})
  before = open(os.path.join(old, schema.TRAIN_POSITIVES_FILE), "rb").read()
  with pytest.raises(ConfigError, match=r"--history=5 needs the training interactions' time "
                     r"order, which --data_dir='.*old' lacks"):
    train.train_and_evaluate(_config(old, str(tmp_path / "model"), model="mf", history=5,
                                     task="implicit_softmax"))
  assert open(os.path.join(old, schema.TRAIN_POSITIVES_FILE), "rb").read() == before
  assert not os.path.exists(tmp_path / "model" / "checkpoints")


_RECOMMEND = """
import json, sys
import tensorflow as tf
assert "trainer" not in sys.modules
loaded = tf.saved_model.load(sys.argv[1])
users, recent = json.loads(sys.argv[2]), json.loads(sys.argv[3])
rec = loaded.signatures["recommend"](user=tf.constant(users), k=tf.constant(10))
now = loaded.signatures["recommend_recent"](user=tf.constant(users), recent=tf.constant(recent),
                                            k=tf.constant(10))
print(json.dumps([[[i.decode() for i in row] for row in out["items"].numpy()]
                  for out in (rec, now)]))
"""


def test_the_export_recommends_from_the_whole_user_history_in_a_fresh_process(implicit_data,
                                                                               tmp_path):
  """mf with --history: the SavedModel carries the histories; `recommend` in a process without
  this package ranks as the restored model's `score_all` (each user's latest items) does,
  training items left out; `recommend_recent` ranks from the recent items given instead (the
  user's own latest training items: as `recommend`; others: as the model with those, which
  are then left out too; unknown and "" ignored)."""
  config = _config(implicit_data, str(tmp_path), model="mf", history=5, epochs=3,
                   task="implicit_softmax")
  train.train_and_evaluate(config)
  users = open(os.path.join(implicit_data, schema.USER_VOCAB_FILE)).read().split()
  items = open(os.path.join(implicit_data, schema.ITEM_VOCAB_FILE)).read().split()
  asked = [0, 7, 150]
  data = artifacts.PreparedData(implicit_data)
  model = run_dir.load_trained_model(config.model_dir, data,
                                   os.path.join(config.resolved_checkpoint_dir, "best"))
  assert model.history == 5 and model.history_table.count == data.metadata.num_train
  own = model.history_table(tf.constant([0])).numpy()[0]  # user 0's latest, latest first
  recent = [[items[i] for i in own] + ["", ""], [items[3], "nope", items[8], "", "", "", ""],
            [""] * 7]
  result = subprocess.run([sys.executable, "-c", _RECOMMEND, config.resolved_export_dir,
                           json.dumps([users[u] for u in asked]), json.dumps(recent)],
                          capture_output=True, text=True, check=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  served, served_recent = json.loads(result.stdout.strip().splitlines()[-1])
  n = data.metadata.num_items
  latest = tf.constant([own, [3, 8, n, n, n], [n] * 5], tf.int64)
  seen = data.train_positives
  for scores, expected_rows, left_out in (
      (model.score_all(tf.constant(asked, tf.int64)).numpy(), served, [[], [], []]),
      (model.score_all(tf.constant(asked, tf.int64), latest=latest).numpy(), served_recent,
       [own, [3, 8], []])):
    for row, user in enumerate(asked):
      scores[row, seen["indices"][seen["indptr"][user]:seen["indptr"][user + 1]]] = -np.inf
      scores[row, left_out[row]] = -np.inf
      assert expected_rows[row] == [items[i] for i in np.argsort(-scores[row],
                                                                 kind="stable")[:10]]
  assert served_recent[0] == served[0]
  assert served_recent[1] != served[1]
  printed = run_cli("trainer.recommend", f"--export_dir={config.resolved_export_dir}",
                    f"--user={users[7]}", f"--recent={items[3]},nope,{items[8]}",
                    "--k=10").stdout.strip().splitlines()
  assert [line.split()[1] for line in printed[1:]] == served_recent[1]
