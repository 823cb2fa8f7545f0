"""Kernelised attention in O(N): PerformerAttention (FAVOR+) and LinearAttention (elu + 1).

Both compute out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j) without forming the
N x N matrix. Bidirectional: keys stream chunk by chunk into an (m, Dh) state per head, then
queries read it. Causal: one scan over chunks of c tokens (exact c x c attention inside a
chunk, the state carried between chunks). Features are computed inside each step and
rematerialised in the backward pass, so no (N, m) feature array is ever live.

`kernel_attention` takes each key's features as exp(s_j) * f_j + eps * w_j: f_j >= 0 (max 1 for
Performer), a log-scale s_j (Performer's per-key stabiliser plus key_bias) and a weight w_j
(exp(key_bias), 0 at padding). The scales are applied relative to C_i = max of s_j over the
keys query i can see (all keys; causal: keys <= i), exactly as in online softmax, so large
logits never overflow and, in causal mode, nothing after i (not even a stabiliser) changes
output i. The official FAVOR+ code instead takes one max over all keys, which leaks the
future in causal mode.
"""
from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
from flax import linen as nn

from hvlm_jax.models.attention.common import OutProjection, QKVProjection
from hvlm_jax.models.attention.sparse import NEG, pad_axis
from hvlm_jax.models.domain.lora import LoRASpec
from hvlm_jax.models.layers import Dtype


STREAM_CHUNK = 512  # Tokens per step of the bidirectional passes (keeps each step in cache).


def _divide(num, den, eps_den):
  """num (..., Dh) / (den + eps_den) (...), and 0 for a query that sees no real key.

  den >= 0. When every key a query sees is padding, num and den are 0; Performer's eps_den
  (1e-30) would then make the backward pass divide by 1e-60, which underflows to 0 in
  float32 and turns 0 / 0 into NaN for every shared parameter of the batch. Such queries
  (den + eps_den <= 1e-30) give 0 without dividing at all, in both passes.
  """
  den = den + eps_den
  ok = den > 1e-30
  return jnp.where(ok[..., None], num / jnp.where(ok, den, 1.0)[..., None], 0.0)


