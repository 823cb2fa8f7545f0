"""The grain pipeline: schema, targets vs a naive reference, coverage, resumption, sharding,
domain balancing, corrupt videos, and identical clips from the raw, in-memory and cached paths."""
import collections
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from data_testutil import dataset_dir, tiny_config, tmp_dir
from hvlm_jax.data import cache, pipeline, video
from hvlm_jax.data.annotations import SplitData, VideoEntry, load_split
from hvlm_jax.data.text import Vocabularies, normalize_answer, tokenize

SCHEMA = {  # key: (shape without batch, dtype); T=8, T'=4, S=32, C from vocab, see tiny_config.
    "video": ((8, 32, 32, 3), np.uint8), "index": ((), np.int32), "valid": ((), np.bool_),
    "domain": ((), np.int32), "timestamps": ((8,), np.float32), "duration": ((), np.float32),
    "label": ((), np.int32), "label_mask": ((), np.bool_), "action_mask": ((), np.bool_),
    "action_targets": ((4, "C"), np.float32), "action_offsets": ((4, 2), np.float32),
    "step_times": ((4,), np.float32), "step_duration": ((), np.float32),
    "segments": ((8, 2), np.float32), "segment_labels": ((8,), np.int32),
    "segment_mask": ((8,), np.bool_), "questions": ((4, 16), np.int32),
    "answers": ((4,), np.int32), "qa_mask": ((4,), np.bool_),
    "caption_tokens": ((24,), np.int32), "caption_mask": ((), np.bool_)}


@pytest.fixture(scope="module")
def data():
  config = tiny_config()
  train = load_split(config, "training")
  return config, train, load_split(config, "validation"), Vocabularies.build(train, config)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def naive_targets(entry, vocabs, step_times):
  """Per step: classes whose segment holds the centre; offsets of the shortest such segment."""
  targets = np.zeros((len(step_times), vocabs.num_actions))
  offsets = np.zeros((len(step_times), 2))
  for j, t in enumerate(step_times):
    covering = [(e - s, s, e, l) for s, e, l in entry.actions if s <= t < e]
    for _, _s, _e, l in covering:
      targets[j, vocabs.action_id(l)] = 1
    if covering:
      _, s, e, _ = min(covering)
      offsets[j] = (t - s, e - t)
  return targets, offsets


def test_train_batches_follow_the_schema_and_the_annotations(data):
  config, train, _, vocabs = data
  config = config.copy_and_resolve_references()
  config.data.augment.flip = False  # Flips mirror the labels: tested on their own below.
  batches = take(pipeline.make_train_iterator(config, train, vocabs, seed=0, process_index=0,
                                              process_count=1), 3)
  for b in batches:
    for key, (shape, dtype) in SCHEMA.items():
      shape = tuple(vocabs.num_actions if s == "C" else s for s in shape)
      assert b[key].shape == (4, *shape) and b[key].dtype == dtype, key
    assert set(b) == set(SCHEMA)
    for i in range(4):
      e = train.entries[b["index"][i]]
      st = b["step_times"][i]
      np.testing.assert_allclose(np.diff(st), b["step_duration"][i], rtol=1e-5)
      assert 0 <= st[0] - b["step_duration"][i] / 2 + 1e-5 and st[-1] <= e.duration + 1e-5
      targets, offsets = naive_targets(e, vocabs, st.astype(np.float64))
      np.testing.assert_array_equal(b["action_targets"][i], targets)
      np.testing.assert_allclose(b["action_offsets"][i], offsets, atol=1e-5)
      totals = collections.Counter()
      for s, end, l in e.actions:
        totals[vocabs.action_id(l)] += end - s
      assert b["label"][i] == max(totals, key=lambda c: (totals[c], -c))
      n = len(e.actions)
      np.testing.assert_allclose(b["segments"][i][:n], [(s, end) for s, end, _ in e.actions])
      assert b["segment_mask"][i].sum() == n
      assert vocabs.decode(b["caption_tokens"][i]) == " ".join(tokenize(e.captions[0]))
      for q in range(len(e.qa_pairs)):
        assert vocabs.decode(b["questions"][i][q]) == " ".join(tokenize(e.qa_pairs[q][0]))
        assert vocabs.answers[b["answers"][i][q]] == normalize_answer(e.qa_pairs[q][1])
      assert b["qa_mask"][i].sum() == len(e.qa_pairs)
      assert vocabs.domains[b["domain"][i]] == e.domain
      ts = b["timestamps"][i]
      assert np.all(np.diff(ts) >= 0) and ts[-1] < e.duration


