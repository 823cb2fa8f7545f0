"""Hugging Face VideoMAE / ViViT import and export, against `transformers` itself.

Tiny randomly initialised transformers models (width 32, 2 layers, 32 px) are saved with
save_pretrained, imported, and their last hidden states and logits compared with the
reference forward pass; exports are loaded back by transformers.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from safetensors.numpy import load_file, save_file

from hvlm_jax import pretrained, sharding
from hvlm_jax.models.encoder import VideoEncoder, encoder_architecture
from hvlm_jax.models.layers import sinusoidal_table
from hvlm_jax.pretrained import PretrainedError, positions

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            image_size=32)
# name -> (class, config class, extra config, frames): several clip lengths across models.
MODELS = {
    "videomae": ("VideoMAEModel", "VideoMAEConfig", dict(patch_size=8, tubelet_size=2), 4),
    "videomae_cls": ("VideoMAEForVideoClassification", "VideoMAEConfig",
                     dict(patch_size=8, tubelet_size=2, num_labels=5), 8),
    "videomae_pretraining": ("VideoMAEForPreTraining", "VideoMAEConfig", dict(
        patch_size=8, tubelet_size=2, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=64), 4),
    "vivit": ("VivitModel", "VivitConfig", dict(tubelet_size=[2, 8, 8]), 6),
    "vivit_cls": ("VivitForVideoClassification", "VivitConfig",
                  dict(tubelet_size=[2, 8, 8], num_labels=5), 4),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (directory, eval-mode transformers model); each tiny model built once."""
  out = {}
  for i, (name, (cls, cfg_cls, extra, frames)) in enumerate(MODELS.items()):
    torch.manual_seed(i)
    cfg = getattr(transformers, cfg_cls)(num_frames=frames, **TINY, **extra)
    model = getattr(transformers, cls)(cfg).eval()
    with torch.no_grad():  # HF zero-initialises these; random values test their placement.
      for p in model.parameters():
        if p.dim() == 3:
          p.normal_()
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    out[name] = (path, model)
  return out


def make_config(path, frames, size=32, pooling="encoder"):
  base = ml_collections.ConfigDict(dict(
      model=dict(hidden_size=768, num_layers=12, num_attention_heads=12, mlp_dim=3072,
                 tubelet_size=(2, 16, 16), heads=dict(classification_pooling=pooling),
                 domain_modules=dict(lora=dict(alpha=16.0))),
      data=dict(video=dict(num_frames=frames, frame_size=size))))
  return pretrained.apply_hf_architecture(base, path, set())


def build_encoder(config, **kw):
  m = config.model
  return VideoEncoder(hidden_size=m.hidden_size, num_layers=m.num_layers,
                      num_heads=m.num_attention_heads, mlp_dim=m.mlp_dim,
                      tubelet_size=tuple(m.tubelet_size), **encoder_architecture(m), **kw)


def fresh_params(config, clip, num_classes=5, **kw):
  enc = build_encoder(config, **kw)
  params = {"encoder": nn.meta.unbox(enc.init(jax.random.key(0), clip))["params"]}
  d = config.model.hidden_size
  params["classification_head"] = {"logits": {"kernel": jnp.zeros((d, num_classes)),
                                              "bias": jnp.zeros((num_classes,))}}
  return enc, params


def clip_for(frames, size=32, seed=0):
  return np.random.RandomState(seed).rand(2, frames, size, size, 3).astype(np.float32)


def reference(model, config, clip):
  """(last hidden state, logits or None) of the transformers model on the same pixels."""
  mean, std = np.asarray(config.model.pixel_mean), np.asarray(config.model.pixel_std)
  pixels = torch.from_numpy(((clip - mean) / std).astype(np.float32).transpose(0, 1, 4, 2, 3))
  with torch.no_grad():
    backbone = getattr(model, "videomae", getattr(model, "vivit", model))
    hidden = backbone(pixel_values=pixels).last_hidden_state.numpy()
    logits = model(pixel_values=pixels).logits.numpy() if hasattr(model, "classifier") else None
  return hidden, logits


def ours(enc, params, clip, domain=None):
  out = jax.jit(lambda p, x: enc.apply({"params": p}, x, domain=domain))(params["encoder"], clip)
  hidden = np.asarray(out["tokens"])
  if "cls" in out:
    hidden = np.concatenate([np.asarray(out["cls"])[:, None], hidden], axis=1)
  head = params["classification_head"]["logits"]
  logits = np.asarray(out["pooled"] @ head["kernel"] + head["bias"]) if "pooled" in out else None
  return hidden, logits


