"""Routers: who handles each token.

Every router returns the same small value, `Routing`; the experts never ask which router made it.

One template, many routers (flaxformer's design): `Router.__call__` checks shapes, casts the hidden
states to float32 (router math in float32, Switch Transformer §2.4 "selective precision"), asks the
subclass for its routing instructions and turns them into a `Routing` with the metrics every router
fills (`routing_metrics`). Subclasses implement only `_compute_routing_instructions`:

  HashRouter      expert = table[key(tokens)] (Hash Layers §3, §3.1; MultiHash §3.2). No parameters,
                  no auxiliary loss; the table lives in the non-trainable "hash_tables" collection.
  SwitchRouter    top-1 of softmax(W h) (Fedus et al. 2021), load-balancing loss, optional router
                  z-loss, input jitter and capacity factor; `token_based=True` is the Hash Layers
                  paper's "Switch with token-based routing" (§5.3.3, Table 6).
  BaseRouter      BASE layers (Lewis et al. 2021): balanced linear assignment by an auction during
                  training, greedy argmax at evaluation, combine weight σ(h·w_e).
  HashTopKRouter  hash-selected top-k (DeepSeek-V4's first layers): a fixed table picks k experts
                  per key, a learned gate weighs them (`gate_weights`: softmax over the k selected
                  logits, sigmoid, softplus or sqrt(softplus), optionally renormalised).
  TopKRouter      learned top-k (DeepSeek-V3 §2.1.2): softmax or sigmoid scores, top-k of score +
                  a per-expert bias updated outside the gradient (auxiliary-loss-free balancing;
                  the bias lives in the "router_state" collection), sequence-wise balance loss,
                  z-loss.

Pure functions hold the math: the metrics, losses, gates and bias update in
`hashmoe.router_math` (re-exported here), `expert_capacity` and `capacity_mask` here, and
`balanced_assignment` (the auction) in `hashmoe.assignment`.

Shapes: `tokens = batch * length`, flattened row-major from `RouterFeatures` (the hidden states the
routers receive are already flattened the same way). `H` is the number of columns of a `Routing`
(1, MultiHash's N, or top-k's k); `E` is the number of experts.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from hashmoe import hash_functions
from hashmoe import expert_grouping, hashing
from hashmoe.assignment import balanced_assignment
# The routers' math (metrics, losses, gates, the bias update) lives in hashmoe/router_math.py;
# re-exported here, where callers and tests have always found it.
from hashmoe.router_math import (  # noqa: F401
    HASH_TOPK_GATES, SWITCH_COMBINES, TOPK_SCORES, expert_bias_update, gate_weights,
    load_balancing_loss, router_z_loss, routing_metrics, sequence_balance_loss,
    switch_combine_weight)

Array = jax.Array
Initializer = Callable[..., Array]

# The non-parameter collection of router state that training updates outside the gradient (the
# learned top-k router's per-expert selection bias). Saved with the checkpoint like "hash_tables".
ROUTER_STATE = "router_state"

# Loss coefficients given to the routers at run time, {name: float32 scalar} (a traced argument of
# the step), or None: `runtime_loss_coefficients`.
_RUNTIME_COEFFICIENTS: contextvars.ContextVar[Optional[Mapping[str, Any]]] = (
    contextvars.ContextVar("hashmoe_runtime_loss_coefficients", default=None))


@contextlib.contextmanager
def runtime_loss_coefficients(values: Optional[Mapping[str, Any]]) -> Iterator[None]:
  """Within the block (while a step is traced), routers read the loss coefficients named in
  `values` ({"balance_coef": x}) from there instead of from their attributes. With `x` an argument
  of the jitted step, the coefficient is an input of the compiled program, not a constant in it:
  one program serves every value, so a sweep over Switch's coefficient compiles once. The product
  is the same float32 multiply either way (hashmoe.training.trainer passes them; tested bit-equal
  to the constant in tests/test_runtime_coefficients.py)."""
  token = _RUNTIME_COEFFICIENTS.set(None if values is None else dict(values))
  try:
    yield
  finally:
    _RUNTIME_COEFFICIENTS.reset(token)


def loss_coefficient(name: str, default: float) -> Any:
  """The loss coefficient `name`: the run-time value `runtime_loss_coefficients` gives, else
  `default` (the router's attribute)."""
  values = _RUNTIME_COEFFICIENTS.get()
  if values is not None and name in values:
    return values[name]
  return default
EXPERT_BIAS = "expert_bias"


@flax.struct.dataclass
class RouterFeatures:
  """Per-token integer features a router may key on (all `int32[batch, length]`).

  `targets` (the next token) is only for the oracle-future hash; `predicted_ids` is a frozen dense
  baseline's argmax prediction of the next token (predicted-future hash). `segment_ids` marks packed
  sequences (0 = padding) so that previous-token/bigram keys never cross a sequence boundary.

  `sorted_assignments` optionally carries hash routing precomputed by the input pipeline
  (`expert_grouping.precompute_hash_routing`): {`expert_grouping.routing_signature(key, tables)`:
  `expert_grouping.SortedAssignments`}. A hash router whose signature is present hands its entry on
  in `Routing.sorted_assignments`, and the experts use it instead of sorting on device.

  `row_routing` is the same precomputation done row by row, the way a batch sharded over hosts
  can do it (`hashmoe.host_routing`): {router module path ("decoder_1/moe/router"):
  `expert_grouping.RowRouting`}. A hash router finds its entry by its own path, assembles the
  batch's `SortedAssignments` from it with cumulative sums and one scatter
  (`expert_grouping.assemble_sorted_assignments`) and hands that on, as above.

  `valid` (bool[batch, length]) marks real tokens; padding is still routed (shapes are static) but
  left out of the routing metrics (expert load, dropped fraction, entropy), which would otherwise
  report the padding id's expert as loaded, and of Switch's auxiliary losses
  (`SwitchRouter.exclude_padding`). None counts every position.

  `previous_token_ids` (int32[batch]) is the token before column 0 of each row, for rows that
  continue a sequence begun earlier: a cached decoding step sees one token and the model's cache
  keeps the one before it, which previous-token and bigram keys need
  (`hashing.routing_keys(previous_ids=...)`). None: column 0 starts a sequence.
  """
  token_ids: jax.Array
  positions: Optional[jax.Array] = None
  segment_ids: Optional[jax.Array] = None
  targets: Optional[jax.Array] = None
  predicted_ids: Optional[jax.Array] = None
  sorted_assignments: Optional[Mapping[str, expert_grouping.SortedAssignments]] = None
  valid: Optional[jax.Array] = None
  row_routing: Optional[Mapping[str, expert_grouping.RowRouting]] = None
  previous_token_ids: Optional[jax.Array] = None


@flax.struct.dataclass
class Routing:
  """Where each token goes and with what weight.

  Attributes:
    expert_index: int32[tokens, num_hashes]; num_hashes is 1 except for MultiHash (one column per
      slice) and hash-selected top-k (one column per selected expert).
    combine_weight: float32[tokens, num_hashes]; 1.0 for hash routing, the router probability for
      Switch (or a variant, `switch_combine_weight`), 0.0 for a token dropped by a capacity limit
      (it then passes through the residual).
    aux_loss: float32[]; the auxiliary loss to add to the objective (0 for hash routing).
    metrics: dict of float32 arrays explaining the routing (per-expert load, dropped fraction, ...).
    sorted_assignments: optional `expert_grouping.SortedAssignments` of these assignments,
      precomputed from token ids by the input pipeline (hash routers only; see `RouterFeatures`).
      The experts check it against `expert_index` and use it instead of an argsort; None means
      sort on device.
  """
  expert_index: jax.Array
  combine_weight: jax.Array
  aux_loss: jax.Array
  metrics: dict[str, Any]
  sorted_assignments: Optional[expert_grouping.SortedAssignments] = None


# --------------------------------------------------------------------------------------------------
# What a router subclass hands to the template.


@dataclasses.dataclass(frozen=True)
class RoutingInstructions:
  """What `Router._compute_routing_instructions` returns; `Router.__call__` makes the `Routing`.

  Attributes:
    expert_index: int32[tokens, H] chosen experts.
    combine_weight: float32[tokens, H]; 0.0 where `kept` is False.
    kept: bool[tokens, H] assignments that survive the router's capacity limit, or None when the
      router never drops (then every assignment is kept, whatever its weight).
    router_probs: float32[tokens, E] a probability distribution over experts per token, for the
      entropy/confidence metrics; None for routers without one (hash, BASE).
    aux_losses: name -> float32[] already-weighted loss terms; their sum is `Routing.aux_loss`.
    metrics: router-specific float32 metrics added to the standard ones.
    sorted_assignments: precomputed grouping of the assignments (hash routers), passed on to
      `Routing.sorted_assignments`.
  """
  expert_index: Array
  combine_weight: Array
  kept: Optional[Array] = None
  router_probs: Optional[Array] = None
  aux_losses: dict[str, Array] = dataclasses.field(default_factory=dict)
  metrics: dict[str, Array] = dataclasses.field(default_factory=dict)
  sorted_assignments: Optional[expert_grouping.SortedAssignments] = None


# --------------------------------------------------------------------------------------------------
# Pure routing math.


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
  """Assignments one expert may take: ceil(capacity_factor · tokens / E), at least 1.

  Switch Transformer §2.2: expert capacity = (tokens per batch / number of experts) × capacity
  factor. The same arithmetic as `hashmoe.experts.expert_capacity` for one column, so a router and a
  capacity dispatch given the same factor drop the same tokens.
  """
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
  return max(1, math.ceil(capacity_factor * num_tokens / num_experts))


def capacity_mask(expert_index: Array, num_experts: int, capacity: int) -> Array:
  """bool[tokens]: whether each token fits in its expert's capacity, earlier tokens first.

  GShard's (Lepikhin et al. 2020) priority: a token's place in its expert's queue is 1 + the number
  of tokens before it (in flattened token order) sent to the same expert; places beyond `capacity`
  are dropped. Dropped tokens skip the expert and reach the next layer through the residual.

  Args:
    expert_index: int[tokens] top-1 expert of each token.
    num_experts: E.
    capacity: assignments each expert takes.
  """
  dispatch = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)
  place = jnp.sum(jnp.cumsum(dispatch, axis=0) * dispatch, axis=-1)  # 1-based place in the queue
  return place <= capacity


