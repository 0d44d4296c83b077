"""The `hashmoe` command: train, evaluate, and build hash tables, all configured with gin.

    hashmoe train --gin_file=configs/runs/cpu_tiny.gin --gin.MODEL_DIR="'/tmp/tiny'" \
                  --gin.TRAIN_STEPS=200
    hashmoe eval  --gin_file=configs/runs/eval.gin --gin_file=... --gin.MODEL_DIR="'/tmp/tiny'"
    hashmoe build-hash --gin_file=configs/runs/cpu_tiny.gin --kind=balanced \
                  --output=/tmp/tables/balanced.npz
    hashmoe compare [--quick] [--models dense,switch,hash] [--text-dir DIR] [--out DIR]

Flags follow t5x: `--gin_file` (repeatable; a path, or one relative to the `configs/` folder),
`--gin.KEY=VALUE` (repeatable; `KEY = VALUE` in gin syntax, so strings need inner quotes:
`--gin.MODEL_DIR="'/tmp/run'"`), `--gin_bindings='KEY = VALUE'` and `--gin_search_path`. Files are
parsed in order, then the bindings, then the config is finalised.

Multi-host: give jax.distributed.initialize's own settings, `--coordinator_address`,
`--num_processes`, `--process_id` (or `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`), or `--distributed=on` on a cluster JAX detects by itself (TPU pods, SLURM, Open
MPI). Every host runs the same command; each reads its own shard of the data.

Exit codes: 0 done, 1 error (a NaN/inf loss, an unreadable checkpoint, a bad config), 143 stopped by
SIGTERM after writing a checkpoint (run the same command again to resume).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

# TensorFlow (under seqio) prints its C++ INFO/WARNING lines on import unless told otherwise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM.
CONFIGS_ENV = "HASHMOE_CONFIGS"

# Macros the runs/ configs define; build-hash reads the model and task from them.
_BUILD_HASH_BINDINGS = """
hashmoe.train.hash_table_inputs.model_config = %MODEL_CONFIG
hashmoe.train.hash_table_inputs.task = %TASK
hashmoe.train.hash_table_inputs.seq_len = %SEQ_LEN
hashmoe.train.hash_table_inputs.batch_size = %BATCH_SIZE
"""


def configs_dir() -> Optional[Path]:
  """The gin configs folder: `$HASHMOE_CONFIGS`, else `configs/` beside the package (a source
  checkout), else None."""
  env = os.environ.get(CONFIGS_ENV)
  if env:
    return Path(env)
  candidate = Path(__file__).resolve().parent.parent / "configs"
  return candidate if candidate.is_dir() else None


def _resolve_gin_file(name: str, search_paths: Sequence[Path]) -> str:
  path = Path(name)
  if path.is_file():
    return str(path)
  for root in search_paths:
    if (root / name).is_file():
      return str(root / name)
  raise FileNotFoundError(f"gin file {name!r} not found as given nor under the search paths "
                          f"{[str(p) for p in search_paths]}")


class _GinSearchNoise(logging.Filter):
  """gin logs every search-path miss of an `include` as an ERROR ("Path not found") before it tries
  the next path; only a failed include matters, and gin raises for that."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = str(record.msg)
    return not (message.startswith("Path not found") or
                message.startswith("system_path_file_exists"))


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = (), extra: str = "", finalize: bool = True) -> None:
  """Parses gin files then bindings (in order), with `configs/` and each file's folder on the
  include search path."""
  import gin  # pylint: disable=g-import-not-at-top
  from hashmoe import train as _  # noqa: F401  Registers the configurables.
  roots = [Path(p) for p in search_paths]
  default = configs_dir()
  if default is not None:
    roots.append(default)
  gin.clear_config()
  for root in roots:
    gin.add_config_file_search_path(str(root))
  files = [_resolve_gin_file(f, roots) for f in gin_files]
  for f in files:
    gin.add_config_file_search_path(str(Path(f).resolve().parent))
  noise = _GinSearchNoise()
  root_logger = logging.getLogger()
  root_logger.addFilter(noise)
  try:
    gin.parse_config_files_and_bindings(files, list(bindings) + ([extra] if extra else []),
                                        finalize_config=False)
  finally:
    root_logger.removeFilter(noise)
  if finalize:
    gin.finalize()


