"""Demo: a small model trained on the built-in synthetic dataset on 2 CPU cores.

    python -m hvlm_jax.train --config=configs/demo.py --workdir=runs/demo

The dataset is generated under data.dir on first use. `:attention=performer` (or any
registered type) swaps the attention; `:merging=true` turns on adaptive token merging;
`:before_token_shape=true` is the demo before its fold stem and token-shape targets (PREVIOUS).
"""
from hvlm_jax.config import apply_overrides, import_sibling, parse_arg

base = import_sibling(__file__, "base.py")

ARGS = dict(attention="full", merging=False, runlocal=False, before_token_shape=False)

# `:before_token_shape=true`: the demo's encoder and heads before its fifth appearance round
# (1200 steps; no fold stem, no token-shape targets). The README's study tables and the
# appearance bench's first rounds were measured with it (experiments/common.py keeps it).
PREVIOUS = {"model.stem_norm": "layer", "model.stem_width": 0, "model.stem_depth": 1,
            "model.stem_fold": 1, "model.heads.token_shape.enabled": False,
            "training.loss_weights.token_shape": 1.0, "training.num_steps": 1200}


def get_config(arg=None):
  args = parse_arg(arg, **ARGS)
  config = base.get_config(f"attention={args.attention},merging={args.merging},"
                           f"frames=16,frame_size=64,runlocal={args.runlocal}")
  data = config.data
  data.name = "synthetic"
  data.dir = "data/synthetic_demo"
  # 2000 training clips (generated in ~25 s): with the 400 of the default, the QA and
  # classification heads memorise the training clips within 600 steps.
  data.synthetic.num_videos = dict(training=2000, validation=50, test=100)
  data.batch_size = 16
  data.eval_batch_size = 16
  data.memory_cache_mb = 1536  # The decoded training set is ~1.2 GB: decode each video once.
  data.augment.min_crop_scale = 0.8  # Larger crops would cut shapes off and change counts.
  data.video.min_window = 1.0  # Train on whole clips: every action stays in view.

  model = config.model
  model.hidden_size = 128
  model.num_layers = 4
  model.num_attention_heads = 4
  model.mlp_dim = 256
  # 16 px patches: a 4 x 4 grid per tubelet, 128 tokens a clip, a quarter of the FLOPs of a
  # step with 8 px patches (512 tokens): 1200 such steps took less time than 600 did and
  # scored higher on every task (benchmarks/demo_before_token_shape/).
  model.tubelet_size = (2, 16, 16)
  # Two-stream input: RGB tubelets plus frame differences and per-token optical flow. Trained
  # from scratch on 400 clips, an RGB-only encoder does not find which way things move.
  model.motion_input = ("difference", "flow")
  # Patch and conv stems summed: the conv stem's local features help shapes and motion, the
  # linear patch path keeps colours quick to learn (see README, "How the demo came to learn").
  # The conv stem built like a small CNN: GroupNorm, two 3x3 convolutions per stage (8, 16, 32
  # channels), stopping at 8x8 px cells folded 2x2 into each token.
  model.stem = "hybrid"
  model.stem_norm = "group"
  model.stem_width = 8
  model.stem_depth = 2
  model.stem_fold = 2
  # Each token is also told which shape it shows (the generator's object layouts): without it
  # the QA head never learns to find "the red object" among two or three, and answers "what
  # shape" at chance (benchmarks/appearance/README.md, fourth and fifth rounds).
  model.heads.token_shape.enabled = True

  tr = config.training
  tr.num_steps = 1000  # The stem's convolutions cost a third more time per step than before.
  tr.num_epochs = 0
  tr.learning_rate = 2e-3
  tr.warmup_steps = 50
  tr.log_every_steps = 20
  tr.eval_every_steps = 400
  tr.checkpoint_every_steps = 400
  tr.loss_weights.action_detection = 1.0  # Detection and QA gain most from more weight.
  tr.loss_weights.video_qa = 1.0
  tr.loss_weights.token_shape = 2.0
  if args.before_token_shape:  # The demo up to the fifth appearance round (see PREVIOUS).
    apply_overrides(config, PREVIOUS)
  if args.runlocal:
    tr.num_steps, tr.warmup_steps, tr.eval_every_steps = 10, 2, 10
    data.synthetic.num_videos = dict(training=16, validation=8, test=8)
    data.dir = "data/synthetic_demo_runlocal"  # Its own dataset: settings differ.
  return config
