"""Input pipelines: the prepared-data loader against the streaming pipeline, per host.

Three measurements of one task (default: the embedded Shakespeare LM task under its 8,000-piece
BPE, configs/tasks/embedded_lm.gin, in rows of 512 tokens, 64 rows a batch):

1. `hashmoe prepare` throughput: `preparation.prepare` of the task's splits into a fresh folder
   with --prepare-workers processes; non-padding target tokens written per second of its wall
   time (planning, shard checks and the manifest included; the imports and the vocabulary not).
2. Loader throughput per host: --batches batches after --warmup, read in this process from the
   prepared loader (`loader.batches`, one entry per read_threads:worker_count of
   --prepared-variants) and from the streaming `pipeline.TaskPipeline`. The headline
   `tokens_per_s` counts non-padding target tokens (what the loss sees); `row_tokens_per_s` counts
   every position of the rows (batch x length). The batches are only read, never trained on.
3. Time to the first batch of a restart, per loader and step N: a fresh Python process (this
   script with a hidden flag) imports what `hashmoe train` imports (`hashmoe.train`), registers
   the task, builds the run's input pipeline (`loader.make_input_pipeline`, DATA_SOURCE
   'prepared' or 'streaming') and resumes it from the data position a checkpoint at step N holds:
   for prepared data the loader's position with next_batch = N (index arithmetic), for streaming
   the TaskPipeline state at N (tf.data replays the N batches before it). `seconds_to_first_batch`
   runs from the process's start as the kernel records it (/proc/self/stat starttime against
   CLOCK_BOOTTIME, 10 ms ticks) to the first batch in hand; `seconds_since_spawn` is the same
   moment on the parent's clock from just before the spawn, a cross-check. Model restore is not
   part of it. The first batch's sha256 is checked against this process's own read of that batch
   where that is cheap (prepared data at every step; streaming up to step 10), so a restart that
   resumed at the wrong batch fails the benchmark.

A prepared dataset smaller than N batches wraps around: batch N is in epoch N * batch / rows (the
loader's per-epoch shuffle is computed per index, so the epoch costs nothing). Streaming steps
past --streaming-steps (10^5, 10^6: hours of replay) are not run: a least-squares line through the
measured steps gives them under "resume_extrapolated", each entry marked "extrapolated": true and
never among the measured "resume" entries.

The machine is shared: every measurement records the 1-minute load average before and after it,
and the in-process ones their process CPU time.

Run from the repository root (718 s and 767 s in two runs at load 8-10 on 2 cores, over half of
it the streaming restart at step 1,000; docs/PERFORMANCE.md has the figures):
  python benchmarks/data.py --profile --json docs/results/data_loader/data.json
With --json the figure (restart time against step, throughput bars) is written beside it as PNG.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import hashlib
import io
import json
import os
import platform
import pstats
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

# Only the standard library at the top: a restart child (`--resume-child`) times its own imports
# of hashmoe, TensorFlow and jax from its process start.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOADERS = ("prepared", "streaming")
# The data position's task as `hashmoe train` registers it (configs/tasks/embedded_lm.gin).
DEFAULT_PREFIX = "hashmoe"
TARGET_TOKENS_PER_S = 1_000_000
# Streaming restarts at steps up to this are checked against a replay in this process.
STREAMING_CHECK_STEPS = 10
_CHILD_MARK = "HASHMOE_DATA_BENCH_CHILD "


# --------------------------------------------------------------------------------------------------
# Clocks and the machine.


def process_start_age() -> Optional[float]:
  """Seconds since this process started, by the kernel's record (Linux), else None.

  /proc/self/stat field 22 is the start time in clock ticks after boot, on the clock that
  CLOCK_BOOTTIME reads.
  """
  try:
    stat = Path("/proc/self/stat").read_text()
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # fields from the 3rd on; 22nd
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError, AttributeError):
    return None


def _load() -> Optional[float]:
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


def _machine() -> dict[str, Any]:
  cpu = platform.processor()
  with contextlib.suppress(OSError):
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  versions = {}
  for name in ("grain", "array_record", "seqio", "tensorflow", "jax", "numpy"):
    with contextlib.suppress(Exception):
      from importlib import metadata
      versions[name] = metadata.version(name.replace("_", "-"))
  return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
          "python": platform.python_version(), "versions": versions}


@contextlib.contextmanager
def _measured(record: dict[str, Any]):
  """Adds load_before / load_after, seconds and cpu_seconds of the block to `record`."""
  record["load_before"] = _load()
  t0, c0 = time.perf_counter(), time.process_time()
  yield record
  record["seconds"] = round(time.perf_counter() - t0, 6)
  record["cpu_seconds"] = round(time.process_time() - c0, 6)
  record["load_after"] = _load()


def batch_sha256(batch: Mapping[str, Any]) -> str:
  """A digest of a batch's arrays (names, shapes, int32 values), to compare two reads of it."""
  import numpy as np
  digest = hashlib.sha256()
  for name in sorted(batch):
    value = np.ascontiguousarray(np.asarray(batch[name], np.int32))
    digest.update(f"{name}{value.shape}".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def extrapolate(points: Sequence[tuple[int, float]], steps: Sequence[int]
                ) -> tuple[dict[str, float], list[tuple[int, float]]]:
  """The least-squares line seconds = intercept + slope * step through `points` ((step,
  seconds), at least two distinct steps), and its values at `steps`.

  Returns:
    ({"intercept_s", "seconds_per_step"}, [(step, seconds), ...]).

  Raises:
    ValueError: fewer than two distinct steps.
  """
  xs = [float(s) for s, _ in points]
  ys = [float(t) for _, t in points]
  if len(set(xs)) < 2:
    raise ValueError(f"a line needs measurements at two distinct steps, got steps {xs}")
  mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
  slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys)) /
           sum((x - mx) ** 2 for x in xs))
  intercept = my - slope * mx
  return ({"intercept_s": intercept, "seconds_per_step": slope},
          [(int(s), intercept + slope * s) for s in steps])


