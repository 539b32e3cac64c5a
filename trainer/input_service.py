"""Input for parameter-server workers from TensorFlow's tf.data service (`--input_service`).

Without it every worker reads, parses and samples negatives for every example and keeps every
W-th batch (`parameter_server`): W times the input work the cluster needs. With it:

- the chief runs the dispatcher (`start_dispatcher`), in fault-tolerant mode with its journal
  under the model directory (`<model_dir>/input_service`, `gs://` allowed), at
  `<chief host>:--input_service_port`;
- each worker task (or, with `--data_workers=K`, each of K data-only tasks:
  `neumf-data-worker`) runs a data worker (`start_data_worker`) that produces batches;
- each epoch, the chief registers that epoch's dataset once (`served_epoch`, one
  `dataset_id` per run and epoch) and every training worker consumes it as one shared job
  (`job_name` per epoch), with DYNAMIC sharding: the dispatcher hands out the training files
  one by one, each to one data worker, so every example is read, parsed and sampled once.

Semantics (tested in tests/input_service_test.py; measured with TensorFlow 2.21):

- Without failures each training example is trained exactly once per epoch: the chief counts
  the positives of every batch a step trained and ends the epoch when the count reaches the
  training set's size; it is logged, and in metrics.json (`input_service.examples_per_epoch`,
  `missed`). Evaluation stays on the chief: each eval example once.
- Nothing is ever repeated (DYNAMIC sharding), but a lost data worker costs more than its own
  files: once one comes back (it must: until then the epoch cannot end, the job waiting for
  its task), the dispatcher may end the epoch's job early, up to the rest of the epoch
  missed. Restarting at its address only after the dispatcher has dropped it
  (`_REGISTER_AFTER_S`) avoids the worst of it. The next epochs are whole. A training worker
  that dies loses the batch its step had pulled (the coordinator runs the step again
  elsewhere, on another batch), and, with it, its data worker unless `--data_workers` tasks
  serve. The epoch then ends when a round of steps finds the job exhausted; the count says
  how many examples were missed.
- The chief resumes mid-epoch: the restarted dispatcher reads its journal (the epoch's job
  and the files already handed out), the chief restores its latest checkpoint (with the
  epoch's count so far) and goes on consuming the same job. What was trained after that
  checkpoint, and what the lost chief's consumers held, is missed.
- What is reproducible: each epoch's file order is keyed by (seed, epoch), the mixing of
  examples within parsed groups and each batch's negatives by (seed, epoch, the batch's own
  examples), never by which worker made it or when. What is not: which data worker reads
  which file, so which examples share a batch, and the order of the batches, vary from run to
  run (today's per-worker reading fixes both; with one worker it equals one device).
"""

import argparse
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from trainer import fileio

JOURNAL_SUBDIR = "input_service"
# A data worker unheard of for this long is dropped by the dispatcher. TensorFlow's defaults
# (a heartbeat every 30 s, a check every 10 minutes, a timeout of an hour) would leave an
# epoch stalled that long.
_WORKER_TIMEOUT_MS = 5_000
_HEARTBEAT_MS = 1_000
_CHECK_MS = 1_000
# Measured with TensorFlow 2.21 (README, "Input for many workers"): a data worker that came
# back at its address before the dispatcher had dropped it ended the epoch's job early both
# times (over 80% of the epoch missed); after it, once 10% and once 85%. So a data worker
# waits out the timeout before it registers, on its first start too (it cannot tell).
_REGISTER_AFTER_S = _WORKER_TIMEOUT_MS / 1000 + 2 * _CHECK_MS / 1000
_PROTOCOL = "grpc"


def dispatcher_address(cluster: Dict[str, Any], port: int) -> str:
  """`host:port` of the dispatcher: the chief's host in TF_CONFIG, at `port`."""
  host = cluster["cluster"]["chief"][0].rsplit(":", 1)[0]
  return f"{host}:{port}"


