"""The grain loader over prepared data (`hashmoe.data.prepared`), and the run's input pipeline.

Order of the training rows. The train split's rows are numbered 0..R-1 in manifest order (shard
0's rows, then shard 1's, ...). Epoch e visits them in grain's global index shuffle
(`MapDataset.shuffle(seed)`: a Feistel-style permutation computed per index, seeded with
seed + e, so nothing of size R is materialised), and the epochs follow each other as one stream
(`repeat()`; a batch may span an epoch boundary). Global batch b is stream rows [b*B, (b+1)*B);
process p of P takes its contiguous slice [b*B + p*B/P, b*B + (p+1)*B/P) (`batch(B/P)` then every
P-th local batch from p): each process reads only its rows, and the global batch order depends on
(data, seed, B) alone, never on P.

Resume. The position in every checkpoint is {format, dataset (the manifest's fingerprint), task,
seed, batch_size (global), next_batch}; `train_batches(position)` continues at `next_batch` by
slicing the grain dataset (index arithmetic: O(1) whatever the step, no replay). A position from
another dataset (re-prepared, other content), seed or batch size is refused naming the difference,
as is one written by the streaming pipeline (or the reverse: the batch order would change).

Changing the number of hosts between stop and restart keeps the global batch order exactly: every
process saves the same position (it names a global batch), the checkpoint accepts it for any
process count (`hosts_independent`), and each process of the new run takes its slice of the same
global batches (BATCH_SIZE must still divide by the new process count). So a run stopped on 4
hosts and resumed on 2 trains on the batches the 4-host run would have. (grain's ElasticIterator
solves the same problem for pipelines whose order depends on the shard count; this one's does
not.)

Throughput: records are read in batches (`ArrayRecordDataSource.__getitems__`), decoded with one
`np.frombuffer` per batch, and prefetched by grain threads (`ReadOptions`); `worker_count` > 0 adds
grain worker processes (`mp_prefetch`). docs/PERFORMANCE.md has the measured rates.

API (benchmarks/data.py and the routing precomputation build on it):

    batches(manifest, split='train', *, batch_size, seed, start_batch=0, process_index=0,
            process_count=1, worker_count=0, prefetch=...) -> PreparedBatches
        # an iterator of this process's batches from global batch `start_batch`;
        # .position() -> the JSON position of the next batch; .close()
    eval_batches(manifest, split, *, batch_size, num_batches, process_index, process_count)
    PreparedPipeline(task, *, batch_size, seq_len, seed, directory)   # an InputPipeline
    make_input_pipeline(task, *, batch_size, seq_len, seed, prepared_dir, data_source)
        # PreparedPipeline where the task's prepared folder has a matching manifest, else
        # TaskPipeline (streaming); logs which and why
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import gin
import grain
import jax
import numpy as np
import seqio
from grain.experimental import index_shuffle

from hashmoe.data import pipeline as pipeline_lib
from hashmoe.data import preparation as preparation_lib
from hashmoe.data import prepared as prepared_lib
from hashmoe.data import stats as stats_lib
from hashmoe.data import tasks as tasks_lib
from hashmoe.data import vocab as vocab_lib
from hashmoe.data.text_files import normalize_split
from hashmoe.training.errors import PreparedDataError, PreparedMismatchError

logger = logging.getLogger(__name__)

POSITION_FORMAT = prepared_lib.POSITION_FORMAT
DATA_SOURCES = ("auto", "prepared", "streaming")
# grain's read-ahead: threads reading records and batches buffered per process. Two threads fill
# a 2-core host; more only contend for the GIL (docs/PERFORMANCE.md).
DEFAULT_READ_THREADS = 2
DEFAULT_PREFETCH_BATCHES = 8
# The batch indices a training iterator walks through: endless in practice (2^62 batches).
_ENDLESS = 1 << 62


# --------------------------------------------------------------------------------------------------
# Batches.


def _shuffle_seed(seed: int) -> int:
  # grain's index shuffle takes a 32-bit seed (and adds the epoch to it).
  return int(seed) % (1 << 32)


def _check_batch_split(batch_size: int, process_index: int, process_count: int) -> int:
  """This process's rows of a global batch (`batch_size` / `process_count`), checked."""
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}; expected an int >= 1")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}, process_count={process_count}")
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} does not divide evenly over {process_count} "
                     "processes")
  return batch_size // process_count


