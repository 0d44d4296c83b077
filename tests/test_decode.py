"""Cached decoding (hashmoe.decoding, the models' decode mode, the t5x adapter's predict_batch).

The reference is the uncached model: the full forward pass over the sequence, as the model trains
and evaluates, never the cache code. Because the full pass is causal (dropless routing), its logits
at position t are those of the uncached decoding step t over the prefix, so one full pass over the
cached decode's final sequences checks every step's logits, and greedy tokens equal to the
argmax of those logits prove cached == uncached decoding token for token by induction. The uncached
loop itself (`sample(cached=False)`: a full pass per step) is run for temperature sampling with a
fixed rng. A model with a capacity factor decodes dropless; its reference is the full pass of the
same parameters with capacity_factor=None. The t5x tests (skipped without t5x) compare
predict_batch's beam search and temperature sampling through the cache with the same t5x decode
functions over a cache-less tokens_to_logits that reruns the full pass.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hashmoe import decoding, hashing, models, routers

pytestmark = pytest.mark.usefixtures("compilation_cache")

ROOT = Path(__file__).resolve().parents[1]
V, E = 64, 4
B, L = 3, 12


def config(router=None, *, encoder_decoder=False, capacity_factor=None, **overrides):
  sparse = None
  if router is not None:
    sparse = models.SparseConfig(router=router, num_experts=E, layers=(1,),
                                 capacity_factor=capacity_factor)
  return models.tiny_config(V, num_encoder_layers=2 if encoder_decoder else 0, sparse=sparse,
                            max_len=16, **overrides)


def init(cfg, seed=0):
  model = models.build_model(cfg)
  batch = {"decoder_input_tokens": np.ones((1, 8), np.int32),
           "decoder_target_tokens": np.ones((1, 8), np.int32)}
  if cfg.is_encoder_decoder:
    batch["encoder_input_tokens"] = np.ones((1, 8), np.int32)
  return model, model.init(jax.random.key(seed), batch)


def prompt(seed=0):
  """BOS, then prompts of 0, 2 and 5 forced tokens; the rest is decoded."""
  rng = np.random.default_rng(seed)
  out = np.zeros((B, L), np.int32)
  for row, n in enumerate((0, 2, 5)):
    out[row, 1:1 + n] = rng.integers(2, V, n)
  return out


def encoder_tokens(seed=1):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, V, (B, 7)).astype(np.int32)
  tokens[1, 5:] = 0  # padding the cross-attention must mask
  return tokens


@functools.partial(jax.jit, static_argnames="model")
def full_pass(model, variables, sequences, enc):
  batch = {"decoder_input_tokens": sequences}
  if enc is not None:
    batch["encoder_input_tokens"] = enc
  return model.apply(variables, batch)


def check_greedy(model, variables, reference_model=None, encoder_decoder=False):
  """Cached greedy decoding against the full pass of `reference_model` (default: the model)."""
  enc = encoder_tokens() if encoder_decoder else None
  p = prompt()
  sequences, step_logits = decoding.sample(model, variables, p, encoder_input_tokens=enc)
  sequences, step_logits = np.asarray(sequences), np.asarray(step_logits)
  full = np.asarray(full_pass(reference_model or model, variables, sequences, enc))
  np.testing.assert_allclose(step_logits, full[:, :-1], rtol=1e-5, atol=1e-5)
  forced = p[:, 1:] != 0
  np.testing.assert_array_equal(sequences[:, 1:][forced], p[:, 1:][forced])
  greedy = full[:, :-1].argmax(-1)
  np.testing.assert_array_equal(sequences[:, 1:][~forced], greedy[~forced])
  assert sequences[:, 0].tolist() == [0] * B
  return sequences


# One compile of the cached loop and one of the full pass each. The token key is tested by the
# temperature test, the previous-token key by the encoder-decoder test, Switch by the capacity test,
# scanned layers by their own.
CASES = {
    "dense": dict(router=None),
    "hash_bigram": dict(router=routers.Hash(key="bigram")),
    "base": dict(router="base"),  # BASE decodes with its evaluation rule, greedy argmax
    "hash_topk": dict(router=routers.HashTopK(topk=2)),  # a table's 2 experts, a learned gate
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_greedy_equals_full_pass_lm(case):
  model, variables = init(config(**CASES[case]))
  sequences = check_greedy(model, variables)
  assert len(np.unique(sequences[:, 6:])) > 1  # the decode is not one repeated token


def test_switch_with_capacity_decodes_dropless():
  """Switch with a capacity factor: a step runs the dropless model (decoding_model), equal to the
  full pass of the same parameters with capacity_factor=None; the capacity model itself refuses a
  cached step, naming the setting."""
  cfg = config("switch", capacity_factor=1.0)
  model, variables = init(cfg)
  dropless = models.build_model(decoding.decoding_config(cfg))
  assert dropless.config.sparse.capacity_factor is None
  check_greedy(model, variables, reference_model=dropless)
  with pytest.raises(ValueError, match="capacity_factor"):
    model.apply(variables, {"decoder_input_tokens": np.ones((B, L), np.int32)}, decode=True,
                mutable=["cache"])


def test_cached_greedy_equals_full_pass_encoder_decoder():
  model, variables = init(config(routers.Hash(key="prev_token"), encoder_decoder=True))
  check_greedy(model, variables, encoder_decoder=True)


def test_scanned_layers_decode():
  """scan_layers: the scanned runs of dense layers (decoder_0, decoder_2..3) scan their caches,
  stacked on axis 1 so that the batch stays first; greedy decoding equals the full pass."""
  model, variables = init(config(routers.Hash(key="bigram"), num_layers=4, scan_layers=True))
  cache = decoding.init_cache(model, variables, B, L)
  assert cache["decoder_2_to_3"]["self_attention"]["cached_key"].shape == (B, 2, L, 2, 16)
  assert cache["decoder_1"]["self_attention"]["cached_key"].shape == (B, L, 2, 16)
  check_greedy(model, variables)


def test_temperature_sampling_cached_equals_uncached_loop():
  """The uncached loop (a full pass over the prefix per step) and the cached one draw the same
  tokens with the same rng, from logits equal at every step."""
  model, variables = init(config(routers.Hash(key="token")), seed=3)
  rng = jax.random.key(7)
  p = prompt(1)
  cached = decoding.sample(model, variables, p, temperature=1.5, rng=rng)
  uncached = decoding.sample(model, variables, p, temperature=1.5, rng=rng, cached=False)
  np.testing.assert_array_equal(np.asarray(cached[0]), np.asarray(uncached[0]))
  np.testing.assert_allclose(np.asarray(cached[1]), np.asarray(uncached[1]), rtol=1e-5,
                             atol=1e-5)
  free = p[:, 1:] == 0
  argmax = np.asarray(cached[1]).argmax(-1)
  assert (np.asarray(cached[0])[:, 1:][free] != argmax[free]).any()  # it sampled, not greedy


def test_routing_keys_of_a_step_equal_the_full_rows():
  """previous_ids: a one-token step's prev_token / bigram keys equal column t of the full row's
  keys; at position 0 the step starts a sequence (BOUNDARY_ID) whatever previous_ids says."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, V, (4, 9)).astype(np.int32)
  for key in ("prev_token", "bigram", "token", "position"):
    space = hashing.key_space_size(key, vocab_size=V, max_positions=16)
    full = hashing.routing_keys(key, token_ids=tokens, key_space=space)
    for t in range(tokens.shape[1]):
      step = hashing.routing_keys(
          key, token_ids=tokens[:, t:t + 1], positions=np.full((4, 1), t, np.int32),
          previous_ids=tokens[:, t - 1] if t else np.full(4, 5, np.int32), key_space=space)
      np.testing.assert_array_equal(step[:, 0], full[:, t])
  with pytest.raises(ValueError, match="previous_ids must be int"):
    hashing.routing_keys("bigram", token_ids=tokens, previous_ids=tokens, key_space=V)


