"""The producer side of the prepared-directory contract (`trainer.schema` describes the layout;
`trainer.data.artifacts` reads it): example shards in blocks, byte-stable `.npz` files, the
training positives, eval negatives and feature tables, and the publication of a finished
directory (everything lands in a temporary folder first, metadata.json last)."""

import concurrent.futures
import os
import uuid
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import fileio, schema
from trainer.data import features, records
from trainer.data.scratch import BUCKET_ROWS, Scratch


_HISTOGRAM_MAX_VALUES = 64


class BlockWriter:
  """Deals full blocks of examples round-robin to a split's shards.

  Encoding and writing run in a background thread (one batch of blocks in flight, in order),
  overlapping the caller's next bucket; `close` waits for them.
  """

  def __init__(self, directory: str, split: str, num_shards: int, expected_rows: float):
    self.paths = [fileio.join(directory, schema.shard_file_name(split, s, num_shards))
                  for s in range(num_shards)]
    # Smaller blocks for a small split, so that every shard gets examples (a worker reading
    # an empty training shard would wait forever).
    self.block_size = max(1, min(schema.BLOCK_SIZE, int(expected_rows * 0.9 / num_shards)))
    self._writers = [tf.io.TFRecordWriter(p) for p in self.paths]
    self._pending: List[Dict[str, np.ndarray]] = []  # columns: user, item, rating, context
    self._pending_rows = 0
    self._next = 0
    self.rows = 0
    self.shard_rows = [0] * num_shards
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prepare-write")
    self._in_flight: Optional[concurrent.futures.Future] = None

  def add(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray,
          context: Optional[Dict[str, np.ndarray]] = None) -> None:
    """Queues examples; `context`: {key: [n] values} of their context features."""
    self._pending.append({schema.USER: users, schema.ITEM: items, schema.RATING: ratings,
                          **(context or {})})
    self._pending_rows += len(users)
    self.rows += len(users)
    if self._pending_rows >= self.block_size:
      self._flush(final=False)

  def _flush(self, final: bool) -> None:
    if not self._pending:
      return
    columns = {k: np.concatenate([p[k] for p in self._pending]) for k in self._pending[0]}
    n = len(columns[schema.USER])
    full = n if final else n - n % self.block_size
    if full:
      self._wait()
      self._in_flight = self._executor.submit(self._write,
                                              {k: v[:full] for k, v in columns.items()})
    self._pending = [{k: v[full:] for k, v in columns.items()}] if full < n else []
    self._pending_rows = n - full

  def _write(self, columns: Dict[str, np.ndarray]) -> None:
    context = {k: v for k, v in columns.items()
               if k not in (schema.USER, schema.ITEM, schema.RATING)}
    n = len(columns[schema.USER])
    encoded = records.encode_blocks(columns[schema.USER], columns[schema.ITEM],
                                    columns[schema.RATING], self.block_size, context)
    for b, record in enumerate(encoded):
      self._writers[self._next].write(record)
      self.shard_rows[self._next] += min(self.block_size, n - b * self.block_size)
      self._next = (self._next + 1) % len(self._writers)

  def _wait(self) -> None:
    if self._in_flight is not None:
      self._in_flight.result()  # raises the writer thread's error here
      self._in_flight = None

  def close(self) -> None:
    try:
      self._flush(final=True)
      self._wait()
    finally:
      self._executor.shutdown(wait=True)
    for w in self._writers:
      w.close()


def write_npz(path: str, scratch_dir: str, **arrays) -> None:
  """Writes an `.npz` whose bytes depend only on the arrays (np.savez stamps the current time).

  Streamed to a local scratch file, then copied to `path` (local or gs://): no in-memory copy
  of the arrays, which for the training positives is 4 bytes per training row.
  """
  local = os.path.join(scratch_dir, f"npz-{uuid.uuid4().hex}.npz")
  try:
    with zipfile.ZipFile(local, "w", zipfile.ZIP_STORED) as z:
      for name, value in arrays.items():
        info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
        with z.open(info, "w", force_zip64=True) as f:
          np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    tf.io.gfile.copy(local, path, overwrite=True)
  finally:
    os.remove(local)


def histogram(counter: Dict[float, int]) -> Dict[str, int]:
  if len(counter) > _HISTOGRAM_MAX_VALUES:
    values = np.array(sorted(counter))
    edges = np.linspace(values[0], values[-1], 21)
    counts = np.zeros(20, np.int64)
    for v, c in counter.items():
      counts[min(int(np.searchsorted(edges, v, side="right")) - 1, 19)] += c
    return {f"[{edges[k]:g}, {edges[k + 1]:g}{']' if k == 19 else ')'}": int(counts[k])
            for k in range(20)}
  return {f"{v:g}": int(c) for v, c in sorted(counter.items())}


