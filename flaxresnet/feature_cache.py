"""Cached backbone features for linear probes: when the backbone's output for an image cannot change during a
run, compute it once per image and train and evaluate the head alone on it.

`plan` decides once a run whether the cache applies (`why_not`) and, if so, everything the epochs then use: the
head's part of the state, the splits' features, the head-only steps and how the state is made whole again for
checkpoints and final.msgpack; the training loop follows the plan without asking again.

When (`why_not`): every backbone parameter frozen, the backbone's BatchNorm in inference mode (moving
statistics, never updated) and no augmentation. Caffe preprocessing, upsampling and the backbone are then one
fixed function of the raw image, which the full step would recompute every epoch (the Keras guide's feature
extraction recipe, "run the base model once"). With the freeze presets this is `backbone` with no augmentation.

What is held: every head starts with global average pooling, which has no parameters, so the cache holds each
image's pooled features (`Classifier.pooled_features`): 2,048 floats, 8 KB in float32, instead of the feature
map (CIFAR-100's 50,000 + 10,000 images: 0.49 GB). They stay on the host as numpy (`FeatureSplit`) and go to
the devices batch by batch, prefetched, as images do; the seeded batch order is the images' own.

Several processes: the training order changes every epoch, so a process may be given any training example.
Each process therefore holds the features of every example of both splits; each computes only its rows of every
global batch (as evaluation does) and one all-gather shares them (`distributed.gather_rows`). Memory: the
numbers above on every process; compute: 1/P of the pass each; traffic: once, not every epoch, which caching
per process and exchanging the rows each epoch's order needs would cost.

Numbers: the head-only steps (`train_lib.head_train_step`, `head_eval_step`) use the full steps' keys, optimizer
and state, so losses and accuracies equal the uncached run's up to float rounding (the backbone computed apart
from the step rounds its last bits differently), and checkpoints continue either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from flaxresnet import data, distributed, log, train_lib
from flaxresnet.errors import option_name
from flaxresnet.models import Classifier, param_dtype

OFF = "off"


@dataclasses.dataclass(frozen=True)
class FeatureSplit:
    """A split's examples as backbone features: `features` float (N, F), one row an image; `labels` int32 (N,).
    Batched like a `data.Split` (`data.Columns`), with 'features' in place of 'image'."""

    features: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if not np.issubdtype(self.features.dtype, np.floating) or self.features.ndim != 2:
            raise ValueError(f"features must be float (N, F), got {self.features.dtype} {self.features.shape}")
        if self.labels.dtype != np.int32 or self.labels.shape != self.features.shape[:1]:
            raise ValueError(f"labels must be int32 ({len(self.features)},), got {self.labels.dtype} "
                             f"{self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def columns(self) -> dict[str, np.ndarray]:
        """The per-example arrays under their batch keys."""
        return {"features": self.features, "label": self.labels}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run's epochs train and evaluate on, chosen once (`plan`).

    Attributes:
      state: the replicated state the epochs step: the whole one, or with the cache the head's part.
      train, validation: the dataset's splits, or their cached features.
      train_step, eval_step: the pmapped steps for them (`train_lib.p_train_step` / `p_eval_step`, or the
        head-only `p_head_train_step` / `p_head_eval_step`).
      backbone: with the cache, the replicated backbone variables left out of `state`; None without.
    """

    state: train_lib.TrainState
    train: data.Examples
    validation: data.Examples
    train_step: Callable[..., Any]
    eval_step: Callable[..., Any]
    backbone: train_lib.Variables | None = None

    def whole(self, state: train_lib.TrainState) -> train_lib.TrainState:
        """A state the epochs stepped as a whole TrainState again (for checkpoints and final.msgpack)."""
        return state if self.backbone is None else train_lib.join_backbone(state, self.backbone)


