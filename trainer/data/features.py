"""Side features: user and item metadata read from feature files and turned into tables.

A feature file describes one side (users or items): one row per raw ID, with typed columns.
Preparation reads it before the interaction log (so a malformed file fails before any long
pass), then writes one table per side indexed by the *dense* ID of the vocabulary, plus a
vocabulary per categorical feature. Records stay small and the model gathers a batch's
features in-graph from the tables. Memory is O(entities x features), never O(interactions).

Kinds of feature (`name:kind[:argument]` in `--user_feature_columns`/`--item_feature_columns`):

  categorical       one value; a vocabulary of values seen at least `--min_feature_count`
                    times, most frequent first; others (and missing values) map to index 0
  multi_hot:SEP     values separated by SEP (e.g. `tags:multi_hot:|`); the same vocabulary
                    rule; stored as [rows, width] indices padded with 0
  numeric           a number, standardised by the mean and standard deviation over the
                    entities that have one; missing -> 0 (the mean)
  bucketized:N      a number, cut into up to N buckets at quantiles over the entities; index
                    0 is missing, 1..N the buckets

MovieLens side files are read by their known layouts (told apart by content, as the ratings):
100K `u.item` (19 genre flags -> `genres`; release year -> `year`, bucketized) and `u.user`
(`age` bucketized, `gender`, `occupation`, `zip` prefix); 1M `movies.dat` (`genres`, `year`
from the title) and `users.dat` (`gender`, `age`, `occupation`, `zip`); latest/20M/25M
`movies.csv` (`genres`, `year` from the title).

Row 0 of every vocabulary is the missing/out-of-vocabulary value; a table has one row per
dense ID plus a last row for the out-of-vocabulary ID, all missing.
"""

import csv
import dataclasses
import io
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from trainer import schema
from trainer.config import PrepareConfig
from trainer.data import lineage, values

KINDS = ("categorical", "multi_hot", "numeric", "bucketized")
_NUMERIC_KINDS = ("numeric", "bucketized")  # parsed as numbers when the file is read
SIDES = (schema.USER, schema.ITEM)
_YEAR_BUCKETS = 10
_AGE_BUCKETS = 7


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """One feature of a side: its name, kind and the column it comes from."""

  name: str
  kind: str
  column: str  # header name, or 0-based index without a header
  separator: str = "|"  # multi_hot
  buckets: int = 10  # bucketized

  def describe(self) -> str:
    arg = {"multi_hot": f":{self.separator}", "bucketized": f":{self.buckets}"}.get(self.kind, "")
    return f"{self.name}:{self.kind}{arg}"


def parse_specs(text: str, flag: str) -> Tuple[FeatureSpec, ...]:
  """Parses `name:kind[:argument],...` (a column's name is the feature's name).

  Raises:
    ValueError: naming the flag and the offending entry.
  """
  specs: List[FeatureSpec] = []
  for entry in (e.strip() for e in _split_entries(text)):
    if not entry:
      continue
    parts = entry.split(":", 2)
    if len(parts) < 2 or not parts[0] or parts[1] not in KINDS:
      raise ValueError(f"--{flag}: {entry!r} is not name:kind[:argument] with kind one of "
                       f"{', '.join(KINDS)}")
    name, kind, arg = parts[0], parts[1], parts[2] if len(parts) == 3 else None
    if kind == "multi_hot":
      if not arg:
        raise ValueError(f"--{flag}: {entry!r}: multi_hot needs a separator, e.g. {name}:"
                         "multi_hot:|")
      specs.append(FeatureSpec(name, kind, name, separator=arg))
    elif kind == "bucketized":
      if arg is None or not arg.isdigit() or int(arg) < 2:
        raise ValueError(f"--{flag}: {entry!r}: bucketized needs a bucket count of at least 2, "
                         f"e.g. {name}:bucketized:10")
      specs.append(FeatureSpec(name, kind, name, buckets=int(arg)))
    else:
      if arg is not None:
        raise ValueError(f"--{flag}: {entry!r}: {kind} takes no argument")
      specs.append(FeatureSpec(name, kind, name))
  names = [s.name for s in specs]
  duplicated = sorted({n for n in names if names.count(n) > 1})
  if duplicated:
    raise ValueError(f"--{flag}: features {duplicated} are declared twice")
  return tuple(specs)


