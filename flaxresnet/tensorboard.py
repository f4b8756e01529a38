"""TensorBoard event files in a run's work folder, written with tensorboardX (no TensorFlow needed) when the
optional extra is installed (`pip install 'flaxresnet[tensorboard]'`); without it nothing is written.

Per step (tag `train/...`): the training loss, the learning rate the step applied and the global norm of the
averaged gradient. Per epoch (tag `epoch/...`, x axis the epoch): every numeric metrics.jsonl field. A resumed
run purges what a stopped one wrote after its checkpoint, so every step appears once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optax

try:
    from tensorboardX import SummaryWriter
except ImportError:  # the extra is not installed
    SummaryWriter = None

STEP_TAGS = {"loss": "train/loss", "grad_norm": "train/grad_norm"}


class Events:
    """The run's event writer, or a no-op without tensorboardX or when `enabled` is false (processes but 0).

    `first_step` is the first step this run trains (1, or a checkpoint's step + 1); `learning_rate` the
    optimizer's schedule, taking the number of updates before a step."""

    def __init__(self, workdir: Path, first_step: int, learning_rate: optax.Schedule, enabled: bool = True) -> None:
        self._learning_rate = learning_rate
        self._writer = (SummaryWriter(str(workdir), purge_step=first_step, flush_secs=30)
                        if enabled and SummaryWriter is not None else None)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """Scalars of train step `step` (1-based: the step that made the `step`-th update)."""
        if self._writer is None:
            return
        for key, tag in STEP_TAGS.items():
            self._writer.add_scalar(tag, metrics[key], step)
        self._writer.add_scalar("train/learning_rate", float(self._learning_rate(step - 1)), step)

    def epoch(self, row: dict[str, Any]) -> None:
        """Every numeric field of an epoch's metrics row (null validation fields are skipped)."""
        if self._writer is None:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self._writer.add_scalar(f"epoch/{key}", value, row["epoch"])
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
