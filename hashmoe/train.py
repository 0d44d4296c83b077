"""The gin-configured training and evaluation loop (t5x's shape: one entry point, gin experiments).

    hashmoe train --gin_file=configs/runs/cpu_tiny.gin --gin.MODEL_DIR="'/tmp/run'" \
                  --gin.TRAIN_STEPS=200

What one run does (`train`):

  1. Builds the mesh (`hashmoe.sharding.make_mesh`), the model (`hashmoe.models.build_model`) and
     the optimizer (`make_optimizer`: AdamW, linear warm-up then inverse-square-root or cosine
     decay, global-norm clipping, optionally a frozen dense or sparse part).
  2. Restores the newest readable checkpoint in `MODEL_DIR/checkpoints` (falling back, with a
     warning, past a corrupt one), or else initialises (optionally from `INIT_CHECKPOINT`).
  3. Steps: every batch passes `hashmoe.models.validate_batch` on the host, then one jitted step
     (parameters and optimizer state sharded by the logical-axis rules, the batch over
     ("data", "expert")) computes cross-entropy + the routers' aux losses and applies the update.
  4. Logs every `log_period` steps to `MODEL_DIR/metrics.jsonl`, TensorBoard
     (`MODEL_DIR/tensorboard`) and a tqdm bar; evaluates every `eval_period` steps on a fixed set
     of validation batches (`MODEL_DIR/eval.jsonl`); checkpoints every `checkpoint_period` steps
     and at the end.

Determinism and restarts. The step RNG is `fold_in(key(seed), step)` and the data position is part
of every checkpoint, so a run killed at any moment (SIGKILL included) and started again with the
same command retraces the uninterrupted run step for step: same batches, same dropout masks,
bit-equal losses on the same machine. On restart the tail of `metrics.jsonl` past the restored step
is dropped, so the file always reads as one run. SIGTERM (pre-emption) and SIGINT (Ctrl-C) finish
the current step, write a checkpoint and return (`TrainResult.exit_code` 143 or 130); a second
Ctrl-C stops at once (KeyboardInterrupt, no checkpoint). A diverged loss (NaN/inf, or a
cross-entropy above `divergence_factor` x ln(vocab size)) raises `LossDivergedError` naming the
step before anything is saved, so the last good checkpoint is never overwritten; the metrics
writers never fail on a huge or non-finite value (JSONL writes "nan"/"inf", TensorBoard skips it).

One run per MODEL_DIR (`ModelDirLock`): process 0 locks `MODEL_DIR/hashmoe.lock` before anything is
written, and a second run on the directory fails at once naming the first one's pid and host.

Resuming checks the run against the checkpoint (`check_resume`): settings that a checkpoint fixes
(the model's architecture and routing, the hash tables, the task and its vocabulary, SEQ_LEN,
BATCH_SIZE, SEED; see `run_settings`) must be the checkpoint's, or the run is refused with every
difference named and nothing written. Everything else (TRAIN_STEPS, the learning-rate schedule,
eval/checkpoint/log periods, dropout, ...) may change: the changes are logged, `config.gin` gets
the new config and the checkpoint's is kept as `config.gin.<step>`. A fresh run in a MODEL_DIR
that holds logs of an earlier run (its checkpoints deleted) keeps them as
`<name>.<timestamp>.bak` before starting over, with a warning.

A checkpoint (orbax, one directory per step, written asynchronously) holds four items:
  state        params (float32 master weights), optimizer state, step, and the model's
               non-trainable collections ("hash_tables": the routers' lookup tables);
  data         each host's input-pipeline position, a checksum of every array of `state` and its
               layout (path, shape, dtype of each array);
  hash_tables  the tables' metadata (kind, experts, seed, sha256, vocabulary fingerprint), verified
               on restore against the restored arrays and the task's vocabulary;
  config       the operative gin config (also written to `MODEL_DIR/config.gin`) and the settings
               the checkpoint fixes (`run_settings`), compared by a resumed run.
A checkpoint that fails to read or whose arrays miss their checksums is corrupt: the previous one
is used (with a warning) and the corrupt one moved to `MODEL_DIR/corrupt_checkpoints/`. One whose layout differs from the
run's is not corrupt but another config: `IncompatibleCheckpointError`. The tables are also written
as `hashing.HashTable` files to `MODEL_DIR/hash_tables/`.

Fine-tuning (paper Section 5.4, BST): `INIT_CHECKPOINT` starts from another run's parameters (and
hash tables); `make_optimizer.freeze = 'sparse'` or `'dense'` keeps one part fixed (`param_labels`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import signal
import socket
import tempfile
import threading
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence, Union

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from gin import config_parser as gin_config_parser
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hashmoe import hashing, models, routers, sharding
from hashmoe.data import stats as stats_lib
from hashmoe.data import tasks as tasks_lib
from hashmoe.data import vocab as vocab_lib
from hashmoe.layers import MOE_COLLECTION

Array = jax.Array
PyTree = Any
PathLike = Union[str, os.PathLike]

logger = logging.getLogger(__name__)

PARAMS = "params"
HASH_TABLES = "hash_tables"
SPARSE, DENSE = "sparse", "dense"
# Any parameter under a module of this name belongs to a sparse layer (router or experts): the
# models build each sparse FFN as `<layer>/moe/{router,experts}` (`hashmoe.models._make_layer`).
SPARSE_MODULE = "moe"

CHECKPOINT_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "corrupt_checkpoints"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
CONFIG_FILE = "config.gin"
HASH_TABLE_SUBDIR = "hash_tables"
TENSORBOARD_SUBDIR = "tensorboard"

# --------------------------------------------------------------------------------------------------
# gin: everything a config file may name. models.py stays free of gin; the wiring lives here.

for _fn in (models.TransformerConfig, models.SparseConfig, models.baseline_config,
            models.wider_config, models.deeper_config, models.tiny_config):
  gin.external_configurable(_fn, module="hashmoe.models")
gin.external_configurable(sharding.make_mesh, module="hashmoe.sharding")
gin.external_configurable(tasks_lib.register_tasks, module="hashmoe.data.tasks")
gin.external_configurable(vocab_lib.SentencePieceSettings, module="hashmoe.data.vocab")
del _fn


# --------------------------------------------------------------------------------------------------
# Errors.


class ConfigError(ValueError):
  """A setting or input the user must change before the run can go on (a usage error: the CLI
  prints the message alone and exits 2). Runtime failures (a diverged loss, an unreadable
  checkpoint, a full disk) are other exceptions and exit 1."""


class ChangedConfigError(ConfigError):
  """A resumed run differs from its checkpoint in a setting a checkpoint fixes (`run_settings`)."""


class ModelDirInUseError(ConfigError):
  """Another run holds MODEL_DIR's lock (`ModelDirLock`)."""


class LossDivergedError(FloatingPointError):
  """The training loss became NaN/inf or rose past the divergence bound; nothing after the last
  good checkpoint was saved."""


NonFiniteLossError = LossDivergedError  # The earlier name (NaN/inf only), kept for callers.


class CheckpointError(RuntimeError):
  """No checkpoint in a directory could be restored, or one does not fit the current run."""


class IncompatibleCheckpointError(CheckpointError):
  """A readable checkpoint holds another model or optimizer than the run's config describes.

  Not a corruption: older checkpoints of the directory would not fit either, so the run stops
  instead of falling back (and nothing is moved aside)."""


# --------------------------------------------------------------------------------------------------
# Optimizer.


@gin.configurable(module="hashmoe.train")
def learning_rate_schedule(peak: float = 1e-3, *, warmup_steps: int = 1000, decay: str = "rsqrt",
                           total_steps: Optional[int] = None,
                           end_fraction: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then a decay.

  decay:
    "rsqrt"    inverse square root, `peak * sqrt(warmup_steps / step)` (fairseq's `inverse_sqrt`,
               which the paper's fairseq and ParlAI setups use);
    "cosine"   half a cosine from `peak` at the end of warm-up to `end_fraction * peak` at
               `total_steps` (then constant);
    "constant" `peak` after warm-up.

  Returns:
    schedule(step int32[]) -> float32[]; `schedule(t)` is the rate used by update t + 1.
  """
  if peak <= 0 or not math.isfinite(peak):
    raise ValueError(f"learning rate peak must be a positive finite number, got {peak}")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
  if decay not in ("rsqrt", "cosine", "constant"):
    raise ValueError(f"decay must be 'rsqrt', 'cosine' or 'constant', got {decay!r}")
  if decay == "cosine" and (total_steps is None or total_steps <= warmup_steps):
    raise ValueError(f"cosine decay needs total_steps > warmup_steps={warmup_steps}, got "
                     f"total_steps={total_steps}")
  if not 0.0 <= end_fraction <= 1.0:
    raise ValueError(f"end_fraction must be in [0, 1], got {end_fraction}")

  def schedule(count):
    # optax counts updates from 0; the first update runs at "step 1" of the warm-up.
    step = jnp.asarray(count, jnp.float32) + 1.0
    warm = float(max(warmup_steps, 1))
    warmup = peak * jnp.minimum(step / warm, 1.0)
    if decay == "constant":
      after = jnp.float32(peak)
    elif decay == "rsqrt":
      after = peak * jnp.sqrt(warm / jnp.maximum(step, warm))
    else:
      frac = jnp.clip((step - warm) / float(total_steps - warmup_steps), 0.0, 1.0)
      cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
      after = peak * (end_fraction + (1.0 - end_fraction) * cosine)
    return jnp.where(step <= warm, warmup, after)

  return schedule


def _is_box(x: Any) -> bool:
  return isinstance(x, flax.core.meta.AxisMetadata)


def _unbox_leaf(x: Any) -> Any:
  return x.unbox() if _is_box(x) else x


def _path_keys(path: Sequence[Any]) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def param_labels(params: PyTree) -> PyTree:
  """"sparse" for every router or expert parameter (anything inside a sparse layer's `moe`
  block), "dense" for the rest. Accepts boxed (`nn.LogicallyPartitioned`) or plain trees and
  returns the same structure with a string per parameter."""
  def label(path, _):
    return SPARSE if SPARSE_MODULE in _path_keys(path) else DENSE
  return jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_box)


def _decay_mask(params: PyTree) -> PyTree:
  # Weight decay on matrices only: norms' scales and biases are not decayed (the usual AdamW
  # practice; decaying a LayerNorm scale pulls it towards 0, not towards identity).
  return jax.tree.map(lambda x: jnp.ndim(_unbox_leaf(x)) >= 2, params, is_leaf=_is_box)


@gin.configurable(module="hashmoe.train")
def make_optimizer(learning_rate: Union[float, optax.Schedule] = 1e-3, *,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.98,
                   eps: float = 1e-8, clip_norm: Optional[float] = 1.0,
                   freeze: Optional[str] = None) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, optionally freezing one part of the model.

  Args:
    learning_rate: a float or a schedule (`learning_rate_schedule`).
    weight_decay: decoupled weight decay (AdamW), applied to matrices only.
    b1, b2, eps: Adam's moments and epsilon (b2=0.98 as fairseq's transformer recipes).
    clip_norm: clip the global gradient norm to this value; None disables clipping.
    freeze: None (train everything), "sparse" (the paper's "freeze the sparse part" fine-tuning:
      routers and experts stay fixed) or "dense" (only routers and experts train). Frozen
      parameters get exactly zero updates (`optax.set_to_zero` under `optax.multi_transform`),
      hold no Adam moments, and are excluded from the clipping norm.

  Returns:
    An optax GradientTransformation over the model's parameter tree.
  """
  if freeze not in (None, SPARSE, DENSE):
    raise ValueError(f"freeze must be None, 'sparse' or 'dense', got {freeze!r}")
  if clip_norm is not None and not clip_norm > 0:
    raise ValueError(f"clip_norm must be positive or None, got {clip_norm}")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
  parts = []
  if clip_norm is not None:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=_decay_mask))
  tx = optax.chain(*parts)
  if freeze is None:
    return tx
  trained = DENSE if freeze == SPARSE else SPARSE
  # Frozen leaves are zeroed before the trained part sees the gradient, so clipping measures only
  # what is actually updated.
  return optax.multi_transform({trained: tx, freeze: optax.set_to_zero()}, param_labels)


