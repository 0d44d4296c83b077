"""Hash routing precomputed in the input pipeline (`hashmoe.host_routing`,
`expert_grouping.row_routing`, `expert_grouping.assemble_sorted_assignments`).

References: a per-row Python loop (ranks and counts), `expert_grouping.precompute_routing` of the
global batch and the experts' own stable argsort (the assembled permutation), the model run without
host routing (logits, losses: the same numbers), and numpy bincounts of the routed tokens (the
logged loads). Two processes over gloo use host routing in tests/test_prepared_multihost.py.
"""
from __future__ import annotations

import json
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hashmoe import (expert_grouping, experts, hashing, host_routing, models, routers, routing,
                     sharding)
from hashmoe import train as T
from hashmoe.data import pipeline as pipeline_lib
from hashmoe.layers import MOE_COLLECTION
from test_train import NumpyPipeline, run, saved_params

pytestmark = pytest.mark.usefixtures("compilation_cache")

E = 6


def random_tables(layout, rng, key_space=40):
  """One hash table, a MultiHash set of 3, or a top-k table of k=2; with E=6 experts over few keys
  some experts get nothing in a row, which the offsets must survive."""
  if layout == "hash":
    return hashing.HashTable("random", rng.integers(0, E, key_space), E, key_space)
  if layout == "multihash":
    return tuple(hashing.HashTable("random", rng.integers(0, E, key_space), E, key_space)
                 for _ in range(3))
  table = np.argsort(rng.random((key_space, E)), axis=1)[:, :2]
  return hashing.HashTable(hashing.TOPK_KIND, table, E, key_space)


def columns_of(tables):
  if isinstance(tables, hashing.HashTable) and tables.table.ndim == 2:
    return tables.table.T
  tables = tables if isinstance(tables, tuple) else (tables,)
  return np.stack([t.table for t in tables])


def loop_row_routing(columns, keys):
  """ranks and counts by walking each row's tokens in order."""
  rows, length = keys.shape
  ranks = np.zeros((rows, columns.shape[0], length), np.int64)
  counts = np.zeros((rows, columns.shape[0], E), np.int64)
  for b in range(rows):
    for c in range(columns.shape[0]):
      for j in range(length):
        e = columns[c, keys[b, j]]
        ranks[b, c, j] = counts[b, c, e]
        counts[b, c, e] += 1
  return ranks, counts


# --------------------------------------------------------------------------------------------------
# Row routing and its assembly.


@pytest.mark.parametrize("layout", ["hash", "multihash", "topk"])
def test_rows_routed_per_host_assemble_into_the_global_stable_sort(layout):
  rng = np.random.default_rng(["hash", "multihash", "topk"].index(layout))
  tables = random_tables(layout, rng)
  columns = columns_of(tables)
  keys = rng.integers(0, 40, (8, 9))
  keys[2] = 5  # a row whose tokens all go to one expert per column
  # Four "hosts" of two rows each route their own rows; their pieces concatenate in row order.
  pieces = [expert_grouping.row_routing(tables, keys[h * 2:(h + 1) * 2]) for h in range(4)]
  ranks = np.concatenate([p.ranks for p in pieces])
  counts = np.concatenate([p.counts for p in pieces])
  want_ranks, want_counts = loop_row_routing(columns, keys)
  np.testing.assert_array_equal(ranks, want_ranks)
  np.testing.assert_array_equal(counts, want_counts)
  assert ranks.dtype == counts.dtype == np.int32

  multihash = layout == "multihash"
  expert_index = columns[:, keys.reshape(-1)].T  # [tokens, H]
  # Assembled on 8 devices with the rows sharded, as the step gets them.
  rows = sharding.batch_sharding(sharding.make_mesh())
  assemble = jax.jit(lambda index, r, c: expert_grouping.assemble_sorted_assignments(
      index, expert_grouping.RowRouting(r, c), num_experts=E, multihash=multihash))
  got = assemble(jax.device_put(expert_index, rows), jax.device_put(ranks, rows),
                 jax.device_put(counts, rows))
  want = expert_grouping.precompute_routing(tables, keys)
  for name, g, w in zip(want._fields, got, want):
    np.testing.assert_array_equal(np.asarray(g), w, err_msg=name)
    assert g.dtype == jnp.int32, name
  # ... and it is the experts' own stable argsort of these assignments.
  assign = experts._assignments(jnp.asarray(expert_index), jnp.ones(expert_index.shape), E,
                                columns.shape[0] if multihash else 1)
  sort = experts._argsort(assign)
  np.testing.assert_array_equal(np.asarray(got.permutation), np.asarray(sort.perm))
  np.testing.assert_array_equal(np.asarray(got.inverse_permutation), np.asarray(sort.inverse))
  np.testing.assert_array_equal(np.asarray(got.group_sizes), np.asarray(sort.sizes))
  assert bool(experts.sort_matches(assign.key, *got))


