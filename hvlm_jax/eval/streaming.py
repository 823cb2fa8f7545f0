"""Evaluation of long videos: the host loop that streams each video's segments through one
compiled segment step of a `StreamingVLM` (hvlm_jax/models/streaming.py), reading segments
lazily from the data pipeline (hvlm_jax/data/segments.py).
"""
from __future__ import annotations

import functools

import jax

from hvlm_jax.data import segments as segments_lib
from hvlm_jax.models.streaming import (StreamingVLM, finish, finish_losses, init_state,
                                       segment_step)

def stream_predict(step_fn, finish_fn, variables, state: dict, video_batch: dict, segments, *,
                   put=lambda b: b) -> dict:
  """Host loop: step_fn(variables, state, put(segment)) over lazily read segment batches, then
  finish_fn(variables, state, put(video_batch)). Host memory holds one segment batch at a time."""
  for seg in segments:
    state = step_fn(variables, state, put(seg))
  return finish_fn(variables, state, put(video_batch))


def split_predictions(config, model: StreamingVLM, params, split, vocabs, *, put=lambda b: b,
                      process_index: int = 0, process_count: int = 1):
  """Streams every video of `split` (hvlm_jax/data/segments.py `streaming_eval_batches`):
  yields (predictions, loss metrics, count, video_batch) per batch of
  config.data.eval_batch_size videos: predictions as HierarchicalVLM.predict's for whole videos
  (detections in video seconds), loss metrics as `compute_losses`' (`finish_losses`) averaged
  over the batch's `count` valid videos (global, over every process). `put` places host
  batches on devices (e.g. train.sharding.global_batch on a mesh). One compiled segment step
  and one compiled finish serve every batch and every length."""
  step = jax.jit(functools.partial(segment_step, model), donate_argnums=1)

  def end(variables, state, batch):
    return (finish(model, variables, state, batch),
            finish_losses(model, variables, state, batch, config)[1], batch["valid"].sum())
  end = jax.jit(end)
  num_steps = config.data.video.num_frames // config.model.tubelet_size[0]
  for video, segs in segments_lib.streaming_eval_batches(
      config, split, vocabs, process_index=process_index, process_count=process_count):
    state = init_state(model, config.data.eval_batch_size, num_steps)
    yield (*stream_predict(step, end, {"params": params}, state, video, segs, put=put), video)
