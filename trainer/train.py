"""Training and evaluation: one library function, `train_and_evaluate`, under any strategy.

A custom loop (`strategy.run` inside a `tf.function`), not `model.fit`: Keras 3's `fit` fails
under MultiWorkerMirroredStrategy (keras-team/keras#20585), and a custom loop is what exact
resume and sparse embedding updates build on. Several steps run inside one `tf.function` call
to keep Python out of the hot loop.

Objectives: explicit, squared error on ratings; implicit, binary cross-entropy of the model's
logit against 1 for observed pairs and 0 for sampled negatives (drawn inside tf.data, new every
epoch). Both add the models' L2 penalty on the embedding rows of the batch.

Loss scaling: each replica averages its per-example losses over the *global* batch
(`tf.nn.compute_average_loss`) and the optimizer sums gradients across replicas, so N replicas
take the same step as one device on the same global batch.

Each epoch ends with evaluation (RMSE/MAE, or HR@K/NDCG@K under the sampled and full
protocols), a checkpoint, TensorBoard scalars, and a copy of the best checkpoint by the primary
metric; early stopping at a target value or after `early_stopping_patience` epochs without
improvement. The export is of the best model.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from typing import Callable, Dict, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import (distribute, export, fileio, malloc, metrics as ranking, models, optimizers,
                     schema)
from trainer.config import ConfigError, TrainConfig
from trainer.data import pipeline, preparation

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
_LOWER_IS_BETTER = ("rmse", "mae")


def clipped_prediction(model: keras.Model, batch: Dict[str, tf.Tensor], low: float,
                       high: float) -> tf.Tensor:
  """The served rating: the model's output clipped to the data's rating range. Shape [b]."""
  return tf.clip_by_value(tf.cast(model(batch, training=False), tf.float32), low, high)


def make_train_loop(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                    strategy: tf.distribute.Strategy, global_batch_size: int,
                    task: str = "explicit",
                    jit_compile: bool = False) -> Callable:
  """Returns `train_loop(iterator, num_steps, flag) -> (mean loss, flag)`.

  It runs `num_steps` steps; `flag` (an int32 scalar, 0 or 1) comes back as 1 when it is 1 on
  any replica of any task.

  Args:
    global_batch_size: examples per step across replicas (positives and negatives).
    task: explicit (squared error on `rating`) or implicit (cross-entropy on `label`).
    jit_compile: compile the forward and backward pass with XLA (the optimizer update, which
      may hold cross-replica reductions, stays outside).
  """
  scales_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

  def loss_and_gradients(batch):
    with tf.GradientTape() as tape:
      outputs, penalty = model.scores_and_penalty(batch, training=True)  # penalty: float32
      outputs = tf.cast(outputs, tf.float32)  # [b]
      if task == "implicit":
        per_example = tf.nn.sigmoid_cross_entropy_with_logits(batch[schema.LABEL], outputs)
      else:
        per_example = tf.square(batch[schema.RATING] - outputs)
      per_example += penalty
      loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
      scaled = optimizer.scale_loss(loss) if scales_loss else loss
    return loss, tape.gradient(scaled, model.trainable_variables)

  if jit_compile:
    loss_and_gradients = tf.function(loss_and_gradients, jit_compile=True)

  def step_fn(batch):
    loss, gradients = loss_and_gradients(batch)
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    return loss

  @tf.function
  def train_loop(iterator, num_steps, flag):
    total = tf.constant(0.0)
    for _ in tf.range(num_steps):
      per_replica = strategy.run(step_fn, args=(next(iterator),))
      total += strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    # `flag` (e.g. "a checkpoint is due by the clock") raised on any task counts for every
    # task, so that all tasks take the same decision (ReduceOp has no MAX: sum, then clip).
    agreed = tf.minimum(strategy.reduce(tf.distribute.ReduceOp.SUM,
                                        strategy.run(lambda: tf.identity(flag)), axis=None), 1)
    return total / tf.cast(num_steps, tf.float32), agreed

  return train_loop


def make_evaluate(model: keras.Model, strategy: tf.distribute.Strategy, low: float,
                  high: float, baseline: float) -> Callable[[object], Dict[str, float]]:
  """Returns `evaluate(distributed_dataset) -> metrics` of explicit feedback.

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


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0)) if math.isfinite(seconds) else 0
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def build_model(config: TrainConfig, metadata: schema.Metadata) -> keras.Model:
  """The configured model for a prepared data directory's vocabularies."""
  bias = metadata.train_rating_mean if config.task == "explicit" else 0.0
  return models.build_model(config.model, metadata.num_users, metadata.num_items,
                            config.embedding_dim, config.hidden_units, bias,
                            layers=config.layers, mlp_embedding_dim=config.mlp_embedding_dim,
                            dropout=config.dropout, l2=config.l2)


