"""The decoder contract (captioning/models/base.py), checked for every registered decoder.

A toy decoder defined and registered here, outside the package, gets every test: a new decoder is
one file and one `@models.register` line, and this suite tests it without being edited.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import count_compiles
from flax import nnx

from captioning import checkpoint, models
from captioning.decoding import search
from captioning.models.layers import Dense, image_input
from captioning.training import train
from configs import test as test_config

VOCAB = 13
BATCH = 3


@models.register("toy_contract")
class ToyDecoder(models.Decoder):
    """A plain tanh RNN over [word; image] with its own embedding name and an auxiliary loss:
    the smallest decoder that keeps the contract."""

    word_embeddings = ("words.embedding",)

    def __init__(self, vocab_size, feature_dim, *, embed_dim, hidden_size, rngs, **_):
        self.hidden_size = hidden_size
        self.words = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.image = Dense(feature_dim, hidden_size, rngs=rngs)
        self.cell = Dense(embed_dim + 2 * hidden_size, hidden_size, rngs=rngs)
        self.out_proj = Dense(hidden_size, vocab_size, rngs=rngs)

    @classmethod
    def from_config(cls, model_config, vocab_size, feature_shape, *, rngs):
        return cls(
            vocab_size,
            feature_shape[-1],
            embed_dim=model_config.embed_dim,
            hidden_size=model_config.hidden_size,
            rngs=rngs,
        )

    def _step(self, image, h, words):
        return jnp.tanh(self.cell(jnp.concatenate([words, image, h], axis=-1)))

    def pre_logits(self, features, tokens_in, *, train=False, key=None):
        image, h = self.init_decode(features)

        def step(h, words):
            h = self._step(image, h, words)
            return h, h

        _, h_tbh = jax.lax.scan(step, h, jnp.swapaxes(self.words(tokens_in), 0, 1))
        h_bth = jnp.swapaxes(h_tbh, 0, 1)
        return h_bth, {"hidden": h_bth}

    def aux_loss(self, aux, batch):
        return 1e-3 * jnp.mean(aux["hidden"] ** 2)

    def init_decode(self, features, max_len=None):
        image = jnp.tanh(self.image(image_input(features, True)))
        return image, jnp.zeros((features.shape[0], self.hidden_size), jnp.float32)

    def decode_step(self, context, state, tokens):
        h = self._step(context, state, self.words(tokens))
        return h, self.out_proj(h), jnp.zeros((tokens.shape[0], 0), jnp.float32)


DECODERS = sorted(models.DECODERS)


def _config(name):
    config = test_config.get_config()
    config.model.decoder = name
    for other in models.DECODERS.values():  # Other decoders' own options off.
        for field, off in other.own_options.items():
            if field not in models.get(name).own_options:
                config.model[field] = off
    if name == "transformer":
        config.model.encoder_layers = 1  # As the default run: the contract holds through it.
    return config


def _feature_shape(name):
    return (2, 3, 6) if models.get(name).spatial else (6,)


def _model(name, seed=0):
    config = _config(name)
    return models.create_model(config.model, VOCAB, _feature_shape(name), rngs=nnx.Rngs(seed))


def _inputs(name, seed=0):
    rng = np.random.default_rng(seed)
    features = jnp.asarray(rng.normal(size=(BATCH, *_feature_shape(name))), jnp.float32)
    tokens = jnp.asarray(rng.integers(1, VOCAB, size=(BATCH, 5)), jnp.int32)
    return features, tokens


def test_the_toy_decoder_is_registered_and_the_package_ones_are_there():
    assert "toy_contract" in DECODERS
    assert {"merge", "inject", "attention", "merge_attention"} <= set(DECODERS)
    with pytest.raises(ValueError, match="unknown"):
        models.get("no_such_decoder")


@pytest.mark.parametrize("name", DECODERS)
def test_teacher_forcing_equals_step_decoding(name):
    model = _model(name)
    features, tokens = _inputs(name)
    logits, _ = model(features, tokens)
    assert logits.shape == (BATCH, tokens.shape[1], VOCAB) and logits.dtype == jnp.float32
    context, state = model.init_decode(features, tokens.shape[1])
    for t in range(tokens.shape[1]):
        state, step_logits, _ = model.decode_step(context, state, tokens[:, t])
        np.testing.assert_allclose(step_logits, logits[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", DECODERS)
def test_decode_state_is_batch_first_and_attention_has_the_declared_shape(name):
    model = _model(name)
    features, tokens = _inputs(name)
    context, state = model.init_decode(features, 4)
    for leaf in jax.tree.leaves((context, state)):
        assert leaf.shape[0] == BATCH, leaf.shape
    new_state, _, attention = model.decode_step(context, state, tokens[:, 0])
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for new, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
        assert (new.shape, new.dtype) == (old.shape, old.dtype)
    locations = models.get(name).attention_locations(_feature_shape(name))
    assert attention.shape == (BATCH, locations)


@pytest.mark.parametrize("name", DECODERS)
def test_beam_search_tiles_and_gathers_the_state(name):
    """One beam is greedy; wider beams score at least as well as greedy under the model."""
    model = _model(name, seed=1)
    features, _ = _inputs(name, seed=1)
    greedy = search.greedy_decode(model, features, max_len=6)
    one = search.beam_search(model, features, beam_size=1, max_len=6)
    np.testing.assert_array_equal(one.tokens, greedy.tokens)
    three = search.beam_search(model, features, beam_size=3, max_len=6)
    assert np.all(np.asarray(three.logprobs.sum(-1)) >= np.asarray(greedy.logprobs.sum(-1)) - 1e-4)


@pytest.mark.parametrize("name", DECODERS)
def test_word_embeddings_are_declared_loaded_and_frozen(name):
    model = _model(name)
    decoder = models.get(name)
    _, params = nnx.split(model)
    paths = [
        path
        for path, _ in jax.tree_util.tree_leaves_with_path(params)
        if decoder.is_word_embedding(path)
    ]
    assert paths, "no parameter matches the declared word_embeddings"
    matrix = np.random.default_rng(0).normal(size=(VOCAB, _config(name).model.embed_dim))
    model.set_word_embeddings(jnp.asarray(matrix, jnp.float32))
    with pytest.raises(ValueError, match="embed_dim"):
        model.set_word_embeddings(jnp.zeros((VOCAB, 3)))

    config = _config(name)
    graphdef, state, tx, _ = train.init_train_state(config, model, 10, freeze_embeddings=True)
    train_step, _ = train.make_steps(graphdef, tx, config.model, freeze_embeddings=True)
    features, tokens = _inputs(name)
    batch = {"features": features, "inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params, opt_state = state["params"], state["opt_state"]
    for step in range(2):  # The warm-up's first learning rate is 0.
        params, opt_state, stats = jax.jit(train_step)(
            params, opt_state, None, batch, jax.random.key(0), step
        )
    assert np.isfinite(float(stats["loss_sum"]))
    before = dict(jax.tree_util.tree_leaves_with_path(state["params"]))
    for path, value in jax.tree_util.tree_leaves_with_path(params):
        if decoder.is_word_embedding(path):
            np.testing.assert_array_equal(value, matrix.astype(np.float32))
        elif path in before and "out_proj" in str(path):
            assert not np.array_equal(value, before[path]), path


@pytest.mark.parametrize("name", DECODERS)
def test_aux_loss_reaches_the_training_loss(name):
    model = _model(name)
    features, tokens = _inputs(name)
    pre_logits, aux = model.pre_logits(features, tokens[:, :-1])
    assert pre_logits.shape[:2] == (BATCH, tokens.shape[1] - 1)
    extra = model.aux_loss(aux, {"targets": tokens[:, 1:]})
    assert extra is None or np.shape(extra) == ()


@pytest.mark.parametrize("name", DECODERS)
def test_checkpoint_restores_into_the_abstract_model(name, tmp_path):
    config = _config(name)
    model = _model(name, seed=3)
    _, params = nnx.split(model)
    latest, best = checkpoint.managers(str(tmp_path), keep=1)
    checkpoint.save(latest, 1, params=params)
    latest.wait_until_finished()
    graphdef, target = models.abstract_model(config.model, VOCAB, _feature_shape(name))
    restored = checkpoint.restore(latest, 1, params=target)["params"]
    for manager in (latest, best):
        manager.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    features, tokens = _inputs(name)
    np.testing.assert_array_equal(
        nnx.merge(graphdef, restored)(features, tokens)[0], model(features, tokens)[0]
    )
    assert os.listdir(tmp_path)


@pytest.mark.parametrize("name", DECODERS)
def test_no_recompilation_after_the_first_call(name):
    graphdef, params = nnx.split(_model(name))
    config = _config(name)
    tx = optax.adam(1e-3)
    train_step, _ = train.make_steps(graphdef, tx, config.model)
    step = jax.jit(train_step)
    greedy = jax.jit(lambda p, f: search.greedy_decode(nnx.merge(graphdef, p), f, max_len=5))
    opt_state = tx.init(params)

    def run(params, opt_state, seed):
        features, tokens = _inputs(name, seed)
        batch = {"features": features, "inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        params, opt_state, _ = step(params, opt_state, None, batch, jax.random.key(0), seed)
        greedy(params, features).tokens.block_until_ready()
        return params, opt_state

    params, opt_state = run(params, opt_state, 0)
    with count_compiles() as compiles:
        for seed in (1, 2):
            params, opt_state = run(params, opt_state, seed)
    assert compiles == []
