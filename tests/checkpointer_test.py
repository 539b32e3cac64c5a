"""Tests of the checkpointer: round trips, save intervals, the best copy, a worker's clean-up."""

import dataclasses
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TaskStrategy
from trainer import models, optimizers, schema
from trainer.checkpointer import Checkpointer, TrainingState, best_epoch
from trainer.config import TrainConfig


def _parts(dropout: float = 0.0):
  keras.utils.set_random_seed(0)
  model = models.build_model("mlp", 10, 8, 4, layers=(4,), dropout=dropout)
  optimizer = optimizers.make_optimizer("lazy_adam", 0.1)
  optimizer.build(model.trainable_variables)
  return model, optimizer, TrainingState.create()


def _step(model, optimizer):
  """One real training step, so weights, slots and dropout's generator all move."""
  batch = {schema.USER: tf.constant([1, 2], tf.int64), schema.ITEM: tf.constant([3, 4], tf.int64)}
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(tf.square(model(batch, training=True) - 1.0))
  optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables))


def _weights(model):
  return [np.array(w) for w in model.weights]


def _config(tmp_path, **changes):
  return dataclasses.replace(TrainConfig(data_dir="d", model_dir=str(tmp_path),
                                         checkpoint_every_secs=0.0), **changes)


def test_a_checkpoint_round_trips_model_optimizer_state_and_dropout(tmp_path):
  model, optimizer, state = _parts(dropout=0.5)
  checkpointer = Checkpointer(_config(tmp_path), tf.distribute.get_strategy(), model, optimizer,
                              state)
  _step(model, optimizer)
  state.step.assign(7)
  state.epoch_loss.assign(1.25)
  checkpointer.save(7)
  saved, saved_iterations = _weights(model), int(optimizer.iterations.numpy())
  _step(model, optimizer)  # what comes next, from the saved point
  expected_next = _weights(model)

  model2, optimizer2, state2 = _parts(dropout=0.5)
  restored = Checkpointer(_config(tmp_path), tf.distribute.get_strategy(), model2, optimizer2,
                          state2)
  assert restored.restore_latest().endswith("ckpt-7")
  for a, b in zip(_weights(model2), saved):
    np.testing.assert_array_equal(a, b)
  assert int(optimizer2.iterations.numpy()) == saved_iterations
  assert int(state2.step.numpy()) == 7 and float(state2.epoch_loss.numpy()) == 1.25
  _step(model2, optimizer2)  # the same masks and moments: the same next step
  for a, b in zip(_weights(model2), expected_next):
    np.testing.assert_array_equal(a, b)


def test_overwrite_restores_nothing(tmp_path):
  model, optimizer, state = _parts()
  Checkpointer(_config(tmp_path), tf.distribute.get_strategy(), model, optimizer,
               state).save(1)
  fresh = Checkpointer(_config(tmp_path, overwrite=True), tf.distribute.get_strategy(),
                       *_parts())
  assert fresh.restore_latest() is None


def test_saves_on_the_step_interval_and_keeps_the_latest(tmp_path):
  model, optimizer, state = _parts()
  checkpointer = Checkpointer(_config(tmp_path, checkpoint_every_steps=5, max_checkpoints=2),
                              tf.distribute.get_strategy(), model, optimizer, state)
  assert checkpointer.steps_until_due(0) == 5 and checkpointer.steps_until_due(7) == 3
  saved = [step for step in range(1, 21) if checkpointer.save_if_due(step, False)]
  assert saved == [5, 10, 15, 20]
  kept = sorted(f for f in os.listdir(tmp_path / "checkpoints") if f.endswith(".index"))
  assert kept == ["ckpt-15.index", "ckpt-20.index"]
  assert checkpointer.save_if_due(21, True)  # the tasks agreed a save is due by the clock
  off = Checkpointer(_config(tmp_path / "off"), tf.distribute.get_strategy(), *_parts())
  assert off.steps_until_due(3) is None and not off.due_by_clock()


def test_the_clock_interval(tmp_path):
  checkpointer = Checkpointer(_config(tmp_path, checkpoint_every_secs=3600.0),
                              tf.distribute.get_strategy(), *_parts())
  assert not checkpointer.due_by_clock()
  checkpointer._last_save -= 3601
  assert checkpointer.due_by_clock()
  checkpointer.save(1)
  assert not checkpointer.due_by_clock()


def test_the_best_copy_is_restored_over_later_weights(tmp_path):
  model, optimizer, state = _parts()
  checkpointer = Checkpointer(_config(tmp_path), tf.distribute.get_strategy(), model, optimizer,
                              state)
  assert checkpointer.restore_best() is None
  _step(model, optimizer)
  checkpointer.save_best(2)
  best = _weights(model)
  _step(model, optimizer)
  later = _weights(model)
  # Called at epoch 2, the best one, it reads nothing: the model is taken to hold epoch 2.
  assert best_epoch(checkpointer.restore_best(current_epoch=2)) == 2
  for a, b in zip(_weights(model), later):
    np.testing.assert_array_equal(a, b)
  path = checkpointer.restore_best(current_epoch=3)
  assert best_epoch(path) == 2 and best_epoch(None) is None
  for a, b in zip(_weights(model), best):
    np.testing.assert_array_equal(a, b)


