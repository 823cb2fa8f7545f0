"""Evaluation metrics on host data: action detection mAP, captioning, video QA, classification.

Plain Python / numpy over lists of dicts and arrays, never jitted: metrics run once per
evaluation on gathered predictions, and their matching loops are sequential by definition.

- `detection_map`: temporal action detection mAP by the ActivityNet protocol
  (Heilbron et al., CVPR 2015; `Evaluation/eval_detection.py` of the official toolkit).
- `caption_scores`: BLEU-1..4, ROUGE-L, CIDEr-D with pycocoevalcap 1.2, METEOR 1.5 when Java runs.
- `qa_accuracy`: normalised exact match (the SQuAD normalisation), overall and per question type.
- `classification_topk`: clip classification top-k accuracy.
- `per_domain`: any of the above on each domain's slice of the inputs.
A metric whose reference set is empty raises `EmptyEvaluationError` (a ValueError).
"""
from __future__ import annotations

import collections
import math
import os
import re
import shutil
import subprocess
import threading
import unicodedata
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

ACTIVITYNET_TIOU = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50:0.05:0.95
THUMOS_TIOU = (0.3, 0.4, 0.5, 0.6, 0.7)


class EmptyEvaluationError(ValueError):
  """The reference set (ground truth, references, answers) is empty: the metric is undefined."""


# ---------------------------------------------------------------------------------------------
# Temporal action detection
# ---------------------------------------------------------------------------------------------

class _Segments(NamedTuple):
  videos: list
  labels: list
  bounds: np.ndarray   # (n, 2) float64 [start, end] seconds
  scores: np.ndarray   # (n,) float64 (zeros for ground truth)


class DetectionAP(NamedTuple):
  """Per-class average precision: `ap[c, k]` for class `classes[c]` at `thresholds[k]`."""
  classes: list
  thresholds: np.ndarray  # (K,) float64
  ap: np.ndarray          # (C, K) float64
  num_ignored: int        # predictions whose label is absent from the ground truth


def _segments(entries: Sequence[Mapping], what: str, with_score: bool) -> _Segments:
  keys = ("video_id", "start", "end", "label") + (("score",) if with_score else ())
  n = len(entries)
  bounds, scores = np.zeros((n, 2)), np.zeros(n)
  videos, labels = [], []
  for i, e in enumerate(entries):
    if not isinstance(e, Mapping):
      raise ValueError(f"{what} {i} is a {type(e).__name__}, not a dict with keys "
                       f"{', '.join(keys)}.")
    missing = [k for k in keys if k not in e]
    if missing:
      raise ValueError(f"{what} {i} lacks the key(s) {', '.join(missing)}.")
    try:
      start, end = float(e["start"]), float(e["end"])
      score = float(e["score"]) if with_score else 0.0
      hash(e["label"]), hash(e["video_id"])
    except (TypeError, ValueError):
      raise ValueError(f"{what} {i} has a non-numeric start, end or score, or an unhashable "
                       f"label or video_id.") from None
    if not all(map(math.isfinite, (start, end, score))):
      raise ValueError(f"{what} {i} has a non-finite start, end or score.")
    if end <= start:
      raise ValueError(f"{what} {i} has end <= start ({end} <= {start}).")
    bounds[i] = start, end
    scores[i] = score
    videos.append(e["video_id"])
    labels.append(e["label"])
  return _Segments(videos, labels, bounds, scores)


def _sorted(values) -> list:
  try:
    return sorted(values)
  except TypeError:  # mixed label types: order by type name, then text
    return sorted(values, key=lambda v: (type(v).__name__, str(v)))


def _thresholds(tiou_thresholds) -> np.ndarray:
  thr = np.asarray(tiou_thresholds, np.float64)
  if thr.ndim != 1 or thr.size == 0 or np.any(thr <= 0) or np.any(thr > 1):
    raise ValueError(f"tiou_thresholds must be a non-empty list of numbers in (0, 1], got "
                     f"{tiou_thresholds!r}.")
  return thr


def temporal_iou(segment: np.ndarray, candidates: np.ndarray) -> np.ndarray:
  """tIoU of one segment `(2,)` [start, end] with each row of `candidates` `(G, 2)` -> `(G,)`."""
  inter = np.clip(np.minimum(segment[1], candidates[:, 1])
                  - np.maximum(segment[0], candidates[:, 0]), 0.0, None)
  union = (candidates[:, 1] - candidates[:, 0]) + (segment[1] - segment[0]) - inter
  return inter / union


