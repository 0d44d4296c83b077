"""Transformer models from `hashmoe.layers`: a decoder-only LM and the paper's encoder-decoder.

Dense baselines and sparse models are one code path: `TransformerConfig.sparse` (a `SparseConfig`)
names the layers whose FFN becomes a router + experts, and which router. Comparing hash to Switch,
or sparse to dense, changes one config field and nothing else.

Calling convention (both models):

  variables = model.init(jax.random.key(0), batch)             # batch: dict of int32[batch, length]
  logits, state = model.apply(variables, batch, deterministic=False,
                              rngs={"dropout": key}, mutable=[MOE_COLLECTION])
  aux_loss, metrics = collect_aux(state)   # Σ router aux losses, {layer: metrics}

`batch` holds the features seqio's feature converters produce: decoder-only
{"decoder_input_tokens", "decoder_target_tokens", "decoder_positions"?, "decoder_segment_ids"?,
"predicted_ids"?}; the encoder-decoder adds {"encoder_input_tokens", "encoder_positions"?,
"encoder_segment_ids"?}, and a batch may carry hash routing precomputed on the host
(`hashmoe.host_routing`: two int32 features per hash router, "hash_routing:<router path>:ranks"
and ":counts", handed to the routers in `RouterFeatures.row_routing`). Token id 0 is padding for
targets and encoder inputs (seqio's convention; 0 is also the decoder's BOS in
`decoder_input_tokens`, so decoder padding is read from `decoder_target_tokens`). Concrete batches
are checked on the host by `validate_batch`; traced batches inside `jit` cannot be (a traced gather
cannot raise: a bad id wraps, clamps in a hash table lookup, or turns into NaN), so check batches
in the input pipeline before the jitted step.

Hash tables are data, not config: `hash_tables` maps a layer name ("decoder_7", "encoder_0") or
"default" to a tuple of `hashmoe.hashing.HashTable` (one per MultiHash hash). The routers store them
in their non-trainable "hash_tables" collection at init, so they travel with the variables.

Large models: `TransformerConfig.scan_layers` runs each run of dense layers between the sparse ones
under `nn.scan` (one compiled body, parameters stacked on a "layers" axis; `stack_layers` /
`unstack_layers` convert parameters between the layouts), and `TransformerConfig.remat_policy`
chooses what each layer keeps for the backward pass (`hashmoe.layers.REMAT_POLICIES`).

Cached decoding: `DecoderLM(..., decode=True)` and `EncoderDecoder.decode(..., decode=True)` run
one token per row through a key/value cache in flax's "cache" collection (flaxformer's
convention): the first decode call, on a [batch, max_length] batch, creates it (use
`hashmoe.decoding.init_cache`, which does so abstractly), each later call takes
int32[batch, 1] tokens and returns that position's logits. The cache also holds the decoder's
step index (the position of the token) and the previous token, which previous-token and bigram
hash keys route on. `hashmoe.decoding` has the loops (greedy, temperature) and the rules that
make a step equal the full pass; `hashmoe.t5x.models` decodes through it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hashmoe import experts as experts_lib
from hashmoe import expert_grouping, hashing
from hashmoe import routers
from hashmoe.layers import (AUX_LOSS_KEY, METRICS_KEY, MOE_COLLECTION, Embed, LayerNorm, MlpBlock,
                            PositionEmbed, SparseMlpBlock, TransformerLayer, combine_masks,
                            make_attention_mask, make_causal_mask, make_segment_mask, remat_policy)
# Re-exported: the config is part of the models' API.
from hashmoe.model_config import (  # noqa: F401
    UNDECODABLE_KEYS, SparseConfig, TransformerConfig, baseline_config, deeper_config,
    program_config, runtime_loss_coefficients, tiny_config, wider_config)
from hashmoe.routing import RouterFeatures

Array = jax.Array
CACHE_COLLECTION = "cache"

# --------------------------------------------------------------------------------------------------
# Batch validation.

_TOKEN_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "encoder_input_tokens",
                   "predicted_ids")
_DECODER_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_positions",
                     "decoder_segment_ids", "decoder_loss_weights", "predicted_ids")
_ENCODER_FEATURES = ("encoder_input_tokens", "encoder_positions", "encoder_segment_ids")


def validate_batch(batch: Mapping[str, Any], vocab_size: int,
                   max_len: Optional[int] = None) -> None:
  """Check a batch on the host before it reaches a gather that cannot raise on bad ids.

  Token features (`*_tokens`, `predicted_ids`) must be integers in [0, vocab_size); positions in
  [0, max_len) when `max_len` is given; segment ids >= 0; all decoder features one shape
  [batch, length] and all encoder features one shape. Traced values (inside `jit`) are skipped.

  Raises:
    TypeError: a feature is not an integer array.
    ValueError: naming the feature, the offending values and the allowed range.
  """
  if not isinstance(batch, Mapping):
    raise TypeError(f"batch must be a mapping of feature name to array, got {type(batch).__name__}")
  for group in (_DECODER_FEATURES, _ENCODER_FEATURES):
    shapes = {k: tuple(np.shape(batch[k])) for k in group if k in batch}
    if len(set(shapes.values())) > 1:
      raise ValueError(f"features of one stack must share a shape [batch, length], got {shapes}")
    for k, shape in shapes.items():
      if len(shape) != 2:
        raise ValueError(f"{k} must have shape [batch, length], got {shape}")
  for name, value in batch.items():
    if hashing.is_tracer(value):
      continue
    if name in _TOKEN_FEATURES:
      hi, what = vocab_size, f"vocab_size is {vocab_size}"
    elif name.endswith("_positions"):
      hi, what = max_len, f"max_len is {max_len}"
    elif name.endswith("_segment_ids"):
      hi, what = None, "segment ids must be >= 0"
    else:
      continue
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.integer):
      raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    bad = arr < 0 if hi is None else (arr < 0) | (arr >= hi)
    if bad.any():
      values = np.unique(arr[bad])
      shown = ", ".join(str(v) for v in values[:10]) + (" ..." if values.size > 10 else "")
      allowed = "[0, inf)" if hi is None else f"[0, {hi})"
      raise ValueError(f"{name} has {int(bad.sum())} values outside {allowed}: {shown}; {what}")


# --------------------------------------------------------------------------------------------------
# Sparse blocks from the config.


def _as_tuple(tables: Any) -> tuple:
  return tuple(tables) if isinstance(tables, (tuple, list)) else (tables,)


def _tables_for(layer: str, hash_tables: Optional[Mapping[str, Any]]) -> Optional[tuple]:
  if not hash_tables:
    return None
  tables = hash_tables.get(layer, hash_tables.get("default"))
  return None if tables is None else _as_tuple(tables)


def _check_hash_tables(config: TransformerConfig, hash_tables: Optional[Mapping[str, Any]]):
  """Reject table keys that name no sparse hash layer (a typo would silently fall back)."""
  if not hash_tables:
    return
  s = config.sparse
  if s is None or not s.router.uses_tables:
    router = None if s is None else s.router
    raise ValueError(f"hash_tables were given but the model has no hash layers "
                     f"(sparse router: {router!r})")
  hashed = set(table_layer_names(config))
  unknown = sorted(set(hash_tables) - hashed - {"default"})
  if unknown:
    raise ValueError(f"hash_tables has keys {unknown} that name no sparse hash layer; expected "
                     f"'default' or one of {sorted(hashed)}")
  expected = s.router.num_tables
  for name in hash_tables:
    n = len(_tables_for(name, hash_tables))
    if n != expected:
      raise ValueError(f"hash_tables[{name!r}] holds {n} tables; router {s.router!r} needs "
                       f"{expected}")


def _sparse_layer_names(config: TransformerConfig) -> list[str]:
  s = config.sparse
  return [f"encoder_{i}" for i in sorted(s.encoder_layers)] + [f"decoder_{i}"
                                                               for i in sorted(s.layers)]


def layer_routers(config: TransformerConfig) -> dict[str, routers.RouterConfig]:
  """{sparse layer ("encoder_0", "decoder_7"): its router config}, in router-ordinal order
  (encoder layers first); {} for a dense model. One config for every layer, except for routers
  that differ between layers (`routers.FirstLayers`)."""
  if config.sparse is None:
    return {}
  return {name: config.sparse.router.for_layer(i)
          for i, name in enumerate(_sparse_layer_names(config))}


def table_layer_names(config: TransformerConfig) -> list[str]:
  """The sparse layers whose router looks experts up in hash tables."""
  return [name for name, router in layer_routers(config).items() if router.uses_tables]


def make_router(config: TransformerConfig, tables: Optional[tuple], layer: str) -> nn.Module:
  """The router `config.sparse` asks for in sparse layer `layer` ("decoder_7"), unbound
  (parent=None) so that the sparse block adopts it."""
  s = config.sparse
  return s.router.build(num_experts=s.num_experts, vocab_size=config.vocab_size,
                        max_len=config.max_len, capacity_factor=s.capacity_factor, tables=tables,
                        ordinal=_sparse_layer_names(config).index(layer))


def make_shared_experts(config: TransformerConfig) -> Optional[nn.Module]:
  """The sparse layers' shared experts (`SparseConfig.num_shared_experts`) as one dense FFN of
  hidden size N * expert_d_ff, unbound; None without shared experts. No hidden dropout, like the
  routed experts."""
  s = config.sparse
  if not s.num_shared_experts:
    return None
  return MlpBlock(s.num_shared_experts * (s.expert_d_ff or config.d_ff), config.activation,
                  0.0, dtype=config.compute_dtype, parent=None)


def make_experts(config: TransformerConfig) -> nn.Module:
  """Stacked expert FFNs for `config.sparse`, unbound (parent=None)."""
  s = config.sparse
  return experts_lib.Experts(
      s.num_experts, s.expert_d_ff or config.d_ff, num_slices=s.router.num_slices,
      activation=config.activation, dispatch=s.dispatch, capacity_factor=s.capacity_factor,
      dtype=config.compute_dtype, parent=None)


LAYERS_AXIS = "layers"  # The logical axis of scanned layers' stacked parameters.


def scanned_name(prefix: str, first: int, last: int) -> str:
  """The module of a scanned run of layers first..last (inclusive) of stack `prefix`:
  "decoder_0_to_10"."""
  return f"{prefix}_{first}_to_{last}"


def layer_runs(config: TransformerConfig, prefix: str) -> list[tuple[str, tuple[int, ...], bool]]:
  """The modules of stack `prefix` ("encoder" or "decoder") in order, as (module name, the layer
  indices it holds, sparse).

  Unscanned, every layer is its own module "<prefix>_<i>". With `config.scan_layers` each maximal
  run of consecutive dense layers is one module `scanned_name(prefix, first, last)` (a run of one
  too, so that where a layer's parameters live depends only on whether it is sparse); sparse
  layers stay "<prefix>_<i>".
  """
  n = config.num_layers if prefix == "decoder" else config.num_encoder_layers
  s = config.sparse
  sparse = set() if s is None else set(s.layers if prefix == "decoder" else s.encoder_layers)
  runs: list[tuple[str, tuple[int, ...], bool]] = []
  dense: list[int] = []

  def close_dense_run():
    if dense:
      runs.append((scanned_name(prefix, dense[0], dense[-1]), tuple(dense), False))
      dense.clear()

  for i in range(n):
    if i in sparse or not config.scan_layers:
      close_dense_run()
      runs.append((f"{prefix}_{i}", (i,), i in sparse))
    else:
      dense.append(i)
  close_dense_run()
  return runs


def _apply_layer(layer: TransformerLayer, x: Array, self_mask: Optional[Array],
                 encoded: Optional[Array], cross_mask: Optional[Array],
                 features: Optional[RouterFeatures], deterministic: bool) -> Array:
  # Positional arguments only: jax.checkpoint traces keyword arguments, and `deterministic` must
  # stay a Python bool (static_argnums below).
  return layer(x, self_mask, encoded=encoded, cross_mask=cross_mask, features=features,
               deterministic=deterministic)


def _layer_call(policy_name: str, *, in_scan: bool):
  """`_apply_layer`, under `nn.remat` with the named policy unless it is "none"."""
  policy = remat_policy(policy_name)
  if policy is None:
    return _apply_layer
  # CSE prevention only matters outside a scan (jax.checkpoint's docs); inside one it costs speed.
  return nn.remat(_apply_layer, policy=policy, prevent_cse=not in_scan, static_argnums=(6,))


def _make_layer(config: TransformerConfig, name: str, sparse: bool, cross_attention: bool,
                hash_tables: Optional[Mapping[str, Any]]) -> TransformerLayer:
  moe = None
  if sparse:
    # Built unbound so that TransformerLayer adopts the block as its child "moe", and the block
    # adopts router and experts as "router" and "experts": params land at <layer>/moe/experts/wi.
    moe = SparseMlpBlock(router=make_router(config, _tables_for(name, hash_tables), name),
                         experts=make_experts(config), shared=make_shared_experts(config),
                         parent=None)
  return TransformerLayer(
      num_heads=config.num_heads, head_dim=config.head_dim, d_ff=config.d_ff,
      activation=config.activation, dropout_rate=config.dropout_rate,
      attention_dropout_rate=config.attention_dropout_rate, norm=config.norm,
      cross_attention=cross_attention, moe=moe, dtype=config.compute_dtype, name=name)


# --------------------------------------------------------------------------------------------------
# Feature plumbing.


def positions_from_segments(segment_ids: Array) -> Array:
  """Per-segment positions for packed rows: int32[batch, length], restarting at 0 in each segment.

  seqio's packing converters emit `*_positions`; this covers batches that only carry segment ids.
  """
  length = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1)
  start_index = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_index


def _positions(batch: Mapping[str, Array], prefix: str, shape: tuple[int, int]) -> Array:
  if f"{prefix}_positions" in batch:
    return jnp.asarray(batch[f"{prefix}_positions"], jnp.int32)
  if f"{prefix}_segment_ids" in batch:
    return positions_from_segments(jnp.asarray(batch[f"{prefix}_segment_ids"], jnp.int32))
  return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)


def _optional(batch: Mapping[str, Array], name: str) -> Optional[Array]:
  return jnp.asarray(batch[name], jnp.int32) if name in batch else None


def _require(batch: Mapping[str, Any], names: Sequence[str], model: str):
  missing = [n for n in names if n not in batch]
  if missing:
    raise ValueError(f"{model} needs batch features {missing}; got {sorted(batch)}")


def _decoder_valid(batch: Mapping[str, Array], tokens: Array) -> Array:
  # decoder_input_tokens starts with BOS = 0, so padding is read off the targets (as t5x does).
  if "decoder_target_tokens" in batch:
    return jnp.asarray(batch["decoder_target_tokens"]) > 0
  if "decoder_segment_ids" in batch:
    return jnp.asarray(batch["decoder_segment_ids"]) > 0
  return jnp.ones(tokens.shape, bool)


def _decoder_features(batch: Mapping[str, Array], tokens: Array, positions: Array,
                      valid: Array) -> RouterFeatures:
  return RouterFeatures(token_ids=tokens, positions=positions, valid=valid,
                        segment_ids=_optional(batch, "decoder_segment_ids"),
                        targets=_optional(batch, "decoder_target_tokens"),
                        predicted_ids=_optional(batch, "predicted_ids"),
                        row_routing=_row_routing(batch))


def _row_routing(batch: Mapping[str, Array]) -> Optional[dict[str, expert_grouping.RowRouting]]:
  # Every stack gets all of the batch's row routing: each router takes the entry of its own path.
  return expert_grouping.row_routing_from_features(batch) or None


# --------------------------------------------------------------------------------------------------
# Models.


def check_decodable(config: TransformerConfig) -> None:
  """Raises ValueError, naming the setting, where a cached decoding step of `config`'s model
  cannot equal its full pass (`hashmoe.decoding` explains each rule)."""
  s = config.sparse
  if s is None:
    return
  if s.router.key in UNDECODABLE_KEYS:
    raise ValueError(f"the hash key {s.router.key!r} routes on a feature that does not exist "
                     "while decoding (the next token, or a frozen model's prediction of it); "
                     "such models can be scored but not decoded")
  if s.capacity_factor is not None:
    raise ValueError(
        f"SparseConfig.capacity_factor={s.capacity_factor}: in the full pass a token's drop "
        "depends on the tokens before it in the flattened batch (other rows, and later "
        "positions of earlier rows), which a decoding step cannot see; decode the dropless "
        "model, hashmoe.decoding.decoding_model(model) (capacity_factor=None, the same "
        "parameters)")


def check_decode_length(config: TransformerConfig, max_length: int) -> None:
  """Raises ValueError when a decode of `max_length` positions would run past the model's
  positions (`TransformerConfig.max_len`)."""
  if max_length > config.max_len:
    raise ValueError(
        f"a decoding cache of max_length={max_length} positions is longer than the model's "
        f"TransformerConfig.max_len={config.max_len} (its position table); decode at most "
        "max_len positions or train a model with a larger max_len")


class DecodeState(nn.Module):
  """The decoder's own entries in the "cache" collection: `cache_index` int32[] (the position of
  the next token; the rows decode in lockstep) and `previous_token` int32[batch] (the token of the
  previous step, for previous-token and bigram hash keys)."""

  @nn.compact
  def __call__(self, tokens: Array) -> Optional[tuple[Array, Array]]:
    """tokens: int32[batch, length]. Returns None on the call that creates the entries; then
    (the step's position int32[], the previous token int32[batch]) of a one-token step, advancing
    the state."""
    initialized = self.has_variable(CACHE_COLLECTION, "cache_index")
    index = self.variable(CACHE_COLLECTION, "cache_index", lambda: jnp.zeros((), jnp.int32))
    previous = self.variable(CACHE_COLLECTION, "previous_token",
                             lambda: jnp.zeros(tokens.shape[:1], jnp.int32))
    if not initialized:
      return None
    if tokens.shape != (previous.value.shape[0], 1):
      raise ValueError(f"a decoding step takes one token per row, int32[batch, 1] for the "
                       f"cache's batch {previous.value.shape[0]}; got shape {tokens.shape}")
    i = index.value
    before = previous.value
    index.value, previous.value = i + 1, tokens[:, 0]
    return i, before


class _Transformer(nn.Module):
  """Shared pieces: embeddings, layer stacks, output projection."""
  config: TransformerConfig
  hash_tables: Optional[Mapping[str, Any]] = None

  def __post_init__(self):
    # A frozen mapping of tuples keeps the module hashable (jit static args, caches): `HashTable`
    # hashes by content, a plain dict would not hash at all.
    if self.hash_tables is not None:
      if not isinstance(self.hash_tables, Mapping):
        raise TypeError("hash_tables must map a layer name or 'default' to HashTables, got "
                        f"{type(self.hash_tables).__name__}")
      frozen = flax.core.FrozenDict(
          {str(k): _as_tuple(v) for k, v in self.hash_tables.items()})
      object.__setattr__(self, "hash_tables", frozen)
    super().__post_init__()

  def _setup_embeddings(self):
    cfg = self.config
    self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype)
    self.embedding_dropout = nn.Dropout(cfg.dropout_rate)
    if not cfg.share_embeddings:
      init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
      self.logits_kernel = self.param(
          "logits_kernel", nn.with_logical_partitioning(init, ("embed", "vocab")),
          (cfg.d_model, cfg.vocab_size), jnp.float32)

  def _stack(self, prefix: str, cross: bool) -> list[TransformerLayer]:
    """One module per `layer_runs` run of stack `prefix`: a sparse or unscanned layer under its
    own name, a scanned run of dense layers as one layer under `scanned_name` (nn.scan stacks its
    parameters when `_run_stack` calls it)."""
    _check_hash_tables(self.config, self.hash_tables)
    return [_make_layer(self.config, name, sparse, cross, self.hash_tables)
            for name, _, sparse in layer_runs(self.config, prefix)]

  def _run_stack(self, layers: Sequence[TransformerLayer], prefix: str, x: Array,
                 self_mask: Optional[Array], *, encoded: Optional[Array] = None,
                 cross_mask: Optional[Array] = None, features: RouterFeatures,
                 deterministic: bool, decode: bool = False,
                 decode_index: Optional[Array] = None) -> Array:
    """x through the layers `_stack(prefix)` built, scanned runs under `nn.scan`, every layer under
    `config.remat_policy`; with `decode`, through every layer's cache (`_decode_stack`)."""
    if decode:
      return self._decode_stack(layers, prefix, x, self_mask, encoded, cross_mask, features,
                                decode_index)
    runs = layer_runs(self.config, prefix)
    for layer, (_, indices, sparse) in zip(layers, runs):
      if sparse or not self.config.scan_layers:
        call = _layer_call(self.config.remat_policy, in_scan=False)
        x = call(layer, x, self_mask, encoded, cross_mask, features if sparse else None,
                 deterministic)
        continue
      call = _layer_call(self.config.remat_policy, in_scan=True)

      def body(layer, carry, self_mask, encoded, cross_mask, call=call):
        return call(layer, carry, self_mask, encoded, cross_mask, None, deterministic), None

      scan = nn.scan(body, variable_axes={"params": 0},
                     split_rngs={"params": True, "dropout": True},
                     in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=len(indices),
                     metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
      x, _ = scan(layer, x, self_mask, encoded, cross_mask)
    return x

  def _decode_stack(self, layers: Sequence[TransformerLayer], prefix: str, x: Array,
                    self_mask: Optional[Array], encoded: Optional[Array],
                    cross_mask: Optional[Array], features: RouterFeatures,
                    index: Optional[Array]) -> Array:
    """A decode call through the stack: no remat (no backward pass); a scanned run scans its
    caches too, stacked on axis 1 ([batch, layers, max_length, heads, head_dim]) so that every
    cache leaf keeps the batch first, as t5x's decoding expands and reorders them."""
    for layer, (_, indices, sparse) in zip(layers, layer_runs(self.config, prefix)):
      if sparse or not self.config.scan_layers:
        x = layer(x, self_mask, encoded=encoded, cross_mask=cross_mask,
                  features=features if sparse else None, deterministic=True, decode=True,
                  decode_index=index)
        continue

      def body(layer, carry, self_mask, encoded, cross_mask, index):
        return layer(carry, self_mask, encoded=encoded, cross_mask=cross_mask, features=None,
                     deterministic=True, decode=True, decode_index=index), None

      scan = nn.scan(body, variable_axes={"params": 0, CACHE_COLLECTION: 1},
                     split_rngs={"params": True}, in_axes=(nn.broadcast,) * 4,
                     length=len(indices), metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
      x, _ = scan(layer, x, self_mask, encoded, cross_mask, index)
    return x

  def _check_decode(self, deterministic: bool) -> None:
    check_decodable(self.config)
    if not deterministic:
      raise ValueError("cached decoding is evaluation: pass deterministic=True (no dropout, no "
                       "router jitter, BASE's greedy routing)")

  def _decode_features(self, tokens: Array
                       ) -> tuple[Array, RouterFeatures, Optional[Array]]:
    """(positions, router features, the step's position int32[] or None on the call that
    creates the cache) of a decode call's tokens, advancing the decoder's state."""
    cfg = self.config
    state = self.decode_state(tokens)
    if state is None:
      # The call that creates the cache: it is as long as the decode will be.
      check_decode_length(cfg, tokens.shape[1])
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
      index = previous = None
    else:
      index, previous = state
      positions = jnp.full(tokens.shape, index, jnp.int32)
    features = RouterFeatures(token_ids=tokens, positions=positions,
                              valid=jnp.ones(tokens.shape, bool), previous_token_ids=previous)
    return positions, features, index

  def _embed(self, tokens: Array, positions: Array, position_embedder: nn.Module,
             deterministic: bool) -> Array:
    x = self.token_embedder(tokens) + position_embedder(positions)
    x = self.embedding_dropout(x, deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def _logits(self, x: Array) -> Array:
    cfg = self.config
    if cfg.share_embeddings:
      # Unit-variance tied embeddings: scale by d**-0.5 so initial logits have unit variance.
      logits = self.token_embedder.attend(x) / jnp.sqrt(jnp.float32(cfg.d_model))
    else:
      logits = jnp.einsum("bld,dv->blv", x.astype(cfg.compute_dtype),
                          self.logits_kernel.astype(cfg.compute_dtype),
                          preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def _position_embedder(self):
    cfg = self.config
    return PositionEmbed(cfg.max_len, cfg.d_model, kind=cfg.position_embedding,
                         dtype=cfg.compute_dtype)

  def _norm(self):
    return LayerNorm(kind=self.config.norm, dtype=self.config.compute_dtype)


class DecoderLM(_Transformer):
  """Decoder-only language model (the paper's fairseq LM setting, Section 5.3).

  Attributes:
    config: a `TransformerConfig` with `num_encoder_layers == 0`.
    hash_tables: layer name ("decoder_i") or "default" → tuple of `HashTable`; None lets the hash
      router build its own.
  """

  def setup(self):
    cfg = self.config
    if cfg.is_encoder_decoder:
      raise ValueError(f"DecoderLM needs num_encoder_layers == 0, got {cfg.num_encoder_layers}; "
                       "use EncoderDecoder (or build_model) for an encoder-decoder config")
    if cfg.sparse is not None and cfg.sparse.encoder_layers:
      raise ValueError(f"a decoder-only model has no encoder layers, but "
                       f"sparse.encoder_layers={cfg.sparse.encoder_layers}")
    self._setup_embeddings()
    self.position_embedder = self._position_embedder()
    self.decoder_layers = self._stack("decoder", cross=False)
    self.decoder_norm = self._norm()
    self.decode_state = DecodeState()

  def __call__(self, batch: Mapping[str, Array], *, deterministic: bool = True,
               decode: bool = False) -> Array:
    """Next-token logits.

    Args:
      batch: {"decoder_input_tokens": int32[batch, length], optional "decoder_target_tokens",
        "decoder_positions", "decoder_segment_ids", "predicted_ids" of the same shape}.
      deterministic: disables dropout and router jitter.
      decode: one cached decoding step (see the module docstring); only "decoder_input_tokens"
        is read, int32[batch, 1] once the cache exists. Every position is real, as in an
        unpadded full pass.

    Returns:
      float32[batch, length, vocab_size]; position t depends only on inputs at positions <= t of
      its own segment.

    Raises:
      ValueError: an id outside [0, vocab_size) (or a position >= max_len) in a concrete batch.
        Under `jax.jit` the batch is traced and cannot be checked: such an id then gives NaN or
        garbage logits without an error. Check batches on the host first (`validate_batch`, as
        hashmoe's trainer does; hashmoe's seqio tasks also check ids in their pipeline).
    """
    cfg = self.config
    _require(batch, ("decoder_input_tokens",), "DecoderLM")
    validate_batch(batch, cfg.vocab_size, cfg.max_len)
    tokens = jnp.asarray(batch["decoder_input_tokens"], jnp.int32)
    if decode:
      self._check_decode(deterministic)
      if "decoder_segment_ids" in batch:
        raise ValueError("cached decoding decodes one sequence per row; packed rows "
                         "(decoder_segment_ids) cannot be decoded")
      positions, features, index = self._decode_features(tokens)
      mask = None if index is not None else make_causal_mask(tokens.shape[1])
      x = self._embed(tokens, positions, self.position_embedder, True)
      x = self._run_stack(self.decoder_layers, "decoder", x, mask, features=features,
                          deterministic=True, decode=True, decode_index=index)
      return self._logits(self.decoder_norm(x))
    positions = _positions(batch, "decoder", tokens.shape)
    valid = _decoder_valid(batch, tokens)
    segments = _optional(batch, "decoder_segment_ids")
    mask = combine_masks(make_causal_mask(tokens.shape[1]), make_attention_mask(valid, valid),
                         None if segments is None else make_segment_mask(segments, segments))
    features = _decoder_features(batch, tokens, positions, valid)
    x = self._embed(tokens, positions, self.position_embedder, deterministic)
    x = self._run_stack(self.decoder_layers, "decoder", x, mask, features=features,
                        deterministic=deterministic)
    return self._logits(self.decoder_norm(x))


class EncoderDecoder(_Transformer):
  """The paper's main setting (Section 5.1): an encoder over the context, a decoder with
  cross-attention over the response. Sparse layers may sit in either stack; encoder hash keys come
  from `encoder_input_tokens`, decoder keys from `decoder_input_tokens`. Encoder and decoder share
  the token embedding (as ParlAI does); each has its own positions.

  Attributes:
    config: a `TransformerConfig` with `num_encoder_layers > 0`.
    hash_tables: layer name ("encoder_i", "decoder_i") or "default" → tuple of `HashTable`.
  """

  def setup(self):
    cfg = self.config
    if not cfg.is_encoder_decoder:
      raise ValueError("EncoderDecoder needs num_encoder_layers > 0, got 0; use DecoderLM")
    self._setup_embeddings()
    self.encoder_position_embedder = self._position_embedder()
    self.decoder_position_embedder = self._position_embedder()
    self.encoder_layers = self._stack("encoder", cross=False)
    self.encoder_norm = self._norm()
    self.decoder_layers = self._stack("decoder", cross=True)
    self.decoder_norm = self._norm()
    self.decode_state = DecodeState()

  def encode(self, batch: Mapping[str, Array], *, deterministic: bool = True) -> Array:
    """Encoder output dtype[batch, enc_length, d_model] for {"encoder_input_tokens",
    "encoder_positions"?, "encoder_segment_ids"?}."""
    _require(batch, ("encoder_input_tokens",), "EncoderDecoder.encode")
    tokens = jnp.asarray(batch["encoder_input_tokens"], jnp.int32)
    positions = _positions(batch, "encoder", tokens.shape)
    valid = tokens > 0
    segments = _optional(batch, "encoder_segment_ids")
    mask = combine_masks(make_attention_mask(valid, valid),
                         None if segments is None else make_segment_mask(segments, segments))
    features = RouterFeatures(token_ids=tokens, positions=positions, segment_ids=segments,
                              valid=valid, row_routing=_row_routing(batch))
    x = self._embed(tokens, positions, self.encoder_position_embedder, deterministic)
    x = self._run_stack(self.encoder_layers, "encoder", x, mask, features=features,
                        deterministic=deterministic)
    return self.encoder_norm(x)

  def decode(self, encoded: Array, batch: Mapping[str, Array], *,
             deterministic: bool = True, decode: bool = False) -> Array:
    """float32[batch, length, vocab] logits from the encoder output and the decoder features
    (the encoder features are still read for the cross-attention mask).

    With `decode`, one cached decoding step (see the module docstring): only
    "decoder_input_tokens" (int32[batch, 1] once the cache exists) and "encoder_input_tokens"
    are read; every decoder position is real, as in an unpadded full pass.
    """
    _require(batch, ("encoder_input_tokens", "decoder_input_tokens"), "EncoderDecoder.decode")
    tokens = jnp.asarray(batch["decoder_input_tokens"], jnp.int32)
    enc_valid = jnp.asarray(batch["encoder_input_tokens"]) > 0
    if decode:
      self._check_decode(deterministic)
      if "decoder_segment_ids" in batch or "encoder_segment_ids" in batch:
        raise ValueError("cached decoding decodes one sequence per row; packed rows "
                         "(decoder_segment_ids / encoder_segment_ids) cannot be decoded")
      positions, features, index = self._decode_features(tokens)
      self_mask = None if index is not None else make_causal_mask(tokens.shape[1])
      cross_mask = make_attention_mask(jnp.ones(tokens.shape, bool), enc_valid)
      x = self._embed(tokens, positions, self.decoder_position_embedder, True)
      x = self._run_stack(self.decoder_layers, "decoder", x, self_mask, encoded=encoded,
                          cross_mask=cross_mask, features=features, deterministic=True,
                          decode=True, decode_index=index)
      return self._logits(self.decoder_norm(x))
    positions = _positions(batch, "decoder", tokens.shape)
    valid = _decoder_valid(batch, tokens)
    segments = _optional(batch, "decoder_segment_ids")
    enc_segments = _optional(batch, "encoder_segment_ids")
    if (segments is None) != (enc_segments is None):
      raise ValueError("packed encoder-decoder batches need both decoder_segment_ids and "
                       "encoder_segment_ids (or neither)")
    packed = segments is not None
    self_mask = combine_masks(make_causal_mask(tokens.shape[1]), make_attention_mask(valid, valid),
                              make_segment_mask(segments, segments) if packed else None)
    cross_mask = combine_masks(make_attention_mask(valid, enc_valid),
                               make_segment_mask(segments, enc_segments) if packed else None)
    features = _decoder_features(batch, tokens, positions, valid)
    x = self._embed(tokens, positions, self.decoder_position_embedder, deterministic)
    x = self._run_stack(self.decoder_layers, "decoder", x, self_mask, encoded=encoded,
                        cross_mask=cross_mask, features=features, deterministic=deterministic)
    return self._logits(self.decoder_norm(x))

  def __call__(self, batch: Mapping[str, Array], *, deterministic: bool = True,
               decode: bool = False) -> Array:
    """float32[batch, length, vocab_size] logits; see the module docstring for `batch`. With
    `decode`, the encoder runs on the batch and the decoder takes one cached step (`decode`);
    decoding loops encode once and call `decode` instead.

    Raises:
      ValueError: as `DecoderLM.__call__`: checked in concrete batches only, never under `jit`.
    """
    _require(batch, ("encoder_input_tokens", "decoder_input_tokens"), "EncoderDecoder")
    validate_batch(batch, self.config.vocab_size, self.config.max_len)
    encoded = self.encode(batch, deterministic=deterministic)
    return self.decode(encoded, batch, deterministic=deterministic, decode=decode)


def build_model(config: TransformerConfig,
                hash_tables: Optional[Mapping[str, Any]] = None) -> nn.Module:
  """`EncoderDecoder` when `config.num_encoder_layers > 0`, else `DecoderLM`."""
  cls = EncoderDecoder if config.is_encoder_decoder else DecoderLM
  return cls(config, hash_tables)


# --------------------------------------------------------------------------------------------------
# Converting parameters between the unrolled and the scanned layout.


def _stacks(config: TransformerConfig) -> tuple[str, ...]:
  return ("encoder", "decoder") if config.is_encoder_decoder else ("decoder",)


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def _stack_leaves(*leaves: Any) -> Any:
  if _is_box(leaves[0]):
    value = _stack_leaves(*(leaf.value for leaf in leaves))
    return leaves[0].replace(value=value, names=(LAYERS_AXIS,) + tuple(leaves[0].names))
  stack = np.stack if all(isinstance(x, np.ndarray) for x in leaves) else jnp.stack
  return stack(leaves)


def _unstack_leaf(leaf: Any, k: int) -> Any:
  if _is_box(leaf):
    return leaf.replace(value=leaf.value[k], names=tuple(leaf.names)[1:])
  return leaf[k]


def _convert_layers(params: Mapping[str, Any], config: TransformerConfig, *,
                    to_scanned: bool) -> dict[str, Any]:
  scanned = config.replace(scan_layers=True)
  layout, other = ("unrolled", "scanned") if to_scanned else ("scanned", "unrolled")
  out = dict(params)
  for prefix in _stacks(config):
    for name, indices, sparse in layer_runs(scanned, prefix):
      if sparse:
        continue
      unrolled = [f"{prefix}_{i}" for i in indices]
      have, want = ([name], unrolled) if to_scanned else (unrolled, [name])
      missing = [k for k in want if k not in out]
      if missing:
        found = [k for k in have if k in out]
        hint = f"; it holds {found}, the {other} layout already" if found else ""
        raise ValueError(
            f"these parameters are not the {layout} layout (TransformerConfig.scan_layers="
            f"{not to_scanned}) of this config: no {missing}{hint}. Check the config "
            "(num_layers, SparseConfig.layers) and which function you called "
            "(stack_layers: unrolled -> scanned, unstack_layers: scanned -> unrolled)")
      if to_scanned:
        out[name] = jax.tree_util.tree_map(_stack_leaves, *(out.pop(k) for k in unrolled),
                                           is_leaf=_is_box)
      else:
        stacked = out.pop(name)
        for k, layer in enumerate(unrolled):
          out[layer] = jax.tree_util.tree_map(lambda x, k=k: _unstack_leaf(x, k), stacked,
                                              is_leaf=_is_box)
  return out


def stack_layers(params: Mapping[str, Any], config: TransformerConfig) -> dict[str, Any]:
  """Parameters of `config`'s model in the unrolled layout (`scan_layers=False`) → the scanned
  layout (`scan_layers=True`): each run of dense layers "<stack>_<i>" ... stacked along a new
  leading axis into `scanned_name(...)`; sparse layers and everything else unchanged.

  Args:
    params: the "params" collection (layer names at its top level), arrays or flax
      `LogicallyPartitioned` boxes (which gain the "layers" axis name); any tree keyed the same
      way (Adam's moments) converts too.
    config: the model's config (its `scan_layers` value is ignored).

  Returns:
    A new dict; the input is not modified. Values are exact copies (no arithmetic).

  Raises:
    ValueError: `params` is not the unrolled layout of `config`, naming the missing layers.
  """
  return _convert_layers(params, config, to_scanned=True)


def unstack_layers(params: Mapping[str, Any], config: TransformerConfig) -> dict[str, Any]:
  """The inverse of `stack_layers`: scanned layout → unrolled layout."""
  return _convert_layers(params, config, to_scanned=False)


# --------------------------------------------------------------------------------------------------
# Reading back what sparse layers sowed.


def collect_aux(state_or_collection: Mapping[str, Any]) -> tuple[Array, dict[str, dict]]:
  """Sum the sparse layers' aux losses and gather their metrics.

  Args:
    state_or_collection: the mutated state `apply(..., mutable=[MOE_COLLECTION])` returned (or any
      variables dict holding `MOE_COLLECTION`), or that collection itself.

  Returns:
    (total_aux_loss float32[], {layer_name: metrics}). `layer_name` is the path of the module that
    owns the sparse block ("decoder_7", "encoder_0"); each metrics dict also carries that layer's
    "aux_loss". A dense model gives (0.0, {}).
  """
  tree = state_or_collection
  if MOE_COLLECTION in tree:
    tree = tree[MOE_COLLECTION]
  total = jnp.zeros((), jnp.float32)
  metrics: dict[str, dict] = {}

  def walk(node, path):
    nonlocal total
    if not isinstance(node, Mapping):
      return
    if AUX_LOSS_KEY in node:
      aux = jnp.asarray(node[AUX_LOSS_KEY], jnp.float32)
      total = total + aux
      name = "/".join(path[:-1]) if len(path) > 1 else "/".join(path)
      metrics[name] = {**dict(node.get(METRICS_KEY) or {}), AUX_LOSS_KEY: aux}
      return
    for key in node:
      walk(node[key], path + (str(key),))

  walk(tree, ())
  return total, metrics


# --------------------------------------------------------------------------------------------------
# Parameter counts.


def init_batch_spec(config: TransformerConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """The features of a batch that initialises `config`'s model: int32[1, length] each.

  Param shapes do not depend on the batch; a short row keeps init (or its abstract trace) cheap.
  The length is a multiple of the expert count so routers that split tokens evenly (BASE) accept
  it. Fill it with ones (`np.ones(spec.shape, spec.dtype)`) for a concrete init.
  """
  experts = config.sparse.num_experts if config.sparse else 1
  length = min(config.max_len, experts * max(1, math.ceil(8 / experts)))
  spec = jax.ShapeDtypeStruct((1, length), jnp.int32)
  batch = {"decoder_input_tokens": spec, "decoder_target_tokens": spec}
  if config.is_encoder_decoder:
    batch["encoder_input_tokens"] = spec
  if config.sparse is not None and config.sparse.router.key == "predicted_future":
    batch["predicted_ids"] = spec  # the predicted-future hash routes on it even at init
  return batch


def param_counts(config: TransformerConfig,
                 hash_tables: Optional[Mapping[str, Any]] = None) -> dict[str, int]:
  """Total and per-token active parameter counts, from abstract init (`jax.eval_shape`, no FLOPs).

  Active counts what one token's forward pass touches: every dense parameter (embedding tables
  included, as the paper counts them), all router parameters, and of each sparse layer's stacked
  experts only `experts_per_token` experts (one for hash/Switch/BASE; MultiHash's N slices add up to
  one expert; k for hash_topk). Hash tables are data in their own collection and are not counted.

  Returns:
    {"total": int, "active": int, "experts": int (all expert parameters)}.
  """
  model = build_model(config, hash_tables)
  variables = jax.eval_shape(
      lambda key, batch: model.init({"params": key}, batch, deterministic=True),
      jax.random.key(0), init_batch_spec(config))
  per_token = config.sparse.router.experts_per_token if config.sparse else 1
  total = active = experts = 0
  leaves = jax.tree_util.tree_flatten_with_path(
      variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  for path, leaf in leaves:
    names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else None
    shape = (leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf).shape
    size = int(np.prod(shape))
    total += size
    keys = [getattr(p, "key", None) for p in path]
    if "experts" in keys and names is not None and "expert" in names:
      num_experts = shape[names.index("expert")]
      experts += size
      active += size // num_experts * per_token
    else:
      active += size
  return {"total": total, "active": active, "experts": experts}
