"""Real-footage option of the synthetic generator: the default output is unchanged byte for
byte, the camera follows its closed form, compression is JPEG's quantisation, noise has the
asked std, and the settings only name `footage` when it is set."""
import hashlib

import ml_collections
import numpy as np
import pytest
from scipy.fft import dctn

from hvlm_jax.data import footage, synthetic

SETTINGS = dict(seed=3, num_frames=16, fps=8, frame_size=32, max_objects=3,
                domains=list(synthetic.DOMAINS))
# sha256 (first 16 hex) of make_example(3, "training", i, SETTINGS)["frames"], recorded
# before the footage option existed.
DEFAULT_FRAMES = ["e9e2bce585edd26e", "fa23bfe4ae7f69b8", "55eda24848c07877",
                  "a63797328955858d"]


@pytest.mark.parametrize("index", range(4))
def test_default_output_is_unchanged_byte_for_byte(index):
  frames = synthetic.make_example(3, "training", index, SETTINGS)["frames"]
  assert hashlib.sha256(frames.tobytes()).hexdigest()[:16] == DEFAULT_FRAMES[index]


def test_footage_clip_keeps_annotations_and_is_deterministic():
  opts = dict(pan=(1.5, -0.5), zoom=1.01, texture=20.0, noise=0.01, quality=40)
  a = synthetic.make_example(3, "training", 1, dict(SETTINGS, footage=opts))
  b = synthetic.make_example(3, "training", 1, dict(SETTINGS, footage=opts))
  plain = synthetic.make_example(3, "training", 1, SETTINGS)
  np.testing.assert_array_equal(a["frames"], b["frames"])
  assert a["frames"].shape == plain["frames"].shape and a["frames"].dtype == np.uint8
  for task in ("action_detection", "video_qa", "video_captioning"):
    assert a[task] == plain[task]


def test_camera_view_follows_its_closed_form_on_a_linear_world():
  n, size, pan, zoom = 80, 32, (2.0, -1.5), 1.05
  yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
  world = np.stack([xx, yy, 3 * xx - yy], -1)  # Bilinear sampling is exact on it.
  for t in (0, 3):
    view = footage.camera_view(world, t, size, pan, zoom)
    vy, vx = np.mgrid[0:size, 0:size].astype(np.float64)
    c, cw = (size - 1) / 2, (n - 1) / 2
    x = cw + (vx - c) / zoom ** t + t * pan[0]
    y = cw + (vy - c) / zoom ** t + t * pan[1]
    np.testing.assert_allclose(view, np.stack([x, y, 3 * x - y], -1), atol=1e-3)
  assert footage.world_margin(size, 8, footage.validate(dict(pan=pan))) >= 7 * 2.0


def test_compression_quantises_block_dct_coefficients_with_the_jpeg_table():
  rng = np.random.default_rng(0)
  frames = rng.uniform(0, 255, (1, 16, 24, 1))
  out = footage.compress(frames, 50)  # Quality 50: the table itself.
  for by in range(2):
    for bx in range(3):
      block = out[0, 8 * by:8 * by + 8, 8 * bx:8 * bx + 8, 0] - 128
      q = dctn(block, norm="ortho") / footage._JPEG_LUMA
      np.testing.assert_allclose(q, np.round(q), atol=1e-6)
  assert np.abs(out - frames).mean() > 5  # Strongly lossy on noise...
  smooth = np.broadcast_to(np.linspace(60, 200, 24), (1, 16, 24))[..., None]
  assert np.abs(footage.compress(smooth, 95) - smooth).max() < 3  # ...faithful when smooth.
  assert footage.compress(frames, 0) is frames


def test_sensor_noise_has_the_asked_std():
  worlds = np.full((4, 40, 40, 3), 128.0)
  opts = footage.validate(dict(noise=0.02))
  frames = footage.shoot(worlds, 32, opts, np.random.default_rng(0)).astype(np.float64)
  assert frames.std() == pytest.approx(0.02 * 255, rel=0.05)


def test_settings_name_footage_only_when_set_and_reject_unknown_keys():
  config = ml_collections.ConfigDict(dict(data=dict(
      domains=list(synthetic.DOMAINS), synthetic=dict(
          seed=0, num_videos=dict(training=1), frame_size=32, num_frames=8, fps=4))))
  assert "footage" not in synthetic.settings_from_config(config)
  config.data.synthetic.footage = dict(footage.DEFAULTS)  # Declared at its defaults: no-op.
  assert "footage" not in synthetic.settings_from_config(config)
  config.data.synthetic.footage = dict(pan=(1, 0), noise=0.01)
  got = synthetic.settings_from_config(config)["footage"]
  assert got == dict(footage.DEFAULTS, pan=(1.0, 0.0), noise=0.01)
  with pytest.raises(ValueError, match="footage has unknown keys"):
    footage.validate(dict(shake=1.0))
  with pytest.raises(ValueError, match="footage.quality"):
    footage.validate(dict(quality=120))
