"""Beam search and sampling: greedy equivalence, exactness against brute force, early finish,
length penalty, reproducible sampling, sampled log-probabilities and their gradients."""

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
from configs import scenes as scenes_config

VOCAB = 6
FEATURE_DIM = 8


def _model(decoder: str = "merge", seed: int = 0) -> nnx.Module:
    return models.DECODERS[decoder](
        VOCAB,
        FEATURE_DIM,
        embed_dim=8,
        hidden_size=16,
        dropout_rate=0.0,
        use_image=True,
        rngs=nnx.Rngs(seed),
    )


def _features(batch: int, seed: int = 1) -> jax.Array:
    # Large-ish features so that images get clearly different captions.
    return 3.0 * jax.random.normal(jax.random.key(seed), (batch, FEATURE_DIM))


class AttentionToy:
    """A decoder with pytree context/state and real attention [B, L] (L = 5) for the tests."""

    def __init__(self, base: nnx.Module):
        self.base = base
        self.keys = jax.random.normal(jax.random.key(7), (5, 16))

    def init_decode(self, features, max_len=None):
        image, (h, c) = self.base.init_decode(features)
        context = {"image": image, "keys": jnp.broadcast_to(self.keys, (features.shape[0], 5, 16))}
        return context, {"h": h, "c": c, "steps": jnp.zeros((features.shape[0],), jnp.int32)}

    def decode_step(self, context, state, tokens):
        (h, c), logits, _ = self.base.decode_step(
            context["image"], (state["h"], state["c"]), tokens
        )
        attention = jax.nn.softmax(jnp.einsum("blh,bh->bl", context["keys"], h))
        return {"h": h, "c": c, "steps": state["steps"] + 1}, logits, attention


class CountingDecoder:
    """Wraps a decoder and counts decode_step executions (not traces)."""

    def __init__(self, base):
        self.base = base
        self.calls = 0

    def _count(self):
        self.calls += 1

    def init_decode(self, features, max_len=None):
        return self.base.init_decode(features)

    def decode_step(self, context, state, tokens):
        jax.debug.callback(self._count)
        return self.base.decode_step(context, state, tokens)


def _slice_tree(tree, index):
    return jax.tree.map(lambda x: x[index], tree)


def _brute_force(model, features, max_len: int) -> list[dict[tuple[int, ...], float]]:
    """Every complete sequence (ended by <end>, or max_len words) -> total log-probability.

    `<pad>`, `<start>` and `<unk>` are never emitted (`search.NEVER_EMITTED`). Steps the model in
    Python, one batched decode_step per depth over all open prefixes.
    """
    batch = features.shape[0]
    context, state = model.init_decode(features)
    complete = [{} for _ in range(batch)]
    images = np.arange(batch)
    prefixes = [()] * batch
    logps = np.zeros(batch)
    last = np.full(batch, text.START_ID)
    for depth in range(1, max_len + 1):
        state, logits, _ = model.decode_step(
            _slice_tree(context, images), state, jnp.asarray(last, jnp.int32)
        )
        log_probs = np.asarray(jax.nn.log_softmax(logits), np.float64)
        keep_rows, keep_words = [], []
        for row, (image, prefix) in enumerate(zip(images, prefixes, strict=True)):
            for word in sorted(set(range(VOCAB)) - set(search.NEVER_EMITTED)):
                total = logps[row] + log_probs[row, word]
                if word == text.END_ID or depth == max_len:
                    complete[image][(*prefix, word)] = total
                else:
                    keep_rows.append(row)
                    keep_words.append(word)
        rows = np.asarray(keep_rows)
        if not len(rows):
            break
        images = images[rows]
        prefixes = [(*prefixes[r], w) for r, w in zip(keep_rows, keep_words, strict=True)]
        logps = logps[rows] + log_probs[rows, np.asarray(keep_words)]
        last = np.asarray(keep_words)
        state = _slice_tree(state, rows)
    return complete


def _best(complete: dict[tuple[int, ...], float], length_penalty: float, max_len: int):
    def score(item):
        seq, logp = item
        return logp / len(seq) ** length_penalty

    seq, logp = max(complete.items(), key=score)
    return np.pad(seq, (0, max_len - len(seq))), score((seq, logp))


def _teacher_forced_logits(model, features, tokens):
    """Logits [B, T, V] of the decoder fed <start> + tokens[:, :-1]."""
    tokens_in = jnp.concatenate(
        [jnp.full((tokens.shape[0], 1), text.START_ID, jnp.int32), tokens[:, :-1]], axis=1
    )
    logits, _ = model(features, tokens_in)
    return logits


