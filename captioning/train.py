"""Training loop: `train_and_evaluate(config, workdir)` and `evaluate(config, workdir, ...)`.

The loop owns everything stateful: data preparation, the jitted optax step (one compiled
executable per length bucket, built before step 1, so nothing compiles afterwards), per-epoch
validation (loss and a caption metric from greedy decoding), Orbax checkpoints (latest N and the
best by the validation metric), automatic resume, TensorBoard events and log lines with ETA.

Resume is exact: the data order of an epoch depends only on (seed, epoch), dropout keys only on
(seed, step), and checkpoints are written at epoch ends, so a run killed at any point and restarted
with the same command ends with the same parameters as one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers
from flax import nnx

from captioning import decode, input_pipeline, losses, metrics, models, parallel, text
from captioning.datasets.base import SPLITS, DatasetSplits, ImageRecord

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Data preparation
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PreparedData:
    """Everything the loop needs from the data side.

    Attributes:
      splits: records per split (images that failed to load already removed).
      vocab: the vocabulary built on the train captions.
      features: [N, D] or [N, H, W, C] float32 normalized features of every image.
      image_row: image_id -> row of `features`.
      feature_metadata: the feature store's metadata (backbone, weights, image size, ...).
    """

    splits: DatasetSplits
    vocab: text.Vocabulary
    features: np.ndarray
    image_row: dict[str, int]
    feature_metadata: dict[str, Any]


def _dataset_key(config: ml_collections.ConfigDict, splits: DatasetSplits) -> str:
    """Names a dataset by its content (image ids and paths), so caches never mix datasets."""
    digest = hashlib.sha1()
    for split in SPLITS:
        for record in splits.get(split, []):
            digest.update(f"{split}|{record.image_id}|{record.image_path}\n".encode())
    return f"{config.data.dataset}_{digest.hexdigest()[:10]}"


def _write_skipped(workdir: str, skipped: list[tuple[str, str]]) -> None:
    """Logs and records every image left out, so nothing is dropped silently."""
    if not skipped:
        return
    path = os.path.join(workdir, "skipped_images.txt")
    with open(path, "a", encoding="utf-8") as f:
        for image_id, reason in skipped:
            f.write(f"{image_id}\t{reason}\n")
    names = ", ".join(image_id for image_id, _ in skipped[:10])
    logging.warning("Skipped %d images (listed in %s): %s ...", len(skipped), path, names)


def _feature_stats(features: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over the train images (channels = last axis)."""
    train = features[rows].astype(np.float32)
    axes = tuple(range(train.ndim - 1))
    return train.mean(axis=axes), train.std(axis=axes) + 1e-6


def prepare_data(
    config: ml_collections.ConfigDict, workdir: str, *, vocab: text.Vocabulary | None = None
) -> PreparedData:
    """Reads the dataset, exports/loads features, builds (or takes) the vocabulary.

    Features are standardized with train-split statistics (saved in the workdir) because random
    or ImageNet backbones give activations of very different scales.
    """
    from captioning import features as features_lib
    from captioning.datasets import registry

    skipped: list[tuple[str, str]] = []
    splits = registry.load_records(config.data, config.seed, skipped=skipped)
    all_records = [r for split in SPLITS for r in splits.get(split, [])]
    cache_dir = os.path.expanduser(config.data.cache_dir)
    store_dir = features_lib.feature_store_dir(
        cache_dir, _dataset_key(config, splits), config.encoder
    )
    result = features_lib.export_features(
        all_records,
        config.encoder,
        store_dir,
        skip_bad_images=config.data.skip_bad_images,
        seed=config.seed,
    )
    skipped += list(result.skipped)
    _write_skipped(workdir, skipped)
    store = features_lib.load_feature_store(store_dir)
    image_row = {image_id: i for i, image_id in enumerate(store.ids)}
    splits = {
        split: [r for r in records if r.image_id in image_row] for split, records in splits.items()
    }

    if vocab is None:
        tokenized = (
            text.clean_caption(c, config.data.min_word_len)
            for r in splits["train"]
            for c in r.captions
        )
        vocab = text.Vocabulary.build(tokenized, config.data.min_count)

    stats_path = os.path.join(workdir, "feature_stats.npz")
    if os.path.exists(stats_path):
        stats = np.load(stats_path)
        mean, std = stats["mean"], stats["std"]
    else:
        train_rows = np.asarray([image_row[r.image_id] for r in splits["train"]])
        mean, std = _feature_stats(store.features, train_rows)
        np.savez(stats_path, mean=mean, std=std)
    normalized = ((store.features.astype(np.float32) - mean) / std).astype(np.float32)
    return PreparedData(splits, vocab, normalized, image_row, dict(store.metadata))


