"""predict: ImageNet names for a 1000-class top, metadata names for a classifier, any image size, clear errors.

The files are built so the answer is known: a zero `predictions` kernel makes the probabilities those of the
bias alone, whatever the image; a second check compares an image-dependent top with the model applied by hand.
"""

import hashlib
from importlib import resources

import jax
import numpy as np
import pytest
from PIL import Image

from flaxresnet import preprocess_input, weights_file
from flaxresnet.models import Classifier
from flaxresnet.predict import format_top, imagenet_class_names, main
from engine_helpers import random_backbone

# Keras pins imagenet_class_index.json by this md5 (keras.applications.imagenet_utils.decode_predictions).
KERAS_CLASS_INDEX_MD5 = "c2c37ea517e94d9795004a39431a14cb"


@pytest.fixture(scope="module")
def backbone():
    """A random ResNet50 (model, variables), drawn once for the module."""
    return random_backbone()


def imagenet_file(path, backbone, bias: np.ndarray, kernel: np.ndarray | None = None, include_top: bool = True,
                  image_size: int = 224) -> None:
    """A ResNet50 file as keras_to_flax writes it (`backbone`'s variables) with the given `predictions` layer
    (kernel zero unless given)."""
    model, variables = backbone
    variables = jax.tree.map(np.asarray, variables)
    if include_top:
        variables["params"]["predictions"] = {
            "kernel": np.zeros((2048, 1000), np.float32) if kernel is None else kernel.astype(np.float32),
            "bias": bias.astype(np.float32)}
    config = {"depth": 50, "include_top": include_top, "num_classes": 1000, "bn_epsilon": model.bn_epsilon,
              "pool1_pad": 1}
    weights_file.save(path, variables, {"model": {"kind": "resnet", "config": config}, "image_size": image_size})


def save_image(path, array: np.ndarray, **options) -> str:
    Image.fromarray(np.asarray(array, np.uint8)).save(path, **options)
    return str(path)


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def printed_rows(out: str) -> list[tuple[str, float]]:
    """(label, probability) of each ranked row a block printed."""
    return [(row.split(". ", 1)[1].rsplit("  ", 1)[0].strip(), float(row.rsplit(" ", 1)[1]))
            for row in out.splitlines() if row.startswith("  ")]


@pytest.fixture(scope="module")
def files(tmp_path_factory, backbone):
    """ImageNet-top files at a 32 px input size (cheap), a no-top file, and images of several sizes."""
    folder = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(1)
    images = {"exact.png": save_image(folder / "exact.png", rng.integers(0, 256, (32, 32, 3))),
              "big.png": save_image(folder / "big.png", rng.integers(0, 256, (300, 200, 3))),
              "small.jpg": save_image(folder / "small.jpg", rng.integers(0, 256, (40, 50, 3)), quality=90)}
    bias = np.zeros(1000)
    bias[[281, 282, 285, 287, 292]] = [6.0, 5.0, 4.0, 3.0, 2.0]  # tabby, tiger_cat, Egyptian_cat, lynx, tiger
    imagenet_file(folder / "chosen.msgpack", backbone, bias, image_size=32)
    imagenet_file(folder / "notop.msgpack", backbone, bias, include_top=False)
    return folder, images


def test_imagenet_class_list_is_keras_file():
    data = resources.files("flaxresnet").joinpath("imagenet_class_index.json").read_bytes()
    assert hashlib.md5(data).hexdigest() == KERAS_CLASS_INDEX_MD5
    names = imagenet_class_names()
    assert len(names) == 1000 and (names[0], names[281], names[999]) == ("tench", "tabby", "toilet_tissue")


def test_imagenet_top_prints_the_chosen_classes_for_any_image_size(files, capsys):
    folder, images = files
    status, out, _ = run(capsys, "--weights", folder / "chosen.msgpack", images["big.png"], images["small.jpg"])
    exp = np.exp([6.0, 5.0, 4.0, 3.0, 2.0])
    p = exp / (exp.sum() + 995)  # a zero kernel: the bias alone decides, whatever the image
    block = "\n".join([
        "{}",
        f"  1. tabby (281)         {p[0]:.4f}",
        f"  2. tiger_cat (282)     {p[1]:.4f}",
        f"  3. Egyptian_cat (285)  {p[2]:.4f}",
        f"  4. lynx (287)          {p[3]:.4f}",
        f"  5. tiger (292)         {p[4]:.4f}",
    ])
    assert status == 0
    assert out == block.format(images["big.png"]) + "\n" + block.format(images["small.jpg"]) + "\n"
    assert f"{p[0]:.4f}" == "0.2477"


