"""The sharded trainer: mesh equivalence, sharding rules, loss goes down, exact resume,
mesh-changing and params-only restore, corrupt-checkpoint fallback, event files."""
import glob
import logging
import os

import jax
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from hvlm_jax import config as config_lib
from hvlm_jax import data as data_lib
from hvlm_jax import run as run_lib
from hvlm_jax import sharding
from hvlm_jax.models import model as model_lib
from hvlm_jax.train import ahead as ahead_lib
from hvlm_jax.train import trainer
from hvlm_jax.checkpoint import Checkpointer
from hvlm_jax.train.metric_writer import read_scalars
import data_testutil


def train_config(**training):
  module = config_lib.import_sibling(__file__, "tiny_train_config.py")
  config = module.get_config(f"data_dir={data_testutil.dataset_dir()}")
  for k, v in training.items():
    config.training[k] = v
  return config


@pytest.fixture(scope="module")
def setup():
  config = train_config()
  split = data_lib.load_split(config, "training")
  vocabs = data_lib.Vocabularies.build(split, config)
  config = run_lib.fill_from_vocabularies(config, vocabs)
  it = data_lib.make_train_iterator(config, split, vocabs, seed=0)
  batches = [next(it) for _ in range(3)]
  example = {k: v[:4] for k, v in batches[0].items()}
  return config, batches, example


def run_steps(config, batches, example, mesh, steps=None):
  t = trainer.build_training(config, mesh, example, total_steps=10, rng=jax.random.key(0))
  state, losses = t.state, []
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.flax_logical_rules()):
    for b in (batches if steps is None else [batches[0]] * steps):
      state, metrics = t.train_step(state, sharding.global_batch(b, mesh), jax.random.key(1),
                                    None)
      losses.append(float(metrics["loss"]))
  return t, state, losses


def mesh_of(data, fsdp, tensor, devices=None):
  return sharding.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor), devices)


@pytest.fixture(scope="module")
def single_and_sharded(setup):
  config, batches, example = setup
  single = run_steps(config, batches, example, mesh_of(1, 1, 1, jax.devices()[:1]))
  sharded = run_steps(config, batches, example, mesh_of(2, 2, 2))
  return single, sharded


def test_mesh_2x2x2_gives_the_same_losses_and_params_as_one_device(single_and_sharded):
  (_, s1, l1), (_, s8, l8) = single_and_sharded
  np.testing.assert_allclose(l1, l8, rtol=2e-4)
  # Adam divides by sqrt(v): where a gradient is ~0, reduction-order noise can change an
  # update by up to ~lr, so parameters agree to a fraction of the learning rate (3e-3).
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=5e-4)


def test_parameters_are_sharded_as_the_rules_say(single_and_sharded):
  _, (_, s8, _) = single_and_sharded
  mlp_in = s8.params["encoder"]["block_0"]["mlp"]["mlp_in"]["kernel"]  # (embed, mlp)
  assert mlp_in.sharding.spec == P("fsdp", "tensor")
  assert mlp_in.addressable_shards[0].data.shape == (16, 32)
  mlp_out = s8.params["encoder"]["block_0"]["mlp"]["mlp_out"]["kernel"]  # (mlp, embed)
  assert mlp_out.sharding.spec == P("tensor", "fsdp")
  # Adam moments follow their parameter.
  mu = [x for x in jax.tree.leaves(s8.opt_state) if getattr(x, "shape", None) == (32, 64)]
  assert mu and all(x.sharding.spec == P("fsdp", "tensor") for x in mu)


def test_logical_rules_replicate_axes_the_mesh_does_not_divide():
  mesh = mesh_of(2, 2, 2)
  assert sharding.logical_to_spec(("embed", "mlp"), (5, 5), mesh) == P(None, None)
  assert sharding.logical_to_spec(("embed", "mlp"), (8, 6), mesh) == P("fsdp", "tensor")


