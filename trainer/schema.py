"""The data contract between preparation, the input pipeline, the models and the export.

Everything that names a feature, a dtype, a file of a prepared data directory or a field of its
metadata lives here, so that the writer, the reader, the model inputs and the serving signature
cannot drift apart.

Record layout. One TFRecord record holds a *block* of up to `BLOCK_SIZE` examples as packed
lists (`user`, `item`: int64 dense indices; `rating`: float). Parsing one record per example
tops out near 0.3M examples/s on a 2-core machine; parsing blocks and re-slicing them with
`Dataset.rebatch` reaches an order of magnitude more, which training at several hundred
thousand examples per second needs.
"""

import dataclasses
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from trainer import strict_json

SCHEMA_VERSION = 2

# Feature names: the keys of parsed batches and of the model's input dict.
USER = "user"
ITEM = "item"
RATING = "rating"
LABEL = "label"  # implicit feedback: 1 for an observed pair, 0 for a sampled negative
# Sampled training batches: the observed item each example was drawn for (a positive's own,
# its negatives' positive's), so a negative is scored in its positive's context (`--history`).
ANCHOR = "anchor"

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

_FEATURE_SPEC = {
    USER: tf.io.RaggedFeature(tf.int64),
    ITEM: tf.io.RaggedFeature(tf.int64),
    RATING: tf.io.RaggedFeature(tf.float32),
}


def shard_file_name(split: str, index: int, num_shards: int) -> str:
  """Returns the file name of one shard, e.g. `train-00003-of-00008.tfrecord`."""
  return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def shard_pattern(split: str) -> str:
  """Returns the glob that matches every shard of `split`."""
  return f"{split}-*-of-*.tfrecord"


def _varints(values: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Protobuf varints of non-negative integers, vectorised over a whole array.

  Returns:
    (data, offsets): the concatenated encodings (uint8) and offsets [n + 1], so value k is
    data[offsets[k]:offsets[k + 1]].
  """
  values = np.asarray(values)
  if len(values) and values.min() < 0:
    raise ValueError("indices must not be negative")
  top = int(values.max()) if len(values) else 0
  v = values.astype(np.uint32 if top < 2**32 else np.uint64)  # narrow: less memory to touch
  groups = max(1, (top.bit_length() + 6) // 7)
  width = np.ones(len(v), np.uint8)  # bytes per value
  for k in range(1, groups):
    width += v >= (1 << (7 * k))
  data = np.empty((len(v), groups), np.uint8)
  for k in range(groups):  # byte k: 7 bits, with the continuation bit when more follow
    data[:, k] = ((v >> (7 * k)) & 0x7F).astype(np.uint8) | ((width > k + 1).view(np.uint8)
                                                            << 7)
  offsets = np.zeros(len(v) + 1, np.int64)
  np.cumsum(width, out=offsets[1:])
  return data[np.arange(groups, dtype=np.uint8)[None, :] < width[:, None]], offsets


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_blocks(users: np.ndarray, items: np.ndarray, ratings: np.ndarray,
                  block_size: int = BLOCK_SIZE) -> List[bytes]:
  """Serializes examples as `tf.train.Example` records of up to `block_size` packed examples.

  The bytes are built directly, vectorised over all blocks (what the protobuf library would
  lay out, field by field): building protos from Python lists costs more than everything else
  of preparation.

  Args:
    users: int dense user indices, shape [n].
    items: int dense item indices, shape [n].
    ratings: float ratings, shape [n].
    block_size: examples per record, 1..BLOCK_SIZE.

  Returns:
    ceil(n / block_size) serialized records, in order.
  """
  n = len(users)
  if not 0 < block_size <= BLOCK_SIZE or len(items) != n or len(ratings) != n:
    raise ValueError(f"blocks need 1..{BLOCK_SIZE} aligned examples each, got block_size "
                     f"{block_size} and {len(users)} users, {len(items)} items, "
                     f"{len(ratings)} ratings")
  user_data, user_offsets = _varints(users)
  item_data, item_offsets = _varints(items)
  float_data = np.asarray(ratings, "<f4").tobytes()
  user_key, item_key, rating_key = (_field(1, name.encode()) for name in (USER, ITEM, RATING))
  records = []
  for start in range(0, n, block_size):
    end = min(start + block_size, n)
    user_list = user_data[user_offsets[start]:user_offsets[end]].tobytes()
    item_list = item_data[item_offsets[start]:item_offsets[end]].tobytes()
    features = (_field(1, user_key + _field(2, _field(3, _field(1, user_list))))
                + _field(1, item_key + _field(2, _field(3, _field(1, item_list))))
                + _field(1, rating_key + _field(2, _field(2, _field(
                    1, float_data[4 * start:4 * end])))))
    records.append(_field(1, features))
  return records


def encode_block(users: np.ndarray, items: np.ndarray, ratings: np.ndarray) -> bytes:
  """Serializes one block of 1..BLOCK_SIZE examples (see `encode_blocks`)."""
  n = len(users)
  if not 0 < n <= BLOCK_SIZE or len(items) != n or len(ratings) != n:
    raise ValueError(f"a block needs 1..{BLOCK_SIZE} aligned examples, got "
                     f"{len(users)} users, {len(items)} items, {len(ratings)} ratings")
  return encode_blocks(users, items, ratings)[0]


def parse_blocks(serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
  """Parses a batch of block records into flat example tensors.

  Args:
    serialized: string tensor of shape [num_records].

  Returns:
    A dict with `user`, `item` (int64) and `rating` (float32), each of shape [num_examples]:
    the blocks' examples concatenated in order.
  """
  parsed = tf.io.parse_example(serialized, _FEATURE_SPEC)
  return {name: value.flat_values for name, value in parsed.items()}


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
  # whose ID is not in the log and the log's IDs with no row.
  features: Sequence[Dict[str, Any]] = dataclasses.field(default_factory=list)
  feature_files: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
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
    if version != SCHEMA_VERSION:
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
