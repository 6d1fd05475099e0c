"""Decoders that attend over spatial features [B, H, W, C] (or [B, L, C]).

* `AttentionDecoder`: Show, Attend and Tell (Xu et al. 2015, "deterministic" soft attention), the
  attention inside the recurrence (`config.model.decoder='attention'`).
* `MergeAttentionDecoder`: the seed's merge model with spatial attention at its output (Lu et al.
  2017), computed for all words in parallel after the LSTM scan (`'merge_attention'`).

Both have the entry points of `captioning.layers.Decoder`, so training, greedy, beam search and
sampling work unchanged and return the attention weights of every generated word. Built by
`captioning.models.create_model`.

Show, Attend and Tell:
Per image: the spatial features a_1..a_L ([L, C], L = H*W locations) give the initial state
h_0 = tanh(W_h mean(a)), c_0 = tanh(W_c mean(a)). Per word t (paper eqs. 4-7 and section 4.2.1):

    e_ti    = w^T tanh(W_a a_i + U_a h_{t-1})          additive attention       [L]
    alpha_t = softmax_i(e_ti)                          sums to one over locations
    beta_t  = sigmoid(f_beta(h_{t-1}))                 gating scalar
    z_t     = beta_t * sum_i alpha_ti a_i              gated context            [C]
    h_t     = LSTM(h_{t-1}, [E y_{t-1}; z_t])
    logits  = L_o tanh(E y_{t-1} + L_h h_t + L_z z_t)  deep output layer

Locations (`config.model.attention_positions`, an addition to the paper): a conv feature says
*what* is at a location but hardly *where* (convolutions are translation-equivariant), so z_t, a
weighted mean of features, tells the LSTM what it looked at and not where, and captions that state
spatial relations ("left of") need the latter. With the option on, a_i gets its (row, column) in
[-1, 1] appended (C + 2 channels), so z_t also holds the attended position.

Training adds the doubly stochastic regularization lambda * sum_i (1 - sum_t alpha_ti)^2
(`captioning.losses.attention_regularizer`, weight `config.model.attention_reg`) from the
returned attention.

Speed: what does not depend on the step is hoisted out of the time loop. W_a a_i + b is computed
once per image (`AttentionContext.keys`), the word embeddings' gate inputs of the whole sequence
are one matmul before the scan, and the deep output of all steps one matmul after it (the scan
returns h_t and z_t). Inside the scan remain the attention scores (tanh over [B, L, A], the main
cost on a CPU), the weighted sum over locations, z_t @ W_z and h @ W_rec. (Projecting the features
to the gates once per image, alpha_t @ (a W_z), saves multiply-adds but reads a [B, L, 4H] tensor
every step and accumulates its gradient every step: measured ~2x slower here.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from captioning import text
from captioning.layers import LSTM, Decoder, Dense, dropout, matmul, param

Array = jax.Array


class AttentionContext(NamedTuple):
    """Per-image constants of decoding (rows are images, or image-beams in beam search).

    values: [B, L, C] (compute dtype) the annotation vectors a_i.
    keys: [B, L, A] float32 W_a a_i + b, the feature part of the attention scores.
    """

    values: Array
    keys: Array


def _weighted(weights: Array, values: Array, dtype: Any) -> Array:
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


def append_positions(features: Array, scale: float = 1.0) -> Array:
    """[B, H, W, C] (or [B, L, C] with L a square) -> [B, H, W, C + 2]: each location's row and
    column centre in [-1, 1], times `scale`, appended to its features (top left = (-1, -1),
    approximately)."""
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
    grid = jnp.broadcast_to(scale * grid, (batch, height, width, 2)).astype(features.dtype)
    return jnp.concatenate([features, grid], axis=-1)


def spatial_input(features: Array, use_image: bool, positions: float) -> Array:
    """[B, H, W, C] | [B, L, C] -> float32 [B, L, C (+2)]: zeros for the image-blind ablation,
    each location's (row, column) times `positions` appended when it is not 0."""
    feats = features.astype(jnp.float32)
    if not use_image:
        feats = jnp.zeros_like(feats)
    if positions:
        feats = append_positions(feats, float(positions))
    return flatten_locations(feats)


