"""Training parity with Keras 3: the seed recipe (frozen convs, trainable BN, seed head, Keras Adam) trained on
the same 10 batches in Keras (`train_on_batch`) and through `p_train_step` gives the same per-step losses and
BN moving statistics. Backbone weights go Keras -> Flax through the project's converter; the three head layers
are copied directly.

Both are run in float64 too, from the same float32 weights: there flaxresnet equals Keras to 1e-9 (on one
device and on two, whose BN statistics and gradients are averaged over the global batch), which proves that
nothing but rounding separates them. On a ResNet50V2 backbone ('tf' preprocessing) the recipe also has the seed's
random erasing, Keras fed the very images flaxresnet's step erases (`train_lib.example_keys`); V2's contract is
the float64 one, on one device and on two. The float32 runs are bounded by Keras' own float32 distance to the
float64 run. The learning rate is the recipe's 1e-3, where a 10-step trajectory is sensitive to rounding
(Adam's first steps move every parameter by about lr * sign(g), so gradient elements near zero flip with
rounding noise): a float32 bound fixed in advance would be one CPU's rounding, this one holds on any CPU.
Keras Adam's update formula itself is checked exactly in test_train_lib.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from benchmarks.original import seed_model
from convert.keras_to_flax import keras_to_flax
from flaxresnet import augment as augment_lib
from flaxresnet import freeze, load_converted, preprocess_input, train_lib
from flaxresnet.config import Config
from flaxresnet.data import shard
from keras_helpers import FLOAT64_RTOL, assert_parity, float64, float64_twin, keras_resnet, randomize_batchnorm, \
    scaled_distance

STEPS = 10
BATCH = 8
SIZE = 16  # native: the model sees 32 px
CLASSES = 100
LEARNING_RATE = 1e-3
# The augmentation of each family's recipe (the V1 test predates random erasing in it).
AUGMENT = {"v1": (), "v2": ("random-erasing",)}
PREPROCESS = {"v1": "caffe", "v2": "tf"}


def seed_model_keras(family: str = "v1"):
    """The seed's Sequential (benchmarks/original.py) with one UpSampling2D(2), dropout off and LEARNING_RATE,
    around a ResNet50 (or ResNet50V2) with randomized BN; every BN of the model randomized. Returns (model,
    backbone)."""
    backbone = keras_resnet(50, include_top=False, size=2 * SIZE, seed=0, family=family)
    model = seed_model(backbone, SIZE, 2, CLASSES, dropout=0.0, learning_rate=LEARNING_RATE)
    randomize_batchnorm(model, seed=1)
    return model, backbone


def seed_model_keras64(model, backbone):
    """The float64 twin of `seed_model_keras`'s model, compiled alike, with the same weights; call inside
    `float64()`. Returns (model, backbone)."""
    backbone64 = float64_twin(backbone)
    model64 = seed_model(backbone64, SIZE, 2, CLASSES, dropout=0.0, learning_rate=LEARNING_RATE)
    model64.set_weights(model.get_weights())
    return model64, backbone64


def config(dtype: str, family: str = "v1") -> Config:
    return Config(num_classes=CLASSES, image_size=2 * SIZE, dropout=0.0, augment=AUGMENT[family],
                  batch_size=BATCH, learning_rate=LEARNING_RATE, dtype=dtype)


def flax_state_from_keras(model, backbone_file: Path, dtype: str, family: str = "v1") -> train_lib.TrainState:
    """A seed-recipe TrainState in `dtype` holding the Keras model's weights (backbone from its converted file)."""
    state = train_lib.create_train_state(config(dtype, family), jax.random.key(0),
                                         backbone=load_converted(backbone_file, dtype=dtype))
    backbone = keras_backbone(model)
    dense, bn, dense_1 = (layer for layer in model.layers if layer.weights and layer is not backbone)
    params = {**state.params, "head": {
        "dense": {"kernel": dense.kernel, "bias": dense.bias},
        "batch_normalization": {"scale": bn.gamma, "bias": bn.beta},
        "dense_1": {"kernel": dense_1.kernel, "bias": dense_1.bias}}}
    stats = {**state.batch_stats, "head": {"batch_normalization": {"mean": bn.moving_mean,
                                                                   "var": bn.moving_variance}}}
    params, stats = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), dtype), (params, stats))
    return state.replace(params=params, batch_stats=stats)


def keras_backbone(model):
    """The ResNet nested in the seed's Sequential."""
    return next(layer for layer in model.layers if hasattr(layer, "layers"))


