"""Block-sparse softmax attention: StridedAttention and LocalGlobalAttention.

Both reshape the (padded) sequence into blocks and compute logits only for the key sets of the
pattern, so no N x N array exists in the forward or backward program. The blocked helpers at
the top (padding, neighbour blocks, a softmax over several key sets) also serve
hierarchical.py.

Video tokens are time-major (index = t * P + s, P tokens per frame, 196 at 224 px / 16 px), so
blocks of P tokens are frames: the defaults below use 196, and any N works (the sequence is
padded to a multiple of the block and the padding masked).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from hvlm_jax.models.attention.common import OutProjection, QKVProjection
from hvlm_jax.models.domain.lora import LoRASpec
from hvlm_jax.models.layers import Dtype, partitioned

NEG = -1e9  # Finite "minus infinity": fully masked rows stay NaN-free.


# ----- blocked helpers -------------------------------------------------------------------------
def pad_axis(x: jax.Array, multiple: int, axis: int = 1, value=0) -> jax.Array:
  """Pads `axis` of x at the end to a multiple of `multiple`."""
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def padded_key_bias(mask, key_bias, batch: int, n: int, n_pad: int) -> jax.Array:
  """(B, n_pad) float32 additive key bias: key_bias, NEG at padding and at masked tokens."""
  bias = jnp.zeros((batch, n), jnp.float32)
  if key_bias is not None:
    bias = bias + key_bias.astype(jnp.float32)
  if mask is not None:
    bias = jnp.where(mask, bias, NEG)
  return jnp.pad(bias, ((0, 0), (0, n_pad - n)), constant_values=NEG)


def neighbour_blocks(x: jax.Array, causal: bool, fill=0.0) -> jax.Array:
  """(B, A, w, ...) -> (B, A, K*w, ...): blocks a-1, a (, a+1), K = 2 if causal else 3.

  Out-of-range neighbours are filled with `fill` (use NEG for biases, 0 for keys/values).
  """
  pad = [(0, 0)] * x.ndim
  pad[1] = (1, 1)
  xp = jnp.pad(x, pad, constant_values=fill)
  a = x.shape[1]
  parts = [xp[:, 0:a], xp[:, 1:a + 1]] + ([] if causal else [xp[:, 2:a + 2]])
  return jnp.concatenate(parts, axis=2)


def neighbour_positions(num_blocks: int, block: int, causal: bool) -> np.ndarray:
  """(A, K*w) int token index of each key of `neighbour_blocks` (may be < 0 or >= A*w)."""
  offsets = np.arange(-1, 1 if causal else 2)
  starts = (np.arange(num_blocks)[:, None] + offsets[None, :]) * block
  return (starts[:, :, None] + np.arange(block)[None, None, :]).reshape(num_blocks, -1)


def block_logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """q (B, A, w, H, Dh) against per-block keys (B, A, K, H, Dh) or shared keys (B, K, H, Dh).

  Returns float32 logits (B, A, H, w, K); q must already carry the 1/sqrt(Dh) scale.
  """
  spec = "bawhd,bakhd->bahwk" if k.ndim == 5 else "bawhd,bkhd->bahwk"
  return jnp.einsum(spec, q, k, preferred_element_type=jnp.float32)


def block_values(p: jax.Array, v: jax.Array) -> jax.Array:
  """probs (B, A, H, w, K) times per-block (B, A, K, H, Dh) or shared (B, K, H, Dh) values."""
  spec = "bahwk,bakhd->bawhd" if v.ndim == 5 else "bahwk,bkhd->bawhd"
  return jnp.einsum(spec, p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def joint_softmax(logits: list[jax.Array], dropout_rate: float = 0.0,
                  rng: jax.Array | None = None, normalize: bool = True):
  """One softmax over the union of several key sets, each (..., K_i) float32 logits.

  The max is shared so every part is normalised by the same sum. With `rng`, inverted dropout
  is applied to the probabilities. With normalize=False, returns (weights, total): the
  unnormalised weights exp(logit - max) (dropout applied) and their sum (..., 1) over all
  sets, for callers that divide the attention output by `total` instead of the weights:
  the same result with a division over Dh instead of K, and a backward pass without a sum
  over the keys (XLA:CPU ran that sum at ~80 ms per 1024-query step of local_global at 6272
  tokens; README, Attention).
  """
  m = logits[0].max(-1, keepdims=True)
  for lg in logits[1:]:
    m = jnp.maximum(m, lg.max(-1, keepdims=True))
  m = jax.lax.stop_gradient(m)
  e = [jnp.exp(lg - m) for lg in logits]
  total = sum(x.sum(-1, keepdims=True) for x in e)
  probs = [x / total for x in e] if normalize else e
  if rng is not None and dropout_rate > 0:
    keys = jax.random.split(rng, len(probs))
    probs = [jnp.where(jax.random.bernoulli(kk, 1.0 - dropout_rate, p.shape),
                       p / (1.0 - dropout_rate), 0.0) for kk, p in zip(keys, probs)]
  return probs if normalize else (probs, total)


def to_blocks(x: jax.Array, block: int) -> jax.Array:
  """(B, A*w, ...) -> (B, A, w, ...)."""
  return x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:])


def dropout_rng(module: nn.Module, rate: float, deterministic: bool):
  """The module's `dropout` PRNG key when dropout is active, else None."""
  return module.make_rng("dropout") if rate > 0 and not deterministic else None


