"""`python -m hvlm_jax.predict` on a trained tiny run: two generated videos of different sizes
and lengths (one long enough to stream through the memory bank) with questions -> the
documented schema, the evaluator's predictions for the same videos, self-contained HTML
reports; one-sentence refusals; TensorBoard event files read back with TensorBoard's reader."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import data_testutil
from hvlm_jax import data as data_lib
from hvlm_jax.eval import evaluate, predict
from hvlm_jax.train import metric_writer, trainer
from test_train import train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-step tiny run with token merging, evaluated (with images) at step 2."""
  config = train_config(num_steps=2, eval_every_steps=2, checkpoint_every_steps=2)
  config.model.token_merging.enabled = True
  config.model.token_merging.target_compression_ratio = 0.3
  config.mesh.data, config.mesh.tensor = 4, 2
  workdir = str(tmp_path_factory.mktemp("predict") / "run")
  trainer.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  """A 3 s 40x56 video (one clip) and a 12 s 48x48 one (streamed: segments are 8 s)."""
  root = tmp_path_factory.mktemp("videos")
  rng = np.random.default_rng(0)
  paths = []
  for name, (n, h, w, fps) in dict(short=(24, 40, 56, 8), long=(48, 48, 48, 4)).items():
    frames = rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8)
    frames[:, 8:24, 8:24] = (np.arange(n) * 5 % 255)[:, None, None, None]
    path = str(root / f"{name}.mp4")
    data_testutil.write_video(path, frames, fps=fps)
    paths.append(path)
  return paths


def _questions(config):
  split = data_lib.load_split(config, "training")
  return sorted({q for e in split.entries for q, _ in e.qa_pairs or ()})[:2]


