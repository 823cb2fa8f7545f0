"""Orbax checkpoints: params, optimizer state, data-iterator state and config per step.

Layout: WORKDIR/checkpoints/<step>/{params, opt_state, data, config}. Parameters are their
own item so evaluation restores them alone, onto whatever mesh is present (the abstract
target's shardings decide where each shard lands). Retention keeps the latest N and the
best N by a validation metric, as two policies joined with AnyPreservationPolicy so neither
deletes the other's checkpoints. Saves are atomic (orbax writes a temporary directory and
renames it), so a crash mid-save leaves the previous checkpoints intact.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class CheckpointNotFoundError(FileNotFoundError):
  """No checkpoint (or not the requested step) in a run directory."""


class CheckpointMismatchError(ValueError):
  """A checkpoint's parameters do not fit the model the config builds."""


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
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.best_metric = best_metric
    policy = [policies.LatestN(n=max(keep_latest, 1))]
    if keep_best and best_metric:
      sign = 1.0 if best_mode == "max" else -1.0
      policy.append(policies.BestN(
          get_metric_fn=lambda m: sign * float(m[best_metric]), n=keep_best,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(policy),
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=self.ITEMS)

  # ----- queries ------------------------------------------------------------------------
  def all_steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The step with the best `best_metric`; the latest if none has metrics."""
    steps = self.all_steps()
    if not steps:
      return None
    if self.best_metric:
      best = self.manager.best_step()
      if best is not None:
        return best
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
    step = int(step)
    if step not in steps:
      raise CheckpointNotFoundError(
          f"No checkpoint for step {step} in {self.directory}; available steps: {steps}.")
    return step

  # ----- save ---------------------------------------------------------------------------
  def save(self, step: int, state, data_iterator=None, config=None,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Starts saving `state` (and the iterator state and config) as `step`."""
    import grain  # Local: only needed when an iterator is saved.
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

  # ----- restore ------------------------------------------------------------------------
  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the full train state (onto the shardings of `abstract_state`) at `step`.

    The iterator, if given, is restored in place. Returns the state.
    """
    import grain
    items = dict(params=ocp.args.StandardRestore(abstract_state.params),
                 opt_state=ocp.args.StandardRestore(
                     {"step": abstract_state.step, "opt_state": abstract_state.opt_state}))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    rest = restored["opt_state"]
    return abstract_state.replace(params=restored["params"], step=rest["step"],
                                  opt_state=rest["opt_state"])

  def restore_latest_valid(self, abstract_state, data_iterator=None):
    """Restores the newest checkpoint that reads back; (state, step) or (None, None).

    A checkpoint that fails to read (truncated files, a crash during a copy) is skipped with
    a warning; it is never deleted, so nothing a user made is lost.
    """
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, abstract_state, data_iterator), step
      except Exception as e:  # noqa: BLE001 -- any read failure means "try the previous one".
        logging.warning("Checkpoint %s/%d could not be restored (%s: %s); trying the "
                        "previous one.", self.directory, step, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
    return None, None

  def restore_params(self, step: int, abstract_params) -> Any:
    """Restores parameters only, onto the shardings of `abstract_params`."""
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
    except ValueError as e:
      if "do not match" not in str(e):
        raise
      missing = [line.split(":")[0].strip() for line in str(e).splitlines()
                 if line.strip() and not line.startswith((" ", "\t", "User", "If "))][:3]
      raise CheckpointMismatchError(
          f"The parameters in {self.directory}/{step} do not match the model built from the "
          f"given config (differences start at: {', '.join(missing)}); evaluate with the "
          "config the run was trained with.") from None
    return restored["params"]

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def metrics(self, step: int) -> dict | None:
    return self.manager.metrics(step)


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying `shardings`: the target orbax restores onto."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
