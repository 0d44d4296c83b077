"""Compressed files, told apart by their bytes: the one sniffer and decompressor every reader uses.

Dumps arrive as `.zst` (pushshift, with `--long=31` windows), `.xz` (CC100), `.bz2`/`.gz` (older
pushshift months, user folders) or plain text. Detecting the format from the file's first bytes
rather than its suffix means a renamed file still reads, and a file whose suffix promises a
compression its bytes do not have (an HTML error page saved as `en.txt.xz`) fails loudly instead of
yielding garbage as text.

* `detect_compression(path)`: 'zstd', 'xz', 'gzip', 'bz2' or None.
* `decompressed_chunks(path, compression, read_size)`: the decompressed bytes in pieces, with a
  truncated or corrupt stream turned into a `CorruptFileError` naming the file and the offset.
* `BytesStream(chunks)`: those pieces as a binary file object (for `io.TextIOWrapper`).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import zstandard

PathLike = str | os.PathLike

# pushshift's zstd dumps are compressed with `--long=31`: frames declare a window of up to 2 GiB,
# which libzstd refuses by default (its limit is 128 MiB) with "Frame requires too much memory".
# Decoding such a frame holds up to that window in memory whatever the API: a libzstd requirement.
ZSTD_MAX_WINDOW_SIZE = 2**31
# Compressed bytes read per step; its decompressed text (a small multiple of it) is what one step
# holds in memory.
DEFAULT_READ_SIZE = 1 << 18

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAGIC: dict[str, bytes] = {"zstd": ZSTD_MAGIC, "xz": b"\xfd7zXZ\x00", "gzip": b"\x1f\x8b",
                           "bz2": b"BZh"}
SUFFIX_COMPRESSION = {".zst": "zstd", ".zstd": "zstd", ".xz": "xz", ".gz": "gzip", ".bz2": "bz2"}
_STDLIB_OPENERS = {"bz2": bz2.open, "xz": lzma.open, "gzip": gzip.open}


class CorruptFileError(ValueError):
  """A file whose compressed stream is truncated or corrupt, or whose bytes contradict its name
  (the message names the file and the offset)."""


def detect_compression(path: PathLike) -> str | None:
  """The compression of `path`: 'zstd', 'xz', 'gzip', 'bz2', or None for plain text.

  Decided by the file's first bytes, so `RC_2011-01` without a suffix still reads; a suffix that
  promises a compression the bytes do not have is an error rather than garbage read as text.

  Raises:
    FileNotFoundError: `path` does not exist.
    CorruptFileError: the suffix and the magic bytes disagree, or a compressed file is empty.
  """
  path = Path(path)
  with open(path, "rb") as f:
    head = f.read(8)
  found = next((name for name, magic in MAGIC.items() if head.startswith(magic)), None)
  # zstd skippable frames (magic 0x184D2A5?, little-endian) may precede the first data frame.
  if found is None and len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50:
    found = "zstd"
  claimed = SUFFIX_COMPRESSION.get(path.suffix.lower())
  if claimed is not None and found != claimed:
    if not head:
      raise CorruptFileError(f"{path}: the file is empty; a {claimed} file holds at least one "
                             "frame header. The download is incomplete: re-download it.")
    raise CorruptFileError(
        f"{path}: the name says {claimed} but the file starts with {head!r}, not the {claimed} "
        f"magic bytes {MAGIC[claimed]!r}; the download is incomplete or not the file you meant. "
        "Re-download it.")
  return found


def _zstd_chunks(path: Path, read_size: int) -> Iterator[bytes]:
  """Decompressed bytes of a (multi-frame) zstd stream, one frame's output per piece at most.

  Uses one `decompressobj` per frame rather than `stream_reader`: zstandard 0.25's `stream_reader`
  ends silently when the input stops inside a frame (checked: a stream cut at 2/3 returned 2/3 of
  the text and no error), which would turn a truncated download into a silently smaller corpus. A
  per-frame `decompressobj` reports `eof` when libzstd has seen the frame's last block (and
  checksum), so "input ended with a frame open" is detectable. It streams all the same: memory is
  one read of compressed bytes and its decompressed output.
  """
  dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW_SIZE)
  frame = None
  offset = 0
  with open(path, "rb") as raw:
    while data := raw.read(read_size):
      offset += len(data)
      while data:
        if frame is None:
          frame = dctx.decompressobj()
        try:
          out = frame.decompress(data)
        except zstandard.ZstdError as e:
          raise CorruptFileError(
              f"{path}: corrupt zstd data within the first {offset} compressed bytes ({e}). "
              "Re-download the file.") from e
        if out:
          yield out
        if frame.eof:
          # Bytes after the frame's end belong to the next frame (dumps are often multi-frame).
          data, frame = frame.unused_data, None
        else:
          data = b""
  if frame is not None:
    raise CorruptFileError(
        f"{path}: the zstd stream ends inside a frame after {offset} compressed bytes: the file "
        "is truncated (an interrupted download or copy). Re-download it.")


def _stdlib_chunks(path: Path, compression: str | None, read_size: int) -> Iterator[bytes]:
  """Decompressed bytes of a bz2/xz/gzip (multi-stream included) or plain file."""
  opener = _STDLIB_OPENERS.get(compression, open)
  offset = 0
  with opener(path, "rb") as f:
    while True:
      try:
        data = f.read(read_size)
      except EOFError as e:
        raise CorruptFileError(
            f"{path}: the {compression} stream ends before its end marker after {offset} "
            "decompressed bytes: the file is truncated (an interrupted download or copy). "
            "Re-download it.") from e
      except (OSError, lzma.LZMAError, zlib.error) as e:
        if compression is None:
          raise  # A plain file's OSError is about the file system, not its content.
        raise CorruptFileError(
            f"{path}: corrupt {compression} data after {offset} decompressed bytes ({e}). "
            "Re-download the file.") from e
      if not data:
        return
      offset += len(data)
      yield data


def decompressed_chunks(path: PathLike, compression: str | None = None, *,
                        read_size: int = DEFAULT_READ_SIZE) -> Iterator[bytes]:
  """The decompressed bytes of `path`, in pieces whose boundaries fall anywhere.

  Args:
    path: the file.
    compression: what `detect_compression(path)` returned (pass it to sniff once per file).
    read_size: compressed bytes read per step (bounds the memory a step holds).

  Raises:
    CorruptFileError: a truncated or corrupt compressed stream (names the file and offset).
  """
  if read_size <= 0:
    raise ValueError(f"read_size={read_size}; expected a positive number of bytes.")
  path = Path(path)
  if compression == "zstd":
    return _zstd_chunks(path, read_size)
  return _stdlib_chunks(path, compression, read_size)


class BytesStream(io.RawIOBase):
  """An iterator of byte pieces as a read-only binary stream (wrap in `io.BufferedReader` and
  `io.TextIOWrapper` to read text line by line)."""

  def __init__(self, chunks: Iterator[bytes]):
    super().__init__()
    self._chunks = chunks
    self._buffer = b""

  def readable(self) -> bool:
    return True

  def readinto(self, b) -> int:
    while not self._buffer:
      piece = next(self._chunks, None)
      if piece is None:
        return 0
      self._buffer = piece
    n = min(len(b), len(self._buffer))
    b[:n] = self._buffer[:n]
    self._buffer = self._buffer[n:]
    return n
