"""The one training loop: `run(phase, ...)`, for cross-entropy (`training.train`) and SCST
(`training.scst`) alike.

It owns everything a phase does around its steps: resume from the newest checkpoint, the metric
writers (TensorBoard, log lines, `history.json`) and progress with ETA, the epoch loop with early
stopping, per-epoch validation (greedy captions scored, `evaluation.evaluate.validate`) and
selection by `train.val_metric`, Orbax checkpoints (latest N and the best), and the final scoring
of the best checkpoint. A `Phase` supplies what differs: its batches, its jitted step, the
statistics it accumulates (a `StepStats` dataclass), and any extra validation figure.

Resume is exact: the data order of an epoch depends only on (seed, epoch), keys only on (seed,
step), and checkpoints are written at epoch ends (and every `train.checkpoint_every_steps`, their
progress saying how many of the epoch's batches are done, which a resumed run skips), so a run
killed at any point and restarted with the same command ends with the same parameters as one that
was never interrupted. The faults it survives (`captioning.faults`, README "What survives what"):
SIGTERM or SIGINT (the current step finishes, a checkpoint is written, the process exits with
128 + the signal's number, saying how to resume), a damaged checkpoint (moved aside, the newest
intact one resumes), a full disk (one line naming the file), a non-finite loss or gradient norm
(stops at that step; no checkpoint holds it).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from flax import traverse_util

from captioning import checkpoint, faults
from captioning.data.prepare import PreparedData
from captioning.evaluation import evaluate, metrics
from captioning.run_dir import CONFIG_FILE, RunDir

HISTORY_FILE = "history.json"
# Fields that only change how long, how loudly or how a run is scored, not what it learns: a
# rerun may change them and still resume.
RESUMABLE_CHANGES = {
    ("train", "num_epochs"),
    ("train", "patience"),
    ("train", "log_every"),
    ("train", "keep_checkpoints"),
    ("train", "checkpoint_every_steps"),
    ("data", "cache_dir"),
    ("data", "skip_bad_images"),  # Retrying after a bad image was named.
    ("eval",),
    ("decode",),
}


class StepStats:
    """What a phase accumulates over steps: `add` one step's statistics (host values), `window`
    the scalars logged every `train.log_every` steps ({} for none), `epoch` the epoch's."""

    def add(self, stats: dict[str, Any]) -> None:
        raise NotImplementedError

    def window(self, seconds: float) -> dict[str, float]:
        return {}

    def epoch(self, seconds: float) -> dict[str, float]:
        raise NotImplementedError

    def merge(self, other: StepStats) -> None:
        """Adds a finished window's sums into the epoch's."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class Phase:
    """A training phase: what `run` needs besides the run's data and checkpoints.

    Attributes set by subclasses: `name` ('xe' | 'scst'), `num_epochs`, `steps_per_epoch`,
    `patience` (0: none), `curves` (history keys drawn in curves.png), `validate_start` (score
    the starting parameters as epoch 0, which the phase must beat to be chosen), `finite` (the
    step statistics that must stay finite) and `remedies` (the config fields to change when
    they do not).
    """

    name = ""
    finite: tuple[str, ...] = ("grad_norm",)
    remedies: tuple[str, ...] = ("train.learning_rate", "train.grad_clip")
    num_epochs = 0
    steps_per_epoch = 0
    patience = 0
    curves: tuple[str, ...] = ("eval_selection",)
    validate_start = False

    def batches(self, epoch: int) -> Iterable[Any]:
        """The epoch's batches, in an order that depends only on (seed, epoch)."""
        raise NotImplementedError

    def step(self, params, opt_state, batch: Any, step: int) -> tuple[Any, Any, Any]:
        """-> (params, opt_state, statistics: device values, read back one step late)."""
        raise NotImplementedError

    def new_stats(self) -> StepStats:
        raise NotImplementedError

    def validation(self, params) -> dict[str, float]:
        """Extra validation figures (e.g. `eval_loss`), computed before the captions."""
        return {}

    def learning_rate(self, step: int) -> float | None:
        return None


