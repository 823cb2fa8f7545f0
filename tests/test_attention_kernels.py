"""Performer (FAVOR+) and linear attention against their kernels written quadratically
(phi(Q) phi(K)^T V, normalised, causal by masking), FAVOR+ against exact softmax attention as
the feature count grows, and the random-feature draw (orthogonality, redraw, fixed eval)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvlm_jax.models.attention import linear

B, N, H, DH = 2, 29, 2, 8


def inputs(seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  q, k, v = (scale * rng.normal(size=(B, N, H, DH)).astype(np.float32) for _ in range(3))
  key_bias = (0.5 * rng.normal(size=(B, N))).astype(np.float32)
  mask = np.arange(N)[None] < np.array([[N], [N - 7]])
  mask[1, 3] = False  # A hole in the middle as well as trailing padding.
  return q, k, v, key_bias, mask


def quadratic_favor(q, k, v, w_proj, key_bias, mask, eps, causal, xp=np):
  """FAVOR+ kernel as an explicit N x N matrix. phi(q) = exp(w.q' - |q'|^2/2 - max_f) + eps;
  key j's features exp(w.k' - |k'|^2/2 + key_bias_j - C_i) + eps exp(key_bias_j) with C_i the
  max over the keys query i sees (the shared stabiliser cancels). xp=np: float64 NumPy;
  xp=jnp: float32 JAX, differentiable (the reference for gradients)."""
  if xp is np:
    q, k, v, w_proj = (np.asarray(t, np.float64) for t in (q, k, v, w_proj))
  d = q.shape[-1]
  qs, ks = q * d ** -0.25, k * d ** -0.25
  lq = xp.einsum("bnhd,md->bnhm", qs, w_proj) - 0.5 * (qs ** 2).sum(-1, keepdims=True)
  phi_q = xp.exp(lq - lq.max(-1, keepdims=True)) + eps
  log_w = xp.where(mask, key_bias, -xp.inf)
  lk = (xp.einsum("bnhd,md->bnhm", ks, w_proj) - 0.5 * (ks ** 2).sum(-1, keepdims=True)
        + log_w[:, :, None, None])
  out = []
  for i in range(q.shape[1]):
    js = slice(0, i + 1) if causal else slice(None)
    c = lk[:, js].max(axis=(1, 3))  # (B, H)
    phi_k = xp.exp(lk[:, js] - c[:, None, :, None]) + eps * xp.exp(log_w[:, js])[..., None, None]
    a = xp.einsum("bhm,bjhm->bhj", phi_q[:, i], phi_k)
    out.append(xp.einsum("bhj,bjhd->bhd", a, v[:, js]) / a.sum(-1)[..., None])
  return xp.stack(out, 1)


def quadratic_linear(q, k, v, key_bias, mask, eps, causal):
  """Katharopoulos et al. (2020), Eq. 6 / 9: phi = elu + 1, phi(k) scaled by exp(key_bias)."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  phi = lambda x: np.where(x > 0, x + 1.0, np.exp(x))
  a = np.einsum("bqhd,bkhd->bhqk", phi(q), phi(k))
  a = a * np.where(mask, np.exp(key_bias), 0.0)[:, None, None, :]
  if causal:
    a = np.tril(a)
  return np.einsum("bhqk,bkhd->bqhd", a, v) / (a.sum(-1) + eps).transpose(0, 2, 1)[..., None]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [5, 64])
def test_favor_equals_its_quadratic_kernel(causal, chunk, monkeypatch):
  monkeypatch.setattr(linear, "STREAM_CHUNK", chunk)  # Bidirectional streaming chunks too.
  q, k, v, key_bias, mask = inputs(0)
  w_proj = linear.orthogonal_features(jax.random.key(1), 16, DH)
  log_w = linear.key_log_weights(jnp.asarray(mask), jnp.asarray(key_bias), mask.shape)
  out = linear.favor_attention(q, k, v, w_proj, log_w, causal=causal, eps=1e-3,
                               chunk_size=chunk)
  ref = quadratic_favor(q, k, v, w_proj, key_bias, mask, 1e-3, causal)
  np.testing.assert_allclose(np.asarray(out)[mask], ref[mask], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_equals_its_quadratic_kernel(causal, monkeypatch):
  monkeypatch.setattr(linear, "STREAM_CHUNK", 8)
  q, k, v, key_bias, mask = inputs(1)
  module = linear.LinearAttention(num_heads=H, causal=causal, chunk_size=6)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(B, N, H * DH)), jnp.float32)
  params = module.init(jax.random.key(0), x)
  out = module.apply(params, x, jnp.asarray(mask), key_bias=jnp.asarray(key_bias))
  # Reference from the module's own projections.
  from hvlm_jax.models.attention.common import OutProjection, QKVProjection
  q, k, v = QKVProjection(H).apply({"params": params["params"]["qkv"]}, x)
  y = quadratic_linear(q, k, v, key_bias, mask, 1e-6, causal).astype(np.float32)
  ref = OutProjection().apply({"params": params["params"]["out_proj"]}, jnp.asarray(y))
  np.testing.assert_allclose(np.asarray(out)[mask], np.asarray(ref)[mask], rtol=1e-4,
                             atol=1e-5)


