"""The one training loop: `run(phase, ...)`, for cross-entropy (`training.train`) and SCST
(`training.scst`) alike.

It owns everything a phase does around its steps: resume from the newest checkpoint, the metric
writers (TensorBoard, log lines, `history.json`) and progress with ETA, the epoch loop with early
stopping, per-epoch validation (greedy captions scored, `evaluation.evaluate.validate`) and
selection by `train.val_metric`, Orbax checkpoints (latest N and the best), and the final scoring
of the best checkpoint. A `Phase` supplies what differs: its batches, its jitted step, the
statistics it accumulates (a `StepStats` dataclass), and any extra validation figure.

Resume is exact: the data order of an epoch depends only on (seed, epoch), keys only on (seed,
step), and checkpoints are written at epoch ends, so a run killed at any point and restarted with
the same command ends with the same parameters as one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
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

from captioning import checkpoint
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
    the starting parameters as epoch 0, which the phase must beat to be chosen).
    """

    name = ""
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
    that reached it, and the epochs since (early stopping)."""

    epoch: int = 0
    best_metric: float = -np.inf
    best_epoch: int = 0
    epochs_since_best: int = 0

    def state(self) -> dict[str, np.ndarray]:
        return progress_state(self.epoch, self.best_metric, self.best_epoch, self.epochs_since_best)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        return cls(
            int(state["epoch"]),
            float(state["best_metric"]),
            int(state["best_epoch"]),
            int(state["epochs_since_best"]),
        )


def progress_state(
    epoch: int, best_metric: float, best_epoch: int, epochs_since_best: int
) -> dict[str, Any]:
    """`Progress` as the arrays a checkpoint stores."""
    return {
        "epoch": np.array(epoch, np.int32),
        "best_metric": np.array(best_metric, np.float32),
        "best_epoch": np.array(best_epoch, np.int32),
        "epochs_since_best": np.array(epochs_since_best, np.int32),
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
    """-> (state restored from the newest checkpoint, or as given when there is none; the
    history of the epochs it holds)."""
    step = latest_mgr.latest_step()
    if step is None:
        return state, []
    state = checkpoint.restore(latest_mgr, step, **state)
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
    newest checkpoint, then scores the best checkpoint. Returns `eval.split`'s report."""
    config, workdir, data = run_.config, run_.workdir, run_.data
    latest_mgr, best_mgr = checkpoint.managers(workdir, config.train.keep_checkpoints)
    state, history = resume(latest_mgr, state, workdir)
    params, opt_state = run_.place(state["params"]), run_.place(state["opt_state"])
    progress = Progress.from_state(state["progress"])
    start_epoch = progress.epoch

    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=False
    )
    if start_epoch == 0:
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

    if phase.validate_start and start_epoch == 0:
        # Epoch 0 is the starting point: the phase must beat it to be chosen.
        logged, value = validate(params)
        history.append({"epoch": 0, "step": 0, **logged, "eval_selection": value})
        progress = Progress(0, value, 0, 0)
        if best_mgr.latest_step() is None:  # (A rerun killed in epoch 1 has it already.)
            checkpoint.save(
                best_mgr, 0, params=params, opt_state=opt_state, progress=progress.state()
            )

    step = start_epoch * phase.steps_per_epoch
    # Pending (asynchronous) checkpoint writes finish even when training is interrupted by an
    # exception, so a rerun resumes from the newest finished epoch.
    try:
        for epoch in range(start_epoch, phase.num_epochs):
            if phase.patience and progress.epochs_since_best >= phase.patience:
                logging.info(
                    "Early stop: no better %s for %d epochs.",
                    config.train.val_metric,
                    progress.epochs_since_best,
                )
                break
            epoch_start = time.perf_counter()
            params, opt_state, step, epoch_stats = train_steps(
                phase,
                params,
                opt_state,
                epoch,
                step,
                config.train.log_every,
                window_writer(phase, writer),
                report_progress,
            )
            train_seconds = time.perf_counter() - epoch_start

            # ---- validation and selection ----------------------------------------------------
            epoch_metrics = {**epoch_stats.epoch(train_seconds), **phase.validation(params)}
            logged, value = validate(params)
            epoch_metrics.update({**logged, "eval_selection": value})
            improved = value > progress.best_metric
            if improved:
                progress = Progress(epoch + 1, value, epoch + 1, 0)
            else:
                progress = dataclasses.replace(
                    progress, epoch=epoch + 1, epochs_since_best=progress.epochs_since_best + 1
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
    finally:
        close(writer, latest_mgr, best_mgr)
    return finish(config, workdir, data, history, phase.curves, run_.decoders)


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
) -> tuple[Any, Any, int, StepStats]:
    """One epoch's steps from global `step`, as every run trains (and the benchmark times).

    Each step's statistics are read back one step late (the host never waits for the device),
    except every `log_every` steps, where the window's are read back and `on_window(step,
    window, seconds)` is called (seconds: the window's wall time); it returns True to end the
    epoch there. `on_step(step)` runs after each step. -> (params, opt_state, step, the epoch's
    statistics so far).
    """
    epoch_stats, window = phase.new_stats(), phase.new_stats()
    window_start = time.perf_counter()
    pending = None  # Statistics are read back one step late: the host never waits.
    for batch in phase.batches(epoch):
        params, opt_state, stats = phase.step(params, opt_state, batch, step)
        if pending is not None:
            window.add(pending)
        pending = stats
        step += 1
        if on_step is not None:
            on_step(step)
        if step % log_every == 0:
            window.add(jax.device_get(pending))
            pending = None
            epoch_stats.merge(window)
            stop = on_window(step, window, time.perf_counter() - window_start)
            window, window_start = phase.new_stats(), time.perf_counter()
            if stop:
                break
    if pending is not None:
        window.add(jax.device_get(pending))
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
    so a rerun resumes from the newest finished epoch."""
    for manager in managers:
        manager.wait_until_finished()
        manager.close()
    writer.flush()


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
    inference = RunDir(workdir).restore(config.model, len(data.vocab), data.features.shape[1:])
    shared = {"data": data, "inference": inference, "decoders": decoders or {}}
    report = evaluate.evaluate(config, workdir, split=config.eval.split, **shared)
    for split in filter(None, (s.strip() for s in config.eval.extra_splits.split(","))):
        if data.splits.get(split) and split != config.eval.split:
            evaluate.evaluate(config, workdir, split=split, **shared)
    return report
