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
from typing import Any, Dict, Optional, Sequence

import numpy as np
import tensorflow as tf

SCHEMA_VERSION = 2

# Feature names: the keys of parsed batches and of the model's input dict.
USER = "user"
ITEM = "item"
RATING = "rating"

BLOCK_SIZE = 1024

METADATA_FILE = "metadata.json"
USER_VOCAB_FILE = "users.vocab"
ITEM_VOCAB_FILE = "items.vocab"

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


def _varint_bytes(values: np.ndarray) -> bytes:
  """Protobuf varints of non-negative integers, vectorised: the packed payload of a list."""
  v = values.astype(np.uint64)
  if len(v) and (values < 0).any():
    raise ValueError("indices must not be negative")
  width = np.ones(len(v), np.int64)
  for k in range(1, 10):
    width += v >= np.uint64(1 << (7 * k))
  shifts = np.arange(int(width.max()) if len(v) else 1, dtype=np.uint64) * np.uint64(7)
  groups = ((v[:, None] >> shifts[None, :]) & np.uint64(0x7F)).astype(np.uint8)
  more = np.arange(len(shifts))[None, :] < (width[:, None] - 1)
  groups |= (more * 0x80).astype(np.uint8)
  return groups[np.arange(len(shifts))[None, :] < width[:, None]].tobytes()


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


def encode_block(users: np.ndarray, items: np.ndarray, ratings: np.ndarray) -> bytes:
  """Serializes one block of examples as a `tf.train.Example` of packed lists.

  The bytes are built directly (as `tf.train.Example(...).SerializeToString()` would lay them
  out): building the proto from Python lists costs more than everything else of preparation.

  Args:
    users: int dense user indices, shape [n], 1 <= n <= BLOCK_SIZE.
    items: int dense item indices, shape [n].
    ratings: float ratings, shape [n].

  Returns:
    The serialized record.
  """
  n = len(users)
  if not 0 < n <= BLOCK_SIZE or len(items) != n or len(ratings) != n:
    raise ValueError(f"a block needs 1..{BLOCK_SIZE} aligned examples, got "
                     f"{len(users)} users, {len(items)} items, {len(ratings)} ratings")

  def entry(name: str, feature: bytes) -> bytes:  # map<string, Feature> entry
    return _field(1, _field(1, name.encode()) + _field(2, feature))

  int64_list = lambda a: _field(3, _field(1, _varint_bytes(np.asarray(a))))  # noqa: E731
  float_list = _field(2, _field(1, np.asarray(ratings, "<f4").tobytes()))
  features = (entry(USER, int64_list(users)) + entry(ITEM, int64_list(items))
              + entry(RATING, float_list))
  return _field(1, features)


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
  rows_read: int = 0
  bad_rows_skipped: int = 0
  users_filtered: int = 0
  density: float = 0.0
  rating_histogram: Dict[str, int] = dataclasses.field(default_factory=dict)
  input_fingerprint: Dict[str, Any] = dataclasses.field(default_factory=dict)
  block_size: int = BLOCK_SIZE
  schema_version: int = SCHEMA_VERSION

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

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
