"""A comparison's runs in worker processes (`hashmoe compare --jobs N`), with identical results.

The comparison's models are tiny: one run's XLA:CPU steps keep ~1.2 of 2 cores busy, and the
comparison's 8 default runs take turns. Every run is a function of its request alone (seed,
model, coefficient, settings; data from its seed's `CachedPipeline`), so runs can go to separate
processes in any order and still compute the same bits: the same programs compile (XLA:CPU's
thread pool is sized by the machine, not by what else runs), on the same batches.

`train_in_parallel` plans the runs `Comparison.run` would make, with their dependencies (a model
that needs the dense baseline waits for that seed's baseline run; a tuned Switch's later seeds
wait for the first seed's tuning runs, and take the coefficient `select_balance_coef` picks from
them), and hands each free worker the ready run it is best placed for: not one whose programs
another worker is compiling at that moment, then runs that gate others, then a run whose model
the worker has compiled and whose seed's batches it holds. Switch's coefficient is an input of its
programs (`routing.runtime_loss_coefficients`), so its tuning runs compile once between them. The
parent reads each seed's batches from the task once, in a thread, into a file the workers read
(`cached.CachedPipeline.save`): no worker runs the tf.data pipeline. A worker runs
`Comparison.run_one`, which writes the run's run.json exactly as the sequential path does; the
sequential pass afterwards finds every run finished and assembles results.json with the same code,
while the workers exit. A stopped comparison (Ctrl-C, SIGTERM) stops every worker at a checkpoint
and keeps every finished run, as the sequential path does.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import threading
import time
import traceback
from multiprocessing import connection
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hashmoe.compare.runs import RunRecord, Stopped
from hashmoe.compare.specs import Experiment, ModelSpec, Settings

# Seconds a stopping worker gets to write its checkpoint before it is killed.
STOP_GRACE_S = 300.0


def default_jobs(runs: int) -> int:
  """Worker processes for `runs` runs: one per usable core, at most 4 (each worker's XLA pool
  already spreads a step over cores; more workers than that only compete for them), at most one
  per run. 1 means no workers: runs in this process, one after another."""
  try:
    cores = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):  # Not Linux.
    cores = os.cpu_count() or 1
  return max(1, min(cores, 4, runs))


@dataclasses.dataclass
class _Run:
  """One run to make. `coef` is None for a tuned model's later seeds until tuning has finished."""
  spec: ModelSpec
  seed: int
  coef: Optional[float]
  index: int                # Its number in the progress lines, in the sequential path's order.
  needs: tuple[str, ...]    # Keys of the runs it waits for.
  gates: bool = False       # Others wait for it: schedule it first.
  tuned_later: bool = False  # Its coefficient comes from the first seed's tuning.

  @property
  def key(self) -> str:
    return _key(self.spec.name, self.seed, self.coef if not self.tuned_later else "best")


def _key(model: str, seed: int, coef: Any) -> str:
  return f"{model}/seed{seed}/{coef}"


