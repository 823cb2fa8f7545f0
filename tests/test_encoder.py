"""VideoEncoder: tubelet embedding against explicit patches, layout, masks, dtypes, remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from hvlm_jax.models.encoder import VideoEncoder

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, tubelet_size=(2, 4, 4))


@pytest.fixture(scope="module")
def clip():
  return jax.random.uniform(jax.random.key(0), (2, 4, 8, 8, 3))


@pytest.fixture(scope="module")
def variables(clip):
  return VideoEncoder(**SMALL).init(jax.random.key(1), clip)


def test_tubelet_embedding_equals_explicit_patch_projection(clip, variables):
  enc = VideoEncoder(**SMALL)
  out, inter = enc.apply(variables, clip, capture_intermediates=(
      lambda mdl, _: mdl.name == "tubelet_embedding"), mutable=["intermediates"])
  conv = inter["intermediates"]["tubelet_embedding"]["__call__"][0]
  tokens, grid = conv.reshape(2, 2, 4, 32), out["grid"]
  params = nn.meta.unbox(variables)["params"]["tubelet_embedding"]
  x = (clip - 0.45) / 0.225
  t, p = 2, 4
  # Token (time i, space j) is the (2, 4, 4) tube at frames 2i.., rows 4(j//2).., cols 4(j%2)..
  expected = np.zeros((2, 2, 4, 32), np.float32)
  for i in range(2):
    for j in range(4):
      r, c = (j // 2) * p, (j % 2) * p
      tube = x[:, i * t:(i + 1) * t, r:r + p, c:c + p, :]
      expected[:, i, j] = np.einsum("bthwc,thwcd->bd", tube, params["kernel"]) + params["bias"]
  assert grid == (2, 4)
  np.testing.assert_allclose(tokens, expected, rtol=1e-4, atol=1e-4)


def test_outputs_are_time_major_and_time_features_average_space(clip, variables):
  out = VideoEncoder(**SMALL).apply(variables, clip)
  assert out["tokens"].shape == (2, 8, 32) and out["token_mask"].all()
  np.testing.assert_allclose(out["time_features"],
                             out["tokens"].reshape(2, 2, 4, 32).mean(2), rtol=1e-5, atol=1e-6)


def test_each_example_is_encoded_independently(clip, variables):
  enc = VideoEncoder(**SMALL)
  both = enc.apply(variables, clip)["tokens"]
  alone = enc.apply(variables, clip[1:])["tokens"]
  np.testing.assert_allclose(both[1:], alone, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params(clip):
  enc = VideoEncoder(**SMALL, dtype=jnp.bfloat16)
  v = enc.init(jax.random.key(1), clip)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(v)))
  out = enc.apply(v, clip)
  assert out["tokens"].dtype == jnp.bfloat16
  ref = VideoEncoder(**SMALL).apply(v, clip)["tokens"]
  np.testing.assert_allclose(np.asarray(out["tokens"], np.float32), ref, atol=0.1)


def test_every_parameter_has_logical_axis_names(variables):
  boxes = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
  assert all(len(b.names) == b.value.ndim for b in boxes)


def test_remat_gives_the_same_gradients(clip, variables):
  params = nn.meta.unbox(variables)

  def loss(params, policy):
    out = VideoEncoder(**SMALL, remat_policy=policy).apply(params, clip)
    return jnp.sum(out["tokens"] ** 2)

  g_plain = jax.grad(loss)(params, None)
  g_remat = jax.grad(loss)(params, "nothing_saveable")
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_features_mode_makes_one_token_per_time_step():
  feats = jax.random.normal(jax.random.key(2), (2, 6, 12))
  enc = VideoEncoder(**SMALL)
  v = enc.init(jax.random.key(1), feats)
  out = enc.apply(v, feats)
  assert out["tokens"].shape == (2, 6, 32) and out["grid"] == (6, 1)
  np.testing.assert_allclose(out["time_features"], out["tokens"], rtol=1e-6)
