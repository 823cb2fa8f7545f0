"""The call contract (common.py) for every registered attention type: padded tokens never
change real outputs, causal outputs never see the future, gradients match finite
differences, bfloat16 compute stays close to float32, every parameter has logical axis names
and LoRA adapters attach to the named projections."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.test_util import check_grads

from hvlm_jax.models import attention
from hvlm_jax.models.domain.lora import LoRASpec

N, D, HEADS = 26, 32, 4
# Small blocks so that every pattern is really sparse at N = 26.
OPTIONS = {
    "strided": dict(stride=5),
    "local_global": dict(window=4, tokens_per_frame=8, query_chunk=8),
    "hierarchical": dict(window=4, pool_sizes=(2, 4), query_chunk=8),
    "cross_memory": dict(pool_size=4, capacity=3),
    "performer": dict(num_features=16, chunk_size=8),
    "linear": dict(chunk_size=8),
    "mamba": dict(chunk_size=8),
}
CAUSAL = ["full", "strided", "local_global", "hierarchical", "performer", "linear", "mamba"]


def build(name, **kw):
  return attention.get(name)(num_heads=HEADS, **{**OPTIONS.get(name, {}), **kw})


def data(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(2, N, D)), jnp.float32)
  mask = np.ones((2, N), bool)
  mask[1, 19:] = mask[1, 6] = False
  return x, mask, jnp.asarray(0.3 * rng.normal(size=(2, N)), jnp.float32)


def init(module, x):
  return module.init({"params": jax.random.key(0), "features": jax.random.key(1)}, x)


@pytest.mark.parametrize("name", sorted(attention.REGISTRY))
def test_padded_tokens_never_change_real_outputs(name):
  x, mask, key_bias = data()
  module = build(name)
  params = init(module, x)
  y = module.apply(params, x, jnp.asarray(mask), key_bias=key_bias)
  noise = 50.0 * np.random.default_rng(1).normal(size=x.shape)
  x2 = jnp.where(mask[..., None], x, noise.astype(np.float32))
  kb2 = jnp.where(mask, key_bias, 7.0)
  y2 = module.apply(params, x2, jnp.asarray(mask), key_bias=kb2)
  assert np.isfinite(np.asarray(y2)).all()
  np.testing.assert_allclose(np.asarray(y2)[mask], np.asarray(y)[mask], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_output_never_sees_later_tokens(name):
  x, mask, key_bias = data(2)
  module = build(name, causal=True)
  params = init(module, x)
  t = 13
  later = np.arange(N) > t
  x2 = jnp.where(later[None, :, None], 3.0 * np.random.default_rng(3).normal(size=x.shape), x)
  kb2 = jnp.where(later[None], 2.0, key_bias)
  y = module.apply(params, x, jnp.asarray(mask), key_bias=key_bias)
  y2 = module.apply(params, x2.astype(jnp.float32), jnp.asarray(mask), key_bias=kb2)
  np.testing.assert_allclose(np.asarray(y2)[:, :t + 1], np.asarray(y)[:, :t + 1], rtol=1e-5,
                             atol=2e-6)
  assert np.abs(np.asarray(y2 - y)[:, t + 1:]).max() > 1e-3  # The future does matter later.


@pytest.mark.parametrize("name", sorted(attention.REGISTRY))
def test_gradients_match_finite_differences(name):
  x, mask, key_bias = data(4)
  x, mask, key_bias = x[:1, :12], mask[1:, :12], key_bias[:1, :12]
  module = build(name)
  params = init(module, x)["params"]
  f = lambda p, x: module.apply({"params": p}, x, jnp.asarray(mask), key_bias=key_bias)
  check_grads(f, (params, x), order=1, modes=("rev",), atol=5e-2, rtol=5e-2, eps=1e-2)


@pytest.mark.parametrize("name", sorted(attention.REGISTRY))
def test_bfloat16_compute_stays_close_to_float32(name):
  x, mask, key_bias = data(5)
  params = init(build(name), x)
  y32 = build(name).apply(params, x, jnp.asarray(mask), key_bias=key_bias)
  y16 = build(name, dtype=jnp.bfloat16).apply(params, x, jnp.asarray(mask), key_bias=key_bias)
  assert y16.dtype == jnp.bfloat16
  err = np.abs(np.asarray(y16, np.float32) - np.asarray(y32))[mask]
  assert err.mean() < 0.02 * np.abs(np.asarray(y32)[mask]).mean() + 1e-3, err.mean()


@pytest.mark.parametrize("name", sorted(attention.REGISTRY))
def test_every_parameter_has_logical_axes_and_lora_attaches(name):
  x, mask, _ = data(6)
  lora = LoRASpec(rank=2, num_domains=3, targets=("query", "key", "value", "out"))
  module = build(name, lora=lora)
  params = init(module, x)["params"]
  boxed = jax.tree.leaves(params, is_leaf=lambda t: isinstance(t, nn.Partitioned))
  for leaf in boxed:
    assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim, leaf
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in
          jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]}
  assert any(p.endswith("lora_b") for p in flat), sorted(flat)
  # A fresh adapter (B = 0) changes nothing; a trained one changes only its domain's output.
  domain = jnp.array([0, 2])
  params = nn.meta.unbox(params)
  base = module.apply({"params": params}, x, jnp.asarray(mask))
  np.testing.assert_allclose(module.apply({"params": params}, x, jnp.asarray(mask),
                                          domain=domain), base, atol=1e-6)
  bumped = jax.tree_util.tree_map_with_path(
      lambda path, v: v.at[2].set(0.5) if "lora_b" in str(path[-1]) else v, params)
  y = module.apply({"params": bumped}, x, jnp.asarray(mask), domain=domain)
  np.testing.assert_allclose(y[0], base[0], atol=1e-6)  # Domain 0 untouched.
  assert np.abs(np.asarray(y[1] - base[1])).max() > 1e-3
