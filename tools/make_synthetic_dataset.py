"""Generates the synthetic video dataset (mp4 + annotations for all three tasks).

    python tools/make_synthetic_dataset.py --config=configs/demo.py --out=data/synthetic
    python tools/make_synthetic_dataset.py --config=configs/demo.py \
        --config.data.synthetic.num_videos.training=2000 --out=/tmp/syn

Settings come from `config.data.synthetic` (seed, num_videos per split, frame_size,
num_frames, fps, max_objects) and `config.data.domains`. The output is written atomically:
an existing --out is never overwritten.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from hvlm_jax.data import synthetic  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: config.data.dir).")


def main(argv):
  del argv
  config = _CONFIG.value
  config.data.name = "synthetic"
  if _OUT.value:
    config.data.dir = _OUT.value
  start = time.time()
  try:
    root = synthetic.ensure_dataset(config, progress=True)
  except ValueError as e:
    sys.exit(f"error: {e}")
  total = sum(dict(config.data.synthetic.num_videos).values())
  print(f"{root}: {total} videos in {time.time() - start:.1f} s")


if __name__ == "__main__":
  app.run(main)
