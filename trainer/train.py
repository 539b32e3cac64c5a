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
import hashlib
import json
import math
import time
from typing import Callable, Dict, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import (distribute, evaluation, export, fileio, models, objectives, optimizers,
                     parameter_server, report, strict_json)
from trainer.checkpointer import (Checkpointer, TrainingState, best_epoch, restore,
                                  start_afresh)
from trainer.config import TrainConfig
from trainer.data import artifacts, pipeline
from trainer.errors import ConfigError, DivergedError, LostPeerError, StorageError

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"


def make_train_loop(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                    strategy: tf.distribute.Strategy, global_batch_size: int,
                    objective: objectives.Objective, jit_compile: bool = False) -> Callable:
  """Returns `train_loop(iterator, num_steps, flag) -> (mean loss, flag)`.

  It runs `num_steps` steps; `flag` (an int32 scalar, 0 or 1) comes back as 1 when it is 1 on
  any replica of any task.

  Args:
    global_batch_size: examples per step across replicas (positives and negatives).
    objective: owns the loss (`objective.model_loss`).
    jit_compile: compile the forward and backward pass with XLA (the optimizer update, which
      may hold cross-replica reductions, stays outside).
  """
  step_fn = _make_step_fn(model, optimizer, objective, global_batch_size,
                          model.trainable_variables, jit_compile)

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


def _make_step_fn(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                  objective: objectives.Objective, global_batch_size: int, variables,
                  jit_compile: bool = False) -> Callable:
  """Returns `step_fn(batch) -> loss`, one replica's step: the loss, its gradients with
  respect to `variables` (under a parameter server, the tables' shards) and their update."""
  scales_loss = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

  def loss_and_gradients(batch):
    with tf.GradientTape() as tape:
      loss = objective.model_loss(model, batch, global_batch_size)
      scaled = optimizer.scale_loss(loss) if scales_loss else loss
    return loss, tape.gradient(scaled, variables)

  if jit_compile:
    loss_and_gradients = tf.function(loss_and_gradients, jit_compile=True)

  def step_fn(batch):
    loss, gradients = loss_and_gradients(batch)
    optimizer.apply_gradients(zip(gradients, variables))
    return loss

  return step_fn


def weights_checksum(model: keras.Model) -> str:
  """sha256 of every weight's bytes, in order: equal exactly when the weights are identical."""
  digest = hashlib.sha256()
  for variable in model.weights:
    if parameter_server.is_sharded(variable.value):  # the whole table, shards concatenated
      variable = tf.convert_to_tensor(variable.value)
    digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(variable)).tobytes())
  return digest.hexdigest()


def weights_finite(model: keras.Model) -> bool:
  """Whether every floating-point weight is finite (a sharded table, shard by shard where it
  lives)."""
  for variable in parameter_server.trainable_leaves(model.weights):
    if (tf.as_dtype(variable.dtype).is_floating
        and not bool(tf.reduce_all(tf.math.is_finite(variable)))):
      return False
  return True


