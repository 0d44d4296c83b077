"""Router configs (`hashmoe.routers`): what each family answers, the module it builds, and the
compatibility with configs and checkpoints written when SparseConfig held flat router fields.

The references are independent of the code under test: the flat fields are the values
`dataclasses.fields` of the old SparseConfig gave for the same models (copied from a run of the
code before the change), and the modules are the ones the old `models.make_router` built, written
out by hand.
"""
from __future__ import annotations

import dataclasses

import gin
import pytest

from hashmoe import hashing, models, routers, routing
from hashmoe.training import resume
from hashmoe.training.errors import ChangedConfigError

# One config of every family with non-default settings, and what the old flat SparseConfig
# (num_experts=8, layers=(1,)) held for the same model, field by field.
FLAT_DEFAULTS = {"num_hashes": 1, "hash_key": "token", "key_space": None, "hash_seed": 0,
                 "topk": 1, "balance_coef": 0.01, "z_loss_coef": 0.0, "jitter": 0.0,
                 "router_embed_dim": None}
CASES = {
    "hash": (routers.Hash(), {"router": "hash"}),
    "multihash": (routers.Hash(num_hashes=4, key="bigram", seed=3),
                  {"router": "hash", "num_hashes": 4, "hash_key": "bigram", "hash_seed": 3}),
    "hash_topk": (routers.HashTopK(topk=2, key_space=100),
                  {"router": "hash_topk", "topk": 2, "key_space": 100}),
    "switch": (routers.Switch(balance_coef=0.1, z_loss_coef=1e-3, jitter=0.01),
               {"router": "switch", "balance_coef": 0.1, "z_loss_coef": 0.001, "jitter": 0.01}),
    "token_switch": (routers.TokenSwitch(router_embed_dim=8),
                     {"router": "token_switch", "router_embed_dim": 8}),
    "base": (routers.Base(), {"router": "base"}),
}


def old_fields(flat):
  return {"num_experts": 8, "layers": (1,), "encoder_layers": (), "capacity_factor": None,
          "dispatch": "auto", "expert_d_ff": None, **FLAT_DEFAULTS, **flat}


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize("case", sorted(CASES))
def test_flat_fields_are_the_old_sparse_config_fields(case):
  router, flat = CASES[case]
  sparse = models.SparseConfig(router=router, num_experts=8, layers=(1,))
  assert sparse.flat_fields() == old_fields(flat)
  # And back: the flat values name the same router.
  fields = {k: v for k, v in router.flat_fields().items() if k != "router"}
  assert routers.from_flat_fields(flat["router"], **fields) == router


def test_every_family_is_registered_under_its_name_and_hashable():
  assert set(routers.REGISTRY) == {"hash", "hash_topk", "switch", "token_switch", "base", "topk",
                                   "first_layers"}
  for name, cls in routers.REGISTRY.items():
    assert cls.name == name and routers.router_config(name) == cls()
    assert hash(cls()) == hash(cls())
    with pytest.raises(dataclasses.FrozenInstanceError):
      cls().name_ = 1  # frozen: jit hashes the config
  sparse = models.SparseConfig(router="switch", layers=[1])
  assert sparse.router == routers.Switch() and hash(sparse) == hash(
      models.SparseConfig(router=routers.Switch(), layers=(1,)))


def test_what_each_family_answers():
  hash_, multi, topk = routers.Hash(), routers.Hash(num_hashes=4), routers.HashTopK(topk=3)
  assert (hash_.uses_tables, hash_.num_tables, hash_.num_slices, hash_.experts_per_token) == (
      True, 1, 1, 1)
  assert (multi.num_tables, multi.num_slices, multi.experts_per_token) == (4, 4, 1)
  assert (topk.num_tables, topk.num_slices, topk.experts_per_token) == (1, 1, 3)
  assert hash_.default_table_kind == "random" and hash_.table_kinds == hashing.TABLE_KINDS
  assert topk.default_table_kind == topk.table_kinds[0] == hashing.TOPK_KIND
  for learned in (routers.Switch(), routers.TokenSwitch(), routers.Base()):
    assert (learned.uses_tables, learned.key, learned.experts_per_token) == (False, None, 1)
    assert learned.table_key_space(64, 32) is None
  assert routers.Hash(key="position").table_key_space(64, 32) == 32
  assert routers.Hash(key="token", key_space=10).table_key_space(64, 32) == 10


