"""Show and Tell (`model.decoder='inject'`): the image embedding is the LSTM's first input."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from captioning.models.base import Decoder, common_kwargs, register
from captioning.models.layers import Dense, dropout, image_input
from captioning.models.lstm import LSTM

Array = jax.Array


@register("inject")
class InjectDecoder(Decoder):
    """Show and Tell (Vinyals et al. 2015): the image embedding is the LSTM's first input.

    x_{-1} = dense(E)(features); x_t = embed(w_t); logits_t = dense(V)(dropout(h_t)).
    """

    @classmethod
    def from_config(cls, model_config, vocab_size, feature_shape, *, rngs):
        return cls(vocab_size, feature_shape[-1], **common_kwargs(model_config, rngs))

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        *,
        embed_dim: int,
        hidden_size: int,
        dropout_rate: float,
        use_image: bool,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ):
        self.dropout_rate = dropout_rate
        self.use_image = use_image
        self.image_proj = Dense(feature_dim, embed_dim, rngs=rngs, dtype=dtype)
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.lstm = LSTM(embed_dim, hidden_size, rngs=rngs, dtype=dtype)
        self.out_proj = Dense(hidden_size, vocab_size, rngs=rngs, dtype=dtype)

    def _initial_state(self, features: Array, key: Array | None, train: bool):
        feats = image_input(features, self.use_image)
        image_emb = self.image_proj(dropout(feats, self.dropout_rate, key, train))
        zero = self.lstm.zero_state(features.shape[0])
        return self.lstm.cell(zero, self.lstm.project_inputs(image_emb))

    def pre_logits(
        self, features: Array, tokens_in: Array, *, train: bool = False, key: Array | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """Teacher forcing up to the output layer: -> ([B, T, H] input of `out_proj`, {})."""
        k_img, k_emb, k_out = jax.random.split(key, 3) if key is not None else (None,) * 3
        state = self._initial_state(features, k_img, train)
        words = dropout(self.embed(tokens_in), self.dropout_rate, k_emb, train)
        h_bth = self.lstm.scan(state, self.lstm.project_inputs(words))
        return dropout(h_bth, self.dropout_rate, k_out, train), {}

    def init_decode(
        self, features: Array, max_len: int | None = None
    ) -> tuple[Array, tuple[Array, Array]]:
        """-> (empty context [B, 0], LSTM state after reading the image)."""
        context = jnp.zeros((features.shape[0], 0), jnp.float32)
        return context, self._initial_state(features, None, False)

    def decode_step(self, context: Array, state: Any, tokens: Array) -> tuple[Any, Array, Array]:
        """tokens [B] -> (state, logits [B, V], attention [B, 0])."""
        state = self.lstm.cell(state, self.lstm.step_words(self.embed.embedding[...], tokens))
        return state, self.out_proj(state[0]), jnp.zeros((tokens.shape[0], 0), jnp.float32)
