"""Long videos as consecutive segments, read lazily (for hvlm_jax/models/streaming.py).

A video of duration L is cut into S = ceil(L / len) segments, len = model.streaming.
segment_seconds; segment s covers [s len, (s + 1) len) and its T = data.video.num_frames
frames are those shown at the bin centres s len + (i + 1/2) len / T (as `video.sample_times`
picks them over a whole video in evaluation). A target past the end shows the last frame;
detection steps whose centre is past the end are masked by the model (step_times >= duration).

`SegmentReader.segments(entry)` yields one video's segments one at a time from one forward
pass of the decoder (video mode: PyAV, converting only the picked frames; cache mode: the
picked records; features mode: rows of a memory-mapped .npy), so host memory holds one
segment of frames whatever the video length, and decoding costs O(L) in total.

Schemas (numpy; B videos, S segments, T frames, T' = T / tubelet_size[0] steps):
  segment batch (`streaming_eval_batches`): video (B, T, S, S, 3) uint8 | features (B, T, F),
    timestamps (B, T), step_times (B, T') video seconds, step_duration (B,), duration (B,),
    domain (B,) int32, segment_valid (B,) bool (False past a video's last segment),
    segment_index (B,) int32, action_targets (B, T', C) / action_offsets (B, T', 2) of the
    segment's window, action_mask (B,) bool.
  video batch: the eval BATCH SCHEMA of the whole video (QA, captions, label, segments over
    [0, L)) plus num_segments (B,) int32.
  training example (`make_streaming_train_iterator`): per segment video (S, T, ...),
    timestamps (S, T), step_times (S, T'), action_targets (S, T', C), action_offsets
    (S, T', 2), segment_valid (S,); per video the other BATCH SCHEMA fields.
"""
from __future__ import annotations

import dataclasses
import math
import sys

import av
import grain
import numpy as np

from hvlm_jax.data import pipeline
from hvlm_jax.data import video as video_lib
from hvlm_jax.data.annotations import SplitData, VideoEntry
from hvlm_jax.data.targets import action_targets, example_targets


def segment_seconds(config) -> float:
  seconds = float(config.model.get("streaming", {}).get("segment_seconds", 8.0))
  if not seconds > 0:
    raise ValueError(f"config.model.streaming.segment_seconds={seconds} must be > 0.")
  return seconds


def num_segments(duration: float, seconds: float) -> int:
  return max(1, math.ceil(duration / seconds - 1e-9))


def segment_times(index: int, seconds: float, num_frames: int) -> np.ndarray:
  """(T,) float64 target times of segment `index`: bin centres of [index s, (index + 1) s)."""
  return index * seconds + (np.arange(num_frames) + 0.5) * seconds / num_frames


def needs_streaming(config, duration: float) -> bool:
  """Whether evaluation streams a video: model.streaming.enabled and the video is longer than
  model.streaming.auto_threshold segments."""
  s = config.model.get("streaming", None)
  if s is None or not s.enabled:
    return False
  return duration > s.auto_threshold * segment_seconds(config)


def split_by_length(config, split: SplitData) -> tuple[SplitData, SplitData]:
  """(videos evaluated as one clip, videos streamed), each a SplitData of the same split."""
  long = [e for e in split.entries if needs_streaming(config, _duration(e))]
  ids = {e.video_id for e in long}
  short = [e for e in split.entries if e.video_id not in ids]
  return (dataclasses.replace(split, entries=short), dataclasses.replace(split, entries=long))


def _duration(entry: VideoEntry) -> float:
  return entry.duration if entry.duration else video_lib.probe_duration(entry.path)


