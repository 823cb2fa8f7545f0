"""Import a Hugging Face video backbone into hvlm-jax parameters, straight into their shardings.

  apply_hf_architecture(config, path, explicit_keys) -> config whose encoder keys are the
      checkpoint's (each replacement logged; a contradicting command-line key is an error).
  load_hf_params(path, params, shardings, config) -> (params, report).

Each parameter is built with `jax.make_array_from_callback` on its target NamedSharding: the
callback memory-maps, for one device, only that device's slice of the file (transposed from
the torch layout), so no tensor is ever whole on one device and a model larger than any one
device loads. Position tables that need interpolation are resized on the host first.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from hvlm_jax.config import get_value
from hvlm_jax.models.encoder import ARCHITECTURE_KEYS
from hvlm_jax.pretrained import hf
from hvlm_jax.pretrained.hf import PretrainedError
from hvlm_jax.pretrained.positions import interpolate_joint_table
from hvlm_jax.pretrained.safetensors_files import SafetensorsCheckpoint


def _same(a, b) -> bool:
  if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
    return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b)))
  if isinstance(a, float) or isinstance(b, float):
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and np.isclose(
        a, b, rtol=1e-9, atol=0)
  return a == b


def _config_value(config, key: str):
  default = ARCHITECTURE_KEYS.get(key.split(".", 1)[1], (None, None))[1]
  return get_value(config, key, default)


def apply_hf_architecture(config, path: str, explicit_keys: set[str] = frozenset()):
  """A copy of `config` with every architecture key the checkpoint at `path` fixes replaced
  by the checkpoint's value (each replacement logged).

  Raises:
    PretrainedError: a key in `explicit_keys` (dotted, as set on the command line, with or
      without the "config." prefix) whose value contradicts the checkpoint, naming both.
  """
  arch = hf.hf_architecture(path)
  explicit = {k.removeprefix("config.") for k in explicit_keys}
  out = ml_collections.ConfigDict(config.to_dict()) if not isinstance(
      config, ml_collections.ConfigDict) else config.copy_and_resolve_references()
  file = os.path.join(path, "config.json")
  for key, value in arch.items():
    current = _config_value(out, key)
    changed = not _same(current, value)
    if changed and key in explicit:
      raise PretrainedError(f"--config.{key}={current!r} contradicts the checkpoint {file}, "
                            f"which needs {key}={value!r}; drop the override or pick another "
                            "checkpoint.")
    parent, leaf = key.rsplit(".", 1)
    node = get_value(out, parent)
    with out.unlocked():  # Set even when equal: the key may be absent (its default).
      node[leaf] = list(value) if isinstance(value, tuple) and isinstance(
          current, list) else value
    if changed:
      logging.info("init_from hf: config.%s %r -> %r (from %s)", key, current, value, file)
  return out


def check_architecture(config, path: str) -> dict[str, Any]:
  """hf_architecture(path), after checking `config` agrees with it (PretrainedError naming the
  key, both values and the file otherwise)."""
  arch = hf.hf_architecture(path)
  for key, value in arch.items():
    current = _config_value(config, key)
    if not _same(current, value):
      raise PretrainedError(
          f"config.{key}={current!r} contradicts {os.path.join(path, 'config.json')}, which "
          f"gives {value!r}; apply_hf_architecture (init_from=hf:...) sets it.")
  return arch


def _hv_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  return hf.to_hvlm(np.empty(shape, np.int8), kind).shape


def _subtree(tree, path):
  for p in path:
    if not hasattr(tree, "get") or p not in tree:
      return None
    tree = tree[p]
  return tree


def _set(tree: dict, path, value):
  for p in path[:-1]:
    tree = tree[p]
  tree[path[-1]] = value


def _thaw(tree):
  return {k: _thaw(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def _leaf_sharding(target, param):
  s = getattr(target, "sharding", target)
  if isinstance(s, jax.sharding.Sharding):
    return s
  return param.sharding


def _paths(tree, prefix=()):
  if hasattr(tree, "items"):
    for k, v in tree.items():
      yield from _paths(v, prefix + (k,))
  else:
    yield prefix


def load_hf_params(path: str, params, shardings, config, *,
                   progress=None, check_only: bool = False) -> tuple[Any, dict]:
  """Replaces the encoder parameters of `params` (a HierarchicalVLM tree with an "encoder"
  subtree, unboxed, possibly sharded) by checkpoint `path`'s, placed into `shardings` (a tree
  like `params` of Shardings or of abstract arrays carrying `.sharding`; None: each fresh
  leaf's own sharding). Heads, adapters, experts stay as initialised; HF's classifier goes into
  `classification_head/logits` when config.model.heads.classification_pooling is "encoder"
  and the class counts agree.

  `progress`: optional callable, called with each tensor name once it is placed (a tqdm bar
  in tools/convert_checkpoint.py). `check_only`: every check (names, shapes, file sizes)
  and the report, but no tensor read or placed; `params` may then be abstract (shapes only)
  and is returned as given (the trainer runs it before writing anything to the workdir).

  Returns (params, report): report lists every checkpoint tensor as loaded, interpolated or
  ignored (with the reason) and every parameter left newly initialised; write it to
  WORKDIR/init_report.json.
  Raises:
    PretrainedError: naming the file and key or tensor, for a missing or wrongly shaped
      tensor, a config that contradicts the checkpoint, an unreadable file.
  """
  cfg = hf.read_config(path)
  arch = check_architecture(config, path)
  mt = cfg["model_type"]
  wrapped = "encoder" not in params and "params" in params
  root = _thaw(params["params"] if wrapped else params)
  targets = shardings["params"] if wrapped and shardings is not None else shardings
  if "encoder" not in root:
    raise PretrainedError("load_hf_params: the parameter tree has no 'encoder' subtree.")
  tub = tuple(_config_value(config, "model.tubelet_size"))
  video = config.data.video
  dst_grid = (video.num_frames // tub[0], video.frame_size // tub[1], video.frame_size // tub[2])
  src_grid = hf.hf_grid(cfg)
  report = dict(source=os.path.abspath(path), model_type=mt,
                architectures=cfg.get("architectures"), checkpoint_grid=list(src_grid),
                clip_grid=list(dst_grid), loaded=[], interpolated=[], ignored=[],
                newly_initialised=[])
  pooling = get_value(config, "model.heads.classification_pooling", None)
  placed: set[tuple] = set()
  with SafetensorsCheckpoint(path) as ckpt:
    names = ckpt.names()
    prefix = hf.BASE_PREFIX[mt] if any(n.startswith(hf.BASE_PREFIX[mt]) for n in names) else ""
    canonical = {hf.canonical_name(n): n for n in names}
    used: set[str] = set()
    entries = [(prefix + e.hf, e, True) for e in hf.encoder_table(mt, arch)]
    entries += [(e.hf, e, False) for e in hf.head_table(mt, arch)]
    for name, entry, required in entries:
      stored = canonical.get(name)
      file = ckpt.files.get(stored, os.path.join(path, "model.safetensors"))
      if stored is None:
        if required:
          raise PretrainedError(f"{file} has no tensor {name}, which hvlm-jax parameter "
                                f"{'/'.join(entry.param)} needs.")
        continue
      used.add(stored)
      where = "/".join(entry.param)
      fresh = _subtree(root, entry.param)
      shape = _hv_shape(ckpt.shapes[stored], entry.kind)
      if entry.param[0] == "classification_head":
        reason = None
        if fresh is None or pooling != "encoder":
          reason = ("config.model.heads.classification_pooling is not 'encoder' (or there "
                    "is no classification head), so HF's classifier has no place")
        elif fresh.shape != shape:
          reason = (f"its shape {shape} differs from the head's {fresh.shape} (another "
                    "number of classes); the head stays newly initialised")
        if reason:
          report["ignored"].append(dict(tensor=stored, reason=reason))
          continue
      if fresh is None:
        raise PretrainedError(f"{file}: tensor {stored} maps to {where}, which the model "
                              "built from this config does not have.")
      dtype = fresh.dtype
      host = None
      interpolate = shape != fresh.shape and entry.kind == "joint_position"
      if interpolate:
        n_cls = int(arch["model.cls_token"])
        host = (np.empty((n_cls + int(np.prod(dst_grid)), shape[-1]), np.int8) if check_only
                else interpolate_joint_table(hf.to_hvlm(ckpt.read(stored), entry.kind),
                                             src_grid, dst_grid, n_cls))
      if (host.shape if host is not None else shape) != tuple(fresh.shape):
        raise PretrainedError(
            f"{file}: tensor {stored} has shape {ckpt.shapes[stored]}, i.e. {shape} as "
            f"{where}, but the configured model needs {tuple(fresh.shape)} (check "
            "config.model.hidden_size, mlp_dim, tubelet_size and data.video against the "
            "checkpoint's config.json).")
      if not check_only:
        sharding = _leaf_sharding(_subtree(targets, entry.param) if targets is not None
                                  else None, fresh)

        def shard(index, stored=stored, kind=entry.kind, host=host, dtype=dtype):
          if host is not None:
            return host[index].astype(dtype)
          return hf.to_hvlm(ckpt.read(stored, hf.torch_index(index, kind)), kind).astype(dtype)

        _set(root, entry.param, jax.make_array_from_callback(fresh.shape, sharding, shard))
      placed.add(entry.param)
      if interpolate:
        report["interpolated"].append(dict(
            tensor=stored, param=where, from_shape=list(shape), to_shape=list(fresh.shape),
            from_grid=list(src_grid), to_grid=list(dst_grid), method="trilinear"))
        logging.info("init_from hf: interpolated %s %s -> %s (grid %s -> %s)", stored, shape,
                     tuple(fresh.shape), src_grid, dst_grid)
      else:
        report["loaded"].append(dict(tensor=stored, param=where, shape=list(shape)))
      if progress is not None and not check_only:
        progress(stored)
    for name in names:
      if name in used:
        continue
      bare = name[len(prefix):] if prefix and name.startswith(prefix) else name
      reason = next((why for p, why in hf.IGNORED if bare.startswith(p)), None)
      if reason is None:
        raise PretrainedError(f"{ckpt.files[name]}: tensor {name} has no place in the hvlm-jax "
                              f"encoder built from {os.path.join(path, 'config.json')}.")
      report["ignored"].append(dict(tensor=name, reason=reason))
  if arch["model.position_embedding"] == "sinusoidal":
    report["fixed_positions"] = (
        f"fixed sinusoidal table over the clip's {int(np.prod(dst_grid))} tokens (grid "
        f"{dst_grid}; the checkpoint's was {src_grid}): computed, not stored or interpolated")
  report["newly_initialised"] = ["/".join(p) for p in _paths(root) if p not in placed]
  report["counts"] = {k: len(report[k]) for k in ("loaded", "interpolated", "ignored",
                                                  "newly_initialised")}
  if check_only:
    return params, report
  logging.info("init_from hf %s: %s", path, report["counts"])
  for item in report["ignored"]:
    logging.info("init_from hf: ignored %s (%s)", item["tensor"], item["reason"])
  logging.info("init_from hf: newly initialised %s", report["newly_initialised"])
  return ({"params": root} if wrapped else root), report
