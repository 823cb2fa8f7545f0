"""Config files, `:key=value` arguments, overrides and validation errors."""
import os
import subprocess
import sys

import pytest

from hvlm_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, arg=None):
  module = config_lib.import_sibling(os.path.join(ROOT, "configs", name), name)
  return module.get_config(arg)


def test_demo_config_arguments_reach_their_keys():
  config = load("demo.py", "attention=performer,merging=true")
  assert config.model.attention.type == "performer"
  assert config.model.token_merging.enabled is True
  assert config.data.name == "synthetic"
  config_lib.validate(config)


def test_base_config_validates():
  config_lib.validate(load("base.py"))


@pytest.mark.parametrize("arg, fragment", [
    ("atention=full", "Unknown config argument 'atention'"),
    ("frames=many", "'frames' must be a int"),
    ("merging=maybe", "'merging' must be true or false"),
    ("frames", "is not of the form key=value"),
])
def test_bad_config_argument_names_the_key(arg, fragment):
  with pytest.raises(config_lib.ConfigError, match=fragment):
    load("base.py", arg)


def test_parse_arg_keeps_types():
  args = config_lib.parse_arg("a=3,b=0.5,c=x,d=false", a=1, b=1.0, c="y", d=True)
  assert (args.a, args.b, args.c, args.d) == (3, 0.5, "x", False)
  assert isinstance(config_lib.parse_arg("b=2", b=1.0).b, float)


def test_validate_rejects_unknown_attention_and_bad_shapes():
  config = load("demo.py")
  config.model.attention.type = "nope"
  with pytest.raises(config_lib.ConfigError, match="config.model.attention.type"):
    config_lib.validate(config)
  config = load("demo.py")
  config.data.video.num_frames = 15
  with pytest.raises(config_lib.ConfigError, match="num_frames=15"):
    config_lib.validate(config)
  config = load("demo.py")
  config.model.num_attention_heads = 3
  with pytest.raises(config_lib.ConfigError, match="not divisible"):
    config_lib.validate(config)


@pytest.mark.parametrize("args, fragment", [
    (["--config=configs/demo.py", "--config.model.hiden_size=8"], "hidden_size"),
    (["--config=configs/demo.py", "--config.model.hidden_size=abc"], "hidden_size"),
    (["--config=configs/demo.py:atention=x"], "atention"),
    (["--config=configs/nope.py"], "nope.py"),
])
def test_command_line_errors_are_one_clear_line(tmp_path, args, fragment):
  result = subprocess.run(
      [sys.executable, "-m", "hvlm_jax.train", f"--workdir={tmp_path}", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert fragment in result.stderr
  assert "Traceback" not in result.stderr
