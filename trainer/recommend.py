"""Command line of recommendation: `python -m trainer.recommend` (installed as `neumf-recommend`).

Loads only the exported SavedModel (plain TensorFlow, none of the training code) and prints a
user's top-k items with their scores:

  neumf-recommend --export_dir=/tmp/model/export --user=u42 --k=10
  neumf-recommend --export_dir=/tmp/model/export --user=u42 --recent=i7,i3   # mf --history
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # before TensorFlow loads: hide C++ INFO

from absl import app, flags  # noqa: E402

from trainer import cli  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The flags, defined when the command line starts (importing this module defines none)."""
  flags.DEFINE_string("export_dir", None,
                      "The SavedModel written by neumf-train (local or gs://).")
  flags.DEFINE_multi_string("user", None, "Raw user ID; repeat the flag for several users.")
  flags.DEFINE_integer("k", 10, "How many items to recommend.", lower_bound=1)
  flags.DEFINE_list("recent", None, "Models trained with --history: the items the users "
                    "interacted with since training, latest first, in place of their training "
                    "history (the `recommend_recent` signature).")
  flags.mark_flags_as_required(["export_dir", "user"])


def recommend(export_dir: str, users, k: int, recent=None):
  """Returns [(user, known, [(item, score), ...])] from the SavedModel's `recommend` signature,
  or with `recent` (items, latest first, the same for every user) `recommend_recent`'s."""
  import tensorflow as tf
  if not tf.io.gfile.exists(os.path.join(export_dir, "saved_model.pb")):
    raise ValueError(f"--export_dir={export_dir!r} holds no SavedModel (saved_model.pb)")
  loaded = tf.saved_model.load(export_dir)
  name = "recommend_recent" if recent else "recommend"
  if name not in loaded.signatures:
    raise ValueError(f"--export_dir={export_dir!r}: the SavedModel has no {name!r} signature"
                     + (" (--recent needs a model trained with --history)" if recent else ""))
  extra = {"recent": tf.constant([list(recent)] * len(users))} if recent else {}
  out = loaded.signatures[name](user=tf.constant(users), k=tf.constant(k, tf.int32), **extra)
  items, scores, known = out["items"].numpy(), out["scores"].numpy(), out["user_known"].numpy()
  return [(user, bool(known[r]), [(i.decode(), float(s)) for i, s in zip(items[r], scores[r])])
          for r, user in enumerate(users)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    results = recommend(FLAGS.export_dir, FLAGS.user, FLAGS.k, FLAGS.recent)
  except ValueError as e:
    print(f"neumf-recommend: error: {e}", file=sys.stderr)
    sys.exit(2)
  for user, known, ranked in results:
    note = "" if known else "  (unknown user: scores of the out-of-vocabulary embedding)"
    print(f"Top {len(ranked)} for user {user}{note}")
    for rank, (item, score) in enumerate(ranked, start=1):
      print(f"{rank:4d}  {item:<24} {score:8.4f}")


def run():
  """Console-script entry point."""
  _define_flags()
  cli.run(main, "neumf-recommend")


if __name__ == "__main__":
  run()
