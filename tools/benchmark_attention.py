"""Every attention variant against full attention, in one run: time, compiled memory, FLOPs.

    python tools/benchmark_attention.py --out benchmarks/attention
    python tools/benchmark_attention.py --lengths=1568,6272 --variants=full,linear --repeats=1

One layer (projections included) at width 768 and 12 heads, batch 1, float32, each type
with its config defaults (configs/base.py), at 1568 / 6272 / 25088 tokens (8 / 32 / 128
frames of 14 x 14 patches). Per (variant, length):
  fwd_s, fwdbwd_s      median wall time of the jitted forward and of value_and_grad w.r.t.
                       parameters and input (compiled, one warm-up run, then `--repeats`
                       timed runs; one variant at a time, so only its buffers are alive).
  *_cpu_s              median CPU time of this process (all threads) over the same runs:
                       the work done, much less sensitive than wall time to other jobs on a
                       shared machine. Speedups are reported on both.
  fwd_mb, fwdbwd_mb    compiled temporary memory (`memory_analysis().temp_size_in_bytes`).
  xla_gflops_*         `cost_analysis()["flops"]`. XLA counts a loop body once, so variants
                       built on lax.scan / lax.map (blocked, kernel, mamba) are undercounted.
  model_gflops_fwd     analytic matmul (and scan) FLOPs of the forward (hvlm_jax.train.perf.
                       attention_flops); fwd+bwd counts 3x.
  gflops_cpu_*         model GFLOP per CPU-second (fwd; fwd+bwd with 3x the FLOPs), and
  matmul_frac_*        that rate as a fraction of the dense float32 matmul rate measured at
                       the start of the same run, also per CPU-second (meta.matmul_*): near 1
                       is matmul-bound, far below is memory- or loop-bound.
  bwd_over_fwd_cpu     (fwd+bwd - fwd) / fwd CPU time: a backward normally costs ~2x.
  speedup_*, mem_ratio_*  full's time / the variant's, the variant's memory / full's.
  load1, load5, load15 the machine's load averages (uptime) when the row was measured.
Full attention whose compiled temporaries exceed `--max_memory_fraction` of the available
RAM is compiled (memory and FLOPs are exact) but not run: its time is extrapolated from the
largest measured length by the N^2 law and marked `estimated`. Writes <out>/results.csv,
results.json, results.md and attention.png.
"""
from __future__ import annotations

import csv
import gc
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import base  # noqa: E402
from hvlm_jax.models import attention  # noqa: E402
from hvlm_jax.train import perf  # noqa: E402

_OUT = flags.DEFINE_string("out", "benchmarks/attention", "Output directory.")
_LENGTHS = flags.DEFINE_list("lengths", ["1568", "6272", "25088"], "Token counts.")
_VARIANTS = flags.DEFINE_list("variants", sorted(attention.REGISTRY), "Attention types.")
_WIDTH = flags.DEFINE_integer("width", 768, "Model width D.")
_HEADS = flags.DEFINE_integer("heads", 12, "Attention heads.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per measurement (median).")
_RESUME = flags.DEFINE_bool("resume", False, "Reuse rows of an interrupted run in --out.")
_MAX_MEM = flags.DEFINE_float("max_memory_fraction", 0.5,
                              "Skip running programs whose temporaries exceed this share of "
                              "MemAvailable.")


def options(name: str) -> dict:
  """The type's options from configs/base.py (what `model.attention.type=name` trains with)."""
  # Frame-relative options (0, "frame") resolved for 224 px frames of 16 px patches.
  return attention.resolve_frame_options(
      name, dict(base.get_config().model.attention.get(name, {})), 196)


def model_gflops(name: str, n: int, d: int, h: int, opts: dict) -> float:
  """Analytic forward GFLOPs (2 per multiply-add) of one layer, projections included."""
  return perf.attention_flops(name, n, d, h, opts) / 1e9


