"""I-AutoRec (Sedhain et al. 2015, "AutoRec: Autoencoders Meet Collaborative Filtering"), a
reference for explicit ratings on an exported split: a published model that is not a library
users install, so `quality.py` shows it beside the peers without racing it.

Each item is the vector of the ratings its users gave in training, r_i [users], and is
reconstructed through one sigmoid layer: h(r_i) = W . sigmoid(V r_i + mu) + b, the loss the
squared error on the observed entries only plus lambda / 2 (|W|^2 + |V|^2); the prediction of
(u, i) is h(r_i)[u], clipped to the rating range. The paper's settings: 500 hidden units; here
Adam (learning rate 1e-3, 100 items a step) instead of L-BFGS/RProp, and lambda = 10 with 30
epochs, chosen on the ML-100K validation split (`validation_split.py`, seed 1; lambda 1, 10, 30
tried; epochs in tens), never on the eval split.
"""

import os
import time
from typing import Dict

import numpy as np

HIDDEN, L2, EPOCHS, LEARNING_RATE, ITEMS_PER_STEP = 500, 10.0, 30, 1e-3, 100


def fit(split_dir: str, seed: int, rating_range, hidden: int = HIDDEN, l2: float = L2,
        epochs: int = EPOCHS) -> Dict[str, float]:
  """Fits on `split_dir`'s train.csv and scores its eval.csv: RMSE, MAE, fit seconds."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  import split_export
  train = list(split_export.read_csv_rows(os.path.join(split_dir, "train.csv")))
  held_out = list(split_export.read_csv_rows(os.path.join(split_dir, "eval.csv")))
  users = {u: n for n, u in enumerate(sorted({u for u, _, _ in train + held_out}))}
  items = {i: n for n, i in enumerate(sorted({i for _, i, _ in train + held_out}))}
  ratings = np.zeros((len(items), len(users)), np.float32)  # [items, users], 0: unobserved
  for u, i, r in train:
    ratings[items[i], users[u]] = r
  observed = tf.constant((ratings > 0).astype(np.float32))
  ratings = tf.constant(ratings)
  tf.random.set_seed(seed)
  glorot = tf.keras.initializers.GlorotUniform(seed=seed)
  encoder, decoder = tf.Variable(glorot((len(users), hidden))), tf.Variable(
      glorot((hidden, len(users))))
  mu, bias = tf.Variable(tf.zeros(hidden)), tf.Variable(tf.zeros(len(users)))
  weights = [encoder, mu, decoder, bias]
  optimizer = tf.keras.optimizers.Adam(LEARNING_RATE)

  def reconstruct(r):
    return tf.sigmoid(r @ encoder + mu) @ decoder + bias

  @tf.function
  def step(rows):
    r, m = tf.gather(ratings, rows), tf.gather(observed, rows)
    with tf.GradientTape() as tape:
      loss = (tf.reduce_sum(m * tf.square(r - reconstruct(r)))
              + l2 / 2 * (tf.reduce_sum(tf.square(encoder)) + tf.reduce_sum(tf.square(decoder))))
    optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights))

  rng = np.random.default_rng(seed)
  started = time.time()
  for _ in range(epochs):
    order = rng.permutation(len(items))
    for start in range(0, len(items), ITEMS_PER_STEP):
      step(tf.constant(order[start:start + ITEMS_PER_STEP]))
  predicted = reconstruct(ratings).numpy()
  seconds = time.time() - started
  rows = np.array([items[i] for _, i, _ in held_out])
  cols = np.array([users[u] for u, _, _ in held_out])
  errors = np.clip(predicted[rows, cols], *rating_range) - np.array([r for _, _, r in held_out])
  return {"eval_rmse": float(np.sqrt(np.mean(errors ** 2))),
          "eval_mae": float(np.mean(np.abs(errors))), "train_seconds": seconds}
