"""Streaming over long videos with a compressed memory bank (MA-LMM, He et al. CVPR 2024).

A long video is read as consecutive segments, each one clip of the configured size
(data.video.num_frames frames over model.streaming.segment_seconds, hvlm_jax/data/segments.py).
Segment s, given the bank (B, C, D) of the segments before it:
  1. `HierarchicalVLM.encode` -> tokens (B, N, D), time features (B, T', D), grid tokens of each
     step (B, T', P, D), exactly as for a clip (same parameters, same shapes).
  2. Time features and grid tokens attend to the bank through a gated residual
     x + tanh(g) * CrossMemoryAttention(LN(x), bank), g (D,) = 0 at init (Flamingo's tanh gate),
     with log(entry size) on the memory logits (proportional attention: an entry standing for
     k tokens weighs like k copies). The detection head reads them: per-step scores and
     boundaries in video seconds go into a fixed-size candidate buffer (stitching.py).
  3. The bank takes in K summary tokens of the segment's encoder tokens (size-weighted means of
     K runs of consecutive, time-major tokens, `memory.pool_tokens`) and `memory.compress_memory`
     brings it back to C entries (MA-LMM: merge the most similar adjacent pair, repeat).
After the last segment, classification, QA and captioning read the bank as their video tokens;
detection runs class-wise NMS over the candidates of all segments (stitching.py).

Device memory is constant in the number of segments: the state is the bank (C x D), K_pre
candidates and one pending segment of scores, and one compiled program serves every segment.

Parameters: HierarchicalVLM's tree plus `memory_reader` ({attention: {qkv, out_proj}, ln, gate};
created only with the detection head, the per-segment reader of the bank). A
normally trained checkpoint streams after `add_memory_params` (g = 0: the per-segment outputs
are the clip model's until the gate is trained with `streaming_loss.streaming_loss`).
The host loop that evaluates long videos is hvlm_jax/eval/streaming.py.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from hvlm_jax.config import ConfigError
from hvlm_jax.models import heads as heads_lib
from hvlm_jax.models import model as model_lib
from hvlm_jax.models.attention.memory import CrossMemoryAttention, compress_memory, pool_tokens
from hvlm_jax.models.attention.sparse import pad_axis
from hvlm_jax.models.layers import layer_norm, partitioned
from hvlm_jax.models.stitching import detection_finish, detection_state, detection_update

DEFAULTS = dict(enabled=True, auto_threshold=1.0, segment_seconds=8.0, memory_capacity=64,
                summary_tokens=16, train_segments=0, truncation=2, remat_segments=True)


def streaming_options(model_config) -> ml_collections.ConfigDict:
  """config.model.streaming with defaults for keys an older config.json lacks."""
  given = model_config.get("streaming", None)
  opts = ml_collections.ConfigDict(dict(DEFAULTS, **(given.to_dict() if given else {})))
  if opts.memory_capacity < 1 or opts.summary_tokens < 1:
    raise ConfigError("config.model.streaming.memory_capacity and summary_tokens must be >= 1.")
  return opts


class MemoryReader(nn.Module):
  """x (B, L, D) reads the bank: x + tanh(g) * CrossMemoryAttention(LN(x), bank), with
  log(bank_sizes) on the memory logits; x itself where the bank is empty. g (D,) starts at 0
  (Flamingo's tanh gate), so a fresh reader leaves a trained clip model unchanged.
  bank (B, C, D), bank_mask (B, C) bool, bank_sizes (B, C) float. O(L C D)."""
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bank, bank_mask, bank_sizes, *, deterministic=True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = CrossMemoryAttention(num_heads=self.num_heads, name="attention", **kw)(
        layer_norm("ln", **kw)(x), bank.astype(x.dtype), memory_mask=bank_mask,
        key_bias=jnp.log(jnp.maximum(bank_sizes, 1e-30)), deterministic=deterministic)
    gate = self.param("gate", partitioned(nn.initializers.zeros, ("embed",)), (x.shape[-1],),
                      self.param_dtype)
    h = jnp.tanh(gate.astype(jnp.float32)).astype(x.dtype) * h
    return x + jnp.where(bank_mask.any(1)[:, None, None], h, 0).astype(x.dtype)


class StreamingVLM(model_lib.HierarchicalVLM):
  """HierarchicalVLM with a memory bank. Methods (all jit-able, via `model.apply`):

  segment(batch, bank, bank_mask, bank_sizes) -> dict: one segment's summary (B, K, D),
    summary_mask (B, K), summary_sizes (B, K), and detection_logits (B, T', C) /
    detection_offsets (B, T', 2) read with the bank, router_logits (B, E) when built.
  video_outputs(bank, bank_mask, bank_sizes, batch, train) -> classification, qa_logits,
    caption_logits read from the bank (training outputs of HierarchicalVLM.__call__).
  video_predict(bank, bank_mask, bank_sizes, batch) -> classification_logits, qa_answer,
    qa_score, caption_tokens, caption_score (as HierarchicalVLM.predict).
  __call__ and predict on a clip batch are HierarchicalVLM's (the clip path is unchanged), and
    `model.init(rng, clip_batch)` creates every parameter, the reader's included.
  """

  def setup(self):
    super().setup()
    cfg = self.config
    self.memory_reader = MemoryReader(cfg.num_attention_heads, dtype=self.dtype,
                                      param_dtype=jnp.dtype(cfg.param_dtype))

  def segment(self, batch, bank, bank_mask, bank_sizes, *, train=False, merge_weights=None):
    enc = self.encode(batch, train=train, merge_weights=merge_weights)
    k = streaming_options(self.config).summary_tokens
    tokens = enc["tokens"]
    b, n, d = tokens.shape
    summary, summary_mask, sizes = pool_tokens(tokens, enc["token_mask"], enc["token_bias"],
                                               -(-n // k))
    out = dict(summary=pad_axis(summary, k), summary_mask=pad_axis(summary_mask, k, value=False),
               summary_sizes=pad_axis(sizes, k))
    if enc["router_logits"] is not None:
      out["router_logits"] = enc["router_logits"]
    if self.detection_head is not None:
      t = enc["time_features"].shape[1]
      steps = enc["step_tokens"].reshape(b, -1, d)
      x = jnp.concatenate([enc["time_features"].astype(steps.dtype), steps], 1)
      x = self.memory_reader(x, bank, bank_mask, bank_sizes, deterministic=not train)
      det = self.detection_head(x[:, :t], x[:, t:].reshape(enc["step_tokens"].shape),
                                deterministic=not train)
      out.update(detection_logits=det["logits"], detection_offsets=det["offsets"])
    return out

  def video_outputs(self, bank, bank_mask, bank_sizes, batch, *, train=False):
    tokens, det = bank.astype(self.dtype), not train
    bias = jnp.log(jnp.maximum(bank_sizes, 1e-30))
    out = {}
    if self.classification_head is not None:
      out["classification"] = self.classification_head(tokens, bank_sizes * bank_mask)
    if self.qa_head is not None:
      out["qa_logits"] = self.qa_head(model_lib._get(batch, "questions", "video_qa"), tokens,
                                      bank_mask, bias, deterministic=det)
    if self.caption_head is not None:
      captions = model_lib._get(batch, "caption_tokens", "captioning")
      out["caption_logits"] = self.caption_head(captions[:, :-1], tokens, bank_mask, bias,
                                                deterministic=det)
    return out

  def video_predict(self, bank, bank_mask, bank_sizes, batch):
    tokens, c = bank.astype(self.dtype), self.config.heads.captioning
    bias = jnp.log(jnp.maximum(bank_sizes, 1e-30))
    out = {}
    if self.classification_head is not None:
      out["classification_logits"] = self.classification_head(tokens, bank_sizes * bank_mask)
    if self.qa_head is not None:
      probs = jax.nn.softmax(self.qa_head(model_lib._get(batch, "questions", "video_qa"),
                                          tokens, bank_mask, bias))
      out.update(qa_answer=probs.argmax(-1).astype(jnp.int32), qa_score=probs.max(-1))
    if self.caption_head is not None:
      decoder, variables = self.caption_head.unbind()
      out["caption_tokens"], out["caption_score"] = heads_lib.generate(
          decoder, variables, tokens, bank_mask, bias, max_length=c.max_length,
          beam_size=c.beam_size, alpha=c.length_penalty)
    return out

  def __call__(self, batch, *, train=False, merge_weights=None):
    out = super().__call__(batch, train=train, merge_weights=merge_weights)
    if self.is_initializing() and self.detection_head is not None:
      # `model.init(rng, clip_batch)` also creates the reader's parameters (output unused).
      x = out["time_features"]
      self.memory_reader(x, *empty_bank(x.shape[0], 1, x.shape[-1]))
    return out


def build_streaming_model(config) -> StreamingVLM:
  model_lib.check_model_config(config.model)
  streaming_options(config.model)
  policy = config.training.remat_policy if config.training.gradient_checkpointing else None
  return StreamingVLM(ml_collections.FrozenConfigDict(config.model),
                      dtype=model_lib.compute_dtype(config), remat_policy=policy)


def trains_with_memory(config) -> bool:
  """config.model.streaming.train_segments > 0: the trainer uses `streaming_loss`."""
  return streaming_options(config.model).train_segments > 0


def build_model(config) -> model_lib.HierarchicalVLM:
  """The model a config asks for: StreamingVLM when model.streaming is enabled or trains with
  memory (on clips it is HierarchicalVLM), else HierarchicalVLM."""
  opts = streaming_options(config.model)
  if opts.enabled or opts.train_segments > 0:
    return build_streaming_model(config)
  return model_lib.build_model(config)


def add_memory_params(params, streaming_params):
  """A HierarchicalVLM params tree completed with the streaming-only subtrees (fresh ones from
  `streaming_params`, e.g. an init of the StreamingVLM); existing entries are kept as they are.
  With a fresh reader (gate 0) the per-segment outputs are the clip model's."""
  out = dict(params)
  for key, value in streaming_params.items():
    out.setdefault(key, value)
  return out


# ----- the bank ------------------------------------------------------------------------------
def empty_bank(batch_size: int, capacity: int, width: int):
  """(bank (B, C, D) float32 zeros, mask (B, C) False, sizes (B, C) zeros)."""
  return (jnp.zeros((batch_size, capacity, width), jnp.float32),
          jnp.zeros((batch_size, capacity), bool), jnp.zeros((batch_size, capacity), jnp.float32))


def _append(bank, seg):
  return (jnp.concatenate([bank[0], seg["summary"].astype(jnp.float32)], 1),
          jnp.concatenate([bank[1], seg["summary_mask"]], 1))


def _append_sizes(bank, seg):
  return jnp.concatenate([bank[2], seg["summary_sizes"].astype(jnp.float32)], 1)


def update_bank(bank, seg, capacity: int, valid):
  """Bank after a segment: its summary appended and compressed to `capacity` (MA-LMM), where
  `valid` (B,) says the segment exists; unchanged elsewhere. Cost O(K (C + K) D)."""
  new = compress_memory(*_append(bank, seg), capacity, _append_sizes(bank, seg))
  return tuple(jnp.where(valid.reshape((-1,) + (1,) * (o.ndim - 1)), n, o)
               for n, o in zip(new, bank))


def _batch_size(batch) -> int:
  return (batch["features"] if "features" in batch else batch["video"]).shape[0]


# ----- inference: one compiled step per segment ----------------------------------------------
def init_state(model: StreamingVLM, batch_size: int, num_steps: int) -> dict:
  """Streaming state of B videos: the bank, detection stitching, router logits summed."""
  cfg, opts = model.config, streaming_options(model.config)
  bank = empty_bank(batch_size, opts.memory_capacity, cfg.hidden_size)
  state = dict(bank=bank[0], bank_mask=bank[1], bank_sizes=bank[2],
               segments=jnp.zeros((batch_size,), jnp.int32))
  if "action_detection" in cfg.heads.tasks:
    d = cfg.heads.detection
    state["detection"] = detection_state(batch_size, num_steps, cfg.heads.num_classes,
                                         window=max(d.smoothing_window, 1),
                                         pre_nms_top_k=d.pre_nms_top_k)
    state["detection_loss"] = jnp.zeros((4,), jnp.float32)  # Sums: cls, reg, hits, positives.
  if model_lib.uses_router(cfg):
    state["router_sum"] = jnp.zeros((batch_size, cfg.domain_modules.num_domains), jnp.float32)
  return state


def segment_step(model: StreamingVLM, variables, state: dict, batch: dict,
                 merge_weights=None) -> dict:
  """One segment of B videos (hvlm_jax/data/segments.py schema: video or features, step_times
  (B, T'), step_duration, duration, segment_valid (B,), domain) -> the next state."""
  bank = (state["bank"], state["bank_mask"], state["bank_sizes"])
  seg = model.apply(variables, batch, *bank, merge_weights=merge_weights,
                    method=StreamingVLM.segment)
  valid = batch["segment_valid"]
  new = update_bank(bank, seg, streaming_options(model.config).memory_capacity, valid)
  state = dict(state, bank=new[0], bank_mask=new[1], bank_sizes=new[2],
               segments=state["segments"] + valid.astype(jnp.int32))
  if "detection" in state:
    step_valid = valid[:, None] & (batch["step_times"] < batch["duration"][:, None])
    state["detection"] = detection_update(
        state["detection"], seg["detection_logits"], seg["detection_offsets"],
        batch["step_times"], batch["step_duration"], batch["duration"], step_valid,
        window=max(model.config.heads.detection.smoothing_window, 1))
    if "action_targets" in batch:
      state["detection_loss"] = state["detection_loss"] + _detection_loss_sums(
          seg, batch, model.config.heads.detection)
  if "router_sum" in state:
    state["router_sum"] = state["router_sum"] + jnp.where(
        valid[:, None], jax.nn.log_softmax(seg["router_logits"].astype(jnp.float32)), 0.0)
  return state


def _detection_loss_sums(seg, batch, d):
  """`detection_loss` of one segment as unnormalised sums (cls, reg, hits, positive steps), so
  that their totals over segments normalise by the video's positives as on one timeline."""
  mask = batch["segment_valid"]
  det = heads_lib.detection_loss(
      seg["detection_logits"], seg["detection_offsets"], batch, loss=d.loss,
      focal_alpha=d.focal_alpha, focal_gamma=d.focal_gamma, regression_loss=d.regression_loss,
      regression_weight=d.regression_weight, mask=mask)
  present = (batch["action_mask"] & mask)[:, None]
  pos = ((batch["action_targets"].max(-1) > 0) & present).sum().astype(jnp.float32)
  n = jnp.maximum(pos, 1.0)
  return jnp.stack([det["cls"] * n, det["reg"] * n, det["accuracy"] * n, pos])


def finish_losses(model: StreamingVLM, variables, state: dict, batch: dict, config):
  """Evaluation losses of streamed videos: `compute_losses` of the video heads on the bank
  (teacher-forced captions) plus the detection loss summed over every segment (segment
  batches with action_targets). Returns (total, metrics) as `compute_losses`."""
  outputs = model.apply(variables, state["bank"], state["bank_mask"], state["bank_sizes"], batch,
                        method=StreamingVLM.video_outputs)
  total, metrics = model_lib.compute_losses(outputs, batch, config)
  if "detection_loss" in state:
    cls, reg, hits, pos = state["detection_loss"]
    n, d = jnp.maximum(pos, 1.0), config.model.heads.detection
    det = (cls + d.regression_weight * reg) / n
    total = total + config.training.loss_weights.action_detection * det
    metrics.update(action_detection_loss=det, action_detection_cls_loss=cls / n,
                   action_detection_reg_loss=reg / n, action_detection_accuracy=hits / n,
                   loss=total)
  return total, metrics


def finish(model: StreamingVLM, variables, state: dict, batch: dict) -> dict:
  """After the last segment: HierarchicalVLM.predict's outputs for the whole videos. `batch`
  holds the video-level fields (questions, domain); detections are in video seconds."""
  out = model.apply(variables, state["bank"], state["bank_mask"], state["bank_sizes"], batch,
                    method=StreamingVLM.video_predict)
  if "detection" in state:
    d = model.config.heads.detection
    decoded = detection_finish(state["detection"], window=max(d.smoothing_window, 1),
                               nms_threshold=d.nms_threshold, max_detections=d.max_detections,
                               min_score=d.min_score)
    out.update({f"detection_{k}": v for k, v in decoded.items()})
  if "domain" in batch:
    out["domain"] = batch["domain"]
  if "router_sum" in state:
    out["router_domain"] = state["router_sum"].argmax(-1).astype(jnp.int32)
  return out