def test_causal_favor_stabiliser_does_not_leak_the_future():
  q, k, v, key_bias, mask = inputs(3)
  mask = np.ones_like(mask)
  w_proj = linear.orthogonal_features(jax.random.key(1), 32, DH)
  run = lambda kk: linear.favor_attention(q, kk, v, w_proj, causal=True, eps=1e-6,
                                          chunk_size=8)
  t = 12
  # Future keys 30x larger: under the official one-max-over-all-keys stabiliser every past
  # key feature would underflow next to eps and the past outputs would change.
  k_future = k.copy()
  k_future[:, t + 1:] *= 30.0
  np.testing.assert_allclose(run(k_future)[:, :t + 1], run(k)[:, :t + 1], rtol=1e-5,
                             atol=1e-6)


def exact_softmax(q, k, v):
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def test_favor_error_against_softmax_shrinks_with_feature_count():
  q, k, v, _, _ = inputs(4, scale=0.6)
  ref = exact_softmax(*(np.asarray(t, np.float64) for t in (q, k, v)))
  errors = []
  for m in (8, 64, 512, 4096):
    err = [np.abs(np.asarray(linear.favor_attention(
        q, k, v, linear.orthogonal_features(jax.random.key(s), m, DH), causal=False,
        eps=1e-6)) - ref).mean() for s in range(4)]
    errors.append(np.mean(err))
  assert all(a > b for a, b in zip(errors, errors[1:])), errors
  assert errors[3] < errors[1] / 3, errors  # Monte Carlo: error ~ m^(-1/2), 64x -> ~8x.


def test_orthogonal_features_rows_orthogonal_and_marginally_gaussian():
  d, blocks = 16, 1024
  w = np.asarray(linear.orthogonal_features(jax.random.key(0), d * blocks, d), np.float64)
  block = w[:d] / np.linalg.norm(w[:d], axis=1, keepdims=True)
  np.testing.assert_allclose(block @ block.T, np.eye(d), atol=1e-5)
  sq = (w ** 2).sum(1)  # chi^2_d: mean d, variance 2d.
  assert abs(sq.mean() - d) < 4 * np.sqrt(2 * d / len(sq))
  # Row r of every block is N(0, I): mean 0 and identity covariance across blocks. Plain
  # Householder QR fails this (its sign convention fixes the direction of the first row).
  per_row = w.reshape(blocks, d, d)
  assert np.abs(per_row.mean(0)).max() < 5 / np.sqrt(blocks)
  for r in (0, d - 1):
    np.testing.assert_allclose(np.cov(per_row[:, r].T), np.eye(d), atol=0.25)


def test_performer_redraws_in_training_and_is_fixed_at_eval():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 20, 16)), jnp.float32)
  module = linear.PerformerAttention(num_heads=2, num_features=8)
  params = module.init(jax.random.key(0), x)
  train = lambda key: module.apply(params, x, deterministic=False, rngs={"features": key})
  assert not np.allclose(train(jax.random.key(1)), train(jax.random.key(2)))
  np.testing.assert_array_equal(train(jax.random.key(1)), train(jax.random.key(1)))
  eval_a, eval_b = module.apply(params, x), module.apply(params, x)
  np.testing.assert_array_equal(eval_a, eval_b)
  other_seed = linear.PerformerAttention(num_heads=2, num_features=8, feature_seed=1)
  assert not np.allclose(other_seed.apply(params, x), eval_a)
  with pytest.raises(ValueError, match="'features' PRNG stream"):
    module.apply(params, x, deterministic=False)


# ----- fused kernels (kernels.py) against the XLA paths ------------------------------------------
from hvlm_jax.models.attention import kernels, sparse  # noqa: E402
from hvlm_jax.models.attention.full import FullAttention  # noqa: E402


