"""Cached decoding of hashmoe's models: the cache, one step, and greedy / temperature loops.

A decoding step feeds one token per row through the decoder's key/value cache (flax's "cache"
collection, `hashmoe.models` module docstring) and costs the same at every position, where the
full pass over the prefix that the uncached loop runs costs more the longer the prefix
(benchmarks/decode.py, docs/PERFORMANCE.md). A step equals row t of the full pass over the prefix,
router by router:

  hash          the expert is a function of the token id (and of the previous token for the
                prev_token / bigram keys, which the cache keeps; the position for the position key,
                which is the step index). Oracle-future and predicted-future keys read the next
                token, which a decoder does not have: refused.
  Switch, top-k a function of the token's own hidden state (or token id), as in the full pass.
  BASE          evaluation routes greedily to argmax_e h·w_e (BASE layers' test-time rule), a
                function of the token alone; the balanced assignment is training only.

Capacity. With `SparseConfig.capacity_factor` the full pass drops tokens in GShard's order over the
flattened batch: a token's fate depends on every earlier row (including its padding and positions
after the one decoded) and on the batch size, so no step that sees one token per row can
reproduce it, and the full pass itself is not causal across rows. Decoding therefore runs the
dropless model (`decoding_model`: capacity_factor=None, the same parameters): it equals the full
pass of that dropless model, and the full pass with drops wherever that pass drops nothing.

Scanned layers (`TransformerConfig.scan_layers`) decode too: a scanned run scans its caches
along with its parameters, stacked on axis 1 so that every cache leaf keeps the batch first.

Usage:

  model = decoding_model(model)
  cache = init_cache(model, variables, batch_size, max_length)
  logits, cache = decode_step(model, variables, cache, tokens)     # tokens int32[batch, 1]
  sequences, step_logits = sample(model, variables, prompt)       # greedy; temperature, rng
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from hashmoe import models as models_lib
from hashmoe.models import CACHE_COLLECTION

Array = jax.Array


def decoding_config(config: models_lib.TransformerConfig) -> models_lib.TransformerConfig:
  """`config` as it decodes: dropless (capacity_factor=None; see the module docstring).

  Raises:
    ValueError: a config that cannot decode (an oracle/predicted-future hash key), naming the
      setting (`hashmoe.models.check_decodable`).
  """
  s = config.sparse
  if s is not None and s.capacity_factor is not None:
    config = config.replace(sparse=dataclasses.replace(s, capacity_factor=None))
  models_lib.check_decodable(config)
  return config


def decoding_model(model: nn.Module) -> nn.Module:
  """The same model (its parameters and hash tables fit unchanged) with `decoding_config`."""
  config = decoding_config(model.config)
  return model if config is model.config else model.clone(config=config)


def _without_cache(variables: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in flax.core.unfreeze(variables).items() if k != CACHE_COLLECTION}


def init_cache(model: nn.Module, variables: Mapping[str, Any], batch_size: int,
               max_length: int) -> dict[str, Any]:
  """A zeroed cache for `batch_size` rows of `max_length` positions (nothing is computed: the
  shapes come from an abstract decode call).

  Args:
    model: a `DecoderLM` or `EncoderDecoder` that decodes (`decoding_model`).
    variables: its variables ("params", and "hash_tables" for hash models).
    batch_size: rows decoded together.
    max_length: positions of the cache: the longest sequence decoded, BOS included.

  Returns:
    The "cache" collection: per decoder layer `cached_key` / `cached_value`
    [batch, max_length, heads, head_dim] ([batch, layers, max_length, heads, head_dim] for a
    scanned run), and the decoder's `decode_state`: `cache_index` int32[] (the position of the
    next step) and `previous_token` int32[batch].

  Raises:
    ValueError: max_length beyond `TransformerConfig.max_len`, or a model that cannot decode.
  """
  config = model.config
  models_lib.check_decodable(config)
  models_lib.check_decode_length(config, max_length)
  if batch_size < 1 or max_length < 1:
    raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
  tokens = jax.ShapeDtypeStruct((batch_size, max_length), jnp.int32)

  def create(variables):
    if config.is_encoder_decoder:
      encoded = jnp.zeros((batch_size, 1, config.d_model), config.compute_dtype)
      batch = {"encoder_input_tokens": jnp.ones((batch_size, 1), jnp.int32),
               "decoder_input_tokens": jnp.ones(tokens.shape, jnp.int32)}
      _, state = model.apply(variables, encoded, batch, decode=True,
                             mutable=[CACHE_COLLECTION], method=model.decode)
    else:
      _, state = model.apply(variables, {"decoder_input_tokens": jnp.ones(tokens.shape, jnp.int32)},
                             decode=True, mutable=[CACHE_COLLECTION])
    return state[CACHE_COLLECTION]

  shapes = jax.eval_shape(create, _without_cache(variables))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), flax.core.unfreeze(shapes))


def decode_step(model: nn.Module, variables: Mapping[str, Any], cache: Mapping[str, Any],
                tokens: Array, *, encoded: Optional[Array] = None,
                encoder_input_tokens: Optional[Array] = None) -> tuple[Array, dict[str, Any]]:
  """One cached step: float32[batch, vocab] logits of the next token after `tokens`
  (int32[batch, 1], the token at the cache's index) and the advanced cache.

  The encoder-decoder needs `encoded` ([batch, enc_length, d_model], `EncoderDecoder.encode`) and
  `encoder_input_tokens` (int32[batch, enc_length], for the cross-attention's padding mask).
  """
  state = {**_without_cache(variables), CACHE_COLLECTION: cache}
  if model.config.is_encoder_decoder:
    if encoded is None or encoder_input_tokens is None:
      raise ValueError("an encoder-decoder step needs `encoded` and `encoder_input_tokens`")
    logits, new = model.apply(
        state, encoded, {"encoder_input_tokens": encoder_input_tokens,
                         "decoder_input_tokens": tokens},
        decode=True, mutable=[CACHE_COLLECTION], method=model.decode)
  else:
    logits, new = model.apply(state, {"decoder_input_tokens": tokens}, decode=True,
                              mutable=[CACHE_COLLECTION])
  return logits[:, 0], new[CACHE_COLLECTION]


def full_pass_logits(model: nn.Module, variables: Mapping[str, Any], sequences: Array,
                     index: Array, *, encoded: Optional[Array] = None,
                     encoder_input_tokens: Optional[Array] = None) -> Array:
  """The uncached reference: float32[batch, vocab] logits at `index` of the full forward pass over
  `sequences` (int32[batch, length]; what follows `index` does not reach it through the causal
  mask), the model exactly as it trains and evaluates."""
  state = _without_cache(variables)
  if model.config.is_encoder_decoder:
    logits = model.apply(state, encoded, {"encoder_input_tokens": encoder_input_tokens,
                                          "decoder_input_tokens": sequences},
                         method=model.decode)
  else:
    logits = model.apply(state, {"decoder_input_tokens": sequences})
  return jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False)


@functools.partial(jax.jit, static_argnames=("model", "temperature", "cached"))
def _sample(model, variables, prompt, encoder_input_tokens, rng, *, temperature, cached):
  batch, length = prompt.shape
  encoded = None
  if model.config.is_encoder_decoder:
    encoded = model.apply(_without_cache(variables), {"encoder_input_tokens": encoder_input_tokens},
                          method=model.encode)
  cache = init_cache(model, variables, batch, length) if cached else {}

  def body(t, carry):
    sequences, cache, step_logits = carry
    if cached:
      token = jax.lax.dynamic_slice_in_dim(sequences, t, 1, axis=1)
      logits, cache = decode_step(model, variables, cache, token, encoded=encoded,
                                  encoder_input_tokens=encoder_input_tokens)
    else:
      logits = full_pass_logits(model, variables, sequences, t, encoded=encoded,
                                encoder_input_tokens=encoder_input_tokens)
    if temperature == 0.0:
      chosen = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      chosen = jax.random.categorical(jax.random.fold_in(rng, t), logits / temperature, axis=-1)
    forced = jax.lax.dynamic_index_in_dim(prompt, t + 1, axis=1, keepdims=False)
    chosen = jnp.where(forced != 0, forced, chosen.astype(jnp.int32))
    sequences = jax.lax.dynamic_update_index_in_dim(sequences, chosen, t + 1, axis=1)
    step_logits = jax.lax.dynamic_update_index_in_dim(step_logits, logits, t, axis=1)
    return sequences, cache, step_logits

  step_logits = jnp.zeros((batch, length - 1, model.config.vocab_size), jnp.float32)
  sequences, _, step_logits = jax.lax.fori_loop(0, length - 1, body,
                                                (prompt, cache, step_logits))
  return sequences, step_logits


def sample(model: nn.Module, variables: Mapping[str, Any], prompt: Array, *,
           encoder_input_tokens: Optional[Array] = None, temperature: float = 0.0,
           rng: Optional[Array] = None, cached: bool = True) -> tuple[Array, Array]:
  """Decodes every row to the prompt's length: greedy (temperature 0) or sampled.

  Each step t feeds token t and picks token t + 1: the prompt's token where it is nonzero
  (teacher forcing, t5x's convention), else argmax of the logits (temperature 0) or a draw from
  softmax(logits / temperature) with key `fold_in(rng, t)`, the same in both modes, so cached and
  uncached decoding draw the same tokens from the same logits. There is no early stop at EOS:
  every row runs to the end (truncate after EOS when reading the result).

  Args:
    model: a `DecoderLM` or `EncoderDecoder`.
    variables: its variables.
    prompt: int32[batch, length]; column 0 is BOS (0), nonzero entries after it are forced, zeros
      are decoded. `length` is the cache's length (at most `TransformerConfig.max_len`).
    encoder_input_tokens: int32[batch, enc_length], required by the encoder-decoder.
    temperature: 0 is greedy.
    rng: key for temperature > 0.
    cached: True decodes through the key/value cache (`decoding_model(model)`); False reruns the
      full forward pass of `model` itself over the prefix at every step (the O(L^2) reference).

  Returns:
    (int32[batch, length] sequences with the BOS column, float32[batch, length - 1, vocab] the
    logits of every step: step_logits[:, t] predicts sequences[:, t + 1]).
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 2:
    raise ValueError(f"prompt must be int32[batch, length >= 2], got shape {prompt.shape}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling with temperature > 0 needs an rng")
  if model.config.is_encoder_decoder and encoder_input_tokens is None:
    raise ValueError("the encoder-decoder decodes from encoder_input_tokens; got None")
  models_lib.check_decode_length(model.config, prompt.shape[1])
  if cached:
    model = decoding_model(model)
  if rng is None:
    rng = jax.random.key(0)
  if encoder_input_tokens is not None:
    encoder_input_tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
  return _sample(model, _without_cache(variables), prompt, encoder_input_tokens, rng,
                 temperature=float(temperature), cached=cached)
