"""Prepared data over several processes, with real `hashmoe` processes on CPU (as
tests/test_multihost.py runs them: jax.distributed through a coordinator on 127.0.0.1, CPU
collectives over gloo, 4 emulated devices per process).

1. Two `hashmoe train` processes on prepared data each read only their slice of every global batch
   (`hashmoe.data.loader`: rows [b*B + p*B/2, b*B + (p+1)*B/2) of the shuffled stream); one process
   with 8 devices and the same mesh reads whole global batches. Both must report the same losses:
   the slices assemble into the global batches the single process reads. The two processes route
   their hash layer on the host (`hashmoe.host_routing`, the default: each groups its own rows in
   the loader's read threads, and the device assembles the global permutation from both hosts'
   rows without a sort); the single process sorts on device (`train.precompute_routing=False`).
   The same losses, the experts' report that they used the assembled permutation, and the loads
   the hosts logged before each step (summed over both) equal to the single process's on-device
   group sizes show that the pieces of the two hosts make the global batch's routing. Both use the
   `sorted` dispatch (expert_parallel takes no precomputed sort; test_multihost.py covers it).
2. A change of host count between stop and restart keeps the global batch order: the two-process
   run stops at step 3 (its checkpoint holds one loader position per process, all equal), a
   single process resumes it to step 6, and steps 4-6 reproduce the uninterrupted single-process
   run's losses.

The data are prepared once into a folder all processes read, by two `hashmoe prepare` processes
joined the same way: each prepares its own shards (every process-count-th from its index), and the
one that finishes last writes the manifest.
"""
from __future__ import annotations

import json

import pytest

from test_multihost import (DEVICES, HOSTS, MESH_2x4, RUN_FLAGS, SEQ_LEN, env_for, free_port,
                            hashmoe, records, run_together)
from textdata import write_text_folder

STEPS, STOP = 6, 3
PREPARED_FLAGS = ("--gin.DATA_SOURCE='prepared'",)
# Later bindings win: RUN_FLAGS's expert_parallel dispatch takes no precomputed routing.
SORTED_FLAGS = ("--gin.SparseConfig.dispatch='sorted'",)
DEVICE_SORT_FLAGS = ("--gin.train.precompute_routing=False",)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  base = tmp_path_factory.mktemp("prepared_multihost")
  texts = write_text_folder(base / "texts")
  space = {"texts": texts, "cache": base / "cache", "jax_cache": base / "jax_cache",
           "root": base / "prepared", "base": base}
  coordinator = f"127.0.0.1:{free_port()}"
  done = run_together([(f"prepare{i}", hashmoe(
      "prepare", *RUN_FLAGS, f"--gin.TEXT_DIR='{texts}'", f"--gin.PREPARED_DIR='{space['root']}'",
      "--num_shards=2", "--workers=1", "--no_progress", f"--coordinator_address={coordinator}",
      f"--num_processes={HOSTS}", f"--process_id={i}"), env_for(space, 1))
                       for i in range(HOSTS)], base / "prepare_logs")
  summaries = [done[f"prepare{i}"]["summary"] for i in range(HOSTS)]
  # Each process prepared its own shard of each split (train, validation, test), none twice.
  assert [s["prepared"] for s in summaries] == [3, 3]
  assert any(s["complete"] for s in summaries)
  folder = space["root"] / "hashmoe_text_lm" / f"len{SEQ_LEN}"
  manifest = json.loads((folder / "manifest.json").read_text())
  assert [s["file"] for s in manifest["split_info"]["train"]["shards"]] == [
      "train/rows-00000-of-00002.arrayrecord", "train/rows-00001-of-00002.arrayrecord"]
  return space


def train_flags(workspace, model_dir, steps):
  return (*RUN_FLAGS, *MESH_2x4, *PREPARED_FLAGS, *SORTED_FLAGS,
          f"--gin.TEXT_DIR='{workspace['texts']}'",
          f"--gin.PREPARED_DIR='{workspace['root']}'", f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=8", "--gin.EVAL_PERIOD=0",
          "--gin.CHECKPOINT_PERIOD=1000", "--gin.train.progress_bar=False",
          "--gin.train.tensorboard=False", f"--compilation_cache_dir={workspace['jax_cache']}")


