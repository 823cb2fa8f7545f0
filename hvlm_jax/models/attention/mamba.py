"""Mamba (Gu & Dao, 2023): the selective scan as a function, and a bidirectional Mamba block.

selective_scan computes, per channel d and state n, in float32 whatever the input dtype:
  delta <- softplus(delta + delta_bias)             (optional)
  h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t    (zero-order hold for A, Euler for B)
  y_t = C_t . h_t + D u_t;  y_t *= silu(z_t)        (optional D skip and z gate)
Methods (same result; `selective_scan_ref` is the Python-loop reference):
  "chunked":     the default. A sequential scan with a hand-written VJP (`chunked_scan`): the
                 forward keeps one state per chunk of `chunk_size` steps; the backward
                 recomputes a chunk's states from its stored start and runs the adjoint
                 recurrence g_{t-1} = a_t g_t + C_t ybar_t backwards through it, every
                 gradient formed inside the loop. Time O(L d n) both ways; memory
                 O((L / c) d n + c d n) besides the (L, d) inputs. On XLA:CPU (6272 tokens,
                 width 768, idle) the backward loops take ~4x the forward loop's instruction
                 time (two exps and ~20 small instructions a step, each a dispatch) and the
                 layer's backward 2.7-3.0x its forward. Forming the gradients over whole
                 chunks after the loop was slower (README, Mamba).
  "scan":        lax.scan over time, differentiated by JAX: it stores every state, O(L d n)
                 memory, and its backward costs ~10x its forward on CPU.
  "associative": lax.associative_scan over time, parallel in O(log L) depth but it
                 materialises (L, d, n) several times over: at 6272 tokens, width 768 it needs
                 ~2.6x full attention's memory (measured). For accelerators and short L only.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from hvlm_jax.models.attention.sparse import pad_axis
from hvlm_jax.models.domain.lora import LoRASpec, lora_dense
from hvlm_jax.models.layers import Dtype, partitioned

METHODS = ("scan", "associative", "chunked")


# Per-channel parameters (conv taps and bias, D) act on every token of a chunk; their gradients
# sum over the tokens. Differentiated by JAX, that sum is a reduce over a major axis, which
# XLA:CPU's YNN library ran at ~2.5 ms per (128, 1536) chunk inside the layer's loops
# (profiled; a single such reduce alone takes ~0.06 ms). These two give the same values with
# the sum written as a (1 x N) @ (N x d) dot, accumulated in float32 or wider; a forward +
# backward at 6272 tokens, width 768 went from 3.2 s to 2.4 s (README, Mamba).
def _leading_sum(t):
  """Sum over every axis but the last, in float32 or wider."""
  flat = t.reshape(-1, t.shape[-1]).astype(jnp.promote_types(t.dtype, jnp.float32))
  return jnp.ones((flat.shape[0],), flat.dtype) @ flat


@jax.custom_vjp
def _channel_mul(x, w):
  """x * w, w (d,) broadcast over x's leading axes."""
  return x * w


def _channel_mul_fwd(x, w):
  return x * w, (x, w)


def _channel_mul_bwd(res, g):
  x, w = res
  return (g * w).astype(x.dtype), _leading_sum(g * x).astype(w.dtype)


_channel_mul.defvjp(_channel_mul_fwd, _channel_mul_bwd)


@jax.custom_vjp
def _channel_add(x, w):
  """x + w, w (d,) broadcast over x's leading axes."""
  return x + w


def _channel_add_fwd(x, w):
  return x + w, w


def _channel_add_bwd(w, g):
  return g, _leading_sum(g).astype(w.dtype)


