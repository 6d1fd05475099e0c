"""Scoring: the per-epoch validation of training, and `evaluate` of a run's best checkpoint.

    report = evaluate(config, workdir, split="test")   # writes eval/<split>_<method>.json, ...

Everything here needs only the run directory (`captioning.run_dir.RunDir`: config, vocabulary,
feature statistics and the `params` item of a checkpoint): no optimizer is built to score or
caption. Which metrics are computed, logged and tabulated is `captioning.evaluation.metrics`'s
registry (with the dataset's own caption scores).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from captioning.data.prepare import PreparedData, prepare_data
from captioning.decoding import decode
from captioning.evaluation import metrics
from captioning.evaluation.novelty import Novelty
from captioning.run_dir import Inference, RunDir

_TERM = re.compile(r"^\s*(?:([0-9.eE+-]+)\s*\*\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*$")


def parse_selection(spec: str, field: str = "train.val_metric") -> list[tuple[float, str]]:
    """`train.val_metric` (or another config `field` of that form) -> [(weight, metric name)].

    A metric name ("CIDEr"), or a weighted sum such as
    "attribute_accuracy + relation_accuracy + 0.1*CIDEr"; raises ValueError naming the field.
    """
    terms = []
    for part in spec.split("+") if spec.strip() else []:
        match = _TERM.match(part)
        if not match:
            raise ValueError(
                f"config.{field}={spec!r}: cannot read {part.strip()!r}; write a metric "
                "name or a sum of [weight*]name terms, e.g. 'attribute_accuracy+0.1*CIDEr'."
            )
        terms.append((float(match.group(1) or 1.0), match.group(2)))
    if not terms:
        raise ValueError(f"config.{field} is empty; name a metric, e.g. CIDEr.")
    return terms


def selection_value(terms: list[tuple[float, str]], scores: dict[str, float]) -> float:
    """The weighted sum of validation `scores` that `parse_selection` describes."""
    missing = [name for _, name in terms if name not in scores]
    if missing:
        raise ValueError(
            f"config.train.val_metric names {missing}, which validation does not compute; "
            f"use any of {sorted(scores)}."
        )
    return float(sum(weight * scores[name] for weight, name in terms))


def writes_files() -> bool:
    """Whether this process writes the run's files: with several processes, only the first."""
    return jax.process_index() == 0


def validate(
    decode_greedy: decode.DecodeFn, params: Any, data: PreparedData, config
) -> dict[str, float]:
    """Greedy captions of the val split -> every metric marked for validation (`metrics.Metric`:
    those of pycocoevalcap that need no Java, and the dataset's own scores)."""
    decoded = decode.decode_split(
        decode_greedy,
        params,
        data.features,
        rows=data.rows("val"),
        batch_size=config.decode.batch_size,
    )
    captions = data.vocab.decode_batch(decoded.tokens)
    split = metrics.SplitCaptions(
        data.splits["val"], captions, tokenizer=config.eval.tokenizer, meteor=False, spice=False
    )
    return metrics.score(split, config.data.dataset, validation=True)


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    split: str = "test",
    data: PreparedData | None = None,
    inference: Inference | None = None,
    decoders: dict[str, decode.DecodeFn] | None = None,
) -> dict[str, Any]:
    """Decodes `split` with the best checkpoint and `config.decode`, scores it, writes reports.

    Writes workdir/eval/<split>_<report_name>.json (metrics, per-image scores, decoding settings,
    step, captions, the share of images flagged unlike the training images: `novelty`), appends
    a row to workdir/results.md and draws workdir/samples.png. Several splits share one restored
    `inference` and the jitted `decoders` ({method: fn}, filled as needed) so the second split
    compiles nothing.
    """
    run = RunDir(workdir)
    workdir = run.path
    vocab = run.vocab()
    if data is None:
        data = prepare_data(config, workdir, vocab=vocab)
    if split not in data.splits or not data.splits[split]:
        present = [s for s, records in data.splits.items() if records]
        raise ValueError(f"Split {split!r} has no images; use one of {present}.")
    if inference is None:
        inference = run.restore(
            config.model, len(vocab), data.features.shape[1:], config.eval.get("checkpoint", "best")
        )
    graphdef, params, step, progress = inference
    decoders = {} if decoders is None else decoders
    records = data.splits[split]
    rows = data.rows(split)
    method = config.decode.method
    start = time.perf_counter()
    decoded = decode.decode_split(
        method_decoder(decoders, graphdef, config.decode, method, data.stats),
        params,
        data.features,
        rows=rows,
        batch_size=config.decode.batch_size,
        seed=config.decode.seed,
    )
    decode_seconds = time.perf_counter() - start
    captions = vocab.decode_batch(decoded.tokens)
    split_captions = metrics.SplitCaptions(
        records,
        captions,
        tokenizer=config.eval.tokenizer,
        meteor=config.eval.meteor,
        spice=config.eval.spice,
    )
    scores = metrics.score(split_captions, config.data.dataset)
    scored = split_captions.pycocoevalcap  # Per-image scores and skipped metrics.
    distance = Novelty.for_data(workdir, data, write=writes_files())
    distances = distance.score_rows(data.features, rows)
    novelty = distance.describe(distances)
    report = {
        "split": split,
        "step": int(step),
        # Which checkpoint: the epoch that `train.val_metric` chose, and its validation value.
        "checkpoint": {
            "epoch": progress.get("best_epoch"),
            "selected_by": config.train.val_metric,
            "value": progress.get("best_metric"),
        },
        "decode": config.decode.to_dict(),
        "tokenizer": scored.get("tokenizer", config.eval.tokenizer),
        "metrics": scores,
        "skipped_metrics": scored.get("skipped", {}),
        "decode_seconds": decode_seconds,
        # Images farther from the training images than the validation split's 99th percentile.
        "novelty": {
            "flagged_share": float(distance.flagged(distances).mean()),
            "threshold": distance.threshold,
        },
        "captions": [
            {
                "image_id": r.image_id,
                "caption": c,
                "references": list(r.captions),
                "scores": scored["per_image"].get(r.image_id, {}),
                "novelty": n,
            }
            for r, c, n in zip(records, captions, novelty, strict=True)
        ],
    }
    if not writes_files():  # Every process decodes alike; the first one reports.
        return report
    name = report_name(config.decode)
    run.write_json(os.path.join("eval", f"{split}_{name}.json"), report)
    row = {
        "training": "scst" if config.scst.init_from else "xe",
        "method": name,
        "beam_size": config.decode.beam_size if method == "beam" else 1,
        "split": split,
        "step": int(step),
        **report["metrics"],
    }
    columns = ["training", "method", "beam_size", "split", "step"]
    run.append_results_row(row, columns + metrics.columns(config.data.dataset))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items())
    logging.info(
        "Evaluated %s (%s, step %d, epoch %s chosen by %s = %s): %s; %.1f %% of its images "
        "unlike the training images (beyond the validation split's 99th percentile)",
        split,
        name,
        step,
        progress.get("best_epoch"),
        config.train.val_metric,
        progress.get("best_metric"),
        shown,
        100 * report["novelty"]["flagged_share"],
    )
    _draw_samples(
        config, workdir, split, data, records, rows, captions, decoded, inference, decoders
    )
    return report


