"""What steers token merging: similarity only (ToMe), motion, saliency, or both.

    python experiments/run.py --study=merging_importance

Merging at compression ratio 0.5 in every variant; only the runtime importance weights
(model.token_merging.use_motion / use_saliency) differ, so flow and saliency are computed
alike everywhere and the comparison is of what the merge protects, not of cost.
"""
from hvlm_jax.config import import_sibling

common = import_sibling(__file__, "common.py")

_ON = {"model.token_merging.enabled": True,
       "model.token_merging.target_compression_ratio": 0.5}
VARIANTS = {
    "similarity": dict(_ON, **{"model.token_merging.use_motion": False,
                               "model.token_merging.use_saliency": False}),
    "motion": dict(_ON, **{"model.token_merging.use_motion": True,
                           "model.token_merging.use_saliency": False}),
    "saliency": dict(_ON, **{"model.token_merging.use_motion": False,
                             "model.token_merging.use_saliency": True}),
    "both": dict(_ON, **{"model.token_merging.use_motion": True,
                         "model.token_merging.use_saliency": True}),
}


def get_config(arg=None):
  return common.study_config(arg, VARIANTS)
