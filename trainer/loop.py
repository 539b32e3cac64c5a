"""The training loop's pieces: the step (forward, loss, gradients and update on every replica,
several steps per `tf.function` call to keep Python out of the hot loop), the epoch runners
(one for Mirrored and MultiWorkerMirrored strategies, one that schedules steps on
parameter-server workers), and the divergence guard that stops a run at its first non-finite
number."""

import dataclasses
import functools
import hashlib
import math
import time
from typing import Callable, Dict, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import objectives, parameter_server, schema
from trainer.checkpointer import Checkpointer, TrainingState
from trainer.config import TrainConfig
from trainer.data import artifacts, pipeline
from trainer.errors import DivergedError


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
    self.data, self.objective = data, objective
    self.guard = DivergenceGuard(config, data.metadata, model)
    self.steps_per_epoch = steps_per_epoch(config, data)
    make_dataset = functools.partial(
        pipeline.make_dataset, data.train_pattern,
        config.batch_size // objective.examples_per_positive, True, seed=config.seed,
        shuffle_buffer_blocks=config.shuffle_buffer_blocks,
        add_negatives=objective.negative_sampler(data),
        file_examples=data.metadata.train_shard_examples,
        context=data.context_keys(config.features))
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

  def report(self) -> Dict[str, object]:
    """What metrics.json says of the input beside the common fields: nothing here."""
    return {}

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


