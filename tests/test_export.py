"""flax_to_keras: Keras -> Flax -> Keras round trips (backbone .h5, top .h5), a fine-tuned classifier as .keras,
and every refused input (one line on stderr, exit status 2, no output written or changed)."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from convert.__main__ import main
from convert.flax_to_keras import flax_to_keras
from convert.keras_to_flax import keras_to_flax
from flaxresnet import load_converted, preprocess_input, train_lib, upsample, weights_file
from flaxresnet.config import Config
from keras_helpers import (assert_parity, flax_predict, float64, keras_resnet, layer_weights, random_images,
                           write_legacy_h5)

SIZE = 32


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
    """A 32 px Keras ResNet50 with a 10-class top (randomized BN), its legacy weights files with and without
    the top, and both converted to flaxresnet."""
    model = keras_resnet(50, include_top=True, size=SIZE, classes=10)
    folder = tmp_path_factory.mktemp("export")
    weights = layer_weights(model)
    write_legacy_h5(folder / "top.h5", weights)
    write_legacy_h5(folder / "notop.h5", {k: v for k, v in weights.items() if k != "predictions"})
    for name in ("top", "notop"):
        keras_to_flax(str(folder / f"{name}.h5"), str(folder / f"{name}.msgpack"))
    return model, folder


def save_seed_classifier(backbone: Path, out: Path, native: int, classes: int = 10) -> Path:
    """A fine-tuned classifier file `out` as train_lib saves it: the backbone file's ResNet, native -> 2 x native px
    nearest upsampling, a seed head with random biases, BN parameters and BN moving statistics."""
    config = Config(num_classes=classes, image_size=2 * native, batch_size=2)
    state = train_lib.create_train_state(config, jax.random.key(1), (native, native, 3),
                                         backbone=load_converted(backbone))
    rng = np.random.default_rng(2)

    def randomize(path, x):
        name = path[-1].key
        if name == "kernel":
            return x
        if name in ("scale", "var"):
            return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
        return rng.normal(0.0, 0.5, x.shape).astype(np.float32)  # biases, BN bias and mean

    head = {c: jax.tree_util.tree_map_with_path(randomize, getattr(state, c)["head"])
            for c in ("params", "batch_stats")}
    state = state.replace(params={**state.params, "head": head["params"]},
                          batch_stats={**state.batch_stats, "head": head["batch_stats"]})
    train_lib.save_classifier(str(out), state, image_shape=[native, native, 3],
                              class_names=[f"class_{i}" for i in range(classes)])
    return out


@pytest.fixture(scope="module")
def classifier(keras_files):
    """`save_seed_classifier` of the converted no-top backbone, 32 -> 64 px."""
    return save_seed_classifier(keras_files[1] / "notop.msgpack", keras_files[1] / "classifier.msgpack", SIZE)


def assert_export_matches(classifier: Path, folder: Path, arch: str, layer_names: list[str], capsys) -> None:
    """`flax_to_keras` of the classifier file (an `arch` backbone, native SIZE px) through the CLI gives a `.keras`
    model with `layer_names` whose logits on raw images are flaxresnet's, in float32 and float64 (issue 10's contract)."""
    import keras

    out = classifier.with_suffix(".keras")
    status, printed, _ = run_cli(capsys, classifier)  # --out defaults to IN with .keras
    assert status == 0 and f"{arch} + seed head, 10 classes; raw RGB {SIZE}x{SIZE} in, logits out" in printed
    reloaded = keras.models.load_model(out)
    assert [layer.name for layer in reloaded.layers] == layer_names
    images = random_images(4, SIZE, seed=6)  # raw RGB 0..255: the model preprocesses and upsamples itself
    keras32, ours32 = reloaded.predict(images, verbose=0), flax_predict(classifier, images)
    with float64():  # the same export built in float64 Keras, against flaxresnet in float64
        flax_to_keras(str(classifier), str(folder / "float64.keras"))
        keras64 = keras.models.load_model(folder / "float64.keras").predict(images.astype(np.float64), verbose=0)
        ours64 = flax_predict(classifier, images, "float64")
    assert keras64.dtype == np.float64
    assert_parity(f"{arch} classifier .keras vs flaxresnet logits", ours32, ours64, keras32, keras64)


def features(model):
    """The Keras model's no-top feature map (the last block's output) as a model of its own."""
    import keras

    return keras.Model(model.inputs, model.get_layer("conv5_block3_out").output)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["flax_to_keras", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_backbone_round_trip_reproduces_keras_features(keras_files, capsys):
    import keras

    model, folder = keras_files
    status, out, _ = run_cli(capsys, folder / "notop.msgpack", "--out", folder / "back.h5")
    assert status == 0 and "legacy Keras weights .h5 (ResNet50, no top), 318 tensors" in out
    reloaded = keras.applications.ResNet50(weights=str(folder / "back.h5"), include_top=False,
                                           input_shape=(SIZE, SIZE, 3))
    images = np.asarray(preprocess_input(random_images(4, SIZE, seed=3)))
    expected = features(model).predict(images, verbose=0)
    diff = np.abs(reloaded.predict(images, verbose=0) - expected).max()
    print(f"Keras -> Flax -> Keras no-top features: max abs diff {diff:.3g} (max abs {np.abs(expected).max():.3g})")
    assert diff <= 1e-5
    # And back again: Flax -> Keras -> Flax gives the very same variables.
    keras_to_flax(str(folder / "back.h5"), str(folder / "again.msgpack"))
    for a, b in zip(jax.tree.leaves(weights_file.load(folder / "notop.msgpack")[0]),
                    jax.tree.leaves(weights_file.load(folder / "again.msgpack")[0])):
        np.testing.assert_array_equal(a, b)


def test_top_round_trip_reproduces_keras_probabilities(keras_files):
    import keras

    model, folder = keras_files
    summary = flax_to_keras(str(folder / "top.msgpack"))  # --out defaults to IN with .h5
    assert summary.out == str(folder / "top.h5") and summary.tensors == 320 and "classes=10" in summary.load_with
    reloaded = keras.applications.ResNet50(weights=summary.out, include_top=True, classes=10,
                                           input_shape=(SIZE, SIZE, 3))
    images = np.asarray(preprocess_input(random_images(4, SIZE, seed=4)))
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)


def test_classifier_exports_to_keras_model_with_the_same_logits(classifier, tmp_path, capsys):
    assert_export_matches(classifier, tmp_path, "ResNet50", [
        "image", "caffe_preprocess", "upsample", "resnet50", "avg_pool", "dense", "dropout",
        "batch_normalization", "dense_1"], capsys)


@pytest.mark.parametrize("method", ["nearest", "bilinear"])
def test_keras_upsampling_layers_match_flaxresnet(method):
    import keras

    images = random_images(2, 8, seed=7)
    layer = (keras.layers.UpSampling2D(4) if method == "nearest"
             else keras.layers.Resizing(32, 32, interpolation="bilinear"))
    np.testing.assert_allclose(np.asarray(layer(images)), np.asarray(upsample(images, 32, method)), atol=1e-4)


# ---- refused inputs: one line on stderr, exit status 2, nothing written ----

def _v02_backbone(folder, tmp_path):
    variables, metadata = weights_file.load(folder / "notop.msgpack")
    metadata["model"]["config"]["bn_epsilon"] = 1e-3
    weights_file.save(tmp_path / "in.msgpack", variables, metadata)
    return tmp_path / "in.msgpack", tmp_path / "out.h5"


def _text_file(folder, tmp_path):
    (tmp_path / "in.msgpack").write_text("not weights")
    return tmp_path / "in.msgpack", tmp_path / "out.h5"


BAD = {
    "missing file": (lambda folder, tmp: (tmp / "nope.msgpack", tmp / "out.h5"), "nope.msgpack not found"),
    "not a flaxresnet file": (_text_file, "not a readable flaxresnet weights file"),
    "v0.2 backbone": (_v02_backbone, "from the old v0.2 ResNet50 file (BN epsilon 0.001"),
    "backbone to .weights.h5": (lambda folder, tmp: (folder / "notop.msgpack", tmp / "out.weights.h5"),
                                "give --out a name ending in .h5 but not .weights.h5"),
    "classifier to .h5": (lambda folder, tmp: (folder / "classifier.msgpack", tmp / "out.h5"),
                          "give --out a name ending in .keras"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_refused_inputs_fail_in_one_line_and_leave_output_alone(keras_files, classifier, tmp_path, capsys, case):
    make, message = BAD[case]
    source, out = make(keras_files[1], tmp_path)
    out.write_bytes(b"previous result")
    status, printed, err = run_cli(capsys, source, "--out", out)
    assert status == 2 and message in err and err.count("\n") == 1 and not printed, err
    assert out.read_bytes() == b"previous result"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_classifier_export_without_keras_says_how_to_install(classifier, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "keras", None)  # `import keras` raises ImportError
    status, _, err = run_cli(capsys, classifier, "--out", tmp_path / "out.keras")
    assert status == 2 and "pip install 'flaxresnet[keras]'" in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())