# --------------------------------------------------------------------------------------------------
# The task, as a run registers it.


def _task_spec(args: argparse.Namespace) -> dict[str, Any]:
  """What a restart child needs to register the task and build the run's pipeline."""
  corpus = "text" if args.text_dir else "embedded"
  return {"name_prefix": args.name_prefix, "text_dir": args.text_dir,
          "vocab_size": args.vocab_size, "task": f"{args.name_prefix}_{corpus}_lm",
          "batch_size": args.batch, "seq_len": args.length, "seed": args.seed}


def _register(spec: Mapping[str, Any]) -> None:
  from hashmoe.data import tasks, vocab
  names = tasks.register_tasks(
      name_prefix=spec["name_prefix"], embedded=not spec["text_dir"], text_dir=spec["text_dir"],
      vocab_settings=vocab.SentencePieceSettings(vocab_size=spec["vocab_size"]))
  if spec["task"] not in names:
    raise ValueError(f"registering the corpus gave the tasks {names}, not {spec['task']!r}")


def _pipeline(spec: Mapping[str, Any], prepared_root: str, data_source: str):
  from hashmoe.data import loader
  return loader.make_input_pipeline(spec["task"], batch_size=spec["batch_size"],
                                    seq_len=spec["seq_len"], seed=spec["seed"],
                                    prepared_dir=prepared_root, data_source=data_source)


# --------------------------------------------------------------------------------------------------
# A restart (the child process).


