"""Warm start: a new run begins from an earlier run's model, on data prepared on its data.

`neumf-train --warm_start_from=M0` (the model_dir of a finished or stopped run) builds the model
for the new data directory's vocabularies and, before the first step, copies from the
checkpoint M0 exported (its best epoch's, or with --nokeep_best its last; or
`--warm_start_checkpoint=best|latest`):

- every ID and feature table, row by row: the rows of M0's IDs and feature values (which a
  directory prepared with `--base_data_dir` keeps at their indices, `trainer.data.lineage`)
  and each table's out-of-vocabulary row; new rows keep the new model's initial values
  (seeded by --seed; a row-block-initialised table's, every ID table's but autorec's
  encoder, are the same however it is sharded);
- the optimizer's slots of those rows (lazy Adam's moments), read by the slots' place in M0's
  optimizer, never by order of creation; new rows' slots are zeros;
- every other trainable weight (dense layers, biases, recency weights) as it is.

What starts anew: the step counter (the optimizer's iterations) and with it the learning-rate
schedule (lazy Adam's bias correction continues from M0's updates, as its moments do: see
`_continue_bias_correction`), the training state (epochs, best metric) and the data
the model carries (mf's histories, autorec's interactions, the feature index tables), which
come from the new data. Non-trainable random state (dropout generators) follows --seed.

M0 is read from its checkpoint by key (`tf.train.load_checkpoint`), whatever strategy wrote
it: a table saved by a parameter-server run is one tensor, its slots one per shard (joined
here by their shard order); the new model's tables and slots are written shard by shard. So a
warm start goes from and to one device, several replicas, or any number of ps shards.

What cannot be mapped is refused before any training, naming what differs: another model,
task or size (`SHAPING_FIELDS`), another set of features, or data not prepared on M0's.
A warm-started run checkpoints as any run: killed, it resumes from its own checkpoints.
"""

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.core.protobuf import trackable_object_graph_pb2
# The object graph's traversal with each object's path: what tf.train.Checkpoint keys by.
from tensorflow.python.checkpoint import graph_view  # pylint: disable=g-direct-tensorflow-import

from trainer import parameter_server, run_dir, schema
from trainer.checkpointer import BEST_SUBDIR
from trainer.config import TrainConfig
from trainer.data import artifacts, lineage
from trainer.errors import ConfigError
from trainer.models.layers import Embedding
from trainer.models.side_features import INDEXED_KINDS, FeatureEmbedding

# The configuration fields a model's weights' shapes and meaning depend on, per model (every
# model: its name and task, which set the output and the loss).
SHAPING_FIELDS = {"seed_mlp": ("embedding_dim", "hidden_units"),
                  "gmf": ("embedding_dim",),
                  "mlp": ("embedding_dim", "layers"),
                  "neumf": ("embedding_dim", "mlp_embedding_dim", "layers"),
                  "mf": ("embedding_dim", "history"),
                  "autorec": ("embedding_dim", "autorec_side")}
_VALUE = ".ATTRIBUTES/VARIABLE_VALUE"

# A table's rows: (first row in M0's table, first row in the new one, rows) per copied run.
Segments = List[Tuple[int, int, int]]


@dataclasses.dataclass
class Source:
  """What a warm start copies from, checked against the new run."""

  model_dir: str
  checkpoint: str
  config: TrainConfig
  data: artifacts.PreparedData  # M0's prepared data (its vocabularies' sizes)


