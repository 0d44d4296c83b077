"""Tests for hashmoe.experts: every dispatch against a naive per-token loop.

The references here share no code with the library: a float64 numpy loop over tokens for values, a
per-token jnp function (vmapped, autodiffed) for gradients, and a python loop for capacity drops.
Shapes are fixed per case so that each jitted function compiles once.
"""
import functools
import math
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from hashmoe import experts as ex
from hashmoe import hash_functions
from hashmoe import expert_grouping
from hashmoe.routing import Routing

# ------------------------------------------------------------------------------------------------
# Independent references.
# ------------------------------------------------------------------------------------------------

NP_ACT = {
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": lambda z: 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3))),
    "swish": lambda z: z / (1.0 + np.exp(-z)),
}
JNP_ACT = {
    "relu": lambda z: jnp.maximum(z, 0.0),
    "gelu": lambda z: 0.5 * z * (1.0 + jnp.tanh(jnp.sqrt(2.0 / jnp.pi) * (z + 0.044715 * z**3))),
    "swish": lambda z: z / (1.0 + jnp.exp(-z)),
}


def naive_numpy(x, index, weight, wi, wo, act, num_slices, kept=None):
  """y_t = sum_j w_tj FFN_{e_tj}(x_t), or the MultiHash formula of Sec. 3.2, one token at a time.

  `kept[t, j]` False (a dropped or zero-weight assignment) removes the assignment: no output and,
  for MultiHash, a zero segment of v.
  """
  x, weight, wi, wo = (np.asarray(a, np.float64) for a in (x, weight, wi, wo))
  index = np.asarray(index)
  if kept is None:
    kept = (weight != 0) & (index >= 0) & (index < wi.shape[0])
  kept = np.asarray(kept)
  tokens, d = x.shape
  d_ff = wi.shape[2]
  f = NP_ACT[act]
  y = np.zeros((tokens, d))
  for t in range(tokens):
    if num_slices == 1:
      for j in range(index.shape[1]):
        if kept[t, j]:
          e = index[t, j]
          y[t] += weight[t, j] * (f(x[t] @ wi[e]) @ wo[e])
    else:
      n = num_slices
      a = d_ff // n
      b = d // n
      segments = []
      for m in range(n):
        e = index[t, m]
        seg = f(x[t] @ wi[e][:, m * a:(m + 1) * a]) if kept[t, m] else np.zeros(a)
        segments.append(seg)
      v = np.concatenate(segments)  # v = act([A_{k_1}(h); ...; A_{k_N}(h)])
      pieces = []
      for m in range(n):
        e = index[t, m]
        piece = weight[t, m] * (v @ wo[e][:, m * b:(m + 1) * b]) if kept[t, m] else np.zeros(b)
        pieces.append(piece)
      y[t] = np.concatenate(pieces)  # [B_{k_1}(v); ...; B_{k_N}(v)]
  return y


def _naive_token_jnp(x_t, e_t, w_t, k_t, wi, wo, *, act, num_slices):
  f = JNP_ACT[act]
  if num_slices == 1:
    y = jnp.zeros_like(x_t)
    for j in range(e_t.shape[0]):
      y = y + jnp.where(k_t[j], w_t[j] * (f(x_t @ wi[e_t[j]]) @ wo[e_t[j]]), 0.0)
    return y
  n = num_slices
  a = wi.shape[2] // n
  b = x_t.shape[0] // n
  v = jnp.concatenate([
      jnp.where(k_t[m], f(x_t @ wi[e_t[m]][:, m * a:(m + 1) * a]), 0.0) for m in range(n)])
  return jnp.concatenate([
      jnp.where(k_t[m], w_t[m] * (v @ wo[e_t[m]][:, m * b:(m + 1) * b]), 0.0) for m in range(n)])


@functools.lru_cache(maxsize=None)
def naive_grads_fn(act, num_slices):
  """jit(grad) of sum(naive(x) * r) w.r.t. (x, combine_weight, wi, wo); per-token, vmapped."""
  token_fn = functools.partial(_naive_token_jnp, act=act, num_slices=num_slices)

  def loss(x, weight, wi, wo, index, kept, r):
    y = jax.vmap(token_fn, in_axes=(0, 0, 0, 0, None, None))(x, index, weight, kept, wi, wo)
    return jnp.sum(y * r)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def python_capacity_kept(index, weight, num_experts, num_slices, capacity):
  """Which assignments fit: columns in order, tokens in order; zero weights take no slot."""
  index = np.asarray(index)
  weight = np.asarray(weight)
  tokens, columns = index.shape
  used = {}
  kept = np.zeros((tokens, columns), bool)
  for j in range(columns):
    for t in range(tokens):
      if weight[t, j] == 0:
        continue
      group = (j if num_slices > 1 else 0, index[t, j])
      used[group] = used.get(group, 0) + 1
      kept[t, j] = used[group] <= capacity
  return kept


