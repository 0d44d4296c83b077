"""Checkpoints: orbax, one directory per step, written asynchronously, verified on restore.

A checkpoint holds four items:
  state        params (float32 master weights), optimizer state, step, and the model's
               non-trainable collections ("hash_tables": the routers' lookup tables);
  data         each host's input-pipeline position, a checksum of every array of `state` and its
               layout (path, shape, dtype of each array);
  hash_tables  the tables' metadata (kind, experts, seed, sha256, vocabulary fingerprint), verified
               on restore against the restored arrays and the task's vocabulary
               (`hashmoe.tables.verify_hash_tables`);
  config       the operative gin config (also written to `MODEL_DIR/config.gin`) and the settings
               the checkpoint fixes (`hashmoe.training.resume.run_settings`), compared by a
               resumed run.
A checkpoint that fails to read or whose arrays miss their checksums is corrupt: the previous one
is used (with a warning) and the corrupt one moved to `MODEL_DIR/corrupt_checkpoints/`. One whose
layout differs from the run's is not corrupt but another config: `IncompatibleCheckpointError`.

Other runs' checkpoints are read in part: `restore_params` (params and hash tables, for
INIT_CHECKPOINT and evaluation) and `token_embeddings` (one array, for clustered hash tables).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from hashmoe.training import multihost
from hashmoe.training.errors import CheckpointError, IncompatibleCheckpointError
from hashmoe.training.run_dir import CHECKPOINT_SUBDIR, CONFIG_FILE, CORRUPT_SUBDIR
from hashmoe.training.trainer import TrainState

Array = jax.Array
PyTree = Any
PathLike = Union[str, os.PathLike]

logger = logging.getLogger(__name__)


def _leaf_checksum(x: Array) -> Array:
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = x.dtype.itemsize * 8
  if bits >= 32:  # 64-bit leaves split into two uint32 words each
    words = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  else:
    words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).reshape(-1)
    words = words.astype(jnp.uint32)
  weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
  return jnp.sum(words * weights, dtype=jnp.uint32)


# One program per tree layout, compiled once and reused by every checkpoint of a run.
_tree_checksum_fn = jax.jit(lambda leaves: [_leaf_checksum(x) for x in leaves])


def tree_checksums(tree: PyTree) -> dict[str, int]:
  """Per-leaf content checksums (computed on device), to detect a checkpoint whose files were
  damaged without becoming unreadable.

  Each leaf's raw bits are viewed as uint32 words w_i and reduced as Σ w_i · (2i + 1) mod 2^32
  (integer arithmetic, so the result does not depend on the reduction order or the sharding).

  Returns:
    {key path: checksum} for every array leaf.
  """
  leaves = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(leaf, "dtype")]
  sums = jax.device_get(_tree_checksum_fn([jnp.asarray(leaf) for _, leaf in leaves]))
  return {jax.tree_util.keystr(path): int(s) for (path, _), s in zip(leaves, sums)}


def state_layout(state: PyTree) -> list[str]:
  """"path shape dtype" of every array of a (concrete or abstract) state: what a checkpoint must
  match to be restored into a run."""
  return [f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {jnp.dtype(leaf.dtype).name}"
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
          if hasattr(leaf, "shape")]


# A scanned run of layers in a `state_layout` path: "['decoder_0_to_10']" (models.scanned_name).
_SCANNED_LAYER = re.compile(r"\['(encoder|decoder)_\d+_to_\d+'\]")


def _check_layout(saved: Sequence[str], wanted: Sequence[str], step: int, directory: Any) -> None:
  if list(saved) == list(wanted):
    return
  missing = [x for x in wanted if x not in set(saved)]
  extra = [x for x in saved if x not in set(wanted)]
  scan = ""
  if any(map(_SCANNED_LAYER.search, missing)) != any(map(_SCANNED_LAYER.search, extra)):
    scan = ("One side has scanned layers and the other not: TransformerConfig.scan_layers "
            "differs from the checkpoint's (keep its scan_layers, or convert its parameters with "
            "hashmoe.models.stack_layers / unstack_layers). ")
  raise IncompatibleCheckpointError(
      f"checkpoint step {step} in {directory} holds {len(saved)} arrays that do not fit this "
      f"run's {len(wanted)} (this run needs {missing[:3]}...; only the checkpoint has "
      f"{extra[:3]}...): the model or optimizer config differs from the one it was trained with. "
      f"{scan}Resume with the original config, or use a new MODEL_DIR (INIT_CHECKPOINT starts a "
      "new run from its parameters).")


def _own_position(positions: Sequence[Any], step: int) -> Any:
  """This process's data position among those every process saved. A position that names a
  global batch (the prepared-data loader's: the same on every process, marked
  `any_process_count`) serves any number of processes, so a run may resume on another host
  count; per-host positions (the streaming pipeline's shards) need the same count."""
  if len(positions) == jax.process_count():
    return positions[jax.process_index()]
  first = positions[0] if positions else None
  if (isinstance(first, Mapping) and first.get("any_process_count") and
      all(p == first for p in positions)):
    return first
  raise CheckpointError(
      f"step {step}: the data position was saved by {len(positions)} processes, this run has "
      f"{jax.process_count()}; the streaming input pipeline cannot resume exactly across a change "
      "of host count (prepared data can: `hashmoe prepare`, then train from it)")


@dataclasses.dataclass
class Restored:
  """What `Checkpointer.restore_latest` gives back."""
  step: int
  state: TrainState
  data_position: Any
  hash_metadata: dict[str, Any]


class Checkpointer:
  """orbax CheckpointManager for `TrainState` + data position + hash-table metadata + gin config.

  Saving is asynchronous (orbax writes a temporary directory and renames it when complete, so a
  process killed mid-save leaves no half checkpoint under a step name). Restoring walks back from
  the newest step: a step that fails to read, misses an item, or whose arrays do not match their
  recorded checksums is skipped with a warning and the next older one is tried; once one restores,
  the skipped ones are moved to `MODEL_DIR/corrupt_checkpoints/`. A checkpoint of another config
  (`IncompatibleCheckpointError`) stops the search instead.
  """

  ITEMS = ("state", "data", "hash_tables", "config")

  def __init__(self, directory: PathLike, *, max_to_keep: Optional[int] = 3,
               async_save: bool = True):
    if max_to_keep is not None and max_to_keep < 2:
      # One spare is what makes falling back past a corrupt newest checkpoint possible.
      raise ValueError(f"keep at least 2 checkpoints to survive a corrupt newest one, got "
                       f"max_to_keep={max_to_keep}")
    self.directory = epath.Path(directory).absolute()
    self._max_to_keep = max_to_keep
    self._async = async_save
    self._manager = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self._max_to_keep, cleanup_tmp_directories=True,
        enable_async_checkpointing=self._async, create=True)
    return ocp.CheckpointManager(self.directory, options=options, item_names=self.ITEMS)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, state: TrainState, *, data_position: Any, hash_metadata: Mapping[str, Any],
           config_text: str, settings: Optional[Mapping[str, Any]] = None) -> int:
    """Saves `state` under its own step (asynchronously); returns the step. `settings`: what the
    checkpoint fixes (`run_settings`), recorded beside the gin text for `check_resume`."""
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      return step
    checksums = tree_checksums(state)
    positions = multihost.allgather_json(data_position)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(multihost.to_json({"positions": positions, "checksums": checksums,
                                         "layout": state_layout(state)})),
        hash_tables=ocp.args.JsonSave(multihost.to_json(hash_metadata)),
        config=ocp.args.JsonSave(multihost.to_json({"operative_config": config_text,
                                           **({"settings": settings} if settings else {})})))
    self._manager.save(step, args=args, force=True)
    return step

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def _restore_step(self, step: int, abstract_state: TrainState) -> Restored:
    data = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
    if not isinstance(data, dict) or not {"checksums", "positions", "layout"} <= set(data):
      raise CheckpointError(f"step {step}: the 'data' item is missing or incomplete")
    _check_layout(data["layout"], state_layout(abstract_state), step, self.directory)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), hash_tables=ocp.args.JsonRestore()))
    state = restored.state
    if restored.hash_tables is None:
      raise CheckpointError(f"step {step}: the 'hash_tables' item is missing")
    expected, actual = data["checksums"], tree_checksums(state)
    if expected != actual:
      bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
      raise CheckpointError(f"step {step}: {len(bad)} restored arrays do not match their saved "
                            f"checksums (first: {bad[:3]})")
    if int(jax.device_get(state.step)) != step:
      raise CheckpointError(f"step {step}: the saved state says step {int(state.step)}")
    return Restored(step=step, state=state, data_position=_own_position(data["positions"], step),
                    hash_metadata=dict(restored.hash_tables))

  def restore_latest(self, abstract_state: TrainState) -> Optional[Restored]:
    """The newest restorable checkpoint, or None when the directory holds none."""
    steps = self.all_steps()
    if not steps:
      return None
    failures = []
    for step in reversed(steps):
      try:
        restored = self._restore_step(step, abstract_state)
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        # Any failure to read a checkpoint back (missing files, truncated or garbled data,
        # mismatched checksums) means it is unusable; fall back to the previous one.
        failures.append((step, e))
        message = (f"checkpoint at step {step} in {self.directory} is corrupt or incomplete "
                   f"({type(e).__name__}: {e}); falling back to the previous checkpoint")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        logger.warning(message)
        continue
      # Only now that a good one is found are the bad ones moved aside (so the run can save those
      # step numbers again); with none good, everything stays and the run refuses to start over.
      for bad, _ in failures:
        self._quarantine(bad)
      return restored
    raise CheckpointError(
        f"none of the checkpoints {steps} in {self.directory} could be restored (left in place; "
        "move them away to start over): " +
        "; ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in failures))

  def _quarantine(self, step: int) -> None:
    # Move the unreadable step aside (not delete: someone may want to look at it), so that the
    # run can save that step number again.
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      source = self.directory / str(step)
      target_dir = self.directory.parent / CORRUPT_SUBDIR
      target_dir.mkdir(parents=True, exist_ok=True)
      target = target_dir / f"{step}.{int(time.time())}"
      if source.exists():
        source.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"hashmoe_quarantine_{step}")
    self._manager.close()
    self._manager = self._make_manager()


