"""CC100 English (Conneau et al. 2020; the cc100en half of the BASE-layers corpus).

The release is one file per language, `en.txt.xz` (~80 GB compressed): plain UTF-8, one paragraph
per line, documents separated by a blank line, no metadata. It is only ever streamed: `lzma`
decompresses incrementally and one document at a time is held in memory. The uncompressed `en.txt`
(and `.gz`/`.bz2` copies) read the same way.

CC100 has no official validation or test split. `split=` carves one out BY DOCUMENT with a hash of
the document's text, so the assignment is deterministic, independent of file order, and an exact
duplicate document always lands in the same split (web crawls repeat documents; a duplicate in
train and test would leak).

For the paper's seq2seq use ("arranged split by sentence to predict the next turn", Roller et al.
2021, Sec. 5.1) `cc100_pairs` yields (previous sentence(s), next sentence) pairs, or paragraph
pairs, within each document.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from hashmoe.data import text_files
from hashmoe.data.text_files import PathLike

# Names tried, in order, when given the folder of the download.
_FILE_NAMES = ("{language}.txt.xz", "{language}.txt", "{language}.txt.gz", "{language}.txt.bz2")


def find_cc100(path: PathLike, language: str = "en") -> Path:
  """The CC100 file for `language`: `path` itself, or `{language}.txt[.xz|.gz|.bz2]` inside it.

  Raises:
    FileNotFoundError: nothing matches; the message lists the names tried.
  """
  path = Path(path)
  if path.is_file():
    return path
  names = [n.format(language=language) for n in _FILE_NAMES]
  if path.is_dir():
    for name in names:
      if (path / name).is_file():
        return path / name
  raise FileNotFoundError(
      f"{path}: no CC100 file. Expected the file itself or a folder holding one of "
      f"{', '.join(names)}.")


def _document_split(paragraphs: list[str], validation_fraction: float,
                    test_fraction: float) -> str:
  """'train', 'validation' or 'test' for one document, from a hash of its text."""
  digest = hashlib.blake2b("\n".join(paragraphs).encode("utf-8"), digest_size=8).digest()
  u = int.from_bytes(digest, "big") / 2.0**64  # Uniform in [0, 1).
  if u < test_fraction:
    return "test"
  if u < test_fraction + validation_fraction:
    return "validation"
  return "train"


def cc100_documents(path: PathLike, split: str | None = None, *, language: str = "en",
                    validation_fraction: float = 0.001, test_fraction: float = 0.001,
                    errors: str = "replace") -> Iterator[list[str]]:
  """Streams CC100 documents.

  Args:
    path: `en.txt.xz` (or plain `en.txt`, `.gz`, `.bz2`), or the folder holding it.
    split: None for every document; 'train', 'validation' (or 'valid') or 'test' for the documents
      that a hash of their text assigns there (see the module docstring).
    language: the CC100 language code, used when `path` is a folder.
    validation_fraction: expected share of documents in validation.
    test_fraction: expected share of documents in test.
    errors: codec error handler; 'replace' (default) turns the odd invalid byte of a web crawl
      into U+FFFD instead of stopping a run, 'strict' raises.

  Yields:
    Each document as its list of stripped, non-empty paragraphs (lines).

  Raises:
    FileNotFoundError: no CC100 file at `path`.
    ValueError: a truncated or corrupt `.xz` (naming the file), or bad fractions / split.
  """
  for name, fraction in (("validation_fraction", validation_fraction),
                         ("test_fraction", test_fraction)):
    if not 0.0 <= fraction < 1.0:
      raise ValueError(f"{name}={fraction}; expected a fraction in [0, 1).")
  if validation_fraction + test_fraction >= 1.0:
    raise ValueError(
        f"validation_fraction + test_fraction = {validation_fraction + test_fraction}; expected "
        "< 1 so that documents are left for train.")
  wanted = None if split is None else text_files.normalize_split(split)
  lines = text_files.iter_lines(find_cc100(path, language), errors=errors)
  for document in text_files.iter_blocks(lines):
    if wanted is None or _document_split(document, validation_fraction, test_fraction) == wanted:
      yield document


def cc100_paragraphs(path: PathLike, split: str | None = None, **kwargs) -> Iterator[str]:
  """Streams CC100 paragraphs (lines), stripped, blank separators dropped.

  Args:
    path, split, **kwargs: as in `cc100_documents`.
  """
  for document in cc100_documents(path, split, **kwargs):
    yield from document


def cc100_pairs(path: PathLike, split: str | None = None, *,
                unit: Literal["sentence", "paragraph"] = "sentence", context_size: int = 1,
                **kwargs) -> Iterator[tuple[str, str]]:
  """(context, next unit) seq2seq pairs within each CC100 document.

  Args:
    path, split, **kwargs: as in `cc100_documents`.
    unit: 'sentence' splits paragraphs into sentences (`text_files.split_sentences`) and pairs run
      across paragraph boundaries; 'paragraph' pairs whole paragraphs.
    context_size: how many previous units form the context (fewer at a document's start).

  Yields:
    (context, target) string pairs; none crosses a document boundary.
  """
  if unit not in ("sentence", "paragraph"):
    raise ValueError(f"unit={unit!r}; expected 'sentence' or 'paragraph'.")
  for document in cc100_documents(path, split, **kwargs):
    units = document if unit == "paragraph" else [
        sentence for paragraph in document for sentence in text_files.split_sentences(paragraph)]
    yield from text_files.context_target_pairs(units, context_size=context_size)
