"""The benchmark's split export: peers get exactly our training and eval rows."""

import csv
import os
import sys

import pytest

from trainer.config import PrepareConfig
from trainer.data import artifacts, preparation

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import split_export  # noqa: E402  (a script of bench/, not a package)


@pytest.fixture(scope="module")
def loo_data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("split") / "data")
  preparation.prepare(PrepareConfig(output_dir=out, num_users=60, num_items=40, num_ratings=900,
                                    split="leave_one_out", eval_negatives=5, num_shards=3,
                                    seed=2))
  return out


def test_exported_rows_are_the_prepared_rows(loo_data, tmp_path):
  figures = split_export.export_split(loo_data, str(tmp_path))
  metadata = artifacts.load_metadata(loo_data)
  assert figures["train.csv"][0] == metadata.num_train
  assert figures["eval.csv"][0] == metadata.num_eval
  for split in ("train", "eval"):
    assert figures[f"{split}.csv"] == split_export.checksum(
        split_export.prepared_rows(loo_data, split))
  # Disjoint, and together the whole log: no row moved between splits.
  train = set(split_export.read_csv_rows(str(tmp_path / "train.csv")))
  held_out = set(split_export.read_csv_rows(str(tmp_path / "eval.csv")))
  assert not {(u, i) for u, i, _ in train} & {(u, i) for u, i, _ in held_out}
  # Each eval row's sampled negatives, by raw ID, none of them the user's items.
  with open(tmp_path / "eval_negatives.csv", newline="") as f:
    negatives = list(csv.DictReader(f))
  assert figures["eval_negatives.csv"][0] == len(negatives) == metadata.num_eval
  items_of = {}
  for u, i, _ in train | held_out:
    items_of.setdefault(u, set()).add(i)
  for record in negatives:
    drawn = record["negatives"].split("|")
    assert len(drawn) == 5 and not set(drawn) & items_of[record["user"]]
    assert (record["user"], record["item"]) in {(u, i) for u, i, _ in held_out}


def test_the_checksum_tells_a_changed_row(loo_data):
  rows = list(split_export.prepared_rows(loo_data, "train"))
  changed = rows[:-1] + [(rows[-1][0], rows[-1][1], rows[-1][2] + 1)]
  assert split_export.checksum(rows) != split_export.checksum(changed)
  assert split_export.checksum(rows) == split_export.checksum(reversed(rows))  # order aside


def test_validation_folds_hold_out_each_users_earlier_interactions(tmp_path):
  """Fold k holds out each user's (k + 1)-th last interaction by timestamp: the eval split
  takes the last, and every fold's training rows are the log without the held-out rows."""
  import validation_folds  # noqa: E402  (bench/)
  log = tmp_path / "ratings.csv"
  with open(log, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["userId", "movieId", "rating", "timestamp"])
    for user in range(1, 13):  # user u rates items u .. u + 9 at times 100 u + (0 .. 9)
      for n in range(10):
        writer.writerow([user, user + n, 4.0, 100 * user + n])
  common = ["--source=movielens", "--split=leave_one_out", "--eval_negatives=3"]
  eval_dir = str(tmp_path / "data")
  import subprocess
  subprocess.run([sys.executable, "-m", "trainer.prepare", f"--input={log}",
                  f"--output_dir={eval_dir}", "--seed=0", "--min_user_interactions=8", *common],
                 check=True, capture_output=True)
  subprocess.run([sys.executable, os.path.join(os.path.dirname(split_export.__file__),
                                               "validation_folds.py"),
                  f"--ratings={log}", f"--data_dir={eval_dir}", "--folds=2",
                  "--min_user_interactions=8", f"--output_dir={tmp_path / 'folds'}", "--",
                  *common], check=True, capture_output=True)
  for fold in (1, 2):
    data = str(tmp_path / "folds" / f"fold{fold}" / "data")
    held_out = {(u, i) for u, i, _ in split_export.prepared_rows(data, "eval")}
    assert held_out == {(str(u), str(u + 9 - fold)) for u in range(1, 13)}
    train = {(u, i) for u, i, _ in split_export.prepared_rows(data, "train")}
    assert len(train) == 12 * (9 - fold) and not train & held_out
    assert all((str(u), str(u + 9)) not in train for u in range(1, 13))  # the eval rows
