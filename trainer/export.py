"""Export of a trained model as a self-contained SavedModel for serving.

Signatures (raw string IDs in, so clients never see dense indices; vocabularies travel inside):

  serving_default(user: string[b], item: string[b])
      -> rating: float[b] (clipped to the data's rating range), user_known, item_known: bool[b]
  recommend(user: string[b], k: int32 scalar)
      -> items: string[b, k'], scores: float[b, k'] (model scores, best first), user_known:
         bool[b]; k' = min(k, number of items)

Unknown IDs map to the models' out-of-vocabulary row and are flagged `*_known = False`, so one
unknown ID does not fail a whole request batch.

The Keras model is captured by the serving functions' closures and only its variables are
attached to the exported module: a Keras model stored as an attribute reloads with
`tf.saved_model.load` but breaks the session-based loader of `saved_model_cli run` and TF
Serving ("Could not find variable").
"""

import keras
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
                       metadata: schema.Metadata) -> str:
  """Writes the SavedModel of `model` to `export_dir` (local or `gs://`).

  Args:
    model: a trained model of `trainer.models` (dense indices -> score).
    export_dir: where to write; an existing export there is replaced.
    data_dir: the prepared data directory whose vocabularies the model was trained on.
    metadata: that directory's metadata (vocabulary sizes, rating range).

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

  module = tf.Module()
  module.user_table = _lookup_table(user_ids, "user_lookup")
  module.item_table = _lookup_table(item_ids, "item_lookup")
  module.item_ids = tf.Variable(item_ids, dtype=tf.string, trainable=False, name="item_ids")
  # The tf.Variables behind the Keras variables: tracked here, read through the closures.
  module.model_variables = [v.value if isinstance(v, keras.Variable) else v
                            for v in model.variables]
  user_table, item_table, item_vocab = module.user_table, module.item_table, module.item_ids

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user"),
                                tf.TensorSpec([None], tf.string, name="item")])
  def serve(user, item):
    users = user_table.lookup(user)  # [b]
    items = item_table.lookup(item)  # [b]
    scores = model({schema.USER: users, schema.ITEM: items}, training=False)  # [b]
    return {"rating": tf.clip_by_value(scores, low, high),
            "user_known": users < num_users, "item_known": items < num_items}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user"),
                                tf.TensorSpec([], tf.int32, name="k")])
  def recommend(user, k):
    tf.debugging.assert_positive(k, message="recommend: k must be positive")
    users = user_table.lookup(user)  # [b]
    batch = tf.shape(users)[0]
    all_items = tf.range(num_items, dtype=tf.int64)  # [n]
    scores = model({schema.USER: tf.repeat(users, num_items),  # [b * n]
                    schema.ITEM: tf.tile(all_items, [batch])}, training=False)
    top = tf.math.top_k(tf.reshape(scores, [batch, num_items]),  # [b, n]
                        k=tf.minimum(k, num_items))  # [b, k']
    return {"items": tf.gather(item_vocab, top.indices), "scores": top.values,
            "user_known": users < num_users}

  module.serve = serve
  module.recommend = recommend
  tf.saved_model.save(module, export_dir,
                      signatures={SERVING_DEFAULT: serve, RECOMMEND: recommend})
  logging.info("Exported SavedModel with signatures %s, %s to %s", SERVING_DEFAULT, RECOMMEND,
               export_dir)
  return export_dir
