"""Data parallelism over all local devices with `jax.sharding`.

One `Mesh` with a single `data` axis: batches are split along their first dimension, parameters,
optimizer state and the feature table are replicated. XLA inserts the gradient all-reduce. The same
code runs on one device (a mesh of one), on 8 GPUs, or on a TPU slice; on several hosts call
`jax.distributed.initialize()` first (see README, "Many devices").
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of `tree` on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
    """The global batch must split evenly over the devices."""
    devices = mesh.devices.size
    if batch_size % devices:
        raise ValueError(
            f"{field}={batch_size} is not divisible by the {devices} devices; use a multiple "
            f"of {devices}."
        )


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Splits each [batch, ...] array along its first axis over the `data` axis."""
    return jax.device_put(batch, data_sharded(mesh))
