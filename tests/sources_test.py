"""Tests of the sources: raw MovieLens formats, delimited files, the synthetic generator."""

import numpy as np
import pytest

from trainer.data import sources, synthetic, values


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_bytes(text.encode())
  return str(path)


def _read(source):
  chunks = list(source.chunks())
  out = {k: np.concatenate([getattr(c, k) for c in chunks]).tolist()
         for k in ("users", "items", "ratings")}
  out["timestamps"] = (None if chunks[0].timestamps is None else
                       np.concatenate([c.timestamps for c in chunks]).tolist())
  out["lines"] = np.concatenate([c.lines for c in chunks]).tolist()
  out["chunks"] = len(chunks)
  return out


@pytest.mark.parametrize("text", [
    "196\t242\t3\t881250949\n186\t302\t4.5\t891717742\n",
    "196::242::3::881250949\n186::302::4.5::891717742\n",
    "userId,movieId,rating,timestamp\r\n196,242,3.0,881250949\r\n186,302,4.5,891717742\r\n",
])
def test_each_movielens_format_is_read(tmp_path, text):
  # The file is named x.txt: the format comes from the content, not the name.
  got = _read(sources.movielens_source(_write(tmp_path, "x.txt", text)))
  assert got["users"] == ["196", "186"] and got["items"] == ["242", "302"]
  assert got["ratings"] == [3.0, 4.5]
  assert got["timestamps"] == [881250949, 891717742]


@pytest.mark.parametrize("text,message", [
    ("1\t2\t3\t4\n5\t6\t7\n", r"x\.txt:2: expected 4 fields .* got 3: '5\\t6\\t7'"),
    ("1::2::3::4\n5::6::7::8::9\n", r"x\.txt:2: expected 4 fields .* got 5"),
    ("1\t2\t3\t4\n5\t6\tgood\t8\n", r"x\.txt:2: rating 'good' is not a number: '5\\t6\\tgood\\t8'"),
    ("1\t2\t9\t4\n", r"x\.txt:1: rating 9 is outside the range \[0\.5, 5\.0\]"),
    ("1\t2\t3\tnoon\n", r"x\.txt:1: timestamp 'noon' is not an integer"),
    ("1\t\t3\t4\n", r"x\.txt:1: item '' is empty"),
    ("", r"x\.txt: empty file"),
    ("userId,movieId,rating,timestamp\n", r"x\.txt: no rows after the header"),
    ("just words\n", r"x\.txt:1: not a MovieLens ratings file"),
])
def test_bad_movielens_input_names_file_line_and_text(tmp_path, text, message):
  with pytest.raises(ValueError, match=message):
    _read(sources.movielens_source(_write(tmp_path, "x.txt", text)))


def test_line_numbers_survive_blank_lines_and_skipped_rows(tmp_path):
  path = _write(tmp_path, "x.txt", "1\t2\t3\t4\n\n1\t3\tbad\t4\n1\t4\t5\t4\n1\t5\t5\n")
  source = sources.movielens_source(path, skip_bad_rows=True)
  got = _read(source)
  assert got["items"] == ["2", "4"] and got["lines"] == [1, 4]
  assert source.bad.count == 2
  examples = sorted(source.bad.examples)
  assert examples[0].startswith(f"{path}:3: rating 'bad'")
  assert examples[1].startswith(f"{path}:5: expected 4 fields")


def test_missing_input_names_the_flag(tmp_path):
  with pytest.raises(ValueError, match=r"--input: file .*nothing\.csv' does not exist"):
    sources.movielens_source(str(tmp_path / "nothing.csv"))


def test_csv_with_header_by_column_names_and_implicit_feedback(tmp_path):
  a = _write(tmp_path, "a.csv", "when,who,what\n5,alice,book 1\n6,bob,\"book, 2\"\n")
  b = _write(tmp_path, "b.csv", "when,who,what\n7,carol,book 3\n")
  source = sources.DelimitedSource([str(tmp_path / "*.csv")],
                                   sources.Columns("who", "what", None, "when"))
  assert source.files == [a, b] and not source.has_ratings
  got = _read(source)
  assert got["users"] == ["alice", "bob", "carol"]
  assert got["items"] == ["book 1", "book, 2", "book 3"]  # quoted delimiter kept
  assert got["ratings"] == [1.0, 1.0, 1.0]
  assert got["timestamps"] == [5, 6, 7]
  assert got["lines"] == [2, 3, 2]


def test_csv_without_header_by_column_index_without_timestamp(tmp_path):
  path = _write(tmp_path, "log.tsv", "x\tu1\ti1\t4\nx\tu2\ti2\t2\n")
  source = sources.DelimitedSource([path], sources.Columns("1", "2", "3"), "\t", header=False)
  got = _read(source)
  assert got["users"] == ["u1", "u2"] and got["ratings"] == [4.0, 2.0]
  assert got["timestamps"] is None and not source.has_timestamps


