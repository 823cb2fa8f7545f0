"""Position-embedding tables resized to a new token grid (other clip length or resolution).

As VideoMAE fine-tuning and scenic do: the table is reshaped to its (T', H', W', D) grid and
resized; here linearly along each axis (trilinear), with PyTorch's `F.interpolate(...,
mode="trilinear", align_corners=False)` sampling (half-pixel centres, sources clamped at 0,
no antialiasing), so an upsampled table equals the reference's. Host numpy, float64 inside:
a table is T'H'W' x D, small next to the model.
"""
from __future__ import annotations

import numpy as np


def resize_linear(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  """Linear resize of `x` along `axis` to `size` samples (align_corners=False)."""
  n = x.shape[axis]
  if n == size:
    return x
  src = np.maximum((np.arange(size) + 0.5) * (n / size) - 0.5, 0.0)
  i0 = np.floor(src).astype(int)
  i1 = np.minimum(i0 + 1, n - 1)
  w1 = src - i0
  shape = [1] * x.ndim
  shape[axis] = size
  w1 = w1.reshape(shape)
  return np.take(x, i0, axis=axis) * (1 - w1) + np.take(x, i1, axis=axis) * w1


def interpolate_grid(table: np.ndarray, src_grid: tuple[int, int, int],
                     dst_grid: tuple[int, int, int]) -> np.ndarray:
  """(T*H*W, D) table on `src_grid` (time-major) -> (T2*H2*W2, D) on `dst_grid`, trilinear."""
  t, h, w = src_grid
  if table.shape[0] != t * h * w:
    raise ValueError(f"A position table of {table.shape[0]} rows is not a {src_grid} grid.")
  x = table.astype(np.float64).reshape(t, h, w, -1)
  for axis, size in enumerate(dst_grid):
    x = resize_linear(x, axis, size)
  return x.reshape(-1, table.shape[-1]).astype(table.dtype)


def interpolate_joint_table(table: np.ndarray, src_grid, dst_grid,
                            num_prefix: int = 0) -> np.ndarray:
  """A joint table whose first `num_prefix` rows belong to CLS tokens (kept as they are) and
  the rest to the grid, resized from `src_grid` to `dst_grid`."""
  return np.concatenate([table[:num_prefix],
                         interpolate_grid(table[num_prefix:], src_grid, dst_grid)], axis=0)
