"""Prepared data: a task's rows tokenised, split and packed once, in random-access shards.

`hashmoe prepare` (`hashmoe.data.preparation.prepare`, the writer; this module is the format and
the reading side) runs a registered task's preprocessing exactly as the training
pipeline does (`tasks.converted_dataset`: tokenize, check ids, EOS, cut LM examples into SEQ_LEN
pieces / trim seq2seq examples, then seqio's training feature converter with packing; no shuffle)
and writes the packed rows to ArrayRecord files with a manifest. `hashmoe.data.loader` reads them
with grain: a global shuffle per epoch, each process's share of every global batch, and a position
that restores in O(1).

On-disk format (FORMAT_VERSION 1). One folder per (task, SEQ_LEN), by default
`<cache>/prepared/<task>/len<SEQ_LEN>` (`prepared_dir`; the root is gin's PREPARED_DIR):

    prepare.json                      the plan: what every shard is prepared for (below)
    <split>/rows-KKKKK-of-NNNNN.arrayrecord     shard K of N of the split: its packed rows
    <split>/rows-KKKKK-of-NNNNN.done.json       the shard's done record: rows, tokens, bytes, sha256
    manifest.json                     written once every shard of every split is done

* Shards. Shard k of N holds the packed rows of the split's examples with index % N == k, in the
  reader's order (seqio's example-level sharding, `tasks.get_batches(shard_index=k,
  num_shards=N)`, before packing: packing never crosses shards). Shards are independent units:
  prepared in parallel by worker processes, by several hosts (`shard_indices`: disjoint sets into
  one folder, e.g. a bucket), and redone one by one.
* Records. One packed row per record, all of the feature converter's int32[L] features
  concatenated in the manifest's `record` order, each stored in the narrowest dtype that holds its
  values (`uint16` for token ids of a vocabulary up to 65,536, for segment ids and positions of
  rows up to 65,536; `uint8` for loss weights; `int32` otherwise) and widened back to int32 on
  read. Why: a fixed layout decodes a whole batch with one `np.frombuffer` (no per-row parsing, no
  protobuf), and the loader yields exactly the arrays the streaming pipeline yields (the test
  compares them); the narrow dtypes make an LM row 9 bytes per token instead of 20. Derivable
  features (decoder inputs from targets, loss weights from segment ids) are stored rather than
  recomputed so that no second implementation of seqio's converter can drift from it. Files are
  written with `group_size:1` (grain's random access reads one record without decoding its
  neighbours); riegeli checksums every chunk, so a damaged byte fails the read that meets it.
* Done record (`<shard>.done.json`): {format, split, shard, num_shards, rows, tokens (non-padding
  decoder targets), input_tokens (seq2seq: non-padding encoder inputs), bytes, sha256, data
  (`tasks.data_fingerprint` of the split as read)}. Written after the shard file is complete and
  renamed into place; a shard without one is unfinished.
* Plan (`prepare.json`): {format, task, shape, vocabulary (fingerprint and size), feature_lengths,
  converter ({"name": "DecoderFeatureConverter"|"EncDecFeatureConverter", "pack": true}), record
  layout, splits, num_shards}. The first `prepare` writes it; every later one (a resume, another
  host) must name the same plan, or it is refused (another task, vocabulary, SEQ_LEN or shard
  count would mix incompatible shards in one folder).
* Manifest (`manifest.json`): the plan plus, per split, rows, tokens, input_tokens and its shards
  ({file, rows, tokens, input_tokens, bytes, sha256}), and `fingerprint`: a sha256 over the plan
  and every shard's sha256 (what a checkpoint's loader position names). Written atomically by
  whichever `prepare` finds every shard done (the last host to finish, or `hashmoe prepare
  --verify` run once all are); readers use a folder only once it has a manifest.

Writes are atomic: a shard is written under a temporary name and renamed (on a remote folder,
written locally and copied); the done record and manifest likewise. Resuming: an interrupted
prepare leaves finished shards (done record + file) and temporary files; the next `prepare`
verifies every finished shard's sha256 against its done record (redoing any that fails: a
truncated or damaged file is never trusted), deletes temporary files and does only the rest.
A full disk (or any write error) ends the prepare with an OSError naming the path, the partial
shard removed and the finished ones kept.

Reading (`open_prepared`, used by the loader): the manifest must match the run (task, vocabulary
fingerprint, feature lengths, converter, format), or `PreparedMismatchError` names each
difference. Every shard must exist with its manifest size and record count; its sha256 is checked
too when the split's files total at most `FULL_CHECK_BYTES` (a restart then costs seconds, not a
read of the whole corpus); `hashmoe prepare --verify` checks every sha256 of any size.
A remote folder (gs://...) is read through etils.epath: its shards are copied once to a local
staging folder (verified by sha256 there), since ArrayRecord reads local files.

Public API (what the loader, the CLI, benchmarks and t5x's file-backed task build on):

    prepared_dir(root, task, seq_len) -> epath.Path
    read_manifest(out_dir) -> Manifest | None
    open_prepared(out_dir, *, task, shape, vocab_fingerprint, seq_len, splits) -> Manifest | None
    Manifest.shard_paths(split), .rows(split), .layout (RecordLayout: .encode / .decode), .fingerprint
    RowReader(manifest, split).read(indices) -> records
  and in `hashmoe.data.preparation`: prepare(...) -> PrepareResult, verify(out_dir) -> Manifest
  (full sha256 of every shard), status(out_dir).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import numpy as np
from array_record.python import array_record_module
from etils import epath

from hashmoe.data import tasks as tasks_lib
from hashmoe.data.embedded import default_cache_dir
from hashmoe.data.text_files import SPLITS, normalize_split
from hashmoe.training.errors import PreparedDataError, PreparedMismatchError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FORMAT = f"hashmoe.prepared/{FORMAT_VERSION}"
# The format of the loader's position in checkpoints (`hashmoe.data.loader`), here so that the
# streaming pipeline can recognise one and refuse it.
POSITION_FORMAT = "hashmoe.PreparedPosition/1"
PLAN_FILE = "prepare.json"
MANIFEST_FILE = "manifest.json"
SHARD_SUFFIX = ".arrayrecord"
DONE_SUFFIX = ".done.json"
DEFAULT_SPLITS = SPLITS  # train, validation, test: what runs train and evaluate on
# A split's shards are checked against their sha256 when a pipeline opens them up to this size
# (~2 s at the ~500 MB/s sha256 runs here); above it, size and record count (a restart must not
# read the whole corpus), and `verify` does the full check.
FULL_CHECK_BYTES = 1 << 30
TMP_MARK = ".tmp-"


# --------------------------------------------------------------------------------------------------
# Locations.


def default_root() -> epath.Path:
  """The default PREPARED_DIR: `<hashmoe cache>/prepared` (the cache is $HASHMOE_CACHE, else
  ~/.cache/hashmoe)."""
  return epath.Path(default_cache_dir()) / "prepared"


def prepared_dir(root: Any, task: str, seq_len: int) -> epath.Path:
  """The folder of `task` prepared at `seq_len` under `root` (None: `default_root()`)."""
  return epath.Path(default_root() if root in (None, "") else root) / task / f"len{int(seq_len)}"


def is_local(path: Any) -> bool:
  """Whether `path` is on this machine's file system (not gs://, s3://, ...)."""
  return "://" not in os.fspath(path)


