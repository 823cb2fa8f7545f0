"""Block-sparse attention (strided, local_global, hierarchical) against independent references:
a dense softmax over the N x N mask that defines each pattern, a per-query loop that builds the
hierarchical key sets by hand, and FullAttention itself when the pattern covers everything."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvlm_jax.models.attention import full, hierarchical, sparse

B, N, H, DH = 2, 37, 3, 8


def qkv_bias(seed=0, n=N):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=(B, n, H, DH)).astype(np.float32) for _ in range(3))
  return q, k, v, rng.normal(size=(B, n)).astype(np.float32)


def dense_masked(q, k, v, bias, allowed):
  """Softmax attention restricted to `allowed` (N, N) bool, in float64."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]) + bias[:, None, None]
  logits = np.where(allowed, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


I, J = np.arange(N)[:, None], np.arange(N)[None, :]


@pytest.mark.parametrize("stride", [1, 5, 6])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("local", [False, True])
def test_strided_equals_dense_masked_pattern(stride, causal, local):
  q, k, v, bias = qkv_bias()
  allowed = I % stride == J % stride
  if local:
    allowed |= I // stride == J // stride
  if causal:
    allowed &= J <= I
  out = sparse.strided_attention(q, k, v, bias, stride=stride, local=local, causal=causal)
  np.testing.assert_allclose(out, dense_masked(q, k, v, bias, allowed), atol=2e-6)


@pytest.mark.parametrize("window", [4, 7, 40])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_global", [False, True])
def test_local_global_equals_dense_longformer_pattern(window, causal, with_global):
  q, k, v, bias = qkv_bias(1)
  allowed = np.abs(I // window - J // window) <= 1
  if causal:
    allowed = (I // window - J // window <= 1) & (J <= I)
  g = sparse.frame_global_positions(N, 9, 2) if with_global else None
  if with_global:  # Global tokens attend to all and are attended by all.
    allowed = allowed.copy()
    allowed[g, :] = allowed[:, g] = True
    if causal:
      allowed &= J <= I
  # A small query_chunk runs several remat steps and pads the last one.
  out = sparse.local_global_attention(q, k, v, bias, window=window, global_idx=g,
                                      causal=causal, query_chunk=9)
  np.testing.assert_allclose(out, dense_masked(q, k, v, bias, allowed), atol=2e-6)


def test_local_global_learned_summaries_are_extra_keys():
  q, k, v, bias = qkv_bias(2)
  rng = np.random.default_rng(3)
  kg, vg = (rng.normal(size=(B, 3, H, DH)).astype(np.float32) for _ in range(2))
  bg = rng.normal(size=(B, 3)).astype(np.float32)
  out = sparse.local_global_attention(q, k, v, bias, window=6, global_kv=(kg, vg, bg))
  # Reference: the summaries appended as 3 keys every query may see.
  allowed = np.zeros((N, N + 3), bool)
  allowed[:, :N] = np.abs(I // 6 - J // 6) <= 1
  allowed[:, N:] = True
  ref = dense_masked(q, np.concatenate([k, kg], 1), np.concatenate([v, vg], 1),
                     np.concatenate([bias, bg], 1), allowed)
  np.testing.assert_allclose(out, ref, atol=2e-6)


def naive_hierarchical(q, k, v, bias, w, sizes, causal):
  """Per query: exact keys of the neighbouring blocks; at level l the bias-weighted segment
  means (bias logsumexp) of segments inside level l's region and outside level l-1's."""
  q, k, v, bias = (np.asarray(t, np.float64) for t in (q, k, v, bias))
  b, n, h, dh = q.shape
  out = np.zeros_like(q)
  region = lambda i, size: ((i // size - 1) * size, (i // size + (1 if causal else 2)) * size)
  for bi in range(b):
    for i in range(n):
      keys, vals, lb = [], [], []
      lo, hi = region(i, w)
      for j in range(max(lo, 0), min(hi, n)):
        if not (causal and j > i):
          keys.append(k[bi, j]), vals.append(v[bi, j]), lb.append(bias[bi, j])
      prev = w
      for level, s in enumerate(sizes):
        r_lo, r_hi = region(i, w * s) if level < len(sizes) - 1 else (-np.inf, np.inf)
        p_lo, p_hi = region(i, prev)
        for start in range(0, n, s):
          if not r_lo <= start < r_hi or p_lo <= start < p_hi or (causal and start >= p_hi):
            continue
          js = np.arange(start, min(start + s, n))
          wt = np.exp(bias[bi, js] - bias[bi, js].max())
          keys.append(np.einsum("j,jhd->hd", wt / wt.sum(), k[bi, js]))
          vals.append(np.einsum("j,jhd->hd", wt / wt.sum(), v[bi, js]))
          lb.append(bias[bi, js].max() + np.log(wt.sum()))
        prev = w * s
      logits = np.einsum("hd,khd->hk", q[bi, i], np.stack(keys)) / np.sqrt(dh) + np.array(lb)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      out[bi, i] = np.einsum("hk,khd->hd", p / p.sum(-1, keepdims=True), np.stack(vals))
  return out


@pytest.mark.parametrize("window,sizes", [(4, (2,)), (4, (2, 4)), (6, (3, 6)), (8, ())])
@pytest.mark.parametrize("causal", [False, True])
def test_hierarchical_equals_per_query_reference(window, sizes, causal):
  q, k, v, bias = qkv_bias(4, n=45)
  out = hierarchical.hierarchical_attention(q, k, v, bias, window=window, pool_sizes=sizes,
                                            causal=causal, query_chunk=13)
  np.testing.assert_allclose(out, naive_hierarchical(q, k, v, bias, window, sizes, causal),
                             atol=2e-6)


def test_hierarchical_rejects_misaligned_levels():
  with pytest.raises(ValueError, match="pool_sizes"):
    hierarchical.check_levels(196, (48,))
  with pytest.raises(ValueError, match="pool_sizes"):
    hierarchical.check_levels(8, (4, 6))


@pytest.mark.parametrize("cls,options", [
    (sparse.StridedAttention, dict(stride=1)),
    (sparse.LocalGlobalAttention, dict(window=64, global_tokens="frame", tokens_per_frame=8)),
    (hierarchical.HierarchicalAttention, dict(window=64, pool_sizes=(8,))),
])
@pytest.mark.parametrize("causal", [False, True])
def test_pattern_covering_everything_equals_full_attention(cls, options, causal):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(B, 30, 32)), jnp.float32)
  mask = jnp.asarray(np.arange(30)[None] < np.array([[30], [23]]))
  key_bias = jnp.asarray(rng.normal(size=(B, 30)), jnp.float32)
  ref_module = full.FullAttention(num_heads=4, causal=causal)
  params = ref_module.init(jax.random.key(0), x)  # Same parameter names: qkv, out_proj.
  ref = ref_module.apply(params, x, mask, key_bias=key_bias)
  out = cls(num_heads=4, causal=causal, **options).apply(params, x, mask, key_bias=key_bias)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-5)


def dense_masked_jax(q, k, v, bias, allowed):
  """`dense_masked` in JAX float32, differentiable (each allowed set is non-empty)."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]) + bias[:, None, None]
  p = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("pattern", ["strided", "local_global"])
def test_sparse_gradients_equal_dense_masked_gradients(pattern):
  """The outputs are divided by the softmax sum after the value product (joint_softmax with
  normalize=False); their gradients in q, k, v and the key bias equal those of a dense masked
  softmax."""
  q, k, v, bias = (jnp.asarray(t) for t in qkv_bias(4))
  if pattern == "strided":
    allowed = (I % 5 == J % 5) | (I // 5 == J // 5)
    fn = lambda *a: sparse.strided_attention(*a, stride=5)
  else:
    g = sparse.frame_global_positions(N, 9, 2)
    allowed = np.abs(I // 7 - J // 7) <= 1
    allowed[g, :] = allowed[:, g] = True
    fn = lambda *a: sparse.local_global_attention(*a, window=7, global_idx=g, query_chunk=9)
  ct = jnp.asarray(np.random.default_rng(5).normal(size=(B, N, H, DH)), jnp.float32)
  grads = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * ct), argnums=range(4))(q, k, v, bias)
  for name, got, want in zip("q k v bias".split(), grads(fn),
                             grads(lambda *a: dense_masked_jax(*a, allowed))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_joint_softmax_unnormalised_weights_give_the_same_attention():
  """normalize=False (weights, total): weights @ v / total equals probs @ v, with dropout
  (the same mask) and for a query whose keys are all masked (NEG: uniform, as before)."""
  rng = np.random.default_rng(6)
  logits = [jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32),
            jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)]
  logits = [lg.at[1, 2].set(sparse.NEG) for lg in logits]  # Query (1, 2) sees no key.
  vs = [jnp.asarray(rng.normal(size=(2, lg.shape[-1], 6)), jnp.float32) for lg in logits]
  for rate, key in ((0.0, None), (0.4, jax.random.key(0))):
    probs = sparse.joint_softmax(logits, rate, key)
    weights, total = sparse.joint_softmax(logits, rate, key, normalize=False)
    want = sum(jnp.einsum("bqk,bkd->bqd", p, v) for p, v in zip(probs, vs))
    got = sum(jnp.einsum("bqk,bkd->bqd", w, v) for w, v in zip(weights, vs)) / total
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(total[1, 2], 7.0)  # exp(0) for each of the 4 + 3 keys.
