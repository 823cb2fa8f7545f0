"""TensorBoard event files (written with tensorboardX: no TensorFlow) and console progress.

Tags are grouped: `train/` (losses, accuracies, learning rate, gradient norm), `perf/`
(steps and clips per second, data wait, compilation and evaluation seconds), `val/` (the
evaluation's losses and scored metrics, and its images). The resolved config is a text
summary (`config`) and its main keys are hparams. A tag is the metric's own name: no
character TensorBoard would rewrite (`@` -> use `_`), so logs, checkpoints and the board agree.

`read_events(logdir)` reads a run back with TensorBoard's own reader (EventAccumulator).
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time

import jax
import numpy as np

PERF_KEYS = ("steps_per_second", "clips_per_second", "data_wait_fraction",
             "clips_per_second_per_device", "model_tflops_per_second_per_device", "mfu")
# Keys of the config shown as hparams (the HPARAMS tab compares runs by them).
HPARAM_KEYS = ("model.attention.type", "model.hidden_size", "model.num_layers",
               "model.tubelet_size", "model.token_merging.enabled",
               "model.token_merging.target_compression_ratio", "data.name",
               "data.video.num_frames", "data.video.frame_size", "data.batch_size",
               "training.learning_rate", "training.num_steps", "training.finetune", "seed")
_TAG = re.compile(r"^[-\w./]+$")


def check_tag(tag: str) -> str:
  """`tag` unchanged; raises ValueError for a name TensorBoard would silently rewrite."""
  if not _TAG.match(tag):
    raise ValueError(f"Metric name {tag!r} has characters TensorBoard rewrites; use letters, "
                     "digits, '_', '-', '.' and '/'.")
  return tag


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch when it is installed (it only needs it for torch tensors, which
  this project never logs): about 1 s of every run's start. Hiding torch during the import
  skips that; a torch imported earlier, or later in the process, is untouched.
  """
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set.
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide and sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Writes from process 0 only; other processes' writers do nothing."""

  def __init__(self, logdir: str, total_steps: int):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.logdir = logdir
    self._writer = None
    if self.enabled:
      self._writer = _summary_writer_class()(logdir, flush_secs=10)
    self._last_time, self._last_step = time.perf_counter(), None
    # ETA over the whole run: time spent in timed steps only (compilation, evaluation and
    # checkpoint saves are excluded by `exclude`), and how many steps it covered.
    self._timed_seconds, self._timed_steps, self._excluded = 0.0, 0, 0.0
    self.evaluated = False  # Set by the trainer after its first evaluation.

  def write_scalars(self, step: int, scalars: dict[str, float], prefix: str = ""):
    if not self.enabled:
      return
    for k, v in scalars.items():
      v = float(np.asarray(v))
      if np.isfinite(v):
        self._writer.add_scalar(check_tag(f"{prefix}{k}"), v, step)

  def write_train(self, step: int, summary: dict[str, float]):
    """A training summary: performance keys under perf/, the rest under train/."""
    self.write_scalars(step, {k: v for k, v in summary.items() if k not in PERF_KEYS},
                       prefix="train/")
    self.write_scalars(step, {k: v for k, v in summary.items() if k in PERF_KEYS},
                       prefix="perf/")

  def write_text(self, step: int, tag: str, text: str):
    if self.enabled:
      self._writer.add_text(check_tag(tag), text, step)

  def write_images(self, step: int, images: dict[str, np.ndarray]):
    """RGB uint8 (H, W, 3) images by tag."""
    if not self.enabled:
      return
    for tag, img in images.items():
      self._writer.add_image(check_tag(tag), np.asarray(img, np.uint8), step, dataformats="HWC")

  def write_config(self, config):
    """The resolved config as text (`config`, shown as JSON) and HPARAM_KEYS as hparams."""
    if not self.enabled:
      return
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = json.dumps(d, indent=2, default=str)
    self._writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)
    from tensorboardX.summary import hparams
    hp = {}
    for key in HPARAM_KEYS:
      node = d
      for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
      if node is not None:
        hp[key] = node if isinstance(node, (bool, int, float, str)) else str(node)
    exp, ssi, sei = hparams(hp, {"val/loss": 0.0})
    writer = self._writer._get_file_writer()
    for summary in (exp, ssi, sei):
      writer.add_summary(summary)

  # ----- progress ------------------------------------------------------------------------
  def exclude(self, seconds: float):
    """Leaves `seconds` (compilation, evaluation, a checkpoint save) out of the step rate."""
    self._excluded += seconds

  def steps_per_second(self, step: int) -> float:
    """Steps/s since the last call, without excluded time (0 on the first call)."""
    now = time.perf_counter()
    rate = 0.0
    if self._last_step is not None and step > self._last_step:
      seconds = max(now - self._last_time - self._excluded, 1e-9)
      rate = (step - self._last_step) / seconds
      self._timed_seconds += seconds
      self._timed_steps += step - self._last_step
    self._last_time, self._last_step, self._excluded = now, step, 0.0
    return rate

  def eta_seconds(self, step: int) -> float:
    """Remaining steps times the mean seconds per step over the whole run so far."""
    if not self._timed_steps:
      return float("nan")
    return (self.total_steps - step) * self._timed_seconds / self._timed_steps

  def log_progress(self, step: int, scalars: dict[str, float], steps_per_s: float):
    shown = " ".join(f"{k}={float(v):.4g}" for k, v in sorted(scalars.items()))
    logging.info("step %d/%d  %s  %.2f steps/s  ETA %s", step, self.total_steps, shown,
                 steps_per_s, format_seconds(self.eta_seconds(step)))

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()


def format_seconds(s: float) -> str:
  if not np.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def read_events(logdir: str):
  """TensorBoard's EventAccumulator over `logdir`, fully loaded (every scalar, image and
  text kept). `.Tags()` lists them; `.Scalars(tag)`, `.Images(tag)`, `.Tensors(tag)`."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0,
                             event_accumulator.TENSORS: 0})
  acc.Reload()
  return acc


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """Scalars of the event files in `logdir`: {tag: [(step, value), ...]} (TensorBoard's reader)."""
  acc = read_events(logdir)
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_text(logdir: str, tag: str) -> list[str]:
  """The text summaries of `tag`, in step order (TensorBoard's reader)."""
  acc = read_events(logdir)
  tags = acc.Tags()["tensors"]
  tag = tag if tag in tags else f"{tag}/text_summary"  # tensorboardX's suffix for text.
  out = []
  for e in acc.Tensors(tag):
    values = e.tensor_proto.string_val
    out.append(b"".join(values).decode("utf-8"))
  return out
