"""Evaluation: run every head over a split and score it with the field's metrics.

`evaluate_split` serves the trainer (validation during training) and
`evaluate_checkpoint` serves `python -m hvlm_jax.evaluate`: from the run's own config.json
(plus explicit overrides) it restores parameters only, onto whatever devices are present,
and writes `WORKDIR/eval/{metrics,report,predictions}_{split}_step{N}_{data id}` (JSON,
markdown, JSON), never overwriting an earlier result (a rerun gets a `_r2` suffix).

Scoring: detection mAP by the ActivityNet protocol against every annotated segment, QA
accuracy by normalised exact match against the annotated answer strings (answers outside the
training answer vocabulary count as wrong, not as skipped), captions with BLEU / ROUGE-L /
CIDEr-D against every reference caption, clip top-1 / top-5, each also per domain.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from hvlm_jax import data as data_lib
from hvlm_jax import run as run_lib
from hvlm_jax import sharding
from hvlm_jax.checkpoint import CheckpointCorruptError, Checkpointer
from hvlm_jax.data import segments as segments_lib
from hvlm_jax.eval import metrics as metrics_lib
from hvlm_jax.eval import report as report_lib
from hvlm_jax.eval import streaming as eval_streaming
from hvlm_jax.models import model as model_lib
from hvlm_jax.models import pretraining
from hvlm_jax.models import streaming
from hvlm_jax.models.heads.detection import detections_as_lists


def _mask_invalid(batch: dict) -> dict:
  """Padding examples of the last batch count in no metric and no loss."""
  valid = batch["valid"]
  out = dict(batch)
  for key in ("label_mask", "action_mask", "caption_mask"):
    if key in out:
      out[key] = out[key] & valid
  if "qa_mask" in out:
    out["qa_mask"] = out["qa_mask"] & valid[:, None]
  return out


def make_eval_step(config, model):
  """(params, batch) -> (loss metrics, example count, predictions), one compiled program."""
  def eval_step(params, batch):
    batch = _mask_invalid(batch)
    outputs = model.apply({"params": params}, batch, train=False)
    _, losses = model_lib.compute_losses(outputs, batch, config)
    predictions = model.apply({"params": params}, batch, method=model_lib.HierarchicalVLM.predict)
    return losses, batch["valid"].sum(), predictions
  return jax.jit(eval_step)


def run_split(config, model, params, split_data, vocabs, mesh, *, max_batches: int = 0,
              progress=False):
  """Runs the model over a split; (mean losses, per-video prediction records).

  A StreamingVLM streams the videos longer than model.streaming.auto_threshold segments
  (hvlm_jax/models/streaming.py); losses average over clip-length and streamed videos.
  `progress`: True for a progress bar, or a tqdm bar to extend (its total grows by the
  clip and streamed batches)."""
  long_split = None
  if isinstance(model, streaming.StreamingVLM):
    split_data, long_split = segments_lib.split_by_length(config, split_data)
  eval_step = make_eval_step(config, model)
  sums, total = {}, 0.0
  records = []
  batches = iter(()) if not len(split_data) else data_lib.eval_batches(config, split_data, vocabs,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
  bar = None
  if progress:  # One bar over clip batches and streamed batches (and the caller's scoring).
    from tqdm import tqdm
    n = (max_batches or data_lib.num_eval_batches(config, split_data)) if len(split_data) else 0
    n += (math.ceil(len(long_split) / config.data.eval_batch_size)
          if long_split is not None else 0)
    bar = progress if hasattr(progress, "update") else tqdm(
        total=0, desc=f"eval {split_data.name}", unit="batch")
    bar.total += n
    bar.refresh()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.flax_logical_rules()):
    for i, batch in enumerate(batches):
      if max_batches and i >= max_batches:
        break
      if bar is not None:
        bar.update(1)
      losses, count, preds = eval_step(params, sharding.global_batch(batch, mesh))
      count = float(count)
      for k, v in losses.items():
        sums[k] = sums.get(k, 0.0) + float(v) * count
      total += count
      records.extend(_records(jax.device_get(_local(preds)), batch, split_data, vocabs))
    if long_split is not None and len(long_split):
      for preds, losses, count, batch in eval_streaming.split_predictions(
          config, model, params, long_split, vocabs,
          put=lambda b: sharding.global_batch(b, mesh), process_index=jax.process_index(),
          process_count=jax.process_count()):
        count = float(count)
        for k, v in losses.items():
          sums[k] = sums.get(k, 0.0) + float(v) * count
        total += count
        records.extend(_records(jax.device_get(_local(preds)), batch, long_split, vocabs))
        if bar is not None:
          bar.set_postfix_str("streaming long videos")
          bar.update(1)
  if bar is not None and bar is not progress:
    bar.close()
  return {k: v / max(total, 1.0) for k, v in sums.items()}, records


def _local(tree):
  """This process's rows of globally sharded prediction arrays."""
  def rows(x):
    if jax.process_count() == 1:
      return x
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])
  return jax.tree.map(rows, tree)