def test_eval_covers_every_video_once_with_padding_and_uniform_frames(data):
  config, _, val, vocabs = data
  batches = list(pipeline.eval_batches(config, val, vocabs))
  assert len(batches) == pipeline.num_eval_batches(config, val) == 2
  valid = np.concatenate([b["valid"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  assert sorted(index[valid]) == list(range(5)) and valid.sum() == 5
  pad = batches[1]
  assert not pad["valid"][1:].any() and not pad["video"][1:].any()
  for i in range(4):  # Frame j is the one shown at the centre of bin j of the whole video.
    e = val.entries[batches[0]["index"][i]]
    frames, pts, _ = video.decode_clip(e.path, lambda d: video.sample_times(d, 8)[0])
    np.testing.assert_array_equal(batches[0]["video"][i], frames)
    np.testing.assert_allclose(batches[0]["timestamps"][i], np.floor(
        (np.arange(8) + 0.5) / 8 * 2.0 * 12) / 12, atol=1e-6)
  two = [list(pipeline.eval_batches(config, val, vocabs, process_index=p, process_count=2))
         for p in range(2)]
  assert len(two[0]) == len(two[1]) == 2
  for b in range(2):  # Process slices interleave back into the single-process batch.
    merged = {k: np.concatenate([two[0][b][k], two[1][b][k]]) for k in batches[b]}
    assert_batches_equal([merged], [batches[b]])


def test_resumed_iterator_yields_exactly_the_uninterrupted_batches(data):
  config, train, _, vocabs = data
  make = lambda: pipeline.make_train_iterator(config, train, vocabs, seed=5, process_index=0,
                                              process_count=1)
  full = take(make(), 7)  # 12 videos, batch 4: crosses two epoch boundaries.
  it = make()
  take(it, 2)
  state = it.get_state()
  json.dumps(state)  # The state is small and serialisable (saved with checkpoints).
  resumed = make()
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 5), full[2:])
  epoch0 = np.concatenate([b["index"] for b in full[:3]])
  assert sorted(epoch0) == list(range(12))  # Each epoch is a permutation.


def test_worker_processes_give_the_same_batches_and_resume(data):
  config, train, _, vocabs = data
  config = config.copy_and_resolve_references()
  ref = take(pipeline.make_train_iterator(config, train, vocabs, seed=1, process_index=0,
                                          process_count=1), 3)
  config.data.num_workers = 1
  it = pipeline.make_train_iterator(config, train, vocabs, seed=1, process_index=0,
                                    process_count=1)
  assert_batches_equal(take(it, 1), ref[:1])
  state = it.get_state()
  resumed = pipeline.make_train_iterator(config, train, vocabs, seed=1, process_index=0,
                                         process_count=1)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 2), ref[1:])


def test_process_shards_interleave_into_the_global_stream(data):
  config, train, _, vocabs = data
  single = take(pipeline.make_train_iterator(config, train, vocabs, seed=2, process_index=0,
                                             process_count=1), 2)
  parts = [take(pipeline.make_train_iterator(config, train, vocabs, seed=2, process_index=p,
                                             process_count=2), 2) for p in range(2)]
  for b in range(2):
    merged = {k: np.stack([parts[p][b][k][j] for j in range(2) for p in range(2)])
              for k in single[b]}
    assert_batches_equal([merged], [single[b]])


def fake_split(counts):
  entries = [VideoEntry(f"v{i:04d}", "", domain=d)
             for i, d in enumerate(d for d, n in counts.items() for _ in range(n))]
  return SplitData("training", "/nowhere", entries)


