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
* **Precomputed routing** (`precompute_routing`, `precompute_hash_routing`): because the expert of
  a token depends on token ids alone, the permutation that groups a batch's tokens by expert and the
  group sizes can be computed on the host, once per batch and per (key, tables), and shared by every
  hash layer that routes the same way (`routing_signature` names them). The experts then skip their
  argsort; the result is identical. A batch sharded over hosts is routed row by row instead
  (`row_routing`: each host its own rows) and assembled on device with cumulative sums and one
  scatter (`assemble_sorted_assignments`), into the same permutation; `hashmoe.host_routing` does
  this for a run's input pipeline.

Lookups use jnp; tables are numpy and never touch a device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
from typing import Any, Iterable, NamedTuple, Optional, Sequence, Union

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

TABLE_KINDS = ("random", "balanced", "clustered", "dispersed")
# DeepSeek-V4-style hash-selected top-k: int32[vocab, k] of k distinct experts per token.
TOPK_KIND = "balanced_topk"
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
    kind: how it was built: one of TABLE_KINDS, or TOPK_KIND for a top-k table.
    table: int32[vocab_size] (one expert per key id) or int32[vocab_size, k] (k distinct experts per
      key id, kind TOPK_KIND); entries in [0, num_experts). Stored read-only.
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
    if self.kind not in TABLE_KINDS + (TOPK_KIND,):
      raise ValueError(f"kind must be one of {TABLE_KINDS + (TOPK_KIND,)}, got {self.kind!r}")
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
    want_ndim = 2 if self.kind == TOPK_KIND else 1
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


# ------------------------------------------------------------------------------------------------
# Precomputed routing: the input pipeline's half of a hash layer's dispatch.

# Tables a hash layer routes with: one 1-D table (one hash), a sequence of N 1-D tables (MultiHash,
# §3.2) or one top-k table (k experts per key).
RoutingTables = Union[HashTable, Sequence[HashTable]]


class SortedAssignments(NamedTuple):
  """A batch's hash-routing assignments grouped by expert, computed from token ids alone.

  An assignment is a (token, column) pair, numbered column-major: a = column * tokens + token, with
  tokens = batch * length flattened row-major (the order of `hashmoe.routing.Routing` and of
  `hashmoe.experts`). A group is one expert for a single hash or a top-k table, and one
  (slice, expert) pair g = slice * num_experts + expert for MultiHash, whose column m picks the
  expert of weight slice m. Arrays are numpy on the host and jax arrays once they are in a batch.

  Attributes:
    permutation: int32[A] sorted position -> assignment; stable, so a group keeps assignment order.
    inverse_permutation: int32[A] assignment -> sorted position.
    group_sizes: int32[G] assignments per group (G = num_experts, or N * num_experts for MultiHash).
  """
  permutation: Any
  inverse_permutation: Any
  group_sizes: Any


def _routing_columns(tables: RoutingTables) -> tuple[np.ndarray, int, bool]:
  """(int32[H, key_space] expert of each column per key id, num_experts, multihash)."""
  if isinstance(tables, HashTable):
    if tables.table.ndim == 2:  # top-k: k columns over the full expert weights
      return np.ascontiguousarray(tables.table.T), tables.num_experts, False
    tables = (tables,)
  tables = tuple(tables)
  if not tables:
    raise ValueError("tables must hold at least one HashTable")
  for m, table in enumerate(tables):
    if not isinstance(table, HashTable):
      raise TypeError(f"tables[{m}] must be a HashTable, got {type(table).__name__}")
    if table.table.ndim != 1:
      raise ValueError(f"tables[{m}] ({table.kind}) is a top-k table; pass it alone, not inside a "
                       "MultiHash sequence")
    if (table.num_experts, table.vocab_size) != (tables[0].num_experts, tables[0].vocab_size):
      raise ValueError(
          f"MultiHash tables must share num_experts and vocab_size: tables[{m}] has "
          f"({table.num_experts}, {table.vocab_size}), tables[0] has "
          f"({tables[0].num_experts}, {tables[0].vocab_size})")
  return np.stack([t.table for t in tables]), tables[0].num_experts, True


