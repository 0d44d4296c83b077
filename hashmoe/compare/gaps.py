"""How the perplexity gaps between a comparison's models move with training, and where they cross.

The paper's Hash vs Switch vs dense gaps are those of 100k updates; a short run can show a very
different gap (docs/RESULTS.md). Given a comparison's `results.json` (per-seed validation curves,
every model of a seed trained on the same batches), this reports for pairs of models a/b the
relative gap ppl_a / ppl_b - 1 at every evaluation: per seed (the seeds' runs are paired), its
mean and spread over seeds, the steps where the mean changes sign (linearly interpolated between
evaluations), and the paper's gap for the same pair beside it:

    python -m hashmoe.compare.gaps compare_out/long            # hash/switch, switch/dense, hash/dense
    python -m hashmoe.compare.gaps OUT --pairs switch_x_experts/switch,hash/switch

writes OUT/gaps.png and OUT/gaps.json (the numbers drawn) and prints the table. A negative gap
means a is better (lower perplexity) than b.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from hashmoe import plots

# Reddit validation perplexities, 64 experts, one sparse layer (../shared/PAPER.md: Hash 23.16 and
# Switch 23.65 in Figure 3 / Table 3; the 222M Baseline 24.90 in the authors' hash_ladder
# results). The relative gaps they imply are the paper's reference for each pair.
PAPER_PPL = {"hash": 23.16, "switch": 23.65, "dense": 24.90}
DEFAULT_PAIRS = (("hash", "switch"), ("switch", "dense"), ("hash", "dense"))


def paper_gap(a: str, b: str) -> Optional[float]:
  """The paper's relative gap for models named like the comparison's defaults, else None."""
  if a in PAPER_PPL and b in PAPER_PPL:
    return PAPER_PPL[a] / PAPER_PPL[b] - 1.0
  return None


def _seed_curves(results: Mapping[str, Any], model: str) -> dict[int, dict[int, float]]:
  """{seed: {step: ppl}} of one model of a results.json."""
  models = results.get("models", {})
  if model not in models:
    raise ValueError(f"model {model!r} is not in the results (models: {sorted(models)})")
  record = models[model]
  seeds, curves = record.get("seeds"), record.get("curves")
  if not seeds or not curves or len(seeds) != len(curves):
    raise ValueError(f"model {model!r} has no per-seed curves in the results")
  return {int(s): {int(k): float(v) for k, v in c.items()} for s, c in zip(seeds, curves)}


def crossings(steps: Sequence[int], gaps: Sequence[float]) -> list[float]:
  """Steps where the gap changes sign, interpolated linearly between the two evaluations around
  each change (a gap of exactly 0 at an evaluation is a crossing at that step)."""
  found: list[float] = []
  for i in range(1, len(steps)):
    g0, g1 = float(gaps[i - 1]), float(gaps[i])
    if g0 == 0.0 and i == 1:
      found.append(float(steps[0]))
    if g1 == 0.0:
      found.append(float(steps[i]))
    elif g0 != 0.0 and (g0 < 0) != (g1 < 0):
      found.append(steps[i - 1] + (steps[i] - steps[i - 1]) * g0 / (g0 - g1))
  return found


def pair_gaps(results: Mapping[str, Any], a: str, b: str) -> dict[str, Any]:
  """The relative gap of a to b at every evaluation both reached, on the seeds both ran.

  Returns:
    {"pair", "seeds", "steps", "per_seed": {seed: [gap]}, "mean", "std" (population, over seeds),
     "crossings" (of the mean), "crossings_per_seed", "final", "paper"}.
  """
  curves_a, curves_b = _seed_curves(results, a), _seed_curves(results, b)
  seeds = sorted(set(curves_a) & set(curves_b))
  if not seeds:
    raise ValueError(f"models {a!r} and {b!r} share no seed")
  steps = sorted(set.intersection(*(set(curves_a[s]) & set(curves_b[s]) for s in seeds)))
  if not steps:
    raise ValueError(f"models {a!r} and {b!r} share no evaluation step")
  per_seed = np.array([[curves_a[s][t] / curves_b[s][t] - 1.0 for t in steps] for s in seeds])
  mean = per_seed.mean(axis=0)
  return {
      "pair": f"{a}/{b}", "seeds": seeds, "steps": steps,
      "per_seed": {str(s): per_seed[i].tolist() for i, s in enumerate(seeds)},
      "mean": mean.tolist(), "std": per_seed.std(axis=0).tolist(),
      "crossings": crossings(steps, mean),
      "crossings_per_seed": {str(s): crossings(steps, per_seed[i]) for i, s in enumerate(seeds)},
      "final": float(mean[-1]), "paper": paper_gap(a, b),
  }


def write_gaps(results: Mapping[str, Any], pairs: Sequence[tuple[str, str]], png: Path, *,
               title: str = "Relative perplexity gaps against steps") -> dict[str, Any]:
  """Computes `pair_gaps` for each pair, draws them (band: ±1 std over seeds; dashed: the
  paper's gap of the pair) to `png` and writes the numbers to the same path with .json."""
  numbers = {"title": title, "x": "step", "y": "ppl_a / ppl_b - 1",
             "pairs": [pair_gaps(results, a, b) for a, b in pairs]}
  fig = Figure(figsize=(6.4, 4.0))
  ax = fig.add_subplot()
  for gap in numbers["pairs"]:
    steps, mean, std = (np.asarray(gap[k]) for k in ("steps", "mean", "std"))
    (line,) = ax.plot(steps, 100 * mean, marker="o", markersize=2, linewidth=1.5,
                      label=f"{gap['pair']} ({len(gap['seeds'])} seeds)")
    ax.fill_between(steps, 100 * (mean - std), 100 * (mean + std), color=line.get_color(),
                    alpha=0.2, linewidth=0)
    if gap["paper"] is not None:
      ax.axhline(100 * gap["paper"], color=line.get_color(), linestyle="--", linewidth=1,
                 label=f"{gap['pair']}, paper ({100 * gap['paper']:+.1f}%)")
  ax.axhline(0.0, color="black", linewidth=0.8)
  ax.set_xlabel("training step")
  ax.set_ylabel("relative validation perplexity gap (%)")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="x-small")
  fig.tight_layout()
  plots.save_figure(fig, png, numbers)
  return numbers


