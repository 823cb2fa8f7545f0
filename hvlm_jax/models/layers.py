"""Small building blocks shared by every model file.

Every parameter carries logical axis names (see `hvlm_jax.sharding.LOGICAL_RULES`):
  embed      model width                 mlp       MLP hidden width
  joined_kv  heads x head_dim projection  vocab     vocabulary / classes
  time, space  position-embedding tables  norm      layer-norm scale/bias
  domain, lora_rank  LoRA adapters         state, conv  SSM state and conv taps
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

Dtype = jnp.dtype | str


def partitioned(init, axes: tuple[str | None, ...]):
  """`init` with logical axis names attached (shorthand for nn.with_logical_partitioning)."""
  return nn.with_logical_partitioning(init, axes)


def layer_norm(name: str | None = None, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  """LayerNorm whose statistics are computed in float32 and whose params are named."""
  return nn.LayerNorm(
      name=name, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
      scale_init=partitioned(nn.initializers.ones, ("norm",)),
      bias_init=partitioned(nn.initializers.zeros, ("norm",)))


def dense(features: int, axes: tuple[str | None, str | None], *, name: str | None = None,
          use_bias: bool = True, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          kernel_init=nn.initializers.xavier_uniform()) -> nn.Dense:
  """A Dense whose kernel has logical axes `axes` (in, out) and bias `axes[1]`."""
  return nn.Dense(
      features, name=name, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=partitioned(kernel_init, axes),
      bias_init=partitioned(nn.initializers.zeros, (axes[1],)))
