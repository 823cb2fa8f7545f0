"""Domain experts and the domain router.

`DomainRouter` maps a clip to domain logits. It reads a cheap stem of the model input (frames
average-pooled to a g x g thumbnail, or the precomputed features), not the encoder output:
the router must run BEFORE the encoder so that, at inference without domain labels
(config.model.domain_modules.use_router_for_lora), its argmax can pick the LoRA adapter used
inside the encoder in one pass. Cost: O(T * g^2 * 3 * hidden) per clip, negligible next to the
encoder.

`DomainExperts` is one feed-forward expert per domain applied after the encoder, residually:
x + sum_e w_e FFN_e(LN(x)). The experts' output layers start at zero, so fresh experts are the
identity. Routing weights (`routing_weights`) come in three modes:
  hard:  one-hot of the domain label (or of the router's choice at inference);
  soft:  the router's softmax over all experts (dense mixture, cost E FFNs per token);
  top_k: the router's k largest probabilities renormalised (Shazeer et al. 2017), cost k FFNs.
Auxiliary losses (`router_losses`): cross-entropy to the domain labels when the router is
supervised, and the Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4)
E * sum_i f_i P_i otherwise; it is 1 for a uniform router and E when one expert takes all.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from hvlm_jax.models.layers import Dtype, dense, layer_norm, partitioned

ROUTING_MODES = ("hard", "soft", "top_k")


def thumbnail_stem(inputs: jax.Array, pool: int) -> jax.Array:
  """Clip (B, T, H, W, C) -> (B, T, pool * pool * C) mean colours of a pool x pool grid.

  Integer clips are read as [0, 255], float clips as [0, 1]; both are standardised like the
  encoder's input. Features (B, T, F) pass through unchanged.
  """
  if inputs.ndim == 3:
    return inputs.astype(jnp.float32)
  x = inputs.astype(jnp.float32)
  if jnp.issubdtype(inputs.dtype, jnp.integer):
    x = x / 255.0
  x = (x - 0.45) / 0.225
  b, t, h, w, c = x.shape
  gh, gw = h // pool, w // pool
  if gh == 0 or gw == 0:
    raise ValueError(f"Frames of {h}x{w} are smaller than the router grid "
                     f"config.model.domain_modules.router.pool_size={pool}.")
  x = x[:, :, :gh * pool, :gw * pool].reshape(b, t, pool, gh, pool, gw, c)
  return x.mean(axis=(3, 5)).reshape(b, t, pool * pool * c)


class DomainRouter(nn.Module):
  """Clip -> domain logits (B, E) float32.

  Call: `(inputs, *, deterministic=True)` with `inputs` the clip (B, T, H, W, C) or features
  (B, T, F). Per-frame stem -> Dense(hidden) -> GELU -> mean over time -> LN -> Dense(E).
  The output layer starts at zero (a uniform router).
  """
  num_domains: int
  hidden_size: int = 128
  pool_size: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs, *, deterministic=True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = thumbnail_stem(inputs, self.pool_size)
    h = nn.gelu(dense(self.hidden_size, ("features", "mlp"), name="stem", **kw)(x))
    h = layer_norm("ln", **kw)(h.mean(axis=1))
    return dense(self.num_domains, ("mlp", "domain"), name="logits", dtype=jnp.float32,
                 param_dtype=self.param_dtype, kernel_init=nn.initializers.zeros)(h)


def routing_weights(logits: jax.Array | None, mode: str, *, domain: jax.Array | None = None,
                    top_k: int = 1, num_domains: int | None = None) -> jax.Array:
  """(B, E) float32 expert weights; each row sums to 1.

  hard: one_hot(domain) (needs `domain` (B,) int32; `logits` may be None, then give
  `num_domains`); soft: softmax(logits); top_k: softmax restricted to the k largest logits.
  """
  if mode == "hard":
    if domain is None:
      raise ValueError("Hard expert routing needs batch['domain'] (or the router, with "
                       "config.model.domain_modules.use_router_for_lora=True).")
    e = num_domains if logits is None else logits.shape[-1]
    return jax.nn.one_hot(domain, e, dtype=jnp.float32)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  if mode == "soft":
    return probs
  if mode == "top_k":
    vals, idx = jax.lax.top_k(probs, top_k)  # Ties resolved as DomainExperts resolves them.
    kept = (jax.nn.one_hot(idx, probs.shape[-1], dtype=probs.dtype) * vals[..., None]).sum(-2)
    return kept / kept.sum(-1, keepdims=True)
  raise ValueError(f"config.model.domain_modules.router.mode={mode!r} is not one of "
                   f"{', '.join(ROUTING_MODES)}.")


def router_losses(logits: jax.Array, domain: jax.Array | None = None,
                  mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Auxiliary router losses over the examples where `mask` (B,) is True.

  Returns router_ce_loss and router_accuracy (when `domain` (B,) labels are given) and
  router_balance_loss = E * sum_i f_i P_i with f_i the fraction of examples whose argmax is
  i and P_i the mean probability of i (Switch Transformer; gradient flows through P only).
  """
  logits = logits.astype(jnp.float32)
  e = logits.shape[-1]
  m = jnp.ones(logits.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  probs = jax.nn.softmax(logits, axis=-1)
  dispatch = jax.nn.one_hot(logits.argmax(-1), e, dtype=jnp.float32)
  f = (dispatch * m[:, None]).sum(0) / n
  p = (probs * m[:, None]).sum(0) / n
  out = dict(router_balance_loss=e * jnp.sum(f * p))
  if domain is not None:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, domain)
    out["router_ce_loss"] = (ce * m).sum() / n
    out["router_accuracy"] = ((logits.argmax(-1) == domain) * m).sum() / n
  return out


