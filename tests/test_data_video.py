"""Video decoding: timestamp-based sampling, seeking, max_fps snapping, spatial transforms."""
import os

import numpy as np
import pytest

from data_testutil import index_frames, tmp_dir, write_video
from hvlm_jax.data import video


@pytest.fixture(scope="module")
def videos():
  d = tmp_dir("videos")
  cfr = os.path.join(d, "cfr.mp4")
  write_video(cfr, index_frames(30), fps=10)  # 3 s, frame i at i / 10 s.
  vfr = os.path.join(d, "vfr.mp4")
  vfr_pts = np.cumsum([0, 100, 100, 300, 50, 50, 400, 100, 100, 200])  # Milliseconds.
  write_video(vfr, index_frames(10), pts=vfr_pts, time_base="1/1000")
  long = os.path.join(d, "long.mp4")
  write_video(long, index_frames(60), fps=4, gop=8)  # 15 s, keyframe every 2 s.
  return dict(cfr=cfr, vfr=vfr, vfr_pts=vfr_pts / 1000.0, long=long)


def test_uniform_sampling_picks_the_frame_shown_at_each_bin_centre(videos):
  frames, pts, duration = video.decode_clip(
      videos["cfr"], lambda d: video.sample_times(d, 8)[0])
  assert duration == pytest.approx(3.0)
  centres = (np.arange(8) + 0.5) * 3.0 / 8
  expected = np.floor(centres * 10 + 1e-9).astype(int)  # Frame shown at t: floor(t * fps).
  np.testing.assert_array_equal(frames[:, 0, 0, 0] // 4, expected)
  np.testing.assert_allclose(pts, expected / 10)


def test_sampling_uses_timestamps_not_frame_counts(videos):
  # Irregular frame times: the frame shown at t is the last one with pts <= t.
  times = np.array([0.0, 0.15, 0.45, 0.52, 0.99, 1.0, 1.39, 1.45])
  frames, pts, _ = video.decode_clip(videos["vfr"], lambda d: times)
  expected = [max(i for i, p in enumerate(videos["vfr_pts"]) if p <= t + 1e-9) for t in times]
  np.testing.assert_array_equal(frames[:, 0, 0, 0] // 4, expected)
  np.testing.assert_allclose(pts, videos["vfr_pts"][expected])


def test_seeking_over_gaps_gives_the_same_frames_as_decoding_through(videos, monkeypatch):
  all_frames, all_pts, _ = video.decode_all(videos["long"])
  times = np.array([0.3, 6.1, 6.2, 11.9, 14.99])
  monkeypatch.setattr(video, "SEEK_GAP", 1.0)
  frames, pts, _ = video.decode_clip(videos["long"], lambda d: times)
  idx = video.pick_indices(all_pts, times)
  np.testing.assert_array_equal(frames, all_frames[idx])
  np.testing.assert_array_equal(frames[:, 0, 0, 0] // 4, np.floor(times * 4).astype(int))


def test_max_fps_table_lookup_equals_direct_decode(videos):
  table, table_pts, duration = video.decode_all(videos["cfr"], max_fps=3.0)
  assert len(table) == 9  # Frames shown at k / 3 s for k < 3 s * 3.
  times = np.random.default_rng(0).uniform(0, duration, size=12)
  times.sort()
  frames, pts, _ = video.decode_clip(videos["cfr"], lambda d: times, max_fps=3.0)
  idx = video.lookup_frames(table_pts, times, 3.0)
  np.testing.assert_array_equal(frames, table[idx])
  # Shown at floor(t * 3) / 3, i.e. frame floor(floor(t * 3) / 3 * 10).
  np.testing.assert_array_equal(frames[:, 0, 0, 0] // 4,
                                np.floor(np.floor(times * 3) / 3 * 10 + 1e-9).astype(int))


def test_random_window_stays_inside_and_has_requested_length():
  rng = np.random.default_rng(0)
  for _ in range(50):
    times, start, length = video.sample_times(10.0, 8, rng, min_window=0.5, jitter=True)
    assert 5.0 <= length <= 10.0 and 0 <= start and start + length <= 10.0 + 1e-9
    bins = np.floor((times - start) / (length / 8))
    np.testing.assert_array_equal(bins, np.arange(8))  # One jittered time per bin.


def test_resize_keeps_aspect_and_short_side(videos):
  frames, _, _ = video.decode_clip(videos["cfr"], lambda d: [0.0], short_side=8)
  assert frames.shape == (1, 8, 8, 3)
  assert video.scaled_size(480, 640, 224) == (224, 299)


def test_crop_flip_and_jitter_against_numpy():
  rng = np.random.default_rng(1)
  frames = rng.integers(0, 256, size=(2, 12, 10, 3), dtype=np.uint8)
  out = video.crop_resize(frames, (2, 1, 6, 6), 6, flip=True)
  np.testing.assert_array_equal(out, frames[:, 2:8, 1:7][:, :, ::-1])
  np.testing.assert_array_equal(video.color_jitter(frames, rng, 0.0), frames)
  from PIL import Image  # Reference: PIL bilinear on the cropped frame, then a numpy flip.
  out = video.crop_resize(frames, (3, 2, 8, 6), 5, flip=True)
  ref = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(f[3:11, 2:8])).resize(
      (5, 5), Image.BILINEAR)) for f in frames])[:, :, ::-1]
  np.testing.assert_array_equal(out, ref)
  box = video.random_crop_params(rng, 12, 10, 0.5)
  assert 0.5 * 120 * 0.8 <= box[2] * box[3] <= 120 and box[0] + box[2] <= 12


def test_fused_color_jitter_equals_the_three_steps_in_order():
  frames = np.random.default_rng(2).integers(0, 256, size=(3, 9, 7, 3), dtype=np.uint8)
  out = video.color_jitter(frames, np.random.default_rng(5), 0.4)
  b, c, s = np.random.default_rng(5).uniform(0.6, 1.4, size=3)
  x = frames.astype(np.float64) * b
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  x = (x - mean) * c + mean
  gray = x.mean(axis=-1, keepdims=True)
  x = (x - gray) * s + gray
  expected = np.clip(np.rint(x), 0, 255)
  assert np.abs(out.astype(int) - expected).max() <= 1  # float32 vs float64 rounding.
  assert (out.astype(int) == expected).mean() > 0.98


def test_corrupt_video_error_names_the_file():
  path = os.path.join(tmp_dir("corrupt"), "broken.mp4")
  with open(path, "wb") as f:
    f.write(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
  with pytest.raises(video.VideoError, match="broken.mp4"):
    video.decode_clip(path, lambda d: [0.0])
  with pytest.raises(video.VideoError, match="broken.mp4"):
    video.probe_duration(path)