def matmul_rate(size: int = 2048, repeats: int = 3) -> dict:
  """Dense float32 (size^2 @ size^2) matmul rate, GFLOP per wall second and per CPU-second."""
  gflops = perf.measure_matmul_rate(size, repeats)  # Wall rate, also compiles and warms up.
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, a))
  c = time.process_time()
  for _ in range(repeats):
    jax.block_until_ready(matmul(a, a))
  cpu = (time.process_time() - c) / repeats
  return dict(matmul_gflops=gflops, matmul_gflops_cpu=2 * size ** 3 / cpu / 1e9)


def available_bytes() -> int:
  with open("/proc/meminfo") as fh:
    for line in fh:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return 0


def build(name: str, n: int):
  """Compiled forward and fwd+bwd for (1, n, D), with params and inputs on the device."""
  d = _WIDTH.value
  module = attention.get(name)(num_heads=_HEADS.value, **options(name))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, n, d)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(1, n, d)), jnp.float32)
  params = module.init({"params": jax.random.key(0), "features": jax.random.key(1)},
                       x[:, :min(n, 256)])  # Parameter shapes do not depend on N.
  fwd = jax.jit(lambda p, x: module.apply(p, x))
  grad = jax.jit(jax.value_and_grad(lambda p, x, ct: jnp.sum(module.apply(p, x) * ct),
                                    argnums=(0, 1)))
  t = time.time()
  fwd_c = fwd.lower(params, x).compile()
  grad_c = grad.lower(params, x, ct).compile()
  stats = dict(compile_s=time.time() - t)
  for tag, c in (("fwd", fwd_c), ("fwdbwd", grad_c)):
    stats[f"{tag}_mb"] = c.memory_analysis().temp_size_in_bytes / 2 ** 20
    cost = c.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    stats[f"xla_gflops_{tag}"] = cost.get("flops", float("nan")) / 1e9
  stats["model_gflops_fwd"] = model_gflops(name, n, d, _HEADS.value, options(name))
  runs = dict(fwd=lambda: fwd_c(params, x), fwdbwd=lambda: grad_c(params, x, ct))
  return stats, runs


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  lengths = [int(n) for n in _LENGTHS.value]
  names = ["full"] + [v for v in _VARIANTS.value if v != "full"]
  # Rows are appended to partial.jsonl as they come, so a run killed (e.g. by the OOM killer
  # on a shared machine) resumes where it stopped with --resume.
  partial = os.path.join(_OUT.value, "partial.jsonl")
  done = {}
  if _RESUME.value and os.path.exists(partial):
    with open(partial) as fh:
      done = {(r["variant"], r["tokens"]): r for r in map(json.loads, fh)}
  elif os.path.exists(partial):
    os.remove(partial)
  rate = matmul_rate()
  print(f"dense f32 matmul: {rate['matmul_gflops']:.0f} GFLOP/s wall, "
        f"{rate['matmul_gflops_cpu']:.0f} GFLOP per CPU-second", flush=True)
  rows = []
  for n in lengths:
    for name in names:
      row = done.get((name, n)) or measure(name, n)
      if (name, n) not in done:
        with open(partial, "a") as fh:
          fh.write(json.dumps(row) + "\n")
      rows.append(row)
      gc.collect()
  finish(rows, lengths, rate)


def measure(name: str, n: int) -> dict:
  """Compiles, then (if it fits) warms up and times one variant at one length."""
  stats, runs = build(name, n)
  nan = float("nan")
  row = dict(variant=name, tokens=n, frames=n // 196, **stats, fwd_s=nan, fwdbwd_s=nan,
             fwd_cpu_s=nan, fwdbwd_cpu_s=nan, estimated=False, note="",
             **dict(zip(("load1", "load5", "load15"), os.getloadavg())))
  need = max(stats["fwd_mb"], stats["fwdbwd_mb"]) * 2 ** 20
  if need > _MAX_MEM.value * available_bytes():
    row["note"] = (f"not run: needs {need / 2 ** 30:.1f} GiB of temporaries, "
                   f"{available_bytes() / 2 ** 30:.1f} GiB available")
  else:
    for tag, run in runs.items():
      jax.block_until_ready(run())  # Warm-up: first-run allocations.
      wall, cpu = [], []
      for _ in range(_REPEATS.value):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(run())
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
      row[f"{tag}_s"] = statistics.median(wall)
      row[f"{tag}_cpu_s"] = statistics.median(cpu)
  print(f"[{n}] {name}: fwd {row['fwd_s']:.3f}s fwd+bwd {row['fwdbwd_s']:.3f}s (CPU "
        f"{row['fwd_cpu_s']:.2f} / {row['fwdbwd_cpu_s']:.2f}s), temp {stats['fwd_mb']:.0f} / "
        f"{stats['fwdbwd_mb']:.0f} MiB, load {row['load1']:.1f} "
        f"{row['note']}", flush=True)
  return row


