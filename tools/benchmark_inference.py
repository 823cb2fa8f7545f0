"""Inference throughput, latency and memory per attention type x merging ratio x frames.

    python tools/benchmark_inference.py --out benchmarks/inference
    python tools/benchmark_inference.py --attention=full,mamba --frames=8,32 --ratios=0

The model is configs/demo.py's (width 128, 4 blocks, 4 heads, 64 x 64 frames, (2, 8, 8)
tubelets: 64 tokens per frame pair, so 8 / 32 / 128 frames are 256 / 1024 / 4096 tokens),
with attention windows, strides and pools aligned to those 64 tokens per frame
(experiments/common.py), float32, random parameters (cost does not depend on their values).
Per (attention, ratio, frames):
  encoder   `HierarchicalVLM.encode` (router, encoder with token merging when ratio > 0,
            experts): what every task pays per clip. Merging (ratio > 0) includes the optical
            flow and saliency that steer it.
  predict   the full `HierarchicalVLM.predict` (all four heads, detection decoding, beam
            search captioning), measured at the frame counts in --predict_frames only.
Timing: per frame count, every (attention, ratio, function) is compiled and warmed up, then
all are called once per round for --repeats interleaved rounds, so load from other processes
on a shared machine hits all of them alike. latency_s is the best round (on a shared machine
the minimum is the better estimate of the uncontended time), latency_median_s the median;
clips_per_s = batch / latency_s. Memory from `memory_analysis()`: peak_mib = arguments
(params + batch) + temporaries + outputs - aliased. A combination whose compiled temporaries
exceed --max_memory_fraction of MemAvailable is not run; one whose warm-up call exceeds
--max_call_s is timed once; either way larger frame counts of that (attention, ratio,
function) are skipped, marked in `note`. Rows are appended to <out>/partial.jsonl per frame
count (--resume continues a killed run). Writes <out>/results.{csv,json,md} and
<out>/inference.png.
"""
from __future__ import annotations

import csv
import functools
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import linen as nn  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from hvlm_jax.config import import_sibling  # noqa: E402
from hvlm_jax.data import synthetic  # noqa: E402
from hvlm_jax.models import attention  # noqa: E402
from hvlm_jax.models import model as model_lib  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
common = import_sibling(os.path.join(_ROOT, "experiments", "common.py"), "common.py")

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(_ROOT, "configs", "demo.py"),
                                          "Model config (its data.video frames are replaced).")
_OUT = flags.DEFINE_string("out", "benchmarks/inference", "Output directory.")
_ATTENTION = flags.DEFINE_list("attention", sorted(attention.REGISTRY), "Attention types.")
_RATIOS = flags.DEFINE_list("ratios", ["0", "0.5"], "Token-merging compression ratios.")
_FRAMES = flags.DEFINE_list("frames", ["8", "32", "128"], "Frames per clip.")
_PREDICT_FRAMES = flags.DEFINE_list("predict_frames", ["8"], "Frames at which to time predict.")
_BATCH = flags.DEFINE_integer("batch", 1, "Clips per call.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (median).")
_MAX_MEM = flags.DEFINE_float("max_memory_fraction", 0.4,
                              "Do not run programs whose temporaries exceed this share of "
                              "MemAvailable.")
_MAX_CALL = flags.DEFINE_float("max_call_s", 60.0, "Per-call time budget (see docstring).")
_RESUME = flags.DEFINE_bool("resume", False, "Reuse rows of an interrupted run in --out.")
# Head sizes of the demo's synthetic dataset (classes, words, answers of its vocabularies).
_SIZES = flags.DEFINE_list("head_sizes", ["8", "43", "17"],
                           "num_classes, vocab_size, num_answers.")


def model_config(att: str, ratio: float, frames: int):
  config = _CONFIG.value.copy_and_resolve_references()
  config.data.video.num_frames = frames
  config.model.attention.type = att
  config.model.token_merging.enabled = ratio > 0
  config.model.token_merging.target_compression_ratio = ratio if ratio > 0 else 0.5
  c, v, a = (int(s) for s in _SIZES.value)
  config.model.heads.num_classes, config.model.heads.vocab_size = c, v
  config.model.heads.num_answers = a
  return config


