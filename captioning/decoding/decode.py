"""Jitted caption decoding: one entry point for every method, and `decode_split` over many images.

    decode = decode_fn(graphdef, config.decode)           # greedy | beam | sample
    out = decode_split(decode, params, features, batch_size=config.decode.batch_size,
                       seed=config.decode.seed)           # DecodeOutput of numpy arrays

Evaluation, caption mode and the web demo all decode through these two functions, so a caption
does not depend on which of them asked for it. The algorithms are in `captioning.decoding.search`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from captioning.decoding import search
from captioning.decoding.search import DecodeOutput

Array = jax.Array
METHODS = ("greedy", "beam", "sample")
DecodeFn = Callable[[Any, Array, Array], DecodeOutput]


def decode_fn(graphdef: nnx.GraphDef, decode_config: Any, stats=None) -> DecodeFn:
    """-> jitted `fn(params, features [B, ...], key) -> DecodeOutput` for `decode_config.method`.

    `features` are rows as the store holds them; `stats` (a `data.FeatureStats`) standardises
    them on the device first (None: they are standardised already). `key` is a PRNG key; only
    `method=sample` uses it (`decode_split` passes `fold_in(key(decode.seed), batch index)`, so
    sampled batches are independent and reproducible). Settings are validated here, before
    anything is traced.
    """
    method = decode_config.method
    max_len = int(decode_config.max_len)
    if method not in METHODS:
        raise ValueError(f"config.decode.method={method!r} is unknown; use one of {list(METHODS)}.")
    search.check_positive("max_len", max_len)
    beam_size, length_penalty = int(decode_config.beam_size), float(decode_config.length_penalty)
    temperature, top_k = float(decode_config.temperature), int(decode_config.top_k)
    block_repeats = bool(decode_config.block_repeats)
    if method == "beam":
        search.check_positive("beam_size", beam_size)
    if method == "sample":
        search.check_sampling(temperature, top_k)

    @jax.jit
    def fn(params, features, key):
        model = nnx.merge(graphdef, params)
        if stats is not None:
            features = stats.apply(features)
        if method == "greedy":
            return search.greedy_decode(model, features, max_len, block_repeats)
        if method == "beam":
            return search.beam_search(
                model,
                features,
                beam_size=beam_size,
                max_len=max_len,
                length_penalty=length_penalty,
                block_repeats=block_repeats,
            )
        return search.sample_decode(
            model,
            features,
            key,
            max_len=max_len,
            temperature=temperature,
            top_k=top_k,
            block_repeats=block_repeats,
        )

    return fn


def padded_image_batches(num_images: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Yields ([batch_size] rows, number of real rows) covering range(num_images), last padded."""
    for start in range(0, num_images, batch_size):
        rows = np.arange(start, min(start + batch_size, num_images), dtype=np.int32)
        valid = len(rows)
        yield np.pad(rows, (0, batch_size - valid)), valid


def decode_split(
    decode: DecodeFn,
    params: Any,
    features: np.ndarray,
    *,
    batch_size: int,
    rows: np.ndarray | None = None,
    seed: int = 0,
) -> DecodeOutput:
    """Decodes images in batches of one fixed size (the last padded) -> DecodeOutput of numpy
    arrays, one row per image.

    features: [N, ...] rows as `decode` expects them; rows: which of them (default all), in
    order (an array in memory or `feature_store.MappedFeatures`).
    The batch is `min(batch_size, number of images)`, so a handful of images is not padded up to a
    large configured batch; batch i samples with `fold_in(key(seed), i)`.
    """
    rows = np.arange(len(features), dtype=np.int32) if rows is None else np.asarray(rows)
    batch_size = max(1, min(int(batch_size), len(rows)))
    key = jax.random.key(seed)
    outputs = []
    for i, (batch_rows, valid) in enumerate(padded_image_batches(len(rows), batch_size)):
        out = decode(params, jnp.asarray(features[rows[batch_rows]]), jax.random.fold_in(key, i))
        outputs.append(jax.tree.map(lambda x, v=valid: np.asarray(x)[:v], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)
