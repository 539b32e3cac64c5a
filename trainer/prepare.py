"""Command line of data preparation: `python -m trainer.prepare` (installed as `neumf-prepare`).

Examples:
  neumf-prepare --source=synthetic --output_dir=/tmp/data
  neumf-prepare --source=movielens --input=ml-100k/u.data --output_dir=gs://bucket/ml-100k
  neumf-prepare --source=movielens --input=ml-1m/ratings.dat --split=leave_one_out \
      --min_user_interactions=20 --eval_negatives=99 --output_dir=/tmp/ml-1m-ncf
  neumf-prepare --source=csv --input='gs://bucket/logs/*.csv' --user_column=user_id \
      --item_column=sku --timestamp_column=ts --output_dir=gs://bucket/prepared
  neumf-prepare --source=tfds --tfds_name=movielens/latest-small-ratings \
      --tfds_manual_dir=/data/archives --output_dir=/tmp/latest-small
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # before TensorFlow loads: hide C++ INFO

from absl import app, flags, logging  # noqa: E402

from trainer import config as config_lib  # noqa: E402
from trainer import cli, errors, malloc, strict_json  # noqa: E402

FLAGS = flags.FLAGS
_D = config_lib.PrepareConfig

flags.DEFINE_enum("source", _D.source, config_lib.SOURCES,
                  "synthetic: generated ratings with a planted low-rank structure; movielens: a "
                  "raw MovieLens ratings file (--input); csv: any delimited file(s) (--input, "
                  "--user_column, ...); tfds: a TensorFlow Datasets MovieLens config "
                  "(--tfds_name).")
flags.DEFINE_list("input", [], "Input files or globs, local or gs:// (comma-separated). "
                  "movielens: one u.data, ratings.dat or ratings.csv, told apart by content.")
flags.DEFINE_string("output_dir", None, "Where the prepared data goes (local or gs://).")
flags.DEFINE_string("user_column", None, "csv: the user ID column (name, or 0-based index "
                    "with --noheader).")
flags.DEFINE_string("item_column", None, "csv: the item ID column.")
flags.DEFINE_string("rating_column", None, "csv: the rating column; without it the log is "
                    "implicit feedback and every row counts as 1.0.")
flags.DEFINE_string("timestamp_column", None, "csv: the timestamp column (integer); needed by "
                    "--split=leave_one_out and temporal.")
flags.DEFINE_string("delimiter", _D.delimiter, "csv: the field delimiter (one character, or "
                    "'::'); 'tab' for a tab.")
flags.DEFINE_bool("header", _D.header, "csv: the first line of each file names the columns.")
flags.DEFINE_float("rating_min", None, "csv: the lowest valid rating (with --rating_max).")
flags.DEFINE_float("rating_max", None, "csv: the highest valid rating (with --rating_min).")
flags.DEFINE_string("tfds_name", None, "tfds: e.g. movielens/100k-ratings, movielens/1m-ratings, "
                    "movielens/20m-ratings, movielens/25m-ratings, "
                    "movielens/latest-small-ratings.")
flags.DEFINE_bool("tfds_features", True, "tfds: use the builder's own side features (items: "
                  "genres, year from the title; 100K/1M users: age group, gender, occupation, "
                  "zip prefix) for each side without a --user_features/--item_features file.")
flags.DEFINE_string("tfds_data_dir", None, "tfds: TensorFlow Datasets' data directory.")
flags.DEFINE_string("tfds_manual_dir", None, "tfds: a folder holding the archive under its "
                    "registered name (e.g. ml-latest-small.zip), used instead of downloading; "
                    "TFDS checks its size and sha256.")
flags.DEFINE_enum("split", _D.split, config_lib.SPLITS,
                  "random: a hash-random --eval_fraction of the interactions; leave_one_out: "
                  "each user's latest interaction (ties: the later row of the input), the NCF "
                  "protocol; temporal: interactions at or after a time cut; cold_items: a "
                  "hash-random --eval_fraction of the items with all their interactions "
                  "(cold start: scored from side features).")
flags.DEFINE_float("eval_fraction", _D.eval_fraction,
                   "random: fraction held out; temporal: fraction of the latest interactions "
                   "held out when --temporal_cutoff is not given; cold_items: fraction of the "
                   "items held out.")
flags.DEFINE_integer("temporal_cutoff", None, "temporal: hold out timestamps >= this.")
flags.DEFINE_integer("min_user_interactions", _D.min_user_interactions,
                     "Drop users with fewer interactions (the NCF papers use 20).", lower_bound=1)
flags.DEFINE_integer("eval_negatives", _D.eval_negatives,
                     "leave_one_out: sample this many items each eval user never interacted "
                     "with (e.g. 99 or 999), for reproducible sampled HR/NDCG.", lower_bound=0)
flags.DEFINE_enum("duplicates", _D.duplicates, config_lib.DUPLICATE_POLICIES,
                  "Repeated (user, item) pairs: error, keep_latest (by timestamp, then input "
                  "order) or mean (of the ratings).")
flags.DEFINE_bool("skip_bad_rows", _D.skip_bad_rows,
                  "Count, report and skip malformed rows instead of failing on the first.")
flags.DEFINE_string("user_features", None, "A users' feature file (local or gs://): a MovieLens "
                    "u.user or users.dat, or with --user_feature_columns any delimited file.")
flags.DEFINE_string("item_features", None, "An items' feature file: a MovieLens u.item, "
                    "movies.dat or movies.csv, or with --item_feature_columns any delimited file.")
flags.DEFINE_string("user_id_column", None, "The user ID column of --user_features (name, or "
                    "0-based index with --nofeatures_header).")
flags.DEFINE_string("item_id_column", None, "The item ID column of --item_features.")
flags.DEFINE_string("user_feature_columns", None, "Typed columns of --user_features: "
                    "name:kind[:argument],... with kind categorical, multi_hot:SEPARATOR, "
                    "numeric or bucketized:BUCKETS, e.g. country:categorical,age:bucketized:8.")
flags.DEFINE_string("item_feature_columns", None, "Typed columns of --item_features, e.g. "
                    "category:categorical,tags:multi_hot:|,price:numeric.")
flags.DEFINE_string("features_delimiter", _D.features_delimiter, "Field delimiter of the "
                    "feature files (one character, or '::'); 'tab' for a tab.")
flags.DEFINE_bool("features_header", _D.features_header, "The feature files' first line names "
                  "the columns.")
flags.DEFINE_integer("min_feature_count", _D.min_feature_count, "Categorical and multi-hot "
                     "values on fewer entities map to the out-of-vocabulary index.",
                     lower_bound=1)
flags.DEFINE_integer("num_shards", _D.num_shards, "TFRecord files per split.", lower_bound=1)
flags.DEFINE_float("target_shard_mb", None, "Size shards to about this many MB (overrides "
                   "--num_shards).")
flags.DEFINE_integer("seed", _D.seed, "Seeds the split, the shuffles, the negatives and the "
                     "synthetic data; same input and seed give identical bytes.")
flags.DEFINE_integer("num_users", _D.num_users, "synthetic: number of users.", lower_bound=1)
flags.DEFINE_integer("num_items", _D.num_items, "synthetic: number of items.", lower_bound=1)
flags.DEFINE_integer("num_ratings", _D.num_ratings, "synthetic: number of ratings.",
                     lower_bound=1)
flags.DEFINE_integer("rank", _D.rank, "synthetic: rank of the planted structure.", lower_bound=1)
flags.DEFINE_float("noise", _D.noise, "synthetic: rating noise standard deviation.",
                   lower_bound=0.0)
flags.DEFINE_bool("implicit", _D.implicit, "synthetic: implicit feedback (every rating 1.0).")
flags.mark_flag_as_required("output_dir")


def _delimiter(value: str) -> str:
  return "\t" if value in ("tab", "\\t") else value


def config_from_flags() -> config_lib.PrepareConfig:
  delimiter = _delimiter(FLAGS.delimiter)
  return config_lib.PrepareConfig(
      output_dir=FLAGS.output_dir, source=FLAGS.source, input=tuple(FLAGS.input),
      user_column=FLAGS.user_column, item_column=FLAGS.item_column,
      rating_column=FLAGS.rating_column, timestamp_column=FLAGS.timestamp_column,
      delimiter=delimiter, header=FLAGS.header, rating_min=FLAGS.rating_min,
      rating_max=FLAGS.rating_max, tfds_name=FLAGS.tfds_name, tfds_data_dir=FLAGS.tfds_data_dir,
      tfds_manual_dir=FLAGS.tfds_manual_dir, tfds_features=FLAGS.tfds_features, split=FLAGS.split,
      eval_fraction=FLAGS.eval_fraction, temporal_cutoff=FLAGS.temporal_cutoff,
      min_user_interactions=FLAGS.min_user_interactions, eval_negatives=FLAGS.eval_negatives,
      duplicates=FLAGS.duplicates, skip_bad_rows=FLAGS.skip_bad_rows,
      num_shards=FLAGS.num_shards, target_shard_mb=FLAGS.target_shard_mb, seed=FLAGS.seed,
      num_users=FLAGS.num_users, num_items=FLAGS.num_items, num_ratings=FLAGS.num_ratings,
      rank=FLAGS.rank, noise=FLAGS.noise, implicit=FLAGS.implicit,
      user_features=FLAGS.user_features, item_features=FLAGS.item_features,
      user_id_column=FLAGS.user_id_column, item_id_column=FLAGS.item_id_column,
      user_feature_columns=FLAGS.user_feature_columns,
      item_feature_columns=FLAGS.item_feature_columns,
      features_delimiter=_delimiter(FLAGS.features_delimiter),
      features_header=FLAGS.features_header,
      min_feature_count=FLAGS.min_feature_count).validate()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = config_from_flags()
    malloc.return_freed_memory()  # a process that prepares: keep its peak low (malloc.py)
    from trainer.data import preparation  # TensorFlow loads here, after flag checks
    metadata = preparation.prepare(config)
  except (errors.TrainerError, ValueError) as e:  # ValueError: bad input, naming file and line
    code = e.exit_code if isinstance(e, errors.TrainerError) else errors.USAGE_EXIT_CODE
    logging.error("%s", e)
    print(f"neumf-prepare: error: {e}", file=sys.stderr)
    sys.exit(code)
  print(strict_json.dumps({"output_dir": config.output_dir, "num_users": metadata.num_users,
                    "num_items": metadata.num_items, "num_train": metadata.num_train,
                    "num_eval": metadata.num_eval, "split": metadata.split,
                    "rows_read": metadata.rows_read,
                    "bad_rows_skipped": metadata.bad_rows_skipped,
                    "bad_rows_by_reason": metadata.bad_rows_by_reason,
                    "duplicates_merged": metadata.duplicates_merged,
                    "rows_filtered": metadata.rows_filtered}, sort_keys=True))


def run():
  """Console-script entry point."""
  cli.run(main, "neumf-prepare")


if __name__ == "__main__":
  run()
