"""Saliency sources, per-sample normalisation and fusion (jit-able, batched).

Pixel sources take (N, H, W) grey or (N, H, W, C) colour float images in [0, 1]:
  edge               Sobel gradient magnitude.
  color_contrast     frequency-tuned saliency (Achanta et al., CVPR 2009): |mean Lab colour
                     - Gaussian-blurred Lab colour| per pixel.
  spectral_residual  Hou & Zhang (CVPR 2007): log amplitude spectrum minus its 3x3 local mean,
                     back-transformed with the original phase, squared, Gaussian-blurred.
  center_prior       an isotropic Gaussian on the frame centre.
  motion             optical-flow magnitude (flow.py; fused by the encoder as its own switch).
Token source (B, N, D) features:
  attention          attention sharpness as in vid-TLDR (Choi et al., CVPR 2024): minus the
                     entropy of each token's softmax attention row (parameter-free, q = k =
                     layer-normed tokens), background below the mean set to 0.

Every map is normalised per sample (never across the batch) to [0, 1]; `fuse` takes a
weighted mean of normalised maps. `token_saliency` runs the pixel sources on the tubelet-mean
frames of a clip and pools the fused map onto the token grid.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from hvlm_jax.models.token_merging.flow import (gaussian_blur, pool_to_grid, resize,
                                                separable_filter, to_float, to_gray)

PIXEL_SOURCES = ("edge", "color_contrast", "spectral_residual", "center_prior")
_EPS = 1e-6
# sRGB (D65) -> XYZ matrix and the D65 white point (IEC 61966-2-1, CIE 15).
_RGB_TO_XYZ = np.asarray([[0.4124564, 0.3575761, 0.1804375],
                          [0.2126729, 0.7151522, 0.0721750],
                          [0.0193339, 0.1191920, 0.9503041]], np.float32)
_WHITE_D65 = np.asarray([0.95047, 1.0, 1.08883], np.float32)


def normalize_per_sample(maps: jax.Array, num_batch_dims: int = 1) -> jax.Array:
  """Min-max normalises each sample (the first `num_batch_dims` axes index samples) to [0, 1].

  A constant sample maps to 0 everywhere.
  """
  axes = tuple(range(num_batch_dims, maps.ndim))
  lo = maps.min(axis=axes, keepdims=True)
  hi = maps.max(axis=axes, keepdims=True)
  return (maps - lo) / jnp.maximum(hi - lo, _EPS)


def edge_saliency(gray: jax.Array) -> jax.Array:
  """(N, H, W) -> (N, H, W) Sobel gradient magnitude (unnormalised)."""
  smooth = np.asarray([1.0, 2.0, 1.0], np.float32) / 4.0
  diff = np.asarray([-1.0, 0.0, 1.0], np.float32) / 2.0
  gx = separable_filter(gray, smooth, diff)
  gy = separable_filter(gray, diff, smooth)
  return jnp.sqrt(gx * gx + gy * gy + 1e-12)


def rgb_to_lab(rgb: jax.Array) -> jax.Array:
  """(..., 3) sRGB in [0, 1] -> (..., 3) CIE L*a*b* (D65): L in [0, 100]."""
  lin = jnp.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
  xyz = jnp.einsum("...c,kc->...k", lin, jnp.asarray(_RGB_TO_XYZ)) / jnp.asarray(_WHITE_D65)
  delta = 6.0 / 29.0
  f = jnp.where(xyz > delta ** 3, jnp.cbrt(jnp.maximum(xyz, delta ** 3)),
                xyz / (3 * delta ** 2) + 4.0 / 29.0)
  return jnp.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                    200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def color_contrast_saliency(image: jax.Array, sigma: float = 1.0) -> jax.Array:
  """(N, H, W, C) in [0, 1] -> (N, H, W) frequency-tuned saliency (unnormalised).

  Lab for C == 3, the raw channels otherwise. sigma: the small blur that removes
  texture and noise (Achanta et al. use a 5x5 binomial, about sigma = 1).
  """
  feats = rgb_to_lab(image) if image.shape[-1] == 3 else image
  feats = jnp.moveaxis(feats, -1, -3)  # (N, C, H, W): blur acts on the last two axes.
  blurred = gaussian_blur(feats, sigma)
  mean = feats.mean(axis=(-2, -1), keepdims=True)
  return jnp.sqrt(((blurred - mean) ** 2).sum(axis=-3) + 1e-12)


def spectral_residual_saliency(gray: jax.Array, blur_sigma: float | None = None) -> jax.Array:
  """(N, H, W) -> (N, H, W) spectral-residual saliency (unnormalised), Hou & Zhang 2007.

  Run it on small images (the paper uses 64 px): the residual models "unexpected"
  structure at the scale of the whole frame. blur_sigma defaults to 2.5 px per 64 px.
  """
  h, w = gray.shape[-2:]
  spectrum = jnp.fft.fft2(gray.astype(jnp.float32))
  log_amp = jnp.log(jnp.abs(spectrum) + 1e-8)
  phase = jnp.angle(spectrum)
  box = np.full((3,), 1.0 / 3.0, np.float32)
  residual = log_amp - separable_filter(log_amp, box, box)
  sal = jnp.abs(jnp.fft.ifft2(jnp.exp(residual + 1j * phase))) ** 2
  sigma = blur_sigma if blur_sigma is not None else 2.5 * max(h, w) / 64.0
  return gaussian_blur(sal, sigma)


def center_prior(height: int, width: int, sigma: float = 0.25) -> jax.Array:
  """(H, W) Gaussian exp(-d^2 / 2 sigma^2), d in units of the frame side; 1 at the centre."""
  y = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height - 0.5
  x = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width - 0.5
  d2 = y[:, None] ** 2 + x[None, :] ** 2
  return jnp.exp(-0.5 * d2 / sigma ** 2)


def motion_saliency(flow: jax.Array) -> jax.Array:
  """(..., H, W, 2) flow -> (..., H, W) magnitude in pixels (unnormalised)."""
  return jnp.sqrt((flow ** 2).sum(-1) + 1e-12)


def attention_entropy_saliency(x: jax.Array, *, num_keys: int = 128,
                               suppress_background: bool = True) -> jax.Array:
  """Attention sharpness per token, in [0, 1] per sample.

  Each token i attends (softmax of q.k / sqrt(D), q = k = layer-normed tokens) to itself
  and to M <= num_keys keys taken at a fixed stride over the sequence (itself excluded from
  those); its saliency is minus the entropy of that row. A token unlike the rest puts its
  mass on itself (sharp, salient); one of many similar tokens spreads it (flat).

  Args:
    x: (B, N, D) tokens.
    num_keys: key subset size; num_keys >= N uses every token (the exact vid-TLDR row).
    suppress_background: set scores below the per-sample mean to 0 (vid-TLDR).

  Returns:
    (B, N) float32. Cost O(N * M * D) time, O(N * M) memory.
  """
  b, n, d = x.shape
  x = x.astype(jnp.float32)
  x = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)
  stride = max(1, math.ceil(n / num_keys))
  key_index = np.arange(0, n, stride)
  keys = x[:, key_index]  # (B, M, D)
  scale = 1.0 / math.sqrt(d)
  logits = jnp.einsum("bnd,bmd->bnm", x, keys) * scale
  is_self = jnp.asarray(np.arange(n)[:, None] == key_index[None, :])
  logits = jnp.where(is_self[None], -jnp.inf, logits)
  self_logit = (x * x).sum(-1, keepdims=True) * scale
  logits = jnp.concatenate([self_logit, logits], axis=-1)
  logp = jax.nn.log_softmax(logits, axis=-1)
  entropy = -(jnp.exp(logp) * jnp.where(jnp.isfinite(logp), logp, 0.0)).sum(-1)
  sal = normalize_per_sample(-entropy)
  if suppress_background:
    sal = jnp.where(sal >= sal.mean(-1, keepdims=True), sal, 0.0)
  return jax.lax.stop_gradient(sal)


def fuse(maps: dict[str, jax.Array], weights: dict[str, float]) -> jax.Array:
  """Weighted mean of already normalised maps (same shapes); zero-weight maps are skipped."""
  used = [(weights[k], m) for k, m in maps.items() if weights.get(k, 0.0) > 0.0]
  if not used:
    raise ValueError("Saliency fusion needs at least one source with a positive weight "
                     "(config.model.token_merging.saliency).")
  total = sum(w for w, _ in used)
  return sum(w * m for w, m in used) / total


def pixel_saliency_maps(frames: jax.Array, weights: dict[str, float]) -> dict[str, jax.Array]:
  """Normalised maps of the pixel sources with a positive weight.

  frames: (B, T, H, W, C) uint8 or float in [0, 1]. Each map is (B, T, H, W), normalised
  per sample over all its frames (so frames of one clip stay comparable).
  """
  b, t, h, w, c = frames.shape
  x = to_float(frames).reshape(b * t, h, w, c)
  gray = to_gray(x)
  maps = {}
  if weights.get("edge", 0.0) > 0:
    maps["edge"] = edge_saliency(gray)
  if weights.get("color_contrast", 0.0) > 0:
    maps["color_contrast"] = color_contrast_saliency(x)
  if weights.get("spectral_residual", 0.0) > 0:
    maps["spectral_residual"] = spectral_residual_saliency(gray)
  if weights.get("center_prior", 0.0) > 0:
    maps["center_prior"] = jnp.broadcast_to(center_prior(h, w), (b * t, h, w))
  return {k: normalize_per_sample(m.reshape(b, t, h, w)) for k, m in maps.items()}


def token_saliency(clip: jax.Array, tubelet: tuple[int, int, int], weights: dict[str, float],
                   *, cells_per_token: int = 4, return_maps: bool = False):
  """Fused pixel saliency per token, in [0, 1] per sample.

  Args:
    clip: (B, T, H, W, C) uint8 or float in [0, 1].
    tubelet: (t, p, q); the token grid is (T/t, H/p, W/q), time-major.
    weights: source name (PIXEL_SOURCES) -> weight; sources with weight 0 are not computed.
    cells_per_token: maps are computed on the tubelet-mean frame resized to
      (grid * cells_per_token) per side, then averaged per token.
    return_maps: also return the fused (B, T/t, h, w) map.

  Returns:
    (B, N) float32 (and the fused map when return_maps).
  """
  b, t, h, w, c = clip.shape
  tt, ph, pw = tubelet
  gt, gh, gw = t // tt, h // ph, w // pw
  frames = to_float(clip).reshape(b, gt, tt, h, w, c).mean(2)
  size = (gh * cells_per_token, gw * cells_per_token)
  if size[0] < h:
    frames = jnp.moveaxis(resize(jnp.moveaxis(frames, -1, 2), size), 2, -1)
  fused = fuse(pixel_saliency_maps(frames, weights), weights)
  tokens = normalize_per_sample(pool_to_grid(fused, (gh, gw)).reshape(b, gt * gh * gw))
  tokens = jax.lax.stop_gradient(tokens)
  return (tokens, fused) if return_maps else tokens
