"""Tests for hashmoe.t5x and configs/t5x: hashmoe models trained by t5x.

t5x is not on PyPI (it is installed by hand where these tests run; see hashmoe/t5x/__init__.py), so
the whole file skips without it.

References are independent of the adapter: the loss against the hashmoe module's logits with a
float64 numpy cross-entropy and the aux losses read straight from the sown "moe" collection;
sharded t5x train steps (8 CPU devices, experts over a 4-way "expert" axis) against plain SGD steps
on unsharded parameters (SGD, unlike Adam, would show any gradient rescaling); greedy decoding
against a step-by-step argmax loop; beam-search scores against the reference log-probability of
the returned decodes; parameter counts of every gin model against a closed-form count; restored
hash tables against the table file the run wrote. The end-to-end test runs `python -m t5x.train`
on the tiny hash model (about 30 s of its own).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

t5x = pytest.importorskip("t5x")

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402
from flax import traverse_util  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from t5x import decoding, optimizers, trainer as t5x_trainer, utils as t5x_utils  # noqa: E402

from hashmoe import hashing, models, routers  # noqa: E402
from hashmoe.layers import MOE_COLLECTION  # noqa: E402
from hashmoe.t5x import data as t5x_data  # noqa: E402
from hashmoe.t5x import models as t5x_models  # noqa: E402
from hashmoe.t5x import partitioning as t5x_partitioning  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
V = 64
B, L = 8, 12


# --------------------------------------------------------------------------------------------------
# Helpers.


def tiny(router="hash", encoder_decoder=False, num_experts=8, **sparse):
  """`router`: a family name (its defaults) or a `hashmoe.routers` config."""
  cfg = models.SparseConfig(router=router, num_experts=num_experts, layers=(1,), **sparse)
  return models.tiny_config(V, num_encoder_layers=2 if encoder_decoder else 0, sparse=cfg,
                            max_len=32)


def make_model(config, *, lnf="NUM_REAL_TARGET_TOKENS", z_loss=0.0, optimizer=None,
               decode_fn=None):
  vocab = seqio.PassThroughVocabulary(V, eos_id=1)
  optimizer = optimizer or optimizers.OptaxWrapper(optax.adamw(1e-3))
  module = t5x_models.hashmoe_module(config)
  if config.is_encoder_decoder:
    return t5x_models.HashMoeEncoderDecoderModel(
        module, vocab, vocab, optimizer, decode_fn=decode_fn or decoding.beam_search,
        z_loss=z_loss, loss_normalizing_factor=lnf)
  return t5x_models.HashMoeDecoderOnlyModel(
      module, vocab, optimizer, decode_fn=decode_fn or decoding.temperature_sample,
      z_loss=z_loss, loss_normalizing_factor=lnf)


def make_batch(seed, encoder_decoder=False, batch=B, length=L):
  rng = np.random.default_rng(seed)
  targets = rng.integers(2, V, (batch, length)).astype(np.int32)
  lengths = rng.integers(length // 2, length + 1, batch)
  targets[np.arange(length)[None, :] >= lengths[:, None]] = 0  # padding, out of the loss
  out = {"decoder_target_tokens": targets,
         "decoder_input_tokens": np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], 1),
         "decoder_loss_weights": (targets > 0).astype(np.int32)}
  if encoder_decoder:
    inputs = rng.integers(2, V, (batch, length)).astype(np.int32)
    inputs[:, -2:] = 0
    out["encoder_input_tokens"] = inputs
  return out


def input_shapes(encoder_decoder, batch=B, length=L):
  names = ["decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"]
  if encoder_decoder:
    names.append("encoder_input_tokens")
  return {n: (batch, length) for n in names}


def random_variables(model, seed=0):
  """(params, flax_mutables) of the model's t5x variables, filled with seeded numpy values: the
  shapes come from an abstract `get_initial_variables` (no compilation), the values need only be
  generic for comparisons against a reference."""
  shapes = jax.eval_shape(functools.partial(
      model.get_initial_variables, input_shapes=input_shapes(model.module.config.is_encoder_decoder)),
      jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = path[-1].key
    if name == "scale":
      return np.ones(x.shape, x.dtype)
    if name == "bias":
      return np.zeros(x.shape, x.dtype)
    return (rng.standard_normal(x.shape) * 0.3).astype(x.dtype)

  params = jax.tree_util.tree_map_with_path(fill, flax.core.unfreeze(shapes["params"]))
  experts = model.module.config.sparse.num_experts if model.module.config.sparse else 1
  mutables = {name: jax.tree.map(lambda x: rng.integers(0, experts, x.shape).astype(x.dtype),
                                 flax.core.unfreeze(tree))
              for name, tree in shapes.items() if name != "params" and not name.endswith("_axes")}
  return params, mutables


class Fixture:
  """A t5x model on a tiny config, its random variables, and a jitted reference forward pass
  (the hashmoe module itself, returning logits and the sown "moe" collection)."""

  def __init__(self, config, **model_kwargs):
    self.config = config
    self.model = make_model(config, **model_kwargs)
    self.params, self.mutables = random_variables(self.model)
    module = self.model.module
    self._apply = jax.jit(lambda params, mutables, batch: module.apply(
        {"params": params, **mutables}, batch, deterministic=True, mutable=[MOE_COLLECTION]))

  def reference(self, batch):
    """(float64 log-softmax [batch, length, vocab], logsumexp, Σ sown aux losses)."""
    batch = {k: v for k, v in batch.items() if k != "decoder_loss_weights"}
    logits, state = self._apply(self.params, self.mutables, batch)
    logp, lse = log_softmax64(logits)
    return logp, lse, sown_aux(state)


@pytest.fixture(scope="module")
def switch_lm():
  return Fixture(tiny(routers.Switch(balance_coef=0.5)))


@pytest.fixture(scope="module")
def hash_seq2seq():
  return Fixture(tiny("hash", encoder_decoder=True))


def log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  return x - lse[..., None], lse


def sown_aux(state):
  """Σ of every sown aux_loss leaf of the "moe" collection, read without hashmoe's collect_aux."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(state[MOE_COLLECTION]))
  return sum(float(v) for k, v in flat.items() if k[-1] == "aux_loss")


