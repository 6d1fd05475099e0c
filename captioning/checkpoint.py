"""Orbax checkpoints of a run: `checkpoints/{latest,best}/<step>/{params,opt_state,progress}`.

Each checkpoint is a `Composite` of three items, so evaluation, caption mode and the web demo
restore the parameters alone (`restore_params`), without building an optimizer:

  params     the model's parameter pytree (`nnx.split(model)[1]`)
  opt_state  the optax state (training only)
  progress   small arrays that let a rerun continue exactly: epoch, best metric, ...

`latest` keeps the last `train.keep_checkpoints` epochs (resume); `best` keeps the epoch with the
best validation metric (evaluation).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

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


def save(manager: ocp.CheckpointManager, step: int, **items: Any) -> None:
    """Saves (asynchronously) the items `params`, `opt_state`, `progress` at `step`."""
    manager.save(
        step, args=ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()})
    )


def abstract(tree: Any) -> Any:
    """Shapes and dtypes of a pytree: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def restore(manager: ocp.CheckpointManager, step: int, **targets: Any) -> dict[str, Any]:
    """Restores the named items (e.g. params=..., progress=...) into the shapes and dtypes of
    their targets (a target None restores the item as saved)."""
    args = {k: ocp.args.StandardRestore(abstract(v)) for k, v in targets.items()}
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    return {k: restored[k] for k in targets}


def restore_params(
    workdir: str, params_like: Any, which: str = "best"
) -> tuple[Any, int, dict[str, Any]]:
    """The parameters of a run's best (else latest) checkpoint -> (params, step, progress).

    params_like: a pytree of the parameters' shapes and dtypes (e.g. a freshly built model's);
    progress: the checkpoint's `progress` item as saved (epoch, best metric, ...) as Python numbers.
    """
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    for name in (which, "latest"):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        with manager_at(path) as manager:
            step = manager.latest_step()
            if step is not None:
                items = restore(manager, step, params=params_like, progress=None)
                progress = {k: v.item() for k, v in items["progress"].items()}
                return items["params"], step, progress
    raise FileNotFoundError(
        f"No checkpoint under {root}: train first with "
        f"`python main.py --config=... --workdir={workdir}`."
    )
