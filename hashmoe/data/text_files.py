"""Plain text, from bytes on disk to training units; and a user's folder of text files.

Every plain-text reader in `hashmoe.data` (Wikitext, CC100, the embedded corpus, a user's folder)
goes through these functions, so they all stream and segment text the same way:

* `iter_lines` opens a file (plain, `.zst`, `.xz`, `.gz` or `.bz2`, detected from its magic bytes
  by `hashmoe.data.compression`) and yields its lines one at a time, never holding the file in
  memory; a truncated or corrupt compressed stream, or bytes that are not valid text, become a
  `ValueError` naming the file.
* `iter_blocks` groups lines into blank-line-separated blocks; `split_sentences` splits running
  (untokenised) English into sentences.
* `context_target_pairs` turns a document's units into the (previous units, next unit) examples of
  the paper's seq2seq setup: Wikitext-103 and RoBERTa+cc100en are "arranged split by sentence to
  predict the next turn" (Roller et al. 2021, Sec. 5.1).
* `split_text_files` finds a folder's `*.txt` files recursively and splits them BY FILE into
  train/validation/test (never by line: lines of one file would leak into the others);
  `text_folder_paragraphs` / `text_folder_sentence_pairs` stream a split.
"""

from __future__ import annotations

import bz2
import codecs
import collections
import gzip
import hashlib
import io
import lzma
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Literal

from hashmoe.data.compression import (BytesStream, CorruptFileError, decompressed_chunks,
                                      detect_compression)

PathLike = str | os.PathLike
SPLITS = ("train", "validation", "test")
_OPENERS: dict[str, Callable[..., IO[str]]] = {"xz": lzma.open, "gzip": gzip.open, "bz2": bz2.open}

class TextDecodeError(ValueError):
  """Bytes of a text file that are not valid in the encoding it was read with (names the file).

  Attributes:
    problem: what was wrong (file, line, bytes), without the advice on how to read it anyway, so
      that a caller can give advice in its own terms (a gin macro, a command-line flag).
  """

  def __init__(self, problem: str, advice: str):
    super().__init__(f"{problem} {advice}")
    self.problem = problem


def check_text_codec(encoding: str, errors: str) -> None:
  """Raises ValueError unless `encoding` is a codec and `errors` a codec error handler."""
  try:
    codecs.lookup(encoding)
  except (LookupError, TypeError):
    raise ValueError(f"encoding={encoding!r} is not a text encoding Python knows; expected e.g. "
                     "'utf-8', 'latin-1', 'cp1252'.") from None
  try:
    codecs.lookup_error(errors)
  except (LookupError, TypeError):
    raise ValueError(f"errors={errors!r} is not a codec error handler; expected 'strict' (stop "
                     "at bytes that are not valid text), 'replace' (read them as U+FFFD) or "
                     "'ignore' (drop them).") from None


def normalize_split(split: str) -> str:
  """Canonical split name: 'train', 'validation' or 'test' ('valid' and 'dev' are accepted)."""
  canonical = {"valid": "validation", "dev": "validation"}.get(split, split)
  if canonical not in SPLITS:
    raise ValueError(f"split={split!r}; expected one of {SPLITS} (or 'valid').")
  return canonical


def _open_text(path: Path, compression: str | None, *, encoding: str, errors: str) -> IO[str]:
  # newline="\n": only "\n" ends a line (a stray "\r" inside a CC100 paragraph is not a break).
  if compression == "zstd":
    # The frame-by-frame decoder that notices truncation (zstandard's stream_reader does not).
    raw = io.BufferedReader(BytesStream(decompressed_chunks(path, "zstd")))
    return io.TextIOWrapper(raw, encoding=encoding, errors=errors, newline="\n")
  opener = _OPENERS.get(compression, open)
  return opener(path, "rt", encoding=encoding, errors=errors, newline="\n")