def additive_attention(keys: Array, h: Array, query_w: Array, score_w: Array, dtype: Any) -> Array:
    """Weights softmax_i(w^T tanh(k_i + U h)) over locations (Bahdanau-style).

    keys [B, L, A] (W_a a_i + b), h [B, H] or [B, T, H], query_w U [H, A], score_w w [A, 1]
    -> alpha [B, L] or [B, T, L], summing to 1 over L.
    """
    query = matmul(h, query_w, dtype)  # [B, (T,) A]
    if h.ndim == 3:
        keys = keys[:, None]  # [B, 1, L, A]: the same locations for every step.
    hidden = jnp.tanh(keys + query[..., None, :])  # [B, (T,) L, A]
    scores = matmul(hidden, score_w, dtype)[..., 0]  # [B, (T,) L]
    return jax.nn.softmax(scores, axis=-1)


class AttentionDecoder(Decoder):
    """Show, Attend and Tell soft-attention LSTM over [B, H, W, C] (or [B, L, C]) features."""

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        *,
        embed_dim: int,
        hidden_size: int,
        attention_dim: int,
        dropout_rate: float,
        use_image: bool,
        rngs: nnx.Rngs,
        positions: float = 0.0,
        dtype: Any = jnp.float32,
    ):
        self.dropout_rate = dropout_rate
        self.use_image = use_image
        self.positions = positions
        self.dtype = dtype
        feature_dim += 2 if positions else 0  # (row, column) appended to every location.
        # Initial state from the mean annotation vector (paper section 3.1.2).
        self.init_h = Dense(feature_dim, hidden_size, rngs=rngs, dtype=dtype)
        self.init_c = Dense(feature_dim, hidden_size, rngs=rngs, dtype=dtype)
        # Additive attention: w^T tanh(W_a a_i + b + U_a h).
        self.att_keys = Dense(feature_dim, attention_dim, rngs=rngs, dtype=dtype)
        self.att_query = param(rngs, (hidden_size, attention_dim))
        self.att_score = param(rngs, (attention_dim, 1))
        # Gating scalar beta = sigmoid(f_beta(h)) (section 4.2.1).
        self.gate = Dense(hidden_size, 1, rngs=rngs, dtype=dtype)
        # LSTM over [E y; z]: `lstm.w_in` holds the word part, `context_w` the context part (the
        # same parameters as one matrix over the concatenation, split so the two can be hoisted).
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        self.lstm = LSTM(embed_dim, hidden_size, rngs=rngs, dtype=dtype)
        self.context_w = param(rngs, (feature_dim, 4 * hidden_size))
        # Deep output: L_o tanh(E y + L_h h + L_z z).
        self.out_state = Dense(hidden_size, embed_dim, rngs=rngs, dtype=dtype)
        self.out_context = param(rngs, (feature_dim, embed_dim))
        self.out_proj = Dense(embed_dim, vocab_size, rngs=rngs, dtype=dtype)

    # -- per image -------------------------------------------------------------------------------

    def _prepare(self, features: Array) -> tuple[AttentionContext, tuple[Array, Array]]:
        """features [B, H, W, C] | [B, L, C] -> (context, initial LSTM state (h, c) [B, H])."""
        feats = spatial_input(features, self.use_image, self.positions)  # [B, L, C]
        mean = feats.mean(axis=1)
        state = (jnp.tanh(self.init_h(mean)), jnp.tanh(self.init_c(mean)))
        context = AttentionContext(values=feats.astype(self.dtype), keys=self.att_keys(feats))
        return context, state

    # -- per word --------------------------------------------------------------------------------

    def _attend(self, context: AttentionContext, h: Array) -> tuple[Array, Array]:
        """h [B, H] (the previous state) -> (alpha [B, L] summing to 1, beta [B, 1])."""
        alpha = additive_attention(
            context.keys, h, self.att_query[...], self.att_score[...], self.dtype
        )
        beta = jax.nn.sigmoid(self.gate(h))
        return alpha, beta

    def _step(
        self, context: AttentionContext, state: tuple[Array, Array], word_gates: Array
    ) -> tuple[tuple[Array, Array], Array, Array]:
        """One LSTM step from the words' gate inputs [B, 4H] -> (state, alpha [B, L], z [B, C])."""
        alpha, beta = self._attend(context, state[0])
        z = beta * _weighted(alpha, context.values, self.dtype)  # gated context [B, C]
        gates = word_gates + matmul(z, self.context_w[...], self.dtype)
        return self.lstm.cell(state, gates), alpha, z

    def _pre_logits(
        self,
        words: Array,
        h: Array,
        z: Array,
        keys: tuple[Array | None, Array | None],
        train: bool,
    ) -> Array:
        """Deep output up to L_o: words [B, T, E], h [B, T, H], z [B, T, C] -> [B, T, E]."""
        k_h, k_out = keys
        h = dropout(h, self.dropout_rate, k_h, train)
        z_out = matmul(z, self.out_context[...], self.dtype)
        deep = jnp.tanh(words + self.out_state(h) + z_out)
        return dropout(deep, self.dropout_rate, k_out, train)

    # -- the decoder interface -------------------------------------------------------------------

    def pre_logits(
        self, features: Array, tokens_in: Array, *, train: bool = False, key: Array | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """Teacher forcing up to the output layer: -> ([B, T, E] input of `out_proj`, aux)."""
        k_emb, k_h, k_out = jax.random.split(key, 3) if key is not None else (None,) * 3
        context, state = self._prepare(features)
        words = dropout(self.embed(tokens_in), self.dropout_rate, k_emb, train)  # [B, T, E]
        word_gates = self.lstm.project_inputs(words)  # [B, T, 4H], one matmul for all steps

        def scan_step(state, gates_t):
            state, alpha, z = self._step(context, state, gates_t)
            return state, (state[0], alpha, z)

        _, (h, alpha, z) = jax.lax.scan(scan_step, state, jnp.swapaxes(word_gates, 0, 1))
        h, alpha, z = (jnp.swapaxes(x, 0, 1) for x in (h, alpha, z))  # batch-major
        return self._pre_logits(words, h, z, (k_h, k_out), train), {"attention": alpha}

    def init_decode(self, features: Array) -> tuple[AttentionContext, tuple[Array, Array]]:
        """features [B, H, W, C] | [B, L, C] -> (AttentionContext, LSTM state (h, c))."""
        return self._prepare(features)

    def decode_step(
        self, context: AttentionContext, state: tuple[Array, Array], tokens: Array
    ) -> tuple[tuple[Array, Array], Array, Array]:
        """tokens [B] -> (state, logits [B, V] float32, attention [B, L] of this word)."""
        words = self.embed(tokens)  # [B, E]
        state, alpha, z = self._step(context, state, self.lstm.project_inputs(words))
        deep = self._pre_logits(words[:, None], state[0][:, None], z[:, None], (None, None), False)
        return state, self.out_proj(deep)[:, 0], alpha


class MergeAttentionDecoder(Decoder):
    """The merge decoder with spatial attention at its output (Lu et al. 2017, "Knowing When to
    Look", section 2.2): what is added to the LSTM's output h_t is no longer one pooled vector but
    a context looked up *with h_t itself*.

    Per image, from the locations a_1..a_L ([L, C], positions appended when configured):
        v = relu(W_v mean(a))           the merge decoder's pooled image embedding  [H]
        k_i = W_k a_i + b,  u_i = W_u a_i                     keys [L, A], values [L, H]
    Per word t, all t at once after the LSTM's scan (no recurrence through the attention):
        alpha_t = softmax_i(w^T tanh(k_i + U h_t))                                  [L]
        c_t = sum_i alpha_ti u_i                                                    [H]
        logits_t = dense(V)(relu(dense(H)(v + c_t + h_t)))

    Why for the scenes: naming "a blue ..." then its shape needs the shape *of the blue object*;
    a pooled vector mixes all objects (binding errors), while h_t, having just emitted "blue", can
    look at the blue object's cells. Since alpha_t depends on h_t and not on h_{t-1}, training
    runs the attention for every step in parallel: it costs little more than the merge decoder,
    unlike Show-Attend-Tell's attention inside the recurrence.

    Two options give the LSTM itself a view of the image, still without attention inside the
    recurrence:
    * `layout_init`: (h_0, c_0) = tanh(W flatten(a)): the LSTM starts knowing the whole layout
      (which objects, where), so it can keep track of which ones it has named.
    * `word_attention`: the words just read look the image up too: q_t = U_1 e(w_t) + U_2
      e(w_{t-1}) (so "red" then "circle" asks for the red circle), z_t = sum_i beta_ti r_i, and the
      LSTM reads [e(w_t); z_t]. The queries depend on the input words only, so z_t of every step
      is computed before the scan. The LSTM then knows where the objects it named are, which the
      spatial relation it states next depends on.
    """

    def __init__(
        self,
        vocab_size: int,
        feature_dim: int,
        *,
        embed_dim: int,
        hidden_size: int,
        attention_dim: int,
        dropout_rate: float,
        use_image: bool,
        rngs: nnx.Rngs,
        positions: float = 0.0,
        dtype: Any = jnp.float32,
        num_locations: int = 0,
        layout_init: bool = False,
        word_attention: bool = False,
        heads: int = 1,
        feed_dim: int = 0,
    ):
        self.dropout_rate = dropout_rate
        self.use_image = use_image
        self.positions = positions
        self.dtype = dtype
        self.word_attention = word_attention
        feature_dim += 2 if positions else 0
        # Feeding: the LSTM also reads an F-dim summary of what the previous word looked at.
        self.feed_dim = feed_dim
        if heads < 1:
            raise ValueError(f"config.model.attention_heads={heads}: use 1 or more.")
        self.heads = heads
        self.image_proj = Dense(feature_dim, hidden_size, rngs=rngs, dtype=dtype)
        self.att_keys = Dense(feature_dim, heads * attention_dim, rngs=rngs, dtype=dtype)
        self.att_values = param(rngs, (feature_dim, heads * hidden_size))
        self.att_query = param(rngs, (hidden_size, heads * attention_dim))
        self.att_score = param(rngs, (heads, attention_dim))
        self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
        lstm_in = embed_dim + (hidden_size if word_attention else 0)
        self.lstm = LSTM(lstm_in, hidden_size, rngs=rngs, dtype=dtype)
        self.merge_proj = Dense(hidden_size, hidden_size, rngs=rngs, dtype=dtype)
        self.out_proj = Dense(hidden_size, vocab_size, rngs=rngs, dtype=dtype)
        if layout_init and num_locations < 1:
            raise ValueError("config.model.layout_init needs the number of feature locations.")
        layout_dim = num_locations * feature_dim
        self.layout = (
            Dense(layout_dim, 2 * hidden_size, rngs=rngs, dtype=dtype) if layout_init else None
        )
        if feed_dim:
            self.feed_values = param(rngs, (feature_dim, feed_dim))
            self.feed_gates = param(rngs, (feed_dim, 4 * hidden_size))
        if word_attention:
            self.word_keys = Dense(feature_dim, attention_dim, rngs=rngs, dtype=dtype)
            self.word_values = param(rngs, (feature_dim, hidden_size))
            self.word_query = param(rngs, (embed_dim, attention_dim))
            self.word_query_prev = param(rngs, (embed_dim, attention_dim))
            self.word_score = param(rngs, (attention_dim, 1))

    def _prepare(self, features: Array, key: Array | None, train: bool):
        """features [B, H, W, C] | [B, L, C] -> (pooled v [B, H], output context, word context
        or None, fed values [B, L, F] or None, initial LSTM state)."""
        feats = spatial_input(features, self.use_image, self.positions)
        feats = dropout(feats, self.dropout_rate, key, train)  # [B, L, C]
        pooled = jax.nn.relu(self.image_proj(feats.mean(axis=1)))
        # Per head k: values [B, L, k, H], keys [B, L, k, A].
        split = lambda x: x.reshape(*x.shape[:2], self.heads, -1)
        values = split(matmul(feats, self.att_values[...], self.dtype))
        output_context = AttentionContext(values=values, keys=split(self.att_keys(feats)))
        word_context = None
        if self.word_attention:
            word_values = matmul(feats, self.word_values[...], self.dtype)
            word_context = AttentionContext(values=word_values, keys=self.word_keys(feats))
        feed_values = None
        if self.feed_dim:
            feed_values = matmul(feats, self.feed_values[...], self.dtype)  # [B, L, F]
        state = self.lstm.zero_state(features.shape[0])
        if self.layout is not None:
            h0, c0 = jnp.split(jnp.tanh(self.layout(feats.reshape(feats.shape[0], -1))), 2, -1)
            state = (h0, c0)
        return pooled, output_context, word_context, feed_values, state

    def _lstm_inputs(self, word_context, words: Array, prev_words: Array) -> Array:
        """words, prev_words [B, (T,) E] -> the LSTM's gate inputs [B, (T,) 4H]."""
        if word_context is None:
            return self.lstm.project_inputs(words)
        query = matmul(words, self.word_query[...], self.dtype) + matmul(
            prev_words, self.word_query_prev[...], self.dtype
        )
        beta = jax.nn.softmax(
            matmul(
                jnp.tanh(
                    (word_context.keys[:, None] if words.ndim == 3 else word_context.keys)
                    + query[..., None, :]
                ),
                self.word_score[...],
                self.dtype,
            )[..., 0],
            axis=-1,
        )
        seen = _weighted(beta, word_context.values, self.dtype)  # [B, (T,) H]
        return self.lstm.project_inputs(jnp.concatenate([words, seen], axis=-1))

    def _output(self, pooled: Array, context: AttentionContext, h: Array) -> tuple[Array, Array]:
        """h [B, T, H] -> (pre-logits [B, T, H], alpha [B, T, L] averaged over the heads)."""
        attended, alpha = self._attend(context, h)
        return self._merge(pooled, attended, h), alpha

    def _merge(self, pooled: Array, attended: Array, h: Array) -> Array:
        """The merge decoder's output: relu(dense(v + c_t + h_t)) [B, T, H]."""
        return jax.nn.relu(self.merge_proj(pooled[:, None, :] + attended + h))

    def _attend(self, context: AttentionContext, h: Array) -> tuple[Array, Array]:
        """h [B, T, H] -> (context c_t [B, T, H], alpha [B, T, L] averaged over the heads).

        Each head k looks up its own context: alpha_tk = softmax_i(w_k^T tanh(k_ik + U_k h_t)),
        and the contexts sum_i alpha_tki u_ik of all heads add up.
        """
        alpha = self._weights(context, h)
        return self._read(context, alpha), alpha.mean(axis=2)

    def _weights(self, context: AttentionContext, h: Array) -> Array:
        """h [B, T, H] -> alpha [B, T, heads, L], each head's weights over the locations."""
        query = matmul(h, self.att_query[...], self.dtype)
        query = query.reshape(*query.shape[:2], self.heads, -1)  # [B, T, k, A]
        hidden = jnp.tanh(context.keys[:, None] + query[:, :, None])  # [B, T, L, k, A]
        scores = jnp.einsum(
            "btlka,ka->btkl",
            hidden.astype(self.dtype),
            self.att_score[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        return jax.nn.softmax(scores, axis=-1)  # [B, T, k, L]

    def _read(self, context: AttentionContext, alpha: Array) -> Array:
        """alpha [B, T, heads, L] -> the heads' contexts summed [B, T, H]."""
        return jnp.einsum(
            "btkl,blkd->btd",
            alpha.astype(self.dtype),
            context.values.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )

    def pre_logits(
        self, features: Array, tokens_in: Array, *, train: bool = False, key: Array | None = None
    ) -> tuple[Array, dict[str, Array]]:
        """Teacher forcing up to the output layer: -> ([B, T, H] input of `out_proj`, aux)."""
        k_img, k_emb = jax.random.split(key) if key is not None else (None, None)
        pooled, output_context, word_context, feed_values, state = self._prepare(
            features, k_img, train
        )
        words = dropout(self.embed(tokens_in), self.dropout_rate, k_emb, train)  # [B, T, E]
        # Before the first word, the previous word is <start> again (as in init_decode).
        start = self.embed(jnp.full_like(tokens_in[:, :1], text.START_ID))
        prev_words = jnp.concatenate([start, words[:, :-1]], axis=1)
        gates = self._lstm_inputs(word_context, words, prev_words)  # [B, T, 4H]
        if feed_values is None:
            h_bth = self.lstm.scan(state, gates)
            pre_logits, alpha = self._output(pooled, output_context, h_bth)
            return pre_logits, {"attention": alpha}

        def step(carry, gates_t):  # The attention weights run inside the recurrence.
            (h, c), fed = carry
            h, c = self.lstm.cell((h, c), gates_t + self._feed(fed))
            alpha = self._weights(output_context, h[:, None])  # [B, 1, heads, L]
            return ((h, c), self._fed(feed_values, alpha[:, 0])), (h, alpha[:, 0])

        fed = jnp.zeros((tokens_in.shape[0], feed_values.shape[-1]), jnp.float32)
        _, (h, alpha) = jax.lax.scan(step, (state, fed), jnp.swapaxes(gates, 0, 1))
        h, alpha = jnp.swapaxes(h, 0, 1), jnp.swapaxes(alpha, 0, 1)  # [B, T, H], [B, T, k, L]
        attended = self._read(output_context, alpha)  # All steps at once, after the scan.
        return self._merge(pooled, attended, h), {"attention": alpha.mean(axis=2)}

    def _fed(self, feed_values: Array, alpha: Array) -> Array:
        """alpha [B, heads, L] of the word just looked up -> what the LSTM reads next [B, F]."""
        return jnp.einsum("bl,blf->bf", alpha.mean(axis=1), feed_values)

    def _feed(self, fed: Array) -> Array:
        """What the previous word looked at [B, F] -> its part of the gates [B, 4H]."""
        return matmul(fed, self.feed_gates[...], self.dtype)

    def init_decode(self, features: Array):
        """-> ((pooled embedding, output and word attention contexts), (h, c, previous word,
        previous attended context))."""
        pooled, output_context, word_context, feed_values, (h, c) = self._prepare(
            features, None, False
        )
        start = jnp.full((features.shape[0],), text.START_ID, jnp.int32)
        fed = jnp.zeros((features.shape[0], self.feed_dim), jnp.float32)
        return (pooled, output_context, word_context, feed_values), (h, c, start, fed)

    def decode_step(self, context, state, tokens: Array):
        """tokens [B] -> (state, logits [B, V] float32, attention [B, L] of this word)."""
        pooled, output_context, word_context, feed_values = context
        h, c, prev, fed = state
        gates = self._lstm_inputs(word_context, self.embed(tokens), self.embed(prev))
        if feed_values is not None:
            gates = gates + self._feed(fed)
        h, c = self.lstm.cell((h, c), gates)
        alpha_heads = self._weights(output_context, h[:, None, :])  # [B, 1, heads, L]
        pre_logits = self._merge(pooled, self._read(output_context, alpha_heads), h[:, None, :])
        if feed_values is not None:
            fed = self._fed(feed_values, alpha_heads[:, 0])
        alpha = alpha_heads[:, 0].mean(axis=1)
        return (h, c, tokens, fed), self.out_proj(pre_logits)[:, 0], alpha
