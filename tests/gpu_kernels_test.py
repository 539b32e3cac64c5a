"""GPU paths checked without a GPU: the ops our functions trace, against what the installed
TensorFlow (the CUDA build) says of its GPU kernels.

Every function traced while a piece of the product runs is read back from the eager context
(`list_function_names`/`get_function_def`), op by op, including the branches of conditionals.
"""

import dataclasses
import re

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.eager import context
from tensorflow.python.framework import config as tf_config

from trainer import evaluation, metrics, models, optimizers, schema

# Ops whose GPU kernel raises UnimplementedError under op determinism (the messages are in the
# installed libtensorflow_cc: "A deterministic GPU implementation of SparseTensorDenseMatmulOp
# is not currently available", "Determinism is not yet supported in GPU implementation of
# DenseBincount").
RAISE_UNDER_DETERMINISM = {"SparseTensorDenseMatMul", "DenseBincount", "Bincount"}


def traced_ops(run):
  """{op type: names of the functions holding it} of every function traced during `run()`."""
  ops = {}
  for name, function in _functions(run).items():
    for node in function.node_def:
      ops.setdefault(node.op, set()).add(name)
  return ops


@pytest.fixture
def determinism():
  """Op determinism on for the test, restored afterwards."""
  was = tf_config.is_op_determinism_enabled()
  tf.config.experimental.enable_op_determinism()
  yield
  if not was:
    tf_config.disable_op_determinism()


def _lazy_adam_into_table():
  """A lazy Adam step whose gradient has as many rows as the table: the `into_table` sum."""
  table = tf.Variable(np.ones((4, 3), np.float32))
  optimizer = optimizers.LazyAdam(0.1)
  optimizer.build([table])
  gradient = tf.IndexedSlices(tf.ones([6, 3]), tf.constant([0, 1, 1, 2, 3, 3], tf.int64),
                              tf.constant([4, 3], tf.int64))
  tf.function(lambda: optimizer.apply_gradients([(gradient, table)]))()
  return table


def _sampled_evaluation():
  """The sampled protocol with its corrected metrics (a count per rank)."""
  strategy = tf.distribute.get_strategy()
  num_users, num_items, k, m = 8, 20, 3, 4
  model = models.build_model("mf", num_users, num_items, 4)
  rng = np.random.default_rng(0)
  items = rng.integers(0, num_items, num_users)
  negatives = np.stack([rng.choice(np.setdiff1d(np.arange(num_items), [i]), m, replace=False)
                        for i in items])
  corrections = {"hr": metrics.sampled_metric_correction(num_items, m, "hr", k),
                 "ndcg": metrics.sampled_metric_correction(num_items, m, "ndcg", k)}
  evaluate = evaluation.make_ranking_evaluation(
      model, strategy, k, num_items, np.zeros(num_users + 1, np.int64), np.zeros(0, np.int32),
      corrections=corrections)[metrics.SAMPLED]
  return evaluate(strategy.distribute_datasets_from_function(
      lambda ctx: evaluation.sampled_dataset(np.arange(num_users), items, negatives, 4, ctx)))


def _autorec_coding_on_a_gpu():
  """Interactions coded as on a machine with GPUs (segment sums)."""
  layer = models.InteractionTable(3, 2, {"indptr": np.array([0, 1, 3, 3]),
                                         "indices": np.array([0, 0, 1]),
                                         "values": np.ones(3, np.float32)}, segments=True)
  return tf.function(layer)(tf.constant([1, 0], tf.int64), tf.ones([2, 4]))


@pytest.mark.parametrize("run", [_lazy_adam_into_table, _sampled_evaluation,
                                 _autorec_coding_on_a_gpu],
                         ids=["lazy_adam_into_table", "sampled_evaluation", "autorec_coding"])
def test_no_op_that_raises_under_determinism_on_a_gpu(determinism, run):
  ops = traced_ops(run)
  assert ops, "nothing was traced"
  found = {op: sorted(names) for op, names in ops.items() if op in RAISE_UNDER_DETERMINISM}
  assert not found, f"GPU kernels that raise under --deterministic: {found}"


def test_lazy_adam_sums_rows_the_same_with_and_without_determinism(determinism):
  deterministic = _lazy_adam_into_table().numpy()
  tf_config.disable_op_determinism()
  try:
    fast = _lazy_adam_into_table().numpy()
  finally:
    tf.config.experimental.enable_op_determinism()
  np.testing.assert_allclose(deterministic, fast, rtol=1e-6)
  assert not np.allclose(deterministic, 1.0)  # every row moved