# ------------------------------------------------------------------------------------------------
# Cases and compiled dispatches (one compile per shape).
# ------------------------------------------------------------------------------------------------

CASES = {
    "top1": dict(tokens=32, d=8, d_ff=16, experts=4, columns=1, slices=1, act="relu"),
    "top2": dict(tokens=32, d=8, d_ff=16, experts=4, columns=2, slices=1, act="gelu"),
    "multihash2": dict(tokens=32, d=8, d_ff=16, experts=4, columns=2, slices=2, act="relu"),
    "multihash4": dict(tokens=32, d=8, d_ff=16, experts=4, columns=4, slices=4, act="swish"),
}
DISPATCHES = ("sorted", "ragged_dot", "einsum", "capacity")


def make_case(case, seed=0, index=None, weight=None):
  c = CASES[case]
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(c["tokens"], c["d"])).astype(np.float32)
  wi = (rng.normal(size=(c["experts"], c["d"], c["d_ff"])) / np.sqrt(c["d"])).astype(np.float32)
  wo = (rng.normal(size=(c["experts"], c["d_ff"], c["d"])) / np.sqrt(c["d_ff"])).astype(np.float32)
  if index is None:
    index = rng.integers(0, c["experts"], size=(c["tokens"], c["columns"]))
  if weight is None:
    weight = rng.uniform(0.5, 1.5, size=(c["tokens"], c["columns"]))
  r = rng.normal(size=(c["tokens"], c["d"])).astype(np.float32)
  return dict(x=x, index=np.asarray(index, np.int32), weight=np.asarray(weight, np.float32),
              wi=wi, wo=wo, r=r)


def compiled(dispatch, act, num_slices, capacity_factor=None):
  """jit of (y, metrics, grads of sum(y * r) w.r.t. x, combine_weight, wi, wo)."""
  # One positional key so that every caller shares the compiled function.
  return _compiled(dispatch, act, num_slices, capacity_factor)


@functools.lru_cache(maxsize=None)
def _compiled(dispatch, act, num_slices, capacity_factor):
  fn = ex.dispatch_fn(dispatch)
  kwargs = {} if capacity_factor is None else {"capacity_factor": capacity_factor}
  act_fn = ex.ACTIVATIONS[act]

  def run(x, weight, wi, wo, index, r):
    def loss(x, weight, wi, wo):
      y, metrics = fn(x, index, weight, wi, wo, activation=act_fn, num_slices=num_slices, **kwargs)
      return jnp.sum(y * r), (y, metrics)

    grads, (y, metrics) = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, weight, wi, wo)
    return y, metrics, grads

  return jax.jit(run)


def check_against_naive(case, dispatch, data, kept=None, capacity_factor=None):
  c = CASES[case]
  active = (data["weight"] != 0) & (data["index"] >= 0) & (data["index"] < c["experts"])
  if kept is None:
    kept = active
  y, metrics, grads = compiled(dispatch, c["act"], c["slices"], capacity_factor)(
      data["x"], data["weight"], data["wi"], data["wo"], data["index"], data["r"])
  expected = naive_numpy(data["x"], data["index"], data["weight"], data["wi"], data["wo"],
                         c["act"], c["slices"], kept)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=2e-5)
  expected_grads = naive_grads_fn(c["act"], c["slices"])(
      data["x"], data["weight"], data["wi"], data["wo"], data["index"], kept, data["r"])
  for name, got, want in zip(("x", "combine_weight", "wi", "wo"), grads, expected_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-5,
                               err_msg=f"d loss / d {name}")
  expected_sizes = np.bincount(data["index"][active], minlength=c["experts"])
  np.testing.assert_array_equal(np.asarray(metrics["group_sizes"]), expected_sizes)
  assert metrics["group_sizes"].dtype == jnp.int32
  expected_dropped = (active & ~kept).sum() / max(active.sum(), 1)
  np.testing.assert_allclose(float(metrics["dropped_fraction"]), expected_dropped, atol=1e-7)
  return y, metrics


