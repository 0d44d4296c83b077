"""Hash routing precomputed in the input pipeline: the design's static gather, used.

A hash layer sends a token to `table[key(token ids)]` (Roller et al. 2021, §3): its expert is
known from the batch alone, before the step. So the input pipeline works it out on the host, for
every batch, and the device skips the argsort that groups a layer's assignments by expert:

  host (each process, its own rows; in the loader's read threads where it has them)
    `HostRouting(batch)`: per distinct (stack, key, table) of the model's hash layers, the keys
    (`hashing.routing_keys`, from the features the model itself hands its routers) and each row's
    grouping (`expert_grouping.row_routing`: every assignment's rank among the row's assignments of
    its expert, and per-row counts), added to the batch as "hash_routing:<router path>:ranks" and
    ":counts" (`expert_grouping.row_routing_feature_names`).
  device (inside the jitted step)
    each hash router finds its path's entry (`RouterFeatures.row_routing`) and assembles the
    global batch's permutation and group sizes with cumulative sums and one scatter
    (`expert_grouping.assemble_sorted_assignments`); the experts check it (`experts.sort_matches`)
    and use it instead of sorting.

No host knows the global permutation (its rows are a slice of the global batch, itself sharded over
devices), which is why the pieces are row-local: the offsets that depend on other rows are the
device's cumulative sums. The result is bit for bit the stable argsort's, so a run computes the same
numbers with the switch (`train.precompute_routing`) on or off.

Per-batch expert loads are then known before the step (`HostRouting.expert_counts`); the loop logs
them (`host_load_record`).

`plan` decides which layers qualify, logging once why others do not: hash routers only (learned
routers route on hidden states), dispatches that take a precomputed sort
(`experts.PRESORTED_DISPATCHES`; not `einsum` or `expert_parallel`), and, per batch, keys whose
features the batch carries (a predicted-future key needs `predicted_ids`). Those sort on device.
Encoder layers key on the encoder's features, decoder layers on the decoder's, as the model does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from hashmoe import experts as experts_lib
from hashmoe import expert_grouping, hashing, models, tables

logger = logging.getLogger(__name__)

PyTree = Any

# Why a layer sorts on device is said once per process, not once per batch.
_LOGGED: set[str] = set()
_LOG_LOCK = threading.Lock()


def _log_once(message: str) -> None:
  with _LOG_LOCK:
    if message in _LOGGED:
      return
    _LOGGED.add(message)
  logger.info(message)


@dataclasses.dataclass(frozen=True)
class HashLayer:
  """One hash router whose routing the host computes.

  Attributes:
    path: the router's module path, "decoder_1/moe/router": the name its row routing travels
      under, and where its table lives in the "hash_tables" collection.
    stack: "encoder" or "decoder": whose features (tokens, positions, segments) the key reads.
    key: what the table is looked up with (`hashing.KEYS`).
    columns: int32[H, key_space], column c's expert per key id (`RouterConfig.table_columns`).
    num_experts: E.
  """
  path: str
  stack: str
  key: str
  columns: np.ndarray
  num_experts: int

  @property
  def layer(self) -> str:
    """The layer that holds the router ("decoder_1"): the name `models.collect_aux` gives the
    layer's device metrics (the path of the module owning the sparse block "moe")."""
    return self.path.rsplit("/", 2)[0]

  def group(self) -> tuple[str, str, str]:
    """Layers with equal groups put every token in the same groups: one computation serves all."""
    digest = hashlib.sha256(np.ascontiguousarray(self.columns, np.int32).tobytes()).hexdigest()
    return (self.stack, self.key, f"{self.columns.shape}:{digest}")


