"""Training and evaluation: one library function, `train_and_evaluate`, under any strategy.

A custom loop (`strategy.run` inside a `tf.function`), not `model.fit`: Keras 3's `fit` fails
under MultiWorkerMirroredStrategy (keras-team/keras#20585), and a custom loop is what exact
resume and sparse embedding updates build on. Several steps run inside one `tf.function` call
to keep Python out of the hot loop.

Loss scaling: each replica averages its squared errors over the *global* batch
(`tf.nn.compute_average_loss`) and the optimizer sums gradients across replicas, so N replicas
take the same step as one device on the same global batch.
"""

import hashlib
import json
import time
from typing import Callable, Dict, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import distribute, export, fileio, models, schema
from trainer.config import ConfigError, TrainConfig
from trainer.data import pipeline, preparation

METRICS_FILE = "metrics.json"


def clipped_prediction(model: keras.Model, batch: Dict[str, tf.Tensor], low: float,
                       high: float) -> tf.Tensor:
  """The served rating: the model's output clipped to the data's rating range. Shape [b]."""
  return tf.clip_by_value(model(batch, training=False), low, high)


def make_train_loop(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                    strategy: tf.distribute.Strategy,
                    global_batch_size: int) -> Callable[[object, tf.Tensor], tf.Tensor]:
  """Returns `train_loop(iterator, num_steps) -> mean loss` running `num_steps` steps."""

  def step_fn(batch):
    with tf.GradientTape() as tape:
      predictions = model(batch, training=True)  # [b]
      per_example = tf.square(batch[schema.RATING] - predictions)  # [b]
      loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
    variables = model.trainable_variables
    gradients = tape.gradient(loss, variables)
    optimizer.apply_gradients(zip(gradients, variables))
    return loss

  @tf.function
  def train_loop(iterator, num_steps):
    total = tf.constant(0.0)
    for _ in tf.range(num_steps):
      per_replica = strategy.run(step_fn, args=(next(iterator),))
      total += strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    return total / tf.cast(num_steps, tf.float32)

  return train_loop


def make_evaluate(model: keras.Model, strategy: tf.distribute.Strategy, low: float,
                  high: float, baseline: float) -> Callable[[object], Dict[str, float]]:
  """Returns `evaluate(distributed_dataset) -> metrics` over the whole dataset.

  Metrics: rmse, mae, count, and baseline_rmse: the RMSE of always predicting `baseline` (the
  training mean rating), the bar any model must clear.
  """

  def step_fn(batch):
    ratings = tf.cast(batch[schema.RATING], tf.float64)
    error = tf.cast(clipped_prediction(model, batch, low, high), tf.float64) - ratings
    return tf.stack([tf.reduce_sum(tf.square(error)), tf.reduce_sum(tf.abs(error)),
                     tf.cast(tf.size(error), tf.float64),
                     tf.reduce_sum(tf.square(baseline - ratings))])

  @tf.function
  def sums(dataset):
    total = tf.zeros([4], tf.float64)
    for batch in dataset:
      total += strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step_fn, args=(batch,)),
                               axis=None)
    return total

  def evaluate(dataset) -> Dict[str, float]:
    squared, absolute, count, baseline_squared = (float(x) for x in sums(dataset).numpy())
    if count == 0:
      raise ValueError("the evaluation data is empty")
    return {"rmse": float(np.sqrt(squared / count)), "mae": absolute / count, "count": int(count),
            "baseline_rmse": float(np.sqrt(baseline_squared / count))}

  return evaluate


def weights_checksum(model: keras.Model) -> str:
  """sha256 of every weight's bytes, in order: equal exactly when the weights are identical."""
  digest = hashlib.sha256()
  for variable in model.weights:
    digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(variable)).tobytes())
  return digest.hexdigest()


