"""Shared pieces of the benchmark scripts: the options and timing loop of the step benchmarks, synthetic data,
and the output (a small aligned table on stdout plus a JSON file)."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np

from flaxresnet import data
from flaxresnet.models import BACKBONES, KerasResNet


K = TypeVar("K")


def machine(accelerator: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the numbers were measured on: the host and `accelerator` (default: JAX's backend and devices)."""
    accelerator = accelerator or {"jax_backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
                                  "device_kind": jax.devices()[0].device_kind}
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            **accelerator, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def add_step_args(parser: argparse.ArgumentParser) -> None:
    """The options of the train-step benchmarks (train_step.py, torch_step.py): shapes, timing, projection."""
    parser.add_argument("--native-size", type=int, default=32, help="side of the input images (CIFAR: 32)")
    parser.add_argument("--image-size", type=int, default=128,
                        help="side the model upsamples them to, a multiple of --native-size (seed: 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (seed: 64)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant after the first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (seed-size runs: 20)")
    parser.add_argument("--project", action="store_true",
                        help="add the projected minutes of a full run (15 CIFAR-100 epochs by default) to each "
                             "train variant; with an eval variant of its dtype, evaluation and compilation "
                             "included")
    parser.add_argument("--project-epochs", type=int, default=15, help="epochs of the projected full run")
    parser.add_argument("--project-train", type=int, default=50_000, help="training images an epoch")
    parser.add_argument("--project-val", type=int, default=10_000, help="validation images an epoch")


def parse_step_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser`'s arguments, `add_step_args`' checked: nearest upsampling needs a whole factor."""
    args = parser.parse_args(argv)
    if args.image_size % args.native_size:
        parser.error("--image-size must be a multiple of --native-size (nearest upsampling)")
    return args


def time_steps(builders: Mapping[K, Callable[[], Callable[[], Any]]], warmup: int, rounds: int,
               wait: Callable[[Any], Any]) -> tuple[dict[K, float], dict[K, list[float]]]:
    """Seconds of each variant's first step (compilation + run) and of each of its `rounds` timed steps.

    Each variant's step is built (`builders[v]()` returns a closure running one step), its first step timed
    and `warmup` more run; then the variants run in turn, one step each (A, B, C, A, B, C, ...), so machine
    noise hits all of them alike. A step is timed until `wait(its output)` returns (the device is done).
    """
    def timed(step: Callable[[], Any]) -> float:
        start = time.perf_counter()
        wait(step())
        return time.perf_counter() - start

    steps, first = {}, {}
    for v, build in builders.items():
        steps[v] = build()
        first[v] = timed(steps[v])
        print(f"{v}: first step (compile + run) {first[v]:.1f} s", flush=True)
        for _ in range(warmup):
            timed(steps[v])
    times: dict[K, list[float]] = {v: [] for v in builders}
    for _ in range(rounds):
        for v in builders:
            times[v].append(timed(steps[v]))
    return first, times


def median_ratio(times: list[float], others: list[float]) -> float:
    """The median of per-round step-time ratios (times[i] / others[i]): noise hitting a round cancels."""
    return statistics.median(a / b for a, b in zip(times, others))


def step_rows(first: Mapping[K, float], times: Mapping[K, list[float]], args: argparse.Namespace,
              train: Mapping[K, K | None]) -> list[dict[str, Any]]:
    """The report rows of `time_steps`' results: first step, median and fastest step, img/s at `args.batch_size`.

    `train` maps each train variant (the others are evaluations) to the evaluation variant of its dtype, if any.
    With `args.project`, a train variant's row adds the projected minutes of the full run (`add_step_args`): its
    training steps at the median step time and, with an evaluation variant, the whole run but data loading
    (both first steps, the training steps, every evaluation at that variant's throughput).
    """
    rows = []
    for v in first:
        step_s = statistics.median(times[v])
        row = {"variant": str(v), "first_step_s": first[v], "step_ms": 1000 * step_s,
               "min_step_ms": 1000 * min(times[v]), "img_per_s": args.batch_size / step_s}
        if args.project and v in train:
            train_s = args.project_epochs * (args.project_train // args.batch_size) * step_s
            row["projected_train_min"] = train_s / 60
            if (e := train[v]) is not None:
                eval_s = args.project_epochs * args.project_val * statistics.median(times[e]) / args.batch_size
                row["projected_total_min"] = (train_s + eval_s + first[v] + first[e]) / 60
        rows.append(row)
    return rows


def synthetic_split(examples: int, size: int, classes: int = 100, seed: int = 0) -> data.Split:
    """Random uint8 RGB images (examples, size, size, 3) with random labels below `classes`."""
    rng = np.random.default_rng(seed)
    return data.Split(rng.integers(0, 256, (examples, size, size, 3), dtype=np.uint8),
                      rng.integers(0, classes, examples, dtype=np.int32))


def random_resnet50(seed: int = 0, family: str = "v1") -> tuple[KerasResNet, dict[str, Any]]:
    """A random Flax ResNet50 (family 'v1') or ResNet50V2 ('v2') backbone as `load_converted` returns one,
    (module, variables): He-normal conv kernels, zero biases, BN as Keras initialises it. Drawn with numpy:
    Flax's jitted random init takes half a minute to compile on 2 CPU cores."""
    resnet = BACKBONES[family](depth=50)
    shapes = jax.eval_shape(resnet.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
    rng = np.random.default_rng(seed)

    def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape).astype(np.float32)
        return np.full(shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

    return resnet, jax.tree_util.tree_map_with_path(draw, shapes)


def report(name: str, rows: list[dict[str, Any]], out: str | None, raw: dict[str, Any] | None = None,
           accelerator: dict[str, Any] | None = None, **extra: Any) -> None:
    """Print `rows` as a table and `extra` below it; write both, the machine description
    (`machine(accelerator)`) and `raw` (e.g. every timing, not printed) to `out` (JSON) if given."""
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
        result = {"benchmark": name, "machine": machine(accelerator), "rows": rows, **extra, **(raw or {})}
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) or "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def parse_variant(spec: str, impls: tuple[str, ...], middle: str, choices: tuple[str, ...]) -> list[str]:
    """A benchmark variant 'IMPL:MIDDLE:DTYPE' as its three parts; argparse's error naming the allowed values."""
    parts, dtypes = spec.split(":"), ("float32", "bfloat16")
    if len(parts) != 3 or parts[0] not in impls or parts[1] not in choices or parts[2] not in dtypes:
        raise argparse.ArgumentTypeError(f"variant {spec!r} is not IMPL:{middle.upper()}:DTYPE with IMPL in "
                                         f"{'/'.join(impls)}, {middle.upper()} {'/'.join(choices)}, DTYPE "
                                         f"{'/'.join(dtypes)}")
    return parts
