"""Hash tables' whole life: which layers need which tables and counts, build, load, verify.

Hash tables are data, not code (Roller et al. 2021, Section 3.1): a table maps every key id of a
hash layer's key space to its expert(s). A run gets its tables from `train.hash_tables` (a kind
built at the start from the training split's key counts, or files of `hashmoe build-hash`,
`resolve_hash_tables`); they live in the model's non-trainable "hash_tables" collection, are
described in every checkpoint (`hash_table_metadata`: kind, experts, seed, sha256, vocabulary
fingerprint) and verified on restore (`verify_hash_tables`). The t5x adapter (`hashmoe.t5x.data`)
and the comparison take their tables from here too.

Which layers are hash layers, and how many tables each needs, is decided in one place
(`hash_layer_names`, `tables_per_layer`); the counts that balance a table (`counted_key`,
`counts_decoder_inputs`) and the files' names (`hashmoe.data.stats.hash_table_paths`) likewise.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import gin
import jax
import numpy as np
from etils import epath

from hashmoe import hashing, models
from hashmoe.data import pipeline as pipeline_lib
from hashmoe.data import stats as stats_lib
from hashmoe.training import checkpoints
from hashmoe.training.errors import CheckpointError

PathLike = Union[str, os.PathLike]
PyTree = Any

HASH_TABLES = "hash_tables"  # The model's variable collection that holds the tables.
HASH_TABLE_SUBDIR = "hash_tables"  # Where a run keeps the table files it built (under MODEL_DIR).
# Kinds that cluster a trained model's token embeddings: built offline by `hashmoe build-hash`.
EMBEDDING_KINDS = ("clustered", "dispersed")


# --------------------------------------------------------------------------------------------------
# Which layers need which tables.


def hash_layer_names(config: models.TransformerConfig) -> list[str]:
  """The layers ("encoder_0", "decoder_6", ...) whose router looks experts up in hash tables
  (`router.uses_tables`); [] for a dense model and for learned routers."""
  s = config.sparse
  if s is None or not s.router.uses_tables:
    return []
  return [f"encoder_{i}" for i in s.encoder_layers] + [f"decoder_{i}" for i in s.layers]


def tables_per_layer(config: models.TransformerConfig) -> int:
  """Tables each hash layer holds (`router.num_tables`): MultiHash's num_hashes for
  `routers.Hash`, one (of topk experts per key) for `routers.HashTopK`."""
  return config.sparse.router.num_tables


def default_table_kind(config: models.TransformerConfig) -> str:
  """The kind a run builds when `train.hash_tables` is None (`router.default_table_kind`):
  "random" for `routers.Hash`, a balanced top-k table (`hashing.TOPK_KIND`) for
  `routers.HashTopK`."""
  return config.sparse.router.default_table_kind


def is_table_kind(spec: Any) -> bool:
  """Whether a `train.hash_tables` value names a kind to build (rather than table files)."""
  return isinstance(spec, str) and spec in hashing.TABLE_KINDS + hashing.TOPK_KINDS


def hash_key_space(config: models.TransformerConfig) -> int:
  """Rows of the config's hash tables (`hashing.key_space_size` of its hash key)."""
  return config.sparse.router.table_key_space(config.vocab_size, config.max_len)


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


# --------------------------------------------------------------------------------------------------
# Build and load.


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
  if not hash_layer_names(config):
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
      kind, counts, num_experts=s.num_experts, out_path=out_path,
      num_hashes=tables_per_layer(config),
      k=s.router.experts_per_token if kind in hashing.TOPK_KINDS else None,
      embeddings=embeddings, seed=seed, vocab_fingerprint=vocab_fingerprint or None,
      kmeans_iters=kmeans_iters)


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
  needed = tables_per_layer(config)
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


# --------------------------------------------------------------------------------------------------
# Describe and verify (what a checkpoint records about its tables).


def table_description(table: hashing.HashTable, source: str) -> dict[str, Any]:
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
# A run's tables.


