"""Turns a rating log into a prepared data directory: vocabularies, TFRecord shards, metadata.

Layout of a prepared directory:

  users.vocab, items.vocab       raw IDs, one per line; line n is dense index n (most frequent
                                 first, ties by ID)
  train-SSSSS-of-NNNNN.tfrecord  training examples in blocks (see `trainer.schema`)
  eval-SSSSS-of-NNNNN.tfrecord   held-out examples
  metadata.json                  counts, rating range, split parameters; written last

Everything is written to a temporary folder first and published at the end, so an interrupted
run never leaves a directory that looks complete.
"""

import time
import uuid
from typing import Dict, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import fileio, schema
from trainer.config import ConfigError, PrepareConfig
from trainer.data import sources


def build_vocab(ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Builds a frequency-ordered vocabulary of raw IDs.

  Args:
    ids: raw IDs (strings), shape [n].

  Returns:
    (vocab, index): vocab[k] is the k-th most frequent ID (ties broken by the ID's string order);
    index[j] is the dense index of ids[j].
  """
  uniq, inverse, counts = np.unique(ids.astype(str), return_inverse=True, return_counts=True)
  order = np.argsort(-counts, kind="stable")  # uniq is sorted, so ties stay in ID order
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  return uniq[order], rank[inverse.reshape(-1)].astype(np.int64)


def random_split(n: int, eval_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
  """Splits row numbers 0..n-1 at random into (train, eval), both sorted and non-empty."""
  num_eval = int(round(n * eval_fraction))
  if n < 2 or not 1 <= num_eval < n:
    raise ValueError(f"--eval_fraction={eval_fraction} of {n} ratings leaves {num_eval} for "
                     f"evaluation and {n - num_eval} for training; both need at least one")
  perm = np.random.default_rng([seed, 1]).permutation(n)
  return np.sort(perm[num_eval:]), np.sort(perm[:num_eval])


def write_shards(directory: str, split: str, users: np.ndarray, items: np.ndarray,
                 ratings: np.ndarray, num_shards: int, seed: int) -> Sequence[str]:
  """Writes one split as shuffled blocks, dealt round-robin over `num_shards` files.

  Returns:
    The shard paths written.
  """
  order = np.random.default_rng([seed, 2, schema.SPLITS.index(split)]).permutation(len(users))
  users, items, ratings = users[order], items[order], ratings[order]
  paths = [fileio.join(directory, schema.shard_file_name(split, s, num_shards))
           for s in range(num_shards)]
  # Smaller blocks for a small split, so that every shard gets examples.
  block_size = max(1, min(schema.BLOCK_SIZE, -(-len(users) // num_shards)))
  writers = [tf.io.TFRecordWriter(p) for p in paths]
  try:
    for block, start in enumerate(range(0, len(users), block_size)):
      end = start + block_size
      writers[block % num_shards].write(
          schema.encode_block(users[start:end], items[start:end], ratings[start:end]))
  finally:
    for w in writers:
      w.close()
  return paths


def _load(config: PrepareConfig) -> sources.Ratings:
  if config.source == "synthetic":
    return sources.generate_synthetic(config.num_users, config.num_items, config.num_ratings,
                                      config.rank, config.noise, config.seed)
  return sources.read_movielens(config.input)


def _publish(tmp_dir: str, output_dir: str, names: Sequence[str]) -> None:
  """Moves the files of a finished preparation into place, metadata last."""
  metadata_path = fileio.join(output_dir, schema.METADATA_FILE)
  if tf.io.gfile.exists(metadata_path):
    tf.io.gfile.remove(metadata_path)  # the old output stops looking complete first
  for split in schema.SPLITS:  # shards of an earlier run would match the same globs
    for stale in tf.io.gfile.glob(fileio.join(output_dir, schema.shard_pattern(split))):
      tf.io.gfile.remove(stale)
  for name in names:
    tf.io.gfile.rename(fileio.join(tmp_dir, name), fileio.join(output_dir, name), overwrite=True)
  tf.io.gfile.rename(fileio.join(tmp_dir, schema.METADATA_FILE), metadata_path, overwrite=True)
  tf.io.gfile.rmtree(tmp_dir)


def prepare(config: PrepareConfig) -> schema.Metadata:
  """Reads or generates the ratings, splits them and writes a prepared data directory.

  Args:
    config: a validated `PrepareConfig`.

  Returns:
    The metadata written to `<output_dir>/metadata.json`.

  Raises:
    ValueError: for bad input, naming the file, line or flag and the offending value.
  """
  config.validate()
  started = time.time()
  log = _load(config)
  logging.info("Read %d ratings from %s in %.1fs", len(log),
               config.input or "the synthetic generator", time.time() - started)
  user_vocab, user_index = build_vocab(log.users)
  item_vocab, item_index = build_vocab(log.items)
  train_rows, eval_rows = random_split(len(log), config.eval_fraction, config.seed)

  fileio.makedirs(config.output_dir)
  tmp_dir = fileio.join(config.output_dir, f".tmp-prepare-{uuid.uuid4().hex}")
  fileio.makedirs(tmp_dir)
  names = [schema.USER_VOCAB_FILE, schema.ITEM_VOCAB_FILE]
  fileio.write_lines(fileio.join(tmp_dir, schema.USER_VOCAB_FILE), list(user_vocab))
  fileio.write_lines(fileio.join(tmp_dir, schema.ITEM_VOCAB_FILE), list(item_vocab))
  for split, rows in ((schema.TRAIN, train_rows), (schema.EVAL, eval_rows)):
    paths = write_shards(tmp_dir, split, user_index[rows], item_index[rows], log.ratings[rows],
                         config.num_shards, config.seed)
    names += [p.rsplit("/", 1)[-1] for p in paths]

  train_ratings = log.ratings[train_rows]
  unseen: Dict[str, int] = {}
  for name, index in (("users", user_index), ("items", item_index)):
    unseen[name] = int(np.setdiff1d(index[eval_rows], index[train_rows]).size)
  metadata = schema.Metadata(
      num_users=len(user_vocab), num_items=len(item_vocab),
      num_train=len(train_rows), num_eval=len(eval_rows),
      rating_min=float(log.ratings.min()), rating_max=float(log.ratings.max()),
      train_rating_mean=float(train_ratings.mean(dtype=np.float64)),
      num_shards=config.num_shards, source=config.source, split=config.split,
      eval_fraction=config.eval_fraction, seed=config.seed,
      inputs=[config.input] if config.input else [],
      eval_users_unseen_in_train=unseen["users"], eval_items_unseen_in_train=unseen["items"])
  fileio.write_text_atomic(fileio.join(tmp_dir, schema.METADATA_FILE), metadata.to_json())
  _publish(tmp_dir, config.output_dir, names)
  elapsed = time.time() - started
  logging.info("Prepared %d train and %d eval ratings (%d users, %d items) in %s in %.1fs "
               "(%.0f rows/s)", metadata.num_train, metadata.num_eval, metadata.num_users,
               metadata.num_items, config.output_dir, elapsed, len(log) / max(elapsed, 1e-9))
  return metadata


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
