"""Config helpers shared by every `configs/*.py` file.

Config files follow big_vision's convention: `get_config(arg=None)`, where `arg` is the
text after `:` in `--config=configs/demo.py:attention=performer,frames=32`. Overrides on
the command line (`--config.model.hidden_size=128`) are applied by ml_collections and fail
on unknown keys or wrong types by themselves; `parse_arg` and `validate` give the same
guarantee for `:key=value` arguments and for values that only make sense together.
"""
from __future__ import annotations

import ast
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config key or value a user wrote is wrong. The message names the key."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `key=value,key2=value2` against `defaults`, keeping each default's type.

  Args:
    arg: the text after `:` in the config path, or None.
    **defaults: every key the config file accepts, with its default value.

  Returns:
    A ConfigDict with every default, overridden by `arg`.

  Raises:
    ConfigError: on an unknown key or a value that does not parse as the default's type.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(","):
    if not item:
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep:
      raise ConfigError(f"Config argument {item!r} is not of the form key=value.")
    if key not in defaults:
      raise ConfigError(
          f"Unknown config argument {key!r}; known arguments: {', '.join(sorted(defaults))}.")
    result[key] = _coerce(key, value.strip(), defaults[key])
  return result


def _coerce(key: str, text: str, default: Any) -> Any:
  if isinstance(default, str):
    return text
  if isinstance(default, bool):
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ConfigError(f"Config argument {key!r} must be true or false, got {text!r}.")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(
        f"Config argument {key!r} must be a {type(default).__name__}, got {text!r}.") from None
  if isinstance(default, float) and isinstance(value, int):
    value = float(value)
  if not isinstance(value, type(default)):
    raise ConfigError(
        f"Config argument {key!r} must be a {type(default).__name__}, got {text!r}.")
  return value


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that ml_collections' type checks cannot see.

  Raises:
    ConfigError: naming the offending key.
  """
  # Local imports: configs stay importable alone.
  from hvlm_jax.models import attention
  from hvlm_jax.models.encoder import MOTION_INPUTS, STEMS

  model = config.model
  if model.attention.type not in attention.REGISTRY:
    raise ConfigError(
        f"config.model.attention.type={model.attention.type!r} is not one of "
        f"{', '.join(sorted(attention.REGISTRY))}.")
  if model.hidden_size % model.num_attention_heads:
    raise ConfigError(
        f"config.model.hidden_size={model.hidden_size} is not divisible by "
        f"config.model.num_attention_heads={model.num_attention_heads}.")
  motion = tuple(model.get("motion_input", ()))
  if any(m not in MOTION_INPUTS for m in motion) or len(set(motion)) != len(motion):
    raise ConfigError(
        f"config.model.motion_input={motion!r} must list distinct streams out of "
        f"{', '.join(MOTION_INPUTS)}.")
  t, p, q = model.tubelet_size
  stem = model.get("stem", "patch")
  if stem not in STEMS:
    raise ConfigError(f"config.model.stem={stem!r} is not one of {', '.join(STEMS)}.")
  if stem != "patch" and (p & (p - 1) or p < 2):
    raise ConfigError(f"config.model.stem={stem!r} needs a power-of-two patch size; got "
                      f"config.model.tubelet_size[1]={p}.")
  if config.data.video.num_frames % t:
    raise ConfigError(
        f"config.data.video.num_frames={config.data.video.num_frames} is not divisible by "
        f"the temporal tubelet size config.model.tubelet_size[0]={t}.")
  if config.data.video.frame_size % p or p != q:
    raise ConfigError(
        f"config.data.video.frame_size={config.data.video.frame_size} must be divisible by "
        f"a square spatial tubelet config.model.tubelet_size[1:]=({p}, {q}).")
  if config.training.num_steps <= 0 and config.training.num_epochs <= 0:
    raise ConfigError("Set config.training.num_steps or config.training.num_epochs above 0.")
  if config.training.mixed_precision not in (True, False):
    raise ConfigError("config.training.mixed_precision must be true or false.")


def import_sibling(this_file: str, filename: str):
  """Imports another config file next to `this_file` (configs are loaded by path, not as a
  package, so `from configs import base` would depend on the working directory)."""
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), filename)
  name = os.path.splitext(os.path.basename(filename))[0]
  spec = importlib.util.spec_from_file_location(f"hvlm_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
