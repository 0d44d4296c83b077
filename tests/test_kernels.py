"""Tests for hashmoe.kernels: the grouped matmul against plain references.

Kernels run in the Pallas interpreter on CPU. Each (backend, dtype) pair is
compiled once, for fixed shapes, with group sizes as a traced argument, so the
sweep over group layouts costs no recompilation. TPU and GPU lowerings are
checked by exporting for those platforms from this host.
"""
import base64
import functools
import json

import hypothesis
from hypothesis import strategies as st
import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from hashmoe.kernels import common
from hashmoe.kernels import gmm
from hashmoe.kernels import make_group_metadata
from hashmoe.kernels import resolve_backend
from hashmoe.kernels import tgmm

# ------------------------------------------------------------- references ---


def _group_bounds(sizes, m):
  """Row range of each group, groups clipped at row m (the ops' contract)."""
  bounds, row = [], 0
  for size in sizes:
    end = min(row + max(int(size), 0), m)
    bounds.append((row, end))
    row = end
  return bounds


def _masked_gmm(lhs, rhs, sizes):
  """jnp reference: sum over groups of a row-masked dense matmul."""
  m = lhs.shape[0]
  rows = jnp.arange(m)
  out = jnp.zeros((m, rhs.shape[2]), jnp.float32)
  for g, (start, end) in enumerate(_group_bounds(sizes, m)):
    in_group = ((rows >= start) & (rows < end))[:, None]
    prod = jnp.dot(lhs.astype(jnp.float32), rhs[g].astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    out = out + jnp.where(in_group, prod, 0.0)
  return out


def _masked_tgmm(lhs, rhs, sizes):
  """jnp reference: out[g] = (masked lhs)^T @ (masked rhs)."""
  m = lhs.shape[0]
  rows = jnp.arange(m)
  outs = []
  for start, end in _group_bounds(sizes, m):
    in_group = ((rows >= start) & (rows < end))[:, None]
    a = jnp.where(in_group, lhs.astype(jnp.float32), 0.0)
    b = jnp.where(in_group, rhs.astype(jnp.float32), 0.0)
    outs.append(jnp.dot(a.T, b, precision=jax.lax.Precision.HIGHEST))
  return jnp.stack(outs)


# ------------------------------------------------------------ value sweep ---

# m is not a multiple of tm, k and n are not multiples of tk and tn, and the
# 6 groups outnumber the 4 row tiles, so tiles are shared between groups.
M, K, N, G = 50, 40, 24, 6
TILING = (16, 16, 16)

GROUP_LAYOUTS = {
    "all_rows_first_group": [50, 0, 0, 0, 0, 0],
    "all_rows_last_group": [0, 0, 0, 0, 0, 50],
    "all_rows_middle_group": [0, 0, 50, 0, 0, 0],
    "several_empty_groups": [0, 13, 0, 0, 37, 0],
    "sizes_not_tile_multiples": [5, 9, 17, 3, 11, 5],
    "tile_aligned_sizes": [16, 0, 16, 16, 2, 0],
    # 16 rows past the groups: one tile shared with group rows, one all tail.
    "rows_past_the_groups": [3, 0, 20, 1, 0, 10],
    "every_group_empty": [0, 0, 0, 0, 0, 0],
    # Sizes summing past m are clipped at row m.
    "sizes_overflow_m": [30, 30, 0, 0, 0, 1],
}
_rng = np.random.default_rng(1234)
for _i in range(4):
  _sizes = _rng.multinomial(_rng.integers(0, M + 1), _rng.dirichlet([0.5] * G))
  _sizes[_rng.random(G) < 0.3] = 0
  GROUP_LAYOUTS[f"random_{_i}"] = _sizes.tolist()


@functools.cache
def _kernel_step(backend, dtype):
  """gmm (plain and transposed rhs) and tgmm with their VJPs, jitted once."""
  ops = dict(tiling=TILING, backend=backend, interpret=True)

  def step(lhs, rhs, rhs_t, rows_n, sizes, dout, dout_g):
    out, vjp = jax.vjp(lambda a, b: gmm(a, b, sizes, **ops), lhs, rhs)
    out_t, vjp_t = jax.vjp(
        lambda a, b: gmm(a, b, sizes, transpose_rhs=True, **ops), lhs, rhs_t)
    t_out, t_vjp = jax.vjp(lambda a, b: tgmm(a, b, sizes, **ops), lhs, rows_n)
    return (out, *vjp(dout), out_t, *vjp_t(dout), t_out, *t_vjp(dout_g))

  return jax.jit(step)


def _reference_step(lhs, rhs, rhs_t, rows_n, sizes, dout, dout_g):
  out, vjp = jax.vjp(lambda a, b: _masked_gmm(a, b, sizes), lhs, rhs)
  out_t, vjp_t = jax.vjp(
      lambda a, b: _masked_gmm(a, jnp.swapaxes(b, 1, 2), sizes), lhs, rhs_t)
  t_out, t_vjp = jax.vjp(lambda a, b: _masked_tgmm(a, b, sizes), lhs, rows_n)
  return (out, *vjp(dout), out_t, *vjp_t(dout), t_out, *t_vjp(dout_g))


_NAMES = ("gmm", "gmm dlhs", "gmm drhs", "gmm_t", "gmm_t dlhs", "gmm_t drhs",
          "tgmm", "tgmm dlhs", "tgmm drhs")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_values_and_gradients_match_masked_reference(backend, dtype):
  rng = np.random.default_rng(0)
  lhs = jnp.asarray(rng.standard_normal((M, K)), dtype)
  rhs = jnp.asarray(rng.standard_normal((G, K, N)), dtype)
  rhs_t = jnp.asarray(rng.standard_normal((G, N, K)), dtype)
  rows_n = jnp.asarray(rng.standard_normal((M, N)), dtype)
  dout = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
  dout_g = jnp.asarray(rng.standard_normal((G, K, N)), jnp.float32)
  step = _kernel_step(backend, dtype)
  # bfloat16 products are exact in float32; what differs is bfloat16
  # rounding of gradients returned in the input dtype (and of float32
  # cotangents cast for the MXU-style compute), so compare to 2^-6 of scale.
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for layout, sizes in GROUP_LAYOUTS.items():
    got = step(lhs, rhs, rhs_t, rows_n, jnp.asarray(sizes, jnp.int32), dout,
               dout_g)
    want = _reference_step(lhs, rhs, rhs_t, rows_n, sizes, dout, dout_g)
    for name, g, w in zip(_NAMES, got, want):
      g = np.asarray(g, np.float32)
      w = np.asarray(w, np.float32)
      assert g.shape == w.shape, (layout, name)
      scale = max(1.0, float(np.abs(w).max()))
      np.testing.assert_allclose(
          g, w, rtol=tol, atol=tol * scale,
          err_msg=f"{name} for {layout} {sizes} ({backend}, {dtype.__name__})")
    # Output dtypes: float32 outputs, gradients in the input dtype.
    assert got[0].dtype == jnp.float32 and got[6].dtype == jnp.float32
    assert got[1].dtype == dtype and got[2].dtype == dtype


def test_rows_past_groups_are_exact_zeros_not_uninitialised():
  # The interpreter fills kernel outputs with NaN; every tail row must have
  # been written with zeros (gmm) and empty groups' weights too (tgmm).
  lhs = jnp.ones((M, K), jnp.float32)
  rhs = jnp.ones((G, K, N), jnp.float32)
  sizes = jnp.asarray([3, 0, 20, 1, 0, 10], jnp.int32)
  out = _kernel_step("gpu", jnp.float32)(
      lhs, rhs, jnp.swapaxes(rhs, 1, 2), jnp.ones((M, N)), sizes,
      jnp.ones((M, N)), jnp.ones((G, K, N)))
  assert np.all(np.asarray(out[0])[34:] == 0.0)
  assert np.all(np.asarray(out[0])[:34] == K)
  assert np.all(np.asarray(out[6])[[1, 4]] == 0.0)


def test_default_tiling_and_bfloat16_output():
  """Default (128,128,128) tiles on a tiny problem, default backend on CPU."""
  rng = np.random.default_rng(3)
  lhs = jnp.asarray(rng.standard_normal((20, 12)), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal((3, 12, 10)), jnp.float32)
  sizes = [7, 0, 11]
  f = jax.jit(lambda a, b, s: (
      gmm(a, b, s), gmm(a, b, s, preferred_element_type=jnp.bfloat16)))
  out, out_bf16 = f(lhs, rhs, jnp.asarray(sizes, jnp.int32))
  want = _masked_gmm(lhs, rhs, sizes)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  assert out_bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out_bf16, np.float32), want,
                             rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend,dims,tiling,dtype,want", [
    # Tiles shrink to the dimension rounded up to the vreg tile (16 rows for
    # bfloat16, 128 lanes) on TPU, to a power of two >= 16 on GPU.
    ("tpu", (50, 40, 24), (128, 128, 128), jnp.bfloat16,
     (64, 128, 128, 64, 128, 128)),
    ("tpu", (50, 40, 24), (128, 128, 128), jnp.float32,
     (56, 128, 128, 56, 128, 128)),
    ("tpu", (300, 520, 256), (128, 256, 128), jnp.float32,
     (128, 256, 128, 384, 768, 256)),
    ("gpu", (50, 40, 24), (128, 128, 128), jnp.float32,
     (64, 64, 32, 64, 64, 32)),
    ("gpu", (5, 3, 1), (64, 32, 32), jnp.float32, (16, 16, 16, 16, 16, 16)),
    ("gpu", (300, 520, 256), (64, 128, 64), jnp.bfloat16,
     (64, 128, 64, 320, 640, 256)),
])
def test_resolve_tiling(backend, dims, tiling, dtype, want):
  got = common.resolve_tiling(*dims, tiling, backend=backend, dtypes=(dtype,))
  assert (got.tm, got.tk, got.tn, got.m, got.k, got.n) == want


