"""Orbax checkpoints: params, optimizer state, data-iterator state and config per step.

Layout: WORKDIR/checkpoints/<step>/{params, opt_state, data, config, metrics}. Parameters are
their own item so evaluation restores them alone, onto whatever mesh is present (the abstract
target's shardings decide where each shard lands). Retention keeps the latest N and the best N
by a validation metric (`best_fn` stores the metrics with each step), as two policies joined
with AnyPreservationPolicy so neither deletes the other's checkpoints. Saves are atomic (orbax
writes a temporary directory and renames it), so a crash mid-save leaves the previous
checkpoints intact.

A step that does not read back is one of two things, told apart before any array is read:
- *does not match* (`CheckpointMismatchError`): its stored tree (names and shapes, from the
  checkpoint's own metadata) differs from the model the config builds. The user's to fix;
  nothing is touched.
- *corrupt* (`CheckpointCorruptError`): an empty folder, unreadable metadata, arrays that fail
  to read although the metadata matches, or non-finite values. `quarantine` moves such a
  folder to WORKDIR/quarantine/ (never deletes it), so a resumed run can save that step again
  and retention never counts it.
No state with a non-finite value is ever saved (`CheckpointNonFiniteError`).
"""
from __future__ import annotations

import functools
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from orbax.checkpoint import checkpoint_managers as policies


class _NoMetricsNote(logging.Filter):
  """Drops orbax's warning for each save without metrics: only evaluation steps have them."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in str(record.msg)


logging.getLogger("absl").addFilter(_NoMetricsNote())


class CheckpointNotFoundError(FileNotFoundError):
  """No checkpoint (or not the requested step) in a run directory."""


class CheckpointMismatchError(ValueError):
  """A checkpoint's parameters do not fit the model the config builds."""


class CheckpointCorruptError(RuntimeError):
  """A step folder that does not read back: empty, truncated, garbage or non-finite."""


class CheckpointNonFiniteError(ValueError):
  """A state with NaN or Inf values was about to be saved; it was not."""


def _metric_key(best_metric: str, best_mode: str):
  """metrics dict -> a number where larger is better for `best_mode` (orbax's best_fn sorts by
  it with `best_mode`); a missing or non-finite metric ranks last."""
  worst = -math.inf if best_mode == "max" else math.inf

  def key(metrics):
    try:
      value = float(metrics[best_metric])
    except (KeyError, TypeError, ValueError):
      return worst
    return value if math.isfinite(value) else worst
  return key


@functools.lru_cache(maxsize=None)
def _all_finite_fn(out_sharding):
  def reduce(leaves):
    return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()
  return jax.jit(reduce, out_shardings=out_sharding)


