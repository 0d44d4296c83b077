"""Wikitext-103 / Wikitext-2 (Merity et al. 2016) in the layouts users download.

Layouts accepted by `find_wikitext`:

* the original release: `wikitext-103/wiki.{train,valid,test}.tokens` (word-level, rare words
  replaced by `<unk>`) and `wikitext-103-raw/wiki.{train,valid,test}.raw` (no `<unk>`);
* the Hugging Face copy (`Salesforce/wikitext`): `wikitext-103-v1/train-0000N-of-0000M.parquet`,
  `validation-00000-of-00001.parquet`, `test-00000-of-00001.parquet`, one string column `text`
  holding one original line per row (trailing '\\n' kept, separator lines as ""); also the older
  `{split}/*.parquet` conversion.

Both hold the same lines: one paragraph per line with a leading space and a trailing " \\n",
separator lines that are blank, article titles ` = Title = `, sections ` = = Section = = `,
subsections ` = = = Sub = = = `. The text is Moses-tokenised: punctuation is split off by spaces
and hyphens / separators inside words and numbers are written as joiners `@-@`, `@,@`, `@.@`
("role @-@ playing", "1 @,@ 000", "3 @.@ 5").

Three views, all streaming (text files line by line, parquet one row group at a time):

* `wikitext_lines`: non-blank lines, stripped — the usual LM view (a model adds EOS per line);
* `wikitext_articles`: whole articles, split at title headings;
* `wikitext_sentence_pairs`: (previous sentence(s), next sentence) within an article — the paper
  treats Wikitext-103 "as a seq2seq task ... again split by sentence" (Roller et al. 2021,
  Sec. 5.1).

`detokenize=True` rejoins the `@-@`/`@,@`/`@.@` joiners ("role-playing", "1,000", "3.5") for the
paper's 8k-BPE setting; leave it False for the 267k word-level dictionary, whose tokens include
`@-@`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from hashmoe.data import text_files
from hashmoe.data.text_files import PathLike

WikitextFormat = Literal["tokens", "raw", "parquet"]

# Rows per parquet read: batches keep memory bounded whatever row-group size the writer chose.
_PARQUET_BATCH_ROWS = 8192
_SHARD_NAME = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.parquet$")
_JOINER = re.compile(r" ?@([-,.])@ ?")
_TITLE = re.compile(r"^= (?!=)(.*\S) =$")
_SECTION = re.compile(r"^((?:= )+)(.*?\S)((?: =)+)$")
# A sentence end in Moses-tokenised text: a standalone '.', '!' or '?' token (not the period inside
# "U.S." or "St.", which the tokeniser leaves attached), then any further terminal or closing
# bracket tokens ('? !', '. )').
_SENTENCE_END = re.compile(r"(?<![^ ])[.!?](?: [.!?)\]}])*(?= |$)")
# After a sentence end, a '"' token (and brackets or terminals after it) that closes an open quote.
_QUOTE_AFTER = re.compile(r' "(?: [.!?)\]}])*(?= |$)')
_QUOTE_TOKEN = re.compile(r'(?<![^ ])"(?= |$)')


@dataclasses.dataclass(frozen=True)
class WikitextFiles:
  """The files holding one split of Wikitext, in reading order.

  Attributes:
    split: 'train', 'validation' or 'test'.
    format: 'tokens' (`wiki.*.tokens`), 'raw' (`wiki.*.raw`) or 'parquet' (Hugging Face shards).
    files: the files, shards in shard order.
  """
  split: str
  format: WikitextFormat
  files: tuple[Path, ...]


@dataclasses.dataclass(frozen=True)
class WikitextArticle:
  """One Wikipedia article.

  Attributes:
    title: the text of its ` = Title = ` heading ('' for lines before the first title).
    lines: every non-blank line of the article, stripped, starting with the title heading itself
      ("= Title ="); section headings ("= = Section = =") stay in place.
  """
  title: str
  lines: tuple[str, ...]

  @property
  def text(self) -> str:
    """The article as one string, one line per paragraph or heading."""
    return "\n".join(self.lines)


def _file_format(path: Path) -> WikitextFormat | None:
  return {".tokens": "tokens", ".raw": "raw", ".parquet": "parquet"}.get(path.suffix)


def find_wikitext(path: PathLike, split: str) -> WikitextFiles:
  """Locates the files of one Wikitext split under `path`.

  Args:
    path: a folder in either layout (`wikitext-103/`, `wikitext-103-raw/`, `wikitext-2/`,
      Hugging Face `wikitext-103-v1/`, ...), or one `.tokens` / `.raw` / `.parquet` file.
    split: 'train', 'validation' (or 'valid') or 'test'.

  Returns:
    The split's files and their format.

  Raises:
    FileNotFoundError: nothing matches; the message lists every pattern tried and any sub-folders
      that look like a Wikitext layout.
    ValueError: several layouts match (e.g. both `.tokens` and `.raw` in one folder), or a sharded
      parquet split misses shards.
  """
  split = text_files.normalize_split(split)
  path = Path(path)
  if path.is_file():
    file_format = _file_format(path)
    if file_format is None:
      raise ValueError(f"{path}: expected a .tokens, .raw or .parquet Wikitext file.")
    return WikitextFiles(split, file_format, (path,))
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: no such file or folder (expected a Wikitext folder).")

  text_name = "valid" if split == "validation" else split
  patterns = {
      "tokens": f"wiki.{text_name}.tokens",
      "raw": f"wiki.{text_name}.raw",
      "parquet": f"{split}-*-of-*.parquet",
      "parquet-folder": f"{split}/*.parquet",
  }
  found: dict[str, tuple[Path, ...]] = {}
  for key in ("tokens", "raw"):
    if (path / patterns[key]).is_file():
      found[key] = (path / patterns[key],)
  shards = sorted(path.glob(patterns["parquet"]))
  if shards:
    found["parquet"] = _check_shards(path, split, shards)
  folder_shards = sorted(path.glob(patterns["parquet-folder"]))
  if folder_shards:
    found["parquet-folder"] = tuple(folder_shards)

  if len(found) > 1:
    listing = "; ".join(f"{k}: {', '.join(p.name for p in v)}" for k, v in found.items())
    raise ValueError(
        f"{path}: several Wikitext layouts hold split {split!r} ({listing}); pass the file you "
        "mean, or a folder that holds one layout.")
  if not found:
    candidates = sorted(
        sub.name for sub in path.iterdir() if sub.is_dir() and any(
            any(sub.glob(p)) for p in ("wiki.*.tokens", "wiki.*.raw", "*.parquet", "*/*.parquet")))
    hint = (f" Sub-folders that look like Wikitext: {', '.join(candidates)}; pass one of them."
            if candidates else "")
    raise FileNotFoundError(
        f"{path}: no Wikitext {split!r} split. Looked for "
        f"{', '.join(repr(p) for p in patterns.values())} in this folder.{hint}")
  (key, files), = found.items()
  return WikitextFiles(split, "parquet" if key.startswith("parquet") else key, files)


def _check_shards(folder: Path, split: str, shards: list[Path]) -> tuple[Path, ...]:
  """Orders `{split}-NNNNN-of-MMMMM.parquet` shards and checks that all M are present."""
  counts = set()
  by_index = {}
  for shard in shards:
    match = _SHARD_NAME.match(shard.name)
    if match is None or match["split"] != split:
      continue
    counts.add(int(match["count"]))
    by_index[int(match["index"])] = shard
  if len(counts) != 1:
    raise ValueError(
        f"{folder}: {split!r} shards disagree on their total ({sorted(counts)} in "
        f"{[s.name for s in shards]}); remove the stale ones.")
  count, = counts
  missing = sorted(set(range(count)) - set(by_index))
  if missing:
    raise ValueError(
        f"{folder}: split {split!r} has {count} parquet shards but "
        f"{', '.join(f'{split}-{i:05d}-of-{count:05d}.parquet' for i in missing)} "
        "is/are missing (an incomplete download). Download the missing shards.")
  return tuple(by_index[i] for i in range(count))


def iter_wikitext_file_lines(files: WikitextFiles, *, errors: str = "strict") -> Iterator[str]:
  """Every line of a split exactly as stored (separators included), without the final '\\n'.

  Args:
    files: from `find_wikitext`.
    errors: codec error handler for the text layouts (the parquet layout is already decoded).
  """
  for path in files.files:
    if files.format == "parquet":
      yield from _iter_parquet_lines(path)
    else:
      yield from text_files.iter_lines(path, errors=errors)


def _iter_parquet_lines(path: Path) -> Iterator[str]:
  import pyarrow as pa  # Deferred: only the parquet layout needs it.
  import pyarrow.parquet as pq

  try:
    parquet = pq.ParquetFile(path)
  except (pa.ArrowInvalid, OSError) as e:
    raise ValueError(f"{path}: not a readable parquet file ({e}); re-download it.") from e
  if "text" not in parquet.schema_arrow.names:
    raise ValueError(
        f"{path}: expected a string column 'text' (the Hugging Face Wikitext layout), found "
        f"columns {parquet.schema_arrow.names}.")
  rows = 0
  try:
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=["text"]):
      for line in batch.column(0).to_pylist():
        rows += 1
        # A null row is a blank separator; the trailing '\n' is part of the stored string.
        yield "" if line is None else line.rstrip("\n")
  except (pa.ArrowInvalid, OSError) as e:
    raise ValueError(
        f"{path}: corrupt parquet data after {rows} rows ({e}); re-download it.") from e


def detokenize_joiners(text: str) -> str:
  """Rejoins Wikitext's `@-@`, `@,@` and `@.@` joiners: 'role @-@ playing' -> 'role-playing'."""
  return _JOINER.sub(r"\1", text)


