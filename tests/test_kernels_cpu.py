"""Tests for hashmoe.kernels.cpu: the XLA:CPU window grouped matmuls and the fused grouped FFN.

The reference is a float64 numpy loop over groups (slices of rows, one dense product each) with
closed-form gradients; it shares no code with the kernels. Group sizes are run-time values, so each
jitted function compiles once per shape and every layout below reuses it. Small tiles (tile=8,
sub=4) make full windows, every remainder class and clamped remainder windows all occur at test
sizes.
"""
import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hashmoe.kernels import cpu

M, K, N, G = 45, 6, 5, 5
TILE, SUB = 8, 4

LAYOUTS = {
    "one_group_holds_everything": [0, 0, 45, 0, 0],
    "all_rows_in_first_group": [45, 0, 0, 0, 0],
    "all_rows_in_last_group": [0, 0, 0, 0, 45],
    "several_empty_groups": [0, 13, 0, 0, 32],
    "sizes_not_tile_multiples": [5, 9, 17, 3, 11],
    "tile_multiples": [8, 0, 16, 8, 13],
    "rows_past_the_groups": [3, 0, 20, 1, 7],  # 14 rows belong to no group
    "every_group_empty": [0, 0, 0, 0, 0],
    "sizes_overflow_m": [30, 30, 0, 0, 1],     # clipped at row m
    "last_window_clamped": [1, 0, 0, 0, 43],   # a remainder window must start before its group
}

NP_ACT = {
    "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(z.dtype)),
    "swish": (lambda z: z / (1.0 + np.exp(-z)),
              lambda z: (1.0 / (1.0 + np.exp(-z))) * (1.0 + z * (1.0 - 1.0 / (1.0 + np.exp(-z))))),
}
JAX_ACT = {"relu": jax.nn.relu, "swish": jax.nn.swish}


# ------------------------------------------------------------------------------------------------
# Reference.
# ------------------------------------------------------------------------------------------------


def group_rows(sizes, m):
  """[(start, end)] of each group, clipped at row m."""
  bounds, row = [], 0
  for size in sizes:
    end = min(row + int(size), m)
    bounds.append((row, end))
    row = end
  return bounds


def ref_gmm(lhs, rhs, sizes, transpose_rhs=False):
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out = np.zeros((lhs.shape[0], n))
  for g, (a, b) in enumerate(group_rows(sizes, lhs.shape[0])):
    out[a:b] = lhs[a:b] @ (rhs[g].T if transpose_rhs else rhs[g])
  return out


def ref_tgmm(lhs, rhs, sizes):
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  return np.stack([lhs[a:b].T @ rhs[a:b] for a, b in group_rows(sizes, lhs.shape[0])])


def ref_ffn_and_grads(x, wi, wo, sizes, dy, act):
  """y = act(x wi[g]) wo[g] per group, and (dx, dwi, dwo) for the cotangent dy, in float64."""
  f, df = NP_ACT[act]
  x, wi, wo, dy = (np.asarray(a, np.float64) for a in (x, wi, wo, dy))
  y, dx = np.zeros_like(x), np.zeros_like(x)
  dwi, dwo = np.zeros_like(wi), np.zeros_like(wo)
  for g, (a, b) in enumerate(group_rows(sizes, x.shape[0])):
    h = x[a:b] @ wi[g]
    y[a:b] = f(h) @ wo[g]
    dwo[g] = f(h).T @ dy[a:b]
    dh = (dy[a:b] @ wo[g].T) * df(h)
    dwi[g] = x[a:b].T @ dh
    dx[a:b] = dh @ wi[g].T
  return y, dx, dwi, dwo


def close(actual, expected, tol=1e-4):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol)


