"""Per-device memory and compile time of the real training step of the paper-size models.

For each row (model, device count, mesh, FSDP, scan, remat) this builds the run's `Trainer`
(`hashmoe.training.trainer`: the loss, forward + backward, the AdamW update of
`hashmoe.training.optim`, the state and batch shardings of `hashmoe.sharding`), then lowers and
compiles its jitted train step for abstract inputs: the state from `jax.eval_shape` of init and the
batch as `jax.ShapeDtypeStruct`s, so nothing is allocated. It reports, per device, XLA's
`compiled.memory_analysis()` (argument, output, temporary and aliased bytes), the compile time and
the model's parameter count.

Devices are CPU-emulated (`--xla_force_host_platform_device_count`, set before jax is imported),
so the bytes are XLA:CPU's buffer assignment for the SPMD-partitioned program of one device, not
TPU HBM (docs/PERFORMANCE.md says how close to expect them to be). One process emulates one device
count; asking for several runs this script once per count and merges the rows.

Models (gin files under configs/models/):
  baseline   paper/baseline.gin, the 222M seq2seq Baseline (Reddit: vocabulary 8008)
  hash_64    paper/hash_64.gin, 64 experts at decoder layer 7 (751M)
  hash_128   paper/hash_128.gin, 128 experts (1.28B)
  lm_4_5b    large/lm_4_5b.gin, the 25-layer LM with 3 hash layers of 128 experts (4.5B,
             vocabulary 51200)
Settings follow configs/runs/tpu_pod.gin (bfloat16 compute, float32 master weights, the
expert-parallel dispatch) except that the sparse layers get a capacity factor (--capacity-factor,
2.0): on XLA:CPU the dropless expert-parallel transport pads every expert's buffer to the worst case
(all local tokens), which says nothing about a TPU's ragged all-to-all.

Run from the repository root:
  python benchmarks/memory.py --json /tmp/memory.json    # baseline and hash_64, 32 devices
  python benchmarks/memory.py --models lm_4_5b --devices 32 --fsdp both --json /tmp/lm.json
  python benchmarks/memory.py --models lm_4_5b --fsdp on --scan on --remat full \
      --append --json docs/results/memory/memory.json   # add rows to the recorded table
Scan and remat rows need `TransformerConfig.scan_layers` / `remat_policy`; where the config has no
such field, --scan / --remat rows are skipped with a note.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
# What the task files would bind: the vocabulary and the encoder (tasks/reddit.gin: seq2seq with
# the model's ENCODER_LAYERS; an LM task: none).
_REDDIT = ["VOCAB_SIZE = 8008",
           "hashmoe.models.TransformerConfig.num_encoder_layers = %ENCODER_LAYERS"]
_LM = ["VOCAB_SIZE = 51200", "hashmoe.models.TransformerConfig.num_encoder_layers = 0"]
MODELS = {
    # name: (gin files, bindings, default batch size, default sequence length)
    "baseline": (["models/paper/baseline.gin"], _REDDIT, 256, 128),
    "hash_64": (["models/paper/hash_64.gin"], _REDDIT, 256, 128),
    "hash_128": (["models/paper/hash_128.gin"], _REDDIT, 256, 128),
    "lm_4_5b": (["models/large/lm_4_5b.gin"], _LM, 256, 1024),
}
# The default run takes minutes (four compiles); the big models are asked for by name (each of
# their compiles takes minutes on its own).
DEFAULT_MODELS = ("baseline", "hash_64")
GIB = 2 ** 30
V4_HBM_GIB = 32


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                 help=f"comma-separated, of {sorted(MODELS)} or 'tiny' (a seconds-long check)")
  p.add_argument("--devices", default="32",
                 help="comma-separated emulated device counts, e.g. 8,32 (one process each)")
  p.add_argument("--expert", type=int, default=None,
                 help="expert-axis size (default: the largest that divides both the experts and "
                      "the devices; 1 for dense models)")
  p.add_argument("--model-axis", type=int, default=1, help="model-axis size (1)")
  p.add_argument("--fsdp", choices=("on", "off", "both"), default="both")
  p.add_argument("--scan", choices=("on", "off", "both"), default="off",
                 help="TransformerConfig.scan_layers, where the config has it")
  p.add_argument("--remat", default="",
                 help="comma-separated TransformerConfig.remat_policy values, where the config "
                      "has it (default: the config's own)")
  p.add_argument("--batch", type=int, default=None, help="global batch (default: the model's)")
  p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the model's)")
  p.add_argument("--dtype", default="bfloat16", help="compute dtype (tpu_pod.gin: bfloat16)")
  p.add_argument("--capacity-factor", type=float, default=2.0,
                 help="sparse layers' capacity factor; 0 for dropless (worst-case buffers on CPU)")
  p.add_argument("--json", default=None, help="write {'rows': [...]} here, a PNG beside it")
  p.add_argument("--append", action="store_true",
                 help="merge into an existing --json file: keep its rows, replace those measured "
                      "again with the same settings, add the command; the PNG shows all rows")
  args = p.parse_args(argv)
  if args.append and not args.json:
    p.error("--append merges into the --json file; give --json PATH")
  for name in args.models.split(","):
    if name not in MODELS and name != "tiny":
      p.error(f"--models: unknown model {name!r}; choose from {sorted(MODELS)} or 'tiny'")
  try:
    args.device_counts = [int(d) for d in args.devices.split(",")]
  except ValueError:
    p.error(f"--devices must be comma-separated integers, got {args.devices!r}")
  if any(d < 1 for d in args.device_counts):
    p.error(f"--devices must be positive, got {args.devices!r}")
  return args


def _choices(flag: str) -> list[bool]:
  return {"on": [True], "off": [False], "both": [False, True]}[flag]


# --------------------------------------------------------------------------------------------------
# One process: one device count.


def _model_config(name: str, args: argparse.Namespace):
  import gin
  from hashmoe import gin_utils, models

  if name == "tiny":  # dense and one layer: the script's own check compiles in seconds
    return models.tiny_config(vocab_size=64, num_encoder_layers=0, num_layers=1, max_len=16,
                              d_model=32), 16, 16
  files, bindings, batch, seq_len = MODELS[name]
  probe = _probe()
  # Task files bind the vocabulary; here the macro stands in for the task.
  gin_utils.parse_gin(files, [], extra="\n".join(
      bindings + ["hashmoe.models.TransformerConfig.vocab_size = %VOCAB_SIZE",
                  "memory_probe.model_config = %MODEL_CONFIG"]))
  config = probe()
  gin.clear_config()
  return config, batch, seq_len


_PROBE = []


def _probe():
  """A gin configurable that returns the parsed MODEL_CONFIG (registered once per process)."""
  import gin
  if not _PROBE:
    _PROBE.append(gin.configurable("memory_probe")(lambda model_config=gin.REQUIRED: model_config))
  return _PROBE[0]


def _with_overrides(config, args, scan: bool, remat: Optional[str]):
  """The config with the run's compute settings; None where a requested field does not exist."""
  fields = {f.name for f in dataclasses.fields(config)}
  changes: dict[str, Any] = {"dtype": args.dtype}
  if scan:
    if "scan_layers" not in fields:
      return None
    changes["scan_layers"] = True
  elif "scan_layers" in fields:
    changes["scan_layers"] = False
  if remat:
    if "remat_policy" not in fields:
      return None
    changes["remat_policy"] = remat
  if config.sparse is not None:
    cf = args.capacity_factor or None
    changes["sparse"] = dataclasses.replace(config.sparse, dispatch="expert_parallel",
                                            capacity_factor=cf)
  return config.replace(**changes)


