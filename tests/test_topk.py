"""Learned top-k routing, hash top-k gates, shared and fine-grained experts, per-layer routers.

The references share no code with the library: float64 numpy for the top-k router's selection,
weights, sequence-wise balance loss (DeepSeek-V3 eq. 17-20, a loop over rows), z-loss and bias
update (§2.1.2); numpy central finite differences for its gradient; a per-token numpy loop for the
mixture of many small experts and for the shared experts (N expert FFNs summed one by one); the
metrics' expert counts (another code path) for the trainer's bias update. Shapes are small and
fixed so that each jitted function compiles once.
"""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from hashmoe import experts as ex
from hashmoe import hashing, layers, models, routers, routing, sharding
from hashmoe.training import checkpoints as checkpoints_lib
from hashmoe.training import resume
from hashmoe.training import trainer as trainer_lib

pytestmark = pytest.mark.usefixtures("compilation_cache")

B, L, D, E, K = 2, 6, 5, 8, 3


# --------------------------------------------------------------------------------------------------
# Numpy references.


def np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def np_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def np_topk(h, w, bias, *, k, score, normalize, scale):
  """(selected int[T, k] in descending order of score + bias, weights [T, k], scores, logits)."""
  logits = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
  s = np_softmax(logits) if score == "softmax" else np_sigmoid(logits)
  order = np.argsort(-(s + np.asarray(bias, np.float64)), axis=-1, kind="stable")[:, :k]
  weights = np.take_along_axis(s, order, axis=-1)
  if normalize:
    weights = weights / weights.sum(axis=-1, keepdims=True)
  return order, weights * scale, s, logits


def np_seq_balance(s, selected, valid, rows, k):
  """DeepSeek-V3 eq. (17)-(20) per row, averaged over rows that have real tokens."""
  e = s.shape[-1]
  losses = []
  for r, (sr, selr, vr) in enumerate(zip(np.split(s, rows), np.split(selected, rows),
                                         np.split(valid, rows))):
    t = vr.sum()
    if t == 0:
      continue
    f = np.zeros(e)
    p = np.zeros(e)
    for tok in range(len(sr)):
      if not vr[tok]:
        continue
      for j in selr[tok]:
        f[j] += e / (k * t)
      p += sr[tok] / sr[tok].sum() / t
    losses.append(float(np.sum(f * p)))
  return float(np.mean(losses)) if losses else 0.0


def np_z_loss(logits, valid):
  m = logits.max(axis=-1)
  lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=-1))
  return float(np.sum(lse[valid] ** 2) / max(valid.sum(), 1))


def np_counts(selected, valid, e):
  counts = np.zeros(e)
  for t in range(selected.shape[0]):
    if valid[t]:
      for j in selected[t]:
        counts[j] += 1
  return counts


def data(seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(B * L, D)).astype(np.float32)
  w = rng.normal(size=(D, E)).astype(np.float32)
  bias = (rng.normal(size=E) * 0.2).astype(np.float32)
  valid = np.ones((B, L), bool)
  valid[1, 4:] = False  # padding at the end of row 1
  tokens = rng.integers(1, 50, (B, L)).astype(np.int32)
  return h, w, bias, valid, tokens


def router_call(router, w, bias, h, features, *, deterministic, mutable=False):
  variables = {"params": {"kernel": jnp.asarray(w)},
               routing.ROUTER_STATE: {routing.EXPERT_BIAS: jnp.asarray(bias)}}
  return router.apply(variables, jnp.asarray(h), features, deterministic=deterministic,
                      mutable=[routing.ROUTER_STATE] if mutable else False)


# --------------------------------------------------------------------------------------------------
# The learned top-k router.


