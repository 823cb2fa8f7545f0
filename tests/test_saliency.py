"""Saliency sources peak on the salient object; each against an independent reference
(scipy Sobel, published Lab values, a numpy transcription of Hou & Zhang, a naive entropy loop)."""
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from hvlm_jax.models.token_merging import saliency as sal


def scene(size=32, box=(8, 14, 18, 24), color=(0.9, 0.1, 0.1), bg=0.5, noise=0.02, seed=0):
  """A grey noisy frame with one coloured square at rows box[0]:box[1], cols box[2]:box[3]."""
  r = np.random.RandomState(seed)
  img = np.full((size, size, 3), bg) + noise * r.randn(size, size, 3)
  img[box[0]:box[1], box[2]:box[3]] = color
  return np.clip(img, 0, 1).astype(np.float32)


def inside(idx, box, pad=0):
  y, x = idx
  return box[0] - pad <= y < box[1] + pad and box[2] - pad <= x < box[3] + pad


def test_edge_saliency_equals_scipy_sobel_and_peaks_on_the_object_border():
  box = (8, 14, 18, 24)
  gray = scene(box=box).mean(-1)
  out = np.asarray(sal.edge_saliency(jnp.asarray(gray)[None]))[0]
  ref = np.hypot(ndimage.sobel(gray.astype(np.float64), 1, mode="nearest"),
                 ndimage.sobel(gray.astype(np.float64), 0, mode="nearest")) / 8.0
  np.testing.assert_allclose(out, ref, atol=1e-5)
  peak = np.unravel_index(out.argmax(), out.shape)
  assert inside(peak, box, pad=1) and not inside(peak, (9, 13, 19, 23))  # On the border.


def test_rgb_to_lab_matches_published_values():
  rgb = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0],
                     [0.5, 0.5, 0.5]])
  # CIE L*a*b* (D65) of sRGB red, green, white, black, 50% grey (e.g. Bruce Lindbloom's
  # calculator, www.brucelindbloom.com).
  ref = [[53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793], [100.0, 0.0, 0.0],
         [0.0, 0.0, 0.0], [53.3890, 0.0, 0.0]]
  np.testing.assert_allclose(sal.rgb_to_lab(rgb), ref, atol=0.02)


def test_color_contrast_peaks_inside_the_coloured_object():
  box = (8, 14, 18, 24)
  out = np.asarray(sal.color_contrast_saliency(jnp.asarray(scene(box=box))[None]))[0]
  assert inside(np.unravel_index(out.argmax(), out.shape), box)
  mask = np.zeros(out.shape, bool)
  mask[box[0]:box[1], box[2]:box[3]] = True
  assert out[mask].min() > 3 * out[~mask].mean()


def spectral_residual_numpy(gray, sigma):
  """Hou & Zhang (2007), eqs. 5-9, transcribed with numpy / scipy."""
  f = np.fft.fft2(gray)
  log_amp, phase = np.log(np.abs(f) + 1e-8), np.angle(f)
  residual = log_amp - ndimage.uniform_filter(log_amp, 3, mode="nearest")
  s = np.abs(np.fft.ifft2(np.exp(residual + 1j * phase))) ** 2
  return ndimage.gaussian_filter(s, sigma, mode="nearest", truncate=3.0)


def test_spectral_residual_matches_the_paper_and_peaks_on_the_odd_blob():
  size = 64
  ys, xs = np.mgrid[0:size, 0:size]
  gray = 0.5 + 0.2 * np.sin(2 * np.pi * xs / 8) * np.sin(2 * np.pi * ys / 8)  # Regular texture.
  gray[40:46, 12:18] = 1.0  # The one thing that breaks the pattern.
  out = np.asarray(sal.spectral_residual_saliency(jnp.asarray(gray, jnp.float32)[None]))[0]
  ref = spectral_residual_numpy(gray.astype(np.float64), 2.5)
  np.testing.assert_allclose(out / ref.max(), ref / ref.max(), atol=2e-3)
  assert inside(np.unravel_index(out.argmax(), out.shape), (40, 46, 12, 18), pad=3)


