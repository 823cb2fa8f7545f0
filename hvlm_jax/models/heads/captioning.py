"""Captioning: a transformer decoder over video tokens, its loss, and its decoding.

Decoder (Vaswani et al. 2017): word embedding * sqrt(D) + sinusoidal positions -> L pre-LN
layers (causal self-attention, cross-attention to the video tokens, MLP) -> LN -> logits by
the transposed word embedding (tied weights, Press & Wolf 2017). Teacher forcing reads
caption_tokens[:, :-1] (bos w1 .. wn eos pad ..) and predicts caption_tokens[:, 1:].
Decoding (`generate`) runs greedy or beam search (heads/decoding.py) with a key/value cache:
O(L_max) steps, each O(layers * (L_max + N) * D) per sequence instead of re-reading the prefix.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from hvlm_jax.models.heads import decoding
from hvlm_jax.models.heads.text import TextLayer, causal_mask, sinusoidal_positions
from hvlm_jax.models.layers import Dtype, layer_norm, partitioned

PAD, UNK, BOS, EOS = 0, 1, 2, 3  # Word vocabulary ids fixed by the data pipeline.


class CaptionDecoder(nn.Module):
  """Causal text decoder cross-attending to video tokens.

  __call__(tokens (B, L) int32, memory (B, N, D), memory_mask (B, N) bool, memory_bias
  (B, N) float or None) -> logits (B, L, V) float32, logits[:, i] predicting token i + 1
  from tokens[:, :i + 1]. memory_bias is added to the cross-attention logits of each video
  token (log of its size when tokens were merged).
  """
  vocab_size: int
  hidden_size: int
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 512
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed = nn.Embed(
        self.vocab_size, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=partitioned(nn.initializers.normal(self.hidden_size ** -0.5),
                                   ("vocab", "embed")))
    self.layers = [TextLayer(self.hidden_size, self.num_heads, self.mlp_dim, cross=True,
                             dropout_rate=self.dropout_rate, name=f"layer_{i}", **kw)
                   for i in range(self.num_layers)]
    self.ln_final = layer_norm(**kw)
    self.drop = nn.Dropout(self.dropout_rate)

  def _embed(self, tokens, positions):
    x = self.embed(tokens) * math.sqrt(self.hidden_size)
    return x + sinusoidal_positions(positions, self.hidden_size).astype(x.dtype)

  def _logits(self, x):
    return self.embed.attend(self.ln_final(x)).astype(jnp.float32)

  def __call__(self, tokens, memory, memory_mask=None, memory_bias=None, *,
               deterministic=True):
    x = self._embed(tokens, jnp.arange(tokens.shape[1]))
    x = self.drop(x, deterministic=deterministic)
    mask = causal_mask(tokens.shape[1])
    for layer in self.layers:
      x = layer(x, mask, memory, memory_mask, memory_bias, deterministic=deterministic)
    return self._logits(x)

  def cross_kv(self, memory):
    """Per-layer cross-attention keys/values of the video, computed once per clip."""
    return [layer.cross_kv(memory) for layer in self.layers]

  def step(self, tokens, index, cache, cross_kv, memory_mask=None, memory_bias=None):
    """tokens (R,) at position `index` -> (logits (R, V) float32, cache); R = B * G."""
    x = self._embed(tokens[:, None], jnp.full((1,), index))
    new_cache = []
    for layer, c, kv in zip(self.layers, cache, cross_kv):
      x, c = layer.step(x, index, c, kv, memory_mask, memory_bias)
      new_cache.append(c)
    return self._logits(x)[:, 0], new_cache

  def init_cache(self, rows: int, max_length: int):
    """Zero key/value cache for `rows` sequences: per layer k, v (R, L_max, H, Dh)."""
    shape = (rows, max_length, self.num_heads, self.hidden_size // self.num_heads)
    return [dict(k=jnp.zeros(shape, self.dtype), v=jnp.zeros(shape, self.dtype))
            for _ in range(self.num_layers)]


def generate(decoder: CaptionDecoder, variables, memory, memory_mask=None, memory_bias=None,
             *, max_length: int, beam_size: int = 1, alpha: float = 0.0):
  """Captions for a batch of clips, jit-able.

  Args:
    decoder: an unbound CaptionDecoder; variables: its {"params": ...}.
    memory: (B, N, D) video tokens; memory_mask: (B, N) bool; memory_bias: (B, N) or None.
    max_length: generated tokens (eos included); beam_size 1 is greedy decoding.
    alpha: GNMT length-penalty exponent for beam search.
  Returns:
    tokens (B, max_length) int32 (words, eos, then pad) and scores (B,) float32.
  """
  b = memory.shape[0]
  cross = decoder.apply(variables, memory, method=CaptionDecoder.cross_kv)
  cache = decoder.init_cache(b * beam_size, max_length)

  def step_fn(tokens, index, cache):
    return decoder.apply(variables, tokens, index, cache, cross, memory_mask, memory_bias,
                         method=CaptionDecoder.step)

  if beam_size == 1:
    return decoding.greedy_decode(step_fn, cache, b, max_length, bos_id=BOS, eos_id=EOS,
                                  pad_id=PAD)
  return decoding.beam_search(step_fn, cache, b, beam_size, max_length, bos_id=BOS,
                              eos_id=EOS, pad_id=PAD, alpha=alpha)


def caption_loss(logits, caption_tokens, caption_mask, *, label_smoothing: float = 0.0):
  """Teacher-forced cross-entropy, mean over real target tokens of captioned examples.

  logits: (B, L - 1, V) from decoder(caption_tokens[:, :-1]); caption_tokens: (B, L) int32;
  caption_mask: (B,) bool. Targets are caption_tokens[:, 1:] where not pad. With label
  smoothing s the target is (1 - s) one_hot + s / V. Returns (loss, token accuracy).
  """
  targets = caption_tokens[:, 1:]
  m = ((targets != PAD) & caption_mask[:, None]).astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  v = logits.shape[-1]
  soft = optax.smooth_labels(jax.nn.one_hot(targets, v), label_smoothing)
  ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), soft)
  acc = ((logits.argmax(-1) == targets) * m).sum() / n
  return (ce * m).sum() / n, acc