_channel_add.defvjp(_channel_add_fwd, _channel_add_bwd)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   method: str = "chunked", chunk_size: int = 64, initial_state=None,
                   return_state: bool = False):
  """Selective scan (Gu & Dao 2023, Algorithm 2), channels last.

  Args:
    u, delta, z: (batch, L, d). A: (d, n) (negative real). B, C: (batch, L, n).
    D, delta_bias: (d,). method: one of METHODS. chunk_size: steps per chunk ("chunked").
    initial_state: (batch, d, n) state before step 0 (default zeros), for streaming.
  Returns:
    y (batch, L, d) in u's dtype (all state arithmetic in float32); with return_state,
    (y, last state (batch, d, n) float32).
  """
  if method not in METHODS:
    raise ValueError(f"selective_scan method must be one of {METHODS}, got {method!r} "
                     f"(config.model.attention.mamba.scan_method).")
  f32 = jnp.float32
  out_dtype = u.dtype
  u32, delta, A, B, C = (t.astype(f32) for t in (u, delta, A, B, C))
  if delta_bias is not None:
    delta = delta + delta_bias.astype(f32)
  if delta_softplus:
    delta = jax.nn.softplus(delta)
  batch, length, d = u32.shape
  h0 = (jnp.zeros((batch, d, A.shape[1]), f32) if initial_state is None
        else initial_state.astype(f32))
  if method == "associative":
    y, h = _chunk_associative(u32, delta, A, B, C, h0)
  elif method == "scan":
    y, h = _chunk_sequential(u32, delta, A, B, C, h0)
  else:
    c = min(chunk_size, length)
    # Padding steps have delta = 0: exp(0) = 1 and no input, so the state passes unchanged.
    y, h = chunked_scan(*(pad_axis(t, c) for t in (u32, delta)), A,
                        *(pad_axis(t, c) for t in (B, C)), h0, c)
    y = y[:, :length]
  if D is not None:
    y = y + _channel_mul(u32, D.astype(f32))
  if z is not None:
    y = y * jax.nn.silu(z.astype(f32))
  return (y.astype(out_dtype), h) if return_state else y.astype(out_dtype)


def _chunk_sequential(u, delta, A, B, C, h):
  """One step at a time; returns y (batch, L, d) and the last state (batch, d, n)."""
  def step(h, xs):
    u_t, dt, b_t, c_t = xs
    h = jnp.exp(dt[:, :, None] * A) * h + (dt * u_t)[:, :, None] * b_t[:, None, :]
    return h, jnp.einsum("bdn,bn->bd", h, c_t)
  h, y = jax.lax.scan(step, h, tuple(jnp.moveaxis(t, 1, 0) for t in (u, delta, B, C)))
  return jnp.moveaxis(y, 0, 1), h


