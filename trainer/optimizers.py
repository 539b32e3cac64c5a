"""Optimizers and learning-rate schedules.

Why a lazy Adam: an embedding table's gradient is an `IndexedSlices` touching only the rows of
the batch. `keras.optimizers.Adam` densifies it and updates every row of every table each step
(6x slower than a lazy update on a 200K-row table: README, "Design choices, measured").
`LazyAdam` updates the moments and weights of the touched rows only, and aggregates an
ID repeated in a batch before squaring (Keras's sparse path would square per occurrence).
Dense gradients get exactly Keras Adam's update. The price, as in every lazy Adam: rows not in a
batch keep their moments instead of decaying them, so untouched rows do not drift on momentum.
"""

import math

import keras
import tensorflow as tf
from keras import ops
from tensorflow.python.framework import config as tf_config  # op determinism's state

from trainer import distribute
from trainer.config import OPTIMIZERS



@keras.saving.register_keras_serializable(package="neumf_trainer")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up over `warmup_steps`, then `decay` to zero at `total_steps` (or constant)."""

  def __init__(self, learning_rate: float, warmup_steps: int = 0, total_steps: int = 1,
               decay: str = "none"):
    self.learning_rate = learning_rate
    self.warmup_steps = warmup_steps
    self.total_steps = max(total_steps, 1)
    self.decay = decay

  def __call__(self, step):
    step = ops.cast(step, "float32")
    lr = ops.cast(self.learning_rate, "float32")
    if self.warmup_steps:
      lr = lr * ops.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
    span = float(max(self.total_steps - self.warmup_steps, 1))
    progress = ops.clip((step - float(self.warmup_steps)) / span, 0.0, 1.0)
    if self.decay == "cosine":
      lr = lr * 0.5 * (1.0 + ops.cos(math.pi * progress))
    elif self.decay == "linear":
      lr = lr * (1.0 - progress)
    return lr

  def get_config(self):
    return {"learning_rate": self.learning_rate, "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps, "decay": self.decay}


# Columns per sparse-dense matmul in `_sum_duplicates` (the fastest block: README, "Design
# choices, measured").
_BLOCK_COLUMNS = 16


def _merge_runs(values, indices):
  """Sums each run of equal adjacent indices (values [n, ...], indices [n]) into one row, when
  that at least halves the rows: a sorted segment sum is cheap, while the general aggregation
  below pays a cache miss per repeated row. Implicit-feedback batches hold each positive's user
  beside its negatives' (see `pipeline.negative_sampler`), so their user IDs come in runs."""
  starts = tf.concat([[True], tf.not_equal(indices[1:], indices[:-1])], 0)
  n = tf.size(indices)

  def merge():
    segments = tf.cumsum(tf.cast(starts, tf.int32)) - 1
    return tf.math.segment_sum(values, segments), tf.boolean_mask(indices, starts)

  return tf.cond(2 * tf.reduce_sum(tf.cast(starts, tf.int32)) <= n, merge,
                 lambda: (values, indices))


def _sum_duplicates(gradient: tf.IndexedSlices, table_shape: tf.TensorShape):
  """(per-row summed values [u, ...], unique rows [u]) of a sparse gradient of a table of
  static shape `table_shape`.

  Runs of one ID are merged first (`_merge_runs`). When the batch has at least as many rows as
  the table (a small vocabulary, as items at a large batch), the rows are summed into a
  table-sized result and the touched rows read back in order. Otherwise each row's
  first occurrence is gathered, and only the repeated occurrences (few, in a batch of random
  IDs) are added: a segment sum over the whole batch costs several times more.
  """
  if distribute.gpu_code_paths():
    return _sum_duplicates_sorted(gradient)
  num_rows, width = table_shape[0], table_shape[1:].num_elements()
  values, indices = _merge_runs(gradient.values, gradient.indices)

  def into_table():
    n = tf.shape(indices, out_type=tf.int64)[0]
    flat = tf.reshape(values, [n, width])
    if tf_config.is_op_determinism_enabled():
      # GPU SparseTensorDenseMatMul raises under op determinism; the segment sum has a
      # deterministic (sorted) GPU kernel.
      table = tf.math.unsorted_segment_sum(flat, indices, num_rows)
    else:
      # The sum as one-hot^T x values, a sparse-dense matmul (TensorFlow's scatter-adds cost
      # ~100 ns a row here), over column blocks whose table-sized result stays in cache.
      one_hot = tf.SparseTensor(tf.stack([tf.range(n), tf.cast(indices, tf.int64)], 1),
                                tf.ones([n], values.dtype), tf.stack([n, num_rows]))
      table = tf.concat([tf.sparse.sparse_dense_matmul(one_hot, flat[:, k:k + _BLOCK_COLUMNS],
                                                       adjoint_a=True)
                         for k in range(0, width, _BLOCK_COLUMNS)], 1)
    count = tf.math.unsorted_segment_sum(tf.ones_like(indices, tf.int32), indices, num_rows)
    rows = tf.cast(tf.where(count > 0)[:, 0], indices.dtype)
    summed = tf.gather(table, rows)
    return tf.reshape(summed, [-1] + table_shape[1:].as_list()), rows

  def first_then_repeats():
    rows, position = tf.unique(indices)
    n = tf.shape(indices, out_type=position.dtype)[0]
    occurrence = tf.range(n)
    first = tf.math.unsorted_segment_min(occurrence, position, tf.shape(rows)[0])  # [u]
    summed = tf.gather(values, first)
    repeated = tf.not_equal(occurrence, tf.gather(first, position))  # [n]
    summed = tf.tensor_scatter_nd_add(
        summed, tf.boolean_mask(position, repeated)[:, None],
        tf.boolean_mask(values, repeated))
    return summed, rows

  return tf.cond(tf.size(indices) >= num_rows, into_table, first_then_repeats)


