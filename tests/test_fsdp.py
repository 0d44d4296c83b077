"""Tests for fully sharded data parallel (`hashmoe.sharding.axis_rules(fsdp=True)`).

References are independent of the layout under test: the same training steps on a one-device mesh
(no collectives, nothing sharded), shard shapes worked out by hand from the mesh, and checkpoint
values read back in the other layout. A tiny hash model on the 8 CPU devices of conftest.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hashmoe import models, sharding
from hashmoe.training import checkpoints as checkpoints_lib
from hashmoe.training import optim
from hashmoe.training import trainer as trainer_lib

pytestmark = pytest.mark.usefixtures("compilation_cache")

V = 64
STEPS = 3
LR = 1e-2
# Losses and gradient norms agree to float32 reduction-order noise. Parameters get a tolerance in
# units of the learning rate: Adam moves every element by up to LR per step whatever its gradient's
# size, so an element whose gradient is ~0 moves by noise-dependent amounts (seen: 7e-5 on one of
# 2048 elements). A wrong layout (a missing reduction, a gradient summed twice) is off by O(LR).
PARAM_ATOL = 0.01 * LR * STEPS


def _config(d_model=32, dispatch="auto"):
  sparse = models.SparseConfig(router="hash", num_experts=4, layers=(1,), dispatch=dispatch)
  return models.tiny_config(vocab_size=V, num_encoder_layers=0, sparse=sparse, max_len=16,
                            d_model=d_model)


def _batches(n, batch_size=8, seq_len=16):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    tokens = rng.integers(1, V, size=(batch_size, seq_len + 1), dtype=np.int32)
    out.append({"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:]})
  return out


def _trainer(config, mesh, fsdp):
  tx = optim.make_optimizer(LR, weight_decay=0.01, clip_norm=1.0)
  return trainer_lib.Trainer(config, models.build_model(config), tx, mesh, seed=0,
                             rules=sharding.axis_rules(fsdp=fsdp))


def _train(trainer, batches):
  state = trainer.init_state()
  losses = []
  for batch in batches:
    state, metrics = trainer.train_step(state, trainer.global_batch(batch))
    losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  return state, losses


def _flat(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def reference():
  """STEPS AdamW steps on one device: the numbers every layout must reproduce."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  state, losses = _train(_trainer(_config(), mesh, fsdp=False), _batches(STEPS))
  return jax.device_get(state), losses


@pytest.fixture(scope="module")
def fsdp_run():
  """The same steps on a 2x2x2 data x expert x model mesh with FSDP, experts over "expert"."""
  mesh = sharding.make_mesh(2, 2, 2)
  trainer = _trainer(_config(dispatch="expert_parallel"), mesh, fsdp=True)
  state, losses = _train(trainer, _batches(STEPS))
  return trainer, state, losses


# --------------------------------------------------------------------------------------------------
# Rules.


@pytest.mark.parametrize("logical, expected", [
    (("embed", "mlp"), P(("data", "expert"), "model")),  # dense FFN wi
    (("mlp", "embed"), P("model", ("data", "expert"))),  # dense FFN wo
    (("vocab", "embed"), P("model", ("data", "expert"))),  # token embedding
    (("embed",), P(("data", "expert"))),  # norm scale
    (("embed", "heads", "kv"), P(("data", "expert"), "model", None)),  # attention q/k/v
    # Expert weights: "expert" holds the expert axis, so "embed" falls back to "data".
    (("expert", "embed", "mlp"), P("expert", "data", "model")),
    # Activations are unchanged: "batch" claims both batch axes first.
    (("batch", "length", "embed"), P(("data", "expert"), None, None)),
    (("batch", "embed"), P(("data", "expert"), None)),
])
def test_fsdp_rules_shard_weights_over_the_batch_axes_and_leave_activations(logical, expected):
  mesh = sharding.make_mesh(2, 2, 2)
  spec = sharding.logical_to_mesh_sharding(
      {"a": P(*logical)}, mesh, sharding.axis_rules(fsdp=True))["a"].spec
  assert spec == expected
  assert sharding.is_fsdp(sharding.axis_rules(fsdp=True))
  assert not sharding.is_fsdp(sharding.axis_rules())
  assert sharding.axis_rules() == sharding.LOGICAL_AXIS_RULES


def test_axis_rules_rejects_a_non_bool():
  with pytest.raises(TypeError, match="fsdp must be True or False"):
    sharding.axis_rules(fsdp="yes")


