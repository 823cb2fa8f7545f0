"""Temporal action detection: anchor-free per-step classification and boundary regression.

Head (ActionFormer, Zhang et al. 2022, single scale): on per-time-step features (B, T', D),
plus, when the grid tokens of each step are given, their attention pooling with fixed 2-D
sinusoidal (row, column) encodings added (a learned probe per step, heads/text.AttentionPool:
the spatial mean is nearly blind to where an object is, and so to which way it moves; the
fixed encodings make "where" explicit from step 0 instead of waiting for the encoder's
position embeddings to grow), a few pre-LN temporal convolutions, then per step (a) C class logits (sigmoid; bias set to the
prior p = 0.01 as in RetinaNet) and (b) distances from the step centre to the action's start
and end, in units of the step duration (softplus, so >= 0).

Loss: sigmoid focal loss (Lin et al. 2017, alpha 0.25, gamma 2) or binary cross-entropy over
steps x classes, plus a DIoU (Zheng et al. 2020, as in ActionFormer) or L1 boundary loss at
the steps inside an action, both normalised by the number of such steps.

Decoding (`decode_detections`, jit-able, static shapes): sigmoid scores, moving-average
smoothing over time, one candidate segment per (step, class), the `pre_nms_top_k` best,
class-wise greedy 1-D NMS (O(K^2)), and the `max_detections` best survivors per video, in
seconds. `detections_as_lists` turns the arrays into Python (start, end, label, score) tuples.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from hvlm_jax.models.heads.text import AttentionPool, sinusoidal_positions
from hvlm_jax.models.layers import Dtype, layer_norm, partitioned


class DetectionHead(nn.Module):
  """features (B, T', D), step_tokens (B, T', P, D) or None ->
  dict(logits (B, T', C) float32, offsets (B, T', 2) float32)."""
  num_classes: int
  num_heads: int = 4
  num_layers: int = 2
  kernel_size: int = 3
  prior_prob: float = 0.01
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features, step_tokens=None, *, deterministic=True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t, d = features.shape

    def conv(features_out, axes, name, bias=0.0, dtype=self.dtype):
      return nn.Conv(features_out, (self.kernel_size,), padding="SAME", name=name,
                     dtype=dtype, param_dtype=self.param_dtype,
                     kernel_init=partitioned(nn.initializers.lecun_normal(), axes),
                     bias_init=partitioned(nn.initializers.constant(bias), axes[-1:]))

    x = features
    if step_tokens is not None and step_tokens.shape[2] > 1:
      pooled = AttentionPool(self.num_heads, name="step_pool", **kw)(
          step_tokens.reshape(b * t, *step_tokens.shape[2:]),
          positions=grid_positions(step_tokens.shape[2], d))
      x = x + pooled.reshape(b, t, d).astype(x.dtype)
    for i in range(self.num_layers):
      h = nn.gelu(conv(d, ("conv", "embed", "mlp"), f"conv_{i}")(
          layer_norm(f"ln_{i}", **kw)(x)))
      x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    x = layer_norm("ln_final", **kw)(x)
    prior = -math.log((1.0 - self.prior_prob) / self.prior_prob)
    logits = conv(self.num_classes, ("conv", "embed", "vocab"), "classes", prior,
                  jnp.float32)(x)
    offsets = jax.nn.softplus(conv(2, ("conv", "embed", None), "offsets",
                                   dtype=jnp.float32)(x))
    return dict(logits=logits, offsets=offsets)


def grid_positions(p: int, dim: int) -> jax.Array:
  """(P, dim) fixed encodings of a square grid's (row, column), row-major (P = h * w).

  Half the channels encode the row, half the column (sinusoids of Vaswani et al. 2017); a
  non-square P is treated as one row.
  """
  h = math.isqrt(p)
  h = h if h * h == p else 1
  idx = jnp.arange(p)
  return jnp.concatenate([sinusoidal_positions(idx // (p // h), dim // 2),
                          sinusoidal_positions(idx % (p // h), dim - dim // 2)], axis=-1)


def segment_diou_loss(pred, target):
  """1 - IoU + (centre distance / enclosing length)^2 for 1-D segments around a shared point.

  pred, target: (..., 2) non-negative distances (to start, to end) from the same step centre.
  """
  ps, pe, ts, te = pred[..., 0], pred[..., 1], target[..., 0], target[..., 1]
  inter = jnp.minimum(ps, ts) + jnp.minimum(pe, te)
  union = ps + pe + ts + te - inter
  iou = inter / jnp.maximum(union, 1e-6)
  enclosing = jnp.maximum(ps, ts) + jnp.maximum(pe, te)
  centre = 0.5 * ((pe - ps) - (te - ts))
  return 1.0 - iou + (centre / jnp.maximum(enclosing, 1e-6)) ** 2


def detection_loss(logits, offsets, batch, *, loss: str = "focal", focal_alpha: float = 0.25,
                   focal_gamma: float = 2.0, regression_loss: str = "diou",
                   regression_weight: float = 1.0, mask=None) -> dict:
  """Detection loss on the examples where the task is present.

  logits, offsets: (B, T', C), (B, T', 2) from DetectionHead. Reads batch action_targets
  (B, T', C), action_offsets (B, T', 2) in seconds, step_duration (B,), action_mask (B,)
  (and'ed with `mask` if given). Positive steps: inside any action. Returns cls, reg, total
  and accuracy (argmax class among the true classes at positive steps).
  """
  targets = batch["action_targets"].astype(jnp.float32)
  present = batch["action_mask"] if mask is None else batch["action_mask"] & mask
  present = present.astype(jnp.float32)[:, None]  # (B, 1)
  pos = (targets.max(-1) > 0).astype(jnp.float32) * present  # (B, T')
  num_pos = jnp.maximum(pos.sum(), 1.0)
  logits = logits.astype(jnp.float32)
  if loss == "focal":
    cls = optax.sigmoid_focal_loss(logits, targets, alpha=focal_alpha, gamma=focal_gamma)
  elif loss == "bce":
    cls = optax.sigmoid_binary_cross_entropy(logits, targets)
  else:
    raise ValueError(f"config.model.heads.detection.loss={loss!r} is not focal or bce.")
  cls = (cls.sum(-1) * present).sum() / num_pos
  step = jnp.maximum(batch["step_duration"].astype(jnp.float32), 1e-6)[:, None, None]
  target_off = batch["action_offsets"].astype(jnp.float32) / step
  if regression_loss == "diou":
    reg = segment_diou_loss(offsets, target_off)
  elif regression_loss == "l1":
    reg = jnp.abs(offsets - target_off).sum(-1)
  else:
    raise ValueError(f"config.model.heads.detection.regression_loss={regression_loss!r} "
                     f"is not diou or l1.")
  reg = (reg * pos).sum() / num_pos
  hit = jnp.take_along_axis(targets, logits.argmax(-1)[..., None], -1)[..., 0]
  acc = (hit * pos).sum() / num_pos
  return dict(cls=cls, reg=reg, total=cls + regression_weight * reg, accuracy=acc)


def smooth_scores(scores, window: int):
  """Moving average over time of (B, T, C) scores; near the ends, over the steps that exist."""
  if window <= 1:
    return scores
  t, half = scores.shape[1], window // 2
  pad = [(0, 0), (half, window - 1 - half), (0, 0)]
  window_sum = lambda x: sum(x[:, i:i + t] for i in range(window))  # noqa: E731
  counts = window_sum(jnp.pad(jnp.ones((1, t, 1), scores.dtype), pad))
  return window_sum(jnp.pad(scores, pad)) / counts


def segment_iou(start, end):
  """(K,) segments -> (K, K) temporal IoU."""
  inter = jnp.maximum(0.0, jnp.minimum(end[:, None], end[None]) -
                      jnp.maximum(start[:, None], start[None]))
  union = (end - start)[:, None] + (end - start)[None] - inter
  return inter / jnp.maximum(union, 1e-9)


def nms_1d(start, end, label, score, iou_threshold: float):
  """Class-wise greedy NMS for one video; returns keep (K,) bool.

  A segment is suppressed by any kept, higher-scored segment of the same label whose tIoU
  with it exceeds `iou_threshold`. O(K^2) time and memory.
  """
  order = jnp.argsort(-score)
  s, e, lab = start[order], end[order], label[order]
  k = s.shape[0]
  clash = (segment_iou(s, e) > iou_threshold) & (lab[:, None] == lab[None])
  later = jnp.arange(k)[None, :] > jnp.arange(k)[:, None]
  clash = clash & later

  def body(i, keep):
    return keep & ~(keep[i] & clash[i])

  keep_sorted = jax.lax.fori_loop(0, k, body, jnp.ones((k,), bool))
  return jnp.zeros((k,), bool).at[order].set(keep_sorted)


def decode_detections(logits, offsets, step_times, step_duration, duration=None, *,
                      window: int = 3, nms_threshold: float = 0.5, pre_nms_top_k: int = 200,
                      max_detections: int = 20, min_score: float = 1e-3) -> dict:
  """Head outputs -> up to `max_detections` segments per video, in seconds.

  Args:
    logits: (B, T', C); offsets: (B, T', 2) in step units; step_times: (B, T') centre of each
      step in seconds; step_duration: (B,) seconds; duration: (B,) seconds to clip to, or None.
  Returns:
    dict of (B, max_detections) arrays start, end (float32 seconds), label (int32), score
    (float32), valid (bool), sorted by score.
  """
  b, t, c = logits.shape
  scores = smooth_scores(jax.nn.sigmoid(logits.astype(jnp.float32)), window)
  dur = step_duration.astype(jnp.float32)[:, None]
  start = step_times - offsets[..., 0] * dur  # (B, T')
  end = step_times + offsets[..., 1] * dur
  if duration is not None:
    start = jnp.maximum(start, 0.0)
    end = jnp.minimum(end, duration[:, None])
  flat_scores = scores.reshape(b, t * c)
  k = min(pre_nms_top_k, t * c)
  top, idx = jax.lax.top_k(flat_scores, k)
  step, label = idx // c, (idx % c).astype(jnp.int32)
  s = jnp.take_along_axis(start, step, 1)
  e = jnp.take_along_axis(end, step, 1)
  keep = jax.vmap(nms_1d, in_axes=(0, 0, 0, 0, None))(s, e, label, top, nms_threshold)
  keep = keep & (top >= min_score) & (e > s)
  m = min(max_detections, k)
  best, sel = jax.lax.top_k(jnp.where(keep, top, -1.0), m)
  take = lambda x: jnp.take_along_axis(x, sel, 1)  # noqa: E731
  return dict(start=take(s), end=take(e), label=take(label), score=best, valid=best >= 0)


def detections_as_lists(decoded) -> list[list[tuple[float, float, int, float]]]:
  """Host side: decode_detections' arrays -> per video a list of (start, end, label, score)."""
  d = {k: np.asarray(v) for k, v in decoded.items()}
  return [[(float(s), float(e), int(lab), float(sc))
           for s, e, lab, sc, ok in zip(*(d[k][i] for k in ("start", "end", "label", "score",
                                                            "valid"))) if ok]
          for i in range(d["start"].shape[0])]
