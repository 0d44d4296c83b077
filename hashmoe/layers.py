"""Transformer building blocks: embeddings, norms, attention, dense and sparse FFN blocks.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and every large
activation a logical constraint (`nn.with_logical_constraint`); the mapping of those names to mesh
axes lives in one table of rules (`hashmoe.sharding`), never here. Names used:

  "vocab"   vocabulary rows of the token embedding / output projection
  "embed"   the model dimension d
  "mlp"     the FFN hidden dimension D
  "heads", "kv"   attention heads and the per-head dimension
  "expert"  the stacked-experts dimension E (parameters of `hashmoe.experts.Experts`)
  "batch", "length"   activations only; for flattened tokens `[tokens, d]` the token axis is named
            "batch" because tokens are `batch * length` flattened row-major, so sharding the batch
            shards the tokens the same way.
  None      replicated (the position table, whose rows are never worth sharding).

Sparse layers report through one Flax collection, `MOE_COLLECTION` ("moe"). `SparseMlpBlock` sows
two entries there: `"aux_loss"` (float32[], already multiplied by the router's coefficient) and
`"metrics"` (the router's and the experts' metric dicts, `merge_metrics`). Sowing *replaces* any
previous value instead of appending to a tuple (Flax's default), so variables returned by `init` —
which already hold a "moe" collection — can be passed straight back to
`apply(..., mutable=[MOE_COLLECTION])` without stale values piling up.
`hashmoe.models.collect_aux` reads the collection back.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from hashmoe.activations import ACTIVATIONS, get_activation  # noqa: F401  (re-exported)
from hashmoe.routing import RouterFeatures
from hashmoe.sharding import DISPATCH_CHECKPOINT_NAME

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

MOE_COLLECTION = "moe"
AUX_LOSS_KEY = "aux_loss"
METRICS_KEY = "metrics"

# Big negative logit for masked attention positions. `jnp.where(mask, logits, _MASKED)` (instead
# of adding a bias) keeps a fully masked row finite: all entries equal, softmax uniform, no NaN.
# Such rows only occur for padding queries, whose outputs are ignored by the loss.
_MASKED = float(jnp.finfo(jnp.float32).min)


# What each transformer layer keeps for the backward pass (`TransformerConfig.remat_policy`): a
# `jax.checkpoint_policies` policy applied per layer by `jax.checkpoint` (flax `nn.remat`), or None
# for no rematerialisation. Everything a policy does not save is recomputed from the
# layer's input in the backward pass; gradients are the same under every policy.
_cp = jax.checkpoint_policies
REMAT_POLICIES: dict[str, Optional[Callable[..., bool]]] = {
    # Keep every activation (no jax.checkpoint at all): the fastest, the most memory.
    "none": None,
    # Keep only each layer's input: the least memory, one extra forward pass.
    "full": _cp.nothing_saveable,
    # Keep every matmul output (projections, attention einsums, FFN and expert matmuls).
    "dots": _cp.checkpoint_dots,
    # Keep matmul outputs without batch dimensions (the weight matmuls, not attention's
    # batched q.k and probs.v): MaxText's common middle ground.
    "dots_no_batch": _cp.dots_with_no_batch_dims_saveable,
    # Keep only the sparse layers' dispatched rows (`sharding.DISPATCH_CHECKPOINT_NAME`): the
    # backward pass then repeats no routing sort or forward all-to-all; everything else is
    # recomputed. Needs a sparse layer.
    "save_dispatch": _cp.save_only_these_names(DISPATCH_CHECKPOINT_NAME),
    # Both: matmul outputs without batch dims, and the dispatched rows.
    "dots_no_batch_and_dispatch": _cp.save_from_both_policies(
        _cp.dots_with_no_batch_dims_saveable, _cp.save_only_these_names(DISPATCH_CHECKPOINT_NAME)),
}
del _cp


def remat_policy(name: str) -> Optional[Callable[..., bool]]:
  """The `jax.checkpoint` policy of a `REMAT_POLICIES` name (None: no rematerialisation).

  Raises:
    ValueError: an unknown name, listing the valid ones.
  """
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {name!r}; expected one of {sorted(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


# --------------------------------------------------------------------------------------------------
# Masks. All masks are boolean, True = may attend, shaped [batch | 1, 1, q_length, kv_length] so
# that they broadcast over heads.


def make_attention_mask(query_valid: Array, key_valid: Array) -> Array:
  """Pairwise mask from per-position validity.

  Args:
    query_valid: bool[batch, q_len] (or anything whose nonzero entries mean valid).
    key_valid: bool[batch, kv_len].

  Returns:
    bool[batch, 1, q_len, kv_len]: True where both the query and the key are valid.
  """
  return jnp.logical_and(query_valid[:, None, :, None] != 0, key_valid[:, None, None, :] != 0)


def make_causal_mask(length: int) -> Array:
  """bool[1, 1, length, length]: position i may attend to j iff j <= i."""
  idx = jnp.arange(length)
  return (idx[None, :] <= idx[:, None])[None, None]


def make_segment_mask(query_segment_ids: Array, key_segment_ids: Array) -> Array:
  """Packed sequences: attend only within the same segment.

  Args:
    query_segment_ids: int32[batch, q_len]; 0 marks padding in seqio's packing convention.
    key_segment_ids: int32[batch, kv_len].

  Returns:
    bool[batch, 1, q_len, kv_len]: True where the two positions belong to the same segment.
  """
  return query_segment_ids[:, None, :, None] == key_segment_ids[:, None, None, :]


def combine_masks(*masks: Optional[Array]) -> Optional[Array]:
  """Logical AND of the masks that are not None (None if all are None); shapes broadcast."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = jnp.logical_and(out, m)
  return out


