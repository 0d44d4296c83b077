"""The loss, the train state, and the jitted pieces of a run: init, the train step, the eval step.

Every batch passes `hashmoe.models.validate_batch` on the host, then one jitted step (parameters and
optimizer state sharded by the logical-axis rules, the batch over ("data", "expert")) computes
cross-entropy + the routers' aux losses and applies the update. The step RNG is
`fold_in(key(seed), step)`, so a restarted run draws the same dropout masks as the uninterrupted
one. `Evaluator` measures validation perplexity on a fixed set of batches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hashmoe import models, routing, sharding
from hashmoe.layers import MOE_COLLECTION
from hashmoe.routing import ROUTER_STATE
from hashmoe.training import metrics as metrics_lib
from hashmoe.training import multihost

if TYPE_CHECKING:  # Annotations only: the pipeline module imports TensorFlow, a step needs none.
  from hashmoe.data.pipeline import InputPipeline

Array = jax.Array
PyTree = Any

PARAMS = "params"


# --------------------------------------------------------------------------------------------------
# Loss.


def token_nll(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
  """Summed next-token negative log-likelihood.

  Args:
    logits: float32[batch, length, vocab].
    targets: int32[batch, length].
    weights: float/bool[batch, length], 0 at padding.

  Returns:
    (Σ weight · -log softmax(logits)[target]  float32[], Σ weight  float32[]).
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weights = weights.astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)


