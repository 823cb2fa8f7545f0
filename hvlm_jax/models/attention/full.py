"""Full softmax attention (Vaswani et al., 2017): the baseline every variant is measured against.

Time O(N^2 D), memory O(N^2 H) on the XLA path, which materialises all logits.
`implementation` (kernels.py): "auto" (default: cuDNN flash on GPU for 16-bit compute, splash
on TPU without mask or key_bias, else XLA), "xla", "cudnn" (flash-style, memory O(N D)) or
"splash" (Pallas, TPU).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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
    if impl == "splash":
      y = kernels.splash_attention(q, k, v, "full", causal=self.causal)
    elif impl == "cudnn" and not dropout:  # cuDNN has no attention dropout.
      y = jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=self.causal,
                                       implementation="cudnn")
    else:
      y = softmax_attention(q, k, v, bias, causal=self.causal,
                            dropout_rate=self.dropout_rate if dropout else 0.0,
                            dropout_rng=self.make_rng("dropout") if dropout else None)
    return OutProjection(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="out_proj")(y, domain, deterministic=deterministic)


def softmax_attention(q, k, v, bias=None, *, causal: bool = False, dropout_rate: float = 0.0,
                      dropout_rng=None):
  """The XLA path: two einsums around a float32 softmax, computed as
  `jax.nn.dot_product_attention(implementation="xla")` computes it (logits scaled by
  1/sqrt(Dh), then the bias, then the causal mask), with optional dropout on the
  probabilities. Written out because XLA:CPU runs this form 1.5-1.8x faster (forward +
  backward) than jax.nn.dot_product_attention's XLA path at 784-1568 tokens, with no
  consistent difference at 128-256 and 6272 (`python tools/benchmark_softmax_attention.py`).

  q, k, v: (B, N, H, Dh); bias: broadcastable to (B, H, Nq, Nk).
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits * (1.0 / np.sqrt(q.shape[-1]))
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if causal:
    n_q, n_k = q.shape[1], k.shape[1]
    logits = jnp.where(jnp.tril(jnp.ones((n_q, n_k), bool)), logits,
                       -0.7 * float(jnp.finfo(jnp.float32).max))
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
