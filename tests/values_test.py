"""The one value policy (trainer.data.values), through the real `prepare()` on small logs.

Each case a new user hit on the earlier main is its own test: a 200-row log with one odd row in
the middle either fails naming file:line, the column and the value, or under --skip_bad_rows is
counted by reason, and every row read is accounted for.
"""

import json

import numpy as np
import pytest

from trainer import schema, strict_json
from trainer.config import PrepareConfig
from trainer.data import features, preparation, sources, values

ODD_LINE = 101  # the header is line 1; the odd row replaces the 100th data row


def _log(tmp_path, odd_row=None, header="user,item,rating", rows=200, name="log.csv"):
  """A 200-row CSV log of 20 users x 10 items, with `odd_row` as the 100th row."""
  lines = [header]
  for k in range(rows):
    lines.append(f"u{k % 20},i{k // 20},{1 + k % 5}")
  if odd_row is not None:
    lines[ODD_LINE - 1] = odd_row
  path = tmp_path / name
  path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
  return str(path)


def _prepare(tmp_path, path, **kwargs):
  config = dict(output_dir=str(tmp_path / "out"), source="csv", input=(path,),
                user_column="user", item_column="item", rating_column="rating",
                eval_fraction=0.2, num_shards=1)
  config.update(kwargs)
  return preparation.prepare(PrepareConfig(**config))


def _check_accounts(metadata):
  assert metadata.rows_read == (metadata.num_train + metadata.num_eval
                                + metadata.bad_rows_skipped + metadata.duplicates_merged
                                + metadata.rows_filtered)
  assert metadata.bad_rows_skipped == sum(metadata.bad_rows_by_reason.values())


ODD_VALUES = [
    # (the odd row, the reason under --skip_bad_rows, what the error says)
    ("u1,i9,nan", "number_not_finite", "rating 'nan' is not a finite number"),
    ("u1,i9,inf", "number_not_finite", "rating 'inf' is not a finite number"),
    ("u1,i9,-inf", "number_not_finite", "rating '-inf' is not a finite number"),
    ("u1,i9,NaN", "number_not_finite", "rating 'NaN' is not a finite number"),
    ("u1,i9,-Infinity", "number_not_finite", "rating '-Infinity' is not a finite number"),
    ("u1,i9,4_0", "number_syntax", "rating '4_0' is not a number"),
    ("u1,i9,\u0664", "number_syntax", "rating '\u0664' is not a number"),  # Arabic-Indic 4
    ("u1,i9,1e300", "number_overflow", "rating '1e300' overflows float32"),
    ("u1,i9,4e38", "number_overflow", "rating '4e38' overflows float32"),
    ("u1,i9,4,", "fields", "expected 3 fields of delimited file, got 4"),
    ("u1,i9", "fields", "expected 3 fields of delimited file, got 2"),
    ("u\x001,i9,4", "id_control_character", "user 'u\\x001' holds a control character"),
    ("u1,i\x1b9,4", "id_control_character", "item 'i\\x1b9' holds a control character"),
    ("u1,,4", "id_empty", "item '' is empty"),
    ("u1,i9,\"4", "quoting", "malformed CSV quoting"),
    ("u1,i\udce99,4", "encoding", "holds bytes that are not UTF-8"),
    ("x" * 1025 + ",i9,4", "id_too_long", "is longer than 1024 characters"),
]


@pytest.mark.parametrize("odd,reason,message", ODD_VALUES,
                         ids=[reason + str(k) for k, (_, reason, _) in enumerate(ODD_VALUES)])
def test_an_odd_row_fails_naming_file_line_column_and_value(tmp_path, odd, reason, message):
  path = _log(tmp_path, odd)
  with pytest.raises(ValueError) as raised:
    _prepare(tmp_path, path)
  assert str(raised.value).startswith(f"{path}:{ODD_LINE}: "), str(raised.value)
  assert message in str(raised.value)
  assert not (tmp_path / "out" / schema.METADATA_FILE).exists()  # nothing published


@pytest.mark.parametrize("odd,reason,message", ODD_VALUES,
                         ids=[reason + str(k) for k, (_, reason, _) in enumerate(ODD_VALUES)])
def test_an_odd_row_is_counted_by_reason_under_skip_bad_rows(tmp_path, odd, reason, message):
  metadata = _prepare(tmp_path, _log(tmp_path, odd), skip_bad_rows=True)
  assert metadata.rows_read == 200 and metadata.bad_rows_by_reason == {reason: 1}
  assert metadata.num_train + metadata.num_eval == 199
  _check_accounts(metadata)


