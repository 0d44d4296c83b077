"""How the data pipeline fails: a reader's error as the caller sees it, and the process exit after it.

Readers run inside tf.data (`from_generator`), whose own error type and traceback would otherwise
replace the reader's message; these tests fail a reader on purpose and check what reaches the
caller, in-process and through a real interpreter exit.
"""
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest
import seqio
import tensorflow as tf

from hashmoe.data import reddit, stats, tasks, vocab as vocab_lib

REPO = Path(__file__).resolve().parent.parent
WORDS = "a b c d e f".split()


@dataclasses.dataclass(frozen=True)
class FailingCorpus(tasks.Corpus):
  """`good` texts, then the error a reader raises on a truncated dump (or any other)."""
  good: int = 300
  corrupt: bool = True
  name: ClassVar[str] = "failing"

  def identity(self, split):
    return {"source": self.name, "good": self.good, "corrupt": self.corrupt}

  def texts(self, split):
    for _ in range(self.good):
      yield " ".join(WORDS)
    if self.corrupt:
      raise reddit.CorruptDumpError("RC_2019-01.zst: the zstd stream ends inside a frame after "
                                    "4096 compressed bytes: the file is truncated.")
    raise RuntimeError(f"reader failed after {self.good} texts")

  def pairs(self, split, vocabulary=None):
    raise NotImplementedError


def test_a_readers_error_reaches_the_caller_as_itself(tmp_path):
  # Before: a tf.errors.UnknownError / InvalidArgumentError carrying pages of traceback text, which
  # the CLI (catching ValueError) let through as a raw traceback.
  vocabulary = vocab_lib.WordVocabulary(WORDS)
  tasks.register_task("errtest_corrupt_lm", FailingCorpus(), "lm", vocabulary)
  tasks.register_task("errtest_runtime_lm", FailingCorpus(corrupt=False), "lm", vocabulary)
  batches = tasks.get_batches("errtest_corrupt_lm", batch_size=4, seq_len=16, repeat=False)
  with pytest.raises(reddit.CorruptDumpError, match=r"^RC_2019-01\.zst: the zstd stream ends"):
    list(batches)
  assert next(batches, None) is None  # The pipeline is gone, not wedged.
  with pytest.raises(RuntimeError, match=r"^reader failed after 300 texts$"):
    list(tasks.get_batches("errtest_runtime_lm", batch_size=4, seq_len=16, repeat=False))
  # Token counting (balanced hash tables) reads the task through its own tf.data loop.
  with pytest.raises(reddit.CorruptDumpError, match="truncated"):
    stats.count_tokens("errtest_corrupt_lm", use_cache=False, cache_dir=tmp_path)


_FAILING_RUN = """
import dataclasses, sys
sys.path.insert(0, {tests!r})
from test_data_errors import FailingCorpus, WORDS
from hashmoe.data import tasks, vocab as vocab_lib
tasks.register_task("failing_lm", FailingCorpus(corrupt=False), "lm",
                    vocab_lib.WordVocabulary(WORDS))
for batch in tasks.get_batches("failing_lm", batch_size=4, seq_len=16):
  pass
"""


def test_a_failed_pipeline_leaves_nothing_to_tear_down_at_exit():
  # The error propagates out of the script uncaught, as it did out of `hashmoe train`. Before, its
  # traceback kept tf.data's iterator alive into interpreter teardown, where TensorFlow finalised
  # the reader's generator without a Python interpreter ("Error occurred when finalizing
  # GeneratorDataset iterator: ... Python interpreter state is not initialized"): the Reddit run of
  # issue 10 then hung or aborted (rc 134).
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", textwrap.dedent(_FAILING_RUN).format(
      tests=str(REPO / "tests"))], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert done.returncode == 1, done.stderr[-3000:]
  assert done.stderr.rstrip().splitlines()[-1] == "RuntimeError: reader failed after 300 texts"
  assert "GeneratorDataset" not in done.stderr, done.stderr[-3000:]


@dataclasses.dataclass(frozen=True)
class FixedCorpus(tasks.Corpus):
  """An LM corpus of the given lines, in every split."""
  lines: tuple[str, ...]
  name: ClassVar[str] = "fixed"

  def identity(self, split):
    return {"source": self.name, "lines": list(self.lines)}

  def texts(self, split):
    return iter(self.lines)

  def pairs(self, split, vocabulary=None):
    raise NotImplementedError