def test_training_lowers_the_loss_on_a_repeated_batch(setup):
  config, batches, example = setup
  _, _, losses = run_steps(config, batches, example, mesh_of(1, 1, 1, jax.devices()[:1]),
                           steps=12)
  assert losses[-1] < 0.8 * losses[0], losses


def test_checkpoint_restores_onto_another_mesh_and_back(single_and_sharded, tmp_path):
  (t1, s1, _), (t8, s8, _) = single_and_sharded
  ckpt = Checkpointer(str(tmp_path / "a"), async_save=False)
  ckpt.save(3, s8, force=True)
  on_one = ckpt.restore(3, t1.abstract_state)
  for a, b in zip(jax.tree.leaves(on_one.params), jax.tree.leaves(s8.params)):
    assert len(a.sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(on_one.step) == 3
  ckpt = Checkpointer(str(tmp_path / "b"), async_save=False)
  ckpt.save(3, s1, force=True)
  params = ckpt.restore_params(3, t8.abstract_state.params)  # Params only, onto 8 devices.
  kernel = params["encoder"]["block_0"]["mlp"]["mlp_in"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "tensor")
  np.testing.assert_array_equal(np.asarray(kernel),
                                np.asarray(s1.params["encoder"]["block_0"]["mlp"]["mlp_in"]["kernel"]))


def test_truncated_latest_checkpoint_falls_back_to_the_previous(single_and_sharded, tmp_path,
                                                                caplog):
  (t1, s1, _), _ = single_and_sharded
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, s1, force=True)
  ckpt.save(2, s1.replace(step=s1.step + 1), force=True)
  for f in glob.glob(str(tmp_path / "checkpoints" / "2" / "params" / "**" / "*"),
                     recursive=True):
    if os.path.isfile(f) and os.path.getsize(f) > 0:
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  with caplog.at_level(logging.WARNING):
    state, step = ckpt.restore_latest_valid(t1.abstract_state)
  assert step == 1 and int(state.step) == int(s1.step)
  assert "could not be restored" in caplog.text
  assert os.path.isdir(tmp_path / "checkpoints" / "2")  # Kept, never deleted.