# --------------------------------------------------------------------------------------------------
# Variables.


def test_t5x_variables_layout():
  module = t5x_models.hashmoe_module(tiny("hash"))
  boxed = jax.eval_shape(lambda key: module.init({"params": key}, make_batch(0),
                                                 deterministic=True), jax.random.PRNGKey(0))
  assert set(boxed) == {"params", "hash_tables", MOE_COLLECTION}
  variables = t5x_models.t5x_variables(boxed)
  assert set(variables) == {"params", "params_axes", "hash_tables", "hash_tables_axes"}
  params = traverse_util.flatten_dict(boxed["params"])
  axes = traverse_util.flatten_dict(flax.core.unfreeze(variables["params_axes"]))
  unboxed = traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]))
  assert set(axes) == {k[:-1] + (k[-1] + "_axes",) for k in params} and set(unboxed) == set(params)
  for key, box in params.items():
    assert isinstance(box, nn.LogicallyPartitioned)
    assert axes[key[:-1] + (key[-1] + "_axes",)].names == tuple(box.names)
    assert unboxed[key] is box.value
  router = ("decoder_1", "moe", "router")
  assert variables["hash_tables"][router[0]][router[1]][router[2]]["table"] is (
      boxed["hash_tables"][router[0]][router[1]][router[2]]["table"])
  assert variables["hash_tables_axes"]["decoder_1"]["moe"]["router"]["table_axes"].names == (
      None, None)
  with pytest.raises(ValueError, match="expected 'params'"):
    t5x_models.t5x_variables({"hash_tables": {}})


def test_models_check_module_and_vocabulary():
  vocab = seqio.PassThroughVocabulary(V, eos_id=1)
  opt = optimizers.OptaxWrapper(optax.sgd(0.1))
  enc_dec = t5x_models.hashmoe_module(tiny(encoder_decoder=True))
  with pytest.raises(TypeError, match="num_encoder_layers=2: use HashMoeEncoderDecoderModel"):
    t5x_models.HashMoeDecoderOnlyModel(enc_dec, vocab, opt)
  with pytest.raises(TypeError, match="wraps a hashmoe.models.EncoderDecoder"):
    t5x_models.HashMoeEncoderDecoderModel(t5x_models.hashmoe_module(tiny()), vocab, vocab, opt)
  with pytest.raises(ValueError, match="vocabulary has 100 ids.*vocab_size is 64"):
    t5x_models.HashMoeDecoderOnlyModel(t5x_models.hashmoe_module(tiny()),
                                       seqio.PassThroughVocabulary(100, eos_id=1), opt)


# --------------------------------------------------------------------------------------------------
# Loss and metrics.