# ------------------------------------------------------------------------------------------------
# Dispatch agreement.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_dispatch_matches_naive_values_and_grads(case, dispatch):
  check_against_naive(case, dispatch, make_case(case, seed=1))


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("case", ["top2", "multihash2"])
@pytest.mark.parametrize("routing", ["empty_experts", "one_expert", "zero_weights", "out_of_range"])
def test_dispatch_edge_routing(routing, case, dispatch):
  c = CASES[case]
  rng = np.random.default_rng(2)
  shape = (c["tokens"], c["columns"])
  weight = None
  if routing == "empty_experts":  # experts 0 and 2 get nothing
    index = rng.choice([1, 3], size=shape)
  elif routing == "one_expert":
    index = np.full(shape, 2)
  elif routing == "zero_weights":  # a router dropped some assignments: they contribute nothing
    index = rng.integers(0, c["experts"], size=shape)
    weight = rng.uniform(0.5, 1.5, size=shape) * (rng.uniform(size=shape) > 0.3)
  else:  # indices outside [0, E) are skipped like zero weights
    index = rng.integers(-1, c["experts"] + 1, size=shape)
  data = make_case(case, seed=3, index=index, weight=weight)
  y, metrics = check_against_naive(case, dispatch, data)
  if routing == "empty_experts":
    assert np.asarray(metrics["group_sizes"])[[0, 2]].tolist() == [0, 0]
  if routing == "zero_weights" and case == "top2":
    skipped = (data["weight"] == 0).all(axis=1)
    assert skipped.any()
    np.testing.assert_array_equal(np.asarray(y)[skipped], 0.0)


def test_empty_experts_get_zero_weight_gradients():
  data = make_case("top1", seed=4, index=np.full((32, 1), 1))
  for dispatch in DISPATCHES:
    _, _, (_, _, dwi, dwo) = compiled(dispatch, "relu", 1)(
        data["x"], data["weight"], data["wi"], data["wo"], data["index"], data["r"])
    for e in (0, 2, 3):
      assert not np.any(np.asarray(dwi[e])) and not np.any(np.asarray(dwo[e])), dispatch
    assert np.any(np.asarray(dwi[1]))


# ------------------------------------------------------------------------------------------------
# Capacity.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dispatch", ["einsum", "capacity"])
@pytest.mark.parametrize("case", ["top1", "top2", "multihash2"])
def test_tight_capacity_drops_what_a_python_loop_drops(case, dispatch):
  c = CASES[case]
  rng = np.random.default_rng(5)
  shape = (c["tokens"], c["columns"])
  # Skewed towards expert 0 so that it overflows; some zero weights that must not take a slot.
  index = np.where(rng.uniform(size=shape) < 0.5, 0, rng.integers(0, c["experts"], size=shape))
  weight = rng.uniform(0.5, 1.5, size=shape) * (rng.uniform(size=shape) > 0.15)
  data = make_case(case, seed=6, index=index, weight=weight)
  capacity_factor = 0.5
  # ceil(cf * tokens * H / E) per expert; per (slice, expert) for MultiHash.
  capacity = math.ceil(capacity_factor * c["tokens"] * c["columns"] / (c["slices"] * c["experts"]))
  assert ex.expert_capacity(c["tokens"], c["experts"], num_columns=c["columns"],
                            num_slices=c["slices"], capacity_factor=capacity_factor) == capacity
  kept = python_capacity_kept(data["index"], data["weight"], c["experts"], c["slices"], capacity)
  assert (~kept & (data["weight"] != 0)).sum() > 0, "the case must actually drop something"
  _, metrics = check_against_naive(case, dispatch, data, kept=kept, capacity_factor=capacity_factor)
  assert float(metrics["dropped_fraction"]) > 0


