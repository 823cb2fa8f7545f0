"""Dense optical flow and per-token motion, in pure JAX (jit-able, batched, static shapes).

`optical_flow(frames)` is coarse-to-fine dense Lucas-Kanade (Lucas & Kanade 1981; Bouguet's
pyramidal scheme, with the iterative warping of Brox et al. 2004): at each pyramid level,
frame t+1 is warped back by the current flow, and the per-pixel 2x2 system built from a
Gaussian-weighted window of the spatial gradients gives the update. Tikhonov damping keeps
textureless pixels at the coarser estimate. Real footage needs two more things: pixels whose
match has left the frame (camera motion) stay out of the sums, and after every update the
flow is regularised by a normalised convolution over the valid pixels (Knutsson & Westin
1993), which extrapolates it to those pixels and keeps sensor noise out (dense warped LK
alone converges towards a noisy per-pixel solution). Convention (DESIGN.md, OpenCV
Farneback): `frame[t+1](p + flow[t](p)) ~= frame[t](p)`, flow as (dx, dy) in pixels.
Accuracy against OpenCV: tools/benchmark_flow.py.

Cost: O(levels * iterations * H * W * window) per frame pair; memory O(H * W) per pair.
`token_motion` pools flow magnitude, relative to the camera's motion (camera.py), onto the
tubelet grid; its "frame_difference" source is the cheap proxy of run-length tokenization
(Choudhury et al. 2024): mean absolute difference of a patch to the same patch in the next
frame. The image filters used here (Gaussian blur, derivatives, resizing) are shared by
saliency.py.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from hvlm_jax.models.token_merging import camera

# Rec. 601 luma weights.
_LUMA = (0.299, 0.587, 0.114)


def to_float(frames: jax.Array) -> jax.Array:
  """uint8 in [0, 255] or float in [0, 1] -> float32 in [0, 1]."""
  if jnp.issubdtype(frames.dtype, jnp.integer):
    return frames.astype(jnp.float32) / 255.0
  return frames.astype(jnp.float32)


def to_gray(frames: jax.Array) -> jax.Array:
  """(..., H, W, C) -> (..., H, W) float32 luma (channel mean unless C == 3)."""
  x = to_float(frames)
  if x.shape[-1] == 3:
    return jnp.tensordot(x, jnp.asarray(_LUMA, jnp.float32), axes=([-1], [0]))
  return x.mean(-1)


def gaussian_kernel(sigma: float) -> np.ndarray:
  """Normalised 1-D Gaussian taps, radius ceil(3 sigma) (a static constant)."""
  radius = max(1, int(math.ceil(3.0 * sigma)))
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


def filter_matrix(n: int, taps: np.ndarray) -> np.ndarray:
  """(n, n) matrix M with (M @ v)[i] = sum_k taps[k] v[clip(i + k - r)], r = len(taps) // 2.

  Correlation with edge replication as one banded matrix (a static constant).
  """
  r = (taps.shape[0] - 1) // 2
  m = np.zeros((n, n), np.float32)
  rows = np.arange(n)
  for k, tap in enumerate(taps):
    np.add.at(m, (rows, np.clip(rows + k - r, 0, n - 1)), tap)
  return m


def separable_filter(x: jax.Array, ky: np.ndarray, kx: np.ndarray) -> jax.Array:
  """Correlates the last two axes of x (..., H, W) with ky (rows) then kx (columns).

  Borders replicate the edge pixel, so flat images stay flat (zero padding would not).
  Done as two matmuls with banded matrices: O(H W (H + W)) flops but dense GEMMs, which on
  CPU compile in a fraction of the time of long shifted-slice sums and run as fast at the
  small sizes flow and saliency use.
  """
  h, w = x.shape[-2:]
  my, mx = filter_matrix(h, ky), filter_matrix(w, kx)
  y = jnp.einsum("ij,...jw->...iw", my, x.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("...hj,wj->...hw", y, mx, precision=jax.lax.Precision.HIGHEST)


def gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
  """(..., H, W) -> same shape, blurred with an isotropic Gaussian of std `sigma` pixels."""
  k = gaussian_kernel(sigma)
  return separable_filter(x, k, k)


def derivatives(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(..., H, W) -> (d/dx, d/dy), fourth-order central differences [1, -8, 0, 8, -1] / 12."""
  d = np.asarray([1.0, -8.0, 0.0, 8.0, -1.0], np.float32) / 12.0
  one = np.ones((1,), np.float32)
  return separable_filter(x, one, d), separable_filter(x, d, one)


