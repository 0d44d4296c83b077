"""benchmarks/data.py at tiny settings: the JSON it promises (schema, and counts checked against
the settings and the prepared folder's own manifest), its figure, its clock against the parent's,
and its line fit against a closed form.

One run of the benchmark serves every test (module fixture): a generated text folder, a 320-piece
vocabulary, rows of 32 tokens, batches of 8, the training split in one prepared shard, one restart
per loader (each restart is a fresh Python process importing hashmoe, TensorFlow and jax: the
measurement itself, and most of this file's time).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from textdata import write_text_folder

ROOT = Path(__file__).resolve().parents[1]
BATCH, LENGTH, BATCHES, STREAMING_BATCHES = 8, 32, 4, 2
PREPARED_STEP, STREAMING_STEP = 5, 1


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("benchmark_data", ROOT / "benchmarks" / "data.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
  base = tmp_path_factory.mktemp("bench_data")
  texts = write_text_folder(base / "texts", files=6, paragraphs=30)
  out = base / "out" / "data.json"
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("HASHMOE_CACHE", str(base / "cache"))  # the restart children inherit it
    result = bench.main([
        "--text-dir", str(texts), "--vocab-size", "320", "--name-prefix", "benchdata",
        "--batch", str(BATCH), "--length", str(LENGTH), "--batches", str(BATCHES),
        "--streaming-batches", str(STREAMING_BATCHES), "--warmup", "2",
        "--prepared-variants", "2:0,0:0", "--num-shards", "1", "--prepare-splits", "train",
        "--prepared-steps", str(PREPARED_STEP), "--streaming-steps", str(STREAMING_STEP),
        "--work-dir", str(base / "work"), "--json", str(out)])
  return {"result": result, "out": out, "base": base}


def test_the_json_holds_the_promised_schema_with_counts_that_match_the_settings(run):
  result = run["result"]
  assert json.loads(run["out"].read_text()) == result
  throughput = result["throughput"]
  assert [(r["loader"], r.get("read_threads"), r.get("worker_count")) for r in throughput] == [
      ("prepared", 2, 0), ("prepared", 0, 0), ("streaming", None, None)]
  for r in throughput:
    batches = BATCHES if r["loader"] == "prepared" else STREAMING_BATCHES
    assert r["row_tokens"] == batches * BATCH * LENGTH  # every position of the timed rows
    assert 0 < r["tokens"] <= r["row_tokens"]
    assert isinstance(r["tokens_per_s"], float) and r["tokens_per_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"], rel=0.02)
    assert r["row_tokens_per_s"] >= r["tokens_per_s"]
    assert {"load_before", "load_after", "cpu_seconds"} <= set(r)
  assert [r["default"] for r in throughput[:2]] == [True, False]  # loader.DEFAULT_READ_THREADS
  best = max(throughput[:2], key=lambda r: r["tokens_per_s"])
  assert result["summary"]["prepared_best"]["tokens_per_s"] == best["tokens_per_s"]
  assert result["summary"]["streaming_tokens_per_s"] == throughput[2]["tokens_per_s"]

  manifest = json.loads((run["base"] / "work" / "prepared" / "benchdata_text_lm" /
                         f"len{LENGTH}" / "manifest.json").read_text())
  prepare = result["prepare"]
  info = manifest["split_info"]
  assert prepare["rows"] == sum(s["rows"] for s in info.values())
  assert prepare["tokens"] == sum(s["tokens"] for s in info.values())
  assert prepare["workers"] == 1 and prepare["splits"] == ["train"] == list(info)
  assert prepare["tokens_per_s"] == pytest.approx(prepare["tokens"] / prepare["seconds"],
                                                  rel=0.01)
  assert result["settings"]["train_rows"] == info["train"]["rows"]


def test_each_restart_is_timed_from_its_process_start_and_resumes_at_its_step(run):
  result = run["result"]
  resume = {(r["loader"], r["step"]): r for r in result["resume"]}
  assert set(resume) == {("prepared", PREPARED_STEP), ("streaming", STREAMING_STEP)}
  for (loader, step), r in resume.items():
    assert r["next_batch"] == step + 1
    assert r["checked"]  # its first batch is the uninterrupted pipeline's batch `step`
    assert r["clock"] == "process start"
    # The process starts after the parent's clock is read; the kernel counts 10 ms ticks.
    assert 0 < r["seconds_to_first_batch"] <= r["seconds_since_spawn"] + 0.05
    assert 0 < r["imports_done_s"] < r["seconds_to_first_batch"]
    assert list(r["import_seconds"]) == ["interpreter_and_script", "tensorflow_seqio",
                                         "jax_flax_optax_orbax", "hashmoe"]
    assert sum(r["import_seconds"].values()) == pytest.approx(r["imports_done_s"])
    assert r["data_seconds"] == pytest.approx(r["seconds_to_first_batch"] - r["imports_done_s"])
    assert r["pipeline"] == {"prepared": "PreparedPipeline", "streaming": "TaskPipeline"}[loader]
  assert resume["prepared", PREPARED_STEP]["epoch"] == pytest.approx(
      PREPARED_STEP * BATCH / result["settings"]["train_rows"], abs=1e-3)
  # One measured step per loader: no line, so nothing extrapolated (never mixed in "resume").
  assert result["resume_extrapolated"] == [] and result["resume_fit"] == {}
  assert not any("extrapolated" in r for r in result["resume"])


def test_the_figure_is_written_beside_the_json(run):
  png = run["out"].with_suffix(".png")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_process_start_age_agrees_with_the_parents_clock(bench):
  code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import data; time.sleep(0.5); "
          "print(data.process_start_age())")
  start = time.time()
  done = subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks")],
                        capture_output=True, text=True, check=True, timeout=60)
  elapsed = time.time() - start
  age = float(done.stdout.strip())
  assert 0.5 <= age <= elapsed + 0.02  # 10 ms ticks


def test_extrapolate_is_the_least_squares_line(bench):
  fit, values = bench.extrapolate([(0, 2.0), (500, 7.0), (1000, 12.0)], [10**5, 10**6])
  assert fit == pytest.approx({"intercept_s": 2.0, "seconds_per_step": 0.01})
  assert values == [(10**5, pytest.approx(1002.0)), (10**6, pytest.approx(10002.0))]
  # Off the line: (0, 1), (1, 3), (2, 2) give slope 1/2 and intercept 3/2 by the normal equations.
  fit, values = bench.extrapolate([(0, 1.0), (1, 3.0), (2, 2.0)], [4])
  assert fit == pytest.approx({"intercept_s": 1.5, "seconds_per_step": 0.5})
  assert values == [(4, pytest.approx(3.5))]
  with pytest.raises(ValueError, match="two distinct steps"):
    bench.extrapolate([(5, 1.0), (5, 2.0)], [10])
