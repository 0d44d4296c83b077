"""The `hashmoe` command: prepare data, train, evaluate, and build hash tables, all configured
with gin.

    hashmoe prepare --gin_file=configs/runs/cpu_tiny.gin
    hashmoe train --gin_file=configs/runs/cpu_tiny.gin --gin.MODEL_DIR="'/tmp/tiny'" \
                  --gin.TRAIN_STEPS=200
    hashmoe eval  --gin_file=configs/runs/cpu_tiny.gin --gin_file=configs/runs/eval.gin \
                  --gin.MODEL_DIR="'/tmp/tiny'" --gin.SEQ_LEN=64 --gin.BATCH_SIZE=8 \
                  --gin.EVAL_BATCHES=4
    hashmoe build-hash --gin_file=configs/runs/cpu_tiny.gin --kind=balanced \
                  --output=/tmp/tables/balanced.npz
    hashmoe build-hash --hf_tokenizer=tokenizer.json --text=corpus/ --experts=256 --k=6 \
                  --kind=balanced --output=/tmp/tables/tid2eid.npy
    hashmoe compare --quick --models dense,hash --out /tmp/compare_quick

(`prepare` takes the run's gin files and writes its task's rows at SEQ_LEN under PREPARED_DIR, where
`train` then reads them; `--num_shards`, `--workers`, `--shard_indices` (one host's share),
`--verify`, `--tfrecord` (TFRecord copies too, which t5x reads with DATA_SOURCE='prepared'). `eval`
after the run's gin files: eval.gin's own BATCH_SIZE/SEQ_LEN/EVAL_BATCHES replace the run's, so
repeat the run's to reproduce its evaluation; `build-hash` needs no MODEL_DIR; `compare` takes
`--text-dir DIR` for your own text and lists its experiments with `--list`.)

Flags follow t5x: `--gin_file` (repeatable; a path, or one relative to the `configs/` folder),
`--gin.KEY=VALUE` (repeatable; `KEY = VALUE` in gin syntax, so strings need inner quotes:
`--gin.MODEL_DIR="'/tmp/run'"`), `--gin_bindings='KEY = VALUE'` and `--gin_search_path`. Files are
parsed in order, then the bindings, then the config is finalised.

Multi-host: give jax.distributed.initialize's own settings, `--coordinator_address`,
`--num_processes`, `--process_id` (or `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`), or `--distributed=on` on a cluster JAX detects by itself (TPU pods, SLURM, Open
MPI). Every host runs the same command; each reads its own shard of the data.

Exit codes: 0 done; 1 a runtime error (a NaN/inf loss, an unreadable checkpoint, a full disk, a
write refused by the system), reported in a line or two that name the path or value at fault; 2 a
usage error (an unknown flag, gin macro or parameter, a gin syntax error, a missing required
setting, an unusable MODEL_DIR or --output, a setting the trainer refuses), reported by the message
alone; the command line and the config are checked before any work starts, so such a run writes
nothing to MODEL_DIR; 130 stopped by Ctrl-C; 143 stopped by SIGTERM after writing a checkpoint (run
the same command again to resume). `--debug` (or HASHMOE_DEBUG=1) adds the Python traceback to an
error and lets TensorFlow/CUDA print their start-up lines, which are silenced otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from hashmoe import gin_utils
# The command line's own errors and the gin entry points other modules call through the CLI.
from hashmoe.gin_utils import UsageError, configs_dir, parse_gin  # noqa: F401

# `hashmoe prepare`'s defaults (hashmoe.data.preparation's, without importing it at start-up).
_PREPARED_SPLITS = ("train", "validation", "test")
_PREPARED_SHARDS = 8

EXIT_ERROR = 1  # a runtime failure
EXIT_USAGE = 2  # a command line or config to change (argparse's own code for a bad command line)
EXIT_INTERRUPTED = 130  # 128 + SIGINT
DEBUG_ENV = "HASHMOE_DEBUG"

# Macros the runs/ configs define; build-hash reads the model and task from them (it writes no run:
# `gin_utils.check_config` binds the run files' required settings it cannot reach, MODEL_DIR, to None).
_BUILD_HASH_BINDINGS = """
hashmoe.train.hash_table_inputs.model_config = %MODEL_CONFIG
hashmoe.train.hash_table_inputs.task = %TASK
hashmoe.train.hash_table_inputs.seq_len = %SEQ_LEN
hashmoe.train.hash_table_inputs.batch_size = %BATCH_SIZE
"""

# What prepare reads of a run config: TASK, SEQ_LEN and PREPARED_DIR (a config without the last,
# such as one that predates it, prepares under the default root).
_PREPARE_BINDINGS = """
hashmoe.data.preparation.prepare_inputs.task = %TASK
hashmoe.data.preparation.prepare_inputs.seq_len = %SEQ_LEN
"""
_PREPARE_ROOT_BINDING = "hashmoe.data.preparation.prepare_inputs.root = %PREPARED_DIR\n"

# The configurable each command calls: its gin.REQUIRED parameters must be bound before it starts.
_ENTRY_POINTS = {"train": "hashmoe.train.train", "eval": "hashmoe.train.evaluate",
                 "build-hash": "hashmoe.train.hash_table_inputs",
                 "prepare": "hashmoe.data.preparation.prepare_inputs"}
# What to give when a command has no config at all.
_CONFIG_EXAMPLES = {
    "train": "--gin_file=configs/runs/cpu_tiny.gin --gin.MODEL_DIR=\"'/tmp/tiny'\" (a run config "
             "from configs/runs/, then optional model and task files from configs/models/, "
             "configs/tasks/)",
    "eval": "--gin_file=configs/runs/eval.gin --gin_file=configs/models/tiny/hash_16.gin "
            "--gin_file=configs/tasks/embedded_lm.gin --gin.MODEL_DIR=\"'/tmp/tiny'\" (the eval "
            "run config, then the model and task files the run was trained with)",
    "build-hash": "--gin_file=configs/runs/cpu_tiny.gin (the run config, model and task files "
                  "of the run the table is for)",
    "prepare": "--gin_file=configs/runs/cpu_tiny.gin (the run config and task files of the runs "
               "that will train on the data)",
}


def _check_command_config(command: str) -> None:
  """Refuses a config that leaves what `command` calls unbound (`gin_utils.check_config`)."""
  gin_utils.check_config(_ENTRY_POINTS[command], _CONFIG_EXAMPLES[command],
                         unreachable_to_none=command in ("build-hash", "prepare"))


def _split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Pulls t5x-style `--gin.KEY=VALUE` flags out of argv; returns (rest, bindings)."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      key, value = arg[len("--gin."):].split("=", 1)
      bindings.append(f"{key} = {value}")
    elif arg.startswith("--gin."):
      raise UsageError(f"{arg!r} has no value; write {arg}=VALUE (gin strings need inner quotes: "
                       f"{arg}=\"'text'\")")
    else:
      rest.append(arg)
  return rest, bindings


def _add_gin_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin config file (repeatable), a path or relative to configs/")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="a gin binding 'KEY = VALUE' (repeatable); --gin.KEY=VALUE also works")
  parser.add_argument("--gin_search_path", action="append", default=[],
                      help="extra folder for gin `include` statements (repeatable)")
  parser.add_argument(
      "--compilation_cache_dir", default=None,
      help="JAX's persistent compilation cache, so a restarted run skips recompiling (default: "
      "$JAX_COMPILATION_CACHE_DIR, else <hashmoe cache>/jax; 'none' disables it)")
  _add_debug_flag(parser)
  group = parser.add_argument_group("multi-host (jax.distributed.initialize)")
  group.add_argument("--coordinator_address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                     help="host:port of process 0's coordinator")
  group.add_argument("--num_processes", type=int,
                     default=_env_int("JAX_NUM_PROCESSES"), help="number of processes (hosts)")
  group.add_argument("--process_id", type=int, default=_env_int("JAX_PROCESS_ID"),
                     help="this process's index in [0, num_processes)")
  group.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                     help="auto: initialise when a coordinator or num_processes > 1 is given")


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--debug", action="store_true",
                      help=f"show the Python traceback of an error, and TensorFlow/CUDA's start-up "
                      f"lines (also ${DEBUG_ENV}=1)")


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def _build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="hashmoe", description="Hash Layers (Roller et al. 2021) in JAX: train, evaluate, "
      "build hash tables. Configure with gin (see configs/).")
  sub = parser.add_subparsers(dest="command", required=True)
  train = sub.add_parser("train", help="train (or resume) a model; see configs/runs/")
  _add_gin_flags(train)
  evaluate = sub.add_parser("eval",
                            help="perplexity of a trained checkpoint (configs/runs/eval.gin)")
  _add_gin_flags(evaluate)
  build = sub.add_parser(
      "build-hash", help="build a hash table from the task's training split (balanced) or a "
      "trained model's embeddings (clustered, dispersed) and write it for training to load; or, "
      "with --sentencepiece/--hf_tokenizer, a top-k (DeepSeek-V4 tid2eid) table from any text "
      "for MaxText / Megatron (.npy, safetensors, load report)")
  _add_gin_flags(build)
  build.add_argument("--kind", required=True,
                     help="random, balanced, clustered, dispersed, or one of the top-k kinds "
                     "balanced_topk, roundrobin_topk, random_topk, zeros_topk; with a tokenizer: "
                     "balanced, roundrobin, random or zeros (all top-k)")
  build.add_argument("--output", required=True,
                     help="the .npz to write (MultiHash: N files NAME.hash<m>of<N>.npz beside "
                     "it; train.hash_tables takes OUTPUT itself either way); with a tokenizer: "
                     "the .npy to write, with OUT.npz, OUT.<layout>.safetensors and "
                     "OUT.report.json beside it")
  build.add_argument("--seed", type=int, default=0, help="seed (random tables, k-means)")
  build.add_argument("--embeddings_from", default=None,
                     help="a trained run (MODEL_DIR or checkpoint) whose token embeddings "
                     "clustered/dispersed tables cluster")
  build.add_argument("--kmeans_iters", type=int, default=20)
  text = build.add_argument_group(
      "a top-k table from any text and tokenizer (no gin config; hashmoe.table_export)")
  text.add_argument("--sentencepiece", default=None, help="a SentencePiece .model file")
  text.add_argument("--hf_tokenizer", default=None,
                    help="a Hugging Face tokenizer.json (needs the hf extra: "
                    "pip install -e '.[hf]')")
  text.add_argument("--text", action="append", default=[],
                    help="a text file (plain, .gz, .xz, .zst, .bz2) or a folder of them "
                    "(repeatable)")
  text.add_argument("--text_glob", default="*",
                    help="file names to read inside --text folders (default: every file)")
  text.add_argument("--experts", type=int, default=None, help="number of routed experts E")
  text.add_argument("--k", type=int, default=None, help="experts per token (<= --experts)")
  text.add_argument("--vocab_size", type=int, default=None,
                    help="the model's (padded) vocabulary size, >= the tokenizer's (default: "
                    "the tokenizer's)")
  text.add_argument("--layers", type=int, default=3,
                    help="hash layers: one safetensors tensor each (default: %(default)s, "
                    "DeepSeek-V4's)")
  text.add_argument("--first_layer", type=int, default=0,
                    help="module index of the first hash layer (default: %(default)s)")
  text.add_argument("--layouts", default="maxtext,megatron_core,deepseek_v4",
                    help="safetensors files to write, by their tensor names (default: "
                    "%(default)s)")
  text.add_argument("--heldout_fraction", type=float, default=0.05,
                    help="share of the text (in blocks of 1000 lines) left out of the counts and "
                    "reported apart (default: %(default)s)")
  text.add_argument("--text_errors", choices=("strict", "replace"), default="strict",
                    help="bytes that are not UTF-8: stop (strict) or substitute U+FFFD")
  text.add_argument("--no_progress", action="store_true", help="no progress bar")
  prep = sub.add_parser(
      "prepare", help="tokenize, split and pack the run's task once into shards under "
      "PREPARED_DIR, which train then reads (fast, resumable in O(1) at any step)")
  _add_gin_flags(prep)
  prep.add_argument("--splits", default=",".join(_PREPARED_SPLITS),
                    help="comma-separated splits to prepare (default: %(default)s)")
  prep.add_argument("--num_shards", type=int, default=_PREPARED_SHARDS,
                    help="shards per split: the unit of parallelism, resumption and of hosts' "
                    "shares (default: %(default)s)")
  prep.add_argument("--shard_indices", default=None,
                    help="the shards this host prepares, e.g. 0,2,4 or 0-3 (default: all; with "
                    "several processes, every process-count-th from this process's index)")
  prep.add_argument("--workers", type=int, default=None,
                    help="worker processes (default: the CPU count, at most the shards to do)")
  prep.add_argument("--verify", action="store_true",
                    help="prepare nothing: check every shard's sha256 (and write the manifest "
                    "once hosts have prepared every shard)")
  prep.add_argument("--tfrecord", action="store_true",
                    help="also copy the rows to TFRecord files: the seqio task t5x reads with "
                    "DATA_SOURCE='prepared' and resumes exactly (with --verify: check the copies)")
  prep.add_argument("--no_progress", action="store_true", help="no progress bar")
  from hashmoe import compare  # pylint: disable=g-import-not-at-top
  comp = sub.add_parser(
      "compare", help="train dense, Switch and Hash models on the same data and compute, and "
      "report validation perplexity, speed and expert load (docs/RESULTS.md)")
  compare.add_arguments(comp)
  _add_debug_flag(comp)
  # compare configures itself from its own flags, never from gin or jax.distributed.
  comp.set_defaults(gin_file=[], gin_bindings=[], gin_search_path=[], distributed="off",
                    coordinator_address=None, num_processes=None, process_id=None,
                    compilation_cache_dir=None)
  return parser


def _maybe_initialize_distributed(args: argparse.Namespace) -> None:
  wanted = args.distributed == "on" or (args.distributed == "auto" and (
      args.coordinator_address or (args.num_processes or 1) > 1))
  if not wanted:
    return
  import jax  # pylint: disable=g-import-not-at-top
  # CPU devices of different processes exchange collectives over gloo (XLA:CPU has no other
  # cross-process transport); the setting only concerns the CPU backend, so it is harmless on
  # GPU/TPU hosts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=args.coordinator_address,
                             num_processes=args.num_processes, process_id=args.process_id)
  logging.getLogger(__name__).info("jax.distributed: process %d of %d", jax.process_index(),
                                   jax.process_count())


def _set_compilation_cache(directory: Optional[str]) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if directory is None:
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if directory is None:
    from hashmoe.data.embedded import default_cache_dir  # pylint: disable=g-import-not-at-top
    directory = str(default_cache_dir() / "jax")
  if directory.lower() in ("", "none"):
    return
  jax.config.update("jax_compilation_cache_dir", directory)


# --------------------------------------------------------------------------------------------------
# Start-up noise. TensorFlow (under seqio) writes its native log lines straight to file
# descriptor 2 before it reads TF_CPP_MIN_LOG_LEVEL ("All log messages before
# absl::InitializeLog() ...", "Could not find cuda drivers", and "failed call to cuInit" when its
# CUDA probe finds no GPU); only a redirection of the descriptor itself keeps them off the terminal.


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
  """Sends what native code writes to stderr into a scratch file, replayed if the block raises
  (it may then explain the failure)."""
  try:
    saved = os.dup(2)
  except OSError:  # No stderr to protect.
    yield
    return
  with tempfile.TemporaryFile() as sink:
    sys.stderr.flush()
    os.dup2(sink.fileno(), 2)
    failed = False
    try:
      yield
    except BaseException:
      failed = True
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if failed:
        sink.seek(0)
        sys.stderr.write(sink.read().decode(errors="replace"))


def _import_trainer(debug: bool) -> Any:
  """Imports the trainer (TensorFlow, JAX, orbax) and keeps TensorFlow off the GPUs, which is the
  CUDA probe behind "failed call to cuInit"; without --debug, silently."""
  with contextlib.nullcontext() if debug else _native_stderr_silenced():
    # pylint: disable=g-import-not-at-top
    from hashmoe import train as train_lib
    from hashmoe.data import pipeline
    pipeline.keep_tensorflow_off_accelerators()
  return train_lib


# --------------------------------------------------------------------------------------------------
# Checks before any work, and errors after.


def _check_writable_dir(path: Path, what: str) -> None:
  """Refuses a directory that cannot be created or written, before anything is written."""
  if path.exists() and not path.is_dir():
    raise UsageError(f"{what} {path} is a file, not a directory: give a directory (a new one, or "
                     "an earlier run's to resume it)")
  existing = path
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise UsageError(f"{what} {path} cannot be created: {existing} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UsageError(f"{what} {path} is not writable: permission denied on {existing}; choose a "
                     "writable place or change the folder's permissions")


def _is_local(path: Any) -> bool:
  return isinstance(path, (str, os.PathLike)) and "://" not in os.fspath(path)


def _check_output(output: str) -> None:
  path = Path(output)
  if path.is_dir():
    raise UsageError(f"--output {output} is a directory; give the file to write, e.g. "
                     f"--output={path / 'balanced.npz'}")
  _check_writable_dir(path.absolute().parent, "the folder of --output")


def _exception_chain(e: BaseException) -> Iterator[BaseException]:
  """`e` and the exceptions it wraps (__cause__, __context__), e.g. an OSError under orbax's or
  TensorFlow's own error types."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _describe(e: BaseException, command: str, model_dir: Any) -> tuple[int, str]:
  """(exit code, one or two lines) for an error that ended `command`."""
  inner = gin_utils.innermost(e)
  # Imported with the trainer; a command that failed before importing it raised none of them.
  errors = sys.modules.get("hashmoe.training.errors")
  usage = (UsageError,) + ((errors.ConfigError,) if errors is not None else ())
  if isinstance(inner, usage):
    return EXIT_USAGE, str(inner)
  found = re.match(r"Required bindings for `(\w+)` not provided in config: \[(.*)\]", str(inner))
  if isinstance(inner, RuntimeError) and found:
    name, params = found.group(1), found.group(2).replace("'", "")
    return EXIT_USAGE, (f"the config does not bind {name}'s {params}: bind them (e.g. "
                        f"--gin.{name}.{params.split(',')[0]}=VALUE) or give the config file that "
                        "does")
  chain = list(_exception_chain(e))
  paths = [p for x in chain if isinstance(x, OSError) for p in (x.filename, x.filename2) if p]
  folder = "PREPARED_DIR" if command == "prepare" else "MODEL_DIR"
  where = paths[0] if paths else (f"under {folder} {model_dir}" if model_dir else None)
  if any((isinstance(x, OSError) and x.errno == errno.ENOSPC) or
         "No space left on device" in str(x) for x in chain):
    again = {"train": " and run the same command again: training resumes from the last checkpoint",
             "prepare": " and run the same command again: the finished shards are kept"
             }.get(command, " and run the command again")
    return EXIT_ERROR, (f"no space left on device{' while writing ' + str(where) if where else ''}"
                        f"; free some space (or point {folder} elsewhere){again}")
  oserror = next((x for x in chain if isinstance(x, OSError) and x.strerror), None)
  if oserror is not None:
    path = oserror.filename or where
    reason = oserror.strerror[0].lower() + oserror.strerror[1:]
    hint = ("; choose a writable place or change its permissions"
            if oserror.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "")
    return EXIT_ERROR, f"{reason}: {path}{hint}" if path else f"{reason}{hint}"
  known = ((errors.LossDivergedError, errors.CheckpointError, errors.PreparedDataError)
           if errors is not None else ())
  message = str(inner).strip()
  if isinstance(inner, known):
    return EXIT_ERROR, message
  return EXIT_ERROR, (f"{type(inner).__name__}: {message}\n"
                      f"  (--debug or {DEBUG_ENV}=1 shows the traceback)")


