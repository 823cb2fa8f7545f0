"""Throughput and utilisation: FLOPs of a compiled step, peak FLOP/s per platform, a profiler
switch, and the dense matmul rate of the current device.

Model-FLOP utilisation (MFU) = step FLOPs / (step seconds * peak FLOP/s). Two FLOP counts:
  `step_flops(compiled)`: XLA's cost analysis of the compiled program. It is exact for what it
    sees, but XLA counts a while loop's body once, so scans (blocked / chunked attention,
    Mamba, lax.map over query chunks) are undercounted by their trip count.
  `analytic_train_flops(config, batch_size)`: matmul FLOPs (2 per multiply-add) of the
    encoder's forward (tubelet embedding, every block's attention by type, MLP) times 3 for
    forward + backward. Elementwise work, the task heads and token merging are not counted.
  `op_profile.program_flops(hlo)`: the dots and convolutions of the optimised program, each
    loop's body counted once per iteration of its known trip count (the encoder's scanned
    blocks, config.model.scan_layers, and the scans above).
`train_step_flops` picks: XLA's count for a program without loops, the program's count where
every loop's trip count is known, else the largest of the three.
"""
from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp

from hvlm_jax.models import attention
from hvlm_jax.train import op_profile

# Dense (not structured-sparse) datasheet peaks per chip, FLOP/s. "float32" on NVIDIA is the
# TF32 tensor-core rate, which XLA may use for float32 dots at default precision (so it is an
# upper bound); on TPU float32 dots at default precision run as bfloat16 passes on the MXU.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h200": dict(bfloat16=989e12, float16=989e12, float32=494e12),  # Same SMs as H100 SXM.
    "h100": dict(bfloat16=989e12, float16=989e12, float32=494e12),
    "a100": dict(bfloat16=312e12, float16=312e12, float32=156e12),
    "tpu v4": dict(bfloat16=275e12, float32=275e12),
    "tpu v5 lite": dict(bfloat16=197e12, float32=197e12),  # v5e reports "TPU v5 lite".
    "tpu v5e": dict(bfloat16=197e12, float32=197e12),
    "tpu v5p": dict(bfloat16=459e12, float32=459e12),
    "tpu v6": dict(bfloat16=918e12, float32=918e12),  # v6e (Trillium), "TPU v6 lite".
}


