"""Helpers for the data tests: a tiny config and a tiny synthetic dataset made once per session."""
import atexit
import functools
import os
import re
import shutil
import tempfile

import av
import numpy as np

from configs import base
from hvlm_jax.data import synthetic

_TMP = tempfile.mkdtemp(prefix="hvlm_data_tests-")
atexit.register(shutil.rmtree, _TMP, True)


def subprocess_env(devices: int) -> dict:
  """The environment for a test's child process: `devices` CPU devices and the session's other
  XLA flags (conftest's fast-compile flags)."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  return dict(os.environ, XLA_FLAGS=f"{flags.strip()} "
              f"--xla_force_host_platform_device_count={devices}".strip())


def tiny_config(data_dir=None):
  """8 frames of 32 x 32 from 2 s synthetic clips (24 frames at 12 fps), tubelet 2 in time."""
  config = base.get_config("frames=8,frame_size=32")
  data = config.data
  data.name = "synthetic"
  data.dir = data_dir or dataset_dir()
  data.batch_size = 4
  data.eval_batch_size = 4
  data.read_threads = 1
  data.synthetic.num_videos = dict(training=12, validation=5, test=0)
  data.synthetic.frame_size = 32
  data.synthetic.num_frames = 24
  data.synthetic.fps = 12
  config.model.tubelet_size = (2, 8, 8)
  return config


@functools.cache
def dataset_dir() -> str:
  """The tiny synthetic dataset, generated once per test process."""
  root = f"{_TMP}/synthetic"
  config = tiny_config(root)
  synthetic.generate_dataset(root, synthetic.settings_from_config(config), num_processes=1)
  return root


def tmp_dir(name: str) -> str:
  return tempfile.mkdtemp(prefix=name + "-", dir=_TMP)


def write_video(path, frames, pts=None, time_base=None, fps=10, codec="libx264rgb", gop=None):
  """Writes frames bit-exactly (libx264rgb, crf 0); optional explicit pts in `time_base`."""
  container = av.open(path, "w")
  stream = container.add_stream(codec, rate=fps)
  stream.height, stream.width = frames.shape[1:3]
  stream.pix_fmt = "rgb24" if codec == "libx264rgb" else "yuv420p"
  stream.options = {"crf": "0", "preset": "ultrafast"}
  if gop:
    stream.codec_context.gop_size = gop
  if time_base is not None:
    from fractions import Fraction
    stream.time_base = Fraction(time_base)
    stream.codec_context.time_base = Fraction(time_base)
  for i, f in enumerate(frames):
    frame = av.VideoFrame.from_ndarray(f, format="rgb24")
    if pts is not None:
      frame.pts = int(pts[i])
      from fractions import Fraction
      frame.time_base = Fraction(time_base)
    for packet in stream.encode(frame):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()


def index_frames(n, size=16):
  """Frames whose every pixel value encodes the frame index (i * 4, fits uint8 up to 63)."""
  return np.stack([np.full((size, size, 3), i * 4, np.uint8) for i in range(n)])
