"""Token statistics of a task's training split, and the hash tables built from them.

The balanced hash (Roller et al. 2021, Sec. 3.1) "greedily assigns the most frequent tokens to the
emptiest buckets" using training-data token frequencies, and Figure 4's load-balance comparison
routes the corpus through each table: both need the count of every token id over the training
split, in the ids the model sees. `count_tokens` streams a registered task's tokenised examples
(tokenize + EOS, before any length trimming or packing) and counts them with `np.bincount` in
chunks of `chunk_tokens` ids, so memory is one chunk plus the int64[vocab] counts whatever the
corpus size. Counts are cached (`.npy` + `.json` metadata) keyed by the task's data identity.

Which ids are counted: the decoder side, feature "targets" by default (the paper's sparse layer
sits in the decoder: layer 7 of 11 for seq2seq, the middle of the LM), EOS included. A decoder's
hash layer, though, routes its *inputs*: the targets shifted right by one within each row segment,
with `DECODER_START_ID` shifted in. `count_tokens(..., sequence_length=L, decoder_inputs=True)`
counts exactly those: the task's preprocessors cut or trim examples to the rows the model trains
on, and each piece is shifted (its last id, usually EOS, is never an input; one start id per piece
is). Counting targets instead leaves the start id, ~1/L of all routed tokens, unseen by the
balanced table, which then puts it on an arbitrary (often the busiest) expert. Keys other than
the current token are supported for tables keyed on them (`hashing.KEYS`): 'prev_token' (the
previous token within each example, `hashing.BOUNDARY_ID` at its start) and 'bigram'
(`hashing.bigram_hash` of (previous, current)), exactly as `hashing.routing_keys` computes them on
a batch.

`build_hash_table` writes any table kind (`hashing.TABLE_KINDS`, MultiHash sets, the top-k table)
to the `.npz` files a run loads with `hashmoe.tables.load_hash_table_files`, carrying the vocabulary
fingerprint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import seqio
import tensorflow as tf

from hashmoe import hash_functions
from hashmoe import hashing
from hashmoe.data import tasks as tasks_lib
from hashmoe.data import vocab as vocab_lib
from hashmoe.data.embedded import default_cache_dir
from hashmoe.data.text_files import PathLike, normalize_split

COUNTED_KEYS = ("token", "prev_token", "bigram")
# The id seqio's feature converters shift into the first decoder input of every packed segment
# (`seqio.utils.make_autoregressive_inputs`, bos_id=0).
DECODER_START_ID = 0
DEFAULT_CHUNK_TOKENS = 1 << 20
# Examples per ragged batch pulled from tf.data: amortises the per-element Python cost.
_EXAMPLES_PER_READ = 1024
_COUNTS_FORMAT = 2


@dataclasses.dataclass(frozen=True)
class TokenCounts:
  """How often each key id occurs in a split.

  Attributes:
    counts: int64[key_space] occurrences of each id.
    vocab_size: the vocabulary size of the ids counted.
    vocab_fingerprint: `vocab_lib.vocab_fingerprint` of that vocabulary ('' if unknown).
    key: 'token', 'prev_token' or 'bigram'.
    task: the task counted ('' when counted from raw arrays).
    split: the split counted.
    features: the task features counted (e.g. ('targets',)).
    num_examples: examples read (pieces of at most `sequence_length` ids when that is set).
    sequence_length: the row length the examples were cut/trimmed to (None: whole examples).
    decoder_inputs: the ids were shifted right as decoder inputs before keying.
  """
  counts: np.ndarray
  vocab_size: int
  vocab_fingerprint: str = ""
  key: str = "token"
  task: str = ""
  split: str = "train"
  features: tuple[str, ...] = ("targets",)
  num_examples: int = 0
  sequence_length: int | None = None
  decoder_inputs: bool = False

  def __post_init__(self):
    counts = np.asarray(self.counts)
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer) or (
        counts.size and counts.min() < 0):
      raise ValueError(f"counts must be non-negative int[key_space], got {counts.dtype}"
                       f"{list(counts.shape)}")
    if self.key not in COUNTED_KEYS:
      raise ValueError(f"key={self.key!r}; expected one of {COUNTED_KEYS}.")
    counts = counts.astype(np.int64)
    counts.flags.writeable = False
    object.__setattr__(self, "counts", counts)
    object.__setattr__(self, "features", tuple(self.features))

  @property
  def num_tokens(self) -> int:
    return int(self.counts.sum())

  def _metadata(self) -> dict[str, Any]:
    return {"format": _COUNTS_FORMAT, "vocab_size": self.vocab_size,
            "vocab_fingerprint": self.vocab_fingerprint, "key": self.key, "task": self.task,
            "split": self.split, "features": list(self.features),
            "num_examples": self.num_examples, "num_tokens": self.num_tokens,
            "key_space": int(self.counts.shape[0]), "sequence_length": self.sequence_length,
            "decoder_inputs": self.decoder_inputs}

  def save(self, path: PathLike) -> tuple[Path, Path]:
    """Writes `<path>.npy` (the counts) and `<path>.json` (the metadata); returns both paths."""
    stem = _stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    npy, meta = stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")
    tmp = npy.with_name(f".{npy.name}.tmp-{os.getpid()}")
    try:
      with open(tmp, "wb") as f:
        np.save(f, self.counts, allow_pickle=False)
      os.replace(tmp, npy)
      # The metadata is written last: its presence marks a complete pair.
      tmp = meta.with_name(f".{meta.name}.tmp-{os.getpid()}")
      tmp.write_text(json.dumps(self._metadata(), indent=1, sort_keys=True))
      os.replace(tmp, meta)
    except BaseException:  # A full disk, Ctrl-C: no half-written temporary stays behind.
      with contextlib.suppress(OSError):
        tmp.unlink()
      raise
    return npy, meta

  @classmethod
  def load(cls, path: PathLike) -> "TokenCounts":
    """Reads what `save` wrote (pass the same path, with or without the suffix)."""
    stem = _stem(path)
    npy, meta = stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")
    try:
      metadata = json.loads(meta.read_text())
      counts = np.load(npy, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"{stem}: no readable token counts (.npy + .json) there ({e}).") from e
    if metadata.get("format") != _COUNTS_FORMAT or counts.shape != (metadata["key_space"],):
      raise ValueError(f"{stem}: counts {counts.shape} do not match their metadata {metadata}.")
    return cls(counts=counts, vocab_size=metadata["vocab_size"],
               vocab_fingerprint=metadata["vocab_fingerprint"], key=metadata["key"],
               task=metadata["task"], split=metadata["split"],
               features=tuple(metadata["features"]), num_examples=metadata["num_examples"],
               sequence_length=metadata["sequence_length"],
               decoder_inputs=metadata["decoder_inputs"])


def _stem(path: PathLike) -> Path:
  path = Path(path)
  return path.with_suffix("") if path.suffix in (".npy", ".json") else path


def decoder_inputs_of(sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Each sequence shifted right by one with `DECODER_START_ID` in front (same length)."""
  return [np.concatenate([[DECODER_START_ID], np.asarray(s, np.int64)[:-1]]) if len(s)
          else np.zeros(0, np.int64) for s in sequences]


