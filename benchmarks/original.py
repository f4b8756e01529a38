"""The original Keras recipe that flaxresnet is measured against: the seed's Sequential model and its host-side
input pipeline (per-image random erasing in numpy, a Python batch generator feeding `fit`).

Used by the benchmarks and by the training-parity test (tests/test_train_parity.py), so the Keras model exists
in one place. Keras is imported lazily and runs on the JAX backend unless KERAS_BACKEND says otherwise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from flaxresnet.preprocess import CAFFE_MEAN_BGR


def seed_model(backbone: Any, input_size: int, factor: int, num_classes: int = 100, hidden: int = 256,
               dropout: float = 0.25, learning_rate: float = 1e-3, freeze_convs: bool = True) -> Any:
    """The seed's compiled Sequential around a Keras backbone (e.g. `ResNet50(include_top=False)`).

    Layers: Input (input_size px) -> UpSampling2D to `factor` x the size (log2(factor) 2x layers, as the seed's
    three, when `factor` is a power of two) -> backbone -> GlobalAveragePooling2D -> Dense(hidden, relu) ->
    Dropout(dropout) -> BatchNormalization -> Dense(num_classes, softmax). `freeze_convs` sets every Conv2D of the
    backbone to trainable=False (its BN layers stay trainable, so they train on batch statistics). Compiled
    with Adam (Keras defaults but `learning_rate`), sparse categorical cross-entropy and accuracy.
    """
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if freeze_convs:
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.Conv2D):
                layer.trainable = False
    doublings = round(math.log2(factor))
    upsampling = ([keras.layers.UpSampling2D(2) for _ in range(doublings)] if 2 ** doublings == factor
                  else [keras.layers.UpSampling2D(factor)])
    model = keras.Sequential([
        keras.Input((input_size, input_size, 3)),
        *upsampling,
        backbone,
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dropout(dropout),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(num_classes, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def seed_resnet50(native_size: int, image_size: int, num_classes: int = 100, freeze_convs: bool = True,
                  dtype: str = "float32", family: str = "v1") -> Any:
    """`seed_model` around a randomly initialised `keras.applications.ResNet50(include_top=False)` (family 'v1')
    or `ResNet50V2` ('v2'), taking native_size px images up to image_size px; dtype 'bfloat16' builds it under
    Keras' mixed_bfloat16 policy."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    keras.mixed_precision.set_dtype_policy("mixed_bfloat16" if dtype == "bfloat16" else "float32")
    try:
        build = {"v1": keras.applications.ResNet50, "v2": keras.applications.ResNet50V2}[family]
        backbone = build(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
        return seed_model(backbone, native_size, image_size // native_size, num_classes, freeze_convs=freeze_convs)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def random_eraser(rng: np.random.Generator, p: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
                  aspect: tuple[float, float] = (0.3, 1 / 0.3),
                  fill: tuple[float, float] = (0.0, 1.0)) -> Callable[[np.ndarray], np.ndarray]:
    """yu4u/cutout-random-erasing's `get_random_eraser` as the seed used it (v_l=0, v_h=1, pixel_level=True):
    a function erasing one (H, W, C) image in place with U(fill) noise per pixel and channel and returning it;
    the same sampling as `flaxresnet.augment.random_erasing`, in numpy on the host, one image at a time."""
    def eraser(image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        if rng.random() > p:
            return image
        while True:
            s = rng.uniform(*area) * height * width
            r = rng.uniform(*aspect)
            w, h = int(np.sqrt(s / r)), int(np.sqrt(s * r))
            left, top = rng.integers(0, width), rng.integers(0, height)
            if left + w <= width and top + h <= height:
                break
        image[top:top + h, left:left + w] = rng.uniform(*fill, (h, w, image.shape[2]))
        return image

    return eraser


def preprocess(images: np.ndarray, mode: str = "caffe") -> np.ndarray:
    """Keras preprocessing of uint8 RGB images in numpy on the host, as the seed applied it to the whole training
    set once: 'caffe' (ResNet: RGB -> BGR, minus the ImageNet means) or 'tf' (ResNetV2: x / 127.5 - 1)."""
    if mode == "tf":
        return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return images[..., ::-1].astype(np.float32) - np.asarray(CAFFE_MEAN_BGR, np.float32)


def erased_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int = 0
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The seed's training input: endless epochs of shuffled batches of preprocessed images, each image copied
    and randomly erased on the host (like `ImageDataGenerator(preprocessing_function=eraser).flow`)."""
    rng = np.random.default_rng(seed)
    eraser = random_eraser(rng)
    while True:
        order = rng.permutation(len(labels))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            indices = order[start:start + batch_size]
            batch = images[indices].copy()
            for image in batch:
                eraser(image)
            yield batch, labels[indices]
