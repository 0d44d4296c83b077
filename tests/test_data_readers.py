"""Readers for Wikitext, CC100 and text folders, on small files in the real formats.

`tests/fixtures/wikitext-2/wiki.test.tokens` is a hand-written file in the exact Wikitext layout
(leading space, trailing " \\n", blank separators, ` = Title = ` / ` = = S = = ` / ` = = = S = = = `
headings, `@-@` `@,@` `@.@` joiners, `<unk>`, a non-ASCII character). The `.raw`, parquet and `.xz`
variants are written from it in `tmp_path` with the libraries the real files were made with
(pyarrow, lzma). Expected values are written out by hand or computed with naive whole-file string
operations, never with the readers themselves.
"""

import bz2
import gzip
import lzma
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from hashmoe.data import cc100, text_files, wikitext

FIXTURE = Path(__file__).parent / "fixtures" / "wikitext-2" / "wiki.test.tokens"

TITLES = ["Harbour Light Station", "Marsh Tit"]
FIRST_ARTICLE_SENTENCES = [
    "Harbour Light Station is a <unk> lighthouse on the north coast of Tern Island .",
    "It was built in 1 @,@ 854 by the U.S. Lighthouse Board , and its lamp stood 12 @.@ 5 metres "
    "above the sea .",
    "The keeper 's log called it \" the loneliest post on the coast . \"",
    "Visitors were rare .",
    "The station was rebuilt after a storm in 1901 ( the worst on record ) .",
    "A second keeper was appointed !",
    "In 1962 the light was automated and the last keeper left .",
]
SECOND_ARTICLE_SENTENCES = [
    "The marsh tit is a small <unk> bird in the tit family .",
    "It is a well @-@ known visitor to gardens in winter .",
    "Adults are 11 @.@ 5 cm long .",
    "Does it migrate ?",
    "It does not .",
]


def _fixture_text() -> str:
  return FIXTURE.read_text(encoding="utf-8")


def _reference_lines(text: str) -> list[str]:
  """Naive reference: every non-blank line, stripped."""
  return [line.strip() for line in text.split("\n") if line.strip()]