# --------------------------------------------------------------------------------------------------
# Numerics and layout.


def test_fsdp_training_matches_one_device(reference, fsdp_run):
  ref_state, ref_losses = reference
  _, state, losses = fsdp_run
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  got, want = _flat(jax.device_get(state.params)), _flat(ref_state.params)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=PARAM_ATOL, err_msg=name)
  got, want = _flat(jax.device_get(state.opt_state)), _flat(ref_state.opt_state)
  for name in want:
    # Adam's moments follow the gradients: float32 noise relative to the leaf's largest entry.
    scale = float(np.max(np.abs(want[name]))) if np.size(want[name]) else 0.0
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-3 * scale + 1e-12,
                               err_msg=name)


def test_fsdp_on_the_data_axis_alone_shards_every_embed_dimension_eightfold():
  """The plain data-parallel mesh (8 x 1 x 1): every "embed" dimension over all 8 devices, the rest
  whole (abstract state only: nothing is compiled)."""
  trainer = _trainer(_config(), sharding.make_mesh(8, 1, 1), fsdp=True)
  abstract = _flat(trainer.abstract_state.params)
  expected = {
      "['decoder_0']['mlp']['wi']": (4, 64),  # [32, 64] ("embed", "mlp")
      "['decoder_0']['mlp']['wo']": (64, 4),  # [64, 32] ("mlp", "embed")
      "['decoder_1']['moe']['experts']['wi']": (4, 4, 64),  # [4, 32, 64]: embed falls to "data"
      "['token_embedder']['embedding']": (64, 4),  # [64, 32] ("vocab", "embed")
      "['decoder_norm']['scale']": (4,),  # [32] ("embed",)
  }
  for name, shard in expected.items():
    x = abstract[name]
    assert x.sharding.shard_shape(x.shape) == shard, name


def test_parameters_and_adam_moments_are_sharded(fsdp_run):
  """Per-device shard shapes on the 2x2x2 mesh, worked out by hand (d=32, D=64, 2 heads of 16,
  4 experts, V=64): "embed" over data x expert (4), expert weights' "embed" over data (2)."""
  _, state, _ = fsdp_run
  expected = {
      "['decoder_0']['mlp']['wi']": (8, 32),  # [32, 64]: embed/4, mlp/2
      "['decoder_0']['mlp']['wo']": (32, 8),  # [64, 32]
      "['decoder_0']['self_attention']['query']": (8, 1, 16),  # [32, 2, 16]: embed/4, heads/2
      "['decoder_1']['moe']['experts']['wi']": (2, 16, 32),  # [4, 32, 64]: E/2, embed/2, mlp/2
      "['decoder_1']['moe']['experts']['wo']": (2, 32, 16),  # [4, 64, 32]
      "['token_embedder']['embedding']": (32, 8),  # [64, 32]: vocab/2, embed/4
  }
  params = _flat(state.params)
  missing = set(expected) - set(params)
  assert not missing, f"{missing} not among {sorted(params)}"
  mu = nu = None
  for leaf in jax.tree_util.tree_leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")):
    if hasattr(leaf, "mu"):
      mu, nu = _flat(leaf.mu), _flat(leaf.nu)
  assert mu is not None, "no Adam state with mu/nu in the optimizer state"
  for name, shard in expected.items():
    for tree in (params, mu, nu):
      assert {s.data.shape for s in tree[name].addressable_shards} == {shard}, name
  # Every parameter with an "embed" dimension is split: no device holds a whole dense weight.
  per_device = sum(x.addressable_shards[0].data.size for x in params.values())
  total = sum(x.size for x in params.values())
  assert per_device < total / 4


# --------------------------------------------------------------------------------------------------
# Checkpoints move between layouts.


def _save(state, directory):
  ckpt = checkpoints_lib.Checkpointer(directory, async_save=False)
  ckpt.save(state, data_position=None, hash_metadata={}, config_text="")
  ckpt.wait()
  ckpt.close()


def _restore(directory, trainer):
  ckpt = checkpoints_lib.Checkpointer(directory, async_save=False)
  with trainer.context():
    restored = ckpt.restore_latest(trainer.abstract_state)
  ckpt.close()
  return restored.state


def _assert_same_values(a, b):
  fa, fb = _flat(jax.device_get(a)), _flat(jax.device_get(b))
  assert fa.keys() == fb.keys()
  for name in fa:
    np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)


