"""Sparse FFN layer vs a dense FFN of the same active FLOPs: forward + backward, every dispatch.

For routers {hash, switch} x experts {16, 64, 128} x dispatches, one jitted step computes the layer
(router + experts: both matmuls and the activation), a scalar loss and the gradients of the loss
with respect to every parameter and the input. A dense FFN `relu(x wi) wo` with d_ff equal to one
expert's (the same active FLOPs as top-1 routing) is timed side by side in the same process for
every row: after a warm-up, dense and sparse calls alternate and the medians of >= 5 runs are
reported, as wall time and as process CPU time (the latter is steadier on a shared machine).

Token ids are real text: the embedded Shakespeare corpus (training split) under the project's
vocabulary (`hashmoe.data.corpora.train_vocabulary`: the 8000-piece SentencePiece BPE), a contiguous
window of `--tokens` ids. Hash routing uses the balanced table built from the split's token counts;
Switch routing a randomly initialised `SwitchRouter` on the hidden states, which are a random
embedding of those token ids (so both routers see the corpus's Zipfian token frequencies). Each row
reports the batch's max/mean expert load.

Dispatches (names as in `hashmoe.experts`, plus variants):
  sorted            dropless; XLA:CPU window grouped matmuls `kernels.cpu.gmm` (what "auto" picks
                    on CPU)
  sorted_fused      dropless; the same sort, both matmuls and the activation fused per window
                    (`kernels.cpu.grouped_ffn`, `sorted_ffn(fuse_ffn=True)`)
  sorted_presorted  hash only: `sorted` with the routing permutation precomputed on the host
                    (`expert_grouping.precompute_hash_routing`) and fed in with the batch
  ragged_dot        dropless; `sorted` with `jax.lax.ragged_dot`
  capacity_max      dropless; capacity-padded batched matmul, capacity = the heaviest expert's load
  capacity          capacity-padded batched matmul at --capacity-factor (drops tokens)
  einsum            GShard one-hot dispatch/combine at --capacity-factor (drops tokens)
  pallas            the Pallas grouped matmul, interpreted: only at the --pallas-* (small) size
Peak bytes are XLA's compiled temp + output bytes of the step (`memory_analysis()`).

Run from the repository root, e.g.
  python benchmarks/moe_layer.py --experts 64 --dispatches sorted,sorted_presorted --json out.json
`--help` lists the flags that restrict the grid. The machine, the command and the environment are
printed and written to the JSON file.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

# Run as a script from anywhere: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hashmoe import experts as ex  # noqa: E402
from hashmoe import hash_functions  # noqa: E402
from hashmoe import expert_grouping, hashing  # noqa: E402
from hashmoe import routing  # noqa: E402
from hashmoe.kernels import cpu as cpu_kernels  # noqa: E402

ROUTERS = ("hash", "switch")
EXPERTS = (16, 64, 128)
DISPATCHES = ("sorted", "sorted_fused", "sorted_presorted", "ragged_dot", "capacity_max",
              "capacity", "einsum", "pallas")
ROW_KEYS = ("router", "dispatch", "experts", "tokens", "d_model", "d_ff", "max_over_mean_load",
            "seconds", "dense_seconds", "ratio_vs_dense", "peak_bytes")

_TOKENIZE = r"""
import json, sys
import numpy as np
from hashmoe.data import corpora, vocab as vocab_lib
corpus = corpora.EmbeddedCorpus()
vocab = corpora.train_vocabulary(corpus)
ids = []
for text in corpus.texts("train"):
  ids.extend(vocab.encode(text))
  ids.append(vocab_lib.EOS_ID)
np.save(sys.argv[1], np.asarray(ids, np.int32))
json.dump({"vocab_size": int(vocab.vocab_size), "fingerprint": vocab_lib.vocab_fingerprint(vocab),
           "tokens": len(ids), "corpus": corpus.identity("train")}, open(sys.argv[2], "w"))
