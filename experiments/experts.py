"""Domain experts on / off: no experts, hard experts (chosen by the domain label), and
soft experts mixed by a supervised router.

    python experiments/run.py --study=experts
"""
from hvlm_jax.config import import_sibling

common = import_sibling(__file__, "common.py")

PER_DOMAIN = True
VARIANTS = {
    "no_experts": {"model.domain_modules.experts.enabled": False},
    "experts_hard": {"model.domain_modules.experts.enabled": True,
                     "model.domain_modules.router.mode": "hard"},
    "experts_soft_router": {"model.domain_modules.experts.enabled": True,
                            "model.domain_modules.router.enabled": True,
                            "model.domain_modules.router.mode": "soft"},
}


def get_config(arg=None):
  return common.study_config(arg, VARIANTS)
