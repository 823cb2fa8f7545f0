"""Mamba (Gu & Dao, 2023): the selective scan as a function, and a bidirectional Mamba block.

selective_scan computes, per channel d and state n, in float32 whatever the input dtype:
  delta <- softplus(delta + delta_bias)             (optional)
  h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t    (zero-order hold for A, Euler for B)
  y_t = C_t . h_t + D u_t;  y_t *= silu(z_t)        (optional D skip and z gate)
Methods (same result; `selective_scan_ref` is the Python-loop reference):
  "scan":        lax.scan over time. Time O(L d n); the backward pass stores every state,
                 O(L d n) memory.
  "associative": lax.associative_scan over time, parallel in O(log L) depth but it
                 materialises (L, d, n) several times over. For accelerators and short L.
  "chunked":     lax.scan over chunks of `chunk_size` steps, each chunk rematerialised in the
                 backward pass: only one state per chunk is stored, O((L / c) d n + c d n)
                 memory, at the cost of recomputing the forward once. The default.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from hvlm_jax.models.attention.sparse import pad_axis
from hvlm_jax.models.domain.lora import LoRASpec, lora_dense
from hvlm_jax.models.layers import Dtype, partitioned

METHODS = ("scan", "associative", "chunked")


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
    chunks = tuple(jnp.moveaxis(pad_axis(t, c).reshape(batch, -1, c, *t.shape[2:]), 1, 0)
                   for t in (u32, delta, B, C))

    @jax.checkpoint
    def body(h, xs):
      y, h = _chunk_sequential(xs[0], xs[1], A, xs[2], xs[3], h)
      return h, y

    h, y = jax.lax.scan(body, h0, chunks)
    y = jnp.moveaxis(y, 0, 1).reshape(batch, -1, d)[:, :length]
  if D is not None:
    y = y + u32 * D.astype(f32)
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


class _SSMChunk(nn.Module):
  """One scan direction over a chunk: causal depthwise conv -> SiLU -> x_proj (dt, B, C) ->
  dt_proj -> softplus -> selective scan with D skip. Call `(carry, xs) -> (carry, y)`:
    carry: (tail (B, k-1, d_inner) inputs before the chunk, for the conv; state (B, d_inner, n)).
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
    u = sum(xp[:, i:i + length] * taps[i] for i in range(k))
    u = nn.silu(u + conv_bias.astype(self.dtype))
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
                          method=self.scan_method, initial_state=h, return_state=True)
    return (xp[:, xp.shape[1] - (k - 1):], h), y


def _direction(ssm: dict, name: str, x, valid, scale, domain, deterministic, chunk_size,
               parent: nn.Module):
  """Runs one direction: one _SSMChunk call, or a remat'ed nn.scan over chunks."""
  b, length, di = x.shape
  carry = (jnp.zeros((b, ssm["conv_size"] - 1, di), x.dtype),
           jnp.zeros((b, di, ssm["state_size"]), jnp.float32))
  if ssm["scan_method"] != "chunked":
    return _SSMChunk(name=name, deterministic=deterministic, parent=parent, **ssm)(
        carry, (x, valid, scale), domain)[1]
  c = min(chunk_size, length)
  chunk = lambda t: pad_axis(t, c).reshape(b, -1, c, *t.shape[2:])
  scanned = nn.scan(nn.remat(_SSMChunk), variable_broadcast="params",
                    split_rngs={"params": False, "dropout": True},
                    in_axes=(1, nn.broadcast), out_axes=1)
  _, y = scanned(name=name, deterministic=deterministic, parent=parent,
                 **dict(ssm, scan_method="scan"))(carry, (chunk(x), chunk(valid), chunk(scale)),
                                                  domain)
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
  `chunk_size` tokens under remat, so the only (L, d_inner) arrays kept are in_proj's output
  and the direction outputs; "scan" / "associative" run each stage over the whole sequence.
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
  chunk_size: int = 128
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
               dt_init_floor=self.dt_init_floor, scan_method=self.scan_method, lora=self.lora,
               **kw)
    run = lambda name, *t: _direction(ssm, name, *t, domain, deterministic, self.chunk_size,
                                      self)
    y = run("forward", xs, valid, scale)
    if self.bidirectional and not self.causal:
      flip = lambda t: jnp.flip(t, axis=1)
      y = 0.5 * (y + flip(run("backward", flip(xs), flip(valid), flip(scale))))
    y = y * nn.silu(z)
    return lora_dense(d, "out", self.lora, name="out_proj", kernel_axes=("mlp", "embed"),
                      use_bias=False, **kw)(y, domain, deterministic=deterministic)
