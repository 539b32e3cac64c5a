"""The data contract between preparation, the input pipeline, the models and the export.

Everything that names a feature, a dtype, a file of a prepared data directory or a field of its
metadata lives here, so that the writer (`trainer.data.writer`), the reader
(`trainer.data.artifacts`), the model inputs and the serving signature cannot drift apart.

Layout of a prepared directory (the one description of it):

  users.vocab, items.vocab       raw IDs, one per line; line n is dense index n (most frequent
                                 first, ties by ID)
  train-SSSSS-of-NNNNN.tfrecord  training examples in blocks (the record layout below;
                                 `trainer.data.records` encodes and parses them)
  eval-SSSSS-of-NNNNN.tfrecord   held-out examples
  train_positives.npz            each user's training items, compressed sparse rows: `indptr`
                                 [users + 1], `indices` [train rows] (what full-ranking
                                 evaluation and serving exclude), `time_rank` (each one's rank
                                 in its user's time order), `rating_sum` [users]
  eval_negatives.npz             leave-one-out with --eval_negatives: `users`, `positives`,
                                 `negatives` [eval users, N], sampled from items the user never
                                 interacted with, fixed by the seed; with context, each eval
                                 row's `context_<name>` [eval users]
  <side>_features.npz            side features: one array per feature, indexed by dense ID
  <side>_<feature>.vocab         a categorical or multi-hot feature's values, one per line
                                 (`context_<feature>.vocab` for a categorical context column)
  metadata.json                  counts, density, rating histogram, split protocol, inputs'
                                 fingerprints, where every row read went (`Metadata`); written
                                 last: a directory without it is incomplete

Record layout. One TFRecord record holds a *block* of up to `BLOCK_SIZE` examples as packed
lists (`user`, `item`: int64 dense indices; `rating`: float; with context, `context_<name>`
per feature: int64 indices, or float for a numeric one). Parsing one record per example
tops out near 0.3M examples/s on a 2-core machine; parsing blocks and re-slicing them with
`Dataset.rebatch` reaches an order of magnitude more, which training at several hundred
thousand examples per second needs.
"""

import dataclasses
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from trainer import strict_json

SCHEMA_VERSION = 3
# Versions this trainer reads: 2 is 3 without context (no `context` entries, no context
# columns in the records).
READABLE_SCHEMA_VERSIONS = (2, 3)

# Feature names: the keys of parsed batches and of the model's input dict.
USER = "user"
ITEM = "item"
RATING = "rating"
LABEL = "label"  # implicit feedback: 1 for an observed pair, 0 for a sampled negative
# Sampled training batches: the observed item each example was drawn for (a positive's own,
# its negatives' positive's), so a negative is scored in its positive's context (`--history`).
ANCHOR = "anchor"

# Context (per-interaction features, `trainer.data.context`): the side of their FeatureInfos,
# and the key of each in records, batches and serving inputs.
CONTEXT = "context"


def context_key(name: str) -> str:
  """The key of context feature `name` in records and batches (and its serving input)."""
  return f"{CONTEXT}_{name}"


def context_of(batch: Mapping[str, Any]) -> Dict[str, Any]:
  """The context features of a batch: its entries under `context_key`s."""
  return {key: value for key, value in batch.items() if key.startswith(CONTEXT + "_")}


BLOCK_SIZE = 1024

METADATA_FILE = "metadata.json"
USER_VOCAB_FILE = "users.vocab"
ITEM_VOCAB_FILE = "items.vocab"
# Each user's training items as compressed sparse rows: `indptr` [users + 1], `indices` [rows]
# (items sorted within a user); `time_rank` [rows], each one's rank in its user's time order
# (0: the earliest, by timestamp then input row; absent from data prepared before it); and
# `rating_sum` [users], the sum of each user's training ratings.
TRAIN_POSITIVES_FILE = "train_positives.npz"
# Leave-one-out with eval negatives: `users`, `positives` [eval users], `negatives` [eval users, N].
EVAL_NEGATIVES_FILE = "eval_negatives.npz"

def feature_table_file(side: str) -> str:
  """One side's feature table (`user` or `item`): an `.npz` of arrays indexed by dense ID."""
  return f"{side}_features.npz"


def feature_vocab_file(side: str, name: str) -> str:
  """The vocabulary of one categorical or multi-hot feature: line n is index n + 1."""
  return f"{side}_{name}.vocab"


TRAIN = "train"
EVAL = "eval"
SPLITS = (TRAIN, EVAL)


def shard_file_name(split: str, index: int, num_shards: int) -> str:
  """Returns the file name of one shard, e.g. `train-00003-of-00008.tfrecord`."""
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def shard_pattern(split: str) -> str:
  """Returns the glob that matches every shard of `split`."""
  return f"{split}-*-of-*.tfrecord"


