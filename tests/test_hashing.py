"""Tests for hashmoe.hashing: tables against naive loops, closed forms and synthetic data."""
import hashlib
import io
import json
import math
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from hashmoe import hash_functions
from hashmoe import hashing
from hashmoe.hashing import HashTable


def zipf_counts(vocab_size, seed, exponent=1.1, zero_fraction=0.0, scale=10**6):
  """int64[vocab] Zipf-like corpus counts in shuffled id order, with ties and optional zeros."""
  rng = np.random.default_rng(seed)
  counts = np.floor(scale / np.arange(1, vocab_size + 1) ** exponent).astype(np.int64)
  counts = counts[rng.permutation(vocab_size)]
  counts[rng.random(vocab_size) < zero_fraction] = 0
  return counts


def naive_greedy(counts, num_experts, k=1):
  """O(V E) reference for the balanced assignment, written straight from the rule.

  Tokens by decreasing count, ties by id. A positive-count token takes the k buckets that are
  lexicographically smallest in (load, number of tokens, index); a zero-count token the k
  smallest in (number of zero-count tokens, index).
  """
  vocab_size = len(counts)
  order = sorted(range(vocab_size), key=lambda v: (-counts[v], v))
  load = [0] * num_experts
  ntok = [0] * num_experts
  nzero = [0] * num_experts
  out = np.zeros((vocab_size, k), dtype=np.int64)
  for v in order:
    if counts[v] > 0:
      keys = [(load[e], ntok[e], e) for e in range(num_experts)]
    else:
      keys = [(nzero[e], e) for e in range(num_experts)]
    chosen = [key[-1] for key in sorted(keys)[:k]]
    for j, e in enumerate(chosen):
      out[v, j] = e
      load[e] += counts[v]
      ntok[e] += 1
      nzero[e] += counts[v] == 0
  return out


def py_fmix32(x):
  x ^= x >> 16
  x = (x * 0x85EBCA6B) & 0xFFFFFFFF
  x ^= x >> 13
  x = (x * 0xC2B2AE35) & 0xFFFFFFFF
  x ^= x >> 16
  return x


def py_bigram(prev, cur, key_space):
  return py_fmix32((py_fmix32(prev) * 0x9E3779B1 + cur) & 0xFFFFFFFF) % key_space


def expert_loads(table, counts, num_experts):
  return np.bincount(table, weights=counts, minlength=num_experts)


# ------------------------------------------------------------------------------------------------
# Fingerprints and id checks.


def test_vocabulary_fingerprint_matches_documented_format():
  pieces = ["<pad>", "▁the", "ab", "c", ""]
  digest = hashlib.sha256(b"hashmoe.vocabulary.v1" + (5).to_bytes(8, "little"))
  for piece in pieces:
    data = piece.encode()
    digest.update(len(data).to_bytes(8, "little") + data)
  assert hashing.vocabulary_fingerprint(pieces) == digest.hexdigest()


def test_vocabulary_fingerprint_is_unambiguous():
  fp = hashing.vocabulary_fingerprint
  assert fp(["ab", "c"]) != fp(["a", "bc"])
  assert fp(["a", "b"]) != fp(["b", "a"])
  assert fp(["a"]) != fp(["a", ""])
  with pytest.raises(TypeError):
    fp("abc")
  with pytest.raises(TypeError, match="pieces\\[1\\]"):
    fp(["a", 3])


@pytest.mark.parametrize("as_jax", [False, True])
def test_check_token_ids_reports_bad_ids(as_jax):
  ids = np.array([[3, -2, 5], [9, 12, 0]], dtype=np.int32)
  if as_jax:
    ids = jnp.asarray(ids)
  with pytest.raises(ValueError) as e:
    hashing.check_token_ids(ids, 10, name="my_ids")
  message = str(e.value)
  assert "my_ids" in message and "2 of 6" in message
  assert "min=-2" in message and "max=12" in message and "10" in message
  hashing.check_token_ids(np.array([0, 9]), 10)  # In range: no error.
  hashing.check_token_ids(np.zeros((0,), np.int32), 10)  # Empty: no error.
  with pytest.raises(TypeError, match="integer"):
    hashing.check_token_ids(np.array([0.5]), 10)


def test_check_token_ids_is_a_noop_under_tracing():
  @jax.jit
  def f(ids):
    hashing.check_token_ids(ids, 4)
    return ids + 1

  np.testing.assert_array_equal(f(jnp.array([7, -1])), [8, 0])


# ------------------------------------------------------------------------------------------------
# HashTable value.