def test_row_routing_features_and_shape_errors():
  names = expert_grouping.row_routing_feature_names("decoder_1/moe/router")
  assert names == ("hash_routing:decoder_1/moe/router:ranks",
                   "hash_routing:decoder_1/moe/router:counts")
  pieces = expert_grouping.RowRouting(np.zeros((2, 1, 4), np.int32), np.zeros((2, 1, E), np.int32))
  batch = {"decoder_input_tokens": np.zeros((2, 4)), names[0]: pieces.ranks,
           names[1]: pieces.counts}
  assert list(expert_grouping.row_routing_from_features(batch)) == ["decoder_1/moe/router"]
  with pytest.raises(ValueError, match="but not 'hash_routing:decoder_1/moe/router:counts'"):
    expert_grouping.row_routing_from_features({names[0]: pieces.ranks})
  with pytest.raises(ValueError, match="free of ':'"):
    expert_grouping.row_routing_feature_names("a:b")
  index = np.zeros((8, 1), np.int32)
  with pytest.raises(ValueError, match=r"counts must be int\[rows, H, E\] = \(2, 1, 5\)"):
    expert_grouping.assemble_sorted_assignments(index, pieces, num_experts=5, multihash=False)
  with pytest.raises(ValueError, match=r"expert_index must be int\[tokens, H\] = \(8, 1\)"):
    expert_grouping.assemble_sorted_assignments(index[:6], pieces, num_experts=E, multihash=False)
  with pytest.raises(ValueError, match="keys must be int"):
    expert_grouping.row_routing_of_columns(np.zeros((1, 4), np.int32), E, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="outside"):
    expert_grouping.row_routing_of_columns(np.zeros((1, 4), np.int32), E, np.full((1, 3), 4))


# --------------------------------------------------------------------------------------------------
# Models: the routers assemble the batch's routing and the experts sort nothing.

V, L = 48, 12


def packed_batch(rng, rows=8, encoder=False, predicted=False):
  """Packed LM rows (segment ids, no positions: the model derives them from the segments) with
  padding at the end of each row."""
  segments = np.repeat(np.arange(1, 4), 4)[None].repeat(rows, 0)
  segments[:, -2:] = 0
  targets = np.where(segments > 0, rng.integers(1, V, (rows, L)), 0)
  batch = {"decoder_input_tokens": rng.integers(0, V, (rows, L)), "decoder_target_tokens": targets,
           "decoder_segment_ids": segments}
  if encoder:
    batch.update(encoder_input_tokens=rng.integers(1, V, (rows, L)),
                 encoder_segment_ids=segments, encoder_positions=np.tile(np.arange(L), (rows, 1)))
  if predicted:
    batch["predicted_ids"] = rng.integers(0, V, (rows, L))
  return {k: np.asarray(v, np.int32) for k, v in batch.items()}


