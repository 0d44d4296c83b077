"""Tests for hashmoe.expert_grouping: a batch's grouping by expert against Python loops."""
import jax.numpy as jnp
import numpy as np
import pytest

from hashmoe import expert_grouping, hash_functions, hashing
from hashmoe.hashing import HashTable
from test_hashing import zipf_counts


def naive_sorted_assignments(columns, keys, num_experts, multihash):
  """Python loop: bucket every (column, token) assignment by group, in assignment order."""
  keys = np.asarray(keys).reshape(-1)
  num_columns = len(columns)
  num_groups = num_experts * (num_columns if multihash else 1)
  buckets = [[] for _ in range(num_groups)]
  for j, column in enumerate(columns):
    for t, key in enumerate(keys):
      buckets[(j if multihash else 0) * num_experts + int(column[key])].append(j * keys.size + t)
  perm = [a for bucket in buckets for a in bucket]
  inverse = [0] * len(perm)
  for position, a in enumerate(perm):
    inverse[a] = position
  return perm, inverse, [len(b) for b in buckets]


@pytest.mark.parametrize("layout", ["single", "multihash3", "topk2"])
def test_precompute_routing_matches_a_python_loop(layout):
  vocab, experts = 30, 4
  counts = zipf_counts(vocab, seed=1)
  if layout == "single":
    tables = hash_functions.build_table("balanced", num_experts=experts, vocab_size=vocab,
                                        token_counts=counts)
    columns, multihash = [tables.table], True
  elif layout == "multihash3":
    tables = hash_functions.build_multihash("random", 3, num_experts=experts, vocab_size=vocab,
                                            seed=2)
    columns, multihash = [t.table for t in tables], True
  else:
    tables = hash_functions.build_topk_table(2, num_experts=experts, vocab_size=vocab,
                                             token_counts=counts)
    columns, multihash = list(tables.table.T), False
  keys = np.random.default_rng(3).integers(0, vocab, size=(3, 7))
  got = expert_grouping.precompute_routing(tables, keys)
  perm, inverse, sizes = naive_sorted_assignments(columns, keys, experts, multihash)
  np.testing.assert_array_equal(got.permutation, perm)
  np.testing.assert_array_equal(got.inverse_permutation, inverse)
  np.testing.assert_array_equal(got.group_sizes, sizes)
  for a in got:
    assert a.dtype == np.int32


def test_precompute_routing_rejects_bad_keys_and_tables():
  table = hash_functions.build_table("random", num_experts=4, vocab_size=10, seed=0)
  with pytest.raises(ValueError, match="outside"):
    expert_grouping.precompute_routing(table, np.array([[1, 10]]))
  other = hash_functions.build_table("random", num_experts=5, vocab_size=10, seed=0)
  with pytest.raises(ValueError, match="share num_experts"):
    expert_grouping.precompute_routing((table, other), np.array([[1, 2]]))
  topk = hash_functions.build_topk_table(2, num_experts=4, vocab_size=10, token_counts=np.ones(10))
  with pytest.raises(ValueError, match="top-k table"):
    expert_grouping.precompute_routing((table, topk), np.array([[1, 2]]))
  with pytest.raises(TypeError, match="HashTable"):
    expert_grouping.precompute_routing((table.table,), np.array([[1, 2]]))


def test_routing_signature_names_key_layout_and_contents():
  t = hash_functions.build_multihash("random", 2, num_experts=4, vocab_size=10, seed=0)
  same = hash_functions.build_multihash("random", 2, num_experts=4, vocab_size=10, seed=0)
  name = expert_grouping.routing_signature("token", t)
  assert name == expert_grouping.routing_signature("token", same)
  assert name.startswith("token:multihash2x4:")
  assert (expert_grouping.routing_signature("token", t[0]) ==
          expert_grouping.routing_signature("token", (t[0],)))
  assert name != expert_grouping.routing_signature("prev_token", t)
  assert name != expert_grouping.routing_signature("token", (t[1], t[0]))
  changed = np.array(t[0].table)
  changed[3] = (changed[3] + 1) % 4
  assert name != expert_grouping.routing_signature(
      "token", (HashTable(kind="random", table=changed, num_experts=4, vocab_size=10), t[1]))
  topk = hash_functions.build_topk_table(2, num_experts=4, vocab_size=10, token_counts=np.ones(10))
  assert expert_grouping.routing_signature("token", topk).startswith("token:topk2x4:")
  with pytest.raises(ValueError, match="key must be one of"):
    expert_grouping.routing_signature("tokens", t)


def test_precompute_hash_routing_shares_one_entry_per_key_and_tables():
  vocab, experts = 12, 3
  a = hash_functions.build_table("random", num_experts=experts, vocab_size=vocab, seed=1)
  b = hash_functions.build_table("random", num_experts=experts, vocab_size=vocab, seed=2)
  ids = np.random.default_rng(0).integers(0, vocab, size=(2, 6)).astype(np.int32)
  segment_ids = np.array([[1, 1, 1, 2, 2, 2], [1] * 6], np.int32)
  out = expert_grouping.precompute_hash_routing(
      [("token", (a,)), ("token", (a,)), ("prev_token", (a,)), ("token", (b,))],
      token_ids=ids, segment_ids=jnp.asarray(segment_ids))
  assert len(out) == 3
  prev = hashing.routing_keys("prev_token", token_ids=ids, segment_ids=segment_ids,
                              key_space=vocab)
  for key, table, keys in [("token", a, ids), ("prev_token", a, prev), ("token", b, ids)]:
    want = expert_grouping.precompute_routing(table, keys)
    got = out[expert_grouping.routing_signature(key, table)]
    for g, w in zip(got, want):
      assert isinstance(g, np.ndarray)
      np.testing.assert_array_equal(g, w)
