"""Typed, frozen configurations of preparation and training.

Each field is a command-line flag of the same name, its help text and bounds beside its value
(`_flag`): `trainer.cli` defines the flags from the fields, so a field and its flag cannot drift
apart. Library code and tests take configs as values. Single-field bounds are also enforced by
the flags' validators; `validate()` holds every rule, so a config built in code is checked the
same way. Errors name the flag and the offending value.
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
SPLIT_PROTOCOLS = ("random", "leave_one_out", "temporal", "cold_items", "given")
DUPLICATE_POLICIES = ("error", "keep_latest", "mean")
# Context derived from each row's timestamp (trainer.data.context): hour of day and day of week
# (UTC), the user's tenure and the item's age at the interaction (days since their first
# training interaction, bucketised).
DERIVED_CONTEXT = ("hour", "weekday", "tenure", "item_age")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker_mirrored", "parameter_server")
DEFAULT_BATCH_SIZE = 1024  # examples per global step when --batch_size is not given


def _flag(default, help: str, *, choices: Optional[Tuple[str, ...]] = None,  # noqa: A002
          lower_bound=None, flag: Optional[str] = None, env: Optional[str] = None,
          parse=None):
  """A field that is also a command-line flag (`trainer.cli` defines the flags from these).

  Args:
    default: the field's default, and the flag's.
    help: the flag's help text.
    choices: the values an enumeration flag takes.
    lower_bound: the least value the flag accepts.
    flag: the flag's name, when it is not the field's.
    env: an environment variable whose value, when set, is the flag's default (the
      AIP_* variables of Vertex AI custom jobs).
    parse: turns the flag's value into the field's.
  """
  return dataclasses.field(default=default, metadata=dict(
      help=help, choices=choices, lower_bound=lower_bound, flag=flag, env=env, parse=parse))


def _tab(value: str) -> str:
  """A delimiter flag's value: "tab" (or a backslash-t) is a tab."""
  return "\t" if value in ("tab", "\\t") else value


