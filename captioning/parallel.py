"""Data parallelism over every device of every process with `jax.sharding`.

One `Mesh` with a single `data` axis: batches are split along their first dimension, parameters,
optimizer state and the feature table are replicated. XLA inserts the gradient all-reduce. The same
code runs on one device (a mesh of one), on 8 GPUs, on a TPU slice, or on several hosts:

* `initialize(...)` starts `jax.distributed` before anything else touches JAX: with an explicit
  coordinator (`--coordinator_address`, `--num_processes`, `--process_id`), or autodetected on
  Cloud TPU and SLURM; on CPUs the collectives go through gloo.
* Every process builds the same global batch order (it depends only on seed and epoch) and feeds
  only its own rows of each batch (`shard_batch`, `jax.make_array_from_process_local_data`).
* Replicated state is assembled from each process's identical host copy (`replicate`), and a
  process reads its own copy back with `local` (decoding and evaluation run per process).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
# Environment variables by which jax.distributed recognises a cluster it can join by itself.
_CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins this process to a multi-process run (no-op for a single process).

    Explicit flags win; otherwise a SLURM, Open MPI or Cloud TPU environment is detected by
    `jax.distributed.initialize()` itself. Call before any other JAX call.
    """
    explicit = coordinator_address is not None
    if not explicit and not any(name in os.environ for name in _CLUSTER_ENV):
        return
    if explicit and (num_processes is None or process_id is None):
        raise ValueError(
            "--coordinator_address needs --num_processes and --process_id (this process's index)."
        )
    # CPU devices of several processes talk through gloo (accelerators use their own links).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    else:
        jax.distributed.initialize()
    logging.info(
        "Process %d of %d; %d devices in all, %d here.",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        jax.local_device_count(),
    )


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def _spans_processes(mesh: Mesh) -> bool:
    return len({d.process_index for d in mesh.devices.flat}) > 1


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of `tree` on every device of the mesh (each process passes the same
    values; across processes each fills its own devices)."""
    if not _spans_processes(mesh):
        return jax.device_put(tree, replicated(mesh))
    sharding = replicated(mesh)

    def put(x):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def local(tree: Any) -> Any:
    """This process's copy of replicated arrays, on its first device (for per-process work such as
    decoding); single-process arrays are returned as they are."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(
        lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x,
        tree,
    )


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
    """The global batch must split evenly over the devices."""
    devices = mesh.devices.size
    if batch_size % devices:
        raise ValueError(
            f"{field}={batch_size} is not divisible by the {devices} devices; use a multiple "
            f"of {devices}."
        )


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Splits each [batch, ...] array of the global batch along its first axis over the `data`
    axis; with several processes each one passes only its own rows (contiguous, in process
    order), which `make_array_from_process_local_data` assembles into the global array."""
    if not _spans_processes(mesh):
        return jax.device_put(batch, data_sharded(mesh))
    count, index = jax.process_count(), jax.process_index()
    sharding = data_sharded(mesh)

    def put(x):
        rows = len(x) // count
        mine = x[index * rows : (index + 1) * rows]
        return jax.make_array_from_process_local_data(sharding, mine, x.shape)

    return jax.tree.map(put, batch)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (data-sharded) array as a numpy array, on every process."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