def data(seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  arrays = dict(
      lhs=rng.standard_normal((M, K)), rhs=rng.standard_normal((G, K, N)),
      rhs_t=rng.standard_normal((G, N, K)), rows_n=rng.standard_normal((M, N)),
      dout=rng.standard_normal((M, N)), dout_g=rng.standard_normal((G, K, N)),
      wo=rng.standard_normal((G, N, K)), dy=rng.standard_normal((M, K)))
  return {k: jnp.asarray(v, dtype) for k, v in arrays.items()}


# ------------------------------------------------------------------------------------------------
# gmm and tgmm with their VJPs.
# ------------------------------------------------------------------------------------------------


@functools.cache
def matmul_step():
  ops = dict(tile=TILE, sub=SUB)

  def step(lhs, rhs, rhs_t, rows_n, sizes, dout, dout_g):
    out, vjp = jax.vjp(lambda a, b: cpu.gmm(a, b, sizes, **ops), lhs, rhs)
    out_t, vjp_t = jax.vjp(lambda a, b: cpu.gmm(a, b, sizes, transpose_rhs=True, **ops), lhs,
                           rhs_t)
    t_out, t_vjp = jax.vjp(lambda a, b: cpu.tgmm(a, b, sizes, **ops), lhs, rows_n)
    return (out, *vjp(dout), out_t, *vjp_t(dout), t_out, *t_vjp(dout_g))

  return jax.jit(step)


def check_matmuls(d, sizes):
  got = matmul_step()(d["lhs"], d["rhs"], d["rhs_t"], d["rows_n"], jnp.asarray(sizes, jnp.int32),
                      d["dout"], d["dout_g"])
  lhs, rhs, rhs_t, rows_n, dout, dout_g = (
      np.asarray(d[k], np.float64) for k in ("lhs", "rhs", "rhs_t", "rows_n", "dout", "dout_g"))
  bounds = group_rows(sizes, M)
  # Closed forms: out = lhs_g W_g  =>  dlhs_g = dout_g W_g^T, dW_g = lhs_g^T dout_g; rows outside
  # every group get no gradient. tgmm: out_g = lhs_g^T R_g  =>  dlhs_g = R_g dout_g^T,
  # dR_g = lhs_g dout_g.
  want_dlhs_t = ref_gmm(dout, rhs_t, sizes)
  want_drhs_t = np.stack([dout[a:b].T @ lhs[a:b] for a, b in bounds])
  want_tgmm_dlhs = np.zeros_like(lhs)
  want_tgmm_drows = np.zeros_like(rows_n)
  for g, (a, b) in enumerate(bounds):
    want_tgmm_dlhs[a:b] = rows_n[a:b] @ dout_g[g].T
    want_tgmm_drows[a:b] = lhs[a:b] @ dout_g[g]
  want = (ref_gmm(lhs, rhs, sizes), ref_gmm(dout, rhs, sizes, transpose_rhs=True),
          ref_tgmm(lhs, dout, sizes), ref_gmm(lhs, rhs_t, sizes, transpose_rhs=True),
          want_dlhs_t, want_drhs_t, ref_tgmm(lhs, rows_n, sizes), want_tgmm_dlhs,
          want_tgmm_drows)
  names = ("gmm", "gmm dlhs", "gmm drhs", "gmm_t", "gmm_t dlhs", "gmm_t drhs", "tgmm",
           "tgmm dlhs", "tgmm drows")
  for name, a, b in zip(names, got, want):
    try:
      close(a, b)
    except AssertionError as e:
      raise AssertionError(f"{name} differs for group sizes {sizes}") from e


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gmm_tgmm_values_and_gradients_match_per_group_numpy(layout):
  check_matmuls(data(), LAYOUTS[layout])


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
@hypothesis.given(st.lists(st.integers(0, 20), min_size=G, max_size=G))
def test_gmm_tgmm_random_group_sizes(sizes):
  check_matmuls(data(1), sizes)


def test_rows_past_the_groups_are_exact_zeros_and_get_no_gradient():
  sizes = jnp.asarray([3, 0, 10, 0, 2], jnp.int32)  # 30 of 45 rows in no group
  lhs = jnp.full((M, K), jnp.nan, jnp.float32).at[:15].set(1.0)  # junk past the groups
  out = jax.jit(lambda a: cpu.gmm(a, data()["rhs"], sizes, tile=TILE, sub=SUB))(lhs)
  assert np.all(np.asarray(out[15:]) == 0.0)
  assert np.all(np.isfinite(np.asarray(out[:15])))
  dw = cpu.tgmm(lhs, jnp.ones((M, N)), sizes, tile=TILE, sub=SUB)
  assert np.all(np.isfinite(np.asarray(dw)))
  assert np.all(np.asarray(dw[1]) == 0.0) and np.all(np.asarray(dw[3]) == 0.0)  # empty groups


def test_default_tiles_with_one_group_larger_than_a_tile():
  # The default tiles with a group of 2 full windows and a remainder.
  rng = np.random.default_rng(3)
  big = 2 * cpu.DEFAULT_TILE + 3 * cpu.DEFAULT_SUB + 5
  m, sizes = big + 30, [7, big, 0, 13]
  lhs = jnp.asarray(rng.standard_normal((m, 16)), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal((4, 16, 8)), jnp.float32)
  dout = jnp.asarray(rng.standard_normal((m, 8)), jnp.float32)
  sizes_j = jnp.asarray(sizes, jnp.int32)
  close(cpu.gmm(lhs, rhs, sizes_j), ref_gmm(lhs, rhs, sizes))
  close(cpu.tgmm(lhs, dout, sizes_j), ref_tgmm(lhs, dout, sizes), tol=1e-3)


def test_bfloat16_inputs_accumulate_in_float32():
  d = data(2)
  sizes = [9, 0, 17, 11, 8]
  lhs, rhs = d["lhs"].astype(jnp.bfloat16), d["rhs"].astype(jnp.bfloat16)
  out = cpu.gmm(lhs, rhs, jnp.asarray(sizes), tile=TILE, sub=SUB)
  assert out.dtype == jnp.bfloat16
  close(out, ref_gmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes), tol=3e-2)
  dw = cpu.tgmm(lhs, d["rows_n"].astype(jnp.bfloat16), jnp.asarray(sizes), tile=TILE, sub=SUB)
  assert dw.dtype == jnp.bfloat16
  close(dw, ref_tgmm(lhs.astype(jnp.float32), d["rows_n"].astype(jnp.bfloat16).astype(
      jnp.float32), sizes), tol=1e-1)