def sample_negatives(indptr: np.ndarray, indices: np.ndarray, users: np.ndarray,
                      positives: np.ndarray, num_items: int, n: int, seed: int,
                      raw_users: np.ndarray) -> np.ndarray:
  """For each eval user, n distinct items it never interacted with (train or eval)."""
  rng = np.random.default_rng([seed, 5])
  out = np.empty((len(users), n), np.int32)
  for k, (u, p) in enumerate(zip(users.tolist(), positives.tolist())):
    seen = np.append(indices[indptr[u]:indptr[u + 1]], p)
    free = num_items - len(np.unique(seen))
    if free < n:
      raise ValueError(f"--eval_negatives={n}: user {str(raw_users[u])!r} has interacted with "
                       f"all but {free} of the {num_items} items")
    if free < 4 * n:  # dense user: pick from the explicit complement
      complement = np.setdiff1d(np.arange(num_items), seen)
      out[k] = rng.choice(complement, n, replace=False)
      continue
    chosen = np.empty(0, np.int64)
    while len(chosen) < n:
      draw = rng.integers(0, num_items, 2 * n)
      draw = draw[~np.isin(draw, seen)]
      _, first = np.unique(np.concatenate([chosen, draw]), return_index=True)
      chosen = np.concatenate([chosen, draw])[np.sort(first)]
    out[k] = chosen[:n]
  return out


def write_feature_table(table: features.EncodedFeatures, tmp_dir: str, scratch_dir: str) -> str:
  """Writes a side's feature arrays and vocabularies; returns the table's file name."""
  name = schema.feature_table_file(table.side)
  write_npz(fileio.join(tmp_dir, name), scratch_dir, **table.arrays)
  for feature, vocabulary in table.vocabularies.items():
    fileio.write_lines(fileio.join(tmp_dir, schema.feature_vocab_file(table.side, feature)),
                       vocabulary)
  if table.rows_without_entity or table.entities_without_row:
    logging.warning("%s features: %d rows of IDs not in the log (ignored); %d %ss of the log "
                    "have no row (every feature missing)", table.side,
                    table.rows_without_entity, table.entities_without_row, table.side)
  return name


def train_positives(scratch: Scratch, num_buckets: int, user_count: np.ndarray,
                     num_items: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Each user's training items as compressed sparse rows, items sorted within a user, and
  each one's rank in its user's time order (0: the earliest; by timestamp, then input row).

  Filled bucket by bucket from the pairs pass 4 left on scratch: memory is the result (8 bytes
  per training row) plus one bucket, and 16 bytes per row of times while ranking.
  """
  indptr = np.zeros(len(user_count) + 1, np.int64)
  np.cumsum(user_count, out=indptr[1:])
  indices = np.empty(indptr[-1], np.int32)
  times, input_rows = np.empty(indptr[-1], np.int64), np.empty(indptr[-1], np.int64)
  cursor = indptr[:-1].copy()
  for b in range(num_buckets):
    path = os.path.join(scratch.directory, f"train-pairs-{b}.npy")
    if not os.path.exists(path):
      continue
    users, items, ts, row = np.load(path)
    os.remove(path)
    order = np.argsort(users, kind="stable")
    users, items, ts, row = users[order], items[order], ts[order], row[order]
    starts = np.flatnonzero(np.append(True, users[1:] != users[:-1]))
    rank = np.arange(len(users)) - np.repeat(starts, np.diff(np.append(starts, len(users))))
    at = cursor[users] + rank
    indices[at], times[at], input_rows[at] = items, ts, row
    cursor += np.bincount(users, minlength=len(user_count))
  ranks = np.empty(indptr[-1], np.int32)
  first = 0
  while first < len(user_count):  # sort within each user, a bounded range of users at a time
    last = max(first + 1, int(np.searchsorted(indptr, indptr[first] + BUCKET_ROWS,
                                              side="right")) - 1)
    last = min(last, len(user_count))
    span = slice(indptr[first], indptr[last])
    owner = np.repeat(np.arange(first, last, dtype=np.int64), user_count[first:last])
    by_item = np.argsort(owner * num_items + indices[span])
    indices[span], times[span], input_rows[span] = (
        indices[span][by_item], times[span][by_item], input_rows[span][by_item])
    by_time = np.lexsort((input_rows[span], times[span], owner))
    ranks[span][by_time] = np.arange(len(by_time)) - (indptr[first:last] - indptr[first])[
        owner[by_time] - first]
    first = last
  return indptr, indices, ranks


OUTPUT_PATTERNS = [schema.shard_pattern(s) for s in schema.SPLITS] + [
    schema.TRAIN_POSITIVES_FILE, schema.EVAL_NEGATIVES_FILE, schema.USER_VOCAB_FILE,
    schema.ITEM_VOCAB_FILE] + [schema.feature_table_file(side) for side in features.SIDES] + [
        schema.feature_vocab_file(side, "*") for side in features.SIDES]


def publish(tmp_dir: str, output_dir: str, names: Sequence[str]) -> None:
  """Moves the files of a finished preparation into place, metadata last."""
  metadata_path = fileio.join(output_dir, schema.METADATA_FILE)
  if tf.io.gfile.exists(metadata_path):
    tf.io.gfile.remove(metadata_path)  # the old output stops looking complete first
  for pattern in OUTPUT_PATTERNS:  # files of an earlier run that this one does not replace
    for stale in tf.io.gfile.glob(fileio.join(output_dir, pattern)):
      tf.io.gfile.remove(stale)
  for name in names:
    tf.io.gfile.rename(fileio.join(tmp_dir, name), fileio.join(output_dir, name), overwrite=True)
  tf.io.gfile.rename(fileio.join(tmp_dir, schema.METADATA_FILE), metadata_path, overwrite=True)
  tf.io.gfile.rmtree(tmp_dir)
