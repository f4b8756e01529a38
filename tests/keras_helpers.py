"""Keras reference models for the tests: random weights with realistic, randomized BatchNorm state.

With Keras' default BN state (gamma 1, beta 0, mean 0, variance 1) a port that mixes up BN parameters still
passes, and random conv weights without matching statistics blow activations up to hundreds, where float32
rounding alone exceeds the parity tolerances. So the BN statistics are first calibrated on a batch (as a
trained network's are), then every one of gamma, beta, moving mean and variance is perturbed at random.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import jax
import numpy as np

from flaxresnet.preprocess import preprocess_input


def randomize_batchnorm(model, seed: int = 0, size: int | None = None, mode: str = "caffe") -> None:
    """Give every BatchNormalization of `model` random gamma/beta, calibrated-then-perturbed statistics.

    The last BN of each residual branch (`*_3_bn`, `*_branch2c`) gets a small gamma, as in trained ResNets, so activations
    stay O(1)-O(10) through all blocks instead of growing with depth. The statistics are calibrated on images
    preprocessed in `mode`, the model's ('caffe' for ResNet, 'tf' for ResNetV2).
    """
    import keras

    rng = np.random.default_rng(seed)
    bns = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        n = bn.gamma.shape[0]
        low, high = (0.1, 0.4) if bn.name.endswith(("_3_bn", "_branch2c")) else (0.5, 1.5)
        bn.gamma.assign(rng.uniform(low, high, n).astype("float32"))
        bn.beta.assign(rng.normal(0.0, 0.2, n).astype("float32"))
        bn.momentum = 0.0
    size = size or model.input_shape[1]
    model(np.asarray(preprocess_input(random_images(8, size, seed + 1), mode=mode)), training=True)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
        n = bn.moving_mean.shape[0]
        std = np.sqrt(np.asarray(bn.moving_variance))
        bn.moving_mean.assign((np.asarray(bn.moving_mean) + rng.normal(0.0, 0.1, n) * std).astype("float32"))
        bn.moving_variance.assign((std**2 * rng.uniform(0.8, 1.2, n)).astype("float32"))


def _all_layers(model) -> list:
    """Layers of `model`, descending into nested models (a ResNet inside a Sequential)."""
    out = []
    for layer in model.layers:
        out.extend(_all_layers(layer) if hasattr(layer, "layers") else [layer])
    return out


# The keras.applications preprocessing mode of each ResNet family.
PREPROCESS_MODE = {"v1": "caffe", "v2": "tf"}


def keras_resnet(depth: int = 50, include_top: bool = False, size: int = 64, classes: int = 1000,
                 seed: int = 0, family: str = "v1"):
    """A keras.applications ResNet{depth} (family 'v1') or ResNet{depth}V2 ('v2') with seeded random weights and
    randomized BN, calibrated on the family's preprocessing."""
    import keras

    keras.utils.set_random_seed(seed)
    apps = keras.applications
    build = {("v1", 50): apps.ResNet50, ("v1", 101): apps.ResNet101, ("v1", 152): apps.ResNet152,
             ("v2", 50): apps.ResNet50V2, ("v2", 101): apps.ResNet101V2, ("v2", 152): apps.ResNet152V2}
    model = build[family, depth](weights=None, include_top=include_top, input_shape=(size, size, 3), classes=classes)
    randomize_batchnorm(model, seed, mode=PREPROCESS_MODE[family])
    return model


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8-valued RGB images as float32, (n, size, size, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype("float32")


KERAS_WEIGHT_NAMES = {
    "Conv2D": ("kernel", "bias"),
    "Dense": ("kernel", "bias"),
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
}


def layer_weights(model) -> dict[str, list[tuple[str, np.ndarray]]]:
    """{layer name: [(weight name, array), ...]} for every weighted layer of `model`, in `model.layers` order."""
    return {layer.name: list(zip(KERAS_WEIGHT_NAMES[type(layer).__name__], layer.get_weights()))
            for layer in _all_layers(model) if layer.get_weights()}


def write_legacy_h5(path, layers: dict[str, list[tuple[str, np.ndarray]]], *, keras2: bool = True,
                    split_layer_names: int = 1, full_model: bool = False,
                    weightless: tuple[str, ...] = ("input_1", "conv1_pad")) -> None:
    """Write a legacy Keras weights file the way Keras 2 (`keras2`: `:0` suffixes, bytes attrs) or Keras 3 did.

    `split_layer_names` > 1 splits the `layer_names` attribute into `layer_names0..N` chunks, as Keras does for
    large models; `weightless` layers are listed with empty `weight_names`, as real files list them;
    `full_model` nests everything under `model_weights/` like `model.save('x.h5')`.
    """
    import h5py

    def strings(values: list[str]) -> np.ndarray:
        return np.array([v.encode("utf8") for v in values]) if keras2 else np.array(values, dtype=object)

    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if full_model else f
        names = list(weightless) + list(layers)
        for i, chunk in enumerate(np.array_split(np.arange(len(names)), split_layer_names)):
            key = "layer_names" if split_layer_names == 1 else f"layer_names{i}"
            root.attrs[key] = strings([names[j] for j in chunk])
        root.attrs["backend"] = "tensorflow" if keras2 else "jax"
        root.attrs["keras_version"] = "2.2.4" if keras2 else "3.15.1"
        for name in weightless:
            root.create_group(name).attrs["weight_names"] = np.array([], dtype="float64")
        for name, weights in layers.items():
            group = root.create_group(name)
            full = [f"{name}/{w}{':0' if keras2 else ''}" for w, _ in weights]
            group.attrs["weight_names"] = strings(full)
            for key, (_, array) in zip(full, weights):
                group.create_dataset(key, data=array)


def keras_resnet50_v02(include_top: bool = True, size: int = 64, classes: int = 1000, seed: int = 0):
    """ResNet50 with the old keras_applications `resnet50.py` names and BN epsilon 1e-3 (the v0.2 weights).

    Follows keras-team/keras-applications `resnet50.py` at its last version (1.0.8): `conv1_pad`, `conv1`,
    `bn_conv1`, `pool1_pad`, `res{stage}{block}_branch2a/2b/2c/1`, `bn...`, global average pool, `fc1000`.
    """
    import keras
    from keras import layers

    def block(x, filters, stage, letter, strides, shortcut_conv):
        conv, bn = f"res{stage}{letter}_branch", f"bn{stage}{letter}_branch"
        f1, f2, f3 = filters
        y = layers.Conv2D(f1, 1, strides=strides, name=conv + "2a")(x)
        y = layers.Activation("relu")(layers.BatchNormalization(name=bn + "2a")(y))
        y = layers.Conv2D(f2, 3, padding="same", name=conv + "2b")(y)
        y = layers.Activation("relu")(layers.BatchNormalization(name=bn + "2b")(y))
        y = layers.BatchNormalization(name=bn + "2c")(layers.Conv2D(f3, 1, name=conv + "2c")(y))
        if shortcut_conv:
            x = layers.BatchNormalization(name=bn + "1")(layers.Conv2D(f3, 1, strides=strides, name=conv + "1")(x))
        return layers.Activation("relu")(layers.add([y, x]))

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = layers.ZeroPadding2D(3, name="conv1_pad")(inputs)
    x = layers.Conv2D(64, 7, strides=2, padding="valid", name="conv1")(x)
    x = layers.Activation("relu")(layers.BatchNormalization(name="bn_conv1")(x))
    x = layers.MaxPooling2D(3, strides=2)(layers.ZeroPadding2D(1, name="pool1_pad")(x))
    for stage, blocks, width in ((2, 3, 64), (3, 4, 128), (4, 6, 256), (5, 3, 512)):
        for i in range(blocks):
            x = block(x, (width, width, 4 * width), stage, "abcdef"[i], 1 if stage == 2 or i else 2, i == 0)
    if include_top:
        x = layers.Dense(classes, activation="softmax", name="fc1000")(layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, x, name="resnet50")
    randomize_batchnorm(model, seed)
    return model


# ---- the parity contract: float64 proves equality, float32 is bounded by Keras' own float32 rounding ----

# float64 flaxresnet vs float64 Keras, relative to each tensor's largest magnitude.
FLOAT64_RTOL = 1e-9
# float32 flaxresnet may be at most this many times as far from the float64 result as float32 Keras is.
FLOAT32_FACTOR = 2.0


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """64-bit JAX, Keras floatx and dtype policy float64 inside the block (all restored after).

    Keras 3 on JAX also needs its type promotion kept in float64: `keras.src.backend.common.dtypes` maps every
    float64 result of `result_type` to float32 on the JAX backend (not on TensorFlow's), so e.g.
    BatchNormalization, which computes in `result_type(inputs.dtype, "float32")`, would run in float32 and the
    reference would be float32-accurate only (measured: 1.6e-7 off float64 after conv1_bn). The block maps
    float64 to float64, as Keras does on TensorFlow.
    """
    import keras
    from keras.src.backend.common import dtypes

    policy = keras.config.dtype_policy()  # fixed at its first use, from the floatx of then
    with jax.enable_x64(True), mock.patch.dict(dtypes.BIT64_TO_BIT32_DTYPE, {"float64": "float64"}):
        keras.config.set_floatx("float64")
        keras.config.set_dtype_policy("float64")
        try:
            yield
        finally:
            keras.config.set_floatx("float32")
            keras.config.set_dtype_policy(policy)


def float64_twin(model):
    """A float64 copy of a Keras model: every layer (and input) rebuilt with dtype float64, holding the same
    weights (float32 values, so exactly representable). Call it, and the copy, inside `float64()`."""
    import keras

    def clone(layer):
        if isinstance(layer, keras.Model):  # a nested model (the backbone of a Sequential): float64 inputs too
            return twin_of(layer)
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float64"})

    def twin_of(model):
        inputs = [keras.Input(batch_shape=x.shape, dtype="float64") for x in model.inputs]
        return keras.models.clone_model(model, input_tensors=inputs[0] if len(inputs) == 1 else inputs,
                                        clone_function=clone)

    twin = twin_of(model)
    twin.set_weights(model.get_weights())
    return twin


Tensors = np.ndarray | dict[str, np.ndarray]


def scaled_distance(a: Tensors, reference: Tensors) -> float:
    """Largest difference of `a` from `reference`, relative to each tensor's largest magnitude (the max over the
    tensors of a dict): elementwise relative error is meaningless where values cross zero."""
    if isinstance(reference, dict):
        return max(scaled_distance(a[k], reference[k]) for k in reference)
    reference = np.asarray(reference, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - reference).max() / np.abs(reference).max())


