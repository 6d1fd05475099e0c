"""Linear probe: can the image features alone name every object of a scene?

    python -m captioning.tools.probe --config=configs/scenes.py [--config.encoder.layer=...]

Exports (or reuses) the config's feature store, standardises the features with train statistics
(as training does), and fits a ridge regression from features to the multi-hot set of
(colour, shape) pairs of each scene. A scene counts as right when its `n` highest-scoring pairs
are exactly its `n` true pairs (the probe is told how many objects there are). The ridge weight
is chosen on the validation split; the test figures use that weight. Prints one JSON object.

This separates "the features do not carry the information" from "the decoder does not learn to
use it": if the probe is near 1 and a decoder's attribute accuracy is not, look at the decoder.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from captioning.data.datasets.base import ImageRecord

LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def _pairs(record: ImageRecord) -> set[tuple[str, str]]:
    return {(o["colour"], o["shape"]) for o in record.meta["objects"]}


def ridge_fit(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """Closed-form ridge: x [N, D], y [N, K] -> weights [D + 1, K] (last row: bias)."""
    x1 = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    reg = lam * np.eye(x1.shape[1])
    reg[-1, -1] = 0.0  # The bias is not shrunk.
    return np.linalg.solve(x1.T @ x1 + reg, x1.T @ y)


def ridge_predict(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((len(x), 1))], axis=1) @ weights


def set_accuracy(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per row: are the top-n scores (n = number of true labels) exactly the true labels?

    scores, truth: [N, K] (truth multi-hot) -> [N] bool.
    """
    counts = truth.sum(axis=1).astype(int)
    order = np.argsort(-scores, axis=1)
    return np.array(
        [set(order[i, : counts[i]]) == set(np.flatnonzero(truth[i])) for i in range(len(truth))]
    )


def probe(
    features: dict[str, np.ndarray], records: dict[str, Sequence[ImageRecord]]
) -> dict[str, object]:
    """features[split]: [N, ...] standardised; records[split]: scenes records in the same order."""
    labels = sorted({p for r in records["train"] for p in _pairs(r)})
    column = {p: i for i, p in enumerate(labels)}

    def targets(split):
        y = np.zeros((len(records[split]), len(labels)))
        for i, r in enumerate(records[split]):
            for p in _pairs(r):
                if p in column:
                    y[i, column[p]] = 1.0
        return y

    x = {s: f.reshape(len(f), -1).astype(np.float64) for s, f in features.items()}
    y = {s: targets(s) for s in records}
    val_accuracy = {
        lam: float(
            set_accuracy(
                ridge_predict(x["val"], ridge_fit(x["train"], y["train"], lam)), y["val"]
            ).mean()
        )
        for lam in LAMBDAS
    }
    best = max(LAMBDAS, key=lambda lam: (val_accuracy[lam], lam))
    right = set_accuracy(
        ridge_predict(x["test"], ridge_fit(x["train"], y["train"], best)), y["test"]
    )
    objects = np.array([len(_pairs(r)) for r in records["test"]])
    return {
        "test_set_accuracy": round(float(right.mean()), 4),
        "test_set_accuracy_by_objects": {
            int(n): round(float(right[objects == n].mean()), 4) for n in np.unique(objects)
        },
        "ridge_lambda": best,
        "val_set_accuracy_by_lambda": val_accuracy,
        "feature_dim": int(x["train"].shape[1]),
        "labels": len(labels),
    }


def main(argv):
    del argv
    from captioning.data import prepare as data_lib

    config = flags.FLAGS.config
    if config.data.dataset != "scenes":
        raise app.UsageError("The probe needs the scenes dataset (it reads each scene's objects).")
    with tempfile.TemporaryDirectory() as workdir:  # Only feature_stats.npz goes there.
        data = data_lib.prepare_data(config, workdir)
    records = {s: data.splits[s] for s in ("train", "val", "test")}
    features = {
        s: data.stats.apply(data.features[[data.image_row[r.image_id] for r in rs]])
        for s, rs in records.items()
    }
    report = probe(features, records)
    report["features"] = {k: config.encoder[k] for k in ("backbone", "layer", "pooling", "grid")}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    # Defined here, not at import: other modules (captioning.tools.grid) define their own --config.
    config_flags.DEFINE_config_file("config", None, "Experiment config file.")
    flags.mark_flags_as_required(["config"])
    app.run(main)
