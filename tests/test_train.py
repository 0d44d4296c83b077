"""Tests for hashmoe.train and hashmoe.training: the optimizer, the loss, checkpoints, the loop.

References are independent of the code under test: closed-form learning-rate schedules, a numpy
AdamW step, a numpy log-softmax, a numpy checksum, and for the loop the run itself compared against
an uninterrupted twin (a run killed with SIGKILL and restarted must reproduce every loss bit for
bit). In-process runs use a tiny model and a seeded numpy input pipeline on the 8 CPU devices of
conftest; the kill/pre-emption/Ctrl-C runs are real `hashmoe train` processes (one CPU device, a
generated text folder, a 320-piece SentencePiece vocabulary) so that SIGKILL, SIGTERM, SIGINT and a
second run on the same MODEL_DIR hit a real process.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from hashmoe import hash_functions, models, routers, sharding, tables
from hashmoe import train as T
from hashmoe.training import errors, optim, resume, run_dir
from hashmoe.training import checkpoints as checkpoints_lib
from hashmoe.training import metrics as metrics_lib
from hashmoe.training import trainer as trainer_lib
from textdata import write_text_folder

REPO = Path(__file__).resolve().parent.parent
V = 64


# --------------------------------------------------------------------------------------------------
# Fixtures: a tiny model, a seeded numpy input pipeline, and a persistent compilation cache (every
# in-process run builds a new Trainer, i.e. new jitted functions; identical programs are then
# loaded from the cache instead of recompiled, which is most of a tiny run's time).


pytestmark = pytest.mark.usefixtures("compilation_cache")


def tiny_config(router="hash", num_experts=4):
  sparse = models.SparseConfig(router=router, num_experts=num_experts, layers=(1,))
  return models.tiny_config(vocab_size=V, num_encoder_layers=0, sparse=sparse, max_len=16)


class NumpyPipeline:
  """Deterministic LM batches: batch i depends only on (seed, i); the position is the index."""

  vocab_size = V
  vocab_fingerprint = ""

  def __init__(self, batch_size=8, seq_len=16, seed=0):
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed

  def batch(self, index, split="train"):
    rng = np.random.default_rng([self.seed, index, 0 if split == "train" else 1])
    targets = rng.integers(1, V, (self.batch_size, self.seq_len)).astype(np.int32)
    targets[:, -2:] = 0  # some padding, excluded from the loss
    inputs = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    return {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
            "decoder_loss_weights": (targets > 0).astype(np.int32)}

  def train_batches(self, position):
    pipeline = self
    start = 0 if position is None else position["next"]

    class Batches:
      next_index = start

      def __iter__(self):
        return self

      def __next__(self):
        self.next_index += 1
        return pipeline.batch(self.next_index - 1)

      def position(self):
        return {"next": self.next_index}

      def close(self):
        pass

    return Batches()

  def eval_batches(self, split, num_batches):
    return [self.batch(i, split) for i in range(num_batches)]

  def count_words(self, batch):
    return None

  def key_counts(self, key, key_space, *, decoder_inputs=True):
    counts = np.zeros(key_space, np.int64)
    feature = "decoder_input_tokens" if decoder_inputs else "decoder_target_tokens"
    for i in range(4):
      np.add.at(counts, self.batch(i)[feature].ravel(), 1)
    return counts


def run(model_dir, steps, *, config=None, lr=1e-2, freeze=None, checkpoint_period=2,
        init_checkpoint=None, eval_period=0, input_pipeline=None, seed=0, tensorboard=False,
        **kwargs):
  schedule = optim.learning_rate_schedule(lr, warmup_steps=0, decay="constant")
  optimizer = optim.make_optimizer(schedule, freeze=freeze)
  return T.train(model_dir=str(model_dir), model_config=config or tiny_config(), task="numpy",
                 train_steps=steps, batch_size=8, seq_len=16, seed=seed, optimizer=optimizer,
                 mesh=sharding.make_mesh(), checkpoint_period=checkpoint_period,
                 eval_period=eval_period, eval_batches=2, log_period=1,
                 init_checkpoint=init_checkpoint, progress_bar=False, tensorboard=tensorboard,
                 input_pipeline=input_pipeline or NanAtBatch(-1), **kwargs)


def snapshot(model_dir):
  """{relative path: (size, mtime_ns, sha256)} of every file under model_dir: a refused run must
  leave it unchanged (a directory's own mtime is not compared: taking and releasing the lock
  creates and deletes MODEL_DIR/hashmoe.lock)."""
  import hashlib
  return {str(p.relative_to(model_dir)): (p.stat().st_size, p.stat().st_mtime_ns,
                                          hashlib.sha256(p.read_bytes()).hexdigest())
          for p in sorted(Path(model_dir).rglob("*")) if p.is_file()}


def losses(model_dir):
  return {r["step"]: r["loss"]
          for r in map(json.loads, open(Path(model_dir) / run_dir.METRICS_FILE))}


def saved_params(model_dir, step):
  import orbax.checkpoint as ocp
  state = ocp.PyTreeCheckpointer().restore(Path(model_dir) / "checkpoints" / str(step) / "state")
  return state["params"], state["constants"]


# --------------------------------------------------------------------------------------------------
# Optimizer and loss.


@pytest.mark.parametrize("decay", ["rsqrt", "cosine", "constant"])
def test_learning_rate_schedule_matches_closed_form(decay):
  peak, warmup, total = 2e-3, 10, 50
  schedule = optim.learning_rate_schedule(peak, warmup_steps=warmup, decay=decay,
                                          total_steps=total, end_fraction=0.1)
  for count in [0, 4, 9, 10, 11, 30, 49, 60]:
    t = count + 1  # update number
    if t <= warmup:
      want = peak * t / warmup
    elif decay == "rsqrt":
      want = peak * math.sqrt(warmup / t)
    elif decay == "cosine":
      frac = min((t - warmup) / (total - warmup), 1.0)
      want = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    else:
      want = peak
    assert float(schedule(count)) == pytest.approx(want, rel=1e-5), (decay, count)


def test_learning_rate_schedule_rejects_bad_settings():
  with pytest.raises(ValueError, match="total_steps"):
    optim.learning_rate_schedule(1e-3, warmup_steps=10, decay="cosine", total_steps=5)
  with pytest.raises(ValueError, match="decay"):
    optim.learning_rate_schedule(1e-3, decay="linear")
  with pytest.raises(ValueError, match="freeze"):
    optim.make_optimizer(freeze="experts")


def test_token_nll_matches_numpy_log_softmax():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, (2, 5)).astype(np.int32)
  weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
  nll, count = trainer_lib.token_nll(jnp.asarray(logits), jnp.asarray(targets),
                                     jnp.asarray(weights))
  want = 0.0
  for b in range(2):
    for t in range(5):
      row = logits[b, t].astype(np.float64)
      log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
      want += weights[b, t] * (log_z - row[targets[b, t]])
  assert float(nll) == pytest.approx(want, rel=1e-5)
  assert float(count) == weights.sum()


def _init_params(config):
  """Parameters of the config's shapes (values do not matter to labels and frozen updates)."""
  model = models.build_model(config)
  batch = NumpyPipeline(batch_size=2).batch(0)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, deterministic=True))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
                      nn.unbox(shapes["params"]))


