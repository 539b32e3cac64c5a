"""Tests of data preparation: vocabularies, splits, duplicates, negatives, publishing, scale."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, run_cli
from trainer import schema
from trainer.config import ConfigError, PrepareConfig
from trainer.data import artifacts, preparation, scratch
from trainer.data.records import parse_blocks


def test_vocab_is_frequency_ordered_with_ties_by_id():
  raw = np.array(["b", "a", "c", "d", "e"])
  counts = np.array([2, 1, 3, 1, 0])  # e never occurs
  # c 3, b 2, then a before d (ties by ID); e is left out.
  assert raw[scratch.frequency_order(counts, raw)].tolist() == ["c", "b", "a", "d"]


def _read_split(data_dir, split):
  files = sorted(tf.io.gfile.glob(os.path.join(data_dir, schema.shard_pattern(split))))
  records = [r for f in files for r in tf.data.TFRecordDataset(f).as_numpy_iterator()]
  if not records:
    return {k: np.zeros(0) for k in (schema.USER, schema.ITEM, schema.RATING)}, files
  parsed = parse_blocks(tf.constant(records))
  return {k: v.numpy() for k, v in parsed.items()}, files


def _vocab(out, name):
  return open(os.path.join(out, name)).read().split("\n")[:-1]


def _raw_rows(out, split):
  users, items = _vocab(out, schema.USER_VOCAB_FILE), _vocab(out, schema.ITEM_VOCAB_FILE)
  data, _ = _read_split(out, split)
  return sorted((users[u], items[i], float(r)) for u, i, r in
                zip(data[schema.USER], data[schema.ITEM], data[schema.RATING]))


def _log(tmp_path, rows, name="log.csv"):
  """Writes user,item,rating,ts rows as a CSV with a header; returns its path."""
  path = tmp_path / name
  path.write_text("user,item,rating,ts\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
  return str(path)


def _csv(tmp_path, rows, **kw):
  args = dict(output_dir=str(tmp_path / "out"), source="csv", input=(_log(tmp_path, rows),),
              user_column="user", item_column="item", rating_column="rating",
              timestamp_column="ts", num_shards=2, seed=1)
  args.update(kw)
  return args["output_dir"], preparation.prepare(PrepareConfig(**args))


# A hand-made log: (user, item, rating, timestamp).
_LOG = [("a", "i1", 4, 10), ("a", "i2", 5, 30), ("a", "i3", 3, 20),
        ("b", "i1", 2, 5), ("b", "i4", 4, 5),   # tie at 5: the later row (i4) is held out
        ("c", "i5", 1, 1),                      # one interaction: training only
        ("d", "i3", 3, 7), ("d", "i1", 5, 9), ("d", "i2", 4, 9)]  # tie at 9: i2


def test_leave_one_out_holds_out_each_users_latest_by_hand(tmp_path):
  out, metadata = _csv(tmp_path, _LOG, split="leave_one_out", eval_negatives=1)
  assert _raw_rows(out, schema.EVAL) == [("a", "i2", 5.0), ("b", "i4", 4.0), ("d", "i2", 4.0)]
  assert len(_raw_rows(out, schema.TRAIN)) == 6
  assert (metadata.num_train, metadata.num_eval, metadata.split) == (6, 3, "leave_one_out")
  users, items = _vocab(out, schema.USER_VOCAB_FILE), _vocab(out, schema.ITEM_VOCAB_FILE)
  # Vocabularies by frequency, ties by ID: users a, d (3), b (2), c (1); items i1 (3),
  # i2, i3 (2), i4, i5 (1).
  assert users == ["a", "d", "b", "c"] and items == ["i1", "i2", "i3", "i4", "i5"]
  positives = artifacts.load_npz(os.path.join(out, schema.TRAIN_POSITIVES_FILE))
  train = {users[u]: sorted(items[i] for i in positives["indices"][
      positives["indptr"][u]:positives["indptr"][u + 1]]) for u in range(4)}
  assert train == {"a": ["i1", "i3"], "d": ["i1", "i3"], "b": ["i1"], "c": ["i5"]}
  negatives = artifacts.load_npz(os.path.join(out, schema.EVAL_NEGATIVES_FILE))
  by_user = {users[u]: (items[p], {items[n] for n in ns}) for u, p, ns in
             zip(negatives["users"], negatives["positives"], negatives["negatives"])}
  assert set(by_user) == {"a", "b", "d"}
  assert by_user["a"][0] == "i2" and by_user["a"][1] <= {"i4", "i5"}
  assert by_user["b"][0] == "i4" and by_user["b"][1] <= {"i2", "i3", "i5"}
  assert by_user["d"][1] <= {"i4", "i5"}


def _time_ordered(out):
  """{raw user: their training items, raw IDs, in the order `time_rank` gives}."""
  users, items = _vocab(out, schema.USER_VOCAB_FILE), _vocab(out, schema.ITEM_VOCAB_FILE)
  positives = artifacts.load_npz(os.path.join(out, schema.TRAIN_POSITIVES_FILE))
  indptr = positives["indptr"]
  ordered = {}
  for u, user in enumerate(users):
    span = slice(indptr[u], indptr[u + 1])
    sequence = [None] * (indptr[u + 1] - indptr[u])
    for item, rank in zip(positives["indices"][span], positives["time_rank"][span]):
      sequence[rank] = items[item]
    ordered[user] = sequence
  return ordered


def test_training_positives_carry_each_users_time_order(tmp_path):
  """`time_rank`: by timestamp, ties by input row; without timestamps, the input order."""
  log = _LOG + [("e", "i2", 3, 4), ("e", "i1", 3, 4), ("e", "i4", 3, 2), ("e", "i5", 1, 8)]
  out, _ = _csv(tmp_path, log, split="leave_one_out")
  assert _time_ordered(out) == {"a": ["i1", "i3"], "d": ["i3", "i1"], "b": ["i1"],
                                "c": ["i5"], "e": ["i4", "i2", "i1"]}
  out, _ = _csv(tmp_path, log, output_dir=str(tmp_path / "untimed"), timestamp_column=None,
                eval_fraction=0.3)
  ordered = _time_ordered(out)
  assert sum(map(len, ordered.values())) > 5
  for user, sequence in ordered.items():
    assert sequence == [i for u, i, _, _ in log if u == user and i in sequence], user


def test_eval_negatives_never_hold_a_positive_and_are_fixed_by_seed(tmp_path):
  config = PrepareConfig(output_dir=str(tmp_path / "a"), num_users=80, num_items=60,
                         num_ratings=1500, split="leave_one_out", eval_negatives=20, seed=4)
  preparation.prepare(config)
  preparation.prepare(dataclasses.replace(config, output_dir=str(tmp_path / "b")))
  a = artifacts.load_npz(str(tmp_path / "a" / schema.EVAL_NEGATIVES_FILE))
  b = artifacts.load_npz(str(tmp_path / "b" / schema.EVAL_NEGATIVES_FILE))
  assert all(np.array_equal(a[k], b[k]) for k in a)
  positives = artifacts.load_npz(str(tmp_path / "a" / schema.TRAIN_POSITIVES_FILE))
  assert a["negatives"].shape == (len(a["users"]), 20)
  for u, p, ns in zip(a["users"], a["positives"], a["negatives"]):
    seen = set(positives["indices"][positives["indptr"][u]:positives["indptr"][u + 1]]) | {p}
    assert len(set(ns)) == 20 and not seen & set(ns.tolist())


def test_too_many_negatives_for_a_user_is_named(tmp_path):
  with pytest.raises(ValueError, match=r"--eval_negatives=3: user 'a' has interacted with all "
                     r"but 2 of the 5 items"):
    _csv(tmp_path, _LOG, split="leave_one_out", eval_negatives=3)


def test_random_split_holds_out_about_the_fraction_and_partitions(tmp_path):
  out = str(tmp_path / "out")
  metadata = preparation.prepare(PrepareConfig(output_dir=out, num_users=400, num_items=300,
                                               num_ratings=20000, eval_fraction=0.2, seed=2))
  assert metadata.num_train + metadata.num_eval == 20000
  assert abs(metadata.num_eval / 20000 - 0.2) < 0.02
  train, evaluation = _raw_rows(out, schema.TRAIN), _raw_rows(out, schema.EVAL)
  pairs = {(u, i) for u, i, _ in train} | {(u, i) for u, i, _ in evaluation}
  assert len(pairs) == 20000
  assert metadata.density == pytest.approx(20000 / (metadata.num_users * metadata.num_items))
  assert sum(metadata.rating_histogram.values()) == 20000


def test_temporal_split_at_a_cutoff_and_by_fraction(tmp_path):
  rows = [(f"u{k % 7}", f"i{k}", 3, 100 + k) for k in range(40)]
  out, metadata = _csv(tmp_path, rows, split="temporal", temporal_cutoff=130)
  assert sorted(int(i[1:]) for _, i, _ in _raw_rows(out, schema.EVAL)) == list(range(30, 40))
  assert metadata.temporal_cutoff == 130
  out, metadata = _csv(tmp_path, rows, split="temporal", eval_fraction=0.25,
                       output_dir=str(tmp_path / "frac"))
  assert metadata.temporal_cutoff == 130  # the latest quarter of 40 distinct timestamps
  assert metadata.num_eval == 10


def test_eval_users_and_items_unseen_in_training_are_counted(tmp_path):
  # After the cutoff at 10: u3 and item i9 appear only in the eval split (u3 twice).
  rows = [("u1", "i1", 3, 1), ("u2", "i2", 3, 2), ("u1", "i2", 3, 3), ("u2", "i1", 3, 4),
          ("u2", "i3", 3, 5), ("u1", "i9", 3, 11), ("u3", "i1", 3, 12), ("u3", "i2", 3, 13)]
  _, metadata = _csv(tmp_path, rows, split="temporal", temporal_cutoff=10)
  assert metadata.num_eval == 3
  assert metadata.eval_users_unseen_in_train == 1  # u3
  assert metadata.eval_items_unseen_in_train == 1  # i9


def test_min_user_interactions_drops_users_and_their_orphan_items(tmp_path):
  out, metadata = _csv(tmp_path, _LOG, min_user_interactions=3, split="leave_one_out")
  assert _vocab(out, schema.USER_VOCAB_FILE) == ["a", "d"]
  assert _vocab(out, schema.ITEM_VOCAB_FILE) == ["i1", "i2", "i3"]  # i4 (b), i5 (c) are gone
  assert metadata.users_filtered == 2 and metadata.num_train + metadata.num_eval == 6


@pytest.mark.parametrize("policy,expected", [("keep_latest", 2.0), ("mean", 3.0)])
def test_duplicate_pairs_are_merged_by_policy(tmp_path, policy, expected):
  rows = [("a", "x", 4, 1), ("b", "x", 1, 3), ("a", "x", 2, 9), ("a", "y", 5, 4)]
  out, metadata = _csv(tmp_path, rows, duplicates=policy, split="temporal", temporal_cutoff=4)
  merged = {(u, i): r for u, i, r in _raw_rows(out, schema.TRAIN) + _raw_rows(out, schema.EVAL)}
  assert merged[("a", "x")] == expected and len(merged) == 3
  assert metadata.duplicates_merged == 1 and metadata.duplicates_policy == policy


def test_duplicate_pairs_are_an_error_by_default_naming_both_lines(tmp_path):
  rows = [("a", "x", 4, 1), ("b", "x", 1, 3), ("a", "x", 2, 9)]
  with pytest.raises(ValueError, match=r"log\.csv:4: duplicate \(user, item\) pair \('a', 'x'\), "
                     r"first at .*log\.csv:2 \(--duplicates=error"):
    _csv(tmp_path, rows)


def test_implicit_csv_without_ratings(tmp_path):
  path = tmp_path / "clicks.tsv"
  path.write_text("".join(f"u{k % 5}\tp{k % 11}\n" for k in range(40)))
  out = str(tmp_path / "out")
  metadata = preparation.prepare(PrepareConfig(
      output_dir=out, source="csv", input=(str(path),), user_column="0", item_column="1",
      delimiter="\t", header=False, duplicates="keep_latest", eval_fraction=0.2))
  assert metadata.implicit and metadata.rating_histogram == {"1": metadata.num_train +
                                                             metadata.num_eval}
  assert metadata.num_train + metadata.num_eval == 40 - metadata.duplicates_merged


def test_skipped_bad_rows_are_counted_in_the_metadata(tmp_path):
  src = tmp_path / "u.data"
  src.write_text("1\t1\t3\t5\n1\t2\tbad\t5\n2\t1\t4\t5\n2\t2\t9\t5\n3\t3\t3\t3\n")
  metadata = preparation.prepare(PrepareConfig(
      output_dir=str(tmp_path / "out"), source="movielens", input=(str(src),),
      skip_bad_rows=True, eval_fraction=0.3))
  assert metadata.bad_rows_skipped == 2 and metadata.rows_read == 5
  assert metadata.bad_rows_by_reason == {"number_range": 1, "number_syntax": 1}
  assert metadata.num_train + metadata.num_eval == 3


def _digest(directory):
  h = hashlib.sha256()
  for name in sorted(os.listdir(directory)):
    h.update(name.encode())
    h.update(open(os.path.join(directory, name), "rb").read())
  return h.hexdigest()


def test_same_input_and_seed_give_identical_bytes(tmp_path):
  config = PrepareConfig(output_dir=str(tmp_path / "a"), num_users=80, num_items=60,
                         num_ratings=1500, num_shards=3, seed=9, split="leave_one_out",
                         eval_negatives=5)
  preparation.prepare(config)
  preparation.prepare(dataclasses.replace(config, output_dir=str(tmp_path / "b")))
  preparation.prepare(dataclasses.replace(config, output_dir=str(tmp_path / "c"), seed=10))
  assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
  assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_small_splits_still_fill_every_shard(tmp_path):
  out = str(tmp_path / "out")
  preparation.prepare(PrepareConfig(output_dir=out, num_users=50, num_items=40, num_ratings=900,
                                    num_shards=4, eval_fraction=0.1))
  for split in schema.SPLITS:
    for path in tf.io.gfile.glob(os.path.join(out, schema.shard_pattern(split))):
      assert os.path.getsize(path) > 0, path


def test_target_shard_size_sets_the_shard_count(tmp_path):
  metadata = preparation.prepare(PrepareConfig(
      output_dir=str(tmp_path / "out"), num_users=500, num_items=400, num_ratings=60000,
      target_shard_mb=0.2))
  assert metadata.num_shards == 4  # 60000 rows * ~12 bytes / 0.2 MB, rounded up
  sizes = [os.path.getsize(p) for p in tf.io.gfile.glob(
      str(tmp_path / "out" / schema.shard_pattern(schema.TRAIN)))]
  assert len(sizes) == 4 and max(sizes) < 0.3 * 2**20


def test_preparing_again_replaces_files_of_an_earlier_run(tmp_path):
  out = str(tmp_path / "out")
  small = dict(num_users=30, num_items=30, num_ratings=400)
  preparation.prepare(PrepareConfig(output_dir=out, num_shards=4, split="leave_one_out",
                                    eval_negatives=2, **small))
  metadata = preparation.prepare(PrepareConfig(output_dir=out, num_shards=2, **small))
  names = sorted(os.listdir(out))
  assert [n for n in names if n.startswith("train-")] == [
      "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
  assert schema.EVAL_NEGATIVES_FILE not in names  # not part of this run's output
  assert not [n for n in names if n.startswith(".tmp")]
  data, _ = _read_split(out, schema.TRAIN)
  assert len(data[schema.USER]) == metadata.num_train


def test_failed_preparation_leaves_earlier_output_intact(tmp_path):
  out = str(tmp_path / "out")
  preparation.prepare(PrepareConfig(output_dir=out, num_users=30, num_items=30, num_ratings=400))
  before = _digest(out)
  bad = tmp_path / "bad.data"
  bad.write_text("1\t2\t3\t4\n1\t2\tx\t4\n")
  with pytest.raises(ValueError, match="bad.data:2"):
    preparation.prepare(PrepareConfig(output_dir=out, source="movielens", input=(str(bad),)))
  dup = tmp_path / "dup.data"
  dup.write_text("1\t2\t3\t4\n1\t2\t4\t5\n")
  with pytest.raises(ValueError, match="dup.data:2: duplicate"):
    preparation.prepare(PrepareConfig(output_dir=out, source="movielens", input=(str(dup),)))
  assert _digest(out) == before


@pytest.mark.parametrize("changes,message", [
    (dict(split="leave_one_out"), "--split=leave_one_out needs timestamps"),
])
def test_splits_that_need_timestamps_say_so(tmp_path, changes, message):
  path = tmp_path / "a.csv"
  path.write_text("u,i\n1,2\n")
  with pytest.raises(ConfigError, match=message):
    preparation.prepare(PrepareConfig(output_dir=str(tmp_path / "o"), source="csv",
                                      input=(str(path),), user_column="u", item_column="i",
                                      **changes))


def test_load_metadata_names_the_flag_for_an_unprepared_directory(tmp_path):
  with pytest.raises(ConfigError, match=r"--data_dir='.*' is not a prepared data directory"):
    artifacts.load_metadata(str(tmp_path))


_MEMORY = """
import json, resource, sys
from trainer import malloc
malloc.return_freed_memory()  # as the command line (trainer.prepare) does
from trainer.config import PrepareConfig
from trainer.data import preparation
import tensorflow as tf
tf.constant(1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
preparation.prepare(PrepareConfig(output_dir=sys.argv[1], num_users=10000, num_items=2500,
                                  num_ratings=1_000_000))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_mb": base / 1024, "growth_mb": (peak - base) / 1024}))
"""


@pytest.mark.slow
def test_one_million_synthetic_rows_stay_within_a_memory_bound(tmp_path):
  """1M rows as in-memory columns with string IDs would take ~150 MB before any copy; the
  streaming preparation must stay well under a bound that does not grow with the rows."""
  result = subprocess.run([sys.executable, "-c", _MEMORY, str(tmp_path / "out")], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  usage = json.loads(result.stdout.strip().splitlines()[-1])
  assert usage["growth_mb"] < 200, usage


def test_prepared_bytes_do_not_depend_on_the_cpu(tmp_path):
  """Same input and seed, same bytes, whatever vector instructions numpy picks: prepared with
  every CPU-specific code path numpy dispatches to on this machine, and with all of them off
  (numpy's default sort ordered equal keys differently with AVX-512, and its pow differs in the
  last bits). Synthetic data through a leave-one-out split with sampled eval negatives."""
  try:
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
  except ImportError:  # numpy 1.x
    from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__
  available = [name for name in __cpu_dispatch__ if __cpu_features__.get(name)]
  if not available:
    pytest.skip("numpy dispatches to no code beyond its baseline on this CPU: nothing to compare")
  outputs = {}
  baseline = {"NPY_DISABLE_CPU_FEATURES": " ".join(available)}
  for name, env in (("dispatched", {}), ("baseline", baseline)):
    run_cli("trainer.prepare", "--source=synthetic", f"--output_dir={tmp_path / name}",
            "--num_users=400", "--num_items=300", "--num_ratings=20000", "--num_shards=2",
            "--split=leave_one_out", "--eval_negatives=20", "--seed=3", env=env)
    outputs[name] = {f: (tmp_path / name / f).read_bytes()
                     for f in sorted(os.listdir(tmp_path / name))}
  assert len(outputs["dispatched"]) > 5
  assert outputs["baseline"] == outputs["dispatched"], available