def start_dispatcher(model_dir: str, port: int) -> tf.data.experimental.service.DispatchServer:
  """Starts the fault-tolerant dispatcher, journaling under `<model_dir>/input_service`: a
  restarted chief's dispatcher resumes its jobs from there."""
  journal = fileio.join(model_dir, JOURNAL_SUBDIR)
  tf.io.gfile.makedirs(journal)
  server = tf.data.experimental.service.DispatchServer(
      tf.data.experimental.service.DispatcherConfig(
          port=port, protocol=_PROTOCOL, work_dir=journal, fault_tolerant_mode=True,
          worker_timeout_ms=_WORKER_TIMEOUT_MS, job_gc_check_interval_ms=_CHECK_MS))
  logging.info("tf.data service dispatcher at port %d, journal %s", port, journal)
  return server


def start_data_worker(dispatcher: str, host: str, port: int = 0,
                      wait: bool = True) -> tf.data.experimental.service.WorkerServer:
  """Starts a data worker of `dispatcher` (`host:port`), reachable by the trainers at `host`
  (port 0: any free port), after waiting out the dispatcher's worker timeout (`wait`)."""
  if wait:
    time.sleep(_REGISTER_AFTER_S)
  server = tf.data.experimental.service.WorkerServer(
      tf.data.experimental.service.WorkerConfig(
          dispatcher_address=dispatcher, worker_address=f"{host}:%port%", port=port,
          protocol=_PROTOCOL, heartbeat_interval_ms=_HEARTBEAT_MS))
  logging.info("tf.data service data worker of %s at %s:%s", dispatcher, host,
               port or "(any free port)")
  return server


class EpochFeed:
  """The chief's side: registers each epoch's dataset and makes the training workers' shared
  iterators over it.

  Args:
    service: the dispatcher's address (`grpc://host:port`).
    run_id: names this run's datasets and jobs (the same after a restart: the journal's
      jobs are found again).
    make_epoch: `make_epoch(epoch) -> tf.data.Dataset`, the epoch's served dataset.
  """

  def __init__(self, service: str, run_id: str, make_epoch: Callable[[int], tf.data.Dataset]):
    self.service, self.run_id, self.make_epoch = service, run_id, make_epoch

  def per_worker_iterators(self, coordinator, epoch: int):
    """An iterator per training worker over epoch `epoch`'s shared job."""
    dataset = self.make_epoch(epoch)
    name = f"{self.run_id}_epoch_{epoch}"
    dataset_id = tf.data.experimental.service.register_dataset(self.service, dataset,
                                                               dataset_id=name)
    spec, service = dataset.element_spec, self.service

    def per_worker():
      return tf.data.experimental.service.from_dataset_id(
          processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
          service=service, dataset_id=dataset_id, element_spec=spec, job_name=name)

    return iter(coordinator.create_per_worker_dataset(per_worker))


def run_id(model_dir: str) -> str:
  """A name for the run's datasets and jobs, the same on every restart of the run."""
  import hashlib
  return "run_" + hashlib.sha256(model_dir.rstrip("/").encode()).hexdigest()[:12]


def _parse_args(argv: Sequence[str]) -> Tuple[str, str, int]:
  parser = argparse.ArgumentParser(
      prog="neumf-data-worker",
      description="A data-only worker of a training cluster's tf.data service "
                  "(neumf-train --input_service --data_workers=K): produces training batches "
                  "for the chief's dispatcher until stopped.")
  parser.add_argument("--dispatcher", required=True,
                      help="the dispatcher, host:port (the chief's host, --input_service_port)")
  parser.add_argument("--host", required=True,
                      help="this task's host name or address, as the training workers reach it")
  parser.add_argument("--port", type=int, default=5051,
                      help="port to serve on (0: any free one; a fixed one lets a restarted "
                           "data worker take its place)")
  args = parser.parse_args(argv)
  if ":" not in args.dispatcher or not args.dispatcher.rsplit(":", 1)[1].isdigit():
    parser.error(f"--dispatcher={args.dispatcher!r} is not host:port")
  if not 0 <= args.port < 65536:
    parser.error(f"--port={args.port} is not a port number")
  return args.dispatcher, args.host, args.port


def main(argv: Optional[Sequence[str]] = None) -> None:
  dispatcher, host, port = _parse_args(sys.argv[1:] if argv is None else argv)
  logging.set_verbosity(logging.INFO)
  server = start_data_worker(dispatcher, host, port)
  server.join()


def run():
  """Console-script entry point (`neumf-data-worker`)."""
  main()


if __name__ == "__main__":
  run()
