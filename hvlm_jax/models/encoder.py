"""VideoEncoder: tubelet embedding -> space-time transformer blocks -> temporal features.

ViViT-style (Arnab et al., 2021; scenic `projects/vivit`): a (t, p, p) tubelet convolution
turns a clip (B, T, H, W, C) into a (T/t) x (H/p * W/p) grid of tokens, plus factorised
position embeddings (one table over time, one over space, summed). Tokens are laid out
time-major, token index = time * P + space, so frame-local attention is a reshape.
Each pre-LN block's attention comes from `hvlm_jax.models.attention.REGISTRY` by name.

Architecture options let the same module express published backbones exactly (see
`ARCHITECTURE_KEYS` and hvlm_jax/pretrained): position embeddings `factorised` (default),
`joint` (one learned table over all tokens, ViViT) or `sinusoidal` (fixed 1-D table over all
tokens, VideoMAE); an optional CLS token (kept last in the sequence, so the grid tokens stay
time-major for frame-structured attention; position row 0 of a joint table is its own);
q/k/v biases; LayerNorm epsilon; exact or tanh GELU; a final LayerNorm or none; a pooled
output (`mean`: mean over the grid then `fc_norm`, or `cls`); per-channel pixel normalisation.

With `token_merging` (a `MergingSpec`), r_l tokens are merged before block l (ToMe-style
bipartite matching steered by optical-flow motion and saliency of the input clip, see
hvlm_jax/models/token_merging), and each block's attention gets key_bias = log(token size)
(proportional attention). Merged sequences stay sorted by anchor, so they remain time-major.
In features mode (inputs (B, T, F)) merging uses token similarity only (no pixels to take
motion or saliency from), or is skipped with `features_mode="off"`.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from hvlm_jax.models import attention as attention_lib
from hvlm_jax.models.domain.lora import LoRASpec, lora_dense
from hvlm_jax.models.layers import (ABSENT_QKV_BIASES, Dtype, layer_norm, partitioned,
                                    sinusoidal_table, without_qkv_biases)
from hvlm_jax.models.token_merging import MergingSpec
from hvlm_jax.models.token_merging import merging as merging_lib
from hvlm_jax.models.token_merging.flow import token_flow_features, token_motion
from hvlm_jax.models.token_merging.saliency import token_saliency

STEMS = ("patch", "conv", "hybrid")  # config.model.stem
# config.model.stem_norm. "layer" normalises each pixel's channels on their own; "group"
# (GroupNorm: 8 groups, or width/4) normalises over the frame and keeps the contrast between a
# flat background and an object's edge. Trained directly to name an object's shape, the demo
# encoder reaches 0.81 with "group" against 0.77 after 600 steps (one seed); the demo's shape
# answers stay at chance either way (benchmarks/appearance/README.md).
STEM_NORMS = ("layer", "group")
MOTION_INPUTS = ("difference", "flow")  # config.model.motion_input

POSITION_EMBEDDINGS = ("factorised", "joint", "sinusoidal")  # config.model.position_embedding
POOLINGS = ("none", "mean", "cls")  # config.model.pooling
GELUS = ("tanh", "exact")  # config.model.gelu
CHANNEL_ORDERS = ("rgb", "bgr")  # config.model.pixel_channel_order

# config.model key -> (VideoEncoder attribute, default). The defaults are today's ViViT-style
# encoder; model.py reads them with `encoder_architecture`.
ARCHITECTURE_KEYS = {
    "position_embedding": ("position_embedding", "factorised"),
    "cls_token": ("cls_token", False),
    "qkv_bias": ("qkv_bias", "qkv"),
    "layer_norm_epsilon": ("layer_norm_epsilon", 1e-6),
    "gelu": ("gelu", "tanh"),
    "final_norm": ("final_norm", True),
    "pooling": ("pooling", "none"),
    "pool_norm_epsilon": ("pool_norm_epsilon", 1e-5),
    "pixel_mean": ("pixel_mean", (0.45, 0.45, 0.45)),
    "pixel_std": ("pixel_std", (0.225, 0.225, 0.225)),
    "pixel_channel_order": ("pixel_channel_order", "rgb"),
}


def encoder_architecture(model_config) -> dict[str, Any]:
  """VideoEncoder keyword arguments of the architecture keys of `config.model` (absent keys
  take the defaults, so an old config builds today's encoder)."""
  out = {}
  for key, (attr, default) in ARCHITECTURE_KEYS.items():
    value = model_config.get(key, default)
    out[attr] = tuple(float(v) for v in value) if isinstance(default, tuple) else value
  return out


# Names accepted by training.remat_policy.
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
def scan_layers_mode(value) -> bool | str | None:
  """config.model.scan_layers ("auto", "true", "false", any case, or a bool) -> "auto", True or
  False; None for anything else."""
  if isinstance(value, bool):
    return value
  return {"auto": "auto", "true": True, "false": False}.get(str(value).lower())


def scan_unsupported(attention_type: str, merging: bool) -> str | None:
  """Why the encoder's blocks cannot run as one scan (VideoEncoder.scan_layers), or None."""
  if merging:
    return "token merging changes the number of tokens between blocks"
  if attention_type == "performer":
    return ("performer attention keys its fixed random features by each block's name "
            "(config.model.attention.type='performer')")
  return None


def scan_layers_error(value, attention_type: str, merging: bool) -> str | None:
  """The sentence refusing config.model.scan_layers=`value` for this encoder, or None."""
  if scan_layers_mode(value) is None:
    return f"config.model.scan_layers={value!r} must be 'auto', 'true' or 'false'."
  reason = scan_unsupported(attention_type, merging)
  if scan_layers_mode(value) is True and reason:
    return (f"config.model.scan_layers='true' cannot be used: {reason}; set it to 'auto' or "
            "'false'.")
  return None


class Mlp(nn.Module):
  """D -> mlp_dim -> GELU -> D; `mlp_in`, `mlp_out` are LoRA targets. `gelu`: "tanh" (the
  tanh approximation, HF `gelu_fast`) or "exact" (erf, HF `gelu`)."""
  mlp_dim: int
  dropout_rate: float = 0.0
  lora: LoRASpec | None = None
  gelu: str = "tanh"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, domain=None, *, deterministic=True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = lora_dense(self.mlp_dim, "mlp_in", self.lora, name="mlp_in",
                   kernel_axes=("embed", "mlp"), **kw)(x, domain, deterministic=deterministic)
    h = nn.gelu(h, approximate=self.gelu != "exact")
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    y = lora_dense(x.shape[-1], "mlp_out", self.lora, name="mlp_out",
                   kernel_axes=("mlp", "embed"), **kw)(h, domain, deterministic=deterministic)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)); x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  attention_type: str = "full"
  attention_options: tuple[tuple[str, Any], ...] = ()
  dropout_rate: float = 0.0
  lora: LoRASpec | None = None
  qkv_bias: str = "qkv"
  layer_norm_epsilon: float = 1e-6
  gelu: str = "tanh"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, key_bias=None, domain=None, deterministic=True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    eps = self.layer_norm_epsilon
    attn_cls = without_qkv_biases(attention_lib.get(self.attention_type),
                                  ABSENT_QKV_BIASES[self.qkv_bias])
    attn = attn_cls(num_heads=self.num_heads, lora=self.lora, name="attention",
                    **dict(self.attention_options), **kw)
    h = attn(layer_norm("ln_attention", epsilon=eps, **kw)(x), mask=mask, key_bias=key_bias,
             domain=domain, deterministic=deterministic)
    x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    h = Mlp(self.mlp_dim, self.dropout_rate, self.lora, self.gelu, name="mlp", **kw)(
        layer_norm("ln_mlp", epsilon=eps, **kw)(x), domain, deterministic=deterministic)
    x = x + h
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length",
                                          "activation_embed"))


