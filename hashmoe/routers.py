"""Router configs: which router a sparse layer uses, as a small frozen value gin passes in.

flaxformer's gin binds `MoeLayer.router = @routing.TokensChooseMaskedRouter()`; hashmoe binds
`SparseConfig.router = @routers.Hash()` the same way, and configures the router under its own
name:

    SparseConfig.router = @routers.Hash()        # Python: SparseConfig(router=routers.Hash(
    routers.Hash.key = 'bigram'                  #             key="bigram"), ...)

One config class per router family, each knowing what its router needs and building its Flax module
(`hashmoe.routing`):

  Hash        expert = table[key(x)], Roller et al. 2021 §3; MultiHash (§3.2) with num_hashes > 1
  HashTopK    k experts per key from a fixed table, mixed by a learned gate (DeepSeek-V4)
  TopK        learned top-k with auxiliary-loss-free bias balancing (DeepSeek-V3)
  FirstLayers one router in the first N sparse layers, another in the rest (DeepSeek-V4's hash
              layers first, learned top-k after)
  Switch      learned top-1 over the hidden state (Fedus et al. 2021)
  TokenSwitch Switch over a learned embedding of the current token (the paper's Table 6)
  Base        BASE layers' balanced assignment (Lewis et al. 2021)

The rest of the library asks the config, never its name: `uses_tables`, `num_tables` (tables per
layer), `num_slices` (MultiHash's N), `experts_per_token`, `key` (what a hash looks at, None for
learned routers), `table_kinds` / `default_table_kind`, `table_columns` (the expert columns a stored
table gives, for routing on the host), `build(...)`. `name` is the family's label
in reports and in the settings a checkpoint records. Adding a router is one class here (a subclass
with a `name`: that registers it, by name and with gin) and one gin file under
configs/models/routers/ (docs/ROUTING.md, "How to add a router").

Checkpoints and configs written before routers were objects name flat `SparseConfig` fields
(`SparseConfig.hash_key`, `.num_hashes`, `.balance_coef`, ...): `flat_fields` gives a router's
values under those names (what `run_settings` records, so old checkpoints compare equal), and
`moved_binding` names the new binding for a config that still binds an old one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Optional, Union

import flax.linen as nn
import gin
import numpy as np

from hashmoe import hashing
from hashmoe import routing

# The flat SparseConfig fields the router configs replaced, with the defaults they had. Checkpoints
# record a model's settings under these names (`SparseConfig.flat_fields`).
LEGACY_DEFAULTS: Mapping[str, Any] = {
    "num_hashes": 1, "hash_key": "token", "key_space": None, "hash_seed": 0, "topk": 1,
    "balance_coef": 0.01, "z_loss_coef": 0.0, "jitter": 0.0, "router_embed_dim": None}

# name -> router config class, filled as the classes are defined.
REGISTRY: dict[str, type["RouterConfig"]] = {}


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """What every router config answers. Subclasses set `name` (and are then registered) and
  `legacy_names` ({field: old flat SparseConfig field}), and implement `build`."""
  name: ClassVar[str] = ""
  legacy_names: ClassVar[Mapping[str, str]] = {}
  # What the hash looks at (`hashing.KEYS`); None for routers that look at no key.
  key: ClassVar[Optional[str]] = None
  # The table kinds the router takes (of `hashing.TABLE_KINDS` and `hashing.TOPK_KIND`).
  table_kinds: ClassVar[tuple[str, ...]] = ()
  # What the trainer gives it when `train.hash_tables` is None.
  default_table_kind: ClassVar[Optional[str]] = None
  # Fields that are loss coefficients the trainer feeds at run time
  # (`routing.runtime_loss_coefficients`): configs that differ only in them share one program.
  runtime_coefficients: ClassVar[tuple[str, ...]] = ()

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    # Only a class that names itself registers (gin's registration subclasses the config).
    if "name" in cls.__dict__ and cls.name:
      taken = REGISTRY.get(cls.name)
      if taken is not None and taken.__qualname__ != cls.__qualname__:
        raise ValueError(f"router name {cls.name!r} is taken by {REGISTRY[cls.name].__name__}")
      REGISTRY[cls.name] = cls

  @property
  def num_tables(self) -> int:
    """Hash tables one sparse layer holds (0: the router has none)."""
    return 0

  @property
  def uses_tables(self) -> bool:
    return self.num_tables > 0

  @property
  def num_slices(self) -> int:
    """MultiHash's N: the expert FFN is cut into N slices, one per column of `expert_index`."""
    return 1

  @property
  def experts_per_token(self) -> int:
    """Experts whose full FFN a token uses (MultiHash's N slices add up to one expert)."""
    return 1

  def check(self, num_experts: int) -> None:
    """Raises ValueError if the router cannot route to `num_experts` experts."""
    del num_experts

  @property
  def updates_state(self) -> bool:
    """Whether training changes the router's non-parameter state (`routing.ROUTER_STATE`): a
    trainer must store what the training pass writes there (`hashmoe.training.trainer` does)."""
    return False

  def check_layers(self, num_sparse_layers: int) -> None:
    """Raises ValueError if the router cannot serve a model of `num_sparse_layers` sparse layers
    (`FirstLayers` needs more than its first ones)."""
    del num_sparse_layers

  def for_layer(self, ordinal: int) -> "RouterConfig":
    """The config of the router in the sparse layer at `ordinal` (encoder layers first): itself,
    except for routers that differ between layers (`FirstLayers`)."""
    del ordinal
    return self

  def table_key_space(self, vocab_size: int, max_len: int) -> Optional[int]:
    """Rows of each of the router's tables in a model of `vocab_size` and `max_len` (None for
    routers without tables)."""
    del vocab_size, max_len
    return None

  def table_columns(self, stored: np.ndarray) -> Optional[np.ndarray]:
    """int32[H, key_space]: column c is the expert of `Routing.expert_index[:, c]` for each key id,
    read from the router's stored table (its "hash_tables" variable "table"); None for routers
    whose experts are no table lookup. What the input pipeline routes with
    (`hashmoe.host_routing`)."""
    del stored
    return None

  def build(self, *, num_experts: int, vocab_size: int, max_len: int,
            capacity_factor: Optional[float], tables: Optional[tuple[hashing.HashTable, ...]],
            ordinal: int) -> nn.Module:
    """The `hashmoe.routing` router module, unbound (parent=None) so the sparse block adopts it.

    Args:
      num_experts: E.
      vocab_size, max_len: the model's (key spaces, token embeddings).
      capacity_factor: the sparse layer's (None: dropless).
      tables: the layer's hash tables, or None for the router's own.
      ordinal: the layer's place among the model's sparse layers (encoder layers first), so that
        seeded random tables differ between layers.
    """
    raise NotImplementedError(f"{type(self).__name__} must implement build")

  def flat_fields(self) -> dict[str, Any]:
    """{"router": name, and every `LEGACY_DEFAULTS` field}: this router's values under the flat
    SparseConfig names checkpoints record, the defaults for fields the family does not have."""
    fields = {"router": self.name, **LEGACY_DEFAULTS}
    fields.update({old: getattr(self, new) for new, old in self.legacy_names.items()})
    return fields

  def own_settings(self) -> dict[str, Any]:
    """{"routers.<Family>.<field>": value} of the fields that have no flat SparseConfig name
    (`legacy_names`), e.g. Switch's combine: what checkpoints record of them besides
    `flat_fields` (a checkpoint written before a field existed does not name it, and a setting
    only one side names is not a change)."""
    family = REGISTRY.get(self.name, type(self)).__name__
    return {f"routers.{family}.{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in self.legacy_names}

  def replace(self, **changes: Any) -> "RouterConfig":
    return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------------
# Hash routing.


@dataclasses.dataclass(frozen=True)
class _Hashed(RouterConfig):
  """A router whose experts come from a fixed table looked up by a key of the token ids.

  Attributes:
    key: what is hashed, one of `hashing.KEYS`: "token", "prev_token", "bigram", "position",
      "oracle_future", "predicted_future" (Sections 3.1 and 5.3.2).
    key_space: number of distinct key ids a table covers. None: taken from the given tables, or
      without tables `hashing.key_space_size` (the vocabulary; max_len for "position").
    seed: seed of the random tables made when no tables are given; each sparse layer gets its own
      (seed + num_tables * ordinal, encoder layers first), so layers hash independently.
  """
  legacy_names: ClassVar[Mapping[str, str]] = {
      "key": "hash_key", "key_space": "key_space", "seed": "hash_seed"}
  # The subclass's count fields (num_hashes, topk): ints >= 1.
  counts: ClassVar[tuple[str, ...]] = ()

  key: str = "token"
  key_space: Optional[int] = None
  seed: int = 0

  def __post_init__(self):
    if self.key not in hashing.KEYS:
      raise ValueError(f"{type(self).__name__}: unknown key {self.key!r}; expected one of "
                       f"{hashing.KEYS}")
    for field in self.counts + (("key_space",) if self.key_space is not None else ()):
      value = getattr(self, field)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{type(self).__name__}: {field} must be an int >= 1, got {value!r}")

  @property
  def num_tables(self) -> int:
    return 1

  def table_key_space(self, vocab_size: int, max_len: int) -> int:
    if self.key_space is not None:
      return self.key_space
    return hashing.key_space_size(self.key, vocab_size=vocab_size, max_positions=max_len)

  def _build_args(self, tables: Optional[tuple], vocab_size: int, max_len: int,
                  ordinal: int) -> dict[str, Any]:
    """The arguments both hash router modules take: key, key_space (None with tables: the router
    reads it from them) and the layer's seed."""
    key_space = self.key_space
    if key_space is None and not tables:
      key_space = self.table_key_space(vocab_size, max_len)
    return dict(key=self.key, key_space=key_space, seed=self.seed + self.num_tables * ordinal)


@dataclasses.dataclass(frozen=True)
class Hash(_Hashed):
  """The hash layer (Roller et al. 2021, §3): expert = table[key(x)], no parameters, no loss.

  With num_hashes = N > 1 it is MultiHash (§3.2): the expert FFN is cut into N slices, slice m
  picked by hash m; parameters and FLOPs stay those of one expert (N must divide d_model and D).

  Attributes:
    key, key_space, seed: see `_Hashed`.
    num_hashes: MultiHash N; 1 is the plain hash layer.
  """
  name: ClassVar[str] = "hash"
  legacy_names: ClassVar[Mapping[str, str]] = {**_Hashed.legacy_names, "num_hashes": "num_hashes"}
  table_kinds: ClassVar[tuple[str, ...]] = hashing.TABLE_KINDS
  default_table_kind: ClassVar[Optional[str]] = "random"

  counts: ClassVar[tuple[str, ...]] = ("num_hashes",)

  num_hashes: int = 1

  @property
  def num_tables(self) -> int:
    return self.num_hashes

  @property
  def num_slices(self) -> int:
    return self.num_hashes

  def table_columns(self, stored: np.ndarray) -> np.ndarray:
    # HashRouter stores int32[num_hashes, key_space]: one row per MultiHash column.
    return np.asarray(stored, np.int32)

  def build(self, *, num_experts, vocab_size, max_len, capacity_factor, tables, ordinal):
    del capacity_factor  # a hash router never drops; only a capacity dispatch does
    return routing.HashRouter(num_experts, num_hashes=self.num_hashes, tables=tables,
                              **self._build_args(tables, vocab_size, max_len, ordinal),
                              parent=None)


@dataclasses.dataclass(frozen=True)
class HashTopK(_Hashed):
  """Hash-selected top-k (DeepSeek-V4's hash-routed first layers): a fixed table of k distinct
  experts per key (`hash_functions.build_topk_table`) picks who runs, a learned gate weighs them.

  Attributes:
    key, key_space, seed: see `_Hashed`.
    topk: experts per token, in [1, num_experts].
    gate: how the k selected logits become weights (`routing.gate_weights`): "softmax" over the k
      (the default), or per expert "sigmoid", "softplus", "sqrt_softplus".
    normalize: renormalise the k weights to sum to 1 (a no-op for "softmax").
    route_scale: a constant factor on the weights (> 0).
  """
  name: ClassVar[str] = "hash_topk"
  legacy_names: ClassVar[Mapping[str, str]] = {**_Hashed.legacy_names, "topk": "topk"}
  # The balanced table and the initialisations other frameworks start from (hashing.TOPK_KINDS).
  table_kinds: ClassVar[tuple[str, ...]] = hashing.TOPK_KINDS
  default_table_kind: ClassVar[Optional[str]] = hashing.TOPK_KIND

  counts: ClassVar[tuple[str, ...]] = ("topk",)

  topk: int = 1
  gate: str = "softmax"
  normalize: bool = False
  route_scale: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    if self.gate not in routing.HASH_TOPK_GATES:
      raise ValueError(f"HashTopK: gate must be one of {routing.HASH_TOPK_GATES}, got "
                       f"{self.gate!r}")
    if not isinstance(self.normalize, bool):
      raise ValueError(f"HashTopK: normalize must be True or False, got {self.normalize!r}")
    if not self.route_scale > 0:
      raise ValueError(f"HashTopK: route_scale must be > 0, got {self.route_scale!r}")

  @property
  def experts_per_token(self) -> int:
    return self.topk

  def check(self, num_experts: int) -> None:
    if not 1 <= self.topk <= num_experts:
      raise ValueError(f"HashTopK: topk must be in [1, num_experts={num_experts}], got "
                       f"{self.topk}")

  def table_columns(self, stored: np.ndarray) -> np.ndarray:
    # HashTopKRouter stores int32[key_space, k]: column c holds each key's c-th expert.
    return np.ascontiguousarray(np.asarray(stored, np.int32).T)

  def build(self, *, num_experts, vocab_size, max_len, capacity_factor, tables, ordinal):
    del capacity_factor
    table = tables[0] if tables else None
    if table is not None:
      expected = self.table_key_space(vocab_size, max_len)
      if table.vocab_size != expected:
        raise ValueError(f"HashTopK: the top-k table covers {table.vocab_size} key ids, but the "
                         f"model's key {self.key!r} has {expected} (vocab_size={vocab_size}): "
                         "a table built for another vocabulary; rebuild it for this one")
    return routing.HashTopKRouter(num_experts, self.topk, table=table,
                                  gate=self.gate, normalize=self.normalize,
                                  route_scale=self.route_scale,
                                  **self._build_args(tables, vocab_size, max_len, ordinal),
                                  parent=None)


# --------------------------------------------------------------------------------------------------
# Learned routing baselines.


@dataclasses.dataclass(frozen=True)
class Switch(RouterConfig):
  """Switch Transformer routing (Fedus et al. 2021): top-1 of softmax(W h), trained with the
  load-balancing loss; the sparse layer's capacity_factor, if any, decides the drops.

  Attributes:
    balance_coef: α of the load-balancing loss (0.01 is Switch's default; the paper tunes it).
    z_loss_coef: coefficient of the router z-loss (ST-MoE uses 1e-3); 0 disables it.
    jitter: ε of the multiplicative input jitter during training; 0 disables it.
    combine: the chosen expert's combine weight, one of `routing.SWITCH_COMBINES`: "prob" (p, the
      paper's; the default), "prob_times_experts" (E·p), "straight_through" (1 forward, p's
      gradient backward). `routing.switch_combine_weight` gives each one's source and rationale.
    exclude_padding: the load-balancing and z-losses average over the real tokens only (True, the
      default); False counts padding positions too, as this library did before the option.
  """
  name: ClassVar[str] = "switch"
  legacy_names: ClassVar[Mapping[str, str]] = {
      "balance_coef": "balance_coef", "z_loss_coef": "z_loss_coef", "jitter": "jitter"}
  # What the paper tunes: the tuning runs share one compiled step.
  runtime_coefficients: ClassVar[tuple[str, ...]] = ("balance_coef",)

  balance_coef: float = 0.01
  z_loss_coef: float = 0.0
  jitter: float = 0.0
  combine: str = "prob"
  exclude_padding: bool = True

  def __post_init__(self):
    if self.combine not in routing.SWITCH_COMBINES:
      raise ValueError(f"{type(self).__name__}: combine must be one of "
                       f"{routing.SWITCH_COMBINES}, got {self.combine!r}")
    if not isinstance(self.exclude_padding, bool):
      raise ValueError(f"{type(self).__name__}: exclude_padding must be True or False, got "
                       f"{self.exclude_padding!r}")

  def _router_args(self, vocab_size: int) -> dict[str, Any]:
    del vocab_size
    return {}

  def build(self, *, num_experts, vocab_size, max_len, capacity_factor, tables, ordinal):
    del max_len, tables, ordinal
    return routing.SwitchRouter(num_experts, balance_coef=self.balance_coef,
                                z_loss_coef=self.z_loss_coef, jitter=self.jitter,
                                capacity_factor=capacity_factor, combine=self.combine,
                                exclude_padding=self.exclude_padding,
                                **self._router_args(vocab_size), parent=None)


@dataclasses.dataclass(frozen=True)
class TokenSwitch(Switch):
  """Switch with token-based routing (Roller et al. 2021, §5.3.3, Table 6): the router reads a
  separate learned embedding of the current token instead of the hidden state.

  Attributes:
    balance_coef, z_loss_coef, jitter: as `Switch`.
    router_embed_dim: width of the token embedding (None: d_model).
  """
  name: ClassVar[str] = "token_switch"
  legacy_names: ClassVar[Mapping[str, str]] = {
      **Switch.legacy_names, "router_embed_dim": "router_embed_dim"}

  router_embed_dim: Optional[int] = None

  def _router_args(self, vocab_size: int) -> dict[str, Any]:
    return dict(token_based=True, vocab_size=vocab_size, router_embed_dim=self.router_embed_dim)


@dataclasses.dataclass(frozen=True)
class TopK(RouterConfig):
  """Learned top-k routing as DeepSeek-V3 does it (arXiv:2412.19437, §2.1.2; `routing.TopKRouter`):
  sigmoid (or softmax) scores of h W, the k experts of largest score + a per-expert bias, weights
  the selected scores (optionally renormalised), the bias moved outside the gradient towards
  balance after every training step (auxiliary-loss-free balancing).

  Attributes:
    topk: experts per token, in [1, num_experts].
    score: "sigmoid" (DeepSeek-V3, the default) or "softmax" (DeepSeek-V2, Mixtral).
    normalize: renormalise the k selected scores to sum to 1 (DeepSeek-V3's norm_topk_prob).
    route_scale: a constant factor on the weights (DeepSeek's routed_scaling_factor), > 0.
    bias_update_rate: γ of the bias update b_i += γ sign(mean load - load_i) (DeepSeek-V3 uses
      0.001 for most of its training); 0 turns the balancing off. Negative is an error.
    seq_balance_coef: α of the sequence-wise balance loss (eq. 17-20; DeepSeek-V3: 0.0001);
      0 turns it off.
    z_loss_coef: coefficient of the router z-loss (ST-MoE); 0 turns it off.
  """
  name: ClassVar[str] = "topk"

  topk: int = 1
  score: str = "sigmoid"
  normalize: bool = True
  route_scale: float = 1.0
  bias_update_rate: float = 0.0
  seq_balance_coef: float = 0.0
  z_loss_coef: float = 0.0

  def __post_init__(self):
    if not isinstance(self.topk, (int, np.integer)) or self.topk < 1:
      raise ValueError(f"TopK: topk must be an int >= 1, got {self.topk!r}")
    if self.score not in routing.TOPK_SCORES:
      raise ValueError(f"TopK: score must be one of {routing.TOPK_SCORES}, got {self.score!r}")
    if not isinstance(self.normalize, bool):
      raise ValueError(f"TopK: normalize must be True or False, got {self.normalize!r}")
    if not self.route_scale > 0:
      raise ValueError(f"TopK: route_scale must be > 0, got {self.route_scale!r}")
    if not self.bias_update_rate >= 0:
      raise ValueError(f"TopK: bias_update_rate must be >= 0 (0 turns the bias update off), got "
                       f"{self.bias_update_rate!r}")
    for field in ("seq_balance_coef", "z_loss_coef"):
      if not getattr(self, field) >= 0:
        raise ValueError(f"TopK: {field} must be >= 0 (0 turns it off), got "
                         f"{getattr(self, field)!r}")

  @property
  def experts_per_token(self) -> int:
    return self.topk

  @property
  def updates_state(self) -> bool:
    return self.bias_update_rate > 0

  def check(self, num_experts: int) -> None:
    if not 1 <= self.topk <= num_experts:
      raise ValueError(f"TopK: topk must be in [1, num_experts={num_experts}], got {self.topk}")

  def build(self, *, num_experts, vocab_size, max_len, capacity_factor, tables, ordinal):
    # Nothing is dropped by the router; a capacity dispatch may still drop.
    del vocab_size, max_len, capacity_factor, tables, ordinal
    return routing.TopKRouter(num_experts, k=self.topk, score=self.score,
                              normalize=self.normalize, route_scale=self.route_scale,
                              bias_update_rate=self.bias_update_rate,
                              seq_balance_coef=self.seq_balance_coef,
                              z_loss_coef=self.z_loss_coef, parent=None)


@dataclasses.dataclass(frozen=True)
class Base(RouterConfig):
  """BASE layers (Lewis et al. 2021): a balanced linear assignment during training (each expert
  gets exactly tokens / E), greedy at evaluation; no auxiliary loss, nothing dropped."""
  name: ClassVar[str] = "base"

  def build(self, *, num_experts, vocab_size, max_len, capacity_factor, tables, ordinal):
    del vocab_size, max_len, capacity_factor, tables, ordinal
    return routing.BaseRouter(num_experts, parent=None)


# --------------------------------------------------------------------------------------------------
# Routers that differ between layers.


@dataclasses.dataclass(frozen=True)
class FirstLayers(RouterConfig):
  """One router in the first `first_layers` sparse layers, another in the rest: DeepSeek-V4's
  layout (hash top-k in its first 3 MoE layers, learned top-k after them) is
  `FirstLayers(first=HashTopK(topk=6), first_layers=3, rest=TopK(topk=6))`.

  Sparse layers are counted in the order of their router ordinal (encoder layers first, then
  decoder layers, each by index). What the rest of the library asks a model's router about tables
  (`uses_tables`, `key`, `table_kinds`, ...) is answered by the part that has them; so at most one
  part may use tables, and both must give a token the same number of experts and slices (the
  layers share one experts config, and "equal active compute" is the point of the layout).

  Attributes:
    first: the router of the first `first_layers` sparse layers.
    first_layers: N >= 1; at most the model's number of sparse layers.
    rest: the router of the other sparse layers.
  """
  name: ClassVar[str] = "first_layers"

  first: RouterConfig = dataclasses.field(default_factory=lambda: HashTopK(topk=1))
  first_layers: int = 1
  rest: RouterConfig = dataclasses.field(default_factory=lambda: TopK(topk=1))

  def __post_init__(self):
    object.__setattr__(self, "first", router_config(self.first))
    object.__setattr__(self, "rest", router_config(self.rest))
    for part in ("first", "rest"):
      if isinstance(getattr(self, part), FirstLayers):
        raise ValueError(f"FirstLayers: {part} must be a single-layer router config, not another "
                         "FirstLayers")
    if not isinstance(self.first_layers, (int, np.integer)) or self.first_layers < 1:
      raise ValueError(f"FirstLayers: first_layers must be an int >= 1, got "
                       f"{self.first_layers!r}")
    if self.first.uses_tables and self.rest.uses_tables:
      raise ValueError("FirstLayers: first and rest both use hash tables; a model has one table "
                       "spec, so at most one part may (use the hash router alone instead)")
    for prop in ("experts_per_token", "num_slices"):
      a, b = getattr(self.first, prop), getattr(self.rest, prop)
      if a != b:
        raise ValueError(f"FirstLayers: first gives {prop}={a} but rest gives {b}; the layers "
                         "share one experts config, so they must agree (e.g. the same topk)")

  @property
  def _tabled(self) -> RouterConfig:
    return self.rest if self.rest.uses_tables else self.first

  @property
  def num_tables(self) -> int:
    return self._tabled.num_tables

  @property
  def num_slices(self) -> int:
    return self.first.num_slices

  @property
  def experts_per_token(self) -> int:
    return self.first.experts_per_token

  @property
  def key(self) -> Optional[str]:
    return self._tabled.key

  @property
  def table_kinds(self) -> tuple[str, ...]:
    return self._tabled.table_kinds

  @property
  def default_table_kind(self) -> Optional[str]:
    return self._tabled.default_table_kind

  @property
  def updates_state(self) -> bool:
    return self.first.updates_state or self.rest.updates_state

  def check(self, num_experts: int) -> None:
    self.first.check(num_experts)
    self.rest.check(num_experts)

  def check_layers(self, num_sparse_layers: int) -> None:
    if self.first_layers > num_sparse_layers:
      raise ValueError(f"FirstLayers: first_layers={self.first_layers} but the model has only "
                       f"{num_sparse_layers} sparse layer(s); lower first_layers or make more "
                       "layers sparse (SparseConfig.layers)")

  def for_layer(self, ordinal: int) -> RouterConfig:
    return self.first if ordinal < self.first_layers else self.rest

  def table_key_space(self, vocab_size: int, max_len: int) -> Optional[int]:
    return self._tabled.table_key_space(vocab_size, max_len)

  def table_columns(self, stored: np.ndarray) -> Optional[np.ndarray]:
    return self._tabled.table_columns(stored)

  def build(self, *, num_experts, vocab_size, max_len, capacity_factor, tables, ordinal):
    part = self.for_layer(ordinal)
    return part.build(num_experts=num_experts, vocab_size=vocab_size, max_len=max_len,
                      capacity_factor=capacity_factor,
                      tables=tables if part.uses_tables else None, ordinal=ordinal)

  def own_settings(self) -> dict[str, Any]:
    # Each part's settings under its own prefix, JSON values only (checkpoints record them).
    out: dict[str, Any] = {"routers.FirstLayers.first_layers": self.first_layers}
    for part in ("first", "rest"):
      router = getattr(self, part)
      for name, value in {**router.flat_fields(), **router.own_settings()}.items():
        out[f"routers.FirstLayers.{part}.{name.rsplit('.', 1)[-1]}"] = value
    return out


# Every family is a gin configurable: `SparseConfig.router = @routers.Hash()`. (A router config
# defined in another module registers itself the same way.)
for _cls in REGISTRY.values():
  gin.register(_cls, module="hashmoe.routers")
del _cls


# --------------------------------------------------------------------------------------------------
# Names: a family's defaults by name, and configs that still use the flat fields.


def router_config(router: Union[RouterConfig, str]) -> RouterConfig:
  """`router` itself, or for a family name ("switch") that family's defaults."""
  if isinstance(router, RouterConfig):
    return router
  if isinstance(router, str) and router in REGISTRY:
    return REGISTRY[router]()
  raise ValueError(f"unknown router {router!r}; expected a router config "
                   f"({', '.join('routers.' + c.__name__ + '()' for c in REGISTRY.values())}) or "
                   f"one of the names {sorted(REGISTRY)}")


def from_flat_fields(name: str, **fields: Any) -> RouterConfig:
  """The router of family `name` from flat SparseConfig field values (`LEGACY_DEFAULTS` names);
  a field the family does not have must keep its default."""
  cls = type(router_config(name))
  unknown = sorted(set(fields) - set(LEGACY_DEFAULTS))
  if unknown:
    raise TypeError(f"{unknown} are not flat router fields; expected some of "
                    f"{sorted(LEGACY_DEFAULTS)}")
  own = {old: new for new, old in cls.legacy_names.items()}
  foreign = sorted(k for k, v in fields.items() if k not in own and v != LEGACY_DEFAULTS[k])
  if foreign:
    verb = "does" if len(foreign) == 1 else "do"
    raise ValueError(f"{', '.join(f'{k}={fields[k]!r}' for k in foreign)} {verb} not apply to "
                     f"router {name!r} ({cls.__name__} has {sorted(own) or 'no such fields'})")
  return cls(**{own[k]: v for k, v in fields.items() if k in own})


# The configurables that held the flat router fields: the model's, and the comparison's models.
_FLAT_OWNERS = ("SparseConfig", "ModelSpec")


def moved_binding(configurable: str, param: str) -> Optional[str]:
  """For a binding of a flat field that moved into the router configs (`SparseConfig.hash_key`,
  `ModelSpec.num_hashes`), the message naming its new binding; None for any other binding."""
  owner = configurable.rsplit(".", 1)[-1]
  if owner not in _FLAT_OWNERS or param not in LEGACY_DEFAULTS:
    return None
  homes = [(cls, new) for cls in REGISTRY.values() for new, old in cls.legacy_names.items()
           if old == param]
  # A field every Switch has is named once, on Switch (TokenSwitch inherits it).
  homes = [(cls, new) for cls, new in homes
           if not any(c is not cls and issubclass(cls, c) for c, _ in homes)]
  ways = " or ".join(f"routers.{cls.__name__}.{new} (with {owner}.router = "
                     f"@routers.{cls.__name__}())" for cls, new in homes)
  return f"{owner}.{param} moved to the router config: bind {ways}"
