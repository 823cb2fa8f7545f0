"""Masked-video pretraining then fine-tuning, against training from scratch at equal steps.

    python experiments/run.py --study=pretraining --seeds=0,1,2

`pretrain` trains the encoder alone with the VideoMAE objective (training.objective=
masked_video: tube masking at 90%, per-patch normalised pixel targets, a light decoder) on the
training videos, ignoring their annotations, for half the budget; `finetune` starts from its
encoder (INIT_FROM: every encoder tensor loaded, heads fresh, the decoder ignored) and trains
the usual heads for the other half; `scratch` trains the same model from random
initialisation for the whole budget. Equal total steps; one pretraining step costs less than a
supervised one (the encoder sees 10% of the tokens and no heads run), so `finetune`'s line uses
less compute than `scratch`'s. The pretraining row has a reconstruction loss and no task
metrics.
"""
from hvlm_jax.config import import_sibling, parse_arg

common = import_sibling(__file__, "common.py")

VARIANTS = {
    "scratch": {},
    "pretrain": {"training.objective": "masked_video"},
    "finetune": {},
}
INIT_FROM = {"finetune": "pretrain"}
HALF_BUDGET = ("pretrain", "finetune")
BUDGET_KEYS = ("training.num_steps", "training.checkpoint_every_steps", "training.warmup_steps")


def get_config(arg=None):
  config = common.study_config(arg, VARIANTS)
  variant = parse_arg(arg, **common.ARGS).variant or next(iter(VARIANTS))
  if variant in HALF_BUDGET:
    tr = config.training
    tr.num_steps = tr.checkpoint_every_steps = max(tr.num_steps // 2, 1)
    tr.warmup_steps = min(tr.warmup_steps, max(tr.num_steps // 10, 1))
  return config
