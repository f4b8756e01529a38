"""Keras ResNet (V1 or V2) weights file, or a whole Keras classifier on one -> flaxresnet weights file (the
`keras_to_flax` command's library function).

The file's naming scheme and family come from its layer names (`naming.detect_scheme`), its depth from its blocks
and its top from a `predictions` layer; the metadata records them as the model kind and config that rebuild it
(`resnet` or `resnet_v2`) and the preprocessing its inputs take ('caffe' or 'tf'). A whole model with a head
(`keras_classifier`) becomes a classifier file (kind 'classifier') like train.py's final.msgpack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convert import download, keras_classifier, naming
from convert.keras_files import read_keras_weights
from flaxresnet import models, weights_file
from flaxresnet.errors import UserError, option_name


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
    classifier: str | None = None  # what a converted Keras classifier is, in words

    def __str__(self) -> str:
        top = f"top with {self.num_classes} classes" if self.include_top else "no top"
        return (f"converted {self.source} ({self.layout}, {self.naming} naming) -> {self.out}: "
                f"{self.classifier or f'{self.arch}, {top}'}, {self.tensors} tensors, {self.parameters:,} values, "
                f"{self.seconds:.2f} s")


def keras_to_flax(weights: str, out: str, depth: int = 50, include_top: bool = False,
                  pool1_pad: int = 1, family: str = "v1", preprocessing: str | None = None) -> Summary:
    """Convert `weights` ('imagenet' or a Keras file path) into the flaxresnet file `out`.

    For 'imagenet', `family` ('v1': ResNet50/101/152, 'v2': ResNet50V2/101V2/152V2), `depth` and `include_top`
    pick the official file; for a path they are read from the file. `pool1_pad` is 0 only for V1 models built by
    keras_applications < 1.0.6 (Keras < 2.2.4), which had no `pool1_pad` layer. A whole Keras classifier
    (`keras_classifier`: a ResNet with a head, saved as `.keras` or full-model `.h5`) becomes a classifier file
    like train.py's final.msgpack, raw RGB images in, logits out; `preprocessing` ('caffe', 'tf' or 'none') is
    what its inputs were given outside the model (default: the backbone family's `preprocess_input`, as
    keras.applications documents, unless the model preprocesses inside). Strict: any missing, unexpected or
    mis-shaped tensor is a UserError; `out` is written atomically, so a failed conversion leaves an existing
    `out` untouched.
    """
    start = time.perf_counter()
    source = download.imagenet_weights(depth, include_top, family) if weights == "imagenet" else Path(weights)
    keras = read_keras_weights(source, naming.keras_layer_order)
    spec = None if keras.model_config is None else keras_classifier.parse(keras.model_config)
    if spec is None and preprocessing is not None:
        raise UserError(f"{source.name} holds a ResNet, not a whole classifier: its file records its family's "
                        f"preprocessing, so drop {option_name('preprocessing')}")
    layers = keras.layers if spec is None else {k: v for k, v in keras.layers.items() if k in spec.backbone_layers}
    resnet = _resnet(layers, pool1_pad, source.name)
    metadata = {"naming": resnet.scheme.name,
                "source": {"file": source.name, "md5": weights_file.md5sum(source), "layout": keras.layout}}
    if spec is None:
        variables, described, num_classes = resnet.variables, None, resnet.num_classes
        metadata.update(model={"kind": resnet.scheme.family.kind, "config": resnet.config},
                        preprocess=resnet.model_type.preprocess, image_size=weights_file.IMAGENET_SIZE)
    else:
        model, variables = _classifier(spec, keras.layers, resnet, preprocessing)
        described, num_classes = _describe(spec, model, resnet), model.num_classes
        metadata.update(model=model.metadata(), image_shape=[*spec.native_size, 3])
    weights_file.save(out, variables, metadata)
    leaves = jax.tree.leaves(variables)
    return Summary(out=str(out), source=source.name, layout=keras.layout, naming=resnet.scheme.name,
                   arch=resnet.scheme.family.arch(resnet.depth), depth=resnet.depth, include_top=resnet.include_top,
                   num_classes=num_classes, tensors=len(leaves), parameters=int(sum(np.size(x) for x in leaves)),
                   seconds=time.perf_counter() - start, classifier=described)


@dataclass
class _ResNet:
    """A file's ResNet: its scheme, the model config that rebuilds it and its variables."""

    scheme: naming.Scheme
    config: dict[str, Any]
    model_type: type
    variables: dict[str, Any]

    @property
    def depth(self) -> int:
        return self.config["depth"]

    @property
    def include_top(self) -> bool:
        return self.config["include_top"]

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]


