"""The grain input pipeline: SplitData + Vocabularies -> numpy batches (BATCH SCHEMA).

Training (`make_train_iterator`): an infinite stream of global positions g = 0, 1, 2, ...;
position g is example `order(g)` (epoch e = g // N uses a permutation, or a domain-balanced
draw, seeded by (seed, e)); process p of P takes g = p, p + P, p + 2P, ... and batches
`batch_size / P` of them. Each example's randomness (window, jitter, crop, flip, colour, QA
and caption choice) comes from `default_rng([seed, g])`, so a batch depends only on the seed
and its position: not on workers, threads or restarts. The grain iterator's
`get_state()` / `set_state()` therefore resume exactly.

Evaluation (`eval_batches`): every video once, in split order, uniform sampling over the whole
video, fixed-size batches; the last is padded with `valid=False` examples. Batch b of process p
holds global slots b * B + p * B/P ... so all processes yield the same number of batches.

Sources (`config.data.input`): "video" decodes mp4 with PyAV (optionally keeping decoded
videos in memory, `data.memory_cache_mb`), "cache" reads the ArrayRecord cache of
tools/build_dataset.py, "features" reads per-video .npy (T_video, F) arrays.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys

import grain
import numpy as np

from hvlm_jax.data import video as video_lib
from hvlm_jax.data.annotations import SplitData, VideoEntry
from hvlm_jax.data.cache import CacheReader
from hvlm_jax.data.targets import example_targets
from hvlm_jax.data.text import Vocabularies


class ClipReader:
  """Reads the frames (or features) of one example; shared by training and evaluation.

  `read(entry, rng)` returns dict(video (T, S, S, 3) uint8 | features (T, F) float32,
  timestamps (T,) float32, duration () float32) and the window (start, length). With rng:
  random window + temporal jitter and spatial augmentation; without: uniform + centre crop.
  """

  def __init__(self, config, split: SplitData):
    data = config.data
    self.mode = data.input
    if self.mode not in ("video", "cache", "features"):
      raise ValueError(f"config.data.input={self.mode!r} is not video, cache or features.")
    self.num_frames = data.video.num_frames
    self.size = data.video.frame_size
    self.short_side = data.video.decode_size or data.video.frame_size
    self.max_fps = float(data.video.max_fps)
    self.threads = data.video.decode_threads
    self.min_window = data.video.min_window
    self.augment = data.augment.to_dict()
    self.features_dim = data.features_dim
    self.memory_budget = int(data.memory_cache_mb) << 20
    use_cache = self.mode == "cache" or (self.mode == "features" and data.cache_dir)
    self.cache = CacheReader(data.cache_dir, split.name, config) if use_cache else None
    self._memory: dict[str, tuple] = {}
    self._memory_bytes = 0
    # Per-token shape targets (config.model.heads.token_shape): the synthetic generator's
    # object layouts, read once; the tubelet size groups their per-pixel maps into tokens.
    self.layouts = None
    if config.model.heads.get("token_shape", {}).get("enabled", False):
      if self.mode == "features":
        raise ValueError("config.model.heads.token_shape needs video input (config.data.input="
                         "video or cache), not features.")
      from hvlm_jax.data import synthetic  # Local: only this option needs the generator.
      self.layouts = synthetic.load_layouts(split.root)
      self.layout_path = os.path.join(split.root, "annotations", synthetic.LAYOUT_FILE)
      self.tubelet = tuple(int(x) for x in config.model.tubelet_size)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_memory"], state["_memory_bytes"] = {}, 0
    return state

  def _times_fn(self, rng):
    aug = self.augment if rng is not None else {}
    use_rng = rng if aug.get("enabled") else None
    jitter = bool(aug.get("temporal_jitter"))
    window = self.min_window if use_rng is not None else 1.0

    def times_fn(duration):
      times, start, length = video_lib.sample_times(duration, self.num_frames, use_rng,
                                                    min_window=window, jitter=jitter)
      times_fn.window = (start, length)
      return times
    return times_fn

  def _frame_table(self, entry: VideoEntry):
    """All pickable frames of a video from memory or the cache; None if neither has it."""
    if self.mode == "cache":
      info = self.cache.info(entry.video_id)
      return None, np.asarray(info["pts"]), info["duration"]
    hit = self._memory.get(entry.path)
    if hit is None and self.memory_budget > 0 and self._memory_bytes < self.memory_budget:
      hit = video_lib.decode_all(entry.path, short_side=self.short_side, max_fps=self.max_fps,
                                 threads=self.threads)
      self._memory[entry.path] = hit
      self._memory_bytes += hit[0].nbytes
    return hit

  def read(self, entry: VideoEntry, rng: np.random.Generator | None):
    times_fn = self._times_fn(rng)
    if self.mode == "features":
      return self._read_features(entry, times_fn)
    table = self._frame_table(entry)
    if table is None:
      frames, pts, duration = video_lib.decode_clip(
          entry.path, times_fn, short_side=self.short_side, max_fps=self.max_fps,
          threads=self.threads)
    else:
      all_frames, all_pts, duration = table
      times = times_fn(duration)
      idx = video_lib.lookup_frames(all_pts, times, self.max_fps)
      if all_frames is None:  # ArrayRecord: read only the picked records.
        uniq, inverse = np.unique(idx, return_inverse=True)
        frames = self.cache.read(entry.video_id, uniq)[inverse]
      else:
        frames = all_frames[idx]
      pts = all_pts[idx]
    shape = frames.shape
    frames, flipped, box = self._spatial(frames, rng)
    clip = dict(video=frames, timestamps=pts.astype(np.float32), duration=np.float32(duration))
    if self.layouts is not None:
      clip["token_shapes"] = self._token_shapes(entry, pts, shape[1:3], box, flipped)
    if flipped:
      clip["flipped"] = True  # Popped by the caller, which mirrors the labels.
    return clip, times_fn.window

  def _spatial(self, frames, rng):
    """(frames, flipped, crop box)."""
    aug = self.augment
    h, w = frames.shape[1:3]
    if rng is None or not aug["enabled"]:
      box = video_lib.center_crop_params(h, w)
      return video_lib.crop_resize(frames, box, self.size), False, box
    box = video_lib.random_crop_params(rng, h, w, aug["min_crop_scale"])
    flip = bool(aug["flip"]) and rng.random() < 0.5
    frames = video_lib.crop_resize(frames, box, self.size, flip)
    return video_lib.color_jitter(frames, rng, aug["color_jitter"]), flip, box

  def _token_shapes(self, entry: VideoEntry, pts, decoded_hw, box, flipped) -> np.ndarray:
    """(N,) int32 per-token shape targets of the picked frames (times `pts`) seen through the
    same crop and flip as the frames: synthetic.token_shape_labels of the layout's maps."""
    from hvlm_jax.data import synthetic
    layout = self.layouts.get(entry.video_id)
    if layout is None:
      raise ValueError(f"{self.layout_path} has no entry for {entry.video_id} "
                       "(config.model.heads.token_shape).")
    n, fps = int(layout["num_frames"]), float(layout["fps"])
    index = np.clip(np.rint(np.asarray(pts, np.float64) * fps), 0, n - 1).astype(int)
    maps = synthetic.shape_maps(layout, n, fps, frames=index)
    scale = maps.shape[1] / decoded_hw[0]  # The layout's pixels per decoded pixel.
    top, left, ch, cw = (int(round(v * scale)) for v in box)
    maps = video_lib.crop_resize_labels(maps, (top, left, ch, cw), self.size, flipped)
    return synthetic.token_shape_labels(maps, self.tubelet)

  def _read_features(self, entry: VideoEntry, times_fn):
    if self.cache is not None:
      feats = self.cache.read(entry.video_id)[0]
    else:
      try:
        feats = np.load(entry.path, mmap_mode="r")
      except (OSError, ValueError) as e:
        raise video_lib.VideoError(f"Cannot read features {entry.path}: {e}.") from None
    if feats.ndim != 2 or (self.features_dim and feats.shape[1] != self.features_dim):
      raise ValueError(f"Features {entry.path} have shape {feats.shape}, expected "
                       f"(T, config.data.features_dim={self.features_dim}).")
    if entry.duration is None:
      raise ValueError(f"Features mode needs a 'duration' for video {entry.video_id!r} in the "
                       "annotations.")
    n, duration = feats.shape[0], entry.duration
    rows = np.clip(np.floor(times_fn(duration) * n / duration).astype(np.int64), 0, n - 1)
    clip = dict(features=np.asarray(feats[rows], np.float32),
                timestamps=((rows + 0.5) * duration / n).astype(np.float32),
                duration=np.float32(duration))
    return clip, times_fn.window


