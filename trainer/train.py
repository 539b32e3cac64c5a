"""Training and evaluation: one library function, `train_and_evaluate`, under any strategy.

A custom loop (`strategy.run` inside a `tf.function`), not `model.fit`: Keras 3's `fit` fails
under MultiWorkerMirroredStrategy (keras-team/keras#20585), and a custom loop is what exact
resume and sparse embedding updates build on. Several steps run inside one `tf.function` call
to keep Python out of the hot loop.

The kind of feedback is an objective (`trainer.objectives`): it owns the loss, the negatives,
the evaluators, the primary metric and what the export serves; this module only wires. Each
epoch ends with evaluation, a checkpoint (`trainer.checkpointer`), TensorBoard scalars, and a
copy of the best checkpoint by the primary metric; early stopping at a target value or after
`early_stopping_patience` epochs without improvement. The export is of the best model.
"""

import contextlib
import dataclasses
import functools
import time
from typing import Callable, Dict, Optional

import keras
import tensorflow as tf
from absl import logging

from trainer import (distribute, evaluation, export, fileio, loop, models, objectives,
                     optimizers, parameter_server, report, run_dir, strict_json, warm_start)
from trainer.checkpointer import BestTracker, Checkpointer, TrainingState, best_epoch
from trainer.config import TrainConfig
from trainer.data import artifacts
from trainer.errors import ConfigError, LostPeerError, StorageError
from trainer.phases import Phases


def _load_pretrained(model: keras.Model, config: TrainConfig,
                     data: artifacts.PreparedData) -> None:
  gmf = run_dir.load_trained_model(config.pretrained_gmf_dir, data)
  mlp = run_dir.load_trained_model(config.pretrained_mlp_dir, data)
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