def _records(preds, batch, split_data, vocabs) -> list[dict]:
  """Per-video predictions (strings and seconds) from one batch of arrays."""
  detections = (detections_as_lists({k[len("detection_"):]: v for k, v in preds.items()
                                     if k.startswith("detection_")})
                if "detection_start" in preds else None)
  out = []
  for i in np.flatnonzero(batch["valid"]):
    entry = split_data.entries[int(batch["index"][i])]
    rec = dict(video_id=entry.video_id, domain=entry.domain)
    if detections is not None:
      rec["detections"] = [dict(start=s, end=e, label=vocabs.actions[lab], score=sc)
                           for s, e, lab, sc in detections[i]]
    if "qa_answer" in preds and entry.qa_pairs:
      n = min(len(entry.qa_pairs), preds["qa_answer"].shape[1])
      rec["qa"] = [dict(question=q, answer=a, predicted=vocabs.answers[int(preds["qa_answer"][i, j])])
                   for j, (q, a) in enumerate(entry.qa_pairs[:n])]
    if "caption_tokens" in preds:
      rec["caption"] = vocabs.decode(preds["caption_tokens"][i])
    if "classification_logits" in preds and bool(batch["label_mask"][i]):
      rec["class_logits"] = np.asarray(preds["classification_logits"][i], np.float32)
      rec["class_label"] = int(batch["label"][i])
    out.append(rec)
  return out


def question_type(question: str) -> str:
  """A question's type: its first two words ("what color", "how many", "is there")."""
  return " ".join(question.lower().split()[:2])


def score(records: list[dict], split_data, *, train_answers=None, meteor=False,
          per_domain: bool = True) -> dict:
  """Task metrics of prediction records (see `_records`) against the split's annotations."""
  entries = {e.video_id: e for e in split_data.entries if e.video_id in
             {r["video_id"] for r in records}}
  result = {}
  gt = [dict(video_id=v, start=s, end=e, label=lab) for v, en in entries.items()
        for s, e, lab in en.actions or ()]
  if gt and any("detections" in r for r in records):
    preds = [dict(video_id=r["video_id"], **d) for r in records for d in r.get("detections", [])]
    result["detection"] = metrics_lib.detection_map(preds, gt)
  qa = [(r["video_id"], q) for r in records for q in r.get("qa", [])]
  if qa:
    result["qa"] = metrics_lib.qa_accuracy(
        [q["predicted"] for _, q in qa], [q["answer"] for _, q in qa],
        question_types=[question_type(q["question"]) for _, q in qa])
    result["qa"]["majority_baseline"] = metrics_lib.qa_majority_baseline(
        [q["answer"] for _, q in qa], train_answers)
  refs = {v: list(e.captions) for v, e in entries.items() if e.captions}
  if refs and any("caption" in r for r in records):
    hyps = {r["video_id"]: r["caption"] for r in records if r["video_id"] in refs}
    result["captioning"] = metrics_lib.caption_scores(refs, hyps, meteor=meteor)
  cls = [r for r in records if "class_logits" in r]
  if cls:
    result["classification"] = metrics_lib.classification_topk(
        np.stack([r["class_logits"] for r in cls]), np.asarray([r["class_label"] for r in cls]))
  if per_domain:
    domains = sorted({r["domain"] for r in records})
    if len(domains) > 1:
      result["per_domain"] = {}
      for d in domains:
        sub = [r for r in records if r["domain"] == d]
        try:
          result["per_domain"][d] = score(sub, split_data, train_answers=train_answers,
                                          per_domain=False)
        except metrics_lib.EmptyEvaluationError:
          continue
  return result