@pytest.mark.parametrize("key", hashing.KEYS)
def test_host_keys_are_the_keys_the_model_hands_its_routers(key):
  batch = packed_batch(np.random.default_rng(3), encoder=True, predicted=True)
  del batch["decoder_segment_ids"]  # decoder: no segments, positions 0..L-1; encoder: given
  batch["decoder_positions"] = np.tile(np.arange(L, dtype=np.int32), (8, 1)) % 5  # packed rows
  tokens = jnp.asarray(batch["decoder_input_tokens"])
  positions = models._positions(batch, "decoder", tokens.shape)
  decoder = models._decoder_features(batch, tokens, positions, tokens > 0)
  stacks = {"decoder": decoder}
  if key not in ("oracle_future", "predicted_future"):  # the encoder has no next tokens
    enc = jnp.asarray(batch["encoder_input_tokens"])
    stacks["encoder"] = routing.RouterFeatures(
        token_ids=enc, positions=models._positions(batch, "encoder", enc.shape),
        segment_ids=jnp.asarray(batch["encoder_segment_ids"]))
  for stack, features in stacks.items():
    want = hashing.routing_keys(key, token_ids=features.token_ids, positions=features.positions,
                                segment_ids=features.segment_ids, targets=features.targets,
                                predicted_ids=features.predicted_ids, key_space=V)
    got = hashing.routing_keys(key, key_space=V, **host_routing.stack_features(batch, stack))
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, np.asarray(want), err_msg=stack)
  # Segments without positions: the model's positions_from_segments, in numpy.
  segments = packed_batch(np.random.default_rng(4))["decoder_segment_ids"]
  np.testing.assert_array_equal(host_routing._positions_from_segments(segments),
                                np.asarray(models.positions_from_segments(jnp.asarray(segments))))


def test_routers_assemble_the_rows_of_their_own_path():
  """Top-k here (the encoder-decoder model below is MultiHash): the router takes the entry named
  by its module path, assembles it against its own expert_index, and ignores other paths."""

  class Holder(nn.Module):
    @nn.compact
    def __call__(self, hidden, features):
      return routing.HashTopKRouter(4, 2, key_space=V, name="router")(hidden, features,
                                                                       deterministic=True)

  ids = np.random.default_rng(5).integers(0, V, (4, 6))
  hidden = jnp.ones((24, 8))
  holder = Holder()
  variables = holder.init(jax.random.key(0), hidden, routing.RouterFeatures(jnp.asarray(ids)))
  table = hashing.HashTable(hashing.TOPK_KIND, np.asarray(
      variables["hash_tables"]["router"]["table"]), 4, V)
  pieces = expert_grouping.row_routing(table, ids)
  apply = jax.jit(lambda rows: holder.apply(variables, hidden, routing.RouterFeatures(
      jnp.asarray(ids), row_routing=rows)).sorted_assignments)
  got = apply({"router": pieces, "decoder_0/moe/router": pieces})
  for g, w in zip(got, expert_grouping.precompute_routing(table, ids)):
    np.testing.assert_array_equal(np.asarray(g), w)
  assert apply({"decoder_0/moe/router": pieces}) is None


def test_layers_with_one_table_share_one_computation_and_its_arrays():
  columns = np.random.default_rng(2).integers(0, 4, (1, V)).astype(np.int32)
  other = (columns + 1) % 4
  layers = [host_routing.HashLayer(f"decoder_{i}/moe/router", "decoder", "token", c, 4)
            for i, c in enumerate([columns, columns, other])]
  host = host_routing.HostRouting(layers, vocab_size=V, max_len=L)
  routed = host(packed_batch(np.random.default_rng(0)))
  ranks = [routed[expert_grouping.row_routing_feature_names(layer.path)[0]] for layer in layers]
  assert ranks[0] is ranks[1] and ranks[2] is not ranks[0]
  counts = host.expert_counts(routed)
  np.testing.assert_array_equal(counts["decoder_0"], counts["decoder_1"])
  assert counts["decoder_0"].tolist() != counts["decoder_2"].tolist()


