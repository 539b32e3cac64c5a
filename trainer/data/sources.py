"""Sources of interaction logs, read in bounded chunks.

A source yields `Chunk`s: aligned columns of raw user and item IDs (kept as strings, as users'
systems have them), ratings (1.0 for implicit feedback) and timestamps when known, plus where
each row came from, so that every later error can name the file and line. Memory per chunk is
bounded (`CHUNK_ROWS`); nothing holds the whole log.

Sources: raw MovieLens files (`u.data`, `ratings.dat`, `ratings.csv`, told apart by content),
any delimited file(s) (`csv`), TensorFlow Datasets' MovieLens builders (`tfds`), and a
synthetic generator with a planted low-rank structure.
"""

import dataclasses
import gzip
import hashlib
import io
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from trainer.data import features, values

CHUNK_ROWS = 1 << 20


@dataclasses.dataclass
class Chunk:
  """Aligned columns of one chunk of rows."""

  users: np.ndarray  # [n] str, or int64 codes when `Source.id_format` is set
  items: np.ndarray  # [n] like users
  ratings: np.ndarray  # [n] float32
  timestamps: Optional[np.ndarray]  # [n] int64, or None when the source has none
  file_index: int  # index into Source.files
  lines: np.ndarray  # [n] int64: each row's line number in that file (row number if no file)
  # Declared context columns (--context_columns): {name: [n] str (categorical, multi_hot) or
  # float64 (numeric, bucketized; NaN where empty)}.
  context: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.ratings)


class Source:
  """A log to read: `chunks()` yields it; `files` names where rows come from."""

  files: Sequence[str] = ()
  id_format: Optional[Sequence[str]] = None  # (user, item) formats of int codes, e.g. "u{}"
  has_ratings: bool = True
  has_timestamps: bool = True
  # Rows skipped under --skip_bad_rows, by reason (None: the first bad row is an error).
  bad: Optional[values.Rejections] = None
  rows_read = 0  # every row read, good or bad (blank lines are not rows)
  blank_lines = 0

  def chunks(self) -> Iterator[Chunk]:
    raise NotImplementedError

  def fingerprint(self) -> Dict[str, object]:
    """What identifies the input (for the metadata); stable for the same input."""
    raise NotImplementedError

  def where(self, file_index: int, line: int) -> str:
    return f"{self.files[file_index]}:{line}" if self.files else f"row {line}"

  def side_features(self) -> List[features.RawFeatures]:
    """Side features the log itself carries (TensorFlow Datasets' MovieLens), else none."""
    return []


@dataclasses.dataclass
class Columns:
  """Which columns of a delimited file hold what: names (with a header) or 0-based indices."""

  user: str
  item: str
  rating: Optional[str] = None  # None: implicit feedback, every row counts as 1.0
  timestamp: Optional[str] = None


