"""Full softmax attention (Vaswani et al., 2017): the baseline every variant is measured against.

Time O(N^2 D), memory O(N^2 H) on the XLA path, which materialises all logits.
`implementation` (kernels.py): "auto" (default: cuDNN flash on GPU for 16-bit compute, splash
on TPU without mask or key_bias, else XLA), "xla", "cudnn" (flash-style, memory O(N D)) or
"splash" (Pallas, TPU).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from hvlm_jax.models.attention import kernels
from hvlm_jax.models.attention.common import OutProjection, QKVProjection, key_logit_bias
from hvlm_jax.models.domain.lora import LoRASpec
from hvlm_jax.models.layers import Dtype


class FullAttention(nn.Module):
  """Multi-head softmax attention over all N tokens. See common.py for the call contract."""
  num_heads: int
  causal: bool = False
  implementation: str | None = "auto"  # See kernels.py.
  dropout_rate: float = 0.0
  lora: LoRASpec | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, key_bias=None, domain=None, deterministic=True):
    q, k, v = QKVProjection(self.num_heads, lora=self.lora, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="qkv")(
                                x, domain, deterministic=deterministic)
    bias = key_logit_bias(mask, key_bias, jnp.float32)
    if bias is not None:
      bias = bias[:, None, None, :].astype(q.dtype)  # (B, 1, 1, N) over (B, H, Nq, Nk)
    dropout = self.dropout_rate > 0 and not deterministic
    impl = kernels.choose(self.implementation, "full", dtype=q.dtype, dropout=dropout,
                          masked=bias is not None)
    if dropout:
      y = attention_with_dropout(q, k, v, bias, self.causal, self.dropout_rate,
                                 self.make_rng("dropout"))
    elif impl == "splash":
      y = kernels.splash_attention(q, k, v, "full", causal=self.causal)
    else:
      y = jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=self.causal,
                                       implementation=impl)
    return OutProjection(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="out_proj")(y, domain, deterministic=deterministic)


def attention_with_dropout(q, k, v, bias, causal, rate, rng):
  """Softmax attention with dropout on the probabilities (the fused path has none).

  q, k, v: (B, N, H, Dh). Softmax statistics in float32.
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if causal:
    n = q.shape[1]
    logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, -1e9)
  probs = jax.nn.softmax(logits, axis=-1)
  keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
  probs = jnp.where(keep, probs / (1.0 - rate), 0.0).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