# ------------------------------------------------------------------------------------------------
# The fused grouped FFN.
# ------------------------------------------------------------------------------------------------


@functools.cache
def ffn_step(act, tile, sub):
  def step(x, wi, wo, sizes, dy):
    y, vjp = jax.vjp(lambda a, b, c: cpu.grouped_ffn(a, b, c, sizes, JAX_ACT[act], tile=tile,
                                                     sub=sub), x, wi, wo)
    return (y, *vjp(dy))

  return jax.jit(step)


@pytest.mark.parametrize("layout", ["several_empty_groups", "sizes_not_tile_multiples",
                                    "rows_past_the_groups", "one_group_holds_everything",
                                    "sizes_overflow_m", "last_window_clamped",
                                    "every_group_empty"])
@pytest.mark.parametrize("act", ["relu", "swish"])
def test_grouped_ffn_values_and_gradients_match_per_group_numpy(layout, act):
  d = data(4)
  sizes = LAYOUTS[layout]
  # x [M, K], wi [G, K, N], wo [G, N, K]: d_model = K, d_ff = N.
  got = ffn_step(act, TILE, SUB)(d["lhs"], d["rhs"], d["wo"], jnp.asarray(sizes, jnp.int32),
                                 d["dy"])
  want = ref_ffn_and_grads(d["lhs"], d["rhs"], d["wo"], sizes, d["dy"], act)
  for name, a, b in zip(("y", "dx", "dwi", "dwo"), got, want):
    try:
      close(a, b)
    except AssertionError as e:
      raise AssertionError(f"{name} differs ({act}, sizes {sizes})") from e


def test_grouped_ffn_with_default_tiles():
  rng = np.random.default_rng(5)
  tile = cpu.DEFAULT_TILE
  m, sizes = 3 * tile, [0, tile + 12, 3, tile + 1, 0, 20]  # full windows and remainders
  x = jnp.asarray(rng.standard_normal((m, 8)), jnp.float32)
  wi = jnp.asarray(rng.standard_normal((6, 8, 12)) / 3, jnp.float32)
  wo = jnp.asarray(rng.standard_normal((6, 12, 8)) / 3, jnp.float32)
  dy = jnp.asarray(rng.standard_normal((m, 8)), jnp.float32)
  got = ffn_step("relu", cpu.DEFAULT_TILE, cpu.DEFAULT_SUB)(x, wi, wo, jnp.asarray(sizes), dy)
  for a, b in zip(got, ref_ffn_and_grads(x, wi, wo, sizes, dy, "relu")):
    close(a, b, tol=1e-3)


# ------------------------------------------------------------------------------------------------
# The window plan.
# ------------------------------------------------------------------------------------------------


