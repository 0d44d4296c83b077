"""Prepared data: a task's rows tokenised, split and packed once, in random-access shards.

`hashmoe prepare` (`prepare`) runs a registered task's preprocessing exactly as the training
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
    prepare(task, out_dir, *, seq_len, splits, num_shards, shard_indices=None, workers=1,
            progress=True) -> PrepareResult
    verify(out_dir) -> Manifest                      # full sha256 of every shard
    open_prepared(out_dir, *, task, vocab_fingerprint, feature_lengths, shape) -> Manifest
    Manifest.shard_paths(split) -> list[str]; Manifest.record_dtype; decode_rows(records, dtype)
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

import gin
import numpy as np
import seqio
from array_record.python import array_record_module
from etils import epath
from tqdm import auto as tqdm_auto

from hashmoe.data import tasks as tasks_lib
from hashmoe.data import vocab as vocab_lib
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
DEFAULT_NUM_SHARDS = 8
# A split's shards are checked against their sha256 when a pipeline opens them up to this size
# (~2 s at the ~500 MB/s sha256 runs here); above it, size and record count (a restart must not
# read the whole corpus), and `verify` does the full check.
FULL_CHECK_BYTES = 1 << 30
# group_size:1: every record is its own chunk, so a random read decodes one row (what grain's
# ArrayRecordDataSource expects; it warns otherwise).
WRITER_OPTIONS = "group_size:1"
# Rows pulled from tf.data per step of the writer: amortises the per-element Python cost.
_ROWS_PER_READ = 256
_TMP_MARK = ".tmp-"


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


def _sha256(path: epath.Path) -> str:
  with path.open("rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _temporary_name(path: epath.Path) -> epath.Path:
  """A name beside `path` that no other writer (host, process) uses."""
  return path.parent / f".{path.name}{_TMP_MARK}{socket.gethostname()}-{os.getpid()}-" \
                       f"{uuid.uuid4().hex[:8]}"


def _write_json(path: epath.Path, value: Any) -> None:
  """Writes `value` as JSON, atomically (temporary + rename locally; one object write remotely)."""
  text = json.dumps(value, indent=1, sort_keys=True) + "\n"
  if not is_local(path):
    path.write_text(text)
    return
  tmp = _temporary_name(path)
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def _read_json(path: epath.Path) -> Optional[dict[str, Any]]:
  """The JSON object in `path`, or None when it is missing or unreadable (a torn write)."""
  try:
    value = json.loads(path.read_text())
  except (FileNotFoundError, ValueError):
    return None
  return value if isinstance(value, dict) else None


_STRERRORS = {os.strerror(code): code for code in errno.errorcode}


def _as_os_error(error: BaseException, path: Any) -> OSError:
  """An OSError naming `path` for a writer failure: array_record reports its system errors as
  RuntimeError text ("write() failed: No space left on device; writing ..."), which would
  otherwise reach the user as a traceback instead of "no space left on device while writing
  PATH"."""
  if isinstance(error, OSError):
    if not error.filename:
      error.filename = os.fspath(path)
    return error
  message = str(error)
  for text, code in _STRERRORS.items():
    if text and text in message:
      return OSError(code, text, os.fspath(path))
  return OSError(errno.EIO, f"writing the shard failed: {message}", os.fspath(path))


# --------------------------------------------------------------------------------------------------
# The plan, the done records, the manifest.


def _converter_json(shape: str) -> dict[str, Any]:
  return {"name": type(tasks_lib.feature_converter(shape)).__name__, "pack": True}


