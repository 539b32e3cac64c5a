"""Export of a trained model as a self-contained SavedModel for serving.

Signatures (raw string IDs in, so clients never see dense indices; vocabularies travel inside):

  serving_default(user: string[b], item: string[b])
      -> what the objective serves (`trainer.objectives`): explicit, rating: float[b]
         (clipped to the data's rating range); implicit, score: float[b] (the probability of
         an interaction); implicit_bpr and implicit_softmax, score: float[b] (a ranking score);
         and user_known, item_known: bool[b]
  recommend(user: string[b], k: int32 scalar)
      -> items: string[b, k'], scores: float[b, k'] (model scores, best first), user_known:
         bool[b]; k' = min(k, number of items). Items the user has in the training data are
         never recommended (their scores are -inf, and they come last if k' reaches them).

With context (a model trained with context features, `trainer.data.context`):

  score_context(user: string[b], item: string[b], context_<name>[b]...)
      -> what serving_default serves, each example in its own context
  recommend_context(user: string[b], k: int32 scalar, context_<name>[b]...)
      -> what recommend returns, each user in their request's context ("what to watch on a
         Friday night on a TV")

  one input per context feature: categorical, a string ("" for missing); numeric and
  bucketized (hour 0-23, weekday 0 (Monday)-6, tenure and item_age in days), a float (NaN for
  missing). serving_default and recommend take no context: they score with none (every value
  missing).

Unknown IDs (the empty string and IDs of any length included) map to the models'
out-of-vocabulary row and are flagged `*_known = False`, so one unknown ID does not fail a
whole request batch. A bad request fails with InvalidArgumentError naming the signature and
the inputs: k <= 0, or inputs of one example each that differ in length.

The Keras model is captured by the serving functions' closures and only its variables are
attached to the exported module: a Keras model stored as an attribute reloads with
`tf.saved_model.load` but breaks the session-based loader of `saved_model_cli run` and TF
Serving ("Could not find variable").
"""

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import models, objectives, schema
from trainer.models.side_features import combine
from trainer.data import artifacts

SERVING_DEFAULT = "serving_default"
RECOMMEND = "recommend"
SCORE_FEATURES = "score_features"
RECOMMEND_FEATURES = "recommend_features"
SCORE_USER_FEATURES = "score_user_features"
RECOMMEND_USER_FEATURES = "recommend_user_features"
RECOMMEND_RECENT = "recommend_recent"
SCORE_CONTEXT = "score_context"
RECOMMEND_CONTEXT = "recommend_context"


def _lookup_table(keys, name: str) -> tf.lookup.StaticHashTable:
  """Raw ID -> dense index; unknown IDs map to len(keys), the out-of-vocabulary row."""
  initializer = tf.lookup.KeyValueTensorInitializer(
      tf.constant(keys, tf.string), tf.range(len(keys), dtype=tf.int64))
  return tf.lookup.StaticHashTable(initializer, default_value=len(keys), name=name)


