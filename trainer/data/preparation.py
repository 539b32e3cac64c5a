"""Turns an interaction log into a prepared data directory, streaming, in bounded memory.

The layout of a prepared directory is `trainer.schema`'s; the files are written by
`trainer.data.writer`, on scratch storage of `trainer.data.scratch`.

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

import dataclasses
import math
import os
import shutil
import tempfile
import time
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from trainer import fileio, schema
from trainer.config import ConfigError, PrepareConfig
from trainer.data import context, features, lineage, sources, splits, synthetic, writer
from trainer.data.scratch import (BUCKET_ROWS, IdEncoder, Progress, Scratch, frequency_order,
                                  prefetched)


# ----------------------------------------------------------------------------- small parts


# ----------------------------------------------------------------------------- the source


# ----------------------------------------------------------------------------- the passes


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


def _shards_for(config: PrepareConfig, rows: int) -> int:
  if config.target_shard_mb is None:
    return config.num_shards
  approx_bytes = rows * 12 + 64  # varint indices + float, per example, packed
  return max(1, math.ceil(approx_bytes / (config.target_shard_mb * 2**20)))


def make_source(config: PrepareConfig,
                context_specs: Sequence[features.FeatureSpec] = ()) -> sources.Source:
  """The configured source; errors name the flag and the value."""
  if config.source == "synthetic":
    return synthetic.SyntheticSource(config.num_users, config.num_items, config.num_ratings,
                                     config.rank, config.noise, config.seed, config.implicit,
                                     config.context_effect)
  if config.source == "movielens":
    return sources.movielens_source(config.input[0], config.skip_bad_rows, config.eval_input)
  if config.source == "tfds":
    return sources.TfdsSource(config.tfds_name, config.tfds_data_dir, config.tfds_manual_dir)
  columns = sources.Columns(config.user_column, config.item_column, config.rating_column,
                            config.timestamp_column)
  rating_range = (None if config.rating_min is None
                  else (config.rating_min, config.rating_max))
  return sources.DelimitedSource(config.input, columns, config.delimiter, config.header,
                                 rating_range, config.skip_bad_rows,
                                 eval_patterns=config.eval_input, context_specs=context_specs)


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
  fileio.check_gcs_access(config.output_dir, "output_dir", write=True)
  for pattern in config.input:
    fileio.check_gcs_access(pattern, "input", write=False)
  for pattern in config.eval_input:
    fileio.check_gcs_access(pattern, "eval_input", write=False)
  if config.base_data_dir:
    fileio.check_gcs_access(config.base_data_dir, "base_data_dir", write=False)
  try:
    declared = context.declared_specs(config)
    base = lineage.load(config.base_data_dir) if config.base_data_dir else None
    contexts = context.ContextStats(config, declared, base)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  source = make_source(config, declared)
  raw_features = features.read_features(config, source)  # before the log: a bad file fails at once
  splitter = splits.make_splitter(config, getattr(source, "first_eval_file", 0))
  if splitter.needs_timestamps and not source.has_timestamps:
    raise ConfigError(f"--split={config.split} needs timestamps, and the input has none "
                      "(--timestamp_column)")
  if config.context and not source.has_timestamps:
    raise ConfigError(f"--context={','.join(config.context)} is derived from timestamps, and "
                      "the input has none (--timestamp_column)")
  started = time.time()
  scratch_dir = tempfile.mkdtemp(prefix="neumf-prepare-")
  try:
    return _prepare(config, source, splitter, raw_features, contexts, scratch_dir, started,
                    base)
  finally:
    shutil.rmtree(scratch_dir, ignore_errors=True)


def _prepare(config: PrepareConfig, source: sources.Source, splitter: splits.Splitter,
             raw_features: List[features.RawFeatures], contexts: context.ContextStats,
             scratch_dir: str, started: float,
             base: Optional[lineage.Base] = None) -> schema.Metadata:
  """The passes, in order; everything lands in a temporary folder, published at the end."""
  formats = source.id_format or (None, None)
  ids = _Ids(IdEncoder(formats[0]), IdEncoder(formats[1]))
  scratch = Scratch(scratch_dir, _num_buckets(config, source))
  total = _pass_read(source, ids, scratch, started, contexts)
  splitter.begin(ids.users.size, total)
  stats = _pass_dedupe(scratch, config, source, ids, splitter, total)
  vocab = _dense_vocabulary(scratch, config, stats, ids, splitter, base)
  kept_rows = int(stats.user_count[vocab.kept_user].sum())
  stats.rows_filtered = int(stats.user_count[~vocab.kept_user].sum())
  if contexts:  # the training rows' statistics of the context
    contexts.fit(scratch, lambda rows: vocab.kept_user[rows["user"]] & ~splitter.held_out(rows),
                 ids.users.size, ids.items.size, total)
  fileio.makedirs(config.output_dir)
  tmp_dir = fileio.join(config.output_dir, f".tmp-prepare-{uuid.uuid4().hex}")
  fileio.makedirs(tmp_dir)
  written = _pass_write(scratch, config, splitter, vocab, kept_rows, tmp_dir, contexts)
  if written.num_train == 0 or written.num_eval == 0:
    raise ValueError(f"--split={config.split} leaves {written.num_train} training and "
                     f"{written.num_eval} evaluation rows of {kept_rows}; both need at least "
                     "one" + splitter.empty_message())
  names = written.shard_names + _write_side_files(scratch, config, vocab, written, tmp_dir)
  try:
    tables = [features.encode(raw, vocab.raw_users if raw.side == schema.USER
                              else vocab.raw_items, config.min_feature_count, base)
              for raw in raw_features]
  except ValueError as e:  # a feature of another kind than the base's
    raise ConfigError(str(e)) from None
  names += [writer.write_feature_table(table, tmp_dir, scratch.directory) for table in tables]
  names += [schema.feature_vocab_file(t.side, name) for t in tables for name in t.vocabularies]
  for name, values in contexts.vocabularies().items():
    names.append(schema.feature_vocab_file(schema.CONTEXT, name))
    fileio.write_lines(fileio.join(tmp_dir, names[-1]), values)
  metadata = _metadata(config, source, splitter, vocab, stats, written, tables,
                       contexts.infos() if contexts else [])
  metadata = _with_lineage(metadata, vocab, tables, contexts, base)
  fileio.write_text_atomic(fileio.join(tmp_dir, schema.METADATA_FILE), metadata.to_json())
  writer.publish(tmp_dir, config.output_dir, names)
  elapsed = time.time() - started
  logging.info("Prepared %d train and %d eval rows (%d users, %d items, split %s) in %s in "
               "%.1fs (%.0f rows/s)", written.num_train, written.num_eval, vocab.num_users,
               vocab.num_items, config.split, config.output_dir, elapsed,
               total / max(elapsed, 1e-9))
  logging.info("%s", accounts_line(metadata))
  if metadata.lineage:
    logging.info("On the base %s: %s", metadata.lineage["base_data_dir"], "; ".join(
        f"{name} {c['old']} kept + {c['new']} new ({c['absent']} of the kept absent here)"
        for name, c in metadata.lineage["vocabularies"].items()))
  return metadata


def accounts_line(metadata: schema.Metadata) -> str:
  """Where every row went, in one line: the invariant, with the skipped rows by reason."""
  reasons = ", ".join(f"{k} {v}" for k, v in metadata.bad_rows_by_reason.items())
  return (f"Rows: {metadata.rows_read} read = {metadata.num_train + metadata.num_eval} "
          f"prepared + {metadata.bad_rows_skipped} bad rows skipped"
          + (f" ({reasons})" if reasons else "")
          + f" + {metadata.duplicates_merged} duplicates merged + {metadata.rows_filtered} "
          f"of users under --min_user_interactions; {metadata.blank_lines} blank lines")


def _num_buckets(config: PrepareConfig, source: sources.Source) -> int:
  """Scratch buckets: enough that one holds about BUCKET_ROWS rows (unknown size: 16)."""
  if isinstance(source, synthetic.SyntheticSource):
    return max(1, math.ceil(config.num_ratings / BUCKET_ROWS))
  return 16


@dataclasses.dataclass
class _Ids:
  """Raw ID -> provisional code, for users and items."""

  users: IdEncoder
  items: IdEncoder


def _pass_read(source: sources.Source, ids: _Ids, scratch: Scratch, started: float,
               contexts: context.ContextStats) -> int:
  """Pass 1: stream the source, encode IDs, partition rows by (user, item) hash onto scratch.

  Returns:
    The rows read.
  """
  progress = Progress("read")
  total = 0
  for chunk in prefetched(source.chunks()):
    users, items = ids.users.encode(chunk.users), ids.items.encode(chunk.items)
    n = len(users)
    columns = {"user": users, "item": items, "rating": chunk.ratings,
               "row": np.arange(total, total + n, dtype=np.int64),
               "src": np.full(n, chunk.file_index, np.int32),
               "line": chunk.lines}
    if chunk.timestamps is not None:
      columns["ts"] = chunk.timestamps
    columns.update(contexts.scratch_columns(chunk.context))
    bucket = splits.hash_pairs(users, items, 1) % np.uint64(scratch.num_buckets)
    scratch.append(bucket.astype(np.int64), columns)
    total += n
    progress.add(n)
  bad = source.bad
  if total == 0:
    raise ValueError(f"{', '.join(source.files) or 'the input'}: no valid rows"
                     + (f" ({bad.count} bad rows skipped)" if bad and bad.count else ""))
  logging.info("Read %d rows from %s in %.1fs", total, ", ".join(source.files) or "the "
               "synthetic generator", time.time() - started)
  if bad is not None and bad.count:
    logging.warning("Skipped %d bad rows (--skip_bad_rows), for example:\n  %s", bad.count,
                    "\n  ".join(bad.examples))
  return total


@dataclasses.dataclass
class _Stats:
  """Vocabulary-sized counts gathered while deduping (indexed by provisional code)."""

  user_count: np.ndarray
  item_count: np.ndarray
  # The counts that order the vocabularies: the same, or (a splitter's `training_vocabulary`)
  # the training rows' only.
  vocab_user_count: np.ndarray
  vocab_item_count: np.ndarray
  duplicates: int = 0
  rows_filtered: int = 0  # rows of users under --min_user_interactions


def _pass_dedupe(scratch: Scratch, config: PrepareConfig, source: sources.Source, ids: _Ids,
                 splitter: splits.Splitter, total_rows: int) -> _Stats:
  """Pass 2: dedupe each bucket by --duplicates, count users and items, feed the splitter."""
  num_users, num_items = ids.users.size, ids.items.size
  stats = _Stats(np.zeros(num_users, np.int64), np.zeros(num_items, np.int64),
                 np.zeros(num_users, np.int64), np.zeros(num_items, np.int64))
  if not splitter.training_vocabulary:  # every row counts for the vocabularies: the same arrays
    stats.vocab_user_count, stats.vocab_item_count = stats.user_count, stats.item_count
  progress = Progress("dedupe", total_rows)
  for b in range(scratch.num_buckets):
    rows = scratch.read(b)
    if rows is None:
      continue
    n = len(rows["user"])
    rows, removed = _dedupe(rows, config.duplicates, source, ids.users, ids.items)
    stats.duplicates += removed
    stats.user_count += np.bincount(rows["user"], minlength=num_users)
    stats.item_count += np.bincount(rows["item"], minlength=num_items)
    if splitter.training_vocabulary:
      train = ~splitter.held_out(rows)
      stats.vocab_user_count += np.bincount(rows["user"][train], minlength=num_users)
      stats.vocab_item_count += np.bincount(rows["item"][train], minlength=num_items)
    splitter.observe(rows)
    if removed:
      scratch.replace(b, rows)
    progress.add(n)
  return stats


@dataclasses.dataclass
class _Vocabulary:
  """The users kept and the dense, frequency-ordered indices of users and items."""

  kept_user: np.ndarray  # [provisional users] bool: --min_user_interactions
  raw_users: np.ndarray  # [num_users] raw ID of dense index n
  raw_items: np.ndarray  # [num_items]
  user_index: np.ndarray  # [provisional users] -> dense index, -1 when dropped
  item_index: np.ndarray  # [provisional items] -> dense index, -1 when never kept
  # On a base: {users, items: {old, new, absent}} (`lineage.on_base`).
  lineage_counts: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)

  @property
  def num_users(self) -> int:
    return len(self.raw_users)

  @property
  def num_items(self) -> int:
    return len(self.raw_items)


def _dense_vocabulary(scratch: Scratch, config: PrepareConfig, stats: _Stats, ids: _Ids,
                      splitter: splits.Splitter,
                      base: Optional[lineage.Base] = None) -> _Vocabulary:
  """Pass 3 (only with --min_user_interactions: recount items over the users kept), then the
  dense indices: most frequent first, ties by raw ID. IDs without a row that counts for the
  vocabulary (`_Stats.vocab_*`) get none (index -1: out of vocabulary). On a base, its IDs
  keep their indices and the new ones follow, in that order among themselves."""
  kept_user = stats.user_count >= config.min_user_interactions
  if not kept_user.any():
    raise ValueError(f"--min_user_interactions={config.min_user_interactions} leaves no user "
                     f"(the most active has {int(stats.user_count.max())})")
  item_count = stats.vocab_item_count
  if not kept_user.all():
    item_count = np.zeros_like(item_count)
    for b in range(scratch.num_buckets):
      rows = scratch.read(b)
      if rows is not None:
        counted = kept_user[rows["user"]]
        if splitter.training_vocabulary:
          counted &= ~splitter.held_out(rows)
        item_count += np.bincount(rows["item"][counted], minlength=len(item_count))
  raw_users, raw_items = ids.users.raw_ids(), ids.items.raw_ids()
  user_order = frequency_order(np.where(kept_user, stats.vocab_user_count, 0), raw_users)
  item_order = frequency_order(item_count, raw_items)
  if base is not None:
    dense_users, user_index, user_counts = lineage.on_base(base.users, user_order, raw_users)
    dense_items, item_index, item_counts = lineage.on_base(base.items, item_order, raw_items)
    return _Vocabulary(kept_user, dense_users, dense_items, user_index, item_index,
                       {lineage.USERS: user_counts, lineage.ITEMS: item_counts})
  user_index = np.full(len(raw_users), -1, np.int64)
  user_index[user_order] = np.arange(len(user_order))
  item_index = np.full(len(raw_items), -1, np.int64)
  item_index[item_order] = np.arange(len(item_order))
  return _Vocabulary(kept_user, raw_users[user_order], raw_items[item_order], user_index,
                     item_index)


def _with_lineage(metadata: schema.Metadata, vocab: _Vocabulary,
                  tables: Sequence[features.EncodedFeatures], contexts: context.ContextStats,
                  base: Optional[lineage.Base]) -> schema.Metadata:
  """The metadata with its vocabulary fingerprint and (on a base) its lineage."""
  vocabularies = {lineage.vocabulary_name(t.side, name): values
                  for t in tables for name, values in t.vocabularies.items()}
  vocabularies.update({lineage.vocabulary_name(schema.CONTEXT, name): values
                       for name, values in contexts.vocabularies().items()})
  fingerprint = lineage.fingerprint(vocab.raw_users.tolist(), vocab.raw_items.tolist(),
                                    metadata.features, vocabularies)
  if base is None:
    return dataclasses.replace(metadata, vocabulary_fingerprint=fingerprint)
  counts = dict(vocab.lineage_counts)
  for t in tables:
    counts.update({lineage.vocabulary_name(t.side, name): c
                   for name, c in t.lineage_counts.items()})
  counts.update({lineage.vocabulary_name(schema.CONTEXT, name): c
                 for name, c in contexts.lineage_counts.items()})
  return dataclasses.replace(metadata, vocabulary_fingerprint=fingerprint,
                             lineage=lineage.lineage(base, counts))


@dataclasses.dataclass
class _Written:
  """What the write pass produced and measured."""

  num_train: int
  num_eval: int
  shard_names: List[str]
  train_shard_rows: List[int]
  histogram: Dict[float, int]
  train_user_count: np.ndarray  # [num_users]
  train_user_rating_sum: np.ndarray  # [num_users] float64: for the user-mean baseline
  train_item_count: np.ndarray  # [num_items]
  eval_user_seen: np.ndarray  # [num_users] bool: the user has an eval row
  eval_item_seen: np.ndarray  # [num_items] bool
  train_rating_sum: float
  rating_min: float
  rating_max: float
  # [n, 2] (user, item) dense indices of each bucket's eval rows; kept for --eval_negatives only
  # (leave-one-out: one row per user), never for a fraction of a large log.
  eval_pairs: Optional[List[np.ndarray]]
  eval_rows_out_of_vocabulary: int = 0
  # With eval_pairs: each pair's context ({key: [n]} per bucket), for the sampled protocol.
  eval_context: List[Dict[str, np.ndarray]] = dataclasses.field(default_factory=list)
  # Provisional codes of the eval rows' out-of-vocabulary users and items (--split=given).
  unseen_users: set = dataclasses.field(default_factory=set)
  unseen_items: set = dataclasses.field(default_factory=set)


def _pass_write(scratch: Scratch, config: PrepareConfig, splitter: splits.Splitter,
                vocab: _Vocabulary, kept_rows: int, tmp_dir: str,
                contexts: context.ContextStats) -> _Written:
  """Pass 4: map codes to dense indices, split, shuffle each bucket, deal blocks to shards;
  leave each bucket's training pairs on scratch for the positives file."""
  num_shards = _shards_for(config, kept_rows)
  expected_eval = splitter.expected_eval(vocab.kept_user, kept_rows)
  writers = {schema.TRAIN: writer.BlockWriter(tmp_dir, schema.TRAIN, num_shards,
                                        kept_rows - expected_eval),
             schema.EVAL: writer.BlockWriter(tmp_dir, schema.EVAL, num_shards, expected_eval)}
  out = _Written(0, 0, [], [], {}, np.zeros(vocab.num_users, np.int64),
                 np.zeros(vocab.num_users, np.float64), np.zeros(vocab.num_items, np.int64),
                 np.zeros(vocab.num_users, bool),
                 np.zeros(vocab.num_items, bool), 0.0, np.inf, -np.inf,
                 [] if config.eval_negatives else None)
  progress = Progress("write", kept_rows)
  for b in range(scratch.num_buckets):
    rows = scratch.read(b)
    if rows is None:
      continue
    keep = vocab.kept_user[rows["user"]]
    rows = {k: v[keep] for k, v in rows.items()}
    held_out = splitter.held_out(rows)
    users, items = vocab.user_index[rows["user"]], vocab.item_index[rows["item"]]
    # (--split=given) eval IDs never seen in training: the out-of-vocabulary rows.
    out.unseen_users.update(np.unique(rows["user"][users < 0]).tolist())
    out.unseen_items.update(np.unique(rows["item"][items < 0]).tolist())
    users = np.where(users < 0, vocab.num_users, users)
    items = np.where(items < 0, vocab.num_items, items)
    rng = np.random.default_rng([config.seed, 4, b])
    encoded = contexts.encode(rows, ~held_out) if contexts else {}
    for split, mask in ((schema.TRAIN, ~held_out), (schema.EVAL, held_out)):
      idx = rng.permutation(np.flatnonzero(mask))
      writers[split].add(users[idx], items[idx], rows["rating"][idx],
                         {k: v[idx] for k, v in encoded.items()})
    # (user, item, time, input row) of the training pairs: time is the timestamp, or the
    # input row when the source has none.
    train = ~held_out
    np.save(os.path.join(scratch.directory, f"train-pairs-{b}.npy"),
            np.stack([users[train], items[train], rows.get("ts", rows["row"])[train],
                      rows["row"][train]]).astype(np.int64))
    _tally(out, users, items, rows["rating"], held_out)
    if out.eval_pairs is not None and encoded:
      out.eval_context.append({k: v[held_out] for k, v in encoded.items()})
    progress.add(len(users))
    # Release this bucket before the next one is read: peak memory is one bucket, not two.
    rows = keep = users = items = held_out = idx = mask = train = encoded = None
  for w in writers.values():
    w.close()
  out.num_train, out.num_eval = writers[schema.TRAIN].rows, writers[schema.EVAL].rows
  out.shard_names = [os.path.basename(p) for w in writers.values() for p in w.paths]
  out.train_shard_rows = list(writers[schema.TRAIN].shard_rows)
  return out


