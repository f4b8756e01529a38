"""Shared output for the benchmark scripts: a small aligned table on stdout plus a JSON file."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flaxresnet import data
from flaxresnet.models import ResNet


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "jax_backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def synthetic_split(examples: int, size: int, classes: int = 100, seed: int = 0) -> data.Split:
    """Random uint8 RGB images (examples, size, size, 3) with random labels below `classes`."""
    rng = np.random.default_rng(seed)
    return data.Split(rng.integers(0, 256, (examples, size, size, 3), dtype=np.uint8),
                      rng.integers(0, classes, examples, dtype=np.int32))


def random_resnet50(seed: int = 0) -> tuple[ResNet, dict[str, Any]]:
    """A random Flax ResNet50 backbone as `load_converted` returns one, (module, variables): He-normal conv
    kernels, zero biases, BN as Keras initialises it. Drawn with numpy: Flax's jitted random init takes
    half a minute to compile on 2 CPU cores."""
    resnet = ResNet(depth=50)
    shapes = jax.eval_shape(resnet.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
    rng = np.random.default_rng(seed)

    def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape).astype(np.float32)
        return np.full(shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

    return resnet, jax.tree_util.tree_map_with_path(draw, shapes)


def report(name: str, rows: list[dict[str, Any]], out: str | None, raw: dict[str, Any] | None = None,
           **extra: Any) -> None:
    """Print `rows` as a table and `extra` below it; write both, the machine description and `raw` (e.g. every
    timing, not printed) to `out` (JSON) if given."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{name}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    for key, value in extra.items():
        print(f"{key}: {_fmt(value)}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        result = {"benchmark": name, "machine": machine(), "rows": rows, **extra, **(raw or {})}
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) or "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
