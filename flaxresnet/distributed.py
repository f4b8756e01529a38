"""Many processes, one run: starting JAX's multi-controller runtime and each process's share of the data.

Every process runs the same program on its local devices; `jax.pmap` spans the devices of all processes, whose
order is process 0's devices, then process 1's, ... (`lax.axis_index` numbers them so). A global batch of B
examples is therefore fed as process p's contiguous rows [p * B / P, (p + 1) * B / P) (`process_rows`): the
global batch, its order and every example's augmentation key are those of one process with as many devices.
Only process 0 writes files and prints (`is_main`); checkpoints are written jointly (orbax).

`jax.distributed.initialize` must run before any other JAX call that touches a device (it decides which
devices exist), hence `initialize` comes first in the training loop.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxresnet.errors import UserError

AUTO = "auto"


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join a multi-process run: `coordinator` is process 0's 'HOST:PORT' with `num_processes` and this
    `process_id`, or 'auto' to let JAX detect the cluster (SLURM, Open MPI, TPU pod slices, ...); nothing
    when all three are None. UserError for an incomplete set of options."""
    explicit = (num_processes, process_id)
    if coordinator is None and explicit == (None, None):
        return
    if coordinator == AUTO:
        if explicit != (None, None):
            raise UserError("coordinator 'auto' detects the number of processes and this process's id: give "
                            "neither num_processes nor process_id", option="coordinator")
        try:
            jax.distributed.initialize()
        except ValueError as e:  # 'coordinator_address should be defined': no cluster environment found
            raise UserError("coordinator 'auto' found no cluster to join (JAX detects SLURM, Open MPI, TPU pod "
                            "slices, ...): give HOST:PORT with num_processes and process_id",
                            option="coordinator") from e
        return
    if coordinator is None or None in explicit:
        raise UserError("a multi-process run needs all of coordinator (HOST:PORT of process 0), num_processes "
                        "and process_id, or coordinator 'auto'", option="coordinator")
    if not 0 <= process_id < num_processes:
        raise UserError(f"process_id {process_id} is not in 0..{num_processes - 1}", option="process_id")
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(coordinator, num_processes, process_id, cluster_detection_method="deactivate",
                               coordinator_bind_address=coordinator if process_id == 0 else None)


def is_main() -> bool:
    """Whether this is process 0, the one that prints and writes the run's files."""
    return jax.process_index() == 0


def process_rows(batch_size: int) -> slice:
    """The rows of every global batch of `batch_size` that this process feeds (to its local devices).

    UserError unless the batch divides over all devices."""
    check_batch_size(batch_size)
    share = batch_size // jax.process_count()
    return slice(jax.process_index() * share, (jax.process_index() + 1) * share)


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Per-example results of global batches from every process: `local` is this process's (batches, its rows
    of a batch, ...); returns (batches * global batch size, ...) in batch order, on every process."""
    tail = local.shape[2:]
    if jax.process_count() > 1:  # (processes, batches, rows, ...) -> (batches, processes, rows, ...)
        local = np.swapaxes(multihost_utils.process_allgather(local), 0, 1)
    return local.reshape(-1, *tail)


def check_batch_size(batch_size: int) -> None:
    """UserError unless every process has as many devices and the global batch splits evenly over all."""
    devices = jax.device_count()
    if jax.local_device_count() * jax.process_count() != devices:
        raise UserError(f"the processes have different numbers of devices ({devices} in all over "
                        f"{jax.process_count()} processes, {jax.local_device_count()} here): give each the same")
    if batch_size % devices:
        raise UserError(f"batch size {batch_size} does not divide evenly over {devices} devices: use a "
                        f"multiple of {devices}", option="batch_size")
