"""Executables loaded in background threads while the trainer's Python work goes on: XLA
releases the GIL while it compiles or deserializes (docs/design.md, item 7)."""
from __future__ import annotations

import concurrent.futures
import os
from typing import Callable

import jax

from hvlm_jax import trace_cache


def in_background(fn: Callable, *args):
  """A future of `fn(*args)` run in its own thread (XLA releases the GIL while it compiles or
  loads an executable, so the caller's Python work runs meanwhile)."""
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hvlm-background")
  future = pool.submit(fn, *args)
  pool.shutdown(wait=False)
  return future


class StepAhead:
  """The first train step's executable, read from the trace cache and loaded from the
  compilation cache in a background thread, started before the initial state, the checkpoint
  and the first batch exist. Its arguments are predicted: the abstract state, a training batch
  shaped like the validation batch, the merging controls of step 0. The loop takes it only
  when the real arguments have the same trace-cache key (`matches`); otherwise, and on a
  trace-cache miss (then nothing is started: tracing stays on the main thread), the loop
  compiles the step as before."""

  def __init__(self, args, describe: str, trace_dir: str, mesh):
    self.path = trace_cache.entry_path("train_step", args, describe=describe,
                                       directory=trace_dir)
    self.trace_dir = trace_dir
    self.future = (in_background(self._load, self.path, args, mesh)
                   if os.path.exists(self.path) else None)

  @staticmethod
  def _load(path, args, mesh):
    entry = trace_cache.read(path)
    if entry is None:  # Damaged: the loop's trace_cache.lower rewrites it.
      return None
    with jax.set_mesh(mesh):  # Lowered as the loop lowers it (same compilation-cache key).
      return trace_cache.wrap(*entry[:2], donate_argnums=(0,)).lower(*args).compile()

  def matches(self, args, describe: str) -> bool:
    """Whether `args` and `describe` have the predicted ones' trace-cache key."""
    return self.future is not None and trace_cache.entry_path(
        "train_step", args, describe=describe, directory=self.trace_dir) == self.path

  def result(self):
    """The compiled step, or None when the background thread found the entry unreadable."""
    return self.future.result()
