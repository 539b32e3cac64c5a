"""Checkpoints of a training run: the latest ones for resume, and a copy of the best model.

A checkpoint holds the model, the optimizer (slots and step), the random generators' states
(dropout masks) and the `TrainingState` counters, so a restarted run continues exactly where
the saved one stood, mid-epoch included. Saves happen at every epoch's end and, within an
epoch, every `--checkpoint_every_steps` steps and/or `--checkpoint_every_secs` seconds.

In a cluster every task saves (saving may run collectives that every task must join), but only
the chief's files are kept: other tasks write to temporary siblings (`distribute.write_dir`),
removed by `clean_up`. Every write is retried on transient storage errors (`fileio.retry`).
"""

import dataclasses
import re
import time
from typing import Dict, Optional

import keras
import tensorflow as tf
from absl import logging

from trainer import distribute, fileio, objectives
from trainer.config import TrainConfig
from trainer.errors import ConfigError

BEST_SUBDIR = "best"

# Checkpoints written before the side-feature index tables became int64 hold them as int32
# under this key (a dtype change no restore converts).
LEGACY_INDEX_TABLE = re.compile(
    r"^model/(\w+_feature_tables)/indices/\.ATTRIBUTES/VARIABLE_VALUE$")


def restore(checkpoint: tf.train.Checkpoint, path: str, model: keras.Model,
            partial: bool = False) -> None:
  """Restores `path` into `checkpoint` (whose `model` is `model`): every object the
  checkpoint holds must match unless `partial`.

  A checkpoint from before int64 feature index tables holds int32 ones: the model's, built
  from the same prepared data, must equal them (they are the feature files' values, never
  trained), and then the rest is restored around them.
  """
  reader = tf.train.load_checkpoint(path)
  matches = (LEGACY_INDEX_TABLE.match(key) for key in reader.get_variable_to_dtype_map())
  legacy = {match.group(0): match.group(1) for match in matches if match}
  for key, layer in legacy.items():
    saved, built = reader.get_tensor(key), getattr(model, layer).index_table.numpy()
    if saved.shape != built.shape or (saved != built).any():
      raise ConfigError(f"checkpoint {path}: its {layer} (int32, written by an older version) "
                        f"differ from the ones built from the data directory's feature files: "
                        f"the run was trained on other prepared data")
  status = checkpoint.restore(path)
  if partial or legacy:
    if legacy:
      logging.info("Checkpoint %s predates int64 feature index tables: its %s match the data's",
                   path, ", ".join(sorted(legacy.values())))
    status.expect_partial()
  else:
    status.assert_existing_objects_matched()