@pytest.mark.parametrize("dispatch", ["einsum", "capacity"])
def test_capacity_keeps_first_tokens_in_order(dispatch):
  # 6 tokens all on expert 0 of 2, capacity_factor 1: capacity ceil(1 * 6 / 2) = 3.
  x = np.arange(1, 7, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
  wi = np.ones((2, 2, 2), np.float32)
  wo = np.ones((2, 2, 2), np.float32)
  fn = functools.partial(ex.dispatch_fn(dispatch), activation=jax.nn.relu, capacity_factor=1.0)
  y, metrics = jax.jit(fn)(x, np.zeros((6, 1), np.int32), np.ones((6, 1), np.float32), wi, wo)
  # Kept tokens: FFN(x) = 4 * x_0 per output unit; dropped tokens 3, 4, 5 output 0.
  np.testing.assert_allclose(np.asarray(y)[:, 0], [4.0, 8.0, 12.0, 0.0, 0.0, 0.0])
  np.testing.assert_allclose(float(metrics["dropped_fraction"]), 0.5)
  np.testing.assert_array_equal(np.asarray(metrics["group_sizes"]), [6, 0])


def test_expert_capacity():
  assert ex.expert_capacity(64, 8, capacity_factor=1.0) == 8
  assert ex.expert_capacity(64, 8, capacity_factor=1.25) == 10
  assert ex.expert_capacity(64, 8, num_columns=2, capacity_factor=1.0) == 16
  assert ex.expert_capacity(64, 8, num_columns=4, num_slices=4, capacity_factor=1.0) == 8
  assert ex.expert_capacity(3, 8, capacity_factor=0.1) == 1  # never below one slot
  assert ex.expert_capacity(64, 8, num_columns=2, capacity_factor=None) == 128  # worst case
  assert ex.expert_capacity(64, 8, num_columns=2, num_slices=2, capacity_factor=None) == 64


@pytest.mark.parametrize("capacity_factor", [0.0, -1.0])
@pytest.mark.parametrize("dispatch", ["einsum", "capacity"])
def test_nonpositive_capacity_factor_raises(dispatch, capacity_factor):
  data = make_case("top1")
  with pytest.raises(ValueError, match="capacity_factor"):
    ex.dispatch_fn(dispatch)(data["x"], data["index"], data["weight"], data["wi"], data["wo"],
                             activation=jax.nn.relu, capacity_factor=capacity_factor)


# ------------------------------------------------------------------------------------------------
# Validation.
# ------------------------------------------------------------------------------------------------


def test_num_slices_must_divide_d_ff_and_d_model():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 8)).astype(np.float32)
  index = np.zeros((4, 4), np.int32)
  weight = np.ones((4, 4), np.float32)
  wi = np.zeros((2, 8, 18), np.float32)
  wo = np.zeros((2, 18, 8), np.float32)
  with pytest.raises(ValueError, match="d_ff=18"):
    ex.sorted_ffn(x, index, weight, wi, wo, activation=jax.nn.relu, num_slices=4)
  x6 = np.zeros((4, 6), np.float32)
  with pytest.raises(ValueError, match="d_model=6"):
    ex.einsum_ffn(x6, index, weight, np.zeros((2, 6, 16), np.float32),
                  np.zeros((2, 16, 6), np.float32), activation=jax.nn.relu, num_slices=4)
  module = ex.Experts(num_experts=2, d_ff=18, num_slices=4, dispatch="sorted")
  routing = Routing(jnp.asarray(index), jnp.asarray(weight), jnp.zeros(()), {})
  with pytest.raises(ValueError, match="d_ff=18"):
    module.init(jax.random.key(0), x, routing)


def test_bad_shapes_raise():
  data = make_case("multihash2")
  call = functools.partial(ex.sorted_ffn, activation=jax.nn.relu)
  with pytest.raises(ValueError, match="one expert_index column per slice"):
    call(data["x"], data["index"][:, :1], data["weight"][:, :1], data["wi"], data["wo"],
         num_slices=2)
  with pytest.raises(ValueError, match="combine_weight"):
    call(data["x"], data["index"], data["weight"][:, :1], data["wi"], data["wo"])
  with pytest.raises(TypeError, match="integer"):
    call(data["x"], data["index"].astype(np.float32), data["weight"], data["wi"], data["wo"])
  with pytest.raises(ValueError, match="wo"):
    call(data["x"], data["index"], data["weight"], data["wi"], data["wo"][:, :, :4])
  with pytest.raises(ValueError, match="tokens=32"):
    call(data["x"], data["index"][:5], data["weight"][:5], data["wi"], data["wo"])


# ------------------------------------------------------------------------------------------------
# The permutation gather.
# ------------------------------------------------------------------------------------------------


def test_permute_rows_matches_plain_gather_without_scatter_add():
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(24, 3)), jnp.float32)
  perm = jnp.asarray(rng.permutation(24), jnp.int32)
  r = jnp.asarray(rng.normal(size=(24, 3)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(ex.permute_rows(x, perm)),
                                np.asarray(x)[np.asarray(perm)])
  np.testing.assert_array_equal(np.asarray(ex.inverse_permutation(perm))[np.asarray(perm)],
                                np.arange(24))

  def ours(x):
    return jnp.sum(ex.permute_rows(x, perm) ** 2 * r)

  def plain(x):
    return jnp.sum(x[perm] ** 2 * r)

  np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(ours))(x)),
                             np.asarray(jax.jit(jax.grad(plain))(x)), rtol=1e-6)
  # The point of the custom_vjp: the backward is a gather, not autodiff's scatter-add.
  assert "scatter-add" in str(jax.make_jaxpr(jax.grad(plain))(x))
  assert "scatter-add" not in str(jax.make_jaxpr(jax.grad(ours))(x))
  with pytest.raises(ValueError, match="perm"):
    ex.permute_rows(x, perm[:5])


def test_sorted_backward_has_no_float_scatter_add():
  data = make_case("top2")

  def loss(x, wi, wo):
    y, _ = ex.sorted_ffn(x, data["index"], data["weight"], wi, wo, activation=jax.nn.relu)
    return jnp.sum(y)

  jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(data["x"], data["wi"], data["wo"]))
  float_scatter_adds = [line for line in jaxpr.splitlines()
                        if "scatter-add" in line and "f32[" in line.split("=")[0]]
  assert not float_scatter_adds, float_scatter_adds


