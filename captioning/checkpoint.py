"""Orbax checkpoints of a run: `checkpoints/{latest,best}/<step>/{params,opt_state,progress}`.

Each checkpoint is a `Composite` of three items, so evaluation, caption mode and the web demo
restore the parameters alone (`restore_params`), without building an optimizer:

  params     the model's parameter pytree (`nnx.split(model)[1]`)
  opt_state  the optax state (training only)
  progress   small arrays that let a rerun continue exactly: epoch, best metric, ...

`latest` keeps the last `train.keep_checkpoints` checkpoints (resume; mid-epoch ones with
`train.checkpoint_every_steps`); `best` keeps the epoch with the best validation metric
(evaluation). Restoring checks what it reads: a checkpoint that cannot be read (truncated or
missing files) raises `faults.DamagedCheckpoint` naming it; training moves it aside to
`checkpoints/damaged/` (`restore_newest_intact`) and resumes from the newest intact one.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from captioning import faults

ITEMS = ("params", "opt_state", "progress")


def manager_at(path: str, max_to_keep: int | None = None, create: bool = False):
    """The manager of one checkpoint folder (`latest` or `best`), knowing its three items."""
    # With several processes, the `latest` and `best` managers may both be writing the same step
    # in the background: their barriers need names of their own (the same name on both is
    # refused as "already ongoing" and the save times out).
    barriers = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=os.path.basename(path))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=create, multiprocessing_options=barriers
    )
    item_handlers = {name: ocp.StandardCheckpointHandler() for name in ITEMS}
    return ocp.CheckpointManager(path, options=options, item_handlers=item_handlers)


def managers(workdir: str, keep: int) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
    """(latest: keeps the last `keep` epochs, best: keeps the best epoch by the val metric)."""
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    return (
        manager_at(os.path.join(root, "latest"), keep, create=True),
        manager_at(os.path.join(root, "best"), 1, create=True),
    )


_TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax's name for a checkpoint still being written.


def _nbytes(tree: Any) -> int:
    return sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree))


def save(manager: ocp.CheckpointManager, step: int, **items: Any) -> None:
    """Saves (asynchronously) the items `params`, `opt_state`, `progress` at `step`.

    A full disk, found now or when the write finishes (`wait`), raises `faults.DiskFull` naming
    the checkpoint and the bytes it needs; its unfinished folder is removed."""
    # For the message of a write that fails in the background (`wait`).
    manager.pending = step_path(manager, step), _nbytes(items)
    try:
        with faults.writing(*manager.pending):
            manager.save(
                step,
                args=ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()}),
            )
    except faults.DiskFull:
        remove_unfinished(manager)
        raise


def wait(manager: ocp.CheckpointManager) -> None:
    """Waits for the manager's pending write; a full disk raises `faults.DiskFull`."""
    try:
        with faults.writing(*getattr(manager, "pending", (str(manager.directory), None))):
            manager.wait_until_finished()
    except faults.DiskFull:
        remove_unfinished(manager)
        raise