def make_plan(task: str, *, seq_len: int, splits: Sequence[str],
              num_shards: int) -> dict[str, Any]:
  """What every shard of `task` at `seq_len` is prepared for (prepare.json; see the docstring).

  Raises:
    ValueError: an unknown task, a bad SEQ_LEN or shard count.
  """
  if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
    raise ValueError(f"num_shards={num_shards!r}; expected an int >= 1")
  seqio_task = seqio.get_mixture_or_task(task)
  shape = tasks_lib.task_shape(seqio_task)
  lengths = tasks_lib.feature_lengths(shape, seq_len)
  vocabulary = seqio_task.output_features["targets"].vocabulary
  # The rows' features and lengths as the converter makes them (building a dataset reads nothing).
  spec = tasks_lib.converted_dataset(task, normalize_split(splits[0]), seq_len=seq_len,
                                     shuffle=False, repeat=False).element_spec
  layout = RecordLayout.for_features({k: int(v.shape[0]) for k, v in spec.items()},
                                     int(vocabulary.vocab_size))
  return {"format": FORMAT, "task": task, "shape": shape,
          "vocabulary": {"fingerprint": vocab_lib.vocab_fingerprint_or_empty(vocabulary),
                         "size": int(vocabulary.vocab_size)},
          "feature_lengths": lengths, "converter": _converter_json(shape),
          "record": layout.to_json(), "splits": [normalize_split(s) for s in splits],
          "num_shards": num_shards}


def _plan_differences(found: Mapping[str, Any], wanted: Mapping[str, Any],
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


def _fingerprint(plan: Mapping[str, Any], split_info: Mapping[str, Any]) -> str:
  return vocab_lib.cache_key({"plan": dict(plan), "shards": {
      split: [s["sha256"] for s in info["shards"]] for split, info in split_info.items()}})


def _shard_entry(done: Mapping[str, Any]) -> dict[str, Any]:
  return {k: done[k] for k in ("file", "rows", "tokens", "input_tokens", "bytes", "sha256")}


def _finalize(directory: epath.Path, plan: Mapping[str, Any]) -> tuple[Optional[dict], list]:
  """Writes manifest.json when every shard of every split has its done record; returns (manifest
  or None, the shards still missing as (split, index))."""
  split_info, missing, data_ids = {}, [], set()
  for split in plan["splits"]:
    shards = []
    for index in range(plan["num_shards"]):
      done = _read_json(directory / (shard_file(split, index, plan["num_shards"]) + DONE_SUFFIX))
      if done is None:
        missing.append((split, index))
        continue
      shards.append(_shard_entry(done))
      data_ids.add((split, done.get("data")))
    split_info[split] = {"rows": sum(s["rows"] for s in shards),
                         "tokens": sum(s["tokens"] for s in shards),
                         "input_tokens": sum(s["input_tokens"] for s in shards), "shards": shards}
  if missing:
    return None, missing
  splits_read_twice = sorted({s for s, _ in data_ids if sum(1 for t, _ in data_ids if t == s) > 1})
  if splits_read_twice:
    # Shards prepared from corpus files of other sizes or times (another host's copy, or the
    # files changed between two prepares): the same data copied, or not. Said, not refused.
    logger.warning("%s: the shards of %s were prepared from corpus files of different sizes or "
                   "modification times (copies on several hosts, or files changed between two "
                   "prepares); if the files changed, prepare again into an empty folder",
                   directory, splits_read_twice)
  manifest = {**plan, "split_info": split_info, "fingerprint": _fingerprint(plan, split_info)}
  _write_json(directory / MANIFEST_FILE, manifest)
  return manifest, []


# --------------------------------------------------------------------------------------------------
# Writing shards.


def _write_shard(task: str, directory: epath.Path, split: str, index: int, plan: Mapping[str, Any],
                 report: Callable[[int, int], None]) -> dict[str, Any]:
  """Prepares one shard: its rows to a temporary file, renamed (or copied) into place, then its
  done record. On any failure the temporary file is removed and nothing of the shard remains.

  Args:
    report: called with (rows, tokens) as rows are written (the progress bar).

  Returns:
    The done record.
  """
  num_shards = plan["num_shards"]
  final = directory / shard_file(split, index, num_shards)
  layout = RecordLayout.from_json(plan["record"])
  if is_local(directory):
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(final)
  else:  # ArrayRecord writes local files; the finished one is copied up.
    tmp = epath.Path(tempfile.mkdtemp(prefix="hashmoe-prepare-")) / final.name
  dataset = tasks_lib.converted_dataset(task, split, seq_len=plan["feature_lengths"],
                                        shuffle=False, repeat=False, shard_index=index,
                                        num_shards=num_shards)
  rows = tokens = input_tokens = 0
  writer = None
  try:
    writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), WRITER_OPTIONS)
    for batch in tasks_lib.iterate_dataset(dataset.batch(_ROWS_PER_READ)):
      for record in layout.encode(batch):
        writer.write(record)
      n = len(batch["decoder_target_tokens"])
      targets, inputs = count_tokens_of(batch)
      rows, tokens, input_tokens = rows + n, tokens + targets, input_tokens + inputs
      report(n, targets)
    try:
      writer.close()
    except Exception as e:  # pylint: disable=broad-except  The write error, reported at close.
      raise _as_os_error(e, final) from None
    writer = None
    done = {"format": FORMAT, "file": shard_file(split, index, num_shards), "split": split,
            "shard": index, "num_shards": num_shards, "rows": rows, "tokens": tokens,
            "input_tokens": input_tokens, "bytes": tmp.stat().length, "sha256": _sha256(tmp),
            "data": tasks_lib.data_fingerprint(task, split)}
    try:
      if is_local(directory):
        os.replace(tmp, final)
      else:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.copy(final, overwrite=True)
    except OSError as e:
      raise _as_os_error(e, final) from None
    _write_json(final.parent / (final.name + DONE_SUFFIX), done)
    return done
  except BaseException:
    if writer is not None:
      try:
        writer.close()
      except Exception:  # pylint: disable=broad-except  Already failing; the file goes anyway.
        pass
    tmp.unlink(missing_ok=True)
    raise
  finally:
    if not is_local(directory):  # The local copy of a shard that went up (or failed to).
      shutil.rmtree(tmp.parent, ignore_errors=True)


