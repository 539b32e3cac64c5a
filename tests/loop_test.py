"""The loop's small parts (trainer/loop.py): weight checks, steps per epoch, the ETA; the loop
itself runs in train_test, distribute_test and divergence_test."""

import numpy as np
import tensorflow as tf

from trainer import loop, models
from trainer.config import TrainConfig
from trainer.data import artifacts


def test_the_weights_checksum_changes_with_any_weight_and_only_then():
  model = models.build_model("mf", 5, 4, 3)
  first = loop.weights_checksum(model)
  assert loop.weights_checksum(model) == first and len(first) == 64
  weight = model.trainable_weights[-1]
  weight.assign(weight + 1e-6)
  assert loop.weights_checksum(model) != first


def test_weights_are_finite_until_one_is_not():
  model = models.build_model("gmf", 5, 4, 3)
  assert loop.weights_finite(model)
  table = model.trainable_weights[0]
  table.assign(tf.tensor_scatter_nd_update(tf.convert_to_tensor(table), [[2, 1]], [np.inf]))
  assert not loop.weights_finite(model)


def test_steps_per_epoch_count_whole_batches_of_positives(tiny_data_dir):
  data = artifacts.PreparedData(tiny_data_dir)
  explicit = TrainConfig(data_dir=tiny_data_dir, model_dir="m", batch_size=256)
  assert loop.steps_per_epoch(explicit, data) == data.metadata.num_train // 256
  implicit = TrainConfig(data_dir=tiny_data_dir, model_dir="m", task="implicit",
                         num_negatives=4, batch_size=250)  # 50 positives a batch
  assert loop.steps_per_epoch(implicit, data) == data.metadata.num_train // 50


def test_the_eta_reads_as_hours_minutes_seconds():
  assert loop._format_eta(3725.4) == "1:02:05"
  assert loop._format_eta(float("nan")) == "0:00:00" and loop._format_eta(-5) == "0:00:00"
