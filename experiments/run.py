"""Runs a study: trains each variant, scores it on the test split, writes the results table.

    python experiments/run.py --study=attention_ablation
    python experiments/run.py --study=merging_sweep --steps=200 --layers=2
    python experiments/run.py --study=experiments/lora_new_domain.py --variants=pretrain,scratch
    python experiments/run.py --study=attention_ablation --seeds=0,1,2   # mean ± std per metric

A study is a config file in experiments/ with VARIANTS (and optionally INIT_FROM, PER_DOMAIN;
see experiments/common.py). Per variant, in table order: `train_and_evaluate` into
<workdir>/<study>/<variant> (a rerun resumes from its checkpoints), then `evaluate_checkpoint`
on --split. A variant listed in INIT_FROM starts from its parent's last checkpoint. Each
finished variant's row is saved to <out>/<study>/runs/<variant>.json and reused by later runs
with the same budget (--rerun to redo), so an interrupted study continues where it stopped;
a failing variant is recorded with its error and the others still run.

With --seeds, every variant runs once per seed (config.seed: initialisation and data order;
a child in INIT_FROM starts from its parent of the same seed); the table reports mean ± sample
std per metric and names the differences from the first variant larger than two standard
errors of the difference. Writes <out>/<study>/results.{md,csv,json}. Wall-clock columns (train clips/s, train
minutes) come from a machine that may be shared: compare them within one table only.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from hvlm_jax.config import import_sibling  # noqa: E402
from hvlm_jax.data import synthetic  # noqa: E402
from hvlm_jax.train.metric_writer import read_scalars  # noqa: E402

_STUDY = flags.DEFINE_string("study", None, "Study name (experiments/<name>.py) or path.")
_VARIANTS = flags.DEFINE_list("variants", [], "Subset of the study's variants (default all).")
_STEPS = flags.DEFINE_integer("steps", 150, "Training steps per variant.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Encoder blocks.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Global batch size.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to score.")
_OUT = flags.DEFINE_string("out", "benchmarks/studies", "Results directory.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/studies", "Training run directories.")
_RERUN = flags.DEFINE_bool("rerun", False, "Ignore saved rows and train / evaluate again.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds (config.seed: initialisation and data "
                           "order); the table reports mean +- std over them.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", "", "config.data.dir for every variant (default: the config's). A private "
    "copy keeps a long study safe from others regenerating a shared synthetic dataset.")

HEADLINE = (("action_mAP_0.5", "mAP@0.5"), ("action_mAP", "mAP"), ("qa_accuracy", "QA acc"),
            ("caption_CIDEr", "CIDEr"), ("caption_BLEU-4", "BLEU-4"),
            ("classification_top1", "top-1"))


def load_study(study: str):
  path = study if study.endswith(".py") else os.path.join(_ROOT, "experiments", f"{study}.py")
  if not os.path.exists(path):
    raise app.UsageError(f"--study={study!r}: no file {path}.")
  return os.path.splitext(os.path.basename(path))[0], import_sibling(path, os.path.basename(path))


class StudyStopped(RuntimeError):
  """Training was asked to stop (SIGTERM); the study ends without recording the variant."""


class _TrainableCount(logging.Handler):
  """Catches the trainer's "Trainable parameters: X of Y" line."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.text = ""

  def emit(self, record):
    message = record.getMessage()
    if message.startswith("Trainable parameters:"):
      self.text = message.split(":", 1)[1].split("(")[0].strip()


def run_dir(workdir: str, name: str, seed: int) -> str:
  """A variant's run directory for `seed` (seed 0 keeps the single-seed layout)."""
  return os.path.join(workdir, name if seed == 0 else f"{name}_seed{seed}")


