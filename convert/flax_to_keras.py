"""flaxresnet weights file -> Keras (the `flax_to_keras` command's library function).

- A backbone (model kind 'resnet' or 'resnet_v2': a converted file, with or without its top) becomes a legacy
  Keras weights `.h5` in the layout of the official keras-applications files, which
  `keras.applications.ResNet{50,101,152}[V2](weights=OUT, include_top=...)` loads (tested with Keras 3; the
  layout is the one tf.keras 2 reads the official files in). Keras matches such a file's layers to the
  model's by order, so `layer_names` lists the weighted layers in keras.applications `model.layers` order;
  datasets sit at `conv1_conv/conv1_conv/kernel:0` as Keras 2 wrote them. Written with h5py alone: no Keras
  needed.
- A fine-tuned classifier (kind 'classifier') becomes a `.keras` model that `keras.models.load_model` opens
  without custom objects, computing what the Flax classifier computes: raw RGB images (0..255, the training
  images' native size) in, logits out (no softmax). Layers: the classifier's preprocessing (its backbone
  family's unless it records another) as `caffe_preprocess` (a fixed 1x1 Conv2D, RGB -> BGR and minus the
  ImageNet means, exactly Keras' caffe `preprocess_input`) or `tf_preprocess` (Rescaling(1/127.5, offset=-1),
  Keras' 'tf' mode up to its float rounding), absent for 'none'; `upsample` (UpSampling2D by the integer factor
  for 'nearest', Resizing for 'bilinear'; absent without upsampling); `resnet{depth}` or `resnet{depth}v2` (the
  keras.applications backbone, no top); `avg_pool`; then the head under the Flax head's names (`dense`,
  `dropout`, `batch_normalization`, `dense_1`). Needs Keras 3 (`pip install 'flaxresnet[keras]'`); runs it
  on the JAX backend unless KERAS_BACKEND says otherwise.

Only keras-applications backbones export: a backbone from the old v0.2 ResNet50 file (BN epsilon 1e-3, or no
`pool1_pad`) computes something no keras.applications model does, so it is refused rather than written to a
file that would load without error and give different outputs. Writes are atomic.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from convert import naming
from flaxresnet import weights_file
from flaxresnet.errors import UserError
from flaxresnet.models import (BN_MOMENTUM, HEAD_BN_EPSILON, KERAS_BN_EPSILON, Classifier, KerasResNet, arch_name,
                               family_of)
from flaxresnet.preprocess import caffe_conv_weights

# What the weights file header says: a Keras 2 legacy file of the TensorFlow (channels-last) layout, so that no
# loader applies its Keras 1 or Theano conversions.
KERAS_VERSION = b"2.2.4"
BACKEND = b"tensorflow"


@dataclass
class Summary:
    """What an export wrote."""

    source: str
    out: str
    what: str
    tensors: int
    load_with: str
    seconds: float

    def __str__(self) -> str:
        return (f"exported {self.source} -> {self.out}: {self.what}, {self.tensors} tensors; load with "
                f"{self.load_with}; {self.seconds:.2f} s")


def flax_to_keras(weights: str, out: str | None = None) -> Summary:
    """Export the flaxresnet file `weights` to Keras: a backbone to a legacy `.h5`, a classifier to `.keras`.

    `out` defaults to `weights` with the suffix of its kind. UserError for a file that is not ours, an output
    suffix Keras would not read as intended, a v0.2-origin backbone, or (classifiers) Keras missing.
    """
    start = time.perf_counter()
    variables, metadata = weights_file.load(weights)
    model = weights_file.build_model(metadata)
    suffix = ".keras" if isinstance(model, Classifier) else ".h5"
    out = str(Path(weights).with_suffix(suffix)) if out is None else out
    _check_exportable(model, weights, out)
    arch = arch_name(family_of(model), model.depth)
    if isinstance(model, KerasResNet):
        layers = naming.keras_weights(variables)
        weights_file.atomic_write(out, lambda f: _write_legacy_h5(f, layers), mode="w+b")
        top = f"top with {model.num_classes} classes" if model.include_top else "no top"
        load_with = (f"keras.applications.{arch}(weights={out!r}, include_top={model.include_top}"
                     f"{'' if model.num_classes == 1000 else f', classes={model.num_classes}'})")
        return Summary(Path(weights).name, out, f"legacy Keras weights .h5 ({arch}, {top})",
                       sum(len(arrays) for _, arrays in layers), load_with, time.perf_counter() - start)
    height, width = weights_file.input_size(model, metadata)
    keras_model = _keras_classifier(model, variables, (height, width))
    with tempfile.TemporaryDirectory() as folder:  # Keras saves to a path only: save, then move atomically
        keras_model.save(Path(folder) / "model.keras")
        data = (Path(folder) / "model.keras").read_bytes()
    weights_file.atomic_write(out, lambda f: f.write(data))
    what = (f"Keras model ({arch} + {model.head} head, {model.num_classes} classes; raw RGB {height}x{width} "
            f"in, logits out)")
    return Summary(Path(weights).name, out, what, len(keras_model.weights), f"keras.models.load_model({out!r})",
                   time.perf_counter() - start)


def _check_exportable(model: KerasResNet | Classifier, weights: str, out: str) -> None:
    """UserError for a v0.2-origin backbone or an output name Keras would read as another format."""
    if model.bn_epsilon != KERAS_BN_EPSILON or getattr(model, "pool1_pad", 1) != 1:  # ResNetV2: always Keras'
        raise UserError(f"{weights} holds a backbone from the old v0.2 ResNet50 file (BN epsilon "
                        f"{model.bn_epsilon}, pool1 padding {model.pool1_pad}): keras.applications models use "
                        f"epsilon {KERAS_BN_EPSILON} and padding 1 and would compute different outputs, so it "
                        f"cannot be exported; start from the current keras-applications weights "
                        f"(python -m convert keras_to_flax --weights imagenet)")
    if isinstance(model, Classifier):
        if not out.endswith(".keras"):
            raise UserError(f"a classifier exports to a Keras model: give --out a name ending in .keras "
                            f"(got {out})")
    elif not out.endswith((".h5", ".hdf5")) or out.endswith(".weights.h5"):
        raise UserError(f"a backbone exports to a legacy Keras weights file: give --out a name ending in .h5 "
                        f"but not .weights.h5, which Keras reads as its own format (got {out})")


def _write_legacy_h5(f: Any, layers: list[tuple[str, list[tuple[str, np.ndarray]]]]) -> None:
    """Write `layers` into the open binary file `f` as a legacy Keras weights file (Keras 2 names, `:0`)."""
    with h5py.File(f, "w") as h5:
        h5.attrs["layer_names"] = np.array([name.encode("utf8") for name, _ in layers])
        h5.attrs["backend"] = BACKEND
        h5.attrs["keras_version"] = KERAS_VERSION
        for name, arrays in layers:
            group = h5.create_group(name)
            keys = [f"{name}/{weight}:0" for weight, _ in arrays]
            group.attrs["weight_names"] = np.array([key.encode("utf8") for key in keys])
            for key, (_, array) in zip(keys, arrays):
                group.create_dataset(key, data=np.asarray(array, np.float32))


def _import_keras() -> Any:
    """Keras 3, on the JAX backend unless KERAS_BACKEND picks another; UserError saying how to install it."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except ImportError as e:
        raise UserError(f"exporting a classifier needs Keras 3 ({e}): pip install 'flaxresnet[keras]'") from e
    if int(keras.__version__.split(".")[0]) < 3:
        raise UserError(f"exporting a classifier needs Keras 3, found {keras.__version__}: "
                        f"pip install 'flaxresnet[keras]'")
    return keras


