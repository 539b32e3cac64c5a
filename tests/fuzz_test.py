"""Property-based fuzzing of preparation: generated logs and feature files through the real
`prepare()`, with mutations (byte flips, truncation, non-finite and overflowing numbers, extra
and missing fields, quotes, byte-order marks and other encodings, CRLF, empty, huge and unclean
IDs).

Each case either prepares, with every row accounted for and the same output as the valid rows
alone, or fails with a ValueError that names the file (and the line, for a row): never another
exception, never a row lost without a count. Which rows are valid is decided by `_oracle`, an
independent restatement of the policy of `trainer.data.values` (what the README documents).

Bounded for CI: NEUMF_FUZZ_EXAMPLES examples per property (default 25; the whole file takes
about a minute on 2 cores), derandomized so that CI is repeatable. For a long run:
`NEUMF_FUZZ_EXAMPLES=2000 NEUMF_FUZZ_RANDOM=1 python -m pytest tests/fuzz_test.py`.
"""

import csv
import io
import os
import re
import shutil
import tempfile
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from trainer import schema
from trainer.config import PrepareConfig
from trainer.data import preparation

EXAMPLES = int(os.environ.get("NEUMF_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=not os.environ.get("NEUMF_FUZZ_RANDOM"),
                suppress_health_check=list(HealthCheck))

_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
HEADER = ["user", "item", "rating"]


# ----------------------------------------------------------------------------- the oracle


def _clean_id(value: str) -> bool:
  return (0 < len(value) <= 1024 and not any(
      unicodedata.category(c) in ("Cc", "Cs") or c == "\ufeff" for c in value))


def _number(value: str, numeric: bool = True) -> bool:
  return bool(_NUMBER.fullmatch(value)) and abs(float(value)) <= _FLOAT32_MAX


def _lines(data: bytes):
  """The file's lines as the policy reads them: UTF-8 (a leading BOM dropped; other bytes kept
  as surrogates), universal newlines."""
  text = data.decode("utf-8", "surrogateescape")
  text = text[1:] if text.startswith("\ufeff") else text
  lines = re.split(r"\r\n|\r|\n", text)
  return lines[:-1] if lines and lines[-1] == "" else lines


def _fields(line: str):
  try:
    return next(csv.reader([line], strict=True))
  except (csv.Error, StopIteration):
    return None


def _oracle(data: bytes, header, check_row):
  """(valid rows, bad row count, rows read), or None when the file as a whole is unreadable
  (no header naming the columns)."""
  lines = _lines(data)
  if not lines:
    return None
  names = _fields(lines[0])
  if names is None or [n.strip() for n in names] != header:
    return None
  valid, bad, read = [], 0, 0
  for line in lines[1:]:
    if not line.strip():
      continue
    read += 1
    fields = _fields(line)
    if (fields is None or len(fields) != len(header) or re.search("[\ud800-\udfff]", line)
        or not check_row([f.strip() for f in fields])):
      bad += 1
    else:
      valid.append([f.strip() for f in fields])
  return valid, bad, read


def _log_row_ok(fields) -> bool:
  user, item, rating = fields
  return _clean_id(user) and _clean_id(item) and _number(rating)


def _feature_row_ok(fields) -> bool:
  item, price, kind = fields
  return _clean_id(item) and (price == "" or _number(price))


# ----------------------------------------------------------------------------- generation


_IDS = st.one_of(st.integers(0, 40).map(str), st.sampled_from(["a b", "x,y", 'q"t', "é", "ü1"]))


@st.composite
def _log_rows(draw):
  users = draw(st.lists(_IDS, min_size=6, max_size=12, unique=True))
  rows = []
  for user in users:
    for item in draw(st.lists(_IDS, min_size=4, max_size=8, unique=True)):
      rating = draw(st.sampled_from(["1", "2", "3.5", "4", "5", "4e0", "+2", ".5", "5."]))
      rows.append([f"u{user}", f"i{item}", rating])
  return rows


def _csv(header, rows, line_end="\n") -> bytes:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator=line_end)
  writer.writerow(header)
  writer.writerows(rows)
  return out.getvalue().encode("utf-8")


_ODD_VALUES = ["nan", "NaN", "inf", "-inf", "Infinity", "1e39", "-4e38", "1e400", "4_0", "\u0664",
               "", " ", "0x10", "1e", "..5", "5%", "1,5"]


