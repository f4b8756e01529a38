"""A user's own Keras classifier in: `keras_to_flax` on a whole model (`.keras`, full-model `.h5`).

Two models, randomized (every BatchNormalization, the head's biases), at small inputs: the seed notebook's
Sequential (two UpSampling2D(2) 8 -> 32 px, a nested ResNet50, GAP -> Dense(256, relu) -> Dropout -> BN ->
Dense(10, softmax), caffe `preprocess_input` outside the model) and a functional model with a ResNet50V2 inlined
(Resizing 16 -> 32 px bilinear, GAP -> Dropout -> Dense(10) logits, 'tf' preprocessing outside). flaxresnet's
logits on raw images give Keras' `predict` on preprocessed images (issue 10's contract: float64 to 1e-9, float32
within Keras' own rounding); `.keras` and `.h5` convert to the same arrays; flax -> keras -> flax is bit for
bit; what it cannot compute is refused in one line; the converted file fine-tunes with `train.py --init-from`.
"""

from __future__ import annotations

import contextlib
import json
import re
import zipfile
from collections.abc import Iterator

import jax
import numpy as np
import pytest
from flax import traverse_util

from benchmarks.original import seed_model
from convert import keras_classifier
from convert.__main__ import main
from convert.flax_to_keras import flax_to_keras
from convert.keras_to_flax import keras_to_flax
from flaxresnet import load_converted, preprocess_input, weights_file
from data_helpers import write_digits_folder
from keras_helpers import (FLOAT64_RTOL, assert_parity, float64, float64_twin, keras_resnet, random_images,
                           randomize_batchnorm, scaled_distance)
from test_train_cli import numbers, run

CLASSES = 10


def randomize_biases(model, seed: int) -> None:
    """Random biases for the model's top-level Dense layers (Keras starts them at zero: a mapping bug would
    hide)."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            layer.bias.assign(rng.normal(0.0, 0.5, layer.bias.shape).astype("float32"))


def seed_notebook_model():
    """The seed's Sequential around a randomized ResNet50, every BN (the head's too) randomized."""
    model = seed_model(keras_resnet(50, include_top=False, size=32, seed=0), 8, 4, CLASSES, dropout=0.25)
    randomize_batchnorm(model, seed=1)
    randomize_biases(model, seed=2)
    return model


def linear_v2_model():
    """A functional classifier with a ResNet50V2 inlined (input_tensor), bilinear Resizing, Dropout and logits."""
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Resizing(32, 32, interpolation="bilinear")(inputs)
    resnet = keras.applications.ResNet50V2(include_top=False, weights=None, input_tensor=x)
    x = keras.layers.GlobalAveragePooling2D()(resnet.output)
    x = keras.layers.Dense(CLASSES)(keras.layers.Dropout(0.2)(x))
    model = keras.Model(inputs, x)
    randomize_batchnorm(model, seed=3, mode="tf")
    randomize_biases(model, seed=4)
    return model


MODELS = {"seed notebook": (seed_notebook_model, "caffe", 8, True), "linear v2": (linear_v2_model, "tf", 16, False)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """Model name -> (Keras model, folder): each model saved as .keras and .h5, both converted."""
    out = {}
    for name, (build, _, _, _) in MODELS.items():
        folder = tmp_path_factory.mktemp(name.replace(" ", "_"))
        model = build()
        for suffix in ("keras", "h5"):
            model.save(folder / f"model.{suffix}")
            keras_to_flax(str(folder / f"model.{suffix}"), str(folder / f"{suffix}.msgpack"))
        out[name] = model, folder
    return out


def flat(variables) -> dict:
    return traverse_util.flatten_dict(variables, sep="/")


def flax_logits(path, images: np.ndarray, dtype: str) -> np.ndarray:
    """The converted classifier's logits on raw images, jitted, in `dtype`."""
    model, variables = load_converted(path, dtype=dtype)
    return np.asarray(jax.jit(lambda x: model.apply(variables, x))(images))


@contextlib.contextmanager
def as_logits(model) -> Iterator[None]:
    """Within the block, the model's last Dense computes logits (no softmax) and `predict` is traced again: where
    float32 rounding is compared, since the softmax amplifies either side's rounding by a different factor for
    each input (measured on the seed notebook's model, 4 images: the float32 distance ratio flaxresnet/Keras
    scattered 0.5x to 2.8x over four batches on probabilities, 1.0x to 1.6x on the backbone features)."""
    import keras

    last = model.layers[-1]
    activation, last.activation = last.activation, keras.activations.linear
    model.predict_function = None
    try:
        yield
    finally:
        last.activation, model.predict_function = activation, None


