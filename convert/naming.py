"""Keras layer naming schemes -> Flax module names, and the strict fill of a Flax variable tree.

Two ResNet families (`Family`): V1 (ResNet50/101/152, the Flax `ResNet`) and V2 (ResNet50V2/101V2/152V2, the
Flax `ResNetV2`). Two naming schemes exist in the wild:
- `keras-applications` (Keras >= 2.2.5 / keras_applications resnet_common, Keras 3), both families: the names
  the Flax models use (V1 `conv1_conv`, `conv1_bn`, `conv2_block1_0_conv`, ...; V2 `conv1_conv`,
  `conv2_block1_preact_bn`, ..., `post_bn`); classifier `predictions` (`probs` in keras_applications);
- `v0.2` (keras_applications `resnet50.py`, the fchollet/deep-learning-models v0.2 file), V1 only: `conv1`,
  `bn_conv1`, `res2a_branch2a`, `bn2a_branch1`, ..., classifier `fc1000`; BN epsilon 1e-3.
A file's scheme, and with it its family, is the one whose names fit the file's layers (`detect_scheme`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from flaxresnet import trees
from flaxresnet.errors import UserError
from flaxresnet.models import KERAS_BN_EPSILON, LEGACY_BN_EPSILON, STAGE_BLOCKS, arch_name

# Each Keras layer kind's weights, in Keras order: (Keras weight name, Flax collection, Flax leaf). Shared by
# `fill` (Keras -> Flax) and `keras_weights` (Flax -> Keras), so the mapping is written down once.
KERNEL_BIAS = (("kernel", "params", "kernel"), ("bias", "params", "bias"))  # Conv2D and Dense
BATCH_NORM = (("gamma", "params", "scale"), ("beta", "params", "bias"), ("moving_mean", "batch_stats", "mean"),
              ("moving_variance", "batch_stats", "var"))

_BRANCH_SUFFIX = {"2a": "1", "2b": "2", "2c": "3", "1": "0"}
_V02_BLOCK = re.compile(r"^(res|bn)([2-5])([a-z])_branch(2a|2b|2c|1)$")
_V02_FIXED = {"conv1": "conv1_conv", "bn_conv1": "conv1_bn", "fc1000": "predictions"}
_BLOCK_LAYER = re.compile(r"conv[2-5]_block\d+_(.+)")


@dataclass(frozen=True)
class Family:
    """A keras.applications ResNet family: its weighted layers (keras-applications names, in `model.layers`
    order, the classifier `predictions` apart) and the flaxresnet model kind that computes it
    (`models.MODEL_KINDS`)."""

    version: str  # 'v1' or 'v2', as `--family` and `download.HASHES` name it
    kind: str
    stem: tuple[str, ...]  # before the blocks
    first_block: tuple[str, ...]  # a stack's first block, after `conv{stage}_block1_`
    block: tuple[str, ...]  # every other block
    end: tuple[str, ...]  # after the blocks

    def arch(self, depth: int) -> str:
        """Keras' model name, e.g. 'ResNet50V2'."""
        return arch_name(self.version, depth)

    def layer_order(self, depth: int, include_top: bool) -> list[str]:
        """The weighted layers of the keras.applications model of `depth`, in `model.layers` order."""
        order = list(self.stem)
        for stage, blocks in enumerate(STAGE_BLOCKS[depth], start=2):
            for block in range(1, blocks + 1):
                parts = self.first_block if block == 1 else self.block
                order += [f"conv{stage}_block{block}_{part}" for part in parts]
        return order + list(self.end) + (["predictions"] if include_top else [])

    def keras_applications_name(self, name: str) -> str | None:
        """The Flax name of a keras-applications layer of this family (the same name; `probs`, keras_applications'
        classifier, is `predictions`), None for a layer the family does not have."""
        if name == "probs":
            return "predictions"
        block = _BLOCK_LAYER.fullmatch(name)
        known = block.group(1) in self.first_block if block else name in (*self.stem, *self.end, "predictions")
        return name if known else None


V1 = Family("v1", "resnet", stem=("conv1_conv", "conv1_bn"),
            first_block=("1_conv", "1_bn", "2_conv", "2_bn", "0_conv", "3_conv", "0_bn", "3_bn"),
            block=("1_conv", "1_bn", "2_conv", "2_bn", "3_conv", "3_bn"), end=())
V2 = Family("v2", "resnet_v2", stem=("conv1_conv",),
            first_block=("preact_bn", "1_conv", "1_bn", "2_conv", "2_bn", "0_conv", "3_conv"),
            block=("preact_bn", "1_conv", "1_bn", "2_conv", "2_bn", "3_conv"), end=("post_bn",))


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
    """A naming scheme of one family: its stem conv's name, how its layer names map to Flax names, and the BN
    epsilon its weights were made with."""

    name: str
    family: Family
    stem: str
    bn_epsilon: float
    to_flax: Callable[[str], str | None]


