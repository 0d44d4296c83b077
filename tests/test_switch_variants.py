"""Switch as its users run it: padding left out of the auxiliary losses, the combine-weight
variants, and the router-confidence metrics, against numpy references.

References: the losses recomputed by numpy over the real tokens alone (and over every position with
the option off); each combine weight's forward value from numpy probabilities and its gradient
from the hand-derived softmax Jacobian; through whole models (decoder-only, scanned dense layers,
encoder-decoder), the invariance that defines the fix: adding padding to a batch must not move
the aux losses, and does with the option off.
"""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hashmoe import models, routers, routing
from hashmoe.compare import report as report_lib
from hashmoe.compare import runs as runs_lib
from hashmoe.compare import specs as specs_lib
from hashmoe.compare.comparison import ModelResult, summarize
from hashmoe.layers import MOE_COLLECTION
from hashmoe.routing import RouterFeatures
from hashmoe.training import errors, resume

E, D = 4, 8

pytestmark = pytest.mark.usefixtures("compilation_cache")


def _np_softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_balance(probs, top, experts):
  f = np.array([(top == i).mean() for i in range(experts)])
  return experts * np.sum(f * probs.mean(0))


def _np_z(logits):
  x = np.asarray(logits, np.float64)
  lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  return np.mean(lse ** 2)


# --------------------------------------------------------------------------------------------------
# The losses over real tokens.


def test_masked_losses_are_the_losses_of_the_real_tokens():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(20, E)) * 2
  probs = _np_softmax(logits)
  top = probs.argmax(-1)
  mask = rng.random(20) > 0.35
  args = jnp.asarray(probs, jnp.float32), jnp.asarray(top)
  np.testing.assert_allclose(routing.load_balancing_loss(*args, jnp.asarray(mask)),
                             _np_balance(probs[mask], top[mask], E), rtol=1e-5)
  np.testing.assert_allclose(routing.router_z_loss(jnp.asarray(logits, jnp.float32),
                                                   jnp.asarray(mask)),
                             _np_z(logits[mask]), rtol=1e-5)
  # No mask: every position, the value from before the option.
  np.testing.assert_allclose(routing.load_balancing_loss(*args), _np_balance(probs, top, E),
                             rtol=1e-5)
  np.testing.assert_allclose(routing.router_z_loss(jnp.asarray(logits, jnp.float32)),
                             _np_z(logits), rtol=1e-5)
  # Nothing counted: 0, not NaN.
  none = jnp.zeros(20, bool)
  assert float(routing.load_balancing_loss(*args, none)) == 0.0
  assert float(routing.router_z_loss(jnp.asarray(logits, jnp.float32), none)) == 0.0
  with pytest.raises(ValueError, match="token_mask must have 20 entries"):
    routing.load_balancing_loss(*args, jnp.ones(21, bool))


def _router_case(seed=1):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 30, size=(2, 6)).astype(np.int32)
  ids[0, 4:] = 0
  ids[1, 2:] = 0  # 6 of 12 positions are padding
  hidden = rng.normal(size=(12, D)).astype(np.float32)
  kernel = (rng.normal(size=(D, E)) * 1.5).astype(np.float32)
  return ids, hidden, kernel


def _apply_switch(router, hidden, ids, kernel, valid=True):
  features = RouterFeatures(jnp.asarray(ids), valid=jnp.asarray(ids > 0) if valid else None)
  return router.apply({"params": {"kernel": jnp.asarray(kernel)}}, jnp.asarray(hidden), features,
                      deterministic=True)


