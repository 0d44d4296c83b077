"""JSON values the processes of a run exchange, and the one encoding they and the checkpoints'
JSON items share (paths as strings, numpy scalars and arrays as numbers and lists)."""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def json_default(x: Any) -> Any:
  """`json.dumps`'s `default`: what JSON lacks, as the JSON value that means it."""
  if isinstance(x, os.PathLike):
    return os.fspath(x)
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"cannot store {type(x).__name__} in a checkpoint's JSON items: {x!r}")


def to_json(obj: Any) -> Any:
  """`obj` as plain JSON types (a round trip through `json_default`), so that orbax's JsonSave and
  comparisons with a read-back item only ever see those."""
  return json.loads(json.dumps(obj, default=json_default))


def allgather_json(obj: Any) -> list[Any]:
  """Every process's `obj` (JSON-serialisable), in process order. One process: `[obj]`."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj, default=json_default).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(data.size))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)]