def test_hashtable_validates_its_fields():
  ok = dict(kind="random", table=np.array([0, 1, 2]), num_experts=3, vocab_size=3)
  HashTable(**ok)
  with pytest.raises(ValueError, match="kind"):
    HashTable(**{**ok, "kind": "nope"})
  with pytest.raises(ValueError, match="min=0, max=3"):
    HashTable(**{**ok, "table": np.array([0, 1, 3])})
  with pytest.raises(ValueError, match="min=-1"):
    HashTable(**{**ok, "table": np.array([0, -1, 2])})
  with pytest.raises(ValueError, match="shape"):
    HashTable(**{**ok, "table": np.array([0, 1])})
  with pytest.raises(ValueError, match="shape"):
    HashTable(**{**ok, "table": np.zeros((3, 2), np.int32)})
  with pytest.raises(TypeError, match="integer"):
    HashTable(**{**ok, "table": np.array([0.0, 1.0, 2.0])})
  with pytest.raises(ValueError, match="num_experts"):
    HashTable(**{**ok, "num_experts": 0})
  with pytest.raises(ValueError, match="fingerprint"):
    HashTable(**{**ok, "vocab_fingerprint": "abc"})
  with pytest.raises(ValueError, match="distinct"):
    HashTable(kind=hashing.TOPK_KIND, table=np.array([[0, 1], [2, 2]]), num_experts=3, vocab_size=2)


def test_hashtable_is_read_only_int32_and_comparable():
  source = np.array([2, 0, 1], dtype=np.int64)
  table = HashTable(kind="random", table=source, num_experts=3, vocab_size=3, seed=7)
  assert table.table.dtype == np.int32
  source[0] = 0  # The table holds its own copy.
  assert table.table[0] == 2
  with pytest.raises(ValueError):
    table.table[0] = 1
  same = HashTable(kind="random", table=np.array([2, 0, 1]), num_experts=3, vocab_size=3, seed=7)
  assert table == same and hash(table) == hash(same)
  assert table != HashTable(kind="random", table=np.array([2, 0, 1]), num_experts=3, vocab_size=3)
  with pytest.raises(dataclasses_frozen_error()):
    table.kind = "balanced"


def dataclasses_frozen_error():
  import dataclasses
  return dataclasses.FrozenInstanceError


def test_load_stats_uniform_closed_form():
  num_experts = 8
  table = HashTable(kind="random", table=np.arange(32) % num_experts, num_experts=num_experts,
                    vocab_size=32)
  out = table.load_stats(np.full(32, 5))
  np.testing.assert_allclose(out["expert_load"], np.full(num_experts, 1 / num_experts))
  assert out["cv"] == pytest.approx(0.0, abs=1e-12)
  assert out["max_over_mean"] == pytest.approx(1.0)
  assert out["entropy"] == pytest.approx(math.log(num_experts))
  assert out["normalized_entropy"] == pytest.approx(1.0)


def test_load_stats_skewed_closed_form():
  # Loads 6, 2, 0, 0 out of 8: fractions 3/4, 1/4, 0, 0; mean 1/4.
  table = HashTable(kind="random", table=np.array([0, 1, 1, 2]), num_experts=4, vocab_size=4)
  out = table.load_stats(np.array([6, 1, 1, 0]))
  np.testing.assert_allclose(out["expert_load"], [0.75, 0.25, 0, 0])
  assert out["max_over_mean"] == pytest.approx(3.0)
  # Deviations from the mean: 1/2, 0, -1/4, -1/4 -> variance (1/4 + 1/16 + 1/16) / 4 = 3/32.
  assert out["cv"] == pytest.approx(math.sqrt(3 / 32) / 0.25)
  entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
  assert out["entropy"] == pytest.approx(entropy)
  assert out["normalized_entropy"] == pytest.approx(entropy / math.log(4))
  with pytest.raises(ValueError, match="shape"):
    table.load_stats(np.ones(5))
  with pytest.raises(ValueError, match="sum to 0"):
    table.load_stats(np.zeros(4))
  with pytest.raises(ValueError, match=">= 0"):
    table.load_stats(np.array([1, -1, 0, 0]))


def test_load_stats_topk_counts_each_expert():
  table = HashTable(kind=hashing.TOPK_KIND, table=np.array([[0, 1], [2, 1]]), num_experts=3,
                    vocab_size=2)
  out = table.load_stats(np.array([3, 1]))
  # Expert 0 gets 3, expert 1 gets 3 + 1, expert 2 gets 1; total 8.
  np.testing.assert_allclose(out["expert_load"], [3 / 8, 4 / 8, 1 / 8])


def test_check_vocabulary_names_both_values():
  fp_a, fp_b = hashing.vocabulary_fingerprint(["a"]), hashing.vocabulary_fingerprint(["b"])
  table = HashTable(kind="random", table=np.zeros(10, np.int32), num_experts=2, vocab_size=10,
                    vocab_fingerprint=fp_a)
  table.check_vocabulary(10, fp_a)
  table.check_vocabulary(10)
  with pytest.raises(ValueError, match="vocab_size=10.*vocab_size=12"):
    table.check_vocabulary(12)
  with pytest.raises(ValueError) as e:
    table.check_vocabulary(10, fp_b)
  assert fp_a in str(e.value) and fp_b in str(e.value)
  # An unknown fingerprint on either side skips the fingerprint check.
  unknown = HashTable(kind="random", table=np.zeros(10, np.int32), num_experts=2, vocab_size=10)
  unknown.check_vocabulary(10, fp_b)


