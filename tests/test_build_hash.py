"""`hashmoe build-hash` from any tokenizer: top-k table initialisations, streaming token counts,
the files MaxText and Megatron load, and the errors on bad input.

References are independent of the code under test: per-row loops for the tables, plain Python
`collections.Counter` counts of the tokenizer's own per-line output, a fixture of the loaders'
tensor names written by hand (tests/fixtures/tid2eid/layouts.json), numpy lookups for routing.
"""
import bz2
import collections
import gzip
import json
import lzma
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zstandard

from hashmoe import cli, hash_functions, hashing, routing, table_export
from hashmoe.data import tokenizer_counts

FIXTURE = Path(__file__).parent / "fixtures" / "tid2eid" / "layouts.json"
WORDS = ("the king and queen of france speak to a fool while lords go home tonight again so "
         "much noise comes from the hall").split()


def _lines(seed, n):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, size=rng.integers(0, 14))) for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# Initialisations against per-row loops.


def _greedy_reference(counts, num_experts, k):
  """The balanced top-k definition, one token at a time: by decreasing count (ties: lower id),
  the k buckets lowest by (load, tokens, index); count-0 tokens dealt round robin in id order."""
  load = [0] * num_experts
  ntok = [0] * num_experts
  table = np.zeros((len(counts), k), np.int64)
  order = sorted(range(len(counts)), key=lambda v: (-counts[v], v))
  zeros = [v for v in order if counts[v] == 0]
  for v in order:
    if counts[v] == 0:
      continue
    picked = sorted(range(num_experts), key=lambda e: (load[e], ntok[e], e))[:k]
    for j, e in enumerate(picked):
      table[v, j] = e
      load[e] += counts[v]
      ntok[e] += 1
  for i, v in enumerate(zeros):
    table[v] = [(i * k + j) % num_experts for j in range(k)]
  return table


@pytest.mark.parametrize("vocab,experts,k", [(50, 8, 3), (37, 5, 5), (20, 16, 1)])
def test_initialisations_match_their_definitions(vocab, experts, k):
  rng = np.random.default_rng(vocab)
  counts = rng.zipf(1.5, size=vocab)
  counts[rng.random(vocab) < 0.2] = 0
  balanced = hash_functions.build_topk("balanced", k, num_experts=experts, vocab_size=vocab,
                                       token_counts=counts)
  np.testing.assert_array_equal(balanced.table, _greedy_reference(counts.tolist(), experts, k))
  roundrobin = hash_functions.build_topk("roundrobin", k, num_experts=experts, vocab_size=vocab)
  np.testing.assert_array_equal(
      roundrobin.table, [[(v + j) % experts for j in range(k)] for v in range(vocab)])
  zeros = hash_functions.build_topk("zeros", k, num_experts=experts, vocab_size=vocab)
  np.testing.assert_array_equal(zeros.table, [list(range(k))] * vocab)
  random = hash_functions.build_topk("random", k, num_experts=experts, vocab_size=vocab, seed=5)
  draws = np.random.default_rng(5)
  # Row v: the first k of the argsort of that row's E uniform draws (one draw stream, row-major).
  want = [sorted(range(experts), key=lambda e, u=draws.random(experts): u[e])[:k]
          for _ in range(vocab)]
  np.testing.assert_array_equal(random.table, want)
  assert {t.kind for t in (balanced, roundrobin, zeros, random)} == set(hashing.TOPK_KINDS)
  # The unrouted default of the hash top-k router is the same random table.
  router = routing.HashTopKRouter(experts, k, key_space=vocab, seed=5)
  np.testing.assert_array_equal(router._host_table(), random.table)


def test_random_table_is_blockwise_the_one_shot_permutation(monkeypatch):
  # Rows are drawn in blocks of _RANDOM_BLOCK_DRAWS / E rows (here 4): a table of several blocks,
  # the last one short, is the one-shot argsort.
  monkeypatch.setattr(hash_functions, "_RANDOM_BLOCK_DRAWS", 64)
  experts = 16
  table = hash_functions.random_topk_table(3, num_experts=experts, vocab_size=70, seed=1)
  ref = np.argsort(np.random.default_rng(1).random((70, experts)), axis=1)[:, :3]
  np.testing.assert_array_equal(table.table, ref)


@pytest.mark.parametrize("kind", sorted(hash_functions.TOPK_SHORT_NAMES))
def test_k_above_experts_is_refused(kind):
  with pytest.raises(ValueError, match=r"k must be an int in \[1, num_experts=4\].*got k=5"):
    hash_functions.build_topk(kind, 5, num_experts=4, vocab_size=10, token_counts=np.ones(10))


