"""Helpers shared by the tests: an XLA compilation counter and a fake run directory.

The suite runs on any JAX backend. Float32 matmuls are computed in full float32 everywhere (GPUs
default to TF32, TPUs to bfloat16 passes; a no-op on CPUs), so comparisons against references hold;
no process preallocates most of an accelerator's memory (several test workers share one); tests
marked `accelerator` skip when JAX has only a CPU.

The session compiles each distinct computation once: a persistent compilation cache in a fresh
temporary folder (the subprocess runs inherit it through the environment) serves the tiny
config's steps to every later test that builds them again.
"""

import atexit
import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time

# The tests compile far more than they run: XLA's backend optimisations cost them more time than
# they save (a user's run keeps them). Set before JAX starts; subprocess runs inherit it.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"
# Full float32 matmuls for every test and subprocess run (the reference comparisons need them).
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
# Test workers and their subprocess runs share an accelerator: each allocates what it uses.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from captioning import checkpoint, host, models
from captioning.data import backbone, text
from captioning.tools.benchmark_training import EXECUTABLE_EVENTS, count_compiles  # noqa: E402, F401
from captioning.training import loop  # noqa: E402

host.keep_freed_memory()  # As main.py does: the tests' steps allocate as the users' do.
jax.config.update("jax_default_matmul_precision", "highest")  # Also if JAX came in before us.

_COMPILATION_CACHE = tempfile.mkdtemp(prefix="captioning_tests_jax_cache_")
# Removed when this test process ends, so that runs of the suite leave nothing behind.
atexit.register(functools.partial(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True))
os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The modules that take longest, longest first. pytest-xdist (pyproject.toml's addopts: each
# module on one worker, handed out in collection order) then starts them first, so no worker is
# left alone with a long module at the end.
LONGEST_MODULES = (
    "test_end_to_end",
    "test_scst",
    "test_attention",
    "test_grid",
    "test_features",
    "test_search",
    "test_serve",
    "test_multihost",
    "test_metrics",
    "test_data",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # Stable: order within.
    backend = jax.default_backend()
    if backend == "cpu":
        skip = pytest.mark.skip(reason=f"needs a GPU or TPU (jax.default_backend() is {backend})")
        for item in items:
            if "accelerator" in item.keywords:
                item.add_marker(skip)


# The compilation counter the benchmark uses (an executable is made by compiling it or by
# reading it from the session's cache): the tests re-export it.


def saved_params(workdir, which: str = "latest"):
    """(step, params) of the newest checkpoint in workdir/checkpoints/<which>, restored onto this
    process's first device whatever devices saved it."""
    path = os.path.join(str(workdir), "checkpoints", which)
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with checkpoint.manager_at(path) as manager:
        step = manager.latest_step()
        shapes = manager.item_metadata(step)["params"]
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), shapes
        )
        return step, checkpoint.restore(manager, step, params=target)["params"]


def make_run_dir(workdir, config, words, *, mean=0.0, std=1.0, step=7) -> str:
    """A run directory as training leaves it (config, vocabulary, feature statistics, a `best`
    checkpoint), holding an untrained model of `config`: caption mode, evaluation and the demo
    can run on it without training.

    The feature statistics are `mean` and `std` for every channel of what the config's backbone
    gives ([C] or [H, W, C]).
    """
    workdir = str(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(json.loads(config.to_json()), f)
    vocab = text.Vocabulary(words)
    vocab.save(os.path.join(workdir, "vocab.json"))
    feature_shape = backbone.build_backbone(config.encoder, seed=config.seed)[0].output_shape[1:]
    np.savez(
        os.path.join(workdir, "feature_stats.npz"),
        mean=np.full([feature_shape[-1]], mean, np.float32),
        std=np.full([feature_shape[-1]], std, np.float32),
    )
    model = models.create_model(config.model, len(vocab), feature_shape, rngs=nnx.Rngs(0))
    latest, best = checkpoint.managers(workdir, keep=1)
    progress = loop.progress_state(epoch=1, best_metric=0.0, best_epoch=1, epochs_since_best=0)
    checkpoint.save(best, step, params=nnx.split(model)[1], progress=progress)
    for manager in (latest, best):
        manager.wait_until_finished()
        manager.close()
    return workdir


def sigkill_then_resume(command: list[str], workdir, log) -> list[dict]:
    """Runs `command` in the repository, kills it with SIGKILL as soon as its first checkpoint
    is committed (Orbax renames a finished checkpoint to its bare step number), checks it died
    by the signal before its final evaluation, then reruns the same command and checks it
    resumed and finished. `log` receives the killed run's stderr (a file, not a pipe: a full
    pipe would block the run). Returns the finished run's history.json."""
    latest = os.path.join(str(workdir), "checkpoints", "latest")
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        deadline = time.time() + 300
        while not (os.path.isdir(latest) and any(n.isdigit() for n in os.listdir(latest))):
            assert process.poll() is None, pathlib.Path(log).read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 5 minutes"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(str(workdir), "eval", "test_greedy.json")), "too late"

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stderr
    return json.loads(pathlib.Path(workdir, "history.json").read_text())
