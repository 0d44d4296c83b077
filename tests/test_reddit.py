"""Tests for hashmoe.data.reddit on small dumps written in pushshift's real formats."""
import collections
import random
import re
import threading

import pytest
import zstandard

from hashmoe.data import reddit
from hashmoe.data.reddit import (Comment, CorruptDumpError, RedditFilterConfig, Submission, Thread)
from textdata import compress as _compress
from textdata import ndjson as _ndjson
from textdata import reddit_comment as _comment
from textdata import reddit_submission as _submission


# ------------------------------------------------------------------------------------------------
# Fixture helpers.
# ------------------------------------------------------------------------------------------------


def _write(path, data, fmt):
  path.write_bytes(_compress(data, fmt))
  return path


def _thread(comments, submission=None, link="t3_p"):
  return Thread(link_id=link, submission=submission, comments=tuple(comments))


def _c(cid, parent, body, author="alice", created=0, link="t3_p"):
  return Comment(id=cid, link_id=link, parent_id=parent, author=author, body=body,
                 created_utc=created)


# ------------------------------------------------------------------------------------------------
# Reading.
# ------------------------------------------------------------------------------------------------


def test_zstd_frames_split_a_line_and_a_utf8_character(tmp_path):
  records = [
      _comment("a1", "t3_p", "t3_p", "first line, plain ascii"),
      _comment("a2", "t1_a1", "t3_p", "caf\u00e9 na\u00efve \U0001F600 smile"),
      _comment("a3", "t1_a2", "t3_p", "line three \u2028 has a raw line separator"),
      _comment("a4", "t1_a3", "t3_p", "\u00fcber \u4e2d\u6587 last", created="1400000009"),
  ]
  data = _ndjson(records)
  line_split = data.index(b'"body"', data.index(b'"a3"'))  # Inside line 3.
  char_split = data.index("\U0001F600".encode()) + 2  # Inside the 4-byte emoji.
  with pytest.raises(UnicodeDecodeError):
    data[:char_split].decode("utf-8")  # The split really cuts a character.
  pieces = [data[:char_split], data[char_split:line_split], data[line_split:]]
  # One frame declares a 256 MiB window and no content size, as `zstd --long` writes: libzstd's
  # default limit (128 MiB) refuses it, so this checks the reader raised max_window_size.
  long_params = zstandard.ZstdCompressionParameters.from_level(
      3, window_log=28, write_content_size=False)
  long_frame = zstandard.ZstdCompressor(compression_params=long_params).compressobj()
  long_frame = long_frame.compress(pieces[2]) + long_frame.flush()
  with pytest.raises(zstandard.ZstdError):
    zstandard.ZstdDecompressor().decompressobj().decompress(long_frame)
  frames = [zstandard.ZstdCompressor().compress(pieces[0]),
            zstandard.ZstdCompressor().compress(pieces[1]), long_frame]
  path = tmp_path / "RC_2015-01.zst"
  path.write_bytes(b"".join(frames))

  for read_size in (3, 7, 1 << 18):
    stats = {}
    got = list(reddit.iter_json_lines(path, stats=stats, read_size=read_size))
    assert got == records, read_size
    assert stats == {"lines": 4}
  comments = list(reddit.read_comments(path))
  assert [c.body for c in comments] == [r["body"] for r in records]
  assert comments[3].created_utc == 1_400_000_009


