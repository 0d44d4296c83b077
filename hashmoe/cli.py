"""The `hashmoe` command: train, evaluate, and build hash tables, all configured with gin.

    hashmoe train --gin_file=configs/runs/cpu_tiny.gin --gin.MODEL_DIR="'/tmp/tiny'" \
                  --gin.TRAIN_STEPS=200
    hashmoe eval  --gin_file=configs/runs/cpu_tiny.gin --gin_file=configs/runs/eval.gin \
                  --gin.MODEL_DIR="'/tmp/tiny'" --gin.SEQ_LEN=64 --gin.BATCH_SIZE=8 \
                  --gin.EVAL_BATCHES=4
    hashmoe build-hash --gin_file=configs/runs/cpu_tiny.gin --kind=balanced \
                  --output=/tmp/tables/balanced.npz
    hashmoe compare --quick --models dense,hash --out /tmp/compare_quick

(`eval` after the run's gin files: eval.gin's own BATCH_SIZE/SEQ_LEN/EVAL_BATCHES replace the run's,
so repeat the run's to reproduce its evaluation; `build-hash` needs no MODEL_DIR; `compare` takes
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
import difflib
import errno
import inspect
import json
import logging
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

EXIT_ERROR = 1  # a runtime failure
EXIT_USAGE = 2  # a command line or config to change (argparse's own code for a bad command line)
EXIT_INTERRUPTED = 130  # 128 + SIGINT
CONFIGS_ENV = "HASHMOE_CONFIGS"
DEBUG_ENV = "HASHMOE_DEBUG"

# Macros the runs/ configs define; build-hash reads the model and task from them (it writes no run:
# `_check_config` binds the run files' required settings it cannot reach, MODEL_DIR, to None).
_BUILD_HASH_BINDINGS = """
hashmoe.train.hash_table_inputs.model_config = %MODEL_CONFIG
hashmoe.train.hash_table_inputs.task = %TASK
hashmoe.train.hash_table_inputs.seq_len = %SEQ_LEN
hashmoe.train.hash_table_inputs.batch_size = %BATCH_SIZE
"""

# The configurable each command calls: its gin.REQUIRED parameters must be bound before it starts.
_ENTRY_POINTS = {"train": "hashmoe.train.train", "eval": "hashmoe.train.evaluate",
                 "build-hash": "hashmoe.train.hash_table_inputs"}
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
}
# What a gin value can be, for the message when one cannot be parsed.
_GIN_VALUES = "a number, a 'quoted string', True/False/None, a [list], @configurable() or %MACRO"


class UsageError(Exception):
  """A command line or config the user must change: the CLI prints the message alone, exit 2."""


def configs_dir() -> Optional[Path]:
  """The gin configs folder: `$HASHMOE_CONFIGS`, else `configs/` beside the package (a source
  checkout), else None."""
  env = os.environ.get(CONFIGS_ENV)
  if env:
    return Path(env)
  candidate = Path(__file__).resolve().parent.parent / "configs"
  return candidate if candidate.is_dir() else None


def _did_you_mean(name: str, candidates: Sequence[str]) -> str:
  close = difflib.get_close_matches(name, sorted(set(candidates)), n=1)
  return f" (did you mean {close[0]}?)" if close else ""


def _gin_files_under(roots: Sequence[Path]) -> list[str]:
  """The .gin files under `roots`, relative to their root (candidates for a misspelt name)."""
  names = []
  for root in roots:
    if root.is_dir():
      names += [str(p.relative_to(root)) for p in root.rglob("*.gin")]
  return names


def _resolve_gin_file(name: str, search_paths: Sequence[Path]) -> str:
  path = Path(name)
  if path.is_file():
    return str(path)
  for root in search_paths:
    if (root / name).is_file():
      return str(root / name)
  # 'configs/runs/x.gin', as the docs write it from a checkout, also works from any other folder.
  default = configs_dir()
  if default is not None and path.parts[:1] == (default.name,) and (default.joinpath(
      *path.parts[1:])).is_file():
    return str(default.joinpath(*path.parts[1:]))
  roots = [p for p in search_paths if p.is_dir()]
  raise UsageError(f"gin file {name!r} not found as given nor under the search paths "
                   f"{[str(p) for p in search_paths]}"
                   f"{_did_you_mean(name, _gin_files_under(roots) + _configs_prefixed(roots))}")


def _configs_prefixed(roots: Sequence[Path]) -> list[str]:
  """configs/-relative names as a user types them from a checkout ('configs/runs/x.gin')."""
  default = configs_dir()
  if default is None or default not in roots:
    return []
  return [f"{default.name}/{name}" for name in _gin_files_under([default])]


class _GinSearchNoise(logging.Filter):
  """gin logs every search-path miss of an `include` as an ERROR ("Path not found") before it tries
  the next path; only a failed include matters, and gin raises for that."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = str(record.msg)
    return not (message.startswith("Path not found") or
                message.startswith("system_path_file_exists"))


