"""Evaluation: metrics (`metrics`), reports and result files (`report`), the evaluation loop
(`evaluate`). Importing this package loads numpy only; JAX is imported by `evaluate`."""
from hvlm_jax.eval.metrics import (ACTIVITYNET_TIOU, THUMOS_TIOU, EmptyEvaluationError,
                                   caption_scores, classification_topk, detection_ap,
                                   detection_map, normalize_answer, per_domain, qa_accuracy,
                                   qa_majority_baseline)

__all__ = ["ACTIVITYNET_TIOU", "THUMOS_TIOU", "EmptyEvaluationError", "caption_scores",
           "classification_topk", "detection_ap", "detection_map", "normalize_answer",
           "per_domain", "qa_accuracy", "qa_majority_baseline"]
