"""Metrics of a run: one JSON object per logged step (`metrics.jsonl`) and per evaluation
(`eval.jsonl`), TensorBoard summaries, and the rules that keep every value writable.

The writers never fail on a huge or non-finite value: JSONL writes "nan"/"inf" (strict JSON), and
TensorBoard leaves out what float32 cannot hold. On restart the tail of a log past the restored step
is dropped (`truncate_jsonl`), so that the file always reads as one run.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from hashmoe.training.run_dir import EVAL_FILE, METRICS_FILE, TENSORBOARD_SUBDIR, is_remote

logger = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
  value = np.asarray(value)
  if value.ndim == 0:
    v = value.item()
    if isinstance(v, float) and not math.isfinite(v):
      return str(v)  # JSON has no NaN/inf; keep the fact readable.
    return v
  return [_jsonable(v) for v in value]


def _json_safe(value: Any) -> Any:
  """`value` with every non-finite float as the string "nan", "inf" or "-inf": JSON has no such
  numbers (json.dumps would write NaN/Infinity, which strict readers reject)."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, Mapping):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def perplexity(mean_nll: float) -> float:
  """exp(mean_nll), inf where it overflows (a perplexity is never clamped to a made-up finite
  number)."""
  try:
    return math.exp(mean_nll)
  except OverflowError:
    return math.inf


# TensorBoard stores float32: a value beyond its range (a diverged run's perplexity) cannot be
# written, and TensorFlow raises instead of writing inf.
_TENSORBOARD_MAX = float(np.finfo(np.float32).max)


def truncate_jsonl(path: epath.Path, last_step: int) -> None:
  """Drops the lines of a JSONL log whose "step" is past `last_step` (and a torn last line), so
  that a resumed run's log reads as one run."""
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # A line torn by a kill mid-write.
    if isinstance(record, dict) and record.get("step", 0) <= last_step:
      kept.append(line)
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text("".join(line + "\n" for line in kept))
  tmp.replace(path)


def all_finite(x: Any) -> bool:
  """Whether every element of `x` (a scalar or an array, on the host) is finite."""
  return bool(np.all(np.isfinite(np.asarray(x))))


class MetricsLogger:
  """Writes train and eval metrics to JSONL and TensorBoard on process 0.

  No value makes it fail: a non-finite float is written to the JSONL as the string "nan", "inf" or
  "-inf" (strict JSON), and left out of TensorBoard, as is one beyond float32's range."""

  def __init__(self, model_dir: epath.Path, *, tensorboard: bool = True):
    self._primary = jax.process_index() == 0
    self._metrics_path = model_dir / METRICS_FILE
    self._eval_path = model_dir / EVAL_FILE
    self._remote_lines: dict[epath.Path, str] = {}
    self._writer = None
    if tensorboard and self._primary:
      try:
        # clu pulls in TensorFlow's summary writers; optional (TensorBoard needs it installed).
        from clu import metric_writers  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        logger.warning("TensorBoard summaries are off: clu.metric_writers could not be imported "
                       "(%s); install tensorboard", e)
      else:
        self._writer = metric_writers.create_default_writer(
            os.fspath(model_dir / TENSORBOARD_SUBDIR), asynchronous=False)

  def resume(self, step: int) -> None:
    if self._primary:
      truncate_jsonl(self._metrics_path, step)
      truncate_jsonl(self._eval_path, step)
      self._remote_lines.clear()  # Re-read after truncation.

  def _append(self, path: epath.Path, record: Mapping[str, Any]) -> None:
    line = json.dumps(_json_safe(record), allow_nan=False) + "\n"
    if not is_remote(path):
      with open(path, "a") as f:
        f.write(line)
        f.flush()
      return
    # Object stores (gs://, s3://) cannot append: keep the log's lines and rewrite it whole. A log
    # holds one line per LOG_PERIOD steps, so this stays small next to a checkpoint.
    if path not in self._remote_lines:
      self._remote_lines[path] = path.read_text() if path.exists() else ""
    self._remote_lines[path] += line
    path.write_text(self._remote_lines[path])

  def _tensorboard(self, step: int, prefix: str, record: Mapping[str, Any]) -> None:
    if self._writer is None:
      return
    scalars, histograms = {}, {}
    for key, value in record.items():
      if key == "step":
        continue
      if key == "moe":
        for layer, metrics in value.items():
          for name, v in metrics.items():
            try:
              arr = np.asarray(v, np.float64)
            except (TypeError, ValueError):
              continue  # "nan"/"inf" strings of a non-finite metric (_jsonable).
            tag = f"{prefix}/moe/{layer}/{name}"
            if not np.all(np.abs(arr) <= _TENSORBOARD_MAX):  # NaN fails the test too.
              continue
            if arr.ndim == 0:
              scalars[tag] = float(arr)
            else:
              histograms[tag] = arr
        continue
      if isinstance(value, (int, float)) and abs(value) <= _TENSORBOARD_MAX:
        # NaN, inf and what float32 cannot hold are left out (the JSONL keeps them).
        scalars[f"{prefix}/{key}"] = float(value)
    self._writer.write_scalars(step, scalars)
    if histograms:
      self._writer.write_histograms(step, histograms)

  def write_train(self, record: Mapping[str, Any]) -> None:
    if self._primary:
      self._append(self._metrics_path, record)
      self._tensorboard(record["step"], "train", record)

  def write_eval(self, record: Mapping[str, Any]) -> None:
    if self._primary:
      self._append(self._eval_path, record)
      self._tensorboard(record["step"], "eval", record)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()


def moe_record(moe: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per sparse layer: the per-expert load fraction, the dropped-token fraction and the rest of the
  router's scalars, as plain JSON values."""
  out = {}
  for layer, metrics in moe.items():
    out[layer] = {name: _jsonable(value) for name, value in sorted(metrics.items())}
  return out