# ------------------------------------------------------------------------------------------------
# Lookup.


def test_lookup_matches_numpy_indexing_and_raises_on_bad_ids():
  table = hash_functions.build_table("random", num_experts=5, vocab_size=50, seed=3)
  ids = np.random.default_rng(0).integers(0, 50, size=(3, 7))
  np.testing.assert_array_equal(table.lookup(ids), table.table[ids])
  np.testing.assert_array_equal(table.lookup(jnp.asarray(ids)), table.table[ids])
  assert table.lookup(ids).dtype == jnp.int32
  with pytest.raises(ValueError, match="min=-1.*vocab_size=50"):
    table.lookup(np.array([0, -1, 3]))
  with pytest.raises(ValueError, match="max=50.*vocab_size=50"):
    table.lookup(jnp.array([[0, 50]]))


def test_lookup_under_jit_and_topk_shape():
  table = hash_functions.build_topk_table(3, num_experts=6, vocab_size=20, token_counts=np.arange(20))
  ids = np.array([[0, 19, 4], [7, 7, 1]])
  out = jax.jit(table.lookup)(ids)
  assert out.shape == (2, 3, 3)
  np.testing.assert_array_equal(out, table.table[ids])


# ------------------------------------------------------------------------------------------------
# Random and balanced tables.


def test_random_table_is_seeded_and_uniform():
  a = hash_functions.build_table("random", num_experts=16, vocab_size=4000, seed=1)
  b = hash_functions.build_table("random", num_experts=16, vocab_size=4000, seed=1)
  c = hash_functions.build_table("random", num_experts=16, vocab_size=4000, seed=2)
  assert a == b and a.kind == "random" and a.seed == 1
  assert np.mean(a.table == c.table) < 0.2
  _, p = stats.chisquare(np.bincount(a.table, minlength=16))
  assert p > 1e-3


@pytest.mark.parametrize("vocab_size,num_experts,zero_fraction,seed",
                         [(300, 7, 0.0, 0), (500, 16, 0.3, 1), (40, 8, 0.5, 2), (5, 8, 0.0, 3)])
def test_balanced_matches_naive_greedy(vocab_size, num_experts, zero_fraction, seed):
  counts = zipf_counts(vocab_size, seed, scale=2000, zero_fraction=zero_fraction)
  table = hash_functions.build_table("balanced", num_experts=num_experts, vocab_size=vocab_size,
                              token_counts=counts)
  np.testing.assert_array_equal(table.table, naive_greedy(counts.tolist(), num_experts)[:, 0])


def test_balanced_breaks_load_ties_by_token_count():
  # Loads after five tokens: e0 = 4+1+1 = 6 (3 tokens), e1 = 3+3 = 6 (2 tokens): the last token goes
  # to e1, the bucket with fewer tokens, not to the lower index e0.
  table = hash_functions.build_table("balanced", num_experts=2, vocab_size=6,
                              token_counts=np.array([4, 3, 3, 1, 1, 1]))
  np.testing.assert_array_equal(table.table, [0, 1, 1, 0, 0, 1])


def test_balanced_accepts_float_frequencies():
  counts = zipf_counts(200, 4, scale=1000)
  # Scaling by a power of two is exact in floating point, so load ties survive and the tables agree.
  freqs = counts / 2.0**20
  a = hash_functions.build_table("balanced", num_experts=8, vocab_size=200, token_counts=counts)
  b = hash_functions.build_table("balanced", num_experts=8, vocab_size=200, token_counts=freqs)
  np.testing.assert_array_equal(a.table, b.table)


def test_balanced_is_far_more_even_than_random_on_zipf():
  # Paper Figure 4. Exponent 0.6 keeps the most frequent token below the ideal share 1/E.
  vocab_size, num_experts = 8000, 64
  counts = zipf_counts(vocab_size, 5, exponent=0.6)
  assert counts.max() < counts.sum() / num_experts
  balanced = hash_functions.build_table("balanced", num_experts=num_experts, vocab_size=vocab_size,
                                 token_counts=counts).load_stats(counts)
  random = hash_functions.build_table("random", num_experts=num_experts, vocab_size=vocab_size,
                               token_counts=counts).load_stats(counts)
  assert balanced["max_over_mean"] < 1.01
  assert random["max_over_mean"] > 1.2
  assert balanced["cv"] < random["cv"] / 20
  assert balanced["normalized_entropy"] > random["normalized_entropy"]


