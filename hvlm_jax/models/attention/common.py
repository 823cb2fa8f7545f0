"""Pieces every attention family shares: head projections and masks.

Call contract for every attention class (see docs/design.md):
  module(x, mask=None, *, key_bias=None, domain=None, deterministic=True) -> (B, N, D)
    x:        (B, N, D) tokens.
    mask:     (B, N) bool, True for a real token. Padded tokens never influence real ones.
    key_bias: (B, N) float added to every logit of a key (ToMe proportional attention passes
              log(token size)); kernel methods multiply phi(K) by exp(key_bias) instead,
              which is the same thing for the softmax kernel.
    domain:   (B,) int32 domain id per example, for multi-domain LoRA on the projections.
Every class takes `num_heads`, `lora`, `dtype` and `param_dtype` attributes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from hvlm_jax.models.domain.lora import LoRASpec, lora_dense
from hvlm_jax.models.layers import Dtype


class QKVProjection(nn.Module):
  """q, k, v projections D -> (H, Dh); parameter names `query`, `key`, `value` are LoRA targets.

  Call: `(x: (B, N, D), domain=None, *, kv=None) -> q, k, v`, each (B, N or M, H, D/H); keys
  and values come from `kv: (B, M, D)` when given (cross-attention), else from `x`.
  """
  num_heads: int
  use_bias: bool = True
  lora: LoRASpec | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, domain=None, *, kv=None, deterministic=True):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"Model width {width} is not divisible by num_heads={self.num_heads}.")
    kv = x if kv is None else kv
    kw = dict(lora=self.lora, use_bias=self.use_bias, dtype=self.dtype,
              param_dtype=self.param_dtype)
    heads = []
    for name, source in (("query", x), ("key", kv), ("value", kv)):
      y = lora_dense(width, name, name=name, **kw)(source, domain, deterministic=deterministic)
      heads.append(split_heads(y, self.num_heads))
    return tuple(heads)


class OutProjection(nn.Module):
  """(B, N, H, Dh) -> (B, N, D); parameter name `out` is a LoRA target."""
  lora: LoRASpec | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y, domain=None, *, deterministic=True):
    y = merge_heads(y)
    return lora_dense(y.shape[-1], "out", self.lora, name="out",
                      kernel_axes=("joined_kv", "embed"), dtype=self.dtype,
                      param_dtype=self.param_dtype)(y, domain, deterministic=deterministic)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """(..., N, H*Dh) -> (..., N, H, Dh)."""
  return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
  """(..., N, H, Dh) -> (..., N, H*Dh)."""
  return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def key_logit_bias(mask: jax.Array | None, key_bias: jax.Array | None,
                   dtype=jnp.float32) -> jax.Array | None:
  """(B, N) additive logit bias per key: key_bias, and a large negative value at padding.

  A finite large negative (not -inf) keeps fully padded rows NaN-free.
  """
  if mask is None and key_bias is None:
    return None
  bias = jnp.zeros((mask if mask is not None else key_bias).shape, dtype)
  if key_bias is not None:
    bias = bias + key_bias.astype(dtype)
  if mask is not None:
    bias = jnp.where(mask, bias, jnp.asarray(-1e9 if dtype == jnp.float32 else -3e4, dtype))
  return bias