@pytest.mark.parametrize("name", sorted(MODELS))
def test_keras_classifier_converts_to_flaxresnet_with_keras_outputs(converted, name):
    model, folder = converted[name]
    _, mode, size, softmax = MODELS[name]
    keras_file, h5_file = (weights_file.load(folder / f"{s}.msgpack") for s in ("keras", "h5"))
    assert flat(keras_file[0]).keys() == flat(h5_file[0]).keys()  # .keras and .h5 alike, bit for bit
    assert all(np.array_equal(v, flat(h5_file[0])[k]) for k, v in flat(keras_file[0]).items())
    assert keras_file[1]["model"] == h5_file[1]["model"] and keras_file[1]["image_shape"] == [size, size, 3]
    images = random_images(16, size, seed=5)
    with as_logits(model):
        keras32 = model.predict(np.asarray(preprocess_input(images, mode=mode)), verbose=0)
    ours32 = flax_logits(folder / "keras.msgpack", images, "float32")
    with float64():
        inputs64, model64 = np.asarray(preprocess_input(images, "float64", mode)), float64_twin(model)
        ours64 = flax_logits(folder / "keras.msgpack", images, "float64")
        if softmax:  # what Keras' predict gives: the softmax of flaxresnet's logits, in float64
            probabilities = model64.predict(inputs64, verbose=0)
            assert probabilities.max() > 0.3, "reference softmax is near-uniform: the test is blind"
            distance = scaled_distance(np.asarray(jax.nn.softmax(ours64)), probabilities)
            print(f"softmax of flaxresnet's float64 logits vs Keras' float64 predict: {distance:.2g}")
            assert distance <= FLOAT64_RTOL
        with as_logits(model64):
            keras64 = model64.predict(inputs64, verbose=0)
    assert keras64.dtype == np.float64
    assert_parity(f"Keras classifier ({name}) vs flaxresnet on raw images: logits", ours32, ours64, keras32, keras64)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_flax_keras_flax_round_trip_is_bit_for_bit(converted, name, tmp_path):
    _, folder = converted[name]
    flax_to_keras(str(folder / "keras.msgpack"), str(tmp_path / "exported.keras"))
    keras_to_flax(str(tmp_path / "exported.keras"), str(tmp_path / "again.msgpack"))
    (before, meta_before), (after, meta_after) = (weights_file.load(p) for p in (folder / "keras.msgpack",
                                                                                  tmp_path / "again.msgpack"))
    assert meta_after["model"] == meta_before["model"] and meta_after["image_shape"] == meta_before["image_shape"]
    assert flat(after).keys() == flat(before).keys()
    assert all(np.array_equal(v, flat(before)[k]) for k, v in flat(after).items())


def test_the_converted_seed_model_fine_tunes_with_init_from(converted, tmp_path, capsys):
    """The seed notebook's model converted, then trained for an epoch of the 8x8 digits from it."""
    start = converted["seed notebook"][1] / "keras.msgpack"
    images = write_digits_folder(tmp_path / "images", 4)
    status, out, err = run(capsys, "--init-from", start, "--dataset", f"folder:{images}", "--image-size", "32",
                           "--batch-size", "8", "--freeze", "backbone", "--augment", "flip", "--epochs", "1",
                           "--workdir", tmp_path / "run")
    assert status == 0 and f"starting from the classifier {start}: ResNet50 + seed head, 10 classes" in out, err
    assert len(numbers(tmp_path / "run")) == 1
    model, _ = load_converted(tmp_path / "run" / "final.msgpack")
    assert (model.preprocess, model.image_size, model.head, model.num_classes) == ("caffe", 32, "seed", 10)


# ---- refused: one line, exit status 2, no output ----

def _edit_config(source, out, edit) -> None:
    """A copy of the .keras archive `source` whose config.json went through `edit(layers)`."""
    with zipfile.ZipFile(source) as z, zipfile.ZipFile(out, "w") as w:
        for item in z.namelist():
            data = z.read(item)
            if item == "config.json":
                config = json.loads(data)
                edit(config["config"]["layers"])
                data = json.dumps(config).encode()
            w.writestr(item, data)


def _lambda_before(layers):
    layers.insert(1, {"class_name": "Lambda", "config": {"name": "my_preprocess"}})


def _tanh_head(layers):
    layers[-1]["config"]["activation"] = "tanh"


def _flatten_head(layers):
    layers[4] = {"class_name": "Flatten", "config": {"name": "flatten"}}  # the GlobalAveragePooling2D