def test_cache_layout_and_errors():
  cfg = config(routers.Hash(key="bigram"))
  model, variables = init(cfg)
  cache = decoding.init_cache(model, variables, B, L)
  flat = jax.tree_util.tree_flatten_with_path(cache)[0]
  names = {jax.tree_util.keystr(path): leaf.shape for path, leaf in flat}
  # What t5x's cache_map relies on: every leaf batch-first except the scalar cache_index leaves.
  for name, shape in names.items():
    if name.endswith("['cache_index']"):
      assert shape == ()
    else:
      assert shape[0] == B, name
  assert names["['decoder_0']['self_attention']['cached_key']"] == (B, L, 2, 16)
  assert names["['decode_state']['previous_token']"] == (B,)
  with pytest.raises(ValueError, match="TransformerConfig.max_len=16"):
    decoding.init_cache(model, variables, B, 17)
  with pytest.raises(ValueError, match="TransformerConfig.max_len=16"):
    decoding.sample(model, variables, np.zeros((B, 17), np.int32))
  with pytest.raises(ValueError, match="TransformerConfig.max_len=16"):
    model.apply(variables, {"decoder_input_tokens": np.ones((B, 17), np.int32)}, decode=True,
                mutable=["cache"])
  with pytest.raises(ValueError, match="one token per row"):
    decoding.decode_step(model, variables, cache, np.ones((B, 2), np.int32))
  with pytest.raises(ValueError, match="deterministic=True"):
    model.apply({**variables, "cache": cache}, {"decoder_input_tokens": np.ones((B, 1), np.int32)},
                decode=True, deterministic=False, mutable=["cache"])
  with pytest.raises(ValueError, match="oracle_future"):
    decoding.decoding_model(models.build_model(config(routers.Hash(key="oracle_future"))))
  with pytest.raises(ValueError, match="temperature > 0 needs an rng"):
    decoding.sample(model, variables, prompt(), temperature=1.0)