def _valid_mask(tokens: np.ndarray) -> np.ndarray:
    """True up to and including the first <end> of each row."""
    ended_before = np.cumsum(tokens == text.END_ID, axis=1) - (tokens == text.END_ID)
    return ended_before == 0


@pytest.mark.parametrize("decoder", ["merge", "inject"])
def test_beam_one_is_greedy(decoder):
    model = _model(decoder)
    features = _features(16)
    greedy = search.greedy_decode(model, features, max_len=10)
    beam = search.beam_search(model, features, beam_size=1, max_len=10, length_penalty=0.0)
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)
    np.testing.assert_allclose(beam.logprobs, greedy.logprobs, atol=1e-6)
    if decoder == "merge":  # A length penalty cannot change a beam of one.
        beam = search.beam_search(model, features, beam_size=1, max_len=10, length_penalty=1.0)
        np.testing.assert_array_equal(beam.tokens, greedy.tokens)


@pytest.mark.parametrize("decoder", ["merge", "inject"])
def test_wide_beam_finds_brute_force_optimum(decoder):
    max_len, batch = 4, 8
    model = _model(decoder)
    features = _features(batch)
    complete = _brute_force(model, features, max_len)
    results = {}
    for length_penalty in (0.0, 2.0):
        # VOCAB**(max_len-1) slots hold every hypothesis until the last step: the search is exact.
        beams = search.beam_search_beams(
            model,
            features,
            beam_size=VOCAB ** (max_len - 1),
            max_len=max_len,
            length_penalty=length_penalty,
        )
        for b in range(batch):
            tokens, score = _best(complete[b], length_penalty, max_len)
            np.testing.assert_array_equal(beams.tokens[b, 0], tokens)
            np.testing.assert_allclose(beams.scores[b, 0], score, rtol=1e-5)
        # Best first, and the scores agree with the lengths and per-token log-probabilities.
        scores = np.asarray(beams.scores)
        assert np.all(np.diff(scores, axis=1)[np.isfinite(scores[:, 1:])] <= 0)
        np.testing.assert_allclose(
            beams.logprobs[:, 0].sum(-1) / beams.lengths[:, 0] ** length_penalty,
            scores[:, 0],
            rtol=1e-5,
        )
        results[length_penalty] = beams
    raw, long = results[0.0], results[2.0]
    changed = np.any(np.asarray(raw.tokens[:, 0]) != np.asarray(long.tokens[:, 0]), axis=1)
    if decoder == "merge":  # The constructed case: this model and seed change some choices.
        assert changed.any(), "the length penalty should change some caption here"
    # A penalty > 0 rewards length: a changed choice is never shorter.
    assert np.all(long.lengths[changed, 0] >= raw.lengths[changed, 0])


def test_beam_scores_improve_with_width():
    model = _model("merge")
    features = _features(8)
    scores = [
        search.beam_search_beams(model, features, beam_size=k, max_len=6).scores[:, 0]
        for k in (1, 4)
    ]
    # Not guaranteed in general, but holds on this model; a regression would show up here.
    for narrow, wide in itertools.pairwise(scores):
        assert np.all(np.asarray(wide) >= np.asarray(narrow) - 1e-5)


def test_beam_output_shapes_padding_and_replay():
    base = _model("merge")
    model = AttentionToy(base)
    features = _features(5)
    out = search.beam_search(model, features, beam_size=3, max_len=7)
    assert out.tokens.shape == (5, 7) and out.tokens.dtype == jnp.int32
    assert out.attention.shape == (5, 7, 5) and out.logprobs.shape == (5, 7)
    tokens = np.asarray(out.tokens)
    valid = _valid_mask(tokens)
    assert np.all(tokens[~valid] == text.PAD_ID)
    assert np.all(np.asarray(out.logprobs)[~valid] == 0.0)
    assert np.all(np.asarray(out.attention)[~valid] == 0.0)
    # Replaying the chosen words reproduces their log-probabilities and attention maps, so the
    # state, history and attention were all reordered with the right parent beams.
    context, state = model.init_decode(features)
    prev = jnp.full((5,), text.START_ID, jnp.int32)
    for t in range(7):
        state, logits, attention = model.decode_step(context, state, prev)
        logp = jax.nn.log_softmax(logits)[jnp.arange(5), tokens[:, t]]
        np.testing.assert_allclose(out.logprobs[:, t][valid[:, t]], logp[valid[:, t]], atol=1e-5)
        np.testing.assert_allclose(
            out.attention[:, t][valid[:, t]], attention[valid[:, t]], atol=1e-5
        )
        prev = jnp.asarray(tokens[:, t])