REFUSED = {
    "unknown layer before": (_lambda_before, "layer 'my_preprocess' (Lambda) before the ResNet is not one flaxresnet "
                                             "computes: it accepts UpSampling2D, Resizing"),
    "unknown head layer": (_flatten_head, "layer 'flatten' (Flatten) after the ResNet is not part of a head "
                                          "flaxresnet computes: it accepts GlobalAveragePooling2D -> Dense(relu)"),
    "other activation": (_tanh_head, "is a Dense with activation 'tanh': flaxresnet's head has one with softmax or "
                                     "linear and a bias there"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_flaxresnet_cannot_compute_is_refused_in_one_line(converted, tmp_path, capsys, case):
    edit, message = REFUSED[case]
    source = converted["seed notebook"][1] / "model.keras"
    _edit_config(source, tmp_path / "edited.keras", edit)
    status = main(["keras_to_flax", "--weights", str(tmp_path / "edited.keras"), "--out", str(tmp_path / "o.msgpack")])
    err = capsys.readouterr().err
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.msgpack").exists()


def test_a_second_backbone_and_preprocessing_twice_are_refused():
    resnet = {"class_name": "Functional", "config": {"name": "resnet50", "layers": [
        {"class_name": "Conv2D", "config": {"name": "conv1_conv"}}]}}
    two = {"config": {"layers": [{"class_name": "InputLayer", "config": {"name": "in", "batch_shape": [None, 8, 8, 3]}},
                                 resnet, {**resnet, "config": {**resnet["config"], "name": "resnet50_1"}}]}}
    with pytest.raises(keras_classifier.UserError, match="layer 'resnet50_1' is a second ResNet in the model"):
        keras_classifier.parse(two)
    unsized = {"config": {"layers": [{"class_name": "InputLayer", "config": {"name": "in", "batch_shape": [None, None,
                                                                                                        None, 3]}},
                                     resnet]}}
    with pytest.raises(keras_classifier.UserError, match="the model's input size is not fixed"):
        keras_classifier.parse(unsized)


def test_preprocessing_option_says_what_the_inputs_were_given(converted, tmp_path, capsys):
    _, folder = converted["seed notebook"]
    keras_to_flax(str(folder / "model.keras"), str(tmp_path / "raw.msgpack"), preprocessing="none")
    raw, _ = load_converted(tmp_path / "raw.msgpack")
    assert (raw.preprocess, load_converted(folder / "keras.msgpack")[0].preprocess) == ("none", "caffe")
    flax_to_keras(str(folder / "keras.msgpack"), str(tmp_path / "exported.keras"))  # caffe_preprocess inside
    status = main(["keras_to_flax", "--weights", str(tmp_path / "exported.keras"), "--preprocessing", "tf",
                   "--out", str(tmp_path / "o.msgpack")])
    err = capsys.readouterr().err
    assert status == 2 and "the model preprocesses its inputs itself (caffe mode, inside it): drop " \
        "--preprocessing" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.msgpack").exists()


def _config(*middle: dict, input_size=8, resnet=True) -> dict:
    """A Keras model config: input, `middle` layers before a nested ResNet50, then GAP -> Dense(10)."""
    layer = lambda kind, name, **config: {"class_name": kind, "config": {"name": name, **config}}  # noqa: E731
    nested = layer("Functional", "resnet50", layers=[layer("Conv2D", "conv1_conv")])
    return {"config": {"layers": [layer("InputLayer", "in", batch_shape=[None, input_size, input_size, 3]),
                                  *middle, nested, layer("GlobalAveragePooling2D", "gap"),
                                  layer("Dense", "out", units=10, activation="softmax", use_bias=True),
                                  layer("Softmax", "again")]}}


def test_input_side_compositions_and_their_refusals():
    up = lambda f, how="nearest": {"class_name": "UpSampling2D", "config": {"name": f"up{f}{how}", "size": [f, f],  # noqa: E731
                                                                              "interpolation": how}}
    resize = lambda s, how: {"class_name": "Resizing", "config": {"name": f"resize{s}", "height": s, "width": s,  # noqa: E731
                                                                  "interpolation": how}}
    config = _config(up(2), up(4))
    config["config"]["layers"].pop()  # the second softmax
    spec = keras_classifier.parse(config)
    assert (spec.native_size, spec.image_size, spec.upsample, spec.head, spec.softmax) == ((8, 8), 64, "nearest",
                                                                                        "linear", True)
    config = _config(resize(32, "nearest"))
    config["config"]["layers"].pop()
    assert keras_classifier.parse(config).image_size == 32
    for middle, message in (
            ((resize(20, "nearest"),), "layer 'resize20' resizes 8x8 to 20x20 by nearest neighbours, not a whole "
                                       "factor"),
            ((up(2), up(2, "bilinear")), "the model upsamples in 2 steps, 1 of them bilinear"),
            ((resize(4, "bilinear"),), "layer 'resize4' shrinks 8x8 to 4x4: flaxresnet's classifier upsamples only"),
            ((), "the model applies softmax twice (in layer 'out' and after it)")):
        with pytest.raises(keras_classifier.UserError, match=re.escape(message)):
            keras_classifier.parse(_config(*middle))