# --------------------------------------------------------------------------------------------------
# gin's view of the config. gin has no public API for which macros are read or which bindings are
# still %gin.REQUIRED; these read its parsed config (`gin.config._CONFIG`: {(scope, selector):
# {parameter: value}}, a macro `NAME = v` being {(NAME, 'gin.macro'): {'value': v}}).


def _gin_config() -> dict:
  import gin  # pylint: disable=g-import-not-at-top
  return gin.config._CONFIG  # pylint: disable=protected-access


def _is_reference(value: Any) -> bool:
  import gin  # pylint: disable=g-import-not-at-top
  return isinstance(value, gin.config.ConfigurableReference)


def _is_macro(ref: Any) -> bool:
  import gin  # pylint: disable=g-import-not-at-top
  return _is_reference(ref) and ref.configurable.wrapped is gin.config.macro


def _is_required(value: Any) -> bool:
  import gin  # pylint: disable=g-import-not-at-top
  constant = gin.config._retrieve_constant  # pylint: disable=protected-access
  return (_is_reference(value) and value.configurable.wrapped is constant and
          value.scoped_configurable_fn() is gin.REQUIRED)


def _references(value: Any) -> Iterator[Any]:
  import gin  # pylint: disable=g-import-not-at-top
  return gin.config.iterate_references(value)


def _read_macros() -> set[str]:
  """Names of the macros some binding reads (`%NAME`)."""
  return {ref.config_key[0] for ref in _references(_gin_config()) if _is_macro(ref)}


def _follow_macros(value: Any) -> Any:
  """The value behind a chain of `%MACRO` references (`_UNSET` if one is not defined)."""
  seen = set()
  while _is_macro(value) and value.config_key not in seen:
    seen.add(value.config_key)
    value = _gin_config().get(value.config_key, {}).get("value", _UNSET)
  return value


_UNSET = object()


def _bound_value(selector: str, param: str) -> Any:
  """What `selector.param` is bound to (macros followed), or `_UNSET`."""
  return _follow_macros(_gin_config().get(("", selector), {}).get(param, _UNSET))


def _configurable(name: str) -> Any:
  import gin  # pylint: disable=g-import-not-at-top
  try:
    return gin.config._REGISTRY.get_match(name)  # pylint: disable=protected-access
  except ValueError:  # ambiguous
    return None


def _configurable_names() -> list[str]:
  import gin  # pylint: disable=g-import-not-at-top
  names = []
  for selector, _ in gin.config._REGISTRY.items():  # pylint: disable=protected-access
    names += [selector, selector.rsplit(".", 1)[-1]]
  return names


def _parameters(name: str) -> list[str]:
  found = _configurable(name)
  if found is None:
    return []
  try:
    return [p for p in inspect.signature(found.wrapped).parameters if p != "self"]
  except (TypeError, ValueError):
    return []


def _reachable(entry: str) -> set[tuple[str, str]]:
  """The config keys a call of `entry` can read: its bindings, the macros they read, the
  bindings of the configurables they reference, and so on."""
  config = _gin_config()
  by_selector: dict[str, list[tuple[str, str]]] = {}
  for key in config:
    by_selector.setdefault(key[1], []).append(key)
  todo, seen = list(by_selector.get(entry, [])), set()
  while todo:
    key = todo.pop()
    if key in seen:
      continue
    seen.add(key)
    for ref in _references(config.get(key, {})):
      if _is_macro(ref):
        todo.append(ref.config_key)
      else:
        todo += by_selector.get(ref.configurable.selector, [])
  return seen


