"""Recommender models: Keras 3 layers that score (user, item) index pairs.

One file per family (`seed_mlp.py`, `ncf.py` for GMF, MLP and NeuMF, `mf.py`, `autorec.py`),
on what they share (`base.py`), the layers they are built from (`layers.py`), the data they
carry as fixed weights (`tables.py`) and side features (`side_features.py`). `REGISTRY` maps
`--model` to a class and picks its constructor's arguments; model classes never see a config.

Every model takes `{"user": int[b], "item": int[b]}` of dense indices (as written by
preparation) and returns a score of shape [b]: a rating for explicit feedback, a logit for
implicit feedback. Index `num_users` (resp. `num_items`) is the out-of-vocabulary row: the
export maps unknown raw IDs there, so serving never fails on them.

With p_u, q_i the user and item embeddings:

  seed_mlp  r(u, i) = w2 . relu(W1 [p_u ; q_i] + b1) + b2           (the classic regressor)
  gmf       s(u, i) = h . (p_u * q_i) + b                              (He et al. 2017, GMF)
  mlp       s(u, i) = h . MLP([p_u ; q_i]) + b, MLP = ReLU tower `layers` (He et al., MLP)
  neumf     s(u, i) = h . [p_u^G * q_i^G ; MLP([p_u^M ; q_i^M])] + b   (NeuMF: separate
            embeddings for the two paths, fused by one output layer)
  mf        s(u, i) = <p_u, q_i> + b_u + b_i + b                       (Rendle et al. 2020:
            a well-tuned dot product, the baseline NeuMF must beat); with `history`, p_u also
            sums the user's latest training items before the example (`MF`)
  autorec   s(u, i) = <w_u, sigmoid(V^T r_i + mu)> + b_u + b_i + b       (item-based AutoRec,
            Sedhain et al. 2015: the item coded from its training interactions r_i; or, with
            side="user", the user coded from theirs)

`score_all(users)` scores every item for each user, [b, num_items]: mf, gmf and autorec, whose
score is a user vector . an item vector (+ biases), by one matmul against the item table (the
items' codes); the others pair by pair. Full-catalogue evaluation, `recommend` and the softmax
objective use it.

Objectives (in `trainer.objectives`): explicit, mean squared error on ratings; implicit, binary
cross-entropy of s(u, i) against 1 for observed pairs and 0 for sampled negatives; implicit_bpr,
the pairwise logistic loss of each positive against its negatives; implicit_softmax, each
positive against the whole catalogue (mf, gmf). Every model
adds `l2 * (|p_u|^2 + |q_i|^2 (+ b_u^2 + b_i^2))` per example (`scores_and_penalty`, from the
rows the scores were computed with): the regulariser touches only the rows of the batch, which
keeps embedding updates sparse.
The output bias starts at `output_bias` (the mean rating for explicit feedback).

Side features (`features`, `side_features.py`): each of a side's representations above
(p_u, q_i, and MF's biases) becomes its ID row plus its part of the side's feature embedding,
f(u) = sum of the embeddings of u's features, one embedding per side as wide as the side's
representations together (NeuMF: [GMF ; MLP], MF: [factors ; bias]); the L2 penalty stays on
the ID rows.

Context (`context`: per-interaction features, `trainer.data.context`) is embedded the same way,
from the example's values (`context_<name>` in the batch), and added to the user side: p_u
becomes p_u + f(u) + g(c), and so on for every user-side representation (MF's and autorec's
user bias; U-AutoRec's code). On the user side, a factorised model's `score_all` stays one
matmul per (user, context); inputs without context values score with none (g = 0).
"""

from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence

import keras
import numpy as np
from keras import ops

from trainer import schema
from trainer.config import MODEL_SPECS, MODELS, ConfigError, TrainConfig
from trainer.data import artifacts
from trainer.models.autorec import AutoRec
from trainer.models.base import Recommender, score_every_pair
from trainer.models.layers import Embedding, RowBlockNormal, Score
from trainer.models.mf import MF
from trainer.models.ncf import GMF, MLP, NeuMF
from trainer.models.seed_mlp import SeedMLP
from trainer.models.tables import INTERACTION_CHUNK, HistoryTable, InteractionTable

__all__ = ["AutoRec", "Embedding", "GMF", "HistoryTable", "INTERACTION_CHUNK",
           "InteractionTable", "MF", "MLP", "NeuMF", "REGISTRY", "Recommender", "RowBlockNormal",
           "Score", "SeedMLP", "build_model", "for_config", "score_every_pair"]


class Arguments(NamedTuple):
  """Every model's constructor arguments (each model takes the ones it needs)."""

  num_users: int
  num_items: int
  embedding_dim: int
  hidden_units: int
  layers: Sequence[int]
  mlp_embedding_dim: int
  dropout: float
  common: dict  # l2, output_bias, features, name: every model's
  interactions: Optional[Mapping[str, np.ndarray]]
  ratings: bool
  side: str
  history: int
  positives: Optional[Mapping[str, np.ndarray]]


