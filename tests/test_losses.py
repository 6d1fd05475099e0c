"""The fused output layer + cross-entropy equals the plain one, value and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from captioning.data import text
from captioning.models import layers
from captioning.training import losses


def _inputs(batch, length, width=24, vocab=37, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, length, width)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(width, vocab)).astype(np.float32) * 0.3)
    bias = jnp.asarray(rng.normal(size=(vocab,)).astype(np.float32))
    targets = rng.integers(1, vocab, (batch, length)).astype(np.int32)
    targets[0, length // 2 :] = text.PAD_ID  # Padding must carry neither loss nor gradient.
    return x, kernel, bias, jnp.asarray(targets)


def _plain(x, kernel, bias, targets, dtype):
    logits = layers.matmul(x, kernel, dtype) + bias
    return losses.masked_cross_entropy(logits, targets)[0]


def _fused(x, kernel, bias, targets, dtype):
    return losses.output_cross_entropy(x, kernel, bias, targets, dtype)[0]


@pytest.mark.parametrize("batch, length", [(8, 6), (3, 5)])  # 48 rows: 4 chunks; 15 rows: 1.
def test_fused_loss_and_gradients_match_autodiff(batch, length):
    args = _inputs(batch, length)
    value, grads = jax.jit(jax.value_and_grad(_fused, argnums=(0, 1, 2)), static_argnums=4)(
        *args, jnp.float32
    )
    ref_value, ref_grads = jax.value_and_grad(_plain, argnums=(0, 1, 2))(*args, jnp.float32)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The padded positions of example 0 get no gradient.
    assert not np.any(np.asarray(grads[0])[0, length // 2 :])
    assert np.any(np.asarray(grads[0])[0, : length // 2])


def test_count_and_value_without_gradient():
    x, kernel, bias, targets = _inputs(4, 6)
    loss, count = losses.output_cross_entropy(x, kernel, bias, targets)
    assert count == int((np.asarray(targets) != text.PAD_ID).sum())
    np.testing.assert_allclose(loss, _plain(x, kernel, bias, targets, jnp.float32), rtol=1e-5)


def test_bfloat16_matmuls_stay_close_to_float32():
    args = _inputs(8, 6)
    grads = jax.grad(_fused, argnums=(0, 1, 2))(*args, jnp.bfloat16)
    ref = jax.grad(_plain, argnums=(0, 1, 2))(*args, jnp.float32)
    for got, want in zip(grads, ref, strict=True):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=0.05, atol=0.02)


def test_word_weights_scale_each_words_loss_and_gradients():
    x, kernel, bias, targets = _inputs(8, 6)
    weights = np.ones(37, np.float32)
    weights[[3, 5, 7]] = [4.0, 0.5, 2.0]
    row_weights = jnp.asarray(weights)[targets] * (targets != text.PAD_ID)

    def weighted(x, kernel, bias):
        fused = losses.output_cross_entropy(x, kernel, bias, targets, jnp.float32, weights)
        return fused[0]

    def reference(x, kernel, bias):
        logits = layers.matmul(x, kernel, jnp.float32) + bias
        per_word = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return jnp.sum(per_word * row_weights)

    value, grads = jax.value_and_grad(weighted, argnums=(0, 1, 2))(x, kernel, bias)
    ref_value, ref_grads = jax.value_and_grad(reference, argnums=(0, 1, 2))(x, kernel, bias)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    _, total = losses.output_cross_entropy(x, kernel, bias, targets, jnp.float32, weights)
    np.testing.assert_allclose(total, float(np.sum(row_weights)), rtol=1e-6)
    assert float(total) != float(np.sum(np.asarray(targets) != text.PAD_ID))  # Weights counted.


def test_word_weights_spec_parsing():
    vocab = text.Vocabulary(["left", "right", "red", "circle"])
    weights = losses.word_weights_array("left, right=4; red=0.5", vocab)
    assert weights.shape == (len(vocab),)
    assert weights[vocab.stoi["left"]] == weights[vocab.stoi["right"]] == 4.0
    assert weights[vocab.stoi["red"]] == 0.5
    assert weights[vocab.stoi["circle"]] == 1.0 and weights[text.PAD_ID] == 1.0
    assert losses.word_weights_array("", vocab) is None
    # A word the vocabulary lacks is never a target: skipped; a spec of only such words is wrong.
    skipped = losses.word_weights_array("left,above=4", vocab)
    assert skipped[vocab.stoi["left"]] == 4.0 and np.sum(skipped != 1.0) == 1
    with pytest.raises(ValueError, match="none of its words is in the vocabulary"):
        losses.word_weights_array("above,below=4", vocab)
    for bad in ("left", "left=0", "left=-2", "left=x", "=3"):
        with pytest.raises(ValueError, match="words '=' a weight > 0"):
            losses.word_weights_array(bad, vocab)
