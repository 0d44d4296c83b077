"""Grouped matmuls and a fused grouped FFN for XLA:CPU, as loops of dense window matmuls.

XLA:CPU has no grouped-matmul kernel: `jax.lax.ragged_dot` lowers to a dense computation over every
group (~19x a dense matmul of the same FLOPs at 16 groups), padding every group to the largest one
costs the imbalance of the batch (hash routing of real text puts 4-9x the mean load on the expert
holding the most frequent token), and the Pallas kernels only run interpreted. Here each group is cut
into row windows and every window is one ordinary dense matmul (YNNPACK/Eigen) against its group's
weight matrix, inside `lax.fori_loop`s whose trip counts come from `group_sizes` at run time. Nothing
is padded to the heaviest group and no row is dropped.

Window plan. Rows are sorted by group; group g owns rows [offset_g, offset_g + size_g). Groups are
visited in order, and within a group
  * first one *remainder* window of `r_g = size_g % tile` rows, rounded up to a multiple of `sub`
    (at most `sub - 1` wasted rows per group), so that only `tile // sub` static window shapes
    exist. Each shape has its own loop with a trip count of 0 or 1 (a `lax.switch` or `lax.cond`
    would copy the carried output buffers on every call);
  * then `size_g // tile` full windows of `tile` rows, which need no mask.
A remainder window may start early (clamped to the end of the array) or run past its group; its row
mask keeps every read and write inside the group, so windows can be visited in any order and rows
past sum(group_sizes) are never touched.

Tile sizes: `tile=256, sub=16` (16 remainder shapes). A group of up to 256 rows is then one window,
so its weights are packed for the matmul once per pass; at 64 experts x 8192 rows (128 rows per
expert on average) this measured ~5% faster than `tile=128` over a whole forward + backward, and
larger tiles (384, 512) gained nothing more.

Why group order and remainder first: the transposed product (`tgmm`, the weight gradient) accumulates
one [k, n] slab per group. Visiting a group's windows back to back keeps that slab in cache, and the
group's first window *writes* the slab instead of adding to it, so a group that fits in one window
(most groups at 64 experts x 128 rows each) costs one write of its slab and no read-modify-write.

What it costs (2-core development machine, float32, 8192 rows, k=512, n=2048, 64 groups from real
text): a grouped matmul takes ~1.2x the time of one dense matmul over the same rows, the weight
gradient ~1.4x. The difference is memory traffic, not loop overhead (the loops cost < 1 ms): every
window reads and packs its group's 4 MB weight matrix for the matmul (G x 4 MB per pass, where the
dense matmul packs one), and `tgmm` writes (and XLA zero-initialises: a loop carry, and `lax.scan`'s
stacked outputs alike, must start initialised, and `lax.empty` is zeros on CPU) G x k x n floats,
64x the bytes of a dense layer's weight gradient, into memory XLA:CPU allocates afresh every step
(page faults, unless malloc hands out huge pages). Variants that removed the row masks (a padded
per-group layout), the window transposes (Eigen's transposed-operand dot) or the zero-init (stacked
per-group slabs) measured within noise of, or slower than, this kernel. See docs/PERFORMANCE.md.

Public functions:
  gmm(lhs, rhs, group_sizes)        out[r] = lhs[r] @ rhs[g(r)]          (custom VJP)
  tgmm(lhs, rhs, group_sizes)       out[g] = lhs[rows of g]^T rhs[rows of g]   (custom VJP)
  grouped_ffn(x, wi, wo, group_sizes, activation)
                                    out[r] = act(x[r] @ wi[g]) @ wo[g]   (custom VJP)
`gmm` and `tgmm` follow the contract of the Pallas kernels in `ops.py`: rows past sum(group_sizes)
give zeros in `gmm` and are ignored by `tgmm`; groups are clipped at row m.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from hashmoe.kernels import common

Array = jax.Array
Activation = Callable[[Array], Array]

DEFAULT_TILE = 256
DEFAULT_SUB = 16


class WindowPlan(NamedTuple):
  """Run-time window metadata derived from group sizes (all int32[G]).

  offsets: first row of each group. sizes: rows of each group, clipped at row m. full: full windows
  (`sizes // tile`). remainder: rows in the remainder window (`sizes % tile`, 0 if none).
  remainder_class: c >= 1 when the remainder window has min(c * sub, m) rows; 0 when there is none.
  """
  offsets: Array
  sizes: Array
  full: Array
  remainder: Array
  remainder_class: Array


def _check_tiling(tile: int, sub: int) -> None:
  if not (isinstance(tile, int) and isinstance(sub, int)) or tile <= 0 or sub <= 0 or tile % sub:
    raise ValueError(f"tile must be a positive multiple of sub (both ints); got tile={tile!r}, "
                     f"sub={sub!r}")


def window_plan(group_sizes: Array, m: int, tile: int = DEFAULT_TILE,
                sub: int = DEFAULT_SUB) -> WindowPlan:
  """Plans the windows over `m` rows for `group_sizes: int[G]` (see the module docstring)."""
  _check_tiling(tile, sub)
  requested = jnp.maximum(jnp.asarray(group_sizes, jnp.int32), 0)
  # Clip at row m like the Pallas kernels: group g spans [min(start_g, m), min(end_g, m)).
  ends = jnp.cumsum(requested)
  offsets = jnp.minimum(ends - requested, m)
  sizes = jnp.minimum(ends, m) - offsets
  full = sizes // tile
  remainder = sizes - full * tile
  return WindowPlan(offsets, sizes, full, remainder, (remainder + sub - 1) // sub)


def _window_sizes(m: int, tile: int, sub: int) -> list[tuple[int, int]]:
  """(class, rows) of the remainder windows that can occur for m rows; rows never exceed m."""
  out = []
  for c in range(1, tile // sub + 1):
    if (c - 1) * sub >= m:  # a remainder is at most m rows, already covered by the last class
      break
    out.append((c, min(c * sub, m)))
  return out


def _for_each_window(plan: WindowPlan, m: int, tile: int, sub: int, visit, carry):
  """carry = visit(carry, g, start, rows, mask, first) for every window, in group order.

  `rows` is static. `mask` is None for a full window, else bool[rows] selecting the group's rows of
  the window. `first` (static) is True for the first window of a group (only then may `visit`
  overwrite per-group accumulators instead of adding to them).
  """
  num_groups = plan.sizes.shape[0]
  remainder_sizes = _window_sizes(m, tile, sub)

  def group_body(g, carry):
    offset = plan.offsets[g]
    for c, rows in remainder_sizes:

      def remainder_window(i, carry, rows=rows):
        # `+ i` (i is always 0 here) keeps the window inside its 0/1-trip loop: without it XLA hoists
        # the loop-invariant window out and computes every class's window for every group.
        start = jnp.minimum(offset + i, m - rows)
        index = start + jnp.arange(rows, dtype=jnp.int32)
        mask = (index >= offset) & (index < offset + plan.remainder[g])
        return visit(carry, g, start, rows, mask, True)

      trips = (plan.remainder_class[g] == c).astype(jnp.int32)
      carry = lax.fori_loop(0, trips, remainder_window, carry)
    if tile > m:  # no group can hold a full window
      return carry
    base = offset + plan.remainder[g]
    has_remainder = plan.remainder[g] > 0

    def first_full_window(i, carry):
      return visit(carry, g, base + i, tile, None, True)

    def full_window(i, carry):
      return visit(carry, g, base + i * tile, tile, None, False)

    trips = ((~has_remainder) & (plan.full[g] > 0)).astype(jnp.int32)
    carry = lax.fori_loop(0, trips, first_full_window, carry)
    return lax.fori_loop(jnp.where(has_remainder, 0, 1), plan.full[g], full_window, carry)

  return lax.fori_loop(0, num_groups, group_body, carry)


# ----------------------------------------------------------------------------------------------
# Window products.
# ----------------------------------------------------------------------------------------------


def _matmul(a: Array, b: Array, transpose_b: bool = False) -> Array:
  """a @ b (or a @ b^T), accumulated in float32."""
  dims = (((1,), (1,)), ((), ())) if transpose_b else (((1,), (0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _matmul_tn(a: Array, b: Array) -> Array:
  """a^T @ b over the rows of a window, accumulated in float32.

  The window is transposed explicitly (a small copy) so that XLA:CPU hands the product to its
  YNNPACK matmul; a dot contracting dimension 0 of both operands falls back to a slower emitter.
  """
  return lax.dot_general(lax.optimization_barrier(a.T), b, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _group(w: Array, g: Array) -> Array:
  return lax.dynamic_index_in_dim(w, g, keepdims=False)


def _write_rows(buf: Array, rows: Array, start: Array, mask: Optional[Array]) -> Array:
  """buf[start:start + len(rows)] = rows where mask (all rows if mask is None)."""
  rows = rows.astype(buf.dtype)
  if mask is not None:
    old = lax.dynamic_slice_in_dim(buf, start, rows.shape[0])
    rows = jnp.where(mask[:, None], rows, old)
  return lax.dynamic_update_slice_in_dim(buf, rows, start, 0)


def _accumulate(acc: Array, g: Array, value: Array, first: bool) -> Array:
  """acc[g] = value (a group's first window) or acc[g] + value."""
  if not first:
    value = value + _group(acc, g)
  return lax.dynamic_update_index_in_dim(acc, value.astype(acc.dtype), g, 0)


def _rows_of(x: Array, start: Array, rows: int, mask: Optional[Array]) -> Array:
  """x[start:start + rows], zeroed outside mask."""
  window = lax.dynamic_slice_in_dim(x, start, rows)
  if mask is not None:
    window = jnp.where(mask[:, None], window, jnp.zeros((), window.dtype))
  return window


# ----------------------------------------------------------------------------------------------
# gmm / tgmm.
# ----------------------------------------------------------------------------------------------


def _gmm_impl(lhs, rhs, group_sizes, transpose_rhs, tile, sub, out_dtype):
  m = lhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  plan = window_plan(group_sizes, m, tile, sub)

  def visit(out, g, start, rows, mask, first):
    del first
    x = lax.dynamic_slice_in_dim(lhs, start, rows)
    return _write_rows(out, _matmul(x, _group(rhs, g), transpose_rhs), start, mask)

  return _for_each_window(plan, m, tile, sub, visit, jnp.zeros((m, n), out_dtype))


def _tgmm_impl(lhs, rhs, group_sizes, tile, sub, out_dtype):
  m, k = lhs.shape
  n = rhs.shape[1]
  num_groups = group_sizes.shape[0]
  plan = window_plan(group_sizes, m, tile, sub)

  def visit(acc, g, start, rows, mask, first):
    x = _rows_of(lhs, start, rows, mask)
    y = lax.dynamic_slice_in_dim(rhs, start, rows)
    return _accumulate(acc, g, _matmul_tn(x, y), first)

  # Groups with no rows are never visited and keep these zeros.
  acc = jnp.zeros((num_groups, k, n), jnp.float32)
  return _for_each_window(plan, m, tile, sub, visit, acc).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(lhs, rhs, group_sizes, transpose_rhs, tile, sub):
  return _gmm_impl(lhs, rhs, group_sizes, transpose_rhs, tile, sub, lhs.dtype)


def _gmm_fwd(lhs, rhs, group_sizes, transpose_rhs, tile, sub):
  return _gmm(lhs, rhs, group_sizes, transpose_rhs, tile, sub), (lhs, rhs, group_sizes)


def _gmm_bwd(transpose_rhs, tile, sub, residuals, dout):
  lhs, rhs, group_sizes = residuals
  # out = lhs @ rhs[g]   : dlhs = dout @ rhs[g]^T, drhs[g] = lhs_g^T dout_g
  # out = lhs @ rhs[g]^T : dlhs = dout @ rhs[g],   drhs[g] = dout_g^T lhs_g
  dlhs = _gmm(dout.astype(lhs.dtype), rhs, group_sizes, not transpose_rhs, tile, sub)
  if transpose_rhs:
    drhs = _tgmm(dout.astype(lhs.dtype), lhs, group_sizes, tile, sub)
  else:
    drhs = _tgmm(lhs, dout.astype(lhs.dtype), group_sizes, tile, sub)
  return dlhs, drhs.astype(rhs.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tgmm(lhs, rhs, group_sizes, tile, sub):
  return _tgmm_impl(lhs, rhs, group_sizes, tile, sub, lhs.dtype)


def _tgmm_fwd(lhs, rhs, group_sizes, tile, sub):
  return _tgmm(lhs, rhs, group_sizes, tile, sub), (lhs, rhs, group_sizes)


def _tgmm_bwd(tile, sub, residuals, dout):
  lhs, rhs, group_sizes = residuals
  # out_g = lhs_g^T rhs_g  =>  dlhs_g = rhs_g dout_g^T,  drhs_g = lhs_g dout_g.
  dout = dout.astype(lhs.dtype)
  dlhs = _gmm(rhs.astype(lhs.dtype), dout, group_sizes, True, tile, sub)
  drhs = _gmm(lhs, dout, group_sizes, False, tile, sub)
  return dlhs, drhs.astype(rhs.dtype), None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


def gmm(lhs: Array, rhs: Array, group_sizes: Array, *, transpose_rhs: bool = False,
        tile: int = DEFAULT_TILE, sub: int = DEFAULT_SUB) -> Array:
  """Grouped matmul on XLA:CPU: `out[r] = lhs[r] @ rhs[g]` for each row r of group g.

  Args:
    lhs: float32|bfloat16[m, k], rows sorted by group: group g owns rows
      [sum(group_sizes[:g]), sum(group_sizes[:g + 1])), clipped at m.
    rhs: float32|bfloat16[G, k, n] (or [G, n, k] with `transpose_rhs`).
    group_sizes: int[G], non-negative.
    transpose_rhs: multiply by each group's matrix transposed, without materialising it.
    tile: rows of a full window; sub: granularity of the remainder windows (tile % sub == 0).

  Returns:
    lhs.dtype[m, n] (accumulated in float32); rows past sum(group_sizes) are zeros.
    Differentiable in lhs and rhs (the weight gradient is `tgmm`).
  """
  group_sizes = common.check_gmm_args(lhs, rhs, group_sizes, transpose_rhs)
  _check_tiling(tile, sub)
  if lhs.shape[0] == 0:
    return jnp.zeros((0, rhs.shape[1] if transpose_rhs else rhs.shape[2]), lhs.dtype)
  return _gmm(lhs, rhs.astype(lhs.dtype), group_sizes, bool(transpose_rhs), tile, sub)


def tgmm(lhs: Array, rhs: Array, group_sizes: Array, *, tile: int = DEFAULT_TILE,
         sub: int = DEFAULT_SUB) -> Array:
  """Transposed grouped matmul (the weight gradient of `gmm`): `out[g] = lhs_g^T @ rhs_g`.

  Args:
    lhs: float32|bfloat16[m, k]; rhs: float32|bfloat16[m, n], rows grouped as in `gmm`.
    group_sizes: int[G], non-negative; groups are clipped at row m.

  Returns:
    lhs.dtype[G, k, n] (accumulated in float32); empty groups give zeros and rows past
    sum(group_sizes) are ignored. Differentiable in lhs and rhs.
  """
  group_sizes = common.check_tgmm_args(lhs, rhs, group_sizes)
  _check_tiling(tile, sub)
  if lhs.shape[0] == 0:
    return jnp.zeros((group_sizes.shape[0], lhs.shape[1], rhs.shape[1]), lhs.dtype)
  return _tgmm(lhs, rhs.astype(lhs.dtype), group_sizes, tile, sub)


# ----------------------------------------------------------------------------------------------
# The fused grouped FFN.
# ----------------------------------------------------------------------------------------------


def _ffn_forward(x, wi, wo, group_sizes, activation, tile, sub):
  """Returns (y [m, d], pre-activations h [m, D]), both zero on rows past sum(group_sizes)."""
  m, d = x.shape
  d_ff = wi.shape[2]
  plan = window_plan(group_sizes, m, tile, sub)

  def visit(carry, g, start, rows, mask, first):
    del first
    y_buf, h_buf = carry
    h = _matmul(lax.dynamic_slice_in_dim(x, start, rows), _group(wi, g)).astype(x.dtype)
    y = _matmul(activation(h), _group(wo, g))
    return _write_rows(y_buf, y, start, mask), _write_rows(h_buf, h, start, mask)

  init = (jnp.zeros((m, d), x.dtype), jnp.zeros((m, d_ff), x.dtype))
  return _for_each_window(plan, m, tile, sub, visit, init)


def _ffn_backward(x, wi, wo, h, dy, group_sizes, activation, tile, sub):
  """(dx, dwi, dwo) of y = act(x wi[g]) wo[g], four window matmuls per window."""
  m = x.shape[0]
  plan = window_plan(group_sizes, m, tile, sub)

  def visit(carry, g, start, rows, mask, first):
    dx_buf, dwi, dwo = carry
    # Zeroing dy outside the group's rows zeroes every product of those rows below.
    dy_w = _rows_of(dy, start, rows, mask)
    x_w = lax.dynamic_slice_in_dim(x, start, rows)
    a_w, act_vjp = jax.vjp(activation, lax.dynamic_slice_in_dim(h, start, rows))
    da = _matmul(dy_w, _group(wo, g), transpose_b=True)
    (dh,) = act_vjp(da.astype(a_w.dtype))
    dx_w = _matmul(dh, _group(wi, g), transpose_b=True)
    dwo = _accumulate(dwo, g, _matmul_tn(a_w, dy_w), first)
    dwi = _accumulate(dwi, g, _matmul_tn(x_w, dh), first)
    return _write_rows(dx_buf, dx_w, start, mask), dwi, dwo

  init = (jnp.zeros(x.shape, x.dtype), jnp.zeros(wi.shape, jnp.float32),
          jnp.zeros(wo.shape, jnp.float32))
  dx, dwi, dwo = _for_each_window(plan, m, tile, sub, visit, init)
  return dx, dwi.astype(wi.dtype), dwo.astype(wo.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _grouped_ffn(x, wi, wo, group_sizes, activation, tile, sub):
  return _ffn_forward(x, wi, wo, group_sizes, activation, tile, sub)[0]


def _grouped_ffn_fwd(x, wi, wo, group_sizes, activation, tile, sub):
  y, h = _ffn_forward(x, wi, wo, group_sizes, activation, tile, sub)
  # Like the dense FFN under autodiff, keep the pre-activations [m, D] for the backward pass.
  return y, (x, wi, wo, h, group_sizes)


def _grouped_ffn_bwd(activation, tile, sub, residuals, dy):
  x, wi, wo, h, group_sizes = residuals
  dx, dwi, dwo = _ffn_backward(x, wi, wo, h, dy.astype(x.dtype), group_sizes, activation, tile,
                               sub)
  return dx, dwi, dwo, None


_grouped_ffn.defvjp(_grouped_ffn_fwd, _grouped_ffn_bwd)


def grouped_ffn(x: Array, wi: Array, wo: Array, group_sizes: Array, activation: Activation, *,
                tile: int = DEFAULT_TILE, sub: int = DEFAULT_SUB) -> Array:
  """Fused expert FFN over rows sorted by group: `out[r] = act(x[r] @ wi[g]) @ wo[g]`.

  Both matmuls and the activation run window by window, so the [window, D] hidden activations stay
  in cache instead of making [m, D] round trips through memory; the forward keeps the
  pre-activations (as autodiff of a dense FFN does) and the backward runs the four matmuls of each
  window together, accumulating each group's weight gradients in place. It needs less memory than
  `gmm` -> activation -> `gmm`, but on the development machine it ran slower (the four matmuls of
  a window compete for cache with two weight matrices and two gradient slabs); the measurements
  are in docs/PERFORMANCE.md. `hashmoe.experts.sorted_ffn(fuse_ffn=True)` uses it.

  Args:
    x: float32|bfloat16[m, d], rows sorted by group (as in `gmm`).
    wi: [G, d, D], the first matrix of each group's FFN; wo: [G, D, d], the second.
    group_sizes: int[G], non-negative; groups are clipped at row m.
    activation: elementwise, hashable (e.g. `jax.nn.relu`); differentiated with `jax.vjp`.
    tile, sub: window sizes as in `gmm`.

  Returns:
    x.dtype[m, d]; rows past sum(group_sizes) are zeros. Differentiable (once) in x, wi and wo.
  """
  if x.ndim != 2 or wi.ndim != 3 or wo.ndim != 3:
    raise ValueError(f"grouped_ffn expects x [m, d], wi [G, d, D], wo [G, D, d]; got {x.shape}, "
                     f"{wi.shape}, {wo.shape}")
  num_groups, d, d_ff = wi.shape
  if x.shape[1] != d or wo.shape != (num_groups, d_ff, d):
    raise ValueError(f"expected wi [G, {x.shape[1]}, D] and wo [G, D, {x.shape[1]}] with matching "
                     f"G and D for x {x.shape}; got wi {wi.shape} and wo {wo.shape}")
  for name, a in (("x", x), ("wi", wi), ("wo", wo)):
    common.check_float(name, a)
  _check_tiling(tile, sub)
  group_sizes = common.check_group_sizes(group_sizes, num_groups)
  if x.shape[0] == 0:
    return jnp.zeros(x.shape, x.dtype)
  return _grouped_ffn(x, wi.astype(x.dtype), wo.astype(x.dtype), group_sizes, activation, tile,
                      sub)
