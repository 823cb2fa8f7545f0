"""Clip classification (video-level action recognition): pooled tokens -> class logits."""
from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import linen as nn

from hvlm_jax.models.heads.qa import masked_mean
from hvlm_jax.models.layers import Dtype, dense, layer_norm


class ClassificationHead(nn.Module):
  """tokens (B, N, D), mask (B, N) bool or float weights -> logits (B, C) float32:
  (weighted) mean -> LN -> linear.

  The linear layer starts at zero (uniform predictions, loss log C at step 0).
  """
  num_classes: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, mask):
    pooled = layer_norm("ln", self.dtype, self.param_dtype)(masked_mean(tokens, mask, axis=1))
    return dense(self.num_classes, ("embed", "vocab"), name="logits", dtype=jnp.float32,
                 param_dtype=self.param_dtype, kernel_init=nn.initializers.zeros)(pooled)


def classification_loss(logits, labels, mask):
  """Mean cross-entropy over examples whose `mask` (B,) is True; (loss, accuracy)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  m = mask.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  acc = ((logits.argmax(-1) == labels) * m).sum() / n
  return (ce * m).sum() / n, acc
