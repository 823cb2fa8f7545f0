"""Synthetic dataset: layout, determinism, and annotations that the pixels really show."""
import json
import os

import numpy as np
import pytest

from data_testutil import dataset_dir, tiny_config, tmp_dir
from hvlm_jax.data import annotations, synthetic, video

SETTINGS = dict(seed=3, num_frames=48, fps=12, frame_size=64, max_objects=3,
                domains=list(synthetic.DOMAINS))


def colour_mask(frames, name):
  """Pixels within a distance of the object colour (independent of the renderer)."""
  ref = np.array(synthetic.COLORS[name], np.float32)
  return np.linalg.norm(frames.astype(np.float32) - ref, axis=-1) < 60


def classify_shape(mask):
  """Shape from how much of its bounding box a blob fills: square 1, circle pi/4, triangle 1/2."""
  ys, xs = np.nonzero(mask)
  fill = len(xs) / ((np.ptp(xs) + 1) * (np.ptp(ys) + 1))
  return "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


def test_same_seed_same_clip_other_index_other_clip():
  a = synthetic.make_example(3, "training", 7, SETTINGS)
  b = synthetic.make_example(3, "training", 7, SETTINGS)
  c = synthetic.make_example(3, "training", 8, SETTINGS)
  np.testing.assert_array_equal(a["frames"], b["frames"])
  for task in ("action_detection", "video_qa", "video_captioning"):
    assert a[task] == b[task]
  assert not np.array_equal(a["frames"], c["frames"])


def test_dataset_layout_loads_and_respects_the_design():
  root = dataset_dir()
  with open(os.path.join(root, synthetic.MARKER)) as f:
    assert json.load(f)["num_videos"] == {"training": 12, "validation": 5, "test": 0}
  config = tiny_config()
  split = annotations.load_split(config, "training")
  assert len(split) == 12 and not any(split.skipped.values())
  for e in split.entries:
    assert e.domain in synthetic.DOMAINS and e.duration == pytest.approx(2.0)
    assert e.actions and e.qa_pairs and e.captions
    for s, end, label in e.actions:
      assert label in synthetic.ACTIONS and 1.0 <= end - s <= 2.5 and end <= 2.0
      assert s % synthetic.QUANTUM == 0 and end % synthetic.QUANTUM == 0
    assert all(a in synthetic.ANSWERS for _, a in e.qa_pairs)
    assert video.probe_duration(e.path) == pytest.approx(2.0)


@pytest.mark.parametrize("index", range(24))
def test_events_happen_in_the_pixels_when_annotated(index):
  ex = synthetic.make_example(3, "training", index, SETTINGS)
  clip, frames = ex["clip"], ex["frames"]
  actor = clip["objects"][0]
  mask = colour_mask(frames, actor["color"])
  area = mask.sum((1, 2)).astype(float)
  fps = SETTINGS["fps"]
  for ev in clip["events"]:
    i0, i1 = int(ev["start"] * fps), min(int(ev["end"] * fps), len(frames) - 1)
    label = ev["label"]
    if label == "appear":
      assert area[i0] < 3 and area[i1] > 40
    elif label == "disappear":
      assert area[i0] > 40 and area[i1] < 3
    elif label == "grow":
      assert area[i1] > 1.8 * area[i0]
    elif label in synthetic.DIRECTIONS:
      _, dx, dy = synthetic.DIRECTIONS[label]
      ys, xs = np.nonzero(mask[i0])
      ye, xe = np.nonzero(mask[i1])
      shift = np.array([xe.mean() - xs.mean(), ye.mean() - ys.mean()])
      np.testing.assert_allclose(shift, np.array([dx, dy]) * 0.32 * 64, atol=2.0)
    elif label == "change_shape":
      assert classify_shape(mask[i0]) == actor["shape"]
      assert classify_shape(mask[i1]) == ev["target"]
  # Outside every event the actor does not move: frames before the first event are equal.
  first = int(clip["events"][0]["start"] * fps)
  if first >= 2:
    np.testing.assert_array_equal(frames[0], frames[first - 1])


