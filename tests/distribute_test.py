"""Multi-replica training on two logical CPUs equals training on one device."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import distribute, models, schema, train

GLOBAL_BATCH = 64
STEPS = 6


def _data():
  rng = np.random.default_rng(0)
  n = GLOBAL_BATCH * STEPS
  users = rng.integers(0, 20, n)
  return {schema.USER: users, schema.ITEM: rng.integers(0, 15, n),
          schema.RATING: (1.0 + users % 5).astype("float32")}  # learnable from the user


def _train(strategy):
  keras.utils.set_random_seed(0)
  with strategy.scope():
    model = models.build_model("seed_mlp", 20, 15, embedding_dim=8, hidden_units=16,
                               rating_mean=3.0)
    optimizer = keras.optimizers.Adam(learning_rate=0.01)
    optimizer.build(model.trainable_variables)
  data = _data()
  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: tf.data.Dataset.from_tensor_slices(data).batch(
          ctx.get_per_replica_batch_size(GLOBAL_BATCH), drop_remainder=True))
  iterator = iter(dataset)
  train_loop = train.make_train_loop(model, optimizer, strategy, GLOBAL_BATCH)
  losses = [float(train_loop(iterator, tf.constant(1))) for _ in range(STEPS)]
  return losses, model


def test_two_replicas_match_one_device(mirrored_strategy):
  one_losses, one = _train(tf.distribute.OneDeviceStrategy("/cpu:0"))
  mirrored = mirrored_strategy
  assert mirrored.num_replicas_in_sync == 2
  two_losses, two = _train(mirrored)
  np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
  assert one_losses[-1] < one_losses[0]  # it trained
  for a, b in zip(one.weights, two.weights):
    replicas = mirrored.experimental_local_results(b.value)
    assert len(replicas) == 2
    np.testing.assert_array_equal(replicas[0].numpy(), replicas[1].numpy())
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6, err_msg=b.path)


@pytest.mark.parametrize("name,devices,replicas,kind", [
    ("auto", 1, 1, "_DefaultDistributionStrategy"),
    ("auto", 2, 2, "MirroredStrategy"),
    ("mirrored", 2, 2, "MirroredStrategy"),
    ("default", 1, 1, "_DefaultDistributionStrategy"),
])
def test_strategy_selection(name, devices, replicas, kind):
  # Only created, never run: see the `mirrored_strategy` fixture.
  strategy = distribute.get_strategy(name, devices)
  assert strategy.num_replicas_in_sync == replicas
  assert type(strategy).__name__ == kind


def test_configuring_devices_after_start_up_fails_clearly():
  tf.constant(1.0)  # TensorFlow is initialised with the tests' two CPU devices
  distribute.configure_cpu_devices(2)  # the same count: nothing to do
  with pytest.raises(RuntimeError, match="--num_cpu_devices=3: TensorFlow already started"):
    distribute.configure_cpu_devices(3)
