"""Where a train step's time goes, by model scope: a profiler trace joined with the step's HLO.

    python tools/profile_step.py --config=configs/demo.py --out=benchmarks/profile/demo
    python tools/profile_step.py --workdir=runs/demo      # a run with training.profile_steps

With --config: the trainer's step of that config (float32, one real batch on the devices,
built by `tools/train_step.py` as for `tools/benchmark_train.py`) is timed (`--timed` steps,
median), the dense float32 matmul rate is measured in the same run, and `--steps` steps are
traced and summarised.
With --workdir: the trace a run wrote under WORKDIR/profile (`training.profile_steps`) is
summarised with the program the trainer saved beside it (`train_step.hlo.txt`).

The summary (`hvlm_jax.train.op_profile`): per scope (`encoder/block_*`, `encoder.embed/
conv_stem`, ...; `--depth` components), forward and backward apart, the instruction time,
its share, the dot and convolution FLOPs and their rate; then the slowest instructions.
Writes <out>/results.{json,md}.
"""
from __future__ import annotations

import glob
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import train_step as bt  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from hvlm_jax import run as run_lib  # noqa: E402
from hvlm_jax import sharding  # noqa: E402
from hvlm_jax.train import op_profile  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config to profile.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A run's workdir with a profile to summarise.")
_PROGRAM = flags.DEFINE_string("program", None, "With --workdir: the saved program's name "
                               "(train_step, or train_step_ratio<r> with a merging curriculum).")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/profile/summary).")
_STEPS = flags.DEFINE_integer("steps", 2, "With --config: steps traced.")
_TIMED = flags.DEFINE_integer("timed", 6, "With --config: steps timed without the profiler.")
_DEPTH = flags.DEFINE_integer("depth", 3, "Model-path components per scope.")
_TOP = flags.DEFINE_integer("top", 25, "Slowest instructions listed.")
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "M of the (M x M) @ (M x M) probe.")
_ALONE = flags.DEFINE_float("alone_share", 0.99, "With --config: the step's distinct dots, "
                            "largest first, timed alone until they hold this share of its "
                            "dot FLOPs.")


def time_dots_alone(dots: list[dict], share: float) -> dict:
  """Times each of the step's distinct dots as a lone jitted `lax.dot_general` (random f32
  operands; ~50 ms of runs
  untimed, then the median of runs adding up to >= 100 ms) until `share` of the dot FLOPs is covered.
  Returns the covered FLOPs and seconds per run of the step, and per-dot rows."""
  total, covered, seconds, rows = sum(d["flops"] for d in dots), 0.0, 0.0, []
  rng = np.random.default_rng(0)
  for d in dots:
    if covered >= share * total:
      break
    lhs = jnp.asarray(rng.standard_normal(d["lhs"]), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal(d["rhs"]), jnp.float32)
    numbers = (tuple(map(tuple, d["contracting"])), tuple(map(tuple, d["batch"])))
    f = jax.jit(lambda a, b, n=numbers: jax.lax.dot_general(a, b, n)).lower(lhs, rhs).compile()
    times, warm = [], time.perf_counter() + 0.05
    while time.perf_counter() < warm:  # Runs the first ~50 ms untimed: the rate settles.
      jax.block_until_ready(f(lhs, rhs))
    while sum(times) < 0.1 or len(times) < 5:
      t = time.perf_counter()
      jax.block_until_ready(f(lhs, rhs))
      times.append(time.perf_counter() - t)
    alone = statistics.median(times)
    covered += d["flops"]
    seconds += alone * d["calls"]
    rows.append(dict(lhs=d["lhs"], rhs=d["rhs"], contracting=d["contracting"], batch=d["batch"],
                     calls=d["calls"], gflop=d["flops"] / 1e9, alone_s=alone,
                     alone_gflops=d["flops"] / d["calls"] / alone / 1e9))
  return dict(flops=covered, total_flops=total, seconds=seconds, rows=rows)