def test_a_worker_writes_to_temporary_directories_and_removes_them(tmp_path):
  strategy = TaskStrategy("worker", 1, {"worker": ["a:1", "b:1"]})
  checkpointer = Checkpointer(_config(tmp_path), strategy, *_parts())
  checkpointer.save(3)
  checkpointer.save_best(1)
  temp = tmp_path / "checkpoints" / ".workertemp_worker_1"
  assert (temp / "ckpt-3.index").exists()
  assert (tmp_path / "checkpoints" / "best" / ".workertemp_worker_1" / "ckpt-1.index").exists()
  assert checkpointer.restore_best().endswith("ckpt-1")  # its own copy
  checkpointer.clean_up()
  assert not temp.exists()
  assert not (tmp_path / "checkpoints" / "best" / ".workertemp_worker_1").exists()
  assert not tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))  # nothing of its own


@pytest.mark.parametrize("retries", [0, 2])
def test_a_failing_write_is_retried_then_named(tmp_path, monkeypatch, retries):
  from trainer import fileio
  from trainer.errors import StorageError
  monkeypatch.setattr(fileio.time, "sleep", lambda seconds: None)
  checkpointer = Checkpointer(_config(tmp_path, storage_retries=retries),
                              tf.distribute.get_strategy(), *_parts())
  calls = []

  def unavailable(checkpoint_number):
    calls.append(checkpoint_number)
    raise tf.errors.UnavailableError(None, None, "storage is down")

  monkeypatch.setattr(checkpointer._manager, "save", unavailable)
  with pytest.raises(StorageError, match="writing checkpoint 4 to .* failed"):
    checkpointer.save(4)
  assert calls == [4] * (retries + 1)


def _legacy_copy(path: str, out: str, change=None) -> str:
  """`path` rewritten as a checkpoint of before int64 feature index tables: every variable
  under its key, the index tables as int32 `indices` (`change` edits them first)."""
  reader = tf.train.load_checkpoint(path)
  root, top = tf.Module(), set()
  for key in reader.get_variable_to_dtype_map():
    if not key.endswith("/.ATTRIBUTES/VARIABLE_VALUE") or key.startswith("save_counter"):
      continue
    parts = key.split("/")[:-2]
    value = reader.get_tensor(key)
    if parts[-1] == "index_table":
      parts[-1], value = "indices", (change or (lambda v: v))(value.astype(np.int32))
    node = root
    top.add(parts[0])
    for part in parts[:-1]:
      if not hasattr(node, part):
        setattr(node, part, tf.Module())
      node = getattr(node, part)
    setattr(node, parts[-1], tf.Variable(value))
  return tf.train.Checkpoint(**{name: getattr(root, name) for name in top}).write(out)


def test_a_checkpoint_with_int32_feature_index_tables_restores(tmp_path):
  """Checkpoints of older versions hold the feature index tables as int32 (no GPU kernel,
  now int64): a resume and an export still read them, and refuse other data's tables."""
  from model_helpers import feature_tables
  from trainer.checkpointer import restore
  from trainer.errors import ConfigError

  def parts():
    keras.utils.set_random_seed(0)
    model = models.build_model("gmf", 10, 11, 4, features=feature_tables())
    optimizer = optimizers.make_optimizer("lazy_adam", 0.1)
    optimizer.build(model.trainable_variables)
    return model, optimizer, TrainingState.create()

  model, optimizer, state = parts()
  assert model.item_feature_tables.index_table.dtype == "int64"
  checkpointer = Checkpointer(_config(tmp_path / "new"), tf.distribute.get_strategy(), model,
                              optimizer, state)
  _step(model, optimizer)
  checkpointer.save(3)
  path = tf.train.latest_checkpoint(checkpointer.directory)
  legacy = _legacy_copy(path, str(tmp_path / "legacy" / "ckpt-3"))
  assert tf.train.load_checkpoint(legacy).get_variable_to_dtype_map()[
      "model/item_feature_tables/indices/.ATTRIBUTES/VARIABLE_VALUE"] == tf.int32
  model2, optimizer2, state2 = parts()
  plain = tf.train.Checkpoint(model=model2).read(legacy)  # what a plain restore does with it
  with pytest.raises(AssertionError, match=r"indices_table, shape=\(11, 3\), dtype=int64"):
    plain.assert_existing_objects_matched()
  plain.expect_partial()

  restore(tf.train.Checkpoint(model=model2, optimizer=optimizer2, state=state2.variables()),
          legacy, model2)
  for a, b in zip(_weights(model2), _weights(model)):
    np.testing.assert_array_equal(a, b)
  fresh = parts()[0].trainable_weights[0].numpy()
  assert not np.array_equal(fresh, model2.trainable_weights[0].numpy())  # it did restore
  assert int(state2.step.numpy()) == int(state.step.numpy())

  other = _legacy_copy(path, str(tmp_path / "other" / "ckpt-3"), change=lambda v: v[::-1])
  with pytest.raises(ConfigError, match=r"ckpt-3: its item_feature_tables .* differ from the "
                     "ones built from the data directory's feature files"):
    restore(tf.train.Checkpoint(model=parts()[0]), other, model2)
