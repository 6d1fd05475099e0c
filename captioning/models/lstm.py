"""The LSTM shared by the recurrent decoders: fused gates [i, f, g, o], the input projection
hoisted out of the time loop, and a hand-written backward pass (`lstm_recurrence`).

Only `h @ W_rec` runs inside the scan, and in the backward pass only `dgates @ W_rec^T`: the weight
gradient is one matmul after the reverse loop.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from captioning.models.layers import dropout, gradient_matmul, input_gradient_matmul, matmul

Array = jax.Array


class LSTM(nnx.Module):
    """LSTM with fused gates [i, f, g, o]; input projection hoisted out of the time loop."""

    def __init__(self, in_dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.hidden = hidden
        self.dtype = dtype
        self.w_in = nnx.Param(
            nnx.initializers.lecun_normal()(rngs.params(), (in_dim, 4 * hidden), jnp.float32)
        )
        self.w_rec = nnx.Param(
            nnx.initializers.orthogonal()(rngs.params(), (hidden, 4 * hidden), jnp.float32)
        )
        # Forget-gate bias 1 keeps early gradients flowing through time.
        bias = jnp.zeros((4, hidden), jnp.float32).at[1].set(1.0).reshape(-1)
        self.bias = nnx.Param(bias)

    def zero_state(self, batch: int) -> tuple[Array, Array]:
        """(h, c), each [batch, hidden] float32."""
        zeros = jnp.zeros((batch, self.hidden), jnp.float32)
        return zeros, zeros

    def project_inputs(self, x: Array) -> Array:
        """[..., in_dim] -> [..., 4*hidden] input part of the gates (bias included)."""
        return matmul(x, self.w_in[...], self.dtype) + self.bias[...]

    def project_words(
        self, embedding: Array, tokens: Array, rate: float, key: Array | None, train: bool
    ) -> Array:
        """The words' input part of the gates, the word embedding matrix [V, E] and tokens
        [B, T] -> [B, T, 4H], dropout acting on the matrix (each entry dropped for all of that
        word's uses in the batch).

        The projection is linear in the matrix's rows, so with a vocabulary smaller than the
        batch's tokens (the scenes) it runs once per word and is gathered: the same numbers as
        projecting every token, a fraction of the product and of its gradients.
        """
        table = dropout(embedding, rate, key, train)  # [V, E]
        if table.shape[0] < tokens.size:
            return jnp.take(self.project_inputs(table), tokens, axis=0)
        return self.project_inputs(jnp.take(table, tokens, axis=0))

    def step_words(self, embedding: Array, tokens: Array) -> Array:
        """The words' input part of the gates in a decoding step: embedding [V, E], tokens [B]
        -> [B, 4H], gathered from the projected vocabulary [V, 4H]. Inside decoding's while
        loop the table does not change, so XLA hoists its product out of the loop: each step
        then gathers rows instead of multiplying [B, E] x [E, 4H]."""
        return jnp.take(self.project_inputs(embedding), tokens, axis=0)

    def cell(self, state: tuple[Array, Array], gates_in: Array) -> tuple[Array, Array]:
        """One step from projected inputs [B, 4H]; returns the new (h, c)."""
        h, c, _ = _lstm_step(self.w_rec[...], state, gates_in, self.dtype)
        return h, c

    def scan(self, state: tuple[Array, Array], gates_in_btg: Array) -> Array:
        """Runs the recurrence over [B, T, 4H] projected inputs; returns h [B, T, H]."""
        h_tbh = lstm_recurrence(
            self.w_rec[...], state[0], state[1], jnp.swapaxes(gates_in_btg, 0, 1), self.dtype
        )
        return jnp.swapaxes(h_tbh, 0, 1)


def _lstm_step(
    w_rec: Array, state: tuple[Array, Array], gates_in: Array, dtype: Any
) -> tuple[Array, Array, Array]:
    """The LSTM's one formula: (h, c) [B, H] and gate inputs [B, 4H] -> (h', c', the gates'
    activations [i, f, g, o] [B, 4H], which only the backward pass of `lstm_recurrence` keeps)."""
    h, c = state
    return lstm_activate(gates_in + matmul(h, w_rec, dtype), c)


def lstm_activate(gates: Array, c: Array) -> tuple[Array, Array, Array]:
    """Pre-activations [i, f, g, o] [B, 4H] and the cell c [B, H] -> (h', c', the gates'
    activations [B, 4H])."""
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c = f * c + i * g
    h = o * jnp.tanh(c)
    return h, c, jnp.concatenate([i, f, g, o], axis=-1)


def lstm_activate_backward(
    dh: Array, dc_next: Array, c_before: Array, c: Array, activations: Array
) -> tuple[Array, Array]:
    """Backward of `lstm_activate`: dL/dh' (all of it), dL/dc' from the next step, the cell
    before and after, the activations -> (dL/dgates [B, 4H], dL/dc before)."""
    i, f, g, o = jnp.split(activations, 4, axis=-1)
    tanh_c = jnp.tanh(c)
    dc = dc_next + dh * o * (1.0 - tanh_c * tanh_c)
    dgates = jnp.concatenate(
        [
            dc * g * i * (1.0 - i),  # input gate (sigmoid)
            dc * c_before * f * (1.0 - f),  # forget gate (sigmoid)
            dc * i * (1.0 - g * g),  # candidate (tanh)
            dh * tanh_c * o * (1.0 - o),  # output gate (sigmoid)
        ],
        axis=-1,
    )
    return dgates, dc * f


def _recurrence_forward(w_rec, h0, c0, gates_in_tbg, dtype):
    """The LSTM over [T, B, 4H] gate inputs -> (h [T, B, H], (c [T, B, H], activations))."""

    def step(state, gates_in):
        h, c, activations = _lstm_step(w_rec, state, gates_in, dtype)
        return (h, c), (h, c, activations)

    _, (h_tbh, c_tbh, activations) = jax.lax.scan(step, (h0, c0), gates_in_tbg)
    return h_tbh, (c_tbh, activations)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lstm_recurrence(w_rec: Array, h0: Array, c0: Array, gates_in_tbg: Array, dtype: Any) -> Array:
    """h_t of the LSTM (gates [i, f, g, o] = gates_in_t + h_{t-1} @ w_rec) -> h [T, B, H].

    Same values as `LSTM.cell` in a `lax.scan`; the hand-written backward pass differs from
    autodiff's in one place: autodiff adds h_{t-1}^T dgates_t into dW_rec at every step (a small
    [H, B] x [B, 4H] product inside the reverse loop), here the loop only stacks dgates_t and dW_rec
    is one [H, T*B] x [T*B, 4H] product after it (faster: configs/notes/speed.md).
    """
    return _recurrence_forward(w_rec, h0, c0, gates_in_tbg, dtype)[0]


def _recurrence_fwd(w_rec, h0, c0, gates_in_tbg, dtype):
    h_tbh, (c_tbh, activations) = _recurrence_forward(w_rec, h0, c0, gates_in_tbg, dtype)
    return h_tbh, (w_rec, h0, c0, h_tbh, c_tbh, activations)


def _recurrence_bwd(dtype, residuals, dh_tbh):
    w_rec, h0, c0, h_tbh, c_tbh, activations = residuals
    # The states each step started from: the initial state, then every step's result but the last.
    h_prev = jnp.concatenate([h0[None], h_tbh[:-1]], axis=0)
    c_prev = jnp.concatenate([c0[None], c_tbh[:-1]], axis=0)
    w_rec = w_rec.astype(dtype)  # Cast once, not every step.

    def step(carry, xs):
        dh_next, dc_next = carry  # Gradients flowing back from step t+1 into h_t and c_t.
        dh_out, c_before, acts, c = xs
        dgates, dc_before = lstm_activate_backward(dh_out + dh_next, dc_next, c_before, c, acts)
        return (input_gradient_matmul(dgates, w_rec, dtype), dc_before), dgates

    zeros = jnp.zeros_like(dh_tbh[0])
    (dh0, dc0), dgates = jax.lax.scan(
        step, (zeros, zeros), (dh_tbh, c_prev, activations, c_tbh), reverse=True
    )
    return gradient_matmul(h_prev, dgates, dtype), dh0, dc0, dgates


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
