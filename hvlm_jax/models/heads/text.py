"""Text transformer pieces shared by the QA encoder and the caption decoder.

`TextLayer` is a pre-LN block: self-attention (mask given by the caller: causal, per-question
block-diagonal, padding), optional cross-attention to video tokens, and an MLP (Vaswani et
al. 2017). It has two entry points sharing one set of parameters:
  __call__: a whole sequence at once (teacher forcing, question encoding);
  step:     one new token per sequence with a key/value cache (autoregressive decoding).
Cross-attention keys and values of the video are computed once per clip (`cross_kv`).
Several text sequences may share one video (G beams of a caption, Q questions): the caller
passes x as (B * G, L, D) and the video as (B, N, D); queries are regrouped to (B, G * L) so
the video's keys and values are never repeated in memory.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from hvlm_jax.models.attention.common import merge_heads, split_heads
from hvlm_jax.models.layers import Dtype, dense, layer_norm, partitioned

NEG_INF = -1e9  # Finite, so that fully masked rows (absent questions) stay NaN-free.


def sinusoidal_positions(positions: jax.Array, dim: int) -> jax.Array:
  """Positions (...,) int -> (..., dim) float32 encodings (Vaswani et al. 2017, sec. 3.5)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
  angles = positions.astype(jnp.float32)[..., None] * freqs
  enc = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(enc, [(0, 0)] * (enc.ndim - 1) + [(0, dim - 2 * half)])


def masked_attention(q, k, v, mask, bias=None):
  """Softmax attention with a boolean mask; statistics in float32.

  q: (B, Lq, H, Dh); k, v: (B, Lk, H, Dh); mask: broadcastable to (B, Lq, Lk), True where a
  query may attend a key; bias: optional (B, Lk) float added to every logit of a key (log
  token size for merged video tokens: ToMe's proportional attention). Returns (B, Lq, H, Dh)
  in v's dtype. Time and memory O(Lq Lk H): fine for text (tens of tokens) against video.
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)[:, None, None, :]
  logits = jnp.where(mask[:, None], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def causal_mask(length: int) -> jax.Array:
  """(1, L, L) bool lower-triangular mask."""
  return jnp.tril(jnp.ones((length, length), bool))[None]


class TextLayer(nn.Module):
  """Pre-LN block: x + SelfAttn(LN x); x + CrossAttn(LN x, video); x + MLP(LN x)."""
  hidden_size: int
  num_heads: int
  mlp_dim: int
  cross: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = self.hidden_size
    self.ln_self = layer_norm(**kw)
    self.self_query, self.self_key, self.self_value = (
        dense(d, ("embed", "joined_kv"), **kw) for _ in range(3))
    self.self_out = dense(d, ("joined_kv", "embed"), **kw)
    if self.cross:
      self.ln_cross = layer_norm(**kw)
      self.cross_query, self.cross_key, self.cross_value = (
          dense(d, ("embed", "joined_kv"), **kw) for _ in range(3))
      self.cross_out = dense(d, ("joined_kv", "embed"), **kw)
    self.ln_mlp = layer_norm(**kw)
    self.mlp_in = dense(self.mlp_dim, ("embed", "mlp"), **kw)
    self.mlp_out = dense(d, ("mlp", "embed"), **kw)
    self.drop = nn.Dropout(self.dropout_rate)

  def _self_qkv(self, x):
    h = self.ln_self(x)
    return tuple(split_heads(f(h), self.num_heads)
                 for f in (self.self_query, self.self_key, self.self_value))

  def __call__(self, x, self_mask, memory=None, memory_mask=None, memory_bias=None, *,
               deterministic=True):
    """x: (B*G, L, D); self_mask: broadcastable to (B*G, L, L); memory: (B, N, D);
    memory_mask: (B, N) bool; memory_bias: (B, N) float logit bias per video token."""
    q, k, v = self._self_qkv(x)
    x = x + self._dropout(self.self_out(merge_heads(masked_attention(q, k, v, self_mask))),
                          deterministic)
    if self.cross:
      x = self._cross(x, self.cross_kv(memory), memory_mask, memory_bias, deterministic)
    return self._mlp(x, deterministic)

  def cross_kv(self, memory):
    """Video tokens (B, N, D) -> cross-attention keys and values, each (B, N, H, Dh)."""
    return tuple(split_heads(f(memory), self.num_heads)
                 for f in (self.cross_key, self.cross_value))

  def step(self, x, index, cache, cross_kv=None, memory_mask=None, memory_bias=None):
    """One token per sequence at position `index`, deterministic.

    x: (B*G, 1, D); index: int32 scalar; cache: dict k, v (B*G, L_max, H, Dh) holding the
    keys and values of positions < index. Returns (y (B*G, 1, D), cache with position
    `index` written).
    """
    q, k, v = self._self_qkv(x)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, jnp.asarray(index, jnp.int32), zero, zero)
    cache = dict(k=jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start),
                 v=jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start))
    visible = (jnp.arange(cache["k"].shape[1]) <= index)[None, None, :]
    y = masked_attention(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype), visible)
    x = x + self.self_out(merge_heads(y))
    if self.cross:
      x = self._cross(x, cross_kv, memory_mask, memory_bias, True)
    return self._mlp(x, True), cache

  def _cross(self, x, kv, memory_mask, memory_bias, deterministic):
    bg, length, d = x.shape
    k, v = kv
    b = k.shape[0]
    q = split_heads(self.cross_query(self.ln_cross(x)), self.num_heads)
    q = q.reshape(b, (bg // b) * length, *q.shape[2:])  # (B, G*L, H, Dh): share the video.
    mask = (jnp.ones(k.shape[:2], bool) if memory_mask is None else memory_mask)[:, None, :]
    y = masked_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, memory_bias)
    y = self.cross_out(merge_heads(y.reshape(bg, length, *y.shape[2:])))
    return x + self._dropout(y, deterministic)

  def _mlp(self, x, deterministic):
    h = self._dropout(nn.gelu(self.mlp_in(self.ln_mlp(x))), deterministic)
    return x + self._dropout(self.mlp_out(h), deterministic)

  def _dropout(self, x, deterministic):
    return self.drop(x, deterministic=deterministic)


class AttentionPool(nn.Module):
  """Multi-head attention pooling with a learned probe query (MAP: Lee et al. 2019's PMA, as
  in big_vision's MAPHead).

  Call: `(x: (B, N, D), mask: (B, N) bool | None, bias: (B, N) float | None, positions:
  (N, D) | None) -> (B, D)`. `positions` (fixed encodings) are added to the normalised tokens
  before the key/value projections. Unlike a mean, the weights depend on content, so the
  result keeps *where* a salient token is: a mean over space of translation-equivariant
  features is nearly blind to an object's position. O(B N D).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, bias=None, positions=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, n, d = x.shape
    probe = self.param("probe", partitioned(nn.initializers.normal(0.02), (None, "embed")),
                       (1, d), self.param_dtype)
    q = split_heads(jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d)), self.num_heads)
    h = layer_norm("ln", **kw)(x)
    if positions is not None:
      h = h + positions.astype(h.dtype)
    k = split_heads(dense(d, ("embed", "joined_kv"), name="key", **kw)(h), self.num_heads)
    v = split_heads(dense(d, ("embed", "joined_kv"), name="value", **kw)(h), self.num_heads)
    m = (jnp.ones((b, n), bool) if mask is None else mask.astype(bool))[:, None, :]
    y = masked_attention(q, k, v, m, bias)
    return dense(d, ("joined_kv", "embed"), name="out", **kw)(merge_heads(y))[:, 0]
