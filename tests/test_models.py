"""Tests for hashmoe.layers and hashmoe.models.

References are independent of the code under test: a float64 numpy transformer written from the
paper's equations with per-position loops for the masks, hand-counted parameter totals, and
semantic properties (causality, packing equals separate rows). Shapes are tiny (d=32, V=64, E=4)
and models run eagerly on a few shared shapes so that compiled kernels are reused.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hashmoe import hash_functions
from hashmoe import layers
from hashmoe import models as M
from hashmoe import routers
from hashmoe.layers import MOE_COLLECTION
from hashmoe.routing import RouterFeatures, Routing

V, D_MODEL, D_FF, HEADS, HEAD_DIM, MAX_LEN, E = 64, 32, 64, 2, 16, 64, 4
# "unmodeled" is what hashmoe.routing names the tiny replicated router axes.
LOGICAL_NAMES = {"vocab", "embed", "mlp", "heads", "kv", "expert", "batch", "length",
                 "unmodeled", None}


def tiny(num_encoder_layers=0, sparse=None, **overrides):
  return M.tiny_config(vocab_size=V, num_encoder_layers=num_encoder_layers, sparse=sparse,
                       **overrides)


# The routers the tests name, as the configs a model takes.
ROUTER_CONFIGS = {"hash": routers.Hash(), "multihash": routers.Hash(num_hashes=2),
                  "switch": routers.Switch(), "token_switch": routers.TokenSwitch(),
                  "base": routers.Base(), "hash_topk": routers.HashTopK(topk=2)}


def sparse(router, layers=(1,), encoder_layers=(), **kw):
  """A SparseConfig with E experts; `router` a name of ROUTER_CONFIGS or a router config."""
  router = ROUTER_CONFIGS.get(router, router)
  return M.SparseConfig(router=router, num_experts=E, layers=layers,
                        encoder_layers=encoder_layers, **kw)


def random_batch(seed, batch=2, length=8, enc_length=None):
  rng = np.random.default_rng(seed)
  out = {"decoder_input_tokens": rng.integers(1, V, (batch, length)).astype(np.int32),
         "decoder_target_tokens": rng.integers(1, V, (batch, length)).astype(np.int32)}
  out["decoder_input_tokens"][:, 0] = 0  # seqio's BOS
  if enc_length:
    out["encoder_input_tokens"] = rng.integers(1, V, (batch, enc_length)).astype(np.int32)
  return out


# Models run eagerly: with every test on the same few shapes (batch 2, length 8), op-by-op
# execution reuses each primitive's compiled kernel across tests, which costs far less CPU than
# compiling a whole program per configuration.


def init(model, batch, seed=0):
  return model.init(jax.random.key(seed), batch)


def run(model, variables, batch):
  """(logits, aux_total, metrics)."""
  logits, state = model.apply(variables, batch, mutable=[MOE_COLLECTION])
  aux, metrics = M.collect_aux(state)
  return np.asarray(logits), float(aux), metrics


# --------------------------------------------------------------------------------------------------
# A float64 numpy reference transformer, written from the equations.


def _ln(x, p, eps=1e-6):
  if "bias" not in p:  # RMSNorm: no centring, no bias
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * p["scale"]
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _positions(p, name, length, config):
  if config.position_embedding == "learned":
    return p[name]["embedding"][:length]
  # Vaswani et al.: PE[t, i] = sin(t / 10000^(i / (d/2))), PE[t, d/2 + i] = cos(same).
  half = config.d_model // 2
  out = np.zeros((length, config.d_model))
  for t in range(length):
    for i in range(half):
      out[t, i] = np.sin(t / 10000 ** (i / half))
      out[t, half + i] = np.cos(t / 10000 ** (i / half))
  return out


def _attend(xq, xkv, p, allowed):
  """xq: [lq, d], xkv: [lk, d], allowed[i][j] a python bool per pair."""
  q = np.einsum("ld,dhk->hlk", xq, p["query"]) / np.sqrt(p["query"].shape[-1])
  k = np.einsum("ld,dhk->hlk", xkv, p["key"])
  v = np.einsum("ld,dhk->hlk", xkv, p["value"])
  out = np.zeros_like(q)
  for h in range(q.shape[0]):
    for i in range(q.shape[1]):
      js = [j for j in range(k.shape[1]) if allowed(i, j)]
      if not js:  # a padding query with nothing to see; its output is never compared
        continue
      s = np.array([q[h, i] @ k[h, j] for j in js])
      w = np.exp(s - s.max())
      w /= w.sum()
      out[h, i] = sum(wj * v[h, j] for wj, j in zip(w, js))
  return np.einsum("hlk,hkd->ld", out, p["out"])


def _relu_ffn(x, wi, wo):
  return np.maximum(x @ wi, 0.0) @ wo


def _np_layer(x, p, allowed, hash_experts=None, enc=None, cross_allowed=None):
  x = x + _attend(_ln(x, p["pre_self_attention_norm"]), _ln(x, p["pre_self_attention_norm"]),
                  p["self_attention"], allowed)
  if enc is not None:
    h = _ln(x, p["pre_cross_attention_norm"])
    x = x + _attend(h, enc, p["encoder_decoder_attention"], cross_allowed)
  h = _ln(x, p["pre_mlp_norm"])
  if hash_experts is None:
    return x + _relu_ffn(h, p["mlp"]["wi"], p["mlp"]["wo"])
  # Hash layer (paper Section 3): token t goes to exactly one expert, table[x_t], weight 1.
  experts = p["moe"]["experts"]
  y = np.stack([_relu_ffn(h[t], experts["wi"][e], experts["wo"][e])
                for t, e in enumerate(hash_experts)])
  return x + y


def np_forward(params, config, batch, tables=None):
  """Reference logits float64[batch, length, V] for dense configs and token-key hash layers.

  `tables`: {layer_name: int[V] expert per token}.
  """
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(params))
  tables = tables or {}
  emb = p["token_embedder"]["embedding"]
  dec = batch["decoder_input_tokens"]
  tgt = batch["decoder_target_tokens"]
  out = []
  for b in range(dec.shape[0]):
    enc_out, enc_valid = None, None
    if config.num_encoder_layers:
      etok = batch["encoder_input_tokens"][b]
      enc_valid = etok > 0
      x = emb[etok] + _positions(p, "encoder_position_embedder", len(etok), config)
      for i in range(config.num_encoder_layers):
        name = f"encoder_{i}"
        x = _np_layer(x, p[name], lambda q, k: enc_valid[q] and enc_valid[k],
                      tables[name][etok] if name in tables else None)
      enc_out = _ln(x, p["encoder_norm"])
    valid = tgt[b] > 0
    pos_name = "decoder_position_embedder" if config.num_encoder_layers else "position_embedder"
    x = emb[dec[b]] + _positions(p, pos_name, dec.shape[1], config)
    for i in range(config.num_layers):
      name = f"decoder_{i}"
      x = _np_layer(x, p[name], lambda q, k: k <= q and valid[q] and valid[k],
                    tables[name][dec[b]] if name in tables else None, enc_out,
                    None if enc_out is None else (lambda q, k: valid[q] and enc_valid[k]))
    x = _ln(x, p["decoder_norm"])
    if config.share_embeddings:
      out.append(x @ emb.T / np.sqrt(config.d_model))
    else:
      out.append(x @ p["logits_kernel"])
  return np.stack(out)


# --------------------------------------------------------------------------------------------------
# Numerics against the reference.


@pytest.mark.parametrize("num_encoder_layers,share,norm,positions", [
    (0, True, "layernorm", "learned"), (2, False, "layernorm", "learned"),
    (0, False, "rmsnorm", "sinusoidal")])
def test_dense_matches_numpy_reference(num_encoder_layers, share, norm, positions):
  cfg = tiny(num_encoder_layers, share_embeddings=share, norm=norm, position_embedding=positions)
  batch = random_batch(0, enc_length=8 if num_encoder_layers else None)
  batch["decoder_target_tokens"][1, 6:] = 0  # padding at the end of row 1
  if num_encoder_layers:
    batch["encoder_input_tokens"][0, 7:] = 0
  model = M.build_model(cfg)
  variables = init(model, batch)
  logits, aux, metrics = run(model, variables, batch)
  ref = np_forward(variables["params"], cfg, batch)
  valid = batch["decoder_target_tokens"] > 0
  np.testing.assert_allclose(logits[valid], ref[valid], atol=2e-4, rtol=2e-4)
  assert logits.dtype == np.float32 and aux == 0.0 and metrics == {}


@pytest.mark.parametrize("num_encoder_layers", [0, 2])
def test_hash_layer_matches_numpy_per_token_loop(num_encoder_layers):
  """Given tables, each token's FFN is expert table[x_t] (encoder keys: encoder tokens)."""
  enc_layers = (0,) if num_encoder_layers else ()
  cfg = tiny(num_encoder_layers, sparse(("hash"), layers=(1,), encoder_layers=enc_layers))
  tables = {"decoder_1": hash_functions.build_table("random", num_experts=E, vocab_size=V, seed=1)}
  if num_encoder_layers:
    tables["encoder_0"] = hash_functions.build_table("random", num_experts=E, vocab_size=V, seed=2)
  batch = random_batch(1, enc_length=8 if num_encoder_layers else None)
  model = M.build_model(cfg, {k: (t,) for k, t in tables.items()})
  variables = init(model, batch)
  logits, aux, metrics = run(model, variables, batch)
  ref = np_forward(variables["params"], cfg, batch, {k: t.table for k, t in tables.items()})
  np.testing.assert_allclose(logits, ref, atol=2e-4, rtol=2e-4)
  assert aux == 0.0
  assert set(metrics) == {"decoder_1"} | {f"encoder_{i}" for i in enc_layers}
  # The decoder layer's load is the table's histogram of the decoder input tokens.
  expected = np.bincount(tables["decoder_1"].table[batch["decoder_input_tokens"]].ravel(),
                         minlength=E) / batch["decoder_input_tokens"].size
  np.testing.assert_allclose(np.asarray(metrics["decoder_1"]["expert_load"]), expected, atol=1e-6)


