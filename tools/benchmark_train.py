"""Train-step throughput, achieved FLOP/s against this machine's matmul peak, and peak memory.

    python tools/benchmark_train.py --out benchmarks/train
    python tools/benchmark_train.py --config=configs/demo.py:attention=performer \
        --config.model.num_layers=2 --variants=f32,f32_remat --rounds=2

The step is the trainer's own (`trainer.build_training(...).train_step`: forward, multi-task
loss, backward, AdamW), jitted with its shardings on the mesh of `config.mesh`. One real batch
is taken from the data pipeline of the config (the synthetic demo dataset is generated on
first use, as training does) and placed on the devices once, so the timing is of the step
alone, not of video decoding. Variants (`--variants`):
  f32, f32_remat, bf16, bf16_remat   float32 or `training.mixed_precision` (bfloat16 compute,
                                     float32 params and optimizer state), with or without
                                     `training.gradient_checkpointing` (remat per block).
Per variant:
  step_s          median wall time of one step (`--rounds` rounds x `--steps` steps, variants
                  and the matmul probe interleaved round by round, so load from other
                  processes on a shared machine hits all alike; `step_min_s` is the minimum).
  clips_per_s     batch size / step_s; tokens_per_s likewise with the encoder's tokens.
  f32_unrolled, ...                   the same with the encoder's blocks unrolled
                                     (`model.scan_layers="false"`; the configs scan them).
  gflop           the dots and convolutions the step runs (op_profile.program_flops), each
                  loop (the scanned blocks, scan-based attention) counted per iteration. With
                  remat it includes the recomputed forward.
  xla_gflop       `compiled.cost_analysis()["flops"]`: also elementwise work, but XLA counts a
                  loop body once, so a step with while loops is undercounted (`has_loops`).
  gflops_per_s    gflop / step_s; `useful_gflops_per_s` uses the f32 no-remat count
                  instead (recomputation is not useful work).
  matmul_fraction gflops_per_s / the dense float32 matmul GFLOP/s measured in the same rounds
                  (a jitted (M x M) @ (M x M), `--matmul_size`).
  *_mib           `compiled.memory_analysis()`: arguments (state + batch), temporaries,
                  outputs, aliased (donated) bytes; peak_mib = arguments + temporaries +
                  outputs - aliased, the live set XLA plans for the step.
Writes <out>/results.{csv,json,md}.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from train_step import (VARIANTS, StepRunner, encoder_tokens, matmul_probe,  # noqa: E402
                        real_batch, with_training)

from hvlm_jax import run as run_lib  # noqa: E402
from hvlm_jax import sharding  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Training config.")
_OUT = flags.DEFINE_string("out", "benchmarks/train", "Output directory.")
_VARIANTS = flags.DEFINE_list("variants", ["f32", "f32_remat", "bf16", "bf16_remat"],
                              "Precision / remat variants (see the module docstring).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds.")
_STEPS = flags.DEFINE_integer("steps", 2, "Timed steps per variant per round.")
_MATMUL = flags.DEFINE_integer("matmul_size", 2048, "M of the (M x M) @ (M x M) probe.")


def main(argv):
  del argv
  base_config = _CONFIG.value
  run_lib.validate(base_config, jax.device_count())
  unknown = [v for v in _VARIANTS.value if v not in VARIANTS]
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}.")
  os.makedirs(_OUT.value, exist_ok=True)
  mesh = sharding.make_mesh(base_config.mesh)
  config, batch = real_batch(base_config)
  runners = []
  for name in _VARIANTS.value:
    runners.append(StepRunner(name, with_training(config, **VARIANTS[name]), batch, mesh))
    r = runners[-1]
    print(f"compiled {name} in {r.compile_s:.1f} s: {r.stats['gflop']:.1f} GFLOP, peak "
          f"{r.stats['peak_mib']:.0f} MiB (temp {r.stats['temp_mib']:.0f})", flush=True)
  matmul, matmul_flop = matmul_probe(_MATMUL.value)
  matmul_times, loads = [], []
  for i in range(_ROUNDS.value):
    for r in runners:
      r.run(_STEPS.value)
    matmul_times += [matmul() for _ in range(3)]
    loads.append(os.getloadavg()[0])
    print(f"round {i + 1}/{_ROUNDS.value}: " + ", ".join(
        f"{r.name} {statistics.median(r.times[-_STEPS.value:]):.2f} s" for r in runners) +
        f"; matmul {matmul_flop / min(matmul_times[-3:]) / 1e9:.0f} GFLOP/s; "
        f"load {loads[-1]:.1f}", flush=True)
  rows = summarize(runners, config, matmul_flop / statistics.median(matmul_times) / 1e9,
                   matmul_flop / min(matmul_times) / 1e9)
  meta = dict(
      command="python tools/benchmark_train.py " + " ".join(sys.argv[1:]),
      device=f"{jax.devices()[0].platform} x{jax.device_count()}", cpus=os.cpu_count(),
      jax=jax.__version__, mesh=dict(mesh.shape), batch_size=int(config.data.batch_size),
      frames=int(config.data.video.num_frames), frame_size=int(config.data.video.frame_size),
      tokens=encoder_tokens(config), attention=config.model.attention.type,
      merging=bool(config.model.token_merging.enabled),
      model={k: config.model[k] for k in ("hidden_size", "num_layers", "num_attention_heads",
                                          "mlp_dim")},
      remat_policy=config.training.remat_policy, rounds=_ROUNDS.value, steps=_STEPS.value,
      matmul_size=_MATMUL.value, load_avg=loads,
      matmul_gflops_median=rows[0]["matmul_gflops"], matmul_gflops_best=rows[0][
          "matmul_gflops_best"],
      note="Wall times on a CPU shared with other jobs (load_avg: 1-min load per round); "
           "compare variants within this run only.")
  write(rows, meta, _OUT.value)


def summarize(runners, config, matmul_gflops, matmul_best):
  useful = next((r.stats["gflop"] for r in runners if r.name == "f32"), float("nan"))
  rows = []
  for r in runners:
    step = statistics.median(r.times)
    row = dict(variant=r.name, **{k: v for k, v in VARIANTS[r.name].items() if "." not in k},
               scan_layers=str(r.config.model.get("scan_layers", "auto")), params=r.params,
               step_s=step,
               step_min_s=min(r.times), clips_per_s=config.data.batch_size / step,
               tokens_per_s=config.data.batch_size * encoder_tokens(config) / step,
               **r.stats, compile_s=r.compile_s, final_loss=r.loss)
    row["gflops_per_s"] = row["gflop"] / step
    row["useful_gflops_per_s"] = useful / step
    row["matmul_gflops"], row["matmul_gflops_best"] = matmul_gflops, matmul_best
    row["matmul_fraction"] = row["gflops_per_s"] / matmul_gflops
    row["useful_matmul_fraction"] = row["useful_gflops_per_s"] / matmul_gflops
    rows.append(row)
  return rows


def write(rows, meta, out):
  with open(os.path.join(out, "results.csv"), "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  with open(os.path.join(out, "results.json"), "w") as fh:
    json.dump(dict(meta=meta, rows=rows), fh, indent=1, default=str)
  table = markdown(rows, meta)
  with open(os.path.join(out, "results.md"), "w") as fh:
    fh.write(table)
  print(table)


def markdown(rows, meta) -> str:
  m = meta["model"]
  lines = [
      "# Train-step benchmark", "", f"`{meta['command']}`", "",
      f"Device: {meta['device']} ({meta['cpus']} cores, shared; 1-min load per round "
      f"{', '.join(f'{v:.1f}' for v in meta['load_avg'])}); jax {meta['jax']}; mesh "
      f"{meta['mesh']}. Model: width {m['hidden_size']}, {m['num_layers']} layers, "
      f"{m['num_attention_heads']} heads, MLP {m['mlp_dim']}, attention {meta['attention']}, "
      f"merging {meta['merging']}; batch {meta['batch_size']} clips of {meta['frames']} x "
      f"{meta['frame_size']}^2 ({meta['tokens']} tokens). Remat policy: "
      f"{meta['remat_policy']}. Dense f32 matmul ({meta['matmul_size']}^2) in the same rounds: "
      f"{meta['matmul_gflops_median']:.0f} GFLOP/s median, {meta['matmul_gflops_best']:.0f} "
      "best. Times: median of "
      f"{meta['rounds']} x {meta['steps']} steps per variant, interleaved; relative within this "
      "run only.", "",
      "| variant | step s (min) | compile s | clips/s | tokens/s | GFLOP/step (XLA's) | GFLOP/s "
      "| of matmul | useful GFLOP/s | of matmul | peak MiB | temp MiB | args MiB |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    loops = ", loops" if r["has_loops"] else ""
    lines.append(
        f"| {r['variant']} | {r['step_s']:.2f} ({r['step_min_s']:.2f}) | {r['compile_s']:.1f} "
        f"| {r['clips_per_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['gflop']:.1f} "
        f"({r['xla_gflop']:.1f}{loops}) | {r['gflops_per_s']:.1f} | "
        f"{100 * r['matmul_fraction']:.1f}% | {r['useful_gflops_per_s']:.1f} | "
        f"{100 * r['useful_matmul_fraction']:.1f}% | {r['peak_mib']:.0f} | {r['temp_mib']:.0f} "
        f"| {r['argument_mib']:.0f} |")
  lines += ["", "peak = arguments (state + batch) + temporaries + outputs - donated (aliased) "
            "bytes, from `compiled.memory_analysis()`. GFLOP/step: the dots and convolutions "
            "the step runs, loops counted per iteration; XLA's count (in brackets) adds "
            "elementwise work but counts a loop body once (loops: a lower bound). Useful "
            "GFLOP/s counts the f32 step without recomputation. Compile s: tracing, lowering "
            "and compiling the step (the persistent compilation cache is not used here)."]
  by = {r["variant"]: r for r in rows}
  for prec in ("f32", "bf16"):
    plain, remat = by.get(prec), by.get(prec + "_remat")
    if plain and remat and remat["peak_mib"] > 0.99 * plain["peak_mib"]:
      lines.append(
          f"\nRemat saved no memory in {prec} ({remat['peak_mib']:.0f} vs "
          f"{plain['peak_mib']:.0f} MiB) while adding {remat['gflop'] / plain['gflop'] - 1:.0%} "
          "FLOPs: on this backend the checkpointed program keeps the same live set (a "
          "minimal dense stack with and without jax.checkpoint shows equal temp bytes and "
          "process RSS on XLA:CPU; jax-ml/jax#19822 reports the same). Judge remat on GPU / "
          "TPU.")
  f32, bf16 = by.get("f32"), by.get("bf16")
  if f32 and bf16 and bf16["peak_mib"] > 0.9 * f32["peak_mib"]:
    lines.append(
        f"\nMixed precision lowered the peak by {1 - bf16['peak_mib'] / f32['peak_mib']:.0%} "
        f"only. HLO values of shape (B, H, N, N) per dtype, f32: {f32['nxn_values']}, bf16: "
        f"{bf16['nxn_values']}: the attention logits and softmax (the largest temporaries) stay "
        "float32 by design (float32 softmax statistics).")
  lines.append("")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
