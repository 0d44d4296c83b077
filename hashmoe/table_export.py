"""Top-k hash tables as files MaxText and Megatron load: `.npy`, safetensors, and a load report.

DeepSeek-V4 routes its first 3 MoE layers by a fixed token -> k-of-E experts table, `tid2eid`
int[vocab, k]. `hashmoe build-hash --sentencepiece/--hf_tokenizer` (`build_from_text`) counts a
user's text with the model's tokenizer (`hashmoe.data.tokenizer_counts`), builds the table
(`hash_functions.build_topk`: balanced, roundrobin, random, zeros) and writes:

* `OUT.npy`: the bare int32[vocab, k] table;
* `OUT.npz`: the same as a `hashing.HashTable` (kind, seed, vocabulary fingerprint), which hashmoe
  training loads (`train.hash_tables`);
* `OUT.<layout>.safetensors` for each layout of `LAYOUTS`: one tensor per hash layer, named as
  that loader reads it, int32, with the table's description in the safetensors metadata;
* `OUT.report.json`: the table's expert load (max/mean, coefficient of variation) on the counted
  text and on a held-out part of it, and how it was made.

Where the tensor names come from (read in the frameworks' code, snapshots of August 2026):

* "maxtext": `model.layers.{i}.mlp.gate.tid2eid`, the Hugging Face name MaxText's DeepSeek-V4
  converter maps to its `Tid2EidVar` (AI-Hypercomputer/maxtext,
  `src/maxtext/checkpoint_conversion/utils/param_mapping.py`,
  `DEEPSEEKV4_MAXTEXT_TO_HF_PARAM_MAPPING`: `Tid2EidVar-decoder-layers_{i}-mlp-MoeBlock_0-tid2eid`
  for i in range(3), hard-coded to 3 layers). MaxText holds the table as float32 zeros
  (`layers/moe.py`, `RoutedMoE.__init__`) and casts it to int32 when routing.
* "megatron_core": `decoder.layers.{i}.mlp.router.tid2eid`, the state-dict key of the persistent
  int32 buffer `TopKRouter.tid2eid` (NVIDIA/Megatron-LM `dev`; not on `main`,
  `megatron/core/transformer/moe/router.py`) under GPTModel.decoder (TransformerBlock.layers[i],
  TransformerLayer.mlp = MoELayer, MoELayer.router); hash layers are those with layer_number
  (1-based) <= `moe_n_hash_layers`, i.e. module indices 0..N-1. Megatron-Core's own checkpoints
  are torch_dist, not safetensors: this file is for `model.load_state_dict(..., strict=False)`.
* "deepseek_v4": `layers.{i}.ffn.gate.tid2eid`, the name in DeepSeek-V4's released checkpoint
  format as Megatron-LM's experimental DeepSeek-V4 loader maps it (`experimental/lite/megatron/
  lite/model/deepseek_v4/lite/checkpoint.py`, `_map_block_attr`: `mlp.gate.tid2eid` ->
  `ffn.gate.tid2eid` under `layers.{i}`); that model holds an int64 buffer
  (`deepseek_v4/lite/moe.py`).

Not checked against the frameworks' running code: no MaxText or Megatron is installed here, so the
files are tested against a fixture of these names, dtypes and shapes (tests/test_build_hash.py),
not loaded by them; whether their loaders cast int32 to their own dtypes (float32, int64) on load
is read from the code above, not run.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from hashmoe import hash_functions, hashing
from hashmoe.data import tokenizer_counts

PathLike = Union[str, os.PathLike]

# Tensor name of hash layer i's table in each loader's checkpoint (see the module docstring).
LAYOUTS: Mapping[str, str] = {
    "maxtext": "model.layers.{layer}.mlp.gate.tid2eid",
    "megatron_core": "decoder.layers.{layer}.mlp.router.tid2eid",
    "deepseek_v4": "layers.{layer}.ffn.gate.tid2eid",
}
METADATA_FORMAT = "hashmoe.tid2eid"
# DeepSeek-V4 routes its first 3 MoE layers by hash (MaxText `first_num_hash_layers: 3`).
DEFAULT_HASH_LAYERS = 3


def tensor_names(layout: str, num_layers: int, first_layer: int = 0) -> list[str]:
  """The tensor names of `num_layers` hash layers (module indices first_layer, first_layer+1, ...)
  in `layout` (a key of `LAYOUTS`)."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
  if num_layers < 1 or first_layer < 0:
    raise ValueError(f"need num_layers >= 1 and first_layer >= 0, got {num_layers}, "
                     f"{first_layer}")
  return [LAYOUTS[layout].format(layer=first_layer + i) for i in range(num_layers)]