# --------------------------------------------------------------- metadata ---


def _expected_visits(sizes, m, tm, num_tiles, visit_empty, cover_tail):
  """Naive enumeration of the (group, tile) visits, in kernel order."""
  visits, total = [], 0
  for g, (start, end) in enumerate(_group_bounds(sizes, m)):
    total = end
    if end > start:
      visits += [(g, t) for t in range(start // tm, -(-end // tm))]
    elif visit_empty:
      visits.append((g, min(start // tm, num_tiles - 1)))
  if cover_tail:
    visits += [(len(sizes), t) for t in range(-(-total // tm), num_tiles)]
  return visits


METADATA_CONFIGS = [  # (m, tm, num_groups)
    (50, 16, 6), (64, 8, 3), (7, 16, 4), (40, 4, 12), (33, 32, 1)]


@functools.cache
def _metadata_fn(m, tm, num_tiles, visit_empty, cover_tail):
  return jax.jit(functools.partial(
      make_group_metadata, m=m, tm=tm, num_row_tiles=num_tiles,
      visit_empty_groups=visit_empty, cover_tail=cover_tail))


@pytest.mark.parametrize("mode", ["gmm", "tgmm"])
@pytest.mark.parametrize("m,tm,num_groups", METADATA_CONFIGS)
@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(data=st.data())
def test_group_metadata_invariants(m, tm, num_groups, mode, data):
  sizes = data.draw(st.lists(
      st.one_of(st.just(0), st.integers(0, m)),
      min_size=num_groups, max_size=num_groups))
  visit_empty, cover_tail = mode == "tgmm", mode == "gmm"
  num_tiles = -(-m // tm)
  meta = _metadata_fn(m, tm, num_tiles, visit_empty, cover_tail)(
      jnp.asarray(sizes, jnp.int32))
  meta = jax.tree.map(np.asarray, meta)
  nv = int(meta.num_visits[0])
  bound = common.max_visits(num_tiles, num_groups,
                            visit_empty_groups=visit_empty,
                            cover_tail=cover_tail)
  assert meta.group_ids.shape == meta.tile_ids.shape == (bound,)
  assert nv <= num_tiles + num_groups - 1  # invariant 5

  # Invariants 1-4: exactly the naive visit list, in order.
  got = list(zip(meta.group_ids[:nv].tolist(), meta.tile_ids[:nv].tolist()))
  assert got == _expected_visits(sizes, m, tm, num_tiles, visit_empty,
                                 cover_tail)
  assert np.all(np.diff(meta.tile_ids[:nv]) >= 0)
  # Padding visits repeat the last real visit.
  assert np.all(meta.group_ids[nv:] == meta.group_ids[nv - 1])
  assert np.all(meta.tile_ids[nv:] == meta.tile_ids[nv - 1])

  # Offsets and per-group visit ranges.
  bounds = _group_bounds(sizes, m)
  total = bounds[-1][1]
  assert meta.group_offsets.tolist() == (
      [0] + [end for _, end in bounds] + [total])
  for g in range(num_groups + 1):
    lo, hi = meta.group_first_visit[g], meta.group_first_visit[g + 1]
    assert np.all(meta.group_ids[lo:hi] == g)
  assert meta.group_first_visit[-1] == nv

  if cover_tail:
    # Invariant 6: the rows a gmm visit writes (its group's rows, plus the
    # tail rows if it is its tile's last visit) partition the padded rows.
    writes = np.zeros(num_tiles * tm, np.int32)
    for v, (g, t) in enumerate(got):
      rows = np.arange(t * tm, (t + 1) * tm)
      start, end = meta.group_offsets[g], meta.group_offsets[g + 1]
      last = v + 1 == nv or got[v + 1][1] != t
      writes[rows] += ((rows >= start) & (rows < end)) | (
          last & (rows >= total))
    assert np.all(writes == 1), writes


def test_max_visits_bound_is_reached():
  # Every group starts mid-tile: T + G - 1 visits, the bound exactly.
  meta = _metadata_fn(16, 8, 2, False, True)(
      jnp.asarray([3, 6, 4, 3], jnp.int32))
  assert int(meta.num_visits[0]) == 2 + 4 - 1


# ------------------------------------------------------- platform lowering ---

_S = jax.ShapeDtypeStruct
_TRITON = "__gpu$xla.gpu.triton"


def _train_like(backend):
  """Forward gmm, both its gradients (gmm with rhs^T, tgmm), and tgmm."""
  ops = dict(tiling=(128, 128, 128), backend=backend, interpret=False)

  def f(lhs, rhs, sizes, rows_n):
    loss = lambda a, b: jnp.sum(gmm(a, b, sizes, **ops))
    return jax.grad(loss, argnums=(0, 1))(lhs, rhs), tgmm(lhs, rows_n, sizes,
                                                          **ops)
  return f


def _specs(dtype, ragged):
  # ragged: no extent is a multiple of its tile, so padding and shrunk tiles
  # must also produce blocks Mosaic and Triton accept.
  m, k, n = (300, 200, 72) if ragged else (512, 256, 384)
  return (_S((m, k), dtype), _S((8, k, n), dtype), _S((8,), jnp.int32),
          _S((m, n), dtype))


def _custom_call_attrs(mlir_text, target, attr):
  """The `attr` backend-config values of every `target` custom call."""
  from jax._src.interpreters import mlir
  from jax._src.lib.mlir import ir
  found = []
  with mlir.make_ir_context():
    module = ir.Module.parse(mlir_text)

    def visit(op):
      if (op.name == "stablehlo.custom_call" and
          ir.StringAttr(op.attributes["call_target_name"]).value
          == target):
        found.append(op.attributes[attr])
      return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    if attr == "backend_config":
      return [ir.StringAttr(a).value for a in found]
    return [bytes(ir.StringAttr(ir.DictAttr(a)["ir"]).value_bytes)
            for a in found]


@pytest.mark.parametrize("ragged", [False, True], ids=["aligned", "ragged"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["float32", "bfloat16"])
def test_exports_for_tpu_as_mosaic_custom_calls(dtype, ragged):
  from jax._src.interpreters import mlir
  from jax._src.lib import tpu
  from jax._src.lib.mlir import ir
  from jaxlib.mlir.passmanager import PassManager
  exported = export.export(jax.jit(_train_like("tpu")),
                           platforms=["tpu"])(*_specs(dtype, ragged))
  text = exported.mlir_module()
  assert "tpu_custom_call" in text
  configs = [json.loads(c)["custom_call_config"] for c in
             _custom_call_attrs(text, "tpu_custom_call", "backend_config")]
  # dlhs (gmm with rhs^T), drhs (tgmm) and the forward tgmm; the forward gmm
  # is dead code under grad of a sum.
  assert len(configs) == 3
  # Each Mosaic body must deserialise and verify against the TPU dialect,
  # with the metadata scalar-prefetched and a real MXU matmul inside.
  ctx = mlir.make_ir_context()
  tpu.register_dialect(ctx)
  with ctx, ir.Location.unknown():
    for config in configs:
      ctx.allow_unregistered_dialects = True
      body = ir.Module.parse(base64.b64decode(config["body"]))
      PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(
          body.operation)
      ctx.allow_unregistered_dialects = False
      assert body.operation.verify()
      asm = str(body)
      assert "tpu.matmul" in asm
      assert "scalar_prefetch = 5" in asm


def test_tpu_alignment_is_checked_when_compiling():
  lhs = jnp.zeros((256, 256), jnp.bfloat16)
  rhs = jnp.zeros((2, 256, 256), jnp.bfloat16)
  sizes = jnp.asarray([100, 156], jnp.int32)
  with pytest.raises(ValueError, match="tm to be a multiple of 16"):
    gmm(lhs, rhs, sizes, tiling=(8, 128, 128), backend="tpu", interpret=False)
  with pytest.raises(ValueError, match="tk to be a multiple of 128"):
    gmm(lhs, rhs, sizes, tiling=(16, 64, 128), backend="tpu", interpret=False)


@pytest.mark.parametrize("ragged", [False, True], ids=["aligned", "ragged"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["float32", "bfloat16"])
def test_exports_for_cuda_as_triton_custom_calls(dtype, ragged):
  from jax._src.interpreters import mlir
  from jax._src.lib.mlir import ir
  from jax._src.lib.triton import dialect as tt_dialect
  # jax.export refuses custom calls without a stability guarantee, and the
  # Pallas-Triton call is one, so the check must be waived explicitly.
  exported = export.export(
      jax.jit(_train_like("gpu")), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(_TRITON)],
  )(*_specs(dtype, ragged))
  text = exported.mlir_module()
  assert f"@{_TRITON}" in text
  kernels = _custom_call_attrs(text, _TRITON, "mhlo.backend_config")
  assert len(kernels) == 3  # as in the TPU test
  # export does not verify the Triton IR it embeds (an invalid scf.for passes
  # straight through); parse each kernel against the Triton dialect.
  ctx = ir.Context()
  ctx.append_dialect_registry(mlir.upstream_dialects)
  tt_dialect.register_dialect(ctx)
  ctx.load_all_available_dialects()
  with ctx, ir.Location.unknown():
    for kernel in kernels:
      module = ir.Module.parse(kernel)
      assert module.operation.verify()
      asm = module.operation.get_asm(print_generic_op_form=True)
      assert '"tt.dot"' in asm and '"scf.for"' in asm


# ------------------------------------------------------------ validation ---


def test_resolve_backend_defaults_on_cpu():
  assert jax.default_backend() == "cpu"
  assert resolve_backend(None, None) == ("gpu", True)
  assert resolve_backend("tpu", None) == ("tpu", True)
  assert resolve_backend("gpu", False) == ("gpu", False)
  with pytest.raises(ValueError, match="backend must be one of"):
    resolve_backend("metal", None)


@pytest.mark.parametrize("call,error,match", [
    (lambda: gmm(jnp.zeros((4, 3)), jnp.zeros((2, 5, 2)),
                 jnp.zeros(2, jnp.int32)), ValueError, "contraction sizes"),
    (lambda: gmm(jnp.zeros((4, 3)), jnp.zeros((2, 3, 2)),
                 jnp.zeros(3, jnp.int32)), ValueError, r"shape \(2,\)"),
    (lambda: gmm(jnp.zeros((4, 3)), jnp.zeros((2, 3, 2)),
                 jnp.zeros(2)), TypeError, "integer"),
    (lambda: gmm(jnp.zeros((4, 3), jnp.int32), jnp.zeros((2, 3, 2)),
                 jnp.zeros(2, jnp.int32)), TypeError, "float32 or bfloat16"),
    (lambda: gmm(jnp.zeros((4, 3)), jnp.zeros((3, 2)),
                 jnp.zeros(2, jnp.int32)), ValueError, "3-D"),
    (lambda: gmm(jnp.zeros((4, 3)), jnp.zeros((2, 3, 2)),
                 jnp.zeros(2, jnp.int32), tiling=(16, 16)), ValueError,
     "three positive ints"),
    (lambda: gmm(jnp.zeros((4, 3)), jnp.zeros((2, 3, 2)),
                 jnp.zeros(2, jnp.int32), tiling=(24, 16, 16), backend="gpu",
                 interpret=False), ValueError, "power-of-two"),
    (lambda: tgmm(jnp.zeros((4, 3)), jnp.zeros((5, 2)),
                  jnp.zeros(2, jnp.int32)), ValueError, "same number of rows"),
])
def test_invalid_arguments_raise(call, error, match):
  with pytest.raises(error, match=match):
    call()