# --------------------------------------------------------------------------------------------------
# Embeddings and norms.


class Embed(nn.Module):
  """Token embedding, optionally reused (transposed) as the output projection.

  Attributes:
    num_embeddings: vocabulary size V.
    features: model dimension d.
    dtype: compute dtype of the looked-up vectors and of `attend`.
    embedding_init: initializer of the float32[V, d] table. Unit variance (as t5x): the pre-norm
      residual stream is normalised before every sublayer, and `attend` users scale by d**-0.5.
  """
  num_embeddings: int
  features: int
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  embedding_init: Initializer = nn.initializers.normal(stddev=1.0)

  def setup(self):
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: Array) -> Array:
    """ids: int32[...] → dtype[..., d].

    A traced gather cannot raise: ids >= V come back as NaN rows (`jnp.take`'s fill mode) and
    negative ids wrap around, so callers validate ids on the host first
    (`hashmoe.models.validate_batch`).
    """
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"Embed expects integer ids, got dtype {ids.dtype}")
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """x: [..., d] → float32[..., V], the dot product with every embedding row.

    Inputs are cast to `dtype` but accumulate in float32: bf16 logits over a large vocabulary would
    lose the small differences the softmax cares about.
    """
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding.astype(self.dtype),
                      preferred_element_type=jnp.float32)


class PositionEmbed(nn.Module):
  """Absolute position embeddings: learned (ParlAI's choice for the paper's Reddit models) or the
  fixed sinusoids of Vaswani et al. (no parameters).

  Attributes:
    max_len: number of positions; positions must lie in [0, max_len).
    features: model dimension d.
    kind: "learned" | "sinusoidal".
  """
  max_len: int
  features: int
  kind: str = "learned"
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, positions: Array) -> Array:
    """positions: int32[batch, length] → dtype[batch, length, d]."""
    if self.kind == "learned":
      # ParlAI initialises positions at N(0, d**-0.5): small next to the unit-variance tokens.
      table = self.param(
          "embedding",
          nn.with_logical_partitioning(
              nn.initializers.normal(stddev=self.features**-0.5), (None, "embed")),
          (self.max_len, self.features), self.param_dtype)
      return jnp.take(table, positions, axis=0).astype(self.dtype)
    if self.kind == "sinusoidal":
      return sinusoidal_positions(positions, self.features).astype(self.dtype)
    raise ValueError(f"unknown position embedding kind {self.kind!r}; "
                     "expected 'learned' or 'sinusoidal'")


