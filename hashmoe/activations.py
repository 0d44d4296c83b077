"""The FFN activations a config may name: one registry for the dense FFN, the experts and the
expert-parallel dispatch, so a name means the same function everywhere."""
from __future__ import annotations

from typing import Callable

import jax

Activation = Callable[[jax.Array], jax.Array]

ACTIVATIONS: dict[str, Activation] = {
    "relu": jax.nn.relu,  # the paper's (and the Transformer baseline's) FFN activation
    "gelu": jax.nn.gelu,  # tanh approximation, as GPT-2 / flaxformer / t5x "gelu"
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def get_activation(name: str) -> Activation:
  """The elementwise activation called `name` (one of `ACTIVATIONS`)."""
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(
        f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None
