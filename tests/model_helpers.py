"""Models and their inputs shared by the model tests."""

import numpy as np

from trainer import models, schema
from trainer.config import MODELS
from trainer.data import artifacts


# The models, mf with a user history (`history`) and U-AutoRec, built by `build`.
VARIANTS = MODELS + ("mf_history", "autorec_user")


def positives(num_users, num_items, seed=0):
  """Random training positives with each user's time order, as preparation writes them: CSR by
  user, items sorted, `time_rank` a permutation within each user."""
  rng = np.random.default_rng(seed)
  pairs = sorted({(int(u), int(i)) for u, i in zip(rng.integers(0, num_users, 4 * num_users),
                                                   rng.integers(0, num_items, 4 * num_users))})
  users = np.array([u for u, _ in pairs])
  counts = np.bincount(users, minlength=num_users)
  return {"indptr": np.concatenate([[0], np.cumsum(counts)]),
          "indices": np.array([i for _, i in pairs]),
          "time_rank": np.concatenate([rng.permutation(n) for n in counts])}


def build(variant, num_users, num_items, *args, **kwargs):
  """`models.build_model` of a VARIANTS name ("mf_history": mf with a history of 3;
  "autorec_user": autorec coding users from their items)."""
  if variant == "mf_history":
    kwargs.update(history=3, positives=positives(num_users, num_items))
    variant = "mf"
  elif variant == "autorec_user":
    drawn = positives(num_users, num_items)
    users = np.repeat(np.arange(num_users), np.diff(drawn["indptr"]))
    kwargs.update(side="user", interactions=artifacts.sparse_rows(
        users, drawn["indices"], np.ones(len(users)), num_users))
    variant = "autorec"
  return models.build_model(variant, num_users, num_items, *args, **kwargs)


def feature_tables():
  infos = [schema.FeatureInfo("item", "genre", "categorical", 4),
           schema.FeatureInfo("item", "tags", "multi_hot", 5, 2),
           schema.FeatureInfo("item", "price", "numeric")]
  tables = {"genre": np.array([1, 2, 3, 0, 0, 1, 0, 0, 0, 0, 0], np.int32),
            "tags": np.array([[1, 2], [3, 0], [0, 0], [4, 1]] + [[0, 0]] * 7, np.int32),
            "price": np.linspace(-1, 1, 11).astype(np.float32)}
  return {"item": schema.SideFeatures(infos, tables)}
