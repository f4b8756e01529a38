"""The flaxresnet weights file: variables plus self-describing metadata, in one msgpack blob.

Layout: {"format": "flaxresnet", "version": 1, "metadata": <JSON text>, "variables": {"params": ...,
"batch_stats": ...}}. `metadata["model"]` holds `{"kind": ..., "config": {...}}`, enough to rebuild the Flax
module with `build_model`; the rest (source file, md5, naming scheme, class names, ...) is informative.
Writes are atomic: a temp file in the destination folder, then a rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import msgpack
import numpy as np
from flax import serialization

from flaxresnet import models
from flaxresnet.errors import UserError

FORMAT = "flaxresnet"
VERSION = 1
# First bytes of the Keras files people pass by mistake: HDF5 (.h5, .weights.h5) and zip (.keras).
_KERAS_SIGNATURES = {b"\x89HDF\r\n\x1a\n": "HDF5", b"PK\x03\x04": ".keras (zip)"}
# Keras' ResNet ImageNet input size: what a converted file records, and what a file that does not say is fed.
IMAGENET_SIZE = 224

Variables = dict[str, Any]


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(file)` on a temp file beside `path`, then rename it over `path`.

    A failure leaves neither a partial file nor a changed `path`. Raises UserError if the folder is missing.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"output folder {folder} does not exist: create it or write elsewhere")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def md5sum(path: str | os.PathLike) -> str:
    """Hex md5 of a file, read in chunks: what a converted file records of its source, and a run of the file it
    started from."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(path: str | os.PathLike, variables: Variables, metadata: dict[str, Any]) -> None:
    """Write `variables` ({'params', 'batch_stats'}) and JSON-able `metadata` atomically to `path`."""
    if "model" not in metadata or "kind" not in metadata["model"]:
        raise ValueError("metadata needs a 'model' entry with 'kind' and 'config'")
    blob = serialization.msgpack_serialize({
        "format": FORMAT,
        "version": VERSION,
        "metadata": json.dumps(metadata, sort_keys=True),
        "variables": jax.tree.map(np.asarray, dict(variables)),
    })
    atomic_write(path, lambda f: f.write(blob))


def load(path: str | os.PathLike) -> tuple[Variables, dict[str, Any]]:
    """Read a flaxresnet file into (variables as numpy arrays, metadata); UserError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} not found: check the path (convert Keras weights with "
                        f"`python -m convert keras_to_flax`)")
    with path.open("rb") as f:
        start = f.read(8)
    for signature, kind in _KERAS_SIGNATURES.items():
        if start.startswith(signature):
            raise UserError(f"{path} is a Keras {kind} file, not a readable flaxresnet weights file: convert it "
                            f"first with `python -m convert keras_to_flax --weights {path}` and use the "
                            f"converted.msgpack it writes")
    blob = read_msgpack(path, FORMAT, VERSION,
                        damaged=lambda why: f"{path} is not a readable flaxresnet weights file ({why}): it may be "
                                            f"truncated or of another format; convert it again",
                        other_version=lambda version: f"{path} has flaxresnet file version {version}, this "
                                                      f"flaxresnet reads version {VERSION}: upgrade flaxresnet or "
                                                      f"convert the weights again")
    return blob["variables"], json.loads(blob["metadata"])


def read_msgpack(path: Path, format: str, version: int, damaged: Callable[[str], str],
                 other_version: Callable[[Any], str]) -> dict[str, Any]:
    """The contents of a flaxresnet msgpack file (weights or checkpoint) of `format` and `version`.

    UserError otherwise: `damaged(why)` for truncated or foreign bytes (the decoder's error is kept as the
    cause), `other_version(version)` for another version of the format.
    """
    try:
        contents = serialization.msgpack_restore(path.read_bytes())
    except (ValueError, msgpack.UnpackException) as e:  # truncated or foreign bytes
        raise UserError(damaged(type(e).__name__)) from e
    if not isinstance(contents, dict) or contents.get("format") != format:
        raise UserError(damaged(f"no format {format!r}"))
    if contents.get("version") != version:
        raise UserError(other_version(contents.get("version")))
    return contents


def build_model(metadata: dict[str, Any], **overrides: Any) -> nn.Module:
    """The Flax module a file's metadata describes; `overrides` replace config fields (e.g. dtype)."""
    kind = metadata["model"]["kind"]
    if kind not in models.MODEL_KINDS:
        raise UserError(f"unknown model kind {kind!r} in weights metadata: known are "
                        f"{sorted(models.MODEL_KINDS)}; upgrade flaxresnet")
    return models.MODEL_KINDS[kind](**{**metadata["model"]["config"], **overrides})


def load_converted(path: str | os.PathLike, **overrides: Any) -> tuple[nn.Module, Variables]:
    """Load a converted (or fine-tuned) file as `(model, {'params': ..., 'batch_stats': ...})`.

    `model.apply(variables, preprocess_input(rgb, mode=model.preprocess), train=False)` gives the Keras feature
    map for a no-top backbone (ResNet or ResNetV2), or logits for one with its top; a classifier takes raw `rgb`.
    `overrides` replace config fields; `dtype='float64'` (with 64-bit JAX) also makes the variables float64, for
    float64 inputs (`preprocess_input(rgb, jnp.float64, ...)`).
    """
    variables, metadata = load(path)
    model = build_model(metadata, **overrides)
    wide = models.param_dtype(model.dtype)  # float32, or float64 for dtype='float64'
    return model, jax.tree.map(lambda x: x.astype(wide) if np.issubdtype(x.dtype, np.floating) else x, variables)


def input_size(model: nn.Module, metadata: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of the raw images the model is fed: a classifier's training images' native size (it
    upsamples them itself), else the ImageNet size the file records (224)."""
    if isinstance(model, models.KerasResNet):
        size = metadata.get("image_size", IMAGENET_SIZE)
        return size, size
    if "image_shape" in metadata:
        return tuple(metadata["image_shape"][:2])
    if model.image_size is not None:  # no native size recorded: feed images at the upsampled size
        return model.image_size, model.image_size
    raise UserError("the file does not record the image size its classifier was trained on (metadata "
                    "'image_shape'): save it again with train.py")