def domain_weights(config, split: SplitData) -> np.ndarray | None:
  """Per-example sampling probabilities from `training.domain_balancing`, or None.

  "none": uniform over examples. "inverse_frequency": every present domain equally likely.
  "sports=2,news=1,...": domain d drawn with probability proportional to its weight (domains
  not named get weight 0; a named domain without examples is an error).
  """
  spec = str(config.training.get("domain_balancing", "none")).strip()
  if spec in ("", "none"):
    return None
  domains = [e.domain for e in split.entries]
  counts = {d: domains.count(d) for d in set(domains)}
  if spec == "inverse_frequency":
    weights = {d: 1.0 for d in counts}
  else:
    weights = {}
    for item in spec.split(","):
      name, sep, value = item.partition("=")
      try:
        weights[name.strip()] = float(value)
      except ValueError:
        sep = ""
      if not sep or name.strip() not in config.data.domains or weights[name.strip()] < 0:
        raise ValueError(f"config.training.domain_balancing={spec!r}: {item!r} is not "
                         "domain=weight with a domain of config.data.domains.")
      if weights[name.strip()] > 0 and name.strip() not in counts:
        raise ValueError(f"config.training.domain_balancing={spec!r}: domain {name.strip()!r} "
                         f"has no examples in {split.root}.")
  p = np.array([weights.get(d, 0.0) / counts[d] for d in domains])
  if p.sum() <= 0:
    raise ValueError(f"config.training.domain_balancing={spec!r} gives every example weight 0.")
  return p / p.sum()


