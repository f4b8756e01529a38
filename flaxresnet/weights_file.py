"""The flaxresnet weights file: variables plus self-describing metadata, in one msgpack blob.

Layout: {"format": "flaxresnet", "version": 1, "metadata": <JSON text>, "variables": {"params": ...,
"batch_stats": ...}}. `metadata["model"]` holds `{"kind": ..., "config": {...}}`, enough to rebuild the Flax
module with `build_model`; the rest (source file, md5, naming scheme, class names, ...) is informative.
Writes are atomic: a temp file in the destination folder, then a rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from flax import serialization

from flaxresnet import models
from flaxresnet.errors import UserError

FORMAT = "flaxresnet"
VERSION = 1

Variables = dict[str, Any]


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(file)` on a temp file beside `path`, then rename it over `path`.

    A failure leaves neither a partial file nor a changed `path`. Raises UserError if the folder is missing.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"output folder {folder} does not exist: create it or choose another --out")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
    try:
        blob = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several unrelated types for truncated or foreign bytes
        raise UserError(f"{path} is not a readable flaxresnet weights file ({type(e).__name__}): "
                        f"it may be truncated or of another format; convert it again") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise UserError(f"{path} is not a flaxresnet weights file: convert Keras weights with "
                        f"`python -m convert keras_to_flax`")
    if blob.get("version") != VERSION:
        raise UserError(f"{path} has flaxresnet file version {blob.get('version')}, this flaxresnet reads "
                        f"version {VERSION}: upgrade flaxresnet or convert the weights again")
    return blob["variables"], json.loads(blob["metadata"])


def build_model(metadata: dict[str, Any], **overrides: Any) -> nn.Module:
    """The Flax module a file's metadata describes; `overrides` replace config fields (e.g. dtype)."""
    kind = metadata["model"]["kind"]
    if kind not in models.MODEL_KINDS:
        raise UserError(f"unknown model kind {kind!r} in weights metadata: known are "
                        f"{sorted(models.MODEL_KINDS)}; upgrade flaxresnet")
    return models.MODEL_KINDS[kind](**{**metadata["model"]["config"], **overrides})


def load_converted(path: str | os.PathLike, **overrides: Any) -> tuple[nn.Module, Variables]:
    """Load a converted (or fine-tuned) file as `(model, {'params': ..., 'batch_stats': ...})`.

    `model.apply(variables, preprocess_input(rgb), train=False)` gives the Keras feature map for a no-top
    backbone, or logits for a file with a classifier. `overrides` replace config fields; `dtype='float64'`
    (with 64-bit JAX) also makes the variables float64, for float64 inputs (`preprocess_input(rgb, jnp.float64)`).
    """
    variables, metadata = load(path)
    model = build_model(metadata, **overrides)
    wide = models.param_dtype(model.dtype)  # float32, or float64 for dtype='float64'
    return model, jax.tree.map(lambda x: x.astype(wide) if np.issubdtype(x.dtype, np.floating) else x, variables)