def test_the_fast_sum_is_kept_without_determinism():
  was = tf_config.is_op_determinism_enabled()  # (a run with --deterministic turns it on)
  tf_config.disable_op_determinism()
  try:
    assert "SparseTensorDenseMatMul" in traced_ops(_lazy_adam_into_table)
  finally:
    if was:
      tf.config.experimental.enable_op_determinism()


@pytest.mark.parametrize("chunk,segments", [(1 << 26, False), (1 << 26, True), (2 * 3, True),
                                            (1, True)])
def test_interactions_are_coded_in_chunks_as_one_product(chunk, segments):
  # Rows of 0, 1, 3 and 2 interactions; a chunk of 2 (6 values / d 3) interactions, or 1,
  # splits rows across chunks. The GPU path (segments) and the CPU one (a sparse product).
  indptr, indices = np.array([0, 0, 1, 4, 6]), np.array([2, 0, 1, 3, 0, 2])
  values = np.array([5.0, 1.0, 2.0, 3.0, 4.0, 0.5], np.float32)
  layer = models.InteractionTable(4, 4, {"indptr": indptr, "indices": indices,
                                         "values": values}, chunk=chunk,
                                  segments=segments)
  table = np.arange(12, dtype=np.float32).reshape(4, 3)
  dense = np.zeros((4, 4), np.float32)
  for row in range(4):
    for j in range(indptr[row], indptr[row + 1]):
      dense[row, indices[j]] = values[j]
  ids = np.array([3, 0, 2, 2, 1])
  np.testing.assert_allclose(layer(ids, table).numpy(), dense[ids] @ table, rtol=1e-6)
  compiled = tf.function(lambda i, t: layer(i, t), jit_compile=True)
  np.testing.assert_allclose(compiled(ids, table).numpy(), dense[ids] @ table, rtol=1e-6)
  # Training's gradient in the table (the CPU path's own), and of no ids at all (a replica's
  # empty share of a batch), inside a graph as in the step.
  variable, upstream = tf.Variable(table), np.arange(15, dtype=np.float32).reshape(5, 3)

  @tf.function
  def coded(rows, weights):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(layer(rows, variable, training=True) * weights)
    return (layer(rows, variable),
            tape.gradient(loss, variable, unconnected_gradients="zero"))  # (segments: none)

  for rows, weights in ((ids, upstream), (ids[:0], upstream[:0])):
    codes, gradient = coded(rows, weights)
    np.testing.assert_allclose(codes.numpy(), dense[rows] @ table, rtol=1e-6)
    np.testing.assert_allclose(tf.convert_to_tensor(gradient).numpy(),
                               dense[rows].T @ weights, rtol=1e-6)


def test_autorec_trains_with_jit_compile(tiny_data_dir, tmp_path):
  # XLA has no RaggedRange nor SparseTensorDenseMatMul: the compiled step codes every item
  # with static shapes and gathers the batch's.
  from trainer import train
  from trainer.config import TrainConfig
  config = TrainConfig(data_dir=tiny_data_dir, model_dir=str(tmp_path / "m"), model="autorec",
                       embedding_dim=8, epochs=2, batch_size=256, learning_rate=0.01,
                       jit_compile=True, checkpoint_every_secs=0)
  compiled = train.train_and_evaluate(config)
  plain = train.train_and_evaluate(dataclasses.replace(config, jit_compile=False,
                                                       model_dir=str(tmp_path / "p")))
  assert compiled["eval_rmse"] < compiled["eval_rmse_global_mean_baseline"]
  # The same model, summed in another order (0.586 and 0.588 here).
  assert compiled["eval_rmse"] == pytest.approx(plain["eval_rmse"], rel=0.02)


# ------------------------------------------------------------- device-to-host transfers
#
# On a GPU, a value computed on the device and read by a kernel argument kept in host memory
# (a conditional's predicate, an int32 op's operands, a shape) is copied back, and the host
# waits for the device: a synchronisation inside the step. So does a kernel whose output size
# depends on its data (Unique, Where, SegmentSum). Counted here from the traced graph, before
# TensorFlow's graph optimisations (which may pin a few small int32 ops to the host): an upper
# bound for each branch of a conditional alike.

SIZED_BY_DATA = {"Unique", "UniqueV2", "Where", "SegmentSum", "DynamicPartition"}


