"""Jitted, batched caption decoding over any decoder of `captioning.models`.

Decoding runs inside one `lax.while_loop` per batch (no per-word Python calls into the model) and
stops as soon as every caption has produced `<end>`, or at `max_len` words.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from captioning import text

Array = jax.Array


class DecodeOutput(NamedTuple):
    """tokens: [B, max_len] int32 (padded with 0 after `<end>`); attention: [B, max_len, L];
    logprobs: [B, max_len] float32 log-probability of each emitted token (0 after the end)."""

    tokens: Array
    attention: Array
    logprobs: Array


def greedy_decode(model: nnx.Module, features: Array, max_len: int) -> DecodeOutput:
    """Most likely word at each step. features [B, ...] -> DecodeOutput."""
    batch = features.shape[0]
    context, state = model.init_decode(features)
    start = jnp.full((batch,), text.START_ID, jnp.int32)
    num_locations = jax.eval_shape(lambda: model.decode_step(context, state, start))[2].shape[-1]

    def cond(carry):
        t, _, _, _, _, finished, _ = carry
        return (t < max_len) & ~jnp.all(finished)

    def body(carry):
        t, tokens, prev, state, logps, finished, attention = carry
        state, logits, attn = model.decode_step(context, state, prev)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
        word = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
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


def decode_fn(graphdef: nnx.GraphDef, decode_config: Any):
    """-> jitted `fn(params, features) -> DecodeOutput` for `decode_config.method`."""
    method = decode_config.method
    if method != "greedy":
        from captioning import search  # Beam search and sampling.

        return search.decode_fn(graphdef, decode_config)

    @jax.jit
    def fn(params, features):
        model = nnx.merge(graphdef, params)
        return greedy_decode(model, features, decode_config.max_len)

    return fn
