"""Device mesh, logical-axis rules and the expert-parallel dispatch.

One mesh shape serves every scale: axes `("data", "expert", "model")`. Tokens (the flattened
batch) are split over `("data", "expert")` — expert parallelism reuses the batch axis, as in GShard
(Lepikhin et al., 2020) and MaxText — experts over `"expert"`, and the FFN hidden dimension,
attention heads and vocabulary over `"model"`. Model code never names a mesh axis; it names
*logical* axes, and `LOGICAL_AXIS_RULES` is the single table mapping them onto this mesh.

Fully sharded data parallel (`axis_rules(fsdp=True)`; gin: `train.fsdp`, the run files' `FSDP`)
adds the batch axes to the "embed" dimension of every weight, so parameters and optimizer state are
split over the devices that split the batch (ZeRO-3, MaxText's "fsdp" axis); XLA all-gathers each
weight where it is used. Without it dense weights are replicated over "data" and "expert". Either
layout computes the same numbers and a checkpoint written under one restores into the other.

`expert_parallel_ffn` is the sharded twin of the single-device dispatches in `hashmoe.experts`: the
same arguments, the same result, but each device holds only `num_experts / expert_axis` experts and
tokens travel to them with all-to-alls over the `"expert"` axis. Two transports:

  * "capacity": fixed-size per-expert send buffers `[experts, capacity, d]` and `lax.all_to_all`.
    Runs everywhere (XLA:CPU included); rows over capacity are dropped and counted. With
    `capacity_factor=None` the capacity is the worst case (every local row to one expert): dropless,
    but up to `num_experts`× the buffer memory and matmul rows of a balanced load.
  * "ragged": dropless and exactly sized. Per-expert row counts are exchanged first (an all-gather
    of `int32[num_experts]` per device), then the expert-sorted rows travel with
    `lax.ragged_all_to_all` straight into expert-major order on their destination, one grouped
    matmul (`lax.ragged_dot`) runs over the local experts, and a second ragged all-to-all brings the
    results back. XLA:CPU has no ragged-all-to-all, so on CPU (chosen at lowering time with
    `lax.platform_dependent`) the same plan runs over an exact dense emulation of the collective
    built from `lax.all_to_all`; TPU and GPU lower the real collective. The receive buffer is
    static, so it is sized for the dropless worst case: `expert_axis × local rows` rows per device.

Decision tree (`dropless`, `capacity_factor`):
  capacity_factor given    → "capacity", C = `hashmoe.experts.expert_capacity` per shard (drops)
  dropless="ragged"        → "ragged"
  dropless="capacity"      → "capacity" with the worst-case C (dropless by padding)
  dropless=None or True    → "ragged" on TPU/GPU meshes, worst-case "capacity" on CPU
  dropless=False           → needs a capacity_factor

MultiHash (Section 3.2) under expert parallelism takes two exchange rounds, because every slice's
second matmul reads the *whole* hidden vector `v = act([A_{k_1}(h); …; A_{k_N}(h)])`: round one
sends `h` to the N experts `k_m` and brings back their `D/N`-wide `A` slices, which are
concatenated into `v` at the token's home; round two sends `v` to the same N experts and brings
back their `d/N`-wide `B` slices. Each (expert, slice) pair is its own bucket (its own weights, its
own capacity). Parameters and FLOPs are those of a single hash, as the paper says, but the traffic
is not: round two moves N copies of a D-wide vector per token.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from hashmoe.activations import get_activation

Array = jax.Array
AnyMesh = Union[Mesh, jax.sharding.AbstractMesh]
LogicalRules = Sequence[tuple[str, Union[None, str, tuple[str, ...]]]]

MESH_AXES = ("data", "expert", "model")
# `jax.ad_checkpoint.checkpoint_name` of the rows an expert-parallel or local dispatch delivers to
# the experts: the "save_dispatch" remat policy (`hashmoe.layers.REMAT_POLICIES`) keeps them, so the
# backward pass recomputes neither the routing sort nor the forward all-to-all.
DISPATCH_CHECKPOINT_NAME = "moe_dispatch"
# The token (flattened batch) axis is split over both: expert parallelism shares the batch axis.
TOKEN_MESH_AXES = ("data", "expert")
EXPERT_AXIS = "expert"
MODEL_AXIS = "model"

# Rules are tried in order and a mesh axis is used at most once per array (flax semantics). "expert"
# comes first so that an array holding both an expert and a token axis gets the GShard post-dispatch
# layout: experts over "expert", tokens over what is left ("data", from the fallback rules).
LOGICAL_AXIS_RULES: tuple[tuple[str, Union[None, str, tuple[str, ...]]], ...] = (
    ("expert", "expert"),
    ("batch", ("data", "expert")),
    ("batch", "data"),
    ("expert_group", ("data", "expert")),
    ("expert_group", "data"),
    ("length", None),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("expert_capacity", None),
    ("unmodeled", None),
    # The stacked-layer axis of scanned layers (TransformerConfig.scan_layers): never sharded, as
    # each scan step needs its whole layer.
    ("layers", None),
)

# Fully sharded data parallel (ZeRO-3 / MaxText's "fsdp" axis, here the batch axes themselves):
# every weight dimension named "embed" is split over the devices that split the batch, so each
# parameter and its Adam moments live once per data-parallel group instead of once per device; XLA
# all-gathers a weight where a layer uses it and reduce-scatters its gradient. Dense weights take
# ("data", "expert") (the whole batch group); expert weights, whose "expert" dimension holds the
# expert axis already, fall back to "data". Activations keep "embed" unsharded: their "batch" rule
# comes first and claims both axes.
FSDP_EMBED_RULES: tuple[tuple[str, Union[None, str, tuple[str, ...]]], ...] = (
    ("embed", TOKEN_MESH_AXES),
    ("embed", "data"),
)


def axis_rules(*, fsdp: bool = False) -> tuple[tuple[str, Union[None, str, tuple[str, ...]]], ...]:
  """The logical-axis rules of a run.

  Args:
    fsdp: shard weights and optimizer state over the batch axes as well (`FSDP_EMBED_RULES` in
      place of `("embed", None)`). Numerics are unchanged; every "embed" dimension of every
      parameter must then divide by the sizes of the axes it is split over (`shard_params` names
      the parameter otherwise).

  Returns:
    `LOGICAL_AXIS_RULES`, or its FSDP variant.
  """
  if not isinstance(fsdp, bool):
    raise TypeError(f"fsdp must be True or False, got {fsdp!r}")
  if not fsdp:
    return LOGICAL_AXIS_RULES
  rules = []
  for logical, physical in LOGICAL_AXIS_RULES:
    rules.extend(FSDP_EMBED_RULES if logical == "embed" else [(logical, physical)])
  return tuple(rules)


def is_fsdp(rules: LogicalRules) -> bool:
  """Whether `rules` shard any "embed" dimension (i.e. weights over batch axes)."""
  return any(logical == "embed" and physical is not None for logical, physical in rules)


# --------------------------------------------------------------------------------------------------
# Mesh.


def make_mesh(data: int = -1, expert: int = 1, model: int = 1, *,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A `("data", "expert", "model")` mesh with Auto (GSPMD) axis types.

  Auto axes let `jax.jit` and `jax.shard_map` reshard inputs to the specs they ask for; jax's
  default Explicit axes would instead demand that every input already carries them.

  Args:
    data, expert, model: axis sizes; at most one may be -1, meaning "the devices left over".
    devices: the devices to lay out (default: all of `jax.devices()`).

  Returns:
    A `jax.sharding.Mesh` of shape `(data, expert, model)`.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "expert": expert, "model": model}
  for name, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise ValueError(f"mesh axis {name!r} has size {size!r}; expected a positive int or -1")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {free} all -1")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if len(devices) % fixed:
      raise ValueError(
          f"cannot infer mesh axis {free[0]!r}: {len(devices)} devices are not divisible by the "
          f"product {fixed} of the other axes {sizes}")
    sizes[free[0]] = len(devices) // fixed
  elif fixed != len(devices):
    raise ValueError(
        f"mesh data×expert×model = {sizes['data']}×{sizes['expert']}×{sizes['model']} = {fixed} "
        f"does not match the {len(devices)} devices available")
  shape = tuple(int(sizes[name]) for name in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def check_expert_sharding(num_experts: int, mesh: AnyMesh) -> None:
  """Raises ValueError unless the experts split evenly over the mesh's "expert" axis."""
  if EXPERT_AXIS not in mesh.shape:
    raise ValueError(f"mesh axes {tuple(mesh.shape)} have no {EXPERT_AXIS!r} axis")
  size = mesh.shape[EXPERT_AXIS]
  if num_experts % size:
    raise ValueError(f"num_experts={num_experts} is not divisible by the mesh's "
                     f"{EXPERT_AXIS!r} axis of size {size}; each device must hold the same number "
                     f"of experts")


