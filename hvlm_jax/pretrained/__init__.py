"""Pretrained video backbones in the Hugging Face format: import (exact), export, config.

  hf_architecture(path) -> {"model.hidden_size": 768, ...}: the encoder keys of a checkpoint.
  apply_hf_architecture(config, path, explicit_keys) -> config with those keys replaced.
  load_hf_params(path, params, shardings, config) -> (params, report for init_report.json).
  export_hf(params, config, out_dir, domain=None, model_type="videomae") -> writes a
      directory `transformers` loads (LoRA adapters of `domain` merged in).
Runtime code reads safetensors with numpy; it never imports torch or transformers.
"""
from hvlm_jax.pretrained.export import export_hf
from hvlm_jax.pretrained.hf import PretrainedError, hf_architecture
from hvlm_jax.pretrained.load import apply_hf_architecture, load_hf_params

__all__ = ["PretrainedError", "apply_hf_architecture", "export_hf", "hf_architecture",
           "load_hf_params"]
