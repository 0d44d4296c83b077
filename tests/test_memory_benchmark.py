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
  assert 0 < row["compile_cpu_seconds"] and 0 < row["compile_seconds"]
  assert row["hlo_instructions"] > 10  # a forward, backward and AdamW update, however small

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


def _fake_row(model, bytes_per_device, **changes):
  row = {"model": model, "total_params": 10, "devices": 8,
         "mesh": {"data": 8, "expert": 1, "model": 1}, "scan": False, "remat": "none",
         "fsdp": True, "bytes_per_device": bytes_per_device, "compile_seconds": 1.0, "batch": 16,
         "seq_len": 16, "dtype": "bfloat16", "capacity_factor": None}
  return {**row, **changes}


def test_append_replaces_a_remeasured_row_and_keeps_the_others(tmp_path):
  memory = _load()
  out = tmp_path / "memory.json"
  other = _fake_row("hash_128", 7 * 2 ** 30, scan=True, remat="full")
  # The tiny row that the run below measures again, with a byte count no compile gives.
  stale = _fake_row("tiny", 1)
  out.write_text(json.dumps({"commands": ["python benchmarks/memory.py --models hash_128"],
                             "rows": [other, stale]}))
  argv = ["--models", "tiny", "--devices", "8", "--fsdp", "on", "--append", "--json", str(out)]
  assert memory.main(argv) == 0
  record = json.loads(out.read_text())
  assert record["commands"] == ["python benchmarks/memory.py --models hash_128",
                                "python benchmarks/memory.py " + " ".join(argv)]
  first, second = record["rows"]
  assert first == other  # untouched, in its place
  assert second["model"] == "tiny" and second["bytes_per_device"] > 1  # measured, not the stale one
  assert second["argument_bytes"] > 0 and "command" not in record
  assert out.with_suffix(".png").stat().st_size > 0

  # A row with other settings is added after the old ones, not in place of one.
  merged = memory.merge_record(record, [dict(second, remat="full")], "again")
  assert [r["remat"] for r in merged["rows"]] == ["full", "none", "full"]
  assert merged["commands"][-1] == "again"


def test_append_needs_json_and_a_memory_record():
  memory = _load()
  with pytest.raises(SystemExit):
    memory.parse_args(["--models", "tiny", "--append"])
  with pytest.raises(ValueError, match="no 'rows' list"):
    memory.merge_record({"something": 1}, [], "cmd")


def test_png_labels_name_the_settings_that_differ():
  memory = _load()
  dense = _fake_row("baseline", 1, mesh={"data": 32, "expert": 1, "model": 1}, devices=32)
  assert memory.row_label(dense) == "baseline 32d 32x1x1 16x16 fsdp"
  sparse = _fake_row("lm_4_5b", 1, mesh={"data": 1, "expert": 32, "model": 1}, devices=32,
                     scan=True, remat="save_dispatch", fsdp=False)
  assert memory.row_label(dict(sparse, capacity_factor=2.0)) == (
      "lm_4_5b 32d 1x32x1 16x16 scan save_dispatch")
  assert memory.row_label(dict(sparse, capacity_factor=32.0)).endswith("save_dispatch cf32")
  assert memory.row_label(sparse).endswith("save_dispatch dropless")