def _tally(out: _Written, users: np.ndarray, items: np.ndarray, ratings: np.ndarray,
           held_out: np.ndarray) -> None:
  """Adds one bucket's rows to the write pass's counts, masks and rating statistics."""
  train = ~held_out
  # Eval rows whose user or item has no index of its own (--split=given): counted, and left
  # out of the per-ID masks.
  known = (users < len(out.eval_user_seen)) & (items < len(out.eval_item_seen))
  out.eval_rows_out_of_vocabulary += int(np.sum(held_out & ~known))
  out.train_user_count += np.bincount(users[train], minlength=len(out.train_user_count))
  out.train_user_rating_sum += np.bincount(users[train], weights=ratings[train],
                                           minlength=len(out.train_user_count))
  out.train_item_count += np.bincount(items[train], minlength=len(out.train_item_count))
  out.eval_user_seen[users[held_out & (users < len(out.eval_user_seen))]] = True
  out.eval_item_seen[items[held_out & (items < len(out.eval_item_seen))]] = True
  if out.eval_pairs is not None:
    out.eval_pairs.append(np.stack([users[held_out], items[held_out]], axis=1))
  out.train_rating_sum += float(ratings[train].sum(dtype=np.float64))
  values, counts = np.unique(ratings, return_counts=True)
  for v, c in zip(values.tolist(), counts.tolist()):
    out.histogram[v] = out.histogram.get(v, 0) + c
  if len(ratings):
    out.rating_min = min(out.rating_min, float(ratings.min()))
    out.rating_max = max(out.rating_max, float(ratings.max()))