def output_paths(output: PathLike, layouts: Sequence[str]) -> dict[str, Path]:
  """{"npy", "npz", "report", layout...: path} of the files written for `output` (an `.npy`)."""
  output = Path(output)
  if output.suffix != ".npy":
    raise ValueError(f"--output {output}: give the .npy to write (e.g. tid2eid.npy); the "
                     "safetensors, .npz and report are written beside it")
  stem = output.with_suffix("")
  paths = {"npy": output, "npz": stem.with_suffix(".npz"),
           "report": Path(f"{stem}.report.json")}
  for layout in layouts:
    if layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    paths[layout] = Path(f"{stem}.{layout}.safetensors")
  return paths


def _metadata(table: hashing.HashTable, layout: str, names: Sequence[str]) -> dict[str, str]:
  # safetensors metadata is str -> str.
  return {"format": METADATA_FORMAT, "layout": layout, "kind": table.kind,
          "num_experts": str(table.num_experts), "k": str(table.k),
          "vocab_size": str(table.vocab_size), "seed": str(table.seed),
          "vocab_fingerprint": table.vocab_fingerprint, "tensors": ",".join(names)}


def write_safetensors(table: hashing.HashTable, path: PathLike, *, layout: str,
                      num_layers: int, first_layer: int = 0) -> list[str]:
  """Writes the table once per hash layer under `layout`'s names (int32[vocab, k] each).

  Returns:
    The tensor names written.
  """
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

  names = tensor_names(layout, num_layers, first_layer)
  # One array per name: safetensors stores each tensor's bytes, so shared memory is fine here.
  data = st_numpy.save({name: table.table for name in names},
                       metadata=_metadata(table, layout, names))
  hashing._atomic_write(path, data)  # pylint: disable=protected-access
  return names


def write_npy(table: hashing.HashTable, path: PathLike) -> None:
  table.save_plain(path)


