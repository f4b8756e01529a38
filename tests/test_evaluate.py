"""evaluate: known answers on the digits split, numbers equal to the engine's eval_step, confusion matrix, errors."""

import functools

import jax
import numpy as np
import pytest
from PIL import Image

from flaxresnet import data, train_lib, weights_file
from flaxresnet.config import Config
from flaxresnet.evaluate import main
from flaxresnet.evaluation import evaluate
from flaxresnet.models import Classifier
from engine_helpers import random_backbone

BATCH = 64  # 359 validation digits: 5 full batches and a padded one


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


@pytest.fixture(scope="module")
def state():
    """A linear-head classifier on the digits' native 8 px images (no upsampling: cheap), random backbone."""
    config = Config(num_classes=10, head="linear", image_size=None, batch_size=BATCH)
    return train_lib.create_train_state(config, jax.random.key(0), (8, 8, 3), backbone=random_backbone())


def save(path, state, head_kernel: np.ndarray, head_bias: np.ndarray, **metadata) -> str:
    """The state with this linear head, saved as the training loop saves final.msgpack (trained on digits)."""
    head = {"dense": {"kernel": head_kernel.astype(np.float32), "bias": head_bias.astype(np.float32)}}
    state = state.replace(params={**state.params, "head": head})
    metadata = {"image_shape": [8, 8, 3], "class_names": [str(d) for d in range(10)], "dataset": "digits",
                **metadata}
    train_lib.save_classifier(str(path), state, **metadata)
    return str(path)


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_known_answers_and_confusion_matrix(digits, state, tmp_path, capsys):
    # A zero kernel: every image gets the logits `bias`, so top-1 is always 3 and top-5 is {3, 4, 5, 6, 7}.
    bias = np.array([0, 0, 0, 5, 4, 3, 2, 1, 0, 0], np.float64)
    weights = save(tmp_path / "final.msgpack", state, np.zeros((2048, 10)), bias)
    # The dataset and batch size default to the run's (the file's metadata).
    status, out, err = run(capsys, "--weights", weights, "--out", tmp_path / "eval")
    labels = digits.validation.labels
    log_probs = bias - np.log(np.exp(bias).sum())
    accuracy, top5, loss = np.mean(labels == 3), np.mean((labels >= 3) & (labels <= 7)), -log_probs[labels].mean()
    assert status == 0, err
    first, second = out.splitlines()
    assert first.startswith(f"final.msgpack on digits validation (359 examples): top-1 {accuracy:.2%}, "
                            f"top-5 {top5:.2%}, loss {loss:.4f} (")
    assert (f"{accuracy:.2%}", f"{top5:.2%}", f"{loss:.4f}") == ("10.31%", "50.42%", "3.9550")
    assert second == f"confusion matrix: {tmp_path / 'eval' / 'confusion_validation.png'}"
    with Image.open(tmp_path / "eval" / "confusion_validation.png") as png:
        assert png.format == "PNG" and min(png.size) > 300


def linear_probe(state, split: data.Split) -> tuple[np.ndarray, np.ndarray]:
    """Head (kernel, bias) of a ridge regression from the backbone's pooled features to one-hot labels: a
    classifier whose answers depend on the images (the random backbone's features share a large offset)."""
    features = jax.jit(functools.partial(state.model.apply, method=Classifier.features))(
        state.variables(), split.images)
    pooled = np.asarray(features, np.float64).mean(axis=(1, 2))
    mean, scale = pooled.mean(axis=0), pooled.std() + 1e-12
    x = (pooled - mean) / scale
    kernel = np.linalg.solve(x.T @ x + 10.0 * np.eye(x.shape[1]), x.T @ (np.eye(10)[split.labels] - 0.1)) / scale
    return 10.0 * kernel, -10.0 * mean @ kernel


def test_numbers_equal_the_engines_eval_step(digits, state, tmp_path):
    weights = save(tmp_path / "w.msgpack", state, *linear_probe(state, digits.validation))
    model, variables = weights_file.load_converted(weights)
    result = evaluate(model, train_lib.replicate(variables), digits.validation, BATCH)

    # The engine, as a training loop runs it: the train state itself, p_eval_step over padded batches.
    engine_state = train_lib.replicate(state.replace(params=variables["params"]))
    devices = jax.local_device_count()
    sums = [jax.tree.map(lambda x: float(x[0]), train_lib.p_eval_step(
        engine_state.model, engine_state.variables(), data.shard(b, devices))[0])
            for b in data.eval_batches(digits.validation, BATCH)]
    totals = {k: np.sum([s[k] for s in sums]) for k in sums[0]}
    assert result.count == totals["count"] == len(digits.validation) == 359
    np.testing.assert_allclose([result.loss, result.accuracy, result.top5],
                               [totals[k] / totals["count"] for k in ("loss", "accuracy", "top5")], rtol=1e-7)
    assert result.accuracy == np.mean(result.predictions == digits.validation.labels)
    print(f"linear probe on random features: top-1 {result.accuracy:.4f}, top-5 {result.top5:.4f}, "
          f"loss {result.loss:.4f}")
    assert len(np.unique(result.predictions)) == 10 and 0.3 < result.accuracy < 1.0  # the images matter


@pytest.mark.parametrize("case", ["backbone file", "class count", "missing file", "unknown dataset",
                                  "no dataset recorded"])
def test_errors_are_one_line(state, tmp_path, capsys, case):
    weights, dataset = save(tmp_path / "w.msgpack", state, np.zeros((2048, 10)), np.zeros(10)), ["--dataset", "digits"]
    if case == "backbone file":
        variables = {c: jax.tree.map(np.asarray, getattr(state, c)["backbone"]) for c in ("params", "batch_stats")}
        weights_file.save(tmp_path / "b.msgpack", variables, {"model": {"kind": "resnet", "config": {"depth": 50}}})
        weights, message = tmp_path / "b.msgpack", "is a converted backbone, not a fine-tuned classifier"
    elif case == "class count":
        folder = tmp_path / "images"
        for name in ("a", "b", "c"):
            (folder / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(folder / name / f"{i}.png")
        dataset, message = ["--dataset", f"folder:{folder}"], "has 3 classes, the classifier 10"
    elif case == "missing file":
        weights, message = tmp_path / "nope.msgpack", "nope.msgpack not found"
    elif case == "unknown dataset":
        dataset, message = ["--dataset", "cifar-1000"], "unknown dataset 'cifar-1000'"
    else:
        weights = save(tmp_path / "w.msgpack", state, np.zeros((2048, 10)), np.zeros(10), dataset=None)
        dataset, message = [], "does not record the dataset it was trained on: give --dataset"
    status, out, err = run(capsys, "--weights", weights, *dataset, "--out", tmp_path)
    assert status == 2 and message in err and err.count("\n") == 1 and not out, err