def test_param_labels_mark_router_and_expert_params_sparse():
  params = _init_params(tiny_config(router="switch"))
  labels = optim.param_labels(params)
  flat = {jax.tree_util.keystr(p): l for p, l in jax.tree_util.tree_flatten_with_path(labels)[0]}
  sparse = {k for k, l in flat.items() if l == optim.SPARSE}
  assert sparse == {"['decoder_1']['moe']['experts']['wi']",
                    "['decoder_1']['moe']['experts']['wo']",
                    "['decoder_1']['moe']['router']['kernel']"}
  assert all(l == optim.DENSE for k, l in flat.items() if k not in sparse)


def test_adamw_step_matches_numpy_reference():
  """One AdamW update with clipping, against the textbook formulas in float64."""
  params = {"w": jnp.asarray([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.asarray([0.1, -0.2])}
  grads = {"w": jnp.asarray([[3.0, 0.0], [-4.0, 1.0]]), "b": jnp.asarray([2.0, 2.0])}
  lr, wd, b1, b2, eps, clip = 0.1, 0.01, 0.9, 0.98, 1e-8, 1.0
  tx = optim.make_optimizer(lr, weight_decay=wd, b1=b1, b2=b2, eps=eps, clip_norm=clip)
  updates, _ = tx.update(grads, tx.init(params), params)
  norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))
  for name in params:
    g = np.asarray(grads[name], np.float64) * min(1.0, clip / norm)
    m_hat = (1 - b1) * g / (1 - b1)
    v_hat = (1 - b2) * g * g / (1 - b2)
    step = m_hat / (np.sqrt(v_hat) + eps)
    if np.ndim(params[name]) >= 2:  # decay on matrices only
      step = step + wd * np.asarray(params[name], np.float64)
    np.testing.assert_allclose(np.asarray(updates[name]), -lr * step, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("freeze", [optim.SPARSE, optim.DENSE])
def test_frozen_part_gets_exactly_zero_updates(freeze):
  params = _init_params(tiny_config(router="switch"))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  tx = optim.make_optimizer(1e-2, freeze=freeze)
  updates, _ = tx.update(grads, tx.init(params), params)
  labels = optim.param_labels(params)
  for u, label in zip(jax.tree.leaves(updates), jax.tree.leaves(labels)):
    if label == freeze:
      assert not np.any(np.asarray(u)), label
    else:
      assert np.all(np.asarray(u) != 0), label


def test_loss_weights_default_to_non_padding_targets():
  targets = np.array([[3, 4, 0], [5, 0, 0]], np.int32)
  np.testing.assert_array_equal(trainer_lib.loss_weights({"decoder_target_tokens": targets}),
                                [[1, 1, 0], [1, 0, 0]])
  w = np.array([[1, 0, 0], [1, 1, 0]], np.int32)
  np.testing.assert_array_equal(
      trainer_lib.loss_weights({"decoder_target_tokens": targets, "decoder_loss_weights": w}), w)


# --------------------------------------------------------------------------------------------------
# Checksums, logs, hash-table metadata.


def _numpy_checksum(x):
  words = np.ascontiguousarray(x).view(np.uint32).ravel().astype(np.uint64)
  weights = np.arange(words.size, dtype=np.uint64) * 2 + 1
  return int(np.sum((words * weights) % 2**32) % 2**32)


def test_tree_checksums_match_numpy_and_ignore_sharding():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 8)).astype(np.float32)
  ids = rng.integers(0, 100, (8,)).astype(np.int32)
  mesh = sharding.make_mesh(data=-1)
  sharded = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  got = checkpoints_lib.tree_checksums({"x": sharded, "ids": jnp.asarray(ids)})
  assert got == {"['x']": _numpy_checksum(x), "['ids']": _numpy_checksum(ids)}
  y = x.copy()
  y[3, 5] = np.nextafter(y[3, 5], np.float32(np.inf))  # one ulp
  assert checkpoints_lib.tree_checksums({"x": jnp.asarray(y)})["['x']"] != got["['x']"]
  swapped = x.copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  assert checkpoints_lib.tree_checksums({"x": jnp.asarray(swapped)})["['x']"] != got["['x']"]


