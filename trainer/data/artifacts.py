"""Reading a prepared data directory: the consumer's side of the data contract.

Preparation (`trainer.data.preparation`) writes the directory; training, evaluation, export and
the benchmarks read it only through this module, with the file names and the metadata of
`trainer.schema`. Every path may be `gs://`.
"""

import functools
import io
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from trainer import fileio, schema
from trainer.config import ConfigError
from trainer.data import pipeline


def load_metadata(data_dir: str) -> schema.Metadata:
  """Reads a prepared directory's metadata; the error names --data_dir when it is not one.

  Raises:
    ConfigError: metadata.json is missing, malformed or of another schema version.
  """
  path = fileio.join(data_dir, schema.METADATA_FILE)
  if not tf.io.gfile.exists(path):
    raise ConfigError(f"--data_dir={data_dir!r} is not a prepared data directory: {path} is "
                      "missing (run neumf-prepare first, or it was interrupted)")
  try:
    return schema.Metadata.from_json(fileio.read_text(path), where=path)
  except ValueError as e:
    raise ConfigError(f"--data_dir={data_dir!r}: {e}") from e


def load_npz(path: str) -> Dict[str, np.ndarray]:
  """Reads an `.npz` written by preparation, local or `gs://`."""
  with tf.io.gfile.GFile(path, "rb") as f:
    with np.load(io.BytesIO(f.read())) as z:
      return {k: z[k] for k in z.files}


def sparse_rows(rows: np.ndarray, columns: np.ndarray, values: np.ndarray,
                num_rows: int) -> Dict[str, np.ndarray]:
  """(row, column, value) triples as compressed sparse rows, columns sorted in a row:
  `indptr` [num_rows + 2] (row `num_rows`, the OOV row, empty), `indices` (columns) and
  `values` (float32). Item-major over users: `sparse_rows(items, users, values, num_items)`."""
  rows, columns = np.asarray(rows), np.asarray(columns)
  order = np.lexsort((columns, rows))
  counts = np.bincount(rows, minlength=num_rows + 1)[:num_rows + 1]
  return {"indptr": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
          "indices": columns[order].astype(np.int64),
          "values": np.asarray(values, np.float32)[order]}


def pair_keys(positives: Dict[str, np.ndarray], num_items: int) -> np.ndarray:
  """u * num_items + i of every training pair, from the train_positives CSR: sorted (CSR
  order), as `pipeline.negative_sampler` takes them."""
  indptr = positives["indptr"]
  owners = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
  return owners * num_items + positives["indices"]