def _split_entries(text: str) -> List[str]:
  """Splits on commas, except a comma that is a multi_hot separator (`tags:multi_hot:,`)."""
  out, current = [], ""
  for piece in text.split(","):
    if current.endswith(":multi_hot:"):
      current += ","
      if piece:
        out.append(current)
        current = piece
      continue
    if current:
      out.append(current)
    current = piece
  if current:
    out.append(current)
  return out


@dataclasses.dataclass
class RawFeatures:
  """A side's feature file, read: raw ID -> raw values (strings, None when empty)."""

  side: str
  path: str
  specs: Tuple[FeatureSpec, ...]
  ids: List[str]
  # feature name -> one value per row, in `ids` order: strings (None when empty), or for
  # numeric and bucketized features float64 numbers (NaN when empty), parsed once when read
  values: Dict[str, Any]
  lines: List[int]  # each row's line number
  bad: Optional[values.Rejections] = None  # rows skipped under --skip_bad_rows, by reason


# ----------------------------------------------------------------------------- reading files


def read_feature_file(side: str, path: str, id_column: Optional[str],
                      specs: Sequence[FeatureSpec], delimiter: str = ",",
                      header: bool = True,
                      bad: Optional[values.Rejections] = None) -> RawFeatures:
  """Reads a delimited feature file: an ID column and the declared feature columns, under the
  one policy of `trainer.data.values` (UTF-8, exact field counts, clean IDs, strict numbers).

  Args:
    bad: under --skip_bad_rows, where bad rows are counted by reason (None: they raise).

  Raises:
    ValueError: naming file:line and the value: an unknown or repeated column, a duplicate ID
      row, a row with another number of fields than the header, a bad ID or number.
  """
  if not id_column:
    raise ValueError(f"--{side}_features={path}: name its ID column with --{side}_id_column")
  if not specs:
    raise ValueError(f"--{side}_features={path}: declare its columns with "
                     f"--{side}_feature_columns (name:kind[:argument],...)")
  text = _read_text(path, "utf-8-sig", "surrogateescape")
  lines = [line.rstrip("\n") for line in io.StringIO(text, newline=None).readlines()]
  first = 1
  columns = [id_column] + [s.column for s in specs]
  fields = None
  if header:
    parsed, _ = values.split_lines(lines[:1], delimiter)
    names = [c.strip() for c in (parsed[0] or [])] if parsed else []
    values.check_header(path, names)
    unknown = [c for c in columns if c not in names]
    if unknown:
      raise ValueError(f"{path}:1: no column {unknown[0]!r} in the header "
                       f"{delimiter.join(names)[:200]!r}")
    positions = [names.index(c) for c in columns]
    fields, lines, first = len(names), lines[1:], 2
  else:
    try:
      positions = [int(c) for c in columns]
    except ValueError:
      raise ValueError(f"--{side}_id_column / --{side}_feature_columns must name 0-based "
                       "column indices when the feature file has no header") from None
  if fields is None:  # no header: the first row sets the width
    first_rows, _ = values.split_lines([line for line in lines if line.strip()][:1], delimiter)
    fields = len(first_rows[0]) if first_rows and first_rows[0] is not None else None
  rows, reasons = values.line_reasons(lines, delimiter, fields)
  return _collect(side, path, specs, ((first + k, reason or row, line) for k, (row, reason, line)
                                      in enumerate(zip(rows, reasons, lines))), positions, bad)


def _read_text(path: str, encoding: str, errors: str = "replace") -> str:
  if not tf.io.gfile.exists(path):
    raise ValueError(f"feature file {path!r} does not exist")
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read().decode(encoding, errors=errors)