def _resnet(layers: dict[str, list[np.ndarray]], pool1_pad: int, source: str) -> _ResNet:
    """The ResNet (V1 or V2, with or without its top) of a file's weighted layers, filled strictly."""
    scheme = naming.detect_scheme(list(layers))
    layers = naming.rename(layers, scheme)
    depth = naming.detect_depth(list(layers), scheme.family)
    include_top = "predictions" in layers
    num_classes = int(layers["predictions"][0].shape[-1]) if include_top else 1000
    config: dict[str, Any] = dict(depth=depth, include_top=include_top, num_classes=num_classes)
    if scheme.family is naming.V1:
        config.update(bn_epsilon=scheme.bn_epsilon, pool1_pad=pool1_pad)
    elif pool1_pad != 1:
        raise UserError(f"pool1_pad {pool1_pad} is for ResNet v1 models of keras_applications < 1.0.6, and "
                        f"{source} holds a {scheme.family.arch(depth)}, which always pads pool1 by 1")
    model_type = models.MODEL_KINDS[scheme.family.kind]
    expected = jax.eval_shape(model_type(**config).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return _ResNet(scheme, config, model_type, naming.fill(expected, layers))


# The Flax head's weighted layers, in the order `KerasClassifier.head_layers` lists the Keras ones.
HEAD_LAYERS = {"seed": ("dense", "batch_normalization", "dense_1"), "linear": ("dense",)}


def _classifier(spec: keras_classifier.KerasClassifier, layers: dict[str, list[np.ndarray]], resnet: _ResNet,
                preprocessing: str | None) -> tuple[models.Classifier, dict[str, Any]]:
    """The flaxresnet classifier of a parsed Keras classifier and its variables, every tensor used once."""
    leftover = sorted(set(layers) - spec.backbone_layers - set(spec.head_layers) - {spec.preprocess_layer})
    if leftover:
        raise UserError(f"layer(s) with weights {', '.join(leftover[:5])} are not part of the classifier's ResNet, "
                        f"preprocessing or head: the model holds layers flaxresnet does not compute")
    if spec.preprocess_layer is not None:
        keras_classifier.check_caffe_layer(spec.preprocess_layer, layers[spec.preprocess_layer])
    if spec.preprocess is not None and preprocessing is not None:
        raise UserError(f"the model preprocesses its inputs itself ({spec.preprocess} mode, inside it): drop "
                        f"{option_name('preprocessing')}")
    v1 = {"bn_epsilon": resnet.config["bn_epsilon"], "pool1_pad": resnet.config["pool1_pad"]} \
        if resnet.scheme.family is naming.V1 else {}
    model = models.Classifier(
        num_classes=spec.num_classes, family=resnet.scheme.family.version, depth=resnet.depth, head=spec.head,
        hidden=spec.hidden, dropout=spec.dropout, image_size=spec.image_size, upsample=spec.upsample,
        preprocess=spec.preprocess or preprocessing or resnet.model_type.preprocess, **v1)
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *spec.native_size, 3), jnp.uint8))
    head = naming.fill({c: expected[c].get("head", {}) for c in ("params", "batch_stats")},
                       dict(zip(HEAD_LAYERS[spec.head], (layers[name] for name in spec.head_layers))))
    backbone = resnet.variables
    return model, {c: {"backbone": backbone[c], **({"head": head[c]} if head[c] else {})}
                   for c in ("params", "batch_stats")}


def _describe(spec: keras_classifier.KerasClassifier, model: models.Classifier, resnet: _ResNet) -> str:
    """The summary's words for a converted classifier."""
    head = f"seed head (hidden {model.hidden}, dropout {model.dropout:g})" if model.head == "seed" else "linear head"
    if spec.dropped_dropout:
        head += f" (its dropout {spec.dropped_dropout:g} dropped: flaxresnet's linear head has none)"
    size = "x".join(map(str, spec.native_size))
    upsampled = "" if model.image_size is None else f" -> {model.image_size} px {model.upsample}"
    where = "inside the model" if spec.preprocess else "applied outside the model"
    return (f"Keras classifier: {resnet.scheme.family.arch(resnet.depth)} + {head}, {model.num_classes} classes, "
            f"{'softmax' if spec.softmax else 'logits'} out; raw RGB {size}{upsampled}, {model.preprocess} "
            f"preprocessing ({where}, now in the classifier)")