@pytest.mark.parametrize("lnf,z_loss", [(None, 0.0), ("NUM_REAL_TARGET_TOKENS", 1e-3)])
def test_switch_loss_matches_reference(switch_lm, lnf, z_loss):
  """Cross-entropy + z-loss + Switch's balance loss once per weighted token, normalised as t5x
  normalises (a sum for None, a mean over real tokens for NUM_REAL_TARGET_TOKENS)."""
  model = make_model(switch_lm.config, lnf=lnf, z_loss=z_loss)
  batch = make_batch(1)
  loss, metrics = jax.jit(model.loss_fn, static_argnums=2)(switch_lm.params, batch, None)
  logp, lse, aux = switch_lm.reference(batch)
  assert aux > 1e-3  # a missing aux term would show
  targets = batch["decoder_target_tokens"]
  weights = batch["decoder_loss_weights"].astype(np.float64)
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  norm = weights.sum() if lnf else 1.0
  expected = ((weights * (nll + z_loss * lse ** 2)).sum() + aux * weights.sum()) / norm
  np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["loss"].compute()), expected, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["moe/aux_loss"].compute()), aux, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["cross_ent_loss"].compute()),
                             (weights * nll).sum() / norm, rtol=2e-5)
  assert float(metrics["moe/decoder_1/max_over_mean_load"].compute()) >= 1.0
  assert 0.0 <= float(metrics["moe/decoder_1/expert_load_min"].compute()) <= 1.0 / 8


