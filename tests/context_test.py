"""Context (per-interaction features) and given train/eval files, from preparation to serving."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_cli
from trainer import run_dir, schema, train
from trainer.config import ConfigError, PrepareConfig, TrainConfig
from trainer.data import artifacts, context, pipeline, preparation

DAY = 86_400
T0 = 1_704_069_000  # 2024-01-01 00:30 UTC, a Monday


def _write(path, rows, header="user,item,rating,ts"):
  path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
  return str(path)


def _given(tmp_path, train_rows, eval_rows, **extra):
  out = str(tmp_path / "data")
  preparation.prepare(PrepareConfig(
      output_dir=out, source="csv", input=(_write(tmp_path / "train.csv", train_rows),),
      eval_input=(_write(tmp_path / "eval.csv", eval_rows),), split="given",
      user_column="user", item_column="item", rating_column="rating", timestamp_column="ts",
      num_shards=1, **extra))
  return out


def _examples(data_dir, split, selection="all"):
  """Every example of a split, with its context, as {(raw user, raw item): {key: value}}."""
  data = artifacts.PreparedData(data_dir)
  users, items = data.vocabularies()
  users, items = users + ["<oov>"], items + ["<oov>"]
  pattern = data.train_pattern if split == schema.TRAIN else data.eval_pattern
  out = {}
  for batch in pipeline.make_dataset(pattern, 1000, False, context=data.context_keys(selection)):
    batch = {k: v.numpy() for k, v in batch.items()}
    for n in range(len(batch[schema.USER])):
      out[(users[batch[schema.USER][n]], items[batch[schema.ITEM][n]])] = {
          k: v[n] for k, v in batch.items()}
  return out


TRAIN_ROWS = [("a", "x", 4, T0), ("a", "y", 3, T0 + 3 * DAY + 5 * 3600),
              ("b", "x", 5, T0 + 10 * DAY)]
EVAL_ROWS = [("a", "z", 2, T0 + 40 * DAY + 23 * 3600),  # an item never trained
             ("b", "y", 1, T0 + DAY),  # before b's first training row, and before y's
             ("c", "x", 3, T0 + 100 * DAY)]  # a user never trained


def test_a_given_split_counts_its_rows_and_sends_unseen_ids_to_the_oov_rows(tmp_path):
  data_dir = _given(tmp_path, TRAIN_ROWS, EVAL_ROWS)
  metadata = artifacts.load_metadata(data_dir)
  assert (metadata.split, metadata.num_train, metadata.num_eval) == ("given", 3, 3)
  assert metadata.rows_read == 6 and metadata.eval_fraction == 0.0
  data = artifacts.PreparedData(data_dir)
  assert data.vocabularies() == (["a", "b"], ["x", "y"])  # the training rows' IDs only
  assert metadata.eval_users_unseen_in_train == 1  # c
  assert metadata.eval_items_unseen_in_train == 1  # z
  assert metadata.eval_rows_out_of_vocabulary == 2
  held_out = _examples(data_dir, schema.EVAL)
  assert set(held_out) == {("a", "<oov>"), ("b", "y"), ("<oov>", "x")}
  assert set(_examples(data_dir, schema.TRAIN)) == {("a", "x"), ("a", "y"), ("b", "x")}


@pytest.mark.parametrize("changes,message", [
    (dict(split="given"), "--split=given needs --eval_input"),
    (dict(eval_input=("e.csv",)), "--eval_input='e.csv' needs --split=given"),
    (dict(split="given", eval_input=("t.csv",)), "--eval_input='t.csv' is also in --input"),
    (dict(context=("hour", "season")), "'season' is not one of hour, weekday"),
    (dict(source="synthetic", input=(), user_column=None, item_column=None,
          context_columns="device:categorical"),
     "--context_columns applies to --source=csv only"),
])
def test_bad_split_and_context_flags_are_refused_naming_them(changes, message):
  base = dict(output_dir="o", source="csv", input=("t.csv",), user_column="u", item_column="i")
  with pytest.raises(ConfigError, match=message):
    PrepareConfig(**{**base, **changes}).validate()


def test_bad_context_columns_are_refused_before_reading_the_log(tmp_path):
  log = _write(tmp_path / "log.csv", [("a", "x", 1, T0, "tv")], "user,item,rating,ts,device")
  config = dict(output_dir=str(tmp_path / "o"), source="csv", input=(log,), user_column="user",
                item_column="item", rating_column="rating", timestamp_column="ts")
  with pytest.raises(ConfigError, match="'device:bucketized:1': bucketized needs a bucket"):
    preparation.prepare(PrepareConfig(**config, context_columns="device:bucketized:1"))
  with pytest.raises(ConfigError, match="'hour' is also a derived --context feature"):
    preparation.prepare(PrepareConfig(**config, context=("hour",),
                                      context_columns="hour:categorical"))
  with pytest.raises(ValueError, match=r"log\.csv:2: .*numeric context 'device'.*'tv'"):
    preparation.prepare(PrepareConfig(**config, context_columns="device:numeric"))
  with pytest.raises(ValueError, match=r"no context \(--context_columns\) column 'devices'"):
    preparation.prepare(PrepareConfig(**config, context_columns="devices:categorical"))
  assert not os.path.exists(str(tmp_path / "o" / schema.METADATA_FILE))


def test_derived_time_features_by_hand_from_the_row_and_the_training_rows_only(tmp_path):
  data_dir = _given(tmp_path, TRAIN_ROWS, EVAL_ROWS,
                    context=("hour", "weekday", "tenure", "item_age"))
  # index = 1 + hour, 1 + weekday (Monday 0); tenure and age: 0 missing, else 1 + the bucket
  # of the days at DAY_EDGES (1, 7, 30, 90, 365, 1095).
  expected = {
      ("a", "x"): (0, 0, 0.0, 0.0), ("a", "y"): (5, 3, 3.2, 0.0), ("b", "x"): (0, 3, 0.0, 10.0),
      ("a", "<oov>"): (23, 5, 40 + 23 / 24, None),  # z: no training row, no age
      ("b", "y"): (0, 1, None, None),  # earlier than b's and y's first training rows
      ("<oov>", "x"): (0, 2, None, 100.0)}  # c: no training row, no tenure
  buckets = lambda days: 0 if days is None else 1 + int(np.searchsorted(  # noqa: E731
      context.DAY_EDGES, days, side="right"))
  examples = {**_examples(data_dir, schema.TRAIN), **_examples(data_dir, schema.EVAL)}
  assert set(examples) == set(expected)
  for pair, (hour, weekday, tenure, age) in expected.items():
    got = examples[pair]
    assert (got["context_hour"], got["context_weekday"], got["context_tenure"],
            got["context_item_age"]) == (hour + 1, weekday + 1, buckets(tenure),
                                         buckets(age)), pair
  metadata = artifacts.load_metadata(data_dir)
  assert metadata.schema_version == schema.SCHEMA_VERSION == 3
  infos = {i.name: i for i in artifacts.PreparedData(data_dir).context_infos()}
  assert [(i.side, i.kind, i.vocab_size) for i in infos.values()] == [
      ("context", "bucketized", 25), ("context", "bucketized", 8),
      ("context", "bucketized", 8), ("context", "bucketized", 8)]


def test_declared_columns_are_encoded_from_the_training_rows(tmp_path):
  header = "user,item,rating,ts,device,price,tags"
  train_rows = [("a", "x", 4, T0, "tv", 10, "new|hd"), ("a", "y", 3, T0, "tv", 30, "hd"),
                ("b", "x", 5, T0, "phone", "", ""), ("b", "y", 5, T0, "", 20, "hd|new|hd")]
  eval_rows = [("a", "w", 2, T0, "watch", 50, "old|new|3d|hd"), ("b", "w", 2, T0, "phone", "",
                                                                  "old")]
  out = str(tmp_path / "data")
  preparation.prepare(PrepareConfig(
      output_dir=out, source="csv", input=(_write(tmp_path / "t.csv", train_rows, header),),
      eval_input=(_write(tmp_path / "e.csv", eval_rows, header),), split="given",
      user_column="user", item_column="item", rating_column="rating", timestamp_column="ts",
      context_columns="device:categorical,price:numeric,tags:multi_hot:|", num_shards=1))
  data = artifacts.PreparedData(out)
  assert data.feature_vocabulary("context", "device") == ["tv", "phone"]  # watch: eval only
  assert data.feature_vocabulary("context", "tags") == ["hd", "new"]  # by rows, then value
  entry = {e["name"]: e for e in data.metadata.features}["price"]
  assert (entry["mean"], entry["missing"]) == (20.0, 0)
  examples = {**_examples(out, schema.TRAIN), **_examples(out, schema.EVAL)}
  assert examples[("a", "x")]["context_device"] == 1
  assert examples[("b", "x")]["context_device"] == 2
  assert examples[("b", "y")]["context_device"] == 0  # missing
  assert examples[("a", "<oov>")]["context_device"] == 0  # a value no training row has
  std = np.std([10.0, 30.0, 20.0])
  assert examples[("a", "y")]["context_price"] == pytest.approx(10.0 / std)
  assert examples[("b", "x")]["context_price"] == 0.0  # missing: the mean
  # Multi-hot: the longest list's width (4, an eval row's), values sorted, 0-padded.
  assert examples[("a", "x")]["context_tags"].tolist() == [1, 2, 0, 0]
  assert examples[("b", "y")]["context_tags"].tolist() == [1, 2, 0, 0]
  assert examples[("b", "x")]["context_tags"].tolist() == [0, 0, 0, 0]
  assert examples[("a", "<oov>")]["context_tags"].tolist() == [1, 2, 0, 0]  # old, 3d unknown
  entry = {e["name"]: e for e in data.metadata.features}["tags"]
  assert (entry["kind"], entry["width"], entry["vocab_size"], entry["missing"]) == (
      "multi_hot", 4, 3, 1)


def test_sampled_negatives_carry_their_positives_context():
  add = pipeline.negative_sampler(50, 3, seed=1)
  batch = {schema.USER: tf.constant([1, 2], tf.int64), schema.ITEM: tf.constant([3, 4], tf.int64),
           schema.RATING: tf.constant([1.0, 1.0]),
           "context_hour": tf.constant([7, 9], tf.int64),
           "context_price": tf.constant([0.5, -1.0])}
  out = add(tf.constant(0, tf.int64), batch)
  assert out[schema.LABEL].numpy().tolist() == [1, 0, 0, 0, 1, 0, 0, 0]
  assert out["context_hour"].numpy().tolist() == [7] * 4 + [9] * 4
  assert out["context_price"].numpy().tolist() == [0.5] * 4 + [-1.0] * 4


def _decided_by_context(tmp_path):
  """A log where the device alone decides the rating: 5 on a TV, 1 on a phone (and tags that
  say nothing: a multi-hot context column along)."""
  rng = np.random.default_rng(0)
  pairs = rng.permutation(30 * 20)[:500]
  tags = ["a", "b|c", "", "a|c"]
  rows = [(f"u{p // 20}", f"i{p % 20}", 5 if d else 1, T0 + int(t), "tv" if d else "phone",
           tags[p % 4])
          for p, d, t in zip(pairs, rng.integers(0, 2, 500), rng.integers(0, 90 * DAY, 500))]
  out = str(tmp_path / "data")
  preparation.prepare(PrepareConfig(
      output_dir=out, source="csv",
      input=(_write(tmp_path / "log.csv", rows, "user,item,rating,ts,device,tags"),),
      user_column="user", item_column="item", rating_column="rating", timestamp_column="ts",
      context_columns="device:categorical,tags:multi_hot:|", eval_fraction=0.2, num_shards=2,
      seed=1))
  return out


@pytest.fixture(scope="module")
def decided(tmp_path_factory):
  """mf with and without the context, on `_decided_by_context`'s log."""
  tmp = tmp_path_factory.mktemp("decided")
  data_dir = _decided_by_context(tmp)
  runs = {}
  for features in ("all", "none"):
    config = TrainConfig(data_dir=data_dir, model_dir=str(tmp / features), model="mf",
                         task="explicit", features=features, embedding_dim=8, epochs=30,
                         batch_size=50, learning_rate=0.05, optimizer="adam", keep_best=False)
    runs[features] = (config, train.train_and_evaluate(config))
  return data_dir, runs