def kernel_attention(q, k, v, features, log_w=None, *, causal: bool = False,
                     eps_k: float = 0.0, eps_den: float = 0.0, chunk_size: int = 64):
  """Normalised kernel attention with stabilised key scales, streamed in chunks.

  Args:
    q, k: (B, N, H, d); v: (B, N, H, Dh).
    features: `(x (B, c, H, d), is_query) -> (phi (B, c, H, m) >= 0, log_scale (B, c, H) or
      None)`, applied chunk by chunk: key j's features are exp(log_scale_j) * phi_j.
    log_w: (B, N) float32 log key weight (key_bias; NEG at padding) or None. Key j's features
      are multiplied by exp(log_w_j); its eps term by the same weight.
    eps_k: added to every key feature (relative to the stabilised scale), as in FAVOR+.
    eps_den: added to the denominator, as in linear attention. A query that sees no real
      key (its whole example masked, or only padding before it in causal mode) gives 0.
    chunk_size: tokens per step of the causal scan (exact c x c attention inside a chunk).
  Returns:
    (B, N, H, Dh) float32. Time O(N m (d + Dh) H) (+ O(N c m H) causal). Memory O(c m H) per
    step: keys stream into an (m, Dh) state per head (lax.scan), then queries read it
    (lax.map), each step rematerialised in the backward pass, so no (N, m) feature array is
    ever live.
  """
  b, n, h, _ = q.shape
  lw = jnp.zeros((b, n), jnp.float32) if log_w is None else log_w.astype(jnp.float32)
  chunk = min(chunk_size if causal else STREAM_CHUNK, n)
  def chunked(x, value=0.0):
    x = pad_axis(x.astype(jnp.float32), chunk, value=value)
    return jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)
  qs, ks, vs, lws = chunked(q), chunked(k), chunked(v), chunked(lw, NEG)
  m = jax.eval_shape(lambda x: features(x, True)[0], qs[0]).shape[-1]
  dh = v.shape[-1]
  init = (jnp.zeros((b, h, m, dh), jnp.float32), jnp.zeros((b, h, m), jnp.float32),
          jnp.zeros((b, h, dh), jnp.float32), jnp.zeros((b,), jnp.float32),
          jnp.full((b, h), NEG, jnp.float32))

  def key_features(kk, lw_c):
    f, top = features(kk, False)
    s = lw_c[..., None] + (0.0 if top is None else top)  # (B, c, H)
    real = lw_c > NEG / 2
    return jnp.where(real[..., None, None], f, 0.0), s, jnp.where(real, jnp.exp(lw_c), 0.0)

  def absorb(carry, f, s, vv, ww, c_new):
    """Adds a chunk of keys to the carry, rescaled from the carried max to c_new."""
    state, norm, e_state, e_norm, c_prev = carry
    # Key j's scale w_j goes on its value (Dh wide) and into a dot, not onto its m features:
    # the backward then sums over Dh, not m (XLA:CPU ran that sum over m at ~9 ms a chunk).
    w = jnp.exp(s - c_new[:, None])  # (B, c, H)
    scale = jnp.exp(c_prev - c_new)
    return (state * scale[..., None, None]
            + jnp.einsum("bjhm,bjhd->bhmd", f, vv * w[..., None]),
            norm * scale[..., None] + jnp.einsum("bjhm,bjh->bhm", f, w),
            e_state + jnp.einsum("bj,bjhd->bhd", ww, vv), e_norm + ww.sum(1), c_new)

  def read(carry, pq, r):
    """num, den of queries pq (B, c, H, m) from the carry; r rescales its max to theirs."""
    state, norm, e_state, e_norm, _ = carry
    num = jnp.einsum("bihm,bhmd->bihd", pq, state) * r[..., None]
    den = jnp.einsum("bihm,bhm->bih", pq, norm) * r
    if eps_k:  # As einsums, so that e_state's gradient is a dot, not a sum over queries.
      q_sum = pq.sum(-1)
      num = num + eps_k * jnp.einsum("bih,bhd->bihd", q_sum, e_state)
      den = den + eps_k * jnp.einsum("bih,b->bih", q_sum, e_norm)
    return num, den

  if not causal:
    @jax.checkpoint
    def key_step(carry, inp):
      kk, vv, lw_c = inp
      f, s, ww = key_features(kk, lw_c)
      return absorb(carry, f, s, vv, ww, jnp.maximum(carry[-1], s.max(1))), None

    carry, _ = jax.lax.scan(key_step, init, (ks, vs, lws))

    @jax.checkpoint
    def query_step(qq):
      num, den = read(carry, features(qq, True)[0], jnp.ones(qq.shape[:3], jnp.float32))
      return _divide(num, den, eps_den)

    out = jax.lax.map(query_step, qs)
  else:
    tril = jnp.tril(jnp.ones((chunk, chunk), bool))

    @jax.checkpoint
    def step(carry, inp):
      qq, kk, vv, lw_c = inp
      pq = features(qq, True)[0]
      f, s, ww = key_features(kk, lw_c)
      c_i = jnp.maximum(carry[-1][:, None], jax.lax.cummax(s, axis=1))  # (B, c, H): no future
      num, den = read(carry, pq, jnp.exp(carry[-1][:, None] - c_i))
      # Within the chunk: exact weights exp(s_j - c_i) <= 1 for j <= i.
      expo = jnp.where(tril, s.transpose(0, 2, 1)[:, :, None, :]
                       - c_i.transpose(0, 2, 1)[..., None], -jnp.inf)  # (B, H, i, j)
      att = jnp.einsum("bihm,bjhm->bhij", pq, f) * jnp.exp(expo)
      if eps_k:
        att = att + jnp.where(tril, eps_k * pq.sum(-1).transpose(0, 2, 1)[..., None]
                              * ww[:, None, None, :], 0.0)
      num = num + jnp.einsum("bhij,bjhd->bihd", att, vv)
      den = den + att.sum(-1).transpose(0, 2, 1)
      return absorb(carry, f, s, vv, ww, c_i[:, -1]), _divide(num, den, eps_den)

    _, out = jax.lax.scan(step, init, (qs, ks, vs, lws))
  return jnp.moveaxis(out, 0, 1).reshape(b, -1, h, dh)[:, :n]


def key_log_weights(mask, key_bias, shape) -> jax.Array:
  """(B, N) float32 log key weight: key_bias, NEG at padding."""
  log_w = jnp.zeros(shape, jnp.float32)
  if key_bias is not None:
    log_w = log_w + key_bias.astype(jnp.float32)
  if mask is not None:
    log_w = jnp.where(mask, log_w, NEG)
  return log_w


# ----- Performer -------------------------------------------------------------------------------
def orthogonal_features(key: jax.Array, num_features: int, dim: int) -> jax.Array:
  """(m, d) FAVOR+ projection: stacked Haar-orthogonal blocks, rows scaled to chi(d) norms.

  Each row is marginally N(0, I_d), as the unbiased positive random features need; rows
  within a block of d are exactly orthogonal (the ORF variance reduction).
  """
  blocks = math.ceil(num_features / dim)
  keys = jax.random.split(key, blocks + 1)
  rows = []
  for k in keys[:blocks]:
    q, r = jnp.linalg.qr(jax.random.normal(k, (dim, dim), jnp.float32))
    # Householder QR fixes the signs of R's diagonal, which biases Q (e.g. every first
    # column points the same way); flipping by sign(diag R) makes Q Haar (Mezzadri, 2007).
    rows.append((q * jnp.sign(jnp.diagonal(r))[None, :]).T)
  norms = jnp.linalg.norm(jax.random.normal(keys[-1], (num_features, dim), jnp.float32), axis=1)
  return jnp.concatenate(rows)[:num_features] * norms[:, None]