@pytest.mark.parametrize("exclude", [True, False])
def test_switch_router_aux_losses_leave_out_padding_by_default(exclude):
  ids, hidden, kernel = _router_case()
  router = routing.SwitchRouter(E, balance_coef=0.1, z_loss_coef=0.01, exclude_padding=exclude)
  out = _apply_switch(router, hidden, ids, kernel)
  logits = hidden.astype(np.float64) @ kernel
  probs = _np_softmax(logits)
  top = probs.argmax(-1)
  counted = (ids.reshape(-1) > 0) if exclude else np.ones(12, bool)
  balance = _np_balance(probs[counted], top[counted], E)
  z = _np_z(logits[counted])
  np.testing.assert_allclose(out.metrics["balance_loss"], balance, rtol=1e-5)
  np.testing.assert_allclose(out.metrics["router_z_loss"], z, rtol=1e-5)
  np.testing.assert_allclose(out.aux_loss, 0.1 * balance + 0.01 * z, rtol=1e-5)
  # The routing metrics count the real tokens either way.
  real = ids.reshape(-1) > 0
  np.testing.assert_allclose(out.metrics["router_confidence"], probs[real].max(-1).mean(),
                             rtol=1e-5)
  # Padding really moves the losses here (else this test could not tell the two apart).
  assert abs(_np_balance(probs, top, E) - _np_balance(probs[real], top[real], E)) > 1e-3
  # Without a mask (features.valid None) every position counts, option or not.
  unmasked = _apply_switch(router, hidden, ids, kernel, valid=False)
  np.testing.assert_allclose(unmasked.metrics["balance_loss"], _np_balance(probs, top, E),
                             rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# The combine weight.


@pytest.mark.parametrize("combine", routing.SWITCH_COMBINES)
def test_combine_weight_variants_forward_and_gradient(combine):
  ids, hidden, kernel = _router_case(seed=2)
  ids = np.where(ids > 0, ids, 5)  # no padding: only the combine weight is under test
  router = routing.SwitchRouter(E, balance_coef=0.0, combine=combine)
  out = _apply_switch(router, hidden, ids, kernel)
  h = hidden.astype(np.float64)
  probs = _np_softmax(h @ kernel)
  top = probs.argmax(-1)
  p_top = probs[np.arange(12), top]
  forward = {"prob": p_top, "prob_times_experts": E * p_top, "straight_through": np.ones(12)}
  np.testing.assert_allclose(out.combine_weight[:, 0], forward[combine], rtol=1e-5)
  np.testing.assert_array_equal(out.expert_index[:, 0], top)
  np.testing.assert_allclose(out.metrics["combine_weight_mean"], forward[combine].mean(),
                             rtol=1e-5)

  # L = Σ_t c_t w_t. dp_top/dlogit_j = p_top (δ_{j,top} - p_j); dw/dp_top is 1 for prob and
  # straight-through, E for prob_times_experts; dL/dW = hᵀ dL/dlogits.
  c = np.random.default_rng(3).normal(size=12)
  dw_dp = E if combine == "prob_times_experts" else 1.0
  onehot = np.eye(E)[top]
  dlogits = (c * dw_dp * p_top)[:, None] * (onehot - probs)
  expected = h.T @ dlogits

  def loss(k):
    r = _apply_switch(router, hidden, ids, k)
    return jnp.sum(jnp.asarray(c, jnp.float32) * r.combine_weight[:, 0])

  grad = jax.grad(loss)(jnp.asarray(kernel))
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_switch_combine_and_padding_options_are_checked():
  with pytest.raises(ValueError, match=r"combine must be one of \('prob', 'prob_times_experts', "
                     r"'straight_through'\), got 'renorm'"):
    routing.SwitchRouter(E, combine="renorm")
  with pytest.raises(ValueError, match="Switch: combine must be one of"):
    routers.Switch(combine="renorm")
  with pytest.raises(ValueError, match="exclude_padding must be True or False, got 'yes'"):
    routers.TokenSwitch(exclude_padding="yes")
  with pytest.raises(ValueError, match="combine must be one of"):
    routing.switch_combine_weight(jnp.ones((2, 1)), "sum", 4)
  # The config hands its options to the module it builds.
  module = routers.TokenSwitch(combine="straight_through", exclude_padding=False).build(
      num_experts=E, vocab_size=16, max_len=8, capacity_factor=None, tables=None, ordinal=0)
  assert (module.combine, module.exclude_padding, module.token_based) == (
      "straight_through", False, True)


def test_combine_weight_mean_counts_real_tokens_and_drops():
  index = jnp.asarray([[0], [1], [2], [1], [3]])
  weight = np.array([[0.5], [0.0], [0.25], [2.0], [7.0]], np.float32)
  mask = np.array([True, True, True, True, False])
  m = routing.routing_metrics(index, jnp.asarray(weight), 4, token_mask=jnp.asarray(mask))
  # A dropped assignment (weight 0) counts as 0; the padding token's 7 is left out.
  np.testing.assert_allclose(m["combine_weight_mean"], (0.5 + 0.0 + 0.25 + 2.0) / 4, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# The mask reaches the router in every model.


def _lm_batches(rng, length, pad):
  """(short, padded) decoder batches with the same real tokens; the padded one has `pad` more
  positions whose targets are 0 (padding) and whose inputs are arbitrary ids."""
  targets = rng.integers(2, 40, (2, length)).astype(np.int32)
  short = {"decoder_target_tokens": targets,
           "decoder_input_tokens": np.concatenate([np.zeros((2, 1), np.int32), targets[:, :-1]],
                                                  1)}
  padded = {"decoder_target_tokens": np.concatenate([targets, np.zeros((2, pad), np.int32)], 1),
            "decoder_input_tokens": np.concatenate(
                [short["decoder_input_tokens"], rng.integers(2, 40, (2, pad)).astype(np.int32)],
                1)}
  return short, padded


def _switch_aux(config, variables, batch):
  """{sparse layer: (aux loss, unweighted balance loss)} of one forward pass (jitted: one compile
  costs less than running the model op by op)."""

  @jax.jit
  def forward(variables, batch):
    _, state = models.build_model(config).apply(variables, batch, mutable=[MOE_COLLECTION])
    _, metrics = models.collect_aux(state)
    return {layer: (m["aux_loss"], m["balance_loss"]) for layer, m in metrics.items()}

  return {layer: tuple(map(float, v)) for layer, v in forward(variables, batch).items()}


@pytest.mark.parametrize("arch", ["lm", "lm_scanned", "encdec"])
def test_padding_does_not_reach_the_aux_losses_of_whole_models(arch):
  rng = np.random.default_rng(4)
  short, padded = _lm_batches(rng, 8, 4)
  encdec = arch == "encdec"
  if encdec:
    inputs = rng.integers(2, 40, (2, 8)).astype(np.int32)
    short["encoder_input_tokens"] = inputs
    padded["encoder_input_tokens"] = np.concatenate([inputs, np.zeros((2, 4), np.int32)], 1)

  def config(exclude):
    sparse = models.SparseConfig(
        router=routers.Switch(balance_coef=0.5, z_loss_coef=0.1, exclude_padding=exclude),
        num_experts=E, layers=(1,), encoder_layers=(0,) if encdec else (), dispatch="einsum")
    return models.tiny_config(vocab_size=40, num_encoder_layers=2 if encdec else 0,
                              num_layers=3 if arch == "lm_scanned" else 2, sparse=sparse,
                              scan_layers=arch == "lm_scanned", max_len=16)

  variables = nn.unbox(jax.jit(models.build_model(config(True)).init)(jax.random.key(0), padded))
  on_short, on_padded = _switch_aux(config(True), variables, short), _switch_aux(
      config(True), variables, padded)
  assert set(on_short) == ({"encoder_0", "decoder_1"} if encdec else {"decoder_1"})
  for layer in on_short:
    np.testing.assert_allclose(on_padded[layer], on_short[layer], rtol=2e-5, err_msg=layer)
  # With the option off the padded batch's losses differ: the positions did reach the router.
  off = _switch_aux(config(False), variables, padded)
  assert all(abs(off[layer][1] - on_short[layer][1]) > 1e-4 for layer in on_short), (off, on_short)


def test_padding_does_not_reach_the_aux_losses_through_the_t5x_adapter():
  pytest.importorskip("t5x")
  from hashmoe.t5x import models as t5x_models  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  short, padded = _lm_batches(rng, 8, 4)
  for batch in (short, padded):
    batch["decoder_loss_weights"] = (batch["decoder_target_tokens"] > 0).astype(np.int32)
  config = models.tiny_config(vocab_size=40, num_encoder_layers=0, max_len=16, sparse=(
      models.SparseConfig(router=routers.Switch(balance_coef=0.5), num_experts=E, layers=(1,),
                          dispatch="einsum")))
  import optax  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from t5x import decoding, optimizers  # pylint: disable=g-import-not-at-top
  module = t5x_models.hashmoe_module(config)
  model = t5x_models.HashMoeDecoderOnlyModel(
      module, seqio.PassThroughVocabulary(40, eos_id=1),
      optimizers.OptaxWrapper(optax.adamw(1e-3)), decode_fn=decoding.temperature_sample)
  params = nn.unbox(module.init(jax.random.key(0), padded)["params"])
  # The adapter's forward pass (what its loss adds), on the batches as t5x hands them over.
  _, aux_short, _ = model._forward(params, short, None, None)  # pylint: disable=protected-access
  _, aux_padded, _ = model._forward(params, padded, None, None)  # pylint: disable=protected-access
  np.testing.assert_allclose(float(aux_padded), float(aux_short), rtol=2e-5)


# --------------------------------------------------------------------------------------------------
# Where the options are recorded.


def test_options_are_recorded_for_checkpoints_and_comparisons():
  sparse = models.SparseConfig(router=routers.Switch(combine="prob_times_experts"),
                               num_experts=E, layers=(1,))
  settings = resume.run_settings(models.tiny_config(sparse=sparse, num_encoder_layers=0),
                                 task="t", seq_len=8, batch_size=2, seed=0, hash_tables=None,
                                 vocab_fingerprint="v")
  # The combine weight changes the model: fixed by a checkpoint. Padding in the losses changes
  # only the objective: a resumed run may change it, as it may the loss coefficients.
  assert settings["routers.Switch.combine"] == "prob_times_experts"
  assert "routers.Switch.exclude_padding" not in settings

  def settings_of(router):
    config = models.tiny_config(num_encoder_layers=0, sparse=models.SparseConfig(
        router=router, num_experts=E, layers=(1,)))
    return resume.run_settings(config, task="t", seq_len=8, batch_size=2, seed=0,
                               hash_tables=None, vocab_fingerprint="v")

  def check(saved, router):
    return resume.check_resume({"settings": saved}, step=3, settings=settings_of(router),
                               config_text="", model_dir="/runs/x")

  with pytest.raises(errors.ChangedConfigError,
                     match=r"routers.Switch.combine: 'prob_times_experts' -> 'prob'"):
    check(settings, routers.Switch())
  assert check(settings, routers.Switch(combine="prob_times_experts",
                                        exclude_padding=False)) == []
  # A checkpoint written before the field existed does not name it: not a change.
  old = {k: v for k, v in settings.items() if not k.startswith("routers.")}
  assert check(old, routers.Switch(combine="prob_times_experts")) == []
  assert routers.TokenSwitch().own_settings() == {"routers.TokenSwitch.combine": "prob",
                                                  "routers.TokenSwitch.exclude_padding": True}
  assert routers.Hash().own_settings() == {} and routers.Base().own_settings() == {}
  spec = specs_lib.ModelSpec("sx", router=routers.Switch(combine="straight_through"))
  assert spec.record()["router_settings"] == {"combine": "straight_through",
                                              "exclude_padding": True}
  assert "combine weight straight_through" in spec.describe()
  # Hash and dense records are as before (their finished runs are still reused).
  assert "router_settings" not in specs_lib.ModelSpec("h", router=routers.Hash()).record()
  assert "router_settings" not in specs_lib.ModelSpec("dense").record()


# --------------------------------------------------------------------------------------------------
# The comparison's router curves.


def _metrics_records(values):
  return [{"step": s, "tokens_per_s": 1.0,
           "moe": {"decoder_1": {"router_confidence": c, "combine_weight_mean": w,
                                 "expert_load": [0.5, 0.5]}}}
          for s, (c, w) in values.items()]


def test_router_curves_from_metrics_to_results_and_figure(tmp_path):
  seed0 = runs_lib.router_curves(_metrics_records({10: (0.02, 0.02), 20: (0.1, 0.1)}))
  assert seed0 == {"router_confidence": {"decoder_1": {10: 0.02, 20: 0.1}},
                   "combine_weight_mean": {"decoder_1": {10: 0.02, 20: 0.1}}}
  # A non-finite value (a string in metrics.jsonl) is left out; a dense run has none.
  seed1 = runs_lib.router_curves(_metrics_records({10: (0.04, "nan"), 20: (0.3, 0.3)}))
  assert seed1["combine_weight_mean"]["decoder_1"] == {20: 0.3}
  assert runs_lib.router_curves([{"step": 1, "loss": 2.0}]) is None

  def record(seed, curves):
    return runs_lib.RunRecord(model="switch", seed=seed, balance_coef=0.01, steps=20,
                              valid_ppl=50.0, curve={10: 80.0, 20: 50.0}, tokens_per_s=1.0,
                              params=10, active_params=5, expert_load={"decoder_1": [0.5, 0.5]},
                              router_curves=curves)

  runs = [record(0, seed0), record(1, seed1)]
  # run.json keeps the curves (string steps in JSON, ints back).
  assert runs_lib.RunRecord.from_json(json.loads(json.dumps(runs[1].to_json()))) == runs[1]
  entry = summarize(ModelResult(specs_lib.ModelSpec("switch", router="switch"), runs,
                                balance_coef=0.01))
  assert entry["router_curves"]["router_confidence"]["decoder_1"] == [
      {"10": 0.02, "20": 0.1}, {"10": 0.04, "20": 0.3}]
  results = {"corpus": "c", "steps": 20, "models": {"switch": entry}}
  written = report_lib.write_figures(results, tmp_path)
  assert str(tmp_path / "router_confidence.png") in written
  drawn = json.loads((tmp_path / "router_confidence.json").read_text())
  confidence = drawn["panels"]["router_confidence"]["lines"]["switch"]
  assert confidence["steps"] == [10, 20] and confidence["seeds"] == 2
  np.testing.assert_allclose(confidence["mean"], [0.03, 0.2])
  # Seed 1 has no combine weight at step 10: the mean is over the steps both seeds logged.
  assert drawn["panels"]["combine_weight_mean"]["lines"]["switch"]["steps"] == [20]
  assert drawn["panels"]["validation_ppl"]["lines"]["switch"]["mean"] == [80.0, 50.0]
