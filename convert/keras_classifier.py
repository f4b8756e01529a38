"""A whole Keras classifier model -> what flaxresnet's `Classifier` computes, read from the model's config alone.

Accepted (`Sequential` or functional, the ResNet nested as a model or inlined), in this order:
- input side: `InputLayer` of a fixed size; any of one or several `UpSampling2D` (nearest, integer factors, which
  compose into one repeat) or one bilinear `UpSampling2D` / `Resizing`, or a nearest `Resizing` to a whole multiple
  of the input; flaxresnet's own exported preprocessing (`caffe_preprocess`, a 1x1 Conv2D holding exactly the
  caffe permutation and means; `tf_preprocess` or any `Rescaling(1/127.5, offset=-1)`);
- a keras.applications ResNet or ResNetV2 without its top (`pooling='avg'` allowed);
- a head: the seed's `GlobalAveragePooling2D -> Dense(relu) -> Dropout -> BatchNormalization -> Dense`, or the
  linear `GlobalAveragePooling2D -> [Dropout] -> Dense`, with a softmax (in the last Dense, or an `Activation` /
  `Softmax` layer) or logits at the end; any hidden width and class count.
Anything else is refused in one line naming the first layer that does not fit and what is accepted there.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from flaxresnet.errors import UserError
from flaxresnet.models import HEAD_BN_EPSILON
from flaxresnet.preprocess import caffe_conv_weights

MODEL_CLASSES = ("Functional", "Model", "Sequential")
# Names of keras.applications ResNet / ResNetV2 layers (no top); V2's shortcut max-pools are unnamed.
_RESNET_LAYER = re.compile(r"conv1_(pad|conv|bn|relu)|pool1_(pad|pool)|conv[2-5]_block\d+_\w+|post_(bn|relu)")
# The layers keras.applications puts after the blocks: its top, or the pooling of `pooling='avg'|'max'`.
_RESNET_TOP = ("avg_pool", "max_pool", "predictions", "probs")
INPUT_SIDE = "UpSampling2D, Resizing, flaxresnet's caffe_preprocess or Rescaling(1/127.5, offset=-1)"
HEADS = ("GlobalAveragePooling2D -> Dense(relu) -> Dropout -> BatchNormalization -> Dense (the seed head) or "
         "GlobalAveragePooling2D -> [Dropout] -> Dense (linear), softmax or logits at the end")


@dataclass(frozen=True)
class KerasClassifier:
    """A Keras classifier in flaxresnet's terms.

    Attributes:
      backbone_layers: the names of the ResNet's layers (its weights are read under them).
      native_size: (H, W) of the model's input.
      image_size, upsample: the side the backbone sees (None: the native size) and how ('nearest' or 'bilinear').
      preprocess: the preprocessing inside the model ('caffe' or 'tf'), None if it has none.
      preprocess_layer: the name of flaxresnet's caffe Conv2D, whose weights `check_caffe_layer` checks.
      head, hidden, dropout, num_classes: the head's kind ('seed' or 'linear'), width, dropout rate and classes.
      head_layers: the Keras names of the head's weighted layers in the Flax head's order (seed: dense,
        batch_normalization, dense_1; linear: dense).
      softmax: whether the model ends in a softmax (flaxresnet's logits are what precedes it).
      dropped_dropout: a linear head's dropout rate, which flaxresnet's linear head does not have (inference is
        the same), or 0.
    """

    backbone_layers: frozenset[str]
    native_size: tuple[int, int]
    image_size: int | None
    upsample: str
    preprocess: str | None
    preprocess_layer: str | None
    head: str
    hidden: int
    dropout: float
    num_classes: int
    head_layers: tuple[str, ...]
    softmax: bool
    dropped_dropout: float


@dataclass(frozen=True)
class _Layer:
    kind: str  # Keras class name
    name: str
    config: dict[str, Any]


def parse(model_config: dict[str, Any]) -> KerasClassifier | None:
    """The classifier a Keras model config describes; None if the model is a keras.applications ResNet itself
    (with or without its top: a backbone file). UserError for a model it cannot compute."""
    layers = [_Layer(layer["class_name"], layer["config"]["name"], layer["config"])
              for layer in model_config["config"]["layers"]]
    nested = [i for i, layer in enumerate(layers) if layer.kind in MODEL_CLASSES and _is_resnet(layer)]
    inlined = [i for i, layer in enumerate(layers) if _RESNET_LAYER.fullmatch(layer.name)]
    if nested and inlined:
        raise UserError(f"layer {layers[nested[0]].name!r} is a second ResNet beside the one inlined in the model: "
                        f"flaxresnet computes a classifier on one backbone")
    if len(nested) > 1:
        raise UserError(f"layer {layers[nested[1]].name!r} is a second ResNet in the model: flaxresnet computes a "
                        f"classifier on one backbone")
    if nested:
        first = last = nested[0]
        inner = [layer["config"]["name"] for layer in layers[first].config["layers"]]
        if "predictions" in inner or "probs" in inner:
            raise UserError(f"layer {layers[first].name!r} is a ResNet with its ImageNet top: build the classifier "
                            f"on the ResNet without its top (include_top=False)")
        names, pooled = frozenset(inner), "avg_pool" in inner
    elif inlined:
        first, last = inlined[0], inlined[-1]
        if last + 1 < len(layers) and layers[last + 1].name == "avg_pool":
            last += 1
        names, pooled = frozenset(layer.name for layer in layers[first:last + 1]), layers[last].name == "avg_pool"
        if all(layer.kind == "InputLayer" for layer in layers[:first]) and \
                all(layer.name in _RESNET_TOP for layer in layers[last + 1:]):
            return None  # a keras.applications ResNet itself, with or without its top
    else:
        return None  # no ResNet: the weights' check says what the file holds
    native, image_size, upsample, preprocess, preprocess_layer = _input_side(layers[:first])
    head = _head(layers[last + 1:], pooled)
    return KerasClassifier(backbone_layers=names, native_size=native, image_size=image_size, upsample=upsample,
                           preprocess=preprocess, preprocess_layer=preprocess_layer, **head)


def _is_resnet(layer: _Layer) -> bool:
    return any(inner["config"]["name"] in ("conv1_conv", "conv1") for inner in layer.config.get("layers", []))


def _input_shape(layers: list[_Layer]) -> tuple[int | None, int | None] | None:
    for layer in layers:
        shape = layer.config.get("batch_shape") or layer.config.get("batch_input_shape")
        if shape is not None:
            return tuple(shape[1:3])
    return None


def _input_side(layers: list[_Layer]) -> tuple[tuple[int, int], int | None, str, str | None, str | None]:
    """(native size, image size, upsampling method, preprocessing, flaxresnet's caffe layer) of the layers before
    the ResNet."""
    shape = _input_shape(layers)
    if shape is None or None in shape:
        raise UserError(f"the model's input size is not fixed (input shape {shape}): flaxresnet's classifier "
                        f"upsamples images of one size; build the Keras model with a fixed input shape")
    size, factors, bilinear, preprocess, preprocess_layer = shape, [], 0, None, None
    for layer in layers:
        config = layer.config
        if layer.kind == "InputLayer":
            continue
        if layer.kind == "UpSampling2D" and config.get("interpolation") in ("nearest", "bilinear"):
            fy, fx = config["size"] if isinstance(config["size"], list) else (config["size"],) * 2
            factors.append(config["interpolation"])
            bilinear += config["interpolation"] == "bilinear"
            size = (size[0] * fy, size[1] * fx)
        elif layer.kind == "Resizing" and config.get("interpolation") in ("nearest", "bilinear") and \
                not config.get("crop_to_aspect_ratio") and not config.get("pad_to_aspect_ratio"):
            if config["height"] < size[0] or config["width"] < size[1]:
                raise UserError(f"layer {layer.name!r} shrinks {size[0]}x{size[1]} to {config['height']}x"
                                f"{config['width']}: flaxresnet's classifier upsamples only")
            if config["interpolation"] == "nearest" and (config["height"] % size[0] or config["width"] % size[1]):
                raise UserError(f"layer {layer.name!r} resizes {size[0]}x{size[1]} to {config['height']}x"
                                f"{config['width']} by nearest neighbours, not a whole factor: flaxresnet's "
                                f"nearest upsampling repeats pixels; use a whole factor or bilinear")
            factors.append(config["interpolation"])
            bilinear += config["interpolation"] == "bilinear"
            size = (config["height"], config["width"])
        elif layer.kind == "Rescaling" and math.isclose(config["scale"], 1 / 127.5, rel_tol=1e-6) and \
                config["offset"] == -1 and preprocess is None:
            preprocess = "tf"
        elif layer.kind == "Conv2D" and layer.name == "caffe_preprocess" and preprocess is None:
            preprocess, preprocess_layer = "caffe", layer.name
        else:
            raise UserError(f"layer {layer.name!r} ({layer.kind}) before the ResNet is not one flaxresnet computes: "
                            f"it accepts {INPUT_SIDE} there")
    if bilinear and len(factors) > 1:
        raise UserError(f"the model upsamples in {len(factors)} steps, {bilinear} of them bilinear: flaxresnet "
                        f"upsamples in one step, so it computes one bilinear layer or nearest ones only")
    if size[0] != size[1]:
        raise UserError(f"the model upsamples to {size[0]}x{size[1]}: flaxresnet's classifier upsamples to a "
                        f"square")
    return (tuple(shape), None if not factors else size[0], "bilinear" if bilinear else "nearest", preprocess,
            preprocess_layer)


def _head(layers: list[_Layer], pooled: bool) -> dict[str, Any]:
    """The head's fields of `KerasClassifier` from the layers after the ResNet."""
    layers = list(layers)
    softmax = False
    if layers and _is_softmax(layers[-1]):
        softmax = True
        layers.pop()
    if not pooled:
        if not layers or layers[0].kind != "GlobalAveragePooling2D" or layers[0].config.get("keepdims"):
            return _refuse_head(layers[0] if layers else None)
        layers.pop(0)
    kinds = [layer.kind for layer in layers]
    if kinds == ["Dense", "Dropout", "BatchNormalization", "Dense"]:
        dense, dropout, bn, out = layers
        _dense(dense, "relu")
        _batch_norm(bn)
        head = dict(head="seed", hidden=int(dense.config["units"]), dropout=float(dropout.config["rate"]),
                    head_layers=(dense.name, bn.name, out.name), dropped_dropout=0.0)
    elif kinds in (["Dense"], ["Dropout", "Dense"]):
        out = layers[-1]
        head = dict(head="linear", hidden=256, dropout=0.25, head_layers=(out.name,),
                    dropped_dropout=float(layers[0].config["rate"]) if len(layers) == 2 else 0.0)
    else:
        return _refuse_head(_first_misfit(layers))
    if _dense(out, "softmax", "linear") == "softmax":
        if softmax:
            raise UserError(f"the model applies softmax twice (in layer {out.name!r} and after it): flaxresnet "
                            f"computes logits, or one softmax of them")
        softmax = True
    return {**head, "num_classes": int(out.config["units"]), "softmax": softmax}


def _is_softmax(layer: _Layer) -> bool:
    return layer.kind == "Softmax" or layer.kind == "Activation" and layer.config.get("activation") == "softmax"


def _first_misfit(layers: list[_Layer]) -> _Layer | None:
    """The first layer where the head stops fitting both accepted patterns."""
    patterns = (["Dense", "Dropout", "BatchNormalization", "Dense"], ["Dropout", "Dense"], ["Dense"])
    for i, layer in enumerate(layers):
        if not any(len(p) > i and p[i] == layer.kind and p[:i] == [x.kind for x in layers[:i]] for p in patterns):
            return layer
    return layers[-1] if layers else None


def _refuse_head(layer: _Layer | None) -> dict[str, Any]:
    where = f"layer {layer.name!r} ({layer.kind})" if layer is not None else "the end of the model"
    raise UserError(f"{where} after the ResNet is not part of a head flaxresnet computes: it accepts {HEADS}")


def _dense(layer: _Layer, *activations: str) -> str:
    """A Dense layer's activation, checked against `activations` and for a bias; UserError otherwise."""
    activation = layer.config.get("activation")
    if activation not in activations or not layer.config.get("use_bias", True):
        raise UserError(f"layer {layer.name!r} is a Dense with activation {activation!r}"
                        f"{'' if layer.config.get('use_bias', True) else ' and no bias'}: flaxresnet's head has "
                        f"one with {' or '.join(activations)} and a bias there")
    return activation


def _batch_norm(layer: _Layer) -> None:
    config = layer.config
    axis = config.get("axis", -1)
    if config.get("epsilon") != HEAD_BN_EPSILON or axis not in (-1, [-1], 1, [1]) or not config.get("center", True) \
            or not config.get("scale", True):
        raise UserError(f"layer {layer.name!r} is a BatchNormalization with epsilon {config.get('epsilon')}, axis "
                        f"{axis}, center {config.get('center', True)}, scale {config.get('scale', True)}: "
                        f"flaxresnet's seed head has Keras' defaults (epsilon {HEAD_BN_EPSILON}, the last axis, "
                        f"center and scale)")


def check_caffe_layer(name: str, arrays: list[np.ndarray]) -> None:
    """UserError unless the Conv2D `name` holds exactly flaxresnet's caffe preprocessing (RGB -> BGR, minus the
    ImageNet means), as `flax_to_keras` writes it."""
    kernel, bias = caffe_conv_weights()
    if len(arrays) != 2 or not np.array_equal(arrays[0], kernel) or \
            not np.array_equal(arrays[1], bias.astype(np.float32)):
        raise UserError(f"layer {name!r} holds other weights than flaxresnet's caffe preprocessing: it is not the "
                        f"layer flax_to_keras writes, and flaxresnet computes no other 1x1 convolution there")