class _BatchReader:
  """Reads this process's share of global batch b (`__call__`): picklable, so that grain worker
  processes can each hold one; the record source is opened in the process that reads."""

  def __init__(self, rows: prepared_lib.RowReader, layout: prepared_lib.RecordLayout, *,
               seed: int, batch_size: int, process_index: int, process_count: int):
    self._source, self._rows, self._layout = rows, len(rows), layout
    self._seed, self._batch_size = _shuffle_seed(seed), batch_size
    self._local = batch_size // process_count
    self._offset = process_index * self._local

  def row_indices(self, batch: int) -> list[int]:
    """The rows (in manifest order) of this process's share of global batch `batch`: stream rows
    [b*B + p*B/P, b*B + (p+1)*B/P), each the epoch's shuffled index of its place in the epoch."""
    first = batch * self._batch_size + self._offset
    indices = []
    for position in range(first, first + self._local):
      epoch, index = divmod(position, self._rows)
      # grain's global shuffle (`MapDataset.shuffle`): a 4-round Feistel-style index permutation,
      # reseeded for each epoch with seed + epoch, as grain's ShuffleMapDataset seeds it.
      indices.append(index_shuffle(index, max_index=self._rows - 1,
                                   seed=(self._seed + epoch) % (1 << 32), rounds=4))
    return indices

  def __call__(self, batch: int) -> dict[str, np.ndarray]:
    return self._layout.decode(self._source.read(self.row_indices(batch)))


class PreparedBatches(tasks_lib.CountedBatches):
  """This process's training batches from prepared data (`batches`), with the position to resume
  from saved in checkpoints.

  Each batch is {feature: int32[batch_size / process_count, L]}, the arrays `tasks.get_batches`
  yields.
  """

  def __init__(self, manifest: prepared_lib.Manifest, split: str, *, batch_size: int, seed: int,
               start_batch: int, process_index: int, process_count: int, worker_count: int,
               read_threads: int, prefetch: int):
    _check_batch_split(batch_size, process_index, process_count)
    if not isinstance(start_batch, int) or start_batch < 0:
      raise ValueError(f"start_batch={start_batch!r}; expected an int >= 0")
    self._identity = {"format": POSITION_FORMAT, "dataset": manifest.fingerprint,
                      "task": manifest.task, "split": normalize_split(split), "seed": int(seed),
                      "batch_size": int(batch_size)}
    self._next_batch = start_batch
    rows = manifest.rows(split)
    if rows == 0:
      raise PreparedDataError(f"the {split!r} split of {manifest.directory} has no rows: the "
                              "corpus gave no examples to it")
    self.reader = _BatchReader(prepared_lib.RowReader(manifest, split), manifest.layout,
                               seed=seed, batch_size=batch_size, process_index=process_index,
                               process_count=process_count)
    # Global batches from start_batch on, each read by grain's threads (or worker processes) as
    # one `__getitems__` of its rows: the index arithmetic that makes resuming O(1).
    dataset = grain.MapDataset.range(start_batch, _ENDLESS).map(self.reader)
    iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                         prefetch_buffer_size=prefetch))
    if worker_count > 0:
      iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    self._iterator = iter(iterable)

  def position(self) -> dict[str, Any]:
    """The JSON position to resume from: the same on every process (it names a global batch),
    so a restart may run on another number of processes (`any_process_count`)."""
    return {**self._identity, "next_batch": self._next_batch, "any_process_count": True}

  def close(self) -> None:
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def batches(manifest: prepared_lib.Manifest, split: str = "train", *, batch_size: int, seed: int,
            start_batch: int = 0, process_index: int = 0, process_count: int = 1,
            worker_count: int = 0, read_threads: int = DEFAULT_READ_THREADS,
            prefetch: int = DEFAULT_PREFETCH_BATCHES) -> PreparedBatches:
  """This process's batches of `split`, globally shuffled per epoch, from global batch
  `start_batch` on (see the module docstring for the order). O(1) in `start_batch`.

  Args:
    manifest: an opened prepared folder (`prepared.open_prepared`).
    batch_size: rows of a global batch (over all processes).
    seed: the run's seed (the shuffle of epoch e is seeded with seed + e).
    start_batch: the global batch to start at.
    process_index, process_count: this process's share.
    worker_count: grain worker processes (0: read in this process, with `read_threads` threads).
    read_threads, prefetch: grain's ReadOptions (threads, buffered batches).
  """
  return PreparedBatches(manifest, split, batch_size=batch_size, seed=seed,
                         start_batch=start_batch, process_index=process_index,
                         process_count=process_count, worker_count=worker_count,
                         read_threads=read_threads, prefetch=prefetch)


