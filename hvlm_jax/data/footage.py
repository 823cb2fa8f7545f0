"""Real-footage properties for synthetic clips: a moving camera, sensor noise, compression.

The synthetic generator draws a static camera over clean backgrounds; real footage pans and
zooms, is noisy and blocky. With `config.data.synthetic.footage` set, `synthetic.make_example`
renders its scene on a larger world canvas (`world_margin` px more on each side, an
optional plane-wave `texture` added to the background so the camera's motion is visible)
and films it with `shoot`:

- camera: frame t shows world(c_w + (p - c) / zoom^t + t * pan) (bilinear), i.e. the camera
  moves by `pan` (dx, dy) px per frame, so the background moves by -pan in the frame, and
  zoom > 1 zooms in (content expands by zoom per frame about the frame centre);
- sensor noise: Gaussian, std `noise` as a fraction of the 0-255 range, independent per pixel,
  channel and frame;
- compression: JPEG-style 8 x 8 block-DCT quantisation of each channel with the JPEG
  luminance table scaled by the IJG quality formula (`quality` 1-100; 0 is off).

Annotations keep their meaning in world coordinates ("moves left" is the object's motion in
the scene, not on the screen). All randomness comes from the generator passed in.
"""
from __future__ import annotations

import math

import numpy as np

DEFAULTS = dict(pan=(0.0, 0.0), zoom=1.0, texture=0.0, noise=0.0, quality=0)
_KEY = "config.data.synthetic.footage"
# JPEG (ITU-T T.81, Annex K) luminance quantisation table.
_JPEG_LUMA = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], np.float64)


def validate(options) -> dict:
  """Footage options (a mapping, any subset of DEFAULTS) -> a complete plain dict.

  Raises:
    ValueError: naming the key, for unknown keys or values out of range.
  """
  options = dict(options)
  unknown = set(options) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"{_KEY} has unknown keys {sorted(unknown)}; known: {', '.join(DEFAULTS)}.")
  out = dict(DEFAULTS, **options)
  out["pan"] = tuple(float(v) for v in out["pan"])
  out["zoom"], out["texture"] = float(out["zoom"]), float(out["texture"])
  out["noise"], out["quality"] = float(out["noise"]), int(out["quality"])
  if len(out["pan"]) != 2:
    raise ValueError(f"{_KEY}.pan must be (dx, dy) pixels per frame, got {out['pan']}.")
  if not 0.5 <= out["zoom"] <= 2.0:
    raise ValueError(f"{_KEY}.zoom must be in [0.5, 2] (scale per frame), got {out['zoom']}.")
  if out["texture"] < 0 or out["noise"] < 0:
    raise ValueError(f"{_KEY}.texture and .noise must be >= 0.")
  if not 0 <= out["quality"] <= 100:
    raise ValueError(f"{_KEY}.quality must be in [0, 100] (0: no compression).")
  return out


def world_margin(size: int, num_frames: int, options: dict) -> int:
  """Pixels of world around the first view that every later view (and its taps) stays in."""
  pan = max(abs(v) for v in options["pan"])
  reach = max((size / 2) / options["zoom"] ** t + t * pan for t in range(num_frames))
  return int(math.ceil(reach - size / 2)) + 2


def texture(rng: np.random.Generator, size: int, amplitude: float) -> np.ndarray:
  """(size, size) float32 grey-level texture: 16 plane waves (wavelengths 4-24 px), std ~amplitude."""
  if amplitude <= 0:
    return np.zeros((size, size), np.float32)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  out = np.zeros((size, size))
  for _ in range(16):
    k = 2 * np.pi / rng.uniform(4, 24)
    th, ph = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    out += np.sin(k * (np.cos(th) * xx + np.sin(th) * yy) + ph)
  return (amplitude * out / np.sqrt(8.0)).astype(np.float32)  # 16 unit sines: variance 8.


def camera_view(world: np.ndarray, t: int, size: int, pan, zoom: float) -> np.ndarray:
  """Frame t (size, size, C) float32 of a camera over world (W, W, C), bilinear.

  view_t(p) = world(c_w + (p - c) / zoom^t + t * pan), c = (size - 1) / 2 the view centre,
  c_w = (W - 1) / 2 the world centre (where the first view is centred).
  """
  n = world.shape[0]
  c, cw = (size - 1) / 2, (n - 1) / 2
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  s = zoom ** -t
  x = np.clip(cw + (xx - c) * s + t * pan[0], 0, n - 1)
  y = np.clip(cw + (yy - c) * s + t * pan[1], 0, n - 1)
  x0, y0 = np.minimum(np.floor(x).astype(int), n - 2), np.minimum(np.floor(y).astype(int), n - 2)
  fx, fy = (x - x0)[..., None], (y - y0)[..., None]
  w = world.astype(np.float64)
  top = w[y0, x0] * (1 - fx) + w[y0, x0 + 1] * fx
  bottom = w[y0 + 1, x0] * (1 - fx) + w[y0 + 1, x0 + 1] * fx
  return (top * (1 - fy) + bottom * fy).astype(np.float32)


def _dct_matrix(n: int = 8) -> np.ndarray:
  k, i = np.mgrid[0:n, 0:n].astype(np.float64)
  m = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
  m[0] /= np.sqrt(2.0)
  return m  # Orthonormal DCT-II: coefficients = m @ block @ m.T.


def compress(frames: np.ndarray, quality: int) -> np.ndarray:
  """Block-DCT quantisation of (T, H, W, C) float frames in [0, 255] (JPEG's lossy step).

  Each 8 x 8 block of each channel (edge-padded to a multiple of 8) is DCT-transformed,
  divided by the quality-scaled JPEG luminance table, rounded and transformed back.
  """
  if quality <= 0:
    return frames
  q = max(1, min(quality, 100))
  scale = 5000.0 / q if q < 50 else 200.0 - 2.0 * q  # IJG libjpeg's quality scaling.
  table = np.clip(np.floor((_JPEG_LUMA * scale + 50) / 100), 1, 255)
  t, h, w, ch = frames.shape
  ph, pw = -h % 8, -w % 8
  x = np.pad(frames.astype(np.float64) - 128.0, ((0, 0), (0, ph), (0, pw), (0, 0)), "edge")
  blocks = x.reshape(t, (h + ph) // 8, 8, (w + pw) // 8, 8, ch)
  m = _dct_matrix()
  coef = np.einsum("ui,tyixjc,vj->tyuxvc", m, blocks, m)
  coef = np.round(coef / table[None, None, :, None, :, None]) * table[None, None, :, None, :, None]
  out = np.einsum("ui,tyuxvc,vj->tyixjc", m, coef, m).reshape(x.shape) + 128.0
  return out[:, :h, :w]


def shoot(worlds: np.ndarray, size: int, options: dict, rng: np.random.Generator) -> np.ndarray:
  """Films rendered worlds (T, W, W, C) with the camera, noise and compression of `options`.

  Returns (T, size, size, C) uint8.
  """
  frames = np.stack([camera_view(w, t, size, options["pan"], options["zoom"])
                     for t, w in enumerate(worlds)])
  if options["noise"] > 0:
    frames = frames + rng.normal(0.0, 255.0 * options["noise"], frames.shape)
  frames = compress(np.clip(frames, 0, 255), options["quality"])
  return np.clip(np.rint(frames), 0, 255).astype(np.uint8)
