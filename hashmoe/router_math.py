"""The learned routers' math as pure functions: auxiliary losses, gates, the bias update.

`hashmoe.routing`'s routers call these (and re-exports them, so `routing.load_balancing_loss`
keeps working); tests check each against numpy. Everything here is float32 and shape-generic over
`tokens = batch * length` flattened row-major, as in `hashmoe.routing`:

  routing_metrics        what every router reports (loads, drops, confidence)
  load_balancing_loss    Switch Transformer's auxiliary loss (padding excluded by `token_mask`)
  router_z_loss          ST-MoE's z-loss
  gate_weights           k selected logits -> combine weights (softmax, sigmoid, softplus, ...)
  sequence_balance_loss  DeepSeek-V3's sequence-wise balance loss (eq. 17-20)
  expert_bias_update     DeepSeek-V3's auxiliary-loss-free bias step
  switch_combine_weight  what multiplies a top-1 router's chosen expert output
"""
from __future__ import annotations

from typing import Optional

import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array


def routing_metrics(expert_index: Array, combine_weight: Array, num_experts: int,
                    router_probs: Optional[Array] = None, *,
                    kept: Optional[Array] = None,
                    token_mask: Optional[Array] = None) -> dict[str, Array]:
  """The metrics every router fills, computed from its assignments.

  Args:
    expert_index: int[tokens, H] experts of each assignment (a (token, column) pair).
    combine_weight: float[tokens, H] weights; by the `Routing` convention a weight of exactly 0
      marks an assignment dropped by a capacity limit.
    num_experts: E.
    router_probs: float[tokens, E] per-token distributions over experts (rows sum to 1), if the
      router has them.
    kept: bool[tokens, H] assignments that reached an expert; None reads it off the weights
      (`combine_weight != 0`).
    token_mask: bool[tokens] the tokens counted (real ones, not padding); None counts all.

  Returns:
    dict of float32, over the counted tokens:
      expert_load [E]: kept assignments per expert / all kept assignments (sums to 1; all zeros if
        nothing was kept). This is the work each expert actually does.
      max_over_mean_load []: max(expert_load) / mean(expert_load) = E * max(expert_load); 1 is
        perfect balance, E is everything on one expert (0 if nothing was kept).
      dropped_fraction []: dropped assignments / all assignments (tokens * H).
      expert_counts [E]: kept assignments per expert (expert_load's numerator). Counts add up
        over batches where shares do not, so an evaluation pass sums these.
      assignments []: all assignments, kept or dropped (tokens * H; dropped_fraction's
        denominator).
      combine_weight_mean []: mean combine weight over the assignments (a dropped one counts its
        weight, 0): the scale the layer puts on its experts' outputs. 1 for hash routing, p for
        Switch (≈ 1/E before its router is confident), σ(h·w_e) for BASE, 1/k for a top-k gate.
      and, with router_probs,
      router_entropy []: mean over tokens of -sum_e p log p (nats; 0·log 0 = 0).
      router_confidence []: mean over tokens of max_e p.
  """
  expert_index = jnp.asarray(expert_index)
  combine_weight = jnp.asarray(combine_weight)
  if expert_index.ndim != 2 or expert_index.shape != combine_weight.shape:
    raise ValueError(
        f"expert_index and combine_weight must both be [tokens, H], got {expert_index.shape} and "
        f"{combine_weight.shape}")
  if kept is None:
    kept = combine_weight != 0
  elif tuple(kept.shape) != tuple(expert_index.shape):
    raise ValueError(f"kept must have shape {tuple(expert_index.shape)}, got {tuple(kept.shape)}")
  kept = jnp.asarray(kept, bool)
  tokens = expert_index.shape[0]
  if token_mask is None:
    token_mask = jnp.ones((tokens,), bool)
  else:
    token_mask = jnp.asarray(token_mask, bool).reshape(-1)
    if token_mask.shape != (tokens,):
      raise ValueError(f"token_mask must have {tokens} entries (one per token), got "
                       f"{token_mask.shape[0]}")
  counted = token_mask[:, None]
  counts = jnp.zeros((num_experts,), jnp.float32).at[expert_index.reshape(-1)].add(
      (kept & counted).reshape(-1).astype(jnp.float32), mode="drop")
  total = jnp.sum(counts)
  load = counts / jnp.maximum(total, 1.0)
  num_tokens = jnp.sum(token_mask).astype(jnp.float32)
  num_assignments = jnp.maximum(num_tokens * expert_index.shape[1], 1.0)
  metrics = {
      "combine_weight_mean": jnp.sum(jnp.where(counted, combine_weight, 0.0)) / num_assignments,
      "expert_load": load,
      "max_over_mean_load": jnp.max(load) * num_experts,
      "dropped_fraction": jnp.sum(~kept & counted).astype(jnp.float32) / num_assignments,
      "expert_counts": counts,
      "assignments": num_tokens * expert_index.shape[1],
  }
  if router_probs is not None:
    probs = jnp.asarray(router_probs, jnp.float32)
    if probs.shape != (tokens, num_experts):
      raise ValueError(f"router_probs must be [tokens, num_experts] = "
                       f"{(tokens, num_experts)}, got {probs.shape}")
    weight = token_mask.astype(jnp.float32) / jnp.maximum(num_tokens, 1.0)
    entropy = -jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1)
    metrics["router_entropy"] = jnp.sum(weight * entropy)
    metrics["router_confidence"] = jnp.sum(weight * jnp.max(probs, axis=-1))
  return metrics


