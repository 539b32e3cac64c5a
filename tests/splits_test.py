"""Tests of the split protocols, on rows worked out by hand (provisional codes, as preparation
hands them over one bucket at a time)."""

import numpy as np

from trainer.config import PrepareConfig
from trainer.data import splits


def _rows(users, items, ts=None, first_row=0):
  users = np.asarray(users, np.int64)
  out = {"user": users, "item": np.asarray(items, np.int64),
         "row": np.arange(first_row, first_row + len(users), dtype=np.int64)}
  if ts is not None:
    out["ts"] = np.asarray(ts, np.int64)
  return out


def test_random_split_holds_out_a_hash_fraction_fixed_by_the_seed():
  config = PrepareConfig(output_dir="o", eval_fraction=0.25, seed=5)
  splitter = splits.make_splitter(config)
  users, items = np.divmod(np.arange(40_000), 200)
  rows = _rows(users, items)
  held = splitter.held_out(rows)
  assert abs(held.mean() - 0.25) < 0.01
  # The same pair is held out however rows are grouped or ordered.
  reversed_rows = {k: v[::-1] for k, v in rows.items()}
  np.testing.assert_array_equal(splitter.held_out(reversed_rows), held[::-1])
  other_seed = splits.make_splitter(PrepareConfig(output_dir="o", eval_fraction=0.25, seed=6))
  assert (other_seed.held_out(rows) != held).any()
  assert splitter.expected_eval(np.ones(200, bool), 1000) == 250
  assert splitter.metadata_fields() == {"eval_fraction": 0.25, "temporal_cutoff": None}
  assert not splitter.needs_timestamps


def test_temporal_split_at_a_given_cutoff():
  splitter = splits.make_splitter(PrepareConfig(output_dir="o", split="temporal",
                                                temporal_cutoff=8))
  assert splitter.needs_timestamps
  rows = _rows([0, 0, 1, 1], [0, 1, 0, 1], ts=[7, 8, 9, 1])
  splitter.begin(2, 4)
  splitter.observe(rows)
  assert splitter.held_out(rows).tolist() == [False, True, True, False]
  assert splitter.expected_eval(np.ones(2, bool), 4) == 2.0  # half of the sampled timestamps
  assert splitter.metadata_fields() == {"eval_fraction": 0.0, "temporal_cutoff": 8}


def test_temporal_split_at_a_fraction_cuts_at_the_sampled_quantile():
  splitter = splits.make_splitter(PrepareConfig(output_dir="o", split="temporal",
                                                eval_fraction=0.3))
  splitter.begin(10, 10)  # 10 rows: every timestamp is sampled
  splitter.observe(_rows(range(5), range(5), ts=[10, 3, 5, 1, 8]))  # two buckets
  splitter.observe(_rows(range(5, 10), range(5), ts=[2, 9, 4, 7, 6], first_row=5))
  # Sorted 1..10; the cut is the value at index int(10 * 0.7) = 7, i.e. 8: holds out 8, 9, 10.
  assert splitter.cutoff == 8
  rows = _rows(range(10), [0] * 10, ts=range(1, 11))
  assert splitter.held_out(rows).sum() == 3
  assert splitter.metadata_fields() == {"eval_fraction": 0.3, "temporal_cutoff": 8}
  assert splitter.expected_eval(np.ones(10, bool), 10) == 3.0


def test_leave_one_out_holds_out_each_users_latest_across_buckets():
  splitter = splits.make_splitter(PrepareConfig(output_dir="o", split="leave_one_out",
                                                eval_fraction=0.0))
  splitter.begin(num_users=4, total_rows=9)
  # User 0: latest is item 2 (ts 9), seen in the second bucket. User 1: items 0 and 1 tie at
  # ts 5, the later row (item 1) wins. User 2: one interaction, nothing held out. User 3: none.
  first = _rows([0, 0, 1, 2], [0, 1, 0, 0], ts=[1, 4, 5, 3], first_row=0)
  second = _rows([0, 1], [2, 1], ts=[9, 5], first_row=4)
  splitter.observe(first)
  splitter.observe(second)
  assert splitter.held_out(first).tolist() == [False, False, False, False]
  assert splitter.held_out(second).tolist() == [True, True]
  kept = np.array([True, True, True, False])
  assert splitter.expected_eval(kept, 6) == 2.0
  assert splitter.metadata_fields() == {"eval_fraction": 0.0, "temporal_cutoff": None}


def test_uniform_pairs_spreads_pairs_evenly_over_the_unit_interval():
  value = splits.uniform_pairs(np.arange(10_000), np.zeros(10_000, np.int64), 1)
  assert 0.0 <= value.min() and value.max() < 1.0
  counts = np.bincount((value * 10).astype(int), minlength=10)
  assert counts.min() > 900 and counts.max() < 1100  # each tenth holds about 1,000
  assert (splits.uniform_pairs(np.arange(100), np.zeros(100, np.int64), 2)
          != value[:100]).all()  # another salt, other numbers