SCHEMES = (
    Scheme("keras-applications", V1, "conv1_conv", KERAS_BN_EPSILON, V1.keras_applications_name),
    Scheme("keras-applications", V2, "conv1_conv", KERAS_BN_EPSILON, V2.keras_applications_name),
    Scheme("v0.2", V1, "conv1", LEGACY_BN_EPSILON, _v02_name),
)


def detect_scheme(layer_names: list[str]) -> Scheme:
    """The scheme (and family) of a file's weighted layers: of those whose stem conv is present, the one that knows
    the most of the layers (the first listed on a tie, so V1 before V2); UserError if no stem is present (not a
    Keras ResNet file). `rename` then names the layers the scheme does not know, if any."""
    names = set(layer_names)
    candidates = [scheme for scheme in SCHEMES if scheme.stem in names]
    if not candidates:
        shown = ", ".join(sorted(names)[:5]) or "none"
        raise UserError(f"not a Keras ResNet50/101/152 weights file, nor a ResNet50V2/101V2/152V2 one: no stem "
                        f"layer 'conv1_conv' or 'conv1' (layers with weights: {shown}"
                        f"{', ...' if len(names) > 5 else ''})")
    return min(candidates, key=lambda scheme: sum(scheme.to_flax(name) is None for name in names))


def detect_depth(flax_names: list[str], family: Family = V1) -> int:
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
    known = ", ".join(f"{family.arch(depth)}: {stage_blocks}" for depth, stage_blocks in STAGE_BLOCKS.items())
    raise UserError(f"blocks per stage {found} match no ResNet {family.version} ({known}): the file holds another "
                    f"architecture")


def layer_class(name: str) -> str:
    """The Keras class of a keras-applications layer of either family: Conv2D, BatchNormalization or Dense."""
    return "Dense" if name == "predictions" else "Conv2D" if name.endswith("_conv") else "BatchNormalization"


def keras_layer_order(class_counts: Counter) -> list[tuple[str, str]]:
    """(class, name) of the weighted layers of a keras.applications ResNet in `model.layers` order.

    Used to name the groups of a Keras 3 `.weights.h5` that predates per-group layer names: the depth follows
    from the number of Conv2D groups (53, 104 or 155 in both families), the family from the BatchNormalization
    groups (V2 when there are as many as V2 has: one per block and `post_bn`; V1 otherwise), the top from a
    Dense group. Empty if the counts fit no ResNet.
    """
    depths = {1 + 3 * sum(b) + 4: d for d, b in STAGE_BLOCKS.items()}
    depth = depths.get(class_counts.get("Conv2D", 0))
    if depth is None:
        return []
    include_top = bool(class_counts.get("Dense", 0))
    order = V2.layer_order(depth, include_top)
    if Counter(map(layer_class, order))["BatchNormalization"] != class_counts.get("BatchNormalization", 0):
        order = V1.layer_order(depth, include_top)
    return [(layer_class(name), name) for name in order]


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
        raise UserError(f"{len(unknown)} layer(s) with weights are not part of a {scheme.name} "
                        f"{arch_name(scheme.family.version)}: "
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
        targets = weight_targets(params, stats, name)
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
    order = [name for _, name in keras_layer_order(Counter(map(layer_class, params)))]
    if not order:
        raise UserError("the variables are not those of a ResNet50/101/152: no layers")
    trees.check(dict.fromkeys(order), params, "the variables are not those of a ResNet50/101/152",
                "export a file converted or trained with flaxresnet", depth=1, unit="layer ")
    return [(name, layer_arrays(variables, name)) for name in order]


def layer_arrays(variables: dict[str, Any], name: str) -> list[tuple[str, np.ndarray]]:
    """[(Keras weight name, array), ...] of the Conv2D, Dense or BatchNormalization layer `name` of a Flax tree."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    return [(keras_name, np.asarray((params if collection == "params" else stats)[name][leaf]))
            for keras_name, collection, leaf in weight_targets(params, stats, name)]


def weight_targets(params: dict[str, Any], stats: dict[str, Any], name: str) -> tuple[tuple[str, str, str], ...]:
    """The (Keras weight, Flax collection, Flax leaf) triples of layer `name` of a Flax tree: BatchNormalization's
    for a layer with statistics, else kernel and, where the layer has one, bias (V2's bias-free Conv2D layers
    have a kernel only)."""
    if name in stats:
        return BATCH_NORM
    return tuple(target for target in KERNEL_BIAS if target[2] in params[name])