def decoded_segments(path: str, times_of, first: int, count: int, *, short_side=None,
                     max_fps: float = 0.0, threads: int = 1):
  """Yields (frames (T, h, w, 3) uint8, pts (T,) float64) of segments first .. first+count-1,
  `times_of(s)` giving segment s's sorted target times, in one forward decoding pass (a seek
  to the keyframe before the first target when it lies more than video.SEEK_GAP in)."""
  container, stream = video_lib._open(path, threads)
  try:
    tb = float(stream.time_base)
    origin = (stream.start_time or 0) * tb
    first_target = float(video_lib.snap_times(times_of(first), max_fps)[0])
    if first_target > video_lib.SEEK_GAP:
      container.seek(int((first_target + origin) / tb), stream=stream, backward=True)
    frames = ((f, f.pts * tb - origin) for f in container.decode(stream) if f.pts is not None)
    prev = ahead = None  # Last frame at or before the current target; the first one after it.
    last = (None, None)  # Picked frames are time-ordered: convert each once.
    for s in range(first, first + count):
      picked, pts = [], []
      for target in video_lib.snap_times(times_of(s), max_fps):
        while True:
          if ahead is None:
            ahead = next(frames, None)
          if ahead is None or ahead[1] > target:
            break
          prev, ahead = ahead, None
        frame, t = prev if prev is not None else (ahead or (None, None))
        if frame is None:
          raise video_lib.VideoError(f"Video {path} has no decodable frames.")
        if last[0] != frame.pts:
          h, w = video_lib.scaled_size(frame.height, frame.width, short_side)
          last = (frame.pts, frame.to_ndarray(format="rgb24", width=w, height=h,
                                               interpolation="AREA"))
        picked.append(last[1])
        pts.append(t)
      yield np.stack(picked), np.asarray(pts, np.float64)
  except (av.error.FFmpegError, ValueError, MemoryError) as e:
    raise video_lib.VideoError(f"Cannot decode video {path}: {e}.") from None
  finally:
    container.close()


class SegmentReader:
  """Segments of a video, one at a time. `segments(entry, first=0, count=None, spatial=None)`
  yields dicts video (T, S, S, 3) uint8 | features (T, F) float32, timestamps (T,) float32;
  `spatial(frames) -> frames` replaces the evaluation centre crop (training augmentation)."""

  def __init__(self, config, split: SplitData):
    self.clip = pipeline.ClipReader(config, split)  # Mode, sizes, cache: the clip settings.
    self.seconds = segment_seconds(config)
    self._blank = None

  def blank(self, entry: VideoEntry) -> dict:
    """A segment of zeros with segment_valid False (the shapes of `entry`'s first segment)."""
    if self._blank is None:
      first = self.segments(entry, 0, 1)
      try:
        self._blank = dict(_blank(next(first)), segment_valid=np.bool_(False))
      finally:
        first.close()
    return self._blank

  def count(self, entry: VideoEntry) -> int:
    return num_segments(_duration(entry), self.seconds)

  def segments(self, entry: VideoEntry, first: int = 0, count: int | None = None,
               spatial=None):
    c = self.clip
    count = self.count(entry) - first if count is None else count
    times_of = lambda s: segment_times(s, self.seconds, c.num_frames)  # noqa: E731
    if c.mode == "features":
      yield from self._features(entry, times_of, first, count)
      return
    if spatial is None:
      spatial = lambda f: video_lib.crop_resize(  # noqa: E731
          f, video_lib.center_crop_params(*f.shape[1:3]), c.size)
    if c.mode == "cache":
      info = c.cache.info(entry.video_id)
      source = self._cached(entry, info, times_of, first, count)
    else:
      source = decoded_segments(entry.path, times_of, first, count, short_side=c.short_side,
                                max_fps=c.max_fps, threads=c.threads)
    for frames, pts in source:
      yield dict(video=spatial(frames), timestamps=pts.astype(np.float32))

  def _cached(self, entry, info, times_of, first, count):
    all_pts = np.asarray(info["pts"])
    for s in range(first, first + count):
      idx = video_lib.lookup_frames(all_pts, times_of(s), self.clip.max_fps)
      uniq, inverse = np.unique(idx, return_inverse=True)
      yield self.clip.cache.read(entry.video_id, uniq)[inverse], all_pts[idx]

  def _features(self, entry, times_of, first, count):
    if entry.duration is None:
      raise ValueError(f"Features mode needs a 'duration' for video {entry.video_id!r} in the "
                       "annotations.")
    try:
      feats = (self.clip.cache.read(entry.video_id)[0] if self.clip.cache is not None
               else np.load(entry.path, mmap_mode="r"))
    except (OSError, ValueError) as e:
      raise video_lib.VideoError(f"Cannot read features {entry.path}: {e}.") from None
    n = feats.shape[0]
    for s in range(first, first + count):
      rows = np.clip(np.floor(times_of(s) * n / entry.duration).astype(np.int64), 0, n - 1)
      yield dict(features=np.asarray(feats[rows], np.float32),
                 timestamps=((rows + 0.5) * entry.duration / n).astype(np.float32))


