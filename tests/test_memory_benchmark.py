"""benchmarks/memory.py on a tiny model: the JSON it writes, its PNG, and its argument bytes.

The reference for the bytes is independent of XLA's memory analysis: the per-device shard of every
array the step takes (state and batch), worked out from their shardings.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest


ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("compilation_cache")


def _load():
  path = ROOT / "benchmarks" / "memory.py"
  spec = importlib.util.spec_from_file_location("memory_benchmark", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def _shard_bytes(tree) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def test_memory_json_schema_png_and_argument_bytes(tmp_path):
  memory = _load()
  out = tmp_path / "memory.json"
  assert memory.main(["--models", "tiny", "--devices", "8", "--fsdp", "on",
                      "--json", str(out)]) == 0
  record = json.loads(out.read_text())
  assert record["command"].startswith("python benchmarks/memory.py --models tiny")
  (row,) = record["rows"]
  schema = {"model": str, "total_params": int, "devices": int, "mesh": dict, "scan": bool,
            "remat": str, "fsdp": bool, "bytes_per_device": int, "compile_seconds": float}
  for key, kind in schema.items():
    assert isinstance(row[key], kind), (key, row[key])
  assert (row["model"], row["devices"], row["fsdp"], row["scan"]) == ("tiny", 8, True, False)
  assert row["mesh"] == {"data": 8, "expert": 1, "model": 1}
  assert out.with_suffix(".png").stat().st_size > 0

  # The same state and batch: parameters counted and the arguments' per-device shards summed.
  args = memory.parse_args(["--models", "tiny", "--devices", "8"])
  config, batch, seq_len = memory._model_config("tiny", args)
  config = memory._with_overrides(config, args, scan=False, remat=None)
  trainer = memory.build_trainer(config, 8, True, args)
  params = trainer.abstract_state.params
  assert row["total_params"] == sum(x.size for x in jax.tree.leaves(params))
  batch_bytes = 2 * batch * seq_len * 4 // 8  # two int32 [batch, seq_len] features over 8 devices
  assert row["argument_bytes"] == _shard_bytes(trainer.abstract_state) + batch_bytes
  # The whole footprint counts the donated state once, and temporaries on top.
  assert row["bytes_per_device"] == (row["argument_bytes"] + row["output_bytes"]
                                     - row["alias_bytes"] + row["temp_bytes"])
  assert row["bytes_per_device"] >= row["argument_bytes"]


def test_bad_arguments_are_named():
  memory = _load()
  with pytest.raises(SystemExit):
    memory.parse_args(["--models", "gpt5"])
  with pytest.raises(SystemExit):
    memory.parse_args(["--devices", "eight"])