def iter_lines(path: PathLike, *, encoding: str = "utf-8", errors: str = "strict") -> Iterator[str]:
  """Streams the lines of a plain or compressed text file, end-of-line characters removed.

  Decompression is incremental (`lzma.open` etc. in text mode), so an 80 GB `en.txt.xz` costs a few
  MB of memory. A byte-order mark at the start of a plain UTF-8 file is dropped.

  Args:
    path: a plain text file or a `.zst`/`.xz`/`.gz`/`.bz2` compressed one (detected from the bytes).
    encoding: the text encoding.
    errors: the codec error handler: 'strict' raises on bytes that are not `encoding`; 'replace'
      substitutes U+FFFD and goes on (right for web crawls such as CC100, where one bad byte in
      80 GB should not stop a run).

  Yields:
    Each line of the file without its trailing '\\n' / '\\r\\n'.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: a truncated or corrupt compressed stream, naming the file and the line reached.
    TextDecodeError: (a ValueError; with errors='strict') bytes that are not valid `encoding`,
      naming the file and the line reached.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file.")
  compression = detect_compression(path)
  codec = encoding
  if compression is None and encoding.replace("-", "").lower() == "utf8":
    codec = "utf-8-sig"  # Same decoding, but a leading byte-order mark is not text.
  line_number = 0
  try:
    # newline="\n": only "\n" ends a line (a stray "\r" inside a CC100 paragraph is not a break);
    # the "\r" of a CRLF file is stripped below.
    with _open_text(path, compression, encoding=codec, errors=errors) as f:
      for line_number, line in enumerate(f, 1):
        yield line.rstrip("\r\n")
  except UnicodeDecodeError as e:
    # Text files decode in chunks, so the exact line is unknown; the lines before it were fine.
    raise TextDecodeError(
        f"{path}: bytes that are not valid {encoding} after line {line_number} ({e.reason}: "
        f"{e.object[e.start:e.end]!r}).",
        "Pass errors='replace' to substitute U+FFFD, or the file's real encoding (e.g. "
        "encoding='latin-1').") from e
  except EOFError as e:
    raise ValueError(
        f"{path}: the {compression} stream ends before its end marker after {line_number} lines: "
        "the file is truncated (an interrupted download or copy). Re-download it.") from e
  except CorruptFileError:
    raise  # Already names the file and the offset.
  except (lzma.LZMAError, OSError) as e:
    if compression is None:
      raise  # A plain file's OSError is about the file system, not its content.
    # gzip.BadGzipFile and bz2's "Invalid data stream" are OSErrors.
    raise ValueError(
        f"{path}: corrupt {compression} data after {line_number} lines ({e}). "
        "Re-download the file.") from e


def iter_blocks(lines: Iterable[str]) -> Iterator[list[str]]:
  """Groups lines into blocks separated by blank (or whitespace-only) lines.

  Yields:
    The stripped, non-blank lines of each block, in order; runs of blank lines yield nothing.
  """
  block: list[str] = []
  for line in lines:
    stripped = line.strip()
    if stripped:
      block.append(stripped)
    elif block:
      yield block
      block = []
  if block:
    yield block


# Words that end in '.' without ending a sentence. Lower-cased, without the final period; a single
# letter (an initial, "J. R. R. Tolkien") is handled separately.
_ABBREVIATIONS = frozenset("""
    mr mrs ms dr prof sr jr st mt ft rev gen col lt sgt capt gov sen rep hon pres
    vs etc e.g i.e cf al approx dept est fig no nos op vol vols pp ed eds inc ltd co corp bros
    jan feb mar apr jun jul aug sep sept oct nov dec a.m p.m u.s u.k u.n
