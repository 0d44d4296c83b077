"""`hashmoe compare --jobs`: which runs wait for which, and which run a free worker takes.

That parallel runs give the sequential runs' numbers bit for bit is checked end to end in
tests/test_compare.py (`test_runs_in_worker_processes_equal_runs_in_this_process`).
"""
from __future__ import annotations

from hashmoe import compare, routers
from hashmoe.compare import parallel
from test_compare import fake_settings


def settings(**changes):
  return fake_settings(**{"seeds": 2, **changes})


def test_the_default_comparison_plans_the_sequential_runs_with_switch_waiting_for_its_tuning():
  runs = parallel.plan(compare.default_experiment(), settings())
  # The sequential path's order and numbering (Comparison.run).
  assert [(r.spec.name, r.seed, r.coef) for r in runs] == [
      ("dense", 0, None), ("dense", 1, None), ("switch", 0, 0.001), ("switch", 0, 0.01),
      ("switch", 0, 0.1), ("switch", 1, None), ("hash", 0, None), ("hash", 1, None)]
  assert [r.index for r in runs] == list(range(1, 9))
  later = runs[5]
  assert later.tuned_later and set(later.needs) == {r.key for r in runs[2:5]}
  assert [r.gates for r in runs] == [False, False, True, True, True, False, False, False]
  assert all(not r.needs for r in runs if r is not later)


def test_models_of_the_baseline_wait_for_its_run_of_their_seed():
  experiment = compare.Experiment(baseline="dense", models=(
      compare.ModelSpec("dense"),
      compare.ModelSpec("predicted", router=routers.Hash(key="predicted_future")),
      compare.ModelSpec("hash", router=routers.Hash())))
  runs = parallel.plan(experiment, settings(seeds=3))
  by_key = {(r.spec.name, r.seed): r for r in runs}
  for seed in range(3):
    assert by_key["predicted", seed].needs == (by_key["dense", seed].key,)
    assert by_key["dense", seed].gates and not by_key["hash", seed].gates
    assert by_key["hash", seed].needs == ()


def test_one_seed_or_one_coefficient_has_nothing_waiting():
  runs = parallel.plan(compare.default_experiment(), settings(seeds=1))
  assert len(runs) == 5 and not any(r.needs or r.gates for r in runs)
  runs = parallel.plan(compare.default_experiment(), settings(balance_coefs=(0.01,)))
  assert [(r.spec.name, r.seed, r.coef) for r in runs][2:4] == [("switch", 0, 0.01),
                                                                ("switch", 1, None)]


def test_a_free_worker_takes_gating_runs_first_then_what_it_has_compiled_then_its_seeds():
  runs = parallel.plan(compare.default_experiment(), settings())
  dense0, dense1, tune1, tune2, _, _, hash0, hash1 = runs
  worker = parallel._Worker(process=None, conn=None, name="w")
  assert parallel._choose(worker, [dense0, hash0, tune2]) is tune2
  assert parallel._choose(worker, [dense0, dense1, hash0]) is dense0  # The sequential order.
  worker.compiled.add(("hash", None))
  assert parallel._choose(worker, [dense0, dense1, hash1]) is hash1
  worker.compiled.clear()
  worker.seeds.add(1)
  assert parallel._choose(worker, [dense0, hash0, dense1]) is dense1
  assert parallel._choose(worker, [tune1, tune2]) is tune1


def test_default_jobs_is_one_per_core_at_most_four_and_at_most_one_per_run(monkeypatch):
  monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
  assert parallel.default_jobs(8) == 4 and parallel.default_jobs(3) == 3
  monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
  assert parallel.default_jobs(8) == 2 and parallel.default_jobs(1) == 1


def test_a_worker_does_not_compile_what_another_is_compiling_right_now():
  runs = parallel.plan(compare.default_experiment(), settings())
  dense0, _, tune1, tune2, tune3, _, hash0, _ = runs
  # Switch takes its coefficient at run time: its tuning runs are one program.
  assert parallel._program(tune1) == parallel._program(tune3) == ("switch", None)
  assert parallel._program(hash0) == ("hash", None)
  first = parallel._Worker(process=None, conn=None, name="w0")
  second = parallel._Worker(process=None, conn=None, name="w1")
  assert parallel._choose(first, [dense0, tune1, tune2, hash0], [first, second]) is tune1
  first.compiling = ("switch", None)  # Its first Switch run is compiling.
  # The other worker trains another model meanwhile rather than compiling Switch a second time...
  assert parallel._choose(second, [dense0, tune2, tune3, hash0], [first, second]) is dense0
  # ... but takes the gating run once the programs are in the compilation cache,
  first.compiling = None
  assert parallel._choose(second, [dense0, tune2, hash0], [first, second]) is tune2
  # or when it has compiled them itself.
  first.compiling = ("switch", None)
  second.compiled.add(("switch", None))
  assert parallel._choose(second, [dense0, tune2, hash0], [first, second]) is tune2



def test_prestarted_workers_import_first_take_their_setup_later_and_the_rest_are_ended(
    monkeypatch):
  assert parallel.prestart(1) == 0 and not parallel._PRESTARTED  # One job: no workers at all.
  # No more than one per usable core (at most 4), whatever --jobs says: the rest start when the
  # runs are known.
  monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
  assert parallel.prestart(16) == 2
  first, second = [process for process, _ in parallel._PRESTARTED]
  try:
    # A setup without the compilation cache's entry: the worker can only fail on it after it
    # imported everything and read it from the pipe, and says so.
    process, conn = parallel._start_worker(0, {"args": None})
    assert process is first
    assert conn.poll(300), "the prestarted worker never answered its setup"
    kind, message, _ = conn.recv()
    assert (kind, message) == ("error", "KeyError: 'compilation_cache_dir'")
  finally:
    parallel.release_prestarted()
  assert not parallel._PRESTARTED and second.exitcode is not None
  first.join(60)
  assert first.exitcode == 0


def test_a_compare_command_that_fails_leaves_no_prestarted_worker(tmp_path, monkeypatch):
  from hashmoe import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
  started = []
  prestart = parallel.prestart
  monkeypatch.setattr(parallel, "prestart", lambda jobs: started.append(prestart(jobs)))
  code = cli.main(["compare", "--text-dir", str(tmp_path / "missing"), "--jobs", "2",
                   "--no-progress"])
  assert code == 2 and started == [2]
  assert not parallel._PRESTARTED
  assert not [p for p in parallel.multiprocessing.active_children()
              if p.name.startswith("hashmoe-compare-worker")]
