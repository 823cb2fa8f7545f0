"""Config files, `:key=value` arguments, overrides, layered validation, derived attention
options, the package layering and each entry point's --help."""
import os
import subprocess
import sys

import pytest

from hvlm_jax import config as config_lib
from hvlm_jax import run as run_lib
from hvlm_jax.models import attention as attention_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, arg=None):
  module = config_lib.import_sibling(os.path.join(ROOT, "configs", name), name)
  return module.get_config(arg)


def test_demo_config_arguments_reach_their_keys():
  config = load("demo.py", "attention=performer,merging=true")
  assert config.model.attention.type == "performer"
  assert config.model.token_merging.enabled is True
  assert config.data.name == "synthetic"
  run_lib.validate(config, 8)


def test_base_config_validates():
  run_lib.validate(load("base.py"), 8)


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
    run_lib.validate(config, 8)
  config = load("demo.py")
  config.data.video.num_frames = 15
  with pytest.raises(config_lib.ConfigError, match="num_frames=15"):
    run_lib.validate(config, 8)
  config = load("demo.py")
  config.model.num_attention_heads = 3
  with pytest.raises(config_lib.ConfigError, match="not divisible"):
    run_lib.validate(config, 8)


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


# ----- layered validation: a bad key fails naming it, before any data is read -----------------
BAD_KEYS = [
    ("training.finetune", "lroa"),
    ("training.domain_balancing", "sprots=2"),
    ("training.learning_rate", float("nan")),
    ("training.learning_rate", -1.0),
    ("training.loss_weights.video_qa", float("inf")),
    ("training.remat_policy", "everything"),
    ("training.best_mode", "maximum"),
    ("training.log_every_steps", 0),
    ("training.profile_steps", "10"),
    ("training.peak_flops", -1.0),
    ("data.input", "vidoe"),
    ("data.name", "foldr"),
    ("data.batch_size", 0),
    ("data.eval_batch_size", -2),
    ("data.video.min_window", 0.0),
    ("data.augment.min_crop_scale", 1.5),
    ("data.domains", ("sports", "sports")),
    ("model.attention.type", "flash"),
    ("model.attention.mamba.scan_method", "paralel"),
    ("model.attention.full.implementation", "flash"),
    ("model.attention.local_global.global_tokens", "frames"),
    ("model.attention.hierarchical.pool_sizes", ("frame/x",)),
    ("model.attention.strided.stride", -4),
    ("model.attention.cross_memory.memory_source", "pool"),
    ("model.motion_input", ("flow", "optical")),
    ("model.scan_layers", "yes"),
    ("model.stem", "convolution"),
    ("model.stem_norm", "batch"),
    ("model.stem_width", -8),
    ("model.stem_width", 2),
    ("model.stem_depth", 0),
    ("model.stem_fold", 3),
    ("model.position_embedding", "learned"),
    ("model.qkv_bias", "qk"),
    ("model.layer_norm_epsilon", 0.0),
    ("model.gelu", "relu"),
    ("model.pooling", "max"),
    ("model.pooling", "cls"),  # Without model.cls_token.
    ("model.pool_norm_epsilon", -1e-5),
    ("model.pixel_mean", (0.5, 0.5)),
    ("model.pixel_std", (0.2, 0.0, 0.2)),
    ("model.pixel_channel_order", "rbg"),
    ("model.heads.classification_pooling", "encoder"),  # With model.pooling="none".
    ("model.tubelet_size", (2, 8, 4)),
    ("model.dtype", "float64"),
    ("model.dropout_rate", 1.5),
    ("model.domain_modules.lora.targets", ("query", "vlaue")),
    ("model.domain_modules.router.mode", "soft_top"),
    ("model.domain_modules.num_domains", 3),
    ("model.heads.tasks", ("captions",)),
    ("model.heads.detection.loss", "hinge"),
    ("model.heads.classification_pooling", "max"),
    ("model.token_merging.target_compression_ratio", 1.2),
    ("model.streaming.memory_capacity", 0),
    ("mesh.data", 3),
    ("mesh.fsdp", -1),
    ("mesh.tensor", 0),
]


@pytest.mark.parametrize("key, value", BAD_KEYS, ids=[k for k, _ in BAD_KEYS])
def test_bad_key_fails_naming_it_before_any_data_is_read(tmp_path, key, value):
  from hvlm_jax.train.trainer import train_and_evaluate
  config = load("demo.py", "merging=true")
  config.data.name, config.data.dir = "folder", str(tmp_path / "no_data_here")
  if key == "mesh.fsdp":
    config.mesh.data = -1  # Two -1 sizes.
  config_lib.apply_overrides(config, {key: value})
  leaf = key.rsplit(".", 1)[-1]
  with pytest.raises(config_lib.ConfigError, match=leaf) as error:
    train_and_evaluate(config, str(tmp_path / "run"))
  assert len(str(error.value).splitlines()) == 1
  assert not (tmp_path / "run").exists()  # Nothing written either.


def test_mesh_that_does_not_divide_the_devices_names_config_mesh():
  config = load("demo.py")
  config.mesh.data = 3
  with pytest.raises(config_lib.ConfigError, match=r"config.mesh=.*8 are available"):
    run_lib.validate(config, 8)
  config.mesh.data, config.data.batch_size = -1, 12
  with pytest.raises(config_lib.ConfigError, match="batch_size=12"):
    run_lib.validate(config, 8)


