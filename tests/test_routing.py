"""Tests for hashmoe.routing: each router against numpy closed forms, python loops and scipy."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from hashmoe import assignment, hash_functions
from hashmoe import expert_grouping, hashing
from hashmoe import routing
from hashmoe.routing import RouterFeatures

BATCH, LENGTH, D_MODEL, NUM_EXPERTS, VOCAB = 2, 12, 8, 4, 40
TOKENS = BATCH * LENGTH


def _data(seed=0, vocab=VOCAB):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(BATCH, LENGTH)).astype(np.int32)
  hidden = rng.normal(size=(TOKENS, D_MODEL)).astype(np.float32)
  return ids, hidden


def _np_softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _apply(module, variables, hidden, features, deterministic=True, **kw):
  return module.apply(variables, jnp.asarray(hidden), features, deterministic=deterministic, **kw)


# --------------------------------------------------------------------------------------------------
# Pure functions.


def test_routing_metrics_closed_form():
  index = np.array([[0, 1], [1, 1], [2, 0], [1, 3], [0, 0]], np.int32)
  weight = np.array([[1.0, 0.5], [0.0, 1.0], [0.3, 0.0], [1.0, 1.0], [0.2, 0.2]], np.float32)
  probs = _np_softmax(np.random.default_rng(0).normal(size=(5, 4)))
  m = routing.routing_metrics(jnp.asarray(index), jnp.asarray(weight), 4, jnp.asarray(probs))
  counts = np.zeros(4)
  for t in range(5):
    for j in range(2):
      if weight[t, j] != 0:
        counts[index[t, j]] += 1
  load = counts / counts.sum()
  np.testing.assert_allclose(m["expert_load"], load, rtol=1e-6)
  np.testing.assert_allclose(m["max_over_mean_load"], load.max() / load.mean(), rtol=1e-6)
  np.testing.assert_allclose(m["dropped_fraction"], 2 / 10, rtol=1e-6)
  entropy = np.mean([-sum(p * math.log(p) for p in row) for row in probs])
  np.testing.assert_allclose(m["router_entropy"], entropy, rtol=1e-5)
  np.testing.assert_allclose(m["router_confidence"], probs.max(-1).mean(), rtol=1e-6)
  assert all(v.dtype == jnp.float32 for v in m.values())

  # An explicit kept mask overrides the weights; one-hot probabilities have entropy 0 (0 log 0 = 0).
  kept = np.ones_like(weight, bool)
  m = routing.routing_metrics(jnp.asarray(index), jnp.asarray(weight), 4,
                              jnp.eye(4)[index[:, 0]], kept=jnp.asarray(kept))
  np.testing.assert_allclose(m["expert_load"], np.bincount(index.ravel(), minlength=4) / 10)
  assert float(m["dropped_fraction"]) == 0.0 and float(m["router_entropy"]) == 0.0
  # Nothing kept: zeros, not NaN.
  m = routing.routing_metrics(jnp.asarray(index), jnp.zeros(weight.shape), 4)
  assert float(m["max_over_mean_load"]) == 0.0 and float(m["dropped_fraction"]) == 1.0
  with pytest.raises(ValueError, match="tokens, H"):
    routing.routing_metrics(jnp.asarray(index), jnp.asarray(weight[:, :1]), 4)
  with pytest.raises(ValueError, match="router_probs"):
    routing.routing_metrics(jnp.asarray(index), jnp.asarray(weight), 4, jnp.ones((5, 3)) / 3)


def test_load_balancing_and_z_loss_closed_forms():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(10, 4)) * 3
  probs = _np_softmax(logits)
  top = probs.argmax(-1)
  f = np.array([(top == i).mean() for i in range(4)])
  p_mean = probs.mean(0)
  np.testing.assert_allclose(
      routing.load_balancing_loss(jnp.asarray(probs, jnp.float32), jnp.asarray(top)),
      4 * np.sum(f * p_mean), rtol=1e-5)
  # Perfect balance gives 1; everything on one expert with certainty gives E.
  np.testing.assert_allclose(
      routing.load_balancing_loss(jnp.full((8, 4), 0.25), jnp.arange(8) % 4), 1.0, rtol=1e-6)
  np.testing.assert_allclose(
      routing.load_balancing_loss(jnp.eye(4)[jnp.zeros(8, int)], jnp.zeros(8, int)), 4.0)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(routing.router_z_loss(jnp.asarray(logits, jnp.float32)),
                             np.mean(lse ** 2), rtol=1e-5)


def test_expert_capacity_and_capacity_mask():
  assert routing.expert_capacity(24, 4, 1.0) == 6
  assert routing.expert_capacity(24, 4, 1.25) == 8  # ceil(7.5)
  assert routing.expert_capacity(3, 8, 0.1) == 1  # at least 1
  with pytest.raises(ValueError, match="capacity_factor"):
    routing.expert_capacity(24, 4, 0.0)
  index = np.random.default_rng(2).integers(0, 3, size=30)
  seen, want = [0, 0, 0], []
  for e in index:  # GShard: first come, first served
    seen[e] += 1
    want.append(seen[e] <= 4)
  np.testing.assert_array_equal(routing.capacity_mask(jnp.asarray(index), 3, 4), want)


# --------------------------------------------------------------------------------------------------
# The auction.


def _replicated_optimum(scores, capacity):
  cost = np.repeat(np.asarray(scores, np.float64), capacity, axis=1)
  rows, cols = linear_sum_assignment(cost, maximize=True)
  return cost[rows, cols].sum()


@pytest.mark.parametrize("tokens,experts,seed", [(48, 4, 0), (64, 8, 1), (30, 3, 2)])
def test_balanced_assignment_vs_scipy(tokens, experts, seed):
  rng = np.random.default_rng(seed)
  # Expert-wide offsets make the unconstrained argmax badly unbalanced, so balance costs something.
  scores = rng.normal(size=(tokens, experts)) + 2 * rng.normal(size=(1, experts))
  scores = scores.astype(np.float32)
  result = jax.jit(routing.balanced_assignment)(jnp.asarray(scores))
  a = np.asarray(result.assignment)
  capacity = tokens // experts
  np.testing.assert_array_equal(np.bincount(a, minlength=experts), capacity)
  assert float(result.unassigned_fraction) == 0.0
  eps = float(result.epsilon)
  np.testing.assert_allclose(eps, 1e-3 * (scores.max() - scores.min()), rtol=1e-5)
  total = scores[np.arange(tokens), a].astype(np.float64).sum()
  optimum = _replicated_optimum(scores, capacity)
  assert optimum - tokens * eps - 1e-4 <= total <= optimum + 1e-4
  # The certificate behind the bound: ε-complementary slackness against the final prices.
  values = scores - np.asarray(result.prices)[None, :]
  assert np.all(values[np.arange(tokens), a] >= values.max(-1) - eps - 1e-5)


def test_balanced_assignment_degenerate_inputs():
  # All-equal scores and duplicated rows: any balanced assignment is optimal; it must stay balanced.
  for scores in (np.zeros((16, 4), np.float32),
                 np.tile(np.array([[3.0, 1.0, 0.0, -1.0]], np.float32), (16, 1))):
    a = np.asarray(assignment.balanced_assignment(jnp.asarray(scores)).assignment)
    np.testing.assert_array_equal(np.bincount(a, minlength=4), 4)
  # One expert: everything goes there.
  np.testing.assert_array_equal(
      assignment.balanced_assignment(jnp.ones((5, 1))).assignment, np.zeros(5))
  # A round budget too small to finish: the fallback still balances, and says it was needed.
  scores = np.tile(np.arange(4, dtype=np.float32)[None], (16, 1))
  result = assignment.balanced_assignment(jnp.asarray(scores), max_rounds=1)
  np.testing.assert_array_equal(np.bincount(np.asarray(result.assignment), minlength=4), 4)
  assert float(result.unassigned_fraction) > 0
  with pytest.raises(ValueError, match="divisible"):
    assignment.balanced_assignment(jnp.ones((10, 4)))


# --------------------------------------------------------------------------------------------------
# The template.


def test_router_checks_shapes():
  ids, hidden = _data()
  router = routing.HashRouter(NUM_EXPERTS, key_space=VOCAB)
  with pytest.raises(ValueError, match="24 tokens"):
    router.init(jax.random.key(0), jnp.asarray(hidden[:-1]), RouterFeatures(jnp.asarray(ids)),
                deterministic=True)
  with pytest.raises(ValueError, match="flattened"):
    router.init(jax.random.key(0), jnp.asarray(hidden).reshape(BATCH, LENGTH, -1),
                RouterFeatures(jnp.asarray(ids)), deterministic=True)
  with pytest.raises(ValueError, match="num_experts"):
    routing.HashRouter(0, key_space=VOCAB)


# --------------------------------------------------------------------------------------------------
# Hash routing.


def _prev_tokens_numpy(ids, segment_ids):
  """x_{t-1} within each packed sequence, BOUNDARY_ID at sequence starts: a plain loop."""
  prev = np.zeros_like(ids)
  for b in range(ids.shape[0]):
    for t in range(ids.shape[1]):
      start = t == 0 or segment_ids[b, t] != segment_ids[b, t - 1]
      prev[b, t] = hashing.BOUNDARY_ID if start else ids[b, t - 1]
  return prev


def test_hash_router_token_key_matches_numpy_gather():
  ids, hidden = _data()
  table = hash_functions.build_table("balanced", num_experts=NUM_EXPERTS, vocab_size=VOCAB,
                              token_counts=np.arange(1, VOCAB + 1))
  router = routing.HashRouter(NUM_EXPERTS, tables=(table,))
  features = RouterFeatures(jnp.asarray(ids))
  variables = router.init(jax.random.key(0), jnp.asarray(hidden), features, deterministic=False)
  assert set(variables) == {"hash_tables"}  # no params
  np.testing.assert_array_equal(variables["hash_tables"]["table"], table.table[None])
  out = jax.jit(lambda v, h, f: router.apply(v, h, f, deterministic=False))(
      variables, jnp.asarray(hidden), features)
  np.testing.assert_array_equal(out.expert_index, table.table[ids.reshape(-1)][:, None])
  np.testing.assert_array_equal(out.combine_weight, np.ones((TOKENS, 1)))
  assert out.expert_index.dtype == jnp.int32 and float(out.aux_loss) == 0.0
  load = np.bincount(table.table[ids.reshape(-1)], minlength=NUM_EXPERTS) / TOKENS
  np.testing.assert_allclose(out.metrics["expert_load"], load, rtol=1e-6)
  np.testing.assert_allclose(out.metrics["max_over_mean_load"], load.max() * NUM_EXPERTS, rtol=1e-6)
  assert float(out.metrics["dropped_fraction"]) == 0.0
  # Routing ignores the hidden state.
  out2 = router.apply(variables, jnp.asarray(hidden) * 3 + 1, features, deterministic=True)
  np.testing.assert_array_equal(out2.expert_index, out.expert_index)


@pytest.mark.parametrize("key", ["prev_token", "bigram"])
def test_multihash_with_context_keys_matches_numpy(key):
  ids, hidden = _data(seed=3)
  segment_ids = np.array([[1] * 5 + [2] * 7, [1] * 12], np.int32)
  tables = hash_functions.build_multihash("random", 2, num_experts=NUM_EXPERTS, vocab_size=VOCAB, seed=5)
  router = routing.HashRouter(NUM_EXPERTS, key=key, num_hashes=2, key_space=VOCAB, tables=tables)
  features = RouterFeatures(jnp.asarray(ids), segment_ids=jnp.asarray(segment_ids))
  variables = router.init(jax.random.key(0), jnp.asarray(hidden), features, deterministic=True)
  out = _apply(router, variables, hidden, features)
  prev = _prev_tokens_numpy(ids, segment_ids)
  keys = prev if key == "prev_token" else hashing.bigram_hash(prev, ids, VOCAB)
  np.testing.assert_array_equal(
      keys, hashing.routing_keys(key, token_ids=ids, segment_ids=segment_ids, key_space=VOCAB))
  want = np.stack([tables[0].table[keys.reshape(-1)], tables[1].table[keys.reshape(-1)]], axis=1)
  np.testing.assert_array_equal(out.expert_index, want)
  np.testing.assert_array_equal(out.combine_weight, np.ones((TOKENS, 2)))
  load = np.bincount(want.reshape(-1), minlength=NUM_EXPERTS) / want.size
  np.testing.assert_allclose(out.metrics["expert_load"], load, rtol=1e-6)


def test_hash_router_position_key_and_random_default_table():
  ids, hidden = _data()
  max_len = 16
  router = routing.HashRouter(NUM_EXPERTS, key="position", num_hashes=3, key_space=max_len, seed=7)
  features = RouterFeatures(jnp.asarray(ids))
  variables = router.init(jax.random.key(0), jnp.asarray(hidden), features, deterministic=True)
  table = np.asarray(variables["hash_tables"]["table"])
  assert table.shape == (3, max_len) and table.dtype == np.int32
  want_tables = hash_functions.build_multihash("random", 3, num_experts=NUM_EXPERTS, vocab_size=max_len,
                                        seed=7)
  np.testing.assert_array_equal(table, np.stack([t.table for t in want_tables]))
  assert len({tuple(row) for row in table}) == 3  # the hashes differ
  out = _apply(router, variables, hidden, features)
  positions = np.tile(np.arange(LENGTH), BATCH)
  np.testing.assert_array_equal(out.expert_index, table[:, positions].T)


def test_hash_router_rejects_bad_ids_and_tables():
  ids, hidden = _data()
  router = routing.HashRouter(NUM_EXPERTS, key_space=VOCAB)
  features = RouterFeatures(jnp.asarray(ids))
  variables = router.init(jax.random.key(0), jnp.asarray(hidden), features, deterministic=True)
  bad = ids.copy()
  bad[1, 3] = VOCAB + 2
  with pytest.raises(ValueError, match=str(VOCAB + 2)):
    _apply(router, variables, hidden, RouterFeatures(jnp.asarray(bad)))
  bad[1, 3] = -1
  with pytest.raises(ValueError, match=f"{VOCAB}"):
    _apply(router, variables, hidden, RouterFeatures(jnp.asarray(bad)))
  with pytest.raises(ValueError, match="out|outside"):
    routing.check_key_ids(jnp.asarray([0, 5, 41]), VOCAB, "token")
  routing.check_key_ids(jnp.asarray([0, 39]), VOCAB, "token")

  table = hash_functions.build_table("random", num_experts=NUM_EXPERTS, vocab_size=VOCAB)
  with pytest.raises(ValueError, match="num_experts=4.*num_experts=8"):
    routing.HashRouter(8, tables=(table,))
  with pytest.raises(ValueError, match="key_space=50.*vocab_size=40"):
    routing.HashRouter(NUM_EXPERTS, key_space=50, tables=(table,))
  with pytest.raises(ValueError, match="needs 2 tables"):
    routing.HashRouter(NUM_EXPERTS, num_hashes=2, tables=(table,))
  other = hash_functions.build_table("random", num_experts=NUM_EXPERTS, vocab_size=VOCAB + 1)
  with pytest.raises(ValueError, match="share one key space"):
    routing.HashRouter(NUM_EXPERTS, num_hashes=2, tables=(table, other))
  with pytest.raises(TypeError, match="single HashTable"):
    routing.HashRouter(NUM_EXPERTS, tables=table)
  topk = hash_functions.build_topk_table(2, num_experts=NUM_EXPERTS, vocab_size=VOCAB,
                                  token_counts=np.ones(VOCAB))
  with pytest.raises(ValueError, match="one expert per key"):
    routing.HashRouter(NUM_EXPERTS, tables=(topk,))
  with pytest.raises(ValueError, match="key_space"):
    routing.HashRouter(NUM_EXPERTS)
  with pytest.raises(ValueError, match="key must be one of"):
    routing.HashRouter(NUM_EXPERTS, key="next_token", key_space=VOCAB)
  # A restored table of the wrong shape is refused, not silently gathered from.
  wrong = {"hash_tables": {"table": jnp.zeros((1, VOCAB + 1), jnp.int32)}}
  with pytest.raises(ValueError, match="stored hash_tables/table"):
    _apply(router, wrong, hidden, features)


# --------------------------------------------------------------------------------------------------
# Hash-selected top-k.


def test_hash_topk_router_weights_are_softmax_over_selected_gate_logits():
  ids, hidden = _data(seed=4)
  counts = np.random.default_rng(0).integers(1, 100, size=VOCAB)
  table = hash_functions.build_topk_table(2, num_experts=NUM_EXPERTS, vocab_size=VOCAB,
                                   token_counts=counts)
  router = routing.HashTopKRouter(NUM_EXPERTS, 2, table=table)
  features = RouterFeatures(jnp.asarray(ids))
  variables = router.init(jax.random.key(0), jnp.asarray(hidden), features, deterministic=True)
  assert variables["hash_tables"]["table"].shape == (VOCAB, 2)
  w_gate = np.random.default_rng(1).normal(size=(D_MODEL, NUM_EXPERTS)).astype(np.float32)
  variables = {"hash_tables": variables["hash_tables"], "params": {"gate_kernel": w_gate}}
  out = jax.jit(lambda v, h, f: router.apply(v, h, f, deterministic=True))(
      variables, jnp.asarray(hidden), features)
  selected = table.table[ids.reshape(-1)]
  np.testing.assert_array_equal(out.expert_index, selected)
  logits = hidden.astype(np.float64) @ w_gate
  want = _np_softmax(np.take_along_axis(logits, selected, axis=1))
  np.testing.assert_allclose(out.combine_weight, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.sum(out.combine_weight, -1), 1.0, rtol=1e-6)
  assert float(out.aux_loss) == 0.0
  entropy = np.mean(-np.sum(want * np.log(want), -1))
  np.testing.assert_allclose(out.metrics["router_entropy"], entropy, rtol=1e-4)
  load = np.bincount(selected.reshape(-1), minlength=NUM_EXPERTS) / selected.size
  np.testing.assert_allclose(out.metrics["expert_load"], load, rtol=1e-6)

  # The gate learns only through the selected experts' columns.
  def loss(w):
    v = {"hash_tables": variables["hash_tables"], "params": {"gate_kernel": w}}
    r = router.apply(v, jnp.asarray(hidden), features, deterministic=True)
    return jnp.sum(r.combine_weight[:, 0])
  grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(w_gate)))
  unused = np.setdiff1d(np.arange(NUM_EXPERTS), selected)
  assert np.all(grad[:, unused] == 0) and np.any(grad != 0)


def test_hash_topk_router_default_table_and_mismatches():
  ids, hidden = _data()
  router = routing.HashTopKRouter(NUM_EXPERTS, 3, key_space=VOCAB, seed=3)
  variables = router.init(jax.random.key(0), jnp.asarray(hidden), RouterFeatures(jnp.asarray(ids)),
                          deterministic=True)
  table = np.asarray(variables["hash_tables"]["table"])
  assert table.shape == (VOCAB, 3)
  assert all(len(set(row)) == 3 for row in table) and table.min() >= 0
  assert table.max() < NUM_EXPERTS
  table2 = routing.HashTopKRouter(NUM_EXPERTS, 3, key_space=VOCAB, seed=3)._initial_table()
  np.testing.assert_array_equal(table, table2)  # fixed by the seed
  topk = hash_functions.build_topk_table(2, num_experts=NUM_EXPERTS, vocab_size=VOCAB,
                                  token_counts=np.ones(VOCAB))
  with pytest.raises(ValueError, match="k=3"):
    routing.HashTopKRouter(NUM_EXPERTS, 3, table=topk)
  with pytest.raises(ValueError, match="num_experts=4.*num_experts=6"):
    routing.HashTopKRouter(6, 2, table=topk)
  with pytest.raises(ValueError, match="key_space=41.*vocab_size=40"):
    routing.HashTopKRouter(NUM_EXPERTS, 2, key_space=VOCAB + 1, table=topk)
  with pytest.raises(ValueError, match="k must be"):
    routing.HashTopKRouter(NUM_EXPERTS, 5, key_space=VOCAB)


# --------------------------------------------------------------------------------------------------
# Switch.


def _switch_variables(router, hidden, features, kernel, embedding=None):
  variables = router.init({"params": jax.random.key(0), "jitter": jax.random.key(1)},
                          jnp.asarray(hidden), features, deterministic=True)
  params = {"kernel": jnp.asarray(kernel)}
  if embedding is not None:
    params["token_embedding"] = jnp.asarray(embedding)
  assert set(nn.unbox(variables["params"])) == set(params)
  return {"params": params}


def test_switch_router_matches_numpy_closed_forms():
  ids, hidden = _data(seed=5)
  kernel = np.random.default_rng(6).normal(size=(D_MODEL, NUM_EXPERTS)).astype(np.float32)
  router = routing.SwitchRouter(NUM_EXPERTS, balance_coef=0.05, z_loss_coef=1e-3)
  features = RouterFeatures(jnp.asarray(ids))
  variables = _switch_variables(router, hidden, features, kernel)
  # bfloat16 hidden states: the router still works in float32 on their values.
  h16 = jnp.asarray(hidden, jnp.bfloat16)
  out = jax.jit(lambda v, h, f: router.apply(v, h, f, deterministic=True))(variables, h16, features)
  logits = np.asarray(h16.astype(jnp.float32), np.float64) @ kernel
  probs = _np_softmax(logits)
  top = probs.argmax(-1)
  np.testing.assert_array_equal(out.expert_index[:, 0], top)
  np.testing.assert_allclose(out.combine_weight[:, 0], probs.max(-1), rtol=1e-5)
  assert out.combine_weight.dtype == jnp.float32
  f = np.bincount(top, minlength=NUM_EXPERTS) / TOKENS
  balance = NUM_EXPERTS * np.sum(f * probs.mean(0))
  z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
  np.testing.assert_allclose(out.metrics["balance_loss"], balance, rtol=1e-5)
  np.testing.assert_allclose(out.metrics["router_z_loss"], z, rtol=1e-5)
  np.testing.assert_allclose(out.aux_loss, 0.05 * balance + 1e-3 * z, rtol=1e-5)
  np.testing.assert_allclose(out.metrics["expert_load"], f, rtol=1e-6)
  np.testing.assert_allclose(out.metrics["router_entropy"],
                             np.mean(-np.sum(probs * np.log(probs), -1)), rtol=1e-5)
  assert float(out.metrics["dropped_fraction"]) == 0.0

  # The router learns through the gate value and the balance loss.
  def loss(k):
    r = router.apply({"params": {"kernel": k}}, jnp.asarray(hidden), features, deterministic=True)
    return jnp.sum(r.combine_weight) + r.aux_loss
  grad = jax.jit(jax.grad(loss))(jnp.asarray(kernel))
  assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0)


def test_switch_capacity_drops_like_a_python_loop():
  ids, hidden = _data(seed=7)
  # Skew routing towards expert 0 so that the capacity binds.
  kernel = np.random.default_rng(8).normal(size=(D_MODEL, NUM_EXPERTS)).astype(np.float32)
  hidden = hidden + 2.0 * kernel[:, 0][None, :] / np.linalg.norm(kernel[:, 0])
  router = routing.SwitchRouter(NUM_EXPERTS, capacity_factor=1.25)
  features = RouterFeatures(jnp.asarray(ids))
  out = _apply(router, _switch_variables(router, hidden, features, kernel), hidden, features)
  probs = _np_softmax(hidden.astype(np.float64) @ kernel)
  top = probs.argmax(-1)
  capacity = math.ceil(1.25 * TOKENS / NUM_EXPERTS)
  used, kept = [0] * NUM_EXPERTS, []
  for e in top:
    kept.append(used[e] < capacity)
    used[e] += 1
  kept = np.array(kept)
  assert not kept.all()  # the test exercises dropping
  np.testing.assert_array_equal(out.expert_index[:, 0], top)
  np.testing.assert_allclose(out.combine_weight[:, 0], np.where(kept, probs.max(-1), 0), rtol=1e-5)
  np.testing.assert_allclose(out.metrics["dropped_fraction"], 1 - kept.mean(), rtol=1e-6)
  load = np.bincount(top[kept], minlength=NUM_EXPERTS) / kept.sum()
  np.testing.assert_allclose(out.metrics["expert_load"], load, rtol=1e-6)
  # f_i of the balance loss counts the router's choice before dropping (Switch eq. 5).
  f = np.bincount(top, minlength=NUM_EXPERTS) / TOKENS
  np.testing.assert_allclose(out.metrics["balance_loss"],
                             NUM_EXPERTS * np.sum(f * probs.mean(0)), rtol=1e-5)


def test_token_based_switch_routes_on_the_token_embedding():
  ids, hidden = _data(seed=9)
  embed_dim = 6
  rng = np.random.default_rng(10)
  kernel = rng.normal(size=(embed_dim, NUM_EXPERTS)).astype(np.float32)
  embedding = rng.normal(size=(VOCAB, embed_dim)).astype(np.float32)
  router = routing.SwitchRouter(NUM_EXPERTS, token_based=True, vocab_size=VOCAB,
                                router_embed_dim=embed_dim)
  features = RouterFeatures(jnp.asarray(ids))
  variables = _switch_variables(router, hidden, features, kernel, embedding)
  run = jax.jit(lambda v, h, f: router.apply(v, h, f, deterministic=True))
  out = run(variables, jnp.asarray(hidden), features)
  probs = _np_softmax(embedding[ids.reshape(-1)].astype(np.float64) @ kernel)
  np.testing.assert_array_equal(out.expert_index[:, 0], probs.argmax(-1))
  np.testing.assert_allclose(out.combine_weight[:, 0], probs.max(-1), rtol=1e-5)
  # Changing the hidden states changes nothing.
  other = run(variables, jnp.asarray(np.random.default_rng(11).normal(size=hidden.shape),
                                     jnp.float32), features)
  np.testing.assert_array_equal(other.expert_index, out.expert_index)
  np.testing.assert_array_equal(other.combine_weight, out.combine_weight)
  # Changing a token changes its route: pick a replacement that the embedding sends elsewhere.
  token_expert = _np_softmax(embedding.astype(np.float64) @ kernel).argmax(-1)
  new_ids = ids.copy()
  new_ids[0, 0] = int(np.flatnonzero(token_expert != token_expert[ids[0, 0]])[0])
  moved = run(variables, jnp.asarray(hidden), RouterFeatures(jnp.asarray(new_ids)))
  assert int(moved.expert_index[0, 0]) == token_expert[new_ids[0, 0]] != int(out.expert_index[0, 0])
  np.testing.assert_array_equal(moved.expert_index[1:], out.expert_index[1:])
  with pytest.raises(ValueError, match="vocab_size"):
    routing.SwitchRouter(NUM_EXPERTS, token_based=True)
  bad = ids.copy()
  bad[0, 1] = VOCAB
  with pytest.raises(ValueError, match="outside"):
    _apply(router, variables, hidden, RouterFeatures(jnp.asarray(bad)))


def test_switch_jitter_only_in_training():
  ids, hidden = _data(seed=12)
  kernel = np.random.default_rng(13).normal(size=(D_MODEL, NUM_EXPERTS)).astype(np.float32)
  features = RouterFeatures(jnp.asarray(ids))
  plain = routing.SwitchRouter(NUM_EXPERTS)
  jittery = routing.SwitchRouter(NUM_EXPERTS, jitter=0.2)
  variables = _switch_variables(plain, hidden, features, kernel)
  reference = _apply(plain, variables, hidden, features, deterministic=False)
  # Evaluation: no noise, no rng needed.
  evaluated = _apply(jittery, variables, hidden, features, deterministic=True)
  np.testing.assert_array_equal(evaluated.combine_weight, reference.combine_weight)
  # Training: the noise changes the router probabilities.
  trained = _apply(jittery, variables, hidden, features, deterministic=False,
                   rngs={"jitter": jax.random.key(3)})
  assert not np.allclose(trained.combine_weight, reference.combine_weight)
  # With one nonzero coordinate per token, x · u scales that token's logits z_t by its u: recover
  # u from the top-1 probability (monotone in u) and check it is a multiplier in [0.8, 1.2].
  rng = np.random.default_rng(14)
  coord = rng.integers(0, D_MODEL, TOKENS)
  sparse_hidden = np.zeros_like(hidden)
  sparse_hidden[np.arange(TOKENS), coord] = rng.uniform(1, 3, TOKENS)
  p_top = np.asarray(_apply(jittery, variables, sparse_hidden, features, deterministic=False,
                            rngs={"jitter": jax.random.key(4)}).combine_weight[:, 0])
  z = sparse_hidden.astype(np.float64) @ kernel
  lo, hi = np.full(TOKENS, 0.5), np.full(TOKENS, 1.5)
  for _ in range(60):  # bisection on u
    mid = (lo + hi) / 2
    too_small = _np_softmax(mid[:, None] * z).max(-1) < p_top
    lo, hi = np.where(too_small, mid, lo), np.where(too_small, hi, mid)
  u = (lo + hi) / 2
  assert np.all(u >= 0.8 - 1e-3) and np.all(u <= 1.2 + 1e-3)
  assert u.std() > 0.02 and abs(u.mean() - 1) < 0.1
  with pytest.raises(Exception, match="jitter"):
    _apply(jittery, variables, hidden, features, deterministic=False)
  with pytest.raises(ValueError, match="jitter"):
    routing.SwitchRouter(NUM_EXPERTS, jitter=1.5)


# --------------------------------------------------------------------------------------------------
# BASE.


def test_base_router_training_is_a_balanced_optimal_assignment():
  ids, hidden = _data(seed=14)
  rng = np.random.default_rng(15)
  embedding = rng.normal(size=(NUM_EXPERTS, D_MODEL)).astype(np.float32)
  embedding[0] += 1.5 * hidden.mean(0)  # most tokens prefer expert 0: balance has a price
  router = routing.BaseRouter(NUM_EXPERTS)
  features = RouterFeatures(jnp.asarray(ids))
  variables = router.init(jax.random.key(0), jnp.asarray(hidden), features, deterministic=False)
  assert nn.unbox(variables["params"])["expert_embedding"].shape == (NUM_EXPERTS, D_MODEL)
  variables = {"params": {"expert_embedding": jnp.asarray(embedding)}}
  out = jax.jit(lambda v, h, f: router.apply(v, h, f, deterministic=False))(
      variables, jnp.asarray(hidden), features)
  scores = hidden.astype(np.float64) @ embedding.T
  assigned = np.asarray(out.expert_index[:, 0])
  capacity = TOKENS // NUM_EXPERTS
  np.testing.assert_array_equal(np.bincount(assigned, minlength=NUM_EXPERTS), capacity)
  np.testing.assert_allclose(out.metrics["expert_load"], 1 / NUM_EXPERTS)
  np.testing.assert_allclose(out.metrics["max_over_mean_load"], 1.0, rtol=1e-6)
  assert np.bincount(scores.argmax(-1), minlength=NUM_EXPERTS).max() > capacity
  total = scores[np.arange(TOKENS), assigned].sum()
  eps = 1e-3 * (scores.max() - scores.min())
  assert total >= _replicated_optimum(scores, capacity) - TOKENS * eps - 1e-3
  chosen = scores[np.arange(TOKENS), assigned]
  np.testing.assert_allclose(out.combine_weight[:, 0], 1 / (1 + np.exp(-chosen)), rtol=1e-5)
  assert float(out.aux_loss) == 0.0 and float(out.metrics["auction_unassigned_fraction"]) == 0.0
  assert float(out.metrics["auction_rounds"]) >= 1


def test_base_router_evaluation_is_greedy_and_gradients_flow_through_the_weight():
  ids, hidden = _data(seed=16)
  embedding = np.random.default_rng(17).normal(size=(NUM_EXPERTS, D_MODEL)).astype(np.float32)
  router = routing.BaseRouter(NUM_EXPERTS)
  features = RouterFeatures(jnp.asarray(ids))
  variables = {"params": {"expert_embedding": jnp.asarray(embedding)}}
  out = _apply(router, variables, hidden, features, deterministic=True)
  scores = hidden.astype(np.float64) @ embedding.T
  np.testing.assert_array_equal(out.expert_index[:, 0], scores.argmax(-1))
  np.testing.assert_allclose(out.combine_weight[:, 0], 1 / (1 + np.exp(-scores.max(-1))), rtol=1e-5)
  # Evaluation does not need tokens % E == 0; training does.
  odd = RouterFeatures(jnp.asarray(ids[:, :-1]))
  odd_hidden = hidden.reshape(BATCH, LENGTH, -1)[:, :-1].reshape(-1, D_MODEL)
  _apply(router, variables, odd_hidden, odd, deterministic=True)
  with pytest.raises(ValueError, match="not divisible"):
    _apply(router, variables, odd_hidden, odd, deterministic=False)

  # d/dw_e Σ_t σ(h_t·w_{a(t)}) = Σ_{t: a(t)=e} σ'(h_t·w_e) h_t: the assignment is held fixed.
  def loss(w):
    r = router.apply({"params": {"expert_embedding": w}}, jnp.asarray(hidden), features,
                     deterministic=False)
    return jnp.sum(r.combine_weight)
  grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(embedding)))
  assigned = np.asarray(_apply(router, variables, hidden, features,
                               deterministic=False).expert_index[:, 0])
  sig = 1 / (1 + np.exp(-scores[np.arange(TOKENS), assigned]))
  want = np.zeros_like(scores.T @ hidden)
  for t in range(TOKENS):
    want[assigned[t]] += sig[t] * (1 - sig[t]) * hidden[t]
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Precomputed routing travels from the features to the Routing.


def test_hash_router_passes_on_its_precomputed_routing():
  ids, hidden = _data(seed=6)
  tables = hash_functions.build_multihash("random", 2, num_experts=NUM_EXPERTS, vocab_size=VOCAB, seed=1)
  router = routing.HashRouter(NUM_EXPERTS, num_hashes=2, tables=tables)
  assert router.routing_signature() == expert_grouping.routing_signature("token", tables)
  mine = expert_grouping.precompute_routing(tables, ids)
  other_tables = hash_functions.build_multihash("random", 2, num_experts=NUM_EXPERTS, vocab_size=VOCAB,
                                         seed=9)
  other = expert_grouping.precompute_routing(other_tables, ids)
  precomputed = {router.routing_signature(): mine,
                 expert_grouping.routing_signature("token", other_tables): other}
  features = RouterFeatures(jnp.asarray(ids), sorted_assignments=precomputed)
  variables = router.init(jax.random.key(0), jnp.asarray(hidden), features, deterministic=True)
  out = jax.jit(lambda v, h, f: router.apply(v, h, f, deterministic=True))(
      variables, jnp.asarray(hidden), features)
  for got, want in zip(out.sorted_assignments, mine):
    np.testing.assert_array_equal(got, want)
  # Without an entry for its signature (or without any), the router passes nothing on.
  for entries in ({expert_grouping.routing_signature("token", other_tables): other}, None, {}):
    out = _apply(router, variables, hidden, RouterFeatures(jnp.asarray(ids),
                                                           sorted_assignments=entries))
    assert out.sorted_assignments is None


def test_default_tables_and_topk_routers_have_signatures():
  ids, hidden = _data(seed=7)
  router = routing.HashRouter(NUM_EXPERTS, key="prev_token", key_space=VOCAB, seed=3)
  want = hash_functions.build_multihash("random", 1, num_experts=NUM_EXPERTS, vocab_size=VOCAB, seed=3)
  assert router.routing_signature() == expert_grouping.routing_signature("prev_token", want)
  table = hash_functions.build_topk_table(2, num_experts=NUM_EXPERTS, vocab_size=VOCAB,
                                   token_counts=np.arange(1, VOCAB + 1))
  topk = routing.HashTopKRouter(NUM_EXPERTS, 2, table=table)
  assert topk.routing_signature() == expert_grouping.routing_signature("token", table)
  entry = expert_grouping.precompute_routing(table, ids)
  features = RouterFeatures(jnp.asarray(ids),
                            sorted_assignments={topk.routing_signature(): entry})
  variables = topk.init(jax.random.key(0), jnp.asarray(hidden), features, deterministic=True)
  out = _apply(topk, variables, hidden, features)
  np.testing.assert_array_equal(out.sorted_assignments.permutation, entry.permutation)
  default_topk = routing.HashTopKRouter(NUM_EXPERTS, 2, key_space=VOCAB, seed=4)
  v = default_topk.init(jax.random.key(0), jnp.asarray(hidden), RouterFeatures(jnp.asarray(ids)),
                        deterministic=True)
  stored = hashing.HashTable(kind=hashing.TOPK_KIND,
                             table=np.asarray(v["hash_tables"]["table"]),
                             num_experts=NUM_EXPERTS, vocab_size=VOCAB, seed=4)
  assert default_topk.routing_signature() == expert_grouping.routing_signature("token", stored)


def test_routing_metrics_count_only_the_masked_tokens():
  # Reference: the same metrics computed by numpy over the real tokens alone.
  rng = np.random.default_rng(11)
  tokens, experts = 40, 5
  expert_index = rng.integers(0, experts, size=(tokens, 1))
  kept = rng.random((tokens, 1)) > 0.2
  probs = rng.dirichlet(np.ones(experts), size=tokens)
  mask = rng.random(tokens) > 0.3
  metrics = routing.routing_metrics(jnp.asarray(expert_index), jnp.asarray(kept, jnp.float32),
                                    experts, jnp.asarray(probs), kept=jnp.asarray(kept),
                                    token_mask=jnp.asarray(mask))
  real_index, real_kept, real_probs = expert_index[mask], kept[mask], probs[mask]
  load = np.bincount(real_index[real_kept], minlength=experts) / real_kept.sum()
  np.testing.assert_allclose(metrics["expert_load"], load, rtol=1e-6)
  np.testing.assert_allclose(metrics["max_over_mean_load"], experts * load.max(), rtol=1e-6)
  np.testing.assert_allclose(metrics["dropped_fraction"], (~real_kept).mean(), rtol=1e-6)
  entropy = -np.sum(np.where(real_probs > 0, real_probs * np.log(real_probs), 0), axis=-1)
  np.testing.assert_allclose(metrics["router_entropy"], entropy.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["router_confidence"], real_probs.max(-1).mean(), rtol=1e-6)
  with pytest.raises(ValueError, match="token_mask"):
    routing.routing_metrics(jnp.asarray(expert_index), jnp.asarray(kept, jnp.float32), experts,
                            token_mask=jnp.ones(tokens + 1, bool))


def test_hash_router_load_leaves_out_padding():
  # Two real tokens (ids 3, 4) and six padding positions (id 0): the load is over the real ones.
  table = hash_functions.build_table("random", vocab_size=8, num_experts=4, seed=0)
  router = routing.HashRouter(4, tables=(table,))
  ids = jnp.asarray([[3, 4, 0, 0], [0, 0, 0, 0]], jnp.int32)
  valid = ids > 0
  features = routing.RouterFeatures(token_ids=ids, valid=valid)
  hidden = jnp.zeros((8, 2), jnp.float32)
  variables = router.init(jax.random.PRNGKey(0), hidden, features, deterministic=True)
  out = router.apply(variables, hidden, features, deterministic=True)
  expected = np.bincount(np.asarray(table.table)[[3, 4]], minlength=4) / 2
  np.testing.assert_allclose(out.metrics["expert_load"], expected)
