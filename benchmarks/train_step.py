"""Train-step speed of the seed recipe: flaxresnet's pmapped `train_step` vs the same model in Keras 3 (JAX
backend, `train_on_batch`), plus flaxresnet frozen-convs vs full fine-tune and float32 vs bfloat16.

A variant is IMPL:FREEZE:DTYPE. IMPL is `flax` (train_lib.p_train_step: uint8 batches in; caffe preprocessing,
random erasing, upsampling, forward, backward and Adam on device), `keras` (the seed's Sequential,
benchmarks/original.py, through `train_on_batch`; bfloat16 = Keras' mixed_bfloat16 policy) or `flax-eval`
(train_lib.p_eval_step, the evaluation of the training loop and of flaxresnet.evaluate). FREEZE is `convs`
(the seed: frozen backbone convs, trainable BN on batch statistics) or `none` (full fine-tune). Keras gets batches that are already preprocessed
and randomly erased (the seed erased on the host, per image; that host work is not timed here, see
epoch.py), so Keras' step does less work than flaxresnet's. All batches are on the device before timing.

Every variant is built, compiled (first step timed) and warmed up, then the variants run in turn, one step
each (A, B, C, A, B, C, ...), each step timed to completion; ratios are medians of per-round ratios, so
machine noise that hits both sides of a round cancels.

The defaults (32 px -> 128 px, batch 8) suit 2 CPU cores. Avoid 64 px on CPU: the last stage's 3x3 convs then
see 2x2 maps, and XLA:CPU compiles six of them (in Keras and flaxresnet alike) to a layout that takes most
of the step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402

from benchmarks import original  # noqa: E402
from benchmarks.common import random_resnet50, report, synthetic_split  # noqa: E402
from flaxresnet import data, train_lib  # noqa: E402
from flaxresnet.config import Config  # noqa: E402
from flaxresnet.models import ResNet  # noqa: E402

IMPLS = ("flax", "keras", "flax-eval")
DEFAULT_VARIANTS = ("flax:convs:float32", "keras:convs:float32", "flax:none:float32", "flax:convs:bfloat16")
# Distinct batches cycled through during timing.
POOL = 2


@dataclasses.dataclass(frozen=True)
class Variant:
    """One thing to time: implementation, freeze preset and compute dtype."""

    impl: str
    freeze: str
    dtype: str

    @classmethod
    def parse(cls, spec: str) -> Variant:
        parts = spec.split(":")
        if len(parts) != 3 or parts[0] not in IMPLS or parts[1] not in ("convs", "none") or parts[2] not in (
                "float32", "bfloat16"):
            raise argparse.ArgumentTypeError(f"variant {spec!r} is not IMPL:FREEZE:DTYPE with IMPL in "
                                             f"{'/'.join(IMPLS)}, FREEZE convs/none, DTYPE float32/bfloat16")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.impl}:{self.freeze}:{self.dtype}"


def flax_step(variant: Variant, args: argparse.Namespace, split: data.Split,
              backbone: tuple[ResNet, Any]) -> Callable[[], Any]:
    """A closure running one pmapped train (or eval) step of a fresh seed-recipe state on the next batch of
    `split` (already on the device); returns the step's metrics."""
    config = Config(num_classes=args.classes, image_size=args.image_size, freeze=variant.freeze,
                    dtype=variant.dtype, batch_size=args.batch_size)
    state = train_lib.replicate(train_lib.create_train_state(config, jax.random.key(0), split.images.shape[1:],
                                                             backbone))
    host = (data.eval_batches(split, args.batch_size) if variant.impl == "flax-eval"
            else data.train_batches(split, args.batch_size, seed=0, epoch=0))
    batches = itertools.cycle(list(data.prefetch_to_device(host)))
    key = jax.random.key(1)

    def step() -> Any:
        nonlocal state
        if variant.impl == "flax-eval":
            return train_lib.p_eval_step(state.model, state.variables(), next(batches))
        state, metrics = train_lib.p_train_step(state, next(batches), key)
        return metrics

    return step


