"""The `stream` input pipeline: the examples of each batch decoded when it is needed, in grain worker processes.

`batches(source, indices, workers)` yields one batch per row of `indices` (a `data.Source`'s example numbers;
-1 pads with zeros), in order. Each worker process decodes whole batches, every `workers`-th one, and reads
READ_AHEAD batches ahead, so the host holds about workers x READ_AHEAD batches however large the dataset is; grain
hands them over in their order (in shared memory, copied out at once), so the batches are those of the in-memory
path, bit for bit (`data.py`). The rows of `indices` are what the caller asked for: a resumed epoch starts at its batch, and each
process of a multi-process run passes only its rows of every batch (`distributed.process_rows`).

Workers are started for each epoch's batches (and each evaluation's) and end with them. They ignore SIGINT and
SIGTERM from their start on (`_signals_blocked`): a Ctrl-C in a terminal, or a scheduler's SIGTERM to every
process of the job, is the training process's to handle (`preemption`), and it ends its workers when it stops; a
worker whose training process has died ends itself. An exception in a worker (an unreadable image's UserError)
is raised where the batch is taken.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import multiprocessing.resource_tracker
import multiprocessing.util
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

# Batches each worker decodes ahead of the one being trained on.
READ_AHEAD = 2
# Seconds between a worker's checks that its training process is alive.
_PARENT_POLL_S = 1.0
# What a worker leaves to its training process.
_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def default_workers() -> int:
    """One worker per CPU core this process may use, less one for the training loop itself; at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores - 1)


class _Batches:
    """A grain data source whose element b is the batch of `source` examples `indices[b]` (-1: zeros)."""

    def __init__(self, source: Any, indices: np.ndarray) -> None:
        self.source = source
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, b: int) -> dict[str, np.ndarray]:
        rows = self.indices[b]
        images = np.zeros((len(rows), *self.source.image_shape), np.uint8)
        labels = np.zeros(len(rows), np.int32)
        for j, index in enumerate(rows.tolist()):
            if index >= 0:
                images[j], labels[j] = self.source.read(index)
        return {"image": images, "label": labels}


def batches(source: Any, indices: np.ndarray, workers: int) -> Iterator[dict[str, np.ndarray]]:
    """The batches of `source` examples `indices` (rows: batches; -1: a zero row), decoded by `workers` grain
    worker processes (0: here, one batch at a time); see the module docstring."""
    import grain  # here: importing it takes ~2 s, which only a streamed split should pay

    dataset = grain.MapDataset.source(_Batches(source, indices)).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    guard = contextlib.nullcontext
    if workers and len(indices):
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads absl flags in mp_prefetch (google/grain#1355)
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=min(workers, len(indices)), per_worker_buffer_size=READ_AHEAD), worker_init_fn=_init_worker)
        multiprocessing.resource_tracker.ensure_running()  # now: starting it unblocks signals (_signals_blocked)
        _kill_workers_at_exit()
        guard = _signals_blocked
    with guard():
        iterator = iter(dataset)
    try:
        while True:
            with guard():
                batch = next(iterator, None)
            if batch is None:
                return
            yield {key: np.array(value) for key, value in batch.items()}  # out of grain's shared memory at once
    finally:
        if hasattr(iterator, "close"):
            iterator.close()


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM blocked in this thread within the block, so that workers never die of them while they
    start: grain starts its workers, and the threads that start them, when a batch is asked for; threads and
    processes inherit the blocked signals, and a worker keeps them blocked until `_init_worker` ignores them.
    Meanwhile they go to another thread, and Python runs their handlers in the main thread as always.
    multiprocessing's resource tracker must be running before: starting it unblocks both in the thread doing so."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@functools.cache
def _kill_workers_at_exit() -> None:
    """Once a process starts workers: at its exit, before multiprocessing's own exit handler, kill the daemonic
    worker processes still running (an iterator left unclosed). multiprocessing would SIGTERM them, which
    workers ignore, and then wait for ever. Registered after multiprocessing.util's handler (imported above),
    so it runs before it."""

    def kill() -> None:
        for process in multiprocessing.active_children():
            if process.daemon:
                process.kill()

    atexit.register(kill)


def _init_worker(index: int, count: int) -> None:
    """In each worker process: leave SIGINT and SIGTERM to the training process, and end with it."""
    for signum in _SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # those that came while it started are dropped
    parent = os.getppid()

    def end_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=end_with_parent, daemon=True).start()
