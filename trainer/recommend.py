"""Command line of recommendation: `python -m trainer.recommend` (installed as `neumf-recommend`).

Loads only the exported SavedModel (plain TensorFlow, none of the training code) and prints a
user's top-k items with their scores:

  neumf-recommend --export_dir=/tmp/model/export --user=u42 --k=10
  neumf-recommend --export_dir=/tmp/model/export --user=u42 --recent=i7,i3   # mf --history
  neumf-recommend --export_dir=/tmp/model/export --user=u42 --context=hour=21,device=tv
"""

import os
import sys

from absl import app, flags  # noqa: E402

from trainer import cli, quiet  # noqa: E402

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
  flags.DEFINE_list("context", None, "Models trained with context: the request's context as "
                    "name=value pairs, e.g. hour=21,weekday=4,device=tv,tags=a|b (the "
                    "`recommend_context` signature; a multi-hot feature's values separated by "
                    "|); features not given are missing.")
  flags.mark_flags_as_required(["export_dir", "user"])


def recommend(export_dir: str, users, k: int, recent=None, context=None):
  """Returns [(user, known, [(item, score), ...])] from the SavedModel's `recommend` signature,
  or with `recent` (items, latest first, the same for every user) `recommend_recent`'s, or
  with `context` (["name=value", ...], the same for every user) `recommend_context`'s."""
  import tensorflow as tf
  if recent and context:
    raise ValueError("--recent and --context go to different signatures: give one")
  if not tf.io.gfile.exists(os.path.join(export_dir, "saved_model.pb")):
    raise ValueError(f"--export_dir={export_dir!r} holds no SavedModel (saved_model.pb)")
  loaded = tf.saved_model.load(export_dir)
  name = "recommend_recent" if recent else "recommend_context" if context else "recommend"
  if name not in loaded.signatures:
    why = (" (--recent needs a model trained with --history)" if recent
           else " (--context needs a model trained with context features)" if context else "")
    raise ValueError(f"--export_dir={export_dir!r}: the SavedModel has no {name!r} signature"
                     + why)
  extra = {"recent": tf.constant([list(recent)] * len(users))} if recent else {}
  if context:
    extra = context_inputs(loaded.signatures[name], context, len(users))
  out = loaded.signatures[name](user=tf.constant(users), k=tf.constant(k, tf.int32), **extra)
  items, scores, known = out["items"].numpy(), out["scores"].numpy(), out["user_known"].numpy()
  return [(user, bool(known[r]), [(i.decode(), float(s)) for i, s in zip(items[r], scores[r])])
          for r, user in enumerate(users)]


def context_inputs(signature, pairs, batch: int):
  """The `context_<name>` inputs of `signature` from ["name=value", ...]: each feature given
  once, by a name the model knows; a number where the model takes one; the others missing
  ("" or NaN)."""
  import numpy as np
  import tensorflow as tf
  specs = {name[len("context_"):]: spec
           for name, spec in signature.structured_input_signature[1].items()
           if name.startswith("context_")}
  given = {}
  for pair in pairs:
    name, sep, value = pair.partition("=")
    if not sep or name not in specs:
      raise ValueError(f"--context: {pair!r} is not name=value with a name among "
                       f"{', '.join(sorted(specs))}")
    if name in given:
      raise ValueError(f"--context: {name!r} is given twice")
    given[name] = value
  inputs = {}
  for name, spec in specs.items():
    value = given.get(name)
    if spec.dtype == tf.string:  # a multi-hot feature's values separated by "|"
      text = value or ""
      inputs[f"context_{name}"] = tf.constant(
          [text.split("|")] * batch if spec.shape.rank == 2 else [text] * batch)
      continue
    try:
      number = float(value) if value not in (None, "") else np.nan
    except ValueError:
      raise ValueError(f"--context: {name}={value!r} must be a number") from None
    inputs[f"context_{name}"] = tf.constant([number] * batch, tf.float32)
  return inputs


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  quiet.import_tensorflow(FLAGS.verbosity)
  try:
    results = recommend(FLAGS.export_dir, FLAGS.user, FLAGS.k, FLAGS.recent, FLAGS.context)
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