@pytest.mark.parametrize("name", ["videomae", "videomae_cls", "vivit", "vivit_cls"])
def test_import_reproduces_transformers_hidden_states_and_logits(checkpoints, name):
  path, model = checkpoints[name]
  frames = MODELS[name][3]
  config, clip = make_config(path, frames), clip_for(frames)
  enc, params = fresh_params(config, clip)
  params, report = pretrained.load_hf_params(path, params, None, config)
  hidden, logits = ours(enc, params, clip)
  ref_hidden, ref_logits = reference(model, config, clip)
  assert hidden.shape == ref_hidden.shape
  assert np.abs(hidden - ref_hidden).max() <= 1e-4
  if ref_logits is not None:
    assert any(x["param"] == "classification_head/logits/kernel" for x in report["loaded"])
    assert np.abs(logits - ref_logits).max() <= 1e-4


def test_videomae_blocks_have_no_key_bias_and_exact_gelu(checkpoints):
  config = make_config(checkpoints["videomae"][0], 4)
  assert (config.model.qkv_bias, config.model.gelu) == ("qv", "exact")
  assert config.model.position_embedding == "sinusoidal" and not config.model.cls_token
  _, params = fresh_params(config, clip_for(4))
  qkv = params["encoder"]["block_0"]["attention"]["qkv"]
  assert "bias" not in qkv["key"] and "bias" in qkv["query"] and "bias" in qkv["value"]


def test_sinusoidal_table_equals_videomae_reference():
  from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table
  np.testing.assert_array_equal(sinusoidal_table(50, 32),
                                get_sinusoid_encoding_table(50, 32)[0].numpy())


def test_every_tensor_is_accounted_for_and_the_decoder_ignored(checkpoints):
  path, _ = checkpoints["videomae_pretraining"]
  config = make_config(path, 4)
  lora = pretrained_lora()
  _, params = fresh_params(config, clip_for(4), lora=lora)
  _, report = pretrained.load_hf_params(path, params, None, config)
  stored = load_file(os.path.join(path, "model.safetensors"))
  listed = [x["tensor"] for x in report["loaded"] + report["interpolated"] + report["ignored"]]
  assert sorted(listed) == sorted(stored)
  ignored = {x["tensor"] for x in report["ignored"]}
  assert "mask_token" in ignored and "encoder_to_decoder.weight" in ignored
  assert all(not n.startswith("videomae.") for n in ignored)
  assert any(p.endswith("lora_b") for p in report["newly_initialised"])
  assert "classification_head/logits/kernel" in report["newly_initialised"]
  json.dumps(report)  # What the caller writes to WORKDIR/init_report.json.


def pretrained_lora():
  from hvlm_jax.models.domain.lora import LoRASpec
  return LoRASpec(rank=4, alpha=8.0, num_domains=2, targets=("query", "value", "mlp_in"))


@pytest.mark.parametrize("name,model_type", [("videomae_cls", "videomae"),
                                             ("vivit_cls", "vivit")])
def test_export_with_merged_lora_loads_in_transformers_with_equal_outputs(
    checkpoints, tmp_path, name, model_type):
  path, model = checkpoints[name]
  frames = MODELS[name][3]
  config, clip = make_config(path, frames), clip_for(frames)
  config.model.domain_modules.lora.alpha = 8.0
  enc, params = fresh_params(config, clip, lora=pretrained_lora())
  params, _ = pretrained.load_hf_params(path, params, None, config)
  # An adapted encoder: random (non-zero) B for every adapter.
  leaves = jax.tree_util.tree_leaves_with_path(params)
  key = jax.random.key(3)
  for p, leaf in leaves:
    names = [getattr(k, "key", None) for k in p]
    if names[-1] == "lora_b":
      node = params
      for n in names[:-1]:
        node = node[n]
      key, sub = jax.random.split(key)
      node["lora_b"] = 0.05 * jax.random.normal(sub, leaf.shape)
  domain = 1
  hidden, logits = ours(enc, params, clip, domain=jnp.full((2,), domain))
  out = str(tmp_path / "export")
  written = pretrained.export_hf(params, config, out, domain=domain, model_type=model_type)
  assert written["dropped"] == []
  exported = getattr(transformers, MODELS[name][0]).from_pretrained(out).eval()
  ex_hidden, ex_logits = reference(exported, make_config(out, frames), clip)
  assert np.abs(ex_hidden - hidden).max() <= 1e-4
  assert np.abs(ex_logits - logits).max() <= 1e-4
  # Without adapters the round trip through transformers gives back the original model.
  base = str(tmp_path / "base")
  pretrained.export_hf(params, config, base, model_type=model_type)
  original = reference(model, config, clip)
  again = reference(getattr(transformers, MODELS[name][0]).from_pretrained(base).eval(),
                    config, clip)
  assert np.abs(again[0] - original[0]).max() <= 1e-5
  assert np.abs(again[1] - original[1]).max() <= 1e-5