def test_two_processes_read_their_slices_and_a_restart_on_one_process_keeps_the_batch_order(
    workspace):
  base = workspace["base"]
  multi, single = base / "two_processes", base / "one_process"
  coordinator = f"127.0.0.1:{free_port()}"
  jobs = [(f"process{i}", hashmoe("train", *train_flags(workspace, multi, STOP),
                                  f"--coordinator_address={coordinator}",
                                  f"--num_processes={HOSTS}", f"--process_id={i}"),
           env_for(workspace, DEVICES // HOSTS)) for i in range(HOSTS)]
  jobs.append(("single", hashmoe("train", *train_flags(workspace, single, STEPS),
                                 *DEVICE_SORT_FLAGS), env_for(workspace, DEVICES)))
  done = run_together(jobs, base / "logs")
  for name in done:
    assert "data: prepared rows of task hashmoe_text_lm" in done[name]["stderr"], name
    assert "mesh {'data': 2, 'expert': 4, 'model': 1}" in done[name]["stderr"], name
  for i in range(HOSTS):
    assert f"jax.distributed: process {i} of {HOSTS}" in done[f"process{i}"]["stderr"]
    assert "precomputed routing: the input pipeline groups" in done[f"process{i}"]["stderr"]
  assert "precomputed routing is off" in done["single"]["stderr"]

  # 1. The same global batches: the losses agree to float32 reassociation (gloo between the
  # processes, XLA's all-reduce within one: test_multihost.py measured 1 ulp; 1e-6 relative
  # allows ~15, while another batch moves the loss by ~1e-2).
  two, one = records(multi / "metrics.jsonl"), records(single / "metrics.jsonl")
  assert [r["step"] for r in two] == list(range(1, STOP + 1))
  for m, s in zip(two, one):
    assert m["tokens"] == s["tokens"]
    assert m["loss"] == pytest.approx(s["loss"], rel=1e-6), m["step"]
    hashed = [layer for layer, moe in m["moe"].items() if "host_expert_counts" in moe]
    assert hashed and hashed == [layer for layer in s["moe"] if "group_sizes" in s["moe"][layer]]
    for layer in hashed:
      assert m["moe"][layer]["sort_precomputed"] == 1.0, (m["step"], layer)
      assert "sort_precomputed" not in s["moe"][layer]
      assert m["moe"][layer]["host_expert_counts"] == s["moe"][layer]["group_sizes"], m["step"]
      assert sum(m["moe"][layer]["host_expert_counts"]) == 8 * SEQ_LEN  # both hosts' rows
  meta = json.loads((multi / "checkpoints" / str(STOP) / "data" / "metadata").read_text())
  positions = meta["positions"]
  assert len(positions) == HOSTS and all(p == positions[0] for p in positions)
  assert (positions[0]["next_batch"], positions[0]["any_process_count"]) == (STOP, True)

  # 2. The two-process run resumed by one process: the batches of steps 4-6 are the ones the
  # uninterrupted single process trained on (its parameters at step 3 differ by ulps, so the
  # losses agree to the same tolerance; other batches would be ~1e-2 away).
  resumed = run_together([("resumed", hashmoe("train", *train_flags(workspace, multi, STEPS)),
                           env_for(workspace, DEVICES))], base / "resume_logs")
  summary = resumed["resumed"]["summary"]
  assert (summary["start_step"], summary["step"]) == (STOP, STEPS)
  two = records(multi / "metrics.jsonl")
  assert [r["step"] for r in two] == list(range(1, STEPS + 1))
  for m, s in zip(two[STOP:], one[STOP:]):
    assert m["tokens"] == s["tokens"]
    assert m["loss"] == pytest.approx(s["loss"], rel=1e-5), m["step"]