def schema_batch(config, batch: int, seed: int = 0) -> dict:
  """A batch of the data schema (TEAM.md) with synthetic-dataset clips rendered at the
  config's frame count: moving, growing, appearing shapes on domain textures (so merging's
  flow and saliency see real structure), random questions and captions."""
  rng = np.random.default_rng(seed)
  t, s = config.data.video.num_frames, config.data.video.frame_size
  fps = 12.0
  videos = []
  for _ in range(batch):
    clip = synthetic.sample_clip(rng, frame_size=s, duration=t / fps)
    bg = synthetic.background(rng, clip["domain"], s)
    videos.append(synthetic.render_clip(clip, t, fps, bg))
  steps = t // config.model.tubelet_size[0]
  h, d = config.model.heads, config.data
  words = lambda *shape: rng.integers(4, h.vocab_size, shape).astype(np.int32)
  step_duration = config.model.tubelet_size[0] / fps
  return dict(
      video=np.stack(videos), index=np.arange(batch, dtype=np.int32),
      valid=np.ones(batch, bool), domain=np.zeros(batch, np.int32),
      timestamps=np.tile(np.arange(t, dtype=np.float32) / fps, (batch, 1)),
      duration=np.full(batch, t / fps, np.float32),
      label=rng.integers(0, h.num_classes, batch).astype(np.int32),
      label_mask=np.ones(batch, bool),
      action_targets=np.zeros((batch, steps, h.num_classes), np.float32),
      action_offsets=np.zeros((batch, steps, 2), np.float32), action_mask=np.ones(batch, bool),
      step_times=np.tile((np.arange(steps, dtype=np.float32) + 0.5) * step_duration,
                         (batch, 1)),
      step_duration=np.full(batch, step_duration, np.float32),
      questions=words(batch, d.max_questions, d.question_length),
      answers=rng.integers(0, h.num_answers, (batch, d.max_questions)).astype(np.int32),
      qa_mask=np.ones((batch, d.max_questions), bool),
      caption_tokens=words(batch, d.caption_length), caption_mask=np.ones(batch, bool))


def available_bytes() -> int:
  with open("/proc/meminfo") as fh:
    for line in fh:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return 0


def compile_functions(config, batch, want_predict: bool):
  """Parameters and the compiled encode (and predict) programs for one configuration."""
  model = model_lib.build_model(config)
  batch = jax.tree.map(jnp.asarray, batch)
  init = jax.jit(lambda r: model.init({"params": r, "dropout": r, "features": r}, batch,
                                      train=False))
  variables = nn.meta.unbox(init(jax.random.key(0)))
  fns = {"encoder": lambda v, b: {k: x for k, x in model.apply(
      v, b, method=model_lib.HierarchicalVLM.encode).items() if k in ("tokens",
                                                                     "time_features")}}
  if want_predict:
    fns["predict"] = lambda v, b: model.apply(v, b, method=model_lib.HierarchicalVLM.predict)
  compiled = {}
  for name, fn in fns.items():
    t = time.perf_counter()
    compiled[name] = (jax.jit(fn).lower(variables, batch).compile(), time.perf_counter() - t)
  return variables, batch, compiled


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  mib = lambda b: b / 2 ** 20
  return dict(temp_mib=mib(m.temp_size_in_bytes), argument_mib=mib(m.argument_size_in_bytes),
              peak_mib=mib(m.argument_size_in_bytes + m.temp_size_in_bytes +
                           m.output_size_in_bytes - m.alias_size_in_bytes))


def main(argv):
  del argv
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  partial = os.path.join(out, "partial.jsonl")
  done = {}
  if _RESUME.value and os.path.exists(partial):
    with open(partial) as fh:
      done = {(r["attention"], r["ratio"], r["frames"], r["function"]): r
              for r in map(json.loads, fh)}
  elif os.path.exists(partial):
    os.remove(partial)
  ratios = [float(r) for r in _RATIOS.value]
  predict_frames = {int(f) for f in _PREDICT_FRAMES.value}
  rows, over_budget = [], {}
  for n in [int(f) for f in _FRAMES.value]:
    functions = ["encoder"] + (["predict"] if n in predict_frames else [])
    keys = [(a, r, n, f) for a in _ATTENTION.value for r in ratios for f in functions]
    if all(k in done for k in keys):
      rows += [done[k] for k in keys]
      continue
    group = measure_group(n, ratios, functions, over_budget)
    with open(partial, "a") as fh:
      fh.writelines(json.dumps(r) + "\n" for r in group)
    rows += group
    gc.collect()
    jax.clear_caches()
  finish(rows, out)


