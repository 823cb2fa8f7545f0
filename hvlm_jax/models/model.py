"""HierarchicalVLM: router -> video encoder (domain LoRA) -> domain experts -> task heads.

`build_model(config)` turns the `config.model` section into a linen module.
  model.apply(variables, batch, train=bool, rngs=...) -> outputs dict (training / losses);
  model.apply(variables, batch, method=HierarchicalVLM.predict) -> prediction arrays;
  compute_losses(outputs, batch, config) -> (total, metrics dict of scalars).

Data flow (one pass): the DomainRouter (if configured) reads a thumbnail stem of the input
and gives domain logits; the domain used by LoRA and hard experts is batch["domain"], or the
router's argmax at inference when model.domain_modules.use_router_for_lora is set (the router
runs before the encoder for exactly this). The encoder gives tokens (B, N, D) (merged, if
token merging is on) with token_mask, and time_features (B, T', D) on the full time grid.
DomainExperts refine both. Heads: classification (attention pooling) and QA / captioning
(cross-attention) read the tokens; action detection reads time_features plus an attention
pooling of each time step's grid tokens (merged tokens unmerged onto the grid).

Outputs of __call__ (present when their task / module is configured):
  time_features (B, T', D); domain (B,) int32 used; router_logits (B, E);
  classification (B, C); detection_logits (B, T', C); detection_offsets (B, T', 2) in step
  units; qa_logits (B, Q, A); caption_logits (B, Lc - 1, V).
Outputs of predict:
  domain (B,); router_domain (B,); classification_logits (B, C);
  detection_{start,end,score} (B, K) float32 seconds / score, detection_label (B, K) int32,
  detection_valid (B, K) bool (see heads.detection.detections_as_lists);
  qa_answer (B, Q) int32 answer ids, qa_score (B, Q) probability;
  caption_tokens (B, L) int32 word ids (eos included when produced, pad after), caption_score.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from hvlm_jax.config import ConfigError
from hvlm_jax.models import attention as attention_lib
from hvlm_jax.models import heads as heads_lib
from hvlm_jax.models.domain.experts import (ROUTING_MODES, DomainExperts, DomainRouter,
                                            router_losses, routing_weights)
from hvlm_jax.models.domain.lora import TARGETS, LoRASpec
from hvlm_jax.models.encoder import (ARCHITECTURE_KEYS, CHANNEL_ORDERS, GELUS, MOTION_INPUTS,
                                     POOLINGS, POSITION_EMBEDDINGS, STEM_NORMS,
                                     STEMS, VideoEncoder, encoder_architecture,
                                     scan_layers_error)
from hvlm_jax.models.layers import ABSENT_QKV_BIASES, dense
from hvlm_jax.models.token_merging import MergingSpec
from hvlm_jax.models.token_merging.merging import unmerge_to_grid

TASKS = ("classification", "action_detection", "video_qa", "captioning")


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  """bfloat16 under training.mixed_precision, else config.model.dtype."""
  if config.training.get("mixed_precision", False):
    return jnp.bfloat16
  return jnp.dtype(config.model.dtype)


def lora_spec(model_config) -> LoRASpec | None:
  lora = model_config.domain_modules.lora
  if not lora.enabled:
    return None
  return LoRASpec(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                  num_domains=model_config.domain_modules.num_domains,
                  targets=tuple(lora.targets))


def attention_options(model_config) -> tuple[tuple[str, Any], ...]:
  """The options of the configured attention type, as a hashable tuple of items.

  `model.attention_dropout_rate` > 0 becomes the type's `dropout_rate` (dropout on attention
  probabilities); types without explicit probabilities (linear, performer, mamba) refuse it.
  """
  att = model_config.attention
  options = dict(att.get(att.type, {}))
  if "causal" in att and att.causal:
    options["causal"] = True
  rate = float(model_config.get("attention_dropout_rate", 0.0))
  if rate > 0:
    cls = attention_lib.REGISTRY[att.type]
    if "dropout_rate" not in {f.name for f in dataclasses.fields(cls)}:
      raise ConfigError(
          f"config.model.attention_dropout_rate={rate} needs attention probabilities, which "
          f"config.model.attention.type={att.type!r} does not form; set it to 0.")
    options["dropout_rate"] = rate
  return tuple(sorted(options.items()))


def uses_router(model_config) -> bool:
  """The router is built when asked for, or when soft / top-k experts or LoRA need it."""
  dm = model_config.domain_modules
  return bool(dm.router.enabled or dm.use_router_for_lora or
              (dm.experts.enabled and dm.router.mode != "hard"))


def check_model_config(model_config) -> None:
  """Raises ConfigError naming the key for values the heads and domain modules reject."""
  h, dm = model_config.heads, model_config.domain_modules
  unknown = [t for t in h.tasks if t not in TASKS]
  if unknown or not h.tasks:
    raise ConfigError(f"config.model.heads.tasks={tuple(h.tasks)} must be a non-empty subset "
                      f"of {TASKS}.")
  if dm.router.mode not in ROUTING_MODES:
    raise ConfigError(f"config.model.domain_modules.router.mode={dm.router.mode!r} is not one "
                      f"of {ROUTING_MODES}.")
  if dm.router.mode == "top_k" and not 1 <= dm.router.top_k <= dm.num_domains:
    raise ConfigError(f"config.model.domain_modules.router.top_k={dm.router.top_k} must be in "
                      f"[1, num_domains={dm.num_domains}].")
  if (h.get("token_shape", {}).get("enabled", False)
      and model_config.get("streaming", {}).get("train_segments", 0) > 0):
    raise ConfigError("config.model.heads.token_shape needs single-clip training; turn it off "
                      "or set config.model.streaming.train_segments=0.")
  heads = text_heads(model_config)
  if model_config.hidden_size % heads:
    raise ConfigError(f"config.model.hidden_size={model_config.hidden_size} is not divisible "
                      f"by config.model.heads.text.num_heads={heads}.")


def check_encoder_config(model_config, video_config) -> None:
  """Encoder keys against each other and the clip shape (config.data.video); ConfigError
  naming the key."""
  if model_config.hidden_size % model_config.num_attention_heads:
    raise ConfigError(
        f"config.model.hidden_size={model_config.hidden_size} is not divisible by "
        f"config.model.num_attention_heads={model_config.num_attention_heads}.")
  motion = tuple(model_config.get("motion_input", ()))
  if any(m not in MOTION_INPUTS for m in motion) or len(set(motion)) != len(motion):
    raise ConfigError(f"config.model.motion_input={motion!r} must list distinct streams out of "
                      f"{', '.join(MOTION_INPUTS)}.")
  if len(tuple(model_config.tubelet_size)) != 3 or min(model_config.tubelet_size) < 1:
    raise ConfigError(f"config.model.tubelet_size={tuple(model_config.tubelet_size)} must be "
                      "three positive sizes (time, height, width).")
  error = scan_layers_error(model_config.get("scan_layers", "auto"), model_config.attention.type,
                            MergingSpec.from_config(model_config.token_merging) is not None)
  if error:
    raise ConfigError(error)
  t, p, q = model_config.tubelet_size
  stem = model_config.get("stem", "patch")
  if stem not in STEMS:
    raise ConfigError(f"config.model.stem={stem!r} is not one of {', '.join(STEMS)}.")
  if stem != "patch" and (p & (p - 1) or p < 2):
    raise ConfigError(f"config.model.stem={stem!r} needs a power-of-two patch size; got "
                      f"config.model.tubelet_size[1]={p}.")
  if model_config.get("stem_norm", "layer") not in STEM_NORMS:
    raise ConfigError(f"config.model.stem_norm={model_config.stem_norm!r} is not one of "
                      f"{', '.join(STEM_NORMS)}.")
  for key, low in (("stem_width", 0), ("stem_depth", 1), ("stem_fold", 1)):
    value = model_config.get(key, low)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ConfigError(f"config.model.{key}={value!r} must be an integer >= {low}.")
  if 0 < model_config.get("stem_width", 0) < 4:
    raise ConfigError(f"config.model.stem_width={model_config.stem_width} must be 0 "
                      "(automatic) or at least 4 (GroupNorm groups of 4 channels).")
  fold = model_config.get("stem_fold", 1)
  if stem != "patch" and (fold & (fold - 1) or fold > p // 2):
    raise ConfigError(f"config.model.stem_fold={fold} must be a power of two below the patch "
                      f"size config.model.tubelet_size[1]={p}.")
  frames, size = video_config.num_frames, video_config.frame_size
  if frames < 1 or frames % t:
    raise ConfigError(f"config.data.video.num_frames={frames} is not a positive multiple of "
                      f"the temporal tubelet size config.model.tubelet_size[0]={t}.")
  if size < 1 or size % p or p != q:
    raise ConfigError(f"config.data.video.frame_size={size} must be a positive multiple of a "
                      f"square spatial tubelet config.model.tubelet_size[1:]=({p}, {q}).")
  for key in ("dtype", "param_dtype"):
    if model_config[key] not in ("float32", "bfloat16", "float16"):
      raise ConfigError(f"config.model.{key}={model_config[key]!r} is not float32, bfloat16 or "
                        "float16.")
  for key in ("dropout_rate", "attention_dropout_rate"):
    if not 0.0 <= model_config.get(key, 0.0) < 1.0:
      raise ConfigError(f"config.model.{key}={model_config[key]} must be in [0, 1).")
  lora = model_config.domain_modules.lora
  unknown = sorted(set(lora.targets) - set(TARGETS))
  if unknown or lora.rank < 1:
    raise ConfigError(f"config.model.domain_modules.lora: targets {unknown} unknown or rank "
                      f"{lora.rank} < 1; targets are {', '.join(TARGETS)}.")
  check_architecture_keys(model_config)
  h = model_config.heads
  choices = (("classification_pooling", h.classification_pooling, CLASSIFICATION_POOLINGS),
             ("detection.loss", h.detection.loss, ("focal", "bce")),
             ("detection.regression_loss", h.detection.regression_loss, ("diou", "l1")))
  for key, value, allowed in choices:
    if value not in allowed:
      raise ConfigError(f"config.model.heads.{key}={value!r} is not one of "
                        f"{', '.join(allowed)}.")
  if h.classification_pooling == "encoder" and model_config.get("pooling", "none") == "none":
    raise ConfigError("config.model.heads.classification_pooling='encoder' needs the "
                      "encoder's pooled output: set config.model.pooling to mean or cls.")
  attention_options(model_config)  # attention_dropout_rate against the attention type.


# config.model.heads.classification_pooling; "encoder": the encoder's pooled output
# (config.model.pooling) straight into the logits layer (HF ...ForVideoClassification).
CLASSIFICATION_POOLINGS = ("attention", "mean", "encoder")


def check_architecture_keys(model_config) -> None:
  """The encoder architecture keys (encoder.ARCHITECTURE_KEYS; absent keys take their
  defaults); ConfigError naming the key and the allowed values."""
  arch = {key: model_config.get(key, default)
          for key, (_, default) in ARCHITECTURE_KEYS.items()}
  choices = (("position_embedding", POSITION_EMBEDDINGS), ("qkv_bias", ABSENT_QKV_BIASES),
             ("gelu", GELUS), ("pooling", POOLINGS), ("pixel_channel_order", CHANNEL_ORDERS))
  for key, allowed in choices:
    if arch[key] not in allowed:
      raise ConfigError(f"config.model.{key}={arch[key]!r} is not one of "
                        f"{', '.join(allowed)}.")
  for key in ("cls_token", "final_norm"):
    if not isinstance(arch[key], bool):
      raise ConfigError(f"config.model.{key}={arch[key]!r} must be True or False.")
  if arch["pooling"] == "cls" and not arch["cls_token"]:
    raise ConfigError("config.model.pooling='cls' needs config.model.cls_token=True "
                      "(or pooling mean or none).")
  for key in ("layer_norm_epsilon", "pool_norm_epsilon"):
    value = arch[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
      raise ConfigError(f"config.model.{key}={value!r} must be a number in (0, 1).")
  for key, low in (("pixel_mean", -math.inf), ("pixel_std", 0.0)):
    value = arch[key]
    ok = isinstance(value, (tuple, list)) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        and v > low for v in value)
    if not ok:
      raise ConfigError(f"config.model.{key}={value!r} must be three finite numbers (R, G, B "
                        f"on [0, 1] pixels){', each > 0' if low == 0 else ''}.")


def text_heads(model_config) -> int:
  return model_config.heads.text.num_heads or model_config.num_attention_heads


def build_encoder(cfg, dtype=jnp.float32, remat_policy: str | None = None,
                  **overrides) -> VideoEncoder:
  """The VideoEncoder of `config.model` (`cfg`); shared by HierarchicalVLM and the masked-video
  pretraining model, so both name and shape the encoder's parameters identically."""
  flow = cfg.token_merging.flow
  kwargs = dict(
      hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
      num_heads=cfg.num_attention_heads, mlp_dim=cfg.mlp_dim,
      tubelet_size=tuple(cfg.tubelet_size), attention_type=cfg.attention.type,
      attention_options=attention_options(cfg), dropout_rate=cfg.dropout_rate,
      lora=lora_spec(cfg), remat_policy=remat_policy,
      scan_layers=cfg.get("scan_layers", "auto"),
      token_merging=MergingSpec.from_config(cfg.token_merging),
      motion_input=tuple(cfg.get("motion_input", ())), stem=str(cfg.get("stem", "patch")),
      stem_norm=str(cfg.get("stem_norm", "layer")),
      stem_width=int(cfg.get("stem_width", 0)), stem_depth=int(cfg.get("stem_depth", 1)),
      stem_fold=int(cfg.get("stem_fold", 1)),
      flow_options=tuple(sorted(dict(
          levels=int(flow.levels), iterations=int(flow.iterations),
          window_sigma=float(flow.window_sigma)).items())),
      flow_cells_per_token=int(flow.cells_per_token), dtype=dtype,
      param_dtype=jnp.dtype(cfg.param_dtype),
      **encoder_architecture(cfg))  # Absent keys (an old config.json): today's encoder.
  kwargs.update(overrides)
  return VideoEncoder(**kwargs)


