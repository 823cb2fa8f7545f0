"""ArrayRecord cache of decoded, resized frames (or features), one record per frame.

    CACHE/{split}/index.json                 settings + per video: shard, first record,
                                             count, pts, duration, frame shape
    CACHE/{split}/frames-00000.array_record  raw uint8 frames (h * w * 3 bytes each),
                                             a video's frames contiguous in one shard

A video's table holds every frame the sampler can pick (`video.decode_all`: all frames, or
those shown at k / max_fps), resized by the same swscale call as the raw path, so the
pipeline's clips are identical from either source (tests/test_data_pipeline.py checks it).
Reading a clip costs T record reads of h * w * 3 bytes; no decoding.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil

import numpy as np

INDEX = "index.json"
SHARD_BYTES = 1 << 30


def cache_settings(config) -> dict:
  """What the cached frames depend on; a cache is only read under the same settings."""
  data = config.data
  return dict(input="features" if data.input == "features" else "video",
              short_side=int(data.video.decode_size or data.video.frame_size),
              max_fps=float(data.video.max_fps))


def _decode_job(job):
  from hvlm_jax.data import video  # Local: worker processes import lazily.
  entry_path, short_side, max_fps, features = job
  try:
    if features:
      arr = np.load(entry_path).astype(np.float32)
      return arr[None], None, None, None
    frames, pts, duration = video.decode_all(entry_path, short_side=short_side,
                                             max_fps=max_fps)
    return frames, pts, duration, None
  except (video.VideoError, OSError, ValueError) as e:
    return None, None, None, str(e)


def build_cache(config, split_data, out_dir: str, *, num_processes: int = 1,
                progress: bool = False) -> dict:
  """Writes the cache of `split_data` to out_dir/{split} (atomically); returns its summary.

  Corrupt videos are left out and listed under "skipped" in the index.
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  settings = cache_settings(config)
  features = settings["input"] == "features"
  final = os.path.join(out_dir, split_data.name)
  tmp = final + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  jobs = [(e.path, settings["short_side"], settings["max_fps"], features)
          for e in split_data.entries]
  index = dict(settings=settings, videos={}, skipped={})
  shard, writer, written = -1, None, SHARD_BYTES
  pool = (multiprocessing.get_context("spawn").Pool(num_processes)
          if num_processes > 1 else None)
  results = pool.imap(_decode_job, jobs, chunksize=2) if pool else map(_decode_job, jobs)
  if progress:
    import tqdm
    results = tqdm.tqdm(results, total=len(jobs), desc=f"cache {split_data.name}")
  try:
    for entry, (frames, pts, duration, error) in zip(split_data.entries, results):
      if error is not None:
        index["skipped"][entry.video_id] = error
        continue
      if written >= SHARD_BYTES:
        if writer is not None:
          writer.close()
        shard, written, count = shard + 1, 0, 0
        writer = ArrayRecordWriter(os.path.join(tmp, f"frames-{shard:05d}.array_record"),
                                   "group_size:1,uncompressed")
      for f in frames:
        writer.write(np.ascontiguousarray(f).tobytes())
      index["videos"][entry.video_id] = dict(
          shard=shard, first=count, count=len(frames), shape=list(frames.shape[1:]),
          dtype=str(frames.dtype), pts=None if pts is None else pts.tolist(),
          duration=duration)
      count += len(frames)
      written += frames.nbytes
  finally:
    if writer is not None:
      writer.close()
    if pool:
      pool.close()
  index["num_shards"] = shard + 1
  with open(os.path.join(tmp, INDEX), "w") as f:
    json.dump(index, f)
  shutil.rmtree(final, ignore_errors=True)
  os.rename(tmp, final)
  return dict(videos=len(index["videos"]), skipped=len(index["skipped"]),
              shards=index["num_shards"], path=final)


class CacheReader:
  """Random access to one split's cache. Picklable: shards reopen lazily in each process."""

  def __init__(self, cache_dir: str, split: str, config):
    self.root = os.path.join(cache_dir, split)
    path = os.path.join(self.root, INDEX)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"No cache index {path}; build it with tools/build_dataset.py "
          f"(config.data.cache_dir={cache_dir!r}).")
    with open(path) as f:
      index = json.load(f)
    expected = cache_settings(config)
    if index["settings"] != expected:
      raise ValueError(f"The cache in {self.root} was built with {index['settings']}, but the "
                       f"config asks for {expected}; rebuild it (config.data.cache_dir).")
    self.videos = index["videos"]
    self._readers: dict[int, object] = {}

  def __getstate__(self):
    return dict(root=self.root, videos=self.videos, _readers={})

  def __contains__(self, video_id: str) -> bool:
    return video_id in self.videos

  def info(self, video_id: str) -> dict:
    if video_id not in self.videos:
      raise KeyError(f"Video {video_id!r} is not in the cache {self.root}; rebuild it.")
    return self.videos[video_id]

  def read(self, video_id: str, indices=None) -> np.ndarray:
    """Records `indices` (default: all) of a video as an array (n, *shape)."""
    from array_record.python.array_record_module import ArrayRecordReader
    info = self.info(video_id)
    reader = self._readers.get(info["shard"])
    if reader is None:
      reader = ArrayRecordReader(
          os.path.join(self.root, f"frames-{info['shard']:05d}.array_record"),
          "readahead_buffer_size:0")
      self._readers[info["shard"]] = reader
    if indices is None:
      indices = np.arange(info["count"])
    records = reader.read([info["first"] + int(i) for i in indices])
    shape = tuple(info["shape"])
    return np.stack([np.frombuffer(r, dtype=info["dtype"]).reshape(shape) for r in records])