def shard_file(split: str, index: int, num_shards: int) -> str:
  """The shard's file, relative to the prepared folder."""
  return f"{split}/rows-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


# --------------------------------------------------------------------------------------------------
# Records.


def _stored_dtype(name: str, length: int, vocab_size: int) -> str:
  """The narrowest unsigned dtype that holds every value of feature `name` (see the docstring)."""
  if name.endswith("_loss_weights"):
    return "uint8"
  if name.endswith("_tokens"):
    return "uint16" if vocab_size <= 1 << 16 else "int32"
  if name.endswith(("_segment_ids", "_positions")):
    return "uint16" if length <= 1 << 16 else "int32"
  return "int32"


@dataclasses.dataclass(frozen=True)
class RecordLayout:
  """How a packed row is stored in one record: its features in order, each (name, stored dtype,
  length); little-endian, concatenated.

  Attributes:
    features: ((name, dtype name, length), ...) in record order.
  """
  features: tuple[tuple[str, str, int], ...]

  @classmethod
  def for_features(cls, lengths: Mapping[str, int], vocab_size: int) -> "RecordLayout":
    """The layout of rows whose features have `lengths` ({name: L}), ids below `vocab_size`."""
    return cls(tuple((name, _stored_dtype(name, length, vocab_size), int(length))
                     for name, length in sorted(lengths.items())))

  @property
  def dtype(self) -> np.dtype:
    """The numpy structured dtype of one record."""
    return np.dtype([(name, np.dtype(dtype).newbyteorder("<"), (length,))
                     for name, dtype, length in self.features])

  def to_json(self) -> list[dict[str, Any]]:
    return [{"name": n, "dtype": d, "length": l} for n, d, l in self.features]

  @classmethod
  def from_json(cls, value: Sequence[Mapping[str, Any]]) -> "RecordLayout":
    return cls(tuple((str(f["name"]), str(f["dtype"]), int(f["length"])) for f in value))

  def encode(self, rows: Mapping[str, np.ndarray]) -> list[bytes]:
    """Records of a batch of rows ({name: int[n, L]}).

    Raises:
      ValueError: a value does not fit its stored dtype (naming the feature and the value).
    """
    n = len(next(iter(rows.values())))
    table = np.empty(n, self.dtype)
    for name, dtype, _ in self.features:
      values = np.asarray(rows[name])
      info = np.iinfo(dtype)
      if values.size and (values.min() < info.min or values.max() > info.max):
        bad = values.min() if values.min() < info.min else values.max()
        raise ValueError(f"feature {name!r}: value {int(bad)} does not fit the stored dtype "
                         f"{dtype} of the record layout")
      table[name] = values
    data, size = table.tobytes(), self.dtype.itemsize
    return [data[i * size:(i + 1) * size] for i in range(n)]

  def decode(self, records: Sequence[bytes]) -> dict[str, np.ndarray]:
    """{name: int32[len(records), L]} of a batch of records (one `np.frombuffer`).

    Raises:
      PreparedDataError: a record is not one row of this layout.
    """
    size = self.dtype.itemsize
    data = b"".join(records)
    if len(data) != size * len(records):
      sizes = sorted({len(r) for r in records} - {size})
      raise PreparedDataError(f"a record of {sizes[0]} bytes where the layout's rows are {size}: "
                              "the shard does not hold rows of this manifest's layout")
    table = np.frombuffer(data, self.dtype, count=len(records))
    return {name: table[name].astype(np.int32) for name, _, _ in self.features}


