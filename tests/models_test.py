"""Tests of the model registry and what every model shares (trainer/models/__init__.py, base.py,
layers.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from model_helpers import VARIANTS, build, feature_tables
from trainer import models, schema
from trainer.config import MODELS
from trainer.data import artifacts


def _model(**overrides):
  args = dict(name="seed_mlp", num_users=150, num_items=100, embedding_dim=64, hidden_units=256,
              rating_mean=3.25)  # noqa
  args.update(overrides)
  return models.build_model(**args)


def test_seed_mlp_parameter_count():
  # embeddings (150 + 1 OOV) * 64 + (100 + 1) * 64 = 16128; hidden 128 * 256 + 256 = 33024;
  # output 256 + 1 = 257.
  assert _model().count_params() == 16128 + 33024 + 257


def test_seed_mlp_starts_at_the_mean_rating():
  model = _model()
  # The output bias starts at the mean; with zeroed embeddings the hidden layer sees only its
  # bias (zero at init), so the prediction is exactly the mean.
  for layer in (model.user_embedding, model.item_embedding):
    layer.embeddings.assign(np.zeros(layer.embeddings.shape, "float32"))
  out = model({schema.USER: np.array([0, 150]), schema.ITEM: np.array([99, 100])})
  np.testing.assert_allclose(np.asarray(out), [3.25, 3.25], rtol=1e-6)
  assert out.shape == (2,)


def test_seed_mlp_config_round_trips():
  model = _model(embedding_dim=8, hidden_units=16)
  clone = models.SeedMLP.from_config(model.get_config())
  assert clone.get_config() == model.get_config()
  restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
  assert isinstance(restored, models.SeedMLP) and restored.embedding_dim == 8


def test_unknown_model_names_the_flag():
  with pytest.raises(ValueError, match="--model='nope' is not a known model"):
    _model(name="nope")


@pytest.mark.parametrize("name,params", [
    # (150 + 1) users, (100 + 1) items, embeddings 8, MLP embeddings 8, layers (16, 8):
    ("gmf", 252 * 8 + (8 + 1)),                                     # 2025
    ("mlp", 252 * 8 + (16 * 16 + 16) + (16 * 8 + 8) + (8 + 1)),     # 2433
    ("neumf", 2 * 252 * 8 + (16 * 16 + 16) + (16 * 8 + 8) + (16 + 1)),  # 4457
    ("mf", 252 * 8 + 252 + 1),                                      # 2269
])
def test_parameter_counts(name, params):
  model = models.build_model(name, 150, 100, 8, layers=(16, 8), mlp_embedding_dim=8)
  assert model.count_params() == params


@pytest.mark.parametrize("name", VARIANTS)
def test_every_model_round_trips_its_config_and_scores_a_batch(name):
  model = build(name, 20, 10, 4, 8, layers=(8, 4), mlp_embedding_dim=4,
                             dropout=0.1, l2=0.01)
  clone = type(model).from_config(model.get_config())
  assert clone.get_config() == model.get_config()
  out = model({schema.USER: np.array([0, 19, 20]), schema.ITEM: np.array([9, 0, 10])})
  assert out.shape == (3,)


def test_l2_penalty_is_the_squared_norm_of_the_gathered_rows():
  model = models.build_model("mf", 3, 2, 2, l2=0.5)
  model.user_embedding.embeddings.assign(np.arange(8, dtype="float32").reshape(4, 2))
  model.item_embedding.embeddings.assign(np.ones((3, 2), "float32"))
  model.user_bias.embeddings.assign(np.full((4, 1), 2.0, "float32"))
  model.item_bias.embeddings.assign(np.zeros((3, 1), "float32"))
  scores, penalty = model.scores_and_penalty({schema.USER: np.array([1]),
                                               schema.ITEM: np.array([0])})
  np.testing.assert_allclose(np.asarray(scores), np.asarray(model(
      {schema.USER: np.array([1]), schema.ITEM: np.array([0])})))
  # user row 1 = [2, 3] -> 13; item row 0 = [1, 1] -> 2; user bias 2 -> 4; item bias 0.
  np.testing.assert_allclose(np.asarray(penalty), [0.5 * (13 + 2 + 4)])


@pytest.mark.parametrize("name", MODELS)
def test_the_penalty_reuses_the_rows_the_scores_gathered(name):
  """One lookup per table and batch: each table's gradient holds one row per example (a
  penalty that gathered the rows again would double them, and the optimizer's work)."""
  model = models.build_model(name, 20, 10, 4, 8, layers=(8, 4), mlp_embedding_dim=4, l2=0.1)
  batch = {schema.USER: tf.constant([0, 3, 3, 7]), schema.ITEM: tf.constant([1, 1, 2, 9])}
  with tf.GradientTape() as tape:
    scores, penalty = model.scores_and_penalty(batch, training=True)
    loss = tf.reduce_sum(scores) + tf.reduce_sum(penalty)
  # (autorec's encoder is read whole, a dense gradient: its own test.)
  tables = [w for w in model.trainable_variables if len(w.shape) == 2 and w.shape[0] in (11, 21)
            and not w.path.startswith("encoder")]
  assert len(tables) >= 2
  for table, gradient in zip(tables, tape.gradient(loss, tables)):
    assert isinstance(gradient, tf.IndexedSlices), table.path
    assert gradient.indices.shape[0] == 4, table.path
  assert float(tf.reduce_min(penalty)) > 0


