"""Prepared rows as TFRecord files and a seqio task over them: input that t5x resumes exactly.

Why. t5x resumes its input by checkpointing the tf.data iterator with the train state
(`SaveCheckpointConfig.save_dataset`, restored from MODEL_DIR: `tf.train.Checkpoint(ds=iterator)`).
tf.data saves the position of a pipeline that reads files; it cannot save one fed by a Python
generator, which hashmoe's streaming tasks are (the save fails: "... PyFunc ..."), so a restarted
t5x run used to read its data from the start again. The ArrayRecord shards of `hashmoe prepare`
(`hashmoe.data.prepared`) have no tf.data reader. So the prepared rows are also written as TFRecord
files, record for record (`write_tfrecords`, `hashmoe prepare --tfrecord`), and registered as a
seqio task whose examples are the packed model features (`register_prepared_task`,
`<task>_prepared_len<SEQ_LEN>`); t5x feeds them through a pass-through feature converter
(`PreparedDecoderFeatureConverter`, `PreparedEncDecFeatureConverter`) and checkpoints its iterator.

Files (FORMAT_VERSION 1), beside the ArrayRecord shards of a prepared folder:

    <split>/rows-KKKKK-of-NNNNN.tfrecord            shard K's rows, in the ArrayRecord shard's order
    <split>/rows-KKKKK-of-NNNNN.tfrecord.done.json  {format, file, split, shard, rows, bytes,
                                                     sha256, source}
    tfrecord.json                                   written once every shard of every split
                                                    is copied

* Records. A TFRecord record is the ArrayRecord record's bytes unchanged: one packed row in the
  manifest's fixed layout (`prepared.RecordLayout`: the features concatenated little-endian, each in
  its narrow stored dtype). tf.data decodes them in the graph, `DECODE_BATCH` records at a time:
  per feature a `tf.strings.substr` of its bytes, `tf.io.decode_raw` (the stored dtype,
  little-endian), a cast to int32 and the static shape [L]; a record of another size fails the
  read, naming the layout. Why not `tf.train.Example`: it would be a second encoding of the rows
  (decoded from the layout and re-encoded as protobufs) to keep equal to the first, where the raw
  records are the bytes the grain loader decodes, copied as they are. Not for size: varint ids made
  Examples 0.88x the raw rows' bytes, and either kind of TFRecord copy is uncompressed, 2.4x the
  ArrayRecord shards, whose riegeli chunks are compressed (the embedded corpus, L=128:
  `python benchmarks/prepared_tf.py --seq-len 128`). TFRecord frames every record with masked
  CRC32Cs of its length and data, so a damaged byte fails the read that meets it.
* Done record: `source` is the sha256 of the ArrayRecord shard the copy was made from (the
  manifest's); `sha256` and `bytes` are the TFRecord file's. Written after the file is complete and
  renamed into place.
* `tfrecord.json`: {format, source (the manifest's fingerprint), task, feature_lengths, record
  (layout), splits: {split: {rows, shards: [{file, rows, bytes, sha256, source}]}}, fingerprint}.

Staleness and partial copies. The copies are usable only when `tfrecord.json` exists and names the
manifest's current fingerprint: a folder prepared again (other data, another layout) leaves older
copies stale, and they are refused (`PreparedMismatchError`) until `write_tfrecords` runs again,
which recopies exactly the shards whose source changed. An unfinished copy (no `tfrecord.json`), a
missing or truncated file, or one whose sha256 differs (checked when a split's copies total at most
`prepared.FULL_CHECK_BYTES`; `verify_tfrecords` checks all) is refused (`PreparedDataError`) with
the command that repairs it. Copying is resumable per shard, like `prepare`: finished copies are
verified (sha256) and kept, temporary files removed, the rest written; the source shard is checked
against its manifest sha256 before it is copied.

Order of the task's examples (seqio's `FileDataSource` and `Task`): the split's files, shuffled with
the seed when shuffling, interleaved 16 rows at a time from up to 16 files, then the task's seeded
shuffle buffer (the source task's size) and `repeat`; with several data-parallel hosts (t5x's
`shard_info`) each host reads whole files when there are at least as many files as hosts, else
every host-count-th row. Every step is deterministic given the seed, and tf.data saves it all in a
checkpoint, the shuffle buffer's rows included: 11-16 MB per data-parallel host for LM rows at
L=128 with the default 10,000-row buffer (`benchmarks/prepared_tf.py`).
This is not the grain loader's global per-epoch permutation (`hashmoe.data.loader`), which needs
random access that tf.data's TFRecord reader does not have; a run trained by hashmoe's trainer and
one trained by t5x on the same prepared folder see the same rows in different orders.

API:

    write_tfrecords(directory, *, shard_indices=None, progress=False) -> CopyResult
    verify_tfrecords(directory) -> TFRecordCopies          # full sha256 of every copy
    open_tfrecords(manifest) -> TFRecordCopies             # checked against the manifest
    register_prepared_task(task, *, seq_len, root=None) -> str    # '<task>_prepared_len<L>'
    prepared_task_info(name) -> PreparedTaskInfo | None; source_task(name) -> str
    feature_converter_cls(name) -> the converter class t5x instantiates for the task
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import seqio
import tensorflow as tf
from array_record.python import array_record_module
from etils import epath

from hashmoe.data import preparation as preparation_lib
from hashmoe.data import prepared as prepared_lib
from hashmoe.data import tasks as tasks_lib
from hashmoe.data import vocab as vocab_lib
from hashmoe.data.corpora import LM
from hashmoe.training.errors import PreparedDataError, PreparedMismatchError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FORMAT = f"hashmoe.prepared_tfrecord/{FORMAT_VERSION}"
MANIFEST_FILE = "tfrecord.json"
SHARD_SUFFIX = ".tfrecord"
DONE_SUFFIX = ".done.json"
# Records copied per ArrayRecord read: amortises the reader's per-call cost.
_RECORDS_PER_READ = 4096
_TMP_MARK = ".tmp-"
_REPAIR = ("run `hashmoe prepare --tfrecord` with this run's gin files (it copies the prepared "
           "shards again, keeping the copies that are sound)")


def tfrecord_file(split: str, index: int, num_shards: int) -> str:
  """The TFRecord copy of a shard, relative to the prepared folder."""
  name = prepared_lib.shard_file(split, index, num_shards)
  return name[:-len(prepared_lib.SHARD_SUFFIX)] + SHARD_SUFFIX


def prepared_task_name(task: str, seq_len: int) -> str:
  """The seqio task over `task`'s rows prepared at `seq_len`."""
  return f"{task}_prepared_len{int(seq_len)}"


