"""t5x's partitioner on hashmoe's mesh: experts over "expert", tokens over ("data", "expert").

`HashMoePartitioner` is t5x's `PjitPartitioner` on hashmoe's mesh (`hashmoe.sharding.make_mesh`:
axes ("data", "expert", "model") with the sizes a run names, the DATA_PARALLEL / EXPERT_PARALLEL /
MODEL_PARALLEL macros of hashmoe's own trainer) and, by default, hashmoe's single table of
logical-axis rules (`hashmoe.sharding.LOGICAL_AXIS_RULES`): expert weights [E, d, D] over
"expert", the FFN hidden dimension, heads and vocabulary over "model", batches over
("data", "expert"). t5x's `PjitPartitioner` reads its data axes from the "batch" rule, so the
input batches, the data layout (per-host shards) and t5x's own sharding annotations follow
("data", "expert") with nothing else overridden. t5x's pjit runs the step under its mesh, where
flax's logical constraints and hashmoe's "expert_parallel" dispatch (a shard_map with all-to-alls
over "expert") find it (tests/test_t5x.py checks the all-to-all groups of a compiled step).

t5x's own mesh (`default_mesh`) is not used: on CPU and GPU hosts it puts every local device on
"model", so an 8-device host would get no expert parallelism at all.

Why not `t5x.contrib.moe.partitioning.MoePjitPartitioner`: it builds its mesh from t5x's default
mesh (the problem above) and orders the batch as ("expert", "data"), the transpose of what
hashmoe's rules and its all-to-all dispatch use (every sparse layer would reshuffle tokens); and
it comes with `MoeTrainer`, which multiplies expert gradients by the number of expert partitions
to undo the per-group loss scaling of flaxformer's MoE layers. hashmoe's gradients are exact under
pjit (tests/test_t5x.py compares sharded t5x SGD steps with unsharded ones), so that rescaling
would be wrong: use t5x's plain `trainer.Trainer` with this partitioner. (Its Adafactor override
targets flaxformer's ".*expert.*/kernel" names; the configs here use AdamW through optax, whose
moments t5x shards like the parameters.)
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import cached_property
from jax.sharding import Mesh
from t5x import partitioning as t5x_partitioning

from hashmoe import sharding

LogicalRules = Sequence[tuple[str, Union[None, str, tuple[str, ...]]]]

def standard_logical_axis_rules(additional_rules: LogicalRules = ()
                                ) -> tuple[tuple[str, Any], ...]:
  """hashmoe's logical-axis rules for t5x: `sharding.LOGICAL_AXIS_RULES` (experts over "expert",
  batch over ("data", "expert"), FFN hidden / heads / vocabulary over "model"), then
  `additional_rules` (for names a model adds; the hash tables need none: their axes are
  annotated None, replicated, by `hashmoe.t5x.models.t5x_variables`).

  Rules are tried in order (flax semantics), so `additional_rules` cannot override a name the
  table already maps; pass a complete table to `HashMoePartitioner.logical_axis_rules` for that.
  """
  return tuple(sharding.LOGICAL_AXIS_RULES) + tuple(additional_rules)


class HashMoePartitioner(t5x_partitioning.PjitPartitioner):
  """t5x's `PjitPartitioner` on hashmoe's ("data", "expert", "model") mesh and rules (see the
  module docstring).

  Attributes (constructor arguments):
    data, expert, model: mesh axis sizes as `hashmoe.sharding.make_mesh` takes them (one may be
      -1: the devices left over). The number of experts of every sparse layer must divide by
      `expert`, and the global batch by `data * expert`.
    logical_axis_rules: the rules; default `standard_logical_axis_rules()`.
    params_on_devices: t5x's flag (keep parameters on the devices).
  """

  def __init__(self, data: int = -1, expert: int = 1, model: int = 1, *,
               logical_axis_rules: Optional[LogicalRules] = None,
               params_on_devices: bool = True):
    rules = tuple(standard_logical_axis_rules() if logical_axis_rules is None
                  else logical_axis_rules)
    self._mesh_sizes = {"data": data, "expert": expert, "model": model}
    # t5x's base class insists on num_partitions or a submesh; the mesh itself comes from `mesh`.
    super().__init__(num_partitions=max(int(model), 1), params_on_devices=params_on_devices,
                     logical_axis_rules=rules)
    batch_axes = self._data_axis if isinstance(self._data_axis, tuple) else (self._data_axis,)
    unknown = [a for a in batch_axes if a not in sharding.MESH_AXES]
    if not batch_axes or None in batch_axes or unknown:
      raise ValueError(f"the 'batch' rule maps to mesh axes {self._data_axis!r}; expected axes of "
                       f"{sharding.MESH_AXES} (hashmoe's default is {sharding.TOKEN_MESH_AXES})")

  @cached_property.cached_property
  def mesh(self) -> Mesh:
    return sharding.make_mesh(**self._mesh_sizes)