@dataclasses.dataclass
class Progress:
    """The checkpoint's `progress` item: epochs done, the best validation value so far, the epoch
    that reached it, the epochs since (early stopping), and the steps of the next epoch already
    done (a mid-epoch checkpoint; 0 at epoch ends)."""

    epoch: int = 0
    best_metric: float = -np.inf
    best_epoch: int = 0
    epochs_since_best: int = 0
    step_in_epoch: int = 0

    def state(self) -> dict[str, np.ndarray]:
        return progress_state(*dataclasses.astuple(self))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        return cls(
            int(state["epoch"]),
            float(state["best_metric"]),
            int(state["best_epoch"]),
            int(state["epochs_since_best"]),
            int(state.get("step_in_epoch", 0)),  # Checkpoints from before it was recorded: 0.
        )


def progress_state(
    epoch: int, best_metric: float, best_epoch: int, epochs_since_best: int, step_in_epoch: int = 0
) -> dict[str, Any]:
    """`Progress` as the arrays a checkpoint stores."""
    return {
        "epoch": np.array(epoch, np.int32),
        "best_metric": np.array(best_metric, np.float32),
        "best_epoch": np.array(best_epoch, np.int32),
        "epochs_since_best": np.array(epochs_since_best, np.int32),
        "step_in_epoch": np.array(step_in_epoch, np.int32),
    }


