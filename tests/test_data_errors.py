"""How the data pipeline fails, and what it tells the user.

Readers run inside tf.data (`from_generator`), whose own error type and traceback would otherwise
replace the reader's message; these tests fail a reader on purpose and check what reaches the
caller, in-process and through a real interpreter exit. Then the data mistakes a user makes:
token ids a vocabulary cannot hold, a vocabulary size SentencePiece refuses, a folder of latin-1
text, and splits that overlap or are tiny. Messages are checked word for word where they tell the
user what to do, and the instruction is then followed to show that it works.
"""
import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import ClassVar

import pytest
import seqio
import tensorflow as tf

from hashmoe import cli, compare
from hashmoe.compare import comparison
from hashmoe.data import corpora, reddit, stats, tasks, text_files, vocab as vocab_lib
from textdata import write_text_folder

REPO = Path(__file__).resolve().parent.parent
WORDS = "a b c d e f".split()


@dataclasses.dataclass(frozen=True)
class FailingCorpus(corpora.Corpus):
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
import sys
sys.path.insert(0, {tests!r})
from test_data_errors import FailingCorpus, WORDS
from hashmoe.data import tasks, vocab as vocab_lib

def report(kind, value, tb):  # Marks the uncaught error among TensorFlow's asynchronous logs.
  print(f"UNCAUGHT {{kind.__name__}}: {{value}}", file=sys.stderr, flush=True)
  sys.__excepthook__(kind, value, tb)

sys.excepthook = report
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
  assert "UNCAUGHT RuntimeError: reader failed after 300 texts\n" in done.stderr, (
      done.stderr[-3000:])
  # The teardown symptoms only: under load TensorFlow may also log "Error occurred when finalizing
  # GeneratorDataset iterator: KeyError" while Python is fully alive (its finaliser races the
  # iterator's deletion, seen once in a full-suite run), which is harmless.
  for symptom in ("Python interpreter state is not initialized",
                  "terminate called without an active exception"):
    assert symptom not in done.stderr, done.stderr[-3000:]


