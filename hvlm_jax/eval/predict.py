"""`python -m hvlm_jax.predict`: every head of a trained run on any video, with a report.

    python -m hvlm_jax.predict --workdir=runs/demo [--step=best|latest|N] a.mp4 [b.mp4 ...] \
        [--question="what color is the square?" ...] [--out=DIR]

The run setup is `evaluate_checkpoint`'s (hvlm_jax/run.py: the run's own config.json, its
vocabularies, parameters restored onto the devices present) and the videos go through the
evaluator's own readers: a video longer than model.streaming.auto_threshold segments streams
through the memory bank (hvlm_jax/data/segments.py, eval/streaming.py), a shorter one is one
clip (data.pipeline.eval_batches). Predictions therefore equal the evaluator's for the same
videos. Output: a new folder per call, `OUT/predict_step{N}_{time}` (OUT defaults to
WORKDIR/predictions), holding predictions.json (schema: PREDICTIONS_SCHEMA below and the
README), and per video `{name}.html` (self-contained: images inline) and `{name}_timeline.png`.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import html
import json
import logging
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from hvlm_jax import data as data_lib
from hvlm_jax import run as run_lib
from hvlm_jax import sharding
from hvlm_jax.checkpoint import Checkpointer
from hvlm_jax.config import ConfigError
from hvlm_jax.data import segments as segments_lib
from hvlm_jax.data import video as video_lib
from hvlm_jax.data.annotations import SplitData, VideoEntry
from hvlm_jax.data.text import UNK, tokenize
from hvlm_jax.eval import evaluate as evaluate_lib
from hvlm_jax.eval import streaming as eval_streaming
from hvlm_jax.eval import visualize
from hvlm_jax.models import streaming

TOP_K = 5
TIMELINE_FRAMES = 10
SCHEMA_VERSION = "hvlm_jax.predict/1"
PREDICTIONS_SCHEMA = """predictions.json:
  schema: "hvlm_jax.predict/1"; run: {workdir, step, config (path), devices, created}
  videos: one object per input video, in the order given:
    video (path), name (file stem, made unique), duration (s), streamed (bool: through the
    memory bank), segments (count, 1 when not streamed), report (HTML file), timeline (PNG)
    domain: {used (the domain the model ran with), router (the router's pick, or null)}
    detections: [{label, start, end (seconds), score}] by descending score
    caption: text; caption_score: the beam's log-probability score
    questions: [{question, answer, score, top_k: [{answer, score}]}] (softmax scores)
    classes: [{label, score}] top-k clip classes (softmax over the action labels)
    merging: {enabled, tokens (grid tokens of one clip), kept (tokens after merging) }"""


class PredictionError(ValueError):
  """A video or question given to predict cannot be used; one sentence naming it."""


# ----- what the model computes ---------------------------------------------------------------
def _clip_outputs(module, batch):
  """HierarchicalVLM.predict plus what the report needs: QA answer probabilities and the
  encoder's merge assignment (the same parameters, the same deterministic pass)."""
  out = dict(module.predict(batch))
  enc = None
  if module.qa_head is not None:
    enc = module.encode(batch, train=False)
    out["qa_probs"] = jax.nn.softmax(module.qa_head(batch["questions"], enc["tokens"],
                                                    enc["token_mask"], enc["token_bias"]))
  out.update(_merge_groups(module, batch, out.get("domain")))
  return out


def _merge_groups(module, batch, domain=None):
  """{assignment (B, N), sizes (B, M)} of the encoder's token merging; {} when it is off."""
  if not module.config.token_merging.enabled or "video" not in batch:
    return {}
  lora = module.config.domain_modules.lora.enabled
  enc = module.encoder(batch["video"], domain=(domain if domain is not None else
                                               batch.get("domain")) if lora else None,
                       deterministic=True)
  return {k: enc[k] for k in ("assignment", "sizes") if k in enc}


def _video_qa_probs(module, bank, bank_mask, bank_sizes, batch):
  logits = module.video_outputs(bank, bank_mask, bank_sizes, batch, train=False)["qa_logits"]
  return jax.nn.softmax(logits)


class Predictor:
  """Runs every head over the videos of a SplitData (clip or streamed, as the evaluator)."""

  def __init__(self, config, model, vocabs, mesh):
    self.config, self.model, self.vocabs, self.mesh = config, model, vocabs, mesh
    self.clip_fn = jax.jit(functools.partial(model.apply, method=_clip_outputs))
    self.merge_fn = jax.jit(functools.partial(model.apply, method=_merge_groups))
    self.streams = isinstance(model, streaming.StreamingVLM)
    if self.streams:
      self.step_fn = jax.jit(functools.partial(streaming.segment_step, model), donate_argnums=1)

      def end(variables, state, batch):
        preds = streaming.finish(model, variables, state, batch)
        if "video_qa" in model.config.heads.tasks:
          preds["qa_probs"] = model.apply(variables, state["bank"], state["bank_mask"],
                                          state["bank_sizes"], batch, method=_video_qa_probs)
        return preds
      self.end_fn = jax.jit(end)

  def put(self, batch):
    return sharding.global_batch(batch, self.mesh)

  def run(self, params, split: SplitData, *, progress=None) -> list[dict]:
    """Per video: the evaluator's record (`evaluate._records`) plus qa_probs (Q, A),
    class_probs (C), router_domain, streamed, segments, clip (T, S, S, 3) uint8 model input
    (first segment when streamed) and merge {assignment, sizes} when merging is on."""
    clips, long = (segments_lib.split_by_length(self.config, split) if self.streams
                   else (split, dataclasses.replace(split, entries=[])))
    out = {}
    variables = {"params": params}
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.flax_logical_rules()):
      if len(clips):
        for batch in data_lib.eval_batches(self.config, clips, self.vocabs):
          preds = jax.device_get(self.clip_fn(variables, self.put(batch)))
          for rec in self._records(preds, batch, clips, streamed=False):
            out[rec["video_id"]] = rec
          if progress:
            progress(int(batch["valid"].sum()))
      num_steps = self.config.data.video.num_frames // self.config.model.tubelet_size[0]
      for video, segs in segments_lib.streaming_eval_batches(self.config, long, self.vocabs):
        first = {}

        def keep_first(segs=segs, first=first):
          for s in segs:
            if not first:
              first.update(s)
            yield s
        state = streaming.init_state(self.model, len(video["valid"]), num_steps)
        preds = eval_streaming.stream_predict(self.step_fn, self.end_fn, variables, state, video,
                                              keep_first(), put=self.put)
        preds = dict(jax.device_get(preds))
        if "video" in first:
          preds.update(jax.device_get(self.merge_fn(variables, self.put(
              {k: first[k] for k in ("video", "domain")}))))
          video = dict(video, video=first["video"])
        for rec in self._records(preds, video, long, streamed=True):
          out[rec["video_id"]] = rec
        if progress:
          progress(int(video["valid"].sum()))
    return [out[e.video_id] for e in split.entries]

  def _records(self, preds, batch, split, *, streamed):
    base = evaluate_lib._records(preds, batch, split, self.vocabs)
    rows = np.flatnonzero(batch["valid"])
    for rec, i in zip(base, rows):
      entry = split.entries[int(batch["index"][i])]
      rec.update(streamed=streamed, path=entry.path, duration=float(batch["duration"][i])
                 if "duration" in batch else entry.duration,
                 segments=int(batch["num_segments"][i]) if streamed else 1)
      if "qa_probs" in preds and entry.qa_pairs:
        rec["qa_probs"] = np.asarray(preds["qa_probs"][i][:len(entry.qa_pairs)], np.float32)
      if "classification_logits" in preds:
        rec["class_probs"] = np.asarray(jax.nn.softmax(
            jnp.asarray(preds["classification_logits"][i], jnp.float32)))
      if "router_domain" in preds:
        rec["router_domain"] = int(preds["router_domain"][i])
      if "domain" in preds:
        rec["domain_used"] = int(preds["domain"][i])
      if "video" in batch:
        rec["clip"] = np.asarray(batch["video"][i])
      if "assignment" in preds:
        rec["merge"] = dict(assignment=np.asarray(preds["assignment"][i]),
                            sizes=np.asarray(preds["sizes"][i]))
    return base


# ----- inputs --------------------------------------------------------------------------------
def video_entries(paths: list[str], questions: list[str], vocabs, config,
                  domain: str = "") -> list[VideoEntry]:
  """One VideoEntry per video file (the same questions for each); raises PredictionError or
  VideoError with one sentence naming the file or question."""
  if not paths:
    raise PredictionError("Give at least one video file to predict on (positional argument).")
  q_max = config.data.max_questions
  if len(questions) > q_max:
    raise PredictionError(f"{len(questions)} questions given but the run answers at most "
                          f"config.data.max_questions={q_max} per video.")
  heads = tuple(config.model.heads.tasks)
  if questions and "video_qa" not in heads:
    raise PredictionError(f"--question given but this run has no QA head "
                          f"(config.model.heads.tasks={heads}).")
  for q in questions:
    words = tokenize(q)
    if not words:
      raise PredictionError(f"Question {q!r} has no words.")
    if all(vocabs.encode(w, 1)[0] == UNK for w in words):
      raise PredictionError(f"Question {q!r} uses no word the run was trained on (its "
                            "vocabularies.json); the model cannot read it.")
    if len(words) > config.data.question_length:
      logging.warning("Question %r has %d words; the model reads the first %d "
                      "(config.data.question_length).", q, len(words),
                      config.data.question_length)
  if domain and domain not in vocabs.domains:
    raise PredictionError(f"--domain={domain!r} is not one of the run's domains "
                          f"{tuple(vocabs.domains)}.")
  entries, names = [], set()
  for path in paths:
    full = os.path.abspath(path)
    if not os.path.isfile(full):
      raise PredictionError(f"Video {path} does not exist.")
    duration = video_lib.probe_duration(full)
    stem = name = os.path.splitext(os.path.basename(full))[0]
    n = 1
    while name in names:
      n += 1
      name = f"{stem}_{n}"
    names.add(name)
    entries.append(VideoEntry(video_id=name, path=full, duration=duration,
                              domain=domain or "general",
                              qa_pairs=[(q, "") for q in questions] if questions else None))
  return entries


def new_output_folder(parent: str, step: int) -> str:
  """A folder that did not exist: `parent/predict_step{N}_{YYYYmmdd-HHMMSS}[_k]`."""
  os.makedirs(parent, exist_ok=True)
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  base = os.path.join(parent, f"predict_step{step}_{stamp}")
  path, n = base, 1
  while True:
    try:
      os.makedirs(path)
      return path
    except FileExistsError:
      n += 1
      path = f"{base}_{n}"


# ----- the command ---------------------------------------------------------------------------
def predict_videos(workdir: str, videos: list[str], *, questions=(), step="latest",
                   out: str | None = None, domain: str = "", overrides: dict | None = None
                   ) -> str:
  """Restores the run, predicts every head on `videos`, writes predictions.json and a report
  per video into a new folder; returns that folder."""
  t0 = time.perf_counter()
  workdir = os.path.abspath(workdir)
  config, _ = run_lib.load_run_config(workdir, overrides)
  vocabs = run_lib.load_vocabularies(workdir)
  config = run_lib.fill_from_vocabularies(config, vocabs)
  config.mesh = ml_collections.ConfigDict(run_lib.INFERENCE_MESH)
  if config.data.input == "features":
    raise ConfigError("This run was trained on precomputed features (config.data.input="
                      "'features'); predict needs a run trained on videos.")
  config.data.input = "video"  # A cache holds the same frames; new videos are decoded.
  config.data.memory_cache_mb, config.data.num_workers = 0, 0
  run_lib.validate(config, jax.device_count(), training=False)
  run_lib.enable_compilation_cache(config)
  entries = video_entries(list(videos), list(questions), vocabs, config, domain)
  ckpt = Checkpointer(workdir, read_only=True, async_save=False)
  step = ckpt.resolve(step)
  mesh = sharding.make_mesh(config.mesh)
  config.data.eval_batch_size = mesh.size
  split = SplitData(name="predict", root=os.path.dirname(entries[0].path), entries=entries)
  model = run_lib.build_model(config)
  example = next(iter(data_lib.eval_batches(config, dataclasses.replace(
      split, entries=entries[:1]), vocabs)))
  params = run_lib.restore_params(ckpt, step, model, example, mesh)
  logging.info("Restored %s step %d in %.1f s; predicting on %d video(s).", workdir, step,
               time.perf_counter() - t0, len(entries))
  folder = new_output_folder(out or os.path.join(workdir, "predictions"), step)
  from tqdm import tqdm
  with tqdm(total=len(entries), desc="predict", unit="video") as bar:
    records = Predictor(config, model, vocabs, mesh).run(params, split, progress=bar.update)
  results = [describe(r, config, vocabs) for r in records]
  for result, rec in zip(results, records):
    write_report(folder, result, rec, config)
  doc = dict(schema=SCHEMA_VERSION,
             run=dict(workdir=workdir, step=int(step), config=run_lib.config_path(workdir),
                      devices=mesh.size, created=datetime.datetime.now().isoformat(
                          timespec="seconds")),
             videos=results)
  with open(os.path.join(folder, "predictions.json"), "w") as f:
    json.dump(doc, f, indent=1)
  logging.info("Predictions for %d video(s) in %.1f s: %s/predictions.json and one HTML "
               "report per video.", len(results), time.perf_counter() - t0, folder)
  print(f"Results in {folder} (predictions.json, " +
        ", ".join(r["report"] for r in results) + ")")
  return folder


def describe(rec: dict, config, vocabs) -> dict:
  """The predictions.json object of one video (PREDICTIONS_SCHEMA)."""
  domains = vocabs.domains
  out = dict(video=rec["path"], name=rec["video_id"], duration=float(rec["duration"]),
             streamed=bool(rec["streamed"]), segments=int(rec["segments"]),
             report=f"{rec['video_id']}.html", timeline=f"{rec['video_id']}_timeline.png")
  used = rec.get("domain_used")
  out["domain"] = dict(used=domains[used] if used is not None else rec["domain"],
                       router=domains[rec["router_domain"]] if "router_domain" in rec
                       else None)
  if "detections" in rec:
    out["detections"] = sorted(({k: (float(v) if k != "label" else v) for k, v in d.items()}
                                for d in rec["detections"]), key=lambda d: -d["score"])
  if "caption" in rec:
    out["caption"] = rec["caption"]
  if "qa" in rec:
    probs = rec.get("qa_probs")
    out["questions"] = []
    for j, q in enumerate(rec["qa"]):
      item = dict(question=q["question"], answer=q["predicted"])
      if probs is not None:
        top = np.argsort(-probs[j])[:TOP_K]
        item["score"] = float(probs[j][vocabs.answers.index(q["predicted"])])
        item["top_k"] = [dict(answer=vocabs.answers[int(a)], score=float(probs[j][a]))
                         for a in top]
      out["questions"].append(item)
  if "class_probs" in rec:
    p = rec["class_probs"]
    out["classes"] = [dict(label=vocabs.actions[int(c)], score=float(p[c]))
                      for c in np.argsort(-p)[:TOP_K]]
  merge = rec.get("merge")
  tokens = _grid_tokens(config)
  out["merging"] = dict(enabled=bool(config.model.token_merging.enabled), tokens=tokens,
                        kept=int((merge["sizes"] > 0).sum()) if merge else tokens)
  return out


def _grid_tokens(config) -> int:
  steps, per_frame = run_lib.token_grid(config)
  return int(steps * per_frame)


def timeline_frames(path: str, duration: float, k: int = TIMELINE_FRAMES, short_side: int = 96):
  times = video_lib.sample_times(duration, k)[0]
  frames, pts, _ = video_lib.decode_clip(path, lambda d: times, short_side=short_side)
  return frames, pts


def write_report(folder: str, result: dict, rec: dict, config) -> None:
  """`{name}_timeline.png` and the self-contained `{name}.html` of one video."""
  frames, pts = timeline_frames(result["video"], result["duration"])
  tl = visualize.timeline(frames, pts, result["duration"], result.get("detections", []),
                          title=f"{result['name']}: detections over {len(frames)} sampled "
                                "frames")
  with open(os.path.join(folder, result["timeline"]), "wb") as f:
    f.write(visualize.png_bytes(tl))
  merge_img = None
  if rec.get("merge") is not None and "clip" in rec:
    merge_img = visualize.merge_map(rec["clip"], rec["merge"]["assignment"],
                                    rec["merge"]["sizes"], tuple(config.model.tubelet_size))
  with open(os.path.join(folder, result["report"]), "w") as f:
    f.write(report_html(result, tl, merge_img))


def report_html(result: dict, timeline_img, merge_img=None) -> str:
  """One video's report: no script, no stylesheet or image from elsewhere (data URIs)."""
  e = html.escape
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(result['name'])}"
           "</title><style>body{font-family:sans-serif;margin:24px;max-width:1100px}"
           "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
           "img{max-width:100%}</style></head><body>",
           f"<h1>{e(result['name'])}</h1><p>{e(result['video'])}: {result['duration']:.1f} s"
           f"{', streamed in ' + str(result['segments']) + ' segments' if result['streamed'] else ''}"
           f"; domain {e(str(result['domain']['used']))}"
           f"{' (router: ' + e(result['domain']['router']) + ')' if result['domain']['router'] else ''}"
           "</p>",
           f"<h2>Timeline</h2><img alt='timeline' src='{visualize.data_uri(timeline_img)}'>"]
  if "detections" in result:
    rows = "".join(f"<tr class='detection'><td>{e(d['label'])}</td><td>{d['start']:.2f}</td>"
                   f"<td>{d['end']:.2f}</td><td>{d['score']:.3f}</td></tr>"
                   for d in result["detections"])
    parts.append("<h2>Detections</h2><table><tr><th>label</th><th>start (s)</th>"
                 f"<th>end (s)</th><th>score</th></tr>{rows}</table>"
                 if rows else "<h2>Detections</h2><p>None above the score threshold.</p>")
  if "caption" in result:
    parts.append(f"<h2>Caption</h2><p class='caption'>{e(result['caption'])}</p>")
  if result.get("questions"):
    rows = "".join(
        f"<tr><td>{e(q['question'])}</td><td><b>{e(q['answer'])}</b>"
        f"{' (%.3f)' % q['score'] if 'score' in q else ''}</td><td>"
        + ", ".join(f"{e(t['answer'])} {t['score']:.3f}" for t in q.get("top_k", []))
        + "</td></tr>" for q in result["questions"])
    parts.append("<h2>Questions</h2><table><tr><th>question</th><th>answer</th>"
                 f"<th>top {TOP_K}</th></tr>{rows}</table>")
  if result.get("classes"):
    parts.append("<h2>Clip classes</h2><p>" + ", ".join(
        f"{e(c['label'])} {c['score']:.3f}" for c in result["classes"]) + "</p>")
  m = result["merging"]
  parts.append("<h2>Token merging</h2>")
  if merge_img is not None:
    parts.append(f"<p>{m['tokens']} tokens of one clip, {m['kept']} after merging"
                 f"{' (first segment)' if result['streamed'] else ''}.</p>"
                 f"<img alt='merged tokens' src='{visualize.data_uri(merge_img)}'>")
  else:
    parts.append("<p>Token merging is off in this run (config.model.token_merging.enabled="
                 "False): every token is kept.</p>")
  parts.append("</body></html>")
  return "\n".join(parts)


