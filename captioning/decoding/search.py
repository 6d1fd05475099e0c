"""Search algorithms over any decoder of `captioning.models` (jit-friendly, batched).

Every method drives the decoder only through `init_decode` and `decode_step` (the contract in
`captioning.models.base`), so it works with every decoder, whatever pytrees its context and state
are (batch-first leaves). `captioning.decoding.decode` jits them.

* `greedy_decode`: the most likely word at each step, in one `lax.while_loop` that stops as soon
  as every caption has produced `<end>`, or at `max_len` words.
* `beam_search`: K hypotheses per image in fixed-shape [B, K] arrays inside one `lax.while_loop`.
  The decoder runs on [B*K] rows (context and state are tiled over the beams once and the state is
  reordered by the parent beam after every step). A hypothesis that produced `<end>` stays in the
  beam and can only be extended by `<pad>` at log-probability 0, so finished and alive hypotheses
  compete for the same K slots; the loop stops when no beam of any image is alive, or at `max_len`.
  Hypotheses are ranked by `sum logp / length ** length_penalty` (length = words + `<end>`), the
  same score that picks the final caption; with penalty 0 that is the raw log-probability and with
  beam size 1 the search is exactly greedy decoding.
* `sample_decode`: ancestral sampling with temperature and top-k in a `lax.scan` (not a while loop,
  so `jax.grad` can differentiate the returned log-probabilities for RL fine-tuning); steps after
  every caption ended are skipped by a `lax.cond`.

No method ever emits `<pad>` (except after `<end>`), `<start>` or `<unk>`: their logits are
masked at every step (`NEVER_EMITTED`). With `block_repeats` (the `decode.block_repeats` default)
no caption repeats a trigram or says a word a third time in a row (`repeat_mask`), so no input,
however unlike the training images, makes a decoder loop on a word or a phrase.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from captioning.data import text

Array = jax.Array


class DecodeOutput(NamedTuple):
    """tokens: [B, max_len] int32 (padded with 0 after `<end>`); attention: [B, max_len, L];
    logprobs: [B, max_len] float32 log-probability of each emitted token (0 after the end)."""

    tokens: Array
    attention: Array
    logprobs: Array


class Beams(NamedTuple):
    """Every hypothesis kept by the beam, best first.

    tokens: [B, K, max_len] int32 (0 after `<end>`); attention: [B, K, max_len, L] float32;
    logprobs: [B, K, max_len] float32 per-token log-probabilities (0 after `<end>`);
    scores: [B, K] float32 ranking score sum(logprobs) / length**length_penalty (-inf: empty slot);
    lengths: [B, K] int32 words including `<end>`.
    """

    tokens: Array
    attention: Array
    logprobs: Array
    scores: Array
    lengths: Array


def check_positive(name: str, value: Any) -> None:
    if value < 1:
        raise ValueError(f"config.decode.{name}={value!r}: must be at least 1.")


def check_sampling(temperature: float, top_k: int) -> None:
    if not temperature > 0:
        raise ValueError(f"config.decode.temperature={temperature!r}: must be > 0.")
    if top_k < 0:
        raise ValueError(f"config.decode.top_k={top_k!r}: must be >= 0 (0 = all words).")


def _length_normalize(logp_sum: Array, lengths: Array, length_penalty: float) -> Array:
    """sum logp / length**penalty; penalty 0 returns the raw sum untouched (bit-exact)."""
    if length_penalty == 0.0:
        return logp_sum
    return logp_sum / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty


def _gather_beams(x: Array, parent: Array) -> Array:
    """x [B, K, ...], parent [B, K] -> x[b, parent[b, k], ...]."""
    return x[jnp.arange(x.shape[0])[:, None], parent]


def _gather_flat(x: Array, parent: Array) -> Array:
    """Same as `_gather_beams` for decoder pytree leaves laid out as [B*K, ...]."""
    batch, beams = parent.shape
    return _gather_beams(x.reshape(batch, beams, *x.shape[1:]), parent).reshape(x.shape)


def _step_shapes(model: nnx.Module, context: Any, state: Any, batch: int) -> tuple[int, int]:
    """(vocabulary size V, attention locations L) from one abstract decode step."""
    start = jnp.full((batch,), text.START_ID, jnp.int32)
    _, logits, attention = jax.eval_shape(lambda: model.decode_step(context, state, start))
    return logits.shape[-1], attention.shape[-1]


def repeated_trigram_mask(tokens: Array, t: Array, vocab_size: int) -> Array:
    """Words that would repeat a trigram: tokens [N, T] (words at positions < t), t a scalar
    -> [N, V] bool, True for every w such that (tokens[t-2], tokens[t-1], w) already occurred.

    The "block repeated trigrams" trick of the captioning anchors (`decode.block_repeats`).
    """
    positions = jnp.arange(tokens.shape[1])
    last2 = jnp.take(tokens, jnp.maximum(t - 2, 0), axis=1)[:, None]  # [N, 1]
    last1 = jnp.take(tokens, jnp.maximum(t - 1, 0), axis=1)[:, None]
    before2, before1 = jnp.roll(tokens, 2, axis=1), jnp.roll(tokens, 1, axis=1)
    # Position j ends an earlier trigram (tokens[j-2], tokens[j-1], tokens[j]) with the same start.
    seen = (positions >= 2) & (positions < t) & (before2 == last2) & (before1 == last1)
    rows = jnp.arange(tokens.shape[0])[:, None]
    counts = jnp.zeros((tokens.shape[0], vocab_size), jnp.int32).at[rows, tokens].add(seen)
    return counts > 0


def repeat_mask(tokens: Array, t: Array, vocab_size: int) -> Array:
    """Words that `block_repeats` forbids at step t: tokens [N, T] (words at positions < t) ->
    [N, V] bool, True for a word that would repeat a trigram or be said a third time in a row."""
    blocked = repeated_trigram_mask(tokens, t, vocab_size)
    last2 = jnp.take(tokens, jnp.maximum(t - 2, 0), axis=1)
    last1 = jnp.take(tokens, jnp.maximum(t - 1, 0), axis=1)
    twice = jnp.where((t >= 2) & (last1 == last2), last1, -1)  # [N]: the word said twice, or -1.
    return blocked | (jnp.arange(vocab_size)[None, :] == twice[:, None])


NEVER_EMITTED = (text.PAD_ID, text.START_ID, text.UNK_ID)


def mask_never_emitted(scores: Array) -> Array:
    """[..., V] logits or log-probabilities -> the same with `<pad>`, `<start>`, `<unk>` at -inf."""
    never = jnp.isin(jnp.arange(scores.shape[-1]), jnp.asarray(NEVER_EMITTED))
    return jnp.where(never, -jnp.inf, scores.astype(jnp.float32))


def greedy_decode(
    model: nnx.Module, features: Array, max_len: int, block_repeats: bool = False
) -> DecodeOutput:
    """Most likely word at each step. features [B, ...] -> DecodeOutput.

    block_repeats: never emit a word that repeats a trigram of the caption so far or is said a
    third time in a row (`repeat_mask`). `logprobs` are the model's, unmasked.
    """
    batch = features.shape[0]
    context, state = model.init_decode(features, max_len)
    _, num_locations = _step_shapes(model, context, state, batch)

    def cond(carry):
        t, _, _, _, _, finished, _ = carry
        return (t < max_len) & ~jnp.all(finished)

    def body(carry):
        t, tokens, prev, state, logps, finished, attention = carry
        state, logits, attn = model.decode_step(context, state, prev)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
        allowed = mask_never_emitted(log_probs)
        if block_repeats:
            blocked = repeat_mask(tokens, t, log_probs.shape[-1])
            allowed = jnp.where(blocked, -jnp.inf, allowed)
        word = jnp.argmax(allowed, axis=-1).astype(jnp.int32)
        word = jnp.where(finished, text.PAD_ID, word)
        logp = jnp.where(finished, 0.0, jnp.take_along_axis(log_probs, word[:, None], 1)[:, 0])
        tokens = tokens.at[:, t].set(word)
        logps = logps.at[:, t].set(logp)
        attention = attention.at[:, t].set(jnp.where(finished[:, None], 0.0, attn))
        finished = finished | (word == text.END_ID)
        return t + 1, tokens, word, state, logps, finished, attention

    init = (
        jnp.asarray(0, jnp.int32),
        jnp.zeros((batch, max_len), jnp.int32),
        jnp.full((batch,), text.START_ID, jnp.int32),
        state,
        jnp.zeros((batch, max_len), jnp.float32),
        jnp.zeros((batch,), bool),
        jnp.zeros((batch, max_len, num_locations), jnp.float32),
    )
    _, tokens, _, _, logps, _, attention = jax.lax.while_loop(cond, body, init)
    return DecodeOutput(tokens, attention, logps)


def beam_search_beams(
    model: nnx.Module,
    features: Array,
    *,
    beam_size: int,
    max_len: int,
    length_penalty: float = 0.0,
    block_repeats: bool = False,
) -> Beams:
    """Beam search keeping all K hypotheses. features [B, ...] -> `Beams` (best first).

    block_repeats: no hypothesis is extended by a word that repeats one of its trigrams or is
    said a third time in a row (`repeat_mask`).
    """
    check_positive("beam_size", beam_size)
    check_positive("max_len", max_len)
    batch, beams = features.shape[0], beam_size
    context, state = model.init_decode(features, max_len)
    # Row b*K + k of every decoder leaf belongs to image b, beam k.
    tile = lambda x: jnp.repeat(x, beams, axis=0)
    context, state = jax.tree.map(tile, context), jax.tree.map(tile, state)
    vocab_size, num_locations = _step_shapes(model, context, state, batch * beams)
    # A finished hypothesis may only be extended by <pad>, at no cost: it keeps its score and
    # occupies exactly one candidate slot (no duplicates).
    pad_only = jnp.full((vocab_size,), -jnp.inf, jnp.float32).at[text.PAD_ID].set(0.0)

    def cond(carry):
        t, _, _, _, _, _, logp_sum, _, finished = carry
        alive = ~finished & jnp.isfinite(logp_sum)  # Empty (-inf) slots are not alive.
        return (t < max_len) & jnp.any(alive)

    def body(carry):
        t, prev, state, tokens, logps, attention, logp_sum, lengths, finished = carry
        state, logits, attn = model.decode_step(context, state, prev.reshape(-1))
        log_probs = mask_never_emitted(jax.nn.log_softmax(logits.astype(jnp.float32)))
        if block_repeats:
            flat_tokens = tokens.reshape(batch * beams, max_len)
            blocked = repeat_mask(flat_tokens, t, vocab_size)
            log_probs = jnp.where(blocked, -jnp.inf, log_probs)
        log_probs = log_probs.reshape(batch, beams, vocab_size)
        step_logp = jnp.where(finished[..., None], pad_only, log_probs)  # [B, K, V]
        cand_sum = logp_sum[..., None] + step_logp
        cand_len = jnp.where(finished, lengths, t + 1)  # [B, K]
        cand_score = _length_normalize(cand_sum, cand_len[..., None], length_penalty)
        _, flat = jax.lax.top_k(cand_score.reshape(batch, beams * vocab_size), beams)
        parent, word = flat // vocab_size, (flat % vocab_size).astype(jnp.int32)

        was_finished = _gather_beams(finished, parent)
        word_logp = jnp.take_along_axis(step_logp.reshape(batch, -1), flat, axis=1)
        logp_sum = jnp.take_along_axis(cand_sum.reshape(batch, -1), flat, axis=1)
        lengths = _gather_beams(cand_len, parent)
        tokens = _gather_beams(tokens, parent).at[:, :, t].set(word)
        logps = _gather_beams(logps, parent).at[:, :, t].set(word_logp)
        attn = attn.astype(jnp.float32).reshape(batch, beams, num_locations)
        attn = _gather_beams(attn, parent)
        attn = jnp.where(was_finished[..., None], 0.0, attn)
        attention = _gather_beams(attention, parent).at[:, :, t].set(attn)
        state = jax.tree.map(lambda x: _gather_flat(x, parent), state)
        finished = was_finished | (word == text.END_ID)
        return t + 1, word, state, tokens, logps, attention, logp_sum, lengths, finished

    # Only beam 0 starts alive: identical start beams would fill the beam with duplicates.
    logp_sum = jnp.full((batch, beams), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
    init = (
        jnp.asarray(0, jnp.int32),
        jnp.full((batch, beams), text.START_ID, jnp.int32),
        state,
        jnp.zeros((batch, beams, max_len), jnp.int32),
        jnp.zeros((batch, beams, max_len), jnp.float32),
        jnp.zeros((batch, beams, max_len, num_locations), jnp.float32),
        logp_sum,
        jnp.zeros((batch, beams), jnp.int32),
        jnp.zeros((batch, beams), bool),
    )
    carry = jax.lax.while_loop(cond, body, init)
    _, _, _, tokens, logps, attention, logp_sum, lengths, _ = carry
    scores = _length_normalize(logp_sum, lengths, length_penalty)
    # top_k already sorts every step; sorting again keeps "best first" explicit and cheap.
    order = jnp.argsort(-scores, axis=1, stable=True)
    return Beams(
        _gather_beams(tokens, order),
        _gather_beams(attention, order),
        _gather_beams(logps, order),
        _gather_beams(scores, order),
        _gather_beams(lengths, order),
    )


def beam_search(
    model: nnx.Module,
    features: Array,
    *,
    beam_size: int,
    max_len: int,
    length_penalty: float = 0.0,
    block_repeats: bool = False,
) -> DecodeOutput:
    """The best beam per image. features [B, ...] -> DecodeOutput ([B, max_len] tokens, ...).

    Score = sum logp / length**length_penalty, length = words + `<end>` (max_len when the caption
    never ended); `length_penalty` 0 ranks by raw log-probability, > 0 favours longer captions.
    """
    beams = beam_search_beams(
        model,
        features,
        beam_size=beam_size,
        max_len=max_len,
        length_penalty=length_penalty,
        block_repeats=block_repeats,
    )
    return DecodeOutput(beams.tokens[:, 0], beams.attention[:, 0], beams.logprobs[:, 0])


def _sample_step_distribution(logits: Array, temperature: float, top_k: int):
    """-> (candidate log-probs [B, C], candidate word ids [B, C] or None for all V words).

    The log-probs are those of the distribution actually sampled from: softmax(logits / T),
    restricted to the top_k words and renormalized when top_k > 0.
    """
    scaled = logits.astype(jnp.float32) / temperature
    if 0 < top_k < scaled.shape[-1]:
        # Exactly k candidates (ties broken towards the lower id, as argmax does).
        values, ids = jax.lax.top_k(scaled, top_k)
        return jax.nn.log_softmax(values), ids.astype(jnp.int32)
    return jax.nn.log_softmax(scaled), None


def sample_decode(
    model: nnx.Module,
    features: Array,
    key: Array,
    *,
    max_len: int,
    temperature: float = 1.0,
    top_k: int = 0,
    block_repeats: bool = False,
) -> DecodeOutput:
    """Samples one caption per image. features [B, ...], key: a PRNG key -> DecodeOutput.

    Step t draws with `jax.random.fold_in(key, t)`, so a fixed key reproduces the captions.
    `logprobs` [B, max_len] are the log-probabilities of the sampled words under the distribution
    sampled from, softmax(logits / temperature) (renormalized over the top_k words when
    top_k > 0), 0 after `<end>`. They are computed from the logits without stop_gradient, so
    `jax.grad` of a function of them reaches the parameters (REINFORCE / self-critical training);
    top_k=1 gives the greedy captions. `<pad>`, `<start>` and `<unk>` are never drawn (their
    logits are masked first, so the distribution is renormalized without them); block_repeats:
    words that `repeat_mask` forbids are excluded too.
    """
    check_positive("max_len", max_len)
    check_sampling(temperature, top_k)
    batch = features.shape[0]
    context, state = model.init_decode(features, max_len)
    _, num_locations = _step_shapes(model, context, state, batch)

    def step(carry, t):
        prev, state, finished, tokens = carry
        state, logits, attn = model.decode_step(context, state, prev)
        logits = mask_never_emitted(logits)
        if block_repeats:
            logits = jnp.where(repeat_mask(tokens, t, logits.shape[-1]), -jnp.inf, logits)
        cand_logp, cand_ids = _sample_step_distribution(logits, temperature, top_k)
        choice = jax.random.categorical(jax.random.fold_in(key, t), cand_logp, axis=-1)
        logp = jnp.take_along_axis(cand_logp, choice[:, None], axis=1)[:, 0]
        word = choice if cand_ids is None else jnp.take_along_axis(cand_ids, choice[:, None], 1)
        word = jnp.where(finished, text.PAD_ID, word.reshape(batch).astype(jnp.int32))
        logp = jnp.where(finished, 0.0, logp)
        attn = jnp.where(finished[:, None], 0.0, attn.astype(jnp.float32))
        tokens = tokens.at[:, t].set(word)
        return (word, state, finished | (word == text.END_ID), tokens), (word, logp, attn)

    def skip(carry, t):
        del t  # Every caption has ended: emit padding without running the decoder.
        zeros = jnp.zeros((batch,), jnp.float32)
        pad = jnp.full((batch,), text.PAD_ID, jnp.int32)
        return carry, (pad, zeros, jnp.zeros((batch, num_locations), jnp.float32))

    def scan_body(carry, t):
        # A scalar predicate, so only one branch runs; unlike while_loop, scan + cond is
        # reverse-mode differentiable.
        return jax.lax.cond(jnp.all(carry[2]), skip, step, carry, t)

    init = (
        jnp.full((batch,), text.START_ID, jnp.int32),
        state,
        jnp.zeros((batch,), bool),
        jnp.zeros((batch, max_len), jnp.int32),  # The words so far (for block_repeats).
    )
    _, (words, logps, attention) = jax.lax.scan(scan_body, init, jnp.arange(max_len))
    return DecodeOutput(
        jnp.swapaxes(words, 0, 1), jnp.swapaxes(attention, 0, 1), jnp.swapaxes(logps, 0, 1)
    )
