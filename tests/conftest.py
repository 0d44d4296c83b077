"""Test setup: 8 CPU-emulated devices, set before anything imports jax."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (pulled in by seqio) must not grab all cores or print its banner.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

import gin  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def fresh_gin_config():
  """Each test file starts with no gin bindings: `hashmoe train` run in-process (tests/test_cli.py)
  leaves its parsed config behind, and a later file's `train(...)` would otherwise pick up that
  run's TASK and register its tasks again under another vocabulary."""
  gin.clear_config()
  yield
