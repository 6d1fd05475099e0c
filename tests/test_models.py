"""Decoders: output shapes, teacher forcing equals step-by-step decoding, dropout, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from captioning import models
from captioning.models import layers
from captioning.models import lstm as lstm_lib
from configs import test as test_config


def _model(decoder="merge", feature_shape=(12,), vocab=11, **overrides):
    config = test_config.get_config().model
    config.decoder = decoder
    config.feed_dim = 0  # A merge_attention option.
    for k, v in overrides.items():
        config[k] = v
    return models.create_model(config, vocab, feature_shape, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("decoder", ["merge", "merge_attention"])
def test_abstract_model_is_the_built_model_without_values(decoder):
    config = test_config.get_config().model
    config.decoder = decoder
    config.feed_dim = 32 if decoder == "merge_attention" else 0  # merge_attention's own option.
    graphdef, shapes = models.abstract_model(config, 11, (3, 3, 12))
    built_graphdef, params = nnx.split(
        models.create_model(config, 11, (3, 3, 12), rngs=nnx.Rngs(0))
    )
    assert graphdef == built_graphdef
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    for shape, param in zip(jax.tree.leaves(shapes), jax.tree.leaves(params), strict=True):
        assert isinstance(shape, jax.ShapeDtypeStruct)
        assert (shape.shape, shape.dtype, shape.sharding) == (
            param.shape,
            param.dtype,
            param.sharding,
        )
    merged = nnx.merge(graphdef, params)  # What a restore does with the checkpoint's values.
    assert jax.tree.leaves(nnx.state(merged))[0] is jax.tree.leaves(params)[0]


@pytest.mark.parametrize("decoder", ["merge", "inject"])
@pytest.mark.parametrize("feature_shape", [(12,), (3, 3, 12)])
def test_output_shapes(decoder, feature_shape):
    model = _model(decoder, feature_shape)
    features = jnp.ones((4, *feature_shape))
    tokens = jnp.ones((4, 7), jnp.int32)
    logits, aux = model(features, tokens)
    assert logits.shape == (4, 7, 11) and logits.dtype == jnp.float32
    context, state = model.init_decode(features)
    state, step_logits, attention = model.decode_step(context, state, tokens[:, 0])
    assert step_logits.shape == (4, 11) and attention.shape == (4, 0)


@pytest.mark.parametrize("decoder", ["merge", "inject"])
def test_teacher_forcing_matches_step_by_step(decoder):
    model = _model(decoder)
    features = jax.random.normal(jax.random.key(1), (3, 12))
    tokens = jax.random.randint(jax.random.key(2), (3, 5), 0, 11)
    logits, _ = model(features, tokens)
    context, state = model.init_decode(features)
    for t in range(5):
        state, step_logits, _ = model.decode_step(context, state, tokens[:, t])
        np.testing.assert_allclose(step_logits, logits[:, t], atol=1e-5)


def test_dropout_only_in_training_and_keyed():
    model = _model(dropout=0.5)
    features = jnp.ones((2, 12))
    tokens = jnp.ones((2, 4), jnp.int32)
    eval_a, _ = model(features, tokens)
    eval_b, _ = model(features, tokens, train=True, key=None)
    np.testing.assert_allclose(eval_a, eval_b)
    key = jax.random.key(0)
    train_a, _ = model(features, tokens, train=True, key=key)
    train_b, _ = model(features, tokens, train=True, key=key)
    train_c, _ = model(features, tokens, train=True, key=jax.random.key(1))
    np.testing.assert_allclose(train_a, train_b)
    assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_c)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_rate_and_unbiased_scaling(rate):
    x = jnp.ones((1001, 37))  # Odd size: the packed random bytes must cover every element.
    out = np.asarray(layers.dropout(x, rate, jax.random.key(3), train=True))
    kept = out != 0
    assert abs(kept.mean() - (1.0 - rate)) < 0.01
    np.testing.assert_allclose(out.mean(), 1.0, atol=0.02)  # E[dropout(x)] = x.
    assert np.allclose(out[kept], out[kept][0])  # One scale for every kept element.


@pytest.mark.parametrize("vocab", [5, 50])  # fewer words than tokens (gathered), more (per token)
def test_project_words_equals_projecting_every_dropped_out_token(vocab):
    lstm = lstm_lib.LSTM(8, 4, rngs=nnx.Rngs(0))
    embedding = jax.random.normal(jax.random.key(1), (vocab, 8))
    tokens = jax.random.randint(jax.random.key(2), (3, 6), 0, vocab).at[0, :2].set(3)
    key = jax.random.key(3)

    graphdef, params = nnx.split(lstm)

    def reference(embedding, params):  # One dropped-out matrix, every token projected.
        dropped = layers.dropout(embedding, 0.5, key, train=True)
        return nnx.merge(graphdef, params).project_inputs(dropped[tokens])

    def project(embedding, params):
        return nnx.merge(graphdef, params).project_words(embedding, tokens, 0.5, key, train=True)

    got, want = project(embedding, params), reference(embedding, params)
    assert got.shape == (3, 6, 16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[0, 0], got[0, 1])  # Both uses of word 3: one mask.
    no_dropout = lstm.project_inputs(embedding[tokens])
    assert not np.allclose(got, no_dropout)  # The dropout acted...
    np.testing.assert_allclose(  # ...and only in training.
        lstm.project_words(embedding, tokens, 0.5, key, train=False), no_dropout, rtol=1e-6
    )
    cotangent = jax.random.normal(jax.random.key(4), got.shape)
    grads, want_grads = (
        jax.grad(lambda e, p, f=f: jnp.sum(f(e, p) * cotangent), (0, 1))(embedding, params)
        for f in (project, reference)
    )
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_image_blind_ablation_ignores_features():
    model = _model(use_image=False)
    tokens = jnp.ones((2, 4), jnp.int32)
    a, _ = model(jnp.zeros((2, 12)), tokens)
    b, _ = model(jax.random.normal(jax.random.key(0), (2, 12)), tokens)
    np.testing.assert_allclose(a, b)


def test_bfloat16_matmuls_keep_float32_outputs():
    model = _model(dtype="bfloat16")
    logits, _ = model(jnp.ones((2, 12)), jnp.ones((2, 3), jnp.int32))
    assert logits.dtype == jnp.float32
    reference, _ = _model()(jnp.ones((2, 12)), jnp.ones((2, 3), jnp.int32))
    np.testing.assert_allclose(logits, reference, atol=0.05)


def test_unknown_decoder_and_dtype_raise():
    with pytest.raises(ValueError, match="config.model.decoder"):
        _model("no_such_decoder")
    with pytest.raises(ValueError, match="config.model.dtype"):
        _model(dtype="float8")
    with pytest.raises(ValueError, match="config.model.concept_loss=1.0 is an option of the merge"):
        _model("inject", concept_loss=1.0)
    for decoder, shape in (("merge", (12,)), ("attention", (3, 3, 12))):
        with pytest.raises(ValueError, match="config.model.feed_dim=8 .* set it to 0"):
            _model(decoder, shape, feed_dim=8)
    with pytest.raises(ValueError, match="needs spatial features"):
        _model("attention", (12,))


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_lstm_recurrence_equals_the_cell_and_autodiff(dtype, tol):
    """`lstm_recurrence` (hand-written backward pass, weight gradient as one matmul after the
    loop) gives `LSTM.cell`'s states and autodiff's gradients for every input, initial state
    included."""
    compute = layers.compute_dtype(dtype)
    lstm = lstm_lib.LSTM(6, 8, rngs=nnx.Rngs(0), dtype=compute)
    keys = jax.random.split(jax.random.key(1), 4)
    h0, c0 = (jax.random.normal(k, (5, 8)) for k in keys[:2])
    gates_in = jax.random.normal(keys[2], (7, 5, 32))  # [T, B, 4H]
    cotangent = jax.random.normal(keys[3], (7, 5, 8))
    w_rec = lstm.w_rec[...]

    def custom(w_rec, h0, c0, gates_in):
        return lstm_lib.lstm_recurrence(w_rec, h0, c0, gates_in, compute)

    def autodiff(w_rec, h0, c0, gates_in):  # LSTM.cell's arithmetic, differentiated by JAX.
        def step(state, g):
            h, c = state
            i, f, gg, o = jnp.split(g + layers.matmul(h, w_rec, compute), 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(gg)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        return jax.lax.scan(step, (h0, c0), gates_in)[1]

    args = (w_rec, h0, c0, gates_in)
    state, stepped = (h0, c0), []
    for t in range(7):
        state = lstm.cell(state, gates_in[t])
        stepped.append(state[0])
    np.testing.assert_allclose(custom(*args), jnp.stack(stepped), atol=tol)
    np.testing.assert_allclose(autodiff(*args), jnp.stack(stepped), atol=tol)
    want = jax.grad(lambda *a: jnp.sum(autodiff(*a) * cotangent), argnums=(0, 1, 2, 3))(*args)
    got = jax.grad(lambda *a: jnp.sum(custom(*a) * cotangent), argnums=(0, 1, 2, 3))(*args)
    for name, a, b in zip(("w_rec", "h0", "c0", "gates_in"), got, want, strict=True):
        assert float(jnp.abs(b).max()) > 0.01, name  # A gradient that is there to compare.
        np.testing.assert_allclose(a, b, atol=tol * 10, rtol=tol, err_msg=name)


def test_bfloat16_matmul_gradients_are_bfloat16_products():
    """layers.matmul in bfloat16: the gradients are autodiff's of the float32 product up to
    bfloat16 rounding, keep the inputs' dtypes, and every product of the backward pass reads
    bfloat16 operands (autodiff's own would multiply in float32)."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 5, 16))
    w = jax.random.normal(kw, (16, 8))
    probe = jax.random.normal(kg, (3, 5, 8))

    def loss(dtype):
        return lambda x, w: jnp.sum(probe * layers.matmul(x, w, dtype))

    got = jax.grad(loss(jnp.bfloat16), argnums=(0, 1))(x, w)
    want = jax.grad(loss(jnp.float32), argnums=(0, 1))(x, w)
    for g, ref in zip(got, want, strict=True):
        assert g.dtype == jnp.float32 and g.shape == ref.shape
        np.testing.assert_allclose(g, ref, rtol=3e-2, atol=3e-2)
    jaxpr = jax.make_jaxpr(jax.grad(loss(jnp.bfloat16), argnums=(0, 1)))(x, w)
    dots = _equations(jaxpr.jaxpr, "dot_general")
    assert len(dots) == 3  # The forward product and the two gradient products.
    for eqn in dots:
        assert [str(v.aval.dtype) for v in eqn.invars] == ["bfloat16", "bfloat16"]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_weights_first_matmul_is_the_product(dtype, tol):
    """weights_first_matmul(w^T, x) is x @ w ([B, N], float32) in either dtype."""
    kx, kw = jax.random.split(jax.random.key(0))
    x, w = jax.random.normal(kx, (5, 12)), jax.random.normal(kw, (12, 7))
    got = jax.jit(layers.weights_first_matmul, static_argnums=2)(w.T, x, dtype)
    assert got.shape == (5, 7) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, x @ w, rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_gradient_products_are_the_products(dtype, tol):
    """gradient_matmul(x, d) is x^T d summed over the leading dims, input_gradient_matmul(d, w)
    is d @ w^T, both float32 in either dtype; transposed_copy(x) is x^T exactly."""
    kx, kd, kw = jax.random.split(jax.random.key(0), 3)
    x, d = jax.random.normal(kx, (3, 5, 16)), jax.random.normal(kd, (3, 5, 8))
    w = jax.random.normal(kw, (16, 8))
    grad_w = jax.jit(layers.gradient_matmul, static_argnums=2)(x, d, dtype)
    grad_x = jax.jit(layers.input_gradient_matmul, static_argnums=2)(d, w, dtype)
    assert grad_w.shape == (16, 8) and grad_x.shape == (3, 5, 16)
    assert grad_w.dtype == grad_x.dtype == jnp.float32
    np.testing.assert_allclose(grad_w, jnp.einsum("bti,btj->ij", x, d), rtol=tol, atol=tol * 8)
    np.testing.assert_allclose(grad_x, d @ w.T, rtol=tol, atol=tol * 8)
    flat = x.reshape(15, 16)
    np.testing.assert_array_equal(jax.jit(layers.transposed_copy)(flat), flat.T)


def test_bfloat16_gradient_products_read_their_operands_row_major():
    """In bfloat16 a weight gradient multiplies a copy of x^T (its left operand contracted over
    its last dimension) and an input gradient has the weights as the left operand: the layouts
    the CPU multiplies fastest. Float32 keeps the plain products (its results unchanged)."""
    x, d, w = jnp.ones((15, 16)), jnp.ones((15, 8)), jnp.ones((16, 8))

    def dot(fn, *args):
        (eqn,) = _equations(jax.make_jaxpr(fn)(*args).jaxpr, "dot_general")
        return tuple(eqn.invars[0].aval.shape)

    def barriers(fn, *args):  # What keeps XLA from making the copy of x^T a change of layout.
        return len(_equations(jax.make_jaxpr(fn)(*args).jaxpr, "optimization_barrier"))

    for dtype, copies in ((jnp.bfloat16, 1), (jnp.float32, 0)):
        weight_gradient = functools.partial(layers.gradient_matmul, dtype=dtype)
        assert dot(weight_gradient, x, d) == (16, 15)
        assert barriers(weight_gradient, x, d) == copies
    assert dot(lambda d, w: layers.input_gradient_matmul(d, w, jnp.bfloat16), d, w) == (16, 8)
    assert dot(lambda d, w: layers.input_gradient_matmul(d, w, jnp.float32), d, w) == (15, 8)


def _equations(jaxpr, name):
    """Every equation of primitive `name` in `jaxpr` and the jaxprs nested in its equations."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            found.append(eqn)
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found += _equations(inner, name)
    return found