def _collect(side: str, path: str, specs: Sequence[FeatureSpec],
             rows: Iterable[Tuple[int, Any, str]], positions: List[int],
             bad: Optional[values.Rejections] = None) -> RawFeatures:
  """Rows (line, fields or (reason, why), text) -> RawFeatures under the policy: a row already
  found bad, with too few fields for the positions, an empty, unclean or repeated ID, or a bad
  number raises or, with `bad`, is counted and skipped."""
  out = RawFeatures(side, path, tuple(specs), [], {s.name: [] for s in specs}, [], bad)
  first_line: Dict[str, int] = {}
  width = max(positions) + 1
  numeric = [spec.kind in _NUMERIC_KINDS for spec in specs]
  for line, row, text in rows:
    if not text.strip():
      continue
    problem = row if isinstance(row, tuple) else _row_problem(
        row, positions, specs, numeric, width, side, first_line, path)
    if problem is not None:
      values.reject(bad, problem[0], f"{path}:{line}: {problem[1]}: {text[:200]!r}")
      continue
    raw_id = row[positions[0]].strip()
    first_line[raw_id] = line
    out.ids.append(raw_id)
    out.lines.append(line)
    for spec, position, is_number in zip(specs, positions[1:], numeric):
      value = row[position].strip()
      out.values[spec.name].append((values.parse_number(value)[0] if value else np.nan)
                                   if is_number else (value or None))
  if not out.ids:
    raise ValueError(f"{path}: no feature rows"
                     + (f" ({bad.count} bad rows skipped)" if bad and bad.count else ""))
  for spec, is_number in zip(specs, numeric):
    if is_number:
      out.values[spec.name] = np.asarray(out.values[spec.name], np.float64)
  return out


def _row_problem(row: List[str], positions: List[int], specs: Sequence[FeatureSpec],
                 numeric: List[bool], width: int, side: str,
                 first_line: Dict[str, int], path: str) -> Optional[Tuple[str, str]]:
  """(reason, what is wrong) of a feature row, or None when it is good."""
  if len(row) < width:
    return "fields", f"expected at least {width} fields, got {len(row)}"
  raw_id = row[positions[0]].strip()
  reason = values.id_reason(raw_id)
  if reason is not None:
    return reason, values.describe(reason, f"{side} ID", raw_id)
  if raw_id in first_line:
    return "id_duplicate", (f"duplicate row for {side} {raw_id!r}, first at "
                            f"{path}:{first_line[raw_id]}")
  for spec, position, is_number in zip(specs, positions[1:], numeric):
    value = row[position].strip()
    if is_number and value:
      reason = values.parse_number(value)[1]
      if reason is not None:
        return reason, values.describe(reason, f"{spec.kind} feature {spec.name!r}", value)
  return None


# MovieLens side files: fixed layouts, read into named features.
_ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                  "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                  "Romance", "Sci-Fi", "Thriller", "War", "Western")
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")
MOVIELENS_ITEM_SPECS = (FeatureSpec("genres", "multi_hot", "genres", separator="|"),
                        FeatureSpec("year", "bucketized", "year", buckets=_YEAR_BUCKETS))
ML100K_USER_SPECS = (FeatureSpec("age", "bucketized", "age", buckets=_AGE_BUCKETS),
                     FeatureSpec("gender", "categorical", "gender"),
                     FeatureSpec("occupation", "categorical", "occupation"),
                     FeatureSpec("zip", "categorical", "zip"))
ML1M_USER_SPECS = (FeatureSpec("age", "categorical", "age"),  # already in 7 age groups
                   FeatureSpec("gender", "categorical", "gender"),
                   FeatureSpec("occupation", "categorical", "occupation"),
                   FeatureSpec("zip", "categorical", "zip"))
_ZIP_PREFIX = 2  # leading characters of a zip code kept: about a hundred US regions


