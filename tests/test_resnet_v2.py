"""ResNetV2 (ResNet50V2/101V2/152V2): 'tf' preprocessing, conversion of every file layout, and parity with Keras 3.

One randomized Keras ResNet50V2 with a 10-class top (64 px) is built per module, with its float64 twin: every
stage output and the top probabilities are compared in float64 (flaxresnet equals Keras to 1e-9: the proof) and
in float32 (flaxresnet's distance to the float64 result within 2x Keras' own). No-top ResNet101V2 and
ResNet152V2 are converted from other layouts and their features compared the same way on 32 px images.
"""

import functools
import shutil
from collections import Counter

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert import download, naming
from convert.__main__ import main
from convert.keras_to_flax import keras_to_flax
from flaxresnet import (ResNet50V2, ResNet101V2, ResNet152V2, ResNetV2, load_converted, predict,
                        preprocess_input, train_lib)
from flaxresnet.weights_file import load
from keras_helpers import (FLOAT32_FACTOR, assert_file_matches_keras, assert_parity, float64, float64_twin,
                           keras_resnet, layer_weights, random_images, scaled_distance, write_legacy_h5)
from data_helpers import write_digits_folder
from flaxresnet.config import Config
from test_convert import assert_same_variables, save_in_layout
from test_export import assert_export_matches, save_seed_classifier

