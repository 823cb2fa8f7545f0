"""selective_scan (every method) against the float64 Python loop over the recurrence of Gu &
Dao (2023), its gradients against finite differences, and the Mamba block's initialisation,
method equivalence, directionality and padding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from hvlm_jax.models.attention import mamba

BATCH, L, D, NS = 2, 37, 6, 4


def scan_inputs(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  return dict(u=f(BATCH, L, D), delta=f(BATCH, L, D) * 0.5,
              A=-np.exp(f(D, NS) * 0.5).astype(np.float32), B=f(BATCH, L, NS),
              C=f(BATCH, L, NS), D=f(D), z=f(BATCH, L, D), delta_bias=f(D) * 0.3)


@pytest.mark.parametrize("method,chunk", [("scan", 64), ("associative", 64), ("chunked", 8),
                                          ("chunked", 64)])
@pytest.mark.parametrize("full", [False, True])
def test_selective_scan_equals_python_loop(method, chunk, full):
  a = scan_inputs()
  kw = dict(D=a["D"], z=a["z"], delta_bias=a["delta_bias"], delta_softplus=True) if full else {}
  delta = a["delta"] if full else np.abs(a["delta"])
  out = mamba.selective_scan(a["u"], delta, a["A"], a["B"], a["C"], method=method,
                             chunk_size=chunk, **kw)
  ref = mamba.selective_scan_ref(a["u"], delta, a["A"], a["B"], a["C"], **kw)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_selective_scan_resumes_from_a_state():
  a = scan_inputs(1)
  args = lambda sl: (a["u"][:, sl], np.abs(a["delta"][:, sl]), a["A"], a["B"][:, sl],
                     a["C"][:, sl])
  y1, h = mamba.selective_scan(*args(slice(0, 20)), return_state=True)
  y2 = mamba.selective_scan(*args(slice(20, None)), initial_state=h)
  ref = mamba.selective_scan_ref(*args(slice(None)))
  np.testing.assert_allclose(np.concatenate([y1, y2], 1), ref, rtol=1e-5, atol=1e-5)


def test_selective_scan_state_is_float32_for_bfloat16_inputs():
  a = scan_inputs(2)
  bf = {k: jnp.asarray(v, jnp.bfloat16) for k, v in a.items()}
  out = mamba.selective_scan(bf["u"], bf["delta"], bf["A"], bf["B"], bf["C"], bf["D"],
                             delta_softplus=True)
  assert out.dtype == jnp.bfloat16
  ref = mamba.selective_scan_ref(*(np.asarray(bf[k], np.float32) for k in "u delta A B C D"
                                   .split()), delta_softplus=True)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("method", ["scan", "chunked"])
def test_selective_scan_gradients_match_finite_differences(method):
  a = scan_inputs(3)
  sl = lambda x: x[:1, :9]
  f = lambda u, delta, A, B, C, D, z: mamba.selective_scan(
      u, delta, A, B, C, D, z, a["delta_bias"], True, method=method, chunk_size=4)
  args = [jnp.asarray(x, jnp.float32) for x in (sl(a["u"]), sl(a["delta"]), a["A"],
                                                 sl(a["B"]), sl(a["C"]), a["D"], sl(a["z"]))]
  check_grads(f, args, order=1, modes=("rev",), atol=3e-2, rtol=3e-2, eps=1e-2)


def test_mamba_initialisation_follows_the_paper():
  layer = mamba.MambaLayer(state_size=8, dt_min=1e-3, dt_max=0.1)
  x = jnp.zeros((1, 5, 32))
  p = jax.tree.map(np.asarray, layer.init(jax.random.key(0), x)["params"])
  fwd = jax.tree.map(lambda t: getattr(t, "value", t), p["forward"],
                     is_leaf=lambda t: hasattr(t, "value"))
  np.testing.assert_allclose(fwd["A_log"], np.log(np.tile(np.arange(1, 9), (64, 1))), rtol=1e-6)
  np.testing.assert_array_equal(fwd["D"], 1.0)
  dt = np.logaddexp(0.0, fwd["dt_proj"]["bias"])  # softplus(bias) = the initial dt.
  assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
  assert np.abs(fwd["dt_proj"]["kernel"]).max() <= 2 ** -0.5  # dt_rank = ceil(32/16) = 2.
  assert set(p) == {"in_proj", "forward", "backward", "out_proj"}


def test_mamba_methods_agree_and_padding_never_touches_real_tokens():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 30, 16)), jnp.float32)
  mask = np.ones((2, 30), bool)
  mask[1, 20:] = mask[1, 7] = mask[0, 0] = False
  key_bias = jnp.asarray(rng.normal(size=(2, 30)) * 0.3, jnp.float32)
  params = mamba.MambaLayer(chunk_size=8).init(jax.random.key(0), x)
  outs = [mamba.MambaLayer(chunk_size=8, scan_method=m).apply(params, x, mask,
                                                              key_bias=key_bias)
          for m in ("chunked", "scan", "associative")]
  for y in outs[1:]:
    np.testing.assert_allclose(y, outs[0], rtol=1e-5, atol=1e-6)
  x2 = jnp.where(mask[..., None], x, 100.0 * rng.normal(size=x.shape))
  y2 = mamba.MambaLayer(chunk_size=8).apply(params, x2, mask, key_bias=key_bias)
  np.testing.assert_allclose(np.asarray(y2)[mask], np.asarray(outs[0])[mask], atol=1e-6)


def test_unidirectional_mamba_is_causal_and_bidirectional_is_not():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(1, 24, 16)), jnp.float32)
  x2 = x.at[:, 15:].set(jnp.asarray(rng.normal(size=(1, 9, 16)), jnp.float32))
  for causal in (True, False):
    layer = mamba.MambaLayer(causal=causal, chunk_size=8)
    params = layer.init(jax.random.key(0), x)
    diff = np.abs(np.asarray(layer.apply(params, x) - layer.apply(params, x2)))[:, :15].max()
    assert (diff < 1e-6) == causal, (causal, diff)
