"""Wall and CPU time of the default `hashmoe compare`, old commit against new, and whether their
results are identical.

    git worktree add /tmp/speed_old b7c1f9e
    python benchmarks/compare_speed.py --old /tmp/speed_old --new . --rounds 2 --out /tmp/speed
    python benchmarks/compare_speed.py --diff A/results.json B/results.json
    python benchmarks/compare_speed.py --flops
    python benchmarks/compare_speed.py --profile hash:0 --out /tmp/speed_profile

Each round runs `python -m hashmoe.cli compare` (the README's command, default settings) once from
each tree, old first, in a fresh output folder and with a JAX compilation cache folder that starts
empty and without the batch files a comparison keeps in the hashmoe cache (the "cold" figure: a
first run of the README's command; `--warm` adds a run of each tree, old then new, on the caches
its first cold run filled: a user's second run). The runs are interleaved (old, new, old, new) because the machine
is shared: each records wall seconds, the child's CPU seconds (user + sys, from `getrusage`) and
the load average before and after. The CPU ratio is the figure least disturbed by other jobs.

The results must be equal: every number of results.json except timings and the machine (losses,
perplexities, curves, expert loads, the tuning) is compared exactly (`results_differences`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

# Fields that measure the run, not the model: they differ between any two runs.
TIMING_KEYS = frozenset({"tokens_per_s", "wall_s", "cpu_s", "machine", "load_average_at_start",
                         "jobs"})


def _leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
  if isinstance(obj, Mapping):
    for key in sorted(obj):
      if key not in TIMING_KEYS:
        yield from _leaves(obj[key], f"{path}/{key}")
  elif isinstance(obj, (list, tuple)):
    for i, item in enumerate(obj):
      yield from _leaves(item, f"{path}[{i}]")
  else:
    yield path, obj


def _equal(a: Any, b: Any) -> bool:
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
    return True
  return a == b and type(a) is type(b)


def results_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list[str]]:
  """{"different": paths whose values differ, "only_old": ..., "only_new": ...} of two results.json
  objects, timings and machine left out. Values are compared exactly (JSON floats round-trip
  float64, so equal text is equal bits)."""
  a, b = dict(_leaves(old)), dict(_leaves(new))
  return {"different": [p for p in a if p in b and not _equal(a[p], b[p])],
          "only_old": [p for p in a if p not in b], "only_new": [p for p in b if p not in a]}


def _kept_batches() -> Path:
  """Where `hashmoe compare` keeps each seed's batches between comparisons (the new tree)."""
  return Path(os.environ.get("HASHMOE_CACHE") or Path.home() / ".cache" / "hashmoe") / "batches"


def _run(tree: Path, out: Path, cache: Path, extra: list[str]) -> dict[str, Any]:
  env = dict(os.environ, PYTHONPATH=os.fspath(tree), JAX_COMPILATION_CACHE_DIR=os.fspath(cache))
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  load0, wall0 = os.getloadavg(), time.perf_counter()
  with open(out.with_suffix(".log"), "w") as log:
    code = subprocess.call([sys.executable, "-m", "hashmoe.cli", "compare", "--out",
                            os.fspath(out), "--no-progress", *extra], cwd=tree, env=env,
                           stdout=log, stderr=subprocess.STDOUT)
  wall = time.perf_counter() - wall0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return {"tree": os.fspath(tree), "out": os.fspath(out), "exit": code, "wall_s": wall,
          "cpu_s": cpu, "sys_s": after.ru_stime - before.ru_stime,
          "page_faults": after.ru_minflt - before.ru_minflt, "load_before": list(load0),
          "load_after": list(os.getloadavg())}