def _required(help: str, *, env: Optional[str] = None):  # noqa: A002
  """A field without default whose flag is required (`_flag`)."""
  return dataclasses.field(metadata=dict(help=help, choices=None, lower_bound=None, flag=None,
                                         env=env, required=True))


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

  output_dir: str = _required("Where the prepared data goes (local or gs://).")
  source: str = _flag("synthetic", choices=SOURCES, help=(
      "synthetic: generated ratings with a planted low-rank structure; movielens: a raw "
      "MovieLens ratings file (--input); csv: any delimited file(s) (--input, --user_column, "
      "...); tfds: a TensorFlow Datasets MovieLens config (--tfds_name)."))
  # files or globs (movielens: one file; csv: any)
  input: Tuple[str, ...] = _flag((), help=(
      "Input files or globs, local or gs:// (comma-separated). movielens: one u.data, "
      "ratings.dat or ratings.csv, told apart by content."))
  # csv: which columns hold what (names with a header, else 0-based indices).
  user_column: Optional[str] = _flag(None, help=(
      "csv: the user ID column (name, or 0-based index with --noheader)."))
  item_column: Optional[str] = _flag(None, "csv: the item ID column.")
  # None: implicit feedback (every row counts as 1.0)
  rating_column: Optional[str] = _flag(None, help=(
      "csv: the rating column; without it the log is implicit feedback and every row counts "
      "as 1.0."))
  timestamp_column: Optional[str] = _flag(None, help=(
      "csv: the timestamp column (integer); needed by --split=leave_one_out and temporal."))
  delimiter: str = _flag(",", parse=_tab, help=(
      "csv: the field delimiter (one character, or '::'); 'tab' for a tab."))
  header: bool = _flag(True, "csv: the first line of each file names the columns.")
  # declared rating range (csv); MovieLens: 0.5..5
  rating_min: Optional[float] = _flag(None, "csv: the lowest valid rating (with --rating_max).")
  rating_max: Optional[float] = _flag(None, "csv: the highest valid rating (with --rating_min).")
  # tfds
  tfds_name: Optional[str] = _flag(None, help=(
      "tfds: e.g. movielens/100k-ratings, movielens/1m-ratings, movielens/20m-ratings, "
      "movielens/25m-ratings, movielens/latest-small-ratings."))
  tfds_data_dir: Optional[str] = _flag(None, "tfds: TensorFlow Datasets' data directory.")
  tfds_manual_dir: Optional[str] = _flag(None, help=(
      "tfds: a folder holding the archive under its registered name (e.g. "
      "ml-latest-small.zip), used instead of downloading; TFDS checks its size and sha256."))
  # the builder's own side features, for sides without a file
  tfds_features: bool = _flag(True, help=(
      "tfds: use the builder's own side features (items: genres, year from the title; 100K/1M"
      " users: age group, gender, occupation, zip prefix) for each side without a "
      "--user_features/--item_features file."))
  # split and filters
  split: str = _flag("random", choices=SPLIT_PROTOCOLS, help=(
      "random: a hash-random --eval_fraction of the interactions; leave_one_out: each user's "
      "latest interaction (ties: the later row of the input), the NCF protocol; temporal: "
      "interactions at or after a time cut; cold_items: a hash-random --eval_fraction of the "
      "items with all their interactions (cold start: scored from side features); given: "
      "--input trains, --eval_input evaluates (e.g. MovieLens' u1.base and u1.test)."))
  base_data_dir: Optional[str] = _flag(None, help=(
      "A prepared data directory whose vocabularies (users, items, feature and context "
      "values) this one keeps, index for index, appending the new log's new entries; numeric "
      "and bucketized features keep its statistics. A model trained on it warm-starts here "
      "(neumf-train --warm_start_from)."))
  # given: the evaluation rows' files (same source kind and columns as --input)
  eval_input: Tuple[str, ...] = _flag((), help=(
      "--split=given: the evaluation rows' files or globs (comma-separated), of the same kind "
      "and columns as --input; their IDs never seen in --input go to the out-of-vocabulary "
      "rows and are counted in metadata.json."))
  eval_fraction: float = _flag(0.1, help=(
      "random: fraction held out; temporal: fraction of the latest interactions held out when"
      " --temporal_cutoff is not given; cold_items: fraction of the items held out."))
  # temporal: eval = timestamp >= cutoff
  temporal_cutoff: Optional[int] = _flag(None, "temporal: hold out timestamps >= this.")
  min_user_interactions: int = _flag(1, lower_bound=1, help=(
      "Drop users with fewer interactions (the NCF papers use 20)."))
  # leave_one_out: sampled non-interacted items per eval user
  eval_negatives: int = _flag(0, lower_bound=0, help=(
      "leave_one_out: sample this many items each eval user never interacted with (e.g. 99 or"
      " 999), for reproducible sampled HR/NDCG."))
  duplicates: str = _flag("error", choices=DUPLICATE_POLICIES, help=(
      "Repeated (user, item) pairs: error, keep_latest (by timestamp, then input order) or "
      "mean (of the ratings)."))
  skip_bad_rows: bool = _flag(False, help=(
      "Count, report and skip malformed rows instead of failing on the first."))
  # side features (trainer.data.features): a file per side, read by its MovieLens layout or,
  # with --*_feature_columns, as a delimited file with an ID column and typed columns
  user_features: Optional[str] = _flag(None, help=(
      "A users' feature file (local or gs://): a MovieLens u.user or users.dat, or with "
      "--user_feature_columns any delimited file."))
  item_features: Optional[str] = _flag(None, help=(
      "An items' feature file: a MovieLens u.item, movies.dat or movies.csv, or with "
      "--item_feature_columns any delimited file."))
  user_id_column: Optional[str] = _flag(None, help=(
      "The user ID column of --user_features (name, or 0-based index with "
      "--nofeatures_header)."))
  item_id_column: Optional[str] = _flag(None, "The item ID column of --item_features.")
  # name:kind[:argument],...
  user_feature_columns: Optional[str] = _flag(None, help=(
      "Typed columns of --user_features: name:kind[:argument],... with kind categorical, "
      "multi_hot:SEPARATOR, numeric or bucketized:BUCKETS, e.g. "
      "country:categorical,age:bucketized:8."))
  item_feature_columns: Optional[str] = _flag(None, help=(
      "Typed columns of --item_features, e.g. "
      "category:categorical,tags:multi_hot:|,price:numeric."))
  features_delimiter: str = _flag(",", parse=_tab, help=(
      "Field delimiter of the feature files (one character, or '::'); 'tab' for a tab."))
  features_header: bool = _flag(True, "The feature files' first line names the columns.")
  # context: per-interaction features (trainer.data.context)
  context: Tuple[str, ...] = _flag((), help=(
      "Context derived from each row's timestamp (comma-separated): "
      + ", ".join(DERIVED_CONTEXT) + ". hour and weekday in UTC; tenure and item_age: days "
      "since the user's (item's) first training interaction, bucketised; from the row itself "
      "and the training rows only."))
  context_columns: Optional[str] = _flag(None, help=(
      "csv: per-interaction columns of the log, name:kind[:argument],... with kind "
      "categorical, multi_hot:SEPARATOR, numeric or bucketized:BUCKETS, e.g. "
      "device:categorical,price:numeric,tags:multi_hot:|; an empty field is a missing value."))
  # rarer categorical values map to the out-of-vocabulary index
  min_feature_count: int = _flag(1, lower_bound=1, help=(
      "Categorical and multi-hot values on fewer entities map to the out-of-vocabulary index."))
  # output
  num_shards: int = _flag(4, "TFRecord files per split.", lower_bound=1)
  # overrides num_shards when set
  target_shard_mb: Optional[float] = _flag(None, help=(
      "Size shards to about this many MB (overrides --num_shards)."))
  seed: int = _flag(0, help=(
      "Seeds the split, the shuffles, the negatives and the synthetic data; same input and "
      "seed give identical bytes."))
  # synthetic only
  num_users: int = _flag(1000, "synthetic: number of users.", lower_bound=1)
  num_items: int = _flag(500, "synthetic: number of items.", lower_bound=1)
  num_ratings: int = _flag(50_000, "synthetic: number of ratings.", lower_bound=1)
  rank: int = _flag(4, "synthetic: rank of the planted structure.", lower_bound=1)
  noise: float = _flag(0.35, "synthetic: rating noise standard deviation.", lower_bound=0.0)
  implicit: bool = _flag(False, "synthetic: implicit feedback (every rating 1.0).")
  context_effect: float = _flag(0.0, help=(
      "synthetic: plant a context effect, this many rating points times cos(2 pi hour / 24) "
      "of each rating's hour of day (learnt with --context=hour)."))

  def validate(self) -> "PrepareConfig":
    _require(bool(self.output_dir), "--output_dir is required")
    _require_finite(self)
    _require(self.source in SOURCES,
             f"--source={self.source!r} is not one of {', '.join(SOURCES)}")
    _require(self.split in SPLIT_PROTOCOLS,
             f"--split={self.split!r} is not one of {', '.join(SPLIT_PROTOCOLS)}")
    _require(self.duplicates in DUPLICATE_POLICIES,
             f"--duplicates={self.duplicates!r} is not one of {', '.join(DUPLICATE_POLICIES)}")
    self._validate_source()
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
    self._validate_features()
    self._validate_context()
    self._validate_split()
    return self

  def _validate_source(self) -> None:
    """The flags of each --source: its inputs, columns, sizes."""
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
    else:
      _require(self.context_effect == 0.0, f"--context_effect={self.context_effect} applies "
               "to --source=synthetic only")
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

  def _validate_context(self) -> None:
    unknown = [c for c in self.context if c not in DERIVED_CONTEXT]
    _require(not unknown, f"--context={','.join(self.context)}: {unknown[0] if unknown else ''!r}"
             f" is not one of {', '.join(DERIVED_CONTEXT)}")
    _require(len(set(self.context)) == len(self.context),
             f"--context={','.join(self.context)} names a feature twice")
    _require(self.context_columns is None or self.source == "csv",
             f"--context_columns applies to --source=csv only, not --source={self.source}")

  def _validate_split(self) -> None:
    _require(self.base_data_dir is None or self.base_data_dir.rstrip("/")
             != self.output_dir.rstrip("/"),
             f"--base_data_dir={self.base_data_dir!r} is --output_dir: prepare the new data "
             "beside its base (a model trained on the base warm-starts from it)")
    """The flags of each --split protocol."""
    _require(self.eval_negatives >= 0,
             f"--eval_negatives={self.eval_negatives} must not be negative")
    _require(self.eval_negatives == 0 or self.split == "leave_one_out",
             f"--eval_negatives={self.eval_negatives} needs --split=leave_one_out")
    if self.split == "given":
      _require(bool(self.eval_input), "--split=given needs --eval_input (the evaluation rows' "
               "files)")
      _require(self.source in ("movielens", "csv"),
               f"--split=given reads files: --source={self.source} has none (use movielens or "
               "csv)")
      overlap = sorted(set(self.input) & set(self.eval_input))
      _require(not overlap, f"--eval_input={','.join(overlap)!r} is also in --input")
    else:
      _require(not self.eval_input, f"--eval_input={','.join(self.eval_input)!r} needs "
               "--split=given")
    _require(self.temporal_cutoff is None or self.split == "temporal",
             f"--temporal_cutoff={self.temporal_cutoff} needs --split=temporal")
    if self.split in ("random", "temporal", "cold_items") and self.temporal_cutoff is None:
      _require(0.0 < self.eval_fraction < 1.0,
               f"--eval_fraction={self.eval_fraction} must be strictly between 0 and 1")

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

  data_dir: str = _required(help=(
      "Prepared data directory (local or gs://), the output of neumf-prepare."))
  model_dir: str = _required(env="AIP_MODEL_DIR", help=(
      "Where checkpoints, TensorBoard logs and metrics.json go (local or gs://). Re-running "
      "with the same model_dir resumes. Default: $AIP_MODEL_DIR."))
  # None: <model_dir>/export
  export_dir: Optional[str] = _flag(None, help=(
      "Where the SavedModel goes. Default: <model_dir>/export."))
  # None: <model_dir>/checkpoints
  checkpoint_dir: Optional[str] = _flag(None, env="AIP_CHECKPOINT_DIR", help=(
      "Where checkpoints go. Default: $AIP_CHECKPOINT_DIR, else <model_dir>/checkpoints."))
  # None: <model_dir>/logs
  log_dir: Optional[str] = _flag(
      None, flag="tensorboard_dir", env="AIP_TENSORBOARD_LOG_DIR", help=(
      "Where TensorBoard summaries go. Default: $AIP_TENSORBOARD_LOG_DIR, else "
      "<model_dir>/logs."))
  model: str = _flag("seed_mlp", choices=MODELS, help=(
      "seed_mlp: embeddings -> concat -> Dense(hidden_units) -> rating; gmf, mlp, neumf: He "
      "et al. 2017; mf: dot product with biases (Rendle et al. 2020); autorec: items (or "
      "users, --autorec_side) coded from their training interactions (Sedhain et al. 2015)."))
  task: str = _flag("explicit", choices=TASKS, help=(
      "explicit: regress ratings (MSE; RMSE/MAE); implicit: classify observed pairs against "
      "sampled negatives (cross-entropy; HR@K/NDCG@K); implicit_bpr: rank each observed pair "
      "above its sampled negatives (BPR's pairwise logistic loss; HR@K/NDCG@K); "
      "implicit_softmax: each observed pair's item against the whole catalogue (softmax "
      "cross-entropy; mf, gmf; HR@K/NDCG@K)."))
  epochs: int = _flag(3, "Passes over the training data.", lower_bound=1)
  # Global, across all replicas (implicit: positives + negatives); None: DEFAULT_BATCH_SIZE
  # rounded down to whole groups of a positive and its negatives per replica (`for_replicas`).
  batch_size: Optional[int] = _flag(None, lower_bound=1, help=(
      "Global batch size, across all replicas; implicit: positives plus their negatives. "
      "Default: 1024, rounded down to a multiple of the replicas x (1 + --num_negatives) for "
      "tasks that sample negatives."))
  eval_batch_size: int = _flag(8192, "Global evaluation batch size.", lower_bound=1)
  learning_rate: float = _flag(1e-3, "Peak learning rate.", lower_bound=0.0)
  optimizer: str = _flag("adam", choices=OPTIMIZERS, help=(
      "adam; lazy_adam (updates only the embedding rows of the batch: much faster on large "
      "tables); adagrad; sgd."))
  warmup_steps: int = _flag(0, "Linear learning-rate warm-up steps.", lower_bound=0)
  decay: str = _flag("none", choices=DECAYS, help=(
      "Learning-rate decay to zero at the last step after warm-up."))
  embedding_dim: int = _flag(64, lower_bound=1, help=(
      "Embedding size (neumf: of the GMF path; mlp: of the MLP)."))
  hidden_units: int = _flag(256, "Width of seed_mlp's hidden layer.", lower_bound=1)
  layers: Tuple[int, ...] = _flag((64, 32, 16, 8), "MLP tower sizes (mlp, neumf).")
  mlp_embedding_dim: int = _flag(32, "neumf: embedding size of the MLP path.", lower_bound=1)
  dropout: float = _flag(0.0, help=(
      "Dropout after each MLP layer; autorec: the fraction of training examples coded from "
      "their features alone."))
  autorec_side: str = _flag("item", choices=AUTOREC_SIDES, help=(
      "autorec: code items from their users' interactions (I-AutoRec) or users from their "
      "items' (U-AutoRec)."))
  history: int = _flag(0, lower_bound=0, help=(
      "mf: the user vector also sums this many of the user's latest training items before the"
      " example (0: none); needs data prepared with their time order."))
  l2: float = _flag(0.0, "L2 weight on the embedding rows of each batch.")
  num_negatives: int = _flag(4, lower_bound=0, help=(
      "implicit: sampled negatives per positive, redrawn every epoch."))
  exclude_positives: bool = _flag(True, help=(
      "implicit: never sample a user's training positive as a negative."))
  # side features: all prepared ones, none, or name / side:name,...
  features: str = _flag("all", help=(
      "Side features the model adds to its ID embeddings: all (every feature the data "
      "directory holds), none (IDs only), or a comma-separated list of names or side:name "
      "(e.g. item:genres,age)."))
  top_k: int = _flag(10, "K of HR@K and NDCG@K.", lower_bound=1)
  warm_start_from: Optional[str] = _flag(None, help=(
      "The model_dir of an earlier run of the same model, trained on the data --data_dir was "
      "prepared on (--base_data_dir) or on this data: its weights and optimizer slots start "
      "this run, row by row; new IDs and values start fresh (README, \"Retraining every "
      "day\")."))
  warm_start_checkpoint: str = _flag("exported", choices=("exported", "best", "latest"), help=(
      "Which of --warm_start_from's checkpoints: the one it exported (its best epoch's, or "
      "with --nokeep_best its last), its best, or its latest."))
  pretrained_gmf_dir: Optional[str] = _flag(None, "neumf: model_dir of a trained gmf run.")
  pretrained_mlp_dir: Optional[str] = _flag(None, "neumf: model_dir of a trained mlp run.")
  alpha: float = _flag(0.5, "neumf with pretraining: weight of the GMF output.")
  mixed_precision: str = _flag("float32", choices=PRECISIONS, help=(
      "Compute dtype: float32, or bfloat16/float16 with float32 variables (float16 with loss "
      "scaling)."))
  jit_compile: bool = _flag(False, "Compile the training step with XLA.")
  deterministic: bool = _flag(False, "TensorFlow op determinism: identical results run to run.")
  target_metric: Optional[str] = _flag(None, choices=METRICS, help=(
      "Stop once this eval metric reaches --target_value; also the metric that picks the best"
      " checkpoint (default rmse, or hr_sampled / hr_full)."))
  target_value: Optional[float] = _flag(None, "See --target_metric.")
  # 0: off
  early_stopping_patience: int = _flag(0, lower_bound=0, help=(
      "Stop after this many epochs without improvement (0: never)."))
  # Export and report the best epoch by the eval metric (True), or the last epoch (False: what
  # an honest figure needs when the epoch count was tuned on a validation split).
  keep_best: bool = _flag(True, help=(
      "Export and report the epoch with the best eval metric; --nokeep_best: the last epoch "
      "(for figures whose epoch count was tuned on a validation split, so that the eval split"
      " picks nothing)."))
  # discard checkpoints of an earlier run in model_dir
  overwrite: bool = _flag(False, help=(
      "Discard the checkpoints of an earlier run in --model_dir and start afresh (without it,"
      " a model_dir of another configuration is refused)."))
  seed: int = _flag(0, "Seeds initialisation and data order.")
  # records of BLOCK_SIZE examples each
  shuffle_buffer_blocks: int = _flag(256, lower_bound=1, help=(
      "Shuffle buffer in blocks of 1024 examples."))
  log_every_steps: int = _flag(100, lower_bound=1, help=(
      "Steps between progress lines (and per tf.function call)."))
  # the latest ones; the best by the eval metric is kept apart
  max_checkpoints: int = _flag(3, lower_bound=1, help=(
      "Latest checkpoints kept (the best one is kept apart, in checkpoints/best)."))
  # Mid-epoch checkpoints (epoch ends always save): every N steps and/or every N seconds; 0: off.
  checkpoint_every_steps: int = _flag(0, lower_bound=0, help=(
      "Also checkpoint every N training steps (0: off). Epoch ends always checkpoint; a "
      "killed run restarted with the same command resumes from the latest checkpoint, "
      "mid-epoch included, exactly."))
  checkpoint_every_secs: float = _flag(600.0, lower_bound=0.0, help=(
      "Also checkpoint when this many seconds passed since the last one (0: off): bounds the "
      "work a preemption loses."))
  # further attempts of a failed checkpoint/export/metrics write
  storage_retries: int = _flag(3, lower_bound=0, help=(
      "Retries, with exponential backoff from 2 s, of a failed checkpoint, export or metrics "
      "write (beyond TensorFlow's own per-request retries)."))
  strategy: str = _flag("auto", choices=STRATEGIES, help=(
      "auto: ParameterServerStrategy when TF_CONFIG or CLUSTER_SPEC lists ps tasks, "
      "MultiWorkerMirroredStrategy when it lists several tasks, MirroredStrategy over several"
      " GPUs or logical CPUs, else one device."))
  num_cpu_devices: int = _flag(1, lower_bound=1, help=(
      "Split the CPU into this many logical devices (multi-replica runs without GPUs: tests "
      "and debugging)."))
  # Parameter-server training: ID tables in this many shards (0: by --ps_shard_min_mb, at most
  # one per ps task), shards of at least this many MiB.
  ps_shards: int = _flag(0, lower_bound=0, help=(
      "parameter_server: split each ID embedding table (and its optimizer slots) into this "
      "many shards over the ps tasks; 0: shards of at least --ps_shard_min_mb, at most one "
      "per ps task."))
  ps_shard_min_mb: float = _flag(16.0, help=(
      "parameter_server with --ps_shards=0: the smallest shard, in MiB (a smaller table stays"
      " whole on one ps task)."))

  # Parameter-server input from the tf.data service (trainer/input_service.py).
  input_service: bool = _flag(False, help=(
      "parameter_server: feed the workers from TensorFlow's tf.data service (the chief runs "
      "the dispatcher, each worker task a data worker): each example is read, parsed and "
      "given negatives once, not once per worker. Recommended for every parameter-server "
      "cluster (README, 'Input for many workers')."))
  input_service_port: int = _flag(5050, lower_bound=1, help=(
      "--input_service: the dispatcher's port, on the chief's host."))
  data_worker_port: int = _flag(5051, lower_bound=0, help=(
      "--input_service: each worker task's data worker port (0: any free port, for tasks "
      "sharing a host; a fixed port lets a restarted worker take its place)."))
  data_workers: int = _flag(0, lower_bound=0, help=(
      "--input_service: the batches come from this many data-only tasks "
      "(neumf-data-worker), not from the worker tasks: for when parsing, not training, is "
      "the limit."))

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
    for name in ("input_service_port", "data_worker_port"):
      _require(getattr(self, name) < 65536, f"--{name}={getattr(self, name)} is not a port")
    _require(self.input_service or not self.data_workers,
             f"--data_workers={self.data_workers} needs --input_service")
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
    _require(self.warm_start_from is None or self.pretrained_gmf_dir is None,
             "--warm_start_from and --pretrained_gmf_dir/--pretrained_mlp_dir both say where "
             "the weights start: give one")
    _require(self.warm_start_from is None or self.warm_start_from.rstrip("/")
             != self.model_dir.rstrip("/"),
             f"--warm_start_from={self.warm_start_from!r} is --model_dir: a run resumes from "
             "its own checkpoints without it")
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