def test_center_prior_peaks_at_the_centre_and_is_symmetric():
  c = np.asarray(sal.center_prior(9, 9))
  assert np.unravel_index(c.argmax(), c.shape) == (4, 4) and c.max() == pytest.approx(1.0)
  np.testing.assert_allclose(c, c[::-1, ::-1], atol=1e-7)
  assert c[0, 0] == pytest.approx(np.exp(-0.5 * 2 * (4 / 9) ** 2 / 0.25 ** 2), rel=1e-5)


def test_normalize_per_sample_never_mixes_the_batch():
  x = jnp.stack([jnp.linspace(0, 1, 8), 100.0 + 5 * jnp.linspace(0, 1, 8),
                 jnp.full((8,), 3.0)])
  out = np.asarray(sal.normalize_per_sample(x))
  np.testing.assert_allclose(out[0], out[1], atol=1e-6)
  np.testing.assert_allclose(out[0], np.linspace(0, 1, 8), atol=1e-6)
  np.testing.assert_allclose(out[2], 0.0)  # A constant sample has no salient part.


def attention_entropy_naive(x):
  """Every key, the token itself once: minus the row entropy, min-max per sample."""
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  out = np.zeros(x.shape[:2])
  for b in range(x.shape[0]):
    for i in range(x.shape[1]):
      logits = x[b] @ x[b, i] / np.sqrt(x.shape[-1])
      p = np.exp(logits - logits.max())
      p /= p.sum()
      out[b, i] = (p * np.log(p)).sum()
    out[b] = (out[b] - out[b].min()) / (out[b].max() - out[b].min())
  return out


def test_attention_entropy_matches_naive_rows_and_peaks_on_the_odd_token():
  r = np.random.RandomState(0)
  base = r.randn(16)
  x = np.stack([base + 0.3 * r.randn(40, 16), base + 0.3 * r.randn(40, 16)])
  x[0, 7] = 3.0 * r.randn(16)  # One token unlike the rest.
  x[1, 30] = 3.0 * r.randn(16)
  out = np.asarray(sal.attention_entropy_saliency(jnp.asarray(x, jnp.float32), num_keys=64,
                                                  suppress_background=False))
  np.testing.assert_allclose(out, attention_entropy_naive(x), atol=1e-4)
  assert out[0].argmax() == 7 and out[1].argmax() == 30
  sub = sal.attention_entropy_saliency(jnp.asarray(x, jnp.float32), num_keys=10)
  assert int(sub[0].argmax()) == 7 and int(sub[1].argmax()) == 30  # With a key subset too.
  assert (np.asarray(sub) == 0).sum() > 40  # Background (below the mean) suppressed.


def test_fuse_is_the_weighted_mean_of_positive_weight_sources():
  a, b, c = jnp.zeros((2, 4)), jnp.ones((2, 4)), jnp.full((2, 4), 7.0)
  out = sal.fuse(dict(a=a, b=b, c=c), dict(a=1.0, b=3.0, c=0.0))
  np.testing.assert_allclose(out, 0.75)
  with pytest.raises(ValueError, match="token_merging.saliency"):
    sal.fuse(dict(a=a), dict(a=0.0))


def test_token_saliency_peaks_on_the_tokens_of_the_salient_object():
  box = (16, 32, 32, 48)  # Tokens (row 1, col 2) of a 4 x 4 grid of 16 px patches.
  frames = np.stack([scene(64, box, seed=s) for s in range(4)])
  clip = jnp.asarray(frames[None], jnp.float32)
  weights = dict(edge=1.0, color_contrast=1.0, spectral_residual=1.0, center_prior=0.0)
  tokens, fused = sal.token_saliency(clip, (2, 16, 16), weights, return_maps=True)
  grid = np.asarray(tokens).reshape(2, 4, 4)
  assert fused.shape == (1, 2, 16, 16)
  assert np.all(grid.reshape(2, 16).argmax(-1) == 1 * 4 + 2)
  assert grid.min() >= 0 and grid.max() == pytest.approx(1.0)
