"""Multi-domain LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

y = x W + b + (alpha / r) * dropout(x) A[d] B[d], where d is each example's domain. `A` is
drawn at random and `B` starts at zero, so a fresh adapter leaves the model unchanged.
Every example of a batch gathers its own domain's (A, B): one compiled program serves a
batch that mixes domains. Cost per example: O(in * r + r * out) parameters gathered and
O(tokens * r * (in + out)) extra FLOPs.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from hvlm_jax.models.layers import Dtype, partitioned

# Names a LoRA target may take. Attention families map their projections onto these names.
TARGETS = ("query", "key", "value", "out", "mlp_in", "mlp_out")


@dataclasses.dataclass(frozen=True)
class LoRASpec:
  """Which projections get adapters, and their shape. Hashable: a linen attribute."""
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  num_domains: int = 4
  targets: tuple[str, ...] = ("query", "value")

  def __post_init__(self):
    unknown = set(self.targets) - set(TARGETS)
    if unknown:
      raise ValueError(f"config.model.domain_modules.lora.targets has unknown names "
                       f"{sorted(unknown)}; known: {', '.join(TARGETS)}.")

  def rank_for(self, target: str) -> int:
    return self.rank if target in self.targets else 0


class LoRADense(nn.Module):
  """Dense layer with an optional per-domain low-rank update.

  Attributes:
    features: output width.
    kernel_axes: logical axis names of the (in, out) kernel.
    rank: LoRA rank; 0 means a plain Dense (no adapter parameters at all).
  Call: `(x: (B, ..., in), domain: (B,) int32 | None) -> (B, ..., out)`. With `domain=None`
  the adapters are skipped (the base model).
  """
  features: int
  kernel_axes: tuple[str | None, str | None] = ("embed", "joined_kv")
  use_bias: bool = True
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  num_domains: int = 4
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, domain: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    d_in = x.shape[-1]
    kernel = self.param("kernel", partitioned(self.kernel_init, self.kernel_axes),
                        (d_in, self.features), self.param_dtype)
    x = x.astype(self.dtype)
    y = jnp.einsum("...i,io->...o", x, kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", partitioned(nn.initializers.zeros, (self.kernel_axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.rank == 0:
      return y
    lora_a = self.param(
        "lora_a", partitioned(nn.initializers.he_uniform(in_axis=1, out_axis=2),
                              ("domain", self.kernel_axes[0], "lora_rank")),
        (self.num_domains, d_in, self.rank), self.param_dtype)
    lora_b = self.param("lora_b", partitioned(nn.initializers.zeros,
                                              ("domain", "lora_rank", self.kernel_axes[1])),
                        (self.num_domains, self.rank, self.features), self.param_dtype)
    if domain is None:
      return y
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    a = lora_a[domain].astype(self.dtype)  # (B, in, r)
    b = lora_b[domain].astype(self.dtype)  # (B, r, out)
    low = jnp.einsum("b...i,bir->b...r", x, a)
    return y + (self.alpha / self.rank) * jnp.einsum("b...r,bro->b...o", low, b)


def lora_dense(features: int, target: str, lora: LoRASpec | None, *, name: str,
               kernel_axes=("embed", "joined_kv"), use_bias: bool = True,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               kernel_init=nn.initializers.xavier_uniform()) -> LoRADense:
  """A LoRADense for projection `target`, with an adapter only if `lora` targets it."""
  rank = lora.rank_for(target) if lora is not None else 0
  return LoRADense(
      features, kernel_axes=kernel_axes, use_bias=use_bias, rank=rank,
      alpha=lora.alpha if lora else 16.0, dropout=lora.dropout if lora else 0.0,
      num_domains=lora.num_domains if lora else 1, kernel_init=kernel_init, name=name,
      dtype=dtype, param_dtype=param_dtype)
