"""The "unlike the training data" score: distance, calibration, run file, evaluate's share."""

import json

import numpy as np
import pytest
from conftest import make_run_dir

from captioning.data.prepare import FeatureStats
from captioning.evaluation import evaluate
from captioning.evaluation.novelty import NOVELTY_FILE, Novelty
from captioning.run_dir import RunDir
from configs import test as test_config


def _features(n, seed, shift=0.0, scale=1.0):
    """[n, 2, 2, 8] grid features around a per-channel mean (a shifted or scaled copy: unlike)."""
    rng = np.random.default_rng(seed)
    base = np.linspace(-1.0, 3.0, 8)
    return (base + shift + scale * rng.normal(size=(n, 2, 2, 8))).astype(np.float32)


def _fitted():
    train, val = _features(2000, 0), _features(1000, 1)
    features = np.concatenate([train, val])
    stats = FeatureStats.compute(features, np.arange(2000))
    return Novelty.fit(stats, features, np.arange(2000), np.arange(2000, 3000)), features


def test_alike_images_are_flagged_about_one_in_a_hundred_unlike_ones_all():
    novelty, _ = _fitted()
    assert novelty.calibrated and novelty.val_percentiles.shape == (101,)
    assert np.all(np.diff(novelty.val_percentiles) >= 0)
    test = novelty.score(_features(5000, 2))
    assert 0.003 < novelty.flagged(test).mean() < 0.03  # The val p99: ~1 % of alike images.
    for unlike in (_features(50, 3, shift=2.0), _features(50, 4, scale=4.0)):
        assert novelty.flagged(novelty.score(unlike)).all()
    # Pooled features ([N, C]) are scored as they are; percentiles rise with the distance.
    described = novelty.describe(np.array([0.0, novelty.threshold * 0.99, novelty.threshold * 2]))
    assert [d["unlike_training"] for d in described] == [False, False, True]
    assert described[0]["percentile"] == 0.0 and described[2]["percentile"] == 100.0
    assert 95 < described[1]["percentile"] <= 99


def test_score_rows_keeps_the_order_and_the_file_round_trips(tmp_path):
    novelty, features = _fitted()
    rows = np.array([2500, 3, 2999, 0, 1200])
    np.testing.assert_allclose(novelty.score_rows(features, rows), novelty.score(features[rows]))
    novelty.save(str(tmp_path))
    again = Novelty.load(str(tmp_path), novelty.stats)
    np.testing.assert_array_equal(again.val_percentiles, novelty.val_percentiles)
    np.testing.assert_array_equal(again.score(features[:10]), novelty.score(features[:10]))
    assert Novelty.load(str(tmp_path / "none"), novelty.stats) is None


def test_a_run_without_file_or_store_is_uncalibrated_not_broken(tmp_path):
    config = test_config.get_config()
    config.data.cache_dir = str(tmp_path / "empty_cache")  # No feature store here.
    run = RunDir(make_run_dir(tmp_path / "run", config, ["red", "circle"]))
    novelty = Novelty.for_run(run, config)
    assert not novelty.calibrated and novelty.threshold is None
    [described] = novelty.describe(novelty.score(np.ones((1, 2, 2, 256), np.float32)))
    assert described["distance"] > 0
    assert described["percentile"] is None and described["unlike_training"] is None
    assert not run.has(NOVELTY_FILE)


def test_evaluate_reports_the_share_flagged_and_calibrates_an_old_run(tmp_path):
    """A run without novelty.npz (trained before it existed): evaluate computes it from the
    validation split, saves it, and reports the share of the split's images beyond val p99;
    caption mode then reads the file."""
    config = test_config.get_config()
    config.data.cache_dir = str(tmp_path / "cache")
    config.eval.num_samples = 2
    workdir = make_run_dir(tmp_path / "run", config, ["red", "blue", "circle", "square"])
    report = evaluate.evaluate(config, workdir, split="test")
    share = report["novelty"]["flagged_share"]
    assert 0.0 <= share <= 1.0 and report["novelty"]["threshold"] > 0
    flags = [c["novelty"]["unlike_training"] for c in report["captions"]]
    assert share == pytest.approx(np.mean(flags))
    assert all(c["novelty"]["percentile"] is not None for c in report["captions"])
    saved = json.loads((tmp_path / "run" / "eval" / "test_greedy.json").read_text())
    assert saved["novelty"] == report["novelty"]
    assert RunDir(workdir).has(NOVELTY_FILE)
    # The validation images themselves: about 1 % beyond their own 99th percentile.
    val = evaluate.evaluate(config, workdir, split="val")
    assert val["novelty"]["flagged_share"] <= 0.15  # 8 images in the test config: 0 or 1.
    stored = Novelty.load(workdir, RunDir(workdir).feature_stats())
    assert stored.threshold == pytest.approx(report["novelty"]["threshold"])