def _assert_layout(state, trainer):
  for x, want in zip(jax.tree_util.tree_leaves(state),
                     jax.tree_util.tree_leaves(trainer.state_shardings)):
    assert x.sharding.is_equivalent_to(want, x.ndim)


def test_checkpoint_moves_between_fsdp_and_replicated_layouts(fsdp_run, tmp_path):
  fsdp_trainer, state, _ = fsdp_run
  replicated = _trainer(_config(dispatch="expert_parallel"), sharding.make_mesh(2, 2, 2),
                        fsdp=False)
  # The two layouts really differ, or this test proves nothing.
  wi = "['decoder_0']['mlp']['wi']"
  assert (_flat(replicated.state_shardings.params)[wi].spec
          != _flat(fsdp_trainer.state_shardings.params)[wi].spec)

  _save(state, tmp_path / "from_fsdp")
  into_replicated = _restore(tmp_path / "from_fsdp", replicated)
  _assert_layout(into_replicated, replicated)
  _assert_same_values(into_replicated, state)

  _save(into_replicated, tmp_path / "from_replicated")
  back = _restore(tmp_path / "from_replicated", fsdp_trainer)
  _assert_layout(back, fsdp_trainer)
  _assert_same_values(back, state)


# --------------------------------------------------------------------------------------------------
# Bad input.


def test_a_data_axis_that_does_not_divide_a_parameter_is_named():
  """d_model = 20 over a data axis of 8: the first "embed" weight is refused, naming itself, the
  dimension, the axis size and the fix."""
  with pytest.raises(ValueError) as info:
    _trainer(_config(d_model=20), sharding.make_mesh(8, 1, 1), fsdp=True)
  message = str(info.value)
  assert "parameter .params['decoder_0']['mlp']['wi'] of shape (20, 64)" in message
  assert "dimension 20 is not divisible" in message
  assert "total size 8" in message
  assert "FSDP" in message and "fsdp = False" in message
  # Without FSDP the same model and mesh are fine: the error is FSDP's alone.
  _trainer(_config(d_model=20), sharding.make_mesh(8, 1, 1), fsdp=False)


def test_the_fsdp_hint_is_only_for_weights_fsdp_splits():
  """An expert count the expert axis does not divide is not FSDP's doing: no FSDP hint there."""
  import flax.linen as nn
  import jax.numpy as jnp
  box = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 8, 16), jnp.float32),
                                ("expert", "embed", "mlp"))
  with pytest.raises(ValueError, match="dimension 6 is not divisible") as info:
    sharding.shard_params({"wi": box}, sharding.make_mesh(2, 4, 1), sharding.axis_rules(fsdp=True))
  assert "FSDP" not in str(info.value)
  box = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((4, 6, 16), jnp.float32),
                                ("expert", "embed", "mlp"))
  with pytest.raises(ValueError, match=r"dimension 6 is not divisible by mesh axes \('data',\) "
                                       r"of total size 4.*FSDP"):
    sharding.shard_params({"wi": box}, sharding.make_mesh(4, 2, 1), sharding.axis_rules(fsdp=True))


class _Stop(Exception):
  pass


@pytest.mark.parametrize("entry", ["train", "evaluate"])
@pytest.mark.parametrize("fsdp", [False, True])
def test_train_and_evaluate_hand_their_fsdp_setting_to_the_trainer(entry, fsdp, tmp_path,
                                                                   monkeypatch):
  """`train.fsdp` / `evaluate.fsdp` (gin's FSDP) reach the Trainer as its rules (stopped there:
  the steps themselves are the Trainer tests above)."""
  from hashmoe import train as train_lib

  seen = {}

  def trainer(*args, rules=None, **kwargs):
    seen["rules"] = rules
    raise _Stop

  class Pipeline:
    vocab_size, vocab_fingerprint = V, ""

  monkeypatch.setattr(train_lib, "Trainer", trainer)
  kwargs = dict(model_dir=str(tmp_path / "run"), model_config=_config(), task="numpy",
                batch_size=8, seq_len=16, fsdp=fsdp, input_pipeline=Pipeline())
  with pytest.raises(_Stop):
    if entry == "train":
      train_lib.train(train_steps=1, **kwargs)
    else:
      train_lib.evaluate(**kwargs)
  assert sharding.is_fsdp(seen["rules"]) is fsdp
