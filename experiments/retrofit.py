"""Retrofitting efficient attention and token merging onto a backbone trained with full attention.

    python experiments/run.py --study=retrofit --steps=100 --layers=2 --split=validation

`full` trains the backbone once with full attention (the demo setup at the study budget; a
stand-in for a pretrained backbone, since tests and demos cannot download public weights).
Every other variant starts from its last checkpoint (INIT_FROM: tensors whose path and shape
match are loaded, the rest start fresh, all listed in the variant's init_report.json) with
`model.attention.type` changed (the pretrained q/k/v/o projections reused by strided,
local_global, hierarchical, performer, linear and cross_memory; mamba has its own mixer, so
only the embeddings, MLPs, norms and heads carry over) or token merging turned on:
  <type>_zero_shot   evaluated as retrofitted: one step at learning rate 1e-12 (the runner
                     trains at least one step), i.e. the parent's weights under the new
                     attention.
  <type>             fine-tuned briefly: CHILD_STEPS steps, everything trainable.
  full_continued     full attention fine-tuned for the same CHILD_STEPS: the reference each
                     fine-tuned variant is compared with (the same total training).
The quality kept per variant (its metric / the reference's) is in
benchmarks/studies/retrofit/kept.md, written by `python experiments/retrofit.py` from the
runner's results.json.
"""
from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):  # `python experiments/retrofit.py`: the table of kept quality.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hvlm_jax.config import import_sibling  # noqa: E402

common = import_sibling(__file__, "common.py")

CHILD_STEPS = 30
TYPES = ("strided", "local_global", "hierarchical", "performer", "linear", "cross_memory",
         "mamba")
_ZERO_SHOT = {"training.num_steps": 1, "training.learning_rate": 1e-12}
_BRIEF = {"training.num_steps": CHILD_STEPS}

# Zero-shot rows first (cheap: one step), then the fine-tuned ones with their reference.
VARIANTS = {"full": {}}
for _t in TYPES:
  VARIANTS[f"{_t}_zero_shot"] = dict(_ZERO_SHOT, **{"model.attention.type": _t})
VARIANTS["merging_zero_shot"] = dict(_ZERO_SHOT, **{"model.token_merging.enabled": True})
VARIANTS["full_continued"] = dict(_BRIEF)
for _t in TYPES:
  VARIANTS[_t] = dict(_BRIEF, **{"model.attention.type": _t})
VARIANTS["merging"] = dict(_BRIEF, **{"model.token_merging.enabled": True})
INIT_FROM = {name: "full" for name in VARIANTS if name != "full"}

# Metrics of the kept-quality table: (results key, column title).
KEPT_METRICS = (("action_mAP_0.5", "mAP@0.5"), ("qa_accuracy", "QA acc"),
                ("caption_CIDEr", "CIDEr"), ("classification_top1", "top-1"))


def get_config(arg=None):
  return common.study_config(arg, VARIANTS)


def kept_table(results: dict) -> str:
  """Markdown: per retrofitted variant, each metric as a fraction of the full-attention
  reference (zero-shot against `full`, fine-tuned against `full_continued`)."""
  rows = {r["variant"]: r for r in results["rows"]}
  b = results["meta"]["budget"]
  lines = [
      "# Retrofitting a full-attention backbone: quality kept", "",
      f"Backbone `full`: {b['steps']} steps with full attention, {b['layers']} blocks, batch "
      f"{b['batch_size']}, width {results['meta']['width']}; children start from its last "
      f"checkpoint; zero-shot = its weights as they are, fine-tuned = {CHILD_STEPS} more steps "
      f"(reference: `full_continued`, full attention, the same {CHILD_STEPS} steps). Scored on "
      f"the {b['split']} split; kept = metric / reference metric. One run each, no error bars; "
      f"all numbers in results.md. Commit {results['meta']['commit']}; "
      f"`{results['meta']['command']}`.", "",
      "| variant | " + " | ".join(f"{h} zero-shot (kept)" for _, h in KEPT_METRICS) + " | " +
      " | ".join(f"{h} fine-tuned (kept)" for _, h in KEPT_METRICS) + " |",
      "|---" * (1 + 2 * len(KEPT_METRICS)) + "|"]

  def cell(row, ref, key):
    if row is None or row.get("status") != "ok" or ref is None:
      return (row or {}).get("status", "not run")[:60] if row is not None else "not run"
    value, base = row.get(key), ref.get(key)
    if value is None:
      return "-"
    kept = f" ({value / base:.2f})" if base else ""
    return f"{value:.3f}{kept}"

  full, cont = rows.get("full"), rows.get("full_continued")
  lines.append("| full (reference) | " + " | ".join(cell(full, full, k) for k, _ in KEPT_METRICS)
               + " | " + " | ".join(cell(cont, cont, k) for k, _ in KEPT_METRICS) + " |")
  for name in TYPES + ("merging",):
    zero, tuned = rows.get(f"{name}_zero_shot"), rows.get(name)
    lines.append(f"| {name} | " + " | ".join(cell(zero, full, k) for k, _ in KEPT_METRICS)
                 + " | " + " | ".join(cell(tuned, cont, k) for k, _ in KEPT_METRICS) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "benchmarks", "studies", "retrofit")
  with open(os.path.join(out, "results.json")) as f:
    text = kept_table(json.load(f))
  with open(os.path.join(out, "kept.md"), "w") as f:
    f.write(text)
  print(text)
