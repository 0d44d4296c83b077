"""A batch's hash-routing assignments grouped by expert, from token ids alone.

Roller et al. 2021, "Hash Layers For Large Sparse Models" (arXiv 2106.04426), §3.

The expert of a token under a hash layer depends on its token ids alone (`hashmoe.hashing`: the
table and the key), so the permutation that groups a batch's tokens by expert, and the group sizes,
can be computed on the host, once per batch and per (key, tables), and shared by every hash layer
that routes the same way (`routing_signature` names them): `precompute_routing`,
`precompute_hash_routing`. The experts then skip their argsort; the result is identical.

A batch sharded over hosts is grouped row by row instead (`row_routing`: each host its own rows)
and assembled on device with cumulative sums and one scatter (`assemble_sorted_assignments`), into
the same permutation; `hashmoe.host_routing` does this for a run's input pipeline, and the batch
carries the rows' grouping as features named by `row_routing_feature_names`.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, NamedTuple, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np

from hashmoe.hashing import KEYS, ArrayLike, HashTable, check_token_ids, routing_keys


# ------------------------------------------------------------------------------------------------
# Precomputed routing: the input pipeline's half of a hash layer's dispatch.

# Tables a hash layer routes with: one 1-D table (one hash), a sequence of N 1-D tables (MultiHash,
# §3.2) or one top-k table (k experts per key).
RoutingTables = Union[HashTable, Sequence[HashTable]]


class SortedAssignments(NamedTuple):
  """A batch's hash-routing assignments grouped by expert, computed from token ids alone.

  An assignment is a (token, column) pair, numbered column-major: a = column * tokens + token, with
  tokens = batch * length flattened row-major (the order of `hashmoe.routing.Routing` and of
  `hashmoe.experts`). A group is one expert for a single hash or a top-k table, and one
  (slice, expert) pair g = slice * num_experts + expert for MultiHash, whose column m picks the
  expert of weight slice m. Arrays are numpy on the host and jax arrays once they are in a batch.

  Attributes:
    permutation: int32[A] sorted position -> assignment; stable, so a group keeps assignment order.
    inverse_permutation: int32[A] assignment -> sorted position.
    group_sizes: int32[G] assignments per group (G = num_experts, or N * num_experts for MultiHash).
  """
  permutation: Any
  inverse_permutation: Any
  group_sizes: Any


def _routing_columns(tables: RoutingTables) -> tuple[np.ndarray, int, bool]:
  """(int32[H, key_space] expert of each column per key id, num_experts, multihash)."""
  if isinstance(tables, HashTable):
    if tables.table.ndim == 2:  # top-k: k columns over the full expert weights
      return np.ascontiguousarray(tables.table.T), tables.num_experts, False
    tables = (tables,)
  tables = tuple(tables)
  if not tables:
    raise ValueError("tables must hold at least one HashTable")
  for m, table in enumerate(tables):
    if not isinstance(table, HashTable):
      raise TypeError(f"tables[{m}] must be a HashTable, got {type(table).__name__}")
    if table.table.ndim != 1:
      raise ValueError(f"tables[{m}] ({table.kind}) is a top-k table; pass it alone, not inside a "
                       "MultiHash sequence")
    if (table.num_experts, table.vocab_size) != (tables[0].num_experts, tables[0].vocab_size):
      raise ValueError(
          f"MultiHash tables must share num_experts and vocab_size: tables[{m}] has "
          f"({table.num_experts}, {table.vocab_size}), tables[0] has "
          f"({tables[0].num_experts}, {tables[0].vocab_size})")
  return np.stack([t.table for t in tables]), tables[0].num_experts, True


def routing_signature(key: str, tables: RoutingTables) -> str:
  """A name for "route with these tables on this key", shared by every layer that does so.

  Two hash layers with the same signature put every token in the same groups, so one
  `SortedAssignments` per batch serves both. The name covers the key, the layout (MultiHash or
  top-k), the number of experts and a sha256 of the tables' contents.

  Returns:
    e.g. "token:multihash1x64:3f2a9c0d4e5b6a71".
  """
  if key not in KEYS:
    raise ValueError(f"key must be one of {KEYS}, got {key!r}")
  columns, num_experts, multihash = _routing_columns(tables)
  layout = "multihash" if multihash else "topk"
  digest = hashlib.sha256()
  digest.update(f"hashmoe.routing.v1/{key}/{layout}/{num_experts}/{columns.shape}".encode())
  digest.update(np.ascontiguousarray(columns, dtype=np.int32).tobytes())
  return f"{key}:{layout}{columns.shape[0]}x{num_experts}:{digest.hexdigest()[:16]}"


def precompute_routing(tables: RoutingTables, keys: ArrayLike) -> SortedAssignments:
  """Groups a batch's assignments by expert on the host (numpy; run it in the input pipeline).

  Mirrors what `hashmoe.experts` computes with a stable argsort on device: assignment
  a = column * tokens + token goes to group `slice * E + table_column[keys[token]]` (slice = column
  for MultiHash, 0 otherwise), and the permutation sorts assignments by group, stably.

  Args:
    tables: one 1-D HashTable (a hash layer), a sequence of N 1-D HashTables (MultiHash, §3.2) or
      one top-k HashTable.
    keys: int[batch, length] (or int[tokens]) routing keys, from `routing_keys` with the layer's
      key; flattened row-major.

  Returns:
    SortedAssignments of numpy int32 arrays, A = tokens * columns.
  """
  columns, num_experts, multihash = _routing_columns(tables)
  keys = np.asarray(keys)
  check_token_ids(keys, columns.shape[1], name="keys")
  keys = keys.reshape(-1)
  num_columns, tokens = columns.shape[0], keys.size
  experts = columns[:, keys]  # [H, tokens]
  if multihash:
    experts = experts + (np.arange(num_columns, dtype=np.int32) * num_experts)[:, None]
    num_groups = num_columns * num_experts
  else:
    num_groups = num_experts
  group = experts.reshape(-1)  # column-major assignment order
  permutation = np.argsort(group, kind="stable").astype(np.int32)
  inverse = np.empty_like(permutation)
  inverse[permutation] = np.arange(num_columns * tokens, dtype=np.int32)
  sizes = np.bincount(group, minlength=num_groups).astype(np.int32)
  return SortedAssignments(permutation, inverse, sizes)


def precompute_hash_routing(
    layers: Iterable[tuple[str, RoutingTables]], *, token_ids: ArrayLike,
    positions: Optional[ArrayLike] = None, segment_ids: Optional[ArrayLike] = None,
    targets: Optional[ArrayLike] = None, predicted_ids: Optional[ArrayLike] = None,
) -> dict[str, SortedAssignments]:
  """Precomputed routing of one batch for every distinct (key, tables) among a model's hash layers.

  The input pipeline calls this once per batch; the result travels with the batch and reaches each
  hash router through `hashmoe.routing.RouterFeatures.sorted_assignments`, where a router picks
  its entry by `routing_signature`. Layers that share key and tables share one entry.

  Args:
    layers: (key, tables) of each hash layer (repeats are fine).
    token_ids, positions, segment_ids, targets, predicted_ids: the batch's int[batch, length]
      features, as for `routing_keys`.

  Returns:
    {routing_signature(key, tables): SortedAssignments}.
  """
  out: dict[str, SortedAssignments] = {}
  for key, tables in layers:
    name = routing_signature(key, tables)
    if name in out:
      continue
    columns, _, _ = _routing_columns(tables)
    host = lambda a: None if a is None else np.asarray(a)  # noqa: E731  (numpy keys, on the host)
    keys = routing_keys(key, token_ids=host(token_ids), positions=host(positions),
                        segment_ids=host(segment_ids), targets=host(targets),
                        predicted_ids=host(predicted_ids), key_space=columns.shape[1])
    out[name] = precompute_routing(tables, keys)
  return out


# ------------------------------------------------------------------------------------------------
# Row-local routing: what each host computes for its own rows, assembled on device.
#
# A global batch is split over hosts (and devices), so no host can compute the batch's global
# permutation: it knows only its rows. It can compute, per row, where each of the row's assignments
# falls among the row's assignments of the same expert (`row_routing`); the device then adds the
# offsets that depend on the other rows, with cumulative sums over the per-row counts
# (`assemble_sorted_assignments`). The result is `precompute_routing` of the global batch, bit for
# bit, and no sort runs on device.


class RowRouting(NamedTuple):
  """A batch's hash-routing assignments grouped row by row (`assemble_sorted_assignments`'s input).

  Column c of a row is the row's tokens' column-c experts (`Routing.expert_index[:, c]`).

  Attributes:
    ranks: int32[rows, H, length]: ranks[b, c, j] is how many tokens before j in row b have the
      same column-c expert as token j (its place among them, in token order).
    counts: int32[rows, H, E]: counts[b, c, e] is how many tokens of row b have column-c expert e.
  """
  ranks: Any
  counts: Any


# How row routing travels in a batch: two int32 features per router, named by the router's module
# path ("decoder_1/moe/router"), so every host and device can tell whose they are without a
# mapping beside the batch; the model hands them to its routers (`row_routing_from_features`).
ROW_ROUTING_PREFIX = "hash_routing:"


def row_routing_feature_names(path: str) -> tuple[str, str]:
  """The batch features ("hash_routing:<path>:ranks", "...:counts") of router `path`'s row
  routing."""
  if not path or ":" in path:
    raise ValueError(f"router path must be non-empty and free of ':', got {path!r}")
  return f"{ROW_ROUTING_PREFIX}{path}:ranks", f"{ROW_ROUTING_PREFIX}{path}:counts"


def row_routing_from_features(features: Any) -> dict[str, RowRouting]:
  """{router path: RowRouting} of the row-routing features in a batch (a mapping of arrays)."""
  out: dict[str, RowRouting] = {}
  for name in features:
    if not (isinstance(name, str) and name.startswith(ROW_ROUTING_PREFIX)
            and name.endswith(":ranks")):
      continue
    path = name[len(ROW_ROUTING_PREFIX):-len(":ranks")]
    ranks_name, counts_name = row_routing_feature_names(path)
    if counts_name not in features:
      raise ValueError(f"the batch has {ranks_name!r} but not {counts_name!r}; row routing "
                       "travels as both")
    out[path] = RowRouting(features[ranks_name], features[counts_name])
  return out


def row_routing(tables: RoutingTables, keys: ArrayLike) -> RowRouting:
  """Each row's grouping of its assignments by expert, on the host (numpy, vectorised over rows).

  Args:
    tables: as for `precompute_routing`.
    keys: int[rows, length] routing keys (`routing_keys` with the layer's key) of this host's rows.

  Returns:
    RowRouting of numpy int32 arrays; `assemble_sorted_assignments` turns the rows of a whole
    batch into its `SortedAssignments`.
  """
  columns, num_experts, _ = _routing_columns(tables)
  return row_routing_of_columns(columns, num_experts, keys)


def row_routing_of_columns(columns: np.ndarray, num_experts: int, keys: ArrayLike) -> RowRouting:
  """`row_routing` from the tables' columns: int[H, key_space], the column-c expert of each key
  id (a `Routing.expert_index` column)."""
  columns = np.asarray(columns)
  if columns.ndim != 2:
    raise ValueError(f"columns must be int[H, key_space], got shape {columns.shape}")
  keys = np.asarray(keys)
  if keys.ndim != 2:
    raise ValueError(f"keys must be int[rows, length], got shape {keys.shape}")
  check_token_ids(keys, columns.shape[1], name="keys")
  rows, length = keys.shape
  num_columns = columns.shape[0]
  lanes = rows * num_columns  # one lane per (row, column)
  experts = columns[:, keys].transpose(1, 0, 2).reshape(lanes, length).astype(np.int64)
  # A stable sort of each lane by expert puts the lane's tokens of one expert together, in token
  # order; a token's rank is then its sorted place minus its expert's first place.
  order = np.argsort(experts, axis=1, kind="stable")
  counts = np.bincount((np.arange(lanes)[:, None] * num_experts + experts).reshape(-1),
                       minlength=lanes * num_experts).reshape(lanes, num_experts)
  starts = np.cumsum(counts, axis=1) - counts
  sorted_ranks = np.arange(length)[None, :] - np.take_along_axis(
      starts, np.take_along_axis(experts, order, axis=1), axis=1)
  ranks = np.empty((lanes, length), np.int32)
  np.put_along_axis(ranks, order, sorted_ranks.astype(np.int32), axis=1)
  return RowRouting(ranks.reshape(rows, num_columns, length),
                    counts.astype(np.int32).reshape(rows, num_columns, num_experts))


def assemble_sorted_assignments(expert_index: ArrayLike, pieces: RowRouting, *, num_experts: int,
                                multihash: bool) -> SortedAssignments:
  """A whole batch's `SortedAssignments` from its rows' `RowRouting`, with no sort (jnp; jit-able).

  The stable order sorts assignments a = column * tokens + token by group, so within a group they
  come column by column, then row by row, then in token order. An assignment (column c, row b,
  token j) of expert e therefore lands at
    offset of its group (exclusive cumsum of the group sizes)
    + its group's assignments in earlier columns (top-k only: a MultiHash group is one column)
    + column-c assignments of expert e in earlier rows (exclusive cumsum of counts over rows)
    + ranks[b, c, j],
  which is the inverse permutation; the permutation is one scatter of it. Equal to
  `precompute_routing` of the global batch when `pieces` describe `expert_index` (the experts
  check that they do, `hashmoe.experts.sort_matches`, and sort on device otherwise).

  Args:
    expert_index: int[tokens, H] the router's experts, tokens = rows * length flattened row-major.
    pieces: RowRouting of every row of the batch, ranks int[rows, H, length] and counts
      int[rows, H, E].
    num_experts: E.
    multihash: groups are (column, expert) pairs (MultiHash, §3.2), else experts (one hash, top-k).

  Returns:
    SortedAssignments of int32 jax arrays (A = tokens * H; G = H * E for MultiHash, else E).
  """
  ranks = jnp.asarray(pieces.ranks).astype(jnp.int32)
  counts = jnp.asarray(pieces.counts).astype(jnp.int32)
  expert_index = jnp.asarray(expert_index).astype(jnp.int32)
  if ranks.ndim != 3:
    raise ValueError(f"row routing ranks must be int[rows, H, length], got shape {ranks.shape}")
  rows, num_columns, length = ranks.shape
  if counts.shape != (rows, num_columns, num_experts):
    raise ValueError(f"row routing counts must be int[rows, H, E] = "
                     f"{(rows, num_columns, num_experts)} for ranks of shape {ranks.shape} and "
                     f"num_experts={num_experts}, got {counts.shape}")
  if expert_index.shape != (rows * length, num_columns):
    raise ValueError(f"expert_index must be int[tokens, H] = {(rows * length, num_columns)} for "
                     f"row routing of {rows} rows of {length} tokens and H={num_columns}, got "
                     f"{expert_index.shape}")
  per_column = jnp.sum(counts, axis=0)  # [H, E]
  if multihash:
    sizes = per_column.reshape(-1)
    base = (jnp.cumsum(sizes) - sizes).reshape(num_columns, num_experts)
  else:
    sizes = jnp.sum(per_column, axis=0)
    base = (jnp.cumsum(sizes) - sizes)[None, :] + jnp.cumsum(per_column, axis=0) - per_column
  start = base[None] + jnp.cumsum(counts, axis=0) - counts  # [rows, H, E]
  experts = expert_index.reshape(rows, length, num_columns).transpose(0, 2, 1)
  position = jnp.take_along_axis(start, experts, axis=2, mode="clip") + ranks
  inverse = position.transpose(1, 0, 2).reshape(-1)  # column-major assignment order
  num = inverse.shape[0]
  permutation = jnp.zeros((num,), jnp.int32).at[inverse].set(
      jnp.arange(num, dtype=jnp.int32), mode="drop")
  return SortedAssignments(permutation, inverse, sizes.astype(jnp.int32))
