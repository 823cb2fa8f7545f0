"""Command-line entry points. Flags only; the work is in train/trainer.py and eval/evaluate.py.

A mistake a user can make (a wrong config key, a missing data folder, a malformed annotation,
a missing checkpoint) ends the program with one line naming the file, entry or key, and exit
status 2; unexpected errors keep their traceback.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (`path.py[:args]`).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, results).")
_STEP = flags.DEFINE_string("step", "latest", "evaluate: checkpoint step, 'latest' or 'best'.")
_SPLIT = flags.DEFINE_string("split", "test", "evaluate: split to score.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0. On TPU pods and SLURM "
    "leave it unset and pass --multihost; JAX finds the cluster itself.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize().")

# Errors that are the user's to fix: print their message, not a traceback.
def _user_errors():
  from hvlm_jax.config import ConfigError
  from hvlm_jax.data import AnnotationError, VideoError
  from hvlm_jax.data.synthetic import DatasetError
  from hvlm_jax.checkpoint import CheckpointMismatchError, CheckpointNotFoundError
  from hvlm_jax.train.trainer import TrainingError
  return (ConfigError, AnnotationError, VideoError, DatasetError, FileNotFoundError,
          CheckpointNotFoundError, CheckpointMismatchError, TrainingError)


def _quiet_libraries(record: logging.LogRecord) -> bool:
  """Keeps INFO lines of this project; libraries (orbax, grain, jax) speak from WARNING up."""
  return record.levelno >= logging.WARNING or "hvlm_jax" in record.pathname


def _initialize_distributed():
  import jax
  if _COORDINATOR.value or _MULTIHOST.value:
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)


def _main(command: str):
  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
      raise app.UsageError("Both --config and --workdir are required.")
    logging.getLogger().setLevel(logging.INFO)
    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
      handler.addFilter(_quiet_libraries)
    _initialize_distributed()
    try:
      if command == "train":
        from hvlm_jax.train.trainer import train_and_evaluate
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
      else:
        from hvlm_jax.eval.evaluate import evaluate_checkpoint
        evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, step=_STEP.value,
                            split=_SPLIT.value)
    except _user_errors() as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  return main


def _check_config_args(argv: list[str]):
  """Loads the --config file once before absl does, so that a missing file or a bad
  `:key=value` argument is one line instead of absl's FATAL block with a traceback."""
  from hvlm_jax.config import ConfigError, import_sibling
  for i, arg in enumerate(argv):
    value = arg.partition("=")[2] if arg.startswith("--config=") else (
        argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if value is None:
      continue
    path, _, config_arg = value.partition(":")
    if not os.path.isfile(path):
      _fail(f"Config file {path!r} (from --config) does not exist.")
    try:
      module = import_sibling(os.path.abspath(path), os.path.basename(path))
      module.get_config(config_arg or None)
    except ConfigError as e:
      _fail(f"{path}: {e}")


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run_main(command: str):
  _check_config_args(sys.argv)
  try:
    app.run(_main(command))
  except (KeyError, AttributeError) as e:
    # ml_collections raises these while absl parses a --config.a.b override naming no key.
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    if not overrides:
      raise
    hint = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
    _fail(f"A --config override names an unknown key ({hint}); overrides given: "
          f"{' '.join(overrides)}.")
