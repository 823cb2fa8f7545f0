"""Builds the ArrayRecord cache of decoded, resized frames (or features) for fast training.

    python tools/build_dataset.py --config=configs/demo.py --cache_dir=data/synthetic_cache
    python tools/build_dataset.py --config=configs/base.py --config.data.dir=DATA \
        --cache_dir=CACHE --splits=training,validation --processes=2
    # then train with --config.data.input=cache --config.data.cache_dir=CACHE

Also imports ActivityNet ground truth into the DATA layout:

    python tools/build_dataset.py --config=configs/base.py --config.data.dir=DATA \
        --import_activitynet=activity_net.v1-3.min.json

The cache depends on data.video.frame_size / decode_size and data.video.max_fps; the
pipeline refuses a cache built with other values.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from hvlm_jax.data import annotations, cache  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Output (default: config.data.cache_dir).")
_SPLITS = flags.DEFINE_list("splits", ["training", "validation", "test"], "Splits to cache.")
_PROCESSES = flags.DEFINE_integer("processes", 1, "Decoding processes.")
_ACTIVITYNET = flags.DEFINE_string("import_activitynet", None,
                                   "ActivityNet ground-truth JSON to convert into data.dir.")


def main(argv):
  del argv
  config = _CONFIG.value
  try:
    if _ACTIVITYNET.value:
      counts = annotations.convert_activitynet(_ACTIVITYNET.value, config.data.dir)
      print(f"Wrote action_detection.json under {config.data.dir}: {counts}")
      return
    out = _CACHE_DIR.value or config.data.cache_dir
    if not out:
      sys.exit("error: pass --cache_dir or set config.data.cache_dir.")
    for split in _SPLITS.value:
      if not os.path.isdir(os.path.join(config.data.dir, split)) and config.data.name != "synthetic":
        print(f"{split}: no {os.path.join(config.data.dir, split)}, skipped")
        continue
      start = time.time()
      data = annotations.load_split(config, split, training=True)
      summary = cache.build_cache(config, data, out, num_processes=_PROCESSES.value,
                                  progress=True)
      print(f"{split}: {summary['videos']} videos ({summary['skipped']} unreadable) in "
            f"{summary['shards']} shards at {summary['path']}, {time.time() - start:.1f} s")
  except (ValueError, OSError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
