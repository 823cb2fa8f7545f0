"""Per-example task targets in the BATCH SCHEMA (see TEAM.md), as numpy arrays.

Action detection works at the model's temporal resolution: T' = T / tubelet_size[0] steps
evenly covering the sampled window [start, start + length); step j has centre
start + (j + 1/2) * length / T'. A step belongs to a segment when its centre lies in
[segment start, segment end); where segments overlap, the shortest one gives the offsets
(the FCOS / ActionFormer rule).
"""
from __future__ import annotations

import numpy as np

from hvlm_jax.data.text import Vocabularies


def action_targets(actions, classes: np.ndarray, start: float, length: float, num_steps: int,
                   num_classes: int) -> dict[str, np.ndarray]:
  """Multi-hot step labels and boundary offsets for the window [start, start + length).

  Args:
    actions: (start, end, label) tuples in seconds.
    classes: (len(actions),) int class ids (-1: unknown label, ignored).
  Returns:
    action_targets (T', C) float32, action_offsets (T', 2) float32 (seconds from the step
    centre back to the segment start and on to its end; 0 outside segments),
    step_times (T',) float32, step_duration () float32.
  """
  step = length / num_steps
  centres = start + (np.arange(num_steps) + 0.5) * step
  targets = np.zeros((num_steps, num_classes), np.float32)
  offsets = np.zeros((num_steps, 2), np.float32)
  best = np.full(num_steps, np.inf)
  for (s, e, _), c in zip(actions, classes):
    if c < 0:
      continue
    inside = (centres >= s) & (centres < e)
    targets[inside, c] = 1.0
    shorter = inside & (e - s < best)
    offsets[shorter, 0] = centres[shorter] - s
    offsets[shorter, 1] = e - centres[shorter]
    best[shorter] = e - s
  return dict(action_targets=targets, action_offsets=offsets,
              step_times=centres.astype(np.float32), step_duration=np.float32(step))


def clip_label(actions, classes: np.ndarray) -> int:
  """The class with the largest total duration (ties: the smaller class id); -1 if none."""
  totals: dict[int, float] = {}
  for (s, e, _), c in zip(actions, classes):
    if c >= 0:
      totals[int(c)] = totals.get(int(c), 0.0) + (e - s)
  if not totals:
    return -1
  return min(totals, key=lambda c: (-totals[c], c))


def example_targets(entry, vocabs: Vocabularies, config, *, start: float, length: float,
                    rng: np.random.Generator | None) -> dict[str, np.ndarray]:
  """Every target field of one example. `rng` (training) picks which QA pairs and which
  caption are used when there are more than fit; without it the first ones are taken."""
  data = config.data
  num_steps = data.video.num_frames // config.model.tubelet_size[0]
  out: dict[str, np.ndarray] = {}
  actions = entry.actions or []
  classes = np.array([vocabs.action_id(l) for _, _, l in actions], np.int64)
  out.update(action_targets(actions, classes, start, length, num_steps, vocabs.num_actions))
  out["action_mask"] = np.bool_(entry.actions is not None)
  label = clip_label(actions, classes)
  out["label"] = np.int32(max(label, 0))
  out["label_mask"] = np.bool_(label >= 0)
  smax = data.max_segments
  segs = [(s, e, c) for (s, e, _), c in zip(actions, classes) if c >= 0][:smax]
  out["segments"] = np.zeros((smax, 2), np.float32)
  out["segment_labels"] = np.zeros(smax, np.int32)
  out["segment_mask"] = np.zeros(smax, bool)
  for i, (s, e, c) in enumerate(segs):
    out["segments"][i] = (s, e)
    out["segment_labels"][i] = c
    out["segment_mask"][i] = True

  q, lq = data.max_questions, data.question_length
  out["questions"] = np.zeros((q, lq), np.int32)
  out["answers"] = np.zeros(q, np.int32)
  out["qa_mask"] = np.zeros(q, bool)
  pairs = list(entry.qa_pairs or ())
  if rng is not None and len(pairs) > q:
    pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), q, replace=False))]
  for i, (question, answer) in enumerate(pairs[:q]):
    aid = vocabs.answer_id(answer)
    out["questions"][i] = vocabs.encode(question, lq)
    out["answers"][i] = max(aid, 0)
    out["qa_mask"][i] = aid >= 0

  caps = entry.captions or []
  cap = caps[int(rng.integers(len(caps)))] if (rng is not None and caps) else (
      caps[0] if caps else "")
  out["caption_tokens"] = (vocabs.encode(cap, data.caption_length, bos_eos=True) if caps
                           else np.zeros(data.caption_length, np.int32))
  out["caption_mask"] = np.bool_(bool(caps))
  out["domain"] = np.int32(vocabs.domain_id(entry.domain))
  return out