# ------------------------------------------------------------------------------------------------
# The Flax module.
# ------------------------------------------------------------------------------------------------


def _routing(data):
  return Routing(jnp.asarray(data["index"]), jnp.asarray(data["weight"]), jnp.zeros(()), {})


def test_module_params_shapes_init_and_logical_axes():
  x = np.zeros((4, 16), np.float32)
  routing = Routing(jnp.zeros((4, 1), jnp.int32), jnp.ones((4, 1)), jnp.zeros(()), {})
  variables = jax.jit(ex.Experts(num_experts=8, d_ff=32, dispatch="sorted").init)(
      jax.random.key(0), x, routing)
  wi = variables["params"]["wi"]
  wo = variables["params"]["wo"]
  assert isinstance(wi, nn.LogicallyPartitioned)
  assert wi.value.shape == (8, 16, 32) and wo.value.shape == (8, 32, 16)
  assert wi.value.dtype == jnp.float32
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["wi"] == PartitionSpec("expert", "embed", "mlp")
  assert specs["wo"] == PartitionSpec("expert", "mlp", "embed")
  # Fan-in scaled per expert (the expert axis is a batch axis): std 1/sqrt(d) and 1/sqrt(d_ff).
  assert abs(float(jnp.std(wi.value)) * 4.0 - 1.0) < 0.1
  assert abs(float(jnp.std(wo.value)) * math.sqrt(32) - 1.0) < 0.1
  # Every expert initialised independently.
  assert not np.allclose(np.asarray(wi.value[0]), np.asarray(wi.value[1]))


def _variables(data):
  """Module variables holding the case's weights (the module never re-initialises given params)."""
  return {"params": {"wi": jnp.asarray(data["wi"]), "wo": jnp.asarray(data["wo"])}}


@pytest.mark.parametrize("case,dispatch", [("top2", "auto"), ("multihash2", "capacity"),
                                           ("multihash4", "einsum")])
def test_module_matches_naive(case, dispatch):
  c = CASES[case]
  data = make_case(case, seed=8)
  module = ex.Experts(num_experts=c["experts"], d_ff=c["d_ff"], num_slices=c["slices"],
                      activation=c["act"], dispatch=dispatch)
  y, metrics = jax.jit(module.apply)(_variables(data), data["x"], _routing(data))
  expected = naive_numpy(data["x"], data["index"], data["weight"], data["wi"], data["wo"],
                         c["act"], c["slices"])
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=2e-5)
  assert set(metrics) == {"group_sizes", "dropped_fraction"}


def test_module_bfloat16_compute_is_close():
  data = make_case("multihash2", seed=9)
  routing = _routing(data)
  f32 = ex.Experts(num_experts=4, d_ff=16, num_slices=2, dispatch="sorted")
  bf16 = f32.clone(dtype=jnp.bfloat16)
  bf16_shapes = jax.eval_shape(bf16.init, jax.random.key(2), data["x"], routing)
  assert nn.unbox(bf16_shapes["params"])["wi"].dtype == jnp.float32  # params stay float32
  y32, _ = jax.jit(f32.apply)(_variables(data), data["x"], routing)
  y16, _ = jax.jit(bf16.apply)(_variables(data), data["x"], routing)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=5e-2, atol=5e-2)
  assert float(jnp.abs(y32).mean()) > 0.1  # the comparison is not between two zeros


def test_module_validation():
  data = make_case("top1")
  routing = _routing(data)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="num_experts"):
    ex.Experts(num_experts=0, d_ff=16).init(key, data["x"], routing)
  with pytest.raises(ValueError, match="activation"):
    ex.Experts(num_experts=4, d_ff=16, activation="tanh").init(key, data["x"], routing)
  with pytest.raises(ValueError, match="dispatch"):
    ex.Experts(num_experts=4, d_ff=16, dispatch="scatter").init(key, data["x"], routing)
  with pytest.raises(ValueError, match="dropless"):
    ex.Experts(num_experts=4, d_ff=16, dispatch="sorted", capacity_factor=1.0).init(
        key, data["x"], routing)
  with pytest.raises(ValueError, match="capacity_factor"):
    ex.Experts(num_experts=4, d_ff=16, dispatch="capacity", capacity_factor=0.0).init(
        key, data["x"], routing)
  bad_routing = Routing(routing.expert_index[:7], routing.combine_weight[:7], jnp.zeros(()), {})
  with pytest.raises(ValueError, match="tokens=32"):
    ex.Experts(num_experts=4, d_ff=16).init(key, data["x"], bad_routing)
  with pytest.raises(ValueError, match=r"\[tokens=32, 2\]"):
    ex.Experts(num_experts=4, d_ff=16, num_slices=2).init(key, data["x"], routing)