def resolve_hash_tables(spec: Any, config: models.TransformerConfig, *,
                        key_counts: Callable[..., np.ndarray], vocab_fingerprint: str, seed: int,
                        model_dir: Optional[PathLike], binding: str = "train.hash_tables"
                        ) -> tuple[dict[str, tuple], dict[str, list[dict]]]:
  """Tables for a fresh run and their descriptions, from a run's table spec (`train.hash_tables`,
  t5x's `hash_tables.tables`):

    None                      the router's `default_table_kind`: random tables (routers.Hash), a
                              balanced top-k table (routers.HashTopK);
    a kind ("balanced", ...)  built now from the training split's key counts;
    paths / {layer: paths}    files written by `hashmoe build-hash`.

  Args:
    spec: the spec.
    config: the model.
    key_counts: `InputPipeline.key_counts(key, key_space, decoder_inputs=...)`: the training
      split's counts of a `hashmoe.data.stats` key; called only for the kinds that need them.
    vocab_fingerprint: the task vocabulary's ("" when unknown); tables record it, files must match.
    seed: seed of built tables.
    model_dir: built tables are written to `model_dir/hash_tables/<kind>.npz` by process 0 (None:
      kept nowhere).
    binding: the gin binding that gave `spec`, for messages.

  Returns:
    ({layer or "default": tables} for `hashmoe.models.build_model`, {hash layer: descriptions}).
  """
  layers = hash_layer_names(config)
  if not layers:
    if spec is not None and not is_table_kind(spec):
      raise ValueError(f"{binding}={spec!r} was given, but the model has no hash layers "
                       f"(sparse={config.sparse})")
    # A table kind left bound by a hash model file is moot for a model without hash layers.
    return {}, {}
  if spec is None:
    spec = default_table_kind(config)
  if is_table_kind(spec):
    if spec in EMBEDDING_KINDS:
      raise ValueError(
          f"{spec!r} tables cluster a trained model's token embeddings: build them once with "
          f"`hashmoe build-hash --kind={spec} --embeddings_from=BASELINE_MODEL_DIR ...` and pass "
          f"the file as {binding}")
    key = config.sparse.router.key
    counts = lambda: key_counts(counted_key(key), hash_key_space(config),
                                decoder_inputs=counts_decoder_inputs(key))
    with tempfile.TemporaryDirectory() as scratch:
      # Every host builds the same tables (same counts, same seed); process 0 keeps the files.
      keep = model_dir is not None and jax.process_index() == 0
      folder = epath.Path(model_dir) / HASH_TABLE_SUBDIR if keep else epath.Path(scratch)
      out = folder / f"{spec}.npz"
      built = make_hash_tables(config, spec, out_path=out, key_counts=counts, seed=seed,
                               vocab_fingerprint=vocab_fingerprint)
    paths = stats_lib.hash_table_paths(out, len(built))
    return {"default": built}, {
        name: [table_description(t, f"built at the start of training: {os.fspath(p)}")
               for t, p in zip(built, paths)] for name in layers}
  loaded = load_hash_table_files(spec, config, vocab_fingerprint=vocab_fingerprint)
  missing = [n for n in layers if n not in loaded and "default" not in loaded]
  if missing:
    raise ValueError(f"{binding} has no tables for hash layers {missing} (given: "
                     f"{sorted(loaded)}); add them or a 'default' entry")
  descriptions = {name: [table_description(t, path) for t, path in
                         loaded.get(name, loaded.get("default"))] for name in layers}
  return {k: tuple(t for t, _ in v) for k, v in loaded.items()}, descriptions


def check_same_tables(spec: Any, config: models.TransformerConfig, hash_meta: Mapping[str, Any],
                      *, vocab_fingerprint: str) -> None:
  """A resumed run keeps its checkpoint's tables; table files given again must be those."""
  loaded = load_hash_table_files(spec, config, vocab_fingerprint=vocab_fingerprint)
  recorded = {d["sha256"] for layer in hash_meta.get("layers", {}).values() for d in layer}
  for name, group in loaded.items():
    for table, _ in group:
      digest = hashlib.sha256(table.table.tobytes()).hexdigest()
      if digest not in recorded:
        raise CheckpointError(
            f"train.hash_tables[{name!r}] holds a table (sha256 {digest}) that the checkpoint "
            "being resumed was not trained with; remove the binding to resume, or start a new "
            "MODEL_DIR")


# --------------------------------------------------------------------------------------------------
# `hashmoe build-hash`.


# The gin name `hashmoe.train.hash_table_inputs` is public API (the CLI binds it); it keeps the
# module it had before the tables left the trainer.


@gin.configurable(module="hashmoe.train")
def hash_table_inputs(*, model_config: models.TransformerConfig = gin.REQUIRED,
                      task: str = gin.REQUIRED, seq_len: int = gin.REQUIRED,
                      batch_size: int = gin.REQUIRED) -> tuple[models.TransformerConfig, str,
                                                               int, int]:
  """The model and task whose hash tables `build_hash_files` builds (bound from the run's
  MODEL_CONFIG, TASK, SEQ_LEN and BATCH_SIZE macros by the CLI)."""
  return model_config, task, seq_len, batch_size


def build_hash_files(*, kind: str, output: PathLike, seed: int = 0,
                     embeddings_from: Optional[PathLike] = None, kmeans_iters: int = 20,
                     input_pipeline: Optional[pipeline_lib.InputPipeline] = None) -> list[str]:
  """Builds the hash tables of the gin-configured model and writes them as HashTable files.

  balanced / balanced_topk count the hash key over the task's training split
  (`hashmoe.data.stats.count_tokens`); clustered and dispersed run k-means on `embeddings_from`'s
  token embeddings (a trained baseline), dispersed also using the counts. Training loads the
  files through `train.hash_tables = 'OUTPUT'`.

  Returns:
    The paths written: `output`, or MultiHash's N files (`stats.hash_table_paths`).
  """
  config, task, seq_len, batch_size = hash_table_inputs()
  data = input_pipeline or pipeline_lib.TaskPipeline(task, batch_size=batch_size, seq_len=seq_len,
                                                     seed=seed)
  if config.vocab_size != data.vocab_size:
    raise ValueError(f"the model has vocab_size={config.vocab_size}, task {task!r} has "
                     f"{data.vocab_size}")
  if not hash_layer_names(config):
    raise ValueError(f"the configured model has no hash layers (sparse={config.sparse}); pass a "
                     "hash model's gin file")
  embeddings = None
  if kind in EMBEDDING_KINDS:
    if embeddings_from is None:
      raise ValueError(f"kind={kind!r} clusters a trained model's token embeddings: pass "
                       "--embeddings_from=MODEL_DIR of a trained (dense baseline) run")
    embeddings = checkpoints.token_embeddings(embeddings_from)
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
