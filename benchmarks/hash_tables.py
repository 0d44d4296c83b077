"""Top-k hash table initialisations: expert load on held-out text, and build time at 129k x 256.

Two measurements (docs/PERFORMANCE.md, "Hash tables"; issue 15, item 4's load half):

1. Load. The embedded Shakespeare corpus (`hashmoe.data.embedded`) under its task's tokenizer
   (the 8,000-piece SentencePiece BPE of configs/tasks/embedded_lm.gin, trained on the training
   split and cached like the task's): the training and validation splits' paragraphs, one a line,
   are counted with `hashmoe.data.tokenizer_counts.count_tokens` (what `hashmoe build-hash
   --sentencepiece` runs). For each (E, k) of --shapes and each initialisation (balanced,
   roundrobin, random, zeros: `hash_functions.build_topk`), the table is built from the training
   counts and its expert load reported on the training split and on the held-out validation
   split (three whole works, never seen by the table): max/mean (the busiest expert's share of
   the routed assignments over 1/E), and the coefficient of variation. The random table is built
   with --seeds seeds; its figures are the mean and the range over them. Beside them, the lower
   bound of max/mean that any token -> experts table has on that text: the expert that holds the
   most frequent token carries at least its count c_max, so max/mean >= c_max * E / (tokens * k).
2. Build time. `hash_functions.build_topk` for a 129,280-token vocabulary (DeepSeek-V4's), 256
   experts, k = 6, each kind, --repeats times (median and min). The counts are synthetic: a
   seeded Zipf(1.1) draw per token (only the balanced build reads them, and its cost depends on
   the vocabulary and expert counts, not on the values).

Run from the repository root:
  python benchmarks/hash_tables.py --json docs/results/hash_tables/hash_tables.json
With --json the bar chart of held-out max/mean load is written beside it (hash_tables.png).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

KINDS = ("balanced", "roundrobin", "random", "zeros")
# (E, k): DeepSeek-V4's 256 x 6, a 64-expert fine-grained layer, and the tiny hash top-k model's
# 16 x 2 (configs/models/tiny/baseline.gin's NUM_EXPERTS, configs/models/routers/hash_topk.gin).
DEFAULT_SHAPES = "64x6,256x6,16x2"
TIMING_VOCAB, TIMING_EXPERTS, TIMING_K = 129280, 256, 6


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--json", default=None, help="write the results here (and the PNG beside)")
  parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                      help="comma-separated EXPERTSxK (default: %(default)s)")
  parser.add_argument("--seeds", type=int, default=3, help="random tables per shape")
  parser.add_argument("--repeats", type=int, default=3, help="timed builds per kind")
  parser.add_argument("--vocab_size", type=int, default=8000,
                      help="the embedded task's SentencePiece size (default: %(default)s)")
  parser.add_argument("--skip_timing", action="store_true")
  args = parser.parse_args(argv)
  try:
    args.shape_list = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",")]
  except ValueError:
    parser.error(f"--shapes={args.shapes!r}: expected e.g. 64x6,256x6")
  for e, k in args.shape_list:
    if not 1 <= k <= e:
      parser.error(f"--shapes: {e}x{k} needs 1 <= k <= experts")
  if args.seeds < 1 or args.repeats < 1:
    parser.error("--seeds and --repeats must be >= 1")
  return args


def _load_avg() -> float:
  return round(os.getloadavg()[0], 2)


def measure_load(args: argparse.Namespace) -> dict[str, Any]:
  # pylint: disable=g-import-not-at-top
  from hashmoe import hash_functions, table_export
  from hashmoe.data import corpora, tokenizer_counts
  from hashmoe.data import vocab as vocab_lib

  corpus = corpora.EmbeddedCorpus()
  vocabulary = corpora.train_vocabulary(
      corpus, settings=vocab_lib.SentencePieceSettings(vocab_size=args.vocab_size))
  model_file = vocabulary.sentencepiece_model_file
  tokenizer = tokenizer_counts.load_tokenizer(sentencepiece=model_file)
  counts = {}
  with tempfile.TemporaryDirectory() as scratch:
    for split in ("train", "validation"):
      path = Path(scratch) / f"{split}.txt"
      with open(path, "w", encoding="utf-8") as f:
        for text in corpus.texts(split):
          f.write(text.replace("\n", " ") + "\n")
      counts[split] = tokenizer_counts.count_tokens(tokenizer, [path], progress=False)
  shapes = {}
  for experts, k in args.shape_list:
    rows = {}
    for kind in KINDS:
      seeds = range(args.seeds) if kind == "random" else range(1)
      per_seed = []
      for seed in seeds:
        table = hash_functions.build_topk(kind, k, num_experts=experts,
                                          vocab_size=tokenizer.vocab_size,
                                          token_counts=counts["train"].counts, seed=seed)
        report = table_export.load_report(table, counts["train"].counts,
                                          counts["validation"].counts)
        per_seed.append({"train": report["counted"], "validation": report["heldout"]})
      row = {}
      for split in ("train", "validation"):
        for metric in ("max_over_mean", "cv"):
          values = [s[split][metric] for s in per_seed]
          row[f"{split}_{metric}"] = statistics.fmean(values)
          if len(values) > 1:
            row[f"{split}_{metric}_range"] = [min(values), max(values)]
      row["seeds"] = len(per_seed)
      rows[kind] = row
    # No token -> experts table does better than this: the expert holding the most frequent token
    # carries at least its count, against a mean of tokens * k / E.
    bound = {split: max(1.0, float(c.counts.max()) * experts / (c.tokens * k))
             for split, c in counts.items()}
    shapes[f"{experts}x{k}"] = {"experts": experts, "k": k, "kinds": rows,
                                "max_over_mean_lower_bound": bound}
  return {
      "tokenizer": {"model": str(model_file), "vocab_size": tokenizer.vocab_size},
      "tokens": {split: c.tokens for split, c in counts.items()},
      "top_token_share": {split: float(c.counts.max()) / c.tokens for split, c in counts.items()},
      "count_seconds": {split: round(c.seconds, 3) for split, c in counts.items()},
      "shapes": shapes,
  }


def measure_build_time(args: argparse.Namespace) -> dict[str, Any]:
  from hashmoe import hash_functions  # pylint: disable=g-import-not-at-top
  counts = np.random.default_rng(0).zipf(1.1, size=TIMING_VOCAB)
  result = {"vocab_size": TIMING_VOCAB, "experts": TIMING_EXPERTS, "k": TIMING_K,
            "counts": "synthetic: numpy default_rng(0).zipf(1.1, size=vocab)", "kinds": {}}
  for kind in KINDS:
    seconds = []
    before = _load_avg()
    for _ in range(args.repeats):
      start = time.perf_counter()
      hash_functions.build_topk(kind, TIMING_K, num_experts=TIMING_EXPERTS,
                                vocab_size=TIMING_VOCAB, token_counts=counts)
      seconds.append(time.perf_counter() - start)
    result["kinds"][kind] = {"median_s": round(statistics.median(seconds), 4),
                             "min_s": round(min(seconds), 4), "repeats": len(seconds),
                             "load_avg_before": before, "load_avg_after": _load_avg()}
  return result


def write_chart(results: dict[str, Any], png: Path) -> None:
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  shapes = results["load"]["shapes"]
  fig = Figure(figsize=(6.4, 4.0), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  width = 0.8 / len(KINDS)
  for i, kind in enumerate(KINDS):
    xs = [j + (i - (len(KINDS) - 1) / 2) * width for j in range(len(shapes))]
    ys = [shape["kinds"][kind]["validation_max_over_mean"] for shape in shapes.values()]
    bars = ax.bar(xs, ys, width, label=kind)
    ax.bar_label(bars, labels=[f"{y:.2f}" if y < 10 else f"{y:.0f}" for y in ys], fontsize=6)
  for j, shape in enumerate(shapes.values()):
    bound = shape["max_over_mean_lower_bound"]["validation"]
    ax.plot([j - 0.45, j + 0.45], [bound, bound], color="black", linewidth=1.0,
            label="bound of any table" if j == 0 else None)
  ax.set_xticks(range(len(shapes)), [f"E={s['experts']}, k={s['k']}" for s in shapes.values()])
  ax.set_yscale("log")
  ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
  ax.set_ylabel("max / mean expert load (held-out text, log)")
  ax.set_title("Top-k hash table initialisations: load on Shakespeare validation", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(png)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  started = time.perf_counter()
  results = {
      "command": "python benchmarks/hash_tables.py " + " ".join(sys.argv[1:] if argv is None
                                                                else argv),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                  "python": platform.python_version()},
      "load_avg_start": _load_avg(),
  }
  results["load"] = measure_load(args)
  if not args.skip_timing:
    results["build_time"] = measure_build_time(args)
  results["seconds"] = round(time.perf_counter() - started, 1)
  results["load_avg_end"] = _load_avg()
  text = json.dumps(results, indent=2, sort_keys=True) + "\n"
  if args.json:
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    write_chart(results, out.with_suffix(".png"))
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