def _write_parquet_shards(folder: Path, split: str, rows: list[str], num_shards: int,
                          row_group_size: int = 4) -> list[Path]:
  """Writes rows like the Hugging Face copy: `{split}-0000N-of-0000M.parquet`, column `text`."""
  folder.mkdir(parents=True, exist_ok=True)
  per_shard = -(-len(rows) // num_shards)
  paths = []
  for i in range(num_shards):
    path = folder / f"{split}-{i:05d}-of-{num_shards:05d}.parquet"
    table = pa.table({"text": pa.array(rows[i * per_shard:(i + 1) * per_shard], pa.string())})
    pq.write_table(table, path, row_group_size=row_group_size)
    paths.append(path)
  return paths


def _hf_rows(text: str) -> list[str]:
  """The Hugging Face rows of a Wikitext file: one per line, '\\n' kept, blank lines as ''."""
  return ["" if not line.strip() else line for line in text.splitlines(keepends=True)]


@pytest.fixture
def wikitext_folders(tmp_path):
  """The fixture as wikitext-2/, wikitext-2-raw/ and the HF wikitext-2-v1/ parquet layout."""
  text = _fixture_text()
  tokens = tmp_path / "wikitext-2"
  raw = tmp_path / "wikitext-2-raw"
  hf = tmp_path / "wikitext-2-v1"
  for folder in (tokens, raw):
    folder.mkdir()
  for split in ("train", "valid", "test"):
    (tokens / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    (raw / f"wiki.{split}.raw").write_text(text.replace("<unk>", "grey"), encoding="utf-8")
  rows = _hf_rows(text)
  # Three train shards cut mid-article; small row groups so batches cross row groups too.
  _write_parquet_shards(hf, "train", rows, num_shards=3)
  _write_parquet_shards(hf, "validation", rows, num_shards=1)
  _write_parquet_shards(hf, "test", rows, num_shards=1)
  return {"tokens": tokens, "raw": raw, "parquet": hf}


# --------------------------------------------------------------------------------------------------
# Wikitext: locating files.


def test_find_wikitext_each_layout_and_split(wikitext_folders):
  tokens = wikitext.find_wikitext(wikitext_folders["tokens"], "validation")
  assert tokens.format == "tokens" and tokens.split == "validation"
  assert tokens.files == (wikitext_folders["tokens"] / "wiki.valid.tokens",)
  assert wikitext.find_wikitext(wikitext_folders["tokens"], "valid") == tokens
  raw = wikitext.find_wikitext(wikitext_folders["raw"], "train")
  assert raw.format == "raw" and raw.files == (wikitext_folders["raw"] / "wiki.train.raw",)
  parquet = wikitext.find_wikitext(wikitext_folders["parquet"], "train")
  assert parquet.format == "parquet"
  assert [p.name for p in parquet.files] == [
      "train-00000-of-00003.parquet", "train-00001-of-00003.parquet",
      "train-00002-of-00003.parquet"]
  single = wikitext.find_wikitext(wikitext_folders["parquet"], "test")
  assert [p.name for p in single.files] == ["test-00000-of-00001.parquet"]
  one_file = wikitext.find_wikitext(tokens.files[0], "test")
  assert one_file.files == tokens.files and one_file.format == "tokens"


def test_find_wikitext_older_parquet_folder_layout(tmp_path):
  folder = tmp_path / "wikitext-103-v1"
  (folder / "train").mkdir(parents=True)
  for name in ("0001.parquet", "0000.parquet"):
    pq.write_table(pa.table({"text": [" = A = \n"]}), folder / "train" / name)
  found = wikitext.find_wikitext(folder, "train")
  assert found.format == "parquet"
  assert [p.name for p in found.files] == ["0000.parquet", "0001.parquet"]


def test_find_wikitext_nothing_found_lists_what_it_looked_for(tmp_path, wikitext_folders):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError) as error:
    wikitext.find_wikitext(empty, "validation")
  message = str(error.value)
  for pattern in ("wiki.valid.tokens", "wiki.valid.raw", "validation-*-of-*.parquet",
                  "validation/*.parquet"):
    assert pattern in message
  # The parent of the layouts: the error points at the sub-folders to pass instead.
  with pytest.raises(FileNotFoundError, match="wikitext-2-v1") as error:
    wikitext.find_wikitext(tmp_path, "test")
  assert "wikitext-2-raw" in str(error.value)
  with pytest.raises(FileNotFoundError, match="no such file or folder"):
    wikitext.find_wikitext(tmp_path / "absent", "test")
  with pytest.raises(ValueError, match="split='dev2'"):
    wikitext.find_wikitext(empty, "dev2")
  bad_suffix = tmp_path / "notes.md"
  bad_suffix.write_text("x")
  with pytest.raises(ValueError, match="notes.md"):
    wikitext.find_wikitext(bad_suffix, "test")


def test_find_wikitext_missing_shard_and_ambiguous_layouts(tmp_path):
  folder = tmp_path / "hf"
  paths = _write_parquet_shards(folder, "train", [" = A = \n", "", " b \n", " c \n"], 3,
                                row_group_size=1)
  paths[1].unlink()
  with pytest.raises(ValueError, match="train-00001-of-00003.parquet"):
    wikitext.find_wikitext(folder, "train")
  mixed = tmp_path / "mixed"
  mixed.mkdir()
  (mixed / "wiki.test.tokens").write_text(" a \n")
  (mixed / "wiki.test.raw").write_text(" a \n")
  with pytest.raises(ValueError, match="several Wikitext layouts"):
    wikitext.find_wikitext(mixed, "test")


# --------------------------------------------------------------------------------------------------
# Wikitext: views.


@pytest.mark.parametrize("layout", ["tokens", "raw", "parquet"])
def test_wikitext_lines_match_naive_reference(wikitext_folders, layout):
  text = _fixture_text()
  if layout == "raw":
    text = text.replace("<unk>", "grey")
  expected = _reference_lines(text)
  assert list(wikitext.wikitext_lines(wikitext_folders[layout], "train")) == expected
  assert len(expected) == 12
  paragraphs = list(wikitext.wikitext_lines(wikitext_folders[layout], "test", headings=False))
  assert paragraphs == [line for line in expected if not line.startswith("=")]
  detokenized = list(wikitext.wikitext_lines(wikitext_folders[layout], "test", detokenize=True))
  assert detokenized == [
      line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".") for line in expected]
  assert "built in 1,854 by" in detokenized[1] and "12.5 metres" in detokenized[1]
  assert not any("@" in line for line in detokenized)


