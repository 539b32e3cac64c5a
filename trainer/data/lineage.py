"""Preparation on a base: a new data directory that keeps an earlier one's vocabularies.

`neumf-prepare --base_data_dir=D0 ...` gives every ID and feature value of D0 the index it had
there and appends what the new log adds (ordered as preparation orders any vocabulary, among
the new part only); D0's IDs and values absent from the new log keep their indices. Numeric
features keep D0's mean and deviation, bucketized ones D0's edges: a learnt row means the
same thing in both. A model trained on D0 then continues on the new directory row for row
(`trainer.warm_start`).

Each prepared directory has a `vocabulary_fingerprint` (a digest of its vocabularies and
feature statistics: what a model's rows mean); a directory prepared on a base records its
`lineage`: the base's directory and fingerprint, every ancestor's fingerprint (the base's
own lineage, on to the first), and per vocabulary the counts of old, new and absent entries.
Free of TensorFlow's graph: reads files through `trainer.fileio`.
"""

import dataclasses
import hashlib
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from trainer import fileio, schema

USERS, ITEMS = "users", "items"


def vocabulary_name(side: str, name: str) -> str:
  """How the lineage names a feature's vocabulary: `side:name` (e.g. item:genres)."""
  return f"{side}:{name}"


def fingerprint(users: Sequence[str], items: Sequence[str], infos: Sequence[Dict[str, Any]],
                vocabularies: Dict[str, Sequence[str]]) -> str:
  """sha256 of the vocabularies (line n = index n) and of every feature's kind and statistics
  (`vocabularies`: {`side:name`: values of a categorical or multi-hot feature})."""
  digest = hashlib.sha256()
  for label, values in ((USERS, users), (ITEMS, items)):
    digest.update(f"{label} {len(values)}\n".encode())
    digest.update("".join(f"{v}\n" for v in values).encode("utf-8", "surrogateescape"))
  for info in sorted(infos, key=lambda i: (i["side"], i["name"])):
    fixed = {k: info.get(k) for k in ("side", "name", "kind", "edges", "mean", "std")}
    digest.update((json.dumps(fixed, sort_keys=True) + "\n").encode())
    values = vocabularies.get(vocabulary_name(info["side"], info["name"]), ())
    digest.update("".join(f"{v}\n" for v in values).encode("utf-8", "surrogateescape"))
  return digest.hexdigest()


@dataclasses.dataclass
class Base:
  """A prepared directory's vocabularies, read to prepare another on it."""

  data_dir: str
  metadata: schema.Metadata
  users: List[str]
  items: List[str]
  vocabularies: Dict[str, List[str]]  # {side:name: values, line n = index n + 1}
  fingerprint: str

  @property
  def ancestors(self) -> List[str]:
    """This directory's fingerprint and its ancestors', nearest first."""
    return [self.fingerprint] + list(self.metadata.lineage.get("ancestors", []))

  def info(self, side: str, name: str) -> Optional[Dict[str, Any]]:
    """The base's metadata entry of a feature, or None when it has none of that name."""
    for entry in self.metadata.features:
      if entry["side"] == side and entry["name"] == name:
        return entry
    return None


def load(data_dir: str, flag: str = "base_data_dir") -> Base:
  """Reads a prepared directory's vocabularies (an error names `flag` when it is not one).

  Raises:
    ValueError: not a complete prepared directory, or its vocabularies disagree with its
      metadata.
  """
  path = fileio.join(data_dir, schema.METADATA_FILE)
  if not fileio.exists(path):
    raise ValueError(f"--{flag}={data_dir!r} is not a prepared data directory: {path} is "
                     "missing")
  metadata = schema.Metadata.from_json(fileio.read_text(path), where=path)
  users = fileio.read_lines(fileio.join(data_dir, schema.USER_VOCAB_FILE))
  items = fileio.read_lines(fileio.join(data_dir, schema.ITEM_VOCAB_FILE))
  if len(users) != metadata.num_users or len(items) != metadata.num_items:
    raise ValueError(f"--{flag}={data_dir!r}: its vocabularies hold {len(users)} users and "
                     f"{len(items)} items, its metadata {metadata.num_users} and "
                     f"{metadata.num_items}")
  vocabularies = {}
  for info in metadata.features:
    if info["kind"] in ("categorical", "multi_hot"):
      vocabularies[vocabulary_name(info["side"], info["name"])] = fileio.read_lines(
          fileio.join(data_dir, schema.feature_vocab_file(info["side"], info["name"])))
  return Base(data_dir, metadata, users, items, vocabularies,
              fingerprint(users, items, metadata.features, vocabularies))


