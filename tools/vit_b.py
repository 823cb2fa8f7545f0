"""The ViT-B-sized encoder configuration whose train step tools/device_check.py and
tools/benchmark_softmax_attention.py measure (their callers put the repository root on
sys.path first)."""
from configs import base


def vit_config(smoke: bool):
  config = base.get_config("frames=4,frame_size=32" if smoke else "frames=8,frame_size=224")
  m = config.model
  if smoke:
    m.hidden_size, m.num_layers, m.num_attention_heads, m.mlp_dim = 64, 2, 2, 128
    m.tubelet_size = (2, 8, 8)
  m.attention.type = "full"
  m.attention.full.implementation = "auto"
  return config
