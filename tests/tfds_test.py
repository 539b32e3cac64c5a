"""The real TensorFlow Datasets MovieLens builder, fed offline from a local archive."""

import os
import shutil

import pytest

from conftest import shared_file
from trainer.config import PrepareConfig
from trainer.data import preparation

pytestmark = pytest.mark.slow


def test_tfds_latest_small_builds_offline_from_the_manual_archive(tmp_path):
  archive = shared_file("ml-latest-small/ml-latest-small.zip")
  manual = tmp_path / "manual"
  manual.mkdir()
  shutil.copy(archive, manual / "ml-latest-small.zip")
  env_proxy = {k: os.environ.pop(k) for k in ("HTTP_PROXY", "HTTPS_PROXY") if k in os.environ}
  os.environ["HTTPS_PROXY"] = "http://127.0.0.1:9"  # any download attempt would fail loudly
  try:
    metadata = preparation.prepare(PrepareConfig(
        output_dir=str(tmp_path / "out"), source="tfds",
        tfds_name="movielens/latest-small-ratings", tfds_data_dir=str(tmp_path / "tfds"),
        tfds_manual_dir=str(manual), split="leave_one_out", eval_negatives=10))
  finally:
    del os.environ["HTTPS_PROXY"]
    os.environ.update(env_proxy)
  # The published statistics of ml-latest-small: 100,836 ratings, 610 users, 9,724 movies.
  assert metadata.rows_read == 100836
  assert (metadata.num_users, metadata.num_items) == (610, 9724)
  assert metadata.num_eval == 610 and metadata.num_train == 100836 - 610
  assert (metadata.rating_min, metadata.rating_max) == (0.5, 5.0)
  assert metadata.input_fingerprint["tfds"] == "movielens/latest-small-ratings"


def test_unknown_tfds_config_is_named():
  with pytest.raises(ValueError, match=r"--tfds_name='movielens/2k-ratings'"):
    preparation.prepare(PrepareConfig(output_dir="unused", source="tfds",
                                      tfds_name="movielens/2k-ratings"))
