"""The multi-process options and each process's rows, in one process (tests/test_multihost.py runs several)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from flaxresnet import distributed
from flaxresnet.config import Config
from flaxresnet.errors import UserError
from process_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_one_process_feeds_every_row():
    assert distributed.process_rows(8 * jax.device_count()) == slice(0, 8 * jax.device_count())
    distributed.initialize(None, None, None)  # nothing to join


@pytest.mark.parametrize("options, message", [
    (("h:1", 2, None), "a multi-process run needs all of coordinator (HOST:PORT of process 0), num_processes"),
    ((None, 2, 0), "a multi-process run needs all of coordinator"),
    (("auto", 2, None), "coordinator 'auto' detects the number of processes and this process's id"),
    (("h:1", 2, 2), "process_id 2 is not in 0..1"),
])
def test_incomplete_multi_process_options(options, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        distributed.initialize(*options)


def test_auto_outside_a_cluster_is_one_line(tmp_path):
    """Cluster detection finds nothing here (a fresh process: JAX must not be started before it tries)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_"))}
    done = subprocess.run([sys.executable, "train.py", "--backbone-weights", "none", "--dataset", "digits",
                           "--coordinator", "auto", "--workdir", str(tmp_path / "run")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "" and not (tmp_path / "run").exists()
    assert done.stderr == ("error: coordinator 'auto' found no cluster to join (JAX detects SLURM, Open MPI, TPU pod "
                           "slices, ...): give HOST:PORT with num_processes and process_id (set --coordinator)\n")


def train_py(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", "--backbone-weights", "none", "--dataset", "digits", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("coordinator", ["garbage", "127.0.0.1:notaport", "host:notaport", "127.0.0.1:0",
                                         "127.0.0.1:65536", ":1234"])
def test_coordinator_not_host_port_is_one_line_before_jax(coordinator):
    with pytest.raises(UserError, match=f"coordinator must be HOST:PORT with a port in 1..65535 .*, or 'auto', got "
                                        f"'{coordinator}'"):
        Config(coordinator=coordinator, num_processes=2, process_id=0)


def test_coordinator_mistakes_from_train_py_are_one_line(tmp_path):
    """The three the issue met: an IndexError traceback, JAX's RPC error and a segmentation fault before."""
    for coordinator in ["garbage", "127.0.0.1:notaport", "host:notaport"]:
        done = train_py("--coordinator", coordinator, "--num-processes", "2", "--process-id", "1",
                        "--workdir", str(tmp_path / "run"))
        assert done.returncode == 2 and done.stdout == "" and not (tmp_path / "run").exists()
        assert done.stderr == (f"error: coordinator must be HOST:PORT with a port in 1..65535 (e.g. 10.0.0.1:1234), "
                               f"or 'auto', got '{coordinator}' (set --coordinator)\n")


@pytest.mark.parametrize("coordinator, message", [
    ("nosuchhost.invalid:1234", "coordinator host 'nosuchhost.invalid' cannot be resolved"),
    ("192.0.2.1:1234", r"process 0 cannot listen on coordinator 192.0.2.1:1234 \(Cannot assign requested address\)"),
])
def test_process_0_checks_its_address_before_jax(coordinator, message):
    with pytest.raises(UserError, match=message):
        distributed.initialize(coordinator, 2, 0)
    assert not jax.distributed.is_initialized()


def test_process_0_on_a_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"process 0 cannot listen on coordinator 127.0.0.1:{port} "
                                            r"\(Address already in use\): give an address of this machine"):
            distributed.initialize(f"127.0.0.1:{port}", 2, 0)


def test_waiting_for_process_0_says_so_and_ends_in_one_line(tmp_path):
    port = free_port()
    start = time.monotonic()
    done = train_py("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
                    "--coordinator-timeout", "2", "--workdir", str(tmp_path / "run"))
    assert done.returncode == 2 and done.stdout == "" and time.monotonic() - start < 60
    assert done.stderr.splitlines() == [
        f"waiting for process 0 at 127.0.0.1:{port} (up to 2 s) ...",
        f"error: process 0 did not answer at coordinator 127.0.0.1:{port} within 2 s (Connection refused): check "
        f"that process 0 is running with the same coordinator, that 127.0.0.1 is its address and that no firewall "
        f"blocks port {port}, or wait longer (--coordinator-timeout) (set --coordinator)"]
