"""Merging wired into VideoEncoder: content adaptivity on hand-built clips, per-time-step
features against a naive pooling loop, runtime switches, features mode."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvlm_jax.config import ConfigError
from hvlm_jax.models.encoder import VideoEncoder
from hvlm_jax.models.token_merging import MergingSpec, merge_schedule

SMALL = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, tubelet_size=(2, 4, 4))
SPEC = MergingSpec(target_compression_ratio=0.25)
T, S = 8, 32  # 8 frames of 32 x 32: 4 steps x 8 x 8 = 256 tokens of (2, 4, 4).
LARGE, SMALL_BOX = (4, 28), (12, 20)  # Square objects: rows = cols = box[0]..box[1].


def texture(x, y, seed):
  r = np.random.RandomState(seed)
  out = np.zeros_like(x)
  for _ in range(16):
    k = 2 * np.pi / r.uniform(5, 20)
    th, ph = r.uniform(0, np.pi), r.uniform(0, 2 * np.pi)
    out += np.sin(k * (np.cos(th) * x + np.sin(th) * y) + ph)
  return 0.5 + 0.4 * out / np.abs(out).max()


def make_clip(box, pan=0.0, object_speed=0.0):
  """Textured background panning `pan` px / frame; a textured square moving object_speed."""
  ys, xs = np.mgrid[0:S, 0:S].astype(np.float64)
  frames = []
  for t in range(T):
    bg = texture(xs - pan * t, ys, seed=0)
    obj = texture(xs - object_speed * t, ys, seed=1)
    x0 = box[0] + int(round(object_speed * t))
    inside = (ys >= box[0]) & (ys < box[1]) & (xs >= x0) & (xs < x0 + box[1] - box[0])
    gray = np.where(inside, obj, bg)
    frames.append(np.stack([gray, np.where(inside, 0.2, gray), np.where(inside, 0.9, gray)], -1))
  return np.round(np.stack(frames) * 255).astype(np.uint8)


def object_positions(box, stop=None):
  """Grid positions (time-major) of tokens covering rows box and columns box[0]..stop."""
  stop = box[1] if stop is None else stop
  mask = np.zeros((4, 8, 8), bool)
  mask[:, box[0] // 4:-(-box[1] // 4), box[0] // 4:-(-stop // 4)] = True
  return mask.reshape(-1)


@pytest.fixture(scope="module")
def encoded():
  clips = jnp.asarray(np.stack([
      make_clip(LARGE), make_clip(LARGE, pan=2.0),  # Static vs camera following the object.
      make_clip(SMALL_BOX), make_clip(SMALL_BOX, object_speed=2.0)]))
  enc = VideoEncoder(**SMALL, token_merging=SPEC)
  variables = enc.init(jax.random.key(0), clips[:1])
  traces = []

  @jax.jit
  def run(weights):
    traces.append(1)
    return enc.apply(variables, clips, merge_weights=weights)

  outs = {name: run(jnp.asarray(w)) for name, w in
          (("motion_only", [1.0, 0.0]), ("both", [1.0, 1.0]), ("neither", [0.0, 0.0]))}
  return dict(outs, traces=len(traces))


def kept(out, b, positions):
  """Tokens spent per grid position over `positions`: mean of 1 / size (1: nothing merged)."""
  sizes = np.asarray(out["sizes"][b])[np.asarray(out["assignment"][b])]
  return (1.0 / sizes[positions]).mean()


@pytest.mark.parametrize("weights", ["motion_only", "both"])
def test_static_clip_compresses_its_background_more_than_a_panning_one(encoded, weights):
  out = encoded[weights]
  background = ~object_positions(LARGE)
  assert kept(out, 0, background) < kept(out, 1, background) - 0.05


@pytest.mark.parametrize("weights,margin", [("motion_only", 0.3), ("both", 0.0)])
def test_moving_object_keeps_more_tokens_than_the_same_object_static(encoded, weights, margin):
  out = encoded[weights]
  path = object_positions(SMALL_BOX, SMALL_BOX[1] + 2 * (T - 1))  # Columns it sweeps.
  assert kept(out, 3, path) > kept(out, 2, path) + margin


def test_motion_switch_keeps_moving_positions_out_of_merges(encoded):
  motion = np.asarray(encoded["neither"]["motion"][3])  # Scores do not depend on weights.

  def merged(name):
    out = encoded[name]
    return np.asarray(out["sizes"][3])[np.asarray(out["assignment"][3])] > 1

  assert motion[merged("neither")].max() > 0.3  # Similarity alone merges a moving token...
  assert motion[merged("motion_only")].max() < 0.1  # ...motion importance prevents it.


def test_motion_scores_follow_the_clip(encoded):
  motion = np.asarray(encoded["both"]["motion"])
  assert motion[0].max() < 0.2  # Static: below the 0.5 px floor everywhere.
  background = ~object_positions(LARGE)
  assert motion[1][background].mean() > 3 * motion[1][~background].mean()
  assert motion[2].max() < 0.2


def test_switching_merge_weights_does_not_recompile(encoded):
  assert encoded["traces"] == 1


def test_time_features_pool_each_step_over_the_sources_of_its_positions(encoded):
  out = encoded["both"]
  tokens, assign = np.asarray(out["tokens"]), np.asarray(out["assignment"])
  n_final = 256 - sum(merge_schedule(256, 2, 0.25))
  assert n_final == 179  # Mean over the 2 blocks: (205 + 179) / 2 = 0.75 * 256.
  assert tokens.shape == (4, n_final, 32) and out["token_mask"].shape == (4, n_final)
  expected = np.zeros((4, 4, 32))
  for b in range(4):
    for t in range(4):
      for k in range(n_final):  # Size-weighted: each token by its share of step t.
        share = (assign[b, t * 64:(t + 1) * 64] == k).sum() / 64
        expected[b, t] += share * tokens[b, k]
  np.testing.assert_allclose(out["time_features"], expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["sizes"]).sum(1), 256)


def test_features_mode_merges_by_similarity_and_keeps_the_time_grid():
  enc = VideoEncoder(**SMALL, token_merging=SPEC)
  feats = jax.random.normal(jax.random.key(2), (2, 16, 12))
  variables = enc.init(jax.random.key(0), feats)
  out = enc.apply(variables, feats)
  assert out["tokens"].shape == (2, 16 - sum(merge_schedule(16, 2, 0.25)), 32) and "motion" not in out
  full = np.asarray(out["tokens"])[np.arange(2)[:, None], np.asarray(out["assignment"])]
  np.testing.assert_allclose(out["time_features"], full, rtol=1e-6)
  off = VideoEncoder(**SMALL, token_merging=dataclasses.replace(SPEC, features_mode="off"))
  assert off.apply(variables, feats)["tokens"].shape == (2, 16, 32)


def test_spec_from_config_names_bad_keys():
  from configs import base  # noqa: PLC0415
  cfg = base.get_config("merging=true")
  spec = MergingSpec.from_config(cfg.model.token_merging)
  assert spec.target_compression_ratio == 0.5 and spec.attention_share == 0.0
  cfg.model.token_merging.saliency.edges = 1.0
  with pytest.raises(ConfigError, match="token_merging.saliency"):
    MergingSpec.from_config(cfg.model.token_merging)
  cfg = base.get_config("merging=false")
  assert MergingSpec.from_config(cfg.model.token_merging) is None
