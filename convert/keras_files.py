"""Every Keras weights-file layout a ResNet user may hold -> {layer name: [arrays in Keras order]}.

Layouts (see shared reference §4):
- legacy weights `.h5` (`save_weights` in Keras 2, the official ImageNet files): root attr `layer_names`
  (possibly split into `layer_names0..N`), one group per layer with attr `weight_names`;
- legacy full-model `.h5`: the same under `model_weights/`;
- Keras 3 `.weights.h5`: `layers/<snake_class>[_N]/vars/<i>`, the real layer name in the `vars` attr `name`
  when the writer is recent enough, otherwise recovered from the layer order;
- `.keras` zip archive: `model.weights.h5` plus `config.json` (which gives that layer order).
Only layers that carry weights are returned, in file order.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from flaxresnet.errors import UserError

# The weights of Conv2D, Dense and BatchNormalization layers in Keras order.
_WEIGHT_ORDER = ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance")
# Keras 3 saving names each layer group after its class in snake case, numbered in `model.layers` order.
_KERAS3_CLASS_GROUPS = {"conv2d": "Conv2D", "batch_normalization": "BatchNormalization", "dense": "Dense"}


@dataclass
class KerasWeights:
    """The weights of one Keras file: layer name -> arrays (Keras order), the layout they came from, and the
    architecture (Keras' model config: class_name and config) where the file holds a whole model (a `.keras`
    archive, a legacy full-model `.h5`), else None."""

    layers: dict[str, list[np.ndarray]]
    layout: str
    model_config: dict | None = None


def _attr_strings(group: h5py.Group, name: str) -> list[str]:
    """A string-list attribute, joined across Keras' split `name0, name1, ...` chunks; bytes or str."""
    if name in group.attrs:
        chunks = [group.attrs[name]]
    else:
        chunks, i = [], 0
        while f"{name}{i}" in group.attrs:
            chunks.append(group.attrs[f"{name}{i}"])
            i += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for chunk in chunks for v in np.atleast_1d(chunk)]


def _read_legacy(group: h5py.Group) -> dict[str, list[np.ndarray]]:
    """Every layer's arrays; a nested model's group (a model used as a layer) gives the arrays of its own layers,
    which its weight names (`<layer>/<weight>`, their order trainable-first) name, in each layer's Keras order."""
    layers: dict[str, list[np.ndarray]] = {}
    for name in _attr_strings(group, "layer_names"):
        if name not in group:
            raise UserError(f"layer {name!r} is listed in the file's layer_names but has no group: "
                            f"the file is damaged; download or save it again")
        nested: dict[str, list[tuple[str, np.ndarray]]] = {}
        for weight in _attr_strings(group[name], "weight_names"):
            parts = weight.split(":")[0].split("/")  # [model/]layer/weight, Keras 2 with ':0'
            layer = parts[-2] if len(parts) > 1 else name
            nested.setdefault(layer, []).append((parts[-1], np.asarray(group[name][weight])))
        for layer, named in nested.items():
            if layer in layers:
                raise UserError(f"two layers of the file are named {layer!r}: save the model with unique layer "
                                f"names")
            if layer != name:  # a nested model's layer: Keras order (its file lists trainable weights first)
                named = sorted(named, key=lambda nw: _WEIGHT_ORDER.index(nw[0]) if nw[0] in _WEIGHT_ORDER
                               else len(_WEIGHT_ORDER))
            layers[layer] = [array for _, array in named]
    return layers


def _read_keras3(group: h5py.Group, names_in_order: list[tuple[str, str]] | None,
                 canonical: Callable[[Counter], list[tuple[str, str]]]) -> dict[str, list[np.ndarray]]:
    """Read `layers/*/vars` (and a nested model's `layers/<model>/layers/*/vars`); names come from the `name`
    attr, else (no nested model) from (class, name) pairs in layer order."""
    named = _named_keras3_groups(group)
    if named:
        return {name: _vars(g) for name, g in named.items()}
    groups = {k: g for k, g in group["layers"].items() if "vars" in g and len(g["vars"])}
    counts = Counter(_group_class(k) for k in groups)
    order = names_in_order if names_in_order is not None else canonical(counts)
    by_group, seen = {}, Counter()
    for class_name, layer_name in order:
        snake = next((s for s, c in _KERAS3_CLASS_GROUPS.items() if c == class_name), None)
        if snake is None:
            continue
        key = snake if seen[snake] == 0 else f"{snake}_{seen[snake]}"
        seen[snake] += 1
        if key in groups:
            by_group[key] = layer_name
    unnamed = sorted(set(groups) - set(by_group))
    if unnamed:
        raise UserError(f"cannot tell which layer the weight groups {unnamed[:5]} belong to: "
                        f"save the model as a legacy .h5 or a .keras archive and convert that")
    return {by_group[k]: _vars(g) for k, g in groups.items()}


