"""Detection over a long video from its segments: stitching in seconds, NMS across borders.

Each segment's head outputs (per-step class logits and boundary offsets, hvlm_jax/models/heads/
detection.py) become boundaries in video seconds at once; the candidates enter a fixed-size
buffer one segment late, once the next segment's first steps are known, so that the score
smoothing crosses segment borders exactly. The result equals `decode_detections` run once over
the concatenated timeline (tests/test_streaming.py), in O(K + T' C) memory per video whatever
the number of segments (K = pre_nms_top_k, T' steps and C classes per segment).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hvlm_jax.config import ConfigError
from hvlm_jax.models.heads.detection import nms_1d

NO_SCORE = -1.0  # Candidate-buffer filler: below any sigmoid score, so never kept.


def detection_state(batch_size: int, num_steps: int, num_classes: int, *, window: int,
                    pre_nms_top_k: int) -> dict:
  """Empty stitching state: a candidate buffer (B, K) and one pending segment of scores."""
  b, t, c, h, k = batch_size, num_steps, num_classes, window // 2, pre_nms_top_k
  if window - 1 - h > num_steps:
    raise ConfigError(f"config.model.heads.detection.smoothing_window={window} reaches past "
                      f"the next segment ({num_steps} steps).")
  z = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
  return dict(cand_start=z(b, k), cand_end=z(b, k), cand_label=jnp.zeros((b, k), jnp.int32),
              cand_score=jnp.full((b, k), NO_SCORE, jnp.float32),
              pend_scores=z(b, t, c), pend_start=z(b, t), pend_end=z(b, t),
              pend_valid=jnp.zeros((b, t), bool), left_scores=z(b, h, c),
              left_valid=jnp.zeros((b, h), bool))


def _emit(state, right_scores, right_valid, window: int):
  """Pending segment -> candidates: scores smoothed over the video timeline (left context of
  the segment before, right context of the one after; steps that do not exist do not count,
  as `smooth_scores` at the ends of a clip), top-k merged into the buffer."""
  t, k = state["pend_scores"].shape[1], state["cand_score"].shape[1]
  seq = jnp.concatenate([state["left_scores"], state["pend_scores"], right_scores], 1)
  valid = jnp.concatenate([state["left_valid"], state["pend_valid"], right_valid], 1)
  pad = window - 1 - (seq.shape[1] - t)  # Right context missing at the end of the video.
  seq = jnp.pad(jnp.where(valid[..., None], seq, 0.0), [(0, 0), (0, pad), (0, 0)])
  counts = jnp.pad(valid.astype(jnp.float32), [(0, 0), (0, pad)])
  total = sum(seq[:, i:i + t] for i in range(window))
  smoothed = total / jnp.maximum(sum(counts[:, i:i + t] for i in range(window)), 1.0)[..., None]
  b, c = smoothed.shape[0], smoothed.shape[2]
  flat = jnp.where(state["pend_valid"][..., None], smoothed, NO_SCORE).reshape(b, t * c)
  top, idx = jax.lax.top_k(flat, min(k, t * c))
  step, label = idx // c, (idx % c).astype(jnp.int32)
  pool = dict(score=jnp.concatenate([state["cand_score"], top], 1),
              start=jnp.concatenate([state["cand_start"],
                                     jnp.take_along_axis(state["pend_start"], step, 1)], 1),
              end=jnp.concatenate([state["cand_end"],
                                   jnp.take_along_axis(state["pend_end"], step, 1)], 1),
              label=jnp.concatenate([state["cand_label"], label], 1))
  best, sel = jax.lax.top_k(pool["score"], k)
  return dict(state, cand_score=best, **{f"cand_{n}": jnp.take_along_axis(pool[n], sel, 1)
                                          for n in ("start", "end", "label")})


def detection_update(state, logits, offsets, step_times, step_duration, duration, step_valid,
                     *, window: int) -> dict:
  """Takes in one segment's head outputs; emits the previous segment's candidates.

  logits (B, T', C), offsets (B, T', 2) in step units, step_times (B, T') video seconds of the
  step centres, step_duration (B,), duration (B,) video seconds, step_valid (B, T') bool.
  Boundaries are step_time -/+ offset * step_duration clipped to [0, duration], as
  `decode_detections` does for a clip. A segment is emitted one segment late, once the steps
  after it are known, so its smoothing crosses the border exactly.
  """
  scores = jax.nn.sigmoid(logits.astype(jnp.float32))
  dur = step_duration.astype(jnp.float32)[:, None]
  start = jnp.maximum(step_times - offsets[..., 0] * dur, 0.0)
  end = jnp.minimum(step_times + offsets[..., 1] * dur, duration.astype(jnp.float32)[:, None])
  r, h = window - 1 - window // 2, window // 2
  state = _emit(state, scores[:, :r], step_valid[:, :r], window)
  if h:
    left = jnp.concatenate([state["left_scores"], state["pend_scores"]], 1)[:, -h:]
    left_valid = jnp.concatenate([state["left_valid"], state["pend_valid"]], 1)[:, -h:]
    state = dict(state, left_scores=left, left_valid=left_valid)
  return dict(state, pend_scores=scores, pend_start=start, pend_end=end, pend_valid=step_valid)


def detection_finish(state, *, window: int, nms_threshold: float, max_detections: int,
                     min_score: float) -> dict:
  """After the last segment: (B, m) start, end (seconds), label, score, valid, sorted by score,
  m = min(max_detections, pre_nms_top_k); class-wise NMS across every segment border."""
  b, _, c = state["pend_scores"].shape
  state = _emit(state, jnp.zeros((b, 0, c)), jnp.zeros((b, 0), bool), window)
  s, e, lab, top = (state[f"cand_{n}"] for n in ("start", "end", "label", "score"))
  keep = jax.vmap(nms_1d, in_axes=(0, 0, 0, 0, None))(s, e, lab, top, nms_threshold)
  keep = keep & (top >= min_score) & (top > NO_SCORE) & (e > s)
  best, sel = jax.lax.top_k(jnp.where(keep, top, -1.0), min(max_detections, top.shape[1]))
  take = lambda x: jnp.take_along_axis(x, sel, 1)  # noqa: E731
  return dict(start=take(s), end=take(e), label=take(lab), score=best, valid=best >= 0)