def _gpu_kernel(node):
  from tensorflow.python.framework import kernels
  for kernel in kernels.get_registered_kernels_for_op(node.op).kernel:
    if kernel.device_type in ("GPU", "DEFAULT") and _fits(kernel, node):
      return kernel
  return None


def _arg_names(args, node):
  """One name per tensor of an op's argument list (a list argument repeats its name)."""
  names = []
  for arg in args:
    count = (node.attr[arg.number_attr].i if arg.number_attr else
             len(node.attr[arg.type_list_attr].list.type) if arg.type_list_attr else 1)
    names += [arg.name] * count
  return names


def host_transfers(function):
  """[(op, argument, why)] of `function`'s device-to-host reads on a GPU. Its arguments are
  in host memory when int32 or resources (TensorFlow's rule for a function's int32 tensors)."""
  from tensorflow.python.framework import op_def_registry
  host = {a.name: a.type in (tf.int32.as_datatype_enum, tf.resource.as_datatype_enum)
          for a in function.signature.input_arg}
  producers = {node.name: node.op for node in function.node_def}
  for node in function.node_def:
    kernel, op_def = _gpu_kernel(node), op_def_registry.get(node.op)
    for arg in op_def.output_arg if op_def else []:
      host[f"{node.name}:{arg.name}"] = kernel is None or arg.name in kernel.host_memory_arg
  out = []
  for node in function.node_def:
    kernel, op_def = _gpu_kernel(node), op_def_registry.get(node.op)
    if op_def is None:
      continue
    inputs = [i for i in node.input if not i.startswith("^")]
    for arg, source in zip(_arg_names(op_def.input_arg, node), inputs):
      parts = source.split(":")
      on_device = not host.get(":".join(parts[:2]), False)
      if (on_device and producers.get(parts[0]) != "Const"  # a constant sits where it is read
          and (kernel is None or arg in kernel.host_memory_arg)):
        out.append((node.op, arg, "no GPU kernel" if kernel is None else "host-memory argument"))
    if node.op in SIZED_BY_DATA:
      out.append((node.op, "", "output sized by its data"))
  return out


def _lazy_adam_sparse_update(rows=4, ids=(0, 1, 1, 2, 3, 3)):
  table = tf.Variable(np.ones((rows, 3), np.float32))
  optimizer = optimizers.LazyAdam(0.1)
  optimizer.build([table])
  gradient = tf.IndexedSlices(tf.ones([len(ids), 3]), tf.constant(ids, tf.int64),
                              tf.constant([rows, 3], tf.int64))
  tf.function(lambda: optimizer.apply_gradients([(gradient, table)]))()


def lazy_adam_transfers():
  """{function: transfers} of one lazy Adam sparse update, as built here."""
  functions = _functions(_lazy_adam_sparse_update)
  return {name: host_transfers(f) for name, f in functions.items()
          if not name.startswith("__wrapped__")}  # (eager ops)


def test_lazy_adam_built_for_gpus_reads_nothing_back_to_the_host(monkeypatch):
  cpu = lazy_adam_transfers()
  monkeypatch.setenv("NEUMF_GPU_CODE_PATHS", "1")
  gpu = lazy_adam_transfers()
  assert sum(map(len, cpu.values())) > 0  # the count sees the CPU path's conditionals
  assert not any(gpu.values()), gpu


# ----------------------------------------------------------------------------- the guard
#
# Every op traced while a configuration trains and evaluates (on two logical CPUs under
# MirroredStrategy: the collective all-reduce graph GPUs get) must have a GPU kernel for its
# dtypes in the installed wheel, the CUDA build; inside an XLA function, an XLA_GPU_JIT
# kernel. What runs on the host by design, or is known and tracked, is listed with why.

def _host_by_design(op: str, dtypes: str) -> bool:
  """The input pipeline feeding the step from the host (iterators, optionals), and string
  constants (device names, assertion messages), which live in host memory."""
  return ("Iterator" in op or op.startswith("Optional")
          or (op == "Const" and dtypes == "dtype=string"))
# (op, dtype attrs) placed on the host today, tracked in issue #25 (and named in
# ../shared/notes/gpu_audit.md): each is a copy or a sync, not an error, without XLA.
KNOWN_HOST_OPS = {
    # TensorFlow's own all-gather of sparse gradients pads int64 indices (cross_device_utils).
    ("Pad", "T=int64,Tpaddings=int32"),
    # S7: the full protocol's mask of seen items is built from ragged rows on the host.
    ("RaggedGather", "Tindices=int64,Tsplits=int64,Tvalues=int64"),
    ("ScatterNd", "T=bool,Tindices=int64"),
}


