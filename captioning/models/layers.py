"""Building blocks of every decoder: mixed-precision matmul, dropout, Dense, the LSTM (with its
hand-written backward pass) and the `Decoder` interface.

Every decoder (`captioning.models`, `captioning.models.show_attend_tell`) exposes the same entry
points, so training and every decoding method (greedy, beam, sampling) work with any of them:

  * `pre_logits(features, tokens_in, *, train, key) -> ([B, T, D], aux)`: teacher forcing up to
    the output layer `out_proj`; training fuses `out_proj` with the loss
    (`captioning.training.losses`); `aux` holds extra loss terms' inputs (e.g. {"attention":
    [B, T, L]}).
  * `__call__(...) -> (logits [B, T, V], aux)`: `out_proj(pre_logits(...))`.
  * `init_decode(features) -> (context, state)`: per-image constants and the initial LSTM state.
  * `decode_step(context, state, tokens [B]) -> (state, logits [B, V], attention [B, L])`: one word.

`features` is [B, D] (pooled) or [B, H, W, C] (spatial). Speed: the LSTM input projection of a whole
sequence is one large matmul outside the time loop, and so is the output projection; only
`h @ W_rec` runs inside the scan, and in the backward pass only `dgates @ W_rec^T`
(`lstm_recurrence`: the weight gradient is one matmul after the reverse loop).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
    """Config string -> jnp dtype of matrix products."""
    if name not in _DTYPES:
        raise ValueError(f"config.model.dtype={name!r}: use one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def matmul(x: Array, w: Array, dtype: Any) -> Array:
    """x [..., K] @ w [K, N] with inputs cast to `dtype` and float32 accumulation/result (mixed
    precision). With a narrower `dtype` the backward products run in it too (`_narrow_matmul`)."""
    if jnp.dtype(dtype) == jnp.float32 or w.ndim != 2:
        return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return _narrow_matmul(x, w, jnp.dtype(dtype))


def weights_first_matmul(w_t: Array, x: Array, dtype: Any) -> Array:
    """x [B, K] @ w [K, N] given w_t = w^T [N, K] -> [B, N] float32, computed as w_t x^T.

    Why: on CPU a [B, K] x [K, N] product with few rows B (the recurrence's batch) repacks the
    whole weight matrix at every call, and one that contracts the weights' minor dimension (x @
    w_t^T, a gradient's product) runs at about half the speed; as the left operand the weights
    are read as they lie and only x is packed. The barrier keeps XLA from folding the transpose
    back into the product.
    """
    product = jnp.einsum(
        "nk,bk->nb", w_t.astype(dtype), x.astype(dtype), preferred_element_type=jnp.float32
    )
    return jax.lax.optimization_barrier(product).T


def transposed_copy(x: Array) -> Array:
    """x [R, K] -> x^T [K, R] stored as a row-major [K, R] array.

    XLA makes a transpose a change of layout (no copy), and the CPU's bfloat16 products that read
    an operand so laid out (x^T @ d, a weight gradient) run at about half the speed of the same
    product on a copy. Flattening behind a barrier forces the copy: cheap, R*K elements.
    """
    rows, cols = x.shape
    return jax.lax.optimization_barrier(x.T.reshape(rows * cols)).reshape(cols, rows)


def gradient_matmul(x: Array, d: Array, dtype: Any) -> Array:
    """A weight gradient: x [..., K] and d [..., N] over the same leading dims -> x^T d [K, N]
    float32, summed over every leading position. Float32: the plain product; a narrower dtype
    multiplies a row-major copy of x^T (`transposed_copy`)."""
    x = x.reshape(-1, x.shape[-1]).astype(dtype)
    d = d.reshape(-1, d.shape[-1]).astype(dtype)
    if jnp.dtype(dtype) != jnp.float32:
        return jnp.matmul(transposed_copy(x), d, preferred_element_type=jnp.float32)
    return jnp.matmul(x.T, d, preferred_element_type=jnp.float32)


def input_gradient_matmul(d: Array, w: Array, dtype: Any) -> Array:
    """The gradient through x @ w for x: d [..., N] @ w^T for w [K, N] -> [..., K] float32.
    Float32: the plain product; a narrower dtype: `weights_first_matmul`."""
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.matmul(d.astype(dtype), w.T.astype(dtype), preferred_element_type=jnp.float32)
    rows = weights_first_matmul(w, d.reshape(-1, d.shape[-1]), dtype)
    return rows.reshape(*d.shape[:-1], w.shape[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _narrow_matmul(x: Array, w: Array, dtype: Any) -> Array:
    """`matmul` whose gradients are products in `dtype` too, in the layouts the CPU multiplies
    fastest. Autodiff's own would multiply the float32 output gradient with the weights converted
    back to float32: float32 products and a float32 copy of every weight matrix in each backward
    pass."""
    return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _narrow_matmul_fwd(x, w, dtype):
    x_narrow, w_narrow = x.astype(dtype), w.astype(dtype)
    out = jnp.matmul(x_narrow, w_narrow, preferred_element_type=jnp.float32)
    # Zero-size stand-ins carry the inputs' dtypes (the gradients must have them).
    return out, (x_narrow, w_narrow, jnp.zeros(0, x.dtype), jnp.zeros(0, w.dtype))


def _narrow_matmul_bwd(dtype, residuals, d_out):
    x_narrow, w_narrow, x_like, w_like = residuals
    d_narrow = d_out.astype(dtype)
    d_x = input_gradient_matmul(d_narrow, w_narrow, dtype)
    d_w = gradient_matmul(x_narrow, d_narrow, dtype)
    return d_x.astype(x_like.dtype), d_w.astype(w_like.dtype)


_narrow_matmul.defvjp(_narrow_matmul_fwd, _narrow_matmul_bwd)


def dropout(x: Array, rate: float, key: Array | None, train: bool) -> Array:
    """Inverted dropout driven by an explicit key; identity at eval time.

    The keep mask compares random bytes against round(rate * 256): one 32-bit draw gives four
    elements' bits, which makes mask generation >10x cheaper on CPU than `random.bernoulli` (one
    float per element). The rate is thus quantised to 1/256; the kept values are scaled by the
    exact keep probability, so the layer stays unbiased.
    """
    if not train or rate <= 0.0 or key is None:
        return x
    threshold = min(max(round(rate * 256), 1), 255)
    keep_prob = 1.0 - threshold / 256
    words = jax.random.bits(key, (-(-x.size // 4),), jnp.uint32)
    random_bytes = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[: x.size]
    keep = random_bytes.reshape(x.shape) >= threshold
    return jnp.where(keep, x / keep_prob, 0.0).astype(x.dtype)


class Dense(nnx.Module):
    """Linear layer whose matmul honours the mixed-precision dtype."""

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_dim, out_dim), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_dim,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        return matmul(x, self.kernel[...], self.dtype) + self.bias[...]


def param(rngs: nnx.Rngs, shape: tuple[int, ...]) -> nnx.Param:
    """A bias-free weight matrix (lecun normal)."""
    return nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape, jnp.float32))


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
    is one [H, T*B] x [T*B, 4H] product after it (10-12 % off a scenes train step, A/B in one
    process).
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


class Decoder(nnx.Module):
    """The interface every decoder implements (see the module docstring); teacher forcing is
    `out_proj(pre_logits(...))`. Subclasses define `out_proj` (a `Dense` to the vocabulary) and
    the three methods below."""

    out_proj: Dense

    def pre_logits(
        self, features: Array, tokens_in: Array, *, train: bool = False, key: Array | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """Teacher forcing up to the output layer -> ([B, T, D] input of `out_proj`, aux)."""
        raise NotImplementedError

    def init_decode(self, features: Array) -> tuple[Any, Any]:
        """features [B, ...] -> (per-image context pytree, initial state pytree)."""
        raise NotImplementedError

    def decode_step(self, context: Any, state: Any, tokens: Array) -> tuple[Any, Array, Array]:
        """tokens [B] -> (state, logits [B, V] float32, attention [B, L] (L = 0 without))."""
        raise NotImplementedError

    def __call__(
        self, features: Array, tokens_in: Array, *, train: bool = False, key: Array | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """features [B, D] | [B, H, W, C] (| [B, L, C]), tokens_in [B, T] int32 (`<start>` first)
        -> (logits [B, T, V] float32, aux: e.g. {"attention": [B, T, L]}); dropout when `train`
        (with `key`)."""
        pre_logits, aux = self.pre_logits(features, tokens_in, train=train, key=key)
        return self.out_proj(pre_logits), aux