def test_csv_missing_column_and_bad_index_are_named(tmp_path):
  path = _write(tmp_path, "a.csv", "user,item\n1,2\n")
  with pytest.raises(ValueError, match=r"a\.csv:1: no rating column 'stars' in the header"):
    _read(sources.DelimitedSource([path], sources.Columns("user", "item", "stars")))
  with pytest.raises(ValueError, match=r"--user_column='user' must be a 0-based column index"):
    _read(sources.DelimitedSource([path], sources.Columns("user", "item"), header=False))
  with pytest.raises(ValueError, match=r"--input: no file matches .*nope\*\.csv"):
    sources.DelimitedSource([str(tmp_path / "nope*.csv")], sources.Columns("a", "b"))


def test_declared_rating_range_is_enforced(tmp_path):
  path = _write(tmp_path, "a.csv", "u,i,r\n1,2,11\n")
  with pytest.raises(ValueError, match=r"a\.csv:2: rating 11 is outside the range \[1, 10\]"):
    _read(sources.DelimitedSource([path], sources.Columns("u", "i", "r"), rating_range=(1, 10)))


def _synthetic(**kw):
  args = dict(num_users=60, num_items=50, num_ratings=800, seed=3)
  args.update(kw)
  return synthetic.SyntheticSource(**args)


def test_synthetic_is_deterministic_distinct_and_in_range():
  a, b, c = _read(_synthetic()), _read(_synthetic()), _read(_synthetic(seed=4))
  assert len(a["users"]) == 800
  assert a == b and a["users"] != c["users"]
  assert len(set(zip(a["users"], a["items"]))) == 800
  ratings = np.array(a["ratings"])
  assert ratings.min() >= 1.0 and ratings.max() <= 5.0
  assert np.all(ratings * 2 == np.round(ratings * 2))  # half-star steps
  assert all(r == 1.0 for r in _read(_synthetic(implicit=True))["ratings"])


def test_synthetic_is_generated_in_seeded_blocks(monkeypatch):
  monkeypatch.setattr(synthetic, "_GENERATION_BLOCK", 64)
  a, b = _read(_synthetic(num_ratings=1000)), _read(_synthetic(num_ratings=1000))
  assert a["chunks"] > 5 and a == b
  assert a["lines"] == list(range(1, 1001))
  assert len(set(zip(a["users"], a["items"]))) == 1000


def test_synthetic_has_learnable_structure():
  """Per-item means explain much more variance than noise would."""
  r = _read(_synthetic(num_users=200, num_items=100, num_ratings=8000, noise=0.2, seed=0))
  ratings, items = np.array(r["ratings"], np.float64), np.array(r["items"])
  means = {i: ratings[items == i].mean() for i in np.unique(items)}
  residual = ratings - np.array([means[i] for i in items])
  assert residual.var() < 0.85 * ratings.var()


def test_synthetic_popularity_is_skewed():
  r = _read(_synthetic(num_users=500, num_items=400, num_ratings=20000, seed=1))
  _, counts = np.unique(r["items"], return_counts=True)
  counts = np.sort(counts)[::-1]
  assert counts[:40].sum() > 0.25 * counts.sum()  # top 10% of items get over 25% of ratings


def test_synthetic_refuses_too_dense_requests():
  with pytest.raises(ValueError, match="--num_ratings=60 is more than half"):
    synthetic.SyntheticSource(10, 10, 60)


def test_a_bad_row_raises_or_is_counted_under_skip_bad_rows(tmp_path):
  with pytest.raises(ValueError, match="^f.csv:3: broken$"):
    values.reject(None, "fields", "f.csv:3: broken")
  bad = values.Rejections()
  for k in range(12):
    values.reject(bad, "fields" if k % 3 else "encoding", f"f.csv:{k}: broken")
  assert bad.count == 12 and len(bad.examples) == 10  # every row counted, ten shown
  assert bad.by_reason == {"fields": 8, "encoding": 4}
  # Every source says what it skipped through the same attribute.
  assert synthetic.SyntheticSource(10, 10, 20).bad is None
  path = tmp_path / "r.csv"
  path.write_text("u,i\na,1\nb\nc,3\n")
  strict = sources.DelimitedSource([str(path)], sources.Columns("u", "i"))
  assert strict.bad is None
  skipping = sources.DelimitedSource([str(path)], sources.Columns("u", "i"), skip_bad_rows=True)
  assert sum(len(c) for c in skipping.chunks()) == 2
  assert skipping.bad.count == 1 and "r.csv:3: expected 2 fields" in skipping.bad.examples[0]
