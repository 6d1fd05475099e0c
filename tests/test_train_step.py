"""The jitted train step: it learns, masks padding, and never recompiles after step 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_compiles
from flax import nnx

from captioning import models
from captioning.data import text
from captioning.models import merge
from captioning.training import train
from configs import test as test_config

# (decoder, features per image): the Keras notebook's merge decoder on pooled features, and the
# scenes default, merge with output attention, on a 2x2 grid.
DECODERS = {"merge": (10,), "merge_attention": (2, 2, 10)}


def _merge_config():
    """The tiny test config with the Keras notebook's merge decoder (pooled [10] features here)."""
    config = test_config.get_config()
    config.model.decoder = "merge"
    config.model.feed_dim = 0  # A merge_attention option.
    return config


def _setup(
    vocab=13, batch=8, length=6, seed=0, dtype="float32", decoder="merge", word_weights=None
):
    config = test_config.get_config()
    config.model.decoder = decoder
    config.model.feed_dim = 32 if decoder == "merge_attention" else 0
    config.model.dtype = dtype
    config.model.dropout = 0.0  # Memorizing a fixed batch is the point here.
    config.train.learning_rate = 1e-2
    feature_shape = DECODERS[decoder]
    model = models.create_model(config.model, vocab, feature_shape, rngs=nnx.Rngs(seed))
    graphdef, state, tx, _ = train.init_train_state(config, model, total_steps=100)
    train_step, eval_step = train.make_steps(graphdef, tx, config.model, word_weights=word_weights)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab, (batch, length + 1)).astype(np.int32)
    tokens[:, 0] = text.START_ID
    tokens[:, -2:] = [text.END_ID, text.PAD_ID]
    batch = {
        "image_index": np.arange(batch, dtype=np.int32) % 4,
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
    }
    features = jnp.asarray(rng.normal(size=(4, *feature_shape)).astype(np.float32))
    return state, jax.jit(train_step), jax.jit(eval_step), features, batch


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(dtype, decoder):
    state, train_step, eval_step, features, batch = _setup(dtype=dtype, decoder=decoder)
    params, opt_state = state["params"], state["opt_state"]
    key = jax.random.key(0)
    first = eval_step(params, features, batch)
    for step in range(40):
        params, opt_state, _ = train_step(params, opt_state, features, batch, key, np.int32(step))
    last = eval_step(params, features, batch)
    first_loss = float(first["loss_sum"] / first["count"])
    last_loss = float(last["loss_sum"] / last["count"])
    assert last_loss < 0.5 * first_loss
    # Mixed precision keeps parameters and optimizer state in float32.
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_padding_targets_carry_no_loss(decoder):
    state, _, eval_step, features, batch = _setup(decoder=decoder)
    out = eval_step(state["params"], features, batch)
    assert float(out["count"]) == float((batch["targets"] != text.PAD_ID).sum())
    changed = dict(batch)
    changed["inputs"] = batch["inputs"].copy()
    changed["inputs"][:, -1] = 7  # Input after <end> only feeds a padded target.
    out2 = eval_step(state["params"], features, changed)
    np.testing.assert_allclose(out["loss_sum"], out2["loss_sum"], rtol=1e-6)


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_no_recompilation_after_first_step(decoder):
    state, train_step, _, features, batch = _setup(decoder=decoder)
    params, opt_state = state["params"], state["opt_state"]
    key = jax.random.key(0)
    params, opt_state, _ = train_step(params, opt_state, features, batch, key, np.int32(0))
    with count_compiles() as compiles:
        for step in range(1, 5):
            other = dict(batch, image_index=np.roll(batch["image_index"], step))
            params, opt_state, stats = train_step(
                params, opt_state, features, other, key, np.int32(step)
            )
        jax.block_until_ready(stats)
    assert compiles == []
    # The counter does see compilations (a new shape compiles): the check above can fail.
    with count_compiles() as compiles:
        small = {k: v[:4] for k, v in batch.items()}
        train_step(params, opt_state, features, small, key, np.int32(9))
    assert len(compiles) >= 1