def _binding_name(key: tuple[str, str], param: str) -> str:
  if key[1] == "gin.macro":
    return key[0]
  return f"{key[0] + '/' if key[0] else ''}{key[1].rsplit('.', 1)[-1]}.{param}"


def _example_flag(name: str) -> str:
  if re.search(r"(DIR|PATH|FILE|dir|path|file)$", name):
    return f"--gin.{name}=\"'/path'\""
  return f"--gin.{name}=VALUE"


def _check_config(command: str) -> None:
  """Refuses, before the command starts, a config that leaves what `command` calls unbound: a
  gin.REQUIRED parameter of its entry point, a macro it reads that nothing sets, a setting still
  `%gin.REQUIRED`.

  build-hash reads only the model and task: required settings it cannot reach (MODEL_DIR) are
  bound to None instead of refused.
  """
  import gin  # pylint: disable=g-import-not-at-top
  entry = _ENTRY_POINTS[command]
  short = entry.rsplit(".", 1)[-1]
  config = _gin_config()
  found = _configurable(entry)
  required = [name for name, p in inspect.signature(found.wrapped).parameters.items()
              if p.default is gin.REQUIRED]
  unbound = [name for name in required if name not in config.get(("", entry), {})]
  if unbound:
    raise UsageError(
        f"the config does not bind {short}'s {', '.join(unbound)}: give a run config first, e.g. "
        f"{_CONFIG_EXAMPLES[command]}")
  reachable = _reachable(entry)
  undefined = sorted(key[0] for key in reachable if key[1] == "gin.macro" and key not in config)
  if undefined:
    readers = sorted({_binding_name(key, param) for key in reachable for param, value in
                      config.get(key, {}).items() for ref in _references(value)
                      if _is_macro(ref) and ref.config_key[0] in undefined})
    them = "it" if len(undefined) == 1 else "them"
    raise UsageError(f"the config reads {', '.join('%' + n for n in undefined)} (in "
                     f"{', '.join(readers)}) but nothing sets {them}: give the model/task config "
                     f"files that set {them}, or {' '.join(_example_flag(n) for n in undefined)}")
  missing = []
  for key, params in list(config.items()):
    for param, value in params.items():
      if not _is_required(value):
        continue
      if command == "build-hash" and key not in reachable:
        gin.bind_parameter((key[0], key[1], param), None)
      else:
        missing.append(_binding_name(key, param))
  if missing:
    raise UsageError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required: add "
                     f"{' '.join(_example_flag(n) for n in missing)} (gin strings need inner "
                     "quotes)")


# --------------------------------------------------------------------------------------------------
# Parsing, with errors that name the file, line or flag at fault and the fix.


class _Placeholders:
  """A gin parser delegate that only records references: command-line bindings are read once
  without gin's registry, to know what each sets (and to explain a syntax error)."""

  def configurable_reference(self, name: str, evaluate: bool) -> tuple[str, str]:
    return ("@", name)

  def macro(self, name: str) -> tuple[str, str]:
    return ("%", name)


def _statements(text: str) -> list[Any]:
  from gin import config_parser  # pylint: disable=g-import-not-at-top
  return [s for s in config_parser.ConfigParser(text, _Placeholders())
          if isinstance(s, config_parser.BindingStatement)]


def _innermost(e: BaseException) -> BaseException:
  """The exception gin re-raised under an augmented message (its 'In call to configurable ...',
  'In file ..., line N' proxies)."""
  while (e.__suppress_context__ and e.__context__ is not None and
         isinstance(e, type(e.__context__)) and type(e) is not type(e.__context__) and
         str(e).startswith(str(e.__context__))):
    e = e.__context__
  return e


def _gin_location(e: BaseException) -> Optional[tuple[str, str, str]]:
  """(file, line, text) of the innermost 'In file "F", line N' gin added to `e`'s message."""
  found = re.search(r'In file "(.*?)", line (\d+)\n\s*(.*)', str(e))
  return found.groups() if found else None