# --model -> its class and its constructor call from `Arguments`.
REGISTRY: Dict[str, Callable[[Arguments], Recommender]] = {
    "seed_mlp": lambda a: SeedMLP(a.num_users, a.num_items, a.embedding_dim, a.hidden_units,
                                  **a.common),
    "gmf": lambda a: GMF(a.num_users, a.num_items, a.embedding_dim, **a.common),
    "mlp": lambda a: MLP(a.num_users, a.num_items, a.embedding_dim, a.layers, a.dropout,
                         **a.common),
    "neumf": lambda a: NeuMF(a.num_users, a.num_items, a.embedding_dim, a.mlp_embedding_dim,
                             a.layers, a.dropout, **a.common),
    "mf": lambda a: MF(a.num_users, a.num_items, a.embedding_dim, a.history, a.positives,
                       **a.common),
    "autorec": lambda a: AutoRec(a.num_users, a.num_items, a.embedding_dim, a.interactions,
                                 a.ratings, a.dropout, a.side, **a.common),
}
if set(REGISTRY) != set(MODEL_SPECS):  # the enumeration lives in config, for the flags
  raise ImportError(f"models {sorted(REGISTRY)} do not match --model's values {MODELS}")


def build_model(name: str, num_users: int, num_items: int, embedding_dim: int = 64,
                hidden_units: int = 256, rating_mean: float = 0.0, *,
                layers: Sequence[int] = (64, 32, 16, 8), mlp_embedding_dim: int = 32,
                dropout: float = 0.0, l2: float = 0.0,
                features: Optional[Mapping[str, schema.SideFeatures]] = None,
                interactions: Optional[Mapping[str, np.ndarray]] = None,
                ratings: bool = True, side: str = schema.ITEM, history: int = 0,
                positives: Optional[Mapping[str, np.ndarray]] = None,
                context: Sequence[schema.FeatureInfo] = ()) -> keras.Model:
  """Creates model `name` with its variables built (a custom loop needs them before step 1).

  Args:
    name: one of `trainer.config.MODELS`.
    embedding_dim: embedding size (the GMF path's for neumf; the MLP's for mlp).
    hidden_units: seed_mlp's hidden layer.
    rating_mean: the output bias's starting value.
    layers, mlp_embedding_dim, dropout: the MLP tower (mlp, neumf); autorec: the fraction of
      training examples coded from their features alone.
    l2: the embedding penalty's weight.
    features: {side: SideFeatures}: side features added to every representation of the side
      (`side_features.py`); None or empty: IDs only.
    interactions: autorec's training interactions as sparse rows of `side`
      (`PreparedData.train_interactions`); None: an empty table (every entity coded as a cold
      one).
    ratings: autorec's interactions are ratings (explicit feedback), not 1s.
    side: the side autorec codes, "item" (I-AutoRec) or "user" (U-AutoRec).
    history: mf: the user's latest training items before the example that its user vector
      sums (0: none).
    positives: with `history`, the training positives with their time order
      (`PreparedData.train_positives`).
    context: the context features (side `context`) whose embedding joins the user side;
      their values come with each example (`context_<name>`).

  Raises:
    ValueError: naming --model when `name` is unknown.
  """
  if name not in REGISTRY:
    raise ValueError(f"--model={name!r} is not a known model (one of {', '.join(MODELS)})")
  model = REGISTRY[name](Arguments(
      num_users, num_items, embedding_dim, hidden_units, layers, mlp_embedding_dim, dropout,
      dict(l2=l2, output_bias=rating_mean, features=features, context=list(context), name=name),
      interactions,
      ratings, side, history, positives))
  model({schema.USER: ops.zeros((1,), "int64"), schema.ITEM: ops.zeros((1,), "int64")})
  return model


def for_config(config: TrainConfig, data: artifacts.PreparedData) -> keras.Model:
  """The configured model for a prepared data directory (vocabularies, side features)."""
  metadata = data.metadata
  output_bias = (metadata.train_rating_mean if config.objective_spec.bias_at_mean_rating
                 else 0.0)
  if config.history and "time_rank" not in data.train_positives:
    raise ConfigError(f"--history={config.history} needs the training interactions' time "
                      f"order, which --data_dir={data.data_dir!r} lacks (prepared by an older "
                      "neumf-prepare): prepare it again")
  return build_model(config.model, metadata.num_users, metadata.num_items,
                     config.embedding_dim, config.hidden_units, output_bias,
                     layers=config.layers, mlp_embedding_dim=config.mlp_embedding_dim,
                     dropout=config.dropout, l2=config.l2,
                     features=data.side_features(config.features),
                     interactions=(data.train_interactions(config.autorec_side)
                                   if config.model == "autorec" else None),
                     ratings=not metadata.implicit, side=config.autorec_side,
                     history=config.history,
                     positives=data.train_positives if config.history else None,
                     context=data.context_infos(config.features))