def test_auto_chooses_the_kernel_by_platform_dtype_and_dropout():
  choose = kernels.choose
  assert choose("auto", "full", dtype=jnp.float32) == "xla"  # This machine: CPU.
  assert choose("auto", "full", dtype=jnp.bfloat16, platform="gpu") == "cudnn"
  assert choose("auto", "full", dtype=jnp.float32, platform="gpu") == "xla"  # cuDNN: 16-bit.
  assert choose("auto", "local_global", dtype=jnp.bfloat16, platform="gpu") == "cudnn"
  assert choose("auto", "strided", dtype=jnp.bfloat16, platform="gpu") == "xla"
  assert choose("auto", "strided", dtype=jnp.float32, platform="tpu") == "splash"
  assert choose("auto", "full", dtype=jnp.float32, platform="tpu", masked=True) == "xla"
  assert choose("auto", "full", dtype=jnp.bfloat16, platform="gpu", dropout=True) == "xla"
  with pytest.raises(ValueError, match="no 'cudnn' kernel"):
    choose("cudnn", "strided", dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="takes no token mask"):
    choose("splash", "full", dtype=jnp.float32, masked=True)


def kernel_inputs(seed=0, b=2, n=100, h=2, dh=8):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, dh)), jnp.float32) for _ in range(3))
  mask = np.ones((b, n), bool)
  mask[-1, 80:] = mask[0, 5] = False
  key_bias = jnp.asarray(0.3 * rng.normal(size=(b, n)), jnp.float32)
  return q, k, v, mask, key_bias


def assert_same_values_and_gradients(f, g, args, valid=None, atol=2e-5):
  """f(*args) == g(*args) at the `valid` (B, N) positions, and the gradients of a random
  projection of those outputs w.r.t. every argument."""
  out_f, out_g = f(*args), g(*args)
  valid = np.ones(out_f.shape[:2], bool) if valid is None else valid
  np.testing.assert_allclose(np.asarray(out_f)[valid], np.asarray(out_g)[valid], atol=atol)
  weight = jnp.asarray(np.random.default_rng(9).normal(size=out_f.shape), jnp.float32)
  weight = weight * jnp.asarray(valid, jnp.float32)[:, :, None, None]
  grads = lambda fn: jax.grad(lambda *a: jnp.sum(fn(*a) * weight), range(len(args)))(*args)
  for gf, gg in zip(grads(f), grads(g)):
    np.testing.assert_allclose(gf, gg, atol=atol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_written_out_xla_path_equals_dot_product_attention(causal, masked):
  # Full attention's XLA path (full.softmax_attention, faster on XLA:CPU) computes
  # jax.nn.dot_product_attention's function: scaling, key bias, fully masked rows, causality.
  from hvlm_jax.models.attention.full import softmax_attention
  q, k, v, mask, key_bias = kernel_inputs(4)
  mask[0] = False  # A fully masked example: both give every key the same weight.
  bias = None
  if masked:
    bias = jnp.where(jnp.asarray(mask), key_bias, -1e9)[:, None, None, :]
  ours = lambda q, k, v: softmax_attention(q, k, v, bias, causal=causal)
  reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=causal,
                                                           implementation="xla")
  assert_same_values_and_gradients(ours, reference, (q, k, v))


# Learned summaries are never causal (LocalGlobalAttention rejects the combination).
@pytest.mark.parametrize("causal,globals_", [(False, "frame"), (True, "frame"),
                                             (False, "learned")])
def test_local_global_dense_layout_equals_the_blocked_xla_path(causal, globals_):
  """The layout the cuDNN path feeds to its kernel, run through XLA's dense attention."""
  q, k, v, mask, key_bias = kernel_inputs(1)
  bias = sparse.padded_key_bias(jnp.asarray(mask), key_bias, *mask.shape, mask.shape[1])
  opts = dict(window=16, causal=causal)
  if globals_ == "frame":
    opts["global_idx"] = sparse.frame_global_positions(mask.shape[1], 25, 2)
  else:
    rng = np.random.default_rng(2)
    g = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    opts["global_kv"] = (g(2, 3, 2, 8), g(2, 3, 2, 8), g(2, 3) * 0.1)
  blocked = lambda q, k, v: sparse.local_global_attention(q, k, v, bias, **opts)
  dense = lambda q, k, v: kernels.local_global_dense(q, k, v, bias, implementation="xla",
                                                     **opts)
  assert_same_values_and_gradients(dense, blocked, (q, k, v), mask)


