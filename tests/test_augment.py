"""Augmentations: shapes, determinism per key, erased-area statistics against the original samplers, no-op
when disabled, independence of the batch split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxresnet import augment as aug
from flaxresnet.preprocess import preprocess_input

DRAWS = 4000
SIZE = 32


def reference_random_eraser(rng: np.random.Generator, h: int, w: int) -> tuple[int, int] | None:
    """yu4u/cutout-random-erasing `get_random_eraser` (p=0.5, s 0.02-0.4, r 0.3-1/0.3) in numpy: the erased
    rectangle's (height, width), or None when the image is left alone."""
    if rng.random() > 0.5:
        return None
    while True:
        s = rng.uniform(0.02, 0.4) * h * w
        r = rng.uniform(0.3, 1 / 0.3)
        ew, eh = int(np.sqrt(s / r)), int(np.sqrt(s * r))
        left, top = rng.integers(0, w), rng.integers(0, h)
        if left + ew <= w and top + eh <= h:
            return eh, ew


def keys(n: int, seed: int = 0) -> jax.Array:
    return jax.random.split(jax.random.key(seed), n)


@pytest.fixture(scope="module")
def erased() -> np.ndarray:
    """Random erasing of DRAWS constant (-50) images, (DRAWS, H, W, 3)."""
    images = jnp.full((DRAWS, SIZE, SIZE, 3), -50.0)
    return np.asarray(jax.jit(lambda k: aug.augment(images, k, ["random-erasing"]))(keys(DRAWS)))


def test_random_erasing_matches_the_original_sampler(erased):
    rng = np.random.default_rng(0)
    reference = [reference_random_eraser(rng, SIZE, SIZE) for _ in range(DRAWS)]
    ref_area = np.array([h * w for h, w in filter(None, reference)]) / SIZE**2
    ref_aspect = np.array([h / w for h, w in filter(None, reference)])

    changed = erased != -50.0
    assert (changed == changed[..., :1]).all()  # every channel of an erased pixel
    changed = changed[..., 0]
    fraction = changed.mean(axis=(1, 2))
    hit = fraction > 0
    rows, cols = changed.any(axis=2).sum(axis=1)[hit], changed.any(axis=1).sum(axis=1)[hit]
    assert (rows * cols == changed.sum(axis=(1, 2))[hit]).all()  # one solid rectangle
    area, aspect = fraction[hit], rows / cols

    assert abs(hit.mean() - 0.5) < 4 * np.sqrt(0.25 / DRAWS)
    # int() floors the sides: never above s_h, and at least 12 px (e.g. 2 x 6) on 32 x 32.
    assert 12 / SIZE**2 <= area.min() and area.max() <= 0.4
    for ours, theirs in ((area, ref_area), (aspect, ref_aspect)):
        stderr = np.sqrt(ours.var() / ours.size + theirs.var() / theirs.size)
        assert abs(ours.mean() - theirs.mean()) < 4 * stderr
        np.testing.assert_allclose(np.quantile(ours, [0.1, 0.5, 0.9]), np.quantile(theirs, [0.1, 0.5, 0.9]),
                                   rtol=0.1)


def test_random_erasing_fills_with_per_pixel_uniform_noise(erased):
    values = [image[image != -50.0] for image in erased]
    fills = np.concatenate(values)
    assert all(np.unique(v).size > v.size // 2 for v in values if v.size)  # noise, not one value per box
    assert 0.0 <= fills.min() and fills.max() < 1.0
    assert abs(fills.mean() - 0.5) < 4 * np.sqrt(1 / 12 / fills.size)


def test_cutout_square_is_clipped_at_the_border():
    size = 8
    images = jnp.ones((DRAWS, SIZE, SIZE, 3))
    out = np.asarray(jax.jit(lambda k: aug.augment(images, k, ["cutout"], cutout_size=size))(keys(DRAWS, 2)))
    zeroed = out[..., 0] == 0
    assert ((out == 0) == zeroed[..., None]).all() and ((out == 0) | (out == 1)).all()
    # DeVries & Taylor: centre uniform over the pixels, the square clipped to the image: expected side per axis.
    centres = np.arange(SIZE)
    side = (np.minimum(centres + size // 2, SIZE) - np.maximum(centres - size // 2, 0)).mean()
    areas = zeroed.sum(axis=(1, 2))
    assert zeroed.any(axis=(1, 2)).all() and areas.max() == size * size
    assert abs(areas.mean() - side**2) < 4 * areas.std() / np.sqrt(DRAWS)


def test_flip_and_crop():
    images = jnp.asarray(np.random.default_rng(0).normal(size=(400, SIZE, SIZE, 3)), jnp.float32)
    flipped = np.asarray(jax.jit(lambda k: aug.augment(images, k, ["flip"]))(keys(400, 3)))
    mirrored = (flipped == np.asarray(images)[:, :, ::-1]).all(axis=(1, 2, 3))
    same = (flipped == np.asarray(images)).all(axis=(1, 2, 3))
    assert (mirrored ^ same).all() and abs(mirrored.mean() - 0.5) < 0.1

    cropped = np.asarray(jax.jit(lambda k: aug.augment(images, k, ["crop"]))(keys(400, 4)))
    padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets = set()
    for pad, out in zip(padded, cropped):
        match = [(y, x) for y in range(9) for x in range(9)
                 if (pad[y:y + SIZE, x:x + SIZE] == out).all()]
        assert len(match) == 1
        offsets.add(match[0])
    assert len(offsets) > 60  # of the 81 possible shifts


def test_deterministic_per_key_and_independent_of_the_batch_layout():
    names = ["crop", "flip", "random-erasing", "cutout"]
    images = preprocess_input(np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8))
    k = keys(8, 5)
    run = jax.jit(lambda x, k: aug.augment(x, k, names))
    first = np.asarray(run(images, k))
    np.testing.assert_array_equal(first, np.asarray(run(images, k)))
    perm = np.array([5, 2, 7, 0, 1, 6, 3, 4])
    np.testing.assert_array_equal(first[perm], np.asarray(run(images[perm], k[perm])))
    assert not np.array_equal(first, np.asarray(run(images, keys(8, 6))))
    assert first.shape == images.shape and first.dtype == np.float32


def test_disabled_is_a_no_op():
    images = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    assert aug.augment(images, keys(2), []) is images
