"""Show, Attend and Tell (`model.decoder='attention'`).

* `AttentionDecoder`: Show, Attend and Tell (Xu et al. 2015, "deterministic" soft attention), the
  attention inside the recurrence (`config.model.decoder='attention'`).

It implements the contract of `captioning.models.base.Decoder`, so training, greedy, beam search
and sampling work unchanged and return the attention weights of every generated word. Built by
`captioning.models.create_model`.

Show, Attend and Tell:
Per image: the spatial features a_1..a_L ([L, C], L = H*W locations) give the initial state
h_0 = tanh(W_h mean(a)), c_0 = tanh(W_c mean(a)). Per word t (paper eqs. 4-7 and section 4.2.1):

    e_ti    = w^T tanh(W_a a_i + U_a h_{t-1})          additive attention       [L]
    alpha_t = softmax_i(e_ti)                          sums to one over locations
    beta_t  = sigmoid(f_beta(h_{t-1}))                 gating scalar
    z_t     = beta_t * sum_i alpha_ti a_i              gated context            [C]
    h_t     = LSTM(h_{t-1}, [E y_{t-1}; z_t])
    logits  = L_o tanh(E y_{t-1} + L_h h_t + L_z z_t)  deep output layer

Locations (`config.model.attention_positions`, an addition to the paper): a conv feature says
*what* is at a location but hardly *where* (convolutions are translation-equivariant), so z_t, a
weighted mean of features, tells the LSTM what it looked at and not where, and captions that state
spatial relations ("left of") need the latter. With the option on, a_i gets its (row, column) in
[-1, 1] appended (C + 2 channels), so z_t also holds the attended position.

Training adds the doubly stochastic regularization lambda * sum_i (1 - sum_t alpha_ti)^2
(`captioning.models.attention.attention_regularizer`, weight `config.model.attention_reg`) from the
returned attention.

Speed: what does not depend on the step is hoisted out of the time loop. W_a a_i + b is computed
once per image (`AttentionContext.keys`), the word embeddings' gate inputs of the whole sequence
are one matmul before the scan, and the deep output of all steps one matmul after it (the scan
returns h_t and z_t). Inside the scan remain the attention scores (tanh over [B, L, A]), the
weighted sum over locations and one product [z_t, h_{t-1}] @ [W_z; W_rec], with the weights as its
left operand (`weights_first_matmul`: a product with only B rows repacks its right operand at every
call); its backward pass is written by hand (`attention_recurrence`) so that the weight gradients
are formed after the reverse loop, not accumulated in it. (Projecting the features to the gates
once per image, alpha_t @ (a W_z), saves multiply-adds but reads a [B, L, 4H] tensor every step
and accumulates its gradient every step: slower, configs/notes/flickr8k.md.)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from captioning.models.attention import (
    AttentionContext,
    GridAttentionDecoder,
    attention_mlp,
    spatial_input,
)
from captioning.models.base import register
from captioning.models.layers import (
    Dense,
    dropout,
    gradient_matmul,
    input_gradient_matmul,
    matmul,
    param,
    weights_first_matmul,
)
from captioning.models.lstm import LSTM, lstm_activate, lstm_activate_backward

Array = jax.Array


class AttentionWeights(NamedTuple):
    """The parameters Show-Attend-Tell's recurrence reads at every step.

    w_zh: [C + H, 4H] the context and recurrent gate weights stacked ([W_z; W_rec]).
    query: [H, A] U_a; score: [A, 1] w; gate_w: [H, 1], gate_b: [1] f_beta.
    """

    w_zh: Array
    query: Array
    score: Array
    gate_w: Array
    gate_b: Array


class StepResiduals(NamedTuple):
    """What one step of the recurrence computed that its backward pass reads (each [B, ...]):
    the state it started from (h, c), its cell c_next, the gates' activations [4H], alpha [L],
    beta [1], the attended context [C] and z = beta * context [C]."""

    h: Array
    c: Array
    c_next: Array
    activations: Array
    alpha: Array
    beta: Array
    context: Array
    z: Array


def _attend(weights: AttentionWeights, keys: Array, values: Array, h: Array, dtype: Any):
    """Where to look from the previous state h [B, H] (`weights.w_zh` is not read) -> (alpha
    [B, L], beta [B, 1], the attended context [B, C], z = beta * context [B, C])."""
    hidden = attention_mlp(keys, h, weights.query, dtype)  # [B, L, A]
    # Matrix-vector products in float32: [L, A] x [A] and [L] x [L, C] per image gain nothing
    # from a narrower dtype but its conversions.
    alpha = jax.nn.softmax(matmul(hidden, weights.score, jnp.float32)[..., 0], axis=-1)
    beta = jax.nn.sigmoid(matmul(h, weights.gate_w, dtype) + weights.gate_b)
    context = jnp.einsum("bl,blc->bc", alpha, values)
    return alpha, beta, context, beta * context


def _recurrence_step(
    weights: AttentionWeights,
    keys: Array,
    values: Array,
    state: tuple[Array, Array],
    word_gates: Array,
    dtype: Any,
) -> tuple[tuple[Array, Array], StepResiduals]:
    """One word of Show-Attend-Tell: keys [B, L, A], values [B, L, C] float32, (h, c) [B, H],
    the word's gate inputs [B, 4H] -> ((h', c'), StepResiduals). `weights.w_zh` is transposed
    here: [4H, C + H]."""
    h, c = state
    alpha, beta, context, z = _attend(weights, keys, values, h, dtype)
    gates = word_gates + weights_first_matmul(weights.w_zh, jnp.concatenate([z, h], axis=-1), dtype)
    h_next, c_next, activations = lstm_activate(gates, c)
    return (h_next, c_next), StepResiduals(h, c, c_next, activations, alpha, beta, context, z)


def _attention_forward(weights, keys, values, h0, c0, word_gates_tbg, dtype):
    """-> (h [T, B, H], the steps' residuals stacked over T)."""
    # Cast and transpose once, not every step.
    weights = weights._replace(w_zh=weights.w_zh.T.astype(dtype))

    def step(state, word_gates):
        state, residuals = _recurrence_step(weights, keys, values, state, word_gates, dtype)
        return state, (state[0], residuals)

    _, (h, residuals) = jax.lax.scan(step, (h0, c0), word_gates_tbg)
    return h, residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def attention_recurrence(
    weights: AttentionWeights,
    keys: Array,
    values: Array,
    h0: Array,
    c0: Array,
    word_gates_tbg: Array,
    dtype: Any,
) -> tuple[Array, Array, Array]:
    """Show-Attend-Tell over a sequence: keys [B, L, A], values [B, L, C], initial state [B, H],
    the words' gate inputs [T, B, 4H] -> (h [T, B, H], alpha [T, B, L], z [T, B, C]).

    The same values as `_recurrence_step` in a `lax.scan`. The hand-written backward pass differs
    from autodiff's in where the weight gradients are formed: autodiff adds x_t^T dy_t into every
    weight's gradient inside the reverse loop (a read-modify-write of the whole [C + H, 4H] matrix
    at every word); here the loop only stacks each product's output gradient, and every weight
    gradient is one [.., T*B] x [T*B, ..] product after it. (The keys' and score vector's
    gradients, elementwise over [B, L, A], are summed in the loop; the features' gradient is one
    product after it.)
    """
    h, residuals = _attention_forward(weights, keys, values, h0, c0, word_gates_tbg, dtype)
    return h, residuals.alpha, residuals.z


def _attention_fwd(weights, keys, values, h0, c0, word_gates_tbg, dtype):
    h, residuals = _attention_forward(weights, keys, values, h0, c0, word_gates_tbg, dtype)
    return (h, residuals.alpha, residuals.z), (weights, keys, values, residuals)


def _attention_bwd(dtype, saved, cotangents):
    weights, keys, values, residuals = saved
    dh_out, dalpha_out, dz_out = cotangents
    h_prev, c_prev, c, activations, alpha, beta, context, z = residuals
    context_dim = values.shape[-1]
    w_zh = weights.w_zh.astype(dtype)  # Cast once; contracted over its 4H columns below.
    query_w = weights.query.astype(dtype)  # [H, A], cast once
    score = weights.score[:, 0]  # [A]
    gate_w = weights.gate_w[:, 0]  # [H]

    def step(carry, xs):
        dh_next, dc_next, d_keys, d_score = carry  # From step t+1, and sums over the steps.
        dh_out, dalpha_out, dz_out, h_before, c_before, c, acts, alpha, beta, context = xs
        # The attention MLP's [B, L, A] activations again: cheaper than keeping them for every step.
        hidden = attention_mlp(keys, h_before, weights.query, dtype)
        dgates, dc_before = lstm_activate_backward(dh_out + dh_next, dc_next, c_before, c, acts)
        # dgates [B, 4H] x w_zh [C + H, 4H] over 4H, w_zh as it lies as the left operand.
        d_zh = weights_first_matmul(w_zh, dgates, dtype)  # [B, C + H]
        dz = dz_out + d_zh[:, :context_dim]
        d_beta = jnp.sum(dz * context, axis=-1, keepdims=True)  # [B, 1]
        d_context = dz * beta
        d_alpha = dalpha_out + jnp.einsum("bc,blc->bl", d_context, values)
        d_scores = alpha * (d_alpha - jnp.sum(alpha * d_alpha, axis=-1, keepdims=True))
        d_pre = d_scores[..., None] * score * (1.0 - hidden * hidden)  # [B, L, A]
        d_query = d_pre.sum(axis=1)  # [B, A]
        d_gate = d_beta * beta * (1.0 - beta)  # [B, 1]
        d_h_query = input_gradient_matmul(d_query, query_w, dtype)  # [B, H]
        dh_prev = d_zh[:, context_dim:] + d_h_query + d_gate * gate_w
        d_score = d_score + jnp.sum(hidden * d_scores[..., None], axis=(0, 1))
        outputs = (dgates, d_query, d_gate, d_context)
        return (dh_prev, dc_before, d_keys + d_pre, d_score), outputs

    zeros = jnp.zeros_like(dh_out[0])
    init = (zeros, zeros, jnp.zeros_like(keys), jnp.zeros_like(score))
    xs = (dh_out, dalpha_out, dz_out, h_prev, c_prev, c, activations, alpha, beta, context)
    (dh0, dc0, d_keys, d_score), (dgates, d_query, d_gate, d_context) = jax.lax.scan(
        step, init, xs, reverse=True
    )

    def flat(x):  # [T, B, D] -> [T*B, D]
        return x.reshape(-1, x.shape[-1])

    zh = flat(jnp.concatenate([z, h_prev], axis=-1))
    d_weights = AttentionWeights(
        w_zh=gradient_matmul(zh, flat(dgates), dtype),
        query=gradient_matmul(flat(h_prev), flat(d_query), dtype),
        score=d_score[:, None],
        gate_w=gradient_matmul(flat(h_prev), flat(d_gate), dtype),
        gate_b=flat(d_gate).sum(axis=0),
    )
    # The features' gradient (unused when only the parameters are trained, and then dropped).
    d_values = jnp.einsum("tbl,tbc->blc", alpha, d_context).astype(values.dtype)
    return d_weights, d_keys, d_values, dh0, dc0, dgates


attention_recurrence.defvjp(_attention_fwd, _attention_bwd)


@register("attention")
class AttentionDecoder(GridAttentionDecoder):
    """Show, Attend and Tell soft-attention LSTM over [B, H, W, C] (or [B, L, C]) features."""

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
        attention_reg: float = 0.0,
    ):
        self.attention_reg = attention_reg
        self.dropout_rate = dropout_rate
        self.use_image = use_image
        self.positions = positions
        self.dtype = dtype
        feature_dim += 2 if positions else 0  # (row, column) appended to every location.
        # Initial state from the mean annotation vector (paper section 3.1.2).
        self.init_h = Dense(feature_dim, hidden_size, rngs=rngs, dtype=dtype)
        self.init_c = Dense(feature_dim, hidden_size, rngs=rngs, dtype=dtype)
        # Additive attention: w^T tanh(W_a a_i + b + U_a h).
        self.att_keys = Dense(feature_dim, attention_dim, rngs=rngs, dtype=dtype)
        self.att_query = param(rngs, (hidden_size, attention_dim))
        self.att_score = param(rngs, (attention_dim, 1))
        # Gating scalar beta = sigmoid(f_beta(h)) (section 4.2.1).
        self.gate = Dense(hidden_size, 1, rngs=rngs, dtype=dtype)
        # LSTM over [E y; z]: `lstm.w_in` holds the word part, `context_w` the context part (the
        # same parameters as one matrix over the concatenation, split so the two can be hoisted).
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.lstm = LSTM(embed_dim, hidden_size, rngs=rngs, dtype=dtype)
        self.context_w = param(rngs, (feature_dim, 4 * hidden_size))
        # Deep output: L_o tanh(E y + L_h h + L_z z).
        self.out_state = Dense(hidden_size, embed_dim, rngs=rngs, dtype=dtype)
        self.out_context = param(rngs, (feature_dim, embed_dim))
        self.out_proj = Dense(embed_dim, vocab_size, rngs=rngs, dtype=dtype)

    # -- per image -------------------------------------------------------------------------------

    def _prepare(self, features: Array) -> tuple[AttentionContext, tuple[Array, Array]]:
        """features [B, H, W, C] | [B, L, C] -> (context, initial LSTM state (h, c) [B, H])."""
        feats = spatial_input(features, self.use_image, self.positions)  # [B, L, C]
        mean = feats.mean(axis=1)
        state = (jnp.tanh(self.init_h(mean)), jnp.tanh(self.init_c(mean)))
        context = AttentionContext(values=feats, keys=self.att_keys(feats))
        return context, state

    # -- per word --------------------------------------------------------------------------------

    def _weights(self, stacked: bool = True) -> AttentionWeights:
        """The recurrence's parameters, the context and recurrent gate weights as one matrix
        (None unless `stacked`: decoding reads them apart rather than copy [C + H, 4H] a word)."""
        w_zh = jnp.concatenate([self.context_w[...], self.lstm.w_rec[...]]) if stacked else None
        return AttentionWeights(
            w_zh,
            self.att_query[...],
            self.att_score[...],
            self.gate.kernel[...],
            self.gate.bias[...],
        )

    def _pre_logits(
        self,
        words: Array,
        h: Array,
        z: Array,
        keys: tuple[Array | None, Array | None],
        train: bool,
    ) -> Array:
        """Deep output up to L_o: words [B, T, E], h [B, T, H], z [B, T, C] -> [B, T, E]."""
        k_h, k_out = keys
        h = dropout(h, self.dropout_rate, k_h, train)
        z_out = matmul(z, self.out_context[...], self.dtype)
        deep = jnp.tanh(words + self.out_state(h) + z_out)
        return dropout(deep, self.dropout_rate, k_out, train)

    # -- the decoder interface -------------------------------------------------------------------

    def pre_logits(
        self, features: Array, tokens_in: Array, *, train: bool = False, key: Array | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """Teacher forcing up to the output layer: -> ([B, T, E] input of `out_proj`, aux)."""
        k_emb, k_h, k_out = jax.random.split(key, 3) if key is not None else (None,) * 3
        context, state = self._prepare(features)
        words = dropout(self.embed(tokens_in), self.dropout_rate, k_emb, train)  # [B, T, E]
        word_gates = self.lstm.project_inputs(words)  # [B, T, 4H], one matmul for all steps
        word_gates_tbg = jnp.swapaxes(word_gates, 0, 1)

        # The context and recurrent gate inputs as one product [z_t, h_{t-1}] @ [W_z; W_rec].
        h, alpha, z = attention_recurrence(
            self._weights(), context.keys, context.values, *state, word_gates_tbg, self.dtype
        )
        h, alpha, z = (jnp.swapaxes(x, 0, 1) for x in (h, alpha, z))  # batch-major
        return self._pre_logits(words, h, z, (k_h, k_out), train), {"attention": alpha}

    def init_decode(
        self, features: Array, max_len: int | None = None
    ) -> tuple[AttentionContext, tuple[Array, Array]]:
        """features [B, H, W, C] | [B, L, C] -> (AttentionContext, LSTM state (h, c))."""
        return self._prepare(features)

    def decode_step(
        self, context: AttentionContext, state: tuple[Array, Array], tokens: Array
    ) -> tuple[tuple[Array, Array], Array, Array]:
        """tokens [B] -> (state, logits [B, V] float32, attention [B, L] of this word)."""
        words = self.embed(tokens)  # [B, E]
        weights = self._weights(stacked=False)
        alpha, _, _, z = _attend(weights, context.keys, context.values, state[0], self.dtype)
        gates = self.lstm.project_inputs(words) + matmul(z, self.context_w[...], self.dtype)
        state = self.lstm.cell(state, gates)  # + h @ W_rec: [z, h] @ [W_z; W_rec] in two parts
        deep = self._pre_logits(words[:, None], state[0][:, None], z[:, None], (None, None), False)
        return state, self.out_proj(deep)[:, 0], alpha
