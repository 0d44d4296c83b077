"""Token counts of text folders with any tokenizer a user has, for tables other frameworks load.

`hashmoe build-hash --sentencepiece FILE` / `--hf_tokenizer tokenizer.json` counts how often each
token id occurs in a user's text, with the tokenizer of the model the table is for (a DeepSeek-V4
table indexes DeepSeek's 129k-token vocabulary, not a hashmoe task's), then balances a table on the
counts (`hashmoe.table_export`).

* `load_tokenizer`: a SentencePiece `.model` or a Hugging Face `tokenizer.json` (the `tokenizers`
  library, the optional extra `hashmoe[hf]`) behind one small interface (`TextTokenizer`).
* `text_files_of`: the files of the given files and folders (recursive), in a fixed order.
* `count_tokens`: streams the files' lines (plain or .gz/.xz/.zst/.bz2, through
  `text_files.iter_lines`), encodes them in blocks of lines (one batch call per block), adds each
  block's ids to int64 counts with `np.bincount`, with a tqdm bar in tokens/s. A held-out share of
  the blocks (`heldout_fraction`) is counted apart, to measure a table's load on text it was not
  built from.

Ids are counted as the tokenizer gives them for each line: no BOS/EOS or other special tokens are
added (a model adds one or two per document, which moves no expert's load measurably). Memory is a
block of lines and its ids, whatever the corpus size; a line is read whole, so a file that is one
huge line is held in memory at once.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tqdm

from hashmoe import hashing
from hashmoe.data import text_files
from hashmoe.data.text_files import PathLike

# Lines per block: the unit of encoding (one batch call), of the train / held-out split and of the
# progress bar's updates. Blocks of consecutive lines keep a document mostly on one side of the
# split, so held-out text is text the table has not seen rather than every n-th line of it.
DEFAULT_BLOCK_LINES = 1000
# Block b is held out when frac((b + 1) / phi) < heldout_fraction: a low-discrepancy sequence, so
# the held-out share is within a block of the asked fraction at any length, and deterministic.
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0
HF_EXTRA_HINT = "pip install -e '.[hf]' in the hashmoe checkout (or: pip install tokenizers)"


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
  """A tokenizer that turns lines of text into ids.

  Attributes:
    kind: "sentencepiece" or "hf" (a Hugging Face `tokenizers` tokenizer.json).
    path: the file it was read from.
    vocab_size: number of ids: the SentencePiece piece count; for tokenizer.json the largest id
      of the vocabulary and added tokens, plus one.
    fingerprint: `hashing.vocabulary_fingerprint` of its pieces in id order (for SentencePiece,
      what a hashmoe task over the same model records).
    encode_batch: list of lines -> list of id lists, no special tokens added.
  """
  kind: str
  path: str
  vocab_size: int
  fingerprint: str
  encode_batch: Callable[[list[str]], list[list[int]]] = dataclasses.field(repr=False,
                                                                            compare=False)


def _sentencepiece(path: Path) -> TextTokenizer:
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  processor = spm.SentencePieceProcessor()
  try:
    processor.Load(model_proto=path.read_bytes())
  except (RuntimeError, OSError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: not a SentencePiece model (it does not parse: {e}); pass the "
                     "tokenizer's .model file (a serialized ModelProto), or a Hugging Face "
                     "tokenizer.json with --hf_tokenizer") from e
  size = processor.get_piece_size()
  if size < 1:
    raise ValueError(f"{path}: the SentencePiece model has no pieces")
  pieces = [processor.id_to_piece(i) for i in range(size)]

  def encode(lines: list[str]) -> list[list[int]]:
    return processor.encode(lines, out_type=int)

  return TextTokenizer("sentencepiece", str(path), size, hashing.vocabulary_fingerprint(pieces),
                       encode)


def _hf_tokenizer(path: Path) -> TextTokenizer:
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"--hf_tokenizer needs the `tokenizers` library: {HF_EXTRA_HINT}") from e
  try:
    tokenizer = tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # The Rust side raises its own Exception type for bad JSON or schema.
    raise ValueError(f"{path}: not a Hugging Face tokenizer.json (it does not parse: "
                     f"{str(e).strip()}); pass the tokenizer.json of a `tokenizers` / "
                     "transformers fast tokenizer, or a SentencePiece .model with "
                     "--sentencepiece") from e
  vocab = tokenizer.get_vocab(with_added_tokens=True)
  if not vocab:
    raise ValueError(f"{path}: the tokenizer has an empty vocabulary")
  size = max(vocab.values()) + 1
  pieces = [""] * size
  for piece, i in vocab.items():
    pieces[i] = piece

  def encode(lines: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(lines, add_special_tokens=False)]

  return TextTokenizer("hf", str(path), size, hashing.vocabulary_fingerprint(pieces), encode)


def load_tokenizer(*, sentencepiece: PathLike | None = None,
                   hf_tokenizer: PathLike | None = None) -> TextTokenizer:
  """Reads exactly one of a SentencePiece model or a Hugging Face tokenizer.json.

  Raises:
    ValueError: neither or both given, or the file does not parse as what it was given as.
    FileNotFoundError: the file does not exist.
  """
  if (sentencepiece is None) == (hf_tokenizer is None):
    raise ValueError("give exactly one tokenizer: --sentencepiece MODEL (a SentencePiece .model) "
                     "or --hf_tokenizer FILE (a Hugging Face tokenizer.json)")
  path = Path(sentencepiece if sentencepiece is not None else hf_tokenizer)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such tokenizer file")
  return _sentencepiece(path) if sentencepiece is not None else _hf_tokenizer(path)


def text_files_of(paths: Iterable[PathLike], *, pattern: str = "*") -> list[Path]:
  """The files to count: each given file, and each folder's files matching `pattern`
  (recursively, hidden files and folders skipped, sorted by relative path).

  Raises:
    FileNotFoundError: a path does not exist, or nothing at all was found.
  """
  files = []
  paths = list(paths)
  for given in paths:
    path = Path(given)
    if path.is_file():
      files.append(path)
    elif path.is_dir():
      found = sorted((p for p in path.rglob(pattern) if p.is_file() and not any(
          part.startswith(".") for part in p.relative_to(path).parts)),
                     key=lambda p: p.relative_to(path).as_posix())
      files.extend(found)
    else:
      raise FileNotFoundError(f"{path}: no such file or folder of text to count")
  if not files:
    raise FileNotFoundError(f"no text files matching {pattern!r} in {[str(p) for p in paths]}; "
                            "give text files or folders that hold them (--text)")
  return files


def is_heldout_block(block: int, heldout_fraction: float) -> bool:
  """Whether block `block` (0-based) of `block_lines` lines is held out (see `_INV_PHI`)."""
  return heldout_fraction > 0 and ((block + 1) * _INV_PHI) % 1.0 < heldout_fraction


@dataclasses.dataclass(frozen=True)
class TokenCounts:
  """Token counts of a text corpus, its counted part and its held-out part apart.

  Attributes:
    counts: int64[vocab_size] occurrences in the counted (non-held-out) blocks.
    heldout_counts: int64[vocab_size] occurrences in the held-out blocks (zeros without them).
    lines, heldout_lines: lines read in each part.
    files: the files read, in order.
    seconds: wall time of reading, encoding and counting.
  """
  counts: np.ndarray
  heldout_counts: np.ndarray
  lines: int
  heldout_lines: int
  files: tuple[str, ...]
  seconds: float

  @property
  def tokens(self) -> int:
    return int(self.counts.sum())

  @property
  def heldout_tokens(self) -> int:
    return int(self.heldout_counts.sum())


def _blocks(lines: Iterator[str], block_lines: int) -> Iterator[list[str]]:
  while True:
    block = list(itertools.islice(lines, block_lines))
    if not block:
      return
    yield block


def count_tokens(tokenizer: TextTokenizer, paths: Sequence[PathLike], *,
                 vocab_size: int | None = None, heldout_fraction: float = 0.0,
                 block_lines: int = DEFAULT_BLOCK_LINES, pattern: str = "*",
                 encoding: str = "utf-8", errors: str = "strict",
                 progress: bool = True) -> TokenCounts:
  """Counts the token ids of text files and folders, streaming.

  Args:
    tokenizer: from `load_tokenizer`.
    paths: text files (plain or compressed) and folders of them.
    vocab_size: rows of the counts: the model's (padded) vocabulary, at least the tokenizer's
      (default: the tokenizer's). Ids past the tokenizer's own count 0.
    heldout_fraction: share of the blocks counted apart, in [0, 1).
    block_lines: lines per block (see `DEFAULT_BLOCK_LINES`).
    pattern: file-name pattern within folders.
    encoding, errors: the text codec (`text_files.iter_lines`).
    progress: show a tqdm bar (tokens/s) on stderr.

  Returns:
    `TokenCounts`.

  Raises:
    ValueError: a bad setting, a vocab_size below the tokenizer's, or an empty corpus (no tokens at
      all, or none outside the held-out part).
  """
  if vocab_size is None:
    vocab_size = tokenizer.vocab_size
  if vocab_size < tokenizer.vocab_size:
    raise ValueError(f"vocab_size={vocab_size} is below the tokenizer's {tokenizer.vocab_size} "
                     f"ids ({tokenizer.path}); give the model's vocabulary size, at least "
                     f"{tokenizer.vocab_size}")
  if not 0 <= heldout_fraction < 1:
    raise ValueError(f"heldout_fraction={heldout_fraction}; expected a fraction in [0, 1)")
  if block_lines < 1:
    raise ValueError(f"block_lines={block_lines}; expected >= 1")
  files = text_files_of(paths, pattern=pattern)
  parts = [np.zeros(vocab_size, np.int64), np.zeros(vocab_size, np.int64)]
  num_lines = [0, 0]
  start = time.perf_counter()
  lines = itertools.chain.from_iterable(
      text_files.iter_lines(f, encoding=encoding, errors=errors) for f in files)
  with tqdm.tqdm(unit="tok", unit_scale=True, desc="counting tokens", disable=not progress,
                 dynamic_ncols=True) as bar:
    for b, block in enumerate(_blocks(lines, block_lines)):
      side = int(is_heldout_block(b, heldout_fraction))
      encoded = tokenizer.encode_batch(block)
      ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64)
      if ids.size:
        if ids.min() < 0 or ids.max() >= vocab_size:
          raise ValueError(f"the tokenizer {tokenizer.path} gave id {int(ids.max())}, outside "
                           f"[0, vocab_size={vocab_size})")
        parts[side] += np.bincount(ids, minlength=vocab_size)
      num_lines[side] += len(block)
      bar.update(ids.size)
  counted, heldout = parts
  where = ", ".join(str(p) for p in paths)
  if not counted.any():
    if heldout.any():
      raise ValueError(f"all {num_lines[1]} lines of {where} fell in the held-out part; lower "
                       f"--heldout_fraction={heldout_fraction} or give more text")
    raise ValueError(f"empty corpus: {len(files)} file(s) under {where} hold no tokens "
                     f"({num_lines[0] + num_lines[1]} lines); give the text to count")
  return TokenCounts(counts=counted, heldout_counts=heldout, lines=num_lines[0],
                     heldout_lines=num_lines[1], files=tuple(str(f) for f in files),
                     seconds=time.perf_counter() - start)
