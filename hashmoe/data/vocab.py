"""Vocabularies: SentencePiece BPE trained on a corpus, and Wikitext's word-level dictionary.

The paper trains with two kinds of dictionary (Roller et al. 2021, Sec. 5.1; Table 4): small BPE
dictionaries (pushshift.io Reddit's 8008 tokens, an 8k BPE for Wikitext-103) and Wikitext-103's own
267k-word dictionary, on which hash routing loses its edge over Switch. Both are here as
`seqio.Vocabulary` objects, so a seqio Task, the feature converters and the hash tables all see the
same ids.

Id conventions (seqio/T5, what `seqio.SentencePieceVocabulary` and the feature converters assume):
pad = 0, eos = 1, unk = 2, and no BOS (`bos_id = -1` for SentencePiece, None for the word
vocabulary). The decoder's start token is the pad id: seqio shifts targets right inserting
`bos_id=0` (the converters' default), and `hashing.BOUNDARY_ID` is 0 for the same reason.

**SentencePiece BPE** (`train_sentencepiece`). SentencePiece's trainer is fed from a Python
iterator (`sentence_iterator=`), never from a file, so any streaming reader can feed it. The input
is bounded for speed: at most `max_texts_read` texts are read from the stream and a seeded
reservoir sample of `input_sentence_size` of them is what BPE learns from (SentencePiece's own
sampling is switched off, so the sample depends on `seed` alone). Coverage: `byte_fallback=True`
with `character_coverage=0.9995`, so the rarest 0.05% of characters (emoji, CJK in an English
corpus) are spelled as UTF-8 byte pieces `<0x..>` instead of each costing a vocabulary slot or
becoming `<unk>`: no character is ever unknown (the default 'nmt_nfkc' normaliser still folds
compatibility characters and runs of whitespace; 'identity' keeps them). The 256 byte pieces
count towards `vocab_size`.
`"\\n"` is a user-defined piece so that the turn separator of Reddit contexts survives tokenisation
(SentencePiece's normaliser otherwise folds it into a space).

Models are cached under `<cache_dir>/vocab/<name>-<key>/`, where `key` is a sha256 of the corpus
identity (source name plus each file's path, size and mtime, or the embedded sdist's checksum), the
split and every setting: a second call with the same inputs loads the model without reading the
corpus; changing a file or a setting trains a new one. BPE training was checked to give identical
pieces with 1 and 2 threads, so `num_threads` is not part of the key.

**Word level** (`WordVocabulary`, `build_word_vocabulary`): the whitespace tokens of a training
split, most frequent first. For Wikitext-103 (whose rare words are already `<unk>`) this is its
own word dictionary (the paper's 267k-word setting); `<unk>` in the text maps to the unk id.

`vocab_fingerprint(vocab)` identifies a vocabulary by its pieces (`hashing.vocabulary_fingerprint`)
so that a hash table built for it can be checked against it on load.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import itertools
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import gin
import seqio
import sentencepiece
import tensorflow as tf

from hashmoe import hashing
from hashmoe.data.embedded import default_cache_dir
from hashmoe.data.text_files import PathLike

logger = logging.getLogger(__name__)

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
# SentencePiece's default piece names for the three reserved ids.
PAD_PIECE, EOS_PIECE, UNK_PIECE = "<pad>", "</s>", "<unk>"
DEFAULT_VOCAB_SIZE = 8000  # The paper's Reddit dictionary has 8008 tokens (Sec. 5.1).

# Bump when the cached files' layout or the training recipe changes: old caches are then ignored.
_CACHE_FORMAT = 1

Texts = Union[Iterable[str], Callable[[], Iterable[str]]]


# --------------------------------------------------------------------------------------------------
# Cache keys and corpus identity.


def file_identity(paths: Iterable[PathLike]) -> list[dict[str, Any]]:
  """What identifies the contents of `paths` cheaply: resolved path, size and mtime of each.

  A file rewritten in place (new size or mtime) gets a new identity, so anything cached from it
  (a vocabulary, token counts) is rebuilt. Reading and hashing a 80 GB dump would be exact but
  takes minutes; size + mtime is what make and rsync rely on.

  Raises:
    FileNotFoundError: a path does not exist.
  """
  identity = []
  for path in paths:
    path = Path(path)
    stat = path.stat()
    identity.append({"path": str(path.resolve()), "size": stat.st_size,
                     "mtime_ns": stat.st_mtime_ns})
  return identity


def cache_key(payload: Mapping[str, Any]) -> str:
  """sha256 hex digest of `payload` serialised as canonical JSON (sorted keys, no spaces).

  Raises:
    TypeError: `payload` holds something JSON cannot represent.
  """
  text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _entry_dir(cache_dir: PathLike | None, kind: str, name: str, key: str) -> Path:
  if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
    raise ValueError(f"name={name!r}; expected letters, digits, '_', '-' or '.' (it names a "
                     "cache folder).")
  return Path(cache_dir or default_cache_dir()) / kind / f"{name}-{key[:16]}"


def _read_meta(entry: Path, key: str) -> dict[str, Any] | None:
  """The metadata of a complete cache entry with this exact key, else None."""
  try:
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  return meta if meta.get("key") == key and meta.get("format") == _CACHE_FORMAT else None


def _publish(tmp: Path, entry: Path) -> None:
  """Moves a fully written temporary folder into place as `entry` (atomic on one file system).

  If another process published the same entry meanwhile, its copy is kept: both were built from
  the same inputs.
  """
  try:
    os.replace(tmp, entry)
  except OSError:
    if not (entry / "meta.json").is_file():
      shutil.rmtree(entry, ignore_errors=True)
      os.replace(tmp, entry)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _texts(texts: Texts) -> Iterable[str]:
  return texts() if callable(texts) else texts


# --------------------------------------------------------------------------------------------------
# SentencePiece BPE.


@dataclasses.dataclass(frozen=True)
class SentencePieceSettings:
  """Every setting of a SentencePiece model (all of them are part of its cache key).

  Attributes:
    vocab_size: pieces in the model, the 3 reserved ids and the 256 byte pieces included.
    model_type: 'bpe' (the paper's dictionaries are BPE) or 'unigram'.
    character_coverage: share of the sample's characters that get their own piece; the rest are
      spelled with byte pieces (with `byte_fallback`) or become `<unk>`.
    byte_fallback: spell characters outside the vocabulary as UTF-8 byte pieces (no `<unk>` ever).
    normalization_rule_name: SentencePiece's normaliser ('nmt_nfkc', the default of SentencePiece
      and of T5's vocabulary, or 'identity' for exact round trips of any Unicode).
    user_defined_symbols: pieces always kept whole; "\\n" keeps Reddit's turn separator.
    input_sentence_size: size of the seeded reservoir sample that BPE learns from.
    max_texts_read: how many texts are read from the stream to draw the sample (None: the whole
      stream). Bounds the time spent on a huge corpus (pushshift Reddit has billions of comments);
      the sample is then drawn from the stream's first `max_texts_read` texts.
    max_sentence_length: texts longer than this many UTF-8 bytes are skipped by SentencePiece
      (counted in the cache metadata).
    seed: seeds the reservoir sample.
  """
  vocab_size: int = DEFAULT_VOCAB_SIZE
  model_type: Literal["bpe", "unigram"] = "bpe"
  character_coverage: float = 0.9995
  byte_fallback: bool = True
  normalization_rule_name: str = "nmt_nfkc"
  user_defined_symbols: tuple[str, ...] = ("\n",)
  input_sentence_size: int = 1_000_000
  max_texts_read: int | None = 10_000_000
  max_sentence_length: int = 1 << 16
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "user_defined_symbols", tuple(self.user_defined_symbols))
    reserved = 3 + (256 if self.byte_fallback else 0) + len(self.user_defined_symbols)
    if not isinstance(self.vocab_size, int) or self.vocab_size <= reserved:
      raise ValueError(
          f"vocab_size={self.vocab_size!r}; expected an int > {reserved} (3 reserved ids"
          f"{' + 256 byte pieces' if self.byte_fallback else ''} + "
          f"{len(self.user_defined_symbols)} user-defined symbols).")
    if self.model_type not in ("bpe", "unigram"):
      raise ValueError(f"model_type={self.model_type!r}; expected 'bpe' or 'unigram'.")
    if not 0.0 < self.character_coverage <= 1.0:
      raise ValueError(f"character_coverage={self.character_coverage}; expected in (0, 1].")
    if self.input_sentence_size < 1:
      raise ValueError(f"input_sentence_size={self.input_sentence_size}; expected >= 1.")
    if self.max_texts_read is not None and self.max_texts_read < self.input_sentence_size:
      raise ValueError(
          f"max_texts_read={self.max_texts_read} < input_sentence_size="
          f"{self.input_sentence_size}; expected None or at least the sample size.")
    if self.max_sentence_length < 1:
      raise ValueError(f"max_sentence_length={self.max_sentence_length}; expected >= 1.")

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self) | {"user_defined_symbols": list(self.user_defined_symbols)}


def sample_texts(texts: Iterable[str], *, sample_size: int, max_read: int | None = None,
                 seed: int = 0) -> tuple[list[str], int]:
  """A seeded uniform sample of a text stream (reservoir sampling, Algorithm R), in stream order.

  Empty (whitespace-only) texts are skipped and not counted.

  Args:
    texts: the stream; read once, at most `max_read` non-empty texts.
    sample_size: how many texts to keep; all of them if the stream is shorter.
    max_read: stop after this many non-empty texts (None: read to the end).
    seed: seeds `random.Random`; the same stream and seed give the same sample.

  Returns:
    (sample, number of non-empty texts read).
  """
  if sample_size < 1:
    raise ValueError(f"sample_size={sample_size}; expected >= 1.")
  rng = random.Random(seed)
  reservoir: list[tuple[int, str]] = []
  read = 0
  stream = (t for t in texts if t and not t.isspace())
  for read, text in enumerate(itertools.islice(stream, max_read), 1):
    if len(reservoir) < sample_size:
      reservoir.append((read, text))
    else:
      slot = rng.randrange(read)  # Keep the read-th text with probability sample_size / read.
      if slot < sample_size:
        reservoir[slot] = (read, text)
  reservoir.sort()
  return [text for _, text in reservoir], read


def train_sentencepiece(texts: Texts, *, corpus_id: Mapping[str, Any], split: str = "train",
                        settings: SentencePieceSettings = SentencePieceSettings(),
                        cache_dir: PathLike | None = None, name: str = "spm",
                        num_threads: int | None = None) -> seqio.SentencePieceVocabulary:
  """A SentencePiece model trained on `texts`, cached; returned as a seqio vocabulary.

  Args:
    texts: the training split's texts (an iterable, or a function returning one so that nothing is
      read when the model is already cached).
    corpus_id: JSON-serialisable identity of the corpus (see `file_identity`); with `split` and
      `settings` it forms the cache key.
    split: which split `texts` is (part of the key).
    settings: the model's settings.
    cache_dir: cache root, default `hashmoe.data.default_cache_dir()`.
    name: prefix of the cache folder (e.g. the source name).
    num_threads: trainer threads (default: all cores); does not change the result.

  Returns:
    `seqio.SentencePieceVocabulary` over `<entry>/spm.model`: pad 0, eos 1, unk 2, no BOS.

  Raises:
    ValueError: the stream holds no text, or too little for `settings.vocab_size` pieces.
  """
  key = cache_key({"format": _CACHE_FORMAT, "kind": "sentencepiece", "corpus": dict(corpus_id),
                   "split": split, "settings": settings.to_json()})
  entry = _entry_dir(cache_dir, "vocab", name, key)
  model_path = entry / "spm.model"
  if _read_meta(entry, key) is not None and model_path.is_file():
    return seqio.SentencePieceVocabulary(str(model_path))

  sample, read = sample_texts(_texts(texts), sample_size=settings.input_sentence_size,
                              max_read=settings.max_texts_read, seed=settings.seed)
  too_long = sum(len(t.encode("utf-8")) > settings.max_sentence_length for t in sample)
  if len(sample) == too_long:
    raise ValueError(
        f"no text to train SentencePiece on for {name!r} (split {split!r}): the stream held "
        f"{read} non-empty texts, {too_long} of them over max_sentence_length="
        f"{settings.max_sentence_length} bytes.")
  if too_long:
    logger.warning("%d of %d sampled texts exceed max_sentence_length=%d bytes and are skipped.",
                   too_long, len(sample), settings.max_sentence_length)
  model = _train_model(sample, settings, num_threads or os.cpu_count() or 1, name)

  entry.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-"))
  (tmp / "spm.model").write_bytes(model)
  meta = {
      "format": _CACHE_FORMAT, "key": key, "kind": "sentencepiece", "name": name,
      "corpus": dict(corpus_id), "split": split, "settings": settings.to_json(),
      "texts_read": read, "texts_sampled": len(sample), "texts_too_long": too_long,
      "sentencepiece_version": sentencepiece.__version__,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
  }
  (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, ensure_ascii=False))
  _publish(tmp, entry)
  logger.info("Trained a %d-piece SentencePiece model on %d of %d texts: %s",
              settings.vocab_size, len(sample), read, model_path)
  return seqio.SentencePieceVocabulary(str(model_path))


def _train_model(sample: list[str], settings: SentencePieceSettings, num_threads: int,
                 name: str) -> bytes:
  model = _BytesWriter()
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sample), model_writer=model,
        vocab_size=settings.vocab_size, model_type=settings.model_type,
        character_coverage=settings.character_coverage, byte_fallback=settings.byte_fallback,
        normalization_rule_name=settings.normalization_rule_name,
        user_defined_symbols=list(settings.user_defined_symbols),
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        pad_piece=PAD_PIECE, eos_piece=EOS_PIECE, unk_piece=UNK_PIECE,
        # The sample is already drawn (seeded); SentencePiece must take all of it as given.
        input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=settings.max_sentence_length,
        num_threads=num_threads, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(_training_failure(str(e), settings, name, len(sample))) from e
  return model.data


# SentencePiece's two ways of refusing a vocabulary size (src/trainer_interface.cc), which call for
# opposite fixes; its own text for the first ("Increase vocab_size or decrease
# character_coverage") is right, but names its command-line flag.
_TOO_FEW_PIECES = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")
_TOO_MANY_PIECES = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value "
                              r"<= (\d+)")
# Where the setting lives for someone running hashmoe rather than calling this module.
_VOCAB_SIZE_SETTING = ("vocab_size (VOCAB_SIZE in the task's gin file; hashmoe compare: "
                       "--vocab-size)")


def _training_failure(error: str, settings: SentencePieceSettings, name: str,
                      num_texts: int) -> str:
  """One instruction for a failed SentencePiece training: raise or lower vocab_size, never both."""
  what = (f"SentencePiece could not train {settings.vocab_size} pieces for {name!r} on "
          f"{num_texts} texts")
  if match := _TOO_FEW_PIECES.search(error):
    return (f"{what}: its characters alone need {match.group(2)} pieces (character_coverage="
            f"{settings.character_coverage}, with the reserved, byte and user-defined pieces). "
            f"Raise {_VOCAB_SIZE_SETTING} to at least {match.group(2)}, or lower "
            "SentencePieceSettings.character_coverage so that rare characters are spelled with "
            "byte pieces.")
  if match := _TOO_MANY_PIECES.search(error):
    return (f"{what}: the text supports at most {match.group(2)} pieces. Lower "
            f"{_VOCAB_SIZE_SETTING} to {match.group(2)} or less, or give it more text.")
  return f"{what}: {error}"


class _BytesWriter:
  """The `model_writer` SentencePiece writes the serialised model to."""

  def __init__(self):
    self.data = b""

  def write(self, data: bytes) -> None:
    self.data += data


# --------------------------------------------------------------------------------------------------
# Word-level vocabulary.

# Words are runs of non-whitespace, where whitespace is ASCII only: the same rule in Python and in
# TensorFlow (whose string splitting knows no Unicode whitespace), so encode and encode_tf agree.
_WORD = re.compile(r"[^ \t\n\r\f\v]+")
_TF_WHITESPACE = r"[\t\n\r\f\v]"


def split_words(text: str) -> list[str]:
  """The words of `text`: maximal runs of characters other than ASCII whitespace."""
  return _WORD.findall(text)


class WordVocabulary(seqio.Vocabulary):
  """A word-level vocabulary: ids 0..2 are pad, eos, unk, then one id per word.

  Text is split into words at ASCII whitespace (`split_words`); a word not in the vocabulary (and
  the literal `<unk>` of Wikitext's `.tokens` files) maps to the unk id. Decoding joins words with
  single spaces and drops pad and eos, so `decode(encode(s))` is `s` with whitespace normalised
  whenever every word of `s` is in the vocabulary.
  """

  def __init__(self, words: Sequence[str], *, unk_piece: str = UNK_PIECE):
    """Args:
      words: the vocabulary's words for ids 3, 4, ...: distinct, non-empty, no whitespace, none
        equal to a reserved piece (`<pad>`, `</s>`, `unk_piece`).
      unk_piece: text of the unk id (Wikitext writes unknown words as `<unk>`).
    """
    super().__init__(extra_ids=0)
    words = tuple(words)
    reserved = (PAD_PIECE, EOS_PIECE, unk_piece)
    seen: set[str] = set()
    for i, word in enumerate(words):
      if not isinstance(word, str) or not word or split_words(word) != [word]:
        raise ValueError(f"words[{i}]={word!r}; expected a non-empty string without whitespace.")
      if word in reserved or word in seen:
        raise ValueError(f"words[{i}]={word!r} is a duplicate or a reserved piece {reserved}.")
      seen.add(word)
    self._pieces = reserved + words
    self._ids = {piece: i for i, piece in enumerate(self._pieces)}
    self._ids[PAD_PIECE] = self._ids[EOS_PIECE] = UNK_ID  # Their text is not their id.
    self._tf_tables = None

  @property
  def pieces(self) -> tuple[str, ...]:
    """The text of every id, `pieces[i]` for id i (pad, eos and unk first)."""
    return self._pieces

  @property
  def words(self) -> tuple[str, ...]:
    return self._pieces[3:]

  @property
  def bos_id(self) -> int | None:
    return None

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def unk_id(self) -> int:
    return UNK_ID

  @property
  def _base_vocab_size(self) -> int:
    return len(self._pieces)

  def _encode(self, s: str) -> list[int]:
    return [self._ids.get(word, UNK_ID) for word in split_words(s)]

  def _decode(self, ids: Iterable[int]) -> str:
    return " ".join(self._pieces[i] for i in ids if i not in (PAD_ID, EOS_ID))

  def _tables(self) -> tuple[tf.lookup.StaticHashTable, tf.Tensor]:
    if self._tf_tables is None:
      # Created eagerly even when first needed while tracing a tf.data function.
      with tf.init_scope():
        keys = tf.constant(self._pieces[3:] + (self._pieces[UNK_ID],))
        values = tf.constant(list(range(3, len(self._pieces))) + [UNK_ID], dtype=tf.int64)
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, values), default_value=UNK_ID)
        self._tf_tables = (table, tf.constant(self._pieces))
    return self._tf_tables

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """string[] -> int32[n], or string[b] -> int32[b, (n)] (ragged)."""
    table, _ = self._tables()
    words = tf.strings.split(tf.strings.regex_replace(s, _TF_WHITESPACE, " "), sep=" ")
    if isinstance(words, tf.RaggedTensor):
      words = tf.ragged.boolean_mask(words, tf.strings.length(words) > 0)
      return tf.ragged.map_flat_values(lambda w: tf.cast(table.lookup(w), tf.int32), words)
    words = tf.boolean_mask(words, tf.strings.length(words) > 0)
    return tf.cast(table.lookup(words), tf.int32)

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """int[n] -> string[], or int[b, n] -> string[b]; pad and eos are dropped."""
    _, pieces = self._tables()
    ids = tf.convert_to_tensor(ids)
    keep = tf.logical_and(tf.not_equal(ids, PAD_ID), tf.not_equal(ids, EOS_ID))
    words = tf.gather(pieces, tf.cast(ids, tf.int32))
    if words.shape.rank == 1:
      return tf.strings.reduce_join(tf.boolean_mask(words, keep), separator=" ")
    return tf.strings.reduce_join(tf.ragged.boolean_mask(words, keep), axis=-1, separator=" ")

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, WordVocabulary) and self._pieces == other._pieces

  def __hash__(self) -> int:
    return hash(self._pieces)

  def __getstate__(self) -> dict[str, Any]:
    # TF resources do not pickle (gin deep-copies configurable arguments); rebuilt lazily.
    state = self.__dict__.copy()
    state["_tf_tables"] = None
    return state

  def __str__(self) -> str:
    return f"WordVocabulary(size={self.vocab_size}, fingerprint={vocab_fingerprint(self)[:12]})"

  def save(self, path: PathLike) -> None:
    """Writes the vocabulary as UTF-8 text, one piece per line in id order (reserved ones first)."""
    Path(path).write_text("\n".join(self._pieces) + "\n", encoding="utf-8")

  @classmethod
  def load(cls, path: PathLike) -> "WordVocabulary":
    """Reads a file written by `save`."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
      lines.pop()
    if len(lines) < 3 or tuple(lines[:2]) != (PAD_PIECE, EOS_PIECE):
      raise ValueError(f"{path}: not a WordVocabulary file (expected '{PAD_PIECE}', "
                       f"'{EOS_PIECE}', the unk piece, then one word per line).")
    return cls(lines[3:], unk_piece=lines[2])


def build_word_vocabulary(texts: Texts, *, corpus_id: Mapping[str, Any], split: str = "train",
                          min_count: int = 1, max_size: int | None = None,
                          unk_piece: str = UNK_PIECE, cache_dir: PathLike | None = None,
                          name: str = "words") -> WordVocabulary:
  """The word-level vocabulary of a training split, cached like `train_sentencepiece`.

  Words are ordered by decreasing count, ties by the word's text, so the dictionary is a pure
  function of the counts. Words equal to a reserved piece (`<pad>`, `</s>`, `unk_piece`) are not
  given their own id.

  Args:
    texts: the training split's texts, or a function returning them.
    corpus_id, split, cache_dir, name: as in `train_sentencepiece`.
    min_count: keep words seen at least this often.
    max_size: keep at most this many words (the most frequent); None keeps all.
    unk_piece: text of the unk id.

  Returns:
    A `WordVocabulary` with ids pad, eos, unk, then every kept word other than `<unk>`. On
    Wikitext-103's `wiki.train.tokens` (published vocabulary: 267,735 types, `<unk>` among them)
    that should be 267,737 ids; not checked here, the full corpus is not in the test fixtures.
  """
  if min_count < 1 or (max_size is not None and max_size < 1):
    raise ValueError(f"min_count={min_count}, max_size={max_size}; expected min_count >= 1 and "
                     "max_size None or >= 1.")
  key = cache_key({"format": _CACHE_FORMAT, "kind": "words", "corpus": dict(corpus_id),
                   "split": split, "min_count": min_count, "max_size": max_size,
                   "unk_piece": unk_piece})
  entry = _entry_dir(cache_dir, "vocab", name, key)
  if _read_meta(entry, key) is not None and (entry / "words.txt").is_file():
    return WordVocabulary.load(entry / "words.txt")

  counts: collections.Counter[str] = collections.Counter()
  texts_read = 0
  for text in _texts(texts):
    counts.update(split_words(text))
    texts_read += 1
  for piece in (PAD_PIECE, EOS_PIECE, unk_piece):
    counts.pop(piece, None)
  ranked = sorted((item for item in counts.items() if item[1] >= min_count),
                  key=lambda item: (-item[1], item[0]))[:max_size]
  if not ranked:
    raise ValueError(f"no words for {name!r} (split {split!r}): {texts_read} texts read, "
                     f"{len(counts)} distinct words, none seen >= min_count={min_count} times.")
  vocab = WordVocabulary([word for word, _ in ranked], unk_piece=unk_piece)

  entry.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-"))
  vocab.save(tmp / "words.txt")
  meta = {"format": _CACHE_FORMAT, "key": key, "kind": "words", "name": name,
          "corpus": dict(corpus_id), "split": split, "min_count": min_count,
          "max_size": max_size, "unk_piece": unk_piece, "texts_read": texts_read,
          "distinct_words": len(counts), "vocab_size": vocab.vocab_size,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
  (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, ensure_ascii=False))
  _publish(tmp, entry)
  return vocab


# --------------------------------------------------------------------------------------------------
# Fingerprints.


def vocab_pieces(vocab: seqio.Vocabulary) -> list[str]:
  """The text of every id of `vocab`, in id order.

  Raises:
    TypeError: a vocabulary type without an id -> piece table (only SentencePiece and word
      vocabularies have one).
  """
  if isinstance(vocab, WordVocabulary):
    return list(vocab.pieces)
  if isinstance(vocab, seqio.SentencePieceVocabulary):
    # `tokenizer` is built from the model seqio loaded, extra ids (sentinels) included.
    tokenizer = vocab.tokenizer
    return [tokenizer.id_to_piece(i) for i in range(tokenizer.get_piece_size())]
  raise TypeError(f"vocab is a {type(vocab).__name__}; expected a seqio.SentencePieceVocabulary "
                  "or a hashmoe WordVocabulary.")


def vocab_fingerprint(vocab: seqio.Vocabulary) -> str:
  """`hashing.vocabulary_fingerprint` of the vocabulary's pieces: what hash tables record."""
  return hashing.vocabulary_fingerprint(vocab_pieces(vocab))


# gin: task files configure the BPE vocabulary (`register_tasks.vocab_settings =
# @hashmoe.data.vocab.SentencePieceSettings()`); the class itself stays unwrapped.
gin.external_configurable(SentencePieceSettings, module="hashmoe.data.vocab")
