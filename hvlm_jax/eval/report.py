"""Evaluation results on disk: a markdown report, metrics JSON and predictions JSON.

The metrics dict rendered here (and written by `python -m hvlm_jax.evaluate`) has one section
per task, each the return value of its function in `hvlm_jax.eval.metrics`, all optional:

  {"meta": {"split": "test", "step": 1200, ...},               # any scalars, shown first
   "detection": detection_map(...),                           # {"mAP@0.50", ..., "mAP"}
   "qa": qa_accuracy(...) | {"majority_baseline": qa_majority_baseline(...)},
   "captioning": caption_scores(...),                         # BLEU-1..4, ROUGE_L, CIDEr, notes
   "classification": classification_topk(...),               # {"top1", "top5", "num_examples"}
   "per_domain": {domain: {"detection": ..., "qa": ..., ...}},
   <other>: {name: scalar}}                                   # e.g. losses, as a plain table

Files are written atomically (temporary file in the same folder, fsync, rename): a failure,
including a value JSON cannot hold, leaves the previous good file untouched.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Any, Mapping

import numpy as np

TASKS = ("detection", "qa", "captioning", "classification")
TITLES = {"detection": "Temporal action detection (ActivityNet mAP)",
          "qa": "Video QA (normalised exact match)",
          "captioning": "Captioning (pycocoevalcap)",
          "classification": "Clip classification"}
# Columns of the per-domain table: the headline numbers of each task.
HEADLINES = {"detection": ("mAP@0.50", "mAP"), "qa": ("accuracy",),
             "captioning": ("BLEU-4", "ROUGE_L", "CIDEr", "METEOR"),
             "classification": ("top1", "top5")}
SHORT = {"detection": "det", "qa": "QA", "captioning": "cap", "classification": "cls"}


# ---------------------------------------------------------------------------------------------
# JSON and atomic files
# ---------------------------------------------------------------------------------------------

def to_jsonable(obj: Any, where: str = "value") -> Any:
  """Plain JSON types from numpy scalars / arrays, tuples, NamedTuples and paths; non-finite
  floats become None (JSON has no NaN). Raises TypeError naming the offending entry."""
  if hasattr(obj, "_asdict"):
    obj = obj._asdict()
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
  if isinstance(obj, np.ndarray):
    obj = obj.tolist()
  if isinstance(obj, (list, tuple, set, frozenset)):
    return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if obj is None or isinstance(obj, (str, int, bool)):
    return obj
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  raise TypeError(f"{where} is a {type(obj).__name__}, which cannot be written as JSON.")


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
  """Writes `text` to `path` via a temporary file and an atomic rename; returns the path."""
  path = os.path.abspath(os.fspath(path))
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)
  return path


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> str:
  """Serialises `obj` first (so nothing on disk changes if that fails), then writes it
  atomically. Returns the path."""
  text = json.dumps(to_jsonable(obj, os.path.basename(os.fspath(path))), indent=indent,
                    allow_nan=False, ensure_ascii=False)
  return write_text_atomic(path, text + "\n")


def unused_name(folder: str | os.PathLike, name: str) -> str:
  """`name`, or `name_r2`, `name_r3`, ... : the first for which no result file exists yet, so
  a rerun never overwrites an earlier result."""
  folder, candidate, n = os.fspath(folder), name, 1
  while any(os.path.exists(os.path.join(folder, f"{kind}_{candidate}.{ext}"))
            for kind, ext in (("metrics", "json"), ("report", "md"), ("predictions", "json"))):
    n += 1
    candidate = f"{name}_r{n}"
  return candidate


def write_results(folder: str | os.PathLike, metrics: Mapping, predictions: Any = None, *,
                  name: str = "test", title: str | None = None) -> dict[str, str]:
  """Writes `metrics_{name}.json`, `report_{name}.md` and (if given) `predictions_{name}.json`
  in `folder`. Returns {"metrics", "report"[, "predictions"]} -> path."""
  folder = os.fspath(folder)
  paths = {"metrics": write_json_atomic(os.path.join(folder, f"metrics_{name}.json"), metrics)}
  report = markdown_report(metrics, title=title or f"Evaluation: {name}")
  paths["report"] = write_text_atomic(os.path.join(folder, f"report_{name}.md"), report)
  if predictions is not None:
    paths["predictions"] = write_json_atomic(
        os.path.join(folder, f"predictions_{name}.json"), predictions, indent=None)
  return paths


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def format_value(v: Any) -> str:
  """4 decimals for floats, integers as they are, '-' for missing."""
  if v is None:
    return "-"
  if isinstance(v, np.generic):
    v = v.item()
  if isinstance(v, bool) or isinstance(v, int):
    return str(v)
  if isinstance(v, float):
    return f"{v:.4f}" if math.isfinite(v) else str(v)
  return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(map(format_value, header)) + " |",
           "|" + "|".join(["---"] * len(header)) + "|"]
  lines += ["| " + " | ".join(map(format_value, row)) + " |" for row in rows]
  return "\n".join(lines)


def _scalars(section: Mapping, prefix: str = "") -> dict[str, Any]:
  """Flattens nested dicts to {"a/b": scalar}; lists (e.g. notes) are left out."""
  out = {}
  for k, v in section.items():
    if isinstance(v, Mapping):
      out.update(_scalars(v, f"{prefix}{k}/"))
    elif not isinstance(v, (list, tuple, np.ndarray)):
      out[f"{prefix}{k}"] = v
  return out


def _one_row(section: Mapping, keys: list[str]) -> str:
  return markdown_table(keys, [[section.get(k) for k in keys]])


def _detection(section: Mapping) -> list[str]:
  keys = ["mAP"] + sorted(k for k in section if k.startswith("mAP@"))
  return [_one_row(section, [k for k in keys if k in section])]


def _qa(section: Mapping) -> list[str]:
  parts = [f"Accuracy **{format_value(section.get('accuracy'))}** over "
           f"{format_value(section.get('num_questions'))} questions."]
  base = section.get("majority_baseline")
  if base:
    parts.append(f"Majority-answer baseline (always \"{base.get('answer')}\"): "
                 f"{format_value(base.get('accuracy'))}.")
  per_type = section.get("per_type")
  if per_type:
    parts.append(markdown_table(
        ["question type", "accuracy", "questions"],
        [[t, r.get("accuracy"), r.get("num_questions")] for t, r in per_type.items()]))
  return parts


def _captioning(section: Mapping) -> list[str]:
  keys = [k for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE_L", "CIDEr", "METEOR")
          if k in section]
  notes = "\n".join(f"- {note}" for note in section.get("notes", ()))
  return [_one_row(section, keys)] + ([notes] if notes else [])


def _classification(section: Mapping) -> list[str]:
  keys = sorted((k for k in section if k.startswith("top")), key=lambda k: int(k[3:] or 0))
  return [_one_row(section, keys + ["num_examples"] * ("num_examples" in section))]


RENDERERS = {"detection": _detection, "qa": _qa, "captioning": _captioning,
             "classification": _classification}


def per_domain_table(per_domain: Mapping[str, Mapping]) -> str:
  """One row per domain, the headline numbers of each task present in any domain."""
  columns = []
  for task in TASKS:
    for key in HEADLINES[task]:
      if any(key in (d.get(task) or {}) for d in per_domain.values()):
        columns.append((task, key))
    if task == "qa" and any((d.get("qa") or {}).get("majority_baseline")
                            for d in per_domain.values()):
      columns.append(("qa", "majority_baseline"))
  rows = []
  for domain, results in per_domain.items():
    row = [domain]
    for task, key in columns:
      value = (results.get(task) or {}).get(key)
      row.append(value.get("accuracy") if isinstance(value, Mapping) else value)
    rows.append(row)
  header = ["domain"] + [f"{SHORT[t]} {'majority' if k == 'majority_baseline' else k}"
                         for t, k in columns]
  return markdown_table(header, rows)


def markdown_report(metrics: Mapping, title: str = "Evaluation") -> str:
  """The report: meta, one section per task, the per-domain table, then other sections."""
  parts = [f"# {title}"]
  meta = metrics.get("meta")
  if meta:
    parts.append(markdown_table(["", "value"], [[k, v] for k, v in _scalars(meta).items()]))
  for task in TASKS:
    if metrics.get(task):
      parts.append(f"## {TITLES[task]}")
      parts += RENDERERS[task](metrics[task])
  if metrics.get("per_domain"):
    parts.append("## Per domain")
    parts.append(per_domain_table(metrics["per_domain"]))
  for name, section in metrics.items():
    if name in TASKS or name in ("meta", "per_domain"):
      continue
    parts.append(f"## {name}")
    if isinstance(section, Mapping):
      parts.append(markdown_table(["metric", "value"], [[k, v] for k, v in
                                                        _scalars(section).items()]))
    else:
      parts.append(format_value(section))
  return "\n\n".join(parts) + "\n"
