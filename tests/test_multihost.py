"""Multi-host training and mesh-portable checkpoints, with real `hashmoe` processes on CPU.

1. Multi-host (the GPU-cluster layout, emulated): two `hashmoe train` processes on this machine,
   joined by `jax.distributed` through a coordinator on 127.0.0.1 (CPU collectives over gloo),
   each with 4 emulated devices and reading its own shard of a text folder, train the tiny hash
   model on one data 2 x expert 4 mesh (experts sharded over each host's devices, as
   configs/runs/gpu_multihost.gin lays them out). Reference: one process with 8 devices and the
   same mesh, fed the same global batches, i.e. each host's shard batch stacked in process order
   (`reference_main`, which reads the shards itself with `hashmoe.data.tasks.get_batches`). The
   two processes must report the same losses as each other, and as the reference; the checkpoint
   they write together must hold the reference's parameters and one data position per host.
2. Checkpoints move between mesh shapes: that checkpoint of 8 devices (data 2 x expert 4, experts
   sharded over "expert", written by two processes) is restored by `hashmoe eval` in one process
   on 8 devices (the same mesh), on 1, and on 4 (data 2 x expert 2); all three must report the
   same evaluation loss.

Each scenario's processes run side by side; every process has a timeout and all of a scenario's
processes are killed if one fails, so a hung collective cannot hang the suite. Device counts are
fixed when jax is imported, hence one process per device count.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
HOSTS = 2
DEVICES = 8  # of the checkpoint-writing runs; the multi-host one: HOSTS processes x 4 devices
STEPS = 6
BATCH_SIZE, SEQ_LEN, EVAL_BATCHES = 8, 32, 2
PROCESS_TIMEOUT_S = 300

# The tiny 16-expert balanced-hash model on a text folder, expert-parallel dispatch (tokens reach
# the experts by all-to-all over "expert", as in the TPU and GPU run configs) on a data 2 x
# expert 4 mesh; float32 (the tiny model's dtype), no progress bar or TensorBoard.
RUN_FLAGS = ("--gin_file=configs/runs/cpu_tiny.gin", "--gin_file=configs/tasks/text_dir.gin",
             "--gin.VOCAB_SIZE=320", f"--gin.SEQ_LEN={SEQ_LEN}",
             "--gin.SparseConfig.dispatch='expert_parallel'")
MESH_2x4 = ("--gin.DATA_PARALLEL=2", "--gin.EXPERT_PARALLEL=4")
TRAIN_FLAGS = RUN_FLAGS + MESH_2x4 + (
    f"--gin.TRAIN_STEPS={STEPS}", f"--gin.BATCH_SIZE={BATCH_SIZE}",
    f"--gin.EVAL_BATCHES={EVAL_BATCHES}", f"--gin.EVAL_PERIOD={STEPS}",
    "--gin.CHECKPOINT_PERIOD=1000", "--gin.train.progress_bar=False",
    "--gin.train.tensorboard=False")


# --------------------------------------------------------------------------------------------------
# The single-process reference of scenario 1. It runs in its own process (`python -c`, importing
# this module), so this module imports nothing heavy at its top: jax must not start before the
# process's XLA_FLAGS are read, and the trainer must not be imported before the CLI sets up logging.


class _StackedRows:
  """Every host's training batch stacked in process order: the global batch of a multi-host run."""

  def __init__(self, iterators):
    self._iterators = iterators

  def __iter__(self):
    return self

  def __next__(self):
    return _stack([next(it) for it in self._iterators])

  def position(self):
    return {"hosts": [it.state() for it in self._iterators]}

  def close(self):
    for it in self._iterators:
      it.close()