class _Order:
  """Global position -> example index: per-epoch permutation or weighted draw."""

  def __init__(self, n: int, seed: int, probs: np.ndarray | None):
    self.n, self.seed, self.probs = n, seed, probs
    self._epoch, self._perm = -1, None

  def __call__(self, g: int) -> int:
    epoch, pos = divmod(g, self.n)
    if epoch != self._epoch:
      rng = np.random.default_rng([self.seed, epoch, 7])
      self._perm = (rng.permutation(self.n) if self.probs is None
                    else rng.choice(self.n, self.n, p=self.probs))
      self._epoch = epoch
    return int(self._perm[pos])


_CORRUPT: dict[str, int] = {}  # Per process: corrupt videos skipped in training.
_WORD = re.compile(r"[A-Za-z0-9_']+")


def mirror_entry(entry: VideoEntry, swap: dict[str, str]) -> VideoEntry:
  """The annotations of the horizontally flipped video: action labels and words in questions,
  answers and captions exchanged by `swap` (e.g. left <-> right, move_left <-> move_right)."""
  if not swap:
    return entry
  sub = lambda text: _WORD.sub(lambda m: swap.get(m.group(0).lower(), m.group(0)), text)
  return dataclasses.replace(
      entry,
      actions=None if entry.actions is None else [
          (s, e, swap.get(l, l)) for s, e, l in entry.actions],
      qa_pairs=None if entry.qa_pairs is None else [(sub(q), sub(a)) for q, a in entry.qa_pairs],
      captions=None if entry.captions is None else [sub(c) for c in entry.captions])


def flip_swap_map(config) -> dict[str, str]:
  """`data.augment.flip_swap` ("a:b" pairs) as a symmetric dict."""
  out = {}
  for pair in config.data.augment.get("flip_swap", ()):
    a, sep, b = str(pair).partition(":")
    if not sep or not a or not b:
      raise ValueError(f"config.data.augment.flip_swap entry {pair!r} is not of the form a:b.")
    out[a], out[b] = b, a
  return out


