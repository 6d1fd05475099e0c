"""Cross-entropy training: `train_and_evaluate(config, workdir)`, the first phase of every run.

What this phase supplies to the one loop (`training.loop`): the optimizer (Adam(W), warm-up and
cosine decay, clipping; frozen word embeddings where the decoder declares them), the jitted
teacher-forced step (`make_steps`: one compiled executable per length bucket, built before step
1, so nothing compiles afterwards; the output layer fused with its loss, `training.losses`; the
decoder's own terms, `Decoder.aux_loss`), data parallel over the device mesh, its statistics
(`CrossEntropyStats`) and the validation loss. Everything else (resume, validation, selection,
checkpoints, writers, the final scoring) is the loop's.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from captioning import models, parallel
from captioning.data import input_pipeline, text
from captioning.data.prepare import PreparedData, prepare_data
from captioning.evaluation import evaluate
from captioning.run_dir import VOCAB_FILE, RunDir
from captioning.training import loop, losses

Array = jax.Array

# --------------------------------------------------------------------------------------------
# Optimizer and the jitted steps
# --------------------------------------------------------------------------------------------


def create_optimizer(train_config: ml_collections.ConfigDict, total_steps: int):
    """-> (Adam(W) with linear warm-up, cosine decay to 10 % and global-norm clipping, schedule)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_config.learning_rate,
        warmup_steps=min(train_config.warmup_steps, max(total_steps - 1, 1)),
        decay_steps=max(total_steps, 2),
        end_value=0.1 * train_config.learning_rate,
    )
    return optax.chain(
        optax.clip_by_global_norm(train_config.grad_clip),
        optax.adamw(schedule, weight_decay=train_config.weight_decay),
    ), schedule


def embeddings_frozen(model_config: ml_collections.ConfigDict) -> bool:
    """True when pretrained (GloVe) word vectors are loaded and kept fixed, as the Keras notebook
    does."""
    return bool(model_config.glove_path) and not model_config.train_embeddings


