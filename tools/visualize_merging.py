"""Draws what adaptive token merging does to one clip: a PNG with, per tubelet time step,
the frame, the merged groups as coloured regions, the optical flow and the saliency map.

    python tools/visualize_merging.py --workdir=runs/demo_merging [--step=best] \
        [--video=clip.mp4] --out benchmarks/merging/trained_groups.png
    python tools/visualize_merging.py --random_init --out benchmarks/merging/merging_groups.png

With --workdir (a trained run with model.token_merging.enabled): the run's own config and
parameters, on `--video` or the first video of the run's validation split, read as the
evaluator reads it (hvlm_jax/eval/predict.py `Predictor`): what the trained model merges.
With --random_init: the demo-sized VideoEncoder with random parameters on a synthetic clip
(`--clip shapes`: a moving square); groups then reflect motion, saliency and the similarity
of untrained patch embeddings only.
"""
from __future__ import annotations

import argparse
import colorsys
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hvlm_jax.eval.visualize import group_overlay  # noqa: E402
from hvlm_jax.models.encoder import VideoEncoder  # noqa: E402
from hvlm_jax.models.token_merging import MergingSpec  # noqa: E402
from hvlm_jax.models.token_merging.flow import optical_flow  # noqa: E402
from hvlm_jax.models.token_merging.saliency import token_saliency  # noqa: E402


def synthetic_clip(frames: int, size: int, seed: int) -> np.ndarray:
  """The first synthetic clip (seed, training split) whose actor moves while on screen."""
  from hvlm_jax.data import synthetic
  settings = dict(num_frames=frames, fps=frames / 4.0, frame_size=size, seed=seed,
                  domains=synthetic.DOMAINS, max_objects=3)
  for index in range(200):
    ex = synthetic.make_example(seed, "training", index, settings)
    if any(e["label"] in synthetic.DIRECTIONS for e in ex["clip"]["events"]):
      frames_ = ex["frames"]
      if np.abs(np.diff(frames_.astype(np.float32), axis=0)).mean() > 0.5:
        return frames_
  raise RuntimeError("No synthetic clip with a moving actor among the first 200.")


