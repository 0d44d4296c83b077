"""benchmarks/compare_speed.py's results comparison (which numbers of two results.json differ)
and `hashmoe compare`'s malloc tuning (`hashmoe.compare.cli.tune_malloc`).

Hand-built results objects with known differences are the reference for the first; page faults
counted by the kernel, with and without the tuning, for the second.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_speed",
                                               ROOT / "benchmarks" / "compare_speed.py")
compare_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_speed)


def _results(valid=100.25, curve=(300.5, 100.25), load=(0.5, 0.5), tokens_per_s=1e4):
  return {"steps": 2, "wall_s": 12.0, "cpu_s": 20.0, "machine": {"load_average": [3.0]},
          "models": {"hash": {"valid_ppl": valid, "tokens_per_s": tokens_per_s,
                              "curves": [{"1": curve[0], "2": curve[1]}],
                              "expert_load": {"decoder_1": list(load)}, "wall_s": 5.0}}}


def test_timings_are_not_results():
  assert compare_speed.results_differences(_results(), _results(tokens_per_s=2e4)) == {
      "different": [], "only_old": [], "only_new": []}


def test_the_last_bit_of_a_number_counts():
  nudged = 100.25 + 1.4210854715202004e-14  # One float64 ulp above 100.25.
  assert nudged != 100.25
  diff = compare_speed.results_differences(_results(), _results(valid=nudged,
                                                                  load=(0.5, 0.25)))
  assert diff["different"] == ["/models/hash/expert_load/decoder_1[1]",
                               "/models/hash/valid_ppl"]


def test_fields_on_one_side_only_are_named():
  new = _results()
  new["models"]["hash"]["router_confidence"] = [0.1]
  del new["steps"]
  diff = compare_speed.results_differences(_results(), new)
  assert diff == {"different": [], "only_old": ["/steps"],
                  "only_new": ["/models/hash/router_confidence[0]"]}


# A step's pattern: buffers of a few MiB allocated, written and freed, again and again. Run in a
# fresh interpreter each (malloc's state is per process); the page faults it takes are the measure.
_FAULTS = """
import resource, sys
import numpy as np
from hashmoe.compare.cli import tune_malloc
print(tune_malloc())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
  buffers = [np.ones(n, np.float32) for n in (1 << 20, 3 << 20, 2 << 20)]
  del buffers
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env):
  out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": os.fspath(ROOT), **env}).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_malloc_reuses_step_buffers_instead_of_faulting_them_in():
  tuned, tuned_faults = _faults({})
  untuned, untuned_faults = _faults({"HASHMOE_MALLOC_TUNING": "0"})
  assert tuned and not untuned
  # Measured: ~75,000 faults untuned (fresh mmaps), ~1,500 tuned (pages kept in the heap).
  assert tuned_faults * 10 < untuned_faults, (tuned_faults, untuned_faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's settings")
def test_compare_restarts_under_malloc_settings_unless_set_or_switched_off(monkeypatch):
  from hashmoe import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
  monkeypatch.delenv("HASHMOE_MALLOC_TUNING", raising=False)
  env = cli._malloc_env()  # pylint: disable=protected-access
  assert env["MALLOC_ARENA_MAX"] == "1" and env["MALLOC_MMAP_MAX_"] == "0"
  assert env["PATH"] == os.environ["PATH"]  # The rest of the environment is kept.
  monkeypatch.setenv("HASHMOE_MALLOC_TUNING", "0")
  assert cli._malloc_env() is None  # pylint: disable=protected-access
  monkeypatch.delenv("HASHMOE_MALLOC_TUNING")
  monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # The user's own choice (and no restart loop).
  assert cli._malloc_env() is None  # pylint: disable=protected-access