def headline(metrics: dict) -> dict[str, float]:
  """The scalars that summarise a scored split (logged and used to rank checkpoints)."""
  out = {}
  # Names are TensorBoard tags as they are (no "@"): logs, checkpoints and the board agree.
  for task, key, name in (("detection", "mAP@0.50", "action_mAP_0.5"),
                          ("detection", "mAP", "action_mAP"),
                          ("qa", "accuracy", "qa_accuracy"),
                          ("captioning", "CIDEr", "caption_CIDEr"),
                          ("captioning", "BLEU-4", "caption_BLEU-4"),
                          ("classification", "top1", "classification_top1")):
    if task in metrics and key in metrics[task]:
      out[name] = float(metrics[task][key])
  return out


def evaluate_split(config, model, params, split_data, vocabs, mesh, *, max_batches: int = 0,
                   progress: bool = False) -> dict:
  """Losses and headline metrics of `params` on a split: a flat dict of scalars."""
  losses, records = run_split(config, model, params, split_data, vocabs, mesh,
                              max_batches=max_batches, progress=progress)
  try:
    scored = headline(score(records, split_data, per_domain=False))
  except metrics_lib.EmptyEvaluationError as e:
    logging.warning("Validation metrics skipped: %s", e)
    scored = {}
  # One name per metric: the scored accuracies replace the losses' teacher-forced ones.
  for loss_key, scored_key in (("video_qa_accuracy", "qa_accuracy"),
                               ("classification_accuracy", "classification_top1")):
    if scored_key in scored:
      losses.pop(loss_key, None)
  return dict(losses, **scored)


def evaluate_reconstruction(config, model, params, split_data, vocabs, mesh, *,
                            max_batches: int = 0) -> dict:
  """Masked-video pretraining: mean reconstruction loss over the split's valid clips (the
  same deterministic tube mask every time), as {"loss", "reconstruction_loss"}."""
  @jax.jit
  def step(params, batch):
    out = model.apply({"params": params}, batch, train=False)
    valid = batch["valid"].astype(jnp.float32)
    return (out["per_example_loss"] * valid).sum(), valid.sum()
  total, count = 0.0, 0.0
  batches = data_lib.eval_batches(config, split_data, vocabs, process_index=jax.process_index(),
                                  process_count=jax.process_count())
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.flax_logical_rules()):
    for i, batch in enumerate(batches):
      if max_batches and i >= max_batches:
        break
      loss_sum, n = step(params, sharding.global_batch(batch, mesh))
      total, count = total + float(loss_sum), count + float(n)
  loss = total / max(count, 1.0)
  return dict(loss=loss, reconstruction_loss=loss)


def evaluate_checkpoint(workdir: str, *, step="latest", split: str = "test",
                        overrides: dict | None = None) -> dict:
  """`python -m hvlm_jax.evaluate`: the run's own config (WORKDIR/config.json) plus explicit
  `overrides`, parameters restored onto the devices present, every head run, results written.
  """
  workdir = os.path.abspath(workdir)
  config, overridden = run_lib.load_run_config(workdir, overrides)
  vocabs = run_lib.load_vocabularies(workdir)
  config = run_lib.fill_from_vocabularies(config, vocabs)
  # Evaluation runs on the devices present, whatever mesh trained the checkpoint.
  config.mesh = ml_collections.ConfigDict(run_lib.INFERENCE_MESH)
  run_lib.validate(config, jax.device_count(), training=False)
  run_lib.enable_compilation_cache(config)
  ckpt = Checkpointer(workdir, read_only=True, async_save=False,
                      best_metric=config.training.get("best_metric", "val_loss"),
                      best_mode=config.training.get("best_mode", "min"))
  requested, step = step, ckpt.resolve(step)
  mesh = sharding.make_mesh(config.mesh)
  config.data.eval_batch_size = _round_up(config.data.eval_batch_size, mesh.size)
  data_lib.ensure_dataset(config)
  split_data = data_lib.load_split(config, split, training=False)
  run_lib.require_videos(split_data)
  source_changed = sorted(k for k in overridden if k in run_lib.DATA_SOURCE_KEYS)
  if source_changed:
    logging.warning("Scoring data other than the run's: %s (overrides of %s).",
                    split_data.root, ", ".join(source_changed))
  train_answers = None
  try:
    train = data_lib.load_split(config, "training", probe_durations=False)
    train_answers = [a for e in train.entries for _, a in e.qa_pairs or ()]
  except (FileNotFoundError, data_lib.AnnotationError) as e:
    logging.warning("Majority-answer baseline without training answers: %s", e)
  model = run_lib.build_model(config)
  example = next(iter(data_lib.eval_batches(config, split_data, vocabs)))
  params, step, skipped_steps = _restore_falling_back(ckpt, requested, step, model, example,
                                                      mesh)
  logging.info("Restored parameters of %s step %d onto %d device(s).", workdir, step, mesh.size)

  from tqdm import tqdm
  if pretraining.objective(config) == "masked_video":  # No heads: the pretext loss only.
    losses, records = evaluate_reconstruction(config, model, params, split_data, vocabs,
                                              mesh), []
    metrics = dict(reconstruction=dict(loss=losses["loss"], videos=len(split_data)))
  else:
    with tqdm(total=1, desc=f"eval {split}", unit="batch") as bar:  # +1: scoring.
      losses, records = run_split(config, model, params, split_data, vocabs, mesh,
                                  progress=bar)
      bar.set_postfix_str(f"scoring {len(records)} videos")
      metrics = score(records, split_data, train_answers=train_answers, meteor=None)
      bar.update(1)
  unscored = _unscored_videos(split_data, records, config) if records else {}
  metrics["meta"] = dict(split=split, step=step, videos=len(records or split_data),
                         workdir=workdir,
                         **unscored, **skipped_steps,
                         devices=mesh.size, data_dir=str(split_data.root),
                         overrides=overridden,
                         data_source_overridden=source_changed)
  metrics["losses"] = losses
  if jax.process_index() == 0:
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    name = report_lib.unused_name(out, f"{split}_step{step}_{data_id(split_data)}")
    metrics["meta"]["name"] = name
    report_lib.write_results(out, metrics, _jsonable(records), name=name)
    logging.info("Results in %s/{metrics,report,predictions}_%s.*", out, name)
    print(report_lib.markdown_report(metrics, f"{split} split, step {step}"))
  return metrics


