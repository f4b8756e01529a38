"""Keras reference models for the tests: random weights with randomized BatchNorm state.

With Keras' default BN state (gamma 1, beta 0, mean 0, variance 1) a port that mixes up BN parameters still
passes; randomizing all four makes the parity tests sensitive to every BN mistake.
"""

from __future__ import annotations

import numpy as np


def randomize_batchnorm(model, seed: int = 0) -> None:
    """Give every BatchNormalization layer of `model` random gamma, beta, moving mean and variance."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([
                rng.uniform(0.5, 1.5, n).astype("float32"),
                rng.normal(0.0, 0.2, n).astype("float32"),
                rng.normal(0.0, 0.2, n).astype("float32"),
                rng.uniform(0.5, 1.5, n).astype("float32"),
            ])


def keras_resnet(depth: int = 50, include_top: bool = False, size: int = 64, classes: int = 1000,
                 seed: int = 0):
    """A keras.applications ResNet{depth} with random weights (seeded) and randomized BN."""
    import keras

    keras.utils.set_random_seed(seed)
    build = {50: keras.applications.ResNet50, 101: keras.applications.ResNet101,
             152: keras.applications.ResNet152}[depth]
    model = build(weights=None, include_top=include_top, input_shape=(size, size, 3), classes=classes)
    randomize_batchnorm(model, seed)
    return model


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8-valued RGB images as float32, (n, size, size, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype("float32")
