"""The optimizer: a learning-rate schedule and AdamW with clipping, optionally freezing one part.

Fine-tuning (paper Section 5.4, BST) keeps the sparse part (routers and experts) or the dense part
fixed: `param_labels` tells them apart by the module they sit in.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import flax
import gin
import jax
import jax.numpy as jnp
import optax

PyTree = Any

SPARSE, DENSE = "sparse", "dense"
# Any parameter under a module of this name belongs to a sparse layer (router or experts): the
# models build each sparse FFN as `<layer>/moe/{router,experts}` (`hashmoe.models._make_layer`).
SPARSE_MODULE = "moe"

# The gin names (`hashmoe.train.learning_rate_schedule`, `hashmoe.train.make_optimizer`) are public
# API that configs and users write; they keep the module they had before the trainer was split.


@gin.configurable(module="hashmoe.train")
def learning_rate_schedule(peak: float = 1e-3, *, warmup_steps: int = 1000, decay: str = "rsqrt",
                           total_steps: Optional[int] = None,
                           end_fraction: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0 to `peak` over `warmup_steps`, then a decay.

  decay:
    "rsqrt"    inverse square root, `peak * sqrt(warmup_steps / step)` (fairseq's `inverse_sqrt`,
               which the paper's fairseq and ParlAI setups use);
    "cosine"   half a cosine from `peak` at the end of warm-up to `end_fraction * peak` at
               `total_steps` (then constant);
    "constant" `peak` after warm-up.

  Returns:
    schedule(step int32[]) -> float32[]; `schedule(t)` is the rate used by update t + 1.
  """
  if peak <= 0 or not math.isfinite(peak):
    raise ValueError(f"learning rate peak must be a positive finite number, got {peak}")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
  if decay not in ("rsqrt", "cosine", "constant"):
    raise ValueError(f"decay must be 'rsqrt', 'cosine' or 'constant', got {decay!r}")
  if decay == "cosine" and (total_steps is None or total_steps <= warmup_steps):
    raise ValueError(f"cosine decay needs total_steps > warmup_steps={warmup_steps}, got "
                     f"total_steps={total_steps}")
  if not 0.0 <= end_fraction <= 1.0:
    raise ValueError(f"end_fraction must be in [0, 1], got {end_fraction}")

  def schedule(count):
    # optax counts updates from 0; the first update runs at "step 1" of the warm-up.
    step = jnp.asarray(count, jnp.float32) + 1.0
    warm = float(max(warmup_steps, 1))
    warmup = peak * jnp.minimum(step / warm, 1.0)
    if decay == "constant":
      after = jnp.float32(peak)
    elif decay == "rsqrt":
      after = peak * jnp.sqrt(warm / jnp.maximum(step, warm))
    else:
      frac = jnp.clip((step - warm) / float(total_steps - warmup_steps), 0.0, 1.0)
      cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
      after = peak * (end_fraction + (1.0 - end_fraction) * cosine)
    return jnp.where(step <= warm, warmup, after)

  return schedule


def _is_box(x: Any) -> bool:
  return isinstance(x, flax.core.meta.AxisMetadata)


def _unbox_leaf(x: Any) -> Any:
  return x.unbox() if _is_box(x) else x


def _path_keys(path: Sequence[Any]) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def param_labels(params: PyTree) -> PyTree:
  """"sparse" for every router or expert parameter (anything inside a sparse layer's `moe`
  block), "dense" for the rest. Accepts boxed (`nn.LogicallyPartitioned`) or plain trees and
  returns the same structure with a string per parameter."""
  def label(path, _):
    return SPARSE if SPARSE_MODULE in _path_keys(path) else DENSE
  return jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_box)


def _decay_mask(params: PyTree) -> PyTree:
  # Weight decay on matrices only: norms' scales and biases are not decayed (the usual AdamW
  # practice; decaying a LayerNorm scale pulls it towards 0, not towards identity).
  return jax.tree.map(lambda x: jnp.ndim(_unbox_leaf(x)) >= 2, params, is_leaf=_is_box)


@gin.configurable(module="hashmoe.train")
def make_optimizer(learning_rate: Union[float, optax.Schedule] = 1e-3, *,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.98,
                   eps: float = 1e-8, clip_norm: Optional[float] = 1.0,
                   freeze: Optional[str] = None) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, optionally freezing one part of the model.

  Args:
    learning_rate: a float or a schedule (`learning_rate_schedule`).
    weight_decay: decoupled weight decay (AdamW), applied to matrices only.
    b1, b2, eps: Adam's moments and epsilon (b2=0.98 as fairseq's transformer recipes).
    clip_norm: clip the global gradient norm to this value; None disables clipping.
    freeze: None (train everything), "sparse" (the paper's "freeze the sparse part" fine-tuning:
      routers and experts stay fixed) or "dense" (only routers and experts train). Frozen
      parameters get exactly zero updates (`optax.set_to_zero` under `optax.multi_transform`),
      hold no Adam moments, and are excluded from the clipping norm.

  Returns:
    An optax GradientTransformation over the model's parameter tree.
  """
  if freeze not in (None, SPARSE, DENSE):
    raise ValueError(f"freeze must be None, 'sparse' or 'dense', got {freeze!r}")
  if clip_norm is not None and not clip_norm > 0:
    raise ValueError(f"clip_norm must be positive or None, got {clip_norm}")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
  parts = []
  if clip_norm is not None:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=_decay_mask))
  tx = optax.chain(*parts)
  if freeze is None:
    return tx
  trained = DENSE if freeze == SPARSE else SPARSE
  # Frozen leaves are zeroed before the trained part sees the gradient, so clipping measures only
  # what is actually updated.
  return optax.multi_transform({trained: tx, freeze: optax.set_to_zero()}, param_labels)