def read_saved_config(model_dir: PathLike) -> Optional[tuple[int, dict[str, Any]]]:
  """The "config" item of MODEL_DIR's newest checkpoint that has a readable one, as (step, item),
  read without writing anything; None when MODEL_DIR holds no checkpoint.

  item: {"operative_config": gin text, "settings": `run_settings`} ("settings" is missing in
  checkpoints written before it was recorded). When no step's item reads, the item is rebuilt from
  `MODEL_DIR/config.gin` (or is empty) under the newest step.
  """
  model_dir = epath.Path(model_dir)
  directory = model_dir / CHECKPOINT_SUBDIR
  if not directory.is_dir():
    return None
  # The files are read directly: a CheckpointManager is a collective across processes (it syncs
  # on construction), and whether the directory exists yet is not a collective decision.
  steps = sorted(ocp.path.step.checkpoint_steps(directory), reverse=True)
  handler = ocp.JsonCheckpointHandler()
  for step in steps:
    try:
      item = handler.restore(directory / str(step) / "config")
    except Exception:  # pylint: disable=broad-except
      continue  # A damaged item: restore_latest reports the damage; an older step may tell.
    if isinstance(item, dict):
      return step, item
  if not steps:
    return None
  text = (model_dir / CONFIG_FILE).read_text() if (model_dir / CONFIG_FILE).exists() else ""
  return steps[0], {"operative_config": text}


