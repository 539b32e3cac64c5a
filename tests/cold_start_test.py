"""Side features end to end: a feature alone decides the rating; items never trained on (the
cold-item split) are scored from it; the export serves them; resume and two replicas hold."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from trainer import train
from trainer.config import PrepareConfig, TrainConfig
from trainer.data import artifacts, preparation

pytestmark = pytest.mark.slow  # seconds of training each

NUM_USERS, NUM_ITEMS = 60, 80


def _kind(item: int) -> str:
  return "good" if item % 2 == 0 else "bad"


@pytest.fixture(scope="module")
def cold_data(tmp_path_factory):
  """Every user rates good items 5 and bad items 1: the item's kind alone decides the rating.
  A quarter of the items (with all their ratings) is held out: their IDs never train."""
  root = tmp_path_factory.mktemp("cold")
  rng = np.random.default_rng(0)
  rows = ["user,item,rating"]
  for u in range(NUM_USERS):
    for i in rng.choice(NUM_ITEMS, 30, replace=False):
      rows.append(f"u{u},i{i},{5 if _kind(i) == 'good' else 1}")
  (root / "log.csv").write_text("\n".join(rows) + "\n")
  (root / "items.csv").write_text("id,kind\n" + "".join(f"i{i},{_kind(i)}\n"
                                                         for i in range(NUM_ITEMS)))
  out = str(root / "data")
  preparation.prepare(PrepareConfig(
      output_dir=out, source="csv", input=(str(root / "log.csv"),), user_column="user",
      item_column="item", rating_column="rating", item_features=str(root / "items.csv"),
      item_id_column="id", item_feature_columns="kind:categorical", split="cold_items",
      eval_fraction=0.25, num_shards=2, seed=3))
  return out


def _config(data_dir, model_dir, **changes):
  base = TrainConfig(data_dir=data_dir, model_dir=model_dir, model="mf", embedding_dim=8,
                     epochs=15, batch_size=120, learning_rate=0.05, l2=0.2, optimizer="adam",
                     log_every_steps=100, checkpoint_every_secs=0, seed=0)
  return dataclasses.replace(base, **changes)


def _user_mean_baseline(data_dir) -> float:
  """The item-free baseline worked out here, from the prepared shards themselves."""
  data = artifacts.PreparedData(data_dir)
  from trainer.data import pipeline
  read = lambda pattern: {k: np.concatenate([b[k].numpy() for b in pipeline.make_dataset(  # noqa
      pattern, 10_000, False)]) for k in ("user", "rating")}
  train_rows, eval_rows = read(data.train_pattern), read(data.eval_pattern)
  sums = np.bincount(train_rows["user"], train_rows["rating"], NUM_USERS + 1)
  counts = np.bincount(train_rows["user"], minlength=NUM_USERS + 1)
  means = np.where(counts > 0, sums / np.maximum(counts, 1), data.metadata.train_rating_mean)
  return float(np.sqrt(np.mean((means[eval_rows["user"]] - eval_rows["rating"]) ** 2)))


def test_the_split_holds_out_whole_items(cold_data):
  data = artifacts.PreparedData(cold_data)
  assert data.metadata.split == "cold_items"
  assert data.metadata.eval_items_unseen_in_train > 0
  train_items = set(np.unique(data.train_positives["indices"]).tolist())
  from trainer.data import pipeline
  eval_items = {int(i) for b in pipeline.make_dataset(data.eval_pattern, 10_000, False)
                for i in b["item"].numpy()}
  assert eval_items and not eval_items & train_items
  assert len(eval_items) == data.metadata.eval_items_unseen_in_train


@pytest.fixture(scope="module", params=["mf", "autorec"])
def feature_run(cold_data, tmp_path_factory, request):
  """mf, and autorec (whose cold item has no interactions to encode: its features alone)."""
  config = _config(cold_data, str(tmp_path_factory.mktemp("features")), model=request.param,
                   dropout=0.2 if request.param == "autorec" else 0.0)
  return config, train.train_and_evaluate(config)


def test_features_score_cold_items_that_ids_cannot(cold_data, feature_run, tmp_path):
  config, with_features = feature_run
  ids_only = train.train_and_evaluate(_config(cold_data, str(tmp_path), model=config.model,
                                              features="none"))
  baseline = _user_mean_baseline(cold_data)
  assert with_features["eval_rmse_user_mean_baseline"] == pytest.approx(baseline, rel=1e-9)
  assert baseline > 1.5  # users rate both kinds: their mean says nothing of a new item
  assert with_features["eval_rmse"] < 0.3, with_features  # the kind decides: 5 or 1
  assert ids_only["eval_rmse"] > 1.5, ids_only  # an untrained ID row: no better than a mean


_SERVE = """
import json, sys
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
assert set(loaded.signatures) == {"serving_default", "recommend", "score_features",
                                  "recommend_features"}, list(loaded.signatures)