"""


# ------------------------------------------------------------------------------------------------
# Real-text token ids.
# ------------------------------------------------------------------------------------------------


def real_text_token_ids(cache_dir: Optional[Path] = None) -> tuple[np.ndarray, dict[str, Any]]:
  """The embedded corpus's training split under the project vocabulary, one EOS after each
  paragraph: (int32[n] ids, metadata). Cached as .npy; the first call tokenises in a child
  process so that TensorFlow (pulled in by seqio) never loads into the timing process."""
  cache_dir = Path(cache_dir or Path.home() / ".cache" / "hashmoe" / "benchmarks")
  cache_dir.mkdir(parents=True, exist_ok=True)
  ids_path, meta_path = cache_dir / "embedded_train_ids.npy", cache_dir / "embedded_train.json"
  if not (ids_path.exists() and meta_path.exists()):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-c", _TOKENIZE, str(ids_path), str(meta_path)], check=True,
                   env=env, cwd=str(Path(__file__).resolve().parents[1]))
  return np.load(ids_path), json.loads(meta_path.read_text())


def token_window(ids: np.ndarray, tokens: int, seed: int) -> np.ndarray:
  """A contiguous window of `tokens` ids at a seeded random offset."""
  if tokens > ids.size:
    raise ValueError(f"--tokens={tokens} exceeds the corpus's {ids.size} tokens")
  start = np.random.default_rng(seed).integers(0, ids.size - tokens + 1)
  return ids[start:start + tokens]


# ------------------------------------------------------------------------------------------------
# Timing.
# ------------------------------------------------------------------------------------------------


def _run(fn: Callable, args: Sequence[Any]) -> tuple[float, float]:
  t0, c0 = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0, time.process_time() - c0


def time_side_by_side(fn: Callable, args: Sequence[Any], dense_fn: Callable,
                      dense_args: Sequence[Any], *, repeats: int, warmup: int) -> dict[str, float]:
  """Medians of `repeats` alternating runs of fn and dense_fn, after `warmup` runs of each."""
  for _ in range(warmup):
    _run(dense_fn, dense_args)
    _run(fn, args)
  runs, dense_runs = [], []
  for _ in range(repeats):
    dense_runs.append(_run(dense_fn, dense_args))
    runs.append(_run(fn, args))
  med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
  low = lambda xs, i: min(x[i] for x in xs)  # noqa: E731
  return {"seconds": med(runs, 0), "dense_seconds": med(dense_runs, 0),
          "cpu_seconds": med(runs, 1), "dense_cpu_seconds": med(dense_runs, 1),
          # The fastest run of each: on a shared machine, the least disturbed one.
          "min_seconds": low(runs, 0), "dense_min_seconds": low(dense_runs, 0)}


def compiled_bytes(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  return {"temp": int(stats.temp_size_in_bytes), "output": int(stats.output_size_in_bytes),
          "argument": int(stats.argument_size_in_bytes)}


# ------------------------------------------------------------------------------------------------
# The layers.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
  tokens: int
  d_model: int
  d_ff: int
  length: int

  @property
  def batch(self) -> int:
    return self.tokens // self.length


def dense_step(shape: Shape, seed: int):
  """(jitted grad step, args) of the dense FFN relu(x wi) wo."""
  rng = np.random.default_rng(seed)
  wi = jnp.asarray(rng.normal(size=(shape.d_model, shape.d_ff)) / np.sqrt(shape.d_model),
                   jnp.float32)
  wo = jnp.asarray(rng.normal(size=(shape.d_ff, shape.d_model)) / np.sqrt(shape.d_ff),
                   jnp.float32)

  def step(wi, wo, x, ct):
    def loss(wi, wo, x):
      return jnp.sum((jax.nn.relu(x @ wi) @ wo) * ct)
    return jax.grad(loss, argnums=(0, 1, 2))(wi, wo, x)

  return jax.jit(step), (wi, wo)


def expert_function(dispatch: str, capacity_factor: float) -> tuple[Callable, dict[str, Any]]:
  """The pure dispatch function and its keyword arguments for a benchmark dispatch name."""
  if dispatch in ("sorted", "sorted_presorted"):
    return ex.sorted_ffn, {}
  if dispatch == "sorted_fused":
    return ex.sorted_ffn, {"fuse_ffn": True}
  if dispatch in ("capacity", "einsum"):
    return ex.dispatch_fn(dispatch), {"capacity_factor": capacity_factor}
  if dispatch == "capacity_max":
    return ex.capacity_ffn, {}  # capacity_factor set per batch (the heaviest expert's load)
  return ex.dispatch_fn(dispatch), {}


def make_router(kind: str, num_experts: int, table: Optional[hashing.HashTable]):
  if kind == "hash":
    return routing.HashRouter(num_experts, tables=(table,))
  return routing.SwitchRouter(num_experts)  # random init, balance loss 0.01, dropless


def sparse_step(router_kind: str, dispatch: str, num_experts: int, shape: Shape, ids: np.ndarray,
                x: jax.Array, table: Optional[hashing.HashTable], capacity_factor: float,
                seed: int):
  """(jitted grad step, args, routing stats) of router + experts on the batch `ids`."""
  router = make_router(router_kind, num_experts, table)
  token_ids = jnp.asarray(ids.reshape(shape.batch, shape.length))
  features = routing.RouterFeatures(token_ids)
  router_vars = router.init(jax.random.key(seed), x, features, deterministic=True)
  routed = jax.jit(lambda v, x, f: router.apply(v, x, f, deterministic=True))(
      router_vars, x, features)
  load = np.bincount(np.asarray(routed.expert_index).reshape(-1), minlength=num_experts)
  max_over_mean = float(load.max() / load.mean())
  fn, kwargs = expert_function(dispatch, capacity_factor)
  if dispatch == "capacity_max":
    kwargs = {"capacity_factor": max_over_mean}  # capacity = the heaviest expert's load
  if dispatch == "sorted_presorted":
    features = routing.RouterFeatures(token_ids, sorted_assignments={
        name: expert_grouping.SortedAssignments(*(jnp.asarray(a) for a in entry))
        for name, entry in expert_grouping.precompute_hash_routing(
            [("token", (table,))], token_ids=ids.reshape(shape.batch, shape.length)).items()})
  rng = np.random.default_rng(seed + 1)
  d, d_ff = shape.d_model, shape.d_ff
  wi = jnp.asarray(rng.normal(size=(num_experts, d, d_ff)) / np.sqrt(d), jnp.float32)
  wo = jnp.asarray(rng.normal(size=(num_experts, d_ff, d)) / np.sqrt(d_ff), jnp.float32)
  params = router_vars.get("params", {})
  collections = {k: v for k, v in router_vars.items() if k != "params"}
  presorted = dispatch == "sorted_presorted"

  def step(params, wi, wo, x, features, ct):
    def loss(params, wi, wo, x):
      r = router.apply({"params": params, **collections}, x, features, deterministic=True)
      extra = {"sorted_assignments": r.sorted_assignments} if presorted else {}
      y, metrics = fn(x, r.expert_index, r.combine_weight, wi, wo, activation=jax.nn.relu,
                      **kwargs, **extra)
      return jnp.sum(y * ct) + r.aux_loss, metrics

    grads, metrics = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(params, wi, wo, x)
    return grads, metrics

  stats = {"max_over_mean_load": max_over_mean}
  return jax.jit(step), (params, wi, wo, x, features), stats


# ------------------------------------------------------------------------------------------------
# The grid.
# ------------------------------------------------------------------------------------------------


def run_row(router_kind, dispatch, num_experts, shape, ids_all, counts, args, dense_cache):
  ids = token_window(ids_all, shape.tokens, args.seed)
  vocab_size = counts.shape[0]
  rng = np.random.default_rng(args.seed + 2)
  embedding = rng.normal(size=(vocab_size, shape.d_model)).astype(np.float32)
  x = jnp.asarray(embedding[ids])
  ct = jnp.asarray(rng.normal(size=(shape.tokens, shape.d_model)).astype(np.float32))
  table = None
  if router_kind == "hash":
    table = hash_functions.build_table("balanced", num_experts=num_experts, vocab_size=vocab_size,
                                token_counts=counts)
  fn, fargs, stats = sparse_step(router_kind, dispatch, num_experts, shape, ids, x, table,
                                 args.capacity_factor, args.seed)
  t0 = time.perf_counter()
  compiled = fn.lower(*fargs, ct).compile()
  compile_seconds = time.perf_counter() - t0
  nbytes = compiled_bytes(compiled)
  total = nbytes["temp"] + nbytes["output"] + nbytes["argument"]
  if total > args.max_gb * 2**30:
    print(f"  skipped {router_kind}/{dispatch}/E={num_experts}: needs {total / 2**30:.1f} GiB "
          f"(> --max-gb {args.max_gb})", flush=True)
    return None
  if shape not in dense_cache:
    dfn, (wi, wo) = dense_step(shape, args.seed)
    dense_compiled = dfn.lower(wi, wo, x, ct).compile()
    dense_cache[shape] = (dense_compiled, (wi, wo), compiled_bytes(dense_compiled))
  dense_compiled, (dwi, dwo), dense_bytes = dense_cache[shape]
  _, metrics = compiled(*fargs, ct)
  dropped = float(metrics.get("dropped_fraction", 0.0))
  timing = time_side_by_side(compiled, (*fargs, ct), dense_compiled, (dwi, dwo, x, ct),
                             repeats=args.repeats, warmup=args.warmup)
  row = {"router": router_kind, "dispatch": dispatch, "experts": num_experts,
         "tokens": shape.tokens, "d_model": shape.d_model, "d_ff": shape.d_ff,
         "max_over_mean_load": round(stats["max_over_mean_load"], 4),
         "seconds": round(timing["seconds"], 5), "dense_seconds": round(timing["dense_seconds"], 5),
         "ratio_vs_dense": round(timing["seconds"] / timing["dense_seconds"], 4),
         "peak_bytes": nbytes["temp"] + nbytes["output"]}
  detail = {"cpu_seconds": round(timing["cpu_seconds"], 5),
            "dense_cpu_seconds": round(timing["dense_cpu_seconds"], 5),
            "cpu_ratio_vs_dense": round(timing["cpu_seconds"] / timing["dense_cpu_seconds"], 4),
            "min_ratio_vs_dense": round(timing["min_seconds"] / timing["dense_min_seconds"], 4),
            "dropped_fraction": round(dropped, 5), "compile_seconds": round(compile_seconds, 2),
            "dense_peak_bytes": dense_bytes["temp"] + dense_bytes["output"],
            "sort_precomputed": float(metrics["sort_precomputed"])
            if "sort_precomputed" in metrics else None}
  return row, detail


def _timed(fn, args, repeats):
  """(median wall, median CPU, median minor page faults) of `repeats` runs after one warm-up."""
  jax.block_until_ready(fn(*args))
  walls, cpus, faults = [], [], []
  for _ in range(repeats):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = _run(fn, args)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    walls.append(wall)
    cpus.append(cpu)
  return statistics.median(walls), statistics.median(cpus), statistics.median(faults)


def dense_with_expert_gradient_bytes(shape: Shape, num_experts: int, seed: int):
  """(jitted step, (wi, wo)): the dense FFN's grad step that also writes two fresh buffers the size
  of the experts' weight gradients ([E, d, D] and [E, D, d] floats, filled with a value read from
  the input so that nothing folds them away).

  A floor for any dropless expert layer on this backend: whatever the kernel, the step must at least
  write E times the dense layer's weight-gradient bytes into freshly allocated memory.
  """
  dense_fn, weights = dense_step(shape, seed)
  d, d_ff = shape.d_model, shape.d_ff

  def step(wi, wo, x, ct):
    grads = dense_fn(wi, wo, x, ct)
    fill = ct[0, 0]
    return grads, (jnp.broadcast_to(fill, (num_experts, d, d_ff)),
                   jnp.broadcast_to(fill, (num_experts, d_ff, d)))

  return jax.jit(step), weights


def breakdown(args, ids_all, counts) -> list[dict[str, Any]]:
  """Where the time of the hash/sorted row goes, piece by piece, next to dense equivalents.

  For the first of --experts: the grouped matmul and the weight gradient (`kernels.cpu.gmm` /
  `tgmm`) against the dense matmuls over the same rows, the sort and the row gathers the dispatch
  adds, zero-filling one expert-weight-sized buffer (what the weight gradient must at least
  write), the page faults of each full step, and a floor: the dense step plus writing the experts'
  weight-gradient bytes once into fresh memory (`dense_with_expert_gradient_bytes`).
  """
  num_experts = args.experts[0]
  shape = Shape(args.tokens, args.d_model, args.d_ff, min(args.length, args.tokens))
  ids = token_window(ids_all, shape.tokens, args.seed)
  table = hash_functions.build_table("balanced", num_experts=num_experts, vocab_size=counts.shape[0],
                              token_counts=counts)
  experts_of = table.table[ids]
  order = np.argsort(experts_of, kind="stable")
  sizes = jnp.asarray(np.bincount(experts_of, minlength=num_experts).astype(np.int32))
  rng = np.random.default_rng(args.seed)
  d, d_ff, t = shape.d_model, shape.d_ff, shape.tokens
  x = jnp.asarray(rng.normal(size=(t, d)).astype(np.float32))
  dy = jnp.asarray(rng.normal(size=(t, d_ff)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(num_experts, d, d_ff)).astype(np.float32) / np.sqrt(d))
  keys = jnp.asarray(experts_of.astype(np.int32))
  perm = jnp.asarray(order.astype(np.int32))

  def sort(keys):
    p = jnp.argsort(keys, stable=True)
    inverse = jnp.zeros_like(p).at[p].set(jnp.arange(p.shape[0], dtype=p.dtype))
    return p, inverse, jnp.bincount(keys, length=num_experts)

  pieces = [
      ("dense x @ w", jax.jit(lambda x, w: x @ w[0]), (x, w)),
      ("gmm (grouped x @ w)", jax.jit(lambda x, w, s: cpu_kernels.gmm(x, w, s)), (x, w, sizes)),
      ("dense x^T dy", jax.jit(lambda x, dy: x.T @ dy), (x, dy)),
      ("tgmm (grouped x^T dy)", jax.jit(lambda x, dy, s: cpu_kernels.tgmm(x, dy, s)),
       (x, dy, sizes)),
      ("zero-fill E x d x D floats", jax.jit(lambda w: jnp.zeros_like(w)), (w,)),
      ("argsort + inverse + bincount", jax.jit(sort), (keys,)),
      ("gather rows x[perm]", jax.jit(lambda x, p: jnp.take(x, p, axis=0)), (x, perm)),
  ]
  out = []
  print(f"breakdown: hash routing, E={num_experts}, tokens={t}, d={d}, D={d_ff}, "
        f"max/mean load {float(np.max(sizes) / np.mean(sizes)):.2f}")
  print(f"{'piece':32s} {'wall s':>8s} {'cpu s':>8s} {'page faults':>11s}")
  for name, fn, fargs in pieces:
    wall, cpu, faults = _timed(fn, fargs, args.repeats)
    out.append({"piece": name, "seconds": wall, "cpu_seconds": cpu, "page_faults": faults})
    print(f"{name:32s} {wall:8.4f} {cpu:8.4f} {faults:11.0f}")
  # The full steps alternate run by run (medians), so that a change in the machine's load hits
  # them alike; the ratio column is against the dense step.
  steps = {}
  for dispatch in ("dense", "sorted", "sorted_presorted", "dense + expert gradient bytes"):
    if dispatch == "dense":
      fn, (wi, wo) = dense_step(shape, args.seed)
      fargs = (wi, wo, x, x)
    elif dispatch == "dense + expert gradient bytes":
      fn, fargs = dense_with_expert_gradient_bytes(shape, num_experts, args.seed)
      fargs = (*fargs, x, x)
    else:
      fn, fargs, _ = sparse_step("hash", dispatch, num_experts, shape, ids, x, table,
                                 args.capacity_factor, args.seed)
      fargs = (*fargs, x)
    steps[f"full step: {dispatch}"] = (fn, fargs)
  for fn, fargs in steps.values():
    jax.block_until_ready(fn(*fargs))
  runs = {name: [] for name in steps}
  for _ in range(args.repeats):
    for name, (fn, fargs) in steps.items():
      f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      wall, cpu = _run(fn, fargs)
      runs[name].append((wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
  dense_wall = statistics.median(r[0] for r in runs["full step: dense"])
  dense_cpu = statistics.median(r[1] for r in runs["full step: dense"])
  for name, rs in runs.items():
    wall, cpu, faults = (statistics.median(r[i] for r in rs) for i in range(3))
    out.append({"piece": name, "seconds": wall, "cpu_seconds": cpu, "page_faults": faults,
                "ratio_vs_dense": wall / dense_wall, "cpu_ratio_vs_dense": cpu / dense_cpu})
    print(f"{name:32s} {wall:8.4f} {cpu:8.4f} {faults:11.0f}   ratio {wall / dense_wall:.3f} "
          f"(CPU {cpu / dense_cpu:.3f})")
  return out


def _machine() -> dict[str, Any]:
  cpu = platform.processor()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__,
          "backend": jax.default_backend(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
          "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "")}


def _load() -> Optional[float]:
  try:
    return os.getloadavg()[0]
  except OSError:
    return None


def _csv(kind):
  return lambda s: tuple(kind(v) for v in s.split(",") if v)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--routers", type=_csv(str), default=ROUTERS, help="comma list of hash,switch")
  p.add_argument("--experts", type=_csv(int), default=EXPERTS, help="comma list, e.g. 16,64,128")
  p.add_argument("--dispatches", type=_csv(str), default=DISPATCHES,
                 help=f"comma list of {','.join(DISPATCHES)}")
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--d-ff", type=int, default=2048)
  p.add_argument("--length", type=int, default=512, help="tokens per sequence (batch = tokens / "
                 "length)")
  p.add_argument("--pallas-tokens", type=int, default=512)
  p.add_argument("--pallas-d-model", type=int, default=64)
  p.add_argument("--pallas-d-ff", type=int, default=256)
  p.add_argument("--capacity-factor", type=float, default=1.25,
                 help="for the dropping dispatches capacity and einsum")
  p.add_argument("--repeats", type=int, default=5, help="timed runs per row (median; >= 5)")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--max-gb", type=float, default=8.0,
                 help="skip a row whose compiled step needs more memory")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", type=str, default=None, help="write the rows to this JSON file")
  p.add_argument("--breakdown", action="store_true",
                 help="instead of the grid, time the pieces of the hash/sorted row (first of "
                 "--experts) next to their dense equivalents")
  args = p.parse_args(argv)
  bad = [d for d in args.dispatches if d not in DISPATCHES]
  if bad:
    p.error(f"unknown dispatches {bad}; expected some of {DISPATCHES}")
  bad = [r for r in args.routers if r not in ROUTERS]
  if bad:
    p.error(f"unknown routers {bad}; expected some of {ROUTERS}")
  if args.repeats < 5:
    p.error(f"--repeats must be >= 5 (medians of at least 5 runs), got {args.repeats}")
  for name in ("tokens", "pallas_tokens"):
    if getattr(args, name) % args.length and getattr(args, name) >= args.length:
      p.error(f"--{name.replace('_', '-')} must be a multiple of --length={args.length}")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  command = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + list(
      sys.argv[1:] if argv is None else argv)))
  ids_all, corpus = real_text_token_ids()
  counts = np.bincount(ids_all, minlength=corpus["vocab_size"])
  machine = _machine()
  print(command)
  print(f"machine: {machine}")
  print(f"corpus: {corpus['tokens']} tokens, vocab {corpus['vocab_size']} "
        f"(fingerprint {corpus['fingerprint'][:12]}); load average {_load()}", flush=True)
  if args.breakdown:
    pieces = breakdown(args, ids_all, counts)
    result = {"breakdown": pieces, "meta": {"command": command, "machine": machine,
                                            "corpus": corpus, "load_average_1min": _load()}}
    if args.json:
      Path(args.json).write_text(json.dumps(result, indent=1))
    return result
  big = Shape(args.tokens, args.d_model, args.d_ff, min(args.length, args.tokens))
  small = Shape(args.pallas_tokens, args.pallas_d_model, args.pallas_d_ff,
                min(args.length, args.pallas_tokens))
  header = (f"{'router':7s} {'dispatch':17s} {'E':>4s} {'tokens':>6s} {'d':>4s} {'D':>5s} "
            f"{'max/mean':>8s} {'dense s':>8s} {'sparse s':>9s} {'ratio':>6s} {'cpu ratio':>9s} "
            f"{'dropped':>7s} {'peak MiB':>8s}")
  print(header)
  rows, details, dense_cache = [], [], {}
  loads = [_load()]
  for router_kind in args.routers:
    for num_experts in args.experts:
      for dispatch in args.dispatches:
        if dispatch == "sorted_presorted" and router_kind != "hash":
          continue  # a learned router's permutation depends on the hidden states
        shape = small if dispatch == "pallas" else big
        result = run_row(router_kind, dispatch, num_experts, shape, ids_all, counts, args,
                         dense_cache)
        if result is None:
          continue
        row, detail = result
        rows.append(row)
        details.append(detail)
        print(f"{row['router']:7s} {row['dispatch']:17s} {row['experts']:4d} {row['tokens']:6d} "
              f"{row['d_model']:4d} {row['d_ff']:5d} {row['max_over_mean_load']:8.2f} "
              f"{row['dense_seconds']:8.4f} {row['seconds']:9.4f} {row['ratio_vs_dense']:6.3f} "
              f"{detail['cpu_ratio_vs_dense']:9.3f} {detail['dropped_fraction']:7.3f} "
              f"{row['peak_bytes'] / 2**20:8.1f}", flush=True)
        loads.append(_load())
  result = {"rows": rows,
            "row_details": details,  # index-aligned with rows: CPU times, drops, compile times
            "meta": {"command": command, "machine": machine, "corpus": corpus,
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                     "load_average_1min": loads, "repeats": args.repeats,
                     "warmup": args.warmup, "capacity_factor": args.capacity_factor,
                     "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}
  if args.json:
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
  return result


if __name__ == "__main__":
  main()
