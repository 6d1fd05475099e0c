"""Adding a metric is one function and one registration line: a toy metric defined in this file
reaches the evaluation report, validation's logged metrics and the SCST reward terms, with the
package untouched."""

import json

import numpy as np
import pytest

from captioning.data.datasets.base import ImageRecord
from captioning.evaluation import metrics
from captioning.training import rewards, scst, train
from configs import test as test_config


def caption_length(caption: str, record: ImageRecord) -> float:
    """A toy metric: the words of one caption."""
    return float(len(caption.split()))


@pytest.fixture
def toy_metric():
    metrics.register(metrics.Metric("caption_length", caption_score=caption_length, logged=True))
    yield
    metrics.unregister("caption_length")


def test_a_registered_metric_is_reported_logged_and_rewarded(toy_metric, tmp_path):
    config = test_config.get_config()
    config.data.cache_dir = str(tmp_path / "cache")
    config.train.num_epochs = 1
    workdir = tmp_path / "run"
    report = train.train_and_evaluate(config, str(workdir))

    # The evaluation report: the split's mean of the per-caption scores, after the others.
    lengths = [len(c["caption"].split()) for c in report["captions"]]
    assert report["metrics"]["caption_length"] == pytest.approx(np.mean(lengths))
    assert list(report["metrics"])[-1] == "caption_length"
    saved = json.loads((workdir / "eval" / "test_greedy.json").read_text())
    assert saved["metrics"]["caption_length"] == report["metrics"]["caption_length"]
    # Validation computes and logs it each epoch (history.json, TensorBoard, the log line).
    history = json.loads((workdir / "history.json").read_text())
    assert history[-1]["eval_caption_length"] > 0
    # Not a results.md column unless registered with column=True.
    assert "caption_length" not in (workdir / "results.md").read_text()

    # An SCST reward term, alone or weighed with CIDEr-D, on any dataset.
    records = [ImageRecord("x", "x.png", ("a red circle",), "train")]
    cider = rewards.CiderD([["a red circle <end>"]])
    texts = ["a red circle <end>", "a red"]
    reward = scst.reward_function("caption_length", cider, records, "flickr8k")
    np.testing.assert_allclose(reward(texts, np.array([0, 0])), [3.0, 2.0])
    mixed = scst.reward_function("CIDEr + 0.5*caption_length", cider, records, "scenes")
    expected = cider.scores(texts, np.array([0, 0])) + [1.5, 1.0]
    np.testing.assert_allclose(mixed(texts, np.array([0, 0])), expected)
