"""Trainer tests' config: a 1-layer width-32 model with every head, on a small dataset folder.

    --config=tests/tiny_train_config.py:data_dir=/path/to/synthetic
"""
from hvlm_jax.config import import_sibling, parse_arg

base = import_sibling(__file__, "../configs/base.py")

ARGS = dict(data_dir="", batch_size=4)


def get_config(arg=None):
  args = parse_arg(arg, **ARGS)
  config = base.get_config("frames=8,frame_size=32")
  data = config.data
  data.name, data.dir = "folder", args.data_dir
  data.batch_size = data.eval_batch_size = args.batch_size
  data.caption_length, data.question_length = 12, 8
  data.augment.enabled = False
  model = config.model
  model.hidden_size, model.num_layers, model.num_attention_heads, model.mlp_dim = 32, 1, 2, 64
  model.tubelet_size = (2, 8, 8)
  heads = model.heads
  heads.text.num_heads = 2
  heads.detection.num_layers = heads.qa.num_layers = heads.captioning.num_layers = 1
  tr = config.training
  tr.num_steps, tr.num_epochs, tr.warmup_steps, tr.learning_rate = 4, 0, 1, 3e-3
  tr.log_every_steps, tr.eval_every_steps, tr.checkpoint_every_steps = 1, 0, 2
  return config
