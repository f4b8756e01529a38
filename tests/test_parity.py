"""Numerical parity with Keras 3: ResNet50 at 224x224, random weights with randomized BatchNorm state.

One Keras model with top is built; its file (legacy .h5) and a no-top file holding the same backbone are
converted, and the Flax outputs are compared with Keras' at every stage, so a failure says where.
"""

import jax
import numpy as np
import pytest

from convert.keras_to_flax import keras_to_flax
from flaxresnet import load_converted, preprocess_input
from keras_helpers import keras_resnet, layer_weights, random_images, write_legacy_h5

STAGES = ["conv1_relu", "pool1_pool", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out",
          "conv5_block3_out"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Keras stage outputs and probabilities on 4 images, plus the converted top and no-top files."""
    import keras

    model = keras_resnet(50, include_top=True, size=224)
    kernel, bias = model.get_layer("predictions").get_weights()
    model.get_layer("predictions").set_weights([kernel * 40, bias])  # confident softmax: not near-uniform
    images = preprocess_input(random_images(4, 224, seed=3))
    probe = keras.Model(model.inputs, [model.get_layer(n).output for n in STAGES] + [model.output])
    outputs = probe.predict(np.asarray(images), verbose=0)
    folder = tmp_path_factory.mktemp("parity")
    weights = layer_weights(model)
    write_legacy_h5(folder / "top.h5", weights)
    write_legacy_h5(folder / "notop.h5", {k: v for k, v in weights.items() if k != "predictions"})
    keras_to_flax(str(folder / "top.h5"), str(folder / "top.msgpack"))
    keras_to_flax(str(folder / "notop.h5"), str(folder / "notop.msgpack"))
    return images, dict(zip(STAGES, outputs)), outputs[-1], folder


def test_no_top_features_and_every_stage_match_keras(reference):
    images, stages, _, folder = reference
    model, variables = load_converted(folder / "notop.msgpack")
    features, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    assert features.shape == (4, 7, 7, 2048)
    for name in STAGES:
        diff = float(np.abs(np.asarray(state["intermediates"][name][0]) - stages[name]).max())
        assert diff <= 1e-4, f"{name}: max abs diff {diff:.3g} vs Keras"
    diff = float(np.abs(np.asarray(features) - stages["conv5_block3_out"]).max())
    print(f"ResNet50 224px no-top features: max abs diff {diff:.3g}")
    assert diff <= 1e-4


def test_top_probabilities_match_keras(reference):
    images, _, probs, folder = reference
    model, variables = load_converted(folder / "top.msgpack")
    logits = model.apply(variables, images, train=False)
    assert logits.shape == (4, 1000)
    assert probs.max() > 0.5, "reference softmax is near-uniform: the test would be blind"
    diff = float(np.abs(np.asarray(jax.nn.softmax(logits)) - probs).max())
    print(f"ResNet50 224px top probabilities: max abs diff {diff:.3g}")
    assert diff <= 1e-5
