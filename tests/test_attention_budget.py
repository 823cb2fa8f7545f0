"""No N x N array in any sub-quadratic variant: at N = 6272 (32 frames of 14 x 14 patches),
D = 768, 12 heads, the compiled temporary memory of the forward and of the forward+backward
program is at most a tenth of full attention's (XLA path). Lowering and compiling only:
nothing is executed, and each variant is compiled once per program."""
import functools

import jax
import jax.numpy as jnp
import pytest

from hvlm_jax.models import attention

N, D, HEADS = 6272, 768, 12
X = jax.ShapeDtypeStruct((1, N, D), jnp.float32)


def temp_bytes(name: str) -> tuple[int, int]:
  """(forward, forward+backward) compiled temp bytes of one layer at (1, N, D)."""
  module = attention.get(name)(num_heads=HEADS)
  params = jax.eval_shape(
      lambda k, x: module.init({"params": k, "features": k}, x), jax.random.key(0), X)
  forward = jax.jit(lambda p, x: module.apply(p, x))
  loss = lambda p, x, ct: jnp.sum(module.apply(p, x) * ct)
  backward = jax.jit(jax.grad(loss, argnums=(0, 1)))
  fwd = forward.lower(params, X).compile().memory_analysis().temp_size_in_bytes
  bwd = backward.lower(params, X, X).compile().memory_analysis().temp_size_in_bytes
  return fwd, bwd


@functools.cache
def full_bytes():
  return temp_bytes("full")


def test_full_attention_materialises_n_by_n():
  fwd, _ = full_bytes()
  assert fwd >= HEADS * N * N * 4  # At least one float32 (H, N, N) logits array.


@pytest.mark.parametrize("name", sorted(set(attention.REGISTRY) - {"full"}))
def test_compiled_memory_is_at_most_a_tenth_of_full(name):
  full_fwd, full_bwd = full_bytes()
  fwd, bwd = temp_bytes(name)
  assert fwd <= 0.1 * full_fwd, (fwd / 1e6, full_fwd / 1e6)
  assert bwd <= 0.1 * full_bwd, (bwd / 1e6, full_bwd / 1e6)
