"""Never lose a run, as real processes: a changed config is refused with every file kept,
corrupt checkpoints are quarantined and training goes past them, no non-finite state reaches
disk, SIGTERM to one of two processes stops both at the same step (exit 75) and the resumed
run equals an uninterrupted one; the best checkpoint survives retention across a resume."""
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import data_testutil
from hvlm_jax.checkpoint import Checkpointer
from hvlm_jax.train.state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_train_config.py")
EXIT_STOPPED = 75


def command(module, workdir, *flags, devices=8, log=None, wait=True):
  env = data_testutil.subprocess_env(devices)
  cmd = [sys.executable, "-m", module, f"--workdir={workdir}", *flags]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log or subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out or ""


def train(workdir, *flags, **kw):
  return command("hvlm_jax.train", workdir,
                 f"--config={CONFIG}:data_dir={data_testutil.dataset_dir()}",
                 "--config.mesh.data=4", "--config.mesh.tensor=2", *flags, **kw)


def files_of(workdir) -> dict[str, str]:
  out = {}
  for path in glob.glob(os.path.join(workdir, "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha1(f.read()).hexdigest()
  return out


def steps_of(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def stored_params(workdir, step):
  """Parameters of a checkpoint on this process's first device, whatever mesh saved them."""
  ckpt = Checkpointer(workdir, read_only=True, async_save=False)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                        ckpt.manager.item_metadata(step)["params"].tree)
  return ckpt.manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(target)))["params"]


def error_line(out: str) -> str:
  lines = [line for line in out.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A 6-step run with checkpoints 2, 4, 6 (copied by each test that changes it)."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  rc, out = train(workdir, "--config.training.num_steps=6")
  assert rc == 0, out[-3000:]
  assert steps_of(workdir) == [2, 4, 6]
  return workdir


def test_changed_config_is_refused_keeping_every_file_and_new_run_moves_it_aside(
    finished_run, tmp_path):
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  before = files_of(workdir)
  for flag, key in (("--config.model.hidden_size=64", "model.hidden_size: 32 -> 64"),
                    ("--config.model.attention.type=performer", "model.attention.type")):
    rc, out = train(workdir, "--config.training.num_steps=8", flag)
    assert rc == 2 and key in error_line(out) and "training.resume=new_run" in out
    assert files_of(workdir) == before  # Nothing touched, nothing lost.
  rc, out = train(workdir, "--config.training.num_steps=2", "--config.model.hidden_size=64",
                  "--config.training.resume=new_run")
  assert rc == 0, out[-3000:]
  (previous,) = glob.glob(os.path.join(workdir, "previous_runs", "*"))
  moved = {os.path.relpath(os.path.join(previous, k), workdir): v for k, v in before.items()}
  assert {k: v for k, v in files_of(workdir).items() if k in moved} == moved
  assert steps_of(workdir) == [2]
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["hidden_size"] == 64


def test_corrupt_checkpoints_are_quarantined_and_training_goes_past_them(finished_run,
                                                                         tmp_path):
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  for path in glob.glob(os.path.join(ckpts, "4", "params", "**", "*"), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 0:  # Truncated.
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  for path in glob.glob(os.path.join(ckpts, "6", "params", "ocdbt.process_0", "**", "*"),
                        recursive=True):
    if os.path.isfile(path):  # Garbage of the same size.
      with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(os.path.getsize(path)))
  os.makedirs(os.path.join(ckpts, "8"))  # An empty step folder.

  rc, out = command("hvlm_jax.evaluate", workdir, "--split=validation")
  assert rc == 0, out[-3000:]
  (metrics_file,) = glob.glob(os.path.join(workdir, "eval", "metrics_validation_step2_*.json"))
  meta = json.load(open(metrics_file))["meta"]
  assert meta["step"] == 2 and meta["skipped_checkpoints"] == "8, 6, 4"

  rc, out = train(workdir, "--config.training.num_steps=10")
  assert rc == 0, out[-3000:]
  assert "Resumed from" in out and f"{ckpts}/2." in out
  assert steps_of(workdir)[-1] == 10 and 8 in steps_of(workdir)  # Saved past 8 again.
  quarantined = sorted(os.listdir(os.path.join(workdir, "quarantine")))
  assert [q.split("_")[1] for q in quarantined] == ["4", "6", "8"]  # Moved, never deleted.


def test_nonfinite_updates_never_reach_a_checkpoint_and_a_restart_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  # A learning rate of 1e38 makes the parameters overflow after its first update: every later
  # loss is NaN. Checkpoints every step, the loss read every 4 (the old loop saved NaN weights).
  flags = ["--config.training.num_steps=8", "--config.training.checkpoint_every_steps=1",
           "--config.training.log_every_steps=4"]
  rc, out = train(workdir, *flags, "--config.training.learning_rate=1e38",
                  "--config.training.max_nonfinite_steps=3")
  assert rc == 2 and "NaN/Inf at 3 step(s) in a row" in error_line(out)
  assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))
  steps = steps_of(workdir)
  assert steps and steps[-1] < 8
  for step in steps:
    assert all(np.isfinite(np.asarray(x)).all()
               for x in jax.tree.leaves(stored_params(workdir, step))), step
  rc, out = train(workdir, *flags, "--config.training.max_nonfinite_steps=100")
  assert rc == 0, out[-3000:]
  assert f"Resumed from {workdir}/checkpoints/{steps[-1]}." in out
  assert "nonfinite_steps=" in out


