"""The linear probe separates informative features from uninformative ones."""

import numpy as np

from captioning.data.datasets.base import ImageRecord
from captioning.tools import probe

COLOURS = ["red", "blue", "green"]
SHAPES = ["circle", "square", "star"]


def _split(n, rng):
    records, codes = [], []
    for i in range(n):
        k = rng.integers(1, 4)
        pairs = rng.choice(9, size=k, replace=False)
        objects = [{"colour": COLOURS[p // 3], "shape": SHAPES[p % 3]} for p in pairs]
        records.append(ImageRecord(f"s{i}", "", ("x",), "train", meta={"objects": objects}))
        code = np.zeros(9)
        code[pairs] = 1.0
        codes.append(code)
    return records, np.asarray(codes)


def test_probe_reads_informative_features_and_not_random_ones():
    rng = np.random.default_rng(0)
    records, codes = {}, {}
    for split, n in (("train", 300), ("val", 60), ("test", 60)):
        records[split], codes[split] = _split(n, rng)
    mixing = rng.normal(size=(9, 20))
    informative = {s: c @ mixing + 0.05 * rng.normal(size=(len(c), 20)) for s, c in codes.items()}
    report = probe.probe(informative, records)
    assert report["test_set_accuracy"] > 0.95
    assert set(report["test_set_accuracy_by_objects"]) == {1, 2, 3}
    noise = {s: rng.normal(size=(len(c), 20)) for s, c in codes.items()}
    assert probe.probe(noise, records)["test_set_accuracy"] < 0.3


def test_set_accuracy_needs_exactly_the_true_labels():
    truth = np.array([[1, 0, 1], [0, 1, 0]])
    scores = np.array([[0.9, 0.1, 0.8], [0.7, 0.6, 0.0]])
    np.testing.assert_array_equal(probe.set_accuracy(scores, truth), [True, False])