class DelimitedSource(Source):
  """Delimited text files (gzip-compressed when a name ends in .gz): MovieLens raw formats and
  any CSV-like log.

  Every value goes through the one policy of `trainer.data.values` (strict numbers, clean
  IDs, exact field counts, UTF-8); a bad row raises ValueError naming file:line, the column
  and the value, or under --skip_bad_rows is counted by reason.

  Args:
    patterns: files or globs, local or `gs://`; read in sorted order.
    columns: which columns hold user, item, rating and timestamp.
    delimiter: one character, or "::" (MovieLens 1M/10M).
    header: the first line of each file names the columns.
    rating_range: ratings outside [low, high] are errors (None: any finite number).
    skip_bad_rows: count and report bad rows instead of failing on the first.
    flag: the flag that named the input, for error messages.
    num_fields: the fields every row holds (a fixed format without a header); None: as many
      as the header names, or without a header as the file's first row holds.
    eval_patterns: --split=given: the evaluation rows' files or globs, read after the others.
    context_specs: the declared context columns (--context_columns), read per row: strings,
      or numbers under the number policy (an empty field is a missing value).
  """

  def __init__(self, patterns: Sequence[str], columns: Columns, delimiter: str = ",",
               header: bool = True, rating_range=None, skip_bad_rows: bool = False,
               flag: str = "--input", description: str = "delimited file",
               num_fields: Optional[int] = None, eval_patterns: Sequence[str] = (),
               context_specs: Sequence[features.FeatureSpec] = ()):
    files = _expand(patterns, flag)
    # --split=given: the evaluation rows' files follow the training ones; a chunk whose
    # file_index is at least `first_eval_file` holds evaluation rows.
    self.first_eval_file = len(files)
    eval_files = _expand(eval_patterns, "--eval_input")
    both = sorted(set(files) & set(eval_files))
    if both:
      raise ValueError(f"--eval_input: {both[0]!r} is also matched by {flag}")
    self.files = files + eval_files
    self.columns = columns
    self.delimiter = delimiter
    self.header = header
    self.rating_range = rating_range
    self.bad = values.Rejections() if skip_bad_rows else None
    self.description = description
    self.num_fields = num_fields
    self.has_ratings = columns.rating is not None
    self.has_timestamps = columns.timestamp is not None
    self.context_specs = tuple(context_specs)
    self._digests: Dict[str, str] = {}

  def fingerprint(self):
    return {"files": [{"path": f, "sha256": self._digests.get(f)} for f in self.files],
            "columns": dataclasses.asdict(self.columns), "delimiter": self.delimiter,
            "header": self.header,
            **({"context_columns": [c.describe() for c in self.context_specs]}
               if self.context_specs else {})}

  def _header(self, path: str, first: str) -> List[str]:
    rows, reasons = values.split_lines([first], self.delimiter)
    if rows[0] is None:
      raise ValueError(f"{path}:1: the header is not valid CSV ({reasons[0].split(':', 1)[1]}): "
                       f"{first[:200]!r}")
    names = [c.strip() for c in rows[0]]
    values.check_header(path, names)
    return names

  def _positions(self, path: str, header_fields: Optional[List[str]]) -> List[Optional[int]]:
    wanted = [self.columns.user, self.columns.item, self.columns.rating, self.columns.timestamp]
    wanted += [spec.column for spec in self.context_specs]
    names = ["user", "item", "rating", "timestamp"]
    names += ["context (--context_columns)"] * len(self.context_specs)
    out: List[Optional[int]] = []
    for name, column in zip(names, wanted):
      if column is None:
        out.append(None)
      elif header_fields is not None:
        if column not in header_fields:
          raise ValueError(f"{path}:1: no {name} column {column!r} in the header "
                           f"{self.delimiter.join(header_fields)[:200]!r}")
        out.append(header_fields.index(column))
      else:
        try:
          out.append(int(column))
        except ValueError:
          flag = (f"--{name}_column" if not name.startswith("context")
                  else "--context_columns")
          raise ValueError(f"{flag}={column!r} must be a 0-based column index when the "
                           "files have no header (--noheader)") from None
    return out

  def chunks(self) -> Iterator[Chunk]:
    for file_index, path in enumerate(self.files):
      yield from self._file_chunks(file_index, path)

  def _file_chunks(self, file_index: int, path: str) -> Iterator[Chunk]:
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as f:
      # utf-8-sig: a byte-order mark at the start is not part of the first field; bytes that
      # are not UTF-8 become lone surrogates, which the policy refuses by line. The digest is
      # of the file's bytes (compressed, for a .gz file).
      raw = _HashingReader(f, digest)
      if path.endswith(".gz"):
        raw = gzip.GzipFile(fileobj=io.BufferedReader(raw), mode="rb")
      text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape",
                              newline=None)
      line_number = 0
      fields = self.num_fields
      if self.header:
        first = text.readline()
        line_number = 1
        if not first.strip():
          raise ValueError(f"{path}: empty file, no header and no rows")
        names = self._header(path, first.rstrip("\n"))
        positions = self._positions(path, names)
        fields = len(names)
      else:
        positions = self._positions(path, None)
      width = max(p for p in positions if p is not None) + 1
      if fields is not None and fields < width:
        raise ValueError(f"{path}:1: the header names {fields} columns, fewer than the "
                         f"column indices need ({width})")
      rows_seen = 0
      while True:
        lines = text.readlines(CHUNK_ROWS * 24)
        if not lines:
          break
        start = line_number + 1
        line_number += len(lines)
        if fields is None:  # no header: the file's first row sets the width
          fields = _first_row_width(lines, self.delimiter, path, start, width)
        chunk = self._parse(path, file_index, start, lines, positions, fields)
        if chunk is not None and len(chunk):
          rows_seen += len(chunk)
          yield chunk
      if rows_seen == 0 and (self.bad is None or self.bad.count == 0):
        raise ValueError(f"{path}: no rows" + (" after the header" if self.header else ""))
    self._digests[path] = digest.hexdigest()

  def _parse(self, path, file_index, start, lines, positions, fields) -> Optional[Chunk]:
    lines = [line.rstrip("\r\n") for line in lines]
    keep_lines = [k for k, line in enumerate(lines) if line.strip()]
    self.blank_lines += len(lines) - len(keep_lines)
    if len(keep_lines) != len(lines):  # blank lines: keep their numbers for messages
      lines = [lines[k] for k in keep_lines]
    self.rows_read += len(lines)
    numbers = np.asarray(keep_lines, np.int64) + start
    rows, reasons = values.line_reasons(lines, self.delimiter, fields,
                                        f" of {self.description}")
    if any(reasons):
      good = [k for k, r in enumerate(reasons) if r is None]
      rows = [rows[k] for k in good]
    else:
      good = range(len(rows))
    pu, pi, pr, pt = positions[:4]
    users = [r[pu].strip() for r in rows]
    items = [r[pi].strip() for r in rows]
    self._check(reasons, good, "user", users, values.id_reasons(users))
    self._check(reasons, good, "item", items, values.id_reasons(items))
    ratings = np.ones(len(rows), np.float64)
    if pr is not None:
      raw = [r[pr].strip() for r in rows]
      ratings, bad = values.parse_numbers(raw)
      self._check(reasons, good, "rating", raw, bad)
      if self.rating_range is not None:
        low, high = self.rating_range
        outside = np.flatnonzero(~((ratings >= low) & (ratings <= high)) & np.isfinite(ratings))
        for j in outside.tolist():
          if reasons[good[j]] is None:
            reasons[good[j]] = ("number_range", f"rating {raw[j]} is outside the range "
                                f"[{low}, {high}]")
    timestamps = None
    if pt is not None:
      raw = [r[pt].strip() for r in rows]
      timestamps, bad = values.parse_integers(raw)
      self._check(reasons, good, "timestamp", raw, bad)
    context = {}
    for spec, position in zip(self.context_specs, positions[4:]):
      raw = [r[position].strip() for r in rows]
      if spec.kind in ("categorical", "multi_hot"):
        context[spec.name] = np.array(raw, dtype=str)
        continue
      present = [k for k, v in enumerate(raw) if v]
      column = np.full(len(raw), np.nan)
      parsed, bad = values.parse_numbers([raw[k] for k in present])
      column[present] = parsed
      self._check(reasons, [good[k] for k in present], f"{spec.kind} context {spec.name!r}",
                  [raw[k] for k in present], bad)
      context[spec.name] = column
    if any(reasons):
      valid = np.array([reasons[k] is None for k in good], bool)
      users, items, ratings, timestamps, numbers = self._drop_bad(
          path, lines, numbers, reasons, good, users, items, ratings, timestamps)
      context = {name: column[valid] for name, column in context.items()}
    if not users:
      return None
    return Chunk(np.array(users), np.array(items), ratings.astype(np.float32), timestamps,
                 file_index, numbers, context)

  def _drop_bad(self, path, lines, numbers, reasons, good, users, items, ratings, timestamps):
    """Raises for, or counts, the bad rows (in line order: the first bad line is the error)
    and returns the columns of the others."""
    for k, reason in enumerate(reasons):
      if reason is not None:
        values.reject(self.bad, reason[0], f"{path}:{numbers[k]}: {reason[1]}: "
                      f"{_shown(lines[k])}")
    valid = np.array([reasons[k] is None for k in good], bool)
    users = [u for u, v in zip(users, valid) if v]
    items = [i for i, v in zip(items, valid) if v]
    timestamps = None if timestamps is None else timestamps[valid]
    numbers = numbers[[k for k, r in enumerate(reasons) if r is None]]
    return users, items, ratings[valid], timestamps, numbers

  @staticmethod
  def _check(reasons, good, column, raw, bad) -> None:
    """Records the first reason of each row (`good[j]` is row j's line) that has none yet."""
    if bad is None:
      return
    for j, reason in enumerate(bad):
      if reason is not None and reasons[good[j]] is None:
        reasons[good[j]] = (reason, values.describe(reason, column, raw[j]))