def example_keys(sequences: Sequence[np.ndarray], key: str, key_space: int, *,
                 decoder_inputs: bool = False) -> np.ndarray:
  """The key ids of a batch of token sequences, concatenated.

  Args:
    sequences: int[n_i] token ids of each example.
    key: 'token'; 'prev_token' (the previous id within the example, `hashing.BOUNDARY_ID` for
      the first); 'bigram' (`hashing.bigram_hash` of (previous, current) folded into
      `key_space`).
    key_space: the number of key ids (the bigram fold).
    decoder_inputs: key the decoder inputs the sequences become (`decoder_inputs_of`) rather
      than the sequences themselves.

  Returns:
    int[sum n_i] keys, example after example.
  """
  if key not in COUNTED_KEYS:
    raise ValueError(f"key={key!r}; expected one of {COUNTED_KEYS}.")
  if decoder_inputs:
    sequences = decoder_inputs_of(sequences)
  lengths = np.array([len(s) for s in sequences], dtype=np.int64)
  tokens = (np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if len(sequences)
            else np.zeros(0, np.int64))
  if key == "token" or tokens.size == 0:
    return tokens
  starts = np.cumsum(lengths) - lengths
  previous = np.roll(tokens, 1)
  previous[starts[lengths > 0]] = hashing.BOUNDARY_ID
  if key == "prev_token":
    return previous
  return hashing.bigram_hash(previous, tokens, key_space).astype(np.int64)


