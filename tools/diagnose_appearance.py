"""Does a model trained on the synthetic dataset see shape and colour? Three measurements.

    python tools/diagnose_appearance.py --workdir=runs/demo --split=validation \
        --out=benchmarks/appearance/demo
    python tools/diagnose_appearance.py --learnability --stems=hybrid,conv --steps=900 \
        --out=benchmarks/appearance/learnability

With --workdir (a run trained on `data.name="synthetic"`):
  1. QA accuracy by question type and number of objects in the clip, and how often the
     predicted caption names the actor's colour and shape, from the run's predictions on
     --split (`python -m hvlm_jax.evaluate` is run first when they are missing). "what color
     is the square" is answerable from colour alone when the clip has one object; with two or
     three it needs the shape.
  2. A linear probe (softmax regression, 70/30 split of the objects, best of three L2 weights
     on the held-out part) of the encoder's output token at the grid cell of every still object
     in the first --probe_clips training clips, predicting its shape and its colour; the same
     probe on a freshly initialised encoder and on the raw pixels of the 3x3 cells around it.
     A probe below the fresh encoder's means training removed what the random features held.
With --learnability: the demo encoder of the first five rounds (configs/demo.py:
before_token_shape=true; --stems and --patch change it) plus a mean
pool and a linear layer (or, with STEM:head=qa, the demo's QA head asked "what shape is the
<colour> object ?"; with STEM:head=qa_all, that about every object of the clip (1-3 questions,
the first scored); with STEM:head=qa_mix, that and three more questions about the same
object, its colour, its presence and an absent one, all in the loss, shape scored) trained
directly to name the shape of one still object on a random domain background (fresh clips
every step, batch 16, AdamW with the demo's learning rate and a cosine schedule over --steps,
or with --trainer_optimizer the trainer's own optimizer for the demo config); held-out
accuracy on 96 clips every 150 steps; a small plain CNN (3 stages of two 3x3 convolutions,
GELU, global mean; cnn_gn: GroupNorm after each) as the reference. STEM:...:shape_aux=W adds
a dense auxiliary loss (weight W): a linear layer on every encoder token names the shape drawn
on it, or background (token_shape_labels), and its accuracy on the tokens that show a shape is
reported; it tests whether tokens that carry shape let the QA head bind colour to shape.
Writes <out>/results.json and results.md.
"""
from __future__ import annotations

import collections
import functools
import glob
import json
import os
import re
import subprocess
import sys

from absl import app, flags
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

SHAPE_WORDS = r"\b(circle|square|triangle)\b"


def object_count(caption: str) -> int:
  """Objects in a synthetic caption: the actor plus those named after "next to"."""
  still = caption.split(" next to ")[1] if " next to " in caption else ""
  return 1 + len(re.findall(SHAPE_WORDS, still))


def breakdown(records: list[dict], captions: dict[str, str]) -> dict:
  """QA accuracy by (type, objects) and caption actor colour / shape agreement."""
  qa = collections.defaultdict(lambda: [0, 0])
  actor = collections.defaultdict(lambda: [0, 0])
  for r in records:
    n = object_count(captions[r["video_id"]])
    for q in r.get("qa", []):
      cell = qa[(" ".join(q["question"].split()[:2]), n)]
      cell[0] += q["predicted"] == q["answer"]
      cell[1] += 1
    if "caption" in r:
      ref, hyp = captions[r["video_id"]].split(), r["caption"].split()
      for name, i in (("colour", 1), ("shape", 2)):
        actor[name][0] += len(hyp) > i and hyp[i] == ref[i]
        actor[name][1] += 1
  return dict(
      qa=[dict(type=t, objects=n, accuracy=c / m, questions=m)
          for (t, n), (c, m) in sorted(qa.items())],
      caption_actor={k: dict(accuracy=c / m, captions=m) for k, (c, m) in actor.items()})


