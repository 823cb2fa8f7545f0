"""LoRA vs full fine-tuning on a domain unseen in pretraining.

    python experiments/run.py --study=lora_new_domain

`pretrain` trains on three domains (training.domain_balancing gives NEW_DOMAIN weight 0);
the fine-tuning variants start from its last checkpoint (INIT_FROM: the runner sets
config.init_from) and train on NEW_DOMAIN alone: `finetune_full` updates everything,
`finetune_lora` the LoRA adapters, router and heads (the encoder's base frozen),
`finetune_lora_only` the adapters alone. `scratch` trains on NEW_DOMAIN from random
initialisation with the same steps. Every variant has the same architecture (LoRA adapters
on query and value in every block, one per domain), so checkpoints load in full. The test
split is scored per domain: the new domain's gain, and what the old domains lose.
By hand: train `pretrain`, then
    python -m hvlm_jax.train --config=experiments/lora_new_domain.py:variant=finetune_lora \
        --config.init_from=W/pretrain --workdir=W/finetune_lora
"""
from hvlm_jax.config import import_sibling

common = import_sibling(__file__, "common.py")

NEW_DOMAIN = "general"
OLD_DOMAINS = ("sports", "tutorials", "news")
PER_DOMAIN = True  # The runner adds a per-domain table.

_LORA = {"model.domain_modules.lora.enabled": True}
_NEW = dict(_LORA, **{"training.domain_balancing": f"{NEW_DOMAIN}=1"})
VARIANTS = {
    "pretrain": dict(_LORA, **{"training.domain_balancing":
                               ",".join(f"{d}=1" for d in OLD_DOMAINS)}),
    "finetune_full": dict(_NEW, **{"training.finetune": "full"}),
    "finetune_lora": dict(_NEW, **{"training.finetune": "lora"}),
    "finetune_lora_only": dict(_NEW, **{"training.finetune": "lora_only"}),
    "scratch": dict(_NEW, **{"training.finetune": "full"}),
}
INIT_FROM = {"finetune_full": "pretrain", "finetune_lora": "pretrain",
             "finetune_lora_only": "pretrain"}


def get_config(arg=None):
  return common.study_config(arg, VARIANTS)
