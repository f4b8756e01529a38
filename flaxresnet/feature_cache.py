"""Cached backbone features for linear probes: when the backbone's output for an image cannot change during a
run, compute it once per image and train and evaluate the head alone on it.

When (`why_not`): every backbone parameter frozen, the backbone's BatchNorm in inference mode (moving
statistics, never updated) and no augmentation. Caffe preprocessing, upsampling and the backbone are then one
fixed function of the raw image, which the full step would recompute every epoch (the Keras guide's feature
extraction recipe, "run the base model once"). With the freeze presets this is `backbone` with no augmentation.

What is held: every head starts with global average pooling, which has no parameters, so the cache holds each
image's pooled features (`Classifier.pooled_features`): 2,048 floats, 8 KB in float32, instead of the feature
map (CIFAR-100's 50,000 + 10,000 images: 0.49 GB). They stay on the host as numpy (`data.FeatureSplit`) and go to
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
import math
from collections.abc import Iterator

import jax
import numpy as np
from flax import traverse_util
from tqdm import tqdm

from flaxresnet import data, distributed, train_lib
from flaxresnet.models import Classifier, param_dtype


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
            batch_size: int, name: str) -> data.FeatureSplit:
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
    return data.FeatureSplit(distributed.gather_rows(local)[:len(split)],
                             distributed.gather_rows(labels)[:len(split)])
