"""The trainer: `python -m hvlm_jax.train --config=configs/demo.py --workdir=runs/demo`.

Reads top to bottom, as big_vision's train.py: setup, mesh, input, model, sharded state,
update step, checkpoint / resume, evaluation, loop. One `jax.jit` train step over a
(data, fsdp, tensor) mesh serves one CPU, a multi-GPU host and a TPU pod slice.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from hvlm_jax import data as data_lib
from hvlm_jax import run as run_lib
from hvlm_jax import sharding
from hvlm_jax import trace_cache
from hvlm_jax.checkpoint import Checkpointer, CheckpointNonFiniteError, abstract_with_shardings
from hvlm_jax.data import segments as segments_lib
from hvlm_jax.eval import evaluate as evaluate_lib
from hvlm_jax.eval import predict as predict_lib
from hvlm_jax.models import model as model_lib
from hvlm_jax.models import pretraining
from hvlm_jax.models import streaming, streaming_loss
from hvlm_jax.models.domain import lora
from hvlm_jax.train import ahead as ahead_lib
from hvlm_jax.train import perf as perf_lib
from hvlm_jax.train import state as state_lib
from hvlm_jax.train.metric_writer import MetricWriter


class TrainingError(RuntimeError):
  """Training cannot go on (NaN loss, bad data); the message says why and what was kept."""


class TrainingStopped(Exception):
  """SIGTERM (a preemption) stopped training before its last step, after every process saved
  the same step; `python -m hvlm_jax.train` exits with EXIT_STOPPED, and a rerun continues."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"Training stopped at step {step} by a signal with a checkpoint in "
                     f"{directory}; rerun the same command to continue.")
    self.step = step


def total_train_steps(config, num_train_videos: int) -> int:
  tr = config.training
  if tr.num_steps > 0:
    return int(tr.num_steps)
  steps_per_epoch = max(num_train_videos // config.data.batch_size, 1)
  return int(tr.num_epochs * steps_per_epoch)


def train_state_initialiser(model, tx, example_batch, mesh, rng, abstract, *,
                            trace_dir: str | None = None, describe: str = ""):
  """The jitted initialiser of the train state, writing it directly into its shardings (never
  whole on one device).

  `abstract`: run_lib.abstract_params(model, example_batch, mesh), computed once by the caller
  (each call traces the model). With `trace_dir` the initialiser is exported and stored there
  (under `describe`), for build_training to read on the next start.
  Returns (initialise, state_shardings, abstract_state); `initialise(rng)` gives the state.
  """
  init = run_lib.init_fn(model, example_batch)
  abstract_params, param_shardings = abstract

  def init_state(rng):
    params = nn.meta.unbox(init(rng))
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params))

  # The state's shapes without tracing the model again: only the optimizer's init.
  abstract_state = state_lib.TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
      opt_state=jax.eval_shape(tx.init, abstract_params))
  state_shardings = state_lib.TrainState(
      step=NamedSharding(mesh, P()), params=param_shardings,
      opt_state=sharding.follow_param_shardings(abstract_state.opt_state,
                                                abstract_state.params, param_shardings, mesh))
  initialise = jax.jit(init_state, out_shardings=state_shardings)
  if trace_dir and all(isinstance(s, NamedSharding) for s in jax.tree.leaves(state_shardings)):
    entry = trace_cache.export_and_store(
        "init_state", initialise, (rng,),
        trace_cache.entry_path("init_state", (rng,), describe=describe, directory=trace_dir),
        extra=[s.spec for s in jax.tree.leaves(state_shardings)])
    if entry is not None:
      initialise = trace_cache.wrap(*entry)  # The program a warm start runs.
  return initialise, state_shardings, abstract_with_shardings(abstract_state, state_shardings)


@dataclasses.dataclass
class Training:
  """What the loop needs: the model, the sharded state and the compiled update."""
  model: model_lib.HierarchicalVLM
  tx: Any
  schedule: Any
  state: state_lib.TrainState | None  # None with build_training(..., initialise=False).
  state_shardings: state_lib.TrainState
  abstract_state: state_lib.TrainState  # ShapeDtypeStructs with the state's shardings.
  train_step: Callable
  init_lowered: jax.stages.Lowered  # The initialiser on `rng`: .compile()(rng) is the state.