def resume_child(request: Mapping[str, Any]) -> dict[str, Any]:
  """Runs in a fresh process: the restart of `request` up to its first batch (see the docstring).

  Times are seconds from this process's start (`process_start_age`); without /proc they count
  from the parent's spawn time instead, and say so.
  """
  spawn = float(request["spawn_time"])

  def age() -> float:
    since_start = process_start_age()
    return time.time() - spawn if since_start is None else since_start

  # What `hashmoe train` has imported before it reads data, in three timed layers (each import
  # counts only what the layers before it did not bring): TensorFlow and seqio (hashmoe.data's
  # tasks and streaming pipeline), jax and its training libraries, then hashmoe itself.
  imports = {"interpreter_and_script": age()}  # Python's start, this file's stdlib imports
  import seqio  # noqa: F401
  import tensorflow  # noqa: F401
  imports["tensorflow_seqio"] = age() - sum(imports.values())
  import flax  # noqa: F401
  import jax  # noqa: F401
  import optax  # noqa: F401
  import orbax.checkpoint  # noqa: F401
  imports["jax_flax_optax_orbax"] = age() - sum(imports.values())
  from hashmoe import train  # noqa: F401
  from hashmoe.data import loader  # noqa: F401
  imported = age()
  imports["hashmoe"] = imported - sum(imports.values())
  spec = request["spec"]
  _register(spec)
  registered = age()
  data = _pipeline(spec, request["prepared_root"], request["loader"])
  built = age()
  batches = data.train_batches(request["position"])
  batch = next(batches)
  first = age()
  wall = time.time()
  next_batch = int(batches.position()["next_batch"])
  batches.close()
  return {"seconds_to_first_batch": first, "seconds_since_spawn": wall - spawn,
          "clock": "process start" if process_start_age() is not None else "parent spawn",
          "imports_done_s": imported, "import_seconds": imports,
          "task_registered_s": registered,
          "pipeline_built_s": built, "data_seconds": first - imported,
          "next_batch": next_batch, "pipeline": type(data).__name__,
          "first_batch_sha256": batch_sha256(batch)}


def run_resume(loader_name: str, step: int, spec: Mapping[str, Any], prepared_root: str,
               position: Mapping[str, Any], timeout_s: float) -> dict[str, Any]:
  """One restart in a fresh process; its report plus load averages."""
  position = {**position, "next_batch": int(step)}
  record: dict[str, Any] = {"loader": loader_name, "step": int(step), "load_before": _load()}
  request = {"spec": dict(spec), "prepared_root": prepared_root, "loader": loader_name,
             "position": position}
  request["spawn_time"] = time.time()  # last, just before the spawn
  done = subprocess.run([sys.executable, __file__, "--resume-child", json.dumps(request)],
                        capture_output=True, text=True, timeout=timeout_s, cwd=str(REPO))
  record["load_after"] = _load()
  lines = [l for l in done.stdout.splitlines() if l.startswith(_CHILD_MARK)]
  if done.returncode != 0 or not lines:
    raise RuntimeError(f"the {loader_name} restart at step {step} failed (exit "
                       f"{done.returncode}):\n{done.stderr[-3000:]}")
  record.update(json.loads(lines[-1][len(_CHILD_MARK):]))
  if record["next_batch"] != step + 1:
    raise RuntimeError(f"the {loader_name} restart at step {step} handed out batch "
                       f"{record['next_batch'] - 1}")
  return record


# --------------------------------------------------------------------------------------------------
# Throughput (this process).


def read_batches(iterator, *, warmup: int, count: int) -> dict[str, Any]:
  """Reads `warmup` batches, then times `count`: tokens per second, non-padding and all.

  The warm-up batches' digests (`batch_sha256`, untimed) are returned under "warmup_sha256", in
  order: the reference for restarts at those steps.
  """
  import numpy as np
  digests = [batch_sha256(next(iterator)) for _ in range(warmup)]
  record: dict[str, Any] = {"batches": count}
  targets = rows = 0
  with _measured(record):
    for _ in range(count):
      batch = next(iterator)
      tokens = batch["decoder_target_tokens"]
      targets += int(np.count_nonzero(tokens))
      rows += int(tokens.size)
  seconds = max(record["seconds"], 1e-9)
  record.update(tokens_per_s=round(targets / seconds, 1), row_tokens_per_s=round(rows / seconds, 1),
                tokens=targets, row_tokens=rows, warmup_sha256=digests)
  return record