SIZE = 64
CLASSES = 10
STAGES = ["pool1_pool", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out", "post_relu"]
V2_WEIGHTLESS = ("input_layer", "conv1_pad", "pool1_pad", "pool1_pool", "conv2_block1_preact_relu")


@pytest.fixture(scope="module")
def resnet50v2(tmp_path_factory):
    """A 64 px ResNet50V2 with a confident 10-class top, its legacy `.h5` (as Keras 3 writes it) and the summary of
    its conversion."""
    from keras.src.legacy.saving import legacy_h5_format

    model = keras_resnet(50, include_top=True, size=SIZE, classes=CLASSES, family="v2")
    kernel, bias = model.get_layer("predictions").get_weights()
    model.get_layer("predictions").set_weights([kernel * 10, bias])  # confident softmax: not near-uniform
    folder = tmp_path_factory.mktemp("r50v2")
    with h5py.File(folder / "legacy.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return model, folder, keras_to_flax(str(folder / "legacy.h5"), str(folder / "legacy.msgpack"))


def keras_outputs(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """{stage name: output} and 'probabilities' of the Keras model on `images`."""
    import keras

    probe = keras.Model(model.inputs, [model.get_layer(n).output for n in STAGES] + [model.output])
    return dict(zip([*STAGES, "probabilities"], probe.predict(images, verbose=0)))


def flax_outputs(folder, images: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """The stages and 'probabilities' of the converted file, computed in `dtype` and jitted as flaxresnet runs them
    (like Keras' `predict`)."""
    model, variables = load_converted(folder / "legacy.msgpack", dtype=dtype)
    assert isinstance(model, ResNetV2) and model.include_top

    def probabilities_and_stages(v, x):
        logits, state = model.apply(v, x, mutable=["intermediates"])
        return jax.nn.softmax(logits), {name: state["intermediates"][name][0] for name in STAGES}

    probabilities, stages = jax.jit(probabilities_and_stages)(variables, jnp.asarray(images, dtype))
    assert probabilities.dtype == dtype and probabilities.shape == (4, CLASSES)
    assert stages["post_relu"].shape == (4, SIZE // 32, SIZE // 32, 2048)
    return {**jax.tree.map(np.asarray, stages), "probabilities": np.asarray(probabilities)}


@pytest.fixture(scope="module")
def outputs(resnet50v2):
    """{'keras32', 'keras64', 'flaxresnet32', 'flaxresnet64'} -> outputs on the same 4 'tf'-preprocessed images
    (float32 values, given to the float64 models exactly)."""
    model, folder, _ = resnet50v2
    images = np.asarray(preprocess_input(random_images(4, SIZE, seed=3), mode="tf"))
    results = {"keras32": keras_outputs(model, images), "flaxresnet32": flax_outputs(folder, images, "float32")}
    with float64():
        results["keras64"] = keras_outputs(float64_twin(model), images.astype(np.float64))
        results["flaxresnet64"] = flax_outputs(folder, images, "float64")
    assert results["keras64"]["probabilities"].dtype == np.float64
    return results


@pytest.mark.parametrize("name", [*STAGES, "probabilities"])
def test_resnet50v2_stages_and_top_match_keras(outputs, name):
    if name == "probabilities":
        assert outputs["keras64"]["probabilities"].max() > 0.5, "reference softmax is near-uniform: the test is blind"
    assert_parity(f"ResNet50V2 {SIZE}px {name}", *(outputs[k][name] for k in
                                                  ("flaxresnet32", "flaxresnet64", "keras32", "keras64")))


def test_conversion_is_self_describing(resnet50v2):
    _, folder, summary = resnet50v2
    variables, metadata = load(folder / "legacy.msgpack")
    assert metadata["model"] == {"kind": "resnet_v2",
                                 "config": {"depth": 50, "include_top": True, "num_classes": CLASSES}}
    assert metadata["preprocess"] == "tf" and metadata["naming"] == "keras-applications"
    assert metadata["source"] == {"file": "legacy.h5", "md5": download.md5sum(folder / "legacy.h5"),
                                  "layout": "legacy weights .h5"}
    # 49 BN x 4 tensors; 21 convs with a bias (conv1, the 4 shortcuts, every _3_conv) x 2; 32 bias-free x 1; Dense
    assert summary.tensors == len(jax.tree.leaves(variables)) == 49 * 4 + 21 * 2 + 32 + 2
    assert variables["params"]["conv2_block1_1_conv"].keys() == {"kernel"}
    assert str(summary).endswith(f"ResNet50V2, top with {CLASSES} classes, 272 tensors, 23,585,290 values, "
                                 f"{summary.seconds:.2f} s")


def test_keras_layer_order_is_keras_own(resnet50v2):
    weighted = [(type(layer).__name__, layer.name) for layer in resnet50v2[0].layers if layer.weights]
    assert naming.keras_layer_order(Counter(cls for cls, _ in weighted)) == weighted


def test_factories():
    assert [(type(m), m.depth) for m in (ResNet50V2(), ResNet101V2(), ResNet152V2())] == [
        (ResNetV2, 50), (ResNetV2, 101), (ResNetV2, 152)]
    assert ResNetV2.preprocess == "tf"


@pytest.mark.parametrize("layout", ["keras2_split_names", "full_model_h5", "weights_h5", "weights_h5_unnamed",
                                    "keras_archive"])
def test_every_layout_gives_the_same_variables(resnet50v2, tmp_path, layout):
    model, folder, _ = resnet50v2
    path = save_in_layout(model, layout, tmp_path, weightless=V2_WEIGHTLESS)
    summary = keras_to_flax(str(path), str(tmp_path / "out.msgpack"))
    assert (summary.arch, summary.include_top, summary.num_classes) == ("ResNet50V2", True, CLASSES)
    assert_same_variables(load(tmp_path / "out.msgpack")[0], load(folder / "legacy.msgpack")[0])


# Per depth: 4 per BN (3 per block, post_bn), 2 per conv with a bias (conv1, 4 shortcuts, every _3_conv), 1 per
# bias-free conv (2 per block).
NO_TOP_TENSORS = {depth: 4 * (3 * blocks + 1) + 2 * (5 + blocks) + 2 * blocks
                  for depth, blocks in ((101, 33), (152, 50))}


@pytest.mark.parametrize("depth,layout", [(101, "weights_h5_unnamed"), (152, "keras_archive")])
def test_deeper_resnet_v2_match_keras(tmp_path, depth, layout):
    model = keras_resnet(depth, include_top=False, size=32, family="v2")
    summary = keras_to_flax(str(save_in_layout(model, layout, tmp_path)), str(tmp_path / "out.msgpack"))
    assert f"ResNet{depth}V2, no top, {NO_TOP_TENSORS[depth]} tensors" in str(summary)
    assert load(tmp_path / "out.msgpack")[1]["model"] == {"kind": "resnet_v2", "config": {
        "depth": depth, "include_top": False, "num_classes": 1000}}
    assert_file_matches_keras(f"ResNet{depth}V2 32px no-top features", tmp_path / "out.msgpack", model,
                              random_images(2, 32, seed=7), mode="tf")


# ---- 'tf' preprocessing: Keras' numpy path, bit for bit ----

def test_tf_preprocessing_equals_keras_bit_for_bit():
    from keras.applications import resnet, resnet_v2

    rng = np.random.default_rng(0)
    pixels = np.concatenate([np.arange(256.0), rng.uniform(0, 255, 20_000)]).reshape(-1, 4, 4, 3)
    for dtype in (np.float32, np.float64):
        x = pixels.astype(dtype)
        expected = resnet_v2.preprocess_input(x.copy())
        assert expected.dtype == dtype
        with jax.enable_x64(dtype == np.float64):
            eager = preprocess_input(x, dtype, mode="tf")
            jitted = jax.jit(functools.partial(preprocess_input, dtype=dtype, mode="tf"))(x)
        np.testing.assert_array_equal(np.asarray(eager), expected)
        np.testing.assert_array_equal(np.asarray(jitted), expected)
    assert preprocess_input(np.array([0.0, 127.5, 255.0]), mode="tf").tolist() == [-1.0, 0.0, 1.0]
    x = pixels.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(preprocess_input(x)), resnet.preprocess_input(x.copy()))  # caffe
    with pytest.raises(ValueError, match="preprocessing mode must be one of"):
        preprocess_input(x, mode="torch")


# ---- bad V2 files: one line on stderr, exit status 2, no output file ----

def run_cli(capsys, *argv: str) -> tuple[int, str]:
    status = main(["keras_to_flax", *argv])
    return status, capsys.readouterr().err


def _drop(name):
    return lambda w: w.pop(name)


def _add(name, like):
    return lambda w: w.update({name: w[like]})


def _bias_on(name):
    return lambda w: w[name].append(("bias", np.zeros(w[name][0][1].shape[-1], np.float32)))


def _drop_block(w):
    for k in [k for k in w if k.startswith("conv3_block4_")]:
        w.pop(k)


BAD_FILES = {
    "missing layer": (_drop("conv3_block2_preact_bn"), "missing layer conv3_block2_preact_bn"),
    "missing post_bn": (_drop("post_bn"), "missing layer post_bn"),
    "extra V1 layer": (_add("conv2_block1_3_bn", "conv2_block1_1_bn"),
                       "1 layer(s) with weights are not part of a keras-applications ResNetV2: conv2_block1_3_bn"),
    "extra layer": (_add("conv5_block4_preact_bn", "conv5_block3_preact_bn"), "unexpected layer conv5_block4_preact_bn"),
    "bias on a bias-free conv": (_bias_on("conv2_block1_1_conv"), "conv2_block1_1_conv: 2 weights, expected 1"),
    "another architecture (blocks)": (_drop_block, "blocks per stage (3, 3, 6, 3) match no ResNet v2"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_v2_weights_fail_in_one_line(resnet50v2, tmp_path, capsys, case):
    edit, message = BAD_FILES[case]
    weights = layer_weights(resnet50v2[0])
    edit(weights)
    write_legacy_h5(tmp_path / "bad.h5", weights, weightless=V2_WEIGHTLESS)
    status, err = run_cli(capsys, "--weights", str(tmp_path / "bad.h5"), "--out", str(tmp_path / "out.msgpack"))
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5"]


def test_pool1_pad_0_is_refused_for_v2(resnet50v2, tmp_path, capsys):
    status, err = run_cli(capsys, "--weights", str(resnet50v2[1] / "legacy.h5"), "--pool1-pad", "0",
                          "--out", str(tmp_path / "out.msgpack"))
    assert status == 2 and "holds a ResNet50V2, which always pads pool1 by 1" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.msgpack").exists()


# ---- --weights imagenet --family v2: Keras' files and hashes ----

def test_official_v2_files_are_keras_own():
    from keras.src.applications.resnet import WEIGHTS_HASHES

    assert {f"resnet{depth}v2": hashes for depth, hashes in download.MD5_V2.items()} == {
        k: v for k, v in WEIGHTS_HASHES.items() if k.endswith("v2")}
    assert download.file_name(101, False, "v2") == "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert download.file_name(152, True, "v2") == "resnet152v2_weights_tf_dim_ordering_tf_kernels.h5"
    assert download.file_name(50, True) == "resnet50_weights_tf_dim_ordering_tf_kernels.h5"


def test_imagenet_v2_offline_fails_fast_with_advice(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(download, "BASE_URL", "http://127.0.0.1:9/")  # closed port: no network in tests
    status, err = run_cli(capsys, "--family", "v2", "--depth", "152", "--out", str(tmp_path / "out.msgpack"))
    assert status == 2 and "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5" in err
    assert "--weights PATH" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.msgpack").exists() and not list((tmp_path / "models").iterdir())


def test_imagenet_v2_reuses_a_verified_cached_file(resnet50v2, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(download, "BASE_URL", "http://127.0.0.1:9/")
    (tmp_path / "models").mkdir()
    cached = tmp_path / "models" / download.file_name(50, True, "v2")
    shutil.copy(resnet50v2[1] / "legacy.h5", cached)
    monkeypatch.setitem(download.MD5_V2, 50, (download.md5sum(cached), "unused"))
    summary = keras_to_flax("imagenet", str(tmp_path / "out.msgpack"), depth=50, include_top=True, family="v2")
    assert (summary.source, summary.arch) == ("resnet50v2_weights_tf_dim_ordering_tf_kernels.h5", "ResNet50V2")
    assert_same_variables(load(tmp_path / "out.msgpack")[0], load(resnet50v2[1] / "legacy.msgpack")[0])


def test_predict_gives_a_v2_file_its_tf_preprocessing(resnet50v2, outputs):
    """`flaxresnet.predict` on raw images: Keras' probabilities within Keras' own float32 rounding (the caffe
    preprocessing of V1 would be far off)."""
    model, variables = load_converted(resnet50v2[1] / "legacy.msgpack")
    probs = predict.probabilities(model, variables, random_images(4, SIZE, seed=3))
    reference, keras32 = outputs["keras64"]["probabilities"], outputs["keras32"]["probabilities"]
    assert scaled_distance(probs, reference) <= FLOAT32_FACTOR * scaled_distance(keras32, reference) + 1e-7


def test_backbone_round_trip_keras_flax_keras_is_bit_exact(resnet50v2, tmp_path, capsys):
    """A converted V2 file exports to the official legacy `.h5` layout, which keras.applications.ResNet50V2 loads
    into exactly the original weights; converted again, it gives the same variables."""
    import keras

    model, folder, _ = resnet50v2
    status = main(["flax_to_keras", str(folder / "legacy.msgpack"), "--out", str(tmp_path / "back.h5")])
    assert status == 0 and f"legacy Keras weights .h5 (ResNet50V2, top with {CLASSES} classes), 272 tensors" in \
        capsys.readouterr().out
    reloaded = keras.applications.ResNet50V2(weights=str(tmp_path / "back.h5"), classes=CLASSES,
                                             input_shape=(SIZE, SIZE, 3))
    expected = {w.path: np.asarray(w) for w in model.weights}
    assert {w.path: np.asarray(w) for w in reloaded.weights}.keys() == expected.keys()
    assert all(np.array_equal(np.asarray(w), expected[w.path]) for w in reloaded.weights)
    keras_to_flax(str(tmp_path / "back.h5"), str(tmp_path / "again.msgpack"))
    assert_same_variables(load(tmp_path / "again.msgpack")[0], load(folder / "legacy.msgpack")[0])


def test_v2_classifier_exports_to_keras_model_with_the_same_logits(resnet50v2, tmp_path, capsys):
    """A fine-tuned V2 classifier becomes a `.keras` model with 'tf' preprocessing built in (Rescaling) around
    keras.applications.ResNet50V2, whose logits on raw images are flaxresnet's within Keras' float32 rounding."""
    classifier = save_seed_classifier(resnet50v2[1] / "legacy.msgpack", tmp_path / "classifier.msgpack", 32)
    assert_export_matches(classifier, tmp_path, "ResNet50V2", [
        "image", "tf_preprocess", "upsample", "resnet50v2", "avg_pool", "dense", "dropout",
        "batch_normalization", "dense_1"], capsys)


def test_train_py_fine_tunes_a_v2_backbone_with_frozen_convs(resnet50v2, tmp_path, capsys):
    """The seed recipe's freezing on a V2 backbone: every conv stays as converted, every BatchNorm trains; the
    classifier file is a V2 classifier (its 'tf' preprocessing inside) that predicts from raw images."""
    import train

    images = write_digits_folder(tmp_path / "images", 4)
    status = train.main(["--backbone-weights", str(resnet50v2[1] / "legacy.msgpack"), "--dataset",
                         f"folder:{images}", "--image-size", "32", "--batch-size", "8", "--freeze", "convs",
                         "--augment", "random-erasing", "--epochs", "1", "--workdir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert status == 0 and f"backbone: ResNet50V2 from {resnet50v2[1] / 'legacy.msgpack'}" in out, out
    model, trained = load_converted(tmp_path / "run" / "final.msgpack")
    assert (model.family, model.depth) == ("v2", 50)
    converted = load(resnet50v2[1] / "legacy.msgpack")[0]["params"]
    backbone = trained["params"]["backbone"]
    assert backbone.keys() == converted.keys() - {"predictions"}
    convs = [name for name in backbone if name.endswith("_conv")]
    bns = [name for name in backbone if name.endswith("_bn")]
    assert len(convs) == 53 and len(bns) == 49  # conv1, 4 shortcuts, 16 blocks x 3; 16 blocks x 3 and post_bn
    assert all(np.array_equal(backbone[n][k], converted[n][k]) for n in convs for k in backbone[n])
    assert all(not np.array_equal(backbone[n]["scale"], converted[n]["scale"]) for n in bns)
    probs = predict.probabilities(model, trained, random_images(2, 8, seed=1))
    assert probs.shape == (2, 10) and np.allclose(probs.sum(-1), 1, atol=1e-5)


def test_family_v2_trains_a_resnet_v2_from_scratch():
    model = train_lib.build_classifier(Config(num_classes=10, family="v2", depth=101))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), np.uint8))
    assert (model.family, model.depth) == ("v2", 101) and "post_bn" in shapes["params"]["backbone"]
    assert sum(name.endswith("_preact_bn") for name in shapes["params"]["backbone"]) == 33