class _Context:
  """What an error message may need that only the run knows."""
  command = "?"
  model_dir: Any = None


def _shard_indices(text: Optional[str], num_shards: int) -> Optional[list[int]]:
  """--shard_indices ('0,2,4', '0-3', '1,4-6') as a list; None (all, or this process's share)
  when not given."""
  if text is None:
    return None
  indices = []
  for part in text.split(","):
    found = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
    if not found:
      raise UsageError(f"--shard_indices={text!r}: {part!r} is not a shard index or a range "
                       "such as 0-3")
    first, last = int(found.group(1)), int(found.group(2) or found.group(1))
    indices += range(first, last + 1)
  bad = sorted({i for i in indices if i >= num_shards})
  if bad or not indices or len(set(indices)) != len(indices):
    raise UsageError(f"--shard_indices={text!r}: expected distinct shards in [0, {num_shards})"
                     f"{f'; {bad} are not' if bad else ''}")
  return indices


def _prepare(args: argparse.Namespace, context: _Context) -> int:
  """`hashmoe prepare`: the run's task at SEQ_LEN into its prepared folder (or --verify it)."""
  import jax  # pylint: disable=g-import-not-at-top  Loaded with the trainer.
  from hashmoe.data import preparation, prepared_tf  # pylint: disable=g-import-not-at-top
  task, seq_len, directory = preparation.prepare_inputs()
  context.model_dir = directory
  if _is_local(directory):
    _check_writable_dir(Path(directory).absolute(), "the prepared folder")
  flag = f"--gin.PREPARED_DIR=\"'{directory.parent.parent}'\""
  if args.verify:
    manifest = preparation.verify(directory)
    copies = prepared_tf.verify_tfrecords(directory) if args.tfrecord else None
    print(json.dumps({"directory": os.fspath(directory), "task": task, "seq_len": seq_len,
                      "verified": True, "manifest": manifest.fingerprint,
                      "splits": {s: {k: manifest.split(s)[k] for k in ("rows", "tokens")}
                                 for s in manifest.splits},
                      **({"tfrecord": copies.fingerprint} if copies else {})}))
    return 0
  if args.num_shards < 1:
    raise UsageError(f"--num_shards={args.num_shards}; expected >= 1")
  splits = [s.strip() for s in args.splits.split(",") if s.strip()]
  if not splits:
    raise UsageError(f"--splits={args.splits!r} names no split; e.g. --splits=train,validation")
  indices = _shard_indices(args.shard_indices, args.num_shards)
  if indices is None and jax.process_count() > 1:
    # Every host runs the same command (as for train); each prepares its own shards.
    indices = list(range(jax.process_index(), args.num_shards, jax.process_count()))
  todo = args.num_shards if indices is None else len(indices)
  workers = args.workers if args.workers is not None else min(os.cpu_count() or 1, todo)
  if workers < 1:
    raise UsageError(f"--workers={workers}; expected >= 1")
  result = preparation.prepare(task, directory, seq_len=seq_len, splits=splits,
                            num_shards=args.num_shards, shard_indices=indices,
                            workers=max(1, min(workers, todo)), progress=not args.no_progress)
  print(json.dumps({"directory": result.directory, "task": task, "seq_len": seq_len,
                    "complete": result.manifest is not None,
                    "manifest": result.manifest and result.manifest["fingerprint"],
                    "prepared": len(result.prepared), "kept": len(result.kept),
                    "redone": len(result.redone), "missing": len(result.missing),
                    "rows": result.rows, "tokens": result.tokens,
                    "seconds": round(result.seconds, 3),
                    "tokens_per_s": round(result.tokens_per_s, 1), "gin_flag": flag,
                    **({"tfrecord": prepared_tf.copy_after_prepare(
                        result.directory, task, seq_len, complete=result.manifest is not None,
                        shard_indices=indices)} if args.tfrecord else {})}))
  return 0


