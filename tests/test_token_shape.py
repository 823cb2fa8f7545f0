"""Per-token shape targets (config.model.heads.token_shape): the synthetic generator's object
layouts, the pipeline's targets seen through the same crop and flip as the frames, the head and
its masked loss, and one-sentence refusals."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from data_testutil import dataset_dir, tiny_config, tmp_dir
from hvlm_jax.data import annotations, pipeline, synthetic, video


def test_label_resize_is_pils_nearest_and_flips():
  rng = np.random.default_rng(0)
  labels = rng.integers(-1, 3, (3, 40, 40)).astype(np.int8)
  box = (3, 5, 30, 30)
  out = video.crop_resize_labels(labels, box, 24, flip=True)
  for t in range(3):
    crop = (labels[t, 3:33, 5:35] + 1).astype(np.uint8)
    ref = np.asarray(Image.fromarray(crop).resize((24, 24), Image.NEAREST)).astype(np.int8) - 1
    np.testing.assert_array_equal(out[t], ref[:, ::-1])


def test_layouts_are_the_drawn_content_and_an_older_dataset_gains_them_untouched():
  root = dataset_dir()
  settings = synthetic.settings_from_config(tiny_config(root))
  layouts = synthetic.load_layouts(os.path.join(root, "training"))
  assert len(layouts) == 12
  ex = synthetic.make_example(settings["seed"], "training", 4, settings)
  lay = layouts["training_00004"]
  assert [o["shape"] for o in lay["objects"]] == [o["shape"] for o in ex["clip"]["objects"]]
  assert lay["events"] == json.loads(json.dumps(ex["clip"]["events"]))
  np.testing.assert_array_equal(  # The maps drawn from the layout = from the content.
      synthetic.shape_maps(lay, lay["num_frames"], lay["fps"]),
      synthetic.shape_maps(ex["clip"], settings["num_frames"], settings["fps"]))

  old = os.path.join(tmp_dir("layouts"), "data")
  shutil.copytree(root, old)
  os.remove(os.path.join(old, "training", "annotations", synthetic.LAYOUT_FILE))
  with pytest.raises(synthetic.DatasetError, match=r"object_layout.json is missing"):
    synthetic.load_layouts(os.path.join(old, "training"))
  before = {p: os.path.getmtime(os.path.join(old, "training", "videos", p))
            for p in os.listdir(os.path.join(old, "training", "videos"))}
  synthetic.ensure_dataset(tiny_config(old))
  assert synthetic.load_layouts(os.path.join(old, "training")) == layouts
  assert before == {p: os.path.getmtime(os.path.join(old, "training", "videos", p))
                    for p in before}


def _reader(**augment):
  config = tiny_config()
  config.model.heads.token_shape.enabled = True
  config.data.augment.update(augment)
  split = annotations.load_split(config, "training")
  return config, split, pipeline.ClipReader(config, split)


@pytest.mark.parametrize("augmented", [False, True])
def test_targets_mark_the_tokens_where_the_object_of_that_shape_shows(augmented):
  """Independent of the maps: a token named shape k shows the colour of the object of shape k
  in the frames the pipeline returns (cropped, flipped, resized as they are). Over the split
  at least 90% do (the rest: a fading actor, whose blended pixels are off its colour, and
  video coding); the same check of the targets mirrored left-right passes well under 60%."""
  config, split, reader = _reader(enabled=augmented, color_jitter=0.0, min_crop_scale=0.7)
  t, p, _ = config.model.tubelet_size
  flips, right, mirrored, named = 0, 0, 0, 0
  for j, entry in enumerate(split.entries):
    clip, _ = reader.read(entry, np.random.default_rng(j) if augmented else None)
    flips += bool(clip.get("flipped"))
    labels = clip["token_shapes"]
    frames = clip["video"].astype(np.float32)
    n, s = frames.shape[0], frames.shape[1]
    g = s // p
    assert labels.shape == (n // t * g * g,) and labels.dtype == np.int32
    assert set(np.unique(labels)) <= {0, 1, 2, synthetic.BACKGROUND}
    cells = frames.reshape(n // t, t, g, p, g, p, 3).transpose(0, 2, 4, 1, 3, 5, 6)
    cells = cells.reshape(len(labels), -1, 3)
    mirror = labels.reshape(n // t, g, g)[:, :, ::-1].reshape(-1)
    layout = reader.layouts[entry.video_id]
    change = any(e["label"] == "change_shape" for e in layout["events"])
    colour_of = {o["shape"]: o["color"] for o in layout["objects"][int(change):]}
    for k, shape in enumerate(synthetic.SHAPES):
      if shape not in colour_of:
        continue
      ref = np.array(synthetic.COLORS[colour_of[shape]], np.float32)
      shows = (np.linalg.norm(cells - ref, axis=-1) < 60).sum(1) >= 3  # Its colour is there.
      right += shows[labels == k].sum()
      mirrored += shows[mirror == k].sum()
      named += (labels == k).sum()
  assert named > 50
  assert right / named >= 0.9, (right, named)
  assert mirrored / named < 0.6, (mirrored, named)
  assert flips > 0 or not augmented


def test_head_and_loss_count_only_known_tokens():
  from hvlm_jax.models import model as model_lib
  config = tiny_config()
  config.model.update(hidden_size=32, num_layers=1, num_attention_heads=2, mlp_dim=32)
  config.model.heads.tasks = ("classification",)
  config.model.heads.token_shape.enabled = True
  model = model_lib.build_model(config)
  n = (8 // 2) * (32 // 8) ** 2
  batch = dict(video=jnp.zeros((2, 8, 32, 32, 3), jnp.uint8),
               label=jnp.zeros(2, jnp.int32), label_mask=jnp.ones(2, bool),
               token_shapes=jnp.full((2, n), -1, jnp.int32).at[0, :5].set(
                   jnp.array([0, 1, 2, 3, 0])))
  params = model.init(jax.random.key(0), batch)
  out = model.apply(params, batch)
  assert out["token_shape_logits"].shape == (2, n, 4)
  _, metrics = model_lib.compute_losses(out, batch, config)
  logp = jax.nn.log_softmax(out["token_shape_logits"][0, :5])
  expect = -jnp.take_along_axis(logp, jnp.array([[0], [1], [2], [3], [0]]), 1).mean()
  np.testing.assert_allclose(metrics["token_shape_loss"], expect, rtol=1e-5)
  # Unknown tokens (-1) and an invalid example give no gradient to the head.
  masked = dict(batch, valid=jnp.array([False, True]))

  def loss(p, b):
    return model_lib.compute_losses(model.apply(p, b), b, config)[1]["token_shape_loss"]
  grads = jax.grad(loss)(params, masked)
  assert not np.any(np.asarray(jax.tree.leaves(grads["params"]["token_shape_head"])[0]))
  with pytest.raises(KeyError, match="token_shapes"):
    model_lib.compute_losses(out, {k: v for k, v in batch.items() if k != "token_shapes"},
                             config)


def test_features_input_is_refused_in_one_sentence():
  config = tiny_config()
  config.model.heads.token_shape.enabled = True
  config.data.input = "features"
  split = annotations.SplitData("training", os.path.join(dataset_dir(), "training"), [])
  with pytest.raises(ValueError, match=r"config.model.heads.token_shape needs video input"):
    pipeline.ClipReader(config, split)


def test_streaming_training_with_token_shapes_is_refused_in_one_sentence():
  from hvlm_jax.config import ConfigError
  from hvlm_jax.models import model as model_lib
  config = tiny_config()
  config.model.heads.token_shape.enabled = True
  config.model.streaming.train_segments = 2
  with pytest.raises(ConfigError, match=r"token_shape needs single-clip training"):
    model_lib.check_model_config(config.model)


def test_a_video_missing_from_the_layout_file_is_named():
  _, split, reader = _reader(enabled=False)
  entry = split.entries[0]
  del reader.layouts[entry.video_id]
  with pytest.raises(ValueError, match=rf"object_layout.json has no entry for {entry.video_id}"):
    reader.read(entry, None)
