"""Hash tables and routing keys for hash layers.

Roller et al. 2021, "Hash Layers For Large Sparse Models" (arXiv 2106.04426).

A hash layer sends token `x_t` to expert `table[key(x)_t]` (paper §3.1): a constant lookup with no
parameters. This module holds the two halves of that expression:

* **Tables** are data (`HashTable`: the array, its kind, seed and vocabulary fingerprint, and its
  file format), built once offline with numpy by `hashmoe.hash_functions` (random, balanced,
  clustered, dispersed, MultiHash sets of N tables (§3.2), the hash-selected top-k table), saved
  beside the checkpoint and verified against the vocabulary on load.
* **Keys** are the integer ids a table is looked up with (§3.1 and §5.3.2): the current token, the
  previous token, a bigram hash, the position, the oracle next token and a baseline's predicted next
  token. They are pure array functions that run on numpy inputs in the input pipeline or on jnp
  inputs under `jax.jit`.
Grouping a batch's assignments by expert from these ids, on the host (precomputed routing), is
`hashmoe.expert_grouping`.

Lookups use jnp; tables are numpy and never touch a device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
from typing import Any, Optional, Sequence, Union

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

TABLE_KINDS = ("random", "balanced", "clustered", "dispersed")
# DeepSeek-V4-style hash-selected top-k: int32[vocab, k] of k distinct experts per token.
TOPK_KIND = "balanced_topk"
# Every top-k table kind (`hash_functions.TOPK_BUILDERS`): the frequency-balanced one, and the
# initialisations other frameworks start from (Megatron-Core's round robin, a random permutation,
# the experts 0..k-1 of an unconverted MaxText table).
TOPK_KINDS = (TOPK_KIND, "roundrobin_topk", "random_topk", "zeros_topk")
KEYS = ("token", "prev_token", "bigram", "position", "oracle_future", "predicted_future")

# Key id used for "the token before the first token of a sequence" (prev_token and bigram keys).
# 0 is the padding/BOS id of T5/seqio vocabularies, so a sequence start looks like a token after
# padding, which is what it is in a packed batch.
BOUNDARY_ID = 0

# Version of the on-disk format written by `HashTable.save`; bump when the layout changes.
FORMAT_NAME = "hashmoe.HashTable"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]
ArrayLike = Union[np.ndarray, jax.Array]

_INT32_MAX = np.iinfo(np.int32).max


# ------------------------------------------------------------------------------------------------
# Vocabulary fingerprints and host-side id checks.


def vocabulary_fingerprint(pieces: Sequence[str]) -> str:
  """sha256 hex digest identifying a vocabulary by its pieces in id order.

  Each piece is length-prefixed (8-byte little-endian byte count of its UTF-8 encoding) so that the
  concatenation is unambiguous: ["ab", "c"] and ["a", "bc"] get different fingerprints. The number
  of pieces is hashed first for the same reason.

  Args:
    pieces: the vocabulary's pieces, `pieces[i]` being the text of id `i`.

  Returns:
    64 lowercase hex characters.
  """
  if isinstance(pieces, (str, bytes)):
    raise TypeError(f"pieces must be a sequence of strings, got a single {type(pieces).__name__}")
  digest = hashlib.sha256()
  digest.update(b"hashmoe.vocabulary.v1")
  digest.update(len(pieces).to_bytes(8, "little"))
  for i, piece in enumerate(pieces):
    if not isinstance(piece, str):
      raise TypeError(f"pieces[{i}] must be str, got {type(piece).__name__}: {piece!r}")
    data = piece.encode("utf-8", "surrogatepass")
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)
  return digest.hexdigest()


def is_tracer(x: Any) -> bool:
  """Whether `x` is being traced (under jit/grad): its values are unknown, so the host-side checks
  of ids (here, in `hashmoe.routing` and `hashmoe.models.validate_batch`) cannot run."""
  return isinstance(x, jax.core.Tracer)


def check_token_ids(ids: ArrayLike, vocab_size: int, name: str = "token_ids") -> None:
  """Raises ValueError if a concrete id array holds ids outside `[0, vocab_size)`.

  JAX gathers clamp (or fill) out-of-range indices silently, so a table lookup with a bad id would
  route the token to some expert without complaint. This check runs on the host (numpy arrays, and
  jax arrays that are not being traced: the min/max are reduced on device and only two scalars come
  back). Under tracing it is a no-op: values are unknown there.

  Args:
    ids: int[...] key ids.
    vocab_size: the number of valid ids.
    name: how to call `ids` in the error message.
  """
  if is_tracer(ids):
    return
  # Reduce on the device (two scalars come back), but inside any ambient trace evaluate eagerly:
  # a concrete array captured by a jitted function would otherwise have its min/max staged.
  with jax.ensure_compile_time_eval():
    xp = jnp if isinstance(ids, jax.Array) else np
    if xp is np:
      ids = np.asarray(ids)
    if not (jnp.issubdtype(ids.dtype, jnp.integer) and ids.dtype != jnp.bool_):
      raise TypeError(f"{name} must have an integer dtype, got {ids.dtype}")
    if ids.size == 0:
      return
    lo, hi = int(xp.min(ids)), int(xp.max(ids))
    if lo >= 0 and hi < vocab_size:
      return
    bad = (ids < 0) | (ids >= vocab_size)
    num_bad = int(xp.sum(bad))
    bad_min = int(xp.min(xp.where(bad, ids, hi)))
    bad_max = int(xp.max(xp.where(bad, ids, lo)))
  raise ValueError(
      f"{name}: {num_bad} of {ids.size} ids are outside [0, {vocab_size}) "
      f"(offending ids range from min={bad_min} to max={bad_max}; vocab_size={vocab_size})")


def validate_counts(token_counts: Any, vocab_size: int, name: str = "token_counts") -> np.ndarray:
  """Returns token_counts as int64[vocab] (integer input) or float64[vocab] (real input)."""
  counts = np.asarray(token_counts)
  if counts.shape != (vocab_size,):
    raise ValueError(f"{name} must have shape ({vocab_size},) (vocab_size), got {counts.shape}")
  if np.issubdtype(counts.dtype, np.integer):
    counts = counts.astype(np.int64)
  elif np.issubdtype(counts.dtype, np.floating):
    counts = counts.astype(np.float64)
    if not np.isfinite(counts).all():
      raise ValueError(f"{name} must be finite; got {int((~np.isfinite(counts)).sum())} non-finite")
  else:
    raise TypeError(f"{name} must be integer or float, got {counts.dtype}")
  if counts.size and counts.min() < 0:
    raise ValueError(f"{name} must be >= 0, got min={counts.min()}")
  return counts



# ------------------------------------------------------------------------------------------------
# The table value.


def _check_fingerprint(fingerprint: Any, name: str) -> None:
  if not isinstance(fingerprint, str):
    raise TypeError(f"{name} must be a str, got {type(fingerprint).__name__}")
  is_sha256 = len(fingerprint) == 64 and all(c in "0123456789abcdef" for c in fingerprint)
  if fingerprint and not is_sha256:
    raise ValueError(
        f"{name} must be '' (unknown) or 64 lowercase hex characters (a sha256 from "
        f"vocabulary_fingerprint), got {fingerprint!r}")


@dataclasses.dataclass(frozen=True)
class HashTable:
  """A fixed map from key ids to experts.

  Attributes:
    kind: how it was built: one of TABLE_KINDS, or of TOPK_KINDS for a top-k table.
    table: int32[vocab_size] (one expert per key id) or int32[vocab_size, k] (k distinct experts per
      key id, a kind of TOPK_KINDS); entries in [0, num_experts). Stored read-only.
    num_experts: number of experts (buckets).
    vocab_size: number of key ids the table covers: the vocabulary size for token keys, the key
      space (see `key_space_size`) for position/bigram keys.
    seed: the seed it was built with (0 for deterministic kinds).
    vocab_fingerprint: `vocabulary_fingerprint` of the vocabulary it was built for; "" when unknown
      (then only the size is checked).
  """
  kind: str
  table: np.ndarray
  num_experts: int
  vocab_size: int
  seed: int = 0
  vocab_fingerprint: str = ""

  def __post_init__(self):
    if self.kind not in TABLE_KINDS + TOPK_KINDS:
      raise ValueError(f"kind must be one of {TABLE_KINDS + TOPK_KINDS}, got {self.kind!r}")
    for name in ("num_experts", "vocab_size", "seed"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
      object.__setattr__(self, name, int(value))
    if self.num_experts < 1:
      raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
    if self.vocab_size < 1:
      raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
    _check_fingerprint(self.vocab_fingerprint, "vocab_fingerprint")

    table = self.table
    if not isinstance(table, np.ndarray):
      raise TypeError(f"table must be a numpy array, got {type(table).__name__}")
    if not np.issubdtype(table.dtype, np.integer):
      raise TypeError(f"table must have an integer dtype, got {table.dtype}")
    want_ndim = 2 if self.kind in TOPK_KINDS else 1
    if table.ndim != want_ndim or table.shape[0] != self.vocab_size:
      want = "[vocab_size, k]" if want_ndim == 2 else "[vocab_size]"
      raise ValueError(
          f"table for kind {self.kind!r} must have shape {want} with vocab_size={self.vocab_size}, "
          f"got shape {table.shape}")
    if table.ndim == 2 and not 1 <= table.shape[1] <= self.num_experts:
      raise ValueError(
          f"top-k table needs 1 <= k <= num_experts={self.num_experts}, got k={table.shape[1]}")
    lo, hi = int(table.min()), int(table.max())
    if lo < 0 or hi >= self.num_experts:
      raise ValueError(
          f"table entries must be in [0, num_experts={self.num_experts}), got min={lo}, max={hi}")
    if table.ndim == 2 and table.shape[1] > 1:
      ordered = np.sort(table, axis=1)
      repeated = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
      if repeated.size:
        raise ValueError(
            f"top-k table rows must hold k distinct experts; {repeated.size} rows repeat one, "
            f"e.g. id {repeated[0]}: {table[repeated[0]].tolist()}")
    table = np.array(table, dtype=np.int32, order="C", copy=True)
    table.flags.writeable = False
    object.__setattr__(self, "table", table)

  # ndarray fields make the generated __eq__/__hash__ unusable (array truth value, unhashable).
  def __eq__(self, other: Any) -> bool:
    if not isinstance(other, HashTable):
      return NotImplemented
    return (self._metadata_tuple() == other._metadata_tuple()
            and self.table.shape == other.table.shape and np.array_equal(self.table, other.table))

  def __hash__(self) -> int:
    return hash(self._metadata_tuple() + (self.table.shape, self.table.tobytes()))

  def _metadata_tuple(self) -> tuple[Any, ...]:
    return (self.kind, self.num_experts, self.vocab_size, self.seed, self.vocab_fingerprint)

  @property
  def k(self) -> int:
    """Experts per key id: 1, or k for a top-k table."""
    return 1 if self.table.ndim == 1 else self.table.shape[1]

  # -- statistics ----------------------------------------------------------------------------------

  def load_stats(self, token_counts: ArrayLike) -> dict[str, Any]:
    """Per-expert load of a corpus routed through this table (paper Figure 4).

    Args:
      token_counts: float/int[vocab_size] occurrences of each key id in the corpus. For a top-k
        table each id's count goes to each of its k experts.

    Returns:
      dict with `expert_load` float64[num_experts] (fraction of routed assignments per expert,
      sums to 1), `max_over_mean` (max load / mean load; 1 is perfect), `cv` (population standard
      deviation of the loads over their mean; 0 is perfect), `entropy` (nats, of the load
      distribution) and `normalized_entropy` (entropy / log num_experts; 1 is perfect, defined as
      1 for one expert).
    """
    counts = validate_counts(token_counts, self.vocab_size)
    total = float(counts.sum()) * self.k
    if total <= 0:
      raise ValueError("token_counts sum to 0: there is no load to measure")
    weights = np.repeat(counts.astype(np.float64), self.k)
    load = np.bincount(self.table.reshape(-1), weights=weights, minlength=self.num_experts) / total
    mean = 1.0 / self.num_experts
    nonzero = load[load > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum())
    log_e = np.log(self.num_experts)
    return {
        "expert_load": load,
        "max_over_mean": float(load.max() / mean),
        "cv": float(load.std() / mean),
        "entropy": entropy,
        "normalized_entropy": float(entropy / log_e) if self.num_experts > 1 else 1.0,
    }

  # -- vocabulary checks ---------------------------------------------------------------------------

  def check_vocabulary(self, vocab_size: int, vocab_fingerprint: Optional[str] = None) -> None:
    """Raises ValueError unless this table was built for the given vocabulary.

    Args:
      vocab_size: the size the table must cover.
      vocab_fingerprint: the vocabulary's `vocabulary_fingerprint`; None or "" skips the check, as
        does a table whose own fingerprint is unknown ("").
    """
    if int(vocab_size) != self.vocab_size:
      raise ValueError(
          f"hash table ({self.kind}) was built for vocab_size={self.vocab_size}, but the model's "
          f"vocabulary has vocab_size={vocab_size}")
    if vocab_fingerprint and self.vocab_fingerprint and vocab_fingerprint != self.vocab_fingerprint:
      raise ValueError(
          f"hash table ({self.kind}) was built for the vocabulary with fingerprint "
          f"{self.vocab_fingerprint}, but the model's vocabulary has fingerprint "
          f"{vocab_fingerprint}")

  # -- lookup --------------------------------------------------------------------------------------

  def lookup(self, ids: ArrayLike) -> jax.Array:
    """Experts for key ids.

    Args:
      ids: int[...] key ids in [0, vocab_size).

    Returns:
      int32[...] experts, or int32[..., k] for a top-k table.

    Concrete ids (numpy, or jax arrays outside a trace) are range-checked first and a ValueError
    names the offending ids. Traced ids cannot be checked; out-of-range traced ids are clamped to
    [0, vocab_size) so the expert is always valid (check them with `check_token_ids` on the host).
    """
    check_token_ids(ids, self.vocab_size, name="ids")
    return jnp.take(self.table, ids, axis=0, mode="clip")

  # -- files ---------------------------------------------------------------------------------------

  def _metadata(self) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": self.kind,
        "num_experts": self.num_experts,
        "vocab_size": self.vocab_size,
        "seed": self.seed,
        "vocab_fingerprint": self.vocab_fingerprint,
        "shape": list(self.table.shape),
        "dtype": "int32",
        "table_sha256": hashlib.sha256(self.table.tobytes()).hexdigest(),
    }

  def save(self, path: PathLike) -> None:
    """Writes the table and its metadata to one .npz file (local path or any etils.epath URL).

    The file holds `table` (the int32 array) and `metadata` (a JSON string with the format version,
    kind, sizes, seed, vocabulary fingerprint and a sha256 of the table). It is written to a
    temporary name and renamed so that a crash never leaves a half-written table behind.
    """
    buffer = io.BytesIO()
    metadata = json.dumps(self._metadata(), sort_keys=True)
    np.savez(buffer, table=self.table, metadata=np.array(metadata))
    _atomic_write(path, buffer.getvalue())

  @classmethod
  def load(cls, path: PathLike, *, vocab_size: Optional[int] = None,
           vocab_fingerprint: Optional[str] = None) -> "HashTable":
    """Reads a table written by `save` and verifies it.

    Args:
      path: the .npz file.
      vocab_size: if given, the table must cover exactly this many ids.
      vocab_fingerprint: if given (and the file's fingerprint is known), it must match.

    Raises:
      ValueError: the file is missing pieces, corrupt or truncated, has an unknown format version,
        its table does not match its metadata, or it was built for another vocabulary.
    """
    path = epath.Path(path)
    try:
      raw = path.read_bytes()
    except FileNotFoundError as e:
      raise ValueError(f"{path}: no such hash table file") from e
    try:
      npz = np.load(io.BytesIO(raw), allow_pickle=False)
      if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError("it holds a single array (a plain .npy?), not a saved HashTable (.npz)")
      with npz:
        missing = {"table", "metadata"} - set(npz.files)
        if missing:
          raise ValueError(f"missing entries {sorted(missing)} (has {sorted(npz.files)})")
        table = npz["table"]
        metadata_array = npz["metadata"]
    except ValueError as e:
      raise ValueError(f"{path}: not a valid hash table file: {e}") from e
    except Exception as e:  # zipfile.BadZipFile, EOFError, OSError, zlib.error on corrupt bytes.
      raise ValueError(
          f"{path}: corrupt or truncated hash table file ({type(e).__name__}: {e})") from e
    try:
      metadata = _parse_metadata(metadata_array, table)
      result = cls(
          kind=metadata["kind"], table=table, num_experts=metadata["num_experts"],
          vocab_size=metadata["vocab_size"], seed=metadata["seed"],
          vocab_fingerprint=metadata["vocab_fingerprint"])
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(f"{path}: malformed hash table file: {e}") from e
    if vocab_size is not None:
      result.check_vocabulary(vocab_size, vocab_fingerprint)
    elif vocab_fingerprint is not None:
      result.check_vocabulary(result.vocab_size, vocab_fingerprint)
    return result

  def save_plain(self, path: PathLike) -> None:
    """Writes the bare int32[vocab] (or int32[vocab, k]) table as a .npy file.

    This is the format MaxText and Megatron-LM read for their hash-routing tables; it carries no
    metadata, so prefer `save` for anything hashmoe reads back.
    """
    buffer = io.BytesIO()
    np.save(buffer, self.table, allow_pickle=False)
    _atomic_write(path, buffer.getvalue())


def _atomic_write(path: PathLike, data: bytes) -> None:
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  except BaseException:
    # A full disk, a directory in the way of `path`, Ctrl-C: no half-written temporary stays.
    with contextlib.suppress(OSError):
      tmp.unlink()
    raise


def _parse_metadata(metadata_array: np.ndarray, table: np.ndarray) -> dict[str, Any]:
  if metadata_array.shape != () or metadata_array.dtype.kind != "U":
    raise ValueError(
        f"metadata must be a JSON string, got {metadata_array.dtype}{metadata_array.shape}")
  try:
    metadata = json.loads(str(metadata_array))
  except json.JSONDecodeError as e:
    raise ValueError(f"metadata is not valid JSON ({e})") from e
  if not isinstance(metadata, dict):
    raise ValueError(f"metadata must be a JSON object, got {type(metadata).__name__}")
  if metadata.get("format") != FORMAT_NAME:
    raise ValueError(f"format must be {FORMAT_NAME!r}, got {metadata.get('format')!r}")
  if metadata.get("format_version") != FORMAT_VERSION:
    raise ValueError(
        f"unsupported format_version {metadata.get('format_version')!r} (this hashmoe reads "
        f"version {FORMAT_VERSION})")
  required = ("kind", "num_experts", "vocab_size", "seed", "vocab_fingerprint", "shape", "dtype",
              "table_sha256")
  missing = [key for key in required if key not in metadata]
  if missing:
    raise ValueError(f"metadata lacks {missing}")
  if list(table.shape) != metadata["shape"] or table.dtype != np.dtype(metadata["dtype"]):
    raise ValueError(
        f"table is {table.dtype}{list(table.shape)} but metadata says "
        f"{metadata['dtype']}{metadata['shape']}")
  digest = hashlib.sha256(np.ascontiguousarray(table).tobytes()).hexdigest()
  if digest != metadata["table_sha256"]:
    raise ValueError(f"table checksum {digest} does not match metadata {metadata['table_sha256']}")
  return metadata


# ------------------------------------------------------------------------------------------------
# Routing keys.


def key_space_size(key: str, *, vocab_size: int, max_positions: int,
                   bigram_buckets: Optional[int] = None) -> int:
  """How many ids the table for `key` must cover.

  Token-valued keys (token, prev_token, oracle_future, predicted_future) use the vocabulary;
  position uses `max_positions`; bigram folds the (prev, cur) pair hash into `bigram_buckets` ids,
  by default `vocab_size`, so a bigram table costs the same memory as a token table and can be
  built (random, or balanced on bigram-id counts) exactly like one.
  """
  if key not in KEYS:
    raise ValueError(f"key must be one of {KEYS}, got {key!r}")
  if key == "position":
    return int(max_positions)
  if key == "bigram":
    return int(vocab_size if bigram_buckets is None else bigram_buckets)
  return int(vocab_size)


def _mix32(xp: Any, x: Any) -> Any:
  """MurmurHash3's 32-bit finaliser (fmix32): a bijection on uint32 with full avalanche."""
  x = x ^ (x >> 16)
  x = x * xp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * xp.uint32(0xC2B2AE35)
  x = x ^ (x >> 16)
  return x


def bigram_hash(prev_ids: ArrayLike, token_ids: ArrayLike, key_space: int) -> Any:
  """Hash of the pair (prev, cur) folded into [0, key_space) (paper §3.1, Bigram Hash).

  fmix32(fmix32(prev) * golden + cur) in wrapping uint32 arithmetic: the inner finaliser scatters
  prev over all 32 bits before cur is added, so consecutive pairs (i, i+1) and pairs sharing a token
  land on unrelated ids, and the low bits are as well mixed as the high ones (the modulus may be a
  power of two).

  Args:
    prev_ids, token_ids: int[...] of the same shape; numpy in, numpy out; jnp in, jnp out.
    key_space: the number of bigram ids, 1 <= key_space < 2^31.

  Returns:
    int32[...] in [0, key_space).
  """
  xp = _namespace(prev_ids, token_ids)
  key_space = _check_key_space(key_space)
  prev = xp.asarray(prev_ids).astype(xp.uint32)
  cur = xp.asarray(token_ids).astype(xp.uint32)
  # Wrapping is the point; numpy warns about it for 0-d inputs (scalar arithmetic) only.
  with np.errstate(over="ignore"):
    mixed = _mix32(xp, _mix32(xp, prev) * xp.uint32(0x9E3779B1) + cur)
  return xp.asarray(mixed % xp.uint32(key_space)).astype(xp.int32)


def _check_key_space(key_space: Any) -> int:
  if not isinstance(key_space, (int, np.integer)) or isinstance(key_space, bool):
    raise TypeError(f"key_space must be an int, got {type(key_space).__name__}: {key_space!r}")
  if not 1 <= key_space <= _INT32_MAX:
    raise ValueError(f"key_space must be in [1, 2^31 - 1], got {key_space}")
  return int(key_space)


def _namespace(*arrays: Any) -> Any:
  """numpy when every given array is a host array, jnp otherwise (jax arrays or tracers)."""
  return jnp if any(isinstance(a, jax.Array) for a in arrays if a is not None) else np


def sequence_starts(token_ids: ArrayLike, *, positions: Optional[ArrayLike] = None,
                    segment_ids: Optional[ArrayLike] = None, continued: bool = False) -> Any:
  """bool[batch, length]: True where a token is the first of its sequence.

  A token starts a sequence at column 0, where `segment_ids` changes (packed examples), and where
  `positions` is 0 (packing without segment ids, seqio's convention that positions restart at 0).
  With `continued` the rows continue sequences begun before column 0 (a decoding step), so column
  0 starts a sequence only where `positions` says so.
  """
  xp = _namespace(token_ids, positions, segment_ids)
  batch, length = token_ids.shape
  starts = xp.zeros((batch, length), dtype=bool)
  if not continued and xp is np:
    starts[:, 0] = True
  elif not continued:
    starts = starts.at[:, 0].set(True)
  if segment_ids is not None:
    segment_ids = xp.asarray(segment_ids)
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = starts | xp.concatenate([xp.zeros((batch, 1), dtype=bool), changed], axis=1)
  if positions is not None:
    starts = starts | (xp.asarray(positions) == 0)
  return starts


def routing_keys(key: str, *, token_ids: ArrayLike, positions: Optional[ArrayLike] = None,
                 segment_ids: Optional[ArrayLike] = None, targets: Optional[ArrayLike] = None,
                 predicted_ids: Optional[ArrayLike] = None, key_space: int,
                 previous_ids: Optional[ArrayLike] = None) -> Any:
  """The ids a hash table is looked up with, for one of KEYS (paper §3.1, §5.3.2).

  Args:
    key: which feature to hash:
      "token" x_t; "prev_token" x_{t-1} (BOUNDARY_ID at a sequence start, see `sequence_starts`);
      "bigram" `bigram_hash(x_{t-1}, x_t)` with the same boundary rule; "position" the position in
      the sequence (`positions`, default 0..length-1); "oracle_future" x_{t+1}, i.e. `targets`
      (cheats: an upper bound); "predicted_future" a frozen baseline's prediction of x_{t+1}
      (`predicted_ids`).
    token_ids: int[batch, length] input tokens.
    positions: int[batch, length] position of each token in its sequence.
    segment_ids: int[batch, length] packed-example ids; keys never look across a change.
    targets: int[batch, length] next tokens (required by "oracle_future").
    predicted_ids: int[batch, length] predicted next tokens (required by "predicted_future").
    key_space: size of the table the keys index (`key_space_size`). Bigram ids are folded into it;
      for the other keys, concrete inputs are range-checked against it.
    previous_ids: int[batch], the token before column 0 of each row when the rows continue
      sequences begun earlier (cached decoding feeds one token per step and keeps the previous
      one); column 0 then starts a sequence only where `positions` is 0. None: column 0 starts a
      sequence.

  Returns:
    int32[batch, length] key ids in [0, key_space): numpy for numpy inputs, jnp otherwise (works
    under jit).
  """
  if key not in KEYS:
    raise ValueError(f"key must be one of {KEYS}, got {key!r}")
  key_space = _check_key_space(key_space)
  if token_ids is None:
    raise ValueError("token_ids is required for every key")
  xp = _namespace(token_ids, positions, segment_ids, targets, predicted_ids, previous_ids)
  token_ids = xp.asarray(token_ids)
  if token_ids.ndim != 2:
    raise ValueError(f"token_ids must be int[batch, length], got shape {token_ids.shape}")
  if previous_ids is not None:
    previous_ids = xp.asarray(previous_ids)
    if tuple(previous_ids.shape) != tuple(token_ids.shape[:1]):
      raise ValueError(f"previous_ids must be int[batch] = {tuple(token_ids.shape[:1])} (one "
                       f"token per row), got shape {tuple(previous_ids.shape)}")
  features = {}
  for name, value in (("positions", positions), ("segment_ids", segment_ids), ("targets", targets),
                      ("predicted_ids", predicted_ids)):
    if value is not None:
      value = xp.asarray(value)
      if tuple(value.shape) != tuple(token_ids.shape):
        raise ValueError(f"{name} must have the shape of token_ids {tuple(token_ids.shape)}, "
                         f"got {tuple(value.shape)}")
    features[name] = value
  positions, segment_ids = features["positions"], features["segment_ids"]
  targets, predicted_ids = features["targets"], features["predicted_ids"]
  batch, length = token_ids.shape

  def checked(ids: Any, name: str) -> Any:
    check_token_ids(ids, key_space, name=name)
    return xp.asarray(ids).astype(xp.int32)

  if key == "token":
    return checked(token_ids, "token_ids")
  if key == "oracle_future":
    if targets is None:
      raise ValueError(
          "key 'oracle_future' needs targets (the next token x_{t+1} at each position)")
    return checked(targets, "targets")
  if key == "predicted_future":
    if predicted_ids is None:
      raise ValueError("key 'predicted_future' needs predicted_ids (a frozen baseline's predicted "
                       "next token at each position)")
    return checked(predicted_ids, "predicted_ids")
  if key == "position":
    if positions is None:
      positions = xp.broadcast_to(xp.arange(length, dtype=xp.int32)[None, :], (batch, length))
    return checked(positions, "positions")

  # prev_token and bigram: shift right by one within each sequence.
  starts = sequence_starts(token_ids, positions=positions, segment_ids=segment_ids,
                           continued=previous_ids is not None)
  first = (xp.full((batch, 1), BOUNDARY_ID, dtype=token_ids.dtype) if previous_ids is None
           else previous_ids.astype(token_ids.dtype)[:, None])
  shifted = xp.concatenate([first, token_ids[:, :-1]], axis=1)
  prev = xp.where(starts, xp.asarray(BOUNDARY_ID, dtype=token_ids.dtype), shifted)
  if key == "prev_token":
    return checked(prev, "token_ids")
  return bigram_hash(prev, token_ids, key_space)
