"""Routers: who handles each token.

Every router returns the same small value, `Routing`; the experts never ask which router made it.
"""
from __future__ import annotations

from typing import Any, Optional

import flax
import jax


@flax.struct.dataclass
class RouterFeatures:
  """Per-token integer features a router may key on (all `int32[batch, length]`).

  `targets` (the next token) is only for the oracle-future hash; `predicted_ids` is a frozen dense
  baseline's argmax prediction of the next token (predicted-future hash). `segment_ids` marks packed
  sequences (0 = padding) so that previous-token/bigram keys never cross a sequence boundary.
  """
  token_ids: jax.Array
  positions: Optional[jax.Array] = None
  segment_ids: Optional[jax.Array] = None
  targets: Optional[jax.Array] = None
  predicted_ids: Optional[jax.Array] = None


@flax.struct.dataclass
class Routing:
  """Where each token goes and with what weight.

  Attributes:
    expert_index: int32[tokens, num_hashes]; num_hashes is 1 except for MultiHash (one column per
      slice) and hash-selected top-k (one column per selected expert).
    combine_weight: float32[tokens, num_hashes]; 1.0 for hash routing, the router probability for
      Switch, 0.0 for a token dropped by a capacity limit (it then passes through the residual).
    aux_loss: float32[]; the auxiliary loss to add to the objective (0 for hash routing).
    metrics: dict of float32 arrays explaining the routing (per-expert load, dropped fraction, ...).
  """
  expert_index: jax.Array
  combine_weight: jax.Array
  aux_loss: jax.Array
  metrics: dict[str, Any]
