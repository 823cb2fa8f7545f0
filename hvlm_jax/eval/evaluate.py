"""Evaluation: run every head over a split and score it with the field's metrics.

`evaluate_split` is shared by the trainer (validation during training) and by
`python -m hvlm_jax.evaluate`, which restores parameters only, onto whatever devices are
present, and writes metrics JSON, a markdown report and predictions.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from hvlm_jax.models import model as model_lib
from hvlm_jax.train import sharding


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
  def eval_step(params, batch):
    batch = _mask_invalid(batch)
    outputs = model.apply({"params": params}, batch, train=False)
    _, metrics = model_lib.compute_losses(outputs, batch, config)
    counts = {"label_mask": batch["label_mask"].sum()} if "label_mask" in batch else {}
    return metrics, counts, outputs
  return jax.jit(eval_step)


def evaluate_split(config, model, params, split_data, vocabs, mesh, *, max_batches: int = 0,
                   progress: bool = False) -> dict:
  """Scores `params` on every video of `split_data`; returns a flat dict of metrics."""
  from hvlm_jax import data as pipeline
  eval_step = make_eval_step(config, model)
  sums, weights = {}, {}
  batches = pipeline.eval_batches(config, split_data, vocabs,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
  if progress:
    from tqdm import tqdm
    batches = tqdm(batches, desc="eval", unit="batch")
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.flax_logical_rules()):
    for i, batch in enumerate(batches):
      if max_batches and i >= max_batches:
        break
      metrics, counts, _ = eval_step(params, sharding.global_batch(batch, mesh))
      n = float(counts.get("label_mask", batch["valid"].sum()))
      for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + float(v) * n
        weights[k] = weights.get(k, 0.0) + n
  return {k: sums[k] / max(weights[k], 1e-9) for k in sums}