def test_one_expert_hash_layer_equals_dense_model():
  """E=1 hash routing is the dense FFN: same weights, same logits."""
  dense_cfg = tiny()
  sparse_cfg = tiny(sparse=dataclasses.replace(sparse("hash"), num_experts=1))
  batch = random_batch(2)
  sparse_model, dense_model = M.build_model(sparse_cfg), M.build_model(dense_cfg)
  sv = init(sparse_model, batch)
  params = nn.meta.unbox(sv["params"])
  dense_params = {k: v for k, v in params.items() if k != "decoder_1"}
  layer = dict(params["decoder_1"])
  moe = layer.pop("moe")
  layer["mlp"] = {"wi": moe["experts"]["wi"][0], "wo": moe["experts"]["wo"][0]}
  dense_params["decoder_1"] = layer
  dense_logits, _, _ = run(dense_model, {"params": dense_params}, batch)
  sparse_logits, _, _ = run(sparse_model, sv, batch)
  np.testing.assert_allclose(sparse_logits, dense_logits, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Every router, both architectures.

ROUTERS = list(ROUTER_CONFIGS)


@pytest.mark.parametrize("router", [None] + ROUTERS)
def test_decoder_lm_forward_aux_and_gradients(router):
  cfg = tiny(sparse=None if router is None else sparse(router))
  batch = random_batch(3, length=8)
  model = M.DecoderLM(cfg)
  variables = init(model, batch)

  def loss_fn(params):
    # Training mode: BASE solves its balanced assignment only when not deterministic.
    logits, state = model.apply({**variables, "params": params}, batch, deterministic=False,
                                mutable=[MOE_COLLECTION])
    aux, metrics = M.collect_aux(state)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None], -1).mean()
    return nll + aux, (logits, aux, metrics)

  grads, (logits, aux, metrics) = jax.grad(loss_fn, has_aux=True)(variables["params"])
  assert logits.shape == (2, 8, V) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  flat = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(grads))
  for path, g in flat:
    assert np.isfinite(np.asarray(g)).all(), jax.tree_util.keystr(path)
  if router is None:
    assert metrics == {} and float(aux) == 0.0
    return
  assert set(metrics) == {"decoder_1"}
  m = metrics["decoder_1"]
  np.testing.assert_allclose(float(np.sum(m["expert_load"])), 1.0, atol=1e-5)
  g = nn.meta.unbox(grads)["decoder_1"]["moe"]
  # Experts that received tokens get a gradient (wo is reached by every used expert).
  used = np.asarray(m["expert_load"]) > 0
  wo_norm = np.abs(np.asarray(g["experts"]["wo"])).reshape(E, -1).sum(-1)
  assert (wo_norm[used] > 0).all() and (wo_norm[~used] == 0).all()
  if router in ("hash", "multihash", "hash_topk", "base"):
    assert float(aux) == 0.0  # Section 3: no load-balancing loss for hash (nor BASE) layers
  else:
    assert float(aux) > 0.0
  if router in ("hash", "multihash"):
    assert "router" not in g  # no learned routing parameters at all
  else:
    # Learned routers (and hash_topk's gate) learn through the combine weight.
    assert sum(float(np.abs(np.asarray(x)).sum()) for x in jax.tree.leaves(g["router"])) > 0
  if router == "base":  # balanced assignment in training: exactly tokens / E per expert
    np.testing.assert_allclose(np.asarray(m["expert_load"]), np.full(E, 1 / E), atol=1e-6)