def _finished(directory: epath.Path, split: str, index: int, num_shards: int) -> Optional[str]:
  """None when shard (split, index) is finished and its file matches its done record's sha256;
  else why not ('missing', or what failed)."""
  path = directory / shard_file(split, index, num_shards)
  done = _read_json(path.parent / (path.name + DONE_SUFFIX))
  if done is None:
    return "missing"
  if done.get("format") != FORMAT or done.get("file") != shard_file(split, index, num_shards):
    return f"its done record is of another format or shard ({done.get('format')})"
  if not path.exists():
    return "its file is missing"
  size = path.stat().length
  if size != done.get("bytes"):
    return f"its file has {size} bytes, its done record says {done.get('bytes')}"
  if _sha256(path) != done.get("sha256"):
    return "its file's sha256 differs from its done record's"
  return None


def _remove_shard(directory: epath.Path, split: str, index: int, num_shards: int) -> None:
  """Removes what an unfinished or damaged shard left: its done record first (so that a crash
  mid-removal never leaves a done record without its file), its file, its temporary files."""
  path = directory / shard_file(split, index, num_shards)
  (path.parent / (path.name + DONE_SUFFIX)).unlink(missing_ok=True)
  path.unlink(missing_ok=True)
  if path.parent.exists():
    for leftover in path.parent.glob(f".{path.name}{_TMP_MARK}*"):
      leftover.unlink(missing_ok=True)


