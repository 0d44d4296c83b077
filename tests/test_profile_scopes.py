"""The MoE layer's pieces carry `jax.named_scope` names, so a profile of a step shows them by name.

The reference is the lowered program itself: every scope must appear in the location metadata of the
StableHLO of a real training step (the names a TensorBoard/Perfetto trace shows for its ops).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hashmoe import hash_functions, models, routers
from hashmoe import sharding as sh

VOCAB, EXPERTS = 32, 4


def _scopes(lowered) -> set[str]:
  text = lowered.as_text(debug_info=True)
  # Locations read like loc("jit(f)/.../router/argmax"(...)); collect every path component.
  names = set()
  for path in re.findall(r'loc\("([^"]+)"', text):
    names.update(path.split("/"))
  return names


@pytest.mark.parametrize("router", [routers.Hash()], ids=lambda r: r.name)
def test_sparse_layer_scopes_in_lowered_train_step(router):
  counts = np.arange(1, VOCAB + 1)
  tables = None
  if router.uses_tables:
    table = hash_functions.build_table("balanced", num_experts=EXPERTS, vocab_size=VOCAB,
                                token_counts=counts)
    tables = {"default": (table,)}
  config = models.tiny_config(vocab_size=VOCAB, num_encoder_layers=0, sparse=models.SparseConfig(
      router=router, num_experts=EXPERTS, layers=(1,), dispatch="sorted"))
  model = models.DecoderLM(config, hash_tables=tables)
  batch = {"decoder_input_tokens": np.ones((2, 8), np.int32),
           "decoder_target_tokens": np.ones((2, 8), np.int32)}
  variables = model.init(jax.random.key(0), batch)

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, batch,
                            mutable=[models.MOE_COLLECTION])
    return jnp.mean(logits)

  names = _scopes(jax.jit(jax.grad(loss)).lower(variables["params"]))
  # ("router" is also the Flax module's name; the scope keeps it for routers named otherwise.)
  missing = {"router", "sort_by_expert", "permute", "grouped_matmul", "unpermute",
             "combine"} - names
  assert not missing, f"scopes missing from the lowered step: {missing}"


def test_expert_parallel_all_to_all_scope():
  rng = np.random.default_rng(0)
  tokens, d, ff, experts = 32, 8, 16, 4
  x = rng.normal(size=(tokens, d)).astype(np.float32)
  index = rng.integers(0, experts, size=(tokens, 1)).astype(np.int32)
  weight = np.ones((tokens, 1), np.float32)
  wi = rng.normal(size=(experts, d, ff)).astype(np.float32)
  wo = rng.normal(size=(experts, ff, d)).astype(np.float32)
  mesh = sh.make_mesh(2, 4, 1)
  for dropless in ("capacity", "ragged"):
    f = jax.jit(lambda *a, dropless=dropless: sh.expert_parallel_ffn(
        *a, activation="relu", mesh=mesh, dropless=dropless)[0])
    names = _scopes(f.lower(x, index, weight, wi, wo))
    assert {"all_to_all_dispatch", "all_to_all_return"} <= names, (dropless, names)