def test_an_encoder_decoder_takes_its_routing_from_the_host_and_computes_the_same():
  """MultiHash on the bigram in an encoder and a decoder layer, each keyed on its own stack's
  (packed) features: the same logits, and the experts used the assembled sorts."""
  layers = ["encoder_0", "decoder_0"]
  sparse = models.SparseConfig(router=routers.Hash(num_hashes=2, key="bigram"), num_experts=4,
                               layers=(0,), encoder_layers=(0,))
  config = models.tiny_config(vocab_size=V, max_len=L, num_layers=1, num_encoder_layers=1,
                              d_model=16, d_ff=32, num_heads=2, head_dim=8, sparse=sparse)
  model = models.build_model(config)
  batch = packed_batch(np.random.default_rng(7), encoder=True)
  variables = jax.jit(model.init)(jax.random.key(0), batch)
  constants = {k: v for k, v in variables.items() if k != "params"}
  host = host_routing.plan(config, constants)
  routed = host(batch)
  paths = [f"{layer}/moe/router" for layer in layers]
  assert sorted(layer.path for layer in host.layers) == sorted(paths)
  assert all(n in routed for p in paths for n in expert_grouping.row_routing_feature_names(p))

  @jax.jit
  def forward(b):
    logits, state = model.apply(variables, b, mutable=[MOE_COLLECTION])
    return logits, models.collect_aux(state)[1]

  want_logits, want_moe = forward(batch)
  got_logits, got_moe = forward(routed)
  np.testing.assert_array_equal(np.asarray(got_logits), np.asarray(want_logits))
  loads = host.expert_counts(routed)
  assert sorted(got_moe) == sorted(loads) == sorted(layers)
  for layer, metrics in got_moe.items():
    # The experts found the assembled routing to be their stable sort, and used it.
    assert float(metrics["sort_precomputed"]) == 1.0, layer
    assert "sort_precomputed" not in want_moe[layer]
    np.testing.assert_array_equal(np.asarray(metrics["group_sizes"]),
                                  np.asarray(want_moe[layer]["group_sizes"]))
    np.testing.assert_array_equal(loads[layer], np.asarray(metrics["group_sizes"]))


def test_layers_that_cannot_take_host_routing_sort_on_device_and_say_so_once(caplog):
  host_routing._LOGGED.clear()
  caplog.set_level(logging.INFO, logger="hashmoe.host_routing")
  batch = packed_batch(np.random.default_rng(0))

  def constants(config):
    init_batch = dict(batch, predicted_ids=batch["decoder_input_tokens"])
    variables = jax.eval_shape(lambda: models.build_model(config).init(
        jax.random.key(0), init_batch))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                        {k: v for k, v in variables.items() if k != "params"})

  def config(router, **sparse):
    return models.tiny_config(vocab_size=V, max_len=L, num_encoder_layers=0, sparse=models.
                              SparseConfig(router=router, num_experts=4, layers=(1,), **sparse))

  switch = config("switch")
  assert host_routing.plan(switch, constants(switch)) is None
  assert host_routing.plan(switch, constants(switch)) is None
  parallel = config("hash", dispatch="expert_parallel")
  assert host_routing.plan(parallel, constants(parallel)) is None
  einsum = config("hash", dispatch="einsum")
  assert host_routing.plan(einsum, constants(einsum)) is None
  # A predicted-future key without predictions in the batch: that layer sorts on device.
  predicted = config(routers.Hash(key="predicted_future"))
  host = host_routing.plan(predicted, constants(predicted))
  for _ in range(3):
    assert not any(k.startswith(expert_grouping.ROW_ROUTING_PREFIX) for k in host(batch))
  messages = [r.getMessage() for r in caplog.records]
  assert sum("router 'switch' routes on what the model computes" in m for m in messages) == 1
  assert sum("dispatch 'expert_parallel' takes no precomputed sort" in m for m in messages) == 1
  assert sum("dispatch 'einsum' takes no precomputed sort" in m for m in messages) == 1
  assert sum("needs the batch feature 'predicted_ids'" in m for m in messages) == 1
  # A bad batch is refused with the trainer's message, before any key is computed.
  bad = dict(batch, decoder_input_tokens=batch["decoder_input_tokens"] + V)
  with pytest.raises(ValueError, match=rf"decoder_input_tokens has .* outside \[0, {V}\)"):
    host(bad)


def test_mapped_batches_keep_the_position_and_close():
  class Batches:
    closed = False

    def __init__(self):
      self.i = 0

    def __next__(self):
      self.i += 1
      return {"x": np.array([self.i])}

    def position(self):
      return {"next": self.i}

    def close(self):
      Batches.closed = True

  class Pipeline:
    def train_batches(self, position):
      return Batches()

  batches = pipeline_lib.train_batches(Pipeline(), None, lambda b: {**b, "y": b["x"] * 10})
  assert next(batches)["y"].tolist() == [10] and next(batches)["y"].tolist() == [20]
  assert batches.position() == {"next": 2}
  batches.close()
  assert Batches.closed


