"""The trainer's performance logging: FLOPs of the compiled step, per-device throughput, MFU
against a given peak, compile time, and a profiler trace of the steps asked for."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from hvlm_jax.train import op_profile, trainer
from hvlm_jax.train.metric_writer import read_scalars
from test_train import train_config


def test_perf_scalars_and_profile_trace(tmp_path):
  config = train_config(num_steps=3, log_every_steps=1, checkpoint_every_steps=3,
                        profile_steps="1,2", peak_flops=1e12)
  config.mesh.data, config.mesh.tensor = 4, 2
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  scalars = read_scalars(os.path.join(workdir, "tensorboard"))
  for tag in ("perf/compile_seconds", "perf/clips_per_second_per_device",
              "perf/model_tflops_per_second_per_device", "perf/mfu", "perf/data_wait_fraction"):
    assert tag in scalars, sorted(scalars)
  (_, rate), = scalars["perf/steps_per_second"][-1:]
  (_, tflops), = scalars["perf/model_tflops_per_second_per_device"][-1:]
  (_, mfu), = scalars["perf/mfu"][-1:]
  (_, per_device), = scalars["perf/clips_per_second_per_device"][-1:]
  # The identities the trainer promises: MFU = achieved / peak, per device = total / 8.
  np.testing.assert_allclose(mfu, tflops * 1e12 / 1e12, rtol=1e-5)
  np.testing.assert_allclose(per_device, rate * config.data.batch_size / 8, rtol=1e-5)
  flops_per_step = tflops * 1e12 * 8 / rate
  assert 1e6 < flops_per_step < 1e12  # A 1-layer width-32 model on 4 clips of 8 x 32^2.
  assert glob.glob(os.path.join(workdir, "profile", "**", "*.xplane.pb"), recursive=True)
  # The traced program is saved beside the trace, so the trace's time splits by model scope.
  with open(os.path.join(workdir, "profile", "train_step.hlo.txt")) as fh:
    summary = op_profile.summarize(fh.read(), op_profile.latest_trace(
        os.path.join(workdir, "profile")))
  # profile_steps="1,2": two steps, each run by the 8 devices of the mesh.
  assert summary["runs"] == 2 * 8
  assert summary["flops"] > 0
  scopes = {r["scope"] for r in summary["scopes"]}
  assert {"StreamingVLM.encode/encoder/block_*", "StreamingVLM.encode/encoder.embed"} <= scopes


def test_summary_writer_is_imported_without_torch_and_torch_still_imports_afterwards(tmp_path):
  # A fresh interpreter: tensorboardX alone would import torch (about 1 s) when installed.
  pytest.importorskip("torch")
  code = (
      "import sys\n"
      "from hvlm_jax.train.metric_writer import MetricWriter\n"
      f"w = MetricWriter({str(tmp_path)!r}, 1)\n"
      "w.write_scalars(1, {'loss': 1.0})\n"
      "assert 'torch' not in sys.modules, 'tensorboardX imported torch'\n"
      "import torch\n"
      "assert torch.ones(2).sum().item() == 2.0\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr[-2000:]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