@pytest.mark.parametrize("fmt,name", [
    ("bz2", "RC_2011-01.bz2"), ("xz", "RC_2017-11.xz"), ("gz", "askscience_comments.gz"),
    ("plain", "RC_2012-05"), ("zst", "RC_2019-01"),  # No suffix: detected from the magic bytes.
])
def test_formats_and_created_utc_forms(tmp_path, fmt, name):
  records = [
      _comment("b1", "t3_q", "t3_q", "int timestamp", created=1_300_000_000),
      _comment("b2", "t1_b1", "q", "string timestamp", created="1300000001"),
      _comment("b3", "t1_b2", "t3_q", "float timestamp", created=1_300_000_002.0),
      _comment("b4", "t1_b3", "t3_q", "float string", created="1300000003.0"),
      _comment("b5", "t1_b4", "t3_q", "bad timestamp", created="yesterday"),
      {"id": "b6", "parent_id": "x_b5", "link_id": "t3_q", "body": "bad parent", "created_utc": 1},
      {"id": "b7", "parent_id": "t1_b4", "link_id": "t3_q", "created_utc": 1},  # No body.
  ]
  path = _write(tmp_path / name, _ndjson(records, newline="\r\n" if fmt == "plain" else "\n"),
                fmt)
  stats = {}
  comments = list(reddit.read_comments(path, stats=stats))
  assert comments == [
      Comment("b1", "t3_q", "t3_q", "alice", "int timestamp", 1_300_000_000, "test"),
      Comment("b2", "t3_q", "t1_b1", "alice", "string timestamp", 1_300_000_001, "test"),
      Comment("b3", "t3_q", "t1_b2", "alice", "float timestamp", 1_300_000_002, "test"),
      Comment("b4", "t3_q", "t1_b3", "alice", "float string", 1_300_000_003, "test"),
  ]
  assert stats == {"lines": 7, "comments_read": 4, "malformed_record": 3}


def test_read_submissions(tmp_path):
  records = [
      _submission("p1", "A title", "some self text", created="1500000000"),
      _submission("t3_p2", "Link post", None),
      {"id": "p3", "selftext": "no title", "created_utc": 1},
  ]
  path = _write(tmp_path / "RS_2017-06.zst", _ndjson(records), "zst")
  stats = {}
  subs = list(reddit.read_submissions(path, stats=stats))
  assert subs == [Submission("p1", "A title", "some self text", "op", 1_500_000_000, "test"),
                  Submission("p2", "Link post", "", "op", 1_400_000_000, "test")]
  assert subs[0].link_id == "t3_p1"
  assert stats == {"lines": 3, "submissions_read": 2, "malformed_record": 1}


def test_wrong_kind_of_file_warns(tmp_path):
  path = _write(tmp_path / "dump.jsonl", _ndjson([_submission("p1", "t")]), "plain")
  with pytest.warns(RuntimeWarning, match="submissions"):
    assert list(reddit.read_comments(path)) == []


def test_malformed_lines_are_skipped_counted_and_warned(tmp_path):
  good = [_comment("m1", "t3_m", "t3_m", "fine one"), _comment("m2", "t1_m1", "t3_m", "fine two")]
  data = (_ndjson(good[:1]) + b'{"id": "broken", "body": \n' + b"\n   \n" + b"[1, 2, 3]\n"
          + b'{"id": "bad\xff\xfe bytes"}\n' + _ndjson(good[1:]) + b'{"truncated": tr')
  path = _write(tmp_path / "RC_2016-02.xz", data, "xz")
  stats = {}
  with pytest.warns(RuntimeWarning, match=r"skipped 4 of 6 lines .*line\(s\) \[2, 5, 6, 8\]"):
    got = list(reddit.iter_json_lines(path, stats=stats))
  assert got == good
  assert stats == {"lines": 6, "malformed_json": 3, "invalid_utf8": 1}


@pytest.mark.parametrize("fmt", ["zst", "bz2", "xz", "gz"])
def test_truncated_stream_raises_naming_the_file(tmp_path, fmt):
  records = [_comment(f"t{i}", "t3_t", "t3_t", f"comment number {i} " * 20) for i in range(200)]
  data = _ndjson(records)
  if fmt == "zst":  # Several frames; the cut falls inside the last one.
    compressed = b"".join(zstandard.ZstdCompressor().compress(data[i:i + 4000])
                          for i in range(0, len(data), 4000))
  else:
    compressed = _compress(data, fmt)
  path = tmp_path / f"RC_2018-03.{fmt}"
  path.write_bytes(compressed[:-7])
  with pytest.raises(CorruptDumpError, match=re.escape(str(path)) + ".*truncated"):
    list(reddit.iter_json_lines(path))


