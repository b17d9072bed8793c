"""Multi-host start-up: JAX's own ``jax.distributed.initialize()`` when launched as several processes."""

from __future__ import annotations

import os

import jax


def _launched_as_several_processes() -> bool:
    env = os.environ
    return bool(
        env.get("JAX_COORDINATOR_ADDRESS")  # explicit coordinator (any cluster)
        or int(env.get("SLURM_NTASKS", "1")) > 1  # SLURM
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1  # Open MPI
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")  # Cloud TPU pod slice with several hosts
    )


def maybe_initialize() -> None:
    """Initialises the multi-process runtime when this process is one of several; no-op otherwise."""
    if _launched_as_several_processes():
        jax.distributed.initialize()