def sinusoidal_positions(positions: Array, features: int, max_timescale: float = 1e4) -> Array:
  """Vaswani et al. (2017) sinusoids: float32[*positions.shape, features], sin half, cos half."""
  if features % 2:
    raise ValueError(f"sinusoidal positions need an even model dimension, got {features}")
  half = features // 2
  inv_freq = max_timescale ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class LayerNorm(nn.Module):
  """LayerNorm (scale and bias) or RMSNorm (scale only), computed in float32.

  Attributes:
    kind: "layernorm" | "rmsnorm".
    epsilon: added to the variance.
    dtype: dtype of the output.
  """
  kind: str = "layernorm"
  epsilon: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [..., d] → dtype[..., d]."""
    if self.kind not in ("layernorm", "rmsnorm"):
      raise ValueError(f"unknown norm {self.kind!r}; expected 'layernorm' or 'rmsnorm'")
    d = x.shape[-1]
    x = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (d,),
        self.param_dtype)
    y = y * scale.astype(jnp.float32)
    if self.kind == "layernorm":
      bias = self.param(
          "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (d,),
          self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


# --------------------------------------------------------------------------------------------------
# Attention.


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention (self or cross), no biases, float32 softmax.

  Params: query/key/value float32[d, heads, head_dim] ("embed", "heads", "kv") and out
  float32[heads, head_dim, d] ("heads", "kv", "embed").

  Attributes:
    num_heads: number of heads h.
    head_dim: per-head dimension k.
    dropout_rate: dropout on the attention probabilities.
    dtype: compute dtype of the projections and the two attention einsums.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Optional[Array] = None, *,
               deterministic: bool, decode: bool = False,
               decode_index: Optional[Array] = None) -> Array:
    """Attend from `inputs_q` to `inputs_kv`.

    Args:
      inputs_q: [batch, q_len, d].
      inputs_kv: [batch, kv_len, d]; the same array as `inputs_q` for self-attention.
      mask: bool[batch | 1, 1, q_len, kv_len], True = may attend; None = attend everywhere.
      deterministic: disables dropout.
      decode: causal self-attention through a key/value cache in the "cache" collection
        (flaxformer's names): `cached_key` / `cached_value` dtype[batch, max_length, heads,
        head_dim]. A call that finds no cache creates it, shaped by its inputs
        ([batch, max_length, d]), and attends as without `decode` (`mask` applies). Once it exists
        each call takes one token per row ([batch, 1, d]), writes its key and value at
        `decode_index` and attends to positions <= `decode_index`; `mask` must then be None.
      decode_index: int32[], the position of a decoding step's token, shared by the rows (they
        decode in lockstep). The model keeps it once for all layers (`hashmoe.models`'
        `DecodeState`), so the layers' caches hold only keys and values and stack along a
        scanned layer axis.

    Returns:
      dtype[batch, q_len, d].
    """
    d = inputs_q.shape[-1]
    h, k = self.num_heads, self.head_dim

    def proj(name):
      init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0,
                                              out_axis=(1, 2))
      return self.param(name, nn.with_logical_partitioning(init, ("embed", "heads", "kv")),
                        (d, h, k), self.param_dtype).astype(self.dtype)

    xq = inputs_q.astype(self.dtype)
    xkv = inputs_kv.astype(self.dtype)
    # Scaling the query (not the logits) by k**-0.5 keeps bf16 logits in range.
    q = jnp.einsum("bld,dhk->blhk", xq, proj("query")) * jnp.asarray(k**-0.5, self.dtype)
    key = jnp.einsum("bld,dhk->blhk", xkv, proj("key"))
    value = jnp.einsum("bld,dhk->blhk", xkv, proj("value"))
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    key = nn.with_logical_constraint(key, ("batch", "length", "heads", "kv"))
    value = nn.with_logical_constraint(value, ("batch", "length", "heads", "kv"))
    if decode:
      key, value, mask = self._use_cache(key, value, mask, decode_index)

    logits = jnp.einsum("bqhk,bshk->bhqs", q, key).astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    if self.dropout_rate > 0.0 and not deterministic:
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout_rate, probs.shape)
      probs = jnp.where(keep, probs / (1.0 - self.dropout_rate), 0.0)
    out = jnp.einsum("bhqs,bshk->bqhk", probs.astype(self.dtype), value)

    out_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=(0, 1), out_axis=2)
    wo = self.param("out", nn.with_logical_partitioning(out_init, ("heads", "kv", "embed")),
                    (h, k, d), self.param_dtype).astype(self.dtype)
    y = jnp.einsum("bqhk,hkd->bqd", out, wo)
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))

  def _use_cache(self, key: Array, value: Array, mask: Optional[Array],
                 index: Optional[Array]) -> tuple[Array, Array, Optional[Array]]:
    """(keys, values, mask) to attend with in decode mode; see `__call__`'s `decode`."""
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    if not initialized:
      return key, value, mask
    if index is None:
      raise ValueError("a cached decoding step needs decode_index (the position of its token)")
    batch, length = key.shape[:2]
    max_length = cached_key.value.shape[1]
    if length != 1:
      raise ValueError(f"a decoding step takes one token per row, got inputs of length {length} "
                       f"(the cache holds {max_length} positions; it is created by the first "
                       "decode call, which takes the full length)")
    if cached_key.value.shape[0] != batch:
      raise ValueError(f"the cache was created for batch {cached_key.value.shape[0]}, this step "
                       f"has {batch} rows")
    if mask is not None:
      raise ValueError("a cached decoding step builds its own causal mask; pass mask=None")
    i = jnp.asarray(index, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    key = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype),
                                       (zero, i, zero, zero))
    value = jax.lax.dynamic_update_slice(cached_value.value,
                                         value.astype(cached_value.value.dtype),
                                         (zero, i, zero, zero))
    cached_key.value, cached_value.value = key, value
    # Positions after i are not written yet: masked as the full pass's causal mask masks them, so
    # they get exactly zero weight and the step equals the full pass's row i.
    mask = (jnp.arange(max_length) <= i)[None, None, None, :]
    return key, value, mask