def _expert_axis(config, devices: int, requested: Optional[int]) -> int:
  import math
  if config.sparse is None:
    return 1
  if requested is not None:
    return requested
  return math.gcd(config.sparse.num_experts, devices)


def _abstract_batch(config, batch: int, seq_len: int, sharding) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  spec = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=sharding)
  out = {"decoder_input_tokens": spec, "decoder_target_tokens": spec}
  if config.is_encoder_decoder:
    out["encoder_input_tokens"] = spec
  return out


def build_trainer(config, devices: int, fsdp: bool, args: argparse.Namespace):
  """The run's `Trainer` for `config` on `devices` emulated devices (the mesh of `--expert` and
  `--model-axis`, the rest on "data"), with pretrain.gin's optimizer."""
  from hashmoe import models, sharding
  from hashmoe.training import optim
  from hashmoe.training.trainer import Trainer
  expert = _expert_axis(config, devices, args.expert)
  mesh = sharding.make_mesh(-1, expert, args.model_axis)
  # AdamW as pretrain.gin binds it (b2 0.98, clipping at 1, warm-up then inverse square root).
  tx = optim.make_optimizer(optim.learning_rate_schedule(5e-4, warmup_steps=4000),
                            b1=0.9, b2=0.98, eps=1e-8, clip_norm=1.0)
  return Trainer(config, models.build_model(config), tx, mesh, seed=0,
                 rules=sharding.axis_rules(fsdp=fsdp))


