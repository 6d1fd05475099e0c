"""Data preparation, once per run: records, feature store, vocabulary and feature statistics.

    data = prepare_data(config, workdir)   # PreparedData: splits, vocab, features, stats, ...

The dataset reader (`captioning.data.datasets`) gives the records of every split; the feature
store (`captioning.data.feature_store`) is exported if missing, then opened; the vocabulary is
built on the train captions (or taken from the run). Features are standardised per channel with
train-split statistics (`FeatureStats`, saved as `workdir/feature_stats.npz`), because random or
ImageNet backbones give activations of very different scales. The store's rows stay as they are
stored (float16 stays float16); the statistics are applied to each batch on the device, by the
train step and the decoder, so no float32 copy of the store is ever made.

Where the rows live (`data.feature_residency`): `device` (one array on the accelerator; the step
gathers its rows), `host` (in RAM; each batch's rows are gathered by the input pipeline's
background thread and sent with the batch) or `disk` (each batch's rows read from the shards by
parallel `pread`s, on the same thread). `auto` picks by the store's size: device below a quarter
of the device's memory (RAM on a CPU), host below half of the RAM, else disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from captioning.data import feature_store, text
from captioning.data.datasets import registry
from captioning.data.datasets.base import DatasetSplits

STATS_FILE = "feature_stats.npz"
SKIPPED_FILE = "skipped_images.txt"
RESIDENCIES = ("auto", "device", "host", "disk")
_STATS_CHUNK = 512  # Images per chunk of the statistics pass (bounded memory on large stores).


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Per-channel mean and std [C] float32 of the train features (channels = last axis)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def compute(cls, features, rows: np.ndarray) -> FeatureStats:
        """Statistics over `features[rows]` ([N, ..., C]), all axes but the last, accumulated
        in float64 over chunks of rows, so a store larger than memory needs one pass and no copy."""
        total = np.zeros(features.shape[-1], np.float64)
        squares = np.zeros_like(total)
        count = 0
        for start in range(0, len(rows), _STATS_CHUNK):
            chunk = np.asarray(features[np.sort(rows[start : start + _STATS_CHUNK])], np.float64)
            chunk = chunk.reshape(-1, chunk.shape[-1])
            total += chunk.sum(axis=0)
            squares += np.square(chunk).sum(axis=0)
            count += len(chunk)
        mean = total / max(count, 1)
        std = np.sqrt(np.maximum(squares / max(count, 1) - np.square(mean), 0.0))
        return cls(mean.astype(np.float32), (std + 1e-6).astype(np.float32))

    @classmethod
    def load(cls, workdir: str) -> FeatureStats:
        path = os.path.join(workdir, STATS_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found: --workdir must be a run directory written by training."
            )
        with np.load(path) as stats:
            return cls(stats["mean"].astype(np.float32), stats["std"].astype(np.float32))

    def save(self, workdir: str) -> None:
        np.savez(os.path.join(workdir, STATS_FILE), mean=self.mean, std=self.std)

    def apply(self, features):
        """[..., C] raw features (numpy or jax) -> standardised float32, same shape."""
        return (features.astype(np.float32) - self.mean) / self.std


@dataclasses.dataclass
class PreparedData:
    """Everything training and evaluation need from the data side.

    Attributes:
      splits: records per split (images that failed to load already removed).
      vocab: the vocabulary built on the train captions.
      features: [N, D] or [N, H, W, C] features of every image as stored (float16 or float32,
        not standardised): an array in RAM, or `feature_store.MappedFeatures` (disk residency).
      stats: the standardisation to apply to rows of `features`.
      image_row: image_id -> row of `features`.
      feature_metadata: the feature store's metadata (backbone, weights, image size, ...).
      residency: where the rows live while training: device, host or disk.
    """

    splits: DatasetSplits
    vocab: text.Vocabulary
    features: Any
    stats: FeatureStats
    image_row: dict[str, int]
    feature_metadata: dict[str, Any]
    residency: str = "device"

    def rows(self, split: str) -> np.ndarray:
        """[n] int32 feature rows of the split's images, in record order."""
        return np.asarray([self.image_row[r.image_id] for r in self.splits[split]], np.int32)


