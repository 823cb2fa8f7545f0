"""Loads and validates the annotations of one split (the layout of docs/design.md and the README).

    DATA/{split}/videos/*.mp4            (or DATA/{split}/features/*.npy in features mode)
    DATA/{split}/annotations/{action_detection,video_qa,video_captioning}.json

`load_split(config, split)` joins the (up to) three files per video into `VideoEntry`s sorted
by video id. Every mistake a user can make in these files raises `AnnotationError` with one
sentence naming the file, the entry index and the field. ActivityNet ground truth
(`{"database": {id: {"duration", "subset", "annotations": [{"segment", "label"}]}}}`)
converts with `convert_activitynet`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any

TASK_FILES = ("action_detection", "video_qa", "video_captioning")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
TIME_TOLERANCE = 0.05  # Seconds a segment may overrun the duration (rounding in exports).


class AnnotationError(ValueError):
  """An annotation file is wrong; the message names the file, entry and field."""


@dataclasses.dataclass
class VideoEntry:
  """Everything known about one video of a split. A task that is None is absent (masked)."""
  video_id: str
  path: str  # The video file (video/cache mode) or the .npy features file.
  domain: str = "general"
  duration: float | None = None  # Seconds, from the annotations or the container.
  actions: list[tuple[float, float, str]] | None = None  # (start, end, label), by start.
  qa_pairs: list[tuple[str, str]] | None = None  # (question, answer).
  captions: list[str] | None = None


@dataclasses.dataclass
class SplitData:
  """The validated entries of one split, sorted by video id.

  `skipped` maps a reason ("no_annotations", "no_video", "corrupt") to the video ids left out.
  """
  name: str
  root: str
  entries: list[VideoEntry]
  skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)

  def __len__(self) -> int:
    return len(self.entries)

  @property
  def video_ids(self) -> list[str]:
    return [e.video_id for e in self.entries]


def load_split(config, split: str, *, training: bool | None = None,
               probe_durations: bool = True) -> SplitData:
  """Reads DATA/{split} of `config.data` and validates it.

  Args:
    config: the full config (reads `config.data`).
    split: "training", "validation" or "test".
    training: corrupt videos are skipped and counted when True (up to
      `config.data.max_corrupt_videos`), errors when False; default: split == "training".
    probe_durations: read the duration from the video when the annotations lack it.

  Raises:
    AnnotationError / FileNotFoundError: with one sentence naming the file, entry and field.
  """
  from hvlm_jax.data import synthetic, video  # Local: keeps this module light to import.
  data = config.data
  training = split == "training" if training is None else training
  synthetic.ensure_dataset(config)
  root = os.path.abspath(data.dir)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"Data directory {root} does not exist (config.data.dir).")
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f"Split directory {split_dir} does not exist (config.data.dir).")
  features = data.input == "features"
  media_dir = os.path.join(split_dir, "features" if features else "videos")
  if not os.path.isdir(media_dir):
    raise FileNotFoundError(f"Media directory {media_dir} does not exist.")
  files = _media_files(media_dir, (".npy",) if features else VIDEO_EXTENSIONS)
  domains = tuple(data.domains)

  entries: dict[str, VideoEntry] = {}
  found_any = False
  for task in TASK_FILES:
    path = os.path.join(split_dir, "annotations", task + ".json")
    if not os.path.exists(path):
      continue
    found_any = True
    for i, raw in enumerate(_read_list(path)):
      _merge(entries, parse_entry(raw, task, path, i, domains), path, i)
  unlabeled = bool(data.get("unlabeled", False))
  if unlabeled and not features:  # Every video is an entry; annotations, if any, still count.
    for vid, name in files.items():
      entries.setdefault(vid, VideoEntry(video_id=vid, path=name))
  elif not found_any:
    raise FileNotFoundError(
        f"No annotation files in {os.path.join(split_dir, 'annotations')} (expected one of "
        f"{', '.join(t + '.json' for t in TASK_FILES)}).")

  skipped: dict[str, list[str]] = {"no_video": [], "no_annotations": [], "corrupt": []}
  result = []
  for vid in sorted(entries):
    e = entries[vid]
    rel = e.path or (files.get(vid) if not features else vid + ".npy")
    full = os.path.abspath(os.path.join(media_dir, rel)) if rel else None
    if full is None or not os.path.exists(full):
      skipped["no_video"].append(vid)
      continue
    e.path = full
    result.append(e)
  seen = {os.path.splitext(os.path.basename(e.path))[0] for e in result}
  skipped["no_annotations"] = sorted(set(files) - seen) if not features else []
  if data.strict and (skipped["no_video"] or skipped["no_annotations"]):
    which = "no_video" if skipped["no_video"] else "no_annotations"
    what = ("annotated videos have no file in " + media_dir if which == "no_video"
            else "videos in " + media_dir + " have no annotations")
    raise AnnotationError(
        f"{len(skipped[which])} {what} (first: {skipped[which][0]!r}); config.data.strict=True.")

  for e in result if (probe_durations and not features) else ():
    if e.duration is None:
      try:
        e.duration = video.probe_duration(e.path)
      except video.VideoError as err:
        if not training:
          raise
        skipped["corrupt"].append(e.video_id)
        logging.warning("Skipping corrupt video: %s", err)
  if len(skipped["corrupt"]) > data.max_corrupt_videos:
    raise video.VideoError(
        f"{len(skipped['corrupt'])} corrupt videos in {media_dir} exceed "
        f"config.data.max_corrupt_videos={data.max_corrupt_videos} "
        f"(first: {skipped['corrupt'][0]!r}).")
  corrupt = set(skipped["corrupt"])
  result = [e for e in result if e.video_id not in corrupt]
  for e in result:
    _check_times(e, split_dir)
  for reason, ids in skipped.items():
    if ids and reason != "corrupt":
      logging.info("%s: skipped %d videos (%s), e.g. %r.", split, len(ids), reason, ids[0])
  return SplitData(split, split_dir, result, skipped)


def _media_files(media_dir: str, extensions) -> dict[str, str]:
  out = {}
  for name in sorted(os.listdir(media_dir)):
    stem, ext = os.path.splitext(name)
    if ext.lower() in extensions:
      out.setdefault(stem, name)
  return out


def _read_list(path: str) -> list:
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise AnnotationError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, "
                          f"column {e.colno}).") from None
  except UnicodeDecodeError as e:
    raise AnnotationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
  except IsADirectoryError:
    raise AnnotationError(f"{path} is a directory; an annotation file is a JSON list.") from None
  if not isinstance(data, list):
    raise AnnotationError(f"{path}: expected a JSON list of entries, got "
                          f"{type(data).__name__}.")
  return data


def _fail(path, index, field, message) -> AnnotationError:
  return AnnotationError(f"{path}: entry {index}, field '{field}': {message}.")


def _number(value, path, index, field) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise _fail(path, index, field, f"expected a finite number, got {value!r}")
  return float(value)


def _text(value, path, index, field) -> str:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  if not isinstance(value, str) or not value.strip():
    raise _fail(path, index, field, f"expected a non-empty string, got {value!r}")
  return value


def _pick(d: dict, names, path, index, field):
  for name in names:
    if name in d:
      return d[name], name
  raise _fail(path, index, field, "missing")


def parse_entry(raw: Any, task: str, path: str, index: int, domains) -> VideoEntry:
  """Validates one JSON entry of `task`; returns a VideoEntry carrying only that task."""
  if not isinstance(raw, dict):
    raise AnnotationError(f"{path}: entry {index} is a {type(raw).__name__}, not an object.")
  vid = _text(raw.get("video_id"), path, index, "video_id")
  if "/" in vid or "\\" in vid or vid in (".", "..") or os.path.isabs(vid):
    raise _fail(path, index, "video_id", f"{vid!r} escapes the videos folder")
  entry = VideoEntry(video_id=vid, path="")
  if "video_file" in raw:
    rel = _text(raw["video_file"], path, index, "video_file")
    if os.path.isabs(rel) or os.path.normpath(rel).split(os.sep)[0] == "..":
      raise _fail(path, index, "video_file", f"{rel!r} escapes the videos folder")
    entry.path = rel
  if "duration" in raw:
    entry.duration = _number(raw["duration"], path, index, "duration")
    if entry.duration <= 0:
      raise _fail(path, index, "duration", f"must be positive, got {entry.duration}")
  if "domain" in raw and raw["domain"] is not None:
    entry.domain = _text(raw["domain"], path, index, "domain")
    if entry.domain not in domains:
      raise _fail(path, index, "domain",
                  f"{entry.domain!r} is not one of config.data.domains {tuple(domains)}")
  if task == "action_detection":
    actions = raw.get("actions")
    if not isinstance(actions, list):
      raise _fail(path, index, "actions", f"expected a list, got {actions!r}")
    entry.actions = []
    for j, a in enumerate(actions):
      f = f"actions[{j}]"
      if not isinstance(a, dict):
        raise _fail(path, index, f, f"expected an object, got {a!r}")
      s, sn = _pick(a, ("start", "start_time"), path, index, f + ".start")
      e, en = _pick(a, ("end", "end_time"), path, index, f + ".end")
      lab, ln = _pick(a, ("label", "category"), path, index, f + ".label")
      s, e = _number(s, path, index, f"{f}.{sn}"), _number(e, path, index, f"{f}.{en}")
      lab = _text(lab, path, index, f"{f}.{ln}")
      if s < 0:
        raise _fail(path, index, f"{f}.{sn}", f"negative time {s}")
      if e <= s:
        raise _fail(path, index, f"{f}.{en}", f"end {e} is not after start {s}")
      entry.actions.append((s, e, lab))
    entry.actions.sort()
  elif task == "video_qa":
    pairs = raw.get("qa_pairs")
    if not isinstance(pairs, list):
      raise _fail(path, index, "qa_pairs", f"expected a list, got {pairs!r}")
    entry.qa_pairs = []
    for j, p in enumerate(pairs):
      if not isinstance(p, dict):
        raise _fail(path, index, f"qa_pairs[{j}]", f"expected an object, got {p!r}")
      entry.qa_pairs.append((_text(p.get("question"), path, index, f"qa_pairs[{j}].question"),
                             _text(p.get("answer"), path, index, f"qa_pairs[{j}].answer")))
  elif task == "video_captioning":
    caps = raw.get("captions")
    if not isinstance(caps, list):
      raise _fail(path, index, "captions", f"expected a list, got {caps!r}")
    timed = []
    for j, c in enumerate(caps):
      if isinstance(c, dict):  # Dense caption: kept in time order.
        s = _number(c.get("start", 0.0), path, index, f"captions[{j}].start")
        e = _number(c.get("end", s + 1.0), path, index, f"captions[{j}].end")
        if s < 0 or e <= s:
          raise _fail(path, index, f"captions[{j}]", f"bad times start={s}, end={e}")
        timed.append((s, _text(c.get("caption"), path, index, f"captions[{j}].caption")))
      else:
        timed.append((0.0, _text(c, path, index, f"captions[{j}]")))
    entry.captions = [t for _, t in sorted(timed, key=lambda x: x[0])]
  else:
    raise ValueError(f"Unknown task {task!r}.")
  return entry


def _merge(entries: dict[str, VideoEntry], new: VideoEntry, path: str, index: int) -> None:
  old = entries.get(new.video_id)
  if old is None:
    entries[new.video_id] = new
    return
  for field in ("actions", "qa_pairs", "captions"):
    if getattr(new, field) is not None:
      if getattr(old, field) is not None:
        raise _fail(path, index, "video_id", f"{new.video_id!r} appears twice")
      setattr(old, field, getattr(new, field))
  for field, default in (("domain", "general"), ("duration", None), ("path", "")):
    a, b = getattr(old, field), getattr(new, field)
    if b != default and a != default and a != b:
      raise _fail(path, index, field, f"{b!r} contradicts {a!r} given for "
                  f"{new.video_id!r} in another annotation file")
    if b != default:
      setattr(old, field, b)


def _check_times(e: VideoEntry, split_dir: str) -> None:
  if not e.actions or e.duration is None:
    return
  for j, (s, end, _) in enumerate(e.actions):
    if end > e.duration + TIME_TOLERANCE:
      raise AnnotationError(
          f"{os.path.join(split_dir, 'annotations', 'action_detection.json')}: video "
          f"{e.video_id!r}, field 'actions[{j}].end': {end} s is past the video's duration "
          f"{e.duration:.3f} s.")


def convert_activitynet(path: str, data_dir: str, *, overwrite: bool = False) -> dict[str, int]:
  """Writes DATA/{split}/annotations/action_detection.json from ActivityNet ground truth.

  Subsets map training -> training, validation -> validation, testing -> test. Segments are
  clipped to the duration (ActivityNet segments often overrun it by a fraction of a second).
  Returns the number of videos per split.
  """
  with open(path) as f:
    try:
      db = json.load(f)["database"]
    except (json.JSONDecodeError, KeyError, TypeError):
      raise AnnotationError(f"{path}: not ActivityNet ground truth (no 'database').") from None
  splits: dict[str, list] = {}
  for i, (vid, item) in enumerate(sorted(db.items())):
    subset = {"training": "training", "validation": "validation", "testing": "test"}.get(
        item.get("subset"))
    if subset is None:
      raise _fail(path, i, "subset", f"{item.get('subset')!r} for {vid!r} is not "
                  "training, validation or testing")
    duration = _number(item.get("duration"), path, i, "duration")
    actions = []
    for j, a in enumerate(item.get("annotations", [])):
      seg = a.get("segment")
      if not (isinstance(seg, list) and len(seg) == 2):
        raise _fail(path, i, f"annotations[{j}].segment", f"expected [start, end], got {seg!r}")
      s = max(0.0, _number(seg[0], path, i, f"annotations[{j}].segment"))
      e = min(duration, _number(seg[1], path, i, f"annotations[{j}].segment"))
      if e > s:
        actions.append(dict(start=s, end=e,
                            label=_text(a.get("label"), path, i, f"annotations[{j}].label")))
    splits.setdefault(subset, []).append(dict(video_id=vid, duration=duration, actions=actions))
  for split, rows in splits.items():
    out = os.path.join(data_dir, split, "annotations", "action_detection.json")
    if os.path.exists(out) and not overwrite:
      raise FileExistsError(f"{out} exists; pass overwrite=True to replace it.")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
      json.dump(rows, f, indent=1)
  return {k: len(v) for k, v in splits.items()}