def step_flops(compiled) -> float:
  """`compiled.cost_analysis()["flops"]` of a `jitted.lower(...).compile()` result (nan if
  the backend reports none). Loop bodies are counted once (see module docstring)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def has_loops(compiled) -> bool:
  """Whether the optimised HLO holds a while loop (scan, map, fori_loop)."""
  return " while(" in compiled.as_text()


def attention_flops(name: str, n: int, d: int, heads: int, opts: dict) -> float:
  """Forward FLOPs of one attention layer of type `name` on n tokens of width d, its q, k, v
  and output projections included; `opts` are the type's options with frame-relative values
  resolved (attention.resolve_frame_options). nan for an unknown type."""
  proj = 8 * n * d * d
  pad = lambda b: math.ceil(n / b) * b
  if name == "full":
    return proj + 4 * n * n * d
  if name == "strided":
    s = opts["stride"]
    return proj + 4 * pad(s) * d * (s * opts.get("local", True) + pad(s) // s)
  if name == "local_global":
    w = opts["window"]
    g = (opts["num_global"] * math.ceil(n / opts["tokens_per_frame"])
         if opts.get("global_tokens", "frame") == "frame" else opts.get("num_global", 0))
    return proj + 4 * pad(w) * d * (3 * w + g) + 4 * g * n * d
  if name == "hierarchical":
    w, sizes = opts["window"], tuple(opts["pool_sizes"])
    n_pad = pad(math.lcm(w, sizes[-1]))
    return proj + 4 * n_pad * d * (3 * w * len(sizes) + n_pad // sizes[-1])
  if name == "cross_memory":
    m = min(math.ceil(n / opts["pool_size"]), opts["capacity"])
    return 4 * n * d * d + 4 * m * d * d + 4 * n * m * d  # q, out on N; k, v on M entries.
  if name == "performer":
    return proj + 8 * n * opts["num_features"] * d
  if name == "linear":
    return proj + 4 * n * (d // heads) * d
  if name == "mamba":
    di, ns = opts["expand"] * d, opts["state_size"]
    r = opts["dt_rank"] or math.ceil(d / 16)
    per_direction = 2 * n * di * (r + 2 * ns) + 2 * n * r * di + 2 * n * di * opts["conv_size"]
    per_direction += 7 * n * di * ns  # exp, decay, input, state update, readout.
    directions = 2 if opts["bidirectional"] and not opts.get("causal", False) else 1
    return 2 * n * d * 2 * di + 2 * n * di * d + directions * per_direction
  return float("nan")


def analytic_train_flops(config, batch_size: int) -> float:
  """Forward + backward (3x forward) FLOPs of the encoder for one step of `batch_size` clips.

  Per clip: the tubelet embedding (2 N t p^2 C D), and per block the attention of
  `config.model.attention.type` (`attention_flops`) plus the MLP (4 N D mlp_dim), with
  N = (T / t) (H / p) (W / p) tokens. Reads config.model and config.data.video.
  """
  m, video = config.model, config.data.video
  t, p, _ = tuple(m.tubelet_size)
  per_frame = (video.frame_size // p) ** 2
  n = (video.num_frames // t) * per_frame
  d, name = m.hidden_size, m.attention.type
  opts = dict(m.attention.get(name, {}))
  opts.setdefault("causal", m.attention.get("causal", False))
  opts = attention.resolve_frame_options(name, opts, per_frame)
  channels = 3 * (2 if "difference" in tuple(m.get("motion_input", ())) else 1)
  embed = 2 * n * t * p * p * channels * d
  block = attention_flops(name, n, d, m.num_attention_heads, opts) + 4 * n * d * m.mlp_dim
  return 3.0 * batch_size * (embed + m.num_layers * block)


def train_step_flops(compiled, config, batch_size: int) -> tuple[float, str]:
  """(FLOPs per step, source): "xla" for a loop-free program; with loops whose trip counts XLA
  knows, the optimised program's dots and convolutions with every loop counted per iteration
  ("hlo", op_profile.program_flops); else the largest of that, XLA's count and the analytic
  count ("analytic")."""
  xla = step_flops(compiled)
  text = compiled.as_text()
  if " while(" not in text:
    return xla, "xla"
  hlo, unknown = op_profile.program_flops(text)
  if not unknown:
    return hlo, "hlo"
  counts = dict(xla=xla, hlo=hlo, analytic=analytic_train_flops(config, batch_size))
  source = max(counts, key=lambda k: counts[k] if counts[k] == counts[k] else -1.0)  # nan last
  return counts[source], source


def peak_flops(device=None, dtype=jnp.bfloat16, config=None) -> float | None:
  """Peak FLOP/s of one `device` (default: the first) for matmuls in `dtype`.

  `config.training.peak_flops` (> 0) overrides the table; None where the device is unknown
  (CPU: measure it with `measure_matmul_rate` and pass it as the override).
  """
  if config is not None:
    override = float(config.get("training", {}).get("peak_flops", 0) or 0)
    if override > 0:
      return override
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  key = "float32" if jnp.dtype(dtype) == jnp.float32 else jnp.dtype(dtype).name
  for name, rates in PEAK_FLOPS.items():
    if name in kind:
      return rates.get(key)
  return None


def measure_matmul_rate(size: int = 2048, repeats: int = 5, dtype=jnp.float32,
                        device=None) -> float:
  """Dense `dtype` matmul rate of `device` in GFLOP/s: the best of `repeats` timed runs of a
  jitted (size x size) @ (size x size) product (2 size^3 FLOPs), after one warm-up."""
  device = device or jax.devices()[0]
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(key_a, (size, size), dtype), device)
  b = jax.device_put(jax.random.normal(key_b, (size, size), dtype), device)
  matmul = jax.jit(jnp.matmul).lower(a, b).compile()
  jax.block_until_ready(matmul(a, b))
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best / 1e9


def parse_steps(profile_steps) -> tuple[int, int] | None:
  """"start,end" or (start, end) -> (start, end), inclusive; "" / None / () -> None."""
  if profile_steps in (None, "", ()):
    return None
  if isinstance(profile_steps, str):
    profile_steps = [s for s in profile_steps.replace("-", ",").split(",") if s.strip()]
  start, end = (int(s) for s in profile_steps)
  if not 0 <= start <= end:
    raise ValueError(f"config.training.profile_steps must be 'start,end' with 0 <= start <= "
                     f"end, got {profile_steps!r}.")
  return start, end


class Profiler:
  """Traces steps `start..end` (inclusive) into `WORKDIR/profile` (TensorBoard's profile
  plugin or Perfetto read it).

      profiler = Profiler.from_config(config, workdir)
      for step in range(first, last):
        profiler.step(step)               # Starts the trace at `start`, stops after `end`.
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, metrics = train_step(state, batch)
      profiler.close()                    # Stops a trace still running (a short run).

  StepTraceAnnotation marks each step in the trace, so the profile plugin reports per-step
  time; wrap the whole step (data fetch included) to see input stalls. Only process 0 traces.
  `save_program(compiled, name)` keeps the traced program's optimised HLO beside the trace
  (`name.hlo.txt`), from which `tools/profile_step.py --workdir` attributes the trace's time
  to model scopes (`hvlm_jax.train.op_profile`).
  """

  def __init__(self, log_dir: str, steps: tuple[int, int] | None):
    self.log_dir, self.steps, self.active = log_dir, steps, False
    self.enabled = steps is not None and jax.process_index() == 0

  @classmethod
  def from_config(cls, config, workdir: str) -> Profiler:
    steps = parse_steps(config.get("training", {}).get("profile_steps", ""))
    return cls(os.path.join(workdir, "profile"), steps)

  def step(self, step: int) -> None:
    """Call before running step `step`."""
    if not self.enabled:
      return
    start, end = self.steps
    if not self.active and start <= step <= end:
      jax.profiler.start_trace(self.log_dir)
      self.active = True
    elif self.active and step > end:
      self.close()

  def save_program(self, compiled, name: str) -> None:
    """Writes `compiled.as_text()` to `<log_dir>/<name>.hlo.txt` when this run traces."""
    if self.enabled:
      os.makedirs(self.log_dir, exist_ok=True)
      with open(os.path.join(self.log_dir, f"{name}.hlo.txt"), "w") as fh:
        fh.write(compiled.as_text())

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
