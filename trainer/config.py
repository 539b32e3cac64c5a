"""Typed, frozen configurations of preparation and training.

The command-line modules build these from flags; library code and tests take them as values.
Single-field limits are also enforced by the flags' validators; `validate()` holds every rule, so
a config built in code is checked the same way. Errors name the flag and the offending value.
"""

import dataclasses
import math
import os
import posixpath
from typing import Optional, Tuple

from trainer import strict_json
from trainer.errors import ConfigError  # noqa: F401 (raised here; part of this module's API)

RATING_METRICS = ("rmse", "mae")  # explicit feedback
RANKING_METRICS = ("hr_sampled", "ndcg_sampled", "hr_full", "ndcg_full")  # implicit feedback


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the configuration needs to know of a model (its class is in `trainer.models`)."""

  factorised: bool = False  # score = a user vector . an item vector (+ biases): one matmul
  history: bool = False  # --history applies (the user's recent items feed the user vector)


MODEL_SPECS = {"seed_mlp": ModelSpec(), "gmf": ModelSpec(factorised=True), "mlp": ModelSpec(),
               "neumf": ModelSpec(), "mf": ModelSpec(factorised=True, history=True),
               "autorec": ModelSpec(factorised=True)}
MODELS = tuple(MODEL_SPECS)
FACTORISED_MODELS = tuple(name for name, spec in MODEL_SPECS.items() if spec.factorised)


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  """What the configuration needs to know of a kind of feedback (`trainer.objectives`)."""

  metrics: Tuple[str, ...]  # what evaluation reports; --target_metric picks one
  lower_is_better: Tuple[str, ...] = ()
  samples_negatives: bool = False  # batches hold each positive followed by its negatives
  needs_factorised_model: bool = False  # scores the whole catalogue for every example
  bias_at_mean_rating: bool = False  # the model's output bias starts at the training mean


OBJECTIVE_SPECS = {
    "explicit": ObjectiveSpec(RATING_METRICS, lower_is_better=RATING_METRICS,
                              bias_at_mean_rating=True),
    "implicit": ObjectiveSpec(RANKING_METRICS, samples_negatives=True),
    "implicit_bpr": ObjectiveSpec(RANKING_METRICS, samples_negatives=True),
    "implicit_softmax": ObjectiveSpec(RANKING_METRICS, needs_factorised_model=True)}
TASKS = tuple(OBJECTIVE_SPECS)  # each is a class of trainer.objectives
OPTIMIZERS = ("adam", "lazy_adam", "adagrad", "sgd")
DECAYS = ("none", "cosine", "linear")
AUTOREC_SIDES = ("item", "user")  # the side autorec codes from its interactions
PRECISIONS = ("float32", "bfloat16", "float16")
METRICS = RATING_METRICS + RANKING_METRICS
SOURCES = ("synthetic", "movielens", "csv", "tfds")
SPLITS = ("random", "leave_one_out", "temporal", "cold_items")
DUPLICATE_POLICIES = ("error", "keep_latest", "mean")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker_mirrored", "parameter_server")
DEFAULT_BATCH_SIZE = 1024  # examples per global step when --batch_size is not given


def _join(base: str, part: str) -> str:
  """`base`/`part`, for local paths and URLs such as `gs://bucket/dir` alike."""
  return posixpath.join(base, part) if "://" in base else os.path.join(base, part)


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _require_finite(config) -> None:
  """Every float field is a finite number (NaN and infinities pass comparisons unnoticed and
  cannot be written as JSON)."""
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"--{field.name}={value} must be a finite number")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  """How to turn an interaction log into a prepared data directory."""

  output_dir: str
  source: str = "synthetic"
  input: Tuple[str, ...] = ()  # files or globs (movielens: one file; csv: any)
  # csv: which columns hold what (names with a header, else 0-based indices).
  user_column: Optional[str] = None
  item_column: Optional[str] = None
  rating_column: Optional[str] = None  # None: implicit feedback (every row counts as 1.0)
  timestamp_column: Optional[str] = None
  delimiter: str = ","
  header: bool = True
  rating_min: Optional[float] = None  # declared rating range (csv); MovieLens: 0.5..5
  rating_max: Optional[float] = None
  # tfds
  tfds_name: Optional[str] = None
  tfds_data_dir: Optional[str] = None
  tfds_manual_dir: Optional[str] = None
  tfds_features: bool = True  # the builder's own side features, for sides without a file
  # split and filters
  split: str = "random"
  eval_fraction: float = 0.1
  temporal_cutoff: Optional[int] = None  # temporal: eval = timestamp >= cutoff
  min_user_interactions: int = 1
  eval_negatives: int = 0  # leave_one_out: sampled non-interacted items per eval user
  duplicates: str = "error"
  skip_bad_rows: bool = False
  # side features (trainer.data.features): a file per side, read by its MovieLens layout or,
  # with --*_feature_columns, as a delimited file with an ID column and typed columns
  user_features: Optional[str] = None
  item_features: Optional[str] = None
  user_id_column: Optional[str] = None
  item_id_column: Optional[str] = None
  user_feature_columns: Optional[str] = None  # name:kind[:argument],...
  item_feature_columns: Optional[str] = None
  features_delimiter: str = ","
  features_header: bool = True
  min_feature_count: int = 1  # rarer categorical values map to the out-of-vocabulary index
  # output
  num_shards: int = 4
  target_shard_mb: Optional[float] = None  # overrides num_shards when set
  seed: int = 0
  # synthetic only
  num_users: int = 1000
  num_items: int = 500
  num_ratings: int = 50_000
  rank: int = 4
  noise: float = 0.35
  implicit: bool = False

  def validate(self) -> "PrepareConfig":
    _require(bool(self.output_dir), "--output_dir is required")
    _require_finite(self)
    _require(self.source in SOURCES,
             f"--source={self.source!r} is not one of {', '.join(SOURCES)}")
    _require(self.split in SPLITS, f"--split={self.split!r} is not one of {', '.join(SPLITS)}")
    _require(self.duplicates in DUPLICATE_POLICIES,
             f"--duplicates={self.duplicates!r} is not one of {', '.join(DUPLICATE_POLICIES)}")
    if self.source in ("synthetic", "tfds"):
      _require(not self.input,
               f"--input={','.join(self.input)!r} is given but --source={self.source} reads no "
               "input files")
    else:
      _require(bool(self.input), f"--input is required with --source={self.source}")
    if self.source == "movielens":
      _require(len(self.input) == 1,
               f"--input={','.join(self.input)!r}: --source=movielens reads one ratings file")
    if self.source == "synthetic":
      for name in ("num_users", "num_items", "num_ratings", "rank"):
        value = getattr(self, name)
        _require(value >= 1, f"--{name}={value} must be at least 1")
      _require(self.noise >= 0, f"--noise={self.noise} must not be negative")
    if self.source == "csv":
      _require(bool(self.user_column) and bool(self.item_column),
               "--source=csv needs --user_column and --item_column")
      _require(len(self.delimiter) == 1 or self.delimiter == "::",
               f"--delimiter={self.delimiter!r} must be one character (or '::')")
    else:
      for name in ("user_column", "item_column", "rating_column", "timestamp_column"):
        _require(getattr(self, name) is None,
                 f"--{name} applies to --source=csv only, not --source={self.source}")
    if self.source == "tfds":
      _require(bool(self.tfds_name), "--source=tfds needs --tfds_name, e.g. "
               "movielens/100k-ratings")
    else:
      _require(self.tfds_name is None, "--tfds_name applies to --source=tfds only")
    if (self.rating_min is None) != (self.rating_max is None):
      raise ConfigError("--rating_min and --rating_max go together")
    if self.rating_min is not None:
      _require(self.rating_min <= self.rating_max,
               f"--rating_min={self.rating_min} is above --rating_max={self.rating_max}")
    _require(self.num_shards >= 1, f"--num_shards={self.num_shards} must be at least 1")
    _require(self.target_shard_mb is None or self.target_shard_mb > 0,
             f"--target_shard_mb={self.target_shard_mb} must be positive")
    _require(self.min_user_interactions >= 1,
             f"--min_user_interactions={self.min_user_interactions} must be at least 1")
    _require(self.eval_negatives >= 0,
             f"--eval_negatives={self.eval_negatives} must not be negative")
    _require(self.eval_negatives == 0 or self.split == "leave_one_out",
             f"--eval_negatives={self.eval_negatives} needs --split=leave_one_out")
    self._validate_features()
    _require(self.temporal_cutoff is None or self.split == "temporal",
             f"--temporal_cutoff={self.temporal_cutoff} needs --split=temporal")
    if self.split in ("random", "temporal", "cold_items") and self.temporal_cutoff is None:
      _require(0.0 < self.eval_fraction < 1.0,
               f"--eval_fraction={self.eval_fraction} must be strictly between 0 and 1")
    return self


  def _validate_features(self) -> None:
    _require(self.min_feature_count >= 1,
             f"--min_feature_count={self.min_feature_count} must be at least 1")
    _require(len(self.features_delimiter) == 1 or self.features_delimiter == "::",
             f"--features_delimiter={self.features_delimiter!r} must be one character (or '::')")
    for side in ("user", "item"):
      path, columns = getattr(self, f"{side}_features"), getattr(self, f"{side}_feature_columns")
      id_column = getattr(self, f"{side}_id_column")
      if path is None:
        _require(columns is None and id_column is None,
                 f"--{side}_feature_columns/--{side}_id_column need --{side}_features")
      elif columns is None:  # a MovieLens side file, read by its layout
        _require(id_column is None, f"--{side}_id_column={id_column} needs "
                 f"--{side}_feature_columns")
      else:
        _require(bool(id_column), f"--{side}_feature_columns needs --{side}_id_column")

  def feature_files(self):
    """(side, path) of each side with a feature file."""
    return [(side, getattr(self, f"{side}_features")) for side in ("user", "item")
            if getattr(self, f"{side}_features")]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How to train, evaluate and export one model."""

  data_dir: str
  model_dir: str
  export_dir: Optional[str] = None  # None: <model_dir>/export
  checkpoint_dir: Optional[str] = None  # None: <model_dir>/checkpoints
  log_dir: Optional[str] = None  # None: <model_dir>/logs
  model: str = "seed_mlp"
  task: str = "explicit"
  epochs: int = 3
  # Global, across all replicas (implicit: positives + negatives); None: DEFAULT_BATCH_SIZE
  # rounded down to whole groups of a positive and its negatives per replica (`for_replicas`).
  batch_size: Optional[int] = None
  eval_batch_size: int = 8192
  learning_rate: float = 1e-3
  optimizer: str = "adam"
  warmup_steps: int = 0
  decay: str = "none"
  embedding_dim: int = 64
  hidden_units: int = 256
  layers: Tuple[int, ...] = (64, 32, 16, 8)
  mlp_embedding_dim: int = 32
  dropout: float = 0.0
  autorec_side: str = "item"
  history: int = 0
  l2: float = 0.0
  num_negatives: int = 4
  exclude_positives: bool = True
  features: str = "all"  # side features: all prepared ones, none, or name / side:name,...
  top_k: int = 10
  pretrained_gmf_dir: Optional[str] = None
  pretrained_mlp_dir: Optional[str] = None
  alpha: float = 0.5
  mixed_precision: str = "float32"
  jit_compile: bool = False
  deterministic: bool = False
  target_metric: Optional[str] = None
  target_value: Optional[float] = None
  early_stopping_patience: int = 0  # 0: off
  # Export and report the best epoch by the eval metric (True), or the last epoch (False: what
  # an honest figure needs when the epoch count was tuned on a validation split).
  keep_best: bool = True
  overwrite: bool = False  # discard checkpoints of an earlier run in model_dir
  seed: int = 0
  shuffle_buffer_blocks: int = 256  # records of BLOCK_SIZE examples each
  log_every_steps: int = 100
  max_checkpoints: int = 3  # the latest ones; the best by the eval metric is kept apart
  # Mid-epoch checkpoints (epoch ends always save): every N steps and/or every N seconds; 0: off.
  checkpoint_every_steps: int = 0
  checkpoint_every_secs: float = 600.0
  storage_retries: int = 3  # further attempts of a failed checkpoint/export/metrics write
  strategy: str = "auto"
  num_cpu_devices: int = 1
  # Parameter-server training: ID tables in this many shards (0: by --ps_shard_min_mb, at most
  # one per ps task), shards of at least this many MiB.
  ps_shards: int = 0
  ps_shard_min_mb: float = 16.0

  @property
  def resolved_export_dir(self) -> str:
    return self.export_dir or _join(self.model_dir, "export")

  @property
  def resolved_checkpoint_dir(self) -> str:
    return self.checkpoint_dir or _join(self.model_dir, "checkpoints")

  @property
  def resolved_log_dir(self) -> str:
    return self.log_dir or _join(self.model_dir, "logs")

  @property
  def objective_spec(self) -> ObjectiveSpec:
    return OBJECTIVE_SPECS[self.task]

  @property
  def examples_per_positive(self) -> int:
    """Examples a batch holds per observed interaction: 1, or 1 + --num_negatives."""
    return 1 + self.num_negatives if self.objective_spec.samples_negatives else 1

  def validate(self) -> "TrainConfig":
    _require(bool(self.data_dir), "--data_dir is required")
    _require(bool(self.model_dir), "--model_dir is required")
    _require_finite(self)
    for name, allowed in (("model", MODELS), ("strategy", STRATEGIES), ("task", TASKS),
                          ("optimizer", OPTIMIZERS), ("decay", DECAYS),
                          ("autorec_side", AUTOREC_SIDES),
                          ("mixed_precision", PRECISIONS)):
      value = getattr(self, name)
      _require(value in allowed, f"--{name}={value!r} is not one of {', '.join(allowed)}")
    for name in ("epochs", "batch_size", "eval_batch_size", "embedding_dim", "hidden_units",
                 "mlp_embedding_dim", "shuffle_buffer_blocks", "log_every_steps",
                 "max_checkpoints", "num_cpu_devices", "top_k"):
      value = getattr(self, name)
      _require(value is None and name == "batch_size" or value >= 1,
               f"--{name}={value} must be at least 1")
    _require(self.ps_shard_min_mb > 0, f"--ps_shard_min_mb={self.ps_shard_min_mb} must be "
             "positive")
    for name in ("warmup_steps", "num_negatives", "history", "early_stopping_patience",
                 "ps_shards", "checkpoint_every_steps", "checkpoint_every_secs",
                 "storage_retries"):
      value = getattr(self, name)
      _require(value >= 0, f"--{name}={value} must not be negative")
    _require(self.learning_rate > 0, f"--learning_rate={self.learning_rate} must be positive")
    _require(0.0 <= self.dropout < 1.0, f"--dropout={self.dropout} must be in [0, 1)")
    _require(not self.history or MODEL_SPECS[self.model].history,
             f"--history={self.history} is mf's (the other models have no user history): "
             f"--model={self.model}")
    _require(self.l2 >= 0.0, f"--l2={self.l2} must not be negative")
    _require(0.0 <= self.alpha <= 1.0, f"--alpha={self.alpha} must be in [0, 1]")
    _require(bool(self.features.strip()),
             "--features must be all, none, or a comma-separated list of features")
    _require(bool(self.layers) and all(n >= 1 for n in self.layers),
             f"--layers={','.join(map(str, self.layers))} must be positive layer sizes")
    _require(not (self.strategy == "default" and self.num_cpu_devices > 1),
             f"--strategy=default uses one device but --num_cpu_devices={self.num_cpu_devices}; "
             "use --strategy=mirrored or auto")
    pretrained = (self.pretrained_gmf_dir, self.pretrained_mlp_dir)
    _require(all(p is None for p in pretrained) or self.model == "neumf",
             "--pretrained_gmf_dir/--pretrained_mlp_dir apply to --model=neumf only")
    _require(all(p is None for p in pretrained) or all(p is not None for p in pretrained),
             "--pretrained_gmf_dir and --pretrained_mlp_dir go together")
    if self.target_metric is not None or self.target_value is not None:
      _require(self.target_metric in METRICS,
               f"--target_metric={self.target_metric!r} is not one of {', '.join(METRICS)}")
      _require(self.target_value is not None,
               f"--target_metric={self.target_metric} needs --target_value")
    self._validate_task()
    return self

  def _validate_task(self) -> None:
    """The rules that depend on the kind of feedback (`OBJECTIVE_SPECS`)."""
    spec = self.objective_spec
    _require(self.target_metric is None or self.target_metric in spec.metrics,
             f"--target_metric={self.target_metric} is not reported by --task={self.task} "
             f"(it reports {', '.join(spec.metrics)})")
    if spec.samples_negatives:
      _require(self.num_negatives >= 1, f"--num_negatives={self.num_negatives}: "
               f"--task={self.task} needs negatives")
      _require(self.batch_size is None or self.batch_size % self.examples_per_positive == 0,
               f"--batch_size={self.batch_size} is not divisible by 1 + --num_negatives = "
               f"{self.examples_per_positive} (a batch holds positives and their negatives)")
    _require(not spec.needs_factorised_model or MODEL_SPECS[self.model].factorised,
             f"--task={self.task} scores every item for every example: it needs a model whose "
             f"score is a dot product (--model={' or '.join(FACTORISED_MODELS)}), not "
             f"--model={self.model}")

  def for_replicas(self, num_replicas: int) -> "TrainConfig":
    """This configuration with its batch size settled: --batch_size when given, else
    DEFAULT_BATCH_SIZE rounded down to a multiple of the replicas x (1 + --num_negatives) for
    a task that samples negatives, so that every task trains with its defaults."""
    if self.batch_size is not None:
      return self
    unit = num_replicas * self.examples_per_positive
    return dataclasses.replace(
        self, batch_size=max(unit, DEFAULT_BATCH_SIZE - DEFAULT_BATCH_SIZE % unit))

  def eval_batch_for(self, num_replicas: int) -> int:
    """The global eval batch: --eval_batch_size rounded down to a multiple of the replicas
    (evaluation sums over examples, so the batch size does not change its result)."""
    return max(num_replicas, self.eval_batch_size - self.eval_batch_size % num_replicas)

  def to_json(self) -> str:
    return strict_json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"
