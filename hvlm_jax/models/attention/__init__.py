"""Attention family. `REGISTRY` maps config names to linen classes; `get(name)` returns one.

Every class is built as `cls(num_heads=..., **options)` and called as
`module(x, mask=None, *, key_bias=None, domain=None, deterministic=True)`; see common.py.
"""
from __future__ import annotations

from hvlm_jax.models.attention.full import FullAttention
from hvlm_jax.models.attention.hierarchical import HierarchicalAttention
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