def _stack(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def reference_main(argv: Sequence[str]) -> int:
  """`hashmoe.cli.main(argv)` in one process, with the data read as HOSTS hosts read it.

  `hashmoe.data.pipeline.TaskPipeline` is replaced by a pipeline that opens every host's shard
  (`get_batches(..., shard_index=h, num_shards=HOSTS)`, batch_size / HOSTS rows each, the
  arguments `TaskPipeline` gives on host h) and stacks their batches row-wise in process order;
  evaluation keeps the number of batches the shortest shard has, as a multi-host evaluation does.
  Everything else (model, mesh, optimizer, steps, checkpoint) is the ordinary `hashmoe train`.
  """
  import itertools  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  # What `cli.main` does first; importing the trainer (below) would otherwise install a root
  # handler and leave INFO lines (the mesh, the steps) out of the reference's log.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  from hashmoe import cli  # pylint: disable=g-import-not-at-top
  from hashmoe.data import pipeline  # pylint: disable=g-import-not-at-top
  from hashmoe.data import tasks  # pylint: disable=g-import-not-at-top

  class HostShards(pipeline.TaskPipeline):

    def __init__(self, task, *, batch_size, seq_len, seed=0):
      super().__init__(task, batch_size=batch_size, seq_len=seq_len, seed=seed)
      if batch_size % HOSTS:
        raise ValueError(f"batch_size={batch_size} does not split over {HOSTS} hosts")
      self.local_batch_size = batch_size // HOSTS

    def _host_iterators(self, split, **kwargs):
      return [tasks.get_batches(self.task, split, batch_size=self.local_batch_size,
                                seq_len=self.seq_len, seed=self.seed, shard_index=h,
                                num_shards=HOSTS, **kwargs) for h in range(HOSTS)]

    def train_batches(self, position):
      if position is not None:
        raise ValueError("the reference run starts from scratch")
      return _StackedRows(self._host_iterators("train"))

    def eval_batches(self, split, num_batches):
      per_host = []
      for it in self._host_iterators(split, shuffle=False, repeat=False, drop_remainder=False):
        with it:
          per_host.append(list(itertools.islice(it, num_batches)))
      count = min(len(batches) for batches in per_host)
      return [_stack([batches[i] for batches in per_host]) for i in range(count)]

  pipeline.TaskPipeline = HostShards
  return cli.main(list(argv))


# --------------------------------------------------------------------------------------------------
# Processes.


def free_port() -> int:
  """A TCP port nobody listens on now (the OS picks it for a socket bound to port 0)."""
  with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def hashmoe(*args: str) -> list[str]:
  """The `hashmoe` command (as a module: works without the console script on PATH)."""
  return [sys.executable, "-m", "hashmoe.cli", *args]


def reference(*args: str) -> list[str]:
  """The command of the single-process reference run (`reference_main`)."""
  code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_multihost; "
          "sys.exit(test_multihost.reference_main(sys.argv[1:]))")
  return [sys.executable, "-c", code, *args]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """A text folder, and the caches every process of this module shares: the vocabulary and token
  counts (HASHMOE_CACHE), and compiled programs."""
  from textdata import write_text_folder  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp("multihost")
  texts = write_text_folder(base / "texts")
  return {"texts": texts, "cache": base / "cache", "jax_cache": base / "jax_cache"}


def env_for(workspace, devices: int) -> dict[str, str]:
  """The environment of a `hashmoe` process with `devices` emulated CPU devices."""
  xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  xla_flags.append(f"--xla_force_host_platform_device_count={devices}")
  python_path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  return dict(os.environ, XLA_FLAGS=" ".join(xla_flags), JAX_PLATFORMS="cpu",
              HASHMOE_CACHE=str(workspace["cache"]), TF_CPP_MIN_LOG_LEVEL="2",
              PYTHONPATH=os.pathsep.join(python_path))


def run_together(jobs: Sequence[tuple[str, list[str], dict[str, str]]], logs: Path,
                 timeout: float = PROCESS_TIMEOUT_S) -> dict[str, dict]:
  """Starts every (name, command, env) at once and waits for all of them.

  Output goes to files (a full pipe would stall a process). If any process fails or the deadline
  passes, every process still running is killed (a peer of a dead process would otherwise wait in
  a collective forever) and the test fails with each process's stderr tail.

  Returns:
    {name: {"returncode", "stdout", "stderr", "summary" (the JSON last line of stdout)}}.
  """
  logs.mkdir(parents=True, exist_ok=True)
  procs = {}
  try:
    for name, command, env in jobs:
      out, err = open(logs / f"{name}.out", "w"), open(logs / f"{name}.err", "w")
      procs[name] = (subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err), out,
                     err)
    deadline = time.monotonic() + timeout
    failed: Optional[str] = None
    while failed is None and any(p.poll() is None for p, _, _ in procs.values()):
      if time.monotonic() > deadline:
        failed = f"timed out after {timeout:.0f}s"
      for name, (p, _, _) in procs.items():
        if p.poll() not in (None, 0):
          failed = f"{name} exited with {p.returncode}"
      time.sleep(0.2)
    if failed is None:
      failed = next((f"{name} exited with {p.returncode}" for name, (p, _, _) in procs.items()
                     if p.returncode != 0), None)
  finally:
    for p, out, err in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
      out.close()
      err.close()
  results = {}
  for name in procs:
    stdout, stderr = (logs / f"{name}.out").read_text(), (logs / f"{name}.err").read_text()
    json_lines = [line for line in stdout.splitlines() if line.startswith("{")]
    results[name] = {"returncode": procs[name][0].returncode, "stdout": stdout, "stderr": stderr,
                     "summary": json.loads(json_lines[-1]) if json_lines else None}
  if failed is not None:
    tails = "\n".join(f"--- {name} (exit {r['returncode']}):\n{r['stderr'][-2500:]}"
                      for name, r in results.items())
    pytest.fail(f"{failed}\n{tails}")
  return results


