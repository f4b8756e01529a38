"""Train-step speed of the seed recipe: flaxresnet's pmapped `train_step` vs the same model in Keras 3 (JAX
backend, `train_on_batch`), plus flaxresnet frozen-convs vs full fine-tune, float32 vs bfloat16 and ResNet50V2
vs ResNet50.

A variant is IMPL:FREEZE:DTYPE[:FAMILY]. IMPL is `flax` (train_lib.p_train_step: uint8 batches in; caffe preprocessing,
random erasing, upsampling, forward, backward and Adam on device), `keras` (the seed's Sequential,
benchmarks/original.py, through `train_on_batch`; bfloat16 = Keras' mixed_bfloat16 policy) or `flax-eval`
(train_lib.p_eval_step, the evaluation of the training loop and of flaxresnet.evaluate). FREEZE is `convs`
(the seed: frozen backbone convs, trainable BN on batch statistics) or `none` (full fine-tune). Keras gets batches that are already preprocessed
and randomly erased (the seed erased on the host, per image; that host work is not timed here, see
epoch.py), so Keras' step does less work than flaxresnet's. FAMILY is `v1` (ResNet50, the default) or `v2`
(ResNet50V2, 'tf' preprocessing). All batches are on the device before timing.

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
import functools
import itertools
import os
from collections.abc import Callable
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402

from benchmarks import original  # noqa: E402
from benchmarks.common import (add_step_args, median_ratio, parse_step_args, parse_variant,  # noqa: E402
                               random_resnet50, report, step_rows, synthetic_split, time_steps)
from flaxresnet import data, train_lib  # noqa: E402
from flaxresnet.config import Config  # noqa: E402
from flaxresnet.models import BACKBONES, KerasResNet  # noqa: E402

IMPLS = ("flax", "keras", "flax-eval")
DEFAULT_VARIANTS = ("flax:convs:float32", "keras:convs:float32", "flax:none:float32", "flax:convs:bfloat16",
                    "flax:convs:float32:v2", "keras:convs:float32:v2")
FAMILIES = ("v1", "v2")
# Distinct batches cycled through during timing.
POOL = 2


@dataclasses.dataclass(frozen=True)
class Variant:
    """One thing to time: implementation, freeze preset, compute dtype and backbone family."""

    impl: str
    freeze: str
    dtype: str
    family: str = "v1"

    @classmethod
    def parse(cls, spec: str) -> Variant:
        base, family = spec.rsplit(":", 1) if spec.endswith(tuple(f":{f}" for f in FAMILIES)) else (spec, "v1")
        return cls(*parse_variant(base, IMPLS, "freeze", ("convs", "none")), family)

    def __str__(self) -> str:
        return f"{self.impl}:{self.freeze}:{self.dtype}" + ("" if self.family == "v1" else f":{self.family}")


def flax_step(variant: Variant, args: argparse.Namespace, split: data.Split,
              backbone: tuple[KerasResNet, Any]) -> Callable[[], Any]:
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
                                   freeze_convs=variant.freeze == "convs", dtype=variant.dtype, family=variant.family)
    mode = BACKBONES[variant.family].preprocess
    host = original.erased_batches(original.preprocess(split.images, mode), split.labels, args.batch_size)
    batches = itertools.cycle([jax.device_put(b) for b in itertools.islice(host, len(split) // args.batch_size)])

    def step() -> Any:
        return model.train_on_batch(*next(batches))  # returns the loss on the host: waits for the step

    return step


def ratios(times: dict[Variant, list[float]]) -> dict[str, float]:
    """Medians of per-round step-time ratios: flax/keras, convs/none, bfloat16/float32 and (flaxresnet and Keras
    alike) v2/v1, where both exist."""
    out = {}
    for v in times:
        if v.family == "v2" and (v1 := dataclasses.replace(v, family="v1")) in times:
            out[f"v2/v1 {v.impl} {v.freeze} {v.dtype}"] = median_ratio(times[v], times[v1])
        if v.impl != "flax":
            continue
        family = "" if v.family == "v1" else f" {v.family}"
        pairs = {f"flax/keras {v.freeze} {v.dtype}{family}": Variant("keras", v.freeze, v.dtype, v.family)}
        if v.freeze == "convs":
            pairs[f"convs/none flax {v.dtype}{family}"] = Variant("flax", "none", v.dtype, v.family)
        if v.dtype == "bfloat16":
            pairs[f"bfloat16/float32 flax {v.freeze}{family}"] = Variant("flax", v.freeze, "float32", v.family)
        for name, other in pairs.items():
            if other in times:
                out[name] = median_ratio(times[v], times[other])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--variants", type=Variant.parse, nargs="+", default=list(map(Variant.parse,
                                                                                       DEFAULT_VARIANTS)),
                        help="IMPL:FREEZE:DTYPE[:FAMILY], IMPL in flax/keras/flax-eval, FREEZE convs/none, "
                             "DTYPE float32/bfloat16, FAMILY v1/v2 (default v1)")
    add_step_args(parser)
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    args = parse_step_args(parser, argv)

    split = synthetic_split(POOL * args.batch_size, args.native_size, args.classes)
    backbones = {family: random_resnet50(family=family) for family in FAMILIES
                 if any(v.impl != "keras" and v.family == family for v in args.variants)}
    builders = {v: functools.partial(keras_step, v, args, split) if v.impl == "keras"
                else functools.partial(flax_step, v, args, split, backbones[v.family]) for v in args.variants}
    first, times = time_steps(builders, args.warmup, args.steps, jax.block_until_ready)

    evaluations = {(v.dtype, v.family): v for v in args.variants if v.impl == "flax-eval"}
    train = {v: evaluations.get((v.dtype, v.family)) if v.impl == "flax" else None for v in args.variants
             if v.impl != "flax-eval"}
    rows = step_rows(first, times, args, train)
    shape = f"{args.native_size} px -> {args.image_size} px, batch {args.batch_size}"
    settings = {k: v for k, v in vars(args).items() if k not in ("variants", "out")}
    report(f"seed-recipe train step ({shape})", rows, args.out, ratios=ratios(times),
           raw={"settings": settings, "step_times_s": {str(v): t for v, t in times.items()}})


if __name__ == "__main__":
    main()
