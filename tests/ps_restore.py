"""Run as a chief process: restores a run's best checkpoint into a parameter-server cluster's
sharded model (`--ps_shards` shards) and prints the shards and some scores as JSON.

  python tests/ps_restore.py CLUSTER_JSON MODEL_DIR DATA_DIR SHARDS
"""

import json
import sys

import numpy as np
import tensorflow as tf

from trainer import loop, models, parameter_server, run_dir
from trainer.data import artifacts

USERS, ITEMS = [0, 5, 17, 99, 1], [3, 0, 19, 42, 7]


def main(cluster_json: str, model_dir: str, data_dir: str, shards: str) -> None:
  cluster = {"cluster": json.loads(cluster_json), "task": {"type": "chief", "index": 0}}
  strategy = parameter_server.make_strategy(cluster, shards=int(shards))
  config = run_dir.load_config(model_dir)
  with strategy.scope():
    model = models.for_config(config, artifacts.PreparedData(data_dir))
    model({"user": tf.constant([0]), "item": tf.constant([0])})
  best = tf.train.latest_checkpoint(f"{config.resolved_checkpoint_dir}/best")
  tf.train.Checkpoint(model=model).restore(best).assert_existing_objects_matched()
  table = model.get_layer("user_embedding").embeddings.value
  scores = model({"user": tf.constant(USERS), "item": tf.constant(ITEMS)})
  print(json.dumps({
      "shards": [[list(s.shape), s.device] for s in table.variables],
      "scores": np.asarray(scores, np.float64).tolist(),
      "sha256": loop.weights_checksum(model)}))


if __name__ == "__main__":
  main(*sys.argv[1:])