def all_finite(tree) -> bool:
  """True when every floating-point leaf of `tree` is finite (one reduction on device, its
  result replicated so every process reads it)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return True
  sharding = getattr(leaves[0], "sharding", None)
  out = NamedSharding(sharding.mesh, P()) if isinstance(sharding, NamedSharding) else None
  return bool(jax.device_get(_all_finite_fn(out)(leaves)))


class Checkpointer:
  """Saves and restores train state + iterator state under `workdir/checkpoints`.

  Args:
    workdir: run directory.
    keep_latest: how many of the most recent checkpoints to keep.
    keep_best: how many of the best checkpoints (by `best_metric`) to keep; 0 disables.
    best_metric: key of the metrics dict passed to `save` that ranks checkpoints.
    best_mode: "max" or "min".
    async_save: save in a background thread (the train loop continues).
  """

  ITEMS = ("params", "opt_state", "data", "config")

  def __init__(self, workdir: str, *, keep_latest: int = 3, keep_best: int = 1,
               best_metric: str = "", best_mode: str = "max", async_save: bool = True,
               read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise CheckpointCorruptError(f"{self.directory} is a file, not the run's checkpoint "
                                   "folder; move it aside.")
    self.best_metric, self.best_mode = best_metric, best_mode
    key = _metric_key(best_metric, best_mode)
    policy = [policies.LatestN(n=max(keep_latest, 1))]
    if keep_best and best_metric:
      sign = 1.0 if best_mode == "max" else -1.0
      policy.append(policies.BestN(get_metric_fn=lambda m: sign * key(m), n=keep_best,
                                   keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(policy),
        best_fn=key if best_metric else None, best_mode=best_mode,
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)
    import grain  # Local: only the checkpointer needs grain's iterator handler.
    # Handlers named up front, so that a fresh manager (a resumed run, a read-only evaluator)
    # reads every item's metadata before restoring anything.
    handlers = dict(params=ocp.StandardCheckpointHandler(),
                    opt_state=ocp.StandardCheckpointHandler(),
                    data=grain.checkpoint.CheckpointHandler(),
                    config=ocp.JsonCheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=handlers)
    self.corrupt_steps: dict[int, str] = {}  # Steps restore_latest_valid skipped, and why.

  # ----- queries ------------------------------------------------------------------------
  def all_steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The step with the best `best_metric`; the latest if none has it."""
    steps = self.all_steps()
    if not steps:
      return None
    if self.best_metric:
      key = _metric_key(self.best_metric, self.best_mode)
      ranked = [(key(m), s) for s in steps if (m := self.metrics(s))
                and math.isfinite(key(m))]
      if ranked:
        best = (max if self.best_mode == "max" else min)(ranked)[1]
        return best
      logging.warning("No checkpoint in %s has the metric %r (training.best_metric); "
                      "'best' is the latest step, %d.", self.directory, self.best_metric,
                      steps[-1])
    return steps[-1]

  def resolve(self, step: str | int) -> int:
    """'latest', 'best' or a step number -> an existing step; errors name what is there."""
    steps = self.all_steps()
    if not steps:
      raise CheckpointNotFoundError(f"No checkpoint found in {self.directory}.")
    if step in ("latest", None, ""):
      return steps[-1]
    if step == "best":
      return self.best_step()
    try:
      step = int(step)
    except (TypeError, ValueError):
      raise CheckpointNotFoundError(
          f"Checkpoint step {step!r} is not 'latest', 'best' or a step number; steps in "
          f"{self.directory}: {steps}.") from None
    if step not in steps:
      raise CheckpointNotFoundError(
          f"No checkpoint for step {step} in {self.directory}; available steps: {steps}.")
    return step

  # ----- save ---------------------------------------------------------------------------
  def save(self, step: int, state, data_iterator=None, config=None,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Starts saving `state` (and the iterator state and config) as `step`.

    Raises CheckpointNonFiniteError, saving nothing, when a parameter or optimizer value is
    NaN or Inf: every checkpoint on disk is a state training can go on from.
    """
    import grain  # Local: only needed when an iterator is saved.
    if not all_finite((state.params, state.opt_state)):
      raise CheckpointNonFiniteError(
          f"The train state at step {step} holds NaN or Inf values; it was not saved to "
          f"{self.directory}.")
    items = dict(params=ocp.args.StandardSave(state.params),
                 opt_state=ocp.args.StandardSave(
                     {"step": state.step, "opt_state": state.opt_state}))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config.to_dict())
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                             force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  # ----- checks before reading ------------------------------------------------------------
  def check_matches(self, step: int, targets: dict[str, Any]) -> None:
    """Compares the stored trees of `step` (names and shapes, from its metadata) with
    `targets` ({item: abstract tree}).

    Raises:
      CheckpointCorruptError: the folder is empty or its metadata does not read.
      CheckpointMismatchError: the trees differ (the message lists the first differences).
    """
    path = os.path.join(self.directory, str(step))
    if os.path.isdir(path) and not os.listdir(path):
      raise CheckpointCorruptError(f"{path} is an empty folder")
    try:
      stored = self.manager.item_metadata(step)
      trees = {item: _tree_of(stored[item]) for item in targets}
    except Exception as e:  # noqa: BLE001 -- unreadable metadata of any kind is corruption.
      raise CheckpointCorruptError(f"the metadata of {path} does not read "
                                   f"({type(e).__name__}: {_first_line(e)})") from None
    differences = []
    for item, target in targets.items():
      if trees[item] is None:
        raise CheckpointCorruptError(f"{path} has no readable {item!r} item")
      differences += tree_differences(trees[item], target, prefix=item + "/")
    if differences:
      raise CheckpointMismatchError(
          f"The checkpoint {path} does not match the model built from the given config "
          f"({len(differences)} difference(s), first: {'; '.join(differences[:3])}); use the "
          "config the run was trained with.")

  # ----- restore ------------------------------------------------------------------------
  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the full train state (onto the shardings of `abstract_state`) at `step`.

    The iterator, if given, is restored in place. Returns the state.

    Raises:
      CheckpointMismatchError: the checkpoint was made by another model (or process count).
      CheckpointCorruptError: it does not read back or holds non-finite values.
    """
    import grain
    opt_target = {"step": abstract_state.step, "opt_state": abstract_state.opt_state}
    self.check_matches(step, dict(params=abstract_state.params, opt_state=opt_target))
    if data_iterator is not None:
      self._check_data_item(step)
    items = dict(params=ocp.args.StandardRestore(abstract_state.params),
                 opt_state=ocp.args.StandardRestore(opt_target))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 -- the trees match (checked above): a read failure.
      raise CheckpointCorruptError(f"{self.directory}/{step} does not read back "
                                   f"({type(e).__name__}: {_first_line(e)})") from None
    rest = restored["opt_state"]
    if not all_finite((restored["params"], rest["opt_state"])):
      raise CheckpointCorruptError(f"{self.directory}/{step} holds NaN or Inf values")
    return abstract_state.replace(params=restored["params"], step=rest["step"],
                                  opt_state=rest["opt_state"])

  def _check_data_item(self, step: int):
    folder = os.path.join(self.directory, str(step), "data")
    if not os.path.isdir(folder):
      return
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    names = [n for n in os.listdir(folder) if n.startswith("process_")]
    if names and mine not in names:
      raise CheckpointMismatchError(
          f"The data-iterator state in {folder} was saved by another number of processes "
          f"({', '.join(sorted(names))}; this is {mine}); resume with the same process count.")

  def restore_latest_valid(self, abstract_state, data_iterator=None):
    """Restores the newest checkpoint that reads back; (state, step) or (None, None).

    A corrupt checkpoint is skipped with a warning and recorded in `corrupt_steps` (call
    `quarantine` to move it aside); a checkpoint of another model raises
    CheckpointMismatchError at once: nothing is skipped, nothing is touched.
    """
    self.corrupt_steps = {}
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, abstract_state, data_iterator), step
      except CheckpointCorruptError as e:
        self.corrupt_steps[step] = str(e)
        logging.warning("Checkpoint %s/%d could not be restored (%s); trying the previous "
                        "one.", self.directory, step, e)
    return None, None

  def quarantine(self, step: int, reason: str) -> str | None:
    """Moves step folder `step` to WORKDIR/quarantine/ (process 0 renames, never deletes), so
    the step can be saved again and retention does not count it. Returns the new path."""
    source = os.path.join(self.directory, str(step))
    target = os.path.join(self.workdir, "quarantine",
                          f"step_{step}_{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0 and os.path.exists(source):
      os.makedirs(os.path.dirname(target), exist_ok=True)
      suffix = 1
      while os.path.exists(target + (f"_{suffix}" if suffix > 1 else "")):
        suffix += 1
      target += f"_{suffix}" if suffix > 1 else ""
      os.rename(source, target)
      with open(os.path.join(target, "QUARANTINED.txt"), "w") as f:
        f.write(f"Moved aside from {source}: {reason}\n")
      logging.warning("Checkpoint %s moved to %s: %s.", source, target, reason)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"quarantine_{step}")
    self.manager.reload()
    return target

  def restore_params(self, step: int, abstract_params) -> Any:
    """Restores parameters only, onto the shardings of `abstract_params`.

    Raises CheckpointMismatchError or CheckpointCorruptError as `restore` does."""
    self.check_matches(step, dict(params=abstract_params))
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
    except Exception as e:  # noqa: BLE001 -- the trees match (checked above): a read failure.
      raise CheckpointCorruptError(f"{self.directory}/{step} does not read back "
                                   f"({type(e).__name__}: {_first_line(e)})") from None
    if not all_finite(restored["params"]):
      raise CheckpointCorruptError(f"{self.directory}/{step} holds NaN or Inf values")
    return restored["params"]

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def metrics(self, step: int) -> dict | None:
    try:
      return self.manager.metrics(step)
    except Exception:  # noqa: BLE001 -- a step whose metrics do not read has none.
      return None


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:200] if text else ""


def _tree_of(metadata):
  """A checkpoint item's metadata -> its tree of array metadata (None if unreadable)."""
  if metadata is None:
    return None
  return getattr(metadata, "tree", metadata)


def tree_differences(stored, target, prefix: str = "") -> list[str]:
  """Differences between a stored tree (leaves with `.shape`) and an abstract target:
  'path: missing in the checkpoint', 'path: not in the model', 'path: shape A vs B'."""
  def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") or x is None)[0]
    # Arrays only: orbax stores empty optimizer states (optax's EmptyState, MaskedNode) as
    # None or empty nodes, the abstract tree has no leaf there.
    return {prefix + jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in leaves
            if hasattr(x, "shape")}
  a, b = flat(stored), flat(target)
  out = [f"{k}: missing in the checkpoint" for k in b if k not in a]
  out += [f"{k}: not in the model" for k in a if k not in b]
  out += [f"{k}: stored shape {tuple(a[k].shape)} vs model {tuple(b[k].shape)}"
          for k in b if k in a and tuple(a[k].shape) != tuple(b[k].shape)]
  return out


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying `shardings`: the target orbax restores onto."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)