@pytest.mark.parametrize("router", [None, "hash", "switch", "base"])
def test_encoder_decoder_forward(router):
  cfg = tiny(2, None if router is None else sparse(router, layers=(1,), encoder_layers=(0,)))
  batch = random_batch(4, length=8, enc_length=8)
  model = M.EncoderDecoder(cfg)
  variables = init(model, batch)
  logits, aux, metrics = run(model, variables, batch)
  assert logits.shape == (2, 8, V) and np.isfinite(logits).all()
  if router is not None:
    assert set(metrics) == {"encoder_0", "decoder_1"}
    # Encoder keys come from encoder tokens, decoder keys from decoder tokens.
    assert int(np.sum(metrics["encoder_0"]["group_sizes"])) == 16
    assert int(np.sum(metrics["decoder_1"]["group_sizes"])) == 16
  # encode + decode is the same computation as __call__.
  encoded = model.apply(variables, batch, method=M.EncoderDecoder.encode)
  assert encoded.shape == (2, 8, D_MODEL)
  logits2 = model.apply(variables, encoded, batch, method=M.EncoderDecoder.decode)
  np.testing.assert_allclose(np.asarray(logits2), logits, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Masks: causality and packing.


@pytest.mark.parametrize("arch,router", [("decoder", None), ("decoder", "switch"),
                                         ("encdec", "hash")])
def test_future_tokens_never_change_earlier_logits(arch, router):
  n_enc = 2 if arch == "encdec" else 0
  cfg = tiny(n_enc, None if router is None else sparse(routers.Hash(key="bigram")
                                                       if router == "hash" else router))
  batch = random_batch(5, enc_length=8 if n_enc else None)
  model = M.build_model(cfg)
  variables = init(model, batch)
  base, _, _ = run(model, variables, batch)
  for t in (3, 7):
    changed = {k: v.copy() for k, v in batch.items()}
    changed["decoder_input_tokens"][0, t] = (changed["decoder_input_tokens"][0, t] % (V - 1)) + 1
    changed["decoder_target_tokens"][0, t] = (changed["decoder_target_tokens"][0, t] % (V - 1)) + 1
    out, _, _ = run(model, variables, changed)
    np.testing.assert_array_equal(out[0, :t], base[0, :t])
    assert np.abs(out[0, t] - base[0, t]).max() > 1e-3  # the change is visible where it happens


@pytest.mark.parametrize("arch", ["decoder", "encdec"])
def test_packed_segments_equal_separate_rows(arch):
  """Two sequences packed in one row give the logits each gets alone (positions restart)."""
  n_enc = 2 if arch == "encdec" else 0
  # A prev_token hash layer also checks that routing keys see segment boundaries.
  cfg = tiny(n_enc, sparse(routers.Hash(key="prev_token"), layers=(0,),
                           encoder_layers=(1,) if n_enc else ()))
  rng = np.random.default_rng(6)
  lens, enc_lens, L, LE = (5, 3), (3, 5), 8, 8
  seqs = [rng.integers(1, V, n).astype(np.int32) for n in lens]
  encs = [rng.integers(1, V, n).astype(np.int32) for n in enc_lens]

  def pack(parts, length):
    row, seg, pos = np.zeros(length, np.int32), np.zeros(length, np.int32), np.zeros(length,
                                                                                       np.int32)
    at = 0
    for i, part in enumerate(parts):
      row[at:at + len(part)], seg[at:at + len(part)] = part, i + 1
      pos[at:at + len(part)] = np.arange(len(part))
      at += len(part)
    return row, seg, pos

  inp, seg, pos = pack([np.concatenate([[0], s[:-1]]) for s in seqs], L)
  tgt, _, _ = pack(seqs, L)
  packed = {"decoder_input_tokens": inp[None], "decoder_target_tokens": tgt[None],
            "decoder_segment_ids": seg[None], "decoder_positions": pos[None]}
  separate = {"decoder_input_tokens": np.stack([pack([np.concatenate([[0], s[:-1]])], L)[0]
                                                for s in seqs]),
              "decoder_target_tokens": np.stack([pack([s], L)[0] for s in seqs])}
  if n_enc:
    erow, eseg, epos = pack(encs, LE)
    packed.update(encoder_input_tokens=erow[None], encoder_segment_ids=eseg[None],
                  encoder_positions=epos[None])
    separate["encoder_input_tokens"] = np.stack([pack([e], LE)[0] for e in encs])
  model = M.build_model(cfg)
  variables = init(model, separate)
  packed_logits, _, _ = run(model, variables, packed)
  separate_logits, _, _ = run(model, variables, separate)
  np.testing.assert_allclose(packed_logits[0, :5], separate_logits[0, :5], atol=1e-5)
  np.testing.assert_allclose(packed_logits[0, 5:8], separate_logits[1, :3], atol=1e-5)

  # Without positions the model derives them from the segment ids.
  no_pos = {k: v for k, v in packed.items() if not k.endswith("_positions")}
  derived, _, _ = run(model, variables, no_pos)
  np.testing.assert_allclose(derived, packed_logits, atol=1e-6)


def test_positions_from_segments_matches_loop():
  seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
  expected = np.zeros_like(seg)
  for b in range(seg.shape[0]):
    for i in range(1, seg.shape[1]):
      expected[b, i] = expected[b, i - 1] + 1 if seg[b, i] == seg[b, i - 1] else 0
  np.testing.assert_array_equal(np.asarray(M.positions_from_segments(jnp.asarray(seg))), expected)


# --------------------------------------------------------------------------------------------------
# Parameter counts, by hand.


def _hand_count(cfg, *, experts_total=0, experts_active=0, router=0):
  d, f, hk = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.head_dim
  attention = 4 * d * hk                                 # q, k, v [d, h, k] and out [h, k, d]
  norm = 2 * d                                           # LayerNorm scale + bias
  ffn = 2 * d * f                                        # wi [d, D], wo [D, d], no biases
  enc, dec = cfg.num_encoder_layers, cfg.num_layers
  n_sparse = len(cfg.sparse.layers) + len(cfg.sparse.encoder_layers) if cfg.sparse else 0
  count = cfg.vocab_size * d                             # shared token embedding
  count += (2 if enc else 1) * cfg.max_len * d           # learned positions per stack
  count += 0 if cfg.share_embeddings else d * cfg.vocab_size
  count += enc * (attention + 2 * norm) + dec * ((2 if enc else 1) * attention + (3 if enc else 2)
                                                 * norm)
  count += (2 if enc else 1) * norm                      # final norms
  dense = (enc + dec - n_sparse) * ffn
  return (count + dense + n_sparse * (experts_total + router),
          count + dense + n_sparse * (experts_active + router))


@pytest.mark.parametrize("case", ["dense_encdec", "dense_lm_unshared", "hash", "multihash",
                                  "hash_topk", "switch", "token_switch", "base"])
def test_param_counts_match_hand_count(case):
  d, f = D_MODEL, D_FF
  expert = 2 * d * f
  if case == "dense_encdec":
    cfg, kw = tiny(2), {}
  elif case == "dense_lm_unshared":
    cfg, kw = tiny(0, share_embeddings=False), {}
  elif case in ("hash", "multihash"):
    # E experts in total, one expert per token (MultiHash: N slices of 1/N each).
    cfg = tiny(2, sparse(case, layers=(1,), encoder_layers=(0,)))
    kw = dict(experts_total=E * expert, experts_active=expert)
  elif case == "hash_topk":
    # k=2 experts per token, plus the learned gate [d, E].
    cfg = tiny(0, sparse(case, layers=(0, 1)))
    kw = dict(experts_total=E * expert, experts_active=2 * expert, router=d * E)
  elif case in ("switch", "base"):
    # Switch's kernel [d, E]; BASE's expert embeddings [E, d].
    cfg = tiny(0, sparse(case))
    kw = dict(experts_total=E * expert, experts_active=expert, router=d * E)
  else:
    cfg = tiny(0, sparse(routers.TokenSwitch(router_embed_dim=8)))
    kw = dict(experts_total=E * expert, experts_active=expert, router=V * 8 + 8 * E)
  total, active = _hand_count(cfg, **kw)
  counts = M.param_counts(cfg)
  assert (counts["total"], counts["active"]) == (total, active)
  assert counts["experts"] == kw.get("experts_total", 0) * (
      len(cfg.sparse.layers) + len(cfg.sparse.encoder_layers) if cfg.sparse else 0)


def test_every_param_has_logical_axes():
  cfg = tiny(2, sparse("switch", layers=(1,)), share_embeddings=False)
  batch = random_batch(7, enc_length=8)
  variables = jax.eval_shape(lambda b: M.build_model(cfg).init(jax.random.key(0), b), batch)
  leaves = jax.tree_util.tree_flatten_with_path(
      variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  assert len(leaves) > 20
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), where
    assert len(leaf.names) == leaf.value.ndim, where
    assert set(leaf.names) <= LOGICAL_NAMES, (where, leaf.names)


# --------------------------------------------------------------------------------------------------
# dtype, dropout, validation, aux collection, config errors.


def test_bfloat16_compute_runs_close_to_float32():
  cfg32 = tiny(sparse=sparse("hash"))
  cfg16 = dataclasses.replace(cfg32, dtype="bfloat16")
  batch = random_batch(8)
  m32, m16 = M.build_model(cfg32), M.build_model(cfg16)
  variables = init(m32, batch)
  out32, _, _ = run(m32, variables, batch)
  out16, _, _ = run(m16, variables, batch)
  assert out16.dtype == np.float32 and np.isfinite(out16).all()
  assert np.abs(out16 - out32).max() < 0.1 * np.abs(out32).max()
  assert np.abs(out16 - out32).max() > 0  # bf16 really was used


def test_dropout_only_when_not_deterministic():
  cfg = tiny(dropout_rate=0.3, attention_dropout_rate=0.3)
  batch = random_batch(9)
  model = M.build_model(cfg)
  variables = init(model, batch)
  def f(v, b, key, det):
    return model.apply(v, b, deterministic=det, rngs={"dropout": key})
  a = f(variables, batch, jax.random.key(1), False)
  b = f(variables, batch, jax.random.key(2), False)
  c = f(variables, batch, jax.random.key(1), True)
  d = f(variables, batch, jax.random.key(2), True)
  assert np.abs(np.asarray(a - b)).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(c), np.asarray(d))


