"""Masked-video pretraining (VideoMAE, Tong et al. 2022): `training.objective="masked_video"`.

Tube masking hides the same random set of spatial positions in every time step (ratio
`training.masked_video.mask_ratio`, 0.9 by default), so a hidden patch cannot be copied from
its neighbour in time. The encoder (the run's own `VideoEncoder`, with whatever attention type
the config names) sees only the visible tokens; a narrow decoder puts a learned mask token at
every hidden position, adds fixed sinusoidal positions over all tokens, and regresses each
hidden tubelet's pixels, normalised per patch and channel (mean and unbiased std of the
patch, eps 1e-6: VideoMAE's `norm_pix_loss`). The loss is the MSE over hidden tokens only.

The encoder's parameters sit under `params["encoder"]`, named exactly as in HierarchicalVLM,
so fine-tuning starts from them with `config.init_from=PRETRAIN_WORKDIR` (path and shape
match; heads start fresh) and the VideoMAE export of hvlm_jax/pretrained applies to them.
With tube masking every time step keeps the same number of tokens, so frame-relative
attention options (windows, strides) stay frame-aligned on the visible tokens.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from hvlm_jax.config import ConfigError
from hvlm_jax.models import model as model_lib
from hvlm_jax.models.encoder import EncoderBlock
from hvlm_jax.models.layers import layer_norm, partitioned, sinusoidal_table

OBJECTIVES = ("supervised", "masked_video")
DEFAULTS = dict(mask_ratio=0.9, decoder_width=0, decoder_layers=2, decoder_heads=0,
                norm_pix=True)


def options(config) -> ml_collections.ConfigDict:
  """config.training.masked_video with defaults; ConfigError naming a bad key."""
  given = config.training.get("masked_video", None)
  opts = ml_collections.ConfigDict(dict(DEFAULTS, **(given.to_dict() if given else {})))
  if not 0.0 < opts.mask_ratio < 1.0:
    raise ConfigError(f"config.training.masked_video.mask_ratio={opts.mask_ratio} must be in "
                      "(0, 1).")
  for key in ("decoder_width", "decoder_heads"):
    if opts[key] < 0:
      raise ConfigError(f"config.training.masked_video.{key}={opts[key]} must be >= 0 "
                        "(0: half the encoder's width / the encoder's heads).")
  if opts.decoder_layers < 1:
    raise ConfigError(f"config.training.masked_video.decoder_layers={opts.decoder_layers} "
                      "must be >= 1.")
  return opts


def objective(config) -> str:
  name = config.training.get("objective", "supervised")
  if name not in OBJECTIVES:
    raise ConfigError(f"config.training.objective={name!r} is not one of "
                      f"{', '.join(OBJECTIVES)}.")
  return name


# ----- functional core -------------------------------------------------------------------------
def tube_mask(rng, batch_size: int, steps: int, per_step: int, ratio: float):
  """Tube masking: per example one random set of hidden spatial positions, the same in every
  time step. Returns (visible (B, T' * V), hidden (B, T' * M)) int32 time-major grid indices,
  each sorted, V = max(round(P (1 - ratio)), 1), M = P - V."""
  keep = max(int(round(per_step * (1.0 - ratio))), 1)
  order = jnp.argsort(jax.random.uniform(rng, (batch_size, per_step)), axis=-1)
  vis, hid = jnp.sort(order[:, :keep], -1), jnp.sort(order[:, keep:], -1)
  offsets = (jnp.arange(steps) * per_step)[None, :, None]
  return ((offsets + vis[:, None, :]).reshape(batch_size, -1).astype(jnp.int32),
          (offsets + hid[:, None, :]).reshape(batch_size, -1).astype(jnp.int32))


def patch_targets(clip, tubelet_size, *, norm_pix: bool = True, eps: float = 1e-6):
  """(B, T, H, W, 3) clip (uint8 or [0, 1] floats) -> (B, N, t p q 3) float32 tubelet pixels,
  time-major tokens; with `norm_pix` each patch and channel is standardised by its own mean
  and unbiased standard deviation (VideoMAE)."""
  x = clip.astype(jnp.float32)
  if jnp.issubdtype(clip.dtype, jnp.integer):
    x = x / 255.0
  b, t, h, w, c = x.shape
  tt, p, q = tubelet_size
  x = x.reshape(b, t // tt, tt, h // p, p, w // q, q, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
  x = x.reshape(b, (t // tt) * (h // p) * (w // q), tt * p * q, c)
  if norm_pix:
    mean = x.mean(axis=2, keepdims=True)
    std = jnp.sqrt(x.var(axis=2, keepdims=True, ddof=1))
    x = (x - mean) / (std + eps)
  return x.reshape(b, x.shape[1], -1)


class MaskedVideoDecoder(nn.Module):
  """Encoded visible tokens (B, V', De) -> predicted pixels (B, N, out) at every position."""
  width: int
  num_layers: int
  num_heads: int
  num_positions: int
  out_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, visible):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b = tokens.shape[0]
    x = nn.Dense(self.width, name="embed",
                 kernel_init=partitioned(nn.initializers.xavier_uniform(), ("embed", "mlp")),
                 bias_init=partitioned(nn.initializers.zeros, ("mlp",)), **kw)(tokens)
    mask_token = self.param("mask_token", partitioned(nn.initializers.normal(0.02), ("mlp",)),
                            (self.width,), self.param_dtype)
    full = jnp.broadcast_to(mask_token.astype(self.dtype), (b, self.num_positions, self.width))
    full = full.at[jnp.arange(b)[:, None], visible].set(x.astype(self.dtype))
    full = full + jnp.asarray(sinusoidal_table(self.num_positions, self.width), self.dtype)
    for i in range(self.num_layers):
      full = EncoderBlock(self.num_heads, 4 * self.width, "full", name=f"block_{i}", **kw)(full)
    full = layer_norm("ln", **kw)(full)
    return nn.Dense(self.out_dim, name="head",
                    kernel_init=partitioned(nn.initializers.xavier_uniform(), ("mlp", "embed")),
                    bias_init=partitioned(nn.initializers.zeros, ("embed",)), **kw)(full)