def plan(experiment: Experiment, settings: Settings) -> list[_Run]:
  """The runs `Comparison.run` makes, in its order, with what each waits for."""
  from hashmoe.compare.comparison import run_order  # pylint: disable=g-import-not-at-top
  models = {m.name: m for m in experiment.models}
  seeds = list(range(settings.seeds))
  runs: list[_Run] = []
  for spec in run_order(experiment):
    baseline = models.get(experiment.baseline) if spec.needs_baseline else None

    def needs(seed: int, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
      if baseline is None:
        return extra
      return (_key(baseline.name, seed, baseline.balance_coef),) + extra
    if not spec.tuned:
      runs += [_Run(spec, s, spec.balance_coef, len(runs) + i + 1, needs(s))
               for i, s in enumerate(seeds)]
      continue
    tuning = [_Run(spec, seeds[0], c, len(runs) + i + 1, needs(seeds[0]))
              for i, c in enumerate(settings.balance_coefs)]
    runs += tuning
    runs += [_Run(spec, s, None, len(runs) + i + 1, needs(s, tuple(r.key for r in tuning)),
                  tuned_later=True) for i, s in enumerate(seeds[1:])]
  needed = {n for r in runs for n in r.needs}
  for r in runs:
    r.gates = r.key in needed
  return runs


@dataclasses.dataclass
class _Worker:
  process: Any
  conn: Any
  name: str
  run: Optional[_Run] = None
  compiled: set = dataclasses.field(default_factory=set)
  seeds: set = dataclasses.field(default_factory=set)
  compiling: Optional[tuple[str, Optional[float]]] = None  # The programs its run compiles first.


def _program(run: _Run) -> tuple[str, Optional[float]]:
  """What a run compiles: its model's programs, which differ between coefficients unless the
  router takes them at run time (`routers.RouterConfig.runtime_coefficients`)."""
  router = run.spec.router
  if router is not None and "balance_coef" in type(router).runtime_coefficients:
    return run.spec.name, None
  return run.spec.name, run.coef


def _choose(worker: _Worker, ready: list[_Run], workers: Sequence[_Worker] = ()) -> _Run:
  """The ready run this worker is best placed for: not one whose programs another worker is
  compiling right now (its first run of them; this one would compile the same programs at the same
  time instead of reading them from the compilation cache after), then runs that gate others,
  then one whose programs it has compiled, then one whose seed's batches it holds, then the
  sequential order."""
  compiling = {w.compiling for w in workers if w is not worker and w.compiling is not None}

  def score(run: _Run):
    program = _program(run)
    return (program in compiling and program not in worker.compiled, not run.gates,
            program not in worker.compiled, run.seed not in worker.seeds, run.index)
  return min(ready, key=score)


def train_in_parallel(comparison, args: argparse.Namespace, jobs: int,
                      log: Callable[[str], None] = print,
                      while_starting: Optional[Callable[[], None]] = None) -> int:
  """Makes every run of `comparison` in `jobs` worker processes (each writes its run.json); the
  caller's `comparison.run()` then reuses them.

  Args:
    while_starting: runs here while the workers import and set up (work of this process that
      would otherwise delay them).

  Returns:
    How many runs were trained (0: all had finished before).

  Raises:
    KeyboardInterrupt or Stopped after every worker has stopped at a checkpoint; RuntimeError
    naming the run when a run fails or its worker dies.
  """
  from hashmoe.compare.comparison import select_balance_coef  # pylint: disable=g-import-not-at-top
  runs = plan(comparison.experiment, comparison.settings)
  done: dict[str, RunRecord] = {}
  pending: list[_Run] = []
  for run in runs:
    record = None if run.tuned_later else comparison.finished(run.spec, run.seed, run.coef)
    if record is not None:
      done[run.key] = record
    else:
      pending.append(run)
  if not pending:
    release_prestarted()
    return 0
  trained = len(pending)
  jobs = max(1, min(jobs, len(pending)))
  log(f"hashmoe compare: {len(pending)} run(s) in {jobs} worker processes "
      f"({len(runs) - len(pending)} finished before)")
  import jax  # pylint: disable=g-import-not-at-top
  batches = _BatchFiles(comparison, sorted({r.seed for r in pending}), while_starting)
  setup = {"args": args, "out_dir": os.fspath(comparison.out_dir), "corpus": comparison.corpus,
           "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
           "experiment": comparison.experiment, "settings": comparison.settings,
           "parent": os.getpid()}
  workers: list[_Worker] = []
  stop: Optional[BaseException] = None
  try:
    for i in range(jobs):
      process, parent_end = _start_worker(i, setup)
      workers.append(_Worker(process, parent_end, f"worker {i}"))
    release_prestarted()  # Those not needed (fewer runs than workers) free their cores now.
    batches.start()
    while pending or any(w.run for w in workers):
      batches.check()
      for worker in workers:
        if worker.run is not None or worker.conn is None:
          continue
        ready = [r for r in pending if all(n in done for n in r.needs)]
        if not ready:
          if not pending:
            # Nothing left for it: it exits while the others finish.
            _release(worker)
          continue
        for run in ready:
          if run.tuned_later and run.coef is None:
            # Its tuning has finished: the coefficient is known, and so is the program it runs.
            tuning = {done[n].balance_coef: done[n].valid_ppl for n in run.needs
                      if n.startswith(f"{run.spec.name}/")}
            run.coef = select_balance_coef(tuning)
        run = _choose(worker, ready, workers)
        pending.remove(run)
        worker.run = run
        worker.compiling = None if _program(run) in worker.compiled else _program(run)
        worker.conn.send((run.spec.name, run.seed, run.coef, run.index,
                          os.fspath(batches.path(run.seed))))
      busy = {w.conn: w for w in workers if w.run is not None}
      if not busy:
        raise RuntimeError("compare: runs wait for runs that cannot finish: "
                           + ", ".join(r.key for r in pending))
      # A failed batch file is noticed within a second even while every worker waits for it.
      for conn in connection.wait(list(busy), timeout=1.0):
        worker = busy[conn]
        while True:
          try:
            message = conn.recv()
          except EOFError:
            code = worker.process.exitcode
            worker.process.join(5)
            raise RuntimeError(f"compare: the worker process training {worker.run.key} died "
                               f"(exit code {worker.process.exitcode if code is None else code}"
                               "); its checkpoints are kept: run the same command again to "
                               "resume") from None
          kind = message[0]
          if kind == "log":
            log(message[1])
          elif kind == "done":
            run = worker.run
            done[run.key] = RunRecord.from_json(message[1])
            worker.compiled.add(_program(run))
            worker.compiling = None
            worker.seeds.add(run.seed)
            worker.run = None
          elif kind == "stopped":  # Its run stays named: the stop message lists it.
            raise KeyboardInterrupt if message[1] == "SIGINT" else Stopped(message[1])
          elif kind == "error":
            run, worker.run = worker.run, None
            raise RuntimeError(f"compare: run {run.key} failed in {worker.name}: {message[1]}\n"
                               f"{message[2]}")
          if not conn.poll():
            break
  except BaseException as e:
    stop = e
    in_flight = sorted({w.run.spec.name for w in workers if w.run is not None})
    if in_flight:
      comparison.unfinished = ", ".join(in_flight)  # What the stop message names.
    raise
  finally:
    # Workers first: which of them still wait for their batch file decides how they are stopped.
    _stop_workers(workers, stop, log, batches)
    batches.finish(wait=stop is None)
  return trained


class _BatchFiles:
  """Each seed's batches, read once from the task in this process (a thread, while the workers
  start and train) and written to OUT/.batches/seed<s>.npz, which the workers read instead of
  running the tf.data pipeline each (`cached.CachedPipeline.save`; the same arrays, so the same
  results). The folder is removed at the end; each file is also kept in the hashmoe cache
  (`cached.batch_cache_file`), and the next comparison of the same corpus, seed and shapes links
  it from there instead of reading the task again."""

  def __init__(self, comparison, seeds: list[int], while_starting: Optional[Callable[[], None]]):
    self.folder = comparison.out_dir / ".batches"
    self._runner, self._settings = comparison.runner, comparison.settings
    self._seeds, self._while_starting = seeds, while_starting
    self._thread: Optional[threading.Thread] = None
    self._error: Optional[BaseException] = None

  def path(self, seed: int) -> Path:
    return self.folder / f"seed{seed}.npz"

  def start(self) -> None:
    shutil.rmtree(self.folder, ignore_errors=True)  # A stopped comparison's: written again.
    self._thread = threading.Thread(target=self._write, name="hashmoe-compare-batches",
                                    daemon=True)
    self._thread.start()

  def _write(self) -> None:
    try:
      for i, seed in enumerate(self._seeds):
        self._write_seed(seed)
        if i == 0 and self._while_starting is not None:
          self._while_starting()
    except BaseException as e:  # pylint: disable=broad-except  Raised in the main thread.
      self._error = e

  def _write_seed(self, seed: int) -> None:
    """The seed's batch file: linked from the one an earlier comparison kept
    (`cached.batch_cache_file`) when that holds this seed's batches, else read from the task,
    written, and kept for the next comparison."""
    from hashmoe.data import cached  # pylint: disable=g-import-not-at-top
    s, path = self._settings, self.path(seed)
    kept = None
    if getattr(self._runner, "corpus", None) is not None:
      kept = cached.batch_cache_file(self._runner.corpus, seed=seed, batch_size=s.batch_size,
                                     seq_len=s.seq_len, steps=s.steps,
                                     eval_batches=s.eval_batches)
    if kept is not None and kept.exists() and self._runner.reuse_batch_file(seed, kept):
      _link_or_copy(kept, path)
      return
    pipeline = self._runner.pipeline(seed)
    pipeline.save(path, steps=s.steps, eval_batches=s.eval_batches)
    if kept is not None and pipeline.streaming:
      # `_link_or_copy` keeps it whole or not at all. A cache that cannot be written only means
      # the next comparison reads the task again.
      with contextlib.suppress(OSError):
        _link_or_copy(path, kept)

  def check(self) -> None:
    """Raises what writing a batch file raised (the runs waiting for it would wait forever)."""
    if self._error is not None:
      raise RuntimeError(f"compare: reading the batches failed: {type(self._error).__name__}: "
                         f"{self._error}") from self._error

  def written(self, seed: int) -> bool:
    return self.path(seed).exists()

  def finish(self, wait: bool) -> None:
    if self._thread is not None and wait:
      self._thread.join()
      self.check()
    shutil.rmtree(self.folder, ignore_errors=True)


def _link_or_copy(source: Path, dest: Path) -> None:
  """`dest` appears whole: a hard link (same file system), else a copy renamed into place."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  try:
    os.link(source, dest)
  except OSError:  # Another file system, or `dest` exists (another comparison kept it first).
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.copy")
    try:
      shutil.copyfile(source, tmp)
      os.replace(tmp, dest)
    finally:
      tmp.unlink(missing_ok=True)


def _release(worker: _Worker) -> None:
  """Tells an idle worker to exit (its process is joined later)."""
  with contextlib.suppress(OSError, ValueError):
    worker.conn.send(None)
    worker.conn.close()
  worker.conn = None


# Workers `prestart` started, (process, the parent's end of its pipe) each, not yet taken by
# `train_in_parallel`.
_PRESTARTED: list[tuple[Any, Any]] = []


def prestart(jobs: Optional[int]) -> int:
  """Starts the worker processes of a coming `train_in_parallel` now, before this process imports
  the trainer: a worker's imports (TensorFlow, JAX, the trainer: ~7 s of CPU) then overlap with
  this process's own and with its reading of the task, instead of following them (the first run
  started 11.8 s after the command instead of 14.7 s on a warm cache, docs/PERFORMANCE.md). They wait for their setup;
  `train_in_parallel` takes as many as it needs and `release_prestarted` ends the rest.

  Args:
    jobs: the --jobs given, or None for `default_jobs` of an unknown number of runs (one per
      usable core, at most 4; a comparison with fewer runs to make releases the others). No more
      than `default_jobs` allows are prestarted: a larger --jobs starts the rest when the runs
      are known (`train_in_parallel`), so that a big --jobs on a resumed comparison with little
      left does not first import the trainer in every one of them.

  Returns:
    How many were started (none for 1 job: the runs stay in this process).
  """
  count = min(jobs or default_jobs(1 << 30), default_jobs(1 << 30))
  if count <= 1:
    return 0
  for i in range(count):
    _PRESTARTED.append(_spawn(i, None))
  return count


def release_prestarted() -> None:
  """Ends the prestarted workers no `train_in_parallel` took. They hold nothing (they only
  imported), so they are killed rather than left to finish importing."""
  while _PRESTARTED:
    process, conn = _PRESTARTED.pop()
    with contextlib.suppress(OSError, ValueError):
      conn.close()
    process.kill()
    process.join()


def _start_worker(index: int, setup: dict[str, Any]):
  """A prestarted worker handed its setup, else a new one."""
  while _PRESTARTED:
    process, conn = _PRESTARTED.pop(0)
    try:
      conn.send(setup)
    except (OSError, ValueError):  # It died (e.g. Ctrl-C while importing): start another.
      process.join(1)
      continue
    return process, conn
  return _spawn(index, setup)


def _spawn(index: int, setup: Optional[dict[str, Any]]):
  """(process, the parent's end of its pipe) of a new worker process (`setup` None: it waits for
  it on the pipe, `prestart`)."""
  context = multiprocessing.get_context("spawn")
  parent_end, child_end = context.Pipe()
  process = context.Process(target=_worker_main, args=(child_end, setup),
                            name=f"hashmoe-compare-worker-{index}", daemon=True)
  process.start()
  child_end.close()
  return process, parent_end


def _stop_workers(workers: list[_Worker], stop: Optional[BaseException],
                  log: Callable[[str], None], batches: Optional[_BatchFiles] = None) -> None:
  """Ends every worker: those idle get their end-of-work message; on a stop, those training get
  SIGTERM (their trainer checkpoints and returns) unless Ctrl-C reached them already, and a grace
  period to finish. A worker still waiting for its run's batch file has trained nothing to save:
  it is killed. Without a stop, the workers exit on their own while this process goes on
  (`join_workers` waits for them)."""
  for worker in workers:
    if worker.conn is not None:
      with contextlib.suppress(OSError, ValueError):
        worker.conn.send(None)
  busy = [w for w in workers if w.run is not None and w.process.is_alive()]
  if stop is None:
    for worker in workers:
      if worker.conn is not None:
        with contextlib.suppress(OSError):
          worker.conn.close()
    _EXITING.extend(w.process for w in workers)
    return
  if batches is not None:
    for worker in [w for w in busy if not batches.written(w.run.seed)]:
      worker.process.kill()
      busy.remove(worker)
  if busy:
    names = ", ".join(w.run.key for w in busy)
    log(f"hashmoe compare: stopping {names} at a checkpoint")
    if not isinstance(stop, KeyboardInterrupt):
      # Ctrl-C went to the whole process group, the workers included; anything else did not.
      for worker in busy:
        with contextlib.suppress(ProcessLookupError):
          os.kill(worker.process.pid, signal.SIGTERM)
  deadline = time.monotonic() + STOP_GRACE_S
  for worker in workers:
    worker.process.join(max(0.0, deadline - time.monotonic()))
    if worker.process.is_alive():
      log(f"hashmoe compare: {worker.name} did not stop in {STOP_GRACE_S:.0f} s; killed")
      worker.process.kill()
      worker.process.join()
    if worker.conn is not None:
      with contextlib.suppress(OSError):
        worker.conn.close()


# Worker processes told to exit after a finished `train_in_parallel`: they tear down (JAX,
# TensorFlow) while this process writes the results.
_EXITING: list[Any] = []


def join_workers(timeout: float = 60.0) -> None:
  """Waits for the workers of finished `train_in_parallel` calls to exit (killing any that take
  longer than `timeout` seconds: they have no work left)."""
  deadline = time.monotonic() + timeout
  while _EXITING:
    process = _EXITING.pop()
    process.join(max(0.0, deadline - time.monotonic()))
    if process.is_alive():
      process.kill()
      process.join()


def _worker_main(conn, setup: Optional[dict[str, Any]]) -> None:
  """A worker process: sets up what `hashmoe compare` set up in its parent (`setup`, or the first
  message when prestarted), then trains the runs it is sent until it is sent None."""
  def send(*message):
    with contextlib.suppress(OSError, ValueError):
      conn.send(message)

  try:
    _worker_loop(conn, setup, send)
  except KeyboardInterrupt:
    send("stopped", "SIGINT")
  except Stopped as e:
    send("stopped", e.signal_name)
  except BaseException as e:  # pylint: disable=broad-except
    send("error", f"{type(e).__name__}: {e}", traceback.format_exc())
  finally:
    conn.close()


def _worker_loop(conn, setup: Optional[dict[str, Any]], send: Callable[..., None]) -> None:
  # pylint: disable=g-import-not-at-top
  from hashmoe import cli as hashmoe_cli
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: "
                      "%(message)s")
  hashmoe_cli._import_trainer(debug=False)  # pylint: disable=protected-access
  import jax
  from hashmoe.compare.cli import _corpus_name, _text_decoding  # pylint: disable=protected-access
  from hashmoe.compare.comparison import Comparison
  from hashmoe.compare.runner import TrainRunner
  from hashmoe.data.cached import register_corpus
  from hashmoe.training.trainer import shared_compilation
  # pylint: enable=g-import-not-at-top
  if setup is None:
    # Started by `prestart`: its imports are done; `train_in_parallel` sends the rest (None: not
    # needed after all).
    setup = conn.recv()
    if setup is None:
      return
  args = setup["args"]
  if setup["compilation_cache_dir"]:
    jax.config.update("jax_compilation_cache_dir", setup["compilation_cache_dir"])
    # Every program, however quick to compile: the other workers read it instead of compiling
    # it again (JAX caches only those that took 1 s by default; the sub-second ones, e.g. the
    # checkpoints' checksums, add up to seconds per model and worker).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  experiment, settings = setup["experiment"], setup["settings"]
  log = lambda text: send("log", text)

  def handle(signum, frame):
    del frame
    raise Stopped(signal.Signals(signum).name)

  # Between runs SIGTERM stops the worker; during one the trainer's own handler checkpoints.
  signal.signal(signal.SIGTERM, handle)
  encoding, errors = _text_decoding(args)
  corpus = register_corpus(args.text_dir, settings.vocab_size, encoding=encoding, errors=errors,
                           corpus=_corpus_name(args))
  # One progress bar per worker on one terminal would overwrite each other's lines: the parent
  # prints each run's start and end instead.
  parent = setup["parent"]

  def wait_for_batches():
    if os.getppid() != parent:
      raise RuntimeError("the compare process writing this run's batches has exited")

  runner = TrainRunner(corpus, settings, progress_bar=False,
                       tensorboard=getattr(args, "tensorboard", False), log=log,
                       batch_wait=wait_for_batches)
  comparison = Comparison(experiment, settings, setup["out_dir"], runner, corpus=setup["corpus"],
                          log=log)
  models = {m.name: m for m in experiment.models}
  with shared_compilation():
    while True:
      message = conn.recv()
      if message is None:
        return
      model, seed, coef, index, batch_file = message
      runner.batch_files[seed] = batch_file
      record = comparison.run_one(models[model], seed, coef, index=index)
      send("done", record.to_json())
