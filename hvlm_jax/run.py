"""The run setup every entry point shares (train, evaluate, predict): one config, one model.

    config = run.load_run_config(workdir, overrides)   # evaluate / predict: the run's own config
    run.validate(config, jax.device_count())            # every key, before any data is read
    model = run.build_model(config)
    abstract, shardings = run.abstract_params(model, example, mesh)
    params = run.restore_params(checkpointer, step, model, example, mesh)

The trainer writes `WORKDIR/config.json` (the config with the data-dependent head sizes
filled in) and `WORKDIR/vocabularies.json`; after training they are the source of truth:
evaluation and prediction start from them and apply only explicit overrides, logged.
Layering (docs/design.md): config.py (leaf) <- models, data <- sharding, checkpoint, run <-
train, eval, predict. This module imports neither train/ nor eval/.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from hvlm_jax import data as data_lib
from hvlm_jax import pretrained
from hvlm_jax import sharding
from hvlm_jax.checkpoint import CheckpointMismatchError, Checkpointer, abstract_with_shardings
from hvlm_jax.config import ConfigError, apply_overrides, get_value
from hvlm_jax.data import validation as data_validation
from hvlm_jax.models import attention as attention_lib
from hvlm_jax.models import model as model_lib
from hvlm_jax.models import pretraining
from hvlm_jax.models import streaming
from hvlm_jax.models.token_merging import MergingSpec, merge_schedule

# Keys that change the data a run reads; overriding them at evaluation is allowed but stated.
DATA_SOURCE_KEYS = ("data.name", "data.dir", "data.input", "data.cache_dir")
# training.finetune -> which parameters train (names of hvlm_jax.models.domain.lora modes).
FINETUNE_MODES = ("full", "lora", "lora_only")
# training.resume: "auto" continues the workdir's run and refuses a config that changes its
# parameters; "new_run" moves such a run aside (previous_runs/) and starts over.
RESUME_MODES = ("auto", "new_run")
# training.nonfinite: a NaN/Inf loss or gradient norm skips the update ("skip", counted; an
# error after training.max_nonfinite_steps in a row) or stops training at once ("stop").
NONFINITE_MODES = ("skip", "stop")
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


# ----- validation ------------------------------------------------------------------------------
def token_grid(config) -> tuple[int, int]:
  """(time steps T', tokens per frame P) of the encoder's token grid for this config."""
  t, p, q = config.model.tubelet_size
  frames, size = config.data.video.num_frames, config.data.video.frame_size
  if config.data.get("input", "video") == "features":
    return frames, 1
  return frames // t, (size // p) * (size // q)


def validate(config, num_devices: int, *, training: bool = True) -> None:
  """Every component checks its own keys; the first mistake is one ConfigError naming the key
  and the allowed values. Call before touching data or devices. `training=False` (evaluate,
  predict) skips the checks of the training batch against the mesh."""
  _positive(config, "model.hidden_size", "model.num_layers", "model.num_attention_heads",
            "model.mlp_dim")
  steps, per_frame = token_grid(config)
  attention_lib.validate_config(config.model.attention, per_frame)
  model_lib.check_model_config(config.model)
  model_lib.check_encoder_config(config.model, config.data.video)
  spec = MergingSpec.from_config(config.model.token_merging)
  if spec is not None:
    merge_schedule(steps * per_frame, config.model.num_layers, spec.target_compression_ratio,
                   spec.schedule, spec.protect_fraction)
  streaming.streaming_options(config.model)
  if pretraining.objective(config) == "masked_video":
    pretraining.options(config)
    if streaming.trains_with_memory(config) or config.data.input == "features":
      raise ConfigError("config.training.objective='masked_video' reconstructs pixels of "
                        "clips: it needs config.data.input 'video' or 'cache' and "
                        "config.model.streaming.train_segments=0.")
  data_validation.validate_config(config)
  if config.model.domain_modules.num_domains != len(config.data.domains):
    raise ConfigError(f"config.model.domain_modules.num_domains="
                      f"{config.model.domain_modules.num_domains} must equal the number of "
                      f"config.data.domains ({len(config.data.domains)}).")
  _validate_training(config)
  mesh = sharding.mesh_sizes(config.mesh, num_devices)
  data_parallel = mesh["data"] * mesh["fsdp"]
  if training and config.data.batch_size % data_parallel:
    raise ConfigError(f"config.data.batch_size={config.data.batch_size} is not divisible by "
                      f"the data-parallel mesh size data*fsdp={data_parallel}.")


def _positive(config, *keys: str):
  for key in keys:
    value = get_value(config, key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
      raise ConfigError(f"config.{key}={value!r} must be a positive number.")


def _validate_training(config) -> None:
  tr = config.training
  if tr.num_steps < 0 or tr.num_epochs < 0 or (tr.num_steps <= 0 and tr.num_epochs <= 0):
    raise ConfigError("Set config.training.num_steps or config.training.num_epochs above 0 "
                      f"(got {tr.num_steps} and {tr.num_epochs}).")
  lr = tr.learning_rate
  if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
    raise ConfigError(f"config.training.learning_rate={lr!r} must be a finite number > 0.")
  for key in ("weight_decay", "gradient_clip", "warmup_steps"):
    value = tr[key]
    if not math.isfinite(value) or value < 0:
      raise ConfigError(f"config.training.{key}={value!r} must be a finite number >= 0.")
  for task, w in tr.loss_weights.items():
    if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
      raise ConfigError(f"config.training.loss_weights.{task}={w!r} must be a finite "
                        "number >= 0.")
  if tr.mixed_precision not in (True, False):
    raise ConfigError("config.training.mixed_precision must be true or false.")
  if tr.remat_policy not in REMAT_POLICIES:
    raise ConfigError(f"config.training.remat_policy={tr.remat_policy!r} is not one of "
                      f"{', '.join(REMAT_POLICIES)}.")
  if (tr.get("finetune", "full") or "full") not in FINETUNE_MODES:
    raise ConfigError(f"config.training.finetune={tr.finetune!r} is not one of "
                      f"{', '.join(FINETUNE_MODES)}.")
  if tr.best_mode not in ("min", "max"):
    raise ConfigError(f"config.training.best_mode={tr.best_mode!r} is not min or max.")
  for key, allowed in (("resume", RESUME_MODES), ("nonfinite", NONFINITE_MODES)):
    if tr.get(key, allowed[0]) not in allowed:
      raise ConfigError(f"config.training.{key}={tr[key]!r} is not one of "
                        f"{', '.join(allowed)}.")
  limit = tr.get("max_nonfinite_steps", 1)
  if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
    raise ConfigError(f"config.training.max_nonfinite_steps={limit!r} must be an integer >= 1.")
  for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
              "gradient_accumulation_steps", "compression_stages"):
    if tr[key] < 1:
      raise ConfigError(f"config.training.{key}={tr[key]} must be >= 1.")
  peak = tr.get("peak_flops", 0.0)
  if not isinstance(peak, (int, float)) or not math.isfinite(peak) or peak < 0:
    raise ConfigError(f"config.training.peak_flops={peak!r} must be a finite number >= 0.")
  profile = str(tr.get("profile_steps", "") or "").replace("-", ",")
  bounds = [b.strip() for b in profile.split(",")] if profile else []
  if profile and (len(bounds) != 2 or not all(b.isdigit() for b in bounds)
                  or int(bounds[0]) > int(bounds[1])):
    raise ConfigError(f"config.training.profile_steps={tr.profile_steps!r} must be "
                      "'start,end' with 0 <= start <= end (or empty).")
  for key in ("eval_every_steps", "eval_max_batches", "eval_images", "keep_best_checkpoints",
              "compression_warmup_steps", "saliency_start_step"):
    if tr.get(key, 0) < 0:  # .get: a run's config.json from before a key existed.
      raise ConfigError(f"config.training.{key}={tr[key]} must be >= 0.")


INFERENCE_MESH = dict(data=-1, fsdp=1, tensor=1)


# ----- the run's config ------------------------------------------------------------------------
def config_path(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "config.json")


def load_run_config(workdir: str, overrides: dict[str, Any] | None = None,
                    ) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """The config a run trained with (`WORKDIR/config.json`) plus explicit `overrides`
  (dotted key -> value or command-line text). Returns (config, {overridden key: its value}),
  and logs each override; overriding where the data comes from is stated as such.

  Raises:
    FileNotFoundError: when `workdir` is not a training run directory.
    ConfigError: for a config.json that does not parse, or an unknown override key.
  """
  path = config_path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run directory "
                            "(it holds config.json, vocabularies.json and checkpoints).")
  try:
    with open(path) as f:
      config = ml_collections.ConfigDict(_tuples(json.load(f)))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path} is not valid JSON ({e}); it was written by the trainer, "
                      "restore it from a backup or retrain.") from None
  overrides = dict(overrides or {})
  saved = config.to_dict()
  apply_overrides(config, overrides, source=f"Override of {path}")
  # The checkpoint's parameters mean what the run's config says: an override that would
  # change their shapes or meaning (e.g. model.attention.type) would score another model.
  meaning = run_config_differences(saved, config)
  if meaning:
    raise ConfigError(f"Override(s) of {path} would change what the run's parameters mean "
                      f"({'; '.join(meaning)}); evaluate or predict with the run's own model "
                      "keys (train a new run for another model).")
  changed = {}
  for key in overrides:
    value = get_value(config, key)
    changed[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
    kind = "data source " if key in DATA_SOURCE_KEYS else ""
    logging.info("Run config %s: %soverride %s=%r.", path, kind, key, changed[key])
  return config, changed


def _tuples(obj):
  """JSON lists back to the tuples config files use (ml_collections checks types)."""
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return tuple(_tuples(v) for v in obj)
  return obj


def load_vocabularies(workdir: str) -> data_lib.Vocabularies:
  path = os.path.join(os.path.abspath(workdir), "vocabularies.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a training run directory "
                            "(it holds the vocabularies and checkpoints).")
  try:
    return data_lib.Vocabularies.load(path)
  except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError too.
    raise ConfigError(f"{path} is corrupt ({type(e).__name__}: {e}); it was written by the "
                      "trainer from the training split, restore it or retrain.") from None


def require_videos(split_data) -> None:
  """A split with no usable video is one sentence, not an empty iterator further on."""
  if not split_data.entries:
    no_file = len(split_data.skipped.get("no_video", ()))
    raise data_lib.AnnotationError(
        f"{split_data.root} has no video to use: " + (
            f"none of its {no_file} annotated videos has a file in its videos folder."
            if no_file else "its annotation lists are empty."))


def fill_from_vocabularies(config, vocabs) -> ml_collections.ConfigDict:
  """A copy of `config` with the data-dependent sizes (classes, words, answers) of the heads."""
  config = ml_collections.ConfigDict(config.to_dict())
  heads = config.model.heads
  with config.ignore_type():
    heads.num_classes = vocabs.num_actions
    heads.vocab_size = vocabs.num_words
    heads.num_answers = vocabs.num_answers
  return config


# ----- one run per workdir ---------------------------------------------------------------------
# The keys that decide a run's parameters (their shapes or their meaning): all of `model`
# except the ones below, the training objective (and its decoder), and the data keys that shape
# inputs and vocabularies.
RUN_KEYS = ("training.objective", "data.input", "data.features_dim", "data.domains", "data.answer_vocab_size",
                 "data.min_word_count", "data.caption_length", "data.question_length",
                 "data.max_segments", "data.max_questions", "data.video.num_frames",
                 "data.video.frame_size")
# Regularisation, compute dtype, kernel choice and evaluation-time streaming leave the
# parameters as they are; head sizes follow the run's own vocabularies.json.
_FREE_MODEL_LEAVES = ("dropout", "dropout_rate", "attention_dropout_rate", "dtype",
                      "implementation")
_FREE_MODEL_KEYS = ("model.heads.num_classes", "model.heads.vocab_size",
                    "model.heads.num_answers", "model.streaming.enabled",
                    "model.streaming.auto_threshold", "model.streaming.truncation",
                    "model.streaming.remat_segments", "model.scan_layers")
# What a run leaves in its workdir: moved together to previous_runs/ by training.resume=new_run.
RUN_FILES = ("config.json", "vocabularies.json", "checkpoints", "tensorboard", "eval",
             "quarantine", "final_metrics.json", "init_report.json", "parameters.txt")


def _flat(tree, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = json.loads(json.dumps(v, default=str))  # Tuples -> lists.
  return out


def run_config_differences(saved: dict, config) -> list[str]:
  """'key: saved -> new' for each key that decides the parameters and differs."""
  old, new = _flat(saved), _flat(config.to_dict())
  def decides(key):
    if key.startswith("model."):
      return key not in _FREE_MODEL_KEYS and key.rsplit(".", 1)[-1] not in _FREE_MODEL_LEAVES
    return key in RUN_KEYS or key.startswith("training.masked_video.")
  # A key only one side has came or went with a code change; its default was in force.
  keys = sorted(k for k in set(old) & set(new) if decides(k) and old[k] != new[k])
  return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in keys]


def check_workdir(config, workdir: str) -> None:
  """A workdir belongs to one run: refuses a config that would change the parameters of the
  run in `workdir` (its config.json), touching nothing; with `training.resume=new_run` the old
  run's files are moved to WORKDIR/previous_runs/<time>/ (never deleted) instead.

  Raises:
    ConfigError: `workdir` is a file, or the configs differ without resume=new_run (the
      sentence lists the differing keys).
  """
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} is a file, not a run directory.")
  path = config_path(workdir)
  if not os.path.exists(path):
    return
  new_run = config.training.get("resume", "auto") == "new_run"
  try:
    with open(path) as f:
      differences = run_config_differences(json.load(f), config)
  except (ValueError, AttributeError, OSError) as e:
    if not new_run:
      raise ConfigError(f"{path} does not read as the run's config ({type(e).__name__}: {e}); "
                        "pass --config.training.resume=new_run to move that run aside and "
                        "start over.") from None
    differences = [f"{path} unreadable"]
  if not differences:
    return
  if not new_run:
    shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more"
                                          if len(differences) > 6 else "")
    raise ConfigError(
        f"{workdir} holds a run with another config ({shown}); resume it with its own config "
        "(WORKDIR/config.json), choose a new --workdir, or pass "
        "--config.training.resume=new_run to move that run aside and start over.")
  move_run_aside(workdir, reason="; ".join(differences))


def move_run_aside(workdir: str, reason: str = "") -> str:
  """Renames the run files of `workdir` (RUN_FILES) into WORKDIR/previous_runs/<time>/."""
  target = os.path.join(workdir, "previous_runs", time.strftime("%Y%m%d-%H%M%S"))
  if jax.process_index() == 0:
    while os.path.exists(target):
      target += "_"
    os.makedirs(target)
    for name in RUN_FILES:
      if os.path.lexists(os.path.join(workdir, name)):
        os.rename(os.path.join(workdir, name), os.path.join(target, name))
    logging.warning("training.resume=new_run: the previous run of %s moved to %s (%s).",
                    workdir, target, reason)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("move_run_aside")
  return target


# ----- model and parameters --------------------------------------------------------------------
def build_model(config) -> model_lib.HierarchicalVLM:
  """The model of a config: a StreamingVLM when streaming is on (it is HierarchicalVLM on
  clips), else HierarchicalVLM."""
  if pretraining.objective(config) == "masked_video":
    return pretraining.build_model(config)
  return streaming.build_model(config)


def init_fn(model, example: dict):
  """rng -> boxed parameters (with logical axis names): the one `model.init` of the project."""
  def init(rng):
    params_rng, dropout_rng, features_rng = jax.random.split(rng, 3)
    return model.init({"params": params_rng, "dropout": dropout_rng, "features": features_rng},
                      example, train=False)["params"]
  return init


def abstract_params(model, example: dict, mesh) -> tuple[Any, Any]:
  """(abstract parameters whose leaves carry their shardings on `mesh`, the shardings)."""
  init = init_fn(model, example)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.flax_logical_rules()):
    boxed = jax.eval_shape(init, jax.random.key(0))  # One trace of the model (~0.5 s).
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  abstract = jax.tree.map(lambda x: x.value if is_box(x) else x, boxed, is_leaf=is_box)
  shardings = sharding.tree_shardings(boxed, mesh)
  return abstract_with_shardings(abstract, shardings), shardings


def init_params(model, example: dict, mesh, rng):
  """Fresh parameters, initialised straight into their shardings (never whole on one device)."""
  init = init_fn(model, example)
  _, shardings = abstract_params(model, example, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.flax_logical_rules()):
    return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)


def restore_params(ckpt: Checkpointer, step: int, model, example: dict, mesh):
  """Parameters of checkpoint `step` placed on `mesh`. A checkpoint of a clip model restored
  into a StreamingVLM gets a fresh memory reader (gate 0: outputs equal the clip model's)."""
  target, _ = abstract_params(model, example, mesh)
  try:
    return ckpt.restore_params(step, target)
  except CheckpointMismatchError:
    if "memory_reader" not in target:
      raise
  params = ckpt.restore_params(step, {k: v for k, v in target.items() if k != "memory_reader"})
  fresh = init_params(model, example, mesh, jax.random.key(0))
  return streaming.add_memory_params(params, {"memory_reader": fresh["memory_reader"]})


HF_PREFIX = "hf:"  # config.init_from="hf:/path/to/dir": a Hugging Face checkpoint directory.


def hf_init_source(config) -> str | None:
  """The checkpoint directory of `config.init_from="hf:DIR"`, else None."""
  source = str(config.get("init_from", "") or "")
  if not source.startswith(HF_PREFIX):
    return None
  return os.path.abspath(os.path.expanduser(source[len(HF_PREFIX):]))


def apply_init_from_architecture(config, explicit_keys=()):
  """With `init_from="hf:DIR"`: `config` with the encoder architecture keys of DIR's
  config.json (each replacement logged); a key in `explicit_keys` (set on the command line)
  that contradicts the checkpoint raises PretrainedError naming both values. Else `config`."""
  path = hf_init_source(config)
  if path is None:
    return config
  return pretrained.apply_hf_architecture(config, path, set(explicit_keys))


def check_init_from(config) -> None:
  """With `init_from="hf:DIR"`: every tensor the configured encoder needs is in DIR with its
  shape and the files are whole (PretrainedError naming the file and tensor otherwise),
  checked from the file headers on abstract parameters, so a bad checkpoint fails before the
  run writes anything."""
  path = hf_init_source(config)
  if path is None:
    return
  encoder = model_lib.build_encoder(ml_collections.FrozenConfigDict(config.model),
                                    token_merging=None)
  video = config.data.video
  shape = ((1, video.num_frames, config.data.features_dim)
           if config.data.get("input", "video") == "features"
           else (1, video.num_frames, video.frame_size, video.frame_size, 3))
  abstract = jax.eval_shape(lambda r, x: nn.meta.unbox(encoder.init(r, x))["params"],
                            jax.random.key(0), jax.ShapeDtypeStruct(shape, np.float32))
  pretrained.load_hf_params(path, {"encoder": abstract}, None, config, check_only=True)


def init_from(source: str, params, abstract, *, config=None):
  """`config.init_from`: parameters from another run's checkpoint (`WORKDIR` or
  `WORKDIR:STEP`, e.g. a masked-video pretraining run) where path and shape match; the rest
  keep their fresh initialisation. Only the matching tensors are read, each straight into its
  sharding. Returns (params, report) with the tensors loaded, kept fresh and ignored.

  `hf:DIR` (needs `config`, whose architecture keys apply_init_from_architecture set): the
  encoder from a Hugging Face checkpoint directory (hvlm_jax.pretrained.load_hf_params, each
  tensor read straight into its sharding, position tables interpolated to the clip's grid);
  the report lists loaded, interpolated, ignored and newly_initialised."""
  if source.startswith(HF_PREFIX):
    if config is None:
      raise ValueError("init_from('hf:...') needs the run's config.")
    return pretrained.load_hf_params(hf_init_source(dict(init_from=source)), params,
                                     abstract, config)
  path, _, step = source.partition(":")
  ckpt = Checkpointer(path, read_only=True, async_save=False)
  step = ckpt.resolve(step or "latest")
  stored = ckpt.manager.item_metadata(step)["params"]
  stored = flax.traverse_util.flatten_dict(getattr(stored, "tree", stored))
  ours = flax.traverse_util.flatten_dict(abstract)
  replicated = NamedSharding(next(iter(ours.values())).sharding.mesh, P())
  matched = {k for k, v in stored.items() if k in ours and tuple(v.shape) == ours[k].shape}
  target = {k: ours[k] if k in matched else
            jax.ShapeDtypeStruct(tuple(v.shape), v.dtype, sharding=replicated)
            for k, v in stored.items()}
  restored = flax.traverse_util.flatten_dict(
      ckpt.restore_params(step, flax.traverse_util.unflatten_dict(target)))
  fresh = flax.traverse_util.flatten_dict(params)
  merged = {k: restored[k] if k in matched else v for k, v in fresh.items()}
  name = "/".join
  report = dict(source=source, step=int(step),
                loaded=sorted(name(k) for k in matched),
                initialised=sorted(name(k) for k in fresh if k not in matched),
                ignored=sorted(name(k) for k in stored if k not in matched))
  logging.info("init_from %s step %d: %d tensors loaded, %d initialised fresh, %d in the "
               "checkpoint ignored (all listed in init_report.json).", path, step,
               len(report["loaded"]), len(report["initialised"]), len(report["ignored"]))
  return flax.traverse_util.unflatten_dict(merged), report



# ----- compilation cache -----------------------------------------------------------------------
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "hvlm_jax", "jax")


def trace_cache_dir(config, cache_dir: str | None) -> str | None:
  """`<compilation cache>/traces` (hvlm_jax.trace_cache), or None when either cache is off
  (`config.trace_cache=False`)."""
  if cache_dir is None or not config.get("trace_cache", True):
    return None
  return os.path.join(cache_dir, "traces")


def enable_compilation_cache(config=None) -> str | None:
  """Turns on JAX's persistent compilation cache so a rerun skips compilation.

  `config.compilation_cache`: "default" (`$HVLM_COMPILATION_CACHE` if set, else
  ~/.cache/hvlm_jax/jax), a directory, or "off". Returns the directory, or None when off.
  """
  setting = str(config.get("compilation_cache", "default") if config is not None
                else "default").strip()
  if setting == "default":
    setting = os.environ.get("HVLM_COMPILATION_CACHE", DEFAULT_CACHE_DIR).strip()
  if setting.lower() in ("", "off", "none", "false"):  # In the config or the environment.
    return None
  directory = os.path.abspath(os.path.expanduser(setting))
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return directory
