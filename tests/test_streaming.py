"""Streaming over long videos (hvlm_jax/models/streaming.py, hvlm_jax/data/segments.py).

References: a hand-made bank where the most similar adjacent pair is known; conservation of
entry sizes; `decode_detections` run once over the concatenated timeline and hand-computed
times for stitching; explicit cross-attention (numpy) to the explicitly concatenated summaries
(naive numpy means) for the bank; HierarchicalVLM itself for an empty bank; finite differences
for gradients; `video.decode_clip` per segment for the lazy reader; `targets.action_targets`
over the whole window for per-segment targets.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from hvlm_jax.data import segments as segments_lib
from hvlm_jax.data import video as video_lib
from hvlm_jax.data.annotations import SplitData, VideoEntry
from hvlm_jax.data.targets import action_targets
from hvlm_jax.data.text import Vocabularies
from hvlm_jax.models import heads, streaming
from hvlm_jax.models import model as model_lib

from data_testutil import index_frames, tmp_dir, write_video
from data_testutil import tiny_config as tiny_data_config
from test_model import tiny_batch, tiny_config


# ----- the bank ------------------------------------------------------------------------------
def test_compression_merges_the_most_similar_adjacent_pair_first():
  # a and d are the most similar pair overall but not adjacent; b, c are the most similar
  # adjacent pair, so they merge (size-weighted), and nothing else does.
  a, b, c, d = [1.0, 0.0], [0.0, 1.0], [0.2, 1.0], [1.0, 0.05]
  bank = (jnp.asarray([[a, b, [0.0, 0.0]]]), jnp.asarray([[True, True, False]]),
          jnp.asarray([[2.0, 1.0, 0.0]]))  # A bank of capacity 3 holding 2 entries.
  seg = dict(summary=jnp.asarray([[c, d]]), summary_mask=jnp.ones((1, 2), bool),
             summary_sizes=jnp.asarray([[3.0, 5.0]]))
  new, mask, sizes = streaming.update_bank(bank, seg, 3, jnp.ones((1,), bool))
  np.testing.assert_allclose(new[0], [a, [0.15, 1.0], d], rtol=1e-6)  # (1 b + 3 c) / 4
  np.testing.assert_array_equal(sizes[0], [2.0, 4.0, 5.0])
  assert bool(mask.all())
  # A segment that does not exist (past the end of this video) leaves the bank as it was.
  kept = streaming.update_bank(bank, seg, 3, jnp.zeros((1,), bool))
  for x, y in zip(kept, bank):
    np.testing.assert_array_equal(x, y)


def test_bank_never_exceeds_capacity_and_conserves_sizes():
  rng = np.random.default_rng(0)
  b, c, k, d = 3, 5, 4, 6
  bank = streaming.empty_bank(b, c, d)
  update = jax.jit(streaming.update_bank, static_argnums=2)
  total = np.zeros(b)
  for s in range(12):
    sizes = rng.integers(1, 5, (b, k)).astype(np.float32)
    mask = rng.random((b, k)) > 0.25
    valid = rng.random(b) > 0.2
    seg = dict(summary=rng.normal(size=(b, k, d)).astype(np.float32), summary_mask=mask,
               summary_sizes=sizes)
    bank = update(bank, seg, c, valid)
    total += np.where(valid, (sizes * mask).sum(1), 0.0)
    assert bank[0].shape == (b, c, d) and int(bank[1].sum(1).max()) <= c
    # Merging only averages: the entries' sizes always add up to everything taken in.
    np.testing.assert_allclose(np.asarray(bank[2]).sum(1), total, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(bank[2]) > 0, bank[1])


# ----- detection stitching -------------------------------------------------------------------
def stitch(logits, offsets, step_times, step_duration, duration, *, window, top_k=200,
           nms=0.5, max_det=20, min_score=1e-3, step_valid=None):
  """Runs the streaming detection state over segments (S, B, T', ...) of head outputs."""
  s, b, t, c = logits.shape
  state = streaming.detection_state(b, t, c, window=window, pre_nms_top_k=top_k)
  update = jax.jit(streaming.detection_update, static_argnames="window")
  for i in range(s):
    valid = np.ones((b, t), bool) if step_valid is None else step_valid[i]
    state = update(state, logits[i], offsets[i], step_times[i], step_duration, duration, valid,
                   window=window)
  return streaming.detection_finish(state, window=window, nms_threshold=nms,
                                    max_detections=max_det, min_score=min_score)


def test_detection_stitching_maps_segment_times_to_video_times_across_borders():
  # Two 8 s segments of 4 steps (2 s each): step centres 1, 3, 5, 7 | 9, 11, 13, 15 s.
  logits = np.full((2, 1, 4, 2), -20.0, np.float32)
  offsets = np.zeros((2, 1, 4, 2), np.float32)
  logits[0, 0, 3, 1], offsets[0, 0, 3] = 3.0, (1.5, 2.5)  # 7 s -> [4, 12] s, class 1
  logits[1, 0, 0, 1], offsets[1, 0, 0] = 2.0, (2.5, 1.5)  # 9 s -> [4, 12] s again: suppressed
  logits[1, 0, 2, 0], offsets[1, 0, 2] = 1.0, (0.5, 0.5)  # 13 s -> [12, 14] s, class 0
  logits[1, 0, 3, 0], offsets[1, 0, 3] = 0.0, (0.5, 3.0)  # 15 s -> [14, 21] clipped to 20 s
  times = np.stack([np.arange(4) * 2.0 + 1.0, np.arange(4) * 2.0 + 9.0])[:, None]
  out = stitch(logits, offsets, times.astype(np.float32), np.full(1, 2.0, np.float32),
               np.full(1, 20.0, np.float32), window=1)
  got = sorted((round(float(s), 5), round(float(e), 5), int(l), round(float(sc), 5))
               for s, e, l, sc, ok in zip(*(np.asarray(out[k][0]) for k in
                                            ("start", "end", "label", "score", "valid"))) if ok)
  sig = lambda x: round(1 / (1 + np.exp(-x)), 5)  # noqa: E731
  assert got == [(4.0, 12.0, 1, sig(3.0)), (12.0, 14.0, 0, sig(1.0)), (14.0, 20.0, 0, sig(0.0))]


@pytest.mark.parametrize("window", [1, 3, 4])
def test_stitching_equals_decode_detections_on_the_concatenated_timeline(window):
  rng = np.random.default_rng(window)
  s, b, t, c, top_k = 4, 2, 5, 3, 12  # top_k < S T' C: the running top-k is exercised.
  logits = rng.normal(size=(s, b, t, c)).astype(np.float32) * 2
  offsets = rng.uniform(0.2, 3.0, (s, b, t, 2)).astype(np.float32)
  step = np.array([1.5, 2.0], np.float32)
  times = ((np.arange(s * t) + 0.5)[None] * step[:, None]).astype(np.float32)  # (B, S T')
  duration = np.array([s * t * 1.5 - 1.0, s * t * 2.0], np.float32)
  seg_times = np.moveaxis(times.reshape(b, s, t), 1, 0)
  out = stitch(logits, offsets, seg_times, step, duration, window=window, top_k=top_k,
               nms=0.4, max_det=6, min_score=0.05)
  flat = lambda x: np.moveaxis(x, 0, 1).reshape(b, s * t, *x.shape[3:])  # noqa: E731
  ref = heads.decode_detections(flat(logits), flat(offsets), times, step, duration,
                                window=window, nms_threshold=0.4, pre_nms_top_k=top_k,
                                max_detections=6, min_score=0.05)
  for k in ("start", "end", "label", "score", "valid"):
    np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), rtol=1e-5, atol=1e-6,
                               err_msg=k)
  assert np.asarray(ref["valid"]).sum() >= 4