def measure_row(name: str, devices: int, fsdp: bool, scan: bool, remat: Optional[str],
                args: argparse.Namespace) -> Optional[dict[str, Any]]:
  """Lowers and compiles one training step; None where the row's settings do not exist."""
  import jax

  base, batch, seq_len = _model_config(name, args)
  config = _with_overrides(base, args, scan, remat)
  if config is None:
    print(f"skipped {name} scan={scan} remat={remat!r}: this TransformerConfig has no "
          f"scan_layers/remat_policy field", file=sys.stderr)
    return None
  batch = args.batch or batch
  seq_len = args.seq_len or seq_len
  trainer = build_trainer(config, devices, fsdp, args)
  mesh = trainer.mesh
  state = trainer.abstract_state
  total_params = sum(x.size for x in jax.tree.leaves(state.params))
  abstract_batch = _abstract_batch(config, batch, seq_len, trainer.batch_sharding)
  with trainer.context():
    start = time.perf_counter()
    lowered = trainer._train_step.lower(state, abstract_batch,  # pylint: disable=protected-access
                                        trainer._step_key,  # pylint: disable=protected-access
                                        trainer.loss_coefficients)
    lower_s = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    # CPU seconds of all the process's threads: on a shared, loaded machine wall time mostly
    # measures waiting for a core, this the work of compiling.
    compile_cpu_s = time.process_time() - cpu_start
  mem = compiled.memory_analysis()
  # The optimised program's size, what compile time grows with: one instruction per line.
  hlo_instructions = sum(1 for line in compiled.as_text().splitlines() if " = " in line)
  argument = int(mem.argument_size_in_bytes)
  output = int(mem.output_size_in_bytes)
  alias = int(mem.alias_size_in_bytes)
  temp = int(mem.temp_size_in_bytes)
  # Donated state aliases its outputs: count those buffers once.
  per_device = argument + output - alias + temp
  # What the config really runs (the other branch's fields, where this one has them).
  scanned = bool(getattr(config, "scan_layers", False))
  policy = str(getattr(config, "remat_policy", None) or "none")
  row = {
      "model": name, "total_params": int(total_params), "devices": devices,
      "mesh": {k: int(v) for k, v in mesh.shape.items()}, "scan": scanned, "remat": policy,
      "fsdp": fsdp, "bytes_per_device": per_device,
      "compile_seconds": round(compile_s, 2), "compile_cpu_seconds": round(compile_cpu_s, 2),
      "lower_seconds": round(lower_s, 2), "hlo_instructions": hlo_instructions,
      "argument_bytes": argument, "output_bytes": output, "alias_bytes": alias,
      "temp_bytes": temp, "batch": batch, "seq_len": seq_len, "dtype": config.dtype,
      "capacity_factor": config.sparse.capacity_factor if config.sparse else None,
      "fits_v4_32gib": per_device <= V4_HBM_GIB * GIB,
  }
  print(f"{name:9s} devices={devices:<3d} mesh={row['mesh']} fsdp={fsdp!s:5s} scan={scanned!s:5s} "
        f"remat={row['remat']:8s} params={total_params / 1e6:8.1f}M "
        f"arg={argument / GIB:6.2f} out={output / GIB:6.2f} alias={alias / GIB:6.2f} "
        f"temp={temp / GIB:6.2f} per-device={per_device / GIB:6.2f} GiB "
        f"compile={compile_s:6.1f}s (cpu {compile_cpu_s:6.1f}s)", flush=True)
  return row


def run_one_count(args: argparse.Namespace, devices: int) -> list[dict[str, Any]]:
  import jax
  if jax.device_count() != devices:
    raise RuntimeError(f"expected {devices} emulated devices, jax has {jax.device_count()}; "
                       f"XLA_FLAGS must be set before jax is imported")
  remats = [r for r in args.remat.split(",") if r] or [None]
  rows = []
  for name in args.models.split(","):
    for scan in _choices(args.scan):
      for remat in remats:
        for fsdp in _choices(args.fsdp):
          row = measure_row(name, devices, fsdp, scan, remat, args)
          if row is not None:
            rows.append(row)
  return rows


