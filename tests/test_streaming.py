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
from hvlm_jax.eval import streaming as eval_streaming
from hvlm_jax.models import heads, stitching, streaming, streaming_loss
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
  for _ in range(12):
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
  state = stitching.detection_state(b, t, c, window=window, pre_nms_top_k=top_k)
  update = jax.jit(stitching.detection_update, static_argnames="window")
  for i in range(s):
    valid = np.ones((b, t), bool) if step_valid is None else step_valid[i]
    state = update(state, logits[i], offsets[i], step_times[i], step_duration, duration, valid,
                   window=window)
  return stitching.detection_finish(state, window=window, nms_threshold=nms,
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


# ----- the model -----------------------------------------------------------------------------
def init(model, batch):
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch))["params"]


def naive_summaries(tokens, k):
  """K means of runs of ceil(N / K) consecutive tokens and their token counts (numpy)."""
  n = tokens.shape[1]
  g = -(-n // k)
  groups = [np.asarray(tokens[:, i:i + g], np.float64) for i in range(0, n, g)]
  return (np.stack([x.mean(1) for x in groups], 1),
          np.array([x.shape[1] for x in groups], np.float64))


def reference_reader(p, x, memory, sizes, heads):
  """x + tanh(g) * softmax cross-attention of LN(x) to `memory` (every entry real), with
  log(sizes) on the logits; numpy float64 from the reader's parameters."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  h = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  h = h * p["ln"]["scale"] + p["ln"]["bias"]
  proj = lambda y, n: y @ p["attention"]["qkv"][n]["kernel"] + p["attention"]["qkv"][n]["bias"]
  split = lambda y: y.reshape(*y.shape[:-1], heads, -1)  # noqa: E731
  q, k, v = split(proj(h, "query")), split(proj(memory, "key")), split(proj(memory, "value"))
  logits = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1]) + np.log(sizes)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  y = np.einsum("bhnm,bmhd->bnhd", w / w.sum(-1, keepdims=True), v).reshape(x.shape)
  out = y @ p["attention"]["out_proj"]["out"]["kernel"] + p["attention"]["out_proj"]["out"]["bias"]
  return x + np.tanh(p["gate"]) * out


def test_streaming_with_a_large_bank_equals_attending_to_the_concatenated_memory():
  config = tiny_config(tasks=("classification", "action_detection", "video_qa"))
  opts = config.model.streaming
  opts.summary_tokens, opts.memory_capacity = 3, 9  # 8 tokens per segment -> runs of 3, 3, 2.
  b, num = 2, 3
  segs = [tiny_batch(seed) for seed in range(num)]
  valid = np.array([[True, True], [True, True], [True, False]])  # Video 1 has 2 segments.
  base_model, model = model_lib.build_model(config), streaming.build_streaming_model(config)
  base = init(base_model, segs[0])
  params = streaming.add_memory_params(base, init(model, segs[0]))
  params["memory_reader"]["gate"] = jnp.full_like(params["memory_reader"]["gate"], 0.8)
  v = {"params": params}

  def segment_batch(i):
    return dict(video=segs[i]["video"], domain=segs[i]["domain"],
                step_times=segs[i]["step_times"] + 2.0 * i, step_duration=np.ones(b, np.float32),
                duration=np.full(b, 6.0, np.float32), segment_valid=valid[i])

  state = streaming.init_state(model, b, 2)
  step = jax.jit(lambda v, s, x: streaming.segment_step(model, v, s, x))
  for i in range(num):
    state = step(v, state, segment_batch(i))

  # Explicit reference: each segment encoded alone, summaries by naive means, concatenated.
  encode = jax.jit(lambda v, x: model.apply(v, x, method="encode"))
  encs = [encode(v, segment_batch(i)) for i in range(num)]
  summaries, sizes = zip(*(naive_summaries(e["tokens"], 3) for e in encs))
  concat = np.concatenate(summaries, 1)  # (B, 9, D)
  all_sizes = np.concatenate(sizes)
  np.testing.assert_allclose(state["bank"][0], concat[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state["bank"][1, :6], concat[1, :6], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(state["bank_mask"], [[True] * 9, [True] * 6 + [False] * 3])
  np.testing.assert_allclose(state["bank_sizes"][0], all_sizes)

  # Segment 3's detection reads the bank = [S1, S2]: numpy cross-attention to the concatenation.
  e = encs[2]
  t = e["time_features"].shape[1]
  x = np.concatenate([e["time_features"], np.reshape(e["step_tokens"], (b, -1, 32))], 1)
  x = reference_reader(params["memory_reader"], x, concat[:, :6], all_sizes[:6], 2)
  head = jax.jit(lambda v, f, s: model.apply(
      v, f, s, method=lambda m, f, s: m.detection_head(f, s)))
  ref3 = head(v, x[:, :t].astype(np.float32), x[:, t:].reshape(e["step_tokens"].shape).astype(
      np.float32))["logits"]
  np.testing.assert_allclose(state["detection"]["pend_scores"], jax.nn.sigmoid(ref3), rtol=1e-4,
                             atol=1e-6)

  # After the last segment, QA reads [S1, S2, S3] (video 0) and [S1, S2] (video 1).
  video = dict(segs[0], questions=segs[0]["questions"])
  outs = jax.jit(lambda v, s, x: model.apply(v, s["bank"], s["bank_mask"], s["bank_sizes"], x,
                                             method="video_outputs"))(v, state, video)
  qa = lambda m, q, mem, bias: m.qa_head(q, mem, None, bias)  # noqa: E731
  for i, m in ((0, 9), (1, 6)):
    ref = model.apply(v, video["questions"][i:i + 1], concat[i:i + 1, :m].astype(np.float32),
                      np.log(all_sizes[None, :m]).astype(np.float32), method=qa)
    np.testing.assert_allclose(outs["qa_logits"][i:i + 1], ref, rtol=1e-4, atol=1e-5)

  # The training path (lax.scan over segments) computes the same; with an empty bank (segment
  # 1) the streaming model is the clip model itself, from a normally trained parameter tree.
  stacked = dict(video, video=np.stack([s["video"] for s in segs], 1), segment_valid=valid.T)
  train_out = jax.jit(lambda v, x: streaming_loss.stream_outputs(model, v, x))(v, stacked)
  clip = base_model.apply({"params": base}, segs[0])
  np.testing.assert_allclose(train_out["detection_logits"][:, :t], clip["detection_logits"],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(train_out["detection_logits"][0, 2 * t:], ref3[0], rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_array_equal(train_out["detection_logits"][1, 2 * t:], -1e4)
  np.testing.assert_allclose(train_out["qa_logits"], outs["qa_logits"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(train_out["classification"], outs["classification"], rtol=1e-5,
                             atol=1e-5)


def features_setup(truncation):
  config = tiny_config(tasks=("video_qa",))
  opts = config.model.streaming
  opts.summary_tokens, opts.memory_capacity, opts.truncation = 2, 3, truncation
  rng = np.random.default_rng(5)
  batch = dict(features=rng.normal(size=(2, 3, 4, 8)).astype(np.float32),  # (B, S, T, F)
               segment_valid=np.ones((2, 3), bool), valid=np.ones(2, bool),
               questions=rng.integers(1, 20, (2, 2, 5)).astype(np.int32),
               answers=np.array([[1, 2], [3, 4]], np.int32), qa_mask=np.ones((2, 2), bool))
  model = streaming.build_streaming_model(config)
  params = init(model, dict(batch, features=batch["features"][:, 0]))

  def loss(features):
    return streaming_loss.streaming_loss(model, params, dict(batch, features=features), config,
                                    train=False)[0]
  return loss, batch["features"]


def test_truncated_backprop_cuts_the_bank_gradient_and_gradients_match_finite_differences():
  # 3 segments, 2 summaries each, capacity 3: merges happen from segment 2 on.
  full_loss, x = features_setup(truncation=0)
  grad = np.asarray(jax.jit(jax.grad(full_loss))(x))
  assert all(np.abs(grad[:, s]).sum() > 0 for s in range(3))  # QA reaches every segment.
  direction = np.random.default_rng(6).normal(size=x.shape).astype(np.float32)
  f = jax.jit(full_loss)
  eps = 1e-2
  numeric = (float(f(x + eps * direction)) - float(f(x - eps * direction))) / (2 * eps)
  assert numeric == pytest.approx(float((grad * direction).sum()), rel=2e-3, abs=1e-6)

  cut_loss, _ = features_setup(truncation=2)  # The bank is cut before segments 0 and 2.
  cut = np.asarray(jax.jit(jax.grad(cut_loss))(x))
  np.testing.assert_array_equal(cut[:, :2], 0.0)
  assert np.abs(cut[:, 2]).sum() > 0
  assert float(cut_loss(x)) == pytest.approx(float(f(x)), rel=1e-6)  # Same forward pass.


# ----- lazy segment reading ------------------------------------------------------------------
def data_setup(durations=(6.0, 10.0), eval_batch_size=4):
  """Videos of index frames at 5 fps; segments of 2 s with 4 frames of 16 x 16."""
  config = tiny_data_config(data_dir="unused")
  config.data.video.num_frames, config.data.video.frame_size = 4, 16
  config.data.eval_batch_size = eval_batch_size
  config.model.streaming.segment_seconds = 2.0
  root = tmp_dir("segments")
  entries = []
  for i, d in enumerate(durations):
    path = f"{root}/v{i}.mp4"
    write_video(path, index_frames(int(d * 5)), fps=5, gop=5)
    entries.append(VideoEntry(f"v{i}", path, duration=d, actions=[(1.0, 6.5, "jump")],
                              qa_pairs=[("what", "jump")], captions=["a jump"]))
  split = SplitData("validation", root, entries)
  vocabs = Vocabularies(["<pad>", "<unk>", "<bos>", "<eos>", "a", "jump", "what"], ["jump"],
                        ["jump"], ["general"])
  return config, split, vocabs


def test_lazy_segments_equal_decoding_each_segment_on_its_own():
  config, split, _ = data_setup()
  path = split.entries[1].path
  times_of = lambda s: segments_lib.segment_times(s, 2.0, 4)  # noqa: E731
  # Segments 1..4 of the 10 s video in one pass; the first target (2.25 s) needs no seek;
  # segments 3..4 start at 6.25 s > SEEK_GAP and seek to a keyframe first.
  for first, count in ((1, 4), (3, 2)):
    got = list(segments_lib.decoded_segments(path, times_of, first, count))
    assert len(got) == count
    for s, (frames, pts) in zip(range(first, first + count), got):
      ref, ref_pts, _ = video_lib.decode_clip(path, lambda d, s=s: times_of(s))
      np.testing.assert_array_equal(frames, ref)
      np.testing.assert_allclose(pts, ref_pts)
      # Closed form: the frame shown at t is frame floor(5 t), whose pixels are 4 * index.
      np.testing.assert_array_equal(frames[:, 0, 0, 0], 4 * np.floor(5 * times_of(s)))


def test_streaming_eval_batches_lay_out_segments_of_videos_of_different_lengths():
  config, split, vocabs = data_setup()
  (video, segs), = list(segments_lib.streaming_eval_batches(config, split, vocabs))
  np.testing.assert_array_equal(video["valid"], [True, True, False, False])
  np.testing.assert_array_equal(video["num_segments"][:2], [3, 5])
  batches = list(segs)
  assert len(batches) == 5  # The longest video of the batch.
  for s, batch in enumerate(batches):
    np.testing.assert_array_equal(batch["segment_valid"], [s < 3, True, False, False])
    np.testing.assert_allclose(batch["step_times"][0], 2.0 * s + np.array([0.5, 1.5]))
    expected = 4 * np.floor(5 * segments_lib.segment_times(s, 2.0, 4))
    for k in np.flatnonzero(batch["segment_valid"]):
      np.testing.assert_array_equal(batch["video"][k, :, 0, 0, 0], expected)
    np.testing.assert_array_equal(batch["video"][~batch["segment_valid"]], 0)


def test_training_segments_have_the_targets_of_their_whole_window():
  config, split, vocabs = data_setup(durations=(10.0,))
  config.model.streaming.train_segments = 3
  config.data.augment.enabled = False
  element = segments_lib._StreamingTrainElement(config, split, vocabs, 0, 0, 1, None)
  ex = element(0)
  first = int(round(ex["step_times"][0, 0] / 2.0 - 0.25))  # Random start segment.
  ref = action_targets([(1.0, 6.5, "jump")], np.array([0]), first * 2.0, 6.0, 6, 1)
  np.testing.assert_array_equal(ex["action_targets"].reshape(6, 1), ref["action_targets"])
  np.testing.assert_allclose(ex["action_offsets"].reshape(6, 2), ref["action_offsets"],
                             rtol=1e-6)
  np.testing.assert_allclose(ex["step_times"].reshape(6), ref["step_times"])
  assert ex["step_duration"] == 1.0 and ex["segment_valid"].all()
  expected = 4 * np.floor(5 * np.concatenate(
      [segments_lib.segment_times(first + s, 2.0, 4) for s in range(3)]))
  np.testing.assert_array_equal(ex["video"][:, :, 0, 0, 0].reshape(-1), expected)


def test_split_predictions_do_not_depend_on_the_batch_and_losses_equal_the_training_loss():
  # The 6 s video (3 segments) streamed beside a 10 s one (its segments 4, 5 masked) and alone.
  data_config, split, vocabs = data_setup(eval_batch_size=2)
  config = tiny_config(tasks=("action_detection", "video_qa"))
  config.data = data_config.data
  config.model.heads.num_classes, config.model.heads.num_answers = 1, 1
  config.model.streaming.segment_seconds = 2.0
  config.model.streaming.summary_tokens, config.model.streaming.memory_capacity = 3, 4
  model = streaming.build_streaming_model(config)
  (video, segs), = list(segments_lib.streaming_eval_batches(config, split, vocabs))
  segs = list(segs)
  params = init(model, dict(segs[0], questions=video["questions"],
                            caption_tokens=video["caption_tokens"]))
  params["memory_reader"]["gate"] = jnp.full_like(params["memory_reader"]["gate"], 0.8)
  (both, metrics, count, _), = list(eval_streaming.split_predictions(config, model, params, split,
                                                                 vocabs))
  config.data.eval_batch_size = 1
  alone, _, _, _ = next(eval_streaming.split_predictions(config, model, params, split, vocabs))
  assert int(np.asarray(both["detection_valid"][0]).sum()) > 0 and int(count) == 2
  for k, v in alone.items():
    np.testing.assert_allclose(np.asarray(both[k][:1]), np.asarray(v), rtol=1e-5, atol=1e-6,
                               err_msg=k)
  assert float(np.asarray(both["detection_end"][0]).max()) <= 6.0  # Clipped to the video.

  # Evaluation losses (accumulated segment by segment) == streaming_loss on all segments at once.
  stacked = {k: np.stack([s[k] for s in segs], 1) for k in
             ("video", "segment_valid", "action_targets", "action_offsets", "step_times")}
  train_batch = dict(video, **stacked, step_duration=segs[0]["step_duration"],
                     action_mask=video["action_mask"] & video["valid"])
  _, ref = jax.jit(lambda p, b: streaming_loss.streaming_loss(model, p, b, config, train=False))(
      params, train_batch)
  assert float(ref["action_detection_loss"]) > 0
  for k, v in ref.items():
    np.testing.assert_allclose(float(metrics[k]), float(v), rtol=1e-5, err_msg=k)
