"""data.prepare: feature statistics over a store without copying it, and where the rows live
(device, host or disk residency give the same training, bit for bit)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import saved_params

from captioning.data import prepare as data
from captioning.training import train
from configs import test as test_config


def test_statistics_in_chunks_equal_the_whole_array_and_standardise():
    rng = np.random.default_rng(0)
    features = (3.0 + 2.0 * rng.normal(size=(1300, 2, 2, 5))).astype(np.float16)
    rows = rng.permutation(1300)[:1100]
    stats = data.FeatureStats.compute(features, rows)
    chosen = features[rows].astype(np.float64).reshape(-1, 5)
    np.testing.assert_allclose(stats.mean, chosen.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.std, chosen.std(axis=0) + 1e-6, rtol=1e-5)
    standard = stats.apply(features[rows])
    assert standard.dtype == np.float32
    np.testing.assert_allclose(standard.reshape(-1, 5).mean(axis=0), 0.0, atol=1e-4)
    # The same on the device (jax arrays), as the train step and decoder do it (XLA may round
    # the division differently in the last bit).
    on_device = stats.apply(jax.numpy.asarray(features[:4]))
    np.testing.assert_allclose(on_device, stats.apply(features[:4]), rtol=1e-6)


def test_residency_choice():
    assert data.choose_residency("disk", 10) == "disk"
    assert data.choose_residency("auto", 10) == "device"
    assert data.choose_residency("auto", 10**15) == "disk"
    with pytest.raises(ValueError, match="config.data.feature_residency"):
        data.choose_residency("gpu", 10)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny config trained for one epoch with each residency (one shared feature store)."""
    root = tmp_path_factory.mktemp("residency")
    reports = {}
    for residency in ("device", "host", "disk"):
        config = test_config.get_config()
        config.data.cache_dir = str(root / "cache")
        config.data.feature_residency = residency
        config.encoder.dtype = "float16"  # The store stays float16 in every residency.
        config.train.num_epochs = 1
        config.train.num_buckets = 1  # Residency does not touch the buckets: compile less.
        config.eval.extra_splits = ""
        reports[residency] = train.train_and_evaluate(config, str(root / residency))
    return root, reports


@pytest.mark.parametrize("residency", ["host", "disk"])
def test_host_and_disk_residency_train_exactly_like_device(runs, residency):
    root, reports = runs
    history = {
        r: json.loads((root / r / "history.json").read_text()) for r in ("device", residency)
    }
    assert history[residency] == history["device"]  # Losses and validation metrics.
    _, device_params = saved_params(root / "device")
    _, other_params = saved_params(root / residency)
    for a, b in zip(jax.tree.leaves(device_params), jax.tree.leaves(other_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert reports[residency]["captions"] == reports["device"]["captions"]


# Trains the tiny config with device and disk residency in one process (argv[1]: the folder).
_RESIDENCY_SCRIPT = """
import sys
from captioning.training import train
from configs import test as test_config
for residency in ("device", "disk"):
    config = test_config.get_config()
    config.data.cache_dir = sys.argv[1] + "/cache"
    config.data.feature_residency = residency
    config.encoder.dtype = "float16"
    config.train.num_epochs = 1
    config.train.num_buckets = 1
    config.eval.extra_splits = ""
    config.eval.meteor = False
    train.train_and_evaluate(config, sys.argv[1] + "/" + residency)
"""


def test_disk_residency_trains_like_device_at_xla_default_optimisation(tmp_path):
    """As above, in a process without the suite's --xla_backend_optimization_level=0: XLA's
    optimisations (fusion, reassociation) must not make the two residencies' steps differ."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "optimization_level" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # Executables of the default level only.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", _RESIDENCY_SCRIPT, str(tmp_path)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _, device_params = saved_params(tmp_path / "device")
    _, disk_params = saved_params(tmp_path / "disk")
    for a, b in zip(jax.tree.leaves(device_params), jax.tree.leaves(disk_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
