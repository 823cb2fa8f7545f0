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


def test_chunked_scan_vjp_equals_autodiff_of_the_plain_recurrence():
  """The hand-written backward of `chunked_scan` against JAX's autodiff of the recurrence
  written as one lax.scan, in float64, with an initial state, a cotangent on the last state,
  and several chunks."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float64)
    b, length, d, n, chunk = 2, 12, 5, 3, 4
    args = (f(b, length, d), jnp.abs(f(b, length, d)) * 0.5, -jnp.exp(f(d, n) * 0.5),
            f(b, length, n), f(b, length, n), f(b, d, n))

    def plain(u, delta, A, B, C, h0):
      def step(h, xs):
        u_t, d_t, b_t, c_t = xs
        h = jnp.exp(d_t[:, :, None] * A) * h + (d_t * u_t)[:, :, None] * b_t[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, c_t)
      h, y = jax.lax.scan(step, h0, tuple(jnp.moveaxis(t, 1, 0) for t in (u, delta, B, C)))
      return jnp.moveaxis(y, 0, 1), h

    y_bar, h_bar = f(b, length, d), f(b, d, n)
    loss = lambda fn: lambda *a: (jnp.sum(fn(*a)[0] * y_bar) + jnp.sum(fn(*a)[1] * h_bar))
    ours = jax.grad(loss(lambda *a: mamba.chunked_scan(*a, chunk)), argnums=range(6))(*args)
    ref = jax.grad(loss(plain), argnums=range(6))(*args)
    np.testing.assert_allclose(mamba.chunked_scan(*args, chunk)[0], plain(*args)[0], rtol=1e-12)
    for name, g, r in zip("u delta A B C h0".split(), ours, ref):
      assert g.dtype == jnp.float64
      np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12, err_msg=name)


def test_per_channel_ops_have_autodiffs_gradients():
  """`_channel_mul` / `_channel_add` (parameter gradients summed as a dot) against JAX's
  autodiff of the plain broadcast ops, in float64 and, accumulating in float32, bfloat16; and
  the whole layer's parameter gradients with them against the layer built from plain ops."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    x, w, g = (jnp.asarray(rng.normal(size=s)) for s in ((2, 5, 3), (3,), (2, 5, 3)))
    for ours, plain in ((mamba._channel_mul, lambda x, w: x * w),
                        (mamba._channel_add, lambda x, w: x + w)):
      for dtype, tol in ((jnp.float64, 1e-12), (jnp.bfloat16, 2e-2)):
        args = (x.astype(dtype), w.astype(dtype))
        np.testing.assert_array_equal(ours(*args), plain(*args))
        got = jax.vjp(ours, *args)[1](g.astype(dtype))
        want = jax.vjp(plain, *(a.astype(jnp.float64) for a in args))[1](g)
        for a, b in zip(got, want):
          assert a.dtype == dtype
          np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)

  xs = jnp.asarray(rng.normal(size=(2, 20, 8)), jnp.float32)
  layer = mamba.MambaLayer(chunk_size=8)
  params = layer.init(jax.random.key(0), xs)
  grads = lambda: jax.grad(lambda p: jnp.sum(layer.apply(p, xs) ** 2))(params)
  ours = grads()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(mamba, "_channel_mul", lambda x, w: x * w)
    mp.setattr(mamba, "_channel_add", lambda x, w: x + w)
    ref = grads()
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
