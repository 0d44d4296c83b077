"""The input pipeline of a run: batches of a registered seqio task for this host, resumable.

`InputPipeline` is what the training loop needs from the data (tests pass their own);
`TaskPipeline` is the real one, over `hashmoe.data.tasks`. Each host reads its own shard of the
examples in batches of batch_size / process_count rows; the position saved in every checkpoint is
the iterator's state, which `tasks.restore_batches` replays exactly, so a restarted run reads the
same batches as the uninterrupted one.
"""
from __future__ import annotations

import inspect
import itertools
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf

from hashmoe.data import prepared as prepared_lib
from hashmoe.data import stats as stats_lib
from hashmoe.data import tasks as tasks_lib
from hashmoe.data import vocab as vocab_lib
from hashmoe.training.errors import CheckpointError, PreparedMismatchError

# The gin name `hashmoe.train.task_name` is public API (every task file binds it); it keeps the
# module it had before the input pipeline left the trainer.


class InputPipeline(Protocol):
  """What the loop needs from the data (`TaskPipeline` is the real one)."""
  vocab_size: int
  vocab_fingerprint: str

  def train_batches(self, position: Any) -> Iterator[dict[str, np.ndarray]]:
    """This host's training batches from `position` (None: the start); the iterator has a
    `position()` method returning a JSON-serialisable position to resume from.

    A pipeline that can apply a function to each batch where it reads them (in its own threads)
    also takes `batch_map`; for the others `train_batches` (below) applies it as the loop takes
    each batch."""

  def eval_batches(self, split: str, num_batches: int) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` of `split` for this host (fixed: no shuffling)."""

  def count_words(self, batch: Mapping[str, np.ndarray]) -> Optional[int]:
    """Whitespace words of the batch's decoded targets, or None where the task has no words."""

  def key_counts(self, key: str, key_space: int, *, decoder_inputs: bool = True) -> np.ndarray:
    """int[key_space] occurrences of each key id ('token', 'prev_token' or 'bigram', as
    `hashmoe.data.stats` counts them) over the training split's rows: of the decoder inputs
    (`decoder_inputs`, what a decoder router hashes) or of the targets."""


BatchMap = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class MappedBatches:
  """Training batches with `fn` applied to each as it is taken; `position()` and `close()` are the
  wrapped iterator's (a map changes no batch's place in the sequence)."""

  def __init__(self, batches: Iterator[dict[str, np.ndarray]], fn: BatchMap):
    self._batches, self._fn = batches, fn

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return self._fn(next(self._batches))

  def position(self) -> Any:
    return self._batches.position()

  def close(self) -> None:
    close = getattr(self._batches, "close", None)
    if close is not None:
      close()


def train_batches(data: InputPipeline, position: Any,
                  batch_map: Optional[BatchMap] = None) -> Iterator[dict[str, np.ndarray]]:
  """`data.train_batches(position)` with `batch_map` (e.g. `hashmoe.host_routing.HostRouting`)
  applied to every batch: by the pipeline where it reads (a `train_batches` that takes
  `batch_map`: the prepared-data loader maps in its read threads, ahead of the step), else as the
  loop takes each batch (`MappedBatches`)."""
  if batch_map is None:
    return data.train_batches(position)
  if "batch_map" in inspect.signature(data.train_batches).parameters:
    return data.train_batches(position, batch_map=batch_map)
  return MappedBatches(data.train_batches(position), batch_map)


@gin.configurable(module="hashmoe.train")
def task_name(name: str = gin.REQUIRED, registered: Sequence[str] = ()) -> str:
  """The task a run trains on, checked against what the task file registered.

  Task gin files bind `registered = @hashmoe.data.tasks.register_tasks()` so that evaluating the
  TASK macro registers the corpus's tasks (training its vocabulary on first use) and picks one.
  """
  if registered and name not in registered:
    raise ValueError(f"task {name!r} is not among the tasks registered by the task config: "
                     f"{list(registered)}")
  return name


def keep_tensorflow_off_accelerators() -> None:
  """The input pipeline (tf.data under seqio) runs on the host; left alone, TensorFlow would claim
  the GPU's memory that JAX needs (t5x does the same)."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow already initialised its devices; nothing left to change.
    pass


class _Batches:
  """A `tasks.BatchIterator` with the `position()` the loop checkpoints."""

  def __init__(self, iterator):
    self._iterator = iterator

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def position(self) -> dict[str, Any]:
    return self._iterator.state()

  def close(self) -> None:
    self._iterator.close()


class TaskPipeline:
  """Batches of a registered seqio task (`hashmoe.data.tasks.get_batches`) for this host.

  Each host reads its own shard of the examples (shard_index = jax.process_index()) in batches of
  batch_size / process_count rows; the position saved in checkpoints is the iterator's state,
  which `tasks.restore_batches` replays exactly.
  """

  def __init__(self, task: str, *, batch_size: int, seq_len: int, seed: int = 0):
    keep_tensorflow_off_accelerators()
    self._tasks = tasks_lib
    self.task = task
    self.seq_len = seq_len
    self.seed = seed
    self.local_batch_size = batch_size // jax.process_count()
    self._seqio_task = seqio.get_mixture_or_task(task)
    self.vocabulary = self._seqio_task.output_features["targets"].vocabulary
    self.vocab_size = int(self.vocabulary.vocab_size)
    self.vocab_fingerprint = vocab_lib.vocab_fingerprint_or_empty(self.vocabulary)
    self.shape = tasks_lib.task_shape(self._seqio_task)

  def _shard(self) -> dict[str, int]:
    return {"shard_index": jax.process_index(), "num_shards": jax.process_count()}

  def check_position(self, position: Any) -> None:
    """Refuses a checkpoint's data position written by the prepared-data loader: this pipeline's
    batches are another sequence (a run that switched from prepared to streamed data)."""
    if isinstance(position, Mapping) and position.get("format") == prepared_lib.POSITION_FORMAT:
      raise PreparedMismatchError(
          f"the checkpoint's data position was written by the prepared-data loader (manifest "
          f"{str(position.get('dataset'))[:12]}), and this run streams task {self.task}, whose "
          "batch order differs. Resume from the prepared rows (the PREPARED_DIR that `hashmoe "
          "prepare` wrote them to, DATA_SOURCE 'auto' or 'prepared'), or start a new MODEL_DIR "
          "to stream")

  def train_batches(self, position: Any) -> _Batches:
    if position is not None:
      self.check_position(position)
    if position is None:
      iterator = self._tasks.get_batches(self.task, "train", batch_size=self.local_batch_size,
                                         seq_len=self.seq_len, seed=self.seed, **self._shard())
    else:
      iterator = self._tasks.restore_batches(position)
      expected = {"task_name": self.task, "batch_size": self.local_batch_size,
                  "seq_len": self.seq_len, **self._shard()}
      saved = {k: position["arguments"].get(k) for k in expected}
      if saved != expected:
        raise CheckpointError(f"the checkpoint's data position was saved for {saved}, this run "
                              f"reads {expected}; resume with the original settings")
    return _Batches(iterator)

  def eval_batches(self, split: str, num_batches: int) -> list[dict[str, np.ndarray]]:
    iterator = self._tasks.get_batches(self.task, split, batch_size=self.local_batch_size,
                                       seq_len=self.seq_len, shuffle=False, repeat=False,
                                       drop_remainder=False, seed=self.seed, **self._shard())
    with iterator:
      return list(itertools.islice(iterator, num_batches))

  def count_words(self, batch: Mapping[str, np.ndarray]) -> Optional[int]:
    return count_words(self.vocabulary, batch)

  def key_counts(self, key: str, key_space: int, *, decoder_inputs: bool = True) -> np.ndarray:
    # Every host reads the whole split here (counting is cheap next to training), so all hosts
    # build the same table.
    return train_key_counts(self.task, key, key_space, sequence_length=self.seq_len,
                            decoder_inputs=decoder_inputs)


