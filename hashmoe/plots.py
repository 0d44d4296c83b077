"""Figures of a comparison: validation perplexity against steps, and per-expert load (Figure 4).

Every figure is written twice, side by side: `NAME.png` (matplotlib, Agg canvas: no display, no
pyplot global state, safe in a headless process or a thread) and `NAME.json` holding exactly the
numbers drawn, so a figure can be checked, re-plotted or diffed without reading pixels.

    write_ppl_curves(curves, "out/valid_ppl.png")       # -> out/valid_ppl.png, out/valid_ppl.json
    write_expert_load("hash", load, "out/load_hash.png")
    write_load_overview(loads, "out/load_all.png")
    write_router_curves(curves, {"router_confidence": {...}}, "out/router_confidence.png")

Figure 4 of Roller et al. (2021) shows how evenly tokens spread over the experts of a hash layer
(balanced far more even than random). `write_expert_load` draws one model's per-expert share of
the tokens, experts sorted from the busiest, against the uniform share 1/E;
`write_load_overview` overlays the sorted shares of several models, scaled by E so that 1 is
perfect balance whatever the number of experts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PathLike = Union[str, os.PathLike]

# Small files that read well in a Markdown page: 6.4 x 4 inches at 100 dpi is 640 x 400 pixels.
_FIGSIZE = (6.4, 4.0)
_DPI = 100


@dataclasses.dataclass(frozen=True)
class Curve:
  """One model's validation perplexity over training (mean over seeds, and its spread).

  Attributes:
    steps: int[points], increasing.
    mean: float[points], perplexity at each step (mean over seeds).
    std: float[points] standard deviation over seeds (0 with one seed), or None.
    seeds: how many runs the mean is over.
  """
  steps: tuple[int, ...]
  mean: tuple[float, ...]
  std: Optional[tuple[float, ...]] = None
  seeds: int = 1

  def __post_init__(self):
    object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
    object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
    if self.std is not None:
      object.__setattr__(self, "std", tuple(float(v) for v in self.std))
    n = len(self.steps)
    if len(self.mean) != n or (self.std is not None and len(self.std) != n):
      raise ValueError(f"a curve needs as many values as steps: steps {n}, mean "
                       f"{len(self.mean)}, std {None if self.std is None else len(self.std)}")
    if any(b <= a for a, b in zip(self.steps, self.steps[1:])):
      raise ValueError(f"curve steps must increase strictly, got {self.steps}")
    if self.seeds < 1:
      raise ValueError(f"seeds must be >= 1, got {self.seeds}")


def mean_curve(runs: Sequence[Mapping[int, float]]) -> Curve:
  """The mean and standard deviation over seeds of per-run {step: ppl} records, on the steps
  every run reached (a run stopped early does not drag the others' points).

  Args:
    runs: one {step: perplexity} mapping per seed.

  Returns:
    Curve over the common steps (std is the population std over seeds, 0 with one seed).
  """
  if not runs:
    raise ValueError("mean_curve needs at least one run")
  common = sorted(set.intersection(*(set(int(s) for s in r) for r in runs)))
  values = np.array([[float(r[s]) for s in common] for r in runs], np.float64).reshape(
      len(runs), len(common))
  return Curve(steps=tuple(common), mean=tuple(values.mean(axis=0)),
               std=tuple(values.std(axis=0)), seeds=len(runs))


def _json_path(png: Path) -> Path:
  return png.with_suffix(".json")


def _finite_or_none(x: float) -> Optional[float]:
  return float(x) if math.isfinite(float(x)) else None


def save_figure(fig: Figure, png: PathLike, numbers: Mapping[str, Any]) -> tuple[str, str]:
  """Writes `fig` to `png` and the numbers it draws to the same path with .json."""
  png = Path(png)
  if png.suffix.lower() != ".png":
    raise ValueError(f"figure path must end in .png, got {os.fspath(png)!r}")
  png.parent.mkdir(parents=True, exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(png, dpi=_DPI)
  json_path = _json_path(png)
  json_path.write_text(json.dumps(numbers, indent=2, sort_keys=False) + "\n")
  return os.fspath(png), os.fspath(json_path)


def write_ppl_curves(curves: Mapping[str, Curve], png: PathLike, *,
                     title: str = "Validation perplexity", log_y: bool = True,
                     baseline: Optional[tuple[str, float]] = None) -> tuple[str, str]:
  """Validation perplexity against training steps, one line per model (band: ±1 std over seeds).

  Args:
    curves: {model name: Curve}, drawn in the mapping's order.
    png: output path (.png); the numbers go to the same path with .json.
    title: the axes title.
    log_y: a logarithmic perplexity axis (early steps are orders of magnitude above the end).
    baseline: optional (label, ppl) drawn as a horizontal dotted line, e.g. the unigram
      perplexity of the validation text.

  Returns:
    (png path, json path). The JSON is {"title", "x": "step", "y": "validation perplexity",
    "models": {name: {"steps", "mean", "std", "seeds"}}, "baseline": {"label", "ppl"} | null}.
  """
  if not curves:
    raise ValueError("write_ppl_curves needs at least one curve")
  fig = Figure(figsize=_FIGSIZE)
  ax = fig.add_subplot()
  for name, curve in curves.items():
    if not isinstance(curve, Curve):
      raise TypeError(f"curves[{name!r}] must be a Curve, got {type(curve).__name__}")
    steps, mean = np.asarray(curve.steps), np.asarray(curve.mean)
    label = name if curve.seeds == 1 else f"{name} ({curve.seeds} seeds)"
    (line,) = ax.plot(steps, mean, marker="o", markersize=3, linewidth=1.5, label=label)
    if curve.std is not None and curve.seeds > 1:
      std = np.asarray(curve.std)
      ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2,
                      linewidth=0)
  if baseline is not None:
    ax.axhline(float(baseline[1]), color="grey", linestyle=":", linewidth=1,
               label=f"{baseline[0]} ({baseline[1]:.1f})")
  if log_y:
    ax.set_yscale("log")
    # Plain numbers (150, 200, 300) read better than 1.5 x 10^2 on a perplexity axis; minor ticks
    # are labelled only when the axis spans about a decade or less (else they would collide).
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False,
                                                     minor_thresholds=(1.5, 0.8)))
  ax.set_xlabel("training step")
  ax.set_ylabel("validation perplexity")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  numbers = {
      "title": title, "x": "step", "y": "validation perplexity",
      "models": {name: {"steps": list(c.steps), "mean": [_finite_or_none(v) for v in c.mean],
                        "std": None if c.std is None else [_finite_or_none(v) for v in c.std],
                        "seeds": c.seeds} for name, c in curves.items()},
      "baseline": None if baseline is None else {"label": baseline[0],
                                                  "ppl": _finite_or_none(baseline[1])},
  }
  return save_figure(fig, png, numbers)


# The y labels of the router panels `write_router_curves` knows; another metric is labelled by name.
ROUTER_PANEL_LABELS = {"router_confidence": "mean max router probability",
                       "combine_weight_mean": "mean combine weight"}


def _draw_curve(ax, label: str, curve: Curve, color: str) -> None:
  steps, mean = np.asarray(curve.steps), np.asarray(curve.mean)
  ax.plot(steps, mean, marker="o", markersize=2, linewidth=1.5, color=color,
          label=label if curve.seeds == 1 else f"{label} ({curve.seeds} seeds)")
  if curve.std is not None and curve.seeds > 1:
    std = np.asarray(curve.std)
    ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def _plain_log_labels(value: float, _) -> str:
  """Labels of a log axis as plain numbers (0.05, 200), minor ticks only at 2 and 5 × 10^k so
  that an axis spanning several decades stays readable."""
  if value <= 0:
    return ""
  mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
  return f"{value:g}" if mantissa in (1.0, 2.0, 5.0) else ""


def _curve_numbers(curve: Curve) -> dict[str, Any]:
  return {"steps": list(curve.steps), "mean": [_finite_or_none(v) for v in curve.mean],
          "std": None if curve.std is None else [_finite_or_none(v) for v in curve.std],
          "seeds": curve.seeds}


def write_router_curves(ppl_curves: Mapping[str, Curve],
                        router_panels: Mapping[str, Mapping[str, Curve]], png: PathLike, *,
                        title: str = "Perplexity and router confidence") -> tuple[str, str]:
  """Validation perplexity and the routers' own metrics against training steps, side by side: a
  router that is not confident (max probability ≈ 1/E) gives its experts a small combine weight,
  and this shows when that changes against what the perplexity does.

  Args:
    ppl_curves: {model: Curve} of validation perplexity (the first panel, log scale).
    router_panels: {metric: {line label ("switch", or "switch decoder_3" with several sparse
      layers): Curve}}, one panel per metric in the mapping's order (log scale: the values span
      1/E to 1, or more for a scaled combine weight); `ROUTER_PANEL_LABELS` names the y axes.
    png: output path (.png); numbers to the .json beside it.
    title: the figure's title.

  Returns:
    (png path, json path). The JSON is {"title", "panels": {"validation_ppl" and each metric:
    {"y", "lines": {label: {"steps", "mean", "std", "seeds"}}}}}.
  """
  if not ppl_curves and not any(router_panels.values()):
    raise ValueError("write_router_curves needs at least one curve")
  panels = {"validation_ppl": ("validation perplexity", ppl_curves)}
  for metric, lines in router_panels.items():
    if lines:
      panels[metric] = (ROUTER_PANEL_LABELS.get(metric, metric), lines)
  for name, (_, lines) in panels.items():
    for label, curve in lines.items():
      if not isinstance(curve, Curve):
        raise TypeError(f"{name} curve {label!r} must be a Curve, got {type(curve).__name__}")
  # One colour per model in every panel, in order of first appearance.
  colors: dict[str, str] = {}
  for _, lines in panels.values():
    for label in lines:
      colors.setdefault(label, f"C{len(colors) % 10}")
  fig = Figure(figsize=(_FIGSIZE[0] / 1.6 * len(panels), _FIGSIZE[1]))
  numbers: dict[str, Any] = {"title": title, "panels": {}}
  for i, (name, (ylabel, lines)) in enumerate(panels.items()):
    ax = fig.add_subplot(1, len(panels), i + 1)
    for label, curve in lines.items():
      _draw_curve(ax, label, curve, colors[label])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(_plain_log_labels))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(_plain_log_labels))
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if lines:
      ax.legend(fontsize="x-small")
    numbers["panels"][name] = {"y": ylabel, "lines": {label: _curve_numbers(c)
                                                      for label, c in lines.items()}}
  fig.suptitle(title, fontsize="medium")
  fig.tight_layout()
  return save_figure(fig, png, numbers)


def _check_load(name: str, load: Sequence[float]) -> np.ndarray:
  arr = np.asarray(load, np.float64)
  if arr.ndim != 1 or arr.size < 1:
    raise ValueError(f"load of {name!r} must be a non-empty vector [experts], got shape "
                     f"{arr.shape}")
  if np.any(arr < 0) or not np.all(np.isfinite(arr)):
    raise ValueError(f"load of {name!r} must be finite and >= 0, got {arr.tolist()}")
  total = arr.sum()
  if not math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-3):
    raise ValueError(f"load of {name!r} must be fractions summing to 1, got a sum of {total}")
  return arr


def load_summary(load: Sequence[float]) -> dict[str, float]:
  """{"max_over_mean": E·max share (1 = perfect balance), "min_over_mean": E·min share,
  "cv": std/mean of the shares} of a per-expert load vector (fractions summing to 1)."""
  arr = _check_load("load", load)
  mean = arr.mean()
  return {"max_over_mean": float(arr.max() / mean), "min_over_mean": float(arr.min() / mean),
          "cv": float(arr.std() / mean)}


def write_expert_load(name: str, load: Sequence[float], png: PathLike, *,
                      tokens: Optional[int] = None, title: Optional[str] = None
                      ) -> tuple[str, str]:
  """One sparse model's share of tokens per expert, experts sorted from the busiest (Figure 4).

  Args:
    name: the model's name (legend and default title).
    load: float[E] fraction of the routed tokens each expert received (sums to 1), expert order.
    png: output path (.png); numbers to the .json beside it.
    tokens: how many tokens the shares were measured on (shown in the title and JSON).
    title: overrides the default title.

  Returns:
    (png path, json path). The JSON is {"model", "tokens", "load" (expert order),
    "sorted_load" (busiest first), "expert_order" (expert ids, busiest first), "uniform": 1/E,
    and load_summary's keys}.
  """
  arr = _check_load(name, load)
  experts = arr.size
  order = np.argsort(-arr, kind="stable")
  fig = Figure(figsize=_FIGSIZE)
  ax = fig.add_subplot()
  ax.bar(np.arange(experts), arr[order], width=0.85, color="tab:blue", label=name)
  ax.axhline(1.0 / experts, color="black", linestyle="--", linewidth=1,
             label=f"uniform 1/{experts}")
  summary = load_summary(arr)
  ax.set_xlabel(f"expert (sorted by load; {experts} experts)")
  ax.set_ylabel("fraction of tokens")
  if title is None:
    title = f"{name}: expert load, max/mean {summary['max_over_mean']:.2f}"
    if tokens:
      title += f" ({tokens:,} validation tokens)"
  ax.set_title(title, fontsize="medium")
  ax.legend(fontsize="small")
  ax.grid(True, axis="y", alpha=0.3)
  fig.tight_layout()
  numbers = {"model": name, "tokens": tokens, "load": arr.tolist(),
             "sorted_load": arr[order].tolist(), "expert_order": order.tolist(),
             "uniform": 1.0 / experts, **summary}
  return save_figure(fig, png, numbers)


def write_load_overview(loads: Mapping[str, Sequence[float]], png: PathLike, *,
                        title: str = "Expert load (sorted), relative to uniform"
                        ) -> tuple[str, str]:
  """Sorted per-expert loads of several models on one axis, scaled by E (1 = perfect balance).

  Returns:
    (png path, json path). The JSON is {"title", "models": {name: {"relative_sorted_load",
    "experts", "max_over_mean"}}}.
  """
  if not loads:
    raise ValueError("write_load_overview needs at least one model")
  fig = Figure(figsize=_FIGSIZE)
  ax = fig.add_subplot()
  numbers: dict[str, Any] = {"title": title, "models": {}}
  for name, load in loads.items():
    arr = _check_load(name, load)
    rel = np.sort(arr)[::-1] * arr.size
    # Experts on a 0..1 axis so models with different E share one picture.
    x = (np.arange(arr.size) + 0.5) / arr.size
    ax.plot(x, rel, marker="." if arr.size <= 64 else None, linewidth=1.5,
            label=f"{name} (E={arr.size}, max/mean {rel[0]:.2f})")
    numbers["models"][name] = {"relative_sorted_load": rel.tolist(), "experts": int(arr.size),
                               "max_over_mean": float(rel[0])}
  ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="uniform")
  ax.set_xlabel("experts, busiest to idlest (fraction of E)")
  ax.set_ylabel("load × E  (1 = uniform)")
  ax.set_title(title, fontsize="medium")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  return save_figure(fig, png, numbers)


def write_sweep(series: Mapping[str, Mapping[float, tuple[float, float]]], png: PathLike, *,
                xlabel: str, ylabel: str = "validation perplexity", title: Optional[str] = None,
                log_x: bool = True) -> tuple[str, str]:
  """A final metric against a swept setting, one line per family (Figure 3 of the paper draws
  validation perplexity against the number of experts this way).

  Args:
    series: {family: {x: (mean, std over seeds)}}; points are drawn in increasing x.
    png: output path (.png); numbers to the .json beside it.
    xlabel, ylabel, title: labels.
    log_x: a base-2 logarithmic x axis (expert counts and hash counts double).

  Returns:
    (png path, json path). The JSON is {"title", "x", "y", "series": {family: {"x", "mean",
    "std"}}}.
  """
  if not series:
    raise ValueError("write_sweep needs at least one series")
  fig = Figure(figsize=_FIGSIZE)
  ax = fig.add_subplot()
  numbers: dict[str, Any] = {"title": title, "x": xlabel, "y": ylabel, "series": {}}
  for name, points in series.items():
    if not points:
      raise ValueError(f"series {name!r} has no points")
    xs = sorted(points)
    mean = np.array([points[x][0] for x in xs], np.float64)
    std = np.array([points[x][1] for x in xs], np.float64)
    ax.errorbar(xs, mean, yerr=std if np.any(std > 0) else None, marker="o", markersize=4,
                linewidth=1.5, capsize=3, label=name)
    numbers["series"][name] = {"x": [float(x) for x in xs], "mean": mean.tolist(),
                               "std": std.tolist()}
  if log_x:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title, fontsize="medium")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  return save_figure(fig, png, numbers)