def test_each_family_checks_its_own_fields():
  with pytest.raises(ValueError, match=r"Hash: unknown key 'previous'; expected one of"):
    routers.Hash(key="previous")
  with pytest.raises(ValueError, match="num_hashes must be an int >= 1, got 0"):
    routers.Hash(num_hashes=0)
  with pytest.raises(ValueError, match=r"topk must be in \[1, num_experts=4\], got 5"):
    models.SparseConfig(router=routers.HashTopK(topk=5), num_experts=4, layers=(0,))
  with pytest.raises(ValueError, match=r"unknown router 'hashh'.*routers.Hash\(\)"):
    models.SparseConfig(router="hashh", layers=(0,))
  with pytest.raises(ValueError, match=r"hash_key='bigram' does not apply to router 'switch'"):
    routers.from_flat_fields("switch", hash_key="bigram")


def _fields(module):
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.name not in ("parent", "name")}


def test_build_makes_the_modules_the_old_make_router_made():
  """Per layer: encoder layers first, seed + num_hashes * ordinal; key spaces from the key."""
  config = models.tiny_config(vocab_size=64, num_encoder_layers=2, max_len=32, sparse=(
      models.SparseConfig(router=routers.Hash(num_hashes=2, key="position", seed=5),
                          num_experts=4, layers=(1,), encoder_layers=(0,))))
  built = models.make_router(config, None, "decoder_1")
  assert _fields(built) == _fields(routing.HashRouter(4, key="position", num_hashes=2,
                                                      key_space=32, seed=5 + 2 * 1, parent=None))
  topk = dataclasses.replace(config, sparse=dataclasses.replace(
      config.sparse, router=routers.HashTopK(topk=2)))
  assert _fields(models.make_router(topk, None, "encoder_0")) == _fields(
      routing.HashTopKRouter(4, 2, key="token", key_space=64, seed=0, parent=None))
  switch = dataclasses.replace(config, sparse=dataclasses.replace(
      config.sparse, router=routers.TokenSwitch(balance_coef=0.1, router_embed_dim=8),
      capacity_factor=1.5))
  assert _fields(models.make_router(switch, None, "decoder_1")) == _fields(routing.SwitchRouter(
      4, balance_coef=0.1, capacity_factor=1.5, token_based=True, vocab_size=64,
      router_embed_dim=8, parent=None))
  base = dataclasses.replace(config, sparse=dataclasses.replace(config.sparse,
                                                                router=routers.Base()))
  assert _fields(models.make_router(base, None, "decoder_1")) == _fields(
      routing.BaseRouter(4, parent=None))


def test_gin_passes_a_router_config_in():
  gin.parse_config("""
      SparseConfig.router = @routers.Hash()
      routers.Hash.key = 'bigram'
      routers.Hash.num_hashes = 2
      SparseConfig.layers = [1]
      a/SparseConfig.router = @routers.Switch()
      a/SparseConfig.layers = [0]
      a/routers.Switch.balance_coef = 0.1
  """)
  sparse_config = gin.get_configurable("hashmoe.models.SparseConfig")
  assert sparse_config().router == routers.Hash(key="bigram", num_hashes=2)
  with gin.config_scope("a"):
    assert sparse_config().router == routers.Switch(balance_coef=0.1)