@pytest.mark.parametrize("name", VARIANTS)
def test_training_scores_equal_the_model_call_under_mixed_precision(name):
  """`scores_and_penalty` skips Keras's `__call__` (and its autocast): the scores must still
  come out as the model's own call gives them, in the compute dtype."""
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    model = build(name, 20, 10, 4, 8, layers=(8, 4), mlp_embedding_dim=4, l2=0.1)
    batch = {schema.USER: tf.constant([0, 3, 20]), schema.ITEM: tf.constant([1, 9, 10])}
    scores, penalty = model.scores_and_penalty(batch)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  assert scores.dtype == tf.bfloat16 and penalty.dtype == tf.float32
  np.testing.assert_array_equal(np.asarray(tf.cast(scores, tf.float32)),
                                np.asarray(tf.cast(model(batch), tf.float32)))


def test_neumf_starts_from_pretrained_gmf_and_mlp():
  sizes = dict(layers=(8, 4), mlp_embedding_dim=4)
  gmf = models.build_model("gmf", 20, 10, 4, **sizes)
  mlp = models.build_model("mlp", 20, 10, 4, **sizes)
  neumf = models.build_model("neumf", 20, 10, 4, **sizes)
  neumf.load_pretrained(gmf, mlp, alpha=0.25)
  batch = {schema.USER: np.array([1, 5]), schema.ITEM: np.array([2, 7])}
  # The fused output is alpha * GMF's logit + (1 - alpha) * MLP's logit.
  expected = 0.25 * np.asarray(gmf(batch)) + 0.75 * np.asarray(mlp(batch))
  np.testing.assert_allclose(np.asarray(neumf(batch)), expected, rtol=1e-5, atol=1e-7)
  wrong = models.build_model("mlp", 20, 10, 4, layers=(6, 4), mlp_embedding_dim=4)
  with pytest.raises(ValueError, match="pretrain with the same sizes"):
    neumf.load_pretrained(gmf, wrong)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_weight_round_trips_through_a_checkpoint(name, tmp_path):
  import tensorflow as tf
  fresh = lambda: build(name, 20, 10, 4, 8, layers=(8, 4),  # noqa: E731
                        mlp_embedding_dim=4, dropout=0.1)
  keras.utils.set_random_seed(1)
  saved = fresh()
  path = tf.train.Checkpoint(model=saved).save(str(tmp_path / "ckpt"))
  stored = [n for n, _ in tf.train.list_variables(path) if n.startswith("model/")]
  assert len(stored) == len(saved.weights)
  keras.utils.set_random_seed(2)
  restored = fresh()
  tf.train.Checkpoint(model=restored).restore(path).assert_existing_objects_matched()
  for a, b in zip(saved.weights, restored.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_score_layer_matches_dense_output_and_gradients():
  rng = np.random.default_rng(4)
  x = tf.constant(rng.normal(size=(7, 5)).astype("float32"))
  score, dense = models.Score(name="s"), keras.layers.Dense(1, name="d")
  score.build((None, 5))
  dense.build((None, 5))
  dense.set_weights([rng.normal(size=(5, 1)).astype("float32"), np.array([0.3], "float32")])
  score.set_weights(dense.get_weights())
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    upstream = tf.constant(rng.normal(size=(7, 1)).astype("float32"))
    a = tf.reduce_sum(score(x) * upstream)
    b = tf.reduce_sum(dense(x) * upstream)
  np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
  for ga, gb in zip(tape.gradient(a, [x, score.kernel.value, score.bias.value]),
                    tape.gradient(b, [x, dense.kernel.value, dense.bias.value])):
    np.testing.assert_allclose(ga.numpy(), gb.numpy(), rtol=1e-5, atol=1e-6)
  assert models.Score.from_config(score.get_config()).units == 1


def test_row_block_normal_draws_any_range_of_rows_as_the_whole_table_has_them():
  """What lets a parameter-server shard initialise only its rows, identically to a whole
  table: every range, across block boundaries, and a fill into uneven shards."""
  init = models.RowBlockNormal(0.01, seed=5)
  block = models.RowBlockNormal.BLOCK_ROWS
  whole = init((2 * block + 10, 3)).numpy()
  assert abs(whole.std() - 0.01) < 5e-4 and abs(whole.mean()) < 5e-4
  for first, count in [(0, 1), (block - 2, 5), (block, block), (2 * block + 9, 1), (7, 2 * block)]:
    np.testing.assert_array_equal(init.rows(first, count, 3).numpy(), whole[first:first + count])
  shards = [tf.Variable(tf.zeros((rows, 3))) for rows in (block + 4, block + 3, 3)]
  init.fill(shards)
  np.testing.assert_array_equal(np.concatenate([s.numpy() for s in shards]), whole)
  assert models.RowBlockNormal(**init.get_config()).seed == 5


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("with_features", [False, True])
def test_score_all_equals_scoring_every_pair(name, with_features):
  """mf and gmf score the catalogue by one matmul, the others pair by pair: every weight
  random (biases too), each user's row must equal the model's score of each (user, item)."""
  model = models.build_model(name, 20, 10, 4, 8, layers=(8, 4), mlp_embedding_dim=4,
                             features=feature_tables() if with_features else None)
  users = tf.constant([0, 3, 19, 20], tf.int64)  # 20: the out-of-vocabulary user
  model({schema.USER: users, schema.ITEM: users % 10})
  rng = np.random.default_rng(0)
  for weight in model.trainable_weights:  # (the feature tables are not: they hold indices)
    weight.assign(rng.normal(size=weight.shape).astype(weight.dtype))
  matrix = model.score_all(users).numpy()
  assert matrix.shape == (4, 10)
  pairs = model({schema.USER: tf.repeat(users, 10),
                 schema.ITEM: tf.tile(tf.range(10, dtype=tf.int64), [4])})
  np.testing.assert_allclose(matrix, np.reshape(pairs, (4, 10)), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ mf with a user history


# ------------------------------------------------------------------ autorec


@pytest.mark.parametrize("task,model", [("explicit", "mf"), ("implicit", "gmf")])
def test_a_configured_model_starts_its_output_bias_where_its_task_says(tiny_data_dir, task,
                                                                        model):
  from trainer.config import TrainConfig
  data = artifacts.PreparedData(tiny_data_dir)
  built = models.for_config(TrainConfig(data_dir=tiny_data_dir, model_dir="m", task=task,
                                        model=model, embedding_dim=4), data)
  assert isinstance(built, {"mf": models.MF, "gmf": models.GMF}[model])
  expected = data.metadata.train_rating_mean if task == "explicit" else 0.0
  assert built.output_bias == pytest.approx(expected) and (task != "explicit" or expected > 1)
