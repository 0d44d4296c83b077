"""Tests for hashmoe.sharding on 8 CPU-emulated devices (tests/conftest.py).

References share no code with the library: a float64 numpy loop over tokens for values, a
per-token jnp function (vmapped over tokens, autodiffed, unsharded) for gradients, and a python loop
over shards and tokens for capacity drops. Each expert-parallel case compiles one jitted
value-and-grad.
"""
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from hashmoe import sharding as sh

TOKENS, D_MODEL, D_FF, EXPERTS = 64, 8, 16, 8


# ------------------------------------------------------------------------------------------------
# Independent references.
# ------------------------------------------------------------------------------------------------


def relu_np(z):
  return np.maximum(z, 0.0)


def naive_numpy(x, index, weight, wi, wo, num_slices, kept):
  """y_t = Σ_j w_tj B_e(relu(A_e x_t)), or MultiHash (Sec. 3.2), one token at a time (float64).

  kept[t, j] False removes assignment j of token t (no output; for MultiHash a zero segment of v).
  """
  x, weight, wi, wo = (np.asarray(a, np.float64) for a in (x, weight, wi, wo))
  index, kept = np.asarray(index), np.asarray(kept)
  tokens, d = x.shape
  d_ff = wi.shape[2]
  y = np.zeros((tokens, d))
  for t in range(tokens):
    if num_slices == 1:
      for j in range(index.shape[1]):
        if kept[t, j]:
          e = index[t, j]
          y[t] += weight[t, j] * (relu_np(x[t] @ wi[e]) @ wo[e])
    else:
      a, b = d_ff // num_slices, d // num_slices
      v = np.zeros(d_ff)
      for m in range(num_slices):
        if kept[t, m]:
          v[m * a:(m + 1) * a] = relu_np(x[t] @ wi[index[t, m]][:, m * a:(m + 1) * a])
      for m in range(num_slices):
        if kept[t, m]:
          y[t, m * b:(m + 1) * b] = weight[t, m] * (v @ wo[index[t, m]][:, m * b:(m + 1) * b])
  return y


def per_token_jnp(x_t, index_t, weight_t, kept_t, wi, wo, num_slices):
  """One token's output in jnp (for gradients); the same formula as `naive_numpy`."""
  if num_slices == 1:
    hidden = jax.nn.relu(jnp.einsum("d,hdf->hf", x_t, wi[index_t]))
    out = jnp.einsum("hf,hfd->hd", hidden, wo[index_t])
    return jnp.sum(out * (weight_t * kept_t)[:, None], axis=0)
  d_ff, d = wi.shape[2], wi.shape[1]
  a, b = d_ff // num_slices, d // num_slices
  v = jnp.concatenate([
      jax.nn.relu(x_t @ wi[index_t[m]][:, m * a:(m + 1) * a]) * kept_t[m]
      for m in range(num_slices)])
  return jnp.concatenate([
      weight_t[m] * kept_t[m] * (v @ wo[index_t[m]][:, m * b:(m + 1) * b])
      for m in range(num_slices)])


def loop_kept(index, weight, shards, capacity, num_slices):
  """Python loop: per token shard, column-major priority, per-bucket capacity (bucket = expert, or
  (expert, slice) for MultiHash); zero-weight assignments take no capacity and are not kept."""
  index, weight = np.asarray(index), np.asarray(weight)
  tokens, columns = index.shape
  per_shard = tokens // shards
  kept = np.zeros(index.shape, bool)
  for s in range(shards):
    load = {}
    for j in range(columns):
      for t in range(s * per_shard, (s + 1) * per_shard):
        if weight[t, j] == 0:
          continue
        bucket = (index[t, j], j) if num_slices > 1 else index[t, j]
        if load.get(bucket, 0) < capacity:
          kept[t, j] = True
          load[bucket] = load.get(bucket, 0) + 1
  return kept


def make_inputs(seed, columns, zero_every=7):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(TOKENS, D_MODEL)).astype(np.float32)
  index = rng.integers(0, EXPERTS, size=(TOKENS, columns)).astype(np.int32)
  weight = rng.uniform(0.2, 1.0, size=(TOKENS, columns)).astype(np.float32)
  weight[::zero_every, 0] = 0.0  # Router-dropped assignments: no capacity, no output.
  wi = (rng.normal(size=(EXPERTS, D_MODEL, D_FF)) / np.sqrt(D_MODEL)).astype(np.float32)
  wo = (rng.normal(size=(EXPERTS, D_FF, D_MODEL)) / np.sqrt(D_FF)).astype(np.float32)
  cotangent = rng.normal(size=(TOKENS, D_MODEL)).astype(np.float32)
  return x, index, weight, wi, wo, cotangent


