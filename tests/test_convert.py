"""keras_to_flax: every file layout, both naming schemes, all depths, and every bad input."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest

from convert import download
from convert.__main__ import main
from convert.keras_to_flax import keras_to_flax
from flaxresnet import UserError, load_converted
from flaxresnet.weights_file import load
from keras_helpers import (assert_file_matches_keras, keras_resnet, keras_resnet50_v02, layer_weights,
                           random_images, write_legacy_h5)


def strip_layer_names(path) -> None:
    """Remove the per-group `name` attrs, as Keras 3 versions before they were added wrote `.weights.h5`."""
    with h5py.File(path, "r+") as f:
        for group in f["layers"].values():
            if "vars" in group and "name" in group["vars"].attrs:
                del group["vars"].attrs["name"]


def save_in_layout(model, layout: str, folder: Path, weightless: tuple[str, ...] | None = None) -> Path:
    """The Keras model's weights written in one of the file layouts keras_to_flax reads: 'keras2_split_names' (a
    legacy .h5 as Keras 2 wrote it, `weightless` its weightless layers), 'full_model_h5', 'weights_h5' and
    'weights_h5_unnamed' (a .weights.h5 without per-group names, read in keras_layer_order), 'keras_archive' and
    'keras_archive_unnamed'."""
    if layout == "keras2_split_names":
        path = folder / "k2.h5"
        write_legacy_h5(path, layer_weights(model), keras2=True, split_layer_names=3,
                        **({} if weightless is None else {"weightless": weightless}))
    elif layout == "full_model_h5":
        path = folder / "full.h5"
        model.save(path)
    elif layout.startswith("weights_h5"):
        path = folder / "m.weights.h5"
        model.save_weights(path)
        if layout.endswith("unnamed"):
            strip_layer_names(path)
    else:
        path = folder / "m.keras"
        model.save(path)
        if layout.endswith("unnamed"):
            with zipfile.ZipFile(path) as z:
                z.extractall(folder / "x")
            strip_layer_names(folder / "x" / "model.weights.h5")
            with zipfile.ZipFile(path, "w") as z:
                for name in ("metadata.json", "config.json", "model.weights.h5"):
                    z.write(folder / "x" / name, name)
    return path


def assert_same_variables(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
    """A 32 px ResNet50 with a 10-class top, its legacy file, and the reference conversion."""
    from keras.src.legacy.saving import legacy_h5_format

    model = keras_resnet(50, include_top=True, size=32, classes=10)
    folder = tmp_path_factory.mktemp("r50")
    with h5py.File(folder / "legacy.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    keras_to_flax(str(folder / "legacy.h5"), str(folder / "ref.msgpack"))
    return model, folder, load(folder / "ref.msgpack")[0]


def test_reference_conversion_matches_keras_and_is_self_describing(resnet50):
    model, folder, _ = resnet50
    assert_file_matches_keras("ResNet50 32px top probabilities", folder / "ref.msgpack", model,
                              random_images(2, 32, seed=5))
    _, metadata = load(folder / "ref.msgpack")
    assert metadata["model"] == {"kind": "resnet", "config": {
        "depth": 50, "include_top": True, "num_classes": 10, "bn_epsilon": 1.001e-5, "pool1_pad": 1}}
    assert metadata["naming"] == "keras-applications"
    assert metadata["source"] == {"file": "legacy.h5", "md5": download.md5sum(folder / "legacy.h5"),
                                  "layout": "legacy weights .h5"}


@pytest.mark.parametrize("layout", ["keras2_split_names", "full_model_h5", "weights_h5", "weights_h5_unnamed",
                                    "keras_archive", "keras_archive_unnamed"])
def test_every_layout_gives_the_same_variables(resnet50, tmp_path, layout):
    model, _, reference = resnet50
    path = save_in_layout(model, layout, tmp_path)
    summary = keras_to_flax(str(path), str(tmp_path / "out.msgpack"))
    assert (summary.depth, summary.include_top, summary.num_classes, summary.tensors) == (50, True, 10, 320)
    assert_same_variables(load(tmp_path / "out.msgpack")[0], reference)


def test_v02_naming_converts_with_its_epsilon_and_matches_keras(tmp_path):
    model = keras_resnet50_v02(include_top=True, size=64, classes=10)
    write_legacy_h5(tmp_path / "v02.h5", layer_weights(model), keras2=True, split_layer_names=2,
                    weightless=("input_1", "conv1_pad", "activation_1", "max_pooling2d_1", "add_1"))
    summary = keras_to_flax(str(tmp_path / "v02.h5"), str(tmp_path / "v02.msgpack"))
    assert summary.naming == "v0.2" and summary.depth == 50 and summary.num_classes == 10
    assert load(tmp_path / "v02.msgpack")[1]["model"]["config"]["bn_epsilon"] == 1e-3
    assert_file_matches_keras("ResNet50 v0.2 64px top probabilities", tmp_path / "v02.msgpack", model,
                              random_images(2, 64, seed=6))


@pytest.mark.parametrize("depth,layout", [(101, "weights_h5_unnamed"), (152, "keras_archive")])
def test_deeper_resnets_match_keras(tmp_path, depth, layout):
    model = keras_resnet(depth, include_top=False, size=32)
    summary = keras_to_flax(str(save_in_layout(model, layout, tmp_path)), str(tmp_path / "out.msgpack"))
    assert summary.depth == depth and not summary.include_top
    assert_file_matches_keras(f"ResNet{depth} 32px no-top features", tmp_path / "out.msgpack", model,
                              random_images(2, 32, seed=7))


# ---- bad input: one line on stderr, exit status 2, no output file ----

def run_cli(capsys, *argv: str) -> tuple[int, str]:
    status = main(["keras_to_flax", *argv])
    err = capsys.readouterr().err
    return status, err


def edited_weights(resnet50, edit) -> dict:
    weights = layer_weights(resnet50[0])
    edit(weights)
    return weights


def _drop(name):
    return lambda w: w.pop(name)


def _drop_block(w):
    for k in [k for k in w if k.startswith("conv4_block6_")]:
        w.pop(k)


def _reshape_conv1(w):
    w["conv1_conv"][0] = ("kernel", np.zeros((7, 7, 3, 32), np.float32))


def _add_v2_layer(w):
    w["post_bn"] = w["conv1_bn"]


BAD_FILES = {
    "missing layer": (_drop("conv3_block2_2_bn"), "missing layer conv3_block2_2_bn"),
    "wrong shape": (_reshape_conv1, "conv1_conv/kernel: shape (7, 7, 3, 32), expected (7, 7, 3, 64)"),
    "another architecture (blocks)": (_drop_block, "match no ResNet v1"),
    "another architecture (ResNetV2 layer)": (_add_v2_layer, "not part of a keras-applications ResNet: post_bn"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_weights_fail_cleanly_and_leave_existing_output(resnet50, tmp_path, capsys, case):
    edit, message = BAD_FILES[case]
    write_legacy_h5(tmp_path / "bad.h5", edited_weights(resnet50, edit))
    out = tmp_path / "out.msgpack"
    out.write_bytes(b"previous result")
    status, err = run_cli(capsys, "--weights", str(tmp_path / "bad.h5"), "--out", str(out))
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5", "out.msgpack"]  # no temp file left


def _not_resnet(path):
    write_legacy_h5(path, {"dense": [("kernel", np.zeros((3, 4), np.float32)), ("bias", np.zeros(4, np.float32))]})


def _text(path):
    path.write_text("not a weights file")


def _truncated(path, source):
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")


def _empty_h5(path):
    h5py.File(path, "w").close()


@pytest.mark.parametrize("case,make,message", [
    ("missing file", None, "not found"),
    ("not HDF5", _text, "cannot read"),
    ("truncated", "truncated", "cannot read"),
    ("zip that is not .keras", _zip, "not a .keras archive"),
    ("HDF5 without weights", _empty_h5, "holds no Keras weights"),
    ("not a ResNet", _not_resnet, "not a Keras ResNet50/101/152 weights file"),
])
def test_unreadable_inputs_fail_cleanly(resnet50, tmp_path, capsys, case, make, message):
    src = tmp_path / "in.h5"
    if make == "truncated":
        _truncated(src, resnet50[1] / "legacy.h5")
    elif make is not None:
        make(src)
    status, err = run_cli(capsys, "--weights", str(src), "--out", str(tmp_path / "out.msgpack"))
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.msgpack").exists()


def test_missing_output_folder(resnet50, tmp_path, capsys):
    status, err = run_cli(capsys, "--weights", str(resnet50[1] / "legacy.h5"),
                          "--out", str(tmp_path / "nope" / "out.msgpack"))
    assert status == 2 and "output folder" in err and "does not exist" in err


def test_imagenet_offline_fails_fast_with_advice(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(download, "BASE_URL", "http://127.0.0.1:9/")  # closed port: no network in tests
    status, err = run_cli(capsys, "--out", str(tmp_path / "out.msgpack"))
    assert status == 2 and "--weights PATH" in err
    assert not (tmp_path / "out.msgpack").exists()
    assert not list((tmp_path / "models").iterdir())  # no partial download left in the cache


def test_imagenet_reuses_a_verified_cached_file(resnet50, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(download, "BASE_URL", "http://127.0.0.1:9/")
    (tmp_path / "models").mkdir()
    cached = tmp_path / "models" / download.file_name(50, True)
    shutil.copy(resnet50[1] / "legacy.h5", cached)
    monkeypatch.setitem(download.MD5, 50, (download.md5sum(cached), "unused"))
    summary = keras_to_flax("imagenet", str(tmp_path / "out.msgpack"), depth=50, include_top=True)
    assert summary.source == cached.name
    assert_same_variables(load(tmp_path / "out.msgpack")[0], resnet50[2])


def test_load_converted_rejects_foreign_and_truncated_files(resnet50, tmp_path):
    with pytest.raises(UserError, match="not a readable flaxresnet weights file"):
        load_converted(resnet50[1] / "legacy.h5")
    data = (resnet50[1] / "ref.msgpack").read_bytes()
    (tmp_path / "cut.msgpack").write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match="truncated"):
        load_converted(tmp_path / "cut.msgpack")
    with pytest.raises(UserError, match="not found"):
        load_converted(tmp_path / "none.msgpack")


def test_keras_files_passed_as_flaxresnet_files_name_the_conversion(resnet50, tmp_path):
    with zipfile.ZipFile(tmp_path / "model.keras", "w") as z:
        z.writestr("config.json", "{}")
    for path in (resnet50[1] / "legacy.h5", tmp_path / "model.keras"):
        with pytest.raises(UserError) as e:
            load_converted(path)
        assert f"convert it first with `python -m convert keras_to_flax --weights {path}`" in str(e.value)


def test_cli_bad_input_prints_one_line_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "convert", "keras_to_flax", "--weights",
                             str(tmp_path / "missing.h5"), "--out", str(tmp_path / "o.msgpack")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "not found" in result.stderr
