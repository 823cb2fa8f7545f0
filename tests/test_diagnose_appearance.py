"""tools/diagnose_appearance.py: the pieces its figures rest on (object counts from captions,
the per-type breakdown, the linear probe), checked on cases with known answers."""
import importlib.util
import os

import numpy as np
import pytest

from hvlm_jax.data import synthetic

_PATH = os.path.join(os.path.dirname(__file__), "..", "tools", "diagnose_appearance.py")
_spec = importlib.util.spec_from_file_location("diagnose_appearance", _PATH)
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def test_object_count_reads_the_actor_and_the_objects_after_next_to():
  assert tool.object_count("a red triangle moves up") == 1
  # The actor turning into another shape still counts once.
  assert tool.object_count("a yellow triangle moves down and then turns into a circle next to "
                           "a green square") == 2
  assert tool.object_count("a blue circle grows next to a red square and a white triangle") == 3


def test_breakdown_counts_per_type_and_object_count():
  captions = {"v0": "a red circle moves up", "v1": "a green square grows next to a red circle"}
  records = [
      dict(video_id="v0", caption="a red square moves up",
           qa=[dict(question="what shape is the red object ?", answer="circle",
                    predicted="circle")]),
      dict(video_id="v1", caption="a green square grows next to a red circle",
           qa=[dict(question="what shape is the red object ?", answer="circle",
                    predicted="square"),
               dict(question="what color is the circle ?", answer="red", predicted="red")])]
  out = tool.breakdown(records, captions)
  rows = {(r["type"], r["objects"]): (r["accuracy"], r["questions"]) for r in out["qa"]}
  assert rows == {("what shape", 1): (1.0, 1), ("what shape", 2): (0.0, 1),
                  ("what color", 2): (1.0, 1)}
  assert out["caption_actor"]["colour"]["accuracy"] == 1.0
  assert out["caption_actor"]["shape"]["accuracy"] == 0.5


def test_linear_probe_finds_a_linear_class_and_not_noise():
  rng = np.random.default_rng(0)
  y = rng.integers(3, size=600)
  x = rng.normal(size=(600, 20))
  x[:, 3] += 4.0 * y  # Class in one direction.
  assert tool.linear_probe(x, y, 3) > 0.95
  noise = rng.normal(size=(600, 20))
  assert tool.linear_probe(noise, y, 3) < 0.5  # Chance is about 1/3.


def test_stem_entry_sets_model_keys_and_names_a_bad_one():
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(stem="patch", stem_depth=1, motion_input=("difference",),
                                       attention=dict(type="full"),
                                       heads=dict(qa=dict(num_layers=2))))
  assert tool.parse_stem_entry("hybrid:stem_depth=2:motion_input=flow+difference:head=qa",
                               cfg) == ("hybrid", "qa")
  assert (cfg.stem, cfg.stem_depth, cfg.motion_input) == ("hybrid", 2, ("flow", "difference"))
  tool.parse_stem_entry("conv:motion_input=", cfg)
  assert cfg.motion_input == ()
  tool.parse_stem_entry("conv:heads.qa.num_layers=4", cfg)
  assert cfg.heads.qa.num_layers == 4
  for bad in ("conv:stem_dpth=2", "conv:attention=full", "cnn_gn:stem_depth=2",
              "conv:heads.qa=3", "conv:heads.qb.num_layers=1", "conv:stem.x=1"):
    with pytest.raises(SystemExit, match="--stems entry"):
      tool.parse_stem_entry(bad, cfg)


def test_askable_objects_leave_out_an_actor_that_changes_shape():
  objects = [dict(color="red", shape="circle"), dict(color="blue", shape="square")]
  still = dict(objects=objects, events=[dict(label="move_left", start=0.0, end=1.0)])
  change = dict(objects=objects, events=[dict(label="change_shape", start=0.0, end=1.0,
                                              target="triangle")])
  assert tool.askable_objects(still) == objects
  assert tool.askable_objects(change) == objects[1:]
  assert tool.askable_objects(dict(objects=objects[:1], events=change["events"])) == []


def test_demo_clip_source_asks_about_an_object_the_clip_shows():
  """Fresh clips of the demo generator: 16 frames, and the asked object's colour is in them
  (its pixels reach the saturated colour) in every clip."""
  from hvlm_jax.config import import_sibling
  from hvlm_jax.data import synthetic
  config = import_sibling(os.path.join(os.path.dirname(_PATH), "..", "configs", "demo.py"),
                          "demo.py").get_config()
  source = tool.clip_source("demo", config)
  rng = np.random.default_rng(0)
  counts = set()
  for _ in range(12):
    video, objects, count, maps = source(rng, None)
    assert maps.shape == video.shape[:3] and set(np.unique(maps)) <= {-1, 0, 1, 2}
    assert video.shape == (16, 64, 64, 3) and video.dtype == np.uint8
    assert 1 <= len(objects) <= count <= 3
    assert len({o["color"] for o in objects}) == len({o["shape"] for o in objects}) == len(
        objects)
    for obj in objects:
      assert obj["shape"] in synthetic.SHAPES
      target = np.array(synthetic.COLORS[obj["color"]], np.float32)
      nearest = np.abs(video.astype(np.float32) - target).sum(-1).min()
      assert nearest < 40, (obj, nearest)
    counts.add(count)
  assert len(counts) > 1  # Not only one-object clips.
  with pytest.raises(SystemExit, match="--clips"):
    tool.clip_source("nope", config)


def test_token_labels_name_the_shape_on_most_of_a_token_and_background_below_a_tenth():
  maps = np.full((4, 8, 8), -1, np.int8)  # Tubelets (2, 4, 4): 2 x 2 x 2 tokens of 32 pixels.
  maps[0:2, 0:4, 0:4] = 1              # Token (0, 0, 0): all square.
  maps[0, 0:4, 4:8] = 0                # Token (0, 0, 1): 16 circle pixels ...
  maps[1, 0:2, 4:8] = 2                # ... and 8 triangle: circle.
  maps[2, 4, 4:7] = 2                  # Token (1, 1, 1): 3 of 32 pixels (< a tenth).
  maps[3, 4:8, 0] = 0                  # Token (1, 1, 0): 4 of 32 pixels (a tenth or more).
  labels = synthetic.token_shape_labels(maps, (2, 4, 4))
  bg = synthetic.BACKGROUND
  np.testing.assert_array_equal(labels, [1, 0, bg, bg, bg, bg, 0, bg])


def test_bench_options_take_out_shape_aux_only():
  assert tool.bench_options("hybrid:head=qa:shape_aux=0.5") == ("hybrid:head=qa", 0.5)
  assert tool.bench_options("hybrid:stem_depth=2") == ("hybrid:stem_depth=2", 0.0)
  with pytest.raises(SystemExit, match="shape_aux"):
    tool.bench_options("hybrid:shape_aux=lots")