def export_saved_model(model: keras.Model, export_dir: str, data: artifacts.PreparedData,
                       objective: objectives.Objective) -> str:
  """Writes the SavedModel of `model` to `export_dir` (local or `gs://`).

  Args:
    model: a trained model of `trainer.models` (dense indices -> score).
    export_dir: where to write; an existing export there is replaced.
    data: the prepared data the model was trained on (vocabularies, training positives).
    objective: what the model was trained for, and so what it serves.

  Returns:
    export_dir.
  """
  module = _serving_module(model, data)
  module.serve = _serve_function(module, model, data.metadata, objective)
  module.recommend = _recommend_function(module, model, data.metadata)
  signatures = {SERVING_DEFAULT: module.serve, RECOMMEND: module.recommend}
  if isinstance(model, models.MF) and model.history:  # recommend from recent items
    module.recommend_recent = _recommend_recent_function(module, model, data.metadata)
    signatures[RECOMMEND_RECENT] = module.recommend_recent
  sides = {side: tables.infos for side, tables in model.feature_sides.items()}
  described = (  # (features, encoder's attribute, (score signature), (recommend signature))
      # cold start: items described by their features alone
      (sides.get(schema.ITEM), "item_feature_encoder",
       (SCORE_FEATURES, _score_features_function),
       (RECOMMEND_FEATURES, _recommend_features_function)),
      # cold start: new users described by their profile
      (sides.get(schema.USER), "user_feature_encoder",
       (SCORE_USER_FEATURES, _score_user_features_function),
       (RECOMMEND_USER_FEATURES, _recommend_user_features_function)),
      # each request in its own context
      (model.context_infos, "context_encoder", (SCORE_CONTEXT, _score_context_function),
       (RECOMMEND_CONTEXT, _recommend_context_function)))
  for infos, attribute, (score, score_function), (recommend, recommend_function) in described:
    if not infos:
      continue
    encoder = FeatureEncoder(infos, data)
    setattr(module, attribute, encoder)
    signatures[score] = score_function(module, model, data.metadata, objective, encoder)
    signatures[recommend] = recommend_function(module, model, data.metadata, encoder)
    setattr(module, score, signatures[score])
    setattr(module, recommend, signatures[recommend])
  tf.saved_model.save(module, export_dir, signatures=signatures)
  logging.info("Exported SavedModel with signatures %s to %s", ", ".join(signatures),
               export_dir)
  return export_dir


def _serving_module(model: keras.Model, data: artifacts.PreparedData) -> tf.Module:
  """A module tracking what serving needs: the vocabularies' lookup tables, each user's
  training items, and the model's variables."""
  user_ids, item_ids = data.vocabularies()
  positives = data.train_positives
  module = tf.Module()
  module.seen_items = tf.Variable(positives["indices"].astype(np.int64), trainable=False,
                                  name="seen_items")
  module.seen_splits = tf.Variable(positives["indptr"].astype(np.int64), trainable=False,
                                   name="seen_splits")
  module.user_table = _lookup_table(user_ids, "user_lookup")
  module.item_table = _lookup_table(item_ids, "item_lookup")
  module.item_ids = tf.Variable(item_ids, dtype=tf.string, trainable=False, name="item_ids")
  # The tf.Variables behind the Keras variables: tracked here, read through the closures.
  module.model_variables = [v.value if isinstance(v, keras.Variable) else v
                            for v in model.variables]
  return module


def _serve_function(module: tf.Module, model: keras.Model, metadata: schema.Metadata,
                    objective: objectives.Objective):
  num_users, num_items = metadata.num_users, metadata.num_items

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user"),
                                tf.TensorSpec([None], tf.string, name="item")])
  def serve(user, item):
    _same_length("serving_default", {"user": user, "item": item})
    users = module.user_table.lookup(user)  # [b]
    items = module.item_table.lookup(item)  # [b]
    scores = tf.cast(model({schema.USER: users, schema.ITEM: items}, training=False),
                     tf.float32)  # [b]
    return {**objective.serve(scores, metadata), "user_known": users < num_users,
            "item_known": items < num_items}

  return serve


def _recommend_function(module: tf.Module, model: keras.Model, metadata: schema.Metadata):
  num_users, num_items = metadata.num_users, metadata.num_items

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user"),
                                tf.TensorSpec([], tf.int32, name="k")])
  def recommend(user, k):
    tf.debugging.assert_positive(k, message="recommend: k must be positive")
    users = module.user_table.lookup(user)  # [b]
    scores = tf.cast(model.score_all(users, training=False), tf.float32)  # [b, n]
    return _top_unseen(module, scores, users, k, num_users, num_items)

  return recommend


def _same_length(signature: str, named) -> None:
  """Refuses a request whose inputs (one per example) differ in length, naming them, instead
  of a shape error from deep inside the model."""
  (first_name, first), *rest = named.items()
  for name, value in rest:
    tf.debugging.assert_equal(
        tf.shape(value)[0], tf.shape(first)[0],
        message=f"{signature}: {name} and {first_name} must have the same length (one per "
        "example)")


