"""A fully masked example (every token padding) is legal under the attention contract
(common.py): for every registered attention type and the memory bank, it must keep every
gradient of the batch finite and leave the other examples' outputs as they are alone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvlm_jax.models import attention
from hvlm_jax.models.attention.memory import compress_memory, update_memory
import test_attention_contract

N, D, HEADS = 16, 32, 4
OPTIONS = dict(test_attention_contract.OPTIONS, strided=dict(stride=4))  # Blocks of N = 16.
CAUSAL = test_attention_contract.CAUSAL
VARIANTS = [(n, False) for n in sorted(attention.REGISTRY)] + [(n, True) for n in CAUSAL]
RNGS = {"params": jax.random.key(0), "features": jax.random.key(1)}


def batch():
  """x (3, N, D), key_bias (3, N), mask (3, N): example 1 fully masked, example 2 padded."""
  rng = np.random.default_rng(0)
  mask = np.ones((3, N), bool)
  mask[1] = False
  mask[2, 11:] = False
  return (jnp.asarray(rng.normal(size=(3, N, D)), jnp.float32),
          jnp.asarray(0.3 * rng.normal(size=(3, N)), jnp.float32), jnp.asarray(mask))


def finite(tree):
  return all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name,causal", VARIANTS, ids=[f"{n}{'-causal' if c else ''}"
                                                       for n, c in VARIANTS])
def test_fully_masked_example_keeps_gradients_finite_and_others_unchanged(name, causal):
  x, key_bias, mask = batch()
  kw = dict(OPTIONS.get(name, {}), **({"causal": True} if causal else {}))
  if name == "cross_memory" and causal:
    kw["memory_source"] = "learned"
  module = attention.get(name)(num_heads=HEADS, **kw)
  params = module.init(RNGS, x[:1])["params"]
  apply = lambda p, x, kb, m: module.apply({"params": p}, x, m, key_bias=kb,  # noqa: E731
                                           rngs={"features": RNGS["features"]})
  y = apply(params, x, key_bias, mask)
  assert finite(y)
  for i in (0, 2):  # Real examples: as if run alone.
    alone = apply(params, x[i:i + 1], key_bias[i:i + 1], mask[i:i + 1])
    np.testing.assert_allclose(np.asarray(y[i]), np.asarray(alone[0]), rtol=1e-5, atol=2e-6)
  # A loss on every output, the masked example's included: the strictest cotangent.
  cot = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
  loss = lambda p, x, kb: (apply(p, x, kb, mask) * cot).sum()  # noqa: E731
  grads = jax.grad(loss, argnums=(0, 1, 2))(params, x, key_bias)
  assert finite(grads), name


def test_memory_compression_of_an_empty_bank_keeps_gradients_finite():
  rng = np.random.default_rng(2)
  bank = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
  bank_mask = jnp.asarray(np.array([[True] * 6, [False] * 6]))

  def loss(bank):
    out, m, sizes = compress_memory(bank, bank_mask, 3)
    return (out ** 2).sum() + sizes.sum(), (out, m, sizes)

  grads, (out, m, sizes) = jax.grad(loss, has_aux=True)(bank)
  assert finite(grads) and not np.asarray(m[1]).any() and np.asarray(sizes[1]).sum() == 0
  alone = compress_memory(bank[:1], bank_mask[:1], 3)
  np.testing.assert_allclose(np.asarray(out[0]), np.asarray(alone[0][0]), rtol=1e-6)
  # Streaming: an empty bank and an empty update, next to a real example.
  new = jnp.asarray(rng.normal(size=(2, 2, 8)), jnp.float32)
  g = jax.grad(lambda new: (update_memory(bank, bank_mask, None, new,
                                          jnp.asarray([[True, True], [False, False]]), 3)[0]
                            ** 2).sum())(new)
  assert finite(g)