def test_iter_wikitext_file_lines_keeps_every_stored_line(wikitext_folders):
  # Separators included, '\n' removed: the same lines from the text file and from the parquet rows.
  expected = _fixture_text().split("\n")[:-1]
  for layout in ("tokens", "parquet"):
    files = wikitext.find_wikitext(wikitext_folders[layout], "train")
    lines = list(wikitext.iter_wikitext_file_lines(files))
    if layout == "parquet":  # The Hugging Face copy stores blank separator lines as "".
      expected = [line if line.strip() else "" for line in expected]
    assert lines == expected


def test_parquet_null_rows_are_separators(tmp_path):
  folder = tmp_path / "hf"
  folder.mkdir()
  rows = [None, " = T = \n", "", " p one . \n", None, " p two . \n"]
  pq.write_table(pa.table({"text": pa.array(rows, pa.string())}),
                 folder / "test-00000-of-00001.parquet", row_group_size=2)
  assert list(wikitext.wikitext_lines(folder, "test")) == ["= T =", "p one .", "p two ."]


def test_wikitext_articles_split_at_titles_only(wikitext_folders):
  text = _fixture_text()
  # Naive reference: cut the whole file at lines that are exactly " = X = " (one '=' per side).
  pieces = re.split(r"(?m)^ = (?!=)(.+?) = $", text)
  expected_titles = pieces[1::2]
  expected_bodies = [_reference_lines(body) for body in pieces[2::2]]
  assert expected_titles == TITLES
  for layout in ("tokens", "parquet"):
    articles = list(wikitext.wikitext_articles(wikitext_folders[layout], "train"))
    assert [a.title for a in articles] == TITLES
    for article, title, body in zip(articles, expected_titles, expected_bodies):
      assert article.lines == (f"= {title} =", *body)
      assert article.text == "\n".join(article.lines)
    # Sections and subsections stay inside their article.
    assert "= = History = =" in articles[0].lines
    assert "= = = 1890 \u2013 1901 = = =" in articles[0].lines
    assert "= = Description = =" in articles[1].lines
  detok = list(wikitext.wikitext_articles(wikitext_folders["tokens"], "test", detokenize=True))
  assert "well-known" in detok[1].text


def test_wikitext_articles_keep_text_before_first_title(tmp_path):
  path = tmp_path / "wiki.test.tokens"
  path.write_text(" \n orphan line . \n \n = A = \n \n body . \n", encoding="utf-8")
  articles = list(wikitext.wikitext_articles(path, "test"))
  assert [(a.title, a.lines) for a in articles] == [("", ("orphan line .",)),
                                                     ("A", ("= A =", "body ."))]


@pytest.mark.parametrize("line, expected", [
    (" = Valkyria Chronicles III = ", (1, "Valkyria Chronicles III")),
    ("= A =", (1, "A")),
    (" = = Gameplay = = ", (2, "Gameplay")),
    (" = = = 2000 \u2013 2005 = = = ", (3, "2000 \u2013 2005")),
    (" = E = mc2 = ", (1, "E = mc2")),
    (" The = sign is used . ", None),
    (" = = unbalanced = ", None),
    (" = A = = ", None),
    ("", None),
])
def test_parse_heading(line, expected):
  assert wikitext.parse_heading(line) == expected


@pytest.mark.parametrize("paragraph, expected", [
    ("One . Two ! Three ? Four", ["One .", "Two !", "Three ?", "Four"]),
    ('He said " stop . " Then he left .', ['He said " stop . "', "Then he left ."]),
    ('" Go . " And " stay . "', ['" Go . "', 'And " stay . "']),
    ("It ended ( in 1901 . ) Later .", ["It ended ( in 1901 . )", "Later ."]),
    ("The U.S. Army and St. Paul met .", ["The U.S. Army and St. Paul met ."]),
    ("What ? ! Really .", ["What ? !", "Really ."]),
    ("3 @.@ 5 m", ["3 @.@ 5 m"]),
    ("", []),
])
def test_split_wikitext_sentences(paragraph, expected):
  assert wikitext.split_wikitext_sentences(paragraph) == expected


