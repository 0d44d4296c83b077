"""What a comparison is: its settings, its models (`ModelSpec`) and its experiments.

Everything here is plain data, validated on construction: `Settings` (what every run of one
comparison shares; `PRESETS` holds the default and --quick ones), `ModelSpec` (one model: a
router config and a table, experts, sparse layers ... over a base model gin file) and `Experiment` (a list of ModelSpecs and
the settings it fixes). The paper's experiments are gin files under configs/experiments/
(`load_experiment`); `model_preset` names the ModelSpecs `--models` takes without one.

How a ModelSpec becomes a model and a Settings an optimiser is `hashmoe.compare.configs`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import gin
import numpy as np

from hashmoe import cli

PathLike = Union[str, os.PathLike]

# Models of the default comparison: the paper's central claim (Section 5.2, Figure 2).
DEFAULT_MODELS = ("dense", "switch", "hash")
BASES = ("baseline", "wider", "deeper")
SCALES = ("tiny", "paper")
TABLE_KINDS = ("random", "balanced", "clustered", "dispersed")
EXPERIMENTS_SUBDIR = "experiments"


# --------------------------------------------------------------------------------------------------
# Settings shared by every run of a comparison.


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything every model of one comparison shares.

  Attributes:
    steps: training steps of every run.
    batch_size: sequences per step (divisible by the number of devices).
    seq_len: tokens per sequence (packed rows).
    seeds: runs per model; seed s sets parameter init, per-step dropout keys, the training data
      order and random hash tables, identically for every model.
    num_experts: experts of a sparse model whose ModelSpec does not fix its own.
    vocab_size: SentencePiece BPE pieces trained on the training split.
    learning_rate, warmup_steps: the peak learning rate after a linear warm-up of that many
      steps: LEARNING_RATE and WARMUP_STEPS of configs/runs/compare.gin, whose optimiser and
      schedule (AdamW, then inverse square root) every run uses.
    evals: evaluations per run (the points of the perplexity curve; the last is at `steps`).
    eval_batches: fixed validation (and test) batches every evaluation uses.
    balance_coefs: the grid Switch's load-balancing coefficient is tuned over (Section 5.1).
    scale: the folder of model gin files the base models come from (configs/models/<scale>/).
    log_period: steps between metrics.jsonl records (each is one tokens/s window).
    test_eval: also evaluate the final model on the test split.
    devices: how many of the local devices the batch is split over (None: all).
  """
  steps: int
  batch_size: int
  seq_len: int
  seeds: int
  num_experts: int
  vocab_size: int
  learning_rate: float
  warmup_steps: int
  evals: int
  eval_batches: int
  balance_coefs: tuple[float, ...]
  scale: str = "tiny"
  log_period: int = 10
  test_eval: bool = True
  devices: Optional[int] = None

  def __post_init__(self):
    object.__setattr__(self, "balance_coefs", tuple(float(c) for c in self.balance_coefs))
    for name in ("steps", "batch_size", "seq_len", "seeds", "num_experts", "evals",
                 "eval_batches", "log_period"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if self.seq_len < 2:
      raise ValueError(f"seq_len must be >= 2 (a token and EOS), got {self.seq_len}")
    if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
      raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
    if self.warmup_steps < 0:
      raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
    if not self.balance_coefs or any(c < 0 or not math.isfinite(c) for c in self.balance_coefs):
      raise ValueError(f"balance_coefs must be a non-empty list of numbers >= 0, got "
                       f"{self.balance_coefs}")
    if len(set(self.balance_coefs)) != len(self.balance_coefs):
      raise ValueError(f"balance_coefs repeats a value: {self.balance_coefs}")
    if self.scale not in SCALES:
      raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
    if self.devices is not None and (not isinstance(self.devices, int) or self.devices < 1):
      raise ValueError(f"devices must be None (all) or a positive int, got {self.devices!r}")

  @property
  def eval_period(self) -> int:
    return max(1, self.steps // self.evals)


# The default fits ~10 minutes of this 2-core machine and the quick one ~2 minutes (measured and
# explained in docs/RESULTS.md). 64 experts: the paper's main setting (Section 5.2, Tables 2-3);
# measured here, a 64-expert layer trains as fast as a 16-expert one at this batch (the CPU grouped
# matmul's cost follows the tokens, not E), so the budget does not force fewer.
PRESETS: dict[str, Settings] = {
    "default": Settings(steps=400, batch_size=16, seq_len=128, seeds=2, num_experts=64,
                        vocab_size=1024, learning_rate=3e-3, warmup_steps=50, evals=8,
                        eval_batches=16, balance_coefs=(0.001, 0.01, 0.1)),
    "quick": Settings(steps=150, batch_size=8, seq_len=64, seeds=1, num_experts=64,
                      vocab_size=512, learning_rate=3e-3, warmup_steps=20, evals=5,
                      eval_batches=8, balance_coefs=(0.01, 0.1), log_period=5),
}


# --------------------------------------------------------------------------------------------------
# Models and experiments (gin-configurable: configs/experiments/*.gin).


def _routers():
  """`hashmoe.routers`, imported when a ModelSpec needs it: it imports JAX and Flax (seconds), and
  every `hashmoe` command builds compare's flags from this module."""
  from hashmoe import routers  # pylint: disable=g-import-not-at-top
  return routers


@gin.configurable(module="hashmoe.compare")
@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One model of a comparison: a base model (a size file, configs/models/<scale>/<base>.gin) and,
  for a sparse model, a router config with the comparison's overrides of the sparse layers.

  The router is a `hashmoe.routers` config, as a model file binds it; it holds its own settings
  (hash key, MultiHash N, Switch's coefficient, top-k) and checks them. An experiment file reads:

      bigram/ModelSpec.router = @routers.Hash()
      bigram/routers.Hash.key = 'bigram'

  Attributes:
    name: the model's name in tables, files and `--models`.
    router: None (dense), a `hashmoe.routers` config, or a family name ("switch") for that
      family's defaults.
    num_experts: E; None takes the comparison's `--experts`.
    table: how a router with tables gets them: "balanced" (greedy on the training split's counts
      of the hash key, §3.1; a balanced top-k table for `routers.HashTopK`), "random",
      "clustered" / "dispersed" (k-means over the dense baseline's token embeddings).
    tuned: tune the router's balance_coef on validation perplexity over the comparison's grid
      (Section 5.1); for routers with a balance_coef (Switch, TokenSwitch). False keeps the
      router's own.
    layers: 0-based decoder layers made sparse; None: the base model's SPARSE_LAYERS.
    capacity_factor: Switch capacity (None: dropless).
    base: the base model gin file under configs/models/<scale>/: "baseline", "wider", "deeper".
    num_layers: overrides the base model's decoder depth.
    d_ff: overrides the dense FFN width (and the experts', which default to it).
    expert_d_ff: hidden size of each expert (None: the dense FFN's d_ff).
  """
  name: str
  router: Any = None
  num_experts: Optional[int] = None
  table: str = "balanced"
  tuned: bool = False
  layers: Optional[tuple[int, ...]] = None
  capacity_factor: Optional[float] = None
  base: str = "baseline"
  num_layers: Optional[int] = None
  d_ff: Optional[int] = None
  expert_d_ff: Optional[int] = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name or not all(
        c.isalnum() or c in "_-." for c in self.name):
      raise ValueError(f"model name must be a non-empty string of letters, digits, '_', '-', "
                       f"'.', got {self.name!r}")
    if self.router is not None:
      try:
        object.__setattr__(self, "router", _routers().router_config(self.router))
      except ValueError as e:
        raise ValueError(f"model {self.name!r}: router must be None (dense) or {e}") from e
    if self.table not in TABLE_KINDS:
      raise ValueError(f"model {self.name!r}: table must be one of {TABLE_KINDS}, got "
                       f"{self.table!r}")
    if self.base not in BASES:
      raise ValueError(f"model {self.name!r}: base must be one of {BASES}, got {self.base!r}")
    if self.layers is not None:
      object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
    if self.router is None and (self.num_experts is not None or self.layers is not None
                                or self.tuned or self.expert_d_ff is not None):
      raise ValueError(f"model {self.name!r} is dense (router=None) but sets sparse options")
    if not self.uses_tables and self.table != "balanced":
      raise ValueError(f"model {self.name!r}: table applies to routers with tables, the router "
                       f"is {self._router_name!r}")
    if self.tuned and "balance_coef" not in {f.name for f in dataclasses.fields(self.router)}:
      raise ValueError(f"model {self.name!r}: tuned tunes the router's balance_coef, which router "
                       f"{self._router_name!r} does not have")

  @property
  def _router_name(self) -> Optional[str]:
    return None if self.router is None else self.router.name

  @property
  def uses_tables(self) -> bool:
    return self.router is not None and self.router.uses_tables

  @property
  def key(self) -> Optional[str]:
    """What the router's hash looks at (None: dense, or a learned router)."""
    return None if self.router is None else self.router.key

  @property
  def table_kind(self) -> Optional[str]:
    """The kind of the run's hash tables (`hashing.TABLE_KINDS`, `hashing.TOPK_KIND`): `table`,
    or the router's own kind where it takes no other (a top-k table); None without tables."""
    if not self.uses_tables:
      return None
    return self.table if self.table in self.router.table_kinds else self.router.default_table_kind

  @property
  def balance_coef(self) -> Optional[float]:
    """The router's fixed load-balancing coefficient (None: tuned, or a router without one)."""
    return None if self.tuned else getattr(self.router, "balance_coef", None)

  @property
  def needs_baseline(self) -> bool:
    """Whether this model's hash tables or keys come from a trained dense baseline."""
    return self.uses_tables and (self.table in ("clustered", "dispersed")
                                 or self.key == "predicted_future")

  def describe(self) -> str:
    if self.router is None:
      return "dense" if self.base == "baseline" else f"dense ({self.base})"
    parts = [self.router.name]
    if self.uses_tables:
      parts.append(f"{self.table} table, key {self.key}")
      if self.router.num_slices > 1:
        parts.append(f"{self.router.num_slices} hashes")
    combine = getattr(self.router, "combine", "prob")
    if combine != "prob":
      parts.append(f"combine weight {combine}")
    if not getattr(self.router, "exclude_padding", True):
      parts.append("padding in the aux losses")
    return ", ".join(parts)

  def record(self) -> dict[str, Any]:
    """The spec as results.json and a run's identity keep it: the flat fields ModelSpec had before
    router configs (router by name, hash_key, num_hashes, balance_coef, topk), so that results and
    finished runs of earlier comparisons read and match the same; and "router_settings", the
    router's fields that never were flat ones (Switch's combine and exclude_padding), for routers
    that have such fields. (So a Switch run finished before those fields existed, when its
    auxiliary losses still counted padding, is not reused.)"""
    flat = {"router": None, **_routers().LEGACY_DEFAULTS} if self.router is None else (
        self.router.flat_fields())
    own = {} if self.router is None else {
        name.rsplit(".", 1)[-1]: value for name, value in self.router.own_settings().items()}
    record = {"name": self.name, "router": flat["router"], "num_experts": self.num_experts,
              "table": self.table, "hash_key": flat["hash_key"], "num_hashes": flat["num_hashes"],
              "layers": self.layers, "balance_coef": self.balance_coef,
              "capacity_factor": self.capacity_factor, "base": self.base,
              "num_layers": self.num_layers, "d_ff": self.d_ff, "expert_d_ff": self.expert_d_ff,
              "topk": flat["topk"]}
    if own:
      record["router_settings"] = own
    return record


# `--models` names without an experiment file (the default experiment uses the first three).
# A router is named by its family and the settings that differ from the family's defaults.
_PRESET_ARGS: dict[str, dict[str, Any]] = {
    "dense": {},
    "switch": {"router": ("switch", {}), "tuned": True},
    "hash": {"router": ("hash", {}), "table": "balanced"},
    "hash_random": {"router": ("hash", {}), "table": "random"},
    "multihash": {"router": ("hash", {"num_hashes": 4})},
    "token_switch": {"router": ("token_switch", {}), "tuned": True},
    "base": {"router": ("base", {})},
    "wider": {"base": "wider"},
    "deeper": {"base": "deeper"},
}
PRESET_NAMES = tuple(_PRESET_ARGS)


def model_preset(name: str) -> ModelSpec:
  """The ModelSpec `--models NAME` means without an experiment file."""
  if name not in _PRESET_ARGS:
    raise ValueError(f"unknown model {name!r}; expected one of {list(PRESET_NAMES)} (or pass "
                     "--experiment to use an experiment file's models)")
  args = dict(_PRESET_ARGS[name])
  if "router" in args:
    family, settings = args["router"]
    args["router"] = _routers().REGISTRY[family](**settings)
  return ModelSpec(name, **args)


@gin.configurable(module="hashmoe.compare")
@dataclasses.dataclass(frozen=True)
class Experiment:
  """A comparison: its models and the settings it fixes.

  Attributes:
    name: names the default output folder.
    models: the ModelSpecs, in table order (names unique).
    description: what the experiment reproduces (printed, and kept in results.json).
    baseline: name of the dense model whose embeddings/predictions clustered, dispersed and
      predicted-future hashes use (trained first).
    overrides: Settings fields the experiment fixes ({"num_experts": 64, "seeds": 3, ...});
      command-line flags still win.
  """
  name: str = "default"
  models: tuple[ModelSpec, ...] = ()
  description: str = ""
  baseline: str = "dense"
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    object.__setattr__(self, "models", tuple(self.models))
    object.__setattr__(self, "overrides", dict(self.overrides))
    if not self.models:
      raise ValueError(f"experiment {self.name!r} lists no models")
    for m in self.models:
      if not isinstance(m, ModelSpec):
        raise TypeError(f"experiment {self.name!r}: models must be ModelSpecs, got "
                        f"{type(m).__name__}: {m!r}")
    names = [m.name for m in self.models]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise ValueError(f"experiment {self.name!r} repeats model names {repeated}")
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(self.overrides) - fields)
    if unknown:
      raise ValueError(f"experiment {self.name!r}: overrides {unknown} are not Settings fields "
                       f"{sorted(fields)}")
    if any(m.needs_baseline for m in self.models):
      base = {m.name: m for m in self.models}.get(self.baseline)
      if base is None or base.router is not None:
        raise ValueError(
            f"experiment {self.name!r}: models {[m.name for m in self.models if m.needs_baseline]}"
            f" use a trained dense baseline, but baseline={self.baseline!r} is not a dense model "
            f"of the experiment (models: {names})")

  def select(self, names: Sequence[str]) -> "Experiment":
    """The experiment restricted to `names` (in the given order), plus the dense baseline when a
    selected model needs it."""
    known = {m.name: m for m in self.models}
    unknown = [n for n in names if n not in known]
    if unknown:
      raise ValueError(f"unknown model(s) {unknown} for experiment {self.name!r}; its models are "
                       f"{list(known)}")
    if len(set(names)) != len(names):
      raise ValueError(f"--models repeats a name: {list(names)}")
    chosen = [known[n] for n in names]
    if any(m.needs_baseline for m in chosen) and self.baseline not in names:
      chosen.insert(0, known[self.baseline])
    return dataclasses.replace(self, models=tuple(chosen))


def default_experiment(models: Sequence[str] = DEFAULT_MODELS) -> Experiment:
  """An experiment of `model_preset`s by name (the default: dense, Switch, balanced Hash)."""
  unknown = [m for m in models if m not in _PRESET_ARGS]
  if unknown:
    raise ValueError(f"unknown model(s) {unknown}; expected names from {list(PRESET_NAMES)} "
                     "(or pass --experiment to use an experiment file's models)")
  if len(set(models)) != len(models):
    raise ValueError(f"--models repeats a name: {list(models)}")
  return Experiment(name="default", models=tuple(model_preset(m) for m in models),
                    description="Dense baseline vs Switch (load balancing tuned on validation) vs "
                    "Hash (balanced) at equal active compute: the paper's central claim "
                    "(Roller et al. 2021, Section 5.2).")


def configs_dir() -> Path:
  """The gin configs folder (see `hashmoe.cli.configs_dir`)."""
  path = cli.configs_dir()
  if path is None:
    raise FileNotFoundError("no configs/ folder found beside the hashmoe package; set "
                            "HASHMOE_CONFIGS to the configs/ folder of a hashmoe checkout")
  return path


def experiment_path(name_or_path: PathLike) -> Path:
  """A file, or the name of one under configs/experiments/ ("hash_functions" or
  "hash_functions.gin")."""
  path = Path(name_or_path)
  if path.is_file():
    return path
  root = configs_dir() / EXPERIMENTS_SUBDIR
  for candidate in (root / path.name, root / f"{path.name}.gin"):
    if candidate.is_file():
      return candidate
  available = sorted(p.stem for p in root.glob("*.gin")) if root.is_dir() else []
  raise FileNotFoundError(f"experiment {os.fspath(name_or_path)!r} is neither a file nor one of "
                          f"{available} under {root}")


def list_experiments() -> dict[str, Path]:
  root = configs_dir() / EXPERIMENTS_SUBDIR
  return {p.stem: p for p in sorted(root.glob("*.gin"))}


@contextlib.contextmanager
def isolated_gin() -> Iterator[None]:
  """Parses in a clean gin config and leaves a clean one: experiment files and base models must
  neither see nor leave bindings (training is called with explicit arguments only)."""
  gin.clear_config()
  try:
    yield
  finally:
    gin.clear_config()


def load_experiment(name_or_path: PathLike) -> Experiment:
  """Parses an experiment gin file (`configs/experiments/`) and returns its Experiment.

  The file binds `hashmoe.compare.Experiment` (name, description, models = [@scope/ModelSpec(),
  ...], overrides) and the scoped ModelSpecs; `include` resolves against configs/.
  """
  path = experiment_path(name_or_path)
  routers = _routers()  # Registers the router configs the files bind (@routers.Hash()).
  with isolated_gin():
    gin.add_config_file_search_path(os.fspath(configs_dir()))
    try:
      gin.parse_config_file(os.fspath(path))
      experiment = Experiment()
    except (ValueError, TypeError) as e:
      # A file written when ModelSpec held flat router fields (ModelSpec.hash_key, ...).
      found = re.search(r"Configurable '(\w+)' doesn't have a parameter named '(\w+)'", str(e))
      moved = found and routers.moved_binding(*found.groups())
      raise ValueError(f"{path}: {moved or e}") from e
  return experiment