def remove_unfinished(manager: ocp.CheckpointManager) -> None:
    """Removes the folders of checkpoints whose write never finished (Orbax's temporary ones)."""
    if jax.process_index() != 0:
        return
    folder = str(manager.directory)
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if _TMP_MARK in name:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def abstract(tree: Any) -> Any:
    """Shapes and dtypes of a pytree: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _restore(manager: ocp.CheckpointManager, step: int, **targets: Any) -> dict[str, Any]:
    args = {
        k: ocp.args.StandardRestore(None if v is None else abstract(v)) for k, v in targets.items()
    }
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    return {k: restored[k] for k in targets}


def _first_line(error: BaseException) -> str:
    """The first line of the innermost error (tensorstore's, e.g. "OUT_OF_RANGE: Error reading
    ..."), which says what is wrong; Orbax's wrappers around it only say where."""
    for _ in range(20):
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= 200 else line[:197] + "..."


@contextlib.contextmanager
def _quiet_unraisable():
    """Orbax leaves the reads of a failed restore as coroutines never awaited; Python would
    print each as "Exception ignored in ..." with its traceback when it is collected."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


def damage(manager: ocp.CheckpointManager, step: int, items=ITEMS) -> str | None:
    """What is wrong with checkpoint `step` (None: its `items` read back as saved)."""
    try:
        present = {k for k, v in manager.item_metadata(step).items() if v is not None}
        missing = [k for k in items if k not in present]
        if missing:
            return f"item {missing[0]} missing"
        _restore(manager, step, **dict.fromkeys(items))
    except Exception as e:  # Orbax and tensorstore raise many kinds; the probe names it.
        return _first_line(e)
    return None


def step_path(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def restore(manager: ocp.CheckpointManager, step: int, **targets: Any) -> dict[str, Any]:
    """Restores the named items (e.g. params=..., progress=...) into the shapes and dtypes of
    their targets (a target None restores the item as saved). A checkpoint that cannot be read
    as saved either raises `faults.DamagedCheckpoint` naming it and what is wrong; a target
    that does not fit an intact checkpoint raises Orbax's own error."""
    try:
        with _quiet_unraisable():
            return _restore(manager, step, **targets)
    except Exception as e:
        with _quiet_unraisable():
            problem = damage(manager, step, tuple(targets))
        if problem is None:
            raise
        raise faults.DamagedCheckpoint(f"{step_path(manager, step)} is damaged: {problem}") from e


def move_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Moves a damaged checkpoint to checkpoints/damaged/<latest|best>_<step> -> its new path."""
    source = step_path(manager, step)
    folder = os.path.join(os.path.dirname(str(manager.directory)), "damaged")
    target = os.path.join(folder, f"{os.path.basename(str(manager.directory))}_{step}")
    if jax.process_index() == 0:
        os.makedirs(folder, exist_ok=True)
        n = 1
        while os.path.exists(target if n == 1 else f"{target}.{n}"):
            n += 1
        target = target if n == 1 else f"{target}.{n}"
        shutil.move(source, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"moved aside {source}")
    manager.reload()
    return target


def restore_newest_intact(
    manager: ocp.CheckpointManager, **targets: Any
) -> tuple[int | None, dict[str, Any] | None]:
    """-> (step, items) of the newest checkpoint that reads back, moving damaged newer ones
    aside (logged, one line each); (None, None) when there is none."""
    while (step := manager.latest_step()) is not None:
        try:
            return step, restore(manager, step, **targets)
        except faults.DamagedCheckpoint as e:
            moved = move_aside(manager, step)
            logging.warning("%s; moved to %s, trying the newest before it.", e, moved)
    return None, None


def _all_checkpoints(root: str) -> list[tuple[str, int]]:
    """(best|latest, step) of every finished checkpoint under `root`, newest first."""
    found = []
    for name in ("best", "latest"):
        folder = os.path.join(root, name)
        if os.path.isdir(folder):
            found += [(name, int(n)) for n in os.listdir(folder) if n.isdigit()]
    return sorted(found, key=lambda c: (-c[1], c[0]))


def _choose(root: str, which: str) -> list[tuple[str, int]]:
    """`which` (best | latest | a step) -> the (folder, step) to try in turn: best falls back
    to latest; a step may be in both folders."""
    found = _all_checkpoints(root)
    if str(which).isdigit():
        return sorted((c for c in found if c[1] == int(which)), key=lambda c: c[0] != "latest")
    if which not in ("best", "latest"):
        raise ValueError(f"{which!r} names no checkpoint: use best, latest or a step number.")
    for name in (which, "latest"):
        mine = [c for c in found if c[0] == name]
        if mine:
            return mine[:1]
    return []


def restore_params(
    workdir: str, params_like: Any, which: str = "best", field: str = "config.eval.checkpoint"
) -> tuple[Any, int, dict[str, Any]]:
    """The parameters of a run's `which` checkpoint (best, else latest; latest; or a step number,
    `config.eval.checkpoint`) -> (params, step, progress).

    params_like: a pytree of the parameters' shapes and dtypes (e.g. a freshly built model's);
    progress: the checkpoint's `progress` item as saved (epoch, best metric, ...) as Python numbers.
    A damaged checkpoint raises `faults.DamagedCheckpoint` naming it and the intact ones, to
    choose with the config `field`.
    """
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    candidates = _choose(root, str(which))
    if not candidates:
        found = ", ".join(f"{n}/{s}" for n, s in _all_checkpoints(root))
        todo = f"train first with `python main.py --config=... --workdir={workdir}`"
        if found:
            todo = f"there are {found}, choose one with --{field}"
        raise FileNotFoundError(f"No checkpoint {which} under {root}: {todo}.")
    for k, (name, step) in enumerate(candidates):
        with manager_at(os.path.join(root, name)) as manager:
            try:
                items = restore(manager, step, params=params_like, progress=None)
                break
            except faults.DamagedCheckpoint as e:
                if k + 1 == len(candidates):
                    hint = _intact_hint(root, (name, step), field)
                    raise faults.DamagedCheckpoint(f"{str(e).rstrip('.')}. {hint}") from None
    progress = {k: v.item() for k, v in items["progress"].items()}
    return items["params"], step, progress


def _intact_hint(root: str, damaged: tuple[str, int], field: str) -> str:
    """Which other checkpoints read back, as the sentence saying how to choose one."""
    intact = []
    for name, step in _all_checkpoints(root):
        if (name, step) != damaged:
            with manager_at(os.path.join(root, name)) as manager, _quiet_unraisable():
                if damage(manager, step, ("params", "progress")) is None:
                    intact.append(f"{name}/{step}")
    if not intact:
        return "No intact checkpoint is left: train again."
    return f"Intact: {', '.join(intact)}; choose one with --{field}=<step> (or latest)."
