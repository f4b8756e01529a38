"""`python -m flaxresnet.predict --weights FILE IMAGE...`: the top-5 classes of each image, with probabilities.

Takes a converted ImageNet file with its top (the 1000 ImageNet classes, named as in Keras'
`imagenet_class_index.json`, shipped with the package) or a fine-tuned classifier (class names from the file's
metadata `class_names`, else class indices). Images are any file pillow decodes (JPEG, PNG, ...) of any size:
converted to RGB and resized bilinearly to the model's input size, aspect ratio not kept (as the image-folder
datasets are; Keras' `load_img(target_size=...)` defaults to nearest instead, so a Keras script doing that
gets slightly different probabilities). The input size is `metadata["image_size"]` (224) for an ImageNet
file, whose images then get Keras' `preprocess_input` of its family (caffe for ResNet, tf for ResNetV2); for a classifier it is the native size of its
training images, `metadata["image_shape"]`, and the classifier preprocesses and upsamples them itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from PIL import Image

from flaxresnet import cli, compile_cache, weights_file
from flaxresnet.data import fit_image
from flaxresnet.errors import UserError
from flaxresnet.models import KerasResNet
from flaxresnet.preprocess import preprocess_input

TOP_K = 5
BATCH_SIZE = 16
IMAGENET_CLASSES = 1000


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in Keras' order (`imagenet_class_index.json`, e.g. 281 -> 'tabby')."""
    index = json.loads(resources.files("flaxresnet").joinpath("imagenet_class_index.json").read_text("utf8"))
    return [index[str(i)][1] for i in range(len(index))]


def class_names(model: nn.Module, metadata: dict[str, Any]) -> list[str] | None:
    """Names of the model's classes: the file's `class_names`, else ImageNet's for 1000 classes, else None."""
    names = metadata.get("class_names")
    if names is not None:
        if len(names) != model.num_classes:
            raise UserError(f"the file's metadata names {len(names)} classes for a {model.num_classes}-class "
                            f"classifier: the file is inconsistent; save or convert it again")
        return list(names)
    return imagenet_class_names() if model.num_classes == IMAGENET_CLASSES else None


def check_predicts(model: nn.Module, path: str | Path) -> None:
    """UserError unless the model ends in a classifier (a no-top backbone only gives a feature map)."""
    if isinstance(model, KerasResNet) and not model.include_top:
        raise UserError(f"{path} is a backbone without a classifier (converted with no top): use a file "
                        f"converted with --include-top, or a classifier fine-tuned with train.py")


def load_images(paths: list[str], size: tuple[int, int]) -> np.ndarray:
    """Decode image files into uint8 RGB (N, height, width, 3); UserError naming a missing or unreadable one."""
    images = np.empty((len(paths), *size, 3), np.uint8)
    for i, path in enumerate(paths):
        if not Path(path).is_file():
            raise UserError(f"image {path} not found: check the path")
        try:
            with Image.open(path) as image:
                images[i] = fit_image(image, size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"cannot read image {path} ({e}): give a JPEG, PNG or other image pillow "
                            f"decodes") from e
    return images


def probabilities(model: nn.Module, variables: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """Softmax class probabilities (N, classes) for uint8 RGB images at the model's input size. The variables
    are an argument of the compiled function, not constants in it: compiling stays fast, and its compilation
    cache entry is small and serves every weights file of the same model."""
    @jax.jit
    def forward(variables: dict[str, Any], batch: jax.Array) -> jax.Array:
        x = preprocess_input(batch, mode=model.preprocess) if isinstance(model, KerasResNet) else batch
        return jax.nn.softmax(model.apply(variables, x, train=False))

    return np.concatenate([np.asarray(forward(variables, images[i:i + BATCH_SIZE]))
                           for i in range(0, len(images), BATCH_SIZE)])


def format_top(title: str, probs: np.ndarray, names: list[str] | None, k: int = TOP_K) -> str:
    """One image's block: its title, then ranked `label (index)  probability` rows, aligned."""
    top = np.argsort(-probs, kind="stable")[:k]
    labels = [f"{names[c]} ({c})" if names else f"class {c}" for c in top]
    width = max(map(len, labels))
    rows = [f"  {rank}. {label:<{width}}  {probs[c]:.4f}" for rank, (c, label) in enumerate(zip(top, labels), 1)]
    return "\n".join([title, *rows])


def predict(weights: str, images: list[str], k: int = TOP_K) -> str:
    """The report `python -m flaxresnet.predict` prints: one block per image."""
    variables, metadata = weights_file.load(weights)
    model = weights_file.build_model(metadata)
    check_predicts(model, weights)
    names = class_names(model, metadata)
    probs = probabilities(model, variables, load_images(images, weights_file.input_size(model, metadata)))
    return "\n".join(format_top(path, p, names, k) for path, p in zip(images, probs))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flaxresnet.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True,
                        help="a converted file with its ImageNet top, or a fine-tuned classifier (final.msgpack)")
    parser.add_argument("--top", type=int, default=TOP_K, help=f"classes to show per image (default: {TOP_K})")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG, PNG, ... files of any size")
    cli.add_option(parser, cli.config_field("compile_cache"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> None:
        if args.top < 1:
            raise UserError(f"top must be at least 1, got {args.top}", option="top")
        compile_cache.enable(args.compile_cache)
        print(predict(args.weights, args.images, args.top))

    return cli.run_command(run)


if __name__ == "__main__":
    sys.exit(main())
