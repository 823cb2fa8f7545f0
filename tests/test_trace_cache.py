"""hvlm_jax.trace_cache: a hit runs the stored program without tracing, with results equal to
the plain jit; the key separates shapes, descriptions and code; a damaged file is a miss that is
rewritten; a program jax.export refuses is traced as usual. (The trainer's later starts
tracing no model code, with the same parameters: tests/test_train.py, resumed run; its first
train step loaded ahead in a background thread: below.)"""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvlm_jax import trace_cache


def _make_step(traces):
  """A new function object each call, as in a new process (jax caches traces per function)."""
  def step(state, batch, rng, extra):
    traces.append(1)
    noise = jax.random.normal(jax.random.fold_in(rng, state["step"]), batch["x"].shape)
    w = state["w"] - 0.1 * jnp.mean(batch["x"] * noise) * state["w"]
    return dict(step=state["step"] + 1, w=w), {"loss": jnp.sum(w ** 2)}
  return step


def _step_and_args():
  traces = []
  state = dict(step=jnp.zeros((), jnp.int32), w=jnp.arange(6.0).reshape(2, 3))
  batch = {"x": jnp.linspace(0.0, 1.0, 8).reshape(2, 4)}
  return _make_step(traces), traces, (state, batch, jax.random.key(3), None)


def _fresh(args):
  return jax.tree.map(lambda x: x.copy(), args)


def test_hit_skips_tracing_and_equals_the_plain_jit(tmp_path):
  step, traces, args = _step_and_args()
  expected = jax.jit(step)(*_fresh(args))
  del traces[:]
  results = []
  for _ in range(2):
    jitted = jax.jit(_make_step(traces), donate_argnums=0)
    lowered = trace_cache.lower("step", jitted, _fresh(args), describe="d",
                                directory=str(tmp_path), donate_argnums=(0,))
    results.append(lowered.compile()(*_fresh(args)))
  assert len(traces) == 1  # Traced to export on the miss, never on the hit.
  assert len(glob.glob(str(tmp_path / "step-*.jaxexport"))) == 1
  for got in results:
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_donated_state_is_consumed_on_a_hit(tmp_path):
  step, _, args = _step_and_args()
  for _ in range(2):
    call_args = _fresh(args)
    lowered = trace_cache.lower("step", jax.jit(step, donate_argnums=0), call_args,
                                describe="d", directory=str(tmp_path), donate_argnums=(0,))
    lowered.compile()(*call_args)
  assert call_args[0]["w"].is_deleted()


def test_key_separates_shapes_dtypes_descriptions_and_names(tmp_path):
  step, _, (state, batch, rng, extra) = _step_and_args()
  paths = {trace_cache.entry_path("step", (state, batch, rng, extra), describe="d",
                                  directory=str(tmp_path))}
  variants = [
      ("step", (state, {"x": jnp.zeros((2, 5))}, rng, extra), "d"),
      ("step", (state, {"x": jnp.zeros((2, 4), jnp.bfloat16)}, rng, extra), "d"),
      ("step", (state, batch, rng, jnp.ones(2)), "d"),
      ("step", (state, batch, rng, extra), "another config"),
      ("init", (state, batch, rng, extra), "d"),
  ]
  for name, args, describe in variants:
    paths.add(trace_cache.entry_path(name, args, describe=describe, directory=str(tmp_path)))
  assert len(paths) == 1 + len(variants)
  # The same arguments give the same key (a rerun finds its entry).
  assert trace_cache.entry_path("step", (state, batch, rng, extra), describe="d",
                                directory=str(tmp_path)) in paths