def read_movielens_features(side: str, path: str) -> RawFeatures:
  """A MovieLens users or items file, its layout told apart by its first line.

  Raises:
    ValueError: naming file:line: not a MovieLens file of this side, or a malformed row.
  """
  # MovieLens 100K and 1M files are ISO-8859-1; latest/20M/25M are UTF-8.
  text = _read_text(path, "latin-1")
  first = text.split("\n", 1)[0].rstrip("\r")
  lines = ((k + 1, line.rstrip("\r")) for k, line in enumerate(text.split("\n")))
  if side == schema.ITEM and first.startswith("movieId,title,genres"):
    text = _read_text(path, "utf-8")
    rows = csv.reader(io.StringIO(text))
    next(rows)
    return _collect(side, path, MOVIELENS_ITEM_SPECS, (
        (k + 2, [r[0], _movielens_genres(r[2]), _title_year(r[1])] if len(r) >= 3 else r,
         ",".join(r)) for k, r in enumerate(rows)), [0, 1, 2])
  layouts = [
      (schema.ITEM, first.count("|") == 23, MOVIELENS_ITEM_SPECS,  # 100K u.item
       lambda k, line: _ml100k_item(path, k, line)),
      (schema.ITEM, first.count("::") == 2, MOVIELENS_ITEM_SPECS,  # 1M movies.dat
       lambda k, line: _ml1m_item(line)),
      (schema.USER, first.count("|") == 4, ML100K_USER_SPECS,  # 100K u.user
       lambda k, line: _ml_user(line.split("|"), (1, 2, 3, 4))),
      (schema.USER, first.count("::") == 4, ML1M_USER_SPECS,  # 1M users.dat
       lambda k, line: _ml_user(line.split("::"), (2, 1, 3, 4)))]
  for layout_side, matches, specs, fields_of in layouts:
    if side == layout_side and matches:
      return _collect(side, path, specs, ((k, fields_of(k, line), line) for k, line in lines),
                      list(range(len(specs) + 1)))
  expected = ("u.item, movies.dat or movies.csv" if side == schema.ITEM
              else "u.user or users.dat")
  raise ValueError(f"{path}:1: not a MovieLens {side}s file (expected {expected}); first line "
                   f"is {first[:80]!r}. Declare the columns of any other file with "
                   f"--{side}_id_column and --{side}_feature_columns")


def from_movielens_examples(examples: Iterable[Mapping[str, Any]],
                            path: str) -> List[RawFeatures]:
  """Side features from TensorFlow Datasets' MovieLens rating examples, decoded (genre and
  occupation names as strings): items' `genres` and `year` (as `movies.csv` gives them), and
  when the examples carry demographics (100K, 1M) users' `age` (the builder's age group),
  `gender`, `occupation`, `zip` (prefix). One row per ID, from its first example; memory is
  O(entities)."""
  items: Dict[str, Tuple[str, List[str]]] = {}
  users: Dict[str, Tuple[str, List[str]]] = {}
  for n, example in enumerate(examples):
    item = str(example["movie_id"])
    if item not in items:
      genres = "|".join(g for g in example["movie_genres"] if g != "(no genres listed)")
      items[item] = (n + 1, [item, genres, _title_year(str(example["movie_title"]))])
    user = str(example["user_id"])
    if "user_gender" in example and user not in users:
      users[user] = (n + 1, [user, str(int(example["bucketized_user_age"])),
                             "M" if example["user_gender"] else "F",
                             str(example["user_occupation_text"]),
                             str(example["user_zip_code"])[:_ZIP_PREFIX]])
  out = []
  if items:
    out.append(_collect(schema.ITEM, path, MOVIELENS_ITEM_SPECS,
                        ((n, row, "|".join(row)) for n, row in items.values()), [0, 1, 2]))
  if users:
    out.append(_collect(schema.USER, path, ML1M_USER_SPECS,
                        ((n, row, "|".join(row)) for n, row in users.values()), [0, 1, 2, 3, 4]))
  return out


def _movielens_genres(text: str) -> str:
  return "" if text.strip() in ("", "(no genres listed)") else text


def _title_year(title: str) -> str:
  match = _YEAR_IN_TITLE.search(title.strip())
  return match.group(1) if match else ""


def _ml100k_item(path: str, line_number: int, line: str) -> List[str]:
  fields = line.split("|")
  if len(fields) != 24:
    return fields  # blank, or too short: _collect names it
  flags = fields[5:]
  if any(f not in ("0", "1") for f in flags):
    raise ValueError(f"{path}:{line_number}: genre flags must be 0 or 1, got {flags!r}")
  genres = "|".join(g for g, f in zip(_ML100K_GENRES, flags) if f == "1")
  year = fields[2][-4:] if fields[2].strip() else ""
  return [fields[0], genres, year]