def linear_probe(x: np.ndarray, y: np.ndarray, classes: int, iterations: int = 500) -> float:
  """Held-out accuracy of L2-regularised softmax regression on standardised features (first
  70% fit by full-batch gradient descent, last 30% scored; best of three L2 weights)."""
  x = np.asarray(x, np.float64)
  x = (x - x.mean(0)) / (x.std(0) + 1e-6)
  x = np.concatenate([x, np.ones((len(x), 1))], 1)
  m = len(y) * 7 // 10
  targets = np.eye(classes)[y[:m]]
  best = 0.0
  for l2 in (1e-3, 1e-2, 1e-1):
    w = np.zeros((x.shape[1], classes))
    for _ in range(iterations):
      logits = x[:m] @ w
      prob = np.exp(logits - logits.max(1, keepdims=True))
      prob /= prob.sum(1, keepdims=True)
      w -= 0.5 * (x[:m].T @ (prob - targets) / m + l2 * w)
    best = max(best, float(((x[m:] @ w).argmax(1) == y[m:]).mean()))
  return best


def diagnose_run(workdir: str, split: str, probe_clips: int) -> dict:
  import jax
  import ml_collections
  from hvlm_jax import data as data_lib
  from hvlm_jax import run as run_lib
  from hvlm_jax import sharding
  from hvlm_jax.checkpoint import Checkpointer
  from hvlm_jax.data import synthetic

  config, _ = run_lib.load_run_config(workdir)
  if config.data.name != "synthetic":
    raise SystemExit(f"{workdir}/config.json: data.name={config.data.name!r}; this tool "
                     "needs a run on the synthetic dataset (it reads the generator's objects).")
  footage = config.data.synthetic.get("footage", {})
  if tuple(footage.get("pan", (0.0, 0.0))) != (0.0, 0.0) or footage.get("zoom", 1.0) != 1.0:
    raise SystemExit(f"{workdir}/config.json: data.synthetic.footage moves the camera, so the "
                     "objects are not at their generator positions; probe a run without it.")
  preds = sorted(glob.glob(os.path.join(workdir, "eval", f"predictions_{split}_step*.json")))
  if not preds:
    subprocess.run([sys.executable, "-m", "hvlm_jax.evaluate", f"--workdir={workdir}",
                    f"--split={split}"], cwd=_ROOT, check=True)
    preds = sorted(glob.glob(os.path.join(workdir, "eval", f"predictions_{split}_step*.json")))
  records = json.load(open(preds[-1]))
  records = records["records"] if isinstance(records, dict) else records
  ann = os.path.join(config.data.dir, split, "annotations", "video_captioning.json")
  captions = {e["video_id"]: e["captions"][0] for e in json.load(open(ann))}
  result = dict(workdir=workdir, predictions=os.path.basename(preds[-1]),
                **breakdown(records, captions))

  vocabs = run_lib.load_vocabularies(workdir)
  config = run_lib.fill_from_vocabularies(config, vocabs)
  config.mesh = ml_collections.ConfigDict(run_lib.INFERENCE_MESH)
  mesh = sharding.make_mesh(config.mesh)
  train = data_lib.load_split(config, "training", training=False)
  model = run_lib.build_model(config)
  example = next(iter(data_lib.eval_batches(config, train, vocabs)))
  ckpt = Checkpointer(workdir, read_only=True, async_save=False)
  step = ckpt.resolve("latest")
  params = dict(trained=run_lib.restore_params(ckpt, step, model, example, mesh),
                fresh=run_lib.init_params(model, example, mesh, jax.random.key(1)))
  encode = jax.jit(lambda p, b: model.apply({"params": p}, b, method=model.encode)
                   ["step_tokens"])
  settings = synthetic.settings_from_config(config)
  p = int(config.model.tubelet_size[1])
  per_row = int(config.data.video.frame_size) // p
  feats = collections.defaultdict(list)
  shapes, colours, seen = [], [], 0
  for batch in data_lib.eval_batches(config, train, vocabs):
    tokens = {k: np.asarray(encode(v, batch)) for k, v in params.items()}
    for i in np.flatnonzero(batch["valid"]):
      # The generator's objects of this clip: video ids are "training_{index:05d}".
      video_id = train.entries[int(batch["index"][i])].video_id
      index = int(video_id.rsplit("_", 1)[1])
      clip = synthetic.make_example(settings["seed"], "training", index, settings)["clip"]
      seen += 1
      for o in clip["objects"][1:]:  # Still objects: the same cell in every frame.
        r, c = int(o["y"] // p), int(o["x"] // p)
        for k in params:
          feats[k].append(tokens[k][i, 0, r * per_row + c])
        window = np.zeros((3 * p, 3 * p, 3), np.float32)
        y0, x0 = max(r - 1, 0), max(c - 1, 0)
        cut = batch["video"][i, 0, y0 * p:(r + 2) * p, x0 * p:(c + 2) * p]
        window[:cut.shape[0], :cut.shape[1]] = cut / 255.0
        feats["pixels"].append(window.ravel())
        shapes.append(synthetic.SHAPES.index(o["shape"]))
        colours.append(list(synthetic.COLORS).index(o["color"]))
    if seen >= probe_clips:
      break
  shapes, colours = np.array(shapes), np.array(colours)
  result["probe"] = dict(
      step=step, clips=seen, objects=len(shapes),
      chance=dict(shape=float(np.bincount(shapes).max() / len(shapes)),
                  colour=float(np.bincount(colours).max() / len(colours))),
      features={k: dict(shape=linear_probe(v, shapes, len(synthetic.SHAPES)),
                        colour=linear_probe(v, colours, len(synthetic.COLORS)))
                for k, v in feats.items()})
  return result


def learnability(stems, patch: int, steps: int, seed: int,
                 trainer_optimizer: bool = False, clips: str = "still") -> dict:
  from hvlm_jax.config import import_sibling
  from hvlm_jax.data import synthetic

  # The demo's encoder of the first five rounds (before its fold stem and token-shape head).
  base = import_sibling(os.path.join(_ROOT, "configs", "demo.py"), "demo.py").get_config(
      "before_token_shape=true")
  if patch:
    base.model.tubelet_size = (base.model.tubelet_size[0], patch, patch)
  source = clip_source(clips, base, switch=steps // 2 * 16)  # 16 clips a step.

  words = ["<pad>", "what", "shape", "is", "the", "object", "?", "color", "there", "a",
           *synthetic.COLORS, *synthetic.SHAPES]
  colors = list(synthetic.COLORS)
  # head=qa_mix answers: the shapes, then the colours, then yes / no.
  answers = [*synthetic.SHAPES, *colors, "yes", "no"]

  def sample(rng, n, mode="qa", held_out=False, aux=False):
    """({"video": (n, T, S, S, 3) uint8, "question": (n, Q, 7) int32}, labels, objects):
    shape labels (n,) and Q=1, or with `mix` four questions per clip and their answer ids
    (n, 4); with mode qa_all the shape question about each object of the clip (n, 3), -1 for
    none; objects (n,): how many objects the clip shows. With `aux`, labels is a pair: those
    and each token's shape (n, N) (token_shape_labels)."""
    mix = mode == "qa_mix"
    videos, labels, questions, counts, token_labels = [], [], [], [], []
    for i in range(n):
      video, objects, count, maps = source(rng, i if held_out else None)
      obj = objects[0]
      videos.append(video)
      counts.append(count)
      if aux:
        token_labels.append(synthetic.token_shape_labels(maps, base.model.tubelet_size))
      asked = [(f"what shape is the {obj['color']} object ?", obj["shape"])]
      if mode == "qa_all":  # The same question about every other object of the clip too.
        asked += [(f"what shape is the {o['color']} object ?", o["shape"])
                  for o in objects[1:]]
        asked += [("", "")] * (MAX_OBJECTS - len(asked))  # Padding: no tokens, no label.
      if mix:  # The demo's other kinds about the same object: colour, presence, absence.
        other = [c for c in colors if c != obj["color"]][rng.integers(len(colors) - 1)]
        absent_shape = synthetic.SHAPES[rng.integers(len(synthetic.SHAPES))]
        asked += [(f"what color is the {obj['shape']} ?", obj["color"]),
                  (f"is there a {obj['color']} {obj['shape']} ?", "yes"),
                  (f"is there a {other} {absent_shape} ?", "no")]
      questions.append([[words.index(w) for w in q.split()] + [0] * (7 - len(q.split()))
                        for q, _ in asked])
      if mode == "qa_all":
        labels.append([synthetic.SHAPES.index(a) if a else -1 for _, a in asked])
      else:
        labels.append([answers.index(a) for _, a in asked] if mix
                      else synthetic.SHAPES.index(obj["shape"]))
    labels = np.array(labels)
    return (dict(video=np.stack(videos), question=np.array(questions, np.int32)),
            (labels, np.stack(token_labels)) if aux else labels, np.array(counts))

  out = {}
  for name in stems:
    cfg = base.model.copy_and_resolve_references()
    entry, aux = bench_options(name)
    stem, head = parse_stem_entry(entry, cfg)
    if aux and clips == "demo_files":
      raise SystemExit(f"--stems entry {name!r}: shape_aux needs clips whose shape maps are "
                       "known; --clips=demo_files crops them unseen.")
    net = _classifier(stem, cfg, head, len(words), len(answers) if head == "qa_mix" else 0,
                      shape_aux=bool(aux))
    out[name] = _learn_shape(net, functools.partial(sample, mode=head, aux=bool(aux)), base,
                             steps, seed, trainer_optimizer, shape_aux=aux)
  return dict(patch=tuple(base.model.tubelet_size), steps=steps, seed=seed, curves=out,
              optimizer="trainer" if trainer_optimizer else "adamw", clips=clips)


MAX_OBJECTS = 3  # The demo dataset's data.synthetic.max_objects.


def bench_options(name: str) -> tuple[str, float]:
  """Takes the bench's own `:shape_aux=W` out of a --stems entry -> (entry, W or 0.0)."""
  parts, weight = [], 0.0
  for part in name.split(":"):
    key, eq, value = part.partition("=")
    if key == "shape_aux" and eq:
      try:
        weight = float(value)
      except ValueError:
        raise SystemExit(f"--stems entry {name!r}: shape_aux is a loss weight, not "
                         f"{value!r}.") from None
    else:
      parts.append(part)
  return ":".join(parts), weight


CLIPS = ("still", "demo", "demo_one_object", "demo_no_events", "demo_curriculum",
         "demo_files")


def askable_objects(clip: dict) -> list[dict]:
  """The objects of a synthetic clip whose shape can be asked (as synthetic.questions: an
  actor that changes shape has no single shape, so it is left out)."""
  change = any(e["label"] == "change_shape" for e in clip["events"])
  return clip["objects"][1:] if change else clip["objects"]


def clip_source(kind: str, config, switch: int = 0):
  """`source(rng, index) -> (video (T, S, S, 3) uint8, [object dict(color, shape), ...],
  objects in the clip, shape maps (T, S, S) int8 or None)`: a clip and its objects whose shape
  can be asked, the one to score first (drawn at random), and per pixel the index of the shape
  drawn there (-1: background; synthetic.shape_maps), None for demo_files. `index` is None for
  a training clip and the held-out clip's number otherwise.

  still: one still object on a random domain background, fresh every call.
  demo: fresh clips of the demo dataset's generator (1-3 objects, the actor's timed events,
    4 s at 12 fps, 16 frames sampled uniformly), a random still-shaped object (not an actor
    that changes shape, as in the demo's questions); rendered frames, no video coding.
  demo_one_object: the same with one object, the actor, and its events.
  demo_no_events: the same with 1-3 objects and the actor's events removed (all still).
  demo_curriculum: demo_one_object for the first `switch` training clips, then demo.
  demo_files: the demo's own dataset on disk (config.data.dir): the fixed training videos
    through the training pipeline (mp4 decoding, random crop, flip, colour jitter), held-out
    clips from the test split with evaluation preprocessing.
  """
  from hvlm_jax.data import synthetic

  size, frames = int(config.data.video.frame_size), int(config.data.video.num_frames)
  syn = config.data.synthetic
  colors = list(synthetic.COLORS)
  if kind == "still":
    def still(rng, index):  # Draws in the order of the first three rounds' bench.
      shape = synthetic.SHAPES[rng.integers(len(synthetic.SHAPES))]
      r = size * rng.uniform(0.11, 0.14)
      x, y = rng.uniform(r + 1, size - r - 1, size=2)
      obj = dict(shape=shape, x=x, y=y, r=r, color=colors[rng.integers(len(colors))])
      bg = synthetic.background(rng, synthetic.DOMAINS[rng.integers(len(synthetic.DOMAINS))],
                                size)
      clip = dict(objects=[obj], events=[], frame_size=size)
      return (synthetic.render_clip(clip, frames, 12, bg), [obj], 1,
              synthetic.shape_maps(clip, frames, 12))
    return still

  if kind in ("demo", "demo_one_object", "demo_no_events", "demo_curriculum"):
    n, fps = int(syn.num_frames), float(syn.fps)
    drawn = [0]  # Training clips so far (demo_curriculum).
    pick = np.floor((np.arange(frames) + 0.5) * n / frames).astype(int)

    def demo(rng, index):
      one = kind == "demo_one_object" or (
          kind == "demo_curriculum" and index is None and drawn[0] < switch)
      max_objects = 1 if one else int(syn.max_objects)
      drawn[0] += index is None
      while True:
        clip = synthetic.sample_clip(rng, frame_size=int(syn.frame_size), duration=n / fps,
                                     domains=synthetic.DOMAINS, max_objects=max_objects)
        if kind == "demo_no_events":
          clip["events"] = []
        stable = askable_objects(clip)
        if stable:
          break
      bg = synthetic.background(rng, clip["domain"], int(syn.frame_size))
      video = synthetic.render_clip(clip, n, fps, bg)[pick]
      return (video, [stable[j] for j in rng.permutation(len(stable))], len(clip["objects"]),
              synthetic.shape_maps(clip, n, fps)[pick])
    return demo

  if kind != "demo_files":
    raise SystemExit(f"--clips={kind!r} is not one of {', '.join(CLIPS)}.")
  from hvlm_jax.data import annotations, pipeline

  config.data.dir = os.path.join(_ROOT, config.data.dir)
  synthetic.ensure_dataset(config, progress=True)
  settings = synthetic.settings_from_config(config)
  splits, readers, contents = {}, {}, {}
  for split in ("training", "test"):
    splits[split] = annotations.load_split(config, split)
    readers[split] = pipeline.ClipReader(config, splits[split])
    code = synthetic.SPLITS.index(split)
    contents[split] = [  # make_example draws the content first from this generator.
        synthetic.sample_clip(np.random.default_rng([settings["seed"], code, int(
            e.video_id.rsplit("_", 1)[1])]), frame_size=settings["frame_size"],
            duration=settings["num_frames"] / settings["fps"], domains=settings["domains"],
            max_objects=settings["max_objects"]) for e in splits[split].entries]

  def files(rng, index):
    split = "training" if index is None else "test"
    entries = splits[split].entries
    while True:
      j = int(rng.integers(len(entries))) if index is None else index % len(entries)
      stable = askable_objects(contents[split][j])
      if stable:
        break
      index = None if index is None else index + 1
    clip, _ = readers[split].read(entries[j], rng if index is None else None)
    return (clip["video"], [stable[k] for k in rng.permutation(len(stable))],
            len(contents[split][j]["objects"]), None)  # No maps: the crop is not known here.
  return files


def parse_stem_entry(name: str, cfg) -> tuple[str, str]:
  """A --stems entry STEM[:KEY=VALUE...][:head=linear|qa|qa_all|qa_mix] -> (stem, head); sets each
  KEY of config.model `cfg` (a tuple value is written a+b, an empty one KEY=)."""
  import ml_collections

  stem, *overrides = name.split(":")
  head = "linear"
  if stem.startswith("cnn") and overrides:
    raise SystemExit(f"--stems entry {name!r}: the cnn references take no :KEY=VALUE.")
  if not stem.startswith("cnn"):
    cfg.stem = stem
    for item in overrides:
      key, _, value = item.partition("=")
      if key == "head":
        head = value
        continue
      *path, leaf = key.split(".")  # Dotted keys reach nested ones (heads.qa.num_layers).
      node = cfg
      for part in path:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
      if (not isinstance(node, ml_collections.ConfigDict) or leaf not in node
          or isinstance(node[leaf], (dict, ml_collections.ConfigDict))):
        raise SystemExit(f"--stems entry {name!r}: {key!r} is not a config.model key.")
      if isinstance(node[leaf], tuple):  # e.g. motion_input=difference+flow, or empty
        node[leaf] = tuple(x for x in value.split("+") if x)
      elif isinstance(node[leaf], bool):
        if value.lower() not in ("true", "false"):
          raise SystemExit(f"--stems entry {name!r}: {key} is true or false, not {value!r}.")
        node[leaf] = value.lower() == "true"
      else:
        node[leaf] = type(node[leaf])(value)
  return stem, head


def _classifier(stem: str, model_config, head: str = "linear", vocab_size: int = 0,
                num_answers: int = 0, shape_aux: bool = False):
  """Shape logits from {"video", "question"}: a CNN, or the encoder with a mean pool and a
  linear layer (head="linear") or the demo's QA head asked "what shape is the <colour>
  object ?" with the three shapes as its answers (head="qa"), or asked that and three more
  questions (colour, presence, absence) over `num_answers` answers (head="qa_mix": logits
  (B, 4, num_answers)). With `shape_aux`, (those logits, per-token shape logits (B, N, 4)
  from a linear layer on the encoder's tokens)."""
  import flax.linen as nn
  import jax.numpy as jnp
  from hvlm_jax.data import synthetic
  from hvlm_jax.models import heads as heads_lib
  from hvlm_jax.models import model as model_lib

  def head_logits(tokens, questions):  # Module-free: called inside Classifier.__call__.
    if head in ("qa", "qa_mix", "qa_all"):
      logits = heads_lib.QAHead(
          num_answers or len(synthetic.SHAPES), vocab_size,
          hidden_size=model_config.hidden_size, num_layers=model_config.heads.qa.num_layers,
          pool_video=model_config.heads.qa.get("pool_video", True),
          num_heads=model_lib.text_heads(model_config),
          mlp_dim=model_config.heads.text.mlp_dim or model_config.mlp_dim)(
              questions, tokens)
      return logits if head in ("qa_mix", "qa_all") else logits[:, 0]
    if head != "linear":
      raise SystemExit(f"--stems: head={head!r} is not linear, qa, qa_mix or qa_all.")
    return nn.Dense(len(synthetic.SHAPES))(tokens.mean(1))

  class Classifier(nn.Module):
    @nn.compact
    def __call__(self, inputs):
      video = inputs["video"]
      if stem.startswith("cnn"):  # "cnn": no normalisation; "cnn_gn": GroupNorm after each conv.
        y = video[:, 0].astype(jnp.float32) / 255.0 - 0.45
        for width in (32, 64, 128):
          for stride in (2, 1):
            y = nn.Conv(width, (3, 3), strides=(stride, stride))(y)
            y = nn.gelu(nn.GroupNorm(8)(y) if stem == "cnn_gn" else y)
        return nn.Dense(len(synthetic.SHAPES))(y.mean((1, 2)))
      tokens = model_lib.build_encoder(model_config)(video)["tokens"]
      logits = head_logits(tokens, inputs["question"])
      if shape_aux:
        return logits, nn.Dense(synthetic.BACKGROUND + 1, name="shape_aux")(tokens)
      return logits

  return Classifier()


def _learn_shape(net, sample, config, steps: int, seed: int,
                 trainer_optimizer: bool = False, shape_aux: float = 0.0) -> list[dict]:
  """Trains `net` on fresh `sample`s; the held-out curve. With `shape_aux` > 0 the net also
  names each token's shape (token_shape_labels), that cross-entropy weighted by shape_aux
  added to the loss, and the curve has that accuracy on the tokens that show a shape."""
  import jax
  import optax
  from hvlm_jax.data import synthetic
  from hvlm_jax.train import state as state_lib

  rng = np.random.default_rng(seed)
  held_x, held_y, held_n = sample(rng, 96, held_out=True)
  params = net.init(jax.random.key(seed), jax.tree.map(lambda a: a[:2], held_x))
  training = config.training
  if trainer_optimizer:  # The trainer's: global-norm clipping, masked decay, its schedule.
    opt = state_lib.make_optimizer(config, params, steps)
  else:
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(
        0.0, float(training.learning_rate), 30, steps),
        weight_decay=float(training.weight_decay))
  state = opt.init(params)

  def loss_fn(params, x, y):  # Labels -1 (qa_all's padding) are left out.
    out = net.apply(params, x)
    (logits, aux_logits), (y, y_tokens) = (out, y) if shape_aux else ((out, None), (y, None))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jax.numpy.maximum(y, 0))
    real = (y >= 0).astype(ce.dtype)
    loss = (ce * real).sum() / real.sum()
    if shape_aux:
      loss += shape_aux * optax.softmax_cross_entropy_with_integer_labels(
          aux_logits, y_tokens).mean()
    return loss

  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def correct(params, x, y):  # Of the shape question (the first, with several per clip).
    out = net.apply(params, x)
    if shape_aux:  # And of each token that shows a shape.
      (out, aux_logits), (y, y_tokens) = out, y
      aux = (aux_logits.argmax(-1) == y_tokens, y_tokens != synthetic.BACKGROUND)
    pred = out.argmax(-1)
    right = pred[:, 0] == y[:, 0] if y.ndim == 2 else pred == y
    return (right, *aux) if shape_aux else (right,)

  correct = jax.jit(correct)
  curve = []
  for i in range(1, steps + 1):
    params, state = step(params, state, *sample(rng, 16)[:2])
    if i % 150 == 0 or i == steps:
      right, *aux = (np.asarray(a) for a in correct(params, held_x, held_y))
      curve.append(dict(step=i, held_out_accuracy=float(right.mean()), by_objects={
          int(k): float(right[held_n == k].mean()) for k in np.unique(held_n)}))
      if aux:
        curve[-1]["token_shape_accuracy"] = float(aux[0][aux[1]].mean())
      print(curve[-1], flush=True)
  return curve


