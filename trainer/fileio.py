"""File access for paths that may be local or `gs://`.

Every path a user gives goes through `tf.io.gfile`, never through `open()`, so that the same
code reads and writes local disks and Cloud Storage buckets.
"""

import posixpath
from typing import List

import tensorflow as tf


def join(base: str, *parts: str) -> str:
  """Joins path parts; works for local paths and URLs such as `gs://bucket/dir`."""
  if "://" in base:
    return posixpath.join(base, *parts)
  return tf.io.gfile.join(base, *parts)


def read_text(path: str) -> str:
  with tf.io.gfile.GFile(path, "r") as f:
    return f.read()


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` so that a reader never sees a half-written file.

  The text goes to a temporary sibling first and is then renamed over `path`; on object stores
  the rename is a copy, which still publishes the complete object at once.
  """
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def read_lines(path: str) -> List[str]:
  """Reads a text file of one entry per line (no trailing newline kept)."""
  return read_text(path).splitlines()


def write_lines(path: str, lines: List[str]) -> None:
  write_text_atomic(path, "".join(line + "\n" for line in lines))


def makedirs(path: str) -> None:
  tf.io.gfile.makedirs(path)


def exists(path: str) -> bool:
  return tf.io.gfile.exists(path)