def run_variant(study, study_name: str, name: str, workdir: str, seed: int = 0) -> dict:
  """Trains and scores one variant with one seed; returns its row (metrics, budget, timings)."""
  from hvlm_jax.eval import evaluate as evaluate_lib
  from hvlm_jax.train import trainer
  arg = f"variant={name},steps={_STEPS.value},layers={_LAYERS.value},batch_size={_BATCH.value}"
  config = study.get_config(arg)
  config.seed = seed
  if _DATA_DIR.value:
    config.data.dir = os.path.abspath(_DATA_DIR.value)
  parent = getattr(study, "INIT_FROM", {}).get(name)
  if parent:
    config.init_from = os.path.abspath(run_dir(workdir, parent, seed))
    if not os.path.isdir(os.path.join(config.init_from, "checkpoints")):
      raise FileNotFoundError(f"Variant {name!r} starts from {parent!r}, which has no "
                              f"checkpoints in {config.init_from}; run {parent!r} first.")
  wd = run_dir(workdir, name, seed)
  counter = _TrainableCount()
  logging.getLogger().addHandler(counter)
  load = [os.getloadavg()[0]]
  t0 = time.perf_counter()
  try:
    trainer.train_and_evaluate(config, wd)
  finally:
    logging.getLogger().removeHandler(counter)
  train_s = time.perf_counter() - t0
  load.append(os.getloadavg()[0])
  final = os.path.join(wd, "final_metrics.json")  # Absent when stopped (SIGTERM) early.
  if not os.path.exists(final):
    raise StudyStopped(f"{name} (seed {seed}) stopped before step "
                       f"{config.training.num_steps}; rerun the same command to resume it.")
  metrics = evaluate_lib.evaluate_checkpoint(wd, step="latest", split=_SPLIT.value)
  scalars = read_scalars(os.path.join(wd, "tensorboard"))
  rates = [v for _, v in scalars.get("perf/clips_per_second", [])][1:]  # 1st: compile.
  row = dict(variant=name, seed=seed, changes=describe(study.VARIANTS[name], parent),
             status="ok",
             trainable=counter.text, steps=_STEPS.value, layers=_LAYERS.value,
             batch_size=_BATCH.value, train_loss=_last(scalars.get("train/loss")),
             test_loss=metrics.get("losses", {}).get("loss", float("nan")),
             train_clips_per_s=float(np.median(rates)) if rates else float("nan"),
             train_minutes=train_s / 60, load=load, workdir=wd)
  row.update(evaluate_lib.headline(metrics))
  if "qa" in metrics:
    row["qa_majority_baseline"] = metrics["qa"]["majority_baseline"]["accuracy"]
  for domain, m in sorted(metrics.get("per_domain", {}).items()):
    row.update({f"{domain}/{k}": v for k, v in evaluate_lib.headline(m).items()})
  return row


def _quiet_libraries(record: logging.LogRecord) -> bool:
  """INFO from this project, WARNING and up from libraries (orbax, grain, jax)."""
  return record.levelno >= logging.WARNING or "hvlm_jax" in record.pathname or (
      "experiments" in record.pathname)


def _last(series):
  return series[-1][1] if series else float("nan")


def describe(overrides: dict, parent: str | None) -> str:
  text = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "demo defaults"
  return text + (f"; init_from={parent}" if parent else "")


def main(argv):
  del argv
  if not _STUDY.value:
    raise app.UsageError("--study is required (e.g. --study=attention_ablation).")
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_quiet_libraries)
  name, study = load_study(_STUDY.value)
  variants = _VARIANTS.value or list(study.VARIANTS)
  unknown = [v for v in variants if v not in study.VARIANTS]
  if unknown:
    raise app.UsageError(f"--variants: {unknown} not in {name}: {', '.join(study.VARIANTS)}.")
  out = os.path.join(_OUT.value, name)
  os.makedirs(os.path.join(out, "runs"), exist_ok=True)
  workdir = os.path.join(_WORKDIR.value, name)
  budget = dict(steps=_STEPS.value, layers=_LAYERS.value, batch_size=_BATCH.value,
                split=_SPLIT.value, data_dir=_DATA_DIR.value)
  rows = []
  seeds = [int(x) for x in _SEEDS.value]
  for seed in seeds:
    for v in variants:
      saved = os.path.join(out, "runs", f"{v}.json" if seed == 0 else f"{v}_seed{seed}.json")
      if os.path.exists(saved) and not _RERUN.value:
        with open(saved) as f:  # Rows saved before metric names lost their "@".
          row = {k.replace("mAP@0.5", "mAP_0.5"): v for k, v in json.load(f).items()}
        if row.get("budget") == budget and row.get("status") == "ok":
          logging.info("%s/%s seed %d: reusing %s", name, v, seed, saved)
          rows.append(dict(row, seed=row.get("seed", seed)))
          continue
      logging.info("%s/%s seed %d: training %d steps", name, v, seed, _STEPS.value)
      try:
        row = run_variant(study, name, v, workdir, seed)
      except StudyStopped as e:
        logging.warning("%s", e)
        write_results(out, name, study, rows, budget)
        return
      except Exception as e:  # One broken variant must not lose the others' results.
        logging.error("%s/%s failed:\n%s", name, v, traceback.format_exc())
        row = dict(variant=v, seed=seed, changes=describe(study.VARIANTS[v], None),
                   status=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      row["budget"] = budget
      with open(saved + ".tmp", "w") as f:
        json.dump(row, f, indent=1, default=float)
      os.replace(saved + ".tmp", saved)
      rows.append(row)
      jax.clear_caches()
  write_results(out, name, study, rows, budget)


def _meta(name, study, budget) -> dict:
  config = study.get_config(f"steps={budget['steps']},layers={budget['layers']},"
                            f"batch_size={budget['batch_size']}")
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT,
                            capture_output=True, text=True).stdout.strip()
  except OSError:
    commit = ""
  m, d = config.model, config.data
  footage = synthetic.settings_from_config(config).get("footage")  # Only when not the default.
  return dict(study=name, description=(study.__doc__ or "").strip().splitlines()[0],
              command="python experiments/run.py " + " ".join(sys.argv[1:]), commit=commit,
              device=f"{jax.devices()[0].platform} x{jax.device_count()} "
                     f"({platform.machine()}, {os.cpu_count()} cores, shared)",
              budget=budget, width=m.hidden_size, heads=m.num_attention_heads,
              mlp=m.mlp_dim, frames=d.video.num_frames, frame_size=d.video.frame_size,
              dataset=f"{d.name} {dict(d.synthetic.num_videos)}" + (
                  f", footage {footage}" if footage else ""),
              seed=config.seed,
              learning_rate=config.training.learning_rate)