def _explain_gin_message(message: str) -> str:
  """gin's message for an unknown configurable or parameter, with the closest known name."""
  message = message.strip()
  found = re.match(r"Configurable '(.+?)' doesn't have a parameter named '(.+?)'\.", message)
  if found:
    name, param = found.groups()
    # Imported here as the rest of the library is (jax, flax); by now gin's registrations have.
    from hashmoe import routers  # pylint: disable=g-import-not-at-top
    moved = routers.moved_binding(name, param)
    if moved:
      return moved
    return f"{name} has no parameter {param}{_did_you_mean(param, _parameters(name))}"
  found = re.match(r"No configurable matching (?:reference )?'@?([^'(]+)(?:\(\))?'\.", message)
  if found:
    name = found.group(1).rsplit("/", 1)[-1]
    return f"no configurable named {name}{_did_you_mean(name, _configurable_names())}"
  return message.splitlines()[0] if message else message


def _unparsable_value(msg: str) -> bool:
  return "Failed to parse token" in msg or "Unable to parse value" in msg


def _flag_fix(origin: str, key: str, value: str) -> str:
  """`origin` rewritten with `key = value`, in the form the user wrote it."""
  if origin.startswith("--gin."):
    return f'--gin.{key}="{value}"' if "'" in value else f"--gin.{key}={value}"
  return f'--gin_bindings="{key} = {value}"'


def _current_value(key: str) -> Any:
  """What the config parsed so far binds `key` (a macro name or `configurable.param`) to."""
  if not re.fullmatch(r"[\w./]+", key):
    return _UNSET
  if "." not in key.rsplit("/", 1)[-1]:
    return _follow_macros(_gin_config().get((key, "gin.macro"), {}).get("value", _UNSET))
  name, param = key.rsplit(".", 1)
  scope, _, name = name.rpartition("/")
  found = _configurable(name)
  if found is None:
    return _UNSET
  return _follow_macros(_gin_config().get((scope, found.selector), {}).get(param, _UNSET))


def _not_a_value(key: str, value: str, fix: Any) -> str:
  """Why `key = value` does not parse, and the fix (`fix(new_value)` writes it as the user did)."""
  current = _current_value(key)
  if isinstance(current, bool):
    return f"{value} is not a gin value; {key} is True or False"
  if isinstance(current, (int, float)):
    return (f"{value} is not a gin value; {key} is a number ({current!r} in the config), e.g. "
            f"{fix(repr(current))}")
  if "'" in value or '"' in value or not value:
    return f"{value} is not a gin value ({_GIN_VALUES})"
  return f"{value} is not a gin value; gin strings need inner quotes: {fix(repr(value))}"


def _command_line_syntax_error(origin: str, text: str, e: SyntaxError) -> UsageError:
  key, _, value = (part.strip() for part in text.partition("="))
  if not _unparsable_value(str(e.msg)) or not value:
    return UsageError(f"{origin}: gin cannot parse {text!r}: {str(e.msg).splitlines()[0]}")
  return UsageError(f"{origin}: {_not_a_value(key, value, lambda v: _flag_fix(origin, key, v))}")


def _unclosed_bracket(path: str) -> Optional[tuple[int, str]]:
  """(line number, text) of the bracket or string a gin file leaves open at its end."""
  import io  # pylint: disable=g-import-not-at-top
  import tokenize  # pylint: disable=g-import-not-at-top
  try:
    text = Path(path).read_text()
  except OSError:
    return None
  opened = []
  try:
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
      if token.type == tokenize.OP and token.string in "([{":
        opened.append(token.start[0])
      elif token.type == tokenize.OP and token.string in ")]}" and opened:
        opened.pop()
  except tokenize.TokenError:
    pass
  except SyntaxError as e:  # An unterminated string: Python names its line.
    return (e.lineno, text.splitlines()[e.lineno - 1]) if e.lineno else None
  if not opened:
    return None
  return opened[0], text.splitlines()[opened[0] - 1]


