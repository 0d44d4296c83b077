"""Balanced assignment for BASE layers (Lewis et al. 2021): an ε-scaling auction in JAX.

BASE routes by solving, for every batch, the linear assignment that maximises the total token-expert
affinity while giving every expert exactly tokens / E tokens. `balanced_assignment` solves it with
Bertsekas' auction (bids, prices, ε-scaling), jit-compatible and with an optimality bound;
`hashmoe.routing.BaseRouter` calls it during training.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array


class AuctionResult(NamedTuple):
  """What `balanced_assignment` found.

  Attributes:
    assignment: int32[tokens] expert of each token; every expert gets exactly tokens / E.
    prices: float32[E] the auction's final expert prices (dual variables).
    epsilon: float32[] the final ε (absolute, in score units) of the optimality bound.
    rounds: int32[] bidding rounds over all ε phases.
    unassigned_fraction: float32[] tokens the auction had not placed when its round budget ran out
      (then placed greedily in free slots, and the optimality bound no longer holds). 0 normally.
  """
  assignment: Array
  prices: Array
  epsilon: Array
  rounds: Array
  unassigned_fraction: Array


def balanced_assignment(scores: Array, *, relative_epsilon: float = 1e-3,
                        epsilon_scaling: float = 4.0, max_rounds: int = 1000) -> AuctionResult:
  """Balanced linear assignment by an auction: each expert gets exactly tokens / E tokens.

  Solves BASE layers' assignment (Lewis et al. 2021): maximise Σ_t scores[t, a(t)] subject to
  |{t : a(t) = e}| = C = tokens / E for every expert e. This is an assignment problem between the
  tokens and C identical copies of each expert, solved with Bertsekas' auction algorithm
  (Bertsekas 1979; "The auction algorithm for assignment and other network flow problems", 1988)
  specialised to identical copies: one price p_e per expert instead of one per copy.

  Rounds are Jacobi-style (all unplaced tokens bid at once). In a round every token t names a
  candidate c(t) (its current expert if placed, else argmax_e scores[t, e] - p_e) and a
  willingness to pay β_t = scores[t, c] - max_{e≠c}(scores[t, e] - p_e) + ε. Each expert keeps its
  C most willing candidates; if more asked, its price rises to the willingness of the most willing
  one it turned away, and those turned away bid again next round. Prices never fall, and every
  placed token keeps ε-complementary slackness (ε-CS):
    scores[t, a(t)] - p_{a(t)} ≥ max_e (scores[t, e] - p_e) - ε.

  Optimality guarantee: once every token is placed (each expert then holds exactly C), for any other
  balanced assignment b, by ε-CS and Σ_t p_{a(t)} = C Σ_e p_e = Σ_t p_{b(t)},
    Σ_t scores[t, b(t)] ≤ Σ_t max_e (scores[t, e] - p_e) + C Σ_e p_e
                        ≤ Σ_t scores[t, a(t)] + tokens·ε,
  so the assignment is within tokens·ε of optimal. ε-scaling (Bertsekas) reaches a small ε quickly:
  phases with ε = ε_final·θ^(P-1), ..., ε_final·θ, ε_final, where ε_final = relative_epsilon ·
  spread (spread = max - min score) and the first ε is at least spread/2; each phase restarts the
  bidding from the previous phase's prices.

  The loop is bounded (`max_rounds` per phase) so the step always terminates; should the last phase
  run out, the remaining tokens fill the free slots in token order (the result is still balanced,
  the bound no longer holds) and `unassigned_fraction` says how many.

  Args:
    scores: float[tokens, E] token-expert affinities (no gradient flows through the assignment).
    relative_epsilon: ε_final as a fraction of the score spread.
    epsilon_scaling: θ > 1, the factor ε shrinks by between phases.
    max_rounds: bidding rounds allowed per phase.

  Returns:
    AuctionResult.

  Raises:
    ValueError: tokens is not a multiple of E, or a parameter is out of range.
  """
  if scores.ndim != 2:
    raise ValueError(f"scores must be [tokens, num_experts], got shape {scores.shape}")
  tokens, num_experts = scores.shape
  if num_experts < 1 or tokens % num_experts:
    raise ValueError(
        f"a balanced assignment needs tokens divisible by num_experts: got tokens={tokens} "
        f"(batch * length) and num_experts={num_experts}; tokens % num_experts = "
        f"{tokens % max(num_experts, 1)}. Choose batch * length as a multiple of num_experts.")
  if not 0 < relative_epsilon < 0.5:
    raise ValueError(f"relative_epsilon must be in (0, 0.5), got {relative_epsilon}")
  if not epsilon_scaling > 1:
    raise ValueError(f"epsilon_scaling must be > 1, got {epsilon_scaling}")
  if not max_rounds >= 1:
    raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
  scores = lax.stop_gradient(scores).astype(jnp.float32)
  zero = jnp.zeros((), jnp.float32)
  if num_experts == 1 or tokens == 0:
    return AuctionResult(jnp.zeros((tokens,), jnp.int32), jnp.zeros((num_experts,), jnp.float32),
                         zero, jnp.zeros((), jnp.int32), zero)
  capacity = tokens // num_experts
  spread = jnp.max(scores) - jnp.min(scores)
  # All-equal scores: every balanced assignment is optimal; any positive ε works.
  spread = jnp.where(spread > 0, spread, 1.0)
  eps_final = relative_epsilon * spread
  num_phases = 1 + math.ceil(math.log(0.5 / relative_epsilon) / math.log(epsilon_scaling))
  token_ids = jnp.arange(tokens, dtype=jnp.int32)
  expert_ids = jnp.arange(num_experts, dtype=jnp.int32)

  def bidding_round(state):
    prices, assignment, rounds, eps = state
    values = scores - prices[None, :]
    candidate = jnp.where(assignment >= 0, assignment,
                          jnp.argmax(values, axis=-1).astype(jnp.int32))
    own = jnp.take_along_axis(scores, candidate[:, None], axis=-1)[:, 0]
    best_other = jnp.max(jnp.where(expert_ids[None, :] == candidate[:, None], -jnp.inf, values),
                         axis=-1)
    willingness = own - best_other + eps
    # Group candidates by expert, most willing first (ties: lower token id first).
    by_expert, neg_willingness, order = lax.sort(
        (candidate, -willingness, token_ids), num_keys=3)
    asked = jnp.bincount(candidate, length=num_experts)
    first = jnp.cumsum(asked) - asked
    place = token_ids - first[by_expert]
    assignment = jnp.zeros_like(assignment).at[order].set(
        jnp.where(place < capacity, by_expert, -1))
    turned_away = -neg_willingness[jnp.minimum(first + capacity, tokens - 1)]
    prices = jnp.where(asked > capacity, jnp.maximum(prices, turned_away), prices)
    return prices, assignment, rounds + 1, eps

  def phase(k, carry):
    prices, rounds, _ = carry
    eps = eps_final * epsilon_scaling ** (num_phases - 1 - k).astype(jnp.float32)
    unplaced = jnp.full((tokens,), -1, jnp.int32)
    prices, assignment, phase_rounds, _ = lax.while_loop(
        lambda s: jnp.any(s[1] < 0) & (s[2] < max_rounds), bidding_round,
        (prices, unplaced, jnp.zeros((), jnp.int32), eps))
    return prices, rounds + phase_rounds, assignment

  prices, rounds, assignment = lax.fori_loop(
      0, num_phases, phase,
      (jnp.zeros((num_experts,), jnp.float32), jnp.zeros((), jnp.int32),
       jnp.full((tokens,), -1, jnp.int32)))

  # Fallback if the last phase ran out of rounds: the j-th unplaced token takes the j-th free slot.
  unplaced = assignment < 0
  load = jnp.bincount(jnp.where(unplaced, num_experts, assignment), length=num_experts + 1)
  free_slots_end = jnp.cumsum(capacity - load[:num_experts])
  slot = jnp.cumsum(unplaced) - 1
  fill = jnp.searchsorted(free_slots_end, slot, side="right").astype(jnp.int32)
  assignment = jnp.where(unplaced, jnp.minimum(fill, num_experts - 1), assignment)
  return AuctionResult(assignment, prices, eps_final, rounds,
                       jnp.mean(unplaced.astype(jnp.float32)))