def test_out_of_range_tokens_raise_naming_feature():
  batch = random_batch(10, enc_length=8)
  for name, bad in (("decoder_input_tokens", V), ("encoder_input_tokens", -1),
                    ("decoder_target_tokens", V + 7)):
    b = {k: v.copy() for k, v in batch.items()}
    b[name][1, 2] = bad
    with pytest.raises(ValueError, match=rf"{name}.*{bad}.*vocab_size is {V}"):
      M.validate_batch(b, V)
  b = {k: v.copy() for k, v in batch.items()}
  b["decoder_positions"] = np.full((2, 8), MAX_LEN, np.int32)
  with pytest.raises(ValueError, match=rf"decoder_positions.*{MAX_LEN}"):
    M.validate_batch(b, V, MAX_LEN)
  with pytest.raises(TypeError, match="decoder_input_tokens"):
    M.validate_batch({**batch, "decoder_input_tokens": batch["decoder_input_tokens"] * 1.0}, V)
  with pytest.raises(ValueError, match="share a shape"):
    M.validate_batch({**batch, "decoder_target_tokens": batch["decoder_target_tokens"][:, :4]}, V)
  M.validate_batch(batch, V, MAX_LEN)  # a good batch passes

  # The models check concrete batches themselves...
  model = M.build_model(tiny())
  good = random_batch(10)
  variables = init(model, good)
  bad = {k: v.copy() for k, v in good.items()}
  bad["decoder_input_tokens"][0, 0] = V
  with pytest.raises(ValueError, match="decoder_input_tokens"):
    model.apply(variables, bad)
  # ...and skip traced ones, where no host check is possible.
  assert jax.jit(lambda b: model.apply(variables, b))(bad).shape == (2, 8, V)


