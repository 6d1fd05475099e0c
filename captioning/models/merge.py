"""The Keras notebook's merge decoder (`model.decoder='merge'`): the image joins the language
LSTM's output, not its input; optionally an auxiliary concept head (`model.concept_loss`)."""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from captioning.data import text
from captioning.models.base import Decoder, common_kwargs, register
from captioning.models.layers import Dense, dropout, image_input
from captioning.models.lstm import LSTM

Array = jax.Array


@register("merge")
class MergeDecoder(Decoder):
    """The Keras notebook's merge model: the image joins the language LSTM's output, not its input.

    features -> dropout -> dense(H, relu) = v;  words -> embed(E) -> dropout -> LSTM(H) = h_t;
    logits_t = dense(V)(relu(dense(H)(v + h_t))).
    """

    own_options: ClassVar[dict[str, Any]] = {"concept_loss": 0.0}

    @classmethod
    def from_config(cls, model_config, vocab_size, feature_shape, *, rngs):
        return cls(
            vocab_size,
            feature_shape[-1],
            num_concepts=cls.concept_outputs(model_config, vocab_size),
            concept_weight=float(model_config.concept_loss),
            **common_kwargs(model_config, rngs),
        )

    @classmethod
    def concept_outputs(cls, model_config, vocab_size: int) -> int:
        """Outputs of the auxiliary concept head: every word + the frequent pairs.

        0 (no head) unless `config.model.concept_loss` > 0 (see input_pipeline.concept_targets).
        """
        if not model_config.concept_loss:
            return 0
        return vocab_size + int(model_config.concept_pairs)

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
        concept_weight: float = 0.0,
    ):
        self.concept_weight = concept_weight
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
        feats = image_input(features, self.use_image)
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

    def init_decode(
        self, features: Array, max_len: int | None = None
    ) -> tuple[Array, tuple[Array, Array]]:
        """-> (image embedding [B, H], LSTM state)."""
        return self._image_embedding(features, None, False), self.lstm.zero_state(features.shape[0])

    def decode_step(self, context: Array, state: Any, tokens: Array) -> tuple[Any, Array, Array]:
        """tokens [B] -> (state, logits [B, V], attention [B, 0])."""
        state = self.lstm.cell(state, self.lstm.step_words(self.embed.embedding[...], tokens))
        logits = self.out_proj(self._pre_logits(context, state[0]))
        return state, logits, jnp.zeros((tokens.shape[0], 0), jnp.float32)

    def aux_loss(self, aux, batch):
        """The concept loss, on training batches (only they carry concept targets)."""
        if "concept_logits" in aux and "concepts" in batch:
            return concept_loss(
                aux["concept_logits"], batch["concepts"], batch["targets"], self.concept_weight
            )
        return None


def concept_loss(concept_logits: Array, concepts: Array, targets: Array, weight: float) -> Array:
    """Auxiliary multi-label loss: the image embedding predicts its captions' words and pairs.

    concept_logits [B, K], concepts [B, K] multi-hot, targets [B, T] (all-padding rows are batch
    filler and carry no loss) -> weight x mean sigmoid cross-entropy over concepts and captions.
    """
    real = (targets[:, 0] != text.PAD_ID).astype(jnp.float32)  # [B]
    per_caption = optax.sigmoid_binary_cross_entropy(
        concept_logits.astype(jnp.float32), concepts.astype(jnp.float32)
    ).mean(axis=-1)
    return weight * jnp.sum(per_caption * real) / jnp.maximum(jnp.sum(real), 1.0)