# --------------------------------------------------------------------------------------------------
# Logical axis rules.


def _check_rules_fit_mesh(rules: LogicalRules, mesh: AnyMesh) -> None:
  for logical, physical in rules:
    for axis in jax.tree_util.tree_leaves(physical):
      if axis not in mesh.shape:
        raise ValueError(f"logical axis rule {logical!r} -> {physical!r} names mesh axis "
                         f"{axis!r}, but the mesh has axes {tuple(mesh.shape)}")


def logical_to_mesh_sharding(logical_specs_tree: Any, mesh: AnyMesh,
                             rules: LogicalRules = LOGICAL_AXIS_RULES) -> Any:
  """Maps a tree of logical `PartitionSpec`s (e.g. `PartitionSpec("expert", "embed", "mlp")`) to
  `NamedSharding`s on `mesh` through `rules` (flax's priority-ordered rule semantics)."""
  _check_rules_fit_mesh(rules, mesh)
  return nn.logical_to_mesh_sharding(logical_specs_tree, mesh, list(rules))


def _mesh_spec_of_box(box: meta.AxisMetadata, rules: LogicalRules) -> P:
  if isinstance(box, nn.LogicallyPartitioned):
    return nn.logical_to_mesh_axes(box.names, list(rules))
  # `nn.with_partitioning` boxes already name mesh axes.
  return box.get_partition_spec()


