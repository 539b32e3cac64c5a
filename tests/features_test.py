"""Tests of side features: parsing per source, errors with file:line, encoding by hand."""

import os

import numpy as np
import pytest

from conftest import shared_file
from trainer import schema
from trainer.config import ConfigError, PrepareConfig
from trainer.data import artifacts, features, preparation


def test_specs_parse_with_their_arguments():
  specs = features.parse_specs("category:categorical,tags:multi_hot:|,price:numeric,"
                               "age:bucketized:8,words:multi_hot:,", "item_feature_columns")
  assert [s.describe() for s in specs] == ["category:categorical", "tags:multi_hot:|",
                                           "price:numeric", "age:bucketized:8",
                                           "words:multi_hot:,"]


@pytest.mark.parametrize("text,message", [
    ("price", "'price' is not name:kind"),
    ("price:float", "'price' is not name:kind|'price:float' is not name:kind"),
    ("tags:multi_hot", "multi_hot needs a separator"),
    ("age:bucketized:1", "bucketized needs a bucket count of at least 2"),
    ("age:bucketized:x", "bucketized needs a bucket count"),
    ("price:numeric:3", "numeric takes no argument"),
    ("a:numeric,a:categorical", r"features \['a'\] are declared twice"),
])
def test_bad_specs_name_the_flag_and_entry(text, message):
  with pytest.raises(ValueError, match=f"--item_feature_columns: .*({message})"):
    features.parse_specs(text, "item_feature_columns")


def _write(path, text):
  path.write_text(text)
  return str(path)


def test_encoding_by_hand(tmp_path):
  path = _write(tmp_path / "items.csv", "sku,color,tags,price,weight\n"
                "a,red,x|y,1.0,10\n"
                "b,blue,y,3.0,20\n"
                "c,red,,,30\n"
                "z,green,x,5.0,40\n")  # z is not in the log
  specs = features.parse_specs("color:categorical,tags:multi_hot:|,price:numeric,"
                               "weight:bucketized:2", "item_feature_columns")
  raw = features.read_feature_file("item", path, "sku", specs)
  table = features.encode(raw, ["c", "a", "b", "d"], min_count=1)  # dense order; d has no row
  # By count over the log's entities (z's green is not counted), ties by value.
  assert table.vocabularies["color"] == ["red", "blue"]
  np.testing.assert_array_equal(table.arrays["color"], [1, 1, 2, 0, 0])  # d and OOV: missing
  assert table.vocabularies["tags"] == ["y", "x"]  # y on a and b; x on a (z is not counted)
  np.testing.assert_array_equal(table.arrays["tags"], [[0, 0], [1, 2], [1, 0], [0, 0], [0, 0]])
  # price: a 1.0, b 3.0 -> mean 2, std 1; c missing -> 0.
  np.testing.assert_allclose(table.arrays["price"], [0.0, -1.0, 1.0, 0.0, 0.0])
  # weight: c 30, a 10, b 20; the median 20 cuts: 10 -> 1, 20 and 30 -> 2.
  np.testing.assert_array_equal(table.arrays["weight"], [2, 1, 2, 0, 0])
  assert table.rows_without_entity == 1 and table.entities_without_row == 1
  info = {i["name"]: i for i in table.info}
  assert info["price"]["missing"] == 2 and info["color"]["vocab_size"] == 3
  rare = features.encode(raw, ["c", "a", "b", "d"], min_count=2)
  assert rare.vocabularies["color"] == ["red"]  # blue is rarer than 2: out of vocabulary
  np.testing.assert_array_equal(rare.arrays["color"], [1, 1, 0, 0, 0])


@pytest.mark.parametrize("text,message", [
    ("sku,price\na,1\na,2\n", r"items.csv:3: duplicate row for item 'a', first at .*items.csv:2"),
    ("sku,price\na,1\nb,cheap\n", r"items.csv:3: numeric feature 'price' 'cheap' is not a number"),
    ("sku,price\na,1\nb,inf\n", r"items.csv:3: numeric feature 'price' 'inf'"),
    ("sku,cost\na,1\n", r"items.csv:1: no column 'price' in the header 'sku,cost'"),
    ("sku,price\n,1\n", r"items.csv:2: item ID '' is empty"),
    ("sku,price\n", r"items.csv: no feature rows"),
])
def test_bad_feature_files_name_file_line_and_value(tmp_path, text, message):
  path = _write(tmp_path / "items.csv", text)
  specs = features.parse_specs("price:numeric", "item_feature_columns")
  with pytest.raises(ValueError, match=message):
    features.encode(features.read_feature_file("item", path, "sku", specs), ["a", "b"], 1)


def test_movielens_100k_side_files(tmp_path):
  items = features.read_movielens_features("item", str(shared_file("ml-100k/u.item")))
  users = features.read_movielens_features("user", str(shared_file("ml-100k/u.user")))
  assert len(items.ids) == 1682 and len(users.ids) == 943
  assert items.values["genres"][0] == "Animation|Children's|Comedy"  # Toy Story
  assert items.values["year"][0] == 1995.0  # numbers are parsed when read
  assert users.values["gender"][:2] == ["M", "F"] and users.values["zip"][0] == "85"
  assert [s.name for s in users.specs] == ["age", "gender", "occupation", "zip"]


