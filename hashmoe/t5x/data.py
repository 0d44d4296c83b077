"""What a t5x run takes from hashmoe's data: a task's vocabulary and the hash layers' tables.

Both are called from gin while t5x builds its model (configs/t5x/models/lm.gin, seq2seq.gin):

  hm_data.task_vocabulary.task = %MIXTURE_OR_TASK_NAME     # the model's (input/output) vocabulary
  hm_data.hash_tables.tables = 'balanced'                  # set by the hash model files

The task names come from `hashmoe.data.tasks.register_tasks`, which hashmoe's task gin files call
when they evaluate the TASK macro (configs/tasks/*.gin); t5x reads `MIXTURE_OR_TASK_NAME = %TASK`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import seqio

from hashmoe import hashing, models
from hashmoe import tables as tables_lib
from hashmoe.data import pipeline as pipeline_lib
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
  if not tables_lib.hash_layer_names(config):
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
  if (tables_lib.is_table_kind(tables) and tables not in tables_lib.EMBEDDING_KINDS
      and task is None):
    raise ValueError(f"building {tables!r} tables needs the task whose training split they "
                     "balance; bind hash_tables.task")

  def key_counts(key: str, key_space: int, *, decoder_inputs: bool) -> np.ndarray:
    return pipeline_lib.train_key_counts(task, key, key_space, sequence_length=sequence_length,
                                         decoder_inputs=decoder_inputs)

  built, _ = tables_lib.resolve_hash_tables(
      tables, config, key_counts=key_counts, vocab_fingerprint=fingerprint or "", seed=seed,
      model_dir=model_dir, binding="hash_tables.tables")
  return built