def _token_weights(tokens: int, token_mask: Optional[Array]) -> Array:
  """float32[tokens]: 1 / (counted tokens) on the counted tokens, 0 elsewhere; every token counted
  when `token_mask` is None. No counted token gives all zeros (a mean over nothing is 0)."""
  if token_mask is None:
    return jnp.full((tokens,), 1.0 / max(tokens, 1), jnp.float32)
  mask = jnp.asarray(token_mask, bool).reshape(-1)
  if mask.shape != (tokens,):
    raise ValueError(f"token_mask must have {tokens} entries (one per token), got {mask.shape[0]}")
  mask = mask.astype(jnp.float32)
  return mask / jnp.maximum(jnp.sum(mask), 1.0)


def load_balancing_loss(router_probs: Array, expert_index: Array,
                        token_mask: Optional[Array] = None) -> Array:
  """Switch Transformer's auxiliary load-balancing loss, without its coefficient α.

  Fedus et al. 2021, "Switch Transformers", equations (4) - (6):

    loss = N · Σ_{i=1..N} f_i · P_i                                             (4)
    f_i  = (1/T) Σ_{x in B} 1{argmax p(x) = i}   fraction of tokens dispatched to expert i   (5)
    P_i  = (1/T) Σ_{x in B} p_i(x)               mean router probability of expert i        (6)

  with N experts and T tokens in the batch B. It is 1 under perfect balance (f_i = P_i = 1/N) and
  reaches N when every token goes to one expert with probability 1. f_i counts the router's choice
  before any capacity drop, as in the paper; only P_i carries gradient.

  B is the batch's real tokens when `token_mask` is given: padding is routed (shapes are static)
  but is not text, and counting it would make the loss balance the padding's expert too (flaxformer
  likewise leaves padding out of its router losses).

  Args:
    router_probs: float32[tokens, N] softmax router probabilities.
    expert_index: int[tokens] the top-1 expert of each token.
    token_mask: bool[tokens] the tokens in B (real ones); None: all.

  Returns:
    float32[]; 0 when no token is counted.
  """
  num_experts = router_probs.shape[-1]
  weight = _token_weights(router_probs.shape[0], token_mask)[:, None]  # 1/T on B
  dispatch = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)
  fraction_dispatched = jnp.sum(weight * dispatch, axis=0)  # f_i, eq. (5)
  mean_prob = jnp.sum(weight * router_probs.astype(jnp.float32), axis=0)  # P_i, eq. (6)
  return num_experts * jnp.sum(fraction_dispatched * mean_prob)


