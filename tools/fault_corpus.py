"""Fault corpus: bad inputs and faults through the real CLI, each outcome classified.

    python tools/fault_corpus.py [--out=benchmarks/faults/results.json] [--jobs=2] [--only=SUBSTR]

Every case runs `python -m hvlm_jax.train` / `hvlm_jax.evaluate` as a subprocess in its own
sandbox (a copy of a small synthetic dataset and, where needed, of a finished 4-step run with
checkpoints 2 and 4). Outcomes:
  error      exit status 2 and one line `error: <one sentence>` (no traceback);
  handled    the fault is survived as designed (exit 0 or 75) and named in a warning line;
  traceback  a Python traceback, or a non-zero exit without an `error:` line;
  silent     exit 0 and nothing in the output names the fault.
After each case every file the sandbox held before must still exist, possibly moved (same
content anywhere in the sandbox); files the trainer rewrites by design (config.json,
parameters.txt, final_metrics.json, tensorboard/) are not counted.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_train_config.py")
REWRITTEN = ("config.json", "parameters.txt", "final_metrics.json")
KEEP = "--config.training.keep_checkpoints=50"  # Retention deletes nothing during the corpus.


# ----- sandbox ---------------------------------------------------------------------------------
def make_dataset(root: str):
  sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
  import data_testutil
  from hvlm_jax.data import synthetic
  config = data_testutil.tiny_config(root)
  synthetic.generate_dataset(root, synthetic.settings_from_config(config), num_processes=1)


def run_cli(module, args, cwd, timeout=600, signal_after=None):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if signal_after:
    sig, pattern = signal_after
    out = []
    for line in proc.stdout:  # Signal once the log shows `pattern`.
      out.append(line)
      if pattern in line:
        proc.send_signal(sig)
        break
    rest, _ = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(out) + rest
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def snapshot(root):
  files = {}
  for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
    if os.path.isfile(path) and not os.path.islink(path):
      with open(path, "rb") as f:
        files[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
  return files


def lost_files(before, after):
  contents = set(after.values())
  return sorted(p for p, h in before.items() if h not in contents and p not in after
                and os.path.basename(p) not in REWRITTEN and "tensorboard" not in p)


# ----- cases -----------------------------------------------------------------------------------
def train(*flags, steps=4):
  return ("hvlm_jax.train", ["--config={config}", "--workdir={run}", "--config.mesh.data=4",
                             "--config.mesh.tensor=2", f"--config.training.num_steps={steps}",
                             KEEP, *flags])


def evaluate(*flags):
  return ("hvlm_jax.evaluate", ["--workdir={run}", "--split=validation",
                                "--config.data.dir={box}/data", *flags])


def write(rel, data):
  def f(box):
    path = os.path.join(box, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as fh:
      fh.write(data)
  return f


def edit_json(rel, fn):
  def f(box):
    path = os.path.join(box, rel)
    with open(path) as fh:
      obj = json.load(fh)
    with open(path, "w") as fh:
      json.dump(fn(obj), fh)
  return f


def replace_with_dir(rel):
  def f(box):
    path = os.path.join(box, rel)
    if os.path.isfile(path):
      os.remove(path)
    os.makedirs(path, exist_ok=True)
  return f


def remove(rel):
  return lambda box: shutil.rmtree(os.path.join(box, rel)) if os.path.isdir(
      os.path.join(box, rel)) else os.remove(os.path.join(box, rel))


def corrupt_checkpoint(step, how):
  def f(box):
    folder = os.path.join(box, "run", "checkpoints", str(step))
    if how == "empty":
      os.makedirs(folder, exist_ok=True)
      return
    for path in glob.glob(os.path.join(folder, "params", "**", "*"), recursive=True):
      if os.path.isfile(path) and os.path.getsize(path) > 0:
        if how == "truncate":
          with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
        elif how == "garbage" and "ocdbt.process_0" in path:
          with open(path, "wb") as fh:
            fh.write(os.urandom(os.path.getsize(path)))
  return f


def seq(*fs):
  def f(box):
    for g in fs:
      g(box)
  return f


def first(obj, fn):
  fn(obj[0])
  return obj


TRAIN_ANN = "data/training/annotations/action_detection.json"
VAL_ANN = "data/validation/annotations/action_detection.json"
QA_ANN = "data/training/annotations/video_qa.json"
TRAIN_VIDEO = "data/training/videos/training_00000.mp4"
VAL_VIDEO = "data/validation/videos/validation_00000.mp4"


def cases():
  c = []
  add = lambda name, kind, cmd, setup=None, needs_run=False, expect="error", signal_after=None: \
      c.append(dict(name=name, kind=kind, cmd=cmd, setup=setup, needs_run=needs_run,
                    expect=expect, signal_after=signal_after))
  # Config keys and arguments.
  for key, value in [("model.hidden_size", "0"), ("model.attention.type", "flash"),
                     ("training.learning_rate", "nan"), ("training.learning_rate", "-1"),
                     ("training.loss_weights.video_qa", "inf"), ("data.batch_size", "0"),
                     ("mesh.data", "3"), ("data.input", "vidoe"), ("training.finetune", "lroa"),
                     ("training.domain_balancing", "sprots=2"), ("training.resume", "maybe"),
                     ("training.nonfinite", "ignore"), ("training.max_nonfinite_steps", "0"),
                     ("training.best_mode", "maximum"), ("training.log_every_steps", "0"),
                     ("data.name", "foldr"), ("model.dropout_rate", "1.5"),
                     ("training.lerning_rate", "1.0"), ("model.dtype", "float64"),
                     ("training.remat_policy", "everything"), ("data.eval_batch_size", "-2"),
                     ("model.streaming.memory_capacity", "0")]:
    add(f"config {key}={value}", "config", train(f"--config.{key}={value}"))
  add("config two -1 mesh sizes", "config", train("--config.mesh.data=-1", "--config.mesh.fsdp=-1",
                                                  "--config.mesh.tensor=1"))
  add("config num_steps and num_epochs 0", "config", train("--config.training.num_epochs=0",
                                                           steps=0))
  add("config file missing", "config", ("hvlm_jax.train", ["--config=nope.py",
                                                             "--workdir={run}"]))
  add("config file is a directory", "config", ("hvlm_jax.train", ["--config=configs",
                                                                   "--workdir={run}"]))
  add("config argument frames=many", "config", ("hvlm_jax.train", [
      "--config=configs/base.py:frames=many", "--workdir={run}"]))
  add("config argument unknown", "config", ("hvlm_jax.train", [
      "--config=configs/base.py:atention=full", "--workdir={run}"]))
  # Paths.
  add("data.dir missing", "paths", train("--config.data.dir={box}/nowhere"))
  add("workdir is a file", "paths", train(), setup=write("run", "a file"))
  add("annotation path is a directory", "paths", train(), setup=replace_with_dir(TRAIN_ANN))
  add("videos folder missing", "paths", train(), setup=remove("data/training/videos"))
  add("annotations folder missing", "paths", train(),
      setup=remove("data/training/annotations"))
  add("validation split missing", "paths", train(), setup=remove("data/validation"))
  add("evaluate workdir missing", "paths", evaluate(), setup=None)
  add("evaluate workdir without a run", "paths", evaluate(), setup=lambda b: os.makedirs(
      os.path.join(b, "run")))
  add("evaluate workdir is a file", "paths", evaluate(), setup=write("run", "x"))
  # Annotations.
  add("annotation JSON truncated", "annotations", train(), setup=write(TRAIN_ANN, '[{"video_id"'))
  add("annotation JSON not a list", "annotations", train(), setup=write(TRAIN_ANN, '{"a": 1}'))
  add("annotation bytes not UTF-8", "annotations", train(), setup=write(TRAIN_ANN, b"\xff\xfe["))
  add("annotation entry without video_id", "annotations", train(),
      setup=edit_json(TRAIN_ANN, lambda o: first(o, lambda e: e.pop("video_id"))))
  add("annotation segment end before start", "annotations", train(), setup=edit_json(
      TRAIN_ANN, lambda o: first(o, lambda e: e["actions"][0].update(start=1.5, end=0.5))))
  add("annotation negative time", "annotations", train(), setup=edit_json(
      TRAIN_ANN, lambda o: first(o, lambda e: e["actions"][0].update(start=-3.0))))
  add("annotation unknown domain", "annotations", train(), setup=edit_json(
      TRAIN_ANN, lambda o: first(o, lambda e: e.update(domain="cooking"))))
  add("annotation label is a number", "annotations", train(), setup=edit_json(
      TRAIN_ANN, lambda o: first(o, lambda e: e["actions"][0].update(label=7))))
  add("annotation entry is a string", "annotations", train(),
      setup=edit_json(TRAIN_ANN, lambda o: ["oops"] + o))
  add("qa pair without answer", "annotations", train(), setup=edit_json(
      QA_ANN, lambda o: first(o, lambda e: e["qa_pairs"][0].pop("answer"))))
  add("all annotation lists empty", "annotations", train(), setup=lambda b: [
      write(p, "[]")(b) for p in glob.glob(os.path.join(b, "data/training/annotations/*.json"))])
  add("annotated video without file (strict)", "annotations",
      train("--config.data.strict=True"), setup=remove(TRAIN_VIDEO))
  add("video without annotations (strict)", "annotations", train("--config.data.strict=True"),
      setup=lambda b: shutil.copy(os.path.join(b, TRAIN_VIDEO),
                                  os.path.join(b, "data/training/videos/extra.mp4")))
  add("annotated video without file", "annotations", train(), setup=remove(TRAIN_VIDEO),
      expect="handled")
  # Videos.
  add("training video zero bytes", "videos", train(), setup=write(TRAIN_VIDEO, b""),
      expect="handled")
  add("training video garbage", "videos", train(), setup=write(TRAIN_VIDEO, os.urandom(4096)),
      expect="handled")
  add("all training videos corrupt", "videos", train(), setup=lambda b: [
      write(os.path.relpath(p, b), b"garbage")(b)
      for p in glob.glob(os.path.join(b, "data/training/videos/*.mp4"))])
  add("validation video garbage", "videos", train(), setup=write(VAL_VIDEO, os.urandom(4096)))
  add("video path is a directory", "videos", train(), setup=replace_with_dir(TRAIN_VIDEO),
      expect="handled")
  add("evaluate: validation video missing", "videos", evaluate(), setup=remove(VAL_VIDEO),
      needs_run=True, expect="handled")
  add("evaluate: validation video missing (strict)", "videos",
      evaluate("--config.data.strict=True"), setup=remove(VAL_VIDEO), needs_run=True)
  add("evaluate: validation video truncated", "videos", evaluate(), needs_run=True,
      setup=lambda b: open(os.path.join(b, VAL_VIDEO), "r+b").truncate(300))
  # Checkpoints and run files.
  for how in ("truncate", "garbage", "empty"):
    step = 6 if how == "empty" else 4
    add(f"train: latest checkpoint {how}", "checkpoints", train(steps=8), needs_run=True,
        setup=corrupt_checkpoint(step, how), expect="handled")
    add(f"evaluate: latest checkpoint {how}", "checkpoints", evaluate(), needs_run=True,
        setup=corrupt_checkpoint(step, how), expect="handled")
  add("train: every checkpoint garbage", "checkpoints", train(steps=6), needs_run=True,
      setup=seq(corrupt_checkpoint(2, "garbage"), corrupt_checkpoint(4, "garbage")),
      expect="handled")
  add("evaluate --step=4 garbage", "checkpoints", evaluate("--step=4"), needs_run=True,
      setup=corrupt_checkpoint(4, "garbage"))
  add("evaluate --step=last", "checkpoints", evaluate("--step=last"), needs_run=True)
  add("evaluate --step=99", "checkpoints", evaluate("--step=99"), needs_run=True)
  add("evaluate --step=best without metrics", "checkpoints", evaluate("--step=best"),
      needs_run=True, expect="handled")
  add("evaluate another model size", "checkpoints", evaluate("--config.model.hidden_size=64"),
      needs_run=True)
  add("evaluate another attention type", "checkpoints",
      evaluate("--config.model.attention.type=performer"), needs_run=True)
  add("train with another hidden size", "checkpoints",
      train("--config.model.hidden_size=64", steps=8), needs_run=True)
  add("train with another attention type", "checkpoints",
      train("--config.model.attention.type=performer", steps=8), needs_run=True)
  add("train with another frame count", "checkpoints",
      train("--config.data.video.num_frames=4", steps=8), needs_run=True)
  add("train resume=new_run with another size", "checkpoints",
      train("--config.model.hidden_size=64", "--config.training.resume=new_run", steps=2),
      needs_run=True, expect="handled")
  add("train: vocabularies.json corrupt", "checkpoints", train(steps=6), needs_run=True,
      setup=write("run/vocabularies.json", "{not json"))
  add("evaluate: vocabularies.json corrupt", "checkpoints", evaluate(), needs_run=True,
      setup=write("run/vocabularies.json", '{"words": 3}'))
  add("train: config.json corrupt", "checkpoints", train(steps=6), needs_run=True,
      setup=write("run/config.json", "{"))
  add("evaluate: config.json corrupt", "checkpoints", evaluate(), needs_run=True,
      setup=write("run/config.json", "[1, 2"))
  add("train: checkpoints is a file", "checkpoints", train(steps=6), needs_run=True,
      setup=seq(remove("run/checkpoints"), write("run/checkpoints", "x")))
  add("train: learning rate 1e38 (NaN)", "checkpoints",
      train("--config.training.learning_rate=1e38", "--config.training.max_nonfinite_steps=2",
            steps=8))
  # Signals.
  add("SIGTERM during training", "signals", train(steps=10000), expect="handled",
      signal_after=(signal.SIGTERM, "step 3/"))
  add("SIGINT during training", "signals", train(steps=10000), expect="handled",
      signal_after=(signal.SIGINT, "step 3/"))
  add("SIGTERM during compilation", "signals", train(steps=10000), expect="handled",
      signal_after=(signal.SIGTERM, "Compiling the train step"))
  add("SIGTERM then resume", "signals", train(steps=8), needs_run=True, expect="handled",
      signal_after=(signal.SIGTERM, "step 5/"))
  return c


# ----- running and classifying -----------------------------------------------------------------
def classify(case, rc, out):
  lines = [line for line in out.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error: ")]
  if "Traceback (most recent call last)" in out:
    return "traceback"
  if rc == 2 and len(errors) == 1:
    return "error"
  if rc in (0, 75):
    warned = any(" W" in line[:30] or line.startswith(("W", "stopped:")) for line in lines
                 if any(w in line.lower() for w in ("skip", "moved", "could not", "stopped",
                                                    "not scored", "sigterm", "'best'",
                                                    "corrupt", "preemption")))
    return "handled" if warned else "silent"
  return "traceback" if not errors else "error"


def run_case(case, data_src, run_src, work):
  box = tempfile.mkdtemp(prefix="case-", dir=work)
  shutil.copytree(data_src, os.path.join(box, "data"))
  if case["needs_run"]:
    shutil.copytree(run_src, os.path.join(box, "run"))
  if case["setup"]:
    case["setup"](box)
  before = snapshot(box)
  module, args = case["cmd"]
  config = f"{CONFIG}:data_dir={os.path.join(box, 'data')}"
  args = [a.format(config=config, run=os.path.join(box, "run"), box=box) for a in args]
  t0 = time.time()
  try:
    rc, out = run_cli(module, args, box, signal_after=case["signal_after"])
  except subprocess.TimeoutExpired:
    rc, out = -1, "timeout"
  outcome = classify(case, rc, out)
  lost = lost_files(before, snapshot(box))
  error = next((line for line in out.splitlines() if line.startswith("error: ")), "")
  shutil.rmtree(box, ignore_errors=True)
  return dict(name=case["name"], kind=case["kind"], expected=case["expect"], outcome=outcome,
              exit=rc, seconds=round(time.time() - t0, 1), lost_files=lost, error=error,
              tail=out.strip().splitlines()[-3:] if outcome in ("traceback", "silent") else [])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "faults",
                                                    "results.json"))
  parser.add_argument("--jobs", type=int, default=2)
  parser.add_argument("--only", default="", help="comma-separated name substrings")
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix="fault_corpus-")
  data_src, run_src = os.path.join(work, "data"), os.path.join(work, "run")
  make_dataset(data_src)
  rc, out = run_cli("hvlm_jax.train", [f"--config={CONFIG}:data_dir={data_src}",
                                       f"--workdir={run_src}", "--config.mesh.data=4",
                                       "--config.mesh.tensor=2", KEEP,
                                       "--config.training.num_steps=4"], work)
  assert rc == 0, out[-3000:]
  selected = [c for c in cases() if any(o in c["name"] for o in args.only.split(","))]
  t0 = time.time()
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    results = list(pool.map(lambda c: run_case(c, data_src, run_src, work), selected))
  counts = {k: sum(r["outcome"] == k for r in results)
            for k in ("error", "handled", "traceback", "silent")}
  summary = dict(cases=len(results), **counts,
                 unexpected=[r["name"] for r in results if r["outcome"] != r["expected"]],
                 files_lost=sum(len(r["lost_files"]) for r in results),
                 seconds=round(time.time() - t0))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(summary=summary, results=results), f, indent=1)
  for r in results:
    mark = "" if r["outcome"] == r["expected"] else f"  (expected {r['expected']})"
    print(f"{r['outcome']:<9} {r['exit']:>3} {r['kind']:<11} {r['name']}{mark}"
          + (f"  LOST {r['lost_files']}" if r["lost_files"] else ""))
  print(json.dumps(summary))
  shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