def assert_parity(what: str, ours32: Tensors, ours64: Tensors, keras32: Tensors, keras64: Tensors) -> dict:
    """The parity contract, on the same float32-representable weights and inputs:
    - float64 flaxresnet equals float64 Keras to FLOAT64_RTOL (the proof: nothing but rounding differs);
    - float32 flaxresnet is no farther from float64 Keras than FLOAT32_FACTOR x float32 Keras is, plus one
      float32 epsilon (a floor where Keras' distance is ~0). This holds on any CPU, however it rounds, and fails
      for a real bug (wrong epsilon, channel order, BN formula), which is far above float32 rounding.
    Returns the distances (scaled as in `scaled_distance`) and prints them."""
    figures = {"float64": scaled_distance(ours64, keras64), "flaxresnet32": scaled_distance(ours32, keras64),
               "keras32": scaled_distance(keras32, keras64)}
    print(f"{what}: float64 vs Keras float64 {figures['float64']:.2g}; float32 distance to float64: flaxresnet "
          f"{figures['flaxresnet32']:.2g}, Keras {figures['keras32']:.2g}")
    assert figures["float64"] <= FLOAT64_RTOL, f"{what}: float64 flaxresnet differs from float64 Keras: {figures}"
    bound = FLOAT32_FACTOR * figures["keras32"] + np.finfo(np.float32).eps
    assert figures["flaxresnet32"] <= bound, f"{what}: float32 flaxresnet beyond Keras' own rounding: {figures}"
    return figures


