"""The multi-process options and each process's rows, in one process (tests/test_multihost.py runs several)."""

from __future__ import annotations

import jax
import pytest

from flaxresnet import distributed
from flaxresnet.errors import UserError


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