def test_collect_aux_sums_layers_and_does_not_accumulate():
  tree = {MOE_COLLECTION: {
      "decoder_3": {"moe": {"aux_loss": jnp.float32(0.25), "metrics": {"x": jnp.ones(2)}}},
      "encoder_0": {"moe": {"aux_loss": jnp.float32(0.5), "metrics": {}}}}}
  total, metrics = M.collect_aux(tree)
  assert float(total) == 0.75
  assert set(metrics) == {"decoder_3", "encoder_0"}
  assert float(metrics["decoder_3"]["aux_loss"]) == 0.25
  np.testing.assert_array_equal(metrics["decoder_3"]["x"], np.ones(2))
  assert float(M.collect_aux(tree[MOE_COLLECTION])[0]) == 0.75
  assert float(M.collect_aux({})[0]) == 0.0

  # init's variables already hold a "moe" collection; applying with them must replace, not add.
  cfg = tiny(sparse=sparse("switch"))
  batch = random_batch(11)
  model = M.build_model(cfg)
  variables = init(model, batch)
  assert MOE_COLLECTION in variables
  _, state = model.apply(variables, batch, mutable=[MOE_COLLECTION])
  _, state2 = model.apply({**variables, **state}, batch, mutable=[MOE_COLLECTION])
  np.testing.assert_allclose(float(M.collect_aux(state2)[0]), float(M.collect_aux(state)[0]),
                             rtol=1e-6)
  np.testing.assert_allclose(float(M.collect_aux(variables)[0]), float(M.collect_aux(state)[0]),
                             rtol=1e-6)