def test_truncate_jsonl_keeps_steps_up_to_restored_and_drops_torn_lines(tmp_path):
  from etils import epath
  path = tmp_path / "m.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 8))
                  + '{"step": 8, "lo')
  metrics_lib.truncate_jsonl(epath.Path(path), 5)
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_metrics_logs_on_an_object_store_are_rewritten_not_appended(tmp_path, monkeypatch):
  # gs:// files cannot be opened for appending: the logger must keep the earlier lines (from a
  # previous run, after resume's truncation) and rewrite the file whole.
  from etils import epath

  def no_append(path, mode="r", *args, **kwargs):
    raise AssertionError(f"open({path!r}, {mode!r}) on an object store")

  monkeypatch.setattr(metrics_lib, "is_remote", lambda path: True)
  monkeypatch.setattr(metrics_lib, "open", no_append, raising=False)
  (tmp_path / run_dir.METRICS_FILE).write_text("".join(json.dumps({"step": s}) + "\n"
                                                       for s in (1, 2, 3)))
  log = metrics_lib.MetricsLogger(epath.Path(tmp_path), tensorboard=False)
  log.resume(2)
  log.write_train({"step": 3, "loss": 0.5})
  log.write_train({"step": 4, "loss": 0.25})
  log.write_eval({"step": 4, "loss": 0.75})
  log.close()
  lines = [json.loads(l) for l in (tmp_path / run_dir.METRICS_FILE).read_text().splitlines()]
  assert lines == [{"step": 1}, {"step": 2}, {"step": 3, "loss": 0.5}, {"step": 4, "loss": 0.25}]
  assert json.loads((tmp_path / run_dir.EVAL_FILE).read_text()) == {"step": 4, "loss": 0.75}


def test_is_remote_tells_object_stores_from_local_paths(tmp_path):
  assert run_dir.is_remote("gs://bucket/run") and run_dir.is_remote("s3://b/k")
  assert not run_dir.is_remote(tmp_path) and not run_dir.is_remote("relative/run")


def test_verify_hash_tables_detects_changed_tables_and_other_vocabularies():
  table = np.arange(10, dtype=np.int32) % 4
  constants = {"hash_tables": {"decoder_1": {"moe": {"router": {"table": table[None]}}}}}
  fp = "a" * 64
  meta = tables.hash_table_metadata(constants, {}, vocab_size=10, vocab_fingerprint=fp)
  tables.verify_hash_tables(constants, meta, vocab_size=10, vocab_fingerprint=fp, where="ckpt")
  changed = {"hash_tables": {"decoder_1": {"moe": {"router": {"table": table[None] * 0}}}}}
  with pytest.raises(errors.CheckpointError, match="sha256"):
    tables.verify_hash_tables(changed, meta, vocab_size=10, vocab_fingerprint=fp, where="ckpt")
  with pytest.raises(errors.CheckpointError, match="fingerprint"):
    tables.verify_hash_tables(constants, meta, vocab_size=10, vocab_fingerprint="b" * 64, where="c")
  with pytest.raises(errors.CheckpointError, match="vocab_size"):
    tables.verify_hash_tables(constants, meta, vocab_size=11, vocab_fingerprint=fp, where="c")


# --------------------------------------------------------------------------------------------------
# The loop, in process.


class NanAtBatch(NumpyPipeline):
  """A pipeline whose batch `index` carries NaN loss weights: the loss of that step is NaN,
  whatever the parameters (the same compiled program as a clean run, so no recompilation)."""

  def __init__(self, index):
    super().__init__()
    self.index = index

  def batch(self, index, split="train"):
    batch = super().batch(index, split)
    weights = batch["decoder_loss_weights"].astype(np.float32)
    if index == self.index and split == "train":
      weights[0, 0] = np.nan
    return {**batch, "decoder_loss_weights": weights}


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  model_dir = tmp_path / "run"
  run(model_dir, 4, input_pipeline=NanAtBatch(-1))
  before = checkpoints_lib.tree_checksums(saved_params(model_dir, 4)[0])
  with pytest.raises(errors.NonFiniteLossError, match=r"loss diverged at step 6: the training "
                     r"loss is nan\b.*last good checkpoint is step 4"):
    run(model_dir, 8, input_pipeline=NanAtBatch(5))  # batch 5 feeds step 6
  checkpoints = sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir()
                       if p.name.isdigit())
  assert checkpoints == [2, 4]
  assert checkpoints_lib.tree_checksums(saved_params(model_dir, 4)[0]) == before
  logged = losses(model_dir)
  assert sorted(logged) == [1, 2, 3, 4, 5]  # the NaN step was never logged either
  assert all(math.isfinite(v) for v in logged.values())
  # The next run resumes from the intact checkpoint.
  assert run(model_dir, 5, input_pipeline=NanAtBatch(-1)).start_step == 4


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path):
  model_dir = tmp_path / "run"
  run(model_dir, 6)
  first = losses(model_dir)
  state_dir = model_dir / "checkpoints" / "6" / "state"
  for data_file in [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]:
    raw = bytearray(data_file.read_bytes())  # same size, damaged content (bit rot)
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
    data_file.write_bytes(bytes(raw))
  with pytest.warns(RuntimeWarning, match="step 6 .* corrupt"):
    result = run(model_dir, 8)
  assert result.start_step == 4
  corrupt = model_dir / run_dir.CORRUPT_SUBDIR
  assert corrupt.is_dir() and any(corrupt.iterdir())
  again = losses(model_dir)
  assert sorted(again) == list(range(1, 9))
  for step in (5, 6):  # re-run from step 4: the same losses as the first time
    assert again[step] == first[step]