# --------------------------------------------------------------------------------------------------
# Several device counts: one subprocess each.


def _child_argv(argv: Sequence[str], devices: int, out: str) -> list[str]:
  skip_next, kept = False, []
  for a in argv:
    if skip_next:
      skip_next = False
      continue
    if a in ("--devices", "--json"):
      skip_next = True
      continue
    if a.startswith(("--devices=", "--json=")):
      continue
    kept.append(a)
  return [sys.executable, __file__, *kept, f"--devices={devices}", f"--json={out}"]


def row_label(r: dict[str, Any]) -> str:
  """The PNG's name for a row: model, devices, mesh, batch and what differs from the defaults."""
  cf = r.get("capacity_factor")
  # Dense models have no capacity factor either; only a sparse model has an expert axis above 1.
  if cf is None and r["mesh"].get("expert", 1) > 1:
    transport = " dropless"
  elif cf is not None and cf != 2.0:
    transport = f" cf{cf:g}"
  else:
    transport = ""
  mesh = "x".join(str(v) for v in r["mesh"].values())
  return (f"{r['model']} {r['devices']}d {mesh} {r['batch']}x{r['seq_len']}"
          f"{' fsdp' if r['fsdp'] else ''}{' scan' if r['scan'] else ''}"
          f"{'' if r['remat'] == 'none' else ' ' + r['remat']}{transport}")


def write_png(rows: Sequence[dict[str, Any]], png: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = [row_label(r) for r in rows]
  fig, ax = plt.subplots(figsize=(11, 0.35 * len(rows) + 1.5))
  gib = [r["bytes_per_device"] / GIB for r in rows]
  ax.barh(range(len(rows)), gib, color=["C1" if r["fsdp"] else "C0" for r in rows])
  ax.axvline(V4_HBM_GIB, color="k", ls="--", lw=1, label="32 GiB (TPU v4 HBM)")
  ax.set_yticks(range(len(rows)), labels, fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel("GiB per device (XLA:CPU buffer assignment; orange = FSDP)")
  ax.set_title("Training step: per-device memory")
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  plt.close(fig)


# What makes two rows the same measurement: a new row with these values replaces an old one.
ROW_KEY = ("model", "devices", "mesh", "fsdp", "scan", "remat", "batch", "seq_len", "dtype",
           "capacity_factor")


def merge_record(old: dict[str, Any], rows: Sequence[dict[str, Any]],
                 command: str) -> dict[str, Any]:
  """`old` ({"rows": [...]} with "command" or "commands") with `rows` merged in.

  Old rows keep their order; a new row with the same `ROW_KEY` values takes the old one's place
  (the newer measurement wins), other new rows go at the end. The commands become a list with
  `command` last.
  """
  if not isinstance(old.get("rows"), list):
    raise ValueError("--append: the existing --json file has no 'rows' list; it is not a "
                     "benchmarks/memory.py record (write a new file without --append)")
  key = lambda r: json.dumps([r.get(k) for k in ROW_KEY], sort_keys=True)
  new = {key(r): r for r in rows}
  merged = [new.pop(key(r), r) for r in old["rows"]]
  merged += [r for r in rows if key(r) in new]
  commands = list(old.get("commands") or ([old["command"]] if "command" in old else []))
  return {"commands": commands + [command], "rows": merged}


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  counts = args.device_counts
  already = "--xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
  if len(counts) == 1 and ("jax" not in sys.modules or already):
    if "jax" not in sys.modules:
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count={counts[0]}").strip()
      os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(REPO))
    rows = run_one_count(args, counts[0])
  else:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
      for devices in counts:
        out = os.path.join(tmp, f"rows_{devices}.json")
        env = {**os.environ, "XLA_FLAGS": ""}
        subprocess.run(_child_argv(argv, devices, out), check=True, env=env, cwd=REPO)
        rows += json.loads(Path(out).read_text())["rows"]
  if args.json:
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/memory.py " + " ".join(argv)
    record = {"command": command, "rows": rows}
    if args.append and path.exists():
      record = merge_record(json.loads(path.read_text()), rows, command)
    path.write_text(json.dumps(record, indent=2) + "\n")
    if record["rows"]:
      write_png(record["rows"], path.with_suffix(".png"))
    print(f"wrote {path}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
