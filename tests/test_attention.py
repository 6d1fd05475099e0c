"""Attention decoders (Show-Attend-Tell 'attention' and the merge decoder with output attention
'merge_attention'): attention sums to one, shapes, teacher forcing equals step-by-step decoding,
one train step lowers the loss of every decoder, greedy/beam return attention for every word,
attention-map PNGs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from captioning import models
from captioning.data import text
from captioning.decoding import decode, search
from captioning.evaluation import visualize
from captioning.models import attention, merge_attention, show_attend_tell
from captioning.training import losses, train
from configs import test as test_config

VOCAB = 11
SPATIAL = (3, 4, 12)  # H, W, C: L = 12 locations, non-square to catch row/column mix-ups.
# merge_attention+ is merge_attention whose LSTM reads what the previous lookup saw.
ATTENTION_DECODERS = pytest.mark.parametrize(
    "decoder", ["attention", "merge_attention", "merge_attention+"]
)


def _model(decoder="attention", feature_shape=SPATIAL, **overrides):
    config = test_config.get_config().model
    config.decoder, config.feed_dim = decoder, 0
    if decoder == "merge_attention+":
        config.decoder, config.feed_dim = "merge_attention", 8
    for k, v in overrides.items():
        config[k] = v
    return models.create_model(config, VOCAB, feature_shape, rngs=nnx.Rngs(0))


def _features(batch=3, shape=SPATIAL, seed=1):
    return 2.0 * jax.random.normal(jax.random.key(seed), (batch, *shape))


def _tokens(batch=3, length=6, seed=2):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


@ATTENTION_DECODERS
def test_shapes_and_attention_sums_to_one_over_locations(decoder):
    model = _model(decoder)
    logits, aux = model(_features(), _tokens())
    assert logits.shape == (3, 6, VOCAB) and logits.dtype == jnp.float32
    weights = aux["attention"]
    assert weights.shape == (3, 6, 12)
    assert np.all(np.asarray(weights) >= 0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    context, state = model.init_decode(_features())
    state, step_logits, step_attention = model.decode_step(context, state, _tokens()[:, 0])
    assert step_logits.shape == (3, VOCAB) and step_attention.shape == (3, 12)
    np.testing.assert_allclose(step_attention.sum(-1), 1.0, atol=1e-5)


@ATTENTION_DECODERS
@pytest.mark.parametrize("positions,shape", [(False, SPATIAL), (True, (3, 3, 12))])
def test_flat_locations_equal_the_spatial_map(decoder, positions, shape):
    model = _model(decoder, feature_shape=shape, attention_positions=positions)
    features, tokens = _features(shape=shape), _tokens()
    spatial, _ = model(features, tokens)
    flat, _ = model(features.reshape(3, -1, 12), tokens)
    np.testing.assert_allclose(spatial, flat, atol=1e-6)


@ATTENTION_DECODERS
def test_pooled_features_are_refused(decoder):
    with pytest.raises(ValueError, match="encoder.pooling='none'"):
        _model(decoder, feature_shape=(12,))


@ATTENTION_DECODERS
def test_teacher_forcing_matches_step_by_step(decoder):
    model = _model(decoder)
    features, tokens = _features(), _tokens()
    logits, aux = model(features, tokens)
    context, state = model.init_decode(features)
    for t in range(tokens.shape[1]):
        state, step_logits, step_attention = model.decode_step(context, state, tokens[:, t])
        np.testing.assert_allclose(step_logits, logits[:, t], atol=1e-5)
        np.testing.assert_allclose(step_attention, aux["attention"][:, t], atol=1e-6)


@ATTENTION_DECODERS
def test_attention_depends_on_where_the_features_are(decoder):
    # A location with a distinct feature vector gets a different weight than its copies elsewhere
    # (without positions, identical features get identical weights wherever they are).
    model = _model(decoder, attention_positions=False)
    features = jnp.zeros((1, *SPATIAL)).at[0, 1, 2].set(5.0)
    _, aux = model(features, _tokens(batch=1))
    weights = np.asarray(aux["attention"][0, 0]).reshape(3, 4)
    others = np.delete(weights.reshape(-1), 1 * 4 + 2)
    assert np.allclose(others, others[0]) and not np.isclose(weights[1, 2], others[0])


@ATTENTION_DECODERS
def test_dropout_keyed_and_image_blind_ablation(decoder):
    model = _model(decoder, dropout=0.5)
    features, tokens = _features(), _tokens()
    key = jax.random.key(0)
    a, _ = model(features, tokens, train=True, key=key)
    b, _ = model(features, tokens, train=True, key=key)
    evaluation, _ = model(features, tokens)
    np.testing.assert_allclose(a, b)
    assert not np.allclose(a, evaluation)
    blind = _model(decoder, use_image=False)
    x, _ = blind(features, tokens)
    y, _ = blind(_features(seed=5), tokens)
    np.testing.assert_allclose(x, y)


@ATTENTION_DECODERS
def test_bfloat16_matmuls_keep_float32_outputs(decoder):
    logits, aux = _model(decoder, dtype="bfloat16")(_features(), _tokens())
    reference, _ = _model(decoder)(_features(), _tokens())
    assert logits.dtype == jnp.float32 and aux["attention"].dtype == jnp.float32
    # bfloat16 keeps 8 bits of mantissa; each extra lookup the + variant adds rounds once more.
    np.testing.assert_allclose(logits, reference, atol=0.1 if decoder.endswith("+") else 0.05)


@pytest.mark.parametrize(
    "decoder,feature_shape",
    [
        ("merge", (12,)),
        ("inject", (12,)),
        ("attention", SPATIAL),
        ("merge_attention", SPATIAL),
        ("merge_attention+", SPATIAL),
    ],
)
def test_one_training_step_lowers_the_loss(decoder, feature_shape):
    config = test_config.get_config()
    config.model.decoder = decoder.rstrip("+")
    config.model.feed_dim = 8 if decoder.endswith("+") else 0
    config.model.dropout = 0.0  # The same function before and after the step.
    config.train.learning_rate = 1e-2
    config.train.warmup_steps = 0  # Step 0 at the peak rate (warm-up would start at 0).
    model = models.create_model(config.model, VOCAB, feature_shape, rngs=nnx.Rngs(0))
    graphdef, state, tx, _ = train.init_train_state(config, model, total_steps=10)
    train_step, _ = train.make_steps(graphdef, tx, config.model)
    tokens = np.asarray(_tokens(batch=4, length=7)).clip(4)
    tokens[:, 0], tokens[:, -1] = text.START_ID, text.END_ID
    batch = {
        "image_index": np.arange(4, dtype=np.int32),
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
    }
    features = _features(batch=4, shape=feature_shape)

    def total_loss(params):
        logits, aux = nnx.merge(graphdef, params)(features, batch["inputs"])
        loss_sum, count = losses.masked_cross_entropy(logits, batch["targets"])
        reg = config.model.attention_reg
        if "attention" in aux:
            loss_sum += count * attention.attention_regularizer(
                aux["attention"], batch["targets"], reg
            )
        return float(loss_sum / count)

    params, _, _ = jax.jit(train_step)(
        state["params"], state["opt_state"], features, batch, jax.random.key(0), np.int32(0)
    )
    assert total_loss(params) < total_loss(state["params"])


def test_output_attention_looks_with_the_current_word():
    """merge_attention attends with h_t (after reading word t), Show-Attend-Tell with h_{t-1}:
    changing word t moves the former's attention at step t and not the latter's."""
    features, tokens = _features(), _tokens()
    changed = tokens.at[:, 2].set((tokens[:, 2] + 1) % VOCAB)
    for decoder, moves in (("merge_attention", True), ("attention", False)):
        model = _model(decoder)
        _, before = model(features, tokens)
        _, after = model(features, changed)
        np.testing.assert_allclose(before["attention"][:, :2], after["attention"][:, :2])
        assert moves != np.allclose(before["attention"][:, 2], after["attention"][:, 2])


def test_doubly_stochastic_regularization_reaches_the_loss():
    model = _model()
    tokens = _tokens(length=5).clip(4)
    _, aux = model(_features(), tokens)
    penalty = float(attention.attention_regularizer(aux["attention"], tokens, 1.0))
    # sum_t alpha_ti over 5 words spread over 12 locations cannot be 1 everywhere.
    assert penalty > 0
    assert float(attention.attention_regularizer(aux["attention"], tokens, 0.0)) == 0.0
    # Padding targets are ignored: only the first two words' attention counts.
    short = tokens.at[:, 2:].set(text.PAD_ID)
    expected = (1.0 - aux["attention"][:, :2].sum(axis=1)) ** 2
    np.testing.assert_allclose(
        attention.attention_regularizer(aux["attention"], short, 1.0),
        expected.sum() / (2 * tokens.shape[0]),
        rtol=1e-5,
    )


def _check_decoded_attention(tokens, weights):
    """Every generated word (up to and including <end>) has a distribution; the rest are 0."""
    tokens, weights = np.asarray(tokens), np.asarray(weights)
    for row, row_weights in zip(tokens, weights, strict=True):
        ends = np.flatnonzero(row == text.END_ID)
        length = ends[0] + 1 if len(ends) else len(row)
        np.testing.assert_allclose(row_weights[:length].sum(-1), 1.0, atol=1e-5)
        assert np.all(row_weights[length:] == 0)


@pytest.mark.parametrize("method", ["greedy", "beam"])
@ATTENTION_DECODERS
def test_decoding_returns_attention_for_every_word(decoder, method):
    model = _model(decoder)
    graphdef, params = nnx.split(model)
    config = test_config.get_config().decode
    config.method, config.beam_size, config.max_len = method, 3, 8
    out = decode.decode_fn(graphdef, config)(params, _features(batch=4), jax.random.key(0))
    assert out.tokens.shape == (4, 8) and out.attention.shape == (4, 8, 12)
    _check_decoded_attention(out.tokens, out.attention)


@ATTENTION_DECODERS
def test_beam_search_keeps_each_hypothesis_attention(decoder):
    model = _model(decoder)
    beams = search.beam_search_beams(model, _features(batch=2), beam_size=3, max_len=6)
    assert beams.attention.shape == (2, 3, 6, 12)
    for k in range(3):
        _check_decoded_attention(beams.tokens[:, k], beams.attention[:, k])
    # Width 1 is greedy decoding, attention included.
    greedy = search.greedy_decode(model, _features(batch=2), 6)
    single = search.beam_search(model, _features(batch=2), beam_size=1, max_len=6)
    np.testing.assert_array_equal(single.tokens, greedy.tokens)
    np.testing.assert_allclose(single.attention, greedy.attention, atol=1e-6)


def test_positions_are_appended_row_major_and_break_ties():
    features = jnp.zeros((2, 3, 4, 5))
    with_positions = attention.append_positions(features)
    assert with_positions.shape == (2, 3, 4, 7)
    np.testing.assert_allclose(with_positions[0, :, 0, 5], [-2 / 3, 0, 2 / 3], atol=1e-6)  # rows
    np.testing.assert_allclose(with_positions[0, 0, :, 6], [-0.75, -0.25, 0.25, 0.75])  # columns
    flat = attention.append_positions(jnp.zeros((1, 9, 5)))  # 3 x 3 from a square L.
    assert flat.shape == (1, 3, 3, 7)
    with pytest.raises(ValueError, match="attention_positions"):
        attention.append_positions(jnp.zeros((1, 12, 5)))
    # Identical features everywhere: only the positions tell the locations apart.
    model = _model(attention_positions=True)
    _, aux = model(jnp.ones((1, *SPATIAL)), _tokens(batch=1))
    assert np.ptp(np.asarray(aux["attention"][0, 0])) > 1e-4
    plain = _model(attention_positions=False)
    _, aux = plain(jnp.ones((1, *SPATIAL)), _tokens(batch=1))
    np.testing.assert_allclose(aux["attention"][0, 0], 1 / 12, atol=1e-6)


def test_flatten_locations_is_row_major():
    features = jnp.arange(2 * 3 * 4 * 1, dtype=jnp.float32).reshape(2, 3, 4, 1)
    flat = attention.flatten_locations(features)
    assert flat.shape == (2, 12, 1) and float(flat[0, 1 * 4 + 2, 0]) == float(features[0, 1, 2, 0])


def test_save_attention_maps_writes_one_png_per_image(tmp_path):
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(image)
    itos = [*text.SPECIAL_TOKENS, "red", "circle"]
    red, circle = itos.index("red"), itos.index("circle")
    tokens = np.array([[red, circle, text.END_ID, 0], [circle, text.END_ID, 0, 0]])
    weights = np.full((2, 4, 12), 1 / 12, np.float32)
    paths = visualize.save_attention_maps(
        str(tmp_path / "maps"),
        [str(image), str(tmp_path / "missing.png")],
        tokens,
        weights,
        itos,
        (3, 4),
    )
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["000_photo.png", "001_missing.png"]
    for path in paths:
        with Image.open(path) as png:
            assert png.size[0] > 100
    with pytest.raises(ValueError, match="grid_shape"):
        visualize.save_attention_maps(str(tmp_path), [str(image)], tokens, weights, itos, (4, 4))


def test_caption_mode_writes_attention_maps(tmp_path):
    """--mode=caption with eval.attention_maps on a run directory of an (untrained) attention
    model: one PNG per image, named in the captions JSON."""
    import os

    from conftest import make_run_dir

    from captioning import caption

    config = test_config.get_config()
    config.model.decoder, config.model.feed_dim = "attention", 0
    config.encoder.pooling = "none"  # The test backbone's spatial map.
    config.eval.attention_maps = True
    config.decode.max_len = 5
    workdir = make_run_dir(tmp_path / "run", config, ["red", "circle", "left", "of"], step=1)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(images / name)

    results = caption.caption_images(config, workdir, str(images))
    for result, name in zip(results, ("a", "b"), strict=True):
        assert result["attention_map"].endswith(f"_{name}.png")
        assert os.path.exists(result["attention_map"])
    assert os.path.dirname(results[0]["attention_map"]).endswith("attention_greedy")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_show_attend_tell_backward_pass_equals_autodiff(dtype):
    """attention_recurrence's hand-written backward pass gives autodiff's gradients (of the plain
    scan over its step) for every input, the loss reading h, alpha and z."""
    batch, locations, channels, hidden, att, steps = 3, 5, 7, 6, 4, 4
    keys = jax.random.split(jax.random.key(0), 10)
    weights = show_attend_tell.AttentionWeights(
        w_zh=jax.random.normal(keys[0], (channels + hidden, 4 * hidden)) * 0.4,
        query=jax.random.normal(keys[1], (hidden, att)) * 0.4,
        score=jax.random.normal(keys[2], (att, 1)),
        gate_w=jax.random.normal(keys[3], (hidden, 1)),
        gate_b=jnp.full((1,), 0.3),
    )
    inputs = (
        jax.random.normal(keys[4], (batch, locations, att)),  # keys
        jax.random.normal(keys[5], (batch, locations, channels)).astype(dtype),  # values
        jax.random.normal(keys[6], (batch, hidden)) * 0.5,  # h0
        jax.random.normal(keys[7], (batch, hidden)) * 0.5,  # c0
        jax.random.normal(keys[8], (steps, batch, 4 * hidden)),  # word gates
    )
    probe = [
        jax.random.normal(k, s)
        for k, s in zip(
            jax.random.split(keys[9], 3),
            [(steps, batch, hidden), (steps, batch, locations), (steps, batch, channels)],
            strict=True,
        )
    ]

    def reference(weights, keys, values, h0, c0, word_gates):
        w = weights._replace(w_zh=weights.w_zh.T.astype(dtype))  # As the step reads it.

        def step(state, gates):
            state, r = show_attend_tell._recurrence_step(w, keys, values, state, gates, dtype)
            return state, (state[0], r.alpha, r.z)

        return jax.lax.scan(step, (h0, c0), word_gates)[1]

    def custom(weights, keys, values, h0, c0, word_gates):
        return show_attend_tell.attention_recurrence(
            weights, keys, values, h0, c0, word_gates, dtype
        )

    def loss(fn):
        return lambda *args: sum(jnp.sum(p * out) for p, out in zip(probe, fn(*args), strict=True))

    _, theirs = _assert_same_values_and_gradients(custom, reference, loss, weights, inputs, dtype)
    for want in jax.tree.leaves(theirs):
        assert np.abs(np.asarray(want)).max() > 1e-3  # Every gradient is exercised.


def _assert_same_values_and_gradients(custom, reference, loss, weights, inputs, dtype):
    """custom(weights, *inputs) equals reference(...) exactly, and its gradients (through
    loss(fn)) match autodiff's of the reference for every argument; -> (ours, theirs)."""
    argnums = tuple(range(1 + len(inputs)))
    ours = jax.grad(loss(custom), argnums)(weights, *inputs)
    theirs = jax.grad(loss(reference), argnums)(weights, *inputs)
    # Each jitted, as the train step runs them (op by op, at the tests' XLA optimisation level,
    # the two programs' sums may round apart in the last bit).
    for out, ref in zip(
        jax.jit(custom)(weights, *inputs), jax.jit(reference)(weights, *inputs), strict=True
    ):
        np.testing.assert_array_equal(out, ref)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    return ours, theirs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fed_recurrence_backward_pass_equals_autodiff(dtype):
    """merge_attention's fed recurrence (the LSTM reads its previous lookup): the hand-written
    backward pass gives autodiff's gradients of the plain scan for every input, the loss reading
    h and alpha."""
    batch, locations, feed, hidden, att, steps = 3, 5, 2, 6, 4, 4
    keys = jax.random.split(jax.random.key(1), 10)
    weights = merge_attention.FedWeights(
        w_rec=jax.random.normal(keys[0], (hidden, 4 * hidden)) * 0.4,
        feed_gates=jax.random.normal(keys[1], (feed, 4 * hidden)),
        query=jax.random.normal(keys[2], (hidden, att)) * 0.6,
        score=jax.random.normal(keys[3], (att, 1)),
    )
    inputs = (
        jax.random.normal(keys[4], (batch, locations, att)),  # keys
        jax.random.normal(keys[5], (batch, locations, feed)) * 2.0,  # feed values
        jax.random.normal(keys[6], (batch, hidden)) * 0.5,  # h0
        jax.random.normal(keys[7], (batch, hidden)) * 0.5,  # c0
        jax.random.normal(keys[8], (steps, batch, 4 * hidden)),  # word gates
    )
    probe_h, probe_alpha = (
        jax.random.normal(k, s)
        for k, s in zip(
            jax.random.split(keys[9]),
            [(steps, batch, hidden), (steps, batch, locations)],
            strict=True,
        )
    )

    def reference(*args):
        return merge_attention._fed_forward(*args, dtype)[:2]

    def custom(*args):
        return merge_attention.fed_recurrence(*args, dtype)

    def loss(fn):
        def value(*args):
            h, alpha = fn(*args)
            return jnp.sum(probe_h * h) + jnp.sum(probe_alpha * alpha)

        return value

    ours, _ = _assert_same_values_and_gradients(custom, reference, loss, weights, inputs, dtype)
    assert float(jnp.abs(ours[2]).max()) > 0  # The feed values do get a gradient.