# --------------------------------------------------------------------------------------------------
# A run: the same losses with the switch on and off, and the loads logged before each step.


def test_training_with_and_without_host_routing_gives_the_same_losses_and_logs_the_loads(
    tmp_path, caplog):
  sparse = models.SparseConfig(router=routers.Hash(num_hashes=2, key="prev_token"),
                               num_experts=4, layers=(0,))
  # One layer: each run compiles a train and an eval step, most of this test's time.
  config = models.tiny_config(vocab_size=64, num_layers=1, num_encoder_layers=0, sparse=sparse,
                              max_len=16)
  steps = 2
  for on in (True, False):
    run(tmp_path / str(on), steps, config=config, input_pipeline=NumpyPipeline(),
        precompute_routing=on, eval_period=steps, checkpoint_period=steps)
  records = {on: [json.loads(line) for line in open(tmp_path / str(on) / "metrics.jsonl")]
             for on in (True, False)}
  evals = {on: json.loads(open(tmp_path / str(on) / "eval.jsonl").readline())
           for on in (True, False)}
  # Exactly equal, not merely close: the assembled permutation is the argsort's, bit for bit, and
  # from there the two programs run the same operations on the same values.
  assert [r["loss"] for r in records[True]] == [r["loss"] for r in records[False]]
  assert evals[True]["loss"] == evals[False]["loss"]

  # The loads logged before each step: a numpy bincount of the batch's routed tokens (each token
  # once per MultiHash table, padding included, keyed on the previous token), which the run that
  # sorted on device also reports (its experts' group sizes).
  _, constants = saved_params(tmp_path / "True", steps)
  table = np.asarray(constants["hash_tables"]["decoder_0"]["moe"]["router"]["table"])
  for step, (on, off) in enumerate(zip(records[True], records[False])):
    inputs = NumpyPipeline().batch(step)["decoder_input_tokens"]
    previous = np.concatenate([np.zeros_like(inputs[:, :1]), inputs[:, :-1]], axis=1)
    want = sum(np.bincount(table[m][previous].ravel(), minlength=4) for m in range(2))
    moe, moe_off = on["moe"]["decoder_0"], off["moe"]["decoder_0"]
    assert moe["sort_precomputed"] == 1.0 and "sort_precomputed" not in moe_off
    assert moe["host_expert_counts"] == want.tolist() == moe_off["group_sizes"]
    assert moe["host_load_max"] == want.max()
    assert moe["host_load_mean"] == want.sum() / 4
    assert moe["host_load_max_over_mean"] == pytest.approx(want.max() / (want.sum() / 4))
    assert "host_expert_counts" not in moe_off

  # `hashmoe eval` honours the switch: its batches carry their routing (and its eval step is the
  # run's program, which the compilation cache has). The plan is logged once per process.
  host_routing._LOGGED.clear()
  caplog.clear()
  caplog.set_level(logging.INFO, logger="hashmoe.host_routing")
  evaluated = T.evaluate(model_dir=str(tmp_path / "True"), model_config=config, task="numpy",
                         batch_size=8, seq_len=16, eval_batches=2, mesh=sharding.make_mesh(),
                         precompute_routing=True, input_pipeline=NumpyPipeline())
  assert evaluated["loss"] == evals[True]["loss"]
  assert any("the input pipeline groups the tokens of decoder_0/moe/router" in r.getMessage()
             for r in caplog.records)


def test_host_load_record_reads_the_logged_step_and_the_peak_of_the_window():
  steps = [{"decoder_1": np.array([4, 4, 4, 4])}, {"decoder_1": np.array([10, 2, 2, 2])},
           {"decoder_1": np.array([5, 3, 4, 4])}]
  record = host_routing.host_load_record(steps)["decoder_1"]
  assert record == {"host_expert_counts": [5, 3, 4, 4], "host_load_max": 5,
                    "host_load_mean": 4.0, "host_load_max_over_mean": 1.25,
                    "host_load_max_over_mean_peak": 2.5}
  assert host_routing.host_load_record([]) == {}