def _restore_falling_back(ckpt, requested, step: int, model, example, mesh):
  """Parameters of `step`; for 'latest', a corrupt checkpoint is skipped (named in the log and
  the result's meta) for the newest earlier one that reads back. Returns (params, step, meta)."""
  steps = [s for s in ckpt.all_steps() if s <= step]
  skipped = []
  for candidate in reversed(steps):
    try:
      params = run_lib.restore_params(ckpt, candidate, model, example, mesh)
    except CheckpointCorruptError as e:
      if requested not in ("latest", None, "") or candidate == steps[0]:
        raise
      logging.warning("Skipping checkpoint step %d for --step=latest: %s.", candidate, e)
      skipped.append(candidate)
      continue
    meta = {}
    if skipped:
      meta = dict(skipped_checkpoints=", ".join(map(str, skipped)),
                  warning_checkpoint=f"checkpoint step(s) {skipped} do not read back; "
                                     f"step {candidate} was evaluated instead")
    return params, candidate, meta
  raise CheckpointCorruptError(f"No checkpoint in {ckpt.directory} reads back.")


def _unscored_videos(split_data, records, config) -> dict:
  """Annotated videos of the split that were not scored (no file, corrupt, not decoded):
  a warning in the log and the result's meta (count and ids); an error with data.strict."""
  if jax.process_count() > 1:  # Each process holds the records of its own rows only.
    return {}
  scored = {r["video_id"] for r in records}
  reasons = {vid: "not scored" for vid in split_data.video_ids if vid not in scored}
  for reason in ("no_video", "corrupt"):
    for vid in split_data.skipped.get(reason, ()):
      reasons[vid] = reason.replace("_", " ")
  if not reasons:
    return {}
  ids = sorted(reasons)
  total = len(scored) + len(ids)
  message = (f"{len(ids)} of the {total} annotated videos of {split_data.root} were not scored "
             f"({', '.join(f'{v} ({reasons[v]})' for v in ids[:10])}"
             f"{', ...' if len(ids) > 10 else ''})")
  if config.data.get("strict", False):
    raise data_lib.AnnotationError(message + "; config.data.strict=True requires all.")
  logging.warning("%s; the metrics cover the other %d.", message, len(scored))
  return dict(unscored_videos=len(ids), unscored_ids=ids, warning=message)


def data_id(split_data) -> str:
  """A short id of the data a split holds (its folder and video ids): result files carry it,
  so scoring other data never replaces the results of the run's own."""
  text = "\n".join([os.path.abspath(str(split_data.root))] +
                    sorted(e.video_id for e in split_data.entries))
  return hashlib.sha1(text.encode()).hexdigest()[:6]


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def _jsonable(records):
  return [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}
          for r in records]