class HierarchicalVLM(nn.Module):
  """The full model; `config` is the frozen `config.model` section."""
  config: ml_collections.FrozenConfigDict
  dtype: Any = jnp.float32
  remat_policy: str | None = None

  def setup(self):
    cfg = self.config
    check_model_config(cfg)
    kw = dict(dtype=self.dtype, param_dtype=jnp.dtype(cfg.param_dtype))
    d, dm, h = cfg.hidden_size, cfg.domain_modules, cfg.heads
    self.encoder = build_encoder(cfg, self.dtype, self.remat_policy)
    self.domain_router = (DomainRouter(dm.num_domains, dm.router.hidden_size,
                                       dm.router.pool_size, **kw) if uses_router(cfg) else None)
    self.domain_experts = None
    if dm.experts.enabled:
      top_k = dict(hard=1, top_k=dm.router.top_k, soft=0)[dm.router.mode]
      self.domain_experts = DomainExperts(dm.num_domains, dm.experts.mlp_dim or cfg.mlp_dim,
                                          top_k=top_k, dropout_rate=dm.experts.dropout_rate,
                                          **kw)
    text = dict(hidden_size=d, num_heads=text_heads(cfg), mlp_dim=h.text.mlp_dim or cfg.mlp_dim,
                dropout_rate=h.text.dropout_rate, **kw)
    tasks = tuple(h.tasks)
    self.classification_head = (heads_lib.ClassificationHead(
        h.num_classes, pooling=h.classification_pooling, num_heads=text["num_heads"], **kw)
        if "classification" in tasks else None)
    self.detection_head = (heads_lib.DetectionHead(
        h.num_classes, num_heads=text["num_heads"], num_layers=h.detection.num_layers,
        kernel_size=h.detection.kernel_size, dropout_rate=cfg.dropout_rate, **kw)
        if "action_detection" in tasks else None)
    self.qa_head = (heads_lib.QAHead(h.num_answers, h.vocab_size, num_layers=h.qa.num_layers,
                                     pool_video=h.qa.get("pool_video", True), **text)
                    if "video_qa" in tasks else None)
    self.caption_head = (heads_lib.CaptionDecoder(h.vocab_size, num_layers=h.captioning.num_layers,
                                                  **text) if "captioning" in tasks else None)
    # Auxiliary training target: which shape (or background) each grid token shows.
    ts = h.get("token_shape", {})
    self.token_shape_head = (dense(int(ts.get("num_classes", 4)), ("embed", "vocab"),
                                   name="token_shape_head", **kw)
                             if ts.get("enabled", False) else None)

  def encode(self, batch: dict, *, train: bool = False, merge_weights=None) -> dict:
    """Router, encoder and experts: tokens, token_mask, time_features, domain, router_logits.

    merge_weights: optional (2,) float (motion, saliency) runtime weights of token merging
    (traced: the progressive schedule changes them without recompiling).
    """
    dm = self.config.domain_modules
    inputs = batch["features"] if "features" in batch else batch["video"]
    router_logits = None
    if self.domain_router is not None:
      router_logits = self.domain_router(inputs, deterministic=not train)
    domain = batch.get("domain")
    if router_logits is not None and dm.use_router_for_lora and not train:
      domain = router_logits.argmax(-1).astype(jnp.int32)
    needs_domain = dm.lora.enabled or (dm.experts.enabled and dm.router.mode == "hard")
    if domain is None and needs_domain:
      raise ValueError("The batch has no 'domain' ids, which LoRA / hard experts need; set "
                       "config.model.domain_modules.use_router_for_lora=True to infer them.")
    enc = self.encoder(inputs, domain=domain if dm.lora.enabled else None,
                       deterministic=not train, merge_weights=merge_weights)
    tokens, time_features = enc["tokens"], enc["time_features"]
    if self.domain_experts is not None:
      weights = routing_weights(router_logits, dm.router.mode, domain=domain,
                                top_k=dm.router.top_k, num_domains=dm.num_domains)
      n = tokens.shape[1]
      x = jnp.concatenate([tokens, time_features.astype(tokens.dtype)], axis=1)
      x = self.domain_experts(x, weights, deterministic=not train)
      tokens, time_features = x[:, :n], x[:, n:]
    # Merged tokens count by the grid positions they cover: size-weighted pooling (= grid
    # mean) and log(size) on the heads' cross-attention logits (ToMe proportional attention).
    weights = enc["token_mask"].astype(jnp.float32)
    bias = None
    if "sizes" in enc:
      weights = weights * enc["sizes"]
      bias = jnp.log(jnp.maximum(enc["sizes"], 1e-6))
    # The detection head pools each time step's grid tokens (unmerged onto the full grid).
    full = unmerge_to_grid(tokens, enc["assignment"]) if "assignment" in enc else tokens
    step_tokens = full.reshape(full.shape[0], *enc["grid"], full.shape[-1])
    return dict(tokens=tokens, token_mask=enc["token_mask"], token_weights=weights,
                token_bias=bias, time_features=time_features, step_tokens=step_tokens,
                domain=domain, router_logits=router_logits, pooled=enc.get("pooled"))

  def classify(self, enc: dict):
    """Classification logits (B, C) from encode()'s output: the encoder's pooled output with
    heads.classification_pooling="encoder", else the head pools the tokens."""
    if self.config.heads.classification_pooling == "encoder":
      return self.classification_head(enc["pooled"], None)
    return self.classification_head(enc["tokens"], enc["token_weights"])

  def __call__(self, batch: dict[str, jax.Array], *, train: bool = False,
               merge_weights=None) -> dict:
    enc = self.encode(batch, train=train, merge_weights=merge_weights)
    det = not train
    tokens, mask, bias = enc["tokens"], enc["token_mask"], enc["token_bias"]
    out = dict(time_features=enc["time_features"])
    for key in ("domain", "router_logits"):
      if enc[key] is not None:
        out[key] = enc[key]
    if self.classification_head is not None:
      out["classification"] = self.classify(enc)
    if self.detection_head is not None:
      d = self.detection_head(enc["time_features"], enc["step_tokens"], deterministic=det)
      out.update(detection_logits=d["logits"], detection_offsets=d["offsets"])
    if self.qa_head is not None:
      out["qa_logits"] = self.qa_head(_get(batch, "questions", "video_qa"), tokens, mask, bias,
                                      deterministic=det)
    if self.caption_head is not None:
      captions = _get(batch, "caption_tokens", "captioning")
      out["caption_logits"] = self.caption_head(captions[:, :-1], tokens, mask, bias,
                                                deterministic=det)
    if self.token_shape_head is not None:  # On every grid position (merged tokens unmerged).
      grid = enc["step_tokens"]
      out["token_shape_logits"] = self.token_shape_head(
          grid.reshape(grid.shape[0], -1, grid.shape[-1])).astype(jnp.float32)
    return out

  def predict(self, batch: dict[str, jax.Array], *, merge_weights=None) -> dict:
    """Inference for the evaluator (jit-able; see the module docstring for the outputs)."""
    h = self.config.heads
    enc = self.encode(batch, train=False, merge_weights=merge_weights)
    tokens, mask, bias = enc["tokens"], enc["token_mask"], enc["token_bias"]
    out = {}
    if enc["domain"] is not None:
      out["domain"] = enc["domain"]
    if enc["router_logits"] is not None:
      out["router_domain"] = enc["router_logits"].argmax(-1).astype(jnp.int32)
    if self.classification_head is not None:
      out["classification_logits"] = self.classify(enc)
    if self.detection_head is not None:
      d = self.detection_head(enc["time_features"], enc["step_tokens"])
      cfg = h.detection
      decoded = heads_lib.decode_detections(
          d["logits"], d["offsets"], _get(batch, "step_times", "action_detection"),
          _get(batch, "step_duration", "action_detection"), batch.get("duration"),
          window=cfg.smoothing_window, nms_threshold=cfg.nms_threshold,
          pre_nms_top_k=cfg.pre_nms_top_k, max_detections=cfg.max_detections,
          min_score=cfg.min_score)
      out.update({f"detection_{k}": v for k, v in decoded.items()})
    if self.qa_head is not None:
      probs = jax.nn.softmax(self.qa_head(_get(batch, "questions", "video_qa"), tokens, mask,
                                          bias))
      out.update(qa_answer=probs.argmax(-1).astype(jnp.int32), qa_score=probs.max(-1))
    if self.caption_head is not None:
      decoder, variables = self.caption_head.unbind()
      c = h.captioning
      out["caption_tokens"], out["caption_score"] = heads_lib.generate(
          decoder, variables, tokens, mask, bias, max_length=c.max_length, beam_size=c.beam_size,
          alpha=c.length_penalty)
    return out


