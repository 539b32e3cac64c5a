"""Split protocols: which interactions preparation holds out for evaluation.

One class per protocol (`--split`) owns what differs between them: what it gathers while
preparation dedupes the log (`observe`), how many eval rows to expect (to size the eval
shards' blocks), the held-out mask of each bucket of rows, and its fields of the metadata.

  random         a hash-random `--eval_fraction` of the interactions, keyed by (user, item,
                 seed): the same pair is held out however the input is ordered or chunked
  temporal       interactions at or after a time cut: `--temporal_cutoff`, or the quantile of a
                 uniform sample of timestamps that holds out `--eval_fraction`
  leave_one_out  each user's latest interaction (ties: the later row of the input), for users
                 with at least two: the NCF protocol (He et al. 2017)
  cold_items     whole items, a hash-random `--eval_fraction` of them with all their
                 interactions: the model never trains on an eval item's ID, so it can score it
                 only from its side features (cold start)
  given          the rows of the `--eval_input` files (e.g. MovieLens' u1.test beside
                 u1.base): the vocabularies are the training rows' IDs, and an eval ID never
                 seen in training is written as the out-of-vocabulary index

Rows reach a splitter in provisional codes (`user`, `item`, `ts`, `row` columns, one hash
bucket at a time), so memory is vocabulary-sized, never log-sized.
"""

from typing import Dict, List, Optional

import numpy as np

from trainer.config import PrepareConfig

Rows = Dict[str, np.ndarray]


