"""The merge decoder with spatial attention at its output (`model.decoder='merge_attention'`).

`MergeAttentionDecoder` implements the contract of `captioning.models.base.Decoder`, so training,
greedy, beam search and sampling work unchanged and return the attention weights of every
generated word. With `feed_dim` > 0 the LSTM reads what the previous word's lookup saw, so the
lookups run inside the recurrence: `fed_recurrence` is that loop, with a hand-written backward
pass.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from captioning.models.attention import (
    AttentionContext,
    GridAttentionDecoder,
    additive_attention,
    attention_mlp,
    spatial_input,
    weighted_sum,
)
from captioning.models.base import register
from captioning.models.layers import Dense, dropout, matmul, param
from captioning.models.lstm import LSTM, lstm_activate, lstm_activate_backward

Array = jax.Array


class FedWeights(NamedTuple):
    """The parameters the fed recurrence reads: w_rec [H, 4H] (LSTM), feed_gates W_f [F, 4H],
    query U [H, A] and score w [A, 1] (attention)."""

    w_rec: Array
    feed_gates: Array
    query: Array
    score: Array


def _fed_forward(weights: FedWeights, keys, feed_values, h0, c0, word_gates_tbg, dtype):
    """-> (h [T, B, H], alpha [T, B, L], residuals: c [T, B, H], gate activations [T, B, 4H],
    seen [T, B, F] (what step t read: the previous lookup's f_{t-1}, zeros at t = 0))."""

    def step(carry, word_gates):
        h, c, alpha_prev = carry
        seen = jnp.einsum("bl,blf->bf", alpha_prev, feed_values)  # [B, F]
        gates = word_gates + matmul(seen, weights.feed_gates, dtype)
        h, c, activations = lstm_activate(gates + matmul(h, weights.w_rec, dtype), c)
        alpha = additive_attention(keys, h, weights.query, weights.score, dtype)  # [B, L]
        return (h, c, alpha), (h, alpha, c, activations, seen)

    nothing = jnp.zeros(keys.shape[:2], jnp.float32)  # Before the first word.
    _, (h, alpha, c, activations, seen) = jax.lax.scan(step, (h0, c0, nothing), word_gates_tbg)
    return h, alpha, (c, activations, seen)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def fed_recurrence(
    weights: FedWeights,
    keys: Array,
    feed_values: Array,
    h0: Array,
    c0: Array,
    word_gates_tbg: Array,
    dtype: Any,
) -> tuple[Array, Array]:
    """The LSTM that reads its previous lookup: keys [B, L, A], feed values r_i [B, L, F], the
    initial state [B, H], the words' gate inputs [T, B, 4H] -> (h [T, B, H], alpha [T, B, L]).

    Per word t: f_{t-1} = sum_i alpha_{t-1,i} r_i (zeros for t = 0), gates = x_t + W_f f_{t-1} +
    W_rec h_{t-1}, (h_t, c_t) = LSTM(gates, c_{t-1}), alpha_t = softmax_i(w^T tanh(k_i + U h_t)).
    As `show_attend_tell.attention_recurrence`, the backward pass keeps the weight gradients out
    of the reverse loop (each is one [.., T*B] x [T*B, ..] product after it; autodiff would
    read-modify-write every weight at every word) and recomputes the [B, L, A] tanh rather than
    stacking it.
    """
    h, alpha, _ = _fed_forward(weights, keys, feed_values, h0, c0, word_gates_tbg, dtype)
    return h, alpha


def _fed_fwd(weights, keys, feed_values, h0, c0, word_gates_tbg, dtype):
    h, alpha, residuals = _fed_forward(weights, keys, feed_values, h0, c0, word_gates_tbg, dtype)
    return (h, alpha), (weights, keys, feed_values, h0, c0, h, alpha, residuals)


def _fed_bwd(dtype, saved, cotangents):
    weights, keys, feed_values, h0, c0, h, alpha, (c, activations, seen) = saved
    dh_out, dalpha_out = cotangents
    h_prev = jnp.concatenate([h0[None], h[:-1]], axis=0)
    c_prev = jnp.concatenate([c0[None], c[:-1]], axis=0)
    w_rec_t = weights.w_rec.T
    feed_gates_t = weights.feed_gates.T
    query_t = weights.query.T
    score = weights.score[:, 0]  # [A]

    def step(carry, xs):
        # From step t+1: gradients into h_t, c_t and alpha_t (through what step t+1 read).
        dh_next, dc_next, dalpha_next, d_keys, d_score = carry
        dh_out, dalpha_out, h_t, alpha_t, h_before, c_before, c_t, acts = xs
        hidden = attention_mlp(keys, h_t, weights.query, dtype)  # [B, L, A], again
        d_alpha = dalpha_out + dalpha_next
        d_scores = alpha_t * (d_alpha - jnp.sum(alpha_t * d_alpha, axis=-1, keepdims=True))
        d_pre = d_scores[..., None] * score * (1.0 - hidden * hidden)  # [B, L, A]
        d_query = d_pre.sum(axis=1)  # [B, A]
        dh = dh_out + dh_next + matmul(d_query, query_t, dtype)
        dgates, dc_before = lstm_activate_backward(dh, dc_next, c_before, c_t, acts)
        d_seen = matmul(dgates, feed_gates_t, dtype)  # [B, F]
        dalpha_before = jnp.einsum("bf,blf->bl", d_seen, feed_values)
        d_score = d_score + jnp.sum(hidden * d_scores[..., None], axis=(0, 1))
        carry = (matmul(dgates, w_rec_t, dtype), dc_before, dalpha_before, d_keys + d_pre, d_score)
        return carry, (dgates, d_query, d_seen)

    zeros = jnp.zeros_like(dh_out[0])
    no_alpha = jnp.zeros_like(dalpha_out[0])
    init = (zeros, zeros, no_alpha, jnp.zeros_like(keys), jnp.zeros_like(score))
    xs = (dh_out, dalpha_out, h, alpha, h_prev, c_prev, c, activations)
    (dh0, dc0, _, d_keys, d_score), (dgates, d_query, d_seen) = jax.lax.scan(
        step, init, xs, reverse=True
    )

    def flat(x):  # [T, B, D] -> [T*B, D]
        return x.reshape(-1, x.shape[-1])

    d_weights = FedWeights(
        w_rec=matmul(flat(h_prev).T, flat(dgates), dtype),
        feed_gates=matmul(flat(seen).T, flat(dgates), dtype),
        query=matmul(flat(h).T, flat(d_query), dtype),
        score=d_score[:, None],
    )
    # What step t read was alpha_{t-1} (nothing at t = 0).
    alpha_prev = jnp.concatenate([jnp.zeros_like(alpha[:1]), alpha[:-1]], axis=0)
    d_feed_values = jnp.einsum("tbl,tbf->blf", alpha_prev, d_seen)
    return d_weights, d_keys, d_feed_values, dh0, dc0, dgates


fed_recurrence.defvjp(_fed_fwd, _fed_bwd)


@register("merge_attention")
class MergeAttentionDecoder(GridAttentionDecoder):
    """The merge decoder with spatial attention at its output (Lu et al. 2017, "Knowing When to
    Look", section 2.2): what is added to the LSTM's output h_t is no longer one pooled vector but
    a context looked up *with h_t itself*.

    Per image, from the locations a_1..a_L ([L, C], positions appended when configured):
        v = relu(W_v mean(a))           the merge decoder's pooled image embedding  [H]
        k_i = W_k a_i + b,  u_i = W_u a_i                     keys [L, A], values [L, H]
    Per word t:
        alpha_t = softmax_i(w^T tanh(k_i + U h_t))                                  [L]
        c_t = sum_i alpha_ti u_i                                                    [H]
        logits_t = dense(V)(relu(dense(H)(v + c_t + h_t)))

    Why for the scenes: naming "a blue ..." then its shape needs the shape *of the blue object*;
    a pooled vector mixes all objects (binding errors), while h_t, having just emitted "blue", can
    look at the blue object's cells. Since alpha_t depends on h_t and not on h_{t-1}, all steps'
    lookups can run in parallel after the LSTM's scan, unlike Show-Attend-Tell's.

    `feed_dim` F > 0 closes the loop a little: the LSTM also reads what the previous word's lookup
    saw, f_{t-1} = sum_i alpha_{t-1,i} r_i with small per-location values r_i = W_r a_i [F], as
    gate inputs W_f f_{t-1} (Luong et al.'s input feeding, through an F-dim bottleneck). Stating a
    spatial relation after naming an object needs to know where that object is, which the LSTM
    otherwise never sees. The attention weights then run inside the recurrence (cheap: [L] per
    word); the contexts c_t still come after it, all at once.

    Dropout on the words acts on the embedding matrix, so the words' part of the gates is one
    [V, 4H] table per step, gathered by token (`LSTM.project_words`): with the scenes' small
    vocabulary the largest input product of the step shrinks to a few rows.
    """

    own_options: ClassVar[dict[str, Any]] = {"feed_dim": 0}

    @classmethod
    def extra_kwargs(cls, model_config) -> dict[str, Any]:
        return {"feed_dim": int(model_config.feed_dim)}

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        *,
        embed_dim: int,
        hidden_size: int,
        attention_dim: int,
        dropout_rate: float,
        use_image: bool,
        rngs: nnx.Rngs,
        positions: bool = False,
        dtype: Any = jnp.float32,
        feed_dim: int = 0,
        attention_reg: float = 0.0,
    ):
        self.attention_reg = attention_reg
        self.dropout_rate = dropout_rate
        self.use_image = use_image
        self.positions = positions
        self.dtype = dtype
        self.feed_dim = feed_dim
        feature_dim += 2 if positions else 0
        self.image_proj = Dense(feature_dim, hidden_size, rngs=rngs, dtype=dtype)
        self.att_keys = Dense(feature_dim, attention_dim, rngs=rngs, dtype=dtype)
        self.att_values = param(rngs, (feature_dim, hidden_size))
        self.att_query = param(rngs, (hidden_size, attention_dim))
        # Unit-variance scores w^T tanh(.) from the start (lecun init would give 1/A): sharper
        # first lookups, which the feeding below learns from much better (configs/notes/scenes.md).
        score_init = nnx.initializers.variance_scaling(attention_dim, "fan_in", "truncated_normal")
        self.att_score = nnx.Param(score_init(rngs.params(), (attention_dim, 1), jnp.float32))
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.lstm = LSTM(embed_dim, hidden_size, rngs=rngs, dtype=dtype)
        self.merge_proj = Dense(hidden_size, hidden_size, rngs=rngs, dtype=dtype)
        self.out_proj = Dense(hidden_size, vocab_size, rngs=rngs, dtype=dtype)
        if feed_dim:
            self.feed_values = param(rngs, (feature_dim, feed_dim))
            self.feed_gates = param(rngs, (feed_dim, 4 * hidden_size))

    def _prepare(self, features: Array, key: Array | None, train: bool):
        """features [B, H, W, C] | [B, L, C] -> (pooled v [B, H], context, fed values [B, L, F]
        or None)."""
        feats = spatial_input(features, self.use_image, self.positions)
        feats = dropout(feats, self.dropout_rate, key, train)  # [B, L, C]
        pooled = jax.nn.relu(self.image_proj(feats.mean(axis=1)))
        values = matmul(feats, self.att_values[...], self.dtype)  # [B, L, H]
        context = AttentionContext(values=values, keys=self.att_keys(feats))
        feed_values = None
        if self.feed_dim:
            feed_values = matmul(feats, self.feed_values[...], self.dtype)  # [B, L, F]
        return pooled, context, feed_values

    def _weights(self, context: AttentionContext, h: Array) -> Array:
        """h [B, T, H] -> alpha [B, T, L] summing to 1 over the locations."""
        return additive_attention(
            context.keys, h, self.att_query[...], self.att_score[...], self.dtype
        )

    def _output(self, pooled: Array, context: AttentionContext, h: Array, alpha: Array) -> Array:
        """h, alpha [B, T, ...] -> pre-logits relu(dense(v + c_t + h_t)) [B, T, H]."""
        attended = weighted_sum(alpha, context.values, self.dtype)  # [B, T, H]
        return jax.nn.relu(self.merge_proj(pooled[:, None, :] + attended + h))

    def _feed(self, feed_values: Array, alpha: Array) -> Array:
        """alpha [B, L] of the previous word -> its part of the LSTM's gates [B, 4H]."""
        seen = jnp.einsum("bl,blf->bf", alpha, feed_values)  # [B, F]
        return matmul(seen, self.feed_gates[...], self.dtype)

    def pre_logits(
        self, features: Array, tokens_in: Array, *, train: bool = False, key: Array | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """Teacher forcing up to the output layer: -> ([B, T, H] input of `out_proj`, aux)."""
        k_img, k_emb = jax.random.split(key) if key is not None else (None, None)
        pooled, context, feed_values = self._prepare(features, k_img, train)
        gates = self.lstm.project_words(  # [B, T, 4H], all steps at once
            self.embed.embedding[...], tokens_in, self.dropout_rate, k_emb, train
        )
        state = self.lstm.zero_state(tokens_in.shape[0])
        if feed_values is None:
            h = self.lstm.scan(state, gates)
            alpha = self._weights(context, h)
        else:  # Only the [L] weights run inside the recurrence.
            weights = FedWeights(
                self.lstm.w_rec[...], self.feed_gates[...], self.att_query[...], self.att_score[...]
            )
            h, alpha = fed_recurrence(
                weights, context.keys, feed_values, *state, jnp.swapaxes(gates, 0, 1), self.dtype
            )
            h, alpha = jnp.swapaxes(h, 0, 1), jnp.swapaxes(alpha, 0, 1)
        return self._output(pooled, context, h, alpha), {"attention": alpha}

    def init_decode(self, features: Array, max_len: int | None = None):
        """-> ((pooled embedding, context, fed values), (h, c, alpha of the previous word))."""
        pooled, context, feed_values = self._prepare(features, None, False)
        h, c = self.lstm.zero_state(features.shape[0])
        nothing = jnp.zeros(context.keys.shape[:2], jnp.float32)
        return (pooled, context, feed_values), (h, c, nothing)

    def decode_step(self, context, state, tokens: Array):
        """tokens [B] -> (state, logits [B, V] float32, attention [B, L] of this word)."""
        pooled, attention_context, feed_values = context
        h, c, alpha_prev = state
        gates = self.lstm.step_words(self.embed.embedding[...], tokens)
        if feed_values is not None:
            gates = gates + self._feed(feed_values, alpha_prev)
        h, c = self.lstm.cell((h, c), gates)
        alpha = self._weights(attention_context, h[:, None, :])
        pre_logits = self._output(pooled, attention_context, h[:, None, :], alpha)
        return (h, c, alpha[:, 0]), self.out_proj(pre_logits)[:, 0], alpha[:, 0]
