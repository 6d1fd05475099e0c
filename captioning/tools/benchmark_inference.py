"""The inference rows of `captioning.tools.benchmark`: SCST steps, decoding, the web demo, the
feature export against the bare backbone. Each returns a dict of figures (module docstring of
`benchmark`: what each means)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from captioning.data import text
from captioning.data.datasets.base import ImageRecord
from captioning.decoding import decode, search


def benchmark_scst(config, graphdef, params, vocab, records, seconds: float, num_samples: int = 5):
    """SCST at the Keras notebook's sizes: images per second of whole steps (5 samples each: sample,
    CIDEr-D rewards, teacher-forced update) and the rewards alone."""
    from captioning.training import rewards, scst

    config.scst = ml_collections.ConfigDict({"num_samples": num_samples})
    tx = optax.adam(5e-5)
    sample_fn, update_fn = scst.make_steps(graphdef, tx, config.scst, 16)
    sample_fn, update_fn = jax.jit(sample_fn), jax.jit(update_fn, donate_argnums=(0, 1))
    references = [[f"{c} {scst.END_WORD}" for c in r.captions] for r in records]
    scorer = rewards.CiderD(references)
    rng = np.random.default_rng(2)
    features = rng.normal(size=(len(records), 2048)).astype(np.float32)
    params = jax.tree.map(jnp.copy, params)  # The update donates its buffers; keep the caller's.
    opt_state = tx.init(params)
    images = reward_seconds = candidates = 0
    start = None
    for step in range(10_000):
        rows = rng.integers(0, len(records), 50)
        batch = jnp.asarray(features[rows])
        tokens = np.asarray(sample_fn(params, batch, jax.random.key(step)))
        tick = time.perf_counter()
        sample_rewards = scorer.scores(scst.caption_texts(tokens, vocab), np.repeat(rows, 5))
        spent = time.perf_counter() - tick
        advantage, _ = scst.advantages(sample_rewards.reshape(-1, num_samples), "mean")
        params, opt_state, stats = update_fn(
            params, opt_state, batch, jnp.asarray(tokens), jnp.asarray(advantage.reshape(-1))
        )
        jax.block_until_ready(params)
        if step == 1:  # Both functions compiled: time from here.
            start, images, reward_seconds, candidates = time.perf_counter(), 0, 0.0, 0
        elif start is not None:
            images, reward_seconds, candidates = (
                images + 50,
                reward_seconds + spent,
                candidates + len(tokens),
            )
            if time.perf_counter() - start > seconds:
                break
    elapsed = time.perf_counter() - start
    return {
        "scst_images_per_s": round(images / elapsed, 1),
        "cider_rewards_per_s": round(candidates / reward_seconds, 1),
        "scst_reward_share_of_step": round(reward_seconds / elapsed, 3),
    }


def benchmark_serve(workdir: str, requests: int = 64, threads: int = 16) -> dict:
    """The web demo of a trained run under load: `requests` from `threads` threads."""
    from PIL import Image

    from captioning import serve

    captioner = serve.Captioner(workdir)
    app = serve.build_app(workdir, captioner=captioner)
    port = 7860 + os.getpid() % 1000
    # Gradio prints to stdout; the benchmark's stdout is its JSON.
    quiet = contextlib.redirect_stdout(sys.stderr)
    with quiet:
        app.launch(**serve.launch_settings("127.0.0.1", port, 10), prevent_thread_lock=True)
    rng = np.random.default_rng(3)
    with tempfile.TemporaryDirectory() as tmp:
        images = []
        for i in range(8):  # What users upload: photos of other sizes than the model's input.
            images.append(os.path.join(tmp, f"upload{i}.jpg"))
            Image.fromarray(rng.integers(0, 255, (240, 320, 3), np.uint8)).save(images[-1])
        try:
            return serve.load_benchmark(f"http://127.0.0.1:{port}/", images, requests, threads)
        finally:
            with quiet:
                app.close()
            captioner.close()


def without_end(params):
    """The merge decoder's parameters with `<end>` made impossible (its output bias -1e9), so
    that every caption runs the full length: the worst case, and a figure that does not depend
    on what a briefly trained decoder happens to say."""
    bias = params["out_proj"]["bias"]
    end_bias = bias.replace(bias[...].at[text.END_ID].set(-1e9))
    return {**params, "out_proj": {**params["out_proj"], "bias": end_bias}}


def decode_config(method: str, max_len: int) -> ml_collections.ConfigDict:
    """The decoding fields of the benchmark's rows (beam 3; repeats not blocked, as the peer)."""
    return ml_collections.ConfigDict(
        {
            "method": method,
            "max_len": max_len,
            "beam_size": 3,
            "length_penalty": 0.0,
            "temperature": 1.0,
            "top_k": 0,
            "block_repeats": False,
        }
    )