def interpolated_average_precision(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
  """All-point interpolated AP (VOC 2011; ActivityNet's `interpolated_prec_rec`).

  `precision, recall: (..., P)` along a ranked list (recall non-decreasing) -> `(...)`: the area
  under the precision envelope max_{r' >= r} p(r'), summed where recall changes.
  """
  shape = precision.shape[:-1] + (1,)
  p = np.concatenate([np.zeros(shape), precision, np.zeros(shape)], -1)
  r = np.concatenate([np.zeros(shape), recall, np.ones(shape)], -1)
  p = np.flip(np.maximum.accumulate(np.flip(p, -1), -1), -1)
  return np.sum((r[..., 1:] - r[..., :-1]) * p[..., 1:], -1)


def detection_ap(predictions: Sequence[Mapping], ground_truth: Sequence[Mapping],
                 tiou_thresholds=ACTIVITYNET_TIOU) -> DetectionAP:
  """Average precision per class and tIoU threshold, by the ActivityNet protocol.

  predictions: dicts `video_id, start, end, label, score` (seconds; any hashable labels).
  ground_truth: dicts `video_id, start, end, label`.
  Classes are the labels of the ground truth; predictions with other labels are ignored. Per
  class, predictions are ranked by score (ties keep input order); at each threshold a
  prediction takes the still-unmatched ground-truth segment of its video and class with the
  highest tIoU >= threshold (ties: the first listed), else it is a false positive; a class
  without predictions has AP 0. Time O(P * (K + G_v)) with G_v the segments of one video.
  """
  thr = _thresholds(tiou_thresholds)
  gt = _segments(ground_truth, "ground-truth segment", with_score=False)
  pred = _segments(predictions, "prediction", with_score=True)
  if not gt.labels:
    raise EmptyEvaluationError("the ground truth has no segments, so detection mAP is undefined.")
  classes = _sorted(set(gt.labels))
  index = {c: i for i, c in enumerate(classes)}
  gt_class = np.array([index[l] for l in gt.labels])
  pred_class = np.array([index.get(l, -1) for l in pred.labels], np.int64)
  ap = np.zeros((len(classes), thr.size))
  rows = np.arange(thr.size)
  for c in range(len(classes)):
    g = np.flatnonzero(gt_class == c)
    p = np.flatnonzero(pred_class == c)
    if p.size == 0:
      continue
    p = p[np.argsort(-pred.scores[p], kind="stable")]
    by_video = collections.defaultdict(list)
    for local, j in enumerate(g):
      by_video[gt.videos[j]].append(local)
    by_video = {v: np.asarray(js) for v, js in by_video.items()}
    matched = np.zeros((thr.size, g.size), bool)
    tp = np.zeros((thr.size, p.size), bool)
    for rank, i in enumerate(p):
      js = by_video.get(pred.videos[i])
      if js is None:
        continue
      iou = temporal_iou(pred.bounds[i], gt.bounds[g[js]])                 # (G_v,)
      free = (iou[None, :] >= thr[:, None]) & ~matched[:, js]              # (K, G_v)
      best = np.argmax(np.where(free, iou[None, :], -1.0), axis=1)         # (K,)
      hit = free[rows, best]
      tp[:, rank] = hit
      matched[rows[hit], js[best[hit]]] = True
    tps = np.cumsum(tp, axis=1)
    fps = np.cumsum(~tp, axis=1)
    ap[c] = interpolated_average_precision(tps / (tps + fps), tps / g.size)
  return DetectionAP(classes, thr, ap, int(np.sum(pred_class < 0)))


def _threshold_key(prefix: str, t: float) -> str:
  return f"{prefix}@{t:.2f}" if round(t, 2) == t else f"{prefix}@{t:g}"


def detection_map(predictions: Sequence[Mapping], ground_truth: Sequence[Mapping],
                  tiou_thresholds=ACTIVITYNET_TIOU) -> dict[str, float]:
  """Mean AP over ground-truth classes per tIoU threshold, and over thresholds.

  Returns `{"mAP@0.50": ..., ..., "mAP@0.95": ..., "mAP": mean}` (keys follow the thresholds;
  `THUMOS_TIOU` gives mAP@0.30..0.70). Per-class values: `detection_ap`. See `detection_ap` for
  the protocol and input contract.
  """
  result = detection_ap(predictions, ground_truth, tiou_thresholds)
  out = {_threshold_key("mAP", t): float(m) for t, m in zip(result.thresholds, result.ap.mean(0))}
  out["mAP"] = float(result.ap.mean())
  return out


# ---------------------------------------------------------------------------------------------
# Captioning
# ---------------------------------------------------------------------------------------------

_APOSTROPHES = frozenset("'`\u2018\u2019")


def tokenize_caption(text: str) -> str:
  """Pure-Python stand-in for the PTB tokenizer: lowercase; apostrophes dropped (don't -> dont);
  other punctuation becomes a space; whitespace collapsed. Returns space-joined tokens."""
  chars = ("" if ch in _APOSTROPHES else " " if unicodedata.category(ch).startswith("P") else ch
           for ch in text.lower())
  return " ".join("".join(chars).split())


def _caption_text(x, where: str) -> str:
  if isinstance(x, Mapping) and "caption" in x:  # dense caption {"start", "end", "caption"}
    x = x["caption"]
  if not isinstance(x, str):
    raise ValueError(f"{where} is a {type(x).__name__}, not a string.")
  return tokenize_caption(x)


def _caption_inputs(references: Mapping, predictions: Mapping) -> tuple[dict, dict]:
  gts, res = {}, {}
  for vid, refs in references.items():
    refs = [refs] if isinstance(refs, (str, Mapping)) else list(refs)
    if not refs:
      raise ValueError(f"references of video {vid!r} is an empty list.")
    if vid not in predictions:
      raise ValueError(f"video {vid!r} has reference captions but no predicted caption.")
    pred = predictions[vid]
    if not isinstance(pred, (str, Mapping)):
      pred = list(pred)
      if len(pred) != 1:
        raise ValueError(f"prediction of video {vid!r} has {len(pred)} captions; give one.")
      pred = pred[0]
    gts[vid] = [_caption_text(r, f"reference {i} of video {vid!r}") for i, r in enumerate(refs)]
    res[vid] = [_caption_text(pred, f"prediction of video {vid!r}")]
  if not gts:
    raise EmptyEvaluationError("there are no reference captions, so caption scores are undefined.")
  return gts, res


def _meteor(gts: dict, res: dict, timeout_s: float) -> tuple[float | None, str]:
  """METEOR 1.5 through the jar bundled with pycocoevalcap, speaking its `-stdio` protocol
  (one SCORE line per video, then one EVAL line). -> (score or None, note)."""
  java = shutil.which("java")
  if java is None:
    return None, "METEOR skipped: `java` was not found on PATH."
  from pycocoevalcap.meteor import meteor as meteor_module
  cmd = [java, "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"]
  try:
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.abspath(meteor_module.__file__)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
  except OSError as e:
    return None, f"METEOR skipped: java could not start ({e})."
  # A hung JVM must not hang the evaluation: the watchdog kills it and readline returns "".
  watchdog = threading.Timer(timeout_s, proc.kill)
  watchdog.start()
  try:
    stats = []
    for vid in gts:
      proc.stdin.write(" ||| ".join(["SCORE", *gts[vid], res[vid][0]]) + "\n")
      proc.stdin.flush()
      stats.append(proc.stdout.readline().strip())
    proc.stdin.write(" ||| ".join(["EVAL", *stats]) + "\n")
    proc.stdin.flush()
    for _ in gts:
      proc.stdout.readline()
    score = float(proc.stdout.readline().strip())
  except (OSError, ValueError) as e:
    return None, (f"METEOR skipped: java ran but METEOR failed or exceeded {timeout_s:g} s "
                  f"({type(e).__name__}).")
  finally:
    watchdog.cancel()
    proc.kill()
    proc.wait()
  return score, "METEOR 1.5 (pycocoevalcap jar, -norm) on the pure-Python tokenisation."


def caption_scores(references: Mapping[Any, Sequence[str] | str], predictions: Mapping[Any, str],
                   *, meteor: bool | None = None, meteor_timeout_s: float = 600.0) -> dict:
  """Corpus caption scores with pycocoevalcap 1.2 (Chen et al., 2015, "Microsoft COCO Captions").

  references: video_id -> list of reference captions (or one string; dense-caption dicts with a
  "caption" key are accepted). predictions: video_id -> one caption (or a one-element list).
  Every video with references needs a prediction; predictions for other videos are ignored.
  Captions are tokenised by `tokenize_caption` instead of the Java PTB tokenizer.
  Returns `{"BLEU-1".."BLEU-4", "ROUGE_L", "CIDEr", ["METEOR"], "notes": [str]}`:
  BLEU is corpus-level (closest reference length); ROUGE_L the mean per-video LCS F-measure
  (beta 1.2); "CIDEr" is pycocoevalcap's `Cider`, which is CIDEr-D (Vedantam et al., CVPR 2015:
  clipped n-gram counts, Gaussian length penalty sigma 6, x10, no stemming); its document
  frequencies come from the evaluated set, so it is 0 on a one-video set and meaningful only
  over many videos. METEOR runs when `meteor` is True, or None (auto) and `java` is found;
  otherwise, or when it fails, it is absent and `notes` says why.
  """
  gts, res = _caption_inputs(references, predictions)
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  scores: dict[str, Any] = {f"BLEU-{n}": float(b) for n, b in enumerate(bleu, 1)}
  scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
  scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
  notes = ["CIDEr is CIDEr-D (pycocoevalcap 1.2 Cider); tokens: lowercase, punctuation removed."]
  if meteor is None or meteor:
    value, note = _meteor(gts, res, meteor_timeout_s)
    if value is not None:
      scores["METEOR"] = value
    notes.append(note)
  else:
    notes.append("METEOR not requested.")
  scores["notes"] = notes
  return scores


# ---------------------------------------------------------------------------------------------
# Video QA and classification
# ---------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """SQuAD answer normalisation: lowercase, delete punctuation, drop a/an/the, collapse spaces."""
  text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
  return " ".join(_ARTICLES.sub(" ", text).split())


def _accepted(answer, i: int) -> set[str]:
  answers = [answer] if isinstance(answer, str) else list(answer)
  if not answers or not all(isinstance(a, str) for a in answers):
    raise ValueError(f"answer {i} must be a string or a non-empty list of strings.")
  return {normalize_answer(a) for a in answers}


def _qa_correct(predictions: Sequence[str], answers: Sequence) -> np.ndarray:
  if len(predictions) != len(answers):
    raise ValueError(f"qa_accuracy got {len(predictions)} predictions for {len(answers)} answers.")
  if not len(answers):
    raise EmptyEvaluationError("there are no QA answers, so QA accuracy is undefined.")
  correct = np.zeros(len(answers), bool)
  for i, (p, a) in enumerate(zip(predictions, answers)):
    if not isinstance(p, str):
      raise ValueError(f"prediction {i} is a {type(p).__name__}, not a string.")
    correct[i] = normalize_answer(p) in _accepted(a, i)
  return correct


def qa_accuracy(predictions: Sequence[str], answers: Sequence, question_types=None) -> dict:
  """Normalised exact-match accuracy (`normalize_answer` on both sides).

  predictions: N strings. answers: N strings, or N lists of accepted strings (any match counts).
  question_types: optional N hashables. Returns `{"accuracy", "num_questions"}` plus, with types,
  `"per_type": {str(type): {"accuracy", "num_questions"}}`.
  """
  correct = _qa_correct(predictions, answers)
  out: dict[str, Any] = {"accuracy": float(correct.mean()), "num_questions": int(correct.size)}
  if question_types is not None:
    if len(question_types) != correct.size:
      raise ValueError(f"qa_accuracy got {len(question_types)} question types for "
                       f"{correct.size} answers.")
    types = np.array([str(t) for t in question_types], dtype=object)
    out["per_type"] = {t: {"accuracy": float(correct[types == t].mean()),
                           "num_questions": int(np.sum(types == t))}
                       for t in _sorted(set(types))}
  return out


def qa_majority_baseline(answers: Sequence, train_answers: Sequence | None = None) -> dict:
  """Accuracy of always answering the most frequent normalised answer.

  The majority is taken over `train_answers` (a fair baseline) or, without them, over `answers`
  themselves (the best any constant answer can do). With lists of accepted answers, the first
  counts. Ties go to the alphabetically first. Returns `{"answer", "accuracy", "num_questions"}`.
  """
  source = answers if train_answers is None else train_answers
  counts = collections.Counter(
      normalize_answer(a if isinstance(a, str) else (list(a) or [""])[0]) for a in source)
  if not counts:
    raise EmptyEvaluationError("there are no answers to take a majority from.")
  answer = min(counts, key=lambda a: (-counts[a], a))
  correct = _qa_correct([answer] * len(answers), answers)
  return {"answer": answer, "accuracy": float(correct.mean()), "num_questions": int(correct.size)}


def classification_topk(logits, labels, ks: Sequence[int] = (1, 5), *, mask=None) -> dict:
  """Top-k accuracy. logits `(N, C)` float; labels `(N,)` int in [0, C); mask `(N,)` bool (True
  counts). An example is correct when fewer than k classes rank above its label, ranking by
  logit and breaking ties by class index (as a stable descending sort would). k >= C gives 1.
  Returns `{"top1": ..., "top5": ..., "num_examples": n}`. O(N * C).
  """
  logits = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"classification_topk needs logits (N, C) and labels (N,), got "
                     f"{logits.shape} and {labels.shape}.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}.")
  if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
    raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got {labels.min()}.."
                     f"{labels.max()}.")
  if not np.all(np.isfinite(logits)):
    raise ValueError("logits contain NaN or infinity.")
  keep = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool)
  if keep.shape != labels.shape:
    raise ValueError(f"mask has shape {keep.shape}, labels {labels.shape}.")
  if not keep.any():
    raise EmptyEvaluationError("no labelled examples, so top-k accuracy is undefined.")
  logits, labels = logits[keep], labels[keep]
  true = logits[np.arange(labels.size), labels][:, None]
  before = (logits > true) | ((logits == true) & (np.arange(logits.shape[1]) < labels[:, None]))
  rank = before.sum(1)
  out: dict[str, Any] = {f"top{k}": float(np.mean(rank < k)) for k in ks}
  out["num_examples"] = int(labels.size)
  return out