def test_hash_seq2seq_loss_score_and_tables(hash_seq2seq):
  """The encoder-decoder with hash tables: t5x's flax_mutables signatures; the tables come back
  unchanged from loss_fn; the loss and score_batch equal the reference."""
  f, batch = hash_seq2seq, make_batch(2, encoder_decoder=True)
  loss, (metrics, returned) = jax.jit(f.model.loss_fn, static_argnums=2)(
      f.params, batch, None, f.mutables)
  jax.tree.map(np.testing.assert_array_equal, returned, f.mutables)
  logp, _, aux = f.reference(batch)
  assert aux == 0.0  # hash routing has no auxiliary loss
  targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
  token = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(loss), -(token * weights).sum() / weights.sum(), rtol=2e-5)
  assert float(metrics["moe/aux_loss"].compute()) == 0.0
  eval_loss, _ = jax.jit(f.model.eval_fn)(f.params, batch, f.mutables)
  np.testing.assert_allclose(float(eval_loss), float(loss), rtol=1e-6)
  scores, inter = jax.jit(f.model.score_batch, static_argnums=2)(
      f.params, batch, True, f.mutables)
  np.testing.assert_allclose(np.asarray(scores), (token * weights).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(inter["decoder"]["token_scores"][0]), token * weights,
                             rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Partitioning and training through t5x's trainer.


def test_partitioner_mesh_rules_and_layout():
  part = t5x_partitioning.HashMoePartitioner(data=2, expert=4, model=1)
  assert dict(part.mesh.shape) == {"data": 2, "expert": 4, "model": 1}
  assert part.data_partition_spec == P(("data", "expert"))
  assert part.get_data_layout(16).batch_size == 16
  with pytest.raises(ValueError, match="divisible"):
    part.get_data_layout(12)  # 12 rows over 8 data x expert shards
  assert t5x_partitioning.standard_logical_axis_rules()[0] == ("expert", "expert")
  with pytest.raises(ValueError, match="'batch' rule"):
    t5x_partitioning.HashMoePartitioner(logical_axis_rules=[("batch", None)])
  # AdamW's moments are sharded like the parameters they track; the tables are replicated.
  model = make_model(tiny("hash"))
  shapes = input_shapes(False)
  init_ = t5x_utils.TrainStateInitializer(model.optimizer_def, model.get_initial_variables,
                                          shapes, part, {k: jnp.int32 for k in shapes})
  axes = init_.train_state_axes
  assert axes.params["decoder_1"]["moe"]["experts"]["wi"] == P("expert", None, "model")
  assert axes.params["decoder_0"]["mlp"]["wi"] == P(None, "model")
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  (adam,) = [s for s in jax.tree.leaves(axes.param_states, is_leaf=is_adam) if is_adam(s)]
  for moment in (adam.mu, adam.nu):
    assert moment["decoder_1"]["moe"]["experts"]["wo"] == P("expert", "model", None)
  assert axes.flax_mutables["hash_tables"]["decoder_1"]["moe"]["router"]["table"] == P(None, None)


def test_sharded_t5x_steps_match_unsharded_sgd_and_keep_tables():
  """Two t5x train steps (trainer.Trainer with HashMoePartitioner: 8 devices, experts 4-way over
  "expert", hashmoe's all-to-all dispatch) equal two plain SGD steps on unsharded parameters; the
  hash tables stay bit-equal; expert weights stay sharded; the dispatch's all-to-alls run over
  t5x's "expert" axis (groups of 4 devices), not over a mesh of the dispatch's own; t5x's
  partitioned inference scores with the trained state."""
  config = tiny("hash", num_experts=8, dispatch="expert_parallel")
  lr = 0.5
  model = make_model(config, optimizer=optimizers.OptaxWrapper(optax.sgd(lr)))
  part = t5x_partitioning.HashMoePartitioner(data=2, expert=4, model=1)
  shapes = input_shapes(False)
  initializer = t5x_utils.TrainStateInitializer(
      model.optimizer_def, model.get_initial_variables, shapes, part,
      {k: jnp.int32 for k in shapes})
  state = initializer.from_scratch(jax.random.PRNGKey(0))
  tables = jax.device_get(state.flax_mutables)
  params0 = jax.device_get(state.params)
  trainer = t5x_trainer.Trainer(model, state, part, eval_names=[], summary_dir=None,
                                train_state_axes=initializer.train_state_axes,
                                rng=jax.random.PRNGKey(1), learning_rate_fn=lambda step: lr,
                                num_microbatches=None)
  batches = [make_batch(10 + i) for i in range(2)]
  try:
    trainer.train(iter(batches), 2)
    new = trainer.train_state
    lowered = trainer._partitioned_train_step.lower(new, batches[0]).as_text()  # pylint: disable=protected-access
  finally:
    trainer.close()
  groups = set(re.findall(r"all_to_all.{0,400}?replica_groups = dense<([^>]*)>", lowered, re.S))
  assert groups == {"[[0, 1, 2, 3], [4, 5, 6, 7]]"}, groups

  # Reference: the module and a weighted-mean cross-entropy, unsharded, plain SGD.
  reference_module = t5x_models.hashmoe_module(config.replace(
      sparse=dataclasses.replace(config.sparse, dispatch="sorted")))

  @jax.jit
  def sgd_step(params, batch):
    def loss(params):
      b = {k: v for k, v in batch.items() if k != "decoder_loss_weights"}
      logits = reference_module.apply({"params": params, **tables}, b, deterministic=True)
      w = batch["decoder_loss_weights"]
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["decoder_target_tokens"])
      return (nll * w).sum() / w.sum()
    return jax.tree.map(lambda p, g: p - lr * g, params, jax.grad(loss)(params))

  params = params0
  for batch in batches:
    params = sgd_step(params, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               jax.device_get(new.params), jax.device_get(params))
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), jax.device_get(params), params0)
  assert moved["decoder_1"]["moe"]["experts"]["wi"] > 1e-4  # the experts did train
  for old, now in zip(jax.tree.leaves(tables), jax.tree.leaves(jax.device_get(new.flax_mutables))):
    assert old.dtype == now.dtype == np.int32
    np.testing.assert_array_equal(old, now)
  wi = new.params["decoder_1"]["moe"]["experts"]["wi"]
  assert wi.sharding.spec == P("expert", None, "model")
  assert {s.data.shape[0] for s in wi.addressable_shards} == {8 // 4}

  # t5x's partitioned inference (what its evaluator and infer.py run) hands the tables to
  # score_batch as flax_mutables; scores equal the reference's log-likelihoods.
  infer = t5x_utils.get_infer_fn(model.score_batch, batch_size=B,
                                 train_state_axes=initializer.train_state_axes, partitioner=part)
  examples = make_batch(20)
  results = infer(tf.data.Dataset.from_tensor_slices(examples).enumerate(), new)
  scores = np.array([score for _, score in sorted(results, key=lambda r: r[0])])
  logits = reference_module.apply({"params": jax.device_get(new.params), **tables},
                                  {k: v for k, v in examples.items() if k != "decoder_loss_weights"},
                                  deterministic=True)
  logp, _ = log_softmax64(logits)
  token = np.take_along_axis(logp, examples["decoder_target_tokens"][..., None], -1)[..., 0]
  np.testing.assert_allclose(scores, (token * examples["decoder_loss_weights"]).sum(-1),
                             rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Decoding.


def test_decoder_only_greedy_decode_matches_argmax_loop(switch_lm):
  """t5x's temperature_sample with topk=1 through the cache-less tokens_to_logits equals a plain
  loop that appends the argmax of the next-token distribution until EOS; the returned score is
  the summed log-probability of the generated tokens."""
  f = switch_lm
  greedy = functools.partial(decoding.temperature_sample, topk=1, rescale_log_probs=False)
  model = make_model(f.config, decode_fn=greedy)
  eos = model.output_vocabulary.eos_id
  batch = {"decoder_input_tokens": np.zeros((B, L), np.int32)}
  decodes, aux = jax.jit(model.predict_batch_with_aux)(f.params, batch)
  decodes = np.asarray(decodes)
  tokens = np.zeros((B, L), np.int32)  # the loop's decoder inputs: BOS, then its own choices
  generated = np.zeros((B, L), np.int32)
  log_prob, done = np.zeros(B), np.zeros(B, bool)
  for t in range(L):
    logp, _, _ = f.reference({"decoder_input_tokens": tokens})
    choice = logp[:, t].argmax(-1)
    log_prob += np.where(done, 0.0, logp[np.arange(B), t, choice])
    generated[:, t] = np.where(done, 0, choice)
    done |= choice == eos
    if t + 1 < L:
      tokens[:, t + 1] = generated[:, t]
  for row in range(B):
    end = int(np.argmax(generated[row] == eos)) + 1 if (generated[row] == eos).any() else L
    np.testing.assert_array_equal(decodes[row, :end], generated[row, :end])
  np.testing.assert_allclose(np.asarray(aux["scores"]), log_prob, rtol=1e-4, atol=1e-4)


def test_encoder_decoder_beam_scores_equal_score_batch(hash_seq2seq):
  """Beam search (4 beams, no length penalty) through the encoder-once, decoder-per-step
  tokens_to_logits: every returned beam's score is the summed log-probability of its tokens (up
  to and including EOS) under the reference forward pass with that beam as the target."""
  f, beams, rows = hash_seq2seq, 4, B // 4
  batch = make_batch(3, encoder_decoder=True, batch=rows)
  decodes, aux = jax.jit(f.model.predict_batch_with_aux,
                         static_argnames=("num_decodes", "return_all_decodes"))(
      f.params, batch, flax_mutables=f.mutables, decoder_params={"alpha": 0.0},
      num_decodes=beams, return_all_decodes=True)
  decodes, scores = np.asarray(decodes), np.asarray(aux["scores"])
  assert decodes.shape == (rows, beams, L)
  assert np.all(np.diff(scores, axis=1) >= -1e-5)  # beams sorted by increasing score
  eos = f.model.output_vocabulary.eos_id
  flat = decodes.reshape(B, L)
  after_eos = (np.cumsum(flat == eos, axis=1) - (flat == eos)) > 0
  targets = np.where(after_eos, 0, flat).astype(np.int32)
  scored = {"encoder_input_tokens": np.repeat(batch["encoder_input_tokens"], beams, axis=0),
            "decoder_target_tokens": targets,
            "decoder_input_tokens": np.concatenate([np.zeros((B, 1), np.int32), targets[:, :-1]],
                                                   1),
            "decoder_loss_weights": (targets > 0).astype(np.int32)}
  logp, _, _ = f.reference(scored)
  token = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose((token * scored["decoder_loss_weights"]).sum(-1), scores.reshape(B),
                             rtol=1e-4, atol=1e-4)


def test_undecodable_hash_keys_are_refused():
  model = make_model(tiny(routers.Hash(key="oracle_future")))
  with pytest.raises(ValueError, match="oracle_future"):
    model.predict_batch({}, {"decoder_input_tokens": np.zeros((1, 4), np.int32)})


# --------------------------------------------------------------------------------------------------
# Hash tables for a fresh run.


@pytest.fixture(scope="module")
def fake_tasks():
  """Registered seqio tasks over random ids with PassThrough vocabularies (no files, no
  tokenizer): {vocab size: (lm task, seq2seq task)}."""
  names = {}
  for vocab_size in (V, 512, 8008):
    vocab = seqio.PassThroughVocabulary(vocab_size, eos_id=1)

    def dataset_fn(split, shuffle_files, seed=None, vocab_size=vocab_size):
      del shuffle_files, seed
      rng = np.random.default_rng(0 if split == "train" else 1)
      rows = [rng.zipf(1.3, 20).clip(2, vocab_size - 1).astype(np.int32) for _ in range(16)]
      return tf.data.Dataset.from_tensor_slices({"inputs": np.stack(rows),
                                                 "targets": np.stack(rows[::-1])})

    pair = []
    for shape, keys in (("lm", ("targets",)), ("seq2seq", ("inputs", "targets"))):
      name = f"hashmoe_t5x_test_{vocab_size}_{shape}"
      if name not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            name, source=seqio.FunctionDataSource(dataset_fn, splits=("train", "validation")),
            output_features={k: seqio.Feature(vocab, add_eos=True, dtype=tf.int32) for k in keys},
            preprocessors=[seqio.preprocessors.append_eos])
      pair.append(name)
    names[vocab_size] = tuple(pair)
  return names


def test_hash_tables_built_loaded_and_checked(fake_tasks, tmp_path):
  config = tiny("hash", num_experts=4)
  lm_task = fake_tasks[V][0]
  assert t5x_data.hash_tables(tiny("switch"), task=lm_task, tables="balanced") is None
  assert t5x_data.hash_tables(config, task=lm_task, tables=None) is None
  built = t5x_data.hash_tables(config, task=lm_task, tables="balanced", model_dir=str(tmp_path))
  (table,) = built["default"]
  assert table.kind == "balanced" and table.table.shape == (V,)
  # Balanced (paper Sec. 3.1): the most frequent token goes to the first, then lightest, bucket;
  # counted independently here from the task's training split.
  counts = np.zeros(V, np.int64)
  for ex in seqio.get_mixture_or_task(lm_task).get_dataset(
      {"targets": 64}, split="train", shuffle=False).as_numpy_iterator():
    np.add.at(counts, ex["targets"], 1)
  load = np.zeros(4, np.int64)
  np.add.at(load, table.table, counts)
  assert load.max() - load.min() <= counts.max()  # greedy balance bound
  written = tmp_path / "hash_tables" / "balanced.npz"
  loaded = t5x_data.hash_tables(config, task=lm_task, tables=str(written))
  np.testing.assert_array_equal(loaded["default"][0].table, table.table)
  with pytest.raises(ValueError, match="embeddings"):
    t5x_data.hash_tables(config, task=lm_task, tables="clustered")
  with pytest.raises(ValueError, match="bind hash_tables.task"):
    t5x_data.hash_tables(config, tables="balanced")
  with pytest.raises(ValueError, match="not registered"):
    t5x_data.task_vocabulary("no_such_task_for_hashmoe")
  with pytest.raises(ValueError, match="not 'inputs'"):
    t5x_data.task_vocabulary(lm_task, "inputs")
  assert t5x_data.task_vocabulary(fake_tasks[V][1], "inputs").vocab_size == V


# --------------------------------------------------------------------------------------------------
# gin files.


CONFIGS = REPO / "configs"
T5X_MODEL_FILES = sorted(p.relative_to(CONFIGS).as_posix()
                         for p in (CONFIGS / "t5x" / "models").glob("*/*.gin"))


def test_gin_files_document_themselves_and_pair_up():
  """Every configs/t5x file opens with the header hashmoe's configs use; tiny and paper sizes
  offer the same model shapes."""
  files = sorted((CONFIGS / "t5x").rglob("*.gin"))
  assert len(files) == 16
  for path in files:
    header = path.read_text().split("\n\n")[0]
    for field in ("What:", "Where from:", "Deviations", "Macros"):
      assert field in header, (path, field)
  names = {size: {p.name.split("_", 1)[0] + "_" + p.name.rsplit("_", 1)[1]
                  for p in (CONFIGS / "t5x" / "models" / size).glob("*.gin")}
           for size in ("tiny", "paper")}
  assert names["tiny"] == names["paper"] == {f"{m}_{s}.gin" for m in ("dense", "switch", "hash")
                                             for s in ("lm", "seq2seq")}


@gin.configurable(module="test_t5x")
def probe(model=gin.REQUIRED, lengths=None):
  return model, lengths


@pytest.fixture
def t5x_gin(monkeypatch):
  """gin as `python -m t5x.train` parses it: t5x's parse_gin_flags, and `__main__.train`."""
  import t5x.train as t5x_train  # pylint: disable=g-import-not-at-top
  from t5x import gin_utils  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys.modules["__main__"], "train", t5x_train.train, raising=False)
  gin.clear_config()

  def parse(files, bindings):
    gin_utils.parse_gin_flags([str(REPO)], files, bindings + [
        "test_t5x.probe.model = %MODEL", "test_t5x.probe.lengths = %TASK_FEATURE_LENGTHS"],
        finalize_config=False)
    return probe()

  yield parse
  gin.clear_config()


