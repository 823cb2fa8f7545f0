"""Importance-aware bipartite token merging (ToMe, Bolya et al., ICLR 2023), unmerge, schedules.

The core is three pure functions on static shapes:
  `bipartite_soft_matching(metric, r, ...)` splits n tokens into sets A and B, gives each A
      token its most similar B token (cosine), and picks the r best edges. Importance (motion,
      saliency) is subtracted from every edge score, so merges go first to static,
      non-salient tokens; protected tokens are in no edge at all. O(n^2 C / 4) time and
      O(n^2 / 4) memory for the similarity, O(n log n) for the sorts.
  `merge(matching, x, sizes)` size-weighted mean of each merged group (or "sum" / "max");
      n tokens -> n - r tokens, ordered by anchor (time-major when anchors are grid indices).
  `unmerge(matching, y)` copies each merged token back to every position it absorbed.
`merge_schedule` fixes r per layer from the target compression and the schedule (static
under jit); `merge_step` is what the encoder runs before a block; it carries sizes (for
proportional attention, log(size) added to attention logits), anchors and the assignment of
every grid position to its current token (position tracking, `unmerge_to_grid`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hvlm_jax.config import ConfigError
from hvlm_jax.models.token_merging.saliency import attention_entropy_saliency

_KEY = "config.model.token_merging"


def schedule_weights(schedule: str, num_layers: int) -> np.ndarray:
  """Relative merge amounts per layer: "constant", "decreasing" or "w0,w1,..." (one per layer)."""
  if schedule == "constant":
    return np.ones(num_layers)
  if schedule == "decreasing":
    return np.arange(num_layers, 0, -1, dtype=np.float64)
  try:
    w = np.asarray([float(v) for v in schedule.split(",")])
  except ValueError:
    w = None
  if w is None or w.shape != (num_layers,) or (w < 0).any() or w.sum() <= 0:
    raise ConfigError(f"{_KEY}.schedule={schedule!r} must be 'constant', 'decreasing' or "
                      f"{num_layers} comma-separated non-negative weights, not all 0.")
  return w


def merge_schedule(num_tokens: int, num_layers: int, ratio: float, schedule: str = "decreasing",
                   protect_fraction: float = 0.0) -> tuple[int, ...]:
  """Tokens merged away before each block, r_0..r_{L-1} (static Python ints).

  `ratio` is the fraction of token-block work removed: the mean over blocks of the tokens
  entering a block is (1 - ratio) * num_tokens, so throughput scales with 1 / (1 - ratio)
  for the linear parts whatever the schedule. The schedule's weights w_l set the shape:
  r_l is proportional to w_l.

  Raises:
    ConfigError: if a layer would merge more than the unprotected half of its tokens.
  """
  if not 0.0 <= ratio < 1.0:
    raise ConfigError(f"{_KEY}.target_compression_ratio={ratio} must be in [0, 1).")
  w = schedule_weights(schedule, num_layers)
  cum = np.cumsum(w)
  scale = ratio * num_tokens / cum.mean()
  remaining = [num_tokens] + [int(round(num_tokens - scale * c)) for c in cum]
  rs = tuple(remaining[i] - remaining[i + 1] for i in range(num_layers))
  for i, r in enumerate(rs):
    n = remaining[i]
    if r > n // 2 - int(protect_fraction * n) or remaining[i + 1] < 1:
      raise ConfigError(
          f"{_KEY}: target_compression_ratio={ratio} with schedule={schedule!r} asks layer {i} "
          f"to merge {r} of {n} tokens, more than the unprotected half "
          f"(protect_fraction={protect_fraction}); lower the ratio or front-load the schedule.")
  return rs


class Matching(NamedTuple):
  """One bipartite merge of n tokens into n - r (all int32, batch-first).

  a_idx (B, na), b_idx (B, nb): token indices of sets A and B.
  src (B, r), dst (B, r): the merged edges, as positions in A and in B.
  unm (B, na - r): positions in A of the unmerged A tokens (ascending).
  order (B, n - r): output position k holds pre-order token order[k] (pre-order: unmerged A
    then B), sorting the output by anchor.
  remap (B, n): output index of every input token (what `unmerge` gathers with).
  anchors (B, n - r): anchor of every output token (a B token keeps its own anchor).
  """
  a_idx: jax.Array
  b_idx: jax.Array
  src: jax.Array
  dst: jax.Array
  unm: jax.Array
  order: jax.Array
  remap: jax.Array
  anchors: jax.Array


def _take(x, idx):
  """Batched gather along axis 1: x (B, n, ...) and idx (B, k) -> (B, k, ...)."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def checkerboard_parity(anchors: jax.Array, grid: tuple[int, ...]) -> jax.Array:
  """(B, n) grid indices -> (B, n) int32 parity of (t + y + x) on a time-major grid (T, H, W).

  Space-time neighbours have opposite parity, so the A / B split puts the most likely merges
  (the same patch one step later, the next patch) across the two sets.
  """
  coords = jnp.unravel_index(anchors, grid)
  return (sum(coords) % 2).astype(jnp.int32)