def parse_heading(line: str) -> tuple[int, str] | None:
  """The (level, text) of a heading line, or None for a paragraph.

  Level 1 is an article title (` = Title = `, exactly one '=' on each side), level 2 a section
  (` = = Section = = `), level 3 a subsection, and so on.
  """
  stripped = line.strip()
  if not stripped.startswith("= "):
    return None
  title = _TITLE.match(stripped)
  if title and not title.group(1).endswith(" ="):
    return 1, title.group(1)
  section = _SECTION.match(stripped)
  if section and section.group(1).count("=") == section.group(3).count("="):
    return section.group(1).count("="), section.group(2)
  return None


def wikitext_lines(path: PathLike, split: str, *, detokenize: bool = False,
                   headings: bool = True, errors: str = "strict") -> Iterator[str]:
  """Streams the non-blank lines of a Wikitext split: paragraphs and (optionally) headings.

  Args:
    path: a folder in either layout, or one file (see `find_wikitext`).
    split: 'train', 'validation' (or 'valid') or 'test'.
    detokenize: rejoin `@-@`, `@,@`, `@.@` (for BPE); False keeps the word-level tokens.
    headings: keep heading lines ("= Title =", "= = Section = ="), as the standard LM benchmark
      does; False yields paragraphs only.
    errors: codec error handler for the text layouts.

  Yields:
    Stripped lines, separator lines dropped.
  """
  for line in iter_wikitext_file_lines(find_wikitext(path, split), errors=errors):
    stripped = line.strip()
    if not stripped or (not headings and parse_heading(stripped) is not None):
      continue
    yield detokenize_joiners(stripped) if detokenize else stripped


