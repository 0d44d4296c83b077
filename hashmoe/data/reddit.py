"""pushshift.io Reddit: streaming dump readers, thread rebuilding, BlenderBot filters, splits.

The paper trains its seq2seq models on pushshift.io Reddit following BlenderBot (Roller et al.
2021, Sec. 5.1; Roller et al. 2020, "Recipes for building an open-domain chatbot"): the model
generates a comment conditioned on the whole thread that leads to it. This module turns the dumps
as users download them into those (context, response) pairs, in four stages that each stream:

1. **Reading** (`iter_json_lines`, `read_comments`, `read_submissions`). Monthly dumps `RC_YYYY-MM`
   / `RS_YYYY-MM` and per-subreddit `<sub>_comments.zst` / `<sub>_submissions.zst`, compressed as
   zstd (2 GiB window), bz2, xz, gzip, or not at all: newline-delimited JSON read in fixed-size
   chunks, never whole. A malformed line is skipped, counted and warned about; a truncated or
   corrupt compressed stream raises `CorruptDumpError` naming the file.
2. **Threads** (`build_threads`). A month's comments arrive in time order, so one thread's comments
   are scattered through the whole file (and replies spill into later months' files). Rebuilding
   threads therefore needs a global grouping by `link_id`; this module does it in an on-disk SQLite
   index (stdlib `sqlite3`) with bounded memory. See `build_threads` for why SQLite.
3. **Pairs** (`thread_pairs`). BlenderBot's filters drop a comment *and its whole subtree*; every
   surviving comment becomes a response whose context is its ancestor chain (title and selftext
   first, then comments root -> parent), each side capped at 128 tokens (the context keeps its most
   recent end).
4. **Splits** (`thread_split`). A deterministic hash of `link_id` assigns whole threads to
   train/validation/test, so no comment's context ever leaks across splits.

`reddit_pairs` wires the four together for one split.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import functools
import hashlib
import html
import itertools
import json
import os
import re
import shutil
import sqlite3
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from hashmoe.data import compression as compression_lib
from hashmoe.data.compression import DEFAULT_READ_SIZE, detect_compression
from hashmoe.data.text_files import SPLITS, normalize_split

PathLike = str | os.PathLike
Stats = MutableMapping[str, int]
CountTokens = Callable[[str], int]

DEFAULT_SPLIT_FRACTIONS = (0.98, 0.01, 0.01)

# A pushshift line is at most a few hundred KB (Reddit caps comments at 10,000 characters and
# selftexts at 40,000). A "line" far longer than that means the file is not newline-delimited JSON:
# fail instead of buffering it all.
DEFAULT_MAX_LINE_CHARS = 1 << 24

# Lone surrogates U+DC80..U+DCFF are what the 'surrogateescape' handler makes of bytes that are not
# UTF-8; valid JSON text decoded from valid UTF-8 can never contain them as raw characters.
_UNDECODABLE = re.compile("[\\udc80-\\udcff]")
# Lines that failed to parse are reported by number, up to this many per file.
_REPORTED_BAD_LINES = 5


# A truncated or corrupt dump (names the file and the offset): the one error of every reader.
CorruptDumpError = compression_lib.CorruptFileError


# ------------------------------------------------------------------------------------------------
# 1. Reading.
# ------------------------------------------------------------------------------------------------


def _bump(stats: Stats | None, key: str, n: int = 1) -> None:
  if stats is not None and n:
    stats[key] = stats.get(key, 0) + n


def iter_json_lines(path: PathLike,
                    *,
                    stats: Stats | None = None,
                    read_size: int = DEFAULT_READ_SIZE,
                    max_line_chars: int = DEFAULT_MAX_LINE_CHARS) -> Iterator[dict[str, Any]]:
  """Streams the JSON objects of a newline-delimited JSON dump, compressed or not.

  Decompressed bytes arrive in pieces whose boundaries fall anywhere: inside a line and inside a
  multi-byte UTF-8 character. An incremental UTF-8 decoder carries a split character over to the
  next piece, and the text after the last '\\n' of a piece is carried over as the start of the
  next line. Lines are split on '\\n' only, never with `str.splitlines`, which would also split at
  U+2028, U+0085 and friends that JSON allows raw inside strings.

  A line that is not a JSON object, or not valid UTF-8, is skipped and counted (`malformed_json`,
  `invalid_utf8`); one `RuntimeWarning` per file names how many and the first line numbers. Blank
  lines are ignored.

  Args:
    path: an `RC_*`/`RS_*` monthly dump or a `<sub>_comments`/`<sub>_submissions` re-release,
      `.zst`, `.bz2`, `.xz`, `.gz` or plain (detected from the bytes, see `detect_compression`).
    stats: if given, incremented in place: `lines`, `malformed_json`, `invalid_utf8`.
    read_size: bytes read from the file per step.
    max_line_chars: a line longer than this is an error (the file is not newline-delimited).

  Yields:
    Each line's JSON object, in file order.

  Raises:
    FileNotFoundError: `path` does not exist.
    CorruptDumpError: a truncated or corrupt compressed stream, or a line over `max_line_chars`.
  """
  path = Path(path)
  if read_size <= 0:
    raise ValueError(f"read_size={read_size}; expected a positive number of bytes.")
  compression = detect_compression(path)
  # 'utf-8-sig' also drops a byte-order mark at the very start (json.loads rejects one).
  decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="surrogateescape")
  bad_lines: list[int] = []
  counts = collections.Counter()
  line_number = 0

  def parse(line: str, suspect: bool) -> dict[str, Any] | None:
    if not line.strip():
      return None
    counts["lines"] += 1
    if suspect and _UNDECODABLE.search(line):
      counts["invalid_utf8"] += 1
    else:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if isinstance(record, dict):
        return record
      counts["malformed_json"] += 1
    if len(bad_lines) < _REPORTED_BAD_LINES:
      bad_lines.append(line_number)
    return None

  chunks = compression_lib.decompressed_chunks(path, compression, read_size=read_size)
  pending = ""
  try:
    for chunk in itertools.chain(chunks, [None]):
      text = decoder.decode(b"", final=True) if chunk is None else decoder.decode(chunk)
      # Scanning each decoded piece once for undecodable bytes spares the per-line scan in the
      # (overwhelmingly common) case of a clean piece.
      suspect = bool(_UNDECODABLE.search(text) or _UNDECODABLE.search(pending))
      pieces = text.split("\n")
      pieces[0] = pending + pieces[0]
      # The text after the last newline is an incomplete line, except at the end of the file.
      pending = pieces.pop() if chunk is not None else ""
      if len(pending) > max_line_chars:
        raise CorruptDumpError(
            f"{path}: line {line_number + 1} is over max_line_chars={max_line_chars} characters "
            "without a newline; this is not newline-delimited JSON.")
      for line in pieces:
        line_number += 1
        record = parse(line, suspect)
        if record is not None:
          yield record
  finally:
    chunks.close()  # Closes the file now, not whenever the abandoned generator is collected.
    for key, n in counts.items():
      _bump(stats, key, n)
    skipped = counts["malformed_json"] + counts["invalid_utf8"]
    if skipped:
      warnings.warn(
          f"{path}: skipped {skipped} of {counts['lines']} lines ({counts['malformed_json']} not a "
          f"JSON object, {counts['invalid_utf8']} not UTF-8); first at line(s) {bad_lines}.",
          RuntimeWarning, stacklevel=2)


class Comment(NamedTuple):
  """One Reddit comment, as far as thread rebuilding needs it.

  Attributes:
    id: base36 comment id, without the `t1_` prefix.
    link_id: the thread (submission) it belongs to, `t3_<post id>`.
    parent_id: `t1_<comment id>` for a reply, `t3_<post id>` (== link_id) for a top-level comment.
    author: user name (`[deleted]` for deleted accounts).
    body: raw markdown text as in the dump (HTML entities `&gt;`, `&amp;` still escaped).
    created_utc: seconds since the epoch.
    subreddit: subreddit name, '' when absent.
  """
  id: str
  link_id: str
  parent_id: str
  author: str
  body: str
  created_utc: int
  subreddit: str = ""


class Submission(NamedTuple):
  """One Reddit submission (the root of a thread).

  Attributes:
    id: base36 post id, without the `t3_` prefix.
    title: the post title.
    selftext: the post body; '' for link posts.
    author: user name.
    created_utc: seconds since the epoch.
    subreddit: subreddit name, '' when absent.
  """
  id: str
  title: str
  selftext: str
  author: str
  created_utc: int
  subreddit: str = ""

  @property
  def link_id(self) -> str:
    """The `link_id` its comments carry: `t3_<id>`."""
    return "t3_" + self.id


def _parse_utc(value: Any) -> int:
  """`created_utc` is an int in most months but a string ("1134365188") or float in some."""
  if isinstance(value, bool):
    raise ValueError(value)
  if isinstance(value, int):
    return value
  if isinstance(value, float):
    return int(value)
  if isinstance(value, str):
    try:
      return int(value)
    except ValueError:
      return int(float(value))
  raise ValueError(value)


def _link_key(link_id: str) -> str:
  """`link_id` with its `t3_` prefix, so a bare post id names the same thread."""
  return link_id if link_id.startswith("t3_") else "t3_" + link_id


def _read_records(path: PathLike, parse: Callable[[dict[str, Any]], Any], kind: str,
                  stats: Stats | None, read_size: int) -> Iterator[Any]:
  """`parse` of each record of a dump, skipping (and counting as `malformed_record`) the records
  it rejects with KeyError/ValueError/TypeError/OverflowError; the rest count as `<kind>_read`.
  A file none of whose records is a `kind[:-1]` gets a warning: it is probably the other kind."""
  read = rejected = 0
  for record in iter_json_lines(path, stats=stats, read_size=read_size):
    try:
      value = parse(record)
    except (KeyError, ValueError, TypeError, OverflowError):
      rejected += 1
      _bump(stats, "malformed_record")
      continue
    read += 1
    _bump(stats, f"{kind}_read")
    yield value
  if rejected and not read:
    other = "submissions (RS_/_submissions)" if kind == "comments" else "comments (RC_/_comments)"
    warnings.warn(
        f"{path}: none of its {rejected} records is a {kind[:-1]}; is it a file of {other}?",
        RuntimeWarning, stacklevel=3)


def _comment(record: dict[str, Any]) -> Comment:
  comment_id, link_id = record["id"], record["link_id"]
  parent_id, body = record["parent_id"], record["body"]
  if not (isinstance(comment_id, str) and comment_id and isinstance(link_id, str) and link_id
          and isinstance(body, str) and isinstance(parent_id, str)
          and parent_id[:3] in ("t1_", "t3_")):
    raise ValueError(record)
  return Comment(
      id=comment_id,
      link_id=_link_key(link_id),
      parent_id=parent_id,
      author=str(record.get("author") or ""),
      body=body,
      created_utc=_parse_utc(record["created_utc"]),
      subreddit=str(record.get("subreddit") or ""))


def _submission(record: dict[str, Any]) -> Submission:
  post_id, title = record["id"], record["title"]
  selftext = record.get("selftext") or ""
  if not (isinstance(post_id, str) and post_id and isinstance(title, str)
          and isinstance(selftext, str)):
    raise ValueError(record)
  return Submission(
      id=post_id[3:] if post_id.startswith("t3_") else post_id,
      title=title,
      selftext=selftext,
      author=str(record.get("author") or ""),
      created_utc=_parse_utc(record["created_utc"]),
      subreddit=str(record.get("subreddit") or ""))


def read_comments(path: PathLike, *, stats: Stats | None = None,
                  read_size: int = DEFAULT_READ_SIZE) -> Iterator[Comment]:
  """Streams the comments of an `RC_*` or `<sub>_comments` dump.

  A record without a string `id`, `link_id`, `body`, a `parent_id` starting `t1_`/`t3_`, or with a
  `created_utc` that is not an integer (as int, float or string) is skipped and counted as
  `malformed_record`; the rest are `comments_read`. See `iter_json_lines` for the reading itself.

  Yields:
    `Comment`s in file order.
  """
  return _read_records(path, _comment, "comments", stats, read_size)


def read_submissions(path: PathLike, *, stats: Stats | None = None,
                     read_size: int = DEFAULT_READ_SIZE) -> Iterator[Submission]:
  """Streams the submissions of an `RS_*` or `<sub>_submissions` dump.

  A record without a string `id` and `title`, or with a `created_utc` that is not an integer, is
  skipped and counted as `malformed_record`; a missing or null `selftext` reads as '' (link posts).
  The rest are counted as `submissions_read`.

  Yields:
    `Submission`s in file order.
  """
  return _read_records(path, _submission, "submissions", stats, read_size)


# ------------------------------------------------------------------------------------------------
# 2. Threads.
# ------------------------------------------------------------------------------------------------


class Thread(NamedTuple):
  """All comments of one submission.

  Attributes:
    link_id: `t3_<post id>`.
    submission: the post, or None when no submission file held it.
    comments: the thread's comments, unique by id, ordered by (created_utc, id).
  """
  link_id: str
  submission: Submission | None
  comments: tuple[Comment, ...]


# SQLite page cache (and external-sort memory) in KiB: the index's whole memory footprint.
_SQLITE_CACHE_KIB = 64 * 1024
_INSERT_BATCH = 10_000


def _insert_batches(conn: sqlite3.Connection, sql: str, rows: Iterable[tuple]) -> None:
  it = iter(rows)
  while batch := list(itertools.islice(it, _INSERT_BATCH)):
    conn.execute("BEGIN")
    conn.executemany(sql, batch)
    conn.execute("COMMIT")


def build_threads(comments: Iterable[Comment],
                  submissions: Iterable[Submission] = (),
                  *,
                  keep_link: Callable[[str], bool] | None = None,
                  work_dir: PathLike | None = None,
                  stats: Stats | None = None) -> Iterator[Thread]:
  """Groups comments (and their submission) by thread, with memory bounded by the largest thread.

  Why an on-disk SQLite index: dumps are in time order, so the comments of one thread are spread
  over the whole month (and replies to an old post land in later months' files). No thread is
  complete before the last input comment is read, so a streaming "thread-complete order" pass is not
  possible without a global grouping, and holding a month (tens of millions of comments, tens of GB)
  in a dict is not an option. The comments and submissions are therefore appended to two rowid
  tables in a temporary SQLite file (append-only inserts are sequential writes), then each table is
  read back `ORDER BY link_id`: SQLite's external merge sort spills to temporary files and keeps
  memory at its page-cache size (64 MiB here), the two sorted streams are merge-joined in Python,
  and only one thread is materialised at a time. SQLite is in the standard library, needs no
  server, and its sorter is well tested at this scale. Disk use is about the size of the
  decompressed text that passes `keep_link`; the sorter's spill files go to SQLite's temporary
  directory (set `SQLITE_TMPDIR` to move them). The index is deleted when iteration ends, or when
  the generator is closed. The generator may be advanced and closed from different threads, one at
  a time, as tf.data's `from_generator` does.

  Duplicate comment ids (re-releases overlap the monthly dumps) keep their first occurrence and
  are counted as `duplicate_comment` (likewise `duplicate_submission`).

  Args:
    comments: comments from any number of files, in any order.
    submissions: submissions, in any order; threads without one get `submission=None`.
    keep_link: if given, only threads whose `link_id` it accepts are indexed (the split filter:
      other threads never touch the disk).
    work_dir: directory for the temporary index (default: the system temporary directory).
    stats: if given, incremented in place: `comments_indexed`, `submissions_indexed`,
      `duplicate_comment`, `duplicate_submission`, `threads`.

  Yields:
    One `Thread` per `link_id` that has at least one comment, in `link_id` order. Nothing is
    yielded before all of `comments` and `submissions` has been consumed.
  """
  tmp_dir = tempfile.mkdtemp(prefix="hashmoe-reddit-", dir=work_dir)
  # check_same_thread=False: this generator is resumed by whichever thread asks for the next
  # thread, and tf.data (`from_generator`) resumes it from its own pool threads, then closes it
  # from yet another one. The sqlite3 module's default refuses any use outside the creating
  # thread ("SQLite objects created in a thread can only be used in that same thread"). That is
  # safe to lift here because a generator never runs in two threads at once (Python raises
  # "generator already executing"), so the connection and its cursors are used strictly one call
  # at a time, which is all SQLite asks of a connection that moves between threads.
  conn = sqlite3.connect(os.path.join(tmp_dir, "threads.sqlite"), isolation_level=None,
                         check_same_thread=False)
  try:
    # The index is scratch: no journal, no fsync; a crash just means starting over.
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute(f"PRAGMA cache_size=-{_SQLITE_CACHE_KIB}")
    conn.execute("PRAGMA temp_store=FILE")
    # Columns in the records' field order, so a record is a row as it is and a row is a record.
    conn.execute(f"CREATE TABLE comments ({', '.join(Comment._fields)})")
    conn.execute(f"CREATE TABLE submissions (link_id, {', '.join(Submission._fields)})")

    indexed = collections.Counter()

    def comment_rows() -> Iterator[Comment]:
      for c in comments:
        if keep_link is None or keep_link(c.link_id):
          indexed["comments_indexed"] += 1
          yield c

    def submission_rows() -> Iterator[tuple]:
      for s in submissions:
        if keep_link is None or keep_link(s.link_id):
          indexed["submissions_indexed"] += 1
          yield (s.link_id,) + s

    try:
      placeholders = ", ".join("?" * len(Comment._fields))
      _insert_batches(conn, f"INSERT INTO comments VALUES ({placeholders})", comment_rows())
      _insert_batches(
          conn, f"INSERT INTO submissions VALUES (?, {', '.join('?' * len(Submission._fields))})",
          submission_rows())
    finally:
      for key, n in indexed.items():
        _bump(stats, key, n)

    # rowid last in the sort key: among exact duplicates the first one read wins, deterministically.
    comment_rows_sorted = conn.execute(
        f"SELECT {', '.join(Comment._fields)} FROM comments "
        "ORDER BY link_id, created_utc, id, rowid")
    submission_rows_sorted = conn.execute(
        f"SELECT link_id, {', '.join(Submission._fields)} FROM submissions ORDER BY link_id, rowid")
    next_submission = submission_rows_sorted.fetchone()
    counts = collections.Counter()
    try:
      for link_id, rows in itertools.groupby(comment_rows_sorted, key=lambda row: row[1]):
        thread_comments = []
        seen: set[str] = set()
        for row in rows:
          if row[0] in seen:
            counts["duplicate_comment"] += 1
          else:
            seen.add(row[0])
            thread_comments.append(Comment(*row))
        # Merge-join: advance the sorted submissions to this link_id.
        submission = None
        while next_submission is not None and next_submission[0] <= link_id:
          if next_submission[0] == link_id:
            if submission is None:
              submission = Submission(*next_submission[1:])
            else:
              counts["duplicate_submission"] += 1
          next_submission = submission_rows_sorted.fetchone()
        counts["threads"] += 1
        yield Thread(link_id, submission, tuple(thread_comments))
    finally:
      for key, n in counts.items():
        _bump(stats, key, n)
  finally:
    conn.close()
    shutil.rmtree(tmp_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# 3. Filters and pairs.
# ------------------------------------------------------------------------------------------------

# Accounts known to be bots whose names do not end in "bot" (those are caught by the suffix rule).
DEFAULT_BOT_AUTHORS = frozenset({
    "AutoModerator", "autotldr", "TotesMessenger", "TweetPoster", "MTGCardFetcher", "HelperBot_",
    "ImagesOfNetwork", "BotDefense",
})
# Anything with a scheme ("https://", "ftp://"), a "www." host, or a common top-level domain
# followed by a path ("imgur.com/a", "youtu.be/x": Reddit users often drop the scheme). A bare
# domain without a path is not matched, which keeps "Node.js" and "e.g." safe. Written with literal
# anchors and no (?i) or \b: Python's regex engine then scans ~5x faster, and this runs per comment.
DEFAULT_URL_PATTERN = r"://|www\.\w|WWW\.\w|\.(?:com|org|net|edu|gov|io|co|be|ly|gl|me|tv)/"
FILTER_REASONS = ("depth", "bot", "removed", "long_no_space", "url", "non_ascii_start", "too_short",
                  "too_many_tokens")


def whitespace_token_count(text: str) -> int:
  """Whitespace-separated words: the default stand-in for a BPE token count.

  BlenderBot's limits count BPE tokens. Without a tokenizer this counts words, which *under*-counts
  them (English averages ~1.3 GPT-2 BPE tokens per word, more for rare words and numbers), so the
  128-token limits then admit somewhat longer text. Pass the real count, e.g.
  `count_tokens=lambda s: len(sp.encode(s))` for a SentencePiece model, to match the paper.
  """
  return len(text.split())


@dataclasses.dataclass(frozen=True)
class RedditFilterConfig:
  """BlenderBot's Reddit filters and the pair format (Roller et al. 2020).

  A comment that fails any rule is dropped *with all its descendants*: their context would contain
  (or skip over) the dropped text. Rules are checked in `FILTER_REASONS` order and the first failure
  is the one counted.

  Attributes:
    bot_authors: authors dropped as bots, compared case-insensitively.
    bot_suffixes: authors ending in one of these (case-insensitive) are also bots. "bot" catches
      RemindMeBot, WikiTextBot, sneakpeekbot, ... and, rarely, a human (e.g. "Talbot"); set () to
      rely on `bot_authors` alone.
    removed_markers: bodies (after stripping) that mean deleted/removed content. Also applied to
      submission titles and selftexts, which are then left out of the context.
    max_chars_without_space: a body longer than this that contains no whitespace at all is dropped
      (pasted blobs, base64, long "words" of repeated characters).
    max_comment_tokens: a body over this many tokens is dropped; None disables.
    min_chars: a body shorter than this (stripped) is dropped.
    url_pattern: a regex; a body it matches "contains a URL" and is dropped.
    drop_non_ascii_start: drop a body whose first (non-space) character is not ASCII.
    max_depth: top-level comments have depth 1; deeper ones than this are dropped; None disables.
    max_context_tokens: the context keeps at most this many tokens, from its most recent end.
    max_response_tokens: the response keeps at most this many tokens, from its start.
    separator: joins the context's turns (title, selftext, then comments root -> parent).
    unescape_html: the dumps hold `&gt;`, `&amp;`, `&lt;` as Reddit's API escaped them; decode them
      before filtering, as the model should see the text.
    normalize_whitespace: collapse every whitespace run (newlines included) to one space, so that
      `separator` is unambiguous and a turn is one line.
  """
  bot_authors: frozenset[str] = DEFAULT_BOT_AUTHORS
  bot_suffixes: tuple[str, ...] = ("bot",)
  removed_markers: frozenset[str] = frozenset({"[deleted]", "[removed]", "[deleted by user]"})
  max_chars_without_space: int = 2048
  max_comment_tokens: int | None = 128
  min_chars: int = 5
  url_pattern: str = DEFAULT_URL_PATTERN
  drop_non_ascii_start: bool = True
  max_depth: int | None = 7
  max_context_tokens: int | None = 128
  max_response_tokens: int | None = 128
  separator: str = "\n"
  unescape_html: bool = True
  normalize_whitespace: bool = True

  def __post_init__(self):
    # Accept lists from gin/JSON (and a lone string as one name); compare names case-insensitively.
    def names(value):
      return (value,) if isinstance(value, str) else tuple(value)
    object.__setattr__(self, "bot_authors", frozenset(a.lower() for a in names(self.bot_authors)))
    object.__setattr__(self, "bot_suffixes", tuple(s.lower() for s in names(self.bot_suffixes)))
    object.__setattr__(self, "removed_markers", frozenset(names(self.removed_markers)))
    for name in ("max_chars_without_space", "min_chars"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name}={getattr(self, name)}; expected >= 0.")
    for name in ("max_comment_tokens", "max_depth", "max_context_tokens", "max_response_tokens"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{name}={value}; expected a positive integer or None.")
    try:
      re.compile(self.url_pattern)
    except re.error as e:
      raise ValueError(f"url_pattern={self.url_pattern!r} is not a valid regex: {e}") from e

  @functools.cached_property
  def url_regex(self) -> re.Pattern:
    return re.compile(self.url_pattern)

  def clean(self, text: str) -> str:
    """`text` as it enters filters and pairs: HTML entities decoded, whitespace normalised."""
    if self.unescape_html:
      text = html.unescape(text)
    return " ".join(text.split()) if self.normalize_whitespace else text.strip()

  def is_bot(self, author: str) -> bool:
    name = author.lower()
    return name in self.bot_authors or name.endswith(self.bot_suffixes)


_DEFAULT_CONFIG = RedditFilterConfig()


def filter_reason(body: str,
                  author: str,
                  depth: int,
                  config: RedditFilterConfig,
                  count_tokens: CountTokens = whitespace_token_count) -> str | None:
  """The first BlenderBot rule a comment fails, or None if it passes.

  Args:
    body: the comment text after `config.clean`.
    author: the comment's author.
    depth: 1 for a top-level comment, parent's depth + 1 for a reply.
    config: the filter settings.
    count_tokens: the token count the `max_comment_tokens` limit is measured in.

  Returns:
    One of `FILTER_REASONS`, or None.
  """
  stripped = body.strip()
  if config.max_depth is not None and depth > config.max_depth:
    return "depth"
  if config.is_bot(author):
    return "bot"
  if stripped in config.removed_markers:
    return "removed"
  if len(stripped) > config.max_chars_without_space and len(stripped.split(maxsplit=1)) == 1:
    return "long_no_space"
  if config.url_regex.search(stripped):
    return "url"
  if config.drop_non_ascii_start and stripped and not stripped[0].isascii():
    return "non_ascii_start"
  if len(stripped) < config.min_chars:
    return "too_short"
  if config.max_comment_tokens is not None and count_tokens(stripped) > config.max_comment_tokens:
    return "too_many_tokens"
  return None


def _last_fitting(candidates: Sequence[int], fits: Callable[[int], bool]) -> int:
  """Index of the last candidate that fits, by bisection; candidates[0] must fit."""
  lo, hi = 0, len(candidates) - 1  # Invariant: candidates[lo] fits.
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if fits(candidates[mid]):
      lo = mid
    else:
      hi = mid - 1
  return lo


def keep_last_tokens(text: str, max_tokens: int | None,
                     count_tokens: CountTokens = whitespace_token_count) -> str:
  """The longest suffix of `text` that starts at a word and has at most `max_tokens` tokens.

  Works with any token counter, not only with a tokenizer that can slice: it bisects over word
  starts (O(log words) calls of `count_tokens`), assuming a shorter suffix never has more tokens
  (true for whitespace and BPE counts). If even the last word is over the limit (one enormous BPE
  "word"), it bisects over that word's characters instead. The result always fits. With the
  default `whitespace_token_count` the cut is found directly in one pass over the text.

  Args:
    text: the text to cut.
    max_tokens: the limit; None returns `text` unchanged.
    count_tokens: the token count.
  """
  if max_tokens is None or count_tokens(text) <= max_tokens:
    return text
  if count_tokens is whitespace_token_count:
    # Same answer in one pass: the suffix starts at the max_tokens-th word from the end.
    head = text.rsplit(None, max_tokens)[0]
    return text[len(head):].lstrip()
  # Cut positions from latest (shortest suffix, the empty one, which always fits) to earliest.
  starts = [m.start() for m in re.finditer(r"\S+", text)]
  cuts = [len(text)] + starts[::-1]
  best = cuts[_last_fitting(cuts, lambda i: count_tokens(text[i:]) <= max_tokens)]
  if best == len(text) and starts:
    cuts = list(range(len(text), starts[-1] - 1, -1))  # Within the last word.
    best = cuts[_last_fitting(cuts, lambda i: count_tokens(text[i:]) <= max_tokens)]
  return text[best:]


def keep_first_tokens(text: str, max_tokens: int | None,
                      count_tokens: CountTokens = whitespace_token_count) -> str:
  """The longest prefix of `text` that ends at a word and has at most `max_tokens` tokens.

  The mirror image of `keep_last_tokens` (same bisection, assumptions and fast path).
  """
  if max_tokens is None or count_tokens(text) <= max_tokens:
    return text
  if count_tokens is whitespace_token_count:
    rest = text.split(None, max_tokens)[-1]  # Everything from word max_tokens + 1 on.
    return text[:len(text) - len(rest)].rstrip()
  ends = [m.end() for m in re.finditer(r"\S+", text)]
  cuts = [0] + ends
  best = cuts[_last_fitting(cuts, lambda j: count_tokens(text[:j]) <= max_tokens)]
  if best == 0 and ends:
    first_start = len(text) - len(text.lstrip())
    cuts = list(range(first_start, ends[0] + 1))  # Within the first word.
    best = cuts[_last_fitting(cuts, lambda j: count_tokens(text[:j]) <= max_tokens)]
  return text[:best]


def _subtree_size(children: dict[str, list[Comment]], comment: Comment) -> int:
  size, stack = 0, [comment]
  while stack:
    node = stack.pop()
    size += 1
    stack.extend(children.get("t1_" + node.id, ()))
  return size


def thread_pairs(thread: Thread,
                 config: RedditFilterConfig | None = None,
                 count_tokens: CountTokens | None = None,
                 stats: Stats | None = None) -> Iterator[tuple[str, str]]:
  """(context, response) pairs of one thread, after BlenderBot's filters.

  The thread is walked depth-first from its top-level comments, children in (created_utc, id)
  order. A comment failing a rule (`filter_reason`) is counted as `dropped_<reason>` and its
  descendants as `dropped_descendant`; none of them becomes a response or a context turn. A comment
  whose parent is not in the thread (its parent is in a month not read, or was never archived) is
  unreachable, and it and its descendants are counted as `orphaned`. A surviving comment whose
  context is empty (a top-level comment of a thread without its submission) is not emitted
  (`empty_context`), but still serves as context for its replies.

  Args:
    thread: one thread from `build_threads`.
    config: filters and format (default `RedditFilterConfig()`).
    count_tokens: the token count (default `whitespace_token_count`).
    stats: if given, incremented in place with the counts above and `pairs`.

  Yields:
    (context, response): context = the ancestor turns joined by `config.separator`, capped at
    `max_context_tokens` from its most recent end; response = the comment, capped at
    `max_response_tokens` from its start.
  """
  config = config or _DEFAULT_CONFIG
  count_tokens = count_tokens or whitespace_token_count
  children: dict[str, list[Comment]] = collections.defaultdict(list)
  unique: dict[str, Comment] = {}
  for c in thread.comments:
    if c.id not in unique:
      unique[c.id] = c
      children[c.parent_id].append(c)
  for siblings in children.values():
    siblings.sort(key=lambda c: (c.created_utc, c.id))

  root: tuple[str, ...] = ()
  if thread.submission is not None:
    for text in (thread.submission.title, thread.submission.selftext):
      text = config.clean(text)
      if text and text not in config.removed_markers:
        root += (text,)

  response_cap = config.max_response_tokens
  if response_cap is not None and config.max_comment_tokens is not None and (
      config.max_comment_tokens <= response_cap):
    response_cap = None  # The filter already bounds every response; skip recounting its tokens.

  visited = 0
  # (comment, depth, ancestor turns); reversed pushes so the earliest sibling is walked first.
  stack = [(c, 1, root) for c in reversed(children.get(thread.link_id, ()))]
  while stack:
    comment, depth, ancestors = stack.pop()
    visited += 1
    body = config.clean(comment.body)
    reason = filter_reason(body, comment.author, depth, config, count_tokens)
    if reason is not None:
      descendants = _subtree_size(children, comment) - 1
      visited += descendants
      _bump(stats, "dropped_" + reason)
      _bump(stats, "dropped_descendant", descendants)
      continue
    if ancestors:
      context = keep_last_tokens(config.separator.join(ancestors), config.max_context_tokens,
                                 count_tokens)
      _bump(stats, "pairs")
      yield context, keep_first_tokens(body, response_cap, count_tokens)
    else:
      _bump(stats, "empty_context")
    turns = ancestors + (body,)
    stack.extend((c, depth + 1, turns) for c in reversed(children.get("t1_" + comment.id, ())))
  _bump(stats, "orphaned", len(unique) - visited)


# ------------------------------------------------------------------------------------------------
# 4. Splits and the whole pipeline.
# ------------------------------------------------------------------------------------------------


def _split_bounds(fractions: Sequence[float]) -> tuple[float, float]:
  if len(fractions) != 3 or any(not f >= 0 for f in fractions) or sum(fractions) <= 0:
    raise ValueError(f"split fractions={tuple(fractions)}; expected three non-negative numbers "
                     "(train, validation, test) with a positive sum.")
  total = float(sum(fractions))
  if abs(total - 1.0) > 1e-6:
    raise ValueError(f"split fractions={tuple(fractions)} sum to {total}; expected 1.")
  return fractions[0] / total, (fractions[0] + fractions[1]) / total


def _split_of(link_id: str, bounds: tuple[float, float], salt: str) -> str:
  digest = hashlib.blake2b((salt + _link_key(link_id)).encode("utf-8"), digest_size=8).digest()
  u = int.from_bytes(digest, "big") / 2.0**64  # Uniform in [0, 1).
  return SPLITS[0] if u < bounds[0] else SPLITS[1] if u < bounds[1] else SPLITS[2]


def thread_split(link_id: str,
                 fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
                 salt: str = "") -> str:
  """The split a whole thread belongs to: 'train', 'validation' or 'test'.

  A keyed hash (BLAKE2b) of the thread's `link_id` (with or without `t3_`), so the answer is the
  same on every machine, in every run and for every file order, and every comment of a thread (and
  its submission) lands in the same split. Splitting by comment would leak: a test response's
  parent would be a training response.

  Args:
    link_id: `t3_<post id>` or the bare post id.
    fractions: (train, validation, test), non-negative, summing to 1.
    salt: a different salt draws a different (equally deterministic) partition.
  """
  return _split_of(link_id, _split_bounds(fractions), salt)


def _dump_kind(path: PathLike) -> str | None:
  """'comments' / 'submissions' from pushshift's file names, None when the name says neither."""
  name = Path(path).name.split(".")[0]
  if name.startswith("RC_") or name.endswith("_comments"):
    return "comments"
  if name.startswith("RS_") or name.endswith("_submissions"):
    return "submissions"
  return None


def _as_paths(paths: PathLike | Iterable[PathLike], kind: str) -> list[Path]:
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]  # A lone path, not an iterable of characters.
  paths = [Path(p) for p in paths]
  for p in paths:
    if not p.is_file():
      raise FileNotFoundError(f"{p}: no such {kind} file.")
    found = _dump_kind(p)
    if found is not None and found != kind:
      raise ValueError(f"{p} is named like a {found} dump but was passed as {kind}.")
  return paths


