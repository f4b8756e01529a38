"""The multi-process options and each process's rows, in one process (tests/test_multihost.py runs several)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from flaxresnet import distributed
from flaxresnet.errors import UserError

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
