"""Command line of training: `python -m trainer.task` (installed as `neumf-train`).

Parses flags, builds a frozen `TrainConfig`, sets the process's malloc for training,
configures devices, picks a strategy and calls `trainer.train.train_and_evaluate`. The only
module that reads these flags. Exit codes come from the error's type (`trainer.errors`): 2 for
a bad flag or input, 131 when another task of the cluster was lost, 132 when storage stayed
unreachable.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # before TensorFlow loads: hide C++ INFO

from absl import app, flags, logging  # noqa: E402

from trainer import config as config_lib  # noqa: E402
from trainer import cli, errors, malloc, strict_json  # noqa: E402

FLAGS = flags.FLAGS
_D = config_lib.TrainConfig  # defaults live in the dataclass
flags.DEFINE_string("data_dir", None, "Prepared data directory (local or gs://), the output of "
                    "neumf-prepare.")
flags.DEFINE_string("model_dir", os.environ.get("AIP_MODEL_DIR"),
                    "Where checkpoints, TensorBoard logs and metrics.json go (local or gs://). "
                    "Re-running with the same model_dir resumes. Default: $AIP_MODEL_DIR.")
flags.DEFINE_string("export_dir", None, "Where the SavedModel goes. Default: <model_dir>/export.")
flags.DEFINE_string("checkpoint_dir", os.environ.get("AIP_CHECKPOINT_DIR"),
                    "Where checkpoints go. Default: $AIP_CHECKPOINT_DIR, else "
                    "<model_dir>/checkpoints.")
flags.DEFINE_string("tensorboard_dir", os.environ.get("AIP_TENSORBOARD_LOG_DIR"),
                    "Where TensorBoard summaries go. Default: $AIP_TENSORBOARD_LOG_DIR, else "
                    "<model_dir>/logs.")
flags.DEFINE_enum("model", _D.model, config_lib.MODELS,
                  "seed_mlp: embeddings -> concat -> Dense(hidden_units) -> rating; gmf, mlp, "
                  "neumf: He et al. 2017; mf: dot product with biases (Rendle et al. 2020).")
flags.DEFINE_enum("task", _D.task, config_lib.TASKS,
                  "explicit: regress ratings (MSE; RMSE/MAE); implicit: classify observed pairs "
                  "against sampled negatives (cross-entropy; HR@K/NDCG@K); implicit_bpr: rank "
                  "each observed pair above its sampled negatives (BPR's pairwise logistic "
                  "loss; HR@K/NDCG@K); implicit_softmax: each observed pair's item against "
                  "the whole catalogue (softmax cross-entropy; mf, gmf; HR@K/NDCG@K).")
flags.DEFINE_integer("epochs", _D.epochs, "Passes over the training data.", lower_bound=1)
flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size, across all replicas; "
                     "implicit: positives plus their negatives. Default: "
                     f"{config_lib.DEFAULT_BATCH_SIZE}, rounded down to a multiple of the "
                     "replicas x (1 + --num_negatives) for tasks that sample negatives.",
                     lower_bound=1)
flags.DEFINE_integer("eval_batch_size", _D.eval_batch_size, "Global evaluation batch size.",
                     lower_bound=1)
flags.DEFINE_float("learning_rate", _D.learning_rate, "Peak learning rate.", lower_bound=0.0)
flags.DEFINE_enum("optimizer", _D.optimizer, config_lib.OPTIMIZERS,
                  "adam; lazy_adam (updates only the embedding rows of the batch: much faster "
                  "on large tables); adagrad; sgd.")
flags.DEFINE_integer("warmup_steps", _D.warmup_steps, "Linear learning-rate warm-up steps.",
                     lower_bound=0)
flags.DEFINE_enum("decay", _D.decay, config_lib.DECAYS,
                  "Learning-rate decay to zero at the last step after warm-up.")
flags.DEFINE_integer("embedding_dim", _D.embedding_dim,
                     "Embedding size (neumf: of the GMF path; mlp: of the MLP).", lower_bound=1)
flags.DEFINE_integer("hidden_units", _D.hidden_units, "Width of seed_mlp's hidden layer.",
                     lower_bound=1)
flags.DEFINE_list("layers", [str(n) for n in _D.layers], "MLP tower sizes (mlp, neumf).")
flags.DEFINE_integer("mlp_embedding_dim", _D.mlp_embedding_dim,
                     "neumf: embedding size of the MLP path.", lower_bound=1)
flags.DEFINE_float("dropout", _D.dropout, "Dropout after each MLP layer; autorec: the fraction "
                   "of training examples coded from their features alone.")
flags.DEFINE_enum("autorec_side", _D.autorec_side, config_lib.AUTOREC_SIDES,
                  "autorec: code items from their users' interactions (I-AutoRec) or users "
                  "from their items' (U-AutoRec).")
flags.DEFINE_integer("history", _D.history,
                     "mf: the user vector also sums this many of the user's latest training "
                     "items before the example (0: none); needs data prepared with their time "
                     "order.", lower_bound=0)
flags.DEFINE_float("l2", _D.l2, "L2 weight on the embedding rows of each batch.")
flags.DEFINE_integer("num_negatives", _D.num_negatives,
                     "implicit: sampled negatives per positive, redrawn every epoch.",
                     lower_bound=0)
flags.DEFINE_bool("exclude_positives", _D.exclude_positives,
                  "implicit: never sample a user's training positive as a negative.")
flags.DEFINE_integer("top_k", _D.top_k, "K of HR@K and NDCG@K.", lower_bound=1)
flags.DEFINE_string("features", _D.features, "Side features the model adds to its ID "
                    "embeddings: all (every feature the data directory holds), none (IDs only), "
                    "or a comma-separated list of names or side:name (e.g. item:genres,age).")
flags.DEFINE_string("pretrained_gmf_dir", None, "neumf: model_dir of a trained gmf run.")
flags.DEFINE_string("pretrained_mlp_dir", None, "neumf: model_dir of a trained mlp run.")
flags.DEFINE_float("alpha", _D.alpha, "neumf with pretraining: weight of the GMF output.")
flags.DEFINE_enum("mixed_precision", _D.mixed_precision, config_lib.PRECISIONS,
                  "Compute dtype: float32, or bfloat16/float16 with float32 variables "
                  "(float16 with loss scaling).")
flags.DEFINE_bool("jit_compile", _D.jit_compile, "Compile the training step with XLA.")
flags.DEFINE_bool("deterministic", _D.deterministic,
                  "TensorFlow op determinism: identical results run to run.")
flags.DEFINE_enum("target_metric", None, config_lib.METRICS,
                  "Stop once this eval metric reaches --target_value; also the metric that "
                  "picks the best checkpoint (default rmse, or hr_sampled / hr_full).")
flags.DEFINE_float("target_value", None, "See --target_metric.")
flags.DEFINE_bool("overwrite", _D.overwrite,
                  "Discard the checkpoints of an earlier run in --model_dir and start afresh "
                  "(without it, a model_dir of another configuration is refused).")
flags.DEFINE_bool("keep_best", _D.keep_best,
                  "Export and report the epoch with the best eval metric; --nokeep_best: the "
                  "last epoch (for figures whose epoch count was tuned on a validation split, "
                  "so that the eval split picks nothing).")
flags.DEFINE_integer("early_stopping_patience", _D.early_stopping_patience,
                     "Stop after this many epochs without improvement (0: never).",
                     lower_bound=0)
flags.DEFINE_integer("seed", _D.seed, "Seeds initialisation and data order.")
flags.DEFINE_integer("shuffle_buffer_blocks", _D.shuffle_buffer_blocks,
                     "Shuffle buffer in blocks of 1024 examples.", lower_bound=1)
flags.DEFINE_integer("log_every_steps", _D.log_every_steps,
                     "Steps between progress lines (and per tf.function call).", lower_bound=1)
flags.DEFINE_integer("max_checkpoints", _D.max_checkpoints,
                     "Latest checkpoints kept (the best one is kept apart, in checkpoints/best).",
                     lower_bound=1)
flags.DEFINE_integer("checkpoint_every_steps", _D.checkpoint_every_steps,
                     "Also checkpoint every N training steps (0: off). Epoch ends always "
                     "checkpoint; a killed run restarted with the same command resumes from the "
                     "latest checkpoint, mid-epoch included, exactly.", lower_bound=0)
flags.DEFINE_float("checkpoint_every_secs", _D.checkpoint_every_secs,
                   "Also checkpoint when this many seconds passed since the last one (0: off): "
                   "bounds the work a preemption loses.", lower_bound=0.0)
flags.DEFINE_integer("storage_retries", _D.storage_retries,
                     "Retries, with exponential backoff from 2 s, of a failed checkpoint, export "
                     "or metrics write (beyond TensorFlow's own per-request retries).",
                     lower_bound=0)
flags.DEFINE_enum("strategy", _D.strategy, config_lib.STRATEGIES,
                  "auto: ParameterServerStrategy when TF_CONFIG or CLUSTER_SPEC lists ps tasks, "
                  "MultiWorkerMirroredStrategy when it lists several tasks, MirroredStrategy "
                  "over several GPUs or logical CPUs, else one device.")
flags.DEFINE_integer("ps_shards", _D.ps_shards,
                     "parameter_server: split each ID embedding table (and its optimizer "
                     "slots) into this many shards over the ps tasks; 0: shards of at least "
                     "--ps_shard_min_mb, at most one per ps task.", lower_bound=0)
flags.DEFINE_float("ps_shard_min_mb", _D.ps_shard_min_mb,
                   "parameter_server with --ps_shards=0: the smallest shard, in MiB (a smaller "
                   "table stays whole on one ps task).")
flags.DEFINE_integer("num_cpu_devices", _D.num_cpu_devices,
                     "Split the CPU into this many logical devices (multi-replica runs "
                     "without GPUs: tests and debugging).", lower_bound=1)
flags.mark_flags_as_required(["data_dir", "model_dir"])


def _layers(values) -> tuple:
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise config_lib.ConfigError(f"--layers={','.join(values)} must be integers, e.g. "
                                 "64,32,16,8") from None


def config_from_flags() -> config_lib.TrainConfig:
  return config_lib.TrainConfig(
      data_dir=FLAGS.data_dir, model_dir=FLAGS.model_dir, export_dir=FLAGS.export_dir,
      checkpoint_dir=FLAGS.checkpoint_dir, log_dir=FLAGS.tensorboard_dir,
      model=FLAGS.model, task=FLAGS.task, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
      eval_batch_size=FLAGS.eval_batch_size, learning_rate=FLAGS.learning_rate,
      optimizer=FLAGS.optimizer, warmup_steps=FLAGS.warmup_steps, decay=FLAGS.decay,
      embedding_dim=FLAGS.embedding_dim, hidden_units=FLAGS.hidden_units,
      layers=_layers(FLAGS.layers), mlp_embedding_dim=FLAGS.mlp_embedding_dim,
      dropout=FLAGS.dropout, autorec_side=FLAGS.autorec_side,
      history=FLAGS.history, l2=FLAGS.l2, num_negatives=FLAGS.num_negatives,
      exclude_positives=FLAGS.exclude_positives, top_k=FLAGS.top_k, features=FLAGS.features,
      pretrained_gmf_dir=FLAGS.pretrained_gmf_dir, pretrained_mlp_dir=FLAGS.pretrained_mlp_dir,
      alpha=FLAGS.alpha, mixed_precision=FLAGS.mixed_precision, jit_compile=FLAGS.jit_compile,
      deterministic=FLAGS.deterministic, target_metric=FLAGS.target_metric,
      target_value=FLAGS.target_value, early_stopping_patience=FLAGS.early_stopping_patience,
      keep_best=FLAGS.keep_best,
      overwrite=FLAGS.overwrite,
      seed=FLAGS.seed,
      shuffle_buffer_blocks=FLAGS.shuffle_buffer_blocks, log_every_steps=FLAGS.log_every_steps,
      max_checkpoints=FLAGS.max_checkpoints,
      checkpoint_every_steps=FLAGS.checkpoint_every_steps,
      checkpoint_every_secs=FLAGS.checkpoint_every_secs, storage_retries=FLAGS.storage_retries,
      strategy=FLAGS.strategy, num_cpu_devices=FLAGS.num_cpu_devices,
      ps_shards=FLAGS.ps_shards, ps_shard_min_mb=FLAGS.ps_shard_min_mb).validate()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cluster = None
  try:
    config = config_from_flags()
    from trainer import distribute  # (the objective's flag rules already loaded TensorFlow)
    cluster = distribute.cluster_config()
    role = cluster["task"]["type"] if cluster else None
    # A ps task holds tables: freed memory goes back (malloc.py); a process that trains keeps
    # it for the next step's tensors.
    malloc.return_freed_memory() if role == "ps" else malloc.keep_freed_memory()
    if distribute.uses_parameter_servers(config.strategy, cluster) and role in ("ps", "worker"):
      from trainer import parameter_server
      parameter_server.serve(cluster)  # until stopped: the chief drives the cluster
      return
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
  cli.run(main, "neumf-train")


if __name__ == "__main__":
  run()