def _small_state(step, scale=1.0):
  params = {"w": jnp.full((4, 2), scale, jnp.float32), "b": jnp.zeros((2,), jnp.float32)}
  return trainer_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                                opt_state=(jnp.asarray(step, jnp.int32),), constants={})


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def test_checkpointer_falls_back_past_incomplete_checkpoints_and_reports_when_none_is_left(
    tmp_path):
  ckpt = checkpoints_lib.Checkpointer(tmp_path / "checkpoints", max_to_keep=3, async_save=False)
  assert ckpt.restore_latest(_abstract(_small_state(0))) is None
  for step in (1, 2, 3):
    ckpt.save(_small_state(step, scale=step), data_position={"next": step}, hash_metadata={},
              config_text="")
  ckpt.wait()
  # Step 3 lost its data item (a partial copy); step 2 its array metadata.
  for f in (tmp_path / "checkpoints" / "3" / "data").iterdir():
    f.unlink()
  (tmp_path / "checkpoints" / "2" / "state" / "_METADATA").write_text("{not json")
  with pytest.warns(RuntimeWarning) as caught:
    restored = ckpt.restore_latest(_abstract(_small_state(0)))
  assert [w for w in caught if "step 3" in str(w.message)]
  assert restored.step == 1 and restored.data_position == {"next": 1}
  np.testing.assert_array_equal(restored.state.params["w"], np.full((4, 2), 1.0))
  assert sorted(p.name.split(".")[0] for p in (tmp_path / run_dir.CORRUPT_SUBDIR).iterdir()) == \
      ["2", "3"]
  for f in (tmp_path / "checkpoints" / "1" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"\0" * f.stat().st_size)
  with pytest.warns(RuntimeWarning), pytest.raises(errors.CheckpointError, match="none of the"):
    ckpt.restore_latest(_abstract(_small_state(0)))
  assert ckpt.all_steps() == [1]  # with nothing restorable, nothing is moved: no silent restart
  with pytest.warns(RuntimeWarning), pytest.raises(errors.CheckpointError, match="none of the"):
    ckpt.restore_latest(_abstract(_small_state(0)))
  ckpt.close()


def test_checkpoint_of_another_config_is_an_error_not_a_corruption(tmp_path):
  ckpt = checkpoints_lib.Checkpointer(tmp_path / "checkpoints", async_save=False)
  ckpt.save(_small_state(5), data_position=None, hash_metadata={}, config_text="")
  ckpt.wait()
  other = _small_state(0)
  other = other.replace(params={**other.params, "w": jnp.zeros((4, 3))})
  with pytest.raises(errors.IncompatibleCheckpointError, match=r"\['w'\] \(4, 3\) float32"):
    ckpt.restore_latest(_abstract(other))
  assert ckpt.all_steps() == [5]  # nothing was moved aside
  assert not (tmp_path / run_dir.CORRUPT_SUBDIR).exists()
  ckpt.close()


def test_fine_tuning_with_the_sparse_part_frozen_keeps_it_bit_equal(tmp_path):
  """The paper's fine-tuning option (Section 5.4): start from a checkpoint, train only the dense
  part. The frozen experts must come out bit-equal; everything else must move."""
  run(tmp_path / "base", 2)
  base_params, base_constants = saved_params(tmp_path / "base", 2)
  flat_base = dict(jax.tree_util.tree_flatten_with_path(base_params)[0])
  model_dir = tmp_path / "finetune"
  result = run(model_dir, 2, freeze=optim.SPARSE, init_checkpoint=str(tmp_path / "base"))
  assert result.start_step == 0
  params, constants = saved_params(model_dir, 2)
  jax.tree.map(np.testing.assert_array_equal, constants, base_constants)  # same hash tables
  frozen = moved = 0
  for (path, value), label in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                  jax.tree.leaves(optim.param_labels(params))):
    same = np.array_equal(value, flat_base[path])
    if label == optim.SPARSE:
      assert same, f"{jax.tree_util.keystr(path)} changed although the sparse part is frozen"
      frozen += 1
    else:
      moved += not same
  assert frozen == 2 and moved > 10  # experts wi, wo; the dense weights all trained


def test_hash_tables_travel_with_checkpoints(tmp_path):
  model_dir = tmp_path / "run"
  run(model_dir, 2, hash_tables="balanced")
  _, constants = saved_params(model_dir, 2)
  table = np.asarray(constants["hash_tables"]["decoder_1"]["moe"]["router"]["table"])
  written = list((model_dir / tables.HASH_TABLE_SUBDIR).glob("*.npz"))
  assert len(written) == 1
  from hashmoe import hashing
  loaded = hashing.HashTable.load(written[0])
  np.testing.assert_array_equal(table[0], loaded.table)
  # Balanced on the counts the pipeline reports: the greedy rule, recomputed independently.
  counts = NumpyPipeline().key_counts("token", V)
  loads = np.zeros(4)
  want = np.zeros(V, np.int32)
  for token in sorted(range(V), key=lambda t: (-counts[t], t)):
    want[token] = int(np.argmin(loads))
    loads[want[token]] += counts[token]
  assert np.bincount(loaded.table, weights=counts, minlength=4).max() == pytest.approx(loads.max())
  # Resuming with another table file than the checkpoint's is refused.
  other = hash_functions.build_table("random", num_experts=4, vocab_size=V, seed=7)
  other.save(tmp_path / "other.npz")
  with pytest.raises(errors.CheckpointError, match="not trained with"):
    run(model_dir, 3, hash_tables=str(tmp_path / "other.npz"))
  # A fresh run loads that file, and its checkpoints record where the table came from.
  run(tmp_path / "from_file", 2, hash_tables=str(tmp_path / "other.npz"))
  _, constants = saved_params(tmp_path / "from_file", 2)
  np.testing.assert_array_equal(constants["hash_tables"]["decoder_1"]["moe"]["router"]["table"][0],
                                other.table)
  meta = json.loads((tmp_path / "from_file" / "checkpoints" / "2" / "hash_tables" /
                     "metadata").read_text())
  assert meta["layers"]["decoder_1"][0]["source"] == str(tmp_path / "other.npz")


