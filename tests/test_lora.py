"""Multi-domain LoRA: closed form, fresh == base, merged == unmerged, per-example adapters,
gradients only where they should train, and honest parameter counts."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from hvlm_jax.models.domain import lora as lora_lib
from hvlm_jax.models.domain.lora import LoRADense, LoRASpec
from hvlm_jax.models.encoder import VideoEncoder

ALL_TARGETS = ("query", "key", "value", "out", "mlp_in", "mlp_out")
B, T, F, D = 4, 6, 12, 32


def _encoder(lora):
  return VideoEncoder(hidden_size=D, num_layers=1, num_heads=4, mlp_dim=64, lora=lora)


def _randomise_adapters(params, seed=0):
  """Non-zero B (a fresh adapter is a no-op, so it would prove nothing)."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  def visit(path, x):
    if getattr(path[-1], "key", None) == "lora_b":
      return 0.3 * jax.random.normal(next(keys), x.shape, x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(visit, params)


@pytest.fixture(scope="module")
def setup():
  spec = LoRASpec(rank=4, alpha=8.0, num_domains=4, targets=ALL_TARGETS)
  x = jax.random.normal(jax.random.key(1), (B, T, F))
  params = nn.meta.unbox(_encoder(spec).init(jax.random.key(0), x, domain=jnp.zeros(B, int)))
  apply_lora = jax.jit(lambda p, x, d: _encoder(spec).apply(p, x, domain=d)["tokens"])
  apply_plain = jax.jit(lambda p, x: _encoder(None).apply(p, x)["tokens"])
  return spec, x, params, apply_lora, apply_plain


def test_lora_dense_matches_closed_form_per_domain():
  layer = LoRADense(5, rank=3, alpha=6.0, num_domains=3)
  x = jax.random.normal(jax.random.key(0), (3, 7, 4))
  domain = jnp.array([2, 0, 2])
  p = _randomise_adapters(nn.meta.unbox(layer.init(jax.random.key(1), x, domain)))["params"]
  y = layer.apply({"params": p}, x, domain)
  w, b, a, bb = (np.asarray(p[k], np.float64) for k in ("kernel", "bias", "lora_a", "lora_b"))
  xn = np.asarray(x, np.float64)
  for i, d in enumerate(domain.tolist()):
    ref = xn[i] @ w + b + (6.0 / 3) * (xn[i] @ a[d]) @ bb[d]
    np.testing.assert_allclose(y[i], ref, rtol=1e-5, atol=1e-5)


def test_fresh_adapter_equals_base_model(setup):
  spec, x, params, apply_lora, apply_plain = setup
  base = lora_lib.merge_lora(params, 0, alpha=spec.alpha)  # B = 0: merging drops nothing.
  # Equal up to the float reassociation of two differently fused programs.
  np.testing.assert_allclose(apply_lora(params, x, jnp.array([0, 1, 2, 3])),
                             apply_plain(base, x), rtol=1e-6, atol=1e-6)


def test_merged_equals_unmerged_for_every_domain(setup):
  spec, x, params, apply_lora, apply_plain = setup
  params = _randomise_adapters(params)
  outs = []
  for d in range(spec.num_domains):
    adapted = apply_lora(params, x, jnp.full((B,), d))
    merged = apply_plain(lora_lib.merge_lora(params, d, alpha=spec.alpha), x)
    np.testing.assert_allclose(merged, adapted, rtol=1e-4, atol=1e-4)
    outs.append(adapted)
  # The adapters are not no-ops, so the comparison above is not vacuous.
  assert float(jnp.abs(outs[0] - outs[1]).max()) > 1e-2


def test_each_example_gets_its_own_domain_adapter(setup):
  spec, x, params, apply_lora, apply_plain = setup
  params = _randomise_adapters(params, seed=1)
  domain = jnp.array([3, 0, 2, 0])
  mixed = apply_lora(params, x, domain)
  for i, d in enumerate(domain.tolist()):
    alone = apply_plain(lora_lib.merge_lora(params, d, alpha=spec.alpha), x[i:i + 1])
    np.testing.assert_allclose(mixed[i], alone[0], rtol=1e-4, atol=1e-4)


def test_unmerge_restores_the_adapted_parameters(setup):
  spec, _, params, _, _ = setup
  params = _randomise_adapters(params, seed=2)
  merged = lora_lib.merge_lora(params, 1, alpha=spec.alpha)
  restored = lora_lib.unmerge_lora(merged, lora_lib.lora_adapters(params), 1, alpha=spec.alpha)
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_merge_keeps_logical_axis_metadata():
  layer = LoRADense(5, rank=2, num_domains=2)
  boxed = layer.init(jax.random.key(0), jnp.ones((1, 3)), jnp.zeros(1, int))
  merged = lora_lib.merge_lora(boxed, 0)
  kernel = merged["params"]["kernel"]
  assert isinstance(kernel, nn.LogicallyPartitioned) and kernel.names == ("embed", "joined_kv")
  assert set(merged["params"]) == {"kernel", "bias"}


def test_lora_finetune_updates_only_adapters_of_present_domains(setup):
  spec, x, params, _, _ = setup
  params = _randomise_adapters(params, seed=3)
  domain = jnp.array([0, 2, 0, 2])
  model = _encoder(spec)

  def loss(p):
    return jnp.mean(model.apply(p, x, domain=domain)["time_features"] ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  tx = lora_lib.freeze_untrainable(optax.sgd(0.1), params, "lora")
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new, params)
  flat = {"/".join(str(k.key) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(changed)[0]}
  assert flat and not any(v for k, v in flat.items() if not k.endswith(("lora_a", "lora_b")))
  assert any(flat.values())
  # Domains 1 and 3 are absent from the batch: their adapters get exactly zero gradient.
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    if path[-1].key in ("lora_a", "lora_b"):
      assert not np.any(np.asarray(g)[[1, 3]]), path
      assert np.any(np.asarray(g)[[0, 2]]), path


def test_trainable_mask_modes():
  params = {"params": {"encoder": {"q": {"kernel": 1, "lora_a": 2, "lora_b": 3}},
                       "qa_head": {"kernel": 4}, "domain_router": {"kernel": 5}}}
  flat = lambda m: [v for _, v in sorted(  # noqa: E731
      ("/".join(str(k.key) for k in p), v)
      for p, v in jax.tree_util.tree_flatten_with_path(m)[0])]
  # Sorted paths: router kernel, encoder kernel, lora_a, lora_b, qa kernel.
  assert flat(lora_lib.trainable_mask(params, "all")) == [True] * 5
  assert flat(lora_lib.trainable_mask(params, "lora")) == [False, False, True, True, False]
  assert flat(lora_lib.trainable_mask(params, "lora_and_heads")) == [True, False, True, True,
                                                                    True]
  with pytest.raises(ValueError, match="trainable mode"):
    lora_lib.trainable_mask(params, "adapters")


def test_parameter_counts_match_closed_form(setup):
  spec, _, params, _, _ = setup
  summary = lora_lib.lora_parameter_summary(params, spec.num_domains)
  expected = lora_lib.lora_parameters_per_domain(1, D, 64, spec.rank, ALL_TARGETS)
  assert summary["lora_per_domain"] == expected == 4 * (4 * (D + D) + (D + 64) + (64 + D))


def test_vivit_base_rank8_query_value_is_295k_per_domain():
  """The honest figure: 12 layers x {q, v} x r (768 + 768), counted on the real encoder."""
  spec = LoRASpec(rank=8, alpha=16.0, num_domains=4, targets=("query", "value"))
  enc = VideoEncoder(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, lora=spec)
  shapes = jax.eval_shape(lambda: enc.init(jax.random.key(0), jnp.zeros((1, 8, 32)),
                                           domain=jnp.zeros(1, int)))
  summary = lora_lib.lora_parameter_summary(shapes, 4)
  assert summary["lora_per_domain"] == 294_912
  assert summary["lora_per_domain"] == lora_lib.lora_parameters_per_domain(
      12, 768, 3072, 8, ("query", "value"))
  assert 0.003 < summary["lora_fraction_per_domain"] < 0.0036  # of an ~85M-param backbone
