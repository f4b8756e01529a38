"""`python -m flaxresnet.evaluate --weights FILE [--dataset SPEC]`: a fine-tuned classifier's top-1/top-5
accuracy and loss on a dataset split, and a confusion-matrix PNG for up to 100 classes.

The numbers are the engine's `eval_step` sums over `data.eval_batches` (every example once, the last batch
padded and masked), pmapped over the local devices. `evaluation.evaluate` is the one evaluation loop: the
training loop calls it every epoch, so with the run's own dataset, seed and batch size (the defaults, read from the file's
metadata) the command reproduces the run's final validation numbers exactly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from flaxresnet import cli, compile_cache, data, evaluation, train_lib, weights_file
from flaxresnet.config import DATASET_FORMS
from flaxresnet.errors import UserError, option_name
from flaxresnet.models import Classifier

DEFAULT_BATCH_SIZE = 64
MAX_CONFUSION_CLASSES = 100
# Up to this many classes the confusion matrix's axes carry class names, beyond it every 10th index.
MAX_NAMED_TICKS = 30


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (true class, predicted class), (num_classes, num_classes) int64."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def plot_confusion(counts: np.ndarray, class_names: list[str], title: str, path: Path) -> None:
    """Write the row-normalised confusion matrix (each true class's share per prediction) as a PNG, atomically."""
    n = len(class_names)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.25 * n, 20)
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    ticks = np.arange(n) if n <= MAX_NAMED_TICKS else np.arange(0, n, 10)
    labels = [class_names[i] for i in ticks] if n <= MAX_NAMED_TICKS else [str(i) for i in ticks]
    ax.set_xticks(ticks, labels, rotation=90 if n <= MAX_NAMED_TICKS else 0)
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    weights_file.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def run(weights: str, dataset: str | None = None, data_dir: str | None = None, split: str = "validation",
        batch_size: int | None = None, out: str | None = None, seed: int | None = None) -> str:
    """Evaluate the classifier file `weights` on a split of `dataset`; write the confusion matrix to `out`
    (default: the weights' folder). Unset arguments take the training run's values from the file's metadata
    (batch size 64 and seed 0 where it has none). Returns the report the command prints."""
    start = time.perf_counter()
    variables, metadata = weights_file.load(weights)
    model = weights_file.build_model(metadata)
    if not isinstance(model, Classifier):
        raise UserError(f"{weights} is a converted backbone, not a fine-tuned classifier: evaluate takes a "
                        f"classifier trained with train.py (its final.msgpack)")
    run_config = metadata.get("config", {})
    dataset = dataset or metadata.get("dataset")
    if dataset is None:
        raise UserError(f"{weights} does not record the dataset it was trained on: give "
                        f"{option_name('dataset')}")
    data_dir = data_dir or run_config.get("data_dir")
    batch_size = run_config.get("batch_size", DEFAULT_BATCH_SIZE) if batch_size is None else batch_size
    # The run's own seed splits off the same validation part of a folder or digits dataset.
    seed = run_config.get("seed", 0) if seed is None else seed
    height, width = weights_file.input_size(model, metadata)
    ds = data.load_dataset(dataset, data_dir, seed=seed, image_size=height)
    if ds.num_classes != model.num_classes:
        raise UserError(f"dataset {dataset} has {ds.num_classes} classes, the classifier {model.num_classes}: "
                        f"evaluate it on the dataset it was trained on")
    examples = ds.validation if split == "validation" else ds.train
    if "image_shape" in metadata and examples.images.shape[1:3] != (height, width):
        raise UserError(f"dataset {dataset} has {examples.images.shape[1]}x{examples.images.shape[2]} images, "
                        f"the classifier was trained on {height}x{width}: evaluate it on its own dataset")
    result = evaluation.evaluate(model, train_lib.replicate(variables), examples, batch_size)
    top5 = f", top-5 {result.top5:.2%}" if result.top5 is not None else ""
    lines = [f"{Path(weights).name} on {dataset} {split} ({result.count} examples): top-1 {result.accuracy:.2%}"
             f"{top5}, loss {result.loss:.4f} ({time.perf_counter() - start:.1f} s)"]
    if model.num_classes <= MAX_CONFUSION_CLASSES:
        folder = Path(out) if out is not None else Path(weights).parent
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"confusion_{split}.png"
        counts = confusion_matrix(examples.labels, result.predictions, model.num_classes)
        plot_confusion(counts, ds.class_names, f"{Path(weights).name}: {dataset} {split}, "
                                               f"top-1 {result.accuracy:.2%}", path)
        lines.append(f"confusion matrix: {path}")
    else:
        lines.append(f"no confusion matrix: {model.num_classes} classes (at most {MAX_CONFUSION_CLASSES})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flaxresnet.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="a fine-tuned classifier (train.py's final.msgpack)")
    parser.add_argument("--dataset", help=f"{DATASET_FORMS} (default: the one it was trained on)")
    parser.add_argument("--data-dir", help="tfds data folder (default: the run's, else $TFDS_DATA_DIR or "
                                           "~/tensorflow_datasets)")
    parser.add_argument("--split", choices=("validation", "train"), default="validation",
                        help="validation (the test split for tfds datasets, else the seeded 20%%) or train")
    parser.add_argument("--batch-size", type=int,
                        help=f"global batch size (default: the run's, else {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--out", help="folder for confusion_SPLIT.png (default: the weights file's folder)")
    parser.add_argument("--seed", type=int,
                        help="seed of the validation split-off for folder/digits datasets (default: the run's)")
    cli.add_option(parser, cli.config_field("compile_cache"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def evaluate() -> None:
        compile_cache.enable(args.compile_cache)
        print(run(args.weights, args.dataset, args.data_dir, args.split, args.batch_size, args.out, args.seed))

    return cli.run_command(evaluate)


if __name__ == "__main__":
    sys.exit(main())