def _naive_wikitext_sentences(tokens: list[str]) -> list[str]:
  """Reference: a per-token loop. A standalone '.', '!' or '?' ends a sentence, together with the
  terminal / closing-bracket tokens right after it and, if a '"' is open, the closing '"'."""
  sentences, current = [], []
  i = 0
  while i < len(tokens):
    current.append(tokens[i])
    if tokens[i] in (".", "!", "?"):
      quote_open = current.count('"') % 2 == 1
      while i + 1 < len(tokens) and (tokens[i + 1] in (".", "!", "?", ")", "]", "}") or
                                     (quote_open and tokens[i + 1] == '"')):
        quote_open = quote_open and tokens[i + 1] != '"'
        i += 1
        current.append(tokens[i])
      sentences.append(" ".join(current))
      current = []
    i += 1
  if current:
    sentences.append(" ".join(current))
  return sentences


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["word", "U.S.", "St.", "3", "@.@", ".", "!", "?", ")", "]", "(",
                                 '"', "...", "'s"]), max_size=30))
def test_split_wikitext_sentences_matches_per_token_loop(tokens):
  assert wikitext.split_wikitext_sentences(" ".join(tokens)) == _naive_wikitext_sentences(tokens)


def test_wikitext_sentence_pairs_stay_within_articles(wikitext_folders):
  pairs = list(wikitext.wikitext_sentence_pairs(wikitext_folders["tokens"], "test"))
  expected = [(a, b) for sentences in (FIRST_ARTICLE_SENTENCES, SECOND_ARTICLE_SENTENCES)
              for a, b in zip(sentences, sentences[1:])]
  assert pairs == expected
  assert list(wikitext.wikitext_sentence_pairs(wikitext_folders["parquet"], "train")) == expected
  # Two sentences of context; the second sentence of an article only has one before it.
  two = list(wikitext.wikitext_sentence_pairs(wikitext_folders["tokens"], "test",
                                              context_sentences=2))
  s = SECOND_ARTICLE_SENTENCES
  assert two[-4:] == [(s[0], s[1]), (f"{s[0]} {s[1]}", s[2]), (f"{s[1]} {s[2]}", s[3]),
                      (f"{s[2]} {s[3]}", s[4])]
  detok = list(wikitext.wikitext_sentence_pairs(wikitext_folders["tokens"], "test",
                                                detokenize=True))
  assert detok[-2] == ("Adults are 11.5 cm long .", "Does it migrate ?")
  assert detok[0][1] == ("It was built in 1,854 by the U.S. Lighthouse Board , and its lamp stood "
                         "12.5 metres above the sea .")


def test_wikitext_malformed_files_name_the_file(tmp_path):
  bad_utf8 = tmp_path / "wiki.test.tokens"
  bad_utf8.write_bytes(b" = A = \n \n caf\xe9 . \n")
  with pytest.raises(ValueError, match=r"wiki\.test\.tokens.*not valid utf-8"):
    list(wikitext.wikitext_lines(bad_utf8, "test"))
  assert list(wikitext.wikitext_lines(bad_utf8, "test", errors="replace"))[1] == "caf\ufffd ."
  folder = tmp_path / "hf"
  folder.mkdir()
  pq.write_table(pa.table({"content": ["x"]}), folder / "test-00000-of-00001.parquet")
  with pytest.raises(ValueError, match=r"test-00000-of-00001\.parquet.*'text'.*\['content'\]"):
    list(wikitext.wikitext_lines(folder, "test"))
  (folder / "test-00000-of-00001.parquet").write_bytes(b"<html>rate limited</html>")
  with pytest.raises(ValueError, match=r"test-00000-of-00001\.parquet: not a readable parquet"):
    list(wikitext.wikitext_lines(folder, "test"))


def test_detokenize_joiners():
  assert wikitext.detokenize_joiners("role @-@ playing 1 @,@ 000 3 @.@ 5 a - b") == (
      "role-playing 1,000 3.5 a - b")


# --------------------------------------------------------------------------------------------------
# CC100.

CC100_DOCUMENTS = [
    ["The first document opens here. It has two sentences.",
     "A second paragraph, which asks a question? Yes. Dr. Smith agreed."],
    ["Short document."],
    ["Third document, paragraph one!", "Paragraph two of the third document."],
]


def _cc100_text(documents) -> str:
  # Real layout: one paragraph per line, a blank line between documents, final newline.
  return "".join("\n".join(doc) + "\n\n" for doc in documents)


@pytest.fixture
def cc100_xz(tmp_path):
  path = tmp_path / "en.txt.xz"
  with lzma.open(path, "wt", encoding="utf-8") as f:
    f.write(_cc100_text(CC100_DOCUMENTS))
  return path