# ----- chunked scan with a hand-written VJP ------------------------------------------------------
# Inside the loops the state is laid out (batch, n, d): d is the long, contiguous axis, and every
# reduction is a dot over b-batched operands. On XLA:CPU a reduction over a minor axis of 16, or
# an einsum batched over d, costs 5-10x more per step than these forms (measured).
def _time_major(t, c):
  """(b, K*c, ...) -> (K, c, b, ...)."""
  b, length = t.shape[:2]
  return jnp.moveaxis(t.reshape(b, length // c, c, *t.shape[2:]), 0, 2)


def _batch_major(t):
  """(K, c, b, ...) -> (b, K*c, ...)."""
  return jnp.moveaxis(t, 2, 0).reshape(t.shape[2], -1, *t.shape[3:])


def _step(h, a_t, u_t, d_t, b_t):
  """h_t = a_t h_{t-1} + B_t (delta_t u_t), state (b, n, d)."""
  return a_t * h + b_t[:, :, None] * (d_t * u_t)[:, None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def chunked_scan(u, delta, A, B, C, h0, chunk: int):
  """The recurrence without D, z or softplus, all float32.

  Args:
    u, delta: (b, L, d) with L a multiple of `chunk`. A: (d, n). B, C: (b, L, n).
    h0: (b, d, n) state before step 0.
  Returns:
    y (b, L, d), last state (b, d, n). Differentiable in every argument but `chunk`.
  """
  return _chunked_fwd(u, delta, A, B, C, h0, chunk)[0]


def _chunked_fwd(u, delta, A, B, C, h0, chunk):
  at = A.T

  def one_chunk(h, xs):
    def step(h, xs):
      u_t, d_t, b_t, c_t = xs
      h = _step(h, jnp.exp(at * d_t[:, None, :]), u_t, d_t, b_t)
      return h, jnp.einsum("bnd,bn->bd", h, c_t)
    h_end, y = jax.lax.scan(step, h, xs)
    return h_end, (y, h)

  h0 = jnp.swapaxes(h0, 1, 2)
  h, (y, starts) = jax.lax.scan(one_chunk, h0,
                                tuple(_time_major(t, chunk) for t in (u, delta, B, C)))
  if starts.shape[0] == 1:  # Taken from the input, the forward loop is dead code under remat.
    starts = h0[None]
  return (_batch_major(y), jnp.swapaxes(h, 1, 2)), (u, delta, A, B, C, starts)


def _chunked_bwd(chunk, residuals, cotangents):
  """Chunks in reverse: recompute the chunk's states, then run the adjoint through it.

  With g_t = dL/dh_t (total), s_t = g_t * h_{t-1} * a_t and x_t = delta_t u_t:
    g_t = ybar_t C_t + a_{t+1} g_{t+1};  Cbar_t = h_t . ybar_t;  Bbar_t = g_t . x_t;
    xbar_t = g_t . B_t;  ubar_t = xbar_t delta_t;  deltabar_t = xbar_t u_t + sum_n s_t A;
    Abar = sum_t s_t delta_t;  h0bar = a_0 g_0.
  Cbar_t is formed in the recomputing loop, where h_t is at hand.
  """
  u, delta, A, B, C, starts = residuals
  ybar, hbar = cotangents
  at = A.T
  ones_n = jnp.ones(starts.shape[1:3], jnp.float32)

  def one_chunk(carry, xs):
    u_k, d_k, b_k, c_k, yb_k, h_in = xs

    def recompute(h, xs):
      u_t, d_t, b_t, yb = xs
      h_t = _step(h, jnp.exp(at * d_t[:, None, :]), u_t, d_t, b_t)
      return h_t, (h, jnp.einsum("bnd,bd->bn", h_t, yb))

    _, (h_prev, cbar) = jax.lax.scan(recompute, h_in, (u_k, d_k, b_k, yb_k))

    def adjoint(carry, xs):
      g, s_acc = carry
      hp, u_t, d_t, b_t, c_t, yb = xs
      a_t = jnp.exp(at * d_t[:, None, :])
      x_t = d_t * u_t
      g = g + c_t[:, :, None] * yb[:, None, :]
      xbar = jnp.einsum("bnd,bn->bd", g, b_t)
      s = g * hp * a_t
      dbar = xbar * u_t + jnp.einsum("bnd,bn->bd", s * at, ones_n)
      outs = (xbar * d_t, dbar, jnp.einsum("bnd,bd->bn", g, x_t))
      return (a_t * g, s_acc + s * d_t[:, None, :]), outs

    carry, outs = jax.lax.scan(adjoint, carry, (h_prev, u_k, d_k, b_k, c_k, yb_k), reverse=True)
    return carry, outs + (cbar,)

  xs = tuple(_time_major(t, chunk) for t in (u, delta, B, C, ybar)) + (starts,)
  (g, s_acc), (ubar, dbar, bbar, cbar) = jax.lax.scan(
      one_chunk, (jnp.swapaxes(hbar, 1, 2), jnp.zeros_like(starts[0])), xs, reverse=True)
  return (_batch_major(ubar), _batch_major(dbar), s_acc.sum(0).T, _batch_major(bbar),
          _batch_major(cbar), jnp.swapaxes(g, 1, 2))


chunked_scan.defvjp(_chunked_fwd, _chunked_bwd)


def _chunk_associative(u, delta, A, B, C, h):
  """Parallel prefix over (a, b) pairs: (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)."""
  a = jnp.exp(delta[..., None] * A)
  b = (delta * u)[..., None] * B[:, :, None, :]
  prod, acc = jax.lax.associative_scan(lambda x, y: (x[0] * y[0], y[0] * x[1] + y[1]),
                                       (a, b), axis=1)
  states = acc + prod * h[:, None]
  return jnp.einsum("bldn,bln->bld", states, C), states[:, -1]


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False) -> np.ndarray:
  """The recurrence as a plain float64 NumPy loop over time (the test reference)."""
  u, delta, A, B, C = (np.asarray(t, np.float64) for t in (u, delta, A, B, C))
  if delta_bias is not None:
    delta = delta + np.asarray(delta_bias, np.float64)
  if delta_softplus:
    delta = np.logaddexp(0.0, delta)
  batch, length, d = u.shape
  h = np.zeros((batch, d, A.shape[1]))
  ys = []
  for t in range(length):
    h = np.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None]
    ys.append(np.einsum("bdn,bn->bd", h, C[:, t]))
  y = np.stack(ys, axis=1)
  if D is not None:
    y = y + u * np.asarray(D, np.float64)
  if z is not None:
    z = np.asarray(z, np.float64)
    y = y * z / (1.0 + np.exp(-z))
  return y


def _inverse_softplus(x):
  return x + jnp.log(-jnp.expm1(-x))


class _SSMDirection(nn.Module):
  """One scan direction over a segment: causal depthwise conv -> SiLU -> x_proj (dt, B, C) ->
  dt_proj -> softplus -> selective scan with D skip. Call `(carry, xs) -> (carry, y)`:
    carry: (tail (B, k-1, d_inner) inputs before the segment, for the conv; state
      (B, d_inner, n)), so that a stream can be fed segment by segment.
    xs: (x (B, c, d_inner) zero at padding, valid (B, c) float, input_scale (B, c)).
  Padding has delta = 0, so it neither writes to nor decays the state.
  """
  state_size: int
  dt_rank: int
  conv_size: int
  dt_min: float
  dt_max: float
  dt_init_floor: float
  scan_method: str
  chunk_size: int
  lora: LoRASpec | None
  dtype: Dtype
  param_dtype: Dtype
  deterministic: bool = True

  @nn.compact
  def __call__(self, carry, xs, domain=None):
    tail, h = carry
    x, valid, input_scale = xs
    di, n, r, k = x.shape[-1], self.state_size, self.dt_rank, self.conv_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    taps = self.param("conv_kernel", partitioned(
        nn.initializers.lecun_normal(in_axis=0, out_axis=1), ("conv", "mlp")),
                      (k, di), self.param_dtype).astype(self.dtype)
    conv_bias = self.param("conv_bias", partitioned(nn.initializers.zeros, ("mlp",)), (di,),
                           self.param_dtype)
    xp = jnp.concatenate([tail.astype(self.dtype), x.astype(self.dtype)], axis=1)
    length = x.shape[1]
    u = sum(_channel_mul(xp[:, i:i + length], taps[i]) for i in range(k))
    u = nn.silu(_channel_add(u, conv_bias.astype(self.dtype)))
    dbc = lora_dense(r + 2 * n, "query", self.lora, name="x_proj", kernel_axes=("mlp", None),
                     use_bias=False, **kw)(u, domain, deterministic=self.deterministic)
    dt, b_sel, c_sel = jnp.split(dbc, [r, r + n], axis=-1)

    def dt_bias_init(key, shape, dtype):
      log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(self.dt_min),
                                  math.log(self.dt_max))
      return _inverse_softplus(jnp.maximum(jnp.exp(log_dt), self.dt_init_floor)).astype(dtype)

    bound = r ** -0.5
    delta = nn.Dense(
        di, name="dt_proj", kernel_init=partitioned(
            lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
            (None, "mlp")),
        bias_init=partitioned(dt_bias_init, ("mlp",)), **kw)(dt)
    a_log = self.param("A_log", partitioned(
        lambda key, shape, dtype: jnp.log(jnp.broadcast_to(
            jnp.arange(1, shape[1] + 1, dtype=dtype), shape)), ("mlp", "state")),
                       (di, n), self.param_dtype)
    skip = self.param("D", partitioned(nn.initializers.ones, ("mlp",)), (di,), self.param_dtype)
    delta = jax.nn.softplus(delta.astype(jnp.float32)) * valid[..., None]
    b_sel = b_sel.astype(jnp.float32) * input_scale[..., None]
    y, h = selective_scan(u, delta, -jnp.exp(a_log.astype(jnp.float32)), b_sel, c_sel, skip,
                          method=self.scan_method, chunk_size=self.chunk_size,
                          initial_state=h, return_state=True)
    return (xp[:, xp.shape[1] - (k - 1):], h), y