def loss_weights(batch: Mapping[str, Array]) -> Array:
  """float32[batch, length]: `decoder_loss_weights` when the feature converter gives them, else
  1 where the target is not padding (id 0)."""
  if "decoder_loss_weights" in batch:
    return jnp.asarray(batch["decoder_loss_weights"], jnp.float32)
  return (jnp.asarray(batch["decoder_target_tokens"]) > 0).astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# Train state and steps.


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes.

  Attributes:
    step: int32[], updates applied so far.
    params: float32 master weights (compute may be bfloat16, per the model config).
    opt_state: the optimizer's state.
    constants: the model's non-trainable collections, e.g. {"hash_tables": ...}. The gradient
      never reaches them; only `routing.ROUTER_STATE` (the learned top-k router's selection bias)
      changes, set by each train step from what the routers wrote (see `Trainer._step`).
  """
  step: Array
  params: PyTree
  opt_state: PyTree
  constants: PyTree


def _init_batch(config: models.TransformerConfig) -> dict[str, np.ndarray]:
  return {name: np.ones(spec.shape, spec.dtype)
          for name, spec in models.init_batch_spec(config).items()}


def _split_seed(seed: int) -> tuple[Array, Array]:
  """(init key, base of the per-step keys) from the run's seed."""
  init_key, step_key = jax.random.split(jax.random.key(seed))
  return init_key, step_key


# The traced and compiled programs of Trainers that `shared_compilation` lets share them, by (model
# config, optimizer, mesh, rules); None outside it. The optimizer is keyed by identity (optax
# transformations have no value equality) and held by its entry, so its id is never reused.
_SHARED: Optional[dict[tuple[Any, ...], dict[str, Any]]] = None


@contextlib.contextmanager
def shared_compilation() -> Iterator[None]:
  """Within the block, Trainers of the same model config, optimizer object, mesh and rules share
  their jitted init, train and eval steps and what those compiled: a later run of another seed
  neither traces nor compiles again (`hashmoe compare`'s runs of one model). The programs are the
  ones a lone Trainer would compile (the seed enters as an argument), so results are unchanged.
  They are dropped at the end of the outermost block."""
  global _SHARED
  outer = _SHARED is None
  if outer:
    _SHARED = {}
  try:
    yield
  finally:
    if outer:
      _SHARED = None


def _shared_programs(trainer: "Trainer") -> Optional[dict[str, Any]]:
  """The shared entry of `trainer`'s programs (empty when it is the first), or None outside
  `shared_compilation` or for a config that cannot be a dict key."""
  if _SHARED is None:
    return None
  try:
    # Configs that differ only in run-time loss coefficients trace to the same programs.
    key = (models.program_config(trainer.config), id(trainer.tx), trainer.mesh,
           tuple(trainer.rules))
    hash(key)
  except TypeError:
    return None
  entry = _SHARED.setdefault(key, {"tx": trainer.tx})
  return entry if entry["tx"] is trainer.tx else None


def _init_compiler_options() -> Optional[dict[str, Any]]:
  """XLA:CPU compiles the init program (run once per run) at LLVM's O1 instead of O2: about half
  the compile time for the default comparison's models (docs/PERFORMANCE.md, fifth measurement)
  and the same state bit for bit (tests/test_init_compile.py checks it; O0 would not give it).
  Other backends keep their defaults."""
  if jax.default_backend() != "cpu":
    return None
  return {"xla_backend_optimization_level": 1}


def _same_module(a: nn.Module, b: nn.Module) -> bool:
  """Flax modules equal as values (a module holding numpy tables may refuse `==`: then not)."""
  try:
    return a is b or bool(a == b)
  except (ValueError, TypeError):
    return False


@dataclasses.dataclass
class Trainer:
  """The jitted pieces of a run, built once per (model, optimizer, mesh).

  Attributes:
    config: the model config.
    model: the Flax module (`DecoderLM` or `EncoderDecoder`).
    tx: the optimizer.
    mesh: the device mesh; params, optimizer state and batches are laid out on it.
    seed: the run's seed; init uses one key from it, step t uses `fold_in(step_base, t)`.
    rules: logical-axis rules (`hashmoe.sharding.axis_rules`: `LOGICAL_AXIS_RULES`, or with
      `fsdp=True` parameters and optimizer state sharded over the batch axes too).
  """
  config: models.TransformerConfig
  model: nn.Module
  tx: optax.GradientTransformation
  mesh: Mesh
  seed: int = 0
  rules: Sequence[tuple[str, Any]] = sharding.LOGICAL_AXIS_RULES

  def __post_init__(self):
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    self._init_key, self._step_key = _split_seed(self.seed)
    # The routers' loss coefficients are arguments of the steps, not constants in them
    # (`routing.runtime_loss_coefficients`): runs that differ only in them share the programs.
    self.loss_coefficients = models.runtime_loss_coefficients(self.config)
    boxed = jax.eval_shape(functools.partial(self._init_boxed, self.model), self._init_key)
    self.state_shardings = sharding.shard_params(boxed, self.mesh, self.rules)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
        self.state_shardings)
    shared = _shared_programs(self)
    if shared is not None and "train_step" in shared:
      # Another Trainer of this process traced these for an identical model and optimizer: its
      # jitted functions read nothing seed-dependent (the step key is an argument), so they are
      # this one's too, with everything they compiled.
      self._train_step, self._eval_step = shared["train_step"], shared["eval_step"]
      self._compiled, self._init_fn = shared["compiled"], shared["init"]
      return
    # The step key is an argument, not a constant of the traced step: one compiled step serves
    # every seed (`shared_compilation`).
    self._train_step = jax.jit(self._step, in_shardings=(self.state_shardings, self.batch_sharding,
                                                         self.replicated, self.replicated),
                               out_shardings=(self.state_shardings, self.replicated),
                               donate_argnums=(0,))
    self._eval_step = jax.jit(self._eval, in_shardings=(self.state_shardings.params,
                                                        self.state_shardings.constants,
                                                        self.batch_sharding, self.replicated),
                              out_shardings=self.replicated)
    self._compiled: dict[Any, Any] = {}
    self._init_fn = jax.jit(lambda key: nn.unbox(self._init_boxed(self.model, key)),
                            out_shardings=self.state_shardings,
                            compiler_options=_init_compiler_options())
    if shared is not None:
      shared.update(train_step=self._train_step, eval_step=self._eval_step,
                    compiled=self._compiled, init=self._init_fn)

  @contextlib.contextmanager
  def context(self):
    """Mesh and logical-axis rules for tracing and running the model."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(list(self.rules)):
      yield

  # -- init ------------------------------------------------------------------------------------

  def _init_boxed(self, model: nn.Module, key: Array) -> TrainState:
    variables = model.init({PARAMS: key}, _init_batch(self.config), deterministic=True)
    params = variables[PARAMS]
    constants = {k: v for k, v in variables.items() if k not in (PARAMS, MOE_COLLECTION)}
    # tx.init on the boxed params keeps the logical axis names on Adam's moments, so the
    # optimizer state is sharded exactly like the parameters it tracks.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                      constants=constants)

  def init_state(self, init_model: Optional[nn.Module] = None) -> TrainState:
    """A fresh state, sharded. `init_model` (same config, e.g. with hash tables attached) may
    differ from `self.model` only in the data it initialises its collections from."""
    with self.context():
      if init_model is None or _same_module(init_model, self.model):
        # The model's own init (no data of its own): traced once per model and optimizer.
        return self._init_fn(self._init_key)
      fn = lambda key: nn.unbox(self._init_boxed(init_model, key))
      return jax.jit(fn, out_shardings=self.state_shardings,
                     compiler_options=_init_compiler_options())(self._init_key)

  # -- steps -----------------------------------------------------------------------------------

  def _loss(self, params, constants, batch, rngs, deterministic):
    # A training pass lets the routers write their state (the top-k selection bias's next value);
    # an evaluation pass reads it only.
    mutable = [MOE_COLLECTION] if deterministic else [MOE_COLLECTION, ROUTER_STATE]
    logits, mutated = self.model.apply({PARAMS: params, **constants}, batch,
                                       deterministic=deterministic, rngs=rngs, mutable=mutable)
    aux_loss, moe = models.collect_aux(mutated)
    nll_sum, num_tokens = token_nll(logits, batch["decoder_target_tokens"], loss_weights(batch))
    return nll_sum, num_tokens, aux_loss, moe, mutated.get(ROUTER_STATE)

  def _step(self, state: TrainState, batch: Mapping[str, Array], step_key: Array,
            coefficients: Mapping[str, Array]):
    with routing.runtime_loss_coefficients(coefficients):
      return self._step_body(state, batch, step_key)

  def _step_body(self, state: TrainState, batch: Mapping[str, Array], step_key: Array):
    key = jax.random.fold_in(step_key, state.step)
    dropout_key, jitter_key = jax.random.split(key)
    rngs = {"dropout": dropout_key, "jitter": jitter_key}

    def objective(params):
      nll_sum, num_tokens, aux_loss, moe, router_state = self._loss(
          params, state.constants, batch, rngs, False)
      ce = nll_sum / jnp.maximum(num_tokens, 1.0)
      # The routers' aux losses (Switch's balance loss, z-loss) join the objective as they are:
      # each is already scaled by its coefficient.
      return ce + aux_loss, (ce, aux_loss, num_tokens, moe, router_state)

    (loss, (ce, aux_loss, num_tokens, moe, router_state)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    constants = state.constants
    if router_state is not None and ROUTER_STATE in constants:
      # Outside the gradient, after the update (DeepSeek-V3 §2.1.2: the bias moves at the end of
      # each step): the routers computed next step's bias from this batch's loads.
      constants = {**constants, ROUTER_STATE: flax.core.unfreeze(router_state)}
    metrics = {"loss": loss, "ce_loss": ce, "aux_loss": aux_loss, "tokens": num_tokens,
               "grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates),
               "moe": moe}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         constants=constants), metrics

  def _eval(self, params, constants, batch, coefficients):
    with routing.runtime_loss_coefficients(coefficients):
      nll_sum, num_tokens, aux_loss, moe, _ = self._loss(params, constants, batch, None, True)
    # Each sparse layer's load over the batch's real tokens, as its router counts it: what
    # `hashmoe compare` reports as expert load, from the program that evaluates (one compile).
    loads = {name: {"counts": m["expert_counts"], "assignments": m["assignments"]}
             for name, m in moe.items() if "expert_counts" in m and "assignments" in m}
    return {"nll_sum": nll_sum, "tokens": num_tokens, "aux_loss": aux_loss, "loads": loads}

  def _compiled_fn(self, name: str, fn, batch: Mapping[str, Array], *args):
    key = (name, tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items())))
    if key not in self._compiled:
      with self.context():
        self._compiled[key] = fn.lower(*args).compile()
    return self._compiled[key]

  def compile_train_step(self, state: TrainState, batch: Mapping[str, Array]):
    """Ahead-of-time compiles the step for this batch shape (once), so timing excludes it."""
    return self._compiled_fn("train", self._train_step, batch, state, batch, self._step_key,
                             self.loss_coefficients)

  def train_step(self, state: TrainState, batch: Mapping[str, Array]) -> tuple[TrainState, dict]:
    """One update. `batch`: global arrays from `global_batch`. Donates `state`."""
    return self.compile_train_step(state, batch)(state, batch, self._step_key,
                                                 self.loss_coefficients)

  def eval_step(self, state: TrainState, batch: Mapping[str, Array]) -> dict[str, Any]:
    """{"nll_sum", "tokens", "aux_loss", "loads": {sparse layer: {"counts": float32[E],
    "assignments": float32[]}}} of one batch, deterministic (no dropout)."""
    fn = self._compiled_fn("eval", self._eval_step, batch, state.params, state.constants, batch,
                           self.loss_coefficients)
    return fn(state.params, state.constants, batch, self.loss_coefficients)

  def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, Array]:
    """Checks a host's batch (`models.validate_batch`) and assembles the global arrays from every
    host's rows (each host holds `batch_size / process_count` rows)."""
    models.validate_batch(local_batch, self.config.vocab_size, self.config.max_len)
    rows = next(iter(local_batch.values())).shape[0] * jax.process_count()
    shards = math.prod(self.mesh.shape[a] for a in sharding.TOKEN_MESH_AXES)
    if rows % shards:
      raise ValueError(f"global batch size {rows} is not divisible by the {shards} devices of the "
                       f"mesh's {sharding.TOKEN_MESH_AXES} axes that split the batch")
    # Features that are one array (hash layers sharing their routing: `hashmoe.host_routing`)
    # travel to the devices once.
    placed: dict[int, Array] = {}
    out = {}
    for k, v in local_batch.items():
      if id(v) not in placed:
        placed[id(v)] = jax.make_array_from_process_local_data(self.batch_sharding,
                                                               np.asarray(v))
      out[k] = placed[id(v)]
    return out


