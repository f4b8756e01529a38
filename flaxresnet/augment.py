"""Data augmentation on device: random erasing, cutout, flip, crop; jittable, one PRNG key per example.

Each augmentation maps (key, one preprocessed image (H, W, C)) to an image of the same shape; `augment` applies
a combination to a batch with per-example keys. They run on the native-size image after caffe preprocessing
and before upsampling (the seed ran random erasing on the 32x32 preprocessed image), so "zero" fill means
the ImageNet mean colour.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def random_erasing(key: jax.Array, image: jnp.ndarray, p: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
                   aspect: tuple[float, float] = (0.3, 1 / 0.3),
                   fill: tuple[float, float] = (0.0, 1.0)) -> jnp.ndarray:
    """Random Erasing (Zhong et al.) as yu4u/cutout-random-erasing's `get_random_eraser` samples it.

    With probability p: draw area fraction s ~ U(area) and aspect r ~ U(aspect) (uniform, not log-uniform),
    w = int(sqrt(s*H*W / r)), h = int(sqrt(s*H*W * r)), top-left corner uniform over the whole image, and
    redraw all four until the rectangle fits; fill it with noise c ~ U(fill) drawn per pixel and channel
    (pixel_level=True; the seed filled with U(0, 1) per pixel, v_l=0, v_h=1, shared reference section 5).
    """
    height, width = image.shape[:2]
    gate_key, loop_key, fill_key = jax.random.split(key, 3)

    def draw(k: jax.Array) -> tuple[jnp.ndarray, ...]:
        ks, kr, kx, ky = jax.random.split(k, 4)
        s = jax.random.uniform(ks, (), minval=area[0], maxval=area[1]) * height * width
        r = jax.random.uniform(kr, (), minval=aspect[0], maxval=aspect[1])
        w = jnp.sqrt(s / r).astype(jnp.int32)
        h = jnp.sqrt(s * r).astype(jnp.int32)
        left = jax.random.randint(kx, (), 0, width)
        top = jax.random.randint(ky, (), 0, height)
        return top, left, h, w

    def misfit(state: tuple[jax.Array, tuple[jnp.ndarray, ...]]) -> jnp.ndarray:
        _, (top, left, h, w) = state
        return (left + w > width) | (top + h > height)

    def redraw(state: tuple[jax.Array, tuple[jnp.ndarray, ...]]) -> tuple[jax.Array, tuple[jnp.ndarray, ...]]:
        k, _ = state
        k, sub = jax.random.split(k)
        return k, draw(sub)

    k, first = jax.random.split(loop_key)
    _, (top, left, h, w) = jax.lax.while_loop(misfit, redraw, (k, draw(first)))
    inside = _box_mask(height, width, top, top + h, left, left + w)
    erase = jax.random.uniform(gate_key) <= p
    value = jax.random.uniform(fill_key, image.shape, minval=fill[0], maxval=fill[1])
    return jnp.where(erase & inside, value.astype(image.dtype), image)


def cutout(key: jax.Array, image: jnp.ndarray, size: int = 8) -> jnp.ndarray:
    """Cutout (DeVries & Taylor): zero one size x size square centred anywhere, clipped at the border."""
    height, width = image.shape[:2]
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    inside = _box_mask(height, width, cy - size // 2, cy + size // 2, cx - size // 2, cx + size // 2)
    return jnp.where(inside, jnp.zeros((), image.dtype), image)


def flip(key: jax.Array, image: jnp.ndarray) -> jnp.ndarray:
    """Mirror left-right with probability 1/2."""
    return jnp.where(jax.random.bernoulli(key), image[:, ::-1], image)


def crop(key: jax.Array, image: jnp.ndarray, pad: int = 4) -> jnp.ndarray:
    """Zero-pad by `pad` on every side and take a random crop of the original size (CIFAR standard)."""
    height, width, channels = image.shape
    padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(key, (2,), 0, 2 * pad + 1)
    return jax.lax.dynamic_slice(padded, (offsets[0], offsets[1], 0), (height, width, channels))


def _box_mask(height: int, width: int, top: jnp.ndarray, bottom: jnp.ndarray, left: jnp.ndarray,
              right: jnp.ndarray) -> jnp.ndarray:
    """(H, W, 1) boolean mask of rows [top, bottom) and columns [left, right); bounds may lie outside."""
    rows = jnp.arange(height)[:, None, None]
    cols = jnp.arange(width)[None, :, None]
    return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


# Names accepted in Config.augment. The position of a name here is its key stream, so adding or combining
# augmentations never changes the draws of another one.
AUGMENTATIONS: dict[str, Callable[..., jnp.ndarray]] = {
    "random-erasing": random_erasing,
    "cutout": cutout,
    "flip": flip,
    "crop": crop,
}


def augment(images: jnp.ndarray, keys: jax.Array, names: Sequence[str], cutout_size: int = 8) -> jnp.ndarray:
    """Apply the augmentations `names`, in order, to each image (N, H, W, C) with its own key (N keys).

    An empty `names` returns `images` unchanged.
    """
    if not names:
        return images
    options = {"cutout": {"size": cutout_size}}
    streams = list(AUGMENTATIONS)
    ops = [(streams.index(n), functools.partial(AUGMENTATIONS[n], **options.get(n, {}))) for n in names]

    def one(key: jax.Array, image: jnp.ndarray) -> jnp.ndarray:
        for stream, op in ops:
            image = op(jax.random.fold_in(key, stream), image)
        return image

    return jax.vmap(one)(keys, images)