def records(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def read_state(model_dir: Path, step: int) -> dict:
  """The saved TrainState of one step as numpy arrays, read with orbax alone."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = model_dir / "checkpoints" / str(step) / "state"
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def leaves(tree) -> dict[str, np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  return {jax.tree_util.keystr(path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --------------------------------------------------------------------------------------------------
# 1. Two processes over gloo reproduce one process.


@pytest.fixture(scope="module")
def multihost_run(workspace, tmp_path_factory):
  """Two `hashmoe train` processes (4 devices each, one data 2 x expert 4 mesh over both) and the
  single-process reference (8 devices, the same mesh and global batches), run side by side."""
  base = tmp_path_factory.mktemp("runs")
  multi_dir, single_dir = base / "two_processes", base / "one_process"
  flags = (*TRAIN_FLAGS, f"--gin.TEXT_DIR='{workspace['texts']}'",
           f"--compilation_cache_dir={workspace['jax_cache']}")
  coordinator = f"127.0.0.1:{free_port()}"
  jobs = [(f"process{i}", hashmoe("train", *flags, f"--gin.MODEL_DIR='{multi_dir}'",
                                  f"--coordinator_address={coordinator}",
                                  f"--num_processes={HOSTS}", f"--process_id={i}"),
           env_for(workspace, DEVICES // HOSTS)) for i in range(HOSTS)]
  jobs.append(("reference", reference("train", *flags, f"--gin.MODEL_DIR='{single_dir}'"),
               env_for(workspace, DEVICES)))
  return {"multi_dir": multi_dir, "single_dir": single_dir,
          "done": run_together(jobs, base / "logs")}


def test_two_processes_over_gloo_reproduce_a_single_process_run(multihost_run):
  """Both processes report the same losses, which are the single-process run's."""
  multi_dir, single_dir, done = (multihost_run[k] for k in ("multi_dir", "single_dir", "done"))
  # jax.distributed really joined the two (each process saw 2 processes) over gloo.
  for i in range(HOSTS):
    assert f"jax.distributed: process {i} of {HOSTS}" in done[f"process{i}"]["stderr"]
    assert "[Gloo]" in done[f"process{i}"]["stdout"]
  for name in done:
    assert "mesh {'data': 2, 'expert': 4, 'model': 1}" in done[name]["stderr"], name
  # Both processes hold the same replicated losses and evaluation: one SPMD program.
  summaries = [done[f"process{i}"]["summary"] for i in range(HOSTS)]
  drop = ("time", "tokens_per_s")  # wall-clock readings, each process its own
  for s in summaries[1:]:
    assert {k: v for k, v in s["train"].items() if k not in drop} == {
        k: v for k, v in summaries[0]["train"].items() if k not in drop}
    assert s["eval"] == summaries[0]["eval"]
    assert s["step"] == STEPS

  # Against one process on the same global batches and the same mesh: the same SPMD program over
  # the same 8 shards, but the collectives travel otherwise (gloo between processes, XLA's
  # in-process all-reduce within one), so partial sums may be added in another order. float32
  # reassociation moves a loss by an ulp or two (measured: 1 ulp, 7e-8 relative, at every step);
  # 1e-6 relative allows ~15 ulps, far below what another global batch gives (the losses of
  # successive batches here differ by ~1e-2 relative).
  multi, single = records(multi_dir / "metrics.jsonl"), records(single_dir / "metrics.jsonl")
  assert [r["step"] for r in multi] == [r["step"] for r in single] == list(range(1, STEPS + 1))
  for m, s in zip(multi, single):
    assert m["tokens"] == s["tokens"]  # the same rows, padding included
    for key in ("loss", "grad_norm", "update_norm"):
      assert m[key] == pytest.approx(s[key], rel=1e-6), (m["step"], key)
  assert multi[-1]["loss"] == summaries[0]["train"]["loss"]
  (multi_eval,), (single_eval,) = records(multi_dir / "eval.jsonl"), records(
      single_dir / "eval.jsonl")
  assert (multi_eval["batches"], multi_eval["tokens"], multi_eval["words"]) == (
      single_eval["batches"], single_eval["tokens"], single_eval["words"])
  assert multi_eval["loss"] == pytest.approx(single_eval["loss"], rel=1e-6)

  # The checkpoint the two processes wrote together: one data position per host (its own shard),
  # the reference's hash tables, and its parameters to within a few float32 ulps of each array's
  # largest entry (measured: 1 ulp; allowed: 1e-5 of the largest entry, ~100 ulps).
  meta = json.loads((multi_dir / "checkpoints" / str(STEPS) / "data" / "metadata").read_text())
  assert [p["arguments"]["shard_index"] for p in meta["positions"]] == list(range(HOSTS))
  assert {p["arguments"]["num_shards"] for p in meta["positions"]} == {HOSTS}
  assert {p["next_batch"] for p in meta["positions"]} == {STEPS}
  multi_state, single_state = read_state(multi_dir, STEPS), read_state(single_dir, STEPS)
  multi_params, single_params = leaves(multi_state["params"]), leaves(single_state["params"])
  assert list(multi_params) == list(single_params)
  for key, value in multi_params.items():
    scale = float(np.max(np.abs(single_params[key])))
    np.testing.assert_allclose(value, single_params[key], rtol=0, atol=1e-5 * scale, err_msg=key)
  multi_tables, single_tables = leaves(multi_state["constants"]), leaves(single_state["constants"])
  assert multi_tables and list(multi_tables) == list(single_tables)
  for key, value in multi_tables.items():
    np.testing.assert_array_equal(value, single_tables[key], err_msg=key)


# --------------------------------------------------------------------------------------------------
# 2. A checkpoint of 8 devices restores on 1 and on 4.


def test_a_checkpoint_of_8_devices_restores_on_1_and_4_with_the_same_evaluation(workspace,
                                                                                 multihost_run):
  """The two-process run's checkpoint (8 devices, data 2 x expert 4: each device holds 4 of the 16
  experts) is evaluated by `hashmoe eval` in one process, side by side, on 8 devices (the mesh it
  was written on), on 1 (the default mesh) and on 4 (data 2 x expert 2: 8 experts per device)."""
  model_dir = multihost_run["multi_dir"]
  # The user's command: the run's gin files, then eval.gin, then the run's batch settings again.
  flags = (*RUN_FLAGS, "--gin_file=configs/runs/eval.gin", f"--gin.TEXT_DIR='{workspace['texts']}'",
           f"--gin.MODEL_DIR='{model_dir}'", f"--gin.BATCH_SIZE={BATCH_SIZE}",
           f"--gin.EVAL_BATCHES={EVAL_BATCHES}",
           f"--compilation_cache_dir={workspace['jax_cache']}")
  on_mesh = ("--gin.evaluate.mesh=@hashmoe.sharding.make_mesh()",)
  done = run_together([
      ("eval8", hashmoe("eval", *flags, *on_mesh, *MESH_2x4), env_for(workspace, DEVICES)),
      ("eval1", hashmoe("eval", *flags), env_for(workspace, 1)),
      ("eval4", hashmoe("eval", *flags, *on_mesh, "--gin.DATA_PARALLEL=2",
                        "--gin.EXPERT_PARALLEL=2"), env_for(workspace, 4)),
  ], model_dir.parent / "eval_logs")
  results = {name: r["summary"] for name, r in done.items()}
  assert results["eval8"]["mesh"] == {"data": 2, "expert": 4, "model": 1}
  assert results["eval1"]["mesh"] == {"data": 1, "expert": 1, "model": 1}
  assert results["eval4"]["mesh"] == {"data": 2, "expert": 2, "model": 1}
  written = results["eval8"]
  assert written["step"] == STEPS and written["checkpoint"] == str(model_dir)
  assert written["batches"] == EVAL_BATCHES and written["tokens"] > 0

  # Every restored array is bit-equal to the saved one (`restore_params` checks each array's
  # checksum, and fails the command otherwise), so only the arithmetic differs: each device holds
  # other slices of the batch and of the experts, so matmuls are blocked, and the token losses
  # summed, in another order. The loss is a float32 sum over the target tokens (~440) divided by
  # their number; reassociating the sum moves it by a few ulps (measured: at most one, 5e-8
  # relative); 1e-6 relative allows ~15.
  for name in ("eval1", "eval4"):
    result = results[name]
    assert (result["step"], result["checkpoint"]) == (STEPS, str(model_dir)), name
    assert (result["batches"], result["tokens"], result["words"]) == (
        written["batches"], written["tokens"], written["words"]), name
    assert result["loss"] == pytest.approx(written["loss"], rel=1e-6), name
