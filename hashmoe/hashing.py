"""Hash tables and routing keys for hash layers.

Roller et al. 2021, "Hash Layers For Large Sparse Models" (arXiv 2106.04426).

A hash layer sends token `x_t` to expert `table[key(x)_t]` (paper §3.1): a constant lookup with no
parameters. This module holds the two halves of that expression:

* **Tables** are data, built once offline with numpy from corpus statistics or a trained baseline's
  embeddings, saved beside the checkpoint and verified against the vocabulary on load:
  `random`, `balanced` (greedy on token frequency), `clustered` (k-means on token embeddings),
  `dispersed` (each k-means cluster spread over all experts), MultiHash sets of N independent tables
  (§3.2), and the hash-selected top-k table (`balanced_topk`, k distinct experts per token).
* **Keys** are the integer ids a table is looked up with (§3.1 and §5.3.2): the current token, the
  previous token, a bigram hash, the position, the oracle next token and a baseline's predicted next
  token. They are pure array functions that run on numpy inputs in the input pipeline or on jnp
  inputs under `jax.jit`.
* **Precomputed routing** (`precompute_routing`, `precompute_hash_routing`): because the expert of
  a token depends on token ids alone, the permutation that groups a batch's tokens by expert and the
  group sizes can be computed on the host, once per batch and per (key, tables), and shared by every
  hash layer that routes the same way (`routing_signature` names them). The experts then skip their
  argsort; the result is identical.

Lookups use jnp; everything that builds a table uses numpy and never touches a device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import heapq
import io
import json
import os
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence, Union
import warnings

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from scipy.cluster import vq as scipy_vq

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

# Default slack of the randomised balanced MultiHash assignment, as a fraction of the ideal
# per-expert load (see `_randomized_balanced_assignment`).
DEFAULT_BALANCE_SLACK = 0.01

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
    counts = _validate_counts(token_counts, self.vocab_size)
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
# Building tables.


def _validate_counts(token_counts: Any, vocab_size: int, name: str = "token_counts") -> np.ndarray:
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


def _check_sizes(num_experts: int, vocab_size: int) -> None:
  for name, value in (("num_experts", num_experts), ("vocab_size", vocab_size)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")


def _frequency_order(counts: np.ndarray) -> np.ndarray:
  """Token ids by decreasing count; equal counts keep increasing id order (stable)."""
  return np.argsort(-counts, kind="stable")


def _greedy_balanced_assignment(counts: np.ndarray, num_experts: int, k: int) -> np.ndarray:
  """The paper's balanced assignment (§3.1), generalised to k distinct experts per token.

  "Greedily assign the most frequent tokens to the emptiest buckets": tokens are visited by
  decreasing count (ties by token id) and each goes to the k buckets with the lowest summed count
  so far, ties broken by fewer tokens in the bucket, then by lower expert index. A heap keyed
  (load, num_tokens, expert) makes this O(V k log E).

  A token with count 0 raises no bucket's load, so by load every bucket is equally good. Taken
  literally the rule would put every token unseen in the corpus into the single lightest bucket,
  and such tokens still occur at test time; instead they are dealt round robin over all buckets in
  id order (zero-count token j takes experts jk, jk+1, ..., jk+k-1 mod E), so every expert gets an
  equal share of them. (Levelling the *total* token count per bucket instead would pile them into
  the few buckets that hold a very frequent token, the same buckets in every MultiHash table.)

  Returns:
    int32[vocab, k]; row v lists token v's experts in the order they were picked (lightest first).
  """
  vocab_size = counts.shape[0]
  order = _frequency_order(counts)
  counts_list = counts.tolist()
  num_positive = int(np.count_nonzero(counts))
  zero = counts.dtype.type(0).item()
  heap = [(zero, 0, e) for e in range(num_experts)]  # Sorted, hence already a heap.
  assignment = np.empty((vocab_size, k), dtype=np.int32)
  picked = [None] * k
  for token in order[:num_positive].tolist():
    count = counts_list[token]
    for j in range(k):
      picked[j] = heapq.heappop(heap)
    for j, (load, num_tokens, expert) in enumerate(picked):
      assignment[token, j] = expert
      heapq.heappush(heap, (load + count, num_tokens + 1, expert))
  zeros = order[num_positive:]
  deal = np.arange(zeros.size)[:, None] * k + np.arange(k)[None, :]
  assignment[zeros] = deal % num_experts
  return assignment


def _randomized_balanced_assignment(counts: np.ndarray, num_experts: int, rng: np.random.Generator,
                                    slack: float) -> np.ndarray:
  """One member of a balanced MultiHash (§3.2): balanced, yet independent of the other members.

  The greedy balanced assignment is deterministic, so N copies of it would be N identical hashes
  and MultiHash would gain nothing. This is the greedy with its arbitrary choices randomised:

  1. Tokens are visited by decreasing count, ties in count in a random order (not by id).
  2. A token with count c goes to a bucket drawn uniformly from the *near-lightest* buckets, those
     whose load is within `delta = slack * total / E` of the lightest. Greedy is the case delta = 0
     (a single candidate); a small delta makes the choice random almost everywhere while keeping
     balance: the chosen bucket ends below min_load + delta + c, so every bucket ends below
     mean_load + delta + c_max, i.e. max/mean grows by at most `slack` over the greedy bound
     mean + c_max.
  3. Count-0 tokens are dealt over all buckets in rounds, each round a fresh random permutation of
     the buckets (the greedy table deals them in index order), so each bucket gets an equal share.

  Because every draw is fresh, two members built with different generators agree on a token with
  probability ~1/E, and the pair of experts (a, b) of a token is spread over all E^2 pairs rather
  than being a relabelling of one hash (what permuting the buckets of one greedy table would give).

  Returns:
    int32[vocab].
  """
  vocab_size = counts.shape[0]
  order = np.lexsort((rng.permutation(vocab_size), -counts))
  num_positive = int(np.count_nonzero(counts))
  delta = slack * float(counts.sum()) / num_experts
  assignment = np.empty(vocab_size, dtype=np.int32)
  loads = np.zeros(num_experts, dtype=counts.dtype)
  positive = order[:num_positive]
  uniforms = rng.random(num_positive)
  for token, count, u in zip(positive.tolist(), counts[positive].tolist(), uniforms.tolist()):
    candidates = np.flatnonzero(loads <= loads.min() + delta)
    expert = candidates[int(u * candidates.size)]
    assignment[token] = expert
    loads[expert] += count
  zeros = order[num_positive:]
  num_rounds = -(-zeros.size // num_experts)
  deal = np.argsort(rng.random((num_rounds, num_experts)), axis=1).reshape(-1)
  assignment[zeros] = deal[:zeros.size]
  return assignment


def _kmeans_plus_plus(data: np.ndarray, num_clusters: int, rng: np.random.Generator) -> np.ndarray:
  """k-means++ seeding (Arthur & Vassilvitskii 2007): float[num_clusters, d] initial centroids.

  Hand-written on purpose: scipy's `kmeans2(minit='++')` recomputes the distances to every chosen
  centroid at every step, O(k^2 n d) outside BLAS (26 s for 32k x 512 with k=64; hours for the
  267k-word Wikitext-103 vocabulary). Keeping the running minimum distance makes it O(k n d) in
  matrix-vector products. The Lloyd iterations after it are scipy's.
  """
  n = data.shape[0]
  sq_norms = np.einsum("nd,nd->n", data, data, dtype=np.float64)

  def squared_distances(center: np.ndarray) -> np.ndarray:
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, clipped at 0 against rounding.
    d2 = sq_norms - 2.0 * (data @ center).astype(np.float64) + float(center @ center)
    return np.maximum(d2, 0.0)

  chosen = [int(rng.integers(n))]
  min_d2 = squared_distances(data[chosen[0]])
  for _ in range(1, num_clusters):
    total = min_d2.sum()
    if total > 0:
      index = int(np.searchsorted(np.cumsum(min_d2), rng.random() * total, side="right"))
      index = min(index, n - 1)
    else:
      # Fewer distinct points than clusters: every point is already a centroid. Duplicate one; its
      # cluster ends up empty, which the callers handle.
      index = int(rng.integers(n))
    chosen.append(index)
    min_d2 = np.minimum(min_d2, squared_distances(data[index]))
  return data[np.asarray(chosen)].copy()


def _kmeans_labels(embeddings: Any, num_clusters: int, vocab_size: int, seed: int,
                   iterations: int) -> np.ndarray:
  """k-means cluster of every token: int64[vocab] in [0, num_clusters), canonically numbered.

  Clusters are renumbered in order of their lowest token id, so the numbering depends only on the
  partition, not on the order k-means happened to find the centroids. Empty clusters (possible with
  duplicate embeddings or fewer tokens than clusters) simply own no tokens and take the last labels.
  """
  if embeddings is None:
    raise ValueError("clustered and dispersed tables need embeddings: float[vocab_size, d] token "
                     "embeddings of a trained baseline (paper §3.1, Clustered Hashes)")
  data = np.asarray(embeddings)
  if data.ndim != 2 or data.shape[0] != vocab_size:
    raise ValueError(
        f"embeddings must have shape ({vocab_size}, d) (vocab_size, d), got {data.shape}")
  if not np.issubdtype(data.dtype, np.floating):
    raise TypeError(f"embeddings must be floating point, got {data.dtype}")
  if not np.isfinite(data).all():
    raise ValueError("embeddings contain NaN or infinite values")
  if iterations < 1:
    raise ValueError(f"kmeans_iters must be >= 1, got {iterations}")
  data = np.ascontiguousarray(data, dtype=np.float32 if data.dtype == np.float32 else np.float64)
  if vocab_size <= num_clusters:
    return np.arange(vocab_size)
  rng = np.random.default_rng(seed)
  init = _kmeans_plus_plus(data, num_clusters, rng).astype(data.dtype)
  with warnings.catch_warnings():
    # kmeans2 warns on every iteration with an empty cluster; it keeps that centroid, which is fine.
    warnings.simplefilter("ignore")
    _, labels = scipy_vq.kmeans2(data, init, iter=iterations, minit="matrix", missing="warn",
                                 check_finite=False)
  labels = np.asarray(labels, dtype=np.int64)
  first_token = np.full(num_clusters, vocab_size, dtype=np.int64)
  np.minimum.at(first_token, labels, np.arange(vocab_size))
  canonical = np.empty(num_clusters, dtype=np.int64)
  canonical[np.argsort(first_token, kind="stable")] = np.arange(num_clusters)
  return canonical[labels]


def _disperse(labels: np.ndarray, num_experts: int, counts: Optional[np.ndarray],
              rng: np.random.Generator) -> np.ndarray:
  """The dispersed hash (§3.1): each cluster's tokens spread evenly over all experts.

  Within a cluster, tokens are dealt round robin over the experts (by decreasing corpus count when
  counts are known, so similar frequent tokens land apart and each expert gets a share of the
  cluster's frequency; in random order otherwise). The deal continues where the previous cluster
  stopped, so every cluster covers the experts evenly (counts differ by at most 1) and so does the
  whole vocabulary.
  """
  vocab_size = labels.shape[0]
  tie_break = rng.permutation(vocab_size)
  if counts is None:
    order = np.lexsort((tie_break, labels))
  else:
    order = np.lexsort((tie_break, -counts, labels))
  # order lists tokens cluster by cluster; dealing that list round robin continues across clusters.
  assignment = np.empty(vocab_size, dtype=np.int32)
  assignment[order] = np.arange(vocab_size) % num_experts
  return assignment


def build_table(kind: str, *, num_experts: int, vocab_size: int,
                token_counts: Optional[ArrayLike] = None, embeddings: Optional[ArrayLike] = None,
                seed: int = 0, vocab_fingerprint: str = "", kmeans_iters: int = 20) -> HashTable:
  """Builds one hash table (paper §3.1).

  Args:
    kind: "random" (uniform, fixed by `seed`), "balanced" (greedy on token frequency; needs
      `token_counts`), "clustered" (k-means over `embeddings`, one expert per cluster), "dispersed"
      (the same clusters, each spread evenly over all experts; uses `token_counts` if given).
    num_experts: number of experts E.
    vocab_size: number of key ids V.
    token_counts: int/float[V] corpus occurrences of each key id.
    embeddings: float[V, d] token embeddings of a trained dense baseline.
    seed: fixes the random table, the k-means initialisation and the dispersed deal order.
      Ignored (recorded as given) by "balanced", which is deterministic.
    vocab_fingerprint: `vocabulary_fingerprint` of the vocabulary, recorded in the table.
    kmeans_iters: Lloyd iterations for "clustered"/"dispersed".

  Returns:
    HashTable with table int32[V].
  """
  _check_sizes(num_experts, vocab_size)
  if kind == "random":
    table = np.random.default_rng(seed).integers(0, num_experts, size=vocab_size, dtype=np.int32)
  elif kind == "balanced":
    if token_counts is None:
      raise ValueError("a balanced table needs token_counts: int[vocab_size] corpus frequencies of "
                       "each token (paper §3.1, Balanced assignment)")
    counts = _validate_counts(token_counts, vocab_size)
    table = _greedy_balanced_assignment(counts, num_experts, k=1)[:, 0]
  elif kind == "clustered":
    table = _kmeans_labels(embeddings, num_experts, vocab_size, seed, kmeans_iters).astype(np.int32)
  elif kind == "dispersed":
    counts = None if token_counts is None else _validate_counts(token_counts, vocab_size)
    labels = _kmeans_labels(embeddings, num_experts, vocab_size, seed, kmeans_iters)
    # The deal order's random tie-break uses a stream independent of the k-means seeding.
    table = _disperse(labels, num_experts, counts, np.random.default_rng([seed, 1]))
  else:
    raise ValueError(f"kind must be one of {TABLE_KINDS}, got {kind!r}")
  return HashTable(kind=kind, table=table, num_experts=num_experts, vocab_size=vocab_size,
                   seed=seed, vocab_fingerprint=vocab_fingerprint)


def build_multihash(kind: str, num_hashes: int, *, num_experts: int, vocab_size: int,
                    token_counts: Optional[ArrayLike] = None,
                    embeddings: Optional[ArrayLike] = None, seed: int = 0,
                    vocab_fingerprint: str = "", kmeans_iters: int = 20,
                    balance_slack: float = DEFAULT_BALANCE_SLACK) -> tuple[HashTable, ...]:
  """N independent tables for a MultiHash layer (paper §3.2): hash m picks the expert of segment m.

  Table m is built with seed `seed + m`. For "random", "clustered" and "dispersed" that is
  `build_table(kind, seed=seed + m)`. The greedy "balanced" table is deterministic, so for
  num_hashes > 1 each table is an independent draw of the randomised greedy assignment
  (`_randomized_balanced_assignment`): as balanced as the greedy one up to `balance_slack` of the
  mean load, but agreeing with another draw on ~1/E of the tokens. With num_hashes == 1 the
  result is exactly the single greedy table, so MultiHash with one hash is the paper's hash layer.

  Returns:
    tuple of num_hashes HashTables, each int32[V].
  """
  if not isinstance(num_hashes, (int, np.integer)) or num_hashes < 1:
    raise ValueError(f"num_hashes must be a positive int, got {num_hashes!r}")
  common = dict(num_experts=num_experts, vocab_size=vocab_size, token_counts=token_counts,
                embeddings=embeddings, vocab_fingerprint=vocab_fingerprint,
                kmeans_iters=kmeans_iters)
  if kind != "balanced" or num_hashes == 1:
    return tuple(build_table(kind, seed=seed + m, **common) for m in range(num_hashes))
  _check_sizes(num_experts, vocab_size)
  if token_counts is None:
    raise ValueError("a balanced MultiHash needs token_counts: int[vocab_size] corpus frequencies")
  if not 0 <= balance_slack < 1:
    raise ValueError(f"balance_slack must be in [0, 1), got {balance_slack}")
  counts = _validate_counts(token_counts, vocab_size)
  tables = []
  for m in range(num_hashes):
    rng = np.random.default_rng(seed + m)
    table = _randomized_balanced_assignment(counts, num_experts, rng, balance_slack)
    tables.append(HashTable(kind="balanced", table=table, num_experts=num_experts,
                            vocab_size=vocab_size, seed=seed + m,
                            vocab_fingerprint=vocab_fingerprint))
  return tuple(tables)


def build_topk_table(k: int, *, num_experts: int, vocab_size: int, token_counts: ArrayLike,
                     seed: int = 0, vocab_fingerprint: str = "") -> HashTable:
  """Hash-selected top-k (DeepSeek-V4 style): k distinct experts per token, balanced.

  The paper's greedy balanced assignment with k picks per token: tokens by decreasing frequency
  each take the k currently lightest buckets, and each of those buckets is charged the token's full
  count (every selected expert processes the token).

  Args:
    k: experts per token, 1 <= k <= num_experts.
    token_counts: int/float[V] corpus occurrences of each token.
    seed: recorded only; the assignment is deterministic.

  Returns:
    HashTable of kind TOPK_KIND with table int32[V, k]; row v lists token v's experts, lightest
    bucket first.
  """
  _check_sizes(num_experts, vocab_size)
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= num_experts:
    raise ValueError(f"k must be an int in [1, num_experts={num_experts}], got {k!r}")
  counts = _validate_counts(token_counts, vocab_size)
  table = _greedy_balanced_assignment(counts, num_experts, k=int(k))
  return HashTable(kind=TOPK_KIND, table=table, num_experts=num_experts, vocab_size=vocab_size,
                   seed=seed, vocab_fingerprint=vocab_fingerprint)


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
                    segment_ids: Optional[ArrayLike] = None) -> Any:
  """bool[batch, length]: True where a token is the first of its sequence.

  A token starts a sequence at column 0, where `segment_ids` changes (packed examples), and where
  `positions` is 0 (packing without segment ids, seqio's convention that positions restart at 0).
  """
  xp = _namespace(token_ids, positions, segment_ids)
  batch, length = token_ids.shape
  starts = xp.zeros((batch, length), dtype=bool)
  if xp is np:
    starts[:, 0] = True
  else:
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
                 predicted_ids: Optional[ArrayLike] = None, key_space: int) -> Any:
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

  Returns:
    int32[batch, length] key ids in [0, key_space): numpy for numpy inputs, jnp otherwise (works
    under jit).
  """
  if key not in KEYS:
    raise ValueError(f"key must be one of {KEYS}, got {key!r}")
  key_space = _check_key_space(key_space)
  if token_ids is None:
    raise ValueError("token_ids is required for every key")
  xp = _namespace(token_ids, positions, segment_ids, targets, predicted_ids)
  token_ids = xp.asarray(token_ids)
  if token_ids.ndim != 2:
    raise ValueError(f"token_ids must be int[batch, length], got shape {token_ids.shape}")
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
  starts = sequence_starts(token_ids, positions=positions, segment_ids=segment_ids)
  shifted = xp.concatenate(
      [xp.full((batch, 1), BOUNDARY_ID, dtype=token_ids.dtype), token_ids[:, :-1]], axis=1)
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