def blocked_attention(q, k, v, bias, *, window: int, causal: bool, shared=(), per_block=(),
                      query_chunk: int = 1024, dropout_rate: float = 0.0, rng=None):
  """Each block of `window` queries attends to its neighbour blocks plus extra key sets.

  One softmax per query covers: the exact keys of blocks a-1, a, a+1 (causal: a-1, a with
  keys <= i) with additive `bias`, plus each extra set:
    shared:    (k (B, K, H, Dh), v, bias (B, A or 1, K), positions (K,) int or None): keys
               seen by every block with a per-block bias (NEG drops a key for a block);
               `positions` masks keys after the query when causal.
    per_block: (k (B, A, K, H, Dh), v, bias (B, A, K)): a key set of its own per block.
  Blocks are processed about `query_chunk` queries at a time (lax.map), each step
  rematerialised in the backward pass, so memory is O(query_chunk (3w + K) H) and no N x N
  (or N x 3w) array is ever live.
  Args:
    q, k, v: (B, A*w, H, Dh), q already scaled by 1/sqrt(Dh); bias: (B, A*w) float32.
  Returns:
    (B, A*w, H, Dh) float32.
  """
  b, n, h, dh = q.shape
  w = window
  a = n // w
  steps = math.ceil(a / max(1, query_chunk // w))
  g = math.ceil(a / steps)  # Blocks per step, balanced so that little padding is added.
  a_pad = steps * g
  qb = to_blocks(pad_axis(q, a_pad * w), w)
  kx, vx = (jnp.pad(pad_axis(t, a_pad * w), ((0, 0), (w, w), (0, 0), (0, 0))) for t in (k, v))
  bx = jnp.pad(pad_axis(bias, a_pad * w, value=NEG), ((0, 0), (w, w)), constant_values=NEG)
  shared = [(ks, vs, pad_axis(bs, a_pad, value=NEG) if bs.shape[1] > 1 else bs, ps)
            for ks, vs, bs, ps in shared]
  per_block = [(pad_axis(kp, a_pad), pad_axis(vp, a_pad), pad_axis(bp, a_pad, value=NEG))
               for kp, vp, bp in per_block]
  offsets = range(2 if causal else 3)

  def step(start):
    take = lambda x, size, at: jax.lax.dynamic_slice_in_dim(x, at, size, axis=1)
    neighbours = lambda x: jnp.concatenate(
        [to_blocks(take(x, (g + 2) * w, start * w), w)[:, o:o + g] for o in offsets], axis=2)
    qg = take(qb, g, start)
    lg = block_logits(qg, neighbours(kx)) + neighbours(bx)[:, :, None, None, :]
    if causal:  # Key j of blocks (a-1, a) sits at (a-1)*w + j; query r at a*w + r.
      lg = jnp.where(np.arange(2 * w)[None, :] - w > np.arange(w)[:, None], NEG, lg)
    logits, values = [lg], [neighbours(vx)]
    qpos = (start + jnp.arange(g))[:, None, None] * w + jnp.arange(w)[None, :, None]
    for ks, vs, bs, ps in shared:
      bg = take(bs, g, start) if bs.shape[1] > 1 else bs
      lg = block_logits(qg, ks) + bg[:, :, None, None, :]
      if causal and ps is not None:
        lg = jnp.where((jnp.asarray(ps)[None, None, :] > qpos)[None, :, None], NEG, lg)
      logits.append(lg)
      values.append(vs)
    for kp, vp, bp in per_block:
      logits.append(block_logits(qg, take(kp, g, start)) + take(bp, g, start)[:, :, None, None])
      values.append(take(vp, g, start))
    weights, total = joint_softmax(logits, dropout_rate,
                                   None if rng is None else jax.random.fold_in(rng, start),
                                   normalize=False)
    return sum(block_values(p, vv) for p, vv in zip(weights, values)) / jnp.swapaxes(
        total, 2, 3)  # (B, g, H, w, 1) -> (B, g, w, H, 1).

  y = jax.lax.map(jax.checkpoint(step), jnp.arange(steps) * g)  # (steps, B, g, w, H, Dh)
  return jnp.moveaxis(y, 0, 1).reshape(b, a_pad * w, h, dh)[:, :n]


# ----- strided ---------------------------------------------------------------------------------
def strided_attention(q, k, v, bias=None, *, stride: int, local: bool = True,
                      causal: bool = False, dropout_rate: float = 0.0, rng=None) -> jax.Array:
  """Sparse Transformer strided pattern (Child et al., 2019), computed by reshaping.

  Query i = a * s + r (block a, residue r) attends to the keys with its residue r in every
  block (every s-th key) and, with `local`, to its own block of s keys; one softmax covers
  the union (the key shared by both sets counts once). Causal: earlier blocks, and keys <= i
  in its own block. With stride 1 the union is every key: full attention.

  Args:
    q, k, v: (B, N, H, Dh). bias: (B, N) float32 additive key bias or None.
  Returns:
    (B, N, H, Dh) float32. Time O(N (s + N/s) H Dh); memory O(N (s + N/s) H).
  """
  b, n, h, dh = q.shape
  s = stride
  n_pad = math.ceil(n / s) * s
  a = n_pad // s
  bias = jnp.zeros((b, n), jnp.float32) if bias is None else bias.astype(jnp.float32)
  bias = jnp.pad(bias, ((0, 0), (0, n_pad - n)), constant_values=NEG)
  qb, kb, vb = (to_blocks(pad_axis(t, s), s) for t in (q * dh ** -0.5, k, v))
  bias_b = to_blocks(bias, s)  # (B, A, s)

  # Strided set: same residue r in block c; logits laid out per query block (B, A, H, r, c).
  ls = jnp.einsum("barhd,bcrhd->bahrc", qb, kb, preferred_element_type=jnp.float32)
  ls = ls + bias_b.transpose(0, 2, 1)[:, None, None, :, :]
  blk = np.arange(a)
  drop = (blk[None, :] > blk[:, None]) if causal else np.zeros((a, a), bool)
  if local:
    drop = drop | (blk[None, :] == blk[:, None])  # Own block comes from the local set.
  ls = jnp.where(drop[None, :, None, None, :], NEG, ls)
  logits = [ls]
  if local:
    ll = jnp.einsum("barhd,bajhd->bahrj", qb, kb, preferred_element_type=jnp.float32)
    ll = ll + bias_b[:, :, None, None, :]
    if causal:
      ll = jnp.where(np.tril(np.ones((s, s), bool)), ll, NEG)
    logits.append(ll)
  weights, total = joint_softmax(logits, dropout_rate, rng, normalize=False)
  y = jnp.einsum("bahrc,bcrhd->barhd", weights[0].astype(v.dtype), vb,
                 preferred_element_type=jnp.float32)
  if local:
    y = y + block_values(weights[1], vb)
  y = y / jnp.swapaxes(total, 2, 3)  # (B, A, H, r, 1) -> (B, A, r, H, 1).
  return y.reshape(b, n_pad, h, dh)[:, :n]


class StridedAttention(nn.Module):
  """Strided sparse attention; see `strided_attention`. Call contract: common.py.

  With time-major video tokens and stride = tokens per frame, the strided set is the same
  patch in every frame and the local set the own frame (divided space-time attention).
  """
  num_heads: int
  stride: int = 196
  local: bool = True
  causal: bool = False
  implementation: str = "auto"  # "auto", "xla" or "splash" (TPU); see kernels.py.
  dropout_rate: float = 0.0
  lora: LoRASpec | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, key_bias=None, domain=None, deterministic=True):
    if self.stride < 1:
      raise ValueError(f"config.model.attention.strided.stride must be >= 1, got {self.stride}.")
    kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = QKVProjection(self.num_heads, name="qkv", **kw)(
        x, domain, deterministic=deterministic)
    b, n = x.shape[:2]
    rng = dropout_rng(self, self.dropout_rate, deterministic)
    from hvlm_jax.models.attention import kernels  # kernels.py builds on this module.
    impl = kernels.choose(self.implementation, "strided", dtype=q.dtype, dropout=rng is not None,
                          masked=mask is not None or key_bias is not None)
    if impl == "splash":
      y = kernels.splash_attention(q, k, v, "strided", causal=self.causal, stride=self.stride,
                                   local=self.local)
    else:
      bias = padded_key_bias(mask, key_bias, b, n, n)
      y = strided_attention(q, k, v, bias, stride=self.stride, local=self.local,
                            causal=self.causal, dropout_rate=self.dropout_rate, rng=rng)
    return OutProjection(name="out_proj", **kw)(y.astype(self.dtype), domain,
                                                 deterministic=deterministic)


# ----- local + global --------------------------------------------------------------------------
def frame_global_positions(n: int, tokens_per_frame: int, per_frame: int) -> np.ndarray:
  """Static indices of the first `per_frame` tokens of every frame, below n."""
  starts = np.arange(0, n, tokens_per_frame)
  idx = (starts[:, None] + np.arange(per_frame)[None, :]).reshape(-1)
  return idx[idx < n]


def local_global_attention(q, k, v, bias=None, *, window: int, global_idx=None,
                           global_kv=None, causal: bool = False, query_chunk: int = 1024,
                           dropout_rate: float = 0.0, rng=None) -> jax.Array:
  """Longformer / BigBird attention in blocks of `window` tokens plus global tokens.

  Every query attends to its own block and its neighbours (blocks a-1, a, a+1; causal: a-1
  and a with keys <= i), plus the global keys. Two kinds of global tokens:
    global_idx: static (G,) positions of the sequence (Longformer): their keys are attended
      by every query (not twice when also in the window) and their queries attend to all N
      keys (their rows are computed as full attention).
    global_kv: (k_g, v_g, bias_g) of shape (B, G, H, Dh) x 2 and (B, G): extra summary keys
      every query attends to (learned summary tokens).
  Args:
    q, k, v: (B, N, H, Dh); bias: (B, N) float32 additive key bias or None.
  Returns:
    (B, N, H, Dh) float32. Time O(N (3w + G) H Dh); memory O(query_chunk (3w + G) H + N G H).
  """
  b, n, h, dh = q.shape
  bias = jnp.zeros((b, n), jnp.float32) if bias is None else bias.astype(jnp.float32)
  q = q * dh ** -0.5
  n_pad = math.ceil(n / window) * window
  local_bias, shared = bias, []
  if global_idx is not None and len(global_idx):
    gi = np.asarray(global_idx)
    is_global = np.zeros(n, bool)
    is_global[gi] = True
    local_bias = jnp.where(is_global, NEG, bias)  # Global keys count once, in their own set.
    shared.append((k[:, gi], v[:, gi], bias[:, None, gi], gi))
  if global_kv is not None:
    kg, vg, bg = global_kv
    shared.append((kg, vg, bg.astype(jnp.float32)[:, None, :], None))
  y = blocked_attention(
      pad_axis(q, window), pad_axis(k, window), pad_axis(v, window),
      jnp.pad(local_bias, ((0, 0), (0, n_pad - n)), constant_values=NEG), window=window,
      causal=causal, shared=shared, query_chunk=query_chunk, dropout_rate=dropout_rate,
      rng=rng)[:, :n]
  if global_idx is not None and len(global_idx):
    gi = np.asarray(global_idx)
    lq = jnp.einsum("bghd,bkhd->bhgk", q[:, gi], k, preferred_element_type=jnp.float32)
    lq = lq + bias[:, None, None, :]
    if causal:
      lq = jnp.where(np.arange(n)[None, :] > gi[:, None], NEG, lq)
    (wq,), total = joint_softmax(
        [lq], dropout_rate, None if rng is None else jax.random.fold_in(rng, 2**31 - 1),
        normalize=False)
    yg = jnp.einsum("bhgk,bkhd->bghd", wq.astype(v.dtype), v,
                    preferred_element_type=jnp.float32) / jnp.swapaxes(total, 1, 2)
    y = y.at[:, gi].set(yg)
  return y


class LocalGlobalAttention(nn.Module):
  """Block-local attention plus global tokens; see `local_global_attention`.

  Attributes:
    window: block size w (default: one 224 px frame of 16 px patches).
    global_tokens: "frame" (the first `num_global` tokens of every frame of
      `tokens_per_frame` tokens are global), "learned" (`num_global` learned summary tokens:
      their queries attend to every token, and every token then attends to the summaries;
      not causal), or "none".
    query_chunk: queries processed per step (memory O(query_chunk (3w + G) H)).
    implementation: "auto", "xla", "cudnn" (GPU: `kernels.local_global_dense`) or "splash"
      (TPU, frame globals, no mask / key_bias); see kernels.py.
  """
  num_heads: int
  window: int = 196
  global_tokens: str = "frame"
  num_global: int = 1
  tokens_per_frame: int = 196
  causal: bool = False
  query_chunk: int = 1024
  implementation: str = "auto"
  dropout_rate: float = 0.0
  lora: LoRASpec | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, key_bias=None, domain=None, deterministic=True):
    modes = ("frame", "learned", "none")
    if self.global_tokens not in modes:
      raise ValueError(f"config.model.attention.local_global.global_tokens must be one of "
                       f"{modes}, got {self.global_tokens!r}.")
    if self.global_tokens == "learned" and self.causal:
      raise ValueError("config.model.attention.local_global.global_tokens='learned' "
                       "summarises the whole sequence and cannot be causal; use 'frame'.")
    kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = QKVProjection(self.num_heads, name="qkv", **kw)
    q, k, v = qkv(x, domain, deterministic=deterministic)
    b, n, d = x.shape
    bias = padded_key_bias(mask, key_bias, b, n, n)
    rng = dropout_rng(self, self.dropout_rate, deterministic)
    global_idx, global_kv = None, None
    if self.global_tokens == "frame" and self.num_global > 0:
      global_idx = frame_global_positions(n, self.tokens_per_frame, self.num_global)
    elif self.global_tokens == "learned" and self.num_global > 0:
      tokens = self.param("global_tokens", partitioned(nn.initializers.normal(0.02),
                                                       ("memory", "embed")),
                          (self.num_global, d), self.param_dtype)
      tokens = jnp.broadcast_to(tokens.astype(self.dtype)[None], (b, self.num_global, d))
      qg, kg, _ = qkv(tokens, domain, deterministic=deterministic)
      # Summaries gather from every real token; their values are what they gathered.
      lg = jnp.einsum("bghd,bkhd->bhgk", qg * qg.shape[-1] ** -0.5, k,
                      preferred_element_type=jnp.float32) + bias[:, None, None, :]
      pg = jax.nn.softmax(lg, axis=-1).astype(v.dtype)
      vg = jnp.einsum("bhgk,bkhd->bghd", pg, v, preferred_element_type=jnp.float32)
      global_kv = (kg, vg.astype(v.dtype), jnp.zeros((b, self.num_global), jnp.float32))
    from hvlm_jax.models.attention import kernels  # kernels.py builds on this module.
    impl = kernels.choose(self.implementation, "local_global", dtype=q.dtype,
                          dropout=rng is not None, masked=(mask is not None or key_bias is not None
                                                           or global_kv is not None))
    if impl == "cudnn":
      y = kernels.local_global_dense(q, k, v, bias, window=self.window, global_idx=global_idx,
                                     global_kv=global_kv, causal=self.causal)
    elif impl == "splash":
      y = kernels.splash_attention(
          q, k, v, "local_global", causal=self.causal, window=self.window,
          tokens_per_frame=self.tokens_per_frame,
          num_global=self.num_global if global_idx is not None else 0)
    else:
      y = local_global_attention(q, k, v, bias, window=self.window, global_idx=global_idx,
                                 global_kv=global_kv, causal=self.causal,
                                 query_chunk=self.query_chunk, dropout_rate=self.dropout_rate,
                                 rng=rng)
    return OutProjection(name="out_proj", **kw)(y.astype(self.dtype), domain,
                                                 deterministic=deterministic)
