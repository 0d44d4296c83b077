"""Every router reports per-expert counts over the real tokens (`expert_counts`, `assignments`).

Reference: a numpy count of the expert ids each router returned, over the assignments of
non-padding tokens that reached their expert (weight != 0: a capacity limit zeroes a dropped
one's), which is what `hashmoe compare` measured itself before the routers reported it. Capacity
drops are checked against a python loop, so the kept mask is not only the router's own word.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hashmoe import hash_functions, routing
from hashmoe.routing import RouterFeatures

BATCH, LENGTH, D_MODEL, NUM_EXPERTS, VOCAB = 2, 12, 8, 4, 40
TOKENS = BATCH * LENGTH


def _routers():
  counts = np.random.default_rng(0).integers(1, 100, size=VOCAB)
  table = hash_functions.build_table("balanced", vocab_size=VOCAB, num_experts=NUM_EXPERTS,
                              token_counts=counts)
  multihash = hash_functions.build_multihash("random", 2, num_experts=NUM_EXPERTS, vocab_size=VOCAB,
                                      seed=5)
  topk = hash_functions.build_topk_table(2, num_experts=NUM_EXPERTS, vocab_size=VOCAB,
                                  token_counts=counts)
  return {
      "hash": (routing.HashRouter(NUM_EXPERTS, tables=(table,)), True),
      "multihash": (routing.HashRouter(NUM_EXPERTS, num_hashes=2, key_space=VOCAB,
                                       tables=multihash), True),
      "hash_topk": (routing.HashTopKRouter(NUM_EXPERTS, 2, table=topk), True),
      # A capacity of 1.0 with a skewed router drops tokens (checked below).
      "switch": (routing.SwitchRouter(NUM_EXPERTS, capacity_factor=1.0), True),
      "token_switch": (routing.SwitchRouter(NUM_EXPERTS, token_based=True, vocab_size=VOCAB),
                       True),
      "base_train": (routing.BaseRouter(NUM_EXPERTS), False),
      "base_eval": (routing.BaseRouter(NUM_EXPERTS), True),
  }


def _batch(seed):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, VOCAB, size=(BATCH, LENGTH)).astype(np.int32)
  # Packed rows end in padding (id 0): 9 and 5 real tokens.
  valid = np.arange(LENGTH)[None, :] < np.array([[9], [5]])
  ids = np.where(valid, ids, 0).astype(np.int32)
  hidden = rng.normal(size=(TOKENS, D_MODEL)).astype(np.float32)
  hidden[:, 0] += 3.0  # a shared direction, so that learned routers prefer some experts
  return ids, valid, hidden


@pytest.mark.parametrize("name", sorted(_routers()))
def test_expert_counts_are_a_numpy_count_over_real_tokens(name):
  router, deterministic = _routers()[name]
  ids, valid, hidden = _batch(seed=len(name))
  features = RouterFeatures(jnp.asarray(ids), valid=jnp.asarray(valid))
  rngs = {"params": jax.random.key(0), "jitter": jax.random.key(1)}
  variables = router.init(rngs, jnp.asarray(hidden), features, deterministic=deterministic)
  out = jax.jit(lambda v, h, f: router.apply(v, h, f, deterministic=deterministic))(
      variables, jnp.asarray(hidden), features)
  index = np.asarray(out.expert_index)  # [tokens, H]
  real = valid.reshape(-1)[:, None] & (np.asarray(out.combine_weight) != 0)
  expected = np.bincount(index[real], minlength=NUM_EXPERTS)
  np.testing.assert_array_equal(np.asarray(out.metrics["expert_counts"]), expected)
  assert out.metrics["expert_counts"].dtype == jnp.float32
  assert float(out.metrics["assignments"]) == valid.sum() * index.shape[1]
  # The shares and the dropped fraction are these counts normalised.
  np.testing.assert_allclose(out.metrics["expert_load"], expected / expected.sum(), rtol=1e-6)
  np.testing.assert_allclose(out.metrics["dropped_fraction"],
                             1 - expected.sum() / (valid.sum() * index.shape[1]), rtol=1e-6)


def test_switch_counts_leave_out_what_the_capacity_dropped():
  router, _ = _routers()["switch"]
  ids, valid, hidden = _batch(seed=6)
  features = RouterFeatures(jnp.asarray(ids), valid=jnp.asarray(valid))
  variables = router.init(jax.random.key(0), jnp.asarray(hidden), features, deterministic=True)
  out = router.apply(variables, jnp.asarray(hidden), features, deterministic=True)
  top = np.asarray(out.expert_index[:, 0])
  # Capacity is first come, first served over every position, padding included.
  capacity = math.ceil(1.0 * TOKENS / NUM_EXPERTS)
  used, kept = [0] * NUM_EXPERTS, []
  for e in top:
    kept.append(used[e] < capacity)
    used[e] += 1
  kept = np.array(kept) & valid.reshape(-1)
  assert kept.sum() < valid.sum()  # the test exercises dropping
  np.testing.assert_array_equal(np.asarray(out.metrics["expert_counts"]),
                                np.bincount(top[kept], minlength=NUM_EXPERTS))
