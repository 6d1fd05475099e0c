"""The pooled-feature decoders (merge, inject) and the one decoder registry.

`create_model(config.model, vocab_size, feature_shape, rngs=...)` builds the decoder that
`config.model.decoder` names: `merge` (the seed's: the image joins the LSTM's output), `inject`
(Show and Tell: the image is the LSTM's first input), and the spatial-attention decoders of
`captioning.models.show_attend_tell` (`attention`: Show, Attend and Tell; `merge_attention`: merge
with attention at the output). All implement `captioning.models.layers.Decoder`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from captioning.models import merge_attention
from captioning.models import show_attend_tell as attention
from captioning.models.layers import LSTM, Decoder, Dense, compute_dtype, dropout

Array = jax.Array


def _pool(features: Array) -> Array:
    """[B, D] stays; [B, H, W, C] -> mean over locations [B, C]."""
    if features.ndim == 4:
        return features.mean(axis=(1, 2))
    return features


def _image_input(features: Array, use_image: bool) -> Array:
    """Pooled float32 features [B, C]; zeros for the image-blind ablation."""
    feats = _pool(features).astype(jnp.float32)
    return feats if use_image else jnp.zeros_like(feats)


class MergeDecoder(Decoder):
    """The seed's merge model: the image joins the language LSTM's output, not its input.

    features -> dropout -> dense(H, relu) = v;  words -> embed(E) -> dropout -> LSTM(H) = h_t;
    logits_t = dense(V)(relu(dense(H)(v + h_t))).
    """

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
        num_concepts: int = 0,
    ):
        self.dropout_rate = dropout_rate
        self.use_image = use_image
        self.image_proj = Dense(feature_dim, hidden_size, rngs=rngs, dtype=dtype)
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.lstm = LSTM(embed_dim, hidden_size, rngs=rngs, dtype=dtype)
        self.merge_proj = Dense(hidden_size, hidden_size, rngs=rngs, dtype=dtype)
        self.out_proj = Dense(hidden_size, vocab_size, rngs=rngs, dtype=dtype)
        # Auxiliary head (training only): which words / word pairs the image's captions use.
        self.concept_proj = (
            Dense(hidden_size, num_concepts, rngs=rngs, dtype=dtype) if num_concepts else None
        )

    def _image_embedding(self, features: Array, key: Array | None, train: bool) -> Array:
        feats = _image_input(features, self.use_image)
        return jax.nn.relu(self.image_proj(dropout(feats, self.dropout_rate, key, train)))

    def _pre_logits(self, image_emb: Array, h: Array) -> Array:
        return jax.nn.relu(self.merge_proj(image_emb + h))

    def pre_logits(
        self, features: Array, tokens_in: Array, *, train: bool = False, key: Array | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """Teacher forcing up to the output layer: -> ([B, T, H] input of `out_proj`, aux)."""
        k_img, k_emb = jax.random.split(key) if key is not None else (None, None)
        image_emb = self._image_embedding(features, k_img, train)  # [B, H]
        words = dropout(self.embed(tokens_in), self.dropout_rate, k_emb, train)  # [B, T, E]
        h_bth = self.lstm.scan(
            self.lstm.zero_state(tokens_in.shape[0]), self.lstm.project_inputs(words)
        )
        aux = {} if self.concept_proj is None else {"concept_logits": self.concept_proj(image_emb)}
        return self._pre_logits(image_emb[:, None, :], h_bth), aux

    def init_decode(self, features: Array) -> tuple[Array, tuple[Array, Array]]:
        """-> (image embedding [B, H], LSTM state)."""
        return self._image_embedding(features, None, False), self.lstm.zero_state(features.shape[0])

    def decode_step(self, context: Array, state: Any, tokens: Array) -> tuple[Any, Array, Array]:
        """tokens [B] -> (state, logits [B, V], attention [B, 0])."""
        state = self.lstm.cell(state, self.lstm.project_inputs(self.embed(tokens)))
        logits = self.out_proj(self._pre_logits(context, state[0]))
        return state, logits, jnp.zeros((tokens.shape[0], 0), jnp.float32)


class InjectDecoder(Decoder):
    """Show and Tell (Vinyals et al. 2015): the image embedding is the LSTM's first input.

    x_{-1} = dense(E)(features); x_t = embed(w_t); logits_t = dense(V)(dropout(h_t)).
    """

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
        feats = _image_input(features, self.use_image)
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

    def init_decode(self, features: Array) -> tuple[Array, tuple[Array, Array]]:
        """-> (empty context [B, 0], LSTM state after reading the image)."""
        context = jnp.zeros((features.shape[0], 0), jnp.float32)
        return context, self._initial_state(features, None, False)

    def decode_step(self, context: Array, state: Any, tokens: Array) -> tuple[Any, Array, Array]:
        """tokens [B] -> (state, logits [B, V], attention [B, 0])."""
        state = self.lstm.cell(state, self.lstm.project_inputs(self.embed(tokens)))
        return state, self.out_proj(state[0]), jnp.zeros((tokens.shape[0], 0), jnp.float32)


DECODERS: dict[str, type[Decoder]] = {
    "merge": MergeDecoder,
    "inject": InjectDecoder,
    "attention": attention.AttentionDecoder,
    "merge_attention": merge_attention.MergeAttentionDecoder,
}
# Decoders that read the spatial map [H, W, C] (config.encoder.pooling='none').
SPATIAL_DECODERS = ("attention", "merge_attention")


def num_concepts(model_config: ml_collections.ConfigDict, vocab_size: int) -> int:
    """Outputs of the merge decoder's auxiliary concept head: every word + the frequent pairs.

    0 (no head) unless `config.model.concept_loss` > 0 (see input_pipeline.concept_targets).
    """
    if not model_config.concept_loss:
        return 0
    return vocab_size + int(model_config.concept_pairs)


def create_model(
    model_config: ml_collections.ConfigDict,
    vocab_size: int,
    feature_shape: tuple[int, ...],
    *,
    rngs: nnx.Rngs,
) -> Decoder:
    """Builds the decoder named by `config.model.decoder` for features of `feature_shape`
    ([D] pooled, [H, W, C] or [L, C] spatial)."""
    name = model_config.decoder
    if name not in DECODERS:
        raise ValueError(
            f"config.model.decoder={name!r} is unknown; use one of {sorted(DECODERS)}."
        )
    if model_config.concept_loss and name != "merge":
        raise ValueError(
            f"config.model.concept_loss={model_config.concept_loss} needs the merge decoder "
            f"(config.model.decoder={name!r}); set it to 0 for this decoder."
        )
    common = dict(
        embed_dim=model_config.embed_dim,
        hidden_size=model_config.hidden_size,
        dropout_rate=model_config.dropout,
        use_image=model_config.use_image,
        rngs=rngs,
        dtype=compute_dtype(model_config.dtype),
    )
    if name in SPATIAL_DECODERS:
        if len(feature_shape) not in (2, 3):
            raise ValueError(
                f"config.model.decoder={name!r} needs spatial features, but the feature store "
                f"has shape {tuple(feature_shape)} per image: set config.encoder.pooling='none' "
                "(optionally config.encoder.grid to resize the map)."
            )
        if name == "merge_attention":
            common["feed_dim"] = int(model_config.feed_dim)
        elif model_config.feed_dim:
            raise ValueError(
                f"config.model.feed_dim={model_config.feed_dim} is an option of the "
                f"merge_attention decoder, not of {name!r}; set it to 0."
            )
        return DECODERS[name](
            vocab_size,
            feature_shape[-1],
            attention_dim=int(model_config.attention_dim or model_config.hidden_size),
            positions=bool(model_config.attention_positions),
            **common,
        )
    if name == "merge":
        common["num_concepts"] = num_concepts(model_config, vocab_size)
    return DECODERS[name](vocab_size, feature_shape[-1], **common)


def abstract_model(
    model_config: ml_collections.ConfigDict, vocab_size: int, feature_shape: tuple[int, ...]
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, parameter shapes) of `create_model`'s decoder, without initialising it (the
    eager initialisation takes seconds): the target of a checkpoint restore. The shapes are placed
    on this process's first device, where a freshly built model's parameters would be."""
    model = nnx.eval_shape(
        lambda: create_model(model_config, vocab_size, feature_shape, rngs=nnx.Rngs(0))
    )
    graphdef, shapes = nnx.split(model)
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return graphdef, jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=here), shapes
    )
