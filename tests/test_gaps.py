"""`hashmoe.compare.gaps`: relative perplexity gaps between paired runs, checked against numbers
computed by hand from a results.json written here."""

import json

import numpy as np
import pytest

from hashmoe.compare import gaps


def _results():
  # Seeds 0 and 1; a crosses b between steps 20 and 30 on the mean (seed 0 at 25, seed 1 at 30).
  a = [{"10": 120.0, "20": 105.0, "30": 90.0}, {"10": 130.0, "20": 110.0, "30": 100.0}]
  b = [{"10": 100.0, "20": 100.0, "30": 100.0}, {"10": 100.0, "20": 100.0, "30": 100.0}]
  return {"corpus": "test", "models": {
      "a": {"seeds": [0, 1], "curves": a},
      "b": {"seeds": [0, 1], "curves": b},
      "hash": {"seeds": [1], "curves": [{"10": 50.0, "20": 60.0, "30": 70.0}]},
      "switch": {"seeds": [0, 1], "curves": b}}}


def test_pair_gaps_against_hand_numbers():
  out = gaps.pair_gaps(_results(), "a", "b")
  assert out["steps"] == [10, 20, 30] and out["seeds"] == [0, 1]
  per_seed = np.array([[0.2, 0.05, -0.1], [0.3, 0.1, 0.0]])
  np.testing.assert_allclose(out["per_seed"]["0"], per_seed[0])
  np.testing.assert_allclose(out["mean"], [0.25, 0.075, -0.05])
  np.testing.assert_allclose(out["std"], [0.05, 0.025, 0.05])
  # Mean 0.075 -> -0.05 between 20 and 30: zero at 20 + 10 * 0.075 / 0.125 = 26.
  np.testing.assert_allclose(out["crossings"], [26.0])
  np.testing.assert_allclose(out["crossings_per_seed"]["0"], [20 + 10 * 0.05 / 0.15])
  assert out["crossings_per_seed"]["1"] == [30.0]
  assert out["final"] == pytest.approx(-0.05) and out["paper"] is None
  # Only the seeds both ran are paired.
  assert gaps.pair_gaps(_results(), "hash", "switch")["seeds"] == [1]
  assert gaps.pair_gaps(_results(), "hash", "switch")["paper"] == pytest.approx(23.16 / 23.65 - 1)


def test_crossings_without_sign_change_and_errors():
  assert gaps.crossings([1, 2, 3], [-0.1, -0.2, -0.05]) == []
  assert gaps.crossings([1, 2, 3], [0.1, -0.1, 0.1]) == [1.5, 2.5]
  with pytest.raises(ValueError, match="model 'nope' is not in the results"):
    gaps.pair_gaps(_results(), "nope", "b")


def test_cli_writes_the_figure_and_its_numbers(tmp_path, capsys):
  (tmp_path / "results.json").write_text(json.dumps(_results()))
  assert gaps.main([str(tmp_path), "--pairs", "a/b,hash/switch", "--at", "20"]) == 0
  printed = capsys.readouterr().out
  assert "a/b" in printed and "20: +7.5 ± 2.5%" in printed and "crossings: 26" in printed
  numbers = json.loads((tmp_path / "gaps.json").read_text())
  assert [p["pair"] for p in numbers["pairs"]] == ["a/b", "hash/switch"]
  assert (tmp_path / "gaps.png").stat().st_size > 0
  assert gaps.main([str(tmp_path), "--pairs", "a-b"]) == 2
  assert "a/b" in capsys.readouterr().err