# ---------------------------------------------------------------------------------------------
# Per domain
# ---------------------------------------------------------------------------------------------

def _kind(collection) -> str:
  """How `per_domain` slices an input: 'none', 'keyed' (by video id), 'entries', 'aligned'."""
  if collection is None or len(collection) == 0:
    return "none"
  if isinstance(collection, Mapping):
    return "keyed"
  if all(isinstance(e, Mapping) and "video_id" in e for e in collection):
    return "entries"
  return "aligned"


def per_domain(metric_fn: Callable[..., dict], domain_of: Mapping, *collections,
               item_videos: Sequence | None = None, default_domain: str = "general",
               **kwargs) -> dict[str, dict]:
  """`metric_fn` on each domain's slice of `collections` -> `{domain: result}` (sorted).

  domain_of: video_id -> domain name (a missing video is `default_domain`). Each positional
  collection is sliced: a dict by its video-id keys (caption references / predictions); a list
  of dicts with "video_id" by entry (detection predictions / ground truth); any other sequence
  or array item by item along `item_videos` (QA answers and types, logits and labels; filter
  masked items first). None and empty inputs pass through; `kwargs` pass unchanged. A domain
  whose slice has an empty reference set is left out. Corpus statistics (CIDEr document
  frequencies, detection classes) are those of the domain's slice.
  Example: `per_domain(qa_accuracy, domain_of, preds, answers, types, item_videos=vids)`.
  """
  name = lambda v: str(domain_of.get(v, default_domain))
  kinds = [_kind(c) for c in collections]
  item_domains = None if item_videos is None else np.array([name(v) for v in item_videos], object)
  for c, kind in zip(collections, kinds):
    if kind == "aligned" and (item_domains is None or len(c) != item_domains.size):
      raise ValueError(f"per_domain needs item_videos with one video id per item of each aligned "
                       f"(non-dict) input; got {None if item_videos is None else len(item_videos)} "
                       f"ids for {len(c)} items.")
  domains = set() if item_domains is None else set(item_domains)
  for c, kind in zip(collections, kinds):
    if kind == "keyed":
      domains.update(name(v) for v in c)
    elif kind == "entries":
      domains.update(name(e["video_id"]) for e in c)
  results = {}
  for domain in sorted(domains):
    sliced = []
    for c, kind in zip(collections, kinds):
      if kind == "keyed":
        c = {v: x for v, x in c.items() if name(v) == domain}
      elif kind == "entries":
        c = [e for e in c if name(e["video_id"]) == domain]
      elif kind == "aligned":
        idx = np.flatnonzero(item_domains == domain)
        c = c[idx] if isinstance(c, np.ndarray) else [c[i] for i in idx]
      sliced.append(c)
    try:
      results[domain] = metric_fn(*sliced, **kwargs)
    except EmptyEvaluationError:
      continue
  return results