def test_context_alone_decides_the_rating_and_only_the_context_model_learns_it(decided):
  _, runs = decided
  with_context, without = runs["all"][1], runs["none"][1]
  assert with_context["eval_rmse"] < 0.3, with_context
  assert without["eval_rmse"] > 1.5, without  # the best it can do is about 2 (the mean)


_SERVE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    assert "trainer" not in sys.modules
    loaded = tf.saved_model.load(sys.argv[1])
    args = json.loads(sys.stdin.read())
    users, items = tf.constant(args["users"]), tf.constant(args["items"])
    device, tags = tf.constant(args["devices"]), tf.constant(args["tags"])
    scored = loaded.signatures["score_context"](user=users, item=items, context_device=device,
                                                context_tags=tags)
    plain = loaded.signatures["serving_default"](user=users, item=items)
    ranked = {d: loaded.signatures["recommend_context"](
        user=tf.constant([args["users"][0]]), k=tf.constant(5), context_device=tf.constant([d]),
        context_tags=tf.constant([["a", "c"]]))
        for d in ("tv", "phone")}
    print(json.dumps({"rating": scored["rating"].numpy().tolist(),
                      "plain": plain["rating"].numpy().tolist(),
                      "ranked": {d: [i.decode() for i in r["items"].numpy()[0]]
                                 for d, r in ranked.items()},
                      "scores": {d: r["scores"].numpy()[0].tolist() for d, r in ranked.items()},
                      "signatures": sorted(loaded.signatures)}))
