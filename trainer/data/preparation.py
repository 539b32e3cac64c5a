"""Turns an interaction log into a prepared data directory, streaming, in bounded memory.

Layout of a prepared directory:

  users.vocab, items.vocab       raw IDs, one per line; line n is dense index n (most frequent
                                 first, ties by ID)
  train-SSSSS-of-NNNNN.tfrecord  training examples in blocks (see `trainer.schema`)
  eval-SSSSS-of-NNNNN.tfrecord   held-out examples
  train_positives.npz            each user's training items, compressed sparse rows
                                 (`indptr` [users + 1], `indices` [train rows]): what full-ranking
                                 evaluation and serving exclude
  eval_negatives.npz             leave-one-out with --eval_negatives: `users`, `positives`,
                                 `negatives` [eval users, N], sampled from items the user never
                                 interacted with, fixed by the seed
  metadata.json                  counts, density, rating histogram, split protocol, inputs'
                                 fingerprints; written last

How. Rows stream from the source in chunks; raw IDs get provisional integer codes (memory: the
vocabulary); rows are hash-partitioned by (user, item) into local scratch buckets, so that every
copy of a pair lands in one bucket. Pass 2 dedupes each bucket by the --duplicates policy and
gathers per-user and per-item statistics; pass 3 (only with --min_user_interactions) recounts
items; pass 4 maps codes to frequency-ordered indices, splits, shuffles each bucket and deals
blocks round-robin to the shards. Peak memory is one bucket plus vocabulary-sized arrays plus
4 bytes per training row for `train_positives`.

Everything is written to a temporary folder first and published at the end, so an interrupted
or failed run never leaves a directory that looks complete, nor damages an earlier one.
"""

import concurrent.futures
import dataclasses
import io
import math
import os
import shutil
import tempfile
import time
import uuid
import zipfile
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import fileio, malloc, schema
from trainer.config import ConfigError, PrepareConfig
from trainer.data import sources

T = TypeVar("T")

TRAIN_POSITIVES_FILE = "train_positives.npz"
EVAL_NEGATIVES_FILE = "eval_negatives.npz"
_BUCKET_ROWS = 1_000_000  # target rows per scratch bucket: bounds peak memory
_HISTOGRAM_MAX_VALUES = 64


# ----------------------------------------------------------------------------- small parts


class IdEncoder:
  """Raw ID -> provisional code, in order of first appearance; memory: the vocabulary."""

  def __init__(self, fmt: Optional[str] = None):
    self.fmt = fmt  # set when the source already gives integer codes (synthetic)
    self._index: Dict[str, int] = {}
    self._size = 0

  def encode(self, values: np.ndarray) -> np.ndarray:
    if self.fmt is not None:
      self._size = max(self._size, int(values.max()) + 1)
      return values.astype(np.int64)
    uniq, inverse = np.unique(values, return_inverse=True)
    index = self._index
    codes = np.fromiter((index.setdefault(u, len(index)) for u in uniq.tolist()), np.int64,
                        len(uniq))
    return codes[inverse.reshape(-1)]

  @property
  def size(self) -> int:
    return self._size if self.fmt is not None else len(self._index)

  def raw_ids(self) -> np.ndarray:
    """Raw ID of every code, as strings."""
    if self.fmt is not None:
      return np.array([self.fmt.format(c) for c in range(self._size)])
    return np.array(list(self._index), dtype=str) if self._index else np.array([], str)


def _frequency_order(counts: np.ndarray, raw: np.ndarray) -> np.ndarray:
  """Codes with a positive count, most frequent first, ties by raw ID string."""
  present = np.flatnonzero(counts > 0)
  order = np.lexsort((raw[present], -counts[present]))
  return present[order]