def _dtypes(node) -> str:
  return ",".join(f"{k}={tf.as_dtype(v.type).name}" for k, v in sorted(node.attr.items())
                  if v.WhichOneof("value") == "type")


def _fits(kernel, node) -> bool:
  """Whether a registered kernel takes `node`'s dtypes."""
  for constraint in kernel.constraint:
    allowed = set(constraint.allowed_values.list.type)
    value = node.attr.get(constraint.name)
    given = ([value.type] if value is not None and value.WhichOneof("value") == "type"
             else list(value.list.type) if value is not None else [])
    if given and not set(given) <= allowed:
      return False
  return True


def _has_kernel(node, devices) -> bool:
  from tensorflow.python.framework import kernels
  return any(kernel.device_type in devices and _fits(kernel, node)
             for kernel in kernels.get_registered_kernels_for_op(node.op).kernel)


def _functions(run):
  """{name: FunctionDef} of the functions traced during `run()`, those released meanwhile
  included (a function leaves the context with its last reference: kept until read here)."""
  eager = context.context()
  before = set(eager.list_function_names())
  released = []
  remove, shadowed = eager.remove_function, "remove_function" in vars(eager)
  eager.remove_function = released.append
  try:
    run()
    return {name: eager.get_function_def(name)
            for name in set(eager.list_function_names()) - before}
  finally:
    if shadowed:  # an enclosing call's recorder
      eager.remove_function = remove
    else:
      del eager.remove_function
    for name in released:
      remove(name)


def _reachable(functions, roots):
  """`roots` and every function they call (nested calls, branches and bodies), by name."""
  names, frontier = set(roots), list(roots)
  while frontier:
    for node in functions[frontier.pop()].node_def:
      for value in node.attr.values():
        callees = ([value.func.name] if value.WhichOneof("value") == "func" else
                   [f.name for f in value.list.func] if value.WhichOneof("value") == "list"
                   else [])
        for callee in callees:
          if callee in functions and callee not in names:
            names.add(callee)
            frontier.append(callee)
  return names


def _compiled(functions):
  """Names of the functions XLA compiles: marked `_XlaMustCompile`, and what they call."""
  return _reachable(functions, [n for n, f in functions.items()
                                if "_XlaMustCompile" in f.attr and f.attr["_XlaMustCompile"].b])


STEP_ROOTS = re.compile(r"__inference_(train_loop|sums|step)_\d+$")


def step_functions(functions):
  """The training loop's and the evaluations' functions, with all they call (not the input
  pipeline's dataset functions, nor eager ops, checkpoints and summaries)."""
  names = _reachable(functions, [n for n in functions if STEP_ROOTS.match(n)])
  return {n: functions[n] for n in names}


def _serving_host_by_design(op: str, dtypes: str) -> bool:
  """Serving takes and returns string IDs: their vocabulary lookups, and every op on strings,
  run on the host (TensorFlow has no GPU string kernels), as do the SavedModel's own save and
  restore functions."""
  return (_host_by_design(op, dtypes) or "string" in dtypes
          or op in {"HashTableV2", "LookupTableFindV2", "LookupTableImportV2", "SaveV2",
                    "RestoreV2", "MergeV2Checkpoints", "ShardedFilename", "StringJoin",
                    "StaticRegexFullMatch"})


def guard_violations(functions, deterministic=False, host=_host_by_design):
  """The rule breakers among `functions`: [(rule, op, dtypes, function)]; `host(op, dtypes)`
  says which ops run on the host by design."""
  compiled = _compiled(functions)
  out = []
  for name, function in functions.items():
    for node in function.node_def:
      dtypes = _dtypes(node)
      if name in compiled:
        if not _has_kernel(node, ("XLA_GPU_JIT",)):
          out.append(("no XLA_GPU_JIT kernel", node.op, dtypes, name))
      elif (not host(node.op, dtypes) and (node.op, dtypes) not in KNOWN_HOST_OPS
            and not _has_kernel(node, ("GPU", "DEFAULT"))):
        out.append(("no GPU kernel", node.op, dtypes, name))
      if deterministic and node.op in RAISE_UNDER_DETERMINISM:
        out.append(("raises under --deterministic on a GPU", node.op, dtypes, name))
  return sorted(set(out))


