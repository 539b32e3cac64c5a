"""The malloc settings, checked by their effect: page faults when a large block is reused."""

import subprocess
import sys

import pytest

_PROBE = """
import resource, sys
import numpy as np
from trainer import malloc
accepted = getattr(malloc, sys.argv[1])()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
  np.ones(2 << 20).sum()  # 16 MiB, written then freed, like a training step's tensors
print(accepted, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _faults(mode: str):
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                       check=True).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_training_keeps_freed_memory_and_preparation_returns_it():
  accepted, kept = _faults("keep_freed_memory")
  assert accepted  # glibc took every value (it refuses an mmap threshold above 32 MiB)
  returned_ok, returned = _faults("return_freed_memory")
  assert returned_ok
  # Kept: the block is reused. Returned: each block is mapped and faulted in anew (NumPy asks
  # for huge pages, so a fault may bring in more than 4 KiB).
  assert kept * 10 < returned, (kept, returned)
