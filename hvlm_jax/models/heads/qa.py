"""Video question answering: question encoder with cross-attention to the video, answer classes.

The Q questions of a clip are laid side by side as one sequence of Q * Lq tokens. Self-
attention is block-diagonal (a token sees only the real tokens of its own question) and every
token cross-attends to the clip's video tokens, so the video is projected once per clip, not
once per question. Each question's tokens are mean-pooled over its real tokens, concatenated
with the mean-pooled video, and an MLP scores the answer vocabulary (the training answers,
open-ended VQA as classification, Antol et al. 2015).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import optax
from flax import linen as nn

from hvlm_jax.models.heads.text import TextLayer, sinusoidal_positions
from hvlm_jax.models.layers import Dtype, dense, layer_norm, partitioned


def masked_mean(x, mask, axis):
  """Mean of x over `axis` where mask (x.shape without the last axis) is True; 0 if none."""
  m = mask[..., None].astype(x.dtype)
  return (x * m).sum(axis) / jnp.maximum(m.sum(axis), 1.0)


class QAHead(nn.Module):
  """questions (B, Q, Lq) int32 (0 = pad), memory (B, N, D), memory_mask (B, N) bool,
  memory_bias (B, N) float or None (log token sizes) -> answer logits (B, Q, A) float32."""
  num_answers: int
  vocab_size: int
  hidden_size: int
  num_layers: int = 2
  pool_video: bool = True  # Concatenate the mean video token to each question's output.
  num_heads: int = 4
  mlp_dim: int = 512
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, questions, memory, memory_mask=None, memory_bias=None, *,
               deterministic=True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, q, lq = questions.shape
    d = self.hidden_size
    tokens = questions.reshape(b, q * lq)
    real = tokens != 0
    which = jnp.repeat(jnp.arange(q), lq)
    self_mask = (which[:, None] == which[None, :])[None] & real[:, None, :]  # (B, QLq, QLq)
    x = nn.Embed(self.vocab_size, d, embedding_init=partitioned(
        nn.initializers.normal(d ** -0.5), ("vocab", "embed")), name="embed", **kw)(tokens)
    x = x * math.sqrt(d) + sinusoidal_positions(jnp.tile(jnp.arange(lq), q), d).astype(x.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    for i in range(self.num_layers):
      x = TextLayer(d, self.num_heads, self.mlp_dim, cross=True, dropout_rate=self.dropout_rate,
                    name=f"layer_{i}", **kw)(x, self_mask, memory, memory_mask, memory_bias,
                                             deterministic=deterministic)
    x = layer_norm("ln_final", **kw)(x)
    h = masked_mean(x.reshape(b, q, lq, d), real.reshape(b, q, lq), axis=2)
    if self.pool_video:
      vw = (jnp.ones(memory.shape[:2]) if memory_mask is None
            else memory_mask.astype(jnp.float32))
      if memory_bias is not None:
        vw = vw * jnp.exp(memory_bias.astype(jnp.float32))  # size-weighted: the grid mean
      pooled_v = layer_norm("ln_video", **kw)(masked_mean(memory, vw, axis=1))
      h = jnp.concatenate([h, jnp.broadcast_to(pooled_v[:, None], h.shape)], -1)
    h = nn.gelu(dense(self.mlp_dim, ("embed", "mlp"), name="mlp", **kw)(h))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return dense(self.num_answers, ("mlp", "vocab"), name="answers", dtype=jnp.float32,
                 param_dtype=self.param_dtype)(h)


def qa_loss(logits, answers, qa_mask):
  """Mean cross-entropy over present QA pairs; (loss, accuracy).

  logits: (B, Q, A); answers: (B, Q) int32; qa_mask: (B, Q) bool.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), answers)
  m = qa_mask.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  acc = ((logits.argmax(-1) == answers) * m).sum() / n
  return (ce * m).sum() / n, acc
