"""Building blocks of every decoder: mixed-precision matmul helpers, dropout, Dense.

`matmul` casts its inputs to the compute dtype (`model.dtype`) and accumulates in float32; the
other products exist because of how the CPU's GEMM reads its operands (each docstring says why).
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
    w_t^T, a gradient's product) runs much slower; as the left operand the weights
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
    an operand so laid out (x^T @ d, a weight gradient) run much slower than the same
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
    elements' bits, which makes mask generation far cheaper on CPU than `random.bernoulli` (one
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


def pool(features: Array) -> Array:
    """[B, D] stays; [B, H, W, C] -> mean over locations [B, C]."""
    if features.ndim == 4:
        return features.mean(axis=(1, 2))
    return features


def image_input(features: Array, use_image: bool) -> Array:
    """Pooled float32 features [B, C]; zeros for the image-blind ablation."""
    feats = pool(features).astype(jnp.float32)
    return feats if use_image else jnp.zeros_like(feats)