# Kinds looked up through an embedding of indices (0: missing); numeric ones are projected.
INDEXED_KINDS = ("categorical", "bucketized", "multi_hot")


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
  """What a model needs to know of one prepared feature (from the metadata)."""

  side: str
  name: str
  kind: str
  vocab_size: int = 0  # indexed kinds: indices 0..vocab_size - 1
  width: int = 1  # multi_hot: values per entity at most

  @classmethod
  def from_metadata(cls, entry: Mapping) -> "FeatureInfo":
    return cls(entry["side"], entry["name"], entry["kind"], int(entry.get("vocab_size", 0)),
               int(entry.get("width", 1)))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class SideFeatures:
  """One side's features: what they are and their tables ([rows] or [rows, width])."""

  infos: List[FeatureInfo]
  tables: Dict[str, np.ndarray]

  @property
  def rows(self) -> int:
    return len(next(iter(self.tables.values())))


@dataclasses.dataclass(frozen=True)
class Metadata:
  """What a prepared data directory holds; written last, so its presence marks completion.

  eval_fraction is the requested hold-out fraction (0 for leave-one-out and for a temporal split
  at an explicit cutoff); rating_histogram counts each rating value (or 20 bins when there are
  many values); input_fingerprint identifies the input (files' sha256, TFDS name and version,
  or the synthetic parameters).
  """

  num_users: int
  num_items: int
  num_train: int
  num_eval: int
  rating_min: float
  rating_max: float
  train_rating_mean: float
  num_shards: int
  source: str
  split: str
  eval_fraction: float
  seed: int
  inputs: Sequence[str] = ()
  eval_users_unseen_in_train: int = 0
  eval_items_unseen_in_train: int = 0
  # --split=given: eval rows whose user or item is not in the training rows (written with the
  # out-of-vocabulary index).
  eval_rows_out_of_vocabulary: int = 0
  implicit: bool = False  # no ratings in the input: every interaction is 1.0
  temporal_cutoff: Optional[int] = None  # temporal split: eval = timestamp >= this
  min_user_interactions: int = 1
  eval_negatives: int = 0  # leave-one-out: sampled negatives per eval user
  duplicates_policy: str = "error"
  duplicates_merged: int = 0
  # Where every row went: rows_read = num_train + num_eval + bad_rows_skipped +
  # duplicates_merged + rows_filtered (checked when written). Blank lines are not rows.
  rows_read: int = 0
  bad_rows_skipped: int = 0
  bad_rows_by_reason: Dict[str, int] = dataclasses.field(default_factory=dict)
  rows_filtered: int = 0  # rows of the users under --min_user_interactions
  blank_lines: int = 0
  users_filtered: int = 0
  density: float = 0.0
  rating_histogram: Dict[str, int] = dataclasses.field(default_factory=dict)
  input_fingerprint: Dict[str, Any] = dataclasses.field(default_factory=dict)
  block_size: int = BLOCK_SIZE
  # Examples in each training shard, in shard order: where an input pipeline's epochs begin,
  # so a resumed run can continue mid-epoch. Empty in directories of older versions.
  train_shard_examples: Sequence[int] = dataclasses.field(default_factory=list)
  # Side features (trainer.data.features): one entry per feature ({side, name, kind, missing,
  # vocab_size / width / mean, std / edges}), and per side's file where it came from, its rows
  # whose ID is not in the log and the log's IDs with no row. Context features (side
  # `context`, trainer.data.context) are listed here too, after the sides'; their values are
  # in the records.
  features: Sequence[Dict[str, Any]] = dataclasses.field(default_factory=list)
  feature_files: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
  # What the model's rows mean (trainer.data.lineage): a digest of the vocabularies and the
  # features' statistics; and, prepared on a base (--base_data_dir), the lineage: the base's
  # directory and fingerprint, every ancestor's fingerprint, per vocabulary its old, new and
  # absent entries.
  vocabulary_fingerprint: str = ""
  lineage: Dict[str, Any] = dataclasses.field(default_factory=dict)
  schema_version: int = SCHEMA_VERSION

  def to_json(self) -> str:
    return strict_json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

  @classmethod
  def from_json(cls, text: str, where: Optional[str] = None) -> "Metadata":
    """Parses metadata, refusing other schema versions and unknown or missing fields."""
    where = where or "metadata"
    try:
      fields: Dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not valid JSON ({e})") from e
    version = fields.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
      raise ValueError(f"{where}: schema_version {version!r} is not supported by this "
                       f"trainer (expects {SCHEMA_VERSION}); prepare the data again")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(f"{where}: unknown fields {unknown}")
    try:
      return cls(**fields)
    except TypeError as e:
      raise ValueError(f"{where}: {e}") from e
