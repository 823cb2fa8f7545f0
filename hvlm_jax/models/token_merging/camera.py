"""Dominant (camera) motion of dense flow fields: a robust affine fit per frame pair.

A panning, zooming or rotating camera moves every background pixel; what a viewer calls
"motion" is what moves relative to that. `dominant_motion` fits the affine field
u(x, y) = a0 + a1 x + a2 y (for dx and dy alike) to each flow field by iteratively
reweighted least squares with Tukey's biweight (Huber 1981, ch. 7; the usual global-motion
estimate of video stabilisation and motion segmentation, e.g. Odobez & Bouthemy 1995),
started from the component-wise median so that it stays with the majority when an object
covers a large part of the frame. `residual_motion` is flow minus that fit.

Cost: O(iterations * H * W) per pair plus a sort of H * W / 4 residuals per iteration (the
medians, taken on every other row and column); memory O(H * W).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _design(h: int, w: int) -> jax.Array:
  """(H * W, 3) rows (1, x, y) with x, y scaled to [-1, 1] (a well-conditioned system)."""
  ys, xs = jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w), indexing="ij")
  return jnp.stack([jnp.ones(h * w), xs.reshape(-1), ys.reshape(-1)], axis=-1)


def dominant_motion(flow: jax.Array, *, iterations: int = 5, cutoff: float = 3.0,
                    min_scale: float = 0.1) -> jax.Array:
  """Robust affine fit of each flow field.

  Args:
    flow: (N, H, W, 2) float (dx, dy) in pixels.
    iterations: IRLS iterations after the median start.
    cutoff: Tukey's biweight rejects residuals beyond cutoff * scale, where scale is
      1.4826 * the median residual length of the previous fit (the MAD estimate).
    min_scale: floor of that scale in pixels, so an exact fit does not reject everything.

  Returns:
    (N, H, W, 2) float32: the fitted affine field (the camera's motion).
  """
  n, h, w, _ = flow.shape
  x = _design(h, w)  # (P, 3)
  f = flow.reshape(n, h * w, 2).astype(jnp.float32)
  # Medians (sorts, the dominant cost) over every other row and column only.
  sub = (np.arange(h)[:, None] % 2 == 0) & (np.arange(w)[None] % 2 == 0)
  sub = np.flatnonzero(sub.reshape(-1))
  fitted = jnp.broadcast_to(jnp.median(f[:, sub], axis=1, keepdims=True), f.shape)
  hi = jax.lax.Precision.HIGHEST

  def refit(_, fitted):
    r = jnp.sqrt(((f - fitted) ** 2).sum(-1) + 1e-12)  # (N, P)
    scale = jnp.maximum(1.4826 * jnp.median(r[:, sub], axis=1, keepdims=True), min_scale)
    u = jnp.clip(r / (cutoff * scale), 0.0, 1.0)
    wt = (1.0 - u * u) ** 2
    a = jnp.einsum("pi,np,pj->nij", x, wt, x, precision=hi) + 1e-6 * jnp.eye(3)
    b = jnp.einsum("pi,np,npk->nik", x, wt, f, precision=hi)
    coef = jnp.linalg.solve(a, b)  # (N, 3, 2)
    return jnp.einsum("pi,nik->npk", x, coef, precision=hi)

  fitted = jax.lax.fori_loop(0, iterations, refit, fitted)
  return fitted.reshape(n, h, w, 2)


def residual_motion(flow: jax.Array, **options) -> jax.Array:
  """(N, H, W, 2) flow -> flow minus its `dominant_motion` (options passed on)."""
  return flow - dominant_motion(flow, **options)