def _reader(folder: epath.Path) -> ocp.CheckpointManager:
  """A manager that reads a checkpoints folder (and creates nothing)."""
  return ocp.CheckpointManager(folder, item_names=Checkpointer.ITEMS,
                               options=ocp.CheckpointManagerOptions(create=False))


def _find_step(checkpoint: PathLike, step: Optional[int] = None) -> tuple[epath.Path, int]:
  """(checkpoints folder, step) named by `checkpoint`: a run's MODEL_DIR, its `checkpoints/`
  folder (then `step`, default the newest), or one step folder inside it (its own step)."""
  path = epath.Path(checkpoint)
  if (path / CHECKPOINT_SUBDIR).is_dir():
    path = path / CHECKPOINT_SUBDIR
  if path.name.isdigit() and (path / "state").is_dir():
    return path.parent, int(path.name)
  manager = _reader(path)
  try:
    step = manager.latest_step() if step is None else step
  finally:
    manager.close()
  if step is None:
    raise CheckpointError(f"{checkpoint}: no checkpoint found")
  return path, int(step)


def restore_params(checkpoint: PathLike, abstract_state: TrainState,
                   step: Optional[int] = None) -> tuple[PyTree, PyTree, dict[str, Any], int]:
  """Reads params and constants (hash tables) of another run, e.g. for fine-tuning.

  Args:
    checkpoint: a run's MODEL_DIR, its `checkpoints/` folder, or one step folder inside it.
    abstract_state: the current run's abstract state (its params/constants shapes and shardings
      are the restore target; the optimizer state is not read).
    step: which step (default: the newest in the folder, or the step folder given).

  Returns:
    (params, constants, hash-table metadata, step).
  """
  path, step = _find_step(checkpoint, step)
  manager = _reader(path)
  try:
    data = manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
    if isinstance(data, dict) and "layout" in data:
      keep = lambda layout: [x for x in layout if x.startswith((".params", ".constants"))]
      _check_layout(keep(data["layout"]), keep(state_layout(abstract_state)), step, path)
    target = {"params": abstract_state.params, "constants": abstract_state.constants}
    # Partial restore: only params and constants of the saved TrainState are read.
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
        hash_tables=ocp.args.JsonRestore()))
  finally:
    manager.close()
  params, constants = restored.state["params"], restored.state["constants"]
  if isinstance(data, dict) and "checksums" in data:
    got = tree_checksums(TrainState(step=None, params=params, opt_state=None,
                                    constants=constants))
    bad = sorted(k for k, v in got.items() if data["checksums"].get(k) != v)
    if bad:
      raise CheckpointError(f"{path}/{step}: {len(bad)} restored arrays do not match their saved "
                            f"checksums (first: {bad[:3]})")
  return params, constants, dict(restored.hash_tables or {}), int(step)


def token_embeddings(run: PathLike, step: Optional[int] = None) -> np.ndarray:
  """float32[vocab, d] token embedding matrix of a trained run (for clustered/dispersed tables).

  Reads only that one array, so the run's model need not match the current one (the paper
  clusters a dense baseline's embeddings to route a sparse model).

  Args:
    run: a MODEL_DIR, its checkpoints/ folder, or one step folder.
    step: the step to read (default: the newest).
  """
  folder, step = _find_step(run, step)
  path = folder / str(step)
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path / "state").item_metadata
  try:
    leaf = tree["params"]["token_embedder"]["embedding"]
  except (KeyError, TypeError) as e:
    raise CheckpointError(f"{path}: the checkpoint holds no params/token_embedder/embedding") from e
  target = {"params": {"token_embedder": {"embedding": np.zeros(leaf.shape, leaf.dtype)}}}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  restored = checkpointer.restore(path / "state", args=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True))
  return np.asarray(restored["params"]["token_embedder"]["embedding"], np.float32)
