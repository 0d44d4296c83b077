"""t5x models around hashmoe's Flax modules (`hashmoe.models.DecoderLM` / `EncoderDecoder`).

`HashMoeDecoderOnlyModel` and `HashMoeEncoderDecoderModel` are t5x's own `DecoderOnlyModel` and
`EncoderDecoderModel` (so t5x's trainer, evaluator, infer and feature converters take them as they
take t5x's models) with the module calls, loss, variables and decoding rewritten for hashmoe:

Loss. t5x's weighted cross-entropy (label smoothing, z-loss, loss normalising factor as configured)
plus the routers' auxiliary losses (Switch's load-balancing loss, router z-loss; 0 for hash layers),
read from the "moe" collection the sparse layers sow into (`hashmoe.models.collect_aux`). hashmoe's
aux losses are per-token quantities meant to be added to the *mean* cross-entropy (hashmoe's own
objective is `mean CE + Σ aux`); t5x's cross-entropy is a sum over target tokens divided by the
loss normalising factor. So the aux loss is added once per weighted target token:

    loss = CE_t5x + Σ_layers aux · (Σ weights) / normaliser          (normaliser 1 when None)

which is hashmoe's objective exactly with `loss_normalizing_factor='NUM_REAL_TARGET_TOKENS'` (what
configs/t5x/ use) and keeps the same balance between the two terms under any other setting. Metrics:
t5x's base metrics with "cross_ent_loss" excluding the aux term, plus "moe/aux_loss" (Σ aux, as
hashmoe reports it) and per sparse layer "moe/<layer>/<metric>" for every scalar router/dispatch
metric (max_over_mean_load, dropped_fraction, router_entropy, balance_loss, ...) and the min/max
of vector ones (expert_load).

Variables. hashmoe's modules annotate parameters with `nn.with_logical_partitioning` boxes; t5x's
train state expects unboxed "params" plus a "params_axes" collection of
`flax.linen.partitioning.AxisMetadata` (`t5x_variables`). The hash tables sit in the routers'
non-trainable "hash_tables" collection; t5x keeps every non-"params" collection as
`flax_mutables`: never given to the optimizer, handed to `loss_fn`/`eval_fn`/`score_batch`/
`predict_batch*` as `flax_mutables`, returned unchanged by `loss_fn` (so the trainer writes back
the same arrays), and saved in and restored from every checkpoint. They are annotated as
replicated ("hash_tables_axes" of None axes). The "moe" collection is per-step output, not state.

Decoding. `tokens_to_logits` runs one cached step (`hashmoe.decoding.decode_step`): each new
token goes through the decoder's key/value cache (flax's "cache" collection, created zeroed by
`hashmoe.decoding.init_cache` for the batch's decoder length), so a token costs the same at every
position instead of a full pass over the prefix. Every t5x decode function works
(`temperature_sample`, `beam_search`: they expand, flatten and reorder the cache's leaves along
their leading batch axis, and leave the `cache_index` leaves alone); the encoder runs once. The
decoder-only model decodes a prompt given by "decoder_causal_attention" (seqio's prefix-LM
features) or from BOS when there is none; the prompt is teacher-forced one cached step per token
(no prefill), so every row is at the same position and the cache index is one scalar. The decoded
model is `hashmoe.decoding.decoding_model`: dropless, as the rules of a cached step require
(`hashmoe.decoding`'s docstring); oracle-future and predicted-future hash keys read features that
do not exist while decoding (the next token; a frozen model's prediction) and are refused.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, MutableMapping, Optional, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import seqio
from clu import metrics as clu_metrics
from flax import traverse_util
from flax.core import scope as flax_scope
from flax.linen import partitioning as flax_partitioning
from flax.training import common_utils
from t5x import decoding
from t5x import losses
from t5x import metrics as metrics_lib
from t5x import models as t5x_models
from t5x import optimizers

from hashmoe import decoding as hashmoe_decoding
from hashmoe import models as hashmoe_models
from hashmoe.layers import MOE_COLLECTION

Array = jax.Array
PyTree = Any
MetricsMap = metrics_lib.MetricsMap
LossNormalizingFactor = Optional[Union[float, int, str, losses.SpecialLossNormalizingFactor]]

PARAMS = "params"
AXES_SUFFIX = "_axes"  # t5x's naming of the axis-metadata collection of a collection
MOE_METRICS_PREFIX = "moe"
# The features hashmoe's modules read (`hashmoe.models`); t5x batches may carry more
# (e.g. "decoder_causal_attention"), which the modules must not see.
_MODEL_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_positions",
                   "decoder_segment_ids", "decoder_loss_weights", "predicted_ids",
                   "encoder_input_tokens", "encoder_positions", "encoder_segment_ids")


def hashmoe_module(config: hashmoe_models.TransformerConfig,
                   hash_tables: Optional[Mapping[str, Any]] = None) -> nn.Module:
  """The hashmoe module of `config` (`hashmoe.models.build_model`) for a t5x model's `module`.

  Args:
    config: the architecture; `num_encoder_layers > 0` gives an `EncoderDecoder`.
    hash_tables: initial tables of the hash layers ({layer or "default": tuple of HashTable},
      e.g. from `hashmoe.t5x.data.hash_tables`), or None for the routers' own random tables.
  """
  return hashmoe_models.build_model(config, hash_tables)


# --------------------------------------------------------------------------------------------------
# Variables: hashmoe's boxed init output -> t5x's layout.


def _axes_of(leaf: Any) -> flax_partitioning.AxisMetadata:
  if isinstance(leaf, nn.LogicallyPartitioned):
    return flax_partitioning.AxisMetadata(names=tuple(leaf.names))
  if isinstance(leaf, flax.core.meta.AxisMetadata):
    raise TypeError(f"parameter boxed in {type(leaf).__name__}; hashmoe modules annotate "
                    "parameters with nn.with_logical_partitioning (logical axis names)")
  return flax_partitioning.AxisMetadata(names=(None,) * jnp.ndim(leaf))


def _with_axes(collection: Mapping[str, Any], replicated: bool) -> tuple[dict, dict]:
  """(unboxed collection, its "<collection>_axes" tree with leaves renamed "<name>_axes")."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(collection))
  values, axes = {}, {}
  for path, leaf in flat.items():
    values[path] = nn.unbox(leaf)
    names = (flax_partitioning.AxisMetadata(names=(None,) * jnp.ndim(values[path]))
             if replicated else _axes_of(leaf))
    axes[path[:-1] + (path[-1] + AXES_SUFFIX,)] = names
  return traverse_util.unflatten_dict(values), traverse_util.unflatten_dict(axes)


