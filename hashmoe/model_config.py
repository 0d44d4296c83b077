"""What a model is: `TransformerConfig` (with its `SparseConfig`), the paper's presets, and which of
its numbers are run-time inputs of the compiled programs rather than constants in them.

`hashmoe.models` builds the Flax modules from these and re-exports every name here; gin binds them
under `hashmoe.models.*` (configs/models/), the names model files have always written.

Paper presets (Section 5.1, ParlAI seq2seq on pushshift.io Reddit, 8008-token BPE):
`baseline_config` (2 encoder + 11 decoder layers, d=1024, D=4096, 16 heads), `wider_config`
(D=6144), `deeper_config` (22 decoder layers), and `tiny_config` for CPU tests.
`models.param_counts` gives 219.0M for Baseline (the paper: 222M; ParlAI adds biases and may use
more positions) and 747.5M total / 219.0M active with one 64-expert hash layer (the paper:
751M). The paper reports
755M for both Wider and Deeper, which the shapes it states do not reach (they give 273.6M and
403.7M); the presets follow the stated shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import gin
import jax.numpy as jnp
import numpy as np

from hashmoe import routers
from hashmoe.layers import REMAT_POLICIES, get_activation, remat_policy

_DTYPES = ("float32", "bfloat16", "float16")
# Hash keys that read features a decoding step does not have: the next token (oracle) and a frozen
# model's prediction of it. Such models can be scored but not decoded.
UNDECODABLE_KEYS = ("oracle_future", "predicted_future")
# Remat policies that name the sparse layers' dispatch: they need a sparse layer to mean anything.
_DISPATCH_POLICIES = frozenset({"save_dispatch", "dots_no_batch_and_dispatch"})


# --------------------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class SparseConfig:
  """Which FFNs are sparse, and the router they use (frozen, so gin can bind it and jit can hash
  it).

  Attributes:
    router: a `hashmoe.routers` config: `routers.Hash()` (fixed lookup table, Section 3; MultiHash
      with num_hashes > 1), `routers.Switch()` (learned top-1 on the hidden state),
      `routers.TokenSwitch()` (Switch on a learned embedding of the current token, the paper's
      hybrid, Table 6), `routers.Base()` (balanced assignment, BASE layers) or `routers.HashTopK()`
      (a hash picks `topk` experts per token). A family name ("switch") stands for that family's
      defaults. The router's own settings (hash key, MultiHash N, Switch's loss coefficients, ...)
      live in its config.
    num_experts: E.
    layers: 0-based indices of the decoder layers whose FFN is sparse (the paper's main runs use one
      sparse decoder layer late in the stack).
    encoder_layers: 0-based indices of sparse encoder layers (encoder-decoder only).
    capacity_factor: capacity per expert as a multiple of tokens/E; None = dropless. Switch's
      router decides the drops with it, and the experts size their dispatch buffers with it (a
      capacity dispatch under "auto"); with hash routing only the dispatch drops.
    dispatch: the experts' dispatch strategy ("auto", or one `hashmoe.experts.Experts` names).
    expert_d_ff: hidden size D of each expert (None: the dense `d_ff`). Many small experts
      (fine-grained, DeepSeekMoE) are a large num_experts with a small expert_d_ff.
    num_shared_experts: N experts every token uses besides its routed ones (DeepSeekMoE's shared
      experts, DeepSeek-V3 eq. 12: their outputs are added unweighted). Computed as one dense FFN
      of hidden size N * expert_d_ff at <layer>/moe/shared: with an elementwise activation that is
      exactly the sum of N expert FFNs of width expert_d_ff (their hidden units side by side), in
      one matmul pair and no dispatch; its weights shard like a dense FFN's ("mlp"), not over the
      expert axis. 0: none.
  """
  router: Union[routers.RouterConfig, str] = dataclasses.field(default_factory=routers.Hash)
  num_experts: int = 16
  layers: tuple[int, ...] = ()
  encoder_layers: tuple[int, ...] = ()
  capacity_factor: Optional[float] = None
  dispatch: str = "auto"
  expert_d_ff: Optional[int] = None
  num_shared_experts: int = 0

  def __post_init__(self):
    object.__setattr__(self, "router", routers.router_config(self.router))
    # gin and YAML hand over lists; freeze them so the config stays hashable.
    object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
    object.__setattr__(self, "encoder_layers", tuple(int(i) for i in self.encoder_layers))
    if self.num_experts < 1:
      raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
    if not self.layers and not self.encoder_layers:
      raise ValueError("SparseConfig names no sparse layers: set `layers` (decoder indices) "
                       "and/or `encoder_layers`, or use sparse=None for a dense model")
    for name, idx in (("layers", self.layers), ("encoder_layers", self.encoder_layers)):
      if len(set(idx)) != len(idx):
        raise ValueError(f"SparseConfig.{name} repeats an index: {idx}")
    self.router.check(self.num_experts)
    self.router.check_layers(len(self.layers) + len(self.encoder_layers))
    if not isinstance(self.num_shared_experts, (int, np.integer)) or self.num_shared_experts < 0:
      raise ValueError(f"SparseConfig.num_shared_experts must be an int >= 0, got "
                       f"{self.num_shared_experts!r}")
    if self.capacity_factor is not None and self.capacity_factor <= 0:
      raise ValueError(f"capacity_factor must be positive or None, got {self.capacity_factor}")

  def flat_fields(self) -> dict[str, Any]:
    """{field: value} under the flat field names SparseConfig had before routers were objects
    ("router" the family's name, "hash_key", "num_hashes", "balance_coef", ...): what checkpoints
    record, so that one written before the change compares equal to the same model now."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    if not self.num_shared_experts:
      # Recorded only when set, so a checkpoint written before the field existed records the
      # same settings as the same model now. (A change from N shared experts to none still fails
      # on resume: the parameter layout differs.)
      del fields["num_shared_experts"]
    return {**fields, **self.router.flat_fields()}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Shape of a pre-norm transformer (frozen, so gin can bind it and jit can hash it).

  The architecture follows from the config: `num_encoder_layers > 0` is an encoder-decoder
  (`EncoderDecoder`), 0 a decoder-only LM (`DecoderLM`); `build_model` picks.

  Attributes:
    vocab_size: V, shared by encoder, decoder and output projection.
    d_model, d_ff: model width d and dense FFN hidden size D.
    num_heads, head_dim: attention shape (num_heads * head_dim need not equal d_model).
    num_layers: decoder layers.
    num_encoder_layers: encoder layers (0 = decoder-only).
    max_len: number of learned positions; positions must lie in [0, max_len).
    dropout_rate: embedding, residual-branch and FFN-hidden dropout.
    attention_dropout_rate: dropout on attention probabilities.
    dtype: compute dtype name, "float32" (default) or "bfloat16"; parameters stay float32.
    activation: FFN activation name (`hashmoe.activations.ACTIVATIONS`).
    norm: "layernorm" or "rmsnorm".
    position_embedding: "learned" (ParlAI's) or "sinusoidal".
    share_embeddings: tie the output projection to the token embedding (logits = h E^T / sqrt(d)).
    sparse: a `SparseConfig`, or None for a dense model.
    scan_layers: run each run of consecutive dense layers under `nn.scan`: one compiled layer body
      per run, its parameters stacked along a leading "layers" axis in one module named
      "<stack>_<first>_to_<last>" ("decoder_0_to_10"). Sparse layers stay unrolled under their
      own names ("decoder_11"): each has its own hash tables, router ordinal and sown metrics, which
      one scanned body could not hold apart. Same losses and gradients as unrolled (dropout masks
      differ: scan splits the dropout key per layer). Checkpoints of the two layouts convert with
      `stack_layers` / `unstack_layers`.
    remat_policy: what each layer keeps for the backward pass, a `hashmoe.layers.REMAT_POLICIES`
      name: "none" (keep everything), "full", "dots", "dots_no_batch", "save_dispatch",
      "dots_no_batch_and_dispatch". Gradients are the same under every policy.
  """
  vocab_size: int = 8008
  d_model: int = 1024
  d_ff: int = 4096
  num_heads: int = 16
  head_dim: int = 64
  num_layers: int = 11
  num_encoder_layers: int = 2
  max_len: int = 512
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  dtype: str = "float32"
  activation: str = "relu"
  norm: str = "layernorm"
  position_embedding: str = "learned"
  share_embeddings: bool = True
  sparse: Optional[SparseConfig] = None
  scan_layers: bool = False
  remat_policy: str = "none"

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_ff", "num_heads", "head_dim", "num_layers", "max_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.num_encoder_layers < 0:
      raise ValueError(f"num_encoder_layers must be >= 0, got {self.num_encoder_layers}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
    for name, value in (("dropout_rate", self.dropout_rate),
                        ("attention_dropout_rate", self.attention_dropout_rate)):
      if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    get_activation(self.activation)
    if self.norm not in ("layernorm", "rmsnorm"):
      raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
    if self.position_embedding not in ("learned", "sinusoidal"):
      raise ValueError(
          f"position_embedding must be 'learned' or 'sinusoidal', got {self.position_embedding!r}")
    remat_policy(self.remat_policy)
    s = self.sparse
    if self.remat_policy in _DISPATCH_POLICIES and s is None:
      raise ValueError(f"remat_policy={self.remat_policy!r} keeps the sparse layers' dispatch, but "
                       "the model has no sparse layers (sparse=None); choose one of "
                       f"{sorted(set(REMAT_POLICIES) - _DISPATCH_POLICIES)}")
    if s is None:
      return
    if not isinstance(s, SparseConfig):
      raise TypeError(f"sparse must be a SparseConfig or None, got {type(s).__name__}")
    for name, idx, n in (("layers", s.layers, self.num_layers),
                         ("encoder_layers", s.encoder_layers, self.num_encoder_layers)):
      bad = [i for i in idx if not 0 <= i < n]
      if bad:
        raise ValueError(f"SparseConfig.{name} has indices {bad} outside [0, {n}) "
                         f"(the model has {n} such layers)")
    if self.scan_layers:
      dense = (self.num_layers - len(s.layers)
               + self.num_encoder_layers - len(s.encoder_layers))
      if dense == 0:
        raise ValueError("scan_layers=True scans runs of dense layers, but every layer of this "
                         f"model is sparse (SparseConfig.layers={s.layers}, encoder_layers="
                         f"{s.encoder_layers}): nothing to scan; set scan_layers=False")
    expert_d_ff = s.expert_d_ff or self.d_ff
    slices = s.router.num_slices
    if self.d_model % slices or expert_d_ff % slices:
      raise ValueError(f"MultiHash with num_hashes={slices} splits d_model={self.d_model} "
                       f"and expert_d_ff={expert_d_ff} into equal slices; both must divide by it")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def is_encoder_decoder(self) -> bool:
    return self.num_encoder_layers > 0

  def replace(self, **changes: Any) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)


def baseline_config(vocab_size: int = 8008, **overrides: Any) -> TransformerConfig:
  """The paper's "Baseline" seq2seq transformer: 2 encoder + 11 decoder layers, d=1024, D=4096, 16
  heads of 64, learned positions, shared embeddings (Section 5.1; 222M parameters in the paper)."""
  fields = dict(vocab_size=vocab_size, d_model=1024, d_ff=4096, num_heads=16, head_dim=64,
                num_layers=11, num_encoder_layers=2, max_len=512, dropout_rate=0.1)
  fields.update(overrides)
  return TransformerConfig(**fields)


def wider_config(vocab_size: int = 8008, **overrides: Any) -> TransformerConfig:
  """The paper's dense "Wider" baseline: Baseline with D=6144."""
  return baseline_config(vocab_size, **{"d_ff": 6144, **overrides})


def deeper_config(vocab_size: int = 8008, **overrides: Any) -> TransformerConfig:
  """The paper's dense "Deeper" baseline: Baseline with 22 decoder layers."""
  return baseline_config(vocab_size, **{"num_layers": 22, **overrides})


def tiny_config(vocab_size: int = 64, **overrides: Any) -> TransformerConfig:
  """A CPU-test size: d=32, D=64, 2 heads of 16, 2 encoder + 2 decoder layers, max_len 64."""
  fields = dict(vocab_size=vocab_size, d_model=32, d_ff=64, num_heads=2, head_dim=16,
                num_layers=2, num_encoder_layers=2, max_len=64, dropout_rate=0.0)
  fields.update(overrides)
  return TransformerConfig(**fields)




def runtime_loss_coefficients(config: TransformerConfig) -> dict[str, np.float32]:
  """{name: float32 value} of the loss coefficients of `config`'s router that a trainer feeds its
  steps at run time (`routers.RouterConfig.runtime_coefficients`, read through
  `routing.runtime_loss_coefficients`); {} for a dense model or a router without any."""
  if config.sparse is None:
    return {}
  router = config.sparse.router
  return {name: np.float32(getattr(router, name)) for name in type(router).runtime_coefficients}


def program_config(config: TransformerConfig) -> TransformerConfig:
  """`config` with its run-time loss coefficients (`runtime_loss_coefficients`) set to 0: configs
  that differ only in them trace to the same programs, so this is what compiled programs are
  shared by."""
  values = runtime_loss_coefficients(config)
  if not values:
    return config
  router = dataclasses.replace(config.sparse.router, **{name: 0.0 for name in values})
  return dataclasses.replace(config, sparse=dataclasses.replace(config.sparse, router=router))


# gin: the configs a model file binds (configs/models/), under the names configs already write.
# external_configurable leaves the classes and functions above as they are (not wrapped): called
# from Python they never read gin bindings.
for _fn in (TransformerConfig, SparseConfig, baseline_config, wider_config, deeper_config,
            tiny_config):
  gin.external_configurable(_fn, module="hashmoe.models")
del _fn
