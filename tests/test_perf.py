"""perf.py: FLOP counts against closed forms and against XLA's count of a real encoder step,
the peak table and its override, the matmul rate, and the profiler's trace directory."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hvlm_jax.models.model import build_encoder
from hvlm_jax.train import op_profile, perf
from tests.tiny_train_config import get_config


def test_step_flops_of_a_matmul_is_2mnk():
  m, k, n = 64, 48, 40
  compiled = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
  assert perf.step_flops(compiled) == 2 * m * n * k
  assert not perf.has_loops(compiled)


def test_xla_counts_a_loop_body_once():
  def looped(a, b):
    return jax.lax.fori_loop(0, 8, lambda i, x: x @ b, a)
  a = jnp.ones((32, 32))
  compiled = jax.jit(looped).lower(a, a).compile()
  assert perf.has_loops(compiled)
  assert perf.step_flops(compiled) < 8 * 2 * 32 ** 3  # The undercount being worked around.


def encoder_config(attention_type="full"):
  config = get_config()
  model = config.model
  model.hidden_size, model.num_attention_heads, model.mlp_dim, model.num_layers = 64, 2, 256, 2
  model.attention.type = attention_type
  return config


def test_analytic_train_flops_agree_with_xla_for_a_loop_free_full_attention_encoder():
  config = encoder_config()
  config.model.scan_layers = "false"
  encoder = build_encoder(config.model)
  video = config.data.video
  clips = jnp.zeros((2, video.num_frames, video.frame_size, video.frame_size, 3), jnp.float32)
  params = encoder.init(jax.random.key(0), clips)

  def loss(params, clips):
    return jnp.sum(encoder.apply(params, clips)["tokens"] ** 2)

  compiled = jax.jit(jax.grad(loss)).lower(params, clips).compile()
  assert not perf.has_loops(compiled)
  xla = perf.step_flops(compiled)
  analytic = perf.analytic_train_flops(config, batch_size=2)
  # Matmuls dominate; XLA also counts layer norms, softmax and GELU but no input gradient
  # of the tubelet embedding (0.7% apart at these sizes).
  assert abs(analytic / xla - 1) < 0.05, (analytic, xla)
  flops, source = perf.train_step_flops(compiled, config, 2)
  assert (flops, source) == (xla, "xla")


def test_scanned_blocks_are_counted_once_per_layer():
  """XLA counts the scanned blocks' loop body once; program_flops counts it per layer, which
  gives the unrolled program's dots and convolutions exactly."""
  config = encoder_config()
  config.model.num_layers = 3
  video = config.data.video
  clips = jnp.zeros((2, video.num_frames, video.frame_size, video.frame_size, 3), jnp.float32)
  compiled = {}
  for scan in ("true", "false"):
    config.model.scan_layers = scan
    encoder = build_encoder(config.model)
    params = encoder.init(jax.random.key(0), clips)
    loss = lambda p, x, e=encoder: jnp.sum(e.apply(p, x)["tokens"] ** 2)  # noqa: E731
    compiled[scan] = jax.jit(jax.grad(loss)).lower(params, clips).compile()
  scanned, unrolled = (op_profile.program_flops(compiled[k].as_text()) for k in ("true", "false"))
  assert scanned == unrolled and scanned[1] == 0
  xla_unrolled = perf.step_flops(compiled["false"])
  assert perf.step_flops(compiled["true"]) < 0.7 * xla_unrolled  # The undercount it fixes.
  flops, source = perf.train_step_flops(compiled["true"], config, 2)
  assert source == "hlo" and flops == scanned[0]
  # XLA's count adds the elementwise work (layer norms, softmax, GELU): 5.5% at this width.
  assert 0.9 * xla_unrolled < flops < xla_unrolled, (flops, xla_unrolled)


def test_attention_flops_closed_forms():
  n, d, h = 392, 64, 4
  full = perf.attention_flops("full", n, d, h, {})
  assert full == 8 * n * d * d + 4 * n * n * d
  # A window covering all (padded) blocks with no globals costs more than full attention's
  # score work only through the 3x neighbour blocks.
  lg = perf.attention_flops("local_global", n, d, h, dict(window=196, num_global=0,
                                                          tokens_per_frame=196))
  assert lg == 8 * n * d * d + 4 * n * d * 3 * 196
  assert np.isnan(perf.attention_flops("unknown", n, d, h, {}))


def test_peak_table_and_override():
  cpu = jax.devices()[0]
  assert perf.peak_flops(cpu) is None
  config = ml_collections.ConfigDict(dict(training=dict(peak_flops=1.5e12)))
  assert perf.peak_flops(cpu, config=config) == 1.5e12

  class FakeDevice:
    device_kind = "NVIDIA H100 80GB HBM3"
  assert perf.peak_flops(FakeDevice(), jnp.bfloat16) == 989e12
  FakeDevice.device_kind = "TPU v5 lite"
  assert perf.peak_flops(FakeDevice(), jnp.bfloat16) == 197e12


def test_measure_matmul_rate_is_positive_and_finite():
  rate = perf.measure_matmul_rate(size=256, repeats=2)
  assert np.isfinite(rate) and rate > 0.1


@pytest.mark.parametrize("steps,expected", [("2,3", (2, 3)), ((1, 1), (1, 1)), ("", None)])
def test_parse_steps(steps, expected):
  assert perf.parse_steps(steps) == expected


def test_profiler_writes_a_trace_for_its_steps_only(tmp_path):
  config = ml_collections.ConfigDict(dict(training=dict(profile_steps="1,2")))
  profiler = perf.Profiler.from_config(config, str(tmp_path))
  f = jax.jit(lambda x: x * 2.0 + 1.0)
  x = jnp.ones((8,))
  for step in range(4):
    profiler.step(step)
    assert profiler.active == (1 <= step <= 2)
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      jax.block_until_ready(f(x))
  profiler.close()
  files = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "profile") for f in fs]
  assert any(f.endswith(".xplane.pb") for f in files), files