def closed_form_count(c: models.TransformerConfig) -> int:
  """Parameters of the pre-norm transformer `c` describes, counted by hand: tied token embedding,
  learned positions per stack, q/k/v/o and FFNs without biases, LayerNorm scale + bias before
  every sublayer and after each stack; a sparse FFN is E stacked FFNs plus a Switch router's
  d x E matrix (none for hash)."""
  d, inner, norm = c.d_model, c.num_heads * c.head_dim, 2 * c.d_model
  attention = 4 * d * inner
  sparse = set(c.sparse.layers) if c.sparse else set()
  experts = c.sparse.num_experts if c.sparse else 1
  router = d * experts if c.sparse and not c.sparse.router.uses_tables else 0
  total = c.vocab_size * d + c.max_len * d + norm
  for i in range(c.num_layers):
    cross = attention + norm if c.is_encoder_decoder else 0
    ffn = (experts * 2 * d * c.d_ff + router) if i in sparse else 2 * d * c.d_ff
    total += attention + norm + cross + ffn + norm
  if c.is_encoder_decoder:
    total += c.max_len * d + norm + c.num_encoder_layers * (attention + 2 * d * c.d_ff + 2 * norm)
  return total


@pytest.mark.parametrize("path", T5X_MODEL_FILES)
def test_gin_model_files_build_with_t5x(path, t5x_gin, fake_tasks, tmp_path):
  size, name = path.split("/")[-2], path.split("/")[-1][:-len(".gin")]
  shape = "seq2seq" if name.endswith("seq2seq") else "lm"
  vocab_size = 8008 if size == "paper" else 512
  task = fake_tasks[vocab_size][0 if shape == "lm" else 1]
  model, lengths = t5x_gin(
      [f"configs/{path}", "configs/t5x/runs/pretrain.gin"],
      [f"MODEL_DIR = '{tmp_path}'", f"TASK = '{task}'", "SEQ_LEN = 16",
       f"hashmoe.models.TransformerConfig.vocab_size = {vocab_size}"])
  config = model.module.config
  expected_cls = (t5x_models.HashMoeEncoderDecoderModel if shape == "seq2seq"
                  else t5x_models.HashMoeDecoderOnlyModel)
  assert type(model) is expected_cls
  assert lengths == ({"inputs": 16, "targets": 16} if shape == "seq2seq" else {"targets": 16})
  assert config.is_encoder_decoder == (shape == "seq2seq")
  assert config.d_model == (1024 if size == "paper" else 64)
  router = None if name.startswith("dense") else name.split("_")[0]
  assert (config.sparse.router.name if config.sparse else None) == router
  assert model._loss_normalizing_factor == "NUM_REAL_TARGET_TOKENS"  # pylint: disable=protected-access
  variables = jax.eval_shape(functools.partial(
      model.get_initial_variables,
      input_shapes=input_shapes(config.is_encoder_decoder, batch=2, length=16)),
      jax.random.PRNGKey(0))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"]))
  assert count == closed_form_count(config)
  if path == "t5x/models/paper/dense_seq2seq.gin":
    assert count == 219_043_840  # the paper's Baseline (222M in ParlAI, which adds biases)
  if router == "hash":
    assert variables["hash_tables"]["decoder_1" if size == "tiny" else "decoder_6"]["moe"][
        "router"]["table"].shape == (1, vocab_size)
    assert (tmp_path / "hash_tables" / "balanced.npz").is_file()  # built from the task


