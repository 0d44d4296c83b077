"""`hashmoe prepare`: writing a task's prepared shards, resumably, in parallel, on several hosts.

The format, the manifest and everything a reader needs live in `hashmoe.data.prepared` (read its
docstring first); this module writes them:

* `make_plan` fixes what every shard is prepared for (prepare.json); `prepare` claims the plan
  (a folder holds one plan: a resume or another host must name the same), finds the shards still
  to do (a finished shard is verified against its done record's sha256, a failed one redone),
  writes them with `workers` spawned processes, each shard to a temporary name renamed into place
  (written locally and copied for a remote folder), then its done record; whoever finds every
  shard done writes manifest.json (`_finalize`).
* `verify` checks every shard's sha256 and writes a missing manifest (after hosts prepared
  disjoint `shard_indices`); `status` says how far a folder is, for logs.
* `prepare_inputs` is the gin entry point the CLI reads (TASK, SEQ_LEN, PREPARED_DIR).

Worker processes die with their parent (PR_SET_PDEATHSIG on Linux), so a killed prepare leaves
only temporary files, which the next one deletes.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import errno
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import gin
import numpy as np
import seqio
from array_record.python import array_record_module
from etils import epath
from tqdm import auto as tqdm_auto

from hashmoe.data import prepared as prepared_lib
from hashmoe.data import tasks as tasks_lib
from hashmoe.data import vocab as vocab_lib
from hashmoe.data.text_files import normalize_split
from hashmoe.training.errors import PreparedDataError, PreparedMismatchError

logger = logging.getLogger(__name__)

# Worker processes (spawned: a forked TensorFlow is unsafe) register the task from its pickled
# spec and report progress through a queue.
_WORKER_QUEUE: Any = None
DEFAULT_NUM_SHARDS = 8
# group_size:1: every record is its own chunk, so a random read decodes one row (what grain's
# ArrayRecordDataSource expects; it warns otherwise).
WRITER_OPTIONS = "group_size:1"
# Rows pulled from tf.data per step of the writer: amortises the per-element Python cost.
_ROWS_PER_READ = 256
_STRERRORS = {os.strerror(code): code for code in errno.errorcode}


# --------------------------------------------------------------------------------------------------
# Write errors.


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
  layout = prepared_lib.RecordLayout.for_features({k: int(v.shape[0]) for k, v in spec.items()},
                                     int(vocabulary.vocab_size))
  return {"format": prepared_lib.FORMAT, "task": task, "shape": shape,
          "vocabulary": {"fingerprint": vocab_lib.vocab_fingerprint_or_empty(vocabulary),
                         "size": int(vocabulary.vocab_size)},
          "feature_lengths": lengths, "converter": prepared_lib.converter_json(shape),
          "record": layout.to_json(), "splits": [normalize_split(s) for s in splits],
          "num_shards": num_shards}


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
      done = prepared_lib.read_json(directory / (prepared_lib.shard_file(split, index, plan["num_shards"]) + prepared_lib.DONE_SUFFIX))
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
  prepared_lib.write_json(directory / prepared_lib.MANIFEST_FILE, manifest)
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
  final = directory / prepared_lib.shard_file(split, index, num_shards)
  layout = prepared_lib.RecordLayout.from_json(plan["record"])
  if prepared_lib.is_local(directory):
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = prepared_lib.temporary_name(final)
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
      targets, inputs = prepared_lib.count_tokens_of(batch)
      rows, tokens, input_tokens = rows + n, tokens + targets, input_tokens + inputs
      report(n, targets)
    try:
      writer.close()
    except Exception as e:  # pylint: disable=broad-except  The write error, reported at close.
      raise _as_os_error(e, final) from None
    writer = None
    done = {"format": prepared_lib.FORMAT, "file": prepared_lib.shard_file(split, index, num_shards), "split": split,
            "shard": index, "num_shards": num_shards, "rows": rows, "tokens": tokens,
            "input_tokens": input_tokens, "bytes": tmp.stat().length, "sha256": prepared_lib.sha256_of(tmp),
            "data": tasks_lib.data_fingerprint(task, split)}
    try:
      if prepared_lib.is_local(directory):
        os.replace(tmp, final)
      else:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.copy(final, overwrite=True)
    except OSError as e:
      raise _as_os_error(e, final) from None
    prepared_lib.write_json(final.parent / (final.name + prepared_lib.DONE_SUFFIX), done)
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
    if not prepared_lib.is_local(directory):  # The local copy of a shard that went up (or failed to).
      shutil.rmtree(tmp.parent, ignore_errors=True)


def _finished(directory: epath.Path, split: str, index: int, num_shards: int) -> Optional[str]:
  """None when shard (split, index) is finished and its file matches its done record's sha256;
  else why not ('missing', or what failed)."""
  path = directory / prepared_lib.shard_file(split, index, num_shards)
  done = prepared_lib.read_json(path.parent / (path.name + prepared_lib.DONE_SUFFIX))
  if done is None:
    return "missing"
  if done.get("format") != prepared_lib.FORMAT or done.get("file") != prepared_lib.shard_file(split, index, num_shards):
    return f"its done record is of another format or shard ({done.get('format')})"
  if not path.exists():
    return "its file is missing"
  size = path.stat().length
  if size != done.get("bytes"):
    return f"its file has {size} bytes, its done record says {done.get('bytes')}"
  if prepared_lib.sha256_of(path) != done.get("sha256"):
    return "its file's sha256 differs from its done record's"
  return None


def _remove_shard(directory: epath.Path, split: str, index: int, num_shards: int) -> None:
  """Removes what an unfinished or damaged shard left: its done record first (so that a crash
  mid-removal never leaves a done record without its file), its file, its temporary files."""
  path = directory / prepared_lib.shard_file(split, index, num_shards)
  (path.parent / (path.name + prepared_lib.DONE_SUFFIX)).unlink(missing_ok=True)
  path.unlink(missing_ok=True)
  if path.parent.exists():
    for leftover in path.parent.glob(f".{path.name}{prepared_lib.TMP_MARK}*"):
      leftover.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Worker processes.


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
# --------------------------------------------------------------------------------------------------
# prepare().


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


def prepare(task: str, out_dir: Any, *, seq_len: int, splits: Sequence[str] = prepared_lib.DEFAULT_SPLITS,
            num_shards: int = DEFAULT_NUM_SHARDS, shard_indices: Optional[Sequence[int]] = None,
            workers: int = 1, progress: bool = True) -> PrepareResult:
  """Prepares `task`'s splits at `seq_len` into `out_dir` (see the module docstring).

  Args:
    task: a registered task (worker processes need it registered by `tasks.register_task`).
    out_dir: the prepared folder (`prepared_lib.prepared_dir(PREPARED_DIR, task, seq_len)` for training to find
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
  path = directory / prepared_lib.PLAN_FILE
  found = prepared_lib.read_json(path)
  if found is None:
    if any(directory.iterdir()) and not path.exists():
      leftovers = sorted(p.name for p in directory.iterdir())[:5]
      raise PreparedMismatchError(
          f"{directory} is not empty ({leftovers}) and holds no {prepared_lib.PLAN_FILE}: not a prepared "
          "folder; give an empty or new folder")
    prepared_lib.write_json(path, plan)
    return
  differences = prepared_lib.plan_differences(found, plan, sorted(set(found) | set(plan)))
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
# Checking a folder.


def verify(out_dir: Any, *, splits: Optional[Sequence[str]] = None) -> prepared_lib.Manifest:
  """Checks every shard of a prepared folder against its sha256 (and writes the manifest if all
  shards are done but none was written, e.g. after hosts prepared disjoint shards).

  Raises:
    PreparedDataError: naming every missing, truncated or damaged shard.
  """
  directory = epath.Path(out_dir)
  plan = prepared_lib.read_json(directory / prepared_lib.PLAN_FILE)
  if plan is None:
    raise PreparedDataError(f"{directory} has no {prepared_lib.PLAN_FILE}: not a prepared folder")
  problems = []
  for split in splits or plan["splits"]:
    for index in range(plan["num_shards"]):
      why = _finished(directory, normalize_split(split), index, plan["num_shards"])
      if why is not None:
        problems.append(f"{prepared_lib.shard_file(normalize_split(split), index, plan['num_shards'])}: {why}")
  if problems:
    raise PreparedDataError(
        f"{directory}: {len(problems)} shard(s) unusable ({'; '.join(problems[:5])}); run "
        "`hashmoe prepare` again with the same settings: it redoes exactly those")
  manifest = prepared_lib.read_manifest(directory)
  if manifest is None:
    _finalize(directory, plan)
    manifest = prepared_lib.read_manifest(directory)
  return manifest


def status(directory: Any) -> dict[str, Any]:
  """What a prepared folder holds, for logs: {"state": "none"|"partial"|"complete", "done",
  "total"} (shards with done records out of all)."""
  directory = epath.Path(directory)
  plan = prepared_lib.read_json(directory / prepared_lib.PLAN_FILE)
  if plan is None:
    return {"state": "none", "done": 0, "total": 0}
  total = len(plan["splits"]) * plan["num_shards"]
  done = sum((directory / (prepared_lib.shard_file(s, i, plan["num_shards"]) + prepared_lib.DONE_SUFFIX)).exists()
             for s in plan["splits"] for i in range(plan["num_shards"]))
  state = "complete" if (directory / prepared_lib.MANIFEST_FILE).exists() else "partial"
  return {"state": state, "done": done, "total": total}


# --------------------------------------------------------------------------------------------------
# The `hashmoe prepare` command's entry point.


@gin.configurable(module="hashmoe.data.preparation")
def prepare_inputs(task: str = gin.REQUIRED, seq_len: int = gin.REQUIRED,
                   root: Any = None) -> tuple[str, int, epath.Path]:
  """(task, SEQ_LEN, the task's prepared folder under `root`) of a run config: what `hashmoe
  prepare` reads from the same gin files as `hashmoe train` (TASK, SEQ_LEN, PREPARED_DIR)."""
  if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
    raise PreparedMismatchError(f"SEQ_LEN={seq_len!r}; expected an int >= 2")
  return task, seq_len, prepared_lib.prepared_dir(root, task, seq_len)
