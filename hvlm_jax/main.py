"""Command-line entry points. Flags only; the work is in train/trainer.py and eval/evaluate.py.

    python -m hvlm_jax.train --config=configs/demo.py --workdir=runs/demo [--config.a.b=v ...]
    python -m hvlm_jax.evaluate --workdir=runs/demo [--split=test] [--step=latest|best|N]
        [--config.a.b=v ...]   # overrides on top of the run's own WORKDIR/config.json
    python -m hvlm_jax.predict --workdir=runs/demo [--step=best] VIDEO.mp4 [...]
        [--question="..."]...   # predictions.json and an HTML report per video

A mistake a user can make (a wrong config key, a missing data folder, a malformed annotation,
a missing checkpoint) ends the program with one line naming the file, entry or key, and exit
status 2; unexpected errors keep their traceback. Training stopped by SIGTERM before its last
step exits with 75 (EXIT_STOPPED). `--help` lists the command's own flags.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
# Exit status of training stopped by SIGTERM (preemption) before its last step, with a
# checkpoint of the step every process reached: EX_TEMPFAIL, "try again". A scheduler that
# restarts failed jobs resumes the run; 0 means the run is complete (final_metrics.json).
EXIT_STOPPED = 75


def _define_common_flags():
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, results).")
  flags.DEFINE_string(
      "coordinator_address", None, "Multi-host: host:port of process 0. On TPU pods and SLURM "
      "leave it unset and pass --multihost; JAX finds the cluster itself.")
  flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
  flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize().")
  return ["workdir", "coordinator_address", "num_processes", "process_id", "multihost"]


def _define_flags(command: str) -> list[str]:
  """Defines `command`'s flags; returns their names (the key flags its --help lists)."""
  names = _define_common_flags()
  if command == "train":
    config_flags.DEFINE_config_file(
        "config", None, "Config file (`path.py[:key=value,...]`); any key can be overridden "
        "with --config.a.b=value.", lock_config=True)
    return ["config"] + names
  flags.DEFINE_string("config", None, "Not needed: the run's WORKDIR/config.json is used. "
                      "Override a key of it with --config.a.b=value (e.g. --config.data.dir).")
  flags.DEFINE_string("step", "latest", "Checkpoint step: 'latest', 'best' or a number.")
  if command == "predict":
    flags.DEFINE_multi_string("question", [], "A question to ask about every video "
                              "(repeat the flag for several).")
    flags.DEFINE_string("out", None, "Parent folder of the new output folder (default: "
                        "WORKDIR/predictions).")
    flags.DEFINE_string("domain", "", "Domain the videos come from (one of the run's "
                        "config.data.domains; default 'general', or the router's pick).")
    return ["config", "step", "question", "out", "domain"] + names
  flags.DEFINE_string("split", "test", "Split to score (training, validation or test).")
  return ["config", "step", "split"] + names


# Errors that are the user's to fix: print their message, not a traceback.
def _user_errors():
  from hvlm_jax.checkpoint import (CheckpointCorruptError, CheckpointMismatchError,
                                   CheckpointNotFoundError)
  from hvlm_jax.config import ConfigError
  from hvlm_jax.data import AnnotationError, VideoError
  from hvlm_jax.data.synthetic import DatasetError
  from hvlm_jax.eval.predict import PredictionError
  from hvlm_jax.pretrained import PretrainedError
  from hvlm_jax.train.trainer import TrainingError
  return (ConfigError, AnnotationError, VideoError, DatasetError, FileNotFoundError,
          CheckpointNotFoundError, CheckpointMismatchError, CheckpointCorruptError,
          TrainingError, PredictionError, PretrainedError)


def _quiet_libraries(record: logging.LogRecord) -> bool:
  """Keeps INFO lines of this project; libraries (orbax, grain, jax) speak from WARNING up."""
  return record.levelno >= logging.WARNING or "hvlm_jax" in record.pathname


def _initialize_distributed():
  import jax
  if FLAGS.coordinator_address or FLAGS.multihost:
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)


def _main(command: str, overrides: dict[str, str]):
  def main(argv):
    if len(argv) > 1 and command != "predict":
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
      raise app.UsageError("--workdir is required.")
    if command == "train" and FLAGS.config is None:
      raise app.UsageError("--config is required.")
    logging.getLogger().setLevel(logging.INFO)
    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
      handler.addFilter(_quiet_libraries)
    _initialize_distributed()
    try:
      if command == "train":
        from hvlm_jax.train.trainer import TrainingStopped, train_and_evaluate
        try:
          from hvlm_jax.config import overridden_keys
          train_and_evaluate(FLAGS.config, FLAGS.workdir,
                             explicit_keys=overridden_keys(sys.argv))
        except TrainingStopped as e:
          print(f"stopped: {e}", file=sys.stderr)
          sys.exit(EXIT_STOPPED)
      else:
        if FLAGS.config:
          logging.warning("--config=%s is not used: %s reads the run's own "
                          "WORKDIR/config.json; override keys with --config.a.b=value.",
                          FLAGS.config, command)
        if command == "predict":
          from hvlm_jax.eval.predict import predict_videos
          predict_videos(FLAGS.workdir, argv[1:], questions=FLAGS.question, step=FLAGS.step,
                         out=FLAGS.out, domain=FLAGS.domain, overrides=overrides)
          return
        from hvlm_jax.eval.evaluate import evaluate_checkpoint
        evaluate_checkpoint(FLAGS.workdir, step=FLAGS.step, split=FLAGS.split,
                            overrides=overrides)
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
  """Entry point of `python -m hvlm_jax.train` (command "train") and `hvlm_jax.evaluate`."""
  from hvlm_jax.config import split_overrides
  for name in _define_flags(command):
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])
  overrides = {}
  if command == "train":
    _check_config_args(sys.argv)
  else:  # Overrides apply to the run's config.json, not to a config file: parse them here.
    sys.argv, overrides = split_overrides(sys.argv)
  try:
    app.run(_main(command, overrides))
  except (KeyError, AttributeError) as e:
    # ml_collections raises these while absl parses a --config.a.b override naming no key.
    given = [a for a in sys.argv[1:] if a.startswith("--config.")]
    if not given:
      raise
    hint = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
    _fail(f"A --config override names an unknown key ({hint}); overrides given: "
          f"{' '.join(given)}.")
