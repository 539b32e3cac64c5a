"""Continuous training: preparation on a base, warm starts, serving the new IDs (#28)."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO_ROOT, last_json_line, run_cli
from trainer import cli, train
from trainer.config import ConfigError, PrepareConfig, TrainConfig
from trainer.data import artifacts, lineage, preparation
from warm_helpers import (built, digest, prepare_flags, warm_started, weights_and_slots,
                          write_logs)


def _prepare(*flags):
  """Prepares with neumf-prepare's flags, parsed as it parses them."""
  return preparation.prepare(cli.parse_config(PrepareConfig, ["neumf-prepare", *flags]))


@pytest.fixture(scope="module")
def days(tmp_path_factory):
  """Day 0 prepared; day 1 prepared on it; day 1 prepared afresh (no base)."""
  tmp = tmp_path_factory.mktemp("days")
  paths = write_logs(tmp)
  out = {"paths": paths, "d0": str(tmp / "d0"), "d1": str(tmp / "d1"),
         "fresh": str(tmp / "fresh")}
  _prepare(*prepare_flags(paths, "day0", out["d0"]))
  _prepare(*prepare_flags(paths, "day1", out["d1"], f"--base_data_dir={out['d0']}"))
  _prepare(*prepare_flags(paths, "day1", out["fresh"]))
  return out


def _lines(data_dir, name):
  with open(os.path.join(data_dir, name), "rb") as f:
    return f.read()


def test_preparation_on_a_base_keeps_every_index_and_counts_old_new_and_absent(days):
  d0, d1 = days["d0"], days["d1"]
  for name in ("users.vocab", "items.vocab", "item_genre.vocab", "context_device.vocab"):
    old, new = _lines(d0, name), _lines(d1, name)
    assert new.startswith(old) and len(new) > len(old), name  # a byte-identical prefix
  users = open(os.path.join(d1, "users.vocab")).read().split()
  assert set(users[6:]) == {"u7", "u8"}
  assert "u6" in users  # absent from day 1, its row kept
  meta0 = artifacts.load_metadata(d0)
  meta = artifacts.load_metadata(d1)
  assert meta.lineage["base_fingerprint"] == meta0.vocabulary_fingerprint
  assert meta.lineage["ancestors"] == [meta0.vocabulary_fingerprint]
  assert meta.lineage["vocabularies"] == {
      "users": {"old": 6, "new": 2, "absent": 1},
      "items": {"old": 5, "new": 1, "absent": 0},
      "item:genre": {"old": 3, "new": 1, "absent": 0},
      "context:device": {"old": 2, "new": 1, "absent": 0}}
  assert meta.num_users == 8 and meta.num_items == 6
  # A numeric feature keeps the base's mean and deviation (prepared afresh, day 1's differ).
  price = {d: next(f for f in artifacts.load_metadata(days[d]).features if f["name"] == "price")
           for d in ("d0", "d1", "fresh")}
  assert (price["d1"]["mean"], price["d1"]["std"]) == (price["d0"]["mean"], price["d0"]["std"])
  assert price["fresh"]["mean"] > price["d0"]["mean"] + 5
  # The same log prepared afresh orders its vocabularies by frequency: other indices.
  fresh = open(os.path.join(days["fresh"], "users.vocab")).read().split()
  assert sorted(fresh) == sorted(set(users) - {"u6"})
  assert artifacts.load_metadata(days["fresh"]).lineage == {}


def test_a_chain_of_bases_records_every_ancestor(days, tmp_path):
  d2 = str(tmp_path / "d2")
  _prepare(*prepare_flags(days["paths"], "day1", d2, f"--base_data_dir={days['d1']}"))
  fingerprints = [artifacts.load_metadata(d).vocabulary_fingerprint
                  for d in (days["d0"], days["d1"], d2)]
  assert len(set(fingerprints)) == 2  # d2 adds nothing to d1: the same vocabularies
  assert fingerprints[1] == fingerprints[2]
  assert artifacts.load_metadata(d2).lineage["ancestors"] == fingerprints[1::-1]
  assert lineage.load(d2).fingerprint == fingerprints[2]  # recomputed from the files