class DomainExperts(nn.Module):
  """One feed-forward expert per domain, mixed per example: x + sum_e w_e FFN_e(LN(x)).

  Call: `(x: (B, L, D), weights: (B, E) float32, *, deterministic=True) -> (B, L, D)`.
  `top_k` (static) > 0 gathers only the k experts with the largest weights per example
  (exact when the other weights are 0, as for hard and top_k routing): O(B L D H k) FLOPs;
  `top_k=0` evaluates every expert densely: O(B L D H E).
  """
  num_experts: int
  mlp_dim: int
  top_k: int = 0
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, weights, *, deterministic=True):
    d, e, hdim = x.shape[-1], self.num_experts, self.mlp_dim
    p = lambda name, init, axes, shape: self.param(  # noqa: E731
        name, partitioned(init, axes), shape, self.param_dtype)
    w_in = p("w_in", nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                      in_axis=1, out_axis=2),
             ("domain", "embed", "mlp"), (e, d, hdim))
    b_in = p("b_in", nn.initializers.zeros, ("domain", "mlp"), (e, hdim))
    w_out = p("w_out", nn.initializers.zeros, ("domain", "mlp", "embed"), (e, hdim, d))
    b_out = p("b_out", nn.initializers.zeros, ("domain", "embed"), (e, d))
    h = layer_norm("ln", self.dtype, self.param_dtype)(x).astype(self.dtype)
    cast = lambda a: a.astype(self.dtype)  # noqa: E731
    if self.top_k:
      w, idx = jax.lax.top_k(weights.astype(jnp.float32), self.top_k)  # (B, k)
      h = jnp.einsum("bld,bkdh->bklh", h, cast(w_in[idx])) + cast(b_in[idx])[:, :, None]
      h = nn.Dropout(self.dropout_rate)(nn.gelu(h), deterministic=deterministic)
      y = jnp.einsum("bklh,bkhd->bkld", h, cast(w_out[idx])) + cast(b_out[idx])[:, :, None]
    else:
      w = weights.astype(jnp.float32)
      h = jnp.einsum("bld,edh->belh", h, cast(w_in)) + cast(b_in)[None, :, None]
      h = nn.Dropout(self.dropout_rate)(nn.gelu(h), deterministic=deterministic)
      y = jnp.einsum("belh,ehd->beld", h, cast(w_out)) + cast(b_out)[None, :, None]
    y = jnp.einsum("bk,bkld->bld", w.astype(self.dtype), y)
    return x + y.astype(x.dtype)
