"""Adaptive token merging: optical flow (flow.py), saliency (saliency.py), importance-aware
bipartite merging with size tracking and unmerge (merging.py).

`MergingSpec.from_config(config.model.token_merging)` turns the config block into the
hashable spec that `VideoEncoder(token_merging=...)` takes (None when merging is off).
"""
from __future__ import annotations

import dataclasses

from hvlm_jax.config import ConfigError
from hvlm_jax.models.token_merging.flow import optical_flow, token_motion
from hvlm_jax.models.token_merging.merging import (bipartite_soft_matching, merge,
                                                   merge_schedule, merge_step, unmerge,
                                                   unmerge_to_grid)
from hvlm_jax.models.token_merging.saliency import PIXEL_SOURCES, token_saliency

_KEY = "config.model.token_merging"


@dataclasses.dataclass(frozen=True)
class MergingSpec:
  """Static merging settings (see configs/base.py, `model.token_merging`, for each key).

  use_motion / use_saliency are only the default runtime weights: the encoder call takes
  `merge_weights` (motion, saliency) as traced scalars, so flipping them never recompiles.
  Whether flow and saliency are computed at all is static: motion_source != "none" and a
  positive saliency weight.
  """
  target_compression_ratio: float = 0.5
  schedule: str = "decreasing"
  protect_fraction: float = 0.1
  importance_weight: float = 1.0
  use_motion: float = 1.0
  use_saliency: float = 1.0
  motion_source: str = "flow"
  min_motion: float = 0.5
  flow_levels: int = 3
  flow_iterations: int = 5
  flow_window_sigma: float = 2.0
  # Less flow regularisation than `flow_pairs`'s default (4): the flow runs on frames already
  # area-downsampled to cells_per_token per token (which averages noise), and a small flat
  # object's motion smears less (tests/test_flow_real_footage.py).
  flow_smooth_sigma: float = 2.0
  flow_cells_per_token: int = 4
  camera_compensation: bool = True  # Motion relative to each frame pair's dominant motion.
  saliency_weights: tuple[tuple[str, float], ...] = (
      ("edge", 1.0), ("color_contrast", 1.0), ("spectral_residual", 1.0),
      ("center_prior", 0.5))
  saliency_cells_per_token: int = 4
  attention_weight: float = 0.0
  attention_keys: int = 128
  features_mode: str = "similarity"

  @property
  def pixel_weights(self) -> dict[str, float]:
    return dict(self.saliency_weights)

  @property
  def attention_share(self) -> float:
    """Share of the attention source in fused saliency (pixel weights sum to the rest)."""
    total = sum(w for _, w in self.saliency_weights) + self.attention_weight
    return self.attention_weight / total if total > 0 else 0.0

  @property
  def flow_options(self) -> dict:
    """Options of `flow.token_motion`'s flow: `flow_pairs` options and camera_compensation."""
    return dict(levels=self.flow_levels, iterations=self.flow_iterations,
                window_sigma=self.flow_window_sigma, smooth_sigma=self.flow_smooth_sigma,
                camera_compensation=self.camera_compensation)

  @classmethod
  def from_config(cls, tm) -> "MergingSpec | None":
    """`config.model.token_merging` -> spec, or None when `enabled` is false.

    Raises:
      ConfigError: naming the key, for unknown sources or modes.
    """
    if not tm.get("enabled", False):
      return None
    sal = dict(tm.get("saliency", {}))
    attention_weight = float(sal.pop("attention", 0.0))
    cells = int(sal.pop("cells_per_token", 4))
    keys = int(sal.pop("attention_keys", 128))
    unknown = set(sal) - set(PIXEL_SOURCES)
    if unknown:
      raise ConfigError(f"{_KEY}.saliency has unknown sources {sorted(unknown)}; known: "
                        f"{', '.join(PIXEL_SOURCES)}, attention, cells_per_token, "
                        f"attention_keys.")
    if any(w < 0 for w in sal.values()) or attention_weight < 0:
      raise ConfigError(f"{_KEY}.saliency weights must be >= 0.")
    if tm.get("motion_source", "flow") not in ("flow", "frame_difference", "none"):
      raise ConfigError(f"{_KEY}.motion_source={tm.motion_source!r} must be 'flow', "
                        f"'frame_difference' or 'none'.")
    if tm.get("features_mode", "similarity") not in ("similarity", "off"):
      raise ConfigError(f"{_KEY}.features_mode={tm.features_mode!r} must be 'similarity' "
                        f"or 'off'.")
    if not 0.0 <= tm.get("protect_fraction", 0.1) < 0.5:
      raise ConfigError(f"{_KEY}.protect_fraction must be in [0, 0.5).")
    flow = dict(tm.get("flow", {}))
    kw = dict(
        target_compression_ratio=float(tm.target_compression_ratio),
        schedule=str(tm.get("schedule", "decreasing")),
        protect_fraction=float(tm.get("protect_fraction", 0.1)),
        importance_weight=float(tm.get("importance_weight", 1.0)),
        use_motion=float(tm.get("use_motion", True)),
        use_saliency=float(tm.get("use_saliency", True)),
        motion_source=str(tm.get("motion_source", "flow")),
        min_motion=float(flow.get("min_motion", 0.5)),
        flow_levels=int(flow.get("levels", 3)), flow_iterations=int(flow.get("iterations", 5)),
        flow_window_sigma=float(flow.get("window_sigma", 2.0)),
        flow_smooth_sigma=float(flow.get("smooth_sigma", 2.0)),
        camera_compensation=bool(flow.get("camera_compensation", True)),
        flow_cells_per_token=int(flow.get("cells_per_token", 4)),
        saliency_weights=tuple(sorted((k, float(v)) for k, v in sal.items())),
        saliency_cells_per_token=cells, attention_weight=attention_weight,
        attention_keys=keys, features_mode=str(tm.get("features_mode", "similarity")))
    return cls(**kw)


__all__ = ["MergingSpec", "bipartite_soft_matching", "merge", "merge_schedule", "merge_step",
           "optical_flow", "token_motion", "token_saliency", "unmerge", "unmerge_to_grid"]