def test_a_base_whose_feature_is_of_another_kind_or_that_is_the_output_is_refused(days,
                                                                                   tmp_path):
  flags = prepare_flags(days["paths"], "day1", str(tmp_path / "x"),
                        f"--base_data_dir={days['d0']}")
  flags = [f.replace("device:categorical", "device:multi_hot:|") for f in flags]
  with pytest.raises(ConfigError, match=r"context:device is categorical there and multi_hot "):
    _prepare(*flags)
  assert not os.path.exists(tmp_path / "x" / "metadata.json")
  with pytest.raises(ConfigError, match="--base_data_dir=.* is --output_dir"):
    PrepareConfig(output_dir=days["d0"], base_data_dir=days["d0"] + "/").validate()
  with pytest.raises(ConfigError, match="--base_data_dir='nowhere' is not a prepared"):
    _prepare(*prepare_flags(days["paths"], "day1", str(tmp_path / "y"),
                            "--base_data_dir=nowhere"))


# ----------------------------------------------------------------------------- warm start

_TRAIN = dict(model="mf", task="explicit", embedding_dim=8, optimizer="lazy_adam",
              learning_rate=0.02, batch_size=16, features="all", seed=1)


@pytest.fixture(scope="module")
def m0(days, tmp_path_factory):
  config = TrainConfig(data_dir=days["d0"], model_dir=str(tmp_path_factory.mktemp("m0")),
                       epochs=2, **_TRAIN)
  train.train_and_evaluate(config)
  return config


def _warm_config(days, m0, tmp_path, **changes):
  fields = dict(_TRAIN, data_dir=days["d1"], model_dir=str(tmp_path / "m1"), epochs=1,
                warm_start_from=m0.model_dir)
  fields.update(changes)
  return TrainConfig(**fields)


def _m0_state(m0):
  """M0's best model and optimizer, restored as a model of day 0 (independent of the warm
  start's reading of checkpoints by key)."""
  model, optimizer = built(m0)
  best = tf.train.latest_checkpoint(os.path.join(m0.resolved_checkpoint_dir, "best"))
  tf.train.Checkpoint(model=model, optimizer=optimizer).restore(best).assert_consumed()
  return weights_and_slots(model, optimizer), int(optimizer.iterations.numpy())