def test_beam_finishes_early():
    model = _model("merge")
    model.out_proj.bias[...] = model.out_proj.bias[...].at[text.END_ID].set(30.0)
    counting = CountingDecoder(model)
    out = search.beam_search(counting, _features(4), beam_size=3, max_len=20)
    jax.effects_barrier()
    # Beam 0 ends at step 1, the two runners-up at step 2; then every beam is finished.
    assert counting.calls == 2
    np.testing.assert_array_equal(out.tokens[:, 0], text.END_ID)
    assert np.all(np.asarray(out.tokens[:, 1:]) == text.PAD_ID)


def test_sampling_reproducible_and_keyed():
    model = _model("merge")
    features = _features(16)
    sample = jax.jit(lambda key: search.sample_decode(model, features, key, max_len=8))
    a, b = sample(jax.random.key(0)), sample(jax.random.key(0))
    c = sample(jax.random.key(1))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert np.any(np.asarray(a.tokens) != np.asarray(c.tokens))
    assert a.tokens.shape == (16, 8) and a.attention.shape == (16, 8, 0)


@pytest.mark.parametrize("decoder", ["merge", "inject"])
def test_top_k_one_is_greedy(decoder):
    model = _model(decoder)
    features = _features(16)
    greedy = search.greedy_decode(model, features, max_len=10)
    out = search.sample_decode(
        model, features, jax.random.key(3), max_len=10, temperature=0.7, top_k=1
    )
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    # The single candidate has probability one under the top-1 distribution.
    np.testing.assert_allclose(out.logprobs, 0.0, atol=1e-6)


@pytest.mark.parametrize("temperature,top_k", [(0.5, 0), (2.0, 3)])
def test_sampled_logprobs_match_the_sampling_distribution(temperature, top_k):
    model = _model("merge")
    features = _features(16)
    out = search.sample_decode(
        model, features, jax.random.key(5), max_len=8, temperature=temperature, top_k=top_k
    )
    tokens = np.asarray(out.tokens)
    valid = _valid_mask(tokens)
    scaled = np.asarray(_teacher_forced_logits(model, features, out.tokens)) / temperature
    scaled[..., list(search.NEVER_EMITTED)] = -np.inf  # Never drawn.
    if top_k:
        kth = np.sort(scaled, axis=-1)[..., -top_k][..., None]
        assert np.all(np.take_along_axis(scaled, tokens[..., None], -1)[valid] >= kth[valid])
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    expected = np.take_along_axis(jax.nn.log_softmax(scaled), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs)[valid], expected[valid], atol=1e-5)
    assert np.all(np.asarray(out.logprobs)[~valid] == 0.0)


def test_sampled_logprobs_are_differentiable():
    model = _model("merge")
    graphdef, params = nnx.split(model)
    features = _features(4)
    key = jax.random.key(2)
    tokens = search.sample_decode(model, features, key, max_len=4, temperature=0.8).tokens
    valid = jnp.asarray(_valid_mask(np.asarray(tokens)))

    def sampled(params):
        out = search.sample_decode(
            nnx.merge(graphdef, params), features, key, max_len=4, temperature=0.8
        )
        return out.logprobs.sum()

    def teacher_forced(params):
        logits = _teacher_forced_logits(nnx.merge(graphdef, params), features, tokens) / 0.8
        logits = search.mask_never_emitted(logits)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
        return jnp.where(valid, logp, 0.0).sum()

    value, grads = jax.value_and_grad(sampled)(params)
    value_tf, grads_tf = jax.value_and_grad(teacher_forced)(params)
    np.testing.assert_allclose(value, value_tf, rtol=1e-5)
    for g, g_tf in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_tf), strict=True):
        np.testing.assert_allclose(g, g_tf, atol=1e-4, rtol=1e-4)
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


def _decode_config(**fields) -> ml_collections.ConfigDict:
    config = scenes_config.get_config().decode
    config.update(method="beam", max_len=8, beam_size=3, batch_size=4)
    config.update(fields)
    return config


def _repeats_trigram(row) -> bool:
    words = [int(w) for w in row if w not in (text.PAD_ID, text.END_ID)]
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    return len(set(trigrams)) < len(trigrams)


def _says_thrice(row) -> bool:
    words = [int(w) for w in row if w not in (text.PAD_ID, text.END_ID)]
    return any(a == b == c for a, b, c in zip(words, words[1:], words[2:], strict=False))