def keras_step(variant: Variant, args: argparse.Namespace, split: data.Split) -> Callable[[], Any]:
    """A closure running `train_on_batch` of a fresh seed Sequential on the next batch of `split`, preprocessed
    and randomly erased beforehand by the original host pipeline and put on the device."""
    model = original.seed_resnet50(args.native_size, args.image_size, args.classes,
                                   freeze_convs=variant.freeze == "convs", dtype=variant.dtype)
    host = original.erased_batches(original.preprocess(split.images), split.labels, args.batch_size)
    batches = itertools.cycle([jax.device_put(b) for b in itertools.islice(host, len(split) // args.batch_size)])

    def step() -> Any:
        return model.train_on_batch(*next(batches))  # returns the loss on the host: waits for the step

    return step


def timed(step: Callable[[], Any]) -> float:
    """Seconds to run `step` until its outputs are ready."""
    start = time.perf_counter()
    jax.block_until_ready(step())
    return time.perf_counter() - start


def ratios(times: dict[Variant, list[float]]) -> dict[str, float]:
    """Medians of per-round step-time ratios: flax/keras, convs/none and bfloat16/float32 where both exist."""
    out = {}
    for v in times:
        if v.impl != "flax":
            continue
        pairs = {f"flax/keras {v.freeze} {v.dtype}": Variant("keras", v.freeze, v.dtype)}
        if v.freeze == "convs":
            pairs[f"convs/none flax {v.dtype}"] = Variant("flax", "none", v.dtype)
        if v.dtype == "bfloat16":
            pairs[f"bfloat16/float32 flax {v.freeze}"] = Variant("flax", v.freeze, "float32")
        for name, other in pairs.items():
            if other in times:
                out[name] = statistics.median(a / b for a, b in zip(times[v], times[other]))
    return out


def projection(variant: Variant, times: dict[Variant, list[float]], first: dict[Variant, float],
               args: argparse.Namespace) -> dict[str, float]:
    """Projected minutes of the full run (e.g. 15 epochs of CIFAR-100): its training steps at this variant's
    median step time; for flax with a flax-eval variant of the same dtype also its evaluations at that
    throughput and both compilations (the first steps), i.e. the whole run but data loading."""
    train_s = args.project_epochs * (args.project_train // args.batch_size) * statistics.median(times[variant])
    out = {"projected_train_min": train_s / 60}
    evals = [v for v in times if v.impl == "flax-eval" and v.dtype == variant.dtype]
    if variant.impl == "flax" and evals:
        eval_s = args.project_epochs * args.project_val * statistics.median(times[evals[0]]) / args.batch_size
        out["projected_total_min"] = (train_s + eval_s + first[variant] + first[evals[0]]) / 60
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--variants", type=Variant.parse, nargs="+", default=list(map(Variant.parse,
                                                                                       DEFAULT_VARIANTS)),
                        help="IMPL:FREEZE:DTYPE, IMPL in flax/keras/flax-eval, FREEZE convs/none, DTYPE "
                             "float32/bfloat16")
    parser.add_argument("--native-size", type=int, default=32, help="side of the input images (CIFAR: 32)")
    parser.add_argument("--image-size", type=int, default=128,
                        help="side the model upsamples them to, a multiple of --native-size (seed: 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (seed: 64)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant after the first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (seed-size runs: 20)")
    parser.add_argument("--project", action="store_true",
                        help="add the projected minutes of a full run (15 CIFAR-100 epochs by default) to each "
                             "train variant; for flax with a flax-eval variant of its dtype, evaluation and "
                             "compilation included")
    parser.add_argument("--project-epochs", type=int, default=15, help="epochs of the projected full run")
    parser.add_argument("--project-train", type=int, default=50_000, help="training images an epoch")
    parser.add_argument("--project-val", type=int, default=10_000, help="validation images an epoch")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    args = parser.parse_args(argv)
    if args.image_size % args.native_size:
        parser.error("--image-size must be a multiple of --native-size (nearest upsampling)")

    split = synthetic_split(POOL * args.batch_size, args.native_size, args.classes)
    backbone = random_resnet50() if any(v.impl != "keras" for v in args.variants) else None
    steps, first = {}, {}
    for v in args.variants:
        steps[v] = keras_step(v, args, split) if v.impl == "keras" else flax_step(v, args, split, backbone)
        first[v] = timed(steps[v])
        print(f"{v}: first step (compile + run) {first[v]:.1f} s", flush=True)
        for _ in range(args.warmup):
            timed(steps[v])
    times = {v: [] for v in args.variants}
    for _ in range(args.steps):
        for v in args.variants:
            times[v].append(timed(steps[v]))

    rows = []
    for v in args.variants:
        step_s = statistics.median(times[v])
        rows.append({"variant": str(v), "first_step_s": first[v], "step_ms": 1000 * step_s,
                     "min_step_ms": 1000 * min(times[v]), "img_per_s": args.batch_size / step_s,
                     **(projection(v, times, first, args) if args.project and v.impl != "flax-eval" else {})})
    shape = f"{args.native_size} px -> {args.image_size} px, batch {args.batch_size}"
    settings = {k: v for k, v in vars(args).items() if k not in ("variants", "out")}
    report(f"seed-recipe train step ({shape})", rows, args.out, ratios=ratios(times),
           raw={"settings": settings, "step_times_s": {str(v): t for v, t in times.items()}})


if __name__ == "__main__":
    main()