# --------------------------------------------------------------------------------------------------
# Loss.


def token_nll(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
  """Summed next-token negative log-likelihood.

  Args:
    logits: float32[batch, length, vocab].
    targets: int32[batch, length].
    weights: float/bool[batch, length], 0 at padding.

  Returns:
    (Σ weight · -log softmax(logits)[target]  float32[], Σ weight  float32[]).
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weights = weights.astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)


def loss_weights(batch: Mapping[str, Array]) -> Array:
  """float32[batch, length]: `decoder_loss_weights` when the feature converter gives them, else
  1 where the target is not padding (id 0)."""
  if "decoder_loss_weights" in batch:
    return jnp.asarray(batch["decoder_loss_weights"], jnp.float32)
  return (jnp.asarray(batch["decoder_target_tokens"]) > 0).astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# Train state.


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes.

  Attributes:
    step: int32[], updates applied so far.
    params: float32 master weights (compute may be bfloat16, per the model config).
    opt_state: the optimizer's state.
    constants: the model's non-trainable collections, e.g. {"hash_tables": ...}; never updated.
  """
  step: Array
  params: PyTree
  opt_state: PyTree
  constants: PyTree


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


# --------------------------------------------------------------------------------------------------
# Hash tables: built or loaded before init, described in every checkpoint, verified on restore.


def _hash_layers(config: models.TransformerConfig) -> list[str]:
  s = config.sparse
  if s is None or not s.router.uses_tables:
    return []
  return [f"encoder_{i}" for i in s.encoder_layers] + [f"decoder_{i}" for i in s.layers]


def hash_key_space(config: models.TransformerConfig) -> int:
  """Rows of the config's hash tables (`hashing.key_space_size` of its hash key)."""
  return config.sparse.router.table_key_space(config.vocab_size, config.max_len)


def _num_tables(config: models.TransformerConfig) -> int:
  return config.sparse.router.num_tables


# The counted statistic behind each hash key (hashmoe.data.stats counts token, prev_token and
# bigram ids). The oracle and predicted next token are tokens of the same vocabulary, so their
# frequencies are the token frequencies.
_COUNTED_KEY = {"token": "token", "prev_token": "prev_token", "bigram": "bigram",
                "oracle_future": "token", "predicted_future": "token"}
_COUNTED_KINDS = ("balanced", "dispersed", hashing.TOPK_KIND)


def counts_decoder_inputs(key: str) -> bool:
  """Whether a table for hash key `key` is balanced on decoder-input counts (the ids a decoder
  router hashes, shifted-in start id included) rather than on target counts: the oracle and
  predicted next token are, or estimate, the target."""
  return key not in ("oracle_future", "predicted_future")


def counted_key(key: str) -> str:
  """The `hashmoe.data.stats` key whose training-split counts balance a table for `key`."""
  if key not in _COUNTED_KEY:
    raise ValueError(f"hash key {key!r} has no corpus statistic to balance a table with; build a "
                     f"'random' table for it (counted keys: {sorted(_COUNTED_KEY)})")
  return _COUNTED_KEY[key]


def make_hash_tables(config: models.TransformerConfig, kind: str, *, out_path: PathLike,
                     key_counts: Optional[Callable[[], np.ndarray]] = None, seed: int = 0,
                     vocab_fingerprint: str = "", embeddings: Optional[np.ndarray] = None,
                     kmeans_iters: int = 20) -> tuple[hashing.HashTable, ...]:
  """Builds the tables one hash layer of `config` needs and writes them (`stats.build_hash_table`).

  Args:
    config: a model whose `sparse.router` uses tables: `routers.Hash` (num_hashes tables, one
      expert per key) or `routers.HashTopK` (one table of topk experts per key).
    kind: one of the router's `table_kinds` (`hashing.TABLE_KINDS` for Hash, `hashing.TOPK_KIND`
      for HashTopK).
    out_path: the .npz written (MultiHash: `stats.hash_table_paths(out_path, N)`).
    key_counts: returns int[key_space] occurrences of each key id over the training split; called
      only for the kinds that need it (balanced, dispersed, balanced_topk).
    seed: seed of random tables and k-means.
    vocab_fingerprint: the vocabulary's fingerprint, recorded in every table.
    embeddings: float[vocab, d] token embeddings of a trained model (clustered, dispersed).

  Returns:
    The tables (as written).
  """
  s = config.sparse
  if s is None or not s.router.uses_tables:
    router = None if s is None else s.router.name
    raise ValueError(f"hash tables need a router with tables (sparse.router routers.Hash or "
                     f"routers.HashTopK), the model has {router!r}")
  if kind not in s.router.table_kinds:
    raise ValueError(f"router {s.router.name!r} cannot use a {kind!r} table: it takes one of "
                     f"{s.router.table_kinds}")
  key_space = hash_key_space(config)
  if kind in _COUNTED_KINDS:
    if key_counts is None:
      raise ValueError(f"a {kind!r} table needs key counts over the training split")
    counts = np.asarray(key_counts())
  else:
    counts = np.zeros(key_space, np.int64)  # Only its length (the key space) is used.
  if counts.shape != (key_space,):
    raise ValueError(f"key counts cover {counts.shape} ids, the hash key {s.router.key!r} has a "
                     f"key space of {key_space}")
  return stats_lib.build_hash_table(
      kind, counts, num_experts=s.num_experts, out_path=out_path, num_hashes=_num_tables(config),
      k=s.router.experts_per_token if kind == hashing.TOPK_KIND else None, embeddings=embeddings,
      seed=seed,
      vocab_fingerprint=vocab_fingerprint or None, kmeans_iters=kmeans_iters)


def load_hash_table_files(files: Union[str, Sequence[str], Mapping[str, Any]],
                          config: models.TransformerConfig, *,
                          vocab_fingerprint: Optional[str] = None
                          ) -> dict[str, tuple[tuple[hashing.HashTable, str], ...]]:
  """Reads `hashing.HashTable` files (written by `hashmoe build-hash`) for the hash layers.

  Args:
    files: for every hash layer: one path (for MultiHash, the path build-hash was given: the N
      files `stats.hash_table_paths(path, N)` are read) or a list of N paths; or a mapping
      {layer name ("decoder_6") or "default": path or list of paths}.
    config: the model; each table must cover its key space and expert count.
    vocab_fingerprint: the task vocabulary's fingerprint; a table built for another vocabulary
      is rejected.

  Returns:
    {layer or "default": ((table, path), ...)}.
  """
  if isinstance(files, (str, os.PathLike)) or (
      isinstance(files, Sequence) and not isinstance(files, Mapping)):
    files = {"default": files}
  key_space = hash_key_space(config)
  needed = _num_tables(config)
  result = {}
  for layer, paths in files.items():
    if isinstance(paths, (str, os.PathLike)):
      paths = stats_lib.hash_table_paths(paths, needed)
    paths = [os.fspath(p) for p in paths]
    if len(paths) != needed:
      raise ValueError(f"train.hash_tables[{layer!r}] lists {len(paths)} files; router "
                       f"{config.sparse.router!r} needs {needed}")
    group = []
    for path in paths:
      table = hashing.HashTable.load(path, vocab_fingerprint=vocab_fingerprint or None)
      if table.vocab_size != key_space:
        raise ValueError(f"{path}: hash table covers {table.vocab_size} key ids, but the model's "
                         f"hash key {config.sparse.router.key!r} has a key space of {key_space}")
      if table.num_experts != config.sparse.num_experts:
        raise ValueError(f"{path}: hash table was built for {table.num_experts} experts, the "
                         f"model has num_experts={config.sparse.num_experts}")
      group.append((table, path))
    result[str(layer)] = tuple(group)
  return result


def _table_description(table: hashing.HashTable, source: str) -> dict[str, Any]:
  return {"kind": table.kind, "num_experts": table.num_experts, "vocab_size": table.vocab_size,
          "seed": table.seed, "vocab_fingerprint": table.vocab_fingerprint,
          "sha256": hashlib.sha256(table.table.tobytes()).hexdigest(), "source": source}


def _collection_tables(constants: PyTree) -> dict[str, np.ndarray]:
  """{key path: int32 array} of every table in the "hash_tables" collection (host copies)."""
  tables = constants.get(HASH_TABLES, {}) if isinstance(constants, Mapping) else {}
  flat = jax.tree_util.tree_flatten_with_path(tables)[0]
  return {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf)) for path, leaf in flat}