def wikitext_articles(path: PathLike, split: str, *, detokenize: bool = False,
                      errors: str = "strict") -> Iterator[WikitextArticle]:
  """Streams the articles of a Wikitext split, split at ` = Title = ` headings.

  Only one article is held in memory at a time. Section headings stay inside their article.

  Args:
    path, split, detokenize, errors: as in `wikitext_lines`.

  Yields:
    `WikitextArticle`s in file order.
  """
  title = ""
  lines: list[str] = []
  for line in wikitext_lines(path, split, detokenize=detokenize, errors=errors):
    heading = parse_heading(line) if line.startswith("= ") else None
    if heading is not None and heading[0] == 1:
      if lines:
        yield WikitextArticle(title, tuple(lines))
      title, lines = heading[1], []
    lines.append(line)
  if lines:
    yield WikitextArticle(title, tuple(lines))


def split_wikitext_sentences(paragraph: str) -> list[str]:
  """Splits one Moses-tokenised Wikitext paragraph into sentences.

  The tokeniser separates a sentence-final '.', '!' or '?' into its own token and leaves the
  period of abbreviations attached ("U.S.", "St."), so a standalone terminal token is a reliable
  boundary. Closing brackets after it, and a closing '"' when a quote is open, stay with the
  sentence ('he said . " Then' -> 'he said . "' | 'Then').

  Args:
    paragraph: one stripped line, tokens separated by single spaces.

  Returns:
    Sentences as space-joined tokens; joined with spaces they give back `paragraph`.
  """
  text = " ".join(paragraph.split())
  sentences = []
  start = 0
  for match in _SENTENCE_END.finditer(text):
    end = match.end()
    if end <= start:
      continue  # Inside a run already absorbed after a closing quote.
    if (text.startswith(' "', end) and _QUOTE_AFTER.match(text, end) and
        len(_QUOTE_TOKEN.findall(text, start, end)) % 2 == 1):
      end = _QUOTE_AFTER.match(text, end).end()  # Close the open quote, then any brackets.
    sentences.append(text[start:end].lstrip())
    start = end + 1
  if start < len(text):
    sentences.append(text[start:])
  return sentences


def wikitext_sentence_pairs(path: PathLike, split: str, *, context_sentences: int = 1,
                            detokenize: bool = False,
                            errors: str = "strict") -> Iterator[tuple[str, str]]:
  """(previous sentence(s), next sentence) examples within each article: the paper's seq2seq view.

  Sentences come from the article's paragraphs in order (headings are not sentences and are
  skipped); pairs run across paragraph boundaries but never across articles.

  Args:
    path, split, errors: as in `wikitext_lines`.
    context_sentences: how many previous sentences form the context (fewer at an article's start).
    detokenize: rejoin the joiners after sentence splitting (for BPE).

  Yields:
    (context, target) string pairs.
  """
  for article in wikitext_articles(path, split, errors=errors):
    sentences = (sentence for line in article.lines
                 if not (line.startswith("= ") and parse_heading(line))
                 for sentence in split_wikitext_sentences(line))
    if detokenize:
      sentences = (detokenize_joiners(s) for s in sentences)
    yield from text_files.context_target_pairs(sentences, context_size=context_sentences)
