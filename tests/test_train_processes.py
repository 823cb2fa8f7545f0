"""The trainer as real processes: SIGKILL then resume, SIGTERM saves, two-process multi-host."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np

import data_testutil
from hvlm_jax.train.metric_writer import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_train_config.py")


def launch(workdir, *flags, devices=8, log=None):
  env = data_testutil.subprocess_env(devices)
  cmd = [sys.executable, "-m", "hvlm_jax.train", f"--workdir={workdir}", *flags]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log or subprocess.DEVNULL,
                          stderr=subprocess.STDOUT)


def finished_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def wait_for(predicate, timeout, what):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return
    time.sleep(0.5)
  raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_resumes_from_last_complete_checkpoint_and_sigterm_saves(tmp_path):
  workdir = str(tmp_path / "run")
  flags = [f"--config={CONFIG}:data_dir={data_testutil.dataset_dir()}",
           "--config.training.num_steps=100000", "--config.mesh.data=4",
           "--config.mesh.tensor=2"]
  log1 = open(tmp_path / "first.log", "w")
  proc = launch(workdir, *flags, log=log1)
  try:
    wait_for(lambda: len(finished_steps(workdir)) >= 2, 300, "two checkpoints")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  before = finished_steps(workdir)
  log2 = tmp_path / "second.log"
  proc = launch(workdir, *flags, log=open(log2, "w"))
  try:
    wait_for(lambda: "Resumed from" in log2.read_text(), 300, "resume")
    resumed = int(re.search(r"Resumed from \S+/(\d+)", log2.read_text()).group(1))
    # The newest checkpoint that was complete when the process died.
    assert resumed == before[-1]
    wait_for(lambda: re.search(rf"step {resumed + 1}/", log2.read_text()), 120, "a step")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75  # Stopped before the end: EXIT_STOPPED, not 0.
  finally:
    if proc.poll() is None:
      proc.kill()
  text = log2.read_text()
  stopped = int(re.search(r"Stopped at step (\d+)", text).group(1))
  assert stopped > resumed and stopped in finished_steps(workdir)


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one_process_with_all_devices(tmp_path):
  flags = [f"--config={CONFIG}:data_dir={data_testutil.dataset_dir()},batch_size=8",
           "--config.training.num_steps=3", "--config.training.checkpoint_every_steps=3"]
  # Two devices per process: each device is a Gloo rank, and connecting ranks dominates.
  single = launch(str(tmp_path / "single"), *flags, "--config.mesh.data=4", devices=4,
                  log=open(tmp_path / "single.log", "w"))
  port = free_port()
  multi = [launch(str(tmp_path / "multi"), *flags, "--config.mesh.data=2",
                  "--config.mesh.fsdp=2", f"--coordinator_address=localhost:{port}",
                  "--num_processes=2", f"--process_id={i}", devices=2,
                  log=open(tmp_path / f"multi{i}.log", "w")) for i in range(2)]
  for p, name in [(single, "single"), (multi[0], "multi0"), (multi[1], "multi1")]:
    rc = p.wait(timeout=600)
    assert rc == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
  assert "on 2 process(es)" in (tmp_path / "multi0.log").read_text()
  a = read_scalars(str(tmp_path / "single" / "tensorboard"))["train/loss"]
  b = read_scalars(str(tmp_path / "multi" / "tensorboard"))["train/loss"]
  assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3]
  np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-4)
  # Each process wrote its own iterator state (its shard of the data).
  files = os.listdir(tmp_path / "multi" / "checkpoints" / "3" / "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(files)