# --------------------------------------------------------------------------------------------------
# The template.


def _check_expert_range(name: str, table: np.ndarray, num_experts: int) -> None:
  if table.size and (int(table.min()) < 0 or int(table.max()) >= num_experts):
    raise ValueError(f"{name} holds experts in [{int(table.min())}, {int(table.max())}], outside "
                     f"[0, num_experts={num_experts})")


def check_key_ids(keys: Array, key_space: int, key: str) -> None:
  """Raises ValueError if concrete routing keys fall outside [0, key_space).

  A JAX gather clamps an out-of-range index silently, so a bad key would route its token to some
  expert without complaint. Under tracing (jit) the values are unknown and this is a no-op.

  Args:
    keys: int[...] routing keys (from `hashing.routing_keys`).
    key_space: rows of the hash table.
    key: the key's name, for the message.
  """
  hashing.check_token_ids(keys, key_space, f"routing keys for key {key!r} (the table's key space)")


class Router(nn.Module):
  """Template of every router: shared checks, float32 router math and metrics.

  Subclasses implement `_compute_routing_instructions` and nothing else. Parameters they create
  carry logical axis names (`nn.with_logical_partitioning`); router weights are tiny and replicated
  ("embed", "unmodeled").

  Attributes:
    num_experts: E.
  """
  num_experts: int

  def __post_init__(self):
    if not isinstance(self.num_experts, (int, np.integer)) or self.num_experts < 1:
      raise ValueError(f"{type(self).__name__}: num_experts must be a positive int, got "
                       f"{self.num_experts!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, hidden: Array, features: RouterFeatures, *, deterministic: bool) -> Routing:
    """Routes tokens.

    Args:
      hidden: float[tokens, d_model] hidden states, flattened row-major from [batch, length].
      features: per-token integer features, each int32[batch, length] with batch * length = tokens.
      deterministic: True at evaluation: no jitter noise, and BASE routes greedily.

    Returns:
      Routing with expert_index int32[tokens, H], combine_weight float32[tokens, H], aux_loss
      float32[] and metrics (see `routing_metrics`, plus the router's own).
    """
    if hidden.ndim != 2:
      raise ValueError(f"{type(self).__name__}: hidden must be [tokens, d_model] (flattened), got "
                       f"shape {hidden.shape}")
    if features.token_ids.ndim != 2:
      raise ValueError(f"{type(self).__name__}: features.token_ids must be [batch, length], got "
                       f"shape {features.token_ids.shape}")
    batch, length = features.token_ids.shape
    if hidden.shape[0] != batch * length:
      raise ValueError(
          f"{type(self).__name__}: hidden has {hidden.shape[0]} tokens but features.token_ids is "
          f"[{batch}, {length}] = {batch * length} tokens")
    # Switch §2.4 (selective precision): the router's softmax/exponentials are unstable in bfloat16.
    with jax.named_scope("router"):
      instructions = self._compute_routing_instructions(
          hidden.astype(jnp.float32), features, deterministic=deterministic)
    expert_index = instructions.expert_index.astype(jnp.int32)
    combine_weight = instructions.combine_weight.astype(jnp.float32)
    kept = instructions.kept
    if kept is None:
      kept = jnp.ones(expert_index.shape, bool)
    metrics = routing_metrics(expert_index, combine_weight, self.num_experts,
                              instructions.router_probs, kept=kept,
                              token_mask=None if features.valid is None else
                              features.valid.reshape(-1))
    metrics.update({k: jnp.asarray(v, jnp.float32) for k, v in instructions.metrics.items()})
    aux_loss = jnp.zeros((), jnp.float32)
    for term in instructions.aux_losses.values():
      aux_loss = aux_loss + jnp.asarray(term, jnp.float32)
    return Routing(expert_index=expert_index, combine_weight=combine_weight, aux_loss=aux_loss,
                   metrics=metrics, sorted_assignments=instructions.sorted_assignments)

  def _compute_routing_instructions(self, hidden: Array, features: RouterFeatures, *,
                                    deterministic: bool) -> RoutingInstructions:
    """hidden: float32[tokens, d_model]; features as in `__call__`."""
    raise NotImplementedError(f"{type(self).__name__} must implement "
                              "_compute_routing_instructions")


# --------------------------------------------------------------------------------------------------
# Hash routing.


def _keys(key: str, features: RouterFeatures, key_space: int) -> Array:
  """int32[tokens] routing keys, flattened row-major and range-checked when concrete."""
  # Features closed over by a jitted function are concrete, but jnp ops on them inside the trace
  # would give tracers (and break the host-side range checks); evaluate them eagerly instead.
  # Traced features are staged as usual.
  with jax.ensure_compile_time_eval():
    keys = hashing.routing_keys(
        key, token_ids=features.token_ids, positions=features.positions,
        segment_ids=features.segment_ids, targets=features.targets,
        predicted_ids=features.predicted_ids, key_space=key_space,
        previous_ids=features.previous_token_ids)
    keys = jnp.asarray(keys, jnp.int32).reshape(-1)
  check_key_ids(keys, key_space, key)
  return keys


def _precomputed(router: "Router", features: RouterFeatures, expert_index: Array, *,
                 multihash: bool) -> Optional[expert_grouping.SortedAssignments]:
  """The batch's precomputed grouping of this router's assignments, if it carries one: whole
  (`sorted_assignments`, by the router's `routing_signature`) or row by row (`row_routing`, by
  the router's module path; assembled here from `expert_index`, int32[tokens, H])."""
  if features.sorted_assignments:
    found = features.sorted_assignments.get(router.routing_signature())
    if found is not None:
      return found
  if not features.row_routing:
    return None
  pieces = features.row_routing.get("/".join(router.path))
  if pieces is None:
    return None
  return expert_grouping.assemble_sorted_assignments(expert_index, pieces,
                                                     num_experts=router.num_experts,
                                                     multihash=multihash)


def _check_key(router: str, key: str) -> None:
  if key not in hashing.KEYS:
    raise ValueError(f"{router}: key must be one of {hashing.KEYS}, got {key!r}")


def _resolve_key_space(router: str, key_space: Optional[int], table_vocab: Optional[int]) -> int:
  """The key space: from the tables if given (and then equal to `key_space` if that is set too)."""
  if table_vocab is not None:
    if key_space is not None and int(key_space) != table_vocab:
      raise ValueError(f"{router}: key_space={key_space} but the hash table(s) cover vocab_size="
                       f"{table_vocab} key ids; they must match")
    return table_vocab
  if key_space is None:
    raise ValueError(f"{router}: without tables, key_space (rows of the random table; see "
                     "hashing.key_space_size) is required")
  if not isinstance(key_space, (int, np.integer)) or key_space < 1:
    raise ValueError(f"{router}: key_space must be a positive int, got {key_space!r}")
  return int(key_space)


class HashRouter(Router):
  """Hash layer routing (Roller et al. 2021, §3): expert = table[key(x)], no parameters.

  `h_t = FFN_{hash(x_t)}(h_t)` (eq. 4): the expert of a token is a fixed function of its input token
  (or of another key of §3.1: previous token, bigram, position, oracle/predicted next token), looked
  up in a precomputed table. With num_hashes = N > 1 this is MultiHash (§3.2): column m of
  expert_index is hash m's expert, k_m = hash_m(x), and the experts use it to pick segment m.

  The tables are data: they live in the non-trainable "hash_tables" collection (variable "table",
  int32[num_hashes, key_space]) so that they are saved and restored with the checkpoint. They are
  initialised from `tables` (built offline with `hash_functions.build_table`/`build_multihash` from
  corpus statistics), or, when `tables` is None, as random tables from `seed`
  (`hash_functions.build_multihash("random", ...)`), so a model can be initialised without corpus
  statistics. Routing is a static gather: combine weight 1.0, aux_loss 0.

  Attributes:
    num_experts: E.
    key: which feature to hash, one of `hashing.KEYS`.
    num_hashes: N (MultiHash); 1 is the plain hash layer.
    key_space: rows of each table (`hashing.key_space_size`); taken from `tables` when None.
    tables: tuple of num_hashes 1-D `hashing.HashTable`s, or None for random tables.
    seed: seed of the random tables (table m uses seed + m).
  """
  key: str = "token"
  num_hashes: int = 1
  key_space: Optional[int] = None
  tables: Optional[Sequence[hashing.HashTable]] = None
  seed: int = 0

  def __post_init__(self):
    name = type(self).__name__
    _check_key(name, self.key)
    if not isinstance(self.num_hashes, (int, np.integer)) or self.num_hashes < 1:
      raise ValueError(f"{name}: num_hashes must be a positive int, got {self.num_hashes!r}")
    table_vocab = None
    if self.tables is not None:
      tables = self.tables
      if isinstance(tables, hashing.HashTable):
        raise TypeError(f"{name}: tables must be a tuple of {self.num_hashes} HashTable(s), got a "
                        "single HashTable; pass (table,)")
      tables = tuple(tables)
      if len(tables) != self.num_hashes:
        raise ValueError(f"{name}: num_hashes={self.num_hashes} needs {self.num_hashes} tables, "
                         f"got {len(tables)}")
      for m, table in enumerate(tables):
        if not isinstance(table, hashing.HashTable):
          raise TypeError(f"{name}: tables[{m}] must be a hashing.HashTable, got "
                          f"{type(table).__name__}")
        if table.table.ndim != 1:
          raise ValueError(f"{name}: tables[{m}] ({table.kind}) maps each key to {table.k} "
                           "experts; HashRouter needs one expert per key (HashTopKRouter takes "
                           "top-k tables)")
        if table.num_experts != self.num_experts:
          raise ValueError(f"{name}: tables[{m}] was built for num_experts={table.num_experts}, "
                           f"but the router has num_experts={self.num_experts}")
        if table.vocab_size != tables[0].vocab_size:
          raise ValueError(f"{name}: tables[{m}] covers vocab_size={table.vocab_size} but "
                           f"tables[0] covers {tables[0].vocab_size}; all hashes share one key "
                           "space")
      table_vocab = tables[0].vocab_size
      object.__setattr__(self, "tables", tables)
    object.__setattr__(self, "key_space", _resolve_key_space(name, self.key_space, table_vocab))
    super().__post_init__()

  def _initial_table(self) -> Array:
    if self.tables is not None:
      stacked = np.stack([t.table for t in self.tables])
    else:
      stacked = np.stack([t.table for t in hash_functions.build_multihash(
          "random", self.num_hashes, num_experts=self.num_experts, vocab_size=self.key_space,
          seed=self.seed)])
    _check_expert_range("hash table", stacked, self.num_experts)
    return jnp.asarray(stacked, jnp.int32)

  def _host_tables(self) -> tuple[hashing.HashTable, ...]:
    """The tables this router is built with (the random ones when `tables` is None)."""
    if self.tables is not None:
      return tuple(self.tables)
    return hash_functions.build_multihash("random", self.num_hashes, num_experts=self.num_experts,
                                   vocab_size=self.key_space, seed=self.seed)

  def routing_signature(self) -> str:
    """`expert_grouping.routing_signature` of this router's key and tables: the name under which the
    input pipeline's precomputed routing for this layer travels in
    `RouterFeatures.sorted_assignments`.

    Computed from the tables the router was built with; if the stored "hash_tables" variable was
    replaced (e.g. restored from another checkpoint), the experts' check of the precomputed
    permutation against the actual expert_index catches the mismatch and sorts on device.
    """
    return expert_grouping.routing_signature(self.key, self._host_tables())

  def _compute_routing_instructions(self, hidden: Array, features: RouterFeatures, *,
                                    deterministic: bool) -> RoutingInstructions:
    del hidden, deterministic  # the route depends on the token ids alone
    table = self.variable("hash_tables", "table", self._initial_table).value
    expected = (self.num_hashes, self.key_space)
    if tuple(table.shape) != expected:
      raise ValueError(f"{type(self).__name__}: stored hash_tables/table has shape "
                       f"{tuple(table.shape)}, expected [num_hashes, key_space] = {expected}")
    keys = _keys(self.key, features, self.key_space)
    # mode="clip" makes the out-of-range behaviour explicit; concrete keys were checked above.
    expert_index = jnp.take(table, keys, axis=1, mode="clip").T  # [tokens, num_hashes]
    return RoutingInstructions(expert_index=expert_index,
                               combine_weight=jnp.ones(expert_index.shape, jnp.float32),
                               sorted_assignments=_precomputed(self, features, expert_index,
                                                               multihash=self.num_hashes > 1))


class HashTopKRouter(Router):
  """Hash-selected top-k with a learned gate (the hash-routed first layers of DeepSeek-V4).

  A fixed table (`hash_functions.build_topk_table`: k distinct experts per key, greedily balanced on
  token frequency) picks the experts; a learned gate decides how much each contributes:
  combine_weight[t] = `gate_weights((h_t W_gate)[selected], gate, normalize, route_scale)`, in
  float32: by default a softmax over the k selected experts' logits; sigmoid, softplus or
  sqrt(softplus) per expert, optionally renormalised to sum to 1, as configured.
  Which experts run never depends on the hidden state, so the dispatch keeps every property of hash
  routing (no capacity, nothing dropped, no balance loss); only the mixture weights are learned.

  The table lives in the "hash_tables" collection (variable "table", int32[key_space, k]); with
  `table=None` it is a random table of k distinct experts per key from `seed`.

  Attributes:
    num_experts: E.
    k: experts per token.
    key: which feature to hash, one of `hashing.KEYS`.
    key_space: rows of the table; taken from `table` when None.
    table: a `hashing.HashTable` of kind `hashing.TOPK_KIND` with k columns, or None.
    seed: seed of the random table.
    gate: how the selected logits become weights, one of `HASH_TOPK_GATES`.
    normalize: renormalise the k weights to sum to 1 (a no-op for "softmax").
    route_scale: a constant factor on the weights.
    kernel_init: initialiser of W_gate float32[d_model, E].
  """
  k: int
  key: str = "token"
  key_space: Optional[int] = None
  table: Optional[hashing.HashTable] = None
  seed: int = 0
  gate: str = "softmax"
  normalize: bool = False
  route_scale: float = 1.0
  kernel_init: Initializer = nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")

  def __post_init__(self):
    name = type(self).__name__
    _check_key(name, self.key)
    if not isinstance(self.k, (int, np.integer)) or not 1 <= self.k <= self.num_experts:
      raise ValueError(f"{name}: k must be an int in [1, num_experts={self.num_experts}], got "
                       f"{self.k!r}")
    table_vocab = None
    if self.table is not None:
      table = self.table
      if not isinstance(table, hashing.HashTable):
        raise TypeError(f"{name}: table must be a hashing.HashTable, got {type(table).__name__}")
      if table.table.ndim != 2 or table.k != self.k:
        raise ValueError(f"{name}: table ({table.kind}) has shape {table.table.shape}; expected a "
                         f"top-k table [vocab_size, k={self.k}] from "
                         "hash_functions.build_topk_table")
      if table.num_experts != self.num_experts:
        raise ValueError(f"{name}: table was built for num_experts={table.num_experts}, but the "
                         f"router has num_experts={self.num_experts}")
      table_vocab = table.vocab_size
    if self.gate not in HASH_TOPK_GATES:
      raise ValueError(f"{name}: gate must be one of {HASH_TOPK_GATES}, got {self.gate!r}")
    if not self.route_scale > 0:
      raise ValueError(f"{name}: route_scale must be > 0, got {self.route_scale!r}")
    object.__setattr__(self, "key_space", _resolve_key_space(name, self.key_space, table_vocab))
    super().__post_init__()

  def _host_table(self) -> np.ndarray:
    if self.table is not None:
      table = self.table.table
    else:
      # k distinct experts per key: the first k of a random permutation of the experts.
      rng = np.random.default_rng(self.seed)
      table = np.argsort(rng.random((self.key_space, self.num_experts)), axis=-1)[:, :self.k]
    _check_expert_range("top-k hash table", table, self.num_experts)
    return table

  def _initial_table(self) -> Array:
    return jnp.asarray(self._host_table(), jnp.int32)

  def routing_signature(self) -> str:
    """`expert_grouping.routing_signature` of this router's key and table (see `HashRouter`)."""
    table = self.table
    if table is None:
      table = hashing.HashTable(kind=hashing.TOPK_KIND, table=self._host_table(),
                                num_experts=self.num_experts, vocab_size=self.key_space,
                                seed=self.seed)
    return expert_grouping.routing_signature(self.key, table)

  def _compute_routing_instructions(self, hidden: Array, features: RouterFeatures, *,
                                    deterministic: bool) -> RoutingInstructions:
    del deterministic
    table = self.variable("hash_tables", "table", self._initial_table).value
    expected = (self.key_space, self.k)
    if tuple(table.shape) != expected:
      raise ValueError(f"{type(self).__name__}: stored hash_tables/table has shape "
                       f"{tuple(table.shape)}, expected [key_space, k] = {expected}")
    keys = _keys(self.key, features, self.key_space)
    expert_index = jnp.take(table, keys, axis=0, mode="clip")  # [tokens, k]
    w_gate = self.param("gate_kernel",
                        nn.with_logical_partitioning(self.kernel_init, ("embed", "unmodeled")),
                        (hidden.shape[-1], self.num_experts), jnp.float32)
    logits = hidden @ w_gate.astype(jnp.float32)  # [tokens, E]
    selected = jnp.take_along_axis(logits, expert_index, axis=-1)  # [tokens, k]
    combine_weight = gate_weights(selected, self.gate, normalize=self.normalize,
                                  scale=self.route_scale)
    # The gate's distribution lives on the k selected experts; scatter it to [tokens, E] so the
    # entropy/confidence metrics read the same way as Switch's.
    share = combine_weight / jnp.sum(combine_weight, axis=-1, keepdims=True)
    dense = jnp.zeros(logits.shape, jnp.float32).at[
        jnp.arange(logits.shape[0])[:, None], expert_index].set(share)
    return RoutingInstructions(expert_index=expert_index, combine_weight=combine_weight,
                               router_probs=dense,
                               sorted_assignments=_precomputed(self, features, expert_index,
                                                               multihash=False))


# --------------------------------------------------------------------------------------------------
# Learned routing baselines.


class SwitchRouter(Router):
  """Switch Transformer routing (Fedus et al. 2021): top-1 of softmax(W x), x = h or a token vector.

  p(x) = softmax(x W) over E experts, in float32 (§2.4 selective precision); each token goes to
  argmax p(x) with combine weight p_{argmax}(x), so the router learns through the weight (§2.1).
  Options, as in the Switch/ST-MoE codebases:
    * load-balancing loss `balance_coef · load_balancing_loss` (equations (4) - (6));
    * router z-loss `z_loss_coef · router_z_loss` (ST-MoE, Zoph et al. 2022);
    * multiplicative jitter on the router input during training, x · U[1 - jitter, 1 + jitter]
      (drawn from the "jitter" rng stream, needed only when jitter > 0 and not deterministic);
    * capacity factor: each expert takes `expert_capacity(tokens, E, capacity_factor)` tokens in
      token order (GShard); the rest get combine weight 0 and skip the expert via the residual.
      Applied in training and evaluation alike;
    * the combine weight: p (the default, faithful to the paper), E·p or straight-through 1
      (`switch_combine_weight`, which says where each comes from and why);
    * padding left out of both auxiliary losses (`exclude_padding`, on by default): their means
      run over the real tokens (`RouterFeatures.valid`), as flaxformer's router losses can.
  `token_based=True` is the Hash Layers paper's "Switch with token-based routing" (§5.3.3, Table 6):
  the router input x is a separate learned embedding of the current token id (vocab_size ×
  router_embed_dim, used by the router only) instead of the hidden state.

  The kernel is initialised from a truncated normal of variance 0.1 / fan_in (§2.4, "smaller
  parameter initialization").

  Metrics, besides the standard ones: `balance_loss` and `router_z_loss` (both *unweighted*, so they
  stay readable when a coefficient is 0; balance_loss is 1 under perfect balance; over the tokens
  the losses count), and `router_entropy`/`router_confidence` of p(x).

  Attributes:
    num_experts: E.
    balance_coef: α of the load-balancing loss (the paper tunes it; 0.01 is Switch's default).
    z_loss_coef: coefficient of the router z-loss (ST-MoE uses 1e-3); 0 disables it.
    jitter: ε of the multiplicative input jitter; 0 disables it.
    capacity_factor: None for no capacity limit (dropless).
    combine: the combine weight, one of `SWITCH_COMBINES` ("prob": p, Fedus et al. 2021).
    exclude_padding: average the load-balancing and z-losses over the real tokens only
      (`features.valid`); False averages over every position, padding included (this library's
      behaviour before the option existed).
    token_based: route on a learned token embedding instead of the hidden state.
    vocab_size: number of token ids (required with token_based).
    router_embed_dim: width of the token embedding; None uses d_model.
    kernel_init: initialiser of W float32[router input dim, E].
    embedding_init: initialiser of the token embedding.
  """
  balance_coef: float = 0.01
  z_loss_coef: float = 0.0
  jitter: float = 0.0
  capacity_factor: Optional[float] = None
  combine: str = "prob"
  exclude_padding: bool = True
  token_based: bool = False
  vocab_size: Optional[int] = None
  router_embed_dim: Optional[int] = None
  kernel_init: Initializer = nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
  embedding_init: Initializer = nn.initializers.normal(stddev=1.0)

  def __post_init__(self):
    name = type(self).__name__
    if self.balance_coef < 0 or self.z_loss_coef < 0:
      raise ValueError(f"{name}: balance_coef and z_loss_coef must be >= 0, got "
                       f"{self.balance_coef} and {self.z_loss_coef}")
    if not 0 <= self.jitter < 1:
      raise ValueError(f"{name}: jitter must be in [0, 1), got {self.jitter}")
    if self.capacity_factor is not None and not self.capacity_factor > 0:
      raise ValueError(f"{name}: capacity_factor must be > 0 or None, got {self.capacity_factor}")
    if self.combine not in SWITCH_COMBINES:
      raise ValueError(f"{name}: combine must be one of {SWITCH_COMBINES}, got {self.combine!r}")
    if self.token_based and (self.vocab_size is None or self.vocab_size < 1):
      raise ValueError(f"{name}: token_based routing needs vocab_size (the token embedding's "
                       f"rows), got {self.vocab_size!r}")
    if self.router_embed_dim is not None and self.router_embed_dim < 1:
      raise ValueError(f"{name}: router_embed_dim must be positive, got {self.router_embed_dim}")
    super().__post_init__()

  def _compute_routing_instructions(self, hidden: Array, features: RouterFeatures, *,
                                    deterministic: bool) -> RoutingInstructions:
    tokens = hidden.shape[0]
    if self.token_based:
      hashing.check_token_ids(features.token_ids, self.vocab_size,
                              "token_ids (the token-based router's embedding vocabulary)")
      token_ids = jnp.asarray(features.token_ids, jnp.int32).reshape(-1)
      dim = self.router_embed_dim or hidden.shape[-1]
      table = self.param("token_embedding",
                         nn.with_logical_partitioning(self.embedding_init, ("vocab", "unmodeled")),
                         (self.vocab_size, dim), jnp.float32)
      router_input = jnp.take(table, token_ids, axis=0, mode="clip").astype(jnp.float32)
    else:
      router_input = hidden
    if self.jitter > 0 and not deterministic:
      noise = jax.random.uniform(self.make_rng("jitter"), router_input.shape, jnp.float32,
                                 1.0 - self.jitter, 1.0 + self.jitter)
      router_input = router_input * noise
    kernel = self.param("kernel",
                        nn.with_logical_partitioning(self.kernel_init, ("embed", "unmodeled")),
                        (router_input.shape[-1], self.num_experts), jnp.float32)
    logits = router_input @ kernel.astype(jnp.float32)  # [tokens, E]
    probs = jax.nn.softmax(logits, axis=-1)
    expert = jnp.argmax(probs, axis=-1).astype(jnp.int32)  # [tokens]
    gate = jnp.take_along_axis(probs, expert[:, None], axis=-1)  # [tokens, 1]
    counted = None
    if self.exclude_padding and features.valid is not None:
      counted = features.valid.reshape(-1)
    balance = load_balancing_loss(probs, expert, counted)
    z_loss = router_z_loss(logits, counted)
    if self.capacity_factor is None:
      kept = jnp.ones((tokens, 1), bool)
    else:
      capacity = expert_capacity(tokens, self.num_experts, self.capacity_factor)
      kept = capacity_mask(expert, self.num_experts, capacity)[:, None]
    aux_losses = {"balance_loss": loss_coefficient("balance_coef", self.balance_coef) * balance}
    if self.z_loss_coef:
      aux_losses["router_z_loss"] = self.z_loss_coef * z_loss
    return RoutingInstructions(
        expert_index=expert[:, None],
        combine_weight=jnp.where(kept, switch_combine_weight(gate, self.combine, self.num_experts),
                                 0.0),
        kept=kept, router_probs=probs, aux_losses=aux_losses,
        metrics={"balance_loss": balance, "router_z_loss": z_loss})


class BaseRouter(Router):
  """BASE layers (Lewis et al. 2021): routing as a balanced linear assignment.

  Each expert e has a learned embedding w_e; a token's affinity to e is h·w_e. During training
  (deterministic=False) tokens are assigned to maximise the total affinity Σ_t h_t·w_{a(t)} with
  every expert receiving exactly tokens / E of them — `balanced_assignment`, an auction whose result
  is within tokens·ε of the optimal total (see there); so no load-balancing loss is needed and no
  token is dropped. At evaluation each token goes greedily to argmax_e h·w_e.

  The expert's output is mixed in as h + σ(h·w_e) f_e(h): combine weight σ(h·w_{a(t)}). The
  assignment itself is not differentiable (computed on stop_gradient scores); the expert
  embeddings and the hidden state learn through the combine weight.

  BASE additionally shuffles tokens across workers before routing (an extra all-to-all) so that
  each worker's batch is not correlated; that belongs to the dispatch, not here.

  Metrics, besides the standard ones: `auction_rounds` (bidding rounds this step) and
  `auction_unassigned_fraction` (tokens the auction left for the greedy fallback; 0 normally),
  both 0 at evaluation.

  Attributes:
    num_experts: E.
    relative_epsilon, epsilon_scaling, max_auction_rounds: see `balanced_assignment`.
    embedding_init: initialiser of the expert embeddings float32[E, d_model] (orthogonal, small, as
      in the fairseq BASE implementation's expert centroids).
  """
  relative_epsilon: float = 1e-3
  epsilon_scaling: float = 4.0
  max_auction_rounds: int = 1000
  embedding_init: Initializer = nn.initializers.orthogonal(scale=0.1)

  def _compute_routing_instructions(self, hidden: Array, features: RouterFeatures, *,
                                    deterministic: bool) -> RoutingInstructions:
    del features
    tokens = hidden.shape[0]
    expert_embedding = self.param(
        "expert_embedding",
        nn.with_logical_partitioning(self.embedding_init, ("unmodeled", "embed")),
        (self.num_experts, hidden.shape[-1]), jnp.float32)
    scores = hidden @ expert_embedding.astype(jnp.float32).T  # [tokens, E]
    if deterministic:
      expert = jnp.argmax(scores, axis=-1).astype(jnp.int32)
      rounds = jnp.zeros((), jnp.float32)
      unassigned = jnp.zeros((), jnp.float32)
    else:
      if tokens % self.num_experts:
        raise ValueError(
            f"{type(self).__name__}: BASE's balanced assignment gives each of num_experts="
            f"{self.num_experts} experts exactly tokens / num_experts tokens, but tokens = batch * "
            f"length = {tokens} is not divisible by {self.num_experts}")
      result = balanced_assignment(
          lax.stop_gradient(scores), relative_epsilon=self.relative_epsilon,
          epsilon_scaling=self.epsilon_scaling, max_rounds=self.max_auction_rounds)
      expert = result.assignment
      rounds = result.rounds.astype(jnp.float32)
      unassigned = result.unassigned_fraction
    chosen = jnp.take_along_axis(scores, expert[:, None], axis=-1)  # [tokens, 1], differentiable
    return RoutingInstructions(
        expert_index=expert[:, None], combine_weight=jax.nn.sigmoid(chosen),
        metrics={"auction_rounds": rounds, "auction_unassigned_fraction": unassigned})


class TopKRouter(Router):
  """Learned top-k routing as DeepSeek-V3 (arXiv:2412.19437, §2.1.2) does it.

  s_t = score(h_t W) over E experts in float32, score a softmax (DeepSeek-V2) or an elementwise
  sigmoid (DeepSeek-V3, eq. 15); token t goes to the k experts of largest s_i,t + b_i, where b is
  a per-expert bias used for the selection only (eq. 16); their combine weights are the scores
  s_i,t themselves (no bias), optionally renormalised over the k (eq. 13, `normalize`) and
  multiplied by `route_scale`. The router learns through the weights; the selection has no
  gradient.

  Auxiliary-loss-free balancing: b lives in the non-parameter collection `ROUTER_STATE`
  ("router_state", variable "expert_bias" float32[E], zeros at init), replicated, saved in
  checkpoints. A training call (deterministic=False) with that collection mutable writes the
  next step's bias, `expert_bias_update(b, load, bias_update_rate)`, from this batch's
  assignments per expert over its real tokens; the selection of this call used the bias as it
  was. The trainer applies with the collection mutable and stores what comes back after the
  optimizer update (`hashmoe.training.trainer`); evaluation and decoding read the bias and never
  change it. Optional losses: the sequence-wise balance loss (`sequence_balance_loss`, eq. 17-20,
  weighted by `seq_balance_coef`) and the router z-loss (`router_z_loss`, `z_loss_coef`).

  Metrics, besides the standard ones: `balance_loss` (the sequence-wise loss, unweighted),
  `router_z_loss` (unweighted), `expert_bias_abs_max` (max_i |b_i| the selection used) and the
  router entropy/confidence of s normalised to sum to 1.

  Attributes:
    num_experts: E.
    k: experts per token, in [1, E].
    score: one of `TOPK_SCORES`.
    normalize: renormalise the k selected scores to sum to 1.
    route_scale: a constant factor on the combine weights (DeepSeek's routed_scaling_factor).
    bias_update_rate: γ of the bias update; 0 keeps the bias at 0.
    seq_balance_coef: α of the sequence-wise balance loss; 0 disables it.
    z_loss_coef: coefficient of the router z-loss; 0 disables it.
    kernel_init: initialiser of W float32[d_model, E].
  """
  k: int = 1
  score: str = "sigmoid"
  normalize: bool = True
  route_scale: float = 1.0
  bias_update_rate: float = 0.0
  seq_balance_coef: float = 0.0
  z_loss_coef: float = 0.0
  kernel_init: Initializer = nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")

  def __post_init__(self):
    name = type(self).__name__
    if not isinstance(self.k, (int, np.integer)) or not 1 <= self.k <= self.num_experts:
      raise ValueError(f"{name}: k must be an int in [1, num_experts={self.num_experts}], got "
                       f"{self.k!r}")
    if self.score not in TOPK_SCORES:
      raise ValueError(f"{name}: score must be one of {TOPK_SCORES}, got {self.score!r}")
    if not self.route_scale > 0:
      raise ValueError(f"{name}: route_scale must be > 0, got {self.route_scale!r}")
    for field in ("bias_update_rate", "seq_balance_coef", "z_loss_coef"):
      if not getattr(self, field) >= 0:
        raise ValueError(f"{name}: {field} must be >= 0 (0 turns it off), got "
                         f"{getattr(self, field)!r}")
    super().__post_init__()

  def _compute_routing_instructions(self, hidden: Array, features: RouterFeatures, *,
                                    deterministic: bool) -> RoutingInstructions:
    tokens = hidden.shape[0]
    kernel = self.param("kernel",
                        nn.with_logical_partitioning(self.kernel_init, ("embed", "unmodeled")),
                        (hidden.shape[-1], self.num_experts), jnp.float32)
    bias = self.variable(ROUTER_STATE, EXPERT_BIAS, jnp.zeros, (self.num_experts,), jnp.float32)
    logits = hidden @ kernel.astype(jnp.float32)  # [tokens, E]
    if self.score == "softmax":
      scores = jax.nn.softmax(logits, axis=-1)
    else:
      scores = jax.nn.sigmoid(logits)
    # eq. (16): the bias decides who is selected, never how much the selected contribute.
    used_bias = bias.value
    _, expert_index = lax.top_k(lax.stop_gradient(scores) + used_bias, self.k)
    weight = jnp.take_along_axis(scores, expert_index, axis=-1)  # [tokens, k]
    if self.normalize:
      weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
    weight = weight * jnp.float32(self.route_scale)
    counted = None if features.valid is None else features.valid.reshape(-1)
    balance = sequence_balance_loss(scores, expert_index, features.token_ids.shape[0], counted)
    z_loss = router_z_loss(logits, counted)
    if not deterministic and self.is_mutable_collection(ROUTER_STATE) and self.bias_update_rate:
      mask = (jnp.ones((tokens, 1), jnp.float32) if counted is None
              else counted.astype(jnp.float32)[:, None])
      counts = jnp.zeros((self.num_experts,), jnp.float32).at[expert_index.reshape(-1)].add(
          jnp.broadcast_to(mask, expert_index.shape).reshape(-1))
      bias.value = lax.stop_gradient(
          expert_bias_update(bias.value, counts, self.bias_update_rate))
    aux_losses = {}
    if self.seq_balance_coef:
      aux_losses["balance_loss"] = self.seq_balance_coef * balance
    if self.z_loss_coef:
      aux_losses["router_z_loss"] = self.z_loss_coef * z_loss
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    return RoutingInstructions(
        expert_index=expert_index.astype(jnp.int32), combine_weight=weight, router_probs=probs,
        aux_losses=aux_losses,
        metrics={"balance_loss": balance, "router_z_loss": z_loss,
                 "expert_bias_abs_max": jnp.max(jnp.abs(used_bias))})