def test_best_checkpoint_is_chosen_by_its_metric_and_kept_across_a_resume(tmp_path):
  state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones((2, 3))},
                     opt_state={"m": jnp.zeros((2, 3))})
  options = dict(keep_latest=2, keep_best=1, best_metric="val_loss", best_mode="min",
                 async_save=False)
  ckpt = Checkpointer(str(tmp_path), **options)
  for step, loss in zip((10, 20, 30, 40), (1.0, 5.0, 6.0, 7.0)):
    ckpt.save(step, state, metrics={"val_loss": loss})
  assert ckpt.best_step() == ckpt.resolve("best") == 10
  assert ckpt.all_steps() == [10, 30, 40]
  ckpt.close()
  resumed = Checkpointer(str(tmp_path), **options)  # A restarted run: a new manager.
  resumed.save(50, state)
  resumed.save(60, state, metrics={"val_loss": 3.0})
  assert resumed.all_steps() == [10, 50, 60] and resumed.resolve("best") == 10
  assert resumed.metrics(10) == {"val_loss": 1.0}
  reader = Checkpointer(str(tmp_path), read_only=True, best_metric="val_loss", best_mode="min")
  assert reader.resolve("best") == 10 and reader.resolve("latest") == 60


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes_exactly(tmp_path):
  from test_train_processes import free_port
  flags = [f"--config={CONFIG}:data_dir={data_testutil.dataset_dir()},batch_size=8",
           "--config.training.num_steps=12", "--config.training.checkpoint_every_steps=100",
           "--config.mesh.data=2", "--config.mesh.fsdp=2", "--num_processes=2"]

  def pair(workdir, tag):
    port = free_port()
    logs = [open(tmp_path / f"{tag}{i}.log", "w") for i in range(2)]
    return [command("hvlm_jax.train", workdir, *flags, f"--coordinator_address=localhost:{port}",
                    f"--process_id={i}", devices=2, log=logs[i], wait=False)
            for i in range(2)], [tmp_path / f"{tag}{i}.log" for i in range(2)]

  stopped = str(tmp_path / "stopped")
  procs, logs = pair(stopped, "first")
  try:
    end = time.time() + 300
    while "step 2/" not in logs[0].read_text() and time.time() < end:
      assert procs[0].poll() is None, logs[0].read_text()[-3000:]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # Only process 1 is told.
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert codes == [EXIT_STOPPED, EXIT_STOPPED], [log.read_text()[-2000:] for log in logs]
  (step,) = steps_of(stopped)
  assert 2 <= step < 12
  for log in logs:
    assert f"Stopped at step {step} with a checkpoint" in log.read_text()
  assert not os.path.exists(os.path.join(stopped, "final_metrics.json"))

  procs, logs = pair(stopped, "resumed")
  assert [p.wait(timeout=600) for p in procs] == [0, 0], logs[0].read_text()[-3000:]
  assert f"Resumed from {stopped}/checkpoints/{step}." in logs[0].read_text()
  straight = str(tmp_path / "straight")
  procs, logs = pair(straight, "straight")
  assert [p.wait(timeout=600) for p in procs] == [0, 0], logs[0].read_text()[-3000:]
  for a, b in zip(jax.tree.leaves(stored_params(stopped, 12)),
                  jax.tree.leaves(stored_params(straight, 12))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
