"""What a redesign must not change, read from files today's code wrote before it.

`tests/fixtures/before_redesign/` was written by `tests/fixtures/make_before_redesign.sh` at the
commit before the code's layout changed: a prepared directory (CSV ratings with item features),
the latest checkpoint of a small NeuMF run on it with `--deterministic`, and `scores.json`, what
that run's SavedModel served (`serving_default` for 97 pairs, `recommend` for 3 users).
"""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, run_cli
from trainer import export, objectives, run_dir
from trainer.data import artifacts

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "before_redesign"
EXPECTED = json.loads((FIXTURE / "scores.json").read_text())


def _served(export_dir: str) -> dict:
  loaded = tf.saved_model.load(export_dir)
  scores = loaded.signatures[EXPECTED["signature"]](user=tf.constant(EXPECTED["user"]),
                                                    item=tf.constant(EXPECTED["item"]))
  recommend = EXPECTED["recommend"]
  top = loaded.signatures["recommend"](user=tf.constant(recommend["user"]),
                                       k=tf.constant(recommend["k"]))
  top = {k: v.numpy().tolist() for k, v in top.items()}
  top["items"] = [[i.decode() for i in row] for row in top["items"]]
  return {"outputs": {k: v.numpy().tolist() for k, v in scores.items()}, "recommend": top}


def _assert_served_as_before(served: dict) -> None:
  assert served["outputs"].keys() == EXPECTED["outputs"].keys()
  for name, values in EXPECTED["outputs"].items():
    np.testing.assert_array_equal(served["outputs"][name], values, err_msg=name)
  assert served["recommend"]["items"] == EXPECTED["recommend"]["outputs"]["items"]
  np.testing.assert_array_equal(served["recommend"]["scores"],
                                EXPECTED["recommend"]["outputs"]["scores"])


def test_a_prepared_directory_of_before_reads_the_same():
  data = artifacts.PreparedData(str(FIXTURE / "data"))
  metadata = data.metadata
  assert (metadata.num_users, metadata.num_items) == (24, 16)
  assert metadata.num_train + metadata.num_eval == metadata.rows_read == 24 * 8
  users, items = data.vocabularies()
  assert users[:2] == ["u0", "u1"] and sorted(items) == sorted(f"i{i}" for i in range(16))
  assert sorted(f"{s}:{n}" for s in data.side_features("all")
                for n in (i.name for i in data.side_features("all")[s].infos)) == [
                    "item:kind", "item:tags"]


def test_a_checkpoint_of_before_restores_and_serves_the_same_scores(tmp_path):
  data = artifacts.PreparedData(str(FIXTURE / "data"))
  model = run_dir.load_trained_model(str(FIXTURE / "model"), data,
                                   checkpoint_dir=str(FIXTURE / "model" / "checkpoints"))
  config = run_dir.load_config(str(FIXTURE / "model"))
  exported = export.export_saved_model(model, str(tmp_path / "export"), data,
                                       objectives.for_config(config))
  _assert_served_as_before(_served(exported))


@pytest.mark.slow
def test_the_same_run_trained_anew_serves_the_same_scores(tmp_path):
  """The fixture's run again, from its flags, on a copy of its data: bit-identical scores."""
  data_dir = tmp_path / "data"
  shutil.copytree(FIXTURE / "data", data_dir)
  config = json.loads((FIXTURE / "model" / "config.json").read_text())
  flags = ["--model=neumf", "--embedding_dim=4", "--mlp_embedding_dim=4", "--layers=8,4",
           "--epochs=2", "--batch_size=64", "--deterministic", "--seed=0",
           "--checkpoint_every_secs=0", "--max_checkpoints=1", "--nokeep_best"]
  assert (config["model"], config["embedding_dim"], config["seed"]) == ("neumf", 4, 0)
  run_cli("trainer.task", f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'model'}", *flags)
  _assert_served_as_before(_served(str(tmp_path / "model" / "export")))