def test_config_errors_name_the_problem():
  with pytest.raises(ValueError, match=r"\[5\].*\[0, 2\)"):
    tiny(sparse=sparse("hash", layers=(5,)))
  with pytest.raises(ValueError, match="num_hashes=3"):
    tiny(sparse=sparse(routers.Hash(num_hashes=3), layers=(0,)))
  with pytest.raises(ValueError, match="unknown router"):
    M.SparseConfig(router="hashh", layers=(0,))
  with pytest.raises(ValueError, match="unknown key 'previous'"):
    routers.Hash(key="previous")
  with pytest.raises(ValueError, match=r"topk must be in \[1, num_experts=4\], got 5"):
    sparse(routers.HashTopK(topk=5))
  with pytest.raises(ValueError, match="no sparse layers"):
    M.SparseConfig(router="hash")
  with pytest.raises(ValueError, match="dtype"):
    tiny(dtype="int8")
  batch = random_batch(12, enc_length=8)
  with pytest.raises(ValueError, match="num_encoder_layers == 0"):
    M.DecoderLM(tiny(2)).init(jax.random.key(0), batch)
  with pytest.raises(ValueError, match=r"decoder_7"):
    table = hash_functions.build_table("random", num_experts=E, vocab_size=V)
    M.build_model(tiny(sparse=sparse("hash")), {"decoder_7": (table,)}).init(
        jax.random.key(0), batch)
  # SparseConfig accepts the lists gin hands over and stays hashable.
  assert hash(tiny(sparse=M.SparseConfig(router="hash", num_experts=E, layers=[1])))