@functools.cache
def coverage_fn(m, tile, sub):
  """Counts, per row, the windows whose mask covers it, and per group its first windows."""

  def fn(sizes):
    plan = cpu.window_plan(sizes, m, tile, sub)

    def visit(carry, g, start, rows, mask, first):
      count, firsts, owner = carry
      covered = jnp.ones((rows,), jnp.int32) if mask is None else mask.astype(jnp.int32)
      count = jax.lax.dynamic_update_slice(
          count, jax.lax.dynamic_slice(count, (start,), (rows,)) + covered, (start,))
      old = jax.lax.dynamic_slice(owner, (start,), (rows,))
      owner = jax.lax.dynamic_update_slice(owner, jnp.where(covered > 0, g, old), (start,))
      return count, firsts.at[g].add(int(first)), owner

    init = (jnp.zeros((m,), jnp.int32), jnp.zeros((sizes.shape[0],), jnp.int32),
            jnp.full((m,), -1, jnp.int32))
    return cpu._for_each_window(plan, m, tile, sub, visit, init)

  return jax.jit(fn)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(st.lists(st.integers(0, 25), min_size=G, max_size=G))
def test_windows_cover_each_group_row_once_and_nothing_else(sizes):
  count, firsts, owner = coverage_fn(M, TILE, SUB)(jnp.asarray(sizes, jnp.int32))
  want_owner = np.full(M, -1)
  for g, (a, b) in enumerate(group_rows(sizes, M)):
    want_owner[a:b] = g
  np.testing.assert_array_equal(np.asarray(count), (want_owner >= 0).astype(np.int32))
  np.testing.assert_array_equal(np.asarray(owner), want_owner)
  # Exactly one window per non-empty group overwrites instead of accumulating.
  nonempty = [b > a for a, b in group_rows(sizes, M)]
  np.testing.assert_array_equal(np.asarray(firsts), np.asarray(nonempty, np.int32))


def test_window_plan_fields():
  plan = cpu.window_plan(jnp.asarray([0, 19, 8, 30, 5]), 45, TILE, SUB)
  np.testing.assert_array_equal(plan.offsets, [0, 0, 19, 27, 45])
  np.testing.assert_array_equal(plan.sizes, [0, 19, 8, 18, 0])  # 30 rows clipped to 18, then 0
  np.testing.assert_array_equal(plan.full, [0, 2, 1, 2, 0])
  np.testing.assert_array_equal(plan.remainder, [0, 3, 0, 2, 0])
  np.testing.assert_array_equal(plan.remainder_class, [0, 1, 0, 1, 0])


def test_fewer_rows_than_a_window():
  # m = 3 < sub: the only window shape is 3 rows.
  x = jnp.asarray(np.arange(6, dtype=np.float32).reshape(3, 2))
  w = jnp.asarray(np.ones((2, 2, 4), np.float32))
  close(cpu.gmm(x, w, jnp.asarray([1, 2])), ref_gmm(x, w, [1, 2]))


# ------------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, error, match", [
    (lambda: cpu.gmm(jnp.ones((4, 3)), jnp.ones((2, 5, 2)), jnp.ones(2, jnp.int32)), ValueError,
     "contraction sizes differ"),
    (lambda: cpu.gmm(jnp.ones((4, 3)), jnp.ones((2, 3, 2)), jnp.ones(3, jnp.int32)), ValueError,
     r"group_sizes must have shape \(2,\)"),
    (lambda: cpu.gmm(jnp.ones((4, 3)), jnp.ones((2, 3, 2)), jnp.ones(2)), TypeError,
     "integer"),
    (lambda: cpu.gmm(jnp.ones((4, 3), jnp.int32), jnp.ones((2, 3, 2)), jnp.ones(2, jnp.int32)),
     TypeError, "float32 or bfloat16"),
    (lambda: cpu.gmm(jnp.ones((4, 3)), jnp.ones((2, 3, 2)), jnp.ones(2, jnp.int32), tile=12,
                     sub=5), ValueError, "tile must be a positive multiple of sub"),
    (lambda: cpu.tgmm(jnp.ones((4, 3)), jnp.ones((5, 2)), jnp.ones(2, jnp.int32)), ValueError,
     "same number of rows"),
    (lambda: cpu.grouped_ffn(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.ones((2, 4, 3)),
                             jnp.ones(2, jnp.int32), jax.nn.relu), ValueError, "matching"),
])
def test_invalid_arguments_raise(call, error, match):
  with pytest.raises(error, match=match):
    call()
