"""Experts: stacked expert FFN weights and the dispatches that compute them.

A sparse FFN layer is a router plus experts (DESIGN.md). The router produces a `Routing`
(`expert_index: int32[tokens, H]`, `combine_weight: float[tokens, H]`); this module computes

  y_t = sum_j combine_weight[t, j] * FFN_{expert_index[t, j]}(x_t)       (num_slices == 1, top-H)

or, for MultiHash (Hash Layers paper, Sec. 3.2) with N = num_slices = H hashes
k_m = expert_index[t, m]:

  v   = act([A_{k_1}(x_t); ...; A_{k_N}(x_t)])                           (size D = d_ff)
  y_t = [w_1 B_{k_1}(v); ...; w_N B_{k_N}(v)]                             (N pieces of d_model/N)

Every expert is the paper's FFN `B(act(A(h)))`, A: d_model -> d_ff (`wi[e]`) and
B: d_ff -> d_model (`wo[e]`), without biases (as in T5 / flaxformer). Slice m of A is
`wi[e][:, m*D/N:(m+1)*D/N]` and slice m of B is `wo[e][:, m*d/N:(m+1)*d/N]`, so MultiHash has
exactly the parameters and FLOPs of one hash. `w_m` is 1.0 for hash routing; the paper's formula
has no weights.

Dispatches (all compute the same function; pick by speed on the hardware at hand):
  sorted      dropless: stable argsort of assignments by expert, grouped matmul, unsort. The
              grouped matmul is pluggable; by default the XLA:CPU window kernels of
              `hashmoe.kernels.cpu`, the fastest dropless path measured on CPU
              (`fuse_ffn=True` runs both matmuls and the activation per window instead: less
              memory, but slower on the machine it was measured on; docs/PERFORMANCE.md).
  ragged_dot  `sorted` with `jax.lax.ragged_dot`.
  einsum      GShard / flaxformer one-hot dispatch and combine tensors with a static capacity.
  capacity    sort by expert into capacity-padded [experts, capacity, d] buffers, batched matmul.
              Drops like `einsum` (the same assignments), at a fraction of its cost on CPU.
  pallas      `sorted` with the Pallas grouped matmul `hashmoe.kernels.gmm` (imported lazily).
  expert_parallel  `hashmoe.sharding.expert_parallel_ffn` (all-to-all over the expert mesh axis).

Conventions every dispatch shares:
  * An assignment is one (token, column) pair. Assignments are ordered column-major (all tokens
    of column 0, then column 1, ...), so under a capacity limit a router's first choice outranks
    its second (GShard / flaxformer priority); within a column, earlier tokens win.
  * Capacity is per group, where a group is one expert for top-k and one (slice, expert) pair for
    MultiHash, because each MultiHash slice reads its own slice of the weights.
  * A combine weight of exactly 0 marks an assignment the router dropped: it takes no capacity and
    no compute, contributes 0 (the token reaches the next layer through the residual outside),
    gets a zero gradient for its weight, and for MultiHash its segment of `v` is zero. An expert
    index outside [0, num_experts) is treated the same way (as `hashmoe.sharding` does).
  * Metrics: `group_sizes` int32[num_experts], the active assignments routed to each expert
    (summed over slices, before any capacity drop); `dropped_fraction` float32[], the fraction of
    active assignments a capacity limit dropped (0 for dropless dispatches); and, when precomputed
    routing was given, `sort_precomputed` float32[] (1 if it was used, 0 if it did not match the
    routing and the dispatch sorted on device).

Precomputed routing (hash layers). `sorted`, `ragged_dot`, `pallas` and `capacity` take an optional
`sorted_assignments` (`expert_grouping.SortedAssignments`: permutation, inverse and group sizes
computed on the host from token ids, see `expert_grouping.precompute_routing`, or assembled by the
router from the rows the input pipeline grouped, `expert_grouping.assemble_sorted_assignments`). It
replaces the argsort, the inverse scatter and the bincount. It is checked on device against the
actual assignments (a few integer gathers); if it does not describe them, the dispatch sorts as
usual, so a stale or mismatched permutation can cost time but never change a result.
"""
from __future__ import annotations

import functools
import importlib
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol, Sequence

import flax.linen as nn
import jax
from jax import lax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from hashmoe import expert_grouping
from hashmoe.activations import ACTIVATIONS, get_activation  # noqa: F401  (re-exported)
from hashmoe.kernels import cpu as cpu_kernels
from hashmoe.routing import Routing
from hashmoe.sharding import DISPATCH_CHECKPOINT_NAME

Array = jax.Array
Activation = Callable[[Array], Array]
# group_matmul(lhs: [m, k], rhs: [num_groups, k, n], group_sizes: int32[num_groups]) -> [m, n]
# Rows of `lhs` are grouped contiguously in group order. sum(group_sizes) may be < m: rows past it
# belong to no group, are never read back by the dispatches below, and may hold anything; the
# weight gradient must ignore them (as jax.lax.ragged_dot and megablox tgmm do).
GroupMatmul = Callable[[Array, Array, Array], Array]
Metrics = dict[str, Array]
ExpertFn = Callable[..., tuple[Array, Metrics]]