def hash_table_metadata(constants: PyTree, descriptions: Mapping[str, list[dict]], *,
                        vocab_size: int, vocab_fingerprint: str) -> dict[str, Any]:
  """What a checkpoint records about its hash tables: the sha256 of every table array in the
  "hash_tables" collection, how each layer's tables were made, and the vocabulary they index."""
  arrays = _collection_tables(constants)
  return {
      "vocab_size": int(vocab_size),
      "vocab_fingerprint": vocab_fingerprint,
      "arrays": {name: {"shape": list(a.shape), "sha256": hashlib.sha256(
          np.ascontiguousarray(a, np.int32).tobytes()).hexdigest()} for name, a in arrays.items()},
      "layers": {k: list(v) for k, v in descriptions.items()},
  }


def verify_hash_tables(constants: PyTree, metadata: Mapping[str, Any], *, vocab_size: int,
                       vocab_fingerprint: str, where: str) -> None:
  """Raises CheckpointError unless restored tables match their recorded sha256 and were built for
  this vocabulary (size and fingerprint)."""
  if int(metadata.get("vocab_size", vocab_size)) != vocab_size:
    raise CheckpointError(f"{where}: the checkpoint was trained with vocab_size="
                          f"{metadata['vocab_size']}, the task's vocabulary has {vocab_size}")
  saved_fp = metadata.get("vocab_fingerprint") or ""
  if saved_fp and vocab_fingerprint and saved_fp != vocab_fingerprint:
    raise CheckpointError(f"{where}: the checkpoint's hash tables and embeddings index the "
                          f"vocabulary with fingerprint {saved_fp}, but the task's vocabulary has "
                          f"fingerprint {vocab_fingerprint}")
  arrays = _collection_tables(constants)
  recorded = metadata.get("arrays", {})
  if set(arrays) != set(recorded):
    raise CheckpointError(f"{where}: hash tables {sorted(arrays)} do not match the recorded "
                          f"{sorted(recorded)}")
  for name, array in arrays.items():
    digest = hashlib.sha256(np.ascontiguousarray(array, np.int32).tobytes()).hexdigest()
    if digest != recorded[name]["sha256"]:
      raise CheckpointError(f"{where}: hash table {name} has sha256 {digest}, the checkpoint "
                            f"recorded {recorded[name]['sha256']} (damaged checkpoint)")


# --------------------------------------------------------------------------------------------------
# Checkpoints.


def _json_default(x: Any) -> Any:
  if isinstance(x, os.PathLike):
    return os.fspath(x)
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"cannot store {type(x).__name__} in a checkpoint's JSON items: {x!r}")


def _to_json(obj: Any) -> Any:
  # Round-trip so that orbax's JsonSave only ever sees plain JSON types.
  return json.loads(json.dumps(obj, default=_json_default))