def _expand(patterns: Sequence[str], flag: str) -> List[str]:
  """The files of `patterns` (globs sorted), in order; a pattern matching none is an error."""
  files: List[str] = []
  for pattern in patterns:
    matched = sorted(tf.io.gfile.glob(pattern)) if any(c in pattern for c in "*?[") else (
        [pattern] if tf.io.gfile.exists(pattern) else [])
    if not matched:
      raise ValueError(f"{flag}: no file matches {pattern!r}")
    files += matched
  return files


def _first_row_width(lines: List[str], delimiter: str, path: str, start: int,
                     width: int) -> int:
  """The field count of the first non-blank line (a file without a header)."""
  for k, line in enumerate(lines):
    line = line.rstrip("\r\n")
    if line.strip():
      rows, _ = values.split_lines([line], delimiter)
      count = len(rows[0]) if rows[0] is not None else width
      if count < width:
        raise ValueError(f"{path}:{start + k}: the first row has {count} fields, fewer than "
                         f"the column indices need ({width}): {_shown(line)}")
      return count
  return width


def _shown(line: str) -> str:
  """A line for an error message: quoted, at most 200 characters."""
  return repr(line if len(line) <= 200 else line[:197] + "...")


class _HashingReader(io.RawIOBase):
  """Feeds every byte read through a digest: input fingerprints at no extra pass."""

  def __init__(self, f, digest):
    self._f, self._digest = f, digest

  def readable(self):
    return True

  def readinto(self, buffer):
    data = self._f.read(len(buffer))
    self._digest.update(data)
    buffer[:len(data)] = data
    return len(data)


