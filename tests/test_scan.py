"""Scanned layers and rematerialisation (`TransformerConfig.scan_layers`, `.remat_policy`).

Each is checked against the plain model it replaces: the scanned model, given the unrolled model's
parameters stacked by `models.stack_layers`, must give the unrolled model's loss and (unstacked)
gradients; every remat policy the gradients of no remat. Models are tiny and float32, and each
test compiles one program per configuration.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hashmoe import layers, models, routers, sharding
from hashmoe.training import checkpoints as checkpoints_lib
from hashmoe.training import errors

V = 64

pytestmark = pytest.mark.usefixtures("compilation_cache")


# The one-hot "einsum" dispatch compiles fastest on CPU; scan and remat do not depend on it.
DISPATCH = "einsum"


def lm_config(num_layers=4, sparse_layers=(1, 3), **overrides):
  # Hash layers at {1, 3} of 4: dense runs [0] and [2] (encdec_config has a run of two).
  sparse = models.SparseConfig(router=routers.Hash(), num_experts=4, layers=sparse_layers,
                               dispatch=DISPATCH)
  return models.tiny_config(vocab_size=V, num_encoder_layers=0, num_layers=num_layers,
                            sparse=sparse, max_len=16, **overrides)


def encdec_config(**overrides):
  # Switch (an aux loss to carry) in encoder layer 0 of 3, so encoder layers 1 and 2 are one scan
  # of length 2; decoder layer 1 of 2.
  sparse = models.SparseConfig(router=routers.Switch(), num_experts=4, encoder_layers=(0,),
                               layers=(1,), dispatch=DISPATCH)
  return models.tiny_config(vocab_size=V, num_encoder_layers=3, num_layers=2, sparse=sparse,
                            max_len=16, **overrides)


def batch_for(config, seed=0):
  rng = np.random.default_rng(seed)
  targets = rng.integers(1, V, (2, 8)).astype(np.int32)
  targets[:, -2:] = 0
  batch = {"decoder_input_tokens": np.concatenate([np.zeros_like(targets[:, :1]),
                                                   targets[:, :-1]], axis=1),
           "decoder_target_tokens": targets}
  if config.is_encoder_decoder:
    batch["encoder_input_tokens"] = rng.integers(1, V, (2, 8)).astype(np.int32)
  return batch


def loss_and_grads(config, params, constants, batch):
  """(loss, aux losses by layer, grads) of mean token cross-entropy + Σ aux losses."""
  model = models.build_model(config)

  def loss_fn(p):
    logits, state = model.apply({"params": p, **constants}, batch, deterministic=True,
                                mutable=[layers.MOE_COLLECTION])
    weights = batch["decoder_target_tokens"] > 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["decoder_target_tokens"])
    aux, metrics = models.collect_aux(state)
    loss = jnp.sum(ce * weights) / jnp.sum(weights) + aux
    return loss, {name: m[layers.AUX_LOSS_KEY] for name, m in metrics.items()}

  (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return loss, aux, grads


def init(config, batch, abstract=False):
  model = models.build_model(config)
  init_fn = lambda: model.init(jax.random.key(0), batch, deterministic=True)  # noqa: E731
  variables = jax.eval_shape(init_fn) if abstract else jax.jit(init_fn)()
  variables = nn.unbox(dict(variables))
  variables.pop(layers.MOE_COLLECTION, None)
  return variables.pop("params"), variables


def assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  leaves = zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want))
  for (path, g), w in leaves:
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module", params=["lm", "encdec"])
def unrolled(request):
  config = lm_config() if request.param == "lm" else encdec_config()
  batch = batch_for(config)
  params, constants = init(config, batch)
  return config, batch, params, constants, loss_and_grads(config, params, constants, batch)


def test_layer_runs_keep_sparse_layers_unrolled_and_scan_the_dense_runs_between():
  names = [(name, idx, sparse) for name, idx, sparse in
           models.layer_runs(lm_config(6, scan_layers=True), "decoder")]
  assert names == [("decoder_0_to_0", (0,), False), ("decoder_1", (1,), True),
                   ("decoder_2_to_2", (2,), False), ("decoder_3", (3,), True),
                   ("decoder_4_to_5", (4, 5), False)]
  assert [n for n, _, _ in models.layer_runs(lm_config(6), "decoder")] == [
      f"decoder_{i}" for i in range(6)]
  encoder = models.layer_runs(encdec_config(scan_layers=True), "encoder")
  assert encoder == [("encoder_0", (0,), True), ("encoder_1_to_2", (1, 2), False)]


def test_scanned_model_gives_the_unrolled_loss_aux_losses_and_gradients(unrolled):
  config, batch, params, constants, (loss, aux, grads) = unrolled
  scanned = config.replace(scan_layers=True)
  stacked = models.stack_layers(params, config)
  # The scanned model's own init has exactly this layout (names, shapes) and stacked axis.
  own, own_constants = init(scanned, batch, abstract=True)
  assert jax.tree_util.tree_map(np.shape, own) == jax.tree_util.tree_map(np.shape, stacked)
  assert jax.tree_util.tree_map(np.shape, own_constants) == jax.tree_util.tree_map(
      np.shape, constants)
  s_loss, s_aux, s_grads = loss_and_grads(scanned, stacked, constants, batch)
  # Equal to float32 rounding (the scan body is compiled once, not inlined per layer, so XLA may
  # fuse differently); in practice the differences are a few ulp.
  np.testing.assert_allclose(float(s_loss), float(loss), rtol=1e-6)
  assert set(s_aux) == set(aux) and aux  # the same sparse layers, under the same names
  for name in aux:
    np.testing.assert_allclose(float(s_aux[name]), float(aux[name]), rtol=1e-6, atol=1e-7)
  assert_trees_close(models.unstack_layers(s_grads, config), grads)


@pytest.fixture(scope="module")
def small_lm():
  """A 2-layer LM, hash layer 1: every policy is compiled once on it."""
  config = lm_config(num_layers=2, sparse_layers=(1,))
  batch = batch_for(config)
  params, constants = init(config, batch)
  return config, batch, params, constants, loss_and_grads(config, params, constants, batch)


@pytest.mark.parametrize("policy", [p for p in layers.REMAT_POLICIES if p != "none"])
def test_every_remat_policy_gives_the_gradients_of_no_remat(small_lm, policy):
  config, batch, params, constants, (loss, _, grads) = small_lm
  # Scanned and remat together: remat inside the scan body and on the unrolled sparse layers.
  remat = config.replace(scan_layers=True, remat_policy=policy)
  r_loss, _, r_grads = loss_and_grads(remat, models.stack_layers(params, config), constants,
                                      batch)
  np.testing.assert_allclose(float(r_loss), float(loss), rtol=1e-6)
  assert_trees_close(models.unstack_layers(r_grads, config), grads)



def test_stack_and_unstack_are_exact_inverses_and_keep_logical_axis_names():
  config = lm_config(6)
  batch = batch_for(config)
  shapes = jax.eval_shape(lambda: models.build_model(config).init(jax.random.key(1), batch))
  rng = np.random.default_rng(0)  # distinct values everywhere, without compiling an init
  boxed = jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(x.dtype),
                                 shapes["params"])
  stacked = models.stack_layers(boxed, config)
  box = stacked["decoder_4_to_5"]["mlp"]["wi"]
  assert isinstance(box, nn.LogicallyPartitioned)
  assert box.names == (models.LAYERS_AXIS, "embed", "mlp") and box.value.shape == (2, 32, 64)
  np.testing.assert_array_equal(box.value[1], boxed["decoder_5"]["mlp"]["wi"].value)
  # The "layers" axis is a rule of its own and never sharded.
  spec = nn.logical_to_mesh_axes(box.names, list(sharding.LOGICAL_AXIS_RULES))
  assert spec == jax.sharding.PartitionSpec(None, None, "model")
  back = models.unstack_layers(stacked, config)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(dict(boxed))
  for got, want in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(dict(boxed))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  plain = nn.unbox(boxed)
  assert models.stack_layers(plain, config)["decoder_4_to_5"]["mlp"]["wo"].shape == (2, 64, 32)


def test_converting_the_wrong_layout_names_the_setting():
  config = lm_config()
  shapes, _ = init(config, batch_for(config), abstract=True)
  params = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), shapes)
  with pytest.raises(ValueError, match=r"not the scanned layout \(TransformerConfig.scan_layers="
                                       r"True\).*no \['decoder_0_to_0'\].*unrolled layout already"):
    models.unstack_layers(params, config)
  stacked = models.stack_layers(params, config)
  with pytest.raises(ValueError, match=r"not the unrolled layout.*scan_layers=False"):
    models.stack_layers(stacked, config)


def test_restoring_a_checkpoint_of_the_other_layout_is_refused_naming_scan_layers():
  config = lm_config()
  batch = batch_for(config)
  shapes = lambda c: jax.eval_shape(  # noqa: E731
      lambda: nn.unbox(models.build_model(c).init(jax.random.key(0), batch))["params"])
  unrolled = checkpoints_lib.state_layout({"params": shapes(config)})
  scanned = checkpoints_lib.state_layout({"params": shapes(config.replace(scan_layers=True))})
  for saved, wanted in ((unrolled, scanned), (scanned, unrolled)):
    with pytest.raises(errors.IncompatibleCheckpointError,
                       match=r"TransformerConfig.scan_layers differs.*stack_layers"):
      checkpoints_lib._check_layout(saved, wanted, 3, "run/checkpoints")
  other = checkpoints_lib.state_layout({"params": shapes(config.replace(d_ff=32))})
  with pytest.raises(errors.IncompatibleCheckpointError) as refused:
    checkpoints_lib._check_layout(unrolled, other, 3, "run/checkpoints")
  assert "scan_layers" not in str(refused.value)  # only said when it is the cause


def test_bad_scan_and_remat_settings_are_clear_errors():
  with pytest.raises(ValueError, match=r"unknown remat_policy 'dot'.*'dots', 'dots_no_batch'"):
    lm_config(remat_policy="dot")
  with pytest.raises(ValueError, match=r"remat_policy='save_dispatch'.*no sparse layers"):
    models.tiny_config(remat_policy="save_dispatch")
  every_layer_sparse = models.SparseConfig(num_experts=4, layers=(0, 1))
  with pytest.raises(ValueError, match=r"scan_layers=True.*every layer.*set scan_layers=False"):
    models.tiny_config(num_encoder_layers=0, sparse=every_layer_sparse, scan_layers=True)
  # A dense model scans every layer; remat policies other than the dispatch ones fit it.
  dense = models.tiny_config(num_encoder_layers=0, scan_layers=True, remat_policy="dots")
  assert [n for n, _, _ in models.layer_runs(dense, "decoder")] == ["decoder_0_to_1"]