def plan(setting: str, state: train_lib.TrainState, dataset: data.Dataset, batch_size: int) -> Plan:
    """The plan for the replicated `state` and `dataset`'s splits: with the cache when `setting` ('auto' or
    'off') allows it and `why_not` finds no reason against it, the features computed here (a progress bar);
    says in one line which, and why."""
    reason = f"{option_name('feature_cache')} {OFF}" if setting == OFF else why_not(state)
    if reason is not None:
        hint = "" if setting == OFF else f"; it needs {option_name('freeze')} backbone {option_name('augment')} none"
        log.say(f"feature cache: off ({reason}{hint})")
        return Plan(state, dataset.train, dataset.validation, train_lib.p_train_step, train_lib.p_eval_step)
    head, backbone = train_lib.split_backbone(state)
    start = time.perf_counter()
    train, validation = (compute(state.model, backbone, split, batch_size, name)
                         for split, name in ((dataset.train, "training"), (dataset.validation, "validation")))
    seconds, images = time.perf_counter() - start, len(train) + len(validation)
    size = (train.features.nbytes + validation.features.nbytes) / 1e6
    log.say(f"feature cache: on (backbone frozen and in inference mode, no augmentation): the pooled backbone "
            f"features of {images:,} images computed once in {seconds:.1f} s ({images / seconds:.0f} img/s), "
            f"{size:,.1f} MB on the host{' of each process' if jax.process_count() > 1 else ''}; the epochs run "
            f"the head alone")
    return Plan(head, train, validation, train_lib.p_head_train_step, train_lib.p_head_eval_step, backbone)


def why_not(state: train_lib.TrainState) -> str | None:
    """Why the backbone's output for an image may change during training with this state's model and step
    settings, so that caching it would change the run; None when it cannot."""
    paths = [p for p in traverse_util.flatten_dict(state.params, sep="/") if p.startswith("backbone/")]
    trainable = [p for p in paths if p not in state.settings.frozen]
    if trainable:
        return f"{len(trainable)} of the backbone's {len(paths)} parameter tensors train"
    if state.model.backbone_bn_train:
        return "the backbone's BatchNorm trains on batch statistics"
    if state.settings.augment:
        return f"augmentation ({','.join(state.settings.augment)}) changes the images every epoch"
    return None


def compute(model: Classifier, backbone: train_lib.Variables, split: data.Split | data.StreamSplit,
            batch_size: int, name: str) -> FeatureSplit:
    """`split`'s pooled backbone features (`train_lib.pooled_features`), every example's, on every process.

    `backbone`: the replicated backbone variables (`train_lib.split_backbone`). Each process computes its rows of
    every global batch of `batch_size` on its local devices, as evaluation does, then all share them. Shows a
    progress bar (`name`, img/s); a batch's features are fetched while the next one computes.
    """
    rows = distributed.process_rows(batch_size)
    batches = math.ceil(len(split) / batch_size)
    local = np.empty((batches, rows.stop - rows.start, Classifier.FEATURES), param_dtype(model.dtype))
    labels = np.empty(local.shape[:2], np.int32)  # taken from the batches: a streamed split reads them there
    pending: list[tuple[int, jax.Array]] = []  # (batch index, its features on the devices)
    with tqdm(total=len(split), desc=f"feature cache: {name}", unit="img", leave=False,
              disable=None if distributed.is_main() else True) as bar:

        def fetch(index: int, features: jax.Array) -> None:
            local[index] = np.asarray(features).reshape(local.shape[1:])
            bar.update(min(batch_size, len(split) - index * batch_size))

        def images() -> Iterator[data.Batch]:
            with contextlib.closing(data.eval_batches(split, batch_size, rows)) as host_batches:
                for index, batch in enumerate(host_batches):
                    labels[index] = batch["label"]
                    yield {"image": batch["image"]}

        with contextlib.closing(data.prefetch_to_device(images())) as device_batches:
            for index, batch in enumerate(device_batches):
                pending.append((index, train_lib.p_pooled_features(model, backbone, batch["image"])))
                if len(pending) > 1:
                    fetch(*pending.pop(0))
        for item in pending:
            fetch(*item)
    return FeatureSplit(distributed.gather_rows(local)[:len(split)],
                             distributed.gather_rows(labels)[:len(split)])