def finish(rows, lengths, rate):
  """Estimates skipped full-attention times, adds ratios, writes CSV / JSON / MD / PNG."""
  full = {r["tokens"]: r for r in rows if r["variant"] == "full"}
  measured = [n for n in lengths if n in full and not math.isnan(full[n]["fwd_s"])]
  for n, r in full.items():
    if math.isnan(r["fwd_s"]) and measured:
      ref = full[max(measured)]
      for key in ("fwd_s", "fwdbwd_s", "fwd_cpu_s", "fwdbwd_cpu_s"):
        r[key] = ref[key] * (n / ref["tokens"]) ** 2
      r["estimated"] = True
      r["note"] += f"; time estimated as N^2 from {ref['tokens']} tokens"
  for r in rows:
    f = full.get(r["tokens"])
    r["bwd_over_fwd_cpu"] = (r["fwdbwd_cpu_s"] - r["fwd_cpu_s"]) / r["fwd_cpu_s"]
    for tag, mult in (("fwd", 1), ("fwdbwd", 3)):
      r[f"gflops_cpu_{tag}"] = mult * r["model_gflops_fwd"] / r[f"{tag}_cpu_s"]
      r[f"matmul_frac_{tag}"] = r[f"gflops_cpu_{tag}"] / rate["matmul_gflops_cpu"]
    for tag in ("fwd", "fwdbwd"):
      r[f"speedup_{tag}"] = f[f"{tag}_s"] / r[f"{tag}_s"] if f else float("nan")
      r[f"cpu_speedup_{tag}"] = f[f"{tag}_cpu_s"] / r[f"{tag}_cpu_s"] if f else float("nan")
      r[f"mem_ratio_{tag}"] = r[f"{tag}_mb"] / f[f"{tag}_mb"] if f else float("nan")
  by = {(r["variant"], r["tokens"]): r for r in rows}
  if len(lengths) > 1:
    for r in rows:
      lo, hi = by.get((r["variant"], lengths[-2])), by.get((r["variant"], lengths[-1]))
      r["growth_fwdbwd_last"] = hi["fwdbwd_s"] / lo["fwdbwd_s"] if lo and hi else float("nan")
      r["cpu_growth_fwdbwd_last"] = (hi["fwdbwd_cpu_s"] / lo["fwdbwd_cpu_s"] if lo and hi
                                     else float("nan"))
  out = _OUT.value
  keys = list(rows[0].keys())
  with open(os.path.join(out, "results.csv"), "w", newline="") as fh:
    writer = csv.DictWriter(fh, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
  meta = dict(device=str(jax.devices()[0]), cpus=os.cpu_count(), width=_WIDTH.value,
              note="Timings on a CPU shared with other jobs; load1/5/15 are its load averages.",
              heads=_HEADS.value, batch=1, dtype="float32", repeats=_REPEATS.value, **rate,
              command=" ".join(sys.argv), options={n: options(n) for n in _VARIANTS.value})
  with open(os.path.join(out, "results.json"), "w") as fh:
    json.dump(dict(meta=meta, rows=rows), fh, indent=1, default=str)
  table = markdown(rows, lengths, rate)
  with open(os.path.join(out, "results.md"), "w") as fh:
    fh.write(table)
  print(table)
  plot(rows, os.path.join(out, "attention.png"))


def markdown(rows, lengths, rate) -> str:
  head = (f"Dense f32 matmul in this run: {rate['matmul_gflops']:.0f} GFLOP/s wall, "
          f"{rate['matmul_gflops_cpu']:.0f} GFLOP per CPU-second. CPU time is the primary "
          "measure; GFLOP/CPU-s uses model FLOPs (fwd+bwd = 3x fwd).\n\n"
          "| variant | tokens | fwd CPU s | fwd+bwd CPU s | bwd / fwd (CPU) | "
          "speedup fwd / fwd+bwd (CPU) | fwd s | fwd+bwd s | speedup fwd / fwd+bwd (wall) | "
          "GFLOP/CPU-s fwd / fwd+bwd | of matmul rate fwd / fwd+bwd | fwd MiB | fwd+bwd MiB | "
          "mem ratio fwd / fwd+bwd | model GFLOP fwd | XLA GFLOP fwd | load 1/5/15 | note |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
  lines = []
  for r in sorted(rows, key=lambda r: (r["tokens"], r["variant"] != "full", r["variant"])):
    est = " (est.)" if r["estimated"] else ""
    lines.append(
        f"| {r['variant']} | {r['tokens']} | {r['fwd_cpu_s']:.2f}{est} | "
        f"{r['fwdbwd_cpu_s']:.2f}{est} | {r['bwd_over_fwd_cpu']:.1f}x | "
        f"{r['cpu_speedup_fwd']:.1f}x / {r['cpu_speedup_fwdbwd']:.1f}x | "
        f"{r['fwd_s']:.3f}{est} | {r['fwdbwd_s']:.3f}{est} | "
        f"{r['speedup_fwd']:.1f}x / {r['speedup_fwdbwd']:.1f}x | "
        f"{r['gflops_cpu_fwd']:.0f} / {r['gflops_cpu_fwdbwd']:.0f} | "
        f"{r['matmul_frac_fwd']:.0%} / {r['matmul_frac_fwdbwd']:.0%} | "
        f"{r['fwd_mb']:.0f} | {r['fwdbwd_mb']:.0f} | "
        f"{r['mem_ratio_fwd']:.3f} / {r['mem_ratio_fwdbwd']:.3f} | "
        f"{r['model_gflops_fwd']:.1f} | {r['xla_gflops_fwd']:.1f} | "
        f"{r['load1']:.1f} / {r['load5']:.1f} / {r['load15']:.1f} | {r['note'].strip('; ')} |")
  growth = ""
  if len(lengths) > 1:
    growth = (f"\nfwd+bwd growth {lengths[-2]} -> {lengths[-1]} tokens (CPU / wall): " +
              ", ".join(f"{r['variant']} {r['cpu_growth_fwdbwd_last']:.2f}x / "
                        f"{r['growth_fwdbwd_last']:.2f}x"
                        for r in rows if r["tokens"] == lengths[-1]) + "\n")
  return head + "\n".join(lines) + "\n" + growth


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
  variants = sorted({r["variant"] for r in rows}, key=lambda v: (v != "full", v))
  for v in variants:
    rs = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["tokens"])
    n = [r["tokens"] for r in rs]
    style = dict(marker="o", lw=2.5 if v == "full" else 1.5, color="k" if v == "full" else None)
    for ax, key in zip(axes, ("fwd_s", "fwdbwd_s", "fwdbwd_cpu_s", "fwdbwd_mb")):
      line, = ax.plot(n, [r[key] for r in rs], label=v, **style)
      est = [(r["tokens"], r[key]) for r in rs if r["estimated"] and key.endswith("_s")]
      if est:
        ax.plot(*zip(*est), "x", ms=12, color=line.get_color())
  titles = ("forward wall time (s)", "forward+backward wall time (s)",
            "forward+backward CPU time (s)", "fwd+bwd compiled temp (MiB)")
  lengths = sorted({r["tokens"] for r in rows})
  for ax, title in zip(axes, titles):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("tokens")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"One attention layer, D={_WIDTH.value}, {_HEADS.value} heads, batch 1, "
               f"{jax.devices()[0].platform} (x: full attention time estimated as N^2)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  app.run(main)
