"""Traced-program cache: a warm start skips tracing the model in Python.

JAX's persistent compilation cache (`run.enable_compilation_cache`) skips XLA's compilation,
but it is keyed on the lowered program, so every start first traces the model to build that
program: 5-6 s of the demo's warm start, more than loading the compiled executable. This cache
stores the lowered program itself (`jax.export`: serialized StableHLO with its shardings) in
`<compilation cache>/traces/`, under a key of everything the trace depends on:

- the source of the `hvlm_jax` package (every .py file) and the versions of jax, jaxlib,
  flax, optax and numpy;
- a description given by the caller (the run's config, the function's role);
- the arguments' tree structure, shapes, dtypes, weak types and shardings (mesh axes and
  device ids), the platform, device kinds and process count;
- JAX's configuration values.

A hit deserializes the program and lowers a thin wrapper around it (milliseconds), then
compiles it (a compilation-cache hit). A miss traces and exports, stores the file and uses the
same exported program, so results never depend on whether this cache was hit. A program that
`jax.export` refuses (e.g. custom calls outside its stable list, such as cuDNN attention)
is traced every start, as without this cache, and says so once in the log. An unreadable file
is a miss and is rewritten. Files are written whole (a temporary file renamed), so processes
sharing the directory never read half a file.

The key covers the package's own code, not edits to installed libraries that keep their
version number; `config.trace_cache=False` (or the compilation cache off) disables it.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import pickle
import tempfile
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

_FORMAT = 1
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy")


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
  """sha256 of the package's .py files (paths and contents) and the tracing libraries'
  versions."""
  h = hashlib.sha256(f"format {_FORMAT}".encode())
  for name in _VERSIONED:
    try:
      version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      version = "absent"
    h.update(f"{name}=={version};".encode())
  for root, dirs, files in os.walk(_PACKAGE):
    dirs.sort()
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(root, name)
        h.update(os.path.relpath(path, _PACKAGE).encode())
        with open(path, "rb") as f:
          h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()


def _sharding_description(sharding) -> str:
  """Equal for equivalent shardings: P('x', None) and P('x',) (a restored checkpoint's form)
  describe the same placement."""
  mesh = getattr(sharding, "mesh", None)
  if isinstance(sharding, jax.sharding.NamedSharding) and hasattr(mesh, "devices"):
    spec = list(sharding.spec)
    while spec and spec[-1] is None:
      spec.pop()
    devices = np.vectorize(lambda d: d.id, otypes=[int])(mesh.devices).tolist()
    return (f"named {dict(mesh.shape)} {tuple(spec)} {sharding.memory_kind} "
            f"devices={devices}")
  return f"{sharding!r} devices={sorted(d.id for d in sharding.device_set)}"


def _placement(leaf):
  """The leaf's sharding if it is committed to it, else None (jit may place it anywhere). A
  ShapeDtypeStruct's sharding is what the program is compiled for: the same as an array
  committed to it."""
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf.sharding
  return getattr(leaf, "sharding", None) if getattr(leaf, "committed", False) else None


def _leaf_description(leaf) -> str:
  sharding = _placement(leaf)
  return repr((tuple(leaf.shape), str(leaf.dtype), bool(getattr(leaf, "weak_type", False)),
               _sharding_description(sharding) if sharding is not None else None))


def cache_key(name: str, describe: str, in_tree, leaves: Sequence[Any]) -> str:
  """The key of `name` traced on arguments (`in_tree`, `leaves`), see the module docstring."""
  h = hashlib.sha256()
  devices = jax.devices()
  parts = [source_fingerprint(), name, describe, str(in_tree), devices[0].platform,
           json.dumps(sorted({d.device_kind for d in devices})), str(jax.process_count()),
           str(len(devices)),
           json.dumps(sorted((k, repr(v)) for k, v in jax.config.values.items()))]
  parts += [_leaf_description(leaf) for leaf in leaves]
  for part in parts:
    h.update(part.encode())
    h.update(b"\0")
  return h.hexdigest()[:40]


def entry_path(name: str, args: tuple, *, describe: str, directory: str) -> str:
  """The file that holds `name` traced on `args` (a tuple of pytrees of arrays)."""
  leaves, in_tree = jax.tree.flatten(args)
  return os.path.join(directory,
                      f"{name}-{cache_key(name, describe, in_tree, leaves)}.jaxexport")


def read(path: str):
  """(exported, out_tree, extra) stored at `path`, or None when absent or unreadable."""
  try:
    with open(path, "rb") as f:
      entry = pickle.load(f)
    if entry.get("format") != _FORMAT:
      return None
    exported = jax.export.deserialize(bytearray(entry["exported"]))
    return exported, entry["out_tree"], entry.get("extra")
  except FileNotFoundError:
    return None
  except Exception as e:  # noqa: BLE001 -- a damaged entry is a miss; it is rewritten.
    logging.warning("Trace cache: ignoring unreadable %s (%s: %s).", path, type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
    return None


def write(path: str, exported, out_tree, extra=None) -> None:
  """Stores an entry whole (a temporary file renamed); a failure to write is only logged."""
  directory = os.path.dirname(path)
  try:
    os.makedirs(directory, exist_ok=True)
    blob = pickle.dumps({"format": _FORMAT, "exported": bytes(exported.serialize()),
                         "out_tree": out_tree, "extra": extra})
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  except OSError as e:  # A read-only cache directory: the run goes on.
    logging.warning("Trace cache: could not write %s (%s).", path, e)
    return
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(blob)
    os.replace(tmp, path)
  except OSError as e:  # A full disk: no half file is left behind.
    os.unlink(tmp)
    logging.warning("Trace cache: could not write %s (%s).", path, e)


def export(jitted, args: tuple):
  """(exported, out_tree): `jitted` traced on `args` and exported with their shardings.

  Raises what `jax.export` raises for a program it refuses."""
  leaves, in_tree = jax.tree.flatten(args)
  holder = {}

  def flat(*flat_args):
    outputs = jitted(*jax.tree.unflatten(in_tree, flat_args))
    out_leaves, holder["out_tree"] = jax.tree.flatten(outputs)
    return out_leaves

  shardings = [_placement(leaf) for leaf in leaves]
  specs = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s,
                                weak_type=bool(getattr(leaf, "weak_type", False)))
           for leaf, s in zip(leaves, shardings)]
  exported = jax.export.export(jax.jit(flat, in_shardings=shardings))(*specs)
  return exported, holder["out_tree"]


def wrap(exported, out_tree, donate_argnums: tuple[int, ...] = ()):
  """A jitted function running `exported` on the original argument trees."""
  def call(*args):
    return jax.tree.unflatten(out_tree, exported.call(*jax.tree.leaves(args)))
  return jax.jit(call, donate_argnums=donate_argnums)


_REFUSED: set[str] = set()


def note_refused(name: str, error: Exception) -> None:
  """Logs once per name that `jax.export` refused it (it is then traced every start)."""
  if name not in _REFUSED:
    _REFUSED.add(name)
    logging.info("Trace cache: %s cannot be exported (%s); it is traced on every start.",
                 name, str(error).splitlines()[0] if str(error) else type(error).__name__)


def export_and_store(name: str, jitted, args: tuple, path: str, extra=None):
  """(exported, out_tree) of `jitted` on `args`, stored at `path` with `extra`; None (logged
  once) when jax.export refuses the program, which is then traced as usual."""
  try:
    exported, out_tree = export(jitted, args)
  except Exception as e:  # noqa: BLE001 -- jax.export refuses some programs.
    note_refused(name, e)
    return None
  write(path, exported, out_tree, extra)
  return exported, out_tree


def lower(name: str, jitted, args: tuple, *, describe: str, directory: str | None,
          donate_argnums: tuple[int, ...] = ()):
  """`jitted.lower(*args)`, from the trace cache in `directory` when it holds this program.

  `jitted` must be a `jax.jit` function whose arguments are `args` (a tuple of pytrees of
  arrays); `donate_argnums` repeats its donation. Returns a `jax.stages.Lowered` whose compiled
  form takes and returns the same trees as `jitted`.
  """
  if not directory:
    return jitted.lower(*args)
  path = entry_path(name, args, describe=describe, directory=directory)
  entry = read(path)
  if entry is None:
    entry = export_and_store(name, jitted, args, path)
    if entry is None:
      return jitted.lower(*args)
  exported, out_tree = entry[:2]
  return wrap(exported, out_tree, donate_argnums).lower(*args)