def _check_divisible(path: Any, shape: Sequence[int], spec: P, mesh: AnyMesh) -> None:
  for dim, axes in zip(shape, spec):
    if axes is None or axes is P.UNCONSTRAINED:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(mesh.shape[a] for a in axes)
    if dim % size:
      hint = ""
      if "data" in axes:
        # Only FSDP puts a weight dimension on "data" (alone or with "expert").
        hint = (f"; under FSDP (gin FSDP / train.fsdp = True) every 'embed' dimension "
                f"must divide by the batch axes it is split over: choose a mesh whose "
                f"{' x '.join(axes)} size divides {dim}, or set fsdp = False")
      raise ValueError(f"parameter {jax.tree_util.keystr(path)} of shape {tuple(shape)} cannot "
                       f"be sharded as {spec}: dimension {dim} is not divisible by mesh axes "
                       f"{axes} of total size {size}{hint}")


def shard_params(params_or_abstract: Any, mesh: AnyMesh,
                 rules: LogicalRules = LOGICAL_AXIS_RULES) -> Any:
  """`NamedSharding`s for a parameter tree built with `nn.with_logical_partitioning`.

  Args:
    params_or_abstract: the (boxed) variables from `Module.init`, or their abstract version from
      `jax.eval_shape(module.init, ...)`. Leaves boxed in `nn.LogicallyPartitioned` are mapped
      through `rules` (flax's `nn.logical_to_mesh_axes`); `nn.Partitioned` boxes already name mesh
      axes and are kept as they are; unboxed arrays are replicated.
    mesh: the device mesh.
    rules: logical-to-mesh rules.

  Returns:
    A tree of the unboxed structure whose leaves are `NamedSharding`s.
  """
  _check_rules_fit_mesh(rules, mesh)

  def leaf(path, x):
    if isinstance(x, meta.AxisMetadata):
      spec = _mesh_spec_of_box(x, rules)
      shape = getattr(x.value, "shape", None)
    elif hasattr(x, "shape"):
      spec, shape = P(), x.shape
    else:
      return None
    if shape is not None:
      _check_divisible(path, shape, spec, mesh)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(
      leaf, params_or_abstract, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def batch_sharding(mesh: AnyMesh, rules: LogicalRules = LOGICAL_AXIS_RULES) -> NamedSharding:
  """The sharding of input batches `[batch, length, ...]`: the batch axis by the "batch" rule
  (over `("data", "expert")`), everything else replicated."""
  _check_rules_fit_mesh(rules, mesh)
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), list(rules)))


# --------------------------------------------------------------------------------------------------
# Row gathers with a known inverse.
#
# Dispatch and combine move rows by index maps that are injective (every buffer slot holds at most
# one (token, column) row, every row sits in at most one slot). A plain gather would differentiate
# into a scatter-add, which is slow on XLA:CPU; knowing the inverse map, the backward pass is
# another gather.


@jax.custom_vjp
def _gather_rows(src: Array, index: Array, inverse: Array) -> Array:
  """`out[j] = src[index[j]]`, zero where `index[j] == len(src)`.

  Args:
    src: [n, ...].
    index: int32[*out_batch] into `src` rows; `n` means "empty".
    inverse: int32[n, k]: for each src row the flat positions j in `index` that read it, padded with
      `index.size` (each src row is read at most k times, each j reads one row).
  """
  pad = jnp.zeros((1,) + src.shape[1:], src.dtype)
  return jnp.take(jnp.concatenate([src, pad]), index, axis=0, mode="clip")


def _gather_rows_fwd(src, index, inverse):
  return _gather_rows(src, index, inverse), (index, inverse)


def _gather_rows_bwd(res, g):
  index, inverse = res
  g = g.reshape((index.size,) + g.shape[index.ndim:])
  g = jnp.concatenate([g, jnp.zeros((1,) + g.shape[1:], g.dtype)])
  g_src = jnp.take(g, inverse, axis=0, mode="clip").sum(axis=1)
  return g_src, None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def _exclusive_cumsum(x: Array, axis: int = -1) -> Array:
  return jnp.cumsum(x, axis=axis) - x


# --------------------------------------------------------------------------------------------------
# Transport 1: fixed-capacity buffers and lax.all_to_all.


