"""The output layer fused with its cross-entropy (decoders' own terms: `Decoder.aux_loss`).

* `output_cross_entropy`: the output layer and the cross-entropy in one custom VJP, so logits are
  never kept for the backward pass (below); each target word's loss may be weighted
  (`word_weights_array`, `train.word_weights`).

The fused output layer:

At the Keras notebook's sizes the vocabulary projection is half of a training step's work: logits
[B*T, V] (V ~ 1650) come out of one matmul, go through log-softmax, and autodiff keeps them (and
their softmax) for the backward pass, which multiplies them by the weights twice more. Written
as one function with its own VJP, the forward pass computes each chunk's loss *and* its
gradients while the chunk's logits are still in cache, so a [B*T, V] array never makes a round
trip through memory: a faster step and less temporary memory (configs/notes/speed.md). The
arithmetic is the same three matrix products as autodiff's; the gradients agree to float32
round-off (tests/test_losses.py).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from captioning.data import text
from captioning.models.layers import gradient_matmul, input_gradient_matmul, matmul

Array = jax.Array

# Row chunks of the fused forward-backward: each chunk's logits stay in cache (how many mattered
# little as long as there are several: configs/notes/speed.md).
NUM_CHUNKS = 4


def word_weights_array(spec: str, vocab: text.Vocabulary) -> np.ndarray | None:
    """`train.word_weights` -> [V] float32 loss weight per word id, or None for '' (all 1).

    spec: groups separated by ';', each comma-separated words '=' a weight > 0, e.g.
    "left,right,above,below=4;red,blue=2". Words the vocabulary lacks never occur as targets:
    they are logged and skipped; a spec none of whose words is in the vocabulary is an error.
    """
    if not spec.strip():
        return None
    weights = np.ones(len(vocab), np.float32)
    found, missing = [], []
    for group in spec.split(";"):
        words, sep, value = group.partition("=")
        try:
            weight = float(value) if sep else float("nan")
        except ValueError:
            weight = float("nan")
        if not weight > 0 or not words.strip():
            raise ValueError(
                f"train.word_weights={spec!r}: each ';'-separated group is words '=' a weight > 0,"
                f" e.g. 'left,right,above,below=4'; got {group!r}."
            )
        for word in (w.strip() for w in words.split(",")):
            if word in vocab.stoi:
                weights[vocab.stoi[word]] = weight
                found.append(word)
            else:
                missing.append(word)
    if missing:
        if not found:
            raise ValueError(
                f"train.word_weights={spec!r}: none of its words is in the vocabulary "
                f"({len(vocab)} words); is it meant for another dataset?"
            )
        logging.warning("train.word_weights: not in the vocabulary, skipped: %s.", missing)
    return weights


def masked_cross_entropy(
    logits: Array, targets: Array, weights: Array | None = None
) -> tuple[Array, Array]:
    """logits [..., V], targets [...] -> (summed loss over non-pad targets, their count); with
    `weights` [...] (0 on padding), the weighted sum and the weights' sum."""
    if weights is None:
        weights = (targets != text.PAD_ID).astype(jnp.float32)
    per_word = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(per_word * weights), jnp.sum(weights)


def output_cross_entropy(
    inputs: Array,
    kernel: Array,
    bias: Array,
    targets: Array,
    dtype: Any = jnp.float32,
    word_weights: Array | None = None,
) -> tuple[Array, Array]:
    """`masked_cross_entropy` of logits = inputs @ kernel + bias, fused with the output layer.

    Args:
      inputs: [B, T, D] what the decoder feeds its output layer.
      kernel: [D, V] and bias: [V], the output layer.
      targets: [B, T] int32 word ids; `<pad>` (0) carries no loss.
      dtype: matmul input dtype (bfloat16 for mixed precision; float32 results either way).
      word_weights: [V] float32 weight of each target word's loss (`word_weights_array`), or
        None (all 1).

    Returns:
      (summed loss over non-padding targets, their count), both float32 scalars; with
      `word_weights`, the weighted sum and the sum of the weights, so that their ratio stays a
      mean per word.
    """
    rows = inputs.shape[0] * inputs.shape[1]
    x = inputs.reshape(rows, inputs.shape[2])
    labels = targets.reshape(rows)
    weights = (labels != text.PAD_ID).astype(jnp.float32)
    if word_weights is not None:
        weights = weights * jnp.take(word_weights, labels)
    chunks = next(c for c in (NUM_CHUNKS, 2, 1) if rows % c == 0)
    loss = _fused_loss(x, kernel, bias.astype(jnp.float32), labels, weights, chunks, dtype)
    return loss, jnp.sum(weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused_loss(x, kernel, bias, labels, weights, chunks, dtype):
    """Plain (unfused) loss when no gradient is taken, e.g. in the evaluation step; weights [rows]
    (0 on padding)."""
    return masked_cross_entropy(matmul(x, kernel, dtype) + bias, labels, weights)[0]


def _fused_forward(x, kernel, bias, labels, weights, chunks, dtype):
    """Loss and all three gradients, one chunk of rows at a time."""
    rows, width = x.shape
    # Chunk k holds rows k, k + chunks, ...: every chunk has rows of every example, so a
    # batch sharded over devices (contiguous rows) stays sharded inside each chunk.
    split = lambda a: jnp.swapaxes(a.reshape(rows // chunks, chunks, *a.shape[1:]), 0, 1)

    def chunk_step(carry, chunk):
        loss, d_kernel, d_bias = carry
        xc, labels_c, weights_c = chunk  # weights_c: the rows' loss weights (0 on padding).
        logits = matmul(xc, kernel, dtype) + bias  # [rows / chunks, V] float32
        logsumexp = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, labels_c[:, None], axis=-1)[:, 0]
        loss = loss + jnp.sum((logsumexp - picked) * weights_c)
        # d loss / d logits = (softmax - one_hot) x the row's weight.
        one_hot = jax.nn.one_hot(labels_c, logits.shape[-1], dtype=jnp.float32)
        d_logits = (jnp.exp(logits - logsumexp[:, None]) - one_hot) * weights_c[:, None]
        d_x = input_gradient_matmul(d_logits, kernel, dtype)
        d_kernel = d_kernel + gradient_matmul(xc, d_logits, dtype)
        return (loss, d_kernel, d_bias + jnp.sum(d_logits, axis=0)), d_x

    init = (
        jnp.zeros((), jnp.float32),
        jnp.zeros(kernel.shape, jnp.float32),
        jnp.zeros(bias.shape, jnp.float32),
    )
    (loss, d_kernel, d_bias), d_x = jax.lax.scan(
        chunk_step, init, (split(x), split(labels), split(weights))
    )
    d_x = jnp.swapaxes(d_x, 0, 1).reshape(rows, width)
    grads = (d_x.astype(x.dtype), d_kernel.astype(kernel.dtype), d_bias)
    return loss, grads


def _fused_backward(chunks, dtype, grads, loss_cotangent):
    d_x, d_kernel, d_bias = grads
    return (
        loss_cotangent * d_x,
        loss_cotangent * d_kernel,
        loss_cotangent * d_bias,
        None,  # labels: integers.
        None,  # weights: constants of the loss.
    )


_fused_loss.defvjp(_fused_forward, _fused_backward)