def test_a_warm_start_copies_old_rows_and_slots_and_starts_new_rows_fresh(days, m0, tmp_path):
  old, old_updates = _m0_state(m0)
  config = _warm_config(days, m0, tmp_path)
  model, optimizer = warm_started(config)
  new = weights_and_slots(model, optimizer)
  fresh = weights_and_slots(*built(config))  # what a run from scratch starts from
  assert int(optimizer.iterations.numpy()) == 0  # the step counter starts anew...
  assert int(optimizer.warm_start_steps.numpy()) == old_updates > 0  # ...Adam's t continues
  assert int(model.num_users) == 8 and int(model.num_items) == 6
  sizes = {"user": (6, 8), "item": (5, 6)}
  checked = set()
  for path, parts in new.items():
    side = next((s for s in sizes
                 if path.split("/")[0] in (f"{s}_embedding", f"{s}_bias")), None)
    if side is None and "features" not in path:
      for part in parts:  # global bias: copied as it is
        np.testing.assert_array_equal(parts[part], old[path][part], err_msg=path)
      checked.add(path)
      continue
    if side is None:
      continue
    n0, n1 = sizes[side]
    for part in ("value", "momentum", "velocity"):
      np.testing.assert_array_equal(parts[part][:n0], old[path][part][:n0], err_msg=path)
      np.testing.assert_array_equal(parts[part][n1], old[path][part][n0], err_msg=path)  # OOV
    np.testing.assert_array_equal(parts["value"][n0:n1], fresh[path]["value"][n0:n1])
    assert not np.array_equal(parts["value"][n0:n1], old[path]["value"][n0 - 1:n0 - 1])
    assert not parts["momentum"][n0:n1].any() and not parts["velocity"][n0:n1].any()
    assert old[path]["momentum"][:n0].any()  # M0's slots were not zeros to begin with
    checked.add(path)
  assert {"user_embedding/embeddings", "item_bias/embeddings", "mf/global_bias"} <= checked
  # Feature rows: genre's three values (and the missing row) kept, "doc" new; the same for
  # the context's device ("watch" new).
  for path, kept in (("item_features/embeddings", 4), ("context_features/embeddings", 3)):
    np.testing.assert_array_equal(new[path]["value"][:kept], old[path]["value"][:kept])
    np.testing.assert_array_equal(new[path]["momentum"][:kept], old[path]["momentum"][:kept])
    assert new[path]["value"].shape[0] == kept + 1
    np.testing.assert_array_equal(new[path]["value"][kept:], fresh[path]["value"][kept:])
    assert not new[path]["momentum"][kept:].any()
  np.testing.assert_array_equal(new["context_features/numeric_projection"]["value"],
                                old["context_features/numeric_projection"]["value"])
  # New rows follow --seed: the same seed gives the same rows, another seed others.
  again = weights_and_slots(*warm_started(config))
  assert digest(again) == digest(new)
  other = weights_and_slots(*warm_started(dataclasses.replace(config, seed=2)))
  assert not np.array_equal(other["user_embedding/embeddings"]["value"][6:8],
                            new["user_embedding/embeddings"]["value"][6:8])
  np.testing.assert_array_equal(other["user_embedding/embeddings"]["value"][:6],
                                new["user_embedding/embeddings"]["value"][:6])


def test_two_replicas_warm_start_as_one_device(days, m0, tmp_path, mirrored_strategy):
  config = _warm_config(days, m0, tmp_path)
  one = digest(weights_and_slots(*warm_started(config)))
  two = digest(weights_and_slots(*warm_started(config, mirrored_strategy)))
  assert one == two


@pytest.mark.parametrize("changes, message", [
    (dict(model="gmf"), r"another model \(model='mf' there, 'gmf' here"),
    (dict(embedding_dim=16), r"embedding_dim=8 there, 16 here"),
    (dict(history=3), r"history=0 there, 3 here"),
    (dict(features="none"), r"trained with features context:device \(categorical\), "
                            r"context:price \(numeric\), item:genre \(categorical\), this run "
                            r"has none"),
])
def test_a_model_that_cannot_be_mapped_is_refused_before_any_work(days, m0, tmp_path, changes,
                                                                  message):
  config = _warm_config(days, m0, tmp_path, **changes)
  with pytest.raises(ConfigError, match=message):
    train.train_and_evaluate(config)
  assert not os.path.exists(os.path.join(config.model_dir, "checkpoints"))


def test_data_not_prepared_on_the_models_data_is_refused(days, m0, tmp_path):
  config = _warm_config(days, m0, tmp_path, data_dir=days["fresh"])
  with pytest.raises(ConfigError, match=r"was not prepared on it: prepare the new log with "
                                        r"neumf-prepare --base_data_dir="):
    train.train_and_evaluate(config)
  with pytest.raises(ConfigError, match=r"--warm_start_from=.*d0: .* holds no config.json"):
    train.train_and_evaluate(_warm_config(days, m0, tmp_path, warm_start_from=days["d0"]))
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  (untrained / "config.json").write_text(dataclasses.replace(
      m0, model_dir=str(untrained)).to_json())  # a run that saved no checkpoint yet
  with pytest.raises(ConfigError, match=r"no checkpoint in .*untrained/checkpoints/best"):
    train.train_and_evaluate(_warm_config(days, m0, tmp_path, warm_start_from=str(untrained)))