def test_balanced_cannot_split_a_token_above_the_ideal_share():
  # The paper's caveat: one token with more than 1/E of the corpus sets the max load alone.
  counts = np.array([1000] + [10] * 99)
  out = hash_functions.build_table("balanced", num_experts=4, vocab_size=100,
                            token_counts=counts).load_stats(counts)
  assert out["max_over_mean"] == pytest.approx(1000 / (counts.sum() / 4))


def test_balanced_spreads_zero_count_tokens():
  counts = np.zeros(1003, dtype=np.int64)
  counts[:5] = [50, 40, 30, 20, 10]
  table = hash_functions.build_table("balanced", num_experts=8, vocab_size=1003, token_counts=counts)
  unseen = np.bincount(table.table[5:], minlength=8)
  assert unseen.max() - unseen.min() <= 1
  # Dealt in id order, round robin.
  np.testing.assert_array_equal(table.table[5:21], np.arange(16) % 8)


def test_balanced_errors():
  with pytest.raises(ValueError, match="token_counts"):
    hash_functions.build_table("balanced", num_experts=4, vocab_size=10)
  with pytest.raises(ValueError, match="shape"):
    hash_functions.build_table("balanced", num_experts=4, vocab_size=10, token_counts=np.ones(9))
  with pytest.raises(ValueError, match="finite"):
    hash_functions.build_table("balanced", num_experts=4, vocab_size=2, token_counts=np.array([1, np.nan]))
  with pytest.raises(ValueError, match="kind"):
    hash_functions.build_table("zipfy", num_experts=4, vocab_size=10)


# ------------------------------------------------------------------------------------------------
# Clustered and dispersed tables.


def blobs(sizes, dim=8, seed=0):
  """float32[sum(sizes), dim] well-separated Gaussian blobs in shuffled order, and their labels."""
  rng = np.random.default_rng(seed)
  centers = rng.standard_normal((len(sizes), dim)) * 50
  labels = np.repeat(np.arange(len(sizes)), sizes)
  labels = labels[rng.permutation(labels.size)]
  points = centers[labels] + rng.standard_normal((labels.size, dim))
  return points.astype(np.float32), labels


def test_clustered_gives_each_blob_one_expert():
  sizes = [30, 12, 45, 20, 8, 25]
  points, labels = blobs(sizes)
  table = hash_functions.build_table("clustered", num_experts=6, vocab_size=points.shape[0],
                              embeddings=points, seed=3)
  experts_of_blob = [set(table.table[labels == b].tolist()) for b in range(len(sizes))]
  assert all(len(s) == 1 for s in experts_of_blob)
  assert len(set.union(*experts_of_blob)) == len(sizes)
  # Canonical numbering: token 0's cluster is expert 0.
  assert table.table[0] == 0
  again = hash_functions.build_table("clustered", num_experts=6, vocab_size=points.shape[0],
                              embeddings=points, seed=3)
  assert again == table


def test_clustered_survives_empty_clusters():
  # Only 3 distinct embeddings for 8 clusters: k-means must leave clusters empty, not crash.
  points = np.repeat(np.eye(3, 4), [5, 6, 7], axis=0)
  table = hash_functions.build_table("clustered", num_experts=8, vocab_size=18, embeddings=points)
  assert len(set(table.table.tolist())) == 3
  for start, stop in [(0, 5), (5, 11), (11, 18)]:
    assert len(set(table.table[start:stop].tolist())) == 1
  # Fewer tokens than experts.
  small = hash_functions.build_table("clustered", num_experts=8, vocab_size=3, embeddings=np.eye(3))
  assert sorted(small.table.tolist()) == [0, 1, 2]
  with pytest.raises(ValueError, match="embeddings"):
    hash_functions.build_table("clustered", num_experts=8, vocab_size=3)
  with pytest.raises(ValueError, match="shape"):
    hash_functions.build_table("clustered", num_experts=8, vocab_size=3, embeddings=np.eye(4))


@pytest.mark.parametrize("with_counts", [False, True])
def test_dispersed_spreads_every_cluster_evenly(with_counts):
  sizes = [13, 20, 7, 24, 3]
  num_experts = 5
  points, labels = blobs(sizes, seed=1)
  vocab_size = points.shape[0]
  counts = zipf_counts(vocab_size, 6, scale=500) if with_counts else None
  table = hash_functions.build_table("dispersed", num_experts=num_experts, vocab_size=vocab_size,
                              embeddings=points, token_counts=counts, seed=2)
  for b, size in enumerate(sizes):
    per_expert = np.bincount(table.table[labels == b], minlength=num_experts)
    assert per_expert.max() - per_expert.min() <= 1, (b, per_expert)
    assert (per_expert > 0).sum() == min(size, num_experts)
  overall = np.bincount(table.table, minlength=num_experts)
  assert overall.max() - overall.min() <= 1
  if with_counts:
    # Within a cluster, the E most frequent tokens land on E different experts.
    for b in range(len(sizes)):
      members = np.flatnonzero(labels == b)
      top = members[np.argsort(-counts[members], kind="stable")[:num_experts]]
      assert len(set(table.table[top].tolist())) == len(top)