# --------------------------------------------------------------------------------------------------
# Feed-forward blocks.


class MlpBlock(nn.Module):
  """Dense FFN `B(act(A h))` without biases (the paper's expert form, Section 3).

  Params: wi float32[d, D] ("embed", "mlp"), wo float32[D, d] ("mlp", "embed").

  Attributes:
    d_ff: hidden size D.
    activation: a name in `ACTIVATIONS`.
    dropout_rate: dropout on the hidden activations (ParlAI's relu_dropout).
    dtype: compute dtype.
  """
  d_ff: int
  activation: str = "relu"
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    """x: [batch, length, d] → dtype[batch, length, d]."""
    d = x.shape[-1]
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    wi = self.param("wi", nn.with_logical_partitioning(init, ("embed", "mlp")), (d, self.d_ff),
                    self.param_dtype)
    wo = self.param("wo", nn.with_logical_partitioning(init, ("mlp", "embed")), (self.d_ff, d),
                    self.param_dtype)
    hidden = get_activation(self.activation)(
        jnp.einsum("...d,df->...f", x.astype(self.dtype), wi.astype(self.dtype)))
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
    y = jnp.einsum("...f,fd->...d", hidden, wo.astype(self.dtype))
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))


def merge_metrics(router_metrics: dict[str, Array], expert_metrics: dict[str, Array]
                  ) -> dict[str, Array]:
  """One metrics dict for a sparse layer.

  Router keys win; an expert key the router also fills is kept as "dispatch_<key>". Drops can happen
  twice — the router zeroes over-capacity weights (Switch), then a capacity dispatch may drop
  active assignments that still do not fit — so "dropped_fraction" becomes the fraction of all
  assignments dropped by either: 1 - (1 - router's) * (1 - dispatch's), the dispatch's being a
  fraction of the assignments the router kept.
  """
  metrics = dict(router_metrics)
  for key, value in expert_metrics.items():
    metrics[f"dispatch_{key}" if key in metrics else key] = value
  if "dropped_fraction" in router_metrics and "dropped_fraction" in expert_metrics:
    kept = ((1.0 - jnp.asarray(router_metrics["dropped_fraction"], jnp.float32))
            * (1.0 - jnp.asarray(expert_metrics["dropped_fraction"], jnp.float32)))
    metrics["dropped_fraction"] = 1.0 - kept
  return metrics


def _replace(_previous: Any, new: Any) -> Any:
  return new


def _nothing() -> Any:
  return None


class SparseMlpBlock(nn.Module):
  """A sparse FFN: a router picks who handles each token, experts compute it (Section 3).

  The block is indifferent to which router it holds: hash, Switch, token-Switch, BASE and
  hash-selected top-k all return the same `Routing` value, and any `Experts` dispatch consumes it.
  Tokens whose combine weight is 0 (dropped by a capacity limit) get y = 0 and so pass through the
  residual connection unchanged.

  Sows (see the module docstring) into `MOE_COLLECTION`: `"aux_loss"` float32[] and `"metrics"`
  dict[str, float32 array].

  Attributes:
    router: called `router(hidden: float[tokens, d], features, *, deterministic) -> Routing`.
    experts: called `experts(x: float[tokens, d], routing) -> (float[tokens, d], metrics dict)`.
  """
  router: nn.Module
  experts: nn.Module

  @nn.compact
  def __call__(self, x: Array, features: RouterFeatures, *, deterministic: bool) -> Array:
    """Route and compute.

    Args:
      x: [batch, length, d] normalised hidden states.
      features: per-token integer features, each int32[batch, length] (the router's hash keys).
      deterministic: disables router jitter and any other training-only randomness.

    Returns:
      [batch, length, d] in x's dtype.
    """
    if x.ndim != 3:
      raise ValueError(f"SparseMlpBlock expects x of shape [batch, length, d], got {x.shape}")
    batch, length, d = x.shape
    if features.token_ids.shape != (batch, length):
      raise ValueError(f"features.token_ids has shape {features.token_ids.shape}, expected "
                       f"{(batch, length)} to match the hidden states")
    tokens = nn.with_logical_constraint(x.reshape(batch * length, d), ("batch", "embed"))
    routing = self.router(tokens, features, deterministic=deterministic)
    y, expert_metrics = self.experts(tokens, routing)
    metrics = merge_metrics(routing.metrics, expert_metrics)
    self.sow(MOE_COLLECTION, AUX_LOSS_KEY, jnp.asarray(routing.aux_loss, jnp.float32),
             reduce_fn=_replace, init_fn=_nothing)
    self.sow(MOE_COLLECTION, METRICS_KEY, metrics, reduce_fn=_replace, init_fn=_nothing)
    y = y.reshape(batch, length, d).astype(x.dtype)
    return nn.with_logical_constraint(y, ("batch", "length", "embed"))