class DivergenceGuard:
  """Stops a run the moment its numbers stop being finite, so that it never looks like a
  success: a non-finite training loss (checked after every `train_loop` call, whose loss is
  the same on every task), weights (checked before every checkpoint, so the latest checkpoint
  stays the last finite one) or eval metric. Raises DivergedError, whose message names the
  epoch and step, the last finite loss and what to try; nothing is exported after it and
  metrics.json is not written."""

  def __init__(self, config: TrainConfig, metadata, model: keras.Model):
    self.config, self.metadata, self.model = config, metadata, model
    self.last_finite: Optional[Tuple[float, int]] = None  # (loss, global step)

  def check_loss(self, loss: float, epoch: int, first: int, last: int, step: int) -> None:
    """`loss`: the mean of steps `first`..`last` (1-based, of epoch `epoch`), ending at
    global step `step`."""
    if math.isfinite(loss):
      self.last_finite = (loss, step)
      return
    raise DivergedError(self._message(
        f"the mean training loss of steps {first}-{last} of epoch {epoch} (global step "
        f"{step}) is {loss}"))

  def check_weights(self, epoch: int, step: int) -> None:
    if not weights_finite(self.model):
      raise DivergedError(self._message(
          f"the weights after global step {step} (epoch {epoch}) hold NaN or infinite values; "
          "that checkpoint was not written"))

  def check_metrics(self, epoch: int, eval_metrics: Dict[str, float]) -> None:
    bad = sorted(k for k, v in eval_metrics.items() if not math.isfinite(v))
    if bad:
      raise DivergedError(self._message(
          f"the eval metrics after epoch {epoch} are not finite "
          f"({', '.join(f'{k} {eval_metrics[k]}' for k in bad)})"))

  def _message(self, what: str) -> str:
    config, metadata = self.config, self.metadata
    last = (f"the last finite loss was {self.last_finite[0]:.6g} at global step "
            f"{self.last_finite[1]}" if self.last_finite else "no finite loss was seen")
    data = (f"the ratings of --data_dir range over [{metadata.rating_min:g}, "
            f"{metadata.rating_max:g}] (metadata.json)" if not metadata.implicit
            else "the data is implicit feedback (labels 0 and 1)")
    return (f"training diverged: {what}; {last}. The latest checkpoint holds the last finite "
            "weights; nothing was exported and metrics.json was not written. Try a lower "
            f"--learning_rate (now {config.learning_rate:g}), a learning-rate warm-up "
            f"(--warmup_steps, now {config.warmup_steps}), --mixed_precision=float32 (now "
            f"{config.mixed_precision}); {data}")


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0)) if math.isfinite(seconds) else 0
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def load_config(model_dir: str) -> TrainConfig:
  """The TrainConfig of a run, from its `<model_dir>/config.json`."""
  path = fileio.join(model_dir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    raise ConfigError(f"{model_dir!r} holds no {CONFIG_FILE}: not a model_dir of neumf-train")
  fields = json.loads(fileio.read_text(path))
  fields["layers"] = tuple(fields["layers"])
  return TrainConfig(**fields)


def load_trained_model(model_dir: str, data: artifacts.PreparedData,
                       checkpoint_dir: Optional[str] = None) -> keras.Model:
  """Rebuilds the model of a finished run from its config.json and latest checkpoint."""
  config = load_config(model_dir)
  model = models.for_config(config, data)
  directory = checkpoint_dir or config.resolved_checkpoint_dir
  latest = tf.train.latest_checkpoint(directory)
  if latest is None:
    raise ConfigError(f"{model_dir!r}: no checkpoint in {directory}")
  restore(tf.train.Checkpoint(model=model), latest, model, partial=True)
  return model


def _load_pretrained(model: keras.Model, config: TrainConfig,
                     data: artifacts.PreparedData) -> None:
  gmf = load_trained_model(config.pretrained_gmf_dir, data)
  mlp = load_trained_model(config.pretrained_mlp_dir, data)
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
# ps_shards: under a parameter server each shard has its own optimizer slots, which restore
# only into the same shard count (the model's tables restore into any, or into one device).
_SHAPING_FIELDS = ("data_dir", "model", "task", "embedding_dim", "hidden_units", "layers",
                   "mlp_embedding_dim", "features", "ps_shards")


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
  # A field that an older version did not write had its default then.
  previous = {**json.loads(TrainConfig(data_dir="", model_dir="").to_json()),
              **json.loads(fileio.read_text(path))}
  current = json.loads(config.to_json())
  differ = [f"{name}={previous.get(name)!r} there, {current[name]!r} now"
            for name in _SHAPING_FIELDS if previous.get(name) != current[name]]
  if differ:
    raise ConfigError(f"--model_dir={config.model_dir!r} holds checkpoints of a different run ("
                      f"{'; '.join(differ)}): use another --model_dir, or --overwrite to "
                      "discard them")
  return True


def check_storage(config: TrainConfig) -> None:
  """Fails fast when a gs:// location of the run is missing or not usable (see fileio)."""
  for flag, path, write in _storage_locations(config):
    if path:
      fileio.check_gcs_access(path, flag, write)


def _storage_locations(config: TrainConfig):
  """(flag, path, written?) of every location the run reads or writes."""
  return (("data_dir", config.data_dir, False), ("model_dir", config.model_dir, True),
          ("export_dir", config.export_dir, True),
          ("checkpoint_dir", config.checkpoint_dir, True),
          ("tensorboard_dir", config.log_dir, True),
          ("pretrained_gmf_dir", config.pretrained_gmf_dir, False),
          ("pretrained_mlp_dir", config.pretrained_mlp_dir, False))


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
  objective = objectives.for_config(config)
  objective.check_replicas(strategy.num_replicas_in_sync)
  check_storage(config)
  data = _open_data(config, objective)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  keras.utils.set_random_seed(config.seed)
  _prepare_model_dir(config, strategy)
  with _failures_classified(config, strategy), _precision(config.mixed_precision):
    with strategy.scope():
      model = models.for_config(config, data)
      optimizer = optimizers.make_optimizer(
          config.optimizer, config.learning_rate, config.warmup_steps,
          _steps_per_epoch(config, data) * config.epochs, config.decay,
          loss_scale=config.mixed_precision == "float16")
      coordinated = parameter_server.is_parameter_server(strategy)
      optimizer.build(parameter_server.trainable_leaves(model.trainable_variables)
                      if coordinated else model.trainable_variables)
      state = TrainingState.create(
          parameter_server.num_workers(strategy) if coordinated else 0)
    return _run(config, strategy, objective, data, model, optimizer, state)


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


def _steps_per_epoch(config: TrainConfig, data: artifacts.PreparedData) -> int:
  return data.metadata.num_train // (config.batch_size // config.examples_per_positive)


def _prepare_model_dir(config: TrainConfig, strategy: tf.distribute.Strategy) -> None:
  """Refuses a model_dir of another run; on the chief, clears it (--overwrite) and writes
  config.json."""
  resume = _check_compatible(config)
  if not distribute.is_chief(strategy):
    return
  if not resume:
    start_afresh(config)
  fileio.retry(lambda: (fileio.makedirs(config.model_dir), fileio.write_text_atomic(
      fileio.join(config.model_dir, CONFIG_FILE), config.to_json())),
      f"writing {CONFIG_FILE} to {config.model_dir}", config.storage_retries)


def _run(config: TrainConfig, strategy: tf.distribute.Strategy,
         objective: objectives.Objective, data: artifacts.PreparedData, model: keras.Model,
         optimizer: keras.optimizers.Optimizer, state: TrainingState) -> Dict[str, object]:
  """Wiring: restore, train and evaluate epoch by epoch, export the best model, report."""
  checkpointer = Checkpointer(config, strategy, model, optimizer, state)
  _restore_or_initialise(config, checkpointer, model, data, state)
  coordinated = parameter_server.is_parameter_server(strategy)
  runner = (CoordinatedEpochRunner if coordinated else EpochRunner)(
      config, strategy, objective, data, model, optimizer, state, checkpointer)
  # Under a parameter server the chief evaluates by itself, reading rows from the ps tasks.
  eval_strategy = tf.distribute.get_strategy() if coordinated else strategy
  evaluators = objective.evaluators(model, eval_strategy, data)
  evaluate = functools.partial(evaluation.evaluate_all, evaluators)
  tracker = BestTracker(config, objective, objective.primary_metric(evaluators), state,
                        checkpointer)
  chief = distribute.is_chief(strategy)
  board = EpochBoard(config, optimizer, chief)
  history = report.History.resume(config.model_dir, chief, int(state.epoch.numpy()))
  logging.info("Training %s (%s): %d epochs x %d steps of %d examples on %d replica(s), "
               "task %s", config.model, config.task, config.epochs, runner.steps_per_epoch,
               config.batch_size, strategy.num_replicas_in_sync, distribute.task_role(strategy))
  progress = _train_epochs(config, state, runner, evaluate, tracker, board, history)
  # Serve and report the best epoch's model (or, --nokeep_best, the last one's).
  best = (checkpointer.restore_best(int(state.epoch.numpy())) if config.keep_best else None)
  if best:
    logging.info("Best %s %.4f: %s", tracker.metric, float(state.best.numpy()), best)
  final = {**evaluate(), **objective.baselines(eval_strategy, data)}
  _export(config, strategy, objective, data, model)
  checkpointer.clean_up()
  if not distribute.is_chief(strategy):
    logging.info("Task %s is not the chief: its checkpoints and export went to temporary "
                 "directories, now removed", distribute.task_role(strategy))
  result = summarize(config, strategy, objective, state, model, progress,
                     best_epoch(best), tracker.metric, final)
  result.update(_time_to_target(config, objective, tracker.metric, history))
  if chief:
    result["report"] = fileio.retry(
        lambda: report.write_report(history, config.model_dir, _report_title(config, result),
                                    tracker.metric, config.target_value),
        f"writing {report.REPORT_FILE} to {config.model_dir}", config.storage_retries)
    fileio.retry(lambda: fileio.write_text_atomic(
        fileio.join(config.model_dir, METRICS_FILE),
        strict_json.dumps(result, indent=2, sort_keys=True) + "\n"),
        f"writing {METRICS_FILE} to {config.model_dir}", config.storage_retries)
  logging.info("Final eval %s; exported to %s", _shown(final), config.resolved_export_dir)
  return result


def _time_to_target(config: TrainConfig, objective: objectives.Objective, metric: str,
                    history: report.History) -> Dict[str, object]:
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
                           data: artifacts.PreparedData, state: TrainingState) -> None:
  """Resumes from the latest checkpoint, or starts NeuMF from pretrained GMF and MLP runs."""
  latest = checkpointer.restore_latest()
  if latest:
    logging.info("Resumed from %s (epoch %d of %d done, step %d)", latest,
                 int(state.epoch.numpy()), config.epochs, int(state.step.numpy()))
  elif config.pretrained_gmf_dir:
    _load_pretrained(model, config, data)
  if int(state.step.numpy()) and (len(data.metadata.train_shard_examples)
                                  != data.metadata.num_shards):
    raise ConfigError(f"--data_dir={config.data_dir} was prepared by an older version (no "
                      "per-shard example counts): prepare it again to resume mid-run")


