"""A checkpoint written before the trainer was split into `hashmoe/training/` still restores.

The fixture (tests/fixtures/old_checkpoint/) was written by the code of commit 6132bef with
`make_old_checkpoint.py` beside it, which also recorded what to expect (expected.json): the sha256
of every array of the checkpoint, read with orbax alone, and the losses of the run resumed from it
by that same code. Nothing here is compared with numbers the current code computes for itself.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from hashmoe import models, sharding
from hashmoe import train as train_lib
from hashmoe.training import checkpoints, optim
from hashmoe.training.trainer import Trainer

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "old_checkpoint"

pytestmark = pytest.mark.usefixtures("compilation_cache")


def _maker():
  spec = importlib.util.spec_from_file_location("make_old_checkpoint",
                                                FIXTURE / "make_old_checkpoint.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def expected():
  return json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture
def model_dir(tmp_path):
  """A copy of the fixture's MODEL_DIR (a resumed run writes into it)."""
  return Path(shutil.copytree(FIXTURE / "model_dir", tmp_path / "model_dir"))


def _digests(tree):
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    out[jax.tree_util.keystr(path)] = {"shape": list(a.shape), "dtype": a.dtype.name,
                                       "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
  return out


def test_restore_params_reads_every_array_of_an_old_checkpoint_bit_for_bit(model_dir, expected):
  maker = _maker()
  config = maker.config()
  trainer = Trainer(config, models.build_model(config), optax.identity(), sharding.make_mesh())
  params, constants, meta, step = checkpoints.restore_params(model_dir, trainer.abstract_state)
  assert step == expected["step"]
  assert _digests({"params": params, "constants": constants}) == expected["arrays"]
  assert [d["kind"] for d in meta["layers"]["decoder_1"]] == [maker.TABLES]


def test_an_old_checkpoint_resumes_with_the_losses_the_old_code_had(model_dir, expected):
  maker = _maker()
  result = train_lib.train(**maker.train_kwargs(model_dir, 4, optim))
  assert result.start_step == expected["resumed_start_step"] == 2 and result.step == 4
  logged = {str(r["step"]): r["loss"]
            for r in map(json.loads, open(model_dir / "metrics.jsonl")) if r["step"] > 2}
  assert logged.keys() == expected["resumed_losses"].keys()
  np.testing.assert_allclose([logged[k] for k in sorted(logged)],
                             [expected["resumed_losses"][k] for k in sorted(logged)], rtol=1e-6)
