"""Cross-attention to a memory bank, and MA-LMM memory-bank compression.

`CrossMemoryAttention`: queries from the current tokens, keys and values from a memory bank
(Memorizing Transformers, Wu et al., 2022; MA-LMM, He et al., CVPR 2024). Time O(N M D),
memory O(N M H) for N tokens and M memory entries.

`compress_memory` keeps a bank at a fixed capacity the MA-LMM way: while it is over capacity,
the most similar (cosine) pair of temporally adjacent entries is replaced by their
size-weighted mean (sizes count the original entries each one stands for). It is a pure
function with static shapes, so the long-video streaming loop can call it under jit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from hvlm_jax.models.attention.common import OutProjection, QKVProjection
from hvlm_jax.models.attention.sparse import NEG, joint_softmax, pad_axis, to_blocks
from hvlm_jax.models.domain.lora import LoRASpec
from hvlm_jax.models.layers import Dtype, partitioned


def compress_memory(bank: jax.Array, bank_mask: jax.Array, capacity: int,
                    sizes: jax.Array | None = None):
  """MA-LMM compression of a memory bank to `capacity` entries.

  Args:
    bank: (B, M, D) entries in temporal order.
    bank_mask: (B, M) bool, True for a real entry (real entries need not be contiguous).
    capacity: entries kept, C >= 1 (static).
    sizes: (B, M) float, how many original entries each one stands for (default 1).
  Returns:
    (bank (B, C, D), mask (B, C) bool, sizes (B, C) float32): the real entries, in order, at
    the front; while more than C are real, the adjacent pair (i, i+1) of highest cosine
    similarity (first on ties) becomes one entry sum(size * x) / sum(size) with the summed
    size. Fewer than C real entries are kept as they are, padded with masked zeros.
  Cost: M - C merge steps of O(M D) each (a fori_loop; gradients flow through the means).
  """
  if capacity < 1:
    raise ValueError(f"Memory capacity must be >= 1, got {capacity}.")
  b, m, d = bank.shape
  if m < capacity:
    bank, bank_mask = pad_axis(bank, capacity), pad_axis(bank_mask, capacity, value=False)
    sizes = None if sizes is None else pad_axis(sizes, capacity)
    m = capacity
  sizes = jnp.ones((b, m), jnp.float32) if sizes is None else sizes.astype(jnp.float32)
  sizes = jnp.where(bank_mask, sizes, 0.0)
  order = jnp.argsort(~bank_mask, axis=1, stable=True)  # Real entries first, order kept.
  bank = jnp.take_along_axis(bank, order[..., None], axis=1)
  sizes = jnp.take_along_axis(sizes, order, axis=1)
  count = bank_mask.sum(1)
  positions = jnp.arange(m)[None]

  def merge_step(_, state):
    bank, sizes, count = state
    unit = jax.lax.stop_gradient(bank.astype(jnp.float32))
    unit = unit / jnp.maximum(jnp.linalg.norm(unit, axis=-1, keepdims=True), 1e-12)
    sim = (unit[:, :-1] * unit[:, 1:]).sum(-1)
    sim = jnp.where(positions[:, :-1] < (count - 1)[:, None], sim, -jnp.inf)
    i = jnp.argmax(sim, axis=1)[:, None]  # (B, 1): merge i and i+1
    take = lambda x, idx: jnp.take_along_axis(x, idx, axis=1)
    s_i, s_j = take(sizes, i), take(sizes, i + 1)
    x_i, x_j = take(bank, i[..., None]), take(bank, i[..., None] + 1)
    # An empty bank (count 0, sizes 0) computes a merge it then discards (`do` below); a
    # positive divisor keeps that 0 / 0 out of the gradient (where() passes NaN through).
    total = s_i + s_j
    merged = (x_i * s_i[..., None] + x_j * s_j[..., None]) / jnp.where(total > 0, total,
                                                                         1.0)[..., None]
    shift = jnp.minimum(positions + (positions > i), m - 1)  # Drop entry i+1.
    new_bank = jnp.where((positions == i)[..., None], merged.astype(bank.dtype),
                         take(bank, shift[..., None]))
    new_sizes = jnp.where(positions == i, s_i + s_j, take(sizes, shift))
    new_sizes = jnp.where(positions < count[:, None] - 1, new_sizes, 0.0)
    do = (count > capacity)[:, None]
    return (jnp.where(do[..., None], new_bank, bank), jnp.where(do, new_sizes, sizes),
            count - do[:, 0].astype(count.dtype))

  bank, sizes, count = jax.lax.fori_loop(0, m - capacity, merge_step, (bank, sizes, count))
  mask = positions[:, :capacity] < count[:, None]
  return jnp.where(mask[..., None], bank[:, :capacity], 0), mask, sizes[:, :capacity]


def update_memory(bank, bank_mask, sizes, new, new_mask, capacity: int):
  """Streaming step: append `new` (B, K, D) / `new_mask` (B, K) to the bank, compress to C.

  `sizes` may be None (all ones). Returns (bank (B, C, D), mask (B, C), sizes (B, C)).
  """
  if sizes is None:
    sizes = jnp.ones(bank_mask.shape, jnp.float32)
  return compress_memory(jnp.concatenate([bank, new.astype(bank.dtype)], axis=1),
                         jnp.concatenate([bank_mask, new_mask], axis=1), capacity,
                         jnp.concatenate([sizes, jnp.ones(new_mask.shape, jnp.float32)], 1))


def pool_tokens(x, mask, key_bias, size: int):
  """Segments of `size` consecutive tokens -> (B, N/size, D) means, mask (B, M), sizes (B, M).

  The mean is weighted by exp(key_bias) over real tokens; size = their total weight.
  """
  b, n, _ = x.shape
  log_w = jnp.zeros((b, n), jnp.float32) if key_bias is None else key_bias.astype(jnp.float32)
  if mask is not None:
    log_w = jnp.where(mask, log_w, NEG)
  log_w = to_blocks(pad_axis(log_w, size, value=NEG), size)  # (B, M, s)
  weights = jnp.where(log_w > NEG / 2, jnp.exp(log_w), 0.0)
  total = weights.sum(-1)
  mean = jnp.einsum("bms,bmsd->bmd", weights / jnp.maximum(total, 1e-30)[..., None],
                    to_blocks(pad_axis(x, size), size).astype(jnp.float32))
  return mean.astype(x.dtype), total > 0, total


class CrossMemoryAttention(nn.Module):
  """Tokens attend to a memory bank. Call: `module(x, memory=None, mask=None,
  memory_mask=None, *, key_bias=None, domain=None, deterministic=True) -> (B, N, D)`.

    memory: (B, M, D) bank (e.g. features of earlier clips, kept by `update_memory`);
      memory_mask (B, M) bool; key_bias (B, M) is added to the memory logits.
    memory None (as an encoder block, `model.attention.type = "cross_memory"`): the bank is
      built from x itself. memory_source "pooled": means of `pool_size` consecutive tokens
      (one frame by default; key_bias (B, N) weights the means), compressed to `capacity`
      entries by `compress_memory`; each entry's logit gets log(its token count).
      "learned": `num_slots` learned entries.
  A 2-D array in the `memory` position is taken as the token mask, so the generic encoder
  call `attn(x, mask, key_bias=...)` works. Causal is only meaningful for learned memory
  (a given memory is the past by construction; a pooled one is not), see __call__.
  """
  num_heads: int
  memory_source: str = "pooled"
  pool_size: int = 196
  capacity: int = 16
  num_slots: int = 16
  causal: bool = False
  dropout_rate: float = 0.0
  lora: LoRASpec | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, memory=None, mask=None, memory_mask=None, *, key_bias=None,
               domain=None, deterministic=True):
    if memory is not None and memory.ndim == 2 and mask is None:
      memory, mask = None, memory
    b, n, d = x.shape
    memory_bias = None
    if memory is None:
      if self.memory_source == "pooled":
        if self.causal:
          raise ValueError("config.model.attention.cross_memory: memory_source='pooled' "
                           "summarises the whole clip and cannot be causal; use 'learned'.")
        memory, memory_mask, sizes = pool_tokens(x, mask, key_bias, self.pool_size)
        if self.capacity and memory.shape[1] > self.capacity:
          memory, memory_mask, sizes = compress_memory(memory, memory_mask, self.capacity,
                                                       sizes)
        memory_bias = jnp.log(jnp.maximum(sizes, 1e-30))
      elif self.memory_source == "learned":
        slots = self.param("memory", partitioned(nn.initializers.normal(0.02),
                                                 ("memory", "embed")),
                           (self.num_slots, d), self.param_dtype)
        memory = jnp.broadcast_to(slots.astype(self.dtype)[None], (b, self.num_slots, d))
      else:
        raise ValueError(f"config.model.attention.cross_memory.memory_source must be "
                         f"'pooled' or 'learned', got {self.memory_source!r}.")
    elif key_bias is not None:
      memory_bias = key_bias
    if memory.ndim != 3 or memory.shape[0] != b or memory.shape[2] != d:
      raise ValueError(f"CrossMemoryAttention memory must be (B, M, D) = ({b}, M, {d}); "
                       f"got {memory.shape}.")
    kw = dict(lora=self.lora, dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = QKVProjection(self.num_heads, name="qkv", **kw)(
        x, domain, kv=memory.astype(self.dtype), deterministic=deterministic)
    logits = jnp.einsum("bnhd,bmhd->bhnm", q * q.shape[-1] ** -0.5, k,
                        preferred_element_type=jnp.float32)
    bias = jnp.zeros(memory.shape[:2], jnp.float32)
    if memory_bias is not None:
      bias = bias + memory_bias.astype(jnp.float32)
    if memory_mask is not None:
      bias = jnp.where(memory_mask, bias, NEG)
    rng = self.make_rng("dropout") if self.dropout_rate > 0 and not deterministic else None
    probs = joint_softmax([logits + bias[:, None, None, :]], self.dropout_rate, rng)[0]
    y = jnp.einsum("bhnm,bmhd->bnhd", probs.astype(v.dtype), v)
    return OutProjection(name="out_proj", **kw)(y, domain, deterministic=deterministic)
