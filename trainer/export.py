"""Export of a trained model as a self-contained SavedModel for serving.

Signatures (raw string IDs in, so clients never see dense indices; vocabularies travel inside):

  serving_default(user: string[b], item: string[b])
      -> explicit models: rating: float[b] (clipped to the data's rating range);
         implicit models: score: float[b] (the probability of an interaction);
         user_known, item_known: bool[b]
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

from trainer import fileio, schema

SERVING_DEFAULT = "serving_default"
RECOMMEND = "recommend"


def _lookup_table(keys, name: str) -> tf.lookup.StaticHashTable:
  """Raw ID -> dense index; unknown IDs map to len(keys), the out-of-vocabulary row."""
  initializer = tf.lookup.KeyValueTensorInitializer(
      tf.constant(keys, tf.string), tf.range(len(keys), dtype=tf.int64))
  return tf.lookup.StaticHashTable(initializer, default_value=len(keys), name=name)


def export_saved_model(model: keras.Model, export_dir: str, data_dir: str,
                       metadata: schema.Metadata, task: str = "explicit") -> str:
  """Writes the SavedModel of `model` to `export_dir` (local or `gs://`).

  Args:
    model: a trained model of `trainer.models` (dense indices -> score).
    export_dir: where to write; an existing export there is replaced.
    data_dir: the prepared data directory whose vocabularies the model was trained on.
    metadata: that directory's metadata (vocabulary sizes, rating range).
    task: explicit (serve ratings) or implicit (serve interaction probabilities).

  Returns:
    export_dir.
  """
  user_ids = fileio.read_lines(fileio.join(data_dir, schema.USER_VOCAB_FILE))
  item_ids = fileio.read_lines(fileio.join(data_dir, schema.ITEM_VOCAB_FILE))
  if len(user_ids) != metadata.num_users or len(item_ids) != metadata.num_items:
    raise ValueError(f"--data_dir={data_dir}: vocabularies hold {len(user_ids)} users and "
                     f"{len(item_ids)} items but the metadata says {metadata.num_users} and "
                     f"{metadata.num_items}")
  num_users, num_items = len(user_ids), len(item_ids)
  low, high = metadata.rating_min, metadata.rating_max

  from trainer.data import preparation  # the positives file's reader
  positives = preparation.load_npz(fileio.join(data_dir, preparation.TRAIN_POSITIVES_FILE))

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
  user_table, item_table, item_vocab = module.user_table, module.item_table, module.item_ids
  seen_items, seen_splits = module.seen_items, module.seen_splits

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user"),
                                tf.TensorSpec([None], tf.string, name="item")])
  def serve(user, item):
    users = user_table.lookup(user)  # [b]
    items = item_table.lookup(item)  # [b]
    scores = tf.cast(model({schema.USER: users, schema.ITEM: items}, training=False),
                     tf.float32)  # [b]
    if task == "implicit":
      served = {"score": tf.sigmoid(scores)}
    else:
      served = {"rating": tf.clip_by_value(scores, low, high)}
    return {**served, "user_known": users < num_users, "item_known": items < num_items}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user"),
                                tf.TensorSpec([], tf.int32, name="k")])
  def recommend(user, k):
    tf.debugging.assert_positive(k, message="recommend: k must be positive")
    users = user_table.lookup(user)  # [b]
    batch = tf.shape(users)[0]
    all_items = tf.range(num_items, dtype=tf.int64)  # [n]
    scores = tf.cast(model({schema.USER: tf.repeat(users, num_items),  # [b * n]
                            schema.ITEM: tf.tile(all_items, [batch])}, training=False),
                     tf.float32)
    scores = tf.reshape(scores, [batch, num_items])  # [b, n]
    seen = tf.RaggedTensor.from_row_splits(seen_items, seen_splits)
    known_users = tf.minimum(users, num_users - 1)  # the OOV row has no history
    rows = tf.gather(seen, known_users)  # [b, None]
    coordinates = tf.stack([rows.value_rowids(), rows.flat_values], axis=1)
    coordinates = tf.boolean_mask(coordinates, tf.gather(users < num_users, rows.value_rowids()))
    excluded = tf.scatter_nd(coordinates, tf.ones(tf.shape(coordinates)[:1], tf.bool),
                             tf.cast(tf.shape(scores), tf.int64))
    scores = tf.where(excluded, tf.constant(-np.inf, tf.float32), scores)
    top = tf.math.top_k(scores, k=tf.minimum(k, num_items))  # [b, k']
    return {"items": tf.gather(item_vocab, top.indices), "scores": top.values,
            "user_known": users < num_users}

  module.serve = serve
  module.recommend = recommend
  tf.saved_model.save(module, export_dir,
                      signatures={SERVING_DEFAULT: serve, RECOMMEND: recommend})
  logging.info("Exported SavedModel with signatures %s, %s to %s", SERVING_DEFAULT, RECOMMEND,
               export_dir)
  return export_dir
