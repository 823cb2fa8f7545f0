"""Memory-bank cross-attention and MA-LMM compression against Python references: a list-based
merge loop following MA-LMM's `memory_bank_compress`, and softmax cross-attention written
out with the module's own projections."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvlm_jax.models.attention import memory
from hvlm_jax.models.attention.common import OutProjection, QKVProjection


def reference_compress(bank, mask, capacity, sizes):
  """While over capacity: merge the most cosine-similar adjacent pair (first on ties) into
  their size-weighted mean, summing sizes. Python lists, float64."""
  result = []
  for b in range(bank.shape[0]):
    xs = [bank[b, i].astype(np.float64) for i in range(bank.shape[1]) if mask[b, i]]
    ss = [float(sizes[b, i]) for i in range(bank.shape[1]) if mask[b, i]]
    while len(xs) > capacity:
      sims = [xs[i] @ xs[i + 1] / (np.linalg.norm(xs[i]) * np.linalg.norm(xs[i + 1]))
              for i in range(len(xs) - 1)]
      i = int(np.argmax(sims))
      xs[i] = (xs[i] * ss[i] + xs[i + 1] * ss[i + 1]) / (ss[i] + ss[i + 1])
      ss[i] += ss.pop(i + 1)
      xs.pop(i + 1)
    result.append((xs, ss))
  return result


@pytest.mark.parametrize("capacity", [1, 3, 6, 12])
def test_compress_memory_equals_merge_loop(capacity):
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(3, 11, 5)).astype(np.float32)
  mask = rng.random((3, 11)) > 0.3  # Real entries need not be contiguous.
  mask[2] = False
  mask[2, :2] = True
  sizes = rng.integers(1, 4, (3, 11)).astype(np.float32)
  out, out_mask, out_sizes = jax.jit(memory.compress_memory, static_argnums=2)(
      bank, mask, capacity, sizes)
  assert out.shape == (3, capacity, 5)
  for b, (xs, ss) in enumerate(reference_compress(bank, mask, capacity, sizes)):
    k = len(xs)
    np.testing.assert_array_equal(out_mask[b], np.arange(capacity) < k)
    np.testing.assert_allclose(out[b, :k], np.array(xs), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_sizes[b, :k], ss)
    np.testing.assert_array_equal(out[b, k:], 0.0)


def test_streaming_updates_equal_one_compression_of_everything_when_nothing_merges_across():
  # Entries of three well-separated directions: MA-LMM merges within a direction first, so
  # appending frame by frame and compressing once at the end give the same bank.
  rng = np.random.default_rng(1)
  dirs = np.eye(4, dtype=np.float32)[:3] * 5
  frames = np.concatenate([dirs[i] + 0.01 * rng.normal(size=(4, 4)) for i in range(3)])
  frames = frames.astype(np.float32)[None]  # (1, 12, 4)
  bank, mask, sizes = frames[:, :3], np.ones((1, 3), bool), None
  for t in range(3, 12):
    bank, mask, sizes = memory.update_memory(bank, mask, sizes, frames[:, t:t + 1],
                                             np.ones((1, 1), bool), 3)
  ref, _, ref_sizes = memory.compress_memory(frames, np.ones((1, 12), bool), 3)
  np.testing.assert_allclose(bank, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sizes, ref_sizes)
  np.testing.assert_allclose(np.asarray(bank)[0], dirs, atol=0.02)


def cross_attention_reference(params, x, mem, mem_mask, mem_bias, heads):
  q, k, v = QKVProjection(heads).apply({"params": params["qkv"]}, x, kv=mem)
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1]) + mem_bias[:, None, None]
  logits = np.where(mem_mask[:, None, None], logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  y = np.einsum("bhnm,bmhd->bnhd", p / p.sum(-1, keepdims=True), v).astype(np.float32)
  return OutProjection().apply({"params": params["out_proj"]}, jnp.asarray(y))


def test_cross_memory_with_a_given_bank_equals_softmax_cross_attention():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 9, 16)), jnp.float32)
  mem = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
  mem_mask = np.array([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0]], bool)
  mem_bias = rng.normal(size=(2, 5)).astype(np.float32)
  module = memory.CrossMemoryAttention(num_heads=4)
  params = module.init(jax.random.key(0), x, mem)
  out = module.apply(params, x, mem, None, mem_mask, key_bias=jnp.asarray(mem_bias))
  ref = cross_attention_reference(params["params"], x, mem, mem_mask, mem_bias, 4)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_cross_memory_as_encoder_block_attends_to_compressed_pooled_frames():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 22, 16)), jnp.float32)  # 6 "frames" of 4, last partial
  mask = np.ones((2, 22), bool)
  mask[1, 17:] = mask[1, 2] = False
  module = memory.CrossMemoryAttention(num_heads=4, pool_size=4, capacity=3)
  params = module.init(jax.random.key(0), x)
  out = module.apply(params, x, jnp.asarray(mask))  # The encoder's positional mask call.
  # Reference: frame means over real tokens, MA-LMM-compressed to 3, log(size) logit bias.
  xs = np.asarray(x, np.float64)
  bank, bank_mask, sizes = np.zeros((2, 6, 16)), np.zeros((2, 6), bool), np.zeros((2, 6))
  for b in range(2):
    for f in range(6):
      idx = [i for i in range(4 * f, min(4 * f + 4, 22)) if mask[b, i]]
      if idx:
        bank[b, f], bank_mask[b, f], sizes[b, f] = xs[b, idx].mean(0), True, len(idx)
  entries, entry_sizes = [], []
  for xs_b, ss_b in reference_compress(bank, bank_mask, 3, sizes):
    entries.append(np.array(xs_b)), entry_sizes.append(np.array(ss_b))
  mem = jnp.asarray(np.stack(entries), jnp.float32)
  ref = cross_attention_reference(params["params"], x, mem, np.ones((2, 3), bool),
                                  np.log(np.stack(entry_sizes)), 4)
  np.testing.assert_allclose(np.asarray(out)[mask], np.asarray(ref)[mask], rtol=1e-4,
                             atol=1e-5)


def test_cross_memory_learned_slots_and_clear_errors():
  x = jnp.ones((1, 6, 16))
  module = memory.CrossMemoryAttention(num_heads=2, memory_source="learned", num_slots=3)
  params = module.init(jax.random.key(0), x)
  assert params["params"]["memory"].value.shape == (3, 16)
  assert params["params"]["memory"].names == ("memory", "embed")
  with pytest.raises(ValueError, match="memory_source"):
    memory.CrossMemoryAttention(num_heads=2, memory_source="bank").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="cannot be causal"):
    memory.CrossMemoryAttention(num_heads=2, causal=True).init(jax.random.key(0), x)
