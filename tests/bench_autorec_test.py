"""The I-AutoRec reference of the quality benchmark (bench/autorec.py) on an exported split."""

import os
import sys

import numpy as np
import pytest

from trainer.config import PrepareConfig
from trainer.data import preparation

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import autorec  # noqa: E402  (a script of bench/, not a package)
import split_export  # noqa: E402


def test_autorec_learns_the_planted_ratings_better_than_the_mean(tmp_path):
  data = str(tmp_path / "data")
  preparation.prepare(PrepareConfig(output_dir=data, num_users=120, num_items=80,
                                    num_ratings=4000, eval_fraction=0.1, seed=5))
  split = str(tmp_path / "split")
  split_export.export_split(data, split)
  train = [r for _, _, r in split_export.read_csv_rows(os.path.join(split, "train.csv"))]
  held_out = np.array([r for _, _, r in split_export.read_csv_rows(
      os.path.join(split, "eval.csv"))])
  mean_rmse = float(np.sqrt(np.mean((held_out - np.mean(train)) ** 2)))
  result = autorec.fit(split, 0, (1.0, 5.0), hidden=32, l2=1.0, epochs=1000)
  assert result["eval_rmse"] < 0.9 * mean_rmse, (result, mean_rmse)
  assert result["eval_mae"] < result["eval_rmse"]
  again = autorec.fit(split, 0, (1.0, 5.0), hidden=32, l2=1.0, epochs=1000)
  assert again["eval_rmse"] == pytest.approx(result["eval_rmse"], rel=1e-5)  # seeded