_SERVE = """
import json, sys
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
score = loaded.signatures["serving_default"]
users, items = ["u7", "nobody", "u1", "u1"], ["i1", "i1", "i6", "unknown"]
ranked = loaded.signatures["recommend"](user=tf.constant(["u7", "u8"]), k=tf.constant(6))
print(json.dumps({"rating": score(user=tf.constant(users), item=tf.constant(items))[
    "rating"].numpy().tolist(), "items": ranked["items"].numpy().astype(str).tolist()}))
"""


def test_the_export_of_a_warm_started_run_serves_the_new_ids(days, m0, tmp_path):
  config = _warm_config(days, m0, tmp_path, epochs=2)
  result = train.train_and_evaluate(config)
  assert result["warm_start"]["tables"]["user_embedding/embeddings"] == {"rows": 9,
                                                                         "copied": 7}
  done = subprocess.run([sys.executable, "-c", _SERVE, config.resolved_export_dir],
                        capture_output=True, text=True, check=True,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  served = json.loads(done.stdout.strip().splitlines()[-1])
  new_user, unknown_user, new_item, unknown_item = served["rating"]
  assert new_user != unknown_user  # u7 has a row of its own, not the out-of-vocabulary one
  assert new_item != unknown_item
  catalogue = set(artifacts.PreparedData(days["d1"]).vocabularies()[1])
  assert all(items and set(items) <= catalogue for items in served["items"])


# ----------------------------------------------------------------------------- slow: clusters


@pytest.mark.slow
def test_a_warm_start_into_two_and_three_ps_shards_equals_one_device(days, m0, tmp_path):
  from parameter_server_test import local_cluster, start_tasks
  config = _warm_config(days, m0, tmp_path)
  one = digest(weights_and_slots(*warm_started(config)))
  for shards in (2, 3):
    cluster = local_cluster(1, shards)
    servers = start_tasks(cluster, ("ps", "worker"), config.data_dir,
                          str(tmp_path / f"servers{shards}"), ())
    try:
      done = subprocess.run(
          [sys.executable, os.path.join(REPO_ROOT, "tests", "warm_helpers.py"),
           json.dumps(cluster), config.to_json(), str(shards)], cwd=REPO_ROOT,
          capture_output=True, text=True, timeout=300,
          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.path.join(REPO_ROOT, "tests")])))
    finally:
      for p in servers:
        p.kill()
        p.wait()
    assert done.returncode == 0, done.stderr[-4000:]
    sharded = last_json_line(done.stdout)
    assert len(sharded["shards"]) == shards
    assert sharded["digest"] == one


@pytest.mark.slow
def test_a_killed_warm_started_run_resumes_exactly(tmp_path):
  from resumable import Run, train_command
  d0, d1 = str(tmp_path / "d0"), str(tmp_path / "d1")
  data = ("--source=synthetic", "--num_items=500", "--num_shards=2", "--eval_fraction=0.02")
  run_cli("trainer.prepare", f"--output_dir={d0}", *data, "--num_users=2000",
          "--num_ratings=8000", "--seed=11")
  run_cli("trainer.prepare", f"--output_dir={d1}", *data, f"--base_data_dir={d0}",
          "--num_users=2400", "--num_ratings=10000", "--seed=12")
  run_cli("trainer.task", *train_command(d0, str(tmp_path / "m0"))[3:], "--epochs=1")
  warm = (f"--warm_start_from={tmp_path / 'm0'}", "--epochs=1")
  reference = last_json_line(run_cli("trainer.task", *train_command(
      d1, str(tmp_path / "reference"))[3:], *warm).stdout)
  command = train_command(d1, str(tmp_path / "model"), *warm)
  run = Run(command, str(tmp_path / "killed.log"))
  assert run.wait_for(lambda: " step 10/" in run.log()), run.log()[-3000:]
  run.kill()
  final = Run(command, str(tmp_path / "final.log"))
  result = final.finish()
  assert "Resumed from" in final.log() and "Warm start" not in final.log()
  assert result["weights_sha256"] == reference["weights_sha256"]
  assert result["eval_hr_full"] == reference["eval_hr_full"]