# ----------------------------------------------------------------------------- the run


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
    ConfigError: a bad flag value or data directory, before any training.
    StorageError: storage failed after retries (or was unreachable when the run failed).
    LostPeerError: another task of the cluster stopped answering.
  """
  config.validate()
  strategy = strategy or tf.distribute.get_strategy()
  if config.batch_size is None:
    config = config.for_replicas(strategy.num_replicas_in_sync)
    logging.info("--batch_size not given: %d examples per global step", config.batch_size)
  if parameter_server.is_parameter_server(strategy) and (
      config.jit_compile or config.mixed_precision == "float16"):
    raise ConfigError("--strategy=parameter_server does not support "
                      f"{'--jit_compile' if config.jit_compile else '--mixed_precision=float16'}"
                      " (the coordinated step is neither compiled nor loss-scaled)")
  if config.input_service and not parameter_server.is_parameter_server(strategy):
    raise ConfigError("--input_service needs a parameter-server cluster (TF_CONFIG with ps "
                      "tasks): without one each worker already reads only its own files")
  objective = objectives.for_config(config)
  objective.check_replicas(strategy.num_replicas_in_sync)
  run_dir.check_storage(config)
  data = _open_data(config, objective)
  warm = _warm_start_source(config, data)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  keras.utils.set_random_seed(config.seed)
  run_dir.prepare_model_dir(config, strategy)
  with _failures_classified(config, strategy), _precision(config.mixed_precision):
    with strategy.scope():
      model = models.for_config(config, data)
      optimizer = optimizers.make_optimizer(
          config.optimizer, config.learning_rate, config.warmup_steps,
          loop.steps_per_epoch(config, data) * config.epochs, config.decay,
          loss_scale=config.mixed_precision == "float16")
      coordinated = parameter_server.is_parameter_server(strategy)
      optimizer.build(parameter_server.trainable_leaves(model.trainable_variables)
                      if coordinated else model.trainable_variables)
      state = TrainingState.create(
          parameter_server.num_workers(strategy) if coordinated else 0,
          served=config.input_service)
    return _run(config, strategy, objective, data, model, optimizer, state, warm)


def _warm_start_source(config: TrainConfig,
                       data: artifacts.PreparedData) -> Optional[warm_start.Source]:
  """With --warm_start_from, what it copies, checked before any work; None without it, or
  when the run resumes from its own checkpoints (which already hold the warm start)."""
  if not config.warm_start_from or (
      not config.overwrite and tf.train.latest_checkpoint(config.resolved_checkpoint_dir)):
    return None
  return warm_start.check(config, data)


def _open_data(config: TrainConfig, objective: objectives.Objective) -> artifacts.PreparedData:
  """The prepared data, checked against the configuration before any work."""
  data = artifacts.PreparedData(config.data_dir)
  objective.check_data(data)
  positives_per_step = config.batch_size // objective.examples_per_positive
  if positives_per_step > data.metadata.num_train:
    raise ConfigError(f"--batch_size={config.batch_size} is larger than the "
                      f"{data.metadata.num_train} training examples in "
                      f"--data_dir={config.data_dir}")
  data.check_shards()
  return data


def _run(config: TrainConfig, strategy: tf.distribute.Strategy,
         objective: objectives.Objective, data: artifacts.PreparedData, model: keras.Model,
         optimizer: keras.optimizers.Optimizer, state: TrainingState,
         warm: Optional[warm_start.Source] = None) -> Dict[str, object]:
  """Wiring: restore, train and evaluate epoch by epoch, export the best model, report."""
  checkpointer = Checkpointer(config, strategy, model, optimizer, state)
  warmed = _restore_or_initialise(config, checkpointer, model, optimizer, data, state, warm)
  coordinated = parameter_server.is_parameter_server(strategy)
  runner = (loop.ServedEpochRunner if config.input_service else
            loop.CoordinatedEpochRunner if coordinated else loop.EpochRunner)(
      config, strategy, objective, data, model, optimizer, state, checkpointer)
  # Under a parameter server the chief evaluates by itself, reading rows from the ps tasks.
  eval_strategy = tf.distribute.get_strategy() if coordinated else strategy
  evaluators = objective.evaluators(model, eval_strategy, data)
  evaluate = functools.partial(evaluation.evaluate_all, evaluators)
  tracker = BestTracker(config, objective, objective.primary_metric(evaluators), state,
                        checkpointer)
  chief = distribute.is_chief(strategy)
  board = report.EpochBoard(config, optimizer, chief)
  history = report.EpochLog.resume(config.model_dir, chief, int(state.epoch.numpy()))
  logging.info("Training %s (%s): %d epochs x %d steps of %d examples on %d replica(s), "
               "task %s", config.model, config.task, config.epochs, runner.steps_per_epoch,
               config.batch_size, strategy.num_replicas_in_sync, distribute.task_role(strategy))
  phases = Phases()
  with phases.phase("train", "Training, each epoch evaluated", announce=False):
    progress = _train_epochs(config, state, runner, evaluate, tracker, board, history)
  # Serve and report the best epoch's model (or, --nokeep_best, the last one's).
  best = (checkpointer.restore_best(int(state.epoch.numpy())) if config.keep_best else None)
  if best:
    logging.info("Best %s %.4f: %s", tracker.metric, float(state.best.numpy()), best)
  with phases.phase("final_evaluation", "Final evaluation and baselines"):
    final = {**_served_metrics(best, state, progress, evaluate),
             **objective.baselines(eval_strategy, data)}
  with phases.phase("export", f"Exporting the SavedModel to {config.resolved_export_dir}"):
    _export(config, strategy, objective, data, model)
  checkpointer.clean_up()
  if not distribute.is_chief(strategy):
    logging.info("Task %s is not the chief: its checkpoints and export went to temporary "
                 "directories, now removed", distribute.task_role(strategy))
  result = summarize(config, strategy, objective, state, model, progress,
                     best_epoch(best), tracker.metric, final)
  result.update(_time_to_target(config, objective, tracker.metric, history))
  result.update(phase_seconds=phases.seconds, phase_peak_rss_mb=phases.peak_rss_mb)
  result.update(runner.report())
  if warmed:
    result["warm_start"] = warmed
  if chief:
    result["report"] = fileio.retry(
        lambda: report.write_report(history, config.model_dir, _report_title(config, result),
                                    tracker.metric, config.target_value),
        f"writing {report.REPORT_FILE} to {config.model_dir}", config.storage_retries)
    fileio.retry(lambda: fileio.write_text_atomic(
        fileio.join(config.model_dir, run_dir.METRICS_FILE),
        strict_json.dumps(result, indent=2, sort_keys=True) + "\n"),
        f"writing {run_dir.METRICS_FILE} to {config.model_dir}", config.storage_retries)
  logging.info("Final eval %s; exported to %s", report.shown(final), config.resolved_export_dir)
  return result


def _time_to_target(config: TrainConfig, objective: objectives.Objective, metric: str,
                    history: report.EpochLog) -> Dict[str, object]:
  """With --target_value: the first epoch that reached it and the training and evaluation
  time it took (summed over every process that trained those epochs), or None for both."""
  if config.target_value is None:
    return {}
  first = history.first_reaching(metric,
                                 lambda v: objective.reached(metric, v, config.target_value))
  return {"target_metric": metric, "target_value": config.target_value,
          "target_reached_epoch": first["epoch"] if first else None,
          "time_to_target_seconds": first["elapsed_seconds"] if first else None}


def _report_title(config: TrainConfig, result: Dict[str, object]) -> str:
  return (f"{config.model} ({config.task}), batch {config.batch_size}, "
          f"{result['replicas']} replica(s): best epoch {result['best_epoch']}")


def _restore_or_initialise(config: TrainConfig, checkpointer: Checkpointer, model: keras.Model,
                           optimizer: keras.optimizers.Optimizer, data: artifacts.PreparedData,
                           state: TrainingState, warm: Optional[warm_start.Source]
                           ) -> Optional[Dict[str, object]]:
  """Resumes from the latest checkpoint, or warm-starts (returning what it copied), or
  starts NeuMF from pretrained GMF and MLP runs."""
  latest = checkpointer.restore_latest()
  warmed = None
  if latest:
    logging.info("Resumed from %s (epoch %d of %d done, step %d)", latest,
                 int(state.epoch.numpy()), config.epochs, int(state.step.numpy()))
  elif warm is not None:
    warmed = warm_start.apply(warm, data, model, optimizer)
  elif config.pretrained_gmf_dir:
    _load_pretrained(model, config, data)
  if int(state.step.numpy()) and (len(data.metadata.train_shard_examples)
                                  != data.metadata.num_shards):
    raise ConfigError(f"--data_dir={config.data_dir} was prepared by an older version (no "
                      "per-shard example counts): prepare it again to resume mid-run")
  return warmed


@dataclasses.dataclass
class Progress:
  """What the epochs of this process did (a resumed run counts only its own steps)."""

  train_seconds: float = 0.0
  trained_steps: int = 0
  stopped: Optional[str] = None  # why training stopped early, or None
  last_epoch: Optional[int] = None  # the last epoch this process trained and evaluated
  last_eval: Optional[Dict[str, float]] = None  # its evaluation


def _served_metrics(best: Optional[str], state: TrainingState, progress: "Progress",
                    evaluate: Callable[[], Dict[str, float]]) -> Dict[str, float]:
  """The served model's metrics: the last epoch's evaluation when that epoch (its best, or
  --nokeep_best) is served and this process evaluated it (the same weights give the same
  metrics; at 138K users x 27K items the full protocol costs a third of an epoch), else
  `evaluate()`."""
  served = best_epoch(best) if best else int(state.epoch.numpy())
  if progress.last_epoch == served and progress.last_eval is not None:
    return progress.last_eval
  return evaluate()


def _train_epochs(config: TrainConfig, state: TrainingState, runner: loop.EpochRunner,
                  evaluate: Callable[[], Dict[str, float]], tracker: BestTracker,
                  board: report.EpochBoard, history: report.EpochLog) -> Progress:
  """Trains the remaining epochs: each is trained, evaluated, checkpointed and logged."""
  progress = Progress()
  for e in range(int(state.epoch.numpy()), config.epochs):
    started = time.time()
    stats = runner.run(e)
    progress.train_seconds += stats.seconds
    progress.trained_steps += stats.steps
    eval_metrics = evaluate()
    runner.guard.check_metrics(e + 1, eval_metrics)
    runner.guard.check_weights(e + 1, int(state.step.numpy()))
    improved = tracker.update(e + 1, eval_metrics)
    state.epoch.assign(e + 1)
    state.epoch_loss.assign(0.0)
    runner.checkpointer.save(int(state.step.numpy()))
    board.write(e + 1, stats, eval_metrics, improved)
    history.add(e + 1, stats.loss, stats.examples_per_sec, time.time() - started, eval_metrics)
    fileio.retry(history.save, f"writing {report.HISTORY_FILE} to {config.model_dir}",
                 config.storage_retries)
    progress.last_epoch, progress.last_eval = e + 1, eval_metrics
    progress.stopped = tracker.stop_reason(eval_metrics)
    if progress.stopped:
      logging.info("Stopping early after epoch %d: %s", e + 1, progress.stopped)
      break
  return progress


def _export(config: TrainConfig, strategy: tf.distribute.Strategy,
            objective: objectives.Objective, data: artifacts.PreparedData,
            model: keras.Model) -> None:
  """Exports the SavedModel; a non-chief task exports to a temporary directory it removes."""
  task_export_dir = distribute.write_dir(config.resolved_export_dir, strategy)
  fileio.retry(lambda: export.export_saved_model(model, task_export_dir, data, objective),
               f"exporting the SavedModel to {task_export_dir}", config.storage_retries)
  distribute.remove_write_dir(task_export_dir, strategy)


def summarize(config: TrainConfig, strategy: tf.distribute.Strategy,
              objective: objectives.Objective, state: TrainingState, model: keras.Model,
              progress: Progress, best: Optional[int], primary: str,
              final: Dict[str, float]) -> Dict[str, object]:
  """The run's result, as written to metrics.json: what ran, how fast, what it reached."""
  return {
      "model": config.model,
      "task": config.task,
      "epochs": int(state.epoch.numpy()),
      "best_epoch": best,
      "primary_metric": primary,
      "stopped_early": progress.stopped,
      "train_examples_per_sec": (progress.trained_steps * config.batch_size
                                 / progress.train_seconds if progress.trained_steps else None),
      "replicas": strategy.num_replicas_in_sync,
      "global_batch_size": config.batch_size,
      "export_dir": config.resolved_export_dir,
      "task_role": distribute.task_role(strategy),
      "weights_sha256": loop.weights_checksum(model),
      **objective.result_fields(final),
      **({"workers": parameter_server.num_workers(strategy),
          "sharded_tables": parameter_server.shard_layout(model)}
         if parameter_server.is_parameter_server(strategy) else {}),
  }


# ----------------------------------------------------------------------------- failures


@contextlib.contextmanager
def _failures_classified(config: TrainConfig, strategy: tf.distribute.Strategy):
  """Turns a TensorFlow error of the run into the failure it is, by type and by the state of
  storage (never by message text): StorageError when a gs:// location of the run is now
  unreachable, LostPeerError when a collective of a cluster failed; anything else as it is."""
  try:
    yield
  except tf.errors.OpError as e:
    _raise_classified(e, config, strategy)
    raise


def _raise_classified(error: tf.errors.OpError, config: TrainConfig,
                      strategy: tf.distribute.Strategy) -> None:
  cause = f"{type(error).__name__}: {fileio.first_line(error)}"
  for flag, path, write in run_dir.storage_locations(config):
    if fileio.is_gcs(path):
      try:
        fileio.check_gcs_access(path, flag, write)
      except StorageError as unreachable:
        raise StorageError(f"Cloud Storage failed ({cause}; now {unreachable})",
                           unreachable.retryable) from error
  if distribute.task_role(strategy) != "local" and isinstance(
      error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
              tf.errors.CancelledError)):
    raise LostPeerError(f"lost contact with another task of the cluster ({cause})") from error
