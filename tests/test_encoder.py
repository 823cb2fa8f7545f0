"""VideoEncoder: tubelet embedding against explicit patches, layout, masks, dtypes, remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from hvlm_jax.models.encoder import VideoEncoder

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, tubelet_size=(2, 4, 4))


@pytest.fixture(scope="module")
def clip():
  return jax.random.uniform(jax.random.key(0), (2, 4, 8, 8, 3))


@pytest.fixture(scope="module")
def variables(clip):
  return VideoEncoder(**SMALL).init(jax.random.key(1), clip)


def test_tubelet_embedding_equals_explicit_patch_projection(clip, variables):
  enc = VideoEncoder(**SMALL)
  out, inter = enc.apply(variables, clip, capture_intermediates=(
      lambda mdl, _: mdl.name == "tubelet_embedding"), mutable=["intermediates"])
  conv = inter["intermediates"]["tubelet_embedding"]["__call__"][0]
  tokens, grid = conv.reshape(2, 2, 4, 32), out["grid"]
  params = nn.meta.unbox(variables)["params"]["tubelet_embedding"]
  x = (clip - 0.45) / 0.225
  t, p = 2, 4
  # Token (time i, space j) is the (2, 4, 4) tube at frames 2i.., rows 4(j//2).., cols 4(j%2)..
  expected = np.zeros((2, 2, 4, 32), np.float32)
  for i in range(2):
    for j in range(4):
      r, c = (j // 2) * p, (j % 2) * p
      tube = x[:, i * t:(i + 1) * t, r:r + p, c:c + p, :]
      expected[:, i, j] = np.einsum("bthwc,thwcd->bd", tube, params["kernel"]) + params["bias"]
  assert grid == (2, 4)
  np.testing.assert_allclose(tokens, expected, rtol=1e-4, atol=1e-4)


def test_outputs_are_time_major_and_time_features_average_space(clip, variables):
  out = VideoEncoder(**SMALL).apply(variables, clip)
  assert out["tokens"].shape == (2, 8, 32) and out["token_mask"].all()
  np.testing.assert_allclose(out["time_features"],
                             out["tokens"].reshape(2, 2, 4, 32).mean(2), rtol=1e-5, atol=1e-6)


def test_each_example_is_encoded_independently(clip, variables):
  enc = VideoEncoder(**SMALL)
  both = enc.apply(variables, clip)["tokens"]
  alone = enc.apply(variables, clip[1:])["tokens"]
  np.testing.assert_allclose(both[1:], alone, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params(clip):
  enc = VideoEncoder(**SMALL, dtype=jnp.bfloat16)
  v = enc.init(jax.random.key(1), clip)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(v)))
  out = enc.apply(v, clip)
  assert out["tokens"].dtype == jnp.bfloat16
  ref = VideoEncoder(**SMALL).apply(v, clip)["tokens"]
  np.testing.assert_allclose(np.asarray(out["tokens"], np.float32), ref, atol=0.1)


def test_every_parameter_has_logical_axis_names(variables):
  boxes = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
  assert all(len(b.names) == b.value.ndim for b in boxes)


def test_remat_gives_the_same_gradients(clip, variables):
  params = nn.meta.unbox(variables)

  def loss(params, policy):
    out = VideoEncoder(**SMALL, remat_policy=policy).apply(params, clip)
    return jnp.sum(out["tokens"] ** 2)

  g_plain = jax.grad(loss)(params, None)
  g_remat = jax.grad(loss)(params, "nothing_saveable")
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_features_mode_makes_one_token_per_time_step():
  feats = jax.random.normal(jax.random.key(2), (2, 6, 12))
  enc = VideoEncoder(**SMALL)
  v = enc.init(jax.random.key(1), feats)
  out = enc.apply(v, feats)
  assert out["tokens"].shape == (2, 6, 32) and out["grid"] == (6, 1)
  np.testing.assert_allclose(out["time_features"], out["tokens"], rtol=1e-6)


def test_motion_inputs_add_difference_channels_and_a_flow_embedding(clip):
  from hvlm_jax.models.token_merging.flow import token_flow_features
  enc = VideoEncoder(**SMALL, motion_input=("difference", "flow"), flow_cells_per_token=2)
  v = enc.init(jax.random.key(1), clip)
  params = nn.meta.unbox(v)["params"]
  assert params["tubelet_embedding"]["kernel"].shape == (2, 4, 4, 6, 32)
  _, inter = enc.apply(v, clip, capture_intermediates=(
      lambda mdl, _: mdl.name in ("tubelet_embedding", "motion_embedding")),
      mutable=["intermediates"])
  inter = inter["intermediates"]
  conv = inter["tubelet_embedding"]["__call__"][0].reshape(2, 2, 4, 32)
  x = (clip - 0.45) / 0.225
  diff = np.concatenate([np.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], axis=1)
  x6 = np.concatenate([x, diff], axis=-1)
  k, bias = params["tubelet_embedding"]["kernel"], params["tubelet_embedding"]["bias"]
  # Token (time 1, space 2) = rows 4..8, cols 0..4 of frames 2..3: its first frame's
  # difference channels see frame 2 - frame 1, across the tubelet boundary.
  tube = x6[:, 2:4, 4:8, 0:4, :]
  np.testing.assert_allclose(conv[:, 1, 2], np.einsum("bthwc,thwcd->bd", tube, k) + bias,
                             rtol=1e-4, atol=1e-4)
  flow = token_flow_features(clip, (2, 4, 4), cells_per_token=2)
  m = params["motion_embedding"]
  np.testing.assert_allclose(inter["motion_embedding"]["__call__"][0],
                             np.einsum("btpf,fd->btpd", flow, m["kernel"]) + m["bias"],
                             rtol=1e-4, atol=1e-5)
  boxes = jax.tree.leaves(v, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(len(b.names) == b.value.ndim for b in boxes)
  # The flow stream is a stop_gradient input: gradients to the clip stay finite.
  g = jax.grad(lambda c: enc.apply(v, c)["tokens"].sum())(clip)
  assert np.isfinite(np.asarray(g)).all()


def test_conv_stem_is_per_frame_stride_two_convolutions_joined_per_tubelet(clip):
  from hvlm_jax.models.encoder import ConvStem
  stem = ConvStem(32, (2, 4, 4))
  x = (clip - 0.45) / 0.225
  v = stem.init(jax.random.key(3), x)
  out, inter = stem.apply(v, x, capture_intermediates=(lambda m, _: m.name == "conv_0"),
                          mutable=["intermediates"])
  assert out.shape == (2, 2, 2, 2, 32)  # (B, T/t, H/p, W/p, D)
  # conv_0 against an explicit loop: 3x3, stride 2, SAME padding (XLA pads 0 before, 1 after
  # for an even size), on every frame separately.
  k = nn.meta.unbox(v)["params"]["conv_0"]["kernel"]
  b0 = nn.meta.unbox(v)["params"]["conv_0"]["bias"]
  xp = np.pad(np.asarray(x).reshape(8, 8, 8, 3), ((0, 0), (0, 1), (0, 1), (0, 0)))
  ref = np.zeros((8, 4, 4, k.shape[-1]), np.float32)
  for i in range(4):
    for j in range(4):
      ref[:, i, j] = np.einsum("nhwc,hwcd->nd", xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3], k) + b0
  np.testing.assert_allclose(inter["intermediates"]["conv_0"]["__call__"][0], ref,
                             rtol=1e-4, atol=1e-4)
  # A change in frame 3 only reaches tubelet 1 (frames 2-3), not tubelet 0.
  changed = stem.apply(v, x.at[:, 3].add(1.0))
  np.testing.assert_array_equal(changed[:, 0], out[:, 0])
  assert not np.allclose(changed[:, 1], out[:, 1])
  boxes = jax.tree.leaves(v, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxes and all(len(b.names) == b.value.ndim for b in boxes)


def test_conv_stem_group_norm_normalises_each_frame_over_space_and_channel_groups(clip):
  from hvlm_jax.models.encoder import ConvStem
  stem = ConvStem(32, (2, 4, 4), norm="group")
  x = (clip - 0.45) / 0.225
  v = stem.init(jax.random.key(3), x)
  _, inter = stem.apply(v, x, capture_intermediates=lambda m, _: m.name in ("conv_0", "norm_0"),
                        mutable=["intermediates"])
  conv = np.asarray(inter["intermediates"]["conv_0"]["__call__"][0])  # (B * T, h, w, 8)
  # Naive GroupNorm: 2 groups of 4 channels (width 8 / 4), statistics over each frame's pixels
  # and the group's channels; scale 1 and bias 0 at initialisation.
  g = conv.reshape(*conv.shape[:3], 2, 4).astype(np.float64)
  ref = (g - g.mean((1, 2, 4), keepdims=True)) / np.sqrt(g.var((1, 2, 4), keepdims=True) + 1e-6)
  np.testing.assert_allclose(inter["intermediates"]["norm_0"]["__call__"][0],
                             ref.reshape(conv.shape), rtol=1e-4, atol=1e-4)
  # Frames are normalised separately: changing frame 3 leaves frame 0's tubelet unchanged.
  out = stem.apply(v, x)
  np.testing.assert_array_equal(stem.apply(v, x.at[:, 3].mul(5.0))[:, 0], out[:, 0])


def test_conv_stem_width_and_depth(clip):
  from hvlm_jax.models.encoder import ConvStem
  x = (clip - 0.45) / 0.225
  wide = nn.meta.unbox(ConvStem(32, (2, 4, 4), width=12, depth=2).init(jax.random.key(3), x))
  kernels = {k: v["kernel"].shape for k, v in wide["params"].items() if k.startswith("conv")}
  # Stage i has width 12 * 2**i, capped at the model width; the second conv of a stage keeps it.
  assert kernels == {"conv_0": (3, 3, 3, 12), "conv_0_1": (3, 3, 12, 12),
                     "conv_1": (3, 3, 12, 24), "conv_1_1": (3, 3, 24, 24)}
  # With a stage's extra conv set to the identity (centre tap 1, bias 0), its norm sees the
  # stage's first output after GELU: naive LayerNorm of naive GELU (stride 1, same padding).
  deep = ConvStem(32, (2, 4, 4), width=12, depth=2)
  p = jax.tree.map(np.asarray, wide["params"])
  for name in ("conv_0_1", "conv_1_1"):
    k = np.zeros_like(p[name]["kernel"])
    k[1, 1] = np.eye(k.shape[-1])
    p[name] = dict(kernel=k, bias=np.zeros_like(p[name]["bias"]))
  _, inter = deep.apply({"params": p}, x, capture_intermediates=True, mutable=["intermediates"])
  got = inter["intermediates"]
  y0 = np.asarray(got["norm_0"]["__call__"][0], np.float64)
  y0 = 0.5 * y0 * (1 + np.tanh(np.sqrt(2 / np.pi) * (y0 + 0.044715 * y0 ** 3)))  # GELU
  ref = (y0 - y0.mean(-1, keepdims=True)) / np.sqrt(y0.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(got["norm_0_1"]["__call__"][0], ref, rtol=1e-4, atol=1e-4)
  # Fold 2: one stage to stride 2, then each token concatenates its tubelet's frames and its
  # 2 x 2 cells (naive space-to-depth) before the projection.
  folded = ConvStem(32, (2, 4, 4), fold=2)
  v = nn.meta.unbox(folded.init(jax.random.key(4), x))
  out, inter = folded.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
  cells = np.asarray(inter["intermediates"]["norm_0"]["__call__"][0], np.float64)
  cells = 0.5 * cells * (1 + np.tanh(np.sqrt(2 / np.pi) * (cells + 0.044715 * cells ** 3)))
  b, t, h, w = x.shape[:4]
  cells = cells.reshape(b, t, h // 2, w // 2, -1)
  tokens = np.empty((b, t // 2, h // 4, w // 4, 2 * 2 * 2 * cells.shape[-1]))
  for i in range(h // 4):
    for j in range(w // 4):
      for k in range(t // 2):
        tokens[:, k, i, j] = np.concatenate([cells[:, 2 * k + dt, 2 * i + di, 2 * j + dj]
                                             for dt in range(2) for di in range(2)
                                             for dj in range(2)], -1)
  proj = v["params"]["projection"]
  np.testing.assert_allclose(out, tokens @ np.asarray(proj["kernel"]) + np.asarray(proj["bias"]),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="stem_fold"):
    ConvStem(32, (2, 4, 4), fold=4).init(jax.random.key(4), x)
  # Depth 1 (the default) keeps the original parameter names: old checkpoints still load.
  names = nn.meta.unbox(ConvStem(32, (2, 4, 4)).init(jax.random.key(3), x))["params"]
  assert sorted(names) == ["conv_0", "conv_1", "norm_0", "norm_1", "projection"]


def test_hybrid_stem_adds_the_patch_and_conv_embeddings(clip):
  params = nn.meta.unbox(VideoEncoder(**SMALL, stem="hybrid").init(jax.random.key(1), clip))
  params = params["params"]
  zero = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  hybrid = lambda p: VideoEncoder(**SMALL, stem="hybrid").apply({"params": p}, clip)["tokens"]
  # With the conv branch's output projection zeroed, hybrid = the patch stem alone, and with
  # the tubelet projection zeroed, hybrid = the conv stem alone (same remaining parameters).
  no_conv = dict(params, conv_stem=dict(params["conv_stem"],
                                        projection=zero(params["conv_stem"]["projection"])))
  patch_only = {k: v for k, v in params.items() if k != "conv_stem"}
  np.testing.assert_allclose(
      hybrid(no_conv), VideoEncoder(**SMALL).apply({"params": patch_only}, clip)["tokens"],
      rtol=1e-5, atol=1e-5)
  no_patch = dict(params, tubelet_embedding=zero(params["tubelet_embedding"]))
  conv_only = {k: v for k, v in params.items() if k != "tubelet_embedding"}
  np.testing.assert_allclose(
      hybrid(no_patch),
      VideoEncoder(**SMALL, stem="conv").apply({"params": conv_only}, clip)["tokens"],
      rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="config.model.stem"):
    VideoEncoder(**SMALL, stem="vit").init(jax.random.key(1), clip)