# --------------------------------------------------------------------------------------------------
# Counting with real tokenizers.


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A folder of the same kind of text as plain, .gz, .xz, .zst and .bz2 files, and its lines."""
  root = tmp_path_factory.mktemp("corpus")
  files = {"a.txt": None, "sub/b.txt.gz": gzip.compress, "c.txt.xz": lzma.compress,
           "d.txt.zst": zstandard.ZstdCompressor().compress, "e.txt.bz2": bz2.compress}
  every = []
  for i, (name, compress) in enumerate(files.items()):
    lines = _lines(i, 130)
    every += lines
    data = ("\n".join(lines) + "\n").encode()
    path = root / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(compress(data) if compress else data)
  (root / ".hidden").write_text("not counted\n")
  # text_files_of reads folders sorted by relative path: a.txt, c.txt.xz, d.txt.zst, e.txt.bz2,
  # sub/b.txt.gz.
  order = ["a.txt", "c.txt.xz", "d.txt.zst", "e.txt.bz2", "sub/b.txt.gz"]
  by_name = dict(zip(files, [every[i * 130:(i + 1) * 130] for i in range(5)]))
  return root, [line for name in order for line in by_name[name]]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  import sentencepiece as spm
  folder = tmp_path_factory.mktemp("spm")
  text = folder / "train.txt"
  text.write_text("\n".join(_lines(99, 400)) + "\n")
  spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "sp"), vocab_size=70,
                                 model_type="bpe", minloglevel=2)
  return folder / "sp.model"


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(WORDS)))}}
  del vocab["fool"]  # A word the vocabulary lacks: counted as [UNK].
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
  tokenizer.save(str(path))
  return path, vocab


def _reference_blocks(lines, block_lines, fraction):
  """(counted lines, held-out lines): block b is held out iff frac((b+1)(sqrt5-1)/2) < fraction."""
  counted, heldout = [], []
  for b in range(math.ceil(len(lines) / block_lines)):
    block = lines[b * block_lines:(b + 1) * block_lines]
    g = (b + 1) * (math.sqrt(5) - 1) / 2
    (heldout if g - math.floor(g) < fraction else counted).extend(block)
  return counted, heldout


def test_sentencepiece_counts_match_a_plain_count(corpus, sp_model):
  import sentencepiece as spm
  root, lines = corpus
  processor = spm.SentencePieceProcessor(model_file=str(sp_model))
  tok = tokenizer_counts.load_tokenizer(sentencepiece=sp_model)
  assert tok.vocab_size == processor.get_piece_size() == 70
  counted_lines, heldout_lines = _reference_blocks(lines, 40, 0.3)
  assert counted_lines and heldout_lines
  got = tokenizer_counts.count_tokens(tok, [root], heldout_fraction=0.3, block_lines=40,
                                      vocab_size=75, progress=False)
  for part, text in ((got.counts, counted_lines), (got.heldout_counts, heldout_lines)):
    want = collections.Counter(i for line in text for i in processor.encode(line))
    np.testing.assert_array_equal(part, [want.get(i, 0) for i in range(75)])
  assert (got.lines, got.heldout_lines) == (len(counted_lines), len(heldout_lines))
  assert len(got.files) == 5  # The hidden file is skipped.


def test_tokenizer_json_counts_match_a_plain_count(corpus, hf_json):
  root, lines = corpus
  path, vocab = hf_json
  tok = tokenizer_counts.load_tokenizer(hf_tokenizer=path)
  assert tok.vocab_size == max(vocab.values()) + 1
  got = tokenizer_counts.count_tokens(tok, [root], progress=False)
  want = collections.Counter(vocab.get(w, 0) for line in lines for w in line.split())
  np.testing.assert_array_equal(got.counts, [want.get(i, 0) for i in range(tok.vocab_size)])
  assert got.counts[0] > 0 and not got.heldout_counts.any()


# --------------------------------------------------------------------------------------------------
# A 129k-vocabulary table: exported, loaded, routed.


@pytest.fixture(scope="module")
def big_export(tmp_path_factory):
  vocab, experts, k = 129280, 256, 6
  counts = np.random.default_rng(0).zipf(1.3, size=vocab)
  table = hash_functions.build_topk("balanced", k, num_experts=experts, vocab_size=vocab,
                                    token_counts=counts)
  paths = table_export.output_paths(tmp_path_factory.mktemp("export") / "tid2eid.npy",
                                    list(table_export.LAYOUTS))
  table_export.write_npy(table, paths["npy"])
  for layout in table_export.LAYOUTS:
    table_export.write_safetensors(table, paths[layout], layout=layout, num_layers=3)
  return table, paths


def test_exported_files_hold_the_same_table_under_the_loaders_names(big_export):
  from safetensors import safe_open
  table, paths = big_export
  npy = np.load(paths["npy"])
  assert npy.dtype == np.int32 and npy.shape == (129280, 6)
  np.testing.assert_array_equal(npy, table.table)
  fixture = json.loads(FIXTURE.read_text())
  for layout in table_export.LAYOUTS:
    want = fixture[layout]
    with safe_open(str(paths[layout]), framework="numpy") as f:
      names = sorted(f.keys())
      assert names == sorted(want["name"].format(i=i) for i in range(3))
      for name in names:
        tensor = f.get_tensor(name)
        assert tensor.dtype == np.dtype(want["dtype"]) and tensor.shape == (129280, 6)
        np.testing.assert_array_equal(tensor, npy)
        # What the loader's model holds it as keeps every id.
        np.testing.assert_array_equal(tensor.astype(want["loader_dtype"]).astype(np.int64), npy)
      assert f.metadata()["kind"] == "balanced_topk"


def test_loaded_table_routes_like_the_npy(big_export):
  table, paths = big_export
  from_npy = table_export.read_exported(paths["npy"], num_experts=256, vocab_size=129280, k=6)
  from_st = table_export.read_exported(paths["megatron_core"], num_experts=256,
                                       vocab_size=129280, k=6,
                                       tensor="decoder.layers.2.mlp.router.tid2eid")
  assert from_npy == hashing.HashTable("balanced_topk", np.load(paths["npy"]), 256, 129280)
  ids = jnp.asarray([[0, 5, 129279, 77], [1000, 64000, 3, 3]], jnp.int32)
  hidden = jax.random.normal(jax.random.key(0), (8, 4), jnp.float32)
  outs = []
  for loaded in (from_npy, from_st):
    router = routing.HashTopKRouter(256, 6, table=loaded)
    features = routing.RouterFeatures(token_ids=ids)
    variables = router.init(jax.random.key(1), hidden, features, deterministic=True)
    outs.append(router.apply(variables, hidden, features, deterministic=True))
  np.testing.assert_array_equal(outs[0].expert_index, np.load(paths["npy"])[np.asarray(ids)]
                                .reshape(8, 6))
  np.testing.assert_array_equal(outs[1].expert_index, outs[0].expert_index)
  np.testing.assert_array_equal(outs[1].combine_weight, outs[0].combine_weight)


def test_a_table_for_another_model_is_refused(big_export, tmp_path):
  _, paths = big_export
  with pytest.raises(ValueError, match=r"covers 129280 token ids, but the model's vocabulary has "
                     r"vocab_size=128000; build it for this vocabulary \(--vocab_size=128000\)"):
    table_export.read_exported(paths["npy"], num_experts=256, vocab_size=128000)
  with pytest.raises(ValueError, match="has k=6 experts per token, the model routes each token "
                     "to k=8"):
    table_export.read_exported(paths["maxtext"], num_experts=256, k=8)
  with pytest.raises(ValueError, match=r"entries must be in \[0, num_experts=64\)"):
    table_export.read_exported(paths["npy"], num_experts=64)
  repeated = tmp_path / "repeated.npy"
  np.save(repeated, np.array([[0, 1], [2, 2], [1, 3]], np.int32))
  with pytest.raises(ValueError, match=re.escape(
      "repeated.npy: not a valid top-k table for num_experts=4: top-k table rows must hold k "
      "distinct experts; 1 rows repeat one, e.g. id 1: [2, 2]")):
    table_export.read_exported(repeated, num_experts=4)


# --------------------------------------------------------------------------------------------------
# The command.


def _run(argv, capsys):
  capsys.readouterr()
  code = cli.main(["build-hash", "--no_progress"] + list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_command_writes_every_file_and_an_exact_report(corpus, sp_model, tmp_path, capsys):
  import sentencepiece as spm
  root, lines = corpus
  out = tmp_path / "t" / "tid2eid.npy"
  # The folder twice: 1,300 lines, two blocks of 1,000, the second held out at this fraction.
  code, stdout, err = _run(["--sentencepiece", str(sp_model), "--text", str(root), "--text",
                            str(root), "--experts", "8", "--k", "3", "--kind", "random", "--seed",
                            "2", "--layers", "2", "--heldout_fraction", "0.25", "--output",
                            str(out)], capsys)
  assert code == 0, err
  summary = json.loads(stdout)
  report = json.loads(Path(summary["files"]["report"]).read_text())
  table = np.load(out)
  np.testing.assert_array_equal(
      table, hash_functions.random_topk_table(3, num_experts=8, vocab_size=70, seed=2).table)
  processor = spm.SentencePieceProcessor(model_file=str(sp_model))
  counted, heldout = _reference_blocks(lines * 2, tokenizer_counts.DEFAULT_BLOCK_LINES, 0.25)
  assert (len(counted), len(heldout)) == (1000, 300)
  for part, text in (("counted", counted), ("heldout", heldout)):
    ids = [i for line in text for i in processor.encode(line)]
    load = np.zeros(8)
    for i in ids:
      load[table[i]] += 1  # Each of the token's 3 experts processes it.
    assert report["load"][part]["max_over_mean"] == pytest.approx(load.max() / load.mean())
    assert report["load"][part]["tokens"] == len(ids)
  assert report["tensors"]["maxtext"] == ["model.layers.0.mlp.gate.tid2eid",
                                          "model.layers.1.mlp.gate.tid2eid"]
  assert hashing.HashTable.load(summary["files"]["npz"]).kind == "random_topk"


@pytest.mark.parametrize("case", ["k_above_e", "bad_spm", "bad_json", "empty", "both",
                                  "all_heldout"])
def test_command_bad_input(case, corpus, sp_model, tmp_path, capsys):
  root, _ = corpus
  common = ["--experts", "8", "--k", "2", "--kind", "balanced",
            "--output", str(tmp_path / "t.npy")]
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"\x00\x01 this is not a model")
  bad_json = tmp_path / "tokenizer.json"
  bad_json.write_text('{"model": {"type": "Nope"}}')
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "a.txt").write_text("\n\n")
  argv, message = {
      "k_above_e": (["--sentencepiece", str(sp_model), "--text", str(root), "--experts", "4",
                     "--k", "6"], "--k=6 with --experts=4: each token takes k distinct experts, "
                    "so 1 <= k <= experts"),
      "bad_spm": (["--sentencepiece", str(junk), "--text", str(root)],
                  f"{junk}: not a SentencePiece model (it does not parse: "),
      "bad_json": (["--hf_tokenizer", str(bad_json), "--text", str(root)],
                   f"{bad_json}: not a Hugging Face tokenizer.json (it does not parse: "),
      "empty": (["--sentencepiece", str(sp_model), "--text", str(empty)],
                f"empty corpus: 1 file(s) under {empty} hold no tokens (2 lines); give the text "
                "to count"),
      "both": (["--sentencepiece", str(sp_model), "--hf_tokenizer", str(bad_json), "--text",
                str(root)], "give one tokenizer: --sentencepiece or --hf_tokenizer, not both"),
      # One block of 650 lines, and block 0 is held out at this fraction (0.618 < 0.7).
      "all_heldout": (["--sentencepiece", str(sp_model), "--text", str(root),
                       "--heldout_fraction", "0.7"],
                      f"all 650 lines of {root} fell in the held-out part; lower "
                      "--heldout_fraction=0.7 or give more text"),
  }[case]
  if case == "bad_json":
    pytest.importorskip("tokenizers")
  code, _, err = _run(common + argv, capsys)
  assert code == cli.EXIT_USAGE
  assert err.startswith(f"hashmoe build-hash: error: {message}"), err
  assert not (tmp_path / "t.npy").exists()


def test_maxtext_float_tables_read_as_expert_ids(tmp_path):
  from safetensors import numpy as st_numpy
  ids = np.array([[3, 1], [0, 2], [2, 3]], np.int64)
  path = tmp_path / "maxtext.safetensors"
  path.write_bytes(st_numpy.save({"model.layers.0.mlp.gate.tid2eid": ids.astype(np.float32)}))
  table = table_export.read_exported(path, num_experts=4, vocab_size=3, k=2)
  np.testing.assert_array_equal(table.table, ids)
  path.write_bytes(st_numpy.save({"model.layers.0.mlp.gate.tid2eid":
                                  ids.astype(np.float32) + 0.5}))
  with pytest.raises(ValueError, match="float table with non-integer entries"):
    table_export.read_exported(path, num_experts=4)