def t5x_variables(variables: Mapping[str, Any]) -> flax_scope.FrozenVariableDict:
  """hashmoe `Module.init` output in the layout t5x's train state takes.

  Args:
    variables: {"params": boxed parameters, "hash_tables"?: tables, "moe"?: sown outputs}.

  Returns:
    FrozenDict {"params": unboxed parameters, "params_axes": their logical axis names (t5x's
    `AxisMetadata`, one "<name>_axes" leaf per parameter), and for every other state collection
    (the hash tables) the collection and "<collection>_axes" with replicated (None) axes}. The
    sown "moe" collection (per-step aux losses and metrics) is dropped.
  """
  if PARAMS not in variables:
    raise ValueError(f"variables have collections {sorted(variables)}, expected {PARAMS!r}")
  out = {}
  out[PARAMS], out[PARAMS + AXES_SUFFIX] = _with_axes(variables[PARAMS], replicated=False)
  for name, collection in variables.items():
    if name in (PARAMS, MOE_COLLECTION):
      continue
    if name.endswith(AXES_SUFFIX):
      raise ValueError(f"collection {name!r} would clash with t5x's axis-metadata naming")
    out[name], out[name + AXES_SUFFIX] = _with_axes(collection, replicated=True)
  return flax.core.freeze(out)


# --------------------------------------------------------------------------------------------------
# Metrics.