DISPATCHES = ("sorted", "ragged_dot", "einsum", "capacity", "pallas", "expert_parallel", "auto")
# Dispatches that never drop a token; a capacity_factor given to them is a configuration mistake.
DROPLESS_DISPATCHES = ("sorted", "ragged_dot", "pallas")


# ----------------------------------------------------------------------------------------------
# Row gathers with a gather backward.
# ----------------------------------------------------------------------------------------------


@jax.custom_vjp
def _take_rows(x: Array, index: Array, inverse_index: Array) -> Array:
  """out[i] = x[index[i]], 0 where index[i] is out of range; `index` is injective on its valid part.

  `inverse_index[j]` is the row of `out` that holds `x[j]` (out of range when `x[j]` is unused).
  Autodiff would transpose the gather into a scatter-add, which is slow on XLA:CPU; since the map is
  injective its transpose is the gather by `inverse_index` (MaxText does the same for its sort).
  """
  return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x, index, inverse_index):
  return _take_rows(x, index, inverse_index), (index, inverse_index)


def _take_rows_bwd(residuals, g):
  index, inverse_index = residuals
  return jnp.take(g, inverse_index, axis=0, mode="fill", fill_value=0), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def inverse_permutation(perm: Array) -> Array:
  """int32[n] inverse of a permutation `perm: int[n]` (inverse[perm[i]] = i), by int scatter."""
  n = perm.shape[0]
  return jnp.zeros((n,), jnp.int32).at[perm].set(jnp.arange(n, dtype=jnp.int32))


def permute_rows(x: Array, perm: Array, inverse_perm: Optional[Array] = None) -> Array:
  """x[perm] for `x: [n, ...]` and a permutation `perm: int[n]`; its backward gathers by inverse.

  Pass `inverse_perm` when it is already known (the dispatches do) to skip computing it.
  """
  if perm.shape != x.shape[:1]:
    raise ValueError(
        f"perm must have shape {x.shape[:1]} (one index per row of x), got {perm.shape}")
  if inverse_perm is None:
    inverse_perm = inverse_permutation(perm)
  return _take_rows(x, perm.astype(jnp.int32), inverse_perm.astype(jnp.int32))


# ----------------------------------------------------------------------------------------------
# Shape arithmetic and validation.
# ----------------------------------------------------------------------------------------------


def expert_capacity(
    num_tokens: int,
    num_experts: int,
    *,
    num_columns: int = 1,
    num_slices: int = 1,
    capacity_factor: Optional[float],
) -> int:
  """Slots per group for the dropping dispatches.

  A group is one expert (top-k) or one (slice, expert) pair (MultiHash); it expects
  num_tokens * num_columns / (num_slices * num_experts) assignments. The capacity is
  ceil(capacity_factor * that), at least 1 (for top-k: ceil(cf * tokens * H / E), as in GShard).
  `capacity_factor=None` returns the worst case, every assignment of a slice in one group, which
  makes the dispatch dropless.
  """
  assignments_per_slice = num_tokens * num_columns // num_slices
  if capacity_factor is None:
    return max(1, assignments_per_slice)
  if not capacity_factor > 0:
    raise ValueError(
        f"capacity_factor must be > 0 (or None for dropless), got {capacity_factor}")
  return max(1, math.ceil(capacity_factor * assignments_per_slice / num_experts))


def _check_inputs(x, expert_index, combine_weight, wi, wo, num_slices) -> None:
  """Raises ValueError/TypeError unless the shapes form a valid (MultiHash) expert FFN call."""
  if x.ndim != 2:
    raise ValueError(f"x must be float[tokens, d_model], got shape {x.shape}")
  tokens, d_model = x.shape
  if wi.ndim != 3 or wo.ndim != 3:
    raise ValueError(
        f"wi must be [experts, d_model, d_ff] and wo [experts, d_ff, d_model], got {wi.shape} "
        f"and {wo.shape}")
  num_experts, _, d_ff = wi.shape
  if num_experts < 1:
    raise ValueError(f"num_experts must be >= 1, got wi.shape[0] = {num_experts}")
  if wi.shape[1] != d_model or wo.shape != (num_experts, d_ff, d_model):
    raise ValueError(
        f"expected wi [{num_experts}, {d_model}, {d_ff}] and wo [{num_experts}, {d_ff}, {d_model}] "
        f"for x of d_model={d_model}, got wi {wi.shape} and wo {wo.shape}")
  if expert_index.ndim != 2 or expert_index.shape[0] != tokens:
    raise ValueError(
        f"expert_index must be int[tokens={tokens}, num_columns], got shape {expert_index.shape}")
  if not jnp.issubdtype(expert_index.dtype, jnp.integer):
    raise TypeError(f"expert_index must be an integer array, got dtype {expert_index.dtype}")
  if combine_weight.shape != expert_index.shape:
    raise ValueError(
        f"combine_weight must have expert_index's shape {expert_index.shape}, got "
        f"{combine_weight.shape}")
  if num_slices < 1:
    raise ValueError(f"num_slices must be >= 1, got {num_slices}")
  if d_ff % num_slices or d_model % num_slices:
    raise ValueError(
        f"num_slices={num_slices} must divide d_ff={d_ff} and d_model={d_model} (MultiHash splits "
        f"A into d_ff/N and B into d_model/N pieces)")
  if num_slices > 1 and expert_index.shape[1] != num_slices:
    raise ValueError(
        f"MultiHash with num_slices={num_slices} needs one expert_index column per slice, got "
        f"{expert_index.shape[1]} columns")