# --------------------------------------------------------------------------------------------------
# benchmarks/decode.py


def test_decode_benchmark_tiny(tmp_path):
  path = ROOT / "benchmarks" / "decode.py"
  spec = importlib.util.spec_from_file_location("decode_benchmark", path)
  bench = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = bench
  spec.loader.exec_module(bench)
  out = tmp_path / "decode.json"
  assert bench.main(["--tiny", "--prefix-lens", "4,12", "--steps", "2", "--repeats", "1",
                     "--json", str(out)]) == 0
  record = json.loads(out.read_text())
  assert record["command"].startswith("python benchmarks/decode.py --tiny")
  rows = record["rows"]
  assert {(r["mode"], r["prefix_len"]) for r in rows} == {
      (m, p) for m in ("cached", "uncached") for p in (4, 12)}
  for row in rows:
    assert isinstance(row["seconds_per_token"], float) and row["seconds_per_token"] > 0
  assert out.with_suffix(".png").stat().st_size > 0


# --------------------------------------------------------------------------------------------------
# t5x: predict_batch through the cache.


def _t5x():
  return pytest.importorskip("t5x")


@pytest.mark.parametrize("encoder_decoder,method", [(False, "beam"), (True, "beam"),
                                                     (False, "temperature")],
                         ids=["lm-beam", "seq2seq-beam", "lm-temperature"])
def test_t5x_predict_batch_cached_equals_uncached(encoder_decoder, method):
  """predict_batch_with_aux with t5x's beam_search / temperature_sample (cached) against the same
  t5x decode function (same rng) on a cache-less tokens_to_logits that reruns the full pass over
  the sequences: same decodes, same scores. The LM's first row has a prompt
  ("decoder_causal_attention", seqio's prefix-LM features), teacher-forced in both and removed
  from the decodes."""
  _t5x()
  import optax
  import seqio
  from t5x import decoding as t5x_decoding
  from t5x import models as t5x_base
  from t5x import optimizers
  from hashmoe.t5x import models as t5x_models

  cfg = config(routers.Hash(key="bigram"), encoder_decoder=encoder_decoder)
  module, variables = init(cfg)
  vocab = seqio.PassThroughVocabulary(V, eos_id=1)
  opt = optimizers.OptaxWrapper(optax.sgd(0.1))
  beams = 3
  if method == "beam":
    decode_fn, params = t5x_decoding.beam_search, {"alpha": 0.0}
  else:
    decode_fn, params = functools.partial(t5x_decoding.temperature_sample, temperature=1.0,
                                          topk=0), {}
  if encoder_decoder:
    model = t5x_models.HashMoeEncoderDecoderModel(module, vocab, vocab, opt, decode_fn=decode_fn)
  else:
    model = t5x_models.HashMoeDecoderOnlyModel(module, vocab, opt, decode_fn=decode_fn)
  tables = {"hash_tables": variables["hash_tables"]}
  batch = {"decoder_input_tokens": np.zeros((2, L), np.int32)}
  enc, prompt_tokens, prompt_length = None, batch["decoder_input_tokens"], None
  if encoder_decoder:
    enc = encoder_tokens()[:2]
    batch["encoder_input_tokens"] = enc
  else:
    batch["decoder_input_tokens"][0, 1:4] = [5, 9, 17]
    causal = np.zeros((2, L), np.int32)
    causal[0, :4], causal[1, 0] = 1, 1
    batch["decoder_causal_attention"] = causal
    prompt_tokens, prompt_length = batch["decoder_input_tokens"], np.array([3, 0])
  rng = jax.random.PRNGKey(3)
  decodes, aux = jax.jit(model.predict_batch_with_aux,
                         static_argnames=("num_decodes", "return_all_decodes"))(
      variables["params"], batch, rng=rng, flax_mutables=tables, num_decodes=beams,
      return_all_decodes=True, decoder_params=dict(params))

  expanded = None if enc is None else jnp.repeat(enc, beams, axis=0)

  def tokens_to_logits(state):
    logits = full_pass(module, variables, state.sequences, expanded)
    # beam_search's index is a scalar, temperature_sample's one per row.
    index = jnp.broadcast_to(jnp.asarray(state.cur_index), logits.shape[:1])
    return jnp.take_along_axis(logits, index[:, None, None], axis=1)[:, 0], {}

  ref_decodes, ref_scores = jax.jit(functools.partial(
      decode_fn, tokens_to_logits=tokens_to_logits, eos_id=1, num_decodes=beams, decode_rng=rng,
      **params))(prompt_tokens, {})
  if prompt_length is not None:
    ref_decodes = t5x_base.remove_prefix(ref_decodes, prompt_length)
  np.testing.assert_array_equal(np.asarray(decodes), np.asarray(ref_decodes))
  np.testing.assert_allclose(np.asarray(aux["scores"]), np.asarray(ref_scores), rtol=1e-5,
                             atol=1e-4)
