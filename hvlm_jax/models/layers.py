"""Small building blocks shared by every model file.

Every parameter carries logical axis names (see `hvlm_jax.sharding.LOGICAL_RULES`):
  embed      model width                 mlp       MLP hidden width
  joined_kv  heads x head_dim projection  vocab     vocabulary / classes
  time, space  position-embedding tables  norm      layer-norm scale/bias
  domain, lora_rank  LoRA adapters         state, conv  SSM state and conv taps
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = jnp.dtype | str


def partitioned(init, axes: tuple[str | None, ...]):
  """`init` with logical axis names attached (shorthand for nn.with_logical_partitioning)."""
  return nn.with_logical_partitioning(init, axes)


def layer_norm(name: str | None = None, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, epsilon: float = 1e-6) -> nn.LayerNorm:
  """LayerNorm whose statistics are computed in float32 and whose params are named."""
  return nn.LayerNorm(
      name=name, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, epsilon=epsilon,
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


def sinusoidal_table(num_positions: int, width: int) -> np.ndarray:
  """(num_positions, width) float32 fixed position table of Vaswani et al. (2017) as VideoMAE
  builds it over all tokens: angle(n, j) = n / 10000^(2 floor(j/2) / width), sin on even j,
  cos on odd j (computed in float64, like the reference, then rounded once)."""
  n = np.arange(num_positions, dtype=np.float64)[:, None]
  j = np.arange(width)
  angles = n / np.power(10000, 2 * (j // 2) / width)
  table = np.where(j % 2 == 0, np.sin(angles), np.cos(angles))
  return table.astype(np.float32)


# Which q/k/v projection biases an attention block lacks, by config.model.qkv_bias: "qkv"
# (all three, today's default and ViViT's), "qv" (VideoMAE: a query and a value bias, no key
# bias), "none".
ABSENT_QKV_BIASES = {"qkv": (), "qv": ("key",), "none": ("query", "key", "value")}


def _edit_qkv_biases(variables, names: tuple[str, ...], add: bool):
  out = {c: dict(tree) for c, tree in variables.items()}
  params = out.get("params", {})
  if "qkv" not in params:  # Families without q/k/v projections (mamba) are left alone.
    return out
  qkv = {k: dict(v) for k, v in params["qkv"].items()}
  for name in names:
    if name not in qkv:
      continue
    if not add:
      qkv[name].pop("bias", None)
    elif "bias" not in qkv[name]:
      kernel = nn.meta.unbox(qkv[name]["kernel"])
      qkv[name]["bias"] = jnp.zeros(kernel.shape[-1:], kernel.dtype)
  params["qkv"] = qkv
  return out


def without_qkv_biases(attention_cls, names: tuple[str, ...]):
  """`attention_cls` whose q/k/v projections `names` have no bias parameter.

  A lifted `nn.map_variables`: the module computes with a zero bias there, and the stored
  parameter tree has none (nothing to train, nothing to export), so any attention family
  built on `QKVProjection` expresses VideoMAE's q/v-only biases without a change of its own.
  """
  if not names:
    return attention_cls
  return nn.map_variables(
      attention_cls, "params", init=True,
      trans_in_fn=lambda v: _edit_qkv_biases(v, names, add=True),
      trans_out_fn=lambda v: _edit_qkv_biases(v, names, add=False))