@pytest.fixture(scope="module")
def featured_data(tmp_path_factory):
  """Explicit ratings with side features of every kind on both sides (small vocabularies: the
  feature embeddings' XLA-compiled dense path), and context: derived, categorical, numeric."""
  root = tmp_path_factory.mktemp("guard_features")
  rng = np.random.default_rng(0)
  (root / "log.csv").write_text("user,item,rating,ts,device,price\n" + "".join(
      f"u{u},i{i},{1 + (u * i) % 5},{1_700_000_000 + 3607 * u * i},{('tv', 'phone')[i % 2]},"
      f"{u % 7}\n" for u in range(40) for i in rng.choice(30, 12, False)))
  (root / "users.csv").write_text("id,age,job\n" + "".join(
      f"u{u},{18 + u},{('a', 'b', 'c')[u % 3]}\n" for u in range(40)))
  (root / "items.csv").write_text("id,tags,year\n" + "".join(
      f"i{i},{'|'.join(('x', 'y', 'z')[:1 + i % 3])},{1990 + i}\n" for i in range(30)))
  from trainer.config import PrepareConfig
  from trainer.data import preparation
  out = str(root / "data")
  preparation.prepare(PrepareConfig(
      output_dir=out, source="csv", input=(str(root / "log.csv"),), user_column="user",
      item_column="item", rating_column="rating", user_features=str(root / "users.csv"),
      user_id_column="id", user_feature_columns="age:numeric,job:categorical",
      item_features=str(root / "items.csv"), item_id_column="id",
      item_feature_columns="tags:multi_hot:|,year:bucketized:4", num_shards=1,
      timestamp_column="ts", context=("hour", "tenure"),
      context_columns="device:categorical,price:numeric"))
  return out


def _gpu_kernel_dtype(op: str, dtype) -> bool:
  """Whether `op` has a GPU kernel for variables of `dtype`."""
  node = tf.compat.v1.NodeDef(op=op, attr={"dtype": tf.compat.v1.AttrValue(
      type=tf.as_dtype(dtype).as_datatype_enum)})
  return _has_kernel(node, ("GPU", "DEFAULT"))


def test_side_features_train_with_jit_where_host_variables_sit_on_another_device(
    featured_data, tmp_path):
  """R4: on a GPU, a variable whose dtype has no GPU kernel stays on the host, where an
  XLA-compiled step cannot read it. Here such variables are put on the second logical CPU
  while the step runs on the first: the compiled step must not need any."""
  from trainer import train
  from trainer.config import TrainConfig
  assert not _gpu_kernel_dtype("ResourceGather", tf.int32)  # the registry's rule, checked
  assert _gpu_kernel_dtype("ResourceGather", tf.int64)
  created, moved = [], []

  def like_a_gpu(next_creator, **kwargs):
    variable = next_creator(**kwargs)
    created.append(variable.dtype)
    if variable.dtype != tf.string and not (  # strings: serving's lookups, host by design
        _gpu_kernel_dtype("VarHandleOp", variable.dtype)
            and _gpu_kernel_dtype("ResourceGather", variable.dtype)):
      moved.append(variable.name)
      with tf.device("/cpu:1"):
        variable = next_creator(**kwargs)
    return variable

  config = TrainConfig(data_dir=featured_data, model_dir=str(tmp_path / "m"), model="neumf",
                       embedding_dim=4, mlp_embedding_dim=4, layers=(8, 4), epochs=1,
                       batch_size=64, jit_compile=True, checkpoint_every_secs=0)
  with tf.device("/cpu:0"), tf.variable_creator_scope(like_a_gpu):
    result = train.train_and_evaluate(config)
  assert tf.int64 in created and np.isfinite(result["eval_rmse"])
  assert not moved, f"variables a GPU keeps on the host: {moved}"


@pytest.fixture(scope="module")
def implicit_data(tmp_path_factory):
  from trainer.config import PrepareConfig
  from trainer.data import preparation
  out = str(tmp_path_factory.mktemp("guard_implicit"))
  preparation.prepare(PrepareConfig(output_dir=out, num_users=60, num_items=40,
                                    num_ratings=1200, implicit=True, split="leave_one_out",
                                    eval_negatives=10, num_shards=1))
  return out