@pytest.mark.parametrize("spec, expected", [
    ("sports=1,news=1,general=2", dict(sports=0.25, news=0.25, general=0.5)),
    ("inverse_frequency", dict(sports=1 / 3, news=1 / 3, general=1 / 3)),
    ("none", dict(sports=0.7, news=0.2, general=0.1)),
])
def test_domain_balanced_sampling_matches_its_weights(spec, expected):
  config = tiny_config()
  config.training.domain_balancing = spec
  split = fake_split(dict(sports=70, news=20, general=10))
  order = pipeline._Order(len(split), 0, pipeline.domain_weights(config, split))
  draws = 20000
  counts = collections.Counter(split.entries[order(g)].domain for g in range(draws))
  for domain, p in expected.items():
    sigma = np.sqrt(draws * p * (1 - p))
    assert abs(counts[domain] - draws * p) < 4 * sigma, (domain, counts)


def test_bad_domain_balancing_names_the_key():
  config = tiny_config()
  split = fake_split(dict(sports=3))
  for spec in ("sports:1", "cooking=1", "news=1"):
    config.training.domain_balancing = spec
    with pytest.raises(ValueError, match="config.training.domain_balancing"):
      pipeline.domain_weights(config, split)


def test_corrupt_video_is_skipped_and_counted_in_training_and_an_error_in_eval(data):
  config, train, _, vocabs = data
  bad = os.path.join(tmp_dir("corrupt"), "bad.mp4")
  with open(bad, "wb") as f:
    f.write(b"\x00" * 100)
  entries = list(train.entries[:7]) + [dataclasses.replace(train.entries[7], path=bad,
                                                           video_id="bad")]
  split = SplitData("training", train.root, entries)
  pipeline._CORRUPT.clear()
  batches = take(pipeline.make_train_iterator(config, split, vocabs, seed=0, process_index=0,
                                              process_count=1), 4)
  assert 7 not in np.concatenate([b["index"] for b in batches])
  assert pipeline._CORRUPT == {"bad": 2}  # Two epochs went by.
  config = config.copy_and_resolve_references()
  config.data.max_corrupt_videos = 0
  pipeline._CORRUPT.clear()
  with pytest.raises(video.VideoError, match="exceed config.data.max_corrupt_videos=0"):
    take(pipeline.make_train_iterator(config, split, vocabs, seed=0, process_index=0,
                                      process_count=1), 2)
  with pytest.raises(video.VideoError, match="bad.mp4"):
    list(pipeline.eval_batches(config, split, vocabs))


def test_raw_memory_and_cached_paths_give_identical_clips(data):
  config, train, val, vocabs = data
  out = tmp_dir("cache")
  for split in (train, val):
    cache.build_cache(config, split, out)
  variants = []
  for mode, memory in (("video", 0), ("video", 64), ("cache", 0)):
    c = config.copy_and_resolve_references()
    c.data.input, c.data.memory_cache_mb, c.data.cache_dir = mode, memory, out
    c.data.augment.min_crop_scale, c.data.augment.color_jitter = 0.3, 0.3  # Exercise it all.
    variants.append((take(pipeline.make_train_iterator(c, train, vocabs, seed=9,
                                                       process_index=0, process_count=1), 4),
                     list(pipeline.eval_batches(c, val, vocabs))))
  for other in variants[1:]:
    assert_batches_equal(other[0], variants[0][0])
    assert_batches_equal(other[1], variants[0][1])
  c.data.video.max_fps = 3.0
  with pytest.raises(ValueError, match="rebuild it"):
    pipeline.make_train_iterator(c, train, vocabs, seed=0, process_index=0, process_count=1)


def test_features_mode_samples_rows_by_time():
  config = tiny_config()
  root = tmp_dir("features")
  for split in ("training", "validation"):
    shutil.copytree(os.path.join(dataset_dir(), split, "annotations"),
                    os.path.join(root, split, "annotations"))
    os.makedirs(os.path.join(root, split, "features"))
    for name in os.listdir(os.path.join(dataset_dir(), split, "videos")):
      rows = np.arange(20, dtype=np.float32)[:, None] * np.ones(6, np.float32)
      np.save(os.path.join(root, split, "features", name[:-4] + ".npy"), rows)
  config.data.update(name="folder", dir=root, input="features", features_dim=6)
  train = load_split(config, "training")
  vocabs = Vocabularies.build(train, config)
  b = next(pipeline.make_train_iterator(config, train, vocabs, seed=0, process_index=0,
                                        process_count=1))
  assert b["features"].shape == (4, 8, 6) and b["features"].dtype == np.float32
  assert "video" not in b
  np.testing.assert_allclose(b["timestamps"], (b["features"][..., 0] + 0.5) * 2.0 / 20)
  ev = next(pipeline.eval_batches(config, load_split(config, "validation"), vocabs))
  expected_rows = np.floor((np.arange(8) + 0.5) / 8 * 20)  # Row shown at each bin centre.
  np.testing.assert_array_equal(ev["features"][0, :, 0], expected_rows)
  for k in SCHEMA:
    if k != "video":
      assert ev[k].shape[0] == 4, k


