"""One accelerator check: fused kernels against XLA, attention at 6272 / 25088 tokens, and a
ViT-B train step (MFU, memory with and without remat and bfloat16). Under 5 minutes on one
GPU; `--smoke` runs the same code at tiny sizes on any machine (CPU: a self-check).

    python tools/device_check.py                 # Writes benchmarks/<device>/results.json.
    python tools/device_check.py --smoke --out=/tmp/check
    python tools/device_check.py --sections=train --dtypes=float32 --out=benchmarks/train/vit_b_cpu

Sections of results.json:
  kernels     max |fused - xla| of outputs and of q/k/v gradients for every kernel path the
              platform has (cuDNN on GPU in bfloat16; Pallas splash on TPU, or in interpret
              mode elsewhere), "skipped" with the reason otherwise.
  attention   one layer (width 768, 12 heads, batch 1; `--smoke`: 64 / 2) per (variant,
              implementation, dtype, tokens): median fwd+bwd seconds, compiled temporary MiB,
              model GFLOP/s (hvlm_jax.train.perf.attention_flops, fwd+bwd = 3x fwd). Programs
              whose temporaries exceed `--max_memory_fraction` of device memory are skipped.
  train       encoder train step (ViT-B: 12 x 768, batch 2, 8 x 224^2 clips, tubelet
              2 x 16 x 16, full attention; loss = mean square of the tokens, AdamW) for
              float32 / bfloat16 compute x remat off / on: step seconds, FLOPs
              (perf.train_step_flops), MFU against perf.peak_flops (CPU: against the
              matmul rate measured in the run), planned and device peak memory.
  matmul      dense matmul GFLOP/s (float32 and bfloat16) measured in the same run.
"""
from __future__ import annotations

import json
import os
import re
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
from hvlm_jax.models.attention import kernels, sparse  # noqa: E402
from hvlm_jax.train import perf  # noqa: E402
from vit_b import vit_clips, vit_config, vit_train_step  # noqa: E402  (tools/vit_b.py)

_OUT = flags.DEFINE_string("out", "", "Output directory (default benchmarks/<device>).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes: a self-check on any machine.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median).")
_MAX_MEM = flags.DEFINE_float("max_memory_fraction", 0.8,
                              "Skip programs whose temporaries exceed this share of memory.")
_SECTIONS = flags.DEFINE_multi_enum("sections", ["kernels", "attention", "train"],
                                    ["kernels", "attention", "train"],
                                    "Sections to run (the matmul rate is always measured).")
_SCAN = flags.DEFINE_enum("scan_layers", "auto", ["auto", "true", "false"],
                          "config.model.scan_layers of the train step's encoder.")
_DTYPES = flags.DEFINE_multi_enum("dtypes", ["float32", "bfloat16"], ["float32", "bfloat16"],
                                  "Compute dtypes of the train section and the matmul probe.")


def device_name() -> str:
  device = jax.devices()[0]
  return re.sub(r"[^a-z0-9]+", "_", device.device_kind.lower()).strip("_") or device.platform