def test_cc100_documents_and_paragraphs_from_xz_plain_gz_bz2(tmp_path, cc100_xz):
  text = _cc100_text(CC100_DOCUMENTS)
  assert list(cc100.cc100_documents(cc100_xz)) == CC100_DOCUMENTS
  assert list(cc100.cc100_documents(tmp_path)) == CC100_DOCUMENTS  # Found in the folder.
  assert list(cc100.cc100_paragraphs(cc100_xz)) == [p for d in CC100_DOCUMENTS for p in d]
  plain = tmp_path / "plain" / "en.txt"
  plain.parent.mkdir()
  plain.write_text(text, encoding="utf-8")
  assert list(cc100.cc100_documents(plain.parent)) == CC100_DOCUMENTS
  other = tmp_path / "other"
  other.mkdir()
  with gzip.open(other / "en.txt.gz", "wt", encoding="utf-8") as f:
    f.write(text)
  assert list(cc100.cc100_documents(other)) == CC100_DOCUMENTS
  with bz2.open(other / "de.txt.bz2", "wt", encoding="utf-8") as f:
    f.write(text)
  assert list(cc100.cc100_documents(other, language="de")) == CC100_DOCUMENTS
  with pytest.raises(FileNotFoundError, match=r"fr\.txt\.xz"):
    list(cc100.cc100_documents(other, language="fr"))


def test_cc100_streams_without_reading_whole_file(tmp_path, monkeypatch):
  # A file with many documents: the reader must hand out the first document after decompressing
  # only the start of the stream. Count the bytes lzma hands out to prove it.
  path = tmp_path / "en.txt.xz"
  with lzma.open(path, "wt", encoding="utf-8") as f:
    for i in range(5000):
      f.write(f"Document {i} paragraph one.\nDocument {i} paragraph two.\n\n")
  decompressed = []
  real_open = lzma.open

  class CountingFile:
    def __init__(self, inner):
      self.inner = inner

    def __enter__(self):
      return self

    def __exit__(self, *args):
      self.inner.close()

    def __iter__(self):
      for line in self.inner:
        decompressed.append(len(line))
        yield line

  counting_open = lambda *args, **kwargs: CountingFile(real_open(*args, **kwargs))
  monkeypatch.setattr(text_files, "_OPENERS", {**text_files._OPENERS, "xz": counting_open})
  documents = cc100.cc100_documents(path)
  assert next(documents) == ["Document 0 paragraph one.", "Document 0 paragraph two."]
  assert len(decompressed) == 3  # Two paragraph lines and the blank line that ends the document.
  documents.close()


def test_cc100_truncated_and_corrupt_xz_name_the_file(tmp_path, cc100_xz):
  data = cc100_xz.read_bytes()
  truncated = tmp_path / "truncated" / "en.txt.xz"
  truncated.parent.mkdir()
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"truncated/en\.txt\.xz.*truncated"):
    list(cc100.cc100_documents(truncated))
  corrupt = tmp_path / "corrupt.txt.xz"
  corrupt.write_bytes(data[:24] + bytes(b ^ 0xFF for b in data[24:40]) + data[40:])
  with pytest.raises(ValueError, match=r"corrupt\.txt\.xz"):
    list(cc100.cc100_documents(corrupt))
  not_xz = tmp_path / "page.txt.xz"
  not_xz.write_text("<html>Not Found</html>")
  with pytest.raises(ValueError, match=r"page\.txt\.xz: the name says xz"):
    list(cc100.cc100_documents(not_xz))


def test_cc100_invalid_utf8_replaced_by_default_strict_on_request(tmp_path):
  path = tmp_path / "en.txt.xz"
  with lzma.open(path, "wb") as f:
    f.write(b"caf\xe9 au lait.\n\n")
  assert list(cc100.cc100_paragraphs(path)) == ["caf\ufffd au lait."]
  with pytest.raises(ValueError, match=r"en\.txt\.xz.*not valid utf-8"):
    list(cc100.cc100_paragraphs(path, errors="strict"))


