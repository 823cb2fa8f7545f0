"""A Hugging Face backbone in a run: `init_from=hf:DIR` through train_and_evaluate (LoRA on a
frozen imported VideoMAE, evaluation from the run, merged export equal in transformers), a
contradicting command-line key, the HF classifier's logits through HierarchicalVLM, other
attention types and token merging on imported weights, and the VideoMAE export of a
masked-video pretraining run."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from safetensors.numpy import load_file

from hvlm_jax import pretrained
from hvlm_jax import run as run_lib
from hvlm_jax.eval import evaluate as evaluate_lib
from hvlm_jax.models import model as model_lib
from hvlm_jax.pretrained import hf
from hvlm_jax.train import trainer
from test_pretrained_hf import TINY, clip_for, reference
from test_pretraining import _stored_params, _tiny_model_config, unlabeled_dir  # noqa: F401
from test_train import train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES = 8  # tests/tiny_train_config.py: 8 frames of 32 px.


def save_tiny(path, cls="VideoMAEModel", seed=0, **extra):
  torch.manual_seed(seed)
  cfg = transformers.VideoMAEConfig(num_frames=FRAMES, patch_size=8, tubelet_size=2,
                                    **TINY, **extra)
  model = getattr(transformers, cls)(cfg).eval()
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="module")
def videomae(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("videomae_hf"))
  return path, save_tiny(path)


def hf_config(path, **model):
  """The trainer tests' config with init_from=hf:`path` and its architecture applied."""
  config = train_config()
  config.init_from = f"hf:{path}"
  for key, value in model.items():
    config.model[key] = value
  return run_lib.apply_init_from_architecture(config)


def subtree(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def encoder_outputs(config, encoder_params, clip, domain=None, **overrides):
  enc = model_lib.build_encoder(ml_collections.FrozenConfigDict(config.model),
                                token_merging=None, **overrides)
  return jax.jit(lambda p, x: enc.apply({"params": p}, x, domain=domain))(encoder_params, clip)


def test_lora_finetune_from_hf_keeps_the_backbone_and_exports_the_adapted_encoder(
    videomae, tmp_path):
  path, _ = videomae
  config = train_config()
  config.init_from = f"hf:{path}"
  config.model.domain_modules.lora.enabled, config.training.finetune = True, "lora_only"
  config.model.heads.classification_pooling = "encoder"
  config.training.num_steps = config.training.checkpoint_every_steps = 2
  config.training.learning_rate = 0.05  # Adapters move visibly in 2 steps.
  config.mesh.data, config.mesh.tensor = 4, 2
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)

  saved, _ = run_lib.load_run_config(workdir)
  assert saved.model.hidden_size == 32 and saved.model.qkv_bias == "qv"  # From config.json.
  assert saved.model.pooling == "mean" and saved.model.gelu == "exact"
  with open(os.path.join(workdir, "init_report.json")) as f:
    report = json.load(f)
  stored = _stored_params(workdir)
  tensors = load_file(os.path.join(path, "model.safetensors"))
  kinds = {e.hf: e.kind for e in hf.encoder_table("videomae", hf.hf_architecture(path))}
  assert len(report["loaded"]) == len(tensors) and not report["interpolated"]
  for item in report["loaded"]:  # Every imported tensor, bit-identical after fine-tuning.
    np.testing.assert_array_equal(
        np.asarray(subtree(stored, item["param"])),
        hf.to_hvlm(tensors[item["tensor"]], kinds[hf.canonical_name(item["tensor"])]),
        err_msg=item["param"])
  assert report["ignored"] == []
  fresh = report["newly_initialised"]
  assert any(p.endswith("lora_b") for p in fresh) and "encoder/fc_norm/scale" in fresh
  assert "classification_head/logits/kernel" in fresh and "sinusoidal" in report[
      "fixed_positions"]

  # Evaluation restores the fine-tuned run from its own config.json.
  metrics = evaluate_lib.evaluate_checkpoint(workdir, step="latest", split="validation")
  assert np.isfinite(metrics["losses"]["loss"])

  # The merged export of the most adapted domain reproduces the adapted encoder.
  lora_b = [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(stored["encoder"])
            if p[-1].key == "lora_b"]
  domain = int(np.argmax(sum(np.abs(b).reshape(b.shape[0], -1).sum(1) for b in lora_b)))
  clip = clip_for(FRAMES)
  ids = jnp.full((2,), domain)
  adapted = np.asarray(encoder_outputs(saved, stored["encoder"], clip, ids)["tokens"])
  base = np.asarray(encoder_outputs(saved, stored["encoder"], clip, None)["tokens"])
  assert np.abs(adapted - base).max() > 1e-3  # The adapters changed the encoder.
  out = str(tmp_path / "export")
  pretrained.export_hf(stored, saved, out, domain=domain, model_type="videomae")
  exported = transformers.VideoMAEModel.from_pretrained(out).eval()
  hidden, _ = reference(exported, saved, clip)
  assert np.abs(hidden - adapted).max() <= 1e-4


