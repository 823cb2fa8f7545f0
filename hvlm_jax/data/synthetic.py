"""Procedurally drawn videos with annotations for all three tasks, in the DESIGN.md layout.

Each clip shows 1-3 saturated shapes (distinct colours, distinct shapes) over a textured
background whose texture tells the domain (sports: mown grass, tutorials: grid paper, news:
studio gradient with a ticker band, general: smooth blotches). One object, the *actor*, does
1-2 timed events drawn from `ACTIONS`; the others stay still. From that content:

- action detection: one segment per event, boundaries on a 0.5 s grid, 1-2.5 s long;
- video QA: colour / shape / count / direction / presence questions whose answers are only
  visible in the video (`ANSWERS` is the closed answer set);
- captioning: one caption per clip from a template ("a red circle appears and then moves
  left next to a blue square"), so it is a deterministic function of the content.

Everything is a function of (seed, split, index), so a dataset is reproducible and can be
generated in parallel. `generate_dataset` writes DATA/{split}/videos/*.mp4 (libx264) and
DATA/{split}/annotations/*.json; `ensure_dataset(config)` does so on first use of a
`data.name = "synthetic"` config, atomically (temp dir + rename) with a marker file.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from typing import Any

import av
import numpy as np

from hvlm_jax.data import footage

VERSION = 3
MARKER = "synthetic_dataset.json"
SPLITS = ("training", "validation", "test")
COLORS = {"red": (230, 35, 35), "green": (40, 215, 60), "blue": (50, 90, 255),
          "yellow": (245, 225, 25), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
ACTIONS = ("appear", "disappear", "move_left", "move_right", "move_up", "move_down", "grow",
           "change_shape")
DIRECTIONS = {"move_left": ("left", -1, 0), "move_right": ("right", 1, 0),
              "move_up": ("up", 0, -1), "move_down": ("down", 0, 1)}
COUNTS = ("zero", "one", "two", "three")
ANSWERS = tuple(COLORS) + SHAPES + COUNTS[1:] + ("left", "right", "up", "down", "yes", "no")
DOMAINS = ("sports", "tutorials", "news", "general")
QUANTUM = 0.5  # Seconds; segment boundaries fall on this grid so steps of 0.5 s can find them.


class DatasetError(ValueError):
  """config.data.dir holds something other than this generator's dataset for the config."""


# ----- content ------------------------------------------------------------------------------
def sample_clip(rng: np.random.Generator, *, frame_size: int, duration: float,
                domains=DOMAINS, max_objects: int = 3) -> dict:
  """Draws the content of one clip: domain, objects, the actor's timed events.

  Returns a dict with `domain`, `objects` (list of dicts color, shape, x, y, r; index 0 is the
  actor), `events` (list of dicts label, start, end, and `target` for change_shape).
  """
  s = float(frame_size)
  domain = str(domains[rng.integers(len(domains))])
  n_obj = int(rng.choice(np.arange(1, max_objects + 1),
                         p=_normalise([0.4, 0.4, 0.2][:max_objects])))
  colors = [str(c) for c in rng.permutation(list(COLORS))[:n_obj]]
  shapes = [str(c) for c in rng.permutation(SHAPES)[:n_obj]]
  events = _sample_events(rng, duration, n_obj)
  free_shapes = [x for x in SHAPES if x not in shapes]
  for ev in events:
    if ev["label"] == "change_shape":
      ev["target"] = str(free_shapes[rng.integers(len(free_shapes))])
  r = s * rng.uniform(0.11, 0.14)
  grow = 1.5 if any(e["label"] == "grow" for e in events) else 1.0
  step = 0.32 * s
  path = [(0.0, 0.0)]
  for ev in events:
    if ev["label"] in DIRECTIONS:
      _, dx, dy = DIRECTIONS[ev["label"]]
      path.append((path[-1][0] + dx * step, path[-1][1] + dy * step))
  px, py = np.array(path).T
  margin = r * grow + 1
  x0 = rng.uniform(margin - px.min(), s - margin - px.max())
  y0 = rng.uniform(margin - py.min(), s - margin - py.max())
  actor = dict(color=colors[0], shape=shapes[0], x=x0, y=y0, r=r)
  objects = [actor]
  waypoints = np.stack([x0 + px, y0 + py], 1)
  for i in range(1, n_obj):
    ro = s * rng.uniform(0.11, 0.14)
    for _ in range(100):
      x, y = rng.uniform(ro + 1, s - ro - 1, size=2)
      far_from_actor = _segment_distance(waypoints, (x, y)) > r * grow + ro + 3
      far_from_others = all(np.hypot(x - o["x"], y - o["y"]) > o["r"] + ro + 3
                            for o in objects[1:])
      if far_from_actor and far_from_others:
        objects.append(dict(color=colors[i], shape=shapes[i], x=x, y=y, r=ro))
        break
  for ev in events:
    if ev["label"] == "change_shape" and ev["target"] in [o["shape"] for o in objects]:
      ev["target"] = next(x for x in SHAPES if x not in [o["shape"] for o in objects])
  return dict(domain=domain, objects=objects, events=events, duration=duration,
              frame_size=frame_size)


