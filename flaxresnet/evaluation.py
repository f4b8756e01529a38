"""Evaluating a classifier on every example of a split: the training loop's validation every epoch and
`python -m flaxresnet.evaluate` are this one function, so the command reproduces a run's numbers exactly.

Every example counts once: global batches of the split in order, the last padded and masked (`data.eval_batches`),
each process running its rows of each on its local devices; the step's sums are reduced over all devices inside
the step and the top-1 classes gathered back into order.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from flaxresnet import data, distributed, train_lib
from flaxresnet.errors import UserError


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Means over a split's examples (`top5` None below 5 classes) and each example's top-1 class, in order."""

    loss: float
    accuracy: float
    top5: float | None
    count: int
    predictions: np.ndarray


def evaluate(model: Any, variables: dict[str, Any], split: data.Examples, batch_size: int,
             step: Callable[..., Any] = train_lib.p_eval_step) -> Evaluation:
    """Evaluate `model` with replicated `variables` (`train_lib.replicate`) on every example of `split` once, in
    global batches of `batch_size`, with the pmapped `step` (`p_eval_step`; the feature cache's plan passes
    `p_head_eval_step` with the head's variables for its cached features)."""
    if not len(split):
        raise UserError("the split to evaluate on has no examples")
    sums, predictions = [], []
    batches = data.prefetch_to_device(data.eval_batches(split, batch_size, distributed.process_rows(batch_size)))
    with contextlib.closing(batches):
        for batch in batches:
            batch_sums, batch_predictions = step(model, variables, batch)
            sums.append(jax.tree.map(lambda x: x[0], batch_sums))  # psum: every device holds the global sums
            predictions.append(batch_predictions.reshape(-1))
    totals = {k: float(np.sum([np.asarray(s[k], np.float64) for s in sums])) for k in sums[0]}
    count = int(totals["count"])
    ours = distributed.gather_rows(np.stack(jax.device_get(predictions)))  # every process's, in order
    return Evaluation(loss=totals["loss"] / count, accuracy=totals["accuracy"] / count,
                      top5=totals["top5"] / count if "top5" in totals else None, count=count,
                      predictions=ours[:len(split)])
