"""The comparison: every model of an experiment, seed by seed, and what results.json says.

`Comparison` trains an experiment's models in `run_order` through a `Runner`, reusing a run that
finished before with the same settings (its run.json) and resuming an interrupted one from its
checkpoints. Switch's load-balancing coefficient is tuned on validation perplexity as the paper
does (`select_balance_coef`); `summarize` turns a model's runs into its results.json entry, and
every finished model rewrites results.json, table.txt and the figures (`hashmoe.compare.report`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from hashmoe.compare.report import format_table, write_figures
from hashmoe.compare.runs import RunRecord, RunRequest, Runner
from hashmoe.compare.specs import Experiment, ModelSpec, PathLike, Settings

RUN_FILE = "run.json"
REQUEST_FILE = "request.json"
RESULTS_FILE = "results.json"


def select_balance_coef(valid_ppl: Mapping[float, float]) -> float:
  """The load-balancing coefficient with the lowest validation perplexity (Section 5.1: "Load
  balancing for Switch is optimised on the validation set"). Non-finite results are ignored; a tie
  goes to the smaller coefficient (the least interference with the LM loss).

  Args:
    valid_ppl: {coefficient: validation perplexity}.
  """
  finite = {float(c): float(p) for c, p in valid_ppl.items() if math.isfinite(float(p))}
  if not finite:
    raise ValueError(f"no coefficient gave a finite validation perplexity: {dict(valid_ppl)}")
  return min(finite, key=lambda c: (finite[c], c))


def run_order(experiment: Experiment) -> list[ModelSpec]:
  """Models in training order: the dense baseline before the models that use it, otherwise the
  experiment's order."""
  models = list(experiment.models)
  if any(m.needs_baseline for m in models):
    base = next(m for m in models if m.name == experiment.baseline)
    models.remove(base)
    models.insert(0, base)
  return models


def _coef_tag(coef: Optional[float]) -> str:
  return "" if coef is None else f"-coef{coef:g}"


def _fingerprint(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class ModelResult:
  """A model's runs (all seeds) and, for tuned Switch models, the tuning runs."""
  spec: ModelSpec
  runs: list[RunRecord]
  tuning: Optional[dict[float, float]] = None
  balance_coef: Optional[float] = None


def _mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
  vals = [float(v) for v in values if v is not None]
  if not vals:
    return None, None
  return float(np.mean(vals)), float(np.std(vals))


def summarize(result: ModelResult) -> dict[str, Any]:
  """A model's entry of results.json (means over its seeds)."""
  runs = result.runs
  valid, valid_std = _mean_std([r.valid_ppl for r in runs])
  test, test_std = _mean_std([r.test_ppl for r in runs])
  sparse = runs[0].expert_load is not None
  entry: dict[str, Any] = {
      "valid_ppl": valid, "valid_ppl_std": valid_std,
      "params": int(runs[0].params), "active_params": int(runs[0].active_params),
      "tokens_per_s": _mean_std([r.tokens_per_s for r in runs])[0],
      "max_over_mean_load": _mean_std([r.max_over_mean_load for r in runs])[0] if sparse else None,
      "dropped_fraction": _mean_std([r.dropped_fraction for r in runs])[0] if sparse else None,
      "test_ppl": test, "test_ppl_std": test_std,
      "seeds": [r.seed for r in runs], "valid_ppl_per_seed": [r.valid_ppl for r in runs],
      "curves": [{str(k): v for k, v in sorted(r.curve.items())} for r in runs],
      "steps": min(r.steps for r in runs),
      "description": result.spec.describe(),
      "spec": result.spec.record(),
      "wall_s": float(sum(r.wall_s for r in runs)), "cpu_s": float(sum(r.cpu_s for r in runs)),
  }
  if sparse:
    layers = runs[0].expert_load
    entry["expert_load"] = {name: np.mean([r.expert_load[name] for r in runs], axis=0).tolist()
                            for name in layers}
    entry["num_experts"] = len(next(iter(layers.values())))
    entry["load_tokens"] = runs[0].load_tokens
  if result.balance_coef is not None:
    entry["balance_coef"] = result.balance_coef
  if result.tuning is not None:
    entry["tuning"] = {f"{c:g}": p for c, p in result.tuning.items()}
  curves = [r.router_curves for r in runs if r.router_curves]
  if len(curves) == len(runs):
    # Per metric and layer, one {step: value} per seed, as "curves" holds validation perplexity.
    entry["router_curves"] = {
        metric: {layer: [{str(k): v for k, v in sorted(c[metric][layer].items())} for c in curves]
                 for layer in layers if all(layer in c.get(metric, {}) for c in curves)}
        for metric, layers in curves[0].items()}
  stats = [r.table_stats for r in runs if r.table_stats]
  if stats:
    entry["table_train_split_max_over_mean"] = stats[0]["train_split_max_over_mean"]
  return entry


def cpu_seconds() -> float:
  """CPU seconds of this process and of its finished child processes (`hashmoe compare --jobs`'s
  workers)."""
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return time.process_time() + children.ru_utime + children.ru_stime


def _machine() -> dict[str, Any]:
  info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}
  with contextlib.suppress(OSError):
    info["load_average"] = list(os.getloadavg())
  return info


class Comparison:
  """Runs an experiment's models run by run, keeping results.json current after each model.

  Args:
    experiment: the models.
    settings: what every run shares.
    out_dir: OUT.
    runner: trains one run (TrainRunner, or a fake in tests).
    corpus: names the data in results.json.
    log: where progress lines go.
  """

  def __init__(self, experiment: Experiment, settings: Settings, out_dir: PathLike,
               runner: Runner, *, corpus: str, log: Callable[[str], None] = print,
               extra: Optional[Mapping[str, Any]] = None):
    self.experiment, self.settings = experiment, settings
    self.out_dir = Path(out_dir)
    self.runner, self.corpus, self._log = runner, corpus, log
    self.extra = dict(extra or {})
    self.results: dict[str, ModelResult] = {}
    self.unfinished: Optional[str] = None
    self._wall0, self._cpu0 = time.perf_counter(), cpu_seconds()
    with contextlib.suppress(OSError):
      # Other jobs on the machine slow every timing; say how busy it was.
      self.extra.setdefault("load_average_at_start", list(os.getloadavg()))
    self._done_runs = 0
    self._trained_runs = 0  # Runs this object trained (not reused).
    # Whether reusing a finished run says so (not after `parallel.train_in_parallel`, whose
    # workers announced every run already).
    self.announce_reuse = True
    self.total_runs = sum(
        settings.seeds + (len(settings.balance_coefs) - 1 if m.tuned else 0)
        for m in experiment.models)

  # -- runs ------------------------------------------------------------------------------------

  def run_dir(self, model: str, seed: int, coef: Optional[float]) -> Path:
    return self.out_dir / "runs" / model / f"seed{seed}{_coef_tag(coef)}"

  def _request(self, spec: ModelSpec, seed: int, coef: Optional[float]) -> RunRequest:
    baseline_dir = baseline = None
    if spec.needs_baseline:
      baseline = {m.name: m for m in self.experiment.models}[self.experiment.baseline]
      baseline_dir = os.fspath(self.run_dir(baseline.name, seed, None))
    return RunRequest(model=spec.name, spec=spec, seed=seed, balance_coef=coef,
                      model_dir=os.fspath(self.run_dir(spec.name, seed, coef)),
                      settings=self.settings, baseline_dir=baseline_dir, baseline=baseline)

  def _request_identity(self, request: RunRequest) -> dict[str, Any]:
    # What makes a run what it is; the number of seeds and the tuning grid are not part of one run
    # (a comparison with more seeds reuses the runs of the seeds it already has).
    settings = {k: v for k, v in dataclasses.asdict(request.settings).items()
                if k not in ("seeds", "balance_coefs")}
    # The baseline is named by its spec (its run is the same seed's), not by its path, so that a
    # copied or moved output folder still reuses its runs.
    baseline = None if request.baseline is None else request.baseline.record()
    return {"spec": request.spec.record(), "seed": request.seed,
            "balance_coef": request.balance_coef, "corpus": self.corpus, "settings": settings,
            "baseline": baseline}

  def finished(self, spec: ModelSpec, seed: int, coef: Optional[float]) -> Optional[RunRecord]:
    """The run's record when an identical run finished before (its run.json), else None."""
    request = self._request(spec, seed, coef)
    run_file = Path(request.model_dir) / RUN_FILE
    if not run_file.exists():
      return None
    saved = json.loads(run_file.read_text())
    if saved.get("fingerprint") != _fingerprint(self._request_identity(request)):
      return None
    return RunRecord.from_json(saved["record"])

  def run_one(self, spec: ModelSpec, seed: int, coef: Optional[float], *,
              index: Optional[int] = None) -> RunRecord:
    """One run, reused from its run.json when an identical one finished before.

    Args:
      index: the run's number in the progress lines ("[index/total]"); default the next.
    """
    request = self._request(spec, seed, coef)
    model_dir = Path(request.model_dir)
    identity = self._request_identity(request)
    fingerprint = _fingerprint(identity)
    self._done_runs += 1
    label = (f"[{self._done_runs if index is None else index}/{self.total_runs}] {spec.name} "
             f"seed {seed}{'' if coef is None else f', balance coef {coef:g}'}")
    reused = self.finished(spec, seed, coef)
    if reused is not None:
      if self.announce_reuse:
        self._log(f"{label}: finished before, reusing {model_dir / RUN_FILE}")
      return reused
    request_file = model_dir / REQUEST_FILE
    if model_dir.exists():
      previous = json.loads(request_file.read_text()) if request_file.exists() else {}
      if previous.get("fingerprint") != fingerprint:
        # A run of another configuration under this name: its checkpoints must not be resumed.
        self._log(f"{label}: {model_dir} holds a run with other settings; starting afresh")
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    request_file.write_text(json.dumps({"fingerprint": fingerprint, **identity}, indent=2,
                                       default=str) + "\n")
    self._log(f"{label}: training {self.settings.steps} steps ({spec.describe()}) in {model_dir}")
    record = self.runner(request)
    self._trained_runs += 1
    run_file = model_dir / RUN_FILE
    tmp = model_dir / f".{RUN_FILE}.tmp"
    # Atomic: a run.json is either whole or absent, whichever process wrote it and however it
    # was stopped.
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "record": record.to_json()},
                              indent=2) + "\n")
    tmp.replace(run_file)
    self._log(f"{label}: valid ppl {record.valid_ppl:.2f}, {record.tokens_per_s:,.0f} tokens/s, "
              f"{record.wall_s:.0f} s")
    return record

  def run_model(self, spec: ModelSpec) -> ModelResult:
    seeds = list(range(self.settings.seeds))
    if not spec.tuned:
      coef = spec.balance_coef
      return ModelResult(spec, [self.run_one(spec, s, coef) for s in seeds], balance_coef=coef)
    # Tune on the first seed over the grid, then train the other seeds with the chosen value.
    tuning_runs = {c: self.run_one(spec, seeds[0], c) for c in self.settings.balance_coefs}
    tuning = {c: r.valid_ppl for c, r in tuning_runs.items()}
    best = select_balance_coef(tuning)
    if len(tuning) > 1:
      self._log(f"{spec.name}: balance coefficient {best:g} chosen on validation perplexity "
                + ", ".join(f"{c:g}: {p:.2f}" for c, p in tuning.items()))
    runs = [tuning_runs[best]] + [self.run_one(spec, s, best) for s in seeds[1:]]
    return ModelResult(spec, runs, tuning=tuning if len(tuning) > 1 else None, balance_coef=best)

  def finished_model(self, spec: ModelSpec) -> Optional[ModelResult]:
    """The model's result when every run it needs has finished (its run.json files), else None:
    what a comparison stopped while runs were in flight still reports."""
    seeds = list(range(self.settings.seeds))
    if not spec.tuned:
      runs = [self.finished(spec, s, spec.balance_coef) for s in seeds]
      return None if None in runs else ModelResult(spec, runs, balance_coef=spec.balance_coef)
    tuning_runs = {c: self.finished(spec, seeds[0], c) for c in self.settings.balance_coefs}
    if None in tuning_runs.values():
      return None
    tuning = {c: r.valid_ppl for c, r in tuning_runs.items()}
    best = select_balance_coef(tuning)
    runs = [tuning_runs[best]] + [self.finished(spec, s, best) for s in seeds[1:]]
    if None in runs:
      return None
    return ModelResult(spec, runs, tuning=tuning if len(tuning) > 1 else None, balance_coef=best)

  def collect_finished(self) -> None:
    """Adds to `results` every model whose runs have all finished (after a stop in parallel runs,
    where models finish out of order)."""
    for spec in run_order(self.experiment):
      if spec.name not in self.results:
        result = self.finished_model(spec)
        if result is not None:
          self.results[spec.name] = result

  def run(self) -> dict[str, Any]:
    """Trains every model; returns the results.json object. Raises Stopped or KeyboardInterrupt
    after writing the partial results."""
    self.out_dir.mkdir(parents=True, exist_ok=True)
    for spec in run_order(self.experiment):
      self.unfinished = spec.name
      trained = self._trained_runs
      self.results[spec.name] = self.run_model(spec)
      self.unfinished = None
      if self._trained_runs != trained:
        # Partial results after every model trained here, for a stop to keep; a model whose runs
        # were all reused (after `--jobs` workers trained them) adds nothing a stop could lose.
        self.write(complete=False)
    return self.write(complete=True)

  # -- outputs ---------------------------------------------------------------------------------

  def results_json(self, complete: bool) -> dict[str, Any]:
    """{"corpus", "steps", "models": {name: {"valid_ppl", "valid_ppl_std", "params",
    "active_params", "tokens_per_s", "max_over_mean_load", ...}}, "complete", "experiment",
    "settings", "machine", "wall_s", "cpu_s", ...}; models in the experiment's order."""
    order = [m.name for m in self.experiment.models if m.name in self.results]
    return {
        "corpus": self.corpus,
        "steps": self.settings.steps,
        "models": {name: summarize(self.results[name]) for name in order},
        "complete": complete,
        "unfinished": [m.name for m in self.experiment.models if m.name not in self.results],
        "experiment": {"name": self.experiment.name, "description": self.experiment.description},
        "settings": dataclasses.asdict(self.settings),
        "machine": _machine(),
        "wall_s": time.perf_counter() - self._wall0,
        "cpu_s": cpu_seconds() - self._cpu0,
        **self.extra,
    }

  def write(self, complete: bool) -> dict[str, Any]:
    """Writes results.json, table.txt and the figures for the models finished so far."""
    results = self.results_json(complete)
    write_figures(results, self.out_dir)
    tmp = self.out_dir / f".{RESULTS_FILE}.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(self.out_dir / RESULTS_FILE)
    (self.out_dir / "table.txt").write_text(format_table(results) + "\n")
    return results