def test_out_of_vocabulary_batch_is_a_clear_error(tmp_path):
  class Bad(NumpyPipeline):
    def batch(self, index, split="train"):
      batch = super().batch(index, split)
      batch["decoder_input_tokens"][0, 3] = V + 5
      return batch

  with pytest.raises(ValueError, match=rf"decoder_input_tokens.*{V + 5}"):
    T.train(model_dir=str(tmp_path), model_config=tiny_config(), task="numpy", train_steps=1,
            batch_size=8, seq_len=16, mesh=sharding.make_mesh(), progress_bar=False,
            tensorboard=False, input_pipeline=Bad(), eval_period=0)


# --------------------------------------------------------------------------------------------------
# Resuming: what a checkpoint fixes is refused, what may change is logged.


def test_resuming_with_another_model_is_refused_naming_each_change_and_writes_nothing(tmp_path):
  model_dir = tmp_path / "run"
  run(model_dir, 2)
  assert not (model_dir / run_dir.LOCK_FILE).exists()  # released when the run ended
  before = snapshot(model_dir)
  sparse = models.SparseConfig(router=routers.Hash(key="prev_token"), num_experts=4, layers=(1,))
  # Same shapes (the checkpoint would load); dropout may change, the rest may not.
  other = models.tiny_config(vocab_size=V, num_encoder_layers=0, sparse=sparse, max_len=16,
                             activation="gelu", dropout_rate=0.1)
  with pytest.raises(errors.ChangedConfigError) as caught:
    run(model_dir, 4, config=other, seed=1)
  assert isinstance(caught.value, errors.ConfigError)  # a usage error: the CLI exits 2
  message = str(caught.value)
  listed = [line.strip() for line in message.splitlines()
            if line.startswith("  ") and " -> " in line]
  assert listed == ["SparseConfig.hash_key: 'token' -> 'prev_token'",
                    "TransformerConfig.activation: 'relu' -> 'gelu'",
                    "train.seed: 0 -> 1"]
  assert message.startswith(f"MODEL_DIR {model_dir} holds a checkpoint (step 2) of a run with "
                            "other settings")
  assert "Nothing was written" in message and "new MODEL_DIR" in message
  assert f"INIT_CHECKPOINT='{model_dir}'" in message
  assert snapshot(model_dir) == before


def gin_run(model_dir, steps, checkpoint_period):
  """A run configured in part through gin, as `hashmoe train` is, so that its operative config
  (the checkpoint's "config" item, MODEL_DIR/config.gin) holds the macros a user changes."""
  import gin
  gin.clear_config()
  gin.parse_config(f"""
      TRAIN_STEPS = {steps}
      CHECKPOINT_PERIOD = {checkpoint_period}
      LEARNING_RATE = 0.01
      hashmoe.train.train.train_steps = %TRAIN_STEPS
      hashmoe.train.train.checkpoint_period = %CHECKPOINT_PERIOD
      hashmoe.train.train.optimizer = @hashmoe.train.make_optimizer()
      hashmoe.train.make_optimizer.learning_rate = @hashmoe.train.learning_rate_schedule()
      hashmoe.train.learning_rate_schedule.peak = %LEARNING_RATE
      hashmoe.train.learning_rate_schedule.warmup_steps = 0
      hashmoe.train.learning_rate_schedule.decay = 'constant'
  """)
  try:
    return T.train(model_dir=str(model_dir), model_config=tiny_config(), task="numpy",
                   batch_size=8, seq_len=16, mesh=sharding.make_mesh(), eval_period=0,
                   log_period=1, progress_bar=False, tensorboard=False,
                   input_pipeline=NanAtBatch(-1))
  finally:
    gin.clear_config()


def test_resuming_with_other_training_settings_logs_them_and_keeps_the_config_history(
    tmp_path, caplog):
  # (The learning rate may change too: the divergence test below resumes with another one. Here
  # the change keeps the compiled step, which is most of a tiny run's cost.)
  model_dir = tmp_path / "run"
  gin_run(model_dir, 2, checkpoint_period=2)
  first_config = (model_dir / run_dir.CONFIG_FILE).read_text()
  assert "TRAIN_STEPS = 2" in first_config and "CHECKPOINT_PERIOD = 2" in first_config
  first = losses(model_dir)
  with caplog.at_level("INFO", logger="hashmoe.train"):
    result = gin_run(model_dir, 4, checkpoint_period=1)
  assert result.start_step == 2 and result.step == 4
  assert ("changed since the checkpoint at step 2: CHECKPOINT_PERIOD: 2 -> 1; "
          "TRAIN_STEPS: 2 -> 4\n") in caplog.text
  # config.gin holds the run's config; the checkpoint's is kept under its step.
  assert (model_dir / f"{run_dir.CONFIG_FILE}.2").read_text() == first_config
  assert "TRAIN_STEPS = 4" in (model_dir / run_dir.CONFIG_FILE).read_text()
  logged = losses(model_dir)
  assert sorted(logged) == [1, 2, 3, 4] and all(logged[s] == first[s] for s in (1, 2))


