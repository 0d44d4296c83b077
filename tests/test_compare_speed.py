"""benchmarks/compare_speed.py's results comparison: which numbers of two results.json differ.

Hand-built results objects with known differences are the reference.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

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