def _split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Pulls t5x-style `--gin.KEY=VALUE` flags out of argv; returns (rest, bindings)."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      key, value = arg[len("--gin."):].split("=", 1)
      bindings.append(f"{key} = {value}")
    elif arg.startswith("--gin."):
      raise SystemExit(f"error: {arg!r} has no value; write --gin.KEY=VALUE")
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
  group = parser.add_argument_group("multi-host (jax.distributed.initialize)")
  group.add_argument("--coordinator_address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                     help="host:port of process 0's coordinator")
  group.add_argument("--num_processes", type=int,
                     default=_env_int("JAX_NUM_PROCESSES"), help="number of processes (hosts)")
  group.add_argument("--process_id", type=int, default=_env_int("JAX_PROCESS_ID"),
                     help="this process's index in [0, num_processes)")
  group.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                     help="auto: initialise when a coordinator or num_processes > 1 is given")


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
      "trained model's embeddings (clustered, dispersed) and write it for training to load")
  _add_gin_flags(build)
  build.add_argument("--kind", required=True,
                     help="random, balanced, clustered, dispersed, or balanced_topk")
  build.add_argument("--output", required=True,
                     help="the .npz to write (MultiHash: N files NAME.hash<m>of<N>.npz beside "
                     "it; train.hash_tables takes OUTPUT itself either way)")
  build.add_argument("--seed", type=int, default=0, help="seed (random tables, k-means)")
  build.add_argument("--embeddings_from", default=None,
                     help="a trained run (MODEL_DIR or checkpoint) whose token embeddings "
                     "clustered/dispersed tables cluster")
  build.add_argument("--kmeans_iters", type=int, default=20)
  from hashmoe import compare  # pylint: disable=g-import-not-at-top
  comp = sub.add_parser(
      "compare", help="train dense, Switch and Hash models on the same data and compute, and "
      "report validation perplexity, speed and expert load (docs/RESULTS.md)")
  compare.add_arguments(comp)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of the `hashmoe` console script; returns the exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, gin_bindings = _split_gin_flags(argv)
  args = _build_parser().parse_args(rest)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  _maybe_initialize_distributed(args)
  _set_compilation_cache(args.compilation_cache_dir)
  bindings = list(args.gin_bindings) + gin_bindings

  if args.command == "compare":
    from hashmoe import compare  # pylint: disable=g-import-not-at-top
    return compare.run(args)
  from hashmoe import train as train_lib  # pylint: disable=g-import-not-at-top
  try:
    if args.command == "train":
      parse_gin(args.gin_file, bindings, args.gin_search_path)
      result = train_lib.train()
      summary = {"step": result.step, "start_step": result.start_step,
                 "preempted": result.preempted, "model_dir": result.model_dir,
                 "train": result.last_train and {k: v for k, v in result.last_train.items()
                                                 if k != "moe"},
                 "eval": result.last_eval}
      print(json.dumps(summary))
      return result.exit_code  # 0, or 143 / 130 after a checkpoint on SIGTERM / Ctrl-C
    if args.command == "eval":
      parse_gin(args.gin_file, bindings, args.gin_search_path)
      print(json.dumps(train_lib.evaluate()))
      return 0
    if args.command == "build-hash":
      parse_gin(args.gin_file, bindings, args.gin_search_path, extra=_BUILD_HASH_BINDINGS)
      paths = train_lib.build_hash_files(
          kind=args.kind, output=args.output, seed=args.seed,
          embeddings_from=args.embeddings_from, kmeans_iters=args.kmeans_iters)
      # One path names a MultiHash set too (the files are found by `stats.hash_table_paths`).
      flag = f"--gin.train.hash_tables=\"'{args.output}'\""
      print(json.dumps({"files": paths, "gin_flag": flag}))
      return 0
  except (train_lib.NonFiniteLossError, train_lib.CheckpointError, ValueError, TypeError,
          FileNotFoundError) as e:
    logging.getLogger(__name__).debug("hashmoe %s failed", args.command, exc_info=True)
    print(f"hashmoe {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
  sys.exit(main())
