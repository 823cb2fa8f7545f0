"""The trainer's train step of a config, built and timed for the tools: one real batch from
the config's data pipeline (the synthetic dataset is generated on first use), the step
compiled with its shardings, and the dense float32 matmul rate to compare it with.

Used by `tools/benchmark_train.py` and `tools/profile_step.py` (tools/ is on their sys.path).
"""
from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from hvlm_jax import data as data_lib
from hvlm_jax import run as run_lib
from hvlm_jax import sharding
from hvlm_jax.train import op_profile, trainer

VARIANTS = {
    "f32": dict(mixed_precision=False, gradient_checkpointing=False),
    "f32_remat": dict(mixed_precision=False, gradient_checkpointing=True),
    "bf16": dict(mixed_precision=True, gradient_checkpointing=False),
    "bf16_remat": dict(mixed_precision=True, gradient_checkpointing=True),
}
# The same with the encoder's blocks unrolled (config.model.scan_layers="false").
VARIANTS.update({f"{k}_unrolled": dict(v, **{"model.scan_layers": "false"})
                 for k, v in list(VARIANTS.items())})


def real_batch(config):
  """(config with data-dependent head sizes, one training batch as numpy) from the pipeline."""
  data_lib.ensure_dataset(config)
  split = data_lib.load_split(config, "training")
  vocabs = data_lib.Vocabularies.build(split, config)
  config = run_lib.fill_from_vocabularies(config, vocabs)
  batch = next(data_lib.make_train_iterator(config, split, vocabs, seed=config.seed,
                                            process_index=0, process_count=1))
  return config, batch


def with_training(config, **training):
  """A copy of `config` with these training keys (a dotted key, e.g. "model.scan_layers",
  names its own section)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for k, v in training.items():
    section, _, key = k.rpartition(".")
    node = config
    for part in (section.split(".") if section else ["training"]):
      node = node[part]
    node[key] = v
  return config


def encoder_tokens(config) -> int:
  t, p, _ = config.model.tubelet_size
  s = config.data.video.frame_size
  return (config.data.video.num_frames // t) * (s // p) ** 2


def compiled_stats(compiled, nxn_shape=None) -> dict:
  """FLOPs and the memory XLA plans for a compiled program (bytes -> MiB).

  gflop: the dots and convolutions the program runs, each loop counted per iteration
  (op_profile.program_flops; `unknown_loops` were counted once); xla_gflop: XLA's cost
  analysis, which also counts elementwise work but every loop body once.
  nxn_shape: (B, H, N, N) of full attention's logits; the HLO values of that shape are
  counted per dtype (where the memory of full attention goes).
  """
  text = compiled.as_text()
  nxn = {}
  if nxn_shape:
    dims = ",".join(str(d) for d in nxn_shape)
    for dtype in re.findall(r"\b(f32|bf16|f16|pred)\[" + dims + r"\]", text):
      nxn[dtype] = nxn.get(dtype, 0) + 1
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  mem = compiled.memory_analysis()
  mib = lambda b: b / 2 ** 20
  args, temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
  out, alias = mem.output_size_in_bytes, mem.alias_size_in_bytes
  flops, unknown_loops = op_profile.program_flops(text)
  return dict(xla_gflop=cost.get("flops", float("nan")) / 1e9, gflop=flops / 1e9,
              unknown_loops=unknown_loops, has_loops="while(" in text, nxn_values=nxn,
              argument_mib=mib(args), temp_mib=mib(temp), output_mib=mib(out),
              alias_mib=mib(alias), peak_mib=mib(args + temp + out - alias))


class StepRunner:
  """One variant: its sharded state, the compiled step and the batch already on device."""

  def __init__(self, name, config, batch, mesh):
    self.name, self.config = name, config
    total = max(int(config.training.num_steps), 1)
    rng = jax.random.key(config.seed)
    t = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.flax_logical_rules()):
      self.batch = sharding.global_batch(batch, mesh)
      run = trainer.build_training(config, mesh, batch, total, rng)
      self.state, self.rng = run.state, jax.random.fold_in(rng, 1)
      _, self.merge_weights = trainer.merging_controls(config, total)
      lowered = run.train_step.lower(self.state, self.batch, self.rng, self.merge_weights)
      self.step = lowered.compile()
    self.compile_s = time.perf_counter() - t
    m = config.model
    self.stats = compiled_stats(self.step, (config.data.batch_size, m.num_attention_heads,
                                            encoder_tokens(config), encoder_tokens(config)))
    self.params = int(sum(x.size for x in jax.tree.leaves(self.state.params)))
    self.times: list[float] = []
    self.run(1)  # Warm-up: first-run allocations.
    self.times.clear()

  def run(self, steps: int):
    for _ in range(steps):
      t = time.perf_counter()
      self.state, metrics = self.step(self.state, self.batch, self.rng, self.merge_weights)
      jax.block_until_ready(metrics["loss"])
      self.times.append(time.perf_counter() - t)
    self.loss = float(metrics["loss"])


def matmul_probe(m: int):
  """A jitted float32 (m x m) @ (m x m) and its FLOP count (2 m^3)."""
  a = jax.random.normal(jax.random.key(0), (m, m), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (m, m), jnp.float32)
  f = jax.jit(jnp.matmul).lower(a, b).compile()
  jax.block_until_ready(f(a, b))

  def timed():
    t = time.perf_counter()
    jax.block_until_ready(f(a, b))
    return time.perf_counter() - t
  return timed, 2.0 * m ** 3