# MovieLens raw formats, told apart by their first line.
MOVIELENS_RATING_RANGE = (0.5, 5.0)
_ML_DESCRIPTIONS = {
    "u.data": "MovieLens 100K u.data (user TAB item TAB rating TAB timestamp)",
    "ratings.dat": "MovieLens 1M/10M ratings.dat (user::item::rating::timestamp)",
    "ratings.csv": "MovieLens ratings.csv (userId,movieId,rating,timestamp, header)",
}


def detect_movielens_format(path: str, first_line: str) -> str:
  """Returns the MovieLens format of a ratings file from its first line."""
  if "::" in first_line:
    return "ratings.dat"
  if "\t" in first_line:
    return "u.data"
  if first_line.startswith("userId,movieId,rating"):
    return "ratings.csv"
  raise ValueError(f"{path}:1: not a MovieLens ratings file (expected u.data, ratings.dat or "
                   f"ratings.csv with header 'userId,movieId,rating,timestamp'); first line is "
                   f"{first_line[:80]!r}")


def _movielens_format(path: str, flag: str) -> str:
  """The MovieLens format of the ratings file `path` (named by `flag`)."""
  if not tf.io.gfile.exists(path):
    raise ValueError(f"{flag}: file {path!r} does not exist")
  with tf.io.gfile.GFile(path, "rb") as f:
    reader = gzip.GzipFile(fileobj=f, mode="rb") if path.endswith(".gz") else f
    first = reader.readline().decode("utf-8", errors="replace").rstrip("\r\n")
  if not first.strip():
    raise ValueError(f"{path}: empty file, no ratings")
  return detect_movielens_format(path, first)


def movielens_source(path: str, skip_bad_rows: bool = False,
                     eval_paths: Sequence[str] = ()) -> DelimitedSource:
  """A raw MovieLens ratings file, its format detected from the first line; `eval_paths`
  (--split=given): the evaluation rows' files, in the same format."""
  fmt = _movielens_format(path, "--input")
  for other in eval_paths:
    if _movielens_format(other, "--eval_input") != fmt:
      raise ValueError(f"--eval_input: {other!r} is not in the format of --input {path!r} "
                       f"({_ML_DESCRIPTIONS[fmt]})")
  if fmt == "ratings.csv":
    columns = Columns("userId", "movieId", "rating", "timestamp")
    return DelimitedSource([path], columns, ",", True, MOVIELENS_RATING_RANGE, skip_bad_rows,
                           description=_ML_DESCRIPTIONS[fmt], eval_patterns=eval_paths)
  return DelimitedSource([path], Columns("0", "1", "2", "3"),
                         "\t" if fmt == "u.data" else "::", False, MOVIELENS_RATING_RANGE,
                         skip_bad_rows, description=_ML_DESCRIPTIONS[fmt], num_fields=4,
                         eval_patterns=eval_paths)