def test_movielens_1m_and_latest_side_files():
  movies = features.read_movielens_features("item", str(shared_file("ml-1m/movies.dat")))
  assert movies.values["genres"][0] == "Animation|Children's|Comedy"
  assert movies.values["year"][0] == 1995.0 and len(movies.ids) == 3883
  users = features.read_movielens_features("user", str(shared_file("ml-1m/users.dat")))
  assert users.values["age"][:2] == ["1", "56"] and users.values["occupation"][0] == "10"
  latest = features.read_movielens_features("item",
                                            str(shared_file("ml-latest-small/movies.csv")))
  assert len(latest.ids) == 9742 and latest.values["genres"][0].startswith("Adventure|")


def test_a_file_of_the_wrong_side_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r"u.user:1: not a MovieLens items file"):
    features.read_movielens_features("item", str(shared_file("ml-100k/u.user")))
  other = _write(tmp_path / "catalogue.csv", "sku,color\na,red\n")
  with pytest.raises(ValueError, match=r"catalogue.csv:1: not a MovieLens items file .* "
                     "Declare the columns of any other file with --item_id_column and "
                     "--item_feature_columns"):
    features.read_movielens_features("item", other)
  bad = _write(tmp_path / "u.item", "1|Toy Story (1995)|01-Jan-1995||url|0|0|0|1|1|1|0|0|0|0|0|0|"
               "0|0|0|0|0|0|0\n2|GoldenEye (1995)|01-Jan-1995||url|0|1|1|0|0|0|0|0|0|0|0|0|0|0"
               "|0|0|yes|0|0\n")
  with pytest.raises(ValueError, match=r"u.item:2: genre flags must be 0 or 1"):
    features.read_movielens_features("item", bad)


def test_preparation_writes_tables_by_dense_id_and_counts_mismatches(tmp_path):
  log = _write(tmp_path / "log.csv", "user,item,rating\n" + "".join(
      f"u{u},i{i},{1 + (u + i) % 5}\n" for u in range(12) for i in range(8) if (u + i) % 3))
  item_file = _write(tmp_path / "items.csv", "id,kind\n" + "".join(
      f"i{i},{'even' if i % 2 == 0 else 'odd'}\n" for i in range(7)) + "i99,odd\n")
  out = str(tmp_path / "out")
  metadata = preparation.prepare(PrepareConfig(
      output_dir=out, source="csv", input=(log,), user_column="user", item_column="item",
      rating_column="rating", item_features=item_file, item_id_column="id",
      item_feature_columns="kind:categorical", num_shards=1))
  assert metadata.features == [{"side": "item", "name": "kind", "kind": "categorical",
                                "missing": 1, "vocab_size": 3}]
  assert metadata.feature_files["item"]["rows_without_entity"] == 1  # i99
  assert metadata.feature_files["item"]["entities_without_row"] == 1  # i7
  data = artifacts.PreparedData(out)
  _, items = data.vocabularies()
  table = artifacts.load_npz(os.path.join(out, schema.feature_table_file("item")))["kind"]
  vocabulary = data.feature_vocabulary("item", "kind")
  for n, raw in enumerate(items):  # every dense row holds its own item's value
    expected = 0 if raw == "i7" else vocabulary.index(
        "even" if int(raw[1:]) % 2 == 0 else "odd") + 1
    assert table[n] == expected, raw
  assert table[-1] == 0  # the out-of-vocabulary row
  only = data.side_features("kind")
  assert list(only) == ["item"] and only["item"].rows == len(items) + 1
  assert data.side_features("none") == {}
  with pytest.raises(ConfigError, match=r"--features=colour: .* has no feature 'colour' \(it "
                     "has: item:kind\\)"):
    data.side_features("colour")


def test_a_bad_feature_file_fails_before_the_log_is_read(tmp_path):
  log = _write(tmp_path / "log.csv", "user,item\n" + "".join(f"u{k},i{k}\n" for k in range(50)))
  item_file = _write(tmp_path / "items.csv", "id,price\ni1,10\ni2,ten\n")
  with pytest.raises(ValueError, match="items.csv:3: numeric feature 'price' 'ten'"):
    preparation.prepare(PrepareConfig(
        output_dir=str(tmp_path / "out"), source="csv", input=(log,), user_column="user",
        item_column="item", item_features=item_file, item_id_column="id",
        item_feature_columns="price:numeric"))
  assert not os.path.exists(tmp_path / "out" / schema.METADATA_FILE)


@pytest.mark.parametrize("changes,message", [
    (dict(item_feature_columns="a:numeric"), "--item_feature_columns/--item_id_column need "
     "--item_features"),
    (dict(source="csv", input=("l",), user_column="u", item_column="i", item_features="x",
          item_feature_columns="a:numeric"), "--item_feature_columns needs --item_id_column"),
    (dict(min_feature_count=0), "--min_feature_count=0 must be at least 1"),
])
def test_feature_flag_rules(changes, message):
  with pytest.raises(ConfigError, match=message):
    PrepareConfig(output_dir="o", **changes).validate()