def _write_side_files(scratch: Scratch, config: PrepareConfig, vocab: _Vocabulary,
                      written: _Written, tmp_dir: str) -> List[str]:
  """The vocabularies, the training positives and (with --eval_negatives) the sampled eval
  negatives; returns their file names."""
  indptr, indices, ranks = writer.train_positives(scratch, scratch.num_buckets,
                                            written.train_user_count, vocab.num_items)
  writer.write_npz(fileio.join(tmp_dir, schema.TRAIN_POSITIVES_FILE), scratch.directory,
             indptr=indptr, indices=indices, time_rank=ranks,
             rating_sum=written.train_user_rating_sum)
  fileio.write_lines(fileio.join(tmp_dir, schema.USER_VOCAB_FILE), vocab.raw_users.tolist())
  fileio.write_lines(fileio.join(tmp_dir, schema.ITEM_VOCAB_FILE), vocab.raw_items.tolist())
  names = [schema.USER_VOCAB_FILE, schema.ITEM_VOCAB_FILE, schema.TRAIN_POSITIVES_FILE]
  if config.eval_negatives:
    pairs = np.concatenate(written.eval_pairs)
    order = np.argsort(pairs[:, 0], kind="stable")
    pairs = pairs[order]
    # Each eval row's context, in the same order (the sampled protocol scores in it).
    eval_context = {k: np.concatenate([c[k] for c in written.eval_context])[order]
                    for k in (written.eval_context[0] if written.eval_context else {})}
    negatives = writer.sample_negatives(indptr, indices, pairs[:, 0], pairs[:, 1], vocab.num_items,
                                  config.eval_negatives, config.seed, vocab.raw_users)
    writer.write_npz(fileio.join(tmp_dir, schema.EVAL_NEGATIVES_FILE), scratch.directory,
               users=pairs[:, 0], positives=pairs[:, 1], negatives=negatives, **eval_context)
    names.append(schema.EVAL_NEGATIVES_FILE)
  return names


