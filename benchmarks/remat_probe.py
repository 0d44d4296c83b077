"""Does a remat policy lower XLA:CPU's peak memory with layers unrolled, and with them scanned?

A small dense decoder-only LM (6 layers, d = 256, 4 heads, d_ff = 1024, vocabulary 512, batch
16 x 512 tokens, bfloat16 compute) goes through the same training step as benchmarks/memory.py on
one CPU device, for scan off/on x remat none/full. For each it prints the compiled program's
temporary bytes and how many dot instructions its optimised HLO holds: a rematerialised forward
pass shows up as more dots, so "more dots, same bytes" means the recomputation is there but
saves nothing (docs/PERFORMANCE.md, "Memory and compile time").

Run from the repository root (about a minute): python benchmarks/remat_probe.py
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _memory_module():
  spec = importlib.util.spec_from_file_location("memory_benchmark", REPO / "benchmarks/memory.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def main() -> int:
  from hashmoe import models
  memory = _memory_module()
  args = memory.parse_args(["--models", "tiny", "--devices", "1"])
  for scan in (False, True):
    for remat in ("none", "full"):
      config = models.tiny_config(vocab_size=512, num_encoder_layers=0, num_layers=6,
                                  d_model=256, d_ff=1024, num_heads=4, head_dim=64, max_len=512,
                                  dtype="bfloat16", scan_layers=scan, remat_policy=remat)
      trainer = memory.build_trainer(config, 1, False, args)
      batch = memory._abstract_batch(config, 16, 512, trainer.batch_sharding)
      step = trainer._train_step  # pylint: disable=protected-access
      with trainer.context():
        compiled = step.lower(trainer.abstract_state, batch, trainer._step_key,  # pylint: disable=protected-access
                              trainer.loss_coefficients).compile()
      dots = len(re.findall(r"= \S+ dot\(", compiled.as_text()))
      temp = compiled.memory_analysis().temp_size_in_bytes
      print(f"scan={scan!s:5s} remat={remat:4s} temporaries={temp / 2**20:7.1f} MiB "
            f"dot instructions={dots}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