def _allgather_json(obj: Any) -> list[Any]:
  """Every process's `obj` (JSON-serialisable), in process order. One process: `[obj]`."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(json.dumps(obj, default=_json_default).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(data.size))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)]


def state_layout(state: PyTree) -> list[str]:
  """"path shape dtype" of every array of a (concrete or abstract) state: what a checkpoint must
  match to be restored into a run."""
  return [f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {jnp.dtype(leaf.dtype).name}"
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
          if hasattr(leaf, "shape")]


def _check_layout(saved: Sequence[str], wanted: Sequence[str], step: int, directory: Any) -> None:
  if list(saved) == list(wanted):
    return
  missing = [x for x in wanted if x not in set(saved)][:3]
  extra = [x for x in saved if x not in set(wanted)][:3]
  raise IncompatibleCheckpointError(
      f"checkpoint step {step} in {directory} holds {len(saved)} arrays that do not fit this "
      f"run's {len(wanted)} (this run needs {missing}...; only the checkpoint has {extra}...): "
      "the model or optimizer config differs from the one it was trained with. Resume with the "
      "original config, or use a new MODEL_DIR (INIT_CHECKPOINT starts a new run from its "
      "parameters).")


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
    positions = _allgather_json(data_position)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(_to_json({"positions": positions, "checksums": checksums,
                                         "layout": state_layout(state)})),
        hash_tables=ocp.args.JsonSave(_to_json(hash_metadata)),
        config=ocp.args.JsonSave(_to_json({"operative_config": config_text,
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
    positions = data["positions"]
    if len(positions) != jax.process_count():
      raise CheckpointError(
          f"step {step}: the data position was saved by {len(positions)} processes, this run has "
          f"{jax.process_count()}; the input pipeline cannot resume exactly across a change of "
          "host count")
    return Restored(step=step, state=state, data_position=positions[jax.process_index()],
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
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
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
  path = epath.Path(checkpoint)
  if (path / CHECKPOINT_SUBDIR).is_dir():
    path = path / CHECKPOINT_SUBDIR
  if path.name.isdigit() and (path / "state").is_dir():
    step, path = int(path.name), path.parent
  manager = ocp.CheckpointManager(path, item_names=Checkpointer.ITEMS,
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"{checkpoint}: no checkpoint found")
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


# --------------------------------------------------------------------------------------------------
# Resuming: what a checkpoint fixes, and what a resumed run changed.

# Model fields a resumed run may change: they shape how the parameters are trained or computed,
# not what they mean (dropout, compute precision, the experts' dispatch, Switch's loss coefficients
# and capacity). Every other TransformerConfig and SparseConfig field is fixed by a checkpoint.
RESUMABLE_MODEL_FIELDS = frozenset({"dropout_rate", "attention_dropout_rate", "dtype"})
RESUMABLE_SPARSE_FIELDS = frozenset({"dispatch", "capacity_factor", "balance_coef", "z_loss_coef",
                                     "jitter"})
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
  return spec is not None and not _is_table_kind(spec)


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
  settings.update({"train.task": task, "train.seq_len": int(seq_len),
                   "train.batch_size": int(batch_size), "train.seed": int(seed),
                   VOCABULARY_SETTING: vocab_fingerprint})
  if _hash_layers(model_config):
    if hash_tables is None:  # What _resolve_hash_tables builds for None.
      hash_tables = sparse.router.default_table_kind
    settings["train.hash_tables"] = hash_tables
  return _to_json(settings)


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
    current = _to_json(dict(settings))
    fixed = []
    # A setting only one side has is unknown, not changed: a field added to the model since the
    # checkpoint was written (a dense model's SparseConfig fields show as TransformerConfig.sparse).
    for key in sorted(set(saved_settings) & set(current)):
      if key == "train.hash_tables" and _is_file_spec(current[key]):
        continue  # Compared by content against the checkpoint's tables (_check_same_tables).
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


def _keep_config_history(model_dir: epath.Path, step: int, saved_text: str,
                         config_text: str) -> None:
  """Before config.gin takes a resumed run's changed config, the checkpoint's is kept as
  config.gin.<step> (the config that trained up to that step); an existing one is not replaced:
  a run that stopped before its next checkpoint trained nothing that was kept."""
  if not saved_text or saved_text == config_text:
    return
  kept = model_dir / f"{CONFIG_FILE}.{step}"
  if not kept.exists():
    kept.write_text(saved_text)
    logger.info("the config of the checkpoint at step %d is kept as %s", step, kept)


def _set_aside_earlier_logs(model_dir: epath.Path) -> None:
  """A fresh run in a MODEL_DIR that holds logs of an earlier run (whose checkpoints were deleted)
  would overwrite them: they are renamed `<name>.<timestamp>.bak` first, with a warning. The
  TensorBoard folder is left as it is (TensorBoard tells the runs apart by wall time)."""
  logs = [model_dir / name for name in (METRICS_FILE, EVAL_FILE)]
  records = {p.name: sum(1 for line in p.read_text().splitlines() if line.strip())
             for p in logs if p.exists()}
  if not any(records.values()):
    return
  stamp = time.strftime("%Y%m%d-%H%M%S")
  kept = []
  for path in logs + [model_dir / CONFIG_FILE]:
    if path.exists():
      target = path.parent / f"{path.name}.{stamp}.bak"
      path.rename(target)
      kept.append(target.name)
  message = (f"MODEL_DIR {model_dir} has no checkpoint but holds the logs of an earlier run "
             f"({', '.join(f'{n}: {c} records' for n, c in records.items())}); they are kept as "
             f"{', '.join(kept)} and this run starts over at step 0")
  warnings.warn(message, RuntimeWarning, stacklevel=3)
  logger.warning(message)


# --------------------------------------------------------------------------------------------------
# One run per MODEL_DIR.

LOCK_FILE = "hashmoe.lock"


class ModelDirLock:
  """MODEL_DIR's lock: one run at a time writes to a MODEL_DIR.

  `acquire` takes an exclusive `fcntl.flock` on MODEL_DIR/hashmoe.lock (the kernel drops it when
  the process ends, however it ends) and writes the owner's pid, host and start time into the file,
  for the message a second run prints; `release` deletes the file and drops the lock. `train`
  takes it on process 0 before it writes anything, and releases it when the run ends, exceptions
  included.

  A lock file that exists but is not locked was left by a run that ended without releasing it
  (SIGKILL, a crash). Written on this host, that run is certainly gone: the lock is taken over with
  a warning. Written on another host, it may not be (not every network filesystem carries flock
  between hosts, and this host cannot ask whether a process there lives): the run refuses and says
  to delete the file if that run is gone. There is no heartbeat rule on purpose: a run that only
  stalls would lose its lock to a second one.

  Object stores (gs://, s3://) have no locks: there the lock is skipped (logged), and one run per
  MODEL_DIR is up to the launcher. Where flock itself fails (a filesystem without locks) the run
  goes on unlocked, with a warning.
  """

  def __init__(self, model_dir: PathLike):
    self.model_dir = epath.Path(model_dir)
    self.path = self.model_dir / LOCK_FILE
    self._fd: Optional[int] = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def _read_owner(self, fd: int, wait: bool = False) -> dict[str, Any]:
    # A holder writes its owner right after locking; `wait` gives it that moment.
    for _ in range(20 if wait else 1):
      raw = os.pread(fd, 1 << 16, 0)
      if raw:
        try:
          owner = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
          owner = None
        return owner if isinstance(owner, dict) else {"pid": "?", "host": "?",
                                                      "started": "? (unreadable lock file)"}
      if wait:
        time.sleep(0.05)
    return {}

  def _describe(self, owner: Mapping[str, Any]) -> str:
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} "
            f"(started {owner.get('started', '?')})")

  def acquire(self) -> "ModelDirLock":
    """Takes the lock, or raises ModelDirInUseError naming the run that holds it."""
    if is_remote(self.model_dir):
      logger.info("MODEL_DIR %s is on an object store, which has no locks: make sure no other run "
                  "writes to it", self.model_dir)
      return self
    path = os.fspath(self.path)
    host = socket.gethostname()
    for _ in range(10):
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        owner = self._read_owner(fd, wait=True)
        os.close(fd)
        who = self._describe(owner) if owner else "another run (it has not written its pid yet)"
        raise ModelDirInUseError(
            f"MODEL_DIR {self.model_dir} is in use by {who}: one run at a time may write to a "
            "MODEL_DIR. Wait for that run to end (or stop it), or give this run another "
            "MODEL_DIR.") from None
      except OSError as e:
        os.close(fd)
        message = (f"cannot lock MODEL_DIR {self.model_dir} ({e}); going on unlocked: make sure no "
                   "other run writes to it")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        logger.warning(message)
        return self
      try:
        current = os.stat(path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        current = False
      if not current:  # Its owner released and deleted it meanwhile: lock the file now there.
        os.close(fd)
        continue
      owner = self._read_owner(fd)
      if owner and owner.get("host") != host:
        os.close(fd)
        raise ModelDirInUseError(
            f"MODEL_DIR {self.model_dir} is locked by {self._describe(owner)}, and this host "
            f"({host}) cannot check whether that run is still going. If no run is using the "
            f"directory, delete {path} and run again.")
      if owner:
        message = (f"taking over the stale lock of MODEL_DIR {self.model_dir}: "
                   f"{self._describe(owner)} ended without releasing it")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        logger.warning(message)
      started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
      data = json.dumps({"pid": os.getpid(), "host": host, "started": started}).encode()
      os.ftruncate(fd, 0)
      os.pwrite(fd, data, 0)
      os.fsync(fd)
      self._fd = fd
      return self
    raise ModelDirInUseError(f"could not lock MODEL_DIR {self.model_dir}: {path} kept being "
                             "replaced; is another run starting there?")

  def release(self) -> None:
    """Deletes the lock file and drops the lock (nothing when not held)."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
        os.unlink(self.path)
    except FileNotFoundError:
      pass
    finally:
      os.close(fd)

  def __enter__(self) -> "ModelDirLock":
    return self.acquire()

  def __exit__(self, *exc) -> bool:
    self.release()
    return False


def _lock_model_dir(model_dir: epath.Path) -> Optional[ModelDirLock]:
  """Process 0 takes MODEL_DIR's lock; every process raises if it could not (so that no host goes
  on to wait for the others in a collective)."""
  lock, error = None, ""
  if jax.process_index() == 0:
    try:
      lock = ModelDirLock(model_dir).acquire()
    except ModelDirInUseError as e:
      error = str(e)
  if jax.process_count() > 1:
    error = next((e for e in _allgather_json(error) if e), "")
  if error:
    if lock is not None:
      lock.release()
    raise ModelDirInUseError(error)
  return lock


# --------------------------------------------------------------------------------------------------
# Metrics: JSONL (one object per logged step), TensorBoard, a progress bar.


def _jsonable(value: Any) -> Any:
  value = np.asarray(value)
  if value.ndim == 0:
    v = value.item()
    if isinstance(v, float) and not math.isfinite(v):
      return str(v)  # JSON has no NaN/inf; keep the fact readable.
    return v
  return [_jsonable(v) for v in value]


def _json_safe(value: Any) -> Any:
  """`value` with every non-finite float as the string "nan", "inf" or "-inf": JSON has no such
  numbers (json.dumps would write NaN/Infinity, which strict readers reject)."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, Mapping):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def _exp(x: float) -> float:
  """exp(x), inf where it overflows (a perplexity is never clamped to a made-up finite number)."""
  try:
    return math.exp(x)
  except OverflowError:
    return math.inf


# TensorBoard stores float32: a value beyond its range (a diverged run's perplexity) cannot be
# written, and TensorFlow raises instead of writing inf.
_TENSORBOARD_MAX = float(np.finfo(np.float32).max)


def truncate_jsonl(path: epath.Path, last_step: int) -> None:
  """Drops the lines of a JSONL log whose "step" is past `last_step` (and a torn last line), so
  that a resumed run's log reads as one run."""
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # A line torn by a kill mid-write.
    if isinstance(record, dict) and record.get("step", 0) <= last_step:
      kept.append(line)
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text("".join(line + "\n" for line in kept))
  tmp.replace(path)


def is_remote(path: epath.PathLike) -> bool:
  """Whether `path` is on an object store (gs://, s3://, ...), where files cannot be appended to."""
  return "://" in os.fspath(path)


class MetricsLogger:
  """Writes train and eval metrics to JSONL and TensorBoard on process 0.

  No value makes it fail: a non-finite float is written to the JSONL as the string "nan", "inf" or
  "-inf" (strict JSON), and left out of TensorBoard, as is one beyond float32's range."""

  def __init__(self, model_dir: epath.Path, *, tensorboard: bool = True):
    self._primary = jax.process_index() == 0
    self._metrics_path = model_dir / METRICS_FILE
    self._eval_path = model_dir / EVAL_FILE
    self._remote_lines: dict[epath.Path, str] = {}
    self._writer = None
    if tensorboard and self._primary:
      try:
        from clu import metric_writers  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        logger.warning("TensorBoard summaries are off: clu.metric_writers could not be imported "
                       "(%s); install tensorboard", e)
      else:
        self._writer = metric_writers.create_default_writer(
            os.fspath(model_dir / TENSORBOARD_SUBDIR), asynchronous=False)

  def resume(self, step: int) -> None:
    if self._primary:
      truncate_jsonl(self._metrics_path, step)
      truncate_jsonl(self._eval_path, step)
      self._remote_lines.clear()  # Re-read after truncation.

  def _append(self, path: epath.Path, record: Mapping[str, Any]) -> None:
    line = json.dumps(_json_safe(record), allow_nan=False) + "\n"
    if not is_remote(path):
      with open(path, "a") as f:
        f.write(line)
        f.flush()
      return
    # Object stores (gs://, s3://) cannot append: keep the log's lines and rewrite it whole. A log
    # holds one line per LOG_PERIOD steps, so this stays small next to a checkpoint.
    if path not in self._remote_lines:
      self._remote_lines[path] = path.read_text() if path.exists() else ""
    self._remote_lines[path] += line
    path.write_text(self._remote_lines[path])

  def _tensorboard(self, step: int, prefix: str, record: Mapping[str, Any]) -> None:
    if self._writer is None:
      return
    scalars, histograms = {}, {}
    for key, value in record.items():
      if key == "step":
        continue
      if key == "moe":
        for layer, metrics in value.items():
          for name, v in metrics.items():
            try:
              arr = np.asarray(v, np.float64)
            except (TypeError, ValueError):
              continue  # "nan"/"inf" strings of a non-finite metric (_jsonable).
            tag = f"{prefix}/moe/{layer}/{name}"
            if not np.all(np.abs(arr) <= _TENSORBOARD_MAX):  # NaN fails the test too.
              continue
            if arr.ndim == 0:
              scalars[tag] = float(arr)
            else:
              histograms[tag] = arr
        continue
      if isinstance(value, (int, float)) and abs(value) <= _TENSORBOARD_MAX:
        # NaN, inf and what float32 cannot hold are left out (the JSONL keeps them).
        scalars[f"{prefix}/{key}"] = float(value)
    self._writer.write_scalars(step, scalars)
    if histograms:
      self._writer.write_histograms(step, histograms)

  def write_train(self, record: Mapping[str, Any]) -> None:
    if self._primary:
      self._append(self._metrics_path, record)
      self._tensorboard(record["step"], "train", record)

  def write_eval(self, record: Mapping[str, Any]) -> None:
    if self._primary:
      self._append(self._eval_path, record)
      self._tensorboard(record["step"], "eval", record)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()


def _moe_record(moe: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per sparse layer: the per-expert load fraction, the dropped-token fraction and the rest of the
  router's scalars, as plain JSON values."""
  out = {}
  for layer, metrics in moe.items():
    out[layer] = {name: _jsonable(value) for name, value in sorted(metrics.items())}
  return out


# --------------------------------------------------------------------------------------------------
# Pre-emption and Ctrl-C.


class _StopSignals:
  """Turns SIGTERM (pre-emption) and SIGINT (Ctrl-C) into a request the loop checks after each
  step; it then checkpoints and returns. A second Ctrl-C raises KeyboardInterrupt at once (no
  checkpoint). A SIGINT that the parent left ignored (a `nohup` or background job) stays ignored."""

  def __init__(self):
    self.signum = 0  # The first signal received; 0: none.
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        if signum == signal.SIGINT and signal.getsignal(signum) == signal.SIG_IGN:
          continue
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.signum:
      return
    self.signum = signum
    if signum == signal.SIGINT:
      logger.warning("Ctrl-C: checkpointing after the current step, then stopping (Ctrl-C again "
                     "stops at once, without a checkpoint)")
    else:
      logger.warning("received %s: checkpointing after the current step, then stopping",
                     signal.Signals(signum).name)

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()
    return False

  def any_host(self) -> int:
    """The signal that stops the run (0: none yet), the same on every host: hosts receive it at
    different moments, and all must stop at the same step."""
    if jax.process_count() == 1:
      return self.signum
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return int(np.max(multihost_utils.process_allgather(np.int32(self.signum))))


# --------------------------------------------------------------------------------------------------
# Model, state, steps.


def _init_batch(config: models.TransformerConfig) -> dict[str, np.ndarray]:
  return {name: np.ones(spec.shape, spec.dtype)
          for name, spec in models.init_batch_spec(config).items()}


def _split_seed(seed: int) -> tuple[Array, Array]:
  """(init key, base of the per-step keys) from the run's seed."""
  init_key, step_key = jax.random.split(jax.random.key(seed))
  return init_key, step_key


@dataclasses.dataclass
class Trainer:
  """The jitted pieces of a run, built once per (model, optimizer, mesh).

  Attributes:
    config: the model config.
    model: the Flax module (`DecoderLM` or `EncoderDecoder`).
    tx: the optimizer.
    mesh: the device mesh; params, optimizer state and batches are laid out on it.
    seed: the run's seed; init uses one key from it, step t uses `fold_in(step_base, t)`.
    rules: logical-axis rules (`hashmoe.sharding.LOGICAL_AXIS_RULES`).
  """
  config: models.TransformerConfig
  model: nn.Module
  tx: optax.GradientTransformation
  mesh: Mesh
  seed: int = 0
  rules: Sequence[tuple[str, Any]] = sharding.LOGICAL_AXIS_RULES

  def __post_init__(self):
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    self._init_key, self._step_key = _split_seed(self.seed)
    boxed = jax.eval_shape(functools.partial(self._init_boxed, self.model), self._init_key)
    self.state_shardings = sharding.shard_params(boxed, self.mesh, self.rules)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
        self.state_shardings)
    self._train_step = jax.jit(self._step, in_shardings=(self.state_shardings, self.batch_sharding),
                               out_shardings=(self.state_shardings, self.replicated),
                               donate_argnums=(0,))
    self._eval_step = jax.jit(self._eval, in_shardings=(self.state_shardings.params,
                                                        self.state_shardings.constants,
                                                        self.batch_sharding),
                              out_shardings=self.replicated)
    self._compiled: dict[Any, Any] = {}

  @contextlib.contextmanager
  def context(self):
    """Mesh and logical-axis rules for tracing and running the model."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(list(self.rules)):
      yield

  # -- init ------------------------------------------------------------------------------------

  def _init_boxed(self, model: nn.Module, key: Array) -> TrainState:
    variables = model.init({PARAMS: key}, _init_batch(self.config), deterministic=True)
    params = variables[PARAMS]
    constants = {k: v for k, v in variables.items() if k not in (PARAMS, MOE_COLLECTION)}
    # tx.init on the boxed params keeps the logical axis names on Adam's moments, so the
    # optimizer state is sharded exactly like the parameters it tracks.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                      constants=constants)

  def init_state(self, init_model: Optional[nn.Module] = None) -> TrainState:
    """A fresh state, sharded. `init_model` (same config, e.g. with hash tables attached) may
    differ from `self.model` only in the data it initialises its collections from."""
    model = self.model if init_model is None else init_model
    fn = lambda key: nn.unbox(self._init_boxed(model, key))
    with self.context():
      return jax.jit(fn, out_shardings=self.state_shardings)(self._init_key)

  # -- steps -----------------------------------------------------------------------------------

  def _loss(self, params, constants, batch, rngs, deterministic):
    logits, mutated = self.model.apply({PARAMS: params, **constants}, batch,
                                       deterministic=deterministic, rngs=rngs,
                                       mutable=[MOE_COLLECTION])
    aux_loss, moe = models.collect_aux(mutated)
    nll_sum, num_tokens = token_nll(logits, batch["decoder_target_tokens"], loss_weights(batch))
    return nll_sum, num_tokens, aux_loss, moe

  def _step(self, state: TrainState, batch: Mapping[str, Array]):
    key = jax.random.fold_in(self._step_key, state.step)
    dropout_key, jitter_key = jax.random.split(key)
    rngs = {"dropout": dropout_key, "jitter": jitter_key}

    def objective(params):
      nll_sum, num_tokens, aux_loss, moe = self._loss(params, state.constants, batch, rngs, False)
      ce = nll_sum / jnp.maximum(num_tokens, 1.0)
      # The routers' aux losses (Switch's balance loss, z-loss) join the objective as they are:
      # each is already scaled by its coefficient.
      return ce + aux_loss, (ce, aux_loss, num_tokens, moe)

    (loss, (ce, aux_loss, num_tokens, moe)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "ce_loss": ce, "aux_loss": aux_loss, "tokens": num_tokens,
               "grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates),
               "moe": moe}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def _eval(self, params, constants, batch):
    nll_sum, num_tokens, aux_loss, _ = self._loss(params, constants, batch, None, True)
    return {"nll_sum": nll_sum, "tokens": num_tokens, "aux_loss": aux_loss}

  def _compiled_fn(self, name: str, fn, *args):
    key = (name, tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in args[-1].items())))
    if key not in self._compiled:
      with self.context():
        self._compiled[key] = fn.lower(*args).compile()
    return self._compiled[key]

  def compile_train_step(self, state: TrainState, batch: Mapping[str, Array]):
    """Ahead-of-time compiles the step for this batch shape (once), so timing excludes it."""
    return self._compiled_fn("train", self._train_step, state, batch)

  def train_step(self, state: TrainState, batch: Mapping[str, Array]) -> tuple[TrainState, dict]:
    """One update. `batch`: global arrays from `global_batch`. Donates `state`."""
    return self.compile_train_step(state, batch)(state, batch)

  def eval_step(self, state: TrainState, batch: Mapping[str, Array]) -> dict[str, Array]:
    """{"nll_sum", "tokens", "aux_loss"} of one batch, deterministic (no dropout)."""
    fn = self._compiled_fn("eval", self._eval_step, state.params, state.constants, batch)
    return fn(state.params, state.constants, batch)

  def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, Array]:
    """Checks a host's batch (`models.validate_batch`) and assembles the global arrays from every
    host's rows (each host holds `batch_size / process_count` rows)."""
    models.validate_batch(local_batch, self.config.vocab_size, self.config.max_len)
    rows = next(iter(local_batch.values())).shape[0] * jax.process_count()
    shards = math.prod(self.mesh.shape[a] for a in sharding.TOKEN_MESH_AXES)
    if rows % shards:
      raise ValueError(f"global batch size {rows} is not divisible by the {shards} devices of the "
                       f"mesh's {sharding.TOKEN_MESH_AXES} axes that split the batch")
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}


