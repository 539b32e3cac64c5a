"""The machine a benchmark runs on, named beside its figures (figures differ by machine)."""


def cpu_name() -> str:
  """The CPU's model name where Linux tells it."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return "CPU model unknown"