# --------------------------------------------------------------------------------------------
# Model, optimizer and the jitted steps
# --------------------------------------------------------------------------------------------


def create_optimizer(train_config: ml_collections.ConfigDict, total_steps: int):
    """Adam(W) with linear warm-up, cosine decay to 10 % and global-norm clipping."""
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


def concept_loss(aux: Mapping[str, Array], batch: Mapping[str, Array], model_config) -> Array:
    """Auxiliary multi-label loss: the image embedding predicts its captions' words and pairs.

    Mean sigmoid cross-entropy over concepts and real (non-padding) captions, times
    `config.model.concept_loss`; zero when the decoder has no concept head.
    """
    if "concept_logits" not in aux or "concepts" not in batch:
        return jnp.zeros((), jnp.float32)
    real = (batch["targets"][:, 0] != text.PAD_ID).astype(jnp.float32)  # [B]
    per_caption = optax.sigmoid_binary_cross_entropy(
        aux["concept_logits"].astype(jnp.float32), batch["concepts"].astype(jnp.float32)
    ).mean(axis=-1)
    weight = model_config.get("concept_loss", 0.0)
    return weight * jnp.sum(per_caption * real) / jnp.maximum(jnp.sum(real), 1.0)


def aux_loss(aux: Mapping[str, Array], targets: Array, model_config) -> Array:
    """Extra loss terms a decoder asks for (doubly stochastic attention regularization)."""
    if "attention" not in aux:
        return jnp.zeros((), jnp.float32)
    # Xu et al. 2015, eq. 14: every location should receive ~1 attention over the caption.
    mask = (targets != text.PAD_ID).astype(jnp.float32)[..., None]  # [B, T, 1]
    attention = aux["attention"] * mask  # [B, T, L]
    total = jnp.sum(attention, axis=1)  # [B, L]
    penalty = jnp.sum((1.0 - total) ** 2)  # Summed over captions and locations.
    # Xu et al. add lambda * penalty to each caption's *summed* word NLL; our cross-entropy is a
    # mean per word, so the penalty is divided by the same word count to keep their balance.
    return model_config.get("attention_reg", 0.0) * penalty / jnp.maximum(jnp.sum(mask), 1.0)


def embeddings_frozen(model_config: ml_collections.ConfigDict) -> bool:
    """True when pretrained (GloVe) word vectors are loaded and kept fixed, as the seed does."""
    return bool(model_config.get("glove_path")) and not model_config.get("train_embeddings", True)


def _is_embedding(path) -> bool:
    return any("embed" in str(p) for p in path)


