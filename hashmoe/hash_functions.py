"""The paper's hash functions as tables (Roller et al. 2021, Section 3.1 and 3.2), built in numpy.

* "random": each token id to a uniformly random expert (the paper's default Hash Layer);
* "balanced": tokens by decreasing frequency, each to the currently least loaded expert, so every
  expert gets about the same number of training tokens;
* "clustered": k-means over a trained dense model's token embeddings, a cluster per expert, so
  similar tokens share an expert;
* "dispersed": the opposite, similar tokens spread over experts;
* MultiHash (`build_multihash`): N tables, one per weight slice, jointly balanced when balanced;
* hash top-k (`build_topk_table`): k distinct experts per token, balanced over the k columns.

Each builder returns a `hashmoe.hashing.HashTable` (the value with its file format and
fingerprint); `hashmoe.tables` decides which layers get which tables and builds them for a run.
"""
from __future__ import annotations

import heapq
from typing import Any, Optional
import warnings

import numpy as np
from scipy.cluster import vq as scipy_vq

from hashmoe import hashing
from hashmoe.hashing import TABLE_KINDS, TOPK_KIND, ArrayLike, HashTable

# Default slack of the randomised balanced MultiHash assignment, as a fraction of the ideal
# per-expert load (see `_randomized_balanced_assignment`).
DEFAULT_BALANCE_SLACK = 0.01

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
    counts = hashing.validate_counts(token_counts, vocab_size)
    table = _greedy_balanced_assignment(counts, num_experts, k=1)[:, 0]
  elif kind == "clustered":
    table = _kmeans_labels(embeddings, num_experts, vocab_size, seed, kmeans_iters).astype(np.int32)
  elif kind == "dispersed":
    counts = None if token_counts is None else hashing.validate_counts(token_counts, vocab_size)
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
  counts = hashing.validate_counts(token_counts, vocab_size)
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
  k = _check_topk(k, num_experts, vocab_size)
  counts = hashing.validate_counts(token_counts, vocab_size)
  table = _greedy_balanced_assignment(counts, num_experts, k=int(k))
  return HashTable(kind=TOPK_KIND, table=table, num_experts=num_experts, vocab_size=vocab_size,
                   seed=seed, vocab_fingerprint=vocab_fingerprint)


# --------------------------------------------------------------------------------------------------
# Top-k table initialisations other frameworks use, for comparison with the balanced one. None of
# them looks at token frequencies: their expert load on text is whatever the vocabulary's order
# and the corpus make of it (docs/results/hash_tables/).


def _check_topk(k: Any, num_experts: int, vocab_size: int) -> int:
  _check_sizes(num_experts, vocab_size)
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= num_experts:
    raise ValueError(f"k must be an int in [1, num_experts={num_experts}] (k distinct experts per "
                     f"token need at least k experts), got k={k!r}")
  return int(k)


# Uniform draws per block of rows of `random_topk_table` (float64: 64 MB).
_RANDOM_BLOCK_DRAWS = 1 << 23


def roundrobin_topk_table(k: int, *, num_experts: int, vocab_size: int, seed: int = 0,
                          vocab_fingerprint: str = "") -> HashTable:
  """Megatron-Core's placeholder table: token v takes experts (v + j) mod E for j = 0..k-1.

  Source: NVIDIA/Megatron-LM, branch `dev` (snapshot of 2026-08-21),
  `megatron/core/transformer/moe/router.py`, `TopKRouter.__init__`: for a hash layer it registers
  the buffer `tid2eid = torch.stack([(ids + k) % num_experts for k in range(self.topk)], dim=1)`
  (int32, ids = arange(actual_vocab_size)), and `TransformerConfig.__post_init__`
  (`transformer_config.py`) warns that this "will cause severe expert imbalance" and asks for a
  DeepSeek checkpoint's table or a frequency-aware initialisation. Consecutive ids share k - 1
  experts, and the load follows the vocabulary's id order (BPE merges put frequent tokens at low
  ids), not the corpus.

  Args:
    k: experts per token, 1 <= k <= num_experts.
    num_experts: E.
    vocab_size: V.
    seed: recorded only; the table is deterministic.
    vocab_fingerprint: recorded in the table.

  Returns:
    HashTable of kind "roundrobin_topk", table int32[V, k].
  """
  k = _check_topk(k, num_experts, vocab_size)
  table = (np.arange(vocab_size, dtype=np.int64)[:, None] + np.arange(k)[None, :]) % num_experts
  return HashTable(kind="roundrobin_topk", table=table.astype(np.int32), num_experts=num_experts,
                   vocab_size=vocab_size, seed=seed, vocab_fingerprint=vocab_fingerprint)


