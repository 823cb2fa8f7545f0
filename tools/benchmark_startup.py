"""Time to the first training step, with cold and warm caches (compilation and trace).

    python tools/benchmark_startup.py --config=configs/demo.py --out=benchmarks/startup
    python tools/benchmark_startup.py --config=configs/demo.py --notrace_cache \
        --out=benchmarks/startup/no_trace_cache     # every start traces the model

Runs `python -m hvlm_jax.train` for one step (no evaluation) `--runs` times in fresh work
directories: the first run starts from an empty cache directory, the later ones reuse it.
`--pairs` repeats that series, each from its own empty cache, because the cold run's time
varies by several seconds between runs; the summary gives the medians over the series. The
dataset is generated before the first timing, so every run reads the same files. Reports for
each run the time from process start to the end of the first training step (the trainer's
"Train step compiled and run once" line; the issue's measure), with the train step's split
into tracing (or reading the trace cache), compilation or cache loading, waiting for the
initial state (its executable loads in a background thread meanwhile), and the first run; the
wall and CPU seconds to process exit (also one checkpoint save); and their ratios to the
series' cold run. Writes results.json.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/demo.py", "Config file (with :args).")
_OUT = flags.DEFINE_string("out", "benchmarks/startup", "Output folder.")
_RUNS = flags.DEFINE_integer("runs", 2, "Runs per pair; the first has a cold cache.")
_PAIRS = flags.DEFINE_integer(
    "pairs", 3, "Independent series of runs, each from its own empty cache: the cold run's time "
    "varies by several seconds from one run to the next, so the ratio is reported per series "
    "and as their median.")
_TRACE_CACHE = flags.DEFINE_bool(
    "trace_cache", True, "config.trace_cache of the runs (false: every start traces the model, "
    "as before the trace cache existed).")
_SET = flags.DEFINE_list(
    "set", [], "Config keys of every run, e.g. --set=model.scan_layers=false (passed as "
    "--config.KEY=VALUE).")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_FIRST_STEP = re.compile(r"Train step compiled and run once in [\d.]+ s \(traced or read from "
                         r"the trace cache ([\d.]+) s, compiled or loaded from the cache "
                         r"([\d.]+) s, (?:waiting for the initial state ([\d.]+) s, )?"
                         r"first step ([\d.]+) s\)")


def _run(workdir: str, cache: str, extra: list[str]) -> dict:
  env = dict(os.environ, HVLM_COMPILATION_CACHE=cache)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cmd = [sys.executable, "-m", "hvlm_jax.train", f"--config={_CONFIG.value}",
         f"--workdir={workdir}", "--config.training.num_steps=1",
         "--config.training.eval_every_steps=0", "--config.training.log_every_steps=1",
         "--config.training.checkpoint_every_steps=1", *extra]
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  t0 = time.perf_counter()
  first_step, split, tail = None, None, []
  with subprocess.Popen(cmd, cwd=_ROOT, env=env, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True) as proc:
    for line in proc.stderr:  # absl logs to stderr; the line is written after step 1 ran.
      tail = (tail + [line])[-40:]
      match = _FIRST_STEP.search(line)
      if match and first_step is None:
        first_step = time.perf_counter() - t0
        split = [float(x) if x is not None else None for x in match.groups()]
  wall = time.perf_counter() - t0
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode or first_step is None:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{''.join(tail)[-3000:]}")
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return dict(first_step_seconds=round(first_step, 2), wall_seconds=round(wall, 2),
              cpu_seconds=round(cpu, 2), train_step_traced_seconds=split[0],
              train_step_compiled_or_loaded_seconds=split[1],
              waiting_for_initial_state_seconds=split[2], first_step_run_seconds=split[3])


def main(argv):
  del argv
  scratch = tempfile.mkdtemp(prefix="hvlm_startup-")
  cache = os.path.join(scratch, "cache")
  try:
    # Generate the dataset (if the config asks for synthetic data) outside the timings.
    _run(os.path.join(scratch, "warmup_data"), os.path.join(scratch, "unused_cache"),
         ["--config.compilation_cache=off", *(f"--config.{kv}" for kv in _SET.value)])
    runs = []
    for pair in range(_PAIRS.value):
      cache = os.path.join(scratch, f"cache{pair}")
      series = []
      for i in range(_RUNS.value):
        series.append(dict(pair=pair + 1, run=i + 1, cache="cold" if i == 0 else "warm",
                           **_run(os.path.join(scratch, f"pair{pair}_run{i}"), cache,
                                  [f"--config.trace_cache={str(_TRACE_CACHE.value).lower()}",
                                   *(f"--config.{kv}" for kv in _SET.value)])))
        print(series[-1], flush=True)
      for r in series:
        for measure in ("first_step", "wall", "cpu"):
          r[f"{measure}_ratio_to_cold"] = round(
              r[f"{measure}_seconds"] / series[0][f"{measure}_seconds"], 3)
      runs += series
    second = [r for r in runs if r["run"] == 2]
    summary = {f"median_{k}": round(float(np.median([r[k] for r in second])), 3) for k in (
        "first_step_ratio_to_cold", "wall_ratio_to_cold", "cpu_ratio_to_cold")} if second else {}
    summary["median_cold_first_step_seconds"] = round(float(np.median(
        [r["first_step_seconds"] for r in runs if r["run"] == 1])), 2)
    if second:
      summary["median_warm_first_step_seconds"] = round(float(np.median(
          [r["first_step_seconds"] for r in second])), 2)
    result = dict(config=_CONFIG.value, trace_cache=_TRACE_CACHE.value,
                  load_average=os.getloadavg(), summary=summary, runs=runs,
                  command=" ".join(["python", "tools/benchmark_startup.py"] + sys.argv[1:]))
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
      json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