def test_check_resume_names_macros_and_reads_checkpoints_that_recorded_only_gin_text():
  """A setting is named by the macro the user changes. Checkpoints written before the settings
  were recorded: their gin text decides, macros resolved, a moved table file being no change (it
  is checked by content)."""
  old = ("HASH_KEY = 'token'\nTRAIN_STEPS = 2\nSparseConfig.hash_key = %HASH_KEY\n"
         "TransformerConfig.dropout_rate = 0.0\ntrain.hash_tables = 'balanced'\n"
         "train.train_steps = %TRAIN_STEPS\n")
  new = old.replace("TRAIN_STEPS = 2", "TRAIN_STEPS = 4").replace("0.0", "0.1")
  check = lambda text: resume.check_resume({"operative_config": old}, step=2, settings={},
                                           config_text=text, model_dir="/runs/x")
  assert [str(c) for c in check(new)] == ["TRAIN_STEPS: 2 -> 4",
                                          "TransformerConfig.dropout_rate: 0.0 -> 0.1"]
  moved = new.replace("'balanced'", "'/tables/balanced.npz'")
  assert "train.hash_tables: 'balanced' -> '/tables/balanced.npz'" in map(str, check(moved))
  # A binding the checkpoint's text lacks is unknown there, not changed.
  assert "TransformerConfig.d_model: (not set) -> 64" in map(str, check(
      new + "TransformerConfig.d_model = 64\n"))
  with pytest.raises(errors.ChangedConfigError, match=r"\(checkpoint -> this run\):\n  "
                     r"HASH_KEY: 'token' -> 'bigram'\n  train.hash_tables: 'balanced' -> 'random'\n"
                     r"Nothing was written"):
    check(new.replace("'token'", "'bigram'").replace("'balanced'", "'random'"))
  # Recorded settings decide where a checkpoint has them; the macro names the change.
  saved = {"operative_config": old, "settings": {"SparseConfig.hash_key": "token",
                                                 "train.seq_len": 32}}
  with pytest.raises(errors.ChangedConfigError, match=r":\n  HASH_KEY \(SparseConfig.hash_key\): "
                     r"'token' -> 'bigram'\nNothing"):
    resume.check_resume(saved, step=2,
                        settings={"SparseConfig.hash_key": "bigram", "train.seq_len": 32},
                        config_text=new.replace("'token'", "'bigram'"), model_dir="/runs/x")


# --------------------------------------------------------------------------------------------------
# One run per MODEL_DIR (a live second run is in the Ctrl-C test below).


def test_a_stale_lock_of_this_host_is_taken_over_and_one_of_another_host_is_refused(tmp_path):
  host = socket.gethostname()
  finished = subprocess.Popen(["true"])
  finished.wait()
  dead_pid = finished.pid
  lock_file = tmp_path / run_dir.LOCK_FILE
  lock_file.write_text(json.dumps({"pid": dead_pid, "host": host,
                                   "started": "2024-05-01T10:00:00"}))
  with pytest.warns(RuntimeWarning, match=rf"taking over the stale lock of MODEL_DIR {tmp_path}: "
                    rf"pid {dead_pid} on host {re.escape(host)} \(started 2024-05-01T10:00:00\)"):
    lock = run_dir.ModelDirLock(tmp_path).acquire()
  assert json.loads(lock_file.read_text())["pid"] == os.getpid()
  lock.release()
  assert not lock_file.exists()
  lock_file.write_text(json.dumps({"pid": 4242, "host": "elsewhere.example",
                                   "started": "2024-05-01T10:00:00"}))
  before = snapshot(tmp_path)
  with pytest.raises(errors.ModelDirInUseError) as caught:
    run(tmp_path, 2)
  assert str(caught.value).startswith(  # (gin adds the configurable it was raised in)
      f"MODEL_DIR {tmp_path} is locked by pid 4242 on host elsewhere.example (started "
      f"2024-05-01T10:00:00), and this host ({host}) cannot check whether that run is still "
      f"going. If no run is using the directory, delete {lock_file} and run again.")
  assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------
# Divergence, and metrics writers that take any value.


def test_a_huge_learning_rate_stops_with_loss_diverged_and_keeps_the_last_good_checkpoint(
    tmp_path):
  """A learning rate of 10 sends the loss to hundreds in one update: still finite, but its
  perplexity (~1e200) is more than TensorBoard's float32 holds, which used to crash the writer."""
  model_dir = tmp_path / "run"
  run(model_dir, 2)
  before = checkpoints_lib.tree_checksums(saved_params(model_dir, 2)[0])
  # Step 3 still starts from step 2's parameters; its update blows them up, and step 4 shows it.
  with pytest.raises(errors.LossDivergedError, match=(
      r"^loss diverged at step 4: the cross-entropy \S+ is above 16.64 = "
      r"train.divergence_factor 4 x ln\(vocab size 64\), far worse than an untrained model's\. "
      rf"The last good checkpoint is step 2 in {model_dir}/checkpoints: it is kept, and nothing "
      r"after it was saved\.")):
    run(model_dir, 8, lr=10.0, tensorboard=True)
  assert sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir()) == [2]
  assert checkpoints_lib.tree_checksums(saved_params(model_dir, 2)[0]) == before
  assert sorted(losses(model_dir)) == [1, 2, 3]  # the diverged step was never logged
  assert not (model_dir / run_dir.LOCK_FILE).exists()  # released on the exception too


