"""Keras ImageNet preprocessing (caffe mode) and upsampling, as jittable array functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Per-channel means in BGR order, as keras.applications.imagenet_utils uses them in caffe mode.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocess_input(x: jnp.ndarray, dtype: jnp.dtype = jnp.float32) -> jnp.ndarray:
    """Keras `resnet.preprocess_input`: to `dtype` (float32, as Keras' default floatx), RGB -> BGR, subtract the
    ImageNet BGR means (rounded to `dtype`), no scaling."""
    x = jnp.asarray(x, dtype)[..., ::-1]
    return x - jnp.asarray(CAFFE_MEAN_BGR, dtype)


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
