"""Shared pieces of the fine-tuning engine tests: a cheap random backbone, seeded uint8 batches, and a few
real training steps (cached, so test modules share one compilation per freeze preset)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxresnet import train_lib
from flaxresnet.config import Config
from flaxresnet.data import shard
from flaxresnet.models import ResNet

CLASSES = 10
BATCH = 8
SIZE = 32
AUGMENT = ("crop", "flip", "random-erasing", "cutout")


def random_backbone(depth: int = 50, seed: int = 0) -> tuple[ResNet, dict]:
    """(ResNet, variables) as `load_converted` returns them, drawn with numpy: He-normal conv kernels, small
    biases, BN gamma/beta/mean/var spread around (1, 0, 0, 1). Skips the slow random init of Flax."""
    model = ResNet(depth=depth)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    rng = np.random.default_rng(seed)

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return rng.normal(0.0, 0.1, shape).astype(np.float32)

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


def random_batch(n: int = BATCH, size: int = SIZE, num_classes: int = CLASSES, seed: int = 0) -> dict:
    """{'image': uint8 (n, size, size, 3), 'label': int32 (n,)}."""
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, num_classes, n).astype(np.int32)}


def small_config(**overrides) -> Config:
    """The seed recipe on 32 px images at native size, 10 classes, batch 8, all augmentations, no dropout
    (dropout masks depend on the device layout; everything else here does not)."""
    return Config(**{"num_classes": CLASSES, "image_size": None, "batch_size": BATCH, "dropout": 0.0,
                     "augment": AUGMENT, **overrides})


@functools.lru_cache(maxsize=None)
def train_steps(steps: int = 3) -> tuple[list[train_lib.TrainState], list[dict[str, float]]]:
    """The initial state and the state after each of `steps` real steps of `p_train_step` (the test config,
    all local devices, seeded batches 0, 1, ...), unreplicated on the host; and the per-step metrics."""
    state = jax.device_get(train_lib.create_train_state(small_config(), jax.random.key(0),
                                                        backbone=random_backbone()))
    replicated = train_lib.replicate(state)
    states, metrics = [state], []
    for i in range(steps):
        batch = shard(random_batch(seed=i), jax.local_device_count())
        replicated, m = train_lib.p_train_step(replicated, batch, jax.random.key(1))
        states.append(jax.device_get(train_lib.unreplicate(replicated)))
        metrics.append({k: float(v[0]) for k, v in m.items()})
    return states, metrics


# Inference logits; the model is a static argument, so equal models share one compilation.
predict = jax.jit(lambda model, variables, images: model.apply(variables, images), static_argnums=0)
