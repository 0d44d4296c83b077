"""Group metadata and tiling shared by the TPU and GPU grouped-matmul kernels, and the argument
checks every backend (CPU windows included) shares.

A grouped matmul multiplies contiguous row ranges of `lhs: [m, k]` by one
weight matrix each: group g owns rows [offset_g, offset_g + size_g). Both
kernels cut the rows into tiles of `tm` rows and walk a list of *visits*, one
per (row tile, group) pair whose intersection matters. This module builds that
list (`make_group_metadata`), the row masks a visit uses to write only its own
rows (`visit_row_masks`), and the tile sizes and padding both backends agree on
(`resolve_tiling`, `pad_to`).

Everything here is plain jnp so that it runs identically outside a kernel (the
tests check the invariants below in numpy) and inside one (where the metadata
arrays are SMEM scalar-prefetch refs on TPU and global-memory pointers on GPU).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


# Argument checks every grouped-matmul backend (CPU windows, TPU, GPU) shares, so that a bad call
# gets the same message whichever kernel the platform picked.


def check_float(name: str, x: jax.Array) -> None:
  if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
    raise TypeError(f"{name} must be float32 or bfloat16; got {x.dtype}")


def check_group_sizes(group_sizes: jax.Array, num_groups: int | None = None) -> jax.Array:
  """int32 group sizes of shape (num_groups,) (any G >= 1 when num_groups is None)."""
  group_sizes = jnp.asarray(group_sizes)
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise TypeError(f"group_sizes must be an integer array; got {group_sizes.dtype}")
  if num_groups is None:
    if group_sizes.ndim != 1 or group_sizes.shape[0] == 0:
      raise ValueError(f"group_sizes must have shape (G,) with G >= 1; got {group_sizes.shape}")
  elif group_sizes.shape != (num_groups,):
    raise ValueError(f"group_sizes must have shape ({num_groups},) (one size per group); got "
                     f"{group_sizes.shape}")
  return group_sizes.astype(jnp.int32)


def check_gmm_args(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                   transpose_rhs: bool) -> jax.Array:
  """Checks `gmm(lhs [m, k], rhs [G, k, n] (or [G, n, k] transposed), group_sizes [G])`;
  returns group_sizes as int32."""
  if lhs.ndim != 2:
    raise ValueError(f"gmm: lhs must be 2-D [m, k]; got shape {lhs.shape}")
  if rhs.ndim != 3:
    raise ValueError(f"gmm: rhs must be 3-D [G, k, n]; got shape {rhs.shape}")
  check_float("lhs", lhs)
  check_float("rhs", rhs)
  rhs_k = rhs.shape[2] if transpose_rhs else rhs.shape[1]
  if rhs_k != lhs.shape[1]:
    raise ValueError(f"gmm: contraction sizes differ: lhs {lhs.shape} has k={lhs.shape[1]}, rhs "
                     f"{rhs.shape} (transpose_rhs={transpose_rhs}) has k={rhs_k}")
  if rhs.shape[0] == 0:
    raise ValueError(f"gmm: rhs must hold at least one group; got {rhs.shape}")
  return check_group_sizes(group_sizes, rhs.shape[0])


def check_tgmm_args(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """Checks `tgmm(lhs [m, k], rhs [m, n], group_sizes [G])`; returns group_sizes as int32."""
  if lhs.ndim != 2 or rhs.ndim != 2 or lhs.shape[0] != rhs.shape[0]:
    raise ValueError(f"tgmm: lhs and rhs must be 2-D [m, k] and [m, n] with the same number of "
                     f"rows m; got {lhs.shape} and {rhs.shape}")
  check_float("lhs", lhs)
  check_float("rhs", rhs)
  return check_group_sizes(group_sizes)


# Triton's `tl.dot` needs every operand dimension to be a power of two and at
# least 16; Pallas-Triton loads and stores need power-of-two sizes.
_GPU_MIN_TILE = 16
# Mosaic blocks must be multiples of the (sublane, lane) vreg tile in their
# last two dimensions unless they span the whole array dimension; sub-32-bit
# types pack 2 rows per sublane, hence 16 rows for bfloat16.
_TPU_LANES = 128


def cdiv(a: int, b: int) -> int:
  """Ceiling division of non-negative Python ints."""
  return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Tile sizes chosen for one call, and the padded extents they imply.

  Attributes:
    tm, tk, tn: rows of lhs per tile, contraction columns per tile, output
      columns per tile.
    m, k, n: padded extents, multiples of tm, tk, tn respectively.
  """
  tm: int
  tk: int
  tn: int
  m: int
  k: int
  n: int

  @property
  def num_row_tiles(self) -> int:
    return self.m // self.tm


