"""What the warm-start tests share: a hand-made pair of logs, a model built as training builds it,
and its weights and optimizer slots read whole (sharded or not).

Also run as a chief process (tests/continuous_test.py's parameter-server test): warm-starts a
model in a parameter-server cluster (`--ps_shards` shards) and prints a digest per weight.

  python tests/warm_helpers.py CLUSTER_JSON CONFIG_JSON SHARDS
"""

import hashlib
import json
import sys
from typing import Dict

import keras
import numpy as np
import tensorflow as tf

from trainer import models, optimizers, parameter_server, warm_start
from trainer.config import TrainConfig
from trainer.data import artifacts

# Day 0: users u1-u6, items i1-i5. Day 1: u6 is gone, u7 and u8 come, item i6 appears; the
# context value "watch" and the genre "doc" are new, and the new rows' prices are higher.
_DAY0 = [(u, i, 1 + (u * 3 + i) % 5, 1000 + 10 * u + i, "tv" if (u + i) % 2 else "phone")
         for u in range(1, 7) for i in range(1, 6)]
_DAY1 = ([row for row in _DAY0 if row[0] != 6]
         + [(u, i, 1 + (u + i) % 5, 5000 + 10 * u + i, "watch" if i == 6 else "tv")
            for u in (7, 8, 2) for i in (1, 3, 6)])
GENRES = {1: "drama", 2: "comedy", 3: "drama", 4: "action", 5: "comedy", 6: "doc"}


def write_logs(directory) -> Dict[str, str]:
  """Writes day 0's and day 1's logs and the item genres; returns their paths."""
  paths = {}
  for name, rows in (("day0", _DAY0), ("day1", _DAY1)):
    paths[name] = str(directory / f"{name}.csv")
    with open(paths[name], "w") as f:
      f.write("user,item,rating,ts,device,price\n")
      f.writelines(f"u{u},i{i},{r},{t},{d},{t % 7 + (50 if t > 5000 else 0)}\n"
                   for u, i, r, t, d in rows)
  paths["items"] = str(directory / "items.csv")
  with open(paths["items"], "w") as f:
    f.write("item,genre\n")
    f.writelines(f"i{i},{g}\n" for i, g in GENRES.items())
  return paths


def prepare_flags(paths, log: str, output_dir: str, *extra: str) -> list:
  return ["--source=csv", f"--input={paths[log]}", "--user_column=user", "--item_column=item",
          "--rating_column=rating", "--timestamp_column=ts",
          "--context_columns=device:categorical,price:numeric",
          f"--item_features={paths['items']}", "--item_id_column=item",
          "--item_feature_columns=genre:categorical", "--eval_fraction=0.3", "--seed=3",
          "--duplicates=keep_latest",
          f"--output_dir={output_dir}", *extra]


def built(config: TrainConfig, strategy=None):
  """(model, optimizer) as training builds them: seeded, under the strategy's scope."""
  strategy = strategy or tf.distribute.get_strategy()
  data = artifacts.PreparedData(config.data_dir)
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    model = models.for_config(config, data)
    optimizer = optimizers.make_optimizer(config.optimizer, config.learning_rate)
    optimizer.build(parameter_server.trainable_leaves(model.trainable_variables)
                    if parameter_server.is_parameter_server(strategy)
                    else model.trainable_variables)
  return model, optimizer


def warm_started(config: TrainConfig, strategy=None):
  """(model, optimizer) built and warm-started as `neumf-train --warm_start_from` does."""
  model, optimizer = built(config, strategy)
  data = artifacts.PreparedData(config.data_dir)
  warm_start.apply(warm_start.check(config, data), data, model, optimizer)
  return model, optimizer


def whole(variable) -> np.ndarray:
  value = getattr(variable, "value", variable)
  if parameter_server.is_sharded(value):
    return np.concatenate([v.numpy() for v in value.variables])
  return np.asarray(variable.numpy())


def weights_and_slots(model, optimizer) -> Dict[str, Dict[str, np.ndarray]]:
  """{weight path: {value, momentum, velocity}}, each whole (a sharded one's shards joined)."""
  out = {}
  for variable in model.trainable_weights:
    value = getattr(variable, "value", variable)
    leaves = value.variables if parameter_server.is_sharded(value) else [variable]
    slots = {}
    index = optimizer._get_variable_index  # pylint: disable=protected-access
    for name, slot_list in (("momentum", optimizer._momentums),  # pylint: disable=protected-access
                            ("velocity", optimizer._velocities)):  # pylint: disable=protected-access
      parts = [np.asarray(slot_list[index(leaf)].numpy()) for leaf in leaves]
      slots[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
    out[variable.path] = {"value": whole(variable), **slots}
  return out


def digest(state: Dict[str, Dict[str, np.ndarray]]) -> Dict[str, str]:
  return {f"{path}:{part}": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
          for path, parts in sorted(state.items()) for part, array in sorted(parts.items())}


def main(cluster_json: str, config_json: str, shards: str) -> None:
  cluster = {"cluster": json.loads(cluster_json), "task": {"type": "chief", "index": 0}}
  strategy = parameter_server.make_strategy(cluster, shards=int(shards))
  fields = json.loads(config_json)
  fields["layers"] = tuple(fields["layers"])
  model, optimizer = warm_started(TrainConfig(**fields), strategy)
  table = model.get_layer("user_embedding").embeddings.value
  print(json.dumps({"shards": [list(s.shape) for s in table.variables],
                    "digest": digest(weights_and_slots(model, optimizer))}))


if __name__ == "__main__":
  main(*sys.argv[1:])