# Where each flat field went (a field every Switch has is named on Switch).
MOVED = {"hash_key": ["Hash.key", "HashTopK.key"], "key_space": ["Hash.key_space",
                                                                  "HashTopK.key_space"],
         "hash_seed": ["Hash.seed", "HashTopK.seed"], "num_hashes": ["Hash.num_hashes"],
         "topk": ["HashTopK.topk"], "balance_coef": ["Switch.balance_coef"],
         "z_loss_coef": ["Switch.z_loss_coef"], "jitter": ["Switch.jitter"],
         "router_embed_dim": ["TokenSwitch.router_embed_dim"]}


@pytest.mark.parametrize("field", sorted(MOVED))
def test_every_moved_field_names_its_new_binding(field):
  assert set(MOVED) == set(routers.LEGACY_DEFAULTS)
  message = routers.moved_binding("hashmoe.models.SparseConfig", field)
  expected = " or ".join(
      f"routers.{home} (with SparseConfig.router = @routers.{home.split('.')[0]}())"
      for home in MOVED[field])
  assert message == f"SparseConfig.{field} moved to the router config: bind {expected}"
  for home in MOVED[field]:
    cls, param = home.split(".")
    assert param in {f.name for f in dataclasses.fields(getattr(routers, cls))}
  assert routers.moved_binding("SparseConfig", "num_experts") is None
  assert routers.moved_binding("TransformerConfig", field) is None


# --------------------------------------------------------------------------------------------------
# Checkpoints written before router configs.

# What `run_settings` recorded for cpu_tiny.gin's model before the change (a real checkpoint's
# "settings", less the task and vocabulary).
OLD_SETTINGS = {
    "TransformerConfig.sparse": "SparseConfig", "SparseConfig.router": "hash",
    "SparseConfig.num_experts": 16, "SparseConfig.layers": [1], "SparseConfig.encoder_layers": [],
    "SparseConfig.num_hashes": 1, "SparseConfig.hash_key": "token", "SparseConfig.key_space": None,
    "SparseConfig.hash_seed": 0, "SparseConfig.topk": 1, "SparseConfig.expert_d_ff": None,
    "SparseConfig.router_embed_dim": None, "train.hash_tables": "balanced"}


def _settings(router):
  config = models.tiny_config(vocab_size=512, num_encoder_layers=0, max_len=256, sparse=(
      models.SparseConfig(router=router, num_experts=16, layers=(1,))))
  return resume.run_settings(config, task="t", seq_len=64, batch_size=8, seed=0,
                             hash_tables="balanced", vocab_fingerprint="f")


def test_run_settings_record_the_old_names_and_values():
  settings = _settings(routers.Hash())
  assert {k: v for k, v in settings.items() if k in OLD_SETTINGS} == OLD_SETTINGS
  assert not any(k.startswith("SparseConfig.") and k not in OLD_SETTINGS for k in settings)
  old = {**settings, **OLD_SETTINGS}
  assert resume.check_resume({"settings": old}, step=2, settings=settings, config_text="",
                             model_dir="/runs/x") == []
  with pytest.raises(ChangedConfigError, match=r"SparseConfig.hash_key: 'token' -> 'bigram'"):
    resume.check_resume({"settings": old}, step=2,
                        settings=_settings(routers.Hash(key="bigram")), config_text="",
                        model_dir="/runs/x")


def test_a_checkpoint_with_only_flat_gin_text_is_refused_naming_why():
  """Checkpoints that recorded only their gin text are compared binding by binding: a flat
  router field this run no longer binds cannot be compared, so the resume is refused."""
  old = "SparseConfig.router = 'hash'\nSparseConfig.hash_key = 'token'\n"
  new = "SparseConfig.router = @routers.Hash()\nHash.key = 'bigram'\n"
  with pytest.raises(ChangedConfigError, match=r"SparseConfig.hash_key: 'token' -> \(not set\)"
                     r"[\s\S]*flat SparseConfig fields, which now live in the router configs"):
    resume.check_resume({"operative_config": old}, step=2, settings={}, config_text=new,
                        model_dir="/runs/x")
