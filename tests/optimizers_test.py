"""Tests of LazyAdam against Keras Adam, and of the learning-rate schedule."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import optimizers


# LazyAdam runs TensorFlow's fused Adam kernel, which forms 1 - beta_2 in float32 (1 - 0.999
# loses 1.3e-5 of its value there); Keras Adam forms it in double. Both are float32 Adam; they
# differ by ~1e-5 relative, far below what a wrong update (an unsummed duplicate, a moved
# untouched row) changes.
RTOL = 3e-5


@pytest.fixture(params=["cpu", "gpu"])
def code_paths(request, monkeypatch):
  """The sparse update as built for CPUs, and as built for GPUs (`_sum_duplicates_sorted`)."""
  if request.param == "gpu":
    monkeypatch.setenv("NEUMF_GPU_CODE_PATHS", "1")
  else:
    monkeypatch.delenv("NEUMF_GPU_CODE_PATHS", raising=False)
  return request.param


def _apply(optimizer, variable, gradients):
  optimizer.build([variable])
  for g in gradients:
    optimizer.apply_gradients([(g, variable)])
  return variable.numpy()


@pytest.mark.parametrize("sparse", [True, False])
def test_lazy_adam_equals_dense_adam_when_every_row_is_touched(sparse, code_paths):
  rng = np.random.default_rng(0)
  init = rng.normal(size=(4, 3)).astype("float32")
  grads = [rng.normal(size=(4, 3)).astype("float32") for _ in range(3)]
  dense = _apply(keras.optimizers.Adam(0.1), keras.Variable(init), [tf.constant(g) for g in grads])
  given = [tf.IndexedSlices(tf.constant(g), tf.constant([0, 1, 2, 3])) if sparse
           else tf.constant(g) for g in grads]
  lazy = _apply(optimizers.LazyAdam(0.1), keras.Variable(init), given)
  np.testing.assert_allclose(lazy, dense, rtol=RTOL, atol=1e-6)
  assert np.abs(lazy - init).min() > 0.01  # every element moved


def test_lazy_adam_sums_a_repeated_id_before_squaring_and_leaves_other_rows(code_paths):
  init = np.ones((3, 2), "float32")
  # Row 1 appears twice: its gradient is the sum [3, 3]; row 0 and 2 are untouched.
  sparse = tf.IndexedSlices(tf.constant([[1.0, 1.0], [2.0, 2.0]]), tf.constant([1, 1]))
  lazy = _apply(optimizers.LazyAdam(0.1), keras.Variable(init), [sparse])
  dense = _apply(keras.optimizers.Adam(0.1), keras.Variable(init),
                 [tf.constant([[0.0, 0.0], [3.0, 3.0], [0.0, 0.0]])])
  np.testing.assert_allclose(lazy, dense, rtol=RTOL)
  # By hand, step 1: m = 0.1 g, v = 0.001 g^2, alpha = 0.1 sqrt(0.001) / 0.1:
  # w -= alpha * m / (sqrt(v) + eps) = 0.1 * sign(g) (up to eps).
  np.testing.assert_allclose(lazy[1], [0.9, 0.9], rtol=1e-5)
  np.testing.assert_array_equal(lazy[[0, 2]], init[[0, 2]])


def test_lazy_adam_does_not_touch_rows_outside_the_batch_later_either(code_paths):
  init = np.ones((3, 1), "float32")
  first = tf.IndexedSlices(tf.constant([[1.0], [1.0]]), tf.constant([0, 2]))
  second = tf.IndexedSlices(tf.constant([[1.0]]), tf.constant([2]))
  variable = keras.Variable(init)
  after = _apply(optimizers.LazyAdam(0.1), variable, [first, second])
  dense_adam = _apply(keras.optimizers.Adam(0.1), keras.Variable(init),
                      [tf.constant([[1.0], [0.0], [1.0]]), tf.constant([[0.0], [0.0], [1.0]])])
  assert after[0, 0] == pytest.approx(0.9, rel=1e-5)  # no momentum drift on step 2
  assert dense_adam[0, 0] < after[0, 0]  # dense Adam kept moving row 0
  np.testing.assert_allclose(after[2], dense_adam[2], rtol=RTOL)


@pytest.mark.parametrize("decay,step,expected", [
    ("none", 0, 0.25), ("none", 3, 1.0), ("none", 50, 1.0),
    ("cosine", 4, 1.0), ("cosine", 54, 0.5), ("cosine", 104, 0.0),
    ("linear", 54, 0.5),
])
def test_warmup_then_decay(decay, step, expected):
  schedule = optimizers.WarmupDecay(1.0, warmup_steps=4, total_steps=104, decay=decay)
  assert float(schedule(step)) == pytest.approx(expected, abs=1e-6)


def test_unknown_optimizer_names_the_flag():
  with pytest.raises(ValueError, match="--optimizer='rmsprop' is not one of"):
    optimizers.make_optimizer("rmsprop", 0.1)


@pytest.mark.parametrize("num_rows", [40, 1000])  # batch larger / smaller than the table
@pytest.mark.parametrize("layout", ["scattered", "runs"])
def test_duplicate_rows_are_summed_like_a_segment_sum(layout, num_rows, code_paths):
  rng = np.random.default_rng(3)
  if layout == "runs":  # as implicit batches' users: runs of 5, and IDs repeated across runs
    indices = np.repeat(rng.integers(0, 40, 60), 5)
  else:
    indices = rng.integers(0, 40, 300)  # many repeats, few adjacent
  values = rng.normal(size=(300, 5)).astype("float32")
  merged_values, merged = optimizers._merge_runs(tf.constant(values), tf.constant(indices))
  # Runs are summed when that at least halves the rows, else left alone.
  assert len(merged) == (60 if layout == "runs" else 300)
  np.testing.assert_allclose(merged_values.numpy().sum(0), values.sum(0), rtol=1e-5, atol=1e-5)
  summed, rows = optimizers._sum_duplicates(
      tf.IndexedSlices(tf.constant(values), tf.constant(indices)), tf.TensorShape([num_rows, 5]))
  assert rows.dtype == indices.dtype
  expected = {r: values[indices == r].sum(0) for r in np.unique(indices)}
  if code_paths == "gpu":  # one slot per index: the distinct rows, then the last one repeated
    distinct = len(expected)
    assert len(rows) == len(indices) and set(rows.numpy()[distinct:]) == {rows.numpy()[-1]}
    rows, summed = rows[:distinct], summed[:distinct]
  assert sorted(rows.numpy().tolist()) == sorted(expected)
  for row, total in zip(rows.numpy(), summed.numpy()):
    np.testing.assert_allclose(total, expected[row], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: optimizers.make_optimizer("sgd", 1.0, loss_scale=True),
    lambda: optimizers.make_optimizer("lazy_adam", 1.0, loss_scale=True),
])
def test_an_overflow_on_another_replica_is_skipped_by_every_replica(mirrored_strategy, make):
  # Keras's own LossScaleOptimizer took `finite` from replica 0's gradients: replica 1's inf
  # was summed into the update (the weight became -inf) and the scale stayed.
  with mirrored_strategy.scope():
    dense = keras.Variable(np.ones(2, "float32"))
    table = keras.Variable(np.ones((4, 2), "float32"))
    optimizer = make()
    optimizer.build([dense, table])
  scale = float(optimizer.dynamic_scale.numpy())

  def step():
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    value = tf.where(tf.equal(replica, 1), np.inf, 1.0)
    gradients = [tf.fill([2], value),
                 tf.IndexedSlices(tf.fill([1, 2], value), tf.constant([2], tf.int64),
                                  tf.constant([4, 2], tf.int64))]
    optimizer.apply_gradients(zip(gradients, [dense, table]))

  mirrored_strategy.run(tf.function(step))
  assert float(optimizer.dynamic_scale.numpy()) == scale / 2  # lowered on every replica
  for variable in (dense, table):
    for replica_value in mirrored_strategy.experimental_local_results(variable.value):
      np.testing.assert_array_equal(replica_value.numpy(), 1.0)  # the step was skipped


def test_loss_scaling_checks_sparse_gradients_by_their_rows():
  optimizer = optimizers.make_optimizer("sgd", 1.0, loss_scale=True)
  rows = tf.IndexedSlices(tf.constant([[1.0, np.inf]]), tf.constant([3], tf.int64),
                          tf.constant([1000000, 2], tf.int64))
  assert not bool(optimizer.check_finite([rows]))
  assert bool(optimizer.check_finite([tf.IndexedSlices(tf.ones([1, 2]), tf.constant([3]))]))