def _positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
  """numpy twin of `models.positions_from_segments`: positions restarting at each segment."""
  length = segment_ids.shape[-1]
  index = np.broadcast_to(np.arange(length, dtype=np.int32), segment_ids.shape)
  starts = np.concatenate([np.ones_like(segment_ids[:, :1], dtype=bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)


def stack_features(batch: Mapping[str, Any], stack: str) -> Optional[dict[str, Any]]:
  """The integer features the model hands the routers of `stack` ("encoder" or "decoder"), as
  numpy: token_ids, positions (the batch's, else from segment ids, else 0..length-1, as
  `models._positions`), segment_ids, and for the decoder targets and predicted_ids. None when the
  batch has no `<stack>_input_tokens`."""
  tokens = batch.get(f"{stack}_input_tokens")
  if tokens is None:
    return None
  tokens = np.asarray(tokens)
  segments = batch.get(f"{stack}_segment_ids")
  segments = None if segments is None else np.asarray(segments)
  if f"{stack}_positions" in batch:
    positions = np.asarray(batch[f"{stack}_positions"])
  elif segments is not None:
    positions = _positions_from_segments(segments)
  else:
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  features = {"token_ids": tokens, "positions": positions, "segment_ids": segments,
              "targets": None, "predicted_ids": None}
  if stack == "decoder":
    for name, feature in (("targets", "decoder_target_tokens"), ("predicted_ids", "predicted_ids")):
      if feature in batch:
        features[name] = np.asarray(batch[feature])
  return features


# The feature a key reads beyond the tokens, positions and segments every stack has.
_KEY_NEEDS = {"oracle_future": ("targets", "decoder_target_tokens"),
              "predicted_future": ("predicted_ids", "predicted_ids")}


class HostRouting:
  """Adds each batch's row-local hash routing to it (`__call__`), for the model's hash layers.

  Picklable and stateless, so grain's read threads (and worker processes) can run it.

  Attributes:
    layers: the hash layers it routes.
    vocab_size, max_len: the model's, for `models.validate_batch`, which runs first so that a bad
      batch is refused with the trainer's message, not a hash key's.
  """

  def __init__(self, layers: Sequence[HashLayer], *, vocab_size: int, max_len: int):
    if not layers:
      raise ValueError("HostRouting needs at least one hash layer")
    self.layers = tuple(layers)
    self.vocab_size, self.max_len = int(vocab_size), int(max_len)
    self._groups = [layer.group() for layer in self.layers]

  def __repr__(self) -> str:
    return f"HostRouting({[layer.path for layer in self.layers]})"

  def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
    """`batch` (this host's rows, {feature: int[rows, length]}) plus the two row-routing features
    of every hash layer whose key the batch can give; layers sharing (stack, key, table) share
    the arrays."""
    models.validate_batch(batch, self.vocab_size, self.max_len)
    out = dict(batch)
    computed: dict[tuple[str, str, str], Optional[expert_grouping.RowRouting]] = {}
    for layer, group in zip(self.layers, self._groups):
      if group not in computed:
        computed[group] = self._row_routing(layer, batch)
      pieces = computed[group]
      if pieces is not None:
        out.update(zip(expert_grouping.row_routing_feature_names(layer.path), pieces))
    return out

  def _row_routing(self, layer: HashLayer, batch: Mapping[str, Any]
                   ) -> Optional[expert_grouping.RowRouting]:
    features = stack_features(batch, layer.stack)
    if features is None:
      _log_once(f"precomputed routing: the batch has no {layer.stack}_input_tokens, so "
                f"{layer.path} sorts on device")
      return None
    if layer.key in _KEY_NEEDS:
      needed, feature = _KEY_NEEDS[layer.key]
      if features[needed] is None:
        _log_once(f"precomputed routing: {layer.path} hashes key {layer.key!r}, which needs the "
                  f"batch feature {feature!r}; without it the layer sorts on device")
        return None
    keys = hashing.routing_keys(layer.key, key_space=layer.columns.shape[1], **features)
    return expert_grouping.row_routing_of_columns(layer.columns, layer.num_experts, keys)

  def expert_counts(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{layer ("decoder_1"): int64[E]} assignments routed to each expert by the rows
    of `batch` (a batch this object has routed), summed over MultiHash slices / top-k columns and
    padding included: the work each expert will do, known before the step. Layers the batch has
    no routing for are left out."""
    out = {}
    for layer in self.layers:
      _, counts_name = expert_grouping.row_routing_feature_names(layer.path)
      if counts_name in batch:
        out[layer.layer] = np.asarray(batch[counts_name]).sum(axis=(0, 1), dtype=np.int64)
    return out


def plan(config: models.TransformerConfig, constants: PyTree, *,
         backend: Optional[str] = None) -> Optional[HostRouting]:
  """The `HostRouting` of a model whose state holds `constants`, or None (logged once, with the
  reason) when no layer of it can take routing from the host.

  Args:
    config: the model.
    constants: the state's non-trainable collections; the tables are read from its "hash_tables"
      (the ones the step will route with: built, loaded from files or restored).
    backend: what "auto" dispatch resolves on (default: jax's backend).
  """
  sparse = config.sparse
  if sparse is None:
    return None
  router = sparse.router
  if not router.uses_tables:
    _log_once(f"precomputed routing: router {router.name!r} routes on what the model computes, "
              "not on token ids; its experts sort on device")
    return None
  dispatch = sparse.dispatch
  if dispatch == "auto":
    dispatch = experts_lib.choose_dispatch(backend or jax.default_backend(),
                                           capacity_factor=sparse.capacity_factor)
  if dispatch not in experts_lib.PRESORTED_DISPATCHES:
    _log_once(f"precomputed routing: dispatch {dispatch!r} takes no precomputed sort (those that "
              f"do: {', '.join(experts_lib.PRESORTED_DISPATCHES)}); the hash layers sort on "
              "device")
    return None
  stored = constants.get(tables.HASH_TABLES, {}) if isinstance(constants, Mapping) else {}
  layers = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]:
    names = [str(getattr(p, "key", p)) for p in path]
    if names[-1] != "table":
      continue
    columns = router.table_columns(np.asarray(jax.device_get(leaf)))
    if columns is None:
      continue
    # The layer ("encoder_0", "decoder_7", as models names its stacks' layers) says whose
    # features the key reads.
    stack = names[0].rsplit("_", 1)[0]
    if stack not in ("encoder", "decoder"):
      raise ValueError(f"hash table at {'/'.join(names)} is in no encoder_i or decoder_i layer")
    layers.append(HashLayer(path="/".join(names[:-1]), stack=stack, key=router.key,
                            columns=columns, num_experts=sparse.num_experts))
  if not layers:
    _log_once("precomputed routing: the state holds no hash table the host can route with; "
              "the hash layers sort on device")
    return None
  _log_once(f"precomputed routing: the input pipeline groups the tokens of "
            f"{', '.join(layer.path for layer in layers)} by expert "
            f"({len({layer.group() for layer in layers})} distinct computations per batch); the "
            "device sorts nothing for them")
  return HostRouting(layers, vocab_size=config.vocab_size, max_len=config.max_len)


def host_load_record(steps: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Metrics of the host-known expert loads, per sparse layer, for a logged record.

  Args:
    steps: for each step since the last record, in order (the logged step last), the global
      batch's {layer: int[E]} expert counts (`HostRouting.expert_counts` summed over processes).

  Returns:
    {layer: {"host_expert_counts": [E] of the logged step, "host_load_max" (its busiest expert's
    assignments), "host_load_mean" (assignments / E), "host_load_max_over_mean" (1 is perfect
    balance), "host_load_max_over_mean_peak" (the largest max/mean over the steps given, so a
    spike between records is not lost)}}.
  """
  if not steps:
    return {}
  out: dict[str, dict[str, Any]] = {}
  for layer, counts in steps[-1].items():
    counts = np.asarray(counts, np.int64)
    mean = float(counts.sum()) / counts.size

    def ratio(c):
      c = np.asarray(c, np.int64)
      return float(c.max()) / max(float(c.sum()) / c.size, 1e-30)

    out[layer] = {
        "host_expert_counts": counts.tolist(),
        "host_load_max": int(counts.max()),
        "host_load_mean": mean,
        "host_load_max_over_mean": ratio(counts),
        "host_load_max_over_mean_peak": max(ratio(s[layer]) for s in steps if layer in s),
    }
  return out