""")


def test_the_exports_context_signatures_in_a_fresh_process_equal_the_restored_model(decided):
  data_dir, runs = decided
  config = runs["all"][0]
  data = artifacts.PreparedData(data_dir)
  users, items = data.vocabularies()
  devices = ["tv", "phone", "", "watch"]  # missing, and a value never seen
  tags = [["a", ""], ["c", "b"], ["", ""], ["zzz", "a"]]  # missing, and a value never seen
  request = {"users": [users[0], users[1], users[2], "nobody"],
             "items": [items[0], items[1], items[2], items[3]], "devices": devices, "tags": tags}
  result = subprocess.run([sys.executable, "-c", _SERVE, config.resolved_export_dir],
                          input=json.dumps(request), capture_output=True, text=True,
                          check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  served = json.loads(result.stdout.strip().splitlines()[-1])
  assert {"score_context", "recommend_context", "serving_default"} <= set(served["signatures"])

  model = run_dir.load_trained_model(config.model_dir, data)
  devices_vocabulary = data.feature_vocabulary("context", "device")
  indices = {d: devices_vocabulary.index(d) + 1 for d in ("tv", "phone")} | {"": 0, "watch": 0}
  tag_index = {t: n + 1 for n, t in enumerate(data.feature_vocabulary("context", "tags"))}
  width = {e["name"]: e for e in data.metadata.features}["tags"]["width"]
  coded = np.zeros((4, width), np.int64)
  for row, values in enumerate(tags):
    known = sorted(tag_index[t] for t in values if t in tag_index)
    coded[row, :len(known)] = known
  batch = {schema.USER: np.array([0, 1, 2, len(users)]), schema.ITEM: np.arange(4),
           "context_device": np.array([indices[d] for d in devices]), "context_tags": coded}
  low, high = data.metadata.rating_min, data.metadata.rating_max
  np.testing.assert_allclose(served["rating"], np.clip(model(batch), low, high), rtol=1e-5)
  del batch["context_device"], batch["context_tags"]  # serving_default: without context
  np.testing.assert_allclose(served["plain"], np.clip(model(batch), low, high), rtol=1e-5)
  assert served["rating"][0] > 4 and served["rating"][1] < 2  # the context decides
  for device in ("tv", "phone"):
    both = np.zeros((1, width), np.int64)
    both[0, :2] = sorted((tag_index["a"], tag_index["c"]))
    scores = np.array(model.score_all(
        tf.constant([0], tf.int64), context={"context_device": tf.constant(
            [indices[device]], tf.int64), "context_tags": tf.constant(both)}))[0]
    seen = data.train_positives
    scores[seen["indices"][seen["indptr"][0]:seen["indptr"][1]]] = -np.inf
    top = np.argsort(-scores, kind="stable")[:5]
    assert served["ranked"][device] == [items[i] for i in top]
    np.testing.assert_allclose(served["scores"][device], scores[top], rtol=1e-5)


def test_recommend_takes_the_context_on_the_command_line(decided):
  data_dir, runs = decided
  export = runs["all"][0].resolved_export_dir
  user = artifacts.PreparedData(data_dir).vocabularies()[0][0]
  tv = run_cli("trainer.recommend", f"--export_dir={export}", f"--user={user}", "--k=3",
               "--context=device=tv").stdout
  phone = run_cli("trainer.recommend", f"--export_dir={export}", f"--user={user}", "--k=3",
                  "--context=device=phone").stdout
  scores = lambda text: [float(line.split()[-1]) for line in text.splitlines()[1:]]  # noqa
  assert min(scores(tv)) > max(scores(phone)) + 2  # 5-ish against 1-ish
  bad = run_cli("trainer.recommend", f"--export_dir={export}", f"--user={user}",
                "--context=color=red", check=False)
  assert bad.returncode == 2 and "'color=red' is not name=value with a name among device" in (
      bad.stderr)


def test_the_sampled_protocols_rows_carry_their_context(tmp_path):
  rows = [(f"u{u}", f"i{i}", 1, T0 + 3600 * (u + 2 * i)) for u in range(6) for i in range(5)]
  rows += [("u9", f"i{i}", 1, T0) for i in range(5, 10)]  # items the others never saw
  out = str(tmp_path / "data")
  preparation.prepare(PrepareConfig(
      output_dir=out, source="csv", input=(_write(tmp_path / "log.csv", rows),),
      user_column="user", item_column="item", timestamp_column="ts", split="leave_one_out",
      eval_negatives=3, context=("hour",), num_shards=1))
  data = artifacts.PreparedData(out)
  sampled, users = data.eval_negatives, data.vocabularies()[0]
  held_out = {(u, i): v["context_hour"] for (u, i), v in _examples(out, schema.EVAL).items()}
  assert len(sampled["users"]) == 7 == len(held_out)
  items = data.vocabularies()[1]
  for user, item, hour in zip(sampled["users"], sampled["positives"], sampled["context_hour"]):
    assert held_out[(users[user], items[item])] == hour
    if users[user] != "u9":  # the latest: item 4
      assert hour == 1 + (int(users[user][1:]) + 2 * 4) % 24