class ConvStem(nn.Module):
  """Per-frame convolutional stem in place of the linear tubelet projection.

  log2(p) 3x3 convolutions of stride 2 (each LayerNorm, or GroupNorm, + GELU) take every
  frame to the (H/p, W/p) patch grid, then the t frames of each tubelet are concatenated and
  projected to the model width: "Early convolutions help transformers see better" (Xiao et
  al., 2021), which trains faster and is less sensitive to the optimiser than a patchify stem,
  most of all on small data. (B, T, H, W, C) -> (B, T/t, H/p, W/p, D). Channels double per
  stage up to D/2 at the last one. On the demo data (motion inputs on, 200 steps, validation
  split) it raised action mAP@0.5 from 0.42 to 0.60-0.62 but lowered QA accuracy (colour
  questions most); `stem="hybrid"` (patch + conv, what configs/demo.py uses) answered best
  (QA 0.74 against 0.63 with the patch stem and 0.54 with the conv stem).

  `width`, `depth` and `fold` size it. Trained alone to name one still object's shape (no
  transformer blocks), the default stem reaches 0.61 after 600 steps and width=16, depth=2,
  fold=2 with GroupNorm 1.00 after 450 (benchmarks/appearance/README.md, third round): stride-1
  convolutions at each resolution, and stopping at twice the patch grid, as a small CNN does.
  """
  hidden_size: int
  tubelet_size: tuple[int, int, int]
  norm: str = "layer"  # config.model.stem_norm: "layer" or "group" (see STEM_NORMS).
  # config.model.stem_width: channels of the first stage, doubling per stage up to
  # hidden_size (0: hidden_size / p * 2, at least 8, ending at hidden_size / 2).
  width: int = 0
  # config.model.stem_depth: convolutions per stage; the first has stride 2, the others 1.
  depth: int = 1
  # config.model.stem_fold: the stages stop at stride p / fold and each token concatenates its
  # fold x fold cells (space-to-depth, like the tubelet's frames) before the projection.
  fold: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t, h, w, c = x.shape
    tt, p, _ = self.tubelet_size
    stages = int(round(math.log2(p)))
    if 2 ** stages != p:
      raise ValueError(f"The conv stem needs a power-of-two patch size; got "
                       f"config.model.tubelet_size[1]={p}.")
    fold_stages = int(round(math.log2(self.fold)))
    if 2 ** fold_stages != self.fold or self.fold > p // 2:
      raise ValueError(f"config.model.stem_fold={self.fold} must be a power of two below the "
                       f"patch size {p}.")
    stages -= fold_stages
    if self.norm not in STEM_NORMS:
      raise ValueError(f"config.model.stem_norm={self.norm!r} is not one of "
                       f"{', '.join(STEM_NORMS)}.")
    y = x.reshape(b * t, h, w, c)
    for i in range(stages):
      if self.width:
        width = min(self.width * 2 ** i, self.hidden_size)
      else:
        width = max(self.hidden_size // 2 ** (stages - i), 8)
      for j in range(self.depth):
        suffix = f"{i}" if j == 0 else f"{i}_{j}"  # depth 1 keeps the original names
        stride = 2 if j == 0 else 1
        y = nn.Conv(width, (3, 3), strides=(stride, stride), padding="SAME",
                    name=f"conv_{suffix}",
                    kernel_init=partitioned(nn.initializers.lecun_normal(),
                                            ("conv_h", "conv_w", "channels", "stem")),
                    bias_init=partitioned(nn.initializers.zeros, ("stem",)), **kw)(y)
        norm_kw = dict(name=f"norm_{suffix}", scale_init=partitioned(
            nn.initializers.ones, ("stem",)), bias_init=partitioned(
                nn.initializers.zeros, ("stem",)), **kw)
        if self.norm == "group":  # Over space and a group of channels, per frame.
          y = nn.gelu(nn.GroupNorm(num_groups=min(8, width // 4), **norm_kw)(y))
        else:  # Over the channels of each pixel.
          y = nn.gelu(nn.LayerNorm(**norm_kw)(y))
    f = self.fold
    gh, gw, width = y.shape[1] // f, y.shape[2] // f, y.shape[3]
    y = y.reshape(b, t // tt, tt, gh, f, gw, f, width).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    y = y.reshape(b, t // tt, gh, gw, tt * f * f * width)
    return nn.Dense(self.hidden_size, name="projection",
                    kernel_init=partitioned(nn.initializers.lecun_normal(), ("stem", "embed")),
                    bias_init=partitioned(nn.initializers.zeros, ("embed",)), **kw)(y)


def scanned_blocks(encoder: nn.Module, block: EncoderBlock, x, mask, domain, deterministic):
  """`encoder`'s blocks (block_0 ... block_{L-1}) as one `lax.scan` over their parameters
  stacked on a leading layer axis; called from the bound encoder's __call__ (a function, not a
  method, so profiles name the loop's operations `encoder/block_*/...` as unrolled blocks'
  are after op_profile merges layer numbers: `block` is named "block_*").

  Same parameters and the same maths as the unrolled loop; what changes is the program. The
  backward pass then carries the residual stream's gradient from block to block as the
  loop's state, computed once per block. Unrolled, XLA:CPU fuses that chain of sums into
  every transposing copy that needs it (each block's weight gradients), recomputing it from
  the top of the stack each time: quadratic in depth (benchmarks/profile/demo_unrolled/:
  four such copies take 20, 19, 10 and 9 ms of the demo step). One block is also compiled
  once instead of L times (benchmarks/train/scan_layers/). The stacking copies the blocks'
  parameters once per step. Dropout keys are split per layer from the encoder's stream, so
  the masks differ from the unrolled run's.
  """
  layers = encoder.num_layers
  params = nn.meta.unbox([encoder.variables["params"][f"block_{i}"] for i in range(layers)])
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *params)
  rngs = {}
  if not deterministic and encoder.has_rng("dropout"):
    rngs["dropout"] = jax.random.split(encoder.make_rng("dropout"), layers)

  def body(x, layer):
    p, r = layer
    return block.apply({"params": p}, x, mask, None, domain, deterministic, rngs=r), None

  if encoder.remat_policy:
    body = jax.checkpoint(body, policy=REMAT_POLICIES[encoder.remat_policy], prevent_cse=False)
  x, _ = jax.lax.scan(body, x, (stacked, rngs))
  return x


class VideoEncoder(nn.Module):
  """Clip -> tokens and per-time-step features.

  Call: `(inputs, *, domain=None, deterministic=True, merge_weights=None, visible=None)
  -> dict` where `inputs` is a clip (B, T, H, W, C) (uint8 in [0, 255] or float in [0, 1]) or precomputed
  features (B, T, F) (features mode: the tubelet embedding is replaced by a linear
  projection, one token per time step). `merge_weights`: optional (2,) or (B, 2) float
  runtime weights (motion, saliency) of merge importance; None takes the spec's use_motion /
  use_saliency. Being traced values, changing them does not recompile. `visible`: optional
  (B, N_vis) int grid positions (time-major) the blocks see, the others dropped after the
  position embeddings (masked-video pretraining; no merging); the output then holds only
  tokens (B, N_vis, D), token_mask, grid (and cls). Returns
    tokens:        (B, N', D) final tokens; N' = N = T' * P without merging (T' = T / t,
                   P = (H / p) * (W / p)), N' = N - sum(r_l) with it.
    token_mask:    (B, N') bool.
    time_features: (B, T', D) per time step, the mean over the P grid positions of that step
                   of the token covering each position (size-weighted pooling by source).
    grid:          (T', P).
  with a CLS token (`cls_token`) also
    cls:           (B, D) the CLS token's final state (it attends and is attended to, but is
                   not part of `tokens`); HF's last_hidden_state is [cls, tokens].
  with `pooling` "mean" or "cls" also
    pooled:        (B, D) fc_norm(mean of the grid) or the CLS state.
  and with merging also
    sizes:         (B, N') float32 grid positions per token.
    assignment:    (B, N) int32 final token of every grid position (unmerge_to_grid).
    positions:     (B, N', 3) float32 centroid (time, row, column) of each token, grid units.
    motion, saliency: (B, N) float32 per-position scores in [0, 1] (clip mode, when used).
  """
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  tubelet_size: tuple[int, int, int] = (2, 16, 16)
  attention_type: str = "full"
  attention_options: tuple[tuple[str, Any], ...] = ()
  dropout_rate: float = 0.0
  lora: LoRASpec | None = None
  remat_policy: str | None = None  # None: no rematerialisation.
  # config.model.scan_layers: run the blocks as one lax.scan over their stacked parameters
  # ("auto": wherever `scan_unsupported` finds no reason against it; True / "true": there,
  # else an error; False / "false": unrolled). Parameters stay per block (block_0, ...), so
  # checkpoints, init_from and pretrained imports are the same either way (`scanned_blocks`).
  scan_layers: bool | str = "auto"
  token_merging: MergingSpec | None = None  # None: no merging.
  # Motion input streams added to the RGB tubelets (clip mode): "difference" (frame
  # differences as 3 more input channels) and/or "flow" (per-token optical-flow descriptors,
  # `token_flow_features`, through a linear embedding added to the tokens).
  motion_input: tuple[str, ...] = ()
  # "patch" (linear tubelet projection), "conv" (ConvStem) or "hybrid" (the sum of both).
  stem: str = "patch"
  stem_norm: str = "layer"  # ConvStem.norm
  stem_width: int = 0  # ConvStem.width
  stem_depth: int = 1  # ConvStem.depth
  stem_fold: int = 1  # ConvStem.fold
  flow_options: tuple[tuple[str, Any], ...] = ()  # flow_pairs options of the "flow" stream.
  flow_cells_per_token: int = 4
  # Architecture options (ARCHITECTURE_KEYS; defaults: today's encoder).
  position_embedding: str = "factorised"
  cls_token: bool = False
  qkv_bias: str = "qkv"
  layer_norm_epsilon: float = 1e-6
  gelu: str = "tanh"
  final_norm: bool = True
  pooling: str = "none"
  pool_norm_epsilon: float = 1e-5
  pixel_mean: tuple[float, ...] = (0.45, 0.45, 0.45)
  pixel_std: tuple[float, ...] = (0.225, 0.225, 0.225)
  pixel_channel_order: str = "rgb"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs, *, domain=None, deterministic=True, merge_weights=None,
               visible=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.check_architecture()
    tokens, grid = self.embed(inputs)
    b, t, p, d = tokens.shape
    x, cls = self.add_positions(tokens)
    if visible is not None:  # Masked-video pretraining: only these grid positions go in.
      x = jnp.take_along_axis(x, visible[..., None].astype(jnp.int32), axis=1)
    if cls is not None:  # Last, so the grid tokens keep their time-major indices.
      x = jnp.concatenate([x, jnp.broadcast_to(cls, (b, 1, d))], axis=1)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    n_cls = int(self.cls_token)

    spec = self.token_merging
    merging = (spec is not None and visible is None
               and (inputs.ndim == 5 or spec.features_mode != "off"))
    extras = {}
    if merging:
      rs = merging_lib.merge_schedule(t * p, self.num_layers, spec.target_compression_ratio,
                                      spec.schedule, spec.protect_fraction)
      grid3 = (t, inputs.shape[2] // self.tubelet_size[1],
               inputs.shape[3] // self.tubelet_size[2]) if inputs.ndim == 5 else (t, 1, 1)
      extras = self.importance(inputs) if inputs.ndim == 5 else {}
      state = merging_lib.init_state(b, t * p, extras.get("motion"), extras.get("saliency"))
      if merge_weights is None:
        merge_weights = jnp.asarray([spec.use_motion, spec.use_saliency], jnp.float32)
      merge_weights = jnp.asarray(merge_weights, jnp.float32)
      step_kw = dict(motion_weight=merge_weights[..., 0], saliency_weight=merge_weights[..., 1],
                     protect_fraction=spec.protect_fraction,
                     importance_weight=spec.importance_weight,
                     attention_share=spec.attention_share, attention_keys=spec.attention_keys)

    block_cls = EncoderBlock
    if self.remat_policy:
      block_cls = nn.remat(EncoderBlock, policy=REMAT_POLICIES[self.remat_policy],
                           static_argnums=(5,))
    arch = dict(qkv_bias=self.qkv_bias, layer_norm_epsilon=self.layer_norm_epsilon,
                gelu=self.gelu)
    key_bias = None
    error = scan_layers_error(self.scan_layers, self.attention_type, merging)
    if error:
      raise ValueError(error)
    # Initialisation runs the blocks unrolled: it creates block_0 ... with their own values.
    scanned = (scan_layers_mode(self.scan_layers) in (True, "auto") and not self.is_initializing()
               and not scan_unsupported(self.attention_type, merging))
    if scanned:
      options = attention_lib.resolve_frame_options(
          self.attention_type, dict(self.attention_options), max((x.shape[1] - n_cls) // t, 1))
      block = EncoderBlock(self.num_heads, self.mlp_dim, self.attention_type,
                           tuple(sorted(options.items())), self.dropout_rate, self.lora,
                           parent=None, name="block_*", **arch, **kw)
      x = scanned_blocks(self, block, x, jnp.ones(x.shape[:2], bool), domain, deterministic)
    for i in range(0 if scanned else self.num_layers):
      if merging and rs[i]:  # The CLS token (last) is never merged.
        grid_x, state = merging_lib.merge_step(x[:, :x.shape[1] - n_cls], state, rs[i], grid3,
                                               **step_kw)
        x = jnp.concatenate([grid_x, x[:, x.shape[1] - n_cls:]], axis=1)
        key_bias = jnp.log(state.sizes)  # Proportional attention (ToMe).
        if n_cls:
          key_bias = jnp.pad(key_bias, ((0, 0), (0, n_cls)))
      mask = jnp.ones(x.shape[:2], bool)
      # Frame-relative options (0, "frame") mean one frame of the tokens this block sees.
      options = attention_lib.resolve_frame_options(
          self.attention_type, dict(self.attention_options),
          max((x.shape[1] - n_cls) // t, 1))
      x = block_cls(self.num_heads, self.mlp_dim, self.attention_type,
                    tuple(sorted(options.items())), self.dropout_rate, self.lora,
                    name=f"block_{i}", **arch, **kw)(x, mask, key_bias, domain, deterministic)
    if self.final_norm:
      x = layer_norm("ln_final", epsilon=self.layer_norm_epsilon, **kw)(x)
    out = {}
    if n_cls:
      x, out["cls"] = x[:, :-n_cls], x[:, -1]
    mask = jnp.ones(x.shape[:2], bool)
    if visible is not None:  # Tokens of the visible positions only: no grid to pool over.
      out.update(tokens=x, token_mask=mask, grid=grid)
      return out
    full = merging_lib.unmerge_to_grid(x, state.assignment) if merging else x
    time_features = full.reshape(b, t, p, d).mean(axis=2)
    if self.pooling == "mean":  # Mean over grid positions (size-weighted when merged).
      out["pooled"] = layer_norm("fc_norm", epsilon=self.pool_norm_epsilon, **kw)(
          full.mean(axis=1))
    elif self.pooling == "cls":
      out["pooled"] = out["cls"]
    out.update(tokens=x, token_mask=mask, time_features=time_features, grid=grid)
    if merging:
      out.update(extras, sizes=state.sizes, assignment=state.assignment,
                 positions=merging_lib.token_positions(state, grid3))
    return out

  def check_architecture(self):
    """ValueError naming the config key of an architecture option out of its choices."""
    choices = (("position_embedding", POSITION_EMBEDDINGS), ("qkv_bias", ABSENT_QKV_BIASES),
               ("gelu", GELUS), ("pooling", POOLINGS),
               ("pixel_channel_order", CHANNEL_ORDERS))
    for key, allowed in choices:
      if getattr(self, key) not in allowed:
        raise ValueError(f"config.model.{key}={getattr(self, key)!r} is not one of "
                         f"{', '.join(allowed)}.")
    if self.pooling == "cls" and not self.cls_token:
      raise ValueError("config.model.pooling='cls' needs config.model.cls_token=True.")

  def add_positions(self, tokens):
    """(B, T', P, D) tokens -> ((B, T'P, D) with position embeddings, CLS (1, 1, D) or None).

    `joint` keeps HF ViViT's table layout: (1 + T'P, D) with row 0 the CLS token's.
    """
    b, t, p, d = tokens.shape
    init = nn.initializers.normal(0.02)
    n_cls = int(self.cls_token)
    cls = None
    if n_cls:
      cls = self.param("cls", partitioned(nn.initializers.zeros, ("embed",)), (d,),
                       self.param_dtype).astype(self.dtype)[None, None, :]
    if self.position_embedding == "factorised":
      time_pos = self.param("time_position", partitioned(init, ("time", "embed")), (t, d),
                            self.param_dtype)
      space_pos = self.param("space_position", partitioned(init, ("space", "embed")), (p, d),
                             self.param_dtype)
      tokens = tokens + (time_pos[:, None, :] + space_pos[None, :, :]).astype(self.dtype)
      return tokens.reshape(b, t * p, d), cls
    x = tokens.reshape(b, t * p, d)
    if self.position_embedding == "sinusoidal":
      return x + jnp.asarray(sinusoidal_table(t * p, d), self.dtype), cls
    table = self.param("position", partitioned(init, (None, "embed")), (n_cls + t * p, d),
                       self.param_dtype).astype(self.dtype)
    if n_cls:
      cls = cls + table[None, :1]
    return x + table[n_cls:], cls

  def importance(self, clip) -> dict:
    """Per-grid-position motion and saliency scores (B, N) in [0, 1] of a clip (B, T, H, W, C)."""
    spec, out = self.token_merging, {}
    if spec.motion_source != "none":
      out["motion"] = token_motion(clip, self.tubelet_size, source=spec.motion_source,
                                   cells_per_token=spec.flow_cells_per_token,
                                   min_motion=spec.min_motion, flow_options=spec.flow_options)
    if any(w > 0 for _, w in spec.saliency_weights):
      out["saliency"] = token_saliency(clip, self.tubelet_size, spec.pixel_weights,
                                       cells_per_token=spec.saliency_cells_per_token)
    return out

  def embed(self, inputs):
    """(B, T, H, W, C) clip or (B, T, F) features -> (B, T', P, D) tokens and (T', P)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if inputs.ndim == 3:  # Precomputed features: one token per time step.
      x = lora_dense(self.hidden_size, "features", None, name="feature_embedding",
                     kernel_axes=("features", "embed"), **kw)(inputs)
      return x[:, :, None, :], (inputs.shape[1], 1)
    if inputs.ndim != 5:
      raise ValueError(f"VideoEncoder expects a clip (B, T, H, W, C) or features (B, T, F); "
                       f"got shape {inputs.shape}.")
    clip = inputs
    if jnp.issubdtype(inputs.dtype, jnp.integer):
      inputs = inputs.astype(self.dtype) / 255.0
    x = inputs.astype(self.dtype)
    if self.pixel_channel_order == "bgr":  # Checkpoints and the data pipeline are RGB.
      x = x[..., ::-1]
    mean, std = self.pixel_mean, self.pixel_std
    # One value for all channels stays a scalar (any channel count, today's arithmetic).
    mean = mean[0] if len(set(mean)) == 1 else jnp.asarray(mean, self.dtype)
    std = std[0] if len(set(std)) == 1 else jnp.asarray(std, self.dtype)
    x = (x - mean) / std
    if "difference" in self.motion_input:  # Backward differences; the first frame's is 0.
      diff = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], axis=1)
      x = jnp.concatenate([x, diff], axis=-1)
    if self.stem not in STEMS:
      raise ValueError(f"config.model.stem={self.stem!r} is not one of {', '.join(STEMS)}.")
    pixels, x = x, 0.0
    if self.stem in ("patch", "hybrid"):
      x = nn.Conv(self.hidden_size, self.tubelet_size, strides=self.tubelet_size,
                  padding="VALID", name="tubelet_embedding",
                  kernel_init=partitioned(nn.initializers.lecun_normal(),
                                          ("conv_t", "conv_h", "conv_w", "channels", "embed")),
                  bias_init=partitioned(nn.initializers.zeros, ("embed",)), **kw)(pixels)
    if self.stem in ("conv", "hybrid"):
      x = x + ConvStem(self.hidden_size, self.tubelet_size, self.stem_norm, self.stem_width,
                       self.stem_depth, self.stem_fold, name="conv_stem", **kw)(pixels)
    b, t, h, w, d = x.shape
    x = x.reshape(b, t, h * w, d)
    if "flow" in self.motion_input:
      flow = token_flow_features(clip, self.tubelet_size,
                                 cells_per_token=self.flow_cells_per_token,
                                 flow_options=dict(self.flow_options))
      # lecun_normal: a token that visibly moves or changes (descriptor values of order 1)
      # starts with an embedding as large as its RGB one.
      x = x + lora_dense(d, "features", None, name="motion_embedding",
                         kernel_axes=("features", "embed"),
                         kernel_init=nn.initializers.lecun_normal(), **kw)(
                             flow.astype(self.dtype))
    return x, (t, h * w)
