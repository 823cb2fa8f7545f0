"""Fused attention kernels where the platform has them, behind one `implementation` option.

  "xla":    each class's plain XLA path (every platform).
  "cudnn":  NVIDIA cuDNN flash attention, `jax.nn.dot_product_attention(implementation=
            "cudnn")`: memory O(N D) instead of O(N^2 H). cuDNN takes float16 / bfloat16 only.
            Full attention calls it directly; local_global calls it on its blocked layout
            (`local_global_dense`: each block of w queries against its 3w neighbour keys and
            the global keys, one batched flash call).
  "splash": Pallas splash attention (TPU): block-sparse, only the (query block, key block)
            tiles its mask touches are computed. Masks for full / causal, local_global
            (frame globals) and strided patterns are computed inside the kernel from token
            indices (`PatternMask`). Off TPU it runs in Pallas interpret mode (tests only).
  "auto":   the fastest available: cudnn on GPU (16-bit compute, no dropout), splash on TPU
            (no dropout, no mask or key_bias), else xla. On CPU always xla.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from hvlm_jax.models.attention.sparse import NEG, neighbour_blocks, pad_axis, to_blocks

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
# Kernels each family can use ("xla" always).
KERNELS = {"full": ("cudnn", "splash"), "local_global": ("cudnn", "splash"),
           "strided": ("splash",)}


def choose(implementation: str | None, family: str, *, dtype, dropout: bool = False,
           masked: bool = False, platform: str | None = None) -> str:
  """The implementation to run: an explicit one as given (checked against `family`), "auto"
  (or None / "") by platform. `masked`: a token mask, key_bias or learned global tokens are
  in play (splash takes none of them)."""
  implementation = implementation or "auto"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention.{family}.implementation must be one of "
                     f"{IMPLEMENTATIONS}, got {implementation!r}.")
  available = KERNELS.get(family, ())
  if implementation not in ("auto", "xla") and implementation not in available:
    raise ValueError(f"{family} attention has no {implementation!r} kernel; it has "
                     f"{('xla',) + available}.")
  if implementation == "splash" and (masked or dropout):
    raise ValueError("implementation='splash' takes no token mask, key_bias, learned global "
                     "tokens or attention dropout; use 'xla' (or 'auto', which falls back).")
  if implementation != "auto":
    return implementation
  platform = platform or jax.default_backend()
  if dropout:
    return "xla"
  if (platform in ("gpu", "cuda") and "cudnn" in available
      and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)):
    return "cudnn"
  if platform == "tpu" and "splash" in available and not masked:
    return "splash"
  return "xla"


def _neg(dtype) -> float:
  """The masking bias for `dtype`: NEG, or half the most negative float16."""
  return max(NEG, float(jnp.finfo(dtype).min) / 2)


def local_global_dense(q, k, v, bias=None, *, window: int, global_idx=None, global_kv=None,
                       causal: bool = False, implementation: str = "cudnn") -> jax.Array:
  """`sparse.local_global_attention`'s pattern as batched dense attention for a fused kernel.

  Queries in blocks of `window` (A blocks) each attend to the keys of blocks a-1, a (, a+1)
  and to the global keys, gathered into one (B*A, 3w + G) key set with an additive bias; the
  global queries' full rows are a second call. Both go through
  `jax.nn.dot_product_attention(implementation=...)` ("cudnn", or "xla" to test the layout).
  Args:
    q, k, v: (B, N, H, Dh), unscaled. bias: (B, N) float32 additive key bias or None.
    global_idx: static (G,) positions; global_kv: (k_g, v_g (B, G', H, Dh), bias_g (B, G')).
  Returns:
    (B, N, H, Dh) in q's dtype. Memory O(N (3w + G) H) for the bias; no N x N array.
  """
  b, n, h, dh = q.shape
  w, neg = window, _neg(q.dtype)
  bias = jnp.zeros((b, n), jnp.float32) if bias is None else bias.astype(jnp.float32)
  a = math.ceil(n / w)
  qpos = np.arange(a * w).reshape(a, w)
  gi = np.asarray(global_idx if global_idx is not None else [], np.int64)
  local_bias = bias
  if len(gi):
    local_bias = jnp.where(np.isin(np.arange(n), gi), NEG, bias)  # Globals count once.
  blocks = lambda t, fill=0.0: neighbour_blocks(to_blocks(pad_axis(t, w, value=fill), w),
                                                causal, fill)
  keys, values = [blocks(k)], [blocks(v)]
  kpos = neighbour_blocks(qpos[None], causal, -1)[0]  # (A, K*w) key positions.
  lb = blocks(local_bias, NEG)[:, :, None, :]  # (B, A, 1, K*w)
  biases = [jnp.where(kpos[None, :, None, :] > qpos[None, :, :, None], NEG, lb) if causal
            else jnp.broadcast_to(lb, (b, a, w, lb.shape[-1]))]
  extra = []
  if len(gi):
    gb = bias[:, None, None, gi]
    if causal:
      gb = jnp.where(gi[None, None, None, :] > qpos[None, :, :, None], NEG, gb)
    extra.append((k[:, gi], v[:, gi], gb))
  if global_kv is not None:
    kg, vg, bg = global_kv
    extra.append((kg, vg, bg.astype(jnp.float32)[:, None, None, :]))
  for kx, vx, bx in extra:
    keys.append(jnp.broadcast_to(kx[:, None], (b, a) + kx.shape[1:]))
    values.append(jnp.broadcast_to(vx[:, None], (b, a) + vx.shape[1:]))
    biases.append(jnp.broadcast_to(bx, (b, a, w, bx.shape[-1])))
  flat = lambda t: t.reshape(b * a, *t.shape[2:])
  full_bias = jnp.maximum(jnp.concatenate(biases, -1), neg).astype(q.dtype)
  y = jax.nn.dot_product_attention(
      flat(to_blocks(pad_axis(q, w), w)), flat(jnp.concatenate(keys, 2)),
      flat(jnp.concatenate(values, 2)), bias=flat(full_bias)[:, None],
      implementation=implementation)
  y = y.reshape(b, a * w, h, dh)[:, :n]
  if len(gi):  # Global queries: full rows over all N keys.
    gbias = bias[:, None, None, :]
    if causal:
      gbias = jnp.where(np.arange(n)[None, None, None, :] > gi[None, None, :, None], NEG,
                        gbias)
    gbias = jnp.broadcast_to(jnp.maximum(gbias, neg), (b, 1, len(gi), n)).astype(q.dtype)
    yg = jax.nn.dot_product_attention(q[:, gi], k, v, bias=gbias,
                                      implementation=implementation)
    y = y.at[:, gi].set(yg)
  return y


@functools.lru_cache(maxsize=None)
def _splash_modules():
  """(splash kernel module, splash mask module, PatternMask), imported on first use: Pallas's
  TPU modules take 0.2-0.4 s to import, paid by every start that never runs splash."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  class PatternMask(masks._ComputableMask):  # noqa: SLF001 (splash's in-kernel mask base)
    """A splash mask computed from (query, key) token indices, on the host for the block map
    and inside the kernel, so no N x N array is stored. `kind`:
      "full":         every key (with `causal`, keys <= query).
      "local_global": keys in the query's block of `window` and its neighbours, keys and
                      queries of frame-global tokens (the first `num_global` of every
                      `tokens_per_frame`, below `n`) everywhere: `local_global_attention`.
      "strided":      keys with the query's residue mod `stride`, and (with `local`) its own
                      block of `stride` keys: `strided_attention`.
    """

    def __init__(self, shape: tuple[int, int], kind: str, *, causal: bool = False,
                 window: int = 0, tokens_per_frame: int = 1, num_global: int = 0, n: int = 0,
                 stride: int = 1, local: bool = True):
      self.params = (kind, causal, window, tokens_per_frame, num_global, n, stride, local)

      def is_global(x):
        return (x % tokens_per_frame < num_global) & (x < n)

      def mask_function(q, kv):
        if kind == "full":
          allowed = (q >= 0) & (kv >= 0)
        elif kind == "local_global":
          near = (kv // window - q // window <= 1) & (q // window - kv // window <= 1)
          allowed = near | is_global(kv) | is_global(q)
        elif kind == "strided":
          allowed = kv % stride == q % stride
          if local:
            allowed = allowed | (kv // stride == q // stride)
        else:
          raise ValueError(f"Unknown splash mask kind {kind!r}.")
        return allowed & (kv <= q) if causal else allowed

      super().__init__(shape, mask_function)

    def __eq__(self, other):
      return (type(self) is type(other) and self.shape == other.shape
              and self.params == other.params)

    def __hash__(self):
      return hash((type(self), self.shape, self.params))

  return splash, masks, PatternMask


def __getattr__(name):  # kernels.PatternMask, without importing Pallas at import time.
  if name == "PatternMask":
    return _splash_modules()[2]
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def splash_attention(q, k, v, kind: str, *, interpret: bool | None = None,
                     **mask_options) -> jax.Array:
  """Pallas splash attention with a `PatternMask` of `kind`; no token mask or key bias.

  Args:
    q, k, v: (B, N, H, Dh), unscaled (scaled by 1/sqrt(Dh) here). N is padded to a multiple
      of 128; padded keys are excluded by segment ids.
    interpret: Pallas interpret mode (default: off TPU), for tests on CPU.
  Returns:
    (B, N, H, Dh) in q's dtype. Time O(touched blocks * 128^2 Dh), memory O(N Dh) per head.
  """
  splash, masks, PatternMask = _splash_modules()  # noqa: N806 (a class)
  b, n, h, dh = q.shape
  n_pad = math.ceil(n / 128) * 128
  block = next(s for s in (512, 256, 128) if n_pad % s == 0)
  mask = PatternMask((n_pad, n_pad), kind, n=n, **mask_options)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block,
                            block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mha(
      masks.MultiHeadMask([mask] * h), block_sizes=sizes, head_shards=1, q_seq_shards=1,
      interpret=jax.default_backend() != "tpu" if interpret is None else interpret)
  heads_first = lambda t: jnp.swapaxes(pad_axis(t, 128), 1, 2)  # (B, H, N_pad, Dh)
  segments = splash.SegmentIds(q=jnp.ones((n_pad,), jnp.int32),
                               kv=(jnp.arange(n_pad) < n).astype(jnp.int32))
  y = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(
      heads_first(q * dh ** -0.5), heads_first(k), heads_first(v))
  return jnp.swapaxes(y, 1, 2)[:, :n].astype(q.dtype)