def count_ids(sequences: Iterable[Sequence[np.ndarray]], key_space: int, *, key: str = "token",
              chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
              decoder_inputs: bool = False) -> tuple[np.ndarray, int]:
  """Streams batches of token sequences and counts their key ids.

  Args:
    sequences: an iterable of batches, each a sequence of int[n_i] token arrays (one per example).
    key_space: ids must be in [0, key_space).
    key: see `example_keys`.
    chunk_tokens: ids buffered before each `np.bincount` (bounds memory).
    decoder_inputs: see `example_keys`.

  Returns:
    (int64[key_space] counts, number of examples).

  Raises:
    ValueError: an id outside [0, key_space).
  """
  if chunk_tokens < 1:
    raise ValueError(f"chunk_tokens={chunk_tokens}; expected >= 1.")
  counts = np.zeros(key_space, dtype=np.int64)
  pending: list[np.ndarray] = []
  pending_size = 0
  examples = 0

  def flush():
    nonlocal pending, pending_size
    if pending:
      ids = np.concatenate(pending)
      if ids.size and (ids.min() < 0 or ids.max() >= key_space):
        bad = ids[(ids < 0) | (ids >= key_space)]
        raise ValueError(f"ids {bad[:5].tolist()} are outside [0, {key_space}): the sequences do "
                         "not belong to this vocabulary.")
      counts[:] += np.bincount(ids, minlength=key_space)
      pending, pending_size = [], 0

  for batch in sequences:
    examples += len(batch)
    ids = example_keys(batch, key, key_space, decoder_inputs=decoder_inputs)
    pending.append(ids)
    pending_size += ids.size
    if pending_size >= chunk_tokens:
      flush()
  flush()
  return counts, examples


def _task_vocabulary(task: seqio.Task, features: Sequence[str]) -> seqio.Vocabulary:
  missing = [f for f in features if f not in task.output_features]
  if missing:
    raise ValueError(f"task {task.name!r} has no feature(s) {missing}; it has "
                     f"{sorted(task.output_features)}.")
  vocabulary = task.output_features[features[0]].vocabulary
  for feature in features[1:]:
    if task.output_features[feature].vocabulary != vocabulary:
      raise ValueError(f"features {list(features)} of task {task.name!r} use different "
                       "vocabularies; count them separately.")
  return vocabulary


