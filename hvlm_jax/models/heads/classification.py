"""Clip classification (video-level action recognition): pooled tokens -> class logits.

Pooling is attention pooling with a learned probe (heads/text.AttentionPool; big_vision's
MAP head), a (size-weighted) mean over tokens, or "encoder": the encoder's own pooled output
(config.model.pooling, e.g. VideoMAE's fc_norm(mean) or ViViT's CLS) goes straight into the
`logits` Dense, as in transformers' ...ForVideoClassification (an imported classifier gives
transformers' logits).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import linen as nn

from hvlm_jax.models.heads.qa import masked_mean
from hvlm_jax.models.heads.text import AttentionPool
from hvlm_jax.models.layers import Dtype, dense, layer_norm


class ClassificationHead(nn.Module):
  """tokens (B, N, D), weights (B, N) (bool mask or token sizes) -> logits (B, C) float32:
  pool -> LN -> linear. `pooling`: "attention" (weights > 0 are attended, log(weights) is the
  logit bias: proportional attention for merged tokens) or "mean" (weighted mean); "encoder":
  `tokens` is the encoder's pooled output (B, D), only the linear layer applies (given tokens
  (B, N, D) instead, e.g. a streaming memory bank, their weighted mean stands in for it).

  The linear layer starts at zero (uniform predictions, loss log C at step 0).
  """
  num_classes: int
  pooling: str = "attention"
  num_heads: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, weights):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.pooling == "encoder":
      pooled = tokens if tokens.ndim == 2 else masked_mean(tokens, weights, axis=1)
      return dense(self.num_classes, ("embed", "vocab"), name="logits", dtype=jnp.float32,
                   param_dtype=self.param_dtype, kernel_init=nn.initializers.zeros)(pooled)
    if self.pooling == "attention":
      w = weights.astype(jnp.float32)
      pooled = AttentionPool(self.num_heads, name="pool", **kw)(
          tokens, w > 0, jnp.log(jnp.maximum(w, 1e-9)))
    elif self.pooling == "mean":
      pooled = masked_mean(tokens, weights, axis=1)
    else:
      raise ValueError(f"config.model.heads.classification_pooling={self.pooling!r} is not "
                       f"attention, mean or encoder.")
    pooled = layer_norm("ln", **kw)(pooled)
    return dense(self.num_classes, ("embed", "vocab"), name="logits", dtype=jnp.float32,
                 param_dtype=self.param_dtype, kernel_init=nn.initializers.zeros)(pooled)


def classification_loss(logits, labels, mask):
  """Mean cross-entropy over examples whose `mask` (B,) is True; (loss, accuracy)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  m = mask.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  acc = ((logits.argmax(-1) == labels) * m).sum() / n
  return (ce * m).sum() / n, acc