def test_corrupt_and_mislabelled_streams_raise(tmp_path):
  data = _ndjson([_comment(f"k{i}", "t3_k", "t3_k", "text " * 50) for i in range(50)])
  compressed = bytearray(zstandard.ZstdCompressor().compress(data))
  compressed[30:60] = b"\x00" * 30
  corrupt = tmp_path / "RC_2020-01.zst"
  corrupt.write_bytes(bytes(compressed))
  with pytest.raises(CorruptDumpError, match=re.escape(str(corrupt)) + ".*corrupt zstd"):
    list(reddit.iter_json_lines(corrupt))
  mislabelled = _write(tmp_path / "RC_2020-02.zst", data, "plain")
  with pytest.raises(CorruptDumpError, match=re.escape(str(mislabelled)) + ".*name says zstd"):
    list(reddit.iter_json_lines(mislabelled))
  empty = tmp_path / "RC_2020-03.bz2"
  empty.write_bytes(b"")
  with pytest.raises(CorruptDumpError, match="empty"):
    list(reddit.iter_json_lines(empty))
  with pytest.raises(FileNotFoundError):
    list(reddit.iter_json_lines(tmp_path / "RC_missing.zst"))


def test_a_line_without_newline_over_the_limit_raises(tmp_path):
  path = _write(tmp_path / "RC_2013-07.bz2", b'{"id": "' + b"x" * 5000 + b'"}\n', "bz2")
  assert len(list(reddit.iter_json_lines(path, max_line_chars=6000))) == 1
  with pytest.raises(CorruptDumpError, match="line 1 is over max_line_chars=1000"):
    list(reddit.iter_json_lines(path, max_line_chars=1000, read_size=64))


def test_detect_compression(tmp_path):
  skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"meta"
  cases = {"a.zst": _compress(b"x\n", "zst"), "b": skippable + _compress(b"x\n", "zst"),
           "c.bz2": _compress(b"x\n", "bz2"), "d": _compress(b"x\n", "xz"),
           "e.gz": _compress(b"x\n", "gz"), "f.json": b"{}\n"}
  expected = {"a.zst": "zstd", "b": "zstd", "c.bz2": "bz2", "d": "xz", "e.gz": "gzip",
              "f.json": None}
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
    assert reddit.detect_compression(tmp_path / name) == expected[name], name
  # A skippable frame is metadata: the reader passes over it.
  (tmp_path / "g.zst").write_bytes(skippable + _compress(b'{"k": 1}\n', "zst"))
  assert list(reddit.iter_json_lines(tmp_path / "g.zst")) == [{"k": 1}]


# ------------------------------------------------------------------------------------------------
# Threads.
# ------------------------------------------------------------------------------------------------


def test_build_threads_groups_across_files_and_dedups(tmp_path):
  month1 = [
      _comment("c2", "t1_c1", "t3_zz", "reply in zz", created=20),
      _comment("c1", "t3_zz", "t3_zz", "top in zz", created=10),
      _comment("d1", "t3_aa", "t3_aa", "top in aa", created=15),
  ]
  month2 = [
      _comment("c3", "t1_c2", "t3_zz", "late reply in zz", created=30),
      _comment("c1", "t3_zz", "t3_zz", "top in zz (re-release copy)", created=10),
      _comment("e1", "t3_mm", "t3_mm", "top in mm", created=5),
  ]
  rc1 = _write(tmp_path / "RC_2015-01.zst", _ndjson(month1), "zst")
  rc2 = _write(tmp_path / "RC_2015-02.bz2", _ndjson(month2), "bz2")
  rs = _write(tmp_path / "RS_2015-01.zst", _ndjson([
      _submission("zz", "ZZ title"), _submission("aa", "AA title"), _submission("zz", "dup"),
      _submission("nn", "no comments")]), "zst")
  work = tmp_path / "work"
  work.mkdir()
  stats = {}
  comments = [c for p in (rc1, rc2) for c in reddit.read_comments(p)]
  threads = list(reddit.build_threads(comments, reddit.read_submissions(rs), work_dir=work,
                                      stats=stats))
  assert [t.link_id for t in threads] == ["t3_aa", "t3_mm", "t3_zz"]
  assert [t.submission.title if t.submission else None for t in threads] == [
      "AA title", None, "ZZ title"]
  assert [[c.id for c in t.comments] for t in threads] == [["d1"], ["e1"], ["c1", "c2", "c3"]]
  assert threads[2].comments[0].body == "top in zz"  # The first copy read wins.
  assert stats == {"comments_indexed": 6, "submissions_indexed": 4, "duplicate_comment": 1,
                   "duplicate_submission": 1, "threads": 3}
  assert list(work.iterdir()) == []  # The index is deleted when iteration ends...

  keep = {"t3_zz"}
  it = reddit.build_threads(comments, keep_link=keep.__contains__, work_dir=work)
  assert [c.id for c in next(it).comments] == ["c1", "c2", "c3"]
  assert len(list(work.iterdir())) == 1
  it.close()
  assert list(work.iterdir()) == []  # ... and when it is abandoned.