def eval_batches(manifest: prepared_lib.Manifest, split: str, *, batch_size: int,
                 num_batches: int, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` global batches of `split` in manifest order (fixed: no shuffle),
  this process's slice of each; a last partial batch is padded with all-zero rows (zero loss
  weight), as the streaming pipeline pads it."""
  local = _check_batch_split(batch_size, process_index, process_count)
  total = manifest.rows(split)
  if total == 0:
    return []
  source, layout, out = prepared_lib.RowReader(manifest, split), manifest.layout, []
  for b in range(min(num_batches, math.ceil(total / batch_size))):
    start = b * batch_size + process_index * local
    keys = range(min(start, total), min(start + local, total))
    rows = layout.decode(source.read(keys))
    out.append({k: np.pad(v, [(0, local - len(keys)), (0, 0)]) for k, v in rows.items()})
  return out


def training_pieces(manifest: prepared_lib.Manifest, split: str = "train",
                    rows_per_read: int = 4096) -> Iterator[list[np.ndarray]]:
  """The decoder-target pieces packed into the split's rows (one int32[n] per segment, in order):
  the examples as the task's preprocessors cut them, which `stats.count_ids` counts."""
  source, layout = prepared_lib.RowReader(manifest, split), manifest.layout
  for start in range(0, len(source), rows_per_read):
    rows = layout.decode(source.read(range(start, min(start + rows_per_read, len(source)))))
    targets, segments = rows["decoder_target_tokens"], rows["decoder_segment_ids"]
    keep = segments > 0
    # A piece is a run of one segment id within one row.
    owner = (np.arange(len(segments))[:, None] * (segments.shape[1] + 1) + segments)[keep]
    cuts = np.flatnonzero(np.diff(owner)) + 1
    yield np.split(targets[keep], cuts)


# --------------------------------------------------------------------------------------------------
# The run's input pipeline.


def _position_mismatch(position: Any, expected: Mapping[str, Any], directory: Any) -> str:
  """Why a checkpoint's data position cannot continue these batches ('' when it can)."""
  if not isinstance(position, Mapping) or position.get("format") != POSITION_FORMAT:
    return (f"the checkpoint's data position was written by the streaming pipeline (it replays "
            f"the task's batches), and this run reads the prepared data in {directory}, whose "
            "batch order differs. Continue streaming with --gin.DATA_SOURCE=\"'streaming'\", or "
            "start a new MODEL_DIR to train on the prepared data")
  differences = [f"{key}: {position.get(key)!r} in the checkpoint, {value!r} now"
                 for key, value in expected.items() if position.get(key) != value]
  if not differences:
    return ""
  return (f"the checkpoint's data position is for other batches than this run's ("
          f"{'; '.join(differences)}): resuming would not continue the same batch sequence. "
          f"Resume with the data prepared the way the checkpoint's was (a prepared folder with "
          f"manifest fingerprint {position.get('dataset')}), or start a new MODEL_DIR")


class PreparedPipeline:
  """The `InputPipeline` of a run on prepared data: grain batches (`batches`) resumed from the
  checkpoint's position in O(1), fixed evaluation batches, words and key counts from the rows."""

  def __init__(self, task: str, *, batch_size: int, seq_len: int, seed: int,
               manifest: prepared_lib.Manifest, worker_count: int = 0,
               read_threads: int = DEFAULT_READ_THREADS,
               prefetch: int = DEFAULT_PREFETCH_BATCHES):
    pipeline_lib.keep_tensorflow_off_accelerators()
    self.task, self.seq_len, self.seed, self.batch_size = task, seq_len, seed, batch_size
    self.manifest = manifest
    self._options = {"worker_count": worker_count, "read_threads": read_threads,
                     "prefetch": prefetch}
    self.vocabulary = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
    self.vocab_size = int(self.vocabulary.vocab_size)
    self.vocab_fingerprint = manifest.data["vocabulary"]["fingerprint"]
    self.shape = manifest.data["shape"]
    self._checked_splits = {"train"}

  def _share(self) -> dict[str, int]:
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}

  def check_position(self, position: Any) -> None:
    """Refuses a checkpoint's data position that these batches cannot continue (another dataset,
    seed or batch size, or the streaming pipeline's), naming the difference and the fix."""
    expected = {"dataset": self.manifest.fingerprint, "task": self.task, "split": "train",
                "seed": self.seed, "batch_size": self.batch_size}
    why = _position_mismatch(position, expected, self.manifest.directory)
    if why:
      raise PreparedMismatchError(why)

  def train_batches(self, position: Any) -> PreparedBatches:
    start = 0
    if position is not None:
      self.check_position(position)
      start = int(position["next_batch"])
    return batches(self.manifest, "train", batch_size=self.batch_size, seed=self.seed,
                   start_batch=start, **self._share(), **self._options)

  def eval_batches(self, split: str, num_batches: int) -> list[dict[str, np.ndarray]]:
    split = normalize_split(split)
    if split not in self._checked_splits:
      self.manifest = prepared_lib.stage_locally(self.manifest, [split])
      prepared_lib.check_shards(self.manifest, split)
      self._checked_splits.add(split)
    return eval_batches(self.manifest, split, batch_size=self.batch_size,
                        num_batches=num_batches, **self._share())

  def count_words(self, batch: Mapping[str, np.ndarray]) -> Optional[int]:
    return pipeline_lib.count_words(self.vocabulary, batch)

  def key_counts(self, key: str, key_space: int, *, decoder_inputs: bool = True) -> np.ndarray:
    # The pieces in the rows are the examples as the task cuts them to SEQ_LEN, so these are the
    # counts the streaming pipeline's `train_key_counts` gives (a test compares them), read from
    # the rows instead of re-tokenising the corpus.
    counts, _ = stats_lib.count_ids(training_pieces(self.manifest), key_space, key=key,
                                    decoder_inputs=decoder_inputs)
    if not counts.any():
      raise ValueError(f"task {self.task!r}: the prepared training split has no tokens to count")
    return counts


@gin.configurable(module="hashmoe.data.loader")
def make_input_pipeline(task: str, *, batch_size: int, seq_len: int, seed: int = 0,
                        prepared_dir: Any = None, data_source: str = "auto",
                        worker_count: int = 0) -> pipeline_lib.InputPipeline:
  """The run's data: prepared rows where the task's prepared folder exists, else streaming.

  Args:
    task, batch_size, seq_len, seed: the run's (BATCH_SIZE is global).
    prepared_dir: PREPARED_DIR, the root of prepared folders (None: `prepared.default_root()`);
      the task's folder is `prepared.prepared_dir(prepared_dir, task, seq_len)`.
    data_source: DATA_SOURCE: 'auto' (prepared when the folder has a manifest, else streaming),
      'prepared' (required: an error when there is none) or 'streaming' (never prepared).
    worker_count: grain worker processes for prepared data (0: threads of this process).

  Returns:
    A `PreparedPipeline` or a `pipeline.TaskPipeline`; which one, and why, is logged.

  Raises:
    PreparedMismatchError: the folder was prepared for another run (named), or DATA_SOURCE is
      not one of DATA_SOURCES.
    PreparedDataError: a shard is missing or damaged, or 'prepared' without prepared data.
  """
  if data_source not in DATA_SOURCES:
    raise PreparedMismatchError(f"DATA_SOURCE={data_source!r}; expected one of {DATA_SOURCES}")
  if data_source == "streaming":
    logger.info("data: streaming task %s (DATA_SOURCE='streaming')", task)
    return pipeline_lib.TaskPipeline(task, batch_size=batch_size, seq_len=seq_len, seed=seed)
  directory = prepared_lib.prepared_dir(prepared_dir, task, seq_len)
  seqio_task = seqio.get_mixture_or_task(task)
  vocabulary = seqio_task.output_features["targets"].vocabulary
  manifest = prepared_lib.open_prepared(
      directory, task=task, shape=tasks_lib.task_shape(seqio_task), seq_len=seq_len,
      vocab_fingerprint=vocab_lib.vocab_fingerprint_or_empty(vocabulary))
  if manifest is None:
    state = preparation_lib.status(directory)
    why = ("no prepared data there" if state["state"] == "none" else
           f"its prepare is unfinished ({state['done']} of {state['total']} shards)")
    if data_source == "prepared":
      raise PreparedDataError(f"DATA_SOURCE='prepared' but {directory} has no manifest ({why}): "
                              "run `hashmoe prepare` with this run's gin files first")
    logger.info("data: streaming task %s (%s: %s; `hashmoe prepare` with the same gin files "
                "prepares it once for fast, O(1)-resumable reading)", task, directory, why)
    return pipeline_lib.TaskPipeline(task, batch_size=batch_size, seq_len=seq_len, seed=seed)
  info = manifest.split("train")
  logger.info("data: prepared rows of task %s from %s (%d training rows, %d tokens, manifest "
              "%s)", task, directory, info["rows"], info["tokens"], manifest.fingerprint[:12])
  return PreparedPipeline(task, batch_size=batch_size, seq_len=seq_len, seed=seed,
                          manifest=manifest, worker_count=worker_count)