def hash_pairs(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
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


def uniform_pairs(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
  """A uniform number in [0, 1) per (a, b) pair, fixed by the salt."""
  return (hash_pairs(a, b, salt) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class Splitter:
  """A split protocol. `begin` before the dedupe pass, `observe` each deduped bucket, then
  `expected_eval` and `held_out` in the write pass."""

  needs_timestamps = False
  # The vocabularies hold the training rows' IDs only; other IDs of eval rows are written as
  # the out-of-vocabulary index (else every ID of a kept row has an index of its own).
  training_vocabulary = False

  def __init__(self, config: PrepareConfig):
    self.config = config

  def begin(self, num_users: int, total_rows: int) -> None:
    """Called once the log is read: its provisional user count and its row count."""

  def observe(self, rows: Rows) -> None:
    """Sees one deduped bucket of rows."""

  def expected_eval(self, kept_user: np.ndarray, kept_rows: int) -> float:
    """About how many rows the eval split will hold (`kept_user`: [provisional users] bool)."""
    return kept_rows * self.config.eval_fraction

  def held_out(self, rows: Rows) -> np.ndarray:
    """Bool mask over `rows`: True where the row goes to the eval split."""
    raise NotImplementedError

  def metadata_fields(self) -> dict:
    """`eval_fraction` and `temporal_cutoff` as the metadata records them."""
    return {"eval_fraction": self.config.eval_fraction, "temporal_cutoff": None}

  def empty_message(self) -> str:
    """What to add when a split leaves no training or no eval rows."""
    return ""


class RandomSplit(Splitter):
  """A hash-random fraction of the interactions."""

  def held_out(self, rows):
    return uniform_pairs(rows["user"], rows["item"], self.config.seed + 3) < (
        self.config.eval_fraction)


class TemporalSplit(Splitter):
  """Interactions at or after a time cut."""

  needs_timestamps = True
  _SAMPLE_ROWS = 2_000_000  # timestamps sampled to place the cut

  def __init__(self, config):
    super().__init__(config)
    self._sample: List[np.ndarray] = []
    self._rate = 1.0
    self._cutoff: Optional[int] = config.temporal_cutoff

  def begin(self, num_users, total_rows):
    self._rate = min(1.0, self._SAMPLE_ROWS / max(total_rows, 1))

  def observe(self, rows):
    keep = uniform_pairs(rows["user"], rows["item"], self.config.seed + 7) < self._rate
    self._sample.append(rows["ts"][keep])

  @property
  def cutoff(self) -> int:
    """--temporal_cutoff, or the timestamp below which 1 - --eval_fraction of the sample lies."""
    if self._cutoff is None:
      sample = np.sort(np.concatenate(self._sample))
      fraction = self.config.eval_fraction
      self._cutoff = int(sample[min(len(sample) - 1, int(len(sample) * (1 - fraction)))])
    return self._cutoff

  def expected_eval(self, kept_user, kept_rows):
    if self.config.temporal_cutoff is None:
      return kept_rows * self.config.eval_fraction
    sample = np.concatenate(self._sample) if self._sample else np.zeros(0, np.int64)
    return kept_rows * (float(np.mean(sample >= self.cutoff)) if len(sample) else 0.5)

  def held_out(self, rows):
    return rows["ts"] >= self.cutoff

  def metadata_fields(self):
    at_fraction = self.config.temporal_cutoff is None
    return {"eval_fraction": self.config.eval_fraction if at_fraction else 0.0,
            "temporal_cutoff": self.cutoff}

  def empty_message(self):
    return f" (--temporal_cutoff={self.cutoff})"


class LeaveOneOutSplit(Splitter):
  """Each user's latest interaction (by timestamp, then input order), for users with two or
  more interactions."""

  needs_timestamps = True

  def begin(self, num_users, total_rows):
    self._best_ts = np.full(num_users, np.iinfo(np.int64).min)
    self._best_row = np.full(num_users, -1, np.int64)
    self._best_item = np.full(num_users, -1, np.int64)
    self._user_count = np.zeros(num_users, np.int64)

  def observe(self, rows):
    self._user_count += np.bincount(rows["user"], minlength=len(self._user_count))
    # Each user's latest row of this bucket, then merged with the best so far.
    order = np.lexsort((rows["row"], rows["ts"], rows["user"]))
    users = rows["user"][order]
    last = np.flatnonzero(np.append(users[1:] != users[:-1], True))
    u, ts, row = users[last], rows["ts"][order][last], rows["row"][order][last]
    better = (ts > self._best_ts[u]) | ((ts == self._best_ts[u]) & (row > self._best_row[u]))
    u, ts, row = u[better], ts[better], row[better]
    self._best_ts[u], self._best_row[u] = ts, row
    self._best_item[u] = rows["item"][order][last][better]

  def expected_eval(self, kept_user, kept_rows):
    return float(np.sum(kept_user & (self._user_count >= 2)))

  def held_out(self, rows):
    users = rows["user"]
    return (self._user_count[users] >= 2) & (self._best_item[users] == rows["item"])

  def metadata_fields(self):
    return {"eval_fraction": 0.0, "temporal_cutoff": None}


class ColdItemsSplit(Splitter):
  """Whole items, with every interaction they have; the rest trains."""

  def held_out(self, rows):
    items = rows["item"]
    return uniform_pairs(items, items, self.config.seed + 11) < self.config.eval_fraction

  def empty_message(self):
    return " (too few items for --eval_fraction: hold out more)"


class GivenSplit(Splitter):
  """The rows of the --eval_input files: a row's `src` (its file's index in the source's
  files) at or past `first_eval_file`."""

  training_vocabulary = True

  def __init__(self, config, first_eval_file: int):
    super().__init__(config)
    self.first_eval_file = first_eval_file
    self._eval_rows = 0

  def observe(self, rows):
    self._eval_rows += int(np.sum(self.held_out(rows)))

  def expected_eval(self, kept_user, kept_rows):
    return float(self._eval_rows)

  def held_out(self, rows):
    return rows["src"] >= self.first_eval_file

  def metadata_fields(self):
    return {"eval_fraction": 0.0, "temporal_cutoff": None}

  def empty_message(self):
    return " (--eval_input: every eval row was dropped or merged)"


_SPLITTERS = {"random": RandomSplit, "temporal": TemporalSplit,
              "leave_one_out": LeaveOneOutSplit, "cold_items": ColdItemsSplit}


def make_splitter(config: PrepareConfig, first_eval_file: int = 0) -> Splitter:
  """The splitter of `config.split` (validated by the config); `first_eval_file`: --split=given,
  the index of the source's first --eval_input file."""
  if config.split == "given":
    return GivenSplit(config, first_eval_file)
  return _SPLITTERS[config.split](config)
