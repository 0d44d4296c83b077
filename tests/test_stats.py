"""Token counting and hash-table files, against `collections.Counter` and naive per-token loops."""

import collections
import random

import numpy as np
import pytest
import seqio

from hashmoe import hash_functions
from hashmoe import hashing
from hashmoe.data import stats, tasks, text_files, vocab as vocab_lib

PREFIX = "st"


def _reference_keys(sequences, key, key_space):
  """Naive per-token loop: the key of every token, previous token BOUNDARY_ID at a start."""
  keys = []
  for sequence in sequences:
    previous = hashing.BOUNDARY_ID
    for token in sequence:
      token = int(token)
      if key == "token":
        keys.append(token)
      elif key == "prev_token":
        keys.append(previous)
      else:
        keys.append(int(hashing.bigram_hash(np.array(previous), np.array(token), key_space)))
      previous = token
  return keys


@pytest.mark.parametrize("key", ["token", "prev_token", "bigram"])
def test_count_ids_matches_a_counter(key):
  rng = np.random.default_rng(0)
  batches = [[rng.integers(0, 50, size=rng.integers(0, 9)) for _ in range(rng.integers(1, 6))]
             for _ in range(20)]
  sequences = [s for batch in batches for s in batch]
  reference = collections.Counter(_reference_keys(sequences, key, 50))
  for chunk_tokens in (1, 7, 10**6):  # Flushes inside, between and after batches.
    counts, examples = stats.count_ids(iter(batches), 50, key=key, chunk_tokens=chunk_tokens)
    assert examples == len(sequences)
    assert counts.dtype == np.int64
    assert {i: int(c) for i, c in enumerate(counts) if c} == dict(reference)
  with pytest.raises(ValueError, match="outside"):
    stats.count_ids([[np.array([3, 50])]], 50)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  root = tmp_path_factory.mktemp("stats")
  rng = random.Random(1)
  words = ["".join(rng.choice("aeioulmnrstk") for _ in range(rng.randint(2, 7)))
           for _ in range(150)]
  folder = root / "books"
  folder.mkdir()
  for i in range(4):
    paragraphs = [" ".join(rng.choices(words, k=rng.randint(4, 30))).capitalize() + "."
                  for _ in range(25)]
    (folder / f"b{i}.txt").write_text("\n\n".join(paragraphs) + "\n")
  texts = list(text_files.text_folder_paragraphs(folder, "train"))
  vocab = vocab_lib.train_sentencepiece(
      texts, corpus_id={"source": "stats"}, cache_dir=root / "cache",
      settings=vocab_lib.SentencePieceSettings(vocab_size=330, max_texts_read=None))
  names = tasks.register_tasks(name_prefix=PREFIX, embedded=False, text_dir=folder,
                               vocabulary=vocab, shuffle_buffer_size=16)
  return dict(root=root, folder=folder, vocab=vocab, texts=texts, names=names)


def _tokenized(task, features=("targets",)):
  """Per-example ids by the Python tokenizer: what the task's examples hold, EOS appended."""
  vocab, folder = task["vocab"], task["folder"]
  examples = []
  if features == ("targets",):
    examples = [vocab.encode(t) + [vocab.eos_id] for t in task["texts"]]
  else:
    for context, target in text_files.text_folder_sentence_pairs(folder, "train"):
      examples += [vocab.encode(context) + [vocab.eos_id], vocab.encode(target) + [vocab.eos_id]]
  return examples


def test_count_tokens_matches_a_counter_and_caches(task, monkeypatch):
  cache = task["root"] / "counts"
  counts = stats.count_tokens(f"{PREFIX}_text_lm", cache_dir=cache)
  examples = _tokenized(task)
  reference = collections.Counter(i for ids in examples for i in ids)
  assert counts.counts.shape == (task["vocab"].vocab_size,)
  assert {i: int(c) for i, c in enumerate(counts.counts) if c} == dict(reference)
  assert counts.num_examples == len(examples) and counts.num_tokens == sum(reference.values())
  assert counts.vocab_fingerprint == vocab_lib.vocab_fingerprint(task["vocab"])
  assert len(list(cache.glob("token_counts/*.npy"))) == 1

  def no_reading(*args, **kwargs):
    raise AssertionError("the cached counts should have been used")

  with monkeypatch.context() as patch:
    patch.setattr(seqio.Task, "get_dataset", no_reading)
    cached = stats.count_tokens(f"{PREFIX}_text_lm", cache_dir=cache)
  assert np.array_equal(cached.counts, counts.counts)
  assert (cached.num_examples, cached.vocab_fingerprint) == (counts.num_examples,
                                                            counts.vocab_fingerprint)

  first = stats.count_tokens(f"{PREFIX}_text_lm", max_examples=5, use_cache=False)
  assert {i: int(c) for i, c in enumerate(first.counts) if c} == dict(
      collections.Counter(i for ids in examples[:5] for i in ids))


