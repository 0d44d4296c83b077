"""One run of a comparison: what is asked of it (`RunRequest`), what it measured (`RunRecord`),
and the files of a `hashmoe.train.train` run those measurements are read from.

A `Runner` turns a request into a record: `hashmoe.compare.runner.TrainRunner` trains for real;
tests inject fakes. `Stopped` is how a run, or the comparison between runs, reports SIGTERM.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence

import numpy as np

from hashmoe.compare.specs import ModelSpec, PathLike, Settings


@dataclasses.dataclass(frozen=True)
class RunRequest:
  """One training run of a comparison.

  Attributes:
    model: the model's name.
    spec: its ModelSpec.
    seed: the run's seed.
    balance_coef: the Switch coefficient of this run (None for other routers).
    model_dir: where the run writes.
    settings: the comparison's settings.
    baseline_dir: the dense baseline run of the same seed (models that need one), else None.
    baseline: the baseline's ModelSpec (with baseline_dir).
  """
  model: str
  spec: ModelSpec
  seed: int
  balance_coef: Optional[float]
  model_dir: str
  settings: Settings
  baseline_dir: Optional[str] = None
  baseline: Optional[ModelSpec] = None


@dataclasses.dataclass
class RunRecord:
  """What one finished run measured (stored as run.json).

  Attributes:
    model, seed, balance_coef: which run.
    steps: the step it stopped at.
    valid_ppl: validation perplexity at the last step (eval.jsonl's last record).
    curve: {step: validation perplexity} of every evaluation.
    tokens_per_s: median of metrics.jsonl's per-window training throughput.
    params, active_params: `hashmoe.models.param_counts` total and per-token active.
    test_ppl: test perplexity of the final model (None without test evaluation).
    expert_load: {sparse layer: float[E] share of the real validation tokens' assignments}.
    max_over_mean_load: max over sparse layers of E * max share (None for dense).
    dropped_fraction: mean over sparse layers of the dropped share of real tokens (None: dense).
    load_tokens: real validation tokens the loads were measured on.
    wall_s, cpu_s: wall and process CPU seconds of the run (training and measurements).
    preempted: stopped early by SIGTERM (then steps < the comparison's).
    model_dir: where it was written.
    table_stats: hash tables' balance over the training split counts (hash models), or None.
    valid_ppl_remeasured: validation perplexity of the restored final checkpoint, measured again
      by the measuring pass (equals valid_ppl: a check that the checkpoint is the evaluated model).
    router_curves: {metric: {sparse layer: {step: value}}} of the training steps metrics.jsonl
      logged, for the `ROUTER_CURVE_METRICS` the routers report (None: dense, or a run recorded
      before they were kept). See `router_curves`.
  """
  model: str
  seed: int
  balance_coef: Optional[float]
  steps: int
  valid_ppl: float
  curve: dict[int, float]
  tokens_per_s: float
  params: int
  active_params: int
  test_ppl: Optional[float] = None
  expert_load: Optional[dict[str, list[float]]] = None
  max_over_mean_load: Optional[float] = None
  dropped_fraction: Optional[float] = None
  load_tokens: Optional[int] = None
  wall_s: float = 0.0
  cpu_s: float = 0.0
  preempted: bool = False
  model_dir: str = ""
  table_stats: Optional[dict[str, Any]] = None
  valid_ppl_remeasured: Optional[float] = None
  router_curves: Optional[dict[str, dict[str, dict[int, float]]]] = None

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["curve"] = {str(k): v for k, v in self.curve.items()}
    if self.router_curves is not None:
      d["router_curves"] = {metric: {layer: {str(k): v for k, v in points.items()}
                                     for layer, points in layers.items()}
                            for metric, layers in self.router_curves.items()}
    return d

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "RunRecord":
    d = dict(d)
    d["curve"] = {int(k): float(v) for k, v in d["curve"].items()}
    if d.get("router_curves") is not None:
      d["router_curves"] = {metric: {layer: {int(k): float(v) for k, v in points.items()}
                                     for layer, points in layers.items()}
                            for metric, layers in d["router_curves"].items()}
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


class Runner(Protocol):
  """Trains one run and returns what it measured (`TrainRunner`; tests inject fakes)."""

  def __call__(self, request: RunRequest) -> RunRecord:
    ...


class Stopped(Exception):
  """The comparison was stopped early (Ctrl-C or SIGTERM)."""

  def __init__(self, signal_name: str):
    super().__init__(signal_name)
    self.signal_name = signal_name


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
  """The JSON objects of a JSONL file (a torn last line is skipped)."""
  records = []
  path = Path(path)
  if not path.exists():
    return records
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def throughput(metrics: Sequence[Mapping[str, Any]]) -> float:
  """Median tokens/s over metrics.jsonl's records (each one logging window): robust to windows
  slowed by another process on a shared machine."""
  values = [float(r["tokens_per_s"]) for r in metrics
            if isinstance(r.get("tokens_per_s"), (int, float)) and r["tokens_per_s"] > 0]
  if not values:
    raise ValueError("metrics.jsonl holds no tokens_per_s records")
  return float(np.median(values))


def validation_curve(evals: Sequence[Mapping[str, Any]], split: str = "validation"
                     ) -> dict[int, float]:
  """{step: ppl} of eval.jsonl's records of `split` (the last record of a step wins)."""
  return {int(r["step"]): float(r["ppl"]) for r in evals if r.get("split", split) == split}


# What a learned router's layer is doing, step by step (the sparse layers' metrics.jsonl values):
# the mean max router probability (Switch, token-Switch, top-k) and the mean combine weight (every
# router: 1 for hash, p for Switch, σ for BASE), both over the batch's real tokens.
ROUTER_CURVE_METRICS = ("router_confidence", "combine_weight_mean")


def router_curves(metrics: Sequence[Mapping[str, Any]]
                  ) -> Optional[dict[str, dict[str, dict[int, float]]]]:
  """{metric: {sparse layer: {step: value}}} of metrics.jsonl's records, for each of
  `ROUTER_CURVE_METRICS` some layer logged (a non-finite value, written as a string, is left out);
  None when no record holds any (a dense model)."""
  curves: dict[str, dict[str, dict[int, float]]] = {}
  for record in metrics:
    for layer, values in (record.get("moe") or {}).items():
      for metric in ROUTER_CURVE_METRICS:
        value = values.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          curves.setdefault(metric, {}).setdefault(layer, {})[int(record["step"])] = float(value)
  return curves or None
