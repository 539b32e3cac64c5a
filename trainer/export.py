"""Export of a trained model as a self-contained SavedModel for serving.

Signatures (raw string IDs in, so clients never see dense indices; vocabularies travel inside):

  serving_default(user: string[b], item: string[b])
      -> what the objective serves (`trainer.objectives`): explicit, rating: float[b]
         (clipped to the data's rating range); implicit, score: float[b] (the probability of
         an interaction); implicit_bpr, score: float[b] (a ranking score);
         and user_known, item_known: bool[b]
  recommend(user: string[b], k: int32 scalar)
      -> items: string[b, k'], scores: float[b, k'] (model scores, best first), user_known:
         bool[b]; k' = min(k, number of items). Items the user has in the training data are
         never recommended (their scores are -inf, and they come last if k' reaches them).

Unknown IDs map to the models' out-of-vocabulary row and are flagged `*_known = False`, so one
unknown ID does not fail a whole request batch.

The Keras model is captured by the serving functions' closures and only its variables are
attached to the exported module: a Keras model stored as an attribute reloads with
`tf.saved_model.load` but breaks the session-based loader of `saved_model_cli run` and TF
Serving ("Could not find variable").
"""

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import objectives, schema
from trainer.data import artifacts

SERVING_DEFAULT = "serving_default"
RECOMMEND = "recommend"


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
  tf.saved_model.save(module, export_dir,
                      signatures={SERVING_DEFAULT: module.serve, RECOMMEND: module.recommend})
  logging.info("Exported SavedModel with signatures %s, %s to %s", SERVING_DEFAULT, RECOMMEND,
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
    batch = tf.shape(users)[0]
    all_items = tf.range(num_items, dtype=tf.int64)  # [n]
    scores = tf.cast(model({schema.USER: tf.repeat(users, num_items),  # [b * n]
                            schema.ITEM: tf.tile(all_items, [batch])}, training=False),
                     tf.float32)
    scores = tf.reshape(scores, [batch, num_items])  # [b, n]
    seen = tf.RaggedTensor.from_row_splits(module.seen_items, module.seen_splits)
    known_users = tf.minimum(users, num_users - 1)  # the OOV row has no history
    rows = tf.gather(seen, known_users)  # [b, None]
    coordinates = tf.stack([rows.value_rowids(), rows.flat_values], axis=1)
    coordinates = tf.boolean_mask(coordinates, tf.gather(users < num_users, rows.value_rowids()))
    excluded = tf.scatter_nd(coordinates, tf.ones(tf.shape(coordinates)[:1], tf.bool),
                             tf.cast(tf.shape(scores), tf.int64))
    scores = tf.where(excluded, tf.constant(-np.inf, tf.float32), scores)
    top = tf.math.top_k(scores, k=tf.minimum(k, num_items))  # [b, k']
    return {"items": tf.gather(module.item_ids, top.indices), "scores": top.values,
            "user_known": users < num_users}

  return recommend