def _get(batch, key, task):
  if key not in batch:
    raise KeyError(f"config.model.heads.tasks includes {task!r} but the batch has no {key!r}.")
  return batch[key]


def build_model(config: ml_collections.ConfigDict) -> HierarchicalVLM:
  check_model_config(config.model)
  policy = config.training.remat_policy if config.training.gradient_checkpointing else None
  return HierarchicalVLM(ml_collections.FrozenConfigDict(config.model),
                         dtype=compute_dtype(config), remat_policy=policy)


def compute_losses(outputs: dict, batch: dict, config) -> tuple[jax.Array, dict]:
  """Weighted sum of the task (and router) losses present in `outputs`; (total, metrics).

  Each task averages over the examples (or QA pairs, caption tokens, positive steps) its
  mask marks present, and'ed with batch["valid"] when given; a batch where a task is absent
  everywhere contributes 0 to it. Weights: config.training.loss_weights.
  """
  w, h = config.training.loss_weights, config.model.heads
  valid = batch.get("valid")
  present = lambda m: m if valid is None else m & valid.reshape(  # noqa: E731
      valid.shape + (1,) * (m.ndim - 1))
  metrics, total = {}, jnp.zeros((), jnp.float32)

  def add(task, loss, acc):
    nonlocal total
    metrics[f"{task}_loss"], metrics[f"{task}_accuracy"] = loss, acc
    total = total + w[task] * loss

  if "classification" in outputs:
    add("classification", *heads_lib.classification_loss(
        outputs["classification"], batch["label"], present(batch["label_mask"])))
  if "detection_logits" in outputs:
    d = h.detection
    det = heads_lib.detection_loss(
        outputs["detection_logits"], outputs["detection_offsets"], batch, loss=d.loss,
        focal_alpha=d.focal_alpha, focal_gamma=d.focal_gamma,
        regression_loss=d.regression_loss, regression_weight=d.regression_weight, mask=valid)
    add("action_detection", det["total"], det["accuracy"])
    metrics.update(action_detection_cls_loss=det["cls"], action_detection_reg_loss=det["reg"])
  if "qa_logits" in outputs:
    add("video_qa", *heads_lib.qa_loss(outputs["qa_logits"], batch["answers"],
                                       present(batch["qa_mask"])))
  if "caption_logits" in outputs:
    add("captioning", *heads_lib.caption_loss(
        outputs["caption_logits"], batch["caption_tokens"], present(batch["caption_mask"]),
        label_smoothing=h.captioning.label_smoothing))
  if "token_shape_logits" in outputs:
    if "token_shapes" not in batch:
      raise KeyError("config.model.heads.token_shape is enabled but the batch has no "
                     "'token_shapes'.")
    labels = batch["token_shapes"]
    known = present(labels >= 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(outputs["token_shape_logits"],
                                                         jnp.maximum(labels, 0))
    n = jnp.maximum(known.sum(), 1)
    right = outputs["token_shape_logits"].argmax(-1) == labels
    add("token_shape", (ce * known).sum() / n, (right & known).sum() / n)
  if "router_logits" in outputs:
    supervised = config.model.domain_modules.router.supervised
    labels = batch.get("domain") if supervised else None
    r = router_losses(outputs["router_logits"], labels, valid)
    metrics.update(r)
    if labels is not None:
      total = total + w.get("router", 0.0) * r["router_ce_loss"]
    else:
      total = total + w.get("router_balance", 0.0) * r["router_balance_loss"]
  metrics["loss"] = total
  return total, metrics