def check_against_reference(mesh_shape, columns, num_slices, *, capacity_factor=None,
                            dropless=None, expect_drops=False, seed=0):
  x, index, weight, wi, wo, ct = make_inputs(seed, columns)
  mesh = sh.make_mesh(*mesh_shape)
  shards = mesh_shape[0] * mesh_shape[1]

  def loss(x, weight, wi, wo):
    y, metrics = sh.expert_parallel_ffn(
        x, jnp.asarray(index), weight, wi, wo, activation=jax.nn.relu, num_slices=num_slices,
        mesh=mesh, capacity_factor=capacity_factor, dropless=dropless)
    return jnp.sum(y * ct), (y, metrics)

  (_, (y, metrics)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
      x, weight, wi, wo)

  if capacity_factor is None:
    kept = weight != 0
  else:
    capacity = math.ceil(capacity_factor * (TOKENS // shards) * columns / (num_slices * EXPERTS))
    kept = loop_kept(index, weight, shards, capacity, num_slices)
  active = weight != 0
  assert (not expect_drops) or (kept != active).any(), "case meant to drop assignments drops none"

  np.testing.assert_allclose(np.asarray(y), naive_numpy(x, index, weight, wi, wo, num_slices, kept),
                             rtol=1e-5, atol=1e-5)
  expected_sizes = np.bincount(index[active], minlength=EXPERTS)
  np.testing.assert_array_equal(np.asarray(metrics["group_sizes"]), expected_sizes)
  np.testing.assert_allclose(float(metrics["dropped_fraction"]),
                             (active & ~kept).sum() / active.sum(), rtol=1e-6)

  def ref_loss(x, weight, wi, wo):
    y = jax.vmap(per_token_jnp, in_axes=(0, 0, 0, 0, None, None, None))(
        x, jnp.asarray(index), weight, jnp.asarray(kept, jnp.float32), wi, wo, num_slices)
    return jnp.sum(y * ct)

  ref_grads = jax.grad(ref_loss, argnums=(0, 1, 2, 3))(x, weight, wi, wo)
  for name, g, r in zip(("x", "combine_weight", "wi", "wo"), grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5,
                               err_msg=f"gradient of {name}")


# ------------------------------------------------------------------------------------------------
# Mesh.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    ((2, 4, 1), (2, 4, 1)),
    ((-1, 1, 1), (8, 1, 1)),
    ((1, 8, 1), (1, 8, 1)),
    ((2, 2, 2), (2, 2, 2)),
    ((-1, 4, 1), (2, 4, 1)),
    ((1, -1, 2), (1, 4, 2)),
])
def test_make_mesh_shapes(args, expected):
  mesh = sh.make_mesh(*args)
  assert mesh.axis_names == ("data", "expert", "model")
  assert tuple(mesh.shape.values()) == expected
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_defaults_and_device_subset():
  assert tuple(sh.make_mesh().shape.values()) == (8, 1, 1)
  mesh = sh.make_mesh(expert=2, devices=jax.devices()[:2])
  assert tuple(mesh.shape.values()) == (1, 2, 1)


@pytest.mark.parametrize("args, match", [
    ((3, 2, 1), r"3×2×1 = 6 does not match the 8 devices"),
    ((2, 2, 1), r"2×2×1 = 4 does not match the 8 devices"),
    ((-1, 3, 1), r"8 devices are not divisible by the product 3"),
    ((-1, -1, 1), r"at most one mesh axis may be -1"),
    ((0, 8, 1), r"'data' has size 0"),
])
def test_make_mesh_errors(args, match):
  with pytest.raises(ValueError, match=match):
    sh.make_mesh(*args)


def test_check_expert_sharding():
  mesh = sh.make_mesh(2, 4, 1)
  sh.check_expert_sharding(8, mesh)
  sh.check_expert_sharding(4, mesh)
  with pytest.raises(ValueError, match=r"num_experts=6 .* 'expert' axis of size 4"):
    sh.check_expert_sharding(6, mesh)