def moe_metrics(aux_loss: Array, layers: Mapping[str, Mapping[str, Array]]) -> MetricsMap:
  """t5x metrics of the sparse layers (`hashmoe.models.collect_aux` output).

  Returns:
    {"moe/aux_loss": Σ aux losses, "moe/<layer>/<metric>": each scalar metric,
     "moe/<layer>/<metric>_min" / "_max": each vector metric (e.g. per-expert load)}, all
    `AveragePerStep` (averaged over the steps of a summary period).
  """
  metrics = {f"{MOE_METRICS_PREFIX}/aux_loss":
             metrics_lib.AveragePerStep(total=jnp.asarray(aux_loss, jnp.float32))}
  for layer, values in layers.items():
    for name, value in values.items():
      value = jnp.asarray(value, jnp.float32)
      prefix = f"{MOE_METRICS_PREFIX}/{layer}/{name}"
      if value.ndim == 0:
        metrics[prefix] = metrics_lib.AveragePerStep(total=value)
      else:
        metrics[prefix + "_min"] = metrics_lib.AveragePerStep(total=jnp.min(value))
        metrics[prefix + "_max"] = metrics_lib.AveragePerStep(total=jnp.max(value))
  return metrics


# --------------------------------------------------------------------------------------------------
# The models.


def _check_module(module: nn.Module, encoder_decoder: bool, model_name: str,
                  vocabularies: Tuple[seqio.Vocabulary, ...]) -> None:
  expected = hashmoe_models.EncoderDecoder if encoder_decoder else hashmoe_models.DecoderLM
  if not isinstance(module, expected):
    config = getattr(module, "config", None)
    hint = ""
    if isinstance(config, hashmoe_models.TransformerConfig):
      other = "HashMoeEncoderDecoderModel" if config.is_encoder_decoder else "HashMoeDecoderOnlyModel"
      hint = (f" (its config has num_encoder_layers={config.num_encoder_layers}: use {other}, or "
              "check which task file set TransformerConfig.num_encoder_layers)")
    raise TypeError(f"{model_name} wraps a hashmoe.models.{expected.__name__}, got "
                    f"{type(module).__name__}{hint}")
  for vocabulary in vocabularies:
    if vocabulary.vocab_size > module.config.vocab_size:
      raise ValueError(f"the vocabulary has {vocabulary.vocab_size} ids but the model's "
                       f"TransformerConfig.vocab_size is {module.config.vocab_size}")