def _parse_command_line_binding(text: str, origin: str) -> list[Any]:
  """Parses one --gin.KEY=VALUE / --gin_bindings flag into gin; returns its binding statements."""
  import gin  # pylint: disable=g-import-not-at-top
  try:
    statements = _statements(text)
  except SyntaxError as e:
    raise _command_line_syntax_error(origin, text, e) from e
  except Exception as e:  # tokenize.TokenError: an unclosed bracket or quote.
    raise UsageError(f"{origin}: gin cannot parse {text!r} (an unclosed bracket or quote?)") from e
  for statement in statements:
    current = _UNSET
    if not statement.arg_name:
      name = f"{statement.scope}/{statement.selector}" if statement.scope else statement.selector
      current = _follow_macros(_gin_config().get((name, "gin.macro"), {}).get("value", _UNSET))
    if (isinstance(current, (int, float)) and not isinstance(current, bool) and
        isinstance(statement.value, str)):
      key = text.partition("=")[0].strip()
      raise UsageError(f"{origin}: {key} is a number ({current!r} in the config), not the string "
                       f"{statement.value!r}; e.g. {_flag_fix(origin, key, repr(current))}")
  try:
    gin.parse_config(text)
  except Exception as e:
    raise UsageError(f"{origin}: {_explain_gin_message(str(_innermost(e)))}") from e
  return statements


