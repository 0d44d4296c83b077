"""One full training step of a small decoder-only LM: dense vs one Switch-64, BASE-64 or Hash-64 layer.

`hash_host` is the Hash model again, its batch carrying the routing the input pipeline computes
on the host (`hashmoe.host_routing`, what `train.precompute_routing` does): the step assembles the
permutation from the rows' grouping and sorts nothing. The host's own time per batch (spent in
the loader's threads, beside the step) is printed apart.

The three models differ in one config line (`TransformerConfig.sparse`): the dense baseline, and
the same model with the FFN of one decoder layer replaced by 64 experts of the same d_ff, routed by
a randomly initialised Switch router (load-balancing loss 0.01), by BASE's balanced assignment
(the auction of `hashmoe.assignment` in training, Lewis et al. 2021) or by the balanced hash table
built from the corpus's token counts (Hash Layers §3.1): the paper's speed comparison (Section 5.1:
Hash trains faster than Switch and BASE, which spend time routing). Active FLOPs per token are equal. The step is
forward, backward and an AdamW update (optax), jitted with the parameters and optimizer state
donated, on a batch of real text: the embedded Shakespeare corpus under the project's 8000-piece
BPE (see benchmarks/moe_layer.py). The models are timed in alternation in one process; medians of
>= 5 steps after a warm-up, wall and process CPU time.

Built from `hashmoe.models` and optax directly (not `hashmoe.train`), so it measures the model code.

Run from the repository root:
  python benchmarks/train_step.py [--num-layers 4 --sparse-layer 2 --batch 16 --length 512]
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from hashmoe import hash_functions  # noqa: E402
from hashmoe import host_routing  # noqa: E402
from hashmoe import models  # noqa: E402
from hashmoe import routers  # noqa: E402
import moe_layer  # noqa: E402  (real-text token ids, machine description, timing helpers)

MODELS = ("dense", "switch", "base", "hash", "hash_host")


def make_config(kind: str, args: argparse.Namespace, vocab_size: int) -> models.TransformerConfig:
  sparse = None
  if kind != "dense":
    router = "hash" if kind == "hash_host" else kind
    sparse = models.SparseConfig(router=routers.router_config(router), num_experts=args.experts,
                                 layers=(args.sparse_layer,), dispatch=args.dispatch)
  return models.TransformerConfig(
      vocab_size=vocab_size, d_model=args.d_model, d_ff=args.d_ff, num_heads=args.num_heads,
      head_dim=args.d_model // args.num_heads, num_layers=args.num_layers, num_encoder_layers=0,
      max_len=args.length, dropout_rate=args.dropout, sparse=sparse)


def make_batch(ids: np.ndarray, args: argparse.Namespace) -> dict[str, jax.Array]:
  window = moe_layer.token_window(ids, args.batch * args.length + 1, args.seed)
  rows = window[1:].reshape(args.batch, args.length)
  inputs = window[:-1].reshape(args.batch, args.length)
  return {"decoder_input_tokens": jnp.asarray(inputs), "decoder_target_tokens": jnp.asarray(rows)}


def make_step(model, optimizer):
  def loss_fn(params, other, batch, rng):
    logits, state = model.apply({"params": params, **other}, batch, deterministic=False,
                                rngs={"dropout": rng}, mutable=[models.MOE_COLLECTION])
    labels = batch["decoder_target_tokens"]
    xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    weights = (labels > 0).astype(jnp.float32)
    loss = jnp.sum(xent * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    aux, _ = models.collect_aux(state)
    return loss + aux, loss

  def step(params, opt_state, other, batch, rng):
    (total, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, other, batch, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", type=lambda s: tuple(s.split(",")), default=MODELS)
  p.add_argument("--experts", type=int, default=64)
  p.add_argument("--dispatch", default="auto")
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--d-ff", type=int, default=2048)
  p.add_argument("--num-heads", type=int, default=8)
  p.add_argument("--num-layers", type=int, default=4)
  p.add_argument("--sparse-layer", type=int, default=2, help="0-based decoder layer made sparse")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--dropout", type=float, default=0.0)
  p.add_argument("--learning-rate", type=float, default=1e-4)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  if args.repeats < 5:
    p.error(f"--repeats must be >= 5, got {args.repeats}")
  bad = [m for m in args.models if m not in MODELS]
  if bad or "dense" not in args.models:
    p.error(f"--models must include dense and be drawn from {MODELS}, got {args.models}")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  command = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + list(
      sys.argv[1:] if argv is None else argv)))
  ids, corpus = moe_layer.real_text_token_ids()
  vocab_size = corpus["vocab_size"]
  counts = np.bincount(ids, minlength=vocab_size)
  machine = moe_layer._machine()
  print(command)
  print(f"machine: {machine}")
  batch = make_batch(ids, args)
  optimizer = optax.adamw(args.learning_rate)
  runs = {}
  for kind in args.models:
    config = make_config(kind, args, vocab_size)
    tables = None
    if config.sparse is not None and config.sparse.router.uses_tables:
      tables = {"default": (hash_functions.build_table("balanced", num_experts=args.experts,
                                                vocab_size=vocab_size, token_counts=counts),)}
    model = models.build_model(config, tables)
    variables = model.init({"params": jax.random.key(args.seed)}, batch, deterministic=True)
    variables = jax.tree_util.tree_map(lambda x: x, dict(variables))
    params = variables.pop("params")
    other = {k: v for k, v in variables.items() if k != models.MOE_COLLECTION}
    params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x), params,
                                    is_leaf=lambda x: hasattr(x, "names"))
    model_batch, host_seconds = batch, None
    if kind == "hash_host":
      host = host_routing.plan(config, other)
      numpy_batch = {k: np.asarray(v) for k, v in batch.items()}
      times = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        routed = host(numpy_batch)
        times.append(time.perf_counter() - t0)
      host_seconds = statistics.median(times)
      model_batch = {k: jnp.asarray(v) for k, v in routed.items()}
    opt_state = optimizer.init(params)
    step = make_step(model, optimizer)
    rng = jax.random.key(args.seed + 1)
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, other, model_batch, rng).compile()
    compile_seconds = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    counts_ = models.param_counts(config, tables)
    runs[kind] = {"compiled": compiled, "state": [params, opt_state], "other": other, "rng": rng,
                  "peak_bytes": int(stats.temp_size_in_bytes + stats.output_size_in_bytes),
                  "params": counts_, "compile_seconds": compile_seconds, "wall": [], "cpu": [],
                  "loss": None, "batch": model_batch, "host_seconds": host_seconds}

  def run_once(kind):
    r = runs[kind]
    t0, c0 = time.perf_counter(), time.process_time()
    params, opt_state, loss = r["compiled"](*r["state"], r["other"], r["batch"], r["rng"])
    loss = float(jax.block_until_ready(loss))
    r["state"] = [params, opt_state]
    r["loss"] = loss
    return time.perf_counter() - t0, time.process_time() - c0

  for _ in range(args.warmup):
    for kind in args.models:
      run_once(kind)
  for _ in range(args.repeats):
    for kind in args.models:
      wall, cpu = run_once(kind)
      runs[kind]["wall"].append(wall)
      runs[kind]["cpu"].append(cpu)

  tokens = args.batch * args.length
  dense_wall = statistics.median(runs["dense"]["wall"])
  dense_cpu = statistics.median(runs["dense"]["cpu"])
  rows = []
  print(f"{'model':8s} {'params':>11s} {'active':>11s} {'step s':>8s} {'ratio':>6s} "
        f"{'cpu s':>8s} {'cpu ratio':>9s} {'tokens/s':>9s} {'peak MiB':>9s} {'loss':>7s}")
  for kind in args.models:
    r = runs[kind]
    wall, cpu = statistics.median(r["wall"]), statistics.median(r["cpu"])
    row = {"model": kind, "experts": 0 if kind == "dense" else args.experts,
           "total_params": r["params"]["total"], "active_params": r["params"]["active"],
           "seconds": round(wall, 4), "dense_seconds": round(dense_wall, 4),
           "ratio_vs_dense": round(wall / dense_wall, 4), "cpu_seconds": round(cpu, 4),
           "cpu_ratio_vs_dense": round(cpu / dense_cpu, 4),
           "tokens_per_second": round(tokens / wall, 1), "peak_bytes": r["peak_bytes"],
           "compile_seconds": round(r["compile_seconds"], 2), "last_loss": round(r["loss"], 4)}
    if r["host_seconds"] is not None:
      row["host_routing_seconds"] = round(r["host_seconds"], 5)
    rows.append(row)
    print(f"{kind:8s} {row['total_params']:11,d} {row['active_params']:11,d} {wall:8.4f} "
          f"{row['ratio_vs_dense']:6.3f} {cpu:8.4f} {row['cpu_ratio_vs_dense']:9.3f} "
          f"{row['tokens_per_second']:9.1f} {r['peak_bytes'] / 2**20:9.1f} {r['loss']:7.4f}")
    if r["host_seconds"] is not None:
      print(f"{'':8s} host routing of one batch (input pipeline): {r['host_seconds']:.5f} s")
  result = {"rows": rows, "meta": {
      "command": command, "machine": machine, "corpus": corpus, "tokens_per_batch": tokens,
      "config": {k: v for k, v in vars(args).items() if k != "json"},
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "load_average_1min": moe_layer._load()}}
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
  return result


if __name__ == "__main__":
  main()
