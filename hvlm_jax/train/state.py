"""Train state, optimizer and learning-rate schedule.

AdamW (Loshchilov & Hutter, 2019) with linear warmup + cosine decay, global-norm gradient
clipping, a weight-decay mask (no decay on biases, norms, position embeddings) and optional
gradient accumulation (optax.MultiSteps).

`training.finetune`: "full" (everything), "lora" (adapters, router, experts and heads; the
encoder's base weights frozen) or "lora_only" (adapters alone).
"""
from __future__ import annotations

import re
from typing import Any

import flax
import jax
import optax
from flax import struct
from flax.traverse_util import flatten_dict, unflatten_dict

from hvlm_jax.models.domain import lora

# Parameter names (last path element) that are weight-decayed: weight matrices only (as in
# big_vision's `.*/kernel$`). Biases, norm scales, position embeddings, word embeddings,
# probes, learned tokens / memory slots, gates and Mamba's A_log and D are not.
_DECAY = re.compile(r"^(kernel|conv_kernel|lora_a|lora_b)$")


@struct.dataclass
class TrainState:
  """Everything a checkpoint needs to resume the model and optimizer exactly."""
  step: jax.Array
  params: Any
  opt_state: Any


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
  tr = config.training
  warmup = min(tr.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tr.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=tr.learning_rate * 0.01)


def path_names(params) -> dict[tuple[str, ...], Any]:
  return flatten_dict(flax.core.unfreeze(params))


def weight_decay_mask(params):
  """True where a parameter is decayed: weight matrices, not biases/norms/embeddings."""
  flat = path_names(params)
  return unflatten_dict({k: bool(_DECAY.match(k[-1])) for k in flat})


# training.finetune -> which parameters train (names of hvlm_jax.models.domain.lora modes).
FINETUNE_MODES = {"full": "all", "lora": "lora_and_heads", "lora_only": "lora"}


def finetune_mode(config) -> str:
  finetune = config.training.get("finetune", "full") or "full"
  if finetune not in FINETUNE_MODES:
    raise ValueError(f"config.training.finetune={finetune!r} must be one of "
                     f"{', '.join(FINETUNE_MODES)}.")
  return FINETUNE_MODES[finetune]


def make_optimizer(config, params, total_steps: int) -> optax.GradientTransformation:
  tr = config.training
  schedule = learning_rate_schedule(config, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(tr.gradient_clip) if tr.gradient_clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=tr.weight_decay,
                  mask=weight_decay_mask(params)))
  # LoRA fine-tuning: frozen parameters get set_to_zero updates, hence no Adam moments.
  tx = lora.freeze_untrainable(tx, params, finetune_mode(config))
  if tr.get("gradient_accumulation_steps", 1) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=tr.gradient_accumulation_steps)
  return tx