def reddit_pairs(comment_paths: PathLike | Iterable[PathLike],
                 submission_paths: PathLike | Iterable[PathLike] = (),
                 split: str = "train",
                 *,
                 config: RedditFilterConfig | None = None,
                 count_tokens: CountTokens | None = None,
                 split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
                 split_salt: str = "",
                 stats: Stats | None = None,
                 work_dir: PathLike | None = None) -> Iterator[tuple[str, str]]:
  """(context, response) pairs of one split of pushshift.io Reddit dumps.

  Reads every comment file (and submission file), keeps the threads of `split`, rebuilds them in an
  on-disk index (`build_threads`), and yields each thread's filtered pairs (`thread_pairs`) in
  `link_id` order: the same files give the same pairs in the same order, whatever the file order.

  Args:
    comment_paths: `RC_YYYY-MM[.zst|.bz2|.xz]` / `<sub>_comments.zst` files (or one path).
    submission_paths: the matching `RS_*` / `<sub>_submissions` files; without them contexts hold
      comments only and top-level comments yield no pair.
    split: 'train', 'validation' ('valid') or 'test'.
    config: filters and pair format (default `RedditFilterConfig()`).
    count_tokens: the token count for the 128-token limits (default `whitespace_token_count`).
    split_fractions: (train, validation, test) fractions of threads; the default holds out 1% of
      threads each for validation and test (1% of a recent month is over a million comments).
    split_salt: see `thread_split`.
    stats: if given, filled in place as reading goes: reading counts (`lines`, `malformed_json`,
      `comments_read`, ...), indexing counts, and per-rule `dropped_<reason>` counts (all
      `FILTER_REASONS` present, zero if never hit), `dropped_descendant`, `orphaned`, `pairs`.
    work_dir: where the temporary thread index goes (default: the system temporary directory).

  Returns:
    An iterator of (context, response) string pairs. The arguments are checked (files exist, and
    are not named as the other kind of dump; split and fractions valid) when this is called; the
    files are read as it is iterated.
  """
  split = normalize_split(split)
  bounds = _split_bounds(split_fractions)
  config = config or _DEFAULT_CONFIG
  comment_paths = _as_paths(comment_paths, "comments")
  submission_paths = _as_paths(submission_paths, "submissions")
  if stats is None:
    stats = collections.Counter()
  for reason in FILTER_REASONS:
    stats.setdefault("dropped_" + reason, 0)
  for key in ("dropped_descendant", "orphaned", "empty_context", "pairs"):
    stats.setdefault(key, 0)


  def pairs() -> Iterator[tuple[str, str]]:
    comments = itertools.chain.from_iterable(
        read_comments(p, stats=stats) for p in comment_paths)
    submissions = itertools.chain.from_iterable(
        read_submissions(p, stats=stats) for p in submission_paths)
    in_split = lambda link_id: _split_of(link_id, bounds, split_salt) == split
    for thread in build_threads(comments, submissions, keep_link=in_split, work_dir=work_dir,
                                stats=stats):
      yield from thread_pairs(thread, config, count_tokens, stats)

  return pairs()
