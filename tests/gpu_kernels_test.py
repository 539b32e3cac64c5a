"""GPU paths checked without a GPU: the ops our functions trace, against what the installed
TensorFlow (the CUDA build) says of its GPU kernels.

Every function traced while a piece of the product runs is read back from the eager context
(`list_function_names`/`get_function_def`), op by op, including the branches of conditionals.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.eager import context
from tensorflow.python.framework import config as tf_config

from trainer import metrics, models, optimizers

# Ops whose GPU kernel raises UnimplementedError under op determinism (the messages are in the
# installed libtensorflow_cc: "A deterministic GPU implementation of SparseTensorDenseMatmulOp
# is not currently available", "Determinism is not yet supported in GPU implementation of
# DenseBincount").
RAISE_UNDER_DETERMINISM = {"SparseTensorDenseMatMul", "DenseBincount", "Bincount"}


def traced_ops(run):
  """{op type: names of the functions holding it} of every function traced during `run()`."""
  eager = context.context()
  before = set(eager.list_function_names())
  run()
  ops = {}
  for name in set(eager.list_function_names()) - before:
    for node in eager.get_function_def(name).node_def:
      ops.setdefault(node.op, set()).add(name)
  return ops


@pytest.fixture
def determinism():
  """Op determinism on for the test, restored afterwards."""
  was = tf_config.is_op_determinism_enabled()
  tf.config.experimental.enable_op_determinism()
  yield
  if not was:
    tf_config.disable_op_determinism()


def _lazy_adam_into_table():
  """A lazy Adam step whose gradient has as many rows as the table: the `into_table` sum."""
  table = tf.Variable(np.ones((4, 3), np.float32))
  optimizer = optimizers.LazyAdam(0.1)
  optimizer.build([table])
  gradient = tf.IndexedSlices(tf.ones([6, 3]), tf.constant([0, 1, 1, 2, 3, 3], tf.int64),
                              tf.constant([4, 3], tf.int64))
  tf.function(lambda: optimizer.apply_gradients([(gradient, table)]))()
  return table


def _sampled_evaluation():
  """The sampled protocol with its corrected metrics (a count per rank)."""
  strategy = tf.distribute.get_strategy()
  num_users, num_items, k, m = 8, 20, 3, 4
  model = models.build_model("mf", num_users, num_items, 4)
  rng = np.random.default_rng(0)
  items = rng.integers(0, num_items, num_users)
  negatives = np.stack([rng.choice(np.setdiff1d(np.arange(num_items), [i]), m, replace=False)
                        for i in items])
  corrections = {"hr": metrics.sampled_metric_correction(num_items, m, "hr", k),
                 "ndcg": metrics.sampled_metric_correction(num_items, m, "ndcg", k)}
  evaluate = metrics.make_ranking_evaluation(
      model, strategy, k, num_items, np.zeros(num_users + 1, np.int64), np.zeros(0, np.int32),
      corrections=corrections)[metrics.SAMPLED]
  return evaluate(strategy.distribute_datasets_from_function(
      lambda ctx: metrics.sampled_dataset(np.arange(num_users), items, negatives, 4, ctx)))


@pytest.mark.parametrize("run", [_lazy_adam_into_table, _sampled_evaluation],
                         ids=["lazy_adam_into_table", "sampled_evaluation"])
def test_no_op_that_raises_under_determinism_on_a_gpu(determinism, run):
  ops = traced_ops(run)
  assert ops, "nothing was traced"
  found = {op: sorted(names) for op, names in ops.items() if op in RAISE_UNDER_DETERMINISM}
  assert not found, f"GPU kernels that raise under --deterministic: {found}"


def test_lazy_adam_sums_rows_the_same_with_and_without_determinism(determinism):
  deterministic = _lazy_adam_into_table().numpy()
  tf_config.disable_op_determinism()
  try:
    fast = _lazy_adam_into_table().numpy()
  finally:
    tf.config.experimental.enable_op_determinism()
  np.testing.assert_allclose(deterministic, fast, rtol=1e-6)
  assert not np.allclose(deterministic, 1.0)  # every row moved


def test_the_fast_sum_is_kept_without_determinism():
  if tf_config.is_op_determinism_enabled():
    pytest.skip("another test of this process enabled op determinism for good")
  assert "SparseTensorDenseMatMul" in traced_ops(_lazy_adam_into_table)


@pytest.mark.parametrize("chunk", [1 << 26, 2 * 3, 1])
def test_interactions_are_coded_in_chunks_as_one_product(chunk):
  # Rows of 0, 1, 3 and 2 interactions; a chunk of 2 (6 values / d 3) interactions, or 1,
  # splits rows across chunks.
  indptr, indices = np.array([0, 0, 1, 4, 6]), np.array([2, 0, 1, 3, 0, 2])
  values = np.array([5.0, 1.0, 2.0, 3.0, 4.0, 0.5], np.float32)
  layer = models.InteractionTable(4, 4, {"indptr": indptr, "indices": indices,
                                         "values": values}, chunk=chunk)
  table = np.arange(12, dtype=np.float32).reshape(4, 3)
  dense = np.zeros((4, 4), np.float32)
  for row in range(4):
    for j in range(indptr[row], indptr[row + 1]):
      dense[row, indices[j]] = values[j]
  ids = np.array([3, 0, 2, 2, 1])
  np.testing.assert_allclose(layer(ids, table).numpy(), dense[ids] @ table, rtol=1e-6)
  compiled = tf.function(lambda i, t: layer(i, t), jit_compile=True)
  np.testing.assert_allclose(compiled(ids, table).numpy(), dense[ids] @ table, rtol=1e-6)


def test_autorec_trains_with_jit_compile(tiny_data_dir, tmp_path):
  # XLA has no RaggedRange nor SparseTensorDenseMatMul: the compiled step codes every item
  # with static shapes and gathers the batch's.
  from trainer import train
  from trainer.config import TrainConfig
  config = TrainConfig(data_dir=tiny_data_dir, model_dir=str(tmp_path / "m"), model="autorec",
                       embedding_dim=8, epochs=2, batch_size=256, learning_rate=0.01,
                       jit_compile=True, checkpoint_every_secs=0)
  compiled = train.train_and_evaluate(config)
  plain = train.train_and_evaluate(dataclasses.replace(config, jit_compile=False,
                                                       model_dir=str(tmp_path / "p")))
  assert compiled["eval_rmse"] < compiled["eval_rmse_global_mean_baseline"]
  # The same model, summed in another order (0.586 and 0.588 here).
  assert compiled["eval_rmse"] == pytest.approx(plain["eval_rmse"], rel=0.02)
