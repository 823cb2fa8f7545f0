"""Training with memory: a video's consecutive segments in one differentiable pass.

`streaming_loss` is `compute_losses` over `stream_outputs`: the segments of each video run in
sequence through `StreamingVLM.segment` (a `lax.scan` whose carry is the memory bank, see
streaming.py), detection is scored on every step of every segment, QA / captioning /
classification read the bank after the last segment. Used by the trainer when
`config.model.streaming.train_segments > 0`; batches come from hvlm_jax/data/segments.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hvlm_jax.models import model as model_lib
from hvlm_jax.models.streaming import StreamingVLM, empty_bank, streaming_options, update_bank

def stream_outputs(model: StreamingVLM, variables, batch: dict, *, train=False, rngs=None,
                   merge_weights=None) -> dict:
  """Segments of one video in sequence (lax.scan) -> HierarchicalVLM.__call__'s outputs, with
  detection_logits (B, S T', C) / detection_offsets (B, S T', 2) on the stitched timeline.

  batch: video (B, S, T, H, W, 3) or features (B, S, T, F), segment_valid (B, S) bool, plus
  video-level fields (domain, questions, caption_tokens). Truncated backprop: the bank is cut off
  the gradient before every `truncation`-th segment (0: never); with `remat_segments` the scan
  saves only the bank per segment and recomputes the segment in the backward pass.
  """
  opts = streaming_options(model.config)
  key = "features" if "features" in batch else "video"
  per_segment = {k: jnp.moveaxis(batch[k], 1, 0) for k in (key, "segment_valid")}
  fixed = {k: batch[k] for k in ("domain",) if k in batch}
  b = batch[key].shape[0]

  def body(bank, xs):
    index, seg_in = xs
    if opts.truncation:
      cut = index % opts.truncation == 0
      bank = tuple(jnp.where(cut, jax.lax.stop_gradient(x), x) for x in bank)
    seg_rngs = None if rngs is None else {n: jax.random.fold_in(r, index) for n, r in rngs.items()}
    seg = model.apply(variables, dict(fixed, **{key: seg_in[key]}), *bank, train=train,
                      merge_weights=merge_weights, rngs=seg_rngs, method=StreamingVLM.segment)
    bank = update_bank(bank, seg, opts.memory_capacity, seg_in["segment_valid"])
    ys = {k: v for k, v in seg.items() if k.startswith(("detection_", "router_"))}
    if "detection_logits" in ys:  # Padding steps: logit -1e4 gives exactly zero focal / BCE loss.
      ys["detection_logits"] = jnp.where(seg_in["segment_valid"][:, None, None],
                                         ys["detection_logits"], -1e4)
    return bank, ys

  if opts.remat_segments:
    body = jax.checkpoint(body)
  num = per_segment[key].shape[0]
  bank = empty_bank(b, opts.memory_capacity, model.config.hidden_size)
  bank, ys = jax.lax.scan(body, bank, (jnp.arange(num), per_segment))
  out = model.apply(variables, *bank, batch, train=train, rngs=rngs,
                    method=StreamingVLM.video_outputs)
  for k, v in ys.items():  # (S, B, T', ...) -> (B, S T', ...); router: mean over segments.
    out[k] = v.mean(0) if k == "router_logits" else jnp.moveaxis(v, 0, 1).reshape(
        b, -1, *v.shape[3:])
  return out


def flatten_segments(batch: dict) -> dict:
  """Per-segment targets (B, S, T', ...) laid out on the stitched timeline (B, S T', ...)."""
  out = dict(batch)
  for k in ("action_targets", "action_offsets", "step_times"):
    if k in out:
      out[k] = out[k].reshape(out[k].shape[0], -1, *out[k].shape[3:])
  return out


def streaming_loss(model: StreamingVLM, params, batch: dict, config, *, rngs=None,
                   merge_weights=None, train=True):
  """(total, metrics) of `compute_losses` on `stream_outputs`: detection over every step of
  every segment, QA / captioning / classification from the bank after the last segment.
  batch: the streaming training schema of hvlm_jax/data/segments.py."""
  outputs = stream_outputs(model, {"params": params}, batch, train=train, rngs=rngs,
                           merge_weights=merge_weights)
  return model_lib.compute_losses(outputs, flatten_segments(batch), config)