def _finite(x: Any) -> bool:
  return bool(np.all(np.isfinite(np.asarray(x))))


# --------------------------------------------------------------------------------------------------
# The training loop.


@dataclasses.dataclass
class TrainResult:
  """What `train` returns.

  Attributes:
    step: the step the run stopped at.
    start_step: the step it started (or resumed) from.
    preempted: stopped early by SIGTERM or SIGINT (a checkpoint at `step` was written).
    last_train: the last logged train record (as in metrics.jsonl), or None.
    last_eval: the last eval record (as in eval.jsonl), or None.
    model_dir: where everything was written.
    stop_signal: the signal that stopped the run early (signal.SIGTERM or signal.SIGINT), or None.
  """
  step: int
  start_step: int
  preempted: bool
  last_train: Optional[dict[str, Any]]
  last_eval: Optional[dict[str, Any]]
  model_dir: str
  stop_signal: Optional[int] = None

  @property
  def exit_code(self) -> int:
    """0, or what a shell reports for a process its stop signal ended: 128 + the signal (143
    SIGTERM, 130 SIGINT), so that scripts and schedulers tell a stop from a finished run."""
    if not self.preempted:
      return 0
    return 128 + int(self.stop_signal or signal.SIGTERM)


def _is_table_kind(spec: Any) -> bool:
  return isinstance(spec, str) and spec in hashing.TABLE_KINDS + (hashing.TOPK_KIND,)


def _resolve_hash_tables(spec: Any, config: models.TransformerConfig, data: "InputPipeline",
                         seed: int, model_dir: epath.Path
                         ) -> tuple[dict[str, tuple], dict[str, list[dict]]]:
  """Tables for a fresh run and their descriptions, from `train.hash_tables`:

    None                      random tables ("hash") / a balanced top-k table ("hash_topk");
    a kind ("balanced", ...)  built now from the training split's key counts;
    paths / {layer: paths}    files written by `hashmoe build-hash`.
  """
  layers = _hash_layers(config)
  if not layers:
    if spec is not None and not _is_table_kind(spec):
      raise ValueError(f"train.hash_tables={spec!r} was given, but the model has no hash layers "
                       f"(sparse={config.sparse})")
    # A table kind left bound by a hash model file is moot for a model without hash layers.
    return {}, {}
  if spec is None:
    spec = config.sparse.router.default_table_kind
  if _is_table_kind(spec):
    if spec in ("clustered", "dispersed"):
      raise ValueError(
          f"{spec!r} tables cluster a trained model's token embeddings: build them once with "
          f"`hashmoe build-hash --kind={spec} --embeddings_from=BASELINE_MODEL_DIR ...` and pass "
          "the file as train.hash_tables")
    key = config.sparse.router.key
    counts = lambda: data.key_counts(counted_key(key), hash_key_space(config),
                                     decoder_inputs=counts_decoder_inputs(key))
    with tempfile.TemporaryDirectory() as scratch:
      # Every host builds the same tables (same counts, same seed); process 0 keeps the files.
      folder = model_dir / HASH_TABLE_SUBDIR if jax.process_index() == 0 else epath.Path(scratch)
      out = folder / f"{spec}.npz"
      tables = make_hash_tables(config, spec, out_path=out, key_counts=counts, seed=seed,
                                vocab_fingerprint=data.vocab_fingerprint)
    paths = stats_lib.hash_table_paths(out, len(tables))
    return {"default": tables}, {
        name: [_table_description(t, f"built at the start of training: {os.fspath(p)}")
               for t, p in zip(tables, paths)] for name in layers}
  loaded = load_hash_table_files(spec, config, vocab_fingerprint=data.vocab_fingerprint)
  missing = [n for n in layers if n not in loaded and "default" not in loaded]
  if missing:
    raise ValueError(f"train.hash_tables has no tables for hash layers {missing} (given: "
                     f"{sorted(loaded)}); add them or a 'default' entry")
  descriptions = {name: [_table_description(t, path) for t, path in
                         loaded.get(name, loaded.get("default"))] for name in layers}
  return {k: tuple(t for t, _ in v) for k, v in loaded.items()}, descriptions