def _variants(text: str) -> tuple[tuple[int, int], ...]:
  out = []
  for item in text.split(","):
    if item:
      threads, _, workers = item.partition(":")
      out.append((int(threads), int(workers or 0)))
  return tuple(out)


def profile_prepared(manifest, args: argparse.Namespace, top: int = 12) -> list[dict[str, Any]]:
  """cProfile of the prepared loader read in the calling thread (read_threads=0, so that the
  profiler sees the reads): the functions with the most own time."""
  from hashmoe.data import loader
  iterator = loader.batches(manifest, batch_size=args.batch, seed=args.seed, read_threads=0)
  next(iterator)
  profiler = cProfile.Profile()
  profiler.enable()
  for _ in range(args.batches):
    next(iterator)
  profiler.disable()
  iterator.close()
  stats = pstats.Stats(profiler, stream=io.StringIO())
  rows = []
  for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
    rows.append({"function": f"{Path(file).name}:{line}({name})", "calls": calls,
                 "own_seconds": round(own, 4), "cumulative_seconds": round(cumulative, 4)})
  rows.sort(key=lambda r: -r["own_seconds"])
  return rows[:top]


# --------------------------------------------------------------------------------------------------
# The figure.


def write_figure(result: Mapping[str, Any], png: Path) -> None:
  """Restart seconds against step (symlog x: step 0 shows) per loader, measured solid and
  extrapolated dashed; and the loaders' throughput as bars against the 1M tokens/s target."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(12.8, 4.4), dpi=100)
  FigureCanvasAgg(fig)
  left, right = fig.subplots(1, 2)
  colors = {"prepared": "tab:blue", "streaming": "tab:orange"}
  for name in LOADERS:
    measured = sorted((r["step"], r["seconds_to_first_batch"]) for r in result["resume"]
                      if r["loader"] == name)
    if measured:
      left.plot(*zip(*measured), "o-", color=colors[name], label=f"{name} (measured)")
      after_imports = sorted((r["step"], r["data_seconds"]) for r in result["resume"]
                             if r["loader"] == name)
      left.plot(*zip(*after_imports), "x:", color=colors[name],
                label=f"{name}: of which after the imports")
    guessed = sorted((r["step"], r["seconds_to_first_batch"])
                     for r in result["resume_extrapolated"] if r["loader"] == name)
    if guessed and measured:
      line = [measured[-1]] + guessed
      left.plot(*zip(*line), "o--", color=colors[name], markerfacecolor="none",
                label=f"{name} (extrapolated, not run)")
  left.set_xscale("symlog", linthresh=1)
  left.set_yscale("log")
  left.set_xlabel("checkpoint step (batches already read)")
  left.set_ylabel("seconds from process start to first batch")
  left.set_title("restart: time to the first batch")
  left.grid(True, which="both", alpha=0.3)
  left.legend(fontsize=8)
  labels, values, bar_colors = [], [], []
  for r in result["throughput"]:
    label = r["loader"]
    if r["loader"] == "prepared":
      label += f"\n{r['read_threads']}t/{r['worker_count']}w" + (" (default)" if r["default"]
                                                                  else "")
    labels.append(label)
    values.append(r["tokens_per_s"])
    bar_colors.append(colors[r["loader"]])
  right.bar(range(len(values)), values, color=bar_colors)
  right.set_xticks(range(len(values)), labels, fontsize=7)
  right.axhline(TARGET_TOKENS_PER_S, color="k", ls=":", label="target 1M tokens/s")
  right.set_yscale("log")
  right.set_ylabel("non-padding target tokens / s (one host)")
  right.set_title(f"loader throughput, batch {result['settings']['batch']} x "
                  f"{result['settings']['length']}")
  right.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(png)


# --------------------------------------------------------------------------------------------------
# The benchmark.


def _steps(text: str) -> tuple[int, ...]:
  steps = tuple(int(float(s)) for s in text.split(",") if s)
  if any(s < 0 for s in steps) or len(set(steps)) != len(steps):
    raise argparse.ArgumentTypeError(f"steps must be distinct ints >= 0, got {text!r}")
  return steps


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--text-dir", default=None,
                 help="a folder of *.txt files to use instead of the embedded corpus")
  p.add_argument("--vocab-size", type=int, default=8000,
                 help="BPE pieces (embedded_lm.gin's VOCAB_SIZE)")
  p.add_argument("--name-prefix", default=DEFAULT_PREFIX,
                 help="task name prefix (the task is PREFIX_embedded_lm or PREFIX_text_lm)")
  p.add_argument("--batch", type=int, default=64, help="global batch size (rows)")
  p.add_argument("--length", type=int, default=512, help="SEQ_LEN (tokens per row)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batches", type=int, default=200,
                 help="timed batches per prepared-loader variant")
  p.add_argument("--streaming-batches", type=int, default=30,
                 help="timed batches of the streaming pipeline")
  p.add_argument("--warmup", type=int, default=5, help="batches read before timing")
  p.add_argument("--prepared-variants", type=_variants, default=_variants("2:0,1:0,4:0,0:0,2:1"),
                 help="read_threads:worker_count pairs of the prepared loader, comma-separated")
  p.add_argument("--prepare-workers", type=int, default=1, help="`hashmoe prepare --workers`")
  p.add_argument("--num-shards", type=int, default=8, help="`hashmoe prepare --num_shards`")
  p.add_argument("--prepare-splits", type=lambda t: tuple(x for x in t.split(",") if x),
                 default=("train", "validation", "test"),
                 help="`hashmoe prepare --splits` (train is what the loader reads)")
  p.add_argument("--prepared-steps", type=_steps, default=_steps("0,1e3,1e5,1e6"),
                 help="restart steps of the prepared loader")
  p.add_argument("--streaming-steps", type=_steps, default=_steps("0,1e3"),
                 help="restart steps of the streaming pipeline (it replays each)")
  p.add_argument("--extrapolate-steps", type=_steps, default=_steps("1e5,1e6"),
                 help="streaming steps beyond those run, given by a line through the measured")
  p.add_argument("--resume-timeout", type=float, default=3600.0,
                 help="seconds one restart may take")
  p.add_argument("--profile", action="store_true",
                 help="also cProfile the prepared loader read in one thread (JSON 'profile')")
  p.add_argument("--work-dir", default=None,
                 help="where to prepare (default: a temporary folder, removed at the end)")
  p.add_argument("--json", default=None, help="write the results here, and the PNG beside it")
  p.add_argument("--resume-child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.resume_child is not None:
    return args
  for name in ("batch", "length", "batches", "streaming_batches", "prepare_workers",
               "num_shards"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.warmup < 0:
    p.error(f"--warmup must be >= 0, got {args.warmup}")
  if not args.prepared_variants or any(t < 0 or w < 0 for t, w in args.prepared_variants):
    p.error("--prepared-variants needs at least one THREADS:WORKERS pair of ints >= 0, e.g. 2:0")
  if "train" not in args.prepare_splits:
    p.error(f"--prepare-splits must include train (what the loader reads), got "
            f"{','.join(args.prepare_splits)}")
  if args.text_dir is not None and not Path(args.text_dir).is_dir():
    p.error(f"--text-dir {args.text_dir} is not a folder")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.resume_child is not None:
    report = resume_child(json.loads(args.resume_child))
    print(_CHILD_MARK + json.dumps(report), flush=True)
    return report
  command = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + list(
      sys.argv[1:] if argv is None else argv)))
  print(command, flush=True)
  started = time.perf_counter()
  from hashmoe.data import prepared
  spec = _task_spec(args)
  _register(spec)
  work = Path(args.work_dir or tempfile.mkdtemp(prefix="hashmoe-data-bench-"))
  prepared_root = str(work / "prepared")
  folder = prepared.prepared_dir(prepared_root, spec["task"], args.length)
  if folder.exists():
    shutil.rmtree(folder)  # the prepare is a measurement: never resumed from an earlier run's
  try:
    result = _run(args, spec, command, prepared_root, folder)
  finally:
    if args.work_dir is None:
      shutil.rmtree(work, ignore_errors=True)
  result["benchmark_seconds"] = round(time.perf_counter() - started, 1)
  if args.json:
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    write_figure(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
  return result


def _run(args: argparse.Namespace, spec: Mapping[str, Any], command: str, prepared_root: str,
         folder: Path) -> dict[str, Any]:
  from hashmoe.data import loader, preparation
  task = spec["task"]

  # 1. hashmoe prepare.
  record: dict[str, Any] = {"workers": args.prepare_workers, "num_shards": args.num_shards,
                            "splits": list(args.prepare_splits)}
  with _measured(record):
    done = preparation.prepare(task, folder, seq_len=args.length, splits=args.prepare_splits,
                               num_shards=args.num_shards, workers=args.prepare_workers,
                               progress=False)
  if done.manifest is None:
    raise RuntimeError(f"prepare left {folder} without a manifest ({done.missing} missing)")
  record.update(seconds=round(done.seconds, 4), rows=done.rows, tokens=done.tokens,
                tokens_per_s=round(done.tokens_per_s, 1))
  prepare_record = record
  print(f"prepare: {done.tokens:,} tokens, {done.rows:,} rows in {done.seconds:.1f} s "
        f"({done.tokens_per_s:,.0f} tokens/s, {args.prepare_workers} worker(s); load "
        f"{record['load_before']} -> {record['load_after']})", flush=True)

  # 2. Throughput.
  data = _pipeline(spec, prepared_root, "prepared")
  manifest = data.manifest
  train_rows = manifest.rows("train")
  throughput = []
  for threads, workers in args.prepared_variants:
    iterator = loader.batches(manifest, batch_size=args.batch, seed=args.seed,
                              read_threads=threads, worker_count=workers)
    record = {"loader": "prepared", "read_threads": threads, "worker_count": workers,
              "default": (threads, workers) == (loader.DEFAULT_READ_THREADS, 0),
              **read_batches(iterator, warmup=args.warmup, count=args.batches)}
    del record["warmup_sha256"]
    iterator.close()
    throughput.append(record)
    print(f"prepared {threads} threads / {workers} workers: {record['tokens_per_s']:,.0f} "
          f"tokens/s ({record['row_tokens_per_s']:,.0f} row tokens/s; load "
          f"{record['load_before']} -> {record['load_after']})", flush=True)
  streaming = _pipeline(spec, prepared_root, "streaming")
  iterator = streaming.train_batches(None)
  # A checkpoint at step N holds this position with next_batch = N (`run_resume` sets it).
  positions = {"streaming": iterator.position()}
  record = {"loader": "streaming", **read_batches(iterator, warmup=args.warmup,
                                                  count=args.streaming_batches)}
  streaming_digests = record.pop("warmup_sha256")
  iterator.close()
  throughput.append(record)
  print(f"streaming: {record['tokens_per_s']:,.0f} tokens/s ({record['row_tokens_per_s']:,.0f} "
        f"row tokens/s; load {record['load_before']} -> {record['load_after']})", flush=True)

  # 3. Restarts.
  iterator = data.train_batches(None)
  positions["prepared"] = iterator.position()
  iterator.close()
  resume = []
  for name, steps in (("prepared", args.prepared_steps), ("streaming", args.streaming_steps)):
    for step in steps:
      record = run_resume(name, step, spec, prepared_root, positions[name], args.resume_timeout)
      expected = None
      if name == "prepared":
        record["epoch"] = round(step * args.batch / train_rows, 3)
        iterator = loader.batches(manifest, batch_size=args.batch, seed=args.seed,
                                  start_batch=step)
        expected = batch_sha256(next(iterator))
        iterator.close()
      elif step < len(streaming_digests):
        expected = streaming_digests[step]
      elif step <= STREAMING_CHECK_STEPS:
        iterator = streaming.train_batches(None)
        for _ in range(step):
          next(iterator)
        expected = batch_sha256(next(iterator))
        iterator.close()
      if expected is not None and expected != record["first_batch_sha256"]:
        raise RuntimeError(f"the {name} restart at step {step} read another first batch than "
                           "the uninterrupted pipeline")
      record["checked"] = expected is not None
      resume.append(record)
      print(f"restart {name} at step {step:,}: first batch {record['seconds_to_first_batch']:.2f}"
            f" s after process start (imports {record['imports_done_s']:.2f} s, data "
            f"{record['data_seconds']:.2f} s; load {record['load_before']} -> "
            f"{record['load_after']})", flush=True)

  fits, extrapolated = {}, []
  for name in LOADERS:
    points = [(r["step"], r["seconds_to_first_batch"]) for r in resume if r["loader"] == name]
    if len({s for s, _ in points}) < 2:
      continue
    measured_steps = {s for s, _ in points}
    wanted = [s for s in args.extrapolate_steps if s > max(measured_steps)]
    fit, values = extrapolate(points, wanted if name == "streaming" else [])
    if fit["seconds_per_step"] <= 0:
      values = []  # no growth measured (noise over too few steps): nothing to extrapolate
    # The same line through the data part alone (after the imports, whose time moves with the
    # machine's load rather than with the step).
    data_fit, _ = extrapolate([(r["step"], r["data_seconds"]) for r in resume
                               if r["loader"] == name], [])
    fits[name] = {**{k: float(f"{v:.6g}") for k, v in fit.items()},
                  **{f"data_{k}": float(f"{v:.6g}") for k, v in data_fit.items()},
                  "from_steps": sorted(measured_steps)}
    extrapolated += [{"loader": name, "step": s, "seconds_to_first_batch": round(t, 2),
                      "extrapolated": True, "from_steps": sorted(measured_steps)}
                     for s, t in values]
  for r in extrapolated:
    print(f"restart {r['loader']} at step {r['step']:,}: {r['seconds_to_first_batch']:,.0f} s "
          "EXTRAPOLATED (not run)")

  best = max((r for r in throughput if r["loader"] == "prepared"),
             key=lambda r: r["tokens_per_s"])
  default = next((r for r in throughput if r.get("default")), None)
  summary = {
      "target_tokens_per_s": TARGET_TOKENS_PER_S,
      "prepared_best": {k: best[k] for k in ("read_threads", "worker_count", "tokens_per_s")},
      "prepared_default_tokens_per_s": None if default is None else default["tokens_per_s"],
      "streaming_tokens_per_s": throughput[-1]["tokens_per_s"],
      "prepared_meets_target": best["tokens_per_s"] >= TARGET_TOKENS_PER_S}
  result = {
      "throughput": throughput, "resume": resume, "resume_extrapolated": extrapolated,
      "resume_fit": fits, "prepare": prepare_record, "summary": summary,
      "settings": {**{k: v for k, v in vars(args).items()
                      if k not in ("json", "resume_child", "work_dir")},
                   "task": task, "train_rows": train_rows,
                   "train_tokens": manifest.split("train")["tokens"],
                   "headline_tokens": "non-padding decoder target tokens"},
      "machine": _machine(), "command": command,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
  if args.profile:
    result["profile"] = profile_prepared(manifest, args)
  return json.loads(json.dumps(result))  # what the JSON file holds (tuples become lists)


if __name__ == "__main__":
  main()
