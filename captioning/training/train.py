"""Training loop: `train_and_evaluate(config, workdir)`.

The loop owns everything stateful about training: the optimizer, the jitted optax step (one compiled
executable per length bucket, built before step 1, so nothing compiles afterwards), per-epoch
validation (loss and greedy-decoded metrics, `captioning.evaluation.evaluate.validate`), Orbax
checkpoints (latest N and the best by the validation metric), automatic resume, TensorBoard events
and progress lines with ETA (clu). Data comes from `captioning.data.prepare.prepare_data`; the final
scoring is `captioning.evaluation.evaluate.evaluate`.

Resume is exact: the data order of an epoch depends only on (seed, epoch), dropout keys only on
(seed, step), and checkpoints are written at epoch ends, so a run killed at any point and restarted
with the same command ends with the same parameters as one that was never interrupted.
"""

from __future__ import annotations

import json
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
from clu import metric_writers, periodic_actions
from flax import nnx, traverse_util

from captioning import checkpoint, models, parallel
from captioning.data import input_pipeline, text
from captioning.data.prepare import PreparedData, prepare_data
from captioning.evaluation import evaluate, metrics
from captioning.run_dir import CONFIG_FILE, VOCAB_FILE, RunDir
from captioning.training import losses

Array = jax.Array

# Fields that only change how long, how loudly or how a run is scored, not what it learns: a
# rerun may change them and still resume.
HISTORY_FILE = "history.json"
RESUMABLE_CHANGES = {
    ("train", "num_epochs"),
    ("train", "patience"),
    ("train", "log_every"),
    ("train", "keep_checkpoints"),
    ("data", "cache_dir"),
    ("data", "skip_bad_images"),  # Retrying after a bad image was named.
    ("eval",),
    ("decode",),
}


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


