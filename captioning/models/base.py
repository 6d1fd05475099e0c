"""The decoder contract and the one registry: what a decoder declares, and how one is built.

A decoder is one file: a `Decoder` subclass decorated with `@register("name")`, imported by
`captioning/models/__init__.py`. Training, validation, every decoding method (greedy, beam,
sampling), SCST, GloVe loading and freezing, checkpoints, the demo and the contract tests
(tests/test_decoder_contract.py) then work with it; nothing else names decoders.

What a decoder declares (class attributes and methods):

* `from_config(model_config, vocab_size, feature_shape, *, rngs)`: builds it from `config.model`
  (`common_kwargs` reads the fields every decoder shares) for features of `feature_shape` ([D]
  pooled, [H, W, C] or [L, C] spatial).
* `spatial`: True when it reads a feature map (then `config.encoder.pooling='none'`).
* `own_options`: `config.model` fields that belong to it alone, with their "off" value; every
  other decoder refuses them unless off, and the error names the field.
* `word_embeddings`: the dotted paths of its word-embedding matrices [V, E] (GloVe is loaded into
  the first; `model.train_embeddings=False` freezes them all). Declared, never found by name.
* `pre_logits(features, tokens_in, *, train, key) -> ([B, T, D], aux)`: teacher forcing up to the
  output layer `out_proj` (a `Dense` to the vocabulary), which training fuses with its loss.
* `aux_loss(aux, batch) -> scalar | None`: its own loss terms from `pre_logits`' `aux` and the
  training batch (targets [B, T], and what `concept_outputs` asked the input pipeline for).
* `init_decode(features, max_len) -> (context, state)` and `decode_step(context, state, tokens
  [B]) -> (state, logits [B, V] float32, attention [B, L])`: one word at a time, driven by
  `captioning.decoding.search` inside one `lax.while_loop`/`scan`. Rules: every leaf of context and
  state has the batch first (beam search tiles it on axis 0 and gathers the beams' rows); shapes
  never change between steps (a cache is allocated for `max_len` words in `init_decode`).
* `attention_locations(feature_shape)`: L, the length of `decode_step`'s attention maps (0: none);
  spatial maps are row-major over the [H, W] grid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import jax
import ml_collections
from flax import nnx

from captioning.models.layers import Dense, compute_dtype

Array = jax.Array

# name -> decoder class, in registration order: what `config.model.decoder` may name.
DECODERS: dict[str, type[Decoder]] = {}


class Decoder(nnx.Module):
    """The interface every decoder implements (module docstring: the contract)."""

    name: ClassVar[str] = ""
    spatial: ClassVar[bool] = False
    own_options: ClassVar[dict[str, Any]] = {}
    word_embeddings: ClassVar[tuple[str, ...]] = ("embed.embedding",)
    out_proj: Dense

    # -- building --------------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        model_config: ml_collections.ConfigDict,
        vocab_size: int,
        feature_shape: tuple[int, ...],
        *,
        rngs: nnx.Rngs,
    ) -> Decoder:
        """The decoder `config.model` describes, for features of `feature_shape`."""
        raise NotImplementedError

    @classmethod
    def concept_outputs(cls, model_config: ml_collections.ConfigDict, vocab_size: int) -> int:
        """Outputs of an auxiliary concept head whose multi-hot targets the input pipeline adds
        to training batches as `batch["concepts"]` [B, K] (0: none)."""
        return 0

    @classmethod
    def attention_locations(cls, feature_shape: tuple[int, ...]) -> int:
        """L of the attention maps `decode_step` returns (0: it attends to nothing)."""
        return 0

    # -- training --------------------------------------------------------------------------------

    def pre_logits(
        self, features: Array, tokens_in: Array, *, train: bool = False, key: Array | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """Teacher forcing up to the output layer -> ([B, T, D] input of `out_proj`, aux)."""
        raise NotImplementedError

    def aux_loss(self, aux: dict[str, Array], batch: dict[str, Array]) -> Array | None:
        """This decoder's own loss terms (added to the mean word cross-entropy), or None."""
        return None

    def __call__(
        self, features: Array, tokens_in: Array, *, train: bool = False, key: Array | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """features [B, D] | [B, H, W, C] (| [B, L, C]), tokens_in [B, T] int32 (`<start>` first)
        -> (logits [B, T, V] float32, aux: e.g. {"attention": [B, T, L]}); dropout when `train`
        (with `key`)."""
        pre_logits, aux = self.pre_logits(features, tokens_in, train=train, key=key)
        return self.out_proj(pre_logits), aux

    # -- decoding --------------------------------------------------------------------------------

    def init_decode(self, features: Array, max_len: int | None = None) -> tuple[Any, Any]:
        """features [B, ...] -> (per-image context pytree, initial state pytree), every leaf
        batch-first; `max_len` sizes a cache where the decoder keeps one."""
        raise NotImplementedError

    def decode_step(self, context: Any, state: Any, tokens: Array) -> tuple[Any, Array, Array]:
        """tokens [B] -> (state, logits [B, V] float32, attention [B, L] (L = 0 without))."""
        raise NotImplementedError

    # -- word embeddings -------------------------------------------------------------------------

    @classmethod
    def is_word_embedding(cls, path: tuple[Any, ...]) -> bool:
        """Whether a parameter's tree path (as `jax.tree_util` gives it over the model's state)
        is one of the declared `word_embeddings`."""
        names = tuple(_key_name(k) for k in path)
        return any(names[: len(p)] == p for p in _split_paths(cls.word_embeddings))

    def set_word_embeddings(self, matrix: Array) -> None:
        """Loads [V, E] pretrained vectors (GloVe) into the first declared embedding matrix."""
        target = self
        for part in self.word_embeddings[0].split("."):
            target = getattr(target, part)
        if tuple(target.shape) != tuple(matrix.shape):
            raise ValueError(
                f"{self.name}: the word vectors have shape {tuple(matrix.shape)}, the decoder's "
                f"{self.word_embeddings[0]} {tuple(target.shape)} (config.model.embed_dim)."
            )
        target[...] = matrix


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _split_paths(paths: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [tuple(p.split(".")) for p in paths]


def register(name: str) -> Callable[[type[Decoder]], type[Decoder]]:
    """Class decorator: makes a decoder available as `config.model.decoder=name`."""

    def add(cls: type[Decoder]) -> type[Decoder]:
        if name in DECODERS and DECODERS[name] is not cls:
            raise ValueError(f"A decoder named {name!r} is registered already: {DECODERS[name]}.")
        cls.name = name
        DECODERS[name] = cls
        return cls

    return add


def get(name: str) -> type[Decoder]:
    """The decoder class registered as `name`."""
    if name not in DECODERS:
        raise ValueError(
            f"config.model.decoder={name!r} is unknown; use one of {sorted(DECODERS)}."
        )
    return DECODERS[name]


def common_kwargs(model_config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> dict[str, Any]:
    """The constructor arguments every decoder takes from `config.model`."""
    return dict(
        embed_dim=model_config.embed_dim,
        hidden_size=model_config.hidden_size,
        dropout_rate=model_config.dropout,
        use_image=model_config.use_image,
        rngs=rngs,
        dtype=compute_dtype(model_config.dtype),
    )


def check_options(cls: type[Decoder], model_config: ml_collections.ConfigDict) -> None:
    """Refuses another decoder's own option unless it is off, naming the field."""
    for other in DECODERS.values():
        for field, off in other.own_options.items():
            if field in cls.own_options or field not in model_config:
                continue
            if model_config[field] != off:
                owners = [n for n, c in DECODERS.items() if field in c.own_options]
                raise ValueError(
                    f"config.model.{field}={model_config[field]!r} is an option of the "
                    f"{' and '.join(owners)} decoder, not of {cls.name!r} "
                    f"(config.model.decoder); set it to {off!r}."
                )


def create_model(
    model_config: ml_collections.ConfigDict,
    vocab_size: int,
    feature_shape: tuple[int, ...],
    *,
    rngs: nnx.Rngs,
) -> Decoder:
    """Builds the decoder `config.model.decoder` names for features of `feature_shape` ([D]
    pooled, [H, W, C] or [L, C] spatial)."""
    cls = get(model_config.decoder)
    check_options(cls, model_config)
    if cls.spatial and len(feature_shape) not in (2, 3):
        raise ValueError(
            f"config.model.decoder={cls.name!r} needs spatial features, but the feature store "
            f"has shape {tuple(feature_shape)} per image: set config.encoder.pooling='none' "
            "(optionally config.encoder.grid to resize the map)."
        )
    return cls.from_config(model_config, vocab_size, tuple(feature_shape), rngs=rngs)


def concept_outputs(model_config: ml_collections.ConfigDict, vocab_size: int) -> int:
    """Outputs of the configured decoder's concept head (0: the batches need no concepts)."""
    return get(model_config.decoder).concept_outputs(model_config, vocab_size)


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
