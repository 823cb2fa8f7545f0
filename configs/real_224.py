"""Your own videos at 224 px: the config to start from for real data (not the demo's
synthetic settings).

    python -m hvlm_jax.train --config=configs/real_224.py:data_dir=/path/to/DATA \
        --workdir=runs/mine [--config.a.b=value ...]

DATA has the README's layout (`{training,validation,test}/{videos,annotations}`). Frames:
16 per clip, decoded with the shorter side at 256 px, then a 224 x 224 crop (random resized
crop, flips and colour jitter in training; the centre crop in evaluation). Model: a
ViT-S-sized encoder (384 wide, 12 layers, 6 heads) on 2 x 16 x 16 tubelets (8 x 14 x 14 =
1568 tokens per clip), bfloat16 compute. Videos longer than 16 s are evaluated and predicted
in 16 s segments through the memory bank. Arguments after `:`:

  data_dir     the DATA folder (required unless you pass --config.data.dir).
  attention    any registered attention type (full, strided, local_global, performer, ...).
  merging      true: adaptive token merging to half the tokens (from a ratio warm-up).
  frames       frames per clip (16); more frames see longer actions at a higher cost.
  batch_size   global batch (16); lower it (or set training.gradient_checkpointing=True)
               when it does not fit in accelerator memory.
  init_from    parameters to start from: another run (WORKDIR[:STEP]) or "hf:/dir" (a
               VideoMAE / ViViT checkpoint of the same width); recommended on small datasets.

Typical changes: `--config.data.domains` (your domain names), `--config.training.num_epochs`,
`--config.data.num_workers` (decoding processes; raise it until the data wait in
TensorBoard's perf/data_wait_fraction is near 0), `--config.data.input=cache` after
tools/build_dataset.py (ArrayRecord clips: decoding once instead of every epoch).
"""
from hvlm_jax.config import import_sibling, parse_arg

base = import_sibling(__file__, "base.py")

ARGS = dict(data_dir="", attention="full", merging=False, frames=16, batch_size=16,
            init_from="")


def get_config(arg=None):
  args = parse_arg(arg, **ARGS)
  config = base.get_config(f"attention={args.attention},merging={args.merging},"
                           f"frames={args.frames},frame_size=224")
  config.init_from = args.init_from

  data = config.data
  data.name = "folder"
  data.dir = args.data_dir or "data/videos"
  data.batch_size = data.eval_batch_size = args.batch_size
  data.num_workers = 4
  data.read_threads = 2
  data.video.decode_size = 256  # Decode at 256 px (shorter side), crop 224: room to augment.
  data.video.min_window = 0.8
  data.augment.enabled = True
  data.augment.min_crop_scale = 0.5

  model = config.model
  model.hidden_size, model.num_layers, model.num_attention_heads = 384, 12, 6
  model.mlp_dim = 1536
  model.tubelet_size = (2, 16, 16)
  model.dropout_rate = 0.1
  model.streaming.segment_seconds = 16.0

  tr = config.training
  tr.mixed_precision = True
  tr.num_steps, tr.num_epochs = 0, 30
  tr.learning_rate, tr.warmup_steps = 3e-4, 1000
  tr.log_every_steps, tr.eval_every_steps, tr.checkpoint_every_steps = 50, 1000, 1000
  if args.merging:
    tr.compression_warmup_steps = 2000
  return config