def _build_hash_from_text(args: argparse.Namespace) -> int:
  """`hashmoe build-hash --sentencepiece/--hf_tokenizer`: a top-k table from text, for other
  frameworks (`hashmoe.table_export.build_from_text`)."""
  if args.sentencepiece and args.hf_tokenizer:
    raise UsageError("give one tokenizer: --sentencepiece or --hf_tokenizer, not both")
  missing = [f"--{n}" for n in ("text", "experts", "k") if not getattr(args, n)]
  if missing:
    raise UsageError(f"a table from text needs {', '.join(missing)}, e.g. --text corpus/ "
                     "--experts 256 --k 6")
  if args.experts < 1 or not 1 <= args.k <= args.experts:
    raise UsageError(f"--k={args.k} with --experts={args.experts}: each token takes k distinct "
                     "experts, so 1 <= k <= experts")
  if not 0 <= args.heldout_fraction < 1:
    raise UsageError(f"--heldout_fraction={args.heldout_fraction}; expected a fraction in [0, 1)")
  from hashmoe import table_export  # pylint: disable=g-import-not-at-top
  layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
  unknown = [x for x in layouts if x not in table_export.LAYOUTS]
  if unknown:
    raise UsageError(f"--layouts: unknown {unknown}; choose from {sorted(table_export.LAYOUTS)}")
  if Path(args.output).suffix != ".npy":
    raise UsageError(f"--output {args.output}: give the .npy to write, e.g. --output=tid2eid.npy "
                     "(the safetensors, .npz and report are written beside it)")
  _check_writable_dir(Path(args.output).absolute().parent, "the folder of --output")
  try:
    result = table_export.build_from_text(
        kind=args.kind, num_experts=args.experts, k=args.k, texts=args.text,
        output=args.output, sentencepiece=args.sentencepiece, hf_tokenizer=args.hf_tokenizer,
        vocab_size=args.vocab_size, num_layers=args.layers, first_layer=args.first_layer,
        layouts=layouts, heldout_fraction=args.heldout_fraction, seed=args.seed,
        pattern=args.text_glob, errors=args.text_errors, progress=not args.no_progress)
  except ImportError as e:
    raise UsageError(str(e)) from e
  except ValueError as e:
    # A tokenizer that does not parse, an empty corpus, a bad size: the input's to fix.
    raise UsageError(str(e)) from e
  load = result.report["load"]
  print(json.dumps({"files": result.paths, "kind": result.table.kind,
                    "shape": list(result.table.table.shape),
                    "max_over_mean": {part: v and round(v["max_over_mean"], 4)
                                      for part, v in load.items()},
                    "gin_flag": f"--gin.train.hash_tables=\"'{result.paths['npz']}'\""}))
  return 0


