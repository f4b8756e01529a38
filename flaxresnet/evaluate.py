"""`python -m flaxresnet.evaluate --weights FILE [--dataset SPEC]`: a fine-tuned classifier's top-1/top-5
accuracy and loss on a dataset split, and a confusion-matrix PNG for up to 100 classes.

The numbers are the engine's `eval_step` sums over `data.eval_batches` (every example once, the last batch
padded and masked), pmapped over the local devices. `evaluate` is the one evaluation loop: the training loop
calls it every epoch, so with the run's own dataset, seed and batch size (the defaults, read from the file's
metadata) the command reproduces the run's final validation numbers exactly.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure

from flaxresnet import data, train_lib, weights_file
from flaxresnet.config import Config
from flaxresnet.errors import UserError, run_command
from flaxresnet.models import Classifier
from flaxresnet.predict import input_size

DEFAULT_BATCH_SIZE = 64
MAX_CONFUSION_CLASSES = 100
# Up to this many classes the confusion matrix's axes carry class names, beyond it every 10th index.
MAX_NAMED_TICKS = 30


@dataclass(frozen=True)
class Evaluation:
    """Means over a split's examples (`top5` None below 5 classes) and each example's top-1 class, in order."""

    loss: float
    accuracy: float
    top5: float | None
    count: int
    predictions: np.ndarray


def _eval_and_predict(state: train_lib.TrainState, batch: train_lib.Batch) -> tuple[train_lib.Metrics, jax.Array]:
    """The engine's `eval_step` sums plus each example's top-1 class; XLA shares the one forward pass."""
    logits = state.model.apply(state.variables(), batch["image"], train=False)
    return train_lib.eval_step(state, batch), jnp.argmax(logits, -1)


_p_eval_and_predict = jax.pmap(_eval_and_predict, axis_name=train_lib.AXIS)
# One instance, so that eval-only states of equal models hit the compiled step's cache.
_NO_OPTIMIZER = optax.identity()


def eval_state(model: Classifier, variables: dict[str, Any]) -> train_lib.TrainState:
    """A replicated TrainState holding just what `eval_step` reads (model and variables): no optimizer."""
    state = train_lib.TrainState(step=jnp.zeros([], jnp.int32), params=variables["params"],
                                 batch_stats=variables["batch_stats"], opt_state=optax.EmptyState(),
                                 model=model, tx=_NO_OPTIMIZER, config=Config(num_classes=model.num_classes))
    return train_lib.replicate(state)


def evaluate(state: train_lib.TrainState, split: data.Split, batch_size: int) -> Evaluation:
    """Evaluate a replicated state (a training loop's own, or `eval_state`'s) on every example of `split`
    once, in global batches of `batch_size`."""
    if not len(split):
        raise UserError("the split to evaluate on has no examples")
    sums, predictions = [], []
    for batch in data.prefetch_to_device(data.eval_batches(split, batch_size)):
        batch_sums, batch_predictions = _p_eval_and_predict(state, batch)
        sums.append(jax.tree.map(lambda x: x[0], batch_sums))  # psum: every device holds the global sums
        predictions.append(batch_predictions.reshape(-1))
    totals = {k: float(np.sum([np.asarray(s[k], np.float64) for s in sums])) for k in sums[0]}
    count = int(totals["count"])
    return Evaluation(loss=totals["loss"] / count, accuracy=totals["accuracy"] / count,
                      top5=totals["top5"] / count if "top5" in totals else None, count=count,
                      predictions=np.concatenate(jax.device_get(predictions))[:len(split)])


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
        raise UserError(f"{weights} does not record the dataset it was trained on: give --dataset")
    data_dir = data_dir or run_config.get("data_dir")
    batch_size = run_config.get("batch_size", DEFAULT_BATCH_SIZE) if batch_size is None else batch_size
    # The run's own seed splits off the same validation part of a folder or digits dataset.
    seed = run_config.get("seed", 0) if seed is None else seed
    height, width = input_size(model, metadata)
    ds = data.load_dataset(dataset, data_dir, seed=seed, image_size=height)
    if ds.num_classes != model.num_classes:
        raise UserError(f"dataset {dataset} has {ds.num_classes} classes, the classifier {model.num_classes}: "
                        f"evaluate it on the dataset it was trained on")
    examples = ds.validation if split == "validation" else ds.train
    if "image_shape" in metadata and examples.images.shape[1:3] != (height, width):
        raise UserError(f"dataset {dataset} has {examples.images.shape[1]}x{examples.images.shape[2]} images, "
                        f"the classifier was trained on {height}x{width}: evaluate it on its own dataset")
    result = evaluate(eval_state(model, variables), examples, batch_size)
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
    parser.add_argument("--dataset", help=f"{data.SPEC_FORMS} (default: the one it was trained on)")
    parser.add_argument("--data-dir", help="tfds data folder (default: the run's, else $TFDS_DATA_DIR or "
                                           "~/tensorflow_datasets)")
    parser.add_argument("--split", choices=("validation", "train"), default="validation",
                        help="validation (the test split for tfds datasets, else the seeded 20%%) or train")
    parser.add_argument("--batch-size", type=int,
                        help=f"global batch size (default: the run's, else {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--out", help="folder for confusion_SPLIT.png (default: the weights file's folder)")
    parser.add_argument("--seed", type=int,
                        help="seed of the validation split-off for folder/digits datasets (default: the run's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: print(run(args.weights, args.dataset, args.data_dir, args.split, args.batch_size,
                                         args.out, args.seed)))


if __name__ == "__main__":
    sys.exit(main())
