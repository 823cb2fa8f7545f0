"""Checks of the `config.data` keys (and `training.domain_balancing`, which the sampler reads),
run by `hvlm_jax.run.validate` before any file is opened. Each failure is one ConfigError
naming the key and the allowed values.
"""
from __future__ import annotations

from hvlm_jax.config import ConfigError

NAMES = ("folder", "synthetic")
INPUTS = ("video", "cache", "features")


def validate_config(config) -> None:
  data = config.data
  if data.name not in NAMES:
    raise ConfigError(f"config.data.name={data.name!r} is not one of {', '.join(NAMES)}.")
  if data.input not in INPUTS:
    raise ConfigError(f"config.data.input={data.input!r} is not one of {', '.join(INPUTS)}.")
  if data.input == "cache" and not data.cache_dir:
    raise ConfigError("config.data.input='cache' needs config.data.cache_dir (where "
                      "tools/build_dataset.py wrote the ArrayRecord cache).")
  if data.input == "features" and data.features_dim < 1 and not data.cache_dir:
    raise ConfigError("config.data.input='features' needs config.data.features_dim >= 1.")
  if data.name == "folder" and not str(data.dir).strip():
    raise ConfigError("config.data.dir is empty; point it at a folder laid out as "
                      "DATA/{training,validation,test}/{videos,annotations}.")
  for key in ("batch_size", "eval_batch_size", "max_segments", "max_questions",
              "question_length", "caption_length", "answer_vocab_size", "min_word_count",
              "prefetch", "read_threads"):
    if data[key] < 1:
      raise ConfigError(f"config.data.{key}={data[key]} must be >= 1.")
  for key in ("num_workers", "memory_cache_mb", "max_corrupt_videos"):
    if data[key] < 0:
      raise ConfigError(f"config.data.{key}={data[key]} must be >= 0.")
  if data.caption_length < 3:
    raise ConfigError(f"config.data.caption_length={data.caption_length} must be >= 3 "
                      "(begin and end tokens plus one word).")
  if not data.domains or len(set(data.domains)) != len(data.domains):
    raise ConfigError(f"config.data.domains={tuple(data.domains)} must be distinct names, "
                      "at least one.")
  video = data.video
  for key in ("decode_threads",):
    if video[key] < 1:
      raise ConfigError(f"config.data.video.{key}={video[key]} must be >= 1.")
  if video.decode_size < 0 or (video.decode_size and video.decode_size < video.frame_size):
    raise ConfigError(f"config.data.video.decode_size={video.decode_size} must be 0 or at "
                      f"least config.data.video.frame_size={video.frame_size}.")
  if video.max_fps < 0:
    raise ConfigError(f"config.data.video.max_fps={video.max_fps} must be >= 0.")
  if not 0.0 < video.min_window <= 1.0:
    raise ConfigError(f"config.data.video.min_window={video.min_window} must be in (0, 1].")
  aug = data.augment
  if not 0.0 < aug.min_crop_scale <= 1.0:
    raise ConfigError(f"config.data.augment.min_crop_scale={aug.min_crop_scale} must be in "
                      "(0, 1].")
  if aug.color_jitter < 0:
    raise ConfigError(f"config.data.augment.color_jitter={aug.color_jitter} must be >= 0.")
  for pair in aug.flip_swap:
    if pair.count(":") != 1 or "" in pair.split(":"):
      raise ConfigError(f"config.data.augment.flip_swap entry {pair!r} is not of the form "
                        "'a:b'.")
  if data.name == "synthetic":
    syn = data.synthetic
    for split in ("training", "validation", "test"):
      if syn.num_videos[split] < 1:
        raise ConfigError(f"config.data.synthetic.num_videos.{split}="
                          f"{syn.num_videos[split]} must be >= 1.")
    if not 1 <= syn.max_objects <= 3:
      raise ConfigError(f"config.data.synthetic.max_objects={syn.max_objects} must be 1 to 3.")
  _validate_domain_balancing(config)


def _validate_domain_balancing(config) -> None:
  spec = str(config.training.get("domain_balancing", "none")).strip()
  if spec in ("", "none", "inverse_frequency"):
    return
  for item in spec.split(","):
    name, sep, value = item.partition("=")
    try:
      weight = float(value)
    except ValueError:
      weight = -1.0
    if not sep or name.strip() not in config.data.domains or not weight >= 0:
      raise ConfigError(f"config.training.domain_balancing={spec!r}: {item!r} is not "
                        "domain=weight with a domain of config.data.domains "
                        f"{tuple(config.data.domains)} (or use 'none', 'inverse_frequency').")