@dataclasses.dataclass
class Progress:
  """What the epochs of this process did (a resumed run counts only its own steps)."""

  train_seconds: float = 0.0
  trained_steps: int = 0
  stopped: Optional[str] = None  # why training stopped early, or None


def _train_epochs(config: TrainConfig, state: TrainingState, runner: "EpochRunner",
                  evaluate: Callable[[], Dict[str, float]], tracker: "BestTracker",
                  board: "EpochBoard", history: report.History) -> Progress:
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
    progress.stopped = tracker.stop_reason(eval_metrics)
    if progress.stopped:
      logging.info("Stopping early after epoch %d: %s", e + 1, progress.stopped)
      break
  return progress


@dataclasses.dataclass
class EpochStats:
  """One epoch's training, as this process ran it."""

  loss: float  # mean step loss over the whole epoch (resumed steps included)
  seconds: float
  steps: int  # steps this process trained
  examples_per_sec: float


class EpochRunner:
  """Runs one epoch's training steps: progress lines (loss, examples/s, ETA) and mid-epoch
  checkpoints. Owns the input pipeline, which resumes exactly at the saved step."""

  def __init__(self, config: TrainConfig, strategy: tf.distribute.Strategy,
               objective: objectives.Objective, data: artifacts.PreparedData,
               model: keras.Model, optimizer: keras.optimizers.Optimizer,
               state: TrainingState, checkpointer: Checkpointer):
    self.config, self.state, self.checkpointer = config, state, checkpointer
    self.guard = DivergenceGuard(config, data.metadata, model)
    self.steps_per_epoch = _steps_per_epoch(config, data)
    make_dataset = functools.partial(
        pipeline.make_dataset, data.train_pattern,
        config.batch_size // objective.examples_per_positive, True, seed=config.seed,
        shuffle_buffer_blocks=config.shuffle_buffer_blocks,
        add_negatives=objective.negative_sampler(data),
        file_examples=data.metadata.train_shard_examples)
    self._start(strategy, objective, model, optimizer, make_dataset)

  def _start(self, strategy: tf.distribute.Strategy, objective: objectives.Objective,
             model: keras.Model, optimizer: keras.optimizers.Optimizer,
             make_dataset: Callable) -> None:
    """The input pipeline (from the saved step) and the training loop."""
    start_step = int(self.state.step.numpy())
    self.iterator = iter(strategy.distribute_datasets_from_function(
        lambda ctx: make_dataset(input_context=ctx, start_step=start_step)))
    self.train_loop = make_train_loop(model, optimizer, strategy, self.config.batch_size,
                                      objective, self.config.jit_compile)

  def run(self, epoch: int) -> EpochStats:
    """Trains what remains of epoch `epoch` (0-based) and returns its figures."""
    config, state, per_epoch = self.config, self.state, self.steps_per_epoch
    start = time.time()
    global_step = int(state.step.numpy())
    done = global_step - epoch * per_epoch  # non-zero when resuming mid-epoch
    resumed_at, loss_sum = done, float(state.epoch_loss.numpy())
    while done < per_epoch:
      n = min(config.log_every_steps, per_epoch - done,
              self.checkpointer.steps_until_due(global_step) or per_epoch)
      loss, agreed = self._train_steps(n)
      self.guard.check_loss(loss, epoch + 1, done + 1, done + n, global_step + n)
      done, global_step, loss_sum = done + n, global_step + n, loss_sum + loss * n
      state.step.assign(global_step)
      state.epoch_loss.assign(loss_sum)
      self._log_progress(epoch, done, resumed_at, loss, start)
      # Mid-epoch checkpoints (the epoch's end saves after evaluation).
      if done < per_epoch and self.checkpointer.is_due(global_step, agreed):
        self.guard.check_weights(epoch + 1, global_step)
        self.checkpointer.save(global_step)
        logging.info("Saved checkpoint %d (epoch %d, step %d of %d)", global_step, epoch + 1,
                     done, per_epoch)
    seconds = time.time() - start
    steps = per_epoch - resumed_at
    return EpochStats(loss_sum / per_epoch, seconds, steps,
                      steps * config.batch_size / max(seconds, 1e-9))

  def _train_steps(self, n: int) -> Tuple[float, bool]:
    """Runs `n` steps: (their mean loss, whether a checkpoint is due by any task's clock)."""
    loss, agreed = self.train_loop(self.iterator, tf.constant(n),
                                   tf.constant(int(self.checkpointer.due_by_clock())))
    return float(loss), bool(int(agreed))

  def _log_progress(self, epoch: int, done: int, resumed_at: int, loss: float,
                    start: float) -> None:
    config, per_epoch = self.config, self.steps_per_epoch
    rate = (done - resumed_at) * config.batch_size / max(time.time() - start, 1e-9)
    remaining = per_epoch - done + (config.epochs - epoch - 1) * per_epoch
    logging.info("epoch %d/%d step %d/%d loss %.4f %.0f examples/s ETA %s", epoch + 1,
                 config.epochs, done, per_epoch, loss, rate,
                 _format_eta(remaining * config.batch_size / rate))


