"""Faults a run survives (README "What survives what"): SIGTERM mid-epoch, a damaged checkpoint,
a full disk, a diverging loss, a damaged feature store. Each ends as an uninterrupted run does."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from conftest import REPO, saved_params

from captioning import checkpoint, faults
from captioning.data import feature_store, input_pipeline, prepare
from captioning.data.datasets import scenes
from captioning.training import scst, train
from configs import test as test_config

STEPS = 9  # Steps an epoch of the tiny config (48 images, 5 captions each, 32 a step).


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted two-epoch run: (config, workdir, its final parameters)."""
    root = tmp_path_factory.mktemp("faults")
    config = test_config.get_config()
    config.data.cache_dir = str(root / "cache")
    config.eval.extra_splits = ""
    train.train_and_evaluate(config, str(root / "whole"))
    return config, root / "whole", saved_params(root / "whole")


def _assert_same_params(workdir, expected):
    step, params = saved_params(workdir)
    assert step == expected[0]
    for a, b in zip(jax.tree.leaves(expected[1]), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _command(config, workdir, *extra):
    return [
        sys.executable,
        "main.py",
        "--config=configs/test.py",
        f"--workdir={workdir}",
        f"--config.data.cache_dir={config.data.cache_dir}",
        "--config.eval.extra_splits=",
        *extra,
    ]


def _sigterm_at_log_line(command, pattern, log):
    """Runs `command`, sends SIGTERM when a stderr line matches `pattern` -> (code, stderr)."""
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lines = []

    def read():
        sent = False
        for line in process.stderr:
            lines.append(line)
            if pattern(line) and not sent and process.poll() is None:
                process.send_signal(signal.SIGTERM)  # Once: a second one ends it at once.
                sent = True

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=10)
    pathlib.Path(log).write_text("".join(lines))
    return process.returncode, "".join(lines)


def _logged_step(line):
    """The step of a training log line ("[12] train_...") or None."""
    if "] train_" not in line or "logging_writer" not in line:
        return None
    return int(line.split("] [", 1)[1].split("]", 1)[0])


def test_sigterm_mid_epoch_in_process_saves_resumes_bit_identical(whole, tmp_path, monkeypatch):
    config, _, expected = whole
    original = input_pipeline.CaptionBatches.epoch

    def signalling_epoch(self, epoch):
        for i, batch in enumerate(original(self, epoch)):
            if self.shuffle and epoch == 1 and i == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # Arrives during the fourth step.
            yield batch

    monkeypatch.setattr(input_pipeline.CaptionBatches, "epoch", signalling_epoch)
    with pytest.raises(SystemExit) as stopped:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert stopped.value.code == 128 + signal.SIGTERM
    with checkpoint.manager_at(str(tmp_path / "run" / "checkpoints" / "latest")) as manager:
        assert manager.latest_step() == STEPS + 4  # Mid-epoch: the step in flight finished.
        progress = checkpoint.restore(manager, STEPS + 4, progress=None)["progress"]
    assert int(progress["step_in_epoch"]) == 4 and int(progress["epoch"]) == 1
    monkeypatch.setattr(input_pipeline.CaptionBatches, "epoch", original)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    _assert_same_params(tmp_path / "run", expected)


def test_sigterm_mid_epoch_then_same_command_resumes_bit_identical(whole, tmp_path):
    config, _, expected = whole
    workdir = tmp_path / "run"
    command = _command(config, workdir, "--config.train.checkpoint_every_steps=4")
    code, log = _sigterm_at_log_line(
        command, lambda line: STEPS < (_logged_step(line) or 0) < 2 * STEPS - 2, tmp_path / "s.log"
    )
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "Stopped by SIGTERM after step" in log and "run the same command: " in log
    assert "main.py --config=configs/test.py" in log
    assert not (workdir / "eval" / "test_greedy.json").exists()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stderr
    _assert_same_params(workdir, expected)


def test_sigterm_mid_scst_epoch_then_same_command_resumes_bit_identical(whole, tmp_path):
    config, xe_dir, _ = whole
    scst_flags = [f"--config.scst.init_from={xe_dir}", "--config.scst.batch_size=8"]
    scst_flags += ["--config.scst.num_epochs=2", "--config.scst.learning_rate=0.001"]
    reference = scst_config = test_config.get_config()
    scst_config.data.cache_dir = config.data.cache_dir
    scst_config.eval.extra_splits = ""
    scst_config.scst.update(init_from=str(xe_dir), batch_size=8, num_epochs=2, learning_rate=1e-3)
    scst.train_and_evaluate(reference, str(tmp_path / "whole"))
    expected = saved_params(tmp_path / "whole")
    assert expected[0] == 12  # 48 images, 8 a step.

    workdir = tmp_path / "run"
    command = _command(config, workdir, *scst_flags)
    code, log = _sigterm_at_log_line(
        command, lambda line: 2 <= (_logged_step(line) or 0) < 10, tmp_path / "stopped.log"
    )
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "Stopped by SIGTERM after step" in log and "run the same command: " in log
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stderr
    _assert_same_params(workdir, expected)