def _distributed(strategy, pattern, config, batch_size, training):
  return strategy.distribute_datasets_from_function(
      lambda ctx: pipeline.make_dataset(pattern, batch_size, training, ctx, config.seed,
                                        config.shuffle_buffer_blocks))


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_and_evaluate(config: TrainConfig,
                       strategy: Optional[tf.distribute.Strategy] = None) -> Dict[str, object]:
  """Trains `config.model` on `config.data_dir`, evaluates each epoch, exports and reports.

  Re-running with the same `model_dir` resumes from the latest checkpoint (epoch granularity).

  Args:
    config: the training configuration; validated here.
    strategy: the distribution strategy; the default strategy when None.

  Returns:
    The metrics also written to `<model_dir>/metrics.json`.

  Raises:
    ConfigError / ValueError: a bad flag value or data directory, before any training.
  """
  config.validate()
  strategy = strategy or tf.distribute.get_strategy()
  replicas = strategy.num_replicas_in_sync
  config.check_replicas(replicas)
  metadata = preparation.load_metadata(config.data_dir)
  if config.batch_size > metadata.num_train:
    raise ConfigError(f"--batch_size={config.batch_size} is larger than the "
                      f"{metadata.num_train} training examples in --data_dir={config.data_dir}")
  steps_per_epoch = metadata.num_train // config.batch_size
  train_pattern = fileio.join(config.data_dir, schema.shard_pattern(schema.TRAIN))
  eval_pattern = fileio.join(config.data_dir, schema.shard_pattern(schema.EVAL))
  for pattern in (train_pattern, eval_pattern):  # fail now, not in the middle of tracing
    try:
      pipeline.list_shards(pattern)
    except ValueError as e:
      raise ConfigError(f"--data_dir={config.data_dir!r}: {e}") from e
  keras.utils.set_random_seed(config.seed)

  with strategy.scope():
    model = models.build_model(config.model, metadata.num_users, metadata.num_items,
                               config.embedding_dim, config.hidden_units,
                               metadata.train_rating_mean)
    optimizer = keras.optimizers.Adam(learning_rate=config.learning_rate)
    optimizer.build(model.trainable_variables)
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch)
  # Every task saves (saving may run collectives); only the chief's files are kept.
  checkpoint_dir = config.resolved_checkpoint_dir
  task_checkpoint_dir = distribute.write_dir(checkpoint_dir, strategy)
  manager = tf.train.CheckpointManager(checkpoint, task_checkpoint_dir,
                                       max_to_keep=config.max_checkpoints)
  latest = tf.train.latest_checkpoint(checkpoint_dir)  # every task resumes from the chief's
  if latest:
    checkpoint.restore(latest).assert_existing_objects_matched()
    logging.info("Resumed from %s (epoch %d of %d done)", latest, int(epoch.numpy()),
                 config.epochs)

  train_loop = make_train_loop(model, optimizer, strategy, config.batch_size)
  evaluate = make_evaluate(model, strategy, metadata.rating_min, metadata.rating_max,
                           metadata.train_rating_mean)
  train_iterator = iter(_distributed(strategy, train_pattern, config, config.batch_size, True))
  eval_data = _distributed(strategy, eval_pattern, config, config.eval_batch_for(replicas),
                           False)
  chief = distribute.is_chief(strategy)
  writer = (tf.summary.create_file_writer(config.resolved_log_dir) if chief
            else tf.summary.create_noop_writer())

  logging.info("Training %s: %d epochs x %d steps of %d examples on %d replica(s), task %s",
               config.model, config.epochs, steps_per_epoch, config.batch_size, replicas,
               distribute.task_role(strategy))
  train_seconds = 0.0
  trained_steps = 0
  eval_metrics: Dict[str, float] = {}
  first_epoch = int(epoch.numpy())
  for e in range(first_epoch, config.epochs):
    epoch_start = time.time()
    done = 0
    loss_sum = 0.0
    while done < steps_per_epoch:
      n = min(config.log_every_steps, steps_per_epoch - done)
      loss = float(train_loop(train_iterator, tf.constant(n)))
      done += n
      loss_sum += loss * n
      elapsed = time.time() - epoch_start
      rate = done * config.batch_size / elapsed
      remaining = (steps_per_epoch - done + (config.epochs - e - 1) * steps_per_epoch)
      logging.info("epoch %d/%d step %d/%d loss %.4f %.0f examples/s ETA %s", e + 1,
                   config.epochs, done, steps_per_epoch, loss, rate,
                   _format_eta(remaining * config.batch_size / rate))
    epoch_seconds = time.time() - epoch_start
    train_seconds += epoch_seconds
    trained_steps += steps_per_epoch
    eval_metrics = evaluate(eval_data)
    epoch.assign(e + 1)
    manager.save(checkpoint_number=e + 1)
    examples_per_sec = steps_per_epoch * config.batch_size / epoch_seconds
    logging.info("epoch %d/%d train loss %.4f eval rmse %.4f mae %.4f on %d examples "
                 "(global mean predictor: rmse %.4f); %.0f train examples/s", e + 1,
                 config.epochs, loss_sum / steps_per_epoch, eval_metrics["rmse"],
                 eval_metrics["mae"], eval_metrics["count"], eval_metrics["baseline_rmse"],
                 examples_per_sec)
    with writer.as_default(step=e + 1):
      tf.summary.scalar("train/loss", loss_sum / steps_per_epoch)
      tf.summary.scalar("train/examples_per_sec", examples_per_sec)
      tf.summary.scalar("eval/rmse", eval_metrics["rmse"])
      tf.summary.scalar("eval/mae", eval_metrics["mae"])
    writer.flush()
  if not eval_metrics:  # every epoch was done before this run: report the restored model
    eval_metrics = evaluate(eval_data)

  export_dir = config.resolved_export_dir
  task_export_dir = distribute.write_dir(export_dir, strategy)
  export.export_saved_model(model, task_export_dir, config.data_dir, metadata)
  distribute.remove_write_dir(task_export_dir, strategy)
  distribute.remove_write_dir(task_checkpoint_dir, strategy)
  if not chief:
    logging.info("Task %s is not the chief: its checkpoints and export went to temporary "
                 "directories, now removed", distribute.task_role(strategy))
  metrics = {
      "model": config.model,
      "eval_rmse": eval_metrics["rmse"],
      "eval_mae": eval_metrics["mae"],
      "eval_examples": eval_metrics["count"],
      "eval_rmse_global_mean_baseline": eval_metrics["baseline_rmse"],
      "epochs": int(epoch.numpy()),
      "train_examples_per_sec": (trained_steps * config.batch_size / train_seconds
                                 if trained_steps else None),
      "replicas": replicas,
      "global_batch_size": config.batch_size,
      "export_dir": export_dir,
      "task": distribute.task_role(strategy),
      "weights_sha256": weights_checksum(model),
  }
  if chief:
    fileio.write_text_atomic(fileio.join(config.model_dir, METRICS_FILE),
                             json.dumps(metrics, indent=2, sort_keys=True) + "\n")
  logging.info("Final eval rmse %.4f mae %.4f; exported to %s", metrics["eval_rmse"],
               metrics["eval_mae"], export_dir)
  return metrics