def router_z_loss(router_logits: Array, token_mask: Optional[Array] = None) -> Array:
  """The router z-loss of ST-MoE (Zoph et al. 2022), without its coefficient.

  (1/T) Σ_t (log Σ_i exp(x_{t,i}))²: penalises large router logits, which round badly in low
  precision and destabilise training. With `token_mask`, t runs over the real tokens only (T of
  them), as for `load_balancing_loss`.

  Args:
    router_logits: float[tokens, E].
    token_mask: bool[tokens] the tokens counted; None: all.

  Returns:
    float32[]; 0 when no token is counted.
  """
  log_z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(_token_weights(router_logits.shape[0], token_mask) * jnp.square(log_z))


# How a learned top-k router turns logits into scores (DeepSeek-V2: softmax; V3: sigmoid).
TOPK_SCORES = ("softmax", "sigmoid")
# How a hash top-k router turns the k selected logits into gate weights.
HASH_TOPK_GATES = ("softmax", "sigmoid", "softplus", "sqrt_softplus")


def gate_weights(selected_logits: Array, gate: str, *, normalize: bool = False,
                 scale: float = 1.0) -> Array:
  """Combine weights of k selected experts from their learned logits.

  "softmax" is a softmax over the k selected logits (the weights already sum to 1, so
  `normalize` changes nothing); "sigmoid", "softplus" and "sqrt_softplus" (sqrt(log(1 + e^z)))
  score each expert on its own, as DeepSeek-V3 (sigmoid) and the issue's DeepSeek-V4 description
  (softplus family) do, and `normalize` divides by their sum (DeepSeek-V3 eq. 13's
  g = g' / Σ g'). `scale` multiplies the result (DeepSeek's `routed_scaling_factor`).

  Args:
    selected_logits: float32[tokens, k].
    gate: one of `HASH_TOPK_GATES`.
    normalize: renormalise the k weights to sum to 1.
    scale: a constant factor on the weights.

  Returns:
    float32[tokens, k].
  """
  z = selected_logits.astype(jnp.float32)
  if gate == "softmax":
    w = jax.nn.softmax(z, axis=-1)
  elif gate == "sigmoid":
    w = jax.nn.sigmoid(z)
  elif gate == "softplus":
    w = jax.nn.softplus(z)
  elif gate == "sqrt_softplus":
    w = jnp.sqrt(jax.nn.softplus(z))
  else:
    raise ValueError(f"gate must be one of {HASH_TOPK_GATES}, got {gate!r}")
  if normalize and gate != "softmax":
    w = w / jnp.sum(w, axis=-1, keepdims=True)
  return w * jnp.float32(scale)


def sequence_balance_loss(scores: Array, expert_index: Array, batch: int,
                          token_mask: Optional[Array] = None) -> Array:
  """DeepSeek-V3's complementary sequence-wise balance loss, without its coefficient α.

  DeepSeek-V3 (arXiv:2412.19437) §2.1.2, equations (17) - (20), for each sequence of T tokens:

    L_Bal = Σ_{i=1..N} f_i P_i                                                        (17)
    f_i   = N / (K T) Σ_t 1(expert i is among token t's K selected experts)            (18)
    s'_i,t = s_i,t / Σ_j s_j,t                                                         (19)
    P_i   = (1/T) Σ_t s'_i,t                                                           (20)

  averaged over the batch's sequences. 1 under perfect balance. f_i counts the experts the router
  actually selected (score + bias); the paper writes the top-k of the scores alone, which is the
  same selection while the bias is 0. A sequence is a row of the batch (a packed row counts as one
  sequence); T counts its real tokens, and rows without any are left out of the mean.

  Args:
    scores: float32[tokens, N] the affinities s (sigmoid or softmax scores), tokens = batch * T.
    expert_index: int[tokens, K] the selected experts.
    batch: rows B.
    token_mask: bool[tokens] the real tokens; None: all.

  Returns:
    float32[]; 0 when no token is counted.
  """
  tokens, num_experts = scores.shape
  k = expert_index.shape[-1]
  if tokens % batch:
    raise ValueError(f"{tokens} tokens do not split into {batch} rows")
  mask = (jnp.ones((tokens,), jnp.float32) if token_mask is None
          else jnp.asarray(token_mask, jnp.float32).reshape(tokens))
  mask = mask.reshape(batch, -1, 1)
  scores = scores.astype(jnp.float32)
  normalized = scores / jnp.sum(scores, axis=-1, keepdims=True)  # s', eq. (19)
  selected = jnp.sum(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=-2)
  length = jnp.sum(mask, axis=1)  # T of each row, [B, 1]
  t = jnp.maximum(length, 1.0)
  f = num_experts / (k * t) * jnp.sum(mask * selected.reshape(batch, -1, num_experts), axis=1)
  p = jnp.sum(mask * normalized.reshape(batch, -1, num_experts), axis=1) / t
  per_row = jnp.sum(f * p, axis=-1)  # eq. (17), [B]
  rows = (length[:, 0] > 0).astype(jnp.float32)
  return jnp.sum(rows * per_row) / jnp.maximum(jnp.sum(rows), 1.0)