def _named_keras3_groups(group: h5py.Group) -> dict[str, h5py.Group] | None:
    """Layer name -> group of every layer with weights, nested models' layers included, when each group carries
    its layer's name (recent Keras 3 writers); None otherwise."""
    out: dict[str, h5py.Group] = {}
    for g in group["layers"].values():
        if "layers" in g:  # a nested model
            inner = _named_keras3_groups(g)
            if inner is None:
                return None
            out.update(inner)
        elif "vars" in g and len(g["vars"]):
            if "name" not in g["vars"].attrs:
                return None
            out[_attr_str(g["vars"].attrs["name"])] = g
    return out


def _attr_str(v: bytes | str) -> str:
    return v.decode("utf8") if isinstance(v, bytes) else str(v)


def _group_class(key: str) -> str:
    base = key.rsplit("_", 1)[0] if key.rsplit("_", 1)[-1].isdigit() else key
    return _KERAS3_CLASS_GROUPS.get(base, base)


def _vars(g: h5py.Group) -> list[np.ndarray]:
    v = g["vars"]
    return [np.asarray(v[str(i)]) for i in range(len(v))]


def _config_layer_order(config: dict) -> list[tuple[str, str]]:
    """(class, name) of every layer in a `.keras` config, in `model.layers` order."""
    return [(layer["class_name"], layer["config"]["name"]) for layer in config["config"]["layers"]]


def _read_h5(f: h5py.File, names_in_order: list[tuple[str, str]] | None,
             canonical: Callable[[Counter], list[tuple[str, str]]]) -> KerasWeights:
    if "layer_names" in f.attrs or "layer_names0" in f.attrs:
        return KerasWeights(_read_legacy(f), "legacy weights .h5")
    if "model_weights" in f:
        return KerasWeights(_read_legacy(f["model_weights"]), "legacy full-model .h5")
    if "layers" in f:
        return KerasWeights(_read_keras3(f, names_in_order, canonical), "Keras 3 .weights.h5")
    raise UserError("the HDF5 file holds no Keras weights (no layer_names, model_weights/ or layers/): "
                    "pass a Keras weights file (.h5, .weights.h5 or .keras)")


def read_keras_weights(path: str | Path,
                       canonical: Callable[[Counter], list[tuple[str, str]]]) -> KerasWeights:
    """Read any supported Keras file into layer -> arrays.

    `canonical(class_counts)` gives the (class, layer name) order to assume for a Keras 3 `.weights.h5`
    whose groups carry no layer names (the architecture's own `model.layers` order).
    Raises UserError for a missing, unreadable, truncated or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} not found: check the path, or pass --weights imagenet")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                if "model.weights.h5" not in names or "config.json" not in names:
                    raise UserError(f"{path} is a zip but not a .keras archive (no model.weights.h5 and "
                                    f"config.json inside): pass a Keras weights file")
                config = json.loads(z.read("config.json"))
                with h5py.File(io.BytesIO(z.read("model.weights.h5")), "r") as f:
                    weights = _read_h5(f, _config_layer_order(config), canonical)
            weights.layout, weights.model_config = "Keras 3 .keras archive", config
            return weights
        with h5py.File(path, "r") as f:
            weights = _read_h5(f, None, canonical)
            if "model_config" in f.attrs:
                weights.model_config = json.loads(_attr_str(f.attrs["model_config"]))
            return weights
    except UserError:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} as a Keras weights file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'unreadable'}): it may be truncated or "
                        f"not HDF5; download or save it again") from e