def shapes_clip(frames: int, size: int, seed: int) -> np.ndarray:
  """A textured background with a red square moving right and a static blue disc."""
  rng = np.random.default_rng(seed)
  bg = np.kron(rng.uniform(60, 160, (size // 4, size // 4, 3)), np.ones((4, 4, 1)))
  yy, xx = np.mgrid[0:size, 0:size]
  out = []
  for t in range(frames):
    img = bg.copy()
    x0 = size // 8 + t * size // (2 * frames)
    img[size // 4:size // 4 + size // 4, x0:x0 + size // 4] = (230, 40, 40)
    img[np.hypot(yy - 0.7 * size, xx - 0.7 * size) < size / 8] = (40, 80, 240)
    out.append(img)
  return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def flow_to_rgb(flow: np.ndarray, max_mag: float) -> np.ndarray:
  """(H, W, 2) -> (H, W, 3): hue = direction, brightness = magnitude / max_mag."""
  ang = (np.arctan2(flow[..., 1], flow[..., 0]) / (2 * np.pi)) % 1.0
  mag = np.clip(np.linalg.norm(flow, axis=-1) / max(max_mag, 1e-6), 0, 1)
  rgb = np.vectorize(colorsys.hsv_to_rgb)(ang, np.ones_like(ang), mag)
  return np.stack(rgb, -1)


def trained_clip(workdir: str, step: str, video: str | None):
  """(clip (T, S, S, 3) uint8, assignment (N,), sizes (M,), tubelet, title) of a trained run."""
  import dataclasses

  import ml_collections

  from hvlm_jax import data as data_lib
  from hvlm_jax import run as run_lib
  from hvlm_jax import sharding
  from hvlm_jax.checkpoint import Checkpointer
  from hvlm_jax.eval import predict as predict_lib
  config, _ = run_lib.load_run_config(workdir)
  vocabs = run_lib.load_vocabularies(workdir)
  config = run_lib.fill_from_vocabularies(config, vocabs)
  if not config.model.token_merging.enabled:
    raise SystemExit(f"error: {workdir} trained without token merging "
                     "(config.model.token_merging.enabled=False): nothing was merged.")
  config.mesh = ml_collections.ConfigDict(run_lib.INFERENCE_MESH)
  config.data.input, config.data.memory_cache_mb, config.data.num_workers = "video", 0, 0
  run_lib.validate(config, jax.device_count(), training=False)
  mesh = sharding.make_mesh(config.mesh)
  config.data.eval_batch_size = mesh.size
  if video:
    entries = predict_lib.video_entries([video], [], vocabs, config)
    split = data_lib.SplitData("predict", os.path.dirname(os.path.abspath(video)), entries)
  else:
    split = data_lib.load_split(config, "validation", training=False)
    split = dataclasses.replace(split, entries=split.entries[:1])
  ckpt = Checkpointer(workdir, read_only=True, async_save=False)
  step = ckpt.resolve(step)
  model = run_lib.build_model(config)
  example = next(iter(data_lib.eval_batches(config, split, vocabs)))
  params = run_lib.restore_params(ckpt, step, model, example, mesh)
  (rec,) = predict_lib.Predictor(config, model, vocabs, mesh).run(params, split)
  title = f"{rec['video_id']} (trained run {os.path.basename(workdir)} step {step})"
  return (rec["clip"], rec["merge"]["assignment"], rec["merge"]["sizes"],
          tuple(config.model.tubelet_size), title)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", help="A trained run (token merging on): draw what it merges.")
  p.add_argument("--step", default="latest", help="With --workdir: latest, best or a number.")
  p.add_argument("--video", help="With --workdir: a video file (default: first validation).")
  p.add_argument("--random_init", action="store_true",
                 help="An untrained demo-sized encoder on a synthetic clip instead.")
  p.add_argument("--clip", choices=("synthetic", "shapes"), default="synthetic")
  p.add_argument("--frames", type=int, default=16)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--tubelet", default="2,8,8")
  p.add_argument("--ratio", type=float, default=0.5)
  p.add_argument("--schedule", default="decreasing")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="benchmarks/merging/merging_groups.png")
  args = p.parse_args(argv)
  if bool(args.workdir) == bool(args.random_init):
    p.error("give --workdir=RUN (a trained run) or --random_init.")
  motion = None
  if args.workdir:
    clip, ids, sizes, tub, title = trained_clip(args.workdir, args.step, args.video)
    args.frames, args.size = clip.shape[0], clip.shape[1]
    x = jnp.asarray(clip[None])
    spec = MergingSpec()
  else:
    tub = tuple(int(v) for v in args.tubelet.split(","))
    make = synthetic_clip if args.clip == "synthetic" else shapes_clip
    try:
      clip = make(args.frames, args.size, args.seed)
    except ImportError:  # The data package is not importable: fall back to drawn shapes.
      clip = shapes_clip(args.frames, args.size, args.seed)
    spec = MergingSpec(target_compression_ratio=args.ratio, schedule=args.schedule)
    enc = VideoEncoder(hidden_size=128, num_layers=4, num_heads=4, mlp_dim=256,
                       tubelet_size=tub, token_merging=spec)
    x = jnp.asarray(clip[None])
    variables = enc.init(jax.random.key(args.seed), x)
    out = jax.jit(enc.apply)(variables, x)
    ids, sizes = np.asarray(out["assignment"])[0], np.asarray(out["sizes"])[0]
    motion = np.asarray(out["motion"])[0]
    title = (f"{args.clip} clip, random-init encoder (ratio {args.ratio}, {args.schedule})")
  flow = np.asarray(jax.jit(optical_flow)(x))[0]
  _, fused = token_saliency(x, tub, spec.pixel_weights, return_maps=True)
  fused = np.asarray(fused)[0]

  gt, gh, gw = args.frames // tub[0], args.size // tub[1], args.size // tub[2]
  ids = ids.reshape(gt, gh, gw)
  n, n_final = gt * gh * gw, int((sizes > 0).sum())
  max_mag = float(np.percentile(np.linalg.norm(flow, axis=-1), 99.5))
  rows = ["frame", "merged groups", "optical flow (raw)", "saliency"]
  if motion is not None:
    rows.append("motion per token")
    motion = motion.reshape(gt, gh, gw)
  fig, axes = plt.subplots(len(rows), gt, figsize=(1.6 * gt, 1.7 * len(rows)), squeeze=False)
  for t in range(gt):
    f = t * tub[0]
    panels = [clip[f], group_overlay(clip[f], ids[t], sizes, tub),
              flow_to_rgb(flow[min(f, len(flow) - 1)], max_mag), fused[t]]
    if motion is not None:
      panels.append(motion[t])
    for r, img in enumerate(panels):
      ax = axes[r, t]
      ax.imshow(img, cmap="magma" if img.ndim == 2 else None, vmin=0, vmax=1 if img.ndim == 2
                and img.dtype != np.uint8 else None, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if t == 0:
        ax.set_ylabel(rows[r], fontsize=8)
    axes[0, t].set_title(f"step {t}", fontsize=8)
  fig.suptitle(f"{title}: {args.frames}x{args.size}x{args.size}, tubelet {tub}, "
               f"{n} -> {n_final} tokens; flow max {max_mag:.1f} px", fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=110)
  print(f"wrote {args.out}: {n} -> {n_final} tokens, largest group {int(sizes.max())}")


if __name__ == "__main__":
  main()
