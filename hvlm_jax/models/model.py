"""HierarchicalVLM: video encoder -> temporal features -> task heads.

`build_model(config)` turns the `config.model` section into a linen module;
`HierarchicalVLM.__call__(batch, *, train)` returns a dict of head outputs and
`compute_losses(outputs, batch, config)` the weighted multi-task loss.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from hvlm_jax.models.domain.lora import LoRASpec
from hvlm_jax.models.encoder import VideoEncoder
from hvlm_jax.models.layers import dense, layer_norm


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  """bfloat16 under training.mixed_precision, else config.model.dtype."""
  if config.training.get("mixed_precision", False):
    return jnp.bfloat16
  return jnp.dtype(config.model.dtype)


def lora_spec(model_config) -> LoRASpec | None:
  lora = model_config.domain_modules.lora
  if not lora.enabled:
    return None
  return LoRASpec(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                  num_domains=model_config.domain_modules.num_domains,
                  targets=tuple(lora.targets))


def attention_options(model_config) -> tuple[tuple[str, Any], ...]:
  """The options of the configured attention type, as a hashable tuple of items."""
  att = model_config.attention
  options = dict(att.get(att.type, {}))
  if "causal" in att and att.causal:
    options["causal"] = True
  return tuple(sorted(options.items()))


class ClassificationHead(nn.Module):
  """Clip classification: mean-pooled tokens -> LayerNorm -> linear classes."""
  num_classes: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, mask):
    m = mask[..., None].astype(tokens.dtype)
    pooled = (tokens * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    pooled = layer_norm("ln", self.dtype, self.param_dtype)(pooled)
    return dense(self.num_classes, ("embed", "vocab"), name="logits", dtype=jnp.float32,
                 param_dtype=self.param_dtype, kernel_init=nn.initializers.zeros)(pooled)


class HierarchicalVLM(nn.Module):
  """The full model; `config` is the frozen `config.model` section."""
  config: ml_collections.FrozenConfigDict
  dtype: Any = jnp.float32
  remat_policy: str | None = None

  @nn.compact
  def __call__(self, batch: dict[str, jax.Array], *, train: bool = False) -> dict:
    cfg = self.config
    param_dtype = jnp.dtype(cfg.param_dtype)
    encoder = VideoEncoder(
        hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        num_heads=cfg.num_attention_heads, mlp_dim=cfg.mlp_dim,
        tubelet_size=tuple(cfg.tubelet_size), attention_type=cfg.attention.type,
        attention_options=attention_options(cfg), dropout_rate=cfg.dropout_rate,
        lora=lora_spec(cfg), remat_policy=self.remat_policy, dtype=self.dtype,
        param_dtype=param_dtype, name="encoder")
    inputs = batch["features"] if "features" in batch else batch["video"]
    domain = batch.get("domain") if cfg.domain_modules.lora.enabled else None
    enc = encoder(inputs, domain=domain, deterministic=not train)
    outputs = dict(time_features=enc["time_features"])
    if "classification" in cfg.heads.tasks:
      outputs["classification"] = ClassificationHead(
          cfg.heads.num_classes, self.dtype, param_dtype, name="classification_head")(
              enc["tokens"], enc["token_mask"])
    return outputs


def build_model(config: ml_collections.ConfigDict) -> HierarchicalVLM:
  policy = config.training.remat_policy if config.training.gradient_checkpointing else None
  return HierarchicalVLM(ml_collections.FrozenConfigDict(config.model),
                         dtype=compute_dtype(config), remat_policy=policy)


def classification_loss(logits, labels, mask):
  """Mean cross-entropy over examples whose `mask` is True; (loss, accuracy)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  m = mask.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  acc = ((logits.argmax(-1) == labels) * m).sum() / n
  return (ce * m).sum() / n, acc


def compute_losses(outputs: dict, batch: dict, config) -> tuple[jax.Array, dict]:
  """Weighted sum of the task losses present in `outputs`; (total, metrics)."""
  weights = config.training.loss_weights
  metrics, total = {}, 0.0
  if "classification" in outputs:
    loss, acc = classification_loss(outputs["classification"], batch["label"],
                                     batch["label_mask"])
    metrics.update(classification_loss=loss, classification_accuracy=acc)
    total = total + weights.classification * loss
  metrics["loss"] = total
  return total, metrics