def benchmark_decoding(graphdef, params, num_images, max_len):
    """Greedy and beam-3 captions per second on random features (second call, compiled), every
    caption `max_len` words long (`without_end`)."""
    features = jnp.asarray(np.random.default_rng(1).normal(size=(num_images, 2048)), jnp.float32)
    params = without_end(params)
    figures = {}
    for name, method in (("greedy", "greedy"), ("beam", "beam")):
        fn = decode.decode_fn(graphdef, decode_config(method, max_len))
        key = jax.random.key(0)
        jax.block_until_ready(fn(params, features, key))
        start = time.perf_counter()
        out = jax.block_until_ready(fn(params, features, key))
        figures[f"{name}_captions_per_s"] = round(num_images / (time.perf_counter() - start), 1)
        lengths = (np.asarray(out.tokens) != 0).sum(axis=1)
        figures[f"{name}_mean_length"] = round(float(lengths.mean()), 2)
    return figures


def recompute_greedy_fn(graphdef, max_len: int):
    """Greedy decoding without a cache: every word runs the whole decoder over the padded
    prefix (causal, so the padding does not change the words before it) and reads the logits at
    the word's position (`search.NEVER_EMITTED` masked, as decoding does) -> jitted
    fn(params, features) -> tokens [B, max_len]."""
    from flax import nnx

    def fn(params, features):
        model = nnx.merge(graphdef, params)
        tokens = jnp.zeros((features.shape[0], max_len + 1), jnp.int32)
        tokens = tokens.at[:, 0].set(text.START_ID)

        def word(t, tokens):
            logits, _ = model(features, tokens[:, :max_len])
            scores = search.mask_never_emitted(logits[:, t])
            return tokens.at[:, t + 1].set(jnp.argmax(scores, axis=-1).astype(jnp.int32))

        return jax.lax.fori_loop(0, max_len, word, tokens)[:, 1:]

    return jax.jit(fn)


def benchmark_cached_decoding(graphdef, params, features, max_len: int) -> dict:
    """Greedy captions per second of `max_len` words with the decoder's cache (`decode`) and by
    recomputing the prefix every word (`recompute_greedy_fn`), second calls, the same features;
    `<end>` is not suppressed (the cached search stops early only where every caption ended);
    transformer_same_words_share: the words both say alike, up to each caption's end."""
    timed = {}
    cached_fn = decode.decode_fn(graphdef, decode_config("greedy", max_len))
    recompute_fn = recompute_greedy_fn(graphdef, max_len)
    key = jax.random.key(0)
    for name, run in (("cached", lambda: cached_fn(params, features, key).tokens),
                      ("recomputed", lambda: recompute_fn(params, features))):  # fmt: skip
        first = np.asarray(jax.block_until_ready(run()))
        start = time.perf_counter()
        jax.block_until_ready(run())
        timed[name] = (len(features) / (time.perf_counter() - start), first)
    cached = timed["cached"][1]
    recomputed = timed["recomputed"][1][:, : cached.shape[1]]
    said = cached != text.PAD_ID  # Up to each caption's end: the cached search pads after it.
    same = float(np.mean(cached[said] == recomputed[said]))
    return {
        "transformer_cached_greedy_captions_per_s": round(timed["cached"][0], 1),
        "transformer_recomputed_greedy_captions_per_s": round(timed["recomputed"][0], 1),
        "transformer_cache_speedup": round(timed["cached"][0] / timed["recomputed"][0], 2),
        "transformer_same_words_share": same,
    }


def benchmark_export(backbone: str, image_size: int, num_images: int, rounds: int = 3):
    """Feature export (files -> store) vs the bare Keras backbone on the same batches."""
    if num_images < 32:
        raise ValueError(f"--export_images={num_images}: at least 32 (one backbone batch).")
    from PIL import Image

    from captioning.data import backbone as backbone_lib
    from captioning.data import feature_store

    encoder = ml_collections.ConfigDict(
        {
            "backbone": backbone,
            "weights": "none",
            "image_size": image_size,
            "pooling": "avg",
            "batch_size": 32,
            "dtype": "float32",
            "layer": "",
            "grid": 0,
        }
    )
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        pixels = rng.integers(0, 255, (num_images, 375, 500, 3), np.uint8)  # Flickr-like JPEGs.
        records = []
        for i, image in enumerate(pixels):
            path = os.path.join(tmp, f"{i:05d}.jpg")
            Image.fromarray(image).save(path, quality=90)
            records.append(ImageRecord(f"{i:05d}.jpg", path, ("x",), "train"))
        resized = np.asarray(
            jax.image.resize(
                pixels[:32].astype(np.float32), (32, image_size, image_size, 3), "linear"
            )
        )
        tiled = np.tile(resized, (num_images // 32, 1, 1, 1)).astype(np.uint8)
        # A shared machine's speed drifts over seconds (configs/notes/speed.md): alternate the
        # two measurements and compare medians, so drift does not land on one side only.
        bare, export = [], []
        for round_ in range(rounds):
            bare.append(backbone_lib.backbone_throughput(encoder, tiled, repeats=1))
            store = os.path.join(tmp, f"store{round_}")
            result = feature_store.export_features(records, encoder, store, seed=0)
            export.append(result.images_per_second)
        bare, export = float(np.median(bare)), float(np.median(export))
    return {
        "export_images_per_s": round(export, 2),
        "backbone_images_per_s": round(bare, 2),
        "export_vs_backbone": round(export / bare, 3),
        "export_backbone": f"{backbone} {image_size}px random weights, batch 32",
    }