def _top_unseen(module: tf.Module, scores, users, k, num_users: int, num_items: int,
                also=None):
  """The `recommend` outputs from scores [b, n]: the top k of the items each user has not
  trained on (nor, with `also` [b, m] item indices, any of those; `num_items` ignored)."""
  seen = tf.RaggedTensor.from_row_splits(module.seen_items, module.seen_splits)
  known_users = tf.minimum(users, num_users - 1)  # the OOV row has no history
  rows = tf.gather(seen, known_users)  # [b, None]
  coordinates = tf.stack([rows.value_rowids(), rows.flat_values], axis=1)
  coordinates = tf.boolean_mask(coordinates, tf.gather(users < num_users, rows.value_rowids()))
  if also is not None:
    extra = tf.where(also < num_items)  # [m', 2]: (row, column) of the known items
    coordinates = tf.concat([coordinates, tf.stack(
        [extra[:, 0], tf.gather_nd(also, extra)], axis=1)], axis=0)
  excluded = tf.scatter_nd(coordinates, tf.ones(tf.shape(coordinates)[:1], tf.bool),
                           tf.cast(tf.shape(scores), tf.int64))
  scores = tf.where(excluded, tf.constant(-np.inf, tf.float32), scores)
  top = tf.math.top_k(scores, k=tf.minimum(k, num_items))  # [b, k']
  return {"items": tf.gather(module.item_ids, top.indices), "scores": top.values,
          "user_known": users < num_users}


def _recommend_recent_function(module: tf.Module, model: keras.Model,
                               metadata: schema.Metadata):
  """mf with `history`: recommend from the items a user interacted with since training
  (latest first, "" padding; the first `history` count, unknown ones ignored), in place of
  their training history; neither those nor the training items are recommended."""
  num_users, num_items, length = metadata.num_users, metadata.num_items, model.history

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user"),
                                tf.TensorSpec([None, None], tf.string, name="recent"),
                                tf.TensorSpec([], tf.int32, name="k")])
  def recommend_recent(user, recent, k):
    tf.debugging.assert_positive(k, message="recommend_recent: k must be positive")
    _same_length("recommend_recent", {"user": user, "recent": recent})
    users = module.user_table.lookup(user)  # [b]
    recent = module.item_table.lookup(recent)[:, :length]  # [b, <= L]
    latest = tf.pad(recent, [[0, 0], [0, length - tf.shape(recent)[1]]],
                    constant_values=num_items)  # [b, L]
    scores = tf.cast(model.score_all(users, training=False, latest=latest), tf.float32)
    return _top_unseen(module, scores, users, k, num_users, num_items, also=latest)

  return recommend_recent