# ------------------------------------------------------------------------------------------------
# Logical axis rules.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("logical, expected", [
    (("expert", "embed", "mlp"), P("expert", None, "model")),  # expert wi
    (("expert", "mlp", "embed"), P("expert", "model", None)),  # expert wo
    (("vocab", "embed"), P("model", None)),  # token embedding
    (("embed", "mlp"), P(None, "model")),  # dense FFN wi
    (("embed", "heads", "kv"), P(None, "model", None)),  # attention q/k/v
    (("batch", "length", "embed"), P(("data", "expert"), None, None)),  # activations
    (("batch", "embed"), P(("data", "expert"), None)),  # flattened tokens
    # Post-dispatch layout: experts take "expert", tokens fall back to "data" (GShard).
    (("expert", "expert_group", "expert_capacity", "embed"), P("expert", "data", None, None)),
])
def test_logical_rules(logical, expected):
  mesh = sh.make_mesh(2, 2, 2)
  sharding = sh.logical_to_mesh_sharding({"a": P(*logical)}, mesh)["a"]
  assert isinstance(sharding, NamedSharding)
  assert sharding.spec == expected


def test_logical_rules_must_name_mesh_axes():
  with pytest.raises(ValueError, match=r"names mesh axis 'fsdp'"):
    sh.logical_to_mesh_sharding(P("embed"), sh.make_mesh(), rules=(("embed", "fsdp"),))


class _TinyModel(nn.Module):
  """Parameters boxed the ways hashmoe models box them."""

  @nn.compact
  def __call__(self, tokens):
    init = nn.initializers.normal(0.02)
    emb = self.param("embedding", nn.with_logical_partitioning(init, ("vocab", "embed")), (16, 8))
    wi = self.param("wi", nn.with_logical_partitioning(init, ("expert", "embed", "mlp")),
                    (8, 8, 16))
    wo = self.param("wo", nn.with_logical_partitioning(init, ("expert", "mlp", "embed")),
                    (8, 16, 8))
    scale = self.param("scale", nn.initializers.ones, (8,))  # unboxed: replicated
    mesh_named = self.param("mesh_named", nn.with_partitioning(init, (None, "data")), (4, 8))
    h = emb[tokens] * scale
    return h + jnp.einsum("td,edf,efk->tk", h, wi, wo) + mesh_named.sum()


def test_shard_params_abstract_and_concrete():
  mesh = sh.make_mesh(2, 2, 2)
  model = _TinyModel()
  tokens = jnp.zeros((4,), jnp.int32)
  expected = {"embedding": P("model", None), "wi": P("expert", None, "model"),
              "wo": P("expert", "model", None), "scale": P(), "mesh_named": P(None, "data")}
  abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
  shardings = sh.shard_params(abstract, mesh)
  assert {k: s.spec for k, s in shardings["params"].items()} == expected

  # Concrete boxed arrays of the same structure (cheaper than compiling the initialisers).
  variables = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  concrete = sh.shard_params(variables, mesh)
  assert {k: s.spec for k, s in concrete["params"].items()} == expected
  placed = jax.device_put(nn.unbox(variables), concrete)
  wi = placed["params"]["wi"]
  assert wi.sharding.spec == P("expert", None, "model")
  assert {s.data.shape for s in wi.addressable_shards} == {(4, 8, 8)}


def test_shard_params_names_indivisible_parameter():
  box = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 8, 16), jnp.float32),
                                ("expert", "embed", "mlp"))
  with pytest.raises(ValueError, match=r"\['wi'\].*dimension 6 is not divisible .*'expert'"):
    sh.shard_params({"wi": box}, sh.make_mesh(2, 4, 1))


def test_batch_sharding_splits_rows_over_data_then_expert():
  mesh = sh.make_mesh(2, 2, 2)
  sharding = sh.batch_sharding(mesh)
  assert sharding.spec == P(("data", "expert"))
  batch = jax.device_put(np.arange(16 * 3).reshape(16, 3), sharding)
  coords = {dev.id: idx for idx, dev in np.ndenumerate(mesh.devices)}
  for shard in batch.addressable_shards:
    data_i, expert_i, _ = coords[shard.device.id]
    block = data_i * 2 + expert_i
    np.testing.assert_array_equal(np.asarray(shard.data),
                                  np.arange(16 * 3).reshape(16, 3)[block * 4:(block + 1) * 4])


# ------------------------------------------------------------------------------------------------
# Expert-parallel dispatch against the references.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("columns", [1, 2], ids=["top1", "top2"])
@pytest.mark.parametrize("mesh_shape", [(4, 2, 1), (2, 4, 1), (1, 8, 1)],
                         ids=["expert2", "expert4", "expert8"])
