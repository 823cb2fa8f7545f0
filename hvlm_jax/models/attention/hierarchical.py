"""Hierarchical attention: exact keys nearby, pooled summaries of the rest at coarser levels.

In the spirit of H-Transformer-1D (Zhu & Soricut, 2021) and multi-scale video attention:
level 0 is exact attention over the query's block of w tokens and its neighbours; level l
(pool size s_l) attends to segment summaries of s_l tokens. Each level covers the keys its finer
level does not: level l < L takes the segments in the 3 blocks of w * s_l tokens around the
query, minus level l-1's region; the last level takes every remaining segment. Every key of the
sequence is thus seen exactly once, at one resolution, in one softmax. A segment summary is
the bias-weighted mean of its keys and values, with logit bias logsumexp(key biases) (log of
its token count when there is no key bias), so a segment of identical keys weighs as much as
its tokens do under full attention.

Time O(N (3w L + N / s_L) H Dh), with one level O(N (w + N/s)); memory
O(query_chunk (3w L + N / s_L) H) for the logits (see sparse.blocked_attention).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from hvlm_jax.models.attention.common import OutProjection, QKVProjection
from hvlm_jax.models.attention.sparse import (
    NEG, blocked_attention, dropout_rng, neighbour_blocks, neighbour_positions, pad_axis,
    padded_key_bias, to_blocks)
from hvlm_jax.models.domain.lora import LoRASpec
from hvlm_jax.models.layers import Dtype


def check_levels(window: int, pool_sizes) -> None:
  """Raises ValueError unless every level's region boundaries fall on segment boundaries."""
  prev = 1
  for s in pool_sizes:
    if s < 1 or s % prev or (window * prev) % s:
      raise ValueError(
          f"config.model.attention.hierarchical.pool_sizes={tuple(pool_sizes)} with window="
          f"{window}: each pool size must be a multiple of the previous one and divide window "
          f"times the previous one (e.g. window=196, pool_sizes=(98,) or (4, 196)).")
    prev = s


def pool_segments(k, v, bias, size: int):
  """Segment summaries: (B, N, H, Dh) x 2, (B, N) -> (B, N/size, H, Dh) x 2, (B, N/size).

  Weights softmax(bias) within a segment; the summary's bias is logsumexp(bias).
  """
  bs = to_blocks(bias, size)  # (B, M, s)
  wts = jax.nn.softmax(bs, axis=-1)
  kp = jnp.einsum("bms,bmshd->bmhd", wts.astype(k.dtype), to_blocks(k, size))
  vp = jnp.einsum("bms,bmshd->bmhd", wts.astype(v.dtype), to_blocks(v, size))
  return kp, vp, jax.nn.logsumexp(bs, axis=-1)


def hierarchical_attention(q, k, v, bias=None, *, window: int, pool_sizes=(98,),
                           causal: bool = False, query_chunk: int = 1024,
                           dropout_rate: float = 0.0, rng=None) -> jax.Array:
  """See the module docstring. q, k, v: (B, N, H, Dh); bias (B, N) -> (B, N, H, Dh) float32.

  Causal: exact keys <= i in blocks a-1 and a, and only segments that end before the block.
  """
  check_levels(window, pool_sizes)
  b, n, h, dh = q.shape
  w = window
  unit = math.lcm(w, pool_sizes[-1]) if pool_sizes else w
  n_pad = math.ceil(n / unit) * unit
  a = n_pad // w
  bias = jnp.zeros((b, n), jnp.float32) if bias is None else bias.astype(jnp.float32)
  bias = jnp.pad(bias, ((0, 0), (0, n_pad - n)), constant_values=NEG)
  q, k, v = (pad_axis(t, unit) for t in (q * dh ** -0.5, k, v))
  shared, per_block = [], []
  block_start = np.arange(a) * w
  prev_block = w  # Block size whose neighbourhood the finer levels already cover.
  for level, s in enumerate(pool_sizes):
    prev_idx = block_start // prev_block
    lo = (prev_idx - 1) * prev_block
    hi = (prev_idx + (1 if causal else 2)) * prev_block
    kp, vp, bp = pool_segments(k, v, bias, s)
    m = kp.shape[1]
    last = level == len(pool_sizes) - 1
    if last:  # Every remaining segment; keys shared by all blocks.
      seg = np.broadcast_to(np.arange(m)[None, :], (a, m))
      bp = bp[:, None, :]
    else:  # Segments in the 3 blocks of w * s tokens around the query, gathered per block.
      kp, vp, bp = (pad_axis(t, w, value=NEG if t.ndim == 2 else 0) for t in (kp, vp, bp))
      nb = kp.shape[1] // w
      owner = block_start // (w * s)
      seg = neighbour_positions(nb, w, causal)[owner]  # (A, K*w) segment ids
      kp, vp = (neighbour_blocks(to_blocks(t, w), causal)[:, owner] for t in (kp, vp))
      bp = neighbour_blocks(to_blocks(bp, w), causal, fill=NEG)[:, owner]
    start = seg * s
    drop = (start >= lo[:, None]) & (start < hi[:, None])
    if causal:
      drop = drop | (start >= hi[:, None])
    bp = jnp.where(drop, NEG, bp)
    if last:
      shared.append((kp, vp, bp, None))
    else:
      per_block.append((kp, vp, bp))
    prev_block = w * s
  y = blocked_attention(q, k, v, bias, window=w, causal=causal, shared=shared,
                        per_block=per_block, query_chunk=query_chunk,
                        dropout_rate=dropout_rate, rng=rng)
  return y[:, :n]


class HierarchicalAttention(nn.Module):
  """Fine local + coarse pooled attention; see `hierarchical_attention`. Contract: common.py.

  Defaults for time-major video: window = one frame of 196 tokens (exact attention over the
  previous, own and next frame), one coarse level of 98-token segments for the rest (7 rows
  of 14 patches: the top and bottom halves of every other frame).
  """
  num_heads: int
  window: int = 196
  pool_sizes: tuple[int, ...] = (98,)
  causal: bool = False
  query_chunk: int = 1024
  dropout_rate: float = 0.0
  lora: LoRASpec | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, key_bias=None, domain=None, deterministic=True):
    check_levels(self.window, tuple(self.pool_sizes))
    kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = QKVProjection(self.num_heads, name="qkv", **kw)(
        x, domain, deterministic=deterministic)
    b, n = x.shape[:2]
    y = hierarchical_attention(
        q, k, v, padded_key_bias(mask, key_bias, b, n, n), window=self.window,
        pool_sizes=tuple(self.pool_sizes), causal=self.causal, query_chunk=self.query_chunk,
        dropout_rate=self.dropout_rate,
        rng=dropout_rng(self, self.dropout_rate, deterministic))
    return OutProjection(name="out_proj", **kw)(y.astype(self.dtype), domain,
                                                 deterministic=deterministic)
