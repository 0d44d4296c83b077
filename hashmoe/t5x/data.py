"""What a t5x run takes from hashmoe's data: a task's vocabulary and the hash layers' tables.

Both are called from gin while t5x builds its model (configs/t5x/models/lm.gin, seq2seq.gin):

  hm_data.task_vocabulary.task = %MIXTURE_OR_TASK_NAME     # the model's (input/output) vocabulary
  hm_data.hash_tables.tables = 'balanced'                  # set by the hash model files

The task names come from `hashmoe.data.tasks.register_tasks`, which hashmoe's task gin files call
when they evaluate the TASK macro (configs/tasks/*.gin); t5x reads `MIXTURE_OR_TASK_NAME = %TASK`.
"""
from __future__ import annotations

import tempfile
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np
import seqio
from etils import epath

from hashmoe import hashing, models
from hashmoe import train as train_lib
from hashmoe.data import stats as stats_lib
from hashmoe.data import vocab as vocab_lib

TableSpec = Union[None, str, Sequence[str], Mapping[str, Any]]


def task_vocabulary(task: str, feature: str = "targets") -> seqio.Vocabulary:
  """The vocabulary of `feature` ("targets" or "inputs") of the registered seqio task `task`.

  t5x checks that the model's vocabularies equal the task's (`utils.verify_matching_vocabs`);
  taking them from the task makes that hold by construction.
  """
  try:
    mixture_or_task = seqio.get_mixture_or_task(task)
  except ValueError as e:
    raise ValueError(f"task {task!r} is not registered; a hashmoe task gin file (configs/tasks/) "
                     "registers its tasks when the TASK macro is evaluated") from e
  features = mixture_or_task.output_features
  if feature not in features:
    raise ValueError(f"task {task!r} has features {sorted(features)}, not {feature!r}")
  return features[feature].vocabulary


def _hash_layers(config: models.TransformerConfig) -> list[str]:
  s = config.sparse
  if s is None or not s.router.uses_tables:
    return []
  return [f"encoder_{i}" for i in s.encoder_layers] + [f"decoder_{i}" for i in s.layers]


def hash_tables(config: models.TransformerConfig, *, task: Optional[str] = None,
                tables: TableSpec = None, model_dir: Optional[str] = None, seed: int = 0,
                sequence_length: Optional[int] = None
                ) -> Optional[dict[str, tuple[hashing.HashTable, ...]]]:
  """The tables the hash layers of `config` are initialised with (`hashmoe_module.hash_tables`).

  They only matter for a fresh run: the tables live in the model's "hash_tables" collection, which
  t5x carries as `flax_mutables` and saves in every checkpoint, so a restored run uses the
  checkpoint's tables whatever this returns.

  Args:
    config: the model.
    task: the registered seqio task whose training split balances the tables and whose vocabulary
      they must match.
    tables: None (the routers' own seeded random tables: `routers.Hash.seed`); a kind
      ("random", "balanced", or `hashing.TOPK_KIND` for hash_topk), built now from the task's
      training-split key counts (`hashmoe.data.stats.count_tokens`, cached) as hashmoe's trainer
      does; or files written by `hashmoe build-hash` (a path, a list of paths, or
      {layer or "default": paths}), checked against the model and the task's vocabulary.
    model_dir: where built tables are written (`MODEL_DIR/hash_tables/<kind>.npz`, process 0 only).
    seed: seed of built tables.
    sequence_length: the target length of the rows trained on; built tables are then balanced on
      the decoder inputs of those rows (what the routers hash, the shifted-in start id included).
      None counts whole examples.

  Returns:
    {layer name or "default": tables} for `hashmoe.models.build_model`, or None when the model
    has no hash layers or `tables` is None.
  """
  if not _hash_layers(config):
    return None  # Dense and Switch models: a table kind bound by a shared file is moot.
  if tables is None:
    return None
  fingerprint = None
  if task is not None:
    vocabulary = task_vocabulary(task)
    if vocabulary.vocab_size > config.vocab_size:
      raise ValueError(f"task {task!r} has a vocabulary of {vocabulary.vocab_size} ids, the model "
                       f"only vocab_size={config.vocab_size}")
    try:
      fingerprint = vocab_lib.vocab_fingerprint(vocabulary)
    except TypeError:
      # A vocabulary hashmoe cannot fingerprint (not SentencePiece or hashmoe's word vocabulary):
      # the tables are then checked against the key space only, as hashmoe.data.stats does.
      fingerprint = None
  if isinstance(tables, str) and tables in hashing.TABLE_KINDS + (hashing.TOPK_KIND,):
    if tables in ("clustered", "dispersed"):
      raise ValueError(f"{tables!r} tables cluster a trained model's token embeddings: build them "
                       f"with `hashmoe build-hash --kind={tables} --embeddings_from=...` and pass "
                       "the file")
    if task is None:
      raise ValueError(f"building {tables!r} tables needs the task whose training split they "
                       "balance; bind hash_tables.task")
    key_space = train_lib.hash_key_space(config)
    key = train_lib.counted_key(config.sparse.router.key)

    def key_counts() -> np.ndarray:
      counts = stats_lib.count_tokens(
          task, split="train", key=key, key_space=key_space, sequence_length=sequence_length,
          decoder_inputs=train_lib.counts_decoder_inputs(config.sparse.router.key))
      if counts.num_tokens == 0:
        raise ValueError(f"task {task!r}: the training split has no tokens to count")
      return counts.counts

    with tempfile.TemporaryDirectory() as scratch:
      # Every host builds the same tables (same counts, same seed); process 0 keeps the files.
      keep = model_dir is not None and jax.process_index() == 0
      folder = epath.Path(model_dir) / train_lib.HASH_TABLE_SUBDIR if keep else epath.Path(scratch)
      built = train_lib.make_hash_tables(config, tables, out_path=folder / f"{tables}.npz",
                                         key_counts=key_counts, seed=seed,
                                         vocab_fingerprint=fingerprint or "")
    return {"default": built}
  loaded = train_lib.load_hash_table_files(tables, config, vocab_fingerprint=fingerprint)
  missing = [n for n in _hash_layers(config) if n not in loaded and "default" not in loaded]
  if missing:
    raise ValueError(f"hash_tables has no tables for hash layers {missing} (given: "
                     f"{sorted(loaded)}); add them or a 'default' entry")
  return {layer: tuple(table for table, _ in group) for layer, group in loaded.items()}