# --------------------------------------------------------------------------------------------------
# The transformer layer.


class TransformerLayer(nn.Module):
  """Pre-norm transformer layer: self-attention, optional cross-attention, dense or sparse FFN.

  `x ← x + drop(SelfAttn(norm(x)))`, `x ← x + drop(CrossAttn(norm(x), encoded))` (if
  `cross_attention`), `x ← x + drop(FFN(norm(x)))`. Whether self-attention is causal is decided by
  the mask the caller passes, so one class serves encoder and decoder layers.

  Attributes:
    num_heads, head_dim: attention shape.
    d_ff, activation: the dense FFN (used when `moe` is None).
    dropout_rate: residual-branch dropout (and the dense FFN's hidden dropout).
    attention_dropout_rate: dropout on attention probabilities.
    norm: "layernorm" | "rmsnorm".
    cross_attention: adds an encoder-decoder attention sublayer.
    moe: a `SparseMlpBlock` (or anything with its call signature) replacing the dense FFN.
    dtype: compute dtype.
  """
  num_heads: int
  head_dim: int
  d_ff: int
  activation: str = "relu"
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  norm: str = "layernorm"
  cross_attention: bool = False
  moe: Optional[nn.Module] = None
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, self_mask: Optional[Array], *, encoded: Optional[Array] = None,
               cross_mask: Optional[Array] = None, features: Optional[RouterFeatures] = None,
               deterministic: bool, decode: bool = False,
               decode_index: Optional[Array] = None) -> Array:
    """Apply the layer.

    Args:
      x: [batch, length, d] residual stream.
      self_mask: bool[batch | 1, 1, length, length] (causal and/or segment/padding), or None.
      encoded: [batch, enc_length, d] encoder output; required iff `cross_attention`.
      cross_mask: bool[batch, 1, length, enc_length], or None.
      features: router features (int32[batch, length] each); required iff `moe` is set.
      deterministic: disables dropout and router jitter.
      decode: self-attention through its key/value cache (`MultiHeadAttention`'s `decode`); the
        cross-attention attends to the whole of `encoded` at every step, uncached.
      decode_index: int32[], the position of a decoding step's token (`MultiHeadAttention`).

    Returns:
      dtype[batch, length, d].
    """
    def residual_dropout(y, name):
      return nn.Dropout(self.dropout_rate, name=name)(y, deterministic=deterministic)

    def norm(name):
      return LayerNorm(kind=self.norm, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def attention(name):
      return MultiHeadAttention(self.num_heads, self.head_dim, self.attention_dropout_rate,
                                dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    x = nn.with_logical_constraint(x.astype(self.dtype), ("batch", "length", "embed"))
    h = norm("pre_self_attention_norm")(x)
    h = attention("self_attention")(h, h, self_mask, deterministic=deterministic, decode=decode,
                                    decode_index=decode_index)
    x = x + residual_dropout(h, "self_attention_dropout")

    if self.cross_attention:
      if encoded is None:
        raise ValueError("a cross-attention layer needs `encoded` (the encoder output), got None")
      h = norm("pre_cross_attention_norm")(x)
      h = attention("encoder_decoder_attention")(h, encoded, cross_mask,
                                                 deterministic=deterministic)
      x = x + residual_dropout(h, "cross_attention_dropout")
    elif encoded is not None:
      raise ValueError("`encoded` was given to a layer built without cross_attention")

    h = norm("pre_mlp_norm")(x)
    if self.moe is None:
      h = MlpBlock(self.d_ff, self.activation, self.dropout_rate, dtype=self.dtype,
                   param_dtype=self.param_dtype, name="mlp")(h, deterministic=deterministic)
    else:
      if features is None:
        raise ValueError("a sparse layer needs router `features`, got None")
      h = self.moe(h, features, deterministic=deterministic)
    x = x + residual_dropout(h, "mlp_dropout")
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))
