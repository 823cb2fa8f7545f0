"""Attention type ablation: every registered attention in the same encoder, merging off.

    python experiments/run.py --study=attention_ablation
    python -m hvlm_jax.train --config=experiments/attention_ablation.py:variant=mamba --workdir=W

Each type runs with its configs/base.py options, windows / strides / pools aligned to the
demo's 64 tokens per frame (experiments/common.py). Same data, seed, steps and model width.
"""
from hvlm_jax.config import import_sibling

common = import_sibling(__file__, "common.py")

TYPES = ("full", "strided", "local_global", "hierarchical", "cross_memory", "performer",
         "linear", "mamba")
VARIANTS = {t: {"model.attention.type": t} for t in TYPES}


def get_config(arg=None):
  return common.study_config(arg, VARIANTS)