""".split())
# A candidate boundary: terminal punctuation, any closing quotes/brackets, whitespace, then
# something that can start a sentence (an optional opening quote/bracket, then a capital or digit).
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(\s+)(?=[\"'\u201c\u2018(\[]*[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
  """Splits running English text into sentences with a rule-based splitter.

  A sentence ends at `.`, `!` or `?` (plus closing quotes/brackets) followed by whitespace and a
  capital letter, digit or opening quote. A period after a known abbreviation ("Mr.", "e.g.",
  "U.S.") or a single capital letter (an initial) does not end a sentence. This is the usual
  heuristic, not a trained segmenter: it is deterministic, fast enough for CC100 and needs no
  model download.

  Args:
    text: one paragraph of untokenised text (not Moses-tokenised: for Wikitext use
      `hashmoe.data.wikitext.split_wikitext_sentences`).

  Returns:
    The stripped, non-empty sentences, which joined by single spaces give back `text` up to
    whitespace.
  """
  sentences = []
  start = 0
  for match in _BOUNDARY.finditer(text):
    end = match.start(1)  # The boundary is the whitespace run after the punctuation.
    if text[match.start()] == "." and _is_abbreviation(text, match.start()):
      continue
    sentence = text[start:end].strip()
    if sentence:
      sentences.append(sentence)
    start = match.end(1)
  tail = text[start:].strip()
  if tail:
    sentences.append(tail)
  return sentences


def _is_abbreviation(text: str, period: int) -> bool:
  """Whether the '.' at `text[period]` closes an abbreviation rather than a sentence."""
  word_start = text.rfind(" ", 0, period) + 1
  word = text[word_start:period].lstrip("\"'(\u201c\u2018[")
  if len(word) == 1 and word.isupper():
    return True  # An initial: "J. Smith" (a lower-case "of a. Then" still ends a sentence).
  return word.lower() in _ABBREVIATIONS


def context_target_pairs(units: Iterable[str], *, context_size: int = 1,
                         separator: str = " ") -> Iterator[tuple[str, str]]:
  """(context, target) examples that predict each unit from the units before it.

  The paper's seq2seq form of a monolingual corpus (Sec. 5.1: "split by sentence to predict the
  next turn"): the encoder sees the previous `context_size` units, the decoder generates the next.
  Call it once per document so that no example crosses a document boundary.

  Args:
    units: the sentences (or paragraphs) of ONE document, in order.
    context_size: how many previous units form the context; the first units of a document get
      the shorter context they have. The first unit is never a target (it has no context).
    separator: joins the context units.

  Yields:
    (context, target) string pairs, one per unit after the first.
  """
  if context_size < 1:
    raise ValueError(f"context_size={context_size}; expected an integer >= 1.")
  previous: collections.deque[str] = collections.deque(maxlen=context_size)
  for unit in units:
    if previous:
      yield separator.join(previous), unit
    previous.append(unit)


# --------------------------------------------------------------------------------------------------
# A user's folder of text files.


def find_text_files(root: PathLike, *, pattern: str = "*.txt") -> list[Path]:
  """All files under `root` (recursively) matching `pattern`, sorted by relative path.

  Raises:
    FileNotFoundError: `root` is not a directory, or holds no matching file.
  """
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: not a directory; expected a folder of {pattern} files.")
  files = sorted((p for p in root.rglob(pattern) if p.is_file()),
                 key=lambda p: p.relative_to(root).as_posix())
  if not files:
    raise FileNotFoundError(f"{root}: no files matching {pattern!r} (searched recursively).")
  return files


def split_text_files(root: PathLike, *, pattern: str = "*.txt", validation_fraction: float = 0.1,
                     test_fraction: float = 0.1, seed: int = 0) -> dict[str, list[Path]]:
  """Splits the text files under `root` by whole file into train/validation/test.

  Files are ranked by a seeded hash of their path relative to `root` (a shuffle that does not
  depend on where the folder lives, and that moves few files when files are added); the first
  `round(n * test_fraction)` go to test, the next `round(n * validation_fraction)` to validation,
  the rest to train, each at least one file.

  Args:
    root: the folder.
    pattern: glob of the files to use, matched recursively.
    validation_fraction: share of files for validation, in (0, 1).
    test_fraction: share of files for test, in (0, 1); the two together must leave room for train.
    seed: selects the shuffle.

  Returns:
    {'train': [...], 'validation': [...], 'test': [...]}, each sorted by relative path.

  Raises:
    ValueError: fewer than 3 files, or fractions out of range.
  """
  for name, fraction in (("validation_fraction", validation_fraction),
                         ("test_fraction", test_fraction)):
    if not 0.0 < fraction < 1.0:
      raise ValueError(f"{name}={fraction}; expected a fraction strictly between 0 and 1.")
  if validation_fraction + test_fraction >= 1.0:
    raise ValueError(
        f"validation_fraction + test_fraction = {validation_fraction + test_fraction}; expected "
        "< 1 so that files are left for train.")
  root = Path(root)
  files = find_text_files(root, pattern=pattern)
  n = len(files)
  if n < 3:
    raise ValueError(
        f"{root}: {n} file(s) matching {pattern!r}, but a split by file needs at least 3 (one each "
        "for train, validation and test). Split the text into more files, or pass separate "
        "folders.")
  relative = {f: f.relative_to(root).as_posix() for f in files}
  ranked = sorted(files, key=lambda f: (
      hashlib.sha256(f"{seed}\0{relative[f]}".encode()).hexdigest(), relative[f]))
  num_test = max(1, int(n * test_fraction + 0.5))
  num_validation = max(1, int(n * validation_fraction + 0.5))
  if num_test + num_validation >= n:  # Small folders: keep at least one file for train.
    num_test, num_validation = 1, 1
  by_path = lambda fs: sorted(fs, key=relative.__getitem__)
  return {
      "train": by_path(ranked[num_test + num_validation:]),
      "validation": by_path(ranked[num_test:num_test + num_validation]),
      "test": by_path(ranked[:num_test]),
  }


def text_folder_paragraphs(root: PathLike, split: str, *, unit: Literal["paragraph", "line"] =
                           "paragraph", pattern: str = "*.txt", validation_fraction: float = 0.1,
                           test_fraction: float = 0.1, seed: int = 0, encoding: str = "utf-8",
                           errors: str = "strict") -> Iterator[str]:
  """Streams the paragraphs (or lines) of one split of a text folder.

  Args:
    root, pattern, validation_fraction, test_fraction, seed: as in `split_text_files`.
    split: 'train', 'validation' (or 'valid') or 'test'.
    unit: 'paragraph' yields each blank-line-separated block with its lines joined by one space;
      'line' yields each non-blank line. Both are stripped.
    encoding, errors: as in `iter_lines`.

  Yields:
    Strings, file by file in relative-path order.
  """
  if unit not in ("paragraph", "line"):
    raise ValueError(f"unit={unit!r}; expected 'paragraph' or 'line'.")
  files = split_text_files(root, pattern=pattern, validation_fraction=validation_fraction,
                           test_fraction=test_fraction, seed=seed)[normalize_split(split)]
  for path in files:
    lines = iter_lines(path, encoding=encoding, errors=errors)
    if unit == "line":
      yield from (line.strip() for line in lines if line.strip())
    else:
      yield from (" ".join(block) for block in iter_blocks(lines))


def text_folder_sentence_pairs(root: PathLike, split: str, *, context_size: int = 1,
                               pattern: str = "*.txt", validation_fraction: float = 0.1,
                               test_fraction: float = 0.1, seed: int = 0,
                               encoding: str = "utf-8",
                               errors: str = "strict") -> Iterator[tuple[str, str]]:
  """(previous sentences, next sentence) pairs within each file of one split of a text folder.

  Each file is one document: pairs never cross files. Arguments as in `text_folder_paragraphs`
  and `context_target_pairs`.
  """
  files = split_text_files(root, pattern=pattern, validation_fraction=validation_fraction,
                           test_fraction=test_fraction, seed=seed)[normalize_split(split)]
  for path in files:
    blocks = iter_blocks(iter_lines(path, encoding=encoding, errors=errors))
    sentences = (s for block in blocks for s in split_sentences(" ".join(block)))
    yield from context_target_pairs(sentences, context_size=context_size)

