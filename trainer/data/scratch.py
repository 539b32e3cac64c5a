"""Local scratch storage of a preparation: rows hash-partitioned into buckets on local disk,
provisional ID codes, a background prefetch, and the progress log of long passes."""

import concurrent.futures
import os
import time
from typing import Dict, Iterable, Iterator, List, Optional, TypeVar

import numpy as np
from absl import logging



T = TypeVar("T")


BUCKET_ROWS = 1_000_000  # target rows per scratch bucket: bounds peak memory


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


def frequency_order(counts: np.ndarray, raw: np.ndarray) -> np.ndarray:
  """Codes with a positive count, most frequent first, ties by raw ID string."""
  present = np.flatnonzero(counts > 0)
  order = np.lexsort((raw[present], -counts[present]))
  return present[order]


class Scratch:
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
    for name, column in columns.items():
      np.save(self._path(bucket, self._parts[bucket], name), column)
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
      # (The widest dtype of the parts: string columns' widths differ from part to part.)
      out[name] = np.concatenate(pieces, out=np.empty(sum(map(len, pieces)),
                                                      np.result_type(*pieces)))
    return out

  def replace(self, bucket: int, columns: Dict[str, np.ndarray]) -> None:
    for p in range(self._parts[bucket]):
      for name in self._columns:
        os.remove(self._path(bucket, p, name))
    self._parts[bucket] = 0
    if len(next(iter(columns.values()))):
      self._write(bucket, columns)


class Progress:
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


def prefetched(iterable: Iterable[T]) -> Iterator[T]:
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
