"""Full attention's XLA path: our written-out form against jax.nn.dot_product_attention's.

    python tools/benchmark_softmax_attention.py --out=benchmarks/attention/xla_form

`hvlm_jax.models.attention.full.softmax_attention` (two einsums around a float32 softmax) and
`jax.nn.dot_product_attention(implementation="xla")` compute the same function. This times the
core alone (no projections), forward + backward (gradients w.r.t. q, k and v of the sum of
squares of the output), float32, per shape (batch, tokens, heads, head width, key mask or
not), one after the other in one process: median wall and CPU seconds over `--repeats` runs
(at least 100 up to 256 tokens, one at 6272) after a warm-up, their ratios
(dot_product_attention / ours: above 1 means ours is faster), and the largest difference
between the two gradients. With `--vit_step` (on by default) it also times the ViT-B encoder
train step of tools/device_check.py (tools/vit_b.py: 12 x 768, batch 2, 8 x 224^2, float32,
no remat) with full attention's XLA path switched between the two forms, alternating A, B, A,
B, with the dense matmul rate measured before and after: step seconds and the step's
model FLOP rate as a fraction of that matmul rate. Writes <out>/results.json.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/vit_b.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hvlm_jax.models.attention import full  # noqa: E402
from hvlm_jax.models.attention.full import softmax_attention  # noqa: E402
from hvlm_jax.train import perf  # noqa: E402
from vit_b import vit_clips, vit_config, vit_train_step  # noqa: E402  (tools/vit_b.py)

_OUT = flags.DEFINE_string("out", "benchmarks/attention/xla_form", "Output folder.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per form and shape.")
# batch, tokens, heads, head width, masked: the demo (16 x 128, width 128 in 4 heads), a
# ViT-B clip (784 and 1568 tokens of 12 x 64) and the long-video length of the attention table.
_SHAPES = flags.DEFINE_list(
    "shapes", ["16x128x4x32", "16x128x4x32m", "8x256x4x32", "2x784x12x64", "2x784x12x64m",
               "2x1568x12x64", "1x6272x12x64"],
    "BxNxHxD shapes; a trailing m masks the last quarter of the keys.")
_VIT_STEP = flags.DEFINE_bool("vit_step", True, "Also the ViT-B train step with each form.")


def _dpa_form(q, k, v, bias=None, *, causal=False, dropout_rate=0.0, dropout_rng=None):
  del dropout_rate, dropout_rng  # The step has no attention dropout.
  return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=causal,
                                      implementation="xla")


def vit_step_rows(repeats: int = 2) -> dict:
  """The ViT-B train step with each form of full attention's XLA path, alternating."""
  config, batch = vit_config(False), 2
  clips = vit_clips(config, batch)
  out = dict(matmul_gflops_before=perf.measure_matmul_rate(8192, dtype=jnp.float32), steps=[])
  try:
    for name, form in (("dot_product_attention", _dpa_form), ("ours", softmax_attention)) * 2:
      full.softmax_attention = form  # What FullAttention calls on the XLA path.
      step, state = vit_train_step(config, clips)
      compiled = step.lower(state, clips).compile()
      flops, _ = perf.train_step_flops(compiled, config, batch)
      holder = [state]

      def run(compiled=compiled, holder=holder):
        holder[0], loss = compiled(holder[0], clips)
        return loss

      wall, cpu, _ = _timed(run, (), repeats)
      out["steps"].append(dict(form=name, step_s=round(wall, 3), step_cpu_s=round(cpu, 3),
                               gflop=round(flops / 1e9, 1)))
      print(out["steps"][-1], flush=True)
  finally:
    full.softmax_attention = softmax_attention
  out["matmul_gflops_after"] = perf.measure_matmul_rate(8192, dtype=jnp.float32)
  rate = statistics.median([out["matmul_gflops_before"], out["matmul_gflops_after"]])
  for form in ("dot_product_attention", "ours"):
    steps = [r for r in out["steps"] if r["form"] == form]
    step_s = statistics.median(r["step_s"] for r in steps)
    out[f"{form}_median_step_s"] = step_s
    out[f"{form}_matmul_fraction"] = round(steps[0]["gflop"] / step_s / rate, 3)
  out["speedup"] = round(out["dot_product_attention_median_step_s"] / out["ours_median_step_s"],
                         3)
  return out


def _grad_fn(form, bias):
  return jax.jit(jax.grad(lambda q, k, v: jnp.sum(form(q, k, v, bias) ** 2), argnums=(0, 1, 2)))


def _timed(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  wall, cpu = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn(*args))
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return statistics.median(wall), statistics.median(cpu), out


def main(argv):
  del argv
  forms = {"dot_product_attention": lambda q, k, v, bias: jax.nn.dot_product_attention(
               q, k, v, bias=bias, implementation="xla"),
           "ours": lambda q, k, v, bias: softmax_attention(q, k, v, bias)}
  rows = []
  for shape in _SHAPES.value:
    masked = shape.endswith("m")
    b, n, h, d = (int(x) for x in shape.rstrip("m").split("x"))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for _ in range(3))
    bias = (jnp.broadcast_to(jnp.where(jnp.arange(n) < n - n // 4, 0.0, -1e9),
                             (b, 1, 1, n)) if masked else None)
    # Calls of a few milliseconds need many runs for a stable median; 6272 tokens takes 13 s.
    repeats = max(_REPEATS.value, 100) if n <= 256 else _REPEATS.value if n < 4096 else 1
    row, grads = dict(shape=[b, n, h, d], masked=masked), {}
    for name, form in forms.items():
      wall, cpu, grads[name] = _timed(_grad_fn(form, bias), (q, k, v), repeats)
      row[f"{name}_s"], row[f"{name}_cpu_s"] = round(wall, 5), round(cpu, 5)
    row["speedup"] = round(row["dot_product_attention_s"] / row["ours_s"], 3)
    row["speedup_cpu"] = round(row["dot_product_attention_cpu_s"] / row["ours_cpu_s"], 3)
    row["max_grad_difference"] = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(
        grads["dot_product_attention"], grads["ours"]))
    print(row, flush=True)
    rows.append(row)
  vit = vit_step_rows() if _VIT_STEP.value else None
  os.makedirs(_OUT.value, exist_ok=True)
  result = dict(vit_b_train_step=vit, command=" ".join(["python", "tools/benchmark_softmax_attention.py"] + sys.argv[1:]),
                jax=jax.__version__, load_average=os.getloadavg(), repeats=_REPEATS.value,
                rows=rows)
  with open(os.path.join(_OUT.value, "results.json"), "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