def test_misaligned_explicit_window_is_allowed_but_warned(caplog):
  config = load("demo.py", "attention=local_global")
  config.model.tubelet_size = (2, 8, 8)  # 64 tokens a frame.
  config.model.attention.local_global.window = 48
  run_lib.validate(config, 8)
  assert "not aligned with the 64 tokens of a frame" in caplog.text


# ----- derived attention options -------------------------------------------------------------
FRAME_TYPES = sorted(attention_lib.FRAME_OPTIONS)


@pytest.mark.parametrize("attention", FRAME_TYPES)
def test_demo_attention_options_resolve_to_one_frame_of_its_grid(attention):
  config = load("demo.py", f"attention={attention}")
  _, per_frame = run_lib.token_grid(config)
  patch = config.model.tubelet_size[1]
  assert per_frame == (config.data.video.frame_size // patch) ** 2
  options = dict(config.model.attention[attention])
  # One frame of the grid (a quarter of it for hierarchical's pools): 16 at 64 px with 16 px
  # patches, 64 with 8 px patches.
  for n in (per_frame, 64):
    resolved = attention_lib.resolve_frame_options(attention, options, n)
    expected = {"strided": dict(stride=n), "cross_memory": dict(pool_size=n),
                "local_global": dict(window=n, tokens_per_frame=n),
                "hierarchical": dict(window=n, pool_sizes=(n // 4,))}[attention]
    assert {k: resolved[k] for k in expected} == expected
  # At base resolution (224 px, 16 px patches) the same config keys mean 196.
  base = dict(load("base.py").model.attention[attention])
  assert all(v == 196 for k, v in attention_lib.resolve_frame_options(
      attention, base, 196).items() if k in ("stride", "window", "tokens_per_frame",
                                               "pool_size"))


def test_encoder_resolves_frame_options_per_block_from_the_tokens_it_sees():
  import jax
  import jax.numpy as jnp
  from hvlm_jax.models.encoder import VideoEncoder
  def encoder(stride):
    return VideoEncoder(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
                        tubelet_size=(2, 8, 8), attention_type="strided",
                        attention_options=(("local", True), ("stride", stride)))
  clip = jax.random.uniform(jax.random.key(0), (1, 4, 24, 24, 3))
  variables = encoder(0).init(jax.random.key(1), clip)
  out = encoder(0).apply(variables, clip)["tokens"]
  ref = encoder(9).apply(variables, clip)["tokens"]  # 9 = (24 / 8)^2 tokens per frame.
  assert jnp.allclose(out, ref, atol=1e-6)
  wrong = encoder(4).apply(variables, clip)["tokens"]
  assert not jnp.allclose(out, wrong, atol=1e-3)


# ----- layering and command lines ------------------------------------------------------------
@pytest.mark.parametrize("package, forbidden", [
    ("hvlm_jax.eval.evaluate", "hvlm_jax.train"),
    ("hvlm_jax.eval.predict", "hvlm_jax.train"),
    ("hvlm_jax.models.streaming_loss", "hvlm_jax.data"),
    ("hvlm_jax.models.model", "hvlm_jax.data"),
    ("hvlm_jax.run", "hvlm_jax.train"),
    ("hvlm_jax.run", "hvlm_jax.eval"),
    ("hvlm_jax.config", "hvlm_jax.models"),
])
def test_package_layering(package, forbidden):
  code = (f"import sys, {package}; bad = sorted(m for m in sys.modules if m == {forbidden!r} "
          f"or m.startswith({forbidden!r} + '.')); print(bad); sys.exit(1 if bad else 0)")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, f"{package} imports {result.stdout.strip()}"


@pytest.mark.parametrize("command, own, foreign", [
    ("train", ["--config", "--workdir"], ["--split", "--step"]),
    ("evaluate", ["--workdir", "--split", "--step"], []),
    ("predict", ["--workdir", "--step", "--question", "--out"], ["--split"]),
])
def test_help_lists_the_commands_own_flags(command, own, foreign):
  result = subprocess.run([sys.executable, "-m", f"hvlm_jax.{command}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  text = result.stdout + result.stderr
  assert all(f"{flag}:" in text for flag in own), text
  assert not any(f"{flag}:" in text for flag in foreign), text


def test_run_config_overrides_keep_types_and_refuse_unknown_keys(tmp_path):
  import json
  config = load("demo.py")
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
  loaded, changed = run_lib.load_run_config(
      str(tmp_path), {"data.eval_batch_size": "4", "data.dir": "/elsewhere"})
  assert loaded.data.eval_batch_size == 4 and loaded.data.dir == "/elsewhere"
  assert changed == {"data.eval_batch_size": 4, "data.dir": "/elsewhere"}
  assert loaded.model.tubelet_size == tuple(config.model.tubelet_size)
  with pytest.raises(config_lib.ConfigError, match="model.attention.type: 'full' -> 'perf"):
    run_lib.load_run_config(str(tmp_path), {"model.attention.type": "performer"})
  with pytest.raises(config_lib.ConfigError, match="datta"):
    run_lib.load_run_config(str(tmp_path), {"datta.dir": "x"})
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(config_lib.ConfigError, match="config.json is not valid JSON"):
    run_lib.load_run_config(str(tmp_path))