class ServedEpochRunner(CoordinatedEpochRunner):
  """CoordinatedEpochRunner with input from the tf.data service (`trainer.input_service`,
  whose docstring says what is exact): each epoch is one shared job that every worker
  consumes; the chief counts the positives each step trained (`state.epoch_examples`, kept in
  checkpoints) and ends the epoch when all were trained, or, after a loss, when the job has
  nothing left."""

  def _start(self, strategy, objective, model, optimizer, make_dataset):
    from trainer import distribute, input_service  # pylint: disable=import-outside-toplevel
    config, data = self.config, self.data
    self.coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    self.workers = parameter_server.num_workers(strategy)
    self.positives_per_step = config.batch_size // objective.examples_per_positive
    make_epoch = functools.partial(
        pipeline.served_epoch, data.train_pattern,
        global_batch_size=self.positives_per_step, seed=config.seed,
        shuffle_buffer_blocks=self._served_shuffle_blocks(),
        add_negatives=objective.negative_sampler(data),
        context=data.context_keys(config.features))
    address = input_service.dispatcher_address(distribute.cluster_config(),
                                               config.input_service_port)
    self.feed = input_service.EpochFeed(f"grpc://{address}",
                                        input_service.run_id(config.model_dir), make_epoch)
    self.step = make_served_step(model, optimizer, strategy, config.batch_size, objective)
    self.examples_per_epoch: Dict[int, int] = {}

  def _served_shuffle_blocks(self) -> int:
    """--shuffle_buffer_blocks, at most a quarter of a data worker's share of the epoch: a
    data worker fills its buffer with the files it asks for, so a buffer near the epoch's
    size would take most files to the first worker that starts (measured: 4 workers read 2.0,
    0.36, 1.61 and 0.03 times their share with a 256-block buffer over 352 blocks)."""
    config = self.config
    blocks = sum(-(-n // schema.BLOCK_SIZE) for n in self.data.metadata.train_shard_examples)
    cap = max(2, blocks // (4 * (config.data_workers or self.workers)))
    if config.shuffle_buffer_blocks > cap:
      logging.info("--shuffle_buffer_blocks=%d is more than a quarter of a data worker's share "
                   "of the epoch's %d blocks: each data worker shuffles %d",
                   config.shuffle_buffer_blocks, blocks, cap)
    return min(config.shuffle_buffer_blocks, cap)

  def run(self, epoch: int) -> EpochStats:
    config, state = self.config, self.state
    expected = self.data.metadata.num_train
    start = time.time()
    trained = resumed_at = int(state.epoch_examples.numpy())
    loss_sum, global_step = float(state.epoch_loss.numpy()), int(state.step.numpy())
    iterators = self.feed.per_worker_iterators(self.coordinator, epoch)
    first_step = global_step
    while trained < expected:
      left = -(-(expected - trained) // self.positives_per_step)
      n = max(min(config.log_every_steps, left,
                  self.checkpointer.steps_until_due(global_step) or left), 2 * self.workers)
      losses, positives = self._served_steps(iterators, n)
      if not positives.any():  # the job has nothing left: what is not trained was lost
        break
      loss = float(np.mean(losses[positives > 0]))
      steps = int((positives > 0).sum())
      self.guard.check_loss(loss, epoch + 1, global_step - first_step + 1,
                            global_step - first_step + steps, global_step + steps)
      trained, global_step = trained + int(positives.sum()), global_step + steps
      loss_sum += float(np.sum(losses))
      state.step.assign(global_step)
      state.epoch_loss.assign(loss_sum)
      state.epoch_examples.assign(trained)
      self._log_served(epoch, trained, resumed_at, expected, loss, start)
      every = config.checkpoint_every_steps  # rounds may step over its multiples
      if trained < expected and (every and (global_step - steps) // every < global_step // every
                                 or self.checkpointer.due_by_clock()):
        self.guard.check_weights(epoch + 1, global_step)
        self.checkpointer.save(global_step)
        logging.info("Saved checkpoint %d (epoch %d, %d of %d examples)", global_step,
                     epoch + 1, trained, expected)
    self._end_epoch(epoch, trained, expected)
    seconds = time.time() - start
    # A step's loss is its examples' loss over the global batch: summed over the epoch and
    # divided by the epoch's batches' worth of positives, the mean loss per full batch.
    return EpochStats(loss_sum * self.positives_per_step / max(trained, 1), seconds,
                      global_step - first_step,
                      (trained - resumed_at) * self.objective.examples_per_positive
                      / max(seconds, 1e-9))

  def _served_steps(self, iterators, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Schedules `n` steps; returns each one's loss and positives (0: it found no batch)."""
    results = [self.coordinator.schedule(self.step, args=(iterators,)) for _ in range(n)]
    self.coordinator.join()
    losses, positives = zip(*self.coordinator.fetch(results))
    return np.asarray(losses, np.float64), np.asarray(positives, np.int64)

  def _end_epoch(self, epoch: int, trained: int, expected: int) -> None:
    self.examples_per_epoch[epoch + 1] = trained
    self.state.epoch_examples.assign(0)
    if trained == expected:
      logging.info("Epoch %d trained each of the %d training examples once", epoch + 1,
                   expected)
    else:
      logging.warning("Epoch %d trained %d of the %d training examples: %d missed (a data or "
                      "training worker, or the chief, was lost during the epoch; none is "
                      "repeated)", epoch + 1, trained, expected, expected - trained)

  def _log_served(self, epoch: int, trained: int, resumed_at: int, expected: int, loss: float,
                  start: float) -> None:
    config = self.config
    rate = (trained - resumed_at) / max(time.time() - start, 1e-9)  # positives per second
    remaining = expected - trained + (config.epochs - epoch - 1) * expected
    logging.info("epoch %d/%d examples %d/%d loss %.4f %.0f examples/s ETA %s", epoch + 1,
                 config.epochs, trained, expected, loss,
                 rate * self.objective.examples_per_positive,
                 _format_eta(remaining / max(rate, 1e-9)))

  def report(self) -> Dict[str, object]:
    counts = self.examples_per_epoch
    return {"input_service": {
        "train_examples": self.data.metadata.num_train,
        "examples_per_epoch": {str(e): n for e, n in sorted(counts.items())},
        "missed": sum(self.data.metadata.num_train - n for n in counts.values())}}


def make_served_step(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                     strategy: tf.distribute.Strategy, global_batch_size: int,
                     objective: objectives.Objective) -> Callable:
  """Returns `step(iterator) -> (loss, positives)`: a coordinated step over the next batch of
  a shared tf.data service job, or (0, 0) without training when the job has none left."""
  step_fn = _make_step_fn(model, optimizer, objective, global_batch_size,
                          parameter_server.trainable_leaves(model.trainable_variables))
  per_positive = objective.examples_per_positive

  @tf.function
  def step(iterator):
    batch = iterator.get_next_as_optional()

    def train():
      value = batch.get_value()
      loss = strategy.run(step_fn, args=(value,))
      return loss, tf.shape(value[schema.USER], out_type=tf.int64)[0] // per_positive

    return tf.cond(batch.has_value(), train,
                   lambda: (tf.constant(0.0), tf.constant(0, tf.int64)))

  return step


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


def steps_per_epoch(config: TrainConfig, data: artifacts.PreparedData) -> int:
  return data.metadata.num_train // (config.batch_size // config.examples_per_positive)