def test_count_tokens_of_both_seq2seq_features_and_bigrams(task):
  name = f"{PREFIX}_text_seq2seq"
  both = stats.count_tokens(name, features=("inputs", "targets"), use_cache=False)
  examples = _tokenized(task, ("inputs", "targets"))
  assert {i: int(c) for i, c in enumerate(both.counts) if c} == dict(
      collections.Counter(i for ids in examples for i in ids))
  bigrams = stats.count_tokens(f"{PREFIX}_text_lm", key="bigram", key_space=97, use_cache=False)
  reference = collections.Counter(_reference_keys(_tokenized(task), "bigram", 97))
  assert bigrams.counts.shape == (97,)
  assert {i: int(c) for i, c in enumerate(bigrams.counts) if c} == dict(reference)
  with pytest.raises(ValueError, match="key_space"):
    stats.count_tokens(name, key="token", key_space=97)
  with pytest.raises(ValueError, match="no feature"):
    stats.count_tokens(f"{PREFIX}_text_lm", features="inputs")


def test_token_counts_save_and_load(tmp_path):
  counts = stats.TokenCounts(counts=np.array([3, 0, 5]), vocab_size=3, vocab_fingerprint="a" * 64,
                             task="t", split="validation", features=("inputs", "targets"),
                             num_examples=2)
  npy, meta = counts.save(tmp_path / "c")
  assert npy.name == "c.npy" and meta.name == "c.json"
  loaded = stats.TokenCounts.load(tmp_path / "c.npy")
  assert np.array_equal(loaded.counts, [3, 0, 5]) and loaded.num_tokens == 8
  assert (loaded.vocab_fingerprint, loaded.split, loaded.features, loaded.num_examples) == (
      "a" * 64, "validation", ("inputs", "targets"), 2)
  with pytest.raises(ValueError, match="no readable token counts"):
    stats.TokenCounts.load(tmp_path / "missing")
  with pytest.raises(ValueError, match="non-negative"):
    stats.TokenCounts(counts=np.array([-1]), vocab_size=1)


def test_build_hash_table_from_a_task_writes_a_verified_table(task, tmp_path):
  vocab = task["vocab"]
  fingerprint = vocab_lib.vocab_fingerprint(vocab)
  out = tmp_path / "tables" / "balanced.npz"
  table, = stats.build_hash_table("balanced", f"{PREFIX}_text_lm", num_experts=4, out_path=out,
                                  cache_dir=tmp_path)
  loaded = hashing.HashTable.load(out, vocab_size=vocab.vocab_size, vocab_fingerprint=fingerprint)
  assert loaded == table and loaded.vocab_fingerprint == fingerprint
  reference = collections.Counter(i for ids in _tokenized(task) for i in ids)
  counts = np.array([reference[i] for i in range(vocab.vocab_size)])
  assert loaded == hash_functions.build_table("balanced", num_experts=4, vocab_size=vocab.vocab_size,
                                       token_counts=counts, vocab_fingerprint=fingerprint)
  # Balanced beats random on this corpus's Zipfian counts (paper Figure 4).
  random_table, = stats.build_hash_table("random", counts, num_experts=4,
                                         out_path=tmp_path / "random.npz",
                                         vocab_fingerprint=fingerprint)
  assert loaded.load_stats(counts)["max_over_mean"] < random_table.load_stats(counts)[
      "max_over_mean"]
  with pytest.raises(ValueError, match="fingerprint"):
    hashing.HashTable.load(out, vocab_size=vocab.vocab_size, vocab_fingerprint="0" * 64)
  with pytest.raises(ValueError, match="vocab_fingerprint"):
    stats.build_hash_table("balanced", stats.count_tokens(f"{PREFIX}_text_lm",
                                                          cache_dir=tmp_path),
                           num_experts=4, out_path=out, vocab_fingerprint="0" * 64)