def load_trained_model(model_dir: str, metadata: schema.Metadata,
                       checkpoint_dir: Optional[str] = None) -> keras.Model:
  """Rebuilds the model of a finished run from its config.json and latest checkpoint."""
  path = fileio.join(model_dir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    raise ConfigError(f"{model_dir!r} holds no {CONFIG_FILE}: not a model_dir of neumf-train")
  fields = json.loads(fileio.read_text(path))
  fields["layers"] = tuple(fields["layers"])
  config = TrainConfig(**fields)
  model = build_model(config, metadata)
  directory = checkpoint_dir or config.resolved_checkpoint_dir
  latest = tf.train.latest_checkpoint(directory)
  if latest is None:
    raise ConfigError(f"{model_dir!r}: no checkpoint in {directory}")
  tf.train.Checkpoint(model=model).restore(latest).expect_partial()
  return model


def _load_pretrained(model: keras.Model, config: TrainConfig, metadata: schema.Metadata):
  gmf = load_trained_model(config.pretrained_gmf_dir, metadata)
  mlp = load_trained_model(config.pretrained_mlp_dir, metadata)
  if not isinstance(gmf, models.GMF) or not isinstance(mlp, models.MLP):
    raise ConfigError(f"--pretrained_gmf_dir={config.pretrained_gmf_dir!r} must hold a gmf run "
                      f"and --pretrained_mlp_dir={config.pretrained_mlp_dir!r} an mlp run")
  try:
    model.load_pretrained(gmf, mlp, config.alpha)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  logging.info("NeuMF starts from GMF %s and MLP %s (alpha %.2f)", config.pretrained_gmf_dir,
               config.pretrained_mlp_dir, config.alpha)


@contextlib.contextmanager
def _precision(policy: str):
  """Sets Keras's dtype policy for the models built inside, restoring it afterwards."""
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy({"float32": "float32", "bfloat16": "mixed_bfloat16",
                                 "float16": "mixed_float16"}[policy])
  try:
    yield
  finally:
    keras.config.set_dtype_policy(previous)


# What a checkpoint's shapes and meaning depend on: a run that differs in any of these cannot
# continue from it.
_SHAPING_FIELDS = ("data_dir", "model", "task", "embedding_dim", "hidden_units", "layers",
                   "mlp_embedding_dim")


def _check_compatible(config: TrainConfig) -> bool:
  """Whether to resume from `model_dir`; refuses a run of another configuration there.

  Returns:
    False when --overwrite asks to start afresh, else True.

  Raises:
    ConfigError: `model_dir` holds checkpoints of a run whose model or data differ, naming the
      fields and both values.
  """
  path = fileio.join(config.model_dir, CONFIG_FILE)
  if config.overwrite:
    return False
  if not tf.io.gfile.exists(path) or not tf.train.latest_checkpoint(
      config.resolved_checkpoint_dir):
    return True
  previous = json.loads(fileio.read_text(path))
  current = json.loads(config.to_json())
  differ = [f"{name}={previous.get(name)!r} there, {current[name]!r} now"
            for name in _SHAPING_FIELDS if previous.get(name) != current[name]]
  if differ:
    raise ConfigError(f"--model_dir={config.model_dir!r} holds checkpoints of a different run ("
                      f"{'; '.join(differ)}): use another --model_dir, or --overwrite to "
                      "discard them")
  return True


def _primary_metric(config: TrainConfig, protocols) -> str:
  if config.target_metric:
    return config.target_metric
  if config.task == "explicit":
    return "rmse"
  return "hr_sampled" if ranking.SAMPLED in protocols else "hr_full"


def _better(metric: str, value: float, best: float) -> bool:
  if math.isnan(best):
    return True
  return value < best if metric in _LOWER_IS_BETTER else value > best


def train_and_evaluate(config: TrainConfig,
                       strategy: Optional[tf.distribute.Strategy] = None) -> Dict[str, object]:
  """Trains `config.model` on `config.data_dir`, evaluates each epoch, exports and reports.

  Re-running with the same `model_dir` resumes from the latest checkpoint, mid-epoch included:
  with the same flags it ends exactly as an uninterrupted run would (bit for bit on CPU with
  --deterministic).

  Args:
    config: the training configuration; validated here.
    strategy: the distribution strategy; the default strategy when None.

  Returns:
    The metrics also written to `<model_dir>/metrics.json`.

  Raises:
    ConfigError / ValueError: a bad flag value or data directory, before any training.
  """
  config.validate()
  malloc.keep_freed_memory()  # as preparation sets its own (the opposite) for its work
  strategy = strategy or tf.distribute.get_strategy()
  replicas = strategy.num_replicas_in_sync
  config.check_replicas(replicas)
  check_storage(config)
  metadata = preparation.load_metadata(config.data_dir)
  if config.task == "explicit" and metadata.implicit:
    raise ConfigError(f"--data_dir={config.data_dir} holds implicit feedback (no ratings): "
                      "train it with --task=implicit")
  positives_per_step = config.batch_size // config.examples_per_positive
  if positives_per_step > metadata.num_train:
    raise ConfigError(f"--batch_size={config.batch_size} is larger than the "
                      f"{metadata.num_train} training examples in --data_dir={config.data_dir}")
  steps_per_epoch = metadata.num_train // positives_per_step
  train_pattern = fileio.join(config.data_dir, schema.shard_pattern(schema.TRAIN))
  eval_pattern = fileio.join(config.data_dir, schema.shard_pattern(schema.EVAL))
  for pattern in (train_pattern, eval_pattern):  # fail now, not in the middle of tracing
    try:
      pipeline.list_shards(pattern)
    except ValueError as e:
      raise ConfigError(f"--data_dir={config.data_dir!r}: {e}") from e
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  keras.utils.set_random_seed(config.seed)
  chief = distribute.is_chief(strategy)
  resume = _check_compatible(config)
  if chief:
    if not resume and tf.io.gfile.exists(config.resolved_checkpoint_dir):
      tf.io.gfile.rmtree(config.resolved_checkpoint_dir)  # --overwrite: start afresh
    fileio.retry(lambda: (fileio.makedirs(config.model_dir), fileio.write_text_atomic(
        fileio.join(config.model_dir, CONFIG_FILE), config.to_json())),
        f"writing {CONFIG_FILE} to {config.model_dir}", config.storage_retries)

  with _precision(config.mixed_precision):
    with strategy.scope():
      model = build_model(config, metadata)
      optimizer = optimizers.make_optimizer(
          config.optimizer, config.learning_rate, config.warmup_steps,
          steps_per_epoch * config.epochs, config.decay,
          loss_scale=config.mixed_precision == "float16")
      optimizer.build(model.trainable_variables)
      counters = _Counters(
          epoch=tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch"),
          step=tf.Variable(0, dtype=tf.int64, trainable=False, name="step"),
          epoch_loss=tf.Variable(0.0, dtype=tf.float64, trainable=False, name="epoch_loss"),
          best=tf.Variable(float("nan"), dtype=tf.float64, trainable=False, name="best"),
          since_best=tf.Variable(0, dtype=tf.int64, trainable=False, name="since_best"))
    return _run(config, strategy, metadata, model, optimizer, counters, steps_per_epoch,
                positives_per_step, train_pattern, eval_pattern, chief)


def check_storage(config: TrainConfig) -> None:
  """Fails fast when a gs:// location of the run is missing or not usable (see fileio)."""
  for flag, path, write in (("data_dir", config.data_dir, False),
                            ("model_dir", config.model_dir, True),
                            ("export_dir", config.export_dir, True),
                            ("checkpoint_dir", config.checkpoint_dir, True),
                            ("tensorboard_dir", config.log_dir, True),
                            ("pretrained_gmf_dir", config.pretrained_gmf_dir, False),
                            ("pretrained_mlp_dir", config.pretrained_mlp_dir, False)):
    if path:
      fileio.check_gcs_access(path, flag, write)


@dataclasses.dataclass
class _Counters:
  """Training state beside the model and optimizer, saved in every checkpoint."""
  epoch: tf.Variable  # epochs finished (trained and evaluated)
  step: tf.Variable  # training steps taken, over all epochs
  epoch_loss: tf.Variable  # sum of the current epoch's step losses so far
  best: tf.Variable  # best value of the primary metric
  since_best: tf.Variable  # epochs since it improved


def _seed_states(model: keras.Model) -> list:
  """The states of the model's random generators (dropout): a resumed run draws the same
  masks as an uninterrupted one. Keras tracks them outside the weights a checkpoint saves."""
  return [v.value for v in model.variables if "seed_generator_state" in v.path]


def _run(config, strategy, metadata, model, optimizer, counters, steps_per_epoch,
         positives_per_step, train_pattern, eval_pattern, chief):
  replicas = strategy.num_replicas_in_sync
  epoch, best_value, since_best = counters.epoch, counters.best, counters.since_best
  checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                   random_states=_seed_states(model),
                                   **vars(counters))  # (asdict would copy the variables)
  # Every task saves (saving may run collectives); only the chief's files are kept.
  checkpoint_dir = config.resolved_checkpoint_dir
  best_dir = fileio.join(checkpoint_dir, "best")
  task_checkpoint_dir = distribute.write_dir(checkpoint_dir, strategy)
  task_best_dir = distribute.write_dir(best_dir, strategy)
  manager = tf.train.CheckpointManager(checkpoint, task_checkpoint_dir,
                                       max_to_keep=config.max_checkpoints)
  best_manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), task_best_dir,
                                            max_to_keep=1)
  latest = None if config.overwrite else tf.train.latest_checkpoint(checkpoint_dir)
  if latest:
    checkpoint.restore(latest).assert_existing_objects_matched()
    logging.info("Resumed from %s (epoch %d of %d done, step %d)", latest,
                 int(epoch.numpy()), config.epochs, int(counters.step.numpy()))
  elif config.pretrained_gmf_dir:
    _load_pretrained(model, config, metadata)

  positives = preparation.load_npz(fileio.join(config.data_dir,
                                               preparation.TRAIN_POSITIVES_FILE))
  add_negatives = None
  if config.task == "implicit":
    keys = None
    if config.exclude_positives:
      keys = preparation.pair_keys(positives, metadata.num_items)
    add_negatives = pipeline.negative_sampler(metadata.num_items, config.num_negatives,
                                              config.seed, keys)
  start_step = int(counters.step.numpy())
  if start_step and len(metadata.train_shard_examples) != metadata.num_shards:
    raise ConfigError(f"--data_dir={config.data_dir} was prepared by an older version (no "
                      "per-shard example counts): prepare it again to resume mid-run")
  train_data = strategy.distribute_datasets_from_function(
      lambda ctx: pipeline.make_dataset(train_pattern, positives_per_step, True, ctx,
                                        config.seed, config.shuffle_buffer_blocks,
                                        add_negatives, start_step,
                                        metadata.train_shard_examples))
  train_iterator = iter(train_data)
  train_loop = make_train_loop(model, optimizer, strategy, config.batch_size, config.task,
                               config.jit_compile)

  evaluators = {}
  if config.task == "explicit":
    explicit = make_evaluate(model, strategy, metadata.rating_min, metadata.rating_max,
                             metadata.train_rating_mean)
    eval_data = strategy.distribute_datasets_from_function(
        lambda ctx: pipeline.make_dataset(eval_pattern, config.eval_batch_for(replicas), False,
                                          ctx))
    evaluators["explicit"] = lambda: explicit(eval_data)
  else:
    protocols = ranking.make_ranking_evaluation(
        model, strategy, config.top_k, metadata.num_items, positives["indptr"],
        positives["indices"])
    negatives_path = fileio.join(config.data_dir, preparation.EVAL_NEGATIVES_FILE)
    if tf.io.gfile.exists(negatives_path):
      sampled = preparation.load_npz(negatives_path)
      sampled_data = strategy.distribute_datasets_from_function(
          lambda ctx: ranking.sampled_dataset(sampled["users"], sampled["positives"],
                                              sampled["negatives"],
                                              config.eval_batch_for(replicas), ctx))
      evaluators[ranking.SAMPLED] = lambda: protocols[ranking.SAMPLED](sampled_data)
    full_batch = ranking.full_batch_size(metadata.num_items, replicas)
    full_data = strategy.distribute_datasets_from_function(
        lambda ctx: pipeline.make_dataset(eval_pattern, full_batch, False, ctx))
    evaluators[ranking.FULL] = lambda: protocols[ranking.FULL](full_data)

  def evaluate() -> Dict[str, float]:
    out = {}
    for protocol, run in evaluators.items():
      result = run()
      if protocol == "explicit":
        out.update(result)
      else:
        out.update({f"hr_{protocol}": result["hr"], f"ndcg_{protocol}": result["ndcg"],
                    f"count_{protocol}": result["count"]})
    return out

  primary = _primary_metric(config, evaluators)
  if primary not in ("rmse", "mae") and primary.split("_")[1] not in evaluators:
    raise ConfigError(f"--target_metric={primary} needs eval negatives: prepare with "
                      "--split=leave_one_out --eval_negatives=N")
  writer = (tf.summary.create_file_writer(config.resolved_log_dir) if chief
            else tf.summary.create_noop_writer())
  logging.info("Training %s (%s): %d epochs x %d steps of %d examples on %d replica(s), "
               "task %s", config.model, config.task, config.epochs, steps_per_epoch,
               config.batch_size, replicas, distribute.task_role(strategy))
  def save(number: int) -> None:
    fileio.retry(lambda: manager.save(checkpoint_number=number),
                 f"writing checkpoint {number} to {task_checkpoint_dir}", config.storage_retries)

  every_steps, every_secs = config.checkpoint_every_steps, config.checkpoint_every_secs
  last_save = time.time()
  train_seconds, trained_steps = 0.0, 0
  eval_metrics: Dict[str, float] = {}
  stopped = None
  global_step = start_step
  for e in range(int(epoch.numpy()), config.epochs):
    epoch_start = time.time()
    # Non-zero when resuming mid-epoch: the checkpoint holds this epoch's progress.
    done = global_step - e * steps_per_epoch
    resumed_at, loss_sum = done, float(counters.epoch_loss.numpy())
    while done < steps_per_epoch:
      n = min(config.log_every_steps, steps_per_epoch - done)
      if every_steps:
        n = min(n, every_steps - global_step % every_steps)
      due_by_clock = bool(every_secs) and time.time() - last_save >= every_secs
      loss, due = train_loop(train_iterator, tf.constant(n), tf.constant(int(due_by_clock)))
      loss = float(loss)
      done += n
      global_step += n
      loss_sum += loss * n
      counters.step.assign(global_step)
      counters.epoch_loss.assign(loss_sum)
      rate = (done - resumed_at) * config.batch_size / (time.time() - epoch_start)
      remaining = steps_per_epoch - done + (config.epochs - e - 1) * steps_per_epoch
      logging.info("epoch %d/%d step %d/%d loss %.4f %.0f examples/s ETA %s", e + 1,
                   config.epochs, done, steps_per_epoch, loss, rate,
                   _format_eta(remaining * config.batch_size / rate))
      # Mid-epoch checkpoints (the epoch's end saves after evaluation, just below).
      if done < steps_per_epoch and (
          (every_steps and global_step % every_steps == 0) or int(due)):
        save(global_step)
        last_save = time.time()
        logging.info("Saved checkpoint %d (epoch %d, step %d of %d)", global_step, e + 1, done,
                     steps_per_epoch)
    epoch_seconds = time.time() - epoch_start
    train_seconds += epoch_seconds
    trained_steps += steps_per_epoch - resumed_at
    eval_metrics = evaluate()
    value = eval_metrics[primary]
    improved = _better(primary, value, float(best_value.numpy()))
    if improved:
      best_value.assign(value)
      since_best.assign(0)
      fileio.retry(lambda: best_manager.save(checkpoint_number=e + 1),
                   f"writing the best checkpoint to {task_best_dir}", config.storage_retries)
    else:
      since_best.assign_add(1)
    epoch.assign(e + 1)
    counters.epoch_loss.assign(0.0)
    save(global_step)
    last_save = time.time()
    examples_per_sec = (steps_per_epoch - resumed_at) * config.batch_size / epoch_seconds
    learning_rate = float(optimizer.learning_rate.numpy()
                          if hasattr(optimizer.learning_rate, "numpy")
                          else optimizer.learning_rate)
    shown = " ".join(f"{k} {v:.4f}" for k, v in sorted(eval_metrics.items())
                     if not k.startswith("count"))
    logging.info("epoch %d/%d train loss %.4f eval %s%s; %.0f train examples/s", e + 1,
                 config.epochs, loss_sum / steps_per_epoch, shown,
                 " (best)" if improved else "", examples_per_sec)
    with writer.as_default(step=e + 1):
      tf.summary.scalar("train/loss", loss_sum / steps_per_epoch)
      tf.summary.scalar("train/examples_per_sec", examples_per_sec)
      tf.summary.scalar("train/learning_rate", learning_rate)
      for name, v in eval_metrics.items():
        if not name.startswith("count"):
          tf.summary.scalar(f"eval/{name}", v)
    try:
      writer.flush()
    except tf.errors.OpError as err:  # TensorBoard is not worth failing a run for
      logging.warning("Could not write TensorBoard summaries to %s: %s", config.resolved_log_dir,
                      str(err).splitlines()[0])
    if config.target_value is not None and (
        value <= config.target_value if primary in _LOWER_IS_BETTER
        else value >= config.target_value):
      stopped = f"{primary} {value:.4f} reached --target_value={config.target_value}"
    elif config.early_stopping_patience and int(since_best.numpy()) >= \
        config.early_stopping_patience:
      stopped = (f"no improvement of {primary} for {config.early_stopping_patience} "
                 "epoch(s)")
    if stopped:
      logging.info("Stopping early after epoch %d: %s", e + 1, stopped)
      break

  # Each task restores its own copy of the best checkpoint: identical weights (the tasks train
  # in lockstep), and no task reads a file another task may still be writing.
  best_checkpoint = tf.train.latest_checkpoint(task_best_dir)
  if best_checkpoint:  # serve and report the best epoch's model
    tf.train.Checkpoint(model=model).restore(best_checkpoint).expect_partial()
    logging.info("Best %s %.4f: %s", primary, float(best_value.numpy()), best_checkpoint)
  eval_metrics = evaluate()

  export_dir = config.resolved_export_dir
  task_export_dir = distribute.write_dir(export_dir, strategy)
  fileio.retry(lambda: export.export_saved_model(model, task_export_dir, config.data_dir,
                                                 metadata, config.task),
               f"exporting the SavedModel to {task_export_dir}", config.storage_retries)
  for directory in (task_export_dir, task_best_dir, task_checkpoint_dir):
    distribute.remove_write_dir(directory, strategy)
  if not chief:
    logging.info("Task %s is not the chief: its checkpoints and export went to temporary "
                 "directories, now removed", distribute.task_role(strategy))
  result = {
      "model": config.model,
      "task": config.task,
      "epochs": int(epoch.numpy()),
      "best_epoch": int(best_checkpoint.rsplit("-", 1)[1]) if best_checkpoint else None,
      "primary_metric": primary,
      "stopped_early": stopped,
      "train_examples_per_sec": (trained_steps * config.batch_size / train_seconds
                                 if trained_steps else None),
      "replicas": replicas,
      "global_batch_size": config.batch_size,
      "export_dir": export_dir,
      "task_role": distribute.task_role(strategy),
      "weights_sha256": weights_checksum(model),
  }
  if config.task == "explicit":
    result.update(eval_rmse=eval_metrics["rmse"], eval_mae=eval_metrics["mae"],
                  eval_examples=eval_metrics["count"],
                  eval_rmse_global_mean_baseline=eval_metrics["baseline_rmse"])
  else:
    result["top_k"] = config.top_k
    for name, v in eval_metrics.items():
      result[f"eval_{name}"] = v
  if chief:
    fileio.retry(lambda: fileio.write_text_atomic(
        fileio.join(config.model_dir, METRICS_FILE),
        json.dumps(result, indent=2, sort_keys=True) + "\n"),
        f"writing {METRICS_FILE} to {config.model_dir}", config.storage_retries)
  logging.info("Final eval %s; exported to %s",
               " ".join(f"{k} {v:.4f}" for k, v in sorted(eval_metrics.items())
                        if not k.startswith("count")), export_dir)
  return result