def check(config: TrainConfig, data: artifacts.PreparedData) -> Source:
  """Finds M0's checkpoint and refuses a run it cannot be mapped into, before any work.

  Raises:
    ConfigError: naming --warm_start_from and every field, feature or vocabulary that
      differs.
  """
  flag = f"--warm_start_from={config.warm_start_from}"
  try:
    old = run_dir.load_config(config.warm_start_from)
  except ConfigError as e:
    raise ConfigError(f"{flag}: {e}") from None
  fields = ("model", "task") + SHAPING_FIELDS[config.model]
  differ = [f"{name}={getattr(old, name)!r} there, {getattr(config, name)!r} here"
            for name in fields if getattr(old, name) != getattr(config, name)]
  if differ:
    raise ConfigError(f"{flag} holds a run of another model ({'; '.join(differ)}): a warm "
                      "start needs the same model, task and sizes")
  try:
    old_data = artifacts.PreparedData(old.data_dir)
  except ConfigError as e:
    raise ConfigError(f"{flag}: its data directory {old.data_dir!r} cannot be read ({e}); "
                      "a warm start maps rows by it") from None
  _check_lineage(flag, old.data_dir, data)
  old_features = _feature_set(old_data, old.features)
  new_features = _feature_set(data, config.features)
  if old_features != new_features:
    raise ConfigError(f"{flag} was trained with features {_shown(old_features)}, this run has "
                      f"{_shown(new_features)} (--features): a warm start needs the same set")
  directory = old.resolved_checkpoint_dir
  if config.warm_start_checkpoint == "best" or (config.warm_start_checkpoint == "exported"
                                                and old.keep_best):
    directory = f"{directory.rstrip('/')}/{BEST_SUBDIR}"
  checkpoint = tf.train.latest_checkpoint(directory)
  if checkpoint is None:
    raise ConfigError(f"{flag}: no checkpoint in {directory} (--warm_start_checkpoint="
                      f"{config.warm_start_checkpoint})")
  return Source(config.warm_start_from, checkpoint, old, old_data)


def _check_lineage(flag: str, old_dir: str, data: artifacts.PreparedData) -> None:
  """The new data must be M0's, or prepared on it (directly or through other bases)."""
  try:
    old_fingerprint = lineage.load(old_dir, "warm_start_from's data_dir").fingerprint
    new = lineage.load(data.data_dir, "data_dir")
  except ValueError as e:
    raise ConfigError(f"{flag}: {e}") from None
  if old_fingerprint not in [new.fingerprint] + list(data.metadata.lineage.get("ancestors", [])):
    raise ConfigError(f"{flag} was trained on {old_dir}, and --data_dir={data.data_dir} was "
                      "not prepared on it: prepare the new log with neumf-prepare "
                      f"--base_data_dir={old_dir} (its IDs then keep their rows)")


def _feature_set(data: artifacts.PreparedData, selection: str) -> List[Tuple[str, str, str]]:
  return sorted((i.side, i.name, i.kind) for i in artifacts.select_features(
      data.feature_infos(), selection, data.data_dir))


def _shown(features: Sequence[Tuple[str, str, str]]) -> str:
  return ", ".join(f"{side}:{name} ({kind})" for side, name, kind in features) or "none"


# ----------------------------------------------------------------------------- rows


def _id_segments(old_rows: int, new_rows: int) -> Segments:
  """An ID table's rows: M0's IDs at their indices, its out-of-vocabulary row (the last) to
  the new table's last."""
  return [(0, 0, old_rows - 1), (old_rows - 1, new_rows - 1, 1)]


def _feature_segments(old_infos: Sequence[schema.FeatureInfo],
                      new_infos: Sequence[schema.FeatureInfo]) -> Segments:
  """A feature embedding's rows: each indexed feature's block (its vocabulary, row 0 the
  missing value) at the new block's start."""
  old_offsets, offset = {}, 0
  for info in old_infos:
    if info.kind in INDEXED_KINDS:
      old_offsets[info.name] = (offset, info.vocab_size)
      offset += info.vocab_size
  segments, offset = [], 0
  for info in new_infos:
    if info.kind in INDEXED_KINDS:
      start, size = old_offsets[info.name]
      segments.append((start, offset, min(size, info.vocab_size)))
      offset += info.vocab_size
  return segments


def _remap(old: np.ndarray, fresh: np.ndarray, segments: Optional[Segments]) -> np.ndarray:
  """`fresh` with M0's rows copied in (`segments`), or M0's value itself (None)."""
  if segments is None:
    return old
  out = np.array(fresh, copy=True)
  for source, target, rows in segments:
    out[target:target + rows] = old[source:source + rows]
  return out


# ----------------------------------------------------------------------------- M0's checkpoint