def test_command_line_key_contradicting_the_checkpoint_is_one_sentence(videomae, tmp_path):
  path, _ = videomae
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "hvlm_jax.train",
       f"--config=tests/tiny_train_config.py:data_dir={tmp_path / 'no_data_here'}",
       f"--workdir={workdir}", f"--config.init_from=hf:{path}",
       "--config.model.hidden_size=64"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
  assert "model.hidden_size=64" in line and "model.hidden_size=32" in line
  assert os.path.join(path, "config.json") in line
  assert "Traceback" not in result.stderr and not workdir.exists()


def test_bad_checkpoint_fails_before_the_workdir_is_written(videomae, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(videomae[0], bad)
  file = bad / "model.safetensors"
  with open(file, "r+b") as f:
    f.truncate(os.path.getsize(file) - 100)
  config = train_config()
  config.init_from = f"hf:{bad}"
  config.mesh.data, config.mesh.tensor = 4, 2
  with pytest.raises(pretrained.PretrainedError, match="truncated") as err:
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert str(file) in str(err.value) and "\n" not in str(err.value)
  assert not (tmp_path / "run").exists()


def test_hf_classifier_logits_through_hierarchical_vlm(tmp_path):
  path = str(tmp_path / "cls")
  model = save_tiny(path, "VideoMAEForVideoClassification", seed=1, num_labels=5)
  with torch.no_grad():
    model.classifier.bias.normal_()
  model.save_pretrained(path)
  config = hf_config(path)
  config.model.heads.tasks, config.model.heads.num_classes = ("classification",), 5
  config.model.heads.classification_pooling = "encoder"
  run_lib.validate(config, jax.device_count(), training=False)
  vlm = model_lib.build_model(config)
  clip = clip_for(FRAMES)
  params = nn.meta.unbox(vlm.init(jax.random.key(0), {"video": clip}))["params"]
  params, report = pretrained.load_hf_params(path, params, None, config)
  assert {x["param"] for x in report["loaded"]} >= {"classification_head/logits/kernel",
                                                    "encoder/fc_norm/scale"}
  logits = vlm.apply({"params": params}, {"video": clip},
                     method=model_lib.HierarchicalVLM.predict)["classification_logits"]
  _, ref_logits = reference(model, config, clip)
  assert np.abs(np.asarray(logits) - ref_logits).max() <= 1e-4


@pytest.mark.parametrize("change", ["local_global", "performer", "strided", "merging"])
def test_other_attention_or_token_merging_on_imported_weights(videomae, change):
  path, _ = videomae
  config = hf_config(path)
  if change == "merging":
    config.model.token_merging.enabled = True
  else:
    config.model.attention.type = change
  run_lib.validate(config, jax.device_count(), training=False)
  enc = model_lib.build_encoder(ml_collections.FrozenConfigDict(config.model))
  clip = (clip_for(FRAMES) * 255).astype(np.uint8)
  params = {"encoder": nn.meta.unbox(enc.init(jax.random.key(0), clip))["params"]}
  params, report = pretrained.load_hf_params(path, params, None, config)
  # The pretrained q/k/v/o projections (and everything else) are all reused.
  assert len(report["loaded"]) == len(load_file(os.path.join(path, "model.safetensors")))
  out = jax.jit(lambda p, x: enc.apply({"params": p}, x))(params["encoder"], clip)
  assert np.isfinite(np.asarray(out["tokens"])).all()
  assert np.isfinite(np.asarray(out["pooled"])).all()
  if change == "merging":
    assert out["tokens"].shape[1] < 4 * 16  # Fewer tokens than the (4, 4x4) grid.


VIDEOMAE_ARCHITECTURE = dict(
    position_embedding="sinusoidal", cls_token=False, qkv_bias="qv", gelu="exact",
    final_norm=False, pooling="mean", layer_norm_epsilon=1e-12,
    pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225))


def test_masked_video_pretraining_exports_as_videomae(tmp_path, unlabeled_dir):  # noqa: F811
  config = _tiny_model_config()
  for key, value in VIDEOMAE_ARCHITECTURE.items():
    config.model[key] = value
  config.data.dir, config.data.unlabeled = unlabeled_dir, True
  config.training.num_steps = config.training.checkpoint_every_steps = 2
  config.mesh.data, config.mesh.tensor = 4, 2
  workdir = str(tmp_path / "pretrain")
  trainer.train_and_evaluate(config, workdir)
  stored = _stored_params(workdir)
  assert set(stored) == {"encoder", "decoder"}
  saved, _ = run_lib.load_run_config(workdir)
  out = str(tmp_path / "export")
  report = pretrained.export_hf(stored, saved, out, model_type="videomae")
  assert report["dropped"] == []
  exported = transformers.VideoMAEModel.from_pretrained(out).eval()
  clip = clip_for(FRAMES)
  hidden, _ = reference(exported, saved, clip)
  # The pretraining encoder has no fc_norm (it never pools): compare the tokens.
  ours = np.asarray(encoder_outputs(saved, stored["encoder"], clip, pooling="none")["tokens"])
  assert hidden.shape == ours.shape and np.abs(hidden - ours).max() <= 1e-4