def keras_bn_stats(model) -> dict[str, np.ndarray]:
    """'{backbone|head}/<Flax BN name>/{mean,var}' -> Keras moving statistics."""
    import keras

    out = {}
    for prefix, layers in (("backbone", keras_backbone(model).layers), ("head", model.layers)):
        for layer in layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                name = layer.name if prefix == "backbone" else "batch_normalization"
                out[f"{prefix}/{name}/mean"] = np.asarray(layer.moving_mean)
                out[f"{prefix}/{name}/var"] = np.asarray(layer.moving_variance)
    return out


def keras_inputs(batch: dict, step: int, dtype: str, family: str) -> np.ndarray:
    """What the Keras model trains on at `step`: the family's `preprocess_input` of the batch, then the recipe's
    augmentation drawn with the keys flaxresnet's step `step` uses (its rng is jax.random.key(0))."""
    images = preprocess_input(batch["image"], dtype, mode=PREPROCESS[family])
    keys = train_lib.example_keys(jax.random.key(0), step, 0, len(images))
    return np.asarray(augment_lib.augment(images, keys, AUGMENT[family]))


def train_keras(model, batches: list[dict], dtype: str,
                family: str = "v1") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-step losses of `train_on_batch` on `batches`, and the BN moving statistics after them."""
    losses = [float(model.train_on_batch(keras_inputs(b, step, dtype, family), b["label"],
                                         return_dict=True)["loss"]) for step, b in enumerate(batches)]
    return np.array(losses), keras_bn_stats(model)


def train_flax(state: train_lib.TrainState, batches: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-step losses of `p_train_step` on `batches` over all local devices, and the BN moving statistics."""
    replicated, losses = train_lib.replicate(state), []
    for batch in batches:
        replicated, metrics = train_lib.p_train_step(replicated, shard(batch, jax.local_device_count()),
                                                     jax.random.key(0))
        losses.append(float(metrics["loss"][0]))
    stats = jax.device_get(train_lib.unreplicate(replicated).batch_stats)
    return np.array(losses), traverse_util.flatten_dict(stats, sep="/")


# The float64 run on two (forced CPU) devices, in its own process: the device count is fixed at JAX start-up.
TWO_DEVICES = """
import json, sys
import jax, numpy as np
from flax import serialization
sys.path[:0] = [{tests!r}, {root!r}]
import test_train_parity as t
from flaxresnet import train_lib
assert jax.local_device_count() == 2 and jax.config.jax_enable_x64
state = train_lib.create_train_state(t.config("float64", {family!r}), jax.random.key(0),
                                     backbone=t.load_converted({backbone!r}, dtype="float64"))
state = serialization.from_bytes(state, open({folder!r} + "/state64.msgpack", "rb").read())
data = np.load({folder!r} + "/batches.npz")
batches = [{{"image": data[f"image{{i}}"], "label": data[f"label{{i}}"]}} for i in range(t.STEPS)]
losses, stats = t.train_flax(state, batches)
np.savez({folder!r} + "/two.npz", losses=losses, **stats)
"""


@contextlib.contextmanager
def training_on_two_devices(state: train_lib.TrainState, batches: list[dict], backbone_file: Path,
                            folder: Path, family: str = "v1") -> Iterator[Callable[[], tuple[np.ndarray, dict[str, np.ndarray]]]]:
    """`train_flax` of a float64 state on two devices, in a subprocess that runs while the block does (the two
    share the 2 CPU cores, and much of both is single-threaded compiling); the block gets a function that waits
    for the result. The subprocess is ended when the block is left."""
    (folder / "state64.msgpack").write_bytes(serialization.to_bytes(jax.device_get(state)))
    np.savez(folder / "batches.npz", **{f"{k}{i}": b[k] for i, b in enumerate(batches) for k in b})
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_ENABLE_X64": "1"}
    script = TWO_DEVICES.format(tests=str(Path(__file__).parent), root=str(Path(__file__).parents[1]),
                                backbone=str(backbone_file), folder=str(folder), family=family)
    with open(folder / "two.err", "w") as err:
        process = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=err)

    def result() -> tuple[np.ndarray, dict[str, np.ndarray]]:
        assert process.wait(timeout=900) == 0, (folder / "two.err").read_text()[-3000:]
        saved = dict(np.load(folder / "two.npz"))
        return saved.pop("losses"), saved

    try:
        yield result
    finally:
        process.kill()
        process.wait()


