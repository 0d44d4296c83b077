"""Vocabularies: SentencePiece BPE training and caching, the word-level vocabulary, fingerprints.

References are independent of the code under test: a SentencePieceProcessor loaded straight from
the model file, `collections.Counter` + `sorted` for the word dictionary, the spec's piece list for
fingerprints, and explicit inclusion frequencies for the reservoir sample.
"""

import collections
import itertools
import os
import pickle
import random

import numpy as np
import pytest
import seqio
import sentencepiece
import tensorflow as tf

from hashmoe import hashing
from hashmoe.data import vocab as vocab_lib
from hashmoe.data.vocab import SentencePieceSettings, WordVocabulary

SMALL = SentencePieceSettings(vocab_size=400, input_sentence_size=5000, max_texts_read=None)


def synthetic_paragraphs(n, seed=0):
  """English-like paragraphs over a Zipfian vocabulary of ~300 made-up words."""
  rng = random.Random(seed)
  syllables = ["ka", "lo", "mi", "ter", "an", "sol", "ve", "ri", "nu", "pe", "ost", "ing", "ha"]
  words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
                  for _ in range(400)})
  weights = [1.0 / (rank + 1) for rank in range(len(words))]
  paragraphs = []
  for _ in range(n):
    sentences = []
    for _ in range(rng.randint(1, 4)):
      sentence = rng.choices(words, weights, k=rng.randint(3, 12))
      sentences.append(" ".join(sentence).capitalize() + rng.choice([".", "!", "?", ", yes."]))
    paragraphs.append(" ".join(sentences))
  return paragraphs


@pytest.fixture(scope="module")
def corpus():
  return synthetic_paragraphs(1500)


@pytest.fixture(scope="module")
def spm_vocab(corpus, tmp_path_factory):
  cache = tmp_path_factory.mktemp("cache")
  return vocab_lib.train_sentencepiece(corpus, corpus_id={"source": "synthetic"}, settings=SMALL,
                                       cache_dir=cache, name="synthetic")