def _step_fields(config, index: int, seconds: float) -> dict:
  steps = config.data.video.num_frames // config.model.tubelet_size[0]
  return dict(step_times=(segment_times(index, seconds, steps)).astype(np.float32),
              step_duration=np.float32(seconds / steps))


def _blank(example: dict) -> dict:
  return {k: np.zeros_like(v) for k, v in example.items()}


# ----- evaluation: batches of videos, each a lazy sequence of segment batches ----------------
def streaming_eval_batches(config, split: SplitData, vocabs, *, process_index: int = 0,
                           process_count: int = 1):
  """Yields (video_batch, segment_batches) covering every video of `split` once, in the slot
  layout of `pipeline.eval_batches` (padding videos have valid=False). segment_batches is a
  generator of max(num_segments) over the GLOBAL batch segment batches, so that every process
  runs the same number of steps; videos are decoded only while it is consumed."""
  gb = config.data.eval_batch_size
  local = pipeline._local_batch(gb, process_count, "eval_batch_size")
  reader = SegmentReader(config, split)
  for b in range(math.ceil(len(split) / gb)):
    total = max(reader.count(split.entries[i]) for i in range(b * gb, min((b + 1) * gb,
                                                                         len(split))))
    videos = []
    for slot in (b * gb + process_index * local + k for k in range(local)):
      idx = min(slot, len(split) - 1)
      entry = split.entries[idx]
      duration = _duration(entry)
      ex = example_targets(entry, vocabs, config, start=0.0, length=duration, rng=None)
      ex.update(index=np.int32(idx), valid=np.bool_(slot < len(split)),
                duration=np.float32(duration), num_segments=np.int32(reader.count(entry)))
      videos.append(ex if slot < len(split) else _blank(ex))
    video_batch = {k: np.stack([v[k] for v in videos]) for k in videos[0]}
    yield video_batch, _segment_batches(config, reader, split, vocabs, video_batch, total)


def _segment_batches(config, reader, split, vocabs, video_batch, total: int):
  streams = {}
  steps = config.data.video.num_frames // config.model.tubelet_size[0]
  for s in range(total):
    rows = {}
    for k, (idx, ok, n) in enumerate(zip(video_batch["index"], video_batch["valid"],
                                         video_batch["num_segments"])):
      if ok and s < n:
        if k not in streams:
          streams[k] = reader.segments(split.entries[int(idx)])
        rows[k] = dict(next(streams[k]), segment_valid=np.bool_(True))
    template = reader.blank(split.entries[0])
    segs = [rows.get(k, template) for k in range(len(video_batch["index"]))]
    batch = {key: np.stack([r[key] for r in segs]) for key in template}
    targets = []  # The segment's detection targets, for the evaluation loss.
    for idx, ok, n in zip(video_batch["index"], video_batch["valid"],
                          video_batch["num_segments"]):
      actions = (split.entries[int(idx)].actions or []) if ok and s < n else []
      classes = np.array([vocabs.action_id(l) for _, _, l in actions], np.int64)
      targets.append(action_targets(actions, classes, s * reader.seconds, reader.seconds, steps,
                                    vocabs.num_actions))
    for key in ("action_targets", "action_offsets"):
      batch[key] = np.stack([t[key] for t in targets])
    fields = _step_fields(config, s, reader.seconds)
    batch.update(step_times=np.broadcast_to(fields["step_times"],
                                            (len(segs),) + fields["step_times"].shape).copy(),
                 step_duration=np.full(len(segs), fields["step_duration"], np.float32),
                 duration=video_batch["duration"], domain=video_batch["domain"],
                 action_mask=video_batch["action_mask"] & video_batch["valid"],
                 segment_index=np.full(len(segs), s, np.int32))
    yield batch