def _in_new_thread(fn):
  """fn() on a thread of its own, joined; its exception is re-raised here."""
  result = {}

  def target():
    try:
      result["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      result["error"] = e

  thread = threading.Thread(target=target)
  thread.start()
  thread.join()
  if "error" in result:
    raise result["error"]
  return result.get("value")


def test_build_threads_is_resumed_and_closed_from_other_threads(tmp_path):
  # tf.data's from_generator resumes a reader from its own pool threads (and closes it from yet
  # another): the thread index must not be tied to the thread that opened it.
  comments = [_c("a1", "t3_a", "top of a", link="t3_a"), _c("b1", "t3_b", "top of b", link="t3_b"),
              _c("c1", "t3_c", "top of c", link="t3_c")]
  work = tmp_path / "work"
  work.mkdir()
  threads = reddit.build_threads(comments, work_dir=work)
  first = _in_new_thread(lambda: next(threads))  # Builds the index on this thread.
  second = _in_new_thread(lambda: next(threads))
  assert [first.link_id, second.link_id] == ["t3_a", "t3_b"]
  assert len(list(work.iterdir())) == 1
  _in_new_thread(threads.close)
  assert list(work.iterdir()) == []  # Closed from a third thread, the index is still deleted.


# ------------------------------------------------------------------------------------------------
# Filters and pairs.
# ------------------------------------------------------------------------------------------------

_CFG = RedditFilterConfig()


@pytest.mark.parametrize("body,author,depth,expected", [
    ("a perfectly fine comment", "alice", 1, None),
    ("a perfectly fine comment", "alice", 7, None),
    ("a perfectly fine comment", "alice", 8, "depth"),
    ("a perfectly fine comment", "AutoModerator", 1, "bot"),
    ("a perfectly fine comment", "automoderator", 1, "bot"),
    ("a perfectly fine comment", "RemindMeBot", 1, "bot"),
    ("a perfectly fine comment", "bottle_fan", 1, None),
    ("[deleted]", "[deleted]", 1, "removed"),
    ("[removed]", "alice", 1, "removed"),
    ("x" * 2049, "alice", 1, "long_no_space"),
    ("x" * 2048, "alice", 1, None),
    ("x" * 2049 + " y", "alice", 1, None),
    ("see https://example.com for more", "alice", 1, "url"),
    ("go to www.example.com please", "alice", 1, "url"),
    ("ftp://files.example.org has it", "alice", 1, "url"),
    ("I use Node.js and e.g. python", "alice", 1, None),
    ("\u00f1and\u00fa is a bird", "alice", 1, "non_ascii_start"),
    ("\U0001F600 emoji first", "alice", 1, "non_ascii_start"),
    ("the \u00f1and\u00fa is a bird", "alice", 1, None),
    ("okay", "alice", 1, "too_short"),
    ("okay!", "alice", 1, None),
    (" ".join(["w"] * 129), "alice", 1, "too_many_tokens"),
    (" ".join(["w"] * 128), "alice", 1, None),
])
def test_filter_reason(body, author, depth, expected):
  assert reddit.filter_reason(body, author, depth, _CFG) == expected


def test_filter_reason_uses_the_given_token_count():
  body = "twelve chars"
  config = RedditFilterConfig(max_comment_tokens=11)
  assert reddit.filter_reason(body, "a", 1, config) is None  # 2 words.
  assert reddit.filter_reason(body, "a", 1, config, count_tokens=len) == "too_many_tokens"


def test_config_validation():
  with pytest.raises(ValueError, match="max_depth=0"):
    RedditFilterConfig(max_depth=0)
  with pytest.raises(ValueError, match="url_pattern"):
    RedditFilterConfig(url_pattern="(")
  config = RedditFilterConfig(bot_authors=["SomeHelper"], bot_suffixes=[])
  assert config.is_bot("somehelper") and not config.is_bot("RemindMeBot")
  assert RedditFilterConfig(bot_suffixes="bot").is_bot("SneakPeekBot")  # A string is one suffix.


def test_clean():
  text = "  a &gt; b &amp;amp; c\n\n  second\tpara  "
  assert _CFG.clean(text) == "a > b &amp; c second para"
  raw = RedditFilterConfig(unescape_html=False, normalize_whitespace=False)
  assert raw.clean(text) == "a &gt; b &amp;amp; c\n\n  second\tpara"


# Each rule's offending comment: (body, author). Every one gets a good child and grandchild, which
# must disappear with it.
_BAD = {
    "bot": ("a perfectly normal sentence", "AutoModerator"),
    "removed": ("[removed]", "alice"),
    "long_no_space": ("z" * 2100, "alice"),
    "url": ("look at https://example.com/x ok", "alice"),
    "non_ascii_start": ("\u00e9t\u00e9 was hot this year", "alice"),
    "too_short": ("lol", "alice"),
    "too_many_tokens": (" ".join(f"t{i}" for i in range(130)), "alice"),
}


def test_each_rule_drops_the_comment_and_its_children():
  comments = [_c("g", "t3_p", "good top comment", created=0),
              _c("gc", "t1_g", "good reply here", created=1)]
  for i, (reason, (body, author)) in enumerate(_BAD.items()):
    comments += [_c(f"bad{i}", "t3_p", body, author=author, created=10 + i),
                 _c(f"kid{i}", f"t1_bad{i}", f"innocent child {i}", created=100 + i),
                 _c(f"gkid{i}", f"t1_kid{i}", f"innocent grandchild {i}", created=200 + i)]
  random.Random(0).shuffle(comments)  # Input order must not matter.
  thread = _thread(comments, Submission("p", "Title", "Self text", "op", 0))
  stats = {}
  pairs = list(reddit.thread_pairs(thread, stats=stats))
  assert pairs == [("Title\nSelf text", "good top comment"),
                   ("Title\nSelf text\ngood top comment", "good reply here")]
  assert stats == {**{f"dropped_{r}": 1 for r in _BAD}, "dropped_descendant": 2 * len(_BAD),
                   "pairs": 2}


def test_depth_over_seven_is_dropped_with_children():
  chain = [_c("d1", "t3_p", "depth one here", created=1)]
  for d in range(2, 10):
    chain.append(_c(f"d{d}", f"t1_d{d - 1}", f"depth {d} here", created=d))
  stats = {}
  pairs = list(reddit.thread_pairs(_thread(chain, Submission("p", "Root", "", "op", 0)),
                                   stats=stats))
  assert [r for _, r in pairs] == [f"depth {d} here" for d in ["one", 2, 3, 4, 5, 6, 7]]
  assert stats == {"pairs": 7, "dropped_depth": 1, "dropped_descendant": 1}


def test_context_is_the_ancestor_chain_title_first():
  comments = [
      _c("r1", "t3_p", "root &gt; comment\n\nwith   paragraphs", created=1),
      _c("r2", "t1_r1", "second level", created=2),
      _c("s2", "t1_r1", "sibling of second", created=3),
      _c("r3", "t1_r2", "third level &amp; more", created=4),
  ]
  thread = _thread(comments, Submission("p", "My title", "the self\ntext", "op", 0))
  assert list(reddit.thread_pairs(thread)) == [
      ("My title\nthe self text", "root > comment with paragraphs"),
      ("My title\nthe self text\nroot > comment with paragraphs", "second level"),
      ("My title\nthe self text\nroot > comment with paragraphs\nsecond level",
       "third level & more"),
      ("My title\nthe self text\nroot > comment with paragraphs", "sibling of second"),
  ]
  # A link post (no selftext) and a removed selftext contribute only the title; a custom separator.
  config = RedditFilterConfig(separator=" | ")
  for selftext in ("", "[removed]"):
    thread = _thread(comments[:2], Submission("p", "Only title", selftext, "op", 0))
    assert list(reddit.thread_pairs(thread, config)) == [
        ("Only title", "root > comment with paragraphs"),
        ("Only title | root > comment with paragraphs", "second level")]


def test_orphans_and_threads_without_submission():
  comments = [_c("o1", "t3_p", "top level comment", created=1),
              _c("o2", "t1_o1", "reply to top", created=2),
              _c("x1", "t1_missing", "parent not archived", created=3),
              _c("x2", "t1_x1", "child of orphan", created=4),
              _c("y1", "t3_other", "claims another post", created=5)]
  stats = {}
  assert list(reddit.thread_pairs(_thread(comments), stats=stats)) == [
      ("top level comment", "reply to top")]
  assert stats == {"empty_context": 1, "pairs": 1, "orphaned": 3}


def test_context_and_response_caps_keep_the_right_ends():
  words = [f"w{i}" for i in range(400)]
  turns = [" ".join(words[i:i + 100]) for i in range(0, 400, 100)]
  comments = [_c("k1", "t3_p", turns[1], created=1), _c("k2", "t1_k1", turns[2], created=2),
              _c("k3", "t1_k2", turns[3], created=3)]
  thread = _thread(comments, Submission("p", turns[0], "", "op", 0))
  pairs = list(reddit.thread_pairs(thread))
  context, response = pairs[-1]
  full = "\n".join(turns[:3])
  assert context.split() == words[300 - 128:300] and full.endswith(context)
  assert response == turns[3]
  assert pairs[0][0] == turns[0]  # 100 tokens: under the cap, unchanged.
  # A longer response is admitted when the filter allows it, then cut at its start.
  config = RedditFilterConfig(max_comment_tokens=None, max_response_tokens=10,
                              max_context_tokens=5)
  long_reply = _c("k2", "t1_k1", " ".join(words), created=2)
  pairs = list(reddit.thread_pairs(_thread([comments[0], long_reply]), config))
  assert pairs == [(" ".join(words[195:200]), " ".join(words[:10]))]


def _naive_keep_last(text, max_tokens, count):
  for i in [m.start() for m in re.finditer(r"\S+", text)] + [len(text)]:
    if count(text[i:]) <= max_tokens:
      return text[i:]


def _naive_keep_first(text, max_tokens, count):
  for j in [m.end() for m in re.finditer(r"\S+", text)][::-1] + [0]:
    if count(text[:j]) <= max_tokens:
      return text[:j]


def test_keep_tokens_match_a_naive_scan():
  rng = random.Random(1)
  counters = [reddit.whitespace_token_count, len, lambda s: sum(-(-len(w) // 3) for w in s.split())]
  for trial in range(300):
    text = " ".join("".join(rng.choice("abcde") for _ in range(rng.randint(1, 6)))
                    for _ in range(rng.randint(0, 30)))
    count = counters[trial % len(counters)]
    limit = rng.randint(1, 40)
    got_last = reddit.keep_last_tokens(text, limit, count)
    got_first = reddit.keep_first_tokens(text, limit, count)
    if count(text.split()[-1] if text else "") <= limit:  # The naive scan needs a fitting word.
      assert got_last == _naive_keep_last(text, limit, count), (text, limit)
    if count(text.split()[0] if text else "") <= limit:
      assert got_first == _naive_keep_first(text, limit, count), (text, limit)
    assert count(got_last) <= limit and text.endswith(got_last)
    assert count(got_first) <= limit and text.startswith(got_first)
  # One "word" over the limit on its own is cut by characters.
  assert reddit.keep_last_tokens("ab abcdefghij", 4, len) == "ghij"
  assert reddit.keep_first_tokens("abcdefghij ab", 4, len) == "abcd"
  assert reddit.keep_last_tokens("a b c", None) == "a b c"


# ------------------------------------------------------------------------------------------------
# Splits and the whole pipeline.
# ------------------------------------------------------------------------------------------------


def test_thread_split_is_deterministic_and_proportional():
  ids = [f"t3_{i:06x}" for i in range(6000)]
  fractions = (0.6, 0.25, 0.15)
  splits = [reddit.thread_split(i, fractions) for i in ids]
  counts = collections.Counter(splits)
  for name, fraction in zip(reddit.SPLITS, fractions):  # ~5 binomial standard deviations.
    assert abs(counts[name] / len(ids) - fraction) < 5 * (fraction * (1 - fraction) / 6000)**0.5
  assert splits == [reddit.thread_split(i[3:], fractions) for i in ids]  # With or without t3_.
  salted = [reddit.thread_split(i, fractions, salt="v2") for i in ids]
  assert 0 < sum(a != b for a, b in zip(splits, salted)) < len(ids)
  assert {reddit.thread_split(i, (1.0, 0.0, 0.0)) for i in ids} == {"train"}
  assert {reddit.thread_split(i, (0.0, 0.0, 1.0)) for i in ids} == {"test"}
  for bad in [(0.5, 0.5), (0.5, 0.6, 0.1), (1.2, -0.2, 0.0)]:
    with pytest.raises(ValueError, match="fractions"):
      reddit.thread_split("t3_a", bad)


def _split_fixture(tmp_path):
  rng = random.Random(3)
  comments, submissions = [], []
  for n in range(60):
    post = f"p{n:03d}"
    submissions.append(_submission(post, f"title of {post}", f"body of {post}"))
    comments.append(_comment(f"{post}a", f"t3_{post}", f"t3_{post}", f"{post} top answer",
                             created=rng.randint(0, 99)))
    comments.append(_comment(f"{post}b", f"t1_{post}a", f"t3_{post}", f"{post} reply one",
                             created=100 + rng.randint(0, 99)))
    comments.append(_comment(f"{post}c", f"t1_{post}b", f"t3_{post}", "AutoModerator says hi",
                             author="AutoModerator", created=200))
  comments.sort(key=lambda r: r["created_utc"])  # Dumps are in time order: threads interleave.
  half = len(comments) // 2
  rc = [_write(tmp_path / "RC_2016-01.zst", _ndjson(comments[:half]), "zst"),
        _write(tmp_path / "RC_2016-02.bz2", _ndjson(comments[half:]), "bz2")]
  rs = [_write(tmp_path / "RS_2016-01.xz", _ndjson(submissions), "xz")]
  return rc, rs


def test_reddit_pairs_splits_by_thread(tmp_path):
  rc, rs = _split_fixture(tmp_path)
  everything = list(reddit.reddit_pairs(rc, rs, "train", split_fractions=(1, 0, 0),
                                        work_dir=tmp_path))
  assert len(everything) == 120  # Two per thread; the bot comment yields none.
  assert everything[:2] == [("title of p000\nbody of p000", "p000 top answer"),
                            ("title of p000\nbody of p000\np000 top answer", "p000 reply one")]

  fractions = (0.5, 0.25, 0.25)
  by_split, stats = {}, {}
  for split in ("train", "valid", "test"):
    by_split[split] = list(reddit.reddit_pairs(rc, rs, split, split_fractions=fractions,
                                               stats=stats if split == "train" else None))
  assert all(by_split.values())
  assert sorted(p for pairs in by_split.values() for p in pairs) == sorted(everything)
  thread_splits = collections.defaultdict(set)
  for split, pairs in by_split.items():
    for _, response in pairs:
      thread_splits[response[:4]].add(split)
  assert len(thread_splits) == 60 and all(len(s) == 1 for s in thread_splits.values())
  # Same pairs, same order, whatever the file order.
  assert list(reddit.reddit_pairs(rc[::-1], rs, "validation", split_fractions=fractions)) == (
      by_split["valid"])
  n_train = len(by_split["train"]) // 2
  assert stats["pairs"] == 2 * n_train and stats["dropped_bot"] == n_train
  assert stats["comments_read"] == 180 and stats["comments_indexed"] == 3 * n_train
  assert all(stats[f"dropped_{r}"] == 0 for r in reddit.FILTER_REASONS if r != "bot")


def test_reddit_pairs_checks_its_arguments(tmp_path):
  rc, rs = _split_fixture(tmp_path)
  # Checked when called, before any file is read.
  with pytest.raises(ValueError, match="named like a submissions dump"):
    reddit.reddit_pairs(rs, rc)
  with pytest.raises(FileNotFoundError, match="RC_1999-01.zst"):
    reddit.reddit_pairs(tmp_path / "RC_1999-01.zst")
  with pytest.raises(ValueError, match="split='dev2'"):
    reddit.reddit_pairs(rc, rs, "dev2")
  with pytest.raises(ValueError, match="fractions"):
    reddit.reddit_pairs(rc, rs, split_fractions=(0.9, 0.2, 0.0))
  # A lone path (not a list) is one file, and comments alone still give reply pairs.
  pairs = list(reddit.reddit_pairs(rc[0], split_fractions=(1, 0, 0)))
  assert pairs and all(r.endswith("reply one") and c.endswith("top answer") for c, r in pairs)