def softmax_kernel_features(x, projection, is_query: bool):
  """Positive random features of Choromanski et al. (2021), Lemma 1, float32.

  x: (B, N, H, d); projection: (m, d). Returns (features, log_scale): queries give
  exp(w.x' - |x'|^2/2 - max) + 0 and log_scale None (a per-query constant cancels); keys give
  f = exp(w.x' - |x'|^2/2 - s) with s = max over features, returned as log_scale (B, N, H).
  x' = x d^(-1/4) so that the kernel estimates exp(q.k / sqrt(d)).
  """
  xs = x.astype(jnp.float32) * x.shape[-1] ** -0.25
  logits = jnp.einsum("bnhd,md->bnhm", xs, projection) - 0.5 * (xs * xs).sum(-1, keepdims=True)
  top = logits.max(-1, keepdims=True)
  feats = jnp.exp(logits - top)
  return (feats, None) if is_query else (feats, top[..., 0])


def favor_attention(q, k, v, projection, log_w=None, *, causal: bool, eps: float,
                    chunk_size: int = 64):
  """FAVOR+ on projected heads: q, k, v (B, N, H, Dh), projection (m, Dh), log_w (B, N)
  from `key_log_weights`. phi(q) = exp(w.q' - |q'|^2/2 - max) + eps; keys as in
  `softmax_kernel_features`, plus eps relative to the stabiliser. Returns (B, N, H, Dh)
  float32.
  """
  def features(x, is_query):
    f, top = softmax_kernel_features(x, projection, is_query)
    return (f + eps if is_query else f), top
  return kernel_attention(q, k, v, features, log_w, causal=causal, eps_k=eps, eps_den=1e-30,
                          chunk_size=chunk_size)


def elu_features(x, is_query):
  """phi(x) = elu(x) + 1 (Katharopoulos et al., 2020), float32; no log scale."""
  del is_query
  return jax.nn.elu(x.astype(jnp.float32)) + 1.0, None


class PerformerAttention(nn.Module):
  """FAVOR+ attention (Choromanski et al., ICLR 2021). Contract: common.py.

  Features are redrawn from the `features` PRNG stream on every training call
  (deterministic=False, redraw=True), and fixed at eval: drawn from `feature_seed` folded
  with the module's path, so every layer has its own fixed draw and eval is reproducible.
  key_bias multiplies phi(k) by exp(key_bias). Time O(N m Dh H); memory see
  `kernel_attention`.
  """
  num_heads: int
  num_features: int = 256
  causal: bool = False
  redraw: bool = True
  feature_seed: int = 0
  eps: float = 1e-6
  chunk_size: int = 64
  lora: LoRASpec | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def projection(self, dim: int, deterministic: bool) -> jax.Array:
    if self.redraw and not deterministic:
      if not self.has_rng("features"):
        raise ValueError("PerformerAttention in training mode draws random features from the "
                         "'features' PRNG stream: pass rngs={'features': key} to apply.")
      key = self.make_rng("features")
    else:
      path = "/".join(str(p) for p in self.scope.path)
      key = jax.random.fold_in(jax.random.key(self.feature_seed), zlib.crc32(path.encode()))
    return orthogonal_features(key, self.num_features, dim)

  @nn.compact
  def __call__(self, x, mask=None, *, key_bias=None, domain=None, deterministic=True):
    kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = QKVProjection(self.num_heads, name="qkv", **kw)(
        x, domain, deterministic=deterministic)
    proj = self.projection(q.shape[-1], deterministic)
    y = favor_attention(q, k, v, proj, key_log_weights(mask, key_bias, x.shape[:2]),
                        causal=self.causal, eps=self.eps, chunk_size=self.chunk_size)
    return OutProjection(name="out_proj", **kw)(y.astype(self.dtype), domain,
                                                 deterministic=deterministic)


# ----- linear (elu + 1) ------------------------------------------------------------------------
class LinearAttention(nn.Module):
  """Linear attention (Katharopoulos et al., ICML 2020): phi(x) = elu(x) + 1, no 1/sqrt(d).

  out_i = phi(q_i) sum_j phi(k_j) v_j^T / (phi(q_i) sum_j phi(k_j) + eps); causal by the
  chunked scan. Padded keys get phi = 0; key_bias multiplies phi(k) by exp(key_bias).
  Time O(N Dh^2 H); memory see `kernel_attention`. Contract: common.py.
  """
  num_heads: int
  causal: bool = False
  eps: float = 1e-6
  chunk_size: int = 64
  lora: LoRASpec | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, key_bias=None, domain=None, deterministic=True):
    kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = QKVProjection(self.num_heads, name="qkv", **kw)(
        x, domain, deterministic=deterministic)
    y = kernel_attention(q, k, v, elu_features, key_log_weights(mask, key_bias, x.shape[:2]),
                         causal=self.causal, eps_den=self.eps, chunk_size=self.chunk_size)
    return OutProjection(name="out_proj", **kw)(y.astype(self.dtype), domain,
                                                 deterministic=deterministic)