def memory_limit() -> float:
  """Bytes the device can hold (inf where it does not say, e.g. CPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats.get("bytes_limit", float("inf")))


def timed(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # Warm-up.
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    runs.append(time.perf_counter() - start)
  return statistics.median(runs)


def max_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----- kernels ------------------------------------------------------------------------------
def check_kernels(smoke: bool) -> dict:
  """Each fused path against its XLA twin: outputs and q/k/v gradients."""
  platform = jax.default_backend()
  n, h, dh, w = (256, 2, 64, 64) if smoke else (2048, 12, 64, 196)
  rng = np.random.default_rng(0)
  dtype = jnp.bfloat16 if platform == "gpu" else jnp.float32
  q, k, v = (jnp.asarray(rng.normal(size=(1, n, h, dh)), dtype) for _ in range(3))
  gi = sparse.frame_global_positions(n, w, 1)

  def compare(fused, xla):
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2)
    grad = lambda f: jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(q, k, v)
    return dict(out_max_diff=max_diff(jax.jit(fused)(q, k, v), jax.jit(xla)(q, k, v)),
                grad_max_diff=max_diff(grad(fused), grad(xla)), dtype=jnp.dtype(dtype).name)

  def dpa(impl):
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl)

  def local(impl):
    return lambda q, k, v: kernels.local_global_dense(q, k, v, window=w, global_idx=gi,
                                                      implementation=impl)

  blocked = lambda q, k, v: sparse.local_global_attention(q, k, v, window=w, global_idx=gi)
  checks = {
      "cudnn_full": lambda: compare(dpa("cudnn"), dpa("xla")),
      "cudnn_local_global": lambda: compare(local("cudnn"), blocked),
      "splash_full": lambda: compare(
          lambda q, k, v: kernels.splash_attention(q, k, v, "full"), dpa("xla")),
      "splash_local_global": lambda: compare(
          lambda q, k, v: kernels.splash_attention(q, k, v, "local_global", window=w,
                                                   tokens_per_frame=w, num_global=1), blocked),
  }
  results = {}
  for name, run in checks.items():
    if name.startswith("cudnn") and platform != "gpu":
      results[name] = dict(skipped=f"cuDNN needs an NVIDIA GPU; backend is {platform}")
    elif name.startswith("splash") and platform not in ("tpu", "cpu"):
      results[name] = dict(skipped=f"splash is a TPU kernel (interpret mode only tested on "
                                   f"CPU); backend is {platform}")
    else:
      try:
        results[name] = run()
      except Exception as e:  # noqa: BLE001 (a failing kernel is a finding, not a crash).
        results[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    print(f"kernels {name}: {results[name]}", flush=True)
  return results


# ----- attention ----------------------------------------------------------------------------
def attention_cases(smoke: bool, platform: str):
  """(variant, implementation, dtype) rows; cuDNN rows on GPU only."""
  cases = [("full", "xla", jnp.float32), ("local_global", "xla", jnp.float32),
           ("mamba", "xla", jnp.float32), ("performer", "xla", jnp.float32)]
  if platform == "gpu":
    cases += [("full", "xla", jnp.bfloat16), ("full", "cudnn", jnp.bfloat16),
              ("local_global", "cudnn", jnp.bfloat16)]
  return cases


def bench_attention(smoke: bool, repeats: int) -> list[dict]:
  width, heads = (64, 2) if smoke else (768, 12)
  lengths = (256, 1024) if smoke else (6272, 25088)
  rows = []
  for n in lengths:
    for name, impl, dtype in attention_cases(smoke, jax.default_backend()):
      opts = attention.resolve_frame_options(
          name, dict(base.get_config().model.attention.get(name, {})), 196 if not smoke else 64)
      kw = dict(opts, dtype=dtype)
      if name in ("full", "local_global"):
        kw["implementation"] = impl
      module = attention.get(name)(num_heads=heads, **kw)
      rng = np.random.default_rng(0)
      x = jnp.asarray(rng.normal(size=(1, n, width)), dtype)
      params = module.init({"params": jax.random.key(0), "features": jax.random.key(1)},
                           x[:, :min(n, 256)])
      loss = lambda p, x, module=module: jnp.sum(module.apply(p, x).astype(jnp.float32) ** 2)
      step = jax.jit(jax.grad(loss, argnums=(0, 1)))
      row = dict(variant=name, implementation=impl, dtype=jnp.dtype(dtype).name, tokens=n)
      try:
        compiled = step.lower(params, x).compile()
        row["temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
        if row["temp_mib"] * 2 ** 20 > _MAX_MEM.value * memory_limit():
          row["skipped"] = "temporaries exceed --max_memory_fraction of device memory"
        else:
          row["fwdbwd_s"] = timed(lambda c=compiled, p=params, x=x: c(p, x), repeats)
          flops = 3 * perf.attention_flops(name, n, width, heads, opts)
          row["model_gflops_per_s"] = flops / row["fwdbwd_s"] / 1e9
      except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(f"attention {row}", flush=True)
      rows.append(row)
  return rows


# ----- train step ---------------------------------------------------------------------------
def bench_train(smoke: bool, repeats: int, matmul: dict) -> list[dict]:
  """The train step per (dtype, remat). MFU uses the datasheet peak (perf.peak_flops); where
  there is none (CPU), the dense matmul rate measured in this run (`mfu_basis`)."""
  config, batch = vit_config(smoke, _SCAN.value), 2
  clips = vit_clips(config, batch)
  rows = []
  for dtype in [jnp.dtype(d) for d in _DTYPES.value]:
    for remat in (None, "nothing_saveable"):
      step, state = vit_train_step(config, clips, dtype=dtype, remat=remat)
      row = dict(dtype=jnp.dtype(dtype).name, remat=remat or "none", batch=batch)
      try:
        start = time.perf_counter()
        compiled = step.lower(state, clips).compile()
        row["compile_s"] = time.perf_counter() - start
        mem = compiled.memory_analysis()
        row["peak_mib"] = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                           + mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2 ** 20
        row["flops"], row["flops_source"] = perf.train_step_flops(compiled, config, batch)
        holder = [state]

        def run(holder=holder, compiled=compiled):
          holder[0], loss = compiled(holder[0], clips)
          return loss

        row["step_s"] = timed(run, repeats)
        peak, row["mfu_basis"] = perf.peak_flops(dtype=dtype), "datasheet peak"
        if peak is None:
          peak = matmul[f"{jnp.dtype(dtype).name}_gflops"] * 1e9
          row["mfu_basis"] = "dense matmul rate measured in this run"
        row["achieved_tflops"] = row["flops"] / row["step_s"] / 1e12
        row["mfu"] = row["flops"] / row["step_s"] / peak
        stats = jax.devices()[0].memory_stats() or {}
        row["device_peak_mib"] = stats.get("peak_bytes_in_use", 0) / 2 ** 20 or None
      except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(f"train {row}", flush=True)
      rows.append(row)
  return rows


def main(argv):
  del argv
  smoke, start = _SMOKE.value, time.perf_counter()
  device = jax.devices()[0]
  out = _OUT.value or os.path.join("benchmarks", device_name())
  os.makedirs(out, exist_ok=True)
  size = 512 if smoke else 8192
  results = dict(
      meta=dict(device=device.device_kind, platform=device.platform, smoke=smoke,
                jax=jax.__version__, command=" ".join(sys.argv), load=os.getloadavg()),
      matmul={f"{d}_gflops": perf.measure_matmul_rate(size, dtype=jnp.dtype(d))
              for d in _DTYPES.value})
  results["matmul"].update(peak_bfloat16=perf.peak_flops(device, jnp.bfloat16),
                           peak_float32=perf.peak_flops(device, jnp.float32))
  print(f"matmul {results['matmul']}", flush=True)
  if "kernels" in _SECTIONS.value:
    results["kernels"] = check_kernels(smoke)
  if "attention" in _SECTIONS.value:
    results["attention"] = bench_attention(smoke, _REPEATS.value)
  if "train" in _SECTIONS.value:
    results["train"] = bench_train(smoke, _REPEATS.value, results["matmul"])
  results["meta"]["seconds"] = time.perf_counter() - start
  with open(os.path.join(out, "results.json"), "w") as fh:
    json.dump(results, fh, indent=1, default=str)
  print(f"wrote {out}/results.json in {results['meta']['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
  app.run(main)
