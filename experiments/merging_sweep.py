"""Token merging ratio sweep: the fraction of token-block work removed, 0 (off) to 0.5.

    python experiments/run.py --study=merging_sweep

Merging steered by motion and saliency (both on), "decreasing" schedule, full attention.
With the study's default 2 encoder blocks a ratio above 0.5 would ask the first block to
merge more than its unprotected half (merge_schedule rejects it); with `:layers=4` the sweep
can go to 0.6.
"""
from hvlm_jax.config import import_sibling

common = import_sibling(__file__, "common.py")

RATIOS = (0.25, 0.4, 0.5)
VARIANTS = {"ratio_0": {"model.token_merging.enabled": False}}
VARIANTS.update({f"ratio_{r}": {"model.token_merging.enabled": True,
                                "model.token_merging.target_compression_ratio": r}
                 for r in RATIOS})


def get_config(arg=None):
  return common.study_config(arg, VARIANTS)