def report_name(decode_config) -> str:
    """The stem of a decoding's report files: `decode.method`, plus '_unblocked' when
    `decode.block_repeats` (the default) is off (so the two never overwrite each other)."""
    return decode_config.method + ("" if decode_config.block_repeats else "_unblocked")


def method_decoder(decoders: dict, graphdef, decode_config, method: str, stats) -> decode.DecodeFn:
    """The jitted decoder of `method` with `decode_config`'s other settings, made once and kept
    in `decoders` ({method: fn}) for every later split, validation or figure that asks for it."""
    if method not in decoders:
        settings = ml_collections.ConfigDict({**decode_config.to_dict(), "method": method})
        decoders[method] = decode.decode_fn(graphdef, settings, stats)
    return decoders[method]


def _draw_samples(
    config, workdir, split, data, records, rows, captions, decoded, inference, decoders
):
    """samples.png: the first `eval.num_samples` images with their greedy and beam captions (plus
    the evaluated method's) beside every reference; attention maps when asked for."""
    from captioning.evaluation import visualize

    method = config.decode.method
    shown = records[: config.eval.num_samples]
    shown_captions = {method: captions[: len(shown)]}
    for other in ("greedy", "beam"):
        if other != method and shown:
            out = decode.decode_split(
                method_decoder(decoders, inference.graphdef, config.decode, other, data.stats),
                inference.params,
                data.features,
                rows=rows[: len(shown)],
                batch_size=len(shown),
            )
            shown_captions[other] = data.vocab.decode_batch(out.tokens)
    if "beam" in shown_captions:
        shown_captions = {
            f"beam{config.decode.beam_size}" if k == "beam" else k: v
            for k, v in shown_captions.items()
        }
    name = "samples.png" if split == config.eval.split else f"samples_{split}.png"
    visualize.save_samples(
        os.path.join(workdir, name),
        [r.image_path for r in shown],
        shown_captions,
        [" | ".join(r.captions) for r in shown],  # Every reference, as annotators wrote them.
    )
    if config.eval.attention_maps and decoded.attention.shape[-1] > 0:
        visualize.save_attention_maps(
            os.path.join(workdir, "attention", f"{split}_{report_name(config.decode)}"),
            [r.image_path for r in shown],
            decoded.tokens[: len(shown)],
            decoded.attention[: len(shown)],
            data.vocab.itos,
            data.features.shape[1:3],
            names=[f"{r.image_id}.png" for r in shown],
        )