def _metadata(config: PrepareConfig, source: sources.Source, splitter: splits.Splitter,
              vocab: _Vocabulary, stats: _Stats, written: _Written,
              tables: Sequence[features.EncodedFeatures] = (),
              context_infos: Sequence[dict] = ()) -> schema.Metadata:
  """The metadata of the prepared directory (written last, marking it complete)."""
  bad = source.bad
  feature_files = {t.side: {"path": t.path,
                            "rows_without_entity": t.rows_without_entity,
                            "entities_without_row": t.entities_without_row,
                            "bad_rows_skipped": sum(t.bad_rows_by_reason.values()),
                            "bad_rows_by_reason": dict(sorted(t.bad_rows_by_reason.items()))}
                   for t in tables}
  accounts = _accounts(source, stats, written)
  return schema.Metadata(
      num_users=vocab.num_users, num_items=vocab.num_items, num_train=written.num_train,
      num_eval=written.num_eval, rating_min=float(written.rating_min),
      rating_max=float(written.rating_max),
      train_rating_mean=written.train_rating_sum / written.num_train,
      num_shards=len(written.train_shard_rows), source=config.source, split=config.split,
      seed=config.seed, inputs=list(source.files),
      eval_users_unseen_in_train=int(np.sum(written.eval_user_seen
                                            & (written.train_user_count == 0))
                                     + len(written.unseen_users)),
      eval_items_unseen_in_train=int(np.sum(written.eval_item_seen
                                            & (written.train_item_count == 0))
                                     + len(written.unseen_items)),
      eval_rows_out_of_vocabulary=written.eval_rows_out_of_vocabulary,
      implicit=not source.has_ratings, min_user_interactions=config.min_user_interactions,
      eval_negatives=config.eval_negatives, duplicates_policy=config.duplicates,
      duplicates_merged=stats.duplicates, rows_read=accounts["rows_read"],
      bad_rows_skipped=accounts["bad_rows_skipped"],
      bad_rows_by_reason=dict(sorted(bad.by_reason.items())) if bad is not None else {},
      blank_lines=source.blank_lines, rows_filtered=accounts["rows_filtered"],
      users_filtered=int((~vocab.kept_user & (stats.user_count > 0)).sum()),
      density=(written.num_train + written.num_eval) / float(vocab.num_users * vocab.num_items),
      rating_histogram=writer.histogram(written.histogram), input_fingerprint=source.fingerprint(),
      train_shard_examples=written.train_shard_rows,
      features=[info for t in tables for info in t.info] + list(context_infos),
      feature_files=feature_files,
      **splitter.metadata_fields())


def _accounts(source: sources.Source, stats: "_Stats", written: "_Written") -> Dict[str, int]:
  """Where every row read went: rows read = prepared (train + eval) + bad rows skipped +
  duplicates merged + rows of users under --min_user_interactions.

  Raises:
    RuntimeError: the counts do not add up (a bug: no row may vanish without a count).
  """
  bad = source.bad.count if source.bad is not None else 0
  out = {"rows_read": source.rows_read, "prepared": written.num_train + written.num_eval,
         "bad_rows_skipped": bad, "duplicates_merged": stats.duplicates,
         "rows_filtered": stats.rows_filtered}
  if out["rows_read"] != sum(v for k, v in out.items() if k != "rows_read"):
    raise RuntimeError(f"preparation lost rows: {out}")
  return out