@dataclasses.dataclass(frozen=True)
class FixedCorpus(corpora.Corpus):
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
    corpora.train_vocabulary(corpus, settings=vocab_lib.SentencePieceSettings(vocab_size=vocab_size),
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
  corpus = corpora.WikitextCorpus(str(folder))
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


LATIN1_LINE = "La fa\u00e7ade du caf\u00e9, d\u00e9j\u00e0 vue."


def write_latin1_folder(root):
  """A text folder whose files are latin-1, each ending with an accented line."""
  write_text_folder(root, files=5, paragraphs=20)
  for path in sorted(root.glob("*.txt")):
    path.write_bytes((path.read_text() + "\n" + LATIN1_LINE + "\n").encode("latin-1"))
  return root


def _decoded_validation_text(task):
  vocabulary = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
  batches = tasks.get_batches(task, "validation", batch_size=8, seq_len=64, pack=False,
                              shuffle=False, repeat=False, drop_remainder=False)
  return "\n".join(vocabulary.decode([int(t) for t in row if t > 1])
                   for batch in batches for row in batch["decoder_target_tokens"])


def test_a_latin1_text_dir_error_names_the_gin_settings_that_read_it(tmp_path, monkeypatch,
                                                                      capsys):
  # Before: "Pass errors='replace' ... or encoding='latin-1'", arguments no config could set.
  monkeypatch.setenv("HASHMOE_CACHE", str(tmp_path / "cache"))
  texts = write_latin1_folder(tmp_path / "texts")
  model_dir = tmp_path / "run"
  flags = ["--gin_file=configs/runs/cpu_tiny.gin", "--gin_file=configs/tasks/text_dir.gin",
           f"--gin.TEXT_DIR='{texts}'", "--gin.VOCAB_SIZE=320", f"--gin.MODEL_DIR='{model_dir}'",
           # A task name of its own: other test files register 'hashmoe_text_lm' on their folders.
           "--gin.register_tasks.name_prefix='latin'", "--gin.task_name.name='latin_text_lm'",
           "--compilation_cache_dir=none"]
  assert cli.main(["train", *flags]) == 1
  err = capsys.readouterr().err
  assert "bytes that are not valid utf-8" in err
  assert ("TEXT_ENCODING = 'latin-1'" in err and "--gin.TEXT_ENCODING=\"'latin-1'\"" in err
          and "TEXT_ERRORS = 'replace'" in err and "Pass errors=" not in err)
  assert corpora.TEXT_ENCODING_ADVICE in err
  assert not model_dir.exists()  # Refused before anything was written.
  # Following the advice: the balanced table counts every training token through the task's
  # tf.data pipeline; the accented line reads back as written.
  table = tmp_path / "table.npz"
  assert cli.main(["build-hash", *flags, "--gin.TEXT_ENCODING='latin-1'", "--kind=balanced",
                   f"--output={table}"]) == 0
  assert table.is_file()
  assert LATIN1_LINE in _decoded_validation_text("latin_text_lm")


class _StopAtFirstRun:
  def __call__(self, request):
    raise compare.Stopped("SIGTERM")


def _compare_args(argv):
  parser = argparse.ArgumentParser()
  compare.add_arguments(parser)
  return parser.parse_args(argv)


def test_compare_reads_a_latin1_text_dir_with_its_flags(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("HASHMOE_CACHE", str(tmp_path / "cache"))
  texts = write_latin1_folder(tmp_path / "texts")
  out = tmp_path / "out"
  argv = ["--text-dir", str(texts), "--vocab-size", "320", "--models", "dense", "--seeds", "1",
          "--out", str(out), "--no-progress"]
  assert compare.run(_compare_args(argv), runner=_StopAtFirstRun()) == 1
  err = capsys.readouterr().err
  assert "bytes that are not valid utf-8" in err
  assert "--text-encoding latin-1" in err and "--text-errors replace" in err
  assert corpora.TEXT_ENCODING_ADVICE in err
  assert not out.exists()
  # With the flag the corpus is registered and read as latin-1 (the runner stops the comparison
  # at its first run; results.json names the corpus and its task).
  code = compare.run(_compare_args(argv + ["--text-encoding", "latin-1"]),
                     runner=_StopAtFirstRun(), log=lambda line: None)
  assert code == compare.EXIT_TERMINATED
  results = json.loads((out / comparison.RESULTS_FILE).read_text())
  assert results["corpus"] == f"text folder {texts.resolve()} (latin-1, errors=strict)"
  assert LATIN1_LINE in _decoded_validation_text(results["task"])
  # The flags without --text-dir, or a codec Python lacks, are usage errors.
  assert compare.run(_compare_args(["--text-encoding", "latin-1", "--out", str(out)])) == 2
  assert "--text-encoding and --text-errors apply to the files of --text-dir" in (
      capsys.readouterr().err)
  assert compare.run(_compare_args(["--text-dir", str(texts), "--text-encoding", "latin-9x",
                                    "--out", str(out)])) == 2
  assert "encoding='latin-9x' is not a text encoding" in capsys.readouterr().err


def _split_warnings(**register):
  """The SplitWarning messages `register_tasks(**register)` gives, and what it logged."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tasks.register_tasks(embedded=False, **register)
  return [str(w.message) for w in caught if issubclass(w.category, corpora.SplitWarning)]


def test_overlapping_or_tiny_splits_are_warned_about(tmp_path, caplog):
  # Before: three copies of one 10-word file trained to a validation perplexity of 1.03 in silence.
  line = "one two three four five six seven eight nine ten\n"
  vocabulary = vocab_lib.WordVocabulary(line.split())
  same = tmp_path / "same"
  same.mkdir()
  for i in range(3):
    (same / f"copy{i}.txt").write_text(line)
  split = text_files.split_text_files(same)
  (train,), (valid,), (test,) = split["train"], split["validation"], split["test"]
  with caplog.at_level("WARNING", logger="hashmoe.data.tasks"):
    messages = _split_warnings(name_prefix="splittest_same", text_dir=same, vocabulary=vocabulary)
  assert messages == [
      f"text corpus: 2 held-out file(s) are identical to training files (validation {valid} = "
      f"train {train}; test {test} = train {train}). The model is evaluated on text it trained "
      "on, so validation and test perplexities will be far better than the model is. Remove the "
      "copies from the folder.",
      f"text corpus: the training split is {len(line)} bytes (1 file(s)), under 500,000 bytes "
      "(~100k words). A run reads it many times over and the model memorises it, so perplexities "
      "measure memorisation, not language modelling. Fine for a smoke test; use more text for "
      "numbers that mean something."]
  assert [r.getMessage() for r in caplog.records if r.name == "hashmoe.data.corpora"] == messages
  # Once per corpus and process: registering it again (hashmoe eval after train) is quiet.
  assert _split_warnings(name_prefix="splittest_same", text_dir=same, vocabulary=vocabulary) == []

  # Distinct files of the same size are compared by content, not flagged for their size.
  distinct = tmp_path / "distinct"
  distinct.mkdir()
  for i, word in enumerate(("alpha", "bravo", "gamma")):
    (distinct / f"doc{i}.txt").write_text(f"{word} " * 200_000)  # 1.2 MB each.
  assert _split_warnings(name_prefix="splittest_big", text_dir=distinct,
                         vocabulary=vocabulary) == []
  # One Wikitext file given for every split is the same overlap.
  fixture = REPO / "tests" / "fixtures" / "wikitext-2" / "wiki.test.tokens"
  problems = corpora.check_splits(corpora.WikitextCorpus(str(fixture)))
  assert problems[0].startswith("wikitext corpus: 2 held-out file(s) are identical to training "
                                f"files (validation {fixture} = train {fixture}; test {fixture} = "
                                f"train {fixture}).")
  assert problems[1].startswith(f"wikitext corpus: the training split is "
                                f"{fixture.stat().st_size} bytes (1 file(s)), under 500,000")
