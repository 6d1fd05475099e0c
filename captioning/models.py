"""Flax NNX caption decoders over precomputed CNN features.

Every decoder exposes the same entry points, so training and every decoding method (greedy,
beam, sampling) work with any of them:

  * `__call__(features, tokens_in, *, train, key) -> (logits [B, T, V], aux)`: teacher forcing over
    the whole sequence in one `lax.scan`; `aux` holds extra loss terms' inputs (e.g. attention).
  * `pre_logits(...)`: the same up to the output layer `out_proj` -> ([B, T, D], aux); training
    fuses `out_proj` with the loss (`captioning.losses`).
  * `init_decode(features) -> (context, state)`: per-image constants and the initial LSTM state.
  * `decode_step(context, state, tokens [B]) -> (state, logits [B, V], attention [B, L])`: one word.

`features` is [B, D] (pooled) or [B, H, W, C] (spatial). Speed notes: the LSTM input projection of a
whole sequence is one large matmul outside the time loop, and so is the output projection; only
`h @ W_rec` runs inside the scan, and in the backward pass only `dgates @ W_rec^T`
(`lstm_recurrence`: the weight gradient is one matmul after the reverse loop).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
    """Config string -> jnp dtype of matrix products."""
    if name not in _DTYPES:
        raise ValueError(f"config.model.dtype={name!r}: use one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def matmul(x: Array, w: Array, dtype: Any) -> Array:
    """x @ w with inputs cast to `dtype` and float32 accumulation/result (mixed precision)."""
    return jnp.matmul(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def dropout(x: Array, rate: float, key: Array | None, train: bool) -> Array:
    """Inverted dropout driven by an explicit key; identity at eval time.

    The keep mask compares random bytes against round(rate * 256): one 32-bit draw gives four
    elements' bits, which makes mask generation >10x cheaper on CPU than `random.bernoulli` (one
    float per element). The rate is thus quantised to 1/256; the kept values are scaled by the
    exact keep probability, so the layer stays unbiased.
    """
    if not train or rate <= 0.0 or key is None:
        return x
    threshold = min(max(round(rate * 256), 1), 255)
    keep_prob = 1.0 - threshold / 256
    words = jax.random.bits(key, (-(-x.size // 4),), jnp.uint32)
    random_bytes = jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[: x.size]
    keep = random_bytes.reshape(x.shape) >= threshold
    return jnp.where(keep, x / keep_prob, 0.0).astype(x.dtype)


class Dense(nnx.Module):
    """Linear layer whose matmul honours the mixed-precision dtype."""

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_dim, out_dim), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_dim,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        return matmul(x, self.kernel[...], self.dtype) + self.bias[...]


class LSTM(nnx.Module):
    """LSTM with fused gates [i, f, g, o]; input projection hoisted out of the time loop."""

    def __init__(self, in_dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.hidden = hidden
        self.dtype = dtype
        self.w_in = nnx.Param(
            nnx.initializers.lecun_normal()(rngs.params(), (in_dim, 4 * hidden), jnp.float32)
        )
        self.w_rec = nnx.Param(
            nnx.initializers.orthogonal()(rngs.params(), (hidden, 4 * hidden), jnp.float32)
        )
        # Forget-gate bias 1 keeps early gradients flowing through time.
        bias = jnp.zeros((4, hidden), jnp.float32).at[1].set(1.0).reshape(-1)
        self.bias = nnx.Param(bias)

    def zero_state(self, batch: int) -> tuple[Array, Array]:
        """(h, c), each [batch, hidden] float32."""
        zeros = jnp.zeros((batch, self.hidden), jnp.float32)
        return zeros, zeros

    def project_inputs(self, x: Array) -> Array:
        """[..., in_dim] -> [..., 4*hidden] input part of the gates (bias included)."""
        return matmul(x, self.w_in[...], self.dtype) + self.bias[...]

    def cell(self, state: tuple[Array, Array], gates_in: Array) -> tuple[Array, Array]:
        """One step from projected inputs [B, 4H]; returns the new (h, c)."""
        h, c, _ = _lstm_step(self.w_rec[...], state, gates_in, self.dtype)
        return h, c

    def scan(self, state: tuple[Array, Array], gates_in_btg: Array) -> Array:
        """Runs the recurrence over [B, T, 4H] projected inputs; returns h [B, T, H]."""
        h_tbh = lstm_recurrence(
            self.w_rec[...], state[0], state[1], jnp.swapaxes(gates_in_btg, 0, 1), self.dtype
        )
        return jnp.swapaxes(h_tbh, 0, 1)


def _lstm_step(
    w_rec: Array, state: tuple[Array, Array], gates_in: Array, dtype: Any
) -> tuple[Array, Array, Array]:
    """The LSTM's one formula: (h, c) [B, H] and gate inputs [B, 4H] -> (h', c', the gates'
    activations [i, f, g, o] [B, 4H], which only the backward pass of `lstm_recurrence` keeps)."""
    h, c = state
    gates = gates_in + matmul(h, w_rec, dtype)
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c = f * c + i * g
    h = o * jnp.tanh(c)
    return h, c, jnp.concatenate([i, f, g, o], axis=-1)


def _recurrence_forward(w_rec, h0, c0, gates_in_tbg, dtype):
    """The LSTM over [T, B, 4H] gate inputs -> (h [T, B, H], (c [T, B, H], activations))."""

    def step(state, gates_in):
        h, c, activations = _lstm_step(w_rec, state, gates_in, dtype)
        return (h, c), (h, c, activations)

    _, (h_tbh, c_tbh, activations) = jax.lax.scan(step, (h0, c0), gates_in_tbg)
    return h_tbh, (c_tbh, activations)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def lstm_recurrence(w_rec: Array, h0: Array, c0: Array, gates_in_tbg: Array, dtype: Any) -> Array:
    """h_t of the LSTM (gates [i, f, g, o] = gates_in_t + h_{t-1} @ w_rec) -> h [T, B, H].

    Same values as `LSTM.cell` in a `lax.scan`; the hand-written backward pass differs from
    autodiff's in one place: autodiff adds h_{t-1}^T dgates_t into dW_rec at every step (a small
    [H, B] x [B, 4H] product inside the reverse loop), here the loop only stacks dgates_t and dW_rec
    is one [H, T*B] x [T*B, 4H] product after it (10-12 % off a scenes train step, A/B in one
    process).
    """
    return _recurrence_forward(w_rec, h0, c0, gates_in_tbg, dtype)[0]


def _recurrence_fwd(w_rec, h0, c0, gates_in_tbg, dtype):
    h_tbh, (c_tbh, activations) = _recurrence_forward(w_rec, h0, c0, gates_in_tbg, dtype)
    return h_tbh, (w_rec, h0, c0, h_tbh, c_tbh, activations)


def _recurrence_bwd(dtype, residuals, dh_tbh):
    w_rec, h0, c0, h_tbh, c_tbh, activations = residuals
    # The states each step started from: the initial state, then every step's result but the last.
    h_prev = jnp.concatenate([h0[None], h_tbh[:-1]], axis=0)
    c_prev = jnp.concatenate([c0[None], c_tbh[:-1]], axis=0)
    w_rec_t = w_rec.T

    def step(carry, xs):
        dh_next, dc_next = carry  # Gradients flowing back from step t+1 into h_t and c_t.
        dh_out, c_before, acts, c = xs
        i, f, g, o = jnp.split(acts, 4, axis=-1)
        dh = dh_out + dh_next
        tanh_c = jnp.tanh(c)
        dc = dc_next + dh * o * (1.0 - tanh_c * tanh_c)
        dgates = jnp.concatenate(
            [
                dc * g * i * (1.0 - i),  # input gate (sigmoid)
                dc * c_before * f * (1.0 - f),  # forget gate (sigmoid)
                dc * i * (1.0 - g * g),  # candidate (tanh)
                dh * tanh_c * o * (1.0 - o),  # output gate (sigmoid)
            ],
            axis=-1,
        )
        return (matmul(dgates, w_rec_t, dtype), dc * f), dgates

    zeros = jnp.zeros_like(dh_tbh[0])
    (dh0, dc0), dgates = jax.lax.scan(
        step, (zeros, zeros), (dh_tbh, c_prev, activations, c_tbh), reverse=True
    )
    steps, batch, hidden = h_prev.shape
    d_w_rec = matmul(
        h_prev.reshape(steps * batch, hidden).T, dgates.reshape(steps * batch, 4 * hidden), dtype
    )
    return d_w_rec, dh0, dc0, dgates


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def _pool(features: Array) -> Array:
    """[B, D] stays; [B, H, W, C] -> mean over locations [B, C]."""
    if features.ndim == 4:
        return features.mean(axis=(1, 2))
    return features


def _image_input(features: Array, use_image: bool) -> Array:
    """Pooled float32 features [B, C]; zeros for the image-blind ablation."""
    feats = _pool(features).astype(jnp.float32)
    return feats if use_image else jnp.zeros_like(feats)


class Decoder(nnx.Module):
    """What every decoder shares: teacher forcing = `out_proj(pre_logits(...))`.

    Subclasses define `pre_logits`, `out_proj`, `init_decode` and `decode_step`.
    """

    def __call__(
        self, features: Array, tokens_in: Array, *, train: bool = False, key: Array | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """features [B, D] | [B, H, W, C] (| [B, L, C]), tokens_in [B, T] int32 (`<start>` first)
        -> (logits [B, T, V] float32, aux: e.g. {"attention": [B, T, L]}); dropout when `train`
        (with `key`)."""
        pre_logits, aux = self.pre_logits(features, tokens_in, train=train, key=key)
        return self.out_proj(pre_logits), aux


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


DECODERS = {"merge": MergeDecoder, "inject": InjectDecoder}


def num_concepts(model_config: ml_collections.ConfigDict, vocab_size: int) -> int:
    """Outputs of the merge decoder's auxiliary concept head: every word + the frequent pairs.

    0 (no head) unless `config.model.concept_loss` > 0 (see input_pipeline.concept_targets).
    """
    if not model_config.get("concept_loss", 0.0):
        return 0
    return vocab_size + int(model_config.get("concept_pairs", 0))


def create_model(
    model_config: ml_collections.ConfigDict,
    vocab_size: int,
    feature_shape: tuple[int, ...],
    *,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Builds the decoder named by `config.model.decoder` for features of `feature_shape`."""
    name = model_config.decoder
    if model_config.get("concept_loss", 0.0) and name != "merge":
        raise ValueError(
            f"config.model.concept_loss={model_config.concept_loss} needs the merge decoder "
            f"(config.model.decoder={name!r}); set it to 0 for this decoder."
        )
    if name in ("attention", "merge_attention"):
        from captioning import attention  # Imported lazily: optional module.

        return attention.create_attention_decoder(
            model_config, vocab_size, feature_shape, rngs=rngs
        )
    if name not in DECODERS:
        raise ValueError(
            f"config.model.decoder={name!r} is unknown; use one of {sorted(DECODERS)}, "
            "attention or merge_attention."
        )
    return DECODERS[name](
        vocab_size,
        feature_shape[-1],
        embed_dim=model_config.embed_dim,
        hidden_size=model_config.hidden_size,
        dropout_rate=model_config.dropout,
        use_image=model_config.use_image,
        rngs=rngs,
        dtype=compute_dtype(model_config.dtype),
        **({"num_concepts": num_concepts(model_config, vocab_size)} if name == "merge" else {}),
    )