# Worker processes (spawned: a forked TensorFlow is unsafe) register the task from its pickled
# spec and report progress through a queue.
_WORKER_QUEUE: Any = None
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
  """Asks Linux to SIGKILL this worker when the prepare that started it dies: a SIGKILLed
  prepare must not leave workers finishing shards behind the back of the next prepare."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  except (OSError, AttributeError):  # Not Linux: orphaned workers finish their shard and exit.
    return
  if os.getppid() == 1:  # The parent died before the request took effect.
    os._exit(1)  # pylint: disable=protected-access


def _init_worker(spec: tasks_lib.TaskSpec, progress: Any) -> None:
  global _WORKER_QUEUE
  _die_with_parent()
  logging.basicConfig(level=logging.WARNING)
  tasks_lib.register_task(spec.name, spec.corpus, spec.shape, spec.vocabulary,
                          shuffle_buffer_size=spec.shuffle_buffer_size)
  _WORKER_QUEUE = progress


def _worker_shard(task: str, directory: str, split: str, index: int,
                  plan: Mapping[str, Any]) -> dict[str, Any]:
  report = lambda rows, tokens: _WORKER_QUEUE.put((rows, tokens))
  return _write_shard(task, epath.Path(directory), split, index, plan, report)


@dataclasses.dataclass
class PrepareResult:
  """What `prepare` did.

  Attributes:
    directory: the prepared folder.
    manifest: the manifest when every shard is done (by this prepare or others), else None.
    prepared: shards written now, as (split, index).
    kept: finished shards found and verified (sha256), not redone.
    redone: shards found damaged or unfinished, removed and written again.
    missing: shards still to do (by other hosts' prepares) when there is no manifest yet.
    rows, tokens: rows and non-padding target tokens written now.
    seconds: wall time.
  """
  directory: str
  manifest: Optional[dict[str, Any]]
  prepared: list[tuple[str, int]]
  kept: list[tuple[str, int]]
  redone: list[tuple[str, int]]
  missing: list[tuple[str, int]]
  rows: int
  tokens: int
  seconds: float

  @property
  def tokens_per_s(self) -> float:
    return self.tokens / max(self.seconds, 1e-9)


def prepare(task: str, out_dir: Any, *, seq_len: int, splits: Sequence[str] = DEFAULT_SPLITS,
            num_shards: int = DEFAULT_NUM_SHARDS, shard_indices: Optional[Sequence[int]] = None,
            workers: int = 1, progress: bool = True) -> PrepareResult:
  """Prepares `task`'s splits at `seq_len` into `out_dir` (see the module docstring).

  Args:
    task: a registered task (worker processes need it registered by `tasks.register_task`).
    out_dir: the prepared folder (`prepared_dir(PREPARED_DIR, task, seq_len)` for training to find
      it), local or remote (gs://...).
    seq_len: SEQ_LEN, the row length (inputs and targets alike for seq2seq).
    splits: the splits to prepare.
    num_shards: shards per split (the unit of parallelism, resumption and hosts' shares).
    shard_indices: the shards this call prepares (default all): several hosts give disjoint sets.
    workers: worker processes (1: this process).
    progress: show a tqdm bar of tokens written (with tokens/s).

  Returns:
    PrepareResult; `manifest` is set once every shard of the folder is done.

  Raises:
    PreparedMismatchError: the folder was begun for another plan (task, vocabulary, SEQ_LEN,
      splits, shard count).
    ValueError: bad arguments.
    OSError: a write failed (disk full, permissions), naming the path; finished shards are kept.
  """
  start = time.perf_counter()
  directory = epath.Path(out_dir)
  if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
    raise ValueError(f"workers={workers!r}; expected an int >= 1")
  if not splits:
    raise ValueError("splits is empty; give at least one split (train, validation, test)")
  plan = make_plan(task, seq_len=seq_len, splits=splits, num_shards=num_shards)
  indices = list(range(num_shards)) if shard_indices is None else list(shard_indices)
  bad = [i for i in indices if not isinstance(i, (int, np.integer)) or not 0 <= i < num_shards]
  if bad or len(set(indices)) != len(indices):
    raise ValueError(f"shard_indices={indices}; expected distinct ints in [0, {num_shards})")
  directory.mkdir(parents=True, exist_ok=True)
  _claim_plan(directory, plan)
  kept, redone, todo = [], [], []
  for split in plan["splits"]:
    for index in indices:
      why = _finished(directory, split, index, num_shards)
      if why is None:
        kept.append((split, index))
        continue
      if why != "missing":
        logger.warning("%s: shard %d of %s is damaged or unfinished (%s); preparing it again",
                       directory, index, split, why)
        redone.append((split, index))
      _remove_shard(directory, split, index, num_shards)
      todo.append((split, index))
  if kept:
    logger.info("%s: %d finished shard(s) verified (sha256) and kept", directory, len(kept))
  bar = tqdm_auto.tqdm(unit="tok", unit_scale=True, dynamic_ncols=True, disable=not progress,
                       desc=f"prepare {task} len{seq_len}", postfix={"shards": f"0/{len(todo)}"})
  rows = tokens = 0

  def report(n: int, t: int) -> None:
    nonlocal rows, tokens
    rows, tokens = rows + n, tokens + t
    bar.update(t)

  try:
    if workers == 1 or len(todo) <= 1:
      for done_count, (split, index) in enumerate(todo, 1):
        _write_shard(task, directory, split, index, plan, report)
        bar.set_postfix(shards=f"{done_count}/{len(todo)}")
    elif todo:
      _run_workers(task, directory, plan, todo, min(workers, len(todo)), report, bar)
  finally:
    bar.close()
  manifest, missing = _finalize(directory, plan)
  seconds = time.perf_counter() - start
  if manifest is None:
    logger.info("%s: %d shard(s) done here; waiting for %d more (other hosts' shard_indices) "
                "before the manifest is written", directory, len(todo), len(missing))
  return PrepareResult(os.fspath(directory), manifest, todo, kept, redone, missing, rows, tokens,
                       seconds)


def _claim_plan(directory: epath.Path, plan: Mapping[str, Any]) -> None:
  """Writes prepare.json, or checks that the one there is `plan` (a resume, another host)."""
  path = directory / PLAN_FILE
  found = _read_json(path)
  if found is None:
    if any(directory.iterdir()) and not path.exists():
      leftovers = sorted(p.name for p in directory.iterdir())[:5]
      raise PreparedMismatchError(
          f"{directory} is not empty ({leftovers}) and holds no {PLAN_FILE}: not a prepared "
          "folder; give an empty or new folder")
    _write_json(path, plan)
    return
  differences = _plan_differences(found, plan, sorted(set(found) | set(plan)))
  if differences:
    raise PreparedMismatchError(
        f"{directory} is being prepared for another plan ({'; '.join(differences)}); its shards "
        "cannot be mixed with these. Prepare into another folder (PREPARED_DIR), or delete this "
        "one to start over.")


def _run_workers(task: str, directory: epath.Path, plan: Mapping[str, Any],
                 todo: Sequence[tuple[str, int]], workers: int,
                 report: Callable[[int, int], None], bar: Any) -> None:
  """Prepares `todo` in `workers` spawned processes; the first failure cancels what has not
  started, lets running shards finish (kept for the next prepare) and is raised."""
  spec = tasks_lib.task_spec(task)
  if spec is None:
    raise ValueError(f"task {task!r} was not registered by hashmoe.data.tasks.register_task: "
                     "worker processes cannot register it; use workers=1")
  context = multiprocessing.get_context("spawn")
  progress = context.Queue()  # Handed to the workers as they start (initargs).
  try:
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                initializer=_init_worker,
                                                initargs=(spec, progress)) as pool:
      pending = {pool.submit(_worker_shard, task, os.fspath(directory), split, index, plan)
                 for split, index in todo}
      finished, error = 0, None
      try:
        while pending:
          done, pending = concurrent.futures.wait(pending, timeout=0.2,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
          _drain(progress, report)
          for future in done:
            if not future.cancelled() and future.exception() is not None and error is None:
              error = future.exception()
              for other in pending:
                other.cancel()
            finished += 1
            bar.set_postfix(shards=f"{finished}/{len(todo)}")
      except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
      _drain(progress, report)
      if error is not None:
        raise error
  finally:
    progress.close()


def _drain(progress: Any, report: Callable[[int, int], None]) -> None:
  while True:
    try:
      rows, tokens = progress.get_nowait()
    except queue.Empty:
      return
    report(rows, tokens)


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
  data = _read_json(path)
  if data is None or data.get("format") != FORMAT or "split_info" not in data:
    found = data.get("format") if data else "unreadable JSON"
    raise PreparedDataError(f"{path} is not a manifest of {FORMAT} ({found}); prepare the folder "
                            "again (`hashmoe prepare`)")
  return Manifest(directory, data, directory)


def verify(out_dir: Any, *, splits: Optional[Sequence[str]] = None) -> Manifest:
  """Checks every shard of a prepared folder against its sha256 (and writes the manifest if all
  shards are done but none was written, e.g. after hosts prepared disjoint shards).

  Raises:
    PreparedDataError: naming every missing, truncated or damaged shard.
  """
  directory = epath.Path(out_dir)
  plan = _read_json(directory / PLAN_FILE)
  if plan is None:
    raise PreparedDataError(f"{directory} has no {PLAN_FILE}: not a prepared folder")
  problems = []
  for split in splits or plan["splits"]:
    for index in range(plan["num_shards"]):
      why = _finished(directory, normalize_split(split), index, plan["num_shards"])
      if why is not None:
        problems.append(f"{shard_file(normalize_split(split), index, plan['num_shards'])}: {why}")
  if problems:
    raise PreparedDataError(
        f"{directory}: {len(problems)} shard(s) unusable ({'; '.join(problems[:5])}); run "
        "`hashmoe prepare` again with the same settings: it redoes exactly those")
  manifest = read_manifest(directory)
  if manifest is None:
    _finalize(directory, plan)
    manifest = read_manifest(directory)
  return manifest


def match_run(manifest: Manifest, *, task: str, shape: str, vocab_fingerprint: str,
              seq_len: int) -> None:
  """Refuses a manifest made for another run.

  Raises:
    PreparedMismatchError: naming each difference (task, vocabulary, feature lengths, converter).
  """
  data = manifest.data
  wanted = {"task": task, "vocabulary fingerprint": vocab_fingerprint,
            "feature_lengths": tasks_lib.feature_lengths(shape, seq_len),
            "converter": _converter_json(shape)}
  found = {"task": data.get("task"), "vocabulary fingerprint": data["vocabulary"]["fingerprint"],
           "feature_lengths": data.get("feature_lengths"), "converter": data.get("converter")}
  differences = _plan_differences(found, wanted, wanted)
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
    if full and _sha256(path) != shard["sha256"]:
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
      tmp = _temporary_name(local)
      try:
        (manifest.directory / shard["file"]).copy(tmp, overwrite=True)
        if _sha256(tmp) != shard["sha256"]:
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


def status(directory: Any) -> dict[str, Any]:
  """What a prepared folder holds, for logs: {"state": "none"|"partial"|"complete", "done",
  "total"} (shards with done records out of all)."""
  directory = epath.Path(directory)
  plan = _read_json(directory / PLAN_FILE)
  if plan is None:
    return {"state": "none", "done": 0, "total": 0}
  total = len(plan["splits"]) * plan["num_shards"]
  done = sum((directory / (shard_file(s, i, plan["num_shards"]) + DONE_SUFFIX)).exists()
             for s in plan["splits"] for i in range(plan["num_shards"]))
  state = "complete" if (directory / MANIFEST_FILE).exists() else "partial"
  return {"state": state, "done": done, "total": total}


# --------------------------------------------------------------------------------------------------
# The `hashmoe prepare` command's entry point.


@gin.configurable(module="hashmoe.data.prepared")
def prepare_inputs(task: str = gin.REQUIRED, seq_len: int = gin.REQUIRED,
                   root: Any = None) -> tuple[str, int, epath.Path]:
  """(task, SEQ_LEN, the task's prepared folder under `root`) of a run config: what `hashmoe
  prepare` reads from the same gin files as `hashmoe train` (TASK, SEQ_LEN, PREPARED_DIR)."""
  if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
    raise PreparedMismatchError(f"SEQ_LEN={seq_len!r}; expected an int >= 2")
  return task, seq_len, prepared_dir(root, task, seq_len)