def _bucket_slots(bucket: Array, num_buckets: int, capacity: int):
  """Assigns each (token, column) row a slot in `[num_buckets, capacity]` send buffers.

  Priority follows GShard/Switch: all first columns (top-1 choices) before any second column, tokens
  in order within a column; rows beyond a bucket's capacity are dropped.

  Args:
    bucket: int32[tokens, K] bucket of each row, `num_buckets` for a row that goes nowhere.
    num_buckets: B.
    capacity: C.

  Returns:
    slot_of_row: int32[tokens, K] flat slot in [0, B·C), or B·C when dropped.
    row_of_slot: int32[B·C] flat row id `t·K + k`, or tokens·K when the slot is empty.
    kept: bool[tokens, K].
  """
  tokens, k = bucket.shape
  rows = tokens * k
  by_priority = bucket.T.reshape(rows)  # position k·T + t
  # row_id[k·T + t] = t·K + k: the row's position in the [tokens, K] layout.
  row_id = (jnp.arange(tokens, dtype=jnp.int32)[None, :] * k
            + jnp.arange(k, dtype=jnp.int32)[:, None]).reshape(rows)
  order = jnp.argsort(by_priority, stable=True)
  sorted_bucket = by_priority[order]
  starts = jnp.searchsorted(sorted_bucket, jnp.arange(num_buckets + 1, dtype=sorted_bucket.dtype))
  rank_sorted = jnp.arange(rows, dtype=jnp.int32) - starts[sorted_bucket].astype(jnp.int32)
  rank = jnp.zeros((rows,), jnp.int32).at[order].set(rank_sorted, unique_indices=True)
  kept = (by_priority < num_buckets) & (rank < capacity)
  slot = jnp.where(kept, by_priority * capacity + rank, num_buckets * capacity).astype(jnp.int32)
  row_of_slot = jnp.full((num_buckets * capacity,), rows, jnp.int32).at[slot].set(
      row_id, mode="drop")
  return slot.reshape(k, tokens).T, row_of_slot, kept.reshape(k, tokens).T