# --------------------------------------------------------------------------------------------------
# Evaluation.


class Evaluator:
  """Validation perplexity on a fixed set of batches: the first `num_batches` of `split`, read once
  and reused, so every evaluation of a run (and of runs on the same task) sees the same tokens.

  Reports per-token perplexity exp(Σ NLL / Σ target tokens) and, when the task defines words,
  per-word perplexity exp(Σ NLL / number of whitespace words of the decoded targets) (the unit
  the paper's Wikitext-103 word-dictionary results are in), with `tokens_per_word` beside it.

  word_ppl = ppl ** tokens_per_word: the per-token perplexity compounds over the pieces of a word,
  so it is huge wherever the model is still poor and words are split finely. A small BPE spends
  256 of its pieces on bytes (`hashmoe.data.vocab`): cpu_tiny.gin's 512-piece vocabulary of the
  embedded corpus cuts its validation text into 3.6 pieces per word (measured on the first 4
  batches), so an early evaluation at ppl 390 reads word_ppl 390^3.6 = 2.5e9. That is the
  arithmetic, not a bug; word perplexities compare across vocabularies, token ones do not.
  """

  def __init__(self, trainer: Trainer, data: InputPipeline, *, split: str, num_batches: int,
               batch_map: Optional[Callable[[dict], dict]] = None):
    """`batch_map` is applied to each batch once, when they are read (the hash routing of
    `hashmoe.host_routing`, which the evaluation batches then carry every time)."""
    self._trainer, self._data, self._batch_map = trainer, data, batch_map
    self.split, self.num_batches = split, num_batches
    self._batches: Optional[list[dict[str, Array]]] = None
    self._words: Optional[int] = None

  def _load(self):
    local = self._data.eval_batches(self.split, self.num_batches)
    if jax.process_count() > 1:
      # Hosts read disjoint shards whose lengths may differ by a batch; every global batch needs
      # all hosts' rows, so all stop at the shortest.
      local = local[:min(multihost.allgather_json(len(local)))]
    if not local:
      raise ValueError(f"the {self.split!r} split gave no batches to evaluate on")
    words = [self._data.count_words(b) for b in local]
    self._words = None if any(w is None for w in words) else int(sum(words))
    if self._words is not None and jax.process_count() > 1:
      self._words = int(sum(multihost.allgather_json(self._words)))
    if self._batch_map is not None:
      local = [self._batch_map(b) for b in local]
    self._batches = [self._trainer.global_batch(b) for b in local]

  def run(self, state: TrainState) -> dict[str, Any]:
    if self._batches is None:
      self._load()
    totals = [self._trainer.eval_step(state, b) for b in self._batches]
    totals = jax.device_get(totals)
    nll = float(sum(np.float64(t["nll_sum"]) for t in totals))
    tokens = float(sum(np.float64(t["tokens"]) for t in totals))
    record = {"step": int(jax.device_get(state.step)), "split": self.split,
              "batches": len(totals), "tokens": tokens, "nll_sum": nll,
              "loss": nll / max(tokens, 1.0),
              "ppl": metrics_lib.perplexity(nll / max(tokens, 1.0)),
              "aux_loss": float(np.mean([t["aux_loss"] for t in totals]))}
    if self._words:
      record["words"] = self._words
      record["tokens_per_word"] = tokens / self._words
      record["word_ppl"] = metrics_lib.perplexity(nll / self._words)
    if not metrics_lib.all_finite(record["loss"]):
      warnings.warn(f"evaluation loss at step {record['step']} is {record['loss']}",
                    RuntimeWarning)
    return record
