"""What a t5x run takes from hashmoe's data: the task it reads, the task's vocabulary, the feature
converter, whether its input position is checkpointed, and the hash layers' tables.

All are called from gin while t5x starts (configs/t5x/runs/pretrain.gin, configs/t5x/models/lm.gin,
seq2seq.gin):

  MIXTURE_OR_TASK_NAME = @hm_data.training_task()          # TASK streamed, or its prepared rows
  hm_data.task_vocabulary.task = %MIXTURE_OR_TASK_NAME     # the model's (input/output) vocabulary
  feature_converter_cls = @hm_data.feature_converter_cls() # the model's converter for that task
  utils.SaveCheckpointConfig.save_dataset = @hm_data.dataset_checkpointable()
  hm_data.hash_tables.tables = 'balanced'                  # set by the hash model files

The task names come from `hashmoe.data.tasks.register_tasks`, which hashmoe's task gin files call
when they evaluate the TASK macro (configs/tasks/*.gin). With DATA_SOURCE = 'prepared' the run reads
`<TASK>_prepared_len<SEQ_LEN>` instead: the rows `hashmoe prepare --tfrecord` wrote, through a
pass-through converter, with t5x checkpointing its tf.data iterator (`hashmoe.data.prepared_tf`), so
a restarted run continues with the batches an uninterrupted one would have read.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np
import seqio
from etils import epath

from hashmoe import hashing, models
from hashmoe import tables as tables_lib
from hashmoe.data import pipeline as pipeline_lib
from hashmoe.data import prepared_tf
from hashmoe.data import vocab as vocab_lib
from hashmoe.training.errors import PreparedMismatchError

TableSpec = Union[None, str, Sequence[str], Mapping[str, Any]]

DATA_SOURCES = ("streaming", "prepared")
# What MODEL_DIR's checkpoints were trained on (`training_task`), beside t5x's own files.
DATA_FILE = "hashmoe_t5x_data.json"


def training_task(task: str, *, data_source: str = "streaming", seq_len: Optional[int] = None,
                  prepared_dir: Any = None, model_dir: Optional[str] = None) -> str:
  """MIXTURE_OR_TASK_NAME of a t5x run: `task` itself ('streaming'), or the seqio task over its
  rows prepared at `seq_len` under `prepared_dir` ('prepared': `prepared_tf.register_prepared_task`,
  whose TFRecord copies `hashmoe prepare --tfrecord` writes).

  With `model_dir`, what the run reads is recorded there (DATA_FILE) and a later run on the same
  MODEL_DIR must read the same: t5x restores a prepared run's tf.data iterator (its position in the
  TFRecord files) only onto the same files, and a streaming run's checkpoints hold no position.

  Raises:
    ValueError: an unknown DATA_SOURCE ('auto', hashmoe trainer's choice at start-up, is refused:
      whether t5x checkpoints hold an input position must not change between restarts).
    PreparedMismatchError: MODEL_DIR's checkpoints were trained on other data than this run reads
      (the other source, or a folder prepared again since), or the prepared folder was made for
      another run.
    PreparedDataError: no prepared rows or no complete TFRecord copy of them (`prepared_tf`).
  """
  if data_source not in DATA_SOURCES:
    why = (": t5x must know at start-up whether its checkpoints hold the input position, so "
           "choose 'prepared' (after `hashmoe prepare --tfrecord`) or 'streaming'"
           if data_source == "auto" else "")
    raise ValueError(f"DATA_SOURCE={data_source!r}; expected one of {DATA_SOURCES}{why}")
  if data_source == "streaming":
    name, identity = task, {"data_source": data_source, "task": task}
  else:
    if not isinstance(seq_len, int) or isinstance(seq_len, bool):
      raise ValueError(f"DATA_SOURCE='prepared' needs SEQ_LEN, the length the rows were prepared "
                       f"at; got {seq_len!r}")
    name = prepared_tf.register_prepared_task(task, seq_len=seq_len, root=prepared_dir)
    info = prepared_tf.prepared_task_info(name)
    identity = {"data_source": data_source, "task": name, "manifest": info.manifest,
                "tfrecord": info.copies}
  if model_dir:
    _check_model_dir_data(epath.Path(model_dir), identity)
  return name


def _has_checkpoints(model_dir: epath.Path) -> bool:
  return model_dir.exists() and any(p.name.startswith("checkpoint_") and p.is_dir()
                                    for p in model_dir.iterdir())


def _check_model_dir_data(model_dir: epath.Path, identity: Mapping[str, str]) -> None:
  """Refuses a run whose data differs from what MODEL_DIR's checkpoints were trained on; records
  the data (process 0) when MODEL_DIR has none recorded or no checkpoint yet."""
  path = model_dir / DATA_FILE
  try:
    found = json.loads(path.read_text()) if path.exists() else None
  except ValueError:
    found = None
  checkpoints = _has_checkpoints(model_dir)
  if checkpoints and found is None and identity["data_source"] != "streaming":
    # Checkpoints from before this record existed: streaming was the only source then.
    found = {"data_source": "streaming"}
  if checkpoints and found is not None and dict(found) != dict(identity):
    differences = "; ".join(f"{key}: {found.get(key)!r} in MODEL_DIR, {identity.get(key)!r} now"
                            for key in sorted(set(found) | set(identity))
                            if found.get(key) != identity.get(key))
    raise PreparedMismatchError(
        f"{model_dir}'s checkpoints were trained on other data than this run reads "
        f"({differences}). t5x restores a prepared run's input position only onto the same "
        "TFRecord files, and a streaming run's checkpoints hold none: resume with the "
        "DATA_SOURCE, task and prepared folder the run started with, or start a new MODEL_DIR")
  if found != dict(identity) and jax.process_index() == 0:
    model_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dict(identity), indent=1, sort_keys=True) + "\n"
    if "://" in os.fspath(path):
      path.write_text(text)  # One object write: atomic on a bucket.
    else:
      tmp = model_dir / f".{DATA_FILE}.tmp-{os.getpid()}"
      tmp.write_text(text)
      os.replace(tmp, path)


def feature_converter_cls(task: str) -> type[seqio.FeatureConverter]:
  """The feature converter class of a t5x model reading `task` (`train.model`'s
  `feature_converter_cls`; t5x instantiates it with the DatasetConfig's `pack`): a prepared task's
  rows pass through unchanged (checked), other tasks get their shape's training converter."""
  return prepared_tf.feature_converter_cls(task)


def dataset_checkpointable(task: str) -> bool:
  """Whether t5x can checkpoint `task`'s tf.data iterator (`SaveCheckpointConfig.save_dataset`):
  True for a prepared task (files), False for a streaming one (a Python generator, which tf.data
  cannot save)."""
  return prepared_tf.prepared_task_info(task) is not None


def task_vocabulary(task: str, feature: str = "targets") -> seqio.Vocabulary:
  """The vocabulary of `feature` ("targets" or "inputs") of the registered seqio task `task`.

  t5x checks that the model's vocabularies equal the task's (`utils.verify_matching_vocabs`);
  taking them from the task makes that hold by construction. A prepared task's are its source
  task's (the prepared task's token features carry them).
  """
  task = prepared_tf.source_task(task)
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
      they must match (a prepared task's source task: the same rows, counted streaming).
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
    task = prepared_tf.source_task(task)
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