def measure_group(n, ratios, functions, over_budget) -> list[dict]:
  """Every (attention, ratio, function) at `n` frames: compile all, warm each up, then time
  them in --repeats interleaved rounds, so load from other processes hits all alike."""
  rows, live = [], []
  for att in _ATTENTION.value:
    for ratio in ratios:
      config = model_config(att, ratio, n)
      t, p = n // config.model.tubelet_size[0], (config.data.video.frame_size //
                                                  config.model.tubelet_size[1]) ** 2
      todo = [f for f in functions if (att, ratio, f) not in over_budget]
      compiled, note = {}, ""
      if todo:
        try:
          batch = schema_batch(config, _BATCH.value)
          variables, batch, compiled = compile_functions(config, batch, "predict" in todo)
        except Exception as e:  # A configuration the model rejects is a row, not a crash.
          note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
      for f in functions:
        row = dict(attention=att, ratio=ratio, frames=n, tokens=t * p, batch=_BATCH.value,
                   function=f, latency_s=float("nan"), latency_median_s=float("nan"),
                   clips_per_s=float("nan"), compile_s=float("nan"), temp_mib=float("nan"),
                   argument_mib=float("nan"), peak_mib=float("nan"),
                   note=over_budget.get((att, ratio, f), note), times=[])
        rows.append(row)
        if f not in compiled:
          continue
        fn, row["compile_s"] = compiled[f]
        row.update(memory(fn))
        if row["temp_mib"] * 2 ** 20 > _MAX_MEM.value * available_bytes():
          row["note"] = (f"not run: {row['temp_mib'] / 1024:.1f} GiB of temporaries, "
                         f"{available_bytes() / 2 ** 30:.1f} GiB available")
          over_budget[(att, ratio, f)] = f"skipped: over memory at {n} frames"
          continue
        call = functools.partial(fn, variables, batch)
        first = _timed(call)  # Warm-up: first-run allocations.
        if first > _MAX_CALL.value:
          row["times"], row["note"] = [first], f"timed once: warm-up {first:.0f} s > --max_call_s"
          over_budget[(att, ratio, f)] = f"skipped: over time at {n} frames"
        else:
          live.append((row, call))
      print(f"compiled {att} r={ratio} at {n} frames", flush=True)
  loads = []
  for _ in range(_REPEATS.value):
    loads.append(os.getloadavg()[0])
    for row, call in live:
      row["times"].append(_timed(call))
  for row in rows:
    if row["times"]:
      row["latency_s"], row["latency_median_s"] = min(row["times"]), statistics.median(
          row["times"])
      row["clips_per_s"] = _BATCH.value / row["latency_s"]
    row["load"] = float(np.mean(loads)) if loads else os.getloadavg()[0]
    print(f"{row['attention']:>13} r={row['ratio']:<4} {n:>3} frames {row['function']:>8}: "
          f"{row['latency_s']:.3f} s, {row['clips_per_s']:.2f} clips/s, peak "
          f"{row['peak_mib']:.0f} MiB, compile {row['compile_s']:.0f} s {row['note']}",
          flush=True)
  return rows


def _timed(call) -> float:
  t = time.perf_counter()
  jax.block_until_ready(call())
  return time.perf_counter() - t