@dataclasses.dataclass
class TrainingState:
  """Training progress beside the model and optimizer, saved in every checkpoint."""

  epoch: tf.Variable  # epochs finished (trained and evaluated)
  step: tf.Variable  # training steps taken, over all epochs
  epoch_loss: tf.Variable  # sum of the current epoch's step losses so far
  best: tf.Variable  # best value of the primary metric (NaN: none yet)
  since_best: tf.Variable  # epochs since it improved
  # Parameter-server training only: the global batches each worker has trained.
  worker_batches: Optional[tf.Variable] = None
  # Input from the tf.data service only: the current epoch's positives trained so far.
  epoch_examples: Optional[tf.Variable] = None

  @classmethod
  def create(cls, num_workers: int = 0, served: bool = False) -> "TrainingState":
    """Fresh counters; create them under the strategy's scope, like the model."""
    make = lambda value, dtype, name: tf.Variable(value, dtype=dtype, trainable=False,  # noqa
                                                  name=name)
    return cls(epoch=make(0, tf.int64, "epoch"), step=make(0, tf.int64, "step"),
               epoch_loss=make(0.0, tf.float64, "epoch_loss"),
               best=make(float("nan"), tf.float64, "best"),
               since_best=make(0, tf.int64, "since_best"),
               worker_batches=(make([0] * num_workers, tf.int64, "worker_batches")
                               if num_workers else None),
               epoch_examples=make(0, tf.int64, "epoch_examples") if served else None)

  def variables(self) -> dict:
    """The counters by name (not `dataclasses.asdict`, which would copy the variables)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None}


def _seed_states(model: keras.Model) -> list:
  """The states of the model's random generators (dropout): a resumed run draws the same
  masks as an uninterrupted one. Keras tracks them outside the weights a checkpoint saves."""
  return [v.value for v in model.variables if "seed_generator_state" in v.path]


class Checkpointer:
  """Owns a run's checkpoint managers: save on interval, the best copy, restore, clean-up.

  Args:
    config: where (`resolved_checkpoint_dir`), how often, how many to keep, retries.
    strategy: decides which task's files are kept (the chief's).
    model, optimizer, state: what a checkpoint holds.
  """

  def __init__(self, config: TrainConfig, strategy: tf.distribute.Strategy, model: keras.Model,
               optimizer: keras.optimizers.Optimizer, state: TrainingState):
    self.config = config
    self.strategy = strategy
    self.model = model
    self.directory = config.resolved_checkpoint_dir
    self.best_directory = fileio.join(self.directory, BEST_SUBDIR)
    self._task_directory = distribute.write_dir(self.directory, strategy)
    self._task_best_directory = distribute.write_dir(self.best_directory, strategy)
    self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                          random_states=_seed_states(model),
                                          **state.variables())
    self._manager = tf.train.CheckpointManager(self.checkpoint, self._task_directory,
                                               max_to_keep=config.max_checkpoints)
    # The best model with its optimizer's slots: a warm start continues from both.
    self._best_manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model, optimizer=optimizer), self._task_best_directory,
        max_to_keep=1)
    self._last_save = time.time()

  # ------------------------------------------------------------------ restore

  def restore_latest(self) -> Optional[str]:
    """Restores the latest checkpoint unless --overwrite; returns its path, or None."""
    latest = None if self.config.overwrite else tf.train.latest_checkpoint(self.directory)
    if latest:
      restore(self.checkpoint, latest, self.model)
    return latest

  def restore_best(self, current_epoch: Optional[int] = None) -> Optional[str]:
    """Restores the model of the best epoch; returns its path, or None when none was saved.

    Each task restores its own copy: identical weights (the tasks train in lockstep), and no
    task reads a file another task may still be writing. When the best epoch is
    `current_epoch`, whose weights the model holds, nothing is read: a restore assigns every
    table anew (under a parameter server, a second copy of each shard while it runs).
    """
    best = tf.train.latest_checkpoint(self._task_best_directory)
    if best and best_epoch(best) != current_epoch:
      restore(tf.train.Checkpoint(model=self.model), best, self.model, partial=True)
    return best

  # ------------------------------------------------------------------ save

  def steps_until_due(self, global_step: int) -> Optional[int]:
    """Steps until the next --checkpoint_every_steps save, or None when that is off."""
    every = self.config.checkpoint_every_steps
    return every - global_step % every if every else None

  def due_by_clock(self) -> bool:
    """Whether --checkpoint_every_secs has passed since the last save (this task's clock:
    the training loop makes the tasks agree)."""
    every = self.config.checkpoint_every_secs
    return bool(every) and time.time() - self._last_save >= every

  def is_due(self, global_step: int, agreed_by_clock: bool) -> bool:
    """Whether a mid-epoch checkpoint is due by the step interval or the tasks' clock."""
    every = self.config.checkpoint_every_steps
    return bool(every and global_step % every == 0) or agreed_by_clock

  def save_if_due(self, global_step: int, agreed_by_clock: bool) -> bool:
    """Saves a mid-epoch checkpoint when `is_due`; returns whether it saved."""
    if self.is_due(global_step, agreed_by_clock):
      self.save(global_step)
      return True
    return False

  def save(self, global_step: int) -> None:
    """Saves checkpoint number `global_step` (retried; raises fileio.StorageError)."""
    fileio.retry(lambda: self._manager.save(checkpoint_number=global_step),
                 f"writing checkpoint {global_step} to {self._task_directory}",
                 self.config.storage_retries)
    self._last_save = time.time()

  def save_best(self, epoch: int) -> None:
    """Keeps the model of `epoch` as the best so far."""
    fileio.retry(lambda: self._best_manager.save(checkpoint_number=epoch),
                 f"writing the best checkpoint to {self._task_best_directory}",
                 self.config.storage_retries)

  def clean_up(self) -> None:
    """Removes a non-chief task's temporary checkpoint directories (no-op on the chief)."""
    for directory in (self._task_best_directory, self._task_directory):
      distribute.remove_write_dir(directory, self.strategy)


def best_epoch(path: Optional[str]) -> Optional[int]:
  """The epoch number of a best-checkpoint path (`.../best/ckpt-3` -> 3), or None."""
  return int(path.rsplit("-", 1)[1]) if path else None


def start_afresh(config: TrainConfig) -> None:
  """Deletes the checkpoints of an earlier run (--overwrite); the chief calls it."""
  if tf.io.gfile.exists(config.resolved_checkpoint_dir):
    tf.io.gfile.rmtree(config.resolved_checkpoint_dir)
  logging.info("--overwrite: removed the checkpoints in %s", config.resolved_checkpoint_dir)


class BestTracker:
  """Tracks the primary metric: keeps the best epoch's checkpoint, decides early stopping."""

  def __init__(self, config: TrainConfig, objective: objectives.Objective, metric: str,
               state: TrainingState, checkpointer: Checkpointer):
    self.config, self.objective, self.metric = config, objective, metric
    self.state, self.checkpointer = state, checkpointer

  def update(self, epoch: int, eval_metrics: Dict[str, float]) -> bool:
    """Records epoch `epoch` (1-based); returns whether it is the best so far."""
    value = eval_metrics[self.metric]
    improved = self.objective.better(self.metric, value, float(self.state.best.numpy()))
    if improved:
      self.state.best.assign(value)
      self.state.since_best.assign(0)
      self.checkpointer.save_best(epoch)
    else:
      self.state.since_best.assign_add(1)
    return improved

  def stop_reason(self, eval_metrics: Dict[str, float]) -> Optional[str]:
    """Why to stop now (--target_value reached, or patience run out), or None."""
    config, value = self.config, eval_metrics[self.metric]
    if config.target_value is not None and self.objective.reached(self.metric, value,
                                                                   config.target_value):
      return f"{self.metric} {value:.4f} reached --target_value={config.target_value}"
    patience = config.early_stopping_patience
    if patience and int(self.state.since_best.numpy()) >= patience:
      return f"no improvement of {self.metric} for {patience} epoch(s)"
    return None