def bipartite_soft_matching(metric: jax.Array, r: int, *, parity: jax.Array | None = None,
                            anchors: jax.Array | None = None,
                            importance: jax.Array | None = None,
                            protected: jax.Array | None = None,
                            importance_weight: float = 1.0) -> Matching:
  """ToMe's bipartite soft matching with importance steering and protection.

  Args:
    metric: (B, n, C) features compared by cosine similarity (keys or tokens).
    r: tokens to remove, 0 <= r <= n // 2 (static).
    parity: (B, n) int 0 / 1 preferred set of each token (A = 0); sets are balanced to
      na = n // 2 by a stable sort, so they are exact when parities are balanced.
      None: alternate by position, as ToMe.
    anchors: (B, n) int sort key of the outputs (None: position); the output keeps the
      anchor of the B token of each group.
    importance: (B, n) float in [0, 1]; edge (a, b) scores cos(a, b) - importance_weight *
      max(importance_a, importance_b).
    protected: (B, n) bool; protected tokens are in no edge, hence never merged (needs at
      least r unprotected A tokens and one unprotected B token).

  Returns:
    A `Matching`.
  """
  b, n, _ = metric.shape
  na = n // 2
  pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  if parity is None:
    parity = pos % 2
  if anchors is None:
    anchors = pos
  perm = jnp.argsort(parity.astype(jnp.int32) * n + pos, axis=1, stable=True)
  a_idx, b_idx = perm[:, :na], perm[:, na:]
  m = metric.astype(jnp.float32)
  m = m * jax.lax.rsqrt((m * m).sum(-1, keepdims=True) + 1e-12)
  scores = jnp.einsum("bic,bjc->bij", _take(m, a_idx), _take(m, b_idx))
  if importance is not None:
    imp = importance.astype(jnp.float32)
    scores = scores - importance_weight * jnp.maximum(_take(imp, a_idx)[:, :, None],
                                                      _take(imp, b_idx)[:, None, :])
  if protected is not None:
    blocked = _take(protected, a_idx)[:, :, None] | _take(protected, b_idx)[:, None, :]
    scores = jnp.where(blocked, -jnp.inf, scores)
  node_max, node_idx = scores.max(-1), scores.argmax(-1).astype(jnp.int32)
  edges = jnp.argsort(-node_max, axis=1, stable=True).astype(jnp.int32)
  src, unm = edges[:, :r], jnp.sort(edges[:, r:], axis=1)
  dst = jnp.take_along_axis(node_idx, src, axis=1)

  pre_anchor = jnp.concatenate([_take(_take(anchors, a_idx), unm), _take(anchors, b_idx)], 1)
  order = jnp.argsort(pre_anchor, axis=1, stable=True).astype(jnp.int32)
  batch, nu = jnp.arange(b)[:, None], na - r
  inverse = jnp.zeros_like(order).at[batch, order].set(
      jnp.arange(n - r, dtype=jnp.int32)[None])
  # Pre-order index of every input token: unmerged A -> its slot, B and merged A -> B slot.
  pre_of_a = jnp.zeros((b, na), jnp.int32)
  pre_of_a = pre_of_a.at[batch, unm].set(jnp.arange(nu, dtype=jnp.int32)[None])
  pre_of_a = pre_of_a.at[batch, src].set(nu + dst)
  pre_of_b = jnp.broadcast_to(nu + jnp.arange(n - na, dtype=jnp.int32), (b, n - na))
  pre = jnp.zeros((b, n), jnp.int32).at[batch, a_idx].set(pre_of_a)
  pre = pre.at[batch, b_idx].set(pre_of_b)
  remap = jnp.take_along_axis(inverse, pre, axis=1)
  return Matching(a_idx, b_idx, src, dst, unm, order, remap,
                  jnp.take_along_axis(pre_anchor, order, axis=1))


