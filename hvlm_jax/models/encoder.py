"""VideoEncoder: tubelet embedding -> space-time transformer blocks -> temporal features.

ViViT-style (Arnab et al., 2021; scenic `projects/vivit`): a (t, p, p) tubelet convolution
turns a clip (B, T, H, W, C) into a (T/t) x (H/p * W/p) grid of tokens, plus factorised
position embeddings (one table over time, one over space, summed). Tokens are laid out
time-major, token index = time * P + space, so frame-local attention is a reshape.
Each pre-LN block's attention comes from `hvlm_jax.models.attention.REGISTRY` by name.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from hvlm_jax.models import attention as attention_lib
from hvlm_jax.models.domain.lora import LoRASpec, lora_dense
from hvlm_jax.models.layers import Dtype, layer_norm, partitioned

# Names accepted by training.remat_policy.
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


class Mlp(nn.Module):
  """D -> mlp_dim -> GELU -> D; `mlp_in`, `mlp_out` are LoRA targets."""
  mlp_dim: int
  dropout_rate: float = 0.0
  lora: LoRASpec | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, domain=None, *, deterministic=True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = lora_dense(self.mlp_dim, "mlp_in", self.lora, name="mlp_in",
                   kernel_axes=("embed", "mlp"), **kw)(x, domain, deterministic=deterministic)
    h = nn.Dropout(self.dropout_rate)(nn.gelu(h), deterministic=deterministic)
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
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, key_bias=None, domain=None, deterministic=True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_cls = attention_lib.get(self.attention_type)
    attn = attn_cls(num_heads=self.num_heads, lora=self.lora, name="attention",
                    **dict(self.attention_options), **kw)
    h = attn(layer_norm("ln_attention", **kw)(x), mask, key_bias=key_bias, domain=domain,
             deterministic=deterministic)
    x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    h = Mlp(self.mlp_dim, self.dropout_rate, self.lora, name="mlp", **kw)(
        layer_norm("ln_mlp", **kw)(x), domain, deterministic=deterministic)
    x = x + h
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length",
                                          "activation_embed"))


class VideoEncoder(nn.Module):
  """Clip -> tokens and per-time-step features.

  Call: `(inputs, *, domain=None, deterministic=True) -> dict` where `inputs` is a clip
  (B, T, H, W, C) (uint8 in [0, 255] or float in [0, 1]) or precomputed features (B, T, F)
  (features mode: the tubelet embedding is replaced by a linear projection, one token per
  time step). Returns
    tokens:        (B, N, D) final tokens, N = T' * P (T' = T / t, P = (H / p) * (W / p)).
    token_mask:    (B, N) bool.
    time_features: (B, T', D) tokens averaged over space per time step.
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
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs, *, domain=None, deterministic=True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens, grid = self.embed(inputs)
    b, t, p, d = tokens.shape
    time_pos = self.param("time_position", partitioned(nn.initializers.normal(0.02),
                                                       ("time", "embed")), (t, d),
                          self.param_dtype)
    space_pos = self.param("space_position", partitioned(nn.initializers.normal(0.02),
                                                         ("space", "embed")), (p, d),
                           self.param_dtype)
    tokens = tokens + (time_pos[:, None, :] + space_pos[None, :, :]).astype(self.dtype)
    x = tokens.reshape(b, t * p, d)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    mask = jnp.ones((b, t * p), bool)

    block_cls = EncoderBlock
    if self.remat_policy:
      block_cls = nn.remat(EncoderBlock, policy=REMAT_POLICIES[self.remat_policy],
                           static_argnums=(5,))
    for i in range(self.num_layers):
      x = block_cls(self.num_heads, self.mlp_dim, self.attention_type, self.attention_options,
                    self.dropout_rate, self.lora, name=f"block_{i}", **kw)(
                        x, mask, None, domain, deterministic)
    x = layer_norm("ln_final", **kw)(x)
    time_features = x.reshape(b, t, p, d).mean(axis=2)
    return dict(tokens=x, token_mask=mask, time_features=time_features, grid=grid)

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
    if jnp.issubdtype(inputs.dtype, jnp.integer):
      inputs = inputs.astype(self.dtype) / 255.0
    x = (inputs.astype(self.dtype) - 0.45) / 0.225
    x = nn.Conv(self.hidden_size, self.tubelet_size, strides=self.tubelet_size,
                padding="VALID", name="tubelet_embedding",
                kernel_init=partitioned(nn.initializers.lecun_normal(),
                                        ("conv_t", "conv_h", "conv_w", "channels", "embed")),
                bias_init=partitioned(nn.initializers.zeros, ("embed",)), **kw)(x)
    b, t, h, w, d = x.shape
    return x.reshape(b, t, h * w, d), (t, h * w)