def _hash(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
  """A 64-bit mix of two int64 columns (splitmix64 finaliser): uniform and deterministic."""
  with np.errstate(over="ignore"):
    x = (a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (
        b.astype(np.uint64) + np.uint64((salt * 0xD1B54A32D192ED03) & (2**64 - 1)))
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
  return x


def _uniform(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
  return (_hash(a, b, salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _grow(array: np.ndarray, size: int, fill) -> np.ndarray:
  if len(array) >= size:
    return array
  out = np.full(max(size, 2 * len(array)), fill, dtype=array.dtype)
  out[:len(array)] = array
  return out


class _Scratch:
  """Hash-partitioned row storage on local disk (output may be remote; scratch never is).

  One raw `.npy` file per column and part: no zip and no CRC, which cost as much as the rest
  of a pass.
  """

  def __init__(self, directory: str, num_buckets: int):
    self.directory = directory
    self.num_buckets = num_buckets
    self._parts = [0] * num_buckets
    self._columns: List[str] = []

  def _path(self, bucket: int, part: int, column: str) -> str:
    return os.path.join(self.directory, f"b{bucket}-p{part}-{column}.npy")

  def _write(self, bucket: int, columns: Dict[str, np.ndarray]) -> None:
    self._columns = list(columns)
    for name, values in columns.items():
      np.save(self._path(bucket, self._parts[bucket], name), values)
    self._parts[bucket] += 1

  def append(self, bucket_of_rows: np.ndarray, columns: Dict[str, np.ndarray]) -> None:
    order = np.argsort(bucket_of_rows.astype(np.uint16), kind="stable")  # a radix sort
    bounds = np.searchsorted(bucket_of_rows[order], np.arange(self.num_buckets + 1))
    for b in range(self.num_buckets):
      rows = order[bounds[b]:bounds[b + 1]]
      if len(rows):
        self._write(b, {k: v[rows] for k, v in columns.items()})

  def read(self, bucket: int) -> Optional[Dict[str, np.ndarray]]:
    parts = self._parts[bucket]
    if not parts:
      return None
    out = {}
    for name in self._columns:
      if parts == 1:
        out[name] = np.load(self._path(bucket, 0, name))
        continue
      # Concatenated from memory-mapped parts: never the parts and the whole in memory at once.
      pieces = [np.load(self._path(bucket, p, name), mmap_mode="r") for p in range(parts)]
      out[name] = np.concatenate(pieces, out=np.empty(sum(map(len, pieces)), pieces[0].dtype))
    return out

  def replace(self, bucket: int, columns: Dict[str, np.ndarray]) -> None:
    for p in range(self._parts[bucket]):
      for name in self._columns:
        os.remove(self._path(bucket, p, name))
    self._parts[bucket] = 0
    if len(next(iter(columns.values()))):
      self._write(bucket, columns)


class _Progress:
  """A progress line with rows/s at most every few seconds."""

  def __init__(self, what: str, total: Optional[int] = None):
    self.what, self.total, self.done = what, total, 0
    self.start = self.last = time.time()

  def add(self, n: int) -> None:
    self.done += n
    now = time.time()
    if now - self.last >= 5:
      self.last = now
      rate = self.done / max(now - self.start, 1e-9)
      eta = (f", ETA {((self.total - self.done) / max(rate, 1e-9)):.0f}s"
             if self.total else "")
      logging.info("%s: %d rows, %.0f rows/s%s", self.what, self.done, rate, eta)


def _prefetched(iterable: Iterable[T]) -> Iterator[T]:
  """Yields the items of `iterable`, producing the next one in a background thread meanwhile.

  NumPy releases the GIL in its heavy loops, so producing (parsing, generating) overlaps with
  consuming on a second core. One item in flight: memory grows by one item, not with the data.
  The producer's errors are raised here, in order.
  """
  items, done = iter(iterable), object()
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prepare-read") as executor:
    pending = executor.submit(next, items, done)
    while True:
      item = pending.result()
      if item is done:
        return
      pending = executor.submit(next, items, done)
      yield item


class _BlockWriter:
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
    self._pending: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    self._pending_rows = 0
    self._next = 0
    self.rows = 0
    self.shard_rows = [0] * num_shards
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prepare-write")
    self._in_flight: Optional[concurrent.futures.Future] = None

  def add(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray) -> None:
    self._pending.append((users, items, ratings))
    self._pending_rows += len(users)
    self.rows += len(users)
    if self._pending_rows >= self.block_size:
      self._flush(final=False)

  def _flush(self, final: bool) -> None:
    if not self._pending:
      return
    u, i, r = (np.concatenate(c) for c in zip(*self._pending))
    full = len(u) if final else len(u) - len(u) % self.block_size
    if full:
      self._wait()
      self._in_flight = self._executor.submit(self._write, u[:full], i[:full], r[:full])
    self._pending = [(u[full:], i[full:], r[full:])] if full < len(u) else []
    self._pending_rows = len(u) - full

  def _write(self, users: np.ndarray, items: np.ndarray, ratings: np.ndarray) -> None:
    records = schema.encode_blocks(users, items, ratings, self.block_size)
    for b, record in enumerate(records):
      self._writers[self._next].write(record)
      self.shard_rows[self._next] += min(self.block_size, len(users) - b * self.block_size)
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


def _write_npz(path: str, scratch_dir: str, **arrays) -> None:
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


def load_npz(path: str) -> Dict[str, np.ndarray]:
  """Reads an `.npz` written by preparation, local or `gs://`."""
  with tf.io.gfile.GFile(path, "rb") as f:
    with np.load(io.BytesIO(f.read())) as z:
      return {k: z[k] for k in z.files}


def pair_keys(positives: Dict[str, np.ndarray], num_items: int) -> np.ndarray:
  """u * num_items + i of every training pair, from the train_positives CSR: sorted (CSR
  order), as `pipeline.negative_sampler` takes them."""
  indptr = positives["indptr"]
  owners = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
  return owners * num_items + positives["indices"]


# ----------------------------------------------------------------------------- the source


def make_source(config: PrepareConfig) -> sources.Source:
  """The configured source; errors name the flag and the value."""
  if config.source == "synthetic":
    return sources.SyntheticSource(config.num_users, config.num_items, config.num_ratings,
                                   config.rank, config.noise, config.seed, config.implicit)
  if config.source == "movielens":
    return sources.movielens_source(config.input[0], config.skip_bad_rows)
  if config.source == "tfds":
    return sources.TfdsSource(config.tfds_name, config.tfds_data_dir, config.tfds_manual_dir)
  columns = sources.Columns(config.user_column, config.item_column, config.rating_column,
                            config.timestamp_column)
  rating_range = (None if config.rating_min is None
                  else (config.rating_min, config.rating_max))
  return sources.DelimitedSource(config.input, columns, config.delimiter, config.header,
                                 rating_range, config.skip_bad_rows)


# ----------------------------------------------------------------------------- the passes


@dataclasses.dataclass
class _Stats:
  """Vocabulary-sized state gathered while deduping (indexed by provisional code)."""

  user_count: np.ndarray
  item_count: np.ndarray
  best_ts: np.ndarray  # per user: the latest interaction (timestamp, then input order)
  best_row: np.ndarray
  best_item: np.ndarray
  duplicates: int = 0
  timestamp_sample: List[np.ndarray] = dataclasses.field(default_factory=list)


def _dedupe(rows: Dict[str, np.ndarray], policy: str, source: sources.Source,
            user_ids: IdEncoder, item_ids: IdEncoder) -> Tuple[Dict[str, np.ndarray], int]:
  """Merges repeated (user, item) pairs of one bucket by `policy`; returns (rows, removed)."""
  key = rows["user"] * max(item_ids.size, 1) + rows["item"]
  sorted_key = np.sort(key)
  if not (sorted_key[1:] == sorted_key[:-1]).any():  # the common case: nothing to merge
    return rows, 0
  ts = rows.get("ts")
  order = np.lexsort((rows["row"], ts if ts is not None else rows["row"], key))
  rows = {k: v[order] for k, v in rows.items()}
  same = key[order][1:] == key[order][:-1]
  if policy == "error":
    k = int(np.flatnonzero(same)[0])
    first, second = sorted((k, k + 1), key=lambda j: rows["row"][j])
    user = str(user_ids.raw_ids()[rows["user"][k]])
    item = str(item_ids.raw_ids()[rows["item"][k]])
    raise ValueError(
        f"{source.where(rows['src'][second], rows['line'][second])}: duplicate (user, item) "
        f"pair ({user!r}, {item!r}), first at "
        f"{source.where(rows['src'][first], rows['line'][first])} (--duplicates=error; use "
        "--duplicates=keep_latest or --duplicates=mean to merge them)")
  last_of_group = np.append(~same, True)  # sorted by time then input order: last = latest
  if policy == "mean":
    group = np.concatenate([[0], np.cumsum(~same)])
    sums = np.bincount(group, weights=rows["rating"])
    counts = np.bincount(group)
    rows["rating"] = rows["rating"].copy()
    rows["rating"][last_of_group] = (sums / counts).astype(np.float32)
  kept = {k: v[last_of_group] for k, v in rows.items()}
  return kept, int(same.sum())


def _pass_dedupe(scratch: _Scratch, config: PrepareConfig, source: sources.Source,
                 user_ids: IdEncoder, item_ids: IdEncoder, total_rows: int) -> _Stats:
  num_users, num_items = user_ids.size, item_ids.size
  stats = _Stats(np.zeros(num_users, np.int64), np.zeros(num_items, np.int64),
                 np.full(num_users, np.iinfo(np.int64).min), np.full(num_users, -1, np.int64),
                 np.full(num_users, -1, np.int64))
  sample_rate = min(1.0, 2_000_000 / max(total_rows, 1))
  progress = _Progress("dedupe", total_rows)
  for b in range(scratch.num_buckets):
    rows = scratch.read(b)
    if rows is None:
      continue
    n = len(rows["user"])
    rows, removed = _dedupe(rows, config.duplicates, source, user_ids, item_ids)
    stats.duplicates += removed
    stats.user_count += np.bincount(rows["user"], minlength=num_users)
    stats.item_count += np.bincount(rows["item"], minlength=num_items)
    if "ts" in rows and config.split == "leave_one_out":
      # Each user's latest row of this bucket, then merged with the best so far.
      order = np.lexsort((rows["row"], rows["ts"], rows["user"]))
      users = rows["user"][order]
      last = np.flatnonzero(np.append(users[1:] != users[:-1], True))
      u, ts, row = users[last], rows["ts"][order][last], rows["row"][order][last]
      better = (ts > stats.best_ts[u]) | ((ts == stats.best_ts[u]) & (row > stats.best_row[u]))
      u, ts, row = u[better], ts[better], row[better]
      stats.best_ts[u], stats.best_row[u] = ts, row
      stats.best_item[u] = rows["item"][order][last][better]
    if "ts" in rows and config.split == "temporal":
      keep = _uniform(rows["user"], rows["item"], config.seed + 7) < sample_rate
      stats.timestamp_sample.append(rows["ts"][keep])
    if removed:
      scratch.replace(b, rows)
    progress.add(n)
  return stats


def _shards_for(config: PrepareConfig, rows: int) -> int:
  if config.target_shard_mb is None:
    return config.num_shards
  approx_bytes = rows * 12 + 64  # varint indices + float, per example, packed
  return max(1, math.ceil(approx_bytes / (config.target_shard_mb * 2**20)))


def _histogram(counter: Dict[float, int]) -> Dict[str, int]:
  if len(counter) > _HISTOGRAM_MAX_VALUES:
    values = np.array(sorted(counter))
    edges = np.linspace(values[0], values[-1], 21)
    counts = np.zeros(20, np.int64)
    for v, c in counter.items():
      counts[min(int(np.searchsorted(edges, v, side="right")) - 1, 19)] += c
    return {f"[{edges[k]:g}, {edges[k + 1]:g}{']' if k == 19 else ')'}": int(counts[k])
            for k in range(20)}
  return {f"{v:g}": int(c) for v, c in sorted(counter.items())}


def _sample_negatives(indptr: np.ndarray, indices: np.ndarray, users: np.ndarray,
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


def prepare(config: PrepareConfig) -> schema.Metadata:
  """Reads or generates the interactions, splits them and writes a prepared data directory.

  Args:
    config: the preparation configuration; validated here.

  Returns:
    The metadata written to `<output_dir>/metadata.json`.

  Raises:
    ConfigError: a bad flag value.
    ValueError: bad input, naming the file, line and offending text.
  """
  config.validate()
  malloc.return_freed_memory()
  fileio.check_gcs_access(config.output_dir, "output_dir", write=True)
  for pattern in config.input:
    fileio.check_gcs_access(pattern, "input", write=False)
  source = make_source(config)
  if config.split in ("leave_one_out", "temporal") and not source.has_timestamps:
    raise ConfigError(f"--split={config.split} needs timestamps, and the input has none "
                      "(--timestamp_column)")
  started = time.time()
  formats = source.id_format or (None, None)
  user_ids, item_ids = IdEncoder(formats[0]), IdEncoder(formats[1])
  scratch_dir = tempfile.mkdtemp(prefix="neumf-prepare-")
  try:
    return _prepare(config, source, user_ids, item_ids, scratch_dir, started)
  finally:
    shutil.rmtree(scratch_dir, ignore_errors=True)


def _prepare(config, source, user_ids, item_ids, scratch_dir, started) -> schema.Metadata:
  # Pass 1: stream, encode, partition by pair.
  num_buckets = 16
  if isinstance(source, sources.SyntheticSource):
    num_buckets = max(1, math.ceil(config.num_ratings / _BUCKET_ROWS))
  scratch = _Scratch(scratch_dir, num_buckets)
  progress = _Progress("read")
  total = 0
  for chunk in _prefetched(source.chunks()):
    users, items = user_ids.encode(chunk.users), item_ids.encode(chunk.items)
    n = len(users)
    columns = {"user": users, "item": items, "rating": chunk.ratings,
               "row": np.arange(total, total + n, dtype=np.int64),
               "src": np.full(n, chunk.file_index, np.int32),
               "line": chunk.lines}
    if chunk.timestamps is not None:
      columns["ts"] = chunk.timestamps
    scratch.append((_hash(users, items, 1) % np.uint64(num_buckets)).astype(np.int64), columns)
    total += n
    progress.add(n)
  bad = getattr(source, "bad", None)
  if total == 0:
    raise ValueError(f"{', '.join(source.files) or 'the input'}: no valid rows"
                     + (f" ({bad.count} bad rows skipped)" if bad and bad.count else ""))
  logging.info("Read %d rows from %s in %.1fs", total, ", ".join(source.files) or "the "
               "synthetic generator", time.time() - started)
  if bad is not None and bad.count:
    logging.warning("Skipped %d bad rows (--skip_bad_rows), for example:\n  %s", bad.count,
                    "\n  ".join(bad.examples))

  # Pass 2: dedupe each bucket, gather per-user and per-item statistics.
  stats = _pass_dedupe(scratch, config, source, user_ids, item_ids, total)
  kept_user = stats.user_count >= config.min_user_interactions
  item_count = stats.item_count
  if not kept_user.all():  # Pass 3: recount items over the users kept
    item_count = np.zeros_like(item_count)
    for b in range(num_buckets):
      rows = scratch.read(b)
      if rows is not None:
        item_count += np.bincount(rows["item"][kept_user[rows["user"]]],
                                  minlength=len(item_count))
  if not kept_user.any():
    raise ValueError(f"--min_user_interactions={config.min_user_interactions} leaves no user "
                     f"(the most active has {int(stats.user_count.max())})")
  raw_users, raw_items = user_ids.raw_ids(), item_ids.raw_ids()
  user_order = _frequency_order(np.where(kept_user, stats.user_count, 0), raw_users)
  item_order = _frequency_order(item_count, raw_items)
  user_index = np.full(len(raw_users), -1, np.int64)
  user_index[user_order] = np.arange(len(user_order))
  item_index = np.full(len(raw_items), -1, np.int64)
  item_index[item_order] = np.arange(len(item_order))
  num_users, num_items = len(user_order), len(item_order)

  cutoff = config.temporal_cutoff
  if config.split == "temporal" and cutoff is None:
    sample = np.sort(np.concatenate(stats.timestamp_sample))
    cutoff = int(sample[min(len(sample) - 1, int(len(sample) * (1 - config.eval_fraction)))])
  has_eval_item = stats.user_count >= 2  # leave-one-out holds out only users with 2+ rows

  # Pass 4: map, split, shuffle, write blocks; collect (user, item) of training rows.
  kept_rows = int(stats.user_count[kept_user].sum())
  num_shards = _shards_for(config, kept_rows)
  fileio.makedirs(config.output_dir)
  tmp_dir = fileio.join(config.output_dir, f".tmp-prepare-{uuid.uuid4().hex}")
  fileio.makedirs(tmp_dir)
  if config.split == "leave_one_out":
    expected_eval = float(np.sum(kept_user & has_eval_item))
  elif config.split == "temporal" and config.temporal_cutoff is None:
    expected_eval = kept_rows * config.eval_fraction
  elif config.split == "temporal":
    expected_eval = kept_rows * float(np.mean(np.concatenate(stats.timestamp_sample) >= cutoff)
                                      if stats.timestamp_sample else 0.5)
  else:
    expected_eval = kept_rows * config.eval_fraction
  writers = {schema.TRAIN: _BlockWriter(tmp_dir, schema.TRAIN, num_shards,
                                        kept_rows - expected_eval),
             schema.EVAL: _BlockWriter(tmp_dir, schema.EVAL, num_shards, expected_eval)}
  histogram: Dict[float, int] = {}
  train_user_count = np.zeros(num_users, np.int64)
  eval_user_seen = np.zeros(num_users, bool)  # which users and items the eval split holds
  eval_item_seen = np.zeros(num_items, bool)
  train_rating_sum = 0.0
  rating_min, rating_max = np.inf, -np.inf
  eval_user_item: List[np.ndarray] = []
  progress = _Progress("write", kept_rows)
  for b in range(num_buckets):
    rows = scratch.read(b)
    if rows is None:
      continue
    keep = kept_user[rows["user"]]
    rows = {k: v[keep] for k, v in rows.items()}
    users, items, ratings = user_index[rows["user"]], item_index[rows["item"]], rows["rating"]
    if config.split == "random":
      held_out = _uniform(rows["user"], rows["item"], config.seed + 3) < config.eval_fraction
    elif config.split == "temporal":
      held_out = rows["ts"] >= cutoff
    else:
      held_out = (has_eval_item[rows["user"]]
                  & (stats.best_item[rows["user"]] == rows["item"]))
      eval_user_item.append(np.stack([users[held_out], items[held_out]], axis=1))
    rng = np.random.default_rng([config.seed, 4, b])
    for split, mask in ((schema.TRAIN, ~held_out), (schema.EVAL, held_out)):
      idx = rng.permutation(np.flatnonzero(mask))
      writers[split].add(users[idx], items[idx], ratings[idx])
    np.save(os.path.join(scratch.directory, f"train-pairs-{b}.npy"),
            np.stack([users[~held_out], items[~held_out]]).astype(np.int32))
    train_user_count += np.bincount(users[~held_out], minlength=num_users)
    eval_user_seen[users[held_out]] = True
    eval_item_seen[items[held_out]] = True
    train_rating_sum += float(ratings[~held_out].sum(dtype=np.float64))
    values, counts = np.unique(ratings, return_counts=True)
    for v, c in zip(values.tolist(), counts.tolist()):
      histogram[v] = histogram.get(v, 0) + c
    if len(ratings):
      rating_min, rating_max = min(rating_min, ratings.min()), max(rating_max, ratings.max())
    progress.add(len(users))
    # Release this bucket before the next one is read: peak memory is one bucket, not two.
    rows = keep = users = items = ratings = held_out = idx = mask = None
  for w in writers.values():
    w.close()
  num_train, num_eval = writers[schema.TRAIN].rows, writers[schema.EVAL].rows
  if num_train == 0 or num_eval == 0:
    raise ValueError(f"--split={config.split} leaves {num_train} training and {num_eval} "
                     f"evaluation rows of {kept_rows}; both need at least one"
                     + (f" (--temporal_cutoff={cutoff})" if config.split == "temporal" else ""))

  indptr, indices = _train_positives(scratch, num_buckets, train_user_count, num_items)
  train_items = np.bincount(indices, minlength=num_items)
  names = [schema.USER_VOCAB_FILE, schema.ITEM_VOCAB_FILE, TRAIN_POSITIVES_FILE]
  names += [os.path.basename(p) for w in writers.values() for p in w.paths]
  _write_npz(fileio.join(tmp_dir, TRAIN_POSITIVES_FILE), scratch_dir, indptr=indptr,
             indices=indices)
  fileio.write_lines(fileio.join(tmp_dir, schema.USER_VOCAB_FILE),
                     raw_users[user_order].tolist())
  fileio.write_lines(fileio.join(tmp_dir, schema.ITEM_VOCAB_FILE),
                     raw_items[item_order].tolist())

  eval_rows_for_users = None
  if config.split == "leave_one_out":
    eval_rows_for_users = np.concatenate(eval_user_item)
    eval_rows_for_users = eval_rows_for_users[np.argsort(eval_rows_for_users[:, 0])]
  if config.eval_negatives:
    negatives = _sample_negatives(indptr, indices, eval_rows_for_users[:, 0],
                                  eval_rows_for_users[:, 1], num_items, config.eval_negatives,
                                  config.seed, raw_users[user_order])
    _write_npz(fileio.join(tmp_dir, EVAL_NEGATIVES_FILE), scratch_dir,
               users=eval_rows_for_users[:, 0], positives=eval_rows_for_users[:, 1],
               negatives=negatives)
    names.append(EVAL_NEGATIVES_FILE)
  eval_users_unseen = int(np.sum(eval_user_seen & (np.diff(indptr) == 0)))
  eval_items_unseen = int(np.sum(eval_item_seen & (train_items == 0)))

  metadata = schema.Metadata(
      num_users=num_users, num_items=num_items, num_train=num_train, num_eval=num_eval,
      rating_min=float(rating_min), rating_max=float(rating_max),
      train_rating_mean=train_rating_sum / num_train, num_shards=num_shards,
      source=config.source, split=config.split,
      eval_fraction=config.eval_fraction if config.split == "random" or (
          config.split == "temporal" and config.temporal_cutoff is None) else 0.0,
      seed=config.seed, inputs=list(source.files),
      eval_users_unseen_in_train=eval_users_unseen,
      eval_items_unseen_in_train=eval_items_unseen,
      implicit=not source.has_ratings, temporal_cutoff=cutoff,
      min_user_interactions=config.min_user_interactions,
      eval_negatives=config.eval_negatives, duplicates_policy=config.duplicates,
      duplicates_merged=stats.duplicates, rows_read=total,
      bad_rows_skipped=bad.count if bad is not None else 0,
      users_filtered=int((~kept_user & (stats.user_count > 0)).sum()),
      density=(num_train + num_eval) / float(num_users * num_items),
      rating_histogram=_histogram(histogram), input_fingerprint=source.fingerprint(),
      train_shard_examples=list(writers[schema.TRAIN].shard_rows))
  fileio.write_text_atomic(fileio.join(tmp_dir, schema.METADATA_FILE), metadata.to_json())
  _publish(tmp_dir, config.output_dir, names)
  elapsed = time.time() - started
  logging.info("Prepared %d train and %d eval rows (%d users, %d items, split %s) in %s in "
               "%.1fs (%.0f rows/s)", num_train, num_eval, num_users, num_items, config.split,
               config.output_dir, elapsed, total / max(elapsed, 1e-9))
  return metadata


def _train_positives(scratch: _Scratch, num_buckets: int, user_count: np.ndarray,
                     num_items: int) -> Tuple[np.ndarray, np.ndarray]:
  """Each user's training items as compressed sparse rows, items sorted within a user.

  Filled bucket by bucket from the pairs pass 4 left on scratch: memory is the result (4 bytes
  per training row) plus one bucket.
  """
  indptr = np.zeros(len(user_count) + 1, np.int64)
  np.cumsum(user_count, out=indptr[1:])
  indices = np.empty(indptr[-1], np.int32)
  cursor = indptr[:-1].copy()
  for b in range(num_buckets):
    path = os.path.join(scratch.directory, f"train-pairs-{b}.npy")
    if not os.path.exists(path):
      continue
    users, items = np.load(path)
    os.remove(path)
    order = np.argsort(users, kind="stable")
    users, items = users[order], items[order]
    starts = np.flatnonzero(np.append(True, users[1:] != users[:-1]))
    rank = np.arange(len(users)) - np.repeat(starts, np.diff(np.append(starts, len(users))))
    indices[cursor[users] + rank] = items
    cursor += np.bincount(users, minlength=len(user_count))
  first = 0
  while first < len(user_count):  # sort within each user, a bounded range of users at a time
    last = max(first + 1, int(np.searchsorted(indptr, indptr[first] + _BUCKET_ROWS,
                                              side="right")) - 1)
    last = min(last, len(user_count))
    segment = indices[indptr[first]:indptr[last]]
    owner = np.repeat(np.arange(first, last, dtype=np.int64), user_count[first:last])
    segment[:] = segment[np.argsort(owner * num_items + segment)]
    first = last
  return indptr, indices


_OUTPUT_PATTERNS = [schema.shard_pattern(s) for s in schema.SPLITS] + [
    TRAIN_POSITIVES_FILE, EVAL_NEGATIVES_FILE, schema.USER_VOCAB_FILE, schema.ITEM_VOCAB_FILE]


def _publish(tmp_dir: str, output_dir: str, names: Sequence[str]) -> None:
  """Moves the files of a finished preparation into place, metadata last."""
  metadata_path = fileio.join(output_dir, schema.METADATA_FILE)
  if tf.io.gfile.exists(metadata_path):
    tf.io.gfile.remove(metadata_path)  # the old output stops looking complete first
  for pattern in _OUTPUT_PATTERNS:  # files of an earlier run that this one does not replace
    for stale in tf.io.gfile.glob(fileio.join(output_dir, pattern)):
      tf.io.gfile.remove(stale)
  for name in names:
    tf.io.gfile.rename(fileio.join(tmp_dir, name), fileio.join(output_dir, name), overwrite=True)
  tf.io.gfile.rename(fileio.join(tmp_dir, schema.METADATA_FILE), metadata_path, overwrite=True)
  tf.io.gfile.rmtree(tmp_dir)


def load_metadata(data_dir: str) -> schema.Metadata:
  """Reads a prepared directory's metadata; the error names --data_dir when it is not one."""
  path = fileio.join(data_dir, schema.METADATA_FILE)
  if not tf.io.gfile.exists(path):
    raise ConfigError(f"--data_dir={data_dir!r} is not a prepared data directory: {path} is "
                      "missing (run neumf-prepare first, or it was interrupted)")
  try:
    return schema.Metadata.from_json(fileio.read_text(path), where=path)
  except ValueError as e:
    raise ConfigError(f"--data_dir={data_dir!r}: {e}") from e
