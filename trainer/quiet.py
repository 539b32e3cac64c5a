"""A quiet start: TensorFlow's own start-up chatter kept off the console unless asked for.

Importing TensorFlow and finding its devices prints, before its logging honours
TF_CPP_MIN_LOG_LEVEL, banners that say nothing to a user (oneDNN's, the CPU feature guard's,
absl's "before InitializeLog" note) and, on a machine without a GPU, the CUDA wheel's failed
probe of the driver as an *error*. Those lines are recognised and dropped; every other line
printed then (a real warning or error) still reaches stderr. Afterwards: TensorFlow's C++ logs
show from ERROR up (TF_CPP_MIN_LOG_LEVEL=2 unless set: its runtime warnings are about its own
internals, e.g. every multi-device input pipeline's "will not be optimized"), and its Python
INFO logs (which go through absl's logger, as ours do: a line per checkpoint save, "Sharding
callback duration", the SavedModel's fingerprint) are dropped, as are two warnings TensorFlow
raises from its own code on every multi-device input pipeline. Our own INFO lines (progress,
epochs, results) are untouched. `--verbosity=1` (absl's; `-v 1`) brings all of TensorFlow's
back.
"""

import logging
import os
import re
import sys
import tempfile
import warnings

# TensorFlow's start-up lines that carry no information for a user of this program.
_CHATTER = re.compile("|".join((
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"oneDNN custom operations are on",
    r"Could not find cuda drivers on your machine",
    r"failed call to cuInit",
    r"cpu_feature_guard\.cc",
    r"This TensorFlow binary is optimized to use available CPU instructions",
    r"To enable the following instructions: .*rebuild TensorFlow",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation placer already registered",
    r"TF-TRT Warning: Could not find TensorRT",
)))


def verbose(verbosity: int) -> bool:
  """Whether TensorFlow's own logs are wanted (absl's --verbosity of 1 or more)."""
  return verbosity >= 1


def chatter(line: str) -> bool:
  """Whether `line` is TensorFlow start-up chatter (dropped when not verbose)."""
  return bool(_CHATTER.search(line))


class _TensorFlowInfo(logging.Filter):
  """Drops log records below WARNING made by TensorFlow's or Keras's own code."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not _THEIRS.search(record.pathname or "")


_THEIRS = re.compile(r"[/\\](tensorflow|keras|tf_keras)[/\\]")
_FILTER = _TensorFlowInfo()


def _quiet_logs() -> None:
  """TensorFlow's Python INFO records and its known warnings, dropped (idempotent)."""
  logging.getLogger("absl").addFilter(_FILTER)
  logging.getLogger("tensorflow").setLevel(logging.WARNING)
  warnings.filterwarnings("ignore", message="To make it possible to preserve tf.data options")


def import_tensorflow(verbosity: int = 0):
  """Imports TensorFlow and lists its devices (where the driver probe runs) with the process's
  stderr captured, then prints what was captured less the chatter (all of it when verbose);
  keeps TensorFlow's later logs to warnings and errors unless verbose. Returns the module."""
  if verbose(verbosity):
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    import tensorflow as tf
    return tf
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _quiet_logs()
  if "tensorflow" in sys.modules:  # too late to catch its start-up: quiet the rest
    import tensorflow as tf
    return tf
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow as tf
      tf.config.list_physical_devices()
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode("utf-8", "replace").splitlines()
              if line.strip() and not chatter(line)]
      if kept:
        sys.stderr.write("\n".join(kept) + "\n")
  return tf
