"""Optical-flow accuracy on textures with known motion, against OpenCV Farneback.

    python tools/benchmark_flow.py [--out benchmarks/flow] [--tag results] [--opt key=value ...]

Frames are crops of an analytic texture defined everywhere (a sum of 24 plane waves), so
content really enters and leaves the frame under a shift, a rotation or a zoom, and the true
flow is known at every pixel (convention: frame1(p + flow(p)) = frame0(p)). Frames are grey
uint8 (96 x 96); both methods see the same frames. Cases:
  shift  the 8 shifts of tests/test_flow.py (0.3 to 8.5 px); a pan is a shift.
  rotate 3 degrees about the centre.
  zoom   scale 1.04 about the centre (corners move 1.9 px).
  object a textured 32 px square moving (3, 1) px over a static textured background (the
         error is dominated by the smear of flow across the object's boundary).
  noise  shifts (1, 0), (2.5, 1.7), (-4, 3) with Gaussian noise of std 1% or 2% of the range
         added to each frame independently (before rounding to uint8).
Per case: EPE (mean endpoint error, px) over the whole frame (border included, no margin),
inside a 16 px margin ("interior"), and in the first and last columns and rows ("edge").
OpenCV: `cv2.calcOpticalFlowFarneback(prev, next, None, 0.5, 3, 15, 3, 5, 1.2, 0)`.
`--opt key=value` passes options to `flow.flow_pairs` (values parsed as Python literals).

`--motion SEEDS` adds the motion-importance study: 64 x 64 clips of 8 frames filmed with
`hvlm_jax.data.footage` (textured world, 1% noise, JPEG quality 50), the camera panning
0, 1, 2 or 4 px per frame (the background moves -pan in the frame) while a flat red square
moves +3 px per frame; tokens (2, 8, 8), `token_motion` with MergingSpec()'s options, the
top 10% protected (`protect_top`). Reported: the share of protected tokens on the square
(mean and min over SEEDS scenes), with and without camera compensation.
Writes `<out>/<tag>.json` and prints the tables.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hvlm_jax.models.token_merging import flow  # noqa: E402

SIZE, MARGIN = 96, 16
SHIFTS = [(0.3, -0.2), (1.0, 0.0), (2.5, 1.7), (-4.0, 3.0), (5.6, -5.6), (8.0, 0.0),
          (0.0, -8.0), (-6.3, -4.9)]
NOISY_SHIFTS = [(1.0, 0.0), (2.5, 1.7), (-4.0, 3.0)]


def texture(x, y, seed=0):
  """Smooth aperiodic texture in [0.05, 0.95], defined for any real coordinates."""
  r = np.random.RandomState(seed)
  out = np.zeros_like(x)
  for _ in range(24):
    k = 2 * np.pi / r.uniform(6, 40)
    th, ph = r.uniform(0, np.pi), r.uniform(0, 2 * np.pi)
    out += r.uniform(0.5, 1) * np.sin(k * (np.cos(th) * x + np.sin(th) * y) + ph)
  return 0.5 + 0.45 * out / 10.0


def linear_motion_pair(matrix, size=SIZE, seed=0):
  """Frames and flow for frame1(c + M (p - c)) = frame0(p): flow(p) = (M - I)(p - c)."""
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
  c = (size - 1) / 2
  q = np.stack([xs - c, ys - c])
  src = np.einsum("ij,jhw->ihw", np.linalg.inv(matrix), q) + c  # frame1(p) = frame0(M^-1..)
  moved = np.einsum("ij,jhw->ihw", matrix, q) + c
  return (texture(xs, ys, seed), texture(src[0], src[1], seed),
          np.stack([moved[0] - xs, moved[1] - ys], -1))


def make_cases(size=SIZE):
  """name -> (frame0, frame1, flow) float64 frames in [0, 1], flow (H, W, 2)."""
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
  cases = {}
  for dx, dy in SHIFTS:
    cases[f"shift({dx:g},{dy:g})"] = (texture(xs, ys), texture(xs - dx, ys - dy),
                                      np.broadcast_to(np.array([dx, dy]), (size, size, 2)))
  a = np.deg2rad(3.0)
  cases["rotate3deg"] = linear_motion_pair(np.array([[np.cos(a), -np.sin(a)],
                                                     [np.sin(a), np.cos(a)]]), size)
  cases["zoom1.04"] = linear_motion_pair(1.04 * np.eye(2), size)
  # A textured 32 px square moving (3, 1) over a static background: boundary smear.
  inside = lambda x, y: (x >= 32) & (x < 64) & (y >= 32) & (y < 64)  # noqa: E731
  obj0, obj1 = texture(xs, ys, 1), texture(xs - 3, ys - 1, 1)
  bg = texture(xs, ys)
  cases["object(3,1)"] = (np.where(inside(xs, ys), obj0, bg),
                          np.where(inside(xs - 3, ys - 1), obj1, bg),
                          np.where(inside(xs, ys)[..., None], np.array([3.0, 1.0]), 0.0))
  rng = np.random.RandomState(7)
  for level in (0.01, 0.02):
    for dx, dy in NOISY_SHIFTS:
      f0, f1, truth = cases[f"shift({dx:g},{dy:g})"]
      cases[f"noise{level:g}_shift({dx:g},{dy:g})"] = (
          f0 + level * rng.randn(*f0.shape), f1 + level * rng.randn(*f1.shape), truth)
  return {k: (to_uint8(a), to_uint8(b), t) for k, (a, b, t) in cases.items()}


def to_uint8(x):
  return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def errors(estimate, truth):
  e = np.linalg.norm(estimate - truth, axis=-1)
  edge = np.concatenate([e[0], e[-1], e[:, 0], e[:, -1]])
  return dict(whole=float(e.mean()), interior=float(e[MARGIN:-MARGIN, MARGIN:-MARGIN].mean()),
              edge=float(edge.mean()), max=float(e.max()))


def ours(cases, **options):
  prev = jnp.asarray(np.stack([c[0] for c in cases.values()]), jnp.float32) / 255.0
  nxt = jnp.asarray(np.stack([c[1] for c in cases.values()]), jnp.float32) / 255.0
  est = np.asarray(jax.jit(lambda p, q: flow.flow_pairs(p, q, **options))(prev, nxt))
  return {k: errors(e, c[2]) for (k, c), e in zip(cases.items(), est)}


def opencv(cases):
  import cv2  # Test-only reference (requirements-test.txt); the runtime never imports it.
  out = {}
  for k, (a, b, truth) in cases.items():
    est = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    out[k] = errors(est.astype(np.float64), truth)
  return out


def summary(res):
  """Group means: the figures the targets name."""
  pick = lambda pre: [v for k, v in res.items() if k.startswith(pre)]  # noqa: E731
  out = {}
  for group in ("shift", "rotate", "zoom", "object", "noise0.01", "noise0.02"):
    rows = pick(group)
    out[group] = {m: float(np.mean([r[m] for r in rows])) for m in ("whole", "interior", "edge")}
  return out


def motion_study(seeds: int) -> dict:
  from hvlm_jax.data import footage, synthetic
  from hvlm_jax.models.token_merging import MergingSpec
  from hvlm_jax.models.token_merging.merging import protect_top
  frame, t_len, tub, speed = 64, 8, (2, 8, 8), 3.0
  spec = MergingSpec()

  def scene(pan, seed):
    rng = np.random.default_rng(seed)
    opts = footage.validate(dict(pan=(pan, 0.0), texture=28.0, noise=0.01, quality=50))
    margin = footage.world_margin(frame, t_len, opts)
    world = frame + 2 * margin
    bg = np.clip(synthetic.background(rng, "general", world)
                 + footage.texture(rng, world, opts["texture"])[..., None], 0, 255)
    x0, y0, half = rng.uniform(12, 24), rng.uniform(14, 50), 8.0
    worlds = [bg * (1 - c) + np.array([230.0, 35.0, 35.0]) * c for c in (
        synthetic.shape_coverage("square", margin + x0 + (speed + pan) * t, margin + y0,
                                 half / 0.85, world)[..., None] for t in range(t_len))]
    on = np.zeros((t_len // tub[0], frame // tub[1], frame // tub[2]), bool)
    cells = np.arange(frame // tub[1]) * tub[1]
    for st in range(on.shape[0]):
      for f in range(st * tub[0], min(st * tub[0] + tub[0], t_len - 1) + 1):
        x = x0 + speed * f
        on[st] |= (((cells + tub[1] > y0 - half) & (cells < y0 + half))[:, None]
                   & ((cells + tub[2] > x - half) & (cells < x + half))[None])
    return footage.shoot(np.stack(worlds), frame, opts, rng), on.reshape(-1)

  out = {}
  for pan in (0.0, 1.0, 2.0, 4.0):
    shots = [scene(pan, seed) for seed in range(seeds)]
    clips = jnp.asarray(np.stack([c for c, _ in shots]))
    on = np.stack([o for _, o in shots])
    for comp in (True, False):
      m = flow.token_motion(clips, tub, cells_per_token=spec.flow_cells_per_token,
                            min_motion=spec.min_motion,
                            flow_options=dict(spec.flow_options, camera_compensation=comp))
      prot = np.asarray(protect_top(m, spec.protect_fraction))
      share = (prot & on).sum(1) / prot.sum(1)
      out[f"pan{pan:g}_compensation_{'on' if comp else 'off'}"] = dict(
          mean=float(share.mean()), min=float(share.min()))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="benchmarks/flow")
  ap.add_argument("--tag", default="results")
  ap.add_argument("--opt", action="append", default=[], help="flow_pairs option key=value")
  ap.add_argument("--motion", type=int, default=0, help="scenes per pan in the motion study")
  ap.add_argument("--no-write", action="store_true")
  args = ap.parse_args()
  options = {k: ast.literal_eval(v) for k, v in (o.split("=", 1) for o in args.opt)}
  cases = make_cases()
  res = {"ours": ours(cases, **options), "opencv": opencv(cases)}
  print(f"options: {options or 'defaults'}")
  print(f"{'case':28s} | {'ours whole':>10s} {'interior':>9s} {'edge':>7s} | "
        f"{'cv whole':>9s} {'interior':>9s} {'edge':>7s} | ratio whole")
  for k in cases:
    o, c = res["ours"][k], res["opencv"][k]
    print(f"{k:28s} | {o['whole']:10.4f} {o['interior']:9.4f} {o['edge']:7.3f} | "
          f"{c['whole']:9.4f} {c['interior']:9.4f} {c['edge']:7.3f} | "
          f"{o['whole'] / c['whole']:6.2f}")
  res["summary"] = {m: summary(res[m]) for m in ("ours", "opencv")}
  for g, o in res["summary"]["ours"].items():
    c = res["summary"]["opencv"][g]
    print(f"mean {g:23s} | {o['whole']:10.4f} {o['interior']:9.4f} {o['edge']:7.3f} | "
          f"{c['whole']:9.4f} {c['interior']:9.4f} {c['edge']:7.3f} | "
          f"{o['whole'] / c['whole']:6.2f}")
  res["options"] = {k: repr(v) for k, v in options.items()}
  if args.motion:
    res["motion"] = motion_study(args.motion)
    print(f"\nprotected (top 10%) tokens on the moving square, {args.motion} scenes per pan")
    for k, v in res["motion"].items():
      print(f"{k:28s} | mean {v['mean']:.2f}  min {v['min']:.2f}")
  if not args.no_write:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
