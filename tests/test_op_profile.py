"""The per-scope step profile: FLOPs read from the HLO against closed forms, model scopes from
op_name metadata, exclusive event times, and a real trace summarised end to end."""
import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvlm_jax.train import op_profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entry_flops(compiled) -> dict[str, float]:
  hlo = compiled.as_text()
  ops = op_profile.hlo_ops(hlo)
  return {n: ops[n].flops for n in op_profile.entry_instructions(hlo) if ops[n].flops}


def test_strided_convolution_and_its_gradients_count_the_forward_flops():
  x, w = jnp.ones((4, 16, 16, 6)), jnp.ones((3, 3, 6, 8))
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = conv(x, w)
  compiled = jax.jit(lambda x, w, g: (conv(x, w), jax.vjp(conv, x, w)[1](g))).lower(
      x, w, y).compile()
  flops = _entry_flops(compiled)
  forward = 2 * 4 * 8 * 8 * 8 * (3 * 3 * 6)  # 2 x outputs x (window x input features).
  # Forward, input gradient (a convolution of the dilated output gradient) and kernel
  # gradient: each the forward's multiply-adds.
  assert sorted(flops.values()) == [forward] * 3, flops


def test_dot_flops_inside_fusions_and_batched_einsums():
  q, k = jnp.ones((2, 64, 4, 16)), jnp.ones((2, 32, 4, 16))
  w = jnp.ones((16, 24))
  f = lambda q, k, w: (jnp.tanh(jnp.einsum("bqhd,bkhd->bhqk", q, k)), jnp.tanh(q @ w) + 1)
  flops = _entry_flops(jax.jit(f).lower(q, k, w).compile())
  expected = 2 * 2 * 4 * 64 * 32 * 16 + 2 * (2 * 64 * 4) * 16 * 24
  assert sum(flops.values()) == expected, flops


def test_scope_names_the_module_path_and_direction():
  name = ("jit(train_step)/transpose(jvp(StreamingVLM))/StreamingVLM/StreamingVLM.encode/"
          "encoder/block_11/mlp/mlp_in/dot_general")
  assert op_profile.scope_of(name) == ("StreamingVLM.encode/encoder/block_*/mlp", True)
  assert op_profile.scope_of(name, depth=2) == ("StreamingVLM.encode/encoder", True)
  assert op_profile.scope_of(name, merge_layers=False) == (
      "StreamingVLM.encode/encoder/block_11/mlp", True)
  forward = "jit(train_step)/jvp(StreamingVLM)/StreamingVLM/StreamingVLM.encode/encoder/" \
            "encoder.embed/conv_stem/norm_0/reduce_sum"
  assert op_profile.scope_of(forward) == (
      "StreamingVLM.encode/encoder.embed/conv_stem/norm_*", False)
  # A program read back from the trace cache (jax.export), with a fused location.
  exported = ("jit(call)/call_exported/jit(flat)/jit(train_step)/jvp(StreamingVLM)/"
              "StreamingVLM/qa_head/(ln_video/reduce_sum:layer_0/layer_0._self_qkv/ln_self/"
              "reduce_sum)")
  assert op_profile.scope_of(exported) == ("StreamingVLM/qa_head/ln_video", False)
  # The encoder's scanned blocks (config.model.scan_layers), rematerialised: the loop and
  # checkpoint plumbing is dropped, so the scope reads as an unrolled block's.
  scanned = ("jit(train_step)/transpose(jvp(StreamingVLM))/StreamingVLM/StreamingVLM.encode/"
             "encoder/while/body/checkpoint/closed_call/block_*/mlp/mlp_in/dot_general")
  assert op_profile.scope_of(scanned) == ("StreamingVLM.encode/encoder/block_*/mlp", True)