def _normalise(p):
  p = np.asarray(p, np.float64)
  return p / p.sum()


def _segment_distance(points: np.ndarray, q) -> float:
  """Smallest distance from q to the polyline through `points`."""
  q = np.asarray(q, np.float64)
  if len(points) == 1:
    return float(np.hypot(*(points[0] - q)))
  best = np.inf
  for a, b in zip(points[:-1], points[1:]):
    ab = b - a
    t = np.clip(np.dot(q - a, ab) / max(np.dot(ab, ab), 1e-9), 0, 1)
    best = min(best, float(np.hypot(*(a + t * ab - q))))
  return best


def _sample_events(rng, duration: float, n_obj: int) -> list[dict]:
  slots = int(round(duration / QUANTUM))
  lengths = [2, 3, 4, 5]  # In quanta: 1.0 to 2.5 s.
  k = 2 if slots >= lengths[0] + lengths[1] and rng.random() < 0.6 else 1
  lengths = [n for n in lengths if n <= slots] or [max(slots, 1)]
  while True:
    durs = [int(rng.choice(lengths)) for _ in range(k)]
    if sum(durs) <= max(slots, 1) and len(set(durs)) == k:  # Distinct: a unique clip label.
      break
  labels: list[str] = []
  for j in range(k):
    options = [a for a in ACTIONS if a not in labels
               and not (a == "appear" and j > 0) and not (a == "disappear" and j < k - 1)
               and not (a == "change_shape" and n_obj == len(SHAPES))
               and not (a in DIRECTIONS and any(b in DIRECTIONS for b in labels))]
    labels.append(str(options[rng.integers(len(options))]))
  gaps = rng.multinomial(slots - sum(durs), np.ones(k + 1) / (k + 1))
  events, t = [], 0
  for j in range(k):
    t += int(gaps[j])
    events.append(dict(label=labels[j], start=t * QUANTUM, end=(t + durs[j]) * QUANTUM))
    t += durs[j]
  return events


# ----- rendering ------------------------------------------------------------------------------
def background(rng: np.random.Generator, domain: str, size: int) -> np.ndarray:
  """A (size, size, 3) float32 texture in [0, 255] whose look identifies the domain."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  cell = max(size // 8, 2)
  if domain == "sports":  # Mown grass: vertical stripes.
    stripe = ((xx + rng.integers(cell)) // cell) % 2
    img = np.stack([46 + 10 * stripe, 92 + 16 * stripe, 46 + 6 * stripe], -1)
  elif domain == "tutorials":  # Grid paper.
    off = rng.integers(cell, size=2)
    line = (((xx + off[0]) % cell) < 1) | (((yy + off[1]) % cell) < 1)
    img = np.stack([78 + 30 * line, 78 + 30 * line, 86 + 32 * line], -1)
  elif domain == "news":  # Studio gradient with a ticker band at the bottom.
    g = yy / size
    img = np.stack([20 + 20 * g, 28 + 27 * g, 70 + 40 * g], -1)
    band = yy >= size - cell
    img[band] = (95, 30, 30)
  else:  # Smooth blotches.
    coarse = rng.uniform(-1, 1, size=(5, 5))
    fine = _upsample(coarse, size)
    img = np.stack([95 + 25 * fine, 80 + 22 * fine, 65 + 18 * fine], -1)
  tint = rng.uniform(-8, 8, size=3)
  return np.clip(img + tint + rng.normal(0, 2.0, size=img.shape), 0, 255).astype(np.float32)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
  n = grid.shape[0]
  pos = np.linspace(0, n - 1, size)
  i0 = np.clip(np.floor(pos).astype(int), 0, n - 2)
  w = pos - i0
  rows = grid[i0] * (1 - w)[:, None] + grid[i0 + 1] * w[:, None]
  return rows[:, i0] * (1 - w)[None] + rows[:, i0 + 1] * w[None]


def shape_coverage(shape: str, x: float, y: float, r: float, size: int) -> np.ndarray:
  """Anti-aliased coverage in [0, 1] of a shape of half-size r centred at (x, y); (size, size)."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  dx, dy = xx - x, yy - y
  if shape == "circle":
    sd = np.hypot(dx, dy) - r
  elif shape == "square":
    sd = np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
  elif shape == "triangle":  # Apex up, base at y + r.
    sd = np.maximum(dy - r, (2 * np.abs(dx) - (dy + r)) / np.sqrt(5.0))
  else:
    raise ValueError(f"Unknown shape {shape!r}.")
  return np.clip(0.5 - sd, 0.0, 1.0)


