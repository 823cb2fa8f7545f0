"""What every study config shares: the demo setup at a reduced budget, named variants as
config overrides, and frame-aligned attention options.

A study file (e.g. experiments/attention_ablation.py) defines

    VARIANTS = {"name": {"model.attention.type": "performer", ...}, ...}   # ordered
    INIT_FROM = {"variant": "parent variant"}   # optional: start from the parent's checkpoint
    def get_config(arg=None): return common.study_config(arg, VARIANTS)

and runs under the ordinary entry points, one variant at a time:

    python -m hvlm_jax.train --config=experiments/attention_ablation.py:variant=performer \
        --workdir=runs/studies/attention_ablation/performer

or all variants, evaluated on the test split, with `python experiments/run.py`. Arguments
after `:`: variant (default: the first), steps (training steps, default 150), layers (encoder
blocks, default 2), batch_size (default 16, the demo's).
"""
from __future__ import annotations

import ml_collections

from hvlm_jax.config import ConfigError, apply_overrides, import_sibling, parse_arg

demo = import_sibling(__file__, "../configs/demo.py")

ARGS = dict(variant="", steps=150, layers=2, batch_size=16)


def study_config(arg, variants: dict, **extra_args) -> ml_collections.ConfigDict:
  """The demo config at the study budget, with the overrides of the chosen variant.

  Args:
    arg: text after `:` in the config path (keys of ARGS and `extra_args`).
    variants: name -> dict of dotted-key overrides, in table order.
    **extra_args: further `:key=value` arguments a study accepts (with defaults).

  Raises:
    ConfigError: naming the variant or key when either is unknown.
  """
  args = parse_arg(arg, **ARGS, **extra_args)
  name = args.variant or next(iter(variants))
  if name not in variants:
    raise ConfigError(f"Unknown variant {name!r}; this study has: {', '.join(variants)}.")
  # The demo as the README's study tables measured it, before its fold stem and token-shape
  # targets (configs/demo.py, PREVIOUS), so that they reproduce.
  config = demo.get_config("before_token_shape=true")
  config.model.num_layers = args.layers
  config.data.batch_size = config.data.eval_batch_size = args.batch_size
  tr = config.training
  tr.num_steps = args.steps
  tr.warmup_steps = min(tr.warmup_steps, max(args.steps // 10, 1))
  tr.log_every_steps = max(min(tr.log_every_steps, args.steps // 5), 1)
  tr.eval_every_steps = 0  # The runner evaluates on the test split after training.
  tr.checkpoint_every_steps = args.steps
  apply_overrides(config, variants[name])
  return config


def variant_names(study) -> list[str]:
  return list(study.VARIANTS)