@pytest.mark.parametrize("score,normalize,scale", [("sigmoid", True, 2.5), ("softmax", False, 1.0)])
def test_topk_router_values_and_losses_match_numpy(score, normalize, scale):
  h, w, bias, valid, tokens = data()
  router = routing.TopKRouter(E, k=K, score=score, normalize=normalize, route_scale=scale,
                              seq_balance_coef=0.3, z_loss_coef=0.01)
  features = routing.RouterFeatures(token_ids=jnp.asarray(tokens), valid=jnp.asarray(valid))
  r = router_call(router, w, bias, h, features, deterministic=True)
  sel, weights, s, logits = np_topk(h, w, bias, k=K, score=score, normalize=normalize,
                                    scale=scale)
  np.testing.assert_array_equal(np.asarray(r.expert_index), sel)
  np.testing.assert_allclose(np.asarray(r.combine_weight), weights, rtol=1e-5, atol=1e-6)
  flat_valid = valid.reshape(-1)
  balance = np_seq_balance(s, sel, flat_valid, B, K)
  z = np_z_loss(logits, flat_valid)
  np.testing.assert_allclose(float(r.metrics["balance_loss"]), balance, rtol=1e-5)
  np.testing.assert_allclose(float(r.metrics["router_z_loss"]), z, rtol=1e-5)
  np.testing.assert_allclose(float(r.aux_loss), 0.3 * balance + 0.01 * z, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(r.metrics["expert_counts"]), np_counts(sel, flat_valid, E))
  # The bias decided the selection: without it the choice differs for some token.
  unbiased, _, _, _ = np_topk(h, w, np.zeros(E), k=K, score=score, normalize=normalize,
                              scale=scale)
  assert (np.sort(unbiased, axis=-1) != np.sort(sel, axis=-1)).any()


def test_sequence_balance_loss_is_one_under_perfect_balance_and_skips_empty_rows():
  # Every expert selected equally often with uniform scores: f_i = 1, P_i = 1/E, loss = 1.
  selected = jnp.asarray([[0, 1], [2, 3]] * 2)  # k = 2 of 4 experts
  scores = jnp.full((4, 4), 0.3)
  assert float(routing.sequence_balance_loss(scores, selected, 2)) == pytest.approx(1.0)
  valid = jnp.asarray([True, True, False, False])  # row 1 is all padding: left out of the mean
  assert float(routing.sequence_balance_loss(scores, selected, 2, valid)) == pytest.approx(1.0)
  # Everything on experts 0 and 1 with all the score there: f = (2, 2, 0, 0), P = (.5, .5, 0, 0).
  skewed = jnp.asarray([[0.9, 0.9, 0.0, 0.0]] * 4)
  assert float(routing.sequence_balance_loss(skewed, jnp.asarray([[0, 1]] * 4), 2)) == \
      pytest.approx(2.0)


def test_topk_router_gradient_matches_finite_differences():
  h, w, bias, valid, tokens = data(1)
  r_out = np.random.default_rng(5).normal(size=(B * L, K))
  alpha, beta = 0.3, 0.01
  router = routing.TopKRouter(E, k=K, score="sigmoid", normalize=True, route_scale=1.5,
                              seq_balance_coef=alpha, z_loss_coef=beta)
  features = routing.RouterFeatures(token_ids=jnp.asarray(tokens), valid=jnp.asarray(valid))

  def loss(w_):
    r = router_call(router, w_, bias, h, features, deterministic=True)
    return jnp.sum(r.combine_weight * r_out) + r.aux_loss

  grad = np.asarray(jax.grad(loss)(jnp.asarray(w)))
  flat_valid = valid.reshape(-1)

  def np_loss(w_):
    sel, weights, s, logits = np_topk(h, w_, bias, k=K, score="sigmoid", normalize=True,
                                      scale=1.5)
    return (np.sum(weights * r_out) + alpha * np_seq_balance(s, sel, flat_valid, B, K)
            + beta * np_z_loss(logits, flat_valid))

  w64, eps = w.astype(np.float64), 1e-6
  expected = np.zeros_like(w64)
  for idx in np.ndindex(*w.shape):
    plus, minus = w64.copy(), w64.copy()
    plus[idx] += eps
    minus[idx] -= eps
    expected[idx] = (np_loss(plus) - np_loss(minus)) / (2 * eps)
  np.testing.assert_allclose(grad, expected, rtol=2e-3, atol=2e-4)