def _ml1m_item(line: str) -> List[str]:
  fields = line.split("::")
  if len(fields) != 3:
    return fields
  return [fields[0], _movielens_genres(fields[2]), _title_year(fields[1])]


def _ml_user(fields: List[str], order: Tuple[int, int, int, int]) -> List[str]:
  """ID, then age, gender, occupation (their positions in `order`), zip prefix."""
  if len(fields) != 5:
    return fields
  age, gender, occupation, zip_code = (fields[k].strip() for k in order)
  return [fields[0], age, gender, occupation, zip_code[:_ZIP_PREFIX]]


# ----------------------------------------------------------------------------- encoding


@dataclasses.dataclass
class EncodedFeatures:
  """One side's encoded features, indexed by dense ID (last row: the out-of-vocabulary ID)."""

  side: str
  specs: Tuple[FeatureSpec, ...]
  arrays: Dict[str, np.ndarray]  # int32 [rows] / [rows, width], or float32 [rows]
  vocabularies: Dict[str, List[str]]  # categorical and multi_hot: values of index 1..
  info: List[dict]  # per feature, for the metadata
  rows_without_entity: int  # feature rows whose ID is not in the interaction log
  entities_without_row: int  # IDs of the log with no feature row (every feature missing)
  path: str = ""  # where the features came from (a file, or tfds:<name>)
  bad_rows_by_reason: Dict[str, int] = dataclasses.field(default_factory=dict)
  # Prepared on a base: {categorical or multi-hot feature: {old, new, absent}} values.
  lineage_counts: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)


def encode(raw: RawFeatures, dense_ids: Sequence[str], min_count: int,
           base: Optional["lineage.Base"] = None) -> EncodedFeatures:
  """Encodes raw features into tables over the log's dense IDs.

  Args:
    raw: the side's feature file, read.
    dense_ids: the vocabulary: raw ID of dense index n.
    min_count: values seen on fewer entities map to the out-of-vocabulary index 0.
    base: a prepared directory whose value vocabularies and statistics a feature of the same
      name keeps (`trainer.data.lineage`).

  Raises:
    ValueError: a feature is of another kind in `base`.
  """
  index = {raw_id: n for n, raw_id in enumerate(dense_ids)}
  row_of = np.full(len(dense_ids) + 1, -1, np.int64)  # dense ID -> row of the file
  unmatched = 0
  for k, raw_id in enumerate(raw.ids):
    n = index.get(raw_id)
    if n is None:
      unmatched += 1
    else:
      row_of[n] = k
  arrays, vocabularies, info, counts = {}, {}, [], {}
  for spec in raw.specs:
    kept = lineage.kept(base, raw.side, spec.name, spec.kind)
    column = raw.values[spec.name]
    if spec.kind in _NUMERIC_KINDS:  # by dense ID; NaN where the file has no row
      values = np.where(row_of >= 0, column[np.maximum(row_of, 0)], np.nan)
      missing = int(np.isnan(values[:-1]).sum())
    else:
      values = [column[k] if k >= 0 else None for k in row_of.tolist()]
      missing = int(sum(v is None for v in values[:-1]))
    array, vocabulary, extra = _ENCODERS[spec.kind](spec, values, min_count, kept)
    arrays[spec.name] = array
    if vocabulary is not None:
      vocabularies[spec.name] = vocabulary
      if base is not None:
        counts[spec.name] = extra.pop("lineage", {"old": 0, "new": len(vocabulary),
                                                  "absent": 0})
    info.append({"side": raw.side, "name": spec.name, "kind": spec.kind, "missing": missing,
                 **extra})
  return EncodedFeatures(raw.side, raw.specs, arrays, vocabularies, info, unmatched,
                      int(np.sum(row_of[:-1] < 0)), raw.path,
                      dict(raw.bad.by_reason) if raw.bad is not None else {}, counts)