def count_words(vocabulary: seqio.Vocabulary, batch: Mapping[str, np.ndarray]) -> int:
  """Whitespace words of a batch's decoded targets, segment by segment (`InputPipeline.
  count_words`), padding, EOS and loss-free positions left out."""
  targets = np.asarray(batch["decoder_target_tokens"])
  weights = np.asarray(batch.get("decoder_loss_weights", targets > 0)) > 0
  segments = batch.get("decoder_segment_ids")
  special = {0, vocabulary.eos_id}
  words = 0
  for row in range(targets.shape[0]):
    ids, keep = targets[row], weights[row]
    seg = np.asarray(segments[row]) if segments is not None else np.where(keep, 1, 0)
    for s in np.unique(seg[keep]):
      piece = [int(t) for t in ids[(seg == s) & keep] if int(t) not in special]
      if piece:
        words += len(vocabulary.decode(piece).split())
  return words


def train_key_counts(task: str, key: str, key_space: int, *, sequence_length: Optional[int],
                     decoder_inputs: bool = True) -> np.ndarray:
  """int[key_space] occurrences of each key id over `task`'s training split (`InputPipeline.
  key_counts`), in rows of `sequence_length` as training cuts them (None: whole examples).

  Counted on the decoder side, where the paper's sparse layer sits; cached by hashmoe.data.stats
  under the task's data identity.
  """
  counts = stats_lib.count_tokens(task, split="train", key=key, key_space=key_space,
                                  sequence_length=sequence_length, decoder_inputs=decoder_inputs)
  if counts.num_tokens == 0:
    raise ValueError(f"task {task!r}: the training split has no tokens to count")
  return counts.counts
