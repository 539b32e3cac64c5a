"""One policy for the values every reader takes from users' files: strict, counted, named.

Every reader of interactions and side features (raw MovieLens files, any delimited file,
TensorFlow Datasets, the feature files) applies these rules, so a value means the same thing
whichever way it came in:

- A row is one line; fields are split by the delimiter (CSV quoting may hold the delimiter, not
  a line break). A row with more or fewer fields than the header (or, without a header, than
  the format's width or the file's first row) is bad. Lines must be UTF-8 (a UTF-8 byte-order
  mark at the start of a file is allowed).
- IDs: surrounding white space is stripped; an ID may not be empty, hold a control character
  (Unicode category Cc), a byte-order mark or bytes that are not UTF-8, or be longer than
  `MAX_ID_LENGTH` characters.
- Numbers (ratings, numeric features): the plain decimal/exponent syntax with ASCII digits
  (`4`, `-0.5`, `3.5e0`, `.5`), finite, and within float32's range (what the model stores).
  No `nan` or `inf` in any spelling, no underscores (Python's float takes `4_0` as 40), no
  digits of other scripts, no surrounding text.
- Timestamps: integers in ASCII digits within int64.

Each bad value has a reason (one of `REASONS`); a reader either raises `ValueError` naming
`file:line`, the column and the value, or, under --skip_bad_rows, counts the row by reason
(`Rejections`). Free of TensorFlow. The checks are vectorised over a chunk, with a per-value
pass only over a chunk that holds a suspect value.
"""

import csv
import dataclasses
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

MAX_ID_LENGTH = 1024
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT64 = np.iinfo(np.int64)

_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_NOT_NUMBER_CHARS = re.compile(r"[^0-9.eE+\-]")
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)\Z", re.IGNORECASE)
_INTEGER = re.compile(r"[+-]?[0-9]+\Z")
_NOT_INTEGER_CHARS = re.compile(r"[^0-9+\-]")
# Control characters (Cc), the byte-order mark, and the lone surrogates that stand for bytes
# that are not UTF-8 (read with errors="surrogateescape").
_BAD_ID_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ufeff\ud800-\udfff]")
_NOT_UTF8 = re.compile("[\ud800-\udfff]")

# Why a row was refused: the keys of metadata.json's `bad_rows_by_reason`.
REASONS = {
    "fields": "wrong number of fields",
    "encoding": "not UTF-8",
    "quoting": "malformed CSV quoting",
    "id_empty": "empty ID",
    "id_control_character": "control character in an ID",
    "id_too_long": f"ID longer than {MAX_ID_LENGTH} characters",
    "id_duplicate": "a second row for the same ID (feature files)",
    "number_syntax": "not a number",
    "number_not_finite": "not a finite number",
    "number_overflow": "overflows float32",
    "number_range": "outside the declared range",
    "integer_syntax": "not an integer",
    "integer_overflow": "overflows int64",
}


@dataclasses.dataclass
class Rejections:
  """Rows skipped under --skip_bad_rows: counted by reason and reported, never silently lost."""

  count: int = 0
  by_reason: Dict[str, int] = dataclasses.field(default_factory=dict)
  examples: List[str] = dataclasses.field(default_factory=list)

  def add(self, reason: str, message: str) -> None:
    self.count += 1
    self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
    if len(self.examples) < 10:
      self.examples.append(message)


def reject(bad: Optional[Rejections], reason: str, message: str) -> None:
  """A bad row: raises ValueError(message), or under --skip_bad_rows (`bad` set) counts it."""
  if reason not in REASONS:
    raise KeyError(f"unknown reason {reason!r}")
  if bad is None:
    raise ValueError(message)
  bad.add(reason, message)


# ----------------------------------------------------------------------------- lines


def check_header(path: str, names: Sequence[str]) -> None:
  """Refuses a header that names a column twice (naming both positions) or is not text."""
  if any("\x00" in name for name in names):
    raise ValueError(f"{path}:1: the header holds NUL bytes: the file is not UTF-8 (UTF-16?); "
                     "re-encode it as UTF-8")
  seen: Dict[str, int] = {}
  for position, name in enumerate(names, 1):
    if name in seen:
      raise ValueError(f"{path}:1: column {name!r} appears twice in the header (fields "
                       f"{seen[name]} and {position})")
    seen[name] = position


def split_lines(lines: Sequence[str], delimiter: str, quoted: bool = True
                ) -> Tuple[List[Optional[List[str]]], List[Optional[str]]]:
  """Splits each line into fields, each on its own (a quoted field never spans lines).

  Args:
    quoted: False when no line holds a quote character (the caller looked): one fast pass.

  Returns:
    (fields of each line, None where it is malformed; the reason of each malformed line)
  """
  if len(delimiter) > 1:
    return [line.split(delimiter) for line in lines], [None] * len(lines)
  if not quoted or '"' not in "".join(lines):  # no quoting: one fast pass
    try:
      rows = list(csv.reader(lines, delimiter=delimiter, strict=True))
      if len(rows) == len(lines):
        return rows, [None] * len(lines)
    except csv.Error:  # a field over the csv module's size limit: find it line by line
      pass
  rows: List[Optional[List[str]]] = []
  reasons: List[Optional[str]] = []
  for line in lines:
    try:
      rows.append(next(csv.reader([line], delimiter=delimiter, strict=True)))
      reasons.append(None)
    except (csv.Error, StopIteration) as e:
      rows.append(None)
      reasons.append(f"quoting:{e}")
  return rows, reasons