def random_topk_table(k: int, *, num_experts: int, vocab_size: int, seed: int = 0,
                      vocab_fingerprint: str = "") -> HashTable:
  """k distinct experts per token: the first k of an independent random permutation per token.

  Token v's permutation is the argsort of row v of `default_rng(seed).random((V, E))`, so this is
  exactly the table `routing.HashTopKRouter` makes when given no table (same seed, same table).
  Frequency-blind: an expert's load is the sum of ~V k / E random tokens' counts, so a few very
  frequent tokens decide it.

  Returns:
    HashTable of kind "random_topk", table int32[V, k]; row v lists its experts in permutation
    order.
  """
  k = _check_topk(k, num_experts, vocab_size)
  rng = np.random.default_rng(seed)
  table = np.empty((vocab_size, k), dtype=np.int32)
  # Row blocks bound the float64 scratch to 64 MB for a 129k x 256 table; the stream is consumed
  # in row-major order either way, so the blocks give the one-shot table.
  rows = max(1, _RANDOM_BLOCK_DRAWS // num_experts)
  for start in range(0, vocab_size, rows):
    draws = rng.random((min(rows, vocab_size - start), num_experts))
    if k < num_experts:
      # The k smallest draws in increasing order: argsort(...)[:, :k] without sorting all E.
      part = np.argpartition(draws, k - 1, axis=1)[:, :k]
      order = np.argsort(np.take_along_axis(draws, part, axis=1), axis=1)
      block = np.take_along_axis(part, order, axis=1)
    else:
      block = np.argsort(draws, axis=1)
    table[start:start + block.shape[0]] = block
  return HashTable(kind="random_topk", table=table, num_experts=num_experts,
                   vocab_size=vocab_size, seed=seed, vocab_fingerprint=vocab_fingerprint)


def zeros_topk_table(k: int, *, num_experts: int, vocab_size: int, seed: int = 0,
                     vocab_fingerprint: str = "") -> HashTable:
  """Every token on experts 0..k-1: hashmoe's model of an unconverted MaxText table.

  MaxText (AI-Hypercomputer/maxtext, snapshot of 2026-08-22, `src/maxtext/layers/moe.py`,
  `RoutedMoE.__init__`) creates `tid2eid` as `Tid2EidVar(jnp.zeros((vocab_size,
  num_experts_per_tok), float32))` and expects it from a converted checkpoint
  (`checkpoint_conversion/utils/param_mapping.py`, `DEEPSEEKV4_MAXTEXT_TO_HF_PARAM_MAPPING`). Left
  at zeros, its routing (`get_topk`: `tid2eid.astype(int32)[input_ids]`, then
  `take_along_axis(pre_bias_logits, ...)`) gives every token expert 0 in all k slots: expert 0
  computes each token k times with k equal weights (`deepseek_scale_weights` renormalises
  sigmoid / sqrt-softplus scores to 1/k each), so the layer is expert 0 alone times
  routed_scaling_factor (max/mean load = E). hashmoe's tables hold k distinct
  experts per row (a repeated one is refused), so this models it as the nearest valid table, the
  same k experts for every token (max/mean load = E / k): an upper bound on the quality of
  MaxText's zeros, which has k - 1 fewer experts at work.

  Returns:
    HashTable of kind "zeros_topk", table int32[V, k] with row v = [0, 1, ..., k-1].
  """
  k = _check_topk(k, num_experts, vocab_size)
  table = np.broadcast_to(np.arange(k, dtype=np.int32), (vocab_size, k))
  return HashTable(kind="zeros_topk", table=np.array(table), num_experts=num_experts,
                   vocab_size=vocab_size, seed=seed, vocab_fingerprint=vocab_fingerprint)


# Short names (`hashmoe build-hash --kind`) of the top-k table builders, by HashTable kind.
TOPK_SHORT_NAMES = {"balanced": TOPK_KIND, "roundrobin": "roundrobin_topk",
                    "random": "random_topk", "zeros": "zeros_topk"}


def build_topk(kind: str, k: int, *, num_experts: int, vocab_size: int,
               token_counts: Optional[ArrayLike] = None, seed: int = 0,
               vocab_fingerprint: str = "") -> HashTable:
  """A top-k table of any kind of `hashing.TOPK_KINDS` (or its short name of `TOPK_SHORT_NAMES`).

  Args:
    kind: "balanced_topk" / "balanced" (`build_topk_table`; needs `token_counts`),
      "roundrobin_topk" / "roundrobin", "random_topk" / "random", "zeros_topk" / "zeros".
    k: experts per token.
    token_counts: int[V] corpus counts (balanced only; ignored by the others).
    seed, vocab_fingerprint: recorded in the table; `seed` also fixes the random table.

  Returns:
    HashTable with table int32[V, k].
  """
  full = TOPK_SHORT_NAMES.get(kind, kind)
  common = dict(num_experts=num_experts, vocab_size=vocab_size, seed=seed,
                vocab_fingerprint=vocab_fingerprint)
  if full == TOPK_KIND:
    if token_counts is None:
      raise ValueError("a balanced top-k table needs token_counts: int[vocab_size] corpus counts")
    return build_topk_table(k, token_counts=token_counts, **common)
  builders = {"roundrobin_topk": roundrobin_topk_table, "random_topk": random_topk_table,
              "zeros_topk": zeros_topk_table}
  if full not in builders:
    raise ValueError(f"top-k table kind must be one of {sorted(TOPK_SHORT_NAMES)} or "
                     f"{list(hashing.TOPK_KINDS)}, got {kind!r}")
  return builders[full](k, **common)
