"""Sources of rating logs: raw MovieLens files and a synthetic generator.

Each source returns a `Ratings` table of raw IDs (kept as strings, as users' systems have them)
with float ratings and, where known, timestamps. Parsing errors name the file, the line number
and the offending text.
"""

import dataclasses
import math
from typing import List, Optional

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Ratings:
  """A rating log: aligned columns, one row per (user, item) interaction."""

  users: np.ndarray  # [n] str (object)
  items: np.ndarray  # [n] str (object)
  ratings: np.ndarray  # [n] float32
  timestamps: Optional[np.ndarray] = None  # [n] int64, or None when unknown

  def __len__(self) -> int:
    return len(self.ratings)


# MovieLens formats, told apart by their first line.
_FORMATS = {
    # name: (delimiter, description)
    "u.data": ("\t", "MovieLens 100K u.data (user TAB item TAB rating TAB timestamp)"),
    "ratings.dat": ("::", "MovieLens 1M/10M ratings.dat (user::item::rating::timestamp)"),
    "ratings.csv": (",", "MovieLens ratings.csv (userId,movieId,rating,timestamp, header)"),
}
_CSV_HEADER = ["userId", "movieId", "rating", "timestamp"]
MOVIELENS_RATING_RANGE = (0.5, 5.0)


def detect_movielens_format(path: str, first_line: str) -> str:
  """Returns the `_FORMATS` key of a MovieLens ratings file from its first line."""
  if "::" in first_line:
    return "ratings.dat"
  if "\t" in first_line:
    return "u.data"
  if "," in first_line:
    return "ratings.csv"
  raise ValueError(f"{path}:1: not a MovieLens ratings file (expected u.data, ratings.dat or "
                   f"ratings.csv); first line is {first_line[:80]!r}")


def read_movielens(path: str) -> Ratings:
  """Reads a raw MovieLens ratings file, detecting its format from the content.

  Args:
    path: a local or `gs://` path to `u.data`, `ratings.dat` or `ratings.csv`.

  Returns:
    The ratings, with timestamps.

  Raises:
    ValueError: naming the file, line and text of the first malformed row, or an empty file.
  """
  if not tf.io.gfile.exists(path):
    raise ValueError(f"--input: file {path!r} does not exist")
  with tf.io.gfile.GFile(path, "rb") as f:
    text = f.read().decode("utf-8", errors="replace")
  lines = text.splitlines()
  if not lines or not lines[0].strip():
    raise ValueError(f"{path}: empty file, no ratings")
  fmt = detect_movielens_format(path, lines[0])
  delimiter, description = _FORMATS[fmt]
  start = 0
  if fmt == "ratings.csv":
    header = lines[0].split(",")
    if header != _CSV_HEADER:
      raise ValueError(f"{path}:1: expected header {','.join(_CSV_HEADER)!r} of {description}, "
                       f"got {lines[0]!r}")
    start = 1
  users: List[str] = []
  items: List[str] = []
  ratings: List[float] = []
  stamps: List[int] = []
  low, high = MOVIELENS_RATING_RANGE
  for number, line in enumerate(lines[start:], start=start + 1):
    if not line.strip():
      continue
    fields = line.split(delimiter)
    if len(fields) != 4:
      raise ValueError(f"{path}:{number}: expected 4 fields of {description}, got "
                       f"{len(fields)}: {line!r}")
    user, item, rating_text, stamp_text = (x.strip() for x in fields)
    try:
      rating = float(rating_text)
    except ValueError:
      raise ValueError(f"{path}:{number}: rating {rating_text!r} is not a number: "
                       f"{line!r}") from None
    if not (low <= rating <= high) or math.isnan(rating):
      raise ValueError(f"{path}:{number}: rating {rating_text} is outside the MovieLens "
                       f"range [{low}, {high}]: {line!r}")
    try:
      stamp = int(stamp_text)
    except ValueError:
      raise ValueError(f"{path}:{number}: timestamp {stamp_text!r} is not an integer: "
                       f"{line!r}") from None
    if not user or not item:
      raise ValueError(f"{path}:{number}: empty user or item ID: {line!r}")
    users.append(user)
    items.append(item)
    ratings.append(rating)
    stamps.append(stamp)
  if not ratings:
    raise ValueError(f"{path}: no ratings after the header")
  return Ratings(users=np.array(users, dtype=object), items=np.array(items, dtype=object),
                 ratings=np.array(ratings, dtype=np.float32),
                 timestamps=np.array(stamps, dtype=np.int64))