def _is_power_of_2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def _next_power_of_2(x: int) -> int:
  return 1 if x <= 1 else 1 << (x - 1).bit_length()


def resolve_tiling(
    m: int,
    k: int,
    n: int,
    tiling: tuple[int, int, int],
    *,
    backend: str,
    dtypes: tuple[jnp.dtype, ...] = (),
    check_hardware_alignment: bool = True,
) -> Tiling:
  """Clamps requested tiles to the problem and pads each extent to a tile.

  A tile larger than its dimension is shrunk rather than the dimension padded
  up to it: on TPU to the dimension rounded up to the vreg tile (8 or 16 rows,
  128 lanes), on GPU to the next power of two (Triton's requirement), but not
  below 16.

  Args:
    m, k, n: logical extents: lhs rows, contraction size, output columns.
    tiling: requested (tm, tk, tn).
    backend: "tpu" or "gpu".
    dtypes: dtypes of the arrays that are blocked; 16-bit types need 16-row
      tiles on TPU.
    check_hardware_alignment: raise if tiles would not lower for `backend`.
      Interpret mode on CPU has no such limits, so tests can use tiny tiles.

  Returns:
    The resolved `Tiling`.
  """
  if (not isinstance(tiling, (tuple, list)) or len(tiling) != 3 or
      not all(isinstance(t, int) and t > 0 for t in tiling)):
    raise ValueError(
        f"tiling must be three positive ints (tm, tk, tn); got {tiling!r}.")
  dims = (m, k, n)
  names = ("tm", "tk", "tn")
  if backend == "gpu":
    if check_hardware_alignment:
      for name, t in zip(names, tiling):
        if not _is_power_of_2(t) or t < _GPU_MIN_TILE:
          raise ValueError(
              f"The Triton GPU kernel needs power-of-two tiles >= "
              f"{_GPU_MIN_TILE}; got {name}={t}.")
    limits = [max(_GPU_MIN_TILE, _next_power_of_2(d)) for d in dims]
  elif backend == "tpu":
    itemsize = min([jnp.dtype(d).itemsize for d in dtypes] or [4])
    aligns = (8 * max(1, 4 // itemsize), _TPU_LANES, _TPU_LANES)
    if check_hardware_alignment:
      # Only tiles smaller than their dimension are real blocks; larger ones
      # are shrunk below to the whole (padded) dimension, which Mosaic accepts.
      for name, t, dim, align in zip(names, tiling, dims, aligns):
        if t < dim and t % align:
          raise ValueError(
              f"Mosaic TPU blocks need {name} to be a multiple of {align} "
              f"(or >= the dimension {dim}); got {name}={t}.")
    # The dimension rounded up to the vreg tile, not the dimension itself, so
    # in-kernel transposes and selects work on whole vregs.
    limits = [cdiv(d, a) * a for d, a in zip(dims, aligns)]
  else:
    raise ValueError(f"backend must be 'tpu' or 'gpu'; got {backend!r}.")
  tm, tk, tn = (min(t, limit) for t, limit in zip(tiling, limits))
  return Tiling(tm=tm, tk=tk, tn=tn, m=cdiv(m, tm) * tm, k=cdiv(k, tk) * tk,
                n=cdiv(n, tn) * tn)


def tile_dot(a: jax.Array, b: jax.Array, contract: tuple[int, int],
             compute_dtype: jnp.dtype) -> jax.Array:
  """One tile's matmul in `compute_dtype`, accumulating in float32 (both kernels' inner step)."""
  return jax.lax.dot_general(
      a.astype(compute_dtype), b.astype(compute_dtype),
      (((contract[0],), (contract[1],)), ((), ())),
      preferred_element_type=jnp.float32)


def pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Zero-pads `x` at the end of each axis up to `shape` (no-op if equal)."""
  if x.shape == tuple(shape):
    return x
  return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape)])


class GroupMetadata(NamedTuple):
  """The visit list both kernels walk. G = number of groups, V = max_visits.

  Attributes:
    group_offsets: int32[G + 2]. Group g owns rows [group_offsets[g],
      group_offsets[g + 1]). group_offsets[G] = total = min(sum(sizes), m);
      group_offsets[G + 1] = total as well, so the sentinel group G (below) owns
      no rows and every visit can read its range the same way.
    group_ids: int32[V]. Group of visit v; G for a sentinel visit.
    tile_ids: int32[V]. Row tile of visit v (rows [tm * t, tm * (t + 1))).
    group_first_visit: int32[G + 2]. Visits of group g are
      [group_first_visit[g], group_first_visit[g + 1]).
    num_visits: int32[1]. Visits past it are padding: they repeat the last
      real visit and must not be executed.
  """
  group_offsets: jax.Array
  group_ids: jax.Array
  tile_ids: jax.Array
  group_first_visit: jax.Array
  num_visits: jax.Array


def max_visits(num_row_tiles: int, num_groups: int, *,
               visit_empty_groups: bool, cover_tail: bool) -> int:
  """Static upper bound on `num_visits` (the grid size a kernel must allow).

  Let T = num_row_tiles, G = num_groups, E = number of empty groups,
  P = number of non-empty groups starting mid-tile. Every row tile below the
  last group row is entered at its first row by exactly one non-empty group
  (groups are contiguous and the first non-empty one starts at row 0), so the
  non-empty groups make cdiv(total, tm) + P visits, and P <= (G - E) - 1.
    * gmm (cover_tail, no empty visits): + T - cdiv(total, tm) sentinel visits
      gives T + P <= T + G - 1.
    * tgmm (empty visits, no tail): cdiv(total, tm) + P + E <= T + G - 1 when
      some group is non-empty, and E = G <= T + G - 1 otherwise.
    * both: T + P + E, which is T + G when every group is empty.
  """
  bound = num_row_tiles + num_groups - 1
  if visit_empty_groups and cover_tail:
    bound += 1
  return bound


def make_group_metadata(
    group_sizes: jax.Array,
    *,
    m: int,
    tm: int,
    num_row_tiles: int,
    visit_empty_groups: bool,
    cover_tail: bool,
) -> GroupMetadata:
  """Lists the (row tile, group) visits of a grouped matmul.

  Invariants (checked by tests/test_kernels.py over random group sizes):
    1. A non-empty group g is visited once for each row tile its rows touch,
       tiles floor(start_g / tm) .. cdiv(end_g, tm) - 1. A tile shared by two
       groups is therefore visited once per group; each visit writes only its
       own rows (`visit_row_masks`).
    2. Visits are ordered by group and, within a group, by tile; because groups
       are contiguous the tile ids are then non-decreasing too, so all visits
       of one output tile (gmm) and of one group (tgmm) are consecutive -- the
       Mosaic pipeline may only revisit an output block consecutively.
    3. Empty groups are skipped, unless `visit_empty_groups` (tgmm: out[g] must
       be written even when group g has no rows, so it gets one visit, at the
       tile holding its offset, clamped to the last tile, which keeps 2).
    4. With `cover_tail` (gmm), row tiles lying wholly at or past
       total = sum(sizes) get one visit of the sentinel group G, so every
       output tile is visited at least once and rows past `total` can be
       zero-filled.  A tile holding both group rows and tail rows needs no
       sentinel: its last visit zero-fills the tail rows.
    5. num_visits <= max_visits(...) (= T + G - 1 for gmm and for tgmm).
    6. With `cover_tail`, every row in [0, num_row_tiles * tm) is written by
       exactly one visit (its group's, or the zero fill), so output blocks need
       no initialisation and concurrent GPU programs never race.

  Group sizes are clipped so that groups end at row m at the latest: rows past
  m do not exist (negative sizes count as 0).

  Args:
    group_sizes: int32[G] rows per group, in row order.
    m: logical number of lhs rows.
    tm: rows per tile.
    num_row_tiles: T, with T * tm >= m (the padded row extent).
    visit_empty_groups: give each empty group one visit (tgmm).
    cover_tail: give wholly-tail tiles a sentinel visit (gmm).

  Returns:
    GroupMetadata with V = max_visits(T, G, ...).
  """
  if group_sizes.ndim != 1:
    raise ValueError(
        f"group_sizes must be 1-D [num_groups]; got shape {group_sizes.shape}.")
  num_groups = group_sizes.shape[0]
  if num_row_tiles * tm < m:
    raise ValueError(
        f"{num_row_tiles} row tiles of {tm} rows cannot hold m={m} rows.")
  sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
  ends = jnp.minimum(jnp.cumsum(sizes), m).astype(jnp.int32)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  total = ends[-1]
  nonempty = ends > starts

  # Invariant 1 (and 3): visits per group.
  first_tile = starts // tm
  end_tile = (ends + tm - 1) // tm
  empty_visits = 1 if visit_empty_groups else 0
  group_visits = jnp.where(nonempty, end_tile - first_tile, empty_visits)
  covered_tiles = (total + tm - 1) // tm
  tail_visits = (num_row_tiles - covered_tiles) if cover_tail else 0
  group_visits = jnp.concatenate(
      [group_visits, jnp.reshape(tail_visits, (1,)).astype(jnp.int32)])
  group_first_visit = jnp.concatenate(
      [jnp.zeros((1,), jnp.int32), jnp.cumsum(group_visits)]).astype(jnp.int32)
  num_visits = group_first_visit[-1]

  # Invariant 2: the same visits counted per tile. A tile is entered at its
  # first row by one visit if it holds group rows (or, with cover_tail, tail
  # rows); a non-empty group starting mid-tile adds one visit to that tile; an
  # empty group with a visit adds one to the tile holding its offset.
  tiles = jnp.arange(num_row_tiles, dtype=jnp.int32)
  base = jnp.ones_like(tiles) if cover_tail else (
      tiles < covered_tiles).astype(jnp.int32)
  extra = jnp.where(nonempty, (starts % tm) != 0, visit_empty_groups)
  extra_tile = jnp.minimum(starts // tm, num_row_tiles - 1)
  tile_visits = base.at[extra_tile].add(extra.astype(jnp.int32))

  bound = max_visits(num_row_tiles, num_groups,
                     visit_empty_groups=visit_empty_groups,
                     cover_tail=cover_tail)
  group_ids = jnp.repeat(jnp.arange(num_groups + 1, dtype=jnp.int32),
                         group_visits, total_repeat_length=bound)
  tile_ids = jnp.repeat(tiles, tile_visits, total_repeat_length=bound)
  # Padding visits repeat the last real one rather than whatever jnp.repeat
  # pads with, so that even a consumer that ignored num_visits would only
  # revisit the last block consecutively.
  last = jnp.maximum(num_visits - 1, 0)
  padding = jnp.arange(bound) >= num_visits
  group_ids = jnp.where(padding, group_ids[last], group_ids)
  tile_ids = jnp.where(padding, tile_ids[last], tile_ids)

  group_offsets = jnp.concatenate(
      [jnp.zeros((1,), jnp.int32), ends, jnp.reshape(total, (1,))])
  return GroupMetadata(
      group_offsets=group_offsets,
      group_ids=group_ids,
      tile_ids=tile_ids,
      group_first_visit=group_first_visit,
      num_visits=jnp.reshape(num_visits, (1,)),
  )


def group_row_mask(*, tile: jax.Array, tm: int, width: int,
                   group_start: jax.Array, group_end: jax.Array) -> jax.Array:
  """bool[tm, width]: rows of row tile `tile` in [group_start, group_end)."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (tm, width), 0) + tile * tm
  return (rows >= group_start) & (rows < group_end)


def visit_row_masks(
    *,
    tile: jax.Array,
    tm: int,
    width: int,
    group_start: jax.Array,
    group_end: jax.Array,
    total: jax.Array,
    zero_fill_tail: jax.Array | bool,
) -> tuple[jax.Array, jax.Array]:
  """Which rows of a [tm, width] output tile a gmm visit computes and writes.

  Args:
    tile: scalar row-tile id of the visit.
    tm, width: tile shape.
    group_start, group_end: scalar row range of the visit's group.
    total: scalar first row past every group.
    zero_fill_tail: whether this visit is the one that zero-fills the tile's
      rows at or past `total` (the last visit of the tile, invariant 6).

  Returns:
    (in_group, write): bool[tm, width] each. `in_group` marks rows holding
    this group's product; `write` adds the tail rows this visit zero-fills.
  """
  in_group = group_row_mask(tile=tile, tm=tm, width=width,
                            group_start=group_start, group_end=group_end)
  rows = jax.lax.broadcasted_iota(jnp.int32, (tm, width), 0) + tile * tm
  write = in_group | ((rows >= total) & zero_fill_tail)
  return in_group, write


def is_last_visit_of_tile(tile_ids_ref, num_visits: jax.Array, visit,
                          num_slots: int) -> jax.Array:
  """Whether visit `visit` is the last one of its row tile (scalar bool).

  `tile_ids_ref` may be a ref (inside a kernel) or an array; `num_slots` is
  its static length, used to keep the look-ahead index in bounds.
  """
  nxt = jnp.minimum(visit + 1, num_slots - 1)
  return (visit + 1 >= num_visits) | (tile_ids_ref[nxt] != tile_ids_ref[visit])