class FeatureEncoder(tf.Module):
  """Raw feature values of one side -> the model's feature layout, in the serving graph.

  Inputs, one per feature of the side, named `<side>_<feature>` (item_genres, user_age):
  categorical, a string [n] ("" for missing); multi_hot, a string [n, m] padded with "";
  numeric and bucketized, a float [n] (NaN for missing). Values outside a vocabulary count as
  missing, as in training.
  """

  def __init__(self, infos, data: artifacts.PreparedData):
    super().__init__()
    self.infos = list(infos)
    entries = {(e["side"], e["name"]): e for e in data.metadata.features}
    self.tables = {}
    self.numbers = {}
    for info in self.infos:
      entry = entries[(info.side, info.name)]
      if info.kind in ("categorical", "multi_hot"):
        values = data.feature_vocabulary(info.side, info.name)
        initializer = tf.lookup.KeyValueTensorInitializer(
            tf.constant(values, tf.string), tf.range(1, len(values) + 1, dtype=tf.int64))
        self.tables[info.name] = tf.lookup.StaticHashTable(initializer, default_value=0,
                                                           name=f"{info.name}_lookup")
      elif info.kind == "numeric":
        self.numbers[info.name] = (entry["mean"], entry["std"])
      else:
        self.numbers[info.name] = tf.constant(entry["edges"], tf.float32)

  def input_specs(self):
    return [tf.TensorSpec([None, None] if i.kind == "multi_hot" else [None],
                          tf.float32 if i.kind in ("numeric", "bucketized") else tf.string,
                          name=f"{i.side}_{i.name}") for i in self.infos]

  def named(self, values):
    """{input name: tensor} of features given in `infos` order."""
    return {f"{i.side}_{i.name}": value for i, value in zip(self.infos, values)}

  def encode(self, values):
    """The combined layout (`side_features.combine`) of features given in `infos` order."""
    per_feature = {}
    for info, value in zip(self.infos, values):
      if info.kind in ("categorical", "multi_hot"):
        per_feature[info.name] = tf.cast(self.tables[info.name].lookup(value), tf.int64)
      elif info.kind == "numeric":
        mean, std = self.numbers[info.name]
        per_feature[info.name] = tf.where(tf.math.is_nan(value), 0.0, (value - mean) / std)
      else:
        bucket = 1 + tf.searchsorted(self.numbers[info.name][None, :],
                                     tf.where(tf.math.is_nan(value), 0.0, value)[None, :],
                                     side="right")[0]
        per_feature[info.name] = tf.where(tf.math.is_nan(value), 0, bucket)
    return combine(self.infos, per_feature)


def _score_features_function(module: tf.Module, model: keras.Model, metadata: schema.Metadata,
                             objective: objectives.Objective, encoder: FeatureEncoder):
  """score_features(user [b], item_<feature> [b]...): what serving_default serves, for items
  given by their features (scored with the out-of-vocabulary item ID)."""
  num_users, num_items = metadata.num_users, metadata.num_items

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user"),
                                *encoder.input_specs()])
  def score_features(user, *features):
    _same_length("score_features", {"user": user, **encoder.named(features)})
    users = module.user_table.lookup(user)  # [b]
    items = tf.fill(tf.shape(users), tf.constant(num_items, tf.int64))  # the OOV row
    scores = tf.cast(model({schema.USER: users, schema.ITEM: items,
                            "item_features": encoder.encode(features)}, training=False),
                     tf.float32)
    return {**objective.serve(scores, metadata), "user_known": users < num_users}

  return score_features


def _recommend_features_function(module: tf.Module, model: keras.Model,
                                 metadata: schema.Metadata, encoder: FeatureEncoder):
  """recommend_features(user [b], k, item_<feature> [n]...): each user's top k of a supplied
  catalogue of n items given by their features: `indices` int32 [b, k'] into the catalogue,
  `scores` float [b, k'] (model scores, best first)."""
  num_users, num_items = metadata.num_users, metadata.num_items

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user"),
                                tf.TensorSpec([], tf.int32, name="k"),
                                *encoder.input_specs()])
  def recommend_features(user, k, *features):
    tf.debugging.assert_positive(k, message="recommend_features: k must be positive")
    _same_length("recommend_features", encoder.named(features))
    users = module.user_table.lookup(user)  # [b]
    combined = encoder.encode(features)  # [n, ...]
    batch, n = tf.shape(users)[0], tf.shape(combined["indices"])[0]
    tiled = {name: tf.tile(value, [batch, 1]) for name, value in combined.items()}  # [b * n]
    scores = tf.cast(model({schema.USER: tf.repeat(users, n),
                            schema.ITEM: tf.fill([batch * n], tf.constant(num_items, tf.int64)),
                            "item_features": tiled}, training=False), tf.float32)
    top = tf.math.top_k(tf.reshape(scores, [batch, n]), k=tf.minimum(k, n))
    return {"indices": top.indices, "scores": top.values, "user_known": users < num_users}

  return recommend_features


