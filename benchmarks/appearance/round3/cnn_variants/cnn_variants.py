"""Exploratory (session of 2026-12-01): which part of a plain CNN makes it learn one object's
shape fast? One frame of a still one-object clip, GroupNorm CNN variants, mean pool, linear;
AdamW 2e-3, cosine over STEPS, batch 16, held-out accuracy on 96 clips every 150 steps.

    SEED=0 STEPS=600 python benchmarks/appearance/round3/cnn_variants/cnn_variants.py ref,4stage
"""
import sys, os, time, numpy as np
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 4))
import jax, jax.numpy as jnp, optax, flax.linen as nn
from hvlm_jax.data import synthetic
size, frames = 64, 16
def sample(rng, n):
  clips, labels = [], []
  for _ in range(n):
    label = int(rng.integers(3)); r = size * rng.uniform(0.11, 0.14)
    x, y = rng.uniform(r + 1, size - r - 1, size=2)
    obj = dict(shape=synthetic.SHAPES[label], x=x, y=y, r=r, color=list(synthetic.COLORS)[rng.integers(len(synthetic.COLORS))])
    bg = synthetic.background(rng, synthetic.DOMAINS[rng.integers(len(synthetic.DOMAINS))], size)
    clips.append(synthetic.render_clip(dict(objects=[obj], events=[], frame_size=size), 2, 12, bg)); labels.append(label)
  return np.stack(clips), np.array(labels)

class CNN(nn.Module):
  widths: tuple = (32, 64, 128)
  depth: int = 2
  norm: str = "group"
  s2d: bool = False
  @nn.compact
  def __call__(self, v):
    y = v[:, 0].astype(jnp.float32) / 255.0 - 0.45
    for w in self.widths:
      for j in range(self.depth):
        y = nn.Conv(w, (3, 3), strides=(2, 2) if j == 0 else (1, 1))(y)
        if self.norm == "group": y = nn.GroupNorm(min(8, w // 4))(y)
        elif self.norm == "layer": y = nn.LayerNorm()(y)
        y = nn.gelu(y)
    if self.s2d:
      b, h, w, c = y.shape
      y = y.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)
      y = nn.Dense(128)(y)
    return nn.Dense(3)(y.mean((1, 2)))

def run(net, steps=300, seed=int(os.environ.get("SEED", 0))):
  rng = np.random.default_rng(seed)
  hx, hy = sample(rng, 96)
  p = net.init(jax.random.key(seed), hx[:2])
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 2e-3, 30, steps), weight_decay=0.05)
  s = opt.init(p)
  @jax.jit
  def step(p, s, x, y):
    g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(net.apply(p, x), y).mean())(p)
    u, s = opt.update(g, s, p); return optax.apply_updates(p, u), s
  acc = jax.jit(lambda p, x, y: (net.apply(p, x).argmax(-1) == y).mean())
  out = []
  for i in range(1, steps + 1):
    p, s = step(p, s, *sample(rng, 16))
    if i % 150 == 0: out.append(round(float(acc(p, hx, hy)), 2))
  return out
V = {
 "ref": CNN(),
 "4stage": CNN(widths=(32, 64, 128, 128)),
 "depth1": CNN(depth=1),
 "demo_stem_gn": CNN(widths=(8, 16, 32, 64), depth=1),
 "demo_stem_ln": CNN(widths=(8, 16, 32, 64), depth=1, norm="layer"),
 "ref_ln": CNN(norm="layer"),
  "ref_s2d": CNN(s2d=True),
  "16_s2d": CNN(widths=(16, 32, 64), s2d=True),
  "16": CNN(widths=(16, 32, 64)),
  "4stage_d1": CNN(widths=(32, 64, 128, 128), depth=1),
  "3stage_narrow": CNN(widths=(8, 16, 32), depth=1),
  "3stage_16": CNN(widths=(16, 32, 64), depth=1),
}
STEPS = int(os.environ.get("STEPS", 300))
for k in sys.argv[1].split(","):
  t = time.time(); print(k, run(V[k], STEPS), f"{time.time()-t:.0f}s", flush=True)