def test_vocabularies_round_trip_and_encode(data, tmp_path):
  config, train, _, vocabs = data
  path = str(tmp_path / "vocab.json")
  vocabs.save(path)
  again = Vocabularies.load(path)
  assert (again.words, again.answers, again.actions) == (vocabs.words, vocabs.answers,
                                                         vocabs.actions)
  assert vocabs.words[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
  ids = vocabs.encode("A red zebra!", 6, bos_eos=True)
  assert ids.tolist() == [2, vocabs.words.index("a"), vocabs.words.index("red"), 1, 3, 0]
  assert vocabs.decode(ids) == "a red <unk>"
  assert vocabs.encode("a a a a a a a", 4, bos_eos=True).tolist()[-1] == 3  # eos kept.
  assert normalize_answer("The Red!") == "red" and vocabs.answer_id("The Red!") >= 0
  config = config.copy_and_resolve_references()
  config.data.answer_vocab_size = 2
  small = Vocabularies.build(train, config)
  counts = collections.Counter(normalize_answer(a) for e in train.entries
                               for _, a in e.qa_pairs)
  assert small.answers == sorted(counts, key=lambda a: (-counts[a], a))[:2]
  assert small.answer_id("zebra") == -1
  with pytest.raises(ValueError, match="Cannot read vocabularies from"):
    Vocabularies.load(str(tmp_path / "missing.json"))


def test_unusable_batch_size_names_the_key(data):
  config, train, _, vocabs = data
  with pytest.raises(ValueError, match="config.data.batch_size=4 is not divisible by the 3"):
    pipeline.make_train_iterator(config, train, vocabs, seed=0, process_index=0,
                                 process_count=3)


def test_flipped_clips_get_mirrored_labels_that_match_the_pixels(data):
  from hvlm_jax.data import synthetic
  config, train, _, vocabs = data
  config = config.copy_and_resolve_references()
  config.data.augment.update(flip=True, color_jitter=0.0, min_crop_scale=1.0)
  config.data.video.min_window = 1.0
  moves = {vocabs.action_id("move_left"): -1, vocabs.action_id("move_right"): 1}
  checked = collections.Counter()
  it = pipeline.make_train_iterator(config, train, vocabs, seed=0, process_index=0,
                                    process_count=1)
  for b in take(it, 12):
    for i in range(4):
      e = train.entries[b["index"][i]]
      label = next((vocabs.action_id(l) for _, _, l in e.actions
                    if vocabs.action_id(l) in moves), None)
      if label is None:
        continue
      seg = b["segments"][i][b["segment_mask"][i]]
      labels = b["segment_labels"][i][b["segment_mask"][i]]
      (s, end), = seg[np.isin(labels, list(moves))]
      shown = moves[labels[np.isin(labels, list(moves))][0]]
      colour = next(c for c in synthetic.COLORS if e.captions[0].startswith(f"a {c} "))
      ref = np.array(synthetic.COLORS[colour], np.float32)
      mask = np.linalg.norm(b["video"][i].astype(np.float32) - ref, axis=-1) < 60
      ts = b["timestamps"][i]
      first, last = np.argmin(np.abs(ts - s)), np.argmin(np.abs(ts - end))
      dx = np.nonzero(mask[last])[1].mean() - np.nonzero(mask[first])[1].mean()
      assert np.sign(dx) == shown, (e.video_id, dx, shown)
      flipped = shown != moves[label]
      for q, a, m in zip(b["questions"][i], b["answers"][i], b["qa_mask"][i]):
        if m and vocabs.decode(q).startswith("which way"):
          assert vocabs.answers[a] == ("left" if shown < 0 else "right")
      checked[flipped] += 1
  assert checked[True] and checked[False]  # Both flipped and unflipped clips were checked.