def _score_user_features_function(module: tf.Module, model: keras.Model,
                                  metadata: schema.Metadata, objective: objectives.Objective,
                                  encoder: FeatureEncoder):
  """score_user_features(item [b], user_<feature> [b]...): what serving_default serves, for
  users given by their profile (scored with the out-of-vocabulary user ID)."""
  num_users, num_items = metadata.num_users, metadata.num_items

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="item"),
                                *encoder.input_specs()])
  def score_user_features(item, *features):
    _same_length("score_user_features", {"item": item, **encoder.named(features)})
    items = module.item_table.lookup(item)  # [b]
    users = tf.fill(tf.shape(items), tf.constant(num_users, tf.int64))  # the OOV row
    scores = tf.cast(model({schema.USER: users, schema.ITEM: items,
                            "user_features": encoder.encode(features)}, training=False),
                     tf.float32)
    return {**objective.serve(scores, metadata), "item_known": items < num_items}

  return score_user_features


def _recommend_user_features_function(module: tf.Module, model: keras.Model,
                                      metadata: schema.Metadata, encoder: FeatureEncoder):
  """recommend_user_features(k, user_<feature> [b]...): the top k of every trained item for
  each of b new users given by their profile: items string [b, k'], scores float [b, k']."""
  num_users, num_items = metadata.num_users, metadata.num_items

  @tf.function(input_signature=[tf.TensorSpec([], tf.int32, name="k"),
                                *encoder.input_specs()])
  def recommend_user_features(k, *features):
    tf.debugging.assert_positive(k, message="recommend_user_features: k must be positive")
    _same_length("recommend_user_features", encoder.named(features))
    combined = encoder.encode(features)  # [b, ...]
    batch = tf.shape(combined["indices"])[0]
    repeated = {name: tf.repeat(value, num_items, axis=0) for name, value in combined.items()}
    scores = tf.cast(model({schema.USER: tf.fill([batch * num_items],
                                                 tf.constant(num_users, tf.int64)),
                            schema.ITEM: tf.tile(tf.range(num_items, dtype=tf.int64), [batch]),
                            "user_features": repeated}, training=False), tf.float32)
    top = tf.math.top_k(tf.reshape(scores, [batch, num_items]), k=tf.minimum(k, num_items))
    return {"items": tf.gather(module.item_ids, top.indices), "scores": top.values}

  return recommend_user_features


def _score_context_function(module: tf.Module, model: keras.Model, metadata: schema.Metadata,
                            objective: objectives.Objective, encoder: FeatureEncoder):
  """score_context(user [b], item [b], context_<feature> [b]...): what serving_default serves,
  each example in its context."""
  num_users, num_items = metadata.num_users, metadata.num_items

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user"),
                                tf.TensorSpec([None], tf.string, name="item"),
                                *encoder.input_specs()])
  def score_context(user, item, *context):
    _same_length("score_context", {"user": user, "item": item, **encoder.named(context)})
    users, items = module.user_table.lookup(user), module.item_table.lookup(item)
    scores = tf.cast(model({schema.USER: users, schema.ITEM: items,
                            "context_features": encoder.encode(context)}, training=False),
                     tf.float32)
    return {**objective.serve(scores, metadata), "user_known": users < num_users,
            "item_known": items < num_items}

  return score_context


def _recommend_context_function(module: tf.Module, model: keras.Model,
                                metadata: schema.Metadata, encoder: FeatureEncoder):
  """recommend_context(user [b], k, context_<feature> [b]...): what recommend returns, each
  user in their request's context."""
  num_users, num_items = metadata.num_users, metadata.num_items

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user"),
                                tf.TensorSpec([], tf.int32, name="k"),
                                *encoder.input_specs()])
  def recommend_context(user, k, *context):
    tf.debugging.assert_positive(k, message="recommend_context: k must be positive")
    _same_length("recommend_context", {"user": user, **encoder.named(context)})
    users = module.user_table.lookup(user)  # [b]
    scores = tf.cast(model.score_all(users, training=False,
                                     context={"context_features": encoder.encode(context)}),
                     tf.float32)  # [b, n]
    return _top_unseen(module, scores, users, k, num_users, num_items)

  return recommend_context
