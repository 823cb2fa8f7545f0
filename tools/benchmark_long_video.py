"""Long-video streaming: peak memory and time for 1, 4, 16, 64 segments.

    python tools/benchmark_long_video.py --out benchmarks/long_video

Model: configs/demo.py's (width 128, 4 blocks, 4 heads, 16 frames of 64 x 64 per clip, (2, 8, 8)
tubelets: 512 tokens per segment), all four heads, float32, random parameters; streaming with
--segment_seconds per segment, a bank of model.streaming.memory_capacity entries. The input is
one generated video (moving shapes, 8 fps, H.264) of max(--segments) segments; a run over S
segments streams its first S * segment_seconds seconds: lazy decoding
(hvlm_jax/data/segments.py) -> the compiled per-segment step -> the compiled finish (QA,
beam-search captioning, classification from the bank, detection NMS over all segments).

Each S runs in its own process, so that its peak RSS is its own. Columns:
  step_peak_mib / finish_peak_mib  compiled `memory_analysis()` of the per-segment step and of
      the finish: arguments + temporaries + outputs - aliased (device memory of the program;
      one program serves every S).
  rss_peak_mib    the process's peak resident memory (ru_maxrss): on CPU the device buffers
      live in host memory, so this is the measured device + host peak.
  rss_growth_mib  largest resident memory after any segment minus before the first.
  stream_s / per_segment_s / decode_s  wall time of decoding + steps + finish (median of
      --repeats streams after a warm-up; compilation excluded), per segment, decoding share.
  clip_peak_mib   for contrast, compiled memory of `HierarchicalVLM.predict` on ONE clip of
      S * 16 frames (what a non-streaming model needs to see the same video at once; compile
      only, never run).
Writes <out>/results.{csv,md,json} and <out>/long_video.png.
"""
from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(_ROOT, "configs", "demo.py"),
                                          "Model config.")
_OUT = flags.DEFINE_string("out", "benchmarks/long_video", "Output directory.")
_SEGMENTS = flags.DEFINE_list("segments", ["1", "4", "16", "64"], "Segment counts.")
_CLIP_SEGMENTS = flags.DEFINE_list("clip_segments", ["1", "4", "16", "64"],
                                   "Segment counts for the one-clip contrast (compile only).")
_SECONDS = flags.DEFINE_float("segment_seconds", 4.0, "Seconds per segment.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Streams of the S segments timed (median).")
_CHILD = flags.DEFINE_integer("child", 0, "Internal: measure this many segments, print JSON.")
_VIDEO = flags.DEFINE_string("video", "", "Internal: the generated video.")
_SIZES = flags.DEFINE_list("head_sizes", ["8", "43", "17"],
                           "num_classes, vocab_size, num_answers (the demo vocabularies).")
FPS = 8


def make_config():
  config = _CONFIG.value.copy_and_resolve_references()
  c, v, a = (int(s) for s in _SIZES.value)
  h = config.model.heads
  h.num_classes, h.vocab_size, h.num_answers = c, v, a
  config.model.streaming.segment_seconds = _SECONDS.value
  return config


def write_video(path: str, seconds: float, size: int):
  """Moving, colour-changing squares on a gradient, H.264 (yuv420p) at FPS."""
  import av
  container = av.open(path, "w")
  stream = container.add_stream("libx264", rate=FPS)
  stream.height = stream.width = size
  stream.pix_fmt = "yuv420p"
  stream.options = {"preset": "ultrafast", "crf": "23"}
  yy, xx = np.mgrid[:size, :size]
  for i in range(int(seconds * FPS)):
    frame = np.stack([xx * 2, yy * 2, np.full_like(xx, 64)], -1).astype(np.uint8)
    for k in range(3):
      cx = int((size / 2) + (size / 3) * np.sin(i / (7.0 + 5 * k)))
      cy = int((size / 2) + (size / 3) * np.cos(i / (11.0 + 3 * k)))
      frame[max(cy - 6, 0):cy + 6, max(cx - 6, 0):cx + 6] = (40 * k + 100, 255 - 60 * k,
                                                             (i * 3) % 255)
    for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()


def rss_mib() -> float:
  with open("/proc/self/statm") as fh:
    return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def program_mib(compiled) -> float:
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes -
          m.alias_size_in_bytes) / 2 ** 20


