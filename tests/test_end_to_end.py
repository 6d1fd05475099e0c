"""End to end on the tiny scenes config: main.py, resume after a crash, no recompilation."""

import contextlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import EXECUTABLE_EVENTS, saved_params, sigkill_then_resume

from captioning.data import input_pipeline
from captioning.evaluation import evaluate
from captioning.training import train
from configs import test as test_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr", "attribute_accuracy"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _config(cache_dir):
    config = test_config.get_config()
    config.data.cache_dir = cache_dir
    return config


class _Crash(Exception):
    pass


@contextlib.contextmanager
def _compiles_per_epoch(monkeypatch):
    """Counts XLA compilations while each training epoch (and its validation) runs."""
    counts, current = {}, []
    original_epoch = input_pipeline.CaptionBatches.epoch

    def listener(name, *_, **__):
        if name in EXECUTABLE_EVENTS and current:
            counts[current[-1]] = counts.get(current[-1], 0) + 1

    def watched_epoch(self, epoch):
        if self.shuffle:
            current.append(epoch)
        yield from original_epoch(self, epoch)

    monkeypatch.setattr(input_pipeline.CaptionBatches, "epoch", watched_epoch)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        monkeypatch.setattr(input_pipeline.CaptionBatches, "epoch", original_epoch)