def test_cc100_pairs_within_documents(cc100_xz):
  assert list(cc100.cc100_pairs(cc100_xz)) == [
      ("The first document opens here.", "It has two sentences."),
      ("It has two sentences.", "A second paragraph, which asks a question?"),
      ("A second paragraph, which asks a question?", "Yes."),
      ("Yes.", "Dr. Smith agreed."),
      ("Third document, paragraph one!", "Paragraph two of the third document."),
  ]
  assert list(cc100.cc100_pairs(cc100_xz, unit="paragraph")) == [
      tuple(CC100_DOCUMENTS[0]), tuple(CC100_DOCUMENTS[2])]
  with pytest.raises(ValueError, match="unit='word'"):
    list(cc100.cc100_pairs(cc100_xz, unit="word"))


def test_cc100_split_by_document_hash(tmp_path):
  documents = [[f"Document number {i}.", f"Its second paragraph {i * 7}."] for i in range(300)]
  documents.append(list(documents[5]))  # An exact duplicate.
  path = tmp_path / "en.txt.xz"
  with lzma.open(path, "wt", encoding="utf-8") as f:
    f.write(_cc100_text(documents))
  kwargs = dict(validation_fraction=0.2, test_fraction=0.2)
  splits = {s: list(cc100.cc100_documents(path, s, **kwargs))
            for s in ("train", "validation", "test")}
  keys = {s: [tuple(d) for d in docs] for s, docs in splits.items()}
  # A partition by document: every document in exactly one split, in file order within it.
  assert sorted(sum(keys.values(), [])) == sorted(tuple(d) for d in documents)
  for split, docs in keys.items():
    others = set().union(*(set(v) for s, v in keys.items() if s != split))
    assert not set(docs) & others
    assert docs == [tuple(d) for d in documents if tuple(d) in set(docs)]
  # Binomial(301, 0.2): mean 60, sd 7; 30..90 is > 4 sd.
  assert all(30 <= len(keys[s]) <= 90 for s in ("validation", "test"))
  assert list(cc100.cc100_documents(path, "valid", **kwargs)) == splits["validation"]
  with pytest.raises(ValueError, match="test_fraction=1.5"):
    list(cc100.cc100_documents(path, "test", test_fraction=1.5))


# --------------------------------------------------------------------------------------------------
# Shared segmentation.


def test_iter_lines_plain_text_bom_crlf_and_stray_cr(tmp_path):
  path = tmp_path / "a.txt"
  path.write_bytes(b"\xef\xbb\xbffirst\r\nsecond\r\n\r\nthird")
  assert list(text_files.iter_lines(path)) == ["first", "second", "", "third"]
  # Only '\n' ends a line: a lone '\r' inside a CC100 paragraph does not split it.
  path.write_bytes(b"one\rparagraph\nnext\n")
  assert list(text_files.iter_lines(path)) == ["one\rparagraph", "next"]
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    list(text_files.iter_lines(tmp_path / "missing.txt"))


def test_detect_compression_from_magic_bytes(tmp_path):
  data = b"some text\n"
  files = {"a.xz": lzma.compress(data), "b.gz": gzip.compress(data), "c.bz2": bz2.compress(data),
           "d.txt": data, "renamed.txt": lzma.compress(data)}
  for name, content in files.items():
    (tmp_path / name).write_bytes(content)
  assert {name: text_files.detect_compression(tmp_path / name) for name in files} == {
      "a.xz": "xz", "b.gz": "gzip", "c.bz2": "bz2", "d.txt": None, "renamed.txt": "xz"}
  assert list(text_files.iter_lines(tmp_path / "renamed.txt")) == ["some text"]
  (tmp_path / "e.gz").write_bytes(data)
  with pytest.raises(ValueError, match=r"e\.gz: the name says gzip"):
    text_files.detect_compression(tmp_path / "e.gz")


def test_normalize_split():
  assert [text_files.normalize_split(s) for s in ("train", "valid", "dev", "validation",
                                                  "test")] == [
      "train", "validation", "validation", "validation", "test"]
  with pytest.raises(ValueError, match="split='eval'"):
    text_files.normalize_split("eval")


def test_iter_blocks():
  lines = ["", "  a ", "b", " ", "", "c", "\t", "d  ", ""]
  assert list(text_files.iter_blocks(lines)) == [["a", "b"], ["c"], ["d"]]
  assert list(text_files.iter_blocks([])) == []