def write_results(out, name, study, rows, budget):
  meta = _meta(name, study, budget)
  keys = []
  for r in rows:
    keys += [k for k in r if k not in keys and k != "budget"]
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1, default=float)
  text = markdown(meta, rows, getattr(study, "PER_DOMAIN", False))
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
  print(text)


def _f(x, digits=3):
  return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


METRIC_KEYS = ("train_loss", "test_loss") + tuple(k for k, _ in HEADLINE)


def aggregate(rows) -> list[dict]:
  """Per variant (first-seen order), over its successful seeds: n, seeds and, per metric,
  (mean, sample standard deviation); the std is nan with a single seed."""
  out = {}
  for r in rows:
    if r.get("status") != "ok":
      continue
    out.setdefault(r["variant"], dict(variant=r["variant"], changes=r["changes"],
                                      trainable=r.get("trainable", ""), runs=[]))["runs"].append(r)
  for a in out.values():
    a["n"], a["seeds"] = len(a["runs"]), sorted(r.get("seed", 0) for r in a["runs"])
    domain_keys = sorted({k for r in a["runs"] for k in r if "/" in k})  # "general/qa_..."
    for k in METRIC_KEYS + tuple(domain_keys):
      values = np.asarray([r[k] for r in a["runs"] if r.get(k) is not None], float)
      a[k] = ((float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else np.nan)
              if len(values) else (np.nan, np.nan))
  return list(out.values())


def domain_columns(rows) -> list[tuple[str, str, str]]:
  """(domain, metric key, title) of the per-domain table: mAP@0.5, QA and CIDEr per domain."""
  domains = sorted({k.split("/")[0] for r in rows for k in r if "/" in k})
  return [(d, k, h) for d in domains for k, h in HEADLINE[:1] + HEADLINE[2:4]]


def significant_differences(groups: list[dict], columns=()) -> list[str]:
  """Each variant against the first: the metrics whose mean differs by more than two standard
  errors of the difference (Welch: sqrt(s1^2 / n1 + s2^2 / n2)), as sentences; `columns`
  (domain_columns) adds the per-domain metrics."""
  if len(groups) < 2:
    return []
  base, lines = groups[0], []
  metrics = [("test_loss", "test loss")] + list(HEADLINE) + [
      (f"{d}/{k}", f"{d} {h}") for d, k, h in columns]
  for g in groups[1:]:
    for k, h in metrics:
      if k not in base or k not in g:
        continue
      (m1, s1), (m2, s2) = base[k], g[k]
      if min(base["n"], g["n"]) < 2 or np.isnan([m1, m2, s1, s2]).any():
        continue
      se = float(np.sqrt(s1 ** 2 / base["n"] + s2 ** 2 / g["n"]))
      if abs(m2 - m1) > 2 * se and se > 0:
        lines.append(f"{g['variant']} vs {base['variant']}: {h} {m2 - m1:+.3f} "
                     f"(2 SE = {2 * se:.3f})")
  return lines


def _pm(stat, digits=3) -> str:
  mean, std = stat
  if np.isnan(mean):
    return "-"
  return f"{mean:.{digits}f}" + ("" if np.isnan(std) else f" ± {std:.{digits}f}")