def _gin_file_error(e: BaseException, file: str, search_path: Sequence[str],
                    roots: Sequence[Path]) -> UsageError:
  """One or two lines for a gin file gin could not parse: where, what, and the fix."""
  inner = _innermost(e)
  location = _gin_location(e)
  where = f"{location[0]}:{location[1]}" if location else file
  if isinstance(inner, SyntaxError):
    text = (inner.text or "").strip()
    reason = str(inner.msg).splitlines()[0]
    key, _, value = (part.strip() for part in text.partition("="))
    if _unparsable_value(str(inner.msg)) and value:
      reason = _not_a_value(key, value, lambda v: f"{key} = {v}")
    return UsageError(f"{inner.filename or file}:{inner.lineno}: gin cannot parse `{text}`: "
                      f"{reason}")
  message = str(inner)
  found = re.match(r"Unable to open file: (.*?)\. Searched config paths", message)
  if isinstance(inner, OSError) and found:
    name = found.group(1)
    return UsageError(
        f"{where}: include {name!r} not found in the gin search path ({', '.join(search_path)})"
        f"{_did_you_mean(name, _gin_files_under(roots))}; add its folder with --gin_search_path")
  if type(inner).__name__ == "TokenError":
    if location:  # In a file this one includes; gin names only the include statement.
      name = re.search(r"include\s+['\"](.+?)['\"]", location[2])
      found = [Path(root) / name.group(1) for root in search_path] if name else []
      found = [p for p in found if p.is_file()]
      if not found:
        return UsageError(f"{where}: the file included here ends inside an unclosed bracket or "
                          f"string: `{location[2].strip()}`")
      file = str(found[0])
    unclosed = _unclosed_bracket(file)
    if unclosed:
      return UsageError(f"{file}:{unclosed[0]}: `{unclosed[1].strip()}` opens a bracket or string "
                        "that the file never closes")
    return UsageError(f"{file}: the file ends inside an unclosed bracket or string")
  text = f" in `{location[2].strip()}`" if location else ""
  return UsageError(f"{where}: {_explain_gin_message(message)}{text}")


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = (), extra: str = "", finalize: bool = True, *,
              origins: Optional[Sequence[str]] = None) -> None:
  """Parses gin files then bindings (in order), with `configs/` and each file's folder on the
  include search path.

  A file or binding gin cannot parse, and a macro set by `bindings` that nothing reads (a misspelt
  `--gin.TRAIN_STEPZ=5` would otherwise be ignored), raise `UsageError` naming the file and line or
  the flag (`origins[i]`, how the user wrote `bindings[i]`), with the fix or the closest name.
  """
  import gin  # pylint: disable=g-import-not-at-top
  from hashmoe import train as _  # noqa: F401  Registers the configurables.
  origins = list(origins) if origins is not None else [f"--gin_bindings={b!r}" for b in bindings]
  roots = [Path(p) for p in search_paths]
  default = configs_dir()
  if default is not None:
    roots.append(default)
  gin.clear_config()
  files = [_resolve_gin_file(f, roots) for f in gin_files]
  folders = list(dict.fromkeys([str(r) for r in roots] +
                               [str(Path(f).resolve().parent) for f in files]))
  # gin keeps its search path in a global that clear_config leaves alone; restored afterwards so
  # that one parse's folders never resolve another's includes (in-process callers parse often).
  prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
  saved_prefixes = list(prefixes)
  for folder in folders:
    gin.add_config_file_search_path(folder)
  noise = _GinSearchNoise()
  root_logger = logging.getLogger()
  root_logger.addFilter(noise)
  statements = []
  try:
    for f in files:
      try:
        gin.parse_config_file(f)
      except Exception as e:  # Anything gin raises while reading a config file is the file's.
        raise _gin_file_error(e, f, ["."] + folders, roots) from e
    for text, origin in zip(bindings, origins):
      statements += [(s, origin) for s in _parse_command_line_binding(text, origin)]
    if extra:
      gin.parse_config(extra)
  finally:
    prefixes[:] = saved_prefixes
    root_logger.removeFilter(noise)
  read = _read_macros()
  for statement, origin in statements:
    if statement.arg_name:
      continue  # `configurable.param`: gin checked that the parameter exists.
    name = f"{statement.scope}/{statement.selector}" if statement.scope else statement.selector
    if name not in read:
      raise UsageError(f"{origin} sets {name}, a macro nothing in the config reads"
                       f"{_did_you_mean(name, read)}")
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
    from hashmoe import train as train_lib  # pylint: disable=g-import-not-at-top
    train_lib._keep_tensorflow_off_accelerators()  # pylint: disable=protected-access
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
  inner = _innermost(e)
  train_lib = sys.modules.get("hashmoe.train")
  usage = (UsageError,) + ((train_lib.ConfigError,) if train_lib is not None else ())
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
  where = paths[0] if paths else (f"under MODEL_DIR {model_dir}" if model_dir else None)
  if any((isinstance(x, OSError) and x.errno == errno.ENOSPC) or
         "No space left on device" in str(x) for x in chain):
    again = (" and run the same command again: training resumes from the last checkpoint"
             if command == "train" else " and run the command again")
    return EXIT_ERROR, (f"no space left on device{' while writing ' + str(where) if where else ''}"
                        f"; free some space (or point MODEL_DIR elsewhere){again}")
  oserror = next((x for x in chain if isinstance(x, OSError) and x.strerror), None)
  if oserror is not None:
    path = oserror.filename or where
    reason = oserror.strerror[0].lower() + oserror.strerror[1:]
    hint = ("; choose a writable place or change its permissions"
            if oserror.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "")
    return EXIT_ERROR, f"{reason}: {path}{hint}" if path else f"{reason}{hint}"
  known = tuple(getattr(train_lib, name) for name in ("NonFiniteLossError", "CheckpointError")
                if train_lib is not None and hasattr(train_lib, name))
  message = str(inner).strip()
  if isinstance(inner, known):
    return EXIT_ERROR, message
  return EXIT_ERROR, (f"{type(inner).__name__}: {message}\n"
                      f"  (--debug or {DEBUG_ENV}=1 shows the traceback)")


class _Context:
  """What an error message may need that only the run knows."""
  command = "?"
  model_dir: Any = None


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of the `hashmoe` console script; returns the exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
  context = _Context()
  context.command = next((a for a in argv if not a.startswith("-")), "?")
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
  bindings = list(args.gin_bindings) + flag_bindings
  origins = ([f"--gin_bindings={b!r}" for b in args.gin_bindings] +
             [a for a in argv if a.startswith("--gin.")])
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
  parse_gin(args.gin_file, bindings, args.gin_search_path, finalize=False, origins=origins,
            extra=_BUILD_HASH_BINDINGS if args.command == "build-hash" else "")
  _check_config(args.command)
  gin.finalize()
  if args.command == "train":
    model_dir = _bound_value(_ENTRY_POINTS["train"], "model_dir")
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
    paths = train_lib.build_hash_files(
        kind=args.kind, output=args.output, seed=args.seed,
        embeddings_from=args.embeddings_from, kmeans_iters=args.kmeans_iters)
    # One path names a MultiHash set too (the files are found by `stats.hash_table_paths`).
    flag = f"--gin.train.hash_tables=\"'{args.output}'\""
    print(json.dumps({"files": paths, "gin_flag": flag}))
    return 0
  raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
  sys.exit(main())