def test_event_times_subtract_nested_events_per_thread():
  ev = lambda name, ts, dur, tid: dict(ph="X", name=name, ts=ts, dur=dur, pid=1, tid=tid)
  events = [ev("while.1", 0, 100, 1), ev("body.1", 10, 30, 1), ev("body.1", 50, 20, 1),
            ev("fusion.2", 120, 10, 1), ev("fusion.3", 5, 40, 2),
            ev("end: fusion.3", 45, 1, 2), ev("other", 0, 500, 2)]
  seconds, counts, span = op_profile.op_times(events, {"while.1", "body.1", "fusion.2",
                                                       "fusion.3"})
  np.testing.assert_allclose([seconds["while.1"], seconds["body.1"], seconds["fusion.2"],
                              seconds["fusion.3"]], [50e-6, 50e-6, 10e-6, 40e-6])
  assert counts == {"while.1": 1, "body.1": 2, "fusion.2": 1, "fusion.3": 1}
  np.testing.assert_allclose(span, 130e-6 + 40e-6)  # Thread 1: 0-130; thread 2: 5-45.


def test_a_traced_program_is_summarised_by_scope(tmp_path):
  x, w0, w1 = jnp.ones((64, 32)), jnp.ones((32, 48)), jnp.ones((48, 16))

  def f(x, w0, w1):
    with jax.named_scope("layer_0"):
      h = jnp.tanh(x @ w0)
    with jax.named_scope("layer_1"):
      return jnp.sum(jnp.tanh(h @ w1))

  step = jax.jit(jax.value_and_grad(f, argnums=(1, 2))).lower(x, w0, w1).compile()
  jax.block_until_ready(step(x, w0, w1))
  jax.profiler.start_trace(str(tmp_path))
  for _ in range(3):
    jax.block_until_ready(step(x, w0, w1))
  jax.profiler.stop_trace()
  summary = op_profile.summarize(step.as_text(), op_profile.latest_trace(str(tmp_path)))
  assert summary["runs"] == 3  # Found from the instructions' event counts.
  forward = 2 * 64 * 32 * 48 + 2 * 64 * 48 * 16
  # Backward: both weight gradients, and the input gradient of layer 1 only.
  backward = 2 * 64 * 32 * 48 + 2 * 2 * 64 * 48 * 16
  np.testing.assert_allclose(summary["flops"], forward + backward)
  # The distinct dots, as lax.dot_general takes them, reproduce the FLOPs.
  np.testing.assert_allclose(sum(d["flops"] for d in summary["dots"]), forward + backward)
  assert {((64, 32), (32, 48)), ((64, 48), (48, 16))} <= {
      (tuple(d["lhs"]), tuple(d["rhs"])) for d in summary["dots"] if d["calls"] == 1}
  scopes = {(r["scope"], r["direction"]) for r in summary["scopes"]}
  assert ("layer_*", "forward") in scopes and ("layer_*", "backward") in scopes, scopes
  assert 0 < summary["flop_op_s"] <= summary["op_s"]
  text = op_profile.markdown(summary)
  assert "| layer_* | forward |" in text


def test_a_trace_without_the_program_or_a_truncated_one_is_one_sentence(tmp_path):
  trace = tmp_path / "x.trace.json.gz"
  with gzip.open(trace, "wt") as fh:
    json.dump({"traceEvents": [dict(ph="X", name="fusion.1", ts=0, dur=1, pid=1, tid=1)]}, fh)
  hlo = jax.jit(lambda a: a @ a).lower(jnp.ones((4, 4))).compile().as_text()
  with pytest.raises(ValueError, match="no event of this program"):
    op_profile.summarize(hlo, str(trace))
  with pytest.raises(FileNotFoundError, match="no profiler trace"):
    op_profile.latest_trace(str(tmp_path))
  truncated = tmp_path / "cut.trace.json.gz"
  truncated.write_bytes(trace.read_bytes()[:20])
  with pytest.raises(ValueError, match="cut.trace.json.gz: not a readable profiler trace"):
    op_profile.summarize(hlo, str(truncated))


def test_tool_names_a_workdir_without_a_profile(tmp_path):
  result = subprocess.run(
      [sys.executable, "tools/profile_step.py", f"--workdir={tmp_path}"], cwd=ROOT,
      capture_output=True, text=True)
  assert result.returncode != 0
  assert "no saved program (*.hlo.txt)" in result.stderr
  assert "Traceback" not in result.stderr