# ----- TensorBoard images during training ----------------------------------------------------
def validation_images(predictor: Predictor, params, split: SplitData, config) -> dict:
  """Per video of `split` (a few fixed validation videos): `val/{id}/timeline` (detections
  against the ground truth), `val/{id}/caption` (predicted caption vs the references) and,
  with token merging, `val/{id}/merged_tokens`. {tag: RGB uint8 image}."""
  images = {}
  for rec, entry in zip(predictor.run(params, split), split.entries):
    tag = "val/" + re.sub(r"[^-\w.]", "_", entry.video_id)
    try:
      frames, pts = timeline_frames(entry.path, float(rec["duration"]), short_side=64)
    except (video_lib.VideoError, OSError):  # Cache-only datasets: no file to sample.
      frames, pts = np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0)
    images[f"{tag}/timeline"] = visualize.timeline(
        frames, pts, float(rec["duration"]), rec.get("detections", []),
        ground_truth=entry.actions or [], title=f"{entry.video_id}: predicted (solid) vs "
                                                "ground truth (hatched)")
    if "caption" in rec:
      refs = entry.captions or ["(no reference caption)"]
      images[f"{tag}/caption"] = visualize.text_card(
          [f"predicted: {rec['caption']}"] + [f"reference: {c}" for c in refs[:3]])
    if rec.get("merge") is not None and "clip" in rec:
      images[f"{tag}/merged_tokens"] = visualize.merge_map(
          rec["clip"], rec["merge"]["assignment"], rec["merge"]["sizes"],
          tuple(config.model.tubelet_size))
  return images