def keras_seed_recipe(folder: Path, family: str):
    """The Keras seed model, its backbone converted by the project's converter into folder/backbone.msgpack, and
    STEPS random batches. Returns (model, backbone, backbone file, batches)."""
    from keras.src.legacy.saving import legacy_h5_format

    model, backbone = seed_model_keras(family)
    with h5py.File(folder / "backbone.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, backbone)
    keras_to_flax(str(folder / "backbone.h5"), str(folder / "backbone.msgpack"))
    rng = np.random.default_rng(7)
    batches = [{"image": rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8),
                "label": rng.integers(0, CLASSES, BATCH).astype(np.int32)} for _ in range(STEPS)]
    return model, backbone, folder / "backbone.msgpack", batches


def assert_trains_what_keras_trains(state: train_lib.TrainState, model) -> None:
    """The state's trainable and total parameter counts under the recipe's 'convs' freeze are the Keras model's."""
    counts = freeze.parameter_counts(state.variables(), freeze.frozen_paths(state.params, "convs"))
    keras_trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert (counts["trainable"], counts["total"]) == (keras_trainable, model.count_params())


def test_seed_recipe_trains_like_keras(tmp_path):
    model, backbone, backbone_file, batches = keras_seed_recipe(tmp_path, "v1")
    state = flax_state_from_keras(model, backbone_file, "float32")
    assert_trains_what_keras_trains(state, model)

    with contextlib.ExitStack() as background:
        with float64():  # before the float32 runs change the Keras weights
            model64, _ = seed_model_keras64(model, backbone)
            state64 = flax_state_from_keras(model64, backbone_file, "float64")
            two_devices = background.enter_context(training_on_two_devices(state64, batches, backbone_file, tmp_path))
            keras64 = train_keras(model64, batches, "float64")
            flax64 = train_flax(state64, batches)
        keras32, flax32 = train_keras(model, batches, "float32"), train_flax(state, batches)
        two64 = two_devices()

    initial = traverse_util.flatten_dict(jax.device_get(state.batch_stats), sep="/")
    assert sorted(flax32[1]) == sorted(keras32[1]) == sorted(initial)
    assert all(np.abs(flax32[1][k] - initial[k]).max() > 1e-3 for k in initial)  # every statistic moved
    figures = {
        "per-step losses": assert_parity("seed recipe, 10 steps at lr 1e-3: per-step losses", flax32[0],
                                         flax64[0], keras32[0], keras64[0]),
        "BN moving statistics": assert_parity("seed recipe, 10 steps at lr 1e-3: BN moving statistics",
                                              flax32[1], flax64[1], keras32[1], keras64[1])}
    two = {"losses": scaled_distance(two64[0], keras64[0]), "statistics": scaled_distance(two64[1], keras64[1])}
    print(f"float64 on 2 devices vs Keras float64: {two}")
    assert max(two.values()) <= FLOAT64_RTOL, two
    print(json.dumps({**figures, "two devices": two}))


def test_seed_recipe_on_resnet_v2_trains_like_keras_in_float64(tmp_path):
    model, backbone, backbone_file, batches = keras_seed_recipe(tmp_path, "v2")
    with float64():
        model64, _ = seed_model_keras64(model, backbone)
        state64 = flax_state_from_keras(model64, backbone_file, "float64", "v2")
        assert state64.model.family == "v2" and state64.settings.augment == ("random-erasing",)
        assert_trains_what_keras_trains(state64, model64)
        erased = keras_inputs(batches[0], 0, "float64", "v2") != preprocess_input(batches[0]["image"], "float64",
                                                                                   mode="tf")
        assert 0 < erased.any(axis=(1, 2, 3)).sum() < BATCH  # some images erased, some not: the test sees it
        with training_on_two_devices(state64, batches, backbone_file, tmp_path, "v2") as two_devices:
            keras64 = train_keras(model64, batches, "float64", "v2")
            flax64 = train_flax(state64, batches)
            two64 = two_devices()
    initial = traverse_util.flatten_dict(jax.device_get(state64.batch_stats), sep="/")
    assert sorted(flax64[1]) == sorted(keras64[1]) == sorted(initial)
    assert all(np.abs(flax64[1][k] - initial[k]).max() > 1e-3 for k in initial)  # every statistic moved
    figures = {"losses": scaled_distance(flax64[0], keras64[0]), "statistics": scaled_distance(flax64[1], keras64[1]),
               "two devices, losses": scaled_distance(two64[0], keras64[0]),
               "two devices, statistics": scaled_distance(two64[1], keras64[1])}
    print(f"ResNet50V2 seed recipe with random erasing, 10 steps, float64 vs Keras float64: {json.dumps(figures)}")
    assert max(figures.values()) <= FLOAT64_RTOL, figures
