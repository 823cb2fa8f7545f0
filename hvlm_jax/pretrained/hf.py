"""Hugging Face video backbones: config.json -> hvlm-jax architecture keys, and the one table
that names each HF tensor's place in the encoder.

A checkpoint directory is what `save_pretrained` writes: `config.json` and `model.safetensors`
(or `model.safetensors.index.json` with shards); `preprocessor_config.json` is read when
present for the pixel normalisation. Supported `model_type`s:
  videomae  VideoMAEModel / VideoMAEForVideoClassification / VideoMAEForPreTraining (the
            decoder is ignored): fixed sinusoidal positions, q/v biases, mean pool + fc_norm.
  vivit     VivitModel / VivitForVideoClassification: CLS token, joint learned positions.
Layouts: torch Linear weights are (out, in), hvlm-jax kernels (in, out); Conv3d weights are
(out, in, t, h, w), flax Conv kernels (t, h, w, in, out). Nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np


class PretrainedError(ValueError):
  """A checkpoint that cannot be imported or exported; the message names the file and key."""


MODEL_TYPES = ("videomae", "vivit")
BASE_PREFIX = dict(videomae="videomae.", vivit="vivit.")  # Of the task models' backbone.
GELU_BY_ACT = {"gelu": "exact", "gelu_fast": "tanh", "gelu_new": "tanh",
               "gelu_pytorch_tanh": "tanh"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def read_config(path: str) -> dict:
  """config.json of checkpoint directory `path`; PretrainedError if absent or unsupported."""
  file = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise PretrainedError(f"Pretrained checkpoint directory {path} does not exist.")
  if not os.path.isfile(file):
    raise PretrainedError(f"{path} has no config.json, so it is not a Hugging Face checkpoint "
                          "directory (save_pretrained writes config.json + model.safetensors).")
  try:
    with open(file) as f:
      cfg = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise PretrainedError(f"{file} is not readable JSON: {e}.") from None
  if cfg.get("model_type") not in MODEL_TYPES:
    raise PretrainedError(f"{file}: model_type={cfg.get('model_type')!r} is not supported; "
                          f"supported: {', '.join(MODEL_TYPES)}.")
  return cfg


def _pixel_normalisation(path: str, model_type: str) -> tuple[tuple, tuple]:
  """(mean, std) on [0, 1] pixels equal to the HF image processor's rescale (+ offset) and
  normalise: x * 255 * f - offset, then (. - m) / s  ==  (x - (m + offset) / (255 f)) /
  (s / (255 f)). Defaults when no preprocessor_config.json: VideoMAE f = 1/255, ImageNet
  mean/std; ViViT f = 1/127.5 with offset 1, mean = std = 0.5 (i.e. 0.75, 0.25 here)."""
  proc = {}
  file = os.path.join(path, "preprocessor_config.json")
  if os.path.isfile(file):
    with open(file) as f:
      proc = json.load(f)
  if model_type == "vivit":
    defaults = dict(rescale_factor=1 / 127.5, offset=True, image_mean=(0.5,) * 3,
                    image_std=(0.5,) * 3)
  else:
    defaults = dict(rescale_factor=1 / 255, offset=False, image_mean=IMAGENET_MEAN,
                    image_std=IMAGENET_STD)
  get = lambda k: proc.get(k, defaults[k])  # noqa: E731
  scale = 255.0 * float(get("rescale_factor"))
  offset = 1.0 if (get("offset") if model_type == "vivit" else False) else 0.0
  as3 = lambda v: tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else (v,) * 3))  # noqa: E731
  mean = tuple(round((m + offset) / scale, 12) for m in as3(get("image_mean")))
  std = tuple(round(s / scale, 12) for s in as3(get("image_std")))
  return mean, std


def hf_grid(cfg: dict) -> tuple[int, int, int]:
  """(T', H', W') token grid the checkpoint was trained on."""
  tub = tubelet(cfg)
  size = cfg.get("image_size", 224)
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  return cfg.get("num_frames", 16) // tub[0], h // tub[1], w // tub[2]


def tubelet(cfg: dict) -> tuple[int, int, int]:
  if cfg["model_type"] == "vivit":
    return tuple(int(v) for v in cfg.get("tubelet_size", (2, 16, 16)))
  p = cfg.get("patch_size", 16)
  p = (p, p) if isinstance(p, int) else tuple(p)
  return int(cfg.get("tubelet_size", 2)), int(p[0]), int(p[1])


def hf_architecture(path: str) -> dict[str, Any]:
  """Dotted config keys (`model.*`) -> the values that reproduce checkpoint `path` exactly."""
  cfg = read_config(path)
  file, mt = os.path.join(path, "config.json"), cfg["model_type"]
  act = cfg.get("hidden_act", "gelu" if mt == "videomae" else "gelu_fast")
  if act not in GELU_BY_ACT:
    raise PretrainedError(f"{file}: hidden_act={act!r} is not supported; supported: "
                          f"{', '.join(GELU_BY_ACT)}.")
  if cfg.get("num_channels", 3) != 3:
    raise PretrainedError(f"{file}: num_channels={cfg['num_channels']} is not 3 (RGB).")
  width, heads = cfg.get("hidden_size", 768), cfg.get("num_attention_heads", 12)
  if cfg.get("head_dim", width // heads) * heads != width:
    raise PretrainedError(f"{file}: head_dim={cfg.get('head_dim')} x num_attention_heads="
                          f"{heads} != hidden_size={width}; hvlm-jax needs them equal.")
  mean, std = _pixel_normalisation(path, mt)
  arch = {
      "model.hidden_size": width,
      "model.num_layers": cfg.get("num_hidden_layers", 12),
      "model.num_attention_heads": heads,
      "model.mlp_dim": cfg.get("intermediate_size", 3072),
      "model.tubelet_size": tubelet(cfg),
      "model.stem": "patch",
      "model.motion_input": (),
      "model.gelu": GELU_BY_ACT[act],
      "model.pixel_mean": mean,
      "model.pixel_std": std,
      "model.pixel_channel_order": "rgb",
  }
  if mt == "videomae":
    mean_pool = bool(cfg.get("use_mean_pooling", True))
    arch.update({
        "model.layer_norm_epsilon": float(cfg.get("layer_norm_eps", 1e-12)),
        "model.qkv_bias": "qv" if cfg.get("qv_bias", True) else "none",
        "model.position_embedding": "sinusoidal", "model.cls_token": False,
        "model.final_norm": not mean_pool, "model.pooling": "mean" if mean_pool else "none",
        "model.pool_norm_epsilon": 1e-5})  # fc_norm is a default nn.LayerNorm.
  else:
    arch.update({
        "model.layer_norm_epsilon": float(cfg.get("layer_norm_eps", 1e-6)),
        "model.qkv_bias": "qkv" if cfg.get("qkv_bias", True) else "none",
        "model.position_embedding": "joint", "model.cls_token": True,
        "model.final_norm": True, "model.pooling": "cls"})
  return arch


# ----- the name table ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor (name without the task model's prefix) and its hvlm-jax parameter.

  kind: "linear" (torch (out, in) -> (in, out)), "conv3d" ((out, in, t, h, w) -> (t, h, w,
  in, out)), "vector" (as is), "cls" ((1, 1, D) -> (D,)), "joint_position" ((1, 1 + N, D)
  -> (1 + N, D), interpolated to the clip's grid when it differs).
  """
  hf: str
  param: tuple[str, ...]
  kind: str


def to_hvlm(array: np.ndarray, kind: str) -> np.ndarray:
  """A torch-layout tensor in hvlm-jax layout (see Entry)."""
  if kind == "linear":
    return array.T
  if kind == "conv3d":
    return array.transpose(2, 3, 4, 1, 0)
  if kind in ("cls", "joint_position"):
    return array.reshape(array.shape[1:]) if kind == "joint_position" else array.reshape(-1)
  return array


def to_torch(array: np.ndarray, kind: str) -> np.ndarray:
  """Inverse of to_hvlm."""
  if kind == "linear":
    return np.ascontiguousarray(array.T)
  if kind == "conv3d":
    return np.ascontiguousarray(array.transpose(4, 3, 0, 1, 2))
  if kind in ("cls", "joint_position"):
    return array.reshape((1, 1, -1) if kind == "cls" else (1,) + array.shape)
  return np.ascontiguousarray(array)


def torch_index(index: tuple, kind: str) -> tuple:
  """The index into the torch-layout tensor that holds hvlm-jax slice `index` (so a device's
  shard is read from the file without reading the rest)."""
  if kind == "linear":
    return index[1], index[0]
  if kind == "conv3d":
    return index[4], index[3], index[0], index[1], index[2]
  if kind == "joint_position":
    return (slice(None),) + tuple(index)
  if kind == "cls":
    return slice(None), slice(None), index[0]
  return tuple(index)


def _norm(hf: str, path: tuple[str, ...]) -> list[Entry]:
  return [Entry(f"{hf}.weight", path + ("scale",), "vector"),
          Entry(f"{hf}.bias", path + ("bias",), "vector")]


def _linear(hf: str, path: tuple[str, ...], bias: bool = True) -> list[Entry]:
  out = [Entry(f"{hf}.weight", path + ("kernel",), "linear")]
  return out + ([Entry(f"{hf}.bias", path + ("bias",), "vector")] if bias else [])


def encoder_table(model_type: str, arch: dict[str, Any]) -> list[Entry]:
  """Every backbone tensor of a `model_type` checkpoint with architecture `arch` (as
  hf_architecture returns it), names relative to the backbone, params under `encoder`."""
  enc = ("encoder",)
  qkv_bias = {"qkv": ("query", "key", "value"), "qv": ("query", "value"),
              "none": ()}[arch["model.qkv_bias"]]
  # Both families are stored in the ViT layout (save_pretrained writes ViViT's modern
  # `layers.N.attention.q_proj` names back in it; canonical_name reads either).
  table = [*_linear("embeddings.patch_embeddings.projection", enc + ("tubelet_embedding",))]
  table[0] = dataclasses.replace(table[0], kind="conv3d")
  if model_type == "vivit":
    table += [Entry("embeddings.cls_token", enc + ("cls",), "cls"),
              Entry("embeddings.position_embeddings", enc + ("position",), "joint_position")]
  layer = "encoder.layer.{i}."
  names = dict(query="attention.attention.query", key="attention.attention.key",
               value="attention.attention.value", out="attention.output.dense",
               ln_attention="layernorm_before", ln_mlp="layernorm_after",
               mlp_in="intermediate.dense", mlp_out="output.dense")
  final = "layernorm"
  for i in range(arch["model.num_layers"]):
    pre, block = layer.format(i=i), enc + (f"block_{i}",)
    for proj in ("query", "key", "value"):
      table += _linear(pre + names[proj], block + ("attention", "qkv", proj), proj in qkv_bias)
    table += _linear(pre + names["out"], block + ("attention", "out_proj", "out"))
    table += _norm(pre + names["ln_attention"], block + ("ln_attention",))
    table += _norm(pre + names["ln_mlp"], block + ("ln_mlp",))
    table += _linear(pre + names["mlp_in"], block + ("mlp", "mlp_in"))
    table += _linear(pre + names["mlp_out"], block + ("mlp", "mlp_out"))
  if arch["model.final_norm"]:
    table += _norm(final, enc + ("ln_final",))
  return table


def head_table(model_type: str, arch: dict[str, Any]) -> list[Entry]:
  """Task-model tensors outside the backbone (names as stored, no prefix)."""
  table = []
  if model_type == "videomae" and arch["model.pooling"] == "mean":
    table += _norm("fc_norm", ("encoder", "fc_norm"))
  return table + _linear("classifier", ("classification_head", "logits"))


# Tensors a checkpoint may hold that the encoder has no place for, and why.
IGNORED = (
    ("decoder.", "the VideoMAE pretraining decoder is not part of the encoder"),
    ("encoder_to_decoder.", "the VideoMAE pretraining decoder is not part of the encoder"),
    ("mask_token", "the VideoMAE pretraining mask token is only used by the decoder"),
    ("pooler.", "the ViViT tanh pooler is not used by hvlm-jax (its heads pool the tokens)"),
)

# Names of older checkpoints (hub files written before transformers 5) -> current names.
# Other spellings of a tensor -> the name in the table: VideoMAE's separate q/v biases (hub
# files written before transformers 5) and the modern ViViT module names.
ALIASES = ((".attention.attention.q_bias", ".attention.attention.query.bias"),
           (".attention.attention.v_bias", ".attention.attention.value.bias"),
           (".attention.q_proj.", ".attention.attention.query."),
           (".attention.k_proj.", ".attention.attention.key."),
           (".attention.v_proj.", ".attention.attention.value."),
           (".attention.o_proj.", ".attention.output.dense."),
           (".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense."))


def canonical_name(name: str) -> str:
  """The table's name for a stored tensor name (see ALIASES)."""
  if name.startswith("layers.") or ".layers." in name:
    name = name.replace("layers.", "encoder.layer.", 1)
  for old, new in ALIASES:
    if old in name:
      return name.replace(old, new)
  return name
