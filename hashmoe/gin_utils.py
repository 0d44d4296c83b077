"""gin for hashmoe's commands: where the configs are, parsing files and flags with errors that name
the file, line or flag at fault and the fix, and the checks a config passes before any work starts.

Like t5x's `gin_utils.py`, apart from the command line itself (`hashmoe.cli`):

* `configs_dir()`: the configs folder (`$HASHMOE_CONFIGS`, a checkout's `configs/`, or the installed
  package `hashmoe.configs`).
* `parse_gin(files, bindings, ...)`: files then bindings, `configs/` and each file's folder on the
  include search path; a misspelt or unused command-line macro is refused with the closest name.
* `check_config(entry, example)`: a command's entry point has every required setting bound.
* `bound_value(selector, param)`: what the parsed config binds, macros followed.

The checks read gin's parsed config (`gin.config._CONFIG`, `_REGISTRY`): gin has no public API for
which macros are read or which bindings are still `%gin.REQUIRED` (gin-config is pinned ~=0.5.0).
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import io
import logging
import os
import re
import tokenize
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import gin
from gin import config_parser

CONFIGS_ENV = "HASHMOE_CONFIGS"
# Every module that registers gin names a config may bind, each its own when imported: the models'
# configs, the mesh, the tasks and vocabularies, the input pipeline's task name and data source,
# the optimizer, the tables' inputs for build-hash, and the run's entry points.
CONFIGURABLE_MODULES = ("hashmoe.models", "hashmoe.sharding", "hashmoe.data.tasks",
                        "hashmoe.data.vocab", "hashmoe.data.pipeline", "hashmoe.data.preparation",
                        "hashmoe.data.loader",
                        "hashmoe.training.optim", "hashmoe.tables", "hashmoe.train")
# What a gin value can be, for the message when one cannot be parsed.
_GIN_VALUES = "a number, a 'quoted string', True/False/None, a [list], @configurable() or %MACRO"


class UsageError(Exception):
  """A command line or config the user must change: the CLI prints the message alone, exit 2."""


def register_configurables() -> None:
  """Imports `CONFIGURABLE_MODULES`, which registers every gin name hashmoe's configs bind (and
  imports TensorFlow and JAX: seconds, hence not at the CLI's start)."""
  for name in CONFIGURABLE_MODULES:
    importlib.import_module(name)
  _guard_package_file_check()


def _guard_package_file_check() -> None:
  """Makes gin's Python-package file check answer False instead of raising on a namespace package.

  gin resolves `include 'runs/pretrain.gin'` by trying each search folder with each registered
  reader; its package reader imports `runs` as a Python package and takes the folder of its
  `__init__.py`. A plain folder named like a config folder in the working directory (a `runs/`
  or `models/` of the user's, on sys.path as '') is a namespace package without one, and gin
  raised TypeError from `os.path.dirname(None)` instead of trying the next folder: every command
  run from such a directory failed. (gin-config 0.5.0.)"""
  readers = gin.config._FILE_READERS  # pylint: disable=protected-access
  for i, (reader, exists) in enumerate(readers):
    if getattr(exists, "_hashmoe_guarded", False) or exists is os.path.isfile:
      continue

    def guarded(path, _exists=exists):
      try:
        return _exists(path)
      except TypeError:
        return False

    guarded._hashmoe_guarded = True  # pylint: disable=protected-access
    readers[i] = (reader, guarded)


def configs_dir() -> Optional[Path]:
  """The gin configs folder: `$HASHMOE_CONFIGS`; else `configs/` beside the package when the code
  runs from a checkout (that checkout's own configs, also under PYTHONPATH); else the installed
  package `hashmoe.configs` (setup.py maps configs/ onto it); else None."""
  env = os.environ.get(CONFIGS_ENV)
  if env:
    return Path(env)
  checkout = Path(__file__).resolve().parent.parent / "configs"
  if (checkout / "runs").is_dir():
    return checkout
  spec = importlib.util.find_spec("hashmoe.configs")
  if spec is not None and spec.submodule_search_locations:
    return Path(next(iter(spec.submodule_search_locations)))
  return None


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
  return gin.config._CONFIG  # pylint: disable=protected-access


def _is_reference(value: Any) -> bool:
  return isinstance(value, gin.config.ConfigurableReference)


def _is_macro(ref: Any) -> bool:
  return _is_reference(ref) and ref.configurable.wrapped is gin.config.macro


def _is_required(value: Any) -> bool:
  constant = gin.config._retrieve_constant  # pylint: disable=protected-access
  return (_is_reference(value) and value.configurable.wrapped is constant and
          value.scoped_configurable_fn() is gin.REQUIRED)


def _references(value: Any) -> Iterator[Any]:
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


def bound_value(selector: str, param: str) -> Any:
  """What `selector.param` is bound to (macros followed), or `_UNSET`."""
  return _follow_macros(_gin_config().get(("", selector), {}).get(param, _UNSET))


def _configurable(name: str) -> Any:
  try:
    return gin.config._REGISTRY.get_match(name)  # pylint: disable=protected-access
  except ValueError:  # ambiguous
    return None


def _configurable_names() -> list[str]:
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


def check_config(entry: str, example: str, *, unreachable_to_none: bool = False) -> None:
  """Refuses, before a command starts, a config that leaves what it calls unbound: a
  gin.REQUIRED parameter of its entry point `entry` (a configurable's full name), a macro it reads
  that nothing sets, a setting still `%gin.REQUIRED`.

  Args:
    entry: the configurable the command calls.
    example: the flags to suggest when the entry point's own required parameters are unbound.
    unreachable_to_none: bind required settings `entry` cannot reach to None instead of refusing
      them (build-hash reads only the model and task, never MODEL_DIR).

  Raises:
    UsageError: naming each missing setting and the flag that sets it.
  """
  short = entry.rsplit(".", 1)[-1]
  config = _gin_config()
  found = _configurable(entry)
  required = [name for name, p in inspect.signature(found.wrapped).parameters.items()
              if p.default is gin.REQUIRED]
  unbound = [name for name in required if name not in config.get(("", entry), {})]
  if unbound:
    raise UsageError(
        f"the config does not bind {short}'s {', '.join(unbound)}: give a run config first, e.g. "
        f"{example}")
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
      if unreachable_to_none and key not in reachable:
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
  return [s for s in config_parser.ConfigParser(text, _Placeholders())
          if isinstance(s, config_parser.BindingStatement)]


def innermost(e: BaseException) -> BaseException:
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
    raise UsageError(f"{origin}: {_explain_gin_message(str(innermost(e)))}") from e
  return statements


def _gin_file_error(e: BaseException, file: str, search_path: Sequence[str],
                    roots: Sequence[Path]) -> UsageError:
  """One or two lines for a gin file gin could not parse: where, what, and the fix."""
  inner = innermost(e)
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
  register_configurables()
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
