"""The phases of a run (training, final evaluation, export), each timed and its peak resident
memory measured, logged as it starts and ends and reported in metrics.json: what grows with
the data, phase by phase (`bench/scale.py` reads them). Free of TensorFlow.

The peak of a phase is the process's resident high-water mark over it: Linux lets a process
reset its mark (`/proc/self/clear_refs`); elsewhere the peak is since the process began.
"""

import contextlib
import resource
import sys
import time
from typing import Dict, Iterator

from absl import logging


def _reset_peak() -> None:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def peak_rss_mb() -> float:
  """The process's resident high-water mark, MB (since the last reset, on Linux)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
  return peak / (2**20 if sys.platform == "darwin" else 1024.0)


class Phases:
  """{phase: seconds} and {phase: peak RSS MB} of the phases run through `phase`."""

  def __init__(self):
    self.seconds: Dict[str, float] = {}
    self.peak_rss_mb: Dict[str, float] = {}

  @contextlib.contextmanager
  def phase(self, name: str, what: str, announce: bool = True) -> Iterator[None]:
    """Times the block as phase `name`; logs `what` as it starts (`announce`) and with its
    cost at the end."""
    if announce:
      logging.info("%s...", what)
    _reset_peak()
    started = time.time()
    yield
    self.seconds[name] = round(time.time() - started, 3)
    self.peak_rss_mb[name] = round(peak_rss_mb(), 1)
    logging.info("%s: %.1fs, peak RSS %.0f MB", what, self.seconds[name],
                 self.peak_rss_mb[name])