def _strict_json(line):
  def reject(constant):
    raise ValueError(f"{constant} is not JSON")
  return json.loads(line, parse_constant=reject)


def test_metrics_writers_take_huge_and_non_finite_values(tmp_path):
  from etils import epath
  log = metrics_lib.MetricsLogger(epath.Path(tmp_path), tensorboard=True)
  record = {"step": 1, "loss": 700.0, "ppl": 1e304, "grad_norm": float("nan"),
            "update_norm": float("inf"),
            "moe": {"decoder_1": {"expert_load": [0.5, float("nan")], "dropped_fraction": 0.0}}}
  log.write_train(record)
  log.write_eval({"step": 1, "loss": float("inf"), "ppl": float("inf"), "split": "validation"})
  log.close()
  assert _strict_json((tmp_path / run_dir.METRICS_FILE).read_text()) == {
      **record, "grad_norm": "nan", "update_norm": "inf",
      "moe": {"decoder_1": {"expert_load": [0.5, "nan"], "dropped_fraction": 0.0}}}
  assert _strict_json((tmp_path / run_dir.EVAL_FILE).read_text()) == {
      "step": 1, "loss": "inf", "ppl": "inf", "split": "validation"}
  assert list((tmp_path / run_dir.TENSORBOARD_SUBDIR).rglob("events.out.tfevents.*"))


# --------------------------------------------------------------------------------------------------
# Logs a fresh run would overwrite; what word perplexity is.


def test_a_fresh_run_keeps_the_logs_of_an_earlier_run_before_starting_over(tmp_path):
  model_dir = tmp_path / "run"
  run(model_dir, 2)
  first = (model_dir / run_dir.METRICS_FILE).read_text()
  shutil.rmtree(model_dir / "checkpoints")  # the user deletes the checkpoints, reruns
  with pytest.warns(RuntimeWarning, match=r"no checkpoint but holds the logs of an earlier run "
                    r"\(metrics.jsonl: 2 records\); they are kept as "
                    r"metrics.jsonl.\d{8}-\d{6}.bak"):
    run(model_dir, 1)
  (kept,) = model_dir.glob(f"{run_dir.METRICS_FILE}.*.bak")
  assert kept.read_text() == first
  assert len(list(model_dir.glob(f"{run_dir.CONFIG_FILE}.*.bak"))) == 1
  assert sorted(losses(model_dir)) == [1]


class WordsPipeline(NanAtBatch):
  """Every third target token ends a word (float weights, as NanAtBatch: the same train step)."""

  def __init__(self):
    super().__init__(-1)

  def count_words(self, batch):
    return int(np.sum(np.asarray(batch["decoder_loss_weights"]) > 0)) // 3


