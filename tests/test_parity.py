"""Numerical parity with Keras 3: ResNet50 at 224x224, random weights with randomized BatchNorm state.

One Keras model with top is built, and its float64 twin (the same float32 weights); its file (legacy .h5) and a
no-top file holding the same backbone are converted. Every stage, the no-top features and the top probabilities
are compared in float64 (flaxresnet equals Keras to 1e-9: the proof) and in float32 (flaxresnet's distance to
the float64 result is bounded by Keras' own float32 distance to it: a bound that holds on every CPU).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.keras_to_flax import keras_to_flax
from flaxresnet import load_converted, preprocess_input
from keras_helpers import (assert_parity, float64, float64_twin, keras_resnet, layer_weights, random_images,
                           write_legacy_h5)

STAGES = ["conv1_relu", "pool1_pool", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out",
          "conv5_block3_out"]


def keras_outputs(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """{stage name: output} and 'probabilities' of the Keras model on `images`."""
    import keras

    probe = keras.Model(model.inputs, [model.get_layer(n).output for n in STAGES] + [model.output])
    return dict(zip([*STAGES, "probabilities"], probe.predict(images, verbose=0)))


def flax_outputs(folder, images: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """The same outputs from the converted files, computed in `dtype` and jitted as flaxresnet runs them (like
    Keras' `predict`; op by op, XLA rounds the softmax differently): stages and 'features' from the no-top file,
    'probabilities' from the top file."""
    model, variables = load_converted(folder / "notop.msgpack", dtype=dtype)
    features, state = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))(
        variables, jnp.asarray(images, dtype))
    assert features.dtype == dtype and features.shape == (4, 7, 7, 2048)
    outputs = {name: np.asarray(state["intermediates"][name][0]) for name in STAGES}
    model, variables = load_converted(folder / "top.msgpack", dtype=dtype)
    probabilities = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x)))(variables, jnp.asarray(images, dtype))
    assert probabilities.dtype == dtype and probabilities.shape == (4, 1000)
    return {**outputs, "features": np.asarray(features), "probabilities": np.asarray(probabilities)}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """{'keras32', 'keras64', 'flaxresnet32', 'flaxresnet64'} -> outputs on the same 4 preprocessed images
    (float32 values, given to the float64 models exactly)."""
    model = keras_resnet(50, include_top=True, size=224)
    kernel, bias = model.get_layer("predictions").get_weights()
    model.get_layer("predictions").set_weights([kernel * 40, bias])  # confident softmax: not near-uniform
    images = np.asarray(preprocess_input(random_images(4, 224, seed=3)))
    folder = tmp_path_factory.mktemp("parity")
    weights = layer_weights(model)
    write_legacy_h5(folder / "top.h5", weights)
    write_legacy_h5(folder / "notop.h5", {k: v for k, v in weights.items() if k != "predictions"})
    keras_to_flax(str(folder / "top.h5"), str(folder / "top.msgpack"))
    keras_to_flax(str(folder / "notop.h5"), str(folder / "notop.msgpack"))
    results = {"keras32": keras_outputs(model, images), "flaxresnet32": flax_outputs(folder, images, "float32")}
    with float64():
        results["keras64"] = keras_outputs(float64_twin(model), images.astype(np.float64))
        results["flaxresnet64"] = flax_outputs(folder, images, "float64")
    for name in ("keras32", "keras64"):
        results[name]["features"] = results[name]["conv5_block3_out"]
    assert results["keras64"]["probabilities"].dtype == np.float64
    return results


@pytest.mark.parametrize("name", [*STAGES, "features"])
def test_every_stage_and_the_no_top_features_match_keras(outputs, name):
    assert_parity(f"ResNet50 224px {name}", *(outputs[k][name] for k in
                                              ("flaxresnet32", "flaxresnet64", "keras32", "keras64")))


def test_top_probabilities_match_keras(outputs):
    assert outputs["keras64"]["probabilities"].max() > 0.5, "reference softmax is near-uniform: the test is blind"
    assert_parity("ResNet50 224px top probabilities", *(outputs[k]["probabilities"] for k in
                                                        ("flaxresnet32", "flaxresnet64", "keras32", "keras64")))
