"""Command line of training: `python -m trainer.task` (installed as `neumf-train`).

Parses flags (`TrainConfig`'s fields, `trainer.cli`), builds a frozen `TrainConfig`, sets
the process's malloc for training, configures devices, picks a strategy and calls
`trainer.train.train_and_evaluate`. The only module that reads these flags. Exit codes come
from the error's type (`trainer.errors`): 2 for a bad flag or input, 3 for a run that
diverged, 131 when another task of the cluster was lost, 132 when storage stayed unreachable.
"""

import os
import sys

from absl import app, flags, logging  # noqa: E402

from trainer import config as config_lib  # noqa: E402
from trainer import cli, errors, malloc, quiet, strict_json  # noqa: E402


_SERVING = []  # servers of this process (each serves while referenced)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cluster = None
  try:
    config = cli.config_from(config_lib.TrainConfig, flags.FLAGS)
    quiet.import_tensorflow(flags.FLAGS.verbosity)  # here, after the flags' checks
    from trainer import distribute
    cluster = distribute.cluster_config()
    role = cluster["task"]["type"] if cluster else None
    # A ps task holds tables: freed memory goes back (malloc.py); a process that trains keeps
    # it for the next step's tensors.
    malloc.return_freed_memory() if role == "ps" else malloc.keep_freed_memory()
    parameter_servers = distribute.uses_parameter_servers(config.strategy, cluster)
    if parameter_servers and role in ("ps", "worker"):
      from trainer import parameter_server
      parameter_server.serve(cluster, _data_worker(config, cluster))  # until stopped
      return
    if parameter_servers and config.input_service:  # before the workers wait for it
      from trainer import input_service
      _SERVING.append(input_service.start_dispatcher(config.model_dir,
                                                     config.input_service_port))
    distribute.configure_cpu_devices(config.num_cpu_devices)
    # The strategy comes first: MultiWorkerMirroredStrategy must exist before other ops run.
    strategy = distribute.get_strategy(config.strategy, config.num_cpu_devices,
                                       ps_shards=config.ps_shards,
                                       ps_shard_min_mb=config.ps_shard_min_mb)
    from trainer import train
    metrics = train.train_and_evaluate(config, strategy)
  except errors.TrainerError as e:  # the exit code comes with the error's type
    retry = e.exit_code >= 128  # a restart may cure it: say how training resumes
    # A parameter-server chief exits at once: the coordinator's clean-up waits on the tasks,
    # and on a lost one it never returns.
    _fail(f"{e}. {errors.RESUME_HINT}" if retry else str(e), e.exit_code,
          now="ps" in ((cluster or {}).get("cluster") or {}))
  print(strict_json.dumps(metrics, sort_keys=True))


def _data_worker(config: config_lib.TrainConfig, cluster):
  """What a worker task of a parameter-server cluster runs beside its server: a data worker
  of the chief's dispatcher with --input_service (unless --data_workers tasks do), or none."""
  if not config.input_service or config.data_workers:
    return None
  from trainer import input_service
  dispatcher = input_service.dispatcher_address(cluster, config.input_service_port)
  return lambda host: input_service.start_data_worker(dispatcher, host, config.data_worker_port)


def _fail(message: str, exit_code: int, now: bool = False) -> None:
  logging.error("%s", message)
  print(f"neumf-train: error: {message}", file=sys.stderr)
  if now:
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)  # pylint: disable=protected-access
  sys.exit(exit_code)


def run():
  """Console-script entry point."""
  cli.run(main, "neumf-train", config_lib.TrainConfig)


if __name__ == "__main__":
  run()
