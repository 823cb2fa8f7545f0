"""Bipartite merging, unmerge, sizes and schedules against a naive ToMe transcription."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvlm_jax.config import ConfigError
from hvlm_jax.models.attention.full import FullAttention
from hvlm_jax.models.token_merging import merging


def tome_naive(x, r, sizes=None, parity=None, importance=None, protected=None, weight=1.0):
  """ToMe (Bolya et al. 2023, Alg. 1) with loops, one sample: returns output groups and values.

  Groups are lists of input indices, in output order (sorted by the anchor: the B token, or
  the unmerged A token itself).
  """
  n = len(x)
  sizes = np.ones(n) if sizes is None else sizes
  parity = np.arange(n) % 2 if parity is None else parity
  order = sorted(range(n), key=lambda i: (parity[i], i))
  a_set, b_set = order[:n // 2], order[n // 2:]
  unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
  best = {}
  for a in a_set:
    top, arg = -np.inf, None
    for b in b_set:
      s = unit[a] @ unit[b]
      if importance is not None:
        s -= weight * max(importance[a], importance[b])
      if protected is not None and (protected[a] or protected[b]):
        s = -np.inf
      if arg is None or s > top:
        top, arg = s, b
    best[a] = (top, arg)
  ranked = sorted(a_set, key=lambda a: -best[a][0])
  merged = set(ranked[:r])
  groups = {b: [b] for b in b_set}
  for a in ranked[:r]:
    groups[best[a][1]].append(a)
  out = [[a] for a in a_set if a not in merged] + [groups[b] for b in b_set]
  out.sort(key=lambda g: g[0])  # g[0] is the anchor: the B token or the lone A token.
  values = np.stack([(sizes[g, None] * x[g]).sum(0) / sizes[g].sum() for g in out])
  return out, values


def groups_from_remap(remap, n_out):
  return [sorted(np.flatnonzero(remap == k).tolist()) for k in range(n_out)]


@pytest.fixture(scope="module")
def tokens():
  r = np.random.RandomState(0)
  return r.randn(2, 20, 8).astype(np.float32), r.uniform(1, 4, (2, 20)).astype(np.float32)


@pytest.mark.parametrize("variant", ["plain", "importance", "protected", "parity"])
def test_matching_and_merge_equal_naive_tome(tokens, variant):
  x, sizes = tokens
  r, rs = 6, np.random.RandomState(1)
  kw, naive_kw = {}, {}
  if variant in ("importance", "protected"):
    imp = rs.uniform(0, 1, (2, 20)).astype(np.float32)
    kw["importance"], naive_kw["importance"] = jnp.asarray(imp), imp
  if variant == "protected":
    prot = rs.uniform(size=(2, 20)) < 0.25
    kw["protected"], naive_kw["protected"] = jnp.asarray(prot), prot
  if variant == "parity":
    par = (rs.uniform(size=(2, 20)) < 0.4).astype(np.int32)  # Unbalanced on purpose.
    kw["parity"], naive_kw["parity"] = jnp.asarray(par), par
  m = merging.bipartite_soft_matching(jnp.asarray(x), r, **kw)
  out = np.asarray(merging.merge(m, jnp.asarray(x), jnp.asarray(sizes)))
  for b in range(2):
    groups, values = tome_naive(x[b], r, sizes[b], **{k: v[b] for k, v in naive_kw.items()})
    assert groups_from_remap(np.asarray(m.remap[b]), 20 - r) == [sorted(g) for g in groups]
    np.testing.assert_allclose(out[b], values, rtol=1e-5, atol=1e-6)


def test_r_zero_is_the_identity(tokens):
  x, sizes = tokens
  m = merging.bipartite_soft_matching(jnp.asarray(x), 0)
  assert merging.merge(m, jnp.asarray(x), jnp.asarray(sizes)) is not None
  np.testing.assert_array_equal(merging.merge(m, jnp.asarray(x), jnp.asarray(sizes)), x)
  np.testing.assert_array_equal(m.remap, np.broadcast_to(np.arange(20), (2, 20)))
  state = merging.init_state(2, 20)
  y, new = merging.merge_step(jnp.asarray(x), state, 0, (4, 5, 1))
  np.testing.assert_array_equal(y, x)
  np.testing.assert_array_equal(new.sizes, 1.0)


def test_identical_tokens_merge_into_themselves_and_keep_the_weighted_mean():
  r = np.random.RandomState(2)
  base = r.randn(1, 8, 6).astype(np.float32)
  x = np.repeat(base, 2, axis=1)  # Tokens 2i and 2i + 1 are identical: A and B twins.
  sizes = r.uniform(1, 3, (1, 16)).astype(np.float32)
  m = merging.bipartite_soft_matching(jnp.asarray(x), 8)
  out = np.asarray(merging.merge(m, jnp.asarray(x), jnp.asarray(sizes)))
  new_sizes = np.asarray(merging.merge(m, jnp.asarray(sizes), mode="sum"))
  np.testing.assert_allclose(out, base, rtol=1e-6)  # Each twin pair became its own value.
  np.testing.assert_allclose(new_sizes, sizes[:, 0::2] + sizes[:, 1::2], rtol=1e-6)
  before = (sizes[..., None] * x).sum(1) / sizes.sum()
  after = (new_sizes[..., None] * out).sum(1) / new_sizes.sum()
  np.testing.assert_allclose(after, before, rtol=1e-5)


def test_protected_tokens_are_never_merged(tokens):
  x, _ = tokens
  imp = jnp.asarray(np.random.RandomState(3).uniform(size=(2, 20)), jnp.float32)
  protected = merging.protect_top(imp, 0.3)
  assert int(protected.sum()) == 2 * 6
  m = merging.bipartite_soft_matching(jnp.asarray(x), 7, importance=imp, protected=protected)
  out = np.asarray(merging.merge(m, jnp.asarray(x)))
  remap = np.asarray(m.remap)
  for b in range(2):
    for i in np.flatnonzero(np.asarray(protected[b])):
      assert (remap[b] == remap[b, i]).sum() == 1  # Alone in its group...
      np.testing.assert_array_equal(out[b, remap[b, i]], x[b, i])  # ...and untouched.


def test_unmerge_restores_unmerged_tokens_and_gives_merged_ones_their_group_mean(tokens):
  x, sizes = tokens
  m = merging.bipartite_soft_matching(jnp.asarray(x), 8)
  back = np.asarray(merging.unmerge(m, merging.merge(m, jnp.asarray(x), jnp.asarray(sizes))))
  remap = np.asarray(m.remap)
  for b in range(2):
    for i in range(20):
      group = np.flatnonzero(remap[b] == remap[b, i])
      if len(group) == 1:
        np.testing.assert_array_equal(back[b, i], x[b, i])
      else:
        mean = (sizes[b, group, None] * x[b, group]).sum(0) / sizes[b, group].sum()
        np.testing.assert_allclose(back[b, i], mean, rtol=1e-5, atol=1e-6)


def test_merge_gradient_is_the_transposed_averaging_matrix(tokens):
  x, sizes = tokens
  m = merging.bipartite_soft_matching(jnp.asarray(x), 5)
  w = np.random.RandomState(4).randn(2, 15, 8).astype(np.float32)
  grad = jax.grad(lambda v: (merging.merge(m, v, jnp.asarray(sizes)) * w).sum())(jnp.asarray(x))
  remap = np.asarray(m.remap)
  for b in range(2):
    avg = np.zeros((15, 20))  # out = avg @ x, avg[k, i] = s_i / sum of s over group k.
    for i in range(20):
      avg[remap[b, i], i] = sizes[b, i]
    avg /= avg.sum(1, keepdims=True)
    np.testing.assert_allclose(grad[b], avg.T @ w[b], rtol=1e-5, atol=1e-6)


def test_log_size_key_bias_equals_attending_to_the_duplicated_tokens():
  """Proportional attention: one token of size k with bias log k == k identical tokens."""
  r = np.random.RandomState(5)
  unique = r.randn(1, 5, 16).astype(np.float32)
  counts = np.array([3, 1, 2, 1, 4])
  dup = np.repeat(unique, counts, axis=1)
  attn = FullAttention(num_heads=2)
  v = attn.init(jax.random.key(0), jnp.asarray(dup))
  full = np.asarray(attn.apply(v, jnp.asarray(dup)))
  merged = np.asarray(attn.apply(v, jnp.asarray(unique),
                                 key_bias=jnp.log(jnp.asarray(counts, jnp.float32))[None]))
  first = np.concatenate([[0], np.cumsum(counts)[:-1]])
  np.testing.assert_allclose(merged[0], full[0, first], rtol=1e-5, atol=1e-5)


def test_merge_steps_track_sizes_assignment_and_positions():
  r = np.random.RandomState(6)
  grid = (4, 3, 4)
  x = r.randn(2, 48, 8).astype(np.float32)
  state = merging.init_state(2, 48, jnp.asarray(r.uniform(size=(2, 48)), jnp.float32), None)
  y = jnp.asarray(x)
  for step_r in (12, 9, 6):
    y, state = merging.merge_step(y, state, step_r, grid, protect_fraction=0.1)
  assign = np.asarray(state.assignment)
  assert y.shape == (2, 21, 8)
  full = np.asarray(merging.unmerge_to_grid(y, state.assignment))
  coords = np.stack(np.unravel_index(np.arange(48), grid), -1)
  pos = np.asarray(merging.token_positions(state, grid))
  for b in range(2):
    for k in range(21):
      group = np.flatnonzero(assign[b] == k)
      assert state.sizes[b, k] == len(group)
      # Chained size-weighted means = the plain mean of the original tokens of the group.
      np.testing.assert_allclose(full[b, group], np.broadcast_to(x[b, group].mean(0),
                                                                 (len(group), 8)), atol=1e-5)
      np.testing.assert_allclose(pos[b, k], coords[group].mean(0), atol=1e-5)
    anchors = np.asarray(state.anchors[b])
    assert (np.diff(anchors) > 0).all()  # Still time-major.
    assert all(assign[b, a] == k for k, a in enumerate(anchors))


def test_runtime_weights_change_merges_without_recompiling():
  r = np.random.RandomState(7)
  x = jnp.asarray(r.randn(1, 32, 8), jnp.float32)
  motion = jnp.asarray(r.uniform(size=(1, 32)), jnp.float32)
  traces = []

  @jax.jit
  def step(weights):
    traces.append(1)
    state = merging.init_state(1, 32, motion, None)
    return merging.merge_step(x, state, 8, (2, 4, 4), motion_weight=weights[0],
                              importance_weight=2.0)[1].assignment

  on, off = step(jnp.asarray([1.0, 1.0])), step(jnp.asarray([0.0, 1.0]))
  assert len(traces) == 1
  assert not np.array_equal(on, off)
  merged_on = np.bincount(np.asarray(on[0]), minlength=24) > 1
  # With motion on, the merged positions carry less motion than with motion off.
  mo = np.asarray(motion[0])
  assert mo[merged_on[np.asarray(on[0])]].mean() < mo[
      (np.bincount(np.asarray(off[0]), minlength=24) > 1)[np.asarray(off[0])]].mean()


@pytest.mark.parametrize("schedule", ["constant", "decreasing", "2,1,0,1"])
def test_schedule_removes_the_target_share_of_token_block_work(schedule):
  ratio = 0.4 if schedule == "constant" else 0.5  # Constant at 0.5 over 4 layers: infeasible.
  rs = merging.merge_schedule(512, 4, ratio, schedule, protect_fraction=0.1)
  remaining = 512 - np.cumsum(rs)
  assert abs(remaining.mean() - (1 - ratio) * 512) <= 1
  w = merging.schedule_weights(schedule, 4)
  np.testing.assert_allclose(np.array(rs) / sum(rs), w / w.sum(), atol=0.01)
  if schedule == "decreasing":
    assert rs == (137, 102, 68, 34)  # 512 - 34.13 * (4, 7, 9, 10), rounded.


def test_infeasible_schedule_names_the_config_key():
  with pytest.raises(ConfigError, match="token_merging"):
    merging.merge_schedule(512, 4, 0.5, "constant")  # Last layer: 103 of 205 tokens.
  with pytest.raises(ConfigError, match="token_merging.schedule"):
    merging.merge_schedule(512, 4, 0.5, "1,2")