def test_module_capacity_factor_reaches_dropping_dispatch():
  data = make_case("top1", index=np.zeros((32, 1), np.int32))
  module = ex.Experts(num_experts=4, d_ff=16, dispatch="auto", capacity_factor=1.0)
  _, metrics = jax.jit(module.apply)(_variables(data), data["x"], _routing(data))
  # auto + capacity_factor -> "capacity": 8 slots for 32 tokens on one expert.
  np.testing.assert_allclose(float(metrics["dropped_fraction"]), 24 / 32)


# ------------------------------------------------------------------------------------------------
# Dispatch selection and the lazily imported dispatches.
# ------------------------------------------------------------------------------------------------


def test_choose_dispatch():
  assert ex.choose_dispatch("cpu") == "sorted"
  assert ex.choose_dispatch("tpu") == "pallas"
  assert ex.choose_dispatch("gpu") == "pallas"
  assert ex.choose_dispatch("cpu", capacity_factor=1.25) == "capacity"
  assert ex.choose_dispatch("tpu", capacity_factor=1.25) == "capacity"
  with pytest.raises(ValueError, match="unknown dispatch"):
    ex.dispatch_fn("auto")


def test_pallas_dispatch_uses_kernels_gmm(monkeypatch):
  calls = []

  def fake_gmm(lhs, rhs, group_sizes):
    calls.append((lhs.shape, rhs.shape, group_sizes.shape))
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)

  fake = types.ModuleType("hashmoe.kernels")
  fake.gmm = fake_gmm
  monkeypatch.setitem(sys.modules, "hashmoe.kernels", fake)
  data = make_case("multihash2", seed=10)
  fn = functools.partial(ex.dispatch_fn("pallas"), activation=jax.nn.relu, num_slices=2)
  y, _ = jax.jit(fn)(data["x"], data["index"], data["weight"], data["wi"], data["wo"])
  expected = naive_numpy(data["x"], data["index"], data["weight"], data["wi"], data["wo"],
                         "relu", 2)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=2e-5)
  # Two grouped matmuls over (slice, expert) groups: 2 slices x 4 experts.
  assert calls == [((64, 8), (8, 8, 8), (8,)), ((64, 16), (8, 16, 4), (8,))]


def test_expert_parallel_dispatch_forwards_arguments(monkeypatch):
  seen = {}

  def fake_expert_parallel_ffn(x, expert_index, combine_weight, wi, wo, **kwargs):
    seen.update(kwargs)
    return ex.sorted_ffn(x, expert_index, combine_weight, wi, wo,
                         activation=kwargs["activation"], num_slices=kwargs["num_slices"])

  fake = types.ModuleType("hashmoe.sharding")
  fake.expert_parallel_ffn = fake_expert_parallel_ffn
  monkeypatch.setitem(sys.modules, "hashmoe.sharding", fake)
  data = make_case("top1", seed=11)
  module = ex.Experts(num_experts=4, d_ff=16, dispatch="expert_parallel", capacity_factor=2.0,
                      dispatch_kwargs={"expert_axis": "expert"})
  y, _ = jax.jit(module.apply)(_variables(data), data["x"], _routing(data))
  assert seen["expert_axis"] == "expert" and seen["capacity_factor"] == 2.0
  assert seen["num_slices"] == 1 and seen["activation"] is jax.nn.relu
  expected = naive_numpy(data["x"], data["index"], data["weight"], data["wi"], data["wo"],
                         "relu", 1)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=2e-5)


# ------------------------------------------------------------------------------------------------
# Precomputed routing (hash layers): a host-side permutation replaces the on-device argsort.
# ------------------------------------------------------------------------------------------------


def numpy_sorted_assignments(index, num_experts, num_slices):
  """The grouping a stable sort by group gives, computed here with a python loop."""
  index = np.asarray(index)
  tokens, columns = index.shape
  num_groups = num_experts * (num_slices if num_slices > 1 else 1)
  buckets = [[] for _ in range(num_groups)]
  for j in range(columns):  # column-major assignment order a = j * tokens + t
    for t in range(tokens):
      buckets[(j if num_slices > 1 else 0) * num_experts + index[t, j]].append(j * tokens + t)
  perm = np.asarray([a for bucket in buckets for a in bucket], np.int32)
  inverse = np.empty_like(perm)
  inverse[perm] = np.arange(perm.size, dtype=np.int32)
  sizes = np.asarray([len(b) for b in buckets], np.int32)
  return expert_grouping.SortedAssignments(perm, inverse, sizes)


