"""Reads epochs of `pipeline.served_epoch` through a real tf.data service (a dispatcher and
two data workers in this process) with two consumers sharing each epoch's job, as two
training workers do, and prints JSON: what each consumer got. Run as a subprocess: the
servers' shutdown may crash the process that ran them (tensorflow/tensorflow#113163).

  python tests/served_epoch_check.py DATA_DIR NUM_NEGATIVES EPOCHS
"""

import json
import sys

import numpy as np
import tensorflow as tf

from trainer import schema
from trainer.data import artifacts, pipeline


def main(data_dir: str, num_negatives: int, epochs: int) -> None:
  service = tf.data.experimental.service
  dispatcher = service.DispatchServer(service.DispatcherConfig(port=0))
  address = dispatcher.target.split("://")[1]
  servers = [service.WorkerServer(service.WorkerConfig(
      dispatcher_address=address, worker_address="127.0.0.1:%port%")) for _ in range(2)]
  data = artifacts.PreparedData(data_dir)
  add = (pipeline.negative_sampler(data.metadata.num_items, num_negatives, seed=5)
         if num_negatives else None)
  result = []
  for epoch in range(epochs):
    ds = pipeline.served_epoch(data.train_pattern, epoch, 64, seed=5, shuffle_buffer_blocks=8,
                               add_negatives=add)
    dataset_id = service.register_dataset(dispatcher.target, ds, dataset_id=f"e{epoch}")
    consumers = [iter(service.from_dataset_id(
        service.ShardingPolicy.DYNAMIC, dispatcher.target, dataset_id,
        element_spec=ds.element_spec, job_name=f"epoch{epoch}")) for _ in range(2)]
    got = [[] for _ in consumers]
    live = list(range(len(consumers)))
    while live:  # the consumers take turns, as free workers do
      for c in list(live):
        batch = next(consumers[c], None)
        if batch is None:
          live.remove(c)
          continue
        batch = {k: v.numpy() for k, v in batch.items()}
        positive = (batch[schema.LABEL] == 1) if add else np.ones(len(batch[schema.USER]), bool)
        got[c].append({"user": batch[schema.USER][positive].tolist(),
                       "item": batch[schema.ITEM][positive].tolist(),
                       "rating": batch[schema.RATING][positive].tolist(),
                       "size": len(batch[schema.USER])})
    result.append(got)
  print(json.dumps(result))
  sys.stdout.flush()


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