def test_a_file_whose_only_row_is_nan_names_the_row(tmp_path):
  path = tmp_path / "one.csv"
  path.write_text("user,item,rating\nu1,i1,nan\n")
  with pytest.raises(ValueError, match=r"one\.csv:2: rating 'nan' is not a finite number"):
    _prepare(tmp_path, str(path))
  with pytest.raises(ValueError, match=r"no valid rows \(1 bad rows skipped\)"):
    _prepare(tmp_path, str(path), skip_bad_rows=True)


def test_a_duplicate_header_name_is_an_error_naming_both_positions(tmp_path):
  path = _log(tmp_path, header="user,item,rating,rating")
  with pytest.raises(ValueError, match=r"log\.csv:1: column 'rating' appears twice in the "
                     r"header \(fields 3 and 4\)"):
    _prepare(tmp_path, path)


def test_plain_numbers_are_accepted_and_surrounding_whitespace_is_stripped(tmp_path):
  path = tmp_path / "ok.csv"
  path.write_text("user,item,rating\n u1 ,i1, 4 \nu2,i1,+3.5e0\nu3,i1,.5\nu4,i1,5.\n"
                  "u1,i2,-0\n")
  metadata = _prepare(tmp_path, str(path), eval_fraction=0.5)
  assert metadata.rows_read == 5 and metadata.rating_histogram == {
      "-0": 1, "0.5": 1, "3.5": 1, "4": 1, "5": 1} or metadata.rating_histogram == {
      "0": 1, "0.5": 1, "3.5": 1, "4": 1, "5": 1}
  vocabulary = (tmp_path / "out" / schema.USER_VOCAB_FILE).read_text().split()
  assert sorted(vocabulary) == ["u1", "u2", "u3", "u4"]


def test_a_utf8_byte_order_mark_and_crlf_are_read(tmp_path):
  path = tmp_path / "bom.csv"
  text = open(_log(tmp_path), encoding="utf-8").read().replace("\n", "\r\n")
  path.write_bytes(b"\xef\xbb\xbf" + text.encode())
  metadata = _prepare(tmp_path, str(path))
  assert metadata.rows_read == 200 and metadata.bad_rows_skipped == 0
  assert (tmp_path / "out" / schema.USER_VOCAB_FILE).read_text().split()[0].startswith("u")


def test_a_utf16_file_is_refused_naming_the_encoding(tmp_path):
  path = tmp_path / "wide.csv"
  path.write_bytes("user,item,rating\nu1,i1,4\n".encode("utf-16"))
  with pytest.raises(ValueError, match=r"wide\.csv:1: the header holds NUL bytes: the file is "
                     "not UTF-8"):
    _prepare(tmp_path, str(path))


def test_timestamps_are_strict_integers(tmp_path):
  path = tmp_path / "t.csv"
  path.write_text("user,item,rating,ts\nu1,i1,4,100\nu1,i2,4,1_000\nu2,i1,3,1e3\n"
                  "u2,i2,3,99999999999999999999\nu3,i1,5,200\n"
                  + "".join(f"v{k},i{k},3,{k}\n" for k in range(30)))
  with pytest.raises(ValueError, match=r"t\.csv:3: timestamp '1_000' is not an integer"):
    _prepare(tmp_path, str(path), timestamp_column="ts")
  metadata = _prepare(tmp_path, str(path), timestamp_column="ts", skip_bad_rows=True)
  assert metadata.bad_rows_by_reason == {"integer_overflow": 1, "integer_syntax": 2}
  _check_accounts(metadata)


def test_every_row_is_accounted_for(tmp_path):
  # 11 data lines and 2 blank ones: 2 bad, 2 duplicates merged, user u9's 1 row filtered out
  # by --min_user_interactions=2, 6 prepared.
  path = tmp_path / "mixed.csv"
  path.write_text("user,item,rating\n"
                  "u1,i1,4\nu1,i2,3\nu1,i1,5\n\n"
                  "u2,i1,2\nu2,i2,nan\nu2,i3,1\nu2,i3,2\n   \n"
                  "u3,i1,5\nu3,i2,4,extra\nu3,i3,3\nu9,i1,1\n")
  metadata = _prepare(tmp_path, str(path), skip_bad_rows=True, duplicates="keep_latest",
                      min_user_interactions=2, eval_fraction=0.3)
  assert metadata.rows_read == 11 and metadata.blank_lines == 2
  assert metadata.bad_rows_by_reason == {"fields": 1, "number_not_finite": 1}
  assert metadata.duplicates_merged == 2 and metadata.rows_filtered == 1
  assert metadata.num_train + metadata.num_eval == 6
  _check_accounts(metadata)


def test_the_last_log_line_gives_the_accounts(tmp_path):
  metadata = _prepare(tmp_path, _log(tmp_path, "u1,i9,nan"), skip_bad_rows=True)
  line = preparation.accounts_line(metadata)
  assert line.startswith("Rows: 200 read = 199 prepared + 1 bad rows skipped "
                         "(number_not_finite 1) + 0 duplicates merged + 0 of users")