SYNTHETIC_RATING_RANGE = (1.0, 5.0)


def generate_synthetic(num_users: int, num_items: int, num_ratings: int, rank: int = 4,
                       noise: float = 0.35, seed: int = 0) -> Ratings:
  """Generates ratings with a planted low-rank structure, so a model can learn them.

  rating(u, i) = clip(round_half(3.5 + b_u + b_i + <p_u, q_i> + eps), 1, 5), where p_u, q_i are
  rank-`rank` factors, b_u, b_i biases and eps ~ N(0, noise^2). Users' activity and items'
  popularity follow power laws (as in real logs); (user, item) pairs are distinct.

  Args:
    num_users, num_items: sizes of the ID spaces; raw IDs are `u<n>` and `i<n>`.
    num_ratings: rows to generate; at most half of num_users * num_items.
    rank: rank of the planted structure.
    noise: standard deviation of the rating noise.
    seed: makes the output deterministic.

  Returns:
    The ratings, with timestamps increasing in generation order.
  """
  if num_users < 1 or num_items < 1 or num_ratings < 1:
    raise ValueError(f"synthetic sizes must be positive: num_users={num_users}, "
                     f"num_items={num_items}, num_ratings={num_ratings}")
  if num_ratings > num_users * num_items // 2:
    raise ValueError(f"--num_ratings={num_ratings} is more than half of num_users * num_items "
                     f"= {num_users * num_items}; distinct pairs would be too dense")
  rng = np.random.default_rng(seed)
  user_factors = rng.normal(0.0, 1.0 / math.sqrt(rank), (num_users, rank))
  item_factors = rng.normal(0.0, 1.0 / math.sqrt(rank), (num_items, rank))
  user_bias = rng.normal(0.0, 0.3, num_users)
  item_bias = rng.normal(0.0, 0.4, num_items)

  def power_law(n: int, exponent: float) -> np.ndarray:
    p = (np.arange(n) + 1.0) ** -exponent
    return rng.permutation(p / p.sum())

  user_p = power_law(num_users, 0.5)
  item_p = power_law(num_items, 0.8)
  keys = np.empty(0, dtype=np.int64)
  while len(keys) < num_ratings:
    want = int((num_ratings - len(keys)) * 1.2) + 16
    u = rng.choice(num_users, size=want, p=user_p)
    i = rng.choice(num_items, size=want, p=item_p)
    candidates = u.astype(np.int64) * num_items + i
    # Keep first occurrences in generation order, so the output depends only on the seed.
    merged = np.concatenate([keys, candidates])
    _, first = np.unique(merged, return_index=True)
    keys = merged[np.sort(first)]
  keys = keys[:num_ratings]
  u, i = keys // num_items, keys % num_items
  signal = 3.5 + user_bias[u] + item_bias[i] + np.sum(user_factors[u] * item_factors[i], axis=1)
  raw = signal + rng.normal(0.0, noise, num_ratings)
  ratings = np.clip(np.round(raw * 2.0) / 2.0, *SYNTHETIC_RATING_RANGE).astype(np.float32)
  user_ids = np.array([f"u{x}" for x in range(num_users)], dtype=object)
  item_ids = np.array([f"i{x}" for x in range(num_items)], dtype=object)
  return Ratings(users=user_ids[u], items=item_ids[i], ratings=ratings,
                 timestamps=np.arange(num_ratings, dtype=np.int64) + 1_500_000_000)
