"""The one strict comparison of variable trees: what is missing, unexpected, mis-shaped or mis-typed, by path.

Weights from a converter, a backbone file or a checkpoint are filled into a tree whose names, shapes (and
dtypes) the code already knows; every such check goes through `problems` and `check`, so all of them name
problems the same way: '/'-joined paths, the first LIMIT problems and the count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from flaxresnet.errors import UserError

LIMIT = 5


def flatten(tree: Mapping[str, Any], depth: int | None = None) -> dict[str, Any]:
    """{'/'-joined path: leaf} of nested mappings; with `depth`, subtrees below that many levels are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value and depth != 1:
            for path, leaf in flatten(value, None if depth is None else depth - 1).items():
                flat[f"{key}/{path}"] = leaf
        else:
            flat[str(key)] = value
    return flat


def problems(expected: Mapping[str, Any], given: Mapping[str, Any], *, depth: int | None = None,
             unit: str = "", dtypes: bool = False) -> list[str]:
    """Every difference of `given` from `expected`, in path order: 'missing P', 'unexpected P', 'P: shape S,
    expected E' and (with `dtypes`) 'P: dtype D, expected E'. Leaves are arrays or anything with a shape
    and dtype (`jax.ShapeDtypeStruct`, orbax's array metadata); with `depth`, only the names down to that level
    are compared. `unit` is the word before a missing or unexpected path ('layer ')."""
    want, got = flatten(expected, depth), flatten(given, depth)
    found = [f"missing {unit}{path}" for path in sorted(want.keys() - got.keys())]
    found += [f"unexpected {unit}{path}" for path in sorted(got.keys() - want.keys())]
    if depth is None:
        for path in sorted(want.keys() & got.keys()):
            if _shape(got[path]) != _shape(want[path]):
                found.append(f"{path}: shape {_shape(got[path])}, expected {_shape(want[path])}")
            elif dtypes and _dtype(got[path]) != _dtype(want[path]):
                found.append(f"{path}: dtype {_dtype(got[path])}, expected {_dtype(want[path])}")
    return found


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)


def _dtype(leaf: Any) -> np.dtype:
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


def summary(found: list[str]) -> str:
    """The first LIMIT problems and, when there are more, the count: 'a; b; ... (12 in all)'."""
    shown = "; ".join(found[:LIMIT])
    return shown + (f"; ... ({len(found)} in all)" if len(found) > LIMIT else "")


def check(expected: Mapping[str, Any], given: Mapping[str, Any], what: str, advice: str, **options: Any) -> None:
    """UserError '<what>: <summary of problems>; <advice>' unless `given` fits `expected` (see `problems`)."""
    found = problems(expected, given, **options)
    if found:
        raise UserError(f"{what}: {summary(found)}; {advice}")