def line_reasons(lines: Sequence[str], delimiter: str, fields: Optional[int],
                 what: str = "") -> Tuple[List[Optional[List[str]]],
                                         List[Optional[Tuple[str, str]]]]:
  """Splits lines into fields and checks what concerns a whole line: its quoting, its field
  count (`fields`; None: any) and its encoding.

  Returns:
    (fields of each line, None where malformed; (reason, what is wrong) of each bad line)
  """
  text = "".join(lines)
  rows, split_reasons = split_lines(lines, delimiter, quoted='"' in text)
  encoding = (np.zeros(len(lines), bool) if not _NOT_UTF8.search(text)
              else np.array([bool(_NOT_UTF8.search(line)) for line in lines], bool))
  if (all(r is None for r in split_reasons) and not encoding.any()
      and (fields is None or set(map(len, rows)) <= {fields})):
    return rows, [None] * len(rows)  # the common case, without a loop in Python
  reasons: List[Optional[Tuple[str, str]]] = []
  for k, row in enumerate(rows):
    if row is None:
      reasons.append(("quoting",
                      f"malformed CSV quoting ({split_reasons[k].split(':', 1)[1]})"))
    elif fields is not None and len(row) != fields:
      reasons.append(("fields", f"expected {fields} fields{what}, got {len(row)}"))
    elif encoding[k]:
      reasons.append(("encoding", "holds bytes that are not UTF-8 (re-encode the file as "
                      "UTF-8)"))
    else:
      reasons.append(None)
  return rows, reasons


# ----------------------------------------------------------------------------- columns


def id_reasons(values: Sequence[str]) -> Optional[List[Optional[str]]]:
  """Why each (stripped) ID is bad, or None when all are good."""
  joined = "".join(values)
  if (all(values) and not _BAD_ID_CHARS.search(joined)
      and (len(joined) <= MAX_ID_LENGTH or max(map(len, values)) <= MAX_ID_LENGTH)):
    return None
  return [id_reason(v) for v in values]


def id_reason(value: str) -> Optional[str]:
  """Why one (stripped) ID is bad, or None."""
  if not value:
    return "id_empty"
  if _BAD_ID_CHARS.search(value):
    return "encoding" if _NOT_UTF8.search(value) else "id_control_character"
  if len(value) > MAX_ID_LENGTH:
    return "id_too_long"
  return None


def parse_numbers(values: Sequence[str]) -> Tuple[np.ndarray, Optional[List[Optional[str]]]]:
  """Strings -> float64 under the policy; (values, None) or (values with NaN where bad, the
  reason of each)."""
  if not _NOT_NUMBER_CHARS.search("".join(values)):
    try:
      out = np.asarray(values, dtype=np.float64)
      if len(out) == 0 or np.abs(out).max() <= _FLOAT32_MAX:
        return out, None
    except ValueError:
      pass
  out = np.full(len(values), np.nan)
  reasons: List[Optional[str]] = []
  for k, value in enumerate(values):
    number, reason = parse_number(value)
    reasons.append(reason)
    if reason is None:
      out[k] = number
  return out, reasons


def parse_number(value: str) -> Tuple[float, Optional[str]]:
  """One string -> (number, None) or (NaN, reason)."""
  if not _NUMBER.match(value):
    return np.nan, "number_not_finite" if _NON_FINITE.match(value) else "number_syntax"
  number = float(value)
  if not abs(number) <= _FLOAT32_MAX:
    return np.nan, "number_overflow"
  return number, None


def parse_integers(values: Sequence[str]) -> Tuple[np.ndarray, Optional[List[Optional[str]]]]:
  """Strings -> int64 under the policy; (values, None) or (values with 0 where bad, reasons)."""
  if not _NOT_INTEGER_CHARS.search("".join(values)):
    try:
      return np.asarray(values, dtype=np.int64), None
    except (ValueError, OverflowError):
      pass
  out = np.zeros(len(values), np.int64)
  reasons: List[Optional[str]] = []
  for k, value in enumerate(values):
    if not _INTEGER.match(value):
      reasons.append("integer_syntax")
    elif not _INT64.min <= int(value) <= _INT64.max:
      reasons.append("integer_overflow")
    else:
      out[k] = int(value)
      reasons.append(None)
  return out, reasons


def check_numbers(values: np.ndarray) -> Optional[List[Optional[str]]]:
  """Why each number already parsed (e.g. by TensorFlow Datasets) is bad, or None."""
  bad_finite = ~np.isfinite(values)
  overflow = np.abs(np.where(bad_finite, 0.0, values)) > _FLOAT32_MAX
  if not (bad_finite.any() or overflow.any()):
    return None
  return ["number_not_finite" if f else "number_overflow" if o else None
          for f, o in zip(bad_finite.tolist(), overflow.tolist())]


def describe(reason: str, column: str, value: str) -> str:
  """`<column> <value> is <what is wrong>`, for an error message."""
  what = {
      "number_syntax": "is not a number",
      "number_not_finite": "is not a finite number",
      "number_overflow": f"overflows float32 (largest {_FLOAT32_MAX:.7g})",
      "integer_syntax": "is not an integer (ASCII digits)",
      "integer_overflow": "overflows int64",
      "id_empty": "is empty",
      "id_control_character": "holds a control character or byte-order mark",
      "id_too_long": f"is longer than {MAX_ID_LENGTH} characters",
      "encoding": "holds bytes that are not UTF-8",
  }.get(reason, REASONS.get(reason, reason))
  shown = value if len(value) <= 80 else value[:77] + "..."
  return f"{column} {shown!r} {what}"