def check_resumable_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses to continue a run whose saved config differs in anything but run length."""
    run = RunDir(workdir)
    saved = run.saved_config()
    if saved is None:
        return
    saved = traverse_util.flatten_dict(saved)
    current = traverse_util.flatten_dict(json.loads(config.to_json()))
    diffs = [
        ".".join(key)
        for key in sorted(current)
        if key[:1] not in RESUMABLE_CHANGES
        and key[:2] not in RESUMABLE_CHANGES
        and saved.get(key) != current.get(key)
    ]
    if diffs:
        raise ValueError(
            f"{workdir} holds a run with a different config ({', '.join(diffs)} differ from "
            f"{run.file(CONFIG_FILE)}). Use a new --workdir, or the same config to resume."
        )


def resume(latest_mgr, state: dict[str, Any], workdir: str) -> tuple[dict[str, Any], list[dict]]:
    """-> (state restored from the newest intact checkpoint, or as given when there is none; the
    history of the epochs it holds). Damaged newer checkpoints are moved aside (logged)."""
    # The progress item as saved: checkpoints written before a field was added still resume.
    step, restored = checkpoint.restore_newest_intact(latest_mgr, **{**state, "progress": None})
    if step is None:
        return state, []
    state = {**restored, "progress": Progress.from_state(restored["progress"]).state()}
    epoch = int(state["progress"]["epoch"])
    history = []
    path = os.path.join(workdir, HISTORY_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            history = [h for h in json.load(f) if h["epoch"] <= epoch]
    logging.info("Resumed from %s at step %d (epoch %d).", workdir, step, epoch)
    return state, history


def _hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {k: v for k, v in flat.items() if isinstance(v, int | float | str | bool)}


@dataclasses.dataclass
class Run:
    """What the loop works on: the config, the run folder, the data, the greedy decoder shared by
    validation and the final evaluation, and how parameters are placed (`place`) and read back
    for per-process decoding (`local`)."""

    config: ml_collections.ConfigDict
    workdir: str
    data: PreparedData
    decode_greedy: Any
    decoders: dict
    place: Any = lambda tree: tree
    local: Any = lambda tree: tree


def run(phase: Phase, run_: Run, state: dict[str, Any]) -> dict[str, Any]:
    """Trains `phase` from `state` ({params, opt_state, progress}), resuming from the workdir's
    newest intact checkpoint, then scores the best checkpoint. Returns `eval.split`'s report.

    SIGTERM or SIGINT stop it after the current step with a checkpoint (SystemExit 128 + the
    signal's number); a non-finite loss or gradient norm raises `faults.Diverged`."""
    config, workdir, data = run_.config, run_.workdir, run_.data
    latest_mgr, best_mgr = checkpoint.managers(workdir, config.train.keep_checkpoints)
    state, history = resume(latest_mgr, state, workdir)
    params, opt_state = run_.place(state["params"]), run_.place(state["opt_state"])
    progress = Progress.from_state(state["progress"])
    start_epoch = progress.epoch
    every = int(config.train.get("checkpoint_every_steps", 0))

    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=False
    )
    if start_epoch == 0 and progress.step_in_epoch == 0:
        writer.write_hparams(_hparams(config))
    # Logs steps/s, percent done and ETA every `log_every` steps.
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=phase.steps_per_epoch * phase.num_epochs,
        every_steps=config.train.log_every,
        every_secs=None,
    )
    selection = evaluate.parse_selection(config.train.val_metric)  # Bad syntax fails first.

    def validate(params) -> tuple[dict[str, float], float]:
        scores = evaluate.validate(run_.decode_greedy, run_.local(params), data, config)
        logged = {f"eval_{k}": v for k, v in metrics.logged(scores, config.data.dataset).items()}
        return logged, evaluate.selection_value(selection, scores)

    if phase.validate_start and start_epoch == 0 and progress.step_in_epoch == 0:
        # Epoch 0 is the starting point: the phase must beat it to be chosen.
        logged, value = validate(params)
        history.append({"epoch": 0, "step": 0, **logged, "eval_selection": value})
        if evaluate.writes_files():  # A mid-epoch checkpoint of epoch 1 resumes after it.
            RunDir(workdir).write_json(HISTORY_FILE, history)
        progress = Progress(0, value, 0, 0)
        if best_mgr.latest_step() is None:  # (A rerun killed in epoch 1 has it already.)
            checkpoint.save(
                best_mgr, 0, params=params, opt_state=opt_state, progress=progress.state()
            )
    guard = Guard(phase, config, latest_mgr)
    step = start_epoch * phase.steps_per_epoch + progress.step_in_epoch
    stop = faults.StopSignals()
    # Pending (asynchronous) checkpoint writes finish even when training is interrupted by an
    # exception, so a rerun resumes from the newest finished checkpoint.
    try:
        with stop:
            for epoch in range(start_epoch, phase.num_epochs):
                if phase.patience and progress.epochs_since_best >= phase.patience:
                    logging.info(
                        "Early stop: no better %s for %d epochs.",
                        config.train.val_metric,
                        progress.epochs_since_best,
                    )
                    break
                epoch_start = time.perf_counter()

                def after_step(step, done, params, opt_state, read_back) -> bool:
                    # A signal: checkpoint and stop; `train.checkpoint_every_steps`: checkpoint.
                    nonlocal progress
                    stopping = stop_agreed(stop, step, config.train.log_every)
                    if stopping or (every and step % every == 0):
                        read_back()  # No checkpoint after a non-finite step.
                        progress = dataclasses.replace(progress, step_in_epoch=done)
                        state = {"params": params, "opt_state": opt_state}
                        checkpoint.save(latest_mgr, step, **state, progress=progress.state())
                    return stopping

                # A mid-epoch checkpoint's batches are done: skipped, in the same order.
                params, opt_state, step, epoch_stats = train_steps(
                    phase,
                    params,
                    opt_state,
                    epoch,
                    step,
                    config.train.log_every,
                    window_writer(phase, writer),
                    report_progress,
                    skip=progress.step_in_epoch if epoch == start_epoch else 0,
                    check=guard.checked,
                    after_step=after_step,
                )
                if step < (epoch + 1) * phase.steps_per_epoch:  # Stopped by a signal.
                    break
                train_seconds = time.perf_counter() - epoch_start

                # ---- validation and selection ------------------------------------------------
                epoch_metrics = {**epoch_stats.epoch(train_seconds), **phase.validation(params)}
                logged, value = validate(params)
                epoch_metrics.update({**logged, "eval_selection": value})
                improved = value > progress.best_metric
                if improved:
                    progress = Progress(epoch + 1, value, epoch + 1, 0)
                else:
                    progress = dataclasses.replace(
                        progress,
                        epoch=epoch + 1,
                        epochs_since_best=progress.epochs_since_best + 1,
                        step_in_epoch=0,
                    )
                end_epoch(
                    writer,
                    (latest_mgr, best_mgr),
                    history,
                    workdir,
                    step,
                    (epoch + 1, phase.num_epochs),
                    epoch_metrics,
                    {"params": params, "opt_state": opt_state, "progress": progress.state()},
                    improved,
                    (time.perf_counter() - epoch_start, train_seconds),
                )
                if epoch + 1 < phase.num_epochs and stop_agreed(stop, step, 1):
                    break
    finally:
        close(writer, latest_mgr, best_mgr)
    if stop.signum and latest_mgr.latest_step() == step:
        logging.warning(
            "Stopped by %s after step %d (epoch %d, %d of its %d steps done); checkpoint %s is "
            "written. To resume, run the same command: %s",
            stop.name,
            step,
            progress.epoch + (progress.step_in_epoch > 0),
            progress.step_in_epoch or phase.steps_per_epoch,
            phase.steps_per_epoch,
            checkpoint.step_path(latest_mgr, step),
            faults.resume_command(),
        )
        raise SystemExit(128 + stop.signum)
    return finish(config, workdir, data, history, phase.curves, run_.decoders)