def test_paper_presets_have_paper_shapes():
  base = M.baseline_config()
  assert (base.num_encoder_layers, base.num_layers, base.d_model, base.d_ff, base.num_heads) == (
      2, 11, 1024, 4096, 16)
  assert M.wider_config().d_ff == 6144 and M.deeper_config().num_layers == 22
  assert M.wider_config(d_ff=100).d_ff == 100  # overrides win
  # 222M in the paper; see the models docstring for the small difference.
  assert abs(M.param_counts(base)["total"] - 222e6) / 222e6 < 0.02


def test_hash_layers_without_tables_hash_independently():
  cfg = tiny(2, sparse("hash", layers=(0, 1), encoder_layers=(1,)))
  variables = init(M.build_model(cfg), random_batch(13, enc_length=8))
  tables = {name: np.asarray(t["moe"]["router"]["table"])
            for name, t in variables["hash_tables"].items()}
  assert set(tables) == {"decoder_0", "decoder_1", "encoder_1"}
  assert all(t.shape == (1, V) for t in tables.values())
  assert len({t.tobytes() for t in tables.values()}) == 3
  # Given tables are used as they are: "default" fills every hash layer.
  table = hash_functions.build_table("random", num_experts=E, vocab_size=V, seed=5)
  variables = init(M.build_model(cfg, {"default": table}), random_batch(13, enc_length=8))
  for t in variables["hash_tables"].values():
    np.testing.assert_array_equal(np.asarray(t["moe"]["router"]["table"])[0], table.table)