def flops(models: list[str], repeats: int = 50) -> dict[str, Any]:
  """XLA's count of FLOPs per token of each default-compare model's train step (forward,
  backward, update: `Compiled.cost_analysis`) and the GFLOP/s a jitted float32 matmul reaches at
  the models' shapes on this machine now (the fastest of `repeats` calls after a warm-up: on a
  shared machine, the closest to its peak)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np

  from hashmoe.compare import configs
  from hashmoe.compare.specs import PRESETS, default_experiment
  from hashmoe import models as models_lib
  from hashmoe.training.trainer import Trainer
  # pylint: enable=g-import-not-at-top
  settings = PRESETS["default"]
  rows, tokens = settings.batch_size, settings.batch_size * settings.seq_len
  out: dict[str, Any] = {"models": {}, "matmul_gflops": {}, "load": list(os.getloadavg())}
  for name in models:
    spec = default_experiment([name]).models[0]
    config = configs.model_config(spec, settings, vocab_size=settings.vocab_size)
    trainer = Trainer(config, models_lib.build_model(config), configs.make_optimizer(settings),
                      configs.mesh(settings))
    batch = {k: jax.ShapeDtypeStruct((rows, settings.seq_len), np.int32,
                                     sharding=trainer.batch_sharding)
             for k in ("decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
                       "decoder_positions")}
    batch["decoder_loss_weights"] = jax.ShapeDtypeStruct((rows, settings.seq_len), np.float32,
                                                         sharding=trainer.batch_sharding)
    # pylint: disable-next=protected-access
    step, key = trainer._train_step, trainer._step_key
    with trainer.context():
      compiled = step.lower(trainer.abstract_state, batch, key,
                            trainer.loss_coefficients).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["models"][name] = {"flops_per_step": float(cost["flops"]),
                           "flops_per_token": float(cost["flops"]) / tokens}
  d, f, v = 64, 128, settings.vocab_size  # configs/models/tiny/baseline.gin, the vocabulary
  for m, k, n in ((tokens, d, v), (tokens, v, d), (tokens, d, f), (tokens, f, d), (v, tokens, d),
                  (1024, 1024, 1024)):
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    fn = jax.jit(jnp.matmul)
    fn(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn(a, b).block_until_ready()
      times.append(time.perf_counter() - start)
    out["matmul_gflops"][f"{m}x{k}x{n}"] = 2 * m * k * n / min(times) / 1e9
  out["load_after"] = list(os.getloadavg())
  return out


def profile_run(run: str, out: Path, steps: int, top: int = 45) -> None:
  """cProfile of one default-compare run in this process ("MODEL:SEED[:COEF]", e.g. hash:0 or
  switch:0:0.01), as `hashmoe compare` trains it, into OUT/runs/...; prints wall and process CPU
  seconds and the `top` functions by cumulative time (where the wall time goes: waiting for the
  device in the loop's fetch, compiling, tracing, evaluating, reading data)."""
  # pylint: disable=g-import-not-at-top
  import cProfile
  import dataclasses
  import pstats

  from hashmoe import cli
  cli._import_trainer(False)  # pylint: disable=protected-access
  from hashmoe.compare.comparison import Comparison
  from hashmoe.compare.runner import TrainRunner
  from hashmoe.compare.specs import PRESETS, default_experiment
  from hashmoe.data.cached import register_corpus
  # pylint: enable=g-import-not-at-top
  model, seed, *coef = run.split(":")
  settings = dataclasses.replace(PRESETS["default"], steps=steps or PRESETS["default"].steps)
  corpus = register_corpus(None, settings.vocab_size)
  runner = TrainRunner(corpus, settings, progress_bar=False, log=print)
  experiment = default_experiment([model])
  comparison = Comparison(experiment, settings, out, runner, corpus=corpus.description)
  profiler = cProfile.Profile()
  wall0, cpu0 = time.perf_counter(), time.process_time()
  profiler.enable()
  comparison.run_one(experiment.models[0], int(seed), float(coef[0]) if coef else None)
  profiler.disable()
  print(f"wall {time.perf_counter() - wall0:.1f} s, process CPU {time.process_time() - cpu0:.1f} "
        f"s, load {os.getloadavg()}")
  pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--old", help="the old tree (a worktree of the old commit)")
  parser.add_argument("--new", default=".", help="the new tree (default: here)")
  parser.add_argument("--rounds", type=int, default=2, help="old/new pairs (interleaved)")
  parser.add_argument("--warm", action="store_true",
                      help="also run each tree again on its filled compilation cache")
  parser.add_argument("--out", default="/tmp/compare_speed", help="where runs and JSON go")
  parser.add_argument("--diff", nargs=2, metavar=("OLD", "NEW"),
                      help="only compare two results.json files")
  parser.add_argument("--flops", action="store_true",
                      help="only print FLOPs per token of each model's step and matmul GFLOP/s")
  parser.add_argument("--profile", metavar="MODEL:SEED[:COEF]",
                      help="only profile one run of the default comparison in this process")
  parser.add_argument("--steps", type=int, default=0, help="--profile: steps (default 400)")
  parser.add_argument("compare_args", nargs="*", help="extra `hashmoe compare` flags (after --)")
  args = parser.parse_args(argv)
  if not (args.diff or args.profile or args.flops or args.old):
    parser.error("--old is required (or --diff, --profile, --flops)")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.diff:
    old, new = (json.loads(Path(p).read_text()) for p in args.diff)
    diff = results_differences(old, new)
    print(json.dumps(diff, indent=2))
    return 1 if diff["different"] else 0
  if args.profile:
    profile_run(args.profile, Path(args.out) / "profile", args.steps)
    return 0
  if args.flops:
    print(json.dumps(flops(["dense", "switch", "hash"]), indent=2))
    return 0
  root = Path(args.out)
  root.mkdir(parents=True, exist_ok=True)
  runs = []
  for r in range(args.rounds):
    for side, tree in (("old", args.old), ("new", args.new)):
      name = f"{side}{r}"
      shutil.rmtree(root / name, ignore_errors=True)
      shutil.rmtree(root / f"cache_{name}", ignore_errors=True)
      # Nor the batch files an earlier comparison kept (`cached.batch_cache_file`).
      shutil.rmtree(_kept_batches(), ignore_errors=True)
      run = _run(Path(tree).resolve(), root / name, root / f"cache_{name}", args.compare_args)
      runs.append({"name": name, **run})
      print(json.dumps(runs[-1]), flush=True)
  if args.warm:
    # A second run of each tree on the compilation cache its first cold run filled (what a user's
    # second `hashmoe compare` meets), old first; the output folders are fresh, so nothing else is
    # reused.
    for side, tree in (("old", args.old), ("new", args.new)):
      shutil.rmtree(root / f"{side}_warm", ignore_errors=True)
      run = _run(Path(tree).resolve(), root / f"{side}_warm", root / f"cache_{side}0",
                 args.compare_args)
      runs.append({"name": f"{side}_warm", **run})
      print(json.dumps(runs[-1]), flush=True)
  reference = json.loads((root / "old0" / "results.json").read_text())
  for run in runs:
    results = Path(run["out"]) / "results.json"
    run["differences"] = (results_differences(reference, json.loads(results.read_text()))
                          if results.exists() else "no results.json")
  summary = {"runs": runs}
  for side in ("old", "new"):
    mine = [r for r in runs if r["name"].startswith(side) and not r["name"].endswith("_warm")]
    summary[side] = {k: sorted(r[k] for r in mine) for k in ("wall_s", "cpu_s")}
    warm = [r for r in runs if r["name"] == f"{side}_warm"]
    if warm:
      summary[f"{side}_warm"] = {k: warm[0][k] for k in ("wall_s", "cpu_s")}
  (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
  return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
  sys.exit(main())