def from_config(config) -> tuple[dict, dict]:
  run_lib.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  config, batch = bt.real_batch(config)
  runner = bt.StepRunner("f32", bt.with_training(config, **bt.VARIANTS["f32"]), batch, mesh)
  runner.run(_TIMED.value)
  step_s = statistics.median(runner.times)
  matmul, matmul_flop = bt.matmul_probe(_MATMUL.value)
  matmul_gflops = matmul_flop / min(matmul() for _ in range(5)) / 1e9
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    runner.run(_STEPS.value)
    jax.profiler.stop_trace()
    summary = op_profile.summarize(runner.step.as_text(), op_profile.latest_trace(trace_dir),
                                   runs=_STEPS.value * jax.local_device_count(),
                                   top=_TOP.value, depth=_DEPTH.value)
  alone = time_dots_alone(summary["dots"], _ALONE.value)
  meta = dict(device=f"{jax.devices()[0].platform} x{jax.device_count()}",
              cpus=os.cpu_count(), jax=jax.__version__, step_s=step_s,
              gflop=runner.stats["gflop"], xla_gflop=runner.stats["xla_gflop"],
              matmul_size=_MATMUL.value, matmul_gflops=matmul_gflops,
              matmul_fraction=runner.stats["gflop"] / step_s / matmul_gflops,
              load_avg=os.getloadavg()[0], dots_alone=alone)
  return summary, meta


def dots_alone_line(meta: dict) -> str:
  a = meta["dots_alone"]
  rate = a["flops"] / a["seconds"] / 1e9
  return (f"Dots alone: the step's {len(a['rows'])} largest distinct dots, "
          f"{a['flops'] / 1e9:.2f} of its {a['total_flops'] / 1e9:.2f} dot GFLOP, each timed "
          f"as a lone jitted dot_general, take {1e3 * a['seconds']:.1f} ms a step: "
          f"{rate:.1f} GFLOP/s, {rate / meta['matmul_gflops']:.1%} of the matmul rate. A step at "
          f"40% of that rate would take {1e3 * meta['gflop'] / (0.4 * meta['matmul_gflops']):.0f}"
          " ms in all.")


def from_workdir(workdir: str) -> tuple[dict, dict]:
  log_dir = os.path.join(workdir, "profile")
  programs = sorted(os.path.basename(p)[:-len(".hlo.txt")]
                    for p in glob.glob(os.path.join(log_dir, "*.hlo.txt")))
  if not programs:
    raise app.UsageError(f"{log_dir}: no saved program (*.hlo.txt); was the run started "
                         "with --config.training.profile_steps?")
  name = _PROGRAM.value or programs[0]
  if name not in programs:
    raise app.UsageError(f"--program={name}: {log_dir} holds {', '.join(programs)}.")
  with open(os.path.join(log_dir, f"{name}.hlo.txt")) as fh:
    hlo = fh.read()
  trace = op_profile.latest_trace(log_dir)
  summary = op_profile.summarize(hlo, trace, top=_TOP.value, depth=_DEPTH.value)
  return summary, dict(program=name, trace=trace)


def main(argv):
  del argv
  if (_CONFIG.value is None) == (_WORKDIR.value is None):
    raise app.UsageError("Give one of --config (profile that config's step) or --workdir "
                         "(summarise a run's profile).")
  out = _OUT.value or os.path.join(_WORKDIR.value or ".", "profile", "summary")
  try:
    if _CONFIG.value is not None:
      summary, meta = from_config(_CONFIG.value)
    else:
      summary, meta = from_workdir(_WORKDIR.value)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  meta["command"] = "python tools/profile_step.py " + " ".join(sys.argv[1:])
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as fh:
    json.dump(dict(meta=meta, **summary), fh, indent=1)
  head = ["# Train-step profile by scope", "", f"`{meta['command']}`", "", ""]
  if "step_s" in meta:
    head[-1:] = [
        f"Device: {meta['device']} ({meta['cpus']} cores; 1-min load {meta['load_avg']:.1f}), "
        f"jax {meta['jax']}. Step {meta['step_s']:.3f} s (median of {_TIMED.value}, untraced), "
        f"{meta['gflop']:.2f} GFLOP in dots and convolutions, loops counted per iteration "
        f"({meta['xla_gflop']:.2f} by XLA's count, which adds elementwise work and counts a "
        f"loop once): {meta['gflop'] / meta['step_s']:.1f} GFLOP/s, "
        f"{meta['matmul_fraction']:.1%} of the dense float32 matmul rate measured in this "
        f"run ({meta['matmul_gflops']:.0f} GFLOP/s at {meta['matmul_size']}^2).", "",
        dots_alone_line(meta), "", ""]
  text = "\n".join(head) + op_profile.markdown(summary) + (
      "\nTimes are summed over the threads that ran instructions side by side. XLA:CPU runs "
      "convolutions on its thread pool after their instruction's event ends: their time is "
      "undercounted (see hvlm_jax/train/op_profile.py).\n")
  with open(os.path.join(out, "results.md"), "w") as fh:
    fh.write(text)
  print(text)


if __name__ == "__main__":
  app.run(main)