def test_sparse_block_flattens_and_restores_token_order():
  """SparseMlpBlock hands the router row-major tokens and puts outputs back where they came from."""

  class EchoRouter(nn.Module):
    @nn.compact
    def __call__(self, hidden, features, *, deterministic):
      ids = features.token_ids.reshape(-1)
      np.testing.assert_array_equal(np.asarray(hidden[:, 0]), np.asarray(ids, np.float32))
      return Routing(ids[:, None] % 2, jnp.ones((ids.size, 1)), jnp.float32(0.0), {})

  class ScaleExperts(nn.Module):
    @nn.compact
    def __call__(self, x, routing):
      return x * (routing.expert_index + 1).astype(x.dtype), {"n": jnp.float32(x.shape[0])}

  ids = np.arange(6, dtype=np.int32).reshape(2, 3)
  x = jnp.broadcast_to(jnp.asarray(ids, jnp.float32)[..., None], (2, 3, 4))
  block = layers.SparseMlpBlock(EchoRouter(), ScaleExperts())
  y, state = block.apply({}, x, RouterFeatures(token_ids=jnp.asarray(ids)), deterministic=True,
                         mutable=[MOE_COLLECTION])
  np.testing.assert_array_equal(np.asarray(y)[..., 0], ids * (ids % 2 + 1))
  assert float(state[MOE_COLLECTION]["metrics"]["n"]) == 6.0


def test_sharded_forward_matches_single_device():
  """Under the project's logical-axis rules on a 2x2x2 mesh, every constraint the layers place is
  satisfiable and the logits equal the unsharded ones."""
  from hashmoe import sharding
  cfg = tiny(sparse=sparse("hash"))
  batch = random_batch(14, batch=4)
  model = M.build_model(cfg)
  variables = init(model, batch)
  expected = np.asarray(model.apply(variables, batch))
  mesh = jax.make_mesh((2, 2, 2), ("data", "expert", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    logits = jax.jit(model.apply)(variables, batch)
  assert logits.sharding.spec[-1] == "model"  # the vocab axis of the logits is sharded
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)


@pytest.mark.parametrize("router", ["switch", "hash"])
def test_capacity_drops_are_reported_and_pass_through(router):
  """capacity 0.5 * tokens / E = 2 slots per expert: each expert keeps at most 2 of its tokens."""
  cfg = tiny(sparse=sparse(router, capacity_factor=0.5))
  batch = random_batch(15)
  model = M.build_model(cfg)
  variables = init(model, batch)
  logits, _, metrics = run(model, variables, batch)
  assert np.isfinite(logits).all()
  m = metrics["decoder_1"]
  dropped = float(m["dropped_fraction"])
  if router == "hash":
    # The hash router drops nothing (its load is the pre-capacity load); the dispatch drops.
    counts = np.rint(np.asarray(m["expert_load"]) * 16).astype(int)
    np.testing.assert_allclose(dropped, 1 - np.minimum(counts, 2).sum() / 16, atol=1e-6)
    assert dropped == float(m["dispatch_dropped_fraction"]) > 0
  else:
    # Switch's router drops (its load is of the kept tokens); nothing is left for the dispatch.
    kept = np.asarray(m["expert_load"]) * 16 * (1 - dropped)
    np.testing.assert_allclose(kept, np.rint(kept), atol=1e-4)
    assert kept.max() <= 2 + 1e-4 and dropped >= 0.5
    assert float(m["dispatch_dropped_fraction"]) == 0.0


def test_merge_metrics_combines_drops():
  merged = layers.merge_metrics({"dropped_fraction": jnp.float32(0.5), "expert_load": 1},
                                {"dropped_fraction": jnp.float32(0.5), "group_sizes": 2})
  assert float(merged["dropped_fraction"]) == 0.75
  assert float(merged["dispatch_dropped_fraction"]) == 0.5
  assert merged["expert_load"] == 1 and merged["group_sizes"] == 2


@pytest.mark.parametrize("encdec,experts,key", [(False, None, "token"), (True, 5, "token"),
                                                (False, 64, "predicted_future")])
def test_init_batch_spec_lists_what_init_needs(encdec, experts, key):
  sparse = None if experts is None else M.SparseConfig(router=routers.Hash(key=key),
                                                            num_experts=experts, layers=(0,))
  config = M.tiny_config(vocab_size=32, num_encoder_layers=2 if encdec else 0,
                              sparse=sparse)
  spec = M.init_batch_spec(config)
  expected = {"decoder_input_tokens", "decoder_target_tokens"}
  expected |= {"encoder_input_tokens"} if encdec else set()
  expected |= {"predicted_ids"} if key == "predicted_future" else set()
  assert set(spec) == expected
  (shape,) = {s.shape for s in spec.values()}
  assert shape[0] == 1 and shape[1] <= config.max_len and shape[1] % (experts or 1) == 0
  assert all(s.dtype == jnp.int32 for s in spec.values())
