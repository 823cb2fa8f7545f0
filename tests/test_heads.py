"""Task heads: losses vs hand computations, detection decoding and NMS on hand-made scores,
beam search vs exhaustive search, beam 1 == greedy, KV-cache decoding == teacher forcing,
causality and padding invariance of the text modules."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from hvlm_jax.models import heads
from hvlm_jax.models.heads import decoding, detection
from hvlm_jax.models.heads.captioning import CaptionDecoder

sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
log_softmax = lambda z: z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(  # noqa: E731
    -1, keepdims=True)) - z.max(-1, keepdims=True)


# ----- losses ---------------------------------------------------------------------------------

def test_detection_loss_matches_hand_computation():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 2)).astype(np.float32)
  offsets = rng.uniform(0.2, 2, size=(2, 3, 2)).astype(np.float32)
  targets = np.array([[[1, 0], [0, 0], [1, 1]], [[0, 1], [0, 1], [0, 0]]], np.float32)
  action_offsets = rng.uniform(0.5, 3, size=(2, 3, 2)).astype(np.float32)
  batch = dict(action_targets=targets, action_offsets=action_offsets,
               step_duration=np.array([2.0, 1.0], np.float32),
               action_mask=np.array([True, False]))  # Example 1 has no detection labels.
  out = detection.detection_loss(logits, offsets, batch, loss="focal", regression_loss="diou",
                                 regression_weight=0.5)
  p = sig(logits[0].astype(np.float64))
  y = targets[0]
  focal = -(y * 0.25 * (1 - p) ** 2 * np.log(p) + (1 - y) * 0.75 * p ** 2 * np.log(1 - p))
  num_pos = 2  # Steps 0 and 2 of example 0.
  assert float(out["cls"]) == pytest.approx(focal.sum() / num_pos, rel=1e-5)
  diou = []
  for t in (0, 2):
    ps, pe = offsets[0, t]
    ts, te = action_offsets[0, t] / 2.0
    inter = min(ps, ts) + min(pe, te)
    union = ps + pe + ts + te - inter
    rho = ((pe - ps) - (te - ts)) / 2
    diou.append(1 - inter / union + (rho / (max(ps, ts) + max(pe, te))) ** 2)
  assert float(out["reg"]) == pytest.approx(np.mean(diou), rel=1e-5)
  assert float(out["total"]) == pytest.approx(float(out["cls"]) + 0.5 * float(out["reg"]))
  hits = [targets[0, t, logits[0, t].argmax()] for t in (0, 2)]
  assert float(out["accuracy"]) == pytest.approx(np.mean(hits))
  l1 = detection.detection_loss(logits, offsets, batch, loss="bce", regression_loss="l1")
  bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  assert float(l1["cls"]) == pytest.approx(bce.sum() / num_pos, rel=1e-5)
  l1_ref = np.mean([np.abs(offsets[0, t] - action_offsets[0, t] / 2).sum() for t in (0, 2)])
  assert float(l1["reg"]) == pytest.approx(l1_ref, rel=1e-5)


def test_segment_diou_hand_value():
  # pred (1, 2), target (2, 2): IoU 3/4, centres 0.5 apart, enclosing 4.
  assert float(detection.segment_diou_loss(jnp.array([1.0, 2.0]), jnp.array([2.0, 2.0]))) == \
      pytest.approx(0.25 + (0.5 / 4) ** 2)
  assert float(detection.segment_diou_loss(jnp.array([1.0, 3.0]), jnp.array([1.0, 3.0]))) == 0


def test_qa_caption_and_classification_losses_match_hand_computation():
  rng = np.random.default_rng(1)
  qa_logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  answers = np.array([[1, 4, 0], [2, 2, 3]], np.int32)
  qa_mask = np.array([[True, True, False], [False, True, False]])
  loss, acc = heads.qa_loss(qa_logits, answers, qa_mask)
  lp = log_softmax(qa_logits.astype(np.float64))
  pairs = [(0, 0), (0, 1), (1, 1)]
  assert float(loss) == pytest.approx(-np.mean([lp[b, q, answers[b, q]] for b, q in pairs]),
                                      rel=1e-5)
  assert float(acc) == pytest.approx(np.mean([qa_logits[b, q].argmax() == answers[b, q]
                                              for b, q in pairs]))

  v, s = 6, 0.1
  tokens = np.array([[2, 4, 5, 3, 0], [2, 5, 3, 0, 0]], np.int32)
  cap_logits = rng.normal(size=(2, 4, v)).astype(np.float32)
  loss, acc = heads.caption_loss(cap_logits, tokens, np.array([True, False]), label_smoothing=s)
  lp = log_softmax(cap_logits[0].astype(np.float64))
  targets = [4, 5, 3]  # Example 0 only; its trailing pad is not a target.
  ce = [-((1 - s) * lp[i, w] + s / v * lp[i].sum()) for i, w in enumerate(targets)]
  assert float(loss) == pytest.approx(np.mean(ce), rel=1e-5)
  assert float(acc) == pytest.approx(np.mean([cap_logits[0, i].argmax() == w
                                              for i, w in enumerate(targets)]))

  cls_logits = rng.normal(size=(3, 4)).astype(np.float32)
  loss, _ = heads.classification_loss(cls_logits, np.array([1, 0, 3]),
                                      np.array([True, False, True]))
  lp = log_softmax(cls_logits.astype(np.float64))
  assert float(loss) == pytest.approx(-(lp[0, 1] + lp[2, 3]) / 2, rel=1e-5)


# ----- detection decoding ---------------------------------------------------------------------

def test_smoothing_is_a_moving_average_over_existing_steps():
  x = np.arange(12, dtype=np.float32).reshape(1, 6, 2) ** 2
  for w in (1, 3, 4):
    ref = np.stack([x[0, max(0, t - w // 2):t + (w - 1 - w // 2) + 1].mean(0)
                    for t in range(6)])
    np.testing.assert_allclose(detection.smooth_scores(jnp.asarray(x), w)[0], ref, rtol=1e-6)


def test_nms_removes_the_right_overlaps():
  start = jnp.array([1.0, 0.0, 20.0, 0.0, 5.0])
  end = jnp.array([11.0, 10.0, 30.0, 10.0, 15.0])
  label = jnp.array([0, 0, 0, 1, 0])
  score = jnp.array([0.8, 0.9, 0.7, 0.6, 0.5])
  keep = detection.nms_1d(start, end, label, score, 0.5)
  # [1, 11] overlaps the better [0, 10] with tIoU 9/11; [0, 10] of label 1 is another class;
  # [5, 15] has tIoU 5/15 with [0, 10] and 4/14 with the suppressed [1, 11].
  np.testing.assert_array_equal(keep, [False, True, True, True, True])
  keep = detection.nms_1d(start, end, label, score, 0.3)  # now 5/15 > 0.3 suppresses [5, 15]
  np.testing.assert_array_equal(keep, [False, True, True, True, False])


def _hand_made_detection_inputs():
  t, c = 10, 2
  logits = np.full((1, t, c), -10.0, np.float32)
  offsets = np.full((1, t, 2), 0.5, np.float32)
  centres = np.arange(t) + 0.5
  for cls, (s, e), steps in ((0, (2, 5), (2, 3, 4)), (1, (7, 9), (7, 8))):
    for i in steps:
      logits[0, i, cls] = 5.0
      offsets[0, i] = (centres[i] - s, e - centres[i])
  return logits, offsets, centres[None].astype(np.float32)


def test_decode_hand_made_scores_without_smoothing():
  logits, offsets, times = _hand_made_detection_inputs()
  out = detection.decode_detections(logits, offsets, times, np.ones(1, np.float32),
                                    np.full(1, 10.0, np.float32), window=1, max_detections=5)
  got = detection.detections_as_lists(out)[0]
  assert [(s, e, lab) for s, e, lab, _ in got] == [(2.0, 5.0, 0), (7.0, 9.0, 1)] or \
      [(s, e, lab) for s, e, lab, _ in got] == [(7.0, 9.0, 1), (2.0, 5.0, 0)]
  assert all(sc == pytest.approx(sig(5.0), rel=1e-5) for *_, sc in got)


def _naive_decode(logits, offsets, times, window, thr, top_k, min_score, duration):
  p = sig(logits[0].astype(np.float64))
  t = p.shape[0]
  half = window // 2
  p = np.stack([p[max(0, i - half):i + window - half].mean(0) for i in range(t)])
  cands = []
  for i, c in itertools.product(range(t), range(p.shape[1])):
    s = max(times[0, i] - offsets[0, i, 0], 0.0)
    e = min(times[0, i] + offsets[0, i, 1], duration)
    cands.append((p[i, c], s, e, c))
  cands.sort(key=lambda x: -x[0])
  kept = []
  for sc, s, e, c in cands:
    def iou(k, s=s, e=e):
      inter = max(0, min(e, k[2]) - max(s, k[1]))
      return inter / ((e - s) + (k[2] - k[1]) - inter)
    if sc >= min_score and e > s and not any(k[3] == c and iou(k) > thr for k in kept):
      kept.append((sc, s, e, c))
  return [(s, e, c, sc) for sc, s, e, c in kept[:top_k]]


def test_decode_with_smoothing_matches_a_naive_loop():
  logits, offsets, times = _hand_made_detection_inputs()
  out = detection.decode_detections(logits, offsets, times, np.ones(1, np.float32),
                                    np.full(1, 10.0, np.float32), window=3,
                                    nms_threshold=0.5, max_detections=8, min_score=1e-3)
  got = detection.detections_as_lists(out)[0]
  ref = _naive_decode(logits, offsets, times, 3, 0.5, 8, 1e-3, 10.0)
  assert len(got) == len(ref) == 6
  order = lambda x: (x[2], x[0])  # noqa: E731  (label, start): the scores contain ties.
  for g, r in zip(sorted(got, key=order), sorted(ref, key=order)):
    assert g[:3] == pytest.approx(r[:3], abs=1e-5) and g[3] == pytest.approx(r[3], rel=1e-5)


# ----- autoregressive decoding ----------------------------------------------------------------

V, L = 5, 3  # pad 0, unk 1, bos 2, eos 3, one word 4


def _toy_step(table):
  """A 'model' whose next-token logits depend on the whole prefix, kept in the cache."""
  def step_fn(tokens, index, cache):
    state = cache["state"] * V + tokens
    return table[index, state % table.shape[1]], dict(state=state)
  return step_fn


def _exhaustive_best(table, alpha):
  best = (-np.inf, None)
  for n in range(1, L + 1):
    for words in itertools.product(range(V), repeat=n):
      if words[-1] != 3 or 3 in words[:-1]:
        continue
      state, total = 0, 0.0
      for i, w in enumerate((2,) + words[:-1]):
        state = state * V + w
        total += log_softmax(np.asarray(table[i, state % table.shape[1]], np.float64))[words[i]]
      score = total / ((5 + n) / 6) ** alpha
      best = max(best, (score, words))
  return best


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_finds_the_exhaustive_optimum(alpha):
  table = jax.random.normal(jax.random.key(0), (L, V ** (L + 1), V)) * 2.0
  k = V ** L  # Wide enough that no candidate is ever pruned: the search is exact.
  tokens, score = decoding.beam_search(_toy_step(table), dict(state=jnp.zeros(k, jnp.int32)),
                                       1, k, L, alpha=alpha)
  ref_score, ref_words = _exhaustive_best(np.asarray(table), alpha)
  assert float(score[0]) == pytest.approx(ref_score, rel=1e-5)
  assert tuple(np.asarray(tokens[0, :len(ref_words)])) == ref_words
  assert np.all(np.asarray(tokens[0, len(ref_words):]) == 0)


def test_beam_one_equals_greedy_on_toy_model():
  cache = dict(state=jnp.zeros(3, jnp.int32))
  greedy = jax.jit(lambda tab: decoding.greedy_decode(_toy_step(tab), cache, 3, L))
  beam = jax.jit(lambda tab: decoding.beam_search(_toy_step(tab), cache, 3, 1, L))
  for seed in range(4):
    table = jax.random.normal(jax.random.key(seed), (L, V ** (L + 1), V)) * 2.0
    (g_tokens, g_score), (b_tokens, b_score) = greedy(table), beam(table)
    np.testing.assert_array_equal(g_tokens, b_tokens)
    np.testing.assert_allclose(g_score, b_score, rtol=1e-6)


@pytest.fixture(scope="module")
def decoder_setup():
  dec = CaptionDecoder(vocab_size=11, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)
  memory = jax.random.normal(jax.random.key(1), (2, 5, 16))
  memory_mask = jnp.array([[True] * 5, [True, True, True, False, False]])
  tokens = jnp.array([[2, 5, 7, 3, 0, 0], [2, 9, 4, 8, 6, 3]])
  params = dec.init(jax.random.key(0), tokens, memory, memory_mask)
  return dec, params, memory, memory_mask, tokens


def test_decoder_is_causal_and_ignores_masked_memory(decoder_setup):
  dec, params, memory, mask, tokens = decoder_setup
  run = jax.jit(dec.apply)
  base = run(params, tokens, memory, mask)
  changed = run(params, tokens.at[:, 3].set(10), memory, mask)
  np.testing.assert_allclose(changed[:, :3], base[:, :3], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(changed[:, 3:] - base[:, 3:]).max()) > 1e-3
  other = run(params, tokens, memory.at[1, 3:].set(100.0), mask)  # masked tokens only
  np.testing.assert_allclose(other, base, rtol=1e-5, atol=1e-6)


def test_cached_step_decoding_equals_teacher_forcing(decoder_setup):
  dec, params, memory, mask, tokens = decoder_setup
  full = dec.apply(params, tokens, memory, mask)
  cross = dec.apply(params, memory, method=CaptionDecoder.cross_kv)
  cache = dec.init_cache(2, tokens.shape[1])
  step = jax.jit(lambda tok, i, c: dec.apply(params, tok, i, c, cross, mask,
                                             method=CaptionDecoder.step))
  for i in range(tokens.shape[1]):
    logits, cache = step(tokens[:, i], i, cache)
    np.testing.assert_allclose(logits, full[:, i], rtol=1e-4, atol=1e-5)


def test_caption_beam_one_equals_greedy_and_beam_scores_no_worse(decoder_setup):
  dec, params, memory, mask, _ = decoder_setup
  greedy = jax.jit(lambda: heads.generate(dec, params, memory, mask, max_length=7))()
  cross = dec.apply(params, memory, method=CaptionDecoder.cross_kv)
  step = lambda t, i, c: dec.apply(params, t, i, c, cross, mask,  # noqa: E731
                                   method=CaptionDecoder.step)
  beam1 = jax.jit(lambda: decoding.beam_search(step, dec.init_cache(2, 7), 2, 1, 7))()
  np.testing.assert_array_equal(greedy[0], beam1[0])
  np.testing.assert_allclose(greedy[1], beam1[1], rtol=1e-5)
  beam4 = jax.jit(lambda: heads.generate(dec, params, memory, mask, max_length=7,
                                         beam_size=4))()
  assert np.all(np.asarray(beam4[1]) >= np.asarray(greedy[1]) - 1e-5)
  # Scores are the model's own log-probabilities of the returned tokens.
  full = dec.apply(params, jnp.concatenate([jnp.full((2, 1), 2), beam4[0]], 1)[:, :-1], memory,
                   mask)
  lp = jax.nn.log_softmax(full, -1)
  for b in range(2):
    toks = list(np.asarray(beam4[0][b]))
    n = toks.index(3) + 1 if 3 in toks else len(toks)
    ref = sum(float(lp[b, i, toks[i]]) for i in range(n))
    assert float(beam4[1][b]) == pytest.approx(ref, rel=1e-4, abs=1e-4)


def test_qa_questions_are_independent_and_padding_inert():
  head = heads.QAHead(num_answers=4, vocab_size=12, hidden_size=16, num_layers=1, num_heads=2,
                      mlp_dim=32)
  memory = jax.random.normal(jax.random.key(2), (1, 6, 16))
  q = jnp.array([[[5, 6, 7, 0], [8, 9, 0, 0]]])
  params = head.init(jax.random.key(0), q, memory)
  run = jax.jit(head.apply)
  base = run(params, q, memory)
  other = run(params, q.at[0, 1].set(jnp.array([11, 10, 4, 3])), memory)
  np.testing.assert_allclose(other[0, 0], base[0, 0], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(other[0, 1] - base[0, 1]).max()) > 1e-4
  longer = run(params, jnp.pad(q, ((0, 0), (0, 0), (0, 3))), memory)
  np.testing.assert_allclose(longer, base, rtol=1e-5, atol=1e-6)
  assert math.isfinite(float(run(params, jnp.zeros_like(q), memory).sum()))


def test_memory_bias_log_size_equals_duplicated_tokens(decoder_setup):
  """ToMe proportional attention: a token of size 2 with bias log 2 == the token twice."""
  dec, params, memory, _, tokens = decoder_setup
  dup = jnp.concatenate([memory, memory[:, :1]], axis=1)  # token 0 appears twice
  bias = jnp.zeros(memory.shape[:2]).at[:, 0].set(jnp.log(2.0))
  run = jax.jit(dec.apply)
  np.testing.assert_allclose(run(params, tokens, memory, None, bias),
                             run(params, tokens, dup), rtol=1e-4, atol=1e-5)
  head = heads.QAHead(num_answers=3, vocab_size=12, hidden_size=16, num_layers=1, num_heads=2,
                      mlp_dim=32)
  q = jnp.array([[[5, 6, 0], [8, 0, 0]], [[4, 4, 4], [0, 0, 0]]])
  qa_params = head.init(jax.random.key(0), q, memory)
  run = jax.jit(head.apply)
  np.testing.assert_allclose(run(qa_params, q, memory, None, bias), run(qa_params, q, dup),
                             rtol=1e-4, atol=1e-5)


def test_attention_pool_matches_naive_softmax_pooling_and_sees_position():
  from hvlm_jax.models.heads.text import AttentionPool
  pool = AttentionPool(num_heads=2)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 8)).astype(np.float32)
  mask = np.array([[True] * 5, [True, True, True, False, False]])
  bias = rng.normal(size=(2, 5)).astype(np.float32)
  params = nn.meta.unbox(pool.init(jax.random.key(0), x, mask, bias))["params"]
  got = pool.apply({"params": params}, x, mask, bias)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  h = h * p["ln"]["scale"] + p["ln"]["bias"]
  k = h @ p["key"]["kernel"] + p["key"]["bias"]
  v = h @ p["value"]["kernel"] + p["value"]["bias"]
  for b in range(2):
    heads_out = []
    for j in range(2):
      sl = slice(4 * j, 4 * j + 4)
      logits = k[b, :, sl] @ p["probe"][0, sl] / 2.0 + bias[b]
      logits = np.where(mask[b], logits, -np.inf)
      w = np.exp(logits - logits.max())
      heads_out.append((w / w.sum()) @ v[b, :, sl])
    ref = np.concatenate(heads_out) @ p["out"]["kernel"] + p["out"]["bias"]
    np.testing.assert_allclose(got[b], ref, rtol=1e-4, atol=1e-5)
  # An object token moving over a background of position embeddings leaves the spatial mean
  # unchanged but not the attention pool (with a probe aligned to the object's content).
  pos = rng.normal(size=(6, 8)).astype(np.float32)
  obj = np.zeros(8, np.float32)
  obj[0] = 6.0
  grids = np.stack([pos + np.where(np.arange(6)[:, None] == i, obj, 0) for i in (1, 4)])
  np.testing.assert_allclose(grids[0].mean(0), grids[1].mean(0), rtol=1e-6)
  out = pool.apply({"params": params}, grids)
  assert float(np.abs(out[0] - out[1]).max()) > 1e-3


def test_grid_positions_pool_knows_where_an_object_is():
  from hvlm_jax.models.heads.text import AttentionPool
  pos = np.asarray(detection.grid_positions(9, 8))  # 3 x 3 grid, row-major
  np.testing.assert_array_equal(pos[3, :4], pos[5, :4])  # same row: same row half
  np.testing.assert_array_equal(pos[1, 4:], pos[7, 4:])  # same column: same column half
  assert np.abs(pos[0] - pos[4]).max() > 0.5
  obj = np.zeros((9, 8), np.float32)
  grids = np.stack([obj.copy(), obj.copy()])
  grids[0, 2, 0] = grids[1, 6, 0] = 5.0  # one object, at (0, 2) then at (2, 0)
  pool = AttentionPool(num_heads=2)
  params = pool.init(jax.random.key(1), grids)
  plain = pool.apply(params, grids)  # a token set without positions is permutation invariant
  np.testing.assert_allclose(plain[0], plain[1], rtol=1e-5, atol=1e-6)
  placed = pool.apply(params, grids, positions=jnp.asarray(pos))
  assert float(jnp.abs(placed[0] - placed[1]).max()) > 1e-3


def test_qa_head_pool_video_switch_decides_whether_the_mean_video_token_reaches_the_answer():
  """With no cross-attention layer the answer can see the video only through the mean video
  token: with pool_video=False it must not depend on the video at all, with True it must."""
  q = jnp.array([[[5, 6, 7, 0], [8, 9, 0, 0]]])
  memory = jax.random.normal(jax.random.key(2), (1, 6, 16))
  other = jax.random.normal(jax.random.key(3), (1, 6, 16))
  for pool, depends in ((True, True), (False, False)):
    head = heads.QAHead(num_answers=4, vocab_size=12, hidden_size=16, num_layers=0,
                        num_heads=2, mlp_dim=32, pool_video=pool)
    params = nn.meta.unbox(head.init(jax.random.key(0), q, memory))["params"]
    assert ("ln_video" in params) == pool
    assert params["mlp"]["kernel"].shape == ((32 if pool else 16), 32)
    diff = float(jnp.abs(head.apply({"params": params}, q, memory)
                         - head.apply({"params": params}, q, other)).max())
    assert (diff > 1e-4) == depends, (pool, diff)
  # With cross-attention and pool_video=False the answer still reads the video.
  head = heads.QAHead(num_answers=4, vocab_size=12, hidden_size=16, num_layers=1, num_heads=2,
                      mlp_dim=32, pool_video=False)
  params = head.init(jax.random.key(0), q, memory)
  assert float(jnp.abs(head.apply(params, q, memory) - head.apply(params, q, other)).max()) > 1e-4
