"""Task heads, each with its loss and its decoding.

  classification.py  ClassificationHead, classification_loss
  detection.py       DetectionHead, detection_loss, decode_detections, nms_1d, smooth_scores,
                     detections_as_lists, grid_positions
  qa.py              QAHead, qa_loss
  captioning.py      CaptionDecoder, caption_loss, generate (greedy / beam search)
  decoding.py        greedy_decode, beam_search over any step function with a cache
  text.py            TextLayer (self + cross attention with a KV-cache step), AttentionPool
                     (learned-probe pooling), sinusoidal positions
"""
from hvlm_jax.models.heads.captioning import CaptionDecoder, caption_loss, generate
from hvlm_jax.models.heads.classification import ClassificationHead, classification_loss
from hvlm_jax.models.heads.decoding import beam_search, greedy_decode
from hvlm_jax.models.heads.detection import (DetectionHead, decode_detections, detection_loss,
                                             detections_as_lists, nms_1d, smooth_scores)
from hvlm_jax.models.heads.qa import QAHead, qa_loss

__all__ = [
    "CaptionDecoder", "ClassificationHead", "DetectionHead", "QAHead", "beam_search",
    "caption_loss", "classification_loss", "decode_detections", "detection_loss",
    "detections_as_lists", "generate", "greedy_decode", "nms_1d", "qa_loss", "smooth_scores",
]
