"""Multi-replica training on two logical CPUs equals training on one device."""

import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TaskStrategy
from trainer import distribute, loop, models, objectives, optimizers, schema
from trainer.config import ConfigError, TrainConfig
from trainer.data import artifacts

GLOBAL_BATCH = 64
STEPS = 6


def _data():
  rng = np.random.default_rng(0)
  n = GLOBAL_BATCH * STEPS
  users = rng.integers(0, 20, n)
  items = rng.integers(0, 15, n)
  items[::4] = users[::4] % 15  # each group of 1 + 3 starts with a learnable positive (BPR)
  return {schema.USER: users, schema.ITEM: items,
          schema.RATING: (1.0 + users % 5).astype("float32"),  # learnable from the user
          schema.LABEL: (users % 2).astype("float32"),
          # Context (read by the *_context models): an index, a number and a list per example.
          "context_hour": rng.integers(0, 5, n), "context_price": rng.normal(size=n),
          "context_tags": rng.integers(0, 4, (n, 2))}


CONTEXT = [schema.FeatureInfo("context", "hour", "bucketized", 5),
           schema.FeatureInfo("context", "price", "numeric"),
           schema.FeatureInfo("context", "tags", "multi_hot", 4, width=2)]


def _interactions():
  """autorec's table: the first quarter of `_data()`'s pairs (once each) and their ratings, so
  each replica's batch reads its own set of the encoder's rows."""
  data = _data()
  pairs = {}
  for u, i, r in zip(data[schema.USER][:GLOBAL_BATCH * STEPS // 4],
                     data[schema.ITEM][:GLOBAL_BATCH * STEPS // 4], data[schema.RATING]):
    pairs.setdefault((int(i), int(u)), float(r))
  items, users = (np.array(c) for c in zip(*pairs))
  return artifacts.sparse_rows(items, users, list(pairs.values()), 15)


def _positives():
  """mf_history's training positives: `_data()`'s first quarter of pairs, in time by row, so
  some examples are training pairs (a history before them) and some are not (all of it)."""
  data = _data()
  first = {}
  for row, (u, i) in enumerate(zip(data[schema.USER][:GLOBAL_BATCH * STEPS // 4],
                                   data[schema.ITEM][:GLOBAL_BATCH * STEPS // 4])):
    first.setdefault((int(u), int(i)), row)
  pairs = sorted(first)
  users = np.array([u for u, _ in pairs])
  rank = np.empty(len(pairs), np.int64)
  for u in set(users.tolist()):
    mine = np.flatnonzero(users == u)
    rank[mine[np.argsort([first[pairs[k]] for k in mine])]] = np.arange(len(mine))
  return {"indptr": np.concatenate([[0], np.cumsum(np.bincount(users, minlength=20))]),
          "indices": np.array([i for _, i in pairs]), "time_rank": rank}


def _objective(task: str) -> objectives.Objective:
  # 3 negatives: a BPR batch is groups of 1 + 3 (the layout matters to it, not to the others).
  return objectives.for_config(TrainConfig(data_dir="unused", model_dir="unused", task=task,
                                           num_negatives=3, batch_size=GLOBAL_BATCH))


def _train(strategy, name="seed_mlp", task="explicit", optimizer="adam"):
  keras.utils.set_random_seed(0)
  history = dict(history=3, positives=_positives()) if name == "mf_history" else {}
  if name.endswith("_context"):
    history["context"] = CONTEXT
  with strategy.scope():
    model = models.build_model(name.replace("_history", "").replace("_context", ""), 20, 15,
                               embedding_dim=8,
                               hidden_units=16, rating_mean=3.0, layers=(8, 4),
                               mlp_embedding_dim=4, l2=0.001, interactions=_interactions(),
                               **history)
    opt = optimizers.make_optimizer(optimizer, 0.01)
    opt.build(model.trainable_variables)
  model.initial_weights = [w.numpy().copy() for w in model.weights]
  data = _data()
  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: tf.data.Dataset.from_tensor_slices(data).batch(
          ctx.get_per_replica_batch_size(GLOBAL_BATCH), drop_remainder=True))
  iterator = iter(dataset)
  train_loop = loop.make_train_loop(model, opt, strategy, GLOBAL_BATCH, _objective(task))
  losses = [float(train_loop(iterator, tf.constant(1), tf.constant(0))[0]) for _ in range(STEPS)]
  return losses, model


@pytest.mark.parametrize("name,task,optimizer", [
    ("seed_mlp", "explicit", "adam"),
    ("gmf", "implicit", "adam"),
    ("mlp", "implicit", "adagrad"),
    ("neumf", "implicit", "lazy_adam"),
    ("mf", "explicit", "lazy_adam"),
    ("mf", "implicit", "sgd"),
    ("gmf", "implicit_bpr", "adagrad"),  # (Adam would scale the bias's ~0 gradient up to noise)
    ("autorec", "explicit", "lazy_adam"),
    ("autorec", "implicit", "lazy_adam"),
    ("autorec", "explicit", "adam"),
    ("mf_history", "implicit_softmax", "sgd"),  # (the softmax leaves b_u ~0 gradient: as BPR)
    ("mf_history", "implicit", "adam"),
    ("neumf_context", "implicit", "lazy_adam"),
    ("mf_context", "implicit_softmax", "sgd"),  # (as mf_history: b_u and its context part ~0)
    ("seed_mlp_context", "explicit", "adam"),
    ("autorec_context", "explicit", "lazy_adam"),
])
def test_two_replicas_match_one_device(mirrored_strategy, name, task, optimizer):
  one_losses, one = _train(tf.distribute.OneDeviceStrategy("/cpu:0"), name, task, optimizer)
  mirrored = mirrored_strategy
  assert mirrored.num_replicas_in_sync == 2
  two_losses, two = _train(mirrored, name, task, optimizer)
  np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
  # It trained: every embedding table moved (the losses of 6 steps on 6 different batches of
  # a barely trained model need not fall; BPR's output bias gets no gradient).
  moved = {w.path: np.abs(w.numpy() - w0).max() for w, w0 in zip(one.weights,
                                                                  one.initial_weights)}
  # (A softmax over the catalogue is blind to b_u: its gradient is 0.)
  tables = [path for path in moved if "embedding" in path
            and not (task == "implicit_softmax" and path.startswith("user_bias"))]
  assert tables and all(moved[path] > 1e-7 for path in tables), moved
  for a, b in zip(one.weights, two.weights):
    replicas = mirrored.experimental_local_results(b.value)
    assert len(replicas) == 2
    np.testing.assert_array_equal(replicas[0].numpy(), replicas[1].numpy())
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6, err_msg=b.path)


def _whole_reads(graph_def):
  """GatherV2 nodes fed by a ReadVariableOp in the traced functions: a read of a whole
  variable (a table or an optimizer slot) before taking rows."""
  found = []
  for function in graph_def.library.function:
    reads = {node.name for node in function.node_def if node.op == "ReadVariableOp"}
    for node in function.node_def:
      if node.op == "GatherV2" and node.input[0].split(":")[0] in reads:
        found.append(f"{function.signature.name}/{node.name}")
  return found


@pytest.mark.parametrize("name", ["neumf", "mf", "mf_history"])
def test_replicas_gather_rows_not_whole_tables(mirrored_strategy, name):
  """Under MirroredStrategy, tf.gather on a distributed variable reads the whole table first;
  the model's lookups and lazy Adam's row updates must gather from the local copy
  (ResourceGather) instead."""
  strategy = mirrored_strategy
  with strategy.scope():
    model = models.build_model(name.replace("_history", ""), 20, 15, embedding_dim=8,
                               layers=(8, 4), mlp_embedding_dim=4,
                               **(dict(history=3, positives=_positives())
                                  if name == "mf_history" else {}))
    opt = optimizers.make_optimizer("lazy_adam", 0.01)
    opt.build(model.trainable_variables)
  model.initial_weights = [w.numpy().copy() for w in model.weights]
  data = _data()
  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: tf.data.Dataset.from_tensor_slices(data).batch(
          ctx.get_per_replica_batch_size(GLOBAL_BATCH), drop_remainder=True).repeat())
  train_loop = loop.make_train_loop(model, opt, strategy, GLOBAL_BATCH,
                                     _objective("implicit"))
  iterator = iter(dataset)
  train_loop(iterator, tf.constant(1), tf.constant(0))
  graph_def = train_loop.get_concrete_function(
      iterator, tf.constant(1), tf.constant(0)).graph.as_graph_def()
  ops = {node.op for f in graph_def.library.function for node in f.node_def}
  assert "ResourceGather" in ops
  assert _whole_reads(graph_def) == []


@pytest.mark.parametrize("name,devices,replicas,kind", [
    ("auto", 1, 1, "_DefaultDistributionStrategy"),
    ("auto", 2, 2, "MirroredStrategy"),
    ("mirrored", 2, 2, "MirroredStrategy"),
    ("default", 1, 1, "_DefaultDistributionStrategy"),
])
def test_strategy_selection(name, devices, replicas, kind):
  # Only created, never run: see the `mirrored_strategy` fixture.
  strategy = distribute.get_strategy(name, devices)
  assert strategy.num_replicas_in_sync == replicas
  assert type(strategy).__name__ == kind


def test_configuring_devices_after_start_up_fails_clearly():
  tf.constant(1.0)  # TensorFlow is initialised with the tests' two CPU devices
  distribute.configure_cpu_devices(2)  # the same count: nothing to do
  with pytest.raises(RuntimeError, match="--num_cpu_devices=3: TensorFlow already started"):
    distribute.configure_cpu_devices(3)


_KUBEFLOW = {"cluster": {"chief": ["c:2222"], "worker": ["w0:2222", "w1:2222"]},
             "task": {"type": "worker", "index": 1}}


def test_tf_config_as_kubeflow_sets_it():
  config = distribute.cluster_config({"TF_CONFIG": json.dumps(_KUBEFLOW)})
  assert config == _KUBEFLOW
  assert distribute.num_cluster_tasks(config) == 3
  assert distribute.cluster_config({}) is None
  assert distribute.num_cluster_tasks(None) == 1


def test_vertex_cluster_spec_translates_to_chief_and_workers():
  spec = {"cluster": {"workerpool0": ["cmle-training-workerpool0-1:2222"],
                      "workerpool1": ["w-1:2222", "w-2:2222"]},
          "environment": "cloud", "task": {"type": "workerpool1", "index": 0, "trial": ""},
          "job": "{}"}
  config = distribute.cluster_config({"CLUSTER_SPEC": json.dumps(spec)})
  assert config == {"cluster": {"chief": ["cmle-training-workerpool0-1:2222"],
                                "worker": ["w-1:2222", "w-2:2222"]},
                    "task": {"type": "worker", "index": 0}}
  # TF_CONFIG wins when both are set.
  both = distribute.cluster_config({"CLUSTER_SPEC": json.dumps(spec),
                                    "TF_CONFIG": json.dumps(_KUBEFLOW)})
  assert both == _KUBEFLOW


@pytest.mark.parametrize("name,value,message", [
    ("TF_CONFIG", "{", "TF_CONFIG is not valid JSON"),
    ("TF_CONFIG", '{"task": {"type": "worker", "index": 0}}', "TF_CONFIG has no 'cluster'"),
    ("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG has no 'task'"),
    ("TF_CONFIG", '{"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}',
     "cluster['worker'] must be a list of 'host:port'"),
    ("TF_CONFIG", '{"cluster": {"boss": ["a:1"]}, "task": {"type": "boss", "index": 0}}',
     "cluster task type 'boss' is not one of"),
    ("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}',
     "task type 'chief' is not in the cluster"),
    ("TF_CONFIG", '{"cluster": {"worker": ["a:1"], "ps": ["p:1"]}, '
     '"task": {"type": "worker", "index": 0}}', "lists 'ps' tasks but no chief task"),
    ("CLUSTER_SPEC", '{"cluster": {"workerpool7": ["a:1"]}}', "unknown worker pools"),
])
def test_malformed_cluster_descriptions_name_the_variable(name, value, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    distribute.cluster_config({name: value})


@pytest.mark.parametrize("task_type,task_id,cluster,chief", [
    ("chief", 0, {"chief": ["c:1"], "worker": ["w:1"]}, True),
    ("worker", 0, {"chief": ["c:1"], "worker": ["w:1"]}, False),
    ("worker", 0, {"worker": ["w:1", "v:1"]}, True),
    ("worker", 1, {"worker": ["w:1", "v:1"]}, False),
])
def test_chief_and_write_dirs(task_type, task_id, cluster, chief, tmp_path):
  strategy = TaskStrategy(task_type, task_id, cluster)
  assert distribute.is_chief(strategy) is chief
  path = str(tmp_path / "export")
  written = distribute.write_dir(path, strategy)
  assert (written == path) is chief
  if not chief:
    assert written.endswith(f".workertemp_{task_type}_{task_id}")
    os.makedirs(written)
    distribute.remove_write_dir(written, strategy)
    assert not os.path.exists(written)
  assert distribute.is_chief(tf.distribute.get_strategy())