# ------------------------------------------------------------------------------------------------
# MultiHash.


def test_multihash_random_uses_consecutive_seeds():
  tables = hash_functions.build_multihash("random", 3, num_experts=8, vocab_size=100, seed=10)
  assert [t.seed for t in tables] == [10, 11, 12]
  for i, t in enumerate(tables):
    assert t == hash_functions.build_table("random", num_experts=8, vocab_size=100, seed=10 + i)


def mutual_information(a, b, num_experts):
  joint = np.zeros((num_experts, num_experts))
  np.add.at(joint, (a, b), 1)
  joint /= joint.sum()
  pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
  nz = joint > 0
  return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def test_multihash_balanced_is_independent_and_balanced():
  vocab_size, num_experts, num_hashes = 6000, 16, 4
  counts = zipf_counts(vocab_size, 7, exponent=1.0, zero_fraction=0.1)
  single = hash_functions.build_table("balanced", num_experts=num_experts, vocab_size=vocab_size,
                               token_counts=counts)
  assert hash_functions.build_multihash("balanced", 1, num_experts=num_experts, vocab_size=vocab_size,
                                 token_counts=counts) == (single,)
  tables = hash_functions.build_multihash("balanced", num_hashes, num_experts=num_experts,
                                   vocab_size=vocab_size, token_counts=counts, seed=3)
  assert tables == hash_functions.build_multihash("balanced", num_hashes, num_experts=num_experts,
                                           vocab_size=vocab_size, token_counts=counts, seed=3)
  mean_load = counts.sum() / num_experts
  slack = hash_functions.DEFAULT_BALANCE_SLACK
  single_max = single.load_stats(counts)["max_over_mean"]
  # Under independence the expert pair of a token is uniform over E^2 pairs; the plug-in mutual
  # information then has expectation ~(E-1)^2 / (2 V) nats. A relabelled copy of one hash has log E.
  mi_independent = (num_experts - 1) ** 2 / (2 * vocab_size)
  for i, t in enumerate(tables):
    assert t.kind == "balanced" and t.seed == 3 + i
    loads = expert_loads(t.table, counts, num_experts)
    assert loads.max() <= mean_load * (1 + slack) + counts.max()  # The documented bound.
    assert loads.max() / mean_load <= single_max + 2 * slack
    # Zero-count tokens are spread evenly over all experts.
    unseen = np.bincount(t.table[counts == 0], minlength=num_experts)
    assert unseen.max() - unseen.min() <= 1
    for u in tables[:i]:
      agree = np.mean(t.table == u.table)
      assert abs(agree - 1 / num_experts) < 0.025, agree
      assert mutual_information(t.table, u.table, num_experts) < 3 * mi_independent


def test_multihash_argument_errors():
  with pytest.raises(ValueError, match="num_hashes"):
    hash_functions.build_multihash("random", 0, num_experts=4, vocab_size=8)
  with pytest.raises(ValueError, match="token_counts"):
    hash_functions.build_multihash("balanced", 2, num_experts=4, vocab_size=8)
  with pytest.raises(ValueError, match="balance_slack"):
    hash_functions.build_multihash("balanced", 2, num_experts=4, vocab_size=8, token_counts=np.ones(8),
                            balance_slack=1.5)


def test_multihash_dispersed_tables_differ():
  points, _ = blobs([20, 20, 20, 20], seed=4)
  tables = hash_functions.build_multihash("dispersed", 2, num_experts=4, vocab_size=80, embeddings=points)
  assert np.mean(tables[0].table == tables[1].table) < 0.6


# ------------------------------------------------------------------------------------------------
# Hash-selected top-k.


def test_topk_matches_naive_greedy_and_is_distinct_and_balanced():
  vocab_size, num_experts, k = 400, 12, 3
  counts = zipf_counts(vocab_size, 8, exponent=0.7, scale=5000, zero_fraction=0.2)
  table = hash_functions.build_topk_table(k, num_experts=num_experts, vocab_size=vocab_size,
                                   token_counts=counts, vocab_fingerprint="")
  assert table.kind == hashing.TOPK_KIND and table.table.shape == (vocab_size, k) and table.k == k
  np.testing.assert_array_equal(table.table, naive_greedy(counts.tolist(), num_experts, k))
  assert all(len(set(row)) == k for row in table.table.tolist())
  assert table.load_stats(counts)["max_over_mean"] < 1.02
  k1 = hash_functions.build_topk_table(1, num_experts=num_experts, vocab_size=vocab_size,
                                token_counts=counts)
  balanced = hash_functions.build_table("balanced", num_experts=num_experts, vocab_size=vocab_size,
                                 token_counts=counts)
  np.testing.assert_array_equal(k1.table[:, 0], balanced.table)
  with pytest.raises(ValueError, match="k must be"):
    hash_functions.build_topk_table(13, num_experts=num_experts, vocab_size=vocab_size,
                             token_counts=counts)