def stop_agreed(stop: faults.StopSignals, step: int, every: int) -> bool:
    """Whether to stop after `step`: a signal arrived. With several processes they agree (any
    process's signal stops all) every `every` steps, so that all save the same step."""
    if jax.process_count() == 1:
        return bool(stop.signum)
    if step % every:
        return False
    from jax.experimental import multihost_utils

    signums = multihost_utils.process_allgather(np.array(stop.signum, np.int32))
    stop.signum = int(np.max(signums))
    return bool(stop.signum)


class Guard:
    """Stops a diverging run: `checked(stats, step)` raises `faults.Diverged` when one of the
    phase's `finite` statistics is NaN or infinite, naming the step, the last good checkpoint
    and the settings to change. Every read-back is checked, so every checkpoint's last step."""

    def __init__(self, phase: Phase, config, latest_mgr):
        self.phase, self.config, self.latest_mgr = phase, config, latest_mgr

    def checked(self, stats: dict[str, Any], step: int) -> dict[str, Any]:
        """stats: one step's (host values), of step number `step` or the one before."""
        bad = {}
        for key in self.phase.finite:
            if key in stats and not math.isfinite(float(stats[key])):
                bad[key] = float(stats[key])
        if not bad:
            return stats
        checkpoint.wait(self.latest_mgr)
        good = self.latest_mgr.latest_step()
        where = (
            f"the last good checkpoint is {checkpoint.step_path(self.latest_mgr, good)}"
            if good is not None
            else "no checkpoint was written yet"
        )
        values = ", ".join(f"{k} {v}" for k, v in bad.items())
        settings = " or ".join(
            f"--config.{name} (now {self.config[name.split('.')[0]][name.split('.')[1]]})"
            for name in self.phase.remedies
        )
        raise faults.Diverged(
            f"Training diverged at step {step} ({values}): stopped; {where} (no checkpoint holds "
            f"non-finite values). Try a lower {settings}, in a new --workdir."
        )


def window_writer(phase: Phase, writer) -> Callable[[int, StepStats, float], bool]:
    """`train_steps`' `on_window` of a run: logs the window's scalars (`train_targets_per_s`, ...)
    and the learning rate to `writer`, and never ends the epoch early."""

    def write(step: int, window: StepStats, seconds: float) -> bool:
        scalars = window.window(seconds)
        if scalars:
            rate = phase.learning_rate(step)
            extra = {} if rate is None else {"train_learning_rate": float(rate)}
            writer.write_scalars(step, {**scalars, **extra})
        return False

    return write