GRID = [  # (model, task, optimizer, precision, jit, side features, --deterministic): every
    # model, task, optimizer and precision, with and without XLA, side features with each, and
    # --deterministic with the ops that raised under it on a GPU (autorec's product, lazy
    # Adam's table-sized sum, the sampled protocol's rank counts)
    ("seed_mlp", "explicit", "adam", "float32", True, False, False),
    ("neumf", "implicit", "lazy_adam", "bfloat16", False, False, False),
    ("gmf", "implicit_bpr", "adagrad", "float32", True, False, False),
    ("mf", "implicit_softmax", "sgd", "float16", False, False, False),
    ("mlp", "implicit", "lazy_adam", "float32", False, False, True),
    ("autorec", "explicit", "lazy_adam", "float16", True, False, False),
    ("neumf", "explicit", "adam", "bfloat16", True, True, False),
    ("mf", "explicit", "lazy_adam", "float16", False, True, False),
    ("autorec", "explicit", "lazy_adam", "float32", False, False, True),
]


def _grid_id(row) -> str:
  return "-".join(map(str, row[:5])) + ("-features" if row[5] else "") + (
      "-deterministic" if row[6] else "")


@pytest.mark.slow
@pytest.mark.parametrize("model,task,optimizer,precision,jit,features,deterministic", GRID,
                         ids=[_grid_id(g) for g in GRID])
def test_every_op_of_training_evaluation_and_serving_has_a_gpu_kernel(
    tiny_data_dir, implicit_data, featured_data, mirrored_strategy, tmp_path, monkeypatch,
    model, task, optimizer, precision, jit, features, deterministic):
  from trainer import export, train
  from trainer.config import TrainConfig
  tf.function(lambda x: x + 1, jit_compile=True)(tf.ones(1))  # registers the XLA kernels
  monkeypatch.setenv("NEUMF_GPU_CODE_PATHS", "1")  # build what a GPU machine builds
  data_dir = featured_data if features else tiny_data_dir if task == "explicit" else implicit_data
  config = TrainConfig(
      data_dir=data_dir, model_dir=str(tmp_path / "m"), model=model, task=task,
      optimizer=optimizer, mixed_precision=precision, jit_compile=jit, epochs=1,
      batch_size=60 if task in ("implicit", "implicit_bpr") else 64, embedding_dim=4,
      hidden_units=4, layers=(8, 4), mlp_embedding_dim=4, num_negatives=2, num_cpu_devices=2,
      deterministic=deterministic, checkpoint_every_secs=0)
  exported = export.export_saved_model
  serving = {}

  def recorded(*args, **kwargs):  # the export's functions: serving, host-side by design
    serving.update(_functions(lambda: exported(*args, **kwargs)))

  monkeypatch.setattr(export, "export_saved_model", recorded)
  was = tf_config.is_op_determinism_enabled()
  try:
    functions = _functions(lambda: train.train_and_evaluate(config, mirrored_strategy))
  finally:
    if deterministic and not was:  # (a --deterministic run turns it on for the process)
      tf_config.disable_op_determinism()
  steps = step_functions({n: f for n, f in functions.items() if n not in serving})
  assert any("train_loop" in n for n in steps) and any("sums" in n for n in steps), sorted(steps)
  broken = guard_violations(steps, deterministic)
  broken += guard_violations(serving, deterministic, host=_serving_host_by_design)
  assert not broken, "\n".join(f"{config.model} ({task}, {optimizer}, {precision}, jit {jit}, "
                               f"features {features}, deterministic {deterministic}): "
                               f"{rule}: {op} [{dtypes}] in {name}"
                               for rule, op, dtypes, name in broken)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_feature_gradients_sum_in_float32_under_mixed_precision(policy):
  """M1: one feature value shared by 4096 rows of a batch sums 4096 gradients into its row;
  in bfloat16 the sum stops at 256 (256 + 1 rounds to 256)."""
  import keras
  from trainer.models import side_features as fl
  infos = [schema.FeatureInfo("item", "genre", "categorical", 3)]
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy(policy)
  try:
    layer = fl.FeatureEmbedding(infos, 2)
  finally:
    keras.config.set_dtype_policy(previous)
  rows = 4096
  combined = {"indices": tf.ones([rows, 1], tf.int64), "weights": tf.ones([rows, 1]),
              "numeric": tf.zeros([rows, 0])}
  with tf.GradientTape() as tape:
    output = layer(combined, training=True)
    loss = tf.reduce_sum(tf.cast(output, tf.float32))
  assert output.dtype == layer.compute_dtype != "float32"
  gradient = tf.convert_to_tensor(tape.gradient(loss, layer.embeddings.value))
  assert gradient.dtype == tf.float32
  np.testing.assert_array_equal(gradient.numpy()[1], [rows, rows])