class _HashMoeModelMixin:
  """What both model classes share; mixed in before t5x's `DecoderOnlyModel`/`EncoderDecoderModel`.

  t5x calls the methods with `flax_mutables` exactly when its train state holds non-"params"
  collections (hash models); without them (dense and Switch models) every method takes the
  t5x signature without it.
  """
  module: nn.Module
  _label_smoothing: float
  _z_loss: float
  _loss_normalizing_factor: LossNormalizingFactor

  # -- variables ---------------------------------------------------------------------------------

  def _init_batch(self, input_shapes: Mapping[str, Any]) -> dict[str, Array]:
    features = ["decoder_input_tokens", "decoder_target_tokens"]
    if self.module.config.is_encoder_decoder:
      features.append("encoder_input_tokens")
    missing = [f for f in features if f not in input_shapes]
    if missing:
      raise ValueError(f"input_shapes lacks {missing}; got {sorted(input_shapes)}")
    # Ones: valid token ids, positions within max_len. Parameters do not depend on the batch; the
    # shapes are t5x's, as t5x's own models initialise.
    batch = {f: jnp.ones(tuple(input_shapes[f]), jnp.int32) for f in features}
    sparse = self.module.config.sparse
    if sparse is not None and sparse.router.key == "predicted_future":
      batch["predicted_ids"] = jnp.ones(tuple(input_shapes["decoder_input_tokens"]), jnp.int32)
    return batch

  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, Any],
                            input_types: Optional[Mapping[str, jnp.dtype]] = None
                            ) -> flax_scope.FrozenVariableDict:
    """`t5x_variables` of the module initialised on a batch of `input_shapes` (ids are int32
    whatever `input_types` says: hashmoe's embeddings gather by id)."""
    del input_types
    variables = self.module.init({PARAMS: rng}, self._init_batch(input_shapes),
                                 deterministic=True)
    return t5x_variables(variables)

  # -- forward -----------------------------------------------------------------------------------

  def _variables(self, params: PyTree, flax_mutables: Optional[Mapping[str, Any]]) -> dict:
    return {PARAMS: params, **(flax.core.unfreeze(flax_mutables) if flax_mutables else {})}

  def _forward(self, params: PyTree, batch: Mapping[str, Array], dropout_rng: Optional[Array],
               flax_mutables: Optional[Mapping[str, Any]]) -> tuple[Array, Array, dict]:
    """(logits float32[batch, length, vocab], Σ aux loss float32[], {layer: metrics})."""
    logits, state = self._compute_logits(params, batch, dropout_rng, mutable=[MOE_COLLECTION],
                                         other_variables=flax_mutables)
    aux_loss, layers = hashmoe_models.collect_aux(state)
    return logits, aux_loss, layers

  def _compute_logits(self, params: PyTree, batch: Mapping[str, Array],
                      dropout_rng: Optional[Array] = None,
                      mutable: flax_scope.CollectionFilter = False,
                      other_variables: Optional[PyTree] = None
                      ) -> Union[Array, Tuple[Array, flax_scope.FrozenVariableDict]]:
    """t5x's `_compute_logits` contract: logits float32[batch, length, vocab], or (logits, the
    mutated collections) when `mutable` names some. `other_variables` are the state collections
    (t5x's flax_mutables); `dropout_rng` None is deterministic (no dropout, no router jitter)."""
    rngs = None
    if dropout_rng is not None:
      dropout, jitter = jax.random.split(dropout_rng)
      rngs = {"dropout": dropout, "jitter": jitter}
    # With "moe" immutable the sparse layers' `sow` is a no-op, so plain logits come back.
    return self.module.apply(self._variables(params, other_variables),
                             {k: v for k, v in batch.items() if k in _MODEL_FEATURES},
                             deterministic=dropout_rng is None, rngs=rngs, mutable=mutable)

  # -- loss --------------------------------------------------------------------------------------

  def _loss_and_metrics(self, params: PyTree, batch: Mapping[str, Array],
                        dropout_rng: Optional[Array],
                        flax_mutables: Optional[Mapping[str, Any]]) -> tuple[Array, MetricsMap]:
    logits, aux_loss, layers = self._forward(params, batch, dropout_rng, flax_mutables)
    normaliser, weights = losses.get_loss_normalizing_factor_and_weights(
        self._loss_normalizing_factor, batch)
    targets = batch["decoder_target_tokens"]
    ce_loss, z_loss, weight_sum = losses.compute_weighted_cross_entropy(
        logits, targets=targets, weights=weights, label_smoothing=self._label_smoothing,
        z_loss=self._z_loss, loss_normalizing_factor=normaliser)
    # The aux loss once per weighted target token (see the module docstring).
    aux_term = aux_loss * weight_sum / (1.0 if normaliser is None else normaliser)
    loss = ce_loss + aux_term
    segment_ids = {k[:-len("_segment_ids")]: v for k, v in batch.items()
                   if k.endswith("_segment_ids")}
    if not segment_ids:
      segment_ids = {k: v != 0 for k, v in batch.items()
                     if k in ("encoder_input_tokens", "decoder_target_tokens")}
    metrics = self._compute_metrics(logits=logits, targets=targets, mask=weights, loss=loss,
                                    z_loss=z_loss, segment_ids=segment_ids)
    cross_ent = ce_loss - z_loss
    metrics["cross_ent_loss"] = metrics_lib.AveragePerStep(total=cross_ent)
    metrics["cross_ent_loss_per_all_target_tokens"] = clu_metrics.Average(
        total=jnp.sum(cross_ent), count=jnp.array(targets.size))
    metrics.update(moe_metrics(aux_loss, layers))
    return loss, metrics

  def loss_fn(self, params: PyTree, batch: Mapping[str, Array], dropout_rng: Optional[Array],
              flax_mutables: Optional[Mapping[str, Any]] = None
              ) -> Union[Tuple[Array, MetricsMap], Tuple[Array, Tuple[MetricsMap, Any]]]:
    """Cross-entropy + routers' aux losses (see the module docstring).

    Args:
      params: the parameters.
      batch: t5x's features, int32[batch, length] each.
      dropout_rng: key for dropout and router jitter; None is deterministic.
      flax_mutables: the state collections (hash tables) when the train state has them.

    Returns:
      (loss float32[], metrics), or (loss, (metrics, flax_mutables)) when `flax_mutables` is
      given (t5x's contract for models with mutable state). The collections come back unchanged:
      hash tables are data, never updated by training.
    """
    loss, metrics = self._loss_and_metrics(params, batch, dropout_rng, flax_mutables)
    if flax_mutables is None:
      return loss, metrics
    return loss, (metrics, flax_mutables)

  def eval_fn(self, params: PyTree, batch: Mapping[str, Array],
              flax_mutables: Optional[Mapping[str, Any]] = None) -> Tuple[Array, MetricsMap]:
    """`loss_fn` without dropout or jitter; (loss, metrics)."""
    return self._loss_and_metrics(params, batch, None, flax_mutables)

  # -- scoring -----------------------------------------------------------------------------------

  def score_batch(self, params: PyTree, batch: Mapping[str, Array],
                  return_intermediates: bool = False,
                  flax_mutables: Optional[Mapping[str, Any]] = None
                  ) -> Union[Array, Tuple[Array, Mapping[str, Any]]]:
    """Log-likelihood of the targets: float32[batch], Σ_t weight_t · log p(target_t | ...).

    With `return_intermediates`, also {"decoder": {"target_tokens", "loss_weights",
    "token_scores"}} (per-token arrays [batch, length], as singleton tuples like t5x's models).
    """
    logits, _, _ = self._forward(params, batch, None, flax_mutables)
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    if weights is None:
      weights = (targets > 0).astype(jnp.float32)
    token_scores = -losses.cross_entropy_with_logits(
        logits, common_utils.onehot(targets, logits.shape[-1], on_value=1, off_value=0),
        z_loss=0.0)[0] * weights
    scores = token_scores.sum(-1)
    if not return_intermediates:
      return scores
    return scores, {"decoder": {"target_tokens": (targets,), "loss_weights": (weights,),
                                "token_scores": (token_scores,)}}

  # -- decoding ----------------------------------------------------------------------------------

  def _decoding_module(self) -> nn.Module:
    """The module a decode runs (`hashmoe.decoding.decoding_model`), or a ValueError naming the
    setting that cannot decode (an oracle/predicted-future hash key)."""
    return hashmoe_decoding.decoding_model(self.module)

  def _decode(self, prompt: Array, cache: Mapping[str, Any], tokens_to_logits: Callable,
              rng: Optional[Array], num_decodes: int, return_all_decodes: bool,
              decoder_params: Optional[MutableMapping[str, Any]]) -> tuple[Array, dict[str, Array]]:
    decoder_params = dict(decoder_params or {})
    if rng is not None:
      if decoder_params.get("decode_rng") is not None:
        raise ValueError("got an RNG both as `rng` and as decoder_params['decode_rng']; give one")
      decoder_params["decode_rng"] = rng
    if decoder_params.get("initial_index") is not None:
      raise ValueError("decoder_params['initial_index'] would start decoding past a prompt that "
                       "was never fed to the cache; hashmoe feeds the prompt one cached step per "
                       "token (give it in the inputs instead)")
    decoder_params.setdefault("eos_id", self.output_vocabulary.eos_id or 1)
    # Every cache leaf has the batch first (scanned runs stack their caches on axis 1), so t5x's
    # cache_offset is 0.
    decodes, scores = self._decode_fn(inputs=prompt, cache=cache,
                                      tokens_to_logits=tokens_to_logits,
                                      num_decodes=num_decodes, cache_offset=0, **decoder_params)
    if return_all_decodes:
      return decodes, {"scores": scores}
    return decodes[:, -1, :], {"scores": scores[:, -1]}

  def predict_batch(self, params: PyTree, batch: Mapping[str, Array],
                    rng: Optional[Array] = None,
                    flax_mutables: Optional[Mapping[str, Any]] = None) -> Array:
    """The decoded sequences of `predict_batch_with_aux`."""
    return self.predict_batch_with_aux(params, batch, rng=rng, flax_mutables=flax_mutables)[0]