def _group_weights(wi: Array, wo: Array, num_slices: int) -> tuple[Array, Array]:
  """Stacks MultiHash weight slices as groups g = slice * E + expert.

  Returns wi_g: [num_slices * E, d_model, d_ff / N] and wo_g: [num_slices * E, d_ff, d_model / N],
  so one grouped matmul serves all slices. The identity for num_slices == 1.
  """
  if num_slices == 1:
    return wi, wo
  e, d_model, d_ff = wi.shape
  n = num_slices
  wi_g = wi.reshape(e, d_model, n, d_ff // n).transpose(2, 0, 1, 3)
  wo_g = wo.reshape(e, d_ff, n, d_model // n).transpose(2, 0, 1, 3)
  return wi_g.reshape(n * e, d_model, d_ff // n), wo_g.reshape(n * e, d_ff, d_model // n)


class _Assignments(NamedTuple):
  """Assignments in column-major order a = column * tokens + token (see module docstring).

  key: int32[A], the group of each assignment (slice * E + expert), or num_groups when inactive.
  """
  key: Array
  num_groups: int
  num_tokens: int
  num_columns: int


def _assignments(expert_index: Array, combine_weight: Array, num_experts: int,
                 num_slices: int) -> _Assignments:
  tokens, columns = expert_index.shape
  num_groups = num_slices * num_experts
  # For MultiHash column m is slice m; for top-k every column reads the full weights (slice 0).
  slice_of_column = jnp.arange(columns, dtype=jnp.int32) if num_slices > 1 else jnp.zeros(
      (columns,), jnp.int32)
  index = expert_index.T.astype(jnp.int32)
  group = slice_of_column[:, None] * num_experts + index
  # An index outside [0, E) would alias another slice's group; treat it like a dropped assignment.
  active = (combine_weight.T != 0) & (index >= 0) & (index < num_experts)
  key = jnp.where(active, group, num_groups).reshape(-1)
  return _Assignments(key, num_groups, tokens, columns)


class _Sort(NamedTuple):
  perm: Array      # int32[A]: sorted position -> assignment
  inverse: Array   # int32[A]: assignment -> sorted position
  sizes: Array     # int32[G]: active assignments per group
  starts: Array    # int32[G]: first sorted position of each group
  precomputed_used: Optional[Array] = None  # bool[]: the precomputed sort matched (when given)


def _argsort(assign: _Assignments) -> _Sort:
  # Stable, so each group keeps the column-major order that decides who fits a capacity.
  perm = jnp.argsort(assign.key, stable=True).astype(jnp.int32)
  sizes = jnp.bincount(assign.key, length=assign.num_groups + 1)[:assign.num_groups]
  sizes = sizes.astype(jnp.int32)
  return _Sort(perm, inverse_permutation(perm), sizes, jnp.cumsum(sizes) - sizes)


def sort_matches(key: Array, perm: Array, inverse: Array, sizes: Array) -> Array:
  """bool[]: whether (perm, inverse, sizes) is the stable sort of the assignment keys `key: int[A]`.

  True iff perm is a permutation of [0, A) with inverse as its inverse, the sizes are
  non-negative, position p of the sorted order holds an assignment of the group that `sizes`
  places there (positions past sum(sizes) hold the inactive assignments, key = G), and within a
  group assignments keep their order: exactly what `jnp.argsort(key, stable=True)` gives, so a
  matching precomputed sort changes no result, not even a capacity dispatch's drops.
  """
  num = key.shape[0]
  positions = jnp.arange(num, dtype=jnp.int32)
  in_range = jnp.all((perm >= 0) & (perm < num)) & jnp.all((inverse >= 0) & (inverse < num))
  bijective = jnp.all(jnp.take(inverse, perm, mode="clip") == positions)
  group_at = jnp.searchsorted(jnp.cumsum(sizes), positions, side="right").astype(key.dtype)
  grouped = jnp.all(jnp.take(key, perm, mode="clip") == group_at)
  stable = jnp.all((group_at[1:] != group_at[:-1]) | (perm[1:] > perm[:-1]))
  return in_range & bijective & grouped & stable & jnp.all(sizes >= 0)


@jax.named_scope("sort_by_expert")
def _sort(assign: _Assignments,
          precomputed: Optional[expert_grouping.SortedAssignments] = None) -> _Sort:
  """The grouping of the assignments: precomputed (checked) when given, else a stable argsort."""
  if precomputed is None:
    return _argsort(assign)
  num, num_groups = assign.key.shape[0], assign.num_groups
  perm, inverse, sizes = (jnp.asarray(a) for a in precomputed)
  if perm.shape != (num,) or inverse.shape != (num,) or sizes.shape != (num_groups,):
    raise ValueError(
        f"sorted_assignments must have permutation and inverse_permutation of shape ({num},) "
        f"(tokens * columns) and group_sizes of shape ({num_groups},) (groups), got "
        f"{perm.shape}, {inverse.shape} and {sizes.shape}")
  for name, a in zip(precomputed._fields, (perm, inverse, sizes)):
    if not jnp.issubdtype(a.dtype, jnp.integer):
      raise TypeError(f"sorted_assignments.{name} must be an integer array, got {a.dtype}")
  perm, inverse, sizes = (a.astype(jnp.int32) for a in (perm, inverse, sizes))
  ok = sort_matches(assign.key, perm, inverse, sizes)
  given = _Sort(perm, inverse, sizes, jnp.cumsum(sizes) - sizes)
  # Only the taken branch runs: a matching permutation costs the check above, nothing more.
  s = lax.cond(ok, lambda: given, lambda: _argsort(assign))
  return s._replace(precomputed_used=ok)


def _metrics(s: _Sort, kept: Array, active: Array, num_experts: int) -> Metrics:
  num_active = jnp.sum(s.sizes)
  num_dropped = num_active - jnp.sum(kept & active)
  metrics = {
      "group_sizes": s.sizes.reshape(-1, num_experts).sum(axis=0).astype(jnp.int32),
      "dropped_fraction": (num_dropped / jnp.maximum(num_active, 1)).astype(jnp.float32),
  }
  if s.precomputed_used is not None:
    metrics["sort_precomputed"] = s.precomputed_used.astype(jnp.float32)
  return metrics


def _metrics_unsorted(assign: _Assignments, kept: Array, num_experts: int) -> Metrics:
  sizes = jnp.bincount(assign.key, length=assign.num_groups + 1)[:assign.num_groups]
  s = _Sort(None, None, sizes.astype(jnp.int32), None)
  return _metrics(s, kept, assign.key < assign.num_groups, num_experts)


# ----------------------------------------------------------------------------------------------
# Dispatch plans: how per-token rows reach the per-group buffers and come back.
# ----------------------------------------------------------------------------------------------


class _Plan(Protocol):
  """How rows travel between token order and the per-group buffers of one dispatch."""
  kept: Array  # bool[tokens, H]: the assignment is active and fits its group's capacity

  def gather(self, rows: Array) -> Array:  # [tokens, k] -> buffer of per-group rows [..., k]
    ...

  def matmul(self, buf: Array, w: Array) -> Array:  # buffer [..., k], w [groups, k, n] -> [..., n]
    ...

  def scatter(self, buf: Array) -> Array:  # buffer [..., n] -> [tokens, H, n], zeros if not kept
    ...


class _IndexPlan:
  """Dispatch by row gathers: buffer row src[r] <- assignment, assignment a -> buffer row dst[a].

  Serves both the sorted (buffer = sorted assignments) and the capacity (buffer = [G * C] padded
  slots) dispatches; both directions are `_take_rows`, so no scatter appears in either pass.
  """

  def __init__(self, assign: _Assignments, src: Array, dst: Array,
               matmul: Callable[[Array, Array], Array], buffer_rows: Sequence[int],
               ffn: Optional[Callable[[Array, Array, Array, Activation], Array]] = None):
    self._assign = assign
    self._src = src
    self._dst = dst
    self._matmul = matmul
    self._buffer_rows = tuple(buffer_rows)
    # ffn(buf, wi, wo, activation) computes act(buf @ wi) @ wo in one fused pass (None: two matmuls).
    self.ffn = ffn
    self.kept = (dst < math.prod(buffer_rows)).reshape(assign.num_columns, assign.num_tokens).T

  def gather(self, rows: Array) -> Array:
    """rows: [tokens, k] -> buffer [*buffer_rows, k]."""
    per_assignment = rows
    if self._assign.num_columns > 1:
      per_assignment = jnp.tile(rows, (self._assign.num_columns, 1))  # column-major assignments
    buf = _take_rows(per_assignment, self._src, self._dst)
    return buf.reshape(self._buffer_rows + rows.shape[1:])

  def matmul(self, buf: Array, w: Array) -> Array:
    return self._matmul(buf, w)

  def scatter(self, buf: Array) -> Array:
    """buffer [*buffer_rows, n] -> [tokens, columns, n]; dropped assignments get zeros."""
    n = buf.shape[-1]
    out = _take_rows(buf.reshape(-1, n), self._dst, self._src)
    return out.reshape(self._assign.num_columns, self._assign.num_tokens, n).transpose(1, 0, 2)


def _sorted_plan(assign: _Assignments, s: _Sort, group_matmul: Optional[GroupMatmul],
                 fuse_ffn: bool = False) -> _IndexPlan:
  num_assignments = assign.key.shape[0]
  positions = jnp.arange(num_assignments, dtype=jnp.int32)
  # Inactive assignments sort last (key = num_groups); their rows stay zero and are never read.
  src = jnp.where(positions < jnp.sum(s.sizes), s.perm, num_assignments)
  dst = jnp.where(assign.key < assign.num_groups, s.inverse, num_assignments)
  ffn = None
  if fuse_ffn:
    if group_matmul is not None:
      raise ValueError("fuse_ffn=True runs hashmoe.kernels.cpu.grouped_ffn and takes no "
                       f"group_matmul (got {group_matmul!r})")
    ffn = lambda buf, wi, wo, act: cpu_kernels.grouped_ffn(buf, wi, wo, s.sizes, act)  # noqa: E731
  if group_matmul is None:
    group_matmul = cpu_kernels.gmm
  # Kernels may accumulate into a wider dtype (gmm: float32); keep the compute dtype throughout.
  matmul = lambda buf, w: group_matmul(buf, w, s.sizes).astype(buf.dtype)  # noqa: E731
  return _IndexPlan(assign, src, dst, matmul, (num_assignments,), ffn)


def _capacity_plan(assign: _Assignments, s: _Sort, capacity: int) -> _IndexPlan:
  g, c = assign.num_groups, capacity
  num_assignments = assign.key.shape[0]
  # Slot (group, position) holds the position-th assignment of the group in column-major order.
  position = jnp.arange(c, dtype=jnp.int32)[None, :]
  filled = position < jnp.minimum(s.sizes, c)[:, None]
  sorted_pos = jnp.minimum(s.starts[:, None] + position, num_assignments - 1)
  src = jnp.where(filled, s.perm[sorted_pos], num_assignments).reshape(g * c)
  group = jnp.minimum(assign.key, g - 1)
  pos_in_group = s.inverse - s.starts[group]
  kept = (assign.key < g) & (pos_in_group < c)
  dst = jnp.where(kept, group * c + pos_in_group, g * c)
  return _IndexPlan(assign, src, dst, lambda buf, w: jnp.einsum("gck,gkn->gcn", buf, w), (g, c))


class _OneHotPlan:
  """GShard / flaxformer dispatch: a one-hot [columns, tokens, groups, capacity] tensor."""

  def __init__(self, assign: _Assignments, capacity: int, dtype: Any):
    g, c = assign.num_groups, capacity
    mask = jax.nn.one_hot(assign.key, g, dtype=jnp.int32)  # inactive (key = g) -> all-zero row
    # Position in group by a cumulative sum in assignment (column-major) order.
    position = jnp.sum(jnp.cumsum(mask, axis=0) * mask, axis=1) - 1
    kept = (assign.key < g) & (position < c)
    slot = jax.nn.one_hot(jnp.where(kept, position, c), c, dtype=jnp.int32)  # dropped -> zeros
    dispatch = mask[:, :, None] * slot[:, None, :]
    self._dispatch = dispatch.astype(dtype).reshape(assign.num_columns, assign.num_tokens, g, c)
    self.kept = kept.reshape(assign.num_columns, assign.num_tokens).T

  def gather(self, rows: Array) -> Array:
    return jnp.einsum("htgc,tk->gck", self._dispatch, rows)

  def matmul(self, buf: Array, w: Array) -> Array:
    return jnp.einsum("gck,gkn->gcn", buf, w)

  def scatter(self, buf: Array) -> Array:
    return jnp.einsum("htgc,gcn->thn", self._dispatch, buf)


def _expert_ffn(plan: _Plan, x: Array, combine_weight: Array, wi: Array, wo: Array,
                activation: Activation, num_slices: int) -> Array:
  """The (MultiHash) expert FFN on top of any dispatch plan; see the module docstring."""
  tokens, d_model = x.shape
  wi_g, wo_g = _group_weights(wi, wo, num_slices)
  weight = combine_weight.astype(x.dtype)
  # Named scopes, so that a profile (and the HLO metadata) shows each piece of the layer by name.
  permute = jax.named_scope("permute")(plan.gather)

  def gather(rows):
    # Named for the "save_dispatch" remat policy: the rows at their experts are what it keeps.
    return checkpoint_name(permute(rows), DISPATCH_CHECKPOINT_NAME)

  matmul = jax.named_scope("grouped_matmul")(plan.matmul)
  scatter = jax.named_scope("unpermute")(plan.scatter)
  if num_slices == 1:
    # Top-k: each assignment is an independent full FFN, so the activation runs inside the buffer.
    ffn = getattr(plan, "ffn", None)
    if ffn is not None:
      with jax.named_scope("grouped_matmul"):
        buf = ffn(gather(x), wi_g, wo_g, activation)
      out = scatter(buf)
    else:
      hidden = activation(matmul(gather(x), wi_g))
      out = scatter(matmul(hidden, wo_g))  # [tokens, H, d_model]
    with jax.named_scope("combine"):
      if out.shape[1] == 1:
        return out[:, 0] * weight
      return jnp.einsum("thd,th->td", out, weight)
  # MultiHash (Sec. 3.2): v = act([A_{k_1}(h); ...; A_{k_N}(h)]) needs all N slices of a token
  # together, so the first layer's output returns to token order before the activation.
  pre = scatter(matmul(gather(x), wi_g))  # [tokens, N, d_ff / N]
  v = jnp.where(plan.kept[..., None], activation(pre), 0).reshape(tokens, -1)
  out = scatter(matmul(gather(v), wo_g))  # [tokens, N, d_model / N]
  with jax.named_scope("combine"):
    return (out * weight[..., None]).reshape(tokens, d_model)


# ----------------------------------------------------------------------------------------------
# Dispatches (pure functions; all share one signature).
# ----------------------------------------------------------------------------------------------


def sorted_ffn(
    x: Array,
    expert_index: Array,
    combine_weight: Array,
    wi: Array,
    wo: Array,
    *,
    activation: Activation,
    num_slices: int = 1,
    group_matmul: Optional[GroupMatmul] = None,
    sorted_assignments: Optional[expert_grouping.SortedAssignments] = None,
    fuse_ffn: bool = False,
) -> tuple[Array, Metrics]:
  """Dropless expert FFN: sort assignments by group, grouped matmuls, unsort, combine.

  Args:
    x: float[tokens, d_model].
    expert_index: int32[tokens, H]; H = num_slices for MultiHash. Out of range = skipped.
    combine_weight: float[tokens, H]; 0 skips the assignment.
    wi: float[num_experts, d_model, d_ff], the A of each expert.
    wo: float[num_experts, d_ff, d_model], the B of each expert.
    activation: elementwise nonlinearity.
    num_slices: N for MultiHash (Sec. 3.2); 1 for top-H routing.
    group_matmul: grouped matmul `(lhs [m, k], rhs [G, k, n], group_sizes int32[G]) -> [m, n]`;
      None (default) uses the XLA:CPU window kernels (`hashmoe.kernels.cpu.gmm`).
    sorted_assignments: optional precomputed grouping of the assignments (hash routing, see the
      module docstring); checked, and used instead of the on-device argsort.
    fuse_ffn: for top-k (num_slices == 1), compute each expert's whole FFN window by window with
      `hashmoe.kernels.cpu.grouped_ffn` (no [assignments, d_ff] intermediates beyond the saved
      pre-activations; slower than two grouped matmuls where measured). Needs group_matmul=None.

  Returns:
    y: float[tokens, d_model] and metrics {group_sizes: int32[num_experts], dropped_fraction: 0,
    sort_precomputed (only with sorted_assignments)}.
  """
  _check_inputs(x, expert_index, combine_weight, wi, wo, num_slices)
  assign = _assignments(expert_index, combine_weight, wi.shape[0], num_slices)
  s = _sort(assign, sorted_assignments)
  plan = _sorted_plan(assign, s, group_matmul, fuse_ffn)
  y = _expert_ffn(plan, x, combine_weight, wi, wo, activation, num_slices)
  return y, _metrics(s, plan.kept.T.reshape(-1), assign.key < assign.num_groups, wi.shape[0])


def ragged_dot_ffn(
    x: Array,
    expert_index: Array,
    combine_weight: Array,
    wi: Array,
    wo: Array,
    *,
    activation: Activation,
    num_slices: int = 1,
    sorted_assignments: Optional[expert_grouping.SortedAssignments] = None,
) -> tuple[Array, Metrics]:
  """`sorted_ffn` with `jax.lax.ragged_dot` as the grouped matmul (shapes as in `sorted_ffn`)."""
  return sorted_ffn(x, expert_index, combine_weight, wi, wo, activation=activation,
                    num_slices=num_slices, group_matmul=jax.lax.ragged_dot,
                    sorted_assignments=sorted_assignments)


def einsum_ffn(
    x: Array,
    expert_index: Array,
    combine_weight: Array,
    wi: Array,
    wo: Array,
    *,
    activation: Activation,
    num_slices: int = 1,
    capacity_factor: Optional[float] = None,
) -> tuple[Array, Metrics]:
  """GShard / flaxformer one-hot dispatch and combine einsums with a static capacity.

  Each group (expert, or (slice, expert) for MultiHash) has `expert_capacity(...)` slots, filled in
  column-major assignment order; assignments past it are dropped (metrics `dropped_fraction`).
  `capacity_factor=None` pads to the worst case (dropless). The dispatch tensor is
  float[H, tokens, groups, capacity]: quadratic in tokens, kept to compare with the anchors.
  Shapes as in `sorted_ffn`.
  """
  _check_inputs(x, expert_index, combine_weight, wi, wo, num_slices)
  tokens, columns = expert_index.shape
  capacity = expert_capacity(tokens, wi.shape[0], num_columns=columns, num_slices=num_slices,
                             capacity_factor=capacity_factor)
  assign = _assignments(expert_index, combine_weight, wi.shape[0], num_slices)
  plan = _OneHotPlan(assign, capacity, x.dtype)
  y = _expert_ffn(plan, x, combine_weight, wi, wo, activation, num_slices)
  return y, _metrics_unsorted(assign, plan.kept.T.reshape(-1), wi.shape[0])


def capacity_ffn(
    x: Array,
    expert_index: Array,
    combine_weight: Array,
    wi: Array,
    wo: Array,
    *,
    activation: Activation,
    num_slices: int = 1,
    capacity_factor: Optional[float] = None,
    sorted_assignments: Optional[expert_grouping.SortedAssignments] = None,
) -> tuple[Array, Metrics]:
  """Sort by group into capacity-padded [groups, capacity, d] buffers and run batched matmuls.

  Drops exactly the assignments `einsum_ffn` drops (same capacity, same priority) but moves rows
  with gathers instead of one-hot einsums, so it is linear in tokens. `capacity_factor=None` pads
  to the worst case (dropless, at up to num_experts times the FLOPs). Shapes as in `sorted_ffn`;
  a precomputed `sorted_assignments` (stable, as `expert_grouping.precompute_routing` makes it)
  replaces the argsort.
  """
  _check_inputs(x, expert_index, combine_weight, wi, wo, num_slices)
  tokens, columns = expert_index.shape
  capacity = expert_capacity(tokens, wi.shape[0], num_columns=columns, num_slices=num_slices,
                             capacity_factor=capacity_factor)
  assign = _assignments(expert_index, combine_weight, wi.shape[0], num_slices)
  s = _sort(assign, sorted_assignments)
  plan = _capacity_plan(assign, s, capacity)
  y = _expert_ffn(plan, x, combine_weight, wi, wo, activation, num_slices)
  return y, _metrics(s, plan.kept.T.reshape(-1), assign.key < assign.num_groups, wi.shape[0])


def _pallas_gmm() -> GroupMatmul:
  # Imported on use: the Pallas modules are only needed when this dispatch is asked for.
  return importlib.import_module("hashmoe.kernels").gmm


def _expert_parallel_ffn() -> ExpertFn:
  # Imported on use: hashmoe.sharding imports this module for its local expert computation.
  return importlib.import_module("hashmoe.sharding").expert_parallel_ffn


def dispatch_fn(name: str) -> ExpertFn:
  """The pure expert function of a dispatch name (not "auto"; see `choose_dispatch`).

  "pallas" and "expert_parallel" import their modules here, so a missing one fails with a clear
  ImportError only when asked for.
  """
  if name == "sorted":
    return sorted_ffn
  if name == "ragged_dot":
    return ragged_dot_ffn
  if name == "einsum":
    return einsum_ffn
  if name == "capacity":
    return capacity_ffn
  if name == "pallas":
    return functools.partial(sorted_ffn, group_matmul=_pallas_gmm())
  if name == "expert_parallel":
    return _expert_parallel_ffn()
  raise ValueError(
      f"unknown dispatch {name!r}; expected one of {[d for d in DISPATCHES if d != 'auto']}")


# Dispatches that accept a precomputed `sorted_assignments` (hash routing).
PRESORTED_DISPATCHES = ("sorted", "ragged_dot", "pallas", "capacity")


def choose_dispatch(backend: str, *, capacity_factor: Optional[float] = None) -> str:
  """What dispatch="auto" runs: the one decision tree for picking a dispatch.

  * A capacity_factor asks for dropping semantics: "capacity" (same drops as the one-hot "einsum",
    linear rather than quadratic in tokens).
  * TPU / GPU: "pallas", the grouped-matmul kernel over sorted tokens (dropless, no padding).
  * CPU: "sorted" with its default XLA:CPU window kernels (`hashmoe.kernels.cpu`), the fastest
    dropless path measured (benchmarks/moe_layer.py, docs/PERFORMANCE.md): ~19x faster than
    `jax.lax.ragged_dot`, which lowers densely on XLA:CPU, and never padded to the heaviest expert.
  """
  if capacity_factor is not None:
    return "capacity"
  if backend in ("tpu", "gpu", "cuda", "rocm"):
    return "pallas"
  return "sorted"


# ----------------------------------------------------------------------------------------------
# Flax module: where the parameters live.
# ----------------------------------------------------------------------------------------------

# flaxformer's expert kernels: fan-in scaled truncated normal, the expert axis a batch axis.
default_kernel_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))


class Experts(nn.Module):
  """num_experts stacked FFNs `B(act(A(h)))` (no biases, T5 / flaxformer style) and their dispatch.

  Attributes:
    num_experts: E, the number of experts.
    d_ff: D, the hidden size of each expert (MultiHash splits it into num_slices pieces).
    num_slices: N hashes for MultiHash (Hash Layers Sec. 3.2); 1 otherwise.
    activation: a name in `hashmoe.activations.ACTIVATIONS` ("relu" is the paper's).
    dispatch: one of DISPATCHES; "auto" asks `choose_dispatch(jax.default_backend(), ...)`.
    capacity_factor: per-group capacity for the dropping dispatches ("einsum", "capacity",
      "expert_parallel" if it drops); None means dropless.
    dtype: compute dtype (float32 or bfloat16); parameters are cast to it.
    param_dtype: parameter storage dtype.
    kernel_init: initializer for wi [E, d_model, d_ff] and wo [E, d_ff, d_model].
    dispatch_kwargs: extra keyword arguments for the dispatch function (e.g. the mesh and axis
      names of "expert_parallel").
  """
  num_experts: int
  d_ff: int
  num_slices: int = 1
  activation: str = "relu"
  dispatch: str = "auto"
  capacity_factor: Optional[float] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: nn.initializers.Initializer = default_kernel_init
  dispatch_kwargs: Optional[Mapping[str, Any]] = None

  def _resolved_dispatch(self) -> str:
    if self.dispatch not in DISPATCHES:
      raise ValueError(f"unknown dispatch {self.dispatch!r}; expected one of {DISPATCHES}")
    if self.capacity_factor is not None and not self.capacity_factor > 0:
      raise ValueError(
          f"capacity_factor must be > 0 (or None for dropless), got {self.capacity_factor}")
    name = self.dispatch
    if name == "auto":
      name = choose_dispatch(jax.default_backend(), capacity_factor=self.capacity_factor)
    if name in DROPLESS_DISPATCHES and self.capacity_factor is not None:
      raise ValueError(
          f"dispatch={name!r} is dropless and takes no capacity_factor (got "
          f"{self.capacity_factor}); use 'capacity' or 'einsum' for a capacity limit")
    return name

  @nn.compact
  def __call__(self, x: Array, routing: Routing) -> tuple[Array, Metrics]:
    """x: float[tokens, d_model] -> (y: dtype[tokens, d_model], metrics)."""
    if self.num_experts < 1:
      raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
    activation = get_activation(self.activation)
    if x.ndim != 2:
      raise ValueError(f"Experts expects x: float[tokens, d_model], got shape {x.shape}")
    tokens, d_model = x.shape
    if self.num_slices < 1 or self.d_ff % self.num_slices or d_model % self.num_slices:
      raise ValueError(
          f"num_slices={self.num_slices} must be >= 1 and divide d_ff={self.d_ff} and "
          f"d_model={d_model}")
    index, weight = routing.expert_index, routing.combine_weight
    expected_columns = f"{self.num_slices}" if self.num_slices > 1 else "H"
    if index.ndim != 2 or index.shape[0] != tokens or weight.shape != index.shape or (
        self.num_slices > 1 and index.shape[1] != self.num_slices):
      raise ValueError(
          f"routing must have expert_index and combine_weight of shape [tokens={tokens}, "
          f"{expected_columns}], got {index.shape} and {weight.shape}")
    name = self._resolved_dispatch()

    wi = self.param(
        "wi", nn.with_logical_partitioning(self.kernel_init, ("expert", "embed", "mlp")),
        (self.num_experts, d_model, self.d_ff), self.param_dtype)
    wo = self.param(
        "wo", nn.with_logical_partitioning(self.kernel_init, ("expert", "mlp", "embed")),
        (self.num_experts, self.d_ff, d_model), self.param_dtype)

    kwargs = dict(self.dispatch_kwargs or {})
    if self.capacity_factor is not None:
      kwargs["capacity_factor"] = self.capacity_factor
    if routing.sorted_assignments is not None and name in PRESORTED_DISPATCHES:
      kwargs["sorted_assignments"] = routing.sorted_assignments
    return dispatch_fn(name)(
        jnp.asarray(x, self.dtype), index, weight.astype(self.dtype),
        jnp.asarray(wi, self.dtype), jnp.asarray(wo, self.dtype),
        activation=activation, num_slices=self.num_slices, **kwargs)
