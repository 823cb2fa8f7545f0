"""Config helpers shared by every `configs/*.py` file.

Config files follow big_vision's convention: `get_config(arg=None)`, where `arg` is the
text after `:` in `--config=configs/demo.py:attention=performer,frames=32`. Overrides on
the command line (`--config.model.hidden_size=128`) are applied by ml_collections (train) or
`apply_overrides` (evaluate, predict: on top of the run's config.json) and fail on unknown
keys or wrong types naming the key; `parse_arg` does the same for `:key=value` arguments.

This module is the leaf of the package (config files import it; it imports nothing of
hvlm_jax). Values that only make sense together are checked by each component and
gathered by `hvlm_jax.run.validate` (see docs/design.md).
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


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any],
                    *, source: str = "override") -> ml_collections.ConfigDict:
  """Sets dotted keys (`model.attention.type`) of `config` in place and returns it.

  A value given as text (from the command line) is parsed as the existing value's type;
  other values are set as they are (tuples vs lists and int vs float are the same to the
  reader). An unknown key is a ConfigError naming it and `source`.
  """
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        raise ConfigError(f"{source} {dotted!r}: the config has no key {name!r}.")
      node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ConfigError(f"{source} {dotted!r}: the config has no key {leaf!r}.")
    if isinstance(value, str) and not isinstance(node[leaf], str):
      value = _coerce(dotted, value, node[leaf]) if node[leaf] is not None else value
    with node.ignore_type():
      node[leaf] = tuple(value) if isinstance(value, list) else value
  return config


def get_value(config, dotted: str, default: Any = None) -> Any:
  """`config["a"]["b"]` for "a.b", or `default` where a key is missing."""
  node = config
  for name in dotted.split("."):
    if not hasattr(node, "get") or name not in node:
      return default
    node = node[name]
  return node


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  """Separates `--config.a.b=value` arguments from the rest of a command line.

  Returns (the other arguments, {"a.b": "value"}) in command-line order.
  """
  rest, overrides = [], {}
  for arg in argv:
    if arg.startswith("--config.") and "=" in arg:
      key, _, value = arg[len("--config."):].partition("=")
      overrides[key] = value
    else:
      rest.append(arg)
  return rest, overrides


def overridden_keys(argv: list[str]) -> set[str]:
  """Dotted keys a command line sets with `--config.a.b=value` (or `--config.a.b value`)."""
  keys = set()
  for arg in argv:
    if arg.startswith("--config."):
      keys.add(arg[len("--config."):].partition("=")[0])
  return keys


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
