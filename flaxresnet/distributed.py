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

import socket
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxresnet.errors import UserError, option_name

AUTO = "auto"
TIMEOUT = 300  # seconds to wait for process 0 to answer, and for every process to join (JAX's own default)


def _split(coordinator: str) -> tuple[str, int] | None:
    """(host, port) of 'HOST:PORT' (an IPv6 host in brackets, '[::1]:1234'), None unless the host is not empty
    and the port is a number in 1..65535."""
    host, colon, port = coordinator.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return host, int(port)


def check_coordinator(coordinator: str | None) -> str | None:
    """What is wrong with a coordinator option (a Config check), None if nothing."""
    if coordinator is None or coordinator == AUTO or _split(coordinator) is not None:
        return None
    return f"must be HOST:PORT with a port in 1..65535 (e.g. 10.0.0.1:1234), or {AUTO!r}, got {coordinator!r}"


def _resolve(coordinator: str) -> tuple[str, int]:
    """The address to connect to; UserError when the host name cannot be resolved."""
    if (address := _split(coordinator)) is None:
        raise UserError(f"coordinator {check_coordinator(coordinator)}", option="coordinator")
    host, port = address
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"coordinator host {host!r} cannot be resolved ({e.strerror}): give process 0's host "
                        f"name or IP address", option="coordinator") from e
    return host, port


def _check_listenable(host: str, port: int) -> None:
    """UserError unless process 0 can listen on `host`:`port` (JAX would abort or crash instead)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"process 0 cannot listen on coordinator {host}:{port} ({e.strerror}): give an "
                            f"address of this machine and a free port", option="coordinator") from e


def _wait_for_coordinator(host: str, port: int, timeout: float) -> None:
    """Wait until something listens at `host`:`port`, saying so at once; UserError after `timeout` seconds."""
    print(f"waiting for process 0 at {host}:{port} (up to {timeout:g} s) ...", file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=min(5.0, timeout)).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"process 0 did not answer at coordinator {host}:{port} within {timeout:g} s ({e.strerror or e}):"
                    f" check that process 0 is running with the same coordinator, that {host} is its address "
                    f"and that no firewall blocks port {port}, or wait longer ({option_name('coordinator_timeout')})",
                    option="coordinator") from e
            time.sleep(0.5)


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               timeout: int = TIMEOUT) -> None:
    """Join a multi-process run: `coordinator` is process 0's 'HOST:PORT' with `num_processes` and this
    `process_id`, or 'auto' to let JAX detect the cluster (SLURM, Open MPI, TPU pod slices, ...); nothing
    when all three are None. Process 0 first checks it can listen there; the others wait up to `timeout`
    seconds for it to answer, which is also how long JAX waits for every process to join. UserError for an
    incomplete set of options, an address that is not HOST:PORT, or a coordinator that does not answer."""
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
    host, port = _resolve(coordinator)
    if process_id == 0:
        _check_listenable(host, port)
    else:
        _wait_for_coordinator(host, port, timeout)
    jax.distributed.initialize(coordinator, num_processes, process_id, cluster_detection_method="deactivate",
                               coordinator_bind_address=coordinator if process_id == 0 else None,
                               initialization_timeout=timeout)


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