# ------------------------------------------------------------------------------------------------
# Files.


def test_save_load_round_trip(tmp_path):
  fp = hashing.vocabulary_fingerprint([f"w{i}" for i in range(64)])
  for table in [
      hash_functions.build_table("random", num_experts=8, vocab_size=64, seed=5, vocab_fingerprint=fp),
      hash_functions.build_topk_table(2, num_experts=8, vocab_size=64, token_counts=np.arange(64), seed=1),
  ]:
    directory = tmp_path / table.kind
    directory.mkdir()
    path = directory / "table.hash"
    table.save(path)
    written = [p.name for p in directory.iterdir()]
    assert written == [path.name]  # One file, no temporary left behind.
    loaded = HashTable.load(path, vocab_size=64, vocab_fingerprint=table.vocab_fingerprint or None)
    assert loaded == table
    assert loaded.table.dtype == np.int32 and loaded.seed == table.seed
    assert HashTable.load(str(path)) == table


def test_load_rejects_another_vocabulary(tmp_path):
  fp = hashing.vocabulary_fingerprint(["a", "b", "c"])
  other = hashing.vocabulary_fingerprint(["a", "b", "d"])
  path = tmp_path / "t.npz"
  hash_functions.build_table("random", num_experts=2, vocab_size=3, vocab_fingerprint=fp).save(path)
  with pytest.raises(ValueError, match="vocab_size=3.*vocab_size=4"):
    HashTable.load(path, vocab_size=4)
  with pytest.raises(ValueError, match=other):
    HashTable.load(path, vocab_size=3, vocab_fingerprint=other)
  with pytest.raises(ValueError, match=other):
    HashTable.load(path, vocab_fingerprint=other)


def rewrite_npz(path, **entries):
  buffer = io.BytesIO()
  np.savez(buffer, **entries)
  path.write_bytes(buffer.getvalue())


def test_load_rejects_corrupt_and_malformed_files(tmp_path):
  table = hash_functions.build_table("random", num_experts=4, vocab_size=32, seed=0)
  good = tmp_path / "good.npz"
  table.save(good)
  data = good.read_bytes()
  metadata = json.loads(str(np.load(good)["metadata"]))

  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="truncated.npz"):
    HashTable.load(truncated)

  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip file at all")
  with pytest.raises(ValueError, match="corrupt"):
    HashTable.load(garbage)

  bad_range = np.full(32, 9, np.int32)
  cases = {
      "version": dict(table=table.table, metadata=json.dumps({**metadata, "format_version": 99})),
      "format": dict(table=table.table, metadata=json.dumps({**metadata, "format": "other"})),
      "checksum": dict(table=(table.table + 1) % 4, metadata=json.dumps(metadata)),
      "shape": dict(table=table.table[:16], metadata=json.dumps(metadata)),
      "not_json": dict(table=table.table, metadata="{oops"),
      "lacks": dict(table=table.table,
                    metadata=json.dumps({k: v for k, v in metadata.items() if k != "kind"})),
      "no_metadata": dict(table=table.table),
      "range": dict(table=bad_range, metadata=json.dumps(
          {**metadata, "table_sha256": hashlib.sha256(bad_range.tobytes()).hexdigest()})),
  }
  for name, entries in cases.items():
    path = tmp_path / f"{name}.npz"
    rewrite_npz(path, **entries)
    with pytest.raises(ValueError, match=f"{name}.npz"):
      HashTable.load(path)

  plain = tmp_path / "plain.npy"
  table.save_plain(plain)
  with pytest.raises(ValueError, match="single array"):
    HashTable.load(plain)
  with pytest.raises(ValueError, match="no such"):
    HashTable.load(tmp_path / "missing.npz")
  # A zip member with a bad CRC (flipped byte inside the stored table data).
  flipped = bytearray(data)
  with zipfile.ZipFile(io.BytesIO(data)) as z:
    offset = z.getinfo("table.npy").header_offset
  flipped[offset + 200] ^= 0xFF
  crc = tmp_path / "crc.npz"
  crc.write_bytes(bytes(flipped))
  with pytest.raises(ValueError, match="crc.npz"):
    HashTable.load(crc)