# --------------------------------------------------------------------------------------------------
# Files.


def _sha256(path: epath.Path) -> str:
  with path.open("rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _temporary_name(path: epath.Path) -> epath.Path:
  return path.parent / (f".{path.name}{_TMP_MARK}{socket.gethostname()}-{os.getpid()}-"
                        f"{uuid.uuid4().hex[:8]}")


def _replace(source: epath.Path, target: epath.Path) -> None:
  """Moves `source` onto `target` (atomic on a local file system; a copy remotely)."""
  if prepared_lib.is_local(target):
    os.replace(source, target)
  else:
    tf.io.gfile.rename(os.fspath(source), os.fspath(target), overwrite=True)


def _write_json(path: epath.Path, value: Any) -> None:
  tmp = _temporary_name(path)
  try:
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    _replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def _read_json(path: epath.Path) -> Optional[dict[str, Any]]:
  """The JSON object in `path`, or None when it is missing or unreadable (a torn write)."""
  try:
    value = json.loads(path.read_text())
  except (FileNotFoundError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def _done_path(directory: epath.Path, file: str) -> epath.Path:
  return directory / (file + DONE_SUFFIX)


# --------------------------------------------------------------------------------------------------
# Writing the copies.


@dataclasses.dataclass
class CopyResult:
  """What `write_tfrecords` did.

  Attributes:
    directory: the prepared folder.
    complete: every shard of every split is copied and `tfrecord.json` is written.
    copied: shards copied now, as (split, index).
    kept: copies found sound (sha256 and source) and kept.
    redone: copies found stale (another source), damaged or unfinished, and made again.
    missing: shards still to copy (other hosts' `shard_indices`) when not complete.
    rows, bytes: rows and TFRecord bytes written now.
    seconds: wall time.
  """
  directory: str
  complete: bool
  copied: list[tuple[str, int]]
  kept: list[tuple[str, int]]
  redone: list[tuple[str, int]]
  missing: list[tuple[str, int]]
  rows: int
  bytes: int
  seconds: float


def _copy_state(directory: epath.Path, file: str, entry: Mapping[str, Any]) -> Optional[str]:
  """None when the copy `file` of the manifest shard `entry` is finished, from this source, and
  matches its done record's sha256; else why not ('missing', or what is wrong)."""
  done = _read_json(_done_path(directory, file))
  if done is None:
    return "missing"
  if done.get("format") != FORMAT or done.get("file") != file:
    return f"its done record is of another format or shard ({done.get('format')})"
  if done.get("source") != entry["sha256"]:
    return "it was copied from an earlier prepare of this shard (stale)"
  path = directory / file
  if not path.exists():
    return "its file is missing"
  size = path.stat().length
  if size != done.get("bytes"):
    return f"its file has {size} bytes, its done record says {done.get('bytes')}"
  if _sha256(path) != done.get("sha256"):
    return "its file's sha256 differs from its done record's"
  return None


def _remove_copy(directory: epath.Path, file: str) -> None:
  """Removes a copy's done record first (a crash mid-removal never leaves a done record without
  its file), then its file and temporary files."""
  for path in (_done_path(directory, file), directory / file):
    if path.exists():
      path.unlink()
  parent = (directory / file).parent
  if parent.exists():
    for leftover in parent.glob(f".{(directory / file).name}{_TMP_MARK}*"):
      leftover.unlink()


def _copy_shard(manifest: prepared_lib.Manifest, split: str, index: int) -> dict[str, Any]:
  """Copies one ArrayRecord shard, checked against its manifest sha256, to its TFRecord file
  (temporary name, then renamed), then writes the done record."""
  directory = manifest.directory
  entry = manifest.split(split)["shards"][index]
  source = manifest.local_directory / entry["file"]
  fix = ("; run `hashmoe prepare` again with the same settings (it redoes damaged shards), then "
         "`hashmoe prepare --tfrecord`")
  if not source.exists() or source.stat().length != entry["bytes"] or (
      _sha256(source) != entry["sha256"]):
    raise PreparedDataError(f"prepared shard {source} is missing or differs from its manifest "
                            f"(size or sha256): not copied{fix}")
  file = tfrecord_file(split, index, manifest.data["num_shards"])
  final = directory / file
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = _temporary_name(final)
  reader = array_record_module.ArrayRecordReader(os.fspath(source))
  try:
    rows = reader.num_records()
    if rows != entry["rows"]:
      raise PreparedDataError(f"prepared shard {source} holds {rows} rows, its manifest says "
                              f"{entry['rows']}{fix}")
    try:
      with tf.io.TFRecordWriter(os.fspath(tmp)) as writer:
        for start in range(0, rows, _RECORDS_PER_READ):
          for record in reader.read(start, min(start + _RECORDS_PER_READ, rows)):
            writer.write(record)
    except tf.errors.OpError as e:  # A full disk, a refused write: name the file, not TF's stack.
      raise OSError(f"writing {final} failed: {e.message}") from None
    done = {"format": FORMAT, "file": file, "split": split, "shard": index, "rows": rows,
            "bytes": tmp.stat().length, "sha256": _sha256(tmp), "source": entry["sha256"]}
    _replace(tmp, final)
    _write_json(_done_path(directory, file), done)
    return done
  finally:
    reader.close()
    if tmp.exists():
      tmp.unlink()


def _finalize(manifest: prepared_lib.Manifest) -> tuple[Optional[dict[str, Any]], list]:
  """Writes tfrecord.json once every shard of every split has a done record from the manifest's
  current source; returns (it or None, the (split, index) still missing)."""
  splits, missing = {}, []
  for split in manifest.splits:
    shards = []
    for index, entry in enumerate(manifest.split(split)["shards"]):
      file = tfrecord_file(split, index, manifest.data["num_shards"])
      done = _read_json(_done_path(manifest.directory, file))
      if done is None or done.get("source") != entry["sha256"]:
        missing.append((split, index))
        continue
      shards.append({k: done[k] for k in ("file", "rows", "bytes", "sha256", "source")})
    splits[split] = {"rows": sum(s["rows"] for s in shards), "shards": shards}
  if missing:
    return None, missing
  data = {"format": FORMAT, "source": manifest.fingerprint, "task": manifest.task,
          "feature_lengths": manifest.data["feature_lengths"], "record": manifest.data["record"],
          "splits": splits}
  data["fingerprint"] = vocab_lib.cache_key(data)
  _write_json(manifest.directory / MANIFEST_FILE, data)
  return data, []


def write_tfrecords(directory: Any, *, shard_indices: Optional[Sequence[int]] = None,
                    progress: bool = False) -> CopyResult:
  """Copies a prepared folder's shards (every split) to TFRecord files beside them, resumably.

  Args:
    directory: a prepared folder with its manifest (`hashmoe prepare` finished).
    shard_indices: the shards this call copies, of every split (default all): several hosts give
      disjoint sets, as for `prepare`; the one that finds every copy done writes tfrecord.json.
    progress: log each shard copied.

  Returns:
    CopyResult; `complete` once tfrecord.json is written.

  Raises:
    PreparedDataError: the folder has no manifest, or a source shard is missing or damaged.
    OSError: a write failed (naming the file); finished copies are kept.
  """
  start = time.perf_counter()
  directory = epath.Path(directory)
  manifest = prepared_lib.read_manifest(directory)
  if manifest is None:
    raise PreparedDataError(f"{directory} has no manifest.json: its prepare is unfinished or was "
                            "never run; run `hashmoe prepare` (every shard) before copying its "
                            "rows to TFRecord files")
  num_shards = manifest.data["num_shards"]
  indices = list(range(num_shards)) if shard_indices is None else list(shard_indices)
  bad = [i for i in indices if not isinstance(i, (int, np.integer)) or not 0 <= i < num_shards]
  if bad or len(set(indices)) != len(indices):
    raise ValueError(f"shard_indices={indices}; expected distinct ints in [0, {num_shards})")
  side = _read_json(directory / MANIFEST_FILE)
  if side is not None and side.get("source") != manifest.fingerprint:
    # Copies of an earlier prepare: no longer a complete set until every shard is recopied.
    (directory / MANIFEST_FILE).unlink()
    logger.info("%s: the TFRecord copies were made from an earlier prepare; recopying the "
                "shards that changed", directory)
  manifest = prepared_lib.stage_locally(manifest, manifest.splits)
  copied, kept, redone, rows, written = [], [], [], 0, 0
  for split in manifest.splits:
    for index in indices:
      entry = manifest.split(split)["shards"][index]
      file = tfrecord_file(split, index, num_shards)
      why = _copy_state(directory, file, entry)
      if why is None:
        kept.append((split, index))
        continue
      if why != "missing":
        logger.warning("%s: the TFRecord copy %s is unusable (%s); copying it again",
                       directory, file, why)
        redone.append((split, index))
      _remove_copy(directory, file)
      done = _copy_shard(manifest, split, index)
      copied.append((split, index))
      rows, written = rows + done["rows"], written + done["bytes"]
      if progress:
        logger.info("copied %s (%d rows, %d bytes)", done["file"], done["rows"], done["bytes"])
  data, missing = _finalize(manifest)
  return CopyResult(os.fspath(directory), data is not None, copied, kept, redone, missing, rows,
                    written, time.perf_counter() - start)


def copy_after_prepare(directory: Any, task: str, seq_len: int, *, complete: bool,
                       shard_indices: Optional[Sequence[int]] = None) -> dict[str, Any]:
  """`hashmoe prepare --tfrecord`: this host's shards copied (`write_tfrecords`) once the folder is
  complete (its manifest written); the JSON the command prints of them."""
  again = "run `hashmoe prepare --tfrecord` again once every host has finished"
  if not complete:
    return {"complete": False, "next": f"the manifest waits for other hosts' shards; {again}"}
  copies = write_tfrecords(directory, shard_indices=shard_indices)
  return {"complete": copies.complete, "copied": len(copies.copied), "kept": len(copies.kept),
          "redone": len(copies.redone), "missing": len(copies.missing),
          "seconds": round(copies.seconds, 3), "task": prepared_task_name(task, seq_len),
          **({} if copies.complete else {"next": f"other hosts' shards are not copied; {again}"})}


# --------------------------------------------------------------------------------------------------
# Reading the copies: checks.


@dataclasses.dataclass(frozen=True)
class TFRecordCopies:
  """A prepared folder's checked TFRecord copies.

  Attributes:
    manifest: the prepared folder's manifest (the rows' layout, task, feature lengths).
    data: tfrecord.json's object.
  """
  manifest: prepared_lib.Manifest
  data: Mapping[str, Any]

  @property
  def fingerprint(self) -> str:
    return self.data["fingerprint"]

  @property
  def splits(self) -> list[str]:
    return list(self.data["splits"])

  def shard_paths(self, split: str) -> list[str]:
    """The split's TFRecord files in manifest order."""
    return [os.fspath(self.manifest.directory / s["file"])
            for s in self.data["splits"][split]["shards"]]


def _copies_status(manifest: prepared_lib.Manifest) -> tuple[int, int]:
  """(copies with a done record, shards) of a prepared folder."""
  total = done = 0
  for split in manifest.splits:
    for index in range(manifest.data["num_shards"]):
      total += 1
      file = tfrecord_file(split, index, manifest.data["num_shards"])
      done += _done_path(manifest.directory, file).exists()
  return done, total


def open_tfrecords(manifest: prepared_lib.Manifest, *,
                   full_check_bytes: int = prepared_lib.FULL_CHECK_BYTES) -> TFRecordCopies:
  """The folder's TFRecord copies, checked: made from this manifest, every file there with its
  size, and its sha256 when the split's copies total at most `full_check_bytes`.

  Raises:
    PreparedMismatchError: the copies were made from an earlier prepare (stale).
    PreparedDataError: no complete copy (unfinished or never made), or a missing, truncated or
      damaged file.
  """
  directory = manifest.directory
  data = _read_json(directory / MANIFEST_FILE)
  if data is None:
    done, total = _copies_status(manifest)
    state = "never made" if done == 0 else f"unfinished: {done} of {total} shards copied"
    raise PreparedDataError(f"{directory} has no complete TFRecord copy of its prepared rows "
                            f"({MANIFEST_FILE} missing; {state}): {_REPAIR}")
  if data.get("format") != FORMAT:
    raise PreparedDataError(f"{directory / MANIFEST_FILE} is not of format {FORMAT} "
                            f"({data.get('format')}): {_REPAIR}")
  if data.get("source") != manifest.fingerprint:
    raise PreparedMismatchError(
        f"the TFRecord copies in {directory} were made from an earlier prepare of this folder "
        f"(manifest {str(data.get('source'))[:12]}, now {manifest.fingerprint[:12]}): they hold "
        f"other rows than the ArrayRecord shards; {_REPAIR}")
  for split, info in data["splits"].items():
    full = sum(s["bytes"] for s in info["shards"]) <= full_check_bytes
    for shard in info["shards"]:
      path = directory / shard["file"]
      if not path.exists():
        raise PreparedDataError(f"TFRecord copy {path} is missing: {_REPAIR}")
      size = path.stat().length
      if size != shard["bytes"]:
        raise PreparedDataError(f"TFRecord copy {path} has {size} bytes, {MANIFEST_FILE} says "
                                f"{shard['bytes']} (truncated or replaced): {_REPAIR}")
      if full and _sha256(path) != shard["sha256"]:
        raise PreparedDataError(f"TFRecord copy {path} does not match the sha256 in "
                                f"{MANIFEST_FILE} (damaged): {_REPAIR}")
  return TFRecordCopies(manifest, data)


def verify_tfrecords(directory: Any) -> TFRecordCopies:
  """Checks every TFRecord copy of a prepared folder against its sha256, whatever its size.

  Raises:
    PreparedDataError, PreparedMismatchError: as `open_tfrecords`.
  """
  manifest = prepared_lib.read_manifest(directory)
  if manifest is None:
    raise PreparedDataError(f"{directory} has no manifest.json: not a finished prepared folder")
  return open_tfrecords(manifest, full_check_bytes=1 << 62)


# --------------------------------------------------------------------------------------------------
# tf.data: decoding records.


def decode_fn(layout: prepared_lib.RecordLayout):
  """A tf.data map function over batches of records: string[n] -> {feature: int32[n, L]}.

  Raises (inside tf.data, as InvalidArgumentError): a record that is not one row of `layout`.
  """
  size = layout.dtype.itemsize
  pieces, offset = [], 0
  for name, dtype, length in layout.features:
    nbytes = np.dtype(dtype).itemsize * length
    pieces.append((name, tf.as_dtype(np.dtype(dtype)), offset, nbytes, length))
    offset += nbytes
  message = (f"a TFRecord record is not one row of the prepared layout ({size} bytes: "
             f"{[f[0] for f in layout.features]}); {_REPAIR}")

  def decode(records: tf.Tensor) -> dict[str, tf.Tensor]:
    check = tf.debugging.assert_equal(tf.strings.length(records), size, message=message)
    with tf.control_dependencies([check]):
      return {name: tf.ensure_shape(tf.cast(tf.io.decode_raw(
          tf.strings.substr(records, start, nbytes), dtype, little_endian=True), tf.int32),
                                    [None, length])
              for name, dtype, start, nbytes, length in pieces}

  return decode


# Records decoded per call: tf.data runs a map function's ops once per element, so one decode of
# 256 records read the files at 20x the rows/s of one per record (90k vs 4.4k; t5x's whole pipeline
# 37.5k vs 12.2k), embedded-corpus LM rows at L=128 on 2 shared cores:
# `python benchmarks/prepared_tf.py --seq-len 128` and the same with `--decode-batch 1`.
DECODE_BATCH = 256


def _read_file(path: tf.Tensor, *, layout: prepared_lib.RecordLayout) -> tf.data.Dataset:
  records = tf.data.TFRecordDataset(path).batch(DECODE_BATCH)
  return records.map(decode_fn(layout)).unbatch()


class PreparedRowsSource(seqio.FileDataSource):
  """seqio's file source over a prepared folder's TFRecord copies: one decoded row per record.

  Not cacheable (the rows are already the cache) and without `num_input_examples`, so that seqio
  never adds an in-memory `cache()` whose contents a tf.data checkpoint would then hold.
  """

  def __init__(self, copies: TFRecordCopies):
    super().__init__(read_file_fn=functools.partial(_read_file, layout=copies.manifest.layout),
                     split_to_filepattern={s: copies.shard_paths(s) for s in copies.splits},
                     caching_permitted=False)


# --------------------------------------------------------------------------------------------------
# The seqio task.


@dataclasses.dataclass(frozen=True)
class PreparedTaskInfo:
  """What a task registered by `register_prepared_task` reads.

  Attributes:
    name: the prepared task's name.
    source_task: the task whose rows it holds (its vocabulary, its streaming form).
    shape: 'lm' or 'seq2seq'.
    seq_len: SEQ_LEN of the rows.
    directory: the prepared folder.
    manifest: the ArrayRecord manifest's fingerprint.
    copies: tfrecord.json's fingerprint.
    identity: what the registration checked (the above and every copy's size and modification
      time): a later registration that finds it unchanged skips the checks.
  """
  name: str
  source_task: str
  shape: str
  seq_len: int
  directory: str
  manifest: str
  copies: str
  identity: tuple[Any, ...]


_PREPARED_TASKS: dict[str, PreparedTaskInfo] = {}


def _output_features(layout: prepared_lib.RecordLayout, shape: str,
                     seqio_task: seqio.Task) -> dict[str, seqio.Feature]:
  """The model features as seqio output features: token features carry the task's vocabularies
  (t5x compares them with the model's), the rest pass-through ones."""
  features = seqio_task.output_features
  out = {}
  for name, _, length in layout.features:
    if name.endswith("_tokens"):
      vocabulary = features["inputs" if name.startswith("encoder_") and shape != LM
                            else "targets"].vocabulary
    else:
      vocabulary = seqio.PassThroughVocabulary(size=length + 1)
    out[name] = seqio.Feature(vocabulary, add_eos=False, required=True, dtype=tf.int32, rank=1)
  return out


def register_prepared_task(task: str, *, seq_len: int, root: Any = None,
                           shuffle_buffer_size: Optional[int] = None) -> str:
  """Registers the seqio task over `task`'s rows prepared at `seq_len` under `root`
  (PREPARED_DIR), read from their TFRecord copies, and returns its name
  (`prepared_task_name`). Idempotent; a folder prepared or copied again since is re-registered.

  Its examples are the training feature converter's packed rows ({feature: int32[L]}: what
  `hashmoe prepare` wrote); give it to seqio/t5x with `feature_converter_cls(name)`.

  Args:
    task: the registered source task (a hashmoe task gin file registers it).
    seq_len: SEQ_LEN the rows were prepared at.
    root: PREPARED_DIR (None: `prepared.default_root()`).
    shuffle_buffer_size: rows in the task's shuffle buffer (None: the source task's).

  Raises:
    ValueError: `task` is not registered.
    PreparedMismatchError: the folder was prepared for another run (task, vocabulary, SEQ_LEN),
      or its TFRecord copies are stale.
    PreparedDataError: nothing prepared there, or the copies are unfinished or damaged.
  """
  try:
    seqio_task = seqio.get_mixture_or_task(task)
  except ValueError as e:
    raise ValueError(f"task {task!r} is not registered; a hashmoe task gin file "
                     "(configs/tasks/) registers its tasks when the TASK macro is evaluated") from e
  shape = tasks_lib.task_shape(seqio_task)
  directory = prepared_lib.prepared_dir(root, task, seq_len)
  vocabulary = seqio_task.output_features["targets"].vocabulary
  manifest = prepared_lib.open_prepared(
      directory, task=task, shape=shape, seq_len=seq_len, splits=(),
      vocab_fingerprint=vocab_lib.vocab_fingerprint_or_empty(vocabulary))
  if manifest is None:
    state = preparation_lib.status(directory)
    why = ("nothing prepared there" if state["state"] == "none" else
           f"its prepare is unfinished: {state['done']} of {state['total']} shards")
    raise PreparedDataError(
        f"no prepared data for task {task!r} at SEQ_LEN={seq_len} in {directory} ({why}): run "
        "`hashmoe prepare --tfrecord` with this run's gin files first, or train on the streaming "
        "task (DATA_SOURCE='streaming')")
  name = prepared_task_name(task, seq_len)
  side = _read_json(directory / MANIFEST_FILE) or {}
  identity = (os.fspath(directory), manifest.fingerprint, side.get("fingerprint"),
              _file_stats(directory, side))
  known = _PREPARED_TASKS.get(name)
  if known is not None and name in seqio.TaskRegistry.names() and known.identity == identity:
    # Checked when registered, and no file has changed since: gin evaluates MIXTURE_OR_TASK_NAME
    # many times, and a full check reads every file.
    return name
  copies = open_tfrecords(manifest)
  if name in seqio.TaskRegistry.names():
    if known is None:
      raise ValueError(f"task {name!r} is already registered by other code; remove it with "
                       "seqio.TaskRegistry.remove")
    seqio.TaskRegistry.remove(name)  # The folder was prepared or copied again.
  seqio.TaskRegistry.add(
      name, source=PreparedRowsSource(copies),
      output_features=_output_features(manifest.layout, shape, seqio_task), preprocessors=[],
      shuffle_buffer_size=shuffle_buffer_size or seqio_task.shuffle_buffer_size)
  _PREPARED_TASKS[name] = PreparedTaskInfo(name, task, shape, int(seq_len), os.fspath(directory),
                                           manifest.fingerprint, copies.fingerprint, identity)
  logger.info("registered %s: task %s's rows prepared at SEQ_LEN=%d, read from the TFRecord "
              "copies in %s", name, task, seq_len, directory)
  return name


def _file_stats(directory: epath.Path, side: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
  """(size, modification time in ns) of every TFRecord copy tfrecord.json lists ((-1, -1) when
  missing)."""
  stats = []
  for info in side.get("splits", {}).values():
    for shard in info.get("shards", ()):
      try:
        stat = tf.io.gfile.stat(os.fspath(directory / shard["file"]))
        stats.append((int(stat.length), int(stat.mtime_nsec)))
      except tf.errors.NotFoundError:
        stats.append((-1, -1))
  return tuple(stats)


def prepared_task_info(name: str) -> Optional[PreparedTaskInfo]:
  """What the task `name` reads, if `register_prepared_task` registered it; else None."""
  info = _PREPARED_TASKS.get(name)
  return info if info is not None and name in seqio.TaskRegistry.names() else None


def source_task(name: str) -> str:
  """The task whose rows the prepared task `name` holds; any other task's own name."""
  info = prepared_task_info(name)
  return name if info is None else info.source_task


# --------------------------------------------------------------------------------------------------
# Feature converters: the rows are already the model's features.


class _PreparedFeatureConverter(seqio.PassThroughFeatureConverter):
  """Passes prepared rows through unchanged, after checking that they are exactly the features,
  dtypes and lengths the training converter of `SHAPE` would give for `task_feature_lengths`.

  t5x instantiates the model's converter class as `cls(pack=..., use_custom_packing_ops=...)`.
  """
  SHAPE = LM

  def __init__(self, pack: bool = True, use_custom_packing_ops: bool = False, **unused_kwargs):
    del use_custom_packing_ops, unused_kwargs  # The rows are packed already.
    super().__init__()
    if not pack:
      raise ValueError(
          "pack=False asks for unpacked rows, and prepared rows are packed (`hashmoe prepare` "
          "packs them as training does): set the DatasetConfig's pack = True "
          "(configs/t5x/runs/pretrain.gin does), or read the streaming task "
          "(DATA_SOURCE='streaming')")

  def __call__(self, ds: tf.data.Dataset,
               task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    lengths = tasks_lib.feature_lengths(self.SHAPE, dict(task_feature_lengths))
    expected = tasks_lib.feature_converter(self.SHAPE).get_model_feature_lengths(lengths)
    spec = ds.element_spec
    if not isinstance(spec, Mapping) or set(spec) != set(expected):
      found = sorted(spec) if isinstance(spec, Mapping) else spec
      raise ValueError(f"prepared rows with features {found}; a {self.SHAPE} model reads "
                       f"{sorted(expected)}: the task was prepared for another model shape")
    for name, length in expected.items():
      if spec[name].dtype != tf.int32 or spec[name].shape.as_list() != [length]:
        raise ValueError(
            f"prepared rows' {name} are {spec[name].dtype.name}{spec[name].shape.as_list()}; "
            f"TASK_FEATURE_LENGTHS {dict(task_feature_lengths)} asks for int32[{length}]: the "
            "rows were prepared at another SEQ_LEN. Use the SEQ_LEN they were prepared at, or "
            "prepare them at this one")
    return ds


class PreparedDecoderFeatureConverter(_PreparedFeatureConverter):
  """Pass-through for prepared LM rows (what `seqio.DecoderFeatureConverter(pack=True)` made)."""
  SHAPE = LM


class PreparedEncDecFeatureConverter(_PreparedFeatureConverter):
  """Pass-through for prepared seq2seq rows (`seqio.EncDecFeatureConverter(pack=True)`'s)."""
  SHAPE = "seq2seq"


def feature_converter_cls(name: str) -> type[seqio.FeatureConverter]:
  """The converter class to build `name`'s model features with: the pass-through one for a
  prepared task, else the task shape's training converter (`tasks.feature_converter`)."""
  info = prepared_task_info(name)
  if info is not None:
    return PreparedDecoderFeatureConverter if info.shape == LM else PreparedEncDecFeatureConverter
  shape = tasks_lib.task_shape(seqio.get_mixture_or_task(name))
  return type(tasks_lib.feature_converter(shape))
