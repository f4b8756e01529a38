"""Keras ResNet (V1 or V2) weights file -> flaxresnet weights file (the `keras_to_flax` command's library function).

The file's naming scheme and family come from its layer names (`naming.detect_scheme`), its depth from its blocks
and its top from a `predictions` layer; the metadata records them as the model kind and config that rebuild it
(`resnet` or `resnet_v2`) and the preprocessing its inputs take ('caffe' or 'tf').
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from convert import download, naming
from convert.keras_files import read_keras_weights
from flaxresnet import models, weights_file
from flaxresnet.errors import UserError


@dataclass
class Summary:
    """What a conversion found and wrote."""

    out: str
    source: str
    layout: str
    naming: str
    arch: str
    depth: int
    include_top: bool
    num_classes: int
    tensors: int
    parameters: int
    seconds: float

    def __str__(self) -> str:
        top = f"top with {self.num_classes} classes" if self.include_top else "no top"
        return (f"converted {self.source} ({self.layout}, {self.naming} naming) -> {self.out}: "
                f"{self.arch}, {top}, {self.tensors} tensors, {self.parameters:,} values, "
                f"{self.seconds:.2f} s")


def keras_to_flax(weights: str, out: str, depth: int = 50, include_top: bool = False,
                  pool1_pad: int = 1, family: str = "v1") -> Summary:
    """Convert `weights` ('imagenet' or a Keras file path) into the flaxresnet file `out`.

    For 'imagenet', `family` ('v1': ResNet50/101/152, 'v2': ResNet50V2/101V2/152V2), `depth` and `include_top`
    pick the official file; for a path they are read from the file. `pool1_pad` is 0 only for V1 models built by
    keras_applications < 1.0.6 (Keras < 2.2.4), which had no `pool1_pad` layer. Strict: any missing, unexpected
    or mis-shaped tensor is a UserError; `out` is written atomically, so a failed conversion leaves an existing
    `out` untouched.
    """
    start = time.perf_counter()
    source = download.imagenet_weights(depth, include_top, family) if weights == "imagenet" else Path(weights)
    keras = read_keras_weights(source, naming.keras_layer_order)
    scheme = naming.detect_scheme(list(keras.layers))
    layers = naming.rename(keras.layers, scheme)
    depth = naming.detect_depth(list(layers), scheme.family)
    include_top = "predictions" in layers
    num_classes = int(layers["predictions"][0].shape[-1]) if include_top else 1000
    config = dict(depth=depth, include_top=include_top, num_classes=num_classes)
    if scheme.family is naming.V1:
        config.update(bn_epsilon=scheme.bn_epsilon, pool1_pad=pool1_pad)
    elif pool1_pad != 1:
        raise UserError(f"pool1_pad {pool1_pad} is for ResNet v1 models of keras_applications < 1.0.6, and "
                        f"{source.name} holds a {scheme.family.arch(depth)}, which always pads pool1 by 1")
    model_type = models.MODEL_KINDS[scheme.family.kind]
    expected = jax.eval_shape(model_type(**config).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    variables = naming.fill(expected, layers)
    metadata = {
        "model": {"kind": scheme.family.kind, "config": config},
        "naming": scheme.name,
        "source": {"file": source.name, "md5": download.md5sum(source), "layout": keras.layout},
        "preprocess": model_type.preprocess,
        "image_size": weights_file.IMAGENET_SIZE,
    }
    weights_file.save(out, variables, metadata)
    leaves = jax.tree.leaves(variables)
    return Summary(out=str(out), source=source.name, layout=keras.layout, naming=scheme.name,
                   arch=scheme.family.arch(depth), depth=depth, include_top=include_top, num_classes=num_classes,
                   tensors=len(leaves), parameters=int(sum(np.size(x) for x in leaves)),
                   seconds=time.perf_counter() - start)
