"""Input pipeline throughput (training clips/s): raw mp4 decoding vs the ArrayRecord cache.

    python tools/benchmark_data.py                       # 32 x 224 x 224, workers 0,1,2
    python tools/benchmark_data.py --camera_height=720     # 1280 x 720 sources
    python tools/benchmark_data.py --source=synthetic --frames=16 --frame_size=64 \
        --source_size=64 --source_frames=48 --fps=12 --batch_size=16 --videos=64 \
        --modes=video,memory,cache                     # the demo's setting

Sources (`--source`): "camera" (default) writes 640 x 360 H.264 clips of a panning, noisy
texture, whose bitrate (and so decoding cost) is close to real footage; "synthetic" uses the
built-in shapes dataset (`--source_size` square), which decodes several times faster. Each
measurement builds a fresh training iterator (augmentation on), discards `--warmup` batches
and times `--batches` more.
"""
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from configs import base  # noqa: E402
from hvlm_jax.data import annotations, cache, pipeline, synthetic  # noqa: E402
from hvlm_jax.data.text import Vocabularies  # noqa: E402

_DIR = flags.DEFINE_string("dir", "/tmp/hvlm_benchmark_data", "Work directory.")
_VIDEOS = flags.DEFINE_integer("videos", 12, "Source videos.")
_SOURCE_SIZE = flags.DEFINE_integer("source_size", 256, "Source video side (pixels).")
_SOURCE_FRAMES = flags.DEFINE_integer("source_frames", 300, "Frames per source video.")
_FPS = flags.DEFINE_integer("fps", 30, "Source frame rate.")
_FRAMES = flags.DEFINE_integer("frames", 32, "Frames per clip.")
_FRAME_SIZE = flags.DEFINE_integer("frame_size", 224, "Clip side.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Clips per batch.")
_BATCHES = flags.DEFINE_integer("batches", 6, "Timed batches per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed batches first.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts.")
_THREADS = flags.DEFINE_integer("read_threads", 2, "grain read threads per process.")
_CAMERA_HEIGHT = flags.DEFINE_integer("camera_height", 360, "Camera source height (16:9).")
_SOURCE = flags.DEFINE_enum("source", "camera", ["camera", "synthetic"], "Source videos.")
_MODES = flags.DEFINE_list("modes", ["video", "cache"], "video, memory (in-RAM decoded), cache.")


