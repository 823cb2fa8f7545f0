"""Scalars to TensorBoard event files (tensorboardX: no TensorFlow) and to the console."""
from __future__ import annotations

import logging
import time

import jax
import numpy as np


class MetricWriter:
  """Writes scalars from process 0 only; other processes' writers do nothing."""

  def __init__(self, logdir: str, total_steps: int):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self._writer = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(logdir, flush_secs=10)
    self._last_time, self._last_step = time.perf_counter(), None

  def write_scalars(self, step: int, scalars: dict[str, float], prefix: str = ""):
    if not self.enabled:
      return
    for k, v in scalars.items():
      v = float(np.asarray(v))
      if np.isfinite(v):
        self._writer.add_scalar(f"{prefix}{k}", v, step)

  def write_text(self, step: int, tag: str, text: str):
    if self.enabled:
      self._writer.add_text(tag, text, step)

  def steps_per_second(self, step: int) -> float:
    """Steps/s since the last call (0 on the first call)."""
    now = time.perf_counter()
    rate = 0.0
    if self._last_step is not None and step > self._last_step:
      rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    return rate

  def log_progress(self, step: int, scalars: dict[str, float], steps_per_s: float):
    eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float("nan")
    shown = " ".join(f"{k}={float(v):.4g}" for k, v in sorted(scalars.items()))
    logging.info("step %d/%d  %s  %.2f steps/s  ETA %s", step, self.total_steps, shown,
                 steps_per_s, _format_seconds(eta))

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()


def _format_seconds(s: float) -> str:
  if not np.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """Scalars of the event files in `logdir`: {tag: [(step, value), ...]}.

  Parses the TFRecord framing (length, crc, payload, crc) directly, so reading a run back
  needs neither TensorFlow nor TensorBoard.
  """
  import glob
  import os
  import struct

  from tensorboardX.proto import event_pb2
  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out