def dataset_key(config: ml_collections.ConfigDict, splits: DatasetSplits) -> str:
    """Names a dataset by its content (image ids and paths), so caches never mix datasets."""
    digest = hashlib.sha1()
    for split, records in splits.items():
        for record in records:
            digest.update(f"{split}|{record.image_id}|{record.image_path}\n".encode())
    return f"{config.data.dataset}_{digest.hexdigest()[:10]}"


def _write_skipped(workdir: str, skipped: list[tuple[str, str]]) -> None:
    """Logs and records every image left out, so nothing is dropped silently."""
    if not skipped:
        return
    path = os.path.join(workdir, SKIPPED_FILE)
    with open(path, "a", encoding="utf-8") as f:
        for image_id, reason in skipped:
            f.write(f"{image_id}\t{reason}\n")
    names = ", ".join(image_id for image_id, _ in skipped[:10])
    logging.warning("Skipped %d images (listed in %s): %s ...", len(skipped), path, names)


def export_store(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[DatasetSplits, feature_store.ExportResult]:
    """Reads the dataset's records and exports (or finds) its feature store -> (splits, result).

    Unreadable images skipped with `data.skip_bad_images` are listed in workdir/skipped_images.txt.
    """
    barrier = lambda name: None
    if jax.process_count() > 1:  # Every host exports its share of the shards.
        from jax.experimental import multihost_utils

        barrier = multihost_utils.sync_global_devices
    first = jax.process_index() == 0
    if not first:
        barrier("dataset read")  # Process 0 renders or extracts what the others then read.
    skipped: list[tuple[str, str]] = []
    splits = registry.load_records(config.data, config.seed, skipped=skipped)
    if first:
        barrier("dataset read")
    all_records = [r for records in splits.values() for r in records]
    store_dir = feature_store.feature_store_dir(
        os.path.expanduser(config.data.cache_dir), dataset_key(config, splits), config.encoder
    )
    result = feature_store.export_features(
        all_records,
        config.encoder,
        store_dir,
        skip_bad_images=config.data.skip_bad_images,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        barrier=barrier,
    )
    if first:
        _write_skipped(workdir, skipped + list(result.skipped))
    return splits, result


def choose_residency(requested: str, nbytes: int) -> str:
    """`data.feature_residency` -> device | host | disk (auto: by size against the memory)."""
    if requested not in RESIDENCIES:
        raise ValueError(f"config.data.feature_residency={requested!r}: use one of {RESIDENCIES}.")
    if requested != "auto":
        return requested
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    device_memory = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit", ram)
    if nbytes < device_memory / 4:
        return "device"
    return "host" if nbytes < ram / 2 else "disk"


def prepare_data(
    config: ml_collections.ConfigDict, workdir: str, *, vocab: text.Vocabulary | None = None
) -> PreparedData:
    """Reads the dataset, exports/opens the feature store, builds (or takes) the vocabulary, and
    computes the run's feature statistics on train (once; saved in the workdir)."""
    splits, result = export_store(config, workdir)
    store = feature_store.load_feature_store(result.store_dir, on_disk=True)
    residency = choose_residency(config.data.feature_residency, store.nbytes)
    features = store.features
    if residency != "disk":  # One read into memory, as stored (float16 stays float16).
        features = features.read_all()
    logging.info(
        "Features %s %s, %.2f GB: %s-resident (data.feature_residency=%s).",
        store.metadata["dtype"],
        tuple(store.metadata["feature_shape"]),
        store.nbytes / 1e9,
        residency,
        config.data.feature_residency,
    )
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
    if os.path.exists(os.path.join(workdir, STATS_FILE)):
        stats = FeatureStats.load(workdir)
    else:
        train_rows = np.asarray([image_row[r.image_id] for r in splits["train"]])
        stats = FeatureStats.compute(features, train_rows)
        if jax.process_index() == 0:  # Every process computes the same; one writes.
            stats.save(workdir)
    return PreparedData(splits, vocab, features, stats, image_row, dict(store.metadata), residency)