@pytest.mark.parametrize("index", range(24))
def test_answers_and_caption_follow_from_the_content(index):
  ex = synthetic.make_example(3, "training", index, SETTINGS)
  objs = ex["clip"]["objects"]
  by_shape = {o["shape"]: o["color"] for o in objs}
  by_color = {o["color"]: o["shape"] for o in objs}
  for qa in ex["video_qa"]["qa_pairs"]:
    q, a = qa["question"].split(), qa["answer"]
    if q[:4] == ["what", "color", "is", "the"]:
      assert by_shape[q[4]] == a
    elif q[:4] == ["what", "shape", "is", "the"]:
      assert by_color[q[4]] == a
    elif q[:2] == ["how", "many"]:
      assert synthetic.COUNTS.index(a) == len(objs)
    elif q[:2] == ["is", "there"]:
      assert (a == "yes") == ((q[3], q[4]) in {(o["color"], o["shape"]) for o in objs})
  cap = ex["video_captioning"]["captions"][0]
  assert cap.startswith(f"a {objs[0]['color']} {objs[0]['shape']} ")
  for o in objs[1:]:
    assert f"a {o['color']} {o['shape']}" in cap


@pytest.mark.parametrize("index", range(6))
def test_shape_maps_mark_each_object_where_its_colour_is(index):
  """shape_maps against the rendered pixels: where an object's colour shows, the map holds its
  shape (the actor's frames mid-event of opacity or shape are left out), and nowhere else."""
  ex = synthetic.make_example(3, "training", index, SETTINGS)
  clip, frames = ex["clip"], ex["frames"]
  maps = synthetic.shape_maps(clip, len(frames), SETTINGS["fps"])
  assert maps.shape == frames.shape[:3] and maps.dtype == np.int8
  for i in range(len(frames)):
    _, _, _, alpha, mix, target = synthetic.actor_pose(clip, i / SETTINGS["fps"])
    for j, o in enumerate(clip["objects"]):
      shape = o["shape"]
      if j == 0:
        if alpha not in (0.0, 1.0) or mix not in (0.0, 1.0):
          continue
        shape = target if mix == 1.0 else shape
      seen = colour_mask(frames[i], o["color"])
      marked = maps[i] == synthetic.SHAPES.index(shape)
      if seen.sum() < 20:  # Not (yet) visible: nothing marked with its shape.
        assert marked.sum() < 20
        continue
      iou = (seen & marked).sum() / (seen | marked).sum()
      assert iou > 0.75, (index, i, o, iou)  # Small shapes: the anti-aliased rim counts.


def test_ensure_dataset_reuses_refuses_and_never_leaves_temp_dirs():
  parent = tmp_dir("ensure")
  config = tiny_config(os.path.join(parent, "syn"))
  config.data.synthetic.num_videos = dict(training=2, validation=1, test=1)
  root = synthetic.ensure_dataset(config)
  mtime = os.path.getmtime(os.path.join(root, synthetic.MARKER))
  assert synthetic.ensure_dataset(config) == root  # Reused, not regenerated.
  assert os.path.getmtime(os.path.join(root, synthetic.MARKER)) == mtime
  assert sorted(os.listdir(parent)) == ["syn"]
  config.data.synthetic.seed = 1
  with pytest.raises(ValueError, match="made with other settings"):
    synthetic.ensure_dataset(config)
  config.data.dir = parent  # Exists, but is not a generated dataset.
  with pytest.raises(ValueError, match="holds no complete synthetic dataset"):
    synthetic.ensure_dataset(config)


def test_generation_is_fast_enough():
  import time
  start = time.time()
  for i in range(20):
    synthetic.make_example(0, "training", i, SETTINGS)
  assert (time.time() - start) / 20 < 0.25  # Seconds per 48-frame clip, rendering only.