def test_bias_update_matches_numpy_and_only_training_changes_it():
  h, w, bias, valid, tokens = data(2)
  rate = 0.05
  router = routing.TopKRouter(E, k=K, bias_update_rate=rate)
  features = routing.RouterFeatures(token_ids=jnp.asarray(tokens), valid=jnp.asarray(valid))
  r, mutated = router_call(router, w, bias, h, features, deterministic=False, mutable=True)
  sel, _, _, _ = np_topk(h, w, bias, k=K, score="sigmoid", normalize=True, scale=1.0)
  counts = np_counts(sel, valid.reshape(-1), E)
  expected = bias + rate * np.sign(counts.mean() - counts)
  got = np.asarray(mutated[routing.ROUTER_STATE][routing.EXPERT_BIAS])
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert (got != bias).any()
  np.testing.assert_array_equal(np.asarray(r.expert_index), sel)  # selected with the old bias
  # Evaluation (deterministic) and a rate of 0 leave it as it is.
  _, same = router_call(router, w, bias, h, features, deterministic=True, mutable=True)
  np.testing.assert_array_equal(np.asarray(same[routing.ROUTER_STATE][routing.EXPERT_BIAS]), bias)
  off = routing.TopKRouter(E, k=K, bias_update_rate=0.0)
  _, same = router_call(off, w, bias, h, features, deterministic=False, mutable=True)
  np.testing.assert_array_equal(np.asarray(same[routing.ROUTER_STATE][routing.EXPERT_BIAS]), bias)
  np.testing.assert_array_equal(
      np.asarray(routing.expert_bias_update(jnp.zeros(3), jnp.asarray([1.0, 2.0, 3.0]), 0.5)),
      [0.5, 0.0, -0.5])


@pytest.mark.parametrize("gate", routing.HASH_TOPK_GATES)
@pytest.mark.parametrize("normalize", [False, True])
def test_hash_topk_gates_match_numpy(gate, normalize):
  rng = np.random.default_rng(3)
  vocab = 50
  table = np.stack([rng.permutation(E)[:K] for _ in range(vocab)]).astype(np.int32)
  ht = hashing.HashTable(kind=hashing.TOPK_KIND, table=table, num_experts=E, vocab_size=vocab)
  router = routing.HashTopKRouter(E, K, table=ht, gate=gate, normalize=normalize,
                                  route_scale=2.0)
  h, w, _, _, tokens = data(4)
  features = routing.RouterFeatures(token_ids=jnp.asarray(tokens))
  variables = router.init(jax.random.key(0), jnp.asarray(h), features, deterministic=True)
  variables = {**variables, "params": {"gate_kernel": jnp.asarray(w)}}
  r = router.apply(variables, jnp.asarray(h), features, deterministic=True)
  sel = table[tokens.reshape(-1)]
  z = np.take_along_axis(h.astype(np.float64) @ w, sel, axis=-1)
  want = {"softmax": np_softmax(z), "sigmoid": np_sigmoid(z), "softplus": np.log1p(np.exp(z)),
          "sqrt_softplus": np.sqrt(np.log1p(np.exp(z)))}[gate]
  if normalize:
    want = want / want.sum(axis=-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(r.expert_index), sel)
  np.testing.assert_allclose(np.asarray(r.combine_weight), 2.0 * want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Fine-grained and shared experts.


def np_moe(x, index, weight, wi, wo):
  y = np.zeros_like(x, dtype=np.float64)
  for t in range(x.shape[0]):
    for j in range(index.shape[1]):
      e = index[t, j]
      y[t] += weight[t, j] * (np.maximum(x[t] @ wi[e], 0.0) @ wo[e])
  return y


@pytest.mark.parametrize("dispatch", ["sorted", "pallas"])
def test_many_small_experts_through_the_dropless_kernels(dispatch):
  """64 experts of d_ff 32, k = 6 (fine-grained): the XLA:CPU dropless kernel and the Pallas
  kernel (interpreted on CPU) serve them unchanged."""
  rng = np.random.default_rng(6)
  tokens, d, e, f, k = 40, 16, 64, 32, 6
  x = rng.normal(size=(tokens, d)).astype(np.float32)
  wi = (rng.normal(size=(e, d, f)) / np.sqrt(d)).astype(np.float32)
  wo = (rng.normal(size=(e, f, d)) / np.sqrt(f)).astype(np.float32)
  index = np.stack([rng.permutation(e)[:k] for _ in range(tokens)]).astype(np.int32)
  weight = rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32)
  fn = jax.jit(lambda *a: ex.dispatch_fn(dispatch)(*a, activation=jax.nn.relu)[0])
  y = fn(x, index, weight, wi, wo)
  np.testing.assert_allclose(np.asarray(y), np_moe(x, index, weight, wi, wo), rtol=1e-4,
                             atol=1e-5)