def count_tokens(task_name: str, *, split: str = "train", features: str | Sequence[str] =
                 "targets", key: str = "token", key_space: int | None = None,
                 max_examples: int | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 cache_dir: PathLike | None = None, use_cache: bool = True,
                 sequence_length: int | None = None,
                 decoder_inputs: bool = False) -> TokenCounts:
  """Counts the key ids of a registered task's split, streaming, with a cache.

  Args:
    task_name: a registered seqio task.
    split: the split (the training split builds tables).
    features: the feature(s) counted; 'targets' (the decoder side) by default.
    key: 'token', 'prev_token' or 'bigram'.
    key_space: number of key ids; default the vocabulary size (`hashing.key_space_size`'s
      default for every counted key).
    max_examples: stop after this many examples (None: the whole split).
    chunk_tokens: ids per `np.bincount`.
    cache_dir: cache root (`<cache_dir>/token_counts/`); the cache is used only for tasks
      registered with `tasks.register_task`, whose data identity is known.
    use_cache: read and write the cache.
    sequence_length: run the task's preprocessors at this row length, so examples are cut
      (LM) or trimmed (seq2seq) into the pieces training sees; None counts whole examples.
    decoder_inputs: count the pieces as the decoder's inputs (`decoder_inputs_of`): what a
      decoder hash layer routes. Use with `sequence_length`.

  Returns:
    `TokenCounts` with int64[key_space] counts.
  """
  features = (features,) if isinstance(features, str) else tuple(features)
  split = normalize_split(split)
  if max_examples is not None and max_examples < 1:
    raise ValueError(f"max_examples={max_examples}; expected None or >= 1.")
  if sequence_length is not None and sequence_length < 1:
    raise ValueError(f"sequence_length={sequence_length}; expected None or >= 1.")
  task = seqio.get_mixture_or_task(task_name)
  vocabulary = _task_vocabulary(task, features)
  vocab_size = vocabulary.vocab_size
  key_space = vocab_size if key_space is None else int(key_space)
  if key != "bigram" and key_space != vocab_size:
    raise ValueError(f"key_space={key_space} for key {key!r}; token keys use the vocabulary size "
                     f"{vocab_size} (only 'bigram' folds into another key space).")
  fingerprint = vocab_lib.vocab_fingerprint_or_empty(vocabulary)

  data_id = tasks_lib.data_fingerprint(task_name, split)
  cache_path = None
  if use_cache and data_id is not None:
    digest = vocab_lib.cache_key({
        "format": _COUNTS_FORMAT, "data": data_id, "features": list(features), "key": key,
        "key_space": key_space, "max_examples": max_examples,
        "sequence_length": sequence_length, "decoder_inputs": decoder_inputs})
    cache_path = (Path(cache_dir or default_cache_dir()) / "token_counts" /
                  f"{task_name}-{split}-{key}-{digest[:16]}")
    if cache_path.with_name(cache_path.name + ".json").is_file():
      try:
        return TokenCounts.load(cache_path)
      except ValueError:
        pass  # A damaged entry is recounted and rewritten.

  lengths = (None if sequence_length is None else
             {name: int(sequence_length) for name in task.output_features})
  dataset = task.get_dataset(sequence_length=lengths, split=split, shuffle=False, num_epochs=1)
  if max_examples is not None:
    dataset = dataset.take(max_examples)
  dataset = dataset.map(lambda ex: {f: ex[f] for f in features})
  dataset = dataset.ragged_batch(_EXAMPLES_PER_READ)

  def batches():
    for batch in tasks_lib.iterate_dataset(dataset, numpy=False):
      for feature in features:
        ragged = batch[feature]
        if not isinstance(ragged, tf.RaggedTensor):  # A feature of static length is batched dense.
          ragged = tf.RaggedTensor.from_tensor(ragged)
        values, splits = ragged.flat_values.numpy(), ragged.row_splits.numpy()
        yield [values[a:b] for a, b in zip(splits[:-1], splits[1:])]

  stream = batches()
  try:
    counts, examples = count_ids(stream, key_space, key=key, chunk_tokens=chunk_tokens,
                                 decoder_inputs=decoder_inputs)
  finally:
    stream.close()  # Releases tf.data's iterator now, even when counting raised.
  result = TokenCounts(counts=counts, vocab_size=vocab_size, vocab_fingerprint=fingerprint,
                       key=key, task=task_name, split=split, features=features,
                       num_examples=examples // len(features), sequence_length=sequence_length,
                       decoder_inputs=decoder_inputs)
  if cache_path is not None:
    result.save(cache_path)
  return result


# --------------------------------------------------------------------------------------------------
# Hash tables.

TableSource = Union[str, TokenCounts, np.ndarray]


def hash_table_paths(out_path: PathLike, num_hashes: int = 1) -> list[Path]:
  """The file(s) `build_hash_table` writes: `out_path`, or one per hash of a MultiHash set.

  With N > 1 hashes, table m goes to `<stem>.hash<m>of<N>.npz` beside `out_path`.
  """
  out_path = Path(out_path)
  if num_hashes < 1:
    raise ValueError(f"num_hashes={num_hashes}; expected >= 1.")
  if num_hashes == 1:
    return [out_path]
  stem = out_path.with_suffix("") if out_path.suffix == ".npz" else out_path
  return [stem.with_name(f"{stem.name}.hash{m}of{num_hashes}.npz") for m in range(num_hashes)]