def format_table(numbers: Mapping[str, Any], at: Sequence[int] = ()) -> str:
  """One line per pair: the mean gap (± std) at the first, the `at` and the last evaluations, the
  crossings of the mean and the paper's gap."""
  lines = []
  for gap in numbers["pairs"]:
    steps = gap["steps"]
    wanted = sorted({steps[0], steps[-1], *(t for t in at if t in steps)})
    cells = [f"{t}: {100 * gap['mean'][steps.index(t)]:+.1f} ± "
             f"{100 * gap['std'][steps.index(t)]:.1f}%" for t in wanted]
    cross = ", ".join(f"{c:.0f}" for c in gap["crossings"]) or "none"
    paper = "–" if gap["paper"] is None else f"{100 * gap['paper']:+.1f}%"
    lines.append(f"{gap['pair']:<28} {' | '.join(cells)} | crossings: {cross} | paper: {paper}")
  return "\n".join(lines)


def _parse_pairs(text: str) -> list[tuple[str, str]]:
  pairs = []
  for item in text.split(","):
    parts = item.strip().split("/")
    if len(parts) != 2 or not all(parts):
      raise ValueError(f"--pairs takes a,b pairs written a/b, got {item!r}")
    pairs.append((parts[0], parts[1]))
  return pairs


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m hashmoe.compare.gaps", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("out", help="a comparison's output folder (holding results.json)")
  parser.add_argument("--pairs", default=",".join(f"{a}/{b}" for a, b in DEFAULT_PAIRS),
                      help="model pairs a/b, comma-separated (default %(default)s)")
  parser.add_argument("--at", default="", help="steps to print besides the first and last")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = make_parser().parse_args(argv)
  out = Path(args.out)
  try:
    results = json.loads((out / "results.json").read_text())
    pairs = _parse_pairs(args.pairs)
    at = [int(t) for t in args.at.split(",") if t.strip()]
    corpus = str(results.get("corpus") or out.name).split(" (")[0]  # "embedded Shakespeare"
    title = f"Relative perplexity gaps, {corpus}"
    numbers = write_gaps(results, pairs, out / "gaps.png", title=title)
  except (OSError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_table(numbers, at))
  return 0


if __name__ == "__main__":
  sys.exit(main())
