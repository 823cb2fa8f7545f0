"""Import time, peak host memory and forward equivalence of a ViT-B-sized (86 M) VideoMAE.

  python tools/benchmark_pretrained_import.py --dir=/tmp/videomae_b [--devices=8]
      [--out=benchmarks/pretrained/import_videomae_b.json]

Three phases, each in its own process so that one's memory does not count in another's:
  write   transformers builds VideoMAEForVideoClassification (width 768, 12 layers, 16 frames,
          224 px, 400 classes) from random weights and save_pretrained's it (needs torch).
  import  hvlm_jax.pretrained.load_hf_params into abstract parameters on a (data, fsdp,
          tensor) mesh of --devices devices (fake CPU devices when more than exist): time,
          the process's resident memory before, and its peak (ru_maxrss) after.
  check   one 16 x 224 x 224 clip through both models: max |difference| of the last hidden
          state and the logits.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("dir", "/tmp/videomae_b", "Where the checkpoint is written.")
flags.DEFINE_integer("devices", 8, "Devices of the import mesh (fake CPU devices).")
flags.DEFINE_string("out", "benchmarks/pretrained/import_videomae_b.json", "Results file.")
flags.DEFINE_string("phase", "", "Internal: write, import or check.")
FLAGS = flags.FLAGS


def rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write(path: str) -> dict:
  import torch
  import transformers
  torch.manual_seed(0)
  start = time.perf_counter()
  config = transformers.VideoMAEConfig(num_labels=400)  # ViT-B defaults: 768, 12, 16 x 224.
  model = transformers.VideoMAEForVideoClassification(config).eval()
  model.save_pretrained(path)
  return dict(parameters=sum(p.numel() for p in model.parameters()),
              file_mib=os.path.getsize(os.path.join(path, "model.safetensors")) / 2**20,
              write_s=time.perf_counter() - start)


def import_config(path: str):
  import ml_collections

  from hvlm_jax import pretrained
  base = ml_collections.ConfigDict(dict(
      model=dict(hidden_size=0, num_layers=0, num_attention_heads=0, mlp_dim=0,
                 tubelet_size=(2, 16, 16), heads=dict(classification_pooling="encoder",
                                                       num_classes=400),
                 domain_modules=dict(lora=dict(alpha=16.0))),
      data=dict(video=dict(num_frames=16, frame_size=224))))
  return pretrained.apply_hf_architecture(base, path, set())


def run_import(path: str, devices: int) -> dict:
  import jax
  from flax import linen as nn

  from hvlm_jax import pretrained, sharding
  from tools.convert_checkpoint import encoder_of
  config = import_config(path)
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=2 if devices % 2 == 0 else 1))
  clip = jax.ShapeDtypeStruct((1, 16, 224, 224, 3), "float32")

  def init(x):
    return {"encoder": encoder_of(config).init(jax.random.key(0), x)["params"]}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.flax_logical_rules()):
    boxed = jax.eval_shape(init, clip)
  shardings = sharding.tree_shardings(boxed, mesh)
  abstract = jax.tree.map(lambda x: x.value if hasattr(x, "names") else x, boxed,
                          is_leaf=lambda x: hasattr(x, "names"))
  before = rss_mib()
  start = time.perf_counter()
  params, report = pretrained.load_hf_params(path, abstract, shardings, config)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  per_device = max(sum(s.data.nbytes for x in jax.tree.leaves(params)
                       for s in x.addressable_shards if s.device == d)
                   for d in mesh.devices.flat) / 2**20
  return dict(import_s=seconds, rss_before_mib=before, peak_rss_mib=peak_mib(),
              mesh=dict(mesh.shape), largest_device_share_mib=per_device,
              counts=report["counts"])


def check(path: str) -> dict:
  import jax
  import numpy as np
  import torch
  import transformers

  from hvlm_jax import pretrained
  from tools.convert_checkpoint import abstract_params, encoder_of
  config = import_config(path)
  abstract = abstract_params(config)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params, _ = pretrained.load_hf_params(path, abstract, jax.tree.map(lambda _: dev, abstract),
                                        config)
  clip = np.random.RandomState(0).rand(1, 16, 224, 224, 3).astype(np.float32)
  out = jax.jit(lambda p, x: encoder_of(config).apply({"params": p}, x))(params["encoder"],
                                                                        clip)
  head = params["classification_head"]["logits"]
  logits = np.asarray(out["pooled"] @ head["kernel"] + head["bias"])
  model = transformers.VideoMAEForVideoClassification.from_pretrained(path).eval()
  mean, std = np.asarray(config.model.pixel_mean), np.asarray(config.model.pixel_std)
  pixels = torch.from_numpy(((clip - mean) / std).astype(np.float32).transpose(0, 1, 4, 2, 3))
  with torch.no_grad():
    hidden = model.videomae(pixels).last_hidden_state.numpy()
    ref_logits = model(pixels).logits.numpy()
  return dict(max_abs_diff_hidden=float(np.abs(np.asarray(out["tokens"]) - hidden).max()),
              max_abs_diff_logits=float(np.abs(logits - ref_logits).max()),
              hidden_abs_mean=float(np.abs(hidden).mean()))


def phase(name: str, env=None) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f"--phase={name}", f"--dir={FLAGS.dir}",
         f"--devices={FLAGS.devices}"]
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  if result.returncode:
    sys.stderr.write(result.stderr[-4000:])
    raise SystemExit(f"Phase {name} failed.")
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(_):
  if FLAGS.phase:
    fn = dict(write=lambda: write(FLAGS.dir),
              **{"import": lambda: run_import(FLAGS.dir, FLAGS.devices)},
              check=lambda: check(FLAGS.dir))[FLAGS.phase]
    print(json.dumps(fn()))
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={FLAGS.devices}")
  results = dict(write=phase("write"), **{"import": phase("import", env)},
                 check=phase("check", dict(os.environ, JAX_PLATFORMS="cpu")))
  results["command"] = " ".join(sys.argv)
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(results, f, indent=2)
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  app.run(main)
