"""`python -m hvlm_jax.evaluate` restores a checkpoint trained on 8 devices onto 1 device and
reproduces the validation metrics measured during training; question typing."""
import json
import os
import subprocess
import sys

import numpy as np

import data_testutil
from hvlm_jax.eval import evaluate
from test_train import train_config
from hvlm_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_on_one_device_reproduces_training_validation(tmp_path):
  config = train_config(eval_every_steps=4)
  config.mesh.data, config.mesh.tensor = 4, 2
  workdir = str(tmp_path / "run")
  during = trainer.train_and_evaluate(config, workdir)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [sys.executable, "-m", "hvlm_jax.evaluate",
         f"--config=tests/tiny_train_config.py:data_dir={data_testutil.dataset_dir()}",
         f"--workdir={workdir}", "--split=validation", "--step=latest"]
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "eval", "metrics_validation_step4.json")) as f:
    after = json.load(f)
  assert after["meta"]["devices"] == 1 and after["meta"]["step"] == 4
  np.testing.assert_allclose(after["losses"]["loss"], during["val_loss"], rtol=1e-4)
  for name, value in evaluate.headline(after).items():
    np.testing.assert_allclose(value, during[f"val_{name}"], rtol=1e-5, atol=1e-6)
  assert os.path.exists(os.path.join(workdir, "eval", "report_validation_step4.md"))
  with open(os.path.join(workdir, "eval", "predictions_validation_step4.json")) as f:
    predictions = json.load(f)
  assert len(predictions) == after["meta"]["videos"] == 5


def test_question_type_is_the_first_two_words():
  assert evaluate.question_type("How many  objects are there ?") == "how many"
  assert evaluate.question_type("is there a red circle ?") == "is there"