def test_expert_parallel_dropless_matches_reference(mesh_shape, columns):
  # dropless=None on CPU: the capacity transport padded to the worst case.
  check_against_reference(mesh_shape, columns, num_slices=1)


def test_expert_parallel_model_axis_matches_reference():
  check_against_reference((2, 2, 2), columns=2, num_slices=1)


@pytest.mark.parametrize("mesh_shape, num_slices", [
    ((2, 4, 1), 2),
    ((2, 2, 2), 4),  # each 'model' shard holds two whole slices
    ((1, 2, 4), 2),  # each slice spans two 'model' shards
], ids=["N2-expert4", "N4-model2", "N2-model4"])
def test_expert_parallel_multihash_matches_reference(mesh_shape, num_slices):
  check_against_reference(mesh_shape, num_slices, num_slices=num_slices)


@pytest.mark.parametrize("mesh_shape, columns, num_slices, capacity_factor", [
    ((1, 8, 1), 1, 1, 1.0),
    ((2, 4, 1), 2, 1, 0.75),
    ((2, 2, 2), 2, 2, 0.5),
], ids=["top1-expert8", "top2-expert4", "multihash-model2"])
def test_expert_parallel_capacity_drops_match_loop(mesh_shape, columns, num_slices,
                                                   capacity_factor):
  check_against_reference(mesh_shape, columns, num_slices, capacity_factor=capacity_factor,
                          expect_drops=True)


@pytest.mark.parametrize("mesh_shape, columns, num_slices", [
    ((2, 4, 1), 2, 1),
    ((1, 2, 4), 2, 2),
], ids=["top2-expert4", "multihash-model4"])
def test_expert_parallel_ragged_matches_reference(mesh_shape, columns, num_slices):
  # On CPU the ragged plan runs over the dense emulation of ragged_all_to_all.
  check_against_reference(mesh_shape, columns, num_slices, dropless="ragged")


def test_expert_parallel_uses_context_mesh():
  x, index, weight, wi, wo, _ = make_inputs(3, 1)
  f = jax.jit(lambda *a: sh.expert_parallel_ffn(*a, activation="relu")[0])
  with jax.set_mesh(sh.make_mesh(2, 4, 1)):
    y = f(x, index, weight, wi, wo)
  np.testing.assert_allclose(np.asarray(y), naive_numpy(x, index, weight, wi, wo, 1, weight != 0),
                             rtol=1e-5, atol=1e-5)


def test_expert_parallel_single_device_equals_capacity_ffn():
  # One device, one shard: the same drops and outputs as the single-device capacity dispatch.
  from hashmoe import experts
  x, index, weight, wi, wo, _ = make_inputs(4, 2)
  mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  ours, our_metrics = jax.jit(lambda *a: sh.expert_parallel_ffn(
      *a, activation=jax.nn.relu, mesh=mesh, capacity_factor=0.5))(x, index, weight, wi, wo)
  theirs, their_metrics = jax.jit(lambda *a: experts.capacity_ffn(
      *a, activation=jax.nn.relu, capacity_factor=0.5))(x, index, weight, wi, wo)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6)
  for key in ("group_sizes", "dropped_fraction"):
    np.testing.assert_allclose(np.asarray(our_metrics[key]), np.asarray(their_metrics[key]))


# ------------------------------------------------------------------------------------------------
# The ragged transport: emulation semantics and lowering for TPU / CUDA.
# ------------------------------------------------------------------------------------------------


def test_dense_ragged_all_to_all_follows_documented_example():
  # The two-device example of the jax.lax.ragged_all_to_all docstring, run on every data row.
  mesh = sh.make_mesh(4, 2, 1)
  per_device = {
      0: dict(operand=[1, 2, 2], output=[0, 0, 0, 0], input_offsets=[0, 1], send_sizes=[1, 2],
              output_offsets=[0, 0], recv_sizes=[1, 1], result=[1, 3, 0, 0]),
      1: dict(operand=[3, 4, 0], output=[0, 0, 0, 0], input_offsets=[0, 1], send_sizes=[1, 1],
              output_offsets=[1, 2], recv_sizes=[2, 1], result=[2, 2, 4, 0]),
  }
  keys = ("operand", "output", "input_offsets", "send_sizes", "output_offsets", "recv_sizes")
  args = [np.concatenate([per_device[e][k] for _ in range(4) for e in (0, 1)]).astype(
      np.float32 if k in ("operand", "output") else np.int32) for k in keys]
  spec = P(("data", "expert"))
  f = jax.jit(jax.shard_map(
      lambda *a: sh._ragged_all_to_all_dense(*a, axis_name="expert"), mesh=mesh,
      in_specs=(spec,) * 6, out_specs=spec))
  expected = np.concatenate([per_device[e]["result"] for _ in range(4) for e in (0, 1)])
  np.testing.assert_array_equal(np.asarray(f(*args)), expected)