score = loaded.signatures["score_features"](user=tf.constant(["u1", "u1", "u1", "nobody"]),
                                            item_kind=tf.constant(["good", "bad", "", "good"]))
top = loaded.signatures["recommend_features"](user=tf.constant(["u2"]), k=tf.constant(2),
                                              item_kind=tf.constant(["bad", "good", "bad"]))
known = loaded.signatures["serving_default"](user=tf.constant(["u1"]), item=tf.constant(["i2"]))
print(json.dumps({"ratings": score["rating"].numpy().tolist(),
                  "user_known": score["user_known"].numpy().tolist(),
                  "top": top["indices"].numpy().tolist(), "known": float(known["rating"][0])}))
"""


def test_the_export_scores_new_items_from_their_features(feature_run):
  config, _ = feature_run
  result = subprocess.run([sys.executable, "-c", _SERVE, config.resolved_export_dir],
                          capture_output=True, text=True, check=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  served = json.loads(result.stdout.strip().splitlines()[-1])
  good, bad, unknown_kind, stranger = served["ratings"]
  assert good > 4.5 and bad < 1.5, served  # a new item with a kind gets a sensible rating
  assert bad < unknown_kind < good  # no kind: in between
  assert served["user_known"] == [True, True, True, False]
  assert stranger > 3.0  # an unknown user still goes by the item's kind
  assert served["top"][0][0] == 1  # the good one of the catalogue comes first
  assert served["known"] > 4.5  # i2 is good, through its ID and its features


def test_resume_with_features_ends_as_an_uninterrupted_run(cold_data, tmp_path):
  straight = train.train_and_evaluate(_config(cold_data, str(tmp_path / "a"), epochs=3,
                                              deterministic=True))
  resumed_dir = str(tmp_path / "b")
  train.train_and_evaluate(_config(cold_data, resumed_dir, epochs=1, deterministic=True))
  resumed = train.train_and_evaluate(_config(cold_data, resumed_dir, epochs=3,
                                             deterministic=True))
  assert resumed["weights_sha256"] == straight["weights_sha256"]
  assert resumed["eval_rmse"] == straight["eval_rmse"]


@pytest.mark.parametrize("model", ["mf", "autorec"])
def test_two_replicas_with_features_match_one_device(cold_data, mirrored_strategy, tmp_path,
                                                      model):
  """The feature tables (and autorec's interaction table) are mirrored and the embeddings get
  the same summed gradients."""
  config = _config(cold_data, str(tmp_path / "one"), epochs=2, optimizer="lazy_adam",
                   model=model)
  one = train.train_and_evaluate(config, tf.distribute.OneDeviceStrategy("/cpu:0"))
  two = train.train_and_evaluate(dataclasses.replace(config, model_dir=str(tmp_path / "two")),
                                 mirrored_strategy)
  assert two["replicas"] == 2
  assert two["eval_rmse"] == pytest.approx(one["eval_rmse"], rel=1e-4)


@pytest.fixture(scope="module")
def implicit_cold_data(tmp_path_factory):
  """Implicit feedback: each user has 28 of the 40 good items and 2 of the 40 bad ones; a
  quarter of the items (with all their interactions) is held out."""
  root = tmp_path_factory.mktemp("implicit_cold")
  rng = np.random.default_rng(1)
  good = [i for i in range(NUM_ITEMS) if _kind(i) == "good"]
  bad = [i for i in range(NUM_ITEMS) if _kind(i) == "bad"]
  rows = ["user,item"] + [f"u{u},i{i}" for u in range(NUM_USERS)
                          for i in [*rng.choice(good, 28, replace=False),
                                    *rng.choice(bad, 2, replace=False)]]
  (root / "log.csv").write_text("\n".join(rows) + "\n")
  (root / "items.csv").write_text("id,kind\n" + "".join(f"i{i},{_kind(i)}\n"
                                                         for i in range(NUM_ITEMS)))
  out = str(root / "data")
  preparation.prepare(PrepareConfig(
      output_dir=out, source="csv", input=(str(root / "log.csv"),), user_column="user",
      item_column="item", item_features=str(root / "items.csv"), item_id_column="id",
      item_feature_columns="kind:categorical", split="cold_items", eval_fraction=0.25,
      num_shards=2, seed=3))
  return out


def test_implicit_cold_items_rank_by_features_above_popularity(implicit_cold_data, tmp_path):
  """Popularity ranks a never-seen item last. A held-out good item comes after the ~9 good
  items the user has not seen but others trained, so HR@20 asks whether it beats the other
  held-out items (good and bad) and the bad ones: by its kind, it does; by an untrained ID
  row, no better than chance among the held-out ones. The L2 penalty on ID rows leaves to
  the shared feature what all good items have in common."""
  config = _config(implicit_cold_data, str(tmp_path / "f"), task="implicit", num_negatives=4,
                   batch_size=100, l2=0.1, learning_rate=0.02, epochs=20, top_k=20)
  with_features = train.train_and_evaluate(config)
  ids_only = train.train_and_evaluate(dataclasses.replace(
      config, model_dir=str(tmp_path / "ids"), features="none"))
  assert with_features["eval_hr_full_popularity_baseline"] == 0.0  # cold items come last
  assert with_features["eval_hr_full"] > 0.8, with_features
  assert with_features["eval_hr_full"] > ids_only["eval_hr_full"] + 0.2, (with_features,
                                                                          ids_only)


@pytest.fixture(scope="module")
def cold_user_run(tmp_path_factory):
  """Young users rate good items 5 and bad ones 1, old users the other way round: a user's
  group and the item decide the rating. Trained on every user; serving meets new ones."""
  root = tmp_path_factory.mktemp("cold_users")
  rng = np.random.default_rng(2)
  group = lambda u: "young" if u % 2 == 0 else "old"  # noqa: E731
  rows = ["user,item,rating"]
  for u in range(NUM_USERS):
    for i in rng.choice(NUM_ITEMS, 30, replace=False):
      rows.append(f"u{u},i{i},{5 if (_kind(i) == 'good') == (group(u) == 'young') else 1}")
  (root / "log.csv").write_text("\n".join(rows) + "\n")
  (root / "users.csv").write_text("id,group\n" + "".join(f"u{u},{group(u)}\n"
                                                          for u in range(NUM_USERS)))
  data_dir = str(root / "data")
  preparation.prepare(PrepareConfig(
      output_dir=data_dir, source="csv", input=(str(root / "log.csv"),), user_column="user",
      item_column="item", rating_column="rating", user_features=str(root / "users.csv"),
      user_id_column="id", user_feature_columns="group:categorical", eval_fraction=0.1,
      num_shards=2, seed=3))
  config = _config(data_dir, str(root / "model"), epochs=20)
  return config, train.train_and_evaluate(config)


_SERVE_NEW_USERS = """
import json, sys
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
assert {"score_user_features", "recommend_user_features"} <= set(loaded.signatures)
assert "score_features" not in loaded.signatures  # no item features were prepared
score = loaded.signatures["score_user_features"](
    item=tf.constant(["i0", "i1", "i0", "i1", "nothing"]),
    user_group=tf.constant(["young", "young", "old", "old", "young"]))
top = loaded.signatures["recommend_user_features"](k=tf.constant(5),
                                                   user_group=tf.constant(["young", "old"]))
print(json.dumps({"ratings": score["rating"].numpy().tolist(),
                  "item_known": score["item_known"].numpy().tolist(),
                  "top": top["items"].numpy().astype(str).tolist()}))
"""


def test_the_export_serves_new_users_by_their_profile(cold_user_run):
  config, result = cold_user_run
  assert result["eval_rmse"] < result["eval_rmse_user_mean_baseline"] / 2, result
  served = json.loads(subprocess.run(
      [sys.executable, "-c", _SERVE_NEW_USERS, config.resolved_export_dir],
      capture_output=True, text=True, check=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")).stdout.strip().splitlines()[-1])
  young_good, young_bad, old_good, old_bad, _ = served["ratings"]  # i0 is good, i1 bad
  assert young_good > 4 and young_bad < 2 and old_good < 2 and old_bad > 4, served
  assert served["item_known"] == [True, True, True, True, False]
  young, old = served["top"]
  assert all(_kind(int(i[1:])) == "good" for i in young), served
  assert all(_kind(int(i[1:])) == "bad" for i in old), served


_BAD_REQUESTS = """
import json, sys
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
out = {}
def attempt(name, call):
  try:
    result = call()
    out[name] = {k: v.numpy().tolist() for k, v in result.items() if k != "items"}
    if "items" in result:
      out[name]["items"] = [[i.decode() for i in row] for row in result["items"].numpy()]
  except tf.errors.InvalidArgumentError as e:
    out[name] = {"error": e.message}
recommend, score = loaded.signatures["recommend"], loaded.signatures["score_features"]
attempt("k0", lambda: recommend(user=tf.constant(["u1"]), k=tf.constant(0)))
attempt("k_negative", lambda: recommend(user=tf.constant(["u1"]), k=tf.constant(-3)))
attempt("k_huge", lambda: recommend(user=tf.constant(["u1"]), k=tf.constant(2**31 - 1)))
attempt("odd_ids", lambda: recommend(user=tf.constant(["", "u" * 100000, "u1"]),
                                     k=tf.constant(3)))
attempt("score_mismatch", lambda: score(user=tf.constant(["u1", "u2"]),
                                        item_kind=tf.constant(["good"])))
attempt("serve_mismatch", lambda: loaded.signatures["serving_default"](
    user=tf.constant(["u1", "u2", "u3"]), item=tf.constant(["i1"])))
attempt("features_k0", lambda: loaded.signatures["recommend_features"](
    user=tf.constant(["u1"]), k=tf.constant(0), item_kind=tf.constant(["good"])))
print(json.dumps(out))
"""


def test_bad_requests_get_a_documented_result_or_a_clear_error(cold_data, feature_run):
  config, _ = feature_run
  if config.model != "mf":
    pytest.skip("the signatures are the same for every model: mf's export shows them")
  result = subprocess.run([sys.executable, "-c", _BAD_REQUESTS, config.resolved_export_dir],
                          capture_output=True, text=True, check=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert "recommend: k must be positive" in out["k0"]["error"]
  assert "recommend: k must be positive" in out["k_negative"]["error"]
  assert "recommend_features: k must be positive" in out["features_k0"]["error"]
  num_items = artifacts.load_metadata(cold_data).num_items
  # k above the catalogue: every item, the user's training items last (score -inf).
  assert len(out["k_huge"]["items"][0]) == num_items == len(set(out["k_huge"]["items"][0]))
  # The empty ID and a 100,000-character one are unknown users, served from the OOV row.
  assert out["odd_ids"]["user_known"] == [False, False, True]
  assert out["odd_ids"]["scores"][0] == out["odd_ids"]["scores"][1]
  assert ("score_features: item_kind and user must have the same length"
          in out["score_mismatch"]["error"])
  assert ("serving_default: item and user must have the same length"
          in out["serve_mismatch"]["error"])