def test_gin_run_files_bind_partitioner_trainer_and_optimizer(t5x_gin, fake_tasks, tmp_path):
  task = fake_tasks[512][0]
  model, lengths = t5x_gin(
      ["configs/t5x/runs/pretrain.gin", "configs/t5x/models/tiny/switch_16_lm.gin"],
      [f"MODEL_DIR = '{tmp_path}'", f"TASK = '{task}'", "EXPERT_PARALLEL = 4", "SEQ_LEN = 32",
       "hashmoe.models.TransformerConfig.vocab_size = 512"])
  assert lengths == {"targets": 32}  # whichever order the run and model files come in
  partitioner = gin.query_parameter("train_script.train.partitioner").scoped_configurable_fn()
  assert isinstance(partitioner, t5x_partitioning.HashMoePartitioner)
  assert dict(partitioner.mesh.shape) == {"data": 2, "expert": 4, "model": 1}
  trainer_cls = gin.query_parameter("train_script.train.trainer_cls").scoped_configurable_fn
  assert trainer_cls.__name__ == "Trainer"  # t5x's plain trainer, not MoeTrainer
  assert isinstance(model.optimizer_def, optimizers.OptaxWrapper)
  assert model.module.config.sparse.num_experts == 16
  assert gin.query_parameter("USE_CACHED_TASKS/macro.value") is False  # streaming: no seqio cache
  # A streamed task (DATA_SOURCE's default): no tf.data iterator that t5x could save.
  assert gin.query_parameter("DATA_SOURCE/macro.value") == "streaming"
  save_dataset = gin.query_parameter("utils.SaveCheckpointConfig.save_dataset")
  assert save_dataset.scoped_configurable_fn() is False


