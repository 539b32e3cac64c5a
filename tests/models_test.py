"""Tests of the model builders."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import models, schema
from trainer.config import MODELS
from trainer.data import artifacts


# The models, mf with a user history (`history`) and U-AutoRec, built by `_build`.
VARIANTS = MODELS + ("mf_history", "autorec_user")


def _positives(num_users, num_items, seed=0):
  """Random training positives with each user's time order, as preparation writes them: CSR by
  user, items sorted, `time_rank` a permutation within each user."""
  rng = np.random.default_rng(seed)
  pairs = sorted({(int(u), int(i)) for u, i in zip(rng.integers(0, num_users, 4 * num_users),
                                                   rng.integers(0, num_items, 4 * num_users))})
  users = np.array([u for u, _ in pairs])
  counts = np.bincount(users, minlength=num_users)
  return {"indptr": np.concatenate([[0], np.cumsum(counts)]),
          "indices": np.array([i for _, i in pairs]),
          "time_rank": np.concatenate([rng.permutation(n) for n in counts])}


def _build(variant, num_users, num_items, *args, **kwargs):
  """`models.build_model` of a VARIANTS name ("mf_history": mf with a history of 3;
  "autorec_user": autorec coding users from their items)."""
  if variant == "mf_history":
    kwargs.update(history=3, positives=_positives(num_users, num_items))
    variant = "mf"
  elif variant == "autorec_user":
    positives = _positives(num_users, num_items)
    users = np.repeat(np.arange(num_users), np.diff(positives["indptr"]))
    kwargs.update(side="user", interactions=artifacts.sparse_rows(
        users, positives["indices"], np.ones(len(users)), num_users))
    variant = "autorec"
  return models.build_model(variant, num_users, num_items, *args, **kwargs)


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
  model = _build(name, 20, 10, 4, 8, layers=(8, 4), mlp_embedding_dim=4,
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
    model = _build(name, 20, 10, 4, 8, layers=(8, 4), mlp_embedding_dim=4, l2=0.1)
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
  build = lambda: _build(name, 20, 10, 4, 8, layers=(8, 4),  # noqa: E731
                                     mlp_embedding_dim=4, dropout=0.1)
  keras.utils.set_random_seed(1)
  saved = build()
  path = tf.train.Checkpoint(model=saved).save(str(tmp_path / "ckpt"))
  stored = [n for n, _ in tf.train.list_variables(path) if n.startswith("model/")]
  assert len(stored) == len(saved.weights)
  keras.utils.set_random_seed(2)
  restored = build()
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


def _feature_tables():
  infos = [schema.FeatureInfo("item", "genre", "categorical", 4),
           schema.FeatureInfo("item", "tags", "multi_hot", 5, 2),
           schema.FeatureInfo("item", "price", "numeric")]
  tables = {"genre": np.array([1, 2, 3, 0, 0, 1, 0, 0, 0, 0, 0], np.int32),
            "tags": np.array([[1, 2], [3, 0], [0, 0], [4, 1]] + [[0, 0]] * 7, np.int32),
            "price": np.linspace(-1, 1, 11).astype(np.float32)}
  return {"item": schema.SideFeatures(infos, tables)}


@pytest.mark.parametrize("name", VARIANTS)
def test_features_given_at_serving_equal_features_looked_up_by_id(name):
  """Cold start scores an item from features handed in; for a known item with the same
  features and the out-of-vocabulary ID row zeroed, both ways must agree."""
  model = _build(name, 20, 10, 4, 8, layers=(8, 4), mlp_embedding_dim=4,
                             features=_feature_tables())
  users, items = tf.constant([0, 3, 5], tf.int64), tf.constant([0, 3, 9], tf.int64)
  gathered = model.feature_sides["item"](items)
  np.testing.assert_array_equal(gathered["weights"].numpy()[1], [0.0, 0.5, 0.5])  # tags 4, 1
  by_id = model({schema.USER: users, schema.ITEM: items})
  given = model({schema.USER: users, schema.ITEM: items, "item_features": gathered})
  np.testing.assert_allclose(given, by_id, rtol=1e-6)
  other = model({schema.USER: users, schema.ITEM: items,
                 "item_features": model.feature_sides["item"](tf.constant([1, 1, 1]))})
  assert not np.allclose(other, by_id)  # the features given are the ones used


def test_the_l2_penalty_falls_on_id_rows_only():
  model = models.build_model("gmf", 3, 10, 2, l2=1.0, features=_feature_tables())
  inputs = {schema.USER: tf.constant([1]), schema.ITEM: tf.constant([2])}
  _, penalty = model.scores_and_penalty(inputs)
  user_row = model.user_embedding.embeddings.numpy()[1]
  item_row = model.item_embedding.embeddings.numpy()[2]
  expected = np.sum(user_row ** 2) + np.sum(item_row ** 2)  # not the feature embeddings
  np.testing.assert_allclose(penalty.numpy(), [expected], rtol=1e-5)


def test_feature_embedding_training_path_matches_plain_gathers():
  """Training reads the features through XLA-compiled sums with a hand-written gradient; it
  must give the terms and table gradient that TensorFlow's own gathers and autodiff give."""
  from trainer.models import side_features as fl
  side = _feature_tables()["item"]
  tables = fl.FeatureTables(side.infos, 11, side.tables)
  layer = fl.FeatureEmbedding(side.infos, 3)
  layer.embeddings.assign(np.random.default_rng(5).normal(size=(9, 3)).astype("float32"))
  combined = tables(tf.constant([0, 3, 3, 1, 10]))
  upstream = tf.constant(np.random.default_rng(6).normal(size=(5, 3)).astype("float32"))

  def terms_and_gradient(training):
    with tf.GradientTape() as tape:
      out = layer(combined, training=training)
      loss = tf.reduce_sum(out * upstream)
    return out.numpy(), tf.convert_to_tensor(tape.gradient(loss, layer.embeddings.value))

  compiled, compiled_gradient = terms_and_gradient(True)
  plain, plain_gradient = terms_and_gradient(False)
  np.testing.assert_allclose(compiled, plain, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(compiled_gradient, plain_gradient, rtol=1e-6, atol=1e-7)
  # Item 3: tags 4 and 1 (offsets 4 + 4, 4 + 1), each weighted 1/2, and its price.
  rows = layer.embeddings.numpy()
  expected = 0.5 * (rows[8] + rows[5]) + side.tables["price"][3] * layer.projection.numpy()[0]
  np.testing.assert_allclose(compiled[1], expected, rtol=1e-5)
  # Row 8 (tag 4) is read by item 3 twice (rows 1 and 2 of the batch), at weight 1/2 each.
  np.testing.assert_allclose(compiled_gradient[8], 0.5 * (upstream[1] + upstream[2]), rtol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_features_train_under_mixed_precision(name):
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    model = _build(name, 20, 10, 4, 8, layers=(8, 4), mlp_embedding_dim=4, l2=0.1,
                               features=_feature_tables())
    batch = {schema.USER: tf.constant([0, 3, 20]), schema.ITEM: tf.constant([1, 9, 10])}
    with tf.GradientTape() as tape:
      scores, _ = model.scores_and_penalty(batch)
      loss = tf.reduce_sum(tf.cast(scores, tf.float32))
    features = [v for v in model.trainable_variables if "features" in v.path]
    gradients = tape.gradient(loss, features)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  assert scores.dtype == tf.bfloat16
  assert features and all(g is not None for g in gradients)
  assert any(float(tf.reduce_max(tf.abs(tf.convert_to_tensor(g)))) > 0 for g in gradients)


def test_feature_embedding_takes_serving_inputs_of_any_width():
  """Serving hands in multi-hot values as a [n, None] matrix: the width is known only when the
  request comes, and the embedding must not need it when the graph is built."""
  from trainer.models import side_features as fl
  side = _feature_tables()["item"]
  tables = fl.FeatureTables(side.infos, 11, side.tables)
  layer = fl.FeatureEmbedding(side.infos, 3)
  combined = tables(tf.constant([0, 3, 1]))

  @tf.function(input_signature=[{"indices": tf.TensorSpec([None, None], tf.int64),
                                  "weights": tf.TensorSpec([None, None], tf.float32),
                                  "numeric": tf.TensorSpec([None, 1], tf.float32)}])
  def serve(given):
    return layer(given)

  np.testing.assert_allclose(serve(combined), layer(combined), rtol=1e-6)


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
                             features=_feature_tables() if with_features else None)
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

# 3 users, 4 items. User 0 trained on items 2, 0, 3 in that time order; user 1 on item 1;
# user 2 on nothing. (CSR: items sorted within a user; time_rank their order in time.)
_HISTORY = {"indptr": np.array([0, 3, 4, 4]), "indices": np.array([0, 2, 3, 1]),
            "time_rank": np.array([1, 0, 2, 0])}


def test_mf_history_sums_the_latest_items_before_each_example_by_hand():
  """p_u = e_u + sum_l a_l y_(l-th latest item before the example): in training a training
  pair sees what came before it, any other pair the whole history, as every pair does at
  evaluation; `score_all` with the examples' items gives each row the example's own history;
  the L2 penalty takes the history rows a score read, the padding none."""
  model = models.build_model("mf", 3, 4, 2, history=2, positives=_HISTORY, l2=0.5)
  rng = np.random.default_rng(0)
  for w in model.trainable_weights:
    w.assign(rng.normal(size=w.shape).astype("float32"))
  e, q = model.user_embedding.embeddings.numpy(), model.item_embedding.embeddings.numpy()
  y, a = model.history_embedding.embeddings.numpy(), model.recency_weights.numpy()
  b_u, b_i = model.user_bias.embeddings.numpy()[:, 0], model.item_bias.embeddings.numpy()[:, 0]
  # (user, item) -> the items before it, latest first. 3 is the OOV user.
  before = {(0, 3): [0, 2], (0, 0): [2], (0, 2): [], (0, 1): [3, 0], (1, 1): [],
            (1, 2): [1], (2, 0): [], (3, 0): []}
  users, items = (np.array(c) for c in zip(*before))
  p = np.stack([e[u] + sum(a[l] * y[j] for l, j in enumerate(before[u, i]))
                for u, i in zip(users, items)])
  expected = (p * q[items]).sum(-1) + b_u[users] + b_i[items] + float(model.global_bias)
  batch = {schema.USER: users, schema.ITEM: items}
  scores, penalty = model.scores_and_penalty(batch, training=True)
  np.testing.assert_allclose(scores, expected, rtol=1e-5)
  whole = {u: before[u, i] for u, i in [(0, 1), (1, 2), (2, 0), (3, 0)]}
  p_now = np.stack([e[u] + sum(a[l] * y[j] for l, j in enumerate(whole[u])) for u in users])
  np.testing.assert_allclose(model(batch), (p_now * q[items]).sum(-1) + b_u[users] + b_i[items]
                             + float(model.global_bias), rtol=1e-5)
  rows = [(e[u] ** 2).sum() + (q[i] ** 2).sum() + b_u[u] ** 2 + b_i[i] ** 2
          + sum((y[j] ** 2).sum() for j in before[u, i]) for u, i in zip(users, items)]
  np.testing.assert_allclose(penalty, 0.5 * np.array(rows), rtol=1e-5)
  everything = p @ q[:4].T + b_u[users, None] + b_i[None, :4] + float(model.global_bias)
  np.testing.assert_allclose(model.score_all(tf.constant(users), items=tf.constant(items)),
                             everything, rtol=1e-5, atol=1e-6)
  # A sampled negative (0, 1) of the positive (0, 3) sees what (0, 3) saw: its anchor's.
  negative = {schema.USER: np.array([0, 0]), schema.ITEM: np.array([3, 1]),
              schema.ANCHOR: np.array([3, 3])}
  p_anchor = e[0] + a[0] * y[0] + a[1] * y[2]
  np.testing.assert_allclose(
      model.scores_and_penalty(negative, training=True)[0],
      (p_anchor * q[[3, 1]]).sum(-1) + b_u[0] + b_i[[3, 1]] + float(model.global_bias),
      rtol=1e-5)
  # Without the examples' items: every user's whole history, as for (0, 1), (1, 2).
  np.testing.assert_allclose(model.score_all(tf.constant([0, 1])), everything[[3, 5]],
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mf_history", "gmf", "autorec"])
def test_softmax_scores_are_the_examples_and_the_catalogues(name):
  """`softmax_scores` = (`scores_and_penalty`'s scores, `score_all` with the examples' items,
  the penalty); mf builds its user vectors once: one gather of the history rows, [b x L]."""
  model = _build(name, 20, 10, 4, l2=0.1)
  rng = np.random.default_rng(0)
  for weight in model.trainable_weights:
    weight.assign(rng.normal(size=weight.shape).astype(weight.dtype))
  batch = {schema.USER: tf.constant([0, 3, 3, 7]), schema.ITEM: tf.constant([1, 1, 2, 9])}
  with tf.GradientTape() as tape:
    scores, logits, penalty = model.softmax_scores(batch, training=True)
    loss = tf.reduce_sum(logits) + tf.reduce_sum(scores) + tf.reduce_sum(penalty)
  expected_scores, expected_penalty = model.scores_and_penalty(batch, training=True)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)
  np.testing.assert_allclose(penalty, expected_penalty, rtol=1e-5)
  np.testing.assert_allclose(logits, model.score_all(batch[schema.USER], training=True,
                                                     items=batch[schema.ITEM]),
                             rtol=1e-5, atol=1e-5)
  if name == "mf_history":
    gradient = tape.gradient(loss, model.history_embedding.embeddings)
    assert gradient.indices.shape[0] == 4 * 3


def test_mf_history_needs_the_time_order():
  no_order = {k: v for k, v in _HISTORY.items() if k != "time_rank"}
  with pytest.raises(ValueError, match="no time order"):
    models.build_model("mf", 3, 4, 2, history=2, positives=no_order)
  with pytest.raises(ValueError, match="positives of 3 users for a model of 5"):
    models.build_model("mf", 5, 4, 2, history=2, positives=_HISTORY)


# ------------------------------------------------------------------ autorec

def _interactions(triples, num_items, side="item", num_users=4):
  """Item-major (or user-major) sparse rows of (user, item, value) triples, as the trainer
  builds them."""
  users, items, values = (np.array(c) for c in zip(*triples))
  if side == "user":
    return artifacts.sparse_rows(users, items, values, num_users)
  return artifacts.sparse_rows(items, users, values, num_items)


# 4 users, 3 items: item 0 rated by users 0, 2; item 1 by 1, 2, 3; item 2 by nobody (cold).
_TRIPLES = [(2, 0, 4.0), (0, 0, 5.0), (1, 1, 2.0), (3, 1, 3.0), (2, 1, 1.0)]


def _autorec(triples=_TRIPLES, side="item", **kwargs):
  model = models.build_model("autorec", 4, 3, 3, interactions=_interactions(triples, 3, side),
                             side=side, **kwargs)
  rng = np.random.default_rng(0)
  for w in model.trainable_weights:
    w.assign(rng.normal(size=w.shape).astype("float32"))
  return model


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("side", ["item", "user"])
def test_autorec_encodes_from_the_training_ratings_by_hand(side):
  """I-AutoRec: s(u, i) = <w_u, sigmoid(V^T r_i + mu)> + b_u + b_i + b, V over users; U-AutoRec
  the same with r_u, V over items and the decoder's rows the items'. An entity without
  ratings (item 2, the OOV user 4) is sigmoid(mu); `score_all` is the same scores by one
  matmul; training leaves r_ui out of the code."""
  model = _autorec(side=side)
  V, mu = model.encoder.embeddings.numpy(), model.encoder_bias.numpy()
  assert V.shape == ((5, 3) if side == "item" else (4, 3))  # the other side + OOV
  W = model.decoder.embeddings.numpy()
  b_u, b_i = model.user_bias.embeddings.numpy()[:, 0], model.item_bias.embeddings.numpy()[:, 0]
  r = np.zeros((4, 5) if side == "item" else (5, 4))
  for u, i, value in _TRIPLES:
    r[(i, u) if side == "item" else (u, i)] = value
  h = _sigmoid(r @ V + mu)
  users, items = np.array([0, 1, 3, 2, 4]), np.array([0, 2, 1, 3, 1])
  coded, decoded = (items, users) if side == "item" else (users, items)
  expected = (W[decoded] * h[coded]).sum(-1) + b_u[users] + b_i[items] + float(model.global_bias)
  np.testing.assert_allclose(np.asarray(model({schema.USER: users, schema.ITEM: items})),
                             expected, rtol=1e-5)
  dots = W[:4] @ h[:3].T if side == "item" else h[:4] @ W[:3].T
  everything = dots + b_u[:4, None] + b_i[None, :3] + float(model.global_bias)
  np.testing.assert_allclose(np.asarray(model.score_all(tf.range(4))), everything, rtol=1e-5)
  without = _autorec([t for t in _TRIPLES if t[:2] != (2, 1)], side=side)
  batch = {schema.USER: np.array([2]), schema.ITEM: np.array([1]),
           schema.RATING: np.array([1.0], "float32")}
  np.testing.assert_allclose(model.scores_and_penalty(batch, training=True)[0],
                             without(batch), rtol=1e-5)
  assert abs(float(without(batch)[0]) - float(model(batch)[0])) > 1e-3


def test_autorec_training_leaves_the_example_own_rating_out():
  """In training, (u, i) is scored from i's other ratings: as a model whose table never held
  r_ui scores it at evaluation (the same weights)."""
  model = _autorec()
  without = _autorec([t for t in _TRIPLES if t[:2] != (2, 1)])
  batch = {schema.USER: np.array([2, 2]), schema.ITEM: np.array([1, 0]),
           schema.RATING: np.array([1.0, 4.0], "float32")}
  trained, _ = model.scores_and_penalty(batch, training=True)
  np.testing.assert_allclose(trained[0], without({schema.USER: np.array([2]),
                                                  schema.ITEM: np.array([1])})[0], rtol=1e-5)
  assert abs(float(trained[0]) - float(model({schema.USER: np.array([2]),
                                              schema.ITEM: np.array([1])})[0])) > 1e-3
  # Implicit feedback: a sampled negative (label 0) is not in the table; nothing to leave out.
  implicit = _autorec(ratings=False)
  negative = {schema.USER: np.array([0]), schema.ITEM: np.array([1]),
              schema.LABEL: np.array([0.0], "float32")}
  np.testing.assert_allclose(implicit.scores_and_penalty(negative, training=True)[0],
                             implicit(negative), rtol=1e-6)


def test_autorec_penalises_the_whole_encoder_and_trains_only_the_rows_it_used():
  """`l2 * |V|^2 / users` per example for the encoder (a dense weight: replicas all-reduce its
  gradient as one device's); the loss's gradient touches the rows of the batch items' users."""
  model = _autorec(l2=0.5)
  batch = {schema.USER: tf.constant([3, 1]), schema.ITEM: tf.constant([1, 1]),
           schema.RATING: tf.constant([3.0, 2.0])}  # as the table holds them
  with tf.GradientTape(persistent=True) as tape:
    scores, penalty = model.scores_and_penalty(batch, training=True)
    fit = tf.reduce_sum(scores)
  gradient = tf.convert_to_tensor(tape.gradient(fit, model.encoder.embeddings))
  assert np.flatnonzero(np.abs(gradient.numpy()).sum(-1)).tolist() == [1, 2, 3]  # item 1's
  V = model.encoder.embeddings.numpy()
  decoder = (model.decoder.embeddings.numpy()[[3, 1]] ** 2).sum(-1)
  biases = (model.user_bias.embeddings.numpy()[[3, 1], 0] ** 2
            + model.item_bias.embeddings.numpy()[[1, 1], 0] ** 2)
  np.testing.assert_allclose(penalty, 0.5 * (decoder + biases + (V ** 2).sum() / 5), rtol=1e-5)


def test_autorec_dropout_codes_a_fraction_of_the_examples_as_cold_items():
  """With `dropout`, a training example's item is coded from all of its interactions or (that
  fraction of the time) from none, as an item never trained is: two scores, nothing between."""
  model = _autorec(dropout=0.5)
  batch = {schema.USER: np.zeros(200, "int64"), schema.ITEM: np.ones(200, "int64")}
  warm = float(model({schema.USER: np.array([0]), schema.ITEM: np.array([1])})[0])
  item_bias = model.item_bias.embeddings.numpy()[:, 0]
  cold = float(model({schema.USER: np.array([0]), schema.ITEM: np.array([2])})[0]  # no ratings
               - item_bias[2] + item_bias[1])
  trained = np.asarray(model.scores_and_penalty(batch, training=True)[0])
  is_warm, is_cold = np.isclose(trained, warm, rtol=1e-5), np.isclose(trained, cold, rtol=1e-5)
  assert np.all(is_warm | is_cold) and abs(warm - cold) > 1e-3
  assert 60 < is_cold.sum() < 140  # about half
  np.testing.assert_allclose(model.scores_and_penalty(batch)[0], warm, rtol=1e-5)  # no dropout


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