class MaskedVideoModel(nn.Module):
  """The run's encoder plus a pretraining decoder. `__call__(batch, *, train=False,
  merge_weights=None)` -> dict(reconstruction_loss (), per_example_loss (B,), predictions
  (B, M, out), targets (B, M, out), visible (B, V), hidden (B, M)). The mask draws from the `masking` PRNG stream when given (training),
  else from a fixed key (evaluation: the same mask every time)."""
  config: ml_collections.FrozenConfigDict  # config.model
  pretraining: ml_collections.FrozenConfigDict  # config.training.masked_video
  dtype: Any = jnp.float32
  remat_policy: str | None = None

  @nn.compact
  def __call__(self, batch: dict, *, train: bool = False, merge_weights=None) -> dict:
    del merge_weights  # No merging while pretraining.
    cfg, opts = self.config, self.pretraining
    clip = batch["video"]
    t, p, q = cfg.tubelet_size
    steps, per_step = clip.shape[1] // t, (clip.shape[2] // p) * (clip.shape[3] // q)
    rng = self.make_rng("masking") if self.has_rng("masking") else jax.random.key(0)
    visible, hidden = tube_mask(rng, clip.shape[0], steps, per_step, opts.mask_ratio)
    # No token merging while pretraining: the decoder needs one token per visible position.
    encoder = model_lib.build_encoder(cfg, self.dtype, self.remat_policy, token_merging=None,
                                      name="encoder")
    encoded = encoder(clip, domain=batch.get("domain"), deterministic=not train,
                      visible=visible)["tokens"]
    decoder = MaskedVideoDecoder(
        opts.decoder_width or max(cfg.hidden_size // 2, 8), opts.decoder_layers,
        opts.decoder_heads or cfg.num_attention_heads, steps * per_step, t * p * q * 3,
        dtype=self.dtype, param_dtype=jnp.dtype(cfg.param_dtype), name="decoder")
    predicted = jnp.take_along_axis(decoder(encoded, visible), hidden[..., None], axis=1)
    targets = jnp.take_along_axis(
        patch_targets(clip, (t, p, q), norm_pix=opts.norm_pix), hidden[..., None], axis=1)
    per_example = jnp.mean(jnp.square(predicted.astype(jnp.float32) - targets), axis=(1, 2))
    return dict(reconstruction_loss=per_example.mean(), per_example_loss=per_example,
                predictions=predicted, targets=targets, visible=visible, hidden=hidden)


def build_model(config) -> MaskedVideoModel:
  policy = config.training.remat_policy if config.training.gradient_checkpointing else None
  return MaskedVideoModel(ml_collections.FrozenConfigDict(config.model),
                          ml_collections.FrozenConfigDict(options(config)),
                          dtype=model_lib.compute_dtype(config), remat_policy=policy)


def compute_losses(outputs: dict, batch: dict, config) -> tuple[jax.Array, dict]:
  """(total loss, metrics) in the shape of `model.compute_losses`."""
  del batch, config
  loss = outputs["reconstruction_loss"]
  return loss, dict(loss=loss, reconstruction_loss=loss)
