"""The record codec of example shards: blocks of examples as hand-encoded `tf.train.Example`
protos (`encode_blocks`, fast and byte-identical to TensorFlow's), parsed back a batch of
records at a time (`parse_blocks`). The names and the block size are `trainer.schema`'s."""

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from trainer.schema import BLOCK_SIZE, ITEM, RATING, USER


_FEATURE_SPEC = {
    USER: tf.io.RaggedFeature(tf.int64),
    ITEM: tf.io.RaggedFeature(tf.int64),
    RATING: tf.io.RaggedFeature(tf.float32),
}


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
                  block_size: int = BLOCK_SIZE,
                  context: Optional[Mapping[str, np.ndarray]] = None) -> List[bytes]:
  """Serializes examples as `tf.train.Example` records of up to `block_size` packed examples.

  The bytes are built directly, vectorised over all blocks (what the protobuf library would
  lay out, field by field): building protos from Python lists costs more than everything else
  of preparation.

  Args:
    users: int dense user indices, shape [n].
    items: int dense item indices, shape [n].
    ratings: float ratings, shape [n].
    block_size: examples per record, 1..BLOCK_SIZE.
    context: {key: [n] int64 (non-negative indices) or float32 values, or [n, width] int64
      (multi-hot, row-major)}: per-example context features, packed like the others under
      their keys (`schema.context_key`).

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
  extra = []  # (key, int varints and offsets, or float bytes)
  for key, value in sorted((context or {}).items()):
    if len(value) != n:
      raise ValueError(f"context {key!r} has {len(value)} values for {n} examples")
    value = np.asarray(value)
    width = value.shape[1] if value.ndim == 2 else 1  # multi-hot: [n, width], row-major
    if np.issubdtype(value.dtype, np.integer):
      extra.append((_field(1, key.encode()), _varints(value.ravel()), None, width))
    else:
      extra.append((_field(1, key.encode()), None, value.astype("<f4").tobytes(), width))
  records = []
  for start in range(0, n, block_size):
    end = min(start + block_size, n)
    user_list = user_data[user_offsets[start]:user_offsets[end]].tobytes()
    item_list = item_data[item_offsets[start]:item_offsets[end]].tobytes()
    features = (_field(1, user_key + _field(2, _field(3, _field(1, user_list))))
                + _field(1, item_key + _field(2, _field(3, _field(1, item_list))))
                + _field(1, rating_key + _field(2, _field(2, _field(
                    1, float_data[4 * start:4 * end])))))
    for key, ints, floats, width in extra:
      if ints is not None:
        data, offsets = ints
        value = _field(3, _field(1, data[offsets[start * width]:offsets[end * width]].tobytes()))
      else:
        value = _field(2, _field(1, floats[4 * start * width:4 * end * width]))
      features += _field(1, key + _field(2, value))
    records.append(_field(1, features))
  return records


def encode_block(users: np.ndarray, items: np.ndarray, ratings: np.ndarray) -> bytes:
  """Serializes one block of 1..BLOCK_SIZE examples (see `encode_blocks`)."""
  n = len(users)
  if not 0 < n <= BLOCK_SIZE or len(items) != n or len(ratings) != n:
    raise ValueError(f"a block needs 1..{BLOCK_SIZE} aligned examples, got "
                     f"{len(users)} users, {len(items)} items, {len(ratings)} ratings")
  return encode_blocks(users, items, ratings)[0]


def parse_blocks(serialized: tf.Tensor,
                 context: Sequence[Tuple[str, tf.DType, int]] = ()) -> Dict[str, tf.Tensor]:
  """Parses a batch of block records into flat example tensors.

  Args:
    serialized: string tensor of shape [num_records].
    context: (key, dtype, width) of the context features the records carry (int64 or
      float32; width 0 for one value per example, else a multi-hot's values per example).

  Returns:
    A dict with `user`, `item` (int64) and `rating` (float32), each of shape [num_examples]:
    the blocks' examples concatenated in order; and each context feature by its key.
  """
  spec = dict(_FEATURE_SPEC)
  spec.update({key: tf.io.RaggedFeature(dtype) for key, dtype, _ in context})
  parsed = tf.io.parse_example(serialized, spec)
  out = {name: value.flat_values for name, value in parsed.items()}
  for key, _, width in context:
    if width:
      out[key] = tf.reshape(out[key], [-1, width])
  return out