def routing_signature(key: str, tables: RoutingTables) -> str:
  """A name for "route with these tables on this key", shared by every layer that does so.

  Two hash layers with the same signature put every token in the same groups, so one
  `SortedAssignments` per batch serves both. The name covers the key, the layout (MultiHash or
  top-k), the number of experts and a sha256 of the tables' contents.

  Returns:
    e.g. "token:multihash1x64:3f2a9c0d4e5b6a71".
  """
  if key not in KEYS:
    raise ValueError(f"key must be one of {KEYS}, got {key!r}")
  columns, num_experts, multihash = _routing_columns(tables)
  layout = "multihash" if multihash else "topk"
  digest = hashlib.sha256()
  digest.update(f"hashmoe.routing.v1/{key}/{layout}/{num_experts}/{columns.shape}".encode())
  digest.update(np.ascontiguousarray(columns, dtype=np.int32).tobytes())
  return f"{key}:{layout}{columns.shape[0]}x{num_experts}:{digest.hexdigest()[:16]}"


def precompute_routing(tables: RoutingTables, keys: ArrayLike) -> SortedAssignments:
  """Groups a batch's assignments by expert on the host (numpy; run it in the input pipeline).

  Mirrors what `hashmoe.experts` computes with a stable argsort on device: assignment
  a = column * tokens + token goes to group `slice * E + table_column[keys[token]]` (slice = column
  for MultiHash, 0 otherwise), and the permutation sorts assignments by group, stably.

  Args:
    tables: one 1-D HashTable (a hash layer), a sequence of N 1-D HashTables (MultiHash, §3.2) or
      one top-k HashTable.
    keys: int[batch, length] (or int[tokens]) routing keys, from `routing_keys` with the layer's
      key; flattened row-major.

  Returns:
    SortedAssignments of numpy int32 arrays, A = tokens * columns.
  """
  columns, num_experts, multihash = _routing_columns(tables)
  keys = np.asarray(keys)
  check_token_ids(keys, columns.shape[1], name="keys")
  keys = keys.reshape(-1)
  num_columns, tokens = columns.shape[0], keys.size
  experts = columns[:, keys]  # [H, tokens]
  if multihash:
    experts = experts + (np.arange(num_columns, dtype=np.int32) * num_experts)[:, None]
    num_groups = num_columns * num_experts
  else:
    num_groups = num_experts
  group = experts.reshape(-1)  # column-major assignment order
  permutation = np.argsort(group, kind="stable").astype(np.int32)
  inverse = np.empty_like(permutation)
  inverse[permutation] = np.arange(num_columns * tokens, dtype=np.int32)
  sizes = np.bincount(group, minlength=num_groups).astype(np.int32)
  return SortedAssignments(permutation, inverse, sizes)


def precompute_hash_routing(
    layers: Iterable[tuple[str, RoutingTables]], *, token_ids: ArrayLike,
    positions: Optional[ArrayLike] = None, segment_ids: Optional[ArrayLike] = None,
    targets: Optional[ArrayLike] = None, predicted_ids: Optional[ArrayLike] = None,
) -> dict[str, SortedAssignments]:
  """Precomputed routing of one batch for every distinct (key, tables) among a model's hash layers.

  The input pipeline calls this once per batch; the result travels with the batch and reaches each
  hash router through `hashmoe.routing.RouterFeatures.sorted_assignments`, where a router picks
  its entry by `routing_signature`. Layers that share key and tables share one entry.

  Args:
    layers: (key, tables) of each hash layer (repeats are fine).
    token_ids, positions, segment_ids, targets, predicted_ids: the batch's int[batch, length]
      features, as for `routing_keys`.

  Returns:
    {routing_signature(key, tables): SortedAssignments}.
  """
  out: dict[str, SortedAssignments] = {}
  for key, tables in layers:
    name = routing_signature(key, tables)
    if name in out:
      continue
    columns, _, _ = _routing_columns(tables)
    host = lambda a: None if a is None else np.asarray(a)  # noqa: E731  (numpy keys, on the host)
    keys = routing_keys(key, token_ids=host(token_ids), positions=host(positions),
                        segment_ids=host(segment_ids), targets=host(targets),
                        predicted_ids=host(predicted_ids), key_space=columns.shape[1])
    out[name] = precompute_routing(tables, keys)
  return out


