"""Convert a Hugging Face video backbone to hvlm-jax orbax parameters, and back.

  python tools/convert_checkpoint.py hf_to_orbax --src=HF_DIR --dst=OUT [--num_frames=N]
      [--frame_size=S]
  python tools/convert_checkpoint.py orbax_to_hf --src=OUT --dst=HF_DIR [--merge_domain=D]
      [--model_type=videomae|vivit]

hf_to_orbax writes OUT/params (an orbax PyTree checkpoint of {"encoder": ..., and
"classification_head" when the checkpoint has a classifier}), OUT/hvlm_config.json (the
architecture keys, clip shape and model type that rebuild the encoder) and
OUT/init_report.json (every tensor loaded / interpolated / ignored). A clip shape other than
the checkpoint's interpolates the position embeddings. orbax_to_hf writes a directory that
`transformers` loads (with --merge_domain, that domain's LoRA adapters merged in). A progress bar
counts tensors.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from tqdm import tqdm  # noqa: E402

from hvlm_jax import pretrained  # noqa: E402
from hvlm_jax.models.encoder import VideoEncoder, encoder_architecture  # noqa: E402
from hvlm_jax.pretrained import hf  # noqa: E402

flags.DEFINE_string("src", None, "Source directory (HF checkpoint, or an hf_to_orbax output).")
flags.DEFINE_string("dst", None, "Output directory.")
flags.DEFINE_integer("num_frames", 0, "Clip length to import for (0: the checkpoint's).")
flags.DEFINE_integer("frame_size", 0, "Frame size to import for (0: the checkpoint's).")
flags.DEFINE_integer("merge_domain", None, "orbax_to_hf: merge this domain's LoRA adapters.")
flags.DEFINE_string("model_type", "", "orbax_to_hf: videomae or vivit (default: the source's).")
FLAGS = flags.FLAGS


def base_config(arch: dict, num_frames: int, frame_size: int,
                num_labels: int | None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      model=dict(heads=dict(classification_pooling="encoder", num_classes=num_labels or 0),
                 domain_modules=dict(lora=dict(alpha=16.0))),
      data=dict(video=dict(num_frames=num_frames, frame_size=frame_size))))
  for key, value in arch.items():
    config.model[key.split(".", 1)[1]] = value
  return config


def encoder_of(config) -> VideoEncoder:
  m = config.model
  return VideoEncoder(hidden_size=m.hidden_size, num_layers=m.num_layers,
                      num_heads=m.num_attention_heads, mlp_dim=m.mlp_dim,
                      tubelet_size=tuple(m.tubelet_size), **encoder_architecture(m))


def abstract_params(config):
  """Shapes and dtypes of {"encoder", ["classification_head"]} on the first device; nothing
  is initialised (every leaf comes from the checkpoint)."""
  v = config.data.video
  clip = jax.ShapeDtypeStruct((1, v.num_frames, v.frame_size, v.frame_size, 3), "float32")
  enc = jax.eval_shape(lambda x: encoder_of(config).init(jax.random.key(0), x), clip)
  tree = {"encoder": jax.tree.map(lambda x: getattr(x, "value", x), enc["params"],
                                  is_leaf=lambda x: hasattr(x, "names"))}
  n = config.model.heads.num_classes
  if n:
    d = config.model.hidden_size
    tree["classification_head"] = {"logits": {
        "kernel": jax.ShapeDtypeStruct((d, n), "float32"),
        "bias": jax.ShapeDtypeStruct((n,), "float32")}}
  return tree


def hf_to_orbax(src: str, dst: str, num_frames: int = 0, frame_size: int = 0) -> dict:
  cfg = hf.read_config(src)
  arch = hf.hf_architecture(src)
  t, h, _ = hf.hf_grid(cfg)
  tub = arch["model.tubelet_size"]
  labels = cfg.get("id2label")
  has_classifier = any("Classification" in a for a in cfg.get("architectures") or [])
  config = base_config(arch, num_frames or t * tub[0], frame_size or h * tub[1],
                       len(labels) if has_classifier and labels else None)
  abstract = abstract_params(config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: device, abstract)
  total = len(hf.encoder_table(cfg["model_type"], arch)) + len(
      hf.head_table(cfg["model_type"], arch))
  with tqdm(total=total, desc="hf -> hvlm-jax", unit="tensor") as bar:
    params, report = pretrained.load_hf_params(src, abstract, shardings, config,
                                               progress=lambda _: bar.update())
  if report["newly_initialised"]:
    raise pretrained.PretrainedError(f"{src}: parameters {report['newly_initialised']} have no "
                                     "tensor in the checkpoint.")
  os.makedirs(dst, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(os.path.abspath(dst), "params"), params)
  checkpointer.wait_until_finished()
  with open(os.path.join(dst, "hvlm_config.json"), "w") as f:
    json.dump(dict(model_type=cfg["model_type"], config=config.to_dict()), f, indent=2,
              default=list)
  with open(os.path.join(dst, "init_report.json"), "w") as f:
    json.dump(report, f, indent=2)
  logging.info("Wrote %s: %s", dst, report["counts"])
  return report


def orbax_to_hf(src: str, dst: str, domain: int | None = None, model_type: str = "") -> dict:
  with open(os.path.join(src, "hvlm_config.json")) as f:
    meta = json.load(f)
  config = ml_collections.ConfigDict(meta["config"])
  params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(src), "params"))
  leaves = jax.tree.leaves(params)
  with tqdm(total=len(leaves), desc="hvlm-jax -> hf", unit="tensor") as bar:
    params = jax.tree.map(lambda x: bar.update() or jax.device_get(x), params)
    written = pretrained.export_hf(params, config, dst, domain=domain,
                                   model_type=model_type or meta["model_type"])
  logging.info("Wrote %s: %d tensors", dst, len(written["written"]))
  return written


def main(argv):
  if len(argv) != 2 or argv[1] not in ("hf_to_orbax", "orbax_to_hf"):
    raise app.UsageError("Usage: convert_checkpoint.py hf_to_orbax|orbax_to_hf --src --dst")
  if argv[1] == "hf_to_orbax":
    hf_to_orbax(FLAGS.src, FLAGS.dst, FLAGS.num_frames, FLAGS.frame_size)
  else:
    orbax_to_hf(FLAGS.src, FLAGS.dst, FLAGS.merge_domain, FLAGS.model_type)


if __name__ == "__main__":
  flags.mark_flags_as_required(["src", "dst"])
  app.run(main)
