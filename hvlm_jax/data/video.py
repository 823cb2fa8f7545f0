"""Video decoding (PyAV), frame sampling by stream timestamps, and spatial transforms.

A clip is T frames picked at target times: the frame shown at time t is the one with the
largest presentation time <= t (the first frame if t precedes it). Frame counts in container
headers are not trusted; times come from each decoded frame's pts.

- `sample_times` draws the T target times: uniform bin centres over the whole video (eval),
  or a random window of at least `min_window` of the duration with a random time inside each
  bin (train, temporal jitter).
- `decode_clip` decodes only up to the last target and seeks over long gaps, converting just
  the picked frames, resized so their shorter side is `short_side` (swscale, AREA).
- `max_fps` > 0 snaps targets down to a 1/max_fps grid, so that a cache holding the frames
  shown at k / max_fps returns exactly what the decoder returns (see cache.py).
- `crop_resize` / `random_crop_params` / `color_jitter` are the spatial transforms shared by
  the raw and the cached path.
"""
from __future__ import annotations

import math

import av
import numpy as np
from PIL import Image

SEEK_GAP = 5.0  # Seconds; jumping further forward than this seeks instead of decoding through.


class VideoError(RuntimeError):
  """A video file is missing, unreadable or corrupt; the message names the file."""


def _open(path: str, threads: int = 1):
  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
    raise VideoError(f"Cannot open video {path}: {e}.") from None
  if not container.streams.video:
    container.close()
    raise VideoError(f"Video {path} has no video stream.")
  stream = container.streams.video[0]
  stream.codec_context.thread_count = max(int(threads), 1)
  stream.thread_type = "AUTO" if threads > 1 else "SLICE"
  return container, stream


def _duration(container, stream, path: str) -> float:
  if stream.duration is not None and stream.time_base is not None:
    d = float(stream.duration * stream.time_base)
  elif container.duration is not None:
    d = container.duration / 1e6
  else:
    d = 0.0
  if not d > 0:
    raise VideoError(f"Video {path} reports no duration.")
  return d


def probe_duration(path: str) -> float:
  """Duration in seconds from the container header (no decoding)."""
  container, stream = _open(path)
  try:
    return _duration(container, stream, path)
  finally:
    container.close()


def sample_times(duration: float, num: int, rng: np.random.Generator | None = None, *,
                 min_window: float = 1.0, jitter: bool = False) -> tuple[np.ndarray, float, float]:
  """Target times (num,) float64 in seconds, and the (start, length) of the sampled window.

  Without rng: bin centres of `num` equal bins over [0, duration). With rng: a window of
  length U(min_window, 1) * duration at a uniform start, and (if jitter) a uniform time in
  each bin instead of its centre.
  """
  start, length = 0.0, float(duration)
  if rng is not None and min_window < 1.0:
    length = duration * rng.uniform(min_window, 1.0)
    start = rng.uniform(0.0, duration - length)
  offsets = rng.uniform(0.0, 1.0, size=num) if (rng is not None and jitter) else np.full(num, 0.5)
  return start + (np.arange(num) + offsets) * length / num, start, length


def snap_times(times: np.ndarray, max_fps: float) -> np.ndarray:
  """Targets snapped down to the k / max_fps grid (identity when max_fps <= 0)."""
  if max_fps <= 0:
    return np.asarray(times, np.float64)
  return np.floor(np.asarray(times) * max_fps + 1e-9) / max_fps


def pick_indices(pts: np.ndarray, times: np.ndarray) -> np.ndarray:
  """For each time, the index of the last frame with pts <= time (0 if none); pts sorted."""
  return np.maximum(np.searchsorted(pts, times, side="right") - 1, 0)


def scaled_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
  """(h, w) with the shorter side `short_side` (aspect kept); unchanged if None."""
  if not short_side:
    return height, width
  scale = short_side / min(height, width)
  return max(round(height * scale), 1), max(round(width * scale), 1)