def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
  # Three starts of one config: the trace cache (its own directory here) makes the second and
  # third trace no model code at all, and load their first train step in a background thread;
  # the bitwise checks below then cover these programs too.
  traces = tmp_path / "traces"
  monkeypatch.setattr(run_lib, "trace_cache_dir", lambda config, cache_dir: str(traces))
  counts = {"abstract_params": 0, "compute_losses": 0}
  for module, name in ((run_lib, "abstract_params"), (model_lib, "compute_losses")):
    def counting(*a, _real=getattr(module, name), _name=name, **k):
      counts[_name] += 1
      return _real(*a, **k)
    monkeypatch.setattr(module, name, counting)
  loaded_ahead = []  # Starts whose first train step came from the background thread.
  monkeypatch.setattr(ahead_lib.StepAhead, "result", lambda self, _real=ahead_lib.StepAhead.result:
                      loaded_ahead.append(1) or _real(self))

  config = train_config()
  config.mesh.data, config.mesh.tensor = 4, 2
  trainer.train_and_evaluate(config, str(tmp_path / "straight"))
  first = dict(counts)
  trainer.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=2)
  assert Checkpointer(str(tmp_path / "resumed")).all_steps() == [2]
  trainer.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert first["abstract_params"] >= 1 and first["compute_losses"] >= 1 and counts == first
  assert len(loaded_ahead) == 2  # The second and third starts, predicted right.
  assert sorted(p.name.split("-")[0] for p in traces.iterdir()) == ["init_state", "train_step"]

  straight = Checkpointer(str(tmp_path / "straight"), read_only=True)
  resumed = Checkpointer(str(tmp_path / "resumed"), read_only=True)
  assert straight.all_steps()[-1] == resumed.all_steps()[-1] == 4
  p_a = straight.manager.restore(4, args=_params_only())["params"]
  p_b = resumed.manager.restore(4, args=_params_only())["params"]
  for a, b in zip(jax.tree.leaves(p_a), jax.tree.leaves(p_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The same data order: the iterator states saved at step 4 are identical.
  state_a = _iterator_state(tmp_path / "straight")
  state_b = _iterator_state(tmp_path / "resumed")
  assert state_a == state_b and state_a
  # Event files read back and hold the logged scalars for every step.
  scalars = read_scalars(str(tmp_path / "straight" / "tensorboard"))
  assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
  assert "train/learning_rate" in scalars and "train/grad_norm" in scalars


def _params_only():
  import orbax.checkpoint as ocp
  return ocp.args.Composite(params=ocp.args.StandardRestore())


def _iterator_state(workdir):
  files = sorted(glob.glob(str(workdir / "checkpoints" / "4" / "data" / "*")))
  return [open(f).read() for f in files if os.path.isfile(f) and "commit_success" not in f]


def test_merging_curriculum_and_progressive_switches():
  config = train_config(compression_warmup_steps=90, compression_stages=3,
                        saliency_start_step=50)
  config.model.token_merging.enabled = True
  config.model.token_merging.target_compression_ratio = 0.6
  controls = {s: trainer.merging_controls(config, s) for s in (0, 29, 30, 60, 89, 90, 500)}
  assert [controls[s][0] for s in (0, 29, 30, 60, 89, 90, 500)] == [0.2, 0.2, 0.4, 0.6, 0.6,
                                                                     0.6, 0.6]
  assert controls[0][1].tolist() == [1.0, 0.0] and controls[60][1].tolist() == [1.0, 1.0]
  config.model.token_merging.enabled = False
  assert trainer.merging_controls(config, 10) == (0.0, None)


def test_lora_finetuning_freezes_the_base_and_keeps_no_state_for_it(setup):
  config, batches, example = setup
  config = config.copy_and_resolve_references()
  config.model.domain_modules.lora.enabled = True
  config.training.finetune = "lora"
  _, state, _ = run_steps(config, batches, example, mesh_of(1, 1, 1, jax.devices()[:1]),
                          steps=2)
  fresh = trainer.build_training(config, mesh_of(1, 1, 1, jax.devices()[:1]), example, 10,
                                 jax.random.key(0)).state
  query = lambda s: s.params["encoder"]["block_0"]["attention"]["qkv"]["query"]
  np.testing.assert_array_equal(query(state)["kernel"], query(fresh)["kernel"])
  assert np.abs(np.asarray(query(state)["lora_b"])).max() > 0  # Adapters trained.
  assert np.abs(np.asarray(query(fresh)["lora_b"])).max() == 0
  encoder = sum(x.size for x in jax.tree.leaves(state.params["encoder"]))
  trained = sum(x.size for k, v in state.params.items() if k != "encoder"
                for x in jax.tree.leaves(v))
  adapters = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
                 if "lora" in jax.tree_util.keystr(p))
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  # Adam keeps two moments for the heads and the adapters, none for the frozen encoder.
  assert moments == 2 * (trained + adapters), (moments, trained, adapters, encoder)


def test_weight_decay_applies_to_weight_matrices_only():
  from hvlm_jax.train.state import weight_decay_mask
  params = {"block": {"attn": {"kernel": 1, "bias": 1}, "ln": {"scale": 1, "bias": 1},
                      "lora": {"lora_a": 1, "lora_b": 1}, "mamba": {"A_log": 1, "D": 1,
                                                                     "conv_kernel": 1}},
            "time_position": 1, "embed": {"embedding": 1}, "pool": {"probe": 1}}
  mask = weight_decay_mask(params)
  assert mask["block"]["attn"] == {"kernel": True, "bias": False}
  assert mask["block"]["lora"] == {"lora_a": True, "lora_b": True}
  assert mask["block"]["mamba"] == {"A_log": False, "D": False, "conv_kernel": True}
  assert not any([mask["time_position"], mask["embed"]["embedding"], mask["pool"]["probe"],
                  mask["block"]["ln"]["scale"]])