def merge(matching: Matching, x: jax.Array, sizes: jax.Array | None = None,
          mode: str = "mean") -> jax.Array:
  """Merges (B, n, ...) -> (B, n - r, ...) along axis 1.

  mode "mean": size-weighted mean (x <- sum(x * s) / sum(s), sizes default 1), computed in
  float32 and returned in x.dtype; "sum": plain sum (use it to merge the sizes themselves);
  "max": elementwise max. Differentiable in x (gathers and a scatter-add).
  """
  if matching.src.shape[1] == 0:
    return x
  dtype, batch = x.dtype, jnp.arange(x.shape[0])[:, None]
  v = x.astype(jnp.float32)
  xa, xb = _take(v, matching.a_idx), _take(v, matching.b_idx)
  if mode == "max":
    xb = xb.at[batch, matching.dst].max(_take(xa, matching.src))
  elif mode == "sum":
    xb = xb.at[batch, matching.dst].add(_take(xa, matching.src))
  elif mode == "mean":
    s = jnp.ones(x.shape[:2], jnp.float32) if sizes is None else sizes.astype(jnp.float32)
    s = s.reshape(s.shape + (1,) * (x.ndim - 2))
    sa, sb = _take(s, matching.a_idx), _take(s, matching.b_idx)
    sa_src = _take(sa, matching.src)
    total = sb.at[batch, matching.dst].add(sa_src)
    summed = (xb * sb).at[batch, matching.dst].add(_take(xa, matching.src) * sa_src)
    received = jnp.zeros(sb.shape, bool).at[batch, matching.dst].set(True)
    # Tokens that absorbed nothing are passed through bit-exactly (no x * s / s rounding).
    xb = jnp.where(received, summed / total, xb)
  else:
    raise ValueError(f"Unknown merge mode {mode!r}; expected 'mean', 'sum' or 'max'.")
  pre = jnp.concatenate([_take(xa, matching.unm), xb], axis=1)
  return _take(pre, matching.order).astype(dtype)


def unmerge(matching: Matching, y: jax.Array) -> jax.Array:
  """(B, n - r, ...) -> (B, n, ...): every input position gets the token it was merged into."""
  if matching.src.shape[1] == 0:
    return y
  return _take(y, matching.remap)


def unmerge_to_grid(y: jax.Array, assignment: jax.Array) -> jax.Array:
  """(B, n, ...) merged tokens and (B, N) assignment -> (B, N, ...) on the full grid."""
  return _take(y, assignment)


def protect_top(importance: jax.Array, fraction: float) -> jax.Array | None:
  """(B, n) -> (B, n) bool: the floor(fraction * n) most important tokens with importance > 0."""
  k = int(fraction * importance.shape[1])
  if k == 0:
    return None
  _, top = jax.lax.top_k(importance, k)
  mask = jnp.zeros(importance.shape, bool).at[jnp.arange(importance.shape[0])[:, None],
                                               top].set(True)
  return mask & (importance > 0)


