"""Two real processes on this machine (CPU, loopback coordinator, gloo collectives) train the
tiny config exactly like one process with the same global batch: each feeds its half of every
batch, the feature export is split between them, checkpoints and reports are written once."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
from conftest import saved_params

from captioning.tools import grid
from captioning.training import train
from configs import test as test_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The tiny config as both runs use it; one compiled step: the two processes compile at once.
OVERRIDES = {"train.num_epochs": 2, "train.num_buckets": 1, "eval.extra_splits": ""}


def _command(workdir, cache, *extra):
    return [
        sys.executable,
        "main.py",
        "--config=configs/test.py",
        f"--workdir={workdir}",
        f"--config.data.cache_dir={cache}",
        *(f"--config.{field}={value}" for field, value in OVERRIDES.items()),
        *extra,
    ]


def test_two_processes_train_like_one(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # One CPU device per process.
    # The reference: one process on one CPU device, the config of the command line below. This
    # process when it is that; elsewhere (an accelerator, several devices) one more run.
    if jax.default_backend() == "cpu" and jax.device_count() == 1:
        overrides = {**OVERRIDES, "data.cache_dir": str(tmp_path / "cache_one")}
        train.train_and_evaluate(
            grid.apply_overrides(test_config.get_config(), overrides), str(tmp_path / "one")
        )
    else:
        one = _command(tmp_path / "one", tmp_path / "cache_one")
        result = subprocess.run(one, cwd=REPO, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]

    port = _free_port()
    logs = [open(tmp_path / f"process{i}.log", "w") for i in range(2)]  # noqa: SIM115
    processes = [
        subprocess.Popen(
            _command(
                tmp_path / "two",
                tmp_path / "cache_two",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=logs[i],
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        codes = [p.wait(timeout=600) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    for i, code in enumerate(codes):
        assert code == 0, (tmp_path / f"process{i}.log").read_text()[-3000:]
    second = (tmp_path / "process1.log").read_text()
    assert "Process 1 of 2" in second and "(process 1 of 2)" in second  # Its share of the export.

    history = {n: json.loads((tmp_path / n / "history.json").read_text()) for n in ("one", "two")}
    assert [h["step"] for h in history["two"]] == [h["step"] for h in history["one"]]
    for a, b in zip(history["one"], history["two"], strict=True):
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-4)
        np.testing.assert_allclose(a["eval_loss"], b["eval_loss"], rtol=1e-4)
    _, one = saved_params(tmp_path / "one")
    _, two = saved_params(tmp_path / "two")
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)
    assert (tmp_path / "two" / "eval" / "test_greedy.json").exists()