def make_steps(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    model_config,
    *,
    freeze_embeddings: bool | None = None,
):
    """-> (train_step, eval_step), pure functions to be jitted.

    With frozen embeddings (default: `embeddings_frozen(model_config)`) the embedding matrix is
    behind a stop_gradient, so XLA skips its gradient (a scatter-add) and the gradient of the
    embedded words (a [B*T, 4H] x [4H, E] matmul) instead of computing and discarding them.

    train_step(params, opt_state, features, batch, base_key, step)
        -> (params, opt_state, {loss_sum, count, grad_norm})
    eval_step(params, features, batch) -> {loss_sum, count}
    """

    if freeze_embeddings is None:
        freeze_embeddings = embeddings_frozen(model_config)

    def loss_fn(params, features, batch, key, train):
        if freeze_embeddings:
            params = jax.tree_util.tree_map_with_path(
                lambda path, x: jax.lax.stop_gradient(x) if _is_embedding(path) else x, params
            )
        model = nnx.merge(graphdef, params)
        image_features = jnp.take(features, batch["image_index"], axis=0)
        pre_logits, aux = model.pre_logits(image_features, batch["inputs"], train=train, key=key)
        # The output layer and the cross-entropy in one (captioning/losses.py).
        out = model.out_proj
        loss_sum, count = losses.output_cross_entropy(
            pre_logits, out.kernel[...], out.bias[...], batch["targets"], out.dtype
        )
        loss = loss_sum / jnp.maximum(count, 1.0) + aux_loss(aux, batch["targets"], model_config)
        # Only training batches carry concept targets, so this is 0 in eval_step.
        loss = loss + concept_loss(aux, batch, model_config)
        return loss, (loss_sum, count)

    def train_step(params, opt_state, features, batch, base_key, step):
        key = jax.random.fold_in(base_key, step)
        grads, (loss_sum, count) = jax.grad(loss_fn, has_aux=True)(
            params, features, batch, key, True
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        stats = {"loss_sum": loss_sum, "count": count, "grad_norm": optax.global_norm(grads)}
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


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_managers(workdir: str, keep: int) -> tuple[ocp.CheckpointManager, ...]:
    """(latest: keeps the last `keep` epochs, best: keeps the best epoch by the val metric)."""
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    latest = ocp.CheckpointManager(
        os.path.join(root, "latest"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )
    best = ocp.CheckpointManager(
        os.path.join(root, "best"), options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    )
    return latest, best


def restore_train_state(workdir: str, abstract_state: dict, which: str = "best"):
    """Restores the best (falling back to the latest) checkpoint of a run -> (state, step)."""
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    for name in (which, "latest"):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        with ocp.CheckpointManager(path) as manager:
            step = manager.latest_step()
            if step is not None:
                state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
                return state, step
    raise FileNotFoundError(
        f"No checkpoint under {root}: train first with "
        f"`python main.py --config=... --workdir={workdir}`."
    )


def init_train_state(
    config: ml_collections.ConfigDict,
    model: nnx.Module,
    total_steps: int,
    *,
    freeze_embeddings: bool | None = None,
):
    """-> (graphdef, train_state, tx, schedule); train_state is a pytree Orbax can save.

    freeze_embeddings (default: `embeddings_frozen(config.model)`) leaves the embedding matrix
    out of the optimizer's updates.
    """
    graphdef, params = nnx.split(model)
    tx, schedule = create_optimizer(config.train, total_steps)
    if freeze_embeddings is None:
        freeze_embeddings = embeddings_frozen(config.model)
    if freeze_embeddings:
        tx = _freeze_embeddings(tx, params)
    train_state = {
        "params": params,
        "opt_state": tx.init(params),
        "epoch": np.array(0, np.int32),
        "best_metric": np.array(-np.inf, np.float32),
        "epochs_since_best": np.array(0, np.int32),
    }
    return graphdef, train_state, tx, schedule


# --------------------------------------------------------------------------------------------
# Decoding and scoring a split
# --------------------------------------------------------------------------------------------


def decode_split(
    decode_callable: Callable,
    params,
    features: np.ndarray,
    rows: np.ndarray,
    batch_size: int,
    *,
    key: Array | None = None,
) -> decode.DecodeOutput:
    """Decodes the images at `rows` in fixed-size batches (last padded) -> stacked outputs.

    With a `key` (sampling), batch i draws with `fold_in(key, i)`: independent batches,
    reproducible for a fixed key.
    """
    outputs = []
    batches = input_pipeline.padded_image_batches(len(rows), batch_size)
    for i, (batch_rows, valid) in enumerate(batches):
        batch_features = jnp.asarray(features[rows[batch_rows]])
        if key is None:
            out = decode_callable(params, batch_features)
        else:
            out = decode_callable(params, batch_features, jax.random.fold_in(key, i))
        outputs.append(jax.tree.map(lambda x, v=valid: np.asarray(x)[:v], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)


def score_split(
    records: list[ImageRecord],
    captions: list[str],
    *,
    eval_config,
    meteor: bool,
    spice: bool,
) -> dict[str, Any]:
    """pycocoevalcap scores of generated captions against the records' references."""
    references = {r.image_id: list(r.captions) for r in records}
    hypotheses = {r.image_id: c for r, c in zip(records, captions, strict=True)}
    result = metrics.score_captions(
        references, hypotheses, tokenizer=eval_config.tokenizer, meteor=meteor, spice=spice
    )
    return result


def attribute_scores(records: list[ImageRecord], captions: list[str]) -> dict[str, float]:
    """Scenes only: attribute and spatial-relation accuracy of the generated captions."""
    if not records or not records[0].meta or "objects" not in records[0].meta:
        return {}
    from captioning.datasets import scenes

    metas = [r.meta for r in records]
    return {
        "attribute_accuracy": scenes.attribute_accuracy(captions, metas),
        "relation_accuracy": scenes.relation_accuracy(captions, metas),
    }


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _save_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _check_resumable_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses to continue a run whose saved config differs in anything but run length."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    current = json.loads(config.to_json())
    # Fields that only change how long, how loudly or how it is scored, not what is learned.
    ignore = {
        ("train", "num_epochs"),
        ("train", "patience"),
        ("train", "log_every"),
        ("train", "keep_checkpoints"),
        ("data", "cache_dir"),
        ("data", "skip_bad_images"),  # Retrying after a bad image was named.
        ("eval",),
        ("decode",),
    }
    diffs = []
    for section, values in current.items():
        if not isinstance(values, dict):
            if saved.get(section) != values:
                diffs.append(section)
            continue
        for key, value in values.items():
            if (section,) in ignore or (section, key) in ignore:
                continue
            if saved.get(section, {}).get(key) != value:
                diffs.append(f"{section}.{key}")
    if diffs:
        raise ValueError(
            f"{workdir} holds a run with a different config ({', '.join(diffs)} differ from "
            f"{path}). Use a new --workdir, or the same config to resume."
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming if the workdir has checkpoints), then scores the best checkpoint.

    Returns the evaluation report of `config.eval.split` (also written to workdir/eval/).
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    _check_resumable_config(config, workdir)
    _save_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))

    vocab_path = os.path.join(workdir, "vocab.json")
    existing_vocab = text.Vocabulary.load(vocab_path) if os.path.exists(vocab_path) else None
    data = prepare_data(config, workdir, vocab=existing_vocab)
    data.vocab.save(vocab_path)
    logging.info(
        "Data: %s; vocabulary %d; features %s from %s.",
        ", ".join(f"{s} {len(data.splits[s])} images" for s in SPLITS),
        len(data.vocab),
        data.features.shape,
        data.feature_metadata.get("backbone"),
    )

    def batches_of(split: str, shuffle: bool) -> input_pipeline.CaptionBatches:
        captions = input_pipeline.build_caption_data(
            data.splits[split],
            data.image_row,
            data.vocab,
            max_len=config.data.max_caption_len,
            min_word_len=config.data.min_word_len,
        )
        concepts = None  # Targets of the auxiliary concept loss: a training-only term.
        if split == "train" and models.num_concepts(config.model, len(data.vocab)):
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
        )

    train_batches = batches_of("train", shuffle=True)
    val_batches = batches_of("val", shuffle=False)
    steps_per_epoch = train_batches.num_batches
    total_steps = steps_per_epoch * config.train.num_epochs

    # Model and optimizer as pure pytrees: nnx.split once, jit pure functions (no graph
    # traversal per step).
    model = models.create_model(
        config.model, len(data.vocab), data.features.shape[1:], rngs=nnx.Rngs(config.seed)
    )
    if config.model.get("glove_path"):
        from captioning import embeddings

        matrix, _ = embeddings.load_glove(
            config.model.glove_path, data.vocab, config.model.embed_dim, seed=config.seed
        )
        model.embed.embedding[...] = jnp.asarray(matrix)
    graphdef, train_state, tx, schedule = init_train_state(config, model, total_steps)
    num_params = sum(x.size for x in jax.tree.leaves(train_state["params"]))
    logging.info("Model %s: %d parameters.", config.model.decoder, num_params)

    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
    # Kept on the device(s) for the whole run; steps gather their rows from it.
    features = parallel.replicate(jnp.asarray(data.features), mesh)
    base_key = jax.random.key(config.seed)

    latest_mgr, best_mgr = checkpoint_managers(workdir, config.train.keep_checkpoints)
    history_path = os.path.join(workdir, "history.json")
    history: list[dict[str, float]] = []
    if latest_mgr.latest_step() is not None:
        restored_step = latest_mgr.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, train_state)
        train_state = latest_mgr.restore(restored_step, args=ocp.args.StandardRestore(abstract))
        if os.path.exists(history_path):
            with open(history_path, encoding="utf-8") as f:
                history = [h for h in json.load(f) if h["epoch"] <= int(train_state["epoch"])]
        logging.info(
            "Resumed from %s at step %d (epoch %d).", workdir, restored_step, train_state["epoch"]
        )
    params = parallel.replicate(train_state["params"], mesh)
    opt_state = parallel.replicate(train_state["opt_state"], mesh)
    start_epoch = int(train_state["epoch"])
    best_metric = float(train_state["best_metric"])
    epochs_since_best = int(train_state["epochs_since_best"])

    train_step, eval_step = make_steps(graphdef, tx, config.model)
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
    decode_callable = decode.decode_fn(graphdef, _greedy(config.decode))
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
        writer.write_hparams(_flat_hparams(config))

    val_rows = np.asarray([data.image_row[r.image_id] for r in data.splits["val"]], np.int32)
    step = start_epoch * steps_per_epoch
    run_start = time.perf_counter()
    steps_this_run = 0
    # Pending (asynchronous) checkpoint writes finish even when training is interrupted by an
    # exception, so a rerun resumes from the newest finished epoch.
    try:
        for epoch in range(start_epoch, config.train.num_epochs):
            if config.train.patience and epochs_since_best >= config.train.patience:
                logging.info(
                    "Early stop: no better %s for %d epochs.",
                    config.train.val_metric,
                    epochs_since_best,
                )
                break
            epoch_start = time.perf_counter()
            loss_sum = count = 0.0
            window = _new_window()
            pending = (
                None  # Read metrics back one step late, so the host never waits on the device.
            )
            for batch in train_batches.epoch(epoch):
                params, opt_state, stats = compiled_train[batch["inputs"].shape[1]](
                    params, opt_state, features, parallel.shard_batch(batch, mesh), base_key, step
                )
                if pending is not None:
                    _accumulate(window, pending)
                pending = stats
                step += 1
                steps_this_run += 1
                if step % config.train.log_every == 0:
                    _accumulate(window, jax.device_get(pending))
                    pending = None
                    loss_sum += window["loss_sum"]
                    count += window["count"]
                    _log_train(
                        writer,
                        window,
                        step,
                        total_steps,
                        steps_this_run,
                        run_start,
                        float(schedule(step)),
                    )
                    window = _new_window()
            if pending is not None:
                _accumulate(window, jax.device_get(pending))
            loss_sum += window["loss_sum"]
            count += window["count"]

            # ---- validation -----------------------------------------------------------------
            train_seconds = time.perf_counter() - epoch_start
            val_loss_sum = val_count = 0.0
            for batch in val_batches.epoch(0):
                out = compiled_eval[batch["inputs"].shape[1]](
                    params, features, parallel.shard_batch(batch, mesh)
                )
                val_loss_sum += float(out["loss_sum"])
                val_count += float(out["count"])
            decoded = decode_split(
                decode_callable, params, data.features, val_rows, config.decode.batch_size
            )
            val_captions = data.vocab.decode_batch(decoded.tokens)
            scores = score_split(
                data.splits["val"], val_captions, eval_config=config.eval, meteor=False, spice=False
            )
            val_metric = float(scores["scores"][config.train.val_metric])
            epoch_metrics = {
                "train_loss": loss_sum / max(count, 1.0),
                "eval_loss": val_loss_sum / max(val_count, 1.0),
                f"eval_{config.train.val_metric}": val_metric,
                **{
                    f"eval_{k}": v
                    for k, v in attribute_scores(data.splits["val"], val_captions).items()
                },
            }
            writer.write_scalars(step, epoch_metrics)
            improved = val_metric > best_metric
            if improved:
                best_metric, epochs_since_best = val_metric, 0
            else:
                epochs_since_best += 1
            history.append({"epoch": epoch + 1, "step": step, **epoch_metrics})
            _save_json(history_path, history)
            train_state = {
                "params": params,
                "opt_state": opt_state,
                "epoch": np.array(epoch + 1, np.int32),
                "best_metric": np.array(best_metric, np.float32),
                "epochs_since_best": np.array(epochs_since_best, np.int32),
            }
            latest_mgr.save(step, args=ocp.args.StandardSave(train_state))
            if improved:
                best_mgr.save(step, args=ocp.args.StandardSave(train_state))
            epoch_seconds = time.perf_counter() - epoch_start
            logging.info(
                "Epoch %d/%d (step %d) in %.1fs (train %.1fs, validation %.1fs): %s%s",
                epoch + 1,
                config.train.num_epochs,
                step,
                epoch_seconds,
                train_seconds,
                epoch_seconds - train_seconds,
                ", ".join(f"{k} {v:.4f}" for k, v in epoch_metrics.items()),
                " (best)" if improved else "",
            )
    finally:
        latest_mgr.wait_until_finished()
        best_mgr.wait_until_finished()
        latest_mgr.close()
        best_mgr.close()
        writer.flush()

    from captioning import visualize

    visualize.plot_curves(os.path.join(workdir, "curves.png"), history, config.train.val_metric)
    return evaluate(config, workdir, split=config.eval.split, data=data)