@st.composite
def _mutated(draw, clean: bytes, width: int):
  """`clean` with a few mutations applied."""
  data = bytearray(clean)
  for _ in range(draw(st.integers(1, 3))):
    kind = draw(st.sampled_from(["flip", "truncate", "field", "extra", "missing", "quote",
                                 "bom", "encoding", "crlf", "empty_id", "huge_id", "control",
                                 "blank"]))
    text = bytes(data).decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    if len(lines) < 2:
      kind = "flip"
    k = draw(st.integers(1, max(1, len(lines) - 2))) if len(lines) >= 2 else 0
    if kind == "flip" and data:
      at = draw(st.integers(0, len(data) - 1))
      data[at] ^= draw(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 255]))
      continue
    if kind == "truncate" and data:
      del data[draw(st.integers(0, len(data) - 1)):]
      continue
    if kind == "bom":
      text = ("\ufeff" + text) if draw(st.booleans()) else "\n".join(
          lines[:k] + ["\ufeff" + lines[k]] + lines[k + 1:])
    elif kind == "encoding":
      data = bytearray(text.encode(draw(st.sampled_from(["latin-1", "utf-16", "cp1252"])),
                                   "replace"))
      continue
    elif kind == "crlf":
      text = text.replace("\n", "\r\n") if draw(st.booleans()) else "\n".join(
          lines[:k] + [lines[k] + "\r"] + lines[k + 1:])
    elif kind == "blank":
      text = "\n".join(lines[:k] + ["  "] + lines[k:])
    else:
      fields = lines[k].split(",")
      column = draw(st.integers(0, len(fields) - 1))
      if kind == "field":
        fields[column] = draw(st.sampled_from(_ODD_VALUES))
      elif kind == "extra":
        fields.append(draw(st.sampled_from(["", "x", "5"])))
      elif kind == "missing" and len(fields) > 1:
        fields.pop(column)
      elif kind == "quote":
        fields[column] = '"' + fields[column]
      elif kind == "empty_id":
        fields[0] = ""
      elif kind == "huge_id":
        fields[0] = "u" * draw(st.sampled_from([1025, 5000, 200_000]))
      elif kind == "control":
        fields[0] += draw(st.sampled_from(["\x00", "\x07", "\x1b", "\x7f", "\x85"]))
      lines[k] = ",".join(fields)
      text = "\n".join(lines)
    data = bytearray(text.encode("utf-8", "surrogateescape"))
  return bytes(data)


# ----------------------------------------------------------------------------- running


def _outputs(directory):
  """Every file of a prepared directory but the metadata, by name: bytes."""
  return {name: open(os.path.join(directory, name), "rb").read()
          for name in sorted(os.listdir(directory)) if name != schema.METADATA_FILE}


def _prepare_file(data: bytes, work: str, name: str, **kwargs):
  path = os.path.join(work, name)
  with open(path, "wb") as f:
    f.write(data)
  config = dict(output_dir=os.path.join(work, "out-" + name), source="csv", input=(path,),
                user_column="user", item_column="item", rating_column="rating",
                duplicates="keep_latest", num_shards=1, eval_fraction=0.25)
  config.update(kwargs)
  return path, config


def _run(config):
  """prepare(): (metadata, None) or (None, the ValueError); anything else fails the test."""
  try:
    return preparation.prepare(PrepareConfig(**config)), None
  except ValueError as e:
    return None, e


def _check_error(error, path):
  """A failure names the file, or (too few rows left to split) the flag."""
  assert str(error).startswith(path) or str(error).startswith("--split="), (
      f"the error does not name {path}: {error}")


def _check_accounts(metadata, oracle):
  valid, bad, read = oracle
  assert metadata.rows_read == read and metadata.bad_rows_skipped == bad, (metadata, oracle)
  assert metadata.rows_read == (metadata.num_train + metadata.num_eval + metadata.bad_rows_skipped
                                + metadata.duplicates_merged + metadata.rows_filtered)


@pytest.fixture
def work():
  directory = tempfile.mkdtemp(prefix="neumf-fuzz-")
  yield directory
  shutil.rmtree(directory, ignore_errors=True)