# ------------------------------------------------------------------------------------------------
# Row-local routing: what each host computes for its own rows, assembled on device.
#
# A global batch is split over hosts (and devices), so no host can compute the batch's global
# permutation: it knows only its rows. It can compute, per row, where each of the row's assignments
# falls among the row's assignments of the same expert (`row_routing`); the device then adds the
# offsets that depend on the other rows, with cumulative sums over the per-row counts
# (`assemble_sorted_assignments`). The result is `precompute_routing` of the global batch, bit for
# bit, and no sort runs on device.


class RowRouting(NamedTuple):
  """A batch's hash-routing assignments grouped row by row (`assemble_sorted_assignments`'s input).

  Column c of a row is the row's tokens' column-c experts (`Routing.expert_index[:, c]`).

  Attributes:
    ranks: int32[rows, H, length]: ranks[b, c, j] is how many tokens before j in row b have the
      same column-c expert as token j (its place among them, in token order).
    counts: int32[rows, H, E]: counts[b, c, e] is how many tokens of row b have column-c expert e.
  """
  ranks: Any
  counts: Any


# How row routing travels in a batch: two int32 features per router, named by the router's module
# path ("decoder_1/moe/router"), so every host and device can tell whose they are without a
# mapping beside the batch; the model hands them to its routers (`row_routing_from_features`).
ROW_ROUTING_PREFIX = "hash_routing:"


def row_routing_feature_names(path: str) -> tuple[str, str]:
  """The batch features ("hash_routing:<path>:ranks", "...:counts") of router `path`'s row
  routing."""
  if not path or ":" in path:
    raise ValueError(f"router path must be non-empty and free of ':', got {path!r}")
  return f"{ROW_ROUTING_PREFIX}{path}:ranks", f"{ROW_ROUTING_PREFIX}{path}:counts"


def row_routing_from_features(features: Any) -> dict[str, RowRouting]:
  """{router path: RowRouting} of the row-routing features in a batch (a mapping of arrays)."""
  out: dict[str, RowRouting] = {}
  for name in features:
    if not (isinstance(name, str) and name.startswith(ROW_ROUTING_PREFIX)
            and name.endswith(":ranks")):
      continue
    path = name[len(ROW_ROUTING_PREFIX):-len(":ranks")]
    ranks_name, counts_name = row_routing_feature_names(path)
    if counts_name not in features:
      raise ValueError(f"the batch has {ranks_name!r} but not {counts_name!r}; row routing "
                       "travels as both")
    out[path] = RowRouting(features[ranks_name], features[counts_name])
  return out


def row_routing(tables: RoutingTables, keys: ArrayLike) -> RowRouting:
  """Each row's grouping of its assignments by expert, on the host (numpy, vectorised over rows).

  Args:
    tables: as for `precompute_routing`.
    keys: int[rows, length] routing keys (`routing_keys` with the layer's key) of this host's rows.

  Returns:
    RowRouting of numpy int32 arrays; `assemble_sorted_assignments` turns the rows of a whole
    batch into its `SortedAssignments`.
  """
  columns, num_experts, _ = _routing_columns(tables)
  return row_routing_of_columns(columns, num_experts, keys)


def row_routing_of_columns(columns: np.ndarray, num_experts: int, keys: ArrayLike) -> RowRouting:
  """`row_routing` from the tables' columns: int[H, key_space], the column-c expert of each key
  id (a `Routing.expert_index` column)."""
  columns = np.asarray(columns)
  if columns.ndim != 2:
    raise ValueError(f"columns must be int[H, key_space], got shape {columns.shape}")
  keys = np.asarray(keys)
  if keys.ndim != 2:
    raise ValueError(f"keys must be int[rows, length], got shape {keys.shape}")
  check_token_ids(keys, columns.shape[1], name="keys")
  rows, length = keys.shape
  num_columns = columns.shape[0]
  lanes = rows * num_columns  # one lane per (row, column)
  experts = columns[:, keys].transpose(1, 0, 2).reshape(lanes, length).astype(np.int64)
  # A stable sort of each lane by expert puts the lane's tokens of one expert together, in token
  # order; a token's rank is then its sorted place minus its expert's first place.
  order = np.argsort(experts, axis=1, kind="stable")
  counts = np.bincount((np.arange(lanes)[:, None] * num_experts + experts).reshape(-1),
                       minlength=lanes * num_experts).reshape(lanes, num_experts)
  starts = np.cumsum(counts, axis=1) - counts
  sorted_ranks = np.arange(length)[None, :] - np.take_along_axis(
      starts, np.take_along_axis(experts, order, axis=1), axis=1)
  ranks = np.empty((lanes, length), np.int32)
  np.put_along_axis(ranks, order, sorted_ranks.astype(np.int32), axis=1)
  return RowRouting(ranks.reshape(rows, num_columns, length),
                    counts.astype(np.int32).reshape(rows, num_columns, num_experts))