# --------------------------------------------------------------------------------------------------
# End to end: python -m t5x.train.


def subprocess_env(**extra):
  """This checkout first on the path, then whatever made t5x importable here (a hand install may be
  a PYTHONPATH entry)."""
  path = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  return {**os.environ, "PYTHONPATH": path, **extra}


def test_t5x_train_end_to_end_and_restore(tmp_path, t5x_gin):
  """`python -m t5x.train` of configs/t5x/runs/cpu_tiny.gin (tiny balanced hash LM, embedded
  corpus, 8 CPU devices with experts 4-way) writes a checkpoint with a finite loss; restoring it
  through t5x's own checkpoint manager into a model configured with random tables gives back the
  balanced table the run wrote to MODEL_DIR/hash_tables."""
  model_dir = tmp_path / "run"
  cmd = [sys.executable, "-m", "t5x.train", "--gin_file=configs/t5x/runs/cpu_tiny.gin",
         f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=4",
         "--gin.EVAL_PERIOD=4", "--gin.LOG_PERIOD=2", "--gin.EXPERT_PARALLEL=4",
         # No validation pass (one compilation less); t5x's train() is `__main__.train` here.
         "--gin.__main__.train.train_eval_dataset_cfg=None"]
  done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                        timeout=300)
  log = done.stdout + done.stderr
  assert done.returncode == 0, log[-4000:]
  losses = [float(x) for x in re.findall(r"collection=train .*?\bloss=([-+.\deE]+|nan|inf)", log)]
  assert losses and all(math.isfinite(x) for x in losses), losses
  assert (model_dir / "checkpoint_4" / "state").is_dir()
  written = hashing.HashTable.load(model_dir / "hash_tables" / "balanced.npz")

  model, _ = t5x_gin(
      ["configs/t5x/runs/cpu_tiny.gin"],
      [f"MODEL_DIR = '{tmp_path / 'unused'}'", "hm_data.hash_tables.tables = None",
       "EXPERT_PARALLEL = 4"])
  shapes = input_shapes(False, batch=8, length=64)
  part = t5x_partitioning.HashMoePartitioner(data=2, expert=4)
  initializer = t5x_utils.TrainStateInitializer(
      model.optimizer_def, model.get_initial_variables, shapes, part,
      {k: jnp.int32 for k in shapes})
  assert model.module.hash_tables is None  # a fresh start would use the routers' random tables
  restore = t5x_utils.RestoreCheckpointConfig(path=str(model_dir), mode="latest")
  _, paths = t5x_utils.get_first_valid_restore_config_and_paths([restore])
  state, _ = t5x_utils.create_checkpoint_manager_and_restore(
      initializer, part, restore, paths[0], jax.random.PRNGKey(0), model_dir=str(model_dir),
      use_orbax=True)
  assert int(state.step) == 4
  restored = np.asarray(jax.device_get(
      state.flax_mutables["hash_tables"]["decoder_1"]["moe"]["router"]["table"]))
  np.testing.assert_array_equal(restored[0], written.table)