def progress_state(
    epoch: int, best_metric: float, best_epoch: int, epochs_since_best: int
) -> dict[str, Any]:
    """The checkpoint's `progress` item: what a rerun needs besides parameters and optimizer
    (epochs done, the best validation value so far, the epoch that reached it, and the epochs
    since, for early stopping)."""
    return {
        "epoch": np.array(epoch, np.int32),
        "best_metric": np.array(best_metric, np.float32),
        "best_epoch": np.array(best_epoch, np.int32),
        "epochs_since_best": np.array(epochs_since_best, np.int32),
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
        "progress": progress_state(0, -np.inf, 0, 0),
    }
    return graphdef, train_state, tx, schedule


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def check_resumable_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses to continue a run whose saved config differs in anything but run length."""
    run = RunDir(workdir)
    saved = run.saved_config()
    if saved is None:
        return
    saved = traverse_util.flatten_dict(saved)
    current = traverse_util.flatten_dict(json.loads(config.to_json()))
    diffs = [
        ".".join(key)
        for key in sorted(current)
        if key[:1] not in RESUMABLE_CHANGES
        and key[:2] not in RESUMABLE_CHANGES
        and saved.get(key) != current.get(key)
    ]
    if diffs:
        raise ValueError(
            f"{workdir} holds a run with a different config ({', '.join(diffs)} differ from "
            f"{run.file(CONFIG_FILE)}). Use a new --workdir, or the same config to resume."
        )


def _caption_batches(
    config: ml_collections.ConfigDict, data: PreparedData, split: str, shuffle: bool
) -> input_pipeline.CaptionBatches:
    """The split's bucketed batches; they carry their feature rows unless those are on the
    device."""
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
        num_buckets=config.train.num_buckets,
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


def _hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {k: v for k, v in flat.items() if isinstance(v, int | float | str | bool)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming if the workdir has checkpoints), then scores the best checkpoint.

    Returns the evaluation report of `config.eval.split` (also written to workdir/eval/).
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    check_resumable_config(config, workdir)
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
    train_batches = _caption_batches(config, data, "train", shuffle=True)
    val_batches = _caption_batches(config, data, "val", shuffle=False)
    steps_per_epoch = train_batches.num_batches
    total_steps = steps_per_epoch * config.train.num_epochs

    # Model and optimizer as pure pytrees: nnx.split once, jit pure functions (no graph
    # traversal per step).
    graphdef, train_state, tx, schedule = init_train_state(
        config, _create_model(config, data), total_steps
    )
    num_params = sum(x.size for x in jax.tree.leaves(train_state["params"]))
    logging.info("Model %s: %d parameters.", config.model.decoder, num_params)

    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
    # Device residency: the store (as stored, float16 stays float16) on the device(s) for the
    # whole run, steps gather their rows from it. Otherwise the batches bring their rows.
    features = None
    if data.residency == "device":
        # From the host array as it is: on a CPU the device array is that memory (no copy).
        features = parallel.replicate(data.features, mesh)
    base_key = jax.random.key(config.seed)

    latest_mgr, best_mgr = checkpoint.managers(workdir, config.train.keep_checkpoints)
    train_state, history = resume(latest_mgr, train_state, workdir)
    params = parallel.replicate(train_state["params"], mesh)
    opt_state = parallel.replicate(train_state["opt_state"], mesh)
    progress = train_state["progress"]
    start_epoch = int(progress["epoch"])
    best_metric = float(progress["best_metric"])
    best_epoch = int(progress["best_epoch"])
    epochs_since_best = int(progress["epochs_since_best"])

    # Runs written before the field existed weigh every word the same.
    word_weights = losses.word_weights_array(config.train.get("word_weights", ""), data.vocab)
    train_step, eval_step = make_steps(
        graphdef, tx, config.model, stats=data.stats, word_weights=word_weights
    )
    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    eval_step = jax.jit(eval_step)
    compile_start = time.perf_counter()
    compiled_train = compile_for_buckets(
        train_step,
        lambda b: (params, opt_state, features, parallel.shard_batch(b, mesh), base_key, 0),
        train_batches,
    )
    compiled_eval = compile_for_buckets(
        eval_step, lambda b: (params, features, parallel.shard_batch(b, mesh)), val_batches
    )
    decoders = {}  # Validation's greedy decoder serves the final evaluation too.
    decode_greedy = evaluate.method_decoder(decoders, graphdef, config.decode, "greedy", data.stats)
    logging.info(
        "Compiled %d train and %d eval steps in %.1fs (bucket lengths %s).",
        len(compiled_train),
        len(compiled_eval),
        time.perf_counter() - compile_start,
        train_batches.lengths,
    )

    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=False
    )
    if start_epoch == 0:
        writer.write_hparams(_hparams(config))
    # Logs steps/s, percent done and ETA every `log_every` steps.
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, every_steps=config.train.log_every, every_secs=None
    )
    val_metric_name = config.train.val_metric
    selection = evaluate.parse_selection(val_metric_name)  # Bad syntax fails before training.
    step = start_epoch * steps_per_epoch
    # Pending (asynchronous) checkpoint writes finish even when training is interrupted by an
    # exception, so a rerun resumes from the newest finished epoch.
    try:
        for epoch in range(start_epoch, config.train.num_epochs):
            if config.train.patience and epochs_since_best >= config.train.patience:
                logging.info(
                    "Early stop: no better %s for %d epochs.", val_metric_name, epochs_since_best
                )
                break
            epoch_start = time.perf_counter()
            epoch_sums = np.zeros(2)  # loss_sum, count
            window = np.zeros(5)  # loss_sum, count, targets, grad_norm, steps since the last log
            window_start = time.perf_counter()
            pending = None  # Metrics are read back one step late: the host never waits.
            for batch in train_batches.epoch(epoch):
                params, opt_state, stats = compiled_train[batch["inputs"].shape[1]](
                    params, opt_state, features, parallel.shard_batch(batch, mesh), base_key, step
                )
                if pending is not None:
                    window += _window_row(pending)
                pending = stats
                step += 1
                report_progress(step)
                if step % config.train.log_every == 0:
                    window += _window_row(jax.device_get(pending))
                    pending = None
                    epoch_sums += window[:2]
                    _write_train_scalars(writer, step, window, window_start, schedule(step))
                    window, window_start = np.zeros(5), time.perf_counter()
            if pending is not None:
                window += _window_row(jax.device_get(pending))
            epoch_sums += window[:2]

            # ---- validation -----------------------------------------------------------------
            train_seconds = time.perf_counter() - epoch_start
            val_sums = np.zeros(2)
            for batch in val_batches.epoch(0):
                out = compiled_eval[batch["inputs"].shape[1]](
                    params, features, parallel.shard_batch(batch, mesh)
                )
                val_sums += (float(out["loss_sum"]), float(out["count"]))
            # Each process decodes the validation images with its own copy of the parameters.
            scores = evaluate.validate(decode_greedy, parallel.local(params), data, config)
            val_metric = evaluate.selection_value(selection, scores)
            epoch_metrics = {
                "train_loss": epoch_sums[0] / max(epoch_sums[1], 1.0),
                "eval_loss": val_sums[0] / max(val_sums[1], 1.0),
                **{f"eval_{k}": v for k, v in metrics.logged(scores, config.data.dataset).items()},
                "eval_selection": val_metric,
            }
            improved = val_metric > best_metric
            if improved:
                best_metric, best_epoch, epochs_since_best = val_metric, epoch + 1, 0
            else:
                epochs_since_best += 1
            progress = progress_state(epoch + 1, best_metric, best_epoch, epochs_since_best)
            end_epoch(
                writer,
                (latest_mgr, best_mgr),
                history,
                workdir,
                step,
                (epoch + 1, config.train.num_epochs),
                epoch_metrics,
                {"params": params, "opt_state": opt_state, "progress": progress},
                improved,
                (time.perf_counter() - epoch_start, train_seconds),
            )
    finally:
        close(writer, latest_mgr, best_mgr)
    return finish(config, workdir, data, history, ("eval_selection",), decoders)


# --------------------------------------------------------------------------------------------
# What every training phase (cross-entropy, SCST) does around its steps
# --------------------------------------------------------------------------------------------


def resume(latest_mgr, state: dict[str, Any], workdir: str) -> tuple[dict[str, Any], list[dict]]:
    """-> (state restored from the newest checkpoint, or as given when there is none; the
    history of the epochs it holds)."""
    step = latest_mgr.latest_step()
    if step is None:
        return state, []
    state = checkpoint.restore(latest_mgr, step, **state)
    epoch = int(state["progress"]["epoch"])
    history = []
    path = os.path.join(workdir, HISTORY_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            history = [h for h in json.load(f) if h["epoch"] <= epoch]
    logging.info("Resumed from %s at step %d (epoch %d).", workdir, step, epoch)
    return state, history


def end_epoch(
    writer,
    managers,
    history: list[dict],
    workdir: str,
    step: int,
    epochs: tuple[int, int],
    epoch_metrics: dict[str, float],
    state: dict[str, Any],
    improved: bool,
    seconds: tuple[float, float],
) -> None:
    """Writes an epoch's metrics (TensorBoard, history.json, log line) and its checkpoints:
    latest always, best when `improved`. epochs: (done, total); seconds: (epoch, training)."""
    writer.write_scalars(step, epoch_metrics)
    history.append({"epoch": epochs[0], "step": step, **epoch_metrics})
    if evaluate.writes_files():
        RunDir(workdir).write_json(HISTORY_FILE, history)
    latest_mgr, best_mgr = managers
    checkpoint.save(latest_mgr, step, **state)
    if improved:
        checkpoint.save(best_mgr, step, **state)
    logging.info(
        "Epoch %d/%d (step %d) in %.1fs (train %.1fs, validation %.1fs): %s%s",
        *epochs,
        step,
        seconds[0],
        seconds[1],
        seconds[0] - seconds[1],
        ", ".join(f"{k} {v:.4f}" for k, v in epoch_metrics.items()),
        " (best)" if improved else "",
    )


def close(writer, *managers) -> None:
    """Finishes pending (asynchronous) checkpoint writes and events, also after an exception,
    so a rerun resumes from the newest finished epoch."""
    for manager in managers:
        manager.wait_until_finished()
        manager.close()
    writer.flush()


def finish(
    config, workdir: str, data: PreparedData, history, curves, decoders: dict | None = None
) -> dict[str, Any]:
    """curves.png of the `curves` history keys, then the best checkpoint scored on `eval.split`
    (the returned report) and on every split of `eval.extra_splits` the data has, with the
    jitted `decoders` ({method: fn}) the run has already compiled."""
    from captioning.evaluation import visualize

    if config.eval.meteor:  # Its JVM starts up on the other core while the split decodes.
        metrics.start_meteor()
    if evaluate.writes_files():
        visualize.plot_curves(os.path.join(workdir, "curves.png"), history, curves)
    inference = RunDir(workdir).restore(config.model, len(data.vocab), data.features.shape[1:])
    shared = {"data": data, "inference": inference, "decoders": decoders or {}}
    report = evaluate.evaluate(config, workdir, split=config.eval.split, **shared)
    for split in filter(None, (s.strip() for s in config.eval.extra_splits.split(","))):
        if data.splits.get(split) and split != config.eval.split:
            evaluate.evaluate(config, workdir, split=split, **shared)
    return report


def _window_row(stats: Mapping[str, Any]) -> np.ndarray:
    """One step's statistics as a log-window row: (loss_sum, count, targets, grad_norm, 1)."""
    keys = ("loss_sum", "count", "targets", "grad_norm")
    return np.array([float(stats[k]) for k in keys] + [1.0])


def _write_train_scalars(writer, step: int, window: np.ndarray, since: float, lr) -> None:
    loss_sum, count, targets, grad_norm, steps = window
    writer.write_scalars(
        step,
        {
            "train_loss": loss_sum / max(count, 1.0),
            "train_grad_norm": grad_norm / max(steps, 1),
            # Words, not their weights' sum (`train.word_weights`).
            "train_targets_per_s": targets / max(time.perf_counter() - since, 1e-9),
            "train_learning_rate": float(lr),
        },
    )
