"""Input pipeline throughput (training clips/s): raw mp4 decoding vs the ArrayRecord cache.

    python tools/benchmark_data.py                       # 32 x 224 x 224, workers 0,1,2
    python tools/benchmark_data.py --frames=16 --frame_size=64 --source_size=64 \
        --source_frames=48 --fps=12 --modes=video,memory,cache   # the demo's setting

Source videos are synthetic clips (H.264, `--source_size` square, `--source_frames` at
`--fps`), written once under --dir. Each measurement builds a fresh training iterator
(augmentation on), discards `--warmup` batches and times `--batches` more.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from configs import base  # noqa: E402
from hvlm_jax.data import annotations, cache, pipeline, synthetic  # noqa: E402
from hvlm_jax.data.text import Vocabularies  # noqa: E402

_DIR = flags.DEFINE_string("dir", "/tmp/hvlm_benchmark_data", "Work directory.")
_VIDEOS = flags.DEFINE_integer("videos", 16, "Source videos.")
_SOURCE_SIZE = flags.DEFINE_integer("source_size", 256, "Source video side (pixels).")
_SOURCE_FRAMES = flags.DEFINE_integer("source_frames", 120, "Frames per source video.")
_FPS = flags.DEFINE_integer("fps", 30, "Source frame rate.")
_FRAMES = flags.DEFINE_integer("frames", 32, "Frames per clip.")
_FRAME_SIZE = flags.DEFINE_integer("frame_size", 224, "Clip side.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Clips per batch.")
_BATCHES = flags.DEFINE_integer("batches", 6, "Timed batches per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed batches first.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts.")
_THREADS = flags.DEFINE_integer("read_threads", 2, "grain read threads per process.")
_MODES = flags.DEFINE_list("modes", ["video", "cache"], "video, memory (in-RAM decoded), cache.")


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
  for _ in range(_WARMUP.value):
    next(it)
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(it)
  return _BATCHES.value * _BATCH.value / (time.perf_counter() - start)


def main(argv):
  del argv
  config = make_config()
  t = time.time()
  synthetic.ensure_dataset(config)
  split = annotations.load_split(config, "training")
  print(f"source: {len(split)} videos {_SOURCE_SIZE.value}x{_SOURCE_SIZE.value}, "
        f"{_SOURCE_FRAMES.value} frames at {_FPS.value} fps ({time.time() - t:.1f} s)")
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
