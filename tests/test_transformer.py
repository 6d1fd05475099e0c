"""The Transformer decoder: cached step decoding equals teacher forcing, the cache's mask, beam
search (greedy at width 1, the brute-force optimum on a tiny vocabulary), trigram blocking,
sampling, bfloat16 and the options it refuses. tests/test_decoder_contract.py covers the rest."""

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from captioning import models
from captioning.data import text
from captioning.decoding import decode, search
from captioning.models.transformer import TransformerDecoder
from configs import test as test_config

VOCAB = 11
BATCH = 3


def _model(feature_shape=(2, 3, 6), vocab=VOCAB, seed=0, **kwargs):
    settings = dict(
        embed_dim=12,
        hidden_size=16,
        num_layers=2,
        num_heads=4,
        mlp_dim=24,
        dropout_rate=0.0,
        use_image=True,
        positions="learned",
    )
    settings.update(kwargs)
    return TransformerDecoder(vocab, feature_shape, rngs=nnx.Rngs(seed), **settings)


def _features(feature_shape=(2, 3, 6), batch=BATCH, seed=1):
    return 2.0 * jax.random.normal(jax.random.key(seed), (batch, *feature_shape))


def _tokens(length=7, vocab=VOCAB, seed=2):
    return jax.random.randint(jax.random.key(seed), (BATCH, length), 1, vocab, jnp.int32)