def write(result: dict, out: str) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  cmd = "python tools/diagnose_appearance.py " + " ".join(sys.argv[1:])
  lines = ["# Appearance diagnosis", "", f"`{cmd}`", ""]
  if "qa" in result:
    lines += [f"Run {result['workdir']}, {result['predictions']}.", "",
              "| question type | objects in clip | accuracy | questions |", "|---|---|---|---|"]
    lines += [f"| {r['type']} | {r['objects']} | {r['accuracy']:.2f} | {r['questions']} |"
              for r in result["qa"]]
    lines += ["", "| caption names the actor's | accuracy |", "|---|---|"]
    lines += [f"| {k} | {v['accuracy']:.2f} ({v['captions']}) |"
              for k, v in result["caption_actor"].items()]
    pr = result["probe"]
    lines += ["", f"Linear probe of the token at each still object's cell (step {pr['step']}, "
              f"{pr['objects']} objects in {pr['clips']} training clips; majority class: shape "
              f"{pr['chance']['shape']:.2f}, colour {pr['chance']['colour']:.2f}):", "",
              "| features | shape | colour |", "|---|---|---|"]
    lines += [f"| {k} | {v['shape']:.2f} | {v['colour']:.2f} |"
              for k, v in pr["features"].items()]
  if "curves" in result:
    lines += [f"Shape learnability, patch {result['patch']}, seed {result['seed']}, clips "
              f"{result.get('clips', 'still')} (held-out accuracy of 96 clips; chance 0.33; "
              "by objects in the clip: accuracy 1/2/3 where given):", "",
              "| step | " + " | ".join(result["curves"]) + " |",
              "|---|" + "---|" * len(result["curves"])]
    for i, row in enumerate(next(iter(result["curves"].values()))):
      lines.append(f"| {row['step']} | " + " | ".join(
          _accuracy_cell(c[i]) for c in result["curves"].values()) + " |")
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def _accuracy_cell(row: dict) -> str:
  cell = f"{row['held_out_accuracy']:.2f}"
  by = row.get("by_objects", {})
  if len(by) > 1:
    cell += " (" + "/".join(f"{by[k]:.2f}" for k in sorted(by, key=int)) + ")"
  if "token_shape_accuracy" in row:
    cell += f"; tokens {row['token_shape_accuracy']:.2f}"
  return cell