class CoordinatedEpochRunner(EpochRunner):
  """EpochRunner under ParameterServerStrategy: the chief schedules each step onto a free
  worker (`ClusterCoordinator`); each worker reads its share of the global batches
  (`parameter_server` module docstring) and the chief counts the batches each has taken, which
  checkpoints keep (`state.worker_batches`) so that a resumed run starts each worker where it
  stopped."""

  def _start(self, strategy, objective, model, optimizer, make_dataset):
    self.coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    counts = [int(c) for c in self.state.worker_batches.numpy()]
    workers, first = len(counts), min(counts)

    def dataset_fn(worker, skip):
      return make_dataset(start_step=first * workers, worker=(workers, worker, skip))

    self.iterators = parameter_server.per_worker_iterators(self.coordinator, dataset_fn,
                                                           [c - first for c in counts])
    self.step = make_coordinated_step(model, optimizer, strategy, self.config.batch_size,
                                      objective)
    self.workers = workers

  def _train_steps(self, n: int) -> Tuple[float, bool]:
    results = [self.coordinator.schedule(self.step, args=(self.iterators,)) for _ in range(n)]
    self.coordinator.join()
    losses, batch_indices = zip(*self.coordinator.fetch(results))
    counts = self.state.worker_batches.numpy()
    np.add.at(counts, np.asarray(batch_indices) % self.workers, 1)
    self.state.worker_batches.assign(counts)
    return float(np.mean(np.asarray(losses, np.float64))), self.checkpointer.due_by_clock()