@pytest.mark.parametrize(
    "feature_shape,positions,embed_dim,encoder_layers",
    [
        ((2, 3, 6), "learned", 12, 0),
        ((6, 5), "sinusoidal", 16, 0),
        ((9,), "learned", 16, 0),
        ((2, 3, 6), "learned", 16, 2),
    ],
)
def test_teacher_forcing_equals_cached_step_decoding(
    feature_shape, positions, embed_dim, encoder_layers
):
    """Grid (learned positions, projected embeddings), flat square grid (sinusoids), pooled, and
    a grid through two encoder blocks."""
    if len(feature_shape) == 2:
        feature_shape = (4, 5)  # 4 locations: a 2x2 grid.
    model = _model(
        feature_shape, positions=positions, embed_dim=embed_dim, encoder_layers=encoder_layers
    )
    features, tokens = _features(feature_shape), _tokens()
    logits, aux = model(features, tokens)
    locations = TransformerDecoder.attention_locations(feature_shape)
    assert aux["attention"].shape == (BATCH, tokens.shape[1], locations)
    context, state = model.init_decode(features, tokens.shape[1] + 3)  # A longer cache.
    for t in range(tokens.shape[1]):
        state, step_logits, attention = model.decode_step(context, state, tokens[:, t])
        np.testing.assert_allclose(step_logits, logits[:, t], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(attention, aux["attention"][:, t], atol=1e-5)
        np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(state.position, tokens.shape[1])


def test_the_cache_holds_each_word_once_and_later_slots_are_masked():
    model = _model()
    features, tokens = _features(), _tokens(length=3)
    context, state = model.init_decode(features, 6)
    assert [k.shape for k in state.keys] == [(BATCH, 6, 16)] * 2
    assert [k.shape for k in context.keys] == [(BATCH, 6, 16)] * 2  # 2x3 locations.
    state, _, _ = model.decode_step(context, state, tokens[:, 0])
    state, _, _ = model.decode_step(context, state, tokens[:, 1])
    written = np.abs(np.asarray(state.keys[0])).sum(-1) > 0
    np.testing.assert_array_equal(written, [[True, True, False, False, False, False]] * BATCH)
    # Noise in the slots after the current word changes nothing.
    noisy = state._replace(
        keys=tuple(k.at[:, 3:].set(7.0) for k in state.keys),
        values=tuple(v.at[:, 3:].set(-7.0) for v in state.values),
    )
    _, clean_logits, _ = model.decode_step(context, state, tokens[:, 2])
    _, noisy_logits, _ = model.decode_step(context, noisy, tokens[:, 2])
    np.testing.assert_array_equal(clean_logits, noisy_logits)


def test_beam_one_is_greedy_and_wider_beams_score_higher():
    model = _model(seed=3)
    features = _features(seed=4)
    greedy = search.greedy_decode(model, features, max_len=8)
    one = search.beam_search(model, features, beam_size=1, max_len=8)
    np.testing.assert_array_equal(one.tokens, greedy.tokens)
    np.testing.assert_allclose(one.logprobs, greedy.logprobs, atol=1e-6)
    four = search.beam_search(model, features, beam_size=4, max_len=8)
    assert np.all(np.asarray(four.logprobs.sum(-1)) >= np.asarray(greedy.logprobs.sum(-1)) - 1e-5)


def _sequence_logprob(model, features, words):
    """Sum of log p(w_t | <start>, w_<t) by teacher forcing, for one image [1, ...]."""
    tokens_in = jnp.asarray([[text.START_ID, *words[:-1]]], jnp.int32)
    logits, _ = model(features, tokens_in)
    logp = jax.nn.log_softmax(logits[0], axis=-1)
    return float(sum(logp[t, w] for t, w in enumerate(words)))


def test_beam_search_finds_the_brute_force_optimum_on_a_tiny_vocabulary():
    """Every caption of <= 3 words over the 4 ids decoding may emit (`<end>` and 3 words; it
    never emits `search.NEVER_EMITTED`), ending at `<end>` or cut at 3 words; a beam of 16 = 4^2
    keeps every 2-word prefix, so it must find the most likely one."""
    vocab, max_len = 7, 3
    allowed = [i for i in range(vocab) if i not in search.NEVER_EMITTED]
    model = _model((2, 2, 5), vocab=vocab, seed=5, hidden_size=8, num_heads=2, embed_dim=8)
    model.out_proj.kernel[...] = 4.0 * model.out_proj.kernel[...]  # Sharper, distinct scores.
    for image in range(3):
        features = _features((2, 2, 5), batch=1, seed=10 + image)
        candidates = [
            words
            for n in range(1, max_len + 1)
            for words in itertools.product(allowed, repeat=n)
            if text.END_ID not in words[:-1] and (n == max_len or words[-1] == text.END_ID)
        ]
        scores = {w: _sequence_logprob(model, features, w) for w in candidates}
        best = max(scores, key=scores.get)
        beams = search.beam_search_beams(model, features, beam_size=16, max_len=max_len)
        found = tuple(int(w) for w in np.asarray(beams.tokens[0, 0])[: int(beams.lengths[0, 0])])
        assert found == best, (found, best)
        np.testing.assert_allclose(float(beams.scores[0, 0]), scores[best], atol=1e-4)


def _decode_config(**changes):
    config = ml_collections.ConfigDict(
        dict(
            method="greedy",
            max_len=10,
            beam_size=3,
            length_penalty=0.0,
            temperature=1.0,
            top_k=0,
            block_repeats=False,
        )
    )
    config.update(changes)
    return config


def _trigrams(row):
    words = [int(w) for w in row]
    if text.END_ID in words:  # Blocking may leave only `<end>`: the caption stops there.
        words = words[: words.index(text.END_ID)]
    return [tuple(words[i : i + 3]) for i in range(len(words) - 2)]


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_jitted_decoding_blocks_repeated_trigrams(method):
    model = _model(vocab=7, seed=6)  # Three words: long captions would repeat themselves.
    model.out_proj.bias[...] = model.out_proj.bias[...].at[text.END_ID].set(-50.0)
    graphdef, params = nnx.split(model)
    features = _features()
    fn = decode.decode_fn(graphdef, _decode_config(method=method, block_repeats=True))
    out = fn(params, features, jax.random.key(0))
    assert out.tokens.shape == (BATCH, 10) and out.attention.shape == (BATCH, 10, 6)
    for row in np.asarray(out.tokens):
        grams = _trigrams(row)
        assert len(grams) == len(set(grams)), row
        assert len(grams) >= 5, row  # Long captions, not stopped at once.


def test_sampling_reproduces_greedy_at_top_1_and_its_logprobs_have_gradients():
    model = _model(seed=7)
    features = _features()
    greedy = search.greedy_decode(model, features, max_len=8)
    top1 = search.sample_decode(model, features, jax.random.key(0), max_len=8, top_k=1)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    graphdef, params = nnx.split(model)

    def total(params):
        model = nnx.merge(graphdef, params)
        out = search.sample_decode(model, features, jax.random.key(1), max_len=8)
        return out.logprobs.sum()

    grads = jax.grad(total)(params)
    norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0


def test_bfloat16_stays_close_to_float32():
    full = _model()
    half = _model(dtype=jnp.bfloat16)
    features, tokens = _features(), _tokens()
    logits32, _ = full(features, tokens)
    logits16, _ = half(features, tokens)
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(logits16, logits32, atol=0.1)


def test_positions_are_not_word_embeddings_and_glove_fits():
    model = _model()
    _, params = nnx.split(model)
    declared = [
        jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_leaves_with_path(params)
        if TransformerDecoder.is_word_embedding(path)
    ]
    assert len(declared) == 1 and declared[0].startswith("['embed']['embedding']"), declared
    model.set_word_embeddings(jnp.ones((VOCAB, 12)))


def test_encoder_blocks_mix_the_locations():
    """Without an encoder a location's memory row depends on its own features only; with one,
    changing one location's features changes every row."""
    features = _features()
    moved = features.at[:, 0, 0].add(5.0)
    plain, encoded = _model(), _model(encoder_layers=1)
    rows = plain._memory(moved, None, False) - plain._memory(features, None, False)
    assert np.abs(rows[:, 1:]).max() == 0.0 and np.abs(rows[:, 0]).max() > 0.1
    rows = encoded._memory(moved, None, False) - encoded._memory(features, None, False)
    assert np.abs(rows[:, 1:]).max(axis=-1).min() > 1e-3
    with pytest.raises(ValueError, match="encoder_layers"):
        _model(encoder_layers=-1)


def test_encoder_layers_is_refused_by_other_decoders():
    config = test_config.get_config()
    config.model.encoder_layers = 1
    with pytest.raises(ValueError, match="config.model.encoder_layers=1"):
        models.create_model(config.model, VOCAB, (4, 4, 8), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("field,value", [("feed_dim", 32), ("concept_loss", 0.5)])
def test_other_decoders_options_are_refused_by_name(field, value):
    config = test_config.get_config()
    config.model.decoder = "transformer"
    config.model.feed_dim = 0
    config.model[field] = value
    with pytest.raises(ValueError, match=f"config.model.{field}="):
        models.create_model(config.model, VOCAB, (4, 4, 8), rngs=nnx.Rngs(0))


def test_bad_sizes_and_long_captions_are_refused_by_name():
    with pytest.raises(ValueError, match="num_heads"):
        _model(num_heads=5)
    with pytest.raises(ValueError, match="positions"):
        _model(positions="rotary")
    model = _model()
    with pytest.raises(ValueError, match="decode.max_len"):
        model.init_decode(_features(), 100)
    with pytest.raises(ValueError, match="attention_positions"):
        _model((5, 6))
