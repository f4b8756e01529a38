"""Training parity with Keras 3: the seed recipe (frozen convs, trainable BN, seed head, Keras Adam) trained
on the same 10 batches in Keras (`train_on_batch`) and through `p_train_step` gives the same per-step losses
and BN moving statistics. Backbone weights go Keras -> Flax through the project's converter; the three head
layers are copied directly.

The learning rate is the recipe's 1e-3. A 10-step trajectory there is sensitive to rounding: Adam's first
steps move every parameter by about lr * sign(g), so gradient elements near zero flip with rounding noise.
It stays on Keras' track because flaxresnet's BatchNorm computes x * inv + (beta - mean * inv) exactly as
Keras' does (with flax.linen.BatchNorm's (x - mean) * inv + beta, the losses were 6e-3 apart by step 10).
Keras Adam's update formula itself is checked exactly in test_train_lib.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from benchmarks.original import seed_model
from convert.keras_to_flax import keras_to_flax
from flaxresnet import freeze, load_converted, preprocess_input, train_lib
from flaxresnet.config import Config
from flaxresnet.data import shard
from keras_helpers import keras_resnet, randomize_batchnorm

STEPS = 10
BATCH = 8
SIZE = 32
CLASSES = 100
LEARNING_RATE = 1e-3
# Measured on CPU, float32: max relative loss difference 3.8e-5 over the 10 steps; BN moving statistics
# within 1.2e-5 of each tensor's largest magnitude.
LOSS_RTOL = 1e-4
STATS_SCALED_TOL = 2e-5


def seed_model_keras():
    """The seed's Sequential (benchmarks/original.py) with one UpSampling2D(2), dropout off and LEARNING_RATE,
    around a ResNet50 with randomized BN; every BN of the model randomized. Returns (model, backbone)."""
    backbone = keras_resnet(50, include_top=False, size=2 * SIZE, seed=0)
    model = seed_model(backbone, SIZE, 2, CLASSES, dropout=0.0, learning_rate=LEARNING_RATE)
    randomize_batchnorm(model, seed=1)
    return model, backbone


def flax_state_from_keras(model, backbone, folder: Path) -> train_lib.TrainState:
    """A seed-recipe TrainState holding the Keras model's weights."""
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(folder / "backbone.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, backbone)
    keras_to_flax(str(folder / "backbone.h5"), str(folder / "backbone.msgpack"))
    config = Config(num_classes=CLASSES, image_size=2 * SIZE, dropout=0.0, augment=(), batch_size=BATCH,
                    learning_rate=LEARNING_RATE)
    state = train_lib.create_train_state(config, jax.random.key(0),
                                         backbone=load_converted(folder / "backbone.msgpack"))
    dense, bn, dense_1 = (layer for layer in model.layers if layer.weights and layer is not backbone)
    params = {**state.params, "head": {
        "dense": {"kernel": dense.kernel, "bias": dense.bias},
        "batch_normalization": {"scale": bn.gamma, "bias": bn.beta},
        "dense_1": {"kernel": dense_1.kernel, "bias": dense_1.bias}}}
    stats = {**state.batch_stats, "head": {"batch_normalization": {"mean": bn.moving_mean,
                                                                   "var": bn.moving_variance}}}
    params, stats = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), (params, stats))
    return state.replace(params=params, batch_stats=stats)


def keras_bn_stats(model, backbone) -> dict[str, np.ndarray]:
    """'{backbone|head}/<Flax BN name>/{mean,var}' -> Keras moving statistics."""
    import keras

    out = {}
    for prefix, layers in (("backbone", backbone.layers), ("head", model.layers)):
        for layer in layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                name = layer.name if prefix == "backbone" else "batch_normalization"
                out[f"{prefix}/{name}/mean"] = np.asarray(layer.moving_mean)
                out[f"{prefix}/{name}/var"] = np.asarray(layer.moving_variance)
    return out


def test_seed_recipe_trains_like_keras(tmp_path):
    model, backbone = seed_model_keras()
    state = flax_state_from_keras(model, backbone, tmp_path)
    counts = freeze.parameter_counts(state.variables(), freeze.labels(state.params, "convs"))
    keras_trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert (counts["trainable"], counts["total"]) == (keras_trainable, model.count_params())

    rng = np.random.default_rng(7)
    replicated = train_lib.replicate(state)
    keras_losses, flax_losses = [], []
    for _ in range(STEPS):
        batch = {"image": rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8),
                 "label": rng.integers(0, CLASSES, BATCH).astype(np.int32)}
        keras_losses.append(float(model.train_on_batch(np.asarray(preprocess_input(batch["image"])),
                                                        batch["label"], return_dict=True)["loss"]))
        replicated, metrics = train_lib.p_train_step(replicated, shard(batch, 1), jax.random.key(0))
        flax_losses.append(float(metrics["loss"][0]))
    rel = np.abs(np.array(flax_losses) / np.array(keras_losses) - 1)
    print(f"max relative loss difference {rel.max():.2g}")
    assert rel.max() < LOSS_RTOL, f"relative loss differences per step: {rel}"

    ours = traverse_util.flatten_dict(jax.device_get(train_lib.unreplicate(replicated).batch_stats), sep="/")
    initial = traverse_util.flatten_dict(jax.device_get(state.batch_stats), sep="/")
    theirs = keras_bn_stats(model, backbone)
    assert sorted(ours) == sorted(theirs)
    assert all(np.abs(ours[k] - initial[k]).max() > 1e-3 for k in ours)  # every moving statistic moved
    # Per tensor, the largest difference relative to the tensor's largest magnitude (means cross zero).
    worst = max(float(np.abs(ours[k] - theirs[k]).max() / np.abs(theirs[k]).max()) for k in theirs)
    print(f"max scaled BN moving-statistics difference {worst:.2g}")
    assert worst < STATS_SCALED_TOL
