"""`python -m hvlm_jax.evaluate` restores a checkpoint trained on 8 devices onto 1 device and
reproduces the validation metrics measured during training, from the run's own config (its
custom data folder), and scores other data only when told, saying so; question typing."""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np

import data_testutil
from hvlm_jax.eval import evaluate
from test_train import train_config
from hvlm_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _results(workdir, kind):
  return sorted(glob.glob(os.path.join(workdir, "eval", f"{kind}_validation_step4_*")))


def test_evaluate_on_one_device_reproduces_training_validation(tmp_path):
  # A custom data folder: evaluation must find it in the run's config.json, not a flag.
  data_dir = str(tmp_path / "my_data")
  shutil.copytree(data_testutil.dataset_dir(), data_dir)
  config = train_config(eval_every_steps=4)
  config.data.dir = data_dir
  config.mesh.data, config.mesh.tensor = 4, 2
  workdir = str(tmp_path / "run")
  during = trainer.train_and_evaluate(config, workdir)
  env = data_testutil.subprocess_env(1)
  cmd = [sys.executable, "-m", "hvlm_jax.evaluate", f"--workdir={workdir}",
         "--split=validation", "--step=latest"]
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  (metrics_path,) = _results(workdir, "metrics")
  with open(metrics_path) as f:
    after = json.load(f)
  assert after["meta"]["devices"] == 1 and after["meta"]["step"] == 4
  assert after["meta"]["data_dir"] == os.path.join(data_dir, "validation")
  assert after["meta"]["overrides"] == {} and not after["meta"]["data_source_overridden"]
  np.testing.assert_allclose(after["losses"]["loss"], during["val_loss"], rtol=1e-4)
  for name, value in evaluate.headline(after).items():
    np.testing.assert_allclose(value, during[f"val_{name}"], rtol=1e-5, atol=1e-6)
  (report_path,) = _results(workdir, "report")
  (predictions_path,) = _results(workdir, "predictions")
  with open(predictions_path) as f:
    predictions = json.load(f)
  with open(os.path.join(data_dir, "validation", "annotations", "video_qa.json")) as f:
    own_ids = {e["video_id"] for e in json.load(f)}
  assert {p["video_id"] for p in predictions} == own_ids
  assert len(predictions) == after["meta"]["videos"] == 5

  # Other data, asked for explicitly: scored, logged and recorded, the first results kept.
  other = str(tmp_path / "other_data")
  shutil.copytree(data_dir, other)
  for name in ("action_detection", "video_qa", "video_captioning"):
    path = os.path.join(other, "validation", "annotations", f"{name}.json")
    with open(path) as f:
      entries = json.load(f)
    with open(path, "w") as f:
      json.dump(entries[:2], f)
  result = subprocess.run(cmd + [f"--config.data.dir={other}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"data source override data.dir='{other}'" in result.stderr
  paths = _results(workdir, "metrics")
  assert len(paths) == 2 and metrics_path in paths
  with open(next(p for p in paths if p != metrics_path)) as f:
    meta = json.load(f)["meta"]
  assert meta["videos"] == 2 and meta["data_source_overridden"] == ["data.dir"]
  assert meta["overrides"] == {"data.dir": other}


def test_question_type_is_the_first_two_words():
  assert evaluate.question_type("How many  objects are there ?") == "how many"
  assert evaluate.question_type("is there a red circle ?") == "is there"