def test_save_plain_writes_bare_int32_npy(tmp_path):
  table = hash_functions.build_table("random", num_experts=8, vocab_size=30, seed=9)
  path = tmp_path / "table.bin"  # No .npy suffix gets appended.
  table.save_plain(path)
  loaded = np.load(path, allow_pickle=False)
  assert loaded.dtype == np.int32 and loaded.shape == (30,)
  np.testing.assert_array_equal(loaded, table.table)
  topk = hash_functions.build_topk_table(2, num_experts=8, vocab_size=30, token_counts=np.ones(30))
  topk.save_plain(tmp_path / "topk.npy")
  np.testing.assert_array_equal(np.load(tmp_path / "topk.npy"), topk.table)


# ------------------------------------------------------------------------------------------------
# Routing keys.


def reference_keys(key, token_ids, positions, segment_ids, targets, predicted, key_space):
  """Per-token python loop for every key."""
  batch, length = token_ids.shape
  out = np.zeros((batch, length), dtype=np.int64)
  for b in range(batch):
    for t in range(length):
      start = t == 0 or segment_ids[b, t] != segment_ids[b, t - 1] or positions[b, t] == 0
      prev = 0 if start else int(token_ids[b, t - 1])
      cur = int(token_ids[b, t])
      out[b, t] = {
          "token": cur,
          "prev_token": prev,
          "bigram": py_bigram(prev, cur, key_space),
          "position": positions[b, t],
          "oracle_future": targets[b, t],
          "predicted_future": predicted[b, t],
      }[key]
  return out


@pytest.fixture(scope="module")
def packed_batch():
  """Two packed rows: segments of lengths (4, 3, 5) and (6, 6), padding segment 0 at the end."""
  rng = np.random.default_rng(11)
  segment_ids = np.array([[1] * 4 + [2] * 3 + [3] * 5 + [0] * 2,
                          [1] * 6 + [2] * 6 + [0] * 2], dtype=np.int32)
  positions = np.zeros_like(segment_ids)
  for row in range(2):
    for t in range(1, segment_ids.shape[1]):
      same = segment_ids[row, t] == segment_ids[row, t - 1]
      positions[row, t] = positions[row, t - 1] + 1 if same else 0
  token_ids = rng.integers(1, 100, size=segment_ids.shape).astype(np.int32)
  targets = rng.integers(0, 100, size=segment_ids.shape).astype(np.int32)
  predicted = rng.integers(0, 100, size=segment_ids.shape).astype(np.int32)
  return dict(token_ids=token_ids, positions=positions, segment_ids=segment_ids, targets=targets,
              predicted_ids=predicted)


@pytest.mark.parametrize("key", hashing.KEYS)
def test_routing_keys_match_python_loop(key, packed_batch):
  key_space = hashing.key_space_size(key, vocab_size=100, max_positions=16)
  expected = reference_keys(key, packed_batch["token_ids"], packed_batch["positions"],
                            packed_batch["segment_ids"], packed_batch["targets"],
                            packed_batch["predicted_ids"], key_space)
  host = hashing.routing_keys(key, key_space=key_space, **packed_batch)
  assert isinstance(host, np.ndarray) and host.dtype == np.int32
  np.testing.assert_array_equal(host, expected)
  device = hashing.routing_keys(key, key_space=key_space,
                                **{k: jnp.asarray(v) for k, v in packed_batch.items()})
  assert isinstance(device, jax.Array)
  np.testing.assert_array_equal(device, expected)


def test_sequence_starts_matches_loop(packed_batch):
  segment_ids, positions = packed_batch["segment_ids"], packed_batch["positions"]
  # Positions restarting at 0 without a segment change (packing without segment ids) also count.
  positions = positions.copy()
  positions[0, 2] = 0
  starts = hashing.sequence_starts(packed_batch["token_ids"], positions=positions,
                                   segment_ids=jnp.asarray(segment_ids))
  expected = [[t == 0 or segment_ids[b, t] != segment_ids[b, t - 1] or positions[b, t] == 0
               for t in range(segment_ids.shape[1])] for b in range(2)]
  np.testing.assert_array_equal(starts, expected)


def test_lookup_clamps_traced_out_of_range_ids():
  # Documented: traced ids cannot be checked, so they clamp to a valid expert instead of failing.
  table = hash_functions.build_table("random", num_experts=4, vocab_size=10, seed=0)
  out = jax.jit(table.lookup)(jnp.array([-3, 12]))
  np.testing.assert_array_equal(out, [table.table[0], table.table[9]])