def decode_clip(path: str, times_fn, *, short_side: int | None = None, max_fps: float = 0.0,
                threads: int = 1) -> tuple[np.ndarray, np.ndarray, float]:
  """Decodes the frames shown at the times `times_fn(duration)` returns (sorted seconds).

  Returns:
    frames (T, h, w, 3) uint8 with min(h, w) == short_side, pts (T,) float64 seconds of each
    picked frame, and the video duration in seconds.
  Cost: decodes from the start (or the keyframe before a target after a gap > SEEK_GAP) to the
  last target; converts and resizes T frames at most.

  Raises:
    VideoError naming the file if it cannot be opened or decoded.
  """
  container, stream = _open(path, threads)
  try:
    duration = _duration(container, stream, path)
    targets = snap_times(times_fn(duration), max_fps)
    return (*_decode_at(container, stream, targets, short_side, path), duration)
  except (av.error.FFmpegError, ValueError, MemoryError) as e:
    raise VideoError(f"Cannot decode video {path}: {e}.") from None
  finally:
    container.close()


def _decode_at(container, stream, targets, short_side, path):
  tb = float(stream.time_base)
  start = (stream.start_time or 0) * tb
  n = len(targets)
  picked: list = [None] * n
  converted: dict[int, tuple[np.ndarray, float]] = {}
  last_seek = -1

  def convert(frame, t):
    key = frame.pts  # Not id(frame): ids of freed frames get reused.
    if key not in converted:
      h, w = scaled_size(frame.height, frame.width, short_side)
      arr = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA")
      converted[key] = (arr, t)
    return converted[key]

  k, prev = 0, None
  seek_to = None
  while k < n:
    if seek_to is not None:
      container.seek(int((seek_to + start) / tb), stream=stream, backward=True)
      prev = None
    seek_to = None
    for frame in container.decode(stream):
      if frame.pts is None:
        continue
      t = frame.pts * tb - start
      while k < n and t > targets[k]:
        picked[k] = convert(*(prev if prev is not None else (frame, t)))
        k += 1
      if k == n:
        break
      if targets[k] - t > SEEK_GAP and last_seek != k:
        last_seek, seek_to = k, targets[k]
        break
      prev = (frame, t)
    else:  # End of stream: the remaining targets show the last frame.
      if prev is None:
        raise VideoError(f"Video {path} has no decodable frames.")
      while k < n:
        picked[k] = convert(*prev)
        k += 1
  frames = np.stack([p[0] for p in picked])
  pts = np.array([p[1] for p in picked], np.float64)
  return frames, pts


def decode_all(path: str, *, short_side: int | None = None, max_fps: float = 0.0,
               threads: int = 1) -> tuple[np.ndarray, np.ndarray, float]:
  """Every frame the sampler can pick: all frames (max_fps <= 0) or those shown at k / max_fps.

  Returns frames (N, h, w, 3) uint8, pts (N,) float64, duration. With max_fps > 0, entry k
  is the frame shown at time k / max_fps, k = 0 .. ceil(duration * max_fps) - 1.
  """
  if max_fps > 0:
    return decode_clip(path, lambda d: np.arange(math.ceil(d * max_fps - 1e-9)) / max_fps,
                       short_side=short_side, max_fps=max_fps, threads=threads)
  container, stream = _open(path, threads)
  try:
    duration = _duration(container, stream, path)
    tb = float(stream.time_base)
    start = (stream.start_time or 0) * tb
    out = []
    for frame in container.decode(stream):
      if frame.pts is None:
        continue
      h, w = scaled_size(frame.height, frame.width, short_side)
      out.append((frame.pts * tb - start,
                  frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA")))
  except (av.error.FFmpegError, ValueError, MemoryError) as e:
    raise VideoError(f"Cannot decode video {path}: {e}.") from None
  finally:
    container.close()
  if not out:
    raise VideoError(f"Video {path} has no decodable frames.")
  out.sort(key=lambda x: x[0])
  return np.stack([f for _, f in out]), np.array([t for t, _ in out]), duration


def lookup_frames(pts: np.ndarray, times: np.ndarray, max_fps: float) -> np.ndarray:
  """Indices into `decode_all`'s output of the frames `decode_clip` would pick at `times`."""
  times = snap_times(times, max_fps)
  if max_fps > 0:
    return np.clip(np.round(times * max_fps).astype(np.int64), 0, len(pts) - 1)
  return pick_indices(pts, times)


# ----- spatial transforms --------------------------------------------------------------------
def center_crop_params(h: int, w: int) -> tuple[int, int, int, int]:
  """(top, left, height, width) of the largest centred square."""
  s = min(h, w)
  return (h - s) // 2, (w - s) // 2, s, s


def random_crop_params(rng: np.random.Generator, h: int, w: int, min_scale: float,
                       ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """Inception-style random resized crop: area in [min_scale, 1] of the frame."""
  for _ in range(10):
    area = h * w * rng.uniform(min_scale, 1.0)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    ch, cw = round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))
    if 0 < ch <= h and 0 < cw <= w:
      return int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1)), ch, cw
  return center_crop_params(h, w)