def test_resume_after_crash_equals_uninterrupted_run(tmp_path, cache_dir, monkeypatch):
    config = _config(cache_dir)
    config.train.num_epochs = 3
    compiled_lengths = []  # Per compile_for_buckets call: the bucket lengths it compiled.
    original_compile = train.compile_for_buckets

    def recording_compile(*args):
        executables = original_compile(*args)
        compiled_lengths.append(sorted(executables))
        return executables

    monkeypatch.setattr(train, "compile_for_buckets", recording_compile)
    with _compiles_per_epoch(monkeypatch) as compiles:
        whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
    monkeypatch.setattr(train, "compile_for_buckets", original_compile)
    # A step per training bucket; the validation loss pads to one length and compiles one.
    assert len(compiled_lengths[0]) == config.train.num_buckets == 2
    assert len(compiled_lengths[1]) == 1
    # Epoch 0 compiles the decoder in its validation; epoch 1 (training and validation) compiles
    # nothing. (Epoch 2 is followed by the final evaluation, which builds its own decoder.)
    assert compiles.get(0, 0) > 0
    assert compiles.get(1, 0) == 0

    original_epoch = input_pipeline.CaptionBatches.epoch

    def crashing_epoch(self, epoch):
        for i, batch in enumerate(original_epoch(self, epoch)):
            if self.shuffle and epoch == 1 and i == 1:  # Mid-epoch, after a checkpoint.
                raise _Crash()
            yield batch

    monkeypatch.setattr(input_pipeline.CaptionBatches, "epoch", crashing_epoch)
    with pytest.raises(_Crash):
        train.train_and_evaluate(config, str(tmp_path / "resumed"))
    step, _ = saved_params(str(tmp_path / "resumed"))
    monkeypatch.setattr(input_pipeline.CaptionBatches, "epoch", original_epoch)
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))

    whole_step, whole_params = saved_params(str(tmp_path / "whole"))
    resumed_step, resumed_params = saved_params(str(tmp_path / "resumed"))
    assert 0 < step < resumed_step == whole_step
    for a, b in zip(jax.tree.leaves(whole_params), jax.tree.leaves(resumed_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed["metrics"] == whole["metrics"]
    assert resumed["captions"] == whole["captions"]
    history = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_sigkill_mid_run_then_same_command_resumes_and_finishes(tmp_path, cache_dir):
    """The README's promise, literally: kill -9 the process, rerun the same command; the
    finished run has every artifact, and --mode=evaluate reproduces its report."""
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "main.py",
        "--config=configs/test.py",
        f"--workdir={workdir}",
        f"--config.data.cache_dir={cache_dir}",
        "--config.train.num_epochs=20",
    ]
    history = sigkill_then_resume(command, workdir, tmp_path / "killed_run.log")
    assert [h["epoch"] for h in history] == list(range(1, 21))
    steps_per_epoch = history[0]["step"]
    report = json.loads((workdir / "eval" / "test_greedy.json").read_text())
    assert history[-1]["step"] == 20 * steps_per_epoch
    step, params = saved_params(str(workdir))
    assert step == 20 * steps_per_epoch
    assert report["step"] <= step
    # The killed and resumed run ends where an uninterrupted one ends, parameter for parameter.
    whole = tmp_path / "uninterrupted"
    command_whole = [*command[:3], f"--workdir={whole}", *command[4:]]
    result = subprocess.run(command_whole, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    step_whole, params_whole = saved_params(str(whole))
    assert step_whole == step
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_whole), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    for name in ["config.json", "vocab.json", "history.json", "samples.png", "curves.png"]:
        assert (workdir / name).exists(), name
    assert set(METRICS) <= set(report["metrics"])
    assert len(report["captions"]) == 8 and report["step"] > 0
    assert report["decode"]["method"] == "greedy"
    assert "| greedy |" in (workdir / "results.md").read_text()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    assert os.listdir(workdir / "checkpoints" / "best")
    # Evaluate mode reads the run's own config and writes the same report again.
    result = subprocess.run(
        [sys.executable, "main.py", "--mode=evaluate", f"--workdir={workdir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((workdir / "eval" / "test_greedy.json").read_text())
    assert again["metrics"] == report["metrics"]


def test_changed_config_in_same_workdir_is_refused(tmp_path, cache_dir, monkeypatch):
    config = _config(cache_dir)
    # A run that stopped right after writing its config (all a later run checks against).
    monkeypatch.setattr(train, "prepare_data", lambda *a, **k: pytest.fail("not refused"))
    with pytest.raises(pytest.fail.Exception, match="not refused"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["hidden_size"] == 32
    config.model.hidden_size = 64
    with pytest.raises(ValueError, match="model.hidden_size"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_evaluate_with_beam_and_sampling_adds_reports(tmp_path, cache_dir):
    from captioning import cli

    config = _config(cache_dir)
    config.train.num_epochs = 1
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    config.decode.method = "beam"
    beam = cli.run("evaluate", config, workdir)
    config.decode.method = "sample"
    sample = cli.run("evaluate", config, workdir)
    again = cli.run("evaluate", config, workdir)
    greedy = (tmp_path / "run" / "eval" / "test_greedy.json").read_text()
    config.decode.method, config.decode.block_repeats = "greedy", False
    unblocked = cli.run("evaluate", config, workdir)
    assert beam["decode"]["method"] == "beam" and sample["decode"]["method"] == "sample"
    assert again["captions"] == sample["captions"]  # Sampling is reproducible (decode.seed).
    assert not unblocked["decode"]["block_repeats"]
    # Its own report: the default (blocked) one is still there, unchanged.
    assert (tmp_path / "run" / "eval" / "test_greedy.json").read_text() == greedy
    for name in ["test_greedy.json", "test_beam.json", "test_sample.json"]:
        assert (tmp_path / "run" / "eval" / name).exists()
    assert not json.loads((tmp_path / "run" / "eval" / "test_greedy_unblocked.json").read_text())[
        "decode"
    ]["block_repeats"]
    rows = [r.split("|") for r in (tmp_path / "run" / "results.md").read_text().splitlines()[2:]]
    assert [(r[1].strip(), r[2].strip(), r[4].strip()) for r in rows] == [
        ("xe", "greedy", "test"),
        ("xe", "greedy", "test_perturbed"),  # eval.extra_splits, scored after training too.
        ("xe", "beam", "test"),
        ("xe", "sample", "test"),
        ("xe", "sample", "test"),
        ("xe", "greedy_unblocked", "test"),
    ]


def test_early_stopping_with_patience(tmp_path, cache_dir, monkeypatch):
    config = _config(cache_dir)
    config.train.num_epochs = 5
    config.train.patience = 1
    config.train.val_metric = "CIDEr"
    scores = iter([0.5, 0.4, 0.3, 0.2, 0.1])  # Validation CIDEr only gets worse.
    original = evaluate.validate

    def fake_validate(*args):
        result = original(*args)
        result["CIDEr"] = next(scores)
        return result

    monkeypatch.setattr(evaluate, "validate", fake_validate)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]  # Epoch 2 did not improve: stop.
    assert saved_params(tmp_path / "run", "best")[0] == history[0]["step"]


def test_val_metric_combination_picks_the_best_epoch_and_says_so(tmp_path, cache_dir, monkeypatch):
    """train.val_metric as a weighted sum: the epoch with the best sum is the one evaluated, and
    the eval JSON names it and its value."""
    config = _config(cache_dir)
    config.train.num_epochs = 3
    config.train.val_metric = "attribute_accuracy + 0.5*relation_accuracy"
    # Epoch 2 is best by the sum (0.5 + 0.5*0.8 = 0.9) though epoch 3 has the best attributes.
    fake = iter([(0.2, 0.0), (0.5, 0.8), (0.6, 0.1)])
    original = evaluate.validate

    def fake_validate(*args):
        scores = original(*args)
        scores["attribute_accuracy"], scores["relation_accuracy"] = next(fake)
        return scores

    monkeypatch.setattr(evaluate, "validate", fake_validate)
    report = train.train_and_evaluate(config, str(tmp_path / "run"))
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [round(h["eval_selection"], 4) for h in history] == [0.2, 0.9, 0.65]
    assert report["checkpoint"]["epoch"] == 2
    assert report["checkpoint"]["value"] == pytest.approx(0.9)
    assert report["step"] == history[1]["step"]


def test_val_metric_errors_name_the_field():
    with pytest.raises(ValueError, match="config.train.val_metric"):
        evaluate.parse_selection("0.5*")
    assert evaluate.parse_selection(" CIDEr ") == [(1.0, "CIDEr")]
    terms = evaluate.parse_selection("attribute_accuracy+relation_accuracy+0.1*CIDEr")
    assert terms == [(1.0, "attribute_accuracy"), (1.0, "relation_accuracy"), (0.1, "CIDEr")]
    scores = {"attribute_accuracy": 0.9, "relation_accuracy": 0.5, "CIDEr": 3.0}
    assert evaluate.selection_value(terms, scores) == pytest.approx(1.7)
    with pytest.raises(ValueError, match="relation_acc.*use any of"):
        evaluate.selection_value([(1.0, "relation_acc")], scores)
