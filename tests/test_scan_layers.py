"""config.model.scan_layers: the encoder's blocks as one lax.scan over their stacked parameters
give the unrolled blocks' outputs and gradients with the same parameter tree, and the keys that
cannot be scanned are refused in one sentence naming the key."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import base
from hvlm_jax import run as run_lib
from hvlm_jax.config import ConfigError
from hvlm_jax.models import model as model_lib

LAYERS = 3


def encoder(attention_type="full", scan="true", remat=None, **model_keys):
  config = base.get_config(f"attention={attention_type},runlocal=true")
  m = config.model
  m.hidden_size, m.num_layers, m.num_attention_heads, m.mlp_dim = 32, LAYERS, 2, 64
  m.tubelet_size = (2, 8, 8)
  m.scan_layers = scan
  m.domain_modules.lora.enabled = True  # Per-domain adapters inside every block.
  for key, value in model_keys.items():
    m[key] = value
  return model_lib.build_encoder(config.model, remat_policy=remat)


def clip(seed=0):
  return np.random.default_rng(seed).uniform(0, 1, (2, 4, 16, 16, 3)).astype(np.float32)


def loss(enc, params, x, domain):
  out = enc.apply({"params": params}, x, domain=domain)
  return (out["tokens"] ** 2).mean() + (out["time_features"] ** 3).mean(), out["tokens"]


@pytest.mark.parametrize("attention_type,remat", [("full", None), ("local_global", None),
                                                  ("mamba", "nothing_saveable")])
def test_scanned_blocks_equal_the_unrolled_blocks(attention_type, remat):
  x, domain = clip(), jnp.array([0, 1], jnp.int32)
  scanned = encoder(attention_type, "true", remat)
  unrolled = encoder(attention_type, "false", remat)
  params = nn.meta.unbox(scanned.init(jax.random.key(0), x))["params"]
  fresh = nn.meta.unbox(unrolled.init(jax.random.key(0), x))["params"]
  # The same parameter tree, initialised to the same values: block_0 ... block_{L-1}.
  assert [f"block_{i}" in params for i in range(LAYERS)] == [True] * LAYERS
  jax.tree.map(np.testing.assert_array_equal, params, fresh)
  # LoRA's up-projections start at zero; give them values so their gradients are tested too.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = tree.unflatten([p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
                           for p, k in zip(leaves, keys)])
  grad = lambda enc: jax.jit(jax.value_and_grad(  # noqa: E731
      lambda p: loss(enc, p, x, domain), has_aux=True))(params)
  (value_s, tokens_s), grads_s = grad(scanned)
  (value_u, tokens_u), grads_u = grad(unrolled)
  np.testing.assert_allclose(tokens_s, tokens_u, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(value_s, value_u, rtol=1e-5)
  for i in range(LAYERS):  # Every block's gradients, each reaching its own parameters.
    block_s, block_u = grads_s[f"block_{i}"], grads_u[f"block_{i}"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
                 block_s, block_u)
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(block_s))) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               grads_s, grads_u)


def test_scan_is_one_loop_in_the_program_and_none_when_off():
  x = clip()
  hlo = {}
  for scan in ("true", "false"):
    enc = encoder("full", scan)
    params = nn.meta.unbox(enc.init(jax.random.key(0), x))["params"]
    f = jax.jit(jax.grad(lambda p, enc=enc: loss(enc, p, x, None)[0]))
    hlo[scan] = f.lower(params).compile().as_text()
  assert "while(" in hlo["true"] and "while(" not in hlo["false"]


def test_dropout_runs_with_a_key_per_layer():
  x = clip()
  enc = encoder("full", "true", dropout_rate=0.5)
  params = nn.meta.unbox(enc.init(jax.random.key(0), x))["params"]
  run = lambda key: enc.apply({"params": params}, x, deterministic=False,  # noqa: E731
                              rngs={"dropout": key})["tokens"]
  a, b = run(jax.random.key(1)), run(jax.random.key(2))
  assert bool(jnp.all(jnp.isfinite(a))) and not np.allclose(a, b)
  np.testing.assert_array_equal(a, run(jax.random.key(1)))


@pytest.mark.parametrize("keys,message", [
    (dict(scan_layers="yes"), "config.model.scan_layers='yes' must be 'auto', 'true' or 'false'."),
    (dict(scan_layers="True", attention_type="performer"),
     "config.model.scan_layers='true' cannot be used: performer attention keys"),
    (dict(scan_layers="true", merging=True),
     "config.model.scan_layers='true' cannot be used: token merging changes"),
])
def test_config_that_cannot_scan_is_one_sentence(keys, message):
  keys = dict(keys)
  config = base.get_config(f"attention={keys.pop('attention_type', 'full')},"
                           f"merging={keys.pop('merging', False)},runlocal=true")
  config.model.scan_layers = keys["scan_layers"]
  with pytest.raises(ConfigError) as error:
    run_lib.validate(config, 1)
  assert str(error.value).startswith(message)
  assert "\n" not in str(error.value)


def test_auto_runs_performer_unrolled():
  x = clip()
  auto, unrolled = encoder("performer", "auto"), encoder("performer", "false")
  params = nn.meta.unbox(auto.init(jax.random.key(0), x))["params"]
  tokens = lambda enc: jax.jit(lambda p: enc.apply({"params": p}, x)["tokens"])(params)  # noqa: E731
  np.testing.assert_array_equal(tokens(auto), tokens(unrolled))  # The same program.


def test_a_run_resumes_with_scan_layers_changed():
  """The parameters are the same either way: a workdir's run continues when only the scan
  setting changed (or its config.json predates the key)."""
  saved = base.get_config("runlocal=true")
  saved.model.scan_layers = "false"
  config = base.get_config("runlocal=true")
  assert run_lib.run_config_differences(saved.to_dict(), config) == []
  older = saved.to_dict()
  del older["model"]["scan_layers"]
  assert run_lib.run_config_differences(older, config) == []
  config.model.num_layers += 1  # A key that changes the parameters still counts.
  assert run_lib.run_config_differences(saved.to_dict(), config) == [
      f"model.num_layers: {saved.model.num_layers} -> {config.model.num_layers}"]


def test_the_module_refuses_a_required_scan_it_cannot_run():
  """Built without the config's validation (the API): the same sentence, from the module."""
  enc = encoder("performer", "true")
  with pytest.raises(ValueError, match=r"^config.model.scan_layers='true' cannot be used: "
                     r"performer attention keys"):
    enc.init(jax.random.key(0), clip())