@pytest.mark.parametrize("kind,options", [
    ("full", {}),
    ("local_global", dict(window=16, tokens_per_frame=25, num_global=2)),
    ("strided", dict(stride=10)),
])
@pytest.mark.parametrize("causal", [False, True])
def test_splash_kernel_equals_the_xla_path_in_interpret_mode(kind, options, causal):
  q, k, v, _, _ = kernel_inputs(3, b=1)
  n = q.shape[1]
  if kind == "full":
    xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  elif kind == "local_global":
    gi = sparse.frame_global_positions(n, options["tokens_per_frame"], options["num_global"])
    xla = lambda q, k, v: sparse.local_global_attention(q, k, v, window=options["window"],
                                                        global_idx=gi, causal=causal)
  else:
    xla = lambda q, k, v: sparse.strided_attention(q, k, v, stride=options["stride"],
                                                   causal=causal)
  fused = lambda q, k, v: kernels.splash_attention(q, k, v, kind, causal=causal,
                                                   interpret=True, **options)
  assert_same_values_and_gradients(fused, xla, (q, k, v))


@pytest.mark.parametrize("cls,options", [
    (FullAttention, {}),
    (sparse.LocalGlobalAttention, dict(window=16, tokens_per_frame=25, num_global=2)),
    (sparse.StridedAttention, dict(stride=10)),
])
def test_attention_classes_route_implementation_splash_to_the_kernel(cls, options):
  x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 100, 16)), jnp.float32)
  params = cls(num_heads=2, **options).init(jax.random.key(0), x)
  run = lambda impl: cls(num_heads=2, implementation=impl, **options).apply(params, x)
  np.testing.assert_allclose(run("splash"), run("xla"), atol=2e-5)
  with pytest.raises(ValueError, match="takes no token mask"):
    cls(num_heads=2, implementation="splash", **options).apply(params, x,
                                                               jnp.ones((1, 100), bool))


def test_attention_dropout_runs_on_the_xla_path_whatever_the_kernel():
  # cuDNN has no attention dropout: implementation="cudnn" with dropout in training takes the
  # XLA path (never the kernel, so this runs anywhere) and drops the same probabilities.
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 12, 16)), jnp.float32)
  params = FullAttention(num_heads=2).init(jax.random.key(0), x)
  run = lambda impl, **kw: FullAttention(num_heads=2, implementation=impl, dropout_rate=0.5).apply(
      params, x, rngs={"dropout": jax.random.key(1)}, **kw)
  dropped = run("xla", deterministic=False)
  np.testing.assert_array_equal(run("cudnn", deterministic=False), dropped)
  assert not np.allclose(dropped, run("xla"))  # Dropout did act.


def test_cudnn_kernels_equal_the_xla_path_on_a_gpu():
  if jax.default_backend() != "gpu":
    pytest.skip(f"cuDNN flash attention needs an NVIDIA GPU; this run's backend is "
                f"{jax.default_backend()!r} (tools/device_check.py runs it on a GPU)")
  q, k, v, mask, key_bias = (t.astype(jnp.bfloat16) if t.dtype == jnp.float32 else t
                             for t in kernel_inputs(5, n=256, dh=64))
  bias = sparse.padded_key_bias(jnp.asarray(mask), key_bias, *mask.shape, mask.shape[1])
  full = lambda impl: lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, bias=bias[:, None, None, :].astype(q.dtype), implementation=impl)
  assert_same_values_and_gradients(full("cudnn"), full("xla"), (q, k, v), mask, atol=3e-2)
  gi = sparse.frame_global_positions(256, 64, 1)
  local = lambda impl: lambda q, k, v: kernels.local_global_dense(
      q, k, v, bias, window=64, global_idx=gi, implementation=impl)
  assert_same_values_and_gradients(local("cudnn"), local("xla"), (q, k, v), mask, atol=3e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_favor_gradients_equal_its_quadratic_kernels(causal, monkeypatch):
  """Gradients in q, k, v and the key bias, streamed in chunks of 8 (the key scales go on the
  values, eps through einsums), against autodiff of the quadratic form."""
  monkeypatch.setattr(linear, "STREAM_CHUNK", 8)
  q, k, v, key_bias, mask = (jnp.asarray(t) for t in inputs(4))
  w_proj = linear.orthogonal_features(jax.random.key(1), 16, DH)
  ct = jnp.asarray(np.random.default_rng(5).normal(size=q.shape) * mask[..., None, None],
                   jnp.float32)  # Padded queries' outputs are not compared.

  def ours(q, k, v, kb):
    log_w = linear.key_log_weights(mask, kb, mask.shape)
    return linear.favor_attention(q, k, v, w_proj, log_w, causal=causal, eps=1e-3,
                                  chunk_size=8)
  grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * ct), argnums=range(4)))(
      q, k, v, key_bias)
  ref = lambda q, k, v, kb: quadratic_favor(q, k, v, w_proj, kb, mask, 1e-3, causal, jnp)
  for name, got, want in zip("q k v key_bias".split(), grads(ours), grads(ref)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=name)
