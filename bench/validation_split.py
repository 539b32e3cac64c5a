"""Writes the training rows of a prepared data directory as a CSV, to carve a validation split
from them: recipes are tuned on that split, never on the eval split.

  python bench/validation_split.py --data_dir=runs/ml100k/data --output=runs/ml100k/train.csv
  neumf-prepare --source=csv --input=runs/ml100k/train.csv --user_column=user \
      --item_column=item --rating_column=rating --timestamp_column=timestamp \
      --eval_fraction=0.1 --seed=1 --output_dir=runs/ml100k/tuning   # (+ the same features)

Rows carry raw IDs (the vocabularies'), so feature files keyed by raw ID apply unchanged.
Timestamps are not kept in prepared data: the column is the row's position, which serves the
random and cold-item splits (not leave-one-out or temporal ones).
"""

import argparse
import csv
import os
import sys


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--output", required=True)
  args = parser.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from trainer.data import artifacts, pipeline
  data = artifacts.PreparedData(args.data_dir)
  users, items = data.vocabularies()
  rows = 0
  with open(args.output, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["user", "item", "rating", "timestamp"])
    for batch in pipeline.make_dataset(data.train_pattern, 65536, False):
      for u, i, r in zip(batch["user"].numpy(), batch["item"].numpy(),
                         batch["rating"].numpy()):
        writer.writerow([users[u], items[i], f"{r:g}", rows])
        rows += 1
  print(f"{rows} training rows of {args.data_dir} -> {args.output}")


if __name__ == "__main__":
  main()