def _truncate_largest(folder):
    """Cuts off half of the largest data file under `folder`, as a full disk leaves it."""
    files = [p for p in pathlib.Path(folder).rglob("*") if p.is_file() and "/d/" in str(p)]
    target = max(files, key=lambda p: p.stat().st_size)
    os.truncate(target, target.stat().st_size // 2)


def test_damaged_checkpoint_is_moved_aside_and_the_run_resumes_bit_identical(whole, tmp_path):
    config, source, expected = whole
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    (workdir / "eval" / "test_greedy.json").unlink()
    _truncate_largest(workdir / "checkpoints" / "latest" / str(2 * STEPS) / "params")
    train.train_and_evaluate(config, str(workdir))  # Resumes from step 9, trains epoch 2 again.
    assert (workdir / "checkpoints" / "damaged" / f"latest_{2 * STEPS}").is_dir()
    _assert_same_params(workdir, expected)


def test_evaluate_caption_and_scst_name_a_damaged_checkpoint_and_the_intact_ones(whole, tmp_path):
    config, source, _ = whole
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    best = next(p for p in (workdir / "checkpoints" / "best").iterdir() if p.name.isdigit())
    _truncate_largest(best / "params")
    result = subprocess.run(
        [sys.executable, "main.py", "--mode=evaluate", f"--workdir={workdir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if "DamagedCheckpoint" in x]
    assert f"{best} is damaged: OUT_OF_RANGE" in line
    assert "Intact: latest/18, latest/9" in line and "--config.eval.checkpoint=<step>" in line
    # The step chosen instead is scored.
    from captioning.evaluation import evaluate

    config = config.copy_and_resolve_references()
    config.eval.checkpoint = "9"
    assert evaluate.evaluate(config, str(workdir), split="test")["step"] == 9
    config.scst.init_from = str(workdir)
    with pytest.raises(faults.DamagedCheckpoint, match="config.scst.init_checkpoint=<step>"):
        scst.train_and_evaluate(config, str(tmp_path / "scst"))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB filesystem (tmpfs) at tmp_path/small; skips where mounting is not permitted."""
    folder = tmp_path / "small"
    folder.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)  # Lazy: files may be open.


def _leftovers(folder):
    return [p for p in pathlib.Path(folder).rglob("*") if ".tmp" in p.name]


def test_full_disk_stops_with_one_line_and_the_same_command_resumes(whole, small_disk):
    config, _, expected = whole
    workdir = small_disk / "run"
    with pytest.raises(faults.DiskFull, match=r"cannot write .*small/run/\S+ \(needs about"):
        train.train_and_evaluate(config, str(workdir))
    assert not _leftovers(small_disk)
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    train.train_and_evaluate(config, str(workdir))  # Space freed: the same call finishes.
    _assert_same_params(workdir, expected)
    assert not _leftovers(small_disk)


def test_full_disk_during_feature_export_names_the_shard(whole, small_disk):
    config = whole[0].copy_and_resolve_references()
    config.data.dir = scenes.scenes_dir(config.data, config.seed)  # The images stay where they are.
    config.data.cache_dir = str(small_disk)
    with pytest.raises(faults.DiskFull, match=r"shard_00000\.npz \(needs about [\d,]+ bytes"):
        prepare.export_store(config, str(small_disk))
    assert not _leftovers(small_disk)


def test_diverging_loss_stops_at_its_step_and_no_checkpoint_holds_nans(
    whole, tmp_path, monkeypatch
):
    config = whole[0].copy_and_resolve_references()
    config.train.learning_rate = 1e6  # Grows the loss to ~1e22 here, not to inf: a NaN row too.
    config.train.checkpoint_every_steps = 2
    config.data.feature_residency = "host"  # Batches carry their feature rows.
    original = input_pipeline.CaptionBatches.epoch

    def poisoned_epoch(self, epoch):
        for i, batch in enumerate(original(self, epoch)):
            if self.shuffle and epoch == 1 and i == 2:
                batch = {**batch, "features": np.full_like(batch["features"], np.nan)}
            yield batch

    monkeypatch.setattr(input_pipeline.CaptionBatches, "epoch", poisoned_epoch)
    workdir = tmp_path / "run"
    with pytest.raises(faults.Diverged) as diverged:
        train.train_and_evaluate(config, str(workdir))
    message = str(diverged.value)
    assert f"diverged at step {STEPS + 3} (loss_sum nan" in message
    assert f"checkpoints/latest/{STEPS + 1} " in message  # Saved every 2 steps.
    assert "--config.train.learning_rate (now 1000000.0)" in message
    assert "--config.train.grad_clip (now 1.0)" in message
    for which in ("latest", "best"):
        with checkpoint.manager_at(str(workdir / "checkpoints" / which)) as manager:
            for step in manager.all_steps():
                items = checkpoint.restore(manager, step, params=None, opt_state=None)
                assert all(np.isfinite(x).all() for x in jax.tree.leaves(items)), (which, step)


def test_damaged_feature_shard_is_named_and_exported_again(whole, tmp_path, caplog):
    config = whole[0].copy_and_resolve_references()
    _, result = prepare.export_store(config, str(tmp_path))
    shard = pathlib.Path(result.store_dir) / "shard_00000.npz"
    good = shard.read_bytes()
    features = np.load(shard)["features"]
    shard.write_bytes(good[: len(good) // 2])  # Truncated.
    with pytest.raises(feature_store.FeatureStoreError, match=r"shard_00000.npz is damaged"):
        feature_store.load_feature_store(result.store_dir)
    _, again = prepare.export_store(config, str(tmp_path))
    assert again.num_computed > 0 and "shard_00000.npz is damaged" in caplog.text
    np.testing.assert_array_equal(np.load(shard)["features"], features)
    good = shard.read_bytes()
    altered = bytearray(good)
    altered[len(good) // 2] ^= 0xFF  # Same size, other bytes, a later time.
    time.sleep(0.01)
    shard.write_bytes(bytes(altered))
    caplog.clear()
    _, again = prepare.export_store(config, str(tmp_path))
    assert again.num_computed > 0 and "CRC-32 differs" in caplog.text
    np.testing.assert_array_equal(np.load(shard)["features"], features)
    metadata = json.loads((pathlib.Path(result.store_dir) / "metadata.json").read_text())
    assert metadata["shards"]["shard_00000.npz"]["size"] == len(good)
