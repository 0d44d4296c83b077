"""The entry points of training and evaluation (t5x's `train.py`): `train`, `evaluate`, the loop.

    hashmoe train --gin_file=configs/runs/cpu_tiny.gin --gin.MODEL_DIR="'/tmp/run'" \
                  --gin.TRAIN_STEPS=200

What one run does (`train`):

  1. Builds the mesh (`hashmoe.sharding.make_mesh`), the model (`hashmoe.models.build_model`) and
     the optimizer (`hashmoe.training.optim.make_optimizer`: AdamW, linear warm-up then
     inverse-square-root or cosine decay, global-norm clipping, optionally a frozen dense or sparse
     part).
  2. Restores the newest readable checkpoint in `MODEL_DIR/checkpoints` (falling back, with a
     warning, past a corrupt one: `hashmoe.training.checkpoints`), or else initialises (optionally
     from `INIT_CHECKPOINT`), with the hash tables `train.hash_tables` names (`hashmoe.tables`).
  3. Steps (`hashmoe.training.trainer.Trainer`): every batch passes `hashmoe.models.validate_batch`
     on the host, then one jitted step computes cross-entropy + the routers' aux losses and applies
     the update. Hash layers get each batch's grouping by expert from the input pipeline
     (`hashmoe.host_routing`; `precompute_routing=False` sorts on device instead, with the same
     results), so their expert loads are known, and logged, before the step. Each step is a
     `jax.profiler.StepTraceAnnotation` ("train"), so a profile shows steps by number, and the MoE
     pieces inside them by their `jax.named_scope`.
  4. Logs every `log_period` steps to `MODEL_DIR/metrics.jsonl`, TensorBoard
     (`MODEL_DIR/tensorboard`) and a tqdm bar (`hashmoe.training.metrics`); evaluates every
     `eval_period` steps on a fixed set of validation batches (`MODEL_DIR/eval.jsonl`);
     checkpoints every `checkpoint_period` steps and at the end.

Determinism and restarts. The step RNG is `fold_in(key(seed), step)` and the data position is part
of every checkpoint, so a run killed at any moment (SIGKILL included) and started again with the
same command retraces the uninterrupted run step for step: same batches, same dropout masks,
bit-equal losses on the same machine. On restart the tail of `metrics.jsonl` past the restored step
is dropped, so the file always reads as one run. SIGTERM (pre-emption) and SIGINT (Ctrl-C) finish
the current step, write a checkpoint and return (`TrainResult.exit_code` 143 or 130); a second
Ctrl-C stops at once (KeyboardInterrupt, no checkpoint). A diverged loss (NaN/inf, or a
cross-entropy above `divergence_factor` x ln(vocab size)) raises `LossDivergedError` naming the
step before anything is saved, so the last good checkpoint is never overwritten.

One run per MODEL_DIR (`hashmoe.training.run_dir.ModelDirLock`). Resuming checks the run against
the checkpoint (`hashmoe.training.resume.check_resume`): settings that a checkpoint fixes must be
the checkpoint's, or the run is refused with every difference named and nothing written; the rest
may change, and the changes are logged.

Fine-tuning (paper Section 5.4, BST): `INIT_CHECKPOINT` starts from another run's parameters (and
hash tables); `make_optimizer.freeze = 'sparse'` or `'dense'` keeps one part fixed (`param_labels`).

gin: the configurables here and in `hashmoe.training.optim`, `hashmoe.data.pipeline` and
`hashmoe.tables` keep the gin names they had when this module held them all
(`hashmoe.train.train`, `.evaluate`, `.make_optimizer`, `.learning_rate_schedule`, `.task_name`,
`.hash_table_inputs`): configs and users write those names.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import auto as tqdm_auto

from hashmoe import host_routing as host_routing_lib
from hashmoe import models, sharding, tables
from hashmoe.data import loader
from hashmoe.data import pipeline as pipeline_lib
from hashmoe.training import checkpoints, multihost, optim, resume, run_dir
from hashmoe.training import metrics as metrics_lib
from hashmoe.training.errors import ConfigError, LossDivergedError
from hashmoe.training.trainer import Evaluator, Trainer, TrainState

PyTree = Any

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Pre-emption and Ctrl-C.


class _StopSignals:
  """Turns SIGTERM (pre-emption) and SIGINT (Ctrl-C) into a request the loop checks after each
  step; it then checkpoints and returns. A second Ctrl-C raises KeyboardInterrupt at once (no
  checkpoint). A SIGINT that the parent left ignored (a `nohup` or background job) stays ignored."""

  def __init__(self):
    self.signum = 0  # The first signal received; 0: none.
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        if signum == signal.SIGINT and signal.getsignal(signum) == signal.SIG_IGN:
          continue
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.signum:
      return
    self.signum = signum
    if signum == signal.SIGINT:
      logger.warning("Ctrl-C: checkpointing after the current step, then stopping (Ctrl-C again "
                     "stops at once, without a checkpoint)")
    else:
      logger.warning("received %s: checkpointing after the current step, then stopping",
                     signal.Signals(signum).name)

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()
    return False

  def any_host(self) -> int:
    """The signal that stops the run (0: none yet), the same on every host: hosts receive it at
    different moments, and all must stop at the same step."""
    if jax.process_count() == 1:
      return self.signum
    return int(np.max(multihost_utils.process_allgather(np.int32(self.signum))))


# --------------------------------------------------------------------------------------------------
# The training loop.


@dataclasses.dataclass
class TrainResult:
  """What `train` returns.

  Attributes:
    step: the step the run stopped at.
    start_step: the step it started (or resumed) from.
    preempted: stopped early by SIGTERM or SIGINT (a checkpoint at `step` was written).
    last_train: the last logged train record (as in metrics.jsonl), or None.
    last_eval: the last eval record (as in eval.jsonl), or None.
    model_dir: where everything was written.
    stop_signal: the signal that stopped the run early (signal.SIGTERM or signal.SIGINT), or None.
  """
  step: int
  start_step: int
  preempted: bool
  last_train: Optional[dict[str, Any]]
  last_eval: Optional[dict[str, Any]]
  model_dir: str
  stop_signal: Optional[int] = None

  @property
  def exit_code(self) -> int:
    """0, or what a shell reports for a process its stop signal ended: 128 + the signal (143
    SIGTERM, 130 SIGINT), so that scripts and schedulers tell a stop from a finished run."""
    if not self.preempted:
      return 0
    return 128 + int(self.stop_signal or signal.SIGTERM)


@gin.configurable(module="hashmoe.train")
def train(*,
          model_dir: str = gin.REQUIRED,
          model_config: models.TransformerConfig = gin.REQUIRED,
          task: str = gin.REQUIRED,
          train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          seq_len: int = gin.REQUIRED,
          seed: int = 0,
          optimizer: Optional[optax.GradientTransformation] = None,
          mesh: Optional[Mesh] = None,
          fsdp: bool = False,
          checkpoint_period: int = 1000,
          keep_checkpoints: int = 3,
          async_checkpointing: bool = True,
          eval_period: int = 1000,
          eval_batches: int = 20,
          eval_split: str = "validation",
          log_period: int = 10,
          init_checkpoint: Optional[str] = None,
          hash_tables: Any = None,
          progress_bar: bool = True,
          tensorboard: bool = True,
          divergence_factor: Optional[float] = 4.0,
          precompute_routing: bool = True,
          input_pipeline: Optional[pipeline_lib.InputPipeline] = None) -> TrainResult:
  """Trains `model_config` on `task` until `train_steps`, resuming from MODEL_DIR if possible.

  Args:
    model_dir: MODEL_DIR: checkpoints, metrics.jsonl, eval.jsonl, config.gin, tensorboard/.
    model_config: the model (`configs/models/*.gin`).
    task: a registered task name (`configs/tasks/*.gin`).
    train_steps: TRAIN_STEPS, the step to stop at (a resumed run continues up to it).
    batch_size: BATCH_SIZE, global sequences per step (split evenly over hosts).
    seq_len: SEQ_LEN, tokens per sequence (inputs and targets for seq2seq tasks).
    seed: SEED: parameter init and the per-step dropout/jitter keys.
    optimizer: default `make_optimizer()` (configure it in gin).
    mesh: default `sharding.make_mesh()` (all devices on "data").
    fsdp: FSDP: shard parameters and optimizer state over the batch axes too
      (`sharding.axis_rules`); the same numbers, less memory per device, an all-gather per layer.
      A run may switch it on resume: checkpoints restore into either layout.
    checkpoint_period: CHECKPOINT_PERIOD steps between checkpoints (and one at the end).
    keep_checkpoints: how many checkpoints to keep (>= 2).
    async_checkpointing: write checkpoints in the background.
    eval_period: EVAL_PERIOD steps between evaluations (and one at the end); 0 disables.
    eval_batches: EVAL_BATCHES: the fixed validation batches every evaluation uses.
    eval_split: the split to evaluate on.
    log_period: steps between logged records.
    init_checkpoint: INIT_CHECKPOINT: start a fresh run from this run's parameters and hash
      tables (a MODEL_DIR, its checkpoints/ folder, or a step folder). Ignored when MODEL_DIR
      already has a checkpoint (that one is resumed).
    hash_tables: the hash layers' tables for a fresh run: None (the router's default kind:
      random tables for routers.Hash, a balanced top-k table for routers.HashTopK); a kind ("random", "balanced", "balanced_topk"),
      built at the start from the training split's key counts; or files from `hashmoe
      build-hash`: one path (MultiHash: the path build-hash was given), a list of paths, or
      {layer name or "default": path(s)}. A resumed run keeps its checkpoint's tables (files
      given again must be those); a run from INIT_CHECKPOINT keeps that checkpoint's.
    progress_bar: show a tqdm bar (process 0).
    tensorboard: write TensorBoard summaries.
    divergence_factor: the run stops ("loss diverged at step N") when a step's cross-entropy
      exceeds divergence_factor x ln(vocab size): an untrained model's loss is about ln(vocab
      size), so a loss several times that means the run blew up, even while it is still finite
      (its perplexity would overflow what the logs can hold). None disables the bound; a NaN or
      infinite loss or update always stops the run.
    precompute_routing: hash layers get their routing from the input pipeline
      (`hashmoe.host_routing`: each batch's grouping by expert computed on the host, assembled on
      device without a sort) and the loop logs each step's expert loads known before it
      (`host_load_*` under each layer in "moe"). False sorts on device. The losses are the same
      either way; layers that cannot (learned routers, a dispatch without a precomputed sort)
      sort on device, which is logged once.
    input_pipeline: the data (default: `hashmoe.data.loader.make_input_pipeline`: the task's
      prepared rows where `hashmoe prepare` wrote them, else the streaming `TaskPipeline`; gin's
      PREPARED_DIR and DATA_SOURCE choose); tests pass their own.

  Returns:
    TrainResult.

  Raises:
    ModelDirInUseError: another run holds MODEL_DIR (`ModelDirLock`).
    ChangedConfigError: MODEL_DIR's checkpoint fixes a setting this run changes (`check_resume`).
    LossDivergedError: the loss diverged (the message names the step and the last good
      checkpoint).
    CheckpointError: no checkpoint in MODEL_DIR could be restored.
  """
  for name, value in (("train_steps", train_steps), ("batch_size", batch_size),
                      ("seq_len", seq_len), ("checkpoint_period", checkpoint_period),
                      ("log_period", log_period)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if eval_period < 0 or eval_batches < 0:
    raise ValueError(f"eval_period and eval_batches must be >= 0, got {eval_period}, "
                     f"{eval_batches}")
  if batch_size % jax.process_count():
    raise ValueError(f"batch_size={batch_size} must divide evenly over "
                     f"{jax.process_count()} processes")
  if divergence_factor is not None and not divergence_factor > 0:
    raise ConfigError(f"train.divergence_factor must be a positive number or None (no bound), "
                      f"got {divergence_factor!r}")
  model_dir = epath.Path(model_dir).absolute()
  created = not model_dir.exists()
  model_dir.mkdir(parents=True, exist_ok=True)
  lock = run_dir.lock_model_dir(model_dir)
  checkpointer = metrics_logger = None
  try:
    data = input_pipeline or loader.make_input_pipeline(task, batch_size=batch_size,
                                                        seq_len=seq_len, seed=seed)
    logger.info("task %s: vocabulary of %d pieces", task, data.vocab_size)
    if model_config.vocab_size != data.vocab_size:
      raise ValueError(f"the model has vocab_size={model_config.vocab_size} but task {task!r} has "
                       f"a vocabulary of {data.vocab_size} pieces; bind "
                       f"TransformerConfig.vocab_size (VOCAB_SIZE) to {data.vocab_size}")
    tx = optim.make_optimizer() if optimizer is None else optimizer
    mesh = sharding.make_mesh() if mesh is None else mesh
    model = models.build_model(model_config)
    trainer = Trainer(model_config, model, tx, mesh, seed=seed,
                      rules=sharding.axis_rules(fsdp=fsdp))
    logger.info("mesh %s%s; %s", dict(mesh.shape), " (FSDP)" if fsdp else "",
                models.param_counts(model_config))
    # Read once everything gin configures has been called (make_optimizer, make_mesh above).
    config_text = gin.operative_config_str()
    settings = resume.run_settings(model_config, task=task, seq_len=seq_len,
                                   batch_size=batch_size, seed=seed, hash_tables=hash_tables,
                                   vocab_fingerprint=data.vocab_fingerprint)
    # Compared before anything is written: a refused run leaves MODEL_DIR as it found it.
    saved = checkpoints.read_saved_config(model_dir)
    changes = []
    if saved is not None:
      changes = resume.check_resume(saved[1], step=saved[0], settings=settings,
                                    config_text=config_text, model_dir=model_dir)
    checkpointer = checkpoints.Checkpointer(model_dir / run_dir.CHECKPOINT_SUBDIR,
                                            max_to_keep=keep_checkpoints,
                                            async_save=async_checkpointing)
    with trainer.context():
      restored = checkpointer.restore_latest(trainer.abstract_state)
    metrics_logger = metrics_lib.MetricsLogger(model_dir, tensorboard=tensorboard)
    primary = jax.process_index() == 0
    if restored is not None:
      state, position = restored.state, restored.data_position
      # A position these batches cannot continue (the run switched between streamed and prepared
      # data, or the prepared data changed) is refused before anything is written.
      check_position = getattr(data, "check_position", None)
      if check_position is not None and position is not None:
        check_position(position)
      hash_meta = restored.hash_metadata
      tables.verify_hash_tables(state.constants, hash_meta, vocab_size=data.vocab_size,
                                vocab_fingerprint=data.vocab_fingerprint,
                                where=f"{checkpointer.directory}/{restored.step}")
      if hash_tables is not None and not tables.is_table_kind(hash_tables):
        tables.check_same_tables(hash_tables, model_config, hash_meta,
                                 vocab_fingerprint=data.vocab_fingerprint)
      logger.info("resumed from step %d in %s", restored.step, checkpointer.directory)
      if changes:
        logger.info("changed since the checkpoint at step %d: %s", restored.step,
                    "; ".join(map(str, changes)))
      if primary and saved is not None:
        run_dir.keep_config_history(model_dir, restored.step,
                                    saved[1].get("operative_config") or "", config_text)
      metrics_logger.resume(restored.step)
    else:
      state, position, hash_meta = _fresh_state(trainer, data, hash_tables, init_checkpoint,
                                                model_dir, seed)
      if primary:
        run_dir.set_aside_earlier_logs(model_dir)
      metrics_logger.resume(0)
    if primary:
      (model_dir / run_dir.CONFIG_FILE).write_text(config_text)
    max_loss = None if divergence_factor is None else divergence_factor * math.log(
        max(data.vocab_size, 2))
    host_routing = _host_routing(model_config, state, precompute_routing)
    return _loop(host_routing=host_routing, trainer=trainer, state=state, position=position,
                 data=data, checkpointer=checkpointer, metrics_logger=metrics_logger,
                 hash_meta=hash_meta, config_text=config_text, settings=settings,
                 train_steps=int(train_steps), checkpoint_period=checkpoint_period,
                 eval_period=eval_period, eval_batches=eval_batches, eval_split=eval_split,
                 log_period=log_period, progress_bar=progress_bar, model_dir=model_dir,
                 max_loss=max_loss, divergence_factor=divergence_factor)
  finally:
    try:
      if checkpointer is not None:
        checkpointer.close()
      if metrics_logger is not None:
        metrics_logger.close()
    finally:
      if lock is not None:
        lock.release()
      if created and jax.process_index() == 0 and not run_dir.is_remote(model_dir):
        with contextlib.suppress(OSError):
          os.rmdir(model_dir)  # Only when empty: a run refused before writing leaves no trace.


def _host_routing(config: models.TransformerConfig, state: TrainState,
                  enabled: bool) -> Optional[host_routing_lib.HostRouting]:
  """The input pipeline's hash routing for the tables `state` holds, or None (switched off, or
  no layer can take it; `host_routing_lib.plan` logs why)."""
  if not enabled:
    if config.sparse is not None and config.sparse.router.uses_tables:
      logger.info("precomputed routing is off (train.precompute_routing=False): the hash layers "
                  "sort on device")
    return None
  return host_routing_lib.plan(config, state.constants)


def _fresh_state(trainer: Trainer, data: pipeline_lib.InputPipeline, hash_tables: Any,
                 init_checkpoint: Optional[str], model_dir: epath.Path,
                 seed: int) -> tuple[TrainState, Any, dict[str, Any]]:
  config = trainer.config
  if init_checkpoint:
    params, constants, meta, step = checkpoints.restore_params(init_checkpoint,
                                                               trainer.abstract_state)
    tables.verify_hash_tables(constants, meta, vocab_size=data.vocab_size,
                              vocab_fingerprint=data.vocab_fingerprint,
                              where=f"INIT_CHECKPOINT {init_checkpoint} (step {step})")
    if hash_tables is not None and not tables.is_table_kind(hash_tables):
      tables.check_same_tables(hash_tables, config, meta, vocab_fingerprint=data.vocab_fingerprint)
    # A table *kind* (what a model file names) is satisfied by the checkpoint's own tables: the
    # fine-tuned model keeps routing tokens where it was trained to.
    # The optimizer starts afresh (Adam moments of the new objective), at step 0.
    step0 = jax.device_put(jnp.zeros((), jnp.int32), trainer.state_shardings.step)
    state = TrainState(step=step0, params=params, constants=constants,
                       opt_state=_reinit_opt(trainer, params))
    logger.info("initialised from %s (step %d)", init_checkpoint, step)
    descriptions = meta.get("layers", {})
  else:
    built, descriptions = tables.resolve_hash_tables(
        hash_tables, config, key_counts=data.key_counts, vocab_fingerprint=data.vocab_fingerprint,
        seed=seed, model_dir=model_dir)
    init_model = models.build_model(config, built or None)
    state = trainer.init_state(init_model)
  hash_meta = tables.hash_table_metadata(state.constants, descriptions, vocab_size=data.vocab_size,
                                         vocab_fingerprint=data.vocab_fingerprint)
  return state, None, hash_meta


def _reinit_opt(trainer: Trainer, params: PyTree) -> PyTree:
  with trainer.context():
    return jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings.opt_state)(params)


def _loop(*, host_routing: Optional[host_routing_lib.HostRouting], trainer: Trainer,
          state: TrainState, position: Any, data: pipeline_lib.InputPipeline,
          checkpointer: checkpoints.Checkpointer, metrics_logger: metrics_lib.MetricsLogger,
          hash_meta: dict[str, Any], config_text: str, settings: Mapping[str, Any],
          train_steps: int, checkpoint_period: int, eval_period: int, eval_batches: int,
          eval_split: str, log_period: int, progress_bar: bool, model_dir: epath.Path,
          max_loss: Optional[float], divergence_factor: Optional[float]) -> TrainResult:
  start_step = int(jax.device_get(state.step))
  step = start_step
  last_train = last_eval = None
  if start_step >= train_steps:
    logger.info("the run is already at step %d (TRAIN_STEPS=%d): nothing to do", start_step,
                train_steps)
    return TrainResult(step=start_step, start_step=start_step, preempted=False, last_train=None,
                       last_eval=None, model_dir=os.fspath(model_dir))
  batches = pipeline_lib.train_batches(data, position, host_routing)
  evaluator = Evaluator(trainer, data, split=eval_split, num_batches=eval_batches,
                        batch_map=host_routing)
  saved_step = start_step if start_step > 0 else None

  def save():
    nonlocal saved_step
    checkpointer.save(state, data_position=batches.position(), hash_metadata=hash_meta,
                      config_text=config_text, settings=settings)
    saved_step = step

  pending: list[tuple[int, dict]] = []
  # This process's host-known expert counts of every step since the last record.
  host_counts: list[dict[str, Any]] = []
  window_start, window_tokens = time.perf_counter(), 0.0

  def diverged(s: int, m: Mapping[str, Any]) -> Optional[str]:
    loss, ce, aux = float(m["loss"]), float(m["ce_loss"]), float(m["aux_loss"])
    if not math.isfinite(loss):
      why = f"the training loss is {loss} (cross-entropy {ce}, aux loss {aux})"
    elif max_loss is not None and ce > max_loss:
      why = (f"the cross-entropy {ce:.6g} is above {max_loss:.4g} = train.divergence_factor "
             f"{divergence_factor:g} x ln(vocab size {trainer.config.vocab_size}), far worse than "
             "an untrained model's")
    elif not (metrics_lib.all_finite(m["grad_norm"]) and metrics_lib.all_finite(m["update_norm"])):
      why = (f"the update is not finite (gradient norm {float(m['grad_norm'])}, update norm "
             f"{float(m['update_norm'])})")
    else:
      return None
    if saved_step is None:
      kept = "No checkpoint was written yet; nothing was saved."
    else:
      kept = (f"The last good checkpoint is step {saved_step} in {checkpointer.directory}: it is "
              "kept, and nothing after it was saved.")
    return (f"loss diverged at step {s}: {why}. {kept} Lower the learning rate (or raise its "
            "warm-up), or check the data.")

  def flush(log: bool):
    """Checks every pending step for divergence (which stops the run here, before any save) and
    logs the newest one."""
    nonlocal pending, window_start, window_tokens, last_train
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    now = time.perf_counter()
    for (s, _), m in zip(pending, fetched):
      message = diverged(s, m)
      if message:
        raise LossDivergedError(message)
      window_tokens += float(m["tokens"])
    s, m = pending[-1][0], fetched[-1]
    pending = []
    if not log:
      return
    elapsed = max(now - window_start, 1e-9)
    record = {"step": s, "loss": float(m["loss"]), "ce_loss": float(m["ce_loss"]),
              "ppl": metrics_lib.perplexity(float(m["ce_loss"])),
              "aux_loss": float(m["aux_loss"]), "grad_norm": float(m["grad_norm"]),
              "update_norm": float(m["update_norm"]), "tokens": float(m["tokens"]),
              "tokens_per_s": window_tokens / elapsed, "time": time.time(),
              "moe": metrics_lib.moe_record(m["moe"])}
    for layer, loads in _global_host_loads(host_counts).items():
      record["moe"].setdefault(layer, {}).update(loads)
    host_counts.clear()
    metrics_logger.write_train(record)
    last_train = record
    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                    refresh=False)
    window_start, window_tokens = time.perf_counter(), 0.0

  bar = tqdm_auto.tqdm(total=train_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       disable=not progress_bar or jax.process_index() != 0)
  stop_signal = 0
  with _StopSignals() as stop_signals, contextlib.closing(batches), contextlib.closing(bar):
    while step < train_steps:
      # One trace annotation per step (reading the batch included, as t5x's trainer does): a
      # profile shows the steps by number. It costs nothing while no profiler runs.
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        local = next(batches)
        if host_routing is not None:
          host_counts.append(host_routing.expert_counts(local))
        batch = trainer.global_batch(local)
        if step == start_step:
          logger.info("compiling the train step for batch shapes %s",
                      {k: v.shape for k, v in local.items()})
          trainer.compile_train_step(state, batch)
          logger.info("compiled; training from step %d to %d", start_step, train_steps)
          window_start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
      step += 1
      pending.append((step, metrics))
      bar.update(1)
      last = step == train_steps
      do_eval = eval_period > 0 and eval_batches > 0 and (step % eval_period == 0 or last)
      do_save = step % checkpoint_period == 0 or last
      stop_signal = stop_signals.any_host()
      stop = bool(stop_signal)
      log = step % log_period == 0 or last or stop
      if log or do_eval or do_save:
        # Losses are fetched (a host sync) only here, and always before a checkpoint is written.
        flush(log=log)
      if do_eval:
        last_eval = evaluator.run(state)
        metrics_logger.write_eval(last_eval)
      if do_save or stop:
        save()
      if do_eval or do_save:
        window_start, window_tokens = time.perf_counter(), 0.0
      if stop:
        logger.warning("stopped by %s: checkpoint written at step %d; run the same command again "
                       "to resume", signal.Signals(stop_signal).name, step)
        break
  return TrainResult(step=step, start_step=start_step, preempted=bool(stop_signal),
                     last_train=last_train, last_eval=last_eval, model_dir=os.fspath(model_dir),
                     stop_signal=stop_signal or None)


def _global_host_loads(local_steps: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """`host_routing_lib.host_load_record` of the global batches: every process's counts of its own
  rows, summed (one gather per record, at the loop's existing sync)."""
  if not local_steps:
    return {}
  per_process = multihost.allgather_json(local_steps)
  steps = []
  for i in range(len(local_steps)):
    total: dict[str, np.ndarray] = {}
    for process in per_process:
      for layer, counts in process[i].items():
        total[layer] = total.get(layer, 0) + np.asarray(counts, np.int64)
    steps.append(total)
  return host_routing_lib.host_load_record(steps)


# --------------------------------------------------------------------------------------------------
# Evaluation.


@gin.configurable(module="hashmoe.train")
def evaluate(*,
             model_dir: str = gin.REQUIRED,
             model_config: models.TransformerConfig = gin.REQUIRED,
             task: str = gin.REQUIRED,
             batch_size: int = gin.REQUIRED,
             seq_len: int = gin.REQUIRED,
             checkpoint: Optional[str] = None,
             step: Optional[int] = None,
             split: str = "validation",
             eval_batches: int = 20,
             seed: int = 0,
             mesh: Optional[Mesh] = None,
             fsdp: bool = False,
             output_file: Optional[str] = None,
             precompute_routing: bool = True,
             input_pipeline: Optional[pipeline_lib.InputPipeline] = None) -> dict[str, Any]:
  """Perplexity of a trained checkpoint on `split` (per token, and per word where defined).

  Args:
    model_dir: the run to evaluate (its newest checkpoint unless `checkpoint`/`step` say otherwise).
    checkpoint: a checkpoint folder to read instead of MODEL_DIR's.
    step: which step to evaluate (default: the newest).
    mesh: the device mesh to evaluate on (default `sharding.make_mesh()`: all devices on "data").
      It need not be the mesh the checkpoint was written on: every array is read straight into
      this mesh's shardings, so a checkpoint of 8 devices evaluates on 1 or 4.
    fsdp: shard the parameters over the batch axes (`sharding.axis_rules`), whatever layout the
      checkpoint was written in.
    output_file: also write the record as JSON here.
    precompute_routing: as `train`'s (the evaluation batches carry their hash routing).
    (the rest as in `train`)

  Returns:
    The eval record: step, split, tokens, nll_sum, loss, ppl (and words, tokens_per_word,
    word_ppl = ppl ** tokens_per_word; see `Evaluator`), the checkpoint and the mesh ({axis:
    size}) it was evaluated on.
  """
  data = input_pipeline or loader.make_input_pipeline(task, batch_size=batch_size, seq_len=seq_len,
                                                      seed=seed)
  mesh = sharding.make_mesh() if mesh is None else mesh
  trainer = Trainer(model_config, models.build_model(model_config), optax.identity(), mesh,
                    seed=seed, rules=sharding.axis_rules(fsdp=fsdp))
  source = checkpoint or model_dir
  logger.info("evaluating %s on mesh %s", source, dict(mesh.shape))
  params, constants, meta, restored_step = checkpoints.restore_params(
      source, trainer.abstract_state, step)
  tables.verify_hash_tables(constants, meta, vocab_size=data.vocab_size,
                            vocab_fingerprint=data.vocab_fingerprint,
                            where=f"{source} (step {restored_step})")
  state = TrainState(step=jnp.asarray(restored_step, jnp.int32), params=params, opt_state=(),
                     constants=constants)
  record = Evaluator(trainer, data, split=split, num_batches=eval_batches,
                     batch_map=_host_routing(model_config, state, precompute_routing)).run(state)
  record["checkpoint"] = os.fspath(source)
  record["mesh"] = {name: int(size) for name, size in mesh.shape.items()}
  if output_file and jax.process_index() == 0:
    epath.Path(output_file).write_text(json.dumps(record, indent=2) + "\n")
  return record


# --------------------------------------------------------------------------------------------------