# ----- training: examples of consecutive segments --------------------------------------------
class _StreamingTrainElement:
  """Global position g -> one video's `train_segments` consecutive segments from a random
  start, with one crop / flip / colour draw for all of them (the same video throughout)."""

  def __init__(self, config, split, vocabs, seed, process_index, process_count, probs):
    self.config, self.split, self.vocabs, self.seed = config, split, vocabs, seed
    self.p, self.num_p = process_index, process_count
    self.order = pipeline._Order(len(split), seed, probs)
    self.reader = SegmentReader(config, split)
    self.swap = pipeline.flip_swap_map(config)
    self.num = int(config.model.streaming.train_segments)

  def __call__(self, j: int):
    g = self.p + self.num_p * int(j)
    idx = self.order(g)
    entry = self.split.entries[idx]
    rng = np.random.default_rng([self.seed, g])
    count = self.reader.count(entry)
    first = int(rng.integers(0, max(count - self.num, 0) + 1))
    spatial, flipped = self._spatial(rng)
    try:
      segs = list(self.reader.segments(entry, first, min(self.num, count - first), spatial))
    except video_lib.VideoError as e:
      pipeline._CORRUPT[entry.video_id] = pipeline._CORRUPT.get(entry.video_id, 0) + 1
      if len(pipeline._CORRUPT) > self.config.data.max_corrupt_videos:
        raise video_lib.VideoError(
            f"{len(pipeline._CORRUPT)} corrupt videos skipped in training exceed "
            f"config.data.max_corrupt_videos={self.config.data.max_corrupt_videos}; last: "
            f"{e}") from None
      return None
    if flipped[0]:
      entry = pipeline.mirror_entry(entry, self.swap)
    return self.example(entry, idx, first, segs, rng)

  def example(self, entry, idx, first, segs, rng):
    config, seconds = self.config, self.reader.seconds
    duration = _duration(entry)
    ex = example_targets(entry, self.vocabs, config, start=0.0, length=duration, rng=rng)
    actions = entry.actions or []
    classes = np.array([self.vocabs.action_id(l) for _, _, l in actions], np.int64)
    steps = config.data.video.num_frames // config.model.tubelet_size[0]
    per = []
    for s in range(self.num):
      seg = segs[s] if s < len(segs) else _blank(segs[0])
      seg.update(action_targets(actions, classes, (first + s) * seconds, seconds, steps,
                                self.vocabs.num_actions), segment_valid=np.bool_(s < len(segs)))
      if s >= len(segs):  # Past the end: no targets.
        seg["action_targets"][:] = 0
        seg["action_offsets"][:] = 0
      per.append(seg)
    stacked = {k: np.stack([p[k] for p in per]) for k in per[0] if k != "step_duration"}
    ex.update(stacked, step_duration=np.float32(seconds / steps), duration=np.float32(duration),
              index=np.int32(idx), valid=np.bool_(True))
    return ex

  def _spatial(self, rng):
    """One augmentation for every segment of the clip; (spatial fn, [flipped])."""
    aug, size = self.config.data.augment, self.config.data.video.frame_size
    draws, flipped = {}, [False]
    jitter_seed = int(rng.integers(1 << 31))
    if not aug.enabled:
      return None, flipped
    flipped[0] = bool(aug.flip) and rng.random() < 0.5

    def spatial(frames):
      if "box" not in draws:  # The frame size is known once the first segment is decoded.
        draws["box"] = video_lib.random_crop_params(rng, *frames.shape[1:3], aug.min_crop_scale)
      frames = video_lib.crop_resize(frames, draws["box"], size, flipped[0])
      return video_lib.color_jitter(frames, np.random.default_rng(jitter_seed), aug.color_jitter)
    return spatial, flipped


def make_streaming_train_iterator(config, split: SplitData, vocabs, *, seed: int,
                                  process_index: int | None = None,
                                  process_count: int | None = None):
  """`pipeline.make_train_iterator` for streaming_loss: an infinite grain iterator of batches
  of training examples (schema above), resumable by get_state() / set_state()."""
  if not len(split):
    raise ValueError(f"No usable videos in {split.root}.")
  if config.model.streaming.train_segments < 1:
    raise ValueError("config.model.streaming.train_segments must be >= 1 to train with memory.")
  p, num_p = pipeline._process(process_index, process_count)
  local = pipeline._local_batch(config.data.batch_size, num_p, "batch_size")
  element = _StreamingTrainElement(config, split, vocabs, seed, p, num_p,
                                   pipeline.domain_weights(config, split))
  ds = grain.MapDataset.range(0, sys.maxsize // max(num_p, 1) - 1).map(element)
  ds = ds.filter(lambda x: x is not None)
  it_ds = ds.to_iter_dataset(pipeline._read_options(config)).batch(local, drop_remainder=True)
  if config.data.num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(config.data.num_workers),
        per_worker_buffer_size=max(int(config.data.prefetch), 1)))
  return iter(it_ds)
