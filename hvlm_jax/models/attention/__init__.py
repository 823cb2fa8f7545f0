"""Attention family. `REGISTRY` maps config names to linen classes; `get(name)` returns one.

Every class is built as `cls(num_heads=..., **options)` and called as
`module(x, mask=None, *, key_bias=None, domain=None, deterministic=True)`; see common.py.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

from hvlm_jax.config import ConfigError
from hvlm_jax.models.attention.full import FullAttention
from hvlm_jax.models.attention.hierarchical import HierarchicalAttention
from hvlm_jax.models.attention.kernels import IMPLEMENTATIONS
from hvlm_jax.models.attention.linear import LinearAttention, PerformerAttention
from hvlm_jax.models.attention.mamba import MambaLayer
from hvlm_jax.models.attention.memory import CrossMemoryAttention
from hvlm_jax.models.attention.sparse import LocalGlobalAttention, StridedAttention

REGISTRY: dict[str, type] = {
    "full": FullAttention,
    "strided": StridedAttention,
    "local_global": LocalGlobalAttention,
    "cross_memory": CrossMemoryAttention,
    "performer": PerformerAttention,
    "linear": LinearAttention,
    "mamba": MambaLayer,
    "hierarchical": HierarchicalAttention,
}


def get(name: str) -> type:
  """The attention class registered as `name`; a clear error names the known ones."""
  try:
    return REGISTRY[name]
  except KeyError:
    raise KeyError(f"Unknown attention type {name!r} (config.model.attention.type); "
                   f"registered: {', '.join(sorted(REGISTRY))}.") from None


# Options with a fixed set of values (the class checks them too, but only once built).
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("local_global", "global_tokens"): ("frame", "learned", "none"),
    ("cross_memory", "memory_source"): ("pooled", "learned"),
    ("mamba", "scan_method"): ("chunked", "scan", "associative"),
    **{(name, "implementation"): IMPLEMENTATIONS for name in ("full", "strided", "local_global")},
}

# Options counted in tokens that describe frames. 0 or "frame" means one frame of the token
# grid the block actually sees; "frame/k" a k-th of it (hierarchical pool sizes).
FRAME_OPTIONS: dict[str, tuple[str, ...]] = {
    "strided": ("stride",),
    "local_global": ("window", "tokens_per_frame"),
    "cross_memory": ("pool_size",),
    "hierarchical": ("window", "pool_sizes"),
}
_FRAME = re.compile(r"^frame(?:/(\d+))?$")


def _key(name: str, option: str) -> str:
  return f"config.model.attention.{name}.{option}"


def _frame_value(name: str, option: str, value, tokens_per_frame: int | None) -> int | None:
  """An option value in tokens: explicit ints stay, 0 / "frame" / "frame/k" are resolved
  against `tokens_per_frame` (None: only check the syntax)."""
  if isinstance(value, bool):
    raise ConfigError(f"{_key(name, option)}={value!r} must be a token count, 0 or 'frame'.")
  if isinstance(value, int) and value > 0:
    return value
  divisor = 1
  if isinstance(value, str):
    match = _FRAME.match(value.strip())
    if not match:
      raise ConfigError(f"{_key(name, option)}={value!r} must be a positive token count, 0, "
                        "'frame' or 'frame/k'.")
    divisor = int(match.group(1) or 1)
    if divisor < 1:
      raise ConfigError(f"{_key(name, option)}={value!r}: k in 'frame/k' must be >= 1.")
  elif value != 0:
    raise ConfigError(f"{_key(name, option)}={value!r} must be a positive token count, 0 or "
                      "'frame'.")
  return None if tokens_per_frame is None else max(tokens_per_frame // divisor, 1)


def resolve_frame_options(name: str, options: dict[str, Any],
                          tokens_per_frame: int) -> dict[str, Any]:
  """`options` of attention type `name` with frame-relative values (0, "frame", "frame/k")
  replaced by token counts of a grid with `tokens_per_frame` tokens per frame."""
  out = dict(options)
  for option in FRAME_OPTIONS.get(name, ()):
    if option not in out:
      continue
    value = out[option]
    if isinstance(value, (tuple, list)):
      out[option] = tuple(_frame_value(name, option, v, tokens_per_frame) for v in value)
    else:
      out[option] = _frame_value(name, option, value, tokens_per_frame)
  return out


def validate_config(attention_config, tokens_per_frame: int | None = None) -> None:
  """Checks config.model.attention: a registered type, option names the class accepts,
  enumerated and frame-relative values. Explicit frame options that do not divide (or are
  not multiples of) `tokens_per_frame` are allowed but warned about.

  Raises:
    ConfigError: naming the key and the allowed values.
  """
  name = attention_config.type
  if name not in REGISTRY:
    raise ConfigError(f"config.model.attention.type={name!r} is not one of "
                      f"{', '.join(sorted(REGISTRY))}.")
  for other in REGISTRY:  # Every type's block, so a typo fails before it is switched on.
    _validate_options(other, dict(attention_config.get(other, {}) or {}),
                      tokens_per_frame if other == name else None)


def _validate_options(name: str, options: dict, tokens_per_frame: int | None) -> None:
  fields = {f.name for f in dataclasses.fields(REGISTRY[name])} - {"parent", "name"}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ConfigError(f"config.model.attention.{name} has unknown option(s) {unknown}; "
                      f"{REGISTRY[name].__name__} accepts {', '.join(sorted(fields))}.")
  for (type_name, option), allowed in CHOICES.items():
    if type_name == name and option in options and options[option] not in allowed:
      raise ConfigError(f"{_key(name, option)}={options[option]!r} is not one of "
                        f"{', '.join(allowed)}.")
  explicit = {k: v for k, v in options.items() if k in FRAME_OPTIONS.get(name, ())}
  resolve_frame_options(name, explicit, tokens_per_frame or 1)  # Syntax errors raise here.
  if tokens_per_frame:
    for option, value in explicit.items():
      for v in value if isinstance(value, (tuple, list)) else (value,):
        if (isinstance(v, int) and v > 0 and option != "pool_sizes"
            and tokens_per_frame % v and v % tokens_per_frame):
          logging.warning("%s=%d is not aligned with the %d tokens of a frame: blocks will "
                          "straddle frames (0 means one frame).", _key(name, option), v,
                          tokens_per_frame)
