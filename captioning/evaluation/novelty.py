"""How unlike the training images an image is: a distance, calibrated on the validation split.

    novelty = Novelty.for_run(run, config)                  # novelty.npz, or computed on the fly
    scores = novelty.score(features)                       # [N] distances, as the store holds rows
    novelty.percentile(scores), novelty.flagged(scores)    # [N] in 0..100, [N] bool (> val p99)

The distance is a diagonal Mahalanobis distance of an image's pooled feature vector: the features
are standardised with the run's statistics (`feature_stats.npz`), averaged over locations (a
[C] vector; pooled features are used as they are), and compared with the train images' pooled
vectors per channel: sqrt(mean_c ((p_c - mean_c) / std_c)^2). Training writes `novelty.npz`
beside the checkpoints: those per-channel train moments and the percentiles 0..100 of the
validation split's distances. An image is *flagged* as unlike the training data when its distance
lies beyond the validation split's 99th percentile (`THRESHOLD_PERCENTILE`), so about 1 % of
images like the training ones are flagged, and images the model has never seen anything like
(noise, flat colours, photographs on a scenes run) nearly all are.

A run trained before this file existed gets it computed on the fly from its feature store
(`for_run`; nothing is exported) and saved; without the store the score is reported
uncalibrated (`calibrated` False: distances but no percentile, nothing flagged).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging

NOVELTY_FILE = "novelty.npz"
THRESHOLD_PERCENTILE = 99  # Flag images farther than this percentile of the validation split.
_CHUNK = 512  # Rows per chunk of a pass over the store (bounded memory).


def pooled(features: np.ndarray, stats) -> np.ndarray:
    """[N, ..., C] raw rows -> [N, C] float64: standardised (`stats`), averaged over locations."""
    standard = np.asarray(stats.apply(np.asarray(features)), np.float64)
    return standard.reshape(len(standard), -1, standard.shape[-1]).mean(axis=1)


def _pooled_rows(features, rows: np.ndarray, stats) -> np.ndarray:
    """`pooled` over `features[rows]` in chunks (a store larger than memory needs no copy)."""
    chunks = [
        pooled(features[np.asarray(rows[i : i + _CHUNK])], stats)
        for i in range(0, len(rows), _CHUNK)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, stats.mean.shape[-1]))


@dataclasses.dataclass(frozen=True)
class Novelty:
    """The distance's train moments and the validation split's distance percentiles.

    stats: the run's `FeatureStats`; mean, std: [C] train moments of the pooled vectors;
    val_percentiles: [101] percentiles 0..100 of the validation distances (None: uncalibrated).
    """

    stats: object
    mean: np.ndarray
    std: np.ndarray
    val_percentiles: np.ndarray | None

    @property
    def calibrated(self) -> bool:
        return self.val_percentiles is not None

    @property
    def threshold(self) -> float | None:
        """The distance beyond which an image is flagged (val p99), None when uncalibrated."""
        return None if self.val_percentiles is None else float(self.val_percentiles[99])

    @classmethod
    def fit(cls, stats, features, train_rows: np.ndarray, val_rows: np.ndarray) -> Novelty:
        """Train moments from `features[train_rows]`, calibrated on `features[val_rows]`."""
        train = _pooled_rows(features, np.sort(train_rows), stats)
        std = train.std(axis=0) + 1e-6
        novelty = cls(stats, train.mean(axis=0), std, None)
        val = novelty.score_rows(features, val_rows)
        percentiles = np.percentile(val, np.arange(101)) if len(val) else None
        return dataclasses.replace(novelty, val_percentiles=percentiles)

    def score(self, features: np.ndarray) -> np.ndarray:
        """[N, ...] raw feature rows (as the store or `backbone.encode_images` gives them) ->
        [N] float64 distances."""
        if len(features) == 0:
            return np.zeros(0)
        z = (pooled(features, self.stats) - self.mean) / self.std
        return np.sqrt(np.mean(np.square(z), axis=-1))

    def score_rows(self, features, rows: np.ndarray) -> np.ndarray:
        """Distances of `features[rows]` ([N] rows in any order; a memory-mapped store is read in
        sorted chunks) -> [N] in the order of `rows`."""
        rows = np.asarray(rows)
        order = np.argsort(rows, kind="stable")
        scores = np.zeros(len(rows))
        for i in range(0, len(rows), _CHUNK):
            chunk = order[i : i + _CHUNK]
            scores[chunk] = self.score(features[rows[chunk]])
        return scores

    def percentile(self, scores: np.ndarray) -> np.ndarray | None:
        """[N] distances -> [N] share (0..100) of validation images closer; None uncalibrated."""
        if self.val_percentiles is None:
            return None
        return np.interp(scores, self.val_percentiles, np.arange(101.0))

    def flagged(self, scores: np.ndarray) -> np.ndarray:
        """[N] distances -> [N] bool: beyond the validation split's 99th percentile."""
        if self.val_percentiles is None:
            return np.zeros(np.shape(scores), bool)
        return np.asarray(scores) > self.threshold

    def describe(self, scores: np.ndarray) -> list[dict]:
        """[N] distances -> per image {"distance", "percentile", "unlike_training"} (JSON-ready;
        percentile and unlike_training None when uncalibrated)."""
        percentiles = self.percentile(scores)
        flags = self.flagged(scores)
        return [
            {
                "distance": round(float(s), 4),
                "percentile": None if percentiles is None else round(float(percentiles[i]), 2),
                "unlike_training": bool(flags[i]) if self.calibrated else None,
            }
            for i, s in enumerate(np.asarray(scores))
        ]

    # ---- the run folder --------------------------------------------------------------------

    def save(self, workdir: str) -> None:
        arrays = {"mean": self.mean, "std": self.std}
        if self.val_percentiles is not None:
            arrays["val_percentiles"] = self.val_percentiles
        path = os.path.join(workdir, NOVELTY_FILE)
        with open(path + ".tmp", "wb") as f:
            np.savez(f, **arrays)
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, workdir: str, stats) -> Novelty | None:
        """`novelty.npz` of the run in `workdir` (None when the run has none)."""
        path = os.path.join(workdir, NOVELTY_FILE)
        if not os.path.exists(path):
            return None
        with np.load(path) as f:
            return cls(stats, f["mean"], f["std"], f.get("val_percentiles"))

    @classmethod
    def for_data(cls, workdir: str, data, *, write: bool = True) -> Novelty:
        """The run's novelty.npz, else fitted on `data` (a `PreparedData`) and saved."""
        novelty = cls.load(workdir, data.stats)
        if novelty is None or not novelty.calibrated:
            novelty = cls.fit(data.stats, data.features, data.rows("train"), data.rows("val"))
            if write:
                novelty.save(workdir)
        return novelty

    @classmethod
    def for_run(cls, run, config) -> Novelty:
        """A finished run's calibration: novelty.npz; for a run trained before it existed,
        computed from the run's feature store when it is on this machine (and saved; nothing is
        exported), else uncalibrated (train moments from the feature statistics alone)."""
        stats = run.feature_stats()
        novelty = cls.load(run.path, stats)
        if novelty is not None and novelty.calibrated:
            return novelty
        try:
            novelty = cls._fit_from_store(config, stats)
            novelty.save(run.path)
            return novelty
        except Exception as e:  # No records or no store here: a distance without calibration.
            logging.warning(
                "No %s in %s and no feature store to compute it from (%s: %s): the distance "
                "from the training images is reported uncalibrated.",
                NOVELTY_FILE,
                run.path,
                type(e).__name__,
                e,
            )
        channels = stats.mean.shape[-1]
        return cls(stats, np.zeros(channels), np.ones(channels), None)

    @classmethod
    def _fit_from_store(cls, config, stats) -> Novelty:
        """Fits on the run's existing feature store (FeatureStoreError when it has none)."""
        from captioning.data import feature_store, prepare
        from captioning.data.datasets import registry

        splits = registry.load_records(config.data, config.seed)
        store_dir = feature_store.feature_store_dir(
            os.path.expanduser(config.data.cache_dir),
            prepare.dataset_key(config, splits),
            config.encoder,
        )
        store = feature_store.load_feature_store(store_dir, on_disk=True)
        row = {image_id: i for i, image_id in enumerate(store.ids)}
        rows = {
            split: np.asarray([row[r.image_id] for r in splits[split] if r.image_id in row])
            for split in ("train", "val")
        }
        logging.info("Calibrating the novelty score on %s's val split.", store_dir)
        return cls.fit(stats, store.features, rows["train"], rows["val"])