def markdown(meta, rows, per_domain: bool) -> str:
  b = meta["budget"]
  groups = aggregate(rows)
  if any(g["n"] > 1 for g in groups):
    return markdown_seeds(meta, rows, groups, per_domain)
  baseline = [r["qa_majority_baseline"] for r in rows if "qa_majority_baseline" in r]
  lines = [
      f"# Study: {meta['study']}", "", meta["description"], "",
      f"**Budget: {b['steps']} training steps per variant, {b['layers']} encoder block(s), batch "
      f"{b['batch_size']}** (the demo trains 600 steps with 4 blocks), width {meta['width']}, "
      f"{meta['heads']} heads, MLP {meta['mlp']}, {meta['frames']} frames of "
      f"{meta['frame_size']}^2, learning rate {meta['learning_rate']}, seed {meta['seed']}, one "
      f"run per variant (no error bars). Data: {meta['dataset']}; scored on the "
      f"{b['split']} split. " + (f"QA majority-answer baseline: {baseline[0]:.3f}. "
                                 if baseline else "") +
      f"Commit {meta['commit']}; {meta['device']}; `{meta['command']}`.", "",
      f"| variant | changes | trainable params | train loss | {b['split']} loss | " +
      " | ".join(h for _, h in HEADLINE) + " | train clips/s* | train min* |",
      "|---" * (7 + len(HEADLINE)) + "|"]
  for r in rows:
    if r.get("status") != "ok":
      lines.append(f"| {r['variant']} | {r['changes']} | {r['status']} |" + " |" *
                   (4 + len(HEADLINE)))
      continue
    lines.append(
        f"| {r['variant']} | {r['changes']} | {r['trainable']} | {_f(r['train_loss'])} | "
        f"{_f(r['test_loss'])} | " + " | ".join(_f(r.get(k)) for k, _ in HEADLINE) +
        f" | {_f(r['train_clips_per_s'], 2)} | {_f(r['train_minutes'], 1)} |")
  if per_domain:
    cols = domain_columns(rows)
    lines += ["", "Per domain (test split):", "",
              "| variant | " + " | ".join(f"{d} {h}" for d, _, h in cols) + " |",
              "|---" * (1 + len(cols)) + "|"]
    for r in rows:
      if r.get("status") == "ok":
        lines.append(f"| {r['variant']} | " +
                     " | ".join(_f(r.get(f"{d}/{k}")) for d, k, _ in cols) + " |")
  lines += ["", "\\* Wall-clock on a CPU shared with other jobs (train minutes include "
            "compilation and checkpointing): compare within this table only.", ""]
  return "\n".join(lines)


def markdown_seeds(meta, rows, groups, per_domain: bool = False) -> str:
  """The table with several seeds: mean ± std per metric (and per domain with `per_domain`),
  and the differences that exceed two standard errors."""
  b = meta["budget"]
  seeds = sorted({r.get("seed", 0) for r in rows})
  lines = [
      f"# Study: {meta['study']}", "", meta["description"], "",
      f"**Budget: {b['steps']} training steps per variant, {b['layers']} encoder block(s), batch "
      f"{b['batch_size']}; seeds {seeds} (mean ± sample std over seeds).** Width "
      f"{meta['width']}, {meta['heads']} heads, MLP {meta['mlp']}, {meta['frames']} frames of "
      f"{meta['frame_size']}^2, learning rate {meta['learning_rate']}. Data: {meta['dataset']}; "
      f"scored on the {b['split']} split. Commit {meta['commit']}; {meta['device']}; "
      f"`{meta['command']}`.", "",
      f"| variant | changes | seeds | train loss | {b['split']} loss | " +
      " | ".join(h for _, h in HEADLINE) + " |", "|---" * (5 + len(HEADLINE)) + "|"]
  for g in groups:
    lines.append(f"| {g['variant']} | {g['changes']} | {g['n']} | {_pm(g['train_loss'])} | "
                 f"{_pm(g['test_loss'])} | " +
                 " | ".join(_pm(g[k]) for k, _ in HEADLINE) + " |")
  failed = [r for r in rows if r.get("status") != "ok"]
  for r in failed:
    lines.append(f"| {r['variant']} | {r['changes']} | seed {r.get('seed', 0)}: "
                 f"{r['status']} |" + " |" * (2 + len(HEADLINE)))
  cols = domain_columns(rows) if per_domain else []
  if cols:
    lines += ["", f"Per domain ({b['split']} split), mean ± sample std:", "",
              "| variant | " + " | ".join(f"{d} {h}" for d, _, h in cols) + " |",
              "|---" * (1 + len(cols)) + "|"]
    lines += [f"| {g['variant']} | " + " | ".join(_pm(g.get(f"{d}/{k}", (np.nan, np.nan)))
                                                  for d, k, _ in cols) + " |" for g in groups]
  diffs = significant_differences(groups, cols)
  lines += ["", f"Differences from {groups[0]['variant']} larger than two standard errors: " +
            ("; ".join(diffs) + "." if diffs else "none (every difference is within noise at "
             "this number of seeds)."), ""]
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