def test_shared_experts_add_n_expert_ffns_to_the_routed_output():
  rng = np.random.default_rng(7)
  d, e, f, n, k = 8, 6, 4, 2, 2
  block = layers.SparseMlpBlock(
      router=routing.TopKRouter(e, k=k, score="softmax", normalize=False, parent=None),
      experts=ex.Experts(e, f, dispatch="sorted", parent=None),
      shared=layers.MlpBlock(n * f, parent=None))
  x = rng.normal(size=(B, L, d)).astype(np.float32)
  features = routing.RouterFeatures(token_ids=jnp.ones((B, L), jnp.int32))
  variables = block.init(jax.random.key(1), x, features, deterministic=True)
  params = nn.unbox(variables["params"])
  y = np.asarray(block.apply(variables, x, features, deterministic=True))
  flat = x.reshape(-1, d).astype(np.float64)
  sel, weights, _, _ = np_topk(flat, params["router"]["kernel"], np.zeros(e), k=k,
                               score="softmax", normalize=False, scale=1.0)
  routed = np_moe(flat, sel, weights, np.asarray(params["experts"]["wi"], np.float64),
                  np.asarray(params["experts"]["wo"], np.float64))
  wi, wo = (np.asarray(params["shared"][name], np.float64) for name in ("wi", "wo"))
  assert wi.shape == (d, n * f)
  shared = sum(np.maximum(flat @ wi[:, m * f:(m + 1) * f], 0.0) @ wo[m * f:(m + 1) * f]
               for m in range(n))
  np.testing.assert_allclose(y.reshape(-1, d), routed + shared, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Per-layer routers (DeepSeek-V4's layout) and a training step.

V = 64


def v4_config(**sparse_overrides):
  fields = dict(router=routers.FirstLayers(
      first=routers.HashTopK(topk=2, gate="sqrt_softplus", normalize=True), first_layers=2,
      rest=routers.TopK(topk=2, bias_update_rate=0.01, seq_balance_coef=0.001)),
      num_experts=8, layers=(0, 1, 2), expert_d_ff=8, num_shared_experts=1)
  fields.update(sparse_overrides)
  return models.tiny_config(V, num_encoder_layers=0, num_layers=3, max_len=16,
                            sparse=models.SparseConfig(**fields))


def test_first_layers_route_by_hash_and_the_rest_by_learned_top_k():
  config = v4_config()
  assert {k: v.name for k, v in models.layer_routers(config).items()} == {
      "decoder_0": "hash_topk", "decoder_1": "hash_topk", "decoder_2": "topk"}
  assert models.table_layer_names(config) == ["decoder_0", "decoder_1"]
  rng = np.random.default_rng(0)
  table = hashing.HashTable(kind=hashing.TOPK_KIND, num_experts=8, vocab_size=V,
                            table=np.stack([rng.permutation(8)[:2] for _ in range(V)]))
  model = models.build_model(config, {"default": (table,)})
  batch = {"decoder_input_tokens": np.ones((1, 8), np.int32)}
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))
  assert set(variables["hash_tables"]) == {"decoder_0", "decoder_1"}
  assert set(variables[routing.ROUTER_STATE]) == {"decoder_2"}
  for layer in ("decoder_0", "decoder_1", "decoder_2"):
    moe = variables["params"][layer]["moe"]
    assert moe["shared"]["wi"].value.shape == (32, 8)
    assert ("gate_kernel" if layer != "decoder_2" else "kernel") in moe["router"]
  with pytest.raises(ValueError, match=r"keys \['decoder_2'\] that name no sparse hash layer"):
    wrong = models.build_model(config, {"decoder_2": (table,)})
    jax.eval_shape(lambda: wrong.init(jax.random.key(0), batch))
  assert config.sparse.router.updates_state  # the learned layers' bias moves in training
  assert not routers.TopK(bias_update_rate=0.0).updates_state
  assert not routers.HashTopK().updates_state
  counts = models.param_counts(config)
  # Active: everything but 6 of the 8 routed experts in each of the 3 sparse layers.
  assert counts["total"] - counts["active"] == 3 * 6 * 2 * 32 * 8