def test_probabilities_equal_the_model_on_the_preprocessed_image(files, backbone, capsys):
    folder, images = files
    image = np.asarray(Image.open(images["exact.png"]), np.float32)  # at the input size: no resizing
    model, variables = backbone
    pooled = np.asarray(jax.jit(model.apply)(variables, preprocess_input(image[None]))).mean(axis=(0, 1, 2))
    kernel = np.random.default_rng(3).normal(size=(2048, 1000)) / np.linalg.norm(pooled)  # logits ~ N(0, 1)
    imagenet_file(folder / "varied.msgpack", backbone, np.zeros(1000), kernel, image_size=32)
    status, out, _ = run(capsys, "--weights", folder / "varied.msgpack", "--top", "3", images["exact.png"])
    logits = pooled @ kernel.astype(np.float32)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert 0.01 < probs.max() < 0.5  # the image decides, and no class takes all
    names = imagenet_class_names()
    expected = [(f"{names[c]} ({c})", probs[c]) for c in np.argsort(-probs)[:3]]
    rows = printed_rows(out)
    assert status == 0 and [label for label, _ in rows] == [label for label, _ in expected]
    np.testing.assert_allclose([p for _, p in rows], [p for _, p in expected], atol=1e-4)


def test_classifier_uses_metadata_names_and_its_training_size(backbone, tmp_path, capsys):
    # A classifier file as training saves one (trained on 32 px images), with a head that always says 'cat'.
    _, backbone_variables = backbone
    head = {"dense": {"kernel": np.zeros((2048, 3), np.float32), "bias": np.array([0.0, 1.0, 3.0], np.float32)}}
    variables = {"params": {"backbone": backbone_variables["params"], "head": head},
                 "batch_stats": {"backbone": backbone_variables["batch_stats"]}}
    model = Classifier(num_classes=3, head="linear", image_size=None)
    weights_file.save(tmp_path / "named.msgpack", variables, {"model": model.metadata(), "image_shape": [32, 32, 3],
                                                               "class_names": ["airplane", "bird", "cat"]})
    image = save_image(tmp_path / "x.png", np.full((64, 48, 3), 128))
    p = np.exp([3.0, 1.0, 0.0]) / np.exp([3.0, 1.0, 0.0]).sum()
    status, out, _ = run(capsys, "--weights", tmp_path / "named.msgpack", image)
    assert status == 0 and out.splitlines() == [
        image, f"  1. cat (2)       {p[0]:.4f}", f"  2. bird (1)      {p[1]:.4f}", f"  3. airplane (0)  {p[2]:.4f}"]
    # Without class names in the metadata the rows name indices.
    assert format_top("x.png", p[[2, 1, 0]], None).splitlines()[1] == f"  1. class 2  {p[0]:.4f}"


@pytest.mark.parametrize("case", ["no top", "missing image", "unreadable image", "not a weights file"])
def test_errors_are_one_line(files, tmp_path, capsys, case):
    folder, images = files
    weights, image = folder / "chosen.msgpack", images["big.png"]
    if case == "no top":
        weights, message = folder / "notop.msgpack", "is a backbone without a classifier"
    elif case == "missing image":
        image, message = tmp_path / "nope.jpg", "image " + str(tmp_path / "nope.jpg") + " not found"
    elif case == "unreadable image":
        image, message = tmp_path / "fake.png", "cannot read image"
        image.write_text("not a png")
    else:
        weights, message = tmp_path / "w.msgpack", "not a readable flaxresnet weights file"
        weights.write_bytes(b"\x00garbage")
    status, out, err = run(capsys, "--weights", weights, image)
    assert status == 2 and message in err and err.count("\n") == 1 and not out, err