def measure(num: int) -> dict:
  """One S in this process: compile, warm up, stream S segments, finish."""
  import jax
  import jax.numpy as jnp
  from flax import linen as nn

  from hvlm_jax.data import segments as segments_lib
  from hvlm_jax.data.annotations import SplitData, VideoEntry
  from hvlm_jax.models import model as model_lib
  from hvlm_jax.models import streaming

  config = make_config()
  config.data.input, config.data.augment.enabled = "video", False
  model = streaming.build_streaming_model(config)
  entry = VideoEntry("long", _VIDEO.value, duration=num * _SECONDS.value)
  reader = segments_lib.SegmentReader(config, SplitData("test", os.path.dirname(_VIDEO.value),
                                                        [entry]))
  steps = config.data.video.num_frames // config.model.tubelet_size[0]
  d, h = config.data, config.model.heads
  rng = np.random.default_rng(0)
  video = dict(valid=np.ones(1, bool), domain=np.zeros(1, np.int32),
               duration=np.full(1, entry.duration, np.float32),
               questions=rng.integers(4, h.vocab_size, (1, d.max_questions, d.question_length)
                                      ).astype(np.int32))

  def segment_batch(i, seg):
    fields = segments_lib._step_fields(config, i, _SECONDS.value)
    return dict(video=seg["video"][None], domain=video["domain"], duration=video["duration"],
                step_times=fields["step_times"][None],
                step_duration=np.full(1, fields["step_duration"], np.float32),
                segment_valid=np.ones(1, bool))

  first = next(reader.segments(entry, 0, 1))
  clip = dict(segment_batch(0, first), questions=video["questions"],
              caption_tokens=np.zeros((1, d.caption_length), np.int32))
  variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), clip))
  state = streaming.init_state(model, 1, steps)
  step = jax.jit(lambda v, s, b: streaming.segment_step(model, v, s, b), donate_argnums=1)
  step = step.lower(variables, state, segment_batch(0, first)).compile()
  finish = jax.jit(lambda v, s, b: streaming.finish(model, v, s, b))
  finish = finish.lower(variables, state, video).compile()
  out = dict(segments=num, video_seconds=num * _SECONDS.value, step_peak_mib=program_mib(step),
             finish_peak_mib=program_mib(finish))
  jax.block_until_ready(finish(variables, step(variables, streaming.init_state(model, 1, steps),
                                               segment_batch(0, first)), video))  # Warm-up.

  rss_before = rss_mib()
  runs, trace = [], []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    decode_s = 0.0
    state = streaming.init_state(model, 1, steps)
    source = reader.segments(entry, 0, num)
    for i in range(num):
      t = time.perf_counter()
      seg = next(source)
      decode_s += time.perf_counter() - t
      state = step(variables, state, segment_batch(i, seg))
      jax.block_until_ready(state)
      trace.append(round(rss_mib() - rss_before, 2))
    preds = jax.block_until_ready(finish(variables, state, video))
    runs.append((time.perf_counter() - t0, decode_s))
  total, decode_s = (float(np.median([r[k] for r in runs])) for k in (0, 1))
  out.update(stream_s=total, per_segment_s=total / num, decode_s=decode_s,
             rss_growth_mib=max(trace),
             rss_peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             detections=int(np.asarray(preds["detection_valid"]).sum()),
             bank_entries=int(np.asarray(state["bank_mask"]).sum()), rss_trace_mib=trace)

  if str(num) in _CLIP_SEGMENTS.value:  # One clip of the whole video, compile only.
    base = model_lib.build_model(config)
    frames = num * config.data.video.num_frames
    size = config.data.video.frame_size
    big = dict(clip, video=jax.ShapeDtypeStruct((1, frames, size, size, 3), jnp.uint8),
               step_times=jax.ShapeDtypeStruct((1, frames // 2), jnp.float32))
    params = jax.eval_shape(lambda r, b: nn.meta.unbox(base.init(r, b)), jax.random.key(0), big)
    predict = jax.jit(lambda v, b: base.apply(v, b, method=model_lib.HierarchicalVLM.predict))
    out["clip_peak_mib"] = program_mib(predict.lower(params, big).compile())
  return out


def write_results(rows, out: str, command: str):
  os.makedirs(out, exist_ok=True)
  keys = ["segments", "video_seconds", "step_peak_mib", "finish_peak_mib", "rss_peak_mib",
          "rss_growth_mib", "stream_s", "per_segment_s", "decode_s", "clip_peak_mib",
          "bank_entries", "detections"]
  with open(os.path.join(out, "results.csv"), "w", newline="") as fh:
    w = csv.DictWriter(fh, keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  with open(os.path.join(out, "results.json"), "w") as fh:
    json.dump(rows, fh, indent=1)
  fmt = lambda v: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa
  lines = [f"# Long-video streaming\n\n`{command}`\n", "| " + " | ".join(keys) + " |",
           "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
  ref = [r for r in rows if r["segments"] >= 4]
  if len(ref) >= 2:
    peaks = [r["rss_peak_mib"] for r in ref]
    per = [r["per_segment_s"] for r in ref]
    lines.append(f"\nPeak RSS from {ref[0]['segments']} to {ref[-1]['segments']} segments: "
                 f"{min(peaks):.1f} .. {max(peaks):.1f} MiB "
                 f"(spread {100 * (max(peaks) / min(peaks) - 1):.1f}%); per-segment time "
                 f"{min(per):.3f} .. {max(per):.3f} s; compiled step "
                 f"{ref[0]['step_peak_mib']:.1f} MiB for every S.")
  if len(rows) >= 2:  # Time = fixed + per_segment * S, least relative squares over every S.
    s, t = np.array([r["segments"] for r in rows], float), np.array([r["stream_s"] for r in rows])
    (per, fixed), *_ = np.linalg.lstsq(np.stack([s / t, 1 / t], 1), np.ones_like(t), rcond=None)
    worst = np.max(np.abs(per * s + fixed - t) / t)
    lines.append(f"\nTime fit: {fixed:.3f} s + {per:.4f} s x segments (largest relative "
                 f"deviation {100 * worst:.0f}%).")
  with open(os.path.join(out, "results.md"), "w") as fh:
    fh.write("\n".join(lines) + "\n")
  plot(rows, os.path.join(out, "long_video.png"))


def plot(rows, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  s = [r["segments"] for r in rows]
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  a.plot(s, [r["rss_peak_mib"] for r in rows], "o-", label="streaming: process peak RSS")
  a.plot(s, [r["step_peak_mib"] for r in rows], "s-", label="streaming: compiled step")
  clip = [(r["segments"], r["clip_peak_mib"]) for r in rows if r.get("clip_peak_mib")]
  if clip:
    a.plot(*zip(*clip), "x--", label="one clip of the whole video: compiled predict")
  a.set(xscale="log", yscale="log", xlabel="segments", ylabel="MiB", title="Peak memory")
  a.legend(fontsize=8)
  b.plot(s, [r["stream_s"] for r in rows], "o-", label="streaming (decode + steps + finish)")
  b.plot(s, [r["decode_s"] for r in rows], "s-", label="of which decoding")
  b.set(xscale="log", yscale="log", xlabel="segments", ylabel="seconds", title="Time")
  b.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  if _CHILD.value:
    print("RESULT " + json.dumps(measure(_CHILD.value)), flush=True)
    return
  out = os.path.abspath(_OUT.value)
  os.makedirs(out, exist_ok=True)
  counts = sorted(int(s) for s in _SEGMENTS.value)
  video = os.path.join(out, "long_video.mp4")
  write_video(video, max(counts) * _SECONDS.value, make_config().data.video.frame_size)
  passthrough = [f"--clip_segments={','.join(_CLIP_SEGMENTS.value)}",
                 f"--segment_seconds={_SECONDS.value}", f"--repeats={_REPEATS.value}",
                 f"--head_sizes={','.join(_SIZES.value)}"]
  passthrough += [a for a in sys.argv[1:] if a.startswith("--config")]  # --config=... forms.
  rows = []
  for num in counts:
    cmd = [sys.executable, os.path.abspath(__file__), f"--child={num}", f"--video={video}",
           f"--segments={','.join(map(str, counts))}", *passthrough]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    result = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not result:
      raise RuntimeError(f"Measuring {num} segments failed:\n{proc.stderr[-3000:]}")
    rows.append(json.loads(result[0][len("RESULT "):]))
    print(json.dumps(rows[-1]), flush=True)
  os.remove(video)
  write_results(rows, out, "python tools/benchmark_long_video.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
  app.run(main)