def test_movielens_files_follow_the_same_policy(tmp_path):
  path = tmp_path / "u.data"
  path.write_text("1\t1\t3\t5\n1\t2\tnan\t5\n2\t1\t4\t5\n2\t2\t4_0\t5\n3\t3\t3\t3\t9\n"
                  + "".join(f"{k}\t{k}\t3\t5\n" for k in range(10, 40)))
  with pytest.raises(ValueError, match=r"u\.data:2: rating 'nan' is not a finite number"):
    preparation.prepare(PrepareConfig(output_dir=str(tmp_path / "out"), source="movielens",
                                      input=(str(path),)))
  metadata = preparation.prepare(PrepareConfig(
      output_dir=str(tmp_path / "out"), source="movielens", input=(str(path),),
      skip_bad_rows=True))
  assert metadata.bad_rows_by_reason == {"fields": 1, "number_not_finite": 1,
                                         "number_syntax": 1}
  _check_accounts(metadata)


def test_parsed_values_follow_the_same_policy():
  # TensorFlow Datasets hands over parsed values: the same checks apply to them.
  source = sources.Source()
  source.bad = values.Rejections()
  chunk = (["1", "2", "3\x00", "4"], ["a", "b", "c", ""], np.array([4.0, np.nan, 3.0, 1e300]),
           np.arange(4), 0, np.arange(1, 5))
  kept = sources.checked_chunk(source, *chunk)
  assert kept.users.tolist() == ["1"] and kept.ratings.dtype == np.float32
  assert source.bad.by_reason == {"number_not_finite": 1, "id_control_character": 1,
                                  "id_empty": 1}
  strict = sources.Source()
  with pytest.raises(ValueError, match=r"row 2: rating 'nan' is not a finite number"):
    sources.checked_chunk(strict, *chunk)


FEATURE_CASES = [
    ("sku,price\na,1\nb,nan\n", "number_not_finite",
     r"items\.csv:3: numeric feature 'price' 'nan' is not a finite number"),
    ("sku,price\na,1\nb,1e39\n", "number_overflow", r"items\.csv:3: .*'1e39' overflows float32"),
    ("sku,price\na,1\nb,1_0\n", "number_syntax", r"items\.csv:3: .*'1_0' is not a number"),
    ("sku,price\na,1\nb,2,3\n", "fields", r"items\.csv:3: expected 2 fields, got 3"),
    ("sku,price\na,1\nb\x00,2\n", "id_control_character",
     r"items\.csv:3: item ID 'b\\x00' holds a control character"),
    ("sku,price\na,1\na,2\n", "id_duplicate", r"items\.csv:3: duplicate row for item 'a'"),
]


@pytest.mark.parametrize("text,reason,message", FEATURE_CASES)
def test_feature_files_follow_the_same_policy(tmp_path, text, reason, message):
  path = tmp_path / "items.csv"
  path.write_text(text)
  specs = features.parse_specs("price:numeric", "item_feature_columns")
  with pytest.raises(ValueError, match=message):
    features.read_feature_file("item", str(path), "sku", specs)
  bad = values.Rejections()
  raw = features.read_feature_file("item", str(path), "sku", specs, bad=bad)
  assert raw.ids == ["a"] and bad.by_reason == {reason: 1}


def test_a_duplicate_feature_header_name_is_an_error(tmp_path):
  path = tmp_path / "items.csv"
  path.write_text("sku,price,price\na,1,2\n")
  with pytest.raises(ValueError, match=r"items\.csv:1: column 'price' appears twice in the "
                     r"header \(fields 2 and 3\)"):
    features.read_feature_file("item", str(path), "sku",
                               features.parse_specs("price:numeric", "f"))


def test_skipped_feature_rows_are_counted_in_the_metadata(tmp_path):
  items = tmp_path / "items.csv"
  items.write_text("item,price\n" + "".join(f"i{k},{k}\n" for k in range(9)) + "i9,inf\n")
  metadata = _prepare(tmp_path, _log(tmp_path), skip_bad_rows=True,
                      item_features=str(items), item_id_column="item",
                      item_feature_columns="price:numeric")
  assert metadata.feature_files["item"]["bad_rows_by_reason"] == {"number_not_finite": 1}
  assert metadata.feature_files["item"]["bad_rows_skipped"] == 1


def test_metadata_is_strict_json(tmp_path):
  _prepare(tmp_path, _log(tmp_path))
  strict_json.loads((tmp_path / "out" / schema.METADATA_FILE).read_text())
  with pytest.raises(ValueError, match="non-finite number NaN"):
    strict_json.loads(json.dumps({"x": float("nan")}))
  with pytest.raises(ValueError):
    strict_json.dumps({"x": float("inf")})
