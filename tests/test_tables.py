"""Tests for hashmoe.tables: which layers need which tables, and a run's tables from its spec.

The tables themselves (balanced, clustered, MultiHash...) are tested against references in
tests/test_hashing.py and tests/test_stats.py; what is checked here is what this module decides:
the layers and table counts a config implies, which counts a built table is balanced on, where its
file goes, and which files and kinds a run refuses (the messages name the binding to change). The
hash-table lifecycle of a whole run (built, checkpointed, verified, resumed) is in
tests/test_train.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from hashmoe import hash_functions, hashing, models, routers, tables
from hashmoe.training.errors import CheckpointError

V = 32


def config(router="hash", *, layers=(1,), encoder_layers=(), **sparse):
  """`router`: a family name (its defaults) or a `hashmoe.routers` config; None is dense."""
  s = None if router is None else models.SparseConfig(router=router, num_experts=4, layers=layers,
                                                      encoder_layers=encoder_layers, **sparse)
  return models.tiny_config(vocab_size=V, num_encoder_layers=2, sparse=s, max_len=16)


def test_hash_layers_and_tables_per_layer_follow_the_router():
  assert tables.hash_layer_names(config(None)) == []
  assert tables.hash_layer_names(config("switch")) == []
  both = config("hash", layers=(1,), encoder_layers=(0,))
  assert tables.hash_layer_names(both) == ["encoder_0", "decoder_1"]
  assert tables.hash_layer_names(config(routers.HashTopK(topk=2))) == ["decoder_1"]
  assert tables.tables_per_layer(config(routers.Hash(num_hashes=4))) == 4
  assert tables.tables_per_layer(config(routers.HashTopK(topk=2))) == 1
  assert tables.default_table_kind(config("hash")) == "random"
  assert tables.default_table_kind(config(routers.HashTopK(topk=2))) == hashing.TOPK_KIND
  assert tables.is_table_kind("balanced") and tables.is_table_kind(hashing.TOPK_KIND)
  assert not any(map(tables.is_table_kind, [None, "balanced.npz", ["balanced"], {"a": "b"}]))


def _counts(calls):
  def key_counts(key, key_space, *, decoder_inputs):
    calls.append((key, key_space, decoder_inputs))
    return np.arange(key_space, dtype=np.int64) * 7 % 11 + 1
  return key_counts


def test_a_kind_is_built_from_the_split_s_counts_and_kept_under_model_dir(tmp_path):
  calls = []
  built, described = tables.resolve_hash_tables(
      "balanced", config(), key_counts=_counts(calls), vocab_fingerprint="", seed=3,
      model_dir=tmp_path)
  # Decoder routers hash their inputs, so a token table is balanced on decoder-input counts.
  assert calls == [("token", V, True)]
  want = hash_functions.build_table("balanced", num_experts=4, vocab_size=V, seed=3,
                             token_counts=_counts([])("token", V, decoder_inputs=True))
  assert built == {"default": (want,)}
  assert hashing.HashTable.load(tmp_path / tables.HASH_TABLE_SUBDIR / "balanced.npz") == want
  (desc,) = described["decoder_1"]
  assert desc["kind"] == "balanced" and desc["source"].startswith("built at the start")

  # The oracle next token estimates the target: its table is balanced on target counts.
  calls.clear()
  oracle = config(routers.Hash(key="oracle_future"))
  tables.resolve_hash_tables("balanced", oracle, key_counts=_counts(calls), vocab_fingerprint="",
                             seed=0, model_dir=None)
  assert calls == [("token", V, False)]
  # None: the router's default kind; a random table needs no counts.
  calls.clear()
  built, _ = tables.resolve_hash_tables(None, config(), key_counts=_counts(calls),
                                        vocab_fingerprint="", seed=0, model_dir=None)
  assert calls == [] and built["default"][0].kind == "random"


def test_files_are_loaded_per_layer_and_refused_where_they_do_not_fit(tmp_path):
  table = hash_functions.build_table("random", num_experts=4, vocab_size=V, seed=1)
  table.save(tmp_path / "t.npz")
  spec = {"decoder_1": str(tmp_path / "t.npz")}
  built, described = tables.resolve_hash_tables(spec, config(), key_counts=None,
                                                vocab_fingerprint="", seed=0, model_dir=None)
  assert built == {"decoder_1": (table,)}
  assert described["decoder_1"][0]["source"] == str(tmp_path / "t.npz")
  with pytest.raises(ValueError, match=r"^hash_tables.tables has no tables for hash layers "
                     r"\['decoder_0'\]"):
    tables.resolve_hash_tables(spec, config(layers=(0, 1)), key_counts=None,
                               vocab_fingerprint="", seed=0, model_dir=None,
                               binding="hash_tables.tables")
  with pytest.raises(ValueError, match=r"built for 4 experts.*num_experts=8"):
    tables.load_hash_table_files(spec, models.tiny_config(
        vocab_size=V, sparse=models.SparseConfig(num_experts=8, layers=(1,))))
  with pytest.raises(ValueError, match=r"build-hash --kind=clustered.*as train.hash_tables$"):
    tables.resolve_hash_tables("clustered", config(), key_counts=None, vocab_fingerprint="",
                               seed=0, model_dir=None)
  # Without hash layers a kind is moot, files are an error.
  assert tables.resolve_hash_tables("balanced", config("switch"), key_counts=None,
                                    vocab_fingerprint="", seed=0, model_dir=None) == ({}, {})
  with pytest.raises(ValueError, match=r"train.hash_tables=.* no hash layers"):
    tables.resolve_hash_tables(spec, config(None), key_counts=None, vocab_fingerprint="", seed=0,
                               model_dir=None)


def test_check_same_tables_refuses_files_a_checkpoint_was_not_trained_with(tmp_path):
  table = hash_functions.build_table("random", num_experts=4, vocab_size=V, seed=1)
  other = hash_functions.build_table("random", num_experts=4, vocab_size=V, seed=2)
  table.save(tmp_path / "t.npz")
  other.save(tmp_path / "o.npz")
  meta = {"layers": {"decoder_1": [tables.table_description(table, "anywhere")]}}
  tables.check_same_tables(str(tmp_path / "t.npz"), config(), meta, vocab_fingerprint="")
  with pytest.raises(CheckpointError, match="was not trained with"):
    tables.check_same_tables(str(tmp_path / "o.npz"), config(), meta, vocab_fingerprint="")