def count_tokens_of(rows: Mapping[str, np.ndarray]) -> tuple[int, int]:
  """(decoder target tokens, encoder input tokens) of a batch of rows that are not padding."""
  inputs = rows.get("encoder_input_tokens")
  return (int(np.count_nonzero(rows["decoder_target_tokens"])),
          0 if inputs is None else int(np.count_nonzero(inputs)))


# --------------------------------------------------------------------------------------------------
# Files: atomic writes, checksums.


def sha256_of(path: epath.Path) -> str:
  with path.open("rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def temporary_name(path: epath.Path) -> epath.Path:
  """A name beside `path` that no other writer (host, process) uses."""
  return path.parent / f".{path.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}-" \
                       f"{uuid.uuid4().hex[:8]}"


def write_json(path: epath.Path, value: Any) -> None:
  """Writes `value` as JSON, atomically (temporary + rename locally; one object write remotely)."""
  text = json.dumps(value, indent=1, sort_keys=True) + "\n"
  if not is_local(path):
    path.write_text(text)
    return
  tmp = temporary_name(path)
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def read_json(path: epath.Path) -> Optional[dict[str, Any]]:
  """The JSON object in `path`, or None when it is missing or unreadable (a torn write)."""
  try:
    value = json.loads(path.read_text())
  except (FileNotFoundError, ValueError):
    return None
  return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------------------------------
# The plan, the done records, the manifest.


def converter_json(shape: str) -> dict[str, Any]:
  return {"name": type(tasks_lib.feature_converter(shape)).__name__, "pack": True}


def plan_differences(found: Mapping[str, Any], wanted: Mapping[str, Any],
                      keys: Iterable[str]) -> list[str]:
  return [f"{key}: {json.dumps(found.get(key))} there, {json.dumps(wanted.get(key))} here"
          for key in keys if found.get(key) != wanted.get(key)]


@dataclasses.dataclass(frozen=True)
class Manifest:
  """A prepared folder's manifest.json, and where its shards can be read.

  Attributes:
    directory: the prepared folder (local or remote).
    data: the manifest's JSON object (see the module docstring).
    local_directory: where the shard files are read from (the folder itself, or a local staging
      copy of a remote one).
  """
  directory: epath.Path
  data: Mapping[str, Any]
  local_directory: epath.Path

  @property
  def fingerprint(self) -> str:
    return self.data["fingerprint"]

  @property
  def task(self) -> str:
    return self.data["task"]

  @property
  def layout(self) -> RecordLayout:
    return RecordLayout.from_json(self.data["record"])

  @property
  def splits(self) -> list[str]:
    return list(self.data["split_info"])

  def split(self, split: str) -> dict[str, Any]:
    """The split's entry: rows, tokens, input_tokens, shards."""
    split = normalize_split(split)
    if split not in self.data["split_info"]:
      raise PreparedDataError(
          f"{self.directory} holds the splits {self.splits}, not {split!r}: prepare into another "
          f"PREPARED_DIR with `hashmoe prepare ... --splits={','.join(self.splits + [split])}`")
    return self.data["split_info"][split]

  def rows(self, split: str) -> int:
    return int(self.split(split)["rows"])

  def shard_paths(self, split: str) -> list[str]:
    """The split's shard files in manifest order (their rows numbered on, in this order)."""
    return [os.fspath(self.local_directory / s["file"]) for s in self.split(split)["shards"]]



# --------------------------------------------------------------------------------------------------
# Reading: verification, matching a run, staging remote folders.


def read_manifest(directory: Any) -> Optional[Manifest]:
  """The folder's manifest, or None when it has none (not prepared, or not finished yet).

  Raises:
    PreparedDataError: manifest.json exists but is not a manifest of this format.
  """
  directory = epath.Path(directory)
  path = directory / MANIFEST_FILE
  if not path.exists():
    return None
  data = read_json(path)
  if data is None or data.get("format") != FORMAT or "split_info" not in data:
    found = data.get("format") if data else "unreadable JSON"
    raise PreparedDataError(f"{path} is not a manifest of {FORMAT} ({found}); prepare the folder "
                            "again (`hashmoe prepare`)")
  return Manifest(directory, data, directory)


def match_run(manifest: Manifest, *, task: str, shape: str, vocab_fingerprint: str,
              seq_len: int) -> None:
  """Refuses a manifest made for another run.

  Raises:
    PreparedMismatchError: naming each difference (task, vocabulary, feature lengths, converter).
  """
  data = manifest.data
  wanted = {"task": task, "vocabulary fingerprint": vocab_fingerprint,
            "feature_lengths": tasks_lib.feature_lengths(shape, seq_len),
            "converter": converter_json(shape)}
  found = {"task": data.get("task"), "vocabulary fingerprint": data["vocabulary"]["fingerprint"],
           "feature_lengths": data.get("feature_lengths"), "converter": data.get("converter")}
  differences = plan_differences(found, wanted, wanted)
  if differences:
    raise PreparedMismatchError(
        f"the prepared data in {manifest.directory} was made for another run: "
        f"{'; '.join(differences)}. Prepare this run's data (`hashmoe prepare` with this run's "
        "gin files) into another PREPARED_DIR, or stream it (--gin.DATA_SOURCE=\"'streaming'\").")


def check_shards(manifest: Manifest, split: str, *, full_check_bytes: int = FULL_CHECK_BYTES
                 ) -> None:
  """Checks that every shard of `split` is there as the manifest says: its size and record count,
  and its sha256 when the split's shards total at most `full_check_bytes`.

  Raises:
    PreparedDataError: naming the shard and what is wrong with it, and the fix.
  """
  info = manifest.split(split)
  full = sum(s["bytes"] for s in info["shards"]) <= full_check_bytes
  for shard in info["shards"]:
    path = manifest.local_directory / shard["file"]
    fix = ("; run `hashmoe prepare` again with the same settings (it redoes damaged shards), or "
           "`hashmoe prepare --verify` to check every shard")
    if not path.exists():
      raise PreparedDataError(f"prepared shard {path} is missing{fix}")
    size = path.stat().length
    if size != shard["bytes"]:
      raise PreparedDataError(f"prepared shard {path} has {size} bytes, its manifest says "
                              f"{shard['bytes']} (truncated or replaced){fix}")
    try:
      reader = array_record_module.ArrayRecordReader(os.fspath(path), "readahead_buffer_size:0")
      records = reader.num_records()
      reader.close()
    except Exception as e:  # pylint: disable=broad-except  riegeli's errors are RuntimeErrors.
      raise PreparedDataError(f"prepared shard {path} is not readable ({e}){fix}") from None
    if records != shard["rows"]:
      raise PreparedDataError(f"prepared shard {path} holds {records} rows, its manifest says "
                              f"{shard['rows']}{fix}")
    if full and sha256_of(path) != shard["sha256"]:
      raise PreparedDataError(f"prepared shard {path} does not match its manifest's sha256 "
                              f"(damaged){fix}")


def stage_locally(manifest: Manifest, splits: Sequence[str],
                  cache_root: Optional[Any] = None) -> Manifest:
  """A remote folder's shards of `splits`, copied once into a local staging folder (keyed by the
  manifest's fingerprint) and checked there by sha256; a local folder is returned as it is.

  ArrayRecord reads local files only; a bucket mounted with gcsfuse is a local path and needs no
  staging.
  """
  if is_local(manifest.directory):
    return manifest
  root = epath.Path(cache_root or default_cache_dir()) / "prepared_staged" / manifest.fingerprint
  for split in splits:
    for shard in manifest.split(split)["shards"]:
      local = root / shard["file"]
      if local.exists() and local.stat().length == shard["bytes"]:
        continue
      local.parent.mkdir(parents=True, exist_ok=True)
      tmp = temporary_name(local)
      try:
        (manifest.directory / shard["file"]).copy(tmp, overwrite=True)
        if sha256_of(tmp) != shard["sha256"]:
          raise PreparedDataError(f"prepared shard {manifest.directory / shard['file']}: the "
                                  "copy's sha256 differs from the manifest's (damaged in the "
                                  "bucket); run `hashmoe prepare` again with the same settings")
        os.replace(tmp, local)
      finally:
        tmp.unlink(missing_ok=True)
      logger.info("staged %s -> %s", manifest.directory / shard["file"], local)
  return dataclasses.replace(manifest, local_directory=root)


def open_prepared(directory: Any, *, task: str, shape: str, vocab_fingerprint: str, seq_len: int,
                  splits: Sequence[str] = ("train",),
                  full_check_bytes: int = FULL_CHECK_BYTES) -> Optional[Manifest]:
  """The manifest of a prepared folder checked against a run, its `splits` staged and checked
  (`check_shards`); None when the folder has no manifest.

  Raises:
    PreparedMismatchError: the folder was prepared for another run (`match_run`).
    PreparedDataError: a shard is missing, truncated or damaged, or a split was not prepared.
  """
  manifest = read_manifest(directory)
  if manifest is None:
    return None
  match_run(manifest, task=task, shape=shape, vocab_fingerprint=vocab_fingerprint,
            seq_len=seq_len)
  manifest = stage_locally(manifest, splits)
  for split in splits:
    check_shards(manifest, split, full_check_bytes=full_check_bytes)
  return manifest


class RowReader:
  """Random access to a split's rows by their index in manifest order (shard after shard).

  One ArrayRecord reader per shard, opened on first use and shared by threads (its reads are
  thread-safe); grain's `ArrayRecordDataSource.__getitems__` would start a thread pool per call,
  which costs more than the read for a batch of small rows. Picklable (a grain worker process
  reopens the files).
  """

  def __init__(self, manifest: Manifest, split: str):
    shards = manifest.split(split)["shards"]
    self._paths = manifest.shard_paths(split)
    self._ends = np.cumsum([s["rows"] for s in shards], dtype=np.int64)
    self._readers: list[Any] = [None] * len(self._paths)

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def _reader(self, shard: int) -> Any:
    if self._readers[shard] is None:
      # readahead 0: random reads fetch one record, not a window of neighbours.
      self._readers[shard] = array_record_module.ArrayRecordReader(
          self._paths[shard], "readahead_buffer_size:0")
    return self._readers[shard]

  def read(self, indices: Sequence[int]) -> list[bytes]:
    """The records of rows `indices` (each in [0, len)), in that order."""
    indices = np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"row indices outside [0, {len(self)})")
    shards = np.searchsorted(self._ends, indices, side="right")
    starts = np.concatenate([[0], self._ends[:-1]])
    records: list[bytes] = [b""] * len(indices)
    for shard in np.unique(shards):
      where = np.flatnonzero(shards == shard)
      try:
        found = self._reader(shard).read((indices[where] - starts[shard]).tolist())
      except Exception as e:  # pylint: disable=broad-except  riegeli's errors are RuntimeErrors.
        raise PreparedDataError(f"reading prepared shard {self._paths[shard]} failed ({e}); run "
                                "`hashmoe prepare --verify` to check every shard") from None
      for i, record in zip(where, found):
        records[i] = record
    return records

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_readers": [None] * len(self._paths)}