# glibc malloc settings `hashmoe compare` runs under (`_malloc_env`).
MALLOC_SETTINGS = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                   "MALLOC_TRIM_THRESHOLD_": str(4 << 30), "MALLOC_TOP_PAD_": str(64 << 20)}


def _malloc_env() -> Optional[dict[str, str]]:
  """The environment to restart `hashmoe compare` in so that glibc reuses the step buffers' pages,
  or None (already set, switched off by HASHMOE_MALLOC_TUNING=0, or not Linux).

  Each XLA:CPU step frees and reallocates the same buffers; with glibc's defaults (an arena per
  thread, each trimming its heap, and fresh mmaps for big blocks) they are faulted in again every
  step: ~28,000 page faults per step, system time a third of the comparison's CPU time. One
  arena, no mmapped blocks and a high trim threshold keep them mapped. glibc reads the arena count
  at start-up only (it is fixed once a second thread allocates), hence the restart; worker
  processes (`--jobs`) inherit it. Numbers are unchanged: allocation placement only. Measured in
  docs/PERFORMANCE.md, "The main job"."""
  from hashmoe.compare.cli import MALLOC_ENV  # pylint: disable=g-import-not-at-top
  if (not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ or
      os.environ.get(MALLOC_ENV, "1").strip().lower() in ("0", "false", "no", "off")):
    return None
  return {**os.environ, **MALLOC_SETTINGS}


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of the `hashmoe` console script; returns the exit code."""
  from_command_line = argv is None
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
  context = _Context()
  context.command = next((a for a in argv if not a.startswith("-")), "?")
  if from_command_line and context.command == "compare":
    env = _malloc_env()
    if env is not None:
      sys.stdout.flush()
      sys.stderr.flush()
      os.execve(sys.executable, [sys.executable, "-m", "hashmoe.cli", *argv], env)
  try:
    return _run(argv, debug, context)
  except SystemExit as e:  # argparse, which printed its message already.
    return e.code if isinstance(e.code, int) else EXIT_USAGE
  except KeyboardInterrupt:
    print(f"hashmoe {context.command}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED
  except Exception as e:  # pylint: disable=broad-except
    code, message = _describe(e, context.command, context.model_dir)
    if debug:
      traceback.print_exception(e)
    print(f"hashmoe {context.command}: error: {message}", file=sys.stderr)
    return code


def _run(argv: list[str], debug: bool, context: _Context) -> int:
  rest, flag_bindings = _split_gin_flags(argv)
  args = _build_parser().parse_args(rest)
  context.command = args.command
  if not debug:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if not debug:
    # JAX's guesses about accelerators it did not find ("An NVIDIA GPU may be present on this
    # machine, but a CUDA-enabled jaxlib is not installed").
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
  if args.command != "compare" or args.list:
    return _run_parsed(args, argv, flag_bindings, debug, context)
  # `hashmoe compare`'s worker processes start first thing, before this process imports JAX or
  # the trainer: their imports overlap with its own (`parallel.prestart`).
  from hashmoe.compare import parallel  # pylint: disable=g-import-not-at-top  No JAX, no TF.
  parallel.prestart(args.jobs)
  try:
    return _run_parsed(args, argv, flag_bindings, debug, context)
  finally:
    parallel.release_prestarted()


def _run_parsed(args: argparse.Namespace, argv: list[str], flag_bindings: list[str], debug: bool,
                context: _Context) -> int:
  bindings = list(args.gin_bindings) + flag_bindings
  origins = ([f"--gin_bindings={b!r}" for b in args.gin_bindings] +
             [a for a in argv if a.startswith("--gin.")])
  if args.command == "build-hash" and (args.sentencepiece or args.hf_tokenizer):
    if args.gin_file or bindings:
      raise UsageError("build-hash takes either a run's gin config (a table for a hashmoe task) "
                       "or a tokenizer (--sentencepiece/--hf_tokenizer with --text), not both")
    return _build_hash_from_text(args)
  if args.command == "build-hash":
    given = [f"--{n}" for n in ("text", "experts", "k", "vocab_size") if getattr(args, n)]
    if given:
      raise UsageError(f"{', '.join(given)} go with a tokenizer: add --sentencepiece MODEL or "
                       "--hf_tokenizer tokenizer.json (or drop them and give a run's gin config)")
  if args.command != "compare" and not args.gin_file and not any(
      "include" in b for b in bindings):
    raise UsageError(f"no config given: hashmoe {args.command} needs gin files, e.g. "
                     f"{_CONFIG_EXAMPLES[args.command]}")
  if args.command == "build-hash":
    _check_output(args.output)
  _maybe_initialize_distributed(args)
  _set_compilation_cache(args.compilation_cache_dir)
  if args.command == "compare":
    if not args.list:
      _import_trainer(debug)
    from hashmoe import compare  # pylint: disable=g-import-not-at-top
    return compare.run(args)
  train_lib = _import_trainer(debug)
  import gin  # pylint: disable=g-import-not-at-top
  extra = {"build-hash": _BUILD_HASH_BINDINGS,
           "prepare": _PREPARE_BINDINGS + _PREPARE_ROOT_BINDING}.get(args.command, "")
  parse_gin(args.gin_file, bindings, args.gin_search_path, finalize=False, origins=origins,
            extra=extra)
  _check_command_config(args.command)
  gin.finalize()
  if args.command == "prepare":
    return _prepare(args, context)
  if args.command == "train":
    model_dir = gin_utils.bound_value(_ENTRY_POINTS["train"], "model_dir")
    if _is_local(model_dir):
      context.model_dir = model_dir
      _check_writable_dir(Path(model_dir).absolute(), "MODEL_DIR")
    result = train_lib.train()
    summary = {"step": result.step, "start_step": result.start_step,
               "preempted": result.preempted, "model_dir": result.model_dir,
               "train": result.last_train and {k: v for k, v in result.last_train.items()
                                               if k != "moe"},
               "eval": result.last_eval}
    print(json.dumps(summary))
    return result.exit_code
  if args.command == "eval":
    print(json.dumps(train_lib.evaluate()))
    return 0
  if args.command == "build-hash":
    from hashmoe import tables  # pylint: disable=g-import-not-at-top  Loaded with the trainer.
    paths = tables.build_hash_files(
        kind=args.kind, output=args.output, seed=args.seed,
        embeddings_from=args.embeddings_from, kmeans_iters=args.kmeans_iters)
    # One path names a MultiHash set too (the files are found by `stats.hash_table_paths`).
    flag = f"--gin.train.hash_tables=\"'{args.output}'\""
    print(json.dumps({"files": paths, "gin_flag": flag}))
    return 0
  raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
  sys.exit(main())