def train_losses(log):
  """{step: loss} of t5x's train summaries in a run's log (clu's LoggingWriter lines)."""
  return {int(step): float(loss) for step, loss in re.findall(
      r"\[(\d+)\] collection=train .*?\bloss=([-+.\deE]+|nan|inf)", log)}


def test_t5x_restarted_on_prepared_data_reads_the_uninterrupted_batches(tmp_path):
  """The restart guarantee under t5x (DATA_SOURCE = 'prepared'): `hashmoe prepare --tfrecord` of a
  generated text folder, then `python -m t5x.train` of configs/t5x/runs/cpu_tiny.gin on it for 4
  steps, checkpointing every 2 (t5x saves its tf.data iterator with each: save_dataset). Its twin
  is the same run killed after step 4 before checkpoint 4 was written (that checkpoint deleted)
  and started again with the same command: t5x restores checkpoint 2 with the iterator, and the
  twin's losses at steps 3 and 4 equal the uninterrupted run's: it trained on the same batches
  (a pipeline read from its start would give steps 3 and 4 the batches of steps 1 and 2)."""
  from textdata import write_text_folder  # pylint: disable=g-import-not-at-top
  texts = write_text_folder(tmp_path / "texts", files=6, paragraphs=30)
  root, model_dir = tmp_path / "prepared", tmp_path / "run"
  env = subprocess_env(HASHMOE_CACHE=str(tmp_path / "cache"))
  task = ["--gin_file=configs/tasks/text_dir.gin", f"--gin.TEXT_DIR='{texts}'",
          "--gin.VOCAB_SIZE=320", f"--gin.PREPARED_DIR='{root}'"]
  prepare = [sys.executable, "-m", "hashmoe.cli", "prepare", "--gin_file=configs/runs/cpu_tiny.gin",
             *task, "--num_shards=2", "--splits=train", "--workers=1", "--no_progress",
             "--tfrecord"]
  done = subprocess.run(prepare, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
  assert '"tfrecord": {"complete": true' in done.stdout
  train = [sys.executable, "-m", "t5x.train", "--gin_file=configs/t5x/runs/cpu_tiny.gin", *task,
           f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=2",
           "--gin.EVAL_PERIOD=2", "--gin.LOG_PERIOD=1", "--gin.EXPERT_PARALLEL=4",
           "--gin.DATA_SOURCE='prepared'", "--gin.__main__.train.train_eval_dataset_cfg=None"]

  def run():
    done = subprocess.run(train, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return log

  uninterrupted = train_losses(run())
  assert sorted(uninterrupted) == [1, 2, 3, 4], uninterrupted
  assert all(math.isfinite(x) for x in uninterrupted.values())
  saved = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.glob("checkpoint_2/**/*")
                 if "train_ds" in p.name)
  assert saved, "checkpoint 2 holds no tf.data iterator (save_dataset)"
  record = json.loads((model_dir / t5x_data.DATA_FILE).read_text())
  assert record["task"] == "hashmoe_text_lm_prepared_len64"

  shutil.rmtree(model_dir / "checkpoint_4")  # Killed after step 4, before its checkpoint.
  restarted = train_losses(run())
  assert sorted(restarted) == [3, 4], restarted
  assert restarted == {step: uninterrupted[step] for step in (3, 4)}
  assert restarted[3] != uninterrupted[1] or restarted[4] != uninterrupted[2]
