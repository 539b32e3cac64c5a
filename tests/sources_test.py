"""Tests of the rating sources: raw MovieLens formats and the synthetic generator."""

import numpy as np
import pytest

from trainer.data import sources


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_bytes(text.encode())
  return str(path)


@pytest.mark.parametrize("name,text", [
    ("u.data", "196\t242\t3\t881250949\n186\t302\t4.5\t891717742\n"),
    ("ratings.dat", "196::242::3::881250949\n186::302::4.5::891717742\n"),
    ("ratings.csv", "userId,movieId,rating,timestamp\r\n196,242,3.0,881250949\r\n"
                    "186,302,4.5,891717742\r\n"),
])
def test_each_movielens_format_is_read(tmp_path, name, text):
  # The file is named x.txt: the format comes from the content, not the name.
  ratings = sources.read_movielens(_write(tmp_path, "x.txt", text))
  assert ratings.users.tolist() == ["196", "186"]
  assert ratings.items.tolist() == ["242", "302"]
  assert ratings.ratings.tolist() == [3.0, 4.5]
  assert ratings.timestamps.tolist() == [881250949, 891717742]


@pytest.mark.parametrize("text,message", [
    ("1\t2\t3\t4\n5\t6\t7\n", r"x\.txt:2: expected 4 fields .* got 3: '5\\t6\\t7'"),
    ("1\t2\t3\t4\n5\t6\tgood\t8\n", r"x\.txt:2: rating 'good' is not a number"),
    ("1\t2\t9\t4\n", r"x\.txt:1: rating 9 is outside the MovieLens range \[0\.5, 5\.0\]"),
    ("1\t2\t3\tnoon\n", r"x\.txt:1: timestamp 'noon' is not an integer"),
    ("", r"x\.txt: empty file"),
    ("userId,movieId,rating,timestamp\n", r"x\.txt: no ratings after the header"),
    ("user,item,rating,timestamp\n1,2,3,4\n", r"x\.txt:1: expected header"),
    ("just words\n", r"x\.txt:1: not a MovieLens ratings file"),
])
def test_bad_movielens_input_names_file_line_and_text(tmp_path, text, message):
  with pytest.raises(ValueError, match=message):
    sources.read_movielens(_write(tmp_path, "x.txt", text))


def test_missing_input_names_the_flag(tmp_path):
  with pytest.raises(ValueError, match=r"--input: file .*nothing\.csv' does not exist"):
    sources.read_movielens(str(tmp_path / "nothing.csv"))


def test_synthetic_is_deterministic_distinct_and_in_range():
  a = sources.generate_synthetic(50, 40, 500, seed=3)
  b = sources.generate_synthetic(50, 40, 500, seed=3)
  c = sources.generate_synthetic(50, 40, 500, seed=4)
  assert len(a) == 500
  assert a.users.tolist() == b.users.tolist() and a.ratings.tolist() == b.ratings.tolist()
  assert a.users.tolist() != c.users.tolist()
  pairs = set(zip(a.users.tolist(), a.items.tolist()))
  assert len(pairs) == 500
  assert a.ratings.min() >= 1.0 and a.ratings.max() <= 5.0
  assert np.all(a.ratings * 2 == np.round(a.ratings * 2))  # half-star steps


def test_synthetic_has_learnable_structure():
  """Per-user and per-item means explain much more variance than noise would."""
  r = sources.generate_synthetic(200, 100, 8000, noise=0.2, seed=0)
  ratings = r.ratings.astype(np.float64)
  item_means = {i: ratings[r.items == i].mean() for i in np.unique(r.items)}
  residual = ratings - np.array([item_means[i] for i in r.items])
  assert residual.var() < 0.85 * ratings.var()


def test_synthetic_popularity_is_skewed():
  r = sources.generate_synthetic(500, 400, 20000, seed=1)
  _, counts = np.unique(r.items, return_counts=True)
  counts = np.sort(counts)[::-1]
  assert counts[:40].sum() > 0.25 * counts.sum()  # top 10% of items get over 25% of ratings


def test_synthetic_refuses_too_dense_requests():
  with pytest.raises(ValueError, match="--num_ratings=60 is more than half"):
    sources.generate_synthetic(10, 10, 60)
