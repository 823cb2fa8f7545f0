"""Masked-video pretraining: tube masking, per-patch normalised targets against a naive loop,
the encoder never sees hidden tubelets, and a pretrain -> fine-tune round trip on unlabeled
videos whose encoder arrives bit-identical in the fine-tuning run."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hvlm_jax.checkpoint import Checkpointer
from hvlm_jax.models import pretraining
from hvlm_jax.train import trainer
from test_train import train_config
import data_testutil


def test_tube_mask_hides_the_same_positions_in_every_step():
  steps, per_step, ratio = 3, 16, 0.75
  visible, hidden = pretraining.tube_mask(jax.random.key(0), 4, steps, per_step, ratio)
  visible, hidden = np.asarray(visible), np.asarray(hidden)
  assert visible.shape == (4, steps * 4) and hidden.shape == (4, steps * 12)
  for v, h in zip(visible, hidden):
    assert sorted(np.concatenate([v, h]).tolist()) == list(range(steps * per_step))
    spatial = (v % per_step).reshape(steps, -1)
    assert (spatial == spatial[0]).all()  # A tube: the same spatial set at every step.
    assert (v // per_step).reshape(steps, -1).tolist() == [[s] * 4 for s in range(steps)]
  assert len({tuple(v) for v in visible}) > 1  # Each example draws its own mask.


def test_patch_targets_equal_a_naive_loop():
  rng = np.random.default_rng(0)
  clip = rng.integers(0, 256, (2, 4, 8, 12, 3), dtype=np.uint8)
  tt, p = 2, 4
  got = np.asarray(pretraining.patch_targets(jnp.asarray(clip), (tt, p, p)))
  x = clip.astype(np.float64) / 255.0
  rows = []
  for b in range(2):
    for t in range(0, 4, tt):
      for i in range(0, 8, p):
        for j in range(0, 12, p):
          patch = x[b, t:t + tt, i:i + p, j:j + p].reshape(-1, 3)  # (t p q, c)
          patch = (patch - patch.mean(0)) / (patch.std(0, ddof=1) + 1e-6)
          rows.append(patch.reshape(-1))
  np.testing.assert_allclose(got.reshape(-1, got.shape[-1]), np.stack(rows), atol=2e-5)


def _tiny_model_config():
  config = train_config()
  config.training.objective = "masked_video"
  config.training.masked_video.mask_ratio = 0.75
  return config


def test_encoder_never_sees_hidden_tubelets_and_targets_do():
  config = _tiny_model_config()
  model = pretraining.build_model(config)
  clip = jax.random.uniform(jax.random.key(0), (2, 8, 32, 32, 3))
  variables = model.init({"params": jax.random.key(1)}, {"video": clip})
  out = model.apply(variables, {"video": clip})
  assert out["hidden"].shape[1] == 4 * 12 and out["visible"].shape[1] == 4 * 4

  # Change only the pixels of hidden tubelets (the fixed evaluation mask): encoder tokens of
  # the visible positions stay exactly the same, the reconstruction loss does not.
  tubelet = np.zeros((2, 4 * 16), bool)
  np.put_along_axis(tubelet, np.asarray(out["hidden"]), True, axis=1)
  pixel_mask = np.repeat(np.repeat(np.repeat(tubelet.reshape(2, 4, 4, 4), 2, 1), 8, 2), 8, 3)
  changed = jnp.where(pixel_mask[..., None], 1.0 - clip, clip)

  a, b = model.apply(variables, {"video": clip}), model.apply(variables, {"video": changed})
  np.testing.assert_array_equal(a["visible"], b["visible"])
  assert float(jnp.abs(a["reconstruction_loss"] - b["reconstruction_loss"])) > 1e-3

  params = variables["params"]
  enc_apply = lambda c: pretraining.model_lib.build_encoder(  # noqa: E731
      ml_collections.FrozenConfigDict(config.model), token_merging=None).apply(
          {"params": params["encoder"]}, c, visible=out["visible"])["tokens"]
  np.testing.assert_array_equal(np.asarray(enc_apply(clip)), np.asarray(enc_apply(changed)))


def _stored_params(workdir):
  """The latest checkpoint's parameters as stored (numpy), read by orbax without a target."""
  ckpt = Checkpointer(workdir, read_only=True, async_save=False)
  path = os.path.join(ckpt.directory, str(ckpt.resolve("latest")), "params")
  return ocp.StandardCheckpointer().restore(path)


@pytest.fixture(scope="module")
def unlabeled_dir(tmp_path_factory):
  """The tiny dataset's videos with no annotations at all (training and validation)."""
  root = tmp_path_factory.mktemp("unlabeled")
  for split in ("training", "validation"):
    shutil.copytree(os.path.join(data_testutil.dataset_dir(), split, "videos"),
                    root / split / "videos")
  return str(root)


def test_pretrain_on_unlabeled_videos_then_finetune_from_its_encoder(tmp_path, unlabeled_dir):
  pre = _tiny_model_config()
  pre.data.dir, pre.data.unlabeled = unlabeled_dir, True
  pre.training.num_steps = pre.training.checkpoint_every_steps = 3
  pre.training.eval_every_steps = 3
  pre.mesh.data, pre.mesh.tensor = 4, 2
  pre_dir = str(tmp_path / "pretrain")
  metrics = trainer.train_and_evaluate(pre, pre_dir)
  assert np.isfinite(metrics["val_reconstruction_loss"])

  pretrained = _stored_params(pre_dir)
  assert set(pretrained) == {"encoder", "decoder"}

  fine = train_config()
  fine.init_from = pre_dir
  # LoRA adapters on the frozen pretrained encoder: its weights must arrive and stay exact.
  fine.model.domain_modules.lora.enabled, fine.training.finetune = True, "lora_only"
  fine.training.num_steps = 1
  fine.training.checkpoint_every_steps = 1
  fine.mesh.data, fine.mesh.tensor = 4, 2
  fine_dir = str(tmp_path / "finetune")
  trainer.train_and_evaluate(fine, fine_dir)
  tuned_params = _stored_params(fine_dir)
  leaves = jax.tree_util.tree_leaves_with_path(pretrained["encoder"])
  assert leaves
  for path, value in leaves:
    other = tuned_params["encoder"]
    for key in path:
      other = other[key.key]
    np.testing.assert_array_equal(np.asarray(value), np.asarray(other))
  with open(os.path.join(fine_dir, "init_report.json")) as f:
    report = json.load(f)
  assert len(report["loaded"]) == len(leaves)
  assert any("head" in name for name in report["initialised"])
  assert any("lora" in name for name in report["initialised"])
  assert report["ignored"] and all(n.startswith("decoder/") for n in report["ignored"])