def _biased_model(bias: np.ndarray):
    """A merge decoder whose every step's logits are `bias` [VOCAB], whatever the image."""
    model = _model("merge")
    model.out_proj.bias[...] = jnp.asarray(bias)
    model.out_proj.kernel[...] = jnp.zeros_like(model.out_proj.kernel[...])
    return nnx.split(model)


@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_block_repeats_never_emits_a_repeated_trigram(method):
    """A decoder that loves one word says it again and again; with decode.block_repeats (the
    default) it never repeats a trigram nor says a word thrice in a row (and the checks
    themselves fire without blocking)."""
    bias = np.full(VOCAB, -5.0, np.float32)
    bias[4], bias[5] = 8.0, 4.0  # Word 4 always wins, word 5 second, then <end>.
    bias[text.END_ID] = 0.0
    graphdef, params = _biased_model(bias)
    features, key = _features(6), jax.random.key(0)
    config = _decode_config(method=method, max_len=12, top_k=2, block_repeats=False)
    plain = np.asarray(decode.decode_fn(graphdef, config)(params, features, key).tokens)
    assert any(_repeats_trigram(row) for row in plain)
    assert any(_says_thrice(row) for row in plain)
    config.block_repeats = True
    assert scenes_config.get_config().decode.block_repeats  # The default.
    blocked = decode.decode_fn(graphdef, config)(params, features, key)
    tokens = np.asarray(blocked.tokens)
    assert not any(_repeats_trigram(row) or _says_thrice(row) for row in tokens)
    if method != "sample":
        assert (tokens[:, :2] == 4).all() and (tokens[:, 2] == 5).all()  # Twice is allowed.
    mask = search.repeated_trigram_mask(jnp.asarray([[4, 4, 4, 0]]), jnp.asarray(3), VOCAB)
    assert np.flatnonzero(np.asarray(mask[0])).tolist() == [4]
    mask = search.repeat_mask(jnp.asarray([[5, 4, 4, 0], [4, 5, 4, 0]]), jnp.asarray(3), VOCAB)
    assert np.flatnonzero(np.asarray(mask[0])).tolist() == [4]  # A third 4 in a row.
    assert not np.asarray(mask[1]).any()


@pytest.mark.parametrize("block_repeats", [False, True])
@pytest.mark.parametrize("method", ["greedy", "beam", "sample"])
def test_special_tokens_are_never_emitted(method, block_repeats):
    """A decoder whose favourite words are <unk>, <start> and <pad> still says real words."""
    bias = np.full(VOCAB, 0.0, np.float32)
    bias[text.UNK_ID], bias[text.START_ID], bias[text.PAD_ID] = 9.0, 8.0, 7.0
    graphdef, params = _biased_model(bias)
    config = _decode_config(method=method, max_len=10, block_repeats=block_repeats)
    out = decode.decode_fn(graphdef, config)(params, _features(8), jax.random.key(1))
    tokens, valid = np.asarray(out.tokens), _valid_mask(np.asarray(out.tokens))
    assert valid.any() and not np.isin(tokens[valid], search.NEVER_EMITTED).any()


def test_decode_fn_dispatch():
    model = _model("inject")
    graphdef, params = nnx.split(model)
    features = _features(4)
    key = jax.random.key(0)
    beam = decode.decode_fn(graphdef, _decode_config(method="beam"))(params, features, key)
    direct = search.beam_search(model, features, beam_size=3, max_len=8)
    np.testing.assert_array_equal(beam.tokens, direct.tokens)
    greedy = decode.decode_fn(graphdef, _decode_config(method="greedy"))(params, features, key)
    np.testing.assert_array_equal(greedy.tokens, search.greedy_decode(model, features, 8).tokens)

    sample = decode.decode_fn(graphdef, _decode_config(method="sample"))
    a, b = sample(params, features, key), sample(params, features, key)
    np.testing.assert_array_equal(a.tokens, b.tokens)  # The same key draws the same captions.
    direct = search.sample_decode(model, features, key, max_len=8)
    np.testing.assert_array_equal(a.tokens, direct.tokens)
    d = sample(params, _features(32), jax.random.key(9))
    assert d.tokens.shape == (32, 8)

    with pytest.raises(ValueError, match="config.decode.method"):
        decode.decode_fn(graphdef, _decode_config(method="nucleus"))
    with pytest.raises(ValueError, match="config.decode.beam_size"):
        decode.decode_fn(graphdef, _decode_config(beam_size=0))