@pytest.mark.parametrize("num_slices, exchanges", [(1, 1), (2, 2)], ids=["top2", "multihash"])
def test_ragged_transport_lowers_for_tpu_and_cuda(num_slices, exchanges):
  """Exports forward+backward over an abstract 2×2×2 mesh: no TPU/GPU needed to lower."""
  mesh = AbstractMesh((2, 2, 2), sh.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  columns = 2

  def loss(x, index, weight, wi, wo):
    y, _ = sh.expert_parallel_ffn(x, index, weight, wi, wo, activation=jax.nn.relu,
                                  num_slices=num_slices, mesh=mesh, dropless="ragged")
    return jnp.sum(y * y)

  def spec(shape, dtype, *axes):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*axes)))

  tokens = (("data", "expert"), None)
  args = (spec((TOKENS, D_MODEL), jnp.float32, *tokens),
          spec((TOKENS, columns), jnp.int32, *tokens),
          spec((TOKENS, columns), jnp.float32, *tokens),
          spec((EXPERTS, D_MODEL, D_FF), jnp.float32, "expert", None, "model"),
          spec((EXPERTS, D_FF, D_MODEL), jnp.float32, "expert", "model", None))
  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3, 4)))
  # Device ids are row-major over (data, expert, model): the expert-axis groups.
  expert_groups = "[[0, 2], [1, 3], [4, 6], [5, 7]]"
  for platform in ("tpu", "cuda"):
    exported = jax.export.export(
        f, platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")])(*args)
    assert exported.platforms == (platform,) and exported.nr_devices == 8
    text = exported.mlir_module()
    calls = [line for line in text.splitlines() if "custom_call @ragged_all_to_all" in line]
    # Per exchange: dispatch + combine forward, and their two transposes backward.
    assert len(calls) == 4 * exchanges, platform
    for line in calls:
      assert re.search(r"replica_groups = dense<(.*?)>", line).group(1) == expert_groups
    # Grouped matmuls: two forward (A and B, one per MultiHash round), each with two backward
    # products (input and weight gradients).
    assert len(re.findall(r'composite "chlo.ragged_dot"', text)) == 6
    assert "mhlo.num_partitions = 8" in text


# ------------------------------------------------------------------------------------------------
# Argument errors.
# ------------------------------------------------------------------------------------------------


def test_expert_parallel_argument_errors():
  x, index, weight, wi, wo, _ = make_inputs(5, 2)
  mesh = sh.make_mesh(2, 4, 1)
  call = lambda *a, **k: sh.expert_parallel_ffn(*a, activation="relu", **k)
  with pytest.raises(ValueError, match=r"num_experts=6 .* 'expert' axis of size 4"):
    call(x, index % 6, weight, wi[:6], wo[:6], mesh=mesh)
  with pytest.raises(ValueError, match=r"tokens=60 must be divisible by the 8 token shards"):
    call(x[:60], index[:60], weight[:60], wi, wo, mesh=mesh)
  with pytest.raises(ValueError, match=r"contradicts dropless='ragged'"):
    call(x, index, weight, wi, wo, mesh=mesh, capacity_factor=1.0, dropless="ragged")
  with pytest.raises(ValueError, match=r"dropless=False needs a capacity_factor"):
    call(x, index, weight, wi, wo, mesh=mesh, dropless=False)
  with pytest.raises(ValueError, match=r"num_slices=4 needs one expert_index column per slice"):
    call(x, index, weight, wi, wo, mesh=mesh, num_slices=4)
  with pytest.raises(TypeError, match=r"expert_index must be an integer array"):
    call(x, index.astype(np.float32), weight, wi, wo, mesh=mesh)
  with pytest.raises(ValueError, match=r"slices of width D/N = 8 and 'model' shards of width "
                                       r"D/model = 12 must nest"):
    x12 = np.zeros((TOKENS, 12), np.float32)
    idx3 = np.zeros((TOKENS, 3), np.int32)
    call(x12, idx3, np.ones((TOKENS, 3), np.float32), np.zeros((EXPERTS, 12, 24), np.float32),
         np.zeros((EXPERTS, 24, 12), np.float32), mesh=sh.make_mesh(2, 2, 2), num_slices=3)