def _sum_duplicates_sorted(gradient: tf.IndexedSlices):
  """`_sum_duplicates` for GPUs, as n = len(indices) rows (values [n, ...], rows [n]) with no
  conditional, no shape that depends on the data and no int32 arithmetic: on a GPU each of
  those reads a value back to the host and waits for the device (a conditional's predicate;
  Unique, Where and SegmentSum sizing their output; int32 ops, whose GPU kernels keep their
  data in host memory), several times per table per step on the CPU path.

  The indices are sorted, a cumulative sum numbers the distinct rows, and a segment sum adds
  each distinct row's values into its slot. The slots after the last distinct row repeat it
  (same row, same sum), so an update of the rows computes and writes identical values there:
  the result is the same as with the distinct rows alone.
  """
  indices = tf.cast(gradient.indices, tf.int64)
  n = tf.size(indices, out_type=tf.int64)  # (Size's GPU kernel gives it in host memory)
  order = tf.argsort(indices)
  ids = tf.gather(indices, order)
  starts = tf.cast(tf.not_equal(ids[1:], ids[:-1]), tf.int64)
  slot = tf.cumsum(tf.concat([tf.zeros([1], tf.int64), starts], 0))  # [n]: 0, 0, 1, ...
  summed = tf.math.unsorted_segment_sum(tf.gather(gradient.values, order), slot, n)
  position = tf.cumsum(tf.ones_like(slot)) - 1  # [n]: 0, 1, ... (tf.range reads n on the host)
  filled = tf.minimum(position, tf.reduce_max(slot))  # the slots past the last, onto it
  first = tf.searchsorted(slot, filled, out_type=tf.int64)  # each slot's first sorted index
  return tf.gather(summed, filled), tf.cast(tf.gather(ids, first), gradient.indices.dtype)


def _resource(variable):
  """The tf.Variable of a Keras variable, the local copy under a strategy (gathers from it read
  only the rows they need)."""
  return distribute.local_variable(variable.value if isinstance(variable, keras.Variable)
                                   else variable)


class _RowBuffers:
  """Per-variable scratch variables for the rows of a sparse update.

  A plain object, not a trackable one: the buffers stay out of checkpoints and SavedModels.
  """

  def __init__(self, var_list):
    self.buffers = {}
    if isinstance(tf.distribute.get_strategy(), tf.distribute.ParameterServerStrategy):
      # Variables of unknown shape on a parameter-server task crash the remote eager service
      # (a check failure deserialising their handle): the updates there use plain ops.
      return
    for index, variable in enumerate(var_list):
      if len(variable.shape) < 1:
        continue  # a scalar never gets a sparse gradient
      row_shape = tuple(variable.shape[1:])
      self.buffers[index] = [
          tf.Variable(tf.zeros((0,) + row_shape, variable.dtype), trainable=False,
                      shape=tf.TensorShape((None,) + row_shape), name=f"rows_{index}_{part}")
          for part in ("w", "m", "v")]