def expert_bias_update(bias: Array, counts: Array, rate: float) -> Array:
  """DeepSeek-V3's auxiliary-loss-free balancing step (arXiv:2412.19437 §2.1.2): at the end of
  each step, b_i ← b_i + γ · sign(mean load - load_i): an overloaded expert's bias falls by γ,
  an underloaded one's rises by γ, one exactly at the mean keeps its bias.

  Args:
    bias: float32[E] the selection bias.
    counts: float[E] the step's assignments per expert (real tokens only).
    rate: γ >= 0 (0 leaves the bias as it is).

  Returns:
    float32[E].
  """
  counts = jnp.asarray(counts, jnp.float32)
  return bias + jnp.float32(rate) * jnp.sign(jnp.mean(counts) - counts)


# Switch's combine weight: what multiplies the chosen expert's output (`switch_combine_weight`).
SWITCH_COMBINES = ("prob", "prob_times_experts", "straight_through")


def switch_combine_weight(gate: Array, combine: str, num_experts: int) -> Array:
  """The weight a top-1 router's chosen expert output is multiplied by, from its probability.

  A router that is not yet confident gives every expert p ≈ 1/E, so with the faithful weight a
  64-expert layer's output starts ~64 times smaller than a dense FFN's and stays small until the
  router learns to be confident (measured in docs/RESULTS.md). The variants keep the routing (the
  argmax) and change only this weight:

    "prob"                w = p. Fedus et al. 2021 §2.1 (Shazeer et al. 2017's gate for k=1): the
                          router learns through w alone. The default: the faithful baseline.
    "prob_times_experts"  w = E · p, forward and backward: 1 for a uniform router, so the layer
                          starts at a dense FFN's scale, and the router's gradient is E times
                          Switch's. A constant factor on un-renormalised softmax gate weights,
                          as DeepSeek-V2/V3 apply (`routed_scaling_factor`); E is the factor
                          that undoes the 1/E of a uniform router.
    "straight_through"    w = 1 forward, dw/dp = 1 backward (w = 1 + p - stop_gradient(p)): the
                          straight-through estimator (Bengio, Léonard & Courville 2013) applied to
                          the gate. Forward it is what renormalised top-k routers (Mixtral-style,
                          GShard's top-2 normalisation) give at k = 1: the weights of the chosen
                          experts renormalised to sum to 1 are exactly 1, which would cut the
                          router off from the loss entirely (the argmax has no gradient); the
                          straight-through backward keeps Switch's gradient p·(δ - p) through p.

  Args:
    gate: float32[tokens, 1] the chosen expert's router probability p.
    combine: one of `SWITCH_COMBINES`.
    num_experts: E.

  Returns:
    float32[tokens, 1].
  """
  if combine == "prob":
    return gate
  if combine == "prob_times_experts":
    return gate * jnp.float32(num_experts)
  if combine == "straight_through":
    return 1.0 + gate - lax.stop_gradient(gate)
  raise ValueError(f"combine must be one of {SWITCH_COMBINES}, got {combine!r}")