@gin.configurable(module="hashmoe.train")
def train(*,
          model_dir: str = gin.REQUIRED,
          model_config: models.TransformerConfig = gin.REQUIRED,
          task: str = gin.REQUIRED,
          train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          seq_len: int = gin.REQUIRED,
          seed: int = 0,
          optimizer: Optional[optax.GradientTransformation] = None,
          mesh: Optional[Mesh] = None,
          checkpoint_period: int = 1000,
          keep_checkpoints: int = 3,
          async_checkpointing: bool = True,
          eval_period: int = 1000,
          eval_batches: int = 20,
          eval_split: str = "validation",
          log_period: int = 10,
          init_checkpoint: Optional[str] = None,
          hash_tables: Any = None,
          progress_bar: bool = True,
          tensorboard: bool = True,
          divergence_factor: Optional[float] = 4.0,
          input_pipeline: Optional["InputPipeline"] = None) -> TrainResult:
  """Trains `model_config` on `task` until `train_steps`, resuming from MODEL_DIR if possible.

  Args:
    model_dir: MODEL_DIR: checkpoints, metrics.jsonl, eval.jsonl, config.gin, tensorboard/.
    model_config: the model (`configs/models/*.gin`).
    task: a registered task name (`configs/tasks/*.gin`).
    train_steps: TRAIN_STEPS, the step to stop at (a resumed run continues up to it).
    batch_size: BATCH_SIZE, global sequences per step (split evenly over hosts).
    seq_len: SEQ_LEN, tokens per sequence (inputs and targets for seq2seq tasks).
    seed: SEED: parameter init and the per-step dropout/jitter keys.
    optimizer: default `make_optimizer()` (configure it in gin).
    mesh: default `sharding.make_mesh()` (all devices on "data").
    checkpoint_period: CHECKPOINT_PERIOD steps between checkpoints (and one at the end).
    keep_checkpoints: how many checkpoints to keep (>= 2).
    async_checkpointing: write checkpoints in the background.
    eval_period: EVAL_PERIOD steps between evaluations (and one at the end); 0 disables.
    eval_batches: EVAL_BATCHES: the fixed validation batches every evaluation uses.
    eval_split: the split to evaluate on.
    log_period: steps between logged records.
    init_checkpoint: INIT_CHECKPOINT: start a fresh run from this run's parameters and hash
      tables (a MODEL_DIR, its checkpoints/ folder, or a step folder). Ignored when MODEL_DIR
      already has a checkpoint (that one is resumed).
    hash_tables: the hash layers' tables for a fresh run: None (random tables for "hash", a
      balanced top-k table for "hash_topk"); a kind ("random", "balanced", "balanced_topk"),
      built at the start from the training split's key counts; or files from `hashmoe
      build-hash`: one path (MultiHash: the path build-hash was given), a list of paths, or
      {layer name or "default": path(s)}. A resumed run keeps its checkpoint's tables (files
      given again must be those); a run from INIT_CHECKPOINT keeps that checkpoint's.
    progress_bar: show a tqdm bar (process 0).
    tensorboard: write TensorBoard summaries.
    divergence_factor: the run stops ("loss diverged at step N") when a step's cross-entropy
      exceeds divergence_factor x ln(vocab size): an untrained model's loss is about ln(vocab
      size), so a loss several times that means the run blew up, even while it is still finite
      (its perplexity would overflow what the logs can hold). None disables the bound; a NaN or
      infinite loss or update always stops the run.
    input_pipeline: the data (default: `TaskPipeline(task, ...)`); tests pass their own.

  Returns:
    TrainResult.

  Raises:
    ModelDirInUseError: another run holds MODEL_DIR (`ModelDirLock`).
    ChangedConfigError: MODEL_DIR's checkpoint fixes a setting this run changes (`check_resume`).
    LossDivergedError: the loss diverged (the message names the step and the last good
      checkpoint).
    CheckpointError: no checkpoint in MODEL_DIR could be restored.
  """
  for name, value in (("train_steps", train_steps), ("batch_size", batch_size),
                      ("seq_len", seq_len), ("checkpoint_period", checkpoint_period),
                      ("log_period", log_period)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if eval_period < 0 or eval_batches < 0:
    raise ValueError(f"eval_period and eval_batches must be >= 0, got {eval_period}, "
                     f"{eval_batches}")
  if batch_size % jax.process_count():
    raise ValueError(f"batch_size={batch_size} must divide evenly over "
                     f"{jax.process_count()} processes")
  if divergence_factor is not None and not divergence_factor > 0:
    raise ConfigError(f"train.divergence_factor must be a positive number or None (no bound), "
                      f"got {divergence_factor!r}")
  model_dir = epath.Path(model_dir).absolute()
  created = not model_dir.exists()
  model_dir.mkdir(parents=True, exist_ok=True)
  lock = _lock_model_dir(model_dir)
  checkpointer = metrics_logger = None
  try:
    data = input_pipeline or TaskPipeline(task, batch_size=batch_size, seq_len=seq_len, seed=seed)
    logger.info("task %s: vocabulary of %d pieces", task, data.vocab_size)
    if model_config.vocab_size != data.vocab_size:
      raise ValueError(f"the model has vocab_size={model_config.vocab_size} but task {task!r} has "
                       f"a vocabulary of {data.vocab_size} pieces; bind "
                       f"TransformerConfig.vocab_size (VOCAB_SIZE) to {data.vocab_size}")
    tx = make_optimizer() if optimizer is None else optimizer
    mesh = sharding.make_mesh() if mesh is None else mesh
    model = models.build_model(model_config)
    trainer = Trainer(model_config, model, tx, mesh, seed=seed)
    logger.info("mesh %s; %s", dict(mesh.shape), models.param_counts(model_config))
    # Read once everything gin configures has been called (make_optimizer, make_mesh above).
    config_text = gin.operative_config_str()
    settings = run_settings(model_config, task=task, seq_len=seq_len, batch_size=batch_size,
                            seed=seed, hash_tables=hash_tables,
                            vocab_fingerprint=data.vocab_fingerprint)
    # Compared before anything is written: a refused run leaves MODEL_DIR as it found it.
    saved = read_saved_config(model_dir)
    changes = []
    if saved is not None:
      changes = check_resume(saved[1], step=saved[0], settings=settings, config_text=config_text,
                             model_dir=model_dir)
    checkpointer = Checkpointer(model_dir / CHECKPOINT_SUBDIR, max_to_keep=keep_checkpoints,
                                async_save=async_checkpointing)
    with trainer.context():
      restored = checkpointer.restore_latest(trainer.abstract_state)
    metrics_logger = MetricsLogger(model_dir, tensorboard=tensorboard)
    primary = jax.process_index() == 0
    if restored is not None:
      state, position = restored.state, restored.data_position
      hash_meta = restored.hash_metadata
      verify_hash_tables(state.constants, hash_meta, vocab_size=data.vocab_size,
                         vocab_fingerprint=data.vocab_fingerprint,
                         where=f"{checkpointer.directory}/{restored.step}")
      if hash_tables is not None and not _is_table_kind(hash_tables):
        _check_same_tables(hash_tables, model_config, data, hash_meta)
      logger.info("resumed from step %d in %s", restored.step, checkpointer.directory)
      if changes:
        logger.info("changed since the checkpoint at step %d: %s", restored.step,
                    "; ".join(map(str, changes)))
      if primary and saved is not None:
        _keep_config_history(model_dir, restored.step, saved[1].get("operative_config") or "",
                             config_text)
      metrics_logger.resume(restored.step)
    else:
      state, position, hash_meta = _fresh_state(trainer, data, hash_tables, init_checkpoint,
                                                model_dir, seed)
      if primary:
        _set_aside_earlier_logs(model_dir)
      metrics_logger.resume(0)
    if primary:
      (model_dir / CONFIG_FILE).write_text(config_text)
    max_loss = None if divergence_factor is None else divergence_factor * math.log(
        max(data.vocab_size, 2))
    return _loop(trainer=trainer, state=state, position=position, data=data,
                 checkpointer=checkpointer, metrics_logger=metrics_logger, hash_meta=hash_meta,
                 config_text=config_text, settings=settings, train_steps=int(train_steps),
                 checkpoint_period=checkpoint_period, eval_period=eval_period,
                 eval_batches=eval_batches, eval_split=eval_split, log_period=log_period,
                 progress_bar=progress_bar, model_dir=model_dir, max_loss=max_loss,
                 divergence_factor=divergence_factor)
  finally:
    try:
      if checkpointer is not None:
        checkpointer.close()
      if metrics_logger is not None:
        metrics_logger.close()
    finally:
      if lock is not None:
        lock.release()
      if created and jax.process_index() == 0 and not is_remote(model_dir):
        with contextlib.suppress(OSError):
          os.rmdir(model_dir)  # Only when empty: a run refused before writing leaves no trace.


def _check_same_tables(spec: Any, config: models.TransformerConfig, data: "InputPipeline",
                       hash_meta: Mapping[str, Any]) -> None:
  """A resumed run keeps its checkpoint's tables; table files given again must be those."""
  loaded = load_hash_table_files(spec, config, vocab_fingerprint=data.vocab_fingerprint)
  recorded = {d["sha256"] for layer in hash_meta.get("layers", {}).values() for d in layer}
  for name, group in loaded.items():
    for table, _ in group:
      digest = hashlib.sha256(table.table.tobytes()).hexdigest()
      if digest not in recorded:
        raise CheckpointError(
            f"train.hash_tables[{name!r}] holds a table (sha256 {digest}) that the checkpoint "
            "being resumed was not trained with; remove the binding to resume, or start a new "
            "MODEL_DIR")


def _fresh_state(trainer: Trainer, data: "InputPipeline", hash_tables: Any,
                 init_checkpoint: Optional[str], model_dir: epath.Path,
                 seed: int) -> tuple[TrainState, Any, dict[str, Any]]:
  config = trainer.config
  if init_checkpoint:
    params, constants, meta, step = restore_params(init_checkpoint, trainer.abstract_state)
    verify_hash_tables(constants, meta, vocab_size=data.vocab_size,
                       vocab_fingerprint=data.vocab_fingerprint,
                       where=f"INIT_CHECKPOINT {init_checkpoint} (step {step})")
    if hash_tables is not None and not _is_table_kind(hash_tables):
      _check_same_tables(hash_tables, config, data, meta)
    # A table *kind* (what a model file names) is satisfied by the checkpoint's own tables: the
    # fine-tuned model keeps routing tokens where it was trained to.
    # The optimizer starts afresh (Adam moments of the new objective), at step 0.
    step0 = jax.device_put(jnp.zeros((), jnp.int32), trainer.state_shardings.step)
    state = TrainState(step=step0, params=params, constants=constants,
                       opt_state=_reinit_opt(trainer, params))
    logger.info("initialised from %s (step %d)", init_checkpoint, step)
    descriptions = meta.get("layers", {})
  else:
    tables, descriptions = _resolve_hash_tables(hash_tables, config, data, seed, model_dir)
    init_model = models.build_model(config, tables or None)
    state = trainer.init_state(init_model)
  hash_meta = hash_table_metadata(state.constants, descriptions, vocab_size=data.vocab_size,
                                  vocab_fingerprint=data.vocab_fingerprint)
  return state, None, hash_meta


def _reinit_opt(trainer: Trainer, params: PyTree) -> PyTree:
  with trainer.context():
    return jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings.opt_state)(params)


