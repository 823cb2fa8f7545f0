"""Kernelised attention in O(N): PerformerAttention (FAVOR+) and LinearAttention (elu + 1).

Both compute out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j) without forming the
N x N matrix: bidirectional as phi(Q) (phi(K)^T V); causal as a scan over chunks of c tokens
(exact c x c attention inside a chunk, an (m, Dh) state carried between chunks).

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


def kernel_attention(phi_q, phi_k, v, log_scale=None, weight=None, *, causal: bool = False,
                     eps_k: float = 0.0, eps_den: float = 0.0, chunk_size: int = 64):
  """Normalised kernel attention with stabilised key scales.

  Args:
    phi_q: (B, N, H, m) non-negative query features.
    phi_k: (B, N, H, m) non-negative key features f_j (zero at padding).
    v: (B, N, H, Dh) values.
    log_scale: (B, N, H) float32 s_j (NEG at padding) or None (zeros).
    weight: (B, N) float32 w_j for the eps term or None (ones).
    eps_k: added to every key feature (relative to the stabilised scale), as in FAVOR+.
    eps_den: added to the denominator, as in linear attention.
  Returns:
    (B, N, H, Dh) float32. Time O(N m Dh H) (+ O(N c m H) causal); memory O(N m H).
  """
  b, n, h, m = phi_q.shape
  f32 = jnp.float32
  phi_q, phi_k, v = phi_q.astype(f32), phi_k.astype(f32), v.astype(f32)
  s = jnp.zeros((b, n, h), f32) if log_scale is None else log_scale.astype(f32)
  w = jnp.ones((b, n), f32) if weight is None else weight.astype(f32)
  if causal:
    return _causal_chunks(phi_q, phi_k, v, s, w, eps_k, eps_den, chunk_size)
  c = s.max(axis=1)  # (B, H): one constant shared by all keys, so it cancels.
  kf = phi_k * jnp.exp(s - c[:, None])[..., None]
  state = jnp.einsum("bnhm,bnhd->bhmd", kf, v)
  norm = kf.sum(axis=1)  # (B, H, m)
  num = jnp.einsum("bnhm,bhmd->bnhd", phi_q, state)
  den = jnp.einsum("bnhm,bhm->bnh", phi_q, norm)
  if eps_k:
    q_sum = phi_q.sum(-1)
    num = num + eps_k * q_sum[..., None] * jnp.einsum("bn,bnhd->bhd", w, v)[:, None]
    den = den + eps_k * q_sum * w.sum(1)[:, None, None]
  return num / (den + eps_den)[..., None]


def _causal_chunks(phi_q, phi_k, v, s, w, eps_k, eps_den, chunk):
  """Causal kernel_attention: lax.scan over chunks, float32 carry (S, z, E, e, C)."""
  b, n, h, m = phi_q.shape
  dh = v.shape[-1]
  chunk = min(chunk, n)
  def chunked(x, value=0.0):
    x = pad_axis(x, chunk, value=value)
    return jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)
  xs = (chunked(phi_q), chunked(phi_k), chunked(v), chunked(s, NEG), chunked(w))
  tril = jnp.tril(jnp.ones((chunk, chunk), bool))

  def step(carry, inp):
    state, norm, e_state, e_norm, c_prev = carry
    pq, pk, vv, ss, ww = inp
    c_i = jnp.maximum(c_prev[:, None], jax.lax.cummax(ss, axis=1))  # (B, c, H), no future
    r = jnp.exp(c_prev[:, None] - c_i)  # Rescales the carried state to c_i (<= 1).
    q_sum = pq.sum(-1)
    num = jnp.einsum("bihm,bhmd->bihd", pq, state) * r[..., None]
    den = jnp.einsum("bihm,bhm->bih", pq, norm) * r
    # Intra-chunk: exact weights exp(s_j - c_i) <= 1 for j <= i.
    expo = jnp.where(tril[None, None], ss.transpose(0, 2, 1)[:, :, None, :]
                     - c_i.transpose(0, 2, 1)[..., None], -jnp.inf)  # (B, H, i, j)
    att = jnp.einsum("bihm,bjhm->bhij", pq, pk) * jnp.exp(expo)
    if eps_k:
      num = num + eps_k * q_sum[..., None] * e_state[:, None]
      den = den + eps_k * q_sum * e_norm[:, None, None]
      att = att + jnp.where(tril, eps_k * q_sum.transpose(0, 2, 1)[..., None]
                            * ww[:, None, None, :], 0.0)
    num = num + jnp.einsum("bhij,bjhd->bihd", att, vv)
    den = den + att.sum(-1).transpose(0, 2, 1)
    c_new = c_i[:, -1]
    kf = pk * jnp.exp(ss - c_new[:, None])[..., None]
    scale = jnp.exp(c_prev - c_new)
    state = state * scale[..., None, None] + jnp.einsum("bjhm,bjhd->bhmd", kf, vv)
    norm = norm * scale[..., None] + kf.sum(1)
    e_state = e_state + jnp.einsum("bj,bjhd->bhd", ww, vv)
    e_norm = e_norm + ww.sum(1)
    return (state, norm, e_state, e_norm, c_new), num / (den + eps_den)[..., None]

  init = (jnp.zeros((b, h, m, dh), jnp.float32), jnp.zeros((b, h, m), jnp.float32),
          jnp.zeros((b, h, dh), jnp.float32), jnp.zeros((b,), jnp.float32),
          jnp.full((b, h), NEG, jnp.float32))
  _, out = jax.lax.scan(step, init, xs)
  return jnp.moveaxis(out, 0, 1).reshape(b, -1, h, dh)[:, :n]


def _key_terms(mask, key_bias, shape):
  """(B, N) log key weight (key_bias, NEG at padding) and weight exp(key_bias) * mask."""
  log_w = jnp.zeros(shape, jnp.float32)
  if key_bias is not None:
    log_w = log_w + key_bias.astype(jnp.float32)
  if mask is not None:
    log_w = jnp.where(mask, log_w, NEG)
  return log_w, jnp.exp(log_w)


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


def favor_attention(q, k, v, projection, log_w, weight, *, causal: bool, eps: float,
                    chunk_size: int):
  """FAVOR+ on projected heads: q, k, v (B, N, H, Dh), projection (m, Dh), log_w / weight
  (B, N) from `_key_terms`. Returns (B, N, H, Dh) float32.

  Heads are processed one at a time (lax.map), each rematerialised in the backward pass, so
  only one head's (B, N, m) features are live: memory O(N m) instead of O(N m H).
  """
  @jax.checkpoint
  def one_head(qkv):
    q, k, v = (t[:, :, None] for t in qkv)
    phi_q, _ = softmax_kernel_features(q, projection, is_query=True)
    phi_k, top = softmax_kernel_features(k, projection, is_query=False)
    phi_k = jnp.where(log_w[..., None, None] > NEG / 2, phi_k, 0.0)
    return kernel_attention(phi_q + eps, phi_k, v, top + log_w[..., None], weight,
                            causal=causal, eps_k=eps, eps_den=1e-30,
                            chunk_size=chunk_size)[:, :, 0]
  y = jax.lax.map(one_head, tuple(jnp.moveaxis(t, 2, 0) for t in (q, k, v)))
  return jnp.moveaxis(y, 0, 2)


class PerformerAttention(nn.Module):
  """FAVOR+ attention (Choromanski et al., ICLR 2021). Contract: common.py.

  Features are redrawn from the `features` PRNG stream on every training call
  (deterministic=False, redraw=True), and fixed at eval: drawn from `feature_seed` folded
  with the module's path, so every layer has its own fixed draw and eval is reproducible.
  key_bias multiplies phi(k) by exp(key_bias). Time O(N m Dh H), memory O(N m H).
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
    log_w, weight = _key_terms(mask, key_bias, x.shape[:2])
    y = favor_attention(q, k, v, proj, log_w, weight, causal=self.causal, eps=self.eps,
                        chunk_size=self.chunk_size)
    return OutProjection(name="out_proj", **kw)(y.astype(self.dtype), domain,
                                                 deterministic=deterministic)


# ----- linear (elu + 1) ------------------------------------------------------------------------
class LinearAttention(nn.Module):
  """Linear attention (Katharopoulos et al., ICML 2020): phi(x) = elu(x) + 1, no 1/sqrt(d).

  out_i = phi(q_i) sum_j phi(k_j) v_j^T / (phi(q_i) sum_j phi(k_j) + eps); causal by the
  chunked scan. Padded keys get phi = 0; key_bias multiplies phi(k) by exp(key_bias).
  Time O(N Dh^2 H), memory O(N Dh H). Contract: common.py.
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
    phi_q = jax.nn.elu(q.astype(jnp.float32)) + 1.0
    phi_k = jax.nn.elu(k.astype(jnp.float32)) + 1.0
    log_w, _ = _key_terms(mask, key_bias, x.shape[:2])
    phi_k = jnp.where(log_w[..., None, None] > NEG / 2, phi_k, 0.0)
    y = kernel_attention(phi_q, phi_k, v, jnp.broadcast_to(log_w[..., None], q.shape[:3]),
                         causal=self.causal, eps_den=self.eps, chunk_size=self.chunk_size)
    return OutProjection(name="out_proj", **kw)(y.astype(self.dtype), domain,
                                                 deterministic=deterministic)
