"""What a comparison's specs and settings become for one run: its model config, optimiser and mesh.

A `ModelSpec` is applied to a base model gin file of the comparison's scale
(configs/models/<scale>/<base>.gin, decoder-only, with the task's vocabulary): `model_config`.
Every run's optimiser is `hashmoe train`'s own, as configs/runs/compare.gin binds it
(`make_optimizer`), with the comparison's learning rate, warm-up and steps; and every run splits
its batch over the same devices (`mesh`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import gin
import jax
import optax

from hashmoe import cli, gin_utils, models, sharding
from hashmoe.compare.specs import Experiment, ModelSpec, Settings, configs_dir, isolated_gin
from hashmoe.training import optim

# The run config every run's optimiser comes from (relative to configs/).
RUN_CONFIG = "runs/compare.gin"


def mesh(settings: Settings):
  """The ("data", "expert", "model") mesh of every run: the batch split over `devices`."""
  available = jax.devices()
  count = len(available) if settings.devices is None else settings.devices
  if count > len(available):
    raise ValueError(f"devices={count}, but only {len(available)} are available")
  return sharding.make_mesh(devices=available[:count])


def make_optimizer(settings: Settings) -> optax.GradientTransformation:
  """Every run's optimiser: `hashmoe.train.make_optimizer` and its learning-rate schedule as
  configs/runs/compare.gin binds them (pretrain.gin's AdamW, b2 = 0.98, linear warm-up then
  inverse square root, clipping at global norm 1), with the settings' learning rate, warm-up and
  steps in its LEARNING_RATE, WARMUP_STEPS and TRAIN_STEPS macros."""
  with isolated_gin():
    cli.parse_gin(
        [RUN_CONFIG],
        [f"LEARNING_RATE = {float(settings.learning_rate)!r}",
         f"WARMUP_STEPS = {int(settings.warmup_steps)}",
         f"TRAIN_STEPS = {int(settings.steps)}",
         # The file's `train` bindings need these; a comparison passes every argument of `train`
         # itself, so they are never read.
         "MODEL_DIR = None", "MODEL_CONFIG = None", "TASK = None"])
    return optim.make_optimizer()


def _base_model_values(config=gin.REQUIRED, sparse_layers=gin.REQUIRED):
  return config, sparse_layers


# compare is imported lazily, possibly in a process whose gin config a `hashmoe train` finalised
# (and locked) before: registering then would raise.
with gin.unlock_config():
  _base_model_values = gin.configurable(_base_model_values, module="hashmoe.compare")


_BASE_CACHE: dict[tuple[str, str, int], tuple[Any, tuple[int, ...]]] = {}


def base_model(scale: str, base: str, vocab_size: int):
  """(TransformerConfig, default sparse layers) of configs/models/<scale>/<base>.gin, decoder-only
  with `vocab_size` pieces."""
  key = (scale, base, vocab_size)
  if key not in _BASE_CACHE:
    path = configs_dir() / "models" / scale / f"{base}.gin"
    if not path.is_file():
      raise FileNotFoundError(f"base model {os.fspath(path)} not found")
    gin_utils.register_configurables()  # The names the model files bind.
    with isolated_gin():
      gin.add_config_file_search_path(os.fspath(configs_dir()))
      gin.parse_config_files_and_bindings(
          [os.fspath(path)],
          [f"hashmoe.models.TransformerConfig.vocab_size = {int(vocab_size)}",
           "hashmoe.models.TransformerConfig.num_encoder_layers = 0",
           "hashmoe.compare._base_model_values.config = %MODEL_CONFIG",
           "hashmoe.compare._base_model_values.sparse_layers = %SPARSE_LAYERS"])
      config, layers = _base_model_values()
    _BASE_CACHE[key] = (config, tuple(int(i) for i in layers))
  return _BASE_CACHE[key]


def model_config(spec: ModelSpec, settings: Settings, *, vocab_size: int,
                 balance_coef: Optional[float] = None):
  """The TransformerConfig of `spec` in this comparison: its base model with the spec's overrides
  and router (raises ValueError, naming the model, if the model refuses them).

  Args:
    spec: the model.
    settings: gives the scale, the default number of experts and, for a tuned router without a
      coefficient of this run, the first of the grid.
    vocab_size: the task's vocabulary.
    balance_coef: the router's coefficient in this run (tuned models); None keeps the spec's.
  """
  base, default_layers = base_model(settings.scale, spec.base, vocab_size)
  changes: dict[str, Any] = {}
  if spec.num_layers is not None:
    changes["num_layers"] = int(spec.num_layers)
  if spec.d_ff is not None:
    changes["d_ff"] = int(spec.d_ff)
  try:
    if spec.router is None:
      changes["sparse"] = None
    else:
      router = spec.router
      if balance_coef is None and spec.tuned:
        balance_coef = settings.balance_coefs[0]
      if balance_coef is not None:
        router = router.replace(balance_coef=float(balance_coef))
      changes["sparse"] = models.SparseConfig(
          router=router, num_experts=int(spec.num_experts or settings.num_experts),
          layers=spec.layers if spec.layers is not None else default_layers,
          capacity_factor=spec.capacity_factor, expert_d_ff=spec.expert_d_ff,
          num_shared_experts=spec.num_shared_experts)
    return dataclasses.replace(base, **changes)
  except ValueError as e:
    raise ValueError(f"model {spec.name!r}: {e}") from e


def validate_experiment(experiment: Experiment, settings: Settings, *,
                        vocab_size: Optional[int] = None) -> dict[str, Any]:
  """Builds every model's config (no training); returns {name: TransformerConfig}."""
  vocab = settings.vocab_size if vocab_size is None else vocab_size
  return {m.name: model_config(m, settings, vocab_size=vocab) for m in experiment.models}


def param_counts(config) -> dict[str, int]:
  """`hashmoe.models.param_counts`; a predicted-future hash layer is counted as a token hash layer
  (hash routers have no parameters, and models' abstract init has no predictions to route on)."""
  if config.sparse is not None and config.sparse.router.key == "predicted_future":
    config = dataclasses.replace(config, sparse=dataclasses.replace(
        config.sparse, router=config.sparse.router.replace(key="token")))
  return models.param_counts(config)

