"""Optical flow against analytic motion, filters against scipy, motion per token against
hand-built clips."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from hvlm_jax.models.token_merging import flow

SIZE, MARGIN = 96, 16
SHIFTS = [(0.3, -0.2), (1.0, 0.0), (2.5, 1.7), (-4.0, 3.0), (5.6, -5.6), (8.0, 0.0),
          (0.0, -8.0), (-6.3, -4.9)]


def texture(x, y, seed=0, amplitude=None):
  """A smooth aperiodic texture defined everywhere, so any warp of it is exact. Scaled into
  [0.05, 0.95] over (x, y) by default; `amplitude` fixes the scale instead, so that crops of a
  larger texture agree with it pixel for pixel."""
  r = np.random.RandomState(seed)
  out = np.zeros_like(x)
  for _ in range(24):
    k = 2 * np.pi / r.uniform(6, 40)
    th, ph = r.uniform(0, np.pi), r.uniform(0, 2 * np.pi)
    out += r.uniform(0.5, 1) * np.sin(k * (np.cos(th) * x + np.sin(th) * y) + ph)
  return 0.5 + (0.45 * out / np.abs(out).max() if amplitude is None else amplitude * out)


def rgb(gray):
  return np.stack([gray, 0.8 * gray + 0.1, 1.0 - gray], -1)


@pytest.fixture(scope="module")
def cases():
  """Frames pairs (frame 0, frame 1) and the true flow with frame1(p + flow(p)) = frame0(p)."""
  ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
  pairs, truth = [], []
  for dx, dy in SHIFTS:
    pairs.append((texture(xs, ys), texture(xs - dx, ys - dy)))
    truth.append(np.broadcast_to(np.array([dx, dy]), (SIZE, SIZE, 2)))
  # Rotation by 3 degrees about the centre: frame1(R (p - c) + c) = frame0(p).
  ang, c = np.deg2rad(3.0), (SIZE - 1) / 2
  rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
  q = np.stack([xs - c, ys - c])
  src = np.einsum("ij,jhw->ihw", rot.T, q) + c
  pairs.append((texture(xs, ys), texture(src[0], src[1])))
  moved = np.einsum("ij,jhw->ihw", rot, q) + c
  truth.append(np.stack([moved[0] - xs, moved[1] - ys], -1))
  clips = np.stack([np.stack([rgb(a), rgb(b)]) for a, b in pairs])  # (K, 2, H, W, 3)
  clips = np.round(clips * 255).astype(np.uint8)  # Through the uint8 input path.
  estimate = np.asarray(jax.jit(flow.optical_flow)(jnp.asarray(clips)))[:, 0]
  return estimate, np.stack(truth)


def endpoint_error(estimate, truth):
  e = np.linalg.norm(estimate - truth, axis=-1)
  return e[MARGIN:-MARGIN, MARGIN:-MARGIN].mean()


@pytest.mark.parametrize("i", range(len(SHIFTS)))
def test_flow_recovers_known_shift_within_half_a_pixel(cases, i):
  estimate, truth = cases
  assert endpoint_error(estimate[i], truth[i]) < 0.5, SHIFTS[i]


def test_flow_recovers_small_rotation_within_half_a_pixel(cases):
  estimate, truth = cases
  assert np.abs(truth[-1]).max() > 2.0  # The rotation moves the corners by pixels.
  assert endpoint_error(estimate[-1], truth[-1]) < 0.5


def test_flow_of_identical_frames_is_zero():
  ys, xs = np.mgrid[0:32, 0:32].astype(np.float64)
  f = jnp.asarray(texture(xs, ys))[None]
  np.testing.assert_allclose(flow.flow_pairs(f, f), 0.0, atol=1e-4)


def test_gaussian_blur_matches_scipy_with_edge_replication():
  x = np.random.RandomState(0).rand(2, 20, 27).astype(np.float32)
  for sigma in (1.0, 2.0):
    ref = np.stack([ndimage.gaussian_filter(a.astype(np.float64), sigma, mode="nearest",
                                            truncate=3.0) for a in x])
    np.testing.assert_allclose(flow.gaussian_blur(jnp.asarray(x), sigma), ref, atol=1e-5)


def test_derivatives_are_exact_on_a_cubic_polynomial():
  ys, xs = np.mgrid[0:16, 0:16].astype(np.float64)
  img = 0.01 * xs ** 3 - 0.02 * xs * ys + 0.03 * ys ** 2
  gx, gy = flow.derivatives(jnp.asarray(img, jnp.float32)[None])
  inner = (slice(2, -2), slice(2, -2))  # The 5-tap stencil is exact for cubics inside.
  np.testing.assert_allclose(gx[0][inner], (0.03 * xs ** 2 - 0.02 * ys)[inner], atol=2e-4)
  np.testing.assert_allclose(gy[0][inner], (-0.02 * xs + 0.06 * ys)[inner], atol=2e-4)


def test_warp_reproduces_a_quadratic_at_subpixel_offsets():
  ys, xs = np.mgrid[0:12, 0:12].astype(np.float64)
  quad = lambda x, y: 0.02 * x * x - 0.01 * x * y + 0.3 * y + 1.0  # noqa: E731
  off = np.random.RandomState(1).uniform(-1.5, 1.5, (1, 12, 12, 2))
  out = flow.warp(jnp.asarray(quad(xs, ys), jnp.float32)[None], jnp.asarray(off, jnp.float32))
  ref = quad(xs + off[0, ..., 0], ys + off[0, ..., 1])
  inner = (slice(3, -3), slice(3, -3))  # Keys cubic reproduces quadratics away from borders.
  np.testing.assert_allclose(out[0][inner], ref[inner], atol=1e-4)


def test_motion_pairs_cover_every_transition_with_a_static_count_per_step():
  assert flow.motion_pairs(8, 2) == ([0, 1, 2, 3, 4, 5, 6, 6], [1, 2, 3, 4, 5, 6, 7, 7])
  assert flow.motion_pairs(6, 3) == ([0, 1, 2, 3, 4, 4], [1, 2, 3, 4, 5, 5])
  assert flow.motion_pairs(4, 1) == ([0, 1, 2, 2], [1, 2, 3, 3])
  assert flow.motion_pairs(7, 2) == ([0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6])
  for t, tt in [(8, 2), (16, 4), (9, 3), (5, 1)]:
    prev, _ = flow.motion_pairs(t, tt)
    assert set(prev) == set(range(min(t // tt * tt, t - 1)))


def test_frame_difference_motion_is_the_patch_mean_absolute_difference():
  clip = np.zeros((1, 4, 8, 8, 3), np.float32)
  clip[0, 1, 0:4, 4:8] = 0.4  # Token (time 0, row 0, col 1) changes inside its tubelet.
  clip[0, 3, 4:6, 0:4] = 0.4  # Half of token (time 1, row 1, col 0) changes.
  m = np.asarray(flow.token_motion(jnp.asarray(clip), (2, 4, 4), source="frame_difference",
                                   min_difference=0.05))
  raw = np.zeros(8)
  raw[1], raw[4 + 2] = 0.4, 0.2
  # Robust scores: m^2 / (m^2 + s^2), s = max(median m, floor) = 0.05 here.
  np.testing.assert_allclose(m[0], raw ** 2 / (raw ** 2 + 0.05 ** 2), atol=1e-6)


def test_flow_motion_peaks_on_the_moving_patch_and_stays_low_when_static():
  ys, xs = np.mgrid[0:32, 0:32].astype(np.float64)
  bg = texture(xs, ys, seed=3)
  frames = np.stack([bg, bg, bg, bg])
  obj = texture(xs, ys, seed=4)
  moving = frames.copy()
  for t in range(4):  # A textured square moving 2 px per frame over tokens (0..1, 1).
    x0 = 8 + 2 * t
    moving[t, 4:12, x0:x0 + 8] = obj[4:12, 8:16]
  clips = jnp.asarray(np.stack([rgb(frames), rgb(moving)]), jnp.float32)
  m = np.asarray(flow.token_motion(clips, (2, 8, 8), cells_per_token=8, min_motion=0.5))
  assert m[0].max() < 0.2  # Static: flow noise stays far below the 0.5 px floor.
  grid = m[1].reshape(2, 4, 4)
  # Tokens the square crosses (rows 4..12, cols 8..22); each is partly covered, so its mean
  # motion is near the 0.5 px floor, where a robust score is 0.5.
  assert grid[:, :2, 1:3].mean() > 0.3
  assert grid[:, 2:, :].max() < 0.1  # Lower half: static background.
  assert np.unravel_index(grid.argmax(), grid.shape)[1:] in [(0, 1), (1, 1), (0, 2), (1, 2)]


def test_token_flow_features_give_direction_per_cell_and_nothing_when_static():
  ys, xs = np.mgrid[0:32, 0:32].astype(np.float64)
  bg = texture(xs, ys, seed=3)
  obj = texture(xs, ys, seed=4)
  frames = np.stack([bg] * 4)
  moving = frames.copy()
  for t in range(4):  # A textured square moving down 2 px per frame inside column 1.
    y0 = 4 + 2 * t
    moving[t, y0:y0 + 8, 8:16] = obj[4:12, 8:16]
  clips = jnp.asarray(np.stack([rgb(frames), rgb(moving)]), jnp.float32)
  f = np.asarray(flow.token_flow_features(clips, (2, 8, 8), cells_per_token=8,
                                          cells_per_side=2))
  assert f.shape == (2, 2, 16, 12)
  cells = f.reshape(2, 2, 16, 2, 2, 3)  # (clip, time, token, cell row, cell col, dx/dy/change)
  assert np.abs(cells[0]).max() < 0.05  # Static clip: no flow, no change.
  moved = cells[1, :, [1, 5]]  # Tokens (row 0, col 1) and (row 1, col 1) the square crosses.
  dy = moved[..., 1]
  dx = moved[..., 0]
  # Down by 2 px per frame: the strongest cells see it; on average the flow points down
  # (edges parallel to the motion give some sideways flow, which cancels).
  assert 1.0 < dy.max() < 2.8 and dy.min() > -0.4
  assert dy.mean() > 0.08 and abs(dx.mean()) < 0.25 * dy.mean()
  assert np.abs(cells[1, :, [3, 12, 14, 15], ..., :2]).max() < 0.16  # Far from the square.


def test_token_flow_features_need_cells_dividing_the_flow_resolution():
  with pytest.raises(ValueError, match="cells_per_side"):
    flow.token_flow_features(jnp.zeros((1, 2, 16, 16, 3)), (2, 8, 8), cells_per_token=3,
                             cells_per_side=2)