def _loop(*, trainer: Trainer, state: TrainState, position: Any, data: "InputPipeline",
          checkpointer: Checkpointer, metrics_logger: MetricsLogger, hash_meta: dict[str, Any],
          config_text: str, settings: Mapping[str, Any], train_steps: int,
          checkpoint_period: int, eval_period: int, eval_batches: int, eval_split: str,
          log_period: int, progress_bar: bool, model_dir: epath.Path, max_loss: Optional[float],
          divergence_factor: Optional[float]) -> TrainResult:
  start_step = int(jax.device_get(state.step))
  step = start_step
  last_train = last_eval = None
  if start_step >= train_steps:
    logger.info("the run is already at step %d (TRAIN_STEPS=%d): nothing to do", start_step,
                train_steps)
    return TrainResult(step=start_step, start_step=start_step, preempted=False, last_train=None,
                       last_eval=None, model_dir=os.fspath(model_dir))
  batches = data.train_batches(position)
  evaluator = Evaluator(trainer, data, split=eval_split, num_batches=eval_batches)
  saved_step = start_step if start_step > 0 else None

  def save():
    nonlocal saved_step
    checkpointer.save(state, data_position=batches.position(), hash_metadata=hash_meta,
                      config_text=config_text, settings=settings)
    saved_step = step

  pending: list[tuple[int, dict]] = []
  window_start, window_tokens = time.perf_counter(), 0.0

  def diverged(s: int, m: Mapping[str, Any]) -> Optional[str]:
    loss, ce, aux = float(m["loss"]), float(m["ce_loss"]), float(m["aux_loss"])
    if not math.isfinite(loss):
      why = f"the training loss is {loss} (cross-entropy {ce}, aux loss {aux})"
    elif max_loss is not None and ce > max_loss:
      why = (f"the cross-entropy {ce:.6g} is above {max_loss:.4g} = train.divergence_factor "
             f"{divergence_factor:g} x ln(vocab size {trainer.config.vocab_size}), far worse than "
             "an untrained model's")
    elif not (_finite(m["grad_norm"]) and _finite(m["update_norm"])):
      why = (f"the update is not finite (gradient norm {float(m['grad_norm'])}, update norm "
             f"{float(m['update_norm'])})")
    else:
      return None
    if saved_step is None:
      kept = "No checkpoint was written yet; nothing was saved."
    else:
      kept = (f"The last good checkpoint is step {saved_step} in {checkpointer.directory}: it is "
              "kept, and nothing after it was saved.")
    return (f"loss diverged at step {s}: {why}. {kept} Lower the learning rate (or raise its "
            "warm-up), or check the data.")

  def flush(log: bool):
    """Checks every pending step for divergence (which stops the run here, before any save) and
    logs the newest one."""
    nonlocal pending, window_start, window_tokens, last_train
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    now = time.perf_counter()
    for (s, _), m in zip(pending, fetched):
      message = diverged(s, m)
      if message:
        raise LossDivergedError(message)
      window_tokens += float(m["tokens"])
    s, m = pending[-1][0], fetched[-1]
    pending = []
    if not log:
      return
    elapsed = max(now - window_start, 1e-9)
    record = {"step": s, "loss": float(m["loss"]), "ce_loss": float(m["ce_loss"]),
              "ppl": _exp(float(m["ce_loss"])),
              "aux_loss": float(m["aux_loss"]), "grad_norm": float(m["grad_norm"]),
              "update_norm": float(m["update_norm"]), "tokens": float(m["tokens"]),
              "tokens_per_s": window_tokens / elapsed, "time": time.time(),
              "moe": _moe_record(m["moe"])}
    metrics_logger.write_train(record)
    last_train = record
    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                    refresh=False)
    window_start, window_tokens = time.perf_counter(), 0.0

  from tqdm import auto as tqdm_auto  # pylint: disable=g-import-not-at-top
  bar = tqdm_auto.tqdm(total=train_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       disable=not progress_bar or jax.process_index() != 0)
  stop_signal = 0
  with _StopSignals() as stop_signals, contextlib.closing(batches), contextlib.closing(bar):
    while step < train_steps:
      local = next(batches)
      batch = trainer.global_batch(local)
      if step == start_step:
        logger.info("compiling the train step for batch shapes %s",
                    {k: v.shape for k, v in local.items()})
        trainer.compile_train_step(state, batch)
        logger.info("compiled; training from step %d to %d", start_step, train_steps)
        window_start = time.perf_counter()
      state, metrics = trainer.train_step(state, batch)
      step += 1
      pending.append((step, metrics))
      bar.update(1)
      last = step == train_steps
      do_eval = eval_period > 0 and eval_batches > 0 and (step % eval_period == 0 or last)
      do_save = step % checkpoint_period == 0 or last
      stop_signal = stop_signals.any_host()
      stop = bool(stop_signal)
      log = step % log_period == 0 or last or stop
      if log or do_eval or do_save:
        # Losses are fetched (a host sync) only here, and always before a checkpoint is written.
        flush(log=log)
      if do_eval:
        last_eval = evaluator.run(state)
        metrics_logger.write_eval(last_eval)
      if do_save or stop:
        save()
      if do_eval or do_save:
        window_start, window_tokens = time.perf_counter(), 0.0
      if stop:
        logger.warning("stopped by %s: checkpoint written at step %d; run the same command again "
                       "to resume", signal.Signals(stop_signal).name, step)
        break
  return TrainResult(step=step, start_step=start_step, preempted=bool(stop_signal),
                     last_train=last_train, last_eval=last_eval, model_dir=os.fspath(model_dir),
                     stop_signal=stop_signal or None)


# --------------------------------------------------------------------------------------------------
# Evaluation.


class Evaluator:
  """Validation perplexity on a fixed set of batches: the first `num_batches` of `split`, read once
  and reused, so every evaluation of a run (and of runs on the same task) sees the same tokens.

  Reports per-token perplexity exp(Σ NLL / Σ target tokens) and, when the task defines words,
  per-word perplexity exp(Σ NLL / number of whitespace words of the decoded targets) (the unit
  the paper's Wikitext-103 word-dictionary results are in), with `tokens_per_word` beside it.

  word_ppl = ppl ** tokens_per_word: the per-token perplexity compounds over the pieces of a word,
  so it is huge wherever the model is still poor and words are split finely. A small BPE spends
  256 of its pieces on bytes (`hashmoe.data.vocab`): cpu_tiny.gin's 512-piece vocabulary of the
  embedded corpus cuts its validation text into 3.6 pieces per word (measured on the first 4
  batches), so an early evaluation at ppl 390 reads word_ppl 390^3.6 = 2.5e9. That is the
  arithmetic, not a bug; word perplexities compare across vocabularies, token ones do not.
  """

  def __init__(self, trainer: Trainer, data: "InputPipeline", *, split: str, num_batches: int):
    self._trainer, self._data = trainer, data
    self.split, self.num_batches = split, num_batches
    self._batches: Optional[list[dict[str, Array]]] = None
    self._words: Optional[int] = None

  def _load(self):
    local = self._data.eval_batches(self.split, self.num_batches)
    if jax.process_count() > 1:
      # Hosts read disjoint shards whose lengths may differ by a batch; every global batch needs
      # all hosts' rows, so all stop at the shortest.
      local = local[:min(_allgather_json(len(local)))]
    if not local:
      raise ValueError(f"the {self.split!r} split gave no batches to evaluate on")
    words = [self._data.count_words(b) for b in local]
    self._words = None if any(w is None for w in words) else int(sum(words))
    if self._words is not None and jax.process_count() > 1:
      self._words = int(sum(_allgather_json(self._words)))
    self._batches = [self._trainer.global_batch(b) for b in local]

  def run(self, state: TrainState) -> dict[str, Any]:
    if self._batches is None:
      self._load()
    totals = [self._trainer.eval_step(state, b) for b in self._batches]
    totals = jax.device_get(totals)
    nll = float(sum(np.float64(t["nll_sum"]) for t in totals))
    tokens = float(sum(np.float64(t["tokens"]) for t in totals))
    record = {"step": int(jax.device_get(state.step)), "split": self.split,
              "batches": len(totals), "tokens": tokens, "nll_sum": nll,
              "loss": nll / max(tokens, 1.0),
              "ppl": _exp(nll / max(tokens, 1.0)),
              "aux_loss": float(np.mean([t["aux_loss"] for t in totals]))}
    if self._words:
      record["words"] = self._words
      record["tokens_per_word"] = tokens / self._words
      record["word_ppl"] = _exp(nll / self._words)
    if not _finite(record["loss"]):
      warnings.warn(f"evaluation loss at step {record['step']} is {record['loss']}",
                    RuntimeWarning)
    return record


@gin.configurable(module="hashmoe.train")
def evaluate(*,
             model_dir: str = gin.REQUIRED,
             model_config: models.TransformerConfig = gin.REQUIRED,
             task: str = gin.REQUIRED,
             batch_size: int = gin.REQUIRED,
             seq_len: int = gin.REQUIRED,
             checkpoint: Optional[str] = None,
             step: Optional[int] = None,
             split: str = "validation",
             eval_batches: int = 20,
             seed: int = 0,
             mesh: Optional[Mesh] = None,
             output_file: Optional[str] = None,
             input_pipeline: Optional["InputPipeline"] = None) -> dict[str, Any]:
  """Perplexity of a trained checkpoint on `split` (per token, and per word where defined).

  Args:
    model_dir: the run to evaluate (its newest checkpoint unless `checkpoint`/`step` say otherwise).
    checkpoint: a checkpoint folder to read instead of MODEL_DIR's.
    step: which step to evaluate (default: the newest).
    mesh: the device mesh to evaluate on (default `sharding.make_mesh()`: all devices on "data").
      It need not be the mesh the checkpoint was written on: every array is read straight into
      this mesh's shardings, so a checkpoint of 8 devices evaluates on 1 or 4.
    output_file: also write the record as JSON here.
    (the rest as in `train`)

  Returns:
    The eval record: step, split, tokens, nll_sum, loss, ppl (and words, tokens_per_word,
    word_ppl = ppl ** tokens_per_word; see `Evaluator`), the checkpoint and the mesh ({axis:
    size}) it was evaluated on.
  """
  data = input_pipeline or TaskPipeline(task, batch_size=batch_size, seq_len=seq_len, seed=seed)
  mesh = sharding.make_mesh() if mesh is None else mesh
  trainer = Trainer(model_config, models.build_model(model_config), optax.identity(), mesh,
                    seed=seed)
  source = checkpoint or model_dir
  logger.info("evaluating %s on mesh %s", source, dict(mesh.shape))
  params, constants, meta, restored_step = restore_params(source, trainer.abstract_state, step)
  verify_hash_tables(constants, meta, vocab_size=data.vocab_size,
                     vocab_fingerprint=data.vocab_fingerprint,
                     where=f"{source} (step {restored_step})")
  state = TrainState(step=jnp.asarray(restored_step, jnp.int32), params=params, opt_state=(),
                     constants=constants)
  record = Evaluator(trainer, data, split=split, num_batches=eval_batches).run(state)
  record["checkpoint"] = os.fspath(source)
  record["mesh"] = {name: int(size) for name, size in mesh.shape.items()}
  if output_file and jax.process_index() == 0:
    epath.Path(output_file).write_text(json.dumps(record, indent=2) + "\n")
  return record


