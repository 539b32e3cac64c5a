"""JSON as the standard defines it: every file and line the project writes parses anywhere.

Python's `json` writes `NaN` and `Infinity` by default, which strict parsers (and other
languages) refuse; a non-finite number in a result is a bug or a diverged run, never a value to
publish. `dumps` raises on one instead; `loads` refuses them on reading. Free of TensorFlow.
"""

import json
from typing import Any


def _refuse(constant: str) -> Any:
  raise ValueError(f"non-finite number {constant} in JSON")


def dumps(value: Any, **kwargs) -> str:
  """json.dumps that raises ValueError on NaN or an infinity instead of writing them."""
  return json.dumps(value, allow_nan=False, **kwargs)


def loads(text: str) -> Any:
  """json.loads that raises ValueError on `NaN`, `Infinity` or `-Infinity`."""
  return json.loads(text, parse_constant=_refuse)
