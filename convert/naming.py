"""Keras layer naming schemes -> Flax module names, and the strict fill of a Flax variable tree.

Two schemes exist in the wild:
- `keras-applications` (Keras >= 2.2.5 / keras_applications resnet_common, Keras 3): the names the Flax
  model uses (`conv1_conv`, `conv2_block1_0_conv`, ...); classifier `predictions` (`probs` in
  keras_applications);
- `v0.2` (keras_applications `resnet50.py`, the fchollet/deep-learning-models v0.2 file): `conv1`,
  `bn_conv1`, `res2a_branch2a`, `bn2a_branch1`, ..., classifier `fc1000`; BN epsilon 1e-3.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from flaxresnet import trees
from flaxresnet.errors import UserError
from flaxresnet.models import KERAS_BN_EPSILON, LEGACY_BN_EPSILON, STAGE_BLOCKS

# Each Keras layer kind's weights, in Keras order: (Keras weight name, Flax collection, Flax leaf). Shared by
# `fill` (Keras -> Flax) and `keras_weights` (Flax -> Keras), so the mapping is written down once.
KERNEL_BIAS = (("kernel", "params", "kernel"), ("bias", "params", "bias"))  # Conv2D and Dense
BATCH_NORM = (("gamma", "params", "scale"), ("beta", "params", "bias"), ("moving_mean", "batch_stats", "mean"),
              ("moving_variance", "batch_stats", "var"))

_BRANCH_SUFFIX = {"2a": "1", "2b": "2", "2c": "3", "1": "0"}
_V02_BLOCK = re.compile(r"^(res|bn)([2-5])([a-z])_branch(2a|2b|2c|1)$")
_V02_FIXED = {"conv1": "conv1_conv", "bn_conv1": "conv1_bn", "fc1000": "predictions"}


def _keras_applications_name(name: str) -> str | None:
    if name == "probs":
        return "predictions"
    if name in ("conv1_conv", "conv1_bn", "predictions") or re.fullmatch(r"conv[2-5]_block\d+_[0-3]_(conv|bn)", name):
        return name
    return None


def _v02_name(name: str) -> str | None:
    if name in _V02_FIXED:
        return _V02_FIXED[name]
    m = _V02_BLOCK.match(name)
    if not m:
        return None
    kind, stage, letter, branch = m.groups()
    block = ord(letter) - ord("a") + 1
    return f"conv{stage}_block{block}_{_BRANCH_SUFFIX[branch]}_{'conv' if kind == 'res' else 'bn'}"


@dataclass(frozen=True)
class Scheme:
    """A naming scheme: how its layer names map to Flax names, and the BN epsilon its weights were made with."""

    name: str
    bn_epsilon: float
    to_flax: Callable[[str], str | None]


SCHEMES = (
    Scheme("keras-applications", KERAS_BN_EPSILON, _keras_applications_name),
    Scheme("v0.2", LEGACY_BN_EPSILON, _v02_name),
)


def detect_scheme(layer_names: list[str]) -> Scheme:
    """The scheme whose stem conv is present; UserError if neither (not a Keras ResNet file)."""
    names = set(layer_names)
    for scheme, stem in zip(SCHEMES, ("conv1_conv", "conv1")):
        if stem in names:
            return scheme
    shown = ", ".join(sorted(names)[:5]) or "none"
    raise UserError(f"not a Keras ResNet50/101/152 weights file: no stem layer 'conv1_conv' or 'conv1' "
                    f"(layers with weights: {shown}{', ...' if len(names) > 5 else ''})")


def detect_depth(flax_names: list[str]) -> int:
    """ResNet depth from the number of blocks in each stage; UserError for another architecture."""
    blocks = Counter()
    for name in flax_names:
        m = re.match(r"conv([2-5])_block(\d+)_1_conv$", name)
        if m:
            blocks[int(m.group(1))] = max(blocks[int(m.group(1))], int(m.group(2)))
    found = tuple(blocks[s] for s in (2, 3, 4, 5))
    for depth, stage_blocks in STAGE_BLOCKS.items():
        if found == stage_blocks:
            return depth
    raise UserError(f"blocks per stage {found} match no ResNet v1 (50: {STAGE_BLOCKS[50]}, 101: "
                    f"{STAGE_BLOCKS[101]}, 152: {STAGE_BLOCKS[152]}): the file holds another architecture")


def keras_layer_order(class_counts: Counter) -> list[tuple[str, str]]:
    """(class, name) of the weighted layers of keras.applications ResNet in `model.layers` order.

    Used to name the groups of a Keras 3 `.weights.h5` that predates per-group layer names; the depth and top
    follow from how many Conv2D and Dense groups the file has. Empty if the counts fit no ResNet.
    """
    depths = {1 + 3 * sum(b) + 4: d for d, b in STAGE_BLOCKS.items()}
    depth = depths.get(class_counts.get("Conv2D", 0))
    if depth is None:
        return []
    order = [("Conv2D", "conv1_conv"), ("BatchNormalization", "conv1_bn")]
    for stage, blocks in enumerate(STAGE_BLOCKS[depth], start=2):
        for block in range(1, blocks + 1):
            name = f"conv{stage}_block{block}"
            parts = ["1_conv", "1_bn", "2_conv", "2_bn"]
            parts += ["0_conv", "3_conv", "0_bn", "3_bn"] if block == 1 else ["3_conv", "3_bn"]
            order += [("Conv2D" if p.endswith("conv") else "BatchNormalization", f"{name}_{p}") for p in parts]
    if class_counts.get("Dense", 0):
        order.append(("Dense", "predictions"))
    return order


def rename(layers: dict[str, list[np.ndarray]], scheme: Scheme) -> dict[str, list[np.ndarray]]:
    """Keras layer -> Flax module name; UserError naming layers the scheme does not know or that repeat."""
    renamed, unknown = {}, []
    for name, arrays in layers.items():
        flax_name = scheme.to_flax(name)
        if flax_name is None:
            unknown.append(name)
        elif flax_name in renamed:
            raise UserError(f"two layers of the file map to {flax_name!r}: the file is not a single ResNet")
        else:
            renamed[flax_name] = arrays
    if unknown:
        raise UserError(f"{len(unknown)} layer(s) with weights are not part of a {scheme.name} ResNet: "
                        f"{', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}")
    return renamed


def fill(expected: dict[str, Any], layers: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    """Fill the Flax variable tree `expected` (shapes from `jax.eval_shape(model.init)`) from `layers`.

    Strict: every parameter and BN statistic filled exactly once with an equal shape, no layer left over.
    Raises UserError listing the first few problems by layer name.
    """
    params, stats = expected["params"], expected.get("batch_stats", {})
    found = trees.problems(params, layers, depth=1, unit="layer ")
    out: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}
    for name in (n for n in params if n in layers):
        arrays = layers[name]
        targets = BATCH_NORM if name in stats else KERNEL_BIAS
        if len(arrays) != len(targets):
            found.append(f"{name}: {len(arrays)} weights, expected {len(targets)}")
            continue
        for (_, collection, leaf), array in zip(targets, arrays):
            out[collection].setdefault(name, {})[leaf] = np.asarray(array, np.float32)
    filled = {collection: {name: expected[collection][name] for name in tree} for collection, tree in out.items()}
    found += trees.problems(filled, out)
    if found:
        raise UserError(f"the file's weights do not fill a ResNet: {trees.summary(found)}")
    return out


def keras_weights(variables: dict[str, Any]) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """The inverse of `fill`: (keras-applications layer name, [(Keras weight name, array), ...]) per layer.

    Layers come in keras.applications `model.layers` order, the order by which Keras' legacy `.h5` loader
    matches a file's layers to a model's. UserError if the variables are not exactly a ResNet's layers.
    """
    params = variables["params"]
    counts = Counter({"Conv2D": sum(name.endswith("_conv") for name in params),
                      "Dense": int("predictions" in params)})
    order = [name for _, name in keras_layer_order(counts)]
    if not order:
        raise UserError("the variables are not those of a ResNet50/101/152: no layers")
    trees.check(dict.fromkeys(order), params, "the variables are not those of a ResNet50/101/152",
                "export a file converted or trained with flaxresnet", depth=1, unit="layer ")
    return [(name, layer_arrays(variables, name)) for name in order]


def layer_arrays(variables: dict[str, Any], name: str) -> list[tuple[str, np.ndarray]]:
    """[(Keras weight name, array), ...] of the Conv2D, Dense or BatchNormalization layer `name` of a Flax tree."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    targets = BATCH_NORM if name in stats else KERNEL_BIAS
    return [(keras_name, np.asarray((params if collection == "params" else stats)[name][leaf]))
            for keras_name, collection, leaf in targets]