# --------------------------------------------------------------------------------------------------
# Input: the seqio tasks of `hashmoe.data.tasks`.


class InputPipeline(Protocol):
  """What the loop needs from the data (`TaskPipeline` is the real one)."""
  vocab_size: int
  vocab_fingerprint: str

  def train_batches(self, position: Any) -> Iterator[dict[str, np.ndarray]]:
    """This host's training batches from `position` (None: the start); the iterator has a
    `position()` method returning a JSON-serialisable position to resume from."""

  def eval_batches(self, split: str, num_batches: int) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` of `split` for this host (fixed: no shuffling)."""

  def count_words(self, batch: Mapping[str, np.ndarray]) -> Optional[int]:
    """Whitespace words of the batch's decoded targets, or None where the task has no words."""

  def key_counts(self, key: str, key_space: int, *, decoder_inputs: bool = True) -> np.ndarray:
    """int[key_space] occurrences of each key id ('token', 'prev_token' or 'bigram', as
    `hashmoe.data.stats` counts them) over the training split's rows: of the decoder inputs
    (`decoder_inputs`, what a decoder router hashes) or of the targets."""


@gin.configurable(module="hashmoe.train")
def task_name(name: str = gin.REQUIRED, registered: Sequence[str] = ()) -> str:
  """The task a run trains on, checked against what the task file registered.

  Task gin files bind `registered = @hashmoe.data.tasks.register_tasks()` so that evaluating the
  TASK macro registers the corpus's tasks (training its vocabulary on first use) and picks one.
  """
  if registered and name not in registered:
    raise ValueError(f"task {name!r} is not among the tasks registered by the task config: "
                     f"{list(registered)}")
  return name


def _keep_tensorflow_off_accelerators() -> None:
  """The input pipeline (tf.data under seqio) runs on the host; left alone, TensorFlow would claim
  the GPU's memory that JAX needs (t5x does the same)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow already initialised its devices; nothing left to change.
    pass


class _Batches:
  """A `tasks.BatchIterator` with the `position()` the loop checkpoints."""

  def __init__(self, iterator):
    self._iterator = iterator

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def position(self) -> dict[str, Any]:
    return self._iterator.state()

  def close(self) -> None:
    self._iterator.close()


class TaskPipeline:
  """Batches of a registered seqio task (`hashmoe.data.tasks.get_batches`) for this host.

  Each host reads its own shard of the examples (shard_index = jax.process_index()) in batches of
  batch_size / process_count rows; the position saved in checkpoints is the iterator's state,
  which `tasks.restore_batches` replays exactly.
  """

  def __init__(self, task: str, *, batch_size: int, seq_len: int, seed: int = 0):
    import seqio  # pylint: disable=g-import-not-at-top
    _keep_tensorflow_off_accelerators()
    self._tasks = tasks_lib
    self.task = task
    self.seq_len = seq_len
    self.seed = seed
    self.local_batch_size = batch_size // jax.process_count()
    self._seqio_task = seqio.get_mixture_or_task(task)
    self.vocabulary = self._seqio_task.output_features["targets"].vocabulary
    self.vocab_size = int(self.vocabulary.vocab_size)
    try:
      self.vocab_fingerprint = vocab_lib.vocab_fingerprint(self.vocabulary)
    except TypeError:
      self.vocab_fingerprint = ""
    self.shape = tasks_lib.task_shape(self._seqio_task)

  def _shard(self) -> dict[str, int]:
    return {"shard_index": jax.process_index(), "num_shards": jax.process_count()}

  def train_batches(self, position: Any) -> _Batches:
    if position is None:
      iterator = self._tasks.get_batches(self.task, "train", batch_size=self.local_batch_size,
                                         seq_len=self.seq_len, seed=self.seed, **self._shard())
    else:
      iterator = self._tasks.restore_batches(position)
      expected = {"task_name": self.task, "batch_size": self.local_batch_size,
                  "seq_len": self.seq_len, **self._shard()}
      saved = {k: position["arguments"].get(k) for k in expected}
      if saved != expected:
        raise CheckpointError(f"the checkpoint's data position was saved for {saved}, this run "
                              f"reads {expected}; resume with the original settings")
    return _Batches(iterator)

  def eval_batches(self, split: str, num_batches: int) -> list[dict[str, np.ndarray]]:
    iterator = self._tasks.get_batches(self.task, split, batch_size=self.local_batch_size,
                                       seq_len=self.seq_len, shuffle=False, repeat=False,
                                       drop_remainder=False, seed=self.seed, **self._shard())
    with iterator:
      return list(itertools.islice(iterator, num_batches))

  def count_words(self, batch: Mapping[str, np.ndarray]) -> Optional[int]:
    targets = np.asarray(batch["decoder_target_tokens"])
    weights = np.asarray(batch.get("decoder_loss_weights", targets > 0)) > 0
    segments = batch.get("decoder_segment_ids")
    special = {0, self.vocabulary.eos_id}
    words = 0
    for row in range(targets.shape[0]):
      ids, keep = targets[row], weights[row]
      seg = np.asarray(segments[row]) if segments is not None else np.where(keep, 1, 0)
      for s in np.unique(seg[keep]):
        piece = [int(t) for t in ids[(seg == s) & keep] if int(t) not in special]
        if piece:
          words += len(self.vocabulary.decode(piece).split())
    return words

  def key_counts(self, key: str, key_space: int, *, decoder_inputs: bool = True) -> np.ndarray:
    # Counted on the decoder side, where the paper's sparse layer sits, over rows of SEQ_LEN as
    # training cuts them; cached by hashmoe.data.stats under the task's data identity. Every host
    # reads the whole split here (counting is cheap next to training), so all hosts build the
    # same table.
    counts = stats_lib.count_tokens(self.task, split="train", key=key, key_space=key_space,
                                    sequence_length=self.seq_len, decoder_inputs=decoder_inputs)
    if counts.num_tokens == 0:
      raise ValueError(f"task {self.task!r}: the training split has no tokens to count")
    return counts.counts


# --------------------------------------------------------------------------------------------------
# `hashmoe build-hash`.


@gin.configurable(module="hashmoe.train")
def hash_table_inputs(*, model_config: models.TransformerConfig = gin.REQUIRED,
                      task: str = gin.REQUIRED, seq_len: int = gin.REQUIRED,
                      batch_size: int = gin.REQUIRED) -> tuple[models.TransformerConfig, str,
                                                               int, int]:
  """The model and task whose hash tables `build_hash_files` builds (bound from the run's
  MODEL_CONFIG, TASK, SEQ_LEN and BATCH_SIZE macros by the CLI)."""
  return model_config, task, seq_len, batch_size


def token_embeddings(run: PathLike, step: Optional[int] = None) -> np.ndarray:
  """float32[vocab, d] token embedding matrix of a trained run (for clustered/dispersed tables).

  Reads only that one array, so the run's model need not match the current one (the paper
  clusters a dense baseline's embeddings to route a sparse model).

  Args:
    run: a MODEL_DIR, its checkpoints/ folder, or one step folder.
    step: the step to read (default: the newest).
  """
  path = epath.Path(run)
  if (path / CHECKPOINT_SUBDIR).is_dir():
    path = path / CHECKPOINT_SUBDIR
  if not (path.name.isdigit() and (path / "state").is_dir()):
    manager = ocp.CheckpointManager(path, item_names=Checkpointer.ITEMS,
                                    options=ocp.CheckpointManagerOptions(create=False))
    step = manager.latest_step() if step is None else step
    manager.close()
    if step is None:
      raise CheckpointError(f"{run}: no checkpoint found")
    path = path / str(step)
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


def build_hash_files(*, kind: str, output: PathLike, seed: int = 0,
                     embeddings_from: Optional[PathLike] = None, kmeans_iters: int = 20,
                     input_pipeline: Optional[InputPipeline] = None) -> list[str]:
  """Builds the hash tables of the gin-configured model and writes them as HashTable files.

  balanced / balanced_topk count the hash key over the task's training split
  (`hashmoe.data.stats.count_tokens`); clustered and dispersed run k-means on `embeddings_from`'s
  token embeddings (a trained baseline), dispersed also using the counts. Training loads the
  files through `train.hash_tables = 'OUTPUT'`.

  Returns:
    The paths written: `output`, or MultiHash's N files (`stats.hash_table_paths`).
  """
  config, task, seq_len, batch_size = hash_table_inputs()
  data = input_pipeline or TaskPipeline(task, batch_size=batch_size, seq_len=seq_len, seed=seed)
  if config.vocab_size != data.vocab_size:
    raise ValueError(f"the model has vocab_size={config.vocab_size}, task {task!r} has "
                     f"{data.vocab_size}")
  if not _hash_layers(config):
    raise ValueError(f"the configured model has no hash layers (sparse={config.sparse}); pass a "
                     "hash model's gin file")
  embeddings = None
  if kind in ("clustered", "dispersed"):
    if embeddings_from is None:
      raise ValueError(f"kind={kind!r} clusters a trained model's token embeddings: pass "
                       "--embeddings_from=MODEL_DIR of a trained (dense baseline) run")
    embeddings = token_embeddings(embeddings_from)
    if embeddings.shape[0] != hash_key_space(config):
      raise ValueError(f"{embeddings_from}: embeddings cover {embeddings.shape[0]} tokens, the "
                       f"hash key space is {hash_key_space(config)}")
  key = config.sparse.router.key
  tables = make_hash_tables(
      config, kind, out_path=output, seed=seed, vocab_fingerprint=data.vocab_fingerprint,
      key_counts=lambda: data.key_counts(counted_key(key), hash_key_space(config),
                                         decoder_inputs=counts_decoder_inputs(key)),
      embeddings=embeddings, kmeans_iters=kmeans_iters)
  return [os.fspath(p) for p in stats_lib.hash_table_paths(output, len(tables))]