def resize(x: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """(..., H, W) -> (..., h, w) with antialiased linear interpolation (area-like when shrinking)."""
  if tuple(x.shape[-2:]) == tuple(shape):
    return x
  return jax.image.resize(x, (*x.shape[:-2], *shape), "linear", antialias=True)


def _cubic_weights(f: jax.Array) -> jax.Array:
  """Keys (1981) cubic-convolution weights (a = -0.5) of taps -1, 0, 1, 2 at fraction f."""
  f2, f3 = f * f, f * f * f
  return jnp.stack([-0.5 * f3 + f2 - 0.5 * f,
                    1.5 * f3 - 2.5 * f2 + 1.0,
                    -1.5 * f3 + 2.0 * f2 + 0.5 * f,
                    0.5 * f3 - 0.5 * f2], axis=-1)


def warp(image: jax.Array, flow: jax.Array) -> jax.Array:
  """Bicubic backward warp: out(p) = image(p + flow(p)); image (N, H, W), flow (N, H, W, 2).

  Cubic rather than bilinear because bilinear sampling blurs by an amount that depends on
  the sub-pixel fraction, which biases sub-pixel flow. Outside the frame, the nearest border
  pixel is used.
  """
  n, h, w = image.shape
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  x = jnp.clip(xs + flow[..., 0], 0.0, w - 1.0)
  y = jnp.clip(ys + flow[..., 1], 0.0, h - 1.0)
  x0, y0 = jnp.floor(x), jnp.floor(y)
  wx, wy = _cubic_weights(x - x0), _cubic_weights(y - y0)  # (N, H, W, 4)
  taps = jnp.arange(-1, 3, dtype=jnp.int32)
  cols = jnp.clip(x0.astype(jnp.int32)[..., None] + taps, 0, w - 1)  # (N, H, W, 4)
  rows = jnp.clip(y0.astype(jnp.int32)[..., None] + taps, 0, h - 1)
  index = rows[..., :, None] * w + cols[..., None, :]  # (N, H, W, 4, 4)
  values = jnp.take_along_axis(image.reshape(n, h * w), index.reshape(n, -1), axis=1)
  values = values.reshape(n, h, w, 4, 4)
  return jnp.einsum("nhwij,nhwi,nhwj->nhw", values, wy, wx)


def _downsample(x: jax.Array) -> jax.Array:
  """One pyramid step: Gaussian blur (sigma 1) and keep every other row and column."""
  h, w = x.shape[-2:]
  k = gaussian_kernel(1.0)
  my, mx = filter_matrix(h, k)[::2], filter_matrix(w, k)[::2]
  hi = jax.lax.Precision.HIGHEST
  y = jnp.einsum("ij,...jw->...iw", my, x, precision=hi)
  return jnp.einsum("...hj,wj->...hw", y, mx, precision=hi)


def _upsample_matrix(n_fine: int, n_coarse: int) -> np.ndarray:
  """(n_fine, n_coarse) linear interpolation at coarse coordinates i / 2, clamped."""
  pos = np.minimum(np.arange(n_fine) / 2.0, n_coarse - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n_coarse - 1)
  m = np.zeros((n_fine, n_coarse), np.float32)
  np.add.at(m, (np.arange(n_fine), lo), 1.0 - (pos - lo))
  np.add.at(m, (np.arange(n_fine), hi), pos - lo)
  return m


def _sample_inside(flow: jax.Array) -> jax.Array:
  """(N, H, W, 2) flow -> (N, H, W) float32: 1 where p + flow(p) lies inside the frame."""
  h, w = flow.shape[1:3]
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  x, y = xs + flow[..., 0], ys + flow[..., 1]
  return ((x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)).astype(jnp.float32)


def _normalized_blur(values: jax.Array, weight: jax.Array, sigma: float):
  """Normalised convolution (Knutsson & Westin 1993): the `weight`-weighted Gaussian mean.

  values (N, H, W, K), weight (N, H, W) -> (mean (N, H, W, K), mass (N, H, W)).
  """
  stacked = jnp.concatenate([values * weight[..., None], weight[..., None]], -1)
  blurred = jnp.moveaxis(gaussian_blur(jnp.moveaxis(stacked, -1, 1), sigma), 1, -1)
  mass = blurred[..., -1]
  return blurred[..., :-1] / jnp.maximum(mass, 1e-6)[..., None], mass


def _lucas_kanade_step(prev, nxt, flow, window_sigma, damping, smooth_sigma):
  """One warped LK update at one level. prev, nxt: (N, H, W); flow: (N, H, W, 2).

  A pixel enters the LK sums only where its match p + flow(p) lies inside the frame (clamped
  sampling would compare it with replicated border pixels); the sums are normalised by the
  valid mass of the window. The updated flow is then regularised by a normalised
  convolution over the valid pixels (std `smooth_sigma`), which also extrapolates flow to the
  pixels whose match left the frame.
  """
  valid = _sample_inside(flow)
  warped = warp(nxt, flow)
  gx, gy = derivatives(0.5 * (prev + warped))  # Symmetric gradients: second-order accurate.
  it = warped - prev
  terms = jnp.stack([gx * gx, gx * gy, gy * gy, gx * it, gy * it], axis=-1)
  sums, mass = _normalized_blur(terms, valid, window_sigma)
  sxx, sxy, syy, sxt, syt = jnp.moveaxis(sums, -1, 0)
  # Damping is relative to the mean gradient energy of the pair's valid pixels, so the
  # estimate does not depend on image contrast.
  energy = (valid * (gx * gx + gy * gy)).sum((1, 2)) / jnp.maximum(valid.sum((1, 2)), 1.0)
  lam = damping * energy[:, None, None] + 1e-12
  a, b, c = sxx + lam, sxy, syy + lam
  det = a * c - b * b
  du = (-c * sxt + b * syt) / det
  dv = (b * sxt - a * syt) / det
  flow = flow + jnp.stack([du, dv], axis=-1) * (mass > 1e-3)[..., None]
  if smooth_sigma <= 0:
    return flow
  smooth, near = _normalized_blur(flow, valid, smooth_sigma)
  return jnp.where((near > 1e-4)[..., None], smooth, flow)


def flow_pairs(prev: jax.Array, nxt: jax.Array, *, levels: int = 3, iterations: int = 5,
               window_sigma: float = 2.0, damping: float = 0.02, smooth_sigma: float = 4.0,
               presmooth: float = 0.0) -> jax.Array:
  """Flow from each `prev` image to its `nxt` image.

  Args:
    prev, nxt: (N, H, W) float grey images (any scale; only ratios matter).
    levels: pyramid levels (each halves the size); the coarsest level must still see the
      motion as about 2 px or less: 3 levels handle about 8 px.
    iterations: warped LK updates per level.
    window_sigma: std (pixels, at every level) of the Gaussian window of the LK system.
    damping: Tikhonov weight, relative to the mean gradient energy of the pair.
    smooth_sigma: std (pixels, at every level) of the normalised convolution applied to the
      flow after each update: the regulariser that keeps sensor noise out of the flow (dense
      warped LK alone converges towards a per-pixel solution) and the extrapolation into
      regions whose content left the frame. 0 turns both off. Chosen by
      tools/benchmark_flow.py (benchmarks/flow/results.json).
    presmooth: std (pixels) of a Gaussian blur of both images before the pyramid (0: none).
      It did not lower the error at 1-2% noise in that benchmark and blurs borders; it is
      there for footage with strong compression artefacts.

  Returns:
    (N, H, W, 2) float32 (dx, dy) with nxt(p + flow(p)) ~= prev(p).
  """
  prev, nxt = prev.astype(jnp.float32), nxt.astype(jnp.float32)
  if presmooth > 0:
    prev, nxt = gaussian_blur(prev, presmooth), gaussian_blur(nxt, presmooth)
  pyramid = [(prev, nxt)]
  for _ in range(levels - 1):
    p, q = pyramid[-1]
    pyramid.append((_downsample(p), _downsample(q)))
  step = functools.partial(_lucas_kanade_step, window_sigma=window_sigma, damping=damping,
                           smooth_sigma=smooth_sigma)
  flow = None
  for p, q in reversed(pyramid):
    h, w = p.shape[-2:]
    if flow is None:
      flow = jnp.zeros((*p.shape, 2), jnp.float32)
    else:  # Fine pixel i sits at coarse coordinate i / 2 (decimation keeps even pixels).
      hi = jax.lax.Precision.HIGHEST
      flow = jnp.einsum("ij,njwc->niwc", _upsample_matrix(h, flow.shape[1]), flow, precision=hi)
      flow = 2.0 * jnp.einsum("ij,nhjc->nhic", _upsample_matrix(w, flow.shape[2]), flow,
                              precision=hi)
    # A loop rather than unrolled steps keeps the compiled program small.
    flow = jax.lax.fori_loop(0, iterations, lambda _, f, p=p, q=q: step(p, q, f), flow)
  return flow


def optical_flow(frames: jax.Array, **options) -> jax.Array:
  """Dense flow between consecutive frames (the DESIGN.md contract).

  Args:
    frames: (B, T, H, W, C) uint8 in [0, 255] or float in [0, 1].
    **options: see `flow_pairs`.

  Returns:
    (B, T-1, H, W, 2) float32 (dx, dy) in pixels, frame[t+1](p + flow[t](p)) ~= frame[t](p).
  """
  b, t, h, w, _ = frames.shape
  gray = to_gray(frames)
  flow = flow_pairs(gray[:, :-1].reshape(-1, h, w), gray[:, 1:].reshape(-1, h, w), **options)
  return flow.reshape(b, t - 1, h, w, 2)


def motion_pairs(num_frames: int, tubelet_t: int) -> tuple[list[int], list[int]]:
  """Static (prev, next) frame indices of the transitions that describe each tubelet step.

  Step s covers frames [s t, (s + 1) t) and takes the t transitions that start in it: its
  t - 1 inner ones and the one into the next step, so every transition of the clip counts.
  The last step, which has no next frame when T = steps * t, repeats the clip's last
  transition. Every step gets t pairs (a static shape); steps * t pairs in all.
  """
  steps = num_frames // tubelet_t
  prev = [min(s * tubelet_t + j, num_frames - 2) for s in range(steps) for j in range(tubelet_t)]
  return prev, [p + 1 for p in prev]


def pool_to_grid(maps: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
  """(..., h, w) -> (..., gh, gw) mean over each grid cell (area resize when not divisible)."""
  h, w = maps.shape[-2:]
  gh, gw = grid_hw
  if h % gh == 0 and w % gw == 0:
    return maps.reshape(*maps.shape[:-2], gh, h // gh, gw, w // gw).mean(axis=(-3, -1))
  return resize(maps, (gh, gw))


def _gated_pair_flow(gray, prev, grid_hw, cells_per_token, change_floor, flow_options,
                     camera_compensation=False):
  """Flow of the (prev, prev + 1) frame pairs of grey clips (B, T, H, W), computed once per
  distinct transition on frames resized to grid * cells_per_token per side, in input-frame
  pixels, relative to the camera when `camera_compensation` (camera.residual_motion), and
  gated by visible change.

  LK keeps the coarse-level estimate where there is no texture, which smears an object's
  motion over a flat background; flow counts fully where the locally blurred |nxt - prev|
  reaches `change_floor`, proportionally below it. Returns flow (B, len(prev), h', w', 2)
  and |nxt - prev| (B, len(prev), h', w') at that resolution.
  """
  b, w = gray.shape[0], gray.shape[-1]
  size = (grid_hw[0] * cells_per_token, grid_hw[1] * cells_per_token)
  small = resize(gray, size) if size[0] < gray.shape[-2] else gray
  distinct = sorted(set(prev))
  first = jnp.asarray(distinct)
  p = small[:, first].reshape(-1, *small.shape[-2:])
  q = small[:, first + 1].reshape(-1, *small.shape[-2:])
  diff = jnp.abs(q - p)
  gate = jnp.clip(gaussian_blur(diff, 1.0) / change_floor, 0.0, 1.0)
  fl = flow_pairs(p, q, **(flow_options or {}))
  if camera_compensation:
    fl = camera.residual_motion(fl)
  fl = fl * (gate * (w / small.shape[-1]))[..., None]
  pick = jnp.asarray([distinct.index(i) for i in prev])
  return (fl.reshape(b, len(distinct), *fl.shape[1:])[:, pick],
          diff.reshape(b, len(distinct), *diff.shape[1:])[:, pick])


def robust_scores(m: jax.Array, floor: float) -> jax.Array:
  """(B, N) non-negative motion -> (B, N) scores m^2 / (m^2 + s^2) in [0, 1).

  s = max(median over the sample's N tokens, floor): a score is 0.5 where a token moves as
  much as a typical token of its clip (or `floor`, when most of the clip is still). Unlike
  division by the clip's maximum, a few outlier tokens cannot squash every other score, and
  the order of the tokens (what `protect_fraction` keeps) is the order of m.
  """
  s = jnp.maximum(jnp.median(m, axis=1, keepdims=True), floor)
  return m * m / (m * m + s * s)


def token_motion(clip: jax.Array, tubelet: tuple[int, int, int], *, source: str = "flow",
                 cells_per_token: int = 4, min_motion: float = 0.5,
                 min_difference: float = 0.05, change_floor: float = 0.02,
                 camera_compensation: bool = True,
                 flow_options: dict | None = None) -> jax.Array:
  """Per-token motion score in [0, 1) on the tubelet grid (`robust_scores` per sample).

  Args:
    clip: (B, T, H, W, C) uint8 or float in [0, 1].
    tubelet: (t, p, q) tubelet size; the grid is (T/t, H/p, W/q).
    source: "flow" (mean optical-flow magnitude, in pixels of the input frame, over the
      token's patch and its `motion_pairs` transitions, gated by visible change) or
      "frame_difference" (mean |frame[t+1] - frame[t]| of the patch, in [0, 1] intensity).
    cells_per_token: flow is computed on frames resized to (grid * cells_per_token) per side.
    min_motion: the `robust_scores` floor for "flow" (pixels): a clip whose tokens move less
      than this scores near 0 instead of being stretched to [0, 1].
    min_difference: the same floor for "frame_difference" (intensity in [0, 1]).
    change_floor: flow counts fully where the locally blurred |frame[t+1] - frame[t]| reaches
      this intensity, proportionally below it, and not at all where nothing changes.
    camera_compensation: "flow" only: score the motion relative to the dominant (camera)
      motion of each frame pair (`camera.dominant_motion`, a robust affine fit), so a pan or
      zoom does not make the background look like it moves.
    flow_options: passed to `flow_pairs`; a key "camera_compensation" in it overrides the
      argument (so one options dict from the config carries both).

  Returns:
    (B, T/t * H/p * W/q) float32, time-major (token index = time * P + space).
  """
  b, t, h, w, _ = clip.shape
  tt, ph, pw = tubelet
  gt, gh, gw = t // tt, h // ph, w // pw
  options = dict(flow_options or {})
  camera_compensation = bool(options.pop("camera_compensation", camera_compensation))
  prev, nxt = motion_pairs(t, tt)
  gray = to_gray(clip)  # (B, T, H, W)
  if source == "flow":
    fl, _ = _gated_pair_flow(gray, prev, (gh, gw), cells_per_token, change_floor, options,
                             camera_compensation)
    mag = jnp.sqrt((fl ** 2).sum(-1) + 1e-12)
  elif source == "frame_difference":
    mag = jnp.abs(gray[:, jnp.asarray(nxt)] - gray[:, jnp.asarray(prev)])
  else:
    raise ValueError(f"Unknown motion source {source!r} (config.model.token_merging."
                     f"motion_source); expected 'flow' or 'frame_difference'.")
  mag = mag.reshape(b, gt, tt, *mag.shape[-2:]).mean(2)
  m = pool_to_grid(mag, (gh, gw)).reshape(b, gt * gh * gw)
  m = jax.lax.stop_gradient(m)
  return robust_scores(m, min_motion if source == "flow" else min_difference)


def token_flow_features(clip: jax.Array, tubelet: tuple[int, int, int], *,
                        cells_per_token: int = 4, cells_per_side: int = 2,
                        change_floor: float = 0.02,
                        flow_options: dict | None = None) -> jax.Array:
  """Per-token optical-flow descriptors: a motion input stream for the encoder.

  The two-stream idea (Simonyan & Zisserman 2014) at token granularity: the flow of each
  tubelet's `motion_pairs` transitions (as in `token_motion`, not camera-compensated), gated
  by visible change, is averaged over a `cells_per_side`^2 sub-grid of the token's patch, so
  a token carries which way its content moves (dx, dy per cell; a sub-grid also shows
  expansion and rotation), plus the mean |frame difference| per cell (appearance change
  without displacement: fading, morphing).

  Args:
    clip: (B, T, H, W, C) uint8 or float in [0, 1].
    tubelet: (t, p, q); the token grid is (T/t, H/p, W/q).
    cells_per_token: flow resolution, as in `token_motion` (a multiple of cells_per_side).
    cells_per_side: sub-grid per token side of the descriptor.
    change_floor: as in `token_motion`.
    flow_options: passed to `flow_pairs`.

  Returns:
    (B, T/t, H/p * W/q, 3 * cells_per_side^2) float32, no gradient: per cell dx and dy in
    pixels of the input frame and the mean absolute grey-level change (x 10), so a visibly
    moving or changing cell has values of order 1.
  """
  b, t, h, w, _ = clip.shape
  tt, ph, pw = tubelet
  gt, gh, gw = t // tt, h // ph, w // pw
  c = cells_per_side
  if cells_per_token % c:
    raise ValueError(f"cells_per_token={cells_per_token} must be a multiple of "
                     f"cells_per_side={c} (config.model.motion_input).")
  prev, _ = motion_pairs(t, tt)
  fl, diff = _gated_pair_flow(to_gray(clip), prev, (gh, gw), cells_per_token, change_floor,
                              flow_options)
  maps = jnp.concatenate([fl, 10.0 * diff[..., None]], axis=-1)  # (B, K, h', w', 3)
  maps = jnp.moveaxis(maps, -1, 2)  # (B, K, 3, h', w')
  cells = pool_to_grid(maps, (gh * c, gw * c))  # (B, K, 3, gh*c, gw*c)
  cells = cells.reshape(b, gt, tt, 3, gh, c, gw, c).mean(2)
  # -> (B, T', gh, gw, c, c, 3): per token, its c x c cells' (dx, dy, change).
  cells = cells.transpose(0, 1, 3, 5, 4, 6, 2).reshape(b, gt, gh * gw, c * c * 3)
  return jax.lax.stop_gradient(cells)
