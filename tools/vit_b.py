"""The ViT-B-sized encoder train step that tools/device_check.py and
tools/benchmark_softmax_attention.py measure (their callers put the repository root on
sys.path first): 12 x 768 (`--smoke`: 2 x 64), full attention, the encoder's tokens' mean
square as the loss, AdamW."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import base
from hvlm_jax.models.model import build_encoder


def vit_config(smoke: bool, scan_layers: str = "auto"):
  config = base.get_config("frames=4,frame_size=32" if smoke else "frames=8,frame_size=224")
  m = config.model
  m.scan_layers = scan_layers
  if smoke:
    m.hidden_size, m.num_layers, m.num_attention_heads, m.mlp_dim = 64, 2, 2, 128
    m.tubelet_size = (2, 8, 8)
  m.attention.type = "full"
  m.attention.full.implementation = "auto"
  return config


def vit_clips(config, batch: int = 2):
  video = config.data.video
  return jnp.asarray(np.random.default_rng(0).uniform(
      size=(batch, video.num_frames, video.frame_size, video.frame_size, 3)), jnp.float32)


def vit_train_step(config, clips, *, dtype=jnp.float32, remat=None):
  """(step, state): the jitted step (donating its state; returns (state, loss)) and the
  initial (params, optimizer state)."""
  encoder = build_encoder(config.model, dtype=dtype, remat_policy=remat)
  params = jax.jit(encoder.init)(jax.random.key(0), clips)
  optimizer = optax.adamw(1e-4)

  def train_step(state, clips):
    params, opt_state = state
    loss_fn = lambda p: jnp.mean(encoder.apply(p, clips)["tokens"].astype(jnp.float32) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return jax.jit(train_step, donate_argnums=0), (params, optimizer.init(params))