@pytest.mark.parametrize("text, expected", [
    ("One. Two! Three? Four", ["One.", "Two!", "Three?", "Four"]),
    ("Mr. Smith met Dr. Jones at 5 p.m. on Main St. yesterday.",
     ["Mr. Smith met Dr. Jones at 5 p.m. on Main St. yesterday."]),
    ("J. R. R. Tolkien wrote it. It sold.", ["J. R. R. Tolkien wrote it.", "It sold."]),
    ("Plan a. Then plan b. Done.", ["Plan a.", "Then plan b.", "Done."]),
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ("It costs 3.5 dollars. 2020 was odd.", ["It costs 3.5 dollars.", "2020 was odd."]),
    ("lower case. continues here", ["lower case. continues here"]),
    ("Wait... What?", ["Wait...", "What?"]),
    ("(Aside.) Next one.", ["(Aside.)", "Next one."]),
    ("   ", []),
])
def test_split_sentences(text, expected):
  assert text_files.split_sentences(text) == expected


def test_context_target_pairs_against_naive_loop():
  units = ["a", "b", "c", "d", "e"]
  for k in (1, 2, 3, 10):
    expected = []
    for i in range(1, len(units)):
      expected.append((" ".join(units[max(0, i - k):i]), units[i]))
    assert list(text_files.context_target_pairs(units, context_size=k)) == expected
  assert list(text_files.context_target_pairs(["only"])) == []
  assert list(text_files.context_target_pairs(iter(units), context_size=2, separator="\n"))[1] == (
      "a\nb", "c")
  with pytest.raises(ValueError, match="context_size=0"):
    list(text_files.context_target_pairs(units, context_size=0))


# --------------------------------------------------------------------------------------------------
# Text folders.


def _make_folder(root: Path, names: list[str]) -> None:
  for name in names:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"Text of {name}.\n", encoding="utf-8")


def test_split_text_files_partitions_by_file(tmp_path):
  names = [f"book{i:02d}.txt" for i in range(18)] + [f"sub/dir/chapter{i}.txt" for i in range(6)]
  _make_folder(tmp_path / "corpus", names)
  (tmp_path / "corpus" / "README.md").write_text("not text data")
  splits = text_files.split_text_files(tmp_path / "corpus", validation_fraction=0.125,
                                       test_fraction=0.25)
  relative = {s: [p.relative_to(tmp_path / "corpus").as_posix() for p in files]
              for s, files in splits.items()}
  assert sorted(sum(relative.values(), [])) == sorted(names)  # Every .txt once, README ignored.
  assert [len(relative[s]) for s in ("train", "validation", "test")] == [15, 3, 6]
  for files in relative.values():
    assert files == sorted(files)
  # Deterministic, and independent of where the folder lives.
  _make_folder(tmp_path / "copy", names)
  again = text_files.split_text_files(tmp_path / "copy", validation_fraction=0.125,
                                      test_fraction=0.25)
  assert {s: [p.relative_to(tmp_path / "copy").as_posix() for p in f]
          for s, f in again.items()} == relative
  # Another seed is another shuffle.
  reseeded = text_files.split_text_files(tmp_path / "corpus", validation_fraction=0.125,
                                         test_fraction=0.25, seed=1)
  assert reseeded["test"] != splits["test"]


def test_split_text_files_moves_few_files_when_one_is_added(tmp_path):
  names = [f"f{i:03d}.txt" for i in range(40)]
  _make_folder(tmp_path, names)
  before = {p.name: s for s, files in text_files.split_text_files(tmp_path).items() for p in files}
  _make_folder(tmp_path, ["new.txt"])
  after = {p.name: s for s, files in text_files.split_text_files(tmp_path).items() for p in files}
  moved = [n for n in names if before[n] != after[n]]
  # Counts stay 4/4 (int(4.1 + 0.5)); the new file can push at most one file out of each held-out
  # split.
  assert len(moved) <= 2


def test_split_text_files_small_folders_and_bad_arguments(tmp_path):
  _make_folder(tmp_path, ["a.txt", "b.txt", "c.txt"])
  splits = text_files.split_text_files(tmp_path)
  assert sorted(len(files) for files in splits.values()) == [1, 1, 1]
  (tmp_path / "c.txt").unlink()
  with pytest.raises(ValueError, match=r"2 file\(s\).*at least 3"):
    text_files.split_text_files(tmp_path)
  with pytest.raises(ValueError, match="validation_fraction=0.0"):
    text_files.split_text_files(tmp_path, validation_fraction=0.0)
  with pytest.raises(ValueError, match="validation_fraction \\+ test_fraction"):
    text_files.split_text_files(tmp_path, validation_fraction=0.5, test_fraction=0.5)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty: no files matching '\*\.txt'"):
    text_files.find_text_files(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="not a directory"):
    text_files.find_text_files(tmp_path / "a.txt")