def test_build_hash_table_kinds_and_multihash_files(tmp_path):
  counts = np.random.default_rng(0).zipf(1.5, size=60) % 1000
  fingerprint = "b" * 64
  out = tmp_path / "multi.npz"
  tables = stats.build_hash_table("random", counts, num_experts=8, num_hashes=3, seed=5,
                                  out_path=out, vocab_fingerprint=fingerprint)
  paths = stats.hash_table_paths(out, 3)
  assert [p.name for p in paths] == ["multi.hash0of3.npz", "multi.hash1of3.npz",
                                     "multi.hash2of3.npz"]
  assert all(p.is_file() for p in paths) and not out.exists()
  loaded = tuple(hashing.HashTable.load(p, vocab_size=60, vocab_fingerprint=fingerprint)
                 for p in paths)
  assert loaded == tables and [t.seed for t in loaded] == [5, 6, 7]
  assert len({t.table.tobytes() for t in loaded}) == 3

  topk, = stats.build_hash_table("balanced_topk", counts, num_experts=8, k=2,
                                 out_path=tmp_path / "topk.npz")
  assert topk.table.shape == (60, 2) and topk.kind == hashing.TOPK_KIND
  # The other top-k initialisations go through the same path, written and read back as such.
  for kind in hashing.TOPK_KINDS[1:]:
    built, = stats.build_hash_table(kind, counts, num_experts=8, k=2, seed=3,
                                    out_path=tmp_path / f"{kind}.npz")
    assert hashing.HashTable.load(tmp_path / f"{kind}.npz") == built == hash_functions.build_topk(
        kind, 2, num_experts=8, vocab_size=60, seed=3)

  embeddings = np.random.default_rng(1).normal(size=(60, 5)).astype(np.float32)
  np.save(tmp_path / "emb.npy", embeddings)
  clustered, = stats.build_hash_table("clustered", counts, num_experts=4,
                                      embeddings=tmp_path / "emb.npy",
                                      out_path=tmp_path / "clustered.npz")
  assert clustered == hash_functions.build_table("clustered", num_experts=4, vocab_size=60,
                                          embeddings=embeddings)
  with pytest.raises(ValueError, match="needs embeddings"):
    stats.build_hash_table("dispersed", counts, num_experts=4, out_path=tmp_path / "d.npz")
  with pytest.raises(ValueError, match="needs k"):
    stats.build_hash_table("balanced_topk", counts, num_experts=4, out_path=tmp_path / "k.npz")
  with pytest.raises(ValueError, match="kind="):
    stats.build_hash_table("nearest", counts, num_experts=4, out_path=tmp_path / "n.npz")


@pytest.mark.parametrize("name,converter", [
    ("text_lm", lambda: seqio.DecoderFeatureConverter(pack=True)),
    ("text_seq2seq", lambda: seqio.EncDecFeatureConverter(pack=False))])
def test_decoder_input_counts_equal_what_the_feature_converter_feeds_the_decoder(task, name,
                                                                                converter):
  # The reference is seqio's own pipeline: the decoder_input_tokens of every real (segment > 0 or
  # unpacked non-padding) position of the converted rows, counted with a Counter.
  length = 24
  counts = stats.count_tokens(f"{PREFIX}_{name}", sequence_length=length, decoder_inputs=True,
                              use_cache=False)
  lengths = {"targets": length} if name == "text_lm" else {"inputs": length, "targets": length}
  dataset = seqio.get_dataset(f"{PREFIX}_{name}", task_feature_lengths=lengths,
                              dataset_split="train", shuffle=False, num_epochs=1,
                              feature_converter=converter())
  reference = collections.Counter()
  for row in dataset.as_numpy_iterator():
    inputs = row["decoder_input_tokens"]
    if "decoder_segment_ids" in row:
      real = row["decoder_segment_ids"] > 0
    else:
      real = np.arange(inputs.size) < np.count_nonzero(row["decoder_target_tokens"])
    reference.update(int(i) for i in inputs[real])
  assert {i: int(c) for i, c in enumerate(counts.counts) if c} == dict(reference)
  # The start id is routed once per row segment: counting targets would never see it.
  assert counts.counts[stats.DECODER_START_ID] > 0
  assert stats.count_tokens(f"{PREFIX}_{name}", use_cache=False).counts[
      stats.DECODER_START_ID] == 0
  assert (counts.sequence_length, counts.decoder_inputs) == (length, True)
