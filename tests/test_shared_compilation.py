"""Tests for `hashmoe.training.trainer.shared_compilation`: Trainers of one model sharing their
traced and compiled programs across seeds (what `hashmoe compare` does for a model's seeds).

The reference is each seed trained by a Trainer of its own outside the block (nothing shared):
inside it, the same seeds must give bit-equal losses and parameters while tracing the step once.
A tiny decoder with dropout (so the seed's step key matters) and a hash layer (tables in the
state's constants) on one CPU device.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from hashmoe import models, sharding
from hashmoe.training import optim
from hashmoe.training import trainer as trainer_lib

pytestmark = pytest.mark.usefixtures("compilation_cache")

V = 64
STEPS = 2


def _config():
  sparse = models.SparseConfig(router="hash", num_experts=4, layers=(1,))
  return models.tiny_config(vocab_size=V, num_encoder_layers=0, sparse=sparse, max_len=16,
                            dropout_rate=0.2)


def _batches():
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    tokens = rng.integers(1, V, size=(4, 17), dtype=np.int32)
    out.append({"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:]})
  return out


def _train(trainer):
  state = trainer.init_state()
  losses = []
  for batch in _batches():
    state, metrics = trainer.train_step(state, trainer.global_batch(batch))
    losses.append(np.asarray(metrics["loss"]))
  return losses, [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


@pytest.fixture(scope="module")
def setup():
  config = _config()
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  tx = optim.make_optimizer(1e-2, weight_decay=0.01, clip_norm=1.0)
  make = lambda seed, opt=tx: trainer_lib.Trainer(config, models.build_model(config), opt, mesh,
                                                  seed=seed)
  # Nothing shared: a Trainer, its own jitted functions and compilations per seed.
  reference = {seed: _train(make(seed)) for seed in (0, 1)}
  return make, reference


def _assert_bit_equal(got, want):
  (got_losses, got_params), (want_losses, want_params) = got, want
  for g, w in zip(got_losses + got_params, want_losses + want_params):
    np.testing.assert_array_equal(g, w)


def test_seeds_share_one_compiled_step_with_unchanged_results(setup):
  make, reference = setup
  with trainer_lib.shared_compilation():
    first = make(0)
    got0 = _train(first)
    second = make(1)
    # The second seed reuses the first one's jitted functions and their compilations.
    assert second._train_step is first._train_step  # pylint: disable=protected-access
    assert second._compiled is first._compiled  # pylint: disable=protected-access
    got1 = _train(second)
    assert len(first._compiled) == 1  # pylint: disable=protected-access
  _assert_bit_equal(got0, reference[0])
  _assert_bit_equal(got1, reference[1])
  # The seed still reaches the step (dropout masks and init differ between seeds).
  assert not np.array_equal(got0[0][-1], got1[0][-1])


def test_other_optimizer_or_outside_the_block_shares_nothing(setup):
  make, _ = setup
  other_tx = optim.make_optimizer(1e-2, weight_decay=0.01, clip_norm=1.0)
  with trainer_lib.shared_compilation():
    first = make(0)
    other = make(0, other_tx)
    assert other._train_step is not first._train_step  # pylint: disable=protected-access
    with trainer_lib.shared_compilation():  # Nested: still the outer block's programs.
      assert make(1)._train_step is first._train_step  # pylint: disable=protected-access
    assert make(1)._train_step is first._train_step  # pylint: disable=protected-access
  assert make(0)._train_step is not first._train_step  # pylint: disable=protected-access
