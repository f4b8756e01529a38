"""Keras ResNet weights file -> flaxresnet weights file (the `keras_to_flax` command's library function)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from convert import download, naming
from convert.keras_files import read_keras_weights
from flaxresnet import weights_file
from flaxresnet.models import ResNet


@dataclass
class Summary:
    """What a conversion found and wrote."""

    out: str
    source: str
    layout: str
    naming: str
    depth: int
    include_top: bool
    num_classes: int
    tensors: int
    parameters: int
    seconds: float

    def __str__(self) -> str:
        top = f"top with {self.num_classes} classes" if self.include_top else "no top"
        return (f"converted {self.source} ({self.layout}, {self.naming} naming) -> {self.out}: "
                f"ResNet{self.depth}, {top}, {self.tensors} tensors, {self.parameters:,} values, "
                f"{self.seconds:.2f} s")


def keras_to_flax(weights: str, out: str, depth: int = 50, include_top: bool = False,
                  pool1_pad: int = 1) -> Summary:
    """Convert `weights` ('imagenet' or a Keras file path) into the flaxresnet file `out`.

    For 'imagenet', `depth`/`include_top` pick the official file; for a path they are read from the file.
    `pool1_pad` is 0 only for models built by keras_applications < 1.0.6 (Keras < 2.2.4), which had no
    `pool1_pad` layer. Strict: any missing, unexpected or mis-shaped tensor is a UserError; `out` is written
    atomically, so a failed conversion leaves an existing `out` untouched.
    """
    start = time.perf_counter()
    source = download.imagenet_weights(depth, include_top) if weights == "imagenet" else Path(weights)
    keras = read_keras_weights(source, naming.keras_layer_order)
    scheme = naming.detect_scheme(list(keras.layers))
    layers = naming.rename(keras.layers, scheme)
    depth = naming.detect_depth(list(layers))
    include_top = "predictions" in layers
    num_classes = int(layers["predictions"][0].shape[-1]) if include_top else 1000
    config = dict(depth=depth, include_top=include_top, num_classes=num_classes, bn_epsilon=scheme.bn_epsilon,
                  pool1_pad=pool1_pad)
    expected = jax.eval_shape(ResNet(**config).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    variables = naming.fill(expected, layers)
    metadata = {
        "model": {"kind": "resnet", "config": config},
        "naming": scheme.name,
        "source": {"file": source.name, "md5": download.md5sum(source), "layout": keras.layout},
        "preprocess": "caffe",
        "image_size": weights_file.IMAGENET_SIZE,
    }
    weights_file.save(out, variables, metadata)
    leaves = jax.tree.leaves(variables)
    return Summary(out=str(out), source=source.name, layout=keras.layout, naming=scheme.name, depth=depth,
                   include_top=include_top, num_classes=num_classes, tensors=len(leaves),
                   parameters=int(sum(np.size(x) for x in leaves)), seconds=time.perf_counter() - start)
