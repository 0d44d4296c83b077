"""Cost of one new token against the prefix length: cached decoding vs the uncached full pass.

For a decoder-only LM with one hash layer (token key, random table; the router does not change the
decoder's cost structure), each prefix length P gets two timings of producing the logits of the
token after a P-token prefix, batch `--batch`:

  cached    `hashmoe.decoding.decode_step`: one token per row through the key/value cache. The
            cache has `--cache-length` positions (default `max(--prefix-lens) + --steps`) for every
            P (one compiled program,
            as a generation with that budget has); its index is set to P and `--steps` steps run
            in a loop inside one jitted program (positions P .. P + steps - 1; the cache updated in
            place, as in a decoding loop). Cached keys and values are zeros: their values do not
            change the work.
  uncached  the full forward pass over the P-token prefix and its logits at the last position:
            what decoding without a cache repeats for every token (one compile per P). hashmoe's
            t5x adapter did worse before the cache: a full pass over the whole decode length
            for every token.

Both are jitted; compile time is excluded (one warm-up call). Each timing is the best of
`--repeats` runs (the machine may be shared), of `--steps` calls for either mode, as seconds per
new token for the whole batch: wall time ("seconds_per_token") and the process's CPU time
("cpu_seconds_per_token", steadier when other processes share the cores). Rows also carry the
model's shape, the device and the 1-minute load average when the row was measured.

Run from the repository root:
  python benchmarks/decode.py --json docs/results/decode/decode.json
  python benchmarks/decode.py --tiny --prefix-lens 4,12 --steps 2 --json /tmp/decode.json
The JSON is {"command": ..., "rows": [{"mode": "cached" | "uncached", "prefix_len": int,
"seconds_per_token": float, ...}]}; a PNG of the two curves is written beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--prefix-lens", default="16,32,64,128,256,512",
                 help="comma-separated prefix lengths P (default 16..512)")
  p.add_argument("--steps", type=int, default=8, help="calls timed per run (8)")
  p.add_argument("--repeats", type=int, default=3, help="runs per timing; the best is kept (3)")
  p.add_argument("--batch", type=int, default=4, help="rows decoded together (4)")
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--d-ff", type=int, default=2048)
  p.add_argument("--num-heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--num-layers", type=int, default=4)
  p.add_argument("--num-experts", type=int, default=16)
  p.add_argument("--vocab-size", type=int, default=8008)
  p.add_argument("--cache-length", type=int, default=None,
                 help="positions of the cache (default: max(--prefix-lens) + --steps)")
  p.add_argument("--dense", action="store_true", help="no hash layer: every FFN dense")
  p.add_argument("--tiny", action="store_true",
                 help="a test-size model (hashmoe.models.tiny_config, vocabulary 64)")
  p.add_argument("--json", default=None, help="write {'rows': [...]} here, a PNG beside it")
  args = p.parse_args(argv)
  args.prefix_lens = [int(x) for x in args.prefix_lens.split(",") if x]
  if not args.prefix_lens or min(args.prefix_lens) < 1:
    p.error(f"--prefix-lens needs positive lengths, got {args.prefix_lens}")
  if args.steps < 1 or args.repeats < 1 or args.batch < 1:
    p.error("--steps, --repeats and --batch must be >= 1")
  needed = max(args.prefix_lens) + args.steps
  if args.cache_length is None:
    args.cache_length = needed
  elif args.cache_length < needed:
    p.error(f"--cache-length {args.cache_length} cannot hold the longest prefix and the timed "
            f"steps: max(--prefix-lens) + --steps = {needed}")
  return args


def _config(args: argparse.Namespace):
  from hashmoe import models, routers
  max_len = args.cache_length
  if args.tiny:
    sparse = None if args.dense else models.SparseConfig(router=routers.Hash(), num_experts=4,
                                                         layers=(1,))
    return models.tiny_config(64, num_encoder_layers=0, sparse=sparse, max_len=max_len)
  sparse = None if args.dense else models.SparseConfig(
      router=routers.Hash(), num_experts=args.num_experts, layers=(args.num_layers - 1,))
  return models.TransformerConfig(
      vocab_size=args.vocab_size, d_model=args.d_model, d_ff=args.d_ff,
      num_heads=args.num_heads, head_dim=args.head_dim, num_layers=args.num_layers,
      num_encoder_layers=0, max_len=max_len, dropout_rate=0.0, sparse=sparse)


def _best(fn, repeats: int) -> tuple[float, float]:
  """(best wall seconds, best process CPU seconds) of `repeats` calls of fn."""
  wall = cpu = float("inf")
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    wall = min(wall, time.perf_counter() - start)
    cpu = min(cpu, time.process_time() - start_cpu)
  return wall, cpu


def _row(mode: str, prefix: int, timings: tuple[float, float], steps: int,
         common: dict[str, Any]) -> dict[str, Any]:
  wall, cpu = timings
  return {"mode": mode, "prefix_len": prefix, "seconds_per_token": wall / steps,
          "cpu_seconds_per_token": cpu / steps, "load_average_1min": os.getloadavg()[0], **common}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from hashmoe import decoding, models

  config = _config(args)
  model = models.build_model(config)
  init_batch = {k: np.ones(s.shape, s.dtype) for k, s in models.init_batch_spec(config).items()}
  variables = model.init(jax.random.key(0), init_batch)
  variables = {k: v for k, v in variables.items() if k != "moe"}
  cache_length = config.max_len
  rng = np.random.default_rng(0)
  common = {"batch": args.batch, "d_model": config.d_model, "num_layers": config.num_layers,
            "sparse_layers": 0 if config.sparse is None else len(config.sparse.layers),
            "vocab_size": config.vocab_size, "cache_length": cache_length,
            "steps": args.steps, "repeats": args.repeats, "device": jax.devices()[0].device_kind}
  rows = []

  @jax.jit
  def steps(variables, cache, token):
    # A loop inside one program, as a decoding loop runs: the cache is updated in place.
    def body(_, carry):
      logits, cache = carry
      logits, cache = decoding.decode_step(model, variables, cache, token)
      return logits, cache
    logits = jnp.zeros((args.batch, config.vocab_size), jnp.float32)
    return jax.lax.fori_loop(0, args.steps, body, (logits, cache))[0]

  full = jax.jit(lambda v, t: model.apply(v, {"decoder_input_tokens": t})[:, -1])
  cache0 = decoding.init_cache(model, variables, args.batch, cache_length)
  token = jnp.asarray(rng.integers(1, config.vocab_size, (args.batch, 1)), jnp.int32)

  for prefix in args.prefix_lens:
    cache = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.full_like(x, prefix) if path[-1].key == "cache_index" else x, cache0)

    def cached(cache=cache):
      steps(variables, cache, token).block_until_ready()

    cached()  # compile (first prefix) and warm up
    rows.append(_row("cached", prefix, _best(cached, args.repeats), args.steps, common))

    tokens = jnp.asarray(rng.integers(1, config.vocab_size, (args.batch, prefix)), jnp.int32)

    def uncached(tokens=tokens):
      for _ in range(args.steps):
        logits = full(variables, tokens)
      logits.block_until_ready()

    uncached()
    rows.append(_row("uncached", prefix, _best(uncached, args.repeats), args.steps, common))
    print(f"P={prefix:5d}  cached {rows[-2]['seconds_per_token'] * 1e3:9.3f} ms/token  "
          f"uncached {rows[-1]['seconds_per_token'] * 1e3:9.3f} ms/token", file=sys.stderr)
  return rows


def write_png(rows: Sequence[dict[str, Any]], png: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for mode, color in (("cached", "C0"), ("uncached", "C1")):
    for key, style, what in (("cpu_seconds_per_token", "o-", "process CPU time"),
                             ("seconds_per_token", "s--", "wall time")):
      points = sorted((r["prefix_len"], r[key]) for r in rows if r["mode"] == mode)
      ax.plot([p for p, _ in points], [s * 1e3 for _, s in points], style, color=color,
              label=f"{mode}, {what}", alpha=1.0 if style == "o-" else 0.5)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("prefix length (tokens)")
  ax.set_ylabel("ms per new token (whole batch)")
  r = rows[0]
  ax.set_title(f"Decoding cost per token: batch {r['batch']}, d={r['d_model']}, "
               f"{r['num_layers']} layers", fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  sys.path.insert(0, str(REPO))
  rows = run(args)
  if args.json:
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": "python benchmarks/decode.py " + " ".join(argv), "rows": rows}
    path.write_text(json.dumps(record, indent=2) + "\n")
    write_png(rows, path.with_suffix(".png"))
    print(f"wrote {path}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