def _greedy(decode_config):
    greedy = ml_collections.ConfigDict(decode_config.to_dict())
    greedy.method = "greedy"
    return greedy


def _freeze_embeddings(tx, params):
    """Leaves the (GloVe) embedding matrix untouched by the optimizer."""
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if _is_embedding(path) else "trained", params
    )
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def _new_window() -> dict[str, float]:
    """Sums of the training statistics between two log lines."""
    return {
        "loss_sum": 0.0,
        "count": 0.0,
        "grad_norm": 0.0,
        "steps": 0,
        "time": time.perf_counter(),
    }


def _accumulate(window: dict, stats: Mapping[str, Any]) -> None:
    window["loss_sum"] += float(stats["loss_sum"])
    window["count"] += float(stats["count"])
    window["grad_norm"] += float(stats["grad_norm"])
    window["steps"] += 1


def _log_train(writer, window, step, total_steps, steps_this_run, run_start, learning_rate):
    elapsed = time.perf_counter() - window["time"]
    since_start = time.perf_counter() - run_start
    eta = since_start / max(steps_this_run, 1) * (total_steps - step)
    writer.write_scalars(
        step,
        {
            "train_loss": window["loss_sum"] / max(window["count"], 1.0),
            "train_grad_norm": window["grad_norm"] / max(window["steps"], 1),
            "train_targets_per_s": window["count"] / max(elapsed, 1e-9),
            "train_learning_rate": learning_rate,
        },
    )
    logging.info(
        "step %d/%d  loss %.4f  %.0f targets/s  ETA %s",
        step,
        total_steps,
        window["loss_sum"] / max(window["count"], 1.0),
        window["count"] / max(elapsed, 1e-9),
        _format_seconds(eta),
    )


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = {}
    for section, values in config.to_dict().items():
        if isinstance(values, dict):
            flat.update(
                {
                    f"{section}.{k}": v
                    for k, v in values.items()
                    if isinstance(v, int | float | str | bool)
                }
            )
        else:
            flat[section] = values
    return flat