def crop_resize(frames: np.ndarray, box, size: int, flip: bool = False) -> np.ndarray:
  """(T, h, w, 3) uint8 -> (T, size, size, 3) uint8: crop `box`, bilinear resize, flip."""
  top, left, ch, cw = box
  if (ch, cw) == (size, size):
    crop = frames[:, top:top + ch, left:left + cw]
    return np.ascontiguousarray(crop[:, :, ::-1] if flip else crop)
  out = np.empty((len(frames), size, size, 3), np.uint8)
  for i, f in enumerate(frames[:, top:top + ch, left:left + cw]):
    img = Image.fromarray(np.ascontiguousarray(f)).resize((size, size), Image.BILINEAR)
    if flip:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    out[i] = np.asarray(img)
  return out


def crop_resize_labels(labels: np.ndarray, box, size: int, flip: bool = False) -> np.ndarray:
  """crop_resize for label maps (T, h, w) int8: nearest-neighbour, so no label is blended."""
  top, left, ch, cw = box
  crop = labels[:, top:top + ch, left:left + cw]
  rows = np.minimum(((np.arange(size) + 0.5) * ch / size).astype(int), ch - 1)
  cols = np.minimum(((np.arange(size) + 0.5) * cw / size).astype(int), cw - 1)
  out = crop[:, rows][:, :, cols]
  return np.ascontiguousarray(out[:, :, ::-1] if flip else out)


def color_jitter(frames: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
  """Brightness b, contrast c, saturation s, each drawn in [1 - strength, 1 + strength].

  Applied in that order to each frame x (float): y = b x; y = c (y - mean(y)) + mean(y);
  y = s (y - gray(y)) + gray(y), gray = channel mean. All three are linear, so per pixel
  z = s c b x + (1 - s) c b gray(x) + (1 - c) b mean(x): a few passes over the clip instead
  of about twelve (a (N, 3) @ (3, 3) matmul is much slower in numpy).
  """
  if strength <= 0:
    return frames
  b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
  t = frames.shape[0]
  mean = frames.reshape(t, -1).sum(axis=1, dtype=np.uint64) / (frames[0].size)
  gray = frames[..., 0].astype(np.uint16)
  gray += frames[..., 1]
  gray += frames[..., 2]
  base = gray.astype(np.float32)
  base *= np.float32((1 - s) * c * b / 3)
  base += ((1 - c) * b * mean).astype(np.float32).reshape(t, *([1] * (frames.ndim - 2)))
  x = frames.astype(np.float32)
  x *= np.float32(s * c * b)
  x += base[..., None]
  np.clip(x, 0, 255, out=x)
  np.rint(x, out=x)
  return x.astype(np.uint8)