class _CapacityExchange:
  """Moves rows to their bucket's device through `[buckets, capacity]` buffers and back.

  Inside `shard_map`: buckets are grouped by device (bucket b lives on device `b // local_buckets`
  of the "expert" axis), so one `all_to_all` delivers every local bucket's rows from every peer.
  """

  def __init__(self, bucket: Array, num_buckets: int, capacity: int, expert_axis_size: int):
    self.tokens, self.k = bucket.shape
    self.num_buckets, self.capacity, self.peers = num_buckets, capacity, expert_axis_size
    self.local_buckets = num_buckets // expert_axis_size
    self.slot_of_row, self.row_of_slot, self.kept = _bucket_slots(bucket, num_buckets, capacity)

  def dispatch(self, src: Array) -> Array:
    """src: [tokens, w] → rows at their experts: [local_buckets, peers·capacity, w]."""
    w = src.shape[-1]
    buf = _gather_rows(src, self.row_of_slot // self.k, self.slot_of_row)  # [B·C, w]
    buf = buf.reshape(self.peers, self.local_buckets * self.capacity, w)
    with jax.named_scope("all_to_all_dispatch"):
      recv = jax.lax.all_to_all(buf, EXPERT_AXIS, 0, 0)  # recv[s] = peer s's rows for my buckets
    recv = recv.reshape(self.peers, self.local_buckets, self.capacity, w)
    recv = recv.transpose(1, 0, 2, 3).reshape(self.local_buckets, self.peers * self.capacity, w)
    return checkpoint_name(recv, DISPATCH_CHECKPOINT_NAME)

  def matmul(self, rows: Array, weights: Array) -> Array:
    """rows: [local_buckets, peers·capacity, w], weights: [local_buckets, w, u] → [..., u]."""
    return jnp.einsum("gcw,gwu->gcu", rows, weights)

  def combine(self, rows: Array) -> Array:
    """rows: [local_buckets, peers·capacity, u] → per-row results at home: [tokens, K, u]
    (zero for dropped rows)."""
    u = rows.shape[-1]
    back = rows.reshape(self.local_buckets, self.peers, self.capacity, u).transpose(1, 0, 2, 3)
    with jax.named_scope("all_to_all_return"):
      back = jax.lax.all_to_all(back.reshape(self.peers, self.local_buckets * self.capacity, u),
                                EXPERT_AXIS, 0, 0)
    back = back.reshape(self.num_buckets * self.capacity, u)
    return _gather_rows(back, self.slot_of_row, self.row_of_slot[:, None])


# --------------------------------------------------------------------------------------------------
# Transport 2: exact counts and lax.ragged_all_to_all.


def _ragged_all_to_all_dense(operand: Array, output: Array, input_offsets: Array,
                             send_sizes: Array, output_offsets: Array, recv_sizes: Array, *,
                             axis_name: str) -> Array:
  """`lax.ragged_all_to_all` with its documented semantics, built from a dense `all_to_all`.

  XLA:CPU cannot run ragged-all-to-all; this pads every sent slice to the operand's length, so it
  costs `len(input_offsets) × len(operand)` rows of traffic: a correctness path, not a fast one.
  """
  num_slices = input_offsets.shape[0]
  peers = jax.lax.axis_size(axis_name)
  length = operand.shape[0]
  r = jnp.arange(length, dtype=jnp.int32)
  src_row = input_offsets[:, None] + r[None, :]  # [slices, length]
  valid = r[None, :] < send_sizes[:, None]
  chunks = jnp.take(operand, jnp.clip(src_row, 0, length - 1), axis=0)
  chunks = jnp.where(valid.reshape(valid.shape + (1,) * (operand.ndim - 1)), chunks, 0)
  chunks = chunks.reshape((peers, num_slices // peers, length) + operand.shape[1:])
  recv = jax.lax.all_to_all(chunks, axis_name, 0, 0).reshape((num_slices, length)
                                                              + operand.shape[1:])
  offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where peers write
  p = jnp.arange(output.shape[0], dtype=jnp.int32)[:, None]
  hit = (p >= offsets[None, :]) & (p < offsets[None, :] + recv_sizes[None, :])  # [out, slices]
  which = jnp.argmax(hit, axis=1)
  within = jnp.clip(p[:, 0] - offsets[which], 0, length - 1)
  received = recv[which, within]
  mask = hit.any(axis=1).reshape((-1,) + (1,) * (operand.ndim - 1))
  return jnp.where(mask, received, output)


def _ragged_all_to_all(*args, axis_name: str) -> Array:
  # Chosen when lowering, not tracing: an exported or AOT-compiled function keeps the real
  # collective for TPU/GPU and the emulation only in its CPU lowering.
  return jax.lax.platform_dependent(
      *args,
      cpu=functools.partial(_ragged_all_to_all_dense, axis_name=axis_name),
      default=functools.partial(jax.lax.ragged_all_to_all, axis_name=axis_name))


class _RaggedExchange:
  """Moves rows to their bucket's device with exact sizes (no capacity, no drops) and back.

  Every device sorts its rows by bucket and all-gathers its `int32[B]` counts over the "expert"
  axis; from the `[peers, B]` count matrix every offset of both ragged all-to-alls follows locally
  (an all-to-all of the counts would give each device only its own column). Each bucket is its own
  slice of the collective, so rows land on their destination already bucket-major (bucket, then
  source peer) and the local grouped matmul needs no second sort.
  """

  def __init__(self, bucket: Array, num_buckets: int, expert_axis_size: int):
    self.tokens, self.k = bucket.shape
    self.peers = expert_axis_size
    self.local_buckets = num_buckets // expert_axis_size
    rows = self.tokens * self.k
    self.rows = rows
    flat = bucket.reshape(rows)  # row id t·K + k
    self.order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    self.pos_of_row = jnp.zeros((rows,), jnp.int32).at[self.order].set(
        jnp.arange(rows, dtype=jnp.int32), unique_indices=True).reshape(self.tokens, self.k)
    counts = jnp.bincount(flat, length=num_buckets + 1)[:num_buckets].astype(jnp.int32)
    all_counts = jax.lax.all_gather(counts, EXPERT_AXIS)  # [peers, B]
    me = jax.lax.axis_index(EXPERT_AXIS)
    lb = self.local_buckets
    first = me * lb
    totals = all_counts.sum(axis=0)  # rows per bucket, all peers
    # Start of each bucket inside its device's receive buffer (buckets of one device are adjacent).
    bucket_start = _exclusive_cumsum(totals.reshape(self.peers, lb), axis=1).reshape(num_buckets)
    from_earlier_peers = _exclusive_cumsum(all_counts, axis=0)  # [peers, B]
    send_offsets_all = _exclusive_cumsum(all_counts, axis=1)  # [peers, B]: peers' sorted layouts

    def mine(a):  # the columns of a [peers, B] matrix that belong to my buckets → [peers·lb]
      return jax.lax.dynamic_slice_in_dim(a, first, lb, axis=1).reshape(self.peers * lb)

    self.forward_args = (
        send_offsets_all[me],  # input_offsets: my rows of bucket b start here in my sorted rows
        counts,  # send_sizes
        bucket_start + from_earlier_peers[me],  # output_offsets: where they land on b's device
        mine(all_counts))  # recv_sizes, slice i = peer·lb + local bucket
    my_bucket_start = jax.lax.dynamic_slice_in_dim(bucket_start, first, lb)
    self.backward_args = (
        (my_bucket_start[None, :]
         + jax.lax.dynamic_slice_in_dim(from_earlier_peers, first, lb, axis=1)).reshape(-1),
        mine(all_counts),
        mine(send_offsets_all),
        counts)
    self.group_sizes = jax.lax.dynamic_slice_in_dim(totals, first, lb)
    # Dropless worst case: every peer sends all its rows to this device.
    self.buffer_rows = self.peers * rows

  def dispatch(self, src: Array) -> Array:
    """src: [tokens, w] → rows at their experts, bucket-major: [peers·rows, w] (zero padded)."""
    sorted_rows = _gather_rows(src, self.order // self.k, self.pos_of_row)
    # zeros_like (not zeros) so that the buffer varies over the same mesh axes as the rows.
    out = jnp.zeros_like(sorted_rows, shape=(self.buffer_rows,) + src.shape[1:])
    with jax.named_scope("all_to_all_dispatch"):
      recv = _ragged_all_to_all(sorted_rows, out, *self.forward_args, axis_name=EXPERT_AXIS)
    return checkpoint_name(recv, DISPATCH_CHECKPOINT_NAME)

  def matmul(self, rows: Array, weights: Array) -> Array:
    """rows: [peers·rows, w], weights: [local_buckets, w, u] → [peers·rows, u]."""
    return jax.lax.ragged_dot(rows, weights, self.group_sizes)

  def combine(self, rows: Array) -> Array:
    """rows: [peers·rows, u] → per-row results at home: [tokens, K, u]."""
    out = jnp.zeros_like(rows, shape=(self.rows,) + rows.shape[1:])
    with jax.named_scope("all_to_all_return"):
      back = _ragged_all_to_all(rows, out, *self.backward_args, axis_name=EXPERT_AXIS)
    return _gather_rows(back, self.pos_of_row, self.order[:, None])


# --------------------------------------------------------------------------------------------------
# The expert-parallel FFN.


def _resolve_activation(activation: Union[str, Callable[[Array], Array]]) -> Callable:
  return activation if callable(activation) else get_activation(activation)


def _resolve_mesh(mesh: Optional[AnyMesh], num_experts: int) -> AnyMesh:
  if mesh is not None:
    return mesh
  context = jax.sharding.get_abstract_mesh()
  if not context.empty:
    return context
  # No mesh anywhere: spread experts over as many devices as divide them, tokens over the rest.
  return make_mesh(expert=math.gcd(num_experts, jax.device_count()))


def _mesh_platform(mesh: AnyMesh) -> str:
  if isinstance(mesh, Mesh):
    return mesh.devices.flat[0].platform
  return jax.default_backend()


def _resolve_transport(dropless: Union[None, bool, str], capacity_factor: Optional[float],
                       mesh: AnyMesh) -> str:
  if not (dropless is None or isinstance(dropless, bool) or dropless in ("ragged", "capacity")):
    raise ValueError(f"dropless={dropless!r}; expected None, True, False, 'ragged' or 'capacity'")
  if capacity_factor is not None:
    if not capacity_factor > 0:
      raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got "
                       f"{capacity_factor}")
    if dropless not in (None, False):
      raise ValueError(f"capacity_factor={capacity_factor} drops tokens, which contradicts "
                       f"dropless={dropless!r}; pass one or the other")
    return "capacity"
  if dropless is False:
    raise ValueError("dropless=False needs a capacity_factor")
  if dropless in ("ragged", "capacity"):
    return dropless
  return "capacity" if _mesh_platform(mesh) == "cpu" else "ragged"


def _capacity(local_tokens: int, num_experts: int, columns: int, num_slices: int,
              capacity_factor: Optional[float]) -> int:
  """Rows per bucket and shard, by the formula every hashmoe dispatch shares
  (`hashmoe.experts.expert_capacity`), never above the worst case."""
  from hashmoe import experts  # Lazy: experts imports this module lazily too.
  worst = local_tokens * columns // num_slices
  return min(worst, experts.expert_capacity(local_tokens, num_experts, num_columns=columns,
                                            num_slices=num_slices,
                                            capacity_factor=capacity_factor))


def expert_parallel_ffn(x: Array, expert_index: Array, combine_weight: Array, wi: Array, wo: Array,
                        *, activation: Union[str, Callable[[Array], Array]], num_slices: int = 1,
                        mesh: Optional[AnyMesh] = None, capacity_factor: Optional[float] = None,
                        dropless: Union[None, bool, str] = None) -> tuple[Array, dict[str, Array]]:
  """Expert FFNs with the experts sharded over the mesh's "expert" axis (see the module docstring).

  Computes what the single-device dispatches of `hashmoe.experts` compute, with their conventions:
  `y[t] = Σ_h combine_weight[t, h] · B_e(act(A_e(x[t])))` with `e = expert_index[t, h]`,
  `A_e = wi[e]`, `B_e = wo[e]` (top-k when H > 1). With `num_slices = N > 1` this is MultiHash
  (Section 3.2): column m picks the expert `k_m` of slice m,
  `v = act([x A_{k_1}^{(1)}; …; x A_{k_N}^{(N)}])` with `A^{(m)}` the m-th block of D/N columns of
  `wi[k_m]`, and output block m (d/N wide) is `combine_weight[t, m] · v B_{k_m}^{(m)}` with
  `B^{(m)}` the m-th block of d/N columns of `wo[k_m]`.

  * An assignment is a (token, column) pair; one with combine weight exactly 0 (router-dropped) or
    an expert index outside [0, E) takes no capacity and no compute and contributes 0 (for MultiHash
    its segment of v is 0).
  * Tokens are split over ("data", "expert") in contiguous blocks (shard `data_index · E_axis +
    expert_axis_index`). Capacity and drops are per shard: assignments are ranked column-major
    (every first choice before any second choice), then by token; those past a bucket's capacity
    are dropped and contribute 0 (a dropped MultiHash slice also zeroes its segment of v).
  * The FFN hidden dimension D may also be split over "model" (each model shard computes its D
    columns; the outputs are summed over "model").

  Args:
    x: float[tokens, d].
    expert_index: int32[tokens, H].
    combine_weight: float[tokens, H].
    wi: float[E, d, D].
    wo: float[E, D, d].
    activation: elementwise nonlinearity (a callable or a `jax.nn` name).
    num_slices: N for MultiHash (then H must equal N); 1 otherwise.
    mesh: the device mesh (`make_mesh`); default the context mesh (`jax.set_mesh`), else all devices
      with `gcd(E, device_count)` of them on the expert axis.
    capacity_factor: a bucket (an expert for top-k, an (expert, slice) pair for MultiHash) takes
      `ceil(capacity_factor · local_tokens · H / (N · E))` rows per shard (at least 1);
      None for dropless.
    dropless: None/True (the platform's dropless transport), False (needs capacity_factor),
      "ragged" or "capacity" (see the decision tree in the module docstring).

  Returns:
    y: float[tokens, d] in x's dtype.
    metrics: `group_sizes` int32[E] (active assignments per expert over all shards, summed over
      slices, before capacity) and `dropped_fraction` float32[] (dropped / active assignments).
  """
  if x.ndim != 2:
    raise ValueError(f"x must be float[tokens, d], got shape {x.shape}")
  tokens, d = x.shape
  if expert_index.ndim != 2 or expert_index.shape[0] != tokens:
    raise ValueError(f"expert_index has shape {expert_index.shape}, expected [tokens={tokens}, H]")
  if not jnp.issubdtype(expert_index.dtype, jnp.integer):
    raise TypeError(f"expert_index must be an integer array, got dtype {expert_index.dtype}")
  if combine_weight.shape != expert_index.shape:
    raise ValueError(f"combine_weight has shape {combine_weight.shape}, expected expert_index's "
                     f"shape {expert_index.shape}")
  if wi.ndim != 3 or wi.shape[1] != d:
    raise ValueError(f"wi has shape {wi.shape}, expected [E, d={d}, D]")
  num_experts, _, d_ff = wi.shape
  if wo.shape != (num_experts, d_ff, d):
    raise ValueError(f"wo has shape {wo.shape}, expected {(num_experts, d_ff, d)}")
  columns = expert_index.shape[1]
  if num_slices < 1:
    raise ValueError(f"num_slices must be >= 1, got {num_slices}")
  if num_slices > 1:
    if columns != num_slices:
      raise ValueError(f"MultiHash with num_slices={num_slices} needs one expert_index column per "
                       f"slice, got {columns} columns")
    if d_ff % num_slices or d % num_slices:
      raise ValueError(f"MultiHash splits D={d_ff} and d={d} into num_slices={num_slices} blocks; "
                       f"both must be divisible by it")
  act = _resolve_activation(activation)

  mesh = _resolve_mesh(mesh, num_experts)
  for axis in MESH_AXES:
    if axis not in mesh.shape:
      raise ValueError(f"mesh axes {tuple(mesh.shape)} lack {axis!r}; build the mesh with "
                       f"hashmoe.sharding.make_mesh")
  check_expert_sharding(num_experts, mesh)
  peers, model = mesh.shape[EXPERT_AXIS], mesh.shape[MODEL_AXIS]
  shards = mesh.shape["data"] * peers
  if tokens % shards:
    raise ValueError(f"tokens={tokens} must be divisible by the {shards} token shards "
                     f"(data × expert = {mesh.shape['data']} × {peers})")
  if d_ff % model:
    raise ValueError(f"d_ff={d_ff} must be divisible by the 'model' axis of size {model}")
  if num_slices > 1:
    slice_width, local_d_ff = d_ff // num_slices, d_ff // model
    if local_d_ff % slice_width and slice_width % local_d_ff:
      raise ValueError(
          f"MultiHash slices of width D/N = {slice_width} and 'model' shards of width "
          f"D/model = {local_d_ff} must nest (one a multiple of the other); got D={d_ff}, "
          f"num_slices={num_slices}, model={model}")
  transport = _resolve_transport(dropless, capacity_factor, mesh)
  capacity = _capacity(tokens // shards, num_experts, columns, num_slices, capacity_factor)

  common = dict(act=act, num_experts=num_experts, peers=peers, capacity=capacity,
                transport=transport)
  if num_slices == 1:
    body = functools.partial(_topk_body, **common)
  else:
    body = functools.partial(_multihash_body, **common, num_slices=num_slices, d_ff=d_ff,
                             model=model)
  token_spec = P(TOKEN_MESH_AXES, None)
  y, group_sizes, dropped = jax.shard_map(
      body, mesh=mesh,
      in_specs=(token_spec, token_spec, token_spec, P(EXPERT_AXIS, None, MODEL_AXIS),
                P(EXPERT_AXIS, MODEL_AXIS, None)),
      out_specs=(token_spec, P(), P()))(x, expert_index.astype(jnp.int32), combine_weight, wi, wo)
  active = jnp.sum(group_sizes)
  metrics = {
      "group_sizes": group_sizes,
      "dropped_fraction": (dropped / jnp.maximum(active, 1)).astype(jnp.float32),
  }
  return y, metrics


def _active(expert_index: Array, combine_weight: Array, num_experts: int) -> Array:
  """bool[T_l, K]: assignments that take capacity and compute (see `expert_parallel_ffn`)."""
  return (expert_index >= 0) & (expert_index < num_experts) & (combine_weight != 0)


def _exchange(transport: str, bucket: Array, active: Array, num_buckets: int, capacity: int,
              peers: int):
  bucket = jnp.where(active, bucket, num_buckets).astype(jnp.int32)
  if transport == "capacity":
    return _CapacityExchange(bucket, num_buckets, capacity, peers)
  return _RaggedExchange(bucket, num_buckets, peers)


def _kept(exchange, active: Array) -> Array:
  if isinstance(exchange, _CapacityExchange):
    return exchange.kept  # Already excludes inactive rows (their bucket is the sentinel).
  return active


def _routing_counts(expert_index: Array, active: Array, kept: Array, num_experts: int):
  """Global (over all token shards) active assignments per expert and dropped assignments."""
  per_expert = jnp.bincount(jnp.where(active, expert_index, num_experts).reshape(-1),
                            length=num_experts + 1)[:num_experts].astype(jnp.int32)
  dropped = jnp.sum(active & ~kept, dtype=jnp.int32)
  return jax.lax.psum(per_expert, TOKEN_MESH_AXES), jax.lax.psum(dropped, TOKEN_MESH_AXES)


def _topk_body(x, expert_index, combine_weight, wi, wo, *, act, num_experts, peers, capacity,
               transport):
  """One shard: x [T_l, d], expert_index and combine_weight [T_l, H], wi [E_l, d, D_l],
  wo [E_l, D_l, d].

  Each (token, column) row travels whole to its expert; A, act and B all run there (one round).
  """
  active = _active(expert_index, combine_weight, num_experts)
  ex = _exchange(transport, expert_index, active, num_experts, capacity, peers)
  hidden = act(ex.matmul(ex.dispatch(x), wi))
  out = ex.combine(ex.matmul(hidden, wo))  # [T_l, H, d], partial over the 'model' shards of D
  y = jnp.einsum("thd,th->td", out, combine_weight.astype(out.dtype))
  y = jax.lax.psum(y, MODEL_AXIS).astype(x.dtype)
  return (y,) + _routing_counts(expert_index, active, _kept(ex, active), num_experts)


def _multihash_body(x, expert_index, combine_weight, wi, wo, *, act, num_experts, peers, capacity,
                    transport, num_slices, d_ff, model):
  """One shard of MultiHash (Section 3.2) in two exchange rounds; shapes as in `_topk_body`, H = N.

  This 'model' shard j owns the D columns [j·D_l, (j+1)·D_l) of `wi` and the same rows of `wo`.
  Slice widths D/N and D_l nest, so those columns are n_loc whole slices starting at slice m0
  (D_l >= D/N) or one part of slice m0 (D_l < D/N); round one only moves those slices' rows.
  """
  tokens, d = x.shape
  experts_here = wi.shape[0]
  local_d_ff = d_ff // model
  slice_width = d_ff // num_slices
  n_loc = max(1, local_d_ff // slice_width)
  w_loc = local_d_ff // n_loc
  m0 = (jax.lax.axis_index(MODEL_AXIS) * local_d_ff) // slice_width
  active = _active(expert_index, combine_weight, num_experts)

  # Round 1: x → the experts k_m of this shard's slices; each returns x A_{k_m}^{(m)} (its columns).
  index_here = jax.lax.dynamic_slice_in_dim(expert_index, m0, n_loc, axis=1)  # [T_l, n_loc]
  active_here = jax.lax.dynamic_slice_in_dim(active, m0, n_loc, axis=1)
  bucket = index_here * n_loc + jnp.arange(n_loc, dtype=jnp.int32)[None, :]  # (expert, slice)
  ex1 = _exchange(transport, bucket, active_here, num_experts * n_loc, capacity, peers)
  wi_sub = wi.reshape(experts_here, d, n_loc, w_loc).transpose(0, 2, 1, 3).reshape(
      experts_here * n_loc, d, w_loc)
  # Which rows move depends on this shard's 'model' index: marking x as varying over 'model' makes
  # its cotangent sum over the model shards.
  x = jax.lax.pcast(x, MODEL_AXIS, to="varying")
  u = ex1.combine(ex1.matmul(ex1.dispatch(x), wi_sub))  # [T_l, n_loc, w_loc]
  # A dropped or inactive slice contributes nothing to v, whatever act(0) is.
  keep_here = _kept(ex1, active_here)[..., None]
  v = jnp.where(keep_here, act(u), 0).reshape(tokens, local_d_ff)  # v's columns of this shard

  # Round 2: v → all N experts k_m; each returns v B_{k_m}^{(m)}, partial over the D shards.
  bucket = expert_index * num_slices + jnp.arange(num_slices, dtype=jnp.int32)[None, :]
  ex2 = _exchange(transport, bucket, active, num_experts * num_slices, capacity, peers)
  out_width = d // num_slices
  wo_sub = wo.reshape(experts_here, local_d_ff, num_slices, out_width).transpose(0, 2, 1, 3)
  wo_sub = wo_sub.reshape(experts_here * num_slices, local_d_ff, out_width)
  out = ex2.combine(ex2.matmul(ex2.dispatch(v), wo_sub))  # [T_l, N, d/N]
  y = (out * combine_weight[..., None].astype(out.dtype)).reshape(tokens, d)
  y = jax.lax.psum(y, MODEL_AXIS).astype(x.dtype)
  return (y,) + _routing_counts(expert_index, active, _kept(ex2, active), num_experts)


# gin: run files bind the mesh (`hashmoe.sharding.make_mesh.data = ...`). make_mesh itself stays
# unwrapped, so a Python caller never reads gin bindings.
gin.external_configurable(make_mesh, module="hashmoe.sharding")