class MergeState(NamedTuple):
  """What the encoder carries between merges (n current tokens, N grid positions).

  sizes (B, n) float32: grid positions per token. anchors (B, n) int32: grid index of the
  token's anchor (its lineage's B token), keeping the sequence time-major. assignment (B, N)
  int32: current token of every grid position. motion, saliency (B, n) float32 or None: max
  over the token's positions of the per-position scores in [0, 1].
  """
  sizes: jax.Array
  anchors: jax.Array
  assignment: jax.Array
  motion: jax.Array | None
  saliency: jax.Array | None


def init_state(batch: int, num_tokens: int, motion=None, saliency=None) -> MergeState:
  ids = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens))
  return MergeState(jnp.ones((batch, num_tokens), jnp.float32), ids, ids, motion, saliency)


def token_importance(state: MergeState, motion_weight, saliency_weight,
                     attention: jax.Array | None = None, attention_share: float = 0.0):
  """(B, n) importance in [0, 1]: (g_m motion + g_s saliency) / (g_m + g_s), or None.

  motion_weight, saliency_weight: scalars or (B,) runtime switches g_m, g_s >= 0 (0 turns a
  source off without recompiling). `attention` (B, n), if given, is blended into saliency
  with share `attention_share` in [0, 1].
  """
  sal = state.saliency
  if attention is not None:
    sal = attention if sal is None else (1 - attention_share) * sal + attention_share * attention
  parts = [(motion_weight, state.motion), (saliency_weight, sal)]
  parts = [(jnp.asarray(g, jnp.float32).reshape(-1, 1), s) for g, s in parts if s is not None]
  if not parts:
    return None
  total = sum(g for g, _ in parts)
  return sum(g * s for g, s in parts) / jnp.maximum(total, 1e-6)


def merge_step(x: jax.Array, state: MergeState, r: int, grid: tuple[int, ...], *,
               motion_weight=1.0, saliency_weight=1.0, protect_fraction: float = 0.0,
               importance_weight: float = 1.0, attention_share: float = 0.0,
               attention_keys: int = 128) -> tuple[jax.Array, MergeState]:
  """Merges r of the n tokens x (B, n, D) on grid `grid` (e.g. (T', H', W')); static r.

  Similarity is the cosine of the tokens themselves (any attention type works; keys are not
  exposed by every family). Returns (x (B, n - r, D) time-major by anchor, new state).
  """
  if r == 0:
    return x, state
  attention = None
  if attention_share > 0:
    attention = attention_entropy_saliency(x, num_keys=attention_keys)
  importance = token_importance(state, motion_weight, saliency_weight, attention,
                                attention_share)
  protected = None if importance is None else protect_top(importance, protect_fraction)
  m = bipartite_soft_matching(jax.lax.stop_gradient(x), r,
                              parity=checkerboard_parity(state.anchors, grid),
                              anchors=state.anchors, importance=importance,
                              protected=protected, importance_weight=importance_weight)
  keep = lambda v: None if v is None else merge(m, v, mode="max")  # noqa: E731
  new = MergeState(merge(m, state.sizes, mode="sum"), m.anchors,
                   jnp.take_along_axis(m.remap, state.assignment, axis=1),
                   keep(state.motion), keep(state.saliency))
  return merge(m, x, state.sizes), new


def token_positions(state: MergeState, grid: tuple[int, ...]) -> jax.Array:
  """(B, n, len(grid)) float32 size-weighted centroid of each token's grid coordinates."""
  b, n = state.sizes.shape
  coords = jnp.stack(jnp.unravel_index(jnp.arange(int(np.prod(grid))), grid), -1)
  coords = jnp.broadcast_to(coords.astype(jnp.float32), (b, *coords.shape))
  sums = jax.vmap(lambda c, a: jax.ops.segment_sum(c, a, num_segments=n))(
      coords, state.assignment)
  return sums / state.sizes[..., None]
