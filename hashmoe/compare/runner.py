"""The real `Runner`: trains one run with `hashmoe.train.train` and measures the trained model.

Every run of a seed reads the same `hashmoe.data.cached.CachedPipeline`, which this runner keeps;
hash models get their tables built from that pipeline's training-split key counts (or the dense
baseline's embeddings or predictions). After training, one pass over the fixed validation and test
batches measures the test perplexity and, from the routers' own per-expert counts over real tokens,
the expert load.
"""
from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hashmoe import host_routing, models
from hashmoe import tables as tables_lib
from hashmoe import train as train_lib
from hashmoe.compare import configs
from hashmoe.compare.runs import (RunRecord, RunRequest, Stopped, read_jsonl, router_curves,
                                  throughput, validation_curve)
from hashmoe.compare.specs import ModelSpec, PathLike, Settings
from hashmoe.data import cached
from hashmoe.training import checkpoints, run_dir
from hashmoe.training import trainer as trainer_lib


class TrainRunner:
  """The real runner: `hashmoe.train.train` on a `cached.CachedPipeline`, then one measuring pass.

  Holds the per-seed pipelines and the dense baselines' predictors so that every run of the
  comparison shares them.
  """

  def __init__(self, corpus: cached.RegisteredCorpus, settings: Settings, *,
               progress_bar: bool = True, tensorboard: bool = False,
               log: Callable[[str], None] = print,
               batch_wait: Optional[Callable[[], None]] = None):
    """
    Args:
      batch_wait: called while a seed's batch file (`batch_files`) is awaited; raises to give up.
    """
    self.corpus, self.settings = corpus, settings
    # {seed: the .npz another process wrote its batches to (`CachedPipeline.save`)}: that seed's
    # pipeline reads them from there instead of from the task (`hashmoe compare --jobs` workers).
    self.batch_files: dict[int, str] = {}
    self._batch_wait = batch_wait
    self.progress_bar, self.tensorboard, self._log = progress_bar, tensorboard, log
    self._pipelines: dict[int, cached.CachedPipeline] = {}
    self._predicted: dict[tuple[int, str], cached.PredictedPipeline] = {}
    # One optimiser object for every run (all share the settings): Trainers of one model then
    # share their compiled steps under `trainer_lib.shared_compilation` (keyed by the object).
    self._optimizer = configs.make_optimizer(settings)
    self._identity = optax.identity()

  def close(self) -> None:
    """Releases the pipelines' tf.data readers (their batches stay)."""
    for pipeline in self._pipelines.values():
      pipeline.close()

  def pipeline(self, seed: int) -> cached.CachedPipeline:
    if seed not in self._pipelines:
      s = self.settings
      self._pipelines[seed] = cached.CachedPipeline(
          self.corpus.task, batch_size=s.batch_size, seq_len=s.seq_len, seed=seed,
          batch_file=self.batch_files.get(seed), wait=self._batch_wait)
    return self._pipelines[seed]

  def reuse_batch_file(self, seed: int, path: PathLike) -> bool:
    """Makes `path` (a batch file kept by `cached.batch_cache_file`) seed `seed`'s batches if it
    holds them: read whole and checked against the task's pipeline (task, shapes, seed,
    vocabulary). A file that does not is deleted (the log says why) and False returned: the
    seed's pipeline then reads the task (as it does when it exists already)."""
    if seed in self._pipelines:
      return False  # It reads the task already.
    self.batch_files[seed] = os.fspath(path)
    try:
      pipeline = self.pipeline(seed)
      if pipeline.streaming:
        pipeline.train_batch(0)  # Reads and checks the whole file.
        return True
      why = "the task now reads prepared rows"
    except ValueError as e:
      why = str(e)
    self._log(f"hashmoe compare: not reusing the kept batches ({why}); reading the task again")
    self._pipelines.pop(seed, None)
    self.batch_files.pop(seed, None)
    Path(path).unlink(missing_ok=True)
    return False

  # -- helpers ---------------------------------------------------------------------------------

  def _restore(self, config, model_dir: PathLike):
    """(Trainer, TrainState) of a finished run's newest checkpoint (no optimizer state)."""
    trainer = trainer_lib.Trainer(config, models.build_model(config), self._identity,
                                configs.mesh(self.settings), seed=0)
    with trainer.context():
      params, constants, _, step = checkpoints.restore_params(model_dir, trainer.abstract_state)
    state = trainer_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=(),
                                 constants=constants)
    return trainer, state

  def _data(self, request: RunRequest):
    base = self.pipeline(request.seed)
    if request.spec.key != "predicted_future":
      return base
    key = (request.seed, request.baseline_dir)
    if key not in self._predicted:
      self._predicted[key] = cached.PredictedPipeline(
          base, self._predictor(request.baseline, request.baseline_dir, base.vocab_size),
          self.settings.steps)
    return self._predicted[key]

  def _predictor(self, baseline: ModelSpec, baseline_dir: str, vocab_size: int):
    """The frozen dense baseline's next-token argmax, a function of a numpy batch."""
    config = configs.model_config(baseline, self.settings, vocab_size=vocab_size)
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
    """Builds the run's hash tables (`hashmoe.tables.make_hash_tables`) into model_dir/tables/;
    returns the path to give `train(hash_tables=...)` and the tables' balance over the training
    split's key counts (max/mean of the keys' occurrences per expert, one value per table)."""
    spec = request.spec
    key_space = tables_lib.hash_key_space(config)
    kind = spec.table_kind
    embeddings = None
    if spec.table in ("clustered", "dispersed"):
      embeddings = checkpoints.token_embeddings(request.baseline_dir)
    out_path = Path(request.model_dir) / "tables" / f"{kind}.npz"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    counts = lambda: data.key_counts(spec.key, key_space)
    tables = tables_lib.make_hash_tables(config, kind, out_path=out_path, key_counts=counts,
                                        seed=request.seed,
                                        vocab_fingerprint=data.vocab_fingerprint,
                                        embeddings=embeddings)
    # How evenly the tables spread the training split's keys (what Figure 4 is about): a key's
    # occurrences count once for each of a top-k table's k experts.
    weights = np.asarray(counts(), np.float64)
    loads = [np.bincount(t.table.reshape(-1), minlength=t.num_experts,
                         weights=np.repeat(weights, t.table.size // t.table.shape[0]))
             for t in tables]
    stats = {"train_split_max_over_mean": [float(l.max() / l.mean()) for l in loads]}
    return os.fspath(out_path), stats

  def _measure(self, trainer, state, data, config) -> dict[str, Any]:
    """One pass over the fixed validation and test batches: per-token NLL (the test perplexity)
    and, per sparse layer, the load its router reports over real tokens (padding excluded): the
    routers' `expert_counts` and `assignments` metrics, summed over the batches."""
    experts = config.sparse.num_experts if config.sparse else 0
    # The hash routing the run's evaluation batches carried (`__call__` trains with
    # precompute_routing=True): without it a hash model's batches would have other features, so
    # another program, compiled again (5.3 s on an empty cache, docs/PERFORMANCE.md), for the
    # same numbers.
    route = host_routing.plan(config, state.constants)

    def run(split):
      batches = data.eval_batches(split, self.settings.eval_batches)
      if not batches:
        return None
      if route is not None:
        batches = [route(b) for b in batches]
      # The trainer's evaluation step, the program the run's evaluations compiled (read from the
      # compilation cache): it also returns the routers' per-layer counts.
      outs = [trainer.eval_step(state, trainer.global_batch(b)) for b in batches]
      return jax.device_get(outs)

    result: dict[str, Any] = {}
    valid = run("validation")
    nll = sum(float(o["nll_sum"]) for o in valid)
    tokens = sum(float(o["tokens"]) for o in valid)
    result["valid_ppl_check"] = math.exp(min(nll / max(tokens, 1.0), 700.0))
    if experts:
      loads, worst, dropped = {}, [], []
      for name in sorted(valid[0]["loads"]):
        counts = sum(np.asarray(o["loads"][name]["counts"], np.float64) for o in valid)
        assignments = sum(float(o["loads"][name]["assignments"]) for o in valid)
        load = counts / max(counts.sum(), 1.0)
        loads[name] = load.tolist()
        worst.append(float(load.max() * experts))
        dropped.append(1.0 - float(counts.sum()) / max(assignments, 1.0))
      result.update(expert_load=loads, max_over_mean_load=max(worst),
                    dropped_fraction=float(np.mean(dropped)), load_tokens=int(tokens))
    if self.settings.test_eval:
      test = run("test")
      if test:
        nll = sum(float(o["nll_sum"]) for o in test)
        tokens = sum(float(o["tokens"]) for o in test)
        result["test_ppl"] = math.exp(min(nll / max(tokens, 1.0), 700.0))
    return result

  # -- one run ---------------------------------------------------------------------------------

  def __call__(self, request: RunRequest) -> RunRecord:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    s = self.settings
    data = self._data(request)
    config = configs.model_config(request.spec, s, vocab_size=data.vocab_size,
                                  balance_coef=request.balance_coef)
    model_dir = Path(request.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tables, table_stats = None, None
    if request.spec.uses_tables:
      tables, table_stats = self._tables(request, config, data)
    # Every argument explicit: no gin binding of the surrounding process can change a run (the
    # optimiser is read from configs/runs/compare.gin in a gin config of its own).
    result = train_lib.train(
        model_dir=os.fspath(model_dir), model_config=config, task=self.corpus.task,
        train_steps=s.steps, batch_size=s.batch_size, seq_len=s.seq_len, seed=request.seed,
        optimizer=self._optimizer, mesh=configs.mesh(s), checkpoint_period=s.steps,
        keep_checkpoints=2, async_checkpointing=True, eval_period=s.eval_period, eval_batches=s.eval_batches,
        eval_split="validation", log_period=s.log_period, init_checkpoint=None,
        hash_tables=tables, progress_bar=self.progress_bar, tensorboard=self.tensorboard,
        input_pipeline=data, precompute_routing=True)
    if result.preempted:
      if result.stop_signal == signal.SIGINT:
        raise KeyboardInterrupt  # Ctrl-C: the trainer checkpointed; report it as compare does.
      raise Stopped("SIGTERM")
    metrics = read_jsonl(model_dir / run_dir.METRICS_FILE)
    curve = validation_curve(read_jsonl(model_dir / run_dir.EVAL_FILE))
    if result.step not in curve:
      raise RuntimeError(f"{model_dir}: no validation record at the final step {result.step}")
    trainer, state = self._restore(config, model_dir)
    measured = self._measure(trainer, state, data, config)
    counts = configs.param_counts(config)
    return RunRecord(
        model=request.model, seed=request.seed, balance_coef=request.balance_coef,
        steps=result.step, valid_ppl=curve[result.step], curve=curve,
        tokens_per_s=throughput(metrics), params=counts["total"], active_params=counts["active"],
        test_ppl=measured.get("test_ppl"), expert_load=measured.get("expert_load"),
        max_over_mean_load=measured.get("max_over_mean_load"),
        dropped_fraction=measured.get("dropped_fraction"),
        load_tokens=measured.get("load_tokens"), wall_s=time.perf_counter() - wall0,
        cpu_s=time.process_time() - cpu0, model_dir=os.fspath(model_dir),
        table_stats=table_stats, valid_ppl_remeasured=measured["valid_ppl_check"],
        router_curves=router_curves(metrics))