def _direction(ssm: dict, name: str, x, valid, scale, domain, deterministic, parent: nn.Module):
  """Runs one direction: one _SSMDirection call, or ("chunked") a remat'ed nn.scan over
  chunks, whose temporaries are chunk-sized and reused from chunk to chunk."""
  b, length, di = x.shape
  carry = (jnp.zeros((b, ssm["conv_size"] - 1, di), x.dtype),
           jnp.zeros((b, di, ssm["state_size"]), jnp.float32))
  if ssm["scan_method"] != "chunked":
    return _SSMDirection(name=name, deterministic=deterministic, parent=parent, **ssm)(
        carry, (x, valid, scale), domain)[1]
  c = min(ssm["chunk_size"], length)
  chunk = lambda t: pad_axis(t, c).reshape(b, -1, c, *t.shape[2:])
  scanned = nn.scan(nn.remat(_SSMDirection), variable_broadcast="params",
                    split_rngs={"params": False, "dropout": True},
                    in_axes=(1, nn.broadcast), out_axes=1)
  _, y = scanned(name=name, deterministic=deterministic, parent=parent, **ssm)(
      carry, (chunk(x), chunk(valid), chunk(scale)), domain)
  return y.reshape(b, -1, di)[:, :length]


class MambaLayer(nn.Module):
  """Mamba block as an attention layer (Gu & Dao 2023, Fig. 3; bidirectional as in Vision
  Mamba, Zhu et al. 2024). Contract: common.py; `num_heads` is accepted and ignored.

  x -> in_proj (D -> 2 d_inner: x, z) -> per direction: causal depthwise conv (k = conv_size)
  -> SiLU -> x_proj (dt, B, C) -> dt_proj -> selective scan with D skip -> mean of the
  directions -> * SiLU(z) -> out_proj (d_inner -> D). The backward direction has its own
  conv / x_proj / dt_proj / A / D and runs on the reversed sequence. `causal=True` (or
  bidirectional=False) keeps the forward direction only.
  scan_method "chunked" (default) fuses conv, projections and scan per chunk of
  `chunk_size` tokens under remat (the scan with its hand-written backward), so the only
  (L, d_inner) arrays kept are in_proj's output and the direction outputs, and every
  temporary is chunk-sized (on CPU, fresh large buffers cost page faults that outweigh the
  arithmetic); "scan" / "associative" run each stage over the whole sequence ("associative"
  needs ~2.6x full attention's memory at 6272 tokens, width 768: accelerators and short
  sequences only). See `selective_scan`.
  LoRA targets: in_proj is "value" (it carries the token content into the block), x_proj is
  "query" (C_t reads the state as a query reads keys; B_t and dt come with it), out_proj is
  "out"; "key" has no counterpart. Padding is zeroed before the conv and gets delta = 0.
  key_bias scales each token's input to the state (B_t) by exp(key_bias), as if a merged
  token of size s were seen s times at once.
  Init: A_log = log(1..n), D = 1, dt bias = softplus^-1 of dt ~ logU[dt_min, dt_max] (floor
  dt_init_floor), dt_proj weight U(+-dt_rank^-1/2). Time O(L d_inner (n + D)).
  """
  num_heads: int = 1
  state_size: int = 16
  expand: int = 2
  conv_size: int = 4
  dt_rank: int = 0  # 0: ceil(D / 16).
  bidirectional: bool = True
  causal: bool = False
  scan_method: str = "chunked"
  chunk_size: int = 64
  dt_min: float = 1e-3
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  lora: LoRASpec | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, key_bias=None, domain=None, deterministic=True):
    if self.scan_method not in METHODS:
      raise ValueError(f"config.model.attention.mamba.scan_method must be one of {METHODS}, "
                       f"got {self.scan_method!r}.")
    b, length, d = x.shape
    di = self.expand * d
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    xz = lora_dense(2 * di, "value", self.lora, name="in_proj", kernel_axes=("embed", "mlp"),
                    use_bias=False, **kw)(x, domain, deterministic=deterministic)
    xs, z = jnp.split(xz, 2, axis=-1)
    valid = jnp.ones((b, length), jnp.float32) if mask is None else mask.astype(jnp.float32)
    xs = xs * valid[..., None].astype(xs.dtype)
    scale = valid if key_bias is None else jnp.exp(key_bias.astype(jnp.float32)) * valid
    ssm = dict(state_size=self.state_size, dt_rank=self.dt_rank or math.ceil(d / 16),
               conv_size=self.conv_size, dt_min=self.dt_min, dt_max=self.dt_max,
               dt_init_floor=self.dt_init_floor, scan_method=self.scan_method,
               chunk_size=self.chunk_size, lora=self.lora, **kw)
    run = lambda name, *t: _direction(ssm, name, *t, domain, deterministic, self)
    y = run("forward", xs, valid, scale)
    if self.bidirectional and not self.causal:
      flip = lambda t: jnp.flip(t, axis=1)
      y = 0.5 * (y + flip(run("backward", flip(xs), flip(valid), flip(scale))))
    y = y * nn.silu(z)
    return lora_dense(d, "out", self.lora, name="out_proj", kernel_axes=("mlp", "embed"),
                      use_bias=False, **kw)(y, domain, deterministic=deterministic)