def read_exported(path: PathLike, *, num_experts: int, vocab_size: Optional[int] = None,
                  k: Optional[int] = None, tensor: Optional[str] = None,
                  kind: Optional[str] = None) -> hashing.HashTable:
  """Reads a table from a `.npy` or a safetensors file (one of its tensors) and checks it.

  Args:
    path: `.npy` (int[vocab, k]) or `.safetensors`.
    num_experts: the model's E; every entry must be in [0, E).
    vocab_size: the model's vocabulary size (rows), if known.
    k: the model's experts per token (columns), if known.
    tensor: the safetensors tensor (default: the file's first hash layer, by its metadata's
      order, else the only tensor).
    kind: the HashTable kind to record (default: the safetensors metadata's, else
      "balanced_topk" for a bare array of unknown origin).

  Raises:
    ValueError: an unreadable file, a table of another vocabulary size, k or expert count, entries
      out of range, or a row that repeats an expert.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such table file")
  metadata: dict[str, str] = {}
  try:
    if path.suffix == ".safetensors":
      from safetensors import safe_open  # pylint: disable=g-import-not-at-top
      with safe_open(str(path), framework="numpy") as f:
        metadata = dict(f.metadata() or {})
        names = list(f.keys())
      order = [n for n in metadata.get("tensors", "").split(",") if n] or sorted(names)
      name = tensor if tensor is not None else order[0]
      if name not in names:
        raise ValueError(f"no tensor {name!r} (it holds {sorted(names)})")
      with safe_open(str(path), framework="numpy") as f:
        array = f.get_tensor(name)
      where = f"{path}[{name}]"
    else:
      array = np.load(path, allow_pickle=False)
      where = str(path)
  except ValueError as e:
    raise ValueError(f"{path}: not a readable table file: {e}") from e
  except Exception as e:  # safetensors' own SafetensorError, zip/pickle errors of a bad .npy.
    raise ValueError(f"{path}: not a readable table file ({type(e).__name__}: {e})") from e
  if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
    raise ValueError(f"{where}: expected a numeric [vocab_size, k] table, got "
                     f"{array.dtype}{list(array.shape)}")
  if np.issubdtype(array.dtype, np.floating):
    # MaxText keeps tid2eid as float32; an exact integer value is an expert id.
    if not np.array_equal(array, np.round(array)):
      raise ValueError(f"{where}: float table with non-integer entries")
  if vocab_size is not None and array.shape[0] != vocab_size:
    raise ValueError(f"{where}: the table covers {array.shape[0]} token ids, but the model's "
                     f"vocabulary has vocab_size={vocab_size}; build it for this vocabulary "
                     f"(--vocab_size={vocab_size})")
  if k is not None and array.shape[1] != k:
    raise ValueError(f"{where}: the table has k={array.shape[1]} experts per token, the model "
                     f"routes each token to k={k}")
  kind = kind or metadata.get("kind") or hashing.TOPK_KIND
  try:
    return hashing.HashTable(
        kind=kind, table=array.astype(np.int64), num_experts=num_experts,
        vocab_size=array.shape[0], seed=int(metadata.get("seed", 0)),
        vocab_fingerprint=metadata.get("vocab_fingerprint", ""))
  except ValueError as e:
    raise ValueError(f"{where}: not a valid top-k table for num_experts={num_experts}: {e}") from e


def load_report(table: hashing.HashTable, counts: np.ndarray,
                heldout_counts: Optional[np.ndarray] = None) -> dict[str, Any]:
  """The table's expert load on the counted text and on the held-out text.

  Each part: `max_over_mean` (busiest expert's share of the routed assignments over the mean
  share; 1 is perfect), `mean` (1/E), `max` (busiest expert's share), `cv` (population standard
  deviation of the shares over their mean), `tokens`; the held-out part is None when it is empty.
  """
  def part(c: Optional[np.ndarray]) -> Optional[dict[str, Any]]:
    if c is None or not np.asarray(c).any():
      return None
    stats = table.load_stats(c)
    load = stats["expert_load"]
    return {"tokens": int(np.asarray(c).sum()), "max_over_mean": stats["max_over_mean"],
            "max": float(load.max()), "mean": 1.0 / table.num_experts, "cv": stats["cv"],
            "normalized_entropy": stats["normalized_entropy"]}

  return {"counted": part(counts), "heldout": part(heldout_counts)}


@dataclasses.dataclass(frozen=True)
class ExportResult:
  table: hashing.HashTable
  paths: dict[str, str]
  report: dict[str, Any]


def build_from_text(*, kind: str, num_experts: int, k: int, texts: Sequence[PathLike],
                    output: PathLike, sentencepiece: Optional[PathLike] = None,
                    hf_tokenizer: Optional[PathLike] = None, vocab_size: Optional[int] = None,
                    num_layers: int = DEFAULT_HASH_LAYERS, first_layer: int = 0,
                    layouts: Sequence[str] = tuple(LAYOUTS), heldout_fraction: float = 0.05,
                    seed: int = 0, pattern: str = "*", errors: str = "strict",
                    block_lines: int = tokenizer_counts.DEFAULT_BLOCK_LINES,
                    progress: bool = True) -> ExportResult:
  """`hashmoe build-hash` with a tokenizer: count, build, write every file, report.

  Args:
    kind: "balanced", "roundrobin", "random", "zeros" (or their `hashing.TOPK_KINDS` names).
    num_experts, k: E and experts per token, 1 <= k <= E.
    texts: text files and folders to count.
    output: the `.npy` to write; the other files go beside it (`output_paths`).
    sentencepiece, hf_tokenizer: exactly one tokenizer file.
    vocab_size: the model's vocabulary size (default the tokenizer's).
    num_layers, first_layer: the hash layers' module indices, one tensor each.
    layouts: the safetensors layouts to write (keys of `LAYOUTS`).
    heldout_fraction: share of the text's blocks held out of the counts for the report.
    seed: seed of the random table (recorded by the others).
    pattern, errors, block_lines, progress: see `tokenizer_counts.count_tokens`.

  Returns:
    The table, {what: path} of the files written, and the report (also in the JSON file).
  """
  full_kind = hash_functions.TOPK_SHORT_NAMES.get(kind, kind)
  if full_kind not in hashing.TOPK_KINDS:
    raise ValueError(f"--kind must be one of {sorted(hash_functions.TOPK_SHORT_NAMES)} for a "
                     f"top-k table, got {kind!r}")
  if not 1 <= k <= num_experts:
    raise ValueError(f"k={k} experts per token with num_experts={num_experts}: a token's k experts "
                     f"must be distinct, so 1 <= k <= num_experts")
  paths = output_paths(output, layouts)
  if num_layers < 1 or first_layer < 0:
    raise ValueError(f"--layers={num_layers} hash layers from --first_layer={first_layer}: "
                     "expected at least one layer and a first index >= 0")
  tokenizer = tokenizer_counts.load_tokenizer(sentencepiece=sentencepiece,
                                              hf_tokenizer=hf_tokenizer)
  counted = tokenizer_counts.count_tokens(
      tokenizer, texts, vocab_size=vocab_size, heldout_fraction=heldout_fraction,
      block_lines=block_lines, pattern=pattern, errors=errors, progress=progress)
  vocab = int(counted.counts.shape[0])
  start = time.perf_counter()
  table = hash_functions.build_topk(full_kind, k, num_experts=num_experts, vocab_size=vocab,
                                    token_counts=counted.counts, seed=seed,
                                    vocab_fingerprint=tokenizer.fingerprint)
  build_seconds = time.perf_counter() - start
  for path in paths.values():
    path.parent.mkdir(parents=True, exist_ok=True)
  write_npy(table, paths["npy"])
  table.save(paths["npz"])
  written = {}
  for layout in layouts:
    written[layout] = write_safetensors(table, paths[layout], layout=layout,
                                        num_layers=num_layers, first_layer=first_layer)
  report = {
      "kind": table.kind, "num_experts": num_experts, "k": k, "vocab_size": vocab,
      "seed": seed, "vocab_fingerprint": tokenizer.fingerprint,
      "tokenizer": {"kind": tokenizer.kind, "path": tokenizer.path,
                    "vocab_size": tokenizer.vocab_size},
      "text": {"files": len(counted.files), "lines": counted.lines,
               "heldout_lines": counted.heldout_lines, "tokens": counted.tokens,
               "heldout_tokens": counted.heldout_tokens, "heldout_fraction": heldout_fraction,
               "count_seconds": round(counted.seconds, 3),
               "tokens_per_second": round((counted.tokens + counted.heldout_tokens)
                                          / max(counted.seconds, 1e-9), 1)},
      "build_seconds": round(build_seconds, 3),
      "load": load_report(table, counted.counts, counted.heldout_counts),
      "files": {name: str(p) for name, p in paths.items()},
      "tensors": written,
  }
  buffer = io.BytesIO(json.dumps(report, indent=2, sort_keys=True).encode() + b"\n")
  hashing._atomic_write(paths["report"], buffer.getvalue())  # pylint: disable=protected-access
  return ExportResult(table=table, paths={n: str(p) for n, p in paths.items()}, report=report)