class HashMoeDecoderOnlyModel(_HashMoeModelMixin, t5x_models.DecoderOnlyModel):
  """t5x's `DecoderOnlyModel` over a `hashmoe.models.DecoderLM` (see the module docstring).

  Args:
    module: a `DecoderLM` (`hashmoe_module` of a config with num_encoder_layers == 0).
    vocabulary: the task's vocabulary (at most `module.config.vocab_size` ids).
    optimizer_def: t5x optimizer (e.g. `optimizers.OptaxWrapper`).
    decode_fn: t5x decoding function (`decoding.temperature_sample` by default).
    feature_converter_cls: seqio feature converter (default `seqio.DecoderFeatureConverter`).
    label_smoothing, z_loss, loss_normalizing_factor: t5x's cross-entropy settings.
  """

  def __init__(self, module: nn.Module, vocabulary: seqio.Vocabulary,
               optimizer_def: optimizers.OptimizerDefType,
               decode_fn: t5x_models.DecodeFnCallable = decoding.temperature_sample,
               feature_converter_cls: Optional[Callable[..., seqio.FeatureConverter]] = None,
               label_smoothing: float = 0.0, z_loss: float = 0.0,
               loss_normalizing_factor: LossNormalizingFactor = None):
    _check_module(module, False, type(self).__name__, (vocabulary,))
    # hashmoe's decoder is fully causal: no prefix-LM bidirectional attention.
    super().__init__(module=module, vocabulary=vocabulary, optimizer_def=optimizer_def,
                     decode_fn=decode_fn, inputs_bidirectional_attention=False,
                     feature_converter_cls=feature_converter_cls, label_smoothing=label_smoothing,
                     z_loss=z_loss, loss_normalizing_factor=loss_normalizing_factor)

  def predict_batch_with_aux(self, params: PyTree, batch: Mapping[str, Array],
                             rng: Optional[Array] = None,
                             flax_mutables: Optional[Mapping[str, Any]] = None, *,
                             return_all_decodes: bool = False, num_decodes: int = 1,
                             decoder_params: Optional[MutableMapping[str, Any]] = None
                             ) -> Tuple[Array, Mapping[str, Array]]:
    """Decodes continuations with `decode_fn`.

    With "decoder_causal_attention" in the batch (seqio's features for inputs + targets), the
    inputs are the prompt (teacher-forced) and decoding starts after them, as in t5x's
    `DecoderOnlyModel`; the returned sequences have the prompt removed. Without it, decoding
    starts from BOS.

    Returns:
      (int32[batch, length] decodes, {"scores": float32[batch]}), or with `return_all_decodes`
      ([batch, num_decodes, length], {"scores": [batch, num_decodes]}), decodes sorted by
      increasing score.
    """
    module = self._decoding_module()
    tokens = batch["decoder_input_tokens"]
    if "decoder_causal_attention" in batch:
      prompt = tokens * batch["decoder_causal_attention"]
      # Index of the last prompt token (position 0 is BOS): the prompt's length, removed from
      # the decodes below.
      prompt_length = jnp.sum(prompt[:, 1:] != 0, axis=-1)
    else:
      prompt, prompt_length = jnp.zeros_like(tokens), None
    variables = self._variables(params, flax_mutables)
    cache = hashmoe_decoding.init_cache(module, variables, *tokens.shape)

    def tokens_to_logits(state: decoding.DecodingState) -> tuple[Array, Any]:
      return hashmoe_decoding.decode_step(module, variables, state.cache, state.cur_token)

    decodes, aux = self._decode(prompt, cache, tokens_to_logits, rng, num_decodes,
                                return_all_decodes, decoder_params)
    if prompt_length is not None:
      decodes = t5x_models.remove_prefix(decodes, prompt_length)
    return decodes, aux