def make_coordinated_step(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                          strategy: tf.distribute.Strategy, global_batch_size: int,
                          objective: objectives.Objective) -> Callable:
  """Returns `step(iterator) -> (loss, the batch's global index)`, one training step for
  `ClusterCoordinator.schedule`: the optimizer updates each table's shards where they live."""
  step_fn = _make_step_fn(model, optimizer, objective, global_batch_size,
                          parameter_server.trainable_leaves(model.trainable_variables))

  @tf.function
  def step(iterator):
    batch, index = next(iterator)
    return strategy.run(step_fn, args=(batch,)), index

  return step


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


def _shown(eval_metrics: Dict[str, float]) -> str:
  return " ".join(f"{k} {v:.4f}" for k, v in sorted(eval_metrics.items())
                  if not k.startswith("count"))


class EpochBoard:
  """The end-of-epoch log line and TensorBoard scalars (written by the chief only)."""

  def __init__(self, config: TrainConfig, optimizer: keras.optimizers.Optimizer, chief: bool):
    self.config, self.optimizer = config, optimizer
    self.writer = (tf.summary.create_file_writer(config.resolved_log_dir) if chief
                   else tf.summary.create_noop_writer())

  def write(self, epoch: int, stats: EpochStats, eval_metrics: Dict[str, float],
            improved: bool) -> None:
    logging.info("epoch %d/%d train loss %.4f eval %s%s; %.0f train examples/s", epoch,
                 self.config.epochs, stats.loss, _shown(eval_metrics),
                 " (best)" if improved else "", stats.examples_per_sec)
    rate = self.optimizer.learning_rate
    with self.writer.as_default(step=epoch):
      tf.summary.scalar("train/loss", stats.loss)
      tf.summary.scalar("train/examples_per_sec", stats.examples_per_sec)
      tf.summary.scalar("train/learning_rate", float(rate.numpy() if hasattr(rate, "numpy")
                                                     else rate))
      for name, v in eval_metrics.items():
        if not name.startswith("count"):
          tf.summary.scalar(f"eval/{name}", v)
    try:
      self.writer.flush()
    except tf.errors.OpError as err:  # TensorBoard is not worth failing a run for
      logging.warning("Could not write TensorBoard summaries to %s: %s",
                      self.config.resolved_log_dir, fileio.first_line(err))


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
      "weights_sha256": weights_checksum(model),
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
  for flag, path, write in _storage_locations(config):
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
