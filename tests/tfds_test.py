"""The real TensorFlow Datasets MovieLens builder, fed offline from a local archive."""

import os
import re
import shutil

import numpy as np
import pytest

from conftest import shared_file
from trainer.config import PrepareConfig
from trainer.data import artifacts, preparation

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


def _examples_of_the_100k_builder():
  """MovieLens 100K rating examples as the real TFDS builder parses them (its own parsing
  module, fed the shared files: the builder's archive is not available offline)."""
  from tensorflow_datasets.structured import movielens_parsing
  directory = shared_file("ml-100k/u.data").parent
  return (example for _, example in movielens_parsing.parse_100k_ratings_data(str(directory)))


def test_tfds_examples_give_the_side_files_features():
  """The builder's examples carry the catalogue and the demographics: read from them, each
  item and user gets what the side files give (TFDS's age groups aside)."""
  from trainer.data import features
  items, users = features.from_movielens_examples(_examples_of_the_100k_builder(), "tfds:test")
  assert (items.side, users.side) == ("item", "user")
  assert len(items.ids) == 1682 and len(users.ids) == 943
  files = {raw.side: raw for raw in (
      features.read_movielens_features("item", str(shared_file("ml-100k/u.item"))),
      features.read_movielens_features("user", str(shared_file("ml-100k/u.user"))))}
  by_id = lambda raw, name: dict(zip(raw.ids, raw.values[name]))  # noqa: E731
  item_genres, file_genres = by_id(items, "genres"), by_id(files["item"], "genres")
  # TFDS names the genres of 1M/latest ("Children", "Unknown"); the file those of 100K.
  rename = {"Children's": "Children", "unknown": "Unknown"}
  for item in items.ids:
    expected = {rename.get(g, g) for g in (file_genres[item] or "").split("|") if g}
    assert set((item_genres[item] or "").split("|")) - {""} == expected, item
  # The year from the title, as for movies.csv (u.item's reader takes the release date's).
  lines = shared_file("ml-100k/u.item").read_bytes().decode("latin-1").splitlines()
  titles = {line.split("|")[0]: line.split("|")[1] for line in lines if line}
  expected_years = [float(re.search(r"\((\d{4})\)\s*$", titles[i]).group(1))
                    if re.search(r"\((\d{4})\)\s*$", titles[i]) else np.nan for i in items.ids]
  np.testing.assert_array_equal([by_id(items, "year")[i] for i in items.ids], expected_years)
  for name in ("gender", "occupation", "zip"):
    assert by_id(users, name) == by_id(files["user"], name), name
  ages = by_id(users, "age")
  assert set(ages.values()) == {"1", "18", "25", "35", "45", "50", "56"}


def test_tfds_latest_small_prepares_its_item_features(tmp_path):
  archive = shared_file("ml-latest-small/ml-latest-small.zip")
  manual = tmp_path / "manual"
  manual.mkdir()
  shutil.copy(archive, manual / "ml-latest-small.zip")
  metadata = preparation.prepare(PrepareConfig(
      output_dir=str(tmp_path / "out"), source="tfds", tfds_name="movielens/latest-small-ratings",
      tfds_data_dir=str(tmp_path / "tfds"), tfds_manual_dir=str(manual)))
  assert {(f["side"], f["name"]) for f in metadata.features} == {("item", "genres"),
                                                                  ("item", "year")}
  assert metadata.feature_files["item"]["path"] == "tfds:movielens/latest-small-ratings"
  assert metadata.feature_files["item"]["entities_without_row"] == 0
  data = artifacts.PreparedData(str(tmp_path / "out"))
  _, item_ids = data.vocabularies()
  tables = data.side_features()["item"].tables
  # Toy Story (1995), Adventure|Animation|Children|Comedy|Fantasy, as movies.csv has it.
  toy_story = list(item_ids).index("1")
  genres = data.feature_vocabulary("item", "genres")
  assert {genres[v - 1] for v in tables["genres"][toy_story] if v} == {
      "Adventure", "Animation", "Children", "Comedy", "Fantasy"}
