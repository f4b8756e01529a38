"""The one printer of log lines: process 0 of a run prints them, the other processes stay quiet."""

from __future__ import annotations

from flaxresnet import distributed


def say(text: str) -> None:
    """Print a log line (flushed at once), from process 0 only."""
    if distributed.is_main():
        print(text, flush=True)