def build_training(config, mesh, example_batch, total_steps: int, rng,
                   trace_dir: str | None = None, initialise: bool = True,
                   on_abstract_state: Callable | None = None) -> Training:
  """Model, optimizer, state initialised into its shardings on `mesh`, and the train step.

  With `trace_dir` (hvlm_jax.trace_cache) the initialiser is the exported program, read from
  the cache on a warm start: the model is then not traced at all to build the state.
  `initialise=False` leaves `state` None: the caller compiles `init_lowered` when (and if) it
  needs the initial state, e.g. in a background thread (train_and_evaluate).
  `on_abstract_state(abstract_state)` is called as soon as the state's shapes and shardings are
  known (before the initialiser is lowered).
  """
  model = run_lib.build_model(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.flax_logical_rules()):
    schedule = state_lib.learning_rate_schedule(config, total_steps)
    # The initialiser's trace also depends on the example batch's shapes (model.init).
    describe = _trace_description(config, total_steps) + json.dumps(sorted(
        (k, list(np.shape(v)), str(np.asarray(v).dtype)) for k, v in example_batch.items()))
    cached = _cached_initialiser(mesh, rng, describe, trace_dir)
    if cached is not None:
      init, abstract_state = cached
      state_shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
      tx = state_lib.make_optimizer(config, abstract_state.params, total_steps)
    else:
      abstract = run_lib.abstract_params(model, example_batch, mesh)
      tx = state_lib.make_optimizer(config, abstract[0], total_steps)
      init, state_shardings, abstract_state = train_state_initialiser(
          model, tx, example_batch, mesh, rng, abstract, trace_dir=trace_dir,
          describe=describe)
    if on_abstract_state is not None:
      on_abstract_state(abstract_state)
    init_lowered = init.lower(rng)
  state = init_lowered.compile()(rng) if initialise else None
  train_step = make_train_step(config, model, tx, schedule, state_shardings, mesh)
  return Training(model, tx, schedule, state, state_shardings, abstract_state, train_step,
                  init_lowered)


def _cached_initialiser(mesh, rng, describe: str, trace_dir):
  """(init, abstract_state) from the trace cache, or None on a miss (or no cache)."""
  if not trace_dir:
    return None
  entry = trace_cache.read(trace_cache.entry_path("init_state", (rng,), describe=describe,
                                                  directory=trace_dir))
  if entry is None:
    return None
  exported, out_tree, specs = entry
  abstract = jax.tree.unflatten(out_tree, [
      jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))
      for a, spec in zip(exported.out_avals, specs)])
  return trace_cache.wrap(exported, out_tree), abstract