def test_sentencepiece_ids_follow_seqio_conventions(spm_vocab):
  reference = sentencepiece.SentencePieceProcessor(model_file=spm_vocab.sentencepiece_model_file)
  assert (spm_vocab.pad_id, spm_vocab.eos_id, spm_vocab.unk_id, spm_vocab.bos_id) == (0, 1, 2, -1)
  assert spm_vocab.vocab_size == reference.get_piece_size() == 400
  assert [reference.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
  pieces = {reference.id_to_piece(i) for i in range(400)}
  assert {f"<0x{b:02X}>" for b in range(256)} <= pieces  # Byte fallback.
  assert "\n" in pieces
  model = sentencepiece.sentencepiece_model_pb2.ModelProto.FromString(
      open(spm_vocab.sentencepiece_model_file, "rb").read())
  assert model.trainer_spec.model_type == model.trainer_spec.BPE


def test_sentencepiece_round_trip_and_tf_agree(spm_vocab):
  held_out = synthetic_paragraphs(20, seed=7)
  texts = held_out + ["caf\u00e9 na\u00efve \U0001F600 \u4e2d\u6587 unseen",
                      "first turn\nsecond turn\nthird"]
  for text in texts:
    ids = spm_vocab.encode(text)
    assert spm_vocab.unk_id not in ids, text  # Byte fallback: nothing is unknown.
    assert spm_vocab.decode(ids) == text
  tf_ids = spm_vocab.encode_tf(tf.constant(texts))
  assert tf_ids.to_list() == [spm_vocab.encode(t) for t in texts]
  decoded = spm_vocab.decode_tf(tf.ragged.constant([spm_vocab.encode(t) for t in texts]))
  assert [d.decode("utf-8") for d in decoded.numpy()] == texts


def test_sentencepiece_cache_skips_training_and_keys_every_input(corpus, tmp_path):
  corpus_file = tmp_path / "corpus.txt"
  corpus_file.write_text("\n".join(corpus))
  calls = []

  def texts():
    calls.append(1)
    return corpus_file.read_text().split("\n")

  def train(settings=SMALL):
    corpus_id = {"source": "file", "files": vocab_lib.file_identity([corpus_file])}
    return vocab_lib.train_sentencepiece(texts, corpus_id=corpus_id, settings=settings,
                                         cache_dir=tmp_path / "cache", name="file")

  first = train()
  model = first.sentencepiece_model_file
  mtime = os.stat(model).st_mtime_ns
  assert len(calls) == 1
  second = train()
  assert len(calls) == 1  # Loaded from the cache: the corpus was not read again.
  assert second.sentencepiece_model_file == model and os.stat(model).st_mtime_ns == mtime
  assert second == first

  changed = train(SentencePieceSettings(vocab_size=380, input_sentence_size=5000,
                                        max_texts_read=None))
  assert len(calls) == 2 and changed.sentencepiece_model_file != model
  assert changed.vocab_size == 380
  reseeded = train(SentencePieceSettings(vocab_size=400, input_sentence_size=5000,
                                         max_texts_read=None, seed=1))
  assert len(calls) == 3 and reseeded.sentencepiece_model_file != model

  os.utime(corpus_file, ns=(mtime + 10**9, mtime + 10**9))  # The file changed: retrain.
  retrained = train()
  assert len(calls) == 4 and retrained.sentencepiece_model_file != model
  # Training is deterministic: the same sample gives the same pieces.
  assert vocab_lib.vocab_fingerprint(retrained) == vocab_lib.vocab_fingerprint(first)


def test_sentencepiece_reads_a_bounded_prefix_of_an_endless_stream(tmp_path):
  paragraphs = synthetic_paragraphs(300, seed=3)
  endless = itertools.cycle(paragraphs)
  settings = SentencePieceSettings(vocab_size=350, input_sentence_size=200, max_texts_read=600)
  vocab = vocab_lib.train_sentencepiece(endless, corpus_id={"source": "endless"},
                                        settings=settings, cache_dir=tmp_path, name="endless")
  meta = next(tmp_path.glob("vocab/endless-*/meta.json")).read_text()
  assert '"texts_read": 600' in meta and '"texts_sampled": 200' in meta
  assert vocab.vocab_size == 350


def test_sentencepiece_errors(tmp_path):
  with pytest.raises(ValueError, match="no text"):
    vocab_lib.train_sentencepiece(["", "  "], corpus_id={}, settings=SMALL, cache_dir=tmp_path)
  with pytest.raises(ValueError, match="Lower vocab_size"):
    vocab_lib.train_sentencepiece(["a few words only"], corpus_id={}, settings=SMALL,
                                  cache_dir=tmp_path)
  with pytest.raises(ValueError, match="vocab_size=200"):
    SentencePieceSettings(vocab_size=200)  # Not even room for the 256 byte pieces.
  with pytest.raises(ValueError, match="max_texts_read"):
    SentencePieceSettings(input_sentence_size=10, max_texts_read=5)
  with pytest.raises(ValueError, match="name="):
    vocab_lib.train_sentencepiece(["x"], corpus_id={}, cache_dir=tmp_path, name="../evil")


def test_sample_texts_is_a_seeded_uniform_reservoir():
  stream = [f"t{i}" for i in range(40)]
  sample, read = vocab_lib.sample_texts(stream + ["", " "], sample_size=10, seed=5)
  assert read == 40 and len(sample) == 10
  assert sample == [t for t in stream if t in set(sample)]  # Stream order.
  assert vocab_lib.sample_texts(stream, sample_size=10, seed=5)[0] == sample
  assert vocab_lib.sample_texts(stream, sample_size=10, seed=6)[0] != sample
  assert vocab_lib.sample_texts(stream, sample_size=100)[0] == stream
  # Bounded read of an endless stream: only the first max_read texts can be drawn.
  sample, read = vocab_lib.sample_texts((f"t{i}" for i in itertools.count()), sample_size=5,
                                        max_read=30, seed=1)
  assert read == 30 and all(int(t[1:]) < 30 for t in sample)
  # Every text is kept with probability k/n = 1/4 (binomial, 2000 draws: 5 sigma ~ 0.048).
  hits = collections.Counter()
  for seed in range(2000):
    hits.update(vocab_lib.sample_texts(stream, sample_size=10, seed=seed)[0])
  assert max(abs(hits[t] / 2000 - 0.25) for t in stream) < 0.05


# --------------------------------------------------------------------------------------------------
# Word-level vocabulary.

WORD_TEXTS = [
    "the cat sat on the mat .",
    "the dog sat on a <unk> log .",
    "a  cat\tand a dog\n. ",
    "role @-@ playing 1 @,@ 000 <unk>",
]


def _expected_words(texts):
  counts = collections.Counter(w for t in texts for w in t.split())
  del counts["<unk>"]
  return [w for w, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def test_word_vocabulary_build_order_and_cache(tmp_path):
  calls = []

  def texts():
    calls.append(1)
    return iter(WORD_TEXTS)

  vocab = vocab_lib.build_word_vocabulary(texts, corpus_id={"source": "words"},
                                          cache_dir=tmp_path)
  expected = _expected_words(WORD_TEXTS)
  assert list(vocab.words) == expected
  assert vocab.pieces[:3] == ("<pad>", "</s>", "<unk>")
  assert vocab.vocab_size == 3 + len(expected)
  again = vocab_lib.build_word_vocabulary(texts, corpus_id={"source": "words"},
                                          cache_dir=tmp_path)
  assert len(calls) == 1 and again == vocab
  limited = vocab_lib.build_word_vocabulary(texts, corpus_id={"source": "words"}, min_count=2,
                                            max_size=3, cache_dir=tmp_path)
  assert len(calls) == 2
  counts = collections.Counter(w for t in WORD_TEXTS for w in t.split())
  assert list(limited.words) == [w for w in expected if counts[w] >= 2][:3]


def test_word_vocabulary_encode_decode_python_and_tf():
  vocab = WordVocabulary(_expected_words(WORD_TEXTS))
  ids_of = {piece: i for i, piece in enumerate(vocab.pieces)}
  text = "the cat\t sat  on a\u00a0mat <unk> zebra"
  expected = [ids_of["the"], ids_of["cat"], ids_of["sat"], ids_of["on"],
              2,  # "a\u00a0mat": NBSP is not ASCII whitespace, so this is one unknown word.
              2, 2]  # "<unk>" and the unknown "zebra".
  assert vocab.encode(text) == expected
  assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == expected
  batch = vocab.encode_tf(tf.constant([text, "", "  . the "]))
  assert batch.to_list() == [expected, [], [ids_of["."], ids_of["the"]]]
  assert vocab.decode(expected) == "the cat sat on <unk> <unk> <unk>"
  # seqio's decode stops at EOS; pad is dropped.
  assert vocab.decode([ids_of["the"], 0, ids_of["dog"], 1, ids_of["cat"]]) == "the dog"
  rows = tf.constant([[ids_of["the"], ids_of["dog"], 1, ids_of["cat"], 0],
                      [0, ids_of["a"], ids_of["log"], 0, 0]])
  assert [s.decode() for s in vocab.decode_tf(rows).numpy()] == ["the dog", "a log"]
  assert vocab.decode_tf(rows[0]).numpy().decode() == "the dog"
  # "<pad>" / "</s>" written in text are words, not control ids.
  assert vocab.encode("</s> <pad>") == [2, 2]


def test_word_vocabulary_in_a_tf_data_map_pickles_and_saves(tmp_path):
  vocab = WordVocabulary(["b", "a"])
  ds = tf.data.Dataset.from_tensor_slices(["a b c", "b"]).map(vocab.encode_tf)
  assert [x.tolist() for x in ds.as_numpy_iterator()] == [[4, 3, 2], [3]]
  clone = pickle.loads(pickle.dumps(vocab))
  assert clone == vocab and clone.encode_tf(tf.constant("a")).numpy().tolist() == [4]
  vocab.save(tmp_path / "words.txt")
  assert WordVocabulary.load(tmp_path / "words.txt") == vocab
  (tmp_path / "bad.txt").write_text("a\nb\n")
  with pytest.raises(ValueError, match="not a WordVocabulary"):
    WordVocabulary.load(tmp_path / "bad.txt")
  for bad in (["a", "a"], ["two words"], [""], ["<unk>"]):
    with pytest.raises(ValueError):
      WordVocabulary(bad)


def test_fingerprints_match_the_pieces(spm_vocab):
  reference = sentencepiece.SentencePieceProcessor(model_file=spm_vocab.sentencepiece_model_file)
  pieces = [reference.id_to_piece(i) for i in range(reference.get_piece_size())]
  assert vocab_lib.vocab_fingerprint(spm_vocab) == hashing.vocabulary_fingerprint(pieces)
  words = WordVocabulary(["x", "y"])
  assert vocab_lib.vocab_fingerprint(words) == hashing.vocabulary_fingerprint(
      ["<pad>", "</s>", "<unk>", "x", "y"])
  assert vocab_lib.vocab_fingerprint(WordVocabulary(["y", "x"])) != vocab_lib.vocab_fingerprint(
      words)
  with pytest.raises(TypeError, match="ByteVocabulary"):
    vocab_lib.vocab_fingerprint(seqio.ByteVocabulary())


def test_cache_key_is_canonical():
  assert vocab_lib.cache_key({"a": 1, "b": [1, 2]}) == vocab_lib.cache_key({"b": [1, 2], "a": 1})
  assert vocab_lib.cache_key({"a": 1}) != vocab_lib.cache_key({"a": 2})
  assert np.all([len(vocab_lib.cache_key({})) == 64])


def test_package_exports_resolve_and_stay_light():
  import subprocess
  import sys

  import hashmoe.data
  missing = [name for name in hashmoe.data.__all__ if not hasattr(hashmoe.data, name)]
  assert not missing
  assert hashmoe.data.train_sentencepiece is vocab_lib.train_sentencepiece
  code = "import sys, hashmoe.data; print('tensorflow' in sys.modules, 'seqio' in sys.modules)"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
  assert result.stdout.split() == ["False", "False"], result.stderr[-2000:]
