"""Triton GPU grouped-matmul kernels (Pallas with the Triton backend).

The Pallas-Triton lowering has no scalar prefetch and no data-dependent block
index maps, so the metadata arrays are ordinary inputs and each program slices
its tiles itself with `pl.ds` from whole-array refs. Programs run concurrently,
so no output element may be written by two programs: `gmm` relies on invariant
6 of `common.make_group_metadata` (every row is written by exactly one visit),
and `tgmm` gives each program a whole [tk, tn] block of one group and loops over
that group's visits itself.

Operands arrive padded to whole tiles (`ops.py`), so no load is out of bounds
and masks only separate groups. Tiles are powers of two >= 16
(`common.resolve_tiling`), as `tl.dot` requires.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from hashmoe.kernels import common


def _compiler_params(tile_elems: int) -> pltriton.CompilerParams:
  # An explicit Triton CompilerParams also keeps this kernel on the Triton
  # lowering if jax_pallas_use_mosaic_gpu is switched on globally. Larger
  # accumulators get more warps so each thread holds fewer of them.
  return pltriton.CompilerParams(
      num_warps=8 if tile_elems > 64 * 64 else 4, num_stages=3)


@functools.partial(
    jax.jit,
    static_argnames=("tiling", "out_dtype", "compute_dtype", "transpose_rhs",
                     "interpret"))
def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    metadata: common.GroupMetadata,
    *,
    tiling: common.Tiling,
    out_dtype: jnp.dtype,
    compute_dtype: jnp.dtype,
    transpose_rhs: bool,
    interpret: bool,
) -> jax.Array:
  """out[r] = lhs[r] @ rhs[group(r)], zeros for rows past every group.

  One program per (visit, n tile); programs past `num_visits` exit at once.

  Args:
    lhs: [M, K] padded rows (M = tiling.m, K = tiling.k).
    rhs: [G, K, N], or [G, N, K] when `transpose_rhs`.
    metadata: from `make_group_metadata(..., cover_tail=True,
      visit_empty_groups=False)`.
    tiling: resolved tiles.
    out_dtype: output element type; accumulation is float32 in registers.
    compute_dtype: dtype both tiles are cast to before `tl.dot`.
    transpose_rhs: contract rhs's last axis.
    interpret: run the kernel in the Pallas interpreter (CPU).

  Returns:
    out: [M, N] of out_dtype.
  """
  tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
  num_groups = rhs.shape[0]
  num_slots = metadata.group_ids.shape[0]
  tiles_k = tiling.k // tk

  def kernel(offsets_ref, gids_ref, tids_ref, first_ref, nv_ref, lhs_ref,
             rhs_ref, out_ref):
    del first_ref
    v = pl.program_id(0)
    col0 = pl.multiple_of(pl.program_id(1) * tn, tn)
    num_visits = nv_ref[0]

    @pl.when(v < num_visits)
    def _visit():
      group, tile = gids_ref[v], tids_ref[v]
      start, end = offsets_ref[group], offsets_ref[group + 1]
      row0 = pl.multiple_of(tile * tm, tm)
      weights = jnp.minimum(group, num_groups - 1)

      def k_step(kk, acc):
        k0 = pl.multiple_of(kk * tk, tk)
        a = lhs_ref[pl.ds(row0, tm), pl.ds(k0, tk)]
        if transpose_rhs:
          b = rhs_ref[weights, pl.ds(col0, tn), pl.ds(k0, tk)]
        else:
          b = rhs_ref[weights, pl.ds(k0, tk), pl.ds(col0, tn)]
        return acc + common.tile_dot(a, b, (1, 1) if transpose_rhs else (1, 0),
                          compute_dtype)

      # Sentinel visits (no rows) run no k steps and only write zeros. The
      # loop is a fori pattern, which Pallas-Triton lowers to scf.for, so
      # Triton can software-pipeline the tile loads. The bounds must be
      # strongly typed int32: with Python-int (weak) branches jax 0.10.2 emits
      # an scf.for whose bound types differ, which Triton rejects (and which
      # jax.export does not notice; tests/test_kernels.py re-verifies the IR).
      steps = jnp.where(end > start, jnp.int32(tiles_k), jnp.int32(0))
      acc = jax.lax.fori_loop(0, steps, k_step,
                              jnp.zeros((tm, tn), jnp.float32))
      in_group, write = common.visit_row_masks(
          tile=tile, tm=tm, width=tn, group_start=start, group_end=end,
          total=offsets_ref[num_groups],
          zero_fill_tail=common.is_last_visit_of_tile(tids_ref, num_visits, v,
                                                      num_slots))
      value = jnp.where(in_group, acc, 0.0).astype(out_ref.dtype)
      pltriton.store(out_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)], value,
                     mask=write)

  call = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((tiling.m, tiling.n), out_dtype),
      grid=(num_slots, tiling.n // tn),
      compiler_params=_compiler_params(tm * tn),
      interpret=interpret,
      name="hashmoe_gmm",
  )
  return call(*metadata, lhs, rhs)


@functools.partial(
    jax.jit,
    static_argnames=("tiling", "num_groups", "out_dtype", "compute_dtype",
                     "interpret"))
def tgmm(
    lhs: jax.Array,
    rhs: jax.Array,
    metadata: common.GroupMetadata,
    *,
    tiling: common.Tiling,
    num_groups: int,
    out_dtype: jnp.dtype,
    compute_dtype: jnp.dtype,
    interpret: bool,
) -> jax.Array:
  """out[g] = lhs[rows of g]^T @ rhs[rows of g]; zeros for empty groups.

  One program per (group, k tile, n tile) loops over the group's visits, so
  each output block has a single writer and no atomics are needed.

  Args:
    lhs: [M, K] padded rows.
    rhs: [M, N] padded rows.
    metadata: from `make_group_metadata(..., visit_empty_groups=True,
      cover_tail=False)`.
    tiling: resolved tiles.
    num_groups: G.
    out_dtype, compute_dtype, interpret: as in `gmm`.

  Returns:
    out: [G, K, N] of out_dtype.
  """
  tm, tk, tn = tiling.tm, tiling.tk, tiling.tn

  def kernel(offsets_ref, gids_ref, tids_ref, first_ref, nv_ref, lhs_ref,
             rhs_ref, out_ref):
    del gids_ref, nv_ref
    group = pl.program_id(0)
    k0 = pl.multiple_of(pl.program_id(1) * tk, tk)
    n0 = pl.multiple_of(pl.program_id(2) * tn, tn)
    start, end = offsets_ref[group], offsets_ref[group + 1]

    def visit(v, acc):
      tile = tids_ref[v]
      row0 = pl.multiple_of(tile * tm, tm)
      # Masked loads read zeros for the rows of neighbouring groups.
      a = pltriton.load(
          lhs_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)],
          mask=common.group_row_mask(tile=tile, tm=tm, width=tk,
                                     group_start=start, group_end=end),
          other=0.0)
      b = pltriton.load(
          rhs_ref.at[pl.ds(row0, tm), pl.ds(n0, tn)],
          mask=common.group_row_mask(tile=tile, tm=tm, width=tn,
                                     group_start=start, group_end=end),
          other=0.0)
      return acc + common.tile_dot(a, b, (0, 0), compute_dtype)

    acc = jax.lax.fori_loop(first_ref[group], first_ref[group + 1], visit,
                            jnp.zeros((tk, tn), jnp.float32))
    out_ref[group, pl.ds(k0, tk), pl.ds(n0, tn)] = acc.astype(out_ref.dtype)

  call = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, tiling.k, tiling.n),
                                     out_dtype),
      grid=(num_groups, tiling.k // tk, tiling.n // tn),
      compiler_params=_compiler_params(tk * tn),
      interpret=interpret,
      name="hashmoe_tgmm",
  )
  return call(*metadata, lhs, rhs)
