"""The full model: one jit train step per registered attention type, every head and domain
module together, predict consistent with the training outputs, the router choosing the LoRA
adapter at inference, and compute_losses' masking and weighting against hand computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import base
from hvlm_jax.models import attention, heads
from hvlm_jax.models import model as model_lib

B, T, S, C, V, A = 2, 4, 16, 5, 20, 7


def tiny_config(tasks=("classification", "action_detection"), attention_type="full"):
  config = base.get_config(f"attention={attention_type},runlocal=true")
  m = config.model
  m.hidden_size, m.num_layers, m.num_attention_heads, m.mlp_dim = 32, 1, 2, 64
  m.tubelet_size = (2, 8, 8)
  h = m.heads
  h.tasks, h.num_classes, h.vocab_size, h.num_answers = tasks, C, V, A
  h.qa.num_layers = h.captioning.num_layers = 1
  h.captioning.max_length = 6
  h.detection.num_layers = 1
  return config


def tiny_batch(seed=0):
  rng = np.random.default_rng(seed)
  targets = np.zeros((B, T // 2, C), np.float32)
  targets[0, 0, 1] = targets[1, 1, 3] = 1
  return dict(
      video=rng.integers(0, 255, (B, T, S, S, 3)).astype(np.uint8),
      domain=np.array([0, 2], np.int32), valid=np.ones(B, bool),
      label=np.array([1, 3], np.int32), label_mask=np.array([True, True]),
      action_targets=targets, action_offsets=targets[..., :2] * 0.7,
      action_mask=np.array([True, True]), step_times=np.array([[0.5, 1.5]] * B, np.float32),
      step_duration=np.ones(B, np.float32), duration=np.full(B, 2.0, np.float32),
      questions=rng.integers(1, V, (B, 2, 5)).astype(np.int32),
      answers=rng.integers(0, A, (B, 2)).astype(np.int32),
      qa_mask=np.array([[True, False], [True, True]]),
      caption_tokens=np.array([[2, 5, 6, 3, 0, 0], [2, 7, 3, 0, 0, 0]], np.int32),
      caption_mask=np.array([True, True]))


def init(model, batch):
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), batch))


def loss_and_grad(model, config):
  def loss_fn(params, batch):
    out = model.apply({"params": params}, batch, train=True,
                      rngs={"dropout": jax.random.key(1), "features": jax.random.key(2)})
    return model_lib.compute_losses(out, batch, config)
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


@pytest.mark.parametrize("attention_type", sorted(attention.REGISTRY))
def test_one_jit_train_step_for_every_attention_type(attention_type):
  config = tiny_config(attention_type=attention_type)
  config.model.domain_modules.lora.enabled = True
  model, batch = model_lib.build_model(config), tiny_batch()
  params = init(model, batch)["params"]
  step = loss_and_grad(model, config)
  (loss, metrics), grads = step(params, batch)
  assert np.isfinite(float(loss))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  attn = grads["encoder"]["block_0"]
  assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(attn))) > 0
  # The gradient is a descent direction: a small step along it lowers the loss.
  params2 = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)
  (loss2, _), _ = step(params2, batch)
  assert float(loss2) < float(loss)


def test_all_heads_with_lora_experts_and_router_train_and_predict():
  config = tiny_config(tasks=model_lib.TASKS)
  dm = config.model.domain_modules
  dm.lora.enabled, dm.experts.enabled, dm.router.mode = True, True, "top_k"
  dm.router.top_k = 2
  config.model.token_merging.enabled = True  # merged tokens: size-weighted heads
  model, batch = model_lib.build_model(config), tiny_batch()
  variables = init(model, batch)
  (loss, metrics), grads = loss_and_grad(model, config)(variables["params"], batch)
  w = config.training.loss_weights
  expected = (w.classification * metrics["classification_loss"] +
              w.action_detection * metrics["action_detection_loss"] +
              w.video_qa * metrics["video_qa_loss"] + w.captioning * metrics["captioning_loss"] +
              w.router * metrics["router_ce_loss"])
  assert float(loss) == pytest.approx(float(expected), rel=1e-6)
  for name in ("domain_router", "domain_experts", "qa_head", "caption_head", "detection_head"):
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads[name]))) > 0, name

  out = jax.jit(lambda v, b: model.apply(v, b))(variables, batch)
  pred = jax.jit(lambda v, b: model.apply(v, b, method=model_lib.HierarchicalVLM.predict))(
      variables, batch)
  np.testing.assert_array_equal(pred["qa_answer"], out["qa_logits"].argmax(-1))
  np.testing.assert_allclose(pred["classification_logits"], out["classification"], rtol=1e-5)
  ref = heads.decode_detections(out["detection_logits"], out["detection_offsets"],
                                batch["step_times"], batch["step_duration"], batch["duration"],
                                max_detections=config.model.heads.detection.max_detections)
  for k in ("start", "end", "label", "score", "valid"):
    np.testing.assert_allclose(pred[f"detection_{k}"], ref[k], rtol=1e-5)
  assert pred["caption_tokens"].shape == (B, 6) and pred["caption_tokens"].dtype == jnp.int32
  assert set(np.unique(pred["caption_tokens"])) <= set(range(V))


def test_router_picks_the_lora_adapter_at_inference():
  config = tiny_config(tasks=("classification",))
  dm = config.model.domain_modules
  dm.lora.enabled, dm.router.enabled = True, True
  batch = tiny_batch()
  model = model_lib.build_model(config)
  params = init(model, batch)["params"]
  params["domain_router"]["logits"]["bias"] = jnp.array([0.0, 0.0, 5.0, 0.0])  # argmax 2
  keys = iter(jax.random.split(jax.random.key(3), 32))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.random.normal(next(keys), x.shape) if p[-1].key == "lora_b" else x,
      params)
  dm.use_router_for_lora = True
  routed = model_lib.build_model(config).apply({"params": params}, batch)
  assert np.asarray(routed["domain"]).tolist() == [2, 2]
  labelled = model.apply({"params": params}, dict(batch, domain=np.array([2, 2], np.int32)))
  np.testing.assert_allclose(routed["time_features"], labelled["time_features"], rtol=1e-5)
  other = model.apply({"params": params}, batch)  # labels [0, 2]: example 0 differs
  assert float(jnp.abs(other["time_features"][0] - labelled["time_features"][0]).max()) > 1e-3


def test_compute_losses_masks_absent_tasks_and_weights_them():
  config = tiny_config(tasks=model_lib.TASKS)
  rng = np.random.default_rng(0)
  batch = tiny_batch()
  outputs = dict(classification=rng.normal(size=(B, C)),
                 detection_logits=rng.normal(size=(B, T // 2, C)),
                 detection_offsets=rng.uniform(0.1, 1, (B, T // 2, 2)),
                 qa_logits=rng.normal(size=(B, 2, A)),
                 caption_logits=rng.normal(size=(B, 5, V)))
  outputs = {k: jnp.asarray(v, jnp.float32) for k, v in outputs.items()}
  batch.update(label_mask=np.array([True, False]), action_mask=np.array([False, True]),
               caption_mask=np.array([False, True]))
  total, m = model_lib.compute_losses(outputs, batch, config)
  cls, _ = heads.classification_loss(outputs["classification"][:1], batch["label"][:1],
                                     np.array([True]))
  assert float(m["classification_loss"]) == pytest.approx(float(cls), rel=1e-6)
  # Corrupting the targets of absent tasks changes nothing: they are masked, not faked.
  targets = batch["action_targets"].copy()
  targets[0] = 1.0
  corrupt = dict(batch, label=np.array([1, 0], np.int32), action_targets=targets,
                 answers=np.where(batch["qa_mask"], batch["answers"], 0),
                 caption_tokens=np.array([[2, 9, 9, 9, 3, 0], [2, 7, 3, 0, 0, 0]], np.int32))
  total2, m2 = model_lib.compute_losses(outputs, corrupt, config)
  assert float(total2) == pytest.approx(float(total), rel=1e-6)
  # Padding examples (valid False) count in no task.
  pad = dict(batch, valid=np.array([True, False]))
  _, m3 = model_lib.compute_losses(outputs, pad, config)
  assert float(m3["captioning_loss"]) == 0.0 and float(m3["action_detection_loss"]) == 0.0
  qa, _ = heads.qa_loss(outputs["qa_logits"][:1], batch["answers"][:1], batch["qa_mask"][:1])
  assert float(m3["video_qa_loss"]) == pytest.approx(float(qa), rel=1e-6)
  w = config.training.loss_weights
  assert float(total) == pytest.approx(sum(
      float(w[t] * m[f"{t}_loss"]) for t in model_lib.TASKS), rel=1e-6)


def test_unknown_task_is_a_config_error():
  config = tiny_config(tasks=("classification", "segmentation"))
  with pytest.raises(Exception, match="config.model.heads.tasks"):
    model_lib.build_model(config)


def test_router_loss_is_supervised_or_load_balancing():
  config = tiny_config(tasks=("classification",))
  logits = jnp.log(jnp.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1]]))
  outputs = dict(classification=jnp.zeros((B, C)), router_logits=logits)
  batch = tiny_batch()
  w = config.training.loss_weights
  total, m = model_lib.compute_losses(outputs, batch, config)
  ce = -(np.log(0.7) + np.log(0.1)) / 2  # domains [0, 2]
  assert float(total) == pytest.approx(w.classification * np.log(C) + w.router * ce, rel=1e-5)
  config.model.domain_modules.router.supervised = False
  total, m = model_lib.compute_losses(outputs, batch, config)
  assert "router_ce_loss" not in m
  balance = 4 * (0.5 * 0.45 + 0.5 * 0.35)  # Switch: E * sum_i f_i P_i
  assert float(total) == pytest.approx(w.classification * np.log(C) +
                                       w.router_balance * balance, rel=1e-5)


def test_attention_dropout_rate_reaches_the_attention_or_is_refused():
  config = base.get_config("runlocal=true")
  config.model.attention_dropout_rate = 0.1
  options = dict(model_lib.attention_options(config.model))
  assert options["dropout_rate"] == 0.1
  config.model.attention.type = "linear"
  with pytest.raises(model_lib.ConfigError, match="attention_dropout_rate"):
    model_lib.attention_options(config.model)
  config.model.attention_dropout_rate = 0.0
  assert "dropout_rate" not in dict(model_lib.attention_options(config.model))