class _TrainElement:
  def __init__(self, config, split, vocabs, seed, process_index, process_count, probs):
    self.config, self.split, self.vocabs, self.seed = config, split, vocabs, seed
    self.p, self.num_p = process_index, process_count
    self.order = _Order(len(split), seed, probs)
    self.reader = ClipReader(config, split)
    self.swap = flip_swap_map(config)

  def __call__(self, j: int):
    g = self.p + self.num_p * int(j)
    idx = self.order(g)
    entry = self.split.entries[idx]
    rng = np.random.default_rng([self.seed, g])
    try:
      clip, (start, length) = self.reader.read(entry, rng)
    except video_lib.VideoError as e:
      _CORRUPT[entry.video_id] = _CORRUPT.get(entry.video_id, 0) + 1
      cap = self.config.data.max_corrupt_videos
      if len(_CORRUPT) > cap:
        raise video_lib.VideoError(
            f"{len(_CORRUPT)} corrupt videos skipped in training exceed "
            f"config.data.max_corrupt_videos={cap}; last: {e}") from None
      logging.warning("Skipping corrupt video in training: %s", e)
      return None
    if clip.pop("flipped", False):
      entry = mirror_entry(entry, self.swap)
    ex = example_targets(entry, self.vocabs, self.config, start=start, length=length, rng=rng)
    ex.update(clip, index=np.int32(idx), valid=np.bool_(True))
    return ex


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # Local: the data package does not need jax otherwise.
    return jax.process_index(), jax.process_count()
  return process_index, process_count


def _local_batch(global_batch: int, process_count: int, key: str) -> int:
  if global_batch % process_count:
    raise ValueError(f"config.data.{key}={global_batch} is not divisible by the "
                     f"{process_count} processes.")
  return global_batch // process_count


def _read_options(config):
  return grain.ReadOptions(num_threads=int(config.data.read_threads),
                           prefetch_buffer_size=max(int(config.data.prefetch), 1) *
                           max(int(config.data.batch_size), 1))


def make_train_iterator(config, split: SplitData, vocabs: Vocabularies, *, seed: int,
                        process_index: int | None = None, process_count: int | None = None):
  """An infinite grain iterator of this process's training batches (numpy dicts).

  Batches have `config.data.batch_size / process_count` examples. Supports
  `get_state()` / `set_state(state)` for exact resumption. Corrupt videos are skipped and
  counted (more than `config.data.max_corrupt_videos` in one process is an error).
  """
  if not len(split):
    raise ValueError(f"No usable videos in {split.root}.")
  p, num_p = _process(process_index, process_count)
  local = _local_batch(config.data.batch_size, num_p, "batch_size")
  element = _TrainElement(config, split, vocabs, seed, p, num_p, domain_weights(config, split))
  ds = grain.MapDataset.range(0, sys.maxsize // max(num_p, 1) - 1).map(element)
  ds = ds.filter(lambda x: x is not None)
  it_ds = ds.to_iter_dataset(_read_options(config)).batch(local, drop_remainder=True)
  if config.data.num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(config.data.num_workers),
        per_worker_buffer_size=max(int(config.data.prefetch), 1)))
  return iter(it_ds)


class _EvalElement:
  def __init__(self, config, split, vocabs):
    self.config, self.split, self.vocabs = config, split, vocabs
    self.reader = ClipReader(config, split)

  def __call__(self, slot: int):
    idx = slot if slot < len(self.split) else -1
    entry = self.split.entries[max(idx, 0)]
    clip, (start, length) = self.reader.read(entry, None)
    ex = example_targets(entry, self.vocabs, self.config, start=start, length=length, rng=None)
    ex.update(clip, index=np.int32(max(idx, 0)), valid=np.bool_(idx >= 0))
    if idx < 0:  # Padding: a real example's shapes, zero content, valid=False.
      ex = {k: np.zeros_like(v) for k, v in ex.items()}
    return ex


def num_eval_batches(config, split: SplitData) -> int:
  return math.ceil(len(split) / config.data.eval_batch_size)


def eval_batches(config, split: SplitData, vocabs: Vocabularies, *, process_index: int = 0,
                 process_count: int = 1):
  """Fixed-size batches of this process covering every video of the split once.

  Yields `num_eval_batches` numpy dicts of `eval_batch_size / process_count` examples;
  padding examples have valid=False. A corrupt video raises VideoError naming the file.
  """
  if not len(split):
    raise ValueError(f"No usable videos in {split.root}.")
  gb = config.data.eval_batch_size
  local = _local_batch(gb, process_count, "eval_batch_size")
  slots = [b * gb + process_index * local + k
           for b in range(num_eval_batches(config, split)) for k in range(local)]
  ds = grain.MapDataset.source(slots).map(_EvalElement(config, split, vocabs))
  it_ds = ds.to_iter_dataset(_read_options(config)).batch(local)
  if config.data.num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(config.data.num_workers),
        per_worker_buffer_size=max(int(config.data.prefetch), 1)))
  return iter(it_ds)