def _vocabulary(tokens: List[List[str]], min_count: int) -> List[str]:
  """Values on at least `min_count` entities, most frequent first, ties by value."""
  counts: Dict[str, int] = {}
  for entity in tokens:
    for value in set(entity):
      counts[value] = counts.get(value, 0) + 1
  kept = [v for v, c in counts.items() if c >= min_count]
  return sorted(kept, key=lambda v: (-counts[v], v))


def _on_base(vocabulary: List[str], base: Optional[List[str]]) -> Tuple[List[str], dict]:
  """The vocabulary, or (on a base) the base's extended by it; and the lineage counts."""
  if base is None:
    return vocabulary, {}
  extended, counts = lineage.extend(base, vocabulary)
  return extended, {"lineage": counts}


def _encode_categorical(spec, values, min_count, base=None):
  vocabulary, extra = _on_base(_vocabulary([[v] for v in values if v is not None], min_count),
                               base)
  lookup = {v: n + 1 for n, v in enumerate(vocabulary)}
  array = np.array([lookup.get(v, 0) if v is not None else 0 for v in values], np.int32)
  return array, vocabulary, {"vocab_size": len(vocabulary) + 1, **extra}


def _encode_multi_hot(spec, values, min_count, base=None):
  tokens = [[t.strip() for t in v.split(spec.separator) if t.strip()] if v is not None else []
            for v in values]
  vocabulary, extra = _on_base(_vocabulary(tokens, min_count), base)
  lookup = {v: n + 1 for n, v in enumerate(vocabulary)}
  width = max(1, max(len(t) for t in tokens))
  array = np.zeros((len(values), width), np.int32)
  for row, entity in enumerate(tokens):
    codes = sorted({lookup[t] for t in entity if t in lookup})
    array[row, :len(codes)] = codes
  return array, vocabulary, {"vocab_size": len(vocabulary) + 1, "width": width, **extra}


def _encode_numeric(spec, numbers, min_count, base=None):
  present = numbers[np.isfinite(numbers)]
  mean = float(present.mean()) if len(present) else 0.0
  std = float(present.std()) if len(present) else 1.0
  std = std if std > 0 else 1.0
  if base is not None:
    mean, std = base["mean"], base["std"]
  array = np.where(np.isfinite(numbers), (numbers - mean) / std, 0.0).astype(np.float32)
  return array, None, {"mean": mean, "std": std}


def _encode_bucketized(spec, numbers, min_count, base=None):
  present = np.isfinite(numbers)
  edges = np.unique(np.quantile(numbers[present], np.linspace(0, 1, spec.buckets + 1)[1:-1])
                    ) if present.any() else np.zeros(0)
  if base is not None:
    edges = np.asarray(base["edges"], np.float64)
  array = np.where(present, 1 + np.searchsorted(edges, np.where(present, numbers, 0.0),
                                                side="right"), 0).astype(np.int32)
  return array, None, {"vocab_size": len(edges) + 2, "edges": [float(e) for e in edges]}


_ENCODERS = {"categorical": _encode_categorical, "multi_hot": _encode_multi_hot,
             "numeric": _encode_numeric, "bucketized": _encode_bucketized}


def read_features(config: PrepareConfig,
                  source=None) -> List[RawFeatures]:
  """The side feature files of the configuration, read (entity-sized) and checked; for a side
  without one, the features `source` (a `sources.Source`) carries (--tfds_features)."""
  out = []
  given = {side for side, _ in config.feature_files()}
  if source is not None and config.source == "tfds" and config.tfds_features:
    out += [raw for raw in source.side_features() if raw.side not in given]
  for side, path in config.feature_files():
    columns = getattr(config, f"{side}_feature_columns")
    if columns is None:
      out.append(read_movielens_features(side, path))
      continue
    specs = parse_specs(columns, f"{side}_feature_columns")
    out.append(read_feature_file(side, path, getattr(config, f"{side}_id_column"),
                                          specs, config.features_delimiter,
                                          config.features_header,
                                          values.Rejections() if config.skip_bad_rows else None))
  return out