@functools.lru_cache(maxsize=None)
def _compiled_presorted(dispatch, act, num_slices, capacity_factor):
  fn = ex.dispatch_fn(dispatch)
  kwargs = {} if capacity_factor is None else {"capacity_factor": capacity_factor}

  def run(x, weight, wi, wo, index, r, presorted):
    def loss(x, weight, wi, wo):
      y, metrics = fn(x, index, weight, wi, wo, activation=ex.ACTIVATIONS[act],
                      num_slices=num_slices, sorted_assignments=presorted, **kwargs)
      return jnp.sum(y * r), (y, metrics)

    grads, (y, metrics) = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, weight, wi, wo)
    return y, metrics, grads

  return jax.jit(run)


@pytest.mark.parametrize("case,dispatch,capacity_factor", [
    ("top1", "sorted", None), ("top2", "sorted", None), ("multihash2", "sorted", None),
    ("multihash4", "sorted", None), ("multihash2", "ragged_dot", None), ("top2", "capacity", 0.75),
    ("multihash2", "capacity", 0.75)])
def test_precomputed_sort_gives_identical_values_and_grads(case, dispatch, capacity_factor):
  c = CASES[case]
  data = make_case(case, seed=12)
  presorted = numpy_sorted_assignments(data["index"], c["experts"], c["slices"])
  args = (data["x"], data["weight"], data["wi"], data["wo"], data["index"], data["r"])
  y, metrics, grads = _compiled_presorted(dispatch, c["act"], c["slices"], capacity_factor)(
      *args, presorted)
  y0, metrics0, grads0 = compiled(dispatch, c["act"], c["slices"], capacity_factor)(*args)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
  for got, want in zip(grads, grads0):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert float(metrics["sort_precomputed"]) == 1.0
  np.testing.assert_array_equal(metrics["group_sizes"], metrics0["group_sizes"])
  np.testing.assert_array_equal(metrics["dropped_fraction"], metrics0["dropped_fraction"])


@pytest.mark.parametrize("corruption", ["identity", "sizes_shifted", "other_routing",
                                        "not_a_permutation", "unstable"])
def test_mismatched_precomputed_sort_falls_back_to_argsort(corruption):
  c = CASES["top2"]
  data = make_case("top2", seed=13)
  good = numpy_sorted_assignments(data["index"], c["experts"], 1)
  num = good.permutation.size
  if corruption == "identity":
    bad = good._replace(permutation=np.arange(num, dtype=np.int32),
                        inverse_permutation=np.arange(num, dtype=np.int32))
  elif corruption == "sizes_shifted":
    bad = good._replace(group_sizes=np.roll(good.group_sizes, 1))
  elif corruption == "other_routing":
    bad = numpy_sorted_assignments((data["index"] + 1) % c["experts"], c["experts"], 1)
  elif corruption == "not_a_permutation":
    perm = good.permutation.copy()
    perm[0] = perm[1]
    bad = good._replace(permutation=perm)
  else:  # the first group's first two assignments swapped: grouped, but not stable
    perm = good.permutation.copy()
    perm[[0, 1]] = perm[[1, 0]]
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(num, dtype=np.int32)
    bad = expert_grouping.SortedAssignments(perm, inverse, good.group_sizes)
  args = (data["x"], data["weight"], data["wi"], data["wo"], data["index"], data["r"])
  y, metrics, grads = _compiled_presorted("sorted", c["act"], 1, None)(*args, bad)
  assert float(metrics["sort_precomputed"]) == 0.0
  y0, _, grads0 = compiled("sorted", c["act"], 1)(*args)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
  for got, want in zip(grads, grads0):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_precomputed_sort_shape_and_dtype_errors():
  data = make_case("top1")
  good = numpy_sorted_assignments(data["index"], 4, 1)
  call = functools.partial(ex.sorted_ffn, data["x"], data["index"], data["weight"], data["wi"],
                           data["wo"], activation=jax.nn.relu)
  with pytest.raises(ValueError, match=r"shape \(32,\) \(tokens \* columns\)"):
    call(sorted_assignments=good._replace(permutation=good.permutation[:-1]))
  with pytest.raises(ValueError, match=r"group_sizes of shape \(4,\)"):
    call(sorted_assignments=good._replace(group_sizes=good.group_sizes[:3]))
  with pytest.raises(TypeError, match="integer"):
    call(sorted_assignments=good._replace(group_sizes=good.group_sizes.astype(np.float32)))