def assemble_sorted_assignments(expert_index: ArrayLike, pieces: RowRouting, *, num_experts: int,
                                multihash: bool) -> SortedAssignments:
  """A whole batch's `SortedAssignments` from its rows' `RowRouting`, with no sort (jnp; jit-able).

  The stable order sorts assignments a = column * tokens + token by group, so within a group they
  come column by column, then row by row, then in token order. An assignment (column c, row b,
  token j) of expert e therefore lands at
    offset of its group (exclusive cumsum of the group sizes)
    + its group's assignments in earlier columns (top-k only: a MultiHash group is one column)
    + column-c assignments of expert e in earlier rows (exclusive cumsum of counts over rows)
    + ranks[b, c, j],
  which is the inverse permutation; the permutation is one scatter of it. Equal to
  `precompute_routing` of the global batch when `pieces` describe `expert_index` (the experts
  check that they do, `hashmoe.experts.sort_matches`, and sort on device otherwise).

  Args:
    expert_index: int[tokens, H] the router's experts, tokens = rows * length flattened row-major.
    pieces: RowRouting of every row of the batch, ranks int[rows, H, length] and counts
      int[rows, H, E].
    num_experts: E.
    multihash: groups are (column, expert) pairs (MultiHash, §3.2), else experts (one hash, top-k).

  Returns:
    SortedAssignments of int32 jax arrays (A = tokens * H; G = H * E for MultiHash, else E).
  """
  ranks = jnp.asarray(pieces.ranks).astype(jnp.int32)
  counts = jnp.asarray(pieces.counts).astype(jnp.int32)
  expert_index = jnp.asarray(expert_index).astype(jnp.int32)
  if ranks.ndim != 3:
    raise ValueError(f"row routing ranks must be int[rows, H, length], got shape {ranks.shape}")
  rows, num_columns, length = ranks.shape
  if counts.shape != (rows, num_columns, num_experts):
    raise ValueError(f"row routing counts must be int[rows, H, E] = "
                     f"{(rows, num_columns, num_experts)} for ranks of shape {ranks.shape} and "
                     f"num_experts={num_experts}, got {counts.shape}")
  if expert_index.shape != (rows * length, num_columns):
    raise ValueError(f"expert_index must be int[tokens, H] = {(rows * length, num_columns)} for "
                     f"row routing of {rows} rows of {length} tokens and H={num_columns}, got "
                     f"{expert_index.shape}")
  per_column = jnp.sum(counts, axis=0)  # [H, E]
  if multihash:
    sizes = per_column.reshape(-1)
    base = (jnp.cumsum(sizes) - sizes).reshape(num_columns, num_experts)
  else:
    sizes = jnp.sum(per_column, axis=0)
    base = (jnp.cumsum(sizes) - sizes)[None, :] + jnp.cumsum(per_column, axis=0) - per_column
  start = base[None] + jnp.cumsum(counts, axis=0) - counts  # [rows, H, E]
  experts = expert_index.reshape(rows, length, num_columns).transpose(0, 2, 1)
  position = jnp.take_along_axis(start, experts, axis=2, mode="clip") + ranks
  inverse = position.transpose(1, 0, 2).reshape(-1)  # column-major assignment order
  num = inverse.shape[0]
  permutation = jnp.zeros((num,), jnp.int32).at[inverse].set(
      jnp.arange(num, dtype=jnp.int32), mode="drop")
  return SortedAssignments(permutation, inverse, sizes.astype(jnp.int32))