def test_predict_writes_the_schema_and_agrees_with_the_evaluator(run, videos, tmp_path):
  config, workdir = run
  questions = _questions(config)
  folder = predict.predict_videos(workdir, videos, questions=questions, out=str(tmp_path))
  with open(os.path.join(folder, "predictions.json")) as f:
    doc = json.load(f)
  assert doc["schema"] == predict.SCHEMA_VERSION and doc["run"]["step"] == 2
  short, long = doc["videos"]
  assert (short["streamed"], long["streamed"]) == (False, True) and long["segments"] == 2
  assert abs(long["duration"] - 12.0) < 0.3 and abs(short["duration"] - 3.0) < 0.3
  vocabs = data_lib.Vocabularies.load(os.path.join(workdir, "vocabularies.json"))
  for v in doc["videos"]:
    assert set(v) >= {"video", "name", "duration", "domain", "detections", "caption",
                      "questions", "classes", "merging", "report", "timeline"}
    assert [q["question"] for q in v["questions"]] == questions
    for q in v["questions"]:
      scores = [t["score"] for t in q["top_k"]]
      assert q["answer"] == q["top_k"][0]["answer"] and scores == sorted(scores, reverse=True)
      assert q["answer"] in vocabs.answers and 0 < q["score"] <= 1
    assert [c["score"] for c in v["classes"]] == sorted((c["score"] for c in v["classes"]),
                                                        reverse=True)
    assert all(c["label"] in vocabs.actions for c in v["classes"])
    for d in v["detections"]:
      assert d["label"] in vocabs.actions and 0 <= d["start"] < d["end"] <= v["duration"] + 1e-3
    assert v["merging"]["enabled"] and v["merging"]["kept"] < v["merging"]["tokens"] == 64
    assert v["domain"]["used"] == "general"

  # The evaluator on the same two videos (a test split of them, answers from the vocabulary).
  data = tmp_path / "data" / "test"
  os.makedirs(data / "videos")
  os.makedirs(data / "annotations")
  for p in videos:
    os.symlink(p, data / "videos" / os.path.basename(p))
  (data / "annotations" / "video_qa.json").write_text(json.dumps([
      dict(video_id=os.path.splitext(os.path.basename(p))[0],
           qa_pairs=[dict(question=q, answer=vocabs.answers[0]) for q in questions])
      for p in videos]))
  metrics = evaluate.evaluate_checkpoint(workdir, split="test",
                                         overrides={"data.dir": str(tmp_path / "data")})
  with open(os.path.join(workdir, "eval", f"predictions_{metrics['meta']['name']}.json")) as f:
    records = {r["video_id"]: r for r in json.load(f)}
  for v in doc["videos"]:
    rec = records[v["name"]]
    assert v["caption"] == rec["caption"]
    assert [q["answer"] for q in v["questions"]] == [q["predicted"] for q in rec["qa"]]
    ours = sorted((d["label"], d["start"], d["end"], d["score"]) for d in v["detections"])
    theirs = sorted((d["label"], d["start"], d["end"], d["score"]) for d in rec["detections"])
    assert [d[0] for d in ours] == [d[0] for d in theirs]
    np.testing.assert_allclose([d[1:] for d in ours], [d[1:] for d in theirs], atol=1e-4)

  # Reports: self-contained HTML naming every detection, and the timeline PNG.
  for v in doc["videos"]:
    with open(os.path.join(folder, v["report"])) as f:
      page = f.read()
    sources = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for d in v["detections"]:
      assert f"<td>{d['label']}</td><td>{d['start']:.2f}</td><td>{d['end']:.2f}</td>" in page
    assert "merged tokens" in page
    with open(os.path.join(folder, v["timeline"]), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  # A second call writes a new folder; the first is left as it was.
  again = predict.predict_videos(workdir, videos[:1], out=str(tmp_path))
  assert again != folder and os.path.exists(os.path.join(folder, "predictions.json"))


@pytest.mark.parametrize("args, sentence", [
    (["missing.mp4"], "Video missing.mp4 does not exist."),
    (["{short}", "--question=   "], "has no words"),
    (["{short}", "--question=zzqx blorf"], "uses no word the run was trained on"),
    (["{not_video}"], "Cannot open video"),
])
def test_bad_video_or_question_is_one_sentence(run, videos, tmp_path, args, sentence):
  _, workdir = run
  bad = tmp_path / "notes.mp4"
  bad.write_text("not a video")
  args = [a.format(short=videos[0], not_video=bad) for a in args]
  env = data_testutil.subprocess_env(1)
  result = subprocess.run([sys.executable, "-m", "hvlm_jax.predict", f"--workdir={workdir}",
                           f"--out={tmp_path / 'out'}"] + args, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and sentence in errors[0], result.stderr[-2000:]
  assert not os.path.exists(tmp_path / "out")  # Refused before any output folder.


def test_tensorboard_holds_val_scalars_images_and_config(run):
  config, workdir = run
  logdir = os.path.join(workdir, "tensorboard")
  acc = metric_writer.read_events(logdir)
  tags = acc.Tags()
  scalars = set(tags["scalars"])
  assert {"val/loss", "val/qa_accuracy", "val/action_mAP_0.5", "train/loss",
          "perf/steps_per_second", "perf/compile_seconds", "perf/eval_seconds"} <= scalars
  assert not any("@" in t or t.startswith("val_") for t in scalars)
  assert "val/video_qa_accuracy" not in scalars  # One name per metric: val/qa_accuracy.
  assert [e.step for e in acc.Scalars("val/loss")] == [2]
  val_ids = data_lib.load_split(config, "validation").video_ids[:3]
  for vid in val_ids:
    for kind in ("timeline", "caption", "merged_tokens"):
      (image,) = acc.Images(f"val/{vid}/{kind}")
      assert image.step == 2 and image.encoded_image_string[:4] == b"\x89PNG"
  (text,) = metric_writer.read_text(logdir, "config")
  assert json.loads(text.replace("\n    ", "\n"))["model"]["hidden_size"] == 32
  assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")