class PreparedData:
  """A prepared data directory, read lazily: what training, evaluation and export need.

  Args:
    data_dir: the directory (local or gs://), the output of neumf-prepare.

  Raises:
    ConfigError: the directory is not a complete prepared data directory.
  """

  def __init__(self, data_dir: str):
    self.data_dir = data_dir
    self.metadata = load_metadata(data_dir)

  def path(self, name: str) -> str:
    return fileio.join(self.data_dir, name)

  @property
  def train_pattern(self) -> str:
    return self.path(schema.shard_pattern(schema.TRAIN))

  @property
  def eval_pattern(self) -> str:
    return self.path(schema.shard_pattern(schema.EVAL))

  def check_shards(self) -> None:
    """Fails now, not in the middle of tracing, when a split has no shards."""
    for pattern in (self.train_pattern, self.eval_pattern):
      try:
        pipeline.list_shards(pattern)
      except ValueError as e:
        raise ConfigError(f"--data_dir={self.data_dir!r}: {e}") from e

  @functools.cached_property
  def train_positives(self) -> Dict[str, np.ndarray]:
    """Each user's training items: `indptr` [users + 1], `indices` [training rows]."""
    return load_npz(self.path(schema.TRAIN_POSITIVES_FILE))

  def train_interactions(self, side: str = schema.ITEM) -> Dict[str, np.ndarray]:
    """The training rows as sparse rows of `side` (item-major over users, or user-major over
    items: `sparse_rows`, what `models.InteractionTable` holds): ratings for explicit
    feedback, 1s for implicit. Reads the training shards once: O(training rows) memory, what
    a model that holds them (autorec) needs anyway."""
    users, items, ratings = [], [], []
    for batch in pipeline.make_dataset(self.train_pattern, 65536, training=False):
      users.append(batch[schema.USER].numpy())
      items.append(batch[schema.ITEM].numpy())
      ratings.append(batch[schema.RATING].numpy())
    users, items = np.concatenate(users), np.concatenate(items)
    values = np.ones(len(users), np.float32) if self.metadata.implicit else np.concatenate(ratings)
    if side == schema.USER:
      return sparse_rows(users, items, values, self.metadata.num_users)
    return sparse_rows(items, users, values, self.metadata.num_items)

  @functools.cached_property
  def eval_negatives(self) -> Optional[Dict[str, np.ndarray]]:
    """`users`, `positives`, `negatives` of the sampled protocol, or None when not prepared."""
    path = self.path(schema.EVAL_NEGATIVES_FILE)
    return load_npz(path) if tf.io.gfile.exists(path) else None

  def vocabularies(self) -> Tuple[List[str], List[str]]:
    """The raw user and item IDs, line n being dense index n.

    Raises:
      ValueError: their sizes disagree with the metadata.
    """
    users = fileio.read_lines(self.path(schema.USER_VOCAB_FILE))
    items = fileio.read_lines(self.path(schema.ITEM_VOCAB_FILE))
    if len(users) != self.metadata.num_users or len(items) != self.metadata.num_items:
      raise ValueError(f"--data_dir={self.data_dir}: vocabularies hold {len(users)} users and "
                       f"{len(items)} items but the metadata says {self.metadata.num_users} "
                       f"and {self.metadata.num_items}")
    return users, items

  def feature_infos(self) -> List[schema.FeatureInfo]:
    """Every prepared side feature, as the metadata lists them."""
    return [schema.FeatureInfo.from_metadata(e) for e in self.metadata.features]

  def side_features(self, selection: str = "all") -> Dict[str, schema.SideFeatures]:
    """{side: its selected features and their tables}, for the model.

    Args:
      selection: `all` (every prepared feature), `none`, or a comma-separated list of
        `name` or `side:name`.

    Raises:
      ConfigError: naming --features and a feature the directory does not hold.
    """
    infos = [i for i in select_features(self.feature_infos(), selection, self.data_dir)
             if i.side != schema.CONTEXT]
    out = {}
    for side in sorted({i.side for i in infos}):
      tables = load_npz(self.path(schema.feature_table_file(side)))
      chosen = [i for i in infos if i.side == side]
      out[side] = schema.SideFeatures(chosen, {i.name: tables[i.name] for i in chosen})
    return out

  def context_infos(self, selection: str = "all") -> List[schema.FeatureInfo]:
    """The context features `--features` selects (their values come with each example)."""
    return [i for i in select_features(self.feature_infos(), selection, self.data_dir)
            if i.side == schema.CONTEXT]

  def context_keys(self, selection: str = "all"):
    """(key, dtype, width) of the selected context features, as the records carry them (what
    `pipeline.make_dataset` parses; width 0: one value per example, else a multi-hot's)."""
    return [(schema.context_key(i.name), "float32" if i.kind == "numeric" else "int64",
             i.width if i.kind == "multi_hot" else 0) for i in self.context_infos(selection)]

  def feature_vocabulary(self, side: str, name: str) -> List[str]:
    """The values of a categorical or multi-hot feature: line n is index n + 1."""
    return fileio.read_lines(self.path(schema.feature_vocab_file(side, name)))


def select_features(infos: List[schema.FeatureInfo], selection: str,
                    data_dir: str) -> List[schema.FeatureInfo]:
  """The features `--features` selects among those prepared (see `side_features`)."""
  if selection == "none":
    return []
  if selection == "all":
    return list(infos)
  chosen = []
  for entry in (e.strip() for e in selection.split(",") if e.strip()):
    side, _, name = entry.rpartition(":")
    matches = [i for i in infos if i.name == name and side in ("", i.side)]
    if not matches:
      known = ", ".join(f"{i.side}:{i.name}" for i in infos) or "none"
      raise ConfigError(f"--features={selection}: --data_dir={data_dir} has no feature "
                        f"{entry!r} (it has: {known})")
    chosen += [m for m in matches if m not in chosen]
  return chosen