def test_tables_and_host_routing_reach_only_the_hash_layers(tmp_path):
  """A run's table (built from counts by the trainer's own function) goes to the hash layers;
  the input pipeline routes exactly those on the host, with their table's columns."""
  from hashmoe import host_routing, tables
  config = v4_config(dispatch="sorted")
  counts = np.random.default_rng(1).integers(1, 100, V)
  built = tables.make_hash_tables(config, hashing.TOPK_KIND, out_path=tmp_path / "t.npz",
                                  key_counts=lambda: counts)
  assert len(built) == 1 and built[0].table.shape == (V, 2)
  model = models.build_model(config, {"default": built})
  batch = {"decoder_input_tokens": np.ones((1, 8), np.int32)}
  variables = model.init(jax.random.key(0), batch)
  for layer in ("decoder_0", "decoder_1"):
    np.testing.assert_array_equal(
        np.asarray(variables["hash_tables"][layer]["moe"]["router"]["table"]), built[0].table)
  plan = host_routing.plan(config, {"hash_tables": variables["hash_tables"]}, backend="cpu")
  assert [layer.path for layer in plan.layers] == ["decoder_0/moe/router", "decoder_1/moe/router"]
  np.testing.assert_array_equal(plan.layers[0].columns, built[0].table.T)


@pytest.fixture(scope="module")
def fsdp_trainer():
  config = v4_config()
  model = models.build_model(config)
  return trainer_lib.Trainer(config=config, model=model, tx=optax.sgd(0.1),
                             mesh=sharding.make_mesh(), rules=sharding.axis_rules(fsdp=True))


def test_train_step_updates_the_bias_outside_the_gradient_and_checkpoints_it(fsdp_trainer,
                                                                            tmp_path):
  trainer = fsdp_trainer
  bias_sharding = trainer.state_shardings.constants[routing.ROUTER_STATE]["decoder_2"]["moe"][
      "router"][routing.EXPERT_BIAS]
  assert bias_sharding.spec == P()  # replicated, under FSDP too
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, V, (8, 9)).astype(np.int32)
  tokens[3, 6:] = 0  # padding, left out of the loads
  batch = trainer.global_batch({"decoder_input_tokens": tokens[:, :-1],
                                "decoder_target_tokens": tokens[:, 1:]})

  def bias_of(s):
    return np.asarray(s.constants[routing.ROUTER_STATE]["decoder_2"]["moe"]["router"][
        routing.EXPERT_BIAS])

  biases = [bias_of(state)]
  np.testing.assert_array_equal(biases[0], np.zeros(8))
  for _ in range(2):
    state, metrics = trainer.train_step(state, batch)
    biases.append(bias_of(state))
    counts = np.asarray(metrics["moe"]["decoder_2"]["expert_counts"])
    assert counts.sum() == 2 * (tokens[:, 1:] > 0).sum()
    np.testing.assert_allclose(biases[-1], biases[-2] + 0.01 * np.sign(counts.mean() - counts),
                               atol=1e-7)
  assert (biases[-1] != 0).any()
  # Evaluation reads the bias and changes nothing.
  trainer.eval_step(state, batch)
  np.testing.assert_array_equal(bias_of(state), biases[-1])
  # The bias travels in checkpoints.
  ckpt = checkpoints_lib.Checkpointer(tmp_path / "checkpoints", async_save=False)
  ckpt.save(state, data_position=None, hash_metadata={}, config_text="")
  ckpt.wait()
  restored = ckpt.restore_latest(trainer.abstract_state)
  ckpt.close()
  np.testing.assert_array_equal(bias_of(restored.state), biases[-1])
  assert int(restored.state.step) == 2


def test_run_settings_of_per_layer_routers():
  def settings(config):
    return resume.run_settings(config, task="t", seq_len=8, batch_size=8, seed=0,
                               hash_tables=None, vocab_fingerprint="")
  base = settings(v4_config())
  json.dumps(base)  # JSON, as checkpoints record it
  assert base["routers.FirstLayers.first_layers"] == 2
  assert base["routers.FirstLayers.first.gate"] == "sqrt_softplus"
  assert base["SparseConfig.num_shared_experts"] == 1
  fewer = settings(v4_config(router=routers.FirstLayers(
      first=routers.HashTopK(topk=2, gate="sqrt_softplus", normalize=True), first_layers=1,
      rest=routers.TopK(topk=2, bias_update_rate=0.01, seq_balance_coef=0.001))))
  assert {k for k in base if base[k] != fewer.get(k)} == {"routers.FirstLayers.first_layers"}
  # The bias update rate and the balance coefficient may change on resume, like loss weights.
  retuned = settings(v4_config(router=routers.FirstLayers(
      first=routers.HashTopK(topk=2, gate="sqrt_softplus", normalize=True), first_layers=2,
      rest=routers.TopK(topk=2, bias_update_rate=0.1, seq_balance_coef=0.01))))
  assert retuned == base


