"""Encoder forward throughput with adaptive token merging against without, in one run, and
the cost of the optical flow + saliency that steer it.

    python tools/benchmark_merging.py --out benchmarks/merging

Defaults: 32 frames of 224 x 224 with (1, 16, 16) tubelets (32 x 196 = 6272 tokens), a
ViT-B-sized encoder (width 768, 12 layers, 12 heads, MLP 3072, full attention, float32),
batch 1, merging at target_compression_ratio 0.5 with the "decreasing" schedule. Timed:
  baseline          VideoEncoder without merging.
  merged            with merging, flow and saliency included (what training runs).
  merged_tome_only  merging by similarity only (no flow, no saliency): the merge overhead.
  flow_saliency     `VideoEncoder.importance` alone (flow + pixel saliency of the clip).
Each function is compiled first, then run `--repeats` times in interleaved rounds (so load
from other processes hits all of them alike); medians and minima are reported (on a shared
machine the minimum is the better estimate of the uncontended time). Writes
`<out>/<tag>.json` and `<out>/<tag>.md` and prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hvlm_jax.models.encoder import VideoEncoder  # noqa: E402
from hvlm_jax.models.token_merging import MergingSpec, merge_schedule  # noqa: E402


def moving_clip(batch: int, frames: int, size: int, seed: int = 0) -> np.ndarray:
  """(B, T, S, S, 3) uint8: blotchy background, a square moving right, a static disc."""
  rng = np.random.default_rng(seed)
  cells = max(size // 16, 1)
  bg = np.kron(rng.uniform(60, 160, (size // cells + 1, size // cells + 1, 3)),
               np.ones((cells, cells, 1)))[:size, :size]
  yy, xx = np.mgrid[0:size, 0:size]
  disc = np.hypot(yy - 0.7 * size, xx - 0.7 * size) < size / 8
  out = np.empty((batch, frames, size, size, 3), np.uint8)
  for t in range(frames):
    img = bg.copy()
    x0 = size // 8 + t * size // (2 * frames)
    img[size // 4:size // 2, x0:x0 + size // 4] = (230, 40, 40)
    img[disc] = (40, 80, 240)
    out[:, t] = np.clip(img, 0, 255).astype(np.uint8)
  return out


def timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--frames", type=int, default=32)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--tubelet", default="1,16,16")
  p.add_argument("--width", type=int, default=768)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--mlp", type=int, default=3072)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--ratio", type=float, default=0.5)
  p.add_argument("--schedule", default="decreasing")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--flow-cells", type=int, default=MergingSpec.flow_cells_per_token,
                 help="model.token_merging.flow.cells_per_token")
  p.add_argument("--functions", default="baseline,merged,merged_tome_only,flow_saliency",
                 help="comma-separated subset to time")
  p.add_argument("--out", default="benchmarks/merging")
  p.add_argument("--tag", default="")
  args = p.parse_args(argv)
  tub = tuple(int(v) for v in args.tubelet.split(","))
  n = (args.frames // tub[0]) * (args.size // tub[1]) * (args.size // tub[2])
  tag = args.tag or f"encoder_{args.frames}x{args.size}_t{tub[0]}_w{args.width}_l{args.layers}"

  spec = MergingSpec(target_compression_ratio=args.ratio, schedule=args.schedule,
                     flow_cells_per_token=args.flow_cells)
  wanted = args.functions.split(",")
  tome = dataclasses.replace(spec, motion_source="none", saliency_weights=())
  common = dict(hidden_size=args.width, num_layers=args.layers, num_heads=args.heads,
                mlp_dim=args.mlp, tubelet_size=tub)
  encoders = {"baseline": VideoEncoder(**common), "merged": VideoEncoder(**common,
                                                                         token_merging=spec),
              "merged_tome_only": VideoEncoder(**common, token_merging=tome)}
  clip = jnp.asarray(moving_clip(args.batch, args.frames, args.size))
  variables = None
  if set(wanted) - {"flow_saliency"}:  # Every encoder shares these parameters.
    variables = jax.jit(encoders["baseline"].init)(jax.random.key(0), clip)

  fns = {}
  for name, enc in encoders.items():
    fns[name] = jax.jit(lambda v, x, enc=enc: (
        lambda o: (o["tokens"], o["time_features"]))(enc.apply(v, x)))
  importance = jax.jit(lambda x: encoders["merged"].apply({}, x,
                                                          method=VideoEncoder.importance))
  calls = {name: (fn, variables, clip) for name, fn in fns.items()}
  calls["flow_saliency"] = (importance, clip)
  calls = {k: v for k, v in calls.items() if k in wanted}

  compile_s = {}
  for name, (fn, *a) in calls.items():
    compile_s[name] = timed(fn, *a)  # First call: compile + one run.
    print(f"compiled {name} in {compile_s[name]:.1f} s", flush=True)
  runs = {name: [] for name in calls}
  for _ in range(args.repeats):
    for name, (fn, *a) in calls.items():
      runs[name].append(timed(fn, *a))
  med = {name: statistics.median(v) for name, v in runs.items()}
  best = {name: min(v) for name, v in runs.items()}

  rs = merge_schedule(n, args.layers, args.ratio, args.schedule, spec.protect_fraction)
  per_layer = [int(v) for v in n - np.cumsum(rs)]
  quotient = lambda a, b, d=med: d[a] / d[b] if a in d and b in d else None  # noqa: E731
  result = dict(
      command="python tools/benchmark_merging.py " + " ".join(argv or sys.argv[1:]),
      device=f"{jax.devices()[0].device_kind} x{jax.device_count()} "
             f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"load {os.getloadavg()[0]:.1f} at the end)",
      jax=jax.__version__, tokens=n, tokens_per_layer=per_layer,
      mean_tokens_per_layer=float(np.mean(per_layer)), batch=args.batch,
      encoder=common | dict(tubelet_size=list(tub)), merging=dataclasses.asdict(spec),
      seconds_median=med, seconds_min=best, seconds_all=runs,
      compile_and_first_run_s=compile_s,
      speedup_merged=quotient("baseline", "merged"),
      speedup_merged_min=quotient("baseline", "merged", best),
      speedup_tome_only=quotient("baseline", "merged_tome_only"),
      flow_saliency_share_of_merged=quotient("flow_saliency", "merged"),
      flow_saliency_share_of_baseline=quotient("flow_saliency", "baseline"),
      clips_per_s=dict((k, args.batch / v) for k, v in med.items() if k != "flow_saliency"))
  lines = [
      f"# Token merging benchmark: {tag}", "",
      f"`{result['command']}`", "",
      f"Device: {result['device']}; jax {jax.__version__}; batch {args.batch}; "
      f"{n} tokens -> per layer {per_layer} (mean {np.mean(per_layer):.0f}).", "",
      "| function | median s | min s | clips/s (median) | runs (s) |", "|---|---|---|---|---|"]
  for name in calls:
    cps = f"{args.batch / med[name]:.3f}" if name != "flow_saliency" else "-"
    lines.append(f"| {name} | {med[name]:.3f} | {best[name]:.3f} | {cps} | "
                 f"{', '.join(f'{v:.2f}' for v in runs[name])} |")
  lines.append("")
  if result["speedup_merged"]:
    lines.append(f"- speedup with merging (flow + saliency included): "
                 f"**{result['speedup_merged']:.2f}x** on medians, "
                 f"{result['speedup_merged_min']:.2f}x on minima (target >= 1.8x)")
  if result["speedup_tome_only"]:
    lines.append(f"- speedup, similarity-only merging: {result['speedup_tome_only']:.2f}x")
  if result["flow_saliency_share_of_merged"]:
    lines.append(f"- flow + saliency: **{100 * result['flow_saliency_share_of_merged']:.1f}%** "
                 f"of the merged encoder time, "
                 f"{100 * result['flow_saliency_share_of_baseline']:.1f}% of the baseline "
                 f"(target < 10%)")
  lines.append(f"- flow cells_per_token {spec.flow_cells_per_token} (flow on "
               f"{(args.size // tub[1]) * spec.flow_cells_per_token} px frames), saliency "
               f"cells_per_token {spec.saliency_cells_per_token}")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, tag + ".json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, tag + ".md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
