"""Stopping cleanly: after SIGTERM (a scheduler's preemption notice) or Ctrl-C, every process of a run stops
after the same step, so that they can save one checkpoint together.

One process: a signal handler notes the signal and the training loop asks `StopSignals.requested(step)`
after every step. Several processes (`jax.distributed`): JAX's preemption notifier owns SIGTERM; a notice to any
process reaches all of them through the coordination service, and `reached_preemption_sync_point(step)`
agrees on the first step every process can still reach (it must be asked at every step, from the same first
step on). Ctrl-C becomes a SIGTERM to this process, so it takes the same path. A second Ctrl-C interrupts at
once (KeyboardInterrupt), without a checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType

import jax
from jax.experimental import multihost_utils

# Exit statuses of a stopped run: the shell's 128 + signal number.
EXIT_STATUS = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


class StopSignals:
    """While entered (in the main thread), SIGTERM and SIGINT ask the run to stop; elsewhere they keep their
    usual effect."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None  # the signal this process got, if any
        self._previous: dict[signal.Signals, object] = {}
        self._shared = False  # several processes: SIGTERM is JAX's

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers live in the main thread; a run elsewhere is not stoppable
        self._shared = jax.process_count() > 1
        for signum in (signal.SIGINT,) if self._shared else (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        if signum == signal.SIGINT:  # the next Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if self._shared:
                os.kill(os.getpid(), signal.SIGTERM)

    def requested(self, step: int) -> bool:
        """Whether to stop after `step` (ask after every step): in a multi-process run, all processes get the
        same answer at the same step."""
        if self._shared:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received is not None

    @property
    def reason(self) -> str:
        """'interrupted' after Ctrl-C here, else 'preempted'."""
        return "interrupted" if self.received == signal.SIGINT else "preempted"

    @property
    def exit_status(self) -> int:
        """128 + the signal this process received (SIGTERM when another process's notice stopped it)."""
        return EXIT_STATUS[self.received or signal.SIGTERM]
