"""Attention pieces the spatial decoders share: the features as locations (with positions),
additive attention (scores and weights), the attended context, Show-Attend-Tell's doubly
stochastic regulariser, and `GridAttentionDecoder`, the contract's common part for decoders that
attend over the feature grid (built from `model.attention_*`, maps over every location, the
regulariser as their auxiliary loss).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from captioning.data import text
from captioning.models.base import Decoder, common_kwargs
from captioning.models.layers import matmul

Array = jax.Array


class AttentionContext(NamedTuple):
    """Per-image constants of decoding (rows are images, or image-beams in beam search).

    values: [B, L, C] float32 the annotation vectors a_i (projected, for the merge decoder).
    keys: [B, L, A] float32 W_a a_i + b, the feature part of the attention scores.
    """

    values: Array
    keys: Array


def weighted_sum(weights: Array, values: Array, dtype: Any) -> Array:
    """weights [B, (T,) L] x values [B, L, D] -> [B, (T,) D] float32 (sum over locations)."""
    spec = "btl,bld->btd" if weights.ndim == 3 else "bl,bld->bd"
    return jnp.einsum(
        spec, weights.astype(dtype), values.astype(dtype), preferred_element_type=jnp.float32
    )


def flatten_locations(features: Array) -> Array:
    """[B, H, W, C] -> [B, H*W, C] (row-major: location i is row i // W, column i % W).

    [B, L, C] passes through unchanged.
    """
    if features.ndim == 4:
        batch, height, width, channels = features.shape
        return features.reshape(batch, height * width, channels)
    if features.ndim != 3:
        raise ValueError(
            f"The attention decoder needs spatial features [B, H, W, C] or [B, L, C], got shape "
            f"{features.shape}: set config.encoder.pooling='none'."
        )
    return features


def append_positions(features: Array) -> Array:
    """[B, H, W, C] (or [B, L, C] with L a square) -> [B, H, W, C + 2]: each location's row and
    column centre in [-1, 1] appended to its features (top left = (-1, -1), approximately)."""
    if features.ndim == 3:
        side = round(features.shape[1] ** 0.5)
        if side * side != features.shape[1]:
            raise ValueError(
                f"config.model.attention_positions needs the feature map's height and width; "
                f"got {features.shape[1]} flat locations (not a square): pass [B, H, W, C]."
            )
        features = features.reshape(features.shape[0], side, side, features.shape[2])
    batch, height, width, _ = features.shape
    rows = (2.0 * jnp.arange(height) + 1.0) / height - 1.0
    cols = (2.0 * jnp.arange(width) + 1.0) / width - 1.0
    grid = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), axis=-1)  # [H, W, 2]
    grid = jnp.broadcast_to(grid, (batch, height, width, 2)).astype(features.dtype)
    return jnp.concatenate([features, grid], axis=-1)


def spatial_input(features: Array, use_image: bool, positions: bool) -> Array:
    """[B, H, W, C] | [B, L, C] -> float32 [B, L, C (+2)]: zeros for the image-blind ablation,
    each location's (row, column) appended when `positions`."""
    feats = features.astype(jnp.float32)
    if not use_image:
        feats = jnp.zeros_like(feats)
    if positions:
        feats = append_positions(feats)
    return flatten_locations(feats)


def attention_mlp(keys: Array, h: Array, query: Array, dtype: Any) -> Array:
    """keys [B, L, A], the state h [B, H] or [B, T, H], U_a [H, A] -> tanh(k_i + U_a h)
    [B, (T,) L, A] (Show-Attend-Tell's step and, recomputing it, its backward pass; the merge
    decoder's lookups)."""
    query = matmul(h, query, dtype)  # [B, (T,) A]
    if h.ndim == 3:
        keys = keys[:, None]  # [B, 1, L, A]: the same locations for every step.
    return jnp.tanh(keys + query[..., None, :])


def additive_attention(keys: Array, h: Array, query_w: Array, score_w: Array, dtype: Any) -> Array:
    """Weights softmax_i(w^T tanh(k_i + U h)) over locations (Bahdanau-style).

    keys [B, L, A] (W_a a_i + b), h [B, H] or [B, T, H], query_w U [H, A], score_w w [A, 1]
    -> alpha [B, L] or [B, T, L], summing to 1 over L.
    """
    hidden = attention_mlp(keys, h, query_w, dtype)  # [B, (T,) L, A]
    scores = matmul(hidden, score_w, dtype)[..., 0]  # [B, (T,) L]
    return jax.nn.softmax(scores, axis=-1)


def attention_regularizer(attention: Array, targets: Array, weight: float) -> Array:
    """Doubly stochastic attention term (Xu et al. 2015, eq. 14): every location should receive
    about one unit of attention over a caption.

    attention [B, T, L] (rows of padding targets are ignored), targets [B, T] -> weight x the
    squared deficit summed over captions and locations, divided by the number of real words.
    Xu et al. add lambda x penalty to each caption's *summed* word NLL; our cross-entropy is a mean
    per word, so the penalty is divided by the same word count to keep their balance.
    """
    mask = (targets != text.PAD_ID).astype(jnp.float32)[..., None]  # [B, T, 1]
    total = jnp.sum(attention * mask, axis=1)  # [B, L]
    penalty = jnp.sum((1.0 - total) ** 2)
    return weight * penalty / jnp.maximum(jnp.sum(mask), 1.0)


class GridAttentionDecoder(Decoder):
    """What every decoder that attends over the feature grid shares: it is spatial, built with
    `model.attention_dim`, `attention_positions` and `attention_reg` (plus `extra_kwargs`), its
    attention maps cover every location, and its auxiliary loss is the doubly stochastic
    regulariser (weight `model.attention_reg`)."""

    spatial: ClassVar[bool] = True

    @classmethod
    def extra_kwargs(cls, model_config) -> dict[str, Any]:
        """Constructor arguments from the decoder's own options."""
        return {}

    @classmethod
    def from_config(cls, model_config, vocab_size, feature_shape, *, rngs):
        return cls(
            vocab_size,
            feature_shape[-1],
            attention_dim=int(model_config.attention_dim or model_config.hidden_size),
            positions=bool(model_config.attention_positions),
            attention_reg=float(model_config.attention_reg),
            **cls.extra_kwargs(model_config),
            **common_kwargs(model_config, rngs),
        )

    @classmethod
    def attention_locations(cls, feature_shape) -> int:
        """Every location of the [H, W] (or [L]) grid."""
        return int(math.prod(feature_shape[:-1]))

    def aux_loss(self, aux, batch):
        return attention_regularizer(aux["attention"], batch["targets"], self.attention_reg)