# --------------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_names_the_setting():
  with pytest.raises(ValueError, match=r"TopK: topk must be in \[1, num_experts=4\], got 5"):
    models.SparseConfig(router=routers.TopK(topk=5), num_experts=4, layers=(0,))
  with pytest.raises(ValueError, match=r"HashTopK: topk must be in \[1, num_experts=4\], got 5"):
    models.SparseConfig(router=routers.FirstLayers(first=routers.HashTopK(topk=5),
                                                   rest=routers.TopK(topk=5)),
                        num_experts=4, layers=(0, 1))
  with pytest.raises(ValueError, match="bias_update_rate must be >= 0"):
    routers.TopK(bias_update_rate=-0.001)
  with pytest.raises(ValueError, match="bias_update_rate must be >= 0"):
    routing.TopKRouter(4, k=2, bias_update_rate=-1.0)
  with pytest.raises(ValueError, match="score must be one of"):
    routers.TopK(score="relu")
  with pytest.raises(ValueError, match="gate must be one of"):
    routers.HashTopK(gate="tanh")
  with pytest.raises(ValueError, match=r"first_layers=3 but the model has only 2 sparse layer"):
    models.SparseConfig(router=routers.FirstLayers(first_layers=3), layers=(0, 1))
  with pytest.raises(ValueError, match="first gives experts_per_token=2 but rest gives 3"):
    routers.FirstLayers(first=routers.HashTopK(topk=2), rest=routers.TopK(topk=3))
  with pytest.raises(ValueError, match="both use hash tables"):
    routers.FirstLayers(first=routers.HashTopK(), rest=routers.Hash())
  with pytest.raises(ValueError, match="num_shared_experts must be an int >= 0"):
    models.SparseConfig(layers=(0,), num_shared_experts=-1)
  # Tables: k not matching, repeated experts in a row, another vocabulary.
  table = np.asarray([[0, 1], [2, 3], [1, 2]], np.int32)
  ht = hashing.HashTable(kind=hashing.TOPK_KIND, table=table, num_experts=4, vocab_size=3)
  with pytest.raises(ValueError, match=r"expected a top-k table \[vocab_size, k=3\]"):
    routing.HashTopKRouter(4, 3, table=ht)
  with pytest.raises(ValueError, match=r"rows must hold k distinct experts; 1 rows repeat one, "
                     r"e.g. id 1: \[2, 2\]"):
    hashing.HashTable(kind=hashing.TOPK_KIND, table=np.asarray([[0, 1], [2, 2], [1, 2]]),
                      num_experts=4, vocab_size=3)
  with pytest.raises(ValueError, match=r"covers 3 key ids, but the model's key 'token' has 64 "
                     r"\(vocab_size=64\): a table built for another vocabulary"):
    routers.HashTopK(topk=2).build(num_experts=4, vocab_size=64, max_len=16,
                                   capacity_factor=None, tables=(ht,), ordinal=0)


def test_bias_update_is_the_same_under_remat():
  """A rematerialised layer (nn.remat, recomputed in the backward pass) writes the same next bias
  as an unrematerialised one, from the same forward pass."""
  rng = np.random.default_rng(2)
  tokens = rng.integers(1, V, (2, 9)).astype(np.int32)
  batch = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:]}
  results = []
  for policy in ("none", "full"):
    config = models.tiny_config(V, num_encoder_layers=0, max_len=16, remat_policy=policy,
                                sparse=models.SparseConfig(
                                    router=routers.TopK(topk=2, bias_update_rate=0.1),
                                    num_experts=4, layers=(1,)))
    model = models.build_model(config)
    variables = model.init(jax.random.key(0), batch)

    def loss(params, model=model, variables=variables):
      logits, mutated = model.apply({**variables, "params": params}, batch, deterministic=False,
                                    mutable=["moe", routing.ROUTER_STATE])
      return jnp.sum(logits), mutated[routing.ROUTER_STATE]

    (value, state), _ = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    results.append((float(value), np.asarray(
        state["decoder_1"]["moe"]["router"][routing.EXPERT_BIAS])))
  assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
  np.testing.assert_array_equal(results[0][1], results[1][1])
  assert (results[0][1] != 0).any()
