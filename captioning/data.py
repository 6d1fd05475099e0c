"""Data preparation, once per run: records, feature store, vocabulary and feature statistics.

    data = prepare_data(config, workdir)   # PreparedData: splits, vocab, features, image_row

The dataset reader (`captioning.datasets`) gives the records of every split; the feature store
(`captioning.feature_store`) is exported if missing, then loaded; the vocabulary is built on the
train captions (or taken from the run). Features are standardised per channel with train-split
statistics (`FeatureStats`, saved as `workdir/feature_stats.npz`), because random or ImageNet
backbones give activations of very different scales; caption mode applies the same statistics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from captioning import feature_store, text
from captioning.datasets import registry
from captioning.datasets.base import DatasetSplits

STATS_FILE = "feature_stats.npz"
SKIPPED_FILE = "skipped_images.txt"


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Per-channel mean and std [C] float32 of the train features (channels = last axis)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def compute(cls, features: np.ndarray, rows: np.ndarray) -> FeatureStats:
        """Statistics over `features[rows]` ([N, ..., C]), all axes but the last."""
        train = features[rows].astype(np.float32)
        axes = tuple(range(train.ndim - 1))
        return cls(train.mean(axis=axes), train.std(axis=axes) + 1e-6)

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

    def apply(self, features: np.ndarray) -> np.ndarray:
        """[..., C] raw features -> standardised float32, same shape."""
        return ((features.astype(np.float32) - self.mean) / self.std).astype(np.float32)


@dataclasses.dataclass
class PreparedData:
    """Everything training and evaluation need from the data side.

    Attributes:
      splits: records per split (images that failed to load already removed).
      vocab: the vocabulary built on the train captions.
      features: [N, D] or [N, H, W, C] float32 standardised features of every image.
      image_row: image_id -> row of `features`.
      feature_metadata: the feature store's metadata (backbone, weights, image size, ...).
    """

    splits: DatasetSplits
    vocab: text.Vocabulary
    features: np.ndarray
    image_row: dict[str, int]
    feature_metadata: dict[str, Any]

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
    skipped: list[tuple[str, str]] = []
    splits = registry.load_records(config.data, config.seed, skipped=skipped)
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
    )
    _write_skipped(workdir, skipped + list(result.skipped))
    return splits, result


def prepare_data(
    config: ml_collections.ConfigDict, workdir: str, *, vocab: text.Vocabulary | None = None
) -> PreparedData:
    """Reads the dataset, exports/loads features, builds (or takes) the vocabulary, and
    standardises the features with the run's statistics (computed on train and saved once)."""
    splits, result = export_store(config, workdir)
    store = feature_store.load_feature_store(result.store_dir)
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
        stats = FeatureStats.compute(store.features, train_rows)
        stats.save(workdir)
    features = stats.apply(store.features)
    return PreparedData(splits, vocab, features, image_row, dict(store.metadata))