def flax_predict(path, images: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """A weights file's output on `images` (preprocessed for a ResNet, raw for a classifier), in `dtype`, jitted
    as flaxresnet runs it: the feature map of a no-top ResNet, the softmax probabilities of a ResNet with a top
    (what Keras' top outputs), the logits of a classifier (what its Keras export outputs)."""
    from flaxresnet import load_converted
    from flaxresnet.models import KerasResNet

    model, variables = load_converted(path, dtype=dtype)
    finish = jax.nn.softmax if isinstance(model, KerasResNet) and model.include_top else (lambda x: x)
    return np.asarray(jax.jit(lambda v, x: finish(model.apply(v, x)))(variables, images.astype(dtype)))


def assert_file_matches_keras(what: str, path, model, images: np.ndarray, mode: str = "caffe") -> dict:
    """`assert_parity` for a converted file against the Keras `model` it came from, on raw RGB `images`
    preprocessed in `mode` (the model's: 'caffe' for ResNet, 'tf' for ResNetV2)."""
    x = np.asarray(preprocess_input(images, mode=mode))  # float32 values, given exactly to the float64 models
    ours32, keras32 = flax_predict(path, x), model.predict(x, verbose=0)
    with float64():
        ours64 = flax_predict(path, x, "float64")
        keras64 = float64_twin(model).predict(x.astype(np.float64), verbose=0)
    return assert_parity(what, ours32, ours64, keras32, keras64)