def actor_pose(clip: dict, t: float, offset: float = 0.0):
  """(x, y, r, alpha, mix, target) of the actor at time t: centre, half-size, opacity, and the
  share `mix` of the shape `target` it is turning into (render_clip's motion)."""
  actor = clip["objects"][0]
  step = 0.32 * clip["frame_size"]
  x, y, r, alpha, mix = actor["x"] + offset, actor["y"] + offset, actor["r"], 1.0, 0.0
  target = actor["shape"]
  for ev in clip["events"]:
    p = float(np.clip((t - ev["start"]) / (ev["end"] - ev["start"]), 0.0, 1.0))
    label = ev["label"]
    if label in DIRECTIONS:
      _, dx, dy = DIRECTIONS[label]
      x, y = x + dx * step * p, y + dy * step * p
    elif label == "grow":
      r *= 1 + 0.5 * p
    elif label == "appear":
      alpha *= p
    elif label == "disappear":
      alpha *= 1 - p
    elif label == "change_shape":
      mix, target = p, ev["target"]
  return x, y, r, alpha, mix, target


def actor_coverage(clip: dict, t: float, size: int, offset: float = 0.0):
  """(coverage (size, size) in [0, 1] times opacity, the shape it mostly shows) of the actor at
  time t; render_clip draws it and shape_maps labels it."""
  x, y, r, alpha, mix, target = actor_pose(clip, t, offset)
  shape = clip["objects"][0]["shape"]
  cov = (1 - mix) * shape_coverage(shape, x, y, r, size)
  if mix > 0:
    cov = cov + mix * shape_coverage(target, x, y, r, size)
  return alpha * cov, target if mix > 0.5 else shape


def shape_maps(clip: dict, num_frames: int, fps: float, frames=None) -> np.ndarray:
  """(num_frames, N, N) int8: per pixel, the index in SHAPES of the shape drawn there (the
  actor's current majority shape while it changes), -1 for background; a pixel belongs to an
  object where its coverage (times opacity, for the actor) is at least a half. `frames`: only
  these frame indices, in that order (a sampled clip), instead of all num_frames."""
  size = int(clip["frame_size"])
  still = np.full((size, size), -1, np.int8)
  for o in clip["objects"][1:]:
    still[shape_coverage(o["shape"], o["x"], o["y"], o["r"], size) >= 0.5] = SHAPES.index(
        o["shape"])
  frames = np.arange(num_frames) if frames is None else np.asarray(frames)
  maps = np.repeat(still[None], len(frames), 0)
  for k, i in enumerate(frames):
    cov, shown = actor_coverage(clip, int(i) / fps, size)
    maps[k][cov >= 0.5] = SHAPES.index(shown)
  return maps


BACKGROUND = len(SHAPES)  # token_shape_labels' class of a token that shows no shape.


