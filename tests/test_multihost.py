"""Two real processes on this machine (CPU, loopback coordinator, gloo collectives) train the
tiny config exactly like one process with the same global batch: each feeds its half of every
batch, the feature export is split between them, checkpoints and reports are written once."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
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


def _logged_step(line):
    """The step of a training log line ("[12] train_...") or None."""
    if "] train_" not in line or "logging_writer" not in line:
        return None
    return int(line.split("] [", 1)[1].split("]", 1)[0])


def _lower_priority():
    # The two training processes run below this one, so that the thread reading their logs sees
    # a line while they are still near it (on a loaded machine it saw the second epoch's first
    # line only once the run had ended, and the SIGTERM came too late).
    os.nice(10)


def _run_two(workdir, cache, signal_process_1_at=None):
    """Runs the tiny config in two processes -> (exit codes, stderr texts). With
    `signal_process_1_at(line)`, SIGTERM goes to process 1 alone once a line of process 0
    matches."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    port = _free_port()
    processes = [
        subprocess.Popen(
            _command(
                workdir,
                cache,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_lower_priority,
        )  # fmt: skip
        for i in range(2)
    ]
    texts = [[], []]

    def read(i):
        sent = False
        for line in processes[i].stderr:
            texts[i].append(line)
            if i == 0 and signal_process_1_at and not sent and signal_process_1_at(line):
                processes[1].send_signal(signal.SIGTERM)
                sent = True

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(2)]
    for reader in readers:
        reader.start()
    try:
        codes = [p.wait(timeout=600) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for reader in readers:
        reader.join(timeout=10)
    return codes, ["".join(t) for t in texts]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """An uninterrupted two-process run of the tiny config -> (its root folder, stderr texts)."""
    root = tmp_path_factory.mktemp("two_processes")
    codes, logs = _run_two(root / "two", root / "cache")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    return root, logs


def test_two_processes_train_like_one(two_processes, tmp_path):
    root, logs = two_processes
    # The reference: one process on one CPU device, the config of the command line below. This
    # process when it is that; elsewhere (an accelerator, several devices) one more run.
    if jax.default_backend() == "cpu" and jax.device_count() == 1:
        overrides = {**OVERRIDES, "data.cache_dir": str(tmp_path / "cache_one")}
        train.train_and_evaluate(
            grid.apply_overrides(test_config.get_config(), overrides), str(tmp_path / "one")
        )
    else:
        one = _command(tmp_path / "one", tmp_path / "cache_one")
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # One CPU device per process.
        result = subprocess.run(one, cwd=REPO, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "Process 1 of 2" in logs[1] and "(process 1 of 2)" in logs[1]  # Its export share.

    two = root / "two"
    history = {
        n: json.loads((d / "history.json").read_text())
        for n, d in (("one", tmp_path / "one"), ("two", two))
    }
    assert [h["step"] for h in history["two"]] == [h["step"] for h in history["one"]]
    for a, b in zip(history["one"], history["two"], strict=True):
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-4)
        np.testing.assert_allclose(a["eval_loss"], b["eval_loss"], rtol=1e-4)
    _, one_params = saved_params(tmp_path / "one")
    _, two_params = saved_params(two)
    for a, b in zip(jax.tree.leaves(one_params), jax.tree.leaves(two_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)
    assert (two / "eval" / "test_greedy.json").exists()


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes(two_processes, tmp_path):
    """Preemption often reaches one host first: the processes agree on the step (an allgather
    every `train.log_every` steps), both checkpoint that step and stop, and the same two commands
    resume and end bit-identical to an uninterrupted two-process run."""
    log_every = 2  # configs/test.py's train.log_every.
    root, _ = two_processes
    history = json.loads((root / "two" / "history.json").read_text())
    steps = history[0]["step"]  # Steps an epoch (two epochs).

    in_second_epoch = lambda line: steps < (_logged_step(line) or 0) < 2 * steps - 3  # noqa: E731
    codes, logs = _run_two(tmp_path / "run", root / "cache", in_second_epoch)
    assert codes == [128 + signal.SIGTERM] * 2, logs[0][-3000:] + logs[1][-3000:]
    stopped = [int(log.split("Stopped by SIGTERM after step ", 1)[1].split()[0]) for log in logs]
    assert stopped[0] == stopped[1], stopped  # Both saved the one agreed step,
    assert stopped[0] % log_every == 0 and steps < stopped[0] < 2 * steps  # mid-epoch.
    assert not (tmp_path / "run" / "eval" / "test_greedy.json").exists()

    codes, logs = _run_two(tmp_path / "run", root / "cache")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "Resumed from" in logs[0]
    whole_step, whole = saved_params(root / "two")
    run_step, run = saved_params(tmp_path / "run")
    assert run_step == whole_step == history[-1]["step"] == 2 * steps
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(run), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