class HashMoeEncoderDecoderModel(_HashMoeModelMixin, t5x_models.EncoderDecoderModel):
  """t5x's `EncoderDecoderModel` over a `hashmoe.models.EncoderDecoder` (see the module docstring).

  Args:
    module: an `EncoderDecoder` (`hashmoe_module` of a config with num_encoder_layers > 0).
    input_vocabulary, output_vocabulary: the task's "inputs" and "targets" vocabularies.
    optimizer_def: t5x optimizer.
    decode_fn: t5x decoding function (`decoding.beam_search` by default).
    feature_converter_cls: seqio feature converter (default `seqio.EncDecFeatureConverter`).
    label_smoothing, z_loss, loss_normalizing_factor: t5x's cross-entropy settings.
    default_decoder_params: t5x's defaults for `num_decodes` / `return_all_decodes`.
  """

  def __init__(self, module: nn.Module, input_vocabulary: seqio.Vocabulary,
               output_vocabulary: seqio.Vocabulary, optimizer_def: optimizers.OptimizerDefType,
               decode_fn: t5x_models.DecodeFnCallable = decoding.beam_search,
               feature_converter_cls: Optional[Callable[..., seqio.FeatureConverter]] = None,
               label_smoothing: float = 0.0, z_loss: float = 0.0,
               loss_normalizing_factor: LossNormalizingFactor = None,
               default_decoder_params: Optional[t5x_models.DecoderParams] = None):
    _check_module(module, True, type(self).__name__, (input_vocabulary, output_vocabulary))
    super().__init__(module=module, input_vocabulary=input_vocabulary,
                     output_vocabulary=output_vocabulary, optimizer_def=optimizer_def,
                     decode_fn=decode_fn, feature_converter_cls=feature_converter_cls,
                     label_smoothing=label_smoothing, z_loss=z_loss,
                     loss_normalizing_factor=loss_normalizing_factor,
                     default_decoder_params=default_decoder_params)

  def predict_batch_with_aux(self, params: PyTree, batch: Mapping[str, Array],
                             rng: Optional[Array] = None,
                             flax_mutables: Optional[Mapping[str, Any]] = None,
                             decoder_params: Optional[MutableMapping[str, Any]] = None,
                             return_all_decodes: Optional[bool] = None,
                             num_decodes: Optional[int] = None,
                             prompt_with_targets: bool = False
                             ) -> Tuple[Array, Mapping[str, Array]]:
    """Decodes targets for the batch's inputs with `decode_fn` (beam search by default).

    The encoder runs once; each decoding step is one cached decoder step. `prompt_with_targets`
    teacher-forces the batch's decoder inputs (EOS removed), one cached step per token, as t5x's
    `EncoderDecoderModel` does without prefilling.

    Returns:
      (int32[batch, length], {"scores": float32[batch]}), or with `return_all_decodes`
      ([batch, num_decodes, length], {"scores": [batch, num_decodes]}).
    """
    module = self._decoding_module()
    if return_all_decodes is None:
      return_all_decodes = self._default_decoder_params.return_all_decodes
    if num_decodes is None:
      num_decodes = self._default_decoder_params.num_decodes
    tokens = batch["decoder_input_tokens"]
    if prompt_with_targets:
      prompt = tokens * (tokens != self.output_vocabulary.eos_id)
    else:
      prompt = jnp.zeros_like(tokens)
    variables = self._variables(params, flax_mutables)
    encoder_batch = {k: v for k, v in batch.items() if k.startswith("encoder_")}
    encoded, _ = module.apply(variables, encoder_batch, deterministic=True,
                              mutable=[MOE_COLLECTION], method=module.encode)
    # Decodes of one example are adjacent rows (t5x's flat batch-beam layout); the decode
    # function expands the cache the same way.
    expand = functools.partial(decoding.flat_batch_beam_expand, beam_size=num_decodes)
    encoded = expand(encoded)
    encoder_tokens = expand(batch["encoder_input_tokens"])
    cache = hashmoe_decoding.init_cache(module, variables, *tokens.shape)

    def tokens_to_logits(state: decoding.DecodingState) -> tuple[Array, Any]:
      return hashmoe_decoding.decode_step(module, variables, state.cache, state.cur_token,
                                          encoded=encoded, encoder_input_tokens=encoder_tokens)

    return self._decode(prompt, cache, tokens_to_logits, rng, num_decodes, return_all_decodes,
                        decoder_params)