def finish(rows, out):
  keys = list(rows[0])
  with open(os.path.join(out, "results.csv"), "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
  config = model_config("full", 0.0, 8)
  m = config.model
  meta = dict(command="python tools/benchmark_inference.py " + " ".join(sys.argv[1:]),
              device=f"{jax.devices()[0].platform} x{jax.device_count()}",
              cpus=os.cpu_count(), jax=jax.__version__, width=m.hidden_size,
              layers=m.num_layers, heads=m.num_attention_heads, mlp=m.mlp_dim,
              frame_size=config.data.video.frame_size, tubelet=tuple(m.tubelet_size),
              batch=_BATCH.value, repeats=_REPEATS.value, dtype=str(m.dtype),
              merging_schedule=m.token_merging.schedule,
              load={r["frames"]: round(r["load"], 1) for r in rows},
              note="Wall times on a CPU shared with other jobs; compare within this run only.")
  with open(os.path.join(out, "results.json"), "w") as fh:
    json.dump(dict(meta=meta, rows=rows), fh, indent=1, default=str)
  table = markdown(rows, meta)
  with open(os.path.join(out, "results.md"), "w") as fh:
    fh.write(table)
  print(table)
  plot(rows, os.path.join(out, "inference.png"))


def _f(x, fmt):
  return "-" if x is None or np.isnan(x) else format(x, fmt)


def markdown(rows, meta) -> str:
  lines = [
      "# Inference benchmark", "", f"`{meta['command']}`", "",
      f"Device: {meta['device']} ({meta['cpus']} cores, shared); jax {meta['jax']}. Model: "
      f"configs/demo.py, width {meta['width']}, {meta['layers']} blocks, {meta['heads']} "
      f"heads, MLP {meta['mlp']}, {meta['frame_size']}^2 frames, tubelet {meta['tubelet']}, "
      f"{meta['dtype']}, batch {meta['batch']}; merging schedule {meta['merging_schedule']} "
      "(flow + saliency included). Latency: best of "
      f"{meta['repeats']} interleaved rounds after a warm-up (median also shown); mean 1-min "
      f"load per frame count {meta['load']}. {meta['note']}", "",
      "| function | attention | ratio | frames | tokens | latency s (best) | median s | "
      "clips/s | peak MiB | temp MiB | compile s | note |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: (r["function"] != "encoder", r["frames"], r["attention"],
                                       r["ratio"])):
    lines.append(
        f"| {r['function']} | {r['attention']} | {r['ratio']:g} | {r['frames']} | "
        f"{r['tokens']} | {_f(r['latency_s'], '.4f')} | {_f(r['latency_median_s'], '.4f')} | "
        f"{_f(r['clips_per_s'], '.2f')} | {_f(r['peak_mib'], '.0f')} | "
        f"{_f(r['temp_mib'], '.0f')} | {_f(r['compile_s'], '.0f')} | {r['note']} |")
  speedups = []
  for r in rows:
    if r["function"] == "encoder" and r["ratio"] > 0:
      b = next((x for x in rows if x["function"] == "encoder" and x["ratio"] == 0 and
                x["attention"] == r["attention"] and x["frames"] == r["frames"]), None)
      if b and not np.isnan(b["latency_s"]) and not np.isnan(r["latency_s"]):
        speedups.append(f"{r['attention']}@{r['frames']} {b['latency_s'] / r['latency_s']:.2f}x")
  if speedups:
    lines += ["", "Encoder speedup from merging (ratio 0 latency / merged latency): " +
              ", ".join(speedups) + "."]
  lines.append("")
  return "\n".join(lines)


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  enc = [r for r in rows if r["function"] == "encoder"]
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
  atts = sorted({r["attention"] for r in enc}, key=lambda a: (a != "full", a))
  colors = dict(zip(atts, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
  for a in atts:
    for ratio in sorted({r["ratio"] for r in enc}):
      rs = sorted((r for r in enc if r["attention"] == a and r["ratio"] == ratio and
                   not np.isnan(r["clips_per_s"])), key=lambda r: r["frames"])
      if not rs:
        continue
      style = dict(color=colors[a], marker="o", ls="-" if ratio == 0 else "--",
                   label=f"{a}" + (f" merge {ratio:g}" if ratio else ""))
      x = [r["frames"] for r in rs]
      axes[0].plot(x, [r["clips_per_s"] for r in rs], **style)
      axes[1].plot(x, [r["peak_mib"] for r in rs], **style)
  for ax, label in zip(axes, ("encoder clips/s", "encoder peak memory (MiB)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("frames")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
  axes[1].legend(fontsize=7, ncol=2)
  fig.suptitle("Encoder inference per attention type; dashed: token merging at ratio 0.5 "
               "(shared CPU: relative)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main)