@keras.saving.register_keras_serializable(package="neumf_trainer")
class LazyAdam(keras.optimizers.Optimizer):
  """Adam that updates only the rows present in a sparse gradient.

  For a row r of a sparse gradient with summed per-row gradient g (duplicates aggregated):
    m_r = b1 m_r + (1 - b1) g;  v_r = b2 v_r + (1 - b2) g^2
    w_r -= lr sqrt(1 - b2^t) / (1 - b1^t) * m_r / (sqrt(v_r) + eps)
  which is Keras Adam's formula, applied to the touched rows. After a warm start, t counts
  the updates of the run the moments came from too (`warm_start_steps`).

  The arithmetic runs in TensorFlow's fused, multi-threaded Adam kernel (ResourceApplyAdam):
  on the variables themselves for a dense gradient; for a sparse one, on scratch variables
  holding the gathered rows, which are then scattered back. One pass instead of a dozen
  element-wise ops, each a pass over the rows (README, "Design choices, measured").
  """

  def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
               name="lazy_adam", **kwargs):
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon

  def build(self, var_list):
    if self.built:
      return
    super().build(var_list)
    self._momentums, self._velocities = self.add_optimizer_variables(
        var_list, ["momentum", "velocity"])
    # Updates made before this run's first step by the run it warm-started from (whose
    # moments it took): the bias correction continues from them, while the step counter and
    # the learning-rate schedule start anew (trainer/warm_start.py). Created after the slots,
    # so the checkpoint keys of the slots are those of runs before it.
    self.warm_start_steps = self.add_variable(shape=(), dtype="int64", initializer="zeros",
                                              name="warm_start_steps")
    self._rows = _RowBuffers(var_list)

  def update_step(self, gradient, variable, learning_rate):
    dtype = variable.dtype
    step = ops.cast(self.iterations + 1 + self.warm_start_steps, dtype)
    b1, b2 = ops.cast(self.beta_1, dtype), ops.cast(self.beta_2, dtype)
    hyper = dict(beta1_power=ops.power(b1, step), beta2_power=ops.power(b2, step),
                 lr=ops.cast(learning_rate, dtype), beta1=b1, beta2=b2,
                 epsilon=ops.cast(self.epsilon, dtype))
    index = self._get_variable_index(variable)
    m, v = self._momentums[index], self._velocities[index]
    if not isinstance(gradient, tf.IndexedSlices):
      tf.raw_ops.ResourceApplyAdam(var=_resource(variable).handle, m=_resource(m).handle,
                                   v=_resource(v).handle, grad=gradient, **hyper)
      return
    g, rows = _sum_duplicates(gradient, tf.TensorShape(variable.shape))
    if index not in self._rows.buffers:
      self._apply_rows(g, rows, variable, m, v, hyper)
      return
    buffers = [_resource(buffer) for buffer in self._rows.buffers[index]]
    for buffer, source in zip(buffers, (variable, m, v)):
      buffer.assign(tf.gather(_resource(source), rows))
    w_rows, m_rows, v_rows = buffers
    tf.raw_ops.ResourceApplyAdam(var=w_rows.handle, m=m_rows.handle, v=v_rows.handle, grad=g,
                                 **hyper)
    # Gather-compute-scatter_update: ResourceScatterSub costs ~1.6x the gather plus
    # ResourceScatterUpdate here (8192 rows of 64), with the same arithmetic.
    for buffer, target in zip(buffers, (variable, m, v)):
      self.assign(target, tf.IndexedSlices(buffer.read_value(), rows))

  def _apply_rows(self, g, rows, variable, m, v, hyper):
    """The same update as ResourceApplyAdam on the rows, in element-wise ops: each gather and
    scatter runs where the variable lives (under a parameter server, on the shard's task)."""
    m_rows = hyper["beta1"] * tf.gather(_resource(m), rows) + (1 - hyper["beta1"]) * g
    v_rows = hyper["beta2"] * tf.gather(_resource(v), rows) + (1 - hyper["beta2"]) * g * g
    step = (hyper["lr"] * tf.sqrt(1 - hyper["beta2_power"]) / (1 - hyper["beta1_power"]))
    w_rows = tf.gather(_resource(variable), rows) - step * m_rows / (
        tf.sqrt(v_rows) + hyper["epsilon"])
    for target, value in ((variable, w_rows), (m, m_rows), (v, v_rows)):
      self.assign(target, tf.IndexedSlices(value, rows))

  def get_config(self):
    config = super().get_config()
    config.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon)
    return config


class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
  """Keras's dynamic loss scaling, with finiteness decided over every replica's gradients.

  Keras 3.15 takes `finite` from each replica's own gradients, before the inner optimizer
  all-reduces them (and, under a merge call, from replica 0 alone), so an overflow on another
  replica is summed into every update while the scale stays: on several GPUs a float16 run
  writes inf into its weights. Here each replica's verdict is all-reduced first, so every
  replica skips the step and lowers the scale together. Sparse gradients are checked by their
  rows (`IndexedSlices.values`), never densified to a table-sized tensor.
  """

  def check_finite(self, grads):
    verdicts = [tf.reduce_all(tf.math.is_finite(g.values if isinstance(g, tf.IndexedSlices)
                                                else g)) for g in grads if g is not None]
    finite = tf.reduce_all(tf.stack(verdicts)) if verdicts else tf.constant(True)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
      overflowed = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                      tf.cast(tf.logical_not(finite), tf.float32))
      finite = tf.equal(overflowed, 0.0)
    return finite


def make_optimizer(name: str, learning_rate: float, warmup_steps: int = 0,
                   total_steps: int = 1, decay: str = "none",
                   loss_scale: bool = False) -> keras.optimizers.Optimizer:
  """The optimizer `name` with a warm-up/decay schedule; wrapped for loss scaling (float16).

  Raises:
    ValueError: naming --optimizer when `name` is unknown.
  """
  schedule = WarmupDecay(learning_rate, warmup_steps, total_steps, decay)
  if name == "adam":
    optimizer = keras.optimizers.Adam(learning_rate=schedule)
  elif name == "lazy_adam":
    optimizer = LazyAdam(learning_rate=schedule)
  elif name == "adagrad":
    optimizer = keras.optimizers.Adagrad(learning_rate=schedule)
  elif name == "sgd":
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
  else:
    raise ValueError(f"--optimizer={name!r} is not one of {', '.join(OPTIMIZERS)}")
  if loss_scale:
    optimizer = LossScaleOptimizer(optimizer, name="loss_scale_optimizer")
  return optimizer
