"""The init program compiled at XLA:CPU's LLVM O1 (`trainer._init_compiler_options`) gives the same
state, bit for bit, as the same program at XLA's default (O2).

The reference is the Trainer's own init function jitted again without compiler options. The
models are the default `hashmoe compare`'s (dense, Switch, Hash at 64 experts, the preset's
shapes), and the hash model also with tables attached (its per-run init program, tables baked in).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from hashmoe import hash_functions, models
from hashmoe.compare import configs
from hashmoe.compare.specs import PRESETS, default_experiment
from hashmoe.training import trainer as trainer_lib

SETTINGS = PRESETS["default"]


def _trainer(name: str, seed: int) -> trainer_lib.Trainer:
  spec = default_experiment([name]).models[0]
  config = configs.model_config(spec, SETTINGS, vocab_size=SETTINGS.vocab_size,
                                **({"balance_coef": 0.01} if spec.tuned else {}))
  return trainer_lib.Trainer(config, models.build_model(config),
                             configs.make_optimizer(SETTINGS), configs.mesh(SETTINGS), seed=seed)


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def _assert_bit_equal(mine, reference):
  mine, reference = _leaves(mine), _leaves(reference)
  assert len(mine) == len(reference)
  for a, b in zip(mine, reference):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def test_the_init_program_is_compiled_at_o1_on_cpu():
  assert trainer_lib._init_compiler_options() == {"xla_backend_optimization_level": 1}


@pytest.mark.parametrize("name", ["dense", "switch", "hash"])
def test_init_at_o1_equals_the_default_compilation(name):
  trainer = _trainer(name, seed=1)
  with trainer.context():
    reference = jax.jit(lambda key: nn.unbox(trainer._init_boxed(trainer.model, key)),
                        out_shardings=trainer.state_shardings)(trainer._init_key)
  _assert_bit_equal(trainer.init_state(), reference)


def test_init_with_attached_tables_at_o1_equals_the_default_compilation():
  trainer = _trainer("hash", 0)
  sparse = trainer.config.sparse
  tables = hash_functions.build_multihash("random", 1, num_experts=sparse.num_experts,
                                          vocab_size=SETTINGS.vocab_size, seed=7)
  init_model = models.build_model(trainer.config, {name: tables for name in
                                                   models.table_layer_names(trainer.config)})
  with trainer.context():
    reference = jax.jit(lambda key: nn.unbox(trainer._init_boxed(init_model, key)),
                        out_shardings=trainer.state_shardings)(trainer._init_key)
  mine = trainer.init_state(init_model)
  _assert_bit_equal(mine, reference)
  table = jax.tree.leaves(jax.device_get(mine.constants["hash_tables"]))[0]
  np.testing.assert_array_equal(np.asarray(table)[0], tables[0].table)
