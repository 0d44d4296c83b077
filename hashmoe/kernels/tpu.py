"""Mosaic TPU grouped-matmul kernels (Pallas, scalar-prefetched group metadata).

Both kernels take padded operands (every extent a multiple of its tile, see
`common.resolve_tiling`) and the `GroupMetadata` built for them; `ops.py` does
the padding, the validation and the backend choice.

The visit list lives in SMEM (`PrefetchScalarGridSpec`), so the BlockSpec index
maps can pick the lhs row tile and the expert's weight block of each visit
before the kernel body runs and Mosaic can double-buffer those DMAs. The grid's
visit axis is sized by the traced `num_visits`, so no padding visit is run.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hashmoe.kernels import common


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

  Args:
    lhs: [M, K] padded rows (M = tiling.m, K = tiling.k).
    rhs: [G, K, N], or [G, N, K] when `transpose_rhs`.
    metadata: from `make_group_metadata(..., cover_tail=True,
      visit_empty_groups=False)`.
    tiling: resolved tiles; the grid is (N / tn, num_visits, K / tk).
    out_dtype: output element type; accumulation is float32 in VMEM.
    compute_dtype: dtype both tiles are cast to before the MXU matmul.
    transpose_rhs: contract rhs's last axis (the input gradient uses rhs^T
      without materialising it).
    interpret: run the kernel in the Pallas interpreter (CPU).

  Returns:
    out: [M, N] of out_dtype.
  """
  tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
  num_groups = rhs.shape[0]
  num_slots = metadata.group_ids.shape[0]
  tiles_k = tiling.k // tk

  # Index maps see the grid indices then the scalar-prefetch refs in the
  # order they are passed to the call (the GroupMetadata fields).
  def lhs_map(j, v, kk, offsets, gids, tids, first, nv):
    del j, offsets, gids, first, nv
    return tids[v], kk

  def rhs_map(j, v, kk, offsets, gids, tids, first, nv):
    del offsets, tids, first, nv
    # Sentinel visits (group G) still need a valid block to DMA; their product
    # is never computed.
    group = jnp.minimum(gids[v], num_groups - 1)
    return (group, j, kk) if transpose_rhs else (group, kk, j)

  def out_map(j, v, kk, offsets, gids, tids, first, nv):
    del kk, offsets, gids, first, nv
    return tids[v], j

  def kernel(offsets, gids, tids, first, nv, lhs_ref, rhs_ref, out_ref,
             acc_ref):
    del first
    v = pl.program_id(1)
    kk = pl.program_id(2)
    group = gids[v]
    start, end = offsets[group], offsets[group + 1]

    @pl.when(kk == 0)
    def _init():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    # The sentinel group owns no rows: skip the MXU work, keep the zeros.
    @pl.when(end > start)
    def _accumulate():
      acc_ref[...] += common.tile_dot(lhs_ref[...], rhs_ref[...],
                           (1, 1) if transpose_rhs else (1, 0), compute_dtype)

    @pl.when(kk == tiles_k - 1)
    def _store():
      in_group, write = common.visit_row_masks(
          tile=tids[v], tm=tm, width=tn, group_start=start, group_end=end,
          total=offsets[num_groups],
          zero_fill_tail=common.is_last_visit_of_tile(tids, nv[0], v,
                                                      num_slots))
      # Rows this visit does not own keep what an earlier visit of the same
      # (still resident) output block wrote there. Select in float32: TPUs
      # before v6 have no bfloat16 VPU.
      value = jnp.where(in_group, acc_ref[...], 0.0)
      out_ref[...] = jnp.where(write, value, out_ref[...].astype(jnp.float32)
                               ).astype(out_ref.dtype)

  rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
  n_out = tiling.n
  call = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((tiling.m, n_out), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(metadata),
          grid=(n_out // tn, metadata.num_visits[0], tiles_k),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map),
                    pl.BlockSpec(rhs_block, rhs_map)],
          out_specs=pl.BlockSpec((tm, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
      ),
      # Output tiles are revisited along the visit axis and accumulated along
      # k, so only the n axis may be split across cores.
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=2 * tiling.m * tiling.k * n_out,
          bytes_accessed=(lhs.size * lhs.dtype.itemsize * (n_out // tn)
                          + num_slots * tiling.k * n_out * rhs.dtype.itemsize
                          + tiling.m * n_out * jnp.dtype(out_dtype).itemsize),
          transcendentals=0),
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

  Args:
    lhs: [M, K] padded rows.
    rhs: [M, N] padded rows.
    metadata: from `make_group_metadata(..., visit_empty_groups=True,
      cover_tail=False)`.
    tiling: resolved tiles; the grid is (K / tk, N / tn, num_visits).
    num_groups: G.
    out_dtype, compute_dtype, interpret: as in `gmm`.

  Returns:
    out: [G, K, N] of out_dtype.
  """
  tm, tk, tn = tiling.tm, tiling.tk, tiling.tn
  num_slots = metadata.group_ids.shape[0]

  def lhs_map(kk, j, v, offsets, gids, tids, first, nv):
    del j, offsets, gids, first, nv
    return tids[v], kk

  def rhs_map(kk, j, v, offsets, gids, tids, first, nv):
    del kk, offsets, gids, first, nv
    return tids[v], j

  def out_map(kk, j, v, offsets, gids, tids, first, nv):
    del offsets, tids, first, nv
    return gids[v], kk, j

  def kernel(offsets, gids, tids, first, nv, lhs_ref, rhs_ref, out_ref,
             acc_ref):
    del first
    v = pl.program_id(2)
    group = gids[v]
    start, end = offsets[group], offsets[group + 1]
    prev = gids[jnp.maximum(v - 1, 0)]
    nxt = gids[jnp.minimum(v + 1, num_slots - 1)]

    # Invariant 2: a group's visits are consecutive, so its [tk, tn] output
    # block is accumulated in VMEM from its first visit to its last.
    @pl.when((v == 0) | (prev != group))
    def _init():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(end > start)
    def _accumulate():
      # Rows of the tile outside the group belong to a neighbour (or are
      # padding); select rather than multiply so a stray NaN cannot leak in.
      lhs_mask = common.group_row_mask(tile=tids[v], tm=tm, width=tk,
                                       group_start=start, group_end=end)
      rhs_mask = common.group_row_mask(tile=tids[v], tm=tm, width=tn,
                                       group_start=start, group_end=end)
      a = jnp.where(lhs_mask, lhs_ref[...].astype(jnp.float32), 0.0)
      b = jnp.where(rhs_mask, rhs_ref[...].astype(jnp.float32), 0.0)
      # Contract the row axis: transpose the lhs tile explicitly, the form of
      # transposed-lhs matmul Mosaic lowers on every TPU generation.
      acc_ref[...] += common.tile_dot(a.T, b, (1, 0), compute_dtype)

    @pl.when((v + 1 >= nv[0]) | (nxt != group))
    def _store():
      out_ref[...] = acc_ref[...].astype(out_ref.dtype)

  call = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, tiling.k, tiling.n),
                                     out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(metadata),
          grid=(tiling.k // tk, tiling.n // tn, metadata.num_visits[0]),
          in_specs=[pl.BlockSpec((tm, tk), lhs_map),
                    pl.BlockSpec((tm, tn), rhs_map)],
          out_specs=pl.BlockSpec((None, tk, tn), out_map),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=2 * tiling.m * tiling.k * tiling.n,
          bytes_accessed=(lhs.size * lhs.dtype.itemsize * (tiling.n // tn)
                          + rhs.size * rhs.dtype.itemsize * (tiling.k // tk)
                          + num_groups * tiling.k * tiling.n
                          * jnp.dtype(out_dtype).itemsize),
          transcendentals=0),
      interpret=interpret,
      name="hashmoe_tgmm",
  )
  return call(*metadata, lhs, rhs)