def test_joint_position_table_interpolation_equals_torch_trilinear(checkpoints):
  path, _ = checkpoints["vivit"]  # 6 frames, 32 px: grid (3, 4, 4).
  config, clip = make_config(path, 10, size=48), clip_for(10, size=48)  # Grid (5, 6, 6).
  enc, params = fresh_params(config, clip)
  params, report = pretrained.load_hf_params(path, params, None, config)
  table = load_file(os.path.join(path, "model.safetensors"))[
      "embeddings.position_embeddings"][0]
  grid = torch.from_numpy(table[1:]).reshape(3, 4, 4, -1).permute(3, 0, 1, 2)[None]
  expected = torch.nn.functional.interpolate(grid, size=(5, 6, 6), mode="trilinear",
                                             align_corners=False)
  expected = expected[0].permute(1, 2, 3, 0).reshape(5 * 36, -1).numpy()
  got = np.asarray(params["encoder"]["position"])
  np.testing.assert_array_equal(got[0], table[0])  # The CLS row is kept.
  np.testing.assert_allclose(got[1:], expected, rtol=1e-5, atol=1e-5)
  (item,) = report["interpolated"]
  assert item["from_grid"] == [3, 4, 4] and item["to_grid"] == [5, 6, 6]
  ours(enc, params, clip)  # The interpolated model runs on the new clip shape.


def test_downsampling_a_grid_equals_torch_trilinear():
  table = np.random.RandomState(0).randn(4 * 6 * 6, 8).astype(np.float32)
  got = positions.interpolate_grid(table, (4, 6, 6), (2, 3, 5))
  x = torch.from_numpy(table).reshape(4, 6, 6, 8).permute(3, 0, 1, 2)[None]
  ref = torch.nn.functional.interpolate(x, size=(2, 3, 5), mode="trilinear",
                                        align_corners=False)
  np.testing.assert_allclose(got, ref[0].permute(1, 2, 3, 0).reshape(-1, 8).numpy(),
                             rtol=1e-5, atol=1e-6)


def test_import_places_each_parameter_in_its_sharding_on_a_2x2x2_mesh(checkpoints,
                                                                       monkeypatch):
  path, _ = checkpoints["vivit_cls"]
  config, clip = make_config(path, 4), clip_for(4)
  enc, _ = fresh_params(config, clip)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  init = lambda r: {"encoder": enc.init(r, clip)["params"]}  # noqa: E731
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.flax_logical_rules()):
    shardings = sharding.tree_shardings(jax.eval_shape(init, jax.random.key(0)), mesh)
    params = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(
        jax.random.key(0))
  reference_params, _ = pretrained.load_hf_params(path, fresh_params(config, clip)[1], None,
                                                  config)
  reads = []
  original = pretrained.safetensors_files.SafetensorsCheckpoint.read
  monkeypatch.setattr(pretrained.safetensors_files.SafetensorsCheckpoint, "read",
                      lambda self, name, index=None: reads.append((name, index)) or
                      original(self, name, index))
  loaded, report = pretrained.load_hf_params(path, params, shardings, config)
  for (p, leaf), target in zip(jax.tree_util.tree_leaves_with_path(loaded),
                               jax.tree.leaves(shardings)):
    assert leaf.sharding == target, p
    full = reference_params
    for k in p:
      full = full[k.key]
    for shard in leaf.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(full)[shard.index])
  mlp = loaded["encoder"]["block_0"]["mlp"]["mlp_in"]["kernel"]
  assert mlp.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert {s.data.shape for s in mlp.addressable_shards} == {(16, 32)}
  # Each read of that tensor is one device's quarter, never the whole (64, 32) torch tensor.
  mlp_reads = [i for n, i in reads if n.endswith("layer.0.intermediate.dense.weight")]
  assert mlp_reads and all(i is not None and np.empty((64, 32))[i].shape == (32, 16)
                           for i in mlp_reads)
  # 16 per block, tubelet kernel + bias, CLS, positions, final LayerNorm; no head here, so
  # the classifier is ignored.
  assert report["counts"]["loaded"] == 2 * 16 + 6
  assert {x["tensor"] for x in report["ignored"]} == {"classifier.weight", "classifier.bias"}