def token_shape_labels(maps: np.ndarray, tubelet) -> np.ndarray:
  """Per-pixel shape maps (T, S, S) (shape_maps) -> each tubelet token's class
  (T/t * (S/p)^2,), time-major as the encoder's tokens: the shape drawn on most of its pixels
  if that is at least a tenth of them, else BACKGROUND (3)."""
  t, p, q = (int(x) for x in tubelet)
  n, h, w = maps.shape
  cells = maps.reshape(n // t, t, h // p, p, w // q, q).transpose(0, 2, 4, 1, 3, 5)
  cells = cells.reshape(-1, t * p * q)
  counts = np.stack([(cells == k).sum(1) for k in range(BACKGROUND)], 1)
  best = counts.argmax(1)
  return np.where(counts.max(1) * 10 >= t * p * q, best, BACKGROUND).astype(np.int32)


def render_clip(clip: dict, num_frames: int, fps: float, bg: np.ndarray,
                offset: float = 0.0) -> np.ndarray:
  """Frames (num_frames, N, N, 3) uint8 of `clip` over bg (N, N, 3); frame i shows time i / fps.

  N is normally the clip's frame_size; a larger canvas (the world of `footage`) draws the
  scene `offset` px from its top-left corner.
  """
  size = bg.shape[0]
  actor = clip["objects"][0]
  frames = np.empty((num_frames, size, size, 3), np.uint8)
  static = bg.copy()
  for o in clip["objects"][1:]:
    cov = shape_coverage(o["shape"], o["x"] + offset, o["y"] + offset, o["r"], size)[..., None]
    static = static * (1 - cov) + np.array(COLORS[o["color"]], np.float32) * cov
  for i in range(num_frames):
    cov = actor_coverage(clip, i / fps, size, offset)[0][..., None]
    img = static * (1 - cov) + np.array(COLORS[actor["color"]], np.float32) * cov
    frames[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
  return frames


def write_mp4(path: str, frames: np.ndarray, fps: int, *, crf: int = 18) -> None:
  """Writes (T, H, W, 3) uint8 frames as H.264 (yuv420p); frame i gets pts i / fps."""
  container = av.open(path, "w")
  try:
    stream = container.add_stream("libx264", rate=int(fps))
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": str(crf), "preset": "veryfast"}
    stream.codec_context.thread_count = 1  # Deterministic bytes, and cheap in a process pool.
    for f in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  finally:
    container.close()


# ----- annotations ----------------------------------------------------------------------------
def _phrase(ev: dict) -> str:
  label = ev["label"]
  if label in DIRECTIONS:
    return f"moves {DIRECTIONS[label][0]}"
  if label == "change_shape":
    return f"turns into a {ev['target']}"
  return {"appear": "appears", "disappear": "disappears", "grow": "grows"}[label]


def caption(clip: dict) -> str:
  """The template caption: actor, its events in order, the still objects by colour name
  (not by position, so that a horizontally flipped clip keeps its caption)."""
  actor, others = clip["objects"][0], sorted(clip["objects"][1:], key=lambda o: o["color"])
  text = f"a {actor['color']} {actor['shape']} " + " and then ".join(
      _phrase(e) for e in clip["events"])
  if others:
    text += " next to " + " and ".join(f"a {o['color']} {o['shape']}" for o in others)
  return text


def questions(clip: dict, rng: np.random.Generator, max_questions: int = 4) -> list[dict]:
  """Up to `max_questions` QA pairs of different kinds, answers in `ANSWERS`."""
  objs, events = clip["objects"], clip["events"]
  change = next((e for e in events if e["label"] == "change_shape"), None)
  kinds: list[list[tuple[str, str]]] = []
  stable = objs[1:] if change else objs  # A changing actor has no single shape to name.
  kinds.append([(f"what color is the {o['shape']} ?", o["color"]) for o in stable])
  kinds.append([(f"what shape is the {o['color']} object ?", o["shape"]) for o in stable])
  kinds.append([("how many objects are there ?", COUNTS[len(objs)])])
  a = objs[0]
  move = next((e for e in events if e["label"] in DIRECTIONS), None)
  if move:
    kinds.append([(f"which way does the {a['color']} {a['shape']} move ?",
                   DIRECTIONS[move["label"]][0])])
  if change:
    kinds.append([(f"what does the {a['color']} {a['shape']} turn into ?", change["target"])])
  if rng.random() < 0.5:
    o = objs[rng.integers(len(objs))]
    kinds.append([(f"is there a {o['color']} {o['shape']} ?", "yes")])
  else:
    # A colour no object has: presence of the colour decides, which a small model can learn.
    absent = [(c, s) for c in COLORS for s in SHAPES if c not in {o["color"] for o in objs}]
    c, s = absent[rng.integers(len(absent))]
    kinds.append([(f"is there a {c} {s} ?", "no")])
  kinds = [k for k in kinds if k]
  order = rng.permutation(len(kinds))
  pairs = [kinds[j][rng.integers(len(kinds[j]))] for j in order[:max_questions]]
  return [dict(question=q, answer=ans) for q, ans in pairs]


def make_example(seed: int, split: str, index: int, settings: dict) -> dict[str, Any]:
  """Content, frames and annotation entries of one clip; a pure function of its arguments."""
  rng = np.random.default_rng([seed, _split_code(split), index])
  duration = settings["num_frames"] / settings["fps"]
  clip = sample_clip(rng, frame_size=settings["frame_size"], duration=duration,
                     domains=settings["domains"], max_objects=settings["max_objects"])
  bg = background(rng, clip["domain"], settings["frame_size"])  # Drawn either way: same QA.
  if settings.get("footage"):  # Real-footage properties (footage.py): their own random stream.
    frames = _film(clip, settings, np.random.default_rng([seed, _split_code(split), index, 1]))
  else:
    frames = render_clip(clip, settings["num_frames"], settings["fps"], bg)
  vid = f"{split}_{index:05d}"
  base = dict(video_id=vid, domain=clip["domain"])
  return dict(
      video_id=vid, frames=frames, clip=clip,
      action_detection=dict(base, duration=duration, actions=[
          dict(start=e["start"], end=e["end"], label=e["label"]) for e in clip["events"]]),
      video_qa=dict(base, qa_pairs=questions(clip, rng)),
      video_captioning=dict(base, captions=[caption(clip)]))


def _split_code(split: str) -> int:
  return SPLITS.index(split) if split in SPLITS else 99


def _film(clip: dict, settings: dict, rng: np.random.Generator) -> np.ndarray:
  """Frames (T, S, S, 3) uint8 of `clip` filmed with settings["footage"] (see footage.py)."""
  options = footage.validate(settings["footage"])
  size, num_frames = settings["frame_size"], settings["num_frames"]
  margin = footage.world_margin(size, num_frames, options)
  world = size + 2 * margin
  bg = background(rng, clip["domain"], world)
  bg = np.clip(bg + footage.texture(rng, world, options["texture"])[..., None], 0, 255)
  worlds = render_clip(clip, num_frames, settings["fps"], bg, offset=margin)
  return footage.shoot(worlds, size, options, rng)


def _write_one(job) -> dict:
  root, split, index, settings = job
  ex = make_example(settings["seed"], split, index, settings)
  write_mp4(os.path.join(root, split, "videos", ex["video_id"] + ".mp4"), ex["frames"],
            settings["fps"])
  return {k: ex[k] for k in ("action_detection", "video_qa", "video_captioning")}


LAYOUT_FILE = "object_layout.json"  # In each split's annotations/ (not for `footage` clips).


def object_layout(seed: int, split: str, index: int, settings: dict) -> dict:
  """What clip `index` of `split` draws, in the frame: the objects (colour, shape, centre x, y
  and half-size r in pixels; the actor first) and the actor's events, with the clip's fps and
  frame size; shape_maps(layout, ...) gives the shape under every pixel of every frame. The
  content make_example draws first, so it is drawn alone (no rendering)."""
  rng = np.random.default_rng([seed, _split_code(split), index])
  clip = sample_clip(rng, frame_size=settings["frame_size"],
                     duration=settings["num_frames"] / settings["fps"],
                     domains=settings["domains"], max_objects=settings["max_objects"])
  return dict(video_id=f"{split}_{index:05d}", fps=settings["fps"],
              num_frames=settings["num_frames"], **clip)


def write_layouts(root: str, settings: dict) -> None:
  """Writes each split's LAYOUT_FILE that is missing (a pure function of the settings, so an
  older dataset gains it without any other file changing); nothing for `footage` datasets,
  whose camera moves the objects in the frame."""
  if settings.get("footage"):
    return
  for split in SPLITS:
    path = os.path.join(root, split, "annotations", LAYOUT_FILE)
    if os.path.exists(path) or not os.path.isdir(os.path.dirname(path)):
      continue
    rows = [object_layout(settings["seed"], split, i, settings)
            for i in range(settings["num_videos"].get(split, 0))]
    tmp = path + ".tmp"
    try:
      with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
      os.replace(tmp, path)
    except OSError:  # A read-only dataset: load_layouts names the missing file if it is needed.
      if os.path.exists(tmp):
        os.remove(tmp)


def load_layouts(split_dir: str) -> dict[str, dict]:
  """{video_id: layout} from `split_dir`/annotations/LAYOUT_FILE.

  Raises:
    DatasetError: the file is missing or unreadable, named.
  """
  path = os.path.join(split_dir, "annotations", LAYOUT_FILE)
  try:
    with open(path) as f:
      rows = json.load(f)
    return {r["video_id"]: r for r in rows}
  except (OSError, ValueError, KeyError, TypeError) as e:
    reason = "is missing" if isinstance(e, FileNotFoundError) else f"is unreadable ({e})"
    raise DatasetError(
        f"{path} {reason}: the per-token shape targets (config.model.heads.token_shape) need "
        "the object layout that the synthetic generator writes (not for data.synthetic."
        "footage datasets).") from None


def settings_from_config(config) -> dict:
  """Generator settings from `config.data` (the marker file stores them)."""
  syn = config.data.synthetic
  return dict(version=VERSION, seed=int(syn.seed),
              num_videos={k: int(v) for k, v in dict(syn.num_videos).items()},
              frame_size=int(syn.frame_size), num_frames=int(syn.num_frames),
              fps=int(syn.fps), max_objects=int(syn.get("max_objects", 3)),
              domains=[d for d in config.data.domains if d in DOMAINS] or list(DOMAINS),
              **_footage_settings(syn))


def _footage_settings(syn) -> dict:
  """{"footage": options} when config.data.synthetic.footage differs from footage.DEFAULTS,
  else {}: datasets made without it keep their marker (and their bytes)."""
  options = footage.validate(syn.get("footage") or {})
  return {} if options == footage.validate({}) else {"footage": options}


def generate_dataset(root: str, settings: dict, *, num_processes: int | None = None,
                     progress: bool = False) -> None:
  """Writes the dataset under `root` (created) and the marker file last."""
  jobs = [(root, split, i, settings) for split in SPLITS
          for i in range(settings["num_videos"].get(split, 0))]
  for split in SPLITS:
    os.makedirs(os.path.join(root, split, "videos"), exist_ok=True)
    os.makedirs(os.path.join(root, split, "annotations"), exist_ok=True)
  procs = num_processes or min(os.cpu_count() or 1, 8)
  if procs > 1 and len(jobs) > 16:
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
      results = list(_progress(pool.imap(_write_one, jobs, chunksize=8), len(jobs), progress))
  else:
    results = [_write_one(j) for j in _progress(jobs, len(jobs), progress)]
  for split in SPLITS:
    rows = [r for j, r in zip(jobs, results) if j[1] == split]
    for task in ("action_detection", "video_qa", "video_captioning"):
      with open(os.path.join(root, split, "annotations", task + ".json"), "w") as f:
        json.dump([r[task] for r in rows], f, indent=1)
  write_layouts(root, settings)
  with open(os.path.join(root, MARKER), "w") as f:
    json.dump(settings, f, indent=1, sort_keys=True)


def _progress(it, total, enabled):
  if not enabled:
    return it
  import tqdm  # Local: only the CLI shows a bar.
  return tqdm.tqdm(it, total=total, desc="synthetic videos")


def ensure_dataset(config, *, progress: bool = False) -> str:
  """Makes sure `config.data.dir` holds the synthetic dataset of `config`; returns the dir.

  No-op unless `config.data.name == "synthetic"`. A complete dataset (marker present with
  the same settings) is reused. Otherwise it is generated into a temporary sibling directory
  that is renamed into place, so a crash never leaves a half-written dataset.

  Raises:
    ValueError: `config.data.dir` exists but is not this generator's complete output.
  """
  root = os.path.abspath(config.data.dir)
  if config.data.name != "synthetic":
    return root
  settings = settings_from_config(config)
  if os.path.exists(root):
    _check_existing(root, settings)
    write_layouts(root, settings)  # A dataset made before they were written gains them.
    return root
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=parent)
  try:
    generate_dataset(tmp, settings, progress=progress)
    try:
      os.rename(tmp, root)
    except OSError:  # Another process finished first; use its dataset if it matches.
      _check_existing(root, settings)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return root


def _check_existing(root: str, settings: dict) -> None:
  marker = os.path.join(root, MARKER)
  if not os.path.exists(marker):
    raise DatasetError(
        f"config.data.dir={root!r} exists but holds no complete synthetic dataset (no {MARKER}); "
        "delete it or point config.data.dir elsewhere.")
  with open(marker) as f:
    found = json.load(f)
  if found != json.loads(json.dumps(settings)):
    raise DatasetError(
        f"The synthetic dataset in config.data.dir={root!r} was made with other settings "
        f"({marker}); delete it or point config.data.dir elsewhere.")