def write_camera_videos(root: str, count: int, frames: int, fps: int, height: int) -> None:
  """Panning crops of a large noisy texture plus per-frame sensor noise, 16:9, crf 23."""
  import json
  import av
  import numpy as np
  from PIL import Image
  if os.path.exists(os.path.join(root, "training", "annotations", "action_detection.json")):
    return
  os.makedirs(os.path.join(root, "training", "videos"), exist_ok=True)
  os.makedirs(os.path.join(root, "training", "annotations"), exist_ok=True)
  rows = []
  for v in range(count):
    rng = np.random.default_rng(v)
    h, w = height, height * 16 // 9 // 2 * 2
    coarse = rng.integers(0, 256, size=(45, 80, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((2 * w, 2 * h), Image.BICUBIC))
    texture = np.clip(texture + rng.normal(0, 12, texture.shape), 0, 255).astype(np.uint8)
    path = os.path.join(root, "training", "videos", f"cam_{v:03d}.mp4")
    container = av.open(path, "w")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.options = {"crf": "23", "preset": "veryfast"}
    for i in range(frames):
      x = int(w / 2 + 0.45 * w * np.sin(i / 40 + v))
      y = int(h / 2 + 0.45 * h * np.cos(i / 55 + v))
      f = texture[y:y + h, x:x + w].astype(np.int16) + rng.integers(-6, 7, (h, w, 3))
      frame = av.VideoFrame.from_ndarray(np.clip(f, 0, 255).astype(np.uint8), format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
    container.close()
    rows.append(dict(video_id=f"cam_{v:03d}", domain="general",
                     actions=[dict(start=1.0, end=3.0, label="pan")]))
  with open(os.path.join(root, "training", "annotations", "action_detection.json"), "w") as f:
    json.dump(rows, f)


def make_config():
  config = base.get_config(f"frames={_FRAMES.value},frame_size={_FRAME_SIZE.value}")
  data = config.data
  data.name = "synthetic"
  data.dir = os.path.join(_DIR.value, f"videos_{_SOURCE_SIZE.value}_{_SOURCE_FRAMES.value}")
  data.synthetic.num_videos = dict(training=_VIDEOS.value, validation=0, test=0)
  data.synthetic.frame_size = _SOURCE_SIZE.value
  data.synthetic.num_frames = _SOURCE_FRAMES.value
  data.synthetic.fps = _FPS.value
  data.batch_size = _BATCH.value
  data.read_threads = _THREADS.value
  data.cache_dir = data.dir + f"_cache_{_FRAME_SIZE.value}"
  return config


def measure(config, split, vocabs) -> float:
  it = pipeline.make_train_iterator(config, split, vocabs, seed=0, process_index=0,
                                    process_count=1)
  warmup = _WARMUP.value
  if config.data.memory_cache_mb:  # Fill the in-RAM table first: one epoch.
    warmup = max(warmup, -(-len(split) // _BATCH.value) + 1)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(it)
  return _BATCHES.value * _BATCH.value / (time.perf_counter() - start)


def main(argv):
  del argv
  config = make_config()
  t = time.time()
  if _SOURCE.value == "camera":
    config.data.name = "folder"
    height = _CAMERA_HEIGHT.value
    config.data.dir = os.path.join(_DIR.value, f"camera_{height}p_{_SOURCE_FRAMES.value}")
    config.data.cache_dir = config.data.dir + f"_cache_{_FRAME_SIZE.value}"
    write_camera_videos(config.data.dir, _VIDEOS.value, _SOURCE_FRAMES.value, _FPS.value,
                        height)
    size = f"{height * 16 // 9 // 2 * 2}x{height}"
  else:
    try:
      synthetic.ensure_dataset(config)
    except ValueError:  # Made by an older generator: this tool owns --dir, so remake it.
      shutil.rmtree(config.data.dir)
      shutil.rmtree(config.data.cache_dir, ignore_errors=True)
      synthetic.ensure_dataset(config)
    size = f"{_SOURCE_SIZE.value}x{_SOURCE_SIZE.value}"
  split = annotations.load_split(config, "training")
  mb = sum(os.path.getsize(e.path) for e in split.entries) / len(split) / 1e6
  print(f"source: {len(split)} {_SOURCE.value} videos {size}, {_SOURCE_FRAMES.value} frames at "
        f"{_FPS.value} fps, {mb:.1f} MB each ({time.time() - t:.1f} s)")
  if "cache" in _MODES.value and not os.path.exists(os.path.join(config.data.cache_dir,
                                                                 "training")):
    t = time.time()
    summary = cache.build_cache(config, split, config.data.cache_dir)
    print(f"cache built in {time.time() - t:.1f} s: {summary}")
  vocabs = Vocabularies.build(split, config)
  print(f"clip {_FRAMES.value}x{_FRAME_SIZE.value}x{_FRAME_SIZE.value}, batch {_BATCH.value}, "
        f"read_threads {_THREADS.value}, {os.cpu_count()} CPUs")
  print(f"{'mode':8s} {'workers':>7s} {'clips/s':>9s}")
  for mode in _MODES.value:
    for workers in _WORKERS.value:
      c = config.copy_and_resolve_references()
      c.data.input = "cache" if mode == "cache" else "video"
      c.data.memory_cache_mb = 4096 if mode == "memory" else 0
      c.data.num_workers = int(workers)
      if mode == "memory":  # Warm the in-RAM table once; workers would each hold a copy.
        if int(workers):
          continue
        c.data.num_workers = 0
      print(f"{mode:8s} {workers:>7s} {measure(c, split, vocabs):9.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