def test_text_folder_paragraphs_lines_and_pairs(tmp_path):
  contents = {
      "a.txt": "First line of a.\nSecond line of a.\n\nNew paragraph. Two sentences.\n",
      "b.txt": "\ufeffOnly paragraph of b.\r\n",
      "c/d.txt": "Para d1.\n\n\n  Para d2, indented.  \n",
  }
  for name, text in contents.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text, encoding="utf-8")
  splits = text_files.split_text_files(tmp_path)
  expected_paragraphs = {
      "a.txt": ["First line of a. Second line of a.", "New paragraph. Two sentences."],
      "b.txt": ["Only paragraph of b."],
      "c/d.txt": ["Para d1.", "Para d2, indented."],
  }
  expected_lines = {
      "a.txt": ["First line of a.", "Second line of a.", "New paragraph. Two sentences."],
      "b.txt": ["Only paragraph of b."],
      "c/d.txt": ["Para d1.", "Para d2, indented."],
  }
  for split, files in splits.items():
    names = [p.relative_to(tmp_path).as_posix() for p in files]
    assert list(text_files.text_folder_paragraphs(tmp_path, split)) == [
        p for n in names for p in expected_paragraphs[n]]
    assert list(text_files.text_folder_paragraphs(tmp_path, split, unit="line")) == [
        p for n in names for p in expected_lines[n]]
    pairs = list(text_files.text_folder_sentence_pairs(tmp_path, split))
    if names == ["a.txt"]:
      assert pairs == [("First line of a.", "Second line of a."),
                       ("Second line of a.", "New paragraph."),
                       ("New paragraph.", "Two sentences.")]
    elif names == ["c/d.txt"]:
      assert pairs == [("Para d1.", "Para d2, indented.")]
    else:
      assert pairs == []
  with pytest.raises(ValueError, match="unit='word'"):
    list(text_files.text_folder_paragraphs(tmp_path, "train", unit="word"))


def test_text_folder_encoding_errors_are_clear(tmp_path):
  _make_folder(tmp_path, ["a.txt", "b.txt", "c.txt"])
  for name in ("a.txt", "b.txt", "c.txt"):
    (tmp_path / name).write_bytes("Fa\u00e7ade of {}.\n".format(name).encode("latin-1"))
  split = "train"
  with pytest.raises(ValueError, match=r"\.txt: bytes that are not valid utf-8.*latin-1"):
    list(text_files.text_folder_paragraphs(tmp_path, split))
  paragraphs = list(text_files.text_folder_paragraphs(tmp_path, split, encoding="latin-1"))
  assert len(paragraphs) == 1 and paragraphs[0].startswith("Fa\u00e7ade of ")


def test_zstd_text_files_read_like_the_others_and_truncation_is_an_error(tmp_path):
  lines = [f"line {i} " + "x" * (i % 50) for i in range(3000)]
  data = ("\n".join(lines) + "\n").encode()
  cctx = zstandard.ZstdCompressor()
  # Two frames, as `cat a.zst b.zst` or a multi-threaded zstd writes.
  path = tmp_path / "en.txt.zst"
  half = len(data) // 2 + 3  # Inside a line: the split must not show.
  path.write_bytes(cctx.compress(data[:half]) + cctx.compress(data[half:]))
  assert text_files.detect_compression(path) == "zstd"
  assert list(text_files.iter_lines(path)) == lines
  truncated = tmp_path / "cut.txt.zst"
  truncated.write_bytes(path.read_bytes()[:-20])
  with pytest.raises(ValueError, match=r"cut\.txt\.zst: the zstd stream ends inside a frame"):
    list(text_files.iter_lines(truncated))
  latin = tmp_path / "latin.zst"
  latin.write_bytes(cctx.compress("caf\u00e9\n".encode("latin-1")))
  with pytest.raises(text_files.TextDecodeError, match=r"latin\.zst: bytes that are not valid"):
    list(text_files.iter_lines(latin))
  assert list(text_files.iter_lines(latin, encoding="latin-1")) == ["caf\u00e9"]
