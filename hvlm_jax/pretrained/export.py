"""Export an hvlm-jax encoder (one domain's LoRA adapters merged in) as a Hugging Face
checkpoint directory: config.json, model.safetensors, preprocessor_config.json.

The same name table as the import (hf.encoder_table), run backwards, so an import of the
export gives back the same parameters. VideoMAE needs the encoder built the VideoMAE way
(sinusoidal positions, no CLS, q/v or no projection biases), ViViT the ViViT way (joint
positions with a CLS token, final LayerNorm); anything else is refused naming the key.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
from safetensors.numpy import save_file

from hvlm_jax.models.domain.lora import ADAPTER_NAMES, merge_lora
from hvlm_jax.pretrained import hf
from hvlm_jax.pretrained.hf import PretrainedError
from hvlm_jax.pretrained.load import _config_value, _subtree

ACT_BY_GELU = {"exact": "gelu", "tanh": "gelu_fast"}
# Architecture keys each model type fixes, and the values it can express.
EXPRESSIBLE = {
    "videomae": {"model.position_embedding": ("sinusoidal",), "model.cls_token": (False,),
                 "model.qkv_bias": ("qv", "none"), "model.stem": ("patch",),
                 "model.motion_input": ((),), "model.pixel_channel_order": ("rgb",)},
    "vivit": {"model.position_embedding": ("joint",), "model.cls_token": (True,),
              "model.qkv_bias": ("qkv", "none"), "model.final_norm": (True,),
              "model.stem": ("patch",), "model.motion_input": ((),),
              "model.pixel_channel_order": ("rgb",)},
}


def _drop_adapters(tree):
  if not hasattr(tree, "items"):
    return tree
  return {k: _drop_adapters(v) for k, v in tree.items() if k not in ADAPTER_NAMES}


def _architecture(config, model_type: str) -> dict:
  keys = ("model.hidden_size", "model.num_layers", "model.num_attention_heads",
          "model.mlp_dim", "model.tubelet_size", "model.layer_norm_epsilon", "model.gelu",
          "model.qkv_bias", "model.position_embedding", "model.cls_token", "model.final_norm",
          "model.pooling", "model.pixel_mean", "model.pixel_std", "model.stem",
          "model.motion_input", "model.pixel_channel_order")
  arch = {k: _config_value(config, k) for k in keys}
  arch["model.tubelet_size"] = tuple(arch["model.tubelet_size"])
  arch["model.motion_input"] = tuple(arch["model.motion_input"] or ())
  for key, allowed in EXPRESSIBLE[model_type].items():
    if arch[key] not in allowed:
      raise PretrainedError(f"config.{key}={arch[key]!r} cannot be expressed as a "
                            f"{model_type} checkpoint, which needs one of {allowed}.")
  if model_type == "videomae" and arch["model.final_norm"] == (arch["model.pooling"] == "mean"):
    raise PretrainedError(
        f"config.model.final_norm={arch['model.final_norm']} with config.model.pooling="
        f"{arch['model.pooling']!r} cannot be expressed as videomae, whose use_mean_pooling "
        "means fc_norm without a final LayerNorm and vice versa.")
  t, p, q = arch["model.tubelet_size"]
  if model_type == "videomae" and p != q:
    raise PretrainedError(f"config.model.tubelet_size={arch['model.tubelet_size']} has a "
                          "non-square patch, which videomae (one patch_size) cannot express.")
  return arch


def _hf_config(arch: dict, config, model_type: str, num_labels: int | None) -> dict:
  video = config.data.video
  t, p, q = arch["model.tubelet_size"]
  out = dict(model_type=model_type, hidden_size=arch["model.hidden_size"],
             num_hidden_layers=arch["model.num_layers"],
             num_attention_heads=arch["model.num_attention_heads"],
             intermediate_size=arch["model.mlp_dim"], hidden_act=ACT_BY_GELU[arch["model.gelu"]],
             layer_norm_eps=arch["model.layer_norm_epsilon"], image_size=video.frame_size,
             num_frames=video.num_frames, num_channels=3, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)
  if model_type == "videomae":
    out.update(patch_size=p, tubelet_size=t, qv_bias=arch["model.qkv_bias"] == "qv",
               use_mean_pooling=arch["model.pooling"] == "mean")
    name = "VideoMAEForVideoClassification" if num_labels else "VideoMAEModel"
  else:
    out.update(tubelet_size=[t, p, q], qkv_bias=arch["model.qkv_bias"] == "qkv")
    name = "VivitForVideoClassification" if num_labels else "VivitModel"
  out["architectures"] = [name]
  if num_labels:
    out["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
    out["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
  return out


def export_hf(params, config, out_dir: str, *, domain: int | None = None,
              model_type: str = "videomae") -> dict:
  """Writes `out_dir`/{config.json, model.safetensors, preprocessor_config.json}.

  `params`: a HierarchicalVLM parameter tree (or {"params": ...}) with an "encoder" subtree.
  `domain`: merge that domain's LoRA adapters (alpha from config.model.domain_modules.lora)
  into the kernels; None exports the base model (adapters dropped). A classification head
  with config.model.heads.classification_pooling="encoder" becomes HF's classifier (the
  ...ForVideoClassification model); otherwise the base model is written. Returns a report:
  {written: [tensor names], dropped: [hvlm-jax parameters with no HF place]}.
  """
  if model_type not in hf.MODEL_TYPES:
    raise PretrainedError(f"export model_type={model_type!r} is not one of "
                          f"{', '.join(hf.MODEL_TYPES)}.")
  root = params["params"] if "encoder" not in params and "params" in params else params
  arch = _architecture(config, model_type)
  tree = dict(root)
  if domain is not None:
    alpha = float(config.model.domain_modules.lora.alpha)
    tree["encoder"] = merge_lora(tree["encoder"], int(domain), alpha=alpha)
    logging.info("export_hf: merged domain %d's LoRA adapters (alpha %s)", domain, alpha)
  tree = _drop_adapters(tree)
  head = _subtree(tree, ("classification_head", "logits", "kernel"))
  pooling = _config_value(config, "model.heads.classification_pooling")
  num_labels = int(head.shape[-1]) if head is not None and pooling == "encoder" else None
  prefix = hf.BASE_PREFIX[model_type] if num_labels else ""
  table = [(prefix + e.hf, e) for e in hf.encoder_table(model_type, arch)]
  if num_labels:
    table += [(e.hf, e) for e in hf.head_table(model_type, arch)]
  tensors, written = {}, set()
  for name, entry in table:
    leaf = _subtree(tree, entry.param)
    if leaf is None:
      raise PretrainedError(f"export_hf: the parameters have no {'/'.join(entry.param)}, "
                            f"which {model_type} tensor {name} needs.")
    tensors[name] = hf.to_torch(np.asarray(jax.device_get(leaf), np.float32), entry.kind)
    written.add(entry.param)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(_hf_config(arch, config, model_type, num_labels), f, indent=2)
  processor = dict(do_rescale=True, rescale_factor=1 / 255, offset=False, do_normalize=True,
                   image_mean=list(arch["model.pixel_mean"]),
                   image_std=list(arch["model.pixel_std"]))
  with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
    json.dump(processor, f, indent=2)
  dropped = ["/".join(("encoder",) + p) for p in _leaf_paths(tree["encoder"])
             if ("encoder",) + p not in written]
  if dropped:
    logging.info("export_hf: encoder parameters with no %s place: %s", model_type, dropped)
  return dict(written=sorted(tensors), dropped=dropped)


def _leaf_paths(tree, prefix=()):
  if hasattr(tree, "items"):
    for k, v in tree.items():
      yield from _leaf_paths(v, prefix + (k,))
  else:
    yield prefix
