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


@pytest.fixture(scope="session")
def jax_cache_dir(tmp_path_factory):
  """One persistent compilation cache for the session (subprocess tests pass it on by env)."""
  return tmp_path_factory.getbasetemp() / "hashmoe_jax_cache"


@pytest.fixture(scope="module")
def compilation_cache(jax_cache_dir):
  """Identical programs (the same model in two tests) compile once; files that build many models
  opt in with `pytestmark = pytest.mark.usefixtures("compilation_cache")`."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = {name: getattr(jax.config, name) for name in names}
  jax.config.update("jax_compilation_cache_dir", str(jax_cache_dir))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  cc.reset_cache()
  yield
  for name, value in old.items():
    jax.config.update(name, value)
  cc.reset_cache()