def build_hash_table(kind: str, task_or_counts: TableSource, *, num_experts: int,
                     out_path: PathLike, num_hashes: int = 1, k: int | None = None,
                     embeddings: np.ndarray | PathLike | None = None, seed: int = 0,
                     vocab_fingerprint: str | None = None, split: str = "train",
                     key: str = "token", cache_dir: PathLike | None = None,
                     kmeans_iters: int = 20) -> tuple[hashing.HashTable, ...]:
  """Builds a hash table (or a MultiHash set) and writes it where the trainer loads it.

  Args:
    kind: 'random', 'balanced', 'clustered', 'dispersed' (paper Sec. 3.1), or one of
      `hashing.TOPK_KINDS` ('balanced_topk', 'roundrobin_topk', 'random_topk', 'zeros_topk': k
      distinct experts per token; needs `k`).
    task_or_counts: a registered task name (its training split is counted with `count_tokens`,
      and its vocabulary gives the fingerprint), a `TokenCounts`, or int[vocab] counts.
    num_experts: experts per table.
    out_path: the `.npz` file (see `hash_table_paths` for MultiHash).
    num_hashes: N tables for a MultiHash layer (Sec. 3.2), seeds seed..seed+N-1.
    k: experts per token of a top-k table.
    embeddings: float[vocab, d] token embeddings of a trained dense baseline, or a `.npy` file
      holding them (clustered, dispersed).
    seed: the table seed.
    vocab_fingerprint: the vocabulary's fingerprint when `task_or_counts` is a bare array (a task
      or `TokenCounts` carries its own; a different one given here is an error).
    split, key, cache_dir: passed to `count_tokens` for a task name.
    kmeans_iters: Lloyd iterations of clustered/dispersed.

  Returns:
    The tables written, one per hash.
  """
  if isinstance(task_or_counts, str):
    task_or_counts = count_tokens(task_or_counts, split=split, key=key, cache_dir=cache_dir)
  if isinstance(task_or_counts, TokenCounts):
    counts = task_or_counts.counts
    known = task_or_counts.vocab_fingerprint
    if vocab_fingerprint and known and vocab_fingerprint != known:
      raise ValueError(f"vocab_fingerprint={vocab_fingerprint} but the counts were made with "
                       f"vocabulary {known}.")
    fingerprint = known or vocab_fingerprint or ""
  else:
    counts = np.asarray(task_or_counts)
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.number):
      raise ValueError(f"counts must be int[vocab_size], got {counts.dtype}{list(counts.shape)}.")
    fingerprint = vocab_fingerprint or ""
  vocab_size = int(counts.shape[0])
  if isinstance(embeddings, (str, os.PathLike)):
    embeddings = np.load(embeddings, allow_pickle=False)
  if kind in ("clustered", "dispersed") and embeddings is None:
    raise ValueError(f"kind={kind!r} needs embeddings: float[{vocab_size}, d] token embeddings of "
                     "a trained dense baseline (paper Sec. 3.1, Clustered Hashes).")

  if kind in hashing.TOPK_KINDS:
    if num_hashes != 1:
      raise ValueError(f"num_hashes={num_hashes} with kind={kind!r}; a top-k table already holds "
                       "k experts per token: expected num_hashes=1.")
    if k is None:
      raise ValueError(f"kind={kind!r} needs k (experts per token).")
    tables = (hash_functions.build_topk(kind, k, num_experts=num_experts, vocab_size=vocab_size,
                                        token_counts=counts, seed=seed,
                                        vocab_fingerprint=fingerprint),)
  elif kind in hashing.TABLE_KINDS:
    if k is not None:
      raise ValueError(f"k={k} is only for the top-k kinds {hashing.TOPK_KINDS}, not {kind!r}.")
    tables = hash_functions.build_multihash(kind, num_hashes, num_experts=num_experts,
                                     vocab_size=vocab_size, token_counts=counts,
                                     embeddings=embeddings, seed=seed,
                                     vocab_fingerprint=fingerprint, kmeans_iters=kmeans_iters)
  else:
    raise ValueError(
        f"kind={kind!r}; expected one of {hashing.TABLE_KINDS + hashing.TOPK_KINDS}.")

  paths = hash_table_paths(out_path, num_hashes)
  for table, path in zip(tables, paths):
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
  return tables
