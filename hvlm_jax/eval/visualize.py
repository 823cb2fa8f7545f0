"""Pictures of what a model predicted, shared by `hvlm_jax.predict` (the HTML report),
the trainer (TensorBoard images at each evaluation) and tools/visualize_merging.py.

All functions return RGB uint8 arrays (H, W, 3); `png_bytes` / `data_uri` encode them.
Drawing uses matplotlib's Agg backend (no display, no network).
"""
from __future__ import annotations

import base64
import io

import numpy as np


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _to_array(fig) -> np.ndarray:
  fig.canvas.draw()
  img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  _pyplot().close(fig)
  return img


def png_bytes(img: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.asarray(img, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def data_uri(img: np.ndarray) -> str:
  """An inline `data:image/png;base64,...` URI (HTML reports load nothing from outside)."""
  return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode("ascii")


def label_colors(labels) -> dict[str, tuple[float, float, float]]:
  """A stable colour per label (tab20, in sorted label order)."""
  cmap = _pyplot().get_cmap("tab20")
  return {lab: cmap(i % 20)[:3] for i, lab in enumerate(sorted(set(labels)))}


def timeline(frames: np.ndarray, frame_times: np.ndarray, duration: float,
             detections: list[dict], ground_truth: list[tuple[float, float, str]] | None = None,
             *, title: str = "", max_rows: int = 8) -> np.ndarray:
  """Sampled frames along the time axis, the detected segments under them (one row per
  label, opacity = score, score printed) and, when given, the ground truth segments.

  frames (K, h, w, 3) uint8 shown at `frame_times` (K,) seconds; detections: dicts with
  start, end (seconds), label, score; ground_truth: (start, end, label) tuples.
  """
  plt = _pyplot()
  gt = list(ground_truth or [])
  labels = sorted({d["label"] for d in detections} | {g[2] for g in gt})
  colors = label_colors(labels)
  det_rows = sorted({d["label"] for d in detections})[:max_rows]
  gt_rows = sorted({g[2] for g in gt})[:max_rows]
  rows = len(det_rows) + len(gt_rows)
  fig = plt.figure(figsize=(10, 1.6 + 0.32 * max(rows, 1) + (0.3 if gt else 0)), dpi=100)
  k = len(frames)
  top = fig.add_axes((0.14, 1 - 1.25 / fig.get_figheight(), 0.84, 1.0 / fig.get_figheight()))
  top.set_xlim(0, duration)
  top.set_ylim(0, 1)
  top.axis("off")
  width = duration / max(k, 1)
  for img, t in zip(frames, frame_times):
    left = min(max(t - width / 2, 0.0), max(duration - width, 0.0))
    top.imshow(img, extent=(left, left + width * 0.96, 0, 1), aspect="auto")
  bottom = fig.add_axes((0.14, 0.45 / fig.get_figheight(), 0.84,
                         (fig.get_figheight() - 1.85) / fig.get_figheight()))
  names = [f"pred: {lab}" for lab in det_rows] + [f"true: {lab}" for lab in gt_rows]
  for d in detections:
    if d["label"] not in det_rows:
      continue
    y = det_rows.index(d["label"])
    bottom.barh(y, d["end"] - d["start"], left=d["start"], height=0.7,
                color=colors[d["label"]], alpha=0.35 + 0.65 * float(np.clip(d["score"], 0, 1)))
    bottom.text(d["start"], y, f" {d['score']:.2f}", va="center", fontsize=7)
  for s, e, lab in gt:
    if lab in gt_rows:
      bottom.barh(len(det_rows) + gt_rows.index(lab), e - s, left=s, height=0.7,
                  color=colors[lab], hatch="//", edgecolor="black", linewidth=0.5)
  bottom.set_yticks(range(rows), names, fontsize=7)
  bottom.set_ylim(-0.6, max(rows, 1) - 0.4)
  bottom.invert_yaxis()
  bottom.set_xlim(0, duration)
  bottom.set_xlabel("seconds", fontsize=8)
  bottom.tick_params(axis="x", labelsize=7)
  if not rows:
    bottom.text(duration / 2, 0, "no detections", ha="center", va="center", fontsize=8)
  if title:
    fig.suptitle(title, fontsize=8, y=0.995)
  return _to_array(fig)


def group_overlay(frame: np.ndarray, ids: np.ndarray, sizes: np.ndarray, tubelet) -> np.ndarray:
  """frame (h, w, 3) uint8 with the merged groups (tokens of size > 1) tinted one colour
  per group, unmerged tokens darkened, and white lines between different groups.
  ids (gh, gw) final-token id of each grid position of this time step; sizes (M,)."""
  rng = np.random.default_rng(0)
  palette = rng.uniform(0.15, 1.0, (int(ids.max()) + 1, 3))
  gh, gw = ids.shape
  merged = (sizes[ids] > 1)[..., None]
  up = lambda a: np.kron(a, np.ones((tubelet[1], tubelet[2], 1)))  # noqa: E731
  img = frame[:gh * tubelet[1], :gw * tubelet[2]].astype(np.float32) / 255.0
  img = np.where(up(merged), 0.45 * img + 0.55 * up(palette[ids]), 0.6 * img)
  big = np.kron(ids, np.ones((tubelet[1], tubelet[2]), int))
  edges = np.zeros(big.shape, bool)
  edges[:, 1:] |= big[:, 1:] != big[:, :-1]
  edges[1:, :] |= big[1:, :] != big[:-1, :]
  img[edges] = 1.0
  return img


def merge_map(clip: np.ndarray, assignment: np.ndarray, sizes: np.ndarray, tubelet,
              *, max_steps: int = 8, title: str = "") -> np.ndarray:
  """Which tokens the model merged: per tubelet time step (up to `max_steps`, evenly
  picked), the step's first frame with its merged groups (`group_overlay`).

  clip (T, S, S, 3) uint8 model input; assignment (N,) final token of each grid position,
  N = T/t * S/p * S/q; sizes (M,) grid positions per final token (0 for padding)."""
  plt = _pyplot()
  tt, p, q = tubelet
  gt, gh, gw = clip.shape[0] // tt, clip.shape[1] // p, clip.shape[2] // q
  ids = np.asarray(assignment).reshape(gt, gh, gw)
  sizes = np.asarray(sizes)
  steps = np.unique(np.linspace(0, gt - 1, min(gt, max_steps)).round().astype(int))
  fig, axes = plt.subplots(1, len(steps), figsize=(1.6 * len(steps), 2.0), squeeze=False,
                           dpi=100)
  for ax, t in zip(axes[0], steps):
    ax.imshow(group_overlay(clip[t * tt], ids[t], sizes, tubelet), interpolation="nearest")
    ax.set_title(f"step {t}", fontsize=7)
    ax.axis("off")
  kept = int((sizes > 0).sum())
  fig.suptitle(title or f"{gt * gh * gw} tokens -> {kept} after merging; tinted: merged "
               f"groups, dark: kept alone", fontsize=8)
  fig.tight_layout()
  return _to_array(fig)


def text_card(lines: list[str], *, width: float = 10.0) -> np.ndarray:
  """Lines of text as an image (caption vs reference in TensorBoard's image tab)."""
  plt = _pyplot()
  import textwrap
  wrapped = [w for line in lines for w in (textwrap.wrap(line, 110) or [""])]
  fig = plt.figure(figsize=(width, 0.25 * len(wrapped) + 0.3), dpi=100)
  for i, line in enumerate(wrapped):
    fig.text(0.01, 1 - (i + 1) / (len(wrapped) + 0.5), line, fontsize=9, family="monospace")
  return _to_array(fig)
