"""run.enable_compilation_cache: the config key and the environment variable decide where the
persistent compilation cache lives, and "off" in either turns it off."""
import os

import jax
import ml_collections
import pytest

from hvlm_jax import run as run_lib


@pytest.fixture
def restore_jax_cache_config():
  saved = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
  yield
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])


def _config(value):
  return ml_collections.ConfigDict(dict(compilation_cache=value))


@pytest.mark.parametrize("value", ["off", "OFF", "none", "false", ""])
def test_off_in_the_config_turns_the_cache_off(value, tmp_path, monkeypatch,
                                               restore_jax_cache_config):
  monkeypatch.chdir(tmp_path)
  assert run_lib.enable_compilation_cache(_config(value)) is None
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("value", ["off", " none "])
def test_off_in_the_environment_turns_the_default_off(value, tmp_path, monkeypatch,
                                                      restore_jax_cache_config):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HVLM_COMPILATION_CACHE", value)
  assert run_lib.enable_compilation_cache(_config("default")) is None
  assert run_lib.enable_compilation_cache(None) is None
  assert os.listdir(tmp_path) == []  # No directory named "off" was made.


def test_a_directory_from_the_config_or_the_environment_is_made_and_used(
    tmp_path, monkeypatch, restore_jax_cache_config):
  chosen = tmp_path / "from_config"
  assert run_lib.enable_compilation_cache(_config(str(chosen))) == str(chosen)
  assert chosen.is_dir() and jax.config.jax_compilation_cache_dir == str(chosen)
  monkeypatch.setenv("HVLM_COMPILATION_CACHE", str(tmp_path / "from_env"))
  assert run_lib.enable_compilation_cache(_config("default")) == str(tmp_path / "from_env")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "from_env")