class TfdsSource(Source):
  """A MovieLens ratings config of TensorFlow Datasets, through its real builder.

  With `manual_dir`, an archive already there under its registered name (e.g.
  `ml-latest-small.zip`) is used instead of downloading, after TFDS checks its size and sha256.
  """

  def __init__(self, name: str, data_dir: Optional[str] = None,
               manual_dir: Optional[str] = None):
    if not name.startswith("movielens/") or not name.endswith("-ratings"):
      raise ValueError(f"--tfds_name={name!r} must be a MovieLens ratings config, e.g. "
                       "movielens/100k-ratings or movielens/latest-small-ratings")
    import tensorflow_datasets as tfds  # imported here: slow, and only this source needs it
    self._tfds = tfds
    self.name = name
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for unknown names/configs
      raise ValueError(f"--tfds_name={name!r}: {e}") from None
    self.manual_dir = manual_dir
    self.files = [f"tfds:{name}"]

  def fingerprint(self):
    return {"tfds": self.name, "version": str(self.builder.info.version)}

  def _dataset(self):
    """The builder's examples, downloaded (or taken from manual_dir) and prepared once."""
    if not getattr(self, "_prepared", False):
      config = self._tfds.download.DownloadConfig(manual_dir=self.manual_dir)
      logging.info("Preparing %s with TensorFlow Datasets in %s", self.name,
                   self.builder.data_dir)
      self.builder.download_and_prepare(download_config=config)
      self._prepared = True
    return self.builder.as_dataset(split="train", shuffle_files=False)

  def side_features(self) -> List["features.RawFeatures"]:
    """The side features the builder's examples carry (`features.from_movielens_examples`),
    read in one pass of the examples' feature columns."""
    info = self.builder.info.features
    genre_names = info["movie_genres"].feature.names
    columns = ["movie_id", "movie_title", "movie_genres", "user_id"]
    if "user_gender" in info:
      columns += ["user_gender", "bucketized_user_age", "user_occupation_text", "user_zip_code"]
    ds = self._dataset().map(lambda x: {c: x[c] for c in columns})

    def examples():
      for example in self._tfds.as_numpy(ds):
        decoded = {c: v.decode() if isinstance(v, bytes) else v for c, v in example.items()}
        decoded["movie_genres"] = [genre_names[g] for g in example["movie_genres"]]
        yield decoded

    return features.from_movielens_examples(examples(), self.files[0])

  def chunks(self) -> Iterator[Chunk]:
    ds = self._dataset()
    ds = ds.map(lambda x: {"user": x["user_id"], "item": x["movie_id"],
                           "rating": x["user_rating"], "timestamp": x["timestamp"]})
    line = 1
    for batch in self._tfds.as_numpy(ds.batch(CHUNK_ROWS)):
      users = [u.decode("utf-8", "surrogateescape").strip() for u in batch["user"]]
      items = [i.decode("utf-8", "surrogateescape").strip() for i in batch["item"]]
      chunk = checked_chunk(self, users, items, batch["rating"].astype(np.float64),
                            batch["timestamp"].astype(np.int64), 0,
                            np.arange(line, line + len(users), dtype=np.int64))
      self.rows_read += len(users)
      line += len(users)
      if chunk is not None:
        yield chunk


def checked_chunk(source: Source, users: List[str], items: List[str], ratings: np.ndarray,
                  timestamps: Optional[np.ndarray], file_index: int,
                  lines: np.ndarray) -> Optional[Chunk]:
  """A chunk of values parsed already (TensorFlow Datasets) under the policy of
  `trainer.data.values`: IDs (as Python strings: a NumPy string array drops trailing NULs) and
  ratings checked, bad rows raised or counted; ratings become float32."""
  reasons: List[Optional[Tuple[str, str]]] = [None] * len(users)
  for column, check, raw in (("user", values.id_reasons(users), users),
                             ("item", values.id_reasons(items), items),
                             ("rating", values.check_numbers(ratings), ratings)):
    for k, reason in enumerate(check or ()):
      if reason is not None and reasons[k] is None:
        reasons[k] = (reason, values.describe(reason, column, str(raw[k])))
  for k, reason in enumerate(reasons):  # in row order: the first bad row is the error
    if reason is not None:
      values.reject(source.bad, reason[0], f"{source.where(file_index, lines[k])}: {reason[1]}")
  valid = np.array([r is None for r in reasons], bool)
  if not valid.any():
    return None
  return Chunk(np.array(users)[valid], np.array(items)[valid],
               np.asarray(ratings)[valid].astype(np.float32),
               None if timestamps is None else timestamps[valid], file_index, lines[valid])


