"""Multi-host start-up and the little cross-process traffic the main job needs, all through JAX's own API.

A multi-host run (a Cloud TPU pod slice, a multi-node GPU job) starts one process per host with the same
command plus ``--multihost``; each calls ``jax.distributed.initialize()`` as JAX documents it: with no
arguments on Cloud TPU, SLURM, Open MPI and Kubernetes (JAX finds the coordinator, process count and index
itself), or with an explicit coordinator address, process count and process id anywhere else (a local test
with 2 processes, a cluster JAX does not know).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np

from scaledet_jax.cli import UserError

T = TypeVar("T")

# Launchers that start several copies of the command; seeing one without --multihost means N copies would each
# train the same model alone and write the same workdir.
_LAUNCHER_PROCESS_COUNTS = (("SLURM_NTASKS", "SLURM"), ("OMPI_COMM_WORLD_SIZE", "Open MPI"), ("WORLD_SIZE", "torchrun"))


def initialize(
    multihost: bool, coordinator_address: str = "", num_processes: int | None = None, process_id: int | None = None
) -> None:
    """``jax.distributed.initialize`` for a ``--multihost`` run (explicit arguments when given, JAX's cluster
    detection otherwise); a one-line UserError when a launcher started several processes without it."""
    explicit = bool(coordinator_address) or num_processes is not None or process_id is not None
    if not multihost and not explicit:
        for variable, launcher in _LAUNCHER_PROCESS_COUNTS:
            count = os.environ.get(variable, "1")
            if count.isdigit() and int(count) > 1:
                raise UserError(
                    f"{launcher} started {count} processes ({variable}={count}) but --multihost is not set: add "
                    "--multihost so that they train one model together, or start a single process"
                )
        return
    kwargs: dict[str, Any] = {}
    if coordinator_address:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:  # JAX found no cluster and was given no coordinator
        raise UserError(
            f"--multihost: jax.distributed.initialize failed ({e}); outside Cloud TPU, SLURM, Open MPI and "
            "Kubernetes give --coordinator_address=HOST:PORT --num_processes=N --process_id=I"
        ) from None


def is_main_process() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"scaledet_jax: {name}")


def main_process_first(name: str, fn: Callable[[], T]) -> T:
    """``fn()`` on process 0, then on the others once it has finished: work that writes shared files (the
    synthetic dataset, a prepared tfds copy) is done once, and the other processes find it done (or, without a
    shared filesystem, do their own)."""
    if jax.process_count() == 1:
        return fn()
    if is_main_process():
        try:
            return fn()
        finally:
            barrier(name)
    barrier(name)
    return fn()


def broadcast_json(value: Any) -> Any:
    """Process 0's ``value`` (anything JSON can hold; NaN included) on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_main_process() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    buffer = np.zeros(size, np.uint8)
    buffer[: data.size] = data
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes().decode())


def local_rows(sharding: jax.sharding.Sharding, global_rows: int) -> np.ndarray:
    """The rows of a batch-sharded global array that this process's devices hold, in the order
    ``jax.make_array_from_process_local_data`` places its local rows: read from the mesh, not assumed."""
    slices = sorted(
        {index[0].indices(global_rows) for index in sharding.addressable_devices_indices_map((global_rows,)).values()}
    )
    return np.concatenate([np.arange(*s) for s in slices]) if slices else np.zeros(0, np.int64)