# --------------------------------------------------------------------------------------------
# Evaluation of a finished (or running) run
# --------------------------------------------------------------------------------------------


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run was trained with (workdir/config.json)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: --workdir must be a run directory written by training."
        )
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def build_inference(config, workdir, vocab_size: int, feature_shape, which: str = "best"):
    """-> (graphdef, params, step) restored from the run's best checkpoint."""
    model = models.create_model(config.model, vocab_size, feature_shape, rngs=nnx.Rngs(0))
    graphdef, train_state, _, _ = init_train_state(config, model, total_steps=2)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, train_state)
    train_state, step = restore_train_state(workdir, abstract, which)
    return graphdef, train_state["params"], step


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    split: str = "test",
    data: PreparedData | None = None,
) -> dict[str, Any]:
    """Decodes `split` with the best checkpoint and `config.decode`, scores it, writes reports.

    Writes workdir/eval/<split>_<method>.json (metrics, per-image scores, decoding settings, step,
    captions), appends a row to workdir/results.md and draws workdir/samples.png.
    """
    workdir = os.path.abspath(workdir)
    vocab = text.Vocabulary.load(os.path.join(workdir, "vocab.json"))
    if data is None:
        data = prepare_data(config, workdir, vocab=vocab)
    if split not in data.splits or not data.splits[split]:
        raise ValueError(f"Split {split!r} has no images; use one of {list(SPLITS)}.")
    graphdef, params, step = build_inference(config, workdir, len(vocab), data.features.shape[1:])
    records = data.splits[split]
    rows = np.asarray([data.image_row[r.image_id] for r in records], np.int32)
    method = config.decode.method
    start = time.perf_counter()
    sample_key = jax.random.key(config.decode.get("seed", 0)) if method == "sample" else None
    decoded = decode_split(
        decode.decode_fn(graphdef, config.decode),
        params,
        data.features,
        rows,
        config.decode.batch_size,
        key=sample_key,
    )
    decode_seconds = time.perf_counter() - start
    captions = vocab.decode_batch(decoded.tokens)
    scored = score_split(
        records,
        captions,
        eval_config=config.eval,
        meteor=config.eval.meteor,
        spice=config.eval.spice,
    )
    report = {
        "split": split,
        "step": int(step),
        "decode": config.decode.to_dict(),
        "tokenizer": scored.get("tokenizer", config.eval.tokenizer),
        "metrics": {**scored["scores"], **attribute_scores(records, captions)},
        "skipped_metrics": scored.get("skipped", {}),
        "decode_seconds": decode_seconds,
        "captions": [
            {
                "image_id": r.image_id,
                "caption": c,
                "references": list(r.captions),
                "scores": scored["per_image"].get(r.image_id, {}),
            }
            for r, c in zip(records, captions, strict=True)
        ],
    }
    eval_dir = os.path.join(workdir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    _save_json(os.path.join(eval_dir, f"{split}_{method}.json"), report)
    row = {
        "method": method,
        "beam_size": config.decode.beam_size if method == "beam" else 1,
        "split": split,
        "step": int(step),
        **report["metrics"],
    }
    columns = [
        "method",
        "beam_size",
        "split",
        "step",
        *metrics.METRIC_NAMES,
        *(k for k in ("attribute_accuracy", "relation_accuracy") if k in row),
    ]
    metrics.append_results_row(os.path.join(workdir, "results.md"), row, columns)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items())
    logging.info("Evaluated %s (%s, step %d): %s", split, method, step, shown)

    from captioning import visualize

    # samples.png: greedy and beam side by side (plus the evaluated method) and a reference.
    shown = records[: config.eval.num_samples]
    shown_captions = {method: captions[: len(shown)]}
    for other in ("greedy", "beam"):
        if other != method and shown:
            other_config = ml_collections.ConfigDict(config.decode.to_dict())
            other_config.method = other
            out = decode_split(
                decode.decode_fn(graphdef, other_config),
                params,
                data.features,
                rows[: len(shown)],
                len(shown),
            )
            shown_captions[other] = vocab.decode_batch(out.tokens)
    if "beam" in shown_captions:
        shown_captions = {
            f"beam{config.decode.beam_size}" if k == "beam" else k: v
            for k, v in shown_captions.items()
        }
    visualize.save_samples(
        os.path.join(workdir, "samples.png"),
        [r.image_path for r in shown],
        shown_captions,
        [" | ".join(r.captions) for r in shown],  # Every reference, as annotators wrote them.
    )
    if config.eval.get("attention_maps", False) and decoded.attention.shape[-1] > 0:
        visualize.save_attention_maps(
            os.path.join(workdir, "attention", f"{split}_{method}"),
            [r.image_path for r in shown],
            decoded.tokens[: len(shown)],
            decoded.attention[: len(shown)],
            vocab.itos,
            data.features.shape[1:3],
            names=[f"{r.image_id}.png" for r in shown],
        )
    return report