# ----- bad input: one sentence naming the file and the key or tensor ---------------------------
def one_sentence(err) -> str:
  msg = str(err.value)
  assert "\n" not in msg and msg.endswith(".")
  return msg


def test_directory_without_config_json(tmp_path):
  with pytest.raises(PretrainedError) as err:
    pretrained.hf_architecture(str(tmp_path))
  assert str(tmp_path) in one_sentence(err) and "config.json" in str(err.value)


def test_unsupported_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(PretrainedError) as err:
    pretrained.hf_architecture(str(tmp_path))
  msg = one_sentence(err)
  assert "config.json" in msg and "model_type='bert'" in msg


def copy_checkpoint(checkpoints, tmp_path, name="videomae"):
  dst = str(tmp_path / "copy")
  shutil.copytree(checkpoints[name][0], dst)
  return dst, os.path.join(dst, "model.safetensors")


def test_truncated_safetensors_file(checkpoints, tmp_path):
  path, file = copy_checkpoint(checkpoints, tmp_path)
  with open(file, "r+b") as f:
    f.truncate(os.path.getsize(file) - 100)
  config = make_config(path, 4)
  with pytest.raises(PretrainedError) as err:
    pretrained.load_hf_params(path, fresh_params(config, clip_for(4))[1], None, config)
  assert file in one_sentence(err) and "truncated" in str(err.value)


@pytest.mark.parametrize("key,value", [("model.tubelet_size", (2, 4, 4)),
                                       ("model.hidden_size", 64)])
def test_config_contradicting_the_checkpoint(checkpoints, key, value):
  path = checkpoints["videomae"][0]
  config = make_config(path, 4)
  _, params = fresh_params(config, clip_for(4))
  config.model[key.split(".")[1]] = value
  with pytest.raises(PretrainedError) as err:
    pretrained.load_hf_params(path, params, None, config)
  msg = one_sentence(err)
  assert key in msg and "config.json" in msg
  with pytest.raises(PretrainedError) as err:  # The same, set on the command line.
    pretrained.apply_hf_architecture(config, path, {f"config.{key}"})
  msg = one_sentence(err)
  assert f"{key}={value!r}" in msg and "config.json" in msg


@pytest.mark.parametrize("change", ["missing", "shape"])
def test_missing_or_wrongly_shaped_tensor(checkpoints, tmp_path, change):
  path, file = copy_checkpoint(checkpoints, tmp_path)
  tensors = load_file(file)
  name = "encoder.layer.1.intermediate.dense.weight"
  if change == "missing":
    del tensors[name]
  else:
    tensors[name] = tensors[name][:48]
  save_file(tensors, file, metadata={"format": "pt"})
  config = make_config(path, 4)
  with pytest.raises(PretrainedError) as err:
    pretrained.load_hf_params(path, fresh_params(config, clip_for(4))[1], None, config)
  msg = one_sentence(err)
  assert name in msg and file in msg


def test_apply_hf_architecture_replaces_config_keys(checkpoints, caplog):
  path = checkpoints["vivit_cls"][0]
  with caplog.at_level("INFO"):
    config = make_config(path, 4)
  assert config.model.hidden_size == 32 and tuple(config.model.tubelet_size) == (2, 8, 8)
  assert config.model.pooling == "cls" and config.model.layer_norm_epsilon == 1e-6
  assert config.model.pixel_mean == (0.75, 0.75, 0.75)  # HF's [-1, 1] rescale, then 0.5/0.5.
  assert "config.model.hidden_size 768 -> 32" in caplog.text


def test_convert_checkpoint_hf_to_orbax_and_back_is_exact(checkpoints, tmp_path):
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from tools import convert_checkpoint
  path, model = checkpoints["vivit_cls"]
  report = convert_checkpoint.hf_to_orbax(path, str(tmp_path / "orbax"))
  assert report["counts"] == dict(loaded=40, interpolated=0, ignored=0, newly_initialised=0)
  convert_checkpoint.orbax_to_hf(str(tmp_path / "orbax"), str(tmp_path / "hf"))
  original = load_file(os.path.join(path, "model.safetensors"))
  back = load_file(str(tmp_path / "hf" / "model.safetensors"))
  assert sorted(back) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)
