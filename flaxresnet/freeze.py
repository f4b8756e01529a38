"""Which parameters train: freeze specs -> the set of frozen paths -> trainable/frozen split; parameter counts.

A spec is a preset or a regex searched in each parameter's '/'-joined path (e.g.
'backbone/conv2_block1_1_conv/kernel', 'head/dense_1/bias'); matching leaves are frozen:
- 'convs' (default, the seed recipe): every backbone conv kernel and bias; backbone BN scale/bias train;
- 'none': nothing (full fine-tune);
- 'backbone': every backbone parameter, and the backbone's BN runs in inference mode (feature extraction);
- 'stages:N' (N = 1..5): every parameter (convs and BN) of the stem (conv1, N = 1) and stages conv2..convN;
  on ResNet V2, stage 5 ends with `post_bn`, so 'stages:5' freezes every backbone parameter on both families.
Except for 'backbone', BatchNorm runs in training mode (batch statistics, moving statistics updated), as a
Keras BN layer left trainable does. The train step splits the parameters once: it differentiates and updates
the trainable subtree only (frozen weights never get a gradient, nor optimizer state), then merges once.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from flaxresnet.errors import UserError

PRESETS: dict[str, str | None] = {
    "none": None,
    "convs": r"^backbone/[^/]+_conv/",
    "backbone": r"^backbone/",
}
_STAGES = re.compile(r"stages:(\d+)")

Params = dict[str, Any]


def frozen_pattern(spec: str) -> re.Pattern[str] | None:
    """The compiled regex of frozen paths for a spec (None: nothing frozen); UserError if malformed."""
    if spec in PRESETS:
        pattern = PRESETS[spec]
        return None if pattern is None else re.compile(pattern)
    stages = _STAGES.fullmatch(spec)
    if stages:
        n = int(stages.group(1))
        if not 1 <= n <= 5:
            raise UserError(f"freeze {spec!r}: N must be 1 (stem) to 5 (all stages)", option="freeze")
        closing = "|post_bn/" if n == 5 else ""  # V2's post_bn closes stage 5
        return re.compile(rf"^backbone/(conv[1-{n}]_{closing})")
    try:
        return re.compile(spec)
    except re.error as e:
        raise UserError(f"freeze {spec!r} is neither a preset ({', '.join(PRESETS)}, stages:N) nor a valid "
                        f"regex: {e}", option="freeze") from e


def backbone_bn_train(spec: str) -> bool:
    """Whether the backbone's BatchNorm runs on batch statistics in training; only 'backbone' turns it off."""
    return spec != "backbone"


def frozen_paths(params: Params, spec: str) -> frozenset[str]:
    """The '/'-joined paths of the leaves `spec` freezes; UserError if a regex matches nothing. Computed once per
    run: hashable, it is part of what the compiled train step is specialised to."""
    pattern = frozen_pattern(spec)
    if pattern is None:
        return frozenset()
    frozen = frozenset(path for path in traverse_util.flatten_dict(params, sep="/") if pattern.search(path))
    if not frozen:
        raise UserError(f"freeze {spec!r} matches no parameter path (paths look like "
                        f"'backbone/conv1_conv/kernel' or 'head/dense/bias')", option="freeze")
    return frozen


def split(params: Params, frozen: frozenset[str]) -> tuple[Params, Params]:
    """(trainable, frozen) nested trees of the leaves whose paths are not / are in `frozen`; `merge` joins them."""
    flat = traverse_util.flatten_dict(params, sep="/")
    trainable = {path: leaf for path, leaf in flat.items() if path not in frozen}
    return (traverse_util.unflatten_dict(trainable, sep="/"),
            traverse_util.unflatten_dict({path: flat[path] for path in flat.keys() & frozen}, sep="/"))


def merge(trainable: Params, frozen: Params) -> Params:
    """The parameter tree of a `split`."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(trainable),
                                         **traverse_util.flatten_dict(frozen)})


def parameter_counts(variables: dict[str, Params], frozen: frozenset[str]) -> dict[str, int]:
    """Trainable, frozen, BN-statistics and total counts; the total includes BN moving statistics, as Keras'
    `model.summary()` counts them (as non-trainable parameters)."""
    trainable, frozen_params = split(variables["params"], frozen)

    def size(tree: Any) -> int:
        return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))

    counts = {"trainable": size(trainable), "frozen": size(frozen_params),
              "bn_statistics": size(variables.get("batch_stats", {}))}
    counts["total"] = sum(counts.values())
    return counts


def format_counts(counts: dict[str, int]) -> str:
    """The counts as an aligned text table, one line per kind, for the training log."""
    names = {"trainable": "trainable", "frozen": "frozen", "bn_statistics": "BN statistics", "total": "total"}
    return "\n".join(f"{names[k]:<14}{counts[k]:>14,}" for k in names)
