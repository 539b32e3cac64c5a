"""glibc malloc settings for the two kinds of work of this package (no-op without glibc).

Preparation streams data through large NumPy temporaries: freed memory should go back to the
system at once, so that the peak stays one bucket's worth. Training allocates the same large
tensors every step: freed memory should stay in the process, or each step takes it back from
the kernel page by page (page faults, and zeroing every page).
"""

import ctypes

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8
# glibc refuses an mmap threshold above half its 64 MiB per-thread heap.
_MAX_MMAP_THRESHOLD = 32 << 20


def _mallopt(*settings) -> bool:
  """Applies (parameter, value) settings; True when glibc took every one."""
  try:
    libc = ctypes.CDLL("libc.so.6")
    return all([libc.mallopt(parameter, value) == 1 for parameter, value in settings])
  except (OSError, AttributeError):
    return False


def return_freed_memory() -> bool:
  """Large allocations (4 MiB and up) served by mmap, so they go back to the system when freed;
  two arenas, not one per thread, so freed small blocks are reused rather than spread."""
  return _mallopt((_M_MMAP_THRESHOLD, 4 << 20), (_M_ARENA_MAX, 2))


def keep_freed_memory() -> bool:
  """Tensors up to 32 MiB come from the heap and freed memory stays there (glibc otherwise
  trims freed heap tops and serves large blocks by mmap, so a step's tensors are page-faulted
  in again every step). Faster at large batches: README, "Design choices, measured"."""
  return _mallopt((_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, 1 << 30),
                  (_M_TOP_PAD, 64 << 20))
