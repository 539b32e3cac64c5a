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
  neumf-prepare --source=movielens --input=ml-100k/u1.base --eval_input=ml-100k/u1.test \
      --split=given --context=hour,weekday,tenure,item_age --output_dir=/tmp/u1
  neumf-prepare --source=csv --input=log.csv --user_column=user --item_column=item \
      --timestamp_column=ts --context=hour --context_columns=device:categorical \
      --output_dir=/tmp/with-context
"""

import sys

from absl import app, flags, logging  # noqa: E402

from trainer import config as config_lib  # noqa: E402
from trainer import cli, errors, malloc, quiet, strict_json  # noqa: E402


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = cli.config_from(config_lib.PrepareConfig, flags.FLAGS)
    malloc.return_freed_memory()  # a process that prepares: keep its peak low (malloc.py)
    quiet.import_tensorflow(flags.FLAGS.verbosity)  # here, after the flags' checks
    from trainer.data import preparation
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
                    "rows_filtered": metadata.rows_filtered,
                    **({"lineage": metadata.lineage["vocabularies"]} if metadata.lineage
                       else {})}, sort_keys=True))


def run():
  """Console-script entry point."""
  cli.run(main, "neumf-prepare", config_lib.PrepareConfig)


if __name__ == "__main__":
  run()