class ShortVocabulary(vocab_lib.WordVocabulary):
  """Says it has one id fewer than its `encode` uses: its last word's id is out of range."""

  @property
  def _base_vocab_size(self):
    return super()._base_vocab_size - 1


def test_an_out_of_range_token_id_stops_the_pipeline_that_did_not_check():
  vocabulary = ShortVocabulary(WORDS)
  assert vocabulary.vocab_size == 8 and vocabulary.encode("a b f") == [3, 4, 8]
  tasks.register_task("errtest_ids_lm", FixedCorpus(("a b c d", "a b f c")), "lm", vocabulary)
  message = ("task 'errtest_ids_lm', feature 'targets': token id 8 at position 2 of an example is "
             "outside the vocabulary's ids [0, 8)")
  # What t5x does with a task: seqio.get_dataset, then its own jitted step, where nothing checks
  # the ids (hashmoe's trainer checks each batch on the host, `models.validate_batch`). Before,
  # id 8 went through to the model.
  dataset = seqio.get_dataset(
      "errtest_ids_lm", task_feature_lengths={"targets": 8}, dataset_split="train",
      feature_converter=seqio.DecoderFeatureConverter(pack=False), shuffle=False)
  with pytest.raises(tf.errors.OpError, match=re.escape(message)):
    list(dataset.as_numpy_iterator())
  # hashmoe's own reader of the task raises it as the ValueError it is.
  with pytest.raises(ValueError, match="^" + re.escape(message)):
    list(tasks.get_batches("errtest_ids_lm", batch_size=2, seq_len=8, shuffle=False,
                           repeat=False))
  # Valid ids pass unchanged.
  tasks.register_task("errtest_ids_ok_lm", FixedCorpus(("a b c d", "a b e c")), "lm",
                      vocab_lib.WordVocabulary(WORDS))
  (batch,) = tasks.get_batches("errtest_ids_ok_lm", batch_size=2, seq_len=8, pack=False,
                               shuffle=False, repeat=False)
  assert batch["decoder_target_tokens"].tolist() == [[3, 4, 5, 6, 1, 0, 0, 0],
                                                     [3, 4, 7, 5, 1, 0, 0, 0]]


def _bpe_failure(corpus, vocab_size, cache):
  """The message of training a `vocab_size` BPE on `corpus`, or None if it trains."""
  try:
    tasks.train_vocabulary(corpus, settings=vocab_lib.SentencePieceSettings(vocab_size=vocab_size),
                           cache_dir=cache)
  except ValueError as e:
    return str(e)
  return None


def test_a_refused_vocabulary_size_gets_one_instruction_with_the_bound_that_works(tmp_path):
  # Before: SentencePiece's "Increase vocab_size ..." followed by our "Lower vocab_size ...".
  folder = tmp_path / "wikitext"
  folder.mkdir()
  shutil.copy(REPO / "tests" / "fixtures" / "wikitext-2" / "wiki.test.tokens",
              folder / "wiki.train.tokens")
  corpus = tasks.WikitextCorpus(str(folder))
  setting = "vocab_size (VOCAB_SIZE in the task's gin file; hashmoe compare: --vocab-size)"

  small = _bpe_failure(corpus, 262, tmp_path)
  need = int(re.search(re.escape(f"Raise {setting} to at least ") + r"(\d+)", small).group(1))
  assert "Lower" not in small and "Increase" not in small, small
  # The bound is the real one: one piece fewer fails the same way, that many trains.
  assert f"to at least {need}," in _bpe_failure(corpus, need - 1, tmp_path)
  assert _bpe_failure(corpus, need, tmp_path) is None

  large = _bpe_failure(corpus, 5000, tmp_path)
  most = int(re.search(re.escape(f"Lower {setting} to ") + r"(\d+) or less", large).group(1))
  assert "Raise" not in large and "Increase" not in large, large
  assert _bpe_failure(corpus, most, tmp_path) is None
  assert f"to {most} or less" in _bpe_failure(corpus, most + 1, tmp_path)