def define_flags() -> None:
  """The command's flags; defined only when run as a script, so importing the module (tests)
  does not add them to absl's global registry."""
  flags.DEFINE_string("workdir", None, "A run trained on the synthetic dataset.")
  flags.DEFINE_string("split", "validation", "Split whose predictions are broken down.")
  flags.DEFINE_integer("probe_clips", 800, "Training clips for the linear probe.")
  flags.DEFINE_bool("learnability", False, "Run the shape-learnability bench.")
  flags.DEFINE_list("stems", ["hybrid", "cnn"],
                    "Bench: encoder stems (patch, conv, hybrid; STEM:KEY=VALUE:... also "
                    "sets config.model keys, :head=qa, qa_all or qa_mix puts the QA head on the "
                    "encoder, and :shape_aux=W adds the per-token shape loss), or cnn / cnn_gn "
                    "(6 convs, without / with GroupNorm).")
  flags.DEFINE_integer("patch", 0, "Bench: spatial patch size (0: the demo's).")
  flags.DEFINE_bool("trainer_optimizer", False,
                    "Bench: the trainer's optimizer for the demo config (gradient clipping, "
                    "decay mask, its schedule) instead of plain AdamW.")
  flags.DEFINE_enum("clips", "still", list(CLIPS),
                    "Bench: the clips (see clip_source): one still object, fresh clips of the "
                    "demo's generator, or the demo's dataset files through its pipeline.")
  flags.DEFINE_integer("steps", 900, "Bench: training steps.")
  flags.DEFINE_integer("seed", 0, "Bench: seed of the clips and the initialisation.")
  flags.DEFINE_string("out", "benchmarks/appearance", "Output folder.")


def main(argv):
  del argv
  f = flags.FLAGS
  if f.learnability:
    result = learnability(f.stems, f.patch, f.steps, f.seed, f.trainer_optimizer, f.clips)
  elif f.workdir:
    result = diagnose_run(os.path.abspath(f.workdir), f.split, f.probe_clips)
  else:
    raise SystemExit("Give --workdir=RUN (a run on the synthetic dataset) or --learnability.")
  write(result, f.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