@FUZZ
@given(data=st.data())
def test_a_mutated_log_prepares_like_its_valid_rows_or_fails_naming_the_file(data):
  rows = data.draw(_log_rows())
  clean = _csv(HEADER, rows)
  mutated = data.draw(_mutated(clean, 3))
  skip = data.draw(st.booleans())
  work = tempfile.mkdtemp(prefix="neumf-fuzz-")
  try:
    path, config = _prepare_file(mutated, work, "log.csv", skip_bad_rows=skip)
    metadata, error = _run(config)
    oracle = _oracle(mutated, HEADER, _log_row_ok)
    event("failed, naming the file" if error is not None else
          f"prepared, {'some' if oracle[1] else 'no'} bad rows skipped")
    if error is not None:
      _check_error(error, path)
      # The policy refuses nothing it should take: a strict run fails only on a bad row or a
      # bad file; a skipping one only on a bad file or too few valid rows.
      if oracle is not None and not skip:
        assert (oracle[1] > 0 or len(oracle[0]) < 2 or "duplicate" in str(error)
                or "leaves" in str(error)), error
      return
    assert oracle is not None, "prepared a file whose header is broken"
    if not skip:
      assert oracle[1] == 0, f"accepted {oracle[1]} bad rows without --skip_bad_rows"
    _check_accounts(metadata, oracle)
    # The same output as the valid rows alone, written cleanly.
    reference_path, reference = _prepare_file(_csv(HEADER, oracle[0]), work, "valid.csv")
    expected, reference_error = _run(reference)
    assert reference_error is None, reference_error
    assert _outputs(config["output_dir"]) == _outputs(reference["output_dir"])
    assert (metadata.num_train, metadata.num_eval) == (expected.num_train, expected.num_eval)
  finally:
    shutil.rmtree(work, ignore_errors=True)


FEATURE_HEADER = ["item", "price", "kind"]


@FUZZ
@given(data=st.data())
def test_a_mutated_feature_file_prepares_like_its_valid_rows_or_fails_naming_the_file(data):
  items = data.draw(st.lists(st.integers(0, 30), min_size=5, max_size=15, unique=True))
  rows = [[f"i{k}", data.draw(st.sampled_from(["", "1", "2.5", "-3e1", "7"])),
           data.draw(st.sampled_from(["", "a", "b", "c d"]))] for k in items]
  mutated = data.draw(_mutated(_csv(FEATURE_HEADER, rows), 3))
  skip = data.draw(st.booleans())
  log = _csv(HEADER, [[f"u{u}", f"i{i}", str(1 + (u + i) % 5)] for u in range(12)
                      for i in range(0, 30, 2)])
  work = tempfile.mkdtemp(prefix="neumf-fuzz-")
  try:
    features_path = os.path.join(work, "items.csv")
    with open(features_path, "wb") as f:
      f.write(mutated)
    columns = dict(item_features=features_path, item_id_column="item",
                   item_feature_columns="price:numeric,kind:categorical")
    _, config = _prepare_file(log, work, "log.csv", skip_bad_rows=skip, **columns)
    metadata, error = _run(config)
    oracle = _oracle(mutated, FEATURE_HEADER, _feature_row_ok)
    if oracle is not None:  # a second row for an ID is bad too (the first stays)
      seen, kept = set(), []
      for row in oracle[0]:
        kept.append(row) if row[0] not in seen else None
        seen.add(row[0])
      oracle = (kept, oracle[1] + len(oracle[0]) - len(kept), oracle[2])
    event("failed, naming the file" if error is not None else
          f"prepared, {'some' if oracle and oracle[1] else 'no'} bad rows skipped")
    if error is not None:
      _check_error(error, features_path)
      if oracle is not None and not skip:
        assert oracle[1] > 0 or not oracle[0], error
      return
    assert oracle is not None, "prepared with a feature file whose header is broken"
    bad = metadata.feature_files["item"]["bad_rows_skipped"]
    assert bad == oracle[1] and (skip or bad == 0), (bad, oracle)
    with open(os.path.join(work, "valid.csv"), "wb") as f:
      f.write(_csv(FEATURE_HEADER, oracle[0]))
    _, reference = _prepare_file(log, work, "log2.csv",
                                 **{**columns, "item_features": os.path.join(work, "valid.csv")})
    expected, reference_error = _run(reference)
    assert reference_error is None, reference_error
    assert _outputs(config["output_dir"]) == _outputs(reference["output_dir"])
    assert metadata.features == expected.features
  finally:
    shutil.rmtree(work, ignore_errors=True)