def train_steps(
    phase: Phase,
    params,
    opt_state,
    epoch: int,
    step: int,
    log_every: int,
    on_window: Callable[[int, StepStats, float], bool],
    on_step: Callable[[int], Any] | None = None,
    *,
    skip: int = 0,
    check: Callable[[dict[str, Any], int], dict[str, Any]] | None = None,
    after_step: Callable[..., bool] | None = None,
) -> tuple[Any, Any, int, StepStats]:
    """One epoch's steps from global `step`, as every run trains (and the benchmark times).

    Each step's statistics are read back one step late (the host never waits for the device),
    except every `log_every` steps, where the window's are read back and `on_window(step,
    window, seconds)` is called (seconds: the window's wall time); it returns True to end the
    epoch there. `on_step(step)` runs after each step. `skip`: the epoch's batches already
    done (a mid-epoch resume); `check(stats, step)` sees every read-back (it may raise);
    `after_step(step, done, params, opt_state, read_back)` runs after each step but an epoch's
    last (`done`: the epoch's steps so far; `read_back()` reads the pending statistics first) and
    returns True to end the epoch. -> (params, opt_state, step, the epoch's statistics so far).
    """
    check = check or (lambda stats, step: stats)
    epoch_stats, window = phase.new_stats(), phase.new_stats()
    window_start = time.perf_counter()
    pending = None  # Statistics are read back one step late: the host never waits.

    def read_back():
        nonlocal pending
        if pending is not None:
            window.add(check(jax.device_get(pending), step))
            pending = None

    done = skip
    for batch in itertools.islice(phase.batches(epoch), skip, None):
        params, opt_state, stats = phase.step(params, opt_state, batch, step)
        if pending is not None:
            window.add(check(pending, step))
        pending = stats
        step += 1
        done += 1
        if on_step is not None:
            on_step(step)
        if step % log_every == 0:
            read_back()
            epoch_stats.merge(window)
            stop = on_window(step, window, time.perf_counter() - window_start)
            window, window_start = phase.new_stats(), time.perf_counter()
            if stop:
                break
        if done == phase.steps_per_epoch:
            break  # The epoch's end saves it.
        if after_step is not None and after_step(step, done, params, opt_state, read_back):
            break
    read_back()
    epoch_stats.merge(window)
    return params, opt_state, step, epoch_stats


def end_epoch(
    writer,
    managers,
    history: list[dict],
    workdir: str,
    step: int,
    epochs: tuple[int, int],
    epoch_metrics: dict[str, float],
    state: dict[str, Any],
    improved: bool,
    seconds: tuple[float, float],
) -> None:
    """Writes an epoch's metrics (TensorBoard, history.json, log line) and its checkpoints:
    latest always, best when `improved`. epochs: (done, total); seconds: (epoch, training)."""
    writer.write_scalars(step, epoch_metrics)
    history.append({"epoch": epochs[0], "step": step, **epoch_metrics})
    if evaluate.writes_files():
        RunDir(workdir).write_json(HISTORY_FILE, history)
    latest_mgr, best_mgr = managers
    checkpoint.save(latest_mgr, step, **state)
    if improved:
        checkpoint.save(best_mgr, step, **state)
    logging.info(
        "Epoch %d/%d (step %d) in %.1fs (train %.1fs, validation %.1fs): %s%s",
        *epochs,
        step,
        seconds[0],
        seconds[1],
        seconds[0] - seconds[1],
        ", ".join(f"{k} {v:.4f}" for k, v in epoch_metrics.items()),
        " (best)" if improved else "",
    )


def close(writer, *managers) -> None:
    """Finishes pending (asynchronous) checkpoint writes and events, also after an exception,
    so a rerun resumes from the newest finished checkpoint. A write that found the disk full
    raises `faults.DiskFull` once every manager is closed."""
    full = None
    for manager in managers:
        try:
            checkpoint.wait(manager)
        except faults.DiskFull as e:
            full = full or e
        manager.close()
    writer.flush()
    if full is not None:
        raise full


def finish(
    config, workdir: str, data: PreparedData, history, curves, decoders: dict | None = None
) -> dict[str, Any]:
    """curves.png of the `curves` history keys, then the best checkpoint scored on `eval.split`
    (the returned report) and on every split of `eval.extra_splits` the data has, with the
    jitted `decoders` ({method: fn}) the run has already compiled."""
    from captioning.evaluation import visualize

    if config.eval.meteor:  # Its JVM starts up on the other core while the split decodes.
        metrics.start_meteor()
    if evaluate.writes_files():
        visualize.plot_curves(os.path.join(workdir, "curves.png"), history, curves)
    inference = RunDir(workdir).restore(
        config.model,
        len(data.vocab),
        data.features.shape[1:],
        config.eval.get("checkpoint", "best"),
    )
    shared = {"data": data, "inference": inference, "decoders": decoders or {}}
    report = evaluate.evaluate(config, workdir, split=config.eval.split, **shared)
    for split in filter(None, (s.strip() for s in config.eval.extra_splits.split(","))):
        if data.splits.get(split) and split != config.eval.split:
            evaluate.evaluate(config, workdir, split=split, **shared)
    return report
