"""Domain router and experts: routing weights, auxiliary losses on hand-made logits, experts
against a naive per-example feed-forward, the thumbnail stem against explicit averaging."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from hvlm_jax.models.domain.experts import (DomainExperts, DomainRouter, router_losses,
                                            routing_weights, thumbnail_stem)


def test_routing_weights_modes():
  logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]))
  np.testing.assert_allclose(routing_weights(logits, "soft"), jnp.exp(logits), rtol=1e-6)
  np.testing.assert_allclose(routing_weights(logits, "top_k", top_k=2),
                             [[0, 0, 3 / 7, 4 / 7], [4 / 7, 3 / 7, 0, 0]], rtol=1e-6)
  np.testing.assert_array_equal(routing_weights(None, "hard", domain=jnp.array([2, 0]),
                                                num_domains=4),
                                [[0, 0, 1, 0], [1, 0, 0, 0]])
  with pytest.raises(ValueError, match="router.mode"):
    routing_weights(logits, "sparse")


def test_router_losses_on_hand_made_logits():
  e = 4
  uniform = router_losses(jnp.zeros((3, e)), jnp.array([0, 1, 2]))
  assert float(uniform["router_balance_loss"]) == pytest.approx(1.0)  # f = (1,0,0,0), P = 1/4
  assert float(uniform["router_ce_loss"]) == pytest.approx(math.log(e), rel=1e-6)
  collapsed = router_losses(jnp.array([[50.0, 0, 0, 0]] * 3))
  assert float(collapsed["router_balance_loss"]) == pytest.approx(e, rel=1e-6)
  assert "router_ce_loss" not in collapsed
  # Two examples, hand computed: p1 = softmax(log(.7,.1,.1,.1)), p2 = (.2,.6,.1,.1).
  logits = jnp.log(jnp.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1]]))
  out = router_losses(logits, jnp.array([0, 2]))
  f, p = np.array([0.5, 0.5, 0, 0]), np.array([0.45, 0.35, 0.1, 0.1])
  assert float(out["router_balance_loss"]) == pytest.approx(e * f @ p, rel=1e-6)
  assert float(out["router_ce_loss"]) == pytest.approx(-(math.log(0.7) + math.log(0.1)) / 2,
                                                       rel=1e-6)
  assert float(out["router_accuracy"]) == 0.5
  # A masked-out example (eval padding) counts nowhere.
  masked = router_losses(jnp.concatenate([logits, jnp.zeros((1, e))]), jnp.array([0, 2, 3]),
                         mask=jnp.array([True, True, False]))
  for k in out:
    assert float(masked[k]) == pytest.approx(float(out[k]), rel=1e-6)


def test_balance_loss_gradient_matches_finite_differences():
  logits = jnp.array([[1.0, 0.2, -0.5, 0.1], [0.3, 1.2, 0.0, -0.2], [0.9, 0.1, 0.4, 0.0]])
  loss = lambda z: router_losses(z)["router_balance_loss"]  # noqa: E731
  g = jax.grad(loss)(logits)
  eps = 1e-3
  for i, j in [(0, 0), (1, 2), (2, 3)]:  # Small steps do not change any argmax here.
    d = jnp.zeros_like(logits).at[i, j].set(eps)
    fd = (loss(logits + d) - loss(logits - d)) / (2 * eps)
    assert float(g[i, j]) == pytest.approx(float(fd), rel=1e-2, abs=1e-4)


def _naive_expert(params, e, x):
  """LN(x) -> expert e's FFN, in numpy float64."""
  x = np.asarray(x, np.float64)
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  h = (x - mu) / np.sqrt(var + 1e-6) * np.asarray(params["ln"]["scale"]) + np.asarray(
      params["ln"]["bias"])
  h = h @ np.asarray(params["w_in"][e], np.float64) + np.asarray(params["b_in"][e])
  h = np.asarray(jax.nn.gelu(jnp.asarray(h)), np.float64)
  return h @ np.asarray(params["w_out"][e], np.float64) + np.asarray(params["b_out"][e])


@pytest.fixture(scope="module")
def experts_setup():
  x = jax.random.normal(jax.random.key(0), (3, 5, 16))
  weights = jnp.ones((3, 4)) / 4
  params = nn.meta.unbox(DomainExperts(4, 24).init(jax.random.key(1), x, weights))["params"]
  fresh = params
  params = dict(params, w_out=0.2 * jax.random.normal(jax.random.key(2), (4, 24, 16)),
                b_out=0.1 * jax.random.normal(jax.random.key(3), (4, 16)))
  return x, fresh, params


def test_fresh_experts_are_the_identity(experts_setup):
  x, fresh, _ = experts_setup
  y = DomainExperts(4, 24).apply({"params": fresh}, x, jax.nn.softmax(jnp.arange(12.).reshape(
      3, 4)))
  np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("top_k", [0, 1, 2])
def test_experts_equal_naive_weighted_sum(experts_setup, top_k):
  x, _, params = experts_setup
  if top_k == 1:
    weights = jax.nn.one_hot(jnp.array([2, 0, 3]), 4)
  elif top_k == 2:
    weights = jnp.array([[0.0, 0.7, 0.3, 0.0], [0.5, 0.0, 0.0, 0.5], [0.0, 0.0, 0.9, 0.1]])
  else:
    weights = jax.nn.softmax(jnp.array([[0.1, 0.5, -0.3, 1.0]] * 3) * jnp.arange(1, 4)[:, None])
  y = DomainExperts(4, 24, top_k=top_k).apply({"params": params}, x, weights)
  for b in range(3):
    ref = np.asarray(x[b], np.float64) + sum(
        float(weights[b, e]) * _naive_expert(params, e, x[b]) for e in range(4))
    np.testing.assert_allclose(y[b], ref, rtol=1e-4, atol=1e-5)


def test_thumbnail_stem_is_block_mean_of_standardised_pixels():
  clip = np.zeros((1, 2, 8, 8, 3), np.uint8)
  clip[0, 0, :4, 4:, 0] = 255  # Top-right block of frame 0, red channel.
  stem = thumbnail_stem(jnp.asarray(clip), 2)  # (1, 2, 2 * 2 * 3), grid row-major
  black, red = (0 - 0.45) / 0.225, (1 - 0.45) / 0.225
  expected = np.full((2, 4, 3), black)
  expected[0, 1, 0] = red
  np.testing.assert_allclose(stem[0], expected.reshape(2, 12), rtol=1e-6)


def test_router_starts_uniform_and_learns_domains():
  """Domains that differ in colour are separable by the thumbnail router in a few steps."""
  import optax
  rng = np.random.default_rng(0)
  domain = np.arange(8) % 4
  clips = rng.integers(0, 60, (8, 2, 8, 8, 3)).astype(np.uint8)
  clips[..., 0] += (domain * 60)[:, None, None, None].astype(np.uint8)
  router = DomainRouter(4, hidden_size=16, pool_size=2)
  params = router.init(jax.random.key(0), clips)["params"]
  np.testing.assert_array_equal(router.apply({"params": params}, clips), 0.0)
  tx = optax.adam(3e-2)

  @jax.jit
  def step(params, opt):
    loss, g = jax.value_and_grad(lambda p: router_losses(
        router.apply({"params": p}, clips), jnp.asarray(domain))["router_ce_loss"])(params)
    updates, opt = tx.update(g, opt)
    return optax.apply_updates(params, updates), opt, loss

  opt = tx.init(params)
  for _ in range(60):
    params, opt, loss = step(params, opt)
  assert float(loss) < 0.1
  np.testing.assert_array_equal(router.apply({"params": params}, clips).argmax(-1), domain)