def test_sort_matches():
  key = jnp.asarray([2, 0, 1, 0, 3], jnp.int32)  # 3 = inactive (num_groups = 3)
  perm = jnp.asarray([1, 3, 2, 0, 4], jnp.int32)
  inverse = jnp.asarray([3, 0, 2, 1, 4], jnp.int32)
  sizes = jnp.asarray([2, 1, 1], jnp.int32)
  assert bool(ex.sort_matches(key, perm, inverse, sizes))
  # Same groups, but group 0's assignments out of order: not the stable sort.
  assert not bool(ex.sort_matches(key, jnp.asarray([3, 1, 2, 0, 4]), jnp.asarray([3, 1, 2, 0, 4]),
                                  sizes))
  assert not bool(ex.sort_matches(key, perm, inverse, jnp.asarray([1, 2, 1])))
  assert not bool(ex.sort_matches(key, perm, jnp.asarray([3, 0, 2, 1, 3]), sizes))
  assert not bool(ex.sort_matches(key, jnp.asarray([1, 3, 2, 0, 5]), inverse, sizes))
  assert not bool(ex.sort_matches(key, perm, inverse, jnp.asarray([2, 2, -1])))


def test_module_uses_the_routings_precomputed_sort():
  c = CASES["multihash2"]
  data = make_case("multihash2", seed=14, weight=np.ones((32, 2)))
  presorted = numpy_sorted_assignments(data["index"], c["experts"], c["slices"])
  routing = _routing(data).replace(sorted_assignments=presorted)
  module = ex.Experts(num_experts=4, d_ff=16, num_slices=2, activation=c["act"])
  y, metrics = jax.jit(module.apply)(_variables(data), data["x"], routing)
  assert float(metrics["sort_precomputed"]) == 1.0
  expected = naive_numpy(data["x"], data["index"], data["weight"], data["wi"], data["wo"],
                         c["act"], 2)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=2e-5)
  # A dispatch without a sort ignores it.
  y1, metrics1 = jax.jit(module.clone(dispatch="einsum").apply)(_variables(data), data["x"],
                                                                routing)
  assert "sort_precomputed" not in metrics1
  np.testing.assert_allclose(np.asarray(y1), expected, rtol=1e-5, atol=2e-5)


def test_hash_router_to_experts_with_pipeline_precomputed_routing():
  from hashmoe import routing as routing_lib  # the wiring a model does; experts never import it
  rng = np.random.default_rng(15)
  vocab, experts, d = 50, 4, 8
  ids = rng.integers(0, vocab, size=(4, 8)).astype(np.int32)
  x = rng.normal(size=(32, d)).astype(np.float32)
  tables = hash_functions.build_multihash("random", 2, num_experts=experts, vocab_size=vocab, seed=0)
  router = routing_lib.HashRouter(experts, num_hashes=2, tables=tables)
  module = ex.Experts(num_experts=experts, d_ff=16, num_slices=2)
  presorted = expert_grouping.precompute_hash_routing([("token", tables)], token_ids=ids)

  @jax.jit
  def run(variables, x, features):
    r = router.apply({"hash_tables": variables["hash_tables"]}, x, features, deterministic=True)
    return module.apply({"params": variables["params"]}, x, r)

  feats = routing_lib.RouterFeatures(jnp.asarray(ids))
  params = module.init(jax.random.key(1), x,
                       router.apply(router.init(jax.random.key(0), x, feats, deterministic=True),
                                    x, feats, deterministic=True))
  tables_var = router.init(jax.random.key(0), x, feats, deterministic=True)
  variables = {"params": params["params"], "hash_tables": tables_var["hash_tables"]}
  y0, m0 = run(variables, x, feats)
  y1, m1 = run(variables, x, routing_lib.RouterFeatures(jnp.asarray(ids),
                                                        sorted_assignments=presorted))
  assert "sort_precomputed" not in m0 and float(m1["sort_precomputed"]) == 1.0
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))


@pytest.mark.parametrize("case", ["top1", "top2"])
def test_sorted_with_fused_cpu_ffn_matches_naive(case):
  c = CASES[case]
  data = make_case(case, seed=16)
  fn = functools.partial(ex.sorted_ffn, activation=ex.ACTIVATIONS[c["act"]], fuse_ffn=True)

  def loss(x, weight, wi, wo):
    y, _ = fn(x, data["index"], weight, wi, wo)
    return jnp.sum(y * data["r"]), y

  grads, y = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
      data["x"], data["weight"], data["wi"], data["wo"])
  expected = naive_numpy(data["x"], data["index"], data["weight"], data["wi"], data["wo"],
                         c["act"], 1)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=2e-5)
  kept = np.ones(data["index"].shape, bool)
  expected_grads = naive_grads_fn(c["act"], 1)(
      data["x"], data["weight"], data["wi"], data["wo"], data["index"], kept, data["r"])
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-5)
  with pytest.raises(ValueError, match="takes no group_matmul"):
    ex.sorted_ffn(data["x"], data["index"], data["weight"], data["wi"], data["wo"],
                  activation=jax.nn.relu, fuse_ffn=True, group_matmul=jax.lax.ragged_dot)
