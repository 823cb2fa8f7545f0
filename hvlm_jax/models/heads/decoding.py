"""Autoregressive decoding under jit: greedy and beam search over a step function with a cache.

Both take `step_fn(tokens, index, cache) -> (logits, cache)` where tokens (R,) int32 are the
previous tokens of R running sequences, index is the int32 position being read, logits are
(R, V) and cache is any pytree whose leaves have R as their leading axis (greedy: R = B;
beam search: R = B * K, beam-major within each example). Decoding starts from `bos_id`;
output token t is the word at position t + 1 of the caption, eos included when produced, and
pad after it. Loops are `lax.while_loop`s of at most `max_length` steps that stop early when
every sequence is finished, so one compiled program serves every batch.

Beam search follows the finished / alive scheme of Wu et al. 2016 (GNMT) and flax's
`examples/wmt/decode.py`: each step extends the K alive beams to K * V candidates, keeps the
2K best (at most K of which end in eos), moves those among the K best that end in eos to the
finished pool scored by logprob / lp(length) with lp(l) = ((5 + l) / 6) ** alpha, and keeps
the K best others alive. It stops when no alive beam can still beat the best finished one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1.0e9  # Finite "minus infinity": sums stay finite and comparisons stay exact.


def greedy_decode(step_fn, cache, batch_size: int, max_length: int, *, bos_id: int = 2,
                  eos_id: int = 3, pad_id: int = 0):
  """Argmax decoding. Returns tokens (B, max_length) int32 and their summed logprob (B,)."""
  def cond(state):
    t, _, _, done, _, _ = state
    return (t < max_length) & ~jnp.all(done)

  def body(state):
    t, last, tokens, done, score, cache = state
    logits, cache = step_fn(last, t, cache)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nxt = logp.argmax(-1).astype(jnp.int32)
    score = score + jnp.where(done, 0.0, jnp.take_along_axis(logp, nxt[:, None], 1)[:, 0])
    nxt = jnp.where(done, pad_id, nxt)
    tokens = tokens.at[:, t].set(nxt)
    return t + 1, nxt, tokens, done | (nxt == eos_id), score, cache

  b = batch_size
  state = (jnp.zeros((), jnp.int32), jnp.full((b,), bos_id, jnp.int32),
           jnp.full((b, max_length), pad_id, jnp.int32), jnp.zeros((b,), bool),
           jnp.zeros((b,), jnp.float32), cache)
  _, _, tokens, _, score, _ = jax.lax.while_loop(cond, body, state)
  return tokens, score


def length_penalty(length, alpha: float):
  """GNMT length penalty ((5 + length) / 6) ** alpha; 1 when alpha = 0."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam_search(step_fn, cache, batch_size: int, beam_size: int, max_length: int, *,
                bos_id: int = 2, eos_id: int = 3, pad_id: int = 0, alpha: float = 0.0):
  """Beam search. `cache` leaves have leading axis B * K (repeat each example K times).

  Returns the best sequence per example, tokens (B, max_length) int32, and its score (B,)
  (logprob / lp(length); an example with no finished beam returns its best alive beam).
  Time O(max_length * B * K * V log(2K)) besides the model; memory O(B * K * max_length).
  """
  b, k, n = batch_size, beam_size, max_length
  flat = lambda x: x.reshape(b * k, *x.shape[2:])  # noqa: E731

  def cond(state):
    t, _, alive_logp, _, fin_scores, _ = state
    best_alive = alive_logp.max(-1) / length_penalty(n, alpha)
    can_improve = best_alive > fin_scores.max(-1)
    return (t < n) & jnp.any(can_improve)

  def body(state):
    t, alive, alive_logp, fin, fin_scores, cache = state
    last = jnp.where(t == 0, bos_id, alive[:, :, jnp.maximum(t - 1, 0)])
    logits, cache = step_fn(flat(last), t, cache)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    v = logp.shape[-1]
    cand = (alive_logp[:, :, None] + logp.reshape(b, k, v)).reshape(b, k * v)
    top_logp, top_idx = jax.lax.top_k(cand, 2 * k)  # (B, 2K)
    beam, token = top_idx // v, (top_idx % v).astype(jnp.int32)
    seqs = jnp.take_along_axis(alive, beam[:, :, None], axis=1).at[:, :, t].set(token)
    is_eos = token == eos_id

    # Finished pool: old finished + candidates ending in eos that rank among the K best of
    # this step (as in Hugging Face's BeamSearchScorer; it makes beam 1 exactly greedy), best
    # K by penalised score.
    in_top_k = jnp.arange(2 * k)[None, :] < k
    new_fin = jnp.where(is_eos & in_top_k, top_logp / length_penalty(t + 1, alpha), NEG)
    pool_scores = jnp.concatenate([fin_scores, new_fin], axis=1)
    pool_seqs = jnp.concatenate([fin, seqs], axis=1)
    fin_scores, keep = jax.lax.top_k(pool_scores, k)
    fin = jnp.take_along_axis(pool_seqs, keep[:, :, None], axis=1)

    # Alive: the K best candidates that did not end in eos (there are at least K of 2K).
    alive_logp, keep = jax.lax.top_k(jnp.where(is_eos, NEG, top_logp), k)
    alive = jnp.take_along_axis(seqs, keep[:, :, None], axis=1)
    src = (jnp.arange(b)[:, None] * k + jnp.take_along_axis(beam, keep, axis=1)).reshape(-1)
    cache = jax.tree_util.tree_map(lambda x: x[src], cache)
    return t + 1, alive, alive_logp, fin, fin_scores, cache

  # Only beam 0 is alive at the start, so the first step does not pick K copies of one word.
  alive_logp = jnp.tile(jnp.array([0.0] + [NEG] * (k - 1), jnp.float32), (b, 1))
  state = (jnp.zeros((), jnp.int32), jnp.full((b, k, n), pad_id, jnp.int32), alive_logp,
           jnp.full((b, k, n), pad_id, jnp.int32), jnp.full((b, k), NEG, jnp.float32), cache)
  _, alive, alive_logp, fin, fin_scores, _ = jax.lax.while_loop(cond, body, state)
  has_fin = fin_scores[:, 0] > NEG / 2
  tokens = jnp.where(has_fin[:, None], fin[:, 0], alive[:, 0])
  score = jnp.where(has_fin, fin_scores[:, 0], alive_logp[:, 0] / length_penalty(n, alpha))
  return tokens, score
