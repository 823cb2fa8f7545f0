"""Device mesh and the one table that maps logical axis names to mesh axes.

As in MaxText, every parameter and constrained activation names its axes logically
(`embed`, `mlp`, ...); `LOGICAL_RULES` maps those names onto the mesh axes `data`, `fsdp`,
`tensor`. A mesh axis of size 1 shards nothing, so one table serves pure data parallelism,
FSDP, tensor parallelism and any mix, chosen by `config.mesh` alone.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hvlm_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated). Names absent from the
# table are replicated.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # Activations.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", "tensor"),
    # Parameters: FSDP shards the model width, tensor parallelism the wide axes.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("joined_kv", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("expert", None),
    ("domain", None),
    ("lora_rank", None),
)

BATCH_AXES = ("data", "fsdp")


def mesh_sizes(mesh_config, num_devices: int) -> dict[str, int]:
  """{data, fsdp, tensor} sizes of `config.mesh` on `num_devices` devices (one -1 = the rest).

  Raises:
    ConfigError: naming config.mesh when the sizes are not positive or do not multiply to
      the device count.
  """
  try:
    sizes = [int(mesh_config[name]) for name in MESH_AXES]
  except (KeyError, TypeError, ValueError):
    raise ConfigError(f"config.mesh={dict(mesh_config)} must give an integer size for each of "
                      f"{', '.join(MESH_AXES)}.") from None
  shown = dict(zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise ConfigError(f"config.mesh={shown}: at most one of data, fsdp, tensor may be -1.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"config.mesh={shown}: sizes must be >= 1 (or one -1).")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ConfigError(f"config.mesh={shown} does not divide the {num_devices} available "
                        "devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"config.mesh={shown} needs {math.prod(sizes)} devices but "
                      f"{num_devices} are available.")
  return dict(zip(MESH_AXES, sizes))


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size in `mesh_config` may be -1 (all remaining devices).
  Device order is topology-aware (`jax.make_mesh`: neighbours in the interconnect are
  neighbours on the mesh; each host's devices stay contiguous).

  Raises:
    ConfigError: naming config.mesh when the sizes do not fit the devices.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_sizes(mesh_config, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


@functools.cache
def _warn_once(message: str, *args):
  logging.warning(message, *args)


def _mesh_axes_for(logical_name, dim: int, mesh: Mesh, rules: dict, used: set):
  """Mesh axes for one array dimension, dropping axes that do not divide it."""
  target = rules.get(logical_name) if logical_name is not None else None
  if target is None:
    return None
  axes = (target,) if isinstance(target, str) else tuple(target)
  kept = []
  for axis in axes:
    size = mesh.shape[axis]
    if axis in used or size == 1:
      continue
    if dim % (math.prod(mesh.shape[a] for a in kept) * size):
      _warn_once("Axis %r (size %d) is not divisible by mesh axis %r (size %d); "
                      "replicating it instead.", logical_name, dim, axis, size)
      continue
    kept.append(axis)
  used.update(kept)
  if not kept:
    return None
  return kept[0] if len(kept) == 1 else tuple(kept)


def logical_to_spec(names: tuple, shape: tuple[int, ...], mesh: Mesh,
                    rules=LOGICAL_RULES) -> P:
  """PartitionSpec for an array of `shape` whose axes have logical `names`."""
  rules = dict(rules)
  used: set[str] = set()
  return P(*(_mesh_axes_for(name, dim, mesh, rules, used) for name, dim in zip(names, shape)))


def tree_shardings(abstract_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a (boxed) abstract tree: logical names where boxed, else replicated.

  `abstract_tree` is the result of `jax.eval_shape` on an init function; leaves that are
  `nn.LogicallyPartitioned` are sharded by their names, all others replicated.
  """
  def leaf_sharding(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = logical_to_spec(leaf.names, leaf.value.shape, mesh, rules)
    else:
      spec = P()
    return NamedSharding(mesh, spec)
  return jax.tree.map(leaf_sharding, abstract_tree,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's local numpy batch into global jax.Arrays on `mesh`."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), v)
          for k, v in local_batch.items()}


def flax_logical_rules(rules=LOGICAL_RULES):
  """The table in the form `nn.logical_axis_rules` expects (for activation constraints)."""
  return tuple((name, target) for name, target in rules)


def _path_names(path) -> tuple[str, ...]:
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
  return tuple(names)


def follow_param_shardings(tree, abstract_params, param_shardings, mesh: Mesh):
  """Shardings for an optimizer state: a leaf whose path ends with a parameter's path and
  has its shape is sharded like that parameter; everything else (counts, scalars) is
  replicated. Works for any optax chain, masked or not, without knowing its structure.
  """
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_shardings = jax.tree.leaves(param_shardings)
  by_path = {_path_names(path): (x.shape, s)
             for (path, x), s in zip(flat_params, flat_shardings)}

  def leaf(path, x):
    names = _path_names(path)
    for start in range(len(names)):
      shape, s = by_path.get(names[start:], (None, None))
      if s is not None and shape == getattr(x, "shape", None):
        return s
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(leaf, tree)
