"""Loss coefficients fed to the steps at run time (`hashmoe.routing.runtime_loss_coefficients`).

Switch's load-balancing coefficient is an argument of the trainer's compiled step, so that the
runs of a coefficient sweep share one program. The reference is the same step traced with the
coefficient as a constant of the program (the router's own attribute, no run-time value): a
Trainer's steps must give bit-equal losses and parameters to it, for each coefficient, while
runs of different coefficients share their jitted step.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from hashmoe import models, routers, sharding
from hashmoe.training import optim
from hashmoe.training import trainer as trainer_lib

pytestmark = pytest.mark.usefixtures("compilation_cache")

V = 64
STEPS = 3


def _config(coef: float):
  sparse = models.SparseConfig(router=routers.Switch(balance_coef=coef), num_experts=4,
                               layers=(1,))
  return models.tiny_config(vocab_size=V, num_encoder_layers=0, sparse=sparse, max_len=16)


def _batches():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, V, size=(STEPS, 4, 17), dtype=np.int32)
  return [{"decoder_input_tokens": t[:, :-1], "decoder_target_tokens": t[:, 1:]} for t in tokens]


def _run(trainer, step):
  state = trainer.init_state()
  losses = []
  for batch in _batches():
    state, metrics = step(state, trainer.global_batch(batch))
    losses.append(np.asarray(metrics["loss"]))
  return losses, [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def _constant_step(trainer):
  """The step with the coefficient a constant: the body traced outside any run-time values."""
  # pylint: disable-next=protected-access
  body = jax.jit(trainer._step_body, donate_argnums=(0,))
  return lambda state, batch: body(state, batch, trainer._step_key)  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def make():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  tx = optim.make_optimizer(1e-2, weight_decay=0.01, clip_norm=1.0)
  return lambda coef: trainer_lib.Trainer(_config(coef), models.build_model(_config(coef)), tx,
                                          mesh, seed=0)


@pytest.fixture(scope="module")
def constant_runs(make):
  """{coef: (losses, params)} of the constant-coefficient step: the reference."""
  runs = {}
  for coef in (0.0, 0.1):
    trainer = make(coef)
    runs[coef] = _run(trainer, _constant_step(trainer))
  return runs


def _assert_bit_equal(got, want):
  for a, b in zip(got[0] + got[1], want[0] + want[1], strict=True):
    np.testing.assert_array_equal(a, b)


def test_the_coefficients_are_the_routers_own_and_programs_are_keyed_without_them():
  config = _config(0.1)
  assert models.runtime_loss_coefficients(config) == {"balance_coef": np.float32(0.1)}
  assert models.runtime_loss_coefficients(dataclasses.replace(config, sparse=None)) == {}
  hashed = dataclasses.replace(config, sparse=dataclasses.replace(config.sparse,
                                                                  router=routers.Hash()))
  assert models.runtime_loss_coefficients(hashed) == {}
  assert models.program_config(hashed) is hashed
  assert models.program_config(config) == models.program_config(_config(0.001))
  assert models.program_config(config) != models.program_config(
      dataclasses.replace(config, d_ff=config.d_ff * 2))


def test_runs_of_two_coefficients_share_the_step_and_each_trains_with_its_own(make,
                                                                              constant_runs):
  with trainer_lib.shared_compilation():
    low, high, half = make(0.0), make(0.1), make(0.05)
    assert high._train_step is low._train_step  # pylint: disable=protected-access
    assert half._eval_step is low._eval_step  # pylint: disable=protected-access
    low_run, high_run = _run(low, low.train_step), _run(high, high.train_step)
    # Each gives its own coefficient's constant-program bits, and the coefficient matters.
    _assert_bit_equal(low_run, constant_runs[0.0])
    _assert_bit_equal(high_run, constant_runs[0.1])
    assert any(not np.array_equal(a, b) for a, b in zip(low_run[1], high_run[1]))
    # Evaluation reports the aux loss with the run's own coefficient: 0, and a halving (exact in
    # float32) for half the coefficient.
    state, batch = low.init_state(), low.global_batch(_batches()[0])
    aux = {c: float(t.eval_step(state, batch)["aux_loss"]) for c, t in
           ((0.0, low), (0.1, high), (0.05, half))}
  assert aux[0.0] == 0.0 and aux[0.1] > 0.0
  assert aux[0.05] == pytest.approx(aux[0.1] / 2, rel=1e-6)