def _keras_classifier(model: Classifier, variables: dict[str, Any], size: tuple[int, int]) -> Any:
    """The Keras model computing `model`'s logits from raw RGB images of `size`, holding `variables`."""
    keras = _import_keras()
    layers = keras.layers
    arch = arch_name(model.family, model.depth)
    backbone = getattr(keras.applications, arch)(weights=None, include_top=False)
    mode = model.preprocess_mode
    preprocess = {"caffe": lambda: layers.Conv2D(3, 1, name="caffe_preprocess", trainable=False),
                  "tf": lambda: layers.Rescaling(1 / 127.5, offset=-1.0, name="tf_preprocess"),  # x / 127.5 - 1
                  "none": lambda: None}[mode]()
    inputs = keras.Input((*size, 3), name="image")
    x = inputs if preprocess is None else preprocess(inputs)
    if model.image_size is not None and tuple(size) != (model.image_size, model.image_size):
        if model.upsample == "nearest":
            if model.image_size % size[0] or model.image_size % size[1]:
                raise UserError(f"nearest upsampling needs an integer factor: {size[0]}x{size[1]} -> "
                                f"{model.image_size}")
            x = layers.UpSampling2D((model.image_size // size[0], model.image_size // size[1]),
                                    name="upsample")(x)
        else:
            x = layers.Resizing(model.image_size, model.image_size, interpolation="bilinear", name="upsample")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(backbone(x))
    head = variables["params"]["head"]
    if model.head == "seed":
        x = layers.Dense(model.hidden, activation="relu", name="dense")(x)
        x = layers.Dropout(model.dropout, name="dropout")(x)
        x = layers.BatchNormalization(epsilon=HEAD_BN_EPSILON, momentum=BN_MOMENTUM, name="batch_normalization")(x)
        x = layers.Dense(model.num_classes, name="dense_1")(x)
    else:
        x = layers.Dense(model.num_classes, name="dense")(x)
    keras_model = keras.Model(inputs, x, name=f"{arch.lower()}_classifier")

    if mode == "caffe":
        preprocess.set_weights(list(caffe_conv_weights()))
    backbone_variables = {c: variables[c]["backbone"] for c in ("params", "batch_stats")}
    for name, arrays in naming.keras_weights(backbone_variables):
        backbone.get_layer(name).set_weights([a for _, a in arrays])
    head_variables = {c: variables[c].get("head", {}) for c in ("params", "batch_stats")}
    for name in head:
        keras_model.get_layer(name).set_weights([a for _, a in naming.layer_arrays(head_variables, name)])
    return keras_model