class _Saved:
  """M0's checkpoint, read by object path: values, and optimizer slots by their variable."""

  def __init__(self, path: str):
    self.reader = tf.train.load_checkpoint(path)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(self.reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    self.nodes = graph.nodes
    self.optimizer = self._find_optimizer()

  def node(self, path: Sequence[str], start: int = 0) -> Optional[int]:
    for name in path:
      children = {c.local_name: c.node_id for c in self.nodes[start].children}
      if name not in children:
        return None
      start = children[name]
    return start

  def children(self, node: int) -> Dict[str, int]:
    return {c.local_name: c.node_id for c in self.nodes[node].children}

  def value(self, node: int) -> np.ndarray:
    return self.reader.get_tensor(self.nodes[node].attributes[0].checkpoint_key)

  def _find_optimizer(self) -> Optional[int]:
    """The optimizer node that holds the slots (inside a loss-scale wrapper: its inner one)."""
    for path in (("optimizer",), ("optimizer", "inner_optimizer")):
      node = self.node(path)
      if node is not None and "_trainable_variables" in self.children(node):
        return node
    return None

  def slot_lists(self) -> List[str]:
    """The optimizer's per-variable slot lists (e.g. `_momentums`, `_velocities`)."""
    if self.optimizer is None:
      return []
    children = self.children(self.optimizer)
    count = len(self.nodes[children["_trainable_variables"]].children)
    return sorted(name for name, node in children.items()
                  if name not in ("_trainable_variables", "_variables")
                  and len(self.nodes[node].children) == count and count)

  def slot(self, slot_list: str, variable_node: int, variable_path: str) -> np.ndarray:
    """A variable's slot, whole: by the variable's own place among the optimizer's, or (a
    sharded table) its shards' places, in shard order."""
    leaves = self.children(self.children(self.optimizer)["_trainable_variables"])
    slots = self.children(self.children(self.optimizer)[slot_list])
    index = {node: name for name, node in leaves.items()}
    if variable_node in index:
      return self.value(slots[index[variable_node]])
    parts = []
    for name, node in leaves.items():
      full = self.nodes[node].attributes[0].full_name if self.nodes[node].attributes else ""
      if full.startswith(f"{variable_path}/part_"):
        parts.append((int(full.rsplit("_", 1)[1]), self.value(slots[name])))
    if not parts:
      raise KeyError(variable_path)
    return np.concatenate([value for _, value in sorted(parts)])


# ----------------------------------------------------------------------------- the copy


def _checkpoint_paths(model: keras.Model) -> Dict[int, List[str]]:
  """{id(object): its path from a checkpoint's root} of the model's objects: the names a
  checkpoint of `tf.train.Checkpoint(model=...)` keys them by."""
  root = tf.train.Checkpoint(model=model)  # (the view holds it weakly: alive while it walks)
  _, paths = graph_view.ObjectGraphView(root).breadth_first_traversal()
  return {id(obj): [ref.name for ref in path] for obj, path in paths.items()}


def _leaves(variable) -> list:
  """The variables that hold `variable`'s rows: its shards in order, or itself."""
  value = getattr(variable, "value", variable)
  return list(value.variables) if parameter_server.is_sharded(value) else [variable]


def _read(variable) -> np.ndarray:
  values = [np.asarray(leaf.numpy()) for leaf in _leaves(variable)]
  return values[0] if len(values) == 1 else np.concatenate(values)


def _write(leaves: Sequence, value: np.ndarray) -> None:
  """Assigns `value` to `leaves` (shards in order take consecutive rows)."""
  row = 0
  for leaf in leaves:
    rows = int(leaf.shape[0]) if len(leaf.shape) else 1
    leaf.assign(value[row:row + rows] if len(leaf.shape) else value)
    row += rows


def _segments_for(variable, owner, source: Source,
                  data: artifacts.PreparedData) -> Optional[Segments]:
  """How `variable`'s rows map (None: copied whole)."""
  if isinstance(owner, Embedding) and owner.vocabulary in (schema.USER, schema.ITEM):
    return _id_segments(*(int(m.num_users if owner.vocabulary == schema.USER
                              else m.num_items) + 1 for m in (source.data.metadata,
                                                              data.metadata)))
  if isinstance(owner, FeatureEmbedding) and variable is owner.embeddings:
    side = owner.infos[0].side
    old_infos = [i for i in artifacts.select_features(source.data.feature_infos(),
                                                      source.config.features,
                                                      source.data.data_dir) if i.side == side]
    return _feature_segments(old_infos, owner.infos)
  return None


def _owners(model: keras.Model) -> Dict[int, object]:
  """{id(variable): the layer that made it} for the layers whose rows map."""
  owners = {}
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if isinstance(layer, (Embedding, FeatureEmbedding)):
      for variable in layer.trainable_weights:
        owners[id(variable)] = layer
  return owners


def apply(source: Source, data: artifacts.PreparedData, model: keras.Model,
          optimizer: keras.optimizers.Optimizer) -> Dict[str, object]:
  """Copies M0's weights and slots into the freshly built `model` and its built `optimizer`.

  Returns:
    What was copied, for the log and metrics.json.

  Raises:
    ConfigError: a weight of M0 has a shape the new model's cannot take, naming it.
  """
  saved = _Saved(source.checkpoint)
  paths = _checkpoint_paths(model)
  owners = _owners(model)
  inner = getattr(optimizer, "inner_optimizer", optimizer)
  slot_lists = [name for name in saved.slot_lists() if isinstance(getattr(inner, name, None),
                                                                 list)]
  if saved.optimizer is None or not slot_lists:
    logging.warning("Warm start: %s holds no optimizer slots%s; every slot starts at zero",
                    source.checkpoint, "" if saved.optimizer is None else
                    f" that {type(inner).__name__} keeps (another --optimizer)")
  tables = {}
  for variable in model.trainable_weights:
    path = paths.get(id(variable)) or paths.get(id(getattr(variable, "value", None)))
    node = saved.node(path) if path else None
    if node is None:
      raise ConfigError(f"--warm_start_from={source.model_dir}: {source.checkpoint} has no "
                        f"{variable.path} (checkpoint key {'/'.join(path or ['?'])})")
    old = saved.value(node)
    segments = _segments_for(variable, owners.get(id(variable)), source, data)
    fresh = _read(variable)
    _check_shape(source, variable, old, fresh, segments)
    _write(_leaves(variable), _remap(old, fresh, segments))
    if segments is not None:
      tables[variable.path] = {"rows": int(fresh.shape[0]),
                               "copied": int(sum(rows for *_, rows in segments))}
    leaves = _leaves(variable)
    for slot_list in slot_lists:
      index = inner._get_variable_index  # pylint: disable=protected-access
      slots = [getattr(inner, slot_list)[index(leaf)] for leaf in leaves]
      old_slot = saved.slot(slot_list, node, variable.path)
      _write(slots, _remap(old_slot, np.zeros(fresh.shape, old_slot.dtype), segments))
  summary = {"from": source.model_dir, "checkpoint": source.checkpoint,
             "slots": slot_lists, "tables": tables,
             "bias_correction_steps": _continue_bias_correction(saved, inner, slot_lists)}
  logging.info("Warm start from %s: %d weights copied (%s), slots %s; new rows initialised",
               source.checkpoint, len(model.trainable_weights),
               ", ".join(f"{k} {v['copied']} of {v['rows']} rows" for k, v in tables.items()),
               ", ".join(slot_lists) or "none")
  return summary


def _continue_bias_correction(saved: _Saved, optimizer: keras.optimizers.Optimizer,
                              slot_lists: Sequence[str]) -> int:
  """Lazy Adam's bias correction counts M0's updates (its moments are M0's): at step t of
  this run it corrects as at M0's updates + t. Restarting it with warm moments would divide
  each step by up to 7 for thousands of steps (sqrt(1 - b2^t) / (1 - b1^t): 0.15 at t = 10,
  0.31 at 100, 0.80 at 1000), so that a short warm run hardly moves. Returns the count (0
  for another optimizer, or without M0's slots)."""
  if not slot_lists or not hasattr(optimizer, "warm_start_steps"):
    return 0
  steps = int(saved.value(saved.node(["_iterations"], saved.optimizer)))
  earlier = saved.node(["warm_start_steps"], saved.optimizer)
  steps += int(saved.value(earlier)) if earlier is not None else 0
  optimizer.warm_start_steps.assign(steps)
  return steps


def _check_shape(source: Source, variable, old: np.ndarray, fresh: np.ndarray,
                 segments: Optional[Segments]) -> None:
  fits = (old.shape == fresh.shape if segments is None else
          old.shape[1:] == fresh.shape[1:]
          and all(s + r <= old.shape[0] and t + r <= fresh.shape[0] for s, t, r in segments))
  if not fits:
    raise ConfigError(f"--warm_start_from={source.model_dir}: {variable.path} is "
                      f"{list(old.shape)} there and {list(fresh.shape)} here; it cannot be "
                      "mapped")
