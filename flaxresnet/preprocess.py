"""Keras ImageNet preprocessing (caffe and tf modes) and upsampling, as jittable array functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Per-channel means in BGR order, as keras.applications.imagenet_utils uses them in caffe mode.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# keras.applications.imagenet_utils modes: 'caffe' for ResNet (v1), 'tf' for ResNetV2; and 'none' for a model
# that takes the 0..255 values as they are.
PREPROCESS_MODES = ("caffe", "tf", "none")


def caffe_conv_weights() -> tuple[np.ndarray, np.ndarray]:
    """Caffe preprocessing as the (kernel, bias) of a 1x1 Conv2D: RGB -> BGR as a permutation (output channel j
    reads input channel 2 - j), then minus the BGR means (float64, rounded to the dtype of the layer that takes
    them, as `preprocess_input` rounds them): the `caffe_preprocess` layer `flax_to_keras` writes."""
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    kernel[0, 0, [2, 1, 0], [0, 1, 2]] = 1.0
    return kernel, -np.asarray(CAFFE_MEAN_BGR)


def preprocess_input(x: jnp.ndarray, dtype: jnp.dtype = jnp.float32, mode: str = "caffe") -> jnp.ndarray:
    """Keras `imagenet_utils.preprocess_input` of RGB images in 0..255, in `dtype` (float32, as Keras' default
    floatx): 'caffe' (`resnet.preprocess_input`) turns RGB into BGR and subtracts the ImageNet BGR means (rounded
    to `dtype`), no scaling; 'tf' (`resnet_v2.preprocess_input`) computes `x / 127.5 - 1`, rounded step by step
    as Keras does on numpy arrays; 'none' only casts."""
    x = jnp.asarray(x, dtype)
    if mode == "none":
        return x
    if mode == "tf":
        return _ieee_divide(x, 127.5) - jnp.asarray(1.0, dtype)
    if mode != "caffe":
        raise ValueError(f"preprocessing mode must be one of {PREPROCESS_MODES}, got {mode!r}")
    return x[..., ::-1] - jnp.asarray(CAFFE_MEAN_BGR, dtype)


def _ieee_divide(x: jnp.ndarray, divisor: float) -> jnp.ndarray:
    """`x / divisor` correctly rounded, as numpy divides. XLA turns a division by a constant (or by a broadcast
    scalar) into a multiplication by its rounded reciprocal, 1 ulp off for about half the pixel values 0..255
    (Keras' own tensor path on JAX has that error); a divisor that depends on `x` stays a division. It is `divisor`
    except where `x` is NaN, whose quotient is NaN either way."""
    return x / jnp.where(jnp.isnan(x), x, jnp.asarray(divisor, x.dtype))


def upsample(x: jnp.ndarray, size: int, method: str = "nearest") -> jnp.ndarray:
    """Resize (N, H, W, C) images to (N, size, size, C).

    'nearest' with an integer factor repeats pixels exactly as Keras UpSampling2D does (three 2x layers on
    32 px equal one 8x repeat); 'bilinear' uses `jax.image.resize` (half-pixel centres, antialiased on
    downsampling).
    """
    n, h, w, c = x.shape
    if (h, w) == (size, size):
        return x
    if method == "nearest":
        if size % h or size % w:
            raise ValueError(f"nearest upsampling needs an integer factor: {h}x{w} -> {size}x{size}")
        return jnp.repeat(jnp.repeat(x, size // h, axis=1), size // w, axis=2)
    if method == "bilinear":
        return jax.image.resize(x, (n, size, size, c), method="bilinear").astype(x.dtype)
    raise ValueError(f"unknown upsampling method {method!r}: use 'nearest' or 'bilinear'")