def test_key_follows_the_package_source(tmp_path, monkeypatch):
  step, _, args = _step_and_args()
  before = trace_cache.entry_path("step", args, describe="d", directory=str(tmp_path))
  trace_cache.source_fingerprint.cache_clear()
  monkeypatch.setattr(trace_cache, "_FORMAT", trace_cache._FORMAT + 1)
  try:
    assert trace_cache.entry_path("step", args, describe="d", directory=str(tmp_path)) != before
  finally:
    trace_cache.source_fingerprint.cache_clear()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_entry_is_a_miss_and_is_rewritten(tmp_path, damage):
  step, traces, args = _step_and_args()
  expected = jax.jit(step)(*_fresh(args))
  trace_cache.lower("step", jax.jit(step), args, describe="d", directory=str(tmp_path))
  (path,) = glob.glob(str(tmp_path / "step-*.jaxexport"))
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write({"truncated": data[:len(data) // 2], "garbage": os.urandom(len(data)),
             "empty": b""}[damage])
  del traces[:]
  got = trace_cache.lower("step", jax.jit(_make_step(traces)), args, describe="d",
                          directory=str(tmp_path)).compile()(*_fresh(args))
  assert len(traces) == 1  # Traced again ...
  assert trace_cache.read(path) is not None  # ... and the entry is whole again.
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_program_export_refuses_is_traced_as_usual(tmp_path):
  def f(x):  # A host callback: jax.export refuses to serialize it.
    y = jax.pure_callback(lambda v: np.asarray(v) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
    return y + 1

  x = jnp.arange(3.0)
  for _ in range(2):
    out = trace_cache.lower("callback", jax.jit(f), (x,), describe="d",
                            directory=str(tmp_path)).compile()(x)
    np.testing.assert_array_equal(np.asarray(out), [1.0, 3.0, 5.0])
  assert not glob.glob(str(tmp_path / "callback-*"))


def test_no_directory_is_the_plain_jit():
  step, traces, args = _step_and_args()
  lowered = trace_cache.lower("step", jax.jit(step), args, describe="d", directory=None)
  assert "call_exported" not in lowered.as_text() and len(traces) == 1



def test_equivalent_shardings_share_a_key_and_different_ones_do_not(tmp_path):
  # A checkpoint restores P('data', None) as P('data',): the same placement, the same entry.
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  x = jnp.zeros((jax.device_count(), 3))

  def path(spec):
    return trace_cache.entry_path("f", (jax.device_put(x, NamedSharding(mesh, spec)),),
                                  describe="d", directory=str(tmp_path))

  assert path(P("data", None)) == path(P("data"))
  assert path(P(None, None)) == path(P())
  assert path(P("data")) != path(P())
  # An abstract argument is compiled for its sharding: the key of an array committed to it.
  abstract = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P("data")))
  assert trace_cache.entry_path("f", (abstract,), describe="d",
                                directory=str(tmp_path)) == path(P("data"))
  assert trace_cache.entry_path("f", (jax.ShapeDtypeStruct(x.shape, x.dtype),), describe="d",
                                directory=str(tmp_path)) == trace_cache.entry_path(
                                    "f", (x,), describe="d", directory=str(tmp_path))


def test_train_step_loaded_ahead_is_taken_only_for_its_key(tmp_path):
  # The trainer loads the first train step in a background thread from predicted (abstract)
  # arguments; the loop takes it only for arguments with the same key.
  from jax.sharding import NamedSharding, PartitionSpec as P

  from hvlm_jax.train import ahead as ahead_lib
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  step, traces, (state, _, rng, _) = _step_and_args()
  batch = {"x": jax.device_put(jnp.linspace(0.0, 1.0, 4 * jax.device_count()).reshape(-1, 4),
                               NamedSharding(mesh, P("data")))}
  predicted = {"x": jax.ShapeDtypeStruct(batch["x"].shape, batch["x"].dtype,
                                         sharding=batch["x"].sharding)}
  args = (state, batch, rng, None)
  expected = jax.jit(step)(*_fresh(args))
  directory = str(tmp_path)

  ahead = ahead_lib.StepAhead((state, predicted, rng, None), "d", directory, mesh)
  assert ahead.future is None and not ahead.matches(args, "d")  # No entry: nothing started.
  trace_cache.lower("train_step", jax.jit(step, donate_argnums=0), _fresh(args), describe="d",
                    directory=directory)  # A cold start stores the entry.
  del traces[:]
  ahead = ahead_lib.StepAhead((state, predicted, rng, None), "d", directory, mesh)
  assert ahead.matches(args, "d")
  assert not ahead.matches(args, "other config")
  assert not ahead.matches((state, {"x": batch["x"][:, :2]}, rng, None), "d")
  got = ahead.result()(*_fresh(args))
  assert traces == []  # Read from the trace cache, never traced.
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  with open(ahead.path, "wb") as f:  # Damaged after the check: no executable, no crash.
    f.write(b"garbage")
  assert ahead_lib.StepAhead((state, predicted, rng, None), "d", directory, mesh).result() is None


def test_a_failed_write_leaves_no_file_and_the_run_goes_on(tmp_path, monkeypatch):
  step, _, args = _step_and_args()
  expected = jax.jit(step)(*_fresh(args))

  def full_disk(src, dst):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "replace", full_disk)
  got = trace_cache.lower("step", jax.jit(step), _fresh(args), describe="d",
                          directory=str(tmp_path)).compile()(*_fresh(args))
  assert os.listdir(tmp_path) == []  # Neither the entry nor a temporary file.
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