def make_train_step(config, model, tx, schedule, state_shardings, mesh):
  """The jitted update: forward, multi-task loss, backward, optimizer, metrics.

  A step whose loss or global gradient norm is NaN/Inf leaves parameters and optimizer state
  as they were (the step counter still advances with the data); `metrics["nonfinite"]` is 1.
  """
  def train_step(state, batch, rng, merge_weights):
    rng = jax.random.fold_in(rng, state.step)
    dropout_rng, features_rng = jax.random.split(rng)

    def loss_fn(params):
      if pretraining.objective(config) == "masked_video":
        outputs = model.apply({"params": params}, batch, train=True, rngs={
            "dropout": dropout_rng, "features": features_rng,
            "masking": jax.random.fold_in(rng, 2)})
        return pretraining.compute_losses(outputs, batch, config)
      if streaming.trains_with_memory(config):  # Batches of consecutive segments per video.
        return streaming_loss.streaming_loss(
            model, params, batch, config, merge_weights=merge_weights,
            rngs={"dropout": dropout_rng, "features": features_rng})
      outputs = model.apply({"params": params}, batch, train=True, merge_weights=merge_weights,
                            rngs={"dropout": dropout_rng, "features": features_rng})
      return model_lib.compute_losses(outputs, batch, config)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=schedule(state.step),
                   nonfinite=1.0 - finite.astype(jnp.float32))
    return state.replace(step=state.step + 1, params=keep_if_bad(params, state.params),
                         opt_state=keep_if_bad(opt_state, state.opt_state)), metrics

  replicated = NamedSharding(mesh, P())
  return jax.jit(train_step, in_shardings=(state_shardings, None, replicated, None),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def _trace_description(config, total_steps: int) -> str:
  """What the train step's trace depends on besides the code and its arguments."""
  return json.dumps({"config": config.to_dict(), "total_steps": total_steps}, sort_keys=True,
                    default=repr)


def merging_controls(config, step: int) -> tuple[float, np.ndarray | None]:
  """Token-merging ratio and runtime (motion, saliency) weights at `step`.

  Curriculum: the compression ratio rises in `training.compression_stages` equal stages to
  `model.token_merging.target_compression_ratio` over `training.compression_warmup_steps`
  (a ratio fixes token counts, so each stage is its own compiled step). Progressive merging:
  motion importance from the start, saliency from `training.saliency_start_step` (a traced
  input: switching it on does not recompile).
  """
  tm, tr = config.model.token_merging, config.training
  if not tm.enabled:
    return 0.0, None
  ratio = tm.target_compression_ratio
  if tr.compression_warmup_steps > 0 and step < tr.compression_warmup_steps:
    stages = max(tr.compression_stages, 1)
    stage = min(int(stages * step / tr.compression_warmup_steps) + 1, stages)
    ratio = round(ratio * stage / stages, 6)
  motion = float(tm.use_motion)
  saliency = float(tm.use_saliency and step >= tr.saliency_start_step)
  return ratio, np.asarray([motion, saliency], np.float32)


def with_compression_ratio(config, ratio: float):
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.token_merging.target_compression_ratio = ratio
  return config


def parameter_overview(params) -> str:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  lines = [f"{'parameter':<72} {'shape':<20} {'size':>10}"]
  for path, x in flat:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    lines.append(f"{name:<72} {str(tuple(x.shape)):<20} {int(np.prod(x.shape)):>10}")
  total = sum(int(np.prod(x.shape)) for _, x in flat)
  lines.append(f"total parameters: {total:,}")
  return "\n".join(lines)


def module_overview(params) -> str:
  """Parameter count per top-level module (encoder, each head, router ...)."""
  sizes = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in params.items()}
  return "\n".join(f"  {k:<28} {v:>12,}" for k, v in sorted(sizes.items()))