def extend(base: Sequence[str], ordered: Sequence[str]) -> Tuple[List[str], Dict[str, int]]:
  """The base's values, then those of `ordered` (a fresh vocabulary, in its order) the base
  lacks; and the counts {old, new, absent} (absent: base values not in `ordered`)."""
  known = set(base)
  new = [v for v in ordered if v not in known]
  present = sum(1 for v in ordered if v in known)
  return list(base) + new, {"old": len(base), "new": len(new), "absent": len(base) - present}


def on_base(base_ids: Sequence[str], order: np.ndarray, raw: np.ndarray
            ) -> Tuple[np.ndarray, np.ndarray, Dict[str, int]]:
  """Dense indices of provisional codes with the base's IDs first.

  Args:
    base_ids: the base's IDs, line n = index n.
    order: the provisional codes that have an index of their own, in fresh order.
    raw: the raw ID of every provisional code.

  Returns:
    (raw ID of each dense index, dense index of each provisional code (-1: none), the counts
    {old, new, absent}). A provisional code whose ID the base holds gets the base's index,
    whether or not it has a row that counts for the vocabulary.
  """
  position = {v: n for n, v in enumerate(base_ids)}
  index = np.full(len(raw), -1, np.int64)
  raw_list = raw.tolist()
  in_base = np.array([position.get(v, -1) for v in raw_list], np.int64)
  index[in_base >= 0] = in_base[in_base >= 0]
  new = [c for c in order.tolist() if in_base[c] < 0]
  index[new] = len(base_ids) + np.arange(len(new))
  present = int(np.sum(in_base[order] >= 0)) if len(order) else 0
  dense = np.array(list(base_ids) + [raw_list[c] for c in new], dtype=str)
  return dense, index, {"old": len(base_ids), "new": len(new),
                        "absent": len(base_ids) - present}


def lineage(base: Base, counts: Dict[str, Dict[str, int]]) -> Dict[str, Any]:
  """The metadata's `lineage` of a directory prepared on `base`."""
  return {"base_data_dir": base.data_dir, "base_fingerprint": base.fingerprint,
          "ancestors": base.ancestors, "vocabularies": dict(sorted(counts.items()))}


# What a feature keeps from the base, by kind: its statistics (numeric, bucketized) or its
# vocabulary, extended (categorical, multi-hot).
KEPT_STATISTICS = {"categorical": (), "multi_hot": (), "numeric": ("mean", "std"),
                   "bucketized": ("edges",)}


def kept(base: Optional[Base], side: str, name: str, kind: str):
  """What a feature keeps from the base: a categorical or multi-hot feature its vocabulary
  (values of index 1..), a numeric one {mean, std}, a bucketized one {edges}; None without a
  base or when the base has no feature of that name.

  Raises:
    ValueError: the base has the feature as another kind.
  """
  info = base.info(side, name) if base is not None else None
  if info is None:
    return None
  if info["kind"] != kind:
    raise ValueError(f"--base_data_dir={base.data_dir}: feature {side}:{name} is "
                     f"{info['kind']} there and {kind} here; a feature keeps its kind (give it "
                     "another name)")
  if kind in ("categorical", "multi_hot"):
    return base.vocabularies[vocabulary_name(side, name)]
  return {k: info[k] for k in KEPT_STATISTICS[kind]}