def test_routing_keys_segment_ids_alone_mark_boundaries(packed_batch):
  # Without positions, only column 0 and segment changes start a sequence.
  token_ids, segment_ids = packed_batch["token_ids"], packed_batch["segment_ids"]
  prev = hashing.routing_keys("prev_token", token_ids=token_ids, segment_ids=segment_ids,
                              key_space=100)
  for b in range(2):
    for t in range(token_ids.shape[1]):
      start = t == 0 or segment_ids[b, t] != segment_ids[b, t - 1]
      assert prev[b, t] == (0 if start else token_ids[b, t - 1])
  # With neither, it is a plain shift.
  plain = hashing.routing_keys("prev_token", token_ids=token_ids, key_space=100)
  np.testing.assert_array_equal(plain[:, 1:], token_ids[:, :-1])
  assert (plain[:, 0] == hashing.BOUNDARY_ID).all()
  positions = hashing.routing_keys("position", token_ids=token_ids, key_space=16)
  np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(14), (2, 14)))


def test_routing_keys_under_jit(packed_batch):
  @jax.jit
  def keys(batch):
    return {k: hashing.routing_keys(k, key_space=128, **batch) for k in hashing.KEYS}

  out = keys({k: jnp.asarray(v) for k, v in packed_batch.items()})
  for key in hashing.KEYS:
    expected = hashing.routing_keys(key, key_space=128, **packed_batch)
    np.testing.assert_array_equal(out[key], expected)


def test_routing_keys_errors(packed_batch):
  token_ids = packed_batch["token_ids"]
  with pytest.raises(ValueError, match="targets"):
    hashing.routing_keys("oracle_future", token_ids=token_ids, key_space=100)
  with pytest.raises(ValueError, match="predicted_ids"):
    hashing.routing_keys("predicted_future", token_ids=token_ids, key_space=100)
  with pytest.raises(ValueError, match="key must be one of"):
    hashing.routing_keys("trigram", token_ids=token_ids, key_space=100)
  with pytest.raises(ValueError, match="shape"):
    hashing.routing_keys("token", token_ids=token_ids[0], key_space=100)
  with pytest.raises(ValueError, match="segment_ids must have the shape"):
    hashing.routing_keys("bigram", token_ids=token_ids, segment_ids=token_ids[:, :3], key_space=100)
  with pytest.raises(ValueError, match="positions.*max=13.*vocab_size=8"):
    hashing.routing_keys("position", token_ids=token_ids, key_space=8)
  with pytest.raises(ValueError, match="key_space"):
    hashing.routing_keys("bigram", token_ids=token_ids, key_space=0)


def test_key_space_size():
  kw = dict(vocab_size=8000, max_positions=1024)
  assert hashing.key_space_size("token", **kw) == 8000
  assert hashing.key_space_size("prev_token", **kw) == 8000
  assert hashing.key_space_size("oracle_future", **kw) == 8000
  assert hashing.key_space_size("predicted_future", **kw) == 8000
  assert hashing.key_space_size("position", **kw) == 1024
  assert hashing.key_space_size("bigram", **kw) == 8000
  assert hashing.key_space_size("bigram", bigram_buckets=1 << 20, **kw) == 1 << 20
  with pytest.raises(ValueError):
    hashing.key_space_size("nope", **kw)


@pytest.mark.parametrize("key_space", [1 << 12, 8000])
def test_bigram_hash_is_well_mixed(key_space):
  num_experts = 16
  n = 16000
  # Sequential pairs (i, i+1): a weak hash maps them to runs of neighbouring ids.
  ids = np.arange(n + 1, dtype=np.int32)[None, :]
  keys = hashing.routing_keys("bigram", token_ids=ids, key_space=key_space)[0, 1:]
  np.testing.assert_array_equal(keys[:50], [py_bigram(i, i + 1, key_space) for i in range(50)])
  # Low bits (key % E, what a power-of-two key space exposes) and high bits both uniform.
  for buckets in (keys % num_experts, keys * num_experts // key_space):
    _, p = stats.chisquare(np.bincount(buckets, minlength=num_experts))
    assert p > 1e-4, p
  # Consecutive keys uncorrelated: the experts of neighbouring pairs are independent.
  joint = np.zeros((num_experts, num_experts))
  np.add.at(joint, (keys[:-1] % num_experts, keys[1:] % num_experts), 1)
  _, p = stats.chisquare(joint.ravel())
  assert p > 1e-4, p
  # Same current token, varying previous token (the case previous-token-blind hashes fail).
  prev = np.arange(n, dtype=np.int32)
  varied = hashing.bigram_hash(prev, np.full(n, 7, np.int32), key_space)
  _, p = stats.chisquare(np.bincount(varied % num_experts, minlength=num_experts))
  assert p > 1e-4, p
  assert varied.min() >= 0 and varied.max() < key_space


def test_check_token_ids_on_concrete_ids_captured_by_jit():
  # A concrete batch captured by a jitted function is still checkable (and must not be staged).
  bad = jnp.asarray([[1, 2, 99]], jnp.int32)

  @jax.jit
  def f(x):
    hashing.check_token_ids(bad, 10)
    return x

  with pytest.raises(ValueError, match="outside"):
    f(jnp.zeros(()))