def _freeze_embeddings(tx, params, decoder: type[models.Decoder]):
    """Leaves the decoder's declared word embeddings untouched by the optimizer."""
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if decoder.is_word_embedding(path) else "trained", params
    )
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def make_steps(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    model_config,
    *,
    stats=None,
    freeze_embeddings: bool | None = None,
    word_weights=None,
):
    """-> (train_step, eval_step), pure functions to be jitted.

    `features` is the store on the device ([N, ...], rows gathered by `batch["image_index"]`), or
    None when the batch carries its rows as `batch["features"]` (host or disk residency); `stats`
    (a `data.FeatureStats`) standardises the rows on the device (None: already standardised).
    With frozen embeddings (default: `embeddings_frozen(model_config)`) the embedding matrix is
    behind a stop_gradient, so XLA skips its gradient (a scatter-add) and the gradient of the
    embedded words (a [B*T, 4H] x [4H, E] matmul) instead of computing and discarding them.
    `word_weights` ([V], `losses.word_weights_array`) weighs each target word's loss in training;
    evaluation keeps the plain mean per word.

    train_step(params, opt_state, features, batch, base_key, step)
        -> (params, opt_state, {loss_sum, count, targets, grad_norm}); count is the loss's
        divisor (the sum of the word weights), targets the number of real target words
    eval_step(params, features, batch) -> {loss_sum, count}
    """
    if freeze_embeddings is None:
        freeze_embeddings = embeddings_frozen(model_config)
    decoder = models.get(model_config.decoder)

    def loss_fn(params, features, batch, key, train):
        if freeze_embeddings:
            params = jax.tree_util.tree_map_with_path(
                lambda path, x: jax.lax.stop_gradient(x) if decoder.is_word_embedding(path) else x,
                params,
            )
        model = nnx.merge(graphdef, params)
        if features is None:
            image_features = batch["features"]
        else:
            # "clip": the indices are rows of the store by construction; the default "fill"
            # adds a pass over the gathered rows to blank out-of-range ones.
            image_features = jnp.take(features, batch["image_index"], axis=0, mode="clip")
        if stats is not None:
            image_features = stats.apply(image_features)
        pre_logits, aux = model.pre_logits(image_features, batch["inputs"], train=train, key=key)
        # The output layer and the cross-entropy in one (captioning/training/losses.py).
        out = model.out_proj
        loss_sum, count = losses.output_cross_entropy(
            pre_logits,
            out.kernel[...],
            out.bias[...],
            batch["targets"],
            out.dtype,
            word_weights if train else None,
        )
        loss = loss_sum / jnp.maximum(count, 1.0)
        extra = model.aux_loss(aux, batch)  # The decoder's own terms (models.base).
        if extra is not None:
            loss = loss + extra
        return loss, (loss_sum, count)

    def train_step(params, opt_state, features, batch, base_key, step):
        key = jax.random.fold_in(base_key, step)
        grads, (loss_sum, count) = jax.grad(loss_fn, has_aux=True)(
            params, features, batch, key, True
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        targets = jnp.sum(batch["targets"] != text.PAD_ID).astype(jnp.float32)
        stats = {
            "loss_sum": loss_sum,
            "count": count,
            "targets": targets,
            "grad_norm": optax.global_norm(grads),
        }
        return params, opt_state, stats

    def eval_step(params, features, batch):
        _, (loss_sum, count) = loss_fn(params, features, batch, None, False)
        return {"loss_sum": loss_sum, "count": count}

    return train_step, eval_step


def compile_for_buckets(fn: Callable, make_args: Callable[[dict], tuple], batches) -> dict:
    """Ahead-of-time compiles `fn` once per bucket length: {length: compiled executable}."""
    return {
        batch["inputs"].shape[1]: fn.lower(*make_args(batch)).compile()
        for batch in batches.example_batches()
    }


def init_train_state(
    config: ml_collections.ConfigDict,
    model: nnx.Module,
    total_steps: int,
    *,
    freeze_embeddings: bool | None = None,
):
    """-> (graphdef, train_state, tx, schedule); train_state is {params, opt_state, progress},
    the items of a checkpoint (`captioning.checkpoint`).

    freeze_embeddings (default: `embeddings_frozen(config.model)`) leaves the embedding matrix
    out of the optimizer's updates.
    """
    graphdef, params = nnx.split(model)
    tx, schedule = create_optimizer(config.train, total_steps)
    if freeze_embeddings is None:
        freeze_embeddings = embeddings_frozen(config.model)
    if freeze_embeddings:
        tx = _freeze_embeddings(tx, params, models.get(config.model.decoder))
    train_state = {
        "params": params,
        "opt_state": tx.init(params),
        "progress": loop.progress_state(0, -np.inf, 0, 0),
    }
    return graphdef, train_state, tx, schedule


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _caption_batches(
    config: ml_collections.ConfigDict,
    data: PreparedData,
    split: str,
    shuffle: bool,
    num_buckets: int | None = None,
) -> input_pipeline.CaptionBatches:
    """The split's bucketed batches (`train.num_buckets` unless given); they carry their feature
    rows unless those are on the device."""
    captions = input_pipeline.build_caption_data(
        data.splits[split],
        data.image_row,
        data.vocab,
        max_len=config.data.max_caption_len,
        min_word_len=config.data.min_word_len,
    )
    concepts = None  # Targets of the auxiliary concept loss: a training-only term.
    if split == "train" and models.concept_outputs(config.model, len(data.vocab)):
        concepts = input_pipeline.concept_targets(
            captions, len(data.features), len(data.vocab), config.model.concept_pairs
        )
    return input_pipeline.CaptionBatches(
        captions,
        batch_size=config.train.batch_size,
        num_buckets=num_buckets or config.train.num_buckets,
        seed=config.seed,
        shuffle=shuffle,
        concepts=concepts,
        features=None if data.residency == "device" else data.features,
    )


def _create_model(config: ml_collections.ConfigDict, data: PreparedData) -> nnx.Module:
    model = models.create_model(
        config.model, len(data.vocab), data.features.shape[1:], rngs=nnx.Rngs(config.seed)
    )
    if config.model.glove_path:
        from captioning.data import embeddings

        matrix, _ = embeddings.load_glove(
            config.model.glove_path, data.vocab, config.model.embed_dim, seed=config.seed
        )
        model.set_word_embeddings(jnp.asarray(matrix))
    return model


@dataclasses.dataclass
class CrossEntropyStats(loop.StepStats):
    """Sums over steps: the loss and its divisor (the word weights' sum), target words, gradient
    norms."""

    loss_sum: float = 0.0
    count: float = 0.0
    targets: float = 0.0
    grad_norm: float = 0.0
    steps: int = 0

    def add(self, stats: Mapping[str, Any]) -> None:
        self.loss_sum += float(stats["loss_sum"])
        self.count += float(stats["count"])
        self.targets += float(stats["targets"])
        self.grad_norm += float(stats["grad_norm"])
        self.steps += 1

    def window(self, seconds: float) -> dict[str, float]:
        return {
            "train_loss": self.loss_sum / max(self.count, 1.0),
            "train_grad_norm": self.grad_norm / max(self.steps, 1),
            # Words, not their weights' sum (`train.word_weights`).
            "train_targets_per_s": self.targets / max(seconds, 1e-9),
        }

    def epoch(self, seconds: float) -> dict[str, float]:
        return {"train_loss": self.loss_sum / max(self.count, 1.0)}


class CrossEntropyPhase(loop.Phase):
    """Teacher-forced training on the captions: one compiled step per length bucket, built
    before step 1, and the validation loss besides the captions' metrics."""

    name = "xe"
    finite = ("loss_sum", "grad_norm")

    def __init__(
        self, config, data: PreparedData, train_batches, graphdef, tx, schedule, params, opt_state
    ):
        self.num_epochs = config.train.num_epochs
        self.patience = config.train.patience
        self.schedule = schedule
        self.train_batches = train_batches
        # One bucket: the validation loss pads a few batches more, and compiles one step, not
        # one per training bucket.
        self.val_batches = _caption_batches(config, data, "val", shuffle=False, num_buckets=1)
        self.steps_per_epoch = self.train_batches.num_batches
        self.mesh = parallel.make_mesh()
        parallel.check_batch_size(config.train.batch_size, self.mesh, "config.train.batch_size")
        # Device residency: the store (as stored, float16 stays float16) on the device(s) for
        # the whole run, steps gather their rows from it. Otherwise the batches bring their rows.
        self.features = None
        if data.residency == "device":
            # From the host array as it is: on a CPU the device array is that memory (no copy).
            self.features = parallel.replicate(data.features, self.mesh)
        self.base_key = jax.random.key(config.seed)
        # Runs written before the field existed weigh every word the same.
        word_weights = losses.word_weights_array(config.train.get("word_weights", ""), data.vocab)
        train_step, eval_step = make_steps(
            graphdef, tx, config.model, stats=data.stats, word_weights=word_weights
        )
        train_step = jax.jit(train_step, donate_argnums=(0, 1))
        eval_step = jax.jit(eval_step)
        params, opt_state = self.place(params), self.place(opt_state)
        compile_start = time.perf_counter()
        self.compiled_train = compile_for_buckets(
            train_step,
            lambda b: (params, opt_state, self.features, self.shard(b), self.base_key, 0),
            self.train_batches,
        )
        self.compiled_eval = compile_for_buckets(
            eval_step, lambda b: (params, self.features, self.shard(b)), self.val_batches
        )
        logging.info(
            "Compiled %d train and %d eval steps in %.1fs (bucket lengths %s).",
            len(self.compiled_train),
            len(self.compiled_eval),
            time.perf_counter() - compile_start,
            self.train_batches.lengths,
        )

    def place(self, tree):
        return parallel.replicate(tree, self.mesh)

    def shard(self, batch):
        return parallel.shard_batch(batch, self.mesh)

    def batches(self, epoch: int):
        return self.train_batches.epoch(epoch)

    def step(self, params, opt_state, batch, step: int):
        return self.compiled_train[batch["inputs"].shape[1]](
            params, opt_state, self.features, self.shard(batch), self.base_key, step
        )

    def new_stats(self) -> CrossEntropyStats:
        return CrossEntropyStats()

    def validation(self, params) -> dict[str, float]:
        loss_sum, count = 0.0, 0.0
        for batch in self.val_batches.epoch(0):
            out = self.compiled_eval[batch["inputs"].shape[1]](
                params, self.features, self.shard(batch)
            )
            loss_sum += float(out["loss_sum"])
            count += float(out["count"])
        return {"eval_loss": loss_sum / max(count, 1.0)}

    def learning_rate(self, step: int) -> float:
        return float(self.schedule(step))


def make_phase(
    config: ml_collections.ConfigDict, data: PreparedData
) -> tuple[CrossEntropyPhase, nnx.GraphDef, dict[str, Any]]:
    """The run's model, optimizer and compiled steps over `data` -> (phase, graphdef, state);
    state is {params, opt_state, progress} (`init_train_state`). What `train_and_evaluate`
    trains, and what the benchmark times."""
    train_batches = _caption_batches(config, data, "train", shuffle=True)
    # Model and optimizer as pure pytrees: nnx.split once, jit pure functions (no graph
    # traversal per step).
    graphdef, state, tx, schedule = init_train_state(
        config, _create_model(config, data), train_batches.num_batches * config.train.num_epochs
    )
    phase = CrossEntropyPhase(
        config, data, train_batches, graphdef, tx, schedule, state["params"], state["opt_state"]
    )
    return phase, graphdef, state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming if the workdir has checkpoints), then scores the best checkpoint.

    Returns the evaluation report of `config.eval.split` (also written to workdir/eval/).
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    loop.check_resumable_config(config, workdir)
    run = RunDir(workdir)
    if evaluate.writes_files():
        run.write_config(config)
    existing_vocab = run.vocab() if run.has(VOCAB_FILE) else None
    data = prepare_data(config, workdir, vocab=existing_vocab)
    if evaluate.writes_files():
        run.write_vocab(data.vocab)
    logging.info(
        "Data: %s; vocabulary %d; features %s from %s.",
        ", ".join(f"{s} {len(records)} images" for s, records in data.splits.items()),
        len(data.vocab),
        data.features.shape,
        data.feature_metadata.get("backbone"),
    )
    phase, graphdef, state = make_phase(config, data)
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    logging.info("Model %s: %d parameters.", config.model.decoder, num_params)
    decoders = {}  # Validation's greedy decoder serves the final evaluation too.
    decode_greedy = evaluate.method_decoder(decoders, graphdef, config.decode, "greedy", data.stats)
    run_ = loop.Run(config, workdir, data, decode_greedy, decoders, phase.place, parallel.local)
    return loop.run(phase, run_, state)
