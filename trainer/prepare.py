"""Command line of data preparation: `python -m trainer.prepare` (installed as `neumf-prepare`).

Examples:
  neumf-prepare --source=synthetic --output_dir=/tmp/data
  neumf-prepare --source=movielens --input=ml-100k/u.data --output_dir=gs://bucket/ml-100k
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # before TensorFlow loads: hide C++ INFO

from absl import app, flags, logging  # noqa: E402

from trainer import config as config_lib  # noqa: E402

FLAGS = flags.FLAGS
_D = config_lib.PrepareConfig

flags.DEFINE_enum("source", _D.source, config_lib.SOURCES,
                  "synthetic: generated ratings with a planted low-rank structure; movielens: a "
                  "raw MovieLens ratings file given by --input.")
flags.DEFINE_string("input", None, "MovieLens u.data, ratings.dat or ratings.csv (local or "
                    "gs://); the format is detected from the content.")
flags.DEFINE_string("output_dir", None, "Where the prepared data goes (local or gs://).")
flags.DEFINE_integer("num_shards", _D.num_shards, "TFRecord files per split.", lower_bound=1)
flags.DEFINE_enum("split", _D.split, config_lib.SPLITS, "How to hold out evaluation data.")
flags.DEFINE_float("eval_fraction", _D.eval_fraction,
                   "Fraction of ratings held out at random for evaluation.")
flags.DEFINE_integer("seed", _D.seed, "Seeds the split, the shuffles and the synthetic data.")
flags.DEFINE_integer("num_users", _D.num_users, "Synthetic: number of users.", lower_bound=1)
flags.DEFINE_integer("num_items", _D.num_items, "Synthetic: number of items.", lower_bound=1)
flags.DEFINE_integer("num_ratings", _D.num_ratings, "Synthetic: number of ratings.",
                     lower_bound=1)
flags.DEFINE_integer("rank", _D.rank, "Synthetic: rank of the planted structure.", lower_bound=1)
flags.DEFINE_float("noise", _D.noise, "Synthetic: rating noise standard deviation.",
                   lower_bound=0.0)
flags.mark_flag_as_required("output_dir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = config_lib.PrepareConfig(
        output_dir=FLAGS.output_dir, source=FLAGS.source, input=FLAGS.input,
        num_shards=FLAGS.num_shards, split=FLAGS.split, eval_fraction=FLAGS.eval_fraction,
        seed=FLAGS.seed, num_users=FLAGS.num_users, num_items=FLAGS.num_items,
        num_ratings=FLAGS.num_ratings, rank=FLAGS.rank, noise=FLAGS.noise).validate()
    from trainer.data import preparation  # TensorFlow loads here, after flag checks
    metadata = preparation.prepare(config)
  except ValueError as e:  # bad flags or bad input: the message names the flag or file line
    logging.error("%s", e)
    print(f"neumf-prepare: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({"output_dir": config.output_dir, "num_users": metadata.num_users,
                    "num_items": metadata.num_items, "num_train": metadata.num_train,
                    "num_eval": metadata.num_eval}, sort_keys=True))


def run():
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