class _StopSignal:
  """SIGTERM (preemption, `kill`) asks the loop to save and exit at a step boundary.

  One process: a Python handler sets a flag read at the next step. Several processes: JAX's
  preemption service (started by jax.distributed.initialize; it owns SIGTERM) tells every
  process of a SIGTERM that reached any of them, and `reached(step)` is true on all of them at
  the same step (orbax's `reached_preemption`), so all save that step and exit together.
  """

  def __init__(self, manager):
    self.requested = False
    self._manager = manager
    self._multi = jax.process_count() > 1
    # Ctrl-C (SIGINT) stops like SIGTERM; a second Ctrl-C interrupts at once.
    self._previous = None if self._multi else {
        s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    logging.warning("%s received: saving a checkpoint and exiting.",
                    signal.Signals(signum).name)
    signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._multi and self._manager.reached_preemption(step):
      logging.warning("Preemption: all processes stop at step %d with a checkpoint.", step)
      self.requested = True
    return self.requested

  def restore(self):
    for s, handler in (self._previous or {}).items():
      signal.signal(s, handler)


class _NonfiniteGuard:
  """Counts the updates the train step skipped (NaN/Inf loss or gradient norm) and stops
  training after training.max_nonfinite_steps of them in a row (training.nonfinite="skip")
  or at the first ("stop"). The flags are read at log steps, so the step never waits."""

  def __init__(self, config):
    tr = config.training
    self.mode = tr.get("nonfinite", "skip")
    self.limit = 1 if self.mode == "stop" else int(tr.get("max_nonfinite_steps", 10))
    self.total = self.in_a_row = 0

  def update(self, flags, last_step: int, ckpt) -> None:
    flags = [bool(f) for f in flags]
    if any(flags):
      logging.warning("%d of the last %d steps had a NaN/Inf loss or gradient norm; their "
                      "updates were skipped.", sum(flags), len(flags))
    for i, bad in enumerate(flags):
      self.total += bad
      self.in_a_row = self.in_a_row + 1 if bad else 0
      if self.in_a_row >= self.limit:
        ckpt.wait()  # The message lists the checkpoints on disk, saves in flight included.
        raise TrainingError(
            f"The loss or gradient norm was NaN/Inf at {self.in_a_row} step(s) in a row up to "
            f"step {last_step - len(flags) + i + 1} (training.nonfinite={self.mode!r}, "
            f"training.max_nonfinite_steps={self.limit}); their updates were not applied and "
            f"the checkpoints in {ckpt.directory} (steps {ckpt.all_steps()}) are all finite.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None, explicit_keys=()) -> dict:
  """Trains per `config`, checkpointing into `workdir`; returns the last eval metrics.

  `stop_at_step` leaves the loop after that step with a checkpoint, as a preemption would
  (the schedule still spans the configured total, so a restart continues the same run).
  `explicit_keys`: dotted keys set on the command line; with `init_from="hf:DIR"` the
  encoder architecture keys come from DIR's config.json and such a key contradicting it is
  an error (PretrainedError naming both values).
  """
  # ----- setup ---------------------------------------------------------------------------
  config = run_lib.apply_init_from_architecture(config, explicit_keys)
  run_lib.validate(config, jax.device_count())
  run_lib.check_init_from(config)  # hf:DIR whole and matching, before anything is written.
  workdir = os.path.abspath(workdir)
  run_lib.check_workdir(config, workdir)  # One run per workdir: refuses a changed model.
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  cache_dir = run_lib.enable_compilation_cache(config)
  trace_dir = run_lib.trace_cache_dir(config, cache_dir)
  logging.info("Run directory: %s", workdir)
  logging.info("Devices: %d (%d local) on %d process(es): %s; compilation cache: %s",
               jax.device_count(), jax.local_device_count(), jax.process_count(),
               jax.devices()[0].platform, cache_dir or "off")

  # ----- mesh ----------------------------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  logging.info("Mesh: %s", dict(mesh.shape))
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]

  # ----- input ---------------------------------------------------------------------------
  if is_main:
    data_lib.ensure_dataset(config)
  sync_processes("dataset_ready")
  train_split = data_lib.load_split(config, "training")
  val_split = data_lib.load_split(config, "validation")
  for split_data in (train_split, val_split):
    run_lib.require_videos(split_data)
  logging.info("Data: %d training and %d validation videos from %s.", len(train_split),
               len(val_split), os.path.abspath(config.data.dir))
  vocabs = load_or_build_vocabularies(train_split, workdir, config)
  config = run_lib.fill_from_vocabularies(config, vocabs)
  total_steps = total_train_steps(config, len(train_split))
  make_iterator = (segments_lib.make_streaming_train_iterator
                   if streaming.trains_with_memory(config) else data_lib.make_train_iterator)
  train_iter = make_iterator(
      config, train_split, vocabs, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  first_batch = next(iter(data_lib.eval_batches(config, val_split, vocabs)))

  # ----- model and sharded state ---------------------------------------------------------
  rng = jax.random.key(config.seed)
  example = {k: v[:data_parallel] for k, v in first_batch.items()}
  train_rng = jax.random.fold_in(rng, 1)
  # A warm start loads the first train step's executable in a background thread while the
  # initialiser, the checkpoint and the first batch are prepared.
  step_ahead = []  # The first train step loading in a background thread (a warm start).
  first_ratio, first_weights = merging_controls(config, 0)
  predicted_batch = {k: jax.ShapeDtypeStruct((config.data.batch_size, *np.shape(v)[1:]),
                                             np.asarray(v).dtype,
                                             sharding=sharding.batch_sharding(mesh, np.ndim(v)))
                     for k, v in first_batch.items()}

  def load_step_ahead(abstract):
    if first_ratio == merging_controls(config, total_steps)[0]:  # run.train_step's ratio.
      describe = _trace_description(with_compression_ratio(config, first_ratio), total_steps)
      step_ahead.append(ahead_lib.StepAhead(
          (abstract, predicted_batch, train_rng, first_weights), describe, trace_dir, mesh))

  run = build_training(config, mesh, example, total_steps, rng, trace_dir=trace_dir,
                       initialise=False, on_abstract_state=load_step_ahead if trace_dir else None)
  model, abstract_state = run.model, run.abstract_state
  steps_by_ratio = {merging_controls(config, total_steps)[0]: run.train_step}
  if is_main:
    overview = parameter_overview(abstract_state.params)
    with open(os.path.join(workdir, "parameters.txt"), "w") as f:
      f.write(overview + "\n")
    logging.info("Parameters per module (all in %s/parameters.txt):\n%s", workdir,
                 module_overview(abstract_state.params))
    mask = lora.trainable_mask(abstract_state.params, state_lib.finetune_mode(config))
    logging.info("Trainable parameters: %s of %s (training.finetune=%r)",
                 f"{lora.count_parameters(abstract_state.params, mask):,}",
                 f"{lora.count_parameters(abstract_state.params):,}",
                 config.training.get("finetune", "full"))

  # ----- checkpoint / resume -------------------------------------------------------------
  tr = config.training
  ckpt = Checkpointer(workdir, keep_latest=tr.keep_checkpoints,
                      keep_best=tr.get("keep_best_checkpoints", 1),
                      best_metric=tr.best_metric, best_mode=tr.best_mode)
  # A checkpoint of another model raises (nothing touched); corrupt ones newer than the one
  # restored are moved to WORKDIR/quarantine/, so their step numbers can be saved again.
  restored, step = ckpt.restore_latest_valid(abstract_state, train_iter)
  for bad_step, reason in sorted(ckpt.corrupt_steps.items()):
    ckpt.quarantine(bad_step, reason)
  if is_main:
    _write_json(run_lib.config_path(workdir), config.to_dict())
  initial = None  # A fresh run's initial state, made at the first step.
  if restored is not None:
    state = restored
    logging.info("Resumed from %s/%d.", ckpt.directory, step)
  else:
    # The initialiser's executable is compiled (or loaded from the compilation cache) in a
    # background thread while the train step's is on this one: XLA releases the GIL. A
    # resumed run never loads it.
    initial = ahead_lib.in_background(run.init_lowered.compile)
    state = None
    if config.get("init_from"):  # Now: a bad pretrained file is reported before compiling.
      state = initial.result()(rng)
      params, report = run_lib.init_from(config.init_from, state.params, abstract_state.params,
                                         config=config)
      state = state.replace(params=params)
      if is_main:
        _write_json(os.path.join(workdir, "init_report.json"), report)
  start_step = int(state.step) if state is not None else 0

  # ----- evaluation ----------------------------------------------------------------------
  # A few fixed validation videos are drawn at each evaluation (TensorBoard images).
  image_split = dataclasses.replace(val_split, entries=val_split.entries[
      :tr.eval_images if config.data.input != "features" else 0])
  predictor = (predict_lib.Predictor(config, model, vocabs, mesh)
               if len(image_split) and pretraining.objective(config) == "supervised" else None)

  def run_eval(step):
    t0 = time.perf_counter()
    logging.info("Evaluating %d validation videos at step %d%s.", len(val_split), step,
                 "" if writer.evaluated else " (the first evaluation compiles its programs)")
    evaluate_fn = (evaluate_lib.evaluate_reconstruction
                   if pretraining.objective(config) == "masked_video"
                   else evaluate_lib.evaluate_split)
    metrics = evaluate_fn(config, model, state.params, val_split, vocabs, mesh,
                          max_batches=tr.get("eval_max_batches", 0))
    scalars = {f"val_{k}": v for k, v in metrics.items() if np.isscalar(v)}
    writer.write_scalars(step, {k[len("val_"):]: v for k, v in scalars.items()}, prefix="val/")
    if predictor is not None:
      writer.write_images(step, predict_lib.validation_images(
          predictor, state.params, image_split, config))
    seconds = time.perf_counter() - t0
    writer.exclude(seconds)
    writer.evaluated = True
    writer.write_scalars(step, {"eval_seconds": seconds}, prefix="perf/")
    logging.info("eval @ %d (%.1f s): %s", step, seconds,
                 " ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
    return scalars

  # ----- loop ----------------------------------------------------------------------------
  writer = MetricWriter(os.path.join(workdir, "tensorboard"), total_steps)
  writer.write_config(config)
  compiled = set()  # Merging ratios whose train step has been compiled.
  stop = _StopSignal(ckpt.manager)
  nonfinite = _NonfiniteGuard(config)
  eval_scalars, step = {}, start_step
  pending = []
  logging.info("Training steps %d -> %d.", start_step, total_steps)
  profiler = perf_lib.Profiler.from_config(config, workdir)
  peak = perf_lib.peak_flops(dtype=model_lib.compute_dtype(config), config=config)
  step_flops = 0.0
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.flax_logical_rules()):
      writer.steps_per_second(step)
      t_data = 0.0
      while step < total_steps:
        t0 = time.perf_counter()
        batch = sharding.global_batch(next(train_iter), mesh)
        t_data += time.perf_counter() - t0
        ratio, merge_weights = merging_controls(config, step)
        if ratio not in steps_by_ratio:  # A new curriculum stage: compile its step once.
          config_r = with_compression_ratio(config, ratio)
          steps_by_ratio[ratio] = make_train_step(
              config_r, run_lib.build_model(config_r), run.tx, run.schedule,
              run.state_shardings, mesh)
        if ratio not in compiled:
          logging.info("Compiling the train step%s ...", f" (merging ratio {ratio})"
                       if merge_weights is not None else "")
          t_compile = time.perf_counter()
          # Compiled before the call: the same executable runs and reports its FLOPs. A warm
          # start reads the traced program from the trace cache instead of tracing the model.
          # On the abstract state: a fresh run's initial state may still be loading.
          args = (abstract_state, batch, train_rng, merge_weights)
          describe = _trace_description(with_compression_ratio(config, ratio), total_steps)
          loading, compiled_step = step_ahead.pop() if step_ahead else None, None
          if loading is not None and loading.matches(args, describe):
            t_lowered = time.perf_counter()
            compiled_step = loading.result()  # None if the entry turned out unreadable.
          from_background = compiled_step is not None
          if compiled_step is None:
            lowered = trace_cache.lower("train_step", steps_by_ratio[ratio], args,
                                        describe=describe, directory=trace_dir,
                                        donate_argnums=(0,))
            t_lowered = time.perf_counter()
            compiled_step = lowered.compile()
          steps_by_ratio[ratio] = compiled_step
          profiler.save_program(compiled_step, "train_step" if merge_weights is None
                                else f"train_step_ratio{ratio:g}")
          t_compiled = time.perf_counter()
          if state is None:  # The background thread's initialiser, run once.
            state = initial.result()(rng)
          t_state = time.perf_counter()
          # Counted while the first step runs (parsing the program takes ~0.3 s).
          counting = ahead_lib.in_background(perf_lib.train_step_flops, steps_by_ratio[ratio],
                                             config, config.data.batch_size)
          wait_for_all_processes(f"train_step_compiled_{ratio}")
        profiler.step(step)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, metrics = steps_by_ratio[ratio](state, batch, train_rng, merge_weights)
        if ratio not in compiled:
          jax.block_until_ready(metrics)
          seconds = time.perf_counter() - t_compile
          step_flops, flops_source = counting.result()
          compiled.add(ratio)
          writer.exclude(seconds)
          writer.write_scalars(step + 1, {"compile_seconds": seconds}, prefix="perf/")
          # The first run is paid with warm caches too; tracing is replaced by reading the
          # trace cache, compilation by loading the executable from the compilation cache.
          logging.info("Train step compiled and run once in %.1f s (traced or read from the "
                       "trace cache %.1f s, compiled or loaded from the cache %.1f s, waiting "
                       "for the initial state %.1f s, first step %.1f s)%s; %.3g FLOPs per step "
                       "(%s count); peak per device: %s.", seconds, t_lowered - t_compile,
                       t_compiled - t_lowered, t_state - t_compiled,
                       t_compile + seconds - t_state,
                       "" if not from_background else ", its executable read and loaded by a "
                       "background thread since the start (waited for here)",
                       step_flops,
                       flops_source,
                       f"{peak:.3g} FLOP/s" if peak else
                       "unknown (set training.peak_flops for perf/mfu)")
        if merge_weights is not None:
          metrics = dict(metrics, compression_ratio=ratio, saliency_on=merge_weights[1])
        step += 1
        pending.append(metrics)
        if step % tr.log_every_steps == 0 or step == total_steps:
          window = {k: np.asarray([jax.device_get(m[k]) for m in pending]) for k in pending[-1]}
          pending = []
          bad = window.pop("nonfinite") > 0
          nonfinite.update(bad, step, ckpt)
          summary = {k: float(np.mean(v[~bad])) if (~bad).any() else float("nan")
                     for k, v in window.items()}
          summary["nonfinite_steps"] = nonfinite.total
          rate = writer.steps_per_second(step)
          summary["steps_per_second"] = rate
          summary["clips_per_second"] = rate * config.data.batch_size
          summary["data_wait_fraction"] = t_data * rate / tr.log_every_steps if rate else 0.0
          summary["clips_per_second_per_device"] = summary["clips_per_second"] / mesh.size
          achieved = step_flops * rate / mesh.size  # Model FLOP/s per device.
          summary["model_tflops_per_second_per_device"] = achieved / 1e12
          if peak:
            summary["mfu"] = achieved / peak
          t_data = 0.0
          writer.write_train(step, summary)
          writer.log_progress(step, summary, rate)
        eval_now = tr.eval_every_steps > 0 and (step % tr.eval_every_steps == 0
                                                or step == total_steps)
        if eval_now:
          eval_scalars = run_eval(step)
        stopping = stop.reached(step) or step == stop_at_step
        if step % tr.checkpoint_every_steps == 0 or step == total_steps or stopping:
          t_save = time.perf_counter()
          try:
            ckpt.save(step, state, train_iter, config,
                      metrics=eval_scalars if eval_now else None, force=True)
          except CheckpointNonFiniteError as e:
            raise TrainingError(f"{e} Training stopped; the checkpoints in {ckpt.directory} "
                                f"(steps {ckpt.all_steps()}) are all finite.") from None
          writer.exclude(time.perf_counter() - t_save)
          logging.info("Checkpoint of step %d saving to %s.", step, ckpt.directory)
        if stopping:
          logging.info("Stopped at step %d with a checkpoint; rerun to continue.", step)
          break
  finally:
    profiler.close()
    ckpt.close()
    writer.close()
    stop.restore()
  if step < total_steps:  # Stopped early: no final_metrics.json, so it does not look finished.
    if stop.requested:
      raise TrainingStopped(step, ckpt.directory)
    return eval_scalars
  if is_main:
    _write_json(os.path.join(workdir, "final_metrics.json"), dict(step=step, **eval_scalars))
    logging.info("Done at step %d. Results in %s: checkpoints/, final_metrics.json, "
                 "tensorboard/ (tensorboard --logdir %s); predict with python -m "
                 "hvlm_jax.predict --workdir=%s VIDEO.mp4", step, workdir,
                 os.path.join(workdir, "tensorboard"), workdir)
  return eval_scalars


def load_or_build_vocabularies(train_split, workdir: str, config):
  """Vocabularies of this run: built from the training split once, then reloaded, so a
  resumed run or an evaluation maps words and labels exactly as training did."""
  path = os.path.join(workdir, "vocabularies.json")
  if os.path.exists(path):
    return run_lib.load_vocabularies(workdir)
  vocabs = data_lib.Vocabularies.build(train_split, config)
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    vocabs.save(tmp)
    os.replace(tmp, path)
  return vocabs


def wait_for_all_processes(name: str, timeout_s: int = 3600):
  """A barrier of the coordination service (no collective): a process that compiled sooner
  waits here, not in the first collective, whose Gloo setup on CPU gives up after 30 s."""
  if jax.process_count() > 1:
    from jax._src import distributed  # The client jax.distributed.initialize started.
    distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)


def sync_processes(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _write_json(path: str, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(tmp, path)
