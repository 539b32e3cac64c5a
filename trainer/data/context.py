"""Context: per-interaction features, carried by each example beside its user and item.

Two sources of context, declared at preparation:

  --context=hour,weekday,tenure,item_age   derived from the row's timestamp (UTC):
      hour       hour of day, 0..23
      weekday    day of week, 0 (Monday)..6
      tenure     days since the user's first *training* interaction
      item_age   days since the item's first training interaction
    each a `bucketized` feature with fixed edges (hour and weekday: one bucket per value;
    tenure and item_age: `DAY_EDGES`). Tenure and age come from the training rows only, so an
    evaluation row never sees its own future: a row earlier than its user's first training
    interaction, or of a user (item) without any, has the missing value.
  --context_columns=device:categorical,price:numeric,...   columns of the log (csv), of the
    side features' kinds: categorical, a vocabulary of the values on at least
    --min_feature_count training rows, most frequent first; multi_hot:SEP, the same for the
    values a row lists (e.g. `tags:multi_hot:|`), as many per row as the log's longest list;
    numeric standardised by the training rows' mean and deviation; bucketized at the training
    rows' quantiles.

Every statistic (vocabularies, means, quantiles, first interactions) is of the training rows
only, gathered in one pass over the scratch rows once the split is known (`ContextStats.fit`),
then each row is encoded as it is written (`ContextStats.encode`). Each feature is a
`schema.FeatureInfo` of side `context` in the metadata, beside the side features, so models,
`--features` and the serving encoders treat it as one more feature whose values come with the
example instead of from a table.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np

from trainer import schema
from trainer.config import PrepareConfig
from trainer.data import features, lineage
from trainer.data.scratch import IdEncoder, Scratch

DAY = 86_400
# Bucket edges of tenure and item age, in days: under a day, a week, a month, a quarter, a
# year, three years, and more.
DAY_EDGES = (1.0, 7.0, 30.0, 90.0, 365.0, 1095.0)
_DERIVED_EDGES = {"hour": tuple(float(h) for h in range(1, 24)),
                  "weekday": tuple(float(d) for d in range(1, 7)),
                  "tenure": DAY_EDGES, "item_age": DAY_EDGES}
_SAMPLE_ROWS = 1_000_000  # training values kept to place a declared bucketized feature's edges


def column_name(name: str) -> str:
  """The scratch column of a declared context feature."""
  return f"cx_{name}"


def declared_specs(config: PrepareConfig) -> List[features.FeatureSpec]:
  """The --context_columns, parsed; names may not repeat --context's.

  Raises:
    ValueError: naming --context_columns and the offending entry.
  """
  if not config.context_columns:
    return []
  specs = list(features.parse_specs(config.context_columns, "context_columns"))
  for spec in specs:
    if spec.name in config.context:
      raise ValueError(f"--context_columns: {spec.name!r} is also a derived --context feature")
  return specs


def derived_values(name: str, ts: np.ndarray, first: Optional[np.ndarray]) -> np.ndarray:
  """A derived feature's value per row (float64, NaN where missing): `first` is each row's
  user's (tenure) or item's (item_age) first training timestamp, int64 max where none."""
  if name == "hour":
    return ((ts // 3600) % 24).astype(np.float64)
  if name == "weekday":
    return ((ts // DAY + 3) % 7).astype(np.float64)  # 1970-01-01 was a Thursday
  days = (ts - first) / DAY
  return np.where(days >= 0, days, np.nan)


def bucketize(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
  """1 + the bucket of each value at `edges` (right-closed below), 0 where NaN."""
  present = np.isfinite(values)
  bucket = 1 + np.searchsorted(np.asarray(edges), np.where(present, values, 0.0), side="right")
  return np.where(present, bucket, 0).astype(np.int64)


class ContextStats:
  """The context features of one preparation: provisional codes of the declared categorical
  values (pass 1), the training rows' statistics (`fit`), each row's encoding (`encode`), and
  what the metadata and the vocabulary files record."""

  def __init__(self, config: PrepareConfig, declared: Sequence[features.FeatureSpec],
               base: Optional[lineage.Base] = None):
    self.config = config
    self.base = base  # a prepared directory whose vocabularies and statistics are kept
    self.lineage_counts: Dict[str, Dict[str, int]] = {}  # on a base: {name: old, new, absent}
    self.declared = list(declared)
    self.derived = list(config.context)
    self.codes = {s.name: IdEncoder() for s in self.declared if s.kind == "categorical"}
    self._index: Dict[str, np.ndarray] = {}  # categorical: provisional code -> index
    self._tokens: Dict[str, Dict[str, int]] = {}  # multi_hot: value -> index
    self._width: Dict[str, int] = {}  # multi_hot: values per row at most
    self._vocabulary: Dict[str, List[str]] = {}
    self._moments: Dict[str, tuple] = {}  # numeric: (mean, std)
    self._edges: Dict[str, tuple] = dict((n, _DERIVED_EDGES[n]) for n in self.derived)
    self._first_user: Optional[np.ndarray] = None
    self._first_item: Optional[np.ndarray] = None
    self._missing: Dict[str, int] = {}
    for spec in self.declared:  # a kind other than the base's: refused before any pass
      lineage.kept(base, schema.CONTEXT, spec.name, spec.kind)

  def __bool__(self) -> bool:
    return bool(self.declared or self.derived)

  def scratch_columns(self, chunk_context: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Pass 1: a chunk's declared context as scratch columns (categorical values coded)."""
    out = {}
    for spec in self.declared:
      value = chunk_context[spec.name]
      if spec.kind == "categorical":
        value = self.codes[spec.name].encode(value)
      out[column_name(spec.name)] = value
    return out

  def fit(self, scratch: Scratch, training_rows, num_users: int, num_items: int,
          total_rows: int) -> None:
    """One pass over the scratch rows (`total_rows` of them): the statistics of the training
    rows (`training_rows(rows)`: their bool mask)."""
    never = np.iinfo(np.int64).max
    first_user, first_item = np.full(num_users, never), np.full(num_items, never)
    counts = {name: np.zeros(encoder.size, np.int64) for name, encoder in self.codes.items()}
    listed = {s.name: {} for s in self.declared if s.kind == "multi_hot"}  # value -> rows
    width = {name: 1 for name in listed}
    sums = {s.name: np.zeros(3) for s in self.declared if s.kind == "numeric"}
    samples = {s.name: [] for s in self.declared if s.kind == "bucketized"}
    stride = max(1, -(-total_rows // _SAMPLE_ROWS))  # every stride-th input row is sampled
    for b in range(scratch.num_buckets):
      rows = scratch.read(b)
      if rows is None:
        continue
      train = training_rows(rows)
      if "ts" in rows:
        np.minimum.at(first_user, rows["user"][train], rows["ts"][train])
        np.minimum.at(first_item, rows["item"][train], rows["ts"][train])
      for name in counts:
        counts[name] += np.bincount(rows[column_name(name)][train], minlength=len(counts[name]))
      for spec in self.declared:
        if spec.kind == "multi_hot":
          tokens = _tokens(rows[column_name(spec.name)], spec.separator)
          width[spec.name] = max([width[spec.name]] + [len(t) for t in tokens])
          seen = listed[spec.name]
          for t in (t for t, kept in zip(tokens, train) if kept):
            for value in t:
              seen[value] = seen.get(value, 0) + 1
      for name, total_so_far in sums.items():
        value = rows[column_name(name)][train]
        value = value[np.isfinite(value)]
        total_so_far += (len(value), value.sum(), np.square(value).sum())
      for name, kept in samples.items():
        value = rows[column_name(name)][train]
        keep = np.isfinite(value) & (rows["row"][train] % stride == 0)
        kept.append(value[keep])
    self._first_user, self._first_item = first_user, first_item
    for name, count in counts.items():  # (the empty value is the missing one)
      raw = self.codes[name].raw_ids()
      kept = self._kept(dict(zip(raw[raw != ""].tolist(), count[raw != ""].tolist())), name)
      rank = {value: n + 1 for n, value in enumerate(kept)}
      self._index[name] = np.array([rank.get(value, 0) for value in raw.tolist()], np.int64)
      self._vocabulary[name] = kept
    for name, seen in listed.items():
      kept = self._kept(seen, name)
      self._tokens[name] = {v: n + 1 for n, v in enumerate(kept)}
      self._vocabulary[name], self._width[name] = kept, width[name]
    self._settle_numbers(sums, samples)

  def _kept(self, counts: Dict[str, int], name: str) -> List[str]:
    """A vocabulary: the values of at least --min_feature_count training rows, most frequent
    first, ties by value (index n + 1 is its n-th value; 0 is missing); on a base, the
    base's values first."""
    kept = [v for v, c in counts.items() if c >= self.config.min_feature_count]
    kept = sorted(kept, key=lambda v: (-counts[v], v))
    if self.base is None:
      return kept
    spec = next(s for s in self.declared if s.name == name)
    base = lineage.kept(self.base, schema.CONTEXT, name, spec.kind)
    kept, self.lineage_counts[name] = lineage.extend(base or [], kept)
    return kept

  def _settle_numbers(self, sums: Dict[str, np.ndarray], samples: Dict[str, list]) -> None:
    """Numeric features' moments and bucketized ones' edges, from the training rows' tallies."""
    for name, (n, total_sum, squares) in sums.items():
      mean = total_sum / n if n else 0.0
      std = float(np.sqrt(max(squares / n - mean * mean, 0.0))) if n else 1.0
      self._moments[name] = (float(mean), std if std > 0 else 1.0)
    for name, kept in samples.items():
      values = np.concatenate(kept) if kept else np.zeros(0)
      buckets = next(s.buckets for s in self.declared if s.name == name)
      self._edges[name] = tuple(float(e) for e in np.unique(np.quantile(
          values, np.linspace(0, 1, buckets + 1)[1:-1]))) if len(values) else ()
    for spec in self.declared:  # on a base, its statistics: a learnt row keeps its meaning
      kept = lineage.kept(self.base, schema.CONTEXT, spec.name, spec.kind)
      if kept and spec.kind == "numeric":
        self._moments[spec.name] = (kept["mean"], kept["std"])
      elif kept and spec.kind == "bucketized":
        self._edges[spec.name] = tuple(kept["edges"])

  def encode(self, rows: Dict[str, np.ndarray], train: np.ndarray) -> Dict[str, np.ndarray]:
    """{batch key: [n] int64 index (categorical, bucketized) or float32 (numeric)} of rows
    (provisional codes); `train` marks the training rows, whose missing values are counted."""
    out = {}
    for name in self.derived:
      first = None
      if name == "tenure":
        first = self._first_user[rows["user"]]
      elif name == "item_age":
        first = self._first_item[rows["item"]]
      out[name] = bucketize(derived_values(name, rows["ts"], first), self._edges[name])
    for spec in self.declared:
      value = rows[column_name(spec.name)]
      if spec.kind == "categorical":
        out[spec.name] = self._index[spec.name][value]
      elif spec.kind == "multi_hot":
        lookup = self._tokens[spec.name]
        array = np.zeros((len(value), self._width[spec.name]), np.int64)
        for row, tokens in enumerate(_tokens(value, spec.separator)):
          codes = sorted({lookup[t] for t in tokens if t in lookup})[:array.shape[1]]
          array[row, :len(codes)] = codes
        out[spec.name] = array
      elif spec.kind == "numeric":
        mean, std = self._moments[spec.name]
        out[spec.name] = np.where(np.isfinite(value), (value - mean) / std, 0.0).astype(
            np.float32)
      else:
        out[spec.name] = bucketize(value, self._edges[spec.name])
    for name, value in out.items():
      missing = (value == 0) if value.dtype == np.int64 else np.zeros(len(value), bool)
      if missing.ndim == 2:
        missing = missing.all(axis=1)
      self._missing[name] = self._missing.get(name, 0) + int(np.sum(missing & train))
    return {schema.context_key(name): value for name, value in out.items()}

  def infos(self) -> List[dict]:
    """The metadata entries, one per feature, in the order of the batch keys."""
    out = []
    for name in self.derived:
      out.append({"side": schema.CONTEXT, "name": name, "kind": "bucketized",
                  "vocab_size": len(self._edges[name]) + 2, "edges": list(self._edges[name]),
                  "derived": True, "missing": self._missing.get(name, 0)})
    for spec in self.declared:
      entry = {"side": schema.CONTEXT, "name": spec.name, "kind": spec.kind,
               "column": spec.column, "missing": self._missing.get(spec.name, 0)}
      if spec.kind in ("categorical", "multi_hot"):
        entry["vocab_size"] = len(self._vocabulary[spec.name]) + 1
        if spec.kind == "multi_hot":
          entry["width"], entry["separator"] = self._width[spec.name], spec.separator
      elif spec.kind == "numeric":
        entry["mean"], entry["std"] = self._moments[spec.name]
      else:
        entry["vocab_size"] = len(self._edges[spec.name]) + 2
        entry["edges"] = list(self._edges[spec.name])
      out.append(entry)
    return out

  def vocabularies(self) -> Dict[str, List[str]]:
    """{categorical or multi-hot feature: its values, line n being index n + 1}."""
    return dict(self._vocabulary)


def _tokens(values: np.ndarray, separator: str) -> List[List[str]]:
  """Each row's listed values (stripped, empty ones dropped)."""
  return [[t.strip() for t in str(v).split(separator) if t.strip()] for v in values]
