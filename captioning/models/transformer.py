"""A Transformer decoder (`model.decoder='transformer'`) with cached step decoding.

`TransformerDecoder` implements the contract of `captioning.models.base.Decoder`: pre-LayerNorm
blocks of causal self-attention over the words, cross-attention over the image's locations (the
feature grid with 2-D positions, or the pooled vector as one location) and an MLP.

Decoding keeps, per layer, the cross-attention keys and values of the locations (computed once in
`init_decode`: the context) and a key/value cache of the words so far (the state, allocated for
`max_len` words); `decode_step` writes the new word's key and value at its position and attends
over the positions up to it, so no earlier word is recomputed.

Shapes: B batch, T words, L locations, D = `model.hidden_size` (d_model), N = `model.num_layers`,
Hd = `model.num_heads` heads of D / Hd.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from captioning.models.attention import attention_regularizer, flatten_locations
from captioning.models.base import Decoder, common_kwargs, register
from captioning.models.layers import Dense, dropout

Array = jax.Array

# Rows of the learned word-position table: the longest caption (or decoding) it can read.
MAX_WORDS = 64
POSITIONS = ("learned", "sinusoidal")


class CrossContext(NamedTuple):
    """Per-image constants of decoding: per layer, keys and values of the L locations,
    each [B, L, D] float32."""

    keys: tuple[Array, ...]
    values: tuple[Array, ...]


class CacheState(NamedTuple):
    """position: [B] int32 the next word's position; keys, values: per layer [B, max_len, D]
    float32, the self-attention keys and values of the words so far (zeros after them)."""

    position: Array
    keys: tuple[Array, ...]
    values: tuple[Array, ...]


def sinusoid(positions: Array, dim: int) -> Array:
    """positions [N] -> [N, dim] float32 (Vaswani et al. 2017: sin on the first half of the
    frequencies' slots, cos on the second)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]
    table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(table, ((0, 0), (0, dim - 2 * half)))


def multi_head_attention(
    q: Array, k: Array, v: Array, mask: Array | None, num_heads: int, dtype: Any
) -> tuple[Array, Array]:
    """q [B, Tq, D], k and v [B, Tk, D], mask [B or 1, Tq, Tk] (True: may attend) -> (output
    [B, Tq, D] float32, weights [B, Hd, Tq, Tk] float32)."""
    batch, tq, dim = q.shape
    head = dim // num_heads
    q = (q * (1.0 / math.sqrt(head))).reshape(batch, tq, num_heads, head)
    k = k.reshape(batch, k.shape[1], num_heads, head)
    v = v.reshape(batch, v.shape[1], num_heads, head)
    scores = jnp.einsum(
        "bqhd,bkhd->bhqk", q.astype(dtype), k.astype(dtype), preferred_element_type=jnp.float32
    )
    if mask is not None:
        scores = jnp.where(mask[:, None], scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum(
        "bhqk,bkhd->bqhd",
        weights.astype(dtype),
        v.astype(dtype),
        preferred_element_type=jnp.float32,
    )
    return out.reshape(batch, tq, dim), weights


class _PreNormParts(nnx.Module):
    """The self-attention and MLP halves that encoder and decoder blocks share. Each block builds
    them in its own order (parameter initialisation follows it)."""

    def _init_self_attention(self, dim: int, num_heads: int, rngs: nnx.Rngs, dtype: Any) -> None:
        self.num_heads = num_heads
        self.dtype = dtype
        self.self_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.self_qkv = Dense(dim, 3 * dim, rngs=rngs, dtype=dtype)
        self.self_out = Dense(dim, dim, rngs=rngs, dtype=dtype)

    def _init_mlp(self, dim: int, mlp_dim: int, rngs: nnx.Rngs, dtype: Any) -> None:
        self.mlp_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = Dense(dim, mlp_dim, rngs=rngs, dtype=dtype)
        self.mlp_out = Dense(mlp_dim, dim, rngs=rngs, dtype=dtype)

    def self_qkv_of(self, x: Array) -> tuple[Array, Array, Array]:
        """x [B, T, D] -> q, k, v [B, T, D] of the self-attention."""
        q, k, v = jnp.split(self.self_qkv(self.self_norm(x)), 3, axis=-1)
        return q, k, v

    def _mlp_residual(self, x: Array, drop: Any) -> Array:
        """x [B, T, D] -> x + MLP(LN x)."""
        hidden = jax.nn.gelu(self.mlp_in(self.mlp_norm(x)))
        return x + drop(self.mlp_out(hidden))


class Block(_PreNormParts):
    """One pre-LayerNorm decoder block: x += SelfAttn(LN x); x += CrossAttn(LN x, memory);
    x += MLP(LN x)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype: Any):
        self._init_self_attention(dim, num_heads, rngs, dtype)
        self.cross_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.cross_query = Dense(dim, dim, rngs=rngs, dtype=dtype)
        self.cross_kv = Dense(dim, 2 * dim, rngs=rngs, dtype=dtype)
        self.cross_out = Dense(dim, dim, rngs=rngs, dtype=dtype)
        self._init_mlp(dim, mlp_dim, rngs, dtype)

    def memory_kv(self, memory: Array) -> tuple[Array, Array]:
        """memory [B, L, D] -> cross-attention keys and values, each [B, L, D]."""
        k, v = jnp.split(self.cross_kv(memory), 2, axis=-1)
        return k, v

    def finish(
        self,
        x: Array,
        q: Array,
        keys: Array,
        values: Array,
        mask: Array,
        cross: tuple[Array, Array],
        drop: Any,
    ) -> tuple[Array, Array]:
        """The block after the self-attention's projections: x [B, Tq, D], q [B, Tq, D], the
        words' keys and values [B, Tk, D] with mask [B or 1, Tq, Tk], the locations' (keys,
        values) -> (x [B, Tq, D], cross-attention weights [B, Hd, Tq, L])."""
        attended, _ = multi_head_attention(q, keys, values, mask, self.num_heads, self.dtype)
        x = x + drop(self.self_out(attended))
        query = self.cross_query(self.cross_norm(x))
        seen, weights = multi_head_attention(query, *cross, None, self.num_heads, self.dtype)
        x = x + drop(self.cross_out(seen))
        return self._mlp_residual(x, drop), weights


class EncoderBlock(_PreNormParts):
    """One pre-LayerNorm encoder block over the image's locations: m += SelfAttn(LN m);
    m += MLP(LN m). The locations see each other before any word reads them: an object cut by a
    cell border, how many objects there are, which lies beside which."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype: Any):
        self._init_self_attention(dim, num_heads, rngs, dtype)
        self._init_mlp(dim, mlp_dim, rngs, dtype)

    def __call__(self, memory: Array, drop: Any) -> Array:
        """memory [B, L, D] -> [B, L, D]."""
        q, k, v = self.self_qkv_of(memory)
        attended, _ = multi_head_attention(q, k, v, None, self.num_heads, self.dtype)
        return self._mlp_residual(memory + drop(self.self_out(attended)), drop)


@register("transformer")
class TransformerDecoder(Decoder):
    """Pre-LayerNorm Transformer decoder (Vaswani et al. 2017; the layout of GPT-2 / ViT blocks)
    over the image's locations.

    Memory (per image): m_i = LN(W a_i + b + p_i), a_i the features of location i ([L, C], the
    row-major [H, W] grid) and p_i = row_embedding(r_i) + column_embedding(c_i) its 2-D position
    (learned tables or sinusoids, half the dimensions each; none for the pooled vector, L = 1,
    or without `model.attention_positions`), after `model.encoder_layers` encoder blocks over
    the locations (`EncoderBlock`; none by default).
    Words: x_t = sqrt(D) E y_t (projected to D when `embed_dim` != D) + position t (learned or
    sinusoidal, `model.positions`); N blocks (`Block`); logits = out_proj(LN x_t).
    Dropout (`model.dropout`) on the memory, the word inputs and every residual branch.
    """

    own_options: ClassVar[dict[str, Any]] = {"encoder_layers": 0}

    @classmethod
    def from_config(cls, model_config, vocab_size, feature_shape, *, rngs):
        return cls(
            vocab_size,
            tuple(feature_shape),
            num_layers=int(model_config.num_layers),
            encoder_layers=int(model_config.encoder_layers),
            num_heads=int(model_config.num_heads),
            mlp_dim=int(model_config.mlp_dim or 4 * model_config.hidden_size),
            positions=str(model_config.positions),
            grid_positions=bool(model_config.attention_positions),
            attention_reg=float(model_config.attention_reg),
            **common_kwargs(model_config, rngs),
        )

    @classmethod
    def attention_locations(cls, feature_shape) -> int:
        """Every location of the grid; the pooled vector is one."""
        return int(math.prod(feature_shape[:-1])) if len(feature_shape) > 1 else 1

    def aux_loss(self, aux, batch):
        """Show-Attend-Tell's doubly stochastic regulariser on the last layer's cross-attention
        (weight `model.attention_reg`; None when 0)."""
        if not self.attention_reg:
            return None
        return attention_regularizer(aux["attention"], batch["targets"], self.attention_reg)

    def __init__(
        self,
        vocab_size: int,
        feature_shape: tuple[int, ...],
        *,
        embed_dim: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        mlp_dim: int,
        dropout_rate: float,
        use_image: bool,
        rngs: nnx.Rngs,
        encoder_layers: int = 0,
        positions: str = "learned",
        grid_positions: bool = True,
        attention_reg: float = 0.0,
        dtype: Any = jnp.float32,
    ):
        if positions not in POSITIONS:
            raise ValueError(f"config.model.positions={positions!r}: use one of {POSITIONS}.")
        if num_layers < 1 or num_heads < 1 or hidden_size % num_heads:
            raise ValueError(
                f"config.model.hidden_size={hidden_size} must split into "
                f"config.model.num_heads={num_heads} heads, with config.model.num_layers="
                f"{num_layers} >= 1."
            )
        if encoder_layers < 0:
            raise ValueError(f"config.model.encoder_layers={encoder_layers} must be >= 0.")
        dim = hidden_size
        self.dim, self.num_heads, self.dtype = dim, num_heads, dtype
        self.dropout_rate, self.use_image = dropout_rate, use_image
        self.attention_reg = attention_reg
        self.positions = positions
        self.grid = _grid_shape(feature_shape) if grid_positions else None
        self.memory_proj = Dense(feature_shape[-1], dim, rngs=rngs, dtype=dtype)
        self.encoder = nnx.List(
            [
                EncoderBlock(dim, num_heads, mlp_dim, rngs=rngs, dtype=dtype)
                for _ in range(encoder_layers)
            ]
        )
        self.memory_norm = nnx.LayerNorm(dim, rngs=rngs)
        normal = nnx.initializers.normal(1.0)
        if self.grid is not None and positions == "learned":
            self.row_embedding = nnx.Param(normal(rngs.params(), (self.grid[0], dim)))
            self.column_embedding = nnx.Param(normal(rngs.params(), (self.grid[1], dim)))
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.word_proj = Dense(embed_dim, dim, rngs=rngs, dtype=dtype) if embed_dim != dim else None
        if positions == "learned":
            self.word_positions = nnx.Param(normal(rngs.params(), (MAX_WORDS, dim)))
        self.blocks = nnx.List(
            [Block(dim, num_heads, mlp_dim, rngs=rngs, dtype=dtype) for _ in range(num_layers)]
        )
        self.final_norm = nnx.LayerNorm(dim, rngs=rngs)
        self.out_proj = Dense(dim, vocab_size, rngs=rngs, dtype=dtype)

    # -- inputs ----------------------------------------------------------------------------------

    def _memory(self, features: Array, key: Array | None, train: bool) -> Array:
        """features [B, D'] | [B, H, W, C] | [B, L, C] -> memory [B, L, D] (L = 1 pooled)."""
        feats = features.astype(jnp.float32)
        feats = feats[:, None, :] if feats.ndim == 2 else flatten_locations(feats)
        if not self.use_image:
            feats = jnp.zeros_like(feats)
        keys = iter([])
        if self.encoder and key is not None:  # A key for the features, one per encoder branch.
            keys = iter(jax.random.split(key, 1 + 2 * len(self.encoder)))
            key = next(keys)

        def drop(x):
            return dropout(x, self.dropout_rate, next(keys, None), train)

        memory = self.memory_proj(dropout(feats, self.dropout_rate, key, train))
        if self.grid is not None:
            memory = memory + self._grid_positions()
        for block in self.encoder:
            memory = block(memory, drop)
        return self.memory_norm(memory)

    def _grid_positions(self) -> Array:
        """[L, D]: the row's and the column's position vectors of each location (row-major)."""
        height, width = self.grid
        if self.positions == "learned":
            rows, cols = self.row_embedding[...], self.column_embedding[...]
            return (rows[:, None, :] + cols[None, :, :]).reshape(height * width, self.dim)
        half = self.dim // 2
        rows = sinusoid(jnp.arange(height), half)  # [H, D/2]
        cols = sinusoid(jnp.arange(width), self.dim - half)  # [W, D - D/2]
        rows = jnp.broadcast_to(rows[:, None, :], (height, width, half))
        cols = jnp.broadcast_to(cols[None, :, :], (height, width, self.dim - half))
        return jnp.concatenate([rows, cols], axis=-1).reshape(height * width, self.dim)

    def _words(self, tokens: Array, positions: Array) -> Array:
        """tokens [B, T] at positions [B, T] -> block inputs [B, T, D] float32."""
        words = self.embed(tokens).astype(jnp.float32)
        if self.word_proj is not None:
            words = self.word_proj(words)
        if self.positions == "learned":
            where = self.word_positions[...][positions]
        else:
            where = sinusoid(positions.reshape(-1), self.dim).reshape(*positions.shape, self.dim)
        return words * math.sqrt(self.dim) + where

    def _check_length(self, length: int, field: str) -> None:
        if self.positions == "learned" and length > MAX_WORDS:
            raise ValueError(
                f"config.{field}={length}: the transformer's learned word positions reach "
                f"{MAX_WORDS} words; lower it or set config.model.positions='sinusoidal'."
            )

    # -- training --------------------------------------------------------------------------------

    def pre_logits(
        self, features: Array, tokens_in: Array, *, train: bool = False, key: Array | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """Teacher forcing up to the output layer: -> ([B, T, D] input of `out_proj`,
        {"attention": [B, T, L] the last layer's cross-attention, mean over heads})."""
        batch, length = tokens_in.shape
        self._check_length(length, "data.max_caption_len")
        keys = iter(jax.random.split(key, 2 + 3 * len(self.blocks)) if key is not None else [])

        def drop(x):
            return dropout(x, self.dropout_rate, next(keys, None), train)

        memory = self._memory(features, next(keys, None), train)
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        x = drop(self._words(tokens_in, positions))
        causal = jnp.tril(jnp.ones((length, length), bool))[None]  # [1, T, T]
        for block in self.blocks:
            q, k, v = block.self_qkv_of(x)
            x, weights = block.finish(x, q, k, v, causal, block.memory_kv(memory), drop)
        return self.final_norm(x), {"attention": weights.mean(axis=1)}

    # -- decoding --------------------------------------------------------------------------------

    def init_decode(self, features: Array, max_len: int | None = None):
        """-> (CrossContext: per layer the locations' keys and values [B, L, D], CacheState:
        position [B] = 0 and per layer a zero key/value cache [B, max_len, D])."""
        max_len = MAX_WORDS if max_len is None else int(max_len)
        self._check_length(max_len, "decode.max_len")
        memory = self._memory(features, None, False)
        cross = [block.memory_kv(memory) for block in self.blocks]
        context = CrossContext(tuple(k for k, _ in cross), tuple(v for _, v in cross))
        batch = features.shape[0]
        empty = tuple(
            jnp.zeros((batch, max_len, self.dim), jnp.float32) for _ in range(len(self.blocks))
        )
        return context, CacheState(jnp.zeros((batch,), jnp.int32), empty, empty)

    def decode_step(self, context: CrossContext, state: CacheState, tokens: Array):
        """tokens [B] at `state.position` -> (state, logits [B, V] float32, attention [B, L]: the
        last layer's cross-attention, mean over heads)."""
        position = state.position
        x = self._words(tokens[:, None], position[:, None])  # [B, 1, D]
        slots = jnp.arange(state.keys[0].shape[1])
        write = (slots[None, :] == position[:, None])[..., None]  # [B, max_len, 1]
        mask = (slots[None, :] <= position[:, None])[:, None, :]  # [B, 1, max_len]
        new_keys, new_values = [], []
        for i, block in enumerate(self.blocks):
            q, k, v = block.self_qkv_of(x)
            keys = jnp.where(write, k, state.keys[i])
            values = jnp.where(write, v, state.values[i])
            cross = (context.keys[i], context.values[i])
            x, weights = block.finish(x, q, keys, values, mask, cross, lambda y: y)
            new_keys.append(keys)
            new_values.append(values)
        logits = self.out_proj(self.final_norm(x))[:, 0]
        state = CacheState(position + 1, tuple(new_keys), tuple(new_values))
        return state, logits, weights.mean(axis=1)[:, 0]


def _grid_shape(feature_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(H, W) of the grid the features lie on; None for the pooled vector (no positions)."""
    if len(feature_shape) == 3:
        return int(feature_shape[0]), int(feature_shape[1])
    if len(feature_shape) == 2:
        side = round(feature_shape[0] ** 0.5)
        if side * side != feature_shape[0]:
            raise ValueError(
                f"config.model.attention_positions needs the feature map's height and width; "
                f"got {feature_shape[0]} flat locations (not a square): pass [H, W, C] features "
                "or set config.model.attention_positions=False."
            )
        return side, side
    return None
