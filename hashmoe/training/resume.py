"""Resuming: what a checkpoint fixes, and what a resumed run changed.

Resuming checks the run against the checkpoint (`check_resume`): settings that a checkpoint fixes
(the model's architecture and routing, the hash tables, the task and its vocabulary, SEQ_LEN,
BATCH_SIZE, SEED; see `run_settings`) must be the checkpoint's, or the run is refused with every
difference named and nothing written. Everything else (TRAIN_STEPS, the learning-rate schedule,
eval/checkpoint/log periods, dropout, ...) may change: the changes are logged, `config.gin` gets
the new config and the checkpoint's is kept as `config.gin.<step>`
(`hashmoe.training.run_dir.keep_config_history`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Optional, Union

from gin import config_parser as gin_config_parser

from hashmoe import models, routers, tables
from hashmoe.training import multihost
from hashmoe.training.errors import ChangedConfigError
from hashmoe.training.run_dir import CONFIG_FILE

PathLike = Union[str, os.PathLike]

logger = logging.getLogger(__name__)

# Model fields a resumed run may change: they shape how the parameters are trained or computed,
# not what they mean (dropout, compute precision, rematerialisation, the experts' dispatch, Switch's
# loss coefficients and capacity). Every other TransformerConfig and SparseConfig field is fixed by
# a checkpoint; `scan_layers` too, as it changes the parameters' layout (`hashmoe.models.stack_layers`
# converts them).
RESUMABLE_MODEL_FIELDS = frozenset({"dropout_rate", "attention_dropout_rate", "dtype",
                                    "remat_policy"})
RESUMABLE_SPARSE_FIELDS = frozenset({"dispatch", "capacity_factor", "balance_coef", "z_loss_coef",
                                     "jitter"})
# Router config fields (not flat SparseConfig fields) a resumed run may change: like the loss
# coefficients, which positions the auxiliary losses average over changes the objective, not the
# model.
RESUMABLE_ROUTER_FIELDS = frozenset({"exclude_padding"})
# `train` arguments a checkpoint fixes: its data position was saved for the task, SEQ_LEN and
# BATCH_SIZE; the seed draws the step keys (the restart guarantee); the tables are the
# checkpoint's own.
FIXED_TRAIN_ARGS = ("task", "seq_len", "batch_size", "seed", "hash_tables")
VOCABULARY_SETTING = "vocabulary fingerprint"
# Configurables whose parameters are model fields (the presets take them as overrides).
_MODEL_CONFIGURABLES = ("TransformerConfig", "baseline_config", "wider_config", "deeper_config",
                        "tiny_config")


def _is_file_spec(spec: Any) -> bool:
  """Whether a `train.hash_tables` value names table files (checked by content on resume, so a
  moved or renamed file of the same table is not a change)."""
  return spec is not None and not tables.is_table_kind(spec)


def run_settings(model_config: models.TransformerConfig, *, task: str, seq_len: int,
                 batch_size: int, seed: int, hash_tables: Any,
                 vocab_fingerprint: str) -> dict[str, Any]:
  """What a checkpoint fixes, as {gin name: JSON value}: every TransformerConfig and SparseConfig
  field but the RESUMABLE_* ones, the task, SEQ_LEN, BATCH_SIZE, SEED, the hash-table choice
  (None normalised to the router's default kind) and the vocabulary's fingerprint. Recorded in
  every checkpoint; `check_resume` refuses a run whose settings differ."""
  settings: dict[str, Any] = {
      f"TransformerConfig.{f.name}": getattr(model_config, f.name)
      for f in dataclasses.fields(model_config)
      if f.name != "sparse" and f.name not in RESUMABLE_MODEL_FIELDS}
  sparse = model_config.sparse
  settings["TransformerConfig.sparse"] = None if sparse is None else "SparseConfig"
  if sparse is not None:
    # Under the flat field names of SparseConfig before routers were objects: a checkpoint
    # written then compares equal to the same model now.
    settings.update({f"SparseConfig.{name}": value for name, value in sparse.flat_fields().items()
                     if name not in RESUMABLE_SPARSE_FIELDS})
    # The router's fields that never were flat fields (Switch's combine), under their gin names.
    settings.update({name: value for name, value in sparse.router.own_settings().items()
                     if name.rsplit(".", 1)[-1] not in RESUMABLE_ROUTER_FIELDS})
  settings.update({"train.task": task, "train.seq_len": int(seq_len),
                   "train.batch_size": int(batch_size), "train.seed": int(seed),
                   VOCABULARY_SETTING: vocab_fingerprint})
  if tables.hash_layer_names(model_config):
    if hash_tables is None:  # What `tables.resolve_hash_tables` builds for None.
      hash_tables = tables.default_table_kind(model_config)
    settings["train.hash_tables"] = hash_tables
  return multihost.to_json(settings)


class _Unset:
  """A setting one side of a comparison does not have."""

  def __repr__(self) -> str:
    return "(not set)"


_UNSET = _Unset()


@dataclasses.dataclass(frozen=True)
class _GinReference:
  """A `%MACRO` or `@configurable()` of gin text, kept as written."""
  text: str
  macro: Optional[str] = None

  def __repr__(self) -> str:
    return self.text


class _GinTextDelegate(gin_config_parser.ParserDelegate):
  """Parses references as text: a saved config names configurables that need not exist now."""

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return _GinReference(f"@{scoped_configurable_name}{'()' if evaluate else ''}")

  def macro(self, macro_name):
    return _GinReference(f"%{macro_name}", macro=macro_name)


def _gin_statements(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(macros {NAME: value}, bindings {"[scope/]configurable.param": value}) of gin text, values as
  written. Configurables are named without their module, as the operative config prints them."""
  macros, bindings = {}, {}
  for statement in gin_config_parser.ConfigParser(text, _GinTextDelegate()):
    if not isinstance(statement, gin_config_parser.BindingStatement):
      continue
    if not statement.arg_name:
      macros[statement.selector] = statement.value
      continue
    name = statement.selector.rsplit(".", 1)[-1]
    scope = f"{statement.scope}/" if statement.scope else ""
    bindings[f"{scope}{name}.{statement.arg_name}"] = statement.value
  return macros, bindings


def _resolve_macros(value: Any, macros: Mapping[str, Any], depth: int = 0) -> Any:
  if isinstance(value, _GinReference) and value.macro in macros and depth < 32:
    return _resolve_macros(macros[value.macro], macros, depth + 1)
  if isinstance(value, (list, tuple)):
    return type(value)(_resolve_macros(v, macros, depth) for v in value)
  if isinstance(value, dict):
    return {k: _resolve_macros(v, macros, depth) for k, v in value.items()}
  return value


@dataclasses.dataclass(frozen=True)
class ConfigChange:
  """One setting whose value differs between a checkpoint and the run resuming it.

  Attributes:
    name: a macro ("TRAIN_STEPS"), a gin binding ("SparseConfig.hash_key") or a `run_settings`
      name, as the user would change it.
    old, new: the checkpoint's value and the run's (macros resolved).
    keys: the gin bindings the change reaches (a macro's users; the binding itself).
  """
  name: str
  old: Any
  new: Any
  keys: tuple[str, ...] = ()

  def __str__(self) -> str:
    return f"{self.name}: {self.old!r} -> {self.new!r}"


def gin_config_changes(old_text: str, new_text: str) -> list[ConfigChange]:
  """The differences between two operative gin configs (a checkpoint's and a run's), macros
  resolved: a changed macro is one change (named by the macro, listing the bindings that read
  it); a binding that reads the same macro in both is not listed again. Text gin cannot parse (a
  hand-edited config.gin) gives no changes, with a warning."""
  try:
    old_macros, old_bindings = _gin_statements(old_text)
    new_macros, new_bindings = _gin_statements(new_text)
  except Exception as e:  # pylint: disable=broad-except
    logger.warning("cannot compare the checkpoint's gin config with this run's: %s", e)
    return []
  users: dict[str, set[str]] = {}
  for bindings in (old_bindings, new_bindings):
    for key, raw in bindings.items():
      if isinstance(raw, _GinReference) and raw.macro:
        users.setdefault(raw.macro, set()).add(key)
  changes = []
  for name in sorted(set(old_macros) | set(new_macros)):
    old = _resolve_macros(old_macros.get(name, _UNSET), old_macros)
    new = _resolve_macros(new_macros.get(name, _UNSET), new_macros)
    if old != new:
      changes.append(ConfigChange(name, old, new, tuple(sorted(users.get(name, ())))))
  for key in sorted(set(old_bindings) | set(new_bindings)):
    old_raw, new_raw = old_bindings.get(key, _UNSET), new_bindings.get(key, _UNSET)
    if isinstance(old_raw, _GinReference) and old_raw.macro and old_raw == new_raw:
      continue  # Listed under the macro's name if the macro changed.
    old, new = _resolve_macros(old_raw, old_macros), _resolve_macros(new_raw, new_macros)
    if old != new:
      changes.append(ConfigChange(key, old, new, (key,)))
  return changes


def _fixed_gin_binding(key: str, value: Any) -> bool:
  """Whether gin binding `key` ("[scope/]configurable.param") sets something a checkpoint fixes
  (the rule `run_settings` follows, for checkpoints that only recorded their gin text)."""
  configurable, _, arg = key.rsplit("/", 1)[-1].partition(".")
  if configurable in _MODEL_CONFIGURABLES:
    return arg not in RESUMABLE_MODEL_FIELDS
  if configurable == "SparseConfig":
    return arg not in RESUMABLE_SPARSE_FIELDS
  if configurable == "SentencePieceSettings":
    return True  # The vocabulary.
  if configurable == "task_name":
    return arg == "name"
  if configurable == "train":
    return arg in FIXED_TRAIN_ARGS and not (arg == "hash_tables" and _is_file_spec(value))
  return False


def _moved_router_field(change: ConfigChange) -> bool:
  """Whether `change` is a checkpoint's binding of a flat SparseConfig router field (before router
  configs) that this run's text no longer binds: the setting moved into a router config, and a
  checkpoint that recorded only its gin text cannot tell whether its value changed."""
  for key in change.keys:
    configurable, _, arg = key.rsplit("/", 1)[-1].partition(".")
    if (change.old is not _UNSET and change.new is _UNSET and configurable == "SparseConfig"
        and arg in routers.LEGACY_DEFAULTS and arg not in RESUMABLE_SPARSE_FIELDS):
      return True
  return False


def check_resume(saved: Mapping[str, Any], *, step: int, settings: Mapping[str, Any],
                 config_text: str, model_dir: PathLike) -> list[ConfigChange]:
  """Compares a run with the checkpoint it is about to resume.

  Args:
    saved: the checkpoint's "config" item (`read_saved_config`).
    step: the checkpoint's step.
    settings: this run's `run_settings`.
    config_text: this run's operative gin config.
    model_dir: MODEL_DIR (for the message).

  Returns:
    The changes the run may make (for the log): every difference of the two gin configs.

  Raises:
    ChangedConfigError: a setting the checkpoint fixes differs, with each such difference named
      (`name: checkpoint value -> this run's value`) and the ways out. Checkpoints that recorded
      `run_settings` are compared on those; older ones on their gin text's fixed bindings.
  """
  changes = gin_config_changes(saved.get("operative_config") or "", config_text)
  saved_settings = saved.get("settings")
  if isinstance(saved_settings, Mapping):
    try:
      macros = {key: raw.macro for key, raw in _gin_statements(config_text)[1].items()
                if isinstance(raw, _GinReference) and raw.macro}
    except Exception:  # pylint: disable=broad-except
      macros = {}  # Only the names suffer: gin_config_changes has warned.
    current = multihost.to_json(dict(settings))
    fixed = []
    # A setting only one side has is unknown, not changed: a field added to the model since the
    # checkpoint was written (a dense model's SparseConfig fields show as TransformerConfig.sparse).
    for key in sorted(set(saved_settings) & set(current)):
      if key == "train.hash_tables" and _is_file_spec(current[key]):
        continue  # Compared by content against the checkpoint's tables (check_same_tables).
      if saved_settings[key] != current[key]:
        name = f"{macros[key]} ({key})" if key in macros else key
        fixed.append(ConfigChange(name, saved_settings[key], current[key], (key,)))
  else:
    fixed = [c for c in changes if (c.old is not _UNSET and c.new is not _UNSET
                                    and any(_fixed_gin_binding(k, c.new) for k in c.keys))
             or _moved_router_field(c)]
  if fixed:
    model_dir = os.fspath(model_dir)
    lines = "".join(f"\n  {c}" for c in fixed)
    moved = ""
    if any(_moved_router_field(c) for c in fixed):
      moved = ("The checkpoint's gin text binds router settings as flat SparseConfig fields, "
               "which now live in the router configs (e.g. SparseConfig.hash_key is "
               "routers.Hash.key), so they cannot be compared with this run's. ")
    raise ChangedConfigError(
        f"MODEL_DIR {model_dir} holds a checkpoint (step {step}) of a run with other settings, "
        f"and these cannot change under a checkpoint (checkpoint -> this run):{lines}\n"
        f"{moved}Nothing was written. Rerun with the checkpoint's settings (its run's config is "
        f"{os.path.join(model_dir, CONFIG_FILE)}), or use a new MODEL_DIR; to fine-tune this "
        f"run's parameters under the new settings, start the new MODEL_DIR with "
        f"INIT_CHECKPOINT='{model_dir}'.")
  return changes
