"""What a comparison shows: its table and its figures.

`format_table` prints one row per model of results.json (perplexities, parameters, speed, load);
`write_figures` draws the validation curves, each sparse model's expert load (the paper's
Figure 4), validation perplexity beside the routers' confidence and combine weight during training
(`router_panels`) and, for experiments that sweep the number of experts or hashes, perplexity
against it (`sweep_series`), each beside a JSON of the numbers drawn.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

from hashmoe import plots
from hashmoe.compare.specs import PathLike


def write_figures(results: Mapping[str, Any], out_dir: PathLike) -> list[str]:
  """valid_ppl.png (all models), load_<model>.png per sparse model, load_all.png and
  router_confidence.png (validation perplexity beside the routers' confidence and combine weight
  against steps), with JSONs."""
  out = Path(out_dir)
  models = results["models"]
  if not models:
    return []
  written = []
  curves = {}
  for name, entry in models.items():
    curves[name] = plots.mean_curve([{int(k): v for k, v in run.items()}
                                     for run in entry["curves"]])
  baseline = results.get("unigram_ppl")
  written += plots.write_ppl_curves(
      curves, out / "valid_ppl.png",
      title=f"Validation perplexity ({results['corpus'].split(' (')[0]})",
      baseline=None if baseline is None else ("unigram", baseline))
  loads = {}
  for name, entry in models.items():
    for layer, load in (entry.get("expert_load") or {}).items():
      label = name if len(entry["expert_load"]) == 1 else f"{name} {layer}"
      loads[label] = load
      written += plots.write_expert_load(label, load, out / f"load_{label.replace(' ', '_')}.png",
                                         tokens=entry.get("load_tokens"))
  if loads:
    written += plots.write_load_overview(loads, out / "load_all.png")
  panels = router_panels(models)
  if panels:
    written += plots.write_router_curves(
        curves, panels, out / "router_confidence.png",
        title=f"Perplexity and router confidence ({results['corpus'].split(' (')[0]})")
  for field, label in (("num_experts", "experts"), ("num_hashes", "hashes (MultiHash N)")):
    series = sweep_series(models, field)
    if series:
      written += plots.write_sweep(series, out / f"valid_ppl_by_{field}.png", xlabel=label,
                                   title=f"Validation perplexity at step {results['steps']} "
                                   f"against the number of {label.split(' ')[0]}")
  return written


def router_panels(models: Mapping[str, Mapping[str, Any]]
                  ) -> dict[str, dict[str, plots.Curve]]:
  """{metric: {line label: Curve over seeds}} of the models' training-time router metrics
  (results.json's "router_curves"); a line per model, or per model and layer with several sparse
  layers. Empty when no model has any."""
  panels: dict[str, dict[str, plots.Curve]] = {}
  for name, entry in models.items():
    for metric, layers in (entry.get("router_curves") or {}).items():
      for layer, runs in layers.items():
        if not runs or not all(runs):
          continue
        label = name if len(layers) == 1 else f"{name} {layer}"
        panels.setdefault(metric, {})[label] = plots.mean_curve(
            [{int(k): v for k, v in run.items()} for run in runs])
  return panels


def sweep_series(models: Mapping[str, Mapping[str, Any]], field: str
                 ) -> dict[str, dict[float, tuple[float, float]]]:
  """Families of sparse models that differ only in `field` ("num_experts" or "num_hashes"), as
  {family: {value: (valid ppl mean, std)}}; families with fewer than 2 values are left out.

  A family is named by what its members share (router, and the hash table/key where they are not
  the defaults, and the other field when it varies across families)."""
  families: dict[tuple, dict[float, tuple[float, float]]] = {}
  labels: dict[tuple, str] = {}
  for entry in models.values():
    spec = dict(entry.get("spec", {}))
    if spec.get("router") is None or "num_experts" not in entry:
      continue
    value = entry["num_experts"] if field == "num_experts" else spec.get(field, 1)
    other = "num_hashes" if field == "num_experts" else "num_experts"
    spec["num_experts"] = entry["num_experts"]
    key = tuple(sorted((k, json.dumps(v)) for k, v in spec.items()
                       if k not in ("name", field, "balance_coef")))
    families.setdefault(key, {})[float(value)] = (entry["valid_ppl"],
                                                  entry.get("valid_ppl_std") or 0.0)
    label = spec["router"]
    # A table or key other than the defaults only a router with tables can have.
    if (spec.get("table"), spec.get("hash_key")) != ("balanced", "token"):
      label += f" ({spec.get('table')}, {spec.get('hash_key')})"
    labels[key] = (label, other, spec.get(other))
  kept = {k: v for k, v in families.items() if len(v) >= 2}
  names = [labels[k][0] for k in kept]
  result = {}
  for key, points in kept.items():
    label, other, other_value = labels[key]
    if names.count(label) > 1:
      label += f", {other.replace('num_', '')} {other_value}"
    result[label] = points
  return result


def _fmt(value: Optional[float], spec: str) -> str:
  return "-" if value is None else format(value, spec)


def format_table(results: Mapping[str, Any]) -> str:
  """The comparison table: one row per model."""
  header = ["model", "params", "active", "valid ppl", "test ppl", "tokens/s", "max/mean load",
            "dropped", "notes"]
  rows = [header]
  for name, m in results["models"].items():
    seeds = len(m.get("seeds", [])) or 1
    valid = f"{m['valid_ppl']:.2f}" + (f" ± {m['valid_ppl_std']:.2f}" if seeds > 1 else "")
    test = "-" if m.get("test_ppl") is None else (
        f"{m['test_ppl']:.2f}" + (f" ± {m['test_ppl_std']:.2f}" if seeds > 1 else ""))
    notes = m.get("description", "")
    if "balance_coef" in m:
      notes += f", coef {m['balance_coef']:g}" + (" (tuned)" if "tuning" in m else "")
    if "num_experts" in m:
      notes += f", E={m['num_experts']}"
    rows.append([name, f"{m['params']:,}", f"{m['active_params']:,}", valid, test,
                 _fmt(m.get("tokens_per_s"), ",.0f"), _fmt(m.get("max_over_mean_load"), ".2f"),
                 _fmt(None if m.get("dropped_fraction") is None else 100 * m["dropped_fraction"],
                      ".1f") + ("%" if m.get("dropped_fraction") is not None else ""),
                 notes])
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  lines = []
  for i, row in enumerate(rows):
    cells = [c.ljust(w) if j in (0, len(row) - 1) else c.rjust(w)
             for j, (c, w) in enumerate(zip(row, widths))]
    lines.append("  ".join(cells).rstrip())
    if i == 0:
      lines.append("  ".join("-" * w for w in widths))
  seeds = results.get("settings", {}).get("seeds")
  lines.append(f"{results['corpus']}; {results['steps']} steps"
               + (f", {seeds} seed(s) (± is the std over seeds)" if seeds else "")
               + (f"; unigram ppl of the validation text {results['unigram_ppl']:.1f}"
                  if results.get("unigram_ppl") else ""))
  if (results.get("jobs") or 1) > 1:
    lines.append(f"tokens/s: {results['jobs']} runs trained at once, sharing the cores; for "
                 "speed comparisons use --jobs 1")
  return "\n".join(lines)