def test_eval_records_tokens_per_word_which_word_perplexity_compounds_over(tmp_path):
  result = run(tmp_path / "run", 1, eval_period=1, input_pipeline=WordsPipeline())
  record = result.last_eval
  assert record == json.loads((tmp_path / "run" / run_dir.EVAL_FILE).read_text())
  tokens, words = record["tokens"], record["words"]
  assert words == sum(int(np.sum(WordsPipeline().batch(i, "validation")["decoder_loss_weights"]
                                 > 0)) // 3 for i in range(2))
  assert record["tokens_per_word"] == pytest.approx(tokens / words, rel=1e-12)
  assert record["word_ppl"] == pytest.approx(record["ppl"] ** (tokens / words), rel=1e-9)


# --------------------------------------------------------------------------------------------------
# Ctrl-C in process: the first asks for a checkpoint, the second interrupts.


def test_ctrl_c_requests_a_checkpointed_stop_and_a_second_one_interrupts_at_once():
  previous = signal.getsignal(signal.SIGINT)
  with T._StopSignals() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    deadline = time.time() + 10
    while not stop.signum and time.time() < deadline:
      time.sleep(0.01)
    assert stop.any_host() == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(10)
  assert signal.getsignal(signal.SIGINT) is previous
  result = lambda sig: T.TrainResult(step=3, start_step=0, preempted=sig is not None,
                                     last_train=None, last_eval=None, model_dir="",
                                     stop_signal=sig)
  assert [result(s).exit_code for s in (None, signal.SIGTERM, signal.SIGINT)] == [0, 143, 130]


# --------------------------------------------------------------------------------------------------
# Real processes: SIGKILL at any moment, SIGTERM.


@pytest.fixture(scope="module")
def text_env(tmp_path_factory, jax_cache_dir):
  base = tmp_path_factory.mktemp("text")
  texts = write_text_folder(base / "texts")
  env = dict(os.environ, HASHMOE_CACHE=str(base / "cache"), JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=str(jax_cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             # One device: the sharded restore is covered in process (8 devices); here the point
             # is a real process dying at an arbitrary moment.
             XLA_FLAGS="")
  return base, texts, env


STEPS, PERIOD = 40, 4


def cli_train(model_dir, texts, *extra):
  return [sys.executable, "-m", "hashmoe.cli", "train",
          "--gin_file=configs/runs/cpu_tiny.gin", "--gin_file=configs/tasks/text_dir.gin",
          f"--gin.TEXT_DIR='{texts}'", "--gin.VOCAB_SIZE=320", f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.TRAIN_STEPS={STEPS}", f"--gin.CHECKPOINT_PERIOD={PERIOD}",
          "--gin.EVAL_PERIOD=0", "--gin.SEQ_LEN=32", *extra]


def wait_for_lines(path, count, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if path.exists() and len(path.read_text().splitlines()) >= count:
      return
    assert proc.poll() is None, f"training exited early with {proc.returncode}"
    time.sleep(0.05)
  raise AssertionError(f"{path} did not reach {count} lines in {timeout}s")


def signal_between_checkpoints(proc, path, after, sig, timeout=240):
  """Sends `sig` (SIGTERM or SIGINT) so that the run stops at a step that is not a checkpoint
  step; returns the complete log lines n seen then (the run stops at step n + 1 or n + 2).

  Timing alone cannot promise that: on an idle machine a tiny step takes milliseconds, and the
  run can pass a checkpoint step (or its end) before the signal lands. So the process is frozen
  (SIGSTOP) and its log read: the loop checks for a stop signal after a step's train_step and
  before writing that step's line, so with n complete lines the next check is at step n + 1, or
  n + 2 if step n + 1 was already checked. When neither is a multiple of PERIOD, `sig` then
  SIGCONT; otherwise SIGCONT and look again."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    wait_for_lines(path, after, proc)
    proc.send_signal(signal.SIGSTOP)
    n = path.read_text().count("\n")
    if (n + 1) % PERIOD and (n + 2) % PERIOD and n + 2 < STEPS:
      proc.send_signal(sig)
      proc.send_signal(signal.SIGCONT)
      return n
    proc.send_signal(signal.SIGCONT)
    time.sleep(0.002)
  raise AssertionError(f"no moment between checkpoints to send {sig!r} within {timeout}s")


def test_sigkill_and_sigterm_at_any_moment_then_restart_reproduce_every_loss(text_env):
  """The restart guarantee, with real processes: an uninterrupted run; a twin killed with SIGKILL
  past two checkpoint periods (one checkpoint may be half-written), restarted, stopped with SIGTERM
  between two checkpoints (it must checkpoint the step it stops at and exit 143), and restarted
  again to the end. Every loss of the twin equals the uninterrupted run's, bit for bit."""
  base, texts, env = text_env

  def finish(model_dir):
    done = subprocess.run(cli_train(model_dir, texts), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])

  # The reference and the twin's first life run side by side (each is mostly single-threaded).
  reference_proc = subprocess.Popen(cli_train(base / "reference", texts), cwd=REPO, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  twin = base / "twin"
  proc = subprocess.Popen(cli_train(twin, texts), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    wait_for_lines(twin / run_dir.METRICS_FILE, 2 * PERIOD + 1, proc)
    proc.kill()
  finally:
    proc.wait(timeout=60)
    _, reference_err = reference_proc.communicate(timeout=300)
  assert reference_proc.returncode == 0, reference_err[-3000:]
  assert proc.returncode == -signal.SIGKILL
  # The killed run could not release its lock; the restart takes it over (same host, lock free).
  assert json.loads((twin / run_dir.LOCK_FILE).read_text())["pid"] == proc.pid
  killed_at = max(losses(twin))
  reference = losses(base / "reference")
  assert sorted(reference) == list(range(1, STEPS + 1))

  proc = subprocess.Popen(cli_train(twin, texts), cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  try:
    # Past killed_at, the lines are the restarted run's own (it truncates the log to its
    # checkpoint first), so its SIGTERM handler is in place.
    lines = signal_between_checkpoints(proc, twin / run_dir.METRICS_FILE,
                                       max(3 * PERIOD, killed_at + 1), signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 143
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["preempted"] and 0 < summary["start_step"] <= killed_at
  stopped = summary["step"]
  assert stopped in (lines + 1, lines + 2)
  assert stopped % PERIOD and stopped < STEPS  # not a regular checkpoint step
  steps = sorted(int(p.name) for p in (twin / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == stopped == max(losses(twin))
  meta = json.loads((twin / "checkpoints" / str(stopped) / "data" / "metadata").read_text())
  assert meta["positions"][0]["next_batch"] == stopped

  assert finish(twin)["start_step"] == stopped
  assert losses(twin) == reference  # bit-equal, step for step
  assert not (twin / run_dir.LOCK_FILE).exists()


def test_a_running_model_dir_refuses_a_second_run_and_ctrl_c_checkpoints_and_exits_130(text_env):
  """What a user does to a running `hashmoe train`: starts a second run on its MODEL_DIR (refused
  at once, naming the first run's pid and host, and nothing written), then presses Ctrl-C (the
  step finishes, a checkpoint of that step is written, exit code 130, the lock released)."""
  base, texts, env = text_env
  model_dir = base / "interrupted"
  proc = subprocess.Popen(cli_train(model_dir, texts), cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    wait_for_lines(model_dir / run_dir.METRICS_FILE, 2, proc)
    proc.send_signal(signal.SIGSTOP)  # so that it cannot finish (or write) meanwhile
    try:
      before = snapshot(model_dir)
      with pytest.raises(errors.ModelDirInUseError, match=(
          rf"^MODEL_DIR {re.escape(str(model_dir))} is in use by pid {proc.pid} on host "
          rf"{re.escape(socket.gethostname())} \(started [0-9T:+-]+\): one run at a time")):
        run(model_dir, STEPS)
      assert snapshot(model_dir) == before
    finally:
      proc.send_signal(signal.SIGCONT)
    lines = signal_between_checkpoints(proc, model_dir / run_dir.METRICS_FILE, PERIOD + 1,
                                       signal.SIGINT)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 130, err[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])
  stopped = summary["step"]
  assert summary["preempted"] and stopped in (lines + 1, lines + 2) and stopped % PERIOD
  steps = sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == stopped == max(losses(model_dir))
  assert not (model_dir / run_dir.LOCK_FILE).exists()