def test_frozen_embeddings_stay_fixed_and_the_rest_trains():
    config = _merge_config()
    config.model.glove_path = "glove.txt"  # Only its presence matters to the freezing rule.
    config.model.train_embeddings = False
    assert train.embeddings_frozen(config.model)
    config.train.weight_decay = 0.1  # Decay must not touch the frozen matrix either.
    model = models.create_model(config.model, 13, (10,), rngs=nnx.Rngs(0))
    graphdef, state, tx, _ = train.init_train_state(config, model, total_steps=10)
    train_step, _ = train.make_steps(graphdef, tx, config.model)
    _, _, _, features, batch = _setup()
    train_step = jax.jit(train_step)
    params, opt_state = state["params"], state["opt_state"]
    _, _, first_stats = train_step(params, opt_state, features, batch, jax.random.key(0), 0)
    for step in range(3):  # The first update has learning rate 0 (warm-up).
        params, opt_state, stats = train_step(
            params, opt_state, features, batch, jax.random.key(0), step
        )
    np.testing.assert_array_equal(
        params["embed"]["embedding"][...], state["params"]["embed"]["embedding"][...]
    )
    assert not np.allclose(params["lstm"]["w_rec"][...], state["params"]["lstm"]["w_rec"][...])
    # The gradient never reached the embedding: the norm equals the one without it.
    _, _, trained_stats = jax.jit(
        train.make_steps(graphdef, tx, config.model, freeze_embeddings=False)[0]
    )(state["params"], state["opt_state"], features, batch, jax.random.key(0), 0)
    assert float(first_stats["grad_norm"]) < float(trained_stats["grad_norm"])


def test_concept_loss_trains_its_head_and_ignores_padding_rows():
    config = _merge_config()
    config.model.concept_loss = 1.0
    config.model.concept_pairs = 3
    model = models.create_model(config.model, 13, (10,), rngs=nnx.Rngs(0))
    graphdef, state, tx, _ = train.init_train_state(config, model, total_steps=10)
    train_step, _ = train.make_steps(graphdef, tx, config.model)
    _, _, _, features, batch = _setup()
    rng = np.random.default_rng(1)
    batch = dict(batch, concepts=rng.integers(0, 2, (8, 16)).astype(np.uint8))
    batch["targets"] = batch["targets"].copy()
    batch["targets"][-1] = text.PAD_ID  # A padding row.
    logits, aux = model(features[batch["image_index"]], batch["inputs"])
    assert aux["concept_logits"].shape == (8, 13 + 3)
    loss = merge.concept_loss(aux["concept_logits"], batch["concepts"], batch["targets"], 1.0)
    other = dict(batch, concepts=batch["concepts"].copy())
    other["concepts"][-1] = 1 - other["concepts"][-1]
    again = merge.concept_loss(aux["concept_logits"], other["concepts"], batch["targets"], 1.0)
    assert float(again) == pytest.approx(float(loss))
    other["concepts"][0] = 1 - other["concepts"][0]
    changed = merge.concept_loss(aux["concept_logits"], other["concepts"], batch["targets"], 1.0)
    assert float(changed) != pytest.approx(float(loss))

    params, opt_state = state["params"], state["opt_state"]
    step_fn = jax.jit(train_step)
    for step in range(3):
        params, opt_state, _ = step_fn(params, opt_state, features, batch, jax.random.key(0), step)
    before = state["params"]["concept_proj"]["kernel"][...]
    assert not np.allclose(params["concept_proj"]["kernel"][...], before)
    # Off by default: no head, no extra parameters.
    config.model.concept_loss = 0.0
    plain = models.create_model(config.model, 13, (10,), rngs=nnx.Rngs(0))
    assert plain.concept_proj is None


def test_word_weights_weigh_training_and_leave_evaluation_plain():
    weights = np.ones(13, np.float32)
    weights[4:8] = 5.0  # Some of the batch's words weigh five times as much.
    plain = _setup()
    weighted = _setup(word_weights=weights)
    state, train_step, eval_step, features, batch = weighted
    key, step = jax.random.key(0), np.int32(0)
    targets = np.asarray(batch["targets"])
    _, _, stats = train_step(state["params"], state["opt_state"], features, batch, key, step)
    want = np.sum(weights[targets] * (targets != text.PAD_ID))
    np.testing.assert_allclose(stats["count"], want, rtol=1e-6)
    assert stats["targets"] == np.sum(targets != text.PAD_ID)  # Throughput counts words.
    # Evaluation is the plain mean per word, as without weights.
    got = eval_step(state["params"], features, batch)
    ref = plain[2](plain[0]["params"], features, batch)
    assert got["count"] == ref["count"] == np.sum(targets != text.PAD_ID)
    np.testing.assert_allclose(got["loss_sum"], ref["loss_sum"], rtol=1e-6)
    # Weighted steps move the parameters elsewhere (after three: Adam's first step is the sign).
    ends = []
    for params, opt_state, step_fn in (
        (plain[0]["params"], plain[0]["opt_state"], plain[1]),
        (state["params"], state["opt_state"], train_step),
    ):
        for i in range(3):
            params, opt_state, _ = step_fn(params, opt_state, features, batch, key, np.int32(i))
        ends.append(params)
    leaves = zip(*(jax.tree.leaves(p) for p in ends), strict=True)
    assert any(not np.allclose(a, b) for a, b in leaves)
